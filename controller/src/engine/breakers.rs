//! Circuit breakers per tool and per (agent, tool): which agents the dispatcher may use,
//! fed by attempt outcomes, persisted, and reported as run events.

use std::cmp::Reverse;
use std::collections::HashMap;

use baton_common::breaker::{Breaker, BreakerPolicy, BreakerState};
use baton_common::pb;
use baton_common::time::now_ms;
use serde_json::Value;
use tracing::{info, warn};

use super::{Engine, EngineError, Timer};
use crate::store::BreakerRow;

/// Breaker policies: a default, and per-tool overrides merged over it.
#[derive(Debug, Clone, Default)]
pub struct BreakerConfig {
    pub default: BreakerPolicy,
    pub tools: HashMap<String, BreakerPolicy>,
}

impl BreakerConfig {
    /// Reads `{"default": {...}, "tools": {"shell": {...}}}`; each tool's fields
    /// override the default's. Errors name the entry and the field.
    pub fn from_json(text: &str) -> Result<BreakerConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(top) = v else { return Err("expected a JSON object".into()) };
        for key in top.keys() {
            if key != "default" && key != "tools" {
                return Err(format!("unknown key {key:?} (expected default, tools)"));
            }
        }
        let base = top.get("default").cloned().unwrap_or_else(|| Value::Object(Default::default()));
        let default: BreakerPolicy =
            serde_json::from_value(base.clone()).map_err(|e| format!("default: {e}"))?;
        default.check().map_err(|e| format!("default: {e}"))?;
        let mut tools = HashMap::new();
        if let Some(t) = top.get("tools") {
            let Value::Object(t) = t else { return Err("tools: expected an object".into()) };
            for (tool, over) in t {
                let mut merged = base.clone();
                if let (Value::Object(m), Value::Object(o)) = (&mut merged, over) {
                    m.extend(o.clone());
                } else {
                    return Err(format!("tools.{tool}: expected an object"));
                }
                let p: BreakerPolicy =
                    serde_json::from_value(merged).map_err(|e| format!("tools.{tool}: {e}"))?;
                p.check().map_err(|e| format!("tools.{tool}: {e}"))?;
                tools.insert(tool.clone(), p);
            }
        }
        Ok(BreakerConfig { default, tools })
    }

    pub fn policy(&self, tool: &str) -> &BreakerPolicy {
        self.tools.get(tool).unwrap_or(&self.default)
    }
}

/// (tool, agent id); the agent id is empty for the tool's own breaker.
pub(crate) type BreakerKey = (String, String);

impl Engine {
    /// Whether the breakers of `tool` and of (`agent_id`, `tool`) let an attempt through.
    pub(super) fn breakers_admit(&self, tool: &str, agent_id: &str) -> bool {
        let p = self.cfg.breakers.policy(tool);
        let ok = |k: BreakerKey| self.breakers.get(&k).is_none_or(|b| b.admits(p));
        ok((tool.to_string(), String::new())) && ok((tool.to_string(), agent_id.to_string()))
    }

    pub(super) fn breakers_on_dispatch(&mut self, tool: &str, agent_id: &str) {
        for key in [(tool.to_string(), String::new()), (tool.to_string(), agent_id.to_string())] {
            if let Some(b) = self.breakers.get_mut(&key) {
                b.on_dispatch();
            }
        }
    }

    /// Feeds an attempt outcome (`None` for success) to the breakers it concerns. A lost
    /// agent says nothing about the tool, only about that agent.
    pub(super) fn breakers_on_result(
        &mut self,
        tool: &str,
        agent_id: &str,
        failure: Option<&str>,
        run_id: &str,
    ) {
        let now = now_ms();
        let mut keys = vec![(tool.to_string(), agent_id.to_string())];
        if failure != Some("agent_lost") {
            keys.push((tool.to_string(), String::new()));
        }
        for key in keys {
            let p = self.cfg.breakers.policy(tool).clone();
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
        let p = self.cfg.breakers.policy(&key.0).clone();
        let Some(b) = self.breakers.get_mut(&key) else { return };
        if let Some(to) = b.tick(&p, now) {
            self.breaker_changed(&key, to, "cooldown over; letting probes through", None);
        }
    }

    /// Persists a breaker change, arms its timer, and tells the runs it concerns.
    fn breaker_changed(&mut self, key: &BreakerKey, to: BreakerState, why: &str, run_id: Option<&str>) {
        let Some(b) = self.breakers.get(key) else { return };
        let p = self.cfg.breakers.policy(&key.0);
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
            updated_at: now_ms(),
        })
    }

    pub(super) fn list_breakers(&self) -> Vec<pb::Breaker> {
        let mut out: Vec<pb::Breaker> = self
            .breakers
            .iter()
            .map(|((tool, agent_id), b)| {
                let p = self.cfg.breakers.policy(tool);
                pb::Breaker {
                    tool: tool.clone(),
                    agent_id: agent_id.clone(),
                    agent_name: self.agents.get(agent_id).map(|a| a.name.clone()).unwrap_or_default(),
                    state: b.state.as_str().to_string(),
                    consecutive_failures: b.consecutive,
                    opened_at_ms: if b.state == BreakerState::Closed { 0 } else { b.opened_at },
                    half_open_at_ms: if b.state == BreakerState::Open { b.reopens_at(p) } else { 0 },
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
                .ok_or_else(|| EngineError::Invalid(format!("no agent named {agent:?}")))?
        };
        let key = (tool.to_string(), agent_id);
        let changed = self.breakers.get_mut(&key).is_some_and(|b| b.reset(now_ms()));
        if !self.breakers.contains_key(&key) {
            return Err(EngineError::Invalid(format!("no breaker for {}", self.breaker_scope(&key))));
        }
        if changed {
            self.breaker_changed(&key, BreakerState::Closed, "by an operator reset", None);
        }
        Ok(self.list_breakers())
    }

    pub(super) fn load_breakers(&mut self, rows: &[BreakerRow]) {
        for r in rows {
            let Some(state) = BreakerState::parse(&r.state) else { continue };
            let key = (r.tool.clone(), r.agent_id.clone());
            let b = Breaker::restored(state, r.consecutive as u32, r.opened_at);
            if state == BreakerState::Open {
                let p = self.cfg.breakers.policy(&r.tool);
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
    fn tool_entries_merge_over_the_default() {
        let c = BreakerConfig::from_json(
            r#"{"default": {"consecutive_failures": 2, "cooldown_ms": 100},
                "tools": {"shell": {"count": ["tool_error", "nonzero_exit"]}}}"#,
        )
        .unwrap();
        assert_eq!(c.default.consecutive_failures, 2);
        let shell = c.policy("shell");
        assert_eq!(shell.consecutive_failures, 2);
        assert_eq!(shell.cooldown_ms, 100);
        assert_eq!(shell.count, vec!["tool_error", "nonzero_exit"]);
        assert_eq!(c.policy("python").count, BreakerPolicy::default().count);
    }

    #[test]
    fn bad_configs_name_the_entry() {
        let e = BreakerConfig::from_json(r#"{"tools": {"shell": {"cooldown": 5}}}"#).unwrap_err();
        assert!(e.starts_with("tools.shell: unknown field `cooldown`"), "{e}");
        let e = BreakerConfig::from_json(r#"{"default": {"failure_rate": 3}}"#).unwrap_err();
        assert!(e.starts_with("default: failure_rate must be within 0..1"), "{e}");
        let e = BreakerConfig::from_json(r#"{"defaults": {}}"#).unwrap_err();
        assert!(e.contains("unknown key \"defaults\""), "{e}");
    }
}
