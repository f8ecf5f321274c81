//! The engine's model: all scheduling state and every decision, with no I/O.
//!
//! The driver feeds it [`Input`]s with the time (`apply`); it answers with the
//! [`Effect`]s to perform at once (pongs, output chunks, reads) and gathers the rest into
//! the pending commit: the rows to write and the messages and replies that may go out
//! only once those rows are durable. The driver takes that commit (`take_commit`),
//! writes it, and hands it back as [`Input::Committed`], which releases its effects. No
//! clock, socket or entropy is touched here: time comes with each input and randomness
//! from a seeded generator, so the same inputs make the same decisions (the simulator
//! relies on that).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use baton_common::spec::{OnFailure, Workstream};
use baton_common::state::{AttemptState, RunState, STEP_STATES, StepState};
use baton_common::{pb, proto};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tracing::error;

use super::admission::Admitted;
use super::breakers;
use super::state::{Agent, AgentState, Attempt, Fixed, IdMap, Run, Step};
use super::{Binding, EngineConfig, EngineError, Gauges, Live, Published};
use crate::store::{Batch, EventRow, Snapshot, StoreError};

/// Names the caller waiting for an answer; the driver maps it to its channel.
pub(crate) type ReplyTo = u64;

/// Something that happened, for the model to decide on.
pub(crate) enum Input {
    Submit {
        run: Box<Admitted>,
        actor: String,
        reply: ReplyTo,
    },
    Cancel {
        run_id: String,
        step_id: Option<String>,
        reason: String,
        actor: String,
        reply: ReplyTo,
    },
    /// Resume a quarantined run, with a new budget (millionths of a dollar, tokens)
    /// where given.
    Release {
        run_id: String,
        budget: (Option<i64>, Option<i64>),
        actor: String,
        reply: ReplyTo,
    },
    /// Approve or reject an approval step.
    Decide {
        run_id: String,
        step_id: String,
        decision: super::approvals::Decision,
        actor: String,
        reply: ReplyTo,
    },
    /// Forget cached results (of a workstream, by key prefix; all when both are empty).
    PurgeCache {
        workstream: String,
        key_prefix: String,
        reply: ReplyTo,
    },
    /// Retry a failed or canceled run, read back from the store (`stored`: its rows,
    /// which the engine uses when it no longer holds the run).
    Retry {
        run_id: String,
        stored: Box<Snapshot>,
        actor: String,
        reply: ReplyTo,
    },
    ResetBreaker {
        tool: String,
        agent: String,
        actor: String,
        reply: ReplyTo,
    },
    Drain {
        agent: String,
        undo: bool,
        actor: String,
        reply: ReplyTo,
    },
    /// A new agent stream, numbered `session` by the driver.
    Connect {
        hello: pb::Hello,
        session: u64,
        binding: Binding,
        reply: ReplyTo,
    },
    Agent {
        agent_id: String,
        session: u64,
        msg: pb::agent_message::Msg,
    },
    Disconnect {
        agent_id: String,
        session: u64,
    },
    Revoke {
        name: String,
        actor: String,
        reply: ReplyTo,
    },
    /// A secret was stored (`Some`) or deleted (`None`).
    SetSecret {
        name: String,
        value: Option<String>,
        reply: ReplyTo,
    },
    ListBreakers {
        reply: ReplyTo,
    },
    Live {
        run_id: String,
        reply: ReplyTo,
    },
    Gauges {
        reply: ReplyTo,
    },
    ListAgents {
        reply: ReplyTo,
    },
    /// Due timers fire and ready steps are dispatched (after each batch of inputs).
    Tick,
    /// Agents whose lease ran out are lost; steps held by breakers past `max_wait`
    /// quarantine their runs.
    Sweep,
    /// A commit from [`Model::take_commit`] is durable.
    Committed(Commit),
}

impl Input {
    /// Where its answer goes, for the inputs that have one.
    pub fn reply_mut(&mut self) -> Option<&mut ReplyTo> {
        use Input::*;
        match self {
            Submit { reply, .. }
            | Cancel { reply, .. }
            | Release { reply, .. }
            | Decide { reply, .. }
            | Retry { reply, .. }
            | PurgeCache { reply, .. }
            | ResetBreaker { reply, .. }
            | Drain { reply, .. }
            | Connect { reply, .. }
            | Revoke { reply, .. }
            | SetSecret { reply, .. }
            | ListBreakers { reply }
            | Live { reply, .. }
            | Gauges { reply }
            | ListAgents { reply } => Some(reply),
            Agent { .. } | Disconnect { .. } | Tick | Sweep | Committed(_) => None,
        }
    }
}

