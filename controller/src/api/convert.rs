//! Store rows to API messages.

use std::collections::HashMap;

use baton_common::pb;
use baton_common::spec::Workstream;
use baton_common::state::StepState;
use baton_common::time::now_ms;

use crate::store::{AttemptRow, EventRow, RunRecord, RunRow, StateCounts};

pub fn run(rec: RunRecord) -> pb::Run {
    let spec: Option<Workstream> = serde_json::from_str(&rec.run.spec).ok();
    let mut attempts: HashMap<String, Vec<pb::Attempt>> = HashMap::new();
    for a in &rec.attempts {
        attempts.entry(a.step_id.clone()).or_default().push(attempt(a));
    }
    let mut counts = StateCounts::new();
    let steps = rec
        .steps
        .iter()
        .map(|s| {
            *counts.entry(s.state.clone()).or_default() += 1;
            let sp = spec.as_ref().and_then(|w| w.steps.get(s.idx as usize));
            pb::Step {
                id: s.step_id.clone(),
                state: s.state.clone(),
                tool: s.tool.clone(),
                needs: sp.map(|x| x.needs.clone()).unwrap_or_default(),
                attempt_count: s.attempts as u32,
                reason: s.reason.clone(),
                started_at_ms: s.started_at.unwrap_or(0),
                finished_at_ms: s.finished_at.unwrap_or(0),
                next_attempt_at_ms: s.next_attempt_at.unwrap_or(0),
                result_json: s.result.clone().unwrap_or_default(),
                attempts: attempts.remove(&s.step_id).unwrap_or_default(),
                kind: sp.and_then(|x| x.kind.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let progress = progress(&rec.run, &counts);
    pb::Run {
        id: rec.run.id.clone(),
        workstream: rec.run.workstream.clone(),
        state: rec.run.state.clone(),
        reason: rec.run.reason.clone(),
        created_at_ms: rec.run.created_at,
        started_at_ms: rec.run.started_at.unwrap_or(0),
        finished_at_ms: rec.run.finished_at.unwrap_or(0),
        steps,
        progress: Some(progress),
        last_seq: rec.last_seq,
        params: shown_params(&rec.run.params).into_iter().collect(),
    }
}

pub fn attempt(a: &AttemptRow) -> pb::Attempt {
    pb::Attempt {
        id: a.id.clone(),
        number: a.number as u32,
        agent_id: a.agent_id.clone(),
        agent_name: a.agent_name.clone(),
        state: a.state.clone(),
        exit_code: a.exit_code.map(|c| c as i32),
        error_class: a.error_class.clone(),
        error: a.error.clone(),
        assigned_at_ms: a.assigned_at,
        started_at_ms: a.started_at.unwrap_or(0),
        finished_at_ms: a.finished_at.unwrap_or(0),
        output_tail: a.output_tail.clone(),
        result_json: a.result.clone().unwrap_or_default(),
    }
}

pub fn summary(run: &RunRow, counts: &StateCounts) -> pb::RunSummary {
    pb::RunSummary {
        id: run.id.clone(),
        workstream: run.workstream.clone(),
        state: run.state.clone(),
        created_at_ms: run.created_at,
        finished_at_ms: run.finished_at.unwrap_or(0),
        progress: Some(progress(run, counts)),
        reason: run.reason.clone(),
    }
}

pub fn progress(run: &RunRow, counts: &StateCounts) -> pb::Progress {
    let total: u32 = counts.values().sum();
    let done: u32 = counts
        .iter()
        .filter(|(s, _)| s.parse::<StepState>().is_ok_and(StepState::is_terminal))
        .map(|(_, n)| n)
        .sum();
    let start = run.started_at.unwrap_or(run.created_at);
    let end = run.finished_at.unwrap_or_else(now_ms);
    pb::Progress {
        total,
        done,
        steps_by_state: counts.clone(),
        percent: if total == 0 { 0.0 } else { f64::from(done) * 100.0 / f64::from(total) },
        elapsed_ms: (end - start).max(0),
        eta_ms: if run.finished_at.is_some() { 0 } else { -1 },
    }
}

/// A run's parameters as shown: secret ones masked.
pub fn shown_params(json: &str) -> std::collections::BTreeMap<String, String> {
    let params: std::collections::BTreeMap<String, String> = serde_json::from_str(json).unwrap_or_default();
    params.into_iter().map(|(k, v)| (k, crate::secrets::shown(&v))).collect()
}

pub fn event(e: &EventRow) -> pb::RunEvent {
    pb::RunEvent {
        run_id: e.run_id.clone(),
        seq: e.seq,
        at_ms: e.at,
        kind: e.kind.clone(),
        step_id: e.step_id.clone(),
        attempt_id: e.attempt_id.clone(),
        run_state: e.run_state.clone(),
        step_state: e.step_state.clone(),
        attempt_state: e.attempt_state.clone(),
        message: e.message.clone(),
        progress: None,
        epoch: e.epoch,
        actor: e.actor.clone(),
    }
}
