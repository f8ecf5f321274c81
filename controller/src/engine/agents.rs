//! Agent sessions and the attempts they run: hello and re-adoption, heartbeats,
//! start and finish reports fenced by lease token, loss, deadlines.

use std::collections::HashSet;

use baton_common::outcome::{FailureClass, Outcome};
use baton_common::pb::controller_message::Msg as Out;
use baton_common::state::AttemptState;
use baton_common::time::ms;
use baton_common::{pb, proto};
use tracing::{error, info, warn};

use super::model::{Effect, Model, Pending};
use super::state::{Agent, AgentState, Session};
use super::{Binding, EngineError};

impl Model {
    /// A new agent session: record the agent, adopt the attempts it still runs, abandon
    /// the ones it should not, lose the ones it no longer has, apply unacked results.
    pub(super) fn connect(
        &mut self,
        hello: pb::Hello,
        session_id: u64,
        binding: Binding,
    ) -> Result<u64, EngineError> {
        if hello.agent_id.trim().is_empty() {
            return Err(EngineError::Invalid("hello: agent_id is empty".into()));
        }
        if hello.name.trim().is_empty() {
            return Err(EngineError::Invalid("hello: name is empty".into()));
        }
        if hello.slots == 0 {
            return Err(EngineError::Invalid("hello: slots must be at least 1".into()));
        }
        if binding.strict
            && let Some(a) = self.agents.get(&hello.agent_id)
            && !binding.id_proven
            && !a.name.is_empty()
            && a.name != hello.name
        {
            return Err(EngineError::Denied(format!(
                "agent id {} belongs to agent {:?}, not {:?}",
                hello.agent_id, a.name, hello.name
            )));
        }
        // Names are how operators, routing rules and events tell agents apart: two
        // connected at once under one name (two hosts given one --name, say) would be
        // one agent to them. Authentication or not, the second is refused.
        if let Some(a) = self
            .agents
            .values()
            .find(|a| a.name == hello.name && a.id != hello.agent_id && a.session.is_some())
        {
            return Err(EngineError::Denied(format!(
                "agent {:?} is connected already under id {}: give each agent its own --name",
                hello.name, a.id
            )));
        }
        let now = self.now();
        let lost_after = ms(self.cfg.lost_after);
        let agent = self
            .agents
            .entry(hello.agent_id.clone())
            .or_insert_with(|| Agent::new(&hello.agent_id, "", now, now + lost_after));
        agent.name = hello.name.clone();
        agent.version = hello.version.clone();
        agent.labels = hello.labels.clone().into_iter().collect();
        agent.labels.extend(binding.labels);
        agent.tools = hello.tools.clone();
        agent.slots = hello.slots;
        set_agent(&mut self.pending, agent, AgentState::Connected);
        // A replaced session's stream ends.
        if let Some(old) = agent.session.replace(Session { id: session_id, stopping: false }) {
            self.now_effects.push(Effect::Close { session: old.id });
        }
        agent.connected_at = now;
        agent.last_seen = now;
        agent.lost_at = now + lost_after;
        let agent_name = agent.name.clone();
        let held: Vec<String> = agent.running.iter().cloned().collect();
        self.pending.agents.insert(hello.agent_id.clone());
        info!(agent = %agent_name, agent_id = %hello.agent_id, session = session_id, "agent connected");

        // Welcome goes first on the new stream, so decide adoption before anything
        // else is sent.
        let (adopted, abandon): (Vec<&pb::AttemptRef>, Vec<&pb::AttemptRef>) =
            hello.running.iter().chain(&hello.queued).partition(|r| self.owns_live(&hello.agent_id, r));
        self.pending.send(
            session_id,
            Out::Welcome(pb::Welcome {
                session_id: session_id.to_string(),
                heartbeat_interval: Some(proto::duration(ms(self.cfg.heartbeat_interval))),
                idle_heartbeat_interval: Some(proto::duration(ms(self.cfg.idle_heartbeat()))),
                lease_timeout: Some(proto::duration(lost_after)),
                stop_after: Some(proto::duration(ms(self.cfg.stop_after))),
                fence_grace: Some(proto::duration(ms(self.cfg.fence_grace()))),
                adopted: adopted.iter().map(|r| r.attempt_id.clone()).collect(),
                abandon: abandon.iter().map(|r| r.attempt_id.clone()).collect(),
            }),
        );
        for r in &adopted {
            if let Some(a) = self.attempts.get(&r.attempt_id) {
                let a = a.clone();
                if let Some(run) = self.runs.get_mut(&a.run_id) {
                    let msg = format!("agent {agent_name} reconnected");
                    self.pending.event(run, "attempt_adopted", Some(a.step_idx), Some(&a), msg);
                }
            }
        }
        // A start whose report was lost with the old stream (or with a controller that
        // died before committing it) is recorded now.
        let started: Vec<pb::AttemptRef> = adopted
            .iter()
            .filter(|r| hello.running.iter().any(|x| x.attempt_id == r.attempt_id))
            .filter(|r| self.attempts.get(&r.attempt_id).is_some_and(|a| a.state == AttemptState::Assigned))
            .map(|r| (*r).clone())
            .collect();
        for r in &abandon {
            self.reject(&hello.agent_id, r, "running attempt reported on reconnect");
        }
        for r in started {
            self.started(&hello.agent_id, pb::AttemptStarted { attempt: Some(r), pid: 0 });
        }
        let reported: HashSet<&str> = hello
            .running
            .iter()
            .chain(&hello.queued)
            .chain(hello.unacked.iter().filter_map(|f| f.attempt.as_ref()))
            .map(|r| r.attempt_id.as_str())
            .collect();
        // What the controller thought the agent held but the agent does not report is
        // gone (an Assign lost with the old stream, or a crash of the agent).
        let missing: Vec<String> = held.into_iter().filter(|id| !reported.contains(id.as_str())).collect();
        for id in missing {
            self.lose_attempt(&id, &format!("agent {agent_name} reconnected without it"));
        }
        for f in hello.unacked {
            self.finished(&hello.agent_id, f);
        }
        Ok(session_id)
    }

