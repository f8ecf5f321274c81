//! Persistence of run state through sqlx's `Any` driver, so one set of SQL statements
//! serves SQLite (embedded default) and Postgres; only the DDL differs per backend.
//!
//! The engine writes through [`Store::commit`]: one [`Batch`] of row upserts and event
//! inserts in one transaction, on SQLite by a thread of its own (see `sqlite`).
//! Everything else here is a read, or a write beside the engine's.

mod auth;
mod rows;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row};
use thiserror::Error;

pub use auth::{AgentCredentialRow, Enrollment, JoinTokenRow, SecretRow, TokenRow};
pub use rows::{
    AgentRow, ArtifactRow, AttemptRow, BreakerRow, CacheRow, EventRow, OutputRow, RunRow, RunSpecRow,
    RunStateRow, ScheduleRow, StepRow,
};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://...")]
    BadUrl(String),
    #[error("run {0:?} not found")]
    RunNotFound(String),
    #[error("run id prefix {prefix:?} is ambiguous: it matches {}", matches.join(", "))]
    AmbiguousRun { prefix: String, matches: Vec<String> },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("fenced: this controller no longer leads (epoch {0} is over)")]
    Fenced(i64),
    #[error("not written: the commit before it failed")]
    Aborted,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
}

/// Rows of a batch after which the Postgres writer's connection is closed (its write
/// buffer keeps the size of the biggest message it sent).
const BIG_BATCH_ROWS: usize = 4096;

/// What [`Store::prune`] deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub runs: u64,
    /// Rows of every table: runs, steps, attempts, events, output chunks and artifacts.
    pub rows: u64,
    /// The runs deleted (their stored artifacts go too).
    pub ids: Vec<String>,
}

/// Proof of leadership for a write: the controller's id and its leader epoch. A commit
/// with a fence that is no longer current writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub epoch: i64,
}

/// Who leads, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub holder: String,
    pub address: String,
    pub epoch: i64,
    /// The lease has not run out.
    pub alive: bool,
}

/// Postgres server time in Unix milliseconds: leases are measured on one clock.
const PG_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The same on SQLite.
const SQLITE_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// Which SQL dialect the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Everything the engine changed while handling one batch of messages.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Runs submitted since the last batch, written whole once.
    pub new_runs: Vec<RunRow>,
    /// State changes of runs already written.
    pub runs: Vec<RunStateRow>,
    /// Specs of runs already written that grew (`for_each` expansions), written
    /// before their new steps.
    pub specs: Vec<RunSpecRow>,
    pub steps: Vec<StepRow>,
    pub attempts: Vec<AttemptRow>,
    pub events: Vec<EventRow>,
    pub agents: Vec<AgentRow>,
    pub breakers: Vec<BreakerRow>,
    /// Results of steps with `cache:` that succeeded.
    pub cache: Vec<CacheRow>,
    /// Artifacts of steps that succeeded.
    pub artifacts: Vec<ArtifactRow>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Rows the batch writes.
    pub fn rows(&self) -> usize {
        self.new_runs.len()
            + self.runs.len()
            + self.specs.len()
            + self.steps.len()
            + self.attempts.len()
            + self.events.len()
            + self.agents.len()
            + self.breakers.len()
            + self.cache.len()
            + self.artifacts.len()
    }

    pub fn clear(&mut self) {
        self.new_runs.clear();
        self.runs.clear();
        self.specs.clear();
        self.steps.clear();
        self.attempts.clear();
        self.events.clear();
        self.agents.clear();
        self.breakers.clear();
        self.cache.clear();
        self.artifacts.clear();
    }
}

/// The non-final part of the store, from which the engine rebuilds after a restart.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub runs: Vec<RunRow>,
    pub steps: Vec<StepRow>,
    pub attempts: Vec<AttemptRow>,
    pub last_seq: HashMap<String, i64>,
    pub agents: Vec<AgentRow>,
    pub breakers: Vec<BreakerRow>,
    /// The step cache.
    pub cache: Vec<CacheRow>,
}

/// A run as read back for the API: the run row, its steps and all their attempts.
#[derive(Debug)]
pub struct RunRecord {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub attempts: Vec<AttemptRow>,
    pub last_seq: i64,
    /// The runs that rerun this one, oldest first.
    pub reruns: Vec<String>,
    /// The files its steps left, by step and path.
    pub artifacts: Vec<ArtifactRow>,
}

/// Step counts by state for one run.
pub type StateCounts = HashMap<String, u32>;

/// Which runs `Store::list_runs` returns.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Any of these states; empty for all.
    pub states: Vec<String>,
    /// Empty for all.
    pub workstream: String,
    /// All of these labels with these values.
    pub labels: BTreeMap<String, String>,
    /// Only runs older than this (created_at, id): where the previous page ended.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// A bound parameter of a statement assembled at run time.
enum Arg {
    Text(String),
    Int(i64),
}

/// Observed durations (ms) for estimating how long steps take.
#[derive(Debug, Clone, Default)]
pub struct Estimates {
    pub by_step: HashMap<String, i64>,
    pub by_tool: HashMap<String, i64>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where [`Store::commit`] writes.
    writer: Writer,
    backend: Backend,
    /// Why the latest write of the engine ("commit") or of attempt output ("output")
    /// failed, until one succeeds (a full disk, say).
    refusing: std::sync::Arc<std::sync::Mutex<BTreeMap<&'static str, String>>>,
}

/// The engine's writer: its own connection, where the page and statement caches stay
/// warm (a commit on a connection another one wrote through since re-reads its pages).
#[derive(Clone)]
enum Writer {
    Sqlite(sqlite::Writer),
    /// A pool of one connection.
    Postgres(AnyPool),
}

