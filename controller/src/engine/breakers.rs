//! Circuit breakers per tool and per (agent, tool): which agents the dispatcher may use,
//! fed by attempt outcomes, persisted, and reported as run events.

use std::cmp::Reverse;
use std::collections::HashMap;

use baton_common::breaker::{Breaker, BreakerPolicy, BreakerState};
use baton_common::outcome::FailureClass;
use baton_common::{pb, proto};
use serde_json::Value;
use tracing::{info, warn};

use super::EngineError;
use super::model::{Model, Timer};
use crate::store::BreakerRow;

/// Breaker policies for the two levels: a tool as a whole (trips on its failure rate
/// across all agents) and a tool on one agent (trips on failures in a row there), each
/// with per-tool overrides.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub tool: BreakerPolicy,
    pub agent: BreakerPolicy,
    /// Per tool: (tool-level, agent-level) policies with the overrides applied.
    pub tools: HashMap<String, (BreakerPolicy, BreakerPolicy)>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { tool: tool_level_default(), agent: BreakerPolicy::default(), tools: HashMap::new() }
    }
}

/// A tool as a whole opens on its failure rate only: one bad agent's streak must not
/// shut a tool out everywhere.
fn tool_level_default() -> BreakerPolicy {
    BreakerPolicy { consecutive_failures: 0, min_requests: 20, ..BreakerPolicy::default() }
}

impl BreakerConfig {
    /// Reads the breaker settings:
    ///
    /// ```json
    /// {"tool": {...}, "agent": {...},
    ///  "tools": {"shell": {"count": ["tool_error"], "agent": {"consecutive_failures": 3}}}}
    /// ```
    ///
    /// `tool` and `agent` override the defaults of each level; a tool's own fields apply
    /// to both levels, its `tool` / `agent` entries to one. Errors name the entry.
    pub fn from_json(text: &str) -> Result<BreakerConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(top) = v else { return Err("expected a JSON object".into()) };
        for key in top.keys() {
            if !["tool", "agent", "tools"].contains(&key.as_str()) {
                return Err(format!("unknown key {key:?} (expected tool, agent, tools)"));
            }
        }
        let tool_base = overlay(to_value(&tool_level_default()), top.get("tool"), "tool")?;
        let agent_base = overlay(to_value(&BreakerPolicy::default()), top.get("agent"), "agent")?;
        let tool = policy(&tool_base, "tool")?;
        let agent = policy(&agent_base, "agent")?;
        let mut tools = HashMap::new();
        if let Some(t) = top.get("tools") {
            let Value::Object(t) = t else { return Err("tools: expected an object".into()) };
            for (name, entry) in t {
                let Value::Object(entry) = entry else {
                    return Err(format!("tools.{name}: expected an object"));
                };
                let mut common = entry.clone();
                let tool_only = common.remove("tool");
                let agent_only = common.remove("agent");
                let common = Value::Object(common);
                let at = format!("tools.{name}");
                let t = overlay(overlay(tool_base.clone(), Some(&common), &at)?, tool_only.as_ref(), &at)?;
                let a = overlay(overlay(agent_base.clone(), Some(&common), &at)?, agent_only.as_ref(), &at)?;
                tools.insert(
                    name.clone(),
                    (policy(&t, &format!("{at}.tool"))?, policy(&a, &format!("{at}.agent"))?),
                );
            }
        }
        Ok(BreakerConfig { tool, agent, tools })
    }

    /// The policy of `tool`'s own breaker, or of `tool` on one agent.
    pub fn policy(&self, tool: &str, on_agent: bool) -> &BreakerPolicy {
        match (self.tools.get(tool), on_agent) {
            (Some((_, a)), true) => a,
            (Some((t, _)), false) => t,
            (None, true) => &self.agent,
            (None, false) => &self.tool,
        }
    }
}

fn to_value(p: &BreakerPolicy) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// `base` with the fields of `over` replacing its own.
fn overlay(mut base: Value, over: Option<&Value>, at: &str) -> Result<Value, String> {
    match (over, &mut base) {
        (None, _) => Ok(base),
        (Some(Value::Object(o)), Value::Object(b)) => {
            b.extend(o.clone());
            Ok(base)
        }
        (Some(_), _) => Err(format!("{at}: expected an object")),
    }
}

