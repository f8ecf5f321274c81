//! Templates in scripts: a value substituted into a shell `run` or a python `script`
//! never becomes code.
//!
//! Each `${{ ... }}` in a script is replaced by a reference to an environment variable
//! (`BATON_IN_1`, `BATON_IN_2`, ...) that carries the value, written for where the
//! expression stands:
//!
//! - shell code: `"${BATON_IN_1}"`; inside double quotes or an unquoted here-document:
//!   `${BATON_IN_1}`; inside single quotes: `'"${BATON_IN_1}"'`; inside `$(( ))` the
//!   value must be an integer;
//! - Python code: `_baton_in(1)`, the value as a Python object; inside a string literal
//!   the literal is split around `_baton_str(1)` (`{_baton_str(1)}` in an f-string).
//!
//! The value's text is never pasted into the script, so if the scanner below misjudges
//! a quote the worst outcome is literal text, never code. Where no reference can work
//! (a quoted here-document, right after a backslash) the spec is refused.

use serde_json::Value;

use crate::template::{self, Part, Ref};

/// Prefix of the environment variables that carry substituted values.
pub const VAR_PREFIX: &str = "BATON_IN_";

/// The language a script is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// POSIX `sh`.
    Shell,
    Python,
}

/// The script inputs of `tool`: keys of `with` whose string is code in `Lang`.
pub fn script_key(tool: &str) -> Option<(&'static str, Lang)> {
    match tool {
        "shell" => Some(("run", Lang::Shell)),
        "python" => Some(("script", Lang::Python)),
        _ => None,
    }
}

/// Inputs of `tool` that are lists of command arguments: each item is one argument.
fn arg_list(tool: &str, key: &str) -> bool {
    matches!((tool, key), ("shell", "argv") | ("aider", "files" | "extra_args") | ("python", "path"))
}

/// A rendered `with`, and the environment that carries its script's values.
pub type RenderedInput = (serde_json::Map<String, Value>, Vec<(String, String)>);

/// A step's `with` rendered for `tool`, and the environment its script's values travel
/// in: the script input through [`render`], each item of an argument list as exactly
/// one argument (text), everything else through [`template::render`].
pub fn render_input(
    tool: &str,
    with: &serde_json::Map<String, Value>,
    lookup: &dyn Fn(&Ref) -> Result<Value, String>,
) -> Result<RenderedInput, String> {
    let mut out = serde_json::Map::new();
    let mut env = Vec::new();
    for (key, v) in with {
        let rendered = match (script_key(tool), v) {
            (Some((k, lang)), Value::String(text)) if k == key => {
                let r = render(lang, text, lookup)?;
                env = r.env;
                Value::String(r.script)
            }
            _ if arg_list(tool, key) => {
                let items = match template::render(v, lookup)? {
                    Value::Array(items) => items,
                    one => vec![one],
                };
                Value::Array(items.into_iter().map(|x| Value::String(template::text_of(x))).collect())
            }
            _ => template::render(v, lookup)?,
        };
        out.insert(key.clone(), rendered);
    }
    Ok((out, env))
}

/// A step's rendered `with` and its environment.
pub type RenderedStep = (serde_json::Map<String, Value>, std::collections::BTreeMap<String, String>);

/// A step's `with` and `env` rendered for `tool`: the input as [`render_input`] gives
/// it, and the environment with the step's own values rendered as text plus the
/// variables its script's values travel in. The controller renders with it at
/// dispatch, an agent for an attempt started after its predecessors (same code, same
/// result).
pub fn render_step(
    tool: &str,
    with: &serde_json::Map<String, Value>,
    env: &std::collections::BTreeMap<String, String>,
    lookup: &dyn Fn(&Ref) -> Result<Value, String>,
) -> Result<RenderedStep, String> {
    let (with, script_env) = render_input(tool, with, lookup)?;
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in env {
        out.insert(k.clone(), template::render_text(v, lookup)?);
    }
    out.extend(script_env);
    Ok((with, out))
}

/// A script with its expressions replaced, and the environment that carries their
/// values (`BATON_IN_n`, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub script: String,
    pub env: Vec<(String, String)>,
}

