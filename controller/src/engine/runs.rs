//! Runs and steps: submission, step outcomes and retries, failure handling
//! (`fail`, `continue`, `quarantine`), release, deadlines, completion, cancel.

use std::cmp::Reverse;
use std::sync::Arc;

use baton_common::outcome::FailureClass;
use baton_common::retry::{Decision, Failure};
use baton_common::spec::{OnFailure, When};
use baton_common::state::{RunState, StepState};
use baton_common::time::format_duration;
use tracing::{info, warn};

use super::EngineError;
use super::admission::{Admitted, Submission};
use super::model::{Model, Pending, Timer};
use super::run_keys::Admission;
use super::state::{self, Run, Step};
use crate::store::Snapshot;

/// How a step came to succeed.
pub(super) enum Done {
    /// An attempt of it succeeded.
    Ran,
    /// It took over a cached result (why).
    Cached(String),
    /// It is a `for_each` step whose expansions all succeeded (how many).
    Joined(String),
    /// It is an approval step, approved (by whom).
    Approved(String),
}

/// Moves step `idx` of `run` to `to` if the step machine allows it, keeping the run's
/// count of open steps; an illegal move is a bug, logged and not applied.
pub(super) fn set_step(p: &mut Pending, run: &mut Run, idx: usize, to: StepState) -> bool {
    let from = run.steps[idx].state;
    match from.transition(to) {
        Ok(to) => {
            let step = &mut run.steps[idx];
            step.state = to;
            step.ready_since = (to == StepState::Ready).then_some(p.now);
            step.ready_us = (to == StepState::Ready).then_some(p.now_us);
            run.counts[from as usize] -= 1;
            run.counts[to as usize] += 1;
            match (from.is_terminal(), to.is_terminal()) {
                (false, true) => run.open -= 1,
                (true, false) => run.open += 1,
                _ => {}
            }
            p.steps.insert((run.id.clone(), idx));
            true
        }
        Err(e) => {
            let what = format!("step {:?}: {e}", run.step_id(idx));
            p.violation(Some(run), Some(idx), what);
            false
        }
    }
}

/// Moves `run` to `to` if the run machine allows it.
pub(super) fn set_run(p: &mut Pending, run: &mut Run, to: RunState) -> bool {
    match run.state.transition(to) {
        Ok(to) => {
            run.state = to;
            p.runs.insert(run.id.clone());
            true
        }
        Err(e) => {
            p.violation(Some(run), None, e.to_string());
            false
        }
    }
}

/// Ends step `idx` in `to` (failed, skipped, canceled) with `reason` and an event.
pub(super) fn end_step(p: &mut Pending, run: &mut Run, idx: usize, to: StepState, kind: &str, reason: &str) {
    if set_step(p, run, idx, to) {
        let step = &mut run.steps[idx];
        step.finished_at = Some(p.now);
        step.reason = reason.to_string();
        step.next_attempt_at = None;
        p.event(run, kind, Some(idx), None, reason);
    }
}

