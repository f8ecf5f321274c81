//! A model driven by hand for unit tests: inputs at chosen times, every commit made
//! durable at once, and what went out recorded.

use std::collections::{BTreeMap, HashMap};

use baton_common::pb;
use baton_common::pb::agent_message::Msg as Up;
use baton_common::pb::controller_message::Msg as Down;

use super::admission::Submission;
use super::model::{Answer, Effect, Input, Model};
use super::{Binding, EngineConfig};
use crate::store::Batch;

/// µs per ms.
pub const MS: i64 = 1000;

pub struct Kit {
    pub model: Model,
    /// The model's clock, µs.
    pub now: i64,
    /// Messages sent to each session, in order, since the last `take_sent`.
    pub sent: BTreeMap<u64, Vec<Down>>,
    /// Messages that went out before their commit was durable.
    pub sent_early: Vec<Down>,
    pub answers: HashMap<u64, Answer>,
    pub commits: Vec<Batch>,
    next_reply: u64,
}

impl Kit {
    pub fn new(cfg: EngineConfig) -> Kit {
        let mut model = Model::new(cfg, crate::metrics::Metrics::new(), HashMap::new(), 7);
        let now = 1_800_000_000_000 * MS;
        let snapshot = crate::store::Snapshot {
            runs: vec![],
            steps: vec![],
            attempts: vec![],
            last_seq: HashMap::new(),
            agents: vec![],
            breakers: vec![],
            cache: vec![],
        };
        model.load(snapshot, &HashMap::new(), now).expect("empty load");
        Kit {
            model,
            now,
            sent: BTreeMap::new(),
            sent_early: Vec::new(),
            answers: HashMap::new(),
            commits: Vec::new(),
            next_reply: 1,
        }
    }

    /// Applies an input, performing immediate effects; does not commit.
    pub fn apply(&mut self, input: Input) {
        let effects = self.model.apply(input, self.now);
        self.perform(effects, true);
    }

    fn perform(&mut self, effects: Vec<Effect>, early: bool) {
        for e in effects {
            match e {
                Effect::Send { session, msg } => {
                    if early && !matches!(msg, Down::Pong(_)) {
                        self.sent_early.push(msg.clone());
                    }
                    self.sent.entry(session).or_default().push(msg);
                }
                Effect::Reply { to, answer } => {
                    self.answers.insert(to, answer);
                }
                _ => {}
            }
        }
    }

    /// `Tick`, then commits what is pending and performs what waited for it.
    pub fn settle(&mut self) {
        self.apply(Input::Tick);
        while let Some(c) = self.model.take_commit() {
            self.commits.push(c.batch.clone());
            let effects = self.model.apply(Input::Committed(c), self.now);
            self.perform(effects, false);
            self.apply(Input::Tick);
        }
    }

    /// Moves the clock on by `ms` and settles.
    pub fn advance(&mut self, ms: i64) {
        self.now += ms * MS;
        self.settle();
    }

    fn reply(&mut self) -> u64 {
        self.next_reply += 1;
        self.next_reply
    }

    /// Connects agent `name` with `slots` and the `shell` tool as `session`.
    pub fn connect(&mut self, name: &str, session: u64, slots: u32) {
        self.connect_running(name, session, slots, Vec::new());
    }

    /// Connects an agent named `name` with id `agent_id`; the engine's answer.
    pub fn connect_as(&mut self, name: &str, agent_id: &str, session: u64) -> Result<(), String> {
        let hello = pb::Hello {
            agent_id: agent_id.into(),
            name: name.into(),
            version: "test".into(),
            tools: vec![pb::Tool { name: "shell".into(), version: "1".into() }],
            slots: 1,
            ..Default::default()
        };
        let reply = self.reply();
        self.apply(Input::Connect { hello, session, binding: Binding::default(), reply });
        self.settle();
        match self.answers.remove(&reply) {
            Some(Answer::Session(r)) => r.map(|_| ()).map_err(|e| e.to_string()),
            other => panic!("connect answered {other:?}"),
        }
    }

