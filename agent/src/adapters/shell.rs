//! `shell`: `with: {run: SCRIPT}` through `sh -c`, or `with: {argv: [PROG, ARGS...]}`
//! without a shell.
//!
//! The step's result: outputs the script wrote to the file named in `BATON_OUTPUT`
//! (a JSON object, or `KEY=VALUE` lines), else the last line of stdout when it is JSON.

use crate::spawn::Command;
use baton_common::outcome::FailureClass;
use serde_json::{Map, Value};

use super::{Adapter, AttemptContext, BoxFuture, Outcome, process};

pub struct Shell;

impl Adapter for Shell {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn probe(&self) -> Option<String> {
        std::path::Path::new("/bin/sh").exists().then(|| "sh".to_string())
    }

    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: AttemptContext) -> Outcome {
    let mut cmd = match command(&ctx.input) {
        Ok(c) => c,
        Err(e) => return Outcome::failure(FailureClass::ToolError, e),
    };
    let outputs = ctx.dir.join("outputs");
    cmd.env("BATON_OUTPUT", &outputs);
    let finished = match process::run(cmd, &ctx).await {
        Ok(f) => f,
        Err(failed) => return failed,
    };
    if let Some(failed) = process::exit_failure(&finished.status, "sh") {
        return failed;
    }
    // Most tools write no outputs: a stat tells, and only a file with something in it
    // is read (on the blocking pool).
    let wrote = std::fs::metadata(&outputs).is_ok_and(|m| m.len() > 0);
    let text = if wrote { tokio::fs::read_to_string(&outputs).await } else { Ok(String::new()) };
    let result = match text {
        Ok(text) if !text.trim().is_empty() => match parse_outputs(&text) {
            Ok(v) => Some(v.to_string()),
            Err(e) => return Outcome::failure(FailureClass::ToolError, format!("BATON_OUTPUT: {e}")),
        },
        _ => finished.last_line.and_then(|l| serde_json::from_str::<Value>(&l).ok()).map(|v| v.to_string()),
    };
    Outcome { exit_code: Some(0), ..Outcome::success(result) }
}

fn command(input: &Map<String, Value>) -> Result<Command, String> {
    match (input.get("run"), input.get("argv")) {
        (Some(Value::String(script)), None) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script);
            Ok(c)
        }
        (None, Some(Value::Array(argv))) => {
            let argv: Vec<&str> = argv.iter().filter_map(Value::as_str).collect();
            let (prog, args) = argv.split_first().ok_or("with.argv is empty")?;
            let mut c = Command::new(prog);
            c.args(args);
            Ok(c)
        }
        _ => Err("shell needs with.run (a script) or with.argv (a command)".into()),
    }
}