impl Model {
    /// Creates an admitted run: the checks only the engine can make (secrets, the
    /// agents of a pool), then its rows and its ready steps queued.
    pub(super) fn submit(&mut self, run: Admitted) -> Result<String, EngineError> {
        let Admitted { run, routes, secrets } = run;
        let Submission {
            spec,
            mut params,
            request_id,
            name,
            labels,
            estimates: history,
            rerun,
            no_cache,
            priority,
        } = run;
        let history = &history;
        if let Some((step, r, name)) = secrets.iter().find(|(_, _, name)| !self.secrets.contains_key(name)) {
            return Err(EngineError::Invalid(format!(
                "step {step:?}: ${{{{ {r} }}}}: there is no secret named {name:?} (baton secrets set {name})"
            )));
        }
        for (s, route) in spec.steps.iter().zip(&routes) {
            if let Some(why) = self.pool_refuses(&route.placement, &route.tool) {
                return Err(EngineError::Invalid(format!("step {:?}: {why}", s.id)));
            }
        }
        if let Some(r) = &rerun {
            // A rerun takes the parameters of the run it repeats, its secret ones sealed
            // for that run: they are opened here and sealed again for the new one.
            for (name, value) in params.iter_mut().filter(|(_, v)| v.starts_with(crate::secrets::SEALED)) {
                let opened = self
                    .cfg
                    .secrets
                    .as_ref()
                    .ok_or_else(|| "this controller keeps no secrets (--secrets-key)".to_string())
                    .and_then(|s| s.open(&crate::secrets::param_aad(&r.of, name), value));
                *value = opened.map_err(|e| {
                    EngineError::Invalid(format!(
                        "params.{name}: the secret value of run {} cannot be opened: {e}",
                        r.of
                    ))
                })?;
            }
        }
        let key = super::run_keys::render_key(&spec, &params)?;
        let id = self.random_id();
        let spec_json = serde_json::to_string(&spec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        // Secret parameters are kept sealed; only the engine's memory holds them open.
        let mut stored = params.clone();
        for name in &spec.secret_params {
            let Some(value) = stored.get_mut(name) else { continue };
            let Some(sealer) = &self.cfg.secrets else {
                return Err(EngineError::Invalid(format!(
                    "params.{name} is secret, and this controller keeps no secrets: start it with --secrets-key"
                )));
            };
            *value = sealer.seal(&crate::secrets::param_aad(&id, name), value);
        }
        let params_json = serde_json::to_string(&stored).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let now = self.now();
        let mut last = None;
        let mut steps: Vec<Step> = spec
            .steps
            .iter()
            .zip(routes)
            .map(|(s, route)| {
                let placement = state::share(&mut last, route.placement);
                Step::new(route.tool, placement, &s.needs)
            })
            .collect();
        let needs = state::needs_of(&spec);
        let rerun_of = rerun.as_ref().map(|r| r.of.clone()).unwrap_or_default();
        let mut reused = Vec::new();
        if let Some(r) = rerun {
            for (idx, s) in spec.steps.iter().enumerate() {
                if let Some(result) = r.reused.get(&s.id) {
                    let step = &mut steps[idx];
                    step.state = StepState::Reused;
                    step.result = result.clone();
                    step.finished_at = Some(now);
                    step.reason = format!("reused from run {}", r.of);
                    reused.push(idx);
                }
            }
            for idx in 0..steps.len() {
                if steps[idx].state.is_terminal() {
                    continue;
                }
                let when = spec.steps[idx].when;
                let waiting_on =
                    needs[idx].iter().filter(|&&j| !state::need_met(when, steps[j].state, false)).count();
                steps[idx].waiting_on = waiting_on as u32;
                steps[idx].state = if waiting_on == 0 { StepState::Ready } else { StepState::Waiting };
            }
        }
        for step in steps.iter_mut().filter(|s| s.state == StepState::Ready) {
            step.ready_since = Some(now);
            step.ready_us = Some(self.pending.now_us);
        }
        let dependents = state::dependents_of(&spec);
        let templated = state::templated_of(&spec);
        let steps_states: Vec<StepState> = steps.iter().map(|s| s.state).collect();
        let topo = super::progress::topo_order(&needs);
        let estimates = state::estimates_for(&spec, &steps, history);
        let n = steps.len();
        let deadline_at = spec.deadline_ms.map(|d| now + d as i64);
        let mut run = Run {
            id: id.clone(),
            spec: Arc::new(spec),
            params_json,
            state: RunState::Pending,
            reason: String::new(),
            created_at: now,
            started_at: None,
            finished_at: None,
            request_id: request_id.clone(),
            name,
            labels_json: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            steps,
            dependents,
            needs,
            next_seq: 1,
            open: n - reused.len(),
            failing: None,
            deadline_at,
            templated,
            params,
            topo,
            estimates,
            eta: None,
            counts: state::counts_of(&steps_states),
            redactor: None,
            rerun_of,
            no_cache,
            priority,
            key: key.clone(),
            queued: false,
            cost_micros: 0,
            tokens: 0,
            budget_micros: None,
            budget_tokens: None,
        };
        let p = &mut self.pending;
        p.runs.insert(id.clone());
        p.new_runs.insert(id.clone(), spec_json);
        for i in 0..n {
            p.steps.insert((id.clone(), i));
        }
        let msg = match run.rerun_of.as_str() {
            "" => format!("workstream {:?} with {n} steps", run.spec.name),
            of => format!(
                "workstream {:?} with {n} steps, a rerun of run {of} ({} steps reused)",
                run.spec.name,
                reused.len()
            ),
        };
        p.event(&mut run, "run_submitted", None, None, msg);
        for idx in reused {
            let why = run.steps[idx].reason.clone();
            p.event(&mut run, "step_reused", Some(idx), None, why);
        }
        info!(run_id = %id, workstream = %run.spec.name, steps = n, "run submitted");
        if let Some(d) = deadline_at {
            self.timers.push(Reverse((d, Timer::RunDeadline(id.clone()))));
        }
        let ready: Vec<usize> = (0..n).filter(|&i| run.steps[i].state == StepState::Ready).collect();
        if !request_id.is_empty() {
            self.requests.insert(request_id, id.clone());
        }
        let admission = match &key {
            Some(key) => self.admit_key(&id, &run.spec.clone(), key),
            None => Admission::Go,
        };
        if let Admission::Queue(why) = &admission {
            run.queued = true;
            run.reason.clone_from(why);
            self.pending.event(&mut run, "run_queued", None, None, why.clone());
        }
        self.runs.insert(id.clone(), run);
        match admission {
            Admission::Go => {}
            Admission::Queue(_) => return Ok(id),
            Admission::Cancel(why) => {
                self.stop_run(&id, RunState::Canceled, &why)?;
                return Ok(id);
            }
            Admission::Supersede(old, why) => {
                // The old run no longer holds the key: its end admits no one.
                if let Some(r) = self.runs.get_mut(&old) {
                    r.key = None;
                }
                let _ = self.cancel_run(&old, &why);
            }
        }
        for i in ready {
            self.enqueue(&id, i);
        }
        Ok(id)
    }

    /// Why the pool a router rule sends steps to (its labels, or its fixed agents) will
    /// not run `tool`: it has agents, and none of them allows the tool. A pool with no
    /// agent yet is not judged (its agents may still come).
    pub(super) fn pool_refuses(&self, rule: &crate::router::Placement, tool: &str) -> Option<String> {
        if !rule.is_pool() {
            return None;
        }
        let mut pool: Vec<&super::state::Agent> =
            self.agents.values().filter(|a| rule.admits(&a.name, &a.labels)).collect();
        if pool.is_empty() || pool.iter().any(|a| a.has_tool(tool)) {
            return None;
        }
        pool.sort_by(|a, b| a.name.cmp(&b.name));
        let mut allowed: Vec<&str> =
            pool.iter().flat_map(|a| a.tools.iter().map(|t| t.name.as_str())).collect();
        allowed.sort();
        allowed.dedup();
        let name = match rule.describe_labels() {
            l if !l.is_empty() => format!("pool {l}"),
            _ => format!("pool of agents {}", rule.agents.join(", ")),
        };
        let agents: Vec<&str> = pool.iter().map(|a| a.name.as_str()).collect();
        Some(format!(
            "tool {tool} is not allowed in {name}: its agents ({}) allow only {}",
            agents.join(", "),
            if allowed.is_empty() { "no tools".to_string() } else { allowed.join(", ") }
        ))
    }

    /// Fails a ready step that cannot start (its input does not render).
    pub(super) fn fail_unstarted(&mut self, run_id: &str, idx: usize, reason: &str) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        if set_step(p, run, idx, StepState::Failed) {
            let step = &mut run.steps[idx];
            step.finished_at = Some(p.now);
            step.reason = reason.to_string();
            p.event(run, "step_failed", Some(idx), None, reason);
            warn!(run_id, step_id = %run.step_id(idx), %reason, "step cannot start");
            step_failed_for_good(p, run, idx);
        }
    }

    /// Cancels a run: live attempts are told to stop, every open step is canceled.
    pub(super) fn cancel_run(&mut self, run_id: &str, reason: &str) -> Result<RunState, EngineError> {
        let reason = if reason.is_empty() { "canceled by request" } else { reason };
        self.stop_run(run_id, RunState::Canceled, reason)
    }

