//! The scheduler: one task that owns all run state and is driven by messages.
//!
//! For each batch of messages the engine applies them to its in-memory state, commits
//! the resulting row changes and events in one transaction, and only then performs the
//! effects (messages to agents, replies to callers, events to watchers). So nothing is
//! dispatched or acknowledged that is not durable, and the store alone rebuilds the
//! engine after a crash.

mod agents;
mod breakers;
mod dispatch;
mod model;
mod progress;
mod runs;

pub use breakers::BreakerConfig;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use baton_common::pb;
use baton_common::spec::{OnFailure, Workstream};
use baton_common::state::{AttemptState, RunState, StepState};
use baton_common::time::now_ms;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::store::{Batch, EventRow, Snapshot, Store, StoreError};
use model::{Agent, AgentState, AgentTx, Attempt, Run, Step};

/// Longest a commit with nothing urgent in it (no effects, or only acks and queue
/// top-ups for busy agents) waits to be joined by others.
const QUIET_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// A large batch may start committing while another commit is in flight: its statement
/// is prepared while the other is written, and it is written right after. Smaller
/// batches wait and grow, since every commit pays a sync.
const PIPELINE_ROWS: usize = 64;

/// Timing knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// An agent that has had no answer to its heartbeats for this long stops its tools
    /// by itself (self-fencing), so a step re-assigned elsewhere never runs twice.
    pub stop_after: Duration,
    /// An agent not heard from for this long is lost, and its attempts with it; at
    /// least `stop_after` plus [`FENCE_SLACK`], so its tools are dead by then.
    pub lost_after: Duration,
    /// After a start, how long agents get to reconnect before they count as lost.
    pub failover_grace: Duration,
    /// Time between SIGTERM and SIGKILL when a tool is stopped; the controller also
    /// waits this long past an attempt's timeout before it gives up on the agent.
    pub kill_grace: Duration,
    /// Most messages applied in one transaction.
    pub max_batch: usize,
    /// A step whose attempts were lost this many times in a row (it keeps killing
    /// agents) quarantines its run.
    pub poison_after: u32,
    pub breakers: BreakerConfig,
    /// Output kept per attempt; the rest is cut with a marker.
    pub max_output_bytes: u64,
    /// Routing rules at start (replaced by reloads).
    pub router: crate::router::Router,
    /// Seals secrets and secret run parameters; without it the controller keeps none.
    pub secrets: Option<Arc<crate::secrets::SecretBox>>,
    /// Env variables whose names match these patterns have their values masked.
    pub redact_env: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_interval: Duration::from_secs(2),
            stop_after: Duration::from_secs(10),
            lost_after: Duration::from_secs(15),
            failover_grace: Duration::from_secs(30),
            kill_grace: Duration::from_secs(10),
            max_batch: 1024,
            poison_after: 3,
            breakers: BreakerConfig::default(),
            max_output_bytes: 8 * 1024 * 1024,
            router: crate::router::Router::default(),
            secrets: None,
            redact_env: baton_common::redact::DEFAULT_ENV_PATTERNS.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// Between an agent's self-fencing deadline (`stop_after`) plus its fence grace and
/// the controller declaring the agent lost: room for the SIGKILL to land and for the
/// two machines' timers to fire late.
pub const FENCE_SLACK: Duration = Duration::from_millis(500);

impl EngineConfig {
    /// Refuses timer settings under which a step could run in two places at once, or
    /// that cannot work: `2 × heartbeat ≤ stop_after`, `stop_after + FENCE_SLACK <
    /// lost_after < failover_grace`.
    pub fn check(&self) -> Result<(), String> {
        let f = baton_common::time::format_duration;
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.stop_after {
            return Err(format!(
                "--stop-after ({}) must be at least twice --heartbeat-interval ({}): one late answer must not stop an agent's tools",
                f(self.stop_after),
                f(self.heartbeat_interval)
            ));
        }
        if self.stop_after + FENCE_SLACK >= self.lost_after {
            return Err(format!(
                "--lost-after ({}) must be longer than --stop-after ({}) plus {}: a cut-off agent must have stopped its tools before their steps are retried elsewhere",
                f(self.lost_after),
                f(self.stop_after),
                f(FENCE_SLACK)
            ));
        }
        if self.failover_grace <= self.lost_after {
            return Err(format!(
                "--failover-grace ({}) must be longer than --lost-after ({})",
                f(self.failover_grace),
                f(self.lost_after)
            ));
        }
        Ok(())
    }

