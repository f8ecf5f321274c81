//! `shell`: `with: {run: SCRIPT}` through `sh -c`, or `with: {argv: [PROG, ARGS...]}`
//! without a shell. The tool runs in its own process group so that stopping it stops
//! everything it started.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{Adapter, AttemptContext, BoxFuture, Outcome, Output};

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

/// How long output readers may lag behind the process's exit (a background child can
/// hold the pipes open forever).
const DRAIN: Duration = Duration::from_millis(200);

async fn run(ctx: AttemptContext) -> Outcome {
    let mut cmd = match command(&ctx.input) {
        Ok(c) => c,
        Err(e) => return Outcome::failure("tool_error", e),
    };
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.current_dir(&ctx.dir)
        .envs(&ctx.env)
        .env("BATON_RUN_ID", &ctx.run_id)
        .env("BATON_STEP_ID", &ctx.step_id)
        .env("BATON_ATTEMPT_ID", &ctx.attempt_id)
        .env("BATON_ATTEMPT", ctx.number.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::failure("tool_error", format!("cannot start {program:?}: {e}")),
    };
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let readers = [
        child.stdout.take().map(|s| tokio::spawn(pump(s, ctx.output.clone()))),
        child.stderr.take().map(|s| tokio::spawn(pump(s, ctx.output.clone()))),
    ];
    let status = tokio::select! {
        s = child.wait() => s,
        _ = ctx.stop.cancelled() => {
            stop_group(pgid, &mut child, ctx.kill_grace).await
        }
    };
    // Whatever the tool left behind in its group goes with it.
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGKILL);
    }
    for r in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(DRAIN, r).await;
    }
    match status {
        Ok(s) if s.success() => Outcome { exit_code: Some(0), ..Outcome::success(None) },
        Ok(s) => match s.code() {
            Some(code) => Outcome {
                exit_code: Some(code),
                ..Outcome::failure("nonzero_exit", format!("exit code {code}"))
            },
            None => {
                use std::os::unix::process::ExitStatusExt;
                let sig = s.signal().unwrap_or(0);
                Outcome::failure("nonzero_exit", format!("killed by signal {sig}"))
            }
        },
        Err(e) => Outcome::failure("tool_error", format!("waiting for {program:?} failed: {e}")),
    }
}

fn command(input: &serde_json::Map<String, Value>) -> Result<Command, String> {
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

/// SIGTERM to the group, SIGKILL after the grace period.
async fn stop_group(
    pgid: Option<Pid>,
    child: &mut tokio::process::Child,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            if let Some(pg) = pgid {
                let _ = killpg(pg, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

async fn pump(mut src: impl AsyncRead + Unpin, out: Output) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.write(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn ctx(dir: &std::path::Path, input: serde_json::Value) -> AttemptContext {
        AttemptContext {
            attempt_id: "att-1".into(),
            run_id: "run-1".into(),
            step_id: "step-1".into(),
            number: 2,
            input: input.as_object().cloned().unwrap_or_default(),
            env: BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]),
            dir: dir.to_path_buf(),
            stop: CancellationToken::new(),
            kill_grace: Duration::from_millis(300),
            output: Output::default(),
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
        assert_eq!((o.succeeded, o.exit_code, o.error_class.as_str()), (false, Some(7), "nonzero_exit"));
        assert_eq!(o.error, "exit code 7");
        let o = run(ctx(dir.path(), json!({"argv": ["/no/such/program"]}))).await;
        assert_eq!(o.error_class, "tool_error");
        assert!(o.error.contains("cannot start \"/no/such/program\""), "{}", o.error);
        let o = run(ctx(dir.path(), json!({}))).await;
        assert_eq!(o.error_class, "tool_error");
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
