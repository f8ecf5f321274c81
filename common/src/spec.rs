//! The workstream spec: parsing (YAML or JSON) and validation into a [`Workstream`].
//!
//! Validation collects every problem it finds, each naming the source, the step and,
//! where known, the line, so one `baton validate` shows everything that is wrong.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::outcome::FailureClass;
use crate::retry::RetryPolicy;
use crate::template::{self, Ref};
use crate::time::parse_duration;
use crate::tools;

/// A validated workstream: a DAG of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workstream {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// What a step that fails for good does to the run.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// The run fails when it is still going this long after it was submitted.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// How long the controller keeps a finished run of this workstream (its steps,
    /// attempts, events and output) before pruning it; `None`: the controller's
    /// `--retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_ms: Option<u64>,
    /// Run parameters the spec declares, with their defaults (`None`: must be given).
    #[serde(default)]
    pub params: BTreeMap<String, Option<String>>,
    /// Parameters declared `secret: true`: kept sealed, masked wherever runs are shown.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub secret_params: std::collections::BTreeSet<String>,
    /// Steps in spec order; `needs` only name steps that exist, with no cycle.
    pub steps: Vec<StepSpec>,
    /// `concurrency:` of the whole workstream: at most `limit` runs with the same key
    /// (it may read params only) are active at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<RunConcurrency>,
    /// `budget:` of the whole run: what its attempts may report in cost and tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// `budget: {max_cost_usd: 5, max_tokens: 2000000}`: limits on the cost and tokens
/// attempts report (their `baton_cost_usd` and `baton_tokens` outputs, which the aider
/// adapter fills from aider's usage). Past one, the run is quarantined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

impl Budget {
    /// A `budget:` value, checked: numbers, positive, at least one limit.
    pub fn parse(v: Value) -> Result<Budget, String> {
        let b: Budget = serde_json::from_value(v)
            .map_err(|e| format!("budget: {e} (expected {{max_cost_usd: N, max_tokens: N}})"))?;
        if b.max_cost_usd.is_none() && b.max_tokens.is_none() {
            return Err("budget: give max_cost_usd, max_tokens or both".into());
        }
        if b.max_cost_usd.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            return Err("budget.max_cost_usd must be a positive number".into());
        }
        if b.max_tokens == Some(0) {
            return Err("budget.max_tokens must be at least 1".into());
        }
        Ok(b)
    }

    /// What passes the budget, in words ("$5.02 of $5.00"), if anything does.
    pub fn exceeded(&self, cost_usd: f64, tokens: u64) -> Option<String> {
        if let Some(max) = self.max_cost_usd
            && cost_usd > max
        {
            return Some(format!("${cost_usd:.2} of ${max:.2}"));
        }
        if let Some(max) = self.max_tokens
            && tokens > max
        {
            return Some(format!("{tokens} tokens of {max}"));
        }
        None
    }
}

/// A workstream's `concurrency: {key: "deploy-${{ params.env }}", limit: 1,
/// on_conflict: queue}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConcurrency {
    pub key: String,
    #[serde(default = "one")]
    pub limit: u32,
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// What a run does when its key's slots are all held at submit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// It waits, pending, until a run holding the key ends (oldest first).
    #[default]
    Queue,
    /// It is canceled at once.
    CancelNew,
    /// The oldest run holding the key is canceled, and it takes its place.
    CancelOld,
}

/// What a step that failed for good does to its run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Nothing new starts; steps not started are skipped; the run fails.
    #[default]
    Fail,
    /// The run stops where it is for an operator to release or cancel it.
    Quarantine,
    /// Only the failed step's dependents are skipped; the rest runs; the run fails.
    Continue,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Fail => "fail",
            OnFailure::Quarantine => "quarantine",
            OnFailure::Continue => "continue",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub id: String,
    #[serde(default)]
    pub needs: Vec<String>,
    /// The tool to run; `None` when the router resolves it from `kind`.
    pub tool: Option<String>,
    pub kind: Option<String>,
    /// Tool input, always a JSON object.
    #[serde(default)]
    pub with: Map<String, Value>,
    /// Per-attempt time limit; `None` means none.
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels the router matches rules on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// How long the step may wait for an agent while every candidate's circuit breaker
    /// is open, before its run is quarantined.
    #[serde(default = "default_max_wait")]
    pub max_wait_ms: u64,
    /// For an expansion of a matrix step: the id of the step as written (its group),
    /// and the values of its combination (`${{ matrix.NAME }}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub matrix: BTreeMap<String, String>,
    /// At most this many expansions of its group run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// `if:`: the step runs only when this holds (see [`crate::expr`]); else it is
    /// skipped, which fails nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Which outcomes of the steps it needs let it run.
    #[serde(default, skip_serializing_if = "When::is_default")]
    pub when: When,
    /// `cache:`: a successful attempt's outputs stand for later ones with the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,
    /// `for_each:`: the step expands at run time into one step per item of the list
    /// this reference (`${{ steps.ID.outputs.NAME }}`, exactly one expression) gives
    /// once the steps it needs have ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// On a `for_each` step that has expanded: how many items it expanded into. Its
    /// expansions follow it in `needs`, so it ends when they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expanded: Option<u32>,
    /// On an expansion of a `for_each` step (whose id is its `group`): its item
    /// (`${{ item }}`) and the item's position in the list (`${{ index }}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// `artifacts:`: globs over the working directory; on success the matching files
    /// are kept by the controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// `inputs:`: artifacts of upstream steps placed in the working directory first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<StepInput>,
    /// `concurrency:`: at most `limit` steps with the same (rendered) key run at once,
    /// across every run of the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// `budget:` of the step: what its attempts together may report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// A step's `concurrency: {key: "deploy-${{ params.env }}", limit: 1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Steps with the same key, once rendered, share the limit.
    pub key: String,
    /// How many of them may run at once (default 1).
    #[serde(default = "one")]
    pub limit: u32,
}

fn one() -> u32 {
    1
}

/// Artifacts a step takes from an upstream one (`inputs: {from: build, artifacts: [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepInput {
    /// The step (or matrix or for_each step: its expansions) that left them.
    pub from: String,
    /// Globs over their paths; each must match one at least.
    pub artifacts: Vec<String>,
}

impl StepSpec {
    /// The step `${{ steps.ID.outputs... }}` of its `for_each` reads, and that
    /// reference.
    pub fn for_each_source(&self) -> Option<Ref> {
        self.for_each.as_deref().and_then(|text| for_each_ref(text).ok())
    }
}

/// The reference a `for_each:` is: exactly one `${{ steps.ID.outputs.NAME }}` (or
/// `${{ steps.ID.outputs }}`).
pub fn for_each_ref(text: &str) -> Result<Ref, String> {
    match template::parse(text.trim())?.as_slice() {
        [template::Part::Expr(r @ Ref::Output { .. })] => Ok(r.clone()),
        _ => Err(format!(
            "{text:?} is not one ${{{{ steps.ID.outputs.NAME }}}} expression (the list an upstream step produced)"
        )),
    }
}

/// The id of item `index` of `for_each` step `id`.
pub fn item_id(id: &str, index: usize) -> String {
    format!("{id}[{index}]")
}

/// A step's `cache:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachePolicy {
    /// A key of the spec's own (it may hold `${{ ... }}`) instead of the hash of the
    /// tool, its rendered input and its env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How long a cached result stands.
    pub ttl_ms: u64,
}

/// How long a cached result stands unless `cache.ttl` says: 7 days.
pub const DEFAULT_CACHE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Which outcomes of the steps it needs let a step run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Every step it needs succeeded (else it is skipped with them).
    #[default]
    OnSuccess,
    /// Every step it needs has ended, whatever the outcome, also in a failing run:
    /// cleanup, notification, collecting logs.
    Always,
    /// Every step it needs has ended and one of them did not succeed; else it is
    /// skipped.
    OnFailure,
}

impl When {
    pub fn is_default(&self) -> bool {
        *self == When::OnSuccess
    }
}

fn default_max_wait() -> u64 {
    DEFAULT_MAX_WAIT_MS
}

/// Default of `max_wait`: 30 minutes.
pub const DEFAULT_MAX_WAIT_MS: u64 = 30 * 60 * 1000;

/// One thing wrong with a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub step: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Everything wrong with a spec, naming where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.origin)?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(col) = p.column {
                    write!(f, ":{col}")?;
                }
            }
            write!(f, ": ")?;
            if let Some(step) = &p.step {
                write!(f, "step {step:?}: ")?;
            }
            write!(f, "{}", p.message)?;
        }
        Ok(())
    }
}

/// Longest step id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Largest spec accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 16 * 1024 * 1024;
/// Most steps in one workstream.
pub const MAX_STEPS: usize = 100_000;
/// Longest chain of dependencies.
pub const MAX_DEPTH: usize = 5_000;
/// Largest `with` of one step, as JSON.
pub const MAX_WITH_BYTES: usize = 64 * 1024;
/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Most combinations one matrix step may expand into.
pub const MAX_MATRIX: usize = 256;
/// Most items one `for_each` step may expand into.
pub const MAX_FOR_EACH: usize = 1024;

/// The spec as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkstream {
    name: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: RawDefaults,
    on_failure: Option<OnFailure>,
    deadline: Option<Value>,
    retain: Option<Value>,
    params: Option<BTreeMap<String, Value>>,
    concurrency: Option<Value>,
    budget: Option<Value>,
    steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, Value>,
    retry: Option<RawRetry>,
    max_wait: Option<Value>,
}