    /// What an agent that stops its tools for lack of a controller gives them between
    /// SIGTERM and SIGKILL: the kill grace, cut to what fits before `lost_after`.
    pub fn fence_grace(&self) -> Duration {
        self.kill_grace.min(self.lost_after.saturating_sub(self.stop_after + FENCE_SLACK))
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("run {0:?} not found")]
    RunNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the controller is shutting down")]
    Unavailable,
    #[error("{0}")]
    Denied(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// A message into the engine.
pub(crate) enum Msg {
    Submit {
        spec: Workstream,
        params: BTreeMap<String, String>,
        request_id: String,
        estimates: crate::store::Estimates,
        actor: String,
        reply: Reply<String>,
    },
    Cancel {
        run_id: String,
        step_id: Option<String>,
        reason: String,
        actor: String,
        reply: Reply<RunState>,
    },
    Release {
        run_id: String,
        actor: String,
        reply: Reply<RunState>,
    },
    ListBreakers {
        reply: oneshot::Sender<Vec<pb::Breaker>>,
    },
    ResetBreaker {
        tool: String,
        agent: String,
        actor: String,
        reply: Reply<Vec<pb::Breaker>>,
    },
    Live {
        run_id: String,
        reply: oneshot::Sender<Option<Live>>,
    },
    Gauges {
        reply: oneshot::Sender<Gauges>,
    },
    SetRouter {
        router: crate::router::Router,
        reply: oneshot::Sender<()>,
    },
    Drain {
        agent: String,
        undo: bool,
        actor: String,
        reply: Reply<pb::Agent>,
    },
    Connect {
        hello: pb::Hello,
        tx: AgentTx,
        binding: Binding,
        reply: Reply<u64>,
    },
    Agent {
        agent_id: String,
        session: u64,
        msg: pb::agent_message::Msg,
    },
    Revoke {
        name: String,
        actor: String,
        reply: oneshot::Sender<u32>,
    },
    /// A secret was stored (`Some`) or deleted (`None`).
    SetSecret {
        name: String,
        value: Option<String>,
        reply: oneshot::Sender<()>,
    },
    Disconnect {
        agent_id: String,
        session: u64,
    },
    ListAgents {
        reply: oneshot::Sender<Vec<pb::Agent>>,
    },
}

/// What an agent's identity lets it connect as.
#[derive(Debug, Clone, Default)]
pub struct Binding {
    /// An authenticated agent: its name must not be connected under another id.
    pub strict: bool,
    /// Its credential was issued for its id (an enrolled agent). Otherwise (a
    /// certificate names only the agent) an id known under another name is refused.
    pub id_proven: bool,
    /// Labels its enrollment gave it; they override the ones it announces.
    pub labels: BTreeMap<String, String>,
}

/// What the engine knows of an active run beyond its rows.
#[derive(Debug, Clone)]
pub struct Live {
    /// Why each open step is not running (or not done) yet.
    pub reasons: HashMap<String, String>,
    pub progress: pb::Progress,
}

/// Counts of in-memory state, for metrics.
#[derive(Debug, Default)]
pub struct Gauges {
    pub steps: BTreeMap<String, u32>,
    pub agents: BTreeMap<String, u32>,
    pub breakers: BTreeMap<String, u32>,
}

/// A committed event, with its run's progress at the end of its batch.
#[derive(Debug)]
pub struct Published {
    pub event: EventRow,
    pub progress: Option<Arc<pb::Progress>>,
}

/// The handle the API uses to talk to the engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<Arc<Published>>,
}

impl EngineHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Starts a run of a validated workstream for `actor`; returns its id once it is
    /// durable.
    /// A submit with a `request_id` seen before answers with the run it created.
    pub async fn submit(
        &self,
        spec: Workstream,
        params: BTreeMap<String, String>,
        request_id: String,
        estimates: crate::store::Estimates,
        actor: String,
    ) -> Result<String, EngineError> {
        self.call(|reply| Msg::Submit { spec, params, request_id, estimates, actor, reply }).await
    }

    /// Cancels a run, or one step of it when `step_id` is given.
    pub async fn cancel(
        &self,
        run_id: String,
        step_id: Option<String>,
        reason: String,
        actor: String,
    ) -> Result<RunState, EngineError> {
        self.call(|reply| Msg::Cancel { run_id, step_id, reason, actor, reply }).await
    }

    pub async fn release(&self, run_id: String, actor: String) -> Result<RunState, EngineError> {
        self.call(|reply| Msg::Release { run_id, actor, reply }).await
    }

