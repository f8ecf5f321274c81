//! Tool adapters: one per tool, behind one trait. An adapter runs one attempt and stops
//! it (the whole process group, TERM then KILL) when told to.

mod aider;
mod builtin;
mod git;
mod git_merge;
mod process;
mod python;
mod shell;
mod wait_for;

use baton_common::outcome::FailureClass;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use aider::Aider;
pub use builtin::{Echo, Fail, Noop, Sleep};
pub use git_merge::GitMerge;
pub use python::Python;
pub use shell::Shell;
pub use wait_for::WaitFor;

/// What an adapter gets to run one attempt.
pub struct AttemptContext {
    pub attempt_id: String,
    pub run_id: String,
    pub step_id: String,
    pub number: u32,
    pub input: Map<String, Value>,
    pub env: BTreeMap<String, String>,
    /// The attempt's own working directory, created before the adapter runs.
    pub dir: PathBuf,
    /// Cancelled when the tool must stop (timeout, cancel, agent shutdown).
    pub stop: CancellationToken,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Cancelled when the rest of the grace is cut short: SIGKILL now.
    pub kill: CancellationToken,
    /// Where the attempt's processes are kept (none in adapter tests).
    pub cell: Option<Arc<crate::contain::Cell>>,
    pub output: Output,
}

#[cfg(test)]
impl AttemptContext {
    /// An attempt of step `s` of run `r` in `dir`, for adapter tests.
    pub fn for_test(dir: &std::path::Path, input: Value) -> AttemptContext {
        AttemptContext {
            attempt_id: "a".into(),
            run_id: "r".into(),
            step_id: "s".into(),
            number: 1,
            input: input.as_object().cloned().unwrap_or_default(),
            env: BTreeMap::new(),
            dir: dir.to_path_buf(),
            stop: CancellationToken::new(),
            kill_grace: Duration::from_millis(200),
            kill: CancellationToken::new(),
            cell: None,
            output: Output::default(),
        }
    }
}

/// How an attempt ended, before the agent maps stops to `timed_out` / `canceled`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub succeeded: bool,
    pub exit_code: Option<i32>,
    /// Why it failed; `None` when it succeeded.
    pub error_class: Option<FailureClass>,
    pub error: String,
    /// JSON result of the step, if it produced one.
    pub result: Option<String>,
}

impl Outcome {
    pub fn success(result: Option<String>) -> Outcome {
        Outcome { succeeded: true, exit_code: None, error_class: None, error: String::new(), result }
    }

