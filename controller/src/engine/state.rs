//! The engine's in-memory view of active runs, their steps and attempts, and agents,
//! with the conversions to and from store rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use baton_common::outcome::FailureClass;
use baton_common::spec::Workstream;
pub(crate) use baton_common::state::AgentState;
use baton_common::state::{AttemptState, RunState, STEP_STATES, StepState};
use baton_common::{pb, proto};

use crate::router::Placement;
use crate::store::{AgentRow, AttemptRow, RunRow, RunStateRow, StepRow, StoreError, parse_state};

/// A hasher with fixed keys, so that the model's maps iterate in the same order for
/// the same inputs (a replayed simulation makes the same decisions). Its keys are ids
/// the controller made, not ones a client chose.
pub(crate) type Fixed = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A map keyed by ids the controller made.
pub(crate) type IdMap<V> = HashMap<String, V, Fixed>;

/// A run that is not final yet.
#[derive(Debug)]
pub(crate) struct Run {
    pub id: String,
    pub spec: Arc<Workstream>,
    pub params_json: String,
    pub state: RunState,
    pub reason: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The client's id of the submit that created it (may be empty).
    pub request_id: String,
    /// Display name and labels given at submit (labels as a JSON object).
    pub name: String,
    pub labels_json: String,
    pub steps: Vec<Step>,
    /// For each step, the steps that list it in `needs`.
    pub dependents: Vec<Vec<usize>>,
    /// For each step, the steps it needs.
    pub needs: Vec<Vec<usize>>,
    /// Sequence number the next event gets.
    pub next_seq: i64,
    /// Steps not in a final state.
    pub open: usize,
    /// Set once a step failed for good under `on_failure: fail`: nothing new starts and
    /// the run fails when its running steps have finished.
    pub failing: Option<String>,
    /// When the run fails for running too long (`deadline` in the spec).
    pub deadline_at: Option<i64>,
    /// Run parameters, defaults applied.
    pub params: BTreeMap<String, String>,
    /// Which steps have `${{ ... }}` in their input or env.
    pub templated: Vec<bool>,
    /// Steps ordered so that each comes after the steps it needs.
    pub topo: Vec<usize>,
    /// Expected duration of each step (ms), when known.
    pub estimates: Vec<Option<i64>>,
    /// Last ETA computation: (when, expected end), for rate limiting.
    pub eta: Option<(i64, Option<i64>)>,
    /// Steps per state, kept as steps move (progress is read often).
    pub counts: [u32; STEP_STATES],
    /// What to mask in the output of its attempts: the secrets and its secret
    /// parameters, as of a version of the secrets.
    pub redactor: Option<(u64, Arc<baton_common::redact::Redactor>)>,
    /// The run this one reruns (empty for a submitted run).
    pub rerun_of: String,
    /// Submitted with `--no-cache`: every step runs.
    pub no_cache: bool,
    /// Its steps go before those of runs with a lower priority when slots are scarce.
    pub priority: i32,
    /// Its workstream's concurrency key, rendered.
    pub key: Option<String>,
    /// Waiting for a slot of its key: none of its steps is queued for dispatch.
    pub queued: bool,
    /// What its attempts reported: cost in millionths of a dollar, and tokens.
    pub cost_micros: i64,
    pub tokens: i64,
    /// Its budget as raised at a release (`None`: its spec's).
    pub budget_micros: Option<i64>,
    pub budget_tokens: Option<i64>,
}

impl Run {
    pub fn step_id(&self, idx: usize) -> &str {
        &self.spec.steps[idx].id
    }

    /// The whole row, written once at submit; `spec` is the spec as JSON, which only
    /// that write needs (the engine does not keep it).
    pub fn to_row(&self, spec: String) -> RunRow {
        RunRow {
            id: self.id.clone(),
            workstream: self.spec.name.clone(),
            state: self.state.as_str().to_string(),
            spec,
            params: self.params_json.clone(),
            reason: self.reason.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            request_id: self.request_id.clone(),
            name: self.name.clone(),
            labels: self.labels_json.clone(),
            retain_ms: self.spec.retain_ms.map(|ms| ms.min(i64::MAX as u64) as i64),
            rerun_of: self.rerun_of.clone(),
            deadline_at: self.deadline_at,
            no_cache: i64::from(self.no_cache),
            priority: i64::from(self.priority),
            queued: i64::from(self.queued),
            cost_micros: self.cost_micros,
            tokens: self.tokens,
            budget_micros: self.budget_micros,
            budget_tokens: self.budget_tokens,
        }
    }