    pub async fn list_breakers(&self) -> Result<Vec<pb::Breaker>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::ListBreakers { reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    pub async fn reset_breaker(
        &self,
        tool: String,
        agent: String,
        actor: String,
    ) -> Result<Vec<pb::Breaker>, EngineError> {
        self.call(|reply| Msg::ResetBreaker { tool, agent, actor, reply }).await
    }

    /// Replaces the routing rules; steps not yet dispatched follow the new ones.
    pub async fn set_router(&self, router: crate::router::Router) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::SetRouter { router, reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Stops (or resumes) new assignments to the agent with this name or id.
    pub async fn drain(&self, agent: String, undo: bool, actor: String) -> Result<pb::Agent, EngineError> {
        self.call(|reply| Msg::Drain { agent, undo, actor, reply }).await
    }

    /// Wait reasons and progress of an active run; `None` once it has ended.
    pub async fn live(&self, run_id: String) -> Result<Option<Live>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Live { run_id, reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    pub async fn gauges(&self) -> Result<Gauges, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Gauges { reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Registers an agent session; the engine sends Welcome on `tx`.
    pub(crate) async fn connect(
        &self,
        hello: pb::Hello,
        tx: AgentTx,
        binding: Binding,
    ) -> Result<u64, EngineError> {
        self.call(|reply| Msg::Connect { hello, tx, binding, reply }).await
    }

    /// A message of session `session`; ignored once another session replaced it.
    pub(crate) async fn agent_message(
        &self,
        agent_id: String,
        session: u64,
        msg: pb::agent_message::Msg,
    ) -> bool {
        self.tx.send(Msg::Agent { agent_id, session, msg }).await.is_ok()
    }

    /// Tells the engine a secret's new value (`None`: deleted), after it is stored.
    pub async fn set_secret(&self, name: String, value: Option<String>) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::SetSecret { name, value, reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Closes the sessions of the agents named `name`; returns how many were open.
    pub async fn revoke(&self, name: String, actor: String) -> Result<u32, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Revoke { name, actor, reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    pub(crate) async fn disconnect(&self, agent_id: String, session: u64) {
        let _ = self.tx.send(Msg::Disconnect { agent_id, session }).await;
    }

    pub async fn list_agents(&self) -> Result<Vec<pb::Agent>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::ListAgents { reply }).await.map_err(|_| EngineError::Unavailable)?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Committed events of all runs, as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }
}

/// A batch being committed, with what to do once it is durable.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Batch, StoreError>>,
    /// Resolves once this commit is stored (dropped if it fails): the next commit
    /// writes only after it.
    stored: Option<oneshot::Receiver<()>>,
    effects: Vec<Effect>,
    finished_runs: Vec<String>,
    started: std::time::Instant,
}

/// Something to do once the current batch is durable.
enum Effect {
    Send(AgentTx, Box<pb::ControllerMessage>),
    Reply(Box<dyn FnOnce() + Send>),
}

/// Changes made while handling the current batch, not yet committed.
#[derive(Default)]
struct Pending {
    runs: HashSet<String>,
    steps: HashSet<(String, usize)>,
    attempts: HashSet<String>,
    agents: HashSet<String>,
    breakers: HashSet<breakers::BreakerKey>,
    events: Vec<EventRow>,
    effects: Vec<Effect>,
    finished_runs: Vec<String>,
    /// Some effect must not wait for company (a reply, work for an idle slot).
    urgent: bool,
    /// Who caused the message being handled (an API call's caller), stamped on its
    /// events.
    actor: String,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.steps.is_empty()
            && self.attempts.is_empty()
            && self.agents.is_empty()
            && self.breakers.is_empty()
            && self.events.is_empty()
            && self.effects.is_empty()
    }

    /// Rows the batch will write.
    fn rows(&self) -> usize {
        self.runs.len()
            + self.steps.len()
            + self.attempts.len()
            + self.agents.len()
            + self.breakers.len()
            + self.events.len()
    }

    fn send(&mut self, tx: &AgentTx, msg: pb::controller_message::Msg) {
        use pb::controller_message::Msg as M;
        // Acks and pongs can wait a moment; what makes or stops work cannot.
        self.urgent |= !matches!(msg, M::Ack(_) | M::Pong(_));
        self.effects.push(Effect::Send(tx.clone(), Box::new(pb::ControllerMessage { msg: Some(msg) })));
    }

    /// An assignment that only tops up an agent's queue (it is busy anyway).
    fn send_prefetch(&mut self, tx: &AgentTx, msg: pb::controller_message::Msg) {
        self.effects.push(Effect::Send(tx.clone(), Box::new(pb::ControllerMessage { msg: Some(msg) })));
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: Result<T, EngineError>) {
        self.urgent = true;
        self.effects.push(Effect::Reply(Box::new(move || {
            let _ = reply.send(value);
        })));
    }

    /// Appends an event to `run`'s log, stamped with the current run, step and attempt
    /// states.
    fn event(
        &mut self,
        run: &mut Run,
        kind: &str,
        step: Option<usize>,
        attempt: Option<&Attempt>,
        message: impl Into<String>,
    ) {
        let seq = run.next_seq;
        run.next_seq += 1;
        self.events.push(EventRow {
            run_id: run.id.clone(),
            seq,
            at: now_ms(),
            kind: kind.to_string(),
            step_id: step.map(|i| run.step_id(i).to_string()).unwrap_or_default(),
            attempt_id: attempt.map(|a| a.id.clone()).unwrap_or_default(),
            run_state: run.state.as_str().to_string(),
            step_state: step.map(|i| run.steps[i].state.as_str().to_string()).unwrap_or_default(),
            attempt_state: attempt.map(|a| a.state.as_str().to_string()).unwrap_or_default(),
            message: message.into(),
            epoch: 0,
            actor: self.actor.clone(),
        });
    }
}

/// Moving averages of an agent's recent attempts with one tool.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    success: f64,
    latency_ms: f64,
    samples: u64,
}

/// Timed work, fired when its time has come if it still applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A step in `retry_wait` becomes ready.
    Retry(String, usize),
    /// An attempt past its deadline plus grace times out.
    Deadline(String),
    /// A run reaches its deadline.
    RunDeadline(String),
    /// An open breaker's cooldown ends: (tool, agent id).
    Breaker(String, String),
}

