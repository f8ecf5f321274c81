//! `${{ steps.ID.outputs.NAME }}` (`${{ steps.ID.outputs }}`: all of them),
//! `${{ params.NAME }}`, `${{ secrets.NAME }}`, `${{ matrix.NAME }}` and, in a
//! `for_each` step, `${{ item }}` (`${{ item.NAME }}`: a field of it) and
//! `${{ index }}` in step inputs and env. Where ID names a matrix or for_each step,
//! the value is the list of its expansions' values, in their order.
//!
//! A string that is exactly one expression becomes the referenced JSON value itself;
//! expressions inside longer strings are replaced by their text (strings as they are,
//! other values as JSON). Scripts (a shell `run`, a python `script`) are rendered by
//! [`crate::script`] instead, so that a value never becomes code.

use serde_json::{Map, Value};

/// What an expression refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ref {
    /// An output of an upstream step; every output (its result object) when `name`
    /// is empty.
    Output {
        step: String,
        name: String,
    },
    Param(String),
    Secret(String),
    /// A value of the step's matrix combination.
    Matrix(String),
    /// The item a `for_each` expansion runs for; a field of it when the name is not
    /// empty.
    Item(String),
    /// The position of a `for_each` expansion's item in its list, from 0.
    Index,
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Output { step, name } if name.is_empty() => write!(f, "steps.{step}.outputs"),
            Ref::Output { step, name } => write!(f, "steps.{step}.outputs.{name}"),
            Ref::Param(name) => write!(f, "params.{name}"),
            Ref::Secret(name) => write!(f, "secrets.{name}"),
            Ref::Matrix(name) => write!(f, "matrix.{name}"),
            Ref::Item(name) if name.is_empty() => write!(f, "item"),
            Ref::Item(name) => write!(f, "item.{name}"),
            Ref::Index => write!(f, "index"),
        }
    }
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

/// A string split into literal text and expressions.
pub enum Part<'a> {
    Text(&'a str),
    Expr(Ref),
}