    pub(super) fn agent_message(&mut self, agent_id: &str, session: u64, msg: pb::agent_message::Msg) {
        let now = self.now();
        let lost_after = ms(self.cfg.lost_after);
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        // A stream that another session replaced, or whose session ended (the agent was
        // declared lost, or revoked), speaks for nobody: the agent must say Hello again.
        if agent.session.as_ref().is_none_or(|s| s.id != session) {
            return;
        }
        // An agent that holds no work heartbeats at the idle interval.
        let every =
            if agent.running.is_empty() { self.cfg.idle_heartbeat() } else { self.cfg.heartbeat_interval };
        if now - agent.last_seen > 2 * ms(every) {
            self.metrics.heartbeats_late.inc(&[]);
        }
        agent.last_seen = now;
        agent.lost_at = now + lost_after;
        match msg {
            pb::agent_message::Msg::Hello(_) => warn!(agent_id, "hello in the middle of a session ignored"),
            pb::agent_message::Msg::Heartbeat(hb) => self.heartbeat(agent_id, hb),
            pb::agent_message::Msg::Started(s) => self.started(agent_id, s),
            pb::agent_message::Msg::Output(o) => {
                let Some(r) = o.attempt else { return };
                if self.owns_live(agent_id, &r) {
                    let redact = self.attempts.get(&r.attempt_id).and_then(|a| a.redactor.clone());
                    self.now_effect(Effect::Output(crate::logs::Chunk {
                        attempt_id: r.attempt_id,
                        offset: o.offset,
                        data: o.data,
                        redact,
                        end: false,
                    }));
                } else {
                    self.reject(agent_id, &r, "output");
                }
            }
            pb::agent_message::Msg::Finished(f) => {
                // An attempt the agent stopped on its own while connected (it shuts
                // down): whatever it was sent now would be stopped too. (Cancels the
                // controller asked for have closed their attempts already; a pipelined
                // one the agent would not start says nothing of the agent.)
                let own_stop = f.outcome == Outcome::Canceled.to_pb()
                    && f.attempt.as_ref().and_then(|r| self.attempts.get(&r.attempt_id)).is_some_and(|a| {
                        !a.state.is_terminal() && a.agent_id == agent_id && !self.held.contains(&a.id)
                    });
                if own_stop && let Some(s) = self.agents.get_mut(agent_id).and_then(|a| a.session.as_mut()) {
                    s.stopping = true;
                }
                self.finished(agent_id, f)
            }
        }
    }

