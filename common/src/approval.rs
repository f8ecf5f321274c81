//! The built-in `approval` tool: a step that waits, holding no agent slot, until a
//! person approves or rejects it (or its timeout decides). Its `with`:
//!
//! ```yaml
//! with:
//!   message: "Deploy ${{ params.env }}?"   # shown to the approver
//!   timeout: 24h                           # optional
//!   on_timeout: reject                     # or approve; reject by default
//!   inputs: {version: string}              # what the approver gives: string, number, boolean
//!   role: operator                         # who may decide (operator by default)
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::auth::Role;

/// The tool's name.
pub const TOOL: &str = "approval";

/// Output keys the decision fills in, which an input may not take.
pub const RESERVED: [&str; 2] = ["approved_by", "comment"];

/// The type of a value the approver provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    String,
    Number,
    Boolean,
}

impl InputType {
    fn parse(s: &str) -> Option<InputType> {
        match s {
            "string" => Some(InputType::String),
            "number" => Some(InputType::Number),
            "boolean" => Some(InputType::Boolean),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Number => "number",
            InputType::Boolean => "boolean",
        }
    }

    /// `v` as this type: a value of the type, or text that reads as one (from the
    /// command line).
    fn coerce(self, v: &Value) -> Option<Value> {
        match (self, v) {
            (InputType::String, Value::String(_)) => Some(v.clone()),
            (InputType::Number, Value::Number(_)) | (InputType::Boolean, Value::Bool(_)) => Some(v.clone()),
            (InputType::Number, Value::String(s)) => {
                s.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(|n| {
                    // Whole numbers stay integers.
                    s.trim().parse::<i64>().map(Value::from).unwrap_or(Value::Number(n))
                })
            }
            (InputType::Boolean, Value::String(s)) => match s.trim() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// An approval step's settings, read from its `with`.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub message: Option<String>,
    pub timeout_ms: Option<u64>,
    /// What its timeout decides: approve (true) or reject.
    pub approve_on_timeout: bool,
    pub inputs: BTreeMap<String, InputType>,
    /// Who may decide: this role or a stronger one.
    pub role: Role,
}

impl Approval {
    /// Reads and checks `with`; the error names the key.
    pub fn from_with(with: &Map<String, Value>) -> Result<Approval, String> {
        if let Some(k) = with
            .keys()
            .find(|k| !["message", "timeout", "on_timeout", "inputs", "role"].contains(&k.as_str()))
        {
            return Err(format!(
                "with.{k}: approval takes with.message, with.timeout, with.on_timeout, with.inputs and with.role"
            ));
        }
        let message = match with.get("message") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("with.message must be a string".into()),
        };
        let timeout_ms = match with.get("timeout") {
            None => None,
            Some(Value::String(t)) => {
                Some(crate::time::parse_duration(t).map_err(|e| format!("with.timeout: {e}"))?.as_millis()
                    as u64)
            }
            Some(_) => return Err("with.timeout must be a string such as \"24h\"".into()),
        };
        let approve_on_timeout = match with.get("on_timeout") {
            None => false,
            Some(_) if timeout_ms.is_none() => return Err("with.on_timeout needs with.timeout".into()),
            Some(Value::String(s)) if s == "reject" => false,
            Some(Value::String(s)) if s == "approve" => true,
            Some(_) => return Err("with.on_timeout must be reject or approve".into()),
        };
        let mut inputs = BTreeMap::new();
        match with.get("inputs") {
            None => {}
            Some(Value::Object(m)) => {
                for (name, t) in m {
                    let valid = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !valid {
                        return Err(format!(
                            "with.inputs: {name:?} is not a name (letters, digits, _ and -)"
                        ));
                    }
                    if RESERVED.contains(&name.as_str()) {
                        return Err(format!("with.inputs.{name}: the decision fills in {name} itself"));
                    }
                    let ty = t.as_str().and_then(InputType::parse).ok_or_else(|| {
                        format!("with.inputs.{name}: the type must be string, number or boolean")
                    })?;
                    inputs.insert(name.clone(), ty);
                }
            }
            Some(_) => return Err("with.inputs must map names to types, such as {version: string}".into()),
        }
        if approve_on_timeout && !inputs.is_empty() {
            return Err("with.on_timeout: approve cannot give the inputs an approver would; reject, or drop with.inputs"
                .into());
        }
        let role = match with.get("role") {
            None => Role::Operator,
            Some(Value::String(r)) => match r.parse::<Role>() {
                Ok(Role::Agent) | Err(_) => {
                    return Err(format!(
                        "with.role: {r:?} is not a user role (reader, submitter, operator, admin)"
                    ));
                }
                Ok(role) => role,
            },
            Some(_) => return Err("with.role must be a role name".into()),
        };
        Ok(Approval { message, timeout_ms, approve_on_timeout, inputs, role })
    }

    /// The step's outputs for an approval with `given` inputs: each declared input as
    /// its type, and who approved with what comment. The error names the input.
    pub fn outputs(
        &self,
        given: &Map<String, Value>,
        by: &str,
        comment: &str,
    ) -> Result<Map<String, Value>, String> {
        if let Some(k) = given.keys().find(|k| !self.inputs.contains_key(k.as_str())) {
            let declared: Vec<&str> = self.inputs.keys().map(String::as_str).collect();
            return Err(if declared.is_empty() {
                format!("input {k:?}: the step asks for no inputs")
            } else {
                format!("input {k:?}: the step asks for {}", declared.join(", "))
            });
        }
        let mut out = Map::new();
        for (name, ty) in &self.inputs {
            let v = given.get(name).ok_or_else(|| format!("input {name:?} ({}) is required", ty.as_str()))?;
            let v =
                ty.coerce(v).ok_or_else(|| format!("input {name:?} must be a {}, not {v}", ty.as_str()))?;
            out.insert(name.clone(), v);
        }
        out.insert("approved_by".into(), Value::String(by.to_string()));
        out.insert("comment".into(), Value::String(comment.to_string()));
        Ok(out)
    }
}

/// A step as a review reads it: its id, tool, needs and outputs.
pub struct Reviewed<'a> {
    pub id: &'a str,
    pub tool: &'a str,
    pub needs: &'a [String],
    pub outputs: Option<&'a Value>,
}