/// Splits `s` into literal text and expressions.
pub fn parse(s: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            parts.push(Part::Text(&rest[..start]));
        }
        let after = &rest[start + OPEN.len()..];
        let end = after.find(CLOSE).ok_or_else(|| format!("unclosed ${{{{ in {s:?}"))?;
        parts.push(Part::Expr(parse_ref(after[..end].trim())?));
        rest = &after[end + CLOSE.len()..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

fn parse_ref(expr: &str) -> Result<Ref, String> {
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match expr {
        "item" => return Ok(Ref::Item(String::new())),
        "index" => return Ok(Ref::Index),
        _ => {}
    }
    if let Some(rest) = expr.strip_prefix("steps.") {
        if let Some((step, name)) = rest.rsplit_once(".outputs.")
            && valid(step)
            && valid(name)
            && !name.contains('.')
        {
            return Ok(Ref::Output { step: step.to_string(), name: name.to_string() });
        }
        if let Some(step) = rest.strip_suffix(".outputs")
            && valid(step)
        {
            return Ok(Ref::Output { step: step.to_string(), name: String::new() });
        }
    } else if let Some(name) = expr.strip_prefix("matrix.")
        && valid(name)
        && !name.contains('.')
    {
        return Ok(Ref::Matrix(name.to_string()));
    } else if let Some(name) = expr.strip_prefix("item.")
        && valid(name)
        && !name.contains('.')
    {
        return Ok(Ref::Item(name.to_string()));
    } else if let Some(name) = expr.strip_prefix("params.")
        && valid(name)
        && !name.contains('.')
    {
        return Ok(Ref::Param(name.to_string()));
    } else if let Some(name) = expr.strip_prefix("secrets.")
        && valid(name)
        && !name.contains('.')
    {
        return Ok(Ref::Secret(name.to_string()));
    }
    Err(format!(
        "bad expression ${{{{ {expr} }}}}: expected steps.ID.outputs.NAME, steps.ID.outputs, params.NAME, secrets.NAME, matrix.NAME, item, item.NAME or index"
    ))
}

/// Every reference in the strings of `v` (map values and list items, recursively).
pub fn refs(v: &Value) -> Result<Vec<Ref>, String> {
    let mut out = Vec::new();
    walk(v, &mut |s| {
        for p in parse(s)? {
            if let Part::Expr(r) = p {
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

fn walk(v: &Value, f: &mut dyn FnMut(&str) -> Result<(), String>) -> Result<(), String> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|x| walk(x, f)),
        Value::Object(m) => m.values().try_for_each(|x| walk(x, f)),
        _ => Ok(()),
    }
}

/// `v` with every expression replaced by what `lookup` gives for it.
pub fn render(v: &Value, lookup: &dyn Fn(&Ref) -> Result<Value, String>) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => render_str(s, lookup)?,
        Value::Array(a) => Value::Array(a.iter().map(|x| render(x, lookup)).collect::<Result<_, _>>()?),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                out.insert(k.clone(), render(x, lookup)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

fn render_str(s: &str, lookup: &dyn Fn(&Ref) -> Result<Value, String>) -> Result<Value, String> {
    let parts = parse(s)?;
    if let [Part::Expr(r)] = parts.as_slice() {
        return lookup(r);
    }
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Expr(r) => match lookup(&r)? {
                Value::String(x) => out.push_str(&x),
                other => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(Value::String(out))
}

/// The value of `r` (an output reference to `step`'s output `name`) from that step's
/// result JSON, or why there is none.
pub fn output_value(r: &Ref, step: &str, name: &str, result: Option<&str>) -> Result<Value, String> {
    let result = result.ok_or(format!("step {step:?} produced no outputs"))?;
    match serde_json::from_str::<Value>(result) {
        Ok(v @ Value::Object(_)) if name.is_empty() => Ok(v),
        Ok(Value::Object(m)) => m.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = m.keys().map(String::as_str).collect();
            format!("{r} is not set (step {step:?} has outputs: {})", names.join(", "))
        }),
        _ => Err(format!("{r}: step {step:?} has no named outputs (its result is not a JSON object)")),
    }
}

/// The value of `${{ item }}` or `${{ item.NAME }}` (`r`) for a `for_each` expansion
/// whose item is `item`.
pub fn item_value(r: &Ref, name: &str, item: Option<&Value>) -> Result<Value, String> {
    let item = item.ok_or(format!("{r} is only set in a for_each step"))?;
    if name.is_empty() {
        return Ok(item.clone());
    }
    match item {
        Value::Object(m) => m.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = m.keys().map(String::as_str).collect();
            format!("{r} is not set (the item has fields: {})", names.join(", "))
        }),
        other => Err(format!("{r}: the item is {}, not an object", kind_of(other))),
    }
}

/// What kind of JSON value `v` is, for messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Renders to text (for env values and command arguments).
pub fn render_text(s: &str, lookup: &dyn Fn(&Ref) -> Result<Value, String>) -> Result<String, String> {
    Ok(text_of(render_str(s, lookup)?))
}

/// A value as text: a string as it is, anything else as JSON.
pub fn text_of(v: Value) -> String {
    match v {
        Value::String(x) => x,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup(r: &Ref) -> Result<Value, String> {
        match r {
            Ref::Output { step, name } if step == "build.v1" && name == "version" => Ok(json!("1.2.3")),
            Ref::Output { step, name } if step == "build.v1" && name == "files" => Ok(json!(["a", "b"])),
            Ref::Param(p) if p == "env" => Ok(json!("prod")),
            other => Err(format!("{other} is not set")),
        }
    }

    #[test]
    fn renders_whole_values_and_embedded_text() {
        let v = json!({
            "tag": "app:${{ steps.build.v1.outputs.version }}-${{params.env}}",
            "files": "${{ steps.build.v1.outputs.files }}",
            "n": 3,
            "list": ["${{ params.env }}", "plain"]
        });
        let out = render(&v, &lookup).unwrap();
        assert_eq!(out["tag"], "app:1.2.3-prod");
        assert_eq!(out["files"], json!(["a", "b"]), "a lone expression keeps its JSON type");
        assert_eq!(out["list"], json!(["prod", "plain"]));
        assert_eq!(out["n"], 3);
        assert_eq!(render_text("n=${{ steps.build.v1.outputs.files }}", &lookup).unwrap(), "n=[\"a\",\"b\"]");
    }

    #[test]
    fn finds_references_and_rejects_bad_expressions() {
        let r = refs(&json!({"a": ["x ${{ steps.s.outputs.o }}"], "b": "${{ params.p }}"})).unwrap();
        assert_eq!(r, vec![Ref::Output { step: "s".into(), name: "o".into() }, Ref::Param("p".into())]);
        assert!(refs(&json!("${{ env.HOME }}")).unwrap_err().contains("bad expression"));
        assert!(refs(&json!("${{ steps.s.result }}")).is_err());
        assert!(refs(&json!("${{ params.p")).unwrap_err().contains("unclosed"));
        assert_eq!(render(&json!("${{ params.q }}"), &lookup).unwrap_err(), "params.q is not set");
    }
}