    /// Ends a run early in `to` (canceled, or failed at its deadline).
    fn stop_run(&mut self, run_id: &str, to: RunState, reason: &str) -> Result<RunState, EngineError> {
        let Some(run) = self.runs.get(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        if run.state.is_terminal() {
            return Ok(run.state);
        }
        let live: Vec<String> = run.steps.iter().filter_map(|s| s.current.clone()).collect();
        for attempt_id in live {
            self.cancel_attempt(&attempt_id, reason);
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        let p = &mut self.pending;
        for idx in 0..run.steps.len() {
            if !run.steps[idx].state.is_terminal() {
                end_step(p, run, idx, StepState::Canceled, "step_canceled", reason);
            }
        }
        run.reason = reason.to_string();
        finish_run(p, run, to);
        info!(run_id, %reason, state = %to, "run stopped");
        Ok(to)
    }

    /// Cancels one step: its live attempt is stopped, what depends on it is skipped,
    /// the rest of the run goes on.
    pub(super) fn cancel_step(
        &mut self,
        run_id: &str,
        step_id: &str,
        reason: &str,
    ) -> Result<RunState, EngineError> {
        let Some(run) = self.runs.get(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        let Some(idx) = run.spec.steps.iter().position(|s| s.id == step_id) else {
            return Err(EngineError::NotFound(format!("run {run_id} has no step {step_id:?}")));
        };
        if run.steps[idx].state.is_terminal() {
            return Err(EngineError::Conflict(format!(
                "step {step_id:?} is already {}",
                run.steps[idx].state
            )));
        }
        let reason = if reason.is_empty() {
            format!("step {step_id:?} canceled by request")
        } else {
            reason.to_string()
        };
        // A for_each step's expansions go with it.
        let expansions: Vec<usize> = run.needs[idx]
            .iter()
            .copied()
            .filter(|&j| baton_common::spec::Workstream::is_item_of(&run.spec.steps[j], step_id))
            .filter(|&j| !run.steps[j].state.is_terminal())
            .collect();
        let live: Vec<String> =
            expansions.iter().chain([&idx]).filter_map(|&j| run.steps[j].current.clone()).collect();
        for attempt_id in live {
            self.cancel_attempt(&attempt_id, &reason);
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        let p = &mut self.pending;
        for j in expansions {
            if !run.steps[j].state.is_terminal() {
                end_step(p, run, j, StepState::Canceled, "step_canceled", &reason);
            }
        }
        end_step(p, run, idx, StepState::Canceled, "step_canceled", &reason);
        skip_downstream(p, run, idx, &format!("upstream step {step_id:?} was canceled"));
        check_done(p, run);
        Ok(run.state)
    }

    /// Resumes a quarantined run: failed steps get a fresh budget and are ready again.
    pub(super) fn release(&mut self, run_id: &str) -> Result<RunState, EngineError> {
        let Some(run) = self.runs.get_mut(run_id) else {
            return Err(EngineError::Conflict(format!("run {run_id} is not quarantined (it has ended)")));
        };
        if run.state != RunState::Quarantined {
            return Err(EngineError::Conflict(format!("run {run_id} is {}, not quarantined", run.state)));
        }
        let p = &mut self.pending;
        let released = std::mem::take(&mut run.reason);
        set_run(p, run, RunState::Running);
        // Its failed steps get a fresh budget below, so it is no longer failing.
        run.failing = None;
        p.event(run, "run_released", None, None, format!("released from quarantine ({released})"));
        for idx in 0..run.steps.len() {
            if run.steps[idx].state == StepState::Failed && set_step(p, run, idx, StepState::Ready) {
                let step = &mut run.steps[idx];
                step.failures = 0;
                step.lost_count = 0;
                step.lost_streak = 0;
                step.finished_at = None;
                step.reason.clear();
                p.event(run, "step_ready", Some(idx), None, "released with a fresh retry budget");
            }
        }
        run.recount_unconditional();
        // Steps that became ready while the run was held wait in no queue.
        let ready: Vec<usize> =
            (0..run.steps.len()).filter(|&i| run.steps[i].state == StepState::Ready).collect();
        check_done(p, run);
        info!(run_id, "run released");
        for idx in ready {
            self.enqueue(run_id, idx);
        }
        Ok(RunState::Running)
    }

    /// Runs a failed or canceled run again in place: its failed, canceled and skipped
    /// steps get a fresh retry budget and run again; succeeded steps keep their results.
    /// A run that ended is no longer held; `stored` (its rows) brings it back.
    /// Returns the sequence number of the run's `run_retried` event.
    pub(super) fn retry(&mut self, run_id: &str, stored: Snapshot) -> Result<i64, EngineError> {
        if !self.runs.contains_key(run_id) {
            let Some(row) = stored.runs.iter().find(|r| r.id == run_id) else {
                return Err(EngineError::RunNotFound(run_id.to_string()));
            };
            let state: RunState = crate::store::parse_state(&row.state)?;
            retryable(run_id, state)?;
            let now = self.now();
            if let Err(e) = self.insert_runs(&stored, &Default::default(), now) {
                self.runs.remove(run_id);
                return Err(e.into());
            }
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        retryable(run_id, run.state)?;
        let p = &mut self.pending;
        let was = std::mem::take(&mut run.reason);
        if !set_run(p, run, RunState::Running) {
            return Err(EngineError::Conflict(format!("run {run_id} cannot be retried")));
        }
        run.finished_at = None;
        run.failing = None;
        // The run's deadline counts again from the retry.
        run.deadline_at = run.spec.deadline_ms.map(|d| p.now + d as i64);
        let mut again = 0;
        for idx in 0..run.steps.len() {
            let from = run.steps[idx].state;
            if matches!(from, StepState::Failed | StepState::Canceled | StepState::Skipped)
                && set_step(p, run, idx, StepState::Waiting)
            {
                let step = &mut run.steps[idx];
                step.failures = 0;
                step.lost_count = 0;
                step.lost_streak = 0;
                step.next_attempt_at = None;
                step.started_at = None;
                step.finished_at = None;
                step.current = None;
                step.result = None;
                step.reason.clear();
                again += 1;
            }
        }
        let seq = run.next_seq;
        p.event(
            run,
            "run_retried",
            None,
            None,
            format!("retried: {again} steps run again (it had ended: {was})"),
        );
        // Each step waits again for the needs that have not succeeded.
        for idx in 0..run.steps.len() {
            run.steps[idx].waiting_on = run.unmet_needs(idx);
        }
        let mut ready = Vec::new();
        for idx in 0..run.steps.len() {
            if run.steps[idx].state == StepState::Waiting
                && run.steps[idx].waiting_on == 0
                && set_step(p, run, idx, StepState::Ready)
            {
                p.event(run, "step_ready", Some(idx), None, "retried with a fresh retry budget");
                ready.push(idx);
            }
        }
        if let Some(d) = run.deadline_at {
            self.timers.push(Reverse((d, Timer::RunDeadline(run_id.to_string()))));
        }
        info!(run_id, steps = again, "run retried");
        for idx in ready {
            self.enqueue(run_id, idx);
        }
        Ok(seq)
    }

    /// Step `idx` succeeded: its dependents may become ready, the run may be done.
    pub(super) fn step_succeeded(&mut self, run_id: &str, idx: usize, result: Option<String>) {
        // Its result stands for later attempts with the same key (`cache:`).
        if self.runs.get(run_id).is_some_and(|r| r.spec.steps[idx].cache.is_some())
            && let Ok(input) = self.render_input(run_id, idx, &[])
            && let (Some(key), Some(run)) = (input.cache_key(), self.runs.get(run_id))
            && let Some(policy) = &run.spec.steps[idx].cache
        {
            let now = self.now();
            let row = crate::store::CacheRow {
                cache_key: key.clone(),
                workstream: run.spec.name.clone(),
                step_id: run.step_id(idx).to_string(),
                run_id: run_id.to_string(),
                result: result.clone(),
                created_at: now,
                expires_at: now.saturating_add(policy.ttl_ms.min(i64::MAX as u64) as i64),
            };
            self.pending.cache.push(row.clone());
            self.cache.insert(key, row);
        }
        self.step_done(run_id, idx, result, Done::Ran);
    }

    /// Ready step `idx` takes over a cached result (`cached`, no attempt made).
    pub(super) fn step_cached(&mut self, run_id: &str, idx: usize, entry: &crate::store::CacheRow) {
        let why = format!(
            "cached: the result of step {:?} of run {} (key {})",
            entry.step_id,
            entry.run_id,
            &entry.cache_key[..12.min(entry.cache_key.len())]
        );
        self.step_done(run_id, idx, entry.result.clone(), Done::Cached(why));
    }

    /// Step `idx` succeeded (or took over a cached result, or joined its `for_each`
    /// expansions): its dependents may become ready, the run may be done.
    pub(super) fn step_done(&mut self, run_id: &str, idx: usize, result: Option<String>, how: Done) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        let to = if matches!(how, Done::Cached(_)) { StepState::Cached } else { StepState::Succeeded };
        if !set_step(p, run, idx, to) {
            return;
        }
        let step = &mut run.steps[idx];
        step.finished_at = Some(p.now);
        step.result = result;
        step.lost_streak = 0;
        match how {
            Done::Cached(why) => {
                step.reason.clone_from(&why);
                p.event(run, "step_cached", Some(idx), None, why);
            }
            Done::Joined(why) => {
                step.reason.clone_from(&why);
                p.event(run, "step_succeeded", Some(idx), None, why);
            }
            Done::Approved(why) => {
                step.reason.clone_from(&why);
                p.event(run, "step_approved", Some(idx), None, why);
            }
            Done::Ran => {
                step.reason.clear();
                let attempt = step.attempt_ids.last().and_then(|id| self.attempts.get(id));
                p.event(run, "step_succeeded", Some(idx), attempt, "");
            }
        }
        let mut ready = Vec::new();
        let mut pipelined = Vec::new();
        for d in run.dependents[idx].clone() {
            // A failing run starts nothing new but what runs whatever happened upstream.
            if run.failing.is_none() || run.spec.steps[d].when != When::OnSuccess {
                run.steps[d].waiting_on = match run.spec.steps[d].when {
                    When::OnSuccess => run.steps[d].waiting_on.saturating_sub(1),
                    _ => run.unmet_needs(d),
                };
                let s = &mut run.steps[d];
                if s.waiting_on != 0 || s.state != StepState::Waiting {
                    continue;
                }
                // Assigned ahead of time to the agent of its dependencies: it goes on
                // there (a held run drops it, below, and dispatches it on release).
                if run.state == RunState::Running
                    && let Some(a) = s.current.clone().filter(|a| self.held.contains(a))
                {
                    pipelined.push((d, a));
                } else if set_step(p, run, d, StepState::Ready) {
                    p.event(run, "step_ready", Some(d), None, "");
                    ready.push(d);
                }
            }
        }
        check_done(p, run);
        for (d, attempt_id) in pipelined {
            self.activate(run_id, d, &attempt_id);
        }
        for d in ready {
            self.enqueue(run_id, d);
        }
    }

    /// An attempt of step `idx` failed with `class`: retry it per the step's policy, or
    /// fail the step and apply the run's `on_failure`.
    pub(super) fn attempt_failed(
        &mut self,
        run_id: &str,
        idx: usize,
        class: FailureClass,
        error: &str,
        exit_code: Option<i32>,
    ) {
        let now = self.now();
        let jitter: f64 = rand::Rng::random(&mut self.rng);
        let poison_after = self.cfg.poison_after;
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        let step = &mut run.steps[idx];
        if class == FailureClass::AgentLost {
            step.lost_count += 1;
            step.lost_streak += 1;
        } else {
            step.failures += 1;
            step.lost_streak = 0;
        }
        p.steps.insert((run.id.clone(), idx));
        let attempt = step.attempt_ids.last().and_then(|id| self.attempts.get(id));
        let step_id = run.step_id(idx).to_string();
        if run.state.is_terminal() {
            return;
        }
        // A step that keeps taking its agents down is poison: hold the run.
        if class == FailureClass::AgentLost && poison_after > 0 && run.steps[idx].lost_streak >= poison_after
        {
            let reason = format!(
                "step {step_id:?} was lost with its agent {} times in a row (poison?)",
                run.steps[idx].lost_streak
            );
            end_step(p, run, idx, StepState::Failed, "step_failed", &reason);
            quarantine(p, run, &reason);
            return;
        }
        let policy = &run.spec.steps[idx].retry;
        let facts = Failure {
            class,
            exit_code,
            own_failures: run.steps[idx].failures,
            lost: run.steps[idx].lost_count,
        };
        let mut decision = policy.decide(facts, jitter);
        if let Decision::Retry { delay_ms } = decision
            && let Some(deadline) = run.deadline_at
            && now + delay_ms as i64 >= deadline
        {
            decision =
                Decision::Fail { reason: "the run's deadline leaves no time for another attempt".into() };
        }
        let holding = run.failing.is_some() || !matches!(run.state, RunState::Running | RunState::Pending);
        match decision {
            Decision::Retry { delay_ms } if !holding || run.state == RunState::Quarantined => {
                if set_step(p, run, idx, StepState::RetryWait) {
                    let at = now + delay_ms as i64;
                    run.steps[idx].next_attempt_at = Some(at);
                    let msg = format!(
                        "{class}: {error}; retrying in {}",
                        format_duration(std::time::Duration::from_millis(delay_ms))
                    );
                    p.event(run, "step_retry_wait", Some(idx), attempt, msg);
                    self.timers.push(Reverse((at, Timer::Retry(run_id.to_string(), idx))));
                }
            }
            Decision::Retry { .. } => {
                let reason = format!("{class}: {error}; not retried: the run is stopping");
                end_step(p, run, idx, StepState::Failed, "step_failed", &reason);
                let why = format!("upstream step {step_id:?} failed");
                skip_downstream(p, run, idx, &why);
                check_done(p, run);
            }
            Decision::Fail { reason: why } => {
                let reason = if why.is_empty() {
                    format!("{class}: {error}")
                } else {
                    format!("{class}: {error} ({why})")
                };
                if set_step(p, run, idx, StepState::Failed) {
                    let step = &mut run.steps[idx];
                    step.finished_at = Some(now);
                    step.reason = reason.clone();
                    p.event(run, "step_failed", Some(idx), attempt, reason.clone());
                    warn!(run_id, step_id = %step_id, %reason, "step failed");
                    step_failed_for_good(p, run, idx);
                }
            }
        }
    }

    /// The retry time of a step in `retry_wait` has come.
    pub(super) fn retry_due(&mut self, run_id: &str, idx: usize, now: i64) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let step = &run.steps[idx];
        if step.state != StepState::RetryWait || step.next_attempt_at.is_some_and(|t| t > now) {
            return;
        }
        let p = &mut self.pending;
        if set_step(p, run, idx, StepState::Ready) {
            run.steps[idx].next_attempt_at = None;
            p.event(run, "step_ready", Some(idx), None, "retry due");
            self.enqueue(run_id, idx);
        }
    }

    /// The run's deadline has come: it fails, running tools are stopped.
    pub(super) fn run_deadline_due(&mut self, run_id: &str, now: i64) {
        let Some(run) = self.runs.get(run_id) else { return };
        if run.state.is_terminal()
            || run.state == RunState::Quarantined
            || run.deadline_at.is_none_or(|d| d > now)
        {
            return;
        }
        let limit = run.spec.deadline_ms.unwrap_or(0);
        let reason =
            format!("run deadline of {} exceeded", format_duration(std::time::Duration::from_millis(limit)));
        warn!(run_id, "{reason}");
        let _ = self.stop_run(run_id, RunState::Failed, &reason);
    }

    /// Holds a run whose step has waited for an open breaker past its `max_wait`.
    pub(super) fn check_max_wait(&mut self, now: i64) {
        let mut blocked: Vec<(String, usize, String)> = Vec::new();
        for (tool, queue) in &self.ready {
            let Some(why) = self.breaker_block(tool) else { continue };
            for (run_id, idx) in queue.iter() {
                let Some(run) = self.runs.get(run_id) else { continue };
                let step = &run.steps[idx];
                let max_wait = run.spec.steps[idx].max_wait_ms as i64;
                if step.state == StepState::Ready
                    && run.state == RunState::Running
                    && step.ready_since.is_some_and(|t| now - t >= max_wait)
                {
                    blocked.push((run_id.to_string(), idx, why.clone()));
                }
            }
        }
        for (run_id, idx, why) in blocked {
            let Some(run) = self.runs.get_mut(&run_id) else { continue };
            if run.state != RunState::Running {
                continue;
            }
            let max_wait = run.spec.steps[idx].max_wait_ms;
            let reason = format!(
                "step {:?} waited {} (max_wait) for an agent: {why}",
                run.step_id(idx),
                format_duration(std::time::Duration::from_millis(max_wait))
            );
            let p = &mut self.pending;
            end_step(p, run, idx, StepState::Failed, "step_failed", &reason);
            quarantine(p, run, &reason);
        }
    }

    /// After a load: re-queue ready steps, re-arm retry and deadline timers, and end
    /// what a crash left unfinished.
    pub(super) fn resume_run(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let now = self.pending.now;
        let (mut ready, mut approvals) = (Vec::new(), Vec::new());
        for idx in 0..run.steps.len() {
            let step = &mut run.steps[idx];
            match step.state {
                StepState::Ready => {
                    step.ready_since = Some(now);
                    step.ready_us = Some(self.pending.now_us);
                    ready.push(idx);
                }
                StepState::RetryWait => {
                    let at = step.next_attempt_at.unwrap_or(0);
                    self.timers.push(Reverse((at, Timer::Retry(run_id.to_string(), idx))));
                }
                StepState::AwaitingApproval => approvals.push(idx),
                _ => {}
            }
        }
        for idx in approvals {
            self.rearm_approval(run_id, idx);
        }
        let Some(run) = self.runs.get_mut(run_id) else { return };
        if let Some(d) = run.deadline_at {
            self.timers.push(Reverse((d, Timer::RunDeadline(run_id.to_string()))));
        }
        check_done(&mut self.pending, run);
        for idx in ready {
            self.enqueue(run_id, idx);
        }
    }
}

/// Only a failed or canceled run can be retried.
fn retryable(run_id: &str, state: RunState) -> Result<(), EngineError> {
    match state {
        RunState::Failed | RunState::Canceled => Ok(()),
        RunState::Succeeded => {
            Err(EngineError::Conflict(format!("run {run_id} succeeded: there is nothing to retry")))
        }
        s => Err(EngineError::Conflict(format!(
            "run {run_id} is {s}: only a failed or canceled run can be retried"
        ))),
    }
}

/// Step `idx` failed with no retry left; the run's `on_failure` decides what follows.
fn step_failed_for_good(p: &mut Pending, run: &mut Run, idx: usize) {
    let failed_id = run.step_id(idx).to_string();
    match run.spec.on_failure {
        OnFailure::Quarantine => {
            let reason = format!("step {failed_id:?} failed: {}", run.steps[idx].reason);
            quarantine(p, run, &reason);
            return;
        }
        OnFailure::Continue => {
            skip_downstream(p, run, idx, &format!("upstream step {failed_id:?} failed"));
        }
        OnFailure::Fail => {
            // Nothing new starts: steps that have not started are skipped (or, waiting
            // for a retry, canceled); running ones finish.
            // A quarantined run is held, not failing (see `quarantine`).
            if run.failing.is_none() && run.state != RunState::Quarantined {
                run.failing = Some(format!("step {failed_id:?} failed"));
            }
            skip_downstream(p, run, idx, &format!("upstream step {failed_id:?} failed"));
            let why = format!("run stopped: step {failed_id:?} failed");
            for i in 0..run.steps.len() {
                // Steps that run whatever happened upstream still do.
                if run.spec.steps[i].when != When::OnSuccess {
                    continue;
                }
                match run.steps[i].state {
                    StepState::Waiting | StepState::Ready => {
                        end_step(p, run, i, StepState::Skipped, "step_skipped", &why);
                        skip_downstream(p, run, i, &why);
                    }
                    StepState::RetryWait | StepState::AwaitingApproval => {
                        end_step(p, run, i, StepState::Canceled, "step_canceled", &why);
                        skip_downstream(p, run, i, &why);
                    }
                    _ => {}
                }
            }
        }
    }
    check_done(p, run);
}

/// Step `idx` ended without succeeding: the steps downstream of it that run only on
/// success are skipped (and so on down), and those that run whatever happened upstream
/// (`when: always`, `on_failure`) count one more need as ended, and become ready when it
/// was the last (queued through `Pending::newly_ready`).
pub(super) fn skip_downstream(p: &mut Pending, run: &mut Run, idx: usize, why: &str) {
    let mut ended = vec![idx];
    while let Some(i) = ended.pop() {
        for d in run.dependents[i].clone() {
            let step = &mut run.steps[d];
            if run.spec.steps[d].when != When::OnSuccess {
                if step.state != StepState::Waiting {
                    continue;
                }
                let unmet = run.unmet_needs(d);
                run.steps[d].waiting_on = unmet;
                if unmet == 0 && set_step(p, run, d, StepState::Ready) {
                    p.event(run, "step_ready", Some(d), None, "");
                    p.newly_ready.push((run.id.clone(), d));
                }
            } else if matches!(step.state, StepState::Waiting | StepState::Ready) {
                end_step(p, run, d, StepState::Skipped, "step_skipped", why);
                ended.push(d);
            }
        }
    }
}

/// Holds the run: nothing new is dispatched until an operator releases or cancels it.
pub(super) fn quarantine(p: &mut Pending, run: &mut Run, reason: &str) {
    if !matches!(run.state, RunState::Running | RunState::Pending) {
        return;
    }
    if set_run(p, run, RunState::Quarantined) {
        // Held, not failing: a release gives its failed steps a fresh budget, and the
        // rows cannot tell a failure that would have ended the run from one that held
        // it, so a rebuilt model has no failing mark either.
        run.failing = None;
        run.reason = reason.to_string();
        run.recount_unconditional();
        p.event(run, "run_quarantined", None, None, reason);
        warn!(run_id = %run.id, %reason, "run quarantined");
    }
}

/// Ends the run when no step is open any more.
pub(super) fn check_done(p: &mut Pending, run: &mut Run) {
    if run.open > 0 || run.state.is_terminal() || run.state == RunState::Quarantined {
        return;
    }
    // Skipped steps fail nothing by themselves: a step is skipped because a step above
    // it failed or was canceled (which fails the run), or because a condition said so.
    if !run.steps.iter().any(|s| matches!(s.state, StepState::Failed | StepState::Canceled)) {
        finish_run(p, run, RunState::Succeeded);
    } else {
        if run.reason.is_empty() {
            run.reason = run.failing.clone().unwrap_or_else(|| {
                let bad =
                    run.steps.iter().position(|s| matches!(s.state, StepState::Failed | StepState::Canceled));
                match bad {
                    Some(i) => format!("step {:?} {}", run.step_id(i), run.steps[i].state),
                    None => "steps did not succeed".to_string(),
                }
            });
        }
        finish_run(p, run, RunState::Failed);
    }
}

fn finish_run(p: &mut Pending, run: &mut Run, to: RunState) {
    if !set_run(p, run, to) {
        return;
    }
    run.finished_at = Some(p.now);
    let kind = match to {
        RunState::Succeeded => "run_succeeded",
        RunState::Failed => "run_failed",
        _ => "run_canceled",
    };
    let reason = run.reason.clone();
    p.event(run, kind, None, None, reason);
    info!(run_id = %run.id, state = %to, "run finished");
    p.finished_runs.push(run.id.clone());
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Kit, config};

    #[test]
    fn a_failed_attempt_is_retried_after_its_backoff_and_not_before() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(
            "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}, retry: {max_attempts: 2, backoff: {initial: 500ms, jitter: 0}}}\n",
        );
        let first = k.assigns(1).remove(0);
        k.finished("a", 1, &first, "failed", "nonzero_exit");
        assert_eq!(k.step(&run, "x"), "retry_wait");
        k.advance(400);
        assert!(k.assigns(1).is_empty(), "not before the backoff");
        k.advance(200);
        let second = k.assigns(1);
        assert_eq!(second.len(), 1);
        k.finished("a", 1, &second[0], "failed", "nonzero_exit");
        assert_eq!(k.run_state(&run), "failed", "the budget of 2 attempts is spent");
    }

    #[test]
    fn on_failure_continue_skips_only_what_depends_on_the_failure() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 2);
        let run = k.submit(
            "name: w\non_failure: continue\nsteps:\n  - {id: bad, tool: shell, with: {run: 'false'}}\n  - {id: after, needs: bad, tool: shell, with: {run: 'true'}}\n  - {id: other, tool: shell, with: {run: 'true'}}\n",
        );
        // `after` is pipelined behind `bad`.
        let sent = k.assigns(1);
        assert_eq!(sent.len(), 3);
        let bad = sent.iter().find(|r| r.step_id == "bad").cloned().expect("bad assigned");
        let other = sent.iter().find(|r| r.step_id == "other").cloned().expect("other assigned");
        k.finished("a", 1, &bad, "failed", "nonzero_exit");
        assert_eq!(k.step(&run, "after"), "skipped");
        assert_eq!(k.run_state(&run), "running");
        k.finished("a", 1, &other, "succeeded", "");
        assert_eq!(k.run_state(&run), "failed", "a run with a failed step fails, after the rest ran");
    }

    #[test]
    fn a_released_run_gives_its_failed_step_a_fresh_budget() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit(
            "name: w\non_failure: quarantine\nsteps:\n  - {id: x, tool: shell, with: {run: 'false'}}\n",
        );
        let first = k.assigns(1).remove(0);
        k.finished("a", 1, &first, "failed", "nonzero_exit");
        assert_eq!(k.run_state(&run), "quarantined");
        assert!(k.assigns(1).is_empty());
        let reply = 999;
        k.apply(super::super::model::Input::Release {
            run_id: run.clone(),
            budget: (None, None),
            actor: "op".into(),
            reply,
        });
        k.settle();
        let again = k.assigns(1);
        assert_eq!(again.len(), 1);
        assert_eq!(k.model.runs[&run].steps[0].failures, 0);
        k.finished("a", 1, &again[0], "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }
}

