//! The warden: a small process beside the agent that ends the agent's tools when the
//! agent's lease runs out and the agent does not do it itself (it is stopped with
//! SIGSTOP, or stuck). The agent writes each new deadline to the warden's stdin as
//! `lease MS` (CLOCK_MONOTONIC milliseconds, the same clock in both processes) or
//! `idle` when it runs nothing; past the deadline the warden SIGKILLs every attempt
//! recorded in the work dir. It dies with the agent (parent-death signal), and ends
//! what is still recorded when the agent's end of the pipe closes.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Milliseconds of CLOCK_MONOTONIC.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // Cannot fail for CLOCK_MONOTONIC with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// The agent's side: where it tells the warden its deadline.
pub struct Warden {
    tx: tokio::sync::watch::Sender<Option<u64>>,
    _child: tokio::process::Child,
}

impl Warden {
    /// Starts `exe --warden WORK_DIR`; `None` (logged) when it cannot be started.
    pub fn start(exe: &Path, work_dir: &Path) -> Option<Warden> {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--warden").arg(work_dir).stdin(std::process::Stdio::piped()).kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the agent is gone"));
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                warn!(exe = %exe.display(), error = %e, "cannot start the warden; a stopped agent's tools would run on");
                return None;
            }
        };
        let mut stdin = child.stdin.take()?;
        let (tx, mut rx) = tokio::sync::watch::channel(None::<u64>);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while rx.changed().await.is_ok() {
                let line = match *rx.borrow_and_update() {
                    Some(ms) => format!("lease {ms}\n"),
                    None => "idle\n".to_string(),
                };
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        info!("warden started: it ends this agent's tools if the agent cannot when its lease runs out");
        Some(Warden { tx, _child: child })
    }

    /// The tools must be dead by `deadline` unless it is moved again; `None`: nothing
    /// runs.
    pub fn set(&self, deadline: Option<Instant>) {
        let ms =
            deadline.map(|d| monotonic_ms() + d.saturating_duration_since(Instant::now()).as_millis() as u64);
        self.tx.send_if_modified(|v| {
            let changed = *v != ms;
            *v = ms;
            changed
        });
    }
}

/// The warden's loop (`baton-agent --warden WORK_DIR`): returns when the agent's end of
/// its stdin closes, after ending what is still recorded.
pub fn run(work_dir: PathBuf) -> std::io::Result<()> {
    let records = work_dir.join("running");
    let mut deadline: Option<u64> = None;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut line = String::new();
    loop {
        let wait = deadline.map(|d| d.saturating_sub(monotonic_ms()));
        if wait == Some(0) {
            let n = end_recorded(&records);
            eprintln!(
                "baton-agent warden: the agent's lease ran out and its tools still ran; ended {n} attempt(s)"
            );
            deadline = None;
            continue;
        }
        let mut fds = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        let timeout = wait.map(|w| w.min(i32::MAX as u64) as i32).unwrap_or(-1);
        let ready = unsafe { libc::poll(&mut fds, 1, timeout) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            // The agent is gone: what it still had recorded must not outlive it.
            end_recorded(&records);
            return Ok(());
        }
        let l = line.trim();
        deadline = match l.strip_prefix("lease ") {
            Some(ms) => ms.parse().ok(),
            None => None,
        };
    }
}

/// SIGKILLs every recorded attempt's processes (cgroup or process group); the records
/// stay for the agent. Returns how many were recorded.
fn end_recorded(records: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(records).into_iter().flatten().flatten() {
        if entry.path().extension().is_none_or(|e| e != "json") {
            continue;
        }
        n += 1;
        crate::contain::kill_now(&entry.path());
    }
    let _ = std::io::stderr().flush();
    n
}

/// How long after its lease runs out (and its fence grace) the warden waits before it
/// acts: the agent's own stop comes first when the agent runs.
pub const AFTER: Duration = Duration::from_millis(200);
