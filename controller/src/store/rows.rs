//! Row types of the store's tables. Each table's columns are declared once, in the
//! `record!` that defines its row type: the SQL column lists, the Postgres record type
//! for reading rows from JSON, binding and decoding all come from that declaration.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{AnyQuery, Record, Write};

/// A Rust type stored in one column: how it binds, decodes, and its Postgres type.
pub(crate) trait Column: Sized {
    const PG: &'static str;
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q>;
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error>;
}

impl Column for String {
    const PG: &'static str = "text";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.as_str())
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        r.try_get(name)
    }
}

impl Column for Option<String> {
    const PG: &'static str = "text";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.as_deref())
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        r.try_get(name)
    }
}

impl Column for i64 {
    const PG: &'static str = "bigint";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(*self)
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        r.try_get(name)
    }
}

impl Column for Option<i64> {
    const PG: &'static str = "bigint";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(*self)
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        r.try_get(name)
    }
}

/// Booleans are stored as 0/1 in both databases.
impl Column for bool {
    const PG: &'static str = "bigint";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(i64::from(*self))
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        Ok(r.try_get::<i64, _>(name)? != 0)
    }
}

impl Column for Vec<u8> {
    const PG: &'static str = "bytea";
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(self.as_slice())
    }
    fn get(r: &AnyRow, name: &str) -> Result<Self, sqlx::Error> {
        r.try_get(name)
    }
}

/// Declares a row type of `table`: its fields are the table's columns, in order.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $table:literal, key ($($key:ident),+), $write:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Default, Serialize)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),+
        }

        impl Record for $name {
            const TABLE: &'static str = $table;
            const COLUMNS: &'static [&'static str] = &[$(stringify!($field)),+];
            const PG_TYPES: &'static [&'static str] = &[$(<$ty as Column>::PG),+];
            const KEY: &'static [&'static str] = &[$(stringify!($key)),+];
            const WRITE: Write = Write::$write;

            fn column_list() -> &'static str {
                static LIST: std::sync::LazyLock<String> =
                    std::sync::LazyLock::new(|| <$name as Record>::COLUMNS.join(", "));
                &LIST
            }

            fn row_sql() -> &'static str {
                static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(super::row_sql::<$name>);
                &SQL
            }

            fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
                $( let q = Column::bind(&self.$field, q); )+
                q
            }

            fn bind_sqlite(&self, stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<()> {
                let mut i = 0;
                $(
                    i += 1;
                    stmt.raw_bind_parameter(i, &self.$field)?;
                )+
                Ok(())
            }

            fn decode(r: &AnyRow) -> Result<Self, sqlx::Error> {
                Ok($name { $( $field: Column::get(r, stringify!($field))? ),+ })
            }
        }
    };
}

record! {
    /// A run as submitted, written once. `spec` is the validated workstream as JSON;
    /// `params` and `labels` JSON objects. Its state columns change through
    /// [`RunStateRow`], which leaves the spec alone.
    pub struct RunRow in "runs", key (id), Insert {
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
        /// The display name given at submit.
        pub name: String,
        pub labels: String,
        /// The workstream's own retention (`retain:`); NULL for the controller's.
        pub retain_ms: Option<i64>,
        /// The run this one reruns (`RerunRun`); empty for a submitted run.
        pub rerun_of: String,
        /// When its `deadline` fails it (a retry counts it again); NULL without one.
        pub deadline_at: Option<i64>,
        /// 1: submitted with `--no-cache` (every step runs).
        pub no_cache: i64,
        /// Higher first when slots are scarce.
        pub priority: i64,
        /// 1: waiting for a slot of its workstream's concurrency key.
        pub queued: i64,
        /// What its attempts reported: cost in millionths of a dollar, and tokens.
        pub cost_micros: i64,
        pub tokens: i64,
        /// Its budget as raised at a release; NULL: its spec's.
        pub budget_micros: Option<i64>,
        pub budget_tokens: Option<i64>,
    }
}

record! {
    /// The part of a run row that changes as it runs.
    pub struct RunStateRow in "runs", key (id), Update {
        pub id: String,
        pub state: String,
        pub reason: String,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub deadline_at: Option<i64>,
        pub queued: i64,
        pub cost_micros: i64,
        pub tokens: i64,
        pub budget_micros: Option<i64>,
        pub budget_tokens: Option<i64>,
    }
}

