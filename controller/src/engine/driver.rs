//! The engine's driver: the one task around the [`Model`]. It turns messages into
//! inputs with the time, decides when to commit (group commit, with one commit in
//! flight while the next gathers), writes commits with retries, and performs the
//! effects the model returns: sends on agent streams, replies, output chunks, events.
//! It makes no scheduling decision of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_common::pb;
use baton_common::time::{now_ms, now_us};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::model::{Answer, Commit, Effect, Input, Model, ReplyTo};
use super::state::AgentTx;
use super::{Msg, Published};
use crate::store::{Batch, Store, StoreError};

/// Longest a commit with nothing urgent in it (no effects, or only acks and queue
/// top-ups for busy agents) waits to be joined by others.
const QUIET_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// A large commit may start while another is in flight: its statement is prepared
/// while the other is written, and it is written right after. Smaller ones wait and
/// grow, since every commit pays a sync.
const PIPELINE_ROWS: usize = 64;

/// A commit being written; the model's commit comes back with its batch.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Batch, StoreError>>,
    /// Resolves once this commit is stored (dropped if it fails): the next commit
    /// writes only after it.
    stored: Option<oneshot::Receiver<()>>,
    commit: Commit,
    started: Instant,
}

pub(super) struct Driver {
    model: Model,
    store: Store,
    logs: crate::logs::Logs,
    events: broadcast::Sender<Arc<Published>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Leadership proof checked by every commit (Postgres); `None` with SQLite.
    fence: Option<crate::store::Fence>,
    /// Open agent streams by session number.
    sessions: HashMap<u64, AgentTx>,
    next_session: u64,
    /// Callers waiting for an answer.
    replies: HashMap<ReplyTo, oneshot::Sender<Answer>>,
    next_reply: ReplyTo,
}

impl Driver {
    pub fn new(
        model: Model,
        store: Store,
        logs: crate::logs::Logs,
        events: broadcast::Sender<Arc<Published>>,
        metrics: Arc<crate::metrics::Metrics>,
        fence: Option<crate::store::Fence>,
    ) -> Driver {
        Driver {
            model,
            store,
            logs,
            events,
            metrics,
            fence,
            sessions: HashMap::new(),
            next_session: 1,
            replies: HashMap::new(),
            next_reply: 1,
        }
    }