fn policy(v: &Value, at: &str) -> Result<BreakerPolicy, String> {
    let p: BreakerPolicy = serde_json::from_value(v.clone()).map_err(|e| format!("{at}: {e}"))?;
    p.check().map_err(|e| format!("{at}: {e}"))?;
    Ok(p)
}

/// (tool, agent id); the agent id is empty for the tool's own breaker.
pub(crate) type BreakerKey = (String, String);

impl Model {
    /// Whether the breakers of `tool` and of (`agent_id`, `tool`) let an attempt through.
    pub(super) fn breakers_admit(&self, tool: &str, agent_id: &str) -> bool {
        let ok = |k: BreakerKey| {
            let p = self.cfg.breakers.policy(&k.0, !k.1.is_empty());
            self.breakers.get(&k).is_none_or(|b| b.admits(p))
        };
        ok((tool.to_string(), String::new())) && ok((tool.to_string(), agent_id.to_string()))
    }

    /// Whether both breakers of `tool` on `agent_id` are closed (or were never tripped).
    pub(super) fn breakers_closed(&self, tool: &str, agent_id: &str) -> bool {
        [(tool.to_string(), String::new()), (tool.to_string(), agent_id.to_string())].iter().all(|k| {
            self.breakers.get(k).is_none_or(|b| b.state == baton_common::breaker::BreakerState::Closed)
        })
    }

    pub(super) fn breakers_on_dispatch(&mut self, tool: &str, agent_id: &str) {
        for key in [(tool.to_string(), String::new()), (tool.to_string(), agent_id.to_string())] {
            if let Some(b) = self.breakers.get_mut(&key) {
                b.on_dispatch();
            }
        }
    }

    /// An attempt ended with no result for the breakers (the controller canceled it):
    /// a probe it was frees its place.
    pub(super) fn breakers_on_abandoned(&mut self, tool: &str, agent_id: &str) {
        for key in [(tool.to_string(), String::new()), (tool.to_string(), agent_id.to_string())] {
            if let Some(b) = self.breakers.get_mut(&key) {
                b.on_abandoned();
            }
        }
    }

    /// Feeds an attempt outcome (`None` for success) to the breakers it concerns. A lost
    /// agent says nothing about the tool, only about that agent.
    pub(super) fn breakers_on_result(
        &mut self,
        tool: &str,
        agent_id: &str,
        failure: Option<FailureClass>,
        run_id: &str,
    ) {
        let now = self.now();
        let mut keys = vec![(tool.to_string(), agent_id.to_string())];
        let tool_key = (tool.to_string(), String::new());
        if failure != Some(FailureClass::AgentLost) {
            keys.push(tool_key);
        } else if let Some(b) = self.breakers.get_mut(&tool_key) {
            // A probe of the tool that was lost with its agent frees its place.
            b.on_abandoned();
        }
        for key in keys {
            let p = self.cfg.breakers.policy(tool, !key.1.is_empty()).clone();
            let b = self.breakers.entry(key.clone()).or_default();
            if let Some(to) = b.on_result(&p, now, failure) {
                let why = match failure {
                    Some(class) => format!("after a {class} failure"),
                    None => "after a successful probe".to_string(),
                };
                self.breaker_changed(&key, to, &why, Some(run_id));
            }
        }
    }

    /// Open breakers whose cooldown is over become half-open.
    pub(super) fn breaker_due(&mut self, key: BreakerKey, now: i64) {
        let p = self.cfg.breakers.policy(&key.0, !key.1.is_empty()).clone();
        let Some(b) = self.breakers.get_mut(&key) else { return };
        if let Some(to) = b.tick(&p, now) {
            self.breaker_changed(&key, to, "cooldown over; letting probes through", None);
        }
    }

