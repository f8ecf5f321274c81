//! Attempt output: chunks streamed by agents, kept per attempt up to a cap with a
//! truncation marker, written by one task in batches beside (not inside) the engine's
//! state transactions. Followers are woken per attempt as output lands.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::store::{OutputRow, Store};

/// A piece of output as an agent sent it: `offset` is its place in the attempt's
/// combined output. Secret values are masked before it is stored.
#[derive(Debug)]
pub struct Chunk {
    pub attempt_id: String,
    pub offset: u64,
    pub data: Vec<u8>,
    /// What to mask in the attempt's output.
    pub redact: Option<Arc<baton_common::redact::Redactor>>,
    /// The attempt's output has ended (nothing more is held back for masking); when
    /// it ends with a report, `offset` is the size the agent reported, and what is
    /// missing of it is marked lost.
    pub end: bool,
}

impl Chunk {
    /// The end of an attempt's output, of `total` bytes when its agent said so.
    pub fn end(attempt_id: &str, total: Option<u64>) -> Chunk {
        Chunk {
            attempt_id: attempt_id.to_string(),
            offset: total.unwrap_or(0),
            data: Vec::new(),
            redact: None,
            end: true,
        }
    }
}

/// Where the engine hands output after checking its lease; cheap to clone.
#[derive(Clone)]
pub struct Logs {
    tx: mpsc::Sender<Chunk>,
    written: broadcast::Sender<String>,
    /// Chunks queued so far, and chunks the writer is done with (stored or given up).
    queued: Arc<AtomicU64>,
    done: watch::Receiver<u64>,
    /// The writer and the sends of ends waiting for room: the controller waits for
    /// them before it closes the store.
    tasks: TaskTracker,
}

impl Logs {
    /// Queues a chunk; drops it (with a warning; the gap is marked when the next one or
    /// the end comes) if the writer is that far behind, so a chatty tool can never stall
    /// scheduling. An end is never dropped: it waits for room.
    pub fn push(&self, chunk: Chunk) {
        match self.tx.try_send(chunk) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::SeqCst);
            }
            Err(mpsc::error::TrySendError::Full(c)) if c.end => {
                self.queued.fetch_add(1, Ordering::SeqCst);
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    let _ = tx.send(c).await;
                });
            }
            Err(mpsc::error::TrySendError::Full(c)) => {
                warn!(attempt_id = %c.attempt_id, bytes = c.data.len(), "output writer behind; chunk dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Resolves once every chunk queued before the call has been written (or the writer
    /// has stopped).
    pub fn flushed(&self) -> impl Future<Output = ()> + Send + 'static {
        let target = self.queued.load(Ordering::SeqCst);
        let mut done = self.done.clone();
        async move {
            let _ = done.wait_for(|n| *n >= target).await;
        }
    }

    /// Ids of attempts as their output is written.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.written.subscribe()
    }
}

/// What the writer knows of one attempt's output.
struct Kept {
    /// Agent bytes accounted for (written, dropped or cut).
    received: u64,
    /// Bytes stored, markers included.
    stored: u64,
    next_seq: i64,
    truncated: bool,
    /// Masks secret values, holding back what could be the start of one.
    redact: Option<baton_common::redact::Stream>,
}

/// How long a stopping writer goes on storing what was queued before it gives up.
const DRAIN_FOR: Duration = Duration::from_secs(10);