    /// The agent's open session, if any.
    fn session_of(&self, agent_id: &str) -> Option<u64> {
        self.agents.get(agent_id).and_then(|a| a.session.as_ref()).map(|s| s.id)
    }

    /// Whether `r` names a live attempt of `agent_id` under its current lease.
    fn owns_live(&self, agent_id: &str, r: &pb::AttemptRef) -> bool {
        self.attempts.get(&r.attempt_id).is_some_and(|a| {
            !a.state.is_terminal() && a.lease_token == r.lease_token && a.agent_id == agent_id
        })
    }

    fn heartbeat(&mut self, agent_id: &str, hb: pb::Heartbeat) {
        self.metrics.heartbeats.inc(&[]);
        // At once, not after the batch's commit: the pong only says "heard you", and a
        // slow commit must not make agents stop their tools.
        if let Some(session) = self.session_of(agent_id) {
            let msg = Out::Pong(pb::Pong { heartbeat_sent_ms: hb.sent_ms });
            self.now_effect(Effect::Send { session, msg });
        }
        for r in &hb.running {
            if !self.owns_live(agent_id, r) {
                self.reject(agent_id, r, "heartbeat");
            }
        }
        // An assignment the agent never took up (lost in transit, or the agent broke
        // before starting it) must not hold its step forever.
        let now = self.now();
        let patience = ms(self.cfg.lost_after);
        let Some(agent) = self.agents.get(agent_id) else { return };
        let reported: HashSet<&str> = hb.running.iter().map(|r| r.attempt_id.as_str()).collect();
        let stale: Vec<String> = agent
            .running
            .iter()
            .filter(|id| !reported.contains(id.as_str()))
            .filter(|id| {
                self.attempts.get(*id).is_some_and(|a| {
                    a.state == AttemptState::Assigned && a.sent_at.is_some_and(|t| now - t > patience)
                })
            })
            .cloned()
            .collect();
        let name = agent.name.clone();
        for id in stale {
            self.lose_attempt(&id, &format!("agent {name} never started it"));
        }
    }

    fn started(&mut self, agent_id: &str, s: pb::AttemptStarted) {
        let Some(r) = s.attempt else { return };
        if !self.owns_live(agent_id, &r) {
            self.reject(agent_id, &r, "start");
            return;
        }
        let Some(a) = self.attempts.get_mut(&r.attempt_id) else {
            return;
        };
        if a.state != AttemptState::Assigned {
            return;
        }
        match a.state.transition(AttemptState::Running) {
            Ok(to) => a.state = to,
            Err(e) => {
                let what = format!("attempt {}: {e}", a.id);
                let idx = a.step_idx;
                self.pending.violation(self.runs.get_mut(&a.run_id), Some(idx), what);
                return;
            }
        }
        let now = self.pending.now;
        a.started_at = Some(now);
        if let Some(run) = self.runs.get(&a.run_id)
            && let Some(t) = run.spec.steps[a.step_idx].timeout_ms
        {
            // The agent's own timer started before it reported the start, and it kills
            // by its timeout plus kill grace; the slack covers timers firing late.
            let d = now + t as i64 + ms(self.cfg.kill_grace) + ms(super::FENCE_SLACK);
            a.deadline_at = Some(d);
            self.timers.push(std::cmp::Reverse((d, super::model::Timer::Deadline(a.id.clone()))));
        }
        if let Some(ready) = a.ready_at {
            let latency = (self.pending.now_us - ready).max(0) as f64 / 1e6;
            self.metrics.dispatch_latency.observe(&[], latency);
        }
        self.pending.attempts.insert(a.id.clone());
        let a = a.clone();
        if let Some(run) = self.runs.get_mut(&a.run_id) {
            self.pending.event(
                run,
                "attempt_started",
                Some(a.step_idx),
                Some(&a),
                format!("on agent {}", a.agent_name),
            );
        }
    }