/// An answer to a caller.
#[derive(Debug)]
pub(crate) enum Answer {
    Run(Result<String, EngineError>),
    RunState(Result<RunState, EngineError>),
    /// A retried run: the sequence number of its `run_retried` event.
    Retried(Result<i64, EngineError>),
    Breakers(Result<Vec<pb::Breaker>, EngineError>),
    Agent(Result<pb::Agent, EngineError>),
    Session(Result<u64, EngineError>),
    Agents(Vec<pb::Agent>),
    Live(Option<Live>),
    Gauges(Gauges),
    Count(u32),
    Done,
}

/// Something for the driver to do.
// Most effects are `Send`s (the large variant): boxing its message would add an
// allocation to the common case to save space in the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Effect {
    /// A message on an agent's stream (dropped when the session has closed).
    Send {
        session: u64,
        msg: pb::controller_message::Msg,
    },
    /// Ends an agent's stream: what it sends on it is ignored from now on.
    Close {
        session: u64,
    },
    Reply {
        to: ReplyTo,
        answer: Answer,
    },
    /// A piece (or the end) of an attempt's output, for the log writer.
    Output(crate::logs::Chunk),
    /// A committed event, for watchers.
    Publish(Arc<Published>),
}

/// Rows to write in one transaction, and what may happen once they are durable.
#[derive(Debug)]
pub(crate) struct Commit {
    pub batch: Batch,
    effects: Vec<Effect>,
    finished_runs: Vec<String>,
    /// For each event of the batch, its run's step counts by state right after it.
    event_counts: Vec<[u32; STEP_STATES]>,
}

impl Commit {
    /// Whether it ends attempts, whose output must be stored before it.
    pub fn ends_attempts(&self) -> bool {
        self.batch.attempts.iter().any(|a| a.finished_at.is_some())
    }
}

/// Changes made since the last commit was taken.
#[derive(Default)]
pub(super) struct Pending {
    pub runs: HashSet<String, Fixed>,
    /// Runs (also in `runs`) not written yet, with their specs as JSON.
    pub new_runs: HashMap<String, String, Fixed>,
    /// Runs whose spec grew (a `for_each` step expanded): it is written again.
    pub specs: BTreeSet<String>,
    pub steps: HashSet<(String, usize), Fixed>,
    pub attempts: HashSet<String, Fixed>,
    pub agents: BTreeSet<String>,
    pub breakers: BTreeSet<breakers::BreakerKey>,
    pub events: Vec<EventRow>,
    /// Step counts by state of each event's run right after it (see `Commit`).
    event_counts: Vec<[u32; STEP_STATES]>,
    effects: Vec<Effect>,
    pub finished_runs: Vec<String>,
    /// Some effect must not wait for company (a reply, work for an idle slot).
    urgent: bool,
    /// Who caused the input being applied (an API call's caller), stamped on its
    /// events.
    pub actor: String,
    /// The time of the input being applied (ms since the epoch, and µs for latencies).
    pub now: i64,
    pub now_us: i64,
    /// Illegal transitions refused while applying the input.
    pub violations: Vec<String>,
    /// Cache entries made by steps that succeeded.
    pub cache: Vec<crate::store::CacheRow>,
    /// Artifacts of attempts whose success was accepted.
    pub artifacts: Vec<crate::store::ArtifactRow>,
    /// Steps made ready where the model could not queue them (see `skip_downstream`);
    /// queued before the input is done.
    pub newly_ready: Vec<(String, usize)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.rows() == 0 && self.effects.is_empty()
    }

    /// Rows the commit will write.
    fn rows(&self) -> usize {
        self.runs.len()
            + self.specs.len()
            + self.steps.len()
            + self.attempts.len()
            + self.agents.len()
            + self.breakers.len()
            + self.events.len()
            + self.cache.len()
            + self.artifacts.len()
    }

    /// A message sent once the commit is durable.
    pub fn send(&mut self, session: u64, msg: pb::controller_message::Msg) {
        use pb::controller_message::Msg as M;
        // Acks and pongs can wait a moment; what makes or stops work cannot.
        self.urgent |= !matches!(msg, M::Ack(_) | M::Pong(_));
        self.effects.push(Effect::Send { session, msg });
    }

    /// An assignment that only tops up an agent's queue (it is busy anyway).
    pub fn send_prefetch(&mut self, session: u64, msg: pb::controller_message::Msg) {
        self.effects.push(Effect::Send { session, msg });
    }

    /// An answer given once the commit is durable.
    pub fn reply(&mut self, to: ReplyTo, answer: Answer) {
        self.urgent = true;
        self.effects.push(Effect::Reply { to, answer });
    }

    /// An illegal transition was refused: a bug in the model. It is logged, counted
    /// (`baton_invariant_violations_total`) and kept for tests; the run's events say so.
    pub fn violation(&mut self, run: Option<&mut Run>, step: Option<usize>, what: String) {
        error!(run_id = run.as_ref().map(|r| r.id.as_str()).unwrap_or(""), "invariant violated: {what}");
        if let Some(run) = run {
            self.event(run, "invariant_violated", step, None, what.clone());
        }
        self.violations.push(what);
    }

    /// Appends an event to `run`'s log, stamped with the current run, step and attempt
    /// states.
    pub fn event(
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
            at: self.now,
            kind: kind.to_string(),
            step_id: step.map(|i| run.step_id(i).to_string()).unwrap_or_default(),
            attempt_id: attempt.map(|a| a.id.clone()).unwrap_or_default(),
            run_state: run.state.as_str().to_string(),
            step_state: step.map(|i| run.steps[i].state.as_str().to_string()).unwrap_or_default(),
            attempt_state: attempt.map(|a| a.state.as_str().to_string()).unwrap_or_default(),
            message: message.into(),
            epoch: 0,
            actor: self.actor.clone(),
            steps_done: i64::from(run.done()),
            steps_total: run.steps.len() as i64,
        });
        self.event_counts.push(run.counts);
    }
}