    /// The run row's changing part.
    pub fn state_row(&self) -> RunStateRow {
        RunStateRow {
            id: self.id.clone(),
            state: self.state.as_str().to_string(),
            reason: self.reason.clone(),
            started_at: self.started_at,
            finished_at: self.finished_at,
            deadline_at: self.deadline_at,
            queued: i64::from(self.queued),
            cost_micros: self.cost_micros,
            tokens: self.tokens,
            budget_micros: self.budget_micros,
            budget_tokens: self.budget_tokens,
        }
    }

    /// Its budget: the spec's, with what a release raised.
    pub fn budget(&self) -> Option<baton_common::spec::Budget> {
        budget_of(self.spec.budget, self.budget_micros, self.budget_tokens)
    }

    /// The step named `id` among those `idx` needs, directly or not, nearest first (a
    /// reference to a step's outputs must name one of them). Searched rather than
    /// indexed: an index of a big run's step ids would cost memory per step, and
    /// references mostly name a direct need.
    pub fn upstream(&self, idx: usize, id: &str) -> Option<usize> {
        let mut seen = std::collections::HashSet::new();
        let mut queue: std::collections::VecDeque<usize> = self.needs[idx].iter().copied().collect();
        while let Some(j) = queue.pop_front() {
            if !seen.insert(j) {
                continue;
            }
            if self.spec.steps[j].id == id {
                return Some(j);
            }
            queue.extend(self.needs[j].iter().copied());
        }
        None
    }

    /// The expansions of matrix step `group`, in their order (they are next to each
    /// other in the spec); none when no step has that group.
    pub fn group_members(&self, group: &str) -> Vec<usize> {
        let steps = &self.spec.steps;
        let Some(first) = steps.iter().position(|s| s.group.as_deref() == Some(group)) else {
            return Vec::new();
        };
        (first..steps.len()).take_while(|&i| steps[i].group.as_deref() == Some(group)).collect()
    }

    /// How many expansions of step `idx`'s group are running, when it has a
    /// `max_parallel`; `None` when nothing limits it.
    pub fn group_running(&self, idx: usize) -> Option<(u32, u32)> {
        let spec = &self.spec.steps[idx];
        let (group, limit) = (spec.group.as_deref()?, spec.max_parallel?);
        let steps = &self.spec.steps;
        let in_group = |i: &usize| steps[*i].group.as_deref() == Some(group);
        let before = (0..idx).rev().take_while(in_group);
        let after = (idx..steps.len()).take_while(in_group);
        let running = before.chain(after).filter(|&i| self.steps[i].state == StepState::Running).count();
        Some((running as u32, limit))
    }

    /// How many of step `idx`'s needs keep it waiting, as its `when` counts them.
    pub fn unmet_needs(&self, idx: usize) -> u32 {
        let (when, held) = (self.spec.steps[idx].when, self.state == RunState::Quarantined);
        self.needs[idx].iter().filter(|&&j| !need_met(when, self.steps[j].state, held)).count() as u32
    }

    /// Counts again what keeps each open step that runs whatever happened upstream
    /// waiting (after its run was held or released: a held run's failed steps are not
    /// over).
    pub fn recount_unconditional(&mut self) {
        for idx in 0..self.steps.len() {
            if !self.spec.steps[idx].when.is_default() && !self.steps[idx].state.is_terminal() {
                self.steps[idx].waiting_on = self.unmet_needs(idx);
            }
        }
    }

    /// Steps in a final state.
    pub fn done(&self) -> u32 {
        StepState::ALL.iter().filter(|s| s.is_terminal()).map(|&s| self.counts[s as usize]).sum()
    }

    pub fn step_row(&self, idx: usize) -> StepRow {
        let s = &self.steps[idx];
        StepRow {
            run_id: self.id.clone(),
            step_id: self.spec.steps[idx].id.clone(),
            idx: idx as i64,
            state: s.state.as_str().to_string(),
            tool: s.tool.clone(),
            attempts: i64::from(s.attempts),
            failures: i64::from(s.failures),
            lost_count: i64::from(s.lost_count),
            next_attempt_at: s.next_attempt_at,
            started_at: s.started_at,
            finished_at: s.finished_at,
            reason: s.reason.clone(),
            result: s.result.clone(),
            // Written from what the step keeps anyway: a string per step would be
            // much of its memory.
            needs: serde_json::to_string(&self.spec.steps[idx].needs).unwrap_or_else(|_| "[]".into()),
            kind: self.spec.steps[idx].kind.clone().unwrap_or_default(),
            route: serde_json::to_string(&*s.placement).unwrap_or_else(|_| "{}".into()),
            cost_micros: s.cost_micros,
            tokens: s.tokens,
        }
    }
}