    /// A result report: applied once under the current lease, acknowledged again when
    /// re-sent, rejected when the lease is stale.
    pub(super) fn finished(&mut self, agent_id: &str, f: pb::AttemptFinished) {
        let Some(r) = f.attempt.clone() else { return };
        let session = self.session_of(agent_id);
        let outcome = match reported(&f) {
            Ok((outcome, _)) => outcome,
            Err(e) => {
                self.refuse_result(agent_id, &r, e);
                if let Some(session) = session {
                    self.pending
                        .send(session, Out::Ack(pb::Ack { attempt_id: r.attempt_id, accepted: false }));
                }
                return;
            }
        };
        let accepted = match self.attempts.get(&r.attempt_id) {
            Some(a) if a.lease_token != r.lease_token || a.agent_id != agent_id => {
                self.reject(agent_id, &r, "result");
                false
            }
            Some(a) if a.state.is_terminal() => {
                if a.state == outcome || (a.state == AttemptState::Lost && outcome == AttemptState::Canceled)
                {
                    // Re-sent after a reconnect: applied once already. (Without
                    // `reported`, it confirms a stop the controller asked for.)
                    let a = a.clone();
                    if a.reported
                        && let Some(run) = self.runs.get_mut(&a.run_id)
                        && !run.state.is_terminal()
                    {
                        let msg = format!(
                            "result of attempt {} re-sent by agent {}; applied once already",
                            a.number, a.agent_name
                        );
                        self.pending.event(run, "result_redelivered", Some(a.step_idx), Some(&a), msg);
                    }
                    true
                } else {
                    self.reject(agent_id, &r, "result");
                    false
                }
            }
            Some(_) => {
                // A pipelined attempt's result before its predecessors' is dropped,
                // not accepted.
                let held = self.is_held_back(&r.attempt_id);
                self.apply_result(&r.attempt_id, outcome, f);
                !held
            }
            None => match self.recent.states.get(&r.attempt_id) {
                Some(&s) if s == outcome => true,
                _ => {
                    self.reject(agent_id, &r, "result");
                    false
                }
            },
        };
        if let Some(session) = session {
            self.pending.send(session, Out::Ack(pb::Ack { attempt_id: r.attempt_id, accepted }));
        }
    }

    fn apply_result(&mut self, attempt_id: &str, outcome: AttemptState, f: pb::AttemptFinished) {
        // The agent stopped it on its own (shutdown, no controller): an infrastructure
        // loss, not the step's failure. Cancels the controller asked for never get here:
        // their attempts are closed already.
        let class = match reported(&f) {
            Ok((_, class)) => class,
            Err(_) => return,
        };
        if self.is_held_back(attempt_id) {
            // Pipelined, and ended on its agent before the controller accepted what it
            // was to start after (the agent did not start it, or should not have): it
            // counts for nothing; its step is dispatched when it is ready.
            let why = if f.error.is_empty() { format!("ended {outcome} on its agent") } else { f.error };
            self.drop_held_back(attempt_id, &why);
            return;
        }
        let (outcome, class) = match outcome {
            AttemptState::Canceled => (AttemptState::Lost, Some(FailureClass::AgentLost)),
            _ => (outcome, class),
        };
        let Some(a) = self.attempts.get_mut(attempt_id) else { return };
        // Whatever the agent masked or not, no secret value is kept.
        let mut f = f;
        if let Some(r) = &a.redactor {
            f.error = r.text(&f.error);
            f.output_tail = r.text(&f.output_tail);
        }
        let mut result = proto::text_of_value(f.result.as_ref());
        if let Some(r) = &a.redactor {
            result = r.json(&result);
        }
        a.reported = true;
        a.output_bytes = f.output_bytes;
        a.exit_code = f.exit_code;
        a.result = (!result.is_empty()).then_some(result);
        a.output_tail = f.output_tail.clone();
        let (run_id, idx, agent_id) = (a.run_id.clone(), a.step_idx, a.agent_id.clone());
        let tool = self.runs.get(&run_id).map(|r| r.steps[idx].tool.clone()).unwrap_or_default();
        let result = a.result.clone();
        let error = match class {
            Some(c) if f.error.is_empty() => c.to_string(),
            _ => f.error.clone(),
        };
        let duration_ms = f.duration.as_ref().map_or(0, proto::duration_millis);
        self.close_attempt(attempt_id, outcome, class, &error, false);
        self.record_stats(&agent_id, &tool, outcome == AttemptState::Succeeded, duration_ms);
        if outcome != AttemptState::Lost {
            self.metrics.step_duration.observe(&[&tool], duration_ms as f64 / 1000.0);
        }
        let usage = result.as_deref().and_then(super::budgets::usage);
        if let Some((cost, tokens)) = usage {
            self.metrics.cost.add(&[&tool], cost);
            self.metrics.tokens.add(&[&tool], tokens);
            self.add_usage(&run_id, idx, cost, tokens);
        }
        match class {
            None => {
                self.breakers_on_result(&tool, &agent_id, None, &run_id);
                // The files it left, stored before it reported: kept with its success.
                if let Some(run) = self.runs.get(&run_id) {
                    let step_id = run.step_id(idx);
                    self.pending.artifacts.extend(f.artifacts.iter().map(|i| crate::store::ArtifactRow {
                        run_id: run_id.clone(),
                        step_id: step_id.to_string(),
                        path: i.path.clone(),
                        attempt_id: attempt_id.to_string(),
                        size: i.size.min(i64::MAX as u64) as i64,
                        sha256: i.sha256.clone(),
                        created_at: self.pending.now,
                    }));
                }
                self.step_succeeded(&run_id, idx, result);
            }
            Some(class) => {
                self.breakers_on_result(&tool, &agent_id, Some(class), &run_id);
                self.attempt_failed(&run_id, idx, class, &error, f.exit_code);
            }
        }
        if usage.is_some() {
            self.check_budget(&run_id, idx);
        }
    }