const ACTIVE: &str = "('pending', 'running', 'quarantined')";

/// A connection that comes back still inside a transaction (its COMMIT and ROLLBACK
/// both failed, on a full disk say) is closed, not handed out again.
fn release_check(
    conn: &mut sqlx::AnyConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + '_>> {
    use sqlx::Connection;
    let fine = !conn.is_in_transaction();
    Box::pin(async move { Ok(fine) })
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        let pool = Self::pool(backend, url, 8).await?;
        Self::migrate(backend, &pool).await?;
        let writer = match backend {
            Backend::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&sqlite_url(url))?;
                let path = options.get_filename();
                if path.to_string_lossy().contains(":memory:") {
                    return Err(StoreError::BadUrl(format!(
                        "{url} (an in-memory database is not shared between connections)"
                    )));
                }
                Writer::Sqlite(sqlite::Writer::open(path)?)
            }
            Backend::Postgres => Writer::Postgres(Self::pool(backend, url, 1).await?),
        };
        Ok(Store { pool, writer, backend, refusing: Default::default() })
    }

    async fn pool(backend: Backend, url: &str, connections: u32) -> Result<AnyPool, StoreError> {
        Ok(match backend {
            Backend::Sqlite => {
                let url = sqlite_url(url);
                // No ping before each use: a broken connection fails its query, and the
                // engine retries; a ping would cost a round trip on every commit.
                AnyPoolOptions::new()
                    .max_connections(connections)
                    .test_before_acquire(false)
                    .after_release(release_check)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets API reads run beside the engine's writes; FULL keeps
                            // every commit durable; the busy timeout covers readers that
                            // race a checkpoint.
                            sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA temp_store = MEMORY").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA cache_size = -16384").execute(&mut *conn).await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(connections)
                    .test_before_acquire(false)
                    .after_release(release_check)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        })
    }

    async fn migrate(backend: Backend, pool: &AnyPool) -> Result<(), StoreError> {
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why the database refuses the engine's writes right now, if it does: commits are
    /// being retried, and nothing that needs one can be done until they succeed.
    pub fn refusing(&self) -> Option<String> {
        let r = self.refusing.lock().ok()?;
        (!r.is_empty()).then(|| r.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// Notes how a write of `what` went, for [`Store::refusing`].
    pub(crate) fn note_write<T>(&self, what: &'static str, result: &Result<T, StoreError>) {
        if let Ok(mut r) = self.refusing.lock() {
            match result {
                Ok(_) => {
                    r.remove(what);
                }
                Err(StoreError::Aborted | StoreError::Fenced(_)) => {}
                Err(e) => {
                    r.insert(what, e.to_string());
                }
            }
        }
    }

    pub async fn close(&self) {
        match &self.writer {
            Writer::Sqlite(w) => w.close().await,
            Writer::Postgres(p) => p.close().await,
        }
        self.pool.close().await;
    }

    /// Writes a batch in one transaction: all of it or none of it. With a fence, the
    /// transaction first checks (and locks) the leader row: a deposed leader commits
    /// nothing, and a takeover waits for a commit in flight.
    ///
    /// On Postgres each table's rows travel as one JSON array through one fixed
    /// statement, so a commit costs the same few round trips however many rows it has.
    pub async fn commit(
        &self,
        batch: impl Into<Arc<Batch>>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        self.commit_after(batch, fence, std::future::ready(true)).await
    }

    /// [`Store::commit`], written only once `after` says the commit before it is stored
    /// (false: that one failed, and this one writes nothing). How it went is noted for
    /// [`Store::refusing`].
    pub async fn commit_after(
        &self,
        batch: impl Into<Arc<Batch>>,
        fence: Option<&Fence>,
        after: impl Future<Output = bool>,
    ) -> Result<(), StoreError> {
        let r = self.write_batch(batch.into(), fence, after).await;
        self.note_write("commit", &r);
        r
    }

    async fn write_batch(
        &self,
        batch: Arc<Batch>,
        fence: Option<&Fence>,
        after: impl Future<Output = bool>,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return if after.await { Ok(()) } else { Err(StoreError::Aborted) };
        }
        match &self.writer {
            Writer::Sqlite(w) => {
                if !after.await {
                    return Err(StoreError::Aborted);
                }
                w.commit(batch, fence.cloned()).await
            }
            Writer::Postgres(pool) => {
                let json = |e: serde_json::Error| StoreError::Corrupt(format!("cannot encode rows: {e}"));
                let arrays = [
                    serde_json::to_string(&batch.new_runs).map_err(json)?,
                    serde_json::to_string(&batch.runs).map_err(json)?,
                    serde_json::to_string(&batch.specs).map_err(json)?,
                    serde_json::to_string(&batch.steps).map_err(json)?,
                    serde_json::to_string(&batch.attempts).map_err(json)?,
                    serde_json::to_string(&batch.events).map_err(json)?,
                    serde_json::to_string(&batch.agents).map_err(json)?,
                    serde_json::to_string(&batch.breakers).map_err(json)?,
                    serde_json::to_string(&batch.cache).map_err(json)?,
                    serde_json::to_string(&batch.artifacts).map_err(json)?,
                ];
                if !after.await {
                    return Err(StoreError::Aborted);
                }
                Self::commit_postgres(pool, &arrays, fence, batch.rows() >= BIG_BATCH_ROWS).await
            }
        }
    }

    /// A Postgres transaction that checks the fence first, then writes each table.
    /// After a `big` one the connection is closed (the pool opens another): its write
    /// buffer keeps the size of the biggest message it sent, here the whole batch's rows.
    async fn commit_postgres(
        writer: &AnyPool,
        arrays: &[String; 10],
        fence: Option<&Fence>,
        big: bool,
    ) -> Result<(), StoreError> {
        static STATEMENTS: std::sync::LazyLock<[String; 10]> = std::sync::LazyLock::new(|| {
            [
                json_write_sql::<RunRow>(),
                json_write_sql::<RunStateRow>(),
                json_write_sql::<RunSpecRow>(),
                json_write_sql::<StepRow>(),
                json_write_sql::<AttemptRow>(),
                json_write_sql::<EventRow>(),
                json_write_sql::<AgentRow>(),
                json_write_sql::<BreakerRow>(),
                json_write_sql::<CacheRow>(),
                json_write_sql::<ArtifactRow>(),
            ]
        });
        use sqlx::Connection;
        let mut conn = writer.acquire().await?;
        let mut tx = conn.begin().await?;
        if let Some(f) = fence {
            let row = sqlx::query(AssertSqlSafe(format!(
                "UPDATE leader SET holder = holder WHERE id = 1 AND holder = $1 AND epoch = $2 AND lease_until > {PG_NOW_MS}"
            )))
            .bind(f.holder.as_str())
            .bind(f.epoch)
            .execute(&mut *tx)
            .await?;
            if row.rows_affected() == 0 {
                return Err(StoreError::Fenced(f.epoch));
            }
        }
        for (sql, rows) in STATEMENTS.iter().zip(arrays) {
            if rows != "[]" {
                sqlx::query(AssertSqlSafe(sql.as_str())).bind(rows.as_str()).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        if big {
            // The commit stands whatever closing does.
            if let Err(e) = conn.close().await {
                tracing::debug!(error = %e, "closing the writer's connection after a big batch");
            }
        }
        Ok(())
    }

    /// Everything the engine needs to resume: non-final runs with their steps, attempts
    /// and last event numbers, and the known agents.
    pub async fn load_active(&self) -> Result<Snapshot, StoreError> {
        let runs = format!("SELECT id FROM runs WHERE state IN {ACTIVE}");
        let mut snap = self.load_runs(&runs, None).await?;
        snap.agents = fetch(&self.pool, &format!("SELECT {} FROM agents", AgentRow::column_list())).await?;
        snap.breakers =
            fetch(&self.pool, &format!("SELECT {} FROM breakers", BreakerRow::column_list())).await?;
        snap.cache =
            fetch(&self.pool, &format!("SELECT {} FROM step_cache", CacheRow::column_list())).await?;
        Ok(snap)
    }

    /// A run's artifacts, by step and path.
    pub async fn list_artifacts(&self, run_id: &str) -> Result<Vec<ArtifactRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM artifacts WHERE run_id = $1 ORDER BY step_id, path",
            ArtifactRow::column_list()
        );
        fetch_bound(&self.pool, &sql, run_id).await
    }

    /// Writes a schedule whole (a new one).
    pub async fn put_schedule(&self, row: &ScheduleRow) -> Result<(), StoreError> {
        let q = row.bind(sqlx::query(AssertSqlSafe(ScheduleRow::row_sql())));
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Every schedule, oldest first.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        fetch(
            &self.pool,
            &format!("SELECT {} FROM schedules ORDER BY created_at, id", ScheduleRow::column_list()),
        )
        .await
    }

    /// The schedule whose id is `prefix` or starts with it.
    pub async fn get_schedule(&self, prefix: &str) -> Result<ScheduleRow, StoreError> {
        let sql = format!(
            "SELECT {} FROM schedules WHERE id LIKE $1 ORDER BY id LIMIT 2",
            ScheduleRow::column_list()
        );
        let pattern = format!("{}%", prefix.trim().replace(['%', '_'], ""));
        let mut rows: Vec<ScheduleRow> = fetch_bound(&self.pool, &sql, &pattern).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            0 => Err(StoreError::NotFound(format!("no schedule {prefix:?}"))),
            _ => Err(StoreError::Conflict(format!("schedule id {prefix:?} is ambiguous: give more of it"))),
        }
    }

    /// Schedules not paused whose next time has come.
    pub async fn due_schedules(&self, now_ms: i64) -> Result<Vec<ScheduleRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM schedules WHERE paused = 0 AND next_at <= $1 ORDER BY next_at",
            ScheduleRow::column_list()
        );
        decode_all(sqlx::query(AssertSqlSafe(sql)).bind(now_ms).fetch_all(&self.pool).await?)
    }

    /// Records that a schedule's times before `next_at` are handled, and its last run.
    pub async fn schedule_progress(
        &self,
        id: &str,
        next_at: i64,
        last_run_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE schedules SET next_at = $1, last_run_id = $2 WHERE id = $3")
            .bind(next_at)
            .bind(last_run_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Pauses a schedule, or resumes it from `next_at`.
    pub async fn pause_schedule(&self, id: &str, paused: bool, next_at: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE schedules SET paused = $1, next_at = $2 WHERE id = $3")
            .bind(i64::from(paused))
            .bind(next_at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_schedule(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM schedules WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether a run exists and has not ended.
    pub async fn run_is_active(&self, run_id: &str) -> Result<bool, StoreError> {
        let sql = format!("SELECT 1 AS x FROM runs WHERE id = $1 AND state IN {ACTIVE}");
        Ok(sqlx::query(AssertSqlSafe(sql)).bind(run_id).fetch_optional(&self.pool).await?.is_some())
    }

    /// One attempt's row, if it exists.
    pub async fn attempt(&self, attempt_id: &str) -> Result<Option<AttemptRow>, StoreError> {
        let sql = format!("SELECT {} FROM step_attempts WHERE id = $1", AttemptRow::column_list());
        Ok(fetch_bound(&self.pool, &sql, attempt_id).await?.pop())
    }

    /// The run `run_id` reruns (empty for a submitted run); `None` when there is no
    /// such run.
    pub async fn rerun_of(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query("SELECT rerun_of FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<String, _>("rerun_of"))
            .transpose()?)
    }

    /// The step cache, newest first (of one workstream, when given).
    pub async fn list_cache(&self, workstream: &str) -> Result<Vec<CacheRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM step_cache WHERE workstream = $1 OR $1 = '' ORDER BY created_at DESC, cache_key",
            CacheRow::column_list()
        );
        fetch_bound(&self.pool, &sql, workstream).await
    }

    /// Deletes cached results (of a workstream, by key prefix; all when both are empty);
    /// returns how many.
    pub async fn purge_cache(&self, workstream: &str, key_prefix: &str) -> Result<u64, StoreError> {
        // Keys are hex: a prefix of them needs no LIKE escaping.
        if !key_prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(0);
        }
        let done =
            sqlx::query("DELETE FROM step_cache WHERE ($1 = '' OR workstream = $1) AND cache_key LIKE $2")
                .bind(workstream)
                .bind(format!("{}%", key_prefix.to_ascii_lowercase()))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// One run with its steps, attempts and last event number, as `load_active` reads
    /// runs (for a retry of a run that has ended); no agents or breakers.
    pub async fn load_run(&self, run_id: &str) -> Result<Snapshot, StoreError> {
        let snap = self.load_runs("SELECT id FROM runs WHERE id = $1", Some(run_id)).await?;
        if snap.runs.is_empty() {
            return Err(StoreError::RunNotFound(run_id.to_string()));
        }
        Ok(snap)
    }

    /// The runs whose ids `ids` (a query, with `$1` bound to `bind`) selects, with their
    /// steps, attempts and last event numbers.
    async fn load_runs(&self, ids: &str, bind: Option<&str>) -> Result<Snapshot, StoreError> {
        async fn get<R: Record>(pool: &AnyPool, sql: &str, bind: Option<&str>) -> Result<Vec<R>, StoreError> {
            match bind {
                Some(v) => fetch_bound(pool, sql, v).await,
                None => fetch(pool, sql).await,
            }
        }
        let pool = &self.pool;
        let runs = get(
            pool,
            &format!(
                "SELECT {} FROM runs WHERE id IN ({ids}) ORDER BY created_at, id",
                RunRow::column_list()
            ),
            bind,
        )
        .await?;
        let steps = get(
            pool,
            &format!(
                "SELECT {} FROM steps WHERE run_id IN ({ids}) ORDER BY run_id, idx",
                StepRow::column_list()
            ),
            bind,
        )
        .await?;
        let attempts = get(
            pool,
            &format!(
                "SELECT {} FROM step_attempts WHERE run_id IN ({ids}) ORDER BY run_id, step_id, number",
                AttemptRow::column_list()
            ),
            bind,
        )
        .await?;
        let seq =
            format!("SELECT run_id, MAX(seq) AS seq FROM run_events WHERE run_id IN ({ids}) GROUP BY run_id");
        let mut q = sqlx::query(AssertSqlSafe(seq));
        if let Some(v) = bind {
            q = q.bind(v.to_string());
        }
        let mut last_seq = HashMap::new();
        for r in q.fetch_all(pool).await? {
            last_seq.insert(r.try_get::<String, _>("run_id")?, r.try_get::<i64, _>("seq")?);
        }
        Ok(Snapshot {
            runs,
            steps,
            attempts,
            last_seq,
            agents: Vec::new(),
            breakers: Vec::new(),
            cache: Vec::new(),
        })
    }

    /// The run a submit with this request id created, if any.
    pub async fn run_by_request_id(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT id FROM runs WHERE request_id = $1 AND request_id <> '' LIMIT 1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("id")).transpose()?)
    }

    /// The full id of the run whose id is `prefix` or starts with it.
    pub async fn resolve_run_id(&self, prefix: &str) -> Result<String, StoreError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        let prefix = prefix.as_str();
        // Ids are lowercase hex and '-', so a prefix of those needs no LIKE escaping.
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(StoreError::RunNotFound(prefix.to_string()));
        }
        let rows = sqlx::query("SELECT id FROM runs WHERE id LIKE $1 ORDER BY id LIMIT 6")
            .bind(format!("{prefix}%"))
            .fetch_all(&self.pool)
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        match ids.len() {
            0 => Err(StoreError::RunNotFound(prefix.to_string())),
            1 => Ok(ids.into_iter().next().unwrap_or_default()),
            _ if ids.iter().any(|id| id == prefix) => Ok(prefix.to_string()),
            _ => Err(StoreError::AmbiguousRun { prefix: prefix.to_string(), matches: ids }),
        }
    }

    pub async fn get_run(&self, run_id: &str) -> Result<RunRecord, StoreError> {
        let mut runs: Vec<RunRow> = fetch_bound(
            &self.pool,
            &format!("SELECT {} FROM runs WHERE id = $1", RunRow::column_list()),
            run_id,
        )
        .await?;
        let run = runs.pop().ok_or_else(|| StoreError::RunNotFound(run_id.to_string()))?;
        let steps = fetch_bound(
            &self.pool,
            &format!("SELECT {} FROM steps WHERE run_id = $1 ORDER BY idx", StepRow::column_list()),
            run_id,
        )
        .await?;
        let attempts = fetch_bound(
            &self.pool,
            &format!(
                "SELECT {} FROM step_attempts WHERE run_id = $1 ORDER BY step_id, number",
                AttemptRow::column_list()
            ),
            run_id,
        )
        .await?;
        let last_seq = self.last_seq(run_id).await?;
        let reruns =
            sqlx::query("SELECT id FROM runs WHERE rerun_of = $1 AND rerun_of <> '' ORDER BY created_at, id")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
        let artifacts = self.list_artifacts(run_id).await?;
        Ok(RunRecord { run, steps, attempts, last_seq, reruns, artifacts })
    }

    pub async fn last_seq(&self, run_id: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM run_events WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("seq")?)
    }

    /// One page of runs, newest first, that pass `f`, each with its step counts by
    /// state, in one query. The rows' `spec` is left empty (a list does not show it).
    pub async fn list_runs(&self, f: &RunFilter) -> Result<Vec<(RunRow, StateCounts)>, StoreError> {
        let mut conds: Vec<String> = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        let param = |args: &mut Vec<Arg>, a: Arg| {
            args.push(a);
            format!("${}", args.len())
        };
        if !f.states.is_empty() {
            let ps: Vec<String> = f.states.iter().map(|st| param(&mut args, Arg::Text(st.clone()))).collect();
            conds.push(format!("state IN ({})", ps.join(", ")));
        }
        if !f.workstream.is_empty() {
            conds.push(format!("workstream = {}", param(&mut args, Arg::Text(f.workstream.clone()))));
        }
        for (k, v) in &f.labels {
            let key = match self.backend {
                // A JSON path naming the key as a quoted member (keys are checked to hold
                // no quote).
                Backend::Sqlite => param(&mut args, Arg::Text(format!("$.\"{k}\""))),
                Backend::Postgres => param(&mut args, Arg::Text(k.clone())),
            };
            let value = param(&mut args, Arg::Text(v.clone()));
            conds.push(match self.backend {
                Backend::Sqlite => format!("json_extract(labels, {key}) = {value}"),
                Backend::Postgres => format!("(labels::json ->> {key}) = {value}"),
            });
        }
        if let Some((at, id)) = &f.before {
            let at = param(&mut args, Arg::Int(*at));
            let id = param(&mut args, Arg::Text(id.clone()));
            conds.push(format!("(created_at < {at} OR (created_at = {at} AND id < {id}))"));
        }
        let limit = param(&mut args, Arg::Int(i64::from(f.limit.clamp(1, 10_000))));
        let filter = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
        let cols: Vec<String> = RunRow::COLUMNS
            .iter()
            .map(|c| if *c == "spec" { "'' AS spec".to_string() } else { format!("r.{c}") })
            .collect();
        let group: Vec<String> =
            RunRow::COLUMNS.iter().filter(|c| **c != "spec").map(|c| format!("r.{c}")).collect();
        let sql = format!(
            "SELECT {}, s.state AS step_state, COUNT(s.step_id) AS n \
             FROM (SELECT * FROM runs {filter} ORDER BY created_at DESC, id DESC LIMIT {limit}) r \
             LEFT JOIN steps s ON s.run_id = r.id \
             GROUP BY {}, s.state ORDER BY r.created_at DESC, r.id DESC",
            cols.join(", "),
            group.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            q = match a {
                Arg::Text(t) => q.bind(t),
                Arg::Int(i) => q.bind(i),
            };
        }
        let mut out: Vec<(RunRow, StateCounts)> = Vec::new();
        for row in q.fetch_all(&self.pool).await? {
            let run = RunRow::decode(&row)?;
            let state: Option<String> = row.try_get("step_state")?;
            let n = row.try_get::<i64, _>("n")? as u32;
            if out.last().is_none_or(|(r, _)| r.id != run.id) {
                out.push((run, StateCounts::new()));
            }
            if let (Some(state), Some((_, counts))) = (state, out.last_mut()) {
                counts.insert(state, n);
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub async fn step_counts(&self, run_id: &str) -> Result<StateCounts, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM steps WHERE run_id = $1 GROUP BY state")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = StateCounts::new();
        for r in rows {
            counts.insert(r.try_get("state")?, r.try_get::<i64, _>("n")? as u32);
        }
        Ok(counts)
    }

    /// Events of a run with `seq >= from_seq`, in order, at most `limit`.
    pub async fn events(&self, run_id: &str, from_seq: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM run_events WHERE run_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            EventRow::column_list()
        )))
        .bind(run_id)
        .bind(from_seq)
        .bind(limit);
        decode_all(q.fetch_all(&self.pool).await?)
    }

    /// Appends output chunks, in their own transaction (output is not run state).
    pub async fn write_output(&self, rows: &[OutputRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        use sqlx::Connection;
        let mut conn = self.pool.acquire().await?;
        let result = async {
            let mut tx = match self.backend {
                Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
                Backend::Postgres => conn.begin().await?,
            };
            write_rows(&mut tx, rows).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // After a failed write (a full disk) the connection's state is in doubt; one
            // left inside a transaction would keep SQLite from ever resetting its WAL.
            let _ = conn.close().await;
        }
        result
    }

    /// Output chunks of an attempt with `seq >= from_seq`, in order.
    pub async fn output(&self, attempt_id: &str, from_seq: i64) -> Result<Vec<OutputRow>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM attempt_output WHERE attempt_id = $1 AND seq >= $2 ORDER BY seq LIMIT 1000",
            OutputRow::column_list()
        )))
        .bind(attempt_id)
        .bind(from_seq);
        decode_all(q.fetch_all(&self.pool).await?)
    }

    /// Bytes stored for an attempt's output and the next chunk number.
    pub async fn output_size(&self, attempt_id: &str) -> Result<(u64, i64), StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) AS bytes, COALESCE(MAX(seq), 0) AS seq FROM attempt_output WHERE attempt_id = $1",
        )
        .bind(attempt_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get::<i64, _>("bytes")? as u64, row.try_get::<i64, _>("seq")? + 1))
    }

    /// Average durations of succeeded steps: per step id in recent runs of
    /// `workstream`, and per tool in recent runs of any workstream.
    pub async fn duration_estimates(&self, workstream: &str) -> Result<Estimates, StoreError> {
        let by_step = sqlx::query(
            "SELECT s.step_id AS k, CAST(AVG(s.finished_at - s.started_at) AS BIGINT) AS ms FROM steps s \
             WHERE s.run_id IN (SELECT id FROM runs WHERE workstream = $1 ORDER BY created_at DESC LIMIT 20) \
             AND s.state = 'succeeded' AND s.started_at IS NOT NULL AND s.finished_at IS NOT NULL GROUP BY s.step_id",
        )
        .bind(workstream)
        .fetch_all(&self.pool)
        .await?;
        let by_tool = sqlx::query(
            "SELECT s.tool AS k, CAST(AVG(s.finished_at - s.started_at) AS BIGINT) AS ms FROM steps s \
             WHERE s.run_id IN (SELECT id FROM runs ORDER BY created_at DESC LIMIT 50) \
             AND s.state = 'succeeded' AND s.started_at IS NOT NULL AND s.finished_at IS NOT NULL GROUP BY s.tool",
        )
        .fetch_all(&self.pool)
        .await?;
        let map = |rows: Vec<AnyRow>| -> Result<HashMap<String, i64>, StoreError> {
            rows.iter().map(|r| Ok((r.try_get::<String, _>("k")?, r.try_get::<i64, _>("ms")?))).collect()
        };
        Ok(Estimates { by_step: map(by_step)?, by_tool: map(by_tool)? })
    }

    /// Runs by state.
    pub async fn run_counts(&self) -> Result<StateCounts, StoreError> {
        let rows =
            sqlx::query("SELECT state, COUNT(*) AS n FROM runs GROUP BY state").fetch_all(&self.pool).await?;
        let mut counts = StateCounts::new();
        for r in rows {
            counts.insert(r.try_get("state")?, r.try_get::<i64, _>("n")? as u32);
        }
        Ok(counts)
    }

    /// Deletes finished runs (succeeded, failed or canceled) whose retention has passed
    /// by `now_ms`: their workstream's own (`retain:`), else `default_ms` (`None`: such
    /// runs are kept). At most `limit` runs, oldest first, each in a transaction of its
    /// own, so that the engine's commits wait behind one run's rows at most.
    pub async fn prune(
        &self,
        now_ms: i64,
        default_ms: Option<i64>,
        limit: i64,
    ) -> Result<Pruned, StoreError> {
        // Cached results past their ttl are never used again (the engine drops them too).
        sqlx::query("DELETE FROM step_cache WHERE expires_at <= $1").bind(now_ms).execute(&self.pool).await?;
        // Without a default, `now - i64::MAX / 4` is before any run finished.
        let default_ms = default_ms.unwrap_or(i64::MAX / 4);
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM runs WHERE finished_at IS NOT NULL \
             AND state IN ('succeeded', 'failed', 'canceled') \
             AND finished_at < $1 - COALESCE(retain_ms, $2) ORDER BY finished_at LIMIT $3",
        )
        .bind(now_ms)
        .bind(default_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
        let mut pruned = Pruned::default();
        for id in ids {
            pruned.rows += self.delete_finished_run(&id).await?;
            pruned.runs += 1;
            pruned.ids.push(id);
        }
        Ok(pruned)
    }

    /// Deletes a finished run with its steps, attempts, events and output; the number of
    /// rows deleted. A run that is not finished is refused (cancel it first).
    pub async fn delete_finished_run(&self, run_id: &str) -> Result<u64, StoreError> {
        use sqlx::Connection;
        let mut conn = self.pool.acquire().await?;
        let result = async {
            let mut tx = match self.backend {
                Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
                Backend::Postgres => conn.begin().await?,
            };
            let state: Option<String> = sqlx::query("SELECT state FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get("state"))
                .transpose()?;
            match state.as_deref() {
                None => return Err(StoreError::RunNotFound(run_id.to_string())),
                Some("succeeded" | "failed" | "canceled") => {}
                Some(other) => {
                    return Err(StoreError::Conflict(format!(
                        "run {run_id} is {other}: only finished runs are deleted (cancel it first)"
                    )));
                }
            }
            let mut rows = 0;
            for sql in [
                "DELETE FROM artifacts WHERE run_id = $1",
                "DELETE FROM attempt_output WHERE attempt_id IN (SELECT id FROM step_attempts WHERE run_id = $1)",
                "DELETE FROM run_events WHERE run_id = $1",
                "DELETE FROM step_attempts WHERE run_id = $1",
                "DELETE FROM steps WHERE run_id = $1",
                "DELETE FROM runs WHERE id = $1",
            ] {
                rows += sqlx::query(sql).bind(run_id).execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(rows)
        }
        .await;
        if matches!(result, Err(StoreError::Db(_))) {
            let _ = conn.close().await;
        }
        result
    }

    /// The database's size in bytes (SQLite: its pages, the WAL apart).
    pub async fn size_bytes(&self) -> Result<i64, StoreError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT page_count * page_size AS n FROM pragma_page_count(), pragma_page_size()"
            }
            Backend::Postgres => "SELECT pg_database_size(current_database())::BIGINT AS n",
        };
        Ok(sqlx::query(sql).fetch_one(&self.pool).await?.try_get::<i64, _>("n")?)
    }

    /// Writes a consistent copy of a SQLite database to `path` while it is in use
    /// (`VACUUM INTO`): a file that opens as a Baton database of its own. Postgres has
    /// its own tools (pg_dump); this refuses it.
    pub async fn backup(&self, path: &std::path::Path) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Err(StoreError::Conflict(
                "backup copies SQLite databases; back up PostgreSQL with pg_dump (see the README)".into(),
            ));
        }
        if path.exists() {
            return Err(StoreError::Conflict(format!("{} exists already; give a new file", path.display())));
        }
        let target =
            path.to_str().ok_or_else(|| StoreError::Conflict("the backup path is not UTF-8".into()))?;
        sqlx::query("VACUUM INTO $1").bind(target).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// "Now" in SQL: the database's clock on Postgres (shared by all controllers).
    fn now_sql(&self) -> String {
        match self.backend {
            Backend::Postgres => PG_NOW_MS.to_string(),
            Backend::Sqlite => SQLITE_NOW_MS.to_string(),
        }
    }

    /// Takes the lead when nobody holds a live lease: a new epoch, held by `holder` for
    /// `lease_ms`. `None` when another controller leads.
    pub async fn acquire_lead(
        &self,
        holder: &str,
        address: &str,
        lease_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let now = self.now_sql();
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE leader SET epoch = epoch + 1, holder = $1, address = $2, lease_until = {now} + $3 \
             WHERE id = 1 AND (lease_until < {now} OR holder = '') RETURNING epoch"
        )))
        .bind(holder)
        .bind(address)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<i64, _>("epoch")?),
            None => None,
        })
    }

    /// Extends a live lease; false when it ran out or someone else leads now.
    pub async fn renew_lead(&self, fence: &Fence, lease_ms: i64) -> Result<bool, StoreError> {
        let now = self.now_sql();
        let r = sqlx::query(AssertSqlSafe(format!(
            "UPDATE leader SET lease_until = {now} + $3 WHERE id = 1 AND holder = $1 AND epoch = $2 AND lease_until > {now}"
        )))
        .bind(fence.holder.as_str())
        .bind(fence.epoch)
        .bind(lease_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lead up at once (a graceful stop), so a standby need not wait.
    pub async fn release_lead(&self, fence: &Fence) -> Result<(), StoreError> {
        sqlx::query("UPDATE leader SET lease_until = 0 WHERE id = 1 AND holder = $1 AND epoch = $2")
            .bind(fence.holder.as_str())
            .bind(fence.epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn leader(&self) -> Result<LeaderInfo, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT holder, address, epoch, CASE WHEN lease_until > {} THEN 1 ELSE 0 END AS alive FROM leader WHERE id = 1",
            self.now_sql()
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(LeaderInfo {
            holder: r.try_get("holder")?,
            address: r.try_get("address")?,
            epoch: r.try_get("epoch")?,
            alive: r
                .try_get::<i32, _>("alive")
                .map(|v| v != 0)
                .or_else(|_| r.try_get::<i64, _>("alive").map(|v| v != 0))?,
        })
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        fetch(&self.pool, &format!("SELECT {} FROM agents ORDER BY name, id", AgentRow::column_list())).await
    }
}

/// `sqlite://PATH` with the file created when missing.
fn sqlite_url(url: &str) -> String {
    if url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

/// How a record's rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// A row with an existing key replaces it (state rows).
    Upsert,
    /// A row with an existing key is kept as it was (append-only rows, where a retried
    /// commit must not fail on its own earlier write).
    Insert,
    /// The row's columns are set on the existing row of its key (the changing part of
    /// a row written once).
    Update,
}

/// A row type with a fixed column list (see `record!` in rows.rs).
pub(crate) trait Record: Sized {
    const TABLE: &'static str;
    const COLUMNS: &'static [&'static str];
    /// The columns' Postgres types, for reading rows from JSON.
    const PG_TYPES: &'static [&'static str];
    /// Primary key columns.
    const KEY: &'static [&'static str];
    const WRITE: Write;
    /// `COLUMNS` joined with commas.
    fn column_list() -> &'static str;
    /// The SQLite statement that writes one row ([`row_sql`]).
    fn row_sql() -> &'static str;
    fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q>;
    /// Binds the row's columns to `?1`... of a [`Record::row_sql`] statement.
    fn bind_sqlite(&self, stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<()>;
    fn decode(row: &AnyRow) -> Result<Self, sqlx::Error>;
}

