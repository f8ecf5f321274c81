//! Streaming attempt output to clients, optionally following it live.

use std::collections::HashMap;

use baton_common::pb;
use baton_common::state::{AttemptState, RunState, StepState};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::api::ApiError;
use crate::logs::FOLLOW_POLL;
use crate::store::{AttemptRow, Store, StoreError};

/// One GetLogs request being served.
pub struct Follow {
    pub store: Store,
    pub run_id: String,
    /// Empty for every step.
    pub step_id: String,
    /// 0 for the latest attempt of each step.
    pub attempt: u32,
    pub follow: bool,
    /// The first chunk to send of the one attempt asked for.
    pub from_seq: i64,
}

impl Follow {
    pub async fn run(
        self,
        mut live: broadcast::Receiver<String>,
        tx: mpsc::Sender<Result<pb::LogChunk, Status>>,
        shutdown: CancellationToken,
    ) {
        // Next chunk to send, per attempt.
        let mut next: HashMap<String, i64> = HashMap::new();
        let mut last_round = false;
        loop {
            let (targets, done) = match self.targets().await {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            for a in &targets {
                let from = next.entry(a.id.clone()).or_insert(self.from_seq);
                loop {
                    let rows = match self.store.output(&a.id, *from).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    let n = rows.len();
                    for r in rows {
                        *from = r.seq + 1;
                        let chunk = pb::LogChunk {
                            step_id: a.step_id.clone(),
                            attempt: a.number as u32,
                            data: r.data,
                            seq: r.seq,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    if n < 1000 {
                        break;
                    }
                }
            }
            if !self.follow || last_round {
                return;
            }
            // Once the subject has ended, one more look catches output that was still
            // on its way to the store.
            last_round = done;
            tokio::select! {
                // Not the end of the output: a follower must be told to come back.
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(ApiError::unavailable("the controller is shutting down").into())).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                r = live.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
            }
        }
    }

    /// The attempts whose output is asked for, in the order they ran, and whether what
    /// is followed has ended.
    async fn targets(&self) -> Result<(Vec<AttemptRow>, bool), StoreError> {
        let rec = self.store.get_run(&self.run_id).await?;
        let run_done = rec.run.state.parse::<RunState>().is_ok_and(RunState::is_terminal);
        let mut latest: HashMap<&str, &AttemptRow> = HashMap::new();
        let mut chosen: Vec<AttemptRow> = Vec::new();
        for a in &rec.attempts {
            if !self.step_id.is_empty() && a.step_id != self.step_id {
                continue;
            }
            if self.attempt > 0 {
                if a.number == i64::from(self.attempt) {
                    chosen.push(a.clone());
                }
            } else if latest.get(a.step_id.as_str()).is_none_or(|b| b.number < a.number) {
                latest.insert(&a.step_id, a);
            }
        }
        chosen.extend(latest.into_values().cloned());
        chosen.sort_by_key(|a| (a.assigned_at, a.number));
        let done = if self.step_id.is_empty() {
            run_done
        } else if self.attempt > 0 {
            run_done
                || chosen.iter().all(|a| a.state.parse::<AttemptState>().is_ok_and(AttemptState::is_terminal))
        } else {
            run_done
                || rec.steps.iter().any(|s| {
                    s.step_id == self.step_id
                        && s.state.parse::<StepState>().is_ok_and(StepState::is_terminal)
                })
        };
        Ok((chosen, done))
    }
}