/// `retry:` as written; every field optional, merged over the defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    backoff: Option<RawBackoff>,
    retry_on: Option<Vec<String>>,
    fail_fast_exit_codes: Option<Vec<i32>>,
    max_agent_lost: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<Value>,
    max: Option<Value>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: Option<String>,
    #[serde(default)]
    needs: Needs,
    tool: Option<String>,
    kind: Option<String>,
    #[serde(default, rename = "with")]
    with: Option<Value>,
    timeout: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, Value>,
    #[serde(default)]
    labels: BTreeMap<String, Value>,
    retry: Option<RawRetry>,
    max_wait: Option<Value>,
    /// `{NAME: [values], ..., exclude: [{...}], include: [{...}]}`.
    matrix: Option<Map<String, Value>>,
    max_parallel: Option<u32>,
    #[serde(rename = "if")]
    condition: Option<String>,
    when: Option<When>,
    /// `true`, or `{key: ..., ttl: ...}`.
    cache: Option<Value>,
    for_each: Option<String>,
    artifacts: Option<Vec<String>>,
    /// `{from: STEP, artifacts: [...]}` or a list of them.
    inputs: Option<Value>,
    concurrency: Option<Value>,
    budget: Option<Value>,
}

/// `needs: a` or `needs: [a, b]`.
#[derive(Debug, Default)]
enum Needs {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Read directly rather than as an untagged enum, which would buffer every list first
/// (specs can hold tens of thousands of dependencies).
impl<'de> Deserialize<'de> for Needs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ids;
        impl<'de> serde::de::Visitor<'de> for Ids {
            type Value = Needs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a step id or a list of step ids")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Needs, E> {
                Ok(Needs::One(s.to_string()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Needs, E> {
                Ok(Needs::None)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Needs, E> {
                Ok(Needs::None)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Needs, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(id) = seq.next_element::<String>()? {
                    ids.push(id);
                }
                Ok(Needs::Many(ids))
            }
        }
        d.deserialize_any(Ids)
    }
}

impl Needs {
    fn into_vec(self) -> Vec<String> {
        match self {
            Needs::None => Vec::new(),
            Needs::One(s) => vec![s],
            Needs::Many(v) => v,
        }
    }
}

/// Parses and validates a spec. `source` names it in errors (a file path, say).
pub fn parse(source: &str, text: &str) -> Result<Workstream, SpecError> {
    let raw = parse_raw(source, text)?;
    validate(source, text, raw)
}

fn parse_raw(source: &str, text: &str) -> Result<RawWorkstream, SpecError> {
    let fail = |line, column, message: String| SpecError {
        origin: source.to_string(),
        problems: vec![Problem { step: None, line, column, message }],
    };
    if text.trim().is_empty() {
        return Err(fail(None, None, "the spec is empty".into()));
    }
    if text.len() > MAX_SPEC_BYTES {
        return Err(fail(
            None,
            None,
            format!("the spec is {} bytes; the limit is {MAX_SPEC_BYTES}", text.len()),
        ));
    }
    if let Err((line, depth)) = check_nesting(text) {
        return Err(fail(
            Some(line),
            None,
            format!("collections nested {depth} deep; at most {MAX_NESTING} levels are allowed"),
        ));
    }
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| {
            fail(
                Some(e.line()),
                Some(e.column()),
                format!("invalid JSON: {}", strip_position(&e.to_string())),
            )
        });
    }
    serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (Some(l.line()), Some(l.column()))).unwrap_or((None, None));
        fail(line, column, format!("invalid YAML: {}", strip_position(&e.to_string())))
    })
}

/// Deepest nesting of collections a spec may have (a real one needs a handful).
pub const MAX_NESTING: usize = 64;

/// Finds the first line where collections nest deeper than [`MAX_NESTING`], in one
/// linear pass before the YAML parser sees the text (whose cost grows much faster than
/// the depth). Counts indentation levels and `- ` items of block style and brackets of
/// flow style (JSON included), skipping comments, quoted strings and block scalars.
/// Returns the line (1-based) and the depth found there.
fn check_nesting(text: &str) -> Result<(), (usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Inside a `|` or `>` block scalar: lines indented more than this are its text.
    let mut scalar: Option<usize> = None;
    // An open quoted string: its quote character.
    let mut quote: Option<char> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let body = line.trim();
        if let Some(s) = scalar {
            if body.is_empty() || indent > s {
                continue;
            }
            scalar = None;
        }
        if quote.is_none() && flow == 0 && !body.is_empty() && !body.starts_with('#') {
            while indents.last().is_some_and(|&i| i > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
        }
        let mut items = 0;
        // The last significant character: brackets and quotes open only where a value
        // starts, so `it's` and `echo [a` in plain text count for nothing.
        let mut prev: Option<char> = None;
        let mut chars = line[indent..].chars().peekable();
        while let Some(c) = chars.next() {
            if let Some(q) = quote {
                if c == '\\' && q == '"' {
                    chars.next();
                } else if c == q {
                    if q == '\'' && chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        quote = None;
                        prev = Some(c);
                    }
                }
                continue;
            }
            let starts_value = matches!(prev, None | Some(':' | '-' | ',' | '[' | '{' | '?'));
            let spaced = matches!(chars.peek(), Some(' ' | '\t') | None);
            // Whether `c` is structure (else it is text, and so is what follows it up
            // to the next structure).
            let structure = match c {
                ' ' | '\t' => continue,
                '#' => break,
                '"' | '\'' if starts_value => {
                    quote = Some(c);
                    false
                }
                '[' | '{' if starts_value => {
                    flow += 1;
                    true
                }
                ']' | '}' if flow > 0 => {
                    flow -= 1;
                    true
                }
                ',' => flow > 0,
                ':' | '?' => spaced || flow > 0,
                '-' if flow == 0 && starts_value && spaced => {
                    items += 1;
                    true
                }
                '|' | '>' if flow == 0 && matches!(prev, Some(':' | '-') | None) => {
                    scalar = Some(indent);
                    break;
                }
                _ => false,
            };
            prev = Some(if structure { c } else { 'a' });
            let depth = indents.len() + items + flow;
            if depth > MAX_NESTING {
                return Err((n + 1, depth));
            }
        }
    }
    Ok(())
}

/// Drops the " at line X column Y" suffix that the position fields already carry.
/// A parser's message without its position (reported apart) and in the spec's terms,
/// not the names of the types it is read into.
fn strip_position(msg: &str) -> String {
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    [
        ("struct RawWorkstream", "a workstream (a mapping with name: and steps:)"),
        ("struct RawStep", "a step (a mapping with id: and tool:)"),
        ("struct RawDefaults", "a mapping of defaults"),
        ("struct RawRetry", "a retry policy (a mapping)"),
        ("struct RawBackoff", "a backoff (a mapping)"),
    ]
    .iter()
    .fold(msg.to_string(), |m, (from, to)| m.replace(from, to))
}

struct Collector<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Collector<'_> {
    fn push(&mut self, step: Option<&str>, message: impl Into<String>) {
        let line = step.and_then(|s| find_step_line(self.text, s));
        self.problems.push(Problem {
            step: step.map(str::to_string),
            line,
            column: None,
            message: message.into(),
        });
    }
}

/// The line (1-based) where step `id` is declared, found by text search: serde gives no
/// positions for values, and pointing at the step beats pointing nowhere.
fn find_step_line(text: &str, id: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let t = line.trim_start().trim_start_matches('-').trim_start();
            let t = t.trim_start_matches('{').trim_start();
            let t = t.strip_prefix("\"id\"").or_else(|| t.strip_prefix("id"));
            let Some(rest) = t else { return false };
            let Some(rest) = rest.trim_start().strip_prefix(':') else {
                return false;
            };
            let v = rest.split([',', '}', '#']).next().unwrap_or("").trim();
            let v = v.trim_matches('"').trim_matches('\'');
            v == id
        })
        .map(|i| i + 1)
}