/// Multi-row inserts in chunks of power-of-two sizes, so that the driver's statement
/// cache holds a handful of statements per table however many rows a batch has, and n
/// rows take popcount(n) statements.
async fn write_rows<R: Record>(tx: &mut sqlx::Transaction<'_, Any>, rows: &[R]) -> Result<(), StoreError> {
    const CHUNKS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];
    let mut rest = rows;
    while !rest.is_empty() {
        let n = CHUNKS.iter().copied().find(|&c| c <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(n);
        let mut q = sqlx::query(AssertSqlSafe(numbered_sql::<R>(n)));
        for r in chunk {
            q = r.bind(q);
        }
        q.execute(&mut **tx).await?;
        rest = tail;
    }
    Ok(())
}

/// One statement writing `rows` rows with numbered parameters (`$1`, ...).
fn numbered_sql<R: Record>(rows: usize) -> String {
    let cols = R::COLUMNS.len();
    let tuples: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", params.join(","))
        })
        .collect();
    values_sql::<R>(&tuples.join(","))
}

/// The statement that writes the rows of a `VALUES` list (in `COLUMNS` order) per the
/// record's way of writing.
fn values_sql<R: Record>(values: &str) -> String {
    match R::WRITE {
        Write::Upsert | Write::Insert => {
            format!(
                "INSERT INTO {} ({}) VALUES {values}{}",
                R::TABLE,
                R::column_list(),
                conflict_clause::<R>()
            )
        }
        // SQLite and Postgres name the columns of a VALUES list column1, column2, ...
        Write::Update => update_sql::<R>(&format!("(VALUES {values}) AS v"), |c| {
            let i = R::COLUMNS.iter().position(|x| *x == c).unwrap_or(0);
            format!("v.column{}", i + 1)
        }),
    }
}