/// Moving averages of an agent's recent attempts with one tool.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Stats {
    pub success: f64,
    pub latency_ms: f64,
    pub samples: u64,
}

/// Timed work, fired when its time has come if it still applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// A step in `retry_wait` becomes ready.
    Retry(String, usize),
    /// An attempt past its deadline plus grace times out.
    Deadline(String),
    /// A run reaches its deadline.
    RunDeadline(String),
    /// An open breaker's cooldown ends: (tool, agent id).
    Breaker(String, String),
    /// An approval step's timeout.
    Approval(String, usize),
}

/// A bounded map that forgets its oldest entries: final states of attempts of runs
/// that are no longer in memory (a result re-sent after the run ended is still
/// recognised as a duplicate), and the runs that submits' request ids created.
pub(super) struct Recent<V> {
    pub states: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Recent<V> {
    const CAP: usize = 100_000;

    fn new() -> Recent<V> {
        Recent { states: HashMap::new(), order: VecDeque::new() }
    }

    pub fn insert(&mut self, id: String, state: V) {
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

/// All scheduling state. See the module docs.
pub(crate) struct Model {
    pub(super) cfg: EngineConfig,
    pub(super) runs: IdMap<Run>,
    /// Every attempt of every run in `runs`.
    pub(super) attempts: IdMap<Attempt>,
    pub(super) recent: Recent<AttemptState>,
    /// Request id → run id, for the runs in memory and the latest ones before them
    /// (older ones are found in the store before a submit reaches the engine).
    pub(super) requests: Recent<String>,
    pub(super) agents: BTreeMap<String, Agent>,
    pub(super) breakers: BTreeMap<breakers::BreakerKey, baton_common::breaker::Breaker>,
    /// Per round-robin rule, the name of the agent it last picked.
    pub(super) round_robin: HashMap<usize, String>,
    /// Recent outcomes per (agent id, tool), for the `auto` strategy.
    pub(super) stats: HashMap<(String, String), Stats>,
    /// Ready steps per tool, in the order they are offered to agents.
    pub(super) ready: BTreeMap<String, super::queue::ReadyQueue>,
    pub(super) timers: BinaryHeap<Reverse<(i64, Timer)>>,
    pub(super) pending: Pending,
    /// Immediate effects of the input being applied.
    pub(super) now_effects: Vec<Effect>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The secrets, opened: specs use them as `${{ secrets.NAME }}`, and their values
    /// are masked in what the engine keeps.
    pub(super) secrets: HashMap<String, String>,
    /// Bumped on every change of `secrets` (runs' cached redactors are rebuilt).
    pub(super) secrets_version: u64,
    /// Ids, lease tokens and retry jitter.
    pub(super) rng: StdRng,
    /// Illegal transitions seen (the latest ones): each is a bug in the model.
    pub(super) violations: Vec<String>,
    /// Live attempt → the pipelined attempts that start after it (see `pipeline`).
    pub(super) followers: IdMap<Vec<String>>,
    /// Agents whose attempts changed: their steps' dependents may be pipelined now.
    pub(super) pipe_agents: BTreeSet<String>,
    /// Pipelined attempts held back (all agents' `held_back`).
    pub(super) held: BTreeSet<String>,
    /// The step cache (`cache:`) by key, as stored: expired entries are not used.
    pub(super) cache: HashMap<String, crate::store::CacheRow>,
    /// Live attempts by the concurrency key they hold (`concurrency:`).
    pub(super) holders: HashMap<String, BTreeSet<String>, Fixed>,
    /// Active and waiting runs by their workstream's key (`concurrency:` of a
    /// workstream).
    pub(super) run_keys: BTreeMap<String, super::run_keys::RunKey>,
    /// How many of the pending commit's finished runs have let go of their keys.
    finished_seen: usize,
}

impl Model {
    pub fn new(
        cfg: EngineConfig,
        metrics: Arc<crate::metrics::Metrics>,
        secrets: HashMap<String, String>,
        seed: u64,
    ) -> Model {
        Model {
            cfg,
            runs: IdMap::default(),
            attempts: IdMap::default(),
            recent: Recent::new(),
            requests: Recent::new(),
            agents: BTreeMap::new(),
            breakers: BTreeMap::new(),
            round_robin: HashMap::new(),
            stats: HashMap::new(),
            ready: BTreeMap::new(),
            timers: BinaryHeap::new(),
            pending: Pending::default(),
            now_effects: Vec::new(),
            metrics,
            secrets,
            secrets_version: 0,
            rng: StdRng::seed_from_u64(seed),
            violations: Vec::new(),
            followers: IdMap::default(),
            cache: HashMap::new(),
            holders: HashMap::default(),
            run_keys: BTreeMap::new(),
            finished_seen: 0,
            pipe_agents: BTreeSet::new(),
            held: BTreeSet::new(),
        }
    }

    /// The time of the input being applied, in ms since the epoch.
    pub(super) fn now(&self) -> i64 {
        self.pending.now
    }

    fn set_clock(&mut self, now_us: i64) {
        // The wall clock may step back; latencies and event times do not.
        self.pending.now_us = now_us.max(self.pending.now_us);
        self.pending.now = self.pending.now_us / 1000;
    }

    /// An effect performed at once, not after the commit.
    pub(super) fn now_effect(&mut self, e: Effect) {
        self.now_effects.push(e);
    }

    /// Applies one input at `now_us` (µs since the epoch); returns what to do at once.
    pub fn apply(&mut self, input: Input, now_us: i64) -> Vec<Effect> {
        self.set_clock(now_us);
        self.handle(input);
        self.queue_and_release();
        if !self.held.is_empty() {
            self.drop_stranded();
            self.queue_and_release();
        }
        self.pending.actor.clear();
        if !self.pending.violations.is_empty() {
            let seen = std::mem::take(&mut self.pending.violations);
            self.metrics.invariant_violations.add(&[], seen.len() as f64);
            self.violations.extend(seen);
            let over = self.violations.len().saturating_sub(100);
            self.violations.drain(..over);
        }
        std::mem::take(&mut self.now_effects)
    }

    /// Queues the steps made ready, and lets runs that ended go of their workstreams'
    /// keys (the runs waiting for them start), until neither is left: a step queued
    /// may end its run (its condition fails), and a run that starts queues steps.
    fn queue_and_release(&mut self) {
        loop {
            while let Some((run_id, idx)) = self.pending.newly_ready.pop() {
                self.enqueue(&run_id, idx);
            }
            if self.finished_seen >= self.pending.finished_runs.len() {
                break;
            }
            while self.finished_seen < self.pending.finished_runs.len() {
                let run_id = self.pending.finished_runs[self.finished_seen].clone();
                self.finished_seen += 1;
                self.release_run_key(&run_id);
            }
        }
    }

    /// When the next timer fires (ms since the epoch).
    pub fn next_timer(&self) -> Option<i64> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Whether there is anything to commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Rows the pending commit would write.
    pub fn pending_rows(&self) -> usize {
        self.pending.rows()
    }

    /// Whether the pending commit holds something that must not wait for company (a
    /// reply, work for an idle slot, a run's end).
    pub fn pending_urgent(&self) -> bool {
        self.pending.urgent || !self.pending.finished_runs.is_empty()
    }

    /// Takes the pending changes as one commit.
    pub fn take_commit(&mut self) -> Option<Commit> {
        if self.pending.is_empty() {
            return None;
        }
        let fresh = Pending { now: self.pending.now, now_us: self.pending.now_us, ..Pending::default() };
        let mut pending = std::mem::replace(&mut self.pending, fresh);
        self.finished_seen = 0;
        let batch = self.build_batch(&mut pending);
        let batch = Batch { events: pending.events, ..batch };
        Some(Commit {
            batch,
            effects: pending.effects,
            finished_runs: pending.finished_runs,
            event_counts: pending.event_counts,
        })
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Submit { run, actor, reply } => {
                self.pending.actor = actor;
                let result = match self.requests.states.get(&run.run.request_id) {
                    // The same request again (a client retrying): its run, answered
                    // after this commit like the first answer.
                    Some(run_id) if !run.run.request_id.is_empty() => Ok(run_id.clone()),
                    _ => self.submit(*run),
                };
                self.pending.reply(reply, Answer::Run(result));
            }
            Input::Cancel { run_id, step_id, reason, actor, reply } => {
                self.pending.actor = actor;
                let result = match step_id {
                    Some(step) => self.cancel_step(&run_id, &step, &reason),
                    None => self.cancel_run(&run_id, &reason),
                };
                self.pending.reply(reply, Answer::RunState(result));
            }
            Input::Decide { run_id, step_id, decision, actor, reply } => {
                self.pending.actor.clone_from(&actor);
                let result = self.decide(&run_id, &step_id, decision, &actor);
                self.pending.reply(reply, Answer::RunState(result));
            }
            Input::Release { run_id, budget, actor, reply } => {
                self.pending.actor = actor;
                let result =
                    self.raise_budget(&run_id, budget.0, budget.1).and_then(|()| self.release(&run_id));
                self.pending.reply(reply, Answer::RunState(result));
            }
            Input::PurgeCache { workstream, key_prefix, reply } => {
                let before = self.cache.len();
                self.cache.retain(|k, r| {
                    !((workstream.is_empty() || r.workstream == workstream) && k.starts_with(&key_prefix))
                });
                let purged = (before - self.cache.len()) as u32;
                self.now_effect(Effect::Reply { to: reply, answer: Answer::Count(purged) });
            }
            Input::Retry { run_id, stored, actor, reply } => {
                self.pending.actor = actor;
                let result = self.retry(&run_id, *stored);
                self.pending.reply(reply, Answer::Retried(result));
            }
            Input::ResetBreaker { tool, agent, actor, reply } => {
                self.pending.actor = actor;
                let result = self.reset_breaker(&tool, &agent);
                self.pending.reply(reply, Answer::Breakers(result));
            }
            Input::Drain { agent, undo, actor, reply } => {
                self.pending.actor = actor;
                let result = self.drain(&agent, undo);
                self.pending.reply(reply, Answer::Agent(result));
            }
            Input::Connect { hello, session, binding, reply } => {
                let result = self.connect(hello, session, binding);
                if result.is_err() {
                    self.now_effect(Effect::Close { session });
                }
                self.pending.reply(reply, Answer::Session(result));
            }
            Input::Agent { agent_id, session, msg } => self.agent_message(&agent_id, session, msg),
            Input::Disconnect { agent_id, session } => self.disconnect(&agent_id, session),
            Input::Revoke { name, actor, reply } => {
                self.pending.actor = actor;
                let closed = self.revoke(&name);
                self.now_effect(Effect::Reply { to: reply, answer: Answer::Count(closed) });
            }
            Input::SetSecret { name, value, reply } => {
                match value {
                    Some(v) => self.secrets.insert(name, v),
                    None => self.secrets.remove(&name),
                };
                self.secrets_version += 1;
                self.now_effect(Effect::Reply { to: reply, answer: Answer::Done });
            }
            // Reads are answered from memory at once: they may be ahead of the
            // database by the commit in flight.
            Input::ListBreakers { reply } => {
                let answer = Answer::Breakers(Ok(self.list_breakers()));
                self.now_effect(Effect::Reply { to: reply, answer });
            }
            Input::Live { run_id, reply } => {
                let reasons = self.wait_reasons(&run_id);
                let now = self.now();
                let live = self
                    .runs
                    .get_mut(&run_id)
                    .map(|run| Live { reasons, progress: run.progress(&self.attempts, now) });
                self.now_effect(Effect::Reply { to: reply, answer: Answer::Live(live) });
            }
            Input::Gauges { reply } => {
                let answer = Answer::Gauges(self.gauges());
                self.now_effect(Effect::Reply { to: reply, answer });
            }
            Input::ListAgents { reply } => {
                let mut list: Vec<pb::Agent> = self.agents.values().map(Agent::to_pb).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                self.now_effect(Effect::Reply { to: reply, answer: Answer::Agents(list) });
            }
            Input::Tick => {
                self.fire_timers();
                self.dispatch();
                self.pipeline();
            }
            Input::Sweep => {
                self.sweep_agents();
                self.check_max_wait(self.now());
                let now = self.now();
                self.cache.retain(|_, r| r.expires_at > now);
            }
            Input::Committed(commit) => self.committed(commit),
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
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
                Timer::Approval(run_id, idx) => self.approval_due(&run_id, idx, now),
            }
        }
    }

    /// A commit is durable: its effects happen, watchers hear of its events, and runs
    /// it finished are forgotten.
    fn committed(&mut self, commit: Commit) {
        let now = self.now();
        for row in commit.batch.attempts.iter().filter(|r| r.state == "assigned") {
            if let Some(a) = self.attempts.get_mut(&row.id) {
                a.sent_at.get_or_insert(now);
            }
        }
        self.now_effects.extend(commit.effects);
        // Each event carries its run's counts right after it; the ETA, computed once
        // per run of the commit, is as of now.
        let mut etas: HashMap<String, (i64, Option<proto::Duration>)> = HashMap::new();
        for (event, counts) in commit.batch.events.into_iter().zip(commit.event_counts) {
            if !etas.contains_key(&event.run_id)
                && let Some(run) = self.runs.get_mut(&event.run_id)
            {
                let start = run.started_at.unwrap_or(run.created_at);
                etas.insert(event.run_id.clone(), (start, run.progress(&self.attempts, now).eta));
            }
            let progress = etas.get(&event.run_id).map(|(start, eta)| {
                let mut p = super::progress::of_counts(&counts, event.steps_total as u32);
                p.elapsed = Some(proto::duration(event.at - start));
                p.eta = *eta;
                Arc::new(p)
            });
            self.now_effects.push(Effect::Publish(Arc::new(Published { event, progress })));
        }
        for run_id in commit.finished_runs {
            self.evict(&run_id);
        }
    }

    /// The rows the pending changes touch, as they are now (events apart).
    fn build_batch(&self, p: &mut Pending) -> Batch {
        let mut b = Batch::default();
        for id in &p.runs {
            if let Some(run) = self.runs.get(id) {
                if let Some(mut spec) = p.new_runs.remove(id) {
                    if p.specs.remove(id) {
                        spec = serde_json::to_string(&*run.spec).unwrap_or(spec);
                    }
                    b.new_runs.push(run.to_row(spec));
                } else {
                    b.runs.push(run.state_row());
                }
            }
        }
        for id in std::mem::take(&mut p.specs) {
            if let Some(run) = self.runs.get(&id)
                && let Ok(spec) = serde_json::to_string(&*run.spec)
            {
                b.specs.push(crate::store::RunSpecRow { id, spec });
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
        b.cache = std::mem::take(&mut p.cache);
        b.artifacts = std::mem::take(&mut p.artifacts);
        b
    }

    /// Forgets a final run; the store keeps it. (A run retried since it finished is
    /// running again and stays.)
    fn evict(&mut self, run_id: &str) {
        if self.runs.get(run_id).is_none_or(|r| !r.state.is_terminal()) {
            return;
        }
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
            if a.session.is_some() {
                g.slots_total += a.slots;
                g.slots_used += (a.running.len() as u32).min(a.slots);
            }
        }
        for b in self.breakers.values() {
            *g.breakers.entry(b.state.as_str().to_string()).or_default() += 1;
        }
        g
    }

    /// 128 bits from the model's generator.
    pub(super) fn random_u128(&mut self) -> u128 {
        rand::Rng::random(&mut self.rng)
    }

    /// A time-ordered id (UUID v7 from the input's time and the generator): a new
    /// attempt's key lands at the end of the store's index, not on a random page.
    pub(super) fn time_ordered_id(&mut self) -> String {
        let bytes = self.random_u128().to_le_bytes();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&bytes[..10]);
        uuid::Builder::from_unix_timestamp_millis(self.now().max(0) as u64, &tail).into_uuid().to_string()
    }

    /// A random id (UUID v4 from the generator).
    pub(super) fn random_id(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.random_u128().to_le_bytes()).into_uuid().to_string()
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

    /// Rebuilds the state from the store's rows after a start, at `now_us`; repairs
    /// it finds are pending (commit them before anything else).
    pub fn load(
        &mut self,
        snap: Snapshot,
        estimates: &HashMap<String, crate::store::Estimates>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.set_clock(now_us);
        let now = self.now();
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
                running: BTreeSet::new(),
                held_back: BTreeSet::new(),
                draining: row.draining,
            };
            self.agents.insert(agent.id.clone(), agent);
        }
        self.insert_runs(&snap, estimates, now)?;
        // Live attempts hold their steps' concurrency keys again.
        let live: Vec<(String, String, usize)> = self
            .attempts
            .values()
            .filter(|a| !a.state.is_terminal())
            .map(|a| (a.id.clone(), a.run_id.clone(), a.step_idx))
            .collect();
        for (attempt_id, run_id, idx) in live {
            if let Ok((_, keys)) = self.concurrency_block(&run_id, idx) {
                for key in &keys {
                    self.holders.entry(key.clone()).or_default().insert(attempt_id.clone());
                }
                if let Some(a) = self.attempts.get_mut(&attempt_id) {
                    a.concurrency = keys;
                }
            }
        }
        let attempts = &self.attempts;
        self.followers.retain(|before, _| attempts.get(before).is_some_and(|a| !a.state.is_terminal()));
        self.load_breakers(&snap.breakers);
        self.cache = snap
            .cache
            .iter()
            .filter(|r| r.expires_at > now)
            .map(|r| (r.cache_key.clone(), r.clone()))
            .collect();
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
        self.rebuild_run_keys();
        let mut run_ids: Vec<(i64, String)> =
            self.runs.values().map(|r| (r.created_at, r.id.clone())).collect();
        run_ids.sort();
        for (_, run_id) in run_ids {
            self.resume_run(&run_id);
        }
        while let Some((run_id, idx)) = self.pending.newly_ready.pop() {
            self.enqueue(&run_id, idx);
        }
        Ok(())
    }

    /// Puts the runs of `snap` (rows of runs, their steps and attempts) into the
    /// state as they were stored: at a start, and for a retried run.
    pub(super) fn insert_runs(
        &mut self,
        snap: &Snapshot,
        estimates: &HashMap<String, crate::store::Estimates>,
        now: i64,
    ) -> Result<(), StoreError> {
        let grace = baton_common::time::ms(self.cfg.failover_grace);
        let rules = self.cfg.router.current();
        let mut steps_by_run: HashMap<&str, Vec<&crate::store::StepRow>> = HashMap::new();
        for s in &snap.steps {
            steps_by_run.entry(s.run_id.as_str()).or_default().push(s);
        }
        for row in &snap.runs {
            let spec: Workstream = serde_json::from_str(&row.spec)
                .map_err(|e| StoreError::Corrupt(format!("run {}: bad spec: {e}", row.id)))?;
            let mut rows = steps_by_run.remove(row.id.as_str()).unwrap_or_default();
            rows.sort_by_key(|r| r.idx);
            if rows.len() != spec.steps.len() {
                return Err(StoreError::Corrupt(format!(
                    "run {} has {} step rows for {} steps",
                    row.id,
                    rows.len(),
                    spec.steps.len()
                )));
            }
            let mut steps = Vec::with_capacity(rows.len());
            let mut last = None;
            for (i, r) in rows.iter().enumerate() {
                if r.idx != i as i64 {
                    return Err(StoreError::Corrupt(format!(
                        "run {} step {} out of order",
                        row.id, r.step_id
                    )));
                }
                steps.push(Step::from_row(r, || rules.placement_for(&spec.steps[i]), &mut last)?);
            }
            let index = spec.index();
            let held = row.state == RunState::Quarantined.as_str();
            for (i, s) in spec.steps.iter().enumerate() {
                steps[i].waiting_on = s
                    .needs
                    .iter()
                    .filter(|n| {
                        index
                            .get(n.as_str())
                            .is_some_and(|&j| !super::state::need_met(s.when, steps[j].state, held))
                    })
                    .count() as u32;
            }
            let dependents = super::state::dependents_of(&spec);
            // Stored since retries count it again; rows from before, from the submit.
            let deadline_at = row.deadline_at.or(spec.deadline_ms.map(|d| row.created_at + d as i64));
            let state: RunState = crate::store::parse_state(&row.state)?;
            let failing = steps
                .iter()
                .zip(&spec.steps)
                .find(|(s, _)| s.state == StepState::Failed)
                .filter(|_| spec.on_failure == OnFailure::Fail && state != RunState::Quarantined)
                .map(|(_, sp)| format!("step {:?} failed", sp.id));
            let open = steps.iter().filter(|s| !s.state.is_terminal()).count();
            let mut run = Run {
                open,
                id: row.id.clone(),
                spec: Arc::new(spec),
                params_json: row.params.clone(),
                state,
                reason: row.reason.clone(),
                created_at: row.created_at,
                started_at: row.started_at,
                finished_at: row.finished_at,
                request_id: row.request_id.clone(),
                name: row.name.clone(),
                labels_json: row.labels.clone(),
                steps,
                dependents,
                next_seq: snap.last_seq.get(&row.id).copied().unwrap_or(0) + 1,
                failing,
                deadline_at,
                params: self.open_params(&row.id, &row.params),
                templated: Vec::new(),
                topo: Vec::new(),
                needs: Vec::new(),
                estimates: Vec::new(),
                eta: None,
                counts: [0; STEP_STATES],
                redactor: None,
                rerun_of: row.rerun_of.clone(),
                no_cache: row.no_cache != 0,
                priority: row.priority(),
                key: None,
                queued: row.queued != 0,
                cost_micros: row.cost_micros,
                tokens: row.tokens,
                budget_micros: row.budget_micros,
                budget_tokens: row.budget_tokens,
            };
            run.templated = super::state::templated_of(&run.spec);
            run.counts = super::state::counts_of(&run.steps.iter().map(|s| s.state).collect::<Vec<_>>());
            run.needs = super::state::needs_of(&run.spec);
            run.topo = super::progress::topo_order(&run.needs);
            run.estimates = super::state::estimates_for(
                &run.spec,
                &run.steps,
                estimates.get(&row.workstream).unwrap_or(&Default::default()),
            );
            if !run.request_id.is_empty() {
                self.requests.insert(run.request_id.clone(), run.id.clone());
            }
            self.runs.insert(run.id.clone(), run);
        }
        let mut attempts: Vec<&crate::store::AttemptRow> = snap.attempts.iter().collect();
        attempts.sort_by_key(|r| (r.run_id.as_str(), r.step_id.as_str(), r.number));
        for row in attempts {
            let Some(run) = self.runs.get_mut(&row.run_id) else {
                continue;
            };
            let Some(idx) = run.spec.steps.iter().position(|s| s.id == row.step_id) else {
                return Err(StoreError::Corrupt(format!(
                    "attempt {} of unknown step {}",
                    row.id, row.step_id
                )));
            };
            let attempt = Attempt::from_row(row, idx, now)?;
            run.steps[idx].attempt_ids.push(attempt.id.clone());
            if !attempt.state.is_terminal() {
                run.steps[idx].current = Some(attempt.id.clone());
                let agent = self
                    .agents
                    .entry(attempt.agent_id.clone())
                    .or_insert_with(|| Agent::new(&attempt.agent_id, &attempt.agent_name, 0, now + grace));
                agent.running.insert(attempt.id.clone());
                // Pipelined, and its step still waits for the results it starts after.
                if !attempt.after.is_empty() && run.steps[idx].state == StepState::Waiting {
                    agent.held_back.insert(attempt.id.clone());
                    self.held.insert(attempt.id.clone());
                    for before in &attempt.after {
                        self.followers.entry(before.clone()).or_default().push(attempt.id.clone());
                    }
                }
                if let Some(d) = attempt.deadline_at {
                    self.timers.push(Reverse((d, Timer::Deadline(attempt.id.clone()))));
                }
            }
            let step = &mut run.steps[idx];
            // As the live model counts it: losses add up, the step's own outcomes reset
            // it, cancels and live attempts leave it.
            match attempt.state {
                AttemptState::Lost => step.lost_streak += 1,
                AttemptState::Succeeded | AttemptState::Failed | AttemptState::TimedOut => {
                    step.lost_streak = 0
                }
                _ => {}
            }
            // A release starts the count again, with the losses (`lost_count`).
            step.lost_streak = step.lost_streak.min(step.lost_count);
            self.attempts.insert(attempt.id.clone(), attempt);
        }
        Ok(())
    }
}

