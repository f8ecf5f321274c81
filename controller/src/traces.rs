//! OpenTelemetry spans of runs, steps and attempts, made from the events the leader
//! commits (see [`baton_common::trace`] for how their ids are chosen) and sent over
//! OTLP. Lossy by design: a span whose start this controller did not see (it took over
//! mid-run) starts at the first event it saw; a burst it cannot keep up with is
//! dropped with a warning, never slowing the engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_common::state::{AttemptState, RunState, StepState};
use baton_common::trace::{self, Exporter, KeyValue, SpanRecord};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::leader::{Leadership, Role};
use crate::store::EventRow;

/// Follows the leader's events while this controller leads, until `stop`; then sends
/// what is queued.
pub async fn follow(mut leadership: Leadership, exporter: Arc<Exporter>, stop: CancellationToken) {
    loop {
        match leadership.role() {
            Role::Leader { engine, term } => {
                let mut rx = engine.subscribe();
                let mut spans = Spans::default();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = term.cancelled() => break,
                        r = rx.recv() => match r {
                            Ok(p) => spans.event(&exporter, &p.event),
                            Err(RecvError::Lagged(n)) => warn!(events = n, "traces: fell behind the engine; spans of those events are incomplete"),
                            Err(RecvError::Closed) => break,
                        },
                    }
                }
            }
            Role::Standby { .. } => {}
        }
        if stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = leadership.changed() => if !changed { break },
        }
    }
    let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
}

/// When an open span started, by its span id.
#[derive(Default)]
struct Spans {
    open: HashMap<[u8; 8], SystemTime>,
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

impl Spans {
    fn event(&mut self, exporter: &Exporter, ev: &EventRow) {
        let Some(trace) = trace::trace_id(&ev.run_id) else { return };
        let at = time(ev.at);
        let run = trace::run_span(&ev.run_id);
        let mut ids = vec![KeyValue::new("baton.run_id", ev.run_id.clone())];
        self.open.entry(run).or_insert(at);
        if !ev.step_id.is_empty() {
            ids.push(KeyValue::new("baton.step_id", ev.step_id.clone()));
            let step = trace::step_span(&ev.run_id, &ev.step_id);
            let state: Option<StepState> = ev.step_state.parse().ok();
            if state == Some(StepState::Running) {
                self.open.entry(step).or_insert(at);
            }
            if !ev.attempt_id.is_empty() {
                let attempt = trace::attempt_span(&ev.attempt_id);
                self.open.entry(attempt).or_insert(at);
                let a: Option<AttemptState> = ev.attempt_state.parse().ok();
                if a.is_some_and(AttemptState::is_terminal) {
                    let mut attrs = ids.clone();
                    attrs.push(KeyValue::new("baton.attempt_id", ev.attempt_id.clone()));
                    attrs.push(KeyValue::new("baton.attempt.state", ev.attempt_state.clone()));
                    let failed = a != Some(AttemptState::Succeeded);
                    self.end(
                        exporter,
                        "attempt",
                        trace,
                        attempt,
                        Some(step),
                        at,
                        attrs,
                        failed.then(|| ev.message.clone()),
                    );
                }
            }
            if state.is_some_and(StepState::is_terminal) && self.open.contains_key(&step) {
                let mut attrs = ids.clone();
                attrs.push(KeyValue::new("baton.step.state", ev.step_state.clone()));
                let failed = state == Some(StepState::Failed);
                self.end(
                    exporter,
                    "step",
                    trace,
                    step,
                    Some(run),
                    at,
                    attrs,
                    failed.then(|| ev.message.clone()),
                );
            }
        }
        let state: Option<RunState> = ev.run_state.parse().ok();
        if ev.kind.starts_with("run_") && state.is_some_and(RunState::is_terminal) {
            ids.push(KeyValue::new("baton.run.state", ev.run_state.clone()));
            let failed = state != Some(RunState::Succeeded);
            self.end(exporter, "run", trace, run, None, at, ids, failed.then(|| ev.message.clone()));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn end(
        &mut self,
        exporter: &Exporter,
        name: &str,
        trace: [u8; 16],
        span: [u8; 8],
        parent: Option<[u8; 8]>,
        end: SystemTime,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        let start = self.open.remove(&span).unwrap_or(end);
        exporter.span(SpanRecord {
            name: name.to_string(),
            trace,
            span,
            parent,
            start,
            end,
            attributes,
            error,
        });
    }
}