#[cfg(test)]
mod retry_tests {
    use super::super::model::{Answer, Input};
    use super::super::testkit::{Kit, config};

    const SPEC: &str = "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: b, needs: a, tool: shell, with: {run: 'false'}, retry: {max_attempts: 1}}\n  - {id: c, needs: b, tool: shell, with: {run: 'true'}}\n";

    fn retry(k: &mut Kit, run: &str, reply: u64) -> Result<i64, String> {
        let stored = Box::new(k.stored_run(run));
        k.apply(Input::Retry { run_id: run.to_string(), stored, actor: "op".into(), reply });
        k.settle();
        match k.answers.remove(&reply) {
            Some(Answer::Retried(r)) => r.map_err(|e| e.to_string()),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[test]
    fn a_retried_run_runs_its_failed_and_skipped_steps_again_and_keeps_what_succeeded() {
        // One step at a time: without pipelined starts, each assignment is the next step.
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 1);
        let run = k.submit(SPEC);
        let a = k.assigns(1).remove(0);
        k.finished("a", 1, &a, "succeeded", "");
        let b = k.assigns(1).remove(0);
        k.finished("a", 1, &b, "failed", "nonzero_exit");
        assert_eq!(k.run_state(&run), "failed");
        assert!(!k.model.runs.contains_key(&run), "an ended run is forgotten");

        let seq = retry(&mut k, &run, 900).expect("retry");
        assert_eq!(k.run_state(&run), "running");
        assert_eq!(k.events(&run).iter().filter(|e| *e == "run_retried").count(), 1);
        let retried_at =
            k.commits.iter().flat_map(|b| &b.events).find(|e| e.kind == "run_retried").map(|e| e.seq);
        assert_eq!(retried_at, Some(seq));
        assert_eq!(k.step(&run, "a"), "succeeded");
        assert_eq!(k.step(&run, "c"), "waiting");
        // Only b is dispatched again, as its second attempt.
        let again = k.assigns(1);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].step_id, "b");
        assert_ne!(again[0].attempt_id, b.attempt_id);
        let r = &k.model.runs[&run];
        assert_eq!(r.steps[1].attempts, 2);
        assert_eq!(r.steps[1].failures, 0, "a fresh retry budget");
        // What the rows say agrees with memory.
        assert_eq!(k.rebuilt_from(k.snapshot()).fingerprint(), k.model.fingerprint());

