//! Pipelined starts: a step whose unfinished dependencies all run on one agent is
//! assigned there ahead of time, to start the moment they succeed on that agent.
//!
//! Such an attempt is committed before it is sent, like any other; its step stays
//! `waiting`, and it holds no slot, until the controller accepts its predecessors'
//! results. Then it is *activated*: the step is `running` on an attempt that may well
//! have started already. When a predecessor attempt ends any other way (fails, times
//! out, is lost, canceled or fenced), the pipelined attempt is canceled with it, and
//! anything it reports is refused: it never counts for its step. A chain on one agent
//! so pays no controller round trip per step, and acceptance stays exactly-once.

use baton_common::outcome::FailureClass;
use baton_common::state::{AttemptState, RunState, StepState};

use super::model::Model;
use super::runs::set_step;

/// Pipelined attempts an agent may hold per slot when the tool's attempts there are
/// short (otherwise one per slot: a long step behind a long step gains nothing by
/// waiting on one agent while others may free up).
const HELD_PER_SLOT: usize = 4;

impl Model {
    /// Pipelines what may be pipelined after the attempts of the agents whose work
    /// changed: dependents of their steps, and in turn of those.
    pub(super) fn pipeline(&mut self) {
        let agents = std::mem::take(&mut self.pipe_agents);
        if !self.cfg.pipeline {
            return;
        }
        for agent_id in agents {
            let Some(agent) = self.agents.get(&agent_id) else { continue };
            if !self.may_hold(agent, true) {
                continue;
            }
            let mut todo: Vec<(String, usize)> = agent
                .running
                .iter()
                .filter_map(|id| self.attempts.get(id))
                .map(|a| (a.run_id.clone(), a.step_idx))
                .collect();
            while let Some((run_id, idx)) = todo.pop() {
                let Some(run) = self.runs.get(&run_id) else { continue };
                for d in run.dependents[idx].clone() {
                    if self.try_pipeline(&run_id, d, &agent_id) {
                        todo.push((run_id.clone(), d));
                    }
                }
            }
        }
    }

    /// Assigns waiting step `idx` to `agent_id` after the attempts of its unfinished
    /// dependencies, if every one of those runs there and the agent may take it.
    fn try_pipeline(&mut self, run_id: &str, idx: usize, agent_id: &str) -> bool {
        let Some(run) = self.runs.get(run_id) else { return false };
        let step = &run.steps[idx];
        let Some(agent) = self.agents.get(agent_id) else { return false };
        // An expansion under a max_parallel starts only when dispatched, which counts;
        // a step with a condition, or that runs whatever happened upstream, is decided
        // when it is ready; a for_each step makes no attempt; a step's inputs are there
        // only once its predecessors' results (with their artifacts) are accepted; a
        // concurrency key is counted at dispatch; a budget is checked on results, and
        // a run held for it must start nothing more.
        let spec = &run.spec.steps[idx];
        if spec.max_parallel.is_some()
            || run.spec.budget.is_some()
            || run.needs[idx].iter().any(|&j| run.spec.steps[j].budget.is_some())
            || spec.condition.is_some()
            || !spec.when.is_default()
            || spec.cache.is_some()
            || spec.for_each.is_some()
            || !spec.inputs.is_empty()
            || spec.concurrency.is_some()
            || step.placement.max_concurrent.is_some()
        {
            return false;
        }
        // Each unfinished need must have a live attempt on this agent: a step waiting on
        // more needs than the agent holds attempts is passed over at once.
        if step.state != StepState::Waiting
            || step.current.is_some()
            || step.waiting_on as usize > agent.running.len()
            || run.failing.is_some()
            || run.state != RunState::Running
        {
            return false;
        }
        let tool = step.tool.as_str();
        if !agent.takes_work() || !agent.has_tool(tool) || !step.placement.admits(&agent.name, &agent.labels)
        {
            return false;
        }
        if !self.may_hold(agent, self.is_short(agent, tool)) {
            return false;
        }
        // Only behind closed breakers: a probe must be a dispatch of its own.
        if !self.breakers_closed(tool, agent_id) {
            return false;
        }
        let mut after = Vec::new();
        let mut defer = Vec::new();
        for &j in &run.needs[idx] {
            let up = &run.steps[j];
            if up.state.is_success() {
                continue;
            }
            let live = up.current.as_ref().and_then(|id| self.attempts.get(id));
            match live {
                Some(a) if a.agent_id == agent_id && !a.state.is_terminal() => {
                    after.push(a.id.clone());
                    defer.push(j);
                }
                _ => return false,
            }
        }
        if after.is_empty() {
            return false;
        }
        match self.render_input(run_id, idx, &defer) {
            Ok(input) => {
                self.assign(run_id, idx, agent_id, input, after);
                true
            }
            // Rendered again, and failed for good, when it is ready.
            Err(_) => false,
        }
    }