    /// Stops an attempt the controller ends (a cancel, a deadline, a budget): canceled,
    /// its tool killed. One that has ended already is left as it is (a pipelined
    /// attempt ends with the attempts it was to start after).
    pub(super) fn cancel_attempt(&mut self, attempt_id: &str, reason: &str) {
        if self.attempts.get(attempt_id).is_none_or(|a| a.state.is_terminal()) {
            return;
        }
        self.close_attempt(attempt_id, AttemptState::Canceled, Some(FailureClass::Canceled), reason, true);
    }

    /// Ends a live attempt: its agent slot is freed and its step has no live attempt.
    /// With `kill`, the agent is told to stop the tool.
    pub(super) fn close_attempt(
        &mut self,
        attempt_id: &str,
        to: AttemptState,
        class: Option<FailureClass>,
        error: &str,
        kill: bool,
    ) {
        let Some(a) = self.attempts.get_mut(attempt_id) else {
            return;
        };
        let to = match a.state.transition(to) {
            Ok(to) => to,
            Err(e) => {
                let what = format!("attempt {attempt_id}: {e}");
                let idx = a.step_idx;
                self.pending.violation(self.runs.get_mut(&a.run_id), Some(idx), what);
                return;
            }
        };
        a.state = to;
        a.finished_at = Some(self.pending.now);
        a.error_class = class;
        for key in std::mem::take(&mut a.concurrency) {
            if let Some(held) = self.holders.get_mut(&key) {
                held.remove(attempt_id);
                if held.is_empty() {
                    self.holders.remove(&key);
                }
            }
        }
        a.error = error.to_string();
        if a.redactor.is_some() || a.output_bytes > 0 {
            // The output has ended: nothing more is held back for masking, and what
            // did not arrive of it is marked.
            let total = a.reported.then_some(a.output_bytes);
            self.now_effects.push(Effect::Output(crate::logs::Chunk::end(attempt_id, total)));
        }
        self.metrics.attempts.inc(&[to.as_str(), class.map_or("", FailureClass::as_str)]);
        self.pending.attempts.insert(a.id.clone());
        if let Some(agent) = self.agents.get_mut(&a.agent_id) {
            agent.running.remove(attempt_id);
            if kill && let Some(s) = &agent.session {
                self.pending.send(
                    s.id,
                    Out::Cancel(pb::Cancel { attempt_id: attempt_id.to_string(), reason: error.to_string() }),
                );
            }
        }
        let (run_id, idx, agent_id) = (a.run_id.clone(), a.step_idx, a.agent_id.clone());
        if let Some(run) = self.runs.get_mut(&run_id)
            && run.steps[idx].current.as_deref() == Some(attempt_id)
        {
            run.steps[idx].current = None;
        }
        if to == AttemptState::Canceled {
            let tool = self.runs.get(&run_id).map(|r| r.steps[idx].tool.clone()).unwrap_or_default();
            self.breakers_on_abandoned(&tool, &agent_id);
        }
        self.unhold(&agent_id, attempt_id);
        self.pipe_agents.insert(agent_id);
        self.predecessor_ended(attempt_id, to);
    }

