//! Runs and steps: submission, step outcomes, failure handling, completion, cancel.

use std::collections::BTreeMap;
use std::sync::Arc;

use baton_common::spec::Workstream;
use baton_common::state::{AttemptState, RunState, StepState};
use baton_common::time::now_ms;
use tracing::{error, info};

use super::model::{self, Run, Step};
use super::{Engine, EngineError, Pending, Timer};

/// Attempts lost with their agent that a step survives before it fails.
const LOST_BUDGET: u32 = 3;

/// Moves step `idx` of `run` to `to` if the step machine allows it, keeping the run's
/// count of open steps; an illegal move is a bug, logged and not applied.
pub(super) fn set_step(p: &mut Pending, run: &mut Run, idx: usize, to: StepState) -> bool {
    let from = run.steps[idx].state;
    match from.transition(to) {
        Ok(to) => {
            run.steps[idx].state = to;
            match (from.is_terminal(), to.is_terminal()) {
                (false, true) => run.open -= 1,
                (true, false) => run.open += 1,
                _ => {}
            }
            p.steps.insert((run.id.clone(), idx));
            true
        }
        Err(e) => {
            error!(run_id = %run.id, step_id = %run.step_id(idx), "{e}");
            debug_assert!(false, "{e}");
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
            error!(run_id = %run.id, "{e}");
            debug_assert!(false, "{e}");
            false
        }
    }
}