/// A bounded map that forgets its oldest entries: final states of attempts of runs
/// that are no longer in memory (a result re-sent after the run ended is still
/// recognised as a duplicate), and the runs that submits' request ids created.
struct Recent<V> {
    states: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Recent<V> {
    const CAP: usize = 100_000;

    fn new() -> Recent<V> {
        Recent { states: HashMap::new(), order: VecDeque::new() }
    }

    fn insert(&mut self, id: String, state: V) {
        if self.states.insert(id.clone(), state).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.states.remove(&old);
            }
        }
    }
}

pub(crate) struct Engine {
    cfg: EngineConfig,
    store: Store,
    logs: crate::logs::Logs,
    runs: HashMap<String, Run>,
    /// Every attempt of every run in `runs`.
    attempts: HashMap<String, Attempt>,
    recent: Recent<AttemptState>,
    /// Request id → run id, for the runs in memory and the latest ones before them
    /// (older ones are found in the store before a submit reaches the engine).
    requests: Recent<String>,
    agents: HashMap<String, Agent>,
    breakers: HashMap<breakers::BreakerKey, baton_common::breaker::Breaker>,
    router: crate::router::Router,
    /// Per round-robin rule, the name of the agent it last picked.
    round_robin: HashMap<usize, String>,
    /// Recent outcomes per (agent id, tool), for the `auto` strategy.
    stats: HashMap<(String, String), Stats>,
    /// Ready steps per tool, in the order they became ready.
    ready: BTreeMap<String, VecDeque<(String, usize)>>,
    timers: BinaryHeap<Reverse<(i64, Timer)>>,
    pending: Pending,
    events: broadcast::Sender<Arc<Published>>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Leadership proof checked by every commit (Postgres); `None` with SQLite.
    fence: Option<crate::store::Fence>,
    next_session: u64,
    /// The secrets, opened: specs use them as `${{ secrets.NAME }}`, and their values
    /// are masked in what the engine keeps.
    secrets: HashMap<String, String>,
    /// Bumped on every change of `secrets` (runs' cached redactors are rebuilt).
    secrets_version: u64,
}

/// Loads the engine's state from the store and starts its task. The task ends when
/// `shutdown` is cancelled, or with an error when the store fails for good.
pub async fn start(
    store: Store,
    cfg: EngineConfig,
    logs: crate::logs::Logs,
    metrics: Arc<crate::metrics::Metrics>,
    fence: Option<crate::store::Fence>,
    shutdown: CancellationToken,
) -> Result<(EngineHandle, tokio::task::JoinHandle<Result<(), StoreError>>), StoreError> {
    let snapshot = store.load_active().await?;
    let mut secrets = HashMap::new();
    for row in store.secrets().await? {
        let Some(sealer) = &cfg.secrets else {
            return Err(StoreError::Corrupt(format!(
                "the database holds secrets ({:?}, ...) but the controller has no --secrets-key",
                row.name
            )));
        };
        let value =
            sealer.open(&crate::secrets::secret_aad(&row.name), &row.sealed).map_err(StoreError::Corrupt)?;
        secrets.insert(row.name, value);
    }
    let mut estimates = HashMap::new();
    for r in &snapshot.runs {
        if !estimates.contains_key(&r.workstream) {
            estimates.insert(r.workstream.clone(), store.duration_estimates(&r.workstream).await?);
        }
    }
    let (events, _) = broadcast::channel(16_384);
    let initial_router = cfg.router.clone();
    let mut engine = Engine {
        cfg,
        store,
        logs,
        metrics,
        fence,
        runs: HashMap::new(),
        attempts: HashMap::new(),
        recent: Recent::new(),
        requests: Recent::new(),
        agents: HashMap::new(),
        breakers: HashMap::new(),
        router: initial_router,
        round_robin: HashMap::new(),
        stats: HashMap::new(),
        ready: BTreeMap::new(),
        timers: BinaryHeap::new(),
        pending: Pending::default(),
        events: events.clone(),
        next_session: 1,
        secrets,
        secrets_version: 0,
    };
    engine.load(snapshot, &estimates)?;
    let (tx, rx) = mpsc::channel(4096);
    let handle = EngineHandle { tx, events };
    let task = tokio::spawn(engine.run(rx, shutdown));
    Ok((handle, task))
}