/// What an approval step puts in front of its approver: the patches (`patch` outputs)
/// of the coding (`aider`) steps upstream of it, in the order of `steps`, each under a
/// line naming its step and commit. Empty when none is upstream.
pub fn review_diff(steps: &[Reviewed], gate: &str) -> String {
    let by_id: BTreeMap<&str, &Reviewed> = steps.iter().map(|s| (s.id, s)).collect();
    let mut upstream = std::collections::BTreeSet::new();
    let mut todo: Vec<&str> =
        by_id.get(gate).map(|g| g.needs.iter().map(String::as_str).collect()).unwrap_or_default();
    while let Some(id) = todo.pop() {
        if upstream.insert(id)
            && let Some(s) = by_id.get(id)
        {
            todo.extend(s.needs.iter().map(String::as_str));
        }
    }
    let mut out = String::new();
    for s in steps.iter().filter(|s| s.tool == "aider" && upstream.contains(s.id)) {
        let Some(o) = s.outputs else { continue };
        let Some(patch) = o.get("patch").and_then(Value::as_str).filter(|p| !p.is_empty()) else { continue };
        let commit = o.get("commit").and_then(Value::as_str).unwrap_or("");
        out.push_str(&format!("# step {} (commit {commit})\n", s.id));
        out.push_str(patch);
        if !patch.ends_with('\n') {
            out.push('\n');
        }
        if o.get("patch_truncated").and_then(Value::as_bool) == Some(true) {
            out.push_str("# ... the patch is cut here; the whole of it is the step's baton.patch artifact\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_review_shows_the_patches_of_the_coding_steps_upstream() {
        let (a, b, other) = (
            serde_json::json!({"patch": "--- a/x\n+++ b/x\n+1\n", "commit": "c1"}),
            serde_json::json!({"patch": "--- a/y\n", "commit": "c2", "patch_truncated": true}),
            serde_json::json!({"patch": "not shown"}),
        );
        let none: Vec<String> = Vec::new();
        let needs_ab = vec!["merge".to_string()];
        let merge_needs = vec!["a".to_string(), "b".to_string()];
        let steps = [
            Reviewed { id: "a", tool: "aider", needs: &none, outputs: Some(&a) },
            Reviewed { id: "b", tool: "aider", needs: &none, outputs: Some(&b) },
            Reviewed { id: "c", tool: "aider", needs: &none, outputs: Some(&other) },
            Reviewed { id: "merge", tool: "git_merge", needs: &merge_needs, outputs: None },
            Reviewed { id: "gate", tool: TOOL, needs: &needs_ab, outputs: None },
        ];
        let d = review_diff(&steps, "gate");
        assert_eq!(
            d,
            "# step a (commit c1)\n--- a/x\n+++ b/x\n+1\n# step b (commit c2)\n--- a/y\n# ... the patch is cut here; the whole of it is the step's baton.patch artifact\n"
        );
        assert_eq!(review_diff(&steps, "a"), "");
    }

    use super::*;

    fn with(yaml: &str) -> Map<String, Value> {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn settings_are_read_and_bad_ones_named() {
        let a = Approval::from_with(&with(
            "{message: ok?, timeout: 2h, on_timeout: reject, inputs: {version: string, n: number}, role: admin}",
        ))
        .unwrap();
        assert_eq!(a.timeout_ms, Some(7_200_000));
        assert_eq!(a.role, Role::Admin);
        assert_eq!(a.inputs["n"], InputType::Number);
        assert_eq!(Approval::from_with(&Map::new()).unwrap().role, Role::Operator);
        let e = |y: &str| Approval::from_with(&with(y)).unwrap_err();
        assert_eq!(e("{on_timeout: approve}"), "with.on_timeout needs with.timeout");
        assert_eq!(e("{timeout: 1h, on_timeout: maybe}"), "with.on_timeout must be reject or approve");
        assert_eq!(e("{inputs: {v: date}}"), "with.inputs.v: the type must be string, number or boolean");
        assert_eq!(
            e("{inputs: {comment: string}}"),
            "with.inputs.comment: the decision fills in comment itself"
        );
        assert!(e("{role: agent}").starts_with("with.role: \"agent\" is not a user role"));
        assert!(
            e("{timeout: 1h, on_timeout: approve, inputs: {v: string}}")
                .starts_with("with.on_timeout: approve")
        );
        assert!(e("{timeout: soon}").starts_with("with.timeout:"));
        assert!(e("{run: x}").starts_with("with.run: approval takes"));
    }

    #[test]
    fn inputs_are_checked_and_typed_from_text() {
        let a = Approval::from_with(&with("{inputs: {version: string, n: number, go: boolean}}")).unwrap();
        let out = a.outputs(&with("{version: '1.2', n: '3', go: 'true'}"), "token ann", "fine").unwrap();
        assert_eq!(
            Value::Object(out),
            serde_json::json!({"version": "1.2", "n": 3, "go": true, "approved_by": "token ann", "comment": "fine"})
        );
        assert_eq!(
            a.outputs(&with("{version: '1'}"), "x", "").unwrap_err(),
            "input \"go\" (boolean) is required"
        );
        assert_eq!(
            a.outputs(&with("{version: '1', n: three, go: true}"), "x", "").unwrap_err(),
            "input \"n\" must be a number, not \"three\""
        );
        assert_eq!(
            a.outputs(&with("{other: 1}"), "x", "").unwrap_err(),
            "input \"other\": the step asks for go, n, version"
        );
    }
}