    /// An attempt is gone with its agent: lost, and retried per the step's policy.
    fn lose_attempt(&mut self, attempt_id: &str, why: &str) {
        let Some(a) = self.attempts.get(attempt_id) else {
            return;
        };
        if a.state.is_terminal() {
            return;
        }
        if self.is_held_back(attempt_id) {
            self.drop_held_back(attempt_id, why);
            return;
        }
        let (run_id, idx, agent_id) = (a.run_id.clone(), a.step_idx, a.agent_id.clone());
        let lost = FailureClass::AgentLost;
        self.close_attempt(attempt_id, AttemptState::Lost, Some(lost), why, true);
        let tool = self.runs.get(&run_id).map(|r| r.steps[idx].tool.clone()).unwrap_or_default();
        self.breakers_on_result(&tool, &agent_id, Some(lost), &run_id);
        self.attempt_failed(&run_id, idx, lost, why, None);
    }

    /// A result that cannot be read (see [`reported`]): logged, put in the run's events,
    /// and the attempt taken as lost, so that its step runs again rather than being
    /// failed or passed on a guess.
    fn refuse_result(&mut self, agent_id: &str, r: &pb::AttemptRef, why: String) {
        let name = self.agents.get(agent_id).map(|a| a.name.clone()).unwrap_or_else(|| agent_id.to_string());
        let why = format!(
            "agent {name} reported a result this controller cannot read ({why}); is the agent newer?"
        );
        error!(run_id = %r.run_id, step_id = %r.step_id, attempt_id = %r.attempt_id, "{why}");
        if self.owns_live(agent_id, r) {
            self.lose_attempt(&r.attempt_id, &why);
        }
    }

    /// A report under a lease that is no longer current: recorded, counted, and the
    /// agent is told to stop that tool.
    fn reject(&mut self, agent_id: &str, r: &pb::AttemptRef, what: &str) {
        self.metrics.fenced.inc(&[]);
        let state = self.attempts.get(&r.attempt_id).map(|a| a.state.as_str());
        let why = match state {
            Some(s) => format!("{what} for attempt in state {s} rejected: lease is not current"),
            None => format!("{what} for unknown attempt rejected"),
        };
        warn!(agent_id, attempt_id = %r.attempt_id, run_id = %r.run_id, "{why}");
        if let Some(session) = self.session_of(agent_id)
            && what != "result"
        {
            self.pending.send(
                session,
                Out::Cancel(pb::Cancel { attempt_id: r.attempt_id.clone(), reason: why.clone() }),
            );
        }
        if let Some(run) = self.runs.get_mut(&r.run_id)
            && !run.state.is_terminal()
        {
            let idx = run.spec.steps.iter().position(|s| s.id == r.step_id);
            let agent = self.agents.get(agent_id).map(|a| a.name.as_str()).unwrap_or(agent_id);
            let msg = format!("{why} (agent {agent}, attempt {})", r.attempt_id);
            self.pending.event(run, "report_rejected", idx, None, msg);
        }
    }

    /// Stops (or resumes) new assignments to an agent; what it runs goes on.
    pub(super) fn drain(&mut self, agent: &str, undo: bool) -> Result<pb::Agent, EngineError> {
        let Some(a) = self.agents.values_mut().find(|a| a.name == agent || a.id == agent) else {
            return Err(EngineError::NotFound(format!("no agent named {agent:?}")));
        };
        a.draining = !undo;
        self.pending.agents.insert(a.id.clone());
        if !undo && let Some(s) = &a.session {
            self.pending.send(s.id, Out::Drain(pb::Drain {}));
        }
        info!(agent = %a.name, draining = !undo, by = %self.pending.actor, "agent drain changed");
        Ok(a.to_pb())
    }

