//! The scheduler: a pure model of all run state ([`model`]) driven by one task
//! ([`driver`]) that owns the channels, the commit pipeline and the sending.
//!
//! For each batch of messages the driver applies them to the model, commits the
//! resulting row changes and events in one transaction, and only then performs the
//! effects (messages to agents, replies to callers, events to watchers). So nothing is
//! dispatched or acknowledged that is not durable, and the store alone rebuilds the
//! engine after a crash. docs/architecture.md walks one step through it.

mod admission;
mod agents;
mod approvals;
mod breakers;
mod budgets;
mod dispatch;
mod driver;
mod fanout;
mod model;
mod pipeline;
mod progress;
mod queue;
mod run_keys;
mod runs;
#[cfg(test)]
mod sim;
mod state;
pub use state::budget_of;
#[cfg(test)]
mod testkit;

pub use admission::{Admitted, Rerun, Submission};
pub use approvals::Decision;
pub use breakers::BreakerConfig;
pub(crate) use progress::percent;
pub(crate) use state::dependents_of;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use baton_common::pb;
use baton_common::state::RunState;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{EventRow, Store, StoreError};
use model::{Answer, Input};
use state::AgentTx;

/// Timing knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// How often an agent that holds no work sends one; `None`: four heartbeat
    /// intervals, at most a third of `lost_after` (see [`EngineConfig::idle_heartbeat`]).
    pub idle_heartbeat_interval: Option<Duration>,
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
    /// The routing rules in force, shared with the submit path and reloads; the engine
    /// reads them only to place steps stored before placements were.
    pub router: crate::router::Rules,
    /// Seals secrets and secret run parameters; without it the controller keeps none.
    pub secrets: Option<Arc<crate::secrets::SecretBox>>,
    /// Env variables whose names match these patterns have their values masked.
    pub redact_env: Vec<String>,
    /// Assign a step ahead of time to the agent that runs all its unfinished
    /// dependencies, to start there when they succeed (see `pipeline`).
    pub pipeline: bool,
    /// Whether this controller keeps artifacts (then an isolated aider attempt's patch
    /// is kept as one).
    pub keeps_artifacts: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_interval: Duration::from_secs(2),
            idle_heartbeat_interval: None,
            stop_after: Duration::from_secs(10),
            lost_after: Duration::from_secs(15),
            failover_grace: Duration::from_secs(30),
            kill_grace: Duration::from_secs(10),
            max_batch: 1024,
            poison_after: 3,
            breakers: BreakerConfig::default(),
            max_output_bytes: 8 * 1024 * 1024,
            router: crate::router::Rules::default(),
            secrets: None,
            redact_env: baton_common::redact::DEFAULT_ENV_PATTERNS.iter().map(|p| p.to_string()).collect(),
            pipeline: true,
            keeps_artifacts: false,
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
        if let Some(idle) = self.idle_heartbeat_interval
            && (idle < self.heartbeat_interval || idle * 2 > self.lost_after)
        {
            return Err(format!(
                "--idle-heartbeat-interval ({}) must be at least --heartbeat-interval ({}) and at most half of --lost-after ({}): an idle agent must not count as lost",
                f(idle),
                f(self.heartbeat_interval),
                f(self.lost_after)
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

    /// How often an agent that holds no work sends a heartbeat: as set, else four
    /// heartbeat intervals but at most a third of `lost_after`, never less than one.
    pub fn idle_heartbeat(&self) -> Duration {
        self.idle_heartbeat_interval
            .unwrap_or_else(|| (self.heartbeat_interval * 4).min(self.lost_after / 3))
            .max(self.heartbeat_interval)
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
    /// An agent, step or breaker the call names does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the controller is shutting down")]
    Unavailable,
    #[error("{0}")]
    Denied(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A message into the engine: an input for the model, where its answer goes, and
/// for a new agent stream its sending half. The driver fills in the input's reply
/// number and session number.
pub(crate) struct Msg {
    input: model::Input,
    answer: Option<oneshot::Sender<model::Answer>>,
    stream: Option<AgentTx>,
}

/// An answer of a kind the call does not give: a bug.
fn unexpected(a: model::Answer) -> EngineError {
    EngineError::Invalid(format!("internal: unexpected answer {a:?}"))
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
    /// Slots of the agents that take work, and how many of them are in use.
    pub slots_total: u32,
    pub slots_used: u32,
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
    async fn send(&self, msg: Msg) -> Result<(), EngineError> {
        self.tx.send(msg).await.map_err(|_| EngineError::Unavailable)
    }

    /// Applies `input` and waits for its answer.
    async fn ask(&self, input: Input) -> Result<Answer, EngineError> {
        let (answer, rx) = oneshot::channel();
        self.send(Msg { input, answer: Some(answer), stream: None }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Starts a run of a validated workstream for `actor`; returns its id once it is
    /// durable.
    /// A submit with a `request_id` seen before answers with the run it created.
    pub async fn submit(&self, run: Admitted, actor: String) -> Result<String, EngineError> {
        match self.ask(Input::Submit { run: Box::new(run), actor, reply: 0 }).await? {
            Answer::Run(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Approves or rejects an approval step for `actor`.
    pub async fn decide(
        &self,
        run_id: String,
        step_id: String,
        decision: Decision,
        actor: String,
    ) -> Result<RunState, EngineError> {
        match self.ask(Input::Decide { run_id, step_id, decision, actor, reply: 0 }).await? {
            Answer::RunState(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Cancels a run, or one step of it when `step_id` is given.
    pub async fn cancel(
        &self,
        run_id: String,
        step_id: Option<String>,
        reason: String,
        actor: String,
    ) -> Result<RunState, EngineError> {
        match self.ask(Input::Cancel { run_id, step_id, reason, actor, reply: 0 }).await? {
            Answer::RunState(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Resumes a quarantined run; `budget` (millionths of a dollar, tokens) raises its
    /// budget where given.
    pub async fn release(
        &self,
        run_id: String,
        budget: (Option<i64>, Option<i64>),
        actor: String,
    ) -> Result<RunState, EngineError> {
        match self.ask(Input::Release { run_id, budget, actor, reply: 0 }).await? {
            Answer::RunState(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Runs a failed or canceled run again in place (see `RetryRun`); `stored` is the
    /// run as the store holds it. Returns the sequence number of its `run_retried` event.
    pub async fn retry(
        &self,
        run_id: String,
        stored: crate::store::Snapshot,
        actor: String,
    ) -> Result<i64, EngineError> {
        match self.ask(Input::Retry { run_id, stored: Box::new(stored), actor, reply: 0 }).await? {
            Answer::Retried(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Forgets cached results (see `PurgeCache`); returns how many it held.
    pub async fn purge_cache(&self, workstream: String, key_prefix: String) -> Result<u32, EngineError> {
        match self.ask(Input::PurgeCache { workstream, key_prefix, reply: 0 }).await? {
            Answer::Count(n) => Ok(n),
            a => Err(unexpected(a)),
        }
    }

    /// The breakers, from the engine's memory (may be a moment ahead of the store).
    pub async fn list_breakers(&self) -> Result<Vec<pb::Breaker>, EngineError> {
        match self.ask(Input::ListBreakers { reply: 0 }).await? {
            Answer::Breakers(r) => r,
            a => Err(unexpected(a)),
        }
    }

    pub async fn reset_breaker(
        &self,
        tool: String,
        agent: String,
        actor: String,
    ) -> Result<Vec<pb::Breaker>, EngineError> {
        match self.ask(Input::ResetBreaker { tool, agent, actor, reply: 0 }).await? {
            Answer::Breakers(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Stops (or resumes) new assignments to the agent with this name or id.
    pub async fn drain(&self, agent: String, undo: bool, actor: String) -> Result<pb::Agent, EngineError> {
        match self.ask(Input::Drain { agent, undo, actor, reply: 0 }).await? {
            Answer::Agent(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// Wait reasons and progress of an active run; `None` once it has ended. From the
    /// engine's memory: may be a moment ahead of the store.
    pub async fn live(&self, run_id: String) -> Result<Option<Live>, EngineError> {
        match self.ask(Input::Live { run_id, reply: 0 }).await? {
            Answer::Live(l) => Ok(l),
            a => Err(unexpected(a)),
        }
    }

    pub async fn gauges(&self) -> Result<Gauges, EngineError> {
        match self.ask(Input::Gauges { reply: 0 }).await? {
            Answer::Gauges(g) => Ok(g),
            a => Err(unexpected(a)),
        }
    }

    /// Registers an agent session; the engine sends Welcome on `tx`.
    pub(crate) async fn connect(
        &self,
        hello: pb::Hello,
        tx: AgentTx,
        binding: Binding,
    ) -> Result<u64, EngineError> {
        let (answer, rx) = oneshot::channel();
        let input = Input::Connect { hello, session: 0, binding, reply: 0 };
        self.send(Msg { input, answer: Some(answer), stream: Some(tx) }).await?;
        match rx.await.map_err(|_| EngineError::Unavailable)? {
            Answer::Session(r) => r,
            a => Err(unexpected(a)),
        }
    }

    /// A message of session `session`; ignored once another session replaced it.
    pub(crate) async fn agent_message(
        &self,
        agent_id: String,
        session: u64,
        msg: pb::agent_message::Msg,
    ) -> bool {
        let input = Input::Agent { agent_id, session, msg };
        self.send(Msg { input, answer: None, stream: None }).await.is_ok()
    }

    /// Tells the engine a secret's new value (`None`: deleted), after it is stored.
    pub async fn set_secret(&self, name: String, value: Option<String>) -> Result<(), EngineError> {
        self.ask(Input::SetSecret { name, value, reply: 0 }).await.map(|_| ())
    }

    /// Closes the sessions of the agents named `name`; returns how many were open.
    pub async fn revoke(&self, name: String, actor: String) -> Result<u32, EngineError> {
        match self.ask(Input::Revoke { name, actor, reply: 0 }).await? {
            Answer::Count(n) => Ok(n),
            a => Err(unexpected(a)),
        }
    }

    pub(crate) async fn disconnect(&self, agent_id: String, session: u64) {
        let input = Input::Disconnect { agent_id, session };
        let _ = self.send(Msg { input, answer: None, stream: None }).await;
    }

    /// The agents, from the engine's memory (may be a moment ahead of the store).
    pub async fn list_agents(&self) -> Result<Vec<pb::Agent>, EngineError> {
        match self.ask(Input::ListAgents { reply: 0 }).await? {
            Answer::Agents(l) => Ok(l),
            a => Err(unexpected(a)),
        }
    }

    /// Committed events of all runs, as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }
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
    let mut model = model::Model::new(cfg, metrics.clone(), secrets, rand::random());
    model.load(snapshot, &estimates, baton_common::time::now_us())?;
    let (tx, rx) = mpsc::channel(4096);
    let handle = EngineHandle { tx, events: events.clone() };
    let driver = driver::Driver::new(model, store, logs, events, metrics, fence);
    let task = tokio::spawn(driver.run(rx, shutdown));
    Ok((handle, task))
}