fn validate(source: &str, text: &str, raw: RawWorkstream) -> Result<Workstream, SpecError> {
    let mut c = Collector { text, problems: Vec::new() };
    let name = raw.name.unwrap_or_default();
    if name.trim().is_empty() {
        c.push(None, "the workstream needs a non-empty name");
    }
    let default_timeout = match &raw.defaults.timeout {
        None => None,
        Some(v) => match duration_value(v) {
            Ok(d) => Some(d),
            Err(e) => {
                c.push(None, format!("defaults.timeout: {e}"));
                None
            }
        },
    };
    let default_env = env_map(&raw.defaults.env).unwrap_or_else(|e| {
        c.push(None, format!("defaults.env: {e}"));
        BTreeMap::new()
    });
    let default_retry = match &raw.defaults.retry {
        None => RetryPolicy::default(),
        Some(r) => retry_policy(&RetryPolicy::default(), r).unwrap_or_else(|e| {
            c.push(None, format!("defaults.retry: {e}"));
            RetryPolicy::default()
        }),
    };
    let default_max_wait = match &raw.defaults.max_wait {
        None => DEFAULT_MAX_WAIT_MS,
        Some(v) => duration_value(v).unwrap_or_else(|e| {
            c.push(None, format!("defaults.max_wait: {e}"));
            DEFAULT_MAX_WAIT_MS
        }),
    };
    let deadline_ms = match &raw.deadline {
        None => None,
        Some(v) => match duration_value(v) {
            Ok(d) => Some(d),
            Err(e) => {
                c.push(None, format!("deadline: {e}"));
                None
            }
        },
    };
    let retain_ms = match &raw.retain {
        None => None,
        Some(v) => match duration_value(v) {
            Ok(0) => {
                c.push(None, "retain: must be longer than 0s".to_string());
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                c.push(None, format!("retain: {e}"));
                None
            }
        },
    };

    let concurrency = match raw.concurrency.clone().map(serde_json::from_value::<RunConcurrency>).transpose()
    {
        Ok(Some(k)) if k.key.trim().is_empty() => {
            c.push(None, "concurrency.key must not be empty");
            None
        }
        Ok(Some(k)) if k.limit == 0 => {
            c.push(None, "concurrency.limit must be at least 1");
            None
        }
        Ok(Some(k)) => match template::refs(&Value::String(k.key.clone())) {
            Ok(r) if r.iter().all(|r| matches!(r, Ref::Param(_))) => Some(k),
            Ok(_) => {
                c.push(None, "concurrency.key: a run's key may read params only (it is decided at submit)");
                None
            }
            Err(e) => {
                c.push(None, format!("concurrency.key: {e}"));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            c.push(
                None,
                format!(
                    "concurrency: {e} (expected {{key: TEXT, limit: N, on_conflict: queue|cancel_new|cancel_old}})"
                ),
            );
            None
        }
    };

    let budget = match raw.budget.clone().map(Budget::parse).transpose() {
        Ok(b) => b,
        Err(e) => {
            c.push(None, e);
            None
        }
    };

    let mut secret_params = std::collections::BTreeSet::new();
    let params: Option<BTreeMap<String, Option<String>>> = raw.params.as_ref().map(|p| {
        p.iter()
            .filter_map(|(k, v)| {
                let ok = !k.is_empty() && k.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch));
                if !ok {
                    c.push(None, format!("params: invalid name {k:?}"));
                    return None;
                }
                let scalar = |v: &Value| match v {
                    Value::Null => Ok(None),
                    Value::String(s) => Ok(Some(s.clone())),
                    Value::Number(_) | Value::Bool(_) => Ok(Some(v.to_string())),
                    _ => Err(()),
                };
                let default = match v {
                    // The long form: {default: ..., secret: true, description: ...}.
                    Value::Object(m) => {
                        for key in m.keys() {
                            if !["default", "secret", "description"].contains(&key.as_str()) {
                                c.push(None, format!("params.{k}.{key}: unknown key (expected default, secret, description)"));
                            }
                        }
                        match m.get("secret") {
                            None | Some(Value::Bool(false)) => {}
                            Some(Value::Bool(true)) => {
                                secret_params.insert(k.clone());
                            }
                            Some(_) => c.push(None, format!("params.{k}.secret must be true or false")),
                        }
                        scalar(m.get("default").unwrap_or(&Value::Null))
                    }
                    other => scalar(other),
                };
                match default {
                    Ok(d) => Some((k.clone(), d)),
                    Err(()) => {
                        c.push(None, format!("params.{k}: the default must be a string, number or boolean"));
                        None
                    }
                }
            })
            .collect()
    });
    let raw_steps = raw.steps.unwrap_or_default();
    if raw_steps.is_empty() {
        c.push(None, "the workstream has no steps");
    }
    if raw_steps.len() > MAX_STEPS {
        c.push(None, format!("the workstream has {} steps; the limit is {MAX_STEPS}", raw_steps.len()));
        return Err(SpecError { origin: source.to_string(), problems: c.problems });
    }

    let mut steps = Vec::with_capacity(raw_steps.len());
    let mut seen: HashSet<String> = HashSet::new();
    // Matrix steps by id, with the ids of their expansions.
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (i, rs) in raw_steps.into_iter().enumerate() {
        let id = rs.id.unwrap_or_default();
        if id.trim().is_empty() {
            c.push(None, format!("steps[{i}]: the step needs a non-empty id"));
            continue;
        }
        let here = Some(id.as_str());
        if id.len() > MAX_ID_LEN {
            c.push(here, format!("id is {} bytes long; the limit is {MAX_ID_LEN}", id.len()));
        } else if !id.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            c.push(here, "id may only hold letters, digits, '-', '_' and '.'");
        } else if id.chars().all(|ch| ch == '.') {
            // Ids name directories and files (logs, worktrees): never these.
            c.push(here, "id must not be made of dots only");
        }
        if !seen.insert(id.clone()) {
            c.push(here, "duplicate step id");
            continue;
        }
        let with = match rs.with {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                c.push(here, "with must be a mapping of tool inputs");
                Map::new()
            }
        };
        let with_len = Value::Object(with.clone()).to_string().len();
        if with_len > MAX_WITH_BYTES {
            c.push(here, format!("with is {with_len} bytes as JSON; the limit is {MAX_WITH_BYTES}"));
        }
        let retry = match &rs.retry {
            None => default_retry.clone(),
            Some(r) => retry_policy(&default_retry, r).unwrap_or_else(|e| {
                c.push(here, format!("retry: {e}"));
                default_retry.clone()
            }),
        };
        let max_wait_ms = match &rs.max_wait {
            None => default_max_wait,
            Some(v) => duration_value(v).unwrap_or_else(|e| {
                c.push(here, format!("max_wait: {e}"));
                default_max_wait
            }),
        };
        match (&rs.tool, &rs.kind) {
            (None, None) => c.push(here, "the step needs a tool or a kind"),
            (Some(t), _) if !tools::is_known(t) => {
                c.push(here, format!("unknown tool {t:?} (known tools: {})", tools::KNOWN_TOOLS.join(", ")))
            }
            (Some(t), _) => {
                if let Err(e) = tools::check_input(t, &with) {
                    c.push(here, e);
                }
            }
            (None, Some(k)) if k.trim().is_empty() => c.push(here, "kind must not be empty"),
            (None, Some(_)) => {}
        }
        let timeout_ms = match &rs.timeout {
            None => default_timeout,
            Some(v) => match duration_value(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    c.push(here, format!("timeout: {e}"));
                    None
                }
            },
        };
        let mut env = default_env.clone();
        match env_map(&rs.env) {
            Ok(e) => env.extend(e),
            Err(e) => c.push(here, format!("env: {e}")),
        }
        let labels = env_map(&rs.labels).unwrap_or_else(|e| {
            c.push(here, format!("labels: {e}"));
            BTreeMap::new()
        });
        let mut needs = rs.needs.into_vec();
        let first: Vec<bool> = {
            let mut seen = HashSet::with_capacity(needs.len());
            needs.iter().map(|n| seen.insert(n.as_str())).collect()
        };
        let mut first = first.into_iter();
        needs.retain(|_| first.next().unwrap_or(true));
        let step = StepSpec {
            id: id.clone(),
            needs,
            tool: rs.tool,
            kind: rs.kind,
            with,
            timeout_ms,
            env,
            labels,
            retry,
            max_wait_ms,
            group: None,
            matrix: BTreeMap::new(),
            max_parallel: None,
            condition: match rs.condition {
                Some(text) => match crate::expr::parse(&text) {
                    Ok(_) => Some(text),
                    Err(e) => {
                        c.push(here, format!("if: {e}"));
                        None
                    }
                },
                None => None,
            },
            when: rs.when.unwrap_or_default(),
            cache: match rs.cache.as_ref().map(cache_policy).transpose() {
                Ok(c) => c.flatten(),
                Err(e) => {
                    c.push(here, format!("cache: {e}"));
                    None
                }
            },
            for_each: match rs.for_each {
                Some(text) => match for_each_ref(&text) {
                    Ok(_) => Some(text),
                    Err(e) => {
                        c.push(here, format!("for_each: {e}"));
                        None
                    }
                },
                None => None,
            },
            expanded: None,
            item: None,
            index: None,
            artifacts: match rs.artifacts {
                Some(globs) => {
                    if let Err(e) = check_globs(&globs) {
                        c.push(here, format!("artifacts: {e}"));
                    }
                    globs
                }
                None => Vec::new(),
            },
            inputs: match rs.inputs.map(step_inputs).transpose() {
                Ok(i) => i.unwrap_or_default(),
                Err(e) => {
                    c.push(here, format!("inputs: {e}"));
                    Vec::new()
                }
            },
            concurrency: match rs.concurrency.map(serde_json::from_value::<Concurrency>).transpose() {
                Ok(Some(k)) if k.key.trim().is_empty() => {
                    c.push(here, "concurrency.key must not be empty");
                    None
                }
                Ok(Some(k)) if k.limit == 0 => {
                    c.push(here, "concurrency.limit must be at least 1");
                    None
                }
                Ok(k) => k,
                Err(e) => {
                    c.push(here, format!("concurrency: {e} (expected {{key: TEXT, limit: N}})"));
                    None
                }
            },
            budget: match rs.budget.map(Budget::parse).transpose() {
                Ok(b) => b,
                Err(e) => {
                    c.push(here, e);
                    None
                }
            },
        };
        if rs.max_parallel == Some(0) {
            c.push(here, "max_parallel must be at least 1");
        }
        if step.tool.as_deref() == Some(crate::approval::TOOL)
            && (step.cache.is_some() || !step.artifacts.is_empty() || !step.inputs.is_empty())
        {
            c.push(here, "an approval step runs no tool: it takes no cache:, artifacts: or inputs:");
        }
        if step.cache.is_some() && !step.artifacts.is_empty() {
            c.push(here, "cache: a step taken from the cache leaves no files: it cannot have artifacts: too");
        }
        match (&rs.matrix, rs.max_parallel) {
            (Some(_), _) if step.for_each.is_some() => {
                c.push(here, "a step expands by matrix or by for_each, not both")
            }
            (None, max_parallel) if step.for_each.is_some() => steps.push(StepSpec { max_parallel, ..step }),
            (None, None) => steps.push(step),
            (None, Some(_)) => {
                c.push(here, "max_parallel: only a matrix or for_each step has expansions to limit")
            }
            (Some(m), max_parallel) => match combinations(m) {
                Ok(combos) => {
                    let names: Vec<String> = combos.iter().map(|m| expansion_id(&step.id, m)).collect();
                    groups.insert(step.id.clone(), names.clone());
                    for (combo, name) in combos.into_iter().zip(names) {
                        seen.insert(name.clone());
                        steps.push(StepSpec {
                            id: name,
                            group: Some(step.id.clone()),
                            matrix: combo,
                            max_parallel,
                            ..step.clone()
                        });
                    }
                    if steps.len() > MAX_STEPS {
                        c.push(
                            here,
                            format!(
                                "its matrix makes the workstream {} steps; the limit is {MAX_STEPS}",
                                steps.len()
                            ),
                        );
                        return Err(SpecError { origin: source.to_string(), problems: c.problems });
                    }
                }
                Err(e) => c.push(here, format!("matrix: {e}")),
            },
        }
    }
    // A need naming a matrix step is a need of every one of its expansions.
    if !groups.is_empty() {
        for s in &mut steps {
            if s.needs.iter().any(|n| groups.contains_key(n)) {
                let mut expanded = Vec::with_capacity(s.needs.len());
                for n in std::mem::take(&mut s.needs) {
                    match groups.get(&n) {
                        Some(members) => expanded.extend(members.iter().cloned()),
                        None => expanded.push(n),
                    }
                }
                s.needs = expanded;
            }
        }
    }

    let ids: HashSet<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    let mut graph_ok = true;
    for s in &steps {
        for n in &s.needs {
            if !ids.contains(n.as_str()) {
                graph_ok = false;
                c.push(Some(&s.id), format!("depends on unknown step {n:?}"));
            }
        }
    }
    if graph_ok {
        let cycles = find_cycles(&steps);
        for cycle in &cycles {
            let first = cycle[0].clone();
            c.push(Some(&first), format!("dependency cycle: {}", cycle.join(" -> ")));
        }
        if cycles.is_empty()
            && let Some((depth, step)) = deepest(&steps)
            && depth > MAX_DEPTH
        {
            c.push(Some(&step), format!("dependency chain is {depth} steps deep; the limit is {MAX_DEPTH}"));
        }
        if cycles.is_empty() {
            check_refs(&mut c, &steps, params.as_ref(), &groups);
            check_inputs(&mut c, &steps, &groups);
        }
    }

    if c.problems.is_empty() {
        Ok(Workstream {
            name,
            description: raw.description,
            on_failure: raw.on_failure.unwrap_or_default(),
            deadline_ms,
            retain_ms,
            params: params.unwrap_or_default(),
            secret_params,
            steps,
            concurrency,
            budget,
        })
    } else {
        Err(SpecError { origin: source.to_string(), problems: c.problems })
    }
}

