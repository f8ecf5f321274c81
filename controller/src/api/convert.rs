//! Store rows to API messages.

use std::collections::HashMap;

use baton_common::outcome::FailureClass;
use baton_common::pb;
use baton_common::proto::{self, timestamp, timestamp_opt};
use baton_common::state::{AttemptState, RunState, StepState};
use baton_common::time::now_ms;

use crate::store::{AttemptRow, EventRow, RunRecord, RunRow, StateCounts};

/// The protos' value of a stored state name (unspecified for one that is not known,
/// which the store never holds).
fn state<S: std::str::FromStr>(name: &str, to_pb: impl Fn(S) -> i32) -> i32 {
    name.parse::<S>().map_or(0, to_pb)
}

/// The API's view of a stored run; `summary` leaves out each step's needs.
pub fn run(rec: RunRecord, summary: bool) -> pb::Run {
    let mut attempts: HashMap<String, Vec<pb::Attempt>> = HashMap::new();
    for a in &rec.attempts {
        attempts.entry(a.step_id.clone()).or_default().push(attempt(a));
    }
    let mut files: HashMap<String, Vec<pb::ArtifactInfo>> = HashMap::new();
    for a in &rec.artifacts {
        files.entry(a.step_id.clone()).or_default().push(super::artifacts::info(a));
    }
    let mut counts = StateCounts::new();
    let steps = rec
        .steps
        .iter()
        .map(|s| {
            *counts.entry(s.state.clone()).or_default() += 1;
            pb::Step {
                id: s.step_id.clone(),
                state: state(&s.state, StepState::to_pb),
                tool: s.tool.clone(),
                needs: if summary { Vec::new() } else { serde_json::from_str(&s.needs).unwrap_or_default() },
                attempt_count: s.attempts as u32,
                reason: s.reason.clone(),
                started_at: timestamp_opt(s.started_at),
                finished_at: timestamp_opt(s.finished_at),
                next_attempt_at: timestamp_opt(s.next_attempt_at),
                result: proto::value_of_text(s.result.as_deref()),
                attempts: attempts.remove(&s.step_id).unwrap_or_default(),
                kind: s.kind.clone(),
                artifacts: files.remove(&s.step_id).unwrap_or_default(),
                cost_usd: s.cost_micros as f64 / 1e6,
                tokens: s.tokens.max(0) as u64,
            }
        })
        .collect();
    let progress = progress(&rec.run, &counts);
    pb::Run {
        id: rec.run.id.clone(),
        workstream: rec.run.workstream.clone(),
        state: state(&rec.run.state, RunState::to_pb),
        reason: rec.run.reason.clone(),
        created_at: Some(timestamp(rec.run.created_at)),
        started_at: timestamp_opt(rec.run.started_at),
        finished_at: timestamp_opt(rec.run.finished_at),
        steps,
        progress: Some(progress),
        last_seq: rec.last_seq,
        params: Some(proto::structure(
            shown_params(&rec.run.params)
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        )),
        name: rec.run.name.clone(),
        labels: labels(&rec.run.labels),
        rerun_of: rec.run.rerun_of.clone(),
        reruns: rec.reruns.clone(),
        priority: rec.run.priority(),
        cost_usd: rec.run.cost_micros as f64 / 1e6,
        tokens: rec.run.tokens.max(0) as u64,
        budget: budget(&rec.run)
            .map(|b| pb::Budget { max_cost_usd: b.max_cost_usd, max_tokens: b.max_tokens }),
    }
}

/// A stored run's budget: its spec's, as raised by releases.
pub fn budget(run: &RunRow) -> Option<baton_common::spec::Budget> {
    /// The spec's `budget:` alone (the rest of a big spec is skipped, not built).
    #[derive(serde::Deserialize)]
    struct Only {
        #[serde(default)]
        budget: Option<baton_common::spec::Budget>,
    }
    let spec = if run.spec.contains("\"budget\"") {
        serde_json::from_str::<Only>(&run.spec).ok().and_then(|o| o.budget)
    } else {
        None
    };
    crate::engine::budget_of(spec, run.budget_micros, run.budget_tokens)
}

pub fn attempt(a: &AttemptRow) -> pb::Attempt {
    pb::Attempt {
        id: a.id.clone(),
        number: a.number as u32,
        agent_id: a.agent_id.clone(),
        agent_name: a.agent_name.clone(),
        state: state(&a.state, AttemptState::to_pb),
        exit_code: a.exit_code.map(|c| c as i32),
        failure_class: state(&a.error_class, FailureClass::to_pb),
        error: a.error.clone(),
        assigned_at: Some(timestamp(a.assigned_at)),
        started_at: timestamp_opt(a.started_at),
        finished_at: timestamp_opt(a.finished_at),
        output_tail: a.output_tail.clone(),
        result: proto::value_of_text(a.result.as_deref()),
        after: serde_json::from_str(&a.follows).unwrap_or_default(),
    }
}

pub fn summary(run: &RunRow, counts: &StateCounts) -> pb::RunSummary {
    pb::RunSummary {
        id: run.id.clone(),
        workstream: run.workstream.clone(),
        state: state(&run.state, RunState::to_pb),
        created_at: Some(timestamp(run.created_at)),
        finished_at: timestamp_opt(run.finished_at),
        progress: Some(progress(run, counts)),
        reason: run.reason.clone(),
        name: run.name.clone(),
        labels: labels(&run.labels),
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
        percent: crate::engine::percent(done, total),
        elapsed: Some(proto::duration(end - start)),
        eta: run.finished_at.map(|_| proto::duration(0)),
    }
}

/// A run's parameters as shown: secret ones masked.
pub fn shown_params(json: &str) -> std::collections::BTreeMap<String, String> {
    let params: std::collections::BTreeMap<String, String> = serde_json::from_str(json).unwrap_or_default();
    params.into_iter().map(|(k, v)| (k, crate::secrets::shown(&v))).collect()
}

/// Stored labels (a JSON object of strings).
pub fn labels(json: &str) -> HashMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// An event with its run's progress right after it (counts by state are only known to
/// the engine, for events it publishes).
pub fn event(e: &EventRow) -> pb::RunEvent {
    let (done, total) = (e.steps_done as u32, e.steps_total as u32);
    pb::RunEvent {
        run_id: e.run_id.clone(),
        seq: e.seq,
        at: Some(timestamp(e.at)),
        kind: e.kind.clone(),
        step_id: e.step_id.clone(),
        attempt_id: e.attempt_id.clone(),
        run_state: state(&e.run_state, RunState::to_pb),
        step_state: state(&e.step_state, StepState::to_pb),
        attempt_state: state(&e.attempt_state, AttemptState::to_pb),
        message: e.message.clone(),
        progress: Some(pb::Progress {
            total,
            done,
            percent: crate::engine::percent(done, total),
            ..Default::default()
        }),
        epoch: e.epoch,
        actor: e.actor.clone(),
    }
}