impl Engine {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        // Repairs found while loading are committed before anything else happens.
        self.dispatch();
        self.flush().await?;
        let sweep_every = (self.cfg.lost_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(self.cfg.max_batch);
        // When the uncommitted changes began, if they are waiting for company.
        let mut waiting_since: Option<std::time::Instant> = None;
        // The batches being committed, oldest first: one, or two when the second is
        // large (see PIPELINE_ROWS). While they are, the next one gathers: group
        // commit without the engine standing still.
        let mut in_flight: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let mut sleep_for = next_timer
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
                        self.finish_commit(f.effects, f.finished_runs, f.started, r)?;
                    }
                }
                n = rx.recv_many(&mut buf, self.cfg.max_batch) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = sweep.tick() => {
                    self.sweep_agents();
                    self.check_max_wait(now_ms());
                }
                _ = tokio::time::sleep(sleep_for) => {}
            }
            for msg in buf.drain(..) {
                self.handle(msg);
                self.pending.actor.clear();
            }
            self.fire_timers();
            self.dispatch();
            // Changes that tell nobody anything (an attempt's start, say) may wait a
            // moment to share a commit with what comes next; anything with an effect is
            // committed at once, with whatever waited.
            if self.pending.is_empty()
                || in_flight.len() > 1
                || (!in_flight.is_empty() && self.pending.rows() < PIPELINE_ROWS)
            {
                continue;
            }
            let quiet = !self.pending.urgent && self.pending.finished_runs.is_empty();
            if quiet {
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < QUIET_COMMIT_DELAY {
                    continue;
                }
            }
            waiting_since = None;
            let after = in_flight.back_mut().and_then(|f| f.stored.take());
            in_flight.extend(self.start_commit(after));
        }
        while let Some(f) = in_flight.pop_front() {
            let r = f.task.await;
            self.finish_commit(f.effects, f.finished_runs, f.started, r)?;
        }
        // What waited for company is not lost on a clean stop.
        self.flush().await?;
        debug!("engine stopped");
        Ok(())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { spec, params, request_id, estimates, actor, reply } => {
                self.pending.actor = actor;
                let result = match self.requests.states.get(&request_id) {
                    // The same request again (a client retrying): its run, answered
                    // after this batch's commit like the first answer.
                    Some(run_id) if !request_id.is_empty() => Ok(run_id.clone()),
                    _ => self.submit(spec, params, request_id, &estimates),
                };
                self.pending.reply(reply, result);
            }
            Msg::Cancel { run_id, step_id, reason, actor, reply } => {
                self.pending.actor = actor;
                let result = match step_id {
                    Some(step) => self.cancel_step(&run_id, &step, &reason),
                    None => self.cancel_run(&run_id, &reason),
                };
                self.pending.reply(reply, result);
            }
            Msg::Release { run_id, actor, reply } => {
                self.pending.actor = actor;
                let result = self.release(&run_id);
                self.pending.reply(reply, result);
            }
            Msg::ListBreakers { reply } => {
                let _ = reply.send(self.list_breakers());
            }
            Msg::ResetBreaker { tool, agent, actor, reply } => {
                self.pending.actor = actor;
                let result = self.reset_breaker(&tool, &agent);
                self.pending.reply(reply, result);
            }
            Msg::Live { run_id, reply } => {
                let reasons = self.wait_reasons(&run_id);
                let live = self
                    .runs
                    .get_mut(&run_id)
                    .map(|run| Live { reasons, progress: run.progress(&self.attempts, now_ms()) });
                let _ = reply.send(live);
            }
            Msg::Gauges { reply } => {
                let _ = reply.send(self.gauges());
            }
            Msg::SetRouter { router, reply } => {
                tracing::info!(rules = router.rules.len(), "router rules replaced");
                self.router = router;
                self.round_robin.clear();
                let _ = reply.send(());
            }
            Msg::Drain { agent, undo, actor, reply } => {
                self.pending.actor = actor;
                let result = self.drain(&agent, undo);
                self.pending.reply(reply, result);
            }
            Msg::Connect { hello, tx, binding, reply } => {
                let result = self.connect(hello, tx, binding);
                self.pending.reply(reply, result);
            }
            Msg::Agent { agent_id, session, msg } => self.agent_message(&agent_id, session, msg),
            Msg::Revoke { name, actor, reply } => {
                self.pending.actor = actor;
                let _ = reply.send(self.revoke(&name));
            }
            Msg::SetSecret { name, value, reply } => {
                match value {
                    Some(v) => self.secrets.insert(name, v),
                    None => self.secrets.remove(&name),
                };
                self.secrets_version += 1;
                let _ = reply.send(());
            }
            Msg::Disconnect { agent_id, session } => self.disconnect(&agent_id, session),
            Msg::ListAgents { reply } => {
                let mut list: Vec<pb::Agent> = self.agents.values().map(Agent::to_pb).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                let _ = reply.send(list);
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timer))) = self.timers.pop() else {
                break;
            };
            match timer {
                Timer::Retry(run_id, idx) => self.retry_due(&run_id, idx, now),
                Timer::Deadline(attempt_id) => self.deadline_due(&attempt_id, now),
                Timer::RunDeadline(run_id) => self.run_deadline_due(&run_id, now),
                Timer::Breaker(tool, agent_id) => self.breaker_due((tool, agent_id), now),
            }
        }
    }

    /// Commits what the current batch changed, then performs its effects (used where
    /// nothing else may happen meanwhile: at start and at a clean stop).
    async fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(f) = self.start_commit(None) {
            let r = f.task.await;
            self.finish_commit(f.effects, f.finished_runs, f.started, r)?;
        }
        Ok(())
    }

    /// Takes the pending changes and starts committing them in the background (with
    /// retries), written after `after` (the commit before, if still in flight); their
    /// effects wait in the returned handle until the commit is done.
    fn start_commit(&mut self, after: Option<oneshot::Receiver<()>>) -> Option<InFlight> {
        if self.pending.is_empty() {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        let batch = self.build_batch(&pending);
        let store = self.store.clone();
        let fence = self.fence.clone();
        // An attempt's output is stored before its end is: whoever sees the result
        // finds all the output the agent sent before it.
        let output = batch.attempts.iter().any(|a| a.finished_at.is_some()).then(|| self.logs.flushed());
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
                    Some(a) => store.commit_after(&batch, fence.as_ref(), a).await,
                    None => store.commit(&batch, fence.as_ref()).await,
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
                    error!(error = %e, tries, retry_in = ?delay, "the database refuses the engine's commit; retrying until it accepts it");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            if tries > 0 {
                tracing::info!(tries, "the database accepts commits again; resuming");
            }
            let _ = stored_tx.send(());
            Ok(batch)
        });
        Some(InFlight {
            task,
            stored: Some(stored),
            effects: pending.effects,
            finished_runs: pending.finished_runs,
            started: std::time::Instant::now(),
        })
    }

    /// A commit is done: now its effects happen, watchers hear of its events, and runs
    /// it finished are forgotten.
    fn finish_commit(
        &mut self,
        effects: Vec<Effect>,
        finished_runs: Vec<String>,
        started: std::time::Instant,
        result: Result<Result<Batch, StoreError>, tokio::task::JoinError>,
    ) -> Result<(), StoreError> {
        let batch = result.map_err(|e| StoreError::Corrupt(format!("commit task: {e}")))??;
        let m = &self.metrics;
        m.commit_seconds.observe(&[], started.elapsed().as_secs_f64());
        let rows = batch.rows();
        if rows > 0 {
            m.commit_batch.observe(&[], rows as f64);
        }
        m.events.add(&[], batch.events.len() as f64);
        let now = now_ms();
        for row in batch.attempts.iter().filter(|r| r.state == "assigned") {
            if let Some(a) = self.attempts.get_mut(&row.id) {
                a.sent_at.get_or_insert(now);
            }
        }
        for effect in effects {
            match effect {
                // A closed session just drops the message: the agent re-syncs on Hello.
                Effect::Send(tx, msg) => {
                    let _ = tx.send(Ok(*msg));
                }
                Effect::Reply(f) => f(),
            }
        }
        // One progress per run of the batch, shared by its events.
        let now = now_ms();
        let mut progress: HashMap<String, Arc<pb::Progress>> = HashMap::new();
        for event in batch.events {
            let p = match progress.get(&event.run_id) {
                Some(p) => Some(p.clone()),
                None => self.runs.get_mut(&event.run_id).map(|run| {
                    let p = Arc::new(run.progress(&self.attempts, now));
                    progress.insert(event.run_id.clone(), p.clone());
                    p
                }),
            };
            let _ = self.events.send(Arc::new(Published { event, progress: p }));
        }
        for run_id in finished_runs {
            self.evict(&run_id);
        }
        Ok(())
    }

    fn build_batch(&self, p: &Pending) -> Batch {
        let mut b = Batch::default();
        for id in &p.runs {
            if let Some(run) = self.runs.get(id) {
                b.runs.push(run.to_row());
            }
        }
        // Steps and attempts reference their run, so the run rows go first.
        for (run_id, idx) in &p.steps {
            if let Some(run) = self.runs.get(run_id) {
                b.steps.push(run.step_row(*idx));
            }
        }
        for id in &p.attempts {
            if let Some(a) = self.attempts.get(id) {
                b.attempts.push(a.to_row());
            }
        }
        for id in &p.agents {
            if let Some(a) = self.agents.get(id) {
                b.agents.push(a.to_row());
            }
        }
        for key in &p.breakers {
            if let Some(row) = self.breaker_row(key) {
                b.breakers.push(row);
            }
        }
        let epoch = self.fence.as_ref().map(|f| f.epoch).unwrap_or(0);
        b.events = p.events.iter().map(|e| EventRow { epoch, ..e.clone() }).collect();
        b
    }

    /// Forgets a final run; the store keeps it.
    fn evict(&mut self, run_id: &str) {
        if let Some(run) = self.runs.remove(run_id) {
            for step in &run.steps {
                for id in &step.attempt_ids {
                    if let Some(a) = self.attempts.remove(id) {
                        self.recent.insert(a.id, a.state);
                    }
                }
            }
        }
    }

    fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for run in self.runs.values() {
            for s in &run.steps {
                *g.steps.entry(s.state.as_str().to_string()).or_default() += 1;
            }
        }
        for a in self.agents.values() {
            *g.agents.entry(a.state.as_str().to_string()).or_default() += 1;
        }
        for b in self.breakers.values() {
            *g.breakers.entry(b.state.as_str().to_string()).or_default() += 1;
        }
        g
    }

    /// A run's parameters as stored, with the sealed ones opened. One that cannot be
    /// opened (another key) is left out, so a step that needs it fails saying so.
    fn open_params(&self, run_id: &str, json: &str) -> BTreeMap<String, String> {
        let mut params: BTreeMap<String, String> = serde_json::from_str(json).unwrap_or_default();
        params.retain(|name, value| {
            if !value.starts_with(crate::secrets::SEALED) {
                return true;
            }
            let opened = self
                .cfg
                .secrets
                .as_ref()
                .ok_or_else(|| "the controller has no --secrets-key".to_string())
                .and_then(|s| s.open(&crate::secrets::param_aad(run_id, name), value));
            match opened {
                Ok(v) => {
                    *value = v;
                    true
                }
                Err(e) => {
                    error!(run_id, param = %name, error = %e, "cannot open a secret parameter");
                    false
                }
            }
        });
        params
    }

    /// What to mask for `run_id`: every secret and the run's secret parameters, plus
    /// `extra` values (an attempt's own); `None` when there is nothing.
    pub(super) fn redactor(
        &mut self,
        run_id: &str,
        extra: &[String],
    ) -> Option<Arc<baton_common::redact::Redactor>> {
        let version = self.secrets_version;
        let run = self.runs.get_mut(run_id)?;
        let secret_params: Vec<&String> =
            run.spec.secret_params.iter().filter_map(|p| run.params.get(p)).collect();
        if self.secrets.is_empty() && secret_params.is_empty() && extra.is_empty() {
            return None;
        }
        let values = || self.secrets.values().chain(secret_params.iter().copied());
        if extra.is_empty() {
            if let Some((v, r)) = &run.redactor
                && *v == version
            {
                return Some(r.clone());
            }
            let r = Arc::new(baton_common::redact::Redactor::new(values()));
            run.redactor = Some((version, r.clone()));
            return Some(r);
        }
        Some(Arc::new(baton_common::redact::Redactor::new(values().chain(extra.iter()))))
    }

    /// Rebuilds in-memory state from the store after a start.
    fn load(
        &mut self,
        snap: Snapshot,
        estimates: &HashMap<String, crate::store::Estimates>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let grace = baton_common::time::ms(self.cfg.failover_grace);
        for row in &snap.agents {
            let state = if row.state == "lost" { AgentState::Lost } else { AgentState::Disconnected };
            let agent = Agent {
                id: row.id.clone(),
                name: row.name.clone(),
                version: row.version.clone(),
                labels: serde_json::from_str(&row.labels).unwrap_or_default(),
                tools: serde_json::from_str(&row.tools).unwrap_or_default(),
                slots: row.slots as u32,
                state,
                session: None,
                connected_at: row.connected_at,
                last_seen: row.last_seen_at,
                // Agents get the failover grace to come back to a restarted controller.
                lost_at: now + grace,
                running: HashSet::new(),
                draining: row.draining,
            };
            self.agents.insert(agent.id.clone(), agent);
        }
        let mut steps_by_run: HashMap<&str, Vec<&crate::store::StepRow>> = HashMap::new();
        for s in &snap.steps {
            steps_by_run.entry(s.run_id.as_str()).or_default().push(s);
        }
        for row in &snap.runs {
            let spec: Workstream = serde_json::from_str(&row.spec)
                .map_err(|e| StoreError::Corrupt(format!("run {}: bad spec: {e}", row.id)))?;
            let rows = steps_by_run.remove(row.id.as_str()).unwrap_or_default();
            if rows.len() != spec.steps.len() {
                return Err(StoreError::Corrupt(format!(
                    "run {} has {} step rows for {} steps",
                    row.id,
                    rows.len(),
                    spec.steps.len()
                )));
            }
            let mut steps = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter().enumerate() {
                if r.idx != i as i64 {
                    return Err(StoreError::Corrupt(format!(
                        "run {} step {} out of order",
                        row.id, r.step_id
                    )));
                }
                steps.push(Step::from_row(r)?);
            }
            let index = spec.index();
            for (i, s) in spec.steps.iter().enumerate() {
                steps[i].waiting_on = s
                    .needs
                    .iter()
                    .filter(|n| {
                        index.get(n.as_str()).is_some_and(|&j| steps[j].state != StepState::Succeeded)
                    })
                    .count() as u32;
            }
            let dependents = model::dependents_of(&spec);
            let deadline_at = spec.deadline_ms.map(|d| row.created_at + d as i64);
            let state: RunState = crate::store::parse_state(&row.state)?;
            let failing = steps
                .iter()
                .zip(&spec.steps)
                .find(|(s, _)| s.state == StepState::Failed)
                .filter(|_| spec.on_failure == OnFailure::Fail && state != RunState::Quarantined)
                .map(|(_, sp)| format!("step {:?} failed", sp.id));
            let open = steps.iter().filter(|s| !s.state.is_terminal()).count();
            let run = Run {
                open,
                id: row.id.clone(),
                spec: Arc::new(spec),
                spec_json: row.spec.clone(),
                params_json: row.params.clone(),
                state,
                reason: row.reason.clone(),
                created_at: row.created_at,
                started_at: row.started_at,
                finished_at: row.finished_at,
                request_id: row.request_id.clone(),
                steps,
                dependents,
                next_seq: snap.last_seq.get(&row.id).copied().unwrap_or(0) + 1,
                failing,
                deadline_at,
                params: self.open_params(&row.id, &row.params),
                templated: Vec::new(),
                topo: Vec::new(),
                estimates: Vec::new(),
                eta: None,
                counts: [0; 8],
                redactor: None,
            };
            let mut run = run;
            run.templated = model::templated_of(&run.spec);
            run.counts = model::counts_of(&run.steps.iter().map(|s| s.state).collect::<Vec<_>>());
            run.topo = progress::topo_order(&model::needs_of(&run.spec));
            let tools: Vec<String> = run.steps.iter().map(|s| s.tool.clone()).collect();
            run.estimates = model::estimates_for(
                &run.spec,
                &tools,
                estimates.get(&row.workstream).unwrap_or(&Default::default()),
            );
            if !run.request_id.is_empty() {
                self.requests.insert(run.request_id.clone(), run.id.clone());
            }
            self.runs.insert(run.id.clone(), run);
        }
        for row in &snap.attempts {
            let Some(run) = self.runs.get_mut(&row.run_id) else {
                continue;
            };
            let Some(idx) = run.spec.steps.iter().position(|s| s.id == row.step_id) else {
                return Err(StoreError::Corrupt(format!(
                    "attempt {} of unknown step {}",
                    row.id, row.step_id
                )));
            };
            let attempt = Attempt::from_row(row, idx)?;
            run.steps[idx].attempt_ids.push(attempt.id.clone());
            if !attempt.state.is_terminal() {
                run.steps[idx].current = Some(attempt.id.clone());
                let agent = self.agents.entry(attempt.agent_id.clone()).or_insert_with(|| Agent {
                    id: attempt.agent_id.clone(),
                    name: attempt.agent_name.clone(),
                    version: String::new(),
                    labels: BTreeMap::new(),
                    tools: Vec::new(),
                    slots: 0,
                    state: AgentState::Disconnected,
                    session: None,
                    connected_at: 0,
                    last_seen: 0,
                    lost_at: now + grace,
                    running: HashSet::new(),
                    draining: false,
                });
                agent.running.insert(attempt.id.clone());
                if let Some(d) = attempt.deadline_at {
                    self.timers.push(Reverse((d, Timer::Deadline(attempt.id.clone()))));
                }
            }
            let step = &mut run.steps[idx];
            step.lost_streak = if attempt.state == AttemptState::Lost { step.lost_streak + 1 } else { 0 };
            self.attempts.insert(attempt.id.clone(), attempt);
        }
        self.load_breakers(&snap.breakers);
        // Attempts still running get what to mask again (it is not stored).
        let live: Vec<(String, String)> = self
            .attempts
            .values()
            .filter(|a| !a.state.is_terminal())
            .map(|a| (a.id.clone(), a.run_id.clone()))
            .collect();
        for (id, run_id) in live {
            let r = self.redactor(&run_id, &[]);
            if let Some(a) = self.attempts.get_mut(&id) {
                a.redactor = r;
            }
        }
        let mut run_ids: Vec<(i64, String)> =
            self.runs.values().map(|r| (r.created_at, r.id.clone())).collect();
        run_ids.sort();
        for (_, run_id) in run_ids {
            self.resume_run(&run_id);
        }
        Ok(())
    }
}