    /// Whether `agent` may hold one more pipelined attempt (of a tool whose attempts
    /// there are `short`, or not).
    fn may_hold(&self, agent: &super::state::Agent, short: bool) -> bool {
        let cap = agent.slots as usize * if short { HELD_PER_SLOT } else { 1 };
        agent.held_back.len() < cap && agent.running.len() < (1 + HELD_PER_SLOT) * agent.slots as usize
    }

    /// The step of pipelined attempt `attempt_id` has had all its dependencies' results
    /// accepted: it runs on that attempt now (which may have started already).
    pub(super) fn activate(&mut self, run_id: &str, idx: usize, attempt_id: &str) {
        let Some(a) = self.attempts.get(attempt_id) else { return };
        let agent_id = a.agent_id.clone();
        let Some(run) = self.runs.get_mut(run_id) else { return };
        if !set_step(&mut self.pending, run, idx, StepState::Ready) {
            return;
        }
        // Its input must render with the results now accepted, as it would have at
        // dispatch; if not, it fails as a step that cannot start, whatever its agent did.
        if run.templated[idx]
            && let Err(e) = self.render_input(run_id, idx, &[])
        {
            let why = format!("input: {e}");
            self.drop_held_back(attempt_id, &why);
            self.fail_unstarted(run_id, idx, &why);
            return;
        }
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        if set_step(p, run, idx, StepState::Running) {
            let step = &mut run.steps[idx];
            step.started_at.get_or_insert(p.now);
            step.reason.clear();
            let a = self.attempts.get(attempt_id);
            let msg = "its dependencies succeeded; its pipelined attempt goes on";
            p.event(run, "step_ready", Some(idx), a, msg);
            self.metrics.pipelined.inc(&[]);
        }
        self.unhold(&agent_id, attempt_id);
        self.pipe_agents.insert(agent_id);
    }