/// A JSON object, or `KEY=VALUE` lines (blank lines and `#` comments skipped).
fn parse_outputs(text: &str) -> Result<Value, String> {
    let t = text.trim();
    if t.starts_with('{') {
        return match serde_json::from_str::<Value>(t) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err("expected a JSON object".into()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
    }
    let mut m = Map::new();
    for (i, line) in t.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                m.insert(k.trim().to_string(), Value::String(v.to_string()));
            }
            _ => return Err(format!("line {} is neither KEY=VALUE nor part of a JSON object", i + 1)),
        }
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn ctx(dir: &std::path::Path, input: serde_json::Value) -> AttemptContext {
        AttemptContext {
            attempt_id: "att-1".into(),
            run_id: "run-1".into(),
            step_id: "step-1".into(),
            number: 2,
            env: BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]),
            kill_grace: Duration::from_millis(300),
            ..AttemptContext::for_test(dir, input)
        }
    }

    #[tokio::test]
    async fn a_script_runs_in_its_dir_with_env_and_captures_output() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(
            dir.path(),
            json!({"run": "pwd; echo \"$GREETING $BATON_STEP_ID $BATON_ATTEMPT\"; echo oops >&2; touch made"}),
        );
        let out = c.output.clone();
        let o = run(c).await;
        assert!(o.succeeded, "{o:?}");
        assert_eq!(o.exit_code, Some(0));
        let tail = out.tail();
        assert!(tail.contains(&dir.path().display().to_string()), "{tail}");
        assert!(tail.contains("hi there step-1 2"), "{tail}");
        assert!(tail.contains("oops"), "stderr is captured too: {tail}");
        assert!(dir.path().join("made").exists());
    }

    #[tokio::test]
    async fn argv_runs_without_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), json!({"argv": ["echo", "$GREETING", "a;b"]}));
        let out = c.output.clone();
        assert!(run(c).await.succeeded);
        assert_eq!(out.tail(), "$GREETING a;b\n");
    }

    #[tokio::test]
    async fn exit_codes_and_missing_programs_are_failures() {
        let dir = tempfile::tempdir().unwrap();
        let o = run(ctx(dir.path(), json!({"run": "exit 7"}))).await;
        assert_eq!(
            (o.succeeded, o.exit_code, o.error_class),
            (false, Some(7), Some(FailureClass::NonzeroExit))
        );
        assert_eq!(o.error, "exit code 7");
        let o = run(ctx(dir.path(), json!({"argv": ["/no/such/program"]}))).await;
        assert_eq!(o.error_class, Some(FailureClass::ToolError));
        assert!(o.error.contains("cannot start \"/no/such/program\""), "{}", o.error);
        let o = run(ctx(dir.path(), json!({}))).await;
        assert_eq!(o.error_class, Some(FailureClass::ToolError));
    }

    #[tokio::test]
    async fn results_come_from_baton_output_or_the_last_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let o = run(ctx(dir.path(), json!({"run": "echo noise; echo '{\"v\": 1}'; echo"}))).await;
        assert_eq!(o.result.as_deref(), Some("{\"v\":1}"));
        let o = run(ctx(dir.path(), json!({"run": "echo not json"}))).await;
        assert_eq!(o.result, None);
        let o = run(ctx(dir.path(), json!({"run": "echo 'version=1.2' >> $BATON_OUTPUT; echo '# c' >> $BATON_OUTPUT; echo 'name=app' >> $BATON_OUTPUT; echo '[1]'"}))).await;
        assert_eq!(
            o.result.as_deref(),
            Some("{\"name\":\"app\",\"version\":\"1.2\"}"),
            "the file wins over stdout"
        );
        let o = run(ctx(dir.path(), json!({"run": "echo '{\"a\": [1, 2]}' > $BATON_OUTPUT"}))).await;
        assert_eq!(o.result.as_deref(), Some("{\"a\":[1,2]}"));
        let o =
            run(ctx(dir.path(), json!({"run": "echo 'a=1' > $BATON_OUTPUT; echo 'oops' >> $BATON_OUTPUT"})))
                .await;
        assert!(!o.succeeded);
        assert_eq!(o.error_class, Some(FailureClass::ToolError));
        assert_eq!(o.error, "BATON_OUTPUT: line 2 is neither KEY=VALUE nor part of a JSON object");
        let o = run(ctx(dir.path(), json!({"run": "echo '{bad' > $BATON_OUTPUT"}))).await;
        assert!(o.error.starts_with("BATON_OUTPUT: invalid JSON"), "{}", o.error);
    }

    #[tokio::test]
    async fn stopping_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        // The script forks a background sleep, then waits; stopping must take both.
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let c = ctx(dir.path(), json!({"run": script}));
        let stop = c.stop.clone();
        let task = tokio::spawn(run(c));
        let mut bg = None;
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(&pidfile)
                && let Ok(p) = s.trim().parse::<i32>()
            {
                bg = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let bg = bg.expect("background pid");
        stop.cancel();
        let o = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert!(!o.succeeded);
        // SIGKILL is delivered asynchronously: the child is gone (or a zombie) shortly.
        let gone = || std::fs::read_to_string(format!("/proc/{bg}/stat")).map_or(true, |s| s.contains(") Z"));
        for _ in 0..100 {
            if gone() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone(), "background child {bg} survived");
    }
}