/// `p` as an `Arc`, the one `last` holds when it is the same placement: a run's steps
/// come in order and mostly share one, which is then kept once.
pub(crate) fn share(last: &mut Option<Arc<Placement>>, p: Placement) -> Arc<Placement> {
    match last {
        Some(a) if **a == p => a.clone(),
        _ => last.insert(Arc::new(p)).clone(),
    }
}

/// Steps per state, indexed by the state's position in `StepState`.
/// Whether a step run `when` may go on past a need in state `need`. In a held
/// (quarantined) run a failed step is not over: a release runs it again.
pub(crate) fn need_met(when: baton_common::spec::When, need: StepState, held: bool) -> bool {
    match when {
        baton_common::spec::When::OnSuccess => need.is_success(),
        _ => need.is_terminal() && !(held && need == StepState::Failed),
    }
}

pub(crate) fn counts_of(states: &[StepState]) -> [u32; STEP_STATES] {
    let mut c = [0u32; STEP_STATES];
    for s in states {
        c[*s as usize] += 1;
    }
    c
}

/// Which steps have `${{ ... }}` in their input or env.
pub(crate) fn templated_of(spec: &Workstream) -> Vec<bool> {
    spec.steps
        .iter()
        .map(|s| {
            s.env.values().any(|v| v.contains("${{"))
                || serde_json::Value::Object(s.with.clone()).to_string().contains("${{")
        })
        .collect()
}

/// For each step, the indexes of the steps it needs.
pub(crate) fn needs_of(spec: &Workstream) -> Vec<Vec<usize>> {
    let index = spec.index();
    spec.steps
        .iter()
        .map(|s| s.needs.iter().filter_map(|n| index.get(n.as_str()).copied()).collect())
        .collect()
}

/// Each step's expected duration: the same step in earlier runs, else its tool.
pub(crate) fn estimates_for(
    spec: &Workstream,
    steps: &[Step],
    e: &crate::store::Estimates,
) -> Vec<Option<i64>> {
    spec.steps
        .iter()
        .zip(steps)
        .map(|(s, st)| e.by_step.get(&s.id).or_else(|| e.by_tool.get(&st.tool)).copied())
        .collect()
}

/// Index of each step's dependents, from the spec's `needs`.
pub(crate) fn dependents_of(spec: &Workstream) -> Vec<Vec<usize>> {
    let index = spec.index();
    let mut deps = vec![Vec::new(); spec.steps.len()];
    for (i, s) in spec.steps.iter().enumerate() {
        for n in &s.needs {
            if let Some(&up) = index.get(n.as_str()) {
                deps[up].push(i);
            }
        }
    }
    deps
}

#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub state: StepState,
    pub tool: String,
    /// Where it may run, decided at submit; shared by the steps it is the same for
    /// (most of a run's), see [`share`].
    pub placement: Arc<Placement>,
    /// Attempts started so far, all causes.
    pub attempts: u32,
    /// Own failures counted against the retry budget (reset by a release).
    pub failures: u32,
    /// Attempts lost with their agent; these do not spend the step's own retries.
    pub lost_count: u32,
    /// Losses in a row: a step that keeps losing agents is poison.
    pub lost_streak: u32,
    /// When it last became ready (for `max_wait`).
    pub ready_since: Option<i64>,
    /// The same moment in µs, for dispatch latency.
    pub ready_us: Option<i64>,
    /// Needs that have not succeeded yet.
    pub waiting_on: u32,
    pub next_attempt_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub reason: String,
    pub result: Option<String>,
    /// Every attempt of this step, oldest first.
    pub attempt_ids: Vec<String>,
    /// The attempt that is live now, if any.
    pub current: Option<String>,
    /// What its attempts reported: cost in millionths of a dollar, and tokens.
    pub cost_micros: i64,
    pub tokens: i64,
}

/// A spec's budget with what releases raised (millionths of a dollar, tokens).
pub fn budget_of(
    spec: Option<baton_common::spec::Budget>,
    micros: Option<i64>,
    tokens: Option<i64>,
) -> Option<baton_common::spec::Budget> {
    if micros.is_none() && tokens.is_none() {
        return spec;
    }
    let mut b = spec.unwrap_or_default();
    if let Some(m) = micros {
        b.max_cost_usd = Some(m as f64 / 1e6);
    }
    if let Some(t) = tokens {
        b.max_tokens = Some(t.max(0) as u64);
    }
    Some(b)
}