    pub fn failure(class: FailureClass, error: impl Into<String>) -> Outcome {
        Outcome {
            succeeded: false,
            exit_code: None,
            error_class: Some(class),
            error: error.into(),
            result: None,
        }
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub trait Adapter: Send + Sync {
    /// The tool name steps use.
    fn name(&self) -> &'static str;
    /// The tool's version when it works on this machine; `None` keeps it unadvertised.
    fn probe(&self) -> Option<String>;
    /// Runs one attempt to its end; returns promptly after `ctx.stop` is cancelled.
    fn run(&self, ctx: AttemptContext) -> BoxFuture<Outcome>;
    /// Whether the attempt needs its own working directory (tools that are processes).
    fn needs_dir(&self) -> bool {
        true
    }
}

/// Every adapter this agent build has.
pub fn all() -> Vec<Arc<dyn Adapter>> {
    vec![
        Arc::new(Shell),
        Arc::new(Python),
        Arc::new(Aider),
        Arc::new(GitMerge),
        Arc::new(Noop),
        Arc::new(Echo),
        Arc::new(Sleep),
        Arc::new(Fail),
        Arc::new(WaitFor),
    ]
}

/// Bytes of output kept per attempt for the result report.
pub const TAIL_BYTES: usize = 64 * 1024;

/// Receives output as it is written: (offset in the attempt's output, bytes).
pub type Sink = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// An attempt's combined stdout and stderr: masks secret values, keeps a bounded tail
/// and streams what is written (up to a cap) to a sink. Never holds more than the tail
/// (and the end of a write that could be the start of a secret).
#[derive(Clone, Default)]
pub struct Output {
    inner: Arc<Mutex<Tail>>,
    sink: Option<(Sink, u64)>,
}

#[derive(Default)]
struct Tail {
    buf: std::collections::VecDeque<u8>,
    total: u64,
    redact: Option<baton_common::redact::Stream>,
}

impl Output {
    /// Output that also goes to `sink`, for its first `cap` bytes, with `redactor`'s
    /// values masked.
    pub fn streaming(sink: Sink, cap: u64, redactor: Arc<baton_common::redact::Redactor>) -> Output {
        let redact = (!redactor.is_empty()).then(|| baton_common::redact::Stream::new(redactor));
        Output { inner: Arc::new(Mutex::new(Tail { redact, ..Tail::default() })), sink: Some((sink, cap)) }
    }

    pub fn write(&self, data: &[u8]) {
        let Ok(mut t) = self.inner.lock() else { return };
        let masked;
        let data = match &mut t.redact {
            Some(r) => {
                masked = r.push(data);
                masked.as_slice()
            }
            None => data,
        };
        Self::append(&mut t, &self.sink, data);
    }

    /// The output has ended: what was held back (a possible start of a secret) is
    /// written, masked.
    pub fn finish(&self) {
        let Ok(mut t) = self.inner.lock() else { return };
        if let Some(rest) = t.redact.as_mut().map(|r| r.finish()) {
            Self::append(&mut t, &self.sink, &rest);
        }
    }

    fn append(t: &mut Tail, sink: &Option<(Sink, u64)>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let offset = t.total;
        if let Some((sink, cap)) = sink
            && offset < *cap
        {
            let n = data.len().min((*cap - offset) as usize);
            sink(offset, &data[..n]);
        }
        t.total += data.len() as u64;
        let data = if data.len() > TAIL_BYTES { &data[data.len() - TAIL_BYTES..] } else { data };
        let overflow = (t.buf.len() + data.len()).saturating_sub(TAIL_BYTES);
        t.buf.drain(..overflow);
        t.buf.extend(data);
    }

    /// The kept tail as text, with a marker when earlier output was dropped.
    pub fn tail(&self) -> String {
        let Ok(t) = self.inner.lock() else {
            return String::new();
        };
        let bytes: Vec<u8> = t.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let dropped = t.total - bytes.len() as u64;
        if dropped > 0 { format!("[... {dropped} earlier bytes truncated ...]\n{text}") } else { text }
    }

    pub fn total_bytes(&self) -> u64 {
        self.inner.lock().map(|t| t.total).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_a_bounded_tail_with_marker() {
        let out = Output::default();
        out.write(b"hello\n");
        assert_eq!(out.tail(), "hello\n");
        let big = vec![b'x'; TAIL_BYTES];
        out.write(&big);
        out.write(b"end\n");
        let tail = out.tail();
        assert!(tail.starts_with("[... 10 earlier bytes truncated ...]\n"), "{}", &tail[..60]);
        assert!(tail.ends_with("xend\n"));
        assert_eq!(out.total_bytes(), (6 + TAIL_BYTES + 4) as u64);
    }

    #[test]
    fn output_is_masked_before_it_is_kept_or_streamed() {
        type Seen = Arc<Mutex<Vec<u8>>>;
        let got: Seen = Arc::default();
        let g = got.clone();
        let out = Output::streaming(
            Arc::new(move |_, data: &[u8]| g.lock().unwrap().extend_from_slice(data)),
            1 << 20,
            Arc::new(baton_common::redact::Redactor::new(["s3cr3t-value"])),
        );
        out.write(b"key=s3cr");
        out.write(b"3t-value; key2=s3c");
        out.finish();
        assert_eq!(String::from_utf8(got.lock().unwrap().clone()).unwrap(), "key=***; key2=s3c");
        assert_eq!(out.tail(), "key=***; key2=s3c");
    }

    #[test]
    fn output_streams_up_to_its_cap_with_offsets() {
        type Seen = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;
        let got: Seen = Arc::default();
        let g = got.clone();
        let out = Output::streaming(
            Arc::new(move |off, data: &[u8]| g.lock().unwrap().push((off, data.to_vec()))),
            8,
            Arc::new(baton_common::redact::Redactor::new(Vec::<String>::new())),
        );
        out.write(b"hello");
        out.write(b"world");
        out.write(b"!!");
        assert_eq!(*got.lock().unwrap(), vec![(0, b"hello".to_vec()), (5, b"wor".to_vec())]);
        assert_eq!(out.tail(), "helloworld!!");
    }
}