/// Output references must name an upstream step (an ancestor, so its outputs exist
/// when the step starts); parameters, when the spec declares them, must be declared.
fn check_refs(
    c: &mut Collector<'_>,
    steps: &[StepSpec],
    params: Option<&BTreeMap<String, Option<String>>>,
    groups: &HashMap<String, Vec<String>>,
) {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    for s in steps {
        let env: Vec<Value> = s.env.values().map(|v| Value::String(v.clone())).collect();
        let mut refs = Vec::new();
        for v in std::iter::once(Value::Object(s.with.clone())).chain(env) {
            match template::refs(&v) {
                Ok(r) => refs.extend(r),
                Err(e) => c.push(Some(&s.id), e),
            }
        }
        if let Some(Ok(e)) = s.condition.as_deref().map(crate::expr::parse) {
            for r in e.refs() {
                if matches!(r, Ref::Item(_) | Ref::Index) && s.for_each.is_some() {
                    let why = "the condition is decided once, before the step expands into its items";
                    c.push(Some(&s.id), format!("if: {r} is not set there: {why}"));
                } else {
                    refs.push(r);
                }
            }
        }
        if let Some(key) = s.cache.as_ref().and_then(|c| c.key.clone()) {
            match template::refs(&Value::String(key)) {
                Ok(r) => refs.extend(r),
                Err(e) => c.push(Some(&s.id), format!("cache.key: {e}")),
            }
        }
        if let Some(k) = &s.concurrency {
            match template::refs(&Value::String(k.key.clone())) {
                Ok(r) if r.iter().any(|r| matches!(r, Ref::Secret(_))) => c.push(
                    Some(&s.id),
                    "concurrency.key: a key may not read secrets (it is shown in wait reasons)",
                ),
                Ok(r) => refs.extend(r),
                Err(e) => c.push(Some(&s.id), format!("concurrency.key: {e}")),
            }
        }
        let source = s.for_each_source();
        if refs.is_empty() && source.is_none() {
            continue;
        }
        if let Some(tool) = &s.tool
            && let Err(e) = crate::script::check_input(tool, &s.with)
        {
            c.push(Some(&s.id), e);
        }
        let ancestors = ancestors_of(steps, &index, &s.id);
        let problem = |r: &Ref| -> Option<String> {
            match r {
                // A matrix step's outputs: the list of its expansions'.
                Ref::Output { step, .. }
                    if groups.get(step).is_some_and(|m| m.iter().all(|e| ancestors.contains(e.as_str()))) =>
                {
                    None
                }
                Ref::Matrix(name) if !s.matrix.contains_key(name) => Some(if s.group.is_some() {
                    format!("matrix.{name} is not set in this combination")
                } else {
                    format!("matrix.{name} is only set in a matrix step")
                }),
                Ref::Item(_) | Ref::Index if s.for_each.is_none() && s.item.is_none() => {
                    Some(format!("{r} is only set in a for_each step"))
                }
                Ref::Output { step, .. } if !ancestors.contains(step.as_str()) => {
                    let what = if index.contains_key(step.as_str()) {
                        "is not upstream of it"
                    } else {
                        "does not exist"
                    };
                    Some(format!("step {step:?} {what} (list it in needs)"))
                }
                Ref::Param(p) if params.is_some_and(|ps| !ps.contains_key(p)) => {
                    Some(format!("params.{p} is not declared under params"))
                }
                _ => None,
            }
        };
        for r in refs {
            if let Some(why) = problem(&r) {
                c.push(Some(&s.id), format!("${{{{ {r} }}}}: {why}"));
            }
        }
        if let Some(r) = source
            && let Some(why) = problem(&r)
        {
            c.push(Some(&s.id), format!("for_each: ${{{{ {r} }}}}: {why}"));
        }
    }
}

/// A step's `inputs` must come from upstream steps (or matrix steps whose expansions
/// are all upstream).
fn check_inputs(c: &mut Collector<'_>, steps: &[StepSpec], groups: &HashMap<String, Vec<String>>) {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    for s in steps.iter().filter(|s| !s.inputs.is_empty()) {
        let ancestors = ancestors_of(steps, &index, &s.id);
        for input in &s.inputs {
            let from = input.from.as_str();
            let upstream = ancestors.contains(from)
                || groups.get(from).is_some_and(|m| m.iter().all(|e| ancestors.contains(e.as_str())));
            if !upstream {
                let what = if index.contains_key(from) || groups.contains_key(from) {
                    "is not upstream of it"
                } else {
                    "does not exist"
                };
                c.push(Some(&s.id), format!("inputs: step {from:?} {what} (list it in needs)"));
            }
        }
    }
}

/// Checks a step's list of artifact globs.
fn check_globs(globs: &[String]) -> Result<(), String> {
    if globs.is_empty() {
        return Err("an empty list (leave it out)".into());
    }
    if globs.len() > crate::artifacts::MAX_PATTERNS {
        return Err(format!("{} globs; the limit is {}", globs.len(), crate::artifacts::MAX_PATTERNS));
    }
    globs.iter().try_for_each(|g| crate::artifacts::check_pattern(g))
}

/// `inputs:` as written: one `{from, artifacts}` mapping or a list of them.
fn step_inputs(v: Value) -> Result<Vec<StepInput>, String> {
    let items = match v {
        Value::Array(items) => items,
        one @ Value::Object(_) => vec![one],
        _ => return Err("expected {from: STEP, artifacts: [GLOB, ...]} or a list of them".into()),
    };
    items
        .into_iter()
        .map(|item| {
            let input: StepInput = serde_json::from_value(item.clone())
                .map_err(|e| format!("{item}: {e} (expected {{from: STEP, artifacts: [GLOB, ...]}})"))?;
            check_globs(&input.artifacts).map_err(|e| format!("from {}: artifacts: {e}", input.from))?;
            Ok(input)
        })
        .collect()
}

/// The combinations a `matrix:` makes, as GitHub Actions does: the product of its
/// dimensions, less those an `exclude` entry matches, then each `include` entry either
/// added to the combinations it matches (when it only adds keys) or as one of its own.
fn combinations(m: &Map<String, Value>) -> Result<Vec<BTreeMap<String, String>>, String> {
    let name_ok =
        |k: &str| !k.is_empty() && k.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch));
    let value = |k: &str, v: &Value| -> Result<String, String> {
        let s = match v {
            Value::String(s) => s.clone(),
            Value::Number(_) | Value::Bool(_) => v.to_string(),
            other => return Err(format!("{k}: values must be strings, numbers or booleans, not {other}")),
        };
        // Values name the expansions (`test[os=debian]`): no room for separators.
        if s.is_empty() || !s.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.+".contains(ch)) {
            return Err(format!("{k}: value {s:?} may only hold letters, digits, '-', '_', '.' and '+'"));
        }
        Ok(s)
    };
    let entries = |key: &str| -> Result<Vec<BTreeMap<String, String>>, String> {
        match m.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(list)) => list
                .iter()
                .map(|e| match e {
                    Value::Object(o) if !o.is_empty() => o
                        .iter()
                        .map(|(k, v)| {
                            if !name_ok(k) {
                                return Err(format!("{key}: invalid name {k:?}"));
                            }
                            value(&format!("{key}.{k}"), v).map(|v| (k.clone(), v))
                        })
                        .collect(),
                    _ => Err(format!("{key}: each entry must be a non-empty mapping of names to values")),
                })
                .collect(),
            Some(_) => Err(format!("{key} must be a list of mappings")),
        }
    };
    let mut dims: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in m.iter().filter(|(k, _)| !matches!(k.as_str(), "include" | "exclude")) {
        if !name_ok(k) {
            return Err(format!("invalid name {k:?} (letters, digits, '-' and '_')"));
        }
        let Value::Array(values) = v else { return Err(format!("{k} must be a list of values")) };
        if values.is_empty() {
            return Err(format!("{k} has no values"));
        }
        dims.push((k.clone(), values.iter().map(|v| value(k, v)).collect::<Result<_, _>>()?));
    }
    let mut combos: Vec<BTreeMap<String, String>> =
        if dims.is_empty() { Vec::new() } else { vec![BTreeMap::new()] };
    for (k, values) in &dims {
        if combos.len().saturating_mul(values.len()) > MAX_MATRIX {
            return Err(format!("more than {MAX_MATRIX} combinations"));
        }
        combos = combos
            .iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.insert(k.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    let matches = |c: &BTreeMap<String, String>, e: &BTreeMap<String, String>| {
        e.iter().all(|(k, v)| c.get(k) == Some(v))
    };
    let exclude = entries("exclude")?;
    combos.retain(|c| !exclude.iter().any(|e| matches(c, e)));
    for e in entries("include")? {
        let (own, extra): (BTreeMap<_, _>, BTreeMap<_, _>) =
            e.clone().into_iter().partition(|(k, _)| dims.iter().any(|(d, _)| d == k));
        let mut added = false;
        if !extra.is_empty() {
            for c in combos.iter_mut().filter(|c| matches(c, &own)) {
                c.extend(extra.clone());
                added = true;
            }
        }
        if !added {
            combos.push(e);
        }
    }
    combos.dedup();
    if combos.is_empty() {
        return Err("no combinations (every one is excluded, or there are no dimensions)".into());
    }
    if combos.len() > MAX_MATRIX {
        return Err(format!("{} combinations; the limit is {MAX_MATRIX}", combos.len()));
    }
    Ok(combos)
}

/// A step's `cache:`: `true` (`false` for none), or `{key: TEXT, ttl: DURATION}`.
fn cache_policy(v: &Value) -> Result<Option<CachePolicy>, String> {
    let mut policy = CachePolicy { key: None, ttl_ms: DEFAULT_CACHE_TTL_MS };
    match v {
        Value::Null | Value::Bool(false) => return Ok(None),
        Value::Bool(true) => {}
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("key", Value::String(s)) if !s.trim().is_empty() => policy.key = Some(s.clone()),
                    ("key", _) => return Err("key must be a non-empty string".into()),
                    ("ttl", v) => match duration_value(v) {
                        Ok(0) => return Err("ttl must be longer than 0s".into()),
                        Ok(ms) => policy.ttl_ms = ms,
                        Err(e) => return Err(format!("ttl: {e}")),
                    },
                    (other, _) => return Err(format!("unknown key {other:?} (expected key, ttl)")),
                }
            }
        }
        _ => return Err("expected true or a mapping with key and ttl".into()),
    }
    Ok(Some(policy))
}