impl Step {
    /// A new step that runs `tool` at `placement`, waiting on its `needs`.
    pub fn new(tool: String, placement: Arc<Placement>, needs: &[String]) -> Step {
        let waiting_on = needs.len() as u32;
        Step {
            state: if waiting_on == 0 { StepState::Ready } else { StepState::Waiting },
            tool,
            placement,
            attempts: 0,
            failures: 0,
            lost_count: 0,
            lost_streak: 0,
            ready_since: None,
            ready_us: None,
            waiting_on,
            next_attempt_at: None,
            started_at: None,
            finished_at: None,
            reason: String::new(),
            result: None,
            attempt_ids: Vec::new(),
            current: None,
            cost_micros: 0,
            tokens: 0,
        }
    }

    /// The step a row holds; `placement` is the row's own, or for a row written before
    /// placements were stored, the one its rule gives now.
    /// Equal placements are shared through `last` as at submit.
    pub fn from_row(
        row: &StepRow,
        placement: impl FnOnce() -> Placement,
        last: &mut Option<Arc<Placement>>,
    ) -> Result<Step, StoreError> {
        let placement = if row.route.is_empty() {
            placement()
        } else {
            serde_json::from_str(&row.route).map_err(|e| {
                StoreError::Corrupt(format!("run {} step {}: bad route: {e}", row.run_id, row.step_id))
            })?
        };
        let placement = share(last, placement);
        Ok(Step {
            state: parse_state(&row.state)?,
            tool: row.tool.clone(),
            placement,
            attempts: row.attempts as u32,
            failures: row.failures as u32,
            lost_count: row.lost_count as u32,
            lost_streak: 0,
            ready_since: None,
            ready_us: None,
            waiting_on: 0,
            next_attempt_at: row.next_attempt_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            reason: row.reason.clone(),
            result: row.result.clone(),
            attempt_ids: Vec::new(),
            current: None,
            cost_micros: row.cost_micros,
            tokens: row.tokens,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub id: String,
    pub run_id: String,
    pub step_idx: usize,
    pub step_id: String,
    pub number: u32,
    pub agent_id: String,
    pub agent_name: String,
    pub lease_token: String,
    pub state: AttemptState,
    pub exit_code: Option<i32>,
    pub error_class: Option<FailureClass>,
    pub error: String,
    pub result: Option<String>,
    pub output_tail: String,
    pub assigned_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub deadline_at: Option<i64>,
    /// Its final state came from the agent's own report (not kept across restarts).
    pub reported: bool,
    /// Output bytes its agent reported at the end (not stored with the attempt).
    pub output_bytes: u64,
    /// When its assignment was committed and so sent (not before: an agent cannot be
    /// blamed for not starting what it was never sent).
    pub sent_at: Option<i64>,
    /// When its step became ready (for dispatch latency; not kept across restarts).
    pub ready_at: Option<i64>,
    /// What to mask in what it reports (not kept across restarts: rebuilt).
    pub redactor: Option<Arc<baton_common::redact::Redactor>>,
    /// A pipelined attempt's predecessors: the upstream attempts on the same agent it
    /// starts after. Empty for an attempt dispatched when its step was ready.
    pub after: Vec<String>,
    /// The concurrency keys it holds while live (its step's `concurrency:`, its tool's
    /// `max_concurrent`).
    pub concurrency: Vec<String>,
}

impl Attempt {
    pub fn to_row(&self) -> AttemptRow {
        AttemptRow {
            id: self.id.clone(),
            run_id: self.run_id.clone(),
            step_id: self.step_id.clone(),
            number: i64::from(self.number),
            agent_id: self.agent_id.clone(),
            agent_name: self.agent_name.clone(),
            lease_token: self.lease_token.clone(),
            state: self.state.as_str().to_string(),
            exit_code: self.exit_code.map(i64::from),
            error_class: self.error_class.map(FailureClass::as_str).unwrap_or_default().to_string(),
            error: self.error.clone(),
            result: self.result.clone(),
            output_tail: self.output_tail.clone(),
            assigned_at: self.assigned_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            deadline_at: self.deadline_at,
            follows: if self.after.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&self.after).unwrap_or_default()
            },
        }
    }

    pub fn from_row(row: &AttemptRow, step_idx: usize, now: i64) -> Result<Attempt, StoreError> {
        let state: AttemptState = parse_state(&row.state)?;
        let after = if row.follows.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&row.follows)
                .map_err(|e| StoreError::Corrupt(format!("attempt {}: bad follows: {e}", row.id)))?
        };
        Ok(Attempt {
            id: row.id.clone(),
            run_id: row.run_id.clone(),
            step_idx,
            step_id: row.step_id.clone(),
            number: row.number as u32,
            agent_id: row.agent_id.clone(),
            agent_name: row.agent_name.clone(),
            lease_token: row.lease_token.clone(),
            state,
            exit_code: row.exit_code.map(|c| c as i32),
            error_class: row.error_class.parse().ok(),
            error: row.error.clone(),
            result: row.result.clone(),
            output_tail: row.output_tail.clone(),
            assigned_at: row.assigned_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            deadline_at: row.deadline_at,
            reported: false,
            output_bytes: 0,
            // Loaded from the store: its assignment was committed.
            sent_at: Some(now),
            ready_at: None,
            redactor: None,
            after,
            concurrency: Vec::new(),
        })
    }

    pub fn attempt_ref(&self) -> pb::AttemptRef {
        pb::AttemptRef {
            attempt_id: self.id.clone(),
            lease_token: self.lease_token.clone(),
            run_id: self.run_id.clone(),
            step_id: self.step_id.clone(),
        }
    }
}