    /// Records pipelined attempt `attempt_id` on `agent_id` as held back.
    pub(super) fn hold(&mut self, agent_id: &str, attempt_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.held_back.insert(attempt_id.to_string());
            self.held.insert(attempt_id.to_string());
        }
    }

    /// It is held back no more (activated, or ended).
    pub(super) fn unhold(&mut self, agent_id: &str, attempt_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.held_back.remove(attempt_id);
        }
        self.held.remove(attempt_id);
    }

    /// Whether `attempt_id` is pipelined and its step still waits for its predecessors.
    pub(super) fn is_held_back(&self, attempt_id: &str) -> bool {
        self.held.contains(attempt_id)
    }

    /// Ends a pipelined attempt that has not been activated: canceled (the agent is
    /// told), recorded with `why`, and its step waits on as if it had never been
    /// assigned. It counts against nothing.
    pub(super) fn drop_held_back(&mut self, attempt_id: &str, why: &str) {
        let Some(a) = self.attempts.get(attempt_id) else { return };
        if a.state.is_terminal() {
            return;
        }
        self.close_attempt(attempt_id, AttemptState::Canceled, Some(FailureClass::Canceled), why, true);
        let Some(a) = self.attempts.get(attempt_id) else { return };
        let a = a.clone();
        if let Some(run) = self.runs.get_mut(&a.run_id) {
            let msg = format!("pipelined attempt {} on agent {} dropped: {why}", a.number, a.agent_name);
            self.pending.event(run, "attempt_canceled", Some(a.step_idx), Some(&a), msg);
        }
    }

    /// Attempt `attempt_id` has ended: the pipelined attempts that were to start after
    /// it are dropped unless it succeeded.
    pub(super) fn predecessor_ended(&mut self, attempt_id: &str, to: AttemptState) {
        let Some(followers) = self.followers.remove(attempt_id) else { return };
        if to == AttemptState::Succeeded {
            return;
        }
        let what = self
            .attempts
            .get(attempt_id)
            .map(|a| format!("attempt {} of step {:?}", a.number, a.step_id))
            .unwrap_or_else(|| format!("attempt {attempt_id}"));
        for f in followers {
            self.drop_held_back(&f, &format!("{what}, which it was to start after, ended {to}"));
        }
    }

    /// Pipelined attempts whose step or run will not go on (it was skipped, the run
    /// is failing or held): dropped before anything starts them.
    pub(super) fn drop_stranded(&mut self) {
        let mut stranded = Vec::new();
        for id in &self.held {
            let Some(a) = self.attempts.get(id) else { continue };
            let Some(run) = self.runs.get(&a.run_id) else { continue };
            let why = if run.steps[a.step_idx].state.is_terminal() {
                format!("its step is {}", run.steps[a.step_idx].state)
            } else if run.failing.is_some() || run.state != RunState::Running {
                format!("the run is {}", if run.failing.is_some() { "failing" } else { run.state.as_str() })
            } else {
                continue;
            };
            stranded.push((id.clone(), why));
        }
        for (id, why) in stranded {
            self.drop_held_back(&id, &why);
        }
    }
}

#[cfg(test)]
mod tests {
    use baton_common::pb;
    use baton_common::pb::controller_message::Msg as Down;

    use super::super::testkit::{Kit, config};

    const CHAIN: &str = "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: b, tool: shell, with: {run: 'true'}, needs: [a]}\n";

