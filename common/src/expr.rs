//! Step conditions (`if:`): a small expression language over params, matrix values
//! and upstream outputs. Comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`), `&&`, `||`,
//! `!`, parentheses, and literals (`'text'`, `"text"`, numbers, `true`, `false`,
//! `null`). It evaluates; it runs nothing.
//!
//! Outputs written as `KEY=VALUE` lines are strings, so a comparison of a string with a
//! number or a boolean compares the string read as one (`"true" == true`).

use serde_json::Value;

use crate::template::{self, Ref};

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    Ref(Ref),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(Box<Expr>, Op, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Longest condition accepted, in bytes.
pub const MAX_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(Value),
    Ref(Ref),
    Op(Op),
    And,
    Or,
    Not,
    Open,
    Close,
}

/// Parses a condition, written bare or as one `${{ ... }}`.
pub fn parse(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LEN {
        return Err(format!("the condition is {} bytes; the limit is {MAX_LEN}", text.len()));
    }
    let t = text.trim();
    let t = match t.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        Some(inner) if !inner.contains("${{") => inner,
        _ => t,
    };
    let toks = lex(t)?;
    let mut p = Parser { toks, at: 0 };
    let e = p.or()?;
    if p.at < p.toks.len() {
        return Err(format!("unexpected {:?} in {t:?}", p.toks[p.at]));
    }
    Ok(e)
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        let two = s.get(i..i + 2).unwrap_or("");
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => (out.push(Tok::Open), i += 1).1,
            ')' => (out.push(Tok::Close), i += 1).1,
            _ if two == "&&" => (out.push(Tok::And), i += 2).1,
            _ if two == "||" => (out.push(Tok::Or), i += 2).1,
            _ if two == "==" => (out.push(Tok::Op(Op::Eq)), i += 2).1,
            _ if two == "!=" => (out.push(Tok::Op(Op::Ne)), i += 2).1,
            _ if two == "<=" => (out.push(Tok::Op(Op::Le)), i += 2).1,
            _ if two == ">=" => (out.push(Tok::Op(Op::Ge)), i += 2).1,
            '<' => (out.push(Tok::Op(Op::Lt)), i += 1).1,
            '>' => (out.push(Tok::Op(Op::Gt)), i += 1).1,
            '!' => (out.push(Tok::Not), i += 1).1,
            '\'' | '"' => {
                let end = s[i + 1..].find(c).ok_or_else(|| format!("unclosed {c} in {s:?}"))?;
                out.push(Tok::Lit(Value::String(s[i + 1..i + 1 + end].to_string())));
                i += end + 2;
            }
            _ => {
                let len = s[i..]
                    .find(|ch: char| !(ch.is_ascii_alphanumeric() || "-_.+".contains(ch)))
                    .unwrap_or(s.len() - i);
                if len == 0 {
                    return Err(format!("unexpected {c:?} in {s:?}"));
                }
                let word = &s[i..i + len];
                let lit = match word {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    "null" => Some(Value::Null),
                    _ => serde_json::from_str::<serde_json::Number>(word).ok().map(Value::Number),
                };
                out.push(match lit {
                    Some(v) => Tok::Lit(v),
                    None => match template::parse(&format!("${{{{ {word} }}}}")) {
                        Ok(parts) => match parts.into_iter().next() {
                            Some(template::Part::Expr(Ref::Secret(_))) => {
                                return Err(format!("{word}: a condition may not read secrets"));
                            }
                            Some(template::Part::Expr(r)) => Tok::Ref(r),
                            _ => return Err(format!("unexpected {word:?} in {s:?}")),
                        },
                        Err(_) => {
                            return Err(format!(
                                "unknown name {word:?} (expected steps.ID.outputs.NAME, params.NAME, matrix.NAME or a literal)"
                            ));
                        }
                    },
                });
                i += len;
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.at += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.not()?;
        while self.peek() == Some(&Tok::And) {
            self.at += 1;
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Tok::Not) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        let left = self.primary()?;
        if let Some(Tok::Op(op)) = self.peek().cloned() {
            self.at += 1;
            return Ok(Expr::Cmp(Box::new(left), op, Box::new(self.primary()?)));
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let t = self.toks.get(self.at).cloned().ok_or("the condition ends too soon")?;
        self.at += 1;
        match t {
            Tok::Lit(v) => Ok(Expr::Lit(v)),
            Tok::Ref(r) => Ok(Expr::Ref(r)),
            Tok::Open => {
                let e = self.or()?;
                if self.peek() != Some(&Tok::Close) {
                    return Err("a ( is not closed".into());
                }
                self.at += 1;
                Ok(e)
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

impl Expr {
    /// Every reference it reads.
    pub fn refs(&self) -> Vec<Ref> {
        let mut out = Vec::new();
        self.walk(&mut |r| out.push(r.clone()));
        out
    }

    fn walk(&self, f: &mut dyn FnMut(&Ref)) {
        match self {
            Expr::Lit(_) => {}
            Expr::Ref(r) => f(r),
            Expr::Not(e) => e.walk(f),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Cmp(a, _, b) => {
                a.walk(f);
                b.walk(f);
            }
        }
    }

    /// Whether the condition holds, with references looked up by `lookup`.
    pub fn holds(&self, lookup: &dyn Fn(&Ref) -> Result<Value, String>) -> Result<bool, String> {
        Ok(truthy(&self.eval(lookup)?))
    }

    fn eval(&self, lookup: &dyn Fn(&Ref) -> Result<Value, String>) -> Result<Value, String> {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Ref(r) => lookup(r)?,
            Expr::Not(e) => Value::Bool(!truthy(&e.eval(lookup)?)),
            Expr::And(a, b) => Value::Bool(truthy(&a.eval(lookup)?) && truthy(&b.eval(lookup)?)),
            Expr::Or(a, b) => Value::Bool(truthy(&a.eval(lookup)?) || truthy(&b.eval(lookup)?)),
            Expr::Cmp(a, op, b) => Value::Bool(compare(&a.eval(lookup)?, *op, &b.eval(lookup)?)),
        })
    }
}

/// False: `false`, `null`, `0`, `""` and `"false"`; anything else is true.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty() && s != "false",
        _ => true,
    }
}