/// The sending half of an agent's stream (held by the driver, not the model).
pub(crate) type AgentTx = tokio::sync::mpsc::UnboundedSender<Result<pb::ControllerMessage, tonic::Status>>;

/// An agent's open stream, by the number the driver gave it.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: u64,
    /// The agent stopped an attempt on its own in this session (it shuts down, or lost
    /// its controller): it gets no new work until it connects again.
    pub stopping: bool,
}

#[derive(Debug)]
pub(crate) struct Agent {
    pub id: String,
    pub name: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub tools: Vec<pb::Tool>,
    pub slots: u32,
    pub state: AgentState,
    pub session: Option<Session>,
    pub connected_at: i64,
    pub last_seen: i64,
    /// When the agent counts as lost unless heard from before.
    pub lost_at: i64,
    /// Live attempts assigned to it.
    pub running: BTreeSet<String>,
    /// The pipelined ones among them whose steps still wait for their predecessors'
    /// results: they hold no slot until then.
    pub held_back: BTreeSet<String>,
    /// An operator drained it: no new work.
    pub draining: bool,
}

impl Agent {
    /// An agent known by id and name only, disconnected, lost at `lost_at` unless it
    /// comes back.
    pub fn new(id: &str, name: &str, seen: i64, lost_at: i64) -> Agent {
        Agent {
            id: id.to_string(),
            name: name.to_string(),
            version: String::new(),
            labels: BTreeMap::new(),
            tools: Vec::new(),
            slots: 0,
            state: AgentState::Disconnected,
            session: None,
            connected_at: seen,
            last_seen: seen,
            lost_at,
            running: BTreeSet::new(),
            held_back: BTreeSet::new(),
            draining: false,
        }
    }

    pub fn has_tool(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t.name == tool)
    }

    pub fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.slots_used())
    }

    /// Slots its attempts take (a pipelined one waiting for its predecessors takes none).
    pub fn slots_used(&self) -> u32 {
        (self.running.len() - self.held_back.len()) as u32
    }

    /// Connected, not drained and not stopping: new work may be sent to it.
    pub fn takes_work(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.stopping) && !self.draining
    }

    pub fn can_take(&self, tool: &str) -> bool {
        self.takes_work() && self.free_slots() > 0 && self.has_tool(tool)
    }

    pub fn to_row(&self) -> AgentRow {
        AgentRow {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            labels: serde_json::to_string(&self.labels).unwrap_or_else(|_| "{}".into()),
            tools: serde_json::to_string(&self.tools).unwrap_or_else(|_| "[]".into()),
            slots: i64::from(self.slots),
            state: self.state.as_str().to_string(),
            connected_at: self.connected_at,
            last_seen_at: self.last_seen,
            draining: self.draining,
        }
    }

    pub fn to_pb(&self) -> pb::Agent {
        pb::Agent {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            labels: self.labels.clone().into_iter().collect(),
            tools: self.tools.clone(),
            slots: self.slots,
            slots_used: self.slots_used(),
            state: self.state.to_pb(),
            last_seen: Some(proto::timestamp(self.last_seen)),
            connected_at: Some(proto::timestamp(self.connected_at)),
            draining: self.draining,
        }
    }
}