/// An expansion's id: `test[os=debian,py=3.11]`, names in order.
fn expansion_id(id: &str, combo: &BTreeMap<String, String>) -> String {
    let values: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{id}[{}]", values.join(","))
}

/// Every step that `id` depends on, directly or not.
fn ancestors_of<'a>(steps: &'a [StepSpec], index: &HashMap<&str, usize>, id: &str) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    let mut stack: Vec<usize> = index.get(id).map(|&i| vec![i]).unwrap_or_default();
    while let Some(i) = stack.pop() {
        for n in &steps[i].needs {
            if let Some(&j) = index.get(n.as_str())
                && seen.insert(steps[j].id.as_str())
            {
                stack.push(j);
            }
        }
    }
    seen
}

fn duration_value(v: &Value) -> Result<u64, String> {
    match v {
        Value::String(s) => parse_duration(s).map(|d| d.as_millis() as u64),
        other => Err(format!("expected a duration such as \"30s\" or \"5m\", got {other}")),
    }
}

/// `raw` merged over `base`, checked.
fn retry_policy(base: &RetryPolicy, raw: &RawRetry) -> Result<RetryPolicy, String> {
    let mut p = base.clone();
    if let Some(n) = raw.max_attempts {
        if n == 0 || n > MAX_ATTEMPTS {
            return Err(format!("max_attempts must be within 1..={MAX_ATTEMPTS}, not {n}"));
        }
        p.max_attempts = n;
    }
    if let Some(b) = &raw.backoff {
        if let Some(v) = &b.initial {
            p.initial_ms = duration_value(v).map_err(|e| format!("backoff.initial: {e}"))?;
        }
        if let Some(v) = &b.max {
            p.max_ms = duration_value(v).map_err(|e| format!("backoff.max: {e}"))?;
        }
        if let Some(m) = b.multiplier {
            if !(1.0..=100.0).contains(&m) {
                return Err(format!("backoff.multiplier must be within 1..=100, not {m}"));
            }
            p.multiplier = m;
        }
        if let Some(j) = b.jitter {
            if !(0.0..=1.0).contains(&j) {
                return Err(format!("backoff.jitter must be within 0..=1, not {j}"));
            }
            p.jitter = j;
        }
        if p.initial_ms > p.max_ms {
            return Err("backoff.initial is longer than backoff.max".into());
        }
    }
    if let Some(classes) = &raw.retry_on {
        p.retry_on = classes
            .iter()
            .map(|c| FailureClass::parse_reported(c).map_err(|e| format!("retry_on: {e}")))
            .collect::<Result<_, _>>()?;
    }
    if let Some(codes) = &raw.fail_fast_exit_codes {
        p.fail_fast_exit_codes = codes.clone();
    }
    if let Some(n) = raw.max_agent_lost {
        p.max_agent_lost = n;
    }
    Ok(p)
}

/// The longest chain of dependencies (in steps) and the step at its end. Needs a DAG.
fn deepest(steps: &[StepSpec]) -> Option<(usize, String)> {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut depth: Vec<usize> = vec![0; steps.len()];
    // Iterative post-order DFS, so long chains do not overflow the stack.
    for start in 0..steps.len() {
        if depth[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, false)];
        while let Some((node, expanded)) = stack.pop() {
            if depth[node] != 0 {
                continue;
            }
            let ups: Vec<usize> =
                steps[node].needs.iter().filter_map(|n| index.get(n.as_str()).copied()).collect();
            if expanded || ups.iter().all(|&u| depth[u] != 0) {
                depth[node] = 1 + ups.iter().map(|&u| depth[u]).max().unwrap_or(0);
            } else {
                stack.push((node, true));
                stack.extend(ups.into_iter().filter(|&u| depth[u] == 0).map(|u| (u, false)));
            }
        }
    }
    let (i, d) = depth.iter().enumerate().max_by_key(|(_, d)| **d)?;
    Some((*d, steps[i].id.clone()))
}

fn env_map(raw: &BTreeMap<String, Value>) -> Result<BTreeMap<String, String>, String> {
    raw.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("invalid variable name {k:?}"));
            }
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(format!("{k} must be a string, number or boolean")),
            };
            Ok((k.clone(), s))
        })
        .collect()
}

/// Every dependency cycle, each as a path that starts and ends at the same step.
/// Found by depth-first search; each cycle is reported once.
fn find_cycles(steps: &[StepSpec]) -> Vec<Vec<String>> {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut color = vec![0u8; steps.len()];
    let mut cycles = Vec::new();
    for start in 0..steps.len() {
        if color[start] != 0 {
            continue;
        }
        let mut path: Vec<usize> = vec![start];
        let mut iters: Vec<usize> = vec![0];
        color[start] = 1;
        while let Some(&node) = path.last() {
            let next_i = iters.last().copied().unwrap_or(0);
            let needs = &steps[node].needs;
            if next_i < needs.len() {
                if let Some(last) = iters.last_mut() {
                    *last += 1;
                }
                let Some(&dep) = index.get(needs[next_i].as_str()) else {
                    continue;
                };
                match color[dep] {
                    0 => {
                        color[dep] = 1;
                        path.push(dep);
                        iters.push(0);
                    }
                    1 => {
                        let from = path.iter().position(|&p| p == dep).unwrap_or(0);
                        // `needs` point upstream; print the cycle in execution order,
                        // starting from the step that comes first in the spec.
                        let mut members: Vec<usize> = path[from..].iter().rev().copied().collect();
                        let first = (0..members.len()).min_by_key(|&i| members[i]).unwrap_or(0);
                        members.rotate_left(first);
                        let mut cyc: Vec<String> = members.iter().map(|&p| steps[p].id.clone()).collect();
                        cyc.push(cyc[0].clone());
                        cycles.push(cyc);
                    }
                    _ => {}
                }
            } else {
                color[node] = 2;
                path.pop();
                iters.pop();
            }
        }
    }
    cycles
}

impl Workstream {
    /// Position of each step id in `steps`.
    pub fn index(&self) -> HashMap<&str, usize> {
        self.steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect()
    }

    /// Whether step `s` is an expansion of `for_each` step `id`.
    pub fn is_item_of(s: &StepSpec, id: &str) -> bool {
        s.item.is_some() && s.group.as_deref() == Some(id)
    }