/// The UPDATE that sets R's non-key columns from the rows of `from`, matched on the key;
/// `pick` names a column of a row of `from`.
fn update_sql<R: Record>(from: &str, pick: impl Fn(&str) -> String) -> String {
    let sets: Vec<String> =
        R::COLUMNS.iter().filter(|c| !R::KEY.contains(c)).map(|c| format!("{c} = {}", pick(c))).collect();
    let on: Vec<String> = R::KEY.iter().map(|k| format!("{}.{k} = {}", R::TABLE, pick(k))).collect();
    format!("UPDATE {} SET {} FROM {from} WHERE {}", R::TABLE, sets.join(", "), on.join(" AND "))
}

/// What to do with an inserted row whose key exists.
fn conflict_clause<R: Record>() -> String {
    let key = R::KEY.join(", ");
    match R::WRITE {
        Write::Upsert => {
            let sets: Vec<String> = R::COLUMNS
                .iter()
                .filter(|c| !R::KEY.contains(c))
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            format!(" ON CONFLICT ({key}) DO UPDATE SET {}", sets.join(", "))
        }
        Write::Insert | Write::Update => format!(" ON CONFLICT ({key}) DO NOTHING"),
    }
}

/// The Postgres statement that writes the rows of a JSON array (parameter `$1`:
/// objects keyed by column) into R's table.
fn json_write_sql<R: Record>() -> String {
    let record: Vec<String> = R::COLUMNS.iter().zip(R::PG_TYPES).map(|(c, t)| format!("{c} {t}")).collect();
    let source = format!("json_to_recordset($1::json) AS x({})", record.join(", "));
    let pick = |c: &str| format!("x.{c}");
    match R::WRITE {
        Write::Upsert | Write::Insert => {
            let picks: Vec<String> = R::COLUMNS.iter().map(|c| pick(c)).collect();
            format!(
                "INSERT INTO {} ({}) SELECT {} FROM {source}{}",
                R::TABLE,
                R::column_list(),
                picks.join(", "),
                conflict_clause::<R>()
            )
        }
        Write::Update => update_sql::<R>(&source, pick),
    }
}

