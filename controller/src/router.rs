//! Routing rules: which tool a step runs with, on which agents, chosen how.
//!
//! `router_config.json` holds ordered rules; the first whose `match` fits a step wins:
//!
//! ```json
//! {"rules": [
//!   {"match": {"kind": "ai-edit"}, "tool": "aider", "labels": {"gpu": "true"},
//!    "strategy": "fixed", "agents": ["gpu-1", "gpu-2"], "timeout": "20m"},
//!   {"match": {"tool": "shell", "labels": {"os": "linux"}}, "labels": {"os": "linux"},
//!    "strategy": "round_robin"}
//! ]}
//! ```
//!
//! A step no rule matches runs its own `tool` with the `auto` strategy.

use std::collections::BTreeMap;
use std::path::Path;

use baton_common::spec::StepSpec;
use baton_common::tools;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a rule picks among the agents that may run a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The named agents, in order: the first one that can take the step.
    Fixed,
    /// Each eligible agent in turn.
    RoundRobin,
    /// Healthy, closed breakers, most free slots, then best recent success and latency.
    #[default]
    Auto,
}

/// `*` or an exact value (written as such in the config and in stored routes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Pattern {
    Any,
    Exact(String),
}

impl From<String> for Pattern {
    fn from(s: String) -> Pattern {
        if s == "*" { Pattern::Any } else { Pattern::Exact(s) }
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        match p {
            Pattern::Any => "*".to_string(),
            Pattern::Exact(v) => v,
        }
    }
}

impl Pattern {
    fn new(s: &str) -> Pattern {
        Pattern::from(s.to_string())
    }

    pub fn matches(&self, v: Option<&str>) -> bool {
        match self {
            Pattern::Any => v.is_some(),
            Pattern::Exact(x) => v == Some(x.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub kind: Option<Pattern>,
    pub tool_match: Option<Pattern>,
    pub step_labels: BTreeMap<String, Pattern>,
    /// The tool to run; `None` keeps the step's own.
    pub tool: Option<String>,
    /// Where its steps may run.
    pub placement: Placement,
    /// Defaults under the step's own `with`, `env` and `timeout`.
    pub with: Map<String, Value>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
}

impl Rule {
    fn matches(&self, step: &StepSpec) -> bool {
        self.kind.as_ref().is_none_or(|p| p.matches(step.kind.as_deref()))
            && self.tool_match.as_ref().is_none_or(|p| p.matches(step.tool.as_deref()))
            && self.step_labels.iter().all(|(k, p)| p.matches(step.labels.get(k).map(String::as_str)))
    }
}

/// Where a step may run and how its agent is chosen: its rule's labels, strategy and
/// agents. Decided when the run is submitted and stored with each step, so a reload of
/// the rules applies to runs submitted after it and never moves a step of a run already
/// going.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Placement {
    /// The rule it came from, when one matched (it keys the round-robin turn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Labels an agent must have.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Pattern>,
    #[serde(skip_serializing_if = "is_auto")]
    pub strategy: Strategy,
    /// For `fixed`: agent names in order of preference.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// At most this many of its tool's steps placed by this rule's kind run at once
    /// (their concurrency key is `tool TOOL`): for tools that call a rate-limited
    /// service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// A key of the step's `with` (`model`) whose value splits `max_concurrent`: each
    /// value gets its own count (key `tool TOOL model VALUE`), as each model of an LLM
    /// API has its own rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per: Option<String>,
}

fn is_auto(s: &Strategy) -> bool {
    *s == Strategy::Auto
}

impl Placement {
    /// Whether it names a pool smaller than every agent (labels or a fixed list).
    pub fn is_pool(&self) -> bool {
        !self.labels.is_empty() || self.strategy == Strategy::Fixed
    }

    /// Whether an agent with these labels (and name) may run steps of this rule.
    pub fn admits(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, p)| p.matches(labels.get(k).map(String::as_str)))
            && (self.strategy != Strategy::Fixed || self.agents.iter().any(|a| a == name))
    }

