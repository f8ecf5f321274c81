//! Row types of the store's tables and their column mappings.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{AnyQuery, Record};

/// A run row. `spec` is the validated workstream as JSON; `params` a JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub id: String,
    pub workstream: String,
    pub state: String,
    pub spec: String,
    pub params: String,
    pub reason: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The client's id of the submit that created the run (empty when none was given).
    pub request_id: String,
}

impl Record for RunRow {
    const TABLE: &'static str = "runs";
    const PG_RECORD: &'static str = "id text, workstream text, state text, spec text, params text, reason text, created_at bigint, started_at bigint, finished_at bigint, request_id text";
    const COLUMNS: &'static str =
        "id, workstream, state, spec, params, reason, created_at, started_at, finished_at, request_id";
    const KEY: &'static str = "id";

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.id.as_str())
            .bind(self.workstream.as_str())
            .bind(self.state.as_str())
            .bind(self.spec.as_str())
            .bind(self.params.as_str())
            .bind(self.reason.as_str())
            .bind(self.created_at)
            .bind(self.started_at)
            .bind(self.finished_at)
            .bind(self.request_id.as_str())
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(RunRow {
            id: r.try_get("id")?,
            workstream: r.try_get("workstream")?,
            state: r.try_get("state")?,
            spec: r.try_get("spec")?,
            params: r.try_get("params")?,
            reason: r.try_get("reason")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            request_id: r.try_get("request_id")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRow {
    pub run_id: String,
    pub step_id: String,
    pub idx: i64,
    pub state: String,
    pub tool: String,
    pub attempts: i64,
    pub failures: i64,
    pub lost_count: i64,
    pub next_attempt_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub reason: String,
    pub result: Option<String>,
}

impl Record for StepRow {
    const TABLE: &'static str = "steps";
    const PG_RECORD: &'static str = "run_id text, step_id text, idx bigint, state text, tool text, attempts bigint, failures bigint, lost_count bigint, next_attempt_at bigint, started_at bigint, finished_at bigint, reason text, result text";
    const COLUMNS: &'static str = "run_id, step_id, idx, state, tool, attempts, failures, lost_count, next_attempt_at, started_at, finished_at, reason, result";
    const KEY: &'static str = "run_id, step_id";

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.run_id.as_str())
            .bind(self.step_id.as_str())
            .bind(self.idx)
            .bind(self.state.as_str())
            .bind(self.tool.as_str())
            .bind(self.attempts)
            .bind(self.failures)
            .bind(self.lost_count)
            .bind(self.next_attempt_at)
            .bind(self.started_at)
            .bind(self.finished_at)
            .bind(self.reason.as_str())
            .bind(self.result.as_deref())
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(StepRow {
            run_id: r.try_get("run_id")?,
            step_id: r.try_get("step_id")?,
            idx: r.try_get("idx")?,
            state: r.try_get("state")?,
            tool: r.try_get("tool")?,
            attempts: r.try_get("attempts")?,
            failures: r.try_get("failures")?,
            lost_count: r.try_get("lost_count")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            reason: r.try_get("reason")?,
            result: r.try_get("result")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRow {
    pub id: String,
    pub run_id: String,
    pub step_id: String,
    pub number: i64,
    pub agent_id: String,
    pub agent_name: String,
    pub lease_token: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub error_class: String,
    pub error: String,
    pub result: Option<String>,
    pub output_tail: String,
    pub assigned_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub deadline_at: Option<i64>,
}

impl Record for AttemptRow {
    const TABLE: &'static str = "step_attempts";
    const PG_RECORD: &'static str = "id text, run_id text, step_id text, number bigint, agent_id text, agent_name text, lease_token text, state text, exit_code bigint, error_class text, error text, result text, output_tail text, assigned_at bigint, started_at bigint, finished_at bigint, deadline_at bigint";
    const COLUMNS: &'static str = "id, run_id, step_id, number, agent_id, agent_name, lease_token, state, exit_code, error_class, error, result, output_tail, assigned_at, started_at, finished_at, deadline_at";
    const KEY: &'static str = "id";

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.id.as_str())
            .bind(self.run_id.as_str())
            .bind(self.step_id.as_str())
            .bind(self.number)
            .bind(self.agent_id.as_str())
            .bind(self.agent_name.as_str())
            .bind(self.lease_token.as_str())
            .bind(self.state.as_str())
            .bind(self.exit_code)
            .bind(self.error_class.as_str())
            .bind(self.error.as_str())
            .bind(self.result.as_deref())
            .bind(self.output_tail.as_str())
            .bind(self.assigned_at)
            .bind(self.started_at)
            .bind(self.finished_at)
            .bind(self.deadline_at)
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(AttemptRow {
            id: r.try_get("id")?,
            run_id: r.try_get("run_id")?,
            step_id: r.try_get("step_id")?,
            number: r.try_get("number")?,
            agent_id: r.try_get("agent_id")?,
            agent_name: r.try_get("agent_name")?,
            lease_token: r.try_get("lease_token")?,
            state: r.try_get("state")?,
            exit_code: r.try_get("exit_code")?,
            error_class: r.try_get("error_class")?,
            error: r.try_get("error")?,
            result: r.try_get("result")?,
            output_tail: r.try_get("output_tail")?,
            assigned_at: r.try_get("assigned_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            deadline_at: r.try_get("deadline_at")?,
        })
    }
}

/// One run event. Empty strings stand for "not applicable".
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct EventRow {
    pub run_id: String,
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    pub step_id: String,
    pub attempt_id: String,
    pub run_state: String,
    pub step_state: String,
    pub attempt_state: String,
    pub message: String,
    /// Leader epoch of the controller that wrote it (0 with SQLite).
    pub epoch: i64,
    /// Who caused it (an API call's caller); empty for the controller's own decisions.
    pub actor: String,
}

impl Record for EventRow {
    const TABLE: &'static str = "run_events";
    const PG_RECORD: &'static str = "run_id text, seq bigint, at bigint, kind text, step_id text, attempt_id text, run_state text, step_state text, attempt_state text, message text, epoch bigint, actor text";
    const COLUMNS: &'static str = "run_id, seq, at, kind, step_id, attempt_id, run_state, step_state, attempt_state, message, epoch, actor";
    const KEY: &'static str = "run_id, seq";
    const UPSERT: bool = false;

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.run_id.as_str())
            .bind(self.seq)
            .bind(self.at)
            .bind(self.kind.as_str())
            .bind(self.step_id.as_str())
            .bind(self.attempt_id.as_str())
            .bind(self.run_state.as_str())
            .bind(self.step_state.as_str())
            .bind(self.attempt_state.as_str())
            .bind(self.message.as_str())
            .bind(self.epoch)
            .bind(self.actor.as_str())
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(EventRow {
            run_id: r.try_get("run_id")?,
            seq: r.try_get("seq")?,
            at: r.try_get("at")?,
            kind: r.try_get("kind")?,
            step_id: r.try_get("step_id")?,
            attempt_id: r.try_get("attempt_id")?,
            run_state: r.try_get("run_state")?,
            step_state: r.try_get("step_state")?,
            attempt_state: r.try_get("attempt_state")?,
            message: r.try_get("message")?,
            epoch: r.try_get("epoch")?,
            actor: r.try_get("actor")?,
        })
    }
}

/// An agent as last seen. `labels` is a JSON object, `tools` a JSON list of
/// `{name, version}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    pub version: String,
    pub labels: String,
    pub tools: String,
    pub slots: i64,
    pub state: String,
    pub connected_at: i64,
    pub last_seen_at: i64,
    #[serde(serialize_with = "bool_as_int")]
    pub draining: bool,
}