    /// Closes the sessions of the agents named `name` (revoked): the stream ends with
    /// the last sender of it, and what the agent sends on it is ignored from now on.
    pub(super) fn revoke(&mut self, name: &str) -> u32 {
        let mut closed = 0;
        for agent in self.agents.values_mut().filter(|a| a.name == name) {
            if let Some(s) = agent.session.take() {
                self.now_effects.push(Effect::Close { session: s.id });
                closed += 1;
            }
            if agent.state == AgentState::Connected {
                set_agent(&mut self.pending, agent, AgentState::Disconnected);
            }
            self.pending.agents.insert(agent.id.clone());
            warn!(agent = %agent.name, agent_id = %agent.id, by = %self.pending.actor, "agent revoked; its session is closed");
        }
        closed
    }

    pub(super) fn disconnect(&mut self, agent_id: &str, session: u64) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.session.as_ref().is_some_and(|s| s.id == session) {
            agent.session = None;
            self.now_effects.push(Effect::Close { session });
            if agent.state == AgentState::Connected {
                set_agent(&mut self.pending, agent, AgentState::Disconnected);
            }
            self.pending.agents.insert(agent_id.to_string());
            info!(agent = %agent.name, agent_id, "agent disconnected");
        }
    }

    /// Declares agents lost whose lease ran out, and loses their attempts.
    pub(super) fn sweep_agents(&mut self) {
        let now = self.now();
        let expired: Vec<String> = self
            .agents
            .values()
            .filter(|a| a.state != AgentState::Lost && a.lost_at <= now)
            .map(|a| a.id.clone())
            .collect();
        for id in expired {
            let Some(agent) = self.agents.get_mut(&id) else {
                continue;
            };
            let silent = (now - agent.last_seen).max(0);
            warn!(agent = %agent.name, agent_id = %id, silent_ms = silent, "agent lost");
            set_agent(&mut self.pending, agent, AgentState::Lost);
            if let Some(s) = agent.session.take() {
                self.now_effects.push(Effect::Close { session: s.id });
            }
            let why = format!(
                "agent {} lost: silent for {}",
                agent.name,
                baton_common::time::format_duration(std::time::Duration::from_millis(silent as u64))
            );
            let attempts: Vec<String> = agent.running.iter().cloned().collect();
            self.pending.agents.insert(id.clone());
            for a in attempts {
                self.lose_attempt(&a, &why);
            }
        }
    }

    /// An attempt's deadline plus grace passed without a result: it timed out, whatever
    /// its agent says later.
    pub(super) fn deadline_due(&mut self, attempt_id: &str, now: i64) {
        let Some(a) = self.attempts.get(attempt_id) else {
            return;
        };
        if a.state.is_terminal() || a.deadline_at.is_none_or(|d| d > now) {
            return;
        }
        let why = "no result by the step timeout plus kill grace";
        if self.is_held_back(attempt_id) {
            self.drop_held_back(attempt_id, why);
            return;
        }
        let (run_id, idx, agent_id) = (a.run_id.clone(), a.step_idx, a.agent_id.clone());
        let timeout = FailureClass::Timeout;
        self.close_attempt(attempt_id, AttemptState::TimedOut, Some(timeout), why, true);
        let tool = self.runs.get(&run_id).map(|r| r.steps[idx].tool.clone()).unwrap_or_default();
        self.breakers_on_result(&tool, &agent_id, Some(timeout), &run_id);
        self.attempt_failed(&run_id, idx, timeout, why, None);
    }
}

/// Moves an agent to `to` if the agent machine allows it.
fn set_agent(p: &mut Pending, agent: &mut Agent, to: AgentState) {
    match agent.state.transition(to) {
        Ok(to) => agent.state = to,
        Err(e) => p.violation(None, None, format!("agent {}: {e}", agent.id)),
    }
}