    /// "label gpu=true", "labels gpu=true, zone=a", "" when the rule asks nothing.
    pub fn describe_labels(&self) -> String {
        let parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, p)| match p {
                Pattern::Any => format!("{k}=*"),
                Pattern::Exact(v) => format!("{k}={v}"),
            })
            .collect();
        match parts.len() {
            0 => String::new(),
            1 => format!("label {}", parts[0]),
            _ => format!("labels {}", parts.join(", ")),
        }
    }
}

/// The ordered rules.
#[derive(Debug, Clone, Default)]
pub struct Router {
    pub rules: Vec<Rule>,
}

/// The rules in force: the controller's one copy, shared by the submit path (which
/// routes each new run with them) and reloads (which replace them whole). The engine
/// does not read them after a submit: each step keeps the placement it was given.
#[derive(Debug, Clone, Default)]
pub struct Rules(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Router>>>);

impl Rules {
    pub fn new(router: Router) -> Rules {
        Rules(std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(router))))
    }

    /// The rules as they are now; a reload after this does not change them.
    pub fn current(&self) -> std::sync::Arc<Router> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, router: Router) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(router);
    }
}

/// A bad router config: which rule, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", rule.map(|i| format!("rule {i}: ")).unwrap_or_default())]
pub struct RouterError {
    pub rule: Option<usize>,
    pub message: String,
}