/// Starts the writer on `tasks`. When `drain` is cancelled it stores what was queued
/// (retrying for up to [`DRAIN_FOR`] if the database refuses it) and stops; cancel it
/// once nothing pushes any more, and wait for `tasks` before closing the store.
pub fn start(store: Store, max_bytes: u64, tasks: &TaskTracker, drain: CancellationToken) -> Logs {
    let (tx, mut rx) = mpsc::channel::<Chunk>(4096);
    let (written, _) = broadcast::channel(1024);
    let (done_tx, done) = watch::channel(0u64);
    let queued = Arc::new(AtomicU64::new(0));
    let logs = Logs { tx, written: written.clone(), queued: queued.clone(), done, tasks: tasks.clone() };
    tasks.spawn(async move {
        let mut kept: HashMap<String, Kept> = HashMap::new();
        let mut buf = Vec::new();
        // Set once `drain` is cancelled: the time past which what is left is given up.
        let mut give_up: Option<tokio::time::Instant> = None;
        let deadline = |g: &Option<tokio::time::Instant>| g.unwrap_or_else(tokio::time::Instant::now);
        loop {
            if give_up.is_some() && *done_tx.borrow() >= queued.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                biased;
                n = rx.recv_many(&mut buf, 512) => if n == 0 { break },
                _ = drain.cancelled(), if give_up.is_none() => {
                    give_up = Some(tokio::time::Instant::now() + DRAIN_FOR);
                    continue;
                }
                _ = tokio::time::sleep_until(deadline(&give_up)), if give_up.is_some() => {
                    error!(chunks = queued.load(Ordering::SeqCst) - *done_tx.borrow(), "stopping with attempt output still queued; it is lost");
                    break;
                }
            }
            let mut rows = Vec::new();
            let taken = buf.len() as u64;
            for chunk in buf.drain(..) {
                let k = match kept.get_mut(&chunk.attempt_id) {
                    Some(k) => k,
                    None => {
                        let (stored, next_seq) = store.output_size(&chunk.attempt_id).await.unwrap_or((0, 1));
                        let k = Kept {
                            received: stored,
                            stored,
                            next_seq,
                            truncated: stored >= max_bytes,
                            redact: None,
                        };
                        kept.entry(chunk.attempt_id.clone()).or_insert(k)
                    }
                };
                append(k, chunk, max_bytes, &mut rows);
            }
            // Output is kept until it is stored: an attempt's end is committed only
            // after its output (see `flushed`), so nobody sees a result without it.
            let mut delay = Duration::from_millis(50);
            let mut tries = 0u32;
            loop {
                let r = store.write_output(&rows).await;
                store.note_write("output", &r);
                let Err(e) = r else { break };
                tries += 1;
                if tries == 1 || tries.is_power_of_two() {
                    warn!(error = %e, chunks = rows.len(), tries, "cannot store attempt output yet; retrying");
                }
                if give_up.is_some_and(|g| tokio::time::Instant::now() >= g) {
                    error!(error = %e, chunks = rows.len(), "stopping with attempt output the database refuses; it is lost");
                    return;
                }
                tokio::select! {
                    _ = drain.cancelled(), if give_up.is_none() => {
                        give_up = Some(tokio::time::Instant::now() + DRAIN_FOR);
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            done_tx.send_modify(|n| *n += taken);
            let mut ids: Vec<&String> = rows.iter().map(|r| &r.attempt_id).collect();
            ids.dedup();
            for id in ids {
                let _ = written.send(id.clone());
            }
            // Forget attempts now and then; their sizes come back from the store.
            if kept.len() > 10_000 {
                kept.clear();
            }
        }
    });
    logs
}

fn append(k: &mut Kept, chunk: Chunk, max_bytes: u64, rows: &mut Vec<OutputRow>) {
    let mut push = |k: &mut Kept, data: Vec<u8>| {
        k.stored += data.len() as u64;
        rows.push(OutputRow { attempt_id: chunk.attempt_id.clone(), seq: k.next_seq, data });
        k.next_seq += 1;
    };
    if k.truncated {
        return;
    }
    if chunk.end {
        if let Some(rest) = k.redact.as_mut().map(|r| r.finish()) {
            k.redact = None;
            store_capped(k, rest, max_bytes, &mut push);
        }
        // What the agent wrote at the end but never reached the store.
        let expected = chunk.offset.min(max_bytes);
        if expected > k.received && !k.truncated {
            let lost = expected - k.received;
            k.received = expected;
            push(k, format!("\n[... {lost} bytes of output lost in transit ...]\n").into_bytes());
        }
        return;
    }
    if k.redact.is_none()
        && let Some(r) = &chunk.redact
    {
        k.redact = Some(baton_common::redact::Stream::new(r.clone()));
    }
    let end = chunk.offset + chunk.data.len() as u64;
    if end <= k.received {
        return; // already have it (re-sent)
    }
    let mut data = chunk.data;
    if chunk.offset > k.received {
        let lost = chunk.offset - k.received;
        // What was held back goes before the gap.
        if let Some(rest) = k.redact.as_mut().map(|r| r.finish()) {
            store_capped(k, rest, max_bytes, &mut push);
        }
        push(k, format!("\n[... {lost} bytes of output lost in transit ...]\n").into_bytes());
    } else {
        data.drain(..(k.received - chunk.offset) as usize);
    }
    k.received = end;
    if let Some(r) = &mut k.redact {
        data = r.push(&data);
    }
    store_capped(k, data, max_bytes, &mut push);
}

/// Stores `data`, cut with a marker where it passes the cap.
fn store_capped(k: &mut Kept, mut data: Vec<u8>, max_bytes: u64, push: &mut impl FnMut(&mut Kept, Vec<u8>)) {
    if k.truncated {
        return;
    }
    let room = max_bytes.saturating_sub(k.stored) as usize;
    if data.len() > room {
        data.truncate(room);
        push(k, data);
        push(
            k,
            format!("\n[... output truncated: the limit of {max_bytes} bytes per attempt was reached ...]\n")
                .into_bytes(),
        );
        k.truncated = true;
    } else if !data.is_empty() {
        push(k, data);
    }
}

/// How long a follower waits before it looks again for a change it was not told about.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> Kept {
        Kept { received: 0, stored: 0, next_seq: 1, truncated: false, redact: None }
    }

    fn chunk(offset: u64, data: &[u8]) -> Chunk {
        Chunk { attempt_id: "a".into(), offset, data: data.to_vec(), redact: None, end: false }
    }

    fn text(rows: &[OutputRow]) -> String {
        rows.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()).collect()
    }

    #[tokio::test]
    async fn flushed_resolves_once_what_was_queued_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let shutdown = CancellationToken::new();
        let logs = start(store.clone(), 1 << 20, &TaskTracker::new(), shutdown.clone());
        logs.flushed().await; // nothing queued: at once
        for i in 0..200u64 {
            logs.push(chunk(i * 4, format!("{i:03}\n").as_bytes()));
        }
        logs.flushed().await;
        let rows = store.output("a", 1).await.unwrap();
        assert_eq!(text(&rows).lines().count(), 200, "all queued output is stored");
        assert!(text(&rows).ends_with("199\n"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_stopping_writer_stores_everything_queued_before_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let (tasks, drain) = (TaskTracker::new(), CancellationToken::new());
        let logs = start(store.clone(), 1 << 20, &tasks, drain.clone());
        for i in 0..4000u64 {
            let attempt_id = format!("a{}", i % 7);
            logs.push(Chunk {
                attempt_id,
                offset: (i / 7) * 5,
                data: format!("{i:04}\n").into_bytes(),
                redact: None,
                end: false,
            });
        }
        for a in 0..7 {
            logs.push(Chunk::end(&format!("a{a}"), None));
        }
        drain.cancel();
        tasks.close();
        tasks.wait().await;
        let mut lines = 0;
        for a in 0..7 {
            lines += text(&store.output(&format!("a{a}"), 1).await.unwrap()).lines().count();
        }
        store.close().await;
        assert_eq!(lines, 4000, "every queued chunk was stored before the writer ended");
    }

    #[test]
    fn chunks_append_in_order_and_resends_are_skipped() {
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"hello "), 100, &mut rows);
        append(&mut k, chunk(6, b"world"), 100, &mut rows);
        append(&mut k, chunk(0, b"hello "), 100, &mut rows);
        append(&mut k, chunk(3, b"lo world!"), 100, &mut rows);
        assert_eq!(text(&rows), "hello world!");
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn secrets_are_masked_across_chunks_before_they_are_stored() {
        let (mut k, mut rows) = (kept(), Vec::new());
        let r = Arc::new(baton_common::redact::Redactor::new(["sw0rdfish"]));
        let masked = |offset, data: &[u8]| Chunk { redact: Some(r.clone()), ..chunk(offset, data) };
        append(&mut k, masked(0, b"pw=sw0r"), 100, &mut rows);
        append(&mut k, masked(7, b"dfish ok sw0"), 100, &mut rows);
        append(&mut k, masked(0, b"pw=sw0r"), 100, &mut rows);
        append(&mut k, Chunk::end("a", None), 100, &mut rows);
        assert_eq!(text(&rows), "pw=*** ok sw0");
        assert!(rows.iter().all(|r| !String::from_utf8_lossy(&r.data).contains("sw0rd")));
    }

    #[test]
    fn gaps_are_marked() {
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"ab"), 100, &mut rows);
        append(&mut k, chunk(10, b"cd"), 100, &mut rows);
        assert_eq!(text(&rows), "ab\n[... 8 bytes of output lost in transit ...]\ncd");
    }

    #[test]
    fn a_tail_that_never_arrived_is_marked_at_the_end() {
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"ab"), 100, &mut rows);
        append(&mut k, Chunk::end("a", Some(6)), 100, &mut rows);
        assert_eq!(text(&rows), "ab\n[... 4 bytes of output lost in transit ...]\n");
        // All of it arrived, or past the cap: nothing to mark.
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"abcdef"), 4, &mut rows);
        append(&mut k, Chunk::end("a", Some(6)), 4, &mut rows);
        assert!(!text(&rows).contains("lost"), "{}", text(&rows));
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"ab"), 100, &mut rows);
        append(&mut k, Chunk::end("a", Some(2)), 100, &mut rows);
        assert_eq!(text(&rows), "ab");
    }

    #[test]
    fn output_past_the_cap_is_cut_with_a_marker() {
        let (mut k, mut rows) = (kept(), Vec::new());
        append(&mut k, chunk(0, b"0123456789"), 16, &mut rows);
        append(&mut k, chunk(10, b"abcdefghij"), 16, &mut rows);
        append(&mut k, chunk(20, b"more"), 16, &mut rows);
        let t = text(&rows);
        assert!(t.starts_with("0123456789abcdef\n[... output truncated: the limit of 16 bytes"), "{t}");
        assert!(!t.contains("more"));
    }
}
