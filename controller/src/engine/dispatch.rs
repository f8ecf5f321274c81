//! Dispatch: ready steps to free agent slots, as Assign messages after commit.

use std::cmp::Reverse;

use baton_common::pb;
use baton_common::state::{AttemptState, RunState, StepState};
use std::collections::HashMap;

use baton_common::time::{format_duration, ms, now_ms};
use tracing::debug;

use super::model::{Agent, Attempt};
use super::runs::{set_run, set_step};
use super::{Engine, Timer};

impl Engine {
    /// Queues a ready step for dispatch.
    pub(super) fn enqueue(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        let tool = run.steps[idx].tool.clone();
        self.ready.entry(tool).or_default().push_back((run_id.to_string(), idx));
    }

    /// Assigns ready steps to agents with free slots, oldest first per tool.
    pub(super) fn dispatch(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        for (tool, queue) in ready.iter_mut() {
            while let Some((run_id, idx)) = queue.front() {
                let dispatchable = self.runs.get(run_id).is_some_and(|r| {
                    r.steps[*idx].state == StepState::Ready
                        && r.failing.is_none()
                        && matches!(r.state, RunState::Pending | RunState::Running)
                });
                if !dispatchable {
                    queue.pop_front();
                    continue;
                }
                let Some(agent_id) = self.pick_agent(tool) else {
                    break;
                };
                let Some((run_id, idx)) = queue.pop_front() else {
                    break;
                };
                self.assign(&run_id, idx, &agent_id);
            }
        }
        ready.retain(|_, q| !q.is_empty());
        // Steps queued while dispatching (none today) go after the older ones.
        for (tool, mut q) in std::mem::take(&mut self.ready) {
            ready.entry(tool).or_default().append(&mut q);
        }
        self.ready = ready;
    }

    /// Creates attempt N+1 of a ready step on `agent_id` and queues its Assign.
    fn assign(&mut self, run_id: &str, idx: usize, agent_id: &str) {
        let now = now_ms();
        let (Some(run), Some(agent)) = (self.runs.get_mut(run_id), self.agents.get_mut(agent_id)) else {
            return;
        };
        let Some(session) = agent.session.as_ref() else {
            return;
        };
        let p = &mut self.pending;
        if !set_step(p, run, idx, StepState::Running) {
            return;
        }
        if run.state == RunState::Pending && set_run(p, run, RunState::Running) {
            run.started_at = Some(now);
            p.event(run, "run_started", None, None, "");
        }
        let spec = &run.spec.steps[idx];
        let step = &mut run.steps[idx];
        step.attempts += 1;
        step.started_at.get_or_insert(now);
        step.reason.clear();
        let deadline_at = spec.timeout_ms.map(|t| now + t as i64 + ms(self.cfg.kill_grace));
        let attempt = Attempt {
            id: uuid::Uuid::new_v4().to_string(),
            run_id: run_id.to_string(),
            step_idx: idx,
            step_id: spec.id.clone(),
            number: step.attempts,
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            lease_token: lease_token(),
            state: AttemptState::Assigned,
            exit_code: None,
            error_class: String::new(),
            error: String::new(),
            result: None,
            output_tail: String::new(),
            assigned_at: now,
            started_at: None,
            finished_at: None,
            deadline_at,
            reported: false,
        };
        step.attempt_ids.push(attempt.id.clone());
        step.current = Some(attempt.id.clone());
        let step_tool = step.tool.clone();
        let request = pb::ExecutionRequest {
            tool: step.tool.clone(),
            input_json: serde_json::Value::Object(spec.with.clone()).to_string(),
            env: spec.env.clone().into_iter().collect(),
            timeout_ms: spec.timeout_ms.map(|t| t as i64).unwrap_or(0),
            kill_grace_ms: ms(self.cfg.kill_grace),
            // A little past the cap, so the controller sees that there was more and
            // marks the cut.
            max_output_bytes: self.cfg.max_output_bytes + 1024,
        };
        p.send(
            &session.tx,
            pb::controller_message::Msg::Assign(pb::Assign {
                attempt: Some(attempt.attempt_ref()),
                number: attempt.number,
                request: Some(request),
            }),
        );
        let msg = format!("attempt {} on agent {}", attempt.number, agent.name);
        p.event(run, "attempt_assigned", Some(idx), Some(&attempt), msg);
        p.attempts.insert(attempt.id.clone());
        agent.running.insert(attempt.id.clone());
        let tool = step_tool;
        if let Some(d) = deadline_at {
            self.timers.push(Reverse((d, Timer::Deadline(attempt.id.clone()))));
        }
        debug!(run_id, step_id = %attempt.step_id, attempt_id = %attempt.id, agent = %agent.name, "assigned");
        self.attempts.insert(attempt.id.clone(), attempt);
        self.breakers_on_dispatch(&tool, agent_id);
    }
}

