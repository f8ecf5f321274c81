//! The tools Baton knows and the shape of each tool's `with` input, checked when a spec
//! is validated so that a typo fails at submit time instead of on an agent.

use serde_json::{Map, Value};

/// Every tool a step may name.
pub const KNOWN_TOOLS: &[&str] = &["shell", "noop", "echo", "sleep", "fail"];

/// Tools that run inside the agent without a process.
pub const BUILTIN_TOOLS: &[&str] = &["noop", "echo", "sleep", "fail"];

/// Failure classes a tool can report.
pub const FAILURE_CLASSES: &[&str] = &["nonzero_exit", "timeout", "agent_lost", "tool_error"];

pub fn is_known(tool: &str) -> bool {
    KNOWN_TOOLS.contains(&tool)
}

/// Checks a step's `with` for `tool`; the error names the offending key.
pub fn check_input(tool: &str, with: &Map<String, Value>) -> Result<(), String> {
    match tool {
        "shell" => check_shell(with),
        "noop" => only_keys(with, &[]),
        "echo" => Ok(()),
        "sleep" => {
            only_keys(with, &["duration"])?;
            match with.get("duration") {
                Some(Value::String(d)) => {
                    crate::time::parse_duration(d).map(|_| ()).map_err(|e| format!("with.duration: {e}"))
                }
                Some(_) => Err("with.duration must be a string such as \"2s\"".into()),
                None => Err("sleep needs with.duration".into()),
            }
        }
        "fail" => {
            only_keys(with, &["class", "message", "exit_code"])?;
            if let Some(c) = with.get("class") {
                let ok = c.as_str().is_some_and(|c| FAILURE_CLASSES.contains(&c));
                if !ok {
                    return Err(format!("with.class must be one of {}", FAILURE_CLASSES.join(", ")));
                }
            }
            Ok(())
        }
        other => Err(format!("unknown tool {other:?}")),
    }
}

fn check_shell(with: &Map<String, Value>) -> Result<(), String> {
    only_keys(with, &["run", "argv"])?;
    match (with.get("run"), with.get("argv")) {
        (Some(_), Some(_)) => Err("shell takes either with.run or with.argv, not both".into()),
        (None, None) => Err("shell needs with.run (a script) or with.argv (a command)".into()),
        (Some(Value::String(s)), None) if !s.trim().is_empty() => Ok(()),
        (Some(_), None) => Err("with.run must be a non-empty string".into()),
        (None, Some(Value::Array(a))) if !a.is_empty() && a.iter().all(|v| v.is_string()) => Ok(()),
        (None, Some(_)) => Err("with.argv must be a non-empty list of strings".into()),
    }
}

fn only_keys(with: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    for key in with.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(if allowed.is_empty() {
                format!("with.{key}: this tool takes no input")
            } else {
                format!("with.{key}: unknown key (expected {})", allowed.join(", "))
            });
        }
    }
    Ok(())
}