    /// Takes back the expansion of `for_each` step `id`: its expansions go, and it
    /// expands again when it runs.
    pub fn unexpand(&mut self, id: &str) {
        let items: HashSet<String> =
            self.steps.iter().filter(|s| Self::is_item_of(s, id)).map(|s| s.id.clone()).collect();
        self.steps.retain(|s| !Self::is_item_of(s, id));
        if let Some(t) = self.steps.iter_mut().find(|s| s.id == id) {
            t.needs.retain(|n| !items.contains(n));
            t.expanded = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("ws.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn parses_yaml_with_fan_out_and_join() {
        let ws = parse(
            "ws.yaml",
            r#"
name: demo
description: a small dag
defaults:
  timeout: 1m
  env: {LEVEL: 1}
steps:
  - id: a
    tool: shell
    with: {run: "echo a"}
  - id: b
    needs: a
    tool: shell
    with: {argv: ["echo", "b"]}
    timeout: 5s
    env: {X: "y"}
  - id: c
    needs: [a, b, a]
    tool: noop
"#,
        )
        .unwrap();
        assert_eq!(ws.name, "demo");
        assert_eq!(ws.steps.len(), 3);
        assert_eq!(ws.steps[0].timeout_ms, Some(60_000));
        assert_eq!(ws.steps[1].timeout_ms, Some(5_000));
        assert_eq!(ws.steps[1].needs, vec!["a"]);
        assert_eq!(ws.steps[2].needs, vec!["a", "b"]);
        assert_eq!(ws.steps[1].env.get("LEVEL").map(String::as_str), Some("1"));
        assert_eq!(ws.steps[1].env.get("X").map(String::as_str), Some("y"));
    }

    #[test]
    fn needs_is_an_id_a_list_or_nothing() {
        let ws = parse(
            "ws.yaml",
            "name: n\nsteps:\n  - {id: a, tool: noop, needs: null}\n  - {id: b, tool: noop, needs: []}\n",
        )
        .unwrap();
        assert!(ws.steps.iter().all(|s| s.needs.is_empty()));
        let e = err("name: n\nsteps:\n  - {id: a, tool: noop, needs: {x: 1}}\n");
        assert!(e.contains("expected a step id or a list of step ids"), "{e}");
        let e = err(r#"{"name": "n", "steps": [{"id": "a", "tool": "noop", "needs": [1]}]}"#);
        assert!(e.contains("invalid type: integer `1`, expected a string"), "{e}");
    }

    #[test]
    fn parses_json() {
        let ws = parse(
            "ws.json",
            r#"{"name": "j", "steps": [{"id": "a", "tool": "shell", "with": {"run": "true"}}]}"#,
        )
        .unwrap();
        assert_eq!(ws.steps[0].id, "a");
    }

    #[test]
    fn rejects_cycle_naming_it() {
        let e = err(r#"
name: c
steps:
  - {id: a, tool: noop, needs: c}
  - {id: b, tool: noop, needs: a}
  - {id: c, tool: noop, needs: b}
  - {id: d, tool: noop}
"#);
        assert!(e.contains("dependency cycle: "), "{e}");
        assert!(e.contains("dependency cycle: a -> b -> c -> a"), "{e}");
        assert!(e.starts_with("ws.yaml:4: step \"a\""), "{e}");
        assert_eq!(e.lines().count(), 1, "one cycle, reported once: {e}");
    }

    #[test]
    fn rejects_self_dependency() {
        let e = err("name: c\nsteps:\n  - {id: a, tool: noop, needs: a}\n");
        assert!(e.contains("dependency cycle: a -> a"), "{e}");
    }

    #[test]
    fn rejects_unknown_dependency() {
        let e = err("name: u\nsteps:\n  - id: build\n    tool: noop\n    needs: [compile]\n");
        assert_eq!(e, "ws.yaml:3: step \"build\": depends on unknown step \"compile\"");
    }

    #[test]
    fn rejects_duplicate_and_empty_ids() {
        let e = err(
            "name: d\nsteps:\n  - {id: a, tool: noop}\n  - {id: a, tool: noop}\n  - {id: '', tool: noop}\n  - {tool: noop}\n",
        );
        assert!(e.contains("step \"a\": duplicate step id"), "{e}");
        assert!(e.contains("steps[2]: the step needs a non-empty id"), "{e}");
        assert!(e.contains("steps[3]: the step needs a non-empty id"), "{e}");
    }

    #[test]
    fn rejects_unknown_tool() {
        let e = err("name: t\nsteps:\n  - id: x\n    tool: hammer\n");
        assert!(e.starts_with("ws.yaml:3: step \"x\": unknown tool \"hammer\""), "{e}");
    }

    #[test]
    fn rejects_missing_tool_and_bad_input() {
        let e = err(
            "name: t\nsteps:\n  - id: x\n  - id: y\n    tool: shell\n  - id: z\n    tool: shell\n    with: {run: a, argv: [b]}\n",
        );
        assert!(e.contains("step \"x\": the step needs a tool or a kind"), "{e}");
        assert!(e.contains("step \"y\": shell needs with.run"), "{e}");
        assert!(e.contains("step \"z\": give with.run or with.argv, not both"), "{e}");
    }

    #[test]
    fn rejects_bad_durations() {
        let e = err(
            "name: t\ndefaults: {timeout: soon}\nsteps:\n  - id: x\n    tool: noop\n    timeout: 10 parsecs\n  - id: y\n    tool: noop\n    timeout: 30\n",
        );
        assert!(e.contains("ws.yaml: defaults.timeout: bad duration \"soon\""), "{e}");
        assert!(e.contains("step \"x\": timeout: bad duration \"10 parsecs\""), "{e}");
        assert!(e.contains("step \"y\": timeout: expected a duration such as \"30s\""), "{e}");
    }

    #[test]
    fn rejects_malformed_yaml_with_line() {
        let e = err("name: t\nsteps:\n  - id: x\n    tool: noop\n   bad: [\n");
        assert!(e.starts_with("ws.yaml:5:"), "{e}");
        assert!(e.contains("invalid YAML"), "{e}");
        let e = err("nope\n");
        assert!(e.contains("expected a workstream (a mapping with name: and steps:)"), "{e}");
        assert!(!e.contains("Raw"), "{e}");
        let e = err("name: x\nsteps: [3]\n");
        assert!(!e.contains("Raw"), "{e}");
    }

    #[test]
    fn rejects_unknown_field_with_line() {
        let e = err("name: t\nsteps:\n  - id: x\n    tool: noop\n    need: [a]\n");
        assert!(e.starts_with("ws.yaml:5:"), "{e}");
        assert!(e.contains("unknown field `need`"), "{e}");
    }

    #[test]
    fn rejects_malformed_json_with_line() {
        let e = err("{\"name\": \"j\",\n \"steps\": [\n}");
        assert!(e.starts_with("ws.yaml:3:"), "{e}");
        assert!(e.contains("invalid JSON"), "{e}");
    }

    #[test]
    fn rejects_empty_spec_and_no_steps() {
        assert!(err("").contains("the spec is empty"));
        let e = err("name: x\nsteps: []\n");
        assert!(e.contains("the workstream has no steps"), "{e}");
        let e = err("steps: [{id: a, tool: noop}]\n");
        assert!(e.contains("non-empty name"), "{e}");
    }

    #[test]
    fn rejects_bad_ids_and_env() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let e = err(&format!(
            "name: t\nsteps:\n  - id: 'a b'\n    tool: noop\n  - id: {long}\n    tool: noop\n    env: {{A: [1]}}\n"
        ));
        assert!(e.contains("step \"a b\": id may only hold"), "{e}");
        assert!(e.contains("the limit is 128"), "{e}");
        assert!(e.contains("env: A must be a string"), "{e}");
    }

    #[test]
    fn validated_spec_round_trips_through_json() {
        let ws = parse("x", "name: r\nsteps:\n  - {id: a, kind: build}\n  - {id: b, tool: sleep, with: {duration: 1s}, needs: a}\n").unwrap();
        let json = serde_json::to_string(&ws).unwrap();
        let back: Workstream = serde_json::from_str(&json).unwrap();
        assert_eq!(ws, back);
    }

    #[test]
    fn retry_defaults_merge_into_steps() {
        let ws = parse(
            "r.yaml",
            r#"
name: r
on_failure: quarantine
deadline: 1h
defaults:
  retry: {max_attempts: 3, backoff: {initial: 2s, max: 1m, multiplier: 3, jitter: 0.1}}
  max_wait: 5m
steps:
  - {id: a, tool: noop}
  - id: b
    tool: noop
    retry: {max_attempts: 5, retry_on: [timeout], fail_fast_exit_codes: [2, 3], max_agent_lost: 1}
    max_wait: 10s
"#,
        )
        .unwrap();
        assert_eq!(ws.on_failure, OnFailure::Quarantine);
        assert_eq!(ws.deadline_ms, Some(3_600_000));
        let a = &ws.steps[0];
        assert_eq!((a.retry.max_attempts, a.retry.initial_ms, a.retry.max_ms), (3, 2_000, 60_000));
        assert_eq!(a.retry.multiplier, 3.0);
        assert_eq!(a.max_wait_ms, 300_000);
        let b = &ws.steps[1];
        assert_eq!(b.retry.max_attempts, 5);
        assert_eq!(b.retry.initial_ms, 2_000, "unset fields come from the defaults");
        assert_eq!(b.retry.retry_on, vec![FailureClass::Timeout]);
        assert_eq!(b.retry.fail_fast_exit_codes, vec![2, 3]);
        assert_eq!(b.retry.max_agent_lost, 1);
        assert_eq!(b.max_wait_ms, 10_000);
        let plain = parse("p", "name: p\nsteps: [{id: a, tool: noop}]\n").unwrap();
        assert_eq!(plain.steps[0].retry, RetryPolicy::default());
        assert_eq!(plain.on_failure, OnFailure::Fail);
    }

    #[test]
    fn rejects_bad_retry_policies() {
        let e = err(
            "name: r\ndefaults: {retry: {max_attempts: 0}}\nsteps:\n  - {id: a, tool: noop, retry: {retry_on: [gremlins]}}\n  - {id: b, tool: noop, retry: {backoff: {initial: 1m, max: 1s}}}\n  - {id: c, tool: noop, retry: {backoff: {jitter: 2}}}\n",
        );
        assert!(e.contains("defaults.retry: max_attempts must be within 1..=100, not 0"), "{e}");
        assert!(e.contains("step \"a\": retry: retry_on: unknown failure class \"gremlins\""), "{e}");
        assert!(e.contains("step \"b\": retry: backoff.initial is longer than backoff.max"), "{e}");
        assert!(e.contains("step \"c\": retry: backoff.jitter must be within 0..=1"), "{e}");
        let e = err("name: r\non_failure: explode\nsteps: [{id: a, tool: noop}]\n");
        assert!(e.contains("unknown variant `explode`"), "{e}");
        let e = err("name: r\ndeadline: tomorrow\nsteps: [{id: a, tool: noop}]\n");
        assert!(e.contains("deadline: bad duration"), "{e}");
        let e = err("name: r\nretain: 0s\nsteps: [{id: a, tool: noop}]\n");
        assert!(e.contains("retain: must be longer than 0s"), "{e}");
        let ws = parse("t.yaml", "name: r\nretain: 7d\nsteps: [{id: a, tool: noop}]\n").unwrap();
        assert_eq!(ws.retain_ms, Some(7 * 86_400_000));
    }

    #[test]
    fn enforces_size_limits() {
        let big = format!(
            "name: b\nsteps:\n  - id: a\n    tool: echo\n    with: {{blob: \"{}\"}}\n",
            "x".repeat(MAX_WITH_BYTES)
        );
        assert!(
            err(&big).contains("step \"a\": with is 65547 bytes as JSON; the limit is 65536"),
            "{}",
            err(&big)
        );
        let huge = "#".repeat(MAX_SPEC_BYTES + 1);
        assert!(err(&huge).contains("the limit is 16777216"));
        let mut many = String::from("name: m\nsteps:\n");
        for i in 0..=MAX_STEPS {
            many.push_str(&format!("  - {{id: s{i}, tool: noop}}\n"));
        }
        assert!(err(&many).contains("the workstream has 100001 steps; the limit is 100000"));
        let mut deep = String::from("name: d\nsteps:\n  - {id: s0, tool: noop}\n");
        for i in 1..=MAX_DEPTH {
            deep.push_str(&format!("  - {{id: s{i}, tool: noop, needs: s{}}}\n", i - 1));
        }
        let e = err(&deep);
        assert!(e.contains(&format!("step \"s{MAX_DEPTH}\": dependency chain is 5001 steps deep")), "{e}");
    }

    #[test]
    fn output_references_must_point_upstream_and_params_must_be_declared() {
        let ok = parse(
            "t.yaml",
            r#"
name: t
params: {env: prod, version: null}
steps:
  - {id: build, tool: shell, with: {run: "echo"}, labels: {lang: rust}}
  - id: ship
    needs: build
    tool: shell
    env: {V: "${{ steps.build.outputs.version }}"}
    with: {run: "deploy ${{ params.env }} ${{ steps.build.outputs.tag }}"}
  - {id: later, needs: ship, tool: echo, with: {v: "${{ steps.build.outputs.version }}"}}
"#,
        )
        .unwrap();
        assert_eq!(ok.params.get("env"), Some(&Some("prod".to_string())));
        assert_eq!(ok.params.get("version"), Some(&None));
        assert_eq!(ok.steps[0].labels.get("lang").map(String::as_str), Some("rust"));
        let e = err(r#"
name: t
params: {env: prod}
steps:
  - {id: a, tool: shell, with: {run: "echo"}}
  - {id: b, tool: shell, with: {run: "use ${{ steps.a.outputs.x }}"}}
  - {id: c, needs: a, tool: echo, with: {p: "${{ params.region }}", q: "${{ steps.zz.outputs.y }}"}}
  - {id: d, needs: a, tool: echo, with: {p: "${{ env.HOME }}"}}
"#);
        assert!(
            e.contains(
                r#"step "b": ${{ steps.a.outputs.x }}: step "a" is not upstream of it (list it in needs)"#
            ),
            "{e}"
        );
        assert!(
            e.contains(r#"step "c": ${{ params.region }}: params.region is not declared under params"#),
            "{e}"
        );
        assert!(e.contains(r#"step "c": ${{ steps.zz.outputs.y }}: step "zz" does not exist"#), "{e}");
        assert!(e.contains(r#"step "d": bad expression"#), "{e}");
    }

    #[test]
    fn scripts_with_expressions_where_no_value_can_go_are_refused() {
        let e = err(
            "name: w\nparams: {p: x}\nsteps:\n  - {id: a, tool: shell, with: {run: \"cat <<'EOF'\\n${{ params.p }}\\nEOF\"}}\n  - {id: b, tool: python, with: {script: \"x = '\\\\${{ params.p }}'\"}}\n",
        );
        assert!(e.contains(r#"step "a": with.run: ${{ params.p }} is inside a quoted here-document"#), "{e}");
        assert!(
            e.contains(r#"step "b": with.script: ${{ params.p }} stands right after a backslash"#),
            "{e}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing_naming_the_line() {
        let n = 100_000;
        let flow = format!(
            "name: x\nsteps:\n  - id: a\n    tool: noop\n    with: {{k: {}{}}}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let e = parse("deep.yaml", &flow).unwrap_err().to_string();
        assert!(e.starts_with("deep.yaml:5: collections nested 65 deep; at most 64 levels"), "{e}");
        let json = format!("{{\"name\": \"x\", \"steps\": {}{}}}", "[".repeat(n), "]".repeat(n));
        let e = parse("deep.json", &json).unwrap_err().to_string();
        assert!(e.contains("collections nested 65 deep"), "{e}");
        let mut block = String::from("name: x\nsteps:\n  - id: a\n    tool: noop\n    with:\n");
        for i in 0..100 {
            block.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 3)));
        }
        let e = parse("block.yaml", &block).unwrap_err().to_string();
        assert!(e.contains("collections nested 65 deep"), "{e}");
    }

    #[test]
    fn brackets_in_text_quotes_comments_and_scripts_are_not_nesting() {
        let many = "[".repeat(200);
        let spec = format!(
            "name: x # {many}\nsteps:\n  - id: a\n    tool: shell\n    with:\n      run: |\n        echo '{many}'\n        [[ -f x ]] && echo {many}\n  - id: b\n    tool: shell\n    with: {{run: \"echo {many}\"}}\n  - id: c\n    tool: shell\n    with: {{run: 'it''s {many}'}}\n  - id: d\n    tool: shell\n    with:\n      run: echo it's {many}\n"
        );
        let ws = parse("ok.yaml", &spec).unwrap();
        assert_eq!(ws.steps.len(), 4);
        // Nesting up to the limit is fine.
        let ok = format!(
            "name: x\nsteps:\n  - id: a\n    tool: echo\n    with: {{k: {}{}}}\n",
            "[".repeat(58),
            "]".repeat(58)
        );
        parse("ok.yaml", &ok).unwrap();
    }

    #[test]
    fn dot_ids_are_refused() {
        for id in [".", "..", "..."] {
            let e =
                parse("d.yaml", &format!("name: d\nsteps:\n  - {{id: '{id}', tool: noop}}\n")).unwrap_err();
            assert!(e.to_string().contains("id must not be made of dots only"), "{id}: {e}");
        }
        parse("d.yaml", "name: d\nsteps:\n  - {id: v1.2, tool: noop}\n").unwrap();
    }

    #[test]
    fn alias_expansion_is_capped() {
        let mut spec = String::from(
            "name: x\nsteps:\n  - id: a\n    tool: noop\n    with:\n      a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            spec.push_str(&format!("      a{i}: &a{i} [{refs}]\n"));
        }
        let e = parse("laughs.yaml", &spec).unwrap_err().to_string();
        assert!(e.contains("repetition limit exceeded"), "{e}");
    }
}

#[cfg(test)]
mod matrix_tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("ws.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_matrix_step_expands_into_one_step_per_combination_and_its_dependents_need_them_all() {
        let ws = parse(
            "ws.yaml",
            r#"
name: m
steps:
  - id: build
    tool: noop
  - id: test
    needs: build
    tool: shell
    matrix: {os: [debian, alpine], py: ["3.11", 3.12], exclude: [{os: alpine, py: "3.11"}], include: [{os: windows, py: "3.12"}, {os: debian, extra: yes}]}
    max_parallel: 2
    with: {run: 'echo ${{ matrix.os }} ${{ matrix.py }}'}
  - id: report
    needs: test
    tool: shell
    env: {ALL: '${{ steps.test.outputs.v }}', EACH: '${{ steps.test.outputs }}'}
    with: {run: 'echo "$ALL"'}
"#,
        )
        .unwrap();
        let ids: Vec<&str> = ws.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "build",
                "test[extra=yes,os=debian,py=3.11]",
                "test[extra=yes,os=debian,py=3.12]",
                "test[os=alpine,py=3.12]",
                "test[os=windows,py=3.12]",
                "report"
            ]
        );
        let t = &ws.steps[1];
        assert_eq!(t.group.as_deref(), Some("test"));
        assert_eq!(t.max_parallel, Some(2));
        assert_eq!(t.needs, vec!["build"]);
        assert_eq!(t.matrix.get("os").map(String::as_str), Some("debian"));
        assert_eq!(t.matrix.get("extra").map(String::as_str), Some("yes"));
        assert_eq!(ws.steps[5].needs, ids[1..5].iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn conditions_and_when_are_checked_at_submit() {
        let ws = parse(
            "ws.yaml",
            "name: c\nsteps:\n  - {id: a, tool: noop}\n  - {id: b, needs: a, tool: noop, if: 'steps.a.outputs.x == 1', when: always}\n",
        )
        .unwrap();
        assert_eq!(ws.steps[1].condition.as_deref(), Some("steps.a.outputs.x == 1"));
        assert_eq!(ws.steps[1].when, When::Always);
        let e = err("name: c\nsteps:\n  - {id: a, tool: noop, if: 'params.x =='}\n");
        assert!(e.contains(r#"step "a": if: the condition ends too soon"#), "{e}");
        let e = err(
            "name: c\nsteps:\n  - {id: a, tool: noop}\n  - {id: b, tool: noop, if: 'steps.a.outputs.x'}\n",
        );
        assert!(e.contains(r#"step "b": ${{ steps.a.outputs.x }}: step "a" is not upstream of it"#), "{e}");
        let e = err("name: c\nsteps:\n  - {id: a, tool: noop, when: sometimes}\n");
        assert!(e.contains("unknown variant `sometimes`"), "{e}");
    }

    #[test]
    fn a_bad_matrix_is_refused_naming_the_step() {
        let step = |m: &str| format!("name: m\nsteps:\n  - {{id: t, tool: noop, matrix: {m}}}\n");
        assert!(
            err(&step("{os: []}")).contains(r#"step "t": matrix: os has no values"#),
            "{}",
            err(&step("{os: []}"))
        );
        let e = err(&step("{os: [a], exclude: [{os: a}]}"));
        assert!(e.contains("matrix: no combinations"), "{e}");
        let e = err(&step("{a: [1,2,3,4,5,6,7,8], b: [1,2,3,4,5,6,7,8], c: [1,2,3,4,5]}"));
        assert!(e.contains("more than 256 combinations"), "{e}");
        let e = err(&step("{os: ['a b']}"));
        assert!(e.contains(r#"os: value "a b" may only hold"#), "{e}");
        let e = err(&step("{os: [[1]]}"));
        assert!(e.contains("values must be strings, numbers or booleans"), "{e}");
        let e = err("name: m\nsteps:\n  - {id: t, tool: noop, max_parallel: 2}\n");
        assert!(e.contains("max_parallel: only a matrix or for_each step"), "{e}");
        let e = err("name: m\nsteps:\n  - {id: t, tool: shell, with: {run: 'echo ${{ matrix.os }}'}}\n");
        assert!(e.contains("matrix.os is only set in a matrix step"), "{e}");
        let e = err(
            "name: m\nsteps:\n  - {id: t, tool: shell, matrix: {a: [x]}, with: {run: 'echo ${{ matrix.os }}'}}\n",
        );
        assert!(e.contains("matrix.os is not set in this combination"), "{e}");
        // The group's own id stays taken.
        let e = err("name: m\nsteps:\n  - {id: t, tool: noop, matrix: {a: [x]}}\n  - {id: t, tool: noop}\n");
        assert!(e.contains("duplicate step id"), "{e}");
    }
}

#[cfg(test)]
mod for_each_tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("f.yaml", text).unwrap_err().to_string()
    }

    const LIST: &str = "name: f\nsteps:\n  - {id: list, tool: noop}\n";

    #[test]
    fn a_for_each_step_keeps_its_source_and_expands_only_at_run_time() {
        let ws = parse(
            "f.yaml",
            &format!("{LIST}  - {{id: fan, needs: list, tool: shell, for_each: '${{{{ steps.list.outputs.files }}}}', max_parallel: 2, with: {{run: 'echo ${{{{ item.path }}}} ${{{{ index }}}}'}}}}\n"),
        )
        .unwrap();
        assert_eq!(ws.steps.len(), 2);
        let fan = &ws.steps[1];
        assert_eq!(fan.max_parallel, Some(2));
        assert_eq!(fan.expanded, None);
        assert_eq!(fan.for_each_source(), Some(Ref::Output { step: "list".into(), name: "files".into() }));
    }

    #[test]
    fn a_bad_for_each_is_refused_naming_the_step() {
        let step =
            |rest: &str| format!("{LIST}  - {{id: fan, tool: shell, with: {{run: 'true'}}, {rest}}}\n");
        let e = err(&step("needs: list, for_each: 'a b'"));
        assert!(
            e.contains(r#"step "fan": for_each: "a b" is not one ${{ steps.ID.outputs.NAME }} expression"#),
            "{e}"
        );
        let e = err(&step("for_each: '${{ steps.list.outputs.files }}'"));
        assert!(
            e.contains(r#"step "fan": for_each: ${{ steps.list.outputs.files }}: step "list" is not upstream of it (list it in needs)"#),
            "{e}"
        );
        let e = err(&step("needs: list, for_each: '${{ steps.nope.outputs.files }}'"));
        assert!(e.contains(r#"step "nope" does not exist"#), "{e}");
        let e = err(&step("needs: list, for_each: '${{ params.files }}'"));
        assert!(e.contains("is not one ${{ steps.ID.outputs.NAME }} expression"), "{e}");
        let e = err(&step("needs: list, for_each: '${{ steps.list.outputs.f }}', matrix: {a: [x]}"));
        assert!(e.contains("a step expands by matrix or by for_each, not both"), "{e}");
        let e = err(&step("needs: list, for_each: '${{ steps.list.outputs.f }}', if: 'item == 1'"));
        assert!(
            e.contains("if: item is not set there: the condition is decided once, before the step expands"),
            "{e}"
        );
        let e = err(&format!("{LIST}  - {{id: x, tool: shell, with: {{run: 'echo ${{{{ item }}}}'}}}}\n"));
        assert!(e.contains(r#"step "x": ${{ item }}: item is only set in a for_each step"#), "{e}");
        let e = err(&format!("{LIST}  - {{id: x, tool: shell, with: {{run: 'echo ${{{{ index }}}}'}}}}\n"));
        assert!(e.contains("index is only set in a for_each step"), "{e}");
    }

    #[test]
    fn unexpand_takes_back_the_expansions() {
        let mut ws = parse(
            "f.yaml",
            &format!("{LIST}  - {{id: fan, needs: list, tool: noop, for_each: '${{{{ steps.list.outputs.f }}}}'}}\n"),
        )
        .unwrap();
        let before = ws.clone();
        let item = StepSpec {
            id: item_id("fan", 0),
            group: Some("fan".into()),
            item: Some(Value::from(1)),
            index: Some(0),
            for_each: None,
            ..ws.steps[1].clone()
        };
        ws.steps.push(item);
        ws.steps[1].needs.push("fan[0]".into());
        ws.steps[1].expanded = Some(1);
        ws.unexpand("fan");
        assert_eq!(ws, before);
    }
}

#[cfg(test)]
mod artifact_tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("a.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn artifacts_and_inputs_are_kept_and_checked_naming_the_step() {
        let ws = parse(
            "a.yaml",
            "name: a\nsteps:\n  - {id: b, tool: noop, artifacts: ['dist/*.tgz']}\n  - {id: u, needs: b, tool: noop, inputs: {from: b, artifacts: ['dist/*']}}\n  - {id: v, needs: b, tool: noop, inputs: [{from: b, artifacts: ['x']}, {from: b, artifacts: ['y']}]}\n",
        )
        .unwrap();
        assert_eq!(ws.steps[0].artifacts, ["dist/*.tgz"]);
        assert_eq!(ws.steps[1].inputs, [StepInput { from: "b".into(), artifacts: vec!["dist/*".into()] }]);
        assert_eq!(ws.steps[2].inputs.len(), 2);
        let e = err("name: a\nsteps:\n  - {id: b, tool: noop, artifacts: ['../x']}\n");
        assert!(
            e.contains(r#"step "b": artifacts: "../x" must not reach outside the working directory"#),
            "{e}"
        );
        let e = err(
            "name: a\nsteps:\n  - {id: b, tool: noop}\n  - {id: u, tool: noop, inputs: {from: b, artifacts: [x]}}\n",
        );
        assert!(e.contains(r#"step "u": inputs: step "b" is not upstream of it (list it in needs)"#), "{e}");
        let e = err("name: a\nsteps:\n  - {id: u, tool: noop, inputs: {from: b}}\n");
        assert!(e.contains(r#"step "u": inputs: "#) && e.contains("missing field `artifacts`"), "{e}");
        let e = err("name: a\nsteps:\n  - {id: g, tool: approval, cache: true}\n");
        assert!(
            e.contains("an approval step runs no tool: it takes no cache:, artifacts: or inputs:"),
            "{e}"
        );
        let e = err("name: a\nsteps:\n  - {id: g, tool: approval, with: {on_timeout: approve}}\n");
        assert!(e.contains("with.on_timeout needs with.timeout"), "{e}");
        let e = err("name: a\nsteps:\n  - {id: b, tool: noop, cache: true, artifacts: [x]}\n");
        assert!(e.contains(r#"step "b": cache: a step taken from the cache leaves no files"#), "{e}");
        let e = err("name: a\nsteps:\n  - {id: u, tool: noop, inputs: x}\n");
        assert!(e.contains("inputs: expected {from: STEP, artifacts: [GLOB, ...]}"), "{e}");
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;

    #[test]
    fn a_concurrency_key_is_kept_and_checked_naming_the_step() {
        let ws = parse(
            "c.yaml",
            "name: c\nparams: {env: prod}\nsteps:\n  - {id: d, tool: noop, concurrency: {key: 'deploy-${{ params.env }}'}}\n",
        )
        .unwrap();
        assert_eq!(
            ws.steps[0].concurrency,
            Some(Concurrency { key: "deploy-${{ params.env }}".into(), limit: 1 })
        );
        let err = |c: &str| {
            parse("c.yaml", &format!("name: c\nsteps:\n  - {{id: d, tool: noop, concurrency: {c}}}\n"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("{key: x, limit: 0}").contains(r#"step "d": concurrency.limit must be at least 1"#));
        assert!(err("{key: ''}").contains("concurrency.key must not be empty"));
        assert!(err("{limit: 2}").contains("missing field `key`"));
        assert!(err("{key: x, lmit: 2}").contains("unknown field `lmit`"));
        assert!(err("{key: '${{ secrets.t }}'}").contains("concurrency.key: a key may not read secrets"));
    }

    #[test]
    fn budgets_are_kept_and_checked_naming_the_step() {
        let ws = parse(
            "b.yaml",
            "name: b\nbudget: {max_cost_usd: 5, max_tokens: 2000000}\nsteps:\n  - {id: d, tool: noop, budget: {max_cost_usd: 0.5}}\n",
        )
        .unwrap();
        assert_eq!(ws.budget, Some(Budget { max_cost_usd: Some(5.0), max_tokens: Some(2_000_000) }));
        assert_eq!(ws.steps[0].budget, Some(Budget { max_cost_usd: Some(0.5), max_tokens: None }));
        let err = |b: &str| {
            parse("b.yaml", &format!("name: b\nsteps:\n  - {{id: d, tool: noop, budget: {b}}}\n"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("{max_cost_usd: -1}").contains(r#"step "d": budget.max_cost_usd must be a positive number"#)
        );
        assert!(err("{max_tokens: 0}").contains("budget.max_tokens must be at least 1"));
        assert!(err("{}").contains("budget: give max_cost_usd, max_tokens or both"));
        assert!(err("{max_usd: 1}").contains("unknown field `max_usd`"));
        let b = Budget { max_cost_usd: Some(5.0), max_tokens: Some(100) };
        assert_eq!(b.exceeded(5.02, 0).as_deref(), Some("$5.02 of $5.00"));
        assert_eq!(b.exceeded(5.0, 101).as_deref(), Some("101 tokens of 100"));
        assert_eq!(b.exceeded(5.0, 100), None);
    }

    #[test]
    fn a_workstream_key_is_kept_and_checked() {
        let ws = parse(
            "c.yaml",
            "name: c\nparams: {env: prod}\nconcurrency: {key: 'd-${{ params.env }}', on_conflict: cancel_old}\nsteps:\n  - {id: d, tool: noop}\n",
        )
        .unwrap();
        let c = ws.concurrency.unwrap();
        assert_eq!(
            (c.key.as_str(), c.limit, c.on_conflict),
            ("d-${{ params.env }}", 1, OnConflict::CancelOld)
        );
        let err = |c: &str| {
            parse("c.yaml", &format!("name: c\nconcurrency: {c}\nsteps:\n  - {{id: d, tool: noop}}\n"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("{key: x, limit: 0}").contains("concurrency.limit must be at least 1"));
        assert!(err("{key: x, on_conflict: later}").contains("unknown variant `later`"));
        assert!(
            err("{key: '${{ steps.d.outputs.x }}'}")
                .contains("concurrency.key: a run's key may read params only")
        );
    }
}