/// Booleans are stored as 0/1 in both databases.
fn bool_as_int<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(i64::from(*v))
}

impl Record for AgentRow {
    const TABLE: &'static str = "agents";
    const PG_RECORD: &'static str = "id text, name text, version text, labels text, tools text, slots bigint, state text, connected_at bigint, last_seen_at bigint, draining bigint";
    const COLUMNS: &'static str =
        "id, name, version, labels, tools, slots, state, connected_at, last_seen_at, draining";
    const KEY: &'static str = "id";

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.id.as_str())
            .bind(self.name.as_str())
            .bind(self.version.as_str())
            .bind(self.labels.as_str())
            .bind(self.tools.as_str())
            .bind(self.slots)
            .bind(self.state.as_str())
            .bind(self.connected_at)
            .bind(self.last_seen_at)
            .bind(i64::from(self.draining))
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(AgentRow {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            version: r.try_get("version")?,
            labels: r.try_get("labels")?,
            tools: r.try_get("tools")?,
            slots: r.try_get("slots")?,
            state: r.try_get("state")?,
            connected_at: r.try_get("connected_at")?,
            last_seen_at: r.try_get("last_seen_at")?,
            draining: r.try_get::<i64, _>("draining")? != 0,
        })
    }
}

/// A circuit breaker's persisted state; `agent_id` is empty for a tool's own breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerRow {
    pub tool: String,
    pub agent_id: String,
    pub state: String,
    pub consecutive: i64,
    pub opened_at: i64,
    pub updated_at: i64,
}

impl Record for BreakerRow {
    const TABLE: &'static str = "breakers";
    const PG_RECORD: &'static str =
        "tool text, agent_id text, state text, consecutive bigint, opened_at bigint, updated_at bigint";
    const COLUMNS: &'static str = "tool, agent_id, state, consecutive, opened_at, updated_at";
    const KEY: &'static str = "tool, agent_id";

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.tool.as_str())
            .bind(self.agent_id.as_str())
            .bind(self.state.as_str())
            .bind(self.consecutive)
            .bind(self.opened_at)
            .bind(self.updated_at)
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(BreakerRow {
            tool: r.try_get("tool")?,
            agent_id: r.try_get("agent_id")?,
            state: r.try_get("state")?,
            consecutive: r.try_get("consecutive")?,
            opened_at: r.try_get("opened_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// A chunk of an attempt's output, in order of `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    pub attempt_id: String,
    pub seq: i64,
    pub data: Vec<u8>,
}

impl Record for OutputRow {
    const TABLE: &'static str = "attempt_output";
    const PG_RECORD: &'static str = "attempt_id text, seq bigint";
    const COLUMNS: &'static str = "attempt_id, seq, data";
    const KEY: &'static str = "attempt_id, seq";
    const UPSERT: bool = false;

    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.attempt_id.as_str()).bind(self.seq).bind(self.data.as_slice())
    }

    fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(OutputRow {
            attempt_id: r.try_get("attempt_id")?,
            seq: r.try_get("seq")?,
            data: r.try_get("data")?,
        })
    }
}