/// Checks a step's script input (if `tool` has one): every expression in it must stand
/// where a reference can carry it.
pub fn check_input(tool: &str, with: &serde_json::Map<String, Value>) -> Result<(), String> {
    match script_key(tool) {
        Some((key, lang)) => match with.get(key) {
            Some(Value::String(text)) => check(lang, text).map_err(|e| format!("with.{key}: {e}")),
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// Checks that every expression in `script` stands where a reference can carry it.
pub fn check(lang: Lang, script: &str) -> Result<(), String> {
    render(lang, script, &|_| Ok(Value::String("0".into()))).map(|_| ())
}

/// Renders `script`, looking up each expression's value.
pub fn render(
    lang: Lang,
    script: &str,
    lookup: &dyn Fn(&Ref) -> Result<Value, String>,
) -> Result<Rendered, String> {
    let parts = template::parse(script)?;
    let mut out = Rendered { script: String::with_capacity(script.len() + 32), env: Vec::new() };
    let mut sh = Shell::default();
    let mut py = Python::default();
    for part in parts {
        match part {
            Part::Text(t) => match lang {
                Lang::Shell => sh.feed(t, &mut out.script),
                Lang::Python => py.feed(t, &mut out.script),
            },
            Part::Expr(r) => {
                let value = lookup(&r)?;
                let n = out.env.len() + 1;
                let var = format!("{VAR_PREFIX}{n}");
                let placed = match lang {
                    Lang::Shell => sh.place(&r, &var, &value, &mut out.script),
                    Lang::Python => py.place(&r, n, &mut out.script),
                };
                placed.map_err(|why| format!("${{{{ {r} }}}} {why}"))?;
                let env_value = match lang {
                    Lang::Shell => template::text_of(value),
                    Lang::Python => value.to_string(),
                };
                if env_value.contains('\0') {
                    return Err(format!("${{{{ {r} }}}}: the value holds a NUL byte"));
                }
                out.env.push((var, env_value));
            }
        }
    }
    Ok(out)
}

/// Where the shell scanner is: the innermost open construct last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Double,
    Single,
    Backtick,
    /// `$( ... )`, with the depth of plain parentheses inside it.
    Subst(u32),
    /// `$(( ... ))`, with the depth of parentheses inside it.
    Arith(u32),
    /// `${ ... }`.
    Param,
}

/// A here-document announced on the current line, read after its newline.
#[derive(Debug, Clone, Default)]
struct Heredoc {
    delim: String,
    strip_tabs: bool,
    quoted: bool,
}

/// A `<<` whose delimiter word is being read.
#[derive(Debug, Clone, Default)]
struct Announce {
    doc: Heredoc,
    started: bool,
    quote: Option<char>,
}

#[derive(Debug, Default)]
struct Shell {
    stack: Vec<Frame>,
    /// The next character starts a word (so `#` starts a comment).
    word_start: bool,
    comment: bool,
    /// The previous character was an unescaped backslash.
    escape: bool,
    announce: Option<Announce>,
    pending: Vec<Heredoc>,
    /// The here-document whose body is being read, and its current line.
    body: Option<(Heredoc, String)>,
    started: bool,
}

impl Shell {
    fn code(&self) -> bool {
        !matches!(self.stack.last(), Some(Frame::Double | Frame::Single))
    }

    fn feed(&mut self, text: &str, out: &mut String) {
        if !self.started {
            self.started = true;
            self.word_start = true;
        }
        out.push_str(text);
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            i += 1;
            if let Some((doc, line)) = &mut self.body {
                if self.escape {
                    self.escape = false;
                    line.push(c);
                    continue;
                }
                if c == '\n' {
                    let l = if doc.strip_tabs { line.trim_start_matches('\t') } else { line.as_str() };
                    if l == doc.delim {
                        self.body = None;
                        self.next_body();
                        self.word_start = true;
                    } else {
                        line.clear();
                    }
                } else {
                    if c == '\\' && !doc.quoted {
                        self.escape = true;
                    }
                    line.push(c);
                }
                continue;
            }
            if self.escape {
                self.escape = false;
                self.word_start = false;
                continue;
            }
            if self.comment {
                if c == '\n' {
                    self.comment = false;
                    self.newline();
                }
                continue;
            }
            if let Some(a) = &mut self.announce {
                let ends = a.quote.is_none()
                    && (c.is_whitespace() || ";|&<>()".contains(c))
                    && (a.started || c == '\n' || !" \t".contains(c));
                if !ends {
                    match (a.quote, c) {
                        (None, ' ' | '\t') if !a.started => {}
                        (None, '-') if !a.started && !a.doc.strip_tabs && a.doc.delim.is_empty() => {
                            a.doc.strip_tabs = true;
                        }
                        (None, '\'' | '"') => {
                            a.started = true;
                            a.doc.quoted = true;
                            a.quote = Some(c);
                        }
                        (Some(q), _) if q == c => a.quote = None,
                        (None, '\\') => {
                            a.started = true;
                            a.doc.quoted = true;
                            if let Some(n) = next {
                                a.doc.delim.push(n);
                                i += 1;
                            }
                        }
                        _ => {
                            a.started = true;
                            a.doc.delim.push(c);
                        }
                    }
                    continue;
                }
                if let Some(a) = self.announce.take()
                    && !a.doc.delim.is_empty()
                {
                    self.pending.push(a.doc);
                }
            }
            let top = self.stack.last().cloned();
            match top {
                Some(Frame::Single) => {
                    if c == '\'' {
                        self.stack.pop();
                    }
                    continue;
                }
                Some(Frame::Double) => {
                    match c {
                        '\\' => self.escape = true,
                        '"' => {
                            self.stack.pop();
                        }
                        '`' => self.stack.push(Frame::Backtick),
                        '$' => i += self.dollar(next, chars.get(i + 1).copied()),
                        _ => {}
                    }
                    continue;
                }
                _ => {}
            }
            // Code: plain, or inside `$( )`, `$(( ))`, `${ }` or backquotes.
            let was_start = self.word_start;
            self.word_start = c.is_whitespace() || ";|&()".contains(c);
            match c {
                '\\' => self.escape = true,
                '\'' => self.stack.push(Frame::Single),
                '"' => self.stack.push(Frame::Double),
                '`' if top == Some(Frame::Backtick) => {
                    self.stack.pop();
                }
                '`' => self.stack.push(Frame::Backtick),
                '$' => i += self.dollar(next, chars.get(i + 1).copied()),
                '#' if was_start && !matches!(top, Some(Frame::Param | Frame::Arith(_))) => {
                    self.comment = true;
                }
                '(' => {
                    if let Some(Frame::Subst(d) | Frame::Arith(d)) = self.stack.last_mut() {
                        *d += 1;
                    }
                }
                ')' => match self.stack.last_mut() {
                    Some(Frame::Subst(0)) => {
                        self.stack.pop();
                    }
                    Some(Frame::Arith(0)) => {
                        self.stack.pop();
                        if next == Some(')') {
                            i += 1;
                        }
                    }
                    Some(Frame::Subst(d) | Frame::Arith(d)) => *d -= 1,
                    _ => {}
                },
                '}' if top == Some(Frame::Param) => {
                    self.stack.pop();
                }
                '<' if next == Some('<')
                    && chars.get(i + 1) != Some(&'<')
                    && top != Some(Frame::Arith(0)) =>
                {
                    i += 1;
                    self.announce = Some(Announce::default());
                }
                '\n' => self.newline(),
                _ => {}
            }
        }
    }

    /// After a `$`: opens `$(`, `$((` or `${`; returns how many more characters it took.
    fn dollar(&mut self, next: Option<char>, after: Option<char>) -> usize {
        match (next, after) {
            (Some('('), Some('(')) => {
                self.stack.push(Frame::Arith(0));
                2
            }
            (Some('('), _) => {
                self.stack.push(Frame::Subst(0));
                1
            }
            (Some('{'), _) => {
                self.stack.push(Frame::Param);
                1
            }
            _ => 0,
        }
    }

    /// A newline in code: here-documents announced on the line begin.
    fn newline(&mut self) {
        if self.code() && !self.pending.is_empty() {
            self.next_body();
        }
    }

    fn next_body(&mut self) {
        if !self.pending.is_empty() {
            let doc = self.pending.remove(0);
            self.body = Some((doc, String::new()));
        }
    }

    /// Writes the reference for one expression.
    fn place(&mut self, r: &Ref, var: &str, value: &Value, out: &mut String) -> Result<(), String> {
        if self.escape {
            return Err("stands right after a backslash: remove the backslash or quote the expression".into());
        }
        if self.announce.is_some() {
            return Err("cannot be a here-document delimiter".into());
        }
        if let Some((doc, line)) = &mut self.body {
            if doc.quoted {
                return Err(format!(
                    "is inside a quoted here-document (<<'{}'), where no value can be substituted; \
                     use an unquoted delimiter or read \"$VAR\" from env",
                    doc.delim
                ));
            }
            line.push('\u{1}');
            out.push_str(&format!("${{{var}}}"));
            return Ok(());
        }
        if self.comment {
            out.push_str(&r.to_string());
            return Ok(());
        }
        self.word_start = false;
        let inside_double = self.stack.contains(&Frame::Double);
        match self.stack.last() {
            Some(Frame::Single) => out.push_str(&format!("'\"${{{var}}}\"'")),
            Some(Frame::Double) => out.push_str(&format!("${{{var}}}")),
            Some(Frame::Arith(_)) => {
                let text = template::text_of(value.clone());
                let t = text.trim();
                let digits = t.strip_prefix('-').unwrap_or(t);
                if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                    return Err(format!("is used in $(( )), and its value {text:?} is not an integer"));
                }
                out.push_str(&format!("${{{var}}}"));
            }
            // Quotes inside backquotes or `${ }` inside double quotes are not portable.
            Some(Frame::Backtick | Frame::Param) if inside_double => out.push_str(&format!("${{{var}}}")),
            _ => out.push_str(&format!("\"${{{var}}}\"")),
        }
        Ok(())
    }
}