/// The attempt state and failure class a result reports. An outcome this controller
/// does not know, or a failure without a class it knows, is an error: such a result
/// comes from an agent speaking a newer protocol and is not guessed at.
fn reported(f: &pb::AttemptFinished) -> Result<(AttemptState, Option<FailureClass>), String> {
    let outcome = Outcome::from_pb(f.outcome).map_err(|e| e.to_string())?;
    let state = match outcome {
        Outcome::Succeeded => return Ok((AttemptState::Succeeded, None)),
        Outcome::Failed => AttemptState::Failed,
        Outcome::TimedOut => AttemptState::TimedOut,
        Outcome::Canceled => AttemptState::Canceled,
    };
    let class = FailureClass::from_pb(f.failure_class).map_err(|e| format!("{outcome} with {e}"))?;
    Ok((state, Some(class)))
}

#[cfg(test)]
mod tests {
    use baton_common::pb;
    use baton_common::pb::agent_message::Msg as Up;
    use baton_common::pb::controller_message::Msg as Down;

    use super::super::model::Input;
    use super::super::testkit::{Kit, config};

    const ONE: &str = "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n";

    fn acks(sent: &[Down]) -> Vec<bool> {
        sent.iter().filter_map(|m| if let Down::Ack(a) = m { Some(a.accepted) } else { None }).collect()
    }

    #[test]
    fn a_second_agent_under_a_connected_name_is_refused() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let err = k.connect_as("a", "another-host", 2).unwrap_err();
        assert!(err.contains("agent \"a\" is connected already under id a-id"), "{err}");
        assert_eq!(k.snapshot().agents.len(), 1);
        // Once the first has gone, the name is free again.
        k.apply(Input::Disconnect { agent_id: "a-id".into(), session: 1 });
        k.settle();
        k.connect_as("a", "another-host", 2).unwrap();
    }

    #[test]
    fn a_result_under_a_stale_lease_is_refused_and_the_current_one_counts() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(ONE);
        let r = k.assigns(1).remove(0);
        let stale = pb::AttemptRef { lease_token: "0".repeat(32), ..r.clone() };
        k.finished("a", 1, &stale, "succeeded", "");
        assert_eq!(acks(&k.take_sent(1)), vec![false]);
        assert_eq!(k.step(&run, "x"), "running");
        assert!(k.events(&run).contains(&"report_rejected".to_string()));
        k.finished("a", 1, &r, "succeeded", "");
        assert_eq!(acks(&k.take_sent(1)), vec![true]);
        assert_eq!(k.run_state(&run), "succeeded");
    }

    #[test]
    fn a_result_sent_twice_is_applied_once_and_acknowledged_twice() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit("name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n  - {id: y, needs: x, tool: shell, with: {run: 'true'}}\n");
        // x, and y pipelined after it.
        let first = k.assigns(1);
        let r = first[0].clone();
        k.finished("a", 1, &r, "succeeded", "");
        k.finished("a", 1, &r, "succeeded", "");
        let sent = k.take_sent(1);
        assert_eq!(acks(&sent), vec![true, true]);
        let assigns = sent.iter().filter(|m| matches!(m, Down::Assign(_))).count();
        assert_eq!(first.len() + assigns, 2, "y is assigned once");
        let events = k.events(&run);
        assert_eq!(events.iter().filter(|e| *e == "step_succeeded").count(), 1);
        assert!(events.contains(&"result_redelivered".to_string()));
    }

    #[test]
    fn a_silent_agent_is_lost_and_its_step_runs_on_another() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(ONE);
        let r = k.assigns(1).remove(0);
        k.started("a", 1, &r);
        k.connect("b", 2, 1);
        // b keeps talking, a says nothing past lost_after.
        for _ in 0..12 {
            k.now += 200 * super::super::testkit::MS;
            k.agent("b", 2, Up::Heartbeat(pb::Heartbeat { running: vec![], free_slots: 1, sent_ms: 1 }));
            k.apply(Input::Sweep);
            k.settle();
        }
        assert_eq!(k.model.agents["a-id"].state, super::AgentState::Lost);
        // The lost attempt is retried after its backoff, on b.
        k.advance(5_000);
        let again = k.assigns(2);
        assert_eq!(again.len(), 1, "{:?}", k.events(&run));
        assert_eq!(again[0].step_id, "x");
        assert_ne!(again[0].attempt_id, r.attempt_id);
        assert_eq!(k.model.attempts[&r.attempt_id].state.as_str(), "lost");
    }
}
