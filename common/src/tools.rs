//! The tools Baton knows and the shape of each tool's `with` input, checked when a spec
//! is validated so that a typo fails at submit time instead of on an agent.
//!
//! A value that is a lone `${{ ... }}` expression can stand for any type: it is only
//! known when the step runs.

use serde_json::{Map, Value};

use crate::outcome::FailureClass;

/// Every tool a step may name.
pub const KNOWN_TOOLS: &[&str] = &[
    "shell",
    "python",
    "aider",
    "git_merge",
    "noop",
    "echo",
    "sleep",
    "fail",
    "wait_for",
    crate::approval::TOOL,
];

pub fn is_known(tool: &str) -> bool {
    KNOWN_TOOLS.contains(&tool)
}

/// Checks a step's `with` for `tool`; the error names the offending key.
pub fn check_input(tool: &str, with: &Map<String, Value>) -> Result<(), String> {
    match tool {
        "shell" => {
            only_keys(with, &["run", "argv"])?;
            one_of(with, "run", "argv", "shell needs with.run (a script) or with.argv (a command)")?;
            string(with, "run", true)?;
            string_list(with, "argv", true)
        }
        "python" => {
            only_keys(with, &["function", "args", "script", "python", "path"])?;
            one_of(
                with,
                "function",
                "script",
                "python needs with.function (\"pkg.module:func\") or with.script (code)",
            )?;
            if let Some(Value::String(f)) = with.get("function")
                && !is_expr(f)
            {
                let ok = f.split_once(':').is_some_and(|(m, n)| !m.is_empty() && !n.is_empty());
                if !ok {
                    return Err(format!("with.function must look like \"pkg.module:func\", not {f:?}"));
                }
            }
            string(with, "function", true)?;
            string(with, "script", true)?;
            string(with, "python", true)?;
            string_list(with, "path", false)?;
            match with.get("args") {
                None | Some(Value::Object(_)) => Ok(()),
                Some(Value::String(s)) if is_expr(s) => Ok(()),
                Some(_) => Err("with.args must be a mapping of keyword arguments".into()),
            }
        }
        "aider" => {
            only_keys(with, &["prompt", "files", "model", "repo", "base", "isolate", "extra_args"])?;
            if !with.contains_key("prompt") {
                return Err("aider needs with.prompt".into());
            }
            string(with, "prompt", true)?;
            string(with, "model", true)?;
            string(with, "repo", true)?;
            string(with, "base", true)?;
            match with.get("isolate") {
                None => {}
                Some(Value::String(s)) if s == "worktree" || s == "none" || is_expr(s) => {}
                Some(_) => return Err("with.isolate must be worktree or none".into()),
            }
            string_list(with, "files", false)?;
            string_list(with, "extra_args", false)
        }
        "git_merge" => {
            only_keys(with, &["repo", "target", "base", "commits", "message"])?;
            for key in ["repo", "target", "commits"] {
                if !with.contains_key(key) {
                    return Err(format!("git_merge needs with.{key}"));
                }
            }
            string(with, "repo", true)?;
            string(with, "target", true)?;
            string(with, "base", true)?;
            string(with, "message", true)?;
            string_list(with, "commits", true)
        }
        "noop" => only_keys(with, &[]),
        "echo" => Ok(()),
        "sleep" => {
            only_keys(with, &["duration"])?;
            match with.get("duration") {
                Some(Value::String(d)) if is_expr(d) => Ok(()),
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
                let ok = c.as_str().is_some_and(|c| FailureClass::parse_reported(c).is_ok() || is_expr(c));
                if !ok {
                    return Err(format!("with.class must be one of {}", FailureClass::known()));
                }
            }
            Ok(())
        }
        "wait_for" => {
            only_keys(with, &["tcp", "file", "timeout"])?;
            one_of(with, "tcp", "file", "wait_for needs with.tcp (\"host:port\") or with.file (a path)")?;
            string(with, "tcp", true)?;
            string(with, "file", true)?;
            if let Some(Value::String(t)) = with.get("tcp")
                && !is_expr(t)
                && t.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("with.tcp must look like \"host:port\", not {t:?}"));
            }
            match with.get("timeout") {
                None => Ok(()),
                Some(Value::String(t)) if is_expr(t) => Ok(()),
                Some(Value::String(t)) => {
                    crate::time::parse_duration(t).map(|_| ()).map_err(|e| format!("with.timeout: {e}"))
                }
                Some(_) => Err("with.timeout must be a string such as \"30s\"".into()),
            }
        }
        crate::approval::TOOL => crate::approval::Approval::from_with(with).map(|_| ()),
        other => Err(format!("unknown tool {other:?}")),
    }
}