/// A Python string literal being read.
#[derive(Debug, Clone)]
struct PyStr {
    quote: char,
    triple: bool,
    fmt: bool,
    bytes: bool,
    /// The literal's prefix letters, to reopen it after a split.
    prefix: String,
    /// Where the literal (with its prefix) starts in the output, and whether it was
    /// split around a value (and so is wrapped in parentheses).
    start: usize,
    split: bool,
}

#[derive(Debug, Clone)]
enum PyFrame {
    Str(PyStr),
    /// `{ ... }` inside an f-string: code, with its bracket depth.
    Field(u32),
}

#[derive(Debug, Default)]
struct Python {
    stack: Vec<PyFrame>,
    comment: bool,
    escape: bool,
    /// Code characters just before the current one (for string prefixes), and their
    /// output positions.
    recent: Vec<(char, usize)>,
}

impl Python {
    fn feed(&mut self, text: &str, out: &mut String) {
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let at = out.len();
            out.push(c);
            i += 1;
            if self.comment {
                if c == '\n' {
                    self.comment = false;
                }
                continue;
            }
            if self.escape {
                self.escape = false;
                continue;
            }
            let top = self.stack.last().cloned();
            if let Some(PyFrame::Str(s)) = top {
                if c == '\\' {
                    self.escape = true;
                } else if c == s.quote {
                    let closes = !s.triple || (chars.get(i) == Some(&c) && chars.get(i + 1) == Some(&c));
                    if closes {
                        if s.triple {
                            out.push(c);
                            out.push(c);
                            i += 2;
                        }
                        self.stack.pop();
                        if s.split {
                            out.push(')');
                        }
                        self.recent.clear();
                    }
                } else if s.fmt && c == '{' {
                    if chars.get(i) == Some(&'{') {
                        out.push('{');
                        i += 1;
                    } else {
                        self.stack.push(PyFrame::Field(0));
                    }
                }
                continue;
            }
            // Code, at top level or inside an f-string field.
            match c {
                '#' => self.comment = true,
                '\'' | '"' => {
                    let triple = chars.get(i) == Some(&c) && chars.get(i + 1) == Some(&c);
                    let (prefix, start) = self.prefix(at);
                    let lower = prefix.to_ascii_lowercase();
                    if triple {
                        out.push(c);
                        out.push(c);
                        i += 2;
                    }
                    self.stack.push(PyFrame::Str(PyStr {
                        quote: c,
                        triple,
                        fmt: lower.contains('f'),
                        bytes: lower.contains('b'),
                        prefix,
                        start,
                        split: false,
                    }));
                    self.recent.clear();
                    continue;
                }
                '{' | '[' | '(' => {
                    if let Some(PyFrame::Field(d)) = self.stack.last_mut() {
                        *d += 1;
                    }
                }
                '}' | ']' | ')' => match self.stack.last_mut() {
                    Some(PyFrame::Field(0)) if c == '}' => {
                        self.stack.pop();
                    }
                    Some(PyFrame::Field(d)) => *d = d.saturating_sub(1),
                    _ => {}
                },
                _ => {}
            }
            self.recent.push((c, at));
            if self.recent.len() > 3 {
                self.recent.remove(0);
            }
        }
    }

    /// The string prefix (`r`, `b`, `f`, `rb`, ...) right before a quote at `at`, and
    /// where it starts in the output.
    fn prefix(&self, at: usize) -> (String, usize) {
        let letters: Vec<&(char, usize)> =
            self.recent.iter().rev().take_while(|(c, _)| "rRbBuUfF".contains(*c)).take(2).collect();
        let before = self.recent.len().checked_sub(letters.len() + 1).map(|k| self.recent[k].0);
        let word_char = before.is_some_and(|b| b.is_alphanumeric() || b == '_');
        let adjacent = letters.first().is_some_and(|(_, p)| p + 1 == at);
        if letters.is_empty() || word_char || !adjacent {
            return (String::new(), at);
        }
        let start = letters.last().map(|(_, p)| *p).unwrap_or(at);
        (letters.iter().rev().map(|(c, _)| *c).collect(), start)
    }

    fn place(&mut self, r: &Ref, n: usize, out: &mut String) -> Result<(), String> {
        if self.escape {
            return Err("stands right after a backslash: remove the backslash".into());
        }
        if self.comment {
            out.push_str(&r.to_string());
            return Ok(());
        }
        self.recent.clear();
        match self.stack.last_mut() {
            Some(PyFrame::Str(s)) if s.fmt => out.push_str(&format!("{{_baton_str({n})}}")),
            Some(PyFrame::Str(s)) => {
                if !s.split {
                    s.split = true;
                    out.insert(s.start, '(');
                }
                let q: String = std::iter::repeat_n(s.quote, if s.triple { 3 } else { 1 }).collect();
                let f = if s.bytes { "_baton_bytes" } else { "_baton_str" };
                out.push_str(&format!("{q} + {f}({n}) + {}{q}", s.prefix));
            }
            _ => out.push_str(&format!("_baton_in({n})")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup(r: &Ref) -> Result<Value, String> {
        match r {
            Ref::Param(p) if p == "n" => Ok(json!("42")),
            Ref::Param(p) => Ok(json!(format!("<{p}>"))),
            Ref::Output { .. } => Ok(json!([1, "two"])),
            Ref::Secret(s) => Ok(json!(format!("secret-{s}"))),
            Ref::Matrix(m) => Ok(json!(format!("matrix-{m}"))),
            Ref::Item(_) => Ok(json!({"k": "v"})),
            Ref::Index => Ok(json!(3)),
        }
    }

    fn sh(script: &str) -> String {
        render(Lang::Shell, script, &lookup).unwrap().script
    }

    fn py(script: &str) -> String {
        render(Lang::Python, script, &lookup).unwrap().script
    }

    #[test]
    fn shell_references_are_quoted_for_where_they_stand() {
        assert_eq!(sh("echo hello ${{ params.name }}"), "echo hello \"${BATON_IN_1}\"");
        assert_eq!(
            sh("echo \"hi ${{ params.a }}!\" '${{ params.b }}'"),
            "echo \"hi ${BATON_IN_1}!\" ''\"${BATON_IN_2}\"''"
        );
        assert_eq!(sh("x=$(echo ${{ params.a }})"), "x=$(echo \"${BATON_IN_1}\")");
        assert_eq!(sh("echo \"$(printf %s ${{ params.a }})\""), "echo \"$(printf %s \"${BATON_IN_1}\")\"");
        assert_eq!(sh("echo ${X:-${{ params.a }}}"), "echo ${X:-\"${BATON_IN_1}\"}");
        assert_eq!(sh("echo $(( ${{ params.n }} + 1 ))"), "echo $(( ${BATON_IN_1} + 1 ))");
        assert_eq!(sh("# say ${{ params.a }}\necho"), "# say params.a\necho");
        assert_eq!(sh("echo a#${{ params.a }}"), "echo a#\"${BATON_IN_1}\"");
        assert_eq!(sh("echo `echo ${{ params.a }}`"), "echo `echo \"${BATON_IN_1}\"`");
        let r = render(Lang::Shell, "a ${{ params.x }} b ${{ steps.s.outputs.o }}", &lookup).unwrap();
        assert_eq!(
            r.env,
            vec![("BATON_IN_1".into(), "<x>".into()), ("BATON_IN_2".into(), "[1,\"two\"]".into())]
        );
    }

    #[test]
    fn here_documents_take_unquoted_references_or_are_refused_when_quoted() {
        let s = sh("cat <<EOF\nhi ${{ params.a }}\nEOF\necho ${{ params.b }}");
        assert_eq!(s, "cat <<EOF\nhi ${BATON_IN_1}\nEOF\necho \"${BATON_IN_2}\"");
        let s = sh("cat <<-END >f; echo '${{ params.a }}'\n\thi ${{ params.b }}\n\tEND\n");
        assert_eq!(s, "cat <<-END >f; echo ''\"${BATON_IN_1}\"''\n\thi ${BATON_IN_2}\n\tEND\n");
        let e = check(Lang::Shell, "cat <<'EOF'\n${{ params.a }}\nEOF").unwrap_err();
        assert!(e.contains("${{ params.a }} is inside a quoted here-document (<<'EOF')"), "{e}");
        assert!(check(Lang::Shell, "cat <<\"E\"\nx\nE\necho ${{ params.a }}").is_ok());
    }

    #[test]
    fn unsafe_places_are_refused() {
        let e = check(Lang::Shell, "echo \\${{ params.a }}").unwrap_err();
        assert!(e.contains("right after a backslash"), "{e}");
        let e = render(Lang::Shell, "echo $(( ${{ params.x }} ))", &lookup).unwrap_err();
        assert!(e.contains("is not an integer"), "{e}");
        let e = render(Lang::Shell, "echo ${{ params.x }}", &|_| Ok(json!("a\u{0}b"))).unwrap_err();
        assert!(e.contains("NUL"), "{e}");
    }

    #[test]
    fn argument_lists_get_one_argument_per_item() {
        let with = json!({"argv": ["echo", "${{ steps.s.outputs.o }}", "--x=${{ params.a }}"]});
        let (w, env) = render_input("shell", with.as_object().unwrap(), &lookup).unwrap();
        assert_eq!(w["argv"], json!(["echo", "[1,\"two\"]", "--x=<a>"]));
        assert!(env.is_empty());
        let with = json!({"files": "${{ steps.s.outputs.o }}", "prompt": "${{ params.p }}"});
        let (w, _) = render_input("aider", with.as_object().unwrap(), &lookup).unwrap();
        assert_eq!(w["files"], json!(["1", "two"]));
        assert_eq!(w["prompt"], json!("<p>"));
        let with = json!({"run": "echo ${{ params.a }}"});
        let (w, env) = render_input("shell", with.as_object().unwrap(), &lookup).unwrap();
        assert_eq!(w["run"], json!("echo \"${BATON_IN_1}\""));
        assert_eq!(env, vec![("BATON_IN_1".to_string(), "<a>".to_string())]);
    }

    #[test]
    fn python_references_are_values_in_code_and_split_strings() {
        assert_eq!(py("x = ${{ params.a }}"), "x = _baton_in(1)");
        assert_eq!(py("print(\"hi ${{ params.a }}!\")"), "print((\"hi \" + _baton_str(1) + \"!\"))");
        assert_eq!(py("s = 'a ${{ params.a }}'.upper()"), "s = ('a ' + _baton_str(1) + '').upper()");
        assert_eq!(py("s = f\"{x} ${{ params.a }}\""), "s = f\"{x} {_baton_str(1)}\"");
        assert_eq!(py("s = f\"{ ${{ params.a }} }\""), "s = f\"{ _baton_in(1) }\"");
        assert_eq!(py("s = rb'x${{ params.a }}'"), "s = (rb'x' + _baton_bytes(1) + rb'')");
        assert_eq!(
            py("s = \"\"\"a\n${{ params.a }}\"\"\" + 'q'"),
            "s = (\"\"\"a\n\"\"\" + _baton_str(1) + \"\"\"\"\"\") + 'q'"
        );
        assert_eq!(py("# ${{ params.a }}\nx = 1"), "# params.a\nx = 1");
        assert_eq!(py("x = 'it\\'s ${{ params.a }}'"), "x = ('it\\'s ' + _baton_str(1) + '')");
        assert_eq!(py("for ${{ params.a }}"), "for _baton_in(1)");
        assert!(check(Lang::Python, "x = '\\${{ params.a }}'").unwrap_err().contains("backslash"));
    }
}