#[cfg(test)]
impl Model {
    /// Runs with changes not yet taken into a commit.
    pub(super) fn dirty_runs(&self) -> Vec<String> {
        let p = &self.pending;
        let mut out: Vec<String> = p.runs.iter().cloned().collect();
        out.extend(p.steps.iter().map(|(r, _)| r.clone()));
        out.extend(p.attempts.iter().filter_map(|a| self.attempts.get(a).map(|a| a.run_id.clone())));
        out
    }

    /// The durable part of the state, one line per run, step, live attempt and agent,
    /// in a fixed order: what a model rebuilt from the rows must agree on.
    pub(super) fn fingerprint(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut ids: Vec<&String> = self.runs.keys().collect();
        ids.sort();
        for id in ids {
            let run = &self.runs[id];
            out.push(format!(
                "run {id} {} failing={} open={} counts={:?} next_seq={}",
                run.state,
                run.failing.is_some(),
                run.open,
                run.counts,
                run.next_seq
            ));
            let dispatchable =
                run.failing.is_none() && matches!(run.state, RunState::Pending | RunState::Running);
            for (idx, s) in run.steps.iter().enumerate() {
                let queued = self.ready.get(&s.tool).is_some_and(|q| q.contains(id, idx));
                out.push(format!(
                    "run {id} step {idx} {} attempts={} failures={} lost={} streak={} waiting_on={} current={:?} next={:?} result={:?} queued={}",
                    s.state,
                    s.attempts,
                    s.failures,
                    s.lost_count,
                    s.lost_streak,
                    // Counted down as needs succeed; it means nothing once the step ended.
                    if s.state.is_terminal() { 0 } else { s.waiting_on },
                    s.current,
                    s.next_attempt_at,
                    s.result,
                    queued && s.state == StepState::Ready && dispatchable
                ));
            }
        }
        let mut live: Vec<&Attempt> = self.attempts.values().filter(|a| !a.state.is_terminal()).collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        for a in live {
            out.push(format!(
                "attempt {} {} on {} lease {} after {:?} held {}",
                a.id,
                a.state,
                a.agent_id,
                a.lease_token,
                a.after,
                self.held.contains(&a.id)
            ));
        }
        for a in self.agents.values().filter(|a| !a.running.is_empty()) {
            out.push(format!("agent {} runs {:?}", a.id, a.running));
        }
        let mut keys: Vec<(&String, &BTreeSet<String>)> = self.holders.iter().collect();
        keys.sort();
        for (key, held) in keys {
            out.push(format!("concurrency {key} held by {held:?}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Kit, config};
    use super::*;

    #[test]
    fn a_rebuilt_model_keeps_a_steps_loss_streak_across_a_live_attempt() {
        let mut k = Kit::new(config());
        k.connect("a", 1, 1);
        let run = k.submit("name: w\nsteps:\n  - {id: x, tool: shell, with: {run: 'true'}, retry: {backoff: {initial: 1ms, jitter: 0}}}\n");
        for session in [2, 3] {
            // The agent comes back without the attempt: lost.
            k.assigns(session - 1);
            k.connect("a", session, 1);
            k.advance(10);
        }
        assert_eq!(k.assigns(3).len(), 1, "a third attempt runs");
        let live = k.model.runs[&run].steps[0].lost_streak;
        assert_eq!(live, 2);
        let mut again = Model::new(config(), crate::metrics::Metrics::new(), HashMap::new(), 1);
        again.load(k.snapshot(), &HashMap::new(), k.now).expect("loads");
        assert_eq!(again.runs[&run].steps[0].lost_streak, live);
    }
}