/// The SQLite statement that writes one row (parameters `?1`... in `COLUMNS` order).
fn row_sql<R: Record>() -> String {
    let n = R::COLUMNS.len();
    match R::WRITE {
        Write::Upsert | Write::Insert => {
            let params: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
            values_sql::<R>(&format!("({})", params.join(", ")))
        }
        Write::Update => {
            let param =
                |c: &str| format!("?{}", R::COLUMNS.iter().position(|x| *x == c).map_or(0, |i| i + 1));
            let sets: Vec<String> = R::COLUMNS
                .iter()
                .filter(|c| !R::KEY.contains(c))
                .map(|c| format!("{c} = {}", param(c)))
                .collect();
            let on: Vec<String> = R::KEY.iter().map(|k| format!("{k} = {}", param(k))).collect();
            format!("UPDATE {} SET {} WHERE {}", R::TABLE, sets.join(", "), on.join(" AND "))
        }
    }
}

async fn fetch<R: Record>(pool: &AnyPool, sql: &str) -> Result<Vec<R>, StoreError> {
    decode_all(sqlx::query(AssertSqlSafe(sql.to_string())).fetch_all(pool).await?)
}

async fn fetch_bound<R: Record>(pool: &AnyPool, sql: &str, arg: &str) -> Result<Vec<R>, StoreError> {
    decode_all(sqlx::query(AssertSqlSafe(sql.to_string())).bind(arg).fetch_all(pool).await?)
}