/// A string read as the scalar it spells, when the other side is a number or boolean.
fn coerce(v: &Value, other: &Value) -> Value {
    match (v, other) {
        (Value::String(s), Value::Number(_) | Value::Bool(_)) => serde_json::from_str::<Value>(s.trim())
            .ok()
            .filter(|x| !x.is_string())
            .unwrap_or_else(|| v.clone()),
        _ => v.clone(),
    }
}

fn compare(a: &Value, op: Op, b: &Value) -> bool {
    let (a, b) = (coerce(a, b), coerce(b, a));
    let ord = match (&a, &b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().zip(y.as_f64()).and_then(|(x, y)| x.partial_cmp(&y))
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    };
    match op {
        Op::Eq => ord.map_or(a == b, |o| o.is_eq()),
        Op::Ne => ord.map_or(a != b, |o| o.is_ne()),
        Op::Lt => ord.is_some_and(|o| o.is_lt()),
        Op::Le => ord.is_some_and(|o| o.is_le()),
        Op::Gt => ord.is_some_and(|o| o.is_gt()),
        Op::Ge => ord.is_some_and(|o| o.is_ge()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn holds(text: &str) -> bool {
        let lookup = |r: &Ref| -> Result<Value, String> {
            Ok(match r.to_string().as_str() {
                "steps.check.outputs.changed" => json!("true"),
                "steps.check.outputs.count" => json!("3"),
                "params.env" => json!("prod"),
                "matrix.os" => json!("debian"),
                other => return Err(format!("{other} is not set")),
            })
        };
        parse(text).unwrap().holds(&lookup).unwrap()
    }

    #[test]
    fn conditions_compare_combine_and_read_strings_as_the_scalars_they_spell() {
        assert!(holds("${{ steps.check.outputs.changed == true }}"));
        assert!(!holds("steps.check.outputs.changed == false"));
        assert!(holds("steps.check.outputs.count > 2 && steps.check.outputs.count <= 3"));
        assert!(holds("params.env == 'prod' || false"));
        assert!(!holds("!(params.env == \"prod\")"));
        assert!(holds("matrix.os != 'alpine' && !false"));
        assert!(holds("steps.check.outputs.changed"));
        assert!(!holds("null || 0 || '' || 'false'"));
        assert!(holds("'b' > 'a'"));
    }

    #[test]
    fn a_bad_condition_is_refused_with_the_reason() {
        assert!(parse("params.env ==").unwrap_err().contains("ends too soon"));
        assert!(parse("(true").unwrap_err().contains("not closed"));
        assert!(parse("env.HOME").unwrap_err().contains("unknown name \"env.HOME\""));
        assert!(parse("secrets.token == 'x'").unwrap_err().contains("may not read secrets"));
        assert!(parse("'open").unwrap_err().contains("unclosed"));
        assert!(parse("true false").unwrap_err().contains("unexpected"));
        assert!(parse("true ; false").unwrap_err().contains("unexpected ';'"));
        assert_eq!(
            parse("steps.a.outputs.x == 1").unwrap().refs(),
            vec![Ref::Output { step: "a".into(), name: "x".into() }]
        );
    }
}
