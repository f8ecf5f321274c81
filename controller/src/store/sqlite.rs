//! The engine's commits on SQLite: one thread with a connection of its own, which
//! writes each batch in one transaction through statements prepared once, one row at
//! a time.
//!
//! sqlx's SQLite driver hands every statement to its worker thread and back, so a
//! commit of a few hundred rows was written as one script of multi-row inserts: a
//! parse of the whole script per commit (a quarter of the writer's time in
//! `baton-bench` B4), every value copied into the driver's argument list on the way.
//! Here a row costs a bind and a step of a cached statement. Reads, and the other
//! writes (attempt output, tokens, pruning), stay on sqlx's pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

use super::{Batch, Fence, Record, SQLITE_NOW_MS, StoreError};

enum Msg {
    Commit { batch: Arc<Batch>, fence: Option<Fence>, reply: oneshot::Sender<Result<(), StoreError>> },
    Close(oneshot::Sender<()>),
}

/// The writer thread's handle; the thread ends when every handle is gone, or on
/// [`Writer::close`].
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Msg>,
}

impl Writer {
    /// Opens the database file (created and migrated already) for the engine's writes.
    pub fn open(path: &Path) -> Result<Writer, StoreError> {
        let conn = connect(path)?;
        let (tx, rx) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || serve(conn, path, rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the SQLite writer: {e}")))?;
        Ok(Writer { tx })
    }

    /// Writes `batch` in one transaction (checking `fence` first, if any).
    pub async fn commit(&self, batch: Arc<Batch>, fence: Option<Fence>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Msg::Commit { batch, fence, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Closes the connection; later commits fail.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the SQLite writer has stopped".into())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // As the pool's connections (see `Store::pool`): every commit synced, readers
    // beside it.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; \
         PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16384;",
    )?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn serve(mut conn: Connection, path: PathBuf, rx: mpsc::Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Close(done) => {
                drop(conn);
                let _ = done.send(());
                // What comes after a close fails: its reply is dropped.
                return;
            }
            Msg::Commit { batch, fence, reply } => {
                let r = write(&mut conn, &batch, fence.as_ref());
                // The caller takes its batch back whole once it has the answer.
                drop(batch);
                if r.is_err() && !conn.is_autocommit() {
                    // The transaction outlived its failure (a ROLLBACK that failed on a
                    // full disk, say): try again, else start over on a new connection.
                    let _ = conn.execute_batch("ROLLBACK");
                    if !conn.is_autocommit()
                        && let Ok(fresh) = connect(&path)
                    {
                        conn = fresh;
                    }
                }
                let _ = reply.send(r);
            }
        }
    }
}

fn write(conn: &mut Connection, b: &Batch, fence: Option<&Fence>) -> Result<(), StoreError> {
    // IMMEDIATE takes the write lock up front: the transaction never fails half-way
    // on upgrading a read lock.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(f) = fence {
        let sql = format!(
            "UPDATE leader SET holder = holder WHERE id = 1 AND holder = ?1 AND epoch = ?2 AND lease_until > {SQLITE_NOW_MS}"
        );
        if tx.prepare_cached(&sql)?.execute(rusqlite::params![f.holder, f.epoch])? == 0 {
            return Err(StoreError::Fenced(f.epoch));
        }
    }
    rows(&tx, &b.new_runs)?;
    rows(&tx, &b.runs)?;
    rows(&tx, &b.specs)?;
    rows(&tx, &b.steps)?;
    rows(&tx, &b.attempts)?;
    rows(&tx, &b.events)?;
    rows(&tx, &b.agents)?;
    rows(&tx, &b.breakers)?;
    rows(&tx, &b.cache)?;
    rows(&tx, &b.artifacts)?;
    tx.commit()?;
    Ok(())
}

fn rows<R: Record>(conn: &Connection, rows: &[R]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(R::row_sql())?;
    for r in rows {
        r.bind_sqlite(&mut stmt)?;
        stmt.raw_execute()?;
    }
    Ok(())
}
