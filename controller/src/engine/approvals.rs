//! Approval steps (the built-in `approval` tool): a ready one waits in
//! `awaiting_approval`, holding no agent slot, until a caller approves or rejects it or
//! its timeout decides. An approval succeeds with the approver's inputs, identity and
//! comment as its outputs; a rejection fails it.

use std::cmp::Reverse;
use std::time::Duration;

use baton_common::approval::Approval;
use baton_common::auth::Role;
use baton_common::state::{RunState, StepState};
use baton_common::template;
use baton_common::time::format_duration;
use serde_json::{Map, Value};
use tracing::info;

use super::EngineError;
use super::dispatch::plain_value;
use super::model::{Model, Timer};
use super::runs::{Done, set_run, set_step};

/// A decision on an approval step.
#[derive(Debug)]
pub struct Decision {
    pub approve: bool,
    pub comment: String,
    /// The approver's inputs (`with.inputs`), as given.
    pub inputs: Map<String, Value>,
    /// The caller's role; `None` when authentication is off.
    pub role: Option<Role>,
}

impl Model {
    /// Ready approval step `idx` starts to wait for a decision.
    pub(super) fn await_approval(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        let approval = match Approval::from_with(&run.spec.steps[idx].with) {
            Ok(a) => a,
            Err(e) => return self.fail_unstarted(run_id, idx, &format!("approval: {e}")),
        };
        let message = match &approval.message {
            None => Ok(String::new()),
            Some(m) => template::render_text(m, &|r| plain_value(run, idx, r, "an approval message")),
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => return self.fail_unstarted(run_id, idx, &format!("with.message: {e}")),
        };
        let now = self.now();
        let Some(run) = self.runs.get_mut(run_id) else { return };
        let p = &mut self.pending;
        if !set_step(p, run, idx, StepState::AwaitingApproval) {
            return;
        }
        if run.state == RunState::Pending && set_run(p, run, RunState::Running) {
            run.started_at = Some(now);
            p.event(run, "run_started", None, None, "");
        }
        let mut why = format!("awaiting approval by the {} role or above", approval.role);
        if !message.is_empty() {
            why = format!("{why}: {message}");
        }
        if let Some(t) = approval.timeout_ms {
            let then = if approval.approve_on_timeout { "approved" } else { "rejected" };
            why.push_str(&format!(
                " ({then} if not decided within {})",
                format_duration(Duration::from_millis(t))
            ));
            self.timers.push(Reverse((now + t as i64, Timer::Approval(run_id.to_string(), idx))));
        }
        let step = &mut run.steps[idx];
        step.started_at = Some(now);
        step.reason.clone_from(&why);
        info!(run_id, step_id = %run.step_id(idx), "approval requested");
        p.event(run, "approval_requested", Some(idx), None, why);
    }

    /// Applies a caller's decision on approval step `step_id` (as `actor`).
    pub(super) fn decide(
        &mut self,
        run_id: &str,
        step_id: &str,
        d: Decision,
        actor: &str,
    ) -> Result<RunState, EngineError> {
        let Some(run) = self.runs.get(run_id) else {
            return Err(EngineError::RunNotFound(run_id.to_string()));
        };
        let Some(idx) = run.spec.steps.iter().position(|s| s.id == step_id) else {
            return Err(EngineError::NotFound(format!("run {run_id} has no step {step_id:?}")));
        };
        let state = run.steps[idx].state;
        if state != StepState::AwaitingApproval {
            return Err(EngineError::Conflict(format!("step {step_id:?} is {state}, not awaiting approval")));
        }
        let approval = Approval::from_with(&run.spec.steps[idx].with).map_err(EngineError::Invalid)?;
        if let Some(role) = d.role
            && !role.includes(approval.role)
        {
            return Err(EngineError::Denied(format!(
                "deciding step {step_id:?} needs the {} role; {actor} has {role}",
                approval.role
            )));
        }
        let who = if actor.is_empty() { "anonymous" } else { actor };
        let comment = d.comment.trim();
        if d.approve {
            let outputs = approval.outputs(&d.inputs, who, comment).map_err(EngineError::Invalid)?;
            let why = decided("approved", who, comment);
            self.step_done(run_id, idx, Some(Value::Object(outputs).to_string()), Done::Approved(why));
        } else {
            self.reject_approval(run_id, idx, decided("rejected", who, comment));
        }
        info!(run_id, step_id, approve = d.approve, actor = who, "approval decided");
        Ok(self.runs.get(run_id).map_or(RunState::Running, |r| r.state))
    }

    /// An approval step's timeout: its `on_timeout` decides, unless a caller did.
    pub(super) fn approval_due(&mut self, run_id: &str, idx: usize, now: i64) {
        let Some(run) = self.runs.get(run_id) else { return };
        let step = &run.steps[idx];
        let Ok(approval) = Approval::from_with(&run.spec.steps[idx].with) else { return };
        let (Some(t), Some(since)) = (approval.timeout_ms, step.started_at) else { return };
        if step.state != StepState::AwaitingApproval || now < since + t as i64 {
            return;
        }
        let after = format!("no decision within {}", format_duration(Duration::from_millis(t)));
        if approval.approve_on_timeout {
            let outputs = approval.outputs(&Map::new(), "timeout", &after).unwrap_or_default();
            let why = format!("approved on timeout: {after}");
            self.step_done(run_id, idx, Some(Value::Object(outputs).to_string()), Done::Approved(why));
        } else {
            self.reject_approval(run_id, idx, format!("rejected on timeout: {after}"));
        }
    }

    fn reject_approval(&mut self, run_id: &str, idx: usize, why: String) {
        if let Some(run) = self.runs.get_mut(run_id) {
            self.pending.event(run, "step_rejected", Some(idx), None, why.clone());
        }
        self.fail_unstarted(run_id, idx, &why);
    }

    /// After a load: an approval step still waiting gets its timeout again.
    pub(super) fn rearm_approval(&mut self, run_id: &str, idx: usize) {
        let Some(run) = self.runs.get(run_id) else { return };
        let Ok(approval) = Approval::from_with(&run.spec.steps[idx].with) else { return };
        if let (Some(t), Some(since)) = (approval.timeout_ms, run.steps[idx].started_at) {
            self.timers.push(Reverse((since + t as i64, Timer::Approval(run_id.to_string(), idx))));
        }
    }
}

fn decided(how: &str, who: &str, comment: &str) -> String {
    if comment.is_empty() { format!("{how} by {who}") } else { format!("{how} by {who}: {comment}") }
}
