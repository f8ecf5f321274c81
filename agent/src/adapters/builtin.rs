//! Built-in tools that run inside the agent without a process: `noop`, `echo`,
//! `sleep` and `fail` (for tests and drills).

use baton_common::outcome::FailureClass;
use serde_json::Value;

use super::{Adapter, AttemptContext, BoxFuture, Outcome};

fn version() -> Option<String> {
    Some(env!("CARGO_PKG_VERSION").to_string())
}

/// Succeeds at once.
pub struct Noop;

impl Adapter for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn probe(&self) -> Option<String> {
        version()
    }
    fn needs_dir(&self) -> bool {
        false
    }
    fn run(&self, _ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(async { Outcome::success(None) })
    }
}

/// Returns its input as the step's result.
pub struct Echo;

impl Adapter for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn probe(&self) -> Option<String> {
        version()
    }
    fn needs_dir(&self) -> bool {
        false
    }
    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        let result = Value::Object(ctx.input).to_string();
        Box::pin(async move { Outcome::success(Some(result)) })
    }
}

/// Sleeps for `with.duration`, or until stopped.
pub struct Sleep;

impl Adapter for Sleep {
    fn name(&self) -> &'static str {
        "sleep"
    }
    fn probe(&self) -> Option<String> {
        version()
    }
    fn needs_dir(&self) -> bool {
        false
    }
    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(async move {
            let text = ctx.input.get("duration").and_then(Value::as_str).unwrap_or("");
            let d = match baton_common::time::parse_duration(text) {
                Ok(d) => d,
                Err(e) => return Outcome::failure(FailureClass::ToolError, format!("with.duration: {e}")),
            };
            tokio::select! {
                _ = tokio::time::sleep(d) => Outcome::success(None),
                _ = ctx.stop.cancelled() => Outcome::failure(FailureClass::ToolError, "stopped"),
            }
        })
    }
}

/// Fails with `with.class` (default `tool_error`), `with.message` and `with.exit_code`.
pub struct Fail;

impl Adapter for Fail {
    fn name(&self) -> &'static str {
        "fail"
    }
    fn probe(&self) -> Option<String> {
        version()
    }
    fn needs_dir(&self) -> bool {
        false
    }
    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        // Checked at submit; a class rendered from an expression may still be wrong.
        let class = ctx
            .input
            .get("class")
            .and_then(Value::as_str)
            .map_or(Ok(FailureClass::ToolError), FailureClass::parse_reported);
        let message =
            ctx.input.get("message").and_then(Value::as_str).unwrap_or("failed on purpose").to_string();
        let exit_code = ctx.input.get("exit_code").and_then(Value::as_i64).map(|c| c as i32);
        Box::pin(async move {
            ctx.output.write(format!("{message}\n").as_bytes());
            match class {
                Ok(class) => Outcome { exit_code, ..Outcome::failure(class, message) },
                Err(e) => Outcome::failure(FailureClass::ToolError, format!("with.class: {e}")),
            }
        })
    }
}