        k.finished("a", 1, &again[0], "succeeded", "");
        let c = k.assigns(1).remove(0);
        assert_eq!(c.step_id, "c");
        k.finished("a", 1, &c, "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
        let attempts_of = |step: &str| {
            k.commits
                .iter()
                .flat_map(|b| &b.attempts)
                .filter(|a| a.step_id == step)
                .map(|a| a.id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!(attempts_of("a"), 1, "the step that succeeded ran once");
        assert_eq!(attempts_of("b"), 2);
        assert_eq!(attempts_of("c"), 1);

        let e = retry(&mut k, &run, 901).unwrap_err();
        assert!(e.contains("succeeded: there is nothing to retry"), "{e}");
    }

    #[test]
    fn a_retry_counts_the_deadline_again_and_a_restart_keeps_it() {
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 1);
        let run =
            k.submit("name: w\ndeadline: 1s\nsteps:\n  - {id: s, tool: shell, with: {run: 'sleep 9'}}\n");
        let _first = k.assigns(1);
        k.advance(1500);
        assert_eq!(k.run_state(&run), "failed", "its deadline passed");
        retry(&mut k, &run, 900).expect("retry");
        assert_eq!(k.run_state(&run), "running", "the deadline counts again from the retry");
        let live = k.model.runs[&run].deadline_at;
        assert_eq!(live, Some(k.model.now() + 1000));
        assert_eq!(k.rebuilt_from(k.snapshot()).runs[&run].deadline_at, live, "a restart keeps it");
    }

    #[test]
    fn only_an_ended_failed_or_canceled_run_is_retried() {
        // One step at a time: without pipelined starts, each assignment is the next step.
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 1);
        let run = k.submit(SPEC);
        let e = retry(&mut k, &run, 900).unwrap_err();
        assert!(e.contains("is running: only a failed or canceled run can be retried"), "{e}");
        // A canceled run: everything not done runs again.
        k.apply(Input::Cancel {
            run_id: run.clone(),
            step_id: None,
            reason: String::new(),
            actor: "op".into(),
            reply: 901,
        });
        k.settle();
        assert_eq!(k.run_state(&run), "canceled");
        retry(&mut k, &run, 902).expect("retry a canceled run");
        assert_eq!(k.run_state(&run), "running");
        assert_eq!(k.step(&run, "b"), "waiting");
        assert!(!k.assigns(1).is_empty(), "its first step is dispatched again");
    }
}