impl Engine {
    /// The eligible agent with the most free slots (ties: by name, for stable
    /// placement): connected, advertising the tool, with a free slot, and no open
    /// breaker for the tool or for the tool on that agent.
    fn pick_agent(&self, tool: &str) -> Option<String> {
        self.agents
            .values()
            .filter(|a| a.can_take(tool) && self.breakers_admit(tool, &a.id))
            .max_by(|a, b| a.free_slots().cmp(&b.free_slots()).then_with(|| b.name.cmp(&a.name)))
            .map(|a| a.id.clone())
    }

    /// Why no agent takes a ready step of `tool` now, if breakers are the cause: there
    /// are agents with the tool, and breakers shut every one of them out.
    pub(super) fn breaker_block(&self, tool: &str) -> Option<String> {
        let candidates: Vec<&Agent> =
            self.agents.values().filter(|a| a.session.is_some() && a.has_tool(tool)).collect();
        if candidates.is_empty() || candidates.iter().any(|a| self.breakers_admit(tool, &a.id)) {
            return None;
        }
        let tool_key = (tool.to_string(), String::new());
        if let Some(b) = self.breakers.get(&tool_key)
            && !b.admits(self.cfg.breakers.policy(tool, false))
        {
            return Some(format!("the breaker of tool {tool} is {}", b.state));
        }
        let mut names: Vec<&str> = candidates.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        Some(format!(
            "the breakers of tool {tool} are open on every agent that has it ({})",
            names.join(", ")
        ))
    }

    /// Why a ready step of `tool` is not running yet.
    fn ready_reason(&self, tool: &str) -> String {
        let with_tool: Vec<&Agent> = self.agents.values().filter(|a| a.has_tool(tool)).collect();
        let connected = with_tool.iter().filter(|a| a.session.is_some()).count();
        if connected == 0 {
            return if with_tool.is_empty() {
                format!("no agent has tool {tool}")
            } else {
                format!("no connected agent has tool {tool} ({} known but not connected)", with_tool.len())
            };
        }
        if let Some(why) = self.breaker_block(tool) {
            return format!("waiting: {why}");
        }
        if with_tool.iter().filter(|a| a.session.is_some()).all(|a| a.free_slots() == 0) {
            return format!("waiting for a free slot: all {connected} agents with tool {tool} are busy");
        }
        String::new()
    }

    /// Why each open step of an active run is not running (or not finished) yet.
    pub(super) fn wait_reasons(&self, run_id: &str) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let Some(run) = self.runs.get(run_id) else { return out };
        let index = run.spec.index();
        for (idx, step) in run.steps.iter().enumerate() {
            let why = match step.state {
                StepState::Waiting => {
                    let pending: Vec<&str> = run.spec.steps[idx]
                        .needs
                        .iter()
                        .filter(|n| {
                            index.get(n.as_str()).is_some_and(|&j| run.steps[j].state != StepState::Succeeded)
                        })
                        .map(String::as_str)
                        .collect();
                    format!("waiting for {}", pending.join(", "))
                }
                StepState::Ready if run.state == RunState::Quarantined => "run is quarantined".to_string(),
                StepState::Ready => self.ready_reason(&step.tool),
                StepState::RetryWait => {
                    let left = (step.next_attempt_at.unwrap_or(0) - now_ms()).max(0) as u64;
                    format!("retry in {}", format_duration(std::time::Duration::from_millis(left)))
                }
                StepState::Running => match step.current.as_ref().and_then(|id| self.attempts.get(id)) {
                    Some(a) if a.state == AttemptState::Assigned => {
                        format!("assigned to agent {}, not started yet", a.agent_name)
                    }
                    Some(a) => format!("running on agent {}", a.agent_name),
                    None => String::new(),
                },
                _ => continue,
            };
            if !why.is_empty() {
                out.insert(run.step_id(idx).to_string(), why);
            }
        }
        out
    }
}

/// A fresh unguessable lease token.
fn lease_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
