//! A workstream's `concurrency:`: at most `limit` active runs hold the same rendered
//! key. A run submitted when every slot of its key is held waits `pending` (on_conflict
//! `queue`, oldest first), is canceled (`cancel_new`), or cancels the oldest holder
//! (`cancel_old`). A run waiting for its key is stored as such (`runs.queued`), so a
//! restart rebuilds the same queues.

use std::collections::{BTreeSet, VecDeque};

use baton_common::spec::OnConflict;
use baton_common::state::StepState;
use baton_common::template::{self, Ref};
use serde_json::Value;
use tracing::info;

use super::EngineError;
use super::model::Model;

/// The runs that hold one key and those waiting for it.
#[derive(Debug, Default)]
pub(crate) struct RunKey {
    pub holders: BTreeSet<String>,
    pub waiting: VecDeque<String>,
}

/// What a run submitted now does about its key.
pub(super) enum Admission {
    /// It holds its key (or has none).
    Go,
    /// It waits for the key (reason).
    Queue(String),
    /// It is canceled (reason).
    Cancel(String),
    /// It holds the key in place of this run, which is canceled (reason).
    Supersede(String, String),
}

/// A workstream's key rendered with the run's params.
pub(super) fn render_key(
    spec: &baton_common::spec::Workstream,
    params: &std::collections::BTreeMap<String, String>,
) -> Result<Option<String>, EngineError> {
    let Some(c) = &spec.concurrency else { return Ok(None) };
    let lookup = |r: &Ref| match r {
        Ref::Param(p) if spec.secret_params.contains(p) => {
            Err(format!("{r} is a secret param; a key is shown in reasons"))
        }
        Ref::Param(p) => params.get(p).map(|v| Value::String(v.clone())).ok_or(format!("{r} is not set")),
        _ => Err(format!("{r}: a run's key may read params only")),
    };
    template::render_text(&c.key, &lookup)
        .map(Some)
        .map_err(|e| EngineError::Invalid(format!("concurrency.key: {e}")))
}

impl Model {
    /// Decides what run `run_id` (about to be submitted, with `key`) does.
    pub(super) fn admit_key(
        &mut self,
        run_id: &str,
        spec: &baton_common::spec::Workstream,
        key: &str,
    ) -> Admission {
        let Some(c) = &spec.concurrency else { return Admission::Go };
        let entry = self.run_keys.entry(key.to_string()).or_default();
        if entry.holders.len() < c.limit as usize {
            entry.holders.insert(run_id.to_string());
            return Admission::Go;
        }
        let by: Vec<String> = entry.holders.iter().take(3).cloned().collect();
        let by = by.join(", ");
        let busy = format!("concurrency key {key}: {}/{} in use by run {by}", entry.holders.len(), c.limit);
        match c.on_conflict {
            OnConflict::Queue => {
                entry.waiting.push_back(run_id.to_string());
                Admission::Queue(format!("waiting: {busy}"))
            }
            OnConflict::CancelNew => Admission::Cancel(format!("{busy} (on_conflict: cancel_new)")),
            OnConflict::CancelOld => {
                let runs = &self.runs;
                let oldest = entry
                    .holders
                    .iter()
                    .min_by_key(|id| runs.get(id.as_str()).map_or(i64::MAX, |r| r.created_at))
                    .cloned();
                match oldest {
                    Some(old) => {
                        entry.holders.remove(&old);
                        entry.holders.insert(run_id.to_string());
                        let why = format!(
                            "superseded by run {run_id} (concurrency key {key}, on_conflict: cancel_old)"
                        );
                        Admission::Supersede(old, why)
                    }
                    None => Admission::Go,
                }
            }
        }
    }

    /// Run `run_id` has ended: it lets go of its key, and the runs waiting for the key
    /// start, oldest first, while slots are free.
    pub(super) fn release_run_key(&mut self, run_id: &str) {
        let Some(key) = self.runs.get(run_id).and_then(|r| r.key.clone()) else { return };
        let Some(entry) = self.run_keys.get_mut(&key) else { return };
        entry.holders.remove(run_id);
        entry.waiting.retain(|id| id != run_id);
        self.admit_waiting(&key);
    }

    /// Starts the runs waiting for `key` while it has free slots.
    pub(super) fn admit_waiting(&mut self, key: &str) {
        loop {
            let Some(entry) = self.run_keys.get_mut(key) else { return };
            let Some(next) = entry.waiting.front().cloned() else { break };
            let run = self.runs.get(&next).filter(|r| !r.state.is_terminal());
            let limit = run.and_then(|r| r.spec.concurrency.as_ref()).map_or(1, |c| c.limit);
            if run.is_some() && entry.holders.len() >= limit as usize {
                break;
            }
            entry.waiting.pop_front();
            if run.is_none() {
                continue;
            }
            entry.holders.insert(next.clone());
            let Some(run) = self.runs.get_mut(&next) else { continue };
            run.queued = false;
            run.reason.clear();
            let p = &mut self.pending;
            p.runs.insert(next.clone());
            p.event(run, "run_admitted", None, None, format!("concurrency key {key} is free"));
            info!(run_id = %next, key, "run admitted");
            let ready: Vec<usize> =
                (0..run.steps.len()).filter(|&i| run.steps[i].state == StepState::Ready).collect();
            for idx in ready {
                self.enqueue(&next, idx);
            }
        }
        if self.run_keys.get(key).is_some_and(|e| e.holders.is_empty() && e.waiting.is_empty()) {
            self.run_keys.remove(key);
        }
    }

    /// After a load (before the runs resume): the runs that were waiting for their
    /// keys wait again, oldest first; the other active runs hold theirs.
    pub(super) fn rebuild_run_keys(&mut self) {
        let mut keyed: Vec<(i64, String, String, bool)> = Vec::new();
        for run in self.runs.values_mut() {
            if run.spec.concurrency.is_none() || run.state.is_terminal() {
                continue;
            }
            let Ok(Some(key)) = render_key(&run.spec, &run.params) else { continue };
            run.key = Some(key.clone());
            keyed.push((run.created_at, run.id.clone(), key, run.queued));
        }
        keyed.sort();
        for (_, id, key, queued) in keyed {
            let entry = self.run_keys.entry(key).or_default();
            if queued {
                entry.waiting.push_back(id);
            } else {
                entry.holders.insert(id);
            }
        }
    }
}