    /// The Assigns sent to `session` since the last call.
    fn assigns(k: &mut Kit, session: u64) -> Vec<pb::Assign> {
        k.take_sent(session)
            .into_iter()
            .filter_map(|m| match m {
                Down::Assign(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    fn cancels(sent: &[Down]) -> Vec<String> {
        sent.iter()
            .filter_map(|m| match m {
                Down::Cancel(c) => Some(c.attempt_id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_successor_is_assigned_with_its_predecessor_and_runs_on_it_without_another_assign() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(CHAIN);
        let sent = assigns(&mut k, 1);
        assert_eq!(sent.len(), 2, "a, and b pipelined after it: {sent:?}");
        let (a, b) = (sent[0].attempt.clone().unwrap(), sent[1].attempt.clone().unwrap());
        assert_eq!((a.step_id.as_str(), b.step_id.as_str()), ("a", "b"));
        assert!(sent[0].after.is_empty());
        assert_eq!(sent[1].after, vec![a.attempt_id.clone()]);
        assert_eq!(k.step(&run, "b"), "waiting", "held back until a's result is accepted");
        assert!(k.model.wait_reasons(&run)["b"].contains("pipelined"), "{:?}", k.model.wait_reasons(&run));
        assert_eq!(k.model.agents["x-id"].free_slots(), 0, "a takes the slot, b none");
        k.started("x", 1, &a);
        k.finished("x", 1, &a, "succeeded", "");
        assert_eq!(k.step(&run, "b"), "running", "activated on its pipelined attempt");
        assert!(assigns(&mut k, 1).is_empty(), "b is not assigned again");
        k.started("x", 1, &b);
        k.finished("x", 1, &b, "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
        assert_eq!(k.model.metrics.pipelined.get(&[]), 1.0);
        let row = k.commits.iter().flat_map(|c| &c.attempts).find(|r| r.id == b.attempt_id).unwrap();
        assert_eq!(row.follows, format!("[\"{}\"]", a.attempt_id), "stored with its predecessors");
    }

    #[test]
    fn a_successor_that_takes_artifacts_waits_for_its_predecessors_result() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, artifacts: [out], with: {run: 'true'}}\n  - {id: b, needs: a, tool: shell, inputs: {from: a, artifacts: [out]}, with: {run: 'true'}}\n",
        );
        let sent = assigns(&mut k, 1);
        assert_eq!(sent.len(), 1, "b is not pipelined: its inputs are stored with a's accepted result");
        let a = sent[0].attempt.clone().unwrap();
        k.finished("x", 1, &a, "succeeded", "");
        let sent = assigns(&mut k, 1);
        assert_eq!(sent[0].attempt.as_ref().map(|r| r.step_id.as_str()), Some("b"));
        let inputs = &sent[0].request.as_ref().unwrap().inputs;
        assert_eq!(inputs[0].from_step, "a");
        assert_eq!(k.step(&run, "b"), "running");
    }

    #[test]
    fn without_pipelining_a_successor_waits_for_its_predecessor() {
        let mut k = Kit::new(super::super::EngineConfig { pipeline: false, ..config() });
        k.connect("x", 1, 1);
        k.submit(CHAIN);
        assert_eq!(assigns(&mut k, 1).len(), 1);
    }

    #[test]
    fn a_failed_predecessor_drops_its_successor_which_runs_again_after_the_retry() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}, retry: {max_attempts: 2, backoff: {initial: 10ms}}}\n  - {id: b, tool: shell, with: {run: 'true'}, needs: [a]}\n",
        );
        let sent = assigns(&mut k, 1);
        let (a, b) = (sent[0].attempt.clone().unwrap(), sent[1].attempt.clone().unwrap());
        k.finished("x", 1, &a, "failed", "nonzero_exit");
        let sent = k.take_sent(1);
        assert_eq!(cancels(&sent), vec![b.attempt_id.clone()], "the agent is told: {sent:?}");
        assert_eq!(k.step(&run, "b"), "waiting");
        assert_eq!(k.model.runs[&run].steps[1].failures, 0, "it counts against nothing");
        // The agent did not start it either, and says so: nothing changes.
        k.finished("x", 1, &b, "canceled", "");
        assert_eq!(k.step(&run, "b"), "waiting");
        k.advance(50);
        let sent = assigns(&mut k, 1);
        assert_eq!(sent.len(), 2, "a's retry, and b pipelined after it again");
        let (a2, b2) = (sent[0].attempt.clone().unwrap(), sent[1].attempt.clone().unwrap());
        assert_eq!(sent[1].after, vec![a2.attempt_id.clone()]);
        assert_ne!(b2.attempt_id, b.attempt_id);
        k.finished("x", 1, &a2, "succeeded", "");
        k.finished("x", 1, &b2, "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
        assert!(k.events(&run).contains(&"attempt_canceled".to_string()));
    }

    #[test]
    fn a_successor_is_skipped_with_a_predecessor_that_failed_for_good() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(CHAIN);
        let sent = assigns(&mut k, 1);
        let (a, b) = (sent[0].attempt.clone().unwrap(), sent[1].attempt.clone().unwrap());
        k.finished("x", 1, &a, "failed", "nonzero_exit");
        assert!(cancels(&k.take_sent(1)).contains(&b.attempt_id));
        assert_eq!(k.run_state(&run), "failed");
        let b_rows: Vec<_> = k.commits.iter().flat_map(|c| &c.steps).filter(|s| s.step_id == "b").collect();
        assert_eq!(b_rows.last().unwrap().state, "skipped");
    }

    #[test]
    fn a_pipelined_result_that_comes_before_its_predecessors_is_not_accepted() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(CHAIN);
        let sent = assigns(&mut k, 1);
        let b = sent[1].attempt.clone().unwrap();
        k.finished("x", 1, &b, "succeeded", "");
        let acks: Vec<bool> = k
            .take_sent(1)
            .into_iter()
            .filter_map(|m| match m {
                Down::Ack(a) => Some(a.accepted),
                _ => None,
            })
            .collect();
        assert_eq!(acks, vec![false]);
        assert_eq!(k.step(&run, "b"), "waiting", "b waits for a again");
        let again = k.model.runs[&run].steps[1].current.clone();
        assert!(again.is_some_and(|id| id != b.attempt_id), "on a new pipelined attempt");
    }