    fn apply(&mut self, input: Input) {
        let effects = self.model.apply(input, now_us());
        self.perform(effects);
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                // A closed session drops the message: the agent re-syncs on Hello.
                Effect::Send { session, msg } => {
                    if let Some(tx) = self.sessions.get(&session) {
                        let _ = tx.send(Ok(pb::ControllerMessage { msg: Some(msg) }));
                    }
                }
                // Dropping the sender ends the stream.
                Effect::Close { session } => {
                    self.sessions.remove(&session);
                }
                Effect::Reply { to, answer } => {
                    if let Some(reply) = self.replies.remove(&to) {
                        let _ = reply.send(answer);
                    }
                }
                Effect::Output(chunk) => self.logs.push(chunk),
                Effect::Publish(p) => {
                    let _ = self.events.send(p);
                }
            }
        }
    }

    /// The model's input for a message: its reply and session numbered, its answer
    /// channel and stream registered.
    fn input(&mut self, msg: Msg) -> Input {
        let Msg { mut input, answer, stream } = msg;
        if let Some(answer) = answer
            && let Some(reply) = input.reply_mut()
        {
            *reply = self.next_reply;
            self.replies.insert(self.next_reply, answer);
            self.next_reply += 1;
        }
        if let (Input::Connect { session, .. }, Some(tx)) = (&mut input, stream) {
            *session = self.next_session;
            self.sessions.insert(self.next_session, tx);
            self.next_session += 1;
        }
        input
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        // Repairs found while loading are committed before anything else happens.
        self.apply(Input::Tick);
        self.flush().await?;
        let cfg = &self.model.cfg;
        let sweep_every = (cfg.lost_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let max_batch = cfg.max_batch;
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(max_batch);
        let mut work = Vec::with_capacity(max_batch);
        // When the uncommitted changes began, if they are waiting for company.
        let mut waiting_since: Option<Instant> = None;
        // The commits being written, oldest first: one, or two when the second is
        // large (see PIPELINE_ROWS). While they are, the next one gathers: group
        // commit without the engine standing still.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        loop {
            let mut sleep_for = self
                .model
                .next_timer()
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            if let Some(since) = waiting_since {
                sleep_for = sleep_for.min(QUIET_COMMIT_DELAY.saturating_sub(since.elapsed()));
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = async {
                    match in_flight.front_mut() {
                        Some(f) => (&mut f.task).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(f) = in_flight.pop_front() {
                        self.finish_commit(f, r)?;
                    }
                }
                n = rx.recv_many(&mut buf, max_batch) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = sweep.tick() => self.apply(Input::Sweep),
                _ = tokio::time::sleep(sleep_for) => {}
            }
            std::mem::swap(&mut buf, &mut work);
            for msg in work.drain(..) {
                let input = self.input(msg);
                self.apply(input);
            }
            self.apply(Input::Tick);
            // Changes that tell nobody anything (an attempt's start, say) may wait a
            // moment to share a commit with what comes next; anything with an effect is
            // committed at once, with whatever waited.
            if !self.model.has_pending()
                || in_flight.len() > 1
                || (!in_flight.is_empty() && self.model.pending_rows() < PIPELINE_ROWS)
            {
                continue;
            }
            if !self.model.pending_urgent() {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() < QUIET_COMMIT_DELAY {
                    continue;
                }
            }
            waiting_since = None;
            let after = in_flight.back_mut().and_then(|f| f.stored.take());
            in_flight.extend(self.start_commit(after));
        }
        while let Some(mut f) = in_flight.pop_front() {
            let r = (&mut f.task).await;
            self.finish_commit(f, r)?;
        }
        // What waited for company is not lost on a clean stop.
        self.flush().await?;
        debug!("engine stopped");
        Ok(())
    }

    /// Commits what is pending, then performs its effects (used where nothing else may
    /// happen meanwhile: at start and at a clean stop).
    async fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(mut f) = self.start_commit(None) {
            let r = (&mut f.task).await;
            self.finish_commit(f, r)?;
        }
        Ok(())
    }

    /// Takes the model's pending commit and starts writing it in the background (with
    /// retries), after `after` (the commit before, if still in flight); its effects
    /// wait until it is durable.
    fn start_commit(&mut self, after: Option<oneshot::Receiver<()>>) -> Option<InFlight> {
        let mut commit = self.model.take_commit()?;
        // An attempt's output is stored before its end is: whoever sees the result
        // finds all the output the agent sent before it.
        let output = commit.ends_attempts().then(|| self.logs.flushed());
        let mut batch = std::mem::take(&mut commit.batch);
        let epoch = self.fence.as_ref().map(|f| f.epoch).unwrap_or(0);
        for e in &mut batch.events {
            e.epoch = epoch;
        }
        let batch = Arc::new(batch);
        let store = self.store.clone();
        let fence = self.fence.clone();
        let (stored_tx, stored) = oneshot::channel();
        let task = tokio::spawn(async move {
            if let Some(output) = output {
                output.await;
            }
            let mut delay = Duration::from_millis(50);
            let mut tries = 0u32;
            let mut after = Some(async move {
                match after {
                    Some(rx) => rx.await.is_ok(),
                    None => true,
                }
            });
            // A database that refuses writes (a full disk, a lost connection) is waited
            // out: nothing that needs a commit happens meanwhile (no dispatch, no
            // acknowledgement), the API says why, and the engine goes on once a commit
            // succeeds. Only losing the leadership ends it.
            loop {
                let r = match after.take() {
                    Some(a) => store.commit_after(batch.clone(), fence.as_ref(), a).await,
                    None => store.commit(batch.clone(), fence.as_ref()).await,
                };
                let Err(e) = r else { break };
                tries += 1;
                if matches!(e, StoreError::Aborted) {
                    return Err(e);
                }
                if matches!(e, StoreError::Fenced(_)) {
                    error!(error = %e, "another controller leads now; this engine stops without writing");
                    return Err(e);
                }
                if tries == 1 || tries.is_power_of_two() {
                    error!(error = %e, tries, retry_in = %baton_common::time::format_duration(delay), "the database refuses the engine's commit; retrying until it accepts it");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            if tries > 0 {
                tracing::info!(tries, "the database accepts commits again; resuming");
            }
            let _ = stored_tx.send(());
            // The writer has let go of its reference by now; a copy only if not.
            Ok(Arc::try_unwrap(batch).unwrap_or_else(|b| (*b).clone()))
        });
        Some(InFlight { task, stored: Some(stored), commit, started: Instant::now() })
    }

    /// A commit is written: the model releases its effects.
    fn finish_commit(
        &mut self,
        f: InFlight,
        result: Result<Result<Batch, StoreError>, tokio::task::JoinError>,
    ) -> Result<(), StoreError> {
        let batch = result.map_err(|e| StoreError::Corrupt(format!("commit task: {e}")))??;
        let m = &self.metrics;
        m.commit_seconds.observe(&[], f.started.elapsed().as_secs_f64());
        let rows = batch.rows();
        if rows > 0 {
            m.commit_batch.observe(&[], rows as f64);
        }
        m.events.add(&[], batch.events.len() as f64);
        let mut commit = f.commit;
        commit.batch = batch;
        let effects = self.model.apply(Input::Committed(commit), now_us());
        if rows >= RELEASE_AFTER_ROWS {
            release_free_memory();
        }
        self.perform(effects);
        Ok(())
    }
}

/// Rows of a commit (a big submit) after which the memory it took is handed back.
const RELEASE_AFTER_ROWS: usize = 10_000;

/// Hands the allocator's free memory back to the system. A big submit's request, rows
/// and statements take several times what its run keeps; glibc would hold on to that
/// peak for the rest of the process's life. Done before the commit's replies, so that a
/// submit returns with the controller at the size it keeps.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