fn is_expr(s: &str) -> bool {
    s.contains("${{")
}

fn one_of(with: &Map<String, Value>, a: &str, b: &str, missing: &str) -> Result<(), String> {
    match (with.contains_key(a), with.contains_key(b)) {
        (true, true) => Err(format!("give with.{a} or with.{b}, not both")),
        (false, false) => Err(missing.to_string()),
        _ => Ok(()),
    }
}

/// `key`, when present, is a string (non-empty when `non_empty`).
fn string(with: &Map<String, Value>, key: &str, non_empty: bool) -> Result<(), String> {
    match with.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if !non_empty || !s.trim().is_empty() => Ok(()),
        Some(_) => Err(format!("with.{key} must be a non-empty string")),
    }
}

/// `key`, when present, is a list of strings (non-empty when `non_empty`).
fn string_list(with: &Map<String, Value>, key: &str, non_empty: bool) -> Result<(), String> {
    match with.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if is_expr(s) => Ok(()),
        Some(Value::Array(a)) if (!non_empty || !a.is_empty()) && a.iter().all(Value::is_string) => Ok(()),
        Some(_) if non_empty => Err(format!("with.{key} must be a non-empty list of strings")),
        Some(_) => Err(format!("with.{key} must be a list of strings")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(tool: &str, v: Value) -> Result<(), String> {
        check_input(tool, v.as_object().unwrap())
    }

    #[test]
    fn inputs_are_checked_per_tool() {
        assert!(check("shell", json!({"run": "true"})).is_ok());
        assert!(check("shell", json!({"argv": "${{ steps.a.outputs.cmd }}"})).is_ok());
        assert!(check("shell", json!({"argv": []})).unwrap_err().contains("non-empty list"));
        assert!(check("python", json!({"function": "pkg.mod:f", "args": {"x": 1}, "path": ["src"]})).is_ok());
        assert!(check("python", json!({"script": "result = 1"})).is_ok());
        assert!(check("python", json!({"function": "nocolon"})).unwrap_err().contains("pkg.module:func"));
        assert!(check("python", json!({"function": "a:b", "script": "x"})).unwrap_err().contains("not both"));
        assert!(check("python", json!({"function": "a:b", "args": [1]})).unwrap_err().contains("with.args"));
        assert!(
            check("aider", json!({"prompt": "fix it", "files": ["a.py"], "model": "m", "repo": "/r"}))
                .is_ok()
        );
        assert!(check("aider", json!({"files": ["a.py"]})).unwrap_err().contains("aider needs with.prompt"));
        assert!(check("aider", json!({"prompt": "p", "files": "a.py"})).unwrap_err().contains("with.files"));
        assert!(check("wait_for", json!({"tcp": "db:5432", "timeout": "10s"})).is_ok());
        assert!(check("wait_for", json!({"file": "/tmp/ready"})).is_ok());
        assert!(check("wait_for", json!({"tcp": "db"})).unwrap_err().contains("host:port"));
        assert!(check("wait_for", json!({})).unwrap_err().contains("wait_for needs"));
        assert!(check("fail", json!({"class": "gremlins"})).unwrap_err().contains("with.class"));
        assert!(check("noop", json!({"x": 1})).unwrap_err().contains("takes no input"));
    }
}