impl RunRow {
    /// Its priority (stored wider than the API's `int32`).
    pub fn priority(&self) -> i32 {
        self.priority.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
    }

    /// The row with `s` applied.
    pub fn apply(&mut self, s: &RunStateRow) {
        self.state.clone_from(&s.state);
        self.reason.clone_from(&s.reason);
        self.started_at = s.started_at;
        self.finished_at = s.finished_at;
        self.deadline_at = s.deadline_at;
        self.queued = s.queued;
        self.cost_micros = s.cost_micros;
        self.tokens = s.tokens;
        self.budget_micros = s.budget_micros;
        self.budget_tokens = s.budget_tokens;
    }
}

record! {
    /// A run's spec written again: a `for_each` step expanded into steps it did not
    /// have at submit.
    pub struct RunSpecRow in "runs", key (id), Update {
        pub id: String,
        pub spec: String,
    }
}

record! {
    /// A step. `needs` is a JSON list of step ids; `route` the placement its router rule
    /// decided at submit (JSON; empty when no rule matched).
    pub struct StepRow in "steps", key (run_id, step_id), Upsert {
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
        pub needs: String,
        pub kind: String,
        pub route: String,
        /// What its attempts reported: cost in millionths of a dollar, and tokens.
        pub cost_micros: i64,
        pub tokens: i64,
    }
}

record! {
    pub struct AttemptRow in "step_attempts", key (id), Upsert {
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
        /// A pipelined attempt's predecessors: the attempts it starts after, as a JSON
        /// list of ids; empty for an ordinary one.
        pub follows: String,
    }
}

record! {
    /// One run event. Empty strings stand for "not applicable".
    pub struct EventRow in "run_events", key (run_id, seq), Insert {
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
        /// The run's steps in a final state, and all its steps, right after the event.
        pub steps_done: i64,
        pub steps_total: i64,
    }
}

record! {
    /// An agent as last seen. `labels` is a JSON object, `tools` a JSON list of
    /// `{name, version}`.
    pub struct AgentRow in "agents", key (id), Upsert {
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
}

/// Booleans are stored as 0/1 in both databases.
fn bool_as_int<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(i64::from(*v))
}

record! {
    /// A circuit breaker's persisted state; `agent_id` is empty for a tool's own breaker.
    pub struct BreakerRow in "breakers", key (tool, agent_id), Upsert {
        pub tool: String,
        pub agent_id: String,
        pub state: String,
        pub consecutive: i64,
        pub opened_at: i64,
        pub updated_at: i64,
    }
}

record! {
    /// A chunk of an attempt's output, in order of `seq`.
    pub struct OutputRow in "attempt_output", key (attempt_id, seq), Insert {
        pub attempt_id: String,
        pub seq: i64,
        pub data: Vec<u8>,
    }
}

record! {
    /// A cached step result (`cache:`), by key, until `expires_at`.
    pub struct CacheRow in "step_cache", key (cache_key), Upsert {
        pub cache_key: String,
        pub workstream: String,
        pub step_id: String,
        pub run_id: String,
        pub result: Option<String>,
        pub created_at: i64,
        pub expires_at: i64,
    }
}

record! {
    /// A file a step left (`artifacts:`), stored at `runs/RUN/STEP/PATH`.
    pub struct ArtifactRow in "artifacts", key (run_id, step_id, path), Upsert {
        pub run_id: String,
        pub step_id: String,
        pub path: String,
        pub attempt_id: String,
        pub size: i64,
        pub sha256: String,
        pub created_at: i64,
    }
}

record! {
    /// A schedule: its workstream (`spec`, validated JSON), params (JSON object), when it
    /// fires (`cron` in `timezone`, or `every_ms`), its policies, and `next_at`, the
    /// earliest scheduled time not handled yet.
    pub struct ScheduleRow in "schedules", key (id), Upsert {
        pub id: String,
        pub workstream: String,
        pub spec: String,
        pub params: String,
        pub cron: String,
        pub every_ms: Option<i64>,
        pub timezone: String,
        pub overlap: String,
        pub catchup: String,
        pub paused: bool,
        pub next_at: i64,
        pub last_run_id: String,
        pub created_at: i64,
        pub created_by: String,
    }
}