/// What routing made of a step: the tool it runs and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    pub tool: String,
    pub placement: Placement,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    rules: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match", default)]
    matches: RawMatch,
    tool: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    with: Map<String, Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<String>,
    max_concurrent: Option<u32>,
    max_concurrent_per: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    kind: Option<String>,
    tool: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Router {
    pub fn load(path: &Path) -> Result<Router, RouterError> {
        let text = std::fs::read_to_string(path).map_err(|e| RouterError {
            rule: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Router::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Router, RouterError> {
        let top = |message: String| RouterError { rule: None, message };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| top(format!("invalid router config: {e}")))?;
        let total = raw.rules.len();
        let mut rules = Vec::with_capacity(total);
        for (i, v) in raw.rules.into_iter().enumerate() {
            let bad = |message: String| RouterError { rule: Some(i), message };
            let r: RawRule = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
            if let Some(t) = &r.tool
                && !tools::is_known(t)
            {
                return Err(bad(format!(
                    "unknown tool {t:?} (known tools: {})",
                    tools::KNOWN_TOOLS.join(", ")
                )));
            }
            if let Some(t) = &r.matches.tool
                && t != "*"
                && !tools::is_known(t)
            {
                return Err(bad(format!("match.tool: unknown tool {t:?}")));
            }
            match (r.strategy, r.agents.is_empty()) {
                (Strategy::Fixed, true) => return Err(bad("strategy fixed needs a list of agents".into())),
                (Strategy::RoundRobin | Strategy::Auto, false) => {
                    return Err(bad("agents are only for strategy fixed".into()));
                }
                _ => {}
            }
            if r.matches.kind.is_none()
                && r.matches.tool.is_none()
                && r.matches.labels.is_empty()
                && i + 1 < total
            {
                return Err(bad(
                    "an empty match catches every step, so the rules after it never apply".into()
                ));
            }
            if r.max_concurrent == Some(0) {
                return Err(bad("max_concurrent must be at least 1".into()));
            }
            if let Some(per) = &r.max_concurrent_per {
                if r.max_concurrent.is_none() {
                    return Err(bad("max_concurrent_per needs max_concurrent".into()));
                }
                if per.is_empty() || !per.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad(format!("max_concurrent_per must name a key of with, not {per:?}")));
                }
            }
            let timeout_ms = match &r.timeout {
                None => None,
                Some(t) => Some(
                    baton_common::time::parse_duration(t)
                        .map_err(|e| bad(format!("timeout: {e}")))?
                        .as_millis() as u64,
                ),
            };
            let pats =
                |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), Pattern::new(v))).collect();
            rules.push(Rule {
                kind: r.matches.kind.as_deref().map(Pattern::new),
                tool_match: r.matches.tool.as_deref().map(Pattern::new),
                step_labels: pats(&r.matches.labels),
                tool: r.tool,
                placement: Placement {
                    rule: Some(i),
                    labels: pats(&r.labels),
                    strategy: r.strategy,
                    agents: r.agents,
                    max_concurrent: r.max_concurrent,
                    max_concurrent_per: r.max_concurrent_per,
                },
                with: r.with,
                env: r.env,
                timeout_ms,
            });
        }
        Ok(Router { rules })
    }

    /// The first rule that matches `step`, with its index.
    pub fn rule_for(&self, step: &StepSpec) -> Option<(usize, &Rule)> {
        self.rules.iter().enumerate().find(|(_, r)| r.matches(step))
    }

    /// Resolves `step`'s tool and folds the rule's defaults into it (the step's own
    /// `with`, `env` and `timeout` win). The error says what is missing.
    pub fn resolve(&self, step: &mut StepSpec) -> Result<Route, String> {
        let Some((i, rule)) = self.rule_for(step) else {
            return match &step.tool {
                Some(t) => Ok(Route { tool: t.clone(), placement: Placement::default() }),
                None => Err(format!(
                    "no router rule maps kind {:?} to a tool",
                    step.kind.as_deref().unwrap_or("")
                )),
            };
        };
        let tool = match (&rule.tool, &step.tool) {
            (Some(t), _) | (None, Some(t)) => t.clone(),
            (None, None) => return Err(format!("router rule {i} matches but names no tool")),
        };
        for (k, v) in &rule.with {
            step.with.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (k, v) in &rule.env {
            step.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if step.timeout_ms.is_none() {
            step.timeout_ms = rule.timeout_ms;
        }
        tools::check_input(&tool, &step.with)
            .map_err(|e| format!("{e} (routed to tool {tool} by rule {i})"))?;
        Ok(Route { tool, placement: rule.placement.clone() })
    }

    /// The placement of a step routed before placements were stored: its rule's, as
    /// the rules are now.
    pub fn placement_for(&self, step: &StepSpec) -> Placement {
        self.rule_for(step).map(|(_, r)| r.placement.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(yaml: &str) -> StepSpec {
        let ws = baton_common::spec::parse("t", &format!("name: t\nsteps:\n  - {yaml}\n")).unwrap();
        ws.steps.into_iter().next().unwrap()
    }

    const CONFIG: &str = r#"{"rules": [
        {"match": {"kind": "ai-edit"}, "tool": "aider", "labels": {"gpu": "true"}, "strategy": "fixed", "agents": ["g1", "g2"], "timeout": "20m", "with": {"model": "m1"}},
        {"match": {"kind": "build", "labels": {"lang": "*"}}, "tool": "shell", "strategy": "round_robin", "env": {"CI": "1"}},
        {"match": {"tool": "shell"}, "labels": {"os": "linux"}}
    ]}"#;

    #[test]
    fn the_first_matching_rule_routes_and_lends_its_defaults() {
        let r = Router::from_json(CONFIG).unwrap();
        let mut s = step("{id: e, kind: ai-edit, with: {prompt: fix, model: mine}}");
        let route = r.resolve(&mut s).unwrap();
        assert_eq!((route.tool.as_str(), route.placement.rule), ("aider", Some(0)));
        assert_eq!(s.with["model"], "mine", "the step's own input wins");
        assert_eq!(s.timeout_ms, Some(20 * 60_000));

        let mut s = step("{id: b, kind: build, labels: {lang: rust}, with: {run: make}}");
        assert_eq!(r.resolve(&mut s).unwrap().placement.rule, Some(1));
        assert_eq!(s.env.get("CI").map(String::as_str), Some("1"));
        // Without the label, the kind rule does not match: no tool at all.
        let mut s = step("{id: b, kind: build, with: {run: make}}");
        assert_eq!(r.resolve(&mut s).unwrap_err(), "no router rule maps kind \"build\" to a tool");

        let mut s = step("{id: s, tool: shell, with: {run: make}}");
        assert_eq!(r.resolve(&mut s).unwrap().placement.rule, Some(2));
        let mut s = step("{id: n, tool: noop}");
        let route = r.resolve(&mut s).unwrap();
        assert_eq!(
            (route.tool.as_str(), route.placement.rule),
            ("noop", None),
            "default: the step's own tool"
        );
    }

    #[test]
    fn input_is_checked_against_the_routed_tool() {
        let r = Router::from_json(CONFIG).unwrap();
        let mut s = step("{id: e, kind: ai-edit, with: {files: [a.py]}}");
        let e = r.resolve(&mut s).unwrap_err();
        assert_eq!(e, "aider needs with.prompt (routed to tool aider by rule 0)");
    }

    #[test]
    fn agents_are_admitted_by_labels_and_fixed_lists() {
        let r = Router::from_json(CONFIG).unwrap();
        let gpu: BTreeMap<String, String> = [("gpu".to_string(), "true".to_string())].into();
        let p = &r.rules[0].placement;
        assert!(p.admits("g1", &gpu));
        assert!(!p.admits("other", &gpu), "fixed: only the named agents");
        assert!(!p.admits("g1", &BTreeMap::new()), "the label is required");
        assert_eq!(p.describe_labels(), "label gpu=true");
    }

    #[test]
    fn placements_are_stored_as_compact_json_and_read_back() {
        let r = Router::from_json(CONFIG).unwrap();
        let p = &r.rules[0].placement;
        let text = serde_json::to_string(p).unwrap();
        assert_eq!(text, r#"{"rule":0,"labels":{"gpu":"true"},"strategy":"fixed","agents":["g1","g2"]}"#);
        assert_eq!(&serde_json::from_str::<Placement>(&text).unwrap(), p);
        let any = &r.rules[1].placement;
        assert_eq!(serde_json::to_string(&Placement::default()).unwrap(), "{}");
        let text = serde_json::to_string(any).unwrap();
        assert_eq!(&serde_json::from_str::<Placement>(&text).unwrap(), any);
        let wild: Placement = serde_json::from_str(r#"{"labels":{"zone":"*"}}"#).unwrap();
        assert_eq!(wild.labels["zone"], Pattern::Any);
    }

    #[test]
    fn bad_configs_name_the_rule_and_the_reason() {
        let e = |text: &str| Router::from_json(text).unwrap_err().to_string();
        assert_eq!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "tool": "hammer"}]}"#).split(" (").next().unwrap(),
            "rule 0: unknown tool \"hammer\""
        );
        assert_eq!(
            e(
                r#"{"rules": [{"match": {"kind": "a"}, "tool": "shell"}, {"match": {"kind": "b"}, "strategy": "fixed"}]}"#
            ),
            "rule 1: strategy fixed needs a list of agents"
        );
        assert!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "startegy": "auto"}]}"#)
                .starts_with("rule 0: unknown field `startegy`")
        );
        assert!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "strategy": "random"}]}"#)
                .starts_with("rule 0: unknown variant `random`")
        );
        assert_eq!(
            e(r#"{"rules": [{"match": {}, "tool": "shell"}, {"match": {"kind": "b"}, "tool": "noop"}]}"#),
            "rule 0: an empty match catches every step, so the rules after it never apply"
        );
        assert!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "timeout": "soon"}]}"#)
                .starts_with("rule 0: timeout: bad duration")
        );
        assert_eq!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "max_concurrent": 0}]}"#),
            "rule 0: max_concurrent must be at least 1"
        );
        assert_eq!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "max_concurrent_per": "model"}]}"#),
            "rule 0: max_concurrent_per needs max_concurrent"
        );
        assert_eq!(
            e(r#"{"rules": [{"match": {"kind": "a"}, "max_concurrent": 1, "max_concurrent_per": "a.b"}]}"#),
            "rule 0: max_concurrent_per must name a key of with, not \"a.b\""
        );
        assert!(e("{").starts_with("invalid router config"));
    }
}