    #[test]
    fn a_pipelined_attempt_its_agent_would_not_start_leaves_the_agent_taking_work() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        let run = k.submit(CHAIN);
        let sent = assigns(&mut k, 1);
        let (a, b) = (sent[0].attempt.clone().unwrap(), sent[1].attempt.clone().unwrap());
        // The agent does not know what b follows (say it forgot it): it reports b canceled.
        k.finished("x", 1, &b, "canceled", "");
        assert!(k.model.agents["x-id"].takes_work(), "a dropped pipelined attempt is no shutdown");
        let again = assigns(&mut k, 1);
        assert_eq!(again.len(), 1, "b is pipelined behind a again");
        let b2 = again[0].attempt.clone().unwrap();
        assert_ne!(b2.attempt_id, b.attempt_id);
        k.finished("x", 1, &a, "succeeded", "");
        k.finished("x", 1, &b2, "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }

    #[test]
    fn a_predecessor_lost_with_its_agent_takes_its_successor_with_it() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        k.connect("y", 2, 1);
        let run = k.submit(CHAIN);
        let (on_x, on_y) = (assigns(&mut k, 1), assigns(&mut k, 2));
        let (sent, other) = if on_x.is_empty() { (on_y, "x") } else { (on_x, "y") };
        assert_eq!(sent.len(), 2);
        // Only the other agent speaks from now on: the first is lost.
        for _ in 0..15 {
            k.advance(200);
            let s = if other == "x" { 1 } else { 2 };
            k.agent(other, s, baton_common::pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()));
            k.apply(super::super::model::Input::Sweep);
            k.settle();
        }
        assert_eq!(k.step(&run, "b"), "waiting");
        let b_first = sent[1].attempt.clone().unwrap().attempt_id;
        let state = k.model.attempts[&b_first].state;
        assert_eq!(state, baton_common::state::AttemptState::Canceled, "its pipelined attempt went with a's");
        assert_eq!(k.model.runs[&run].steps[1].lost_count, 0, "and is not counted as lost");
        let now = k.model.runs[&run].steps[1].current.clone().unwrap();
        assert_eq!(k.model.attempts[&now].agent_name, other, "pipelined again behind a's retry");
    }

    #[test]
    fn a_successor_that_reads_its_predecessors_outputs_is_rendered_by_the_agent() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 1);
        k.submit(
            "name: w\nparams: {who: {default: you}}\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - id: b\n    tool: shell\n    needs: [a]\n    with: {run: 'echo ${{ steps.a.outputs.n }} ${{ params.who }}'}\n",
        );
        let sent = assigns(&mut k, 1);
        let req = sent[1].request.clone().unwrap();
        assert!(req.render);
        let input = baton_common::proto::json_object(req.input.as_ref().unwrap());
        assert_eq!(input["run"], "echo ${{ steps.a.outputs.n }} ${{ params.who }}", "the template itself");
        let values = baton_common::proto::json_object(req.values.as_ref().unwrap());
        assert_eq!(values, serde_json::json!({"params.who": "you"}).as_object().unwrap().clone());
    }

    #[test]
    fn fan_out_is_pipelined_up_to_the_agents_slots() {
        let mut k = Kit::new(config());
        k.connect("x", 1, 2);
        let mut spec = "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n".to_string();
        for i in 0..5 {
            spec.push_str(&format!("  - {{id: d{i}, tool: shell, with: {{run: 'true'}}, needs: [a]}}\n"));
        }
        k.submit(&spec);
        let sent = assigns(&mut k, 1);
        // The tool has not proved short on this agent yet: one held per slot.
        assert_eq!(
            sent.len(),
            3,
            "a and two dependents: {:?}",
            sent.iter().map(|a| &a.attempt).collect::<Vec<_>>()
        );
        assert_eq!(k.model.agents["x-id"].free_slots(), 1, "held attempts take no slot");
    }
}