fn decode_all<R: Record>(rows: Vec<AnyRow>) -> Result<Vec<R>, StoreError> {
    rows.iter().map(|r| R::decode(r).map_err(StoreError::from)).collect()
}

/// Parses a stored state name, turning a bad one into a `Corrupt` error.
pub(crate) fn parse_state<T: FromStr>(s: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| StoreError::Corrupt(e.to_string()))
}

/// Databases for tests: each Postgres test gets a database of its own.
#[doc(hidden)]
pub mod testing {
    use sqlx::Connection;

    /// `BATON_TEST_POSTGRES_URL`, if set: where Postgres tests run.
    pub fn postgres_url() -> Option<String> {
        std::env::var("BATON_TEST_POSTGRES_URL").ok().filter(|s| !s.is_empty())
    }

    /// Creates an empty database next to the one `admin_url` names; returns its URL.
    pub async fn create_database(admin_url: &str) -> Result<String, sqlx::Error> {
        let name = format!("baton_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
        conn.close().await?;
        let (base, _) = admin_url.rsplit_once('/').unwrap_or((admin_url, ""));
        let query = admin_url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        Ok(format!("{base}/{name}{query}"))
    }

    /// Every row of every table of a Postgres database, as text: for tests that look
    /// for what must never be stored.
    pub async fn postgres_rows_text(url: &str) -> Result<String, sqlx::Error> {
        use sqlx::Row;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let tables: Vec<String> = sqlx::query(
            "SELECT table_name::text AS t FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("t"))
        .collect::<Result<_, _>>()?;
        let mut out = String::new();
        for t in tables {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT x::text AS row FROM \"{t}\" x")))
                .fetch_all(&mut conn)
                .await?;
            for r in rows {
                out.push_str(&r.try_get::<String, _>("row")?);
                out.push('\n');
            }
        }
        conn.close().await?;
        Ok(out)
    }

    /// Drops a database made by `create_database`, closing its connections.
    pub async fn drop_database(admin_url: &str, url: &str) -> Result<(), sqlx::Error> {
        let name = url.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("");
        if !name.starts_with("baton_t_") {
            return Ok(());
        }
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut conn)
            .await?;
        conn.close().await
    }
}

#[cfg(test)]
mod tests;