#[cfg(test)]
mod condition_tests {
    use super::super::testkit::{Kit, config};

    fn kit() -> Kit {
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 4);
        k
    }

    fn reason(k: &Kit, run: &str, step: &str) -> String {
        let r = &k.model.runs[run];
        let idx = r.spec.steps.iter().position(|s| s.id == step).expect("step");
        r.steps[idx].reason.clone()
    }

    #[test]
    fn a_false_condition_skips_its_step_and_what_needs_it_and_fails_nothing() {
        let mut k = kit();
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: b, needs: a, if: '${{ steps.a.outputs.n == 2 }}', tool: shell, with: {run: 'true'}}\n  - {id: c, needs: b, tool: shell, with: {run: 'true'}}\n  - {id: d, needs: a, if: 'steps.a.outputs.n == 1 && true', tool: shell, with: {run: 'true'}}\n",
        );
        let a = k.assigns(1).remove(0);
        k.finished("a", 1, &a, "succeeded", "");
        assert_eq!(k.step(&run, "b"), "skipped");
        assert!(reason(&k, &run, "b").contains("condition false"), "{}", reason(&k, &run, "b"));
        assert_eq!(k.step(&run, "c"), "skipped");
        assert_eq!(k.rebuilt_from(k.snapshot()).fingerprint(), k.model.fingerprint());
        let d = k.assigns(1);
        assert_eq!(d.iter().map(|a| a.step_id.as_str()).collect::<Vec<_>>(), vec!["d"]);
        k.finished("a", 1, &d[0], "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }

    #[test]
    fn a_condition_that_cannot_be_evaluated_fails_its_step() {
        let mut k = kit();
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: b, needs: a, if: 'steps.a.outputs.missing == 1', tool: shell, with: {run: 'true'}}\n",
        );
        let a = k.assigns(1).remove(0);
        k.finished("a", 1, &a, "succeeded", "");
        assert_eq!(k.run_state(&run), "failed");
        let b = k.commits.iter().flat_map(|c| &c.steps).rfind(|r| r.step_id == "b").expect("b's row");
        assert_eq!(b.state, "failed");
        assert!(b.reason.starts_with("if: steps.a.outputs.missing is not set"), "{}", b.reason);
    }

    #[test]
    fn an_always_step_runs_after_a_failure_and_the_run_still_fails() {
        let mut k = kit();
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, retry: {max_attempts: 1}, with: {run: 'false'}}\n  - {id: b, needs: a, tool: shell, with: {run: 'true'}}\n  - {id: cleanup, needs: b, when: always, tool: shell, with: {run: 'true'}}\n  - {id: notify, needs: a, when: on_failure, tool: shell, with: {run: 'true'}}\n",
        );
        let a = k.assigns(1).remove(0);
        k.finished("a", 1, &a, "failed", "nonzero_exit");
        assert_eq!(k.step(&run, "b"), "skipped");
        assert_eq!(k.run_state(&run), "running", "cleanup and notify are to run");
        assert_eq!(k.rebuilt_from(k.snapshot()).fingerprint(), k.model.fingerprint());
        let mut next: Vec<_> = k.assigns(1);
        next.sort_by(|x, y| x.step_id.cmp(&y.step_id));
        assert_eq!(next.iter().map(|a| a.step_id.as_str()).collect::<Vec<_>>(), vec!["cleanup", "notify"]);
        for x in &next {
            k.finished("a", 1, x, "succeeded", "");
        }
        assert_eq!(k.run_state(&run), "failed");
    }

    #[test]
    fn an_on_failure_step_is_skipped_when_everything_it_needs_succeeded() {
        let mut k = kit();
        let run = k.submit(
            "name: w\nsteps:\n  - {id: a, tool: shell, with: {run: 'true'}}\n  - {id: notify, needs: a, when: on_failure, tool: shell, with: {run: 'true'}}\n  - {id: cleanup, needs: a, when: always, tool: shell, with: {run: 'true'}}\n",
        );
        let a = k.assigns(1).remove(0);
        k.finished("a", 1, &a, "succeeded", "");
        assert_eq!(k.step(&run, "notify"), "skipped");
        let c = k.assigns(1);
        assert_eq!(c.iter().map(|a| a.step_id.as_str()).collect::<Vec<_>>(), vec!["cleanup"]);
        k.finished("a", 1, &c[0], "succeeded", "");
        assert_eq!(k.run_state(&run), "succeeded");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::super::model::Input;
    use super::super::testkit::{Kit, config};

    fn spec(arg: &str) -> String {
        format!(
            "name: w\nparams: {{v: \"1\"}}\nsteps:\n  - {{id: a, tool: shell, cache: true, with: {{run: 'echo {arg} ${{{{ params.v }}}}'}}}}\n  - {{id: b, needs: a, tool: shell, with: {{run: 'true'}}}}\n"
        )
    }

    fn run_to_end(k: &mut Kit, run: &str) -> Vec<String> {
        let mut ran = Vec::new();
        while let Some(a) = k.assigns(1).pop() {
            ran.push(a.step_id.clone());
            k.finished("a", 1, &a, "succeeded", "");
        }
        assert_eq!(k.run_state(run), "succeeded");
        ran
    }

    fn submit(k: &mut Kit, text: &str, no_cache: bool) -> String {
        let ws = baton_common::spec::parse("w.yaml", text).unwrap();
        let sub = crate::engine::Submission { no_cache, ..crate::engine::Submission::new(ws) };
        let admitted = sub.admit(&k.model.cfg.router.current()).unwrap();
        k.apply(Input::Submit { run: Box::new(admitted), actor: "t".into(), reply: 77 });
        k.settle();
        match k.answers.remove(&77) {
            Some(super::super::model::Answer::Run(Ok(id))) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cached_step_makes_no_attempt_until_its_input_changes() {
        let mut k = Kit::new(crate::engine::EngineConfig { pipeline: false, ..config() });
        k.connect("a", 1, 1);
        let first = submit(&mut k, &spec("x"), false);
        assert_eq!(run_to_end(&mut k, &first), vec!["a", "b"]);
        // The same input: a is taken over from the cache.
        let second = submit(&mut k, &spec("x"), false);
        assert_eq!(run_to_end(&mut k, &second), vec!["b"]);
        assert!(k.events(&second).contains(&"step_cached".to_string()));
        // One byte changed: it runs again.
        let third = submit(&mut k, &spec("y"), false);
        assert_eq!(run_to_end(&mut k, &third), vec!["a", "b"]);
        // --no-cache: every step runs.
        let fourth = submit(&mut k, &spec("x"), true);
        assert_eq!(run_to_end(&mut k, &fourth), vec!["a", "b"]);
        // A restart keeps the cache.
        let again = k.rebuilt_from(k.snapshot());
        assert_eq!(again.cache.len(), 2);
        assert_eq!(again.cache, k.model.cache);
    }
}

#[cfg(test)]
mod release_tests {
    use super::super::model::Input;
    use super::super::testkit::{Kit, config};

    #[test]
    fn a_failing_run_quarantined_and_released_runs_again() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 2);
        let run = k.submit(
            "name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}}\n  - {id: y, tool: shell, with: {run: 'true'}, retry: {backoff: {initial: 1ms, jitter: 0}}}\n",
        );
        let sent = k.assigns(1);
        let x = sent.iter().find(|r| r.step_id == "x").cloned().expect("x");
        // y is lost with its agent twice (the agent comes back with x only).
        for session in [2, 3] {
            k.connect_running("a", session, 2, vec![x.clone()]);
            k.advance(10);
            assert_eq!(k.assigns(session).len(), 1);
        }
        // x fails for good: the run is failing, y still runs; y is lost a third time:
        // poison, the run is quarantined.
        k.finished("a", 3, &x, "failed", "nonzero_exit");
        k.connect_running("a", 4, 2, vec![]);
        assert_eq!(k.run_state(&run), "quarantined", "{:?}", k.events(&run));
        // Rebuilt from its rows (as after a restart), it is the same held run.
        k.settle();
        assert_eq!(k.rebuilt_from(k.snapshot()).fingerprint(), k.model.fingerprint());
        k.apply(Input::Release { run_id: run.clone(), budget: (None, None), actor: "op".into(), reply: 2 });
        k.settle();
        assert_eq!(k.assigns(4).len(), 2, "released, both steps run again: {:?}", k.events(&run));
    }
}
