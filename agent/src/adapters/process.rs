//! Running a tool as a process: its own process group (so stopping it stops everything
//! it started), stdout and stderr into the attempt's output, the last line of stdout
//! kept for results, TERM then KILL on stop.

use baton_common::outcome::FailureClass;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{AttemptContext, Outcome, Output};
use crate::spawn::{Child, Command};

/// How long output readers may lag behind the process's exit (a background child can
/// hold the pipes open forever).
const DRAIN: Duration = Duration::from_millis(200);

/// Longest stdout line kept for a result.
const LAST_LINE_BYTES: usize = 64 * 1024;

/// What a finished process left.
pub struct Finished {
    pub status: std::io::Result<ExitStatus>,
    /// The last non-empty line of stdout.
    pub last_line: Option<String>,
}

/// Spawns `cmd` in the attempt's directory with its environment and waits for it, or
/// stops it when `ctx.stop` fires. Whatever the tool leaves running in its process
/// group is killed when it exits.
pub async fn run(mut cmd: Command, ctx: &AttemptContext) -> Result<Finished, Outcome> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.current_dir(&ctx.dir)
        .envs(&ctx.env)
        .env("BATON_RUN_ID", &ctx.run_id)
        .env("BATON_STEP_ID", &ctx.step_id)
        .env("BATON_ATTEMPT_ID", &ctx.attempt_id)
        .env("BATON_ATTEMPT", ctx.number.to_string());
    if let Some(cell) = &ctx.cell {
        cell.prepare(&mut cmd);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Outcome::failure(FailureClass::ToolError, format!("cannot start {program:?}: {e}")))?;
    if let Some(cell) = &ctx.cell {
        cell.spawned(child.id());
    }
    let pgid = Some(Pid::from_raw(child.id() as i32));
    let last = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child.stdout.take().map(|s| tokio::spawn(pump(s, ctx.output.clone(), Some(last.clone())))),
        child.stderr.take().map(|s| tokio::spawn(pump(s, ctx.output.clone(), None))),
    ];
    let status = tokio::select! {
        s = child.wait() => s,
        _ = ctx.stop.cancelled() => stop_group(pgid, &mut child, ctx.kill_grace, &ctx.kill).await,
    };
    // Whatever the tool left behind ends with it.
    match &ctx.cell {
        Some(cell) => cell.end(pgid.map(|p| p.as_raw())).await,
        None => {
            if let Some(pg) = pgid {
                let _ = killpg(pg, Signal::SIGKILL);
            }
        }
    }
    for r in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(DRAIN, r).await;
    }
    let line = last.lock().map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    Ok(Finished { status, last_line: (!line.is_empty()).then_some(line) })
}

/// A non-zero exit or a signal as a failed outcome; `None` for success.
pub fn exit_failure(status: &std::io::Result<ExitStatus>, program: &str) -> Option<Outcome> {
    match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(match s.code() {
            Some(code) => Outcome {
                exit_code: Some(code),
                ..Outcome::failure(FailureClass::NonzeroExit, format!("exit code {code}"))
            },
            None => {
                use std::os::unix::process::ExitStatusExt;
                Outcome::failure(
                    FailureClass::NonzeroExit,
                    format!("killed by signal {}", s.signal().unwrap_or(0)),
                )
            }
        }),
        Err(e) => {
            Some(Outcome::failure(FailureClass::ToolError, format!("waiting for {program:?} failed: {e}")))
        }
    }
}

/// SIGTERM to the group, SIGKILL after the grace period (or when `kill` fires).
async fn stop_group(
    pgid: Option<Pid>,
    child: &mut Child,
    grace: Duration,
    kill: &tokio_util::sync::CancellationToken,
) -> std::io::Result<ExitStatus> {
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGTERM);
    }
    let waited = tokio::select! {
        s = tokio::time::timeout(grace, child.wait()) => s.ok(),
        _ = kill.cancelled() => None,
    };
    match waited {
        Some(s) => s,
        None => {
            if let Some(pg) = pgid {
                let _ = killpg(pg, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

/// Copies a pipe into the output; with `last`, keeps the last non-empty line.
async fn pump(mut src: impl AsyncRead + Unpin, out: Output, last: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = vec![0u8; 16 * 1024];
    // The line being read, and the last complete non-empty one.
    let mut current: Vec<u8> = Vec::new();
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        out.write(&buf[..n]);
        let Some(last) = &last else { continue };
        for &b in &buf[..n] {
            if b == b'\n' {
                if !current.iter().all(u8::is_ascii_whitespace)
                    && let Ok(mut l) = last.lock()
                {
                    *l = std::mem::take(&mut current);
                }
                current.clear();
            } else if current.len() < LAST_LINE_BYTES {
                current.push(b);
            }
        }
    }
    if let Some(last) = &last
        && !current.iter().all(u8::is_ascii_whitespace)
        && let Ok(mut l) = last.lock()
    {
        *l = current;
    }
}

/// The version a program prints for `--version` (the last word of its first line), if
/// it runs at all.
pub fn probe_version(program: &str) -> Option<String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let text = String::from_utf8_lossy(&text);
    let first = text.lines().next()?.trim();
    Some(first.split_whitespace().last().unwrap_or(first).to_string())
}
