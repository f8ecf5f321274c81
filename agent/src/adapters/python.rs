//! `python`: calls `with.function` ("pkg.module:func") with `with.args` as keyword
//! arguments, or runs `with.script` (whose global `result`, if set, is the result).
//! The return value, as JSON, is the step's result; an exception fails the step with
//! its traceback in the output. `with.python` picks the interpreter, `with.path` adds
//! import paths.

use crate::spawn::Command;
use baton_common::outcome::FailureClass;
use serde_json::{Value, json};

use super::{Adapter, AttemptContext, BoxFuture, Outcome, process};

pub struct Python;

/// Runs inside the interpreter: loads and calls the function, writes the JSON result
/// to a file (stdout belongs to the user's code). Exit 1: the user's code raised;
/// 3: the function cannot be loaded; 4: the result is not JSON.
const RUNNER: &str = r#"
import importlib, json, os, sys, traceback
req = json.loads(os.environ["BATON_PY_REQUEST"])
for p in reversed(req.get("path") or []):
    sys.path.insert(0, os.path.abspath(p))
try:
    if req.get("function"):
        mod_name, _, attr = req["function"].partition(":")
        try:
            target = importlib.import_module(mod_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except Exception as e:
            print("baton: cannot load %s: %s: %s" % (req["function"], type(e).__name__, e), file=sys.stderr)
            sys.exit(3)
        result = target(**(req.get("args") or {}))
    else:
        # Values of ${{ ... }} in the script travel in BATON_IN_n (as JSON): see
        # baton_common::script.
        def _baton_in(n):
            return json.loads(os.environ["BATON_IN_%d" % n])
        def _baton_str(n):
            v = _baton_in(n)
            return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        def _baton_bytes(n):
            return _baton_str(n).encode()
        scope = {"__name__": "__baton__", "_baton_in": _baton_in, "_baton_str": _baton_str,
                 "_baton_bytes": _baton_bytes}
        exec(compile(req["script"], "<script>", "exec"), scope)
        result = scope.get("result")
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exc()
    sys.stderr.flush()
    with open(os.environ["BATON_PY_ERROR"], "w") as f:
        f.write("%s: %s" % (type(e).__name__, e))
    sys.exit(1)
try:
    text = json.dumps(result)
except (TypeError, ValueError) as e:
    print("baton: the result is not JSON: %s" % e, file=sys.stderr)
    sys.exit(4)
with open(os.environ["BATON_PY_RESULT"], "w") as f:
    f.write(text)
"#;

impl Adapter for Python {
    fn name(&self) -> &'static str {
        "python"
    }

    fn probe(&self) -> Option<String> {
        process::probe_version("python3")
    }

    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: AttemptContext) -> Outcome {
    let python = ctx.input.get("python").and_then(Value::as_str).unwrap_or("python3").to_string();
    let request = json!({
        "function": ctx.input.get("function"),
        "args": ctx.input.get("args"),
        "script": ctx.input.get("script"),
        "path": ctx.input.get("path"),
    });
    let result_file = ctx.dir.join(".baton-result.json");
    let error_file = ctx.dir.join(".baton-error.txt");
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg(RUNNER)
        .env("BATON_PY_REQUEST", request.to_string())
        .env("BATON_PY_RESULT", &result_file)
        .env("BATON_PY_ERROR", &error_file)
        .env("PYTHONUNBUFFERED", "1");
    let finished = match process::run(cmd, &ctx).await {
        Ok(f) => f,
        Err(failed) => return failed,
    };
    let what = ctx.input.get("function").and_then(Value::as_str).unwrap_or("the script").to_string();
    match finished.status.as_ref().ok().and_then(|s| s.code()) {
        Some(0) => match tokio::fs::read_to_string(&result_file).await {
            Ok(text) if text.trim() == "null" => Outcome { exit_code: Some(0), ..Outcome::success(None) },
            Ok(text) => Outcome { exit_code: Some(0), ..Outcome::success(Some(text)) },
            Err(e) => Outcome::failure(FailureClass::ToolError, format!("{what} left no result: {e}")),
        },
        Some(1) => {
            let why = tokio::fs::read_to_string(&error_file).await.unwrap_or_else(|_| "an exception".into());
            Outcome {
                exit_code: Some(1),
                ..Outcome::failure(FailureClass::NonzeroExit, format!("{what} raised {why}"))
            }
        }
        Some(3) => Outcome {
            exit_code: Some(3),
            ..Outcome::failure(FailureClass::ToolError, format!("cannot load {what} (see output)"))
        },
        Some(4) => Outcome {
            exit_code: Some(4),
            ..Outcome::failure(FailureClass::ToolError, format!("{what} returned a value that is not JSON"))
        },
        _ => process::exit_failure(&finished.status, &python)
            .unwrap_or_else(|| Outcome::failure(FailureClass::ToolError, "python ended oddly")),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ctx(dir: &std::path::Path, input: Value) -> AttemptContext {
        AttemptContext::for_test(dir, input)
    }

    fn module(dir: &std::path::Path) -> String {
        let pkg = dir.join("lib").join("calc");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("__init__.py"), "").unwrap();
        std::fs::write(
            pkg.join("ops.py"),
            "def add(a, b):\n    print('adding', a, b)\n    return {'sum': a + b}\n\ndef boom():\n    raise ValueError('no way')\n\ndef weird():\n    return {1, 2}\n",
        )
        .unwrap();
        dir.join("lib").display().to_string()
    }

    #[tokio::test]
    async fn a_function_returns_its_result_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = module(dir.path());
        let c =
            ctx(dir.path(), json!({"function": "calc.ops:add", "args": {"a": 2, "b": 3}, "path": [path]}));
        let out = c.output.clone();
        let o = run(c).await;
        assert!(o.succeeded, "{o:?}");
        assert_eq!(o.result.as_deref(), Some("{\"sum\": 5}"));
        assert_eq!(out.tail(), "adding 2 3\n", "prints are output, not result");
    }

    #[tokio::test]
    async fn an_exception_fails_with_its_traceback() {
        let dir = tempfile::tempdir().unwrap();
        let path = module(dir.path());
        let c = ctx(dir.path(), json!({"function": "calc.ops:boom", "path": [path]}));
        let out = c.output.clone();
        let o = run(c).await;
        assert_eq!((o.succeeded, o.error_class), (false, Some(FailureClass::NonzeroExit)));
        assert_eq!(o.error, "calc.ops:boom raised ValueError: no way");
        let tail = out.tail();
        assert!(
            tail.contains("Traceback (most recent call last)") && tail.contains("ValueError: no way"),
            "{tail}"
        );
    }

    #[tokio::test]
    async fn missing_functions_and_non_json_results_are_tool_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = module(dir.path());
        let c = ctx(dir.path(), json!({"function": "calc.ops:nope", "path": [path.clone()]}));
        let out = c.output.clone();
        let o = run(c).await;
        assert_eq!(o.error_class, Some(FailureClass::ToolError));
        assert_eq!(o.error, "cannot load calc.ops:nope (see output)");
        assert!(out.tail().contains("has no attribute 'nope'"), "{}", out.tail());
        let o = run(ctx(dir.path(), json!({"function": "missing.mod:f"}))).await;
        assert_eq!(o.error, "cannot load missing.mod:f (see output)");
        let o = run(ctx(dir.path(), json!({"function": "calc.ops:weird", "path": [path]}))).await;
        assert_eq!(o.error, "calc.ops:weird returned a value that is not JSON");
        let o = run(ctx(dir.path(), json!({"script": "x = 1", "python": "/no/python"}))).await;
        assert_eq!(o.error_class, Some(FailureClass::ToolError));
        assert!(o.error.contains("cannot start \"/no/python\""), "{}", o.error);
    }

    #[tokio::test]
    async fn a_script_sets_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let o =
            run(ctx(dir.path(), json!({"script": "import os\nresult = {'cwd': os.getcwd(), 'n': 2 ** 10}"})))
                .await;
        let v: Value = serde_json::from_str(o.result.as_deref().unwrap()).unwrap();
        assert_eq!(v["n"], 1024);
        assert_eq!(v["cwd"], dir.path().display().to_string());
        let o = run(ctx(dir.path(), json!({"script": "print('no result')"}))).await;
        assert!(o.succeeded);
        assert_eq!(o.result, None);
    }
}