impl Engine {
    pub(super) fn submit(
        &mut self,
        spec: Workstream,
        params: BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        let mut tools = Vec::with_capacity(spec.steps.len());
        for s in &spec.steps {
            match (&s.tool, &s.kind) {
                (Some(t), _) => tools.push(t.clone()),
                (None, kind) => {
                    return Err(EngineError::Invalid(format!(
                        "step {:?}: no router rule maps kind {:?} to a tool",
                        s.id,
                        kind.as_deref().unwrap_or("")
                    )));
                }
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let spec_json = serde_json::to_string(&spec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let params_json = serde_json::to_string(&params).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let steps: Vec<Step> = spec
            .steps
            .iter()
            .zip(tools)
            .map(|(s, tool)| Step::new(tool, s.needs.len() as u32))
            .collect();
        let dependents = model::dependents_of(&spec);
        let n = steps.len();
        let mut run = Run {
            id: id.clone(),
            spec: Arc::new(spec),
            spec_json,
            params_json,
            state: RunState::Pending,
            reason: String::new(),
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            steps,
            dependents,
            next_seq: 1,
            open: n,
            failing: None,
        };
        let p = &mut self.pending;
        p.runs.insert(id.clone());
        for i in 0..n {
            p.steps.insert((id.clone(), i));
        }
        let msg = format!("workstream {:?} with {n} steps", run.spec.name);
        p.event(&mut run, "run_submitted", None, None, msg);
        info!(run_id = %id, workstream = %run.spec.name, steps = n, "run submitted");
        let ready: Vec<usize> = (0..n)
            .filter(|&i| run.steps[i].state == StepState::Ready)
            .collect();
        self.runs.insert(id.clone(), run);
        for i in ready {
            self.enqueue(&id, i);
        }
        Ok(id)
    }

    /// Cancels a run: live attempts are told to stop, every open step is canceled.
    pub(super) fn cancel_run(&mut self, run_id: &str, reason: &str) -> Result<RunState, EngineError> {
        let Some(run) = self.runs.get(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        if run.state.is_terminal() {
            return Ok(run.state);
        }
        let reason = if reason.is_empty() {
            "canceled by request".to_string()
        } else {
            reason.to_string()
        };
        let live: Vec<String> = run.steps.iter().filter_map(|s| s.current.clone()).collect();
        for attempt_id in live {
            self.close_attempt(&attempt_id, AttemptState::Canceled, "canceled", &reason, true);
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        let p = &mut self.pending;
        for idx in 0..run.steps.len() {
            if !run.steps[idx].state.is_terminal() && set_step(p, run, idx, StepState::Canceled) {
                let step = &mut run.steps[idx];
                step.finished_at = Some(now_ms());
                step.reason = reason.clone();
                step.next_attempt_at = None;
                p.event(run, "step_canceled", Some(idx), None, reason.clone());
            }
        }
        run.reason = reason.clone();
        finish_run(p, run, RunState::Canceled);
        info!(run_id, %reason, "run canceled");
        Ok(RunState::Canceled)
    }

    /// Step `idx` succeeded: its dependents may become ready, the run may be done.
    pub(super) fn step_succeeded(&mut self, run_id: &str, idx: usize, result: Option<String>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let p = &mut self.pending;
        if !set_step(p, run, idx, StepState::Succeeded) {
            return;
        }
        let step = &mut run.steps[idx];
        step.finished_at = Some(now_ms());
        step.result = result;
        step.reason.clear();
        let attempt = step.attempt_ids.last().and_then(|id| self.attempts.get(id));
        p.event(run, "step_succeeded", Some(idx), attempt, "");
        let mut ready = Vec::new();
        if run.failing.is_none() {
            for d in run.dependents[idx].clone() {
                let s = &mut run.steps[d];
                s.waiting_on = s.waiting_on.saturating_sub(1);
                if s.waiting_on == 0 && s.state == StepState::Waiting && set_step(p, run, d, StepState::Ready)
                {
                    p.event(run, "step_ready", Some(d), None, "");
                    ready.push(d);
                }
            }
        }
        check_done(p, run);
        for d in ready {
            self.enqueue(run_id, d);
        }
    }

    /// An attempt of step `idx` failed with `class`: retry it, or fail the step.
    pub(super) fn attempt_failed(&mut self, run_id: &str, idx: usize, class: &str, error: &str) {
        let now = now_ms();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let p = &mut self.pending;
        let step = &run.steps[idx];
        let attempt = step.attempt_ids.last().and_then(|id| self.attempts.get(id));
        let retry = run.failing.is_none()
            && run.state == RunState::Running
            && class == "agent_lost"
            && step.lost_count <= LOST_BUDGET;
        if retry {
            if set_step(p, run, idx, StepState::RetryWait) {
                run.steps[idx].next_attempt_at = Some(now);
                let msg = format!("attempt failed ({class}): {error}; retrying");
                p.event(run, "step_retry_wait", Some(idx), attempt, msg);
                self.timers
                    .push(std::cmp::Reverse((now, Timer::Retry(run_id.to_string(), idx))));
            }
            return;
        }
        let reason = format!("{class}: {error}");
        if set_step(p, run, idx, StepState::Failed) {
            let step = &mut run.steps[idx];
            step.finished_at = Some(now);
            step.reason = reason.clone();
            p.event(run, "step_failed", Some(idx), attempt, reason);
            step_failed_for_good(p, run, idx);
        }
    }

    /// The retry time of a step in `retry_wait` has come.
    pub(super) fn retry_due(&mut self, run_id: &str, idx: usize, now: i64) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
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

    /// After a load: re-queue ready steps, re-arm retry timers, repair what a crash left.
    pub(super) fn resume_run(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let mut ready = Vec::new();
        for idx in 0..run.steps.len() {
            let step = &run.steps[idx];
            match step.state {
                StepState::Ready => ready.push(idx),
                StepState::RetryWait => {
                    let at = step.next_attempt_at.unwrap_or(0);
                    self.timers
                        .push(std::cmp::Reverse((at, Timer::Retry(run_id.to_string(), idx))));
                }
                _ => {}
            }
        }
        // A run whose last steps ended but whose end was not recorded.
        check_done(&mut self.pending, run);
        for idx in ready {
            self.enqueue(run_id, idx);
        }
    }
}

/// Step `idx` failed with no retry left: under `fail`, nothing new starts; steps that
/// have not started are skipped; the run fails once its running steps are done.
fn step_failed_for_good(p: &mut Pending, run: &mut Run, idx: usize) {
    let failed_id = run.step_id(idx).to_string();
    if run.failing.is_none() {
        run.failing = Some(format!("step {failed_id:?} failed"));
    }
    let downstream = downstream_of(run, idx);
    for (i, &is_downstream) in downstream.iter().enumerate() {
        let (to, why) = match run.steps[i].state {
            StepState::Waiting | StepState::Ready if is_downstream => {
                (StepState::Skipped, format!("upstream step {failed_id:?} failed"))
            }
            StepState::Waiting | StepState::Ready => (
                StepState::Skipped,
                format!("run stopped: step {failed_id:?} failed"),
            ),
            StepState::RetryWait => (
                StepState::Canceled,
                format!("run stopped: step {failed_id:?} failed"),
            ),
            _ => continue,
        };
        if set_step(p, run, i, to) {
            run.steps[i].reason = why.clone();
            run.steps[i].finished_at = Some(now_ms());
            run.steps[i].next_attempt_at = None;
            let kind = if to == StepState::Skipped {
                "step_skipped"
            } else {
                "step_canceled"
            };
            p.event(run, kind, Some(i), None, why);
        }
    }
    check_done(p, run);
}

/// Which steps depend on step `idx`, directly or not.
fn downstream_of(run: &Run, idx: usize) -> Vec<bool> {
    let mut seen = vec![false; run.steps.len()];
    let mut stack = run.dependents[idx].clone();
    while let Some(i) = stack.pop() {
        if !seen[i] {
            seen[i] = true;
            stack.extend(run.dependents[i].iter().copied());
        }
    }
    seen
}

/// Ends the run when no step is open any more.
pub(super) fn check_done(p: &mut Pending, run: &mut Run) {
    if run.open > 0 || run.state.is_terminal() || run.state == RunState::Quarantined {
        return;
    }
    if run.steps.iter().all(|s| s.state == StepState::Succeeded) {
        finish_run(p, run, RunState::Succeeded);
    } else {
        if run.reason.is_empty() {
            run.reason = run.failing.clone().unwrap_or_else(|| {
                let failed = run.steps.iter().position(|s| s.state == StepState::Failed);
                match failed {
                    Some(i) => format!("step {:?} failed", run.step_id(i)),
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
    run.finished_at = Some(now_ms());
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