    /// Persists a breaker change, arms its timer, and tells the runs it concerns.
    fn breaker_changed(&mut self, key: &BreakerKey, to: BreakerState, why: &str, run_id: Option<&str>) {
        let Some(b) = self.breakers.get(key) else { return };
        let p = self.cfg.breakers.policy(&key.0, !key.1.is_empty());
        if to == BreakerState::Open {
            self.timers.push(Reverse((b.reopens_at(p), Timer::Breaker(key.0.clone(), key.1.clone()))));
        }
        let scope = self.breaker_scope(key);
        let msg = format!("breaker of {scope} {to} {why}");
        match to {
            BreakerState::Open => warn!(tool = %key.0, agent_id = %key.1, "{msg}"),
            _ => info!(tool = %key.0, agent_id = %key.1, "{msg}"),
        }
        self.pending.breakers.insert(key.clone());
        let kind = match to {
            BreakerState::Open => "breaker_opened",
            BreakerState::HalfOpen => "breaker_half_open",
            BreakerState::Closed => "breaker_closed",
        };
        // Every active run that uses the tool sees it, and the run that tripped it.
        let runs: Vec<String> = self
            .runs
            .values()
            .filter(|r| {
                Some(r.id.as_str()) == run_id
                    || r.steps.iter().any(|s| !s.state.is_terminal() && s.tool == key.0)
            })
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id.clone())
            .collect();
        for id in runs {
            if let Some(run) = self.runs.get_mut(&id) {
                self.pending.event(run, kind, None, None, msg.clone());
            }
        }
    }

    /// "tool shell" or "tool shell on agent a1".
    fn breaker_scope(&self, key: &BreakerKey) -> String {
        if key.1.is_empty() {
            format!("tool {}", key.0)
        } else {
            let name = self.agents.get(&key.1).map(|a| a.name.as_str()).unwrap_or(&key.1);
            format!("tool {} on agent {name}", key.0)
        }
    }

    pub(super) fn breaker_row(&self, key: &BreakerKey) -> Option<BreakerRow> {
        let b = self.breakers.get(key)?;
        Some(BreakerRow {
            tool: key.0.clone(),
            agent_id: key.1.clone(),
            state: b.state.as_str().to_string(),
            consecutive: i64::from(b.consecutive),
            opened_at: b.opened_at,
            updated_at: self.now(),
        })
    }

    pub(super) fn list_breakers(&self) -> Vec<pb::Breaker> {
        let mut out: Vec<pb::Breaker> = self
            .breakers
            .iter()
            .map(|((tool, agent_id), b)| {
                let p = self.cfg.breakers.policy(tool, !agent_id.is_empty());
                pb::Breaker {
                    tool: tool.clone(),
                    agent_id: agent_id.clone(),
                    agent_name: self.agents.get(agent_id).map(|a| a.name.clone()).unwrap_or_default(),
                    state: b.state.to_pb(),
                    consecutive_failures: b.consecutive,
                    opened_at: (b.state != BreakerState::Closed).then(|| proto::timestamp(b.opened_at)),
                    half_open_at: (b.state == BreakerState::Open).then(|| proto::timestamp(b.reopens_at(p))),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.tool, &a.agent_name).cmp(&(&b.tool, &b.agent_name)));
        out
    }

    /// Closes the breaker of `tool`, or of `tool` on the agent named (or with id) `agent`.
    pub(super) fn reset_breaker(&mut self, tool: &str, agent: &str) -> Result<Vec<pb::Breaker>, EngineError> {
        let agent_id = if agent.is_empty() {
            String::new()
        } else {
            self.agents
                .values()
                .find(|a| a.name == agent || a.id == agent)
                .map(|a| a.id.clone())
                .ok_or_else(|| EngineError::NotFound(format!("no agent named {agent:?}")))?
        };
        let key = (tool.to_string(), agent_id);
        let changed = self.breakers.get_mut(&key).is_some_and(|b| b.reset(self.pending.now));
        if !self.breakers.contains_key(&key) {
            return Err(EngineError::NotFound(format!("no breaker for {}", self.breaker_scope(&key))));
        }
        if changed {
            let by = format!("reset by {}", self.pending.actor);
            self.breaker_changed(&key, BreakerState::Closed, &by, None);
        }
        Ok(self.list_breakers())
    }

    pub(super) fn load_breakers(&mut self, rows: &[BreakerRow]) {
        for r in rows {
            let Some(state) = BreakerState::parse(&r.state) else { continue };
            let key = (r.tool.clone(), r.agent_id.clone());
            let b = Breaker::restored(state, r.consecutive as u32, r.opened_at);
            if state == BreakerState::Open {
                let p = self.cfg.breakers.policy(&r.tool, !r.agent_id.is_empty());
                self.timers.push(Reverse((b.reopens_at(p), Timer::Breaker(key.0.clone(), key.1.clone()))));
            }
            self.breakers.insert(key, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_tool_entries_merge_over_the_defaults() {
        let c = BreakerConfig::from_json(
            r#"{"agent": {"consecutive_failures": 2, "cooldown_ms": 100},
                "tools": {"shell": {"count": ["tool_error", "nonzero_exit"], "tool": {"failure_rate": 0}}}}"#,
        )
        .unwrap();
        assert_eq!(c.agent.consecutive_failures, 2);
        assert_eq!(c.tool.consecutive_failures, 0, "a tool as a whole trips on its rate only");
        let on_agent = c.policy("shell", true);
        assert_eq!((on_agent.consecutive_failures, on_agent.cooldown_ms), (2, 100));
        assert_eq!(on_agent.count, vec![FailureClass::ToolError, FailureClass::NonzeroExit]);
        let whole = c.policy("shell", false);
        assert_eq!(whole.failure_rate, 0.0);
        assert_eq!(whole.count, vec![FailureClass::ToolError, FailureClass::NonzeroExit]);
        assert_eq!(c.policy("python", true).count, BreakerPolicy::default().count);
    }

    #[test]
    fn bad_configs_name_the_entry() {
        let e = BreakerConfig::from_json(r#"{"tools": {"shell": {"cooldown": 5}}}"#).unwrap_err();
        assert!(e.starts_with("tools.shell.tool: unknown field `cooldown`"), "{e}");
        let e = BreakerConfig::from_json(r#"{"agent": {"failure_rate": 3}}"#).unwrap_err();
        assert!(e.starts_with("agent: failure_rate must be within 0..1"), "{e}");
        let e = BreakerConfig::from_json(r#"{"default": {}}"#).unwrap_err();
        assert!(e.contains("unknown key \"default\""), "{e}");
    }
}

#[cfg(test)]
mod probe_tests {
    use baton_common::pb;
    use baton_common::pb::agent_message::Msg as Up;

    use super::super::model::Input;
    use super::super::testkit::{Kit, MS, config};

    const ONE: &str = "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n";

    /// One tool_error opens the agent's breaker; it lets a probe through 100 ms later.
    fn touchy() -> Kit {
        let mut cfg = config();
        cfg.breakers.agent.consecutive_failures = 1;
        cfg.breakers.agent.cooldown_ms = 100;
        cfg.breakers.tool.consecutive_failures = 1;
        cfg.breakers.tool.cooldown_ms = 100;
        Kit::new(cfg)
    }

    #[test]
    fn a_canceled_probe_lets_the_next_one_through() {
        let mut k = touchy();
        k.connect("a", 1, 1);
        let r = k.submit(ONE);
        let first = k.assigns(1).remove(0);
        k.finished("a", 1, &first, "failed", "tool_error");
        k.advance(150);
        let probe_run = k.submit(ONE);
        let probe = k.assigns(1);
        assert_eq!(probe.len(), 1, "half-open: one probe");
        k.apply(Input::Cancel {
            run_id: probe_run,
            step_id: None,
            reason: String::new(),
            actor: "t".into(),
            reply: 1,
        });
        k.settle();
        let next = k.submit(ONE);
        assert_eq!(k.assigns(1).len(), 1, "the canceled probe's place goes to {next}");
        let _ = r;
    }

    #[test]
    fn a_probe_lost_with_its_agent_lets_the_next_one_through() {
        let mut k = touchy();
        k.connect("a", 1, 1);
        k.connect("b", 2, 1);
        k.submit(ONE);
        let (session, name) = if k.assigns(1).is_empty() { (2, "b") } else { (1, "a") };
        let first = k.model.attempts.values().next().map(|a| a.attempt_ref()).expect("an attempt");
        k.finished(name, session, &first, "failed", "tool_error");
        k.advance(150);
        k.submit(ONE);
        let (on_a, on_b) = (k.assigns(1).len(), k.assigns(2).len());
        assert_eq!(on_a + on_b, 1, "half-open: one probe");
        let probe_on = if on_a == 1 { 1 } else { 2 };
        // The probe's agent goes silent and is lost; the other keeps talking.
        let (live, live_name) = if probe_on == 1 { (2, "b") } else { (1, "a") };
        for _ in 0..12 {
            k.now += 200 * MS;
            k.agent(
                live_name,
                live,
                Up::Heartbeat(pb::Heartbeat { running: vec![], free_slots: 1, sent_ms: 1 }),
            );
            k.apply(Input::Sweep);
            k.settle();
        }
        k.submit(ONE);
        k.advance(5_000);
        assert!(!k.assigns(live).is_empty(), "the tool's breaker still waits for the lost probe");
    }
}