    /// Connects (again), saying it runs `running`.
    pub fn connect_running(&mut self, name: &str, session: u64, slots: u32, running: Vec<pb::AttemptRef>) {
        let hello = pb::Hello {
            running,
            agent_id: format!("{name}-id"),
            name: name.into(),
            version: "test".into(),
            tools: vec![pb::Tool { name: "shell".into(), version: "1".into() }],
            slots,
            ..Default::default()
        };
        let reply = self.reply();
        self.apply(Input::Connect { hello, session, binding: Binding::default(), reply });
        self.settle();
    }

    /// Submits a workstream given as YAML; returns the run id.
    pub fn submit(&mut self, yaml: &str) -> String {
        let spec = baton_common::spec::parse("test.yaml", yaml).expect("a valid spec");
        let reply = self.reply();
        let run = Box::new(Submission::new(spec).admit(&self.model.cfg.router.current()).expect("admitted"));
        self.apply(Input::Submit { run, actor: "test".into(), reply });
        self.settle();
        match self.answers.remove(&reply) {
            Some(Answer::Run(Ok(id))) => id,
            other => panic!("submit answered {other:?}"),
        }
    }

    /// The Assigns sent to `session` since the last call, by step id.
    pub fn assigns(&mut self, session: u64) -> Vec<pb::AttemptRef> {
        let msgs = self.sent.remove(&session).unwrap_or_default();
        let mut out = Vec::new();
        let mut rest = Vec::new();
        for m in msgs {
            match m {
                Down::Assign(a) => out.extend(a.attempt),
                m => rest.push(m),
            }
        }
        if !rest.is_empty() {
            self.sent.insert(session, rest);
        }
        out
    }

    /// Takes the messages sent to `session`.
    pub fn take_sent(&mut self, session: u64) -> Vec<Down> {
        self.sent.remove(&session).unwrap_or_default()
    }

    /// An agent message on `session`.
    pub fn agent(&mut self, name: &str, session: u64, msg: Up) {
        self.apply(Input::Agent { agent_id: format!("{name}-id"), session, msg });
        self.settle();
    }

    pub fn started(&mut self, name: &str, session: u64, r: &pb::AttemptRef) {
        self.agent(name, session, Up::Started(pb::AttemptStarted { attempt: Some(r.clone()), pid: 1 }));
    }

    pub fn finished(&mut self, name: &str, session: u64, r: &pb::AttemptRef, outcome: &str, class: &str) {
        self.finished_with(name, session, r, outcome, class, serde_json::json!({"n": 1}));
    }

    /// `finished`, with `result` as a successful attempt's outputs.
    pub fn finished_with(
        &mut self,
        name: &str,
        session: u64,
        r: &pb::AttemptRef,
        outcome: &str,
        class: &str,
        result: serde_json::Value,
    ) {
        use baton_common::outcome::{FailureClass, Outcome};
        let o: Outcome = outcome.parse().expect("an outcome");
        let class = match (o, class) {
            (Outcome::Canceled, "") => FailureClass::Canceled.to_pb(),
            (_, "") => 0,
            (_, c) => c.parse::<FailureClass>().expect("a failure class").to_pb(),
        };
        let f = pb::AttemptFinished {
            attempt: Some(r.clone()),
            outcome: o.to_pb(),
            failure_class: class,
            result: (o == Outcome::Succeeded).then(|| baton_common::proto::value(result)),
            ..Default::default()
        };
        self.agent(name, session, Up::Finished(f));
    }

    /// A step's state in the model.
    pub fn step(&self, run: &str, step: &str) -> String {
        let r = &self.model.runs[run];
        let idx = r.spec.steps.iter().position(|s| s.id == step).expect("step");
        r.steps[idx].state.as_str().to_string()
    }

    /// A run's state: in memory, else from the last row committed.
    pub fn run_state(&self, run: &str) -> String {
        if let Some(r) = self.model.runs.get(run) {
            return r.state.as_str().to_string();
        }
        self.commits
            .iter()
            .rev()
            .find_map(|b| {
                let updated = b.runs.iter().find(|r| r.id == run).map(|r| r.state.clone());
                updated.or_else(|| b.new_runs.iter().find(|r| r.id == run).map(|r| r.state.clone()))
            })
            .unwrap_or_default()
    }

    /// Event kinds committed for `run`, in order.
    pub fn events(&self, run: &str) -> Vec<String> {
        self.commits
            .iter()
            .flat_map(|b| &b.events)
            .filter(|e| e.run_id == run)
            .map(|e| e.kind.clone())
            .collect()
    }
}

/// Timers fast enough for tests that move the clock by hand.
pub fn config() -> EngineConfig {
    EngineConfig {
        heartbeat_interval: std::time::Duration::from_millis(200),
        stop_after: std::time::Duration::from_millis(1200),
        lost_after: std::time::Duration::from_millis(2000),
        failover_grace: std::time::Duration::from_millis(4000),
        kill_grace: std::time::Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

impl Kit {
    /// The rows as a store holding every commit so far would load them.
    pub fn snapshot(&self) -> crate::store::Snapshot {
        self.rows(|r| !r.state.parse::<baton_common::state::RunState>().is_ok_and(|s| s.is_terminal()))
    }

    /// One run's rows as the store holds them, whatever its state (what a retry reads).
    pub fn stored_run(&self, run: &str) -> crate::store::Snapshot {
        let mut snap = self.rows(|r| r.id == run);
        snap.agents.clear();
        snap.breakers.clear();
        snap
    }

    /// The rows of every commit so far, of the runs `keep` selects.
    fn rows(&self, keep: impl Fn(&crate::store::RunRow) -> bool) -> crate::store::Snapshot {
        let mut runs = BTreeMap::new();
        let mut steps = BTreeMap::new();
        let mut attempts = BTreeMap::new();
        let mut agents = BTreeMap::new();
        let mut breakers = BTreeMap::new();
        let mut last_seq = HashMap::new();
        for b in &self.commits {
            for r in &b.new_runs {
                runs.insert(r.id.clone(), r.clone());
            }
            for r in &b.runs {
                if let Some(row) = runs.get_mut(&r.id) {
                    crate::store::RunRow::apply(row, r);
                }
            }
            for r in &b.specs {
                if let Some(row) = runs.get_mut(&r.id) {
                    row.spec.clone_from(&r.spec);
                }
            }
            for s in &b.steps {
                steps.insert((s.run_id.clone(), s.idx), s.clone());
            }
            for a in &b.attempts {
                attempts.insert(a.id.clone(), a.clone());
            }
            for a in &b.agents {
                agents.insert(a.id.clone(), a.clone());
            }
            for r in &b.breakers {
                breakers.insert((r.tool.clone(), r.agent_id.clone()), r.clone());
            }
            for e in &b.events {
                last_seq.insert(e.run_id.clone(), e.seq);
            }
        }
        let active = |id: &str| runs.get(id).is_some_and(&keep);
        crate::store::Snapshot {
            steps: steps.values().filter(|s| active(&s.run_id)).cloned().collect(),
            attempts: attempts.values().filter(|a| active(&a.run_id)).cloned().collect(),
            last_seq: last_seq.into_iter().filter(|(id, _)| active(id)).collect(),
            runs: runs.values().filter(|r| active(&r.id)).cloned().collect(),
            agents: agents.into_values().collect(),
            breakers: breakers.into_values().collect(),
            cache: self.commits.iter().flat_map(|b| b.cache.iter().cloned()).collect(),
        }
    }

    /// A model loaded from `snap` (the rows), as after a restart, with this kit's
    /// config.
    pub fn rebuilt_from(&self, snap: crate::store::Snapshot) -> Model {
        let mut again = Model::new(self.model.cfg.clone(), crate::metrics::Metrics::new(), HashMap::new(), 1);
        again.load(snap, &HashMap::new(), self.now).expect("load the committed rows");
        again
    }
}
