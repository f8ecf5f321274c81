//! Keeps everything an attempt starts inside a boundary the agent can end as a whole,
//! also after the agent itself died.
//!
//! Where the agent may create cgroup v2 groups (root, or a systemd unit with
//! `Delegate=yes`), each attempt's processes run in a group of their own under
//! `<the agent's cgroup>/baton-<agent id>/`, ended with `cgroup.kill`: nothing escapes,
//! not even a daemon that left its process group. Elsewhere a tool runs in its own
//! process group and gets SIGKILL when the agent dies (a parent-death signal).
//!
//! While an attempt runs, a record of it (its lease, pid and start time, cgroup) is kept
//! in `WORK_DIR/running/`. An agent that starts again ends what those records name
//! before it takes work, and reports those attempts as stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_common::outcome::{FailureClass, Outcome};
use baton_common::pb;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Longest wait for a killed cgroup to empty.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// How an agent contains its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A cgroup v2 group per attempt, under this one.
    Cgroup(PathBuf),
    /// The tool's process group and a parent-death signal.
    ProcessGroup,
}

/// The records of running attempts and the way they are contained.
#[derive(Debug, Clone)]
pub struct Containment {
    mode: Mode,
    records: PathBuf,
    /// Emptied cgroups of ended attempts, kept for the next ones: making and removing
    /// a cgroup per attempt cost a chain of short steps a seventh of its time.
    spare: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

/// Emptied cgroups kept for reuse, at most.
const SPARE_GROUPS: usize = 16;

/// What the work dir remembers of a running attempt.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    run_id: String,
    step_id: String,
    attempt_id: String,
    lease_token: String,
    /// The tool's process (the leader of its process group), once started.
    pid: Option<i32>,
    /// Its start time (clock ticks since boot, `/proc/PID/stat`), so that a recycled
    /// pid is never killed.
    start_time: Option<u64>,
    cgroup: Option<PathBuf>,
}

impl Containment {
    /// Contains attempts in cgroups when `cgroups` is true and this process may create
    /// them, else in process groups. Records live in `work_dir/running`.
    pub fn open(work_dir: &Path, agent_id: &str, cgroups: bool) -> std::io::Result<Containment> {
        let records = work_dir.join("running");
        std::fs::create_dir_all(&records)?;
        let mode = match cgroups.then(|| own_cgroup_dir(agent_id)).flatten() {
            Some(base) => match std::fs::create_dir_all(&base) {
                Ok(()) => {
                    remove_stale_groups(&base);
                    Mode::Cgroup(base)
                }
                Err(e) => {
                    info!(cgroup = %base.display(), error = %e, "cannot create cgroups; tools are contained by process group");
                    Mode::ProcessGroup
                }
            },
            None => Mode::ProcessGroup,
        };
        match &mode {
            Mode::Cgroup(base) => info!(cgroup = %base.display(), "each attempt runs in a cgroup of its own"),
            Mode::ProcessGroup => {
                // Orphans of a tool (a daemon that left its process group) become the
                // agent's children, where it finds and ends them with their attempt.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
                info!("each attempt runs in a process group of its own; the agent adopts their orphans")
            }
        }
        Ok(Containment { mode, records, spare: Arc::default() })
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Ends every process that a previous life of this agent left running for its
    /// attempts, and returns those attempts as stopped (the controller records them
    /// lost and retries them per policy).
    pub async fn end_leftovers(&self) -> Vec<pb::AttemptFinished> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.records) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.records.display(), error = %e, "cannot read the records of running attempts");
                return out;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let record: Option<Record> =
                std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let Some(record) = record else {
                warn!(record = %path.display(), "unreadable record of a running attempt removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let ended = end_record(&record).await;
            warn!(run_id = %record.run_id, step_id = %record.step_id, attempt_id = %record.attempt_id, ended, "an attempt of this agent's previous life was still recorded as running; ended it");
            out.push(pb::AttemptFinished {
                attempt: Some(pb::AttemptRef {
                    run_id: record.run_id.clone(),
                    step_id: record.step_id.clone(),
                    attempt_id: record.attempt_id.clone(),
                    lease_token: record.lease_token.clone(),
                }),
                outcome: Outcome::Canceled.to_pb(),
                failure_class: FailureClass::AgentLost.to_pb(),
                error: format!(
                    "the agent restarted while the attempt ran; {ended} of its processes were still running and were ended"
                ),
                ..Default::default()
            });
            let _ = std::fs::remove_file(&path);
        }
        // Groups without a record (the agent died between creating one and recording it).
        if let Mode::Cgroup(base) = &self.mode
            && let Ok(groups) = std::fs::read_dir(base)
        {
            for g in groups.flatten().filter(|g| g.path().is_dir()) {
                kill_cgroup(&g.path()).await;
            }
        }
        out
    }

    /// Records a new attempt and prepares its containment.
    pub fn cell(&self, r: &pb::AttemptRef) -> std::io::Result<Cell> {
        let cgroup = match &self.mode {
            Mode::Cgroup(_) if let Some(spare) = self.spare.lock().ok().and_then(|mut s| s.pop()) => {
                Some(spare)
            }
            Mode::Cgroup(base) => {
                let dir = base.join(safe_name(&r.attempt_id));
                // The agent's own group is made again if another agent removed it as
                // stale while it was idle (see `remove_stale_groups`).
                let mut tries = 0;
                loop {
                    std::fs::create_dir_all(base)?;
                    match std::fs::create_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                        Err(e) => return Err(e),
                    }
                }
                Some(dir)
            }
            Mode::ProcessGroup => None,
        };
        let record = Record {
            run_id: r.run_id.clone(),
            step_id: r.step_id.clone(),
            attempt_id: r.attempt_id.clone(),
            lease_token: r.lease_token.clone(),
            cgroup: cgroup.clone(),
            ..Default::default()
        };
        // The record is written once the tool has a pid (`spawned`): before that there
        // is nothing of the attempt's to end, and a group made meanwhile is ended by
        // `end_leftovers` without one.
        let cell = Cell {
            record_path: self.records.join(format!("{}.json", safe_name(&r.attempt_id))),
            record: std::sync::Mutex::new(record),
            cgroup,
            saved: std::sync::atomic::AtomicBool::new(false),
            spare: self.spare.clone(),
        };
        Ok(cell)
    }

    /// Removes this agent's (empty) cgroups on a clean stop.
    pub fn close(&self) {
        if let Mode::Cgroup(base) = &self.mode {
            for g in self.spare.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default() {
                let _ = std::fs::remove_dir(g);
            }
            let _ = std::fs::remove_dir(base);
        }
    }
}

/// One attempt's containment: its record, and its cgroup when there is one.
#[derive(Debug)]
pub struct Cell {
    record_path: PathBuf,
    record: std::sync::Mutex<Record>,
    cgroup: Option<PathBuf>,
    /// Whether the record file exists.
    saved: std::sync::atomic::AtomicBool,
    spare: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl Cell {
    /// Makes `cmd`'s process join the attempt's cgroup before it runs anything of its
    /// own (it dies with the agent in any case: see [`crate::spawn`]).
    pub fn prepare(&self, cmd: &mut crate::spawn::Command) {
        if let Some(cg) = &self.cgroup {
            cmd.cgroup(cg.join("cgroup.procs"));
        }
    }

    /// Notes the started tool's pid (and start time) in the record.
    pub fn spawned(&self, pid: u32) {
        if let Ok(mut r) = self.record.lock() {
            r.pid = Some(pid as i32);
            r.start_time = start_time(pid as i32);
        }
        if let Err(e) = self.save() {
            warn!(record = %self.record_path.display(), error = %e, "cannot record the tool's pid");
        }
    }

    /// Ends everything left of the attempt: SIGKILL to its process group, and with a
    /// cgroup, to every process in it; returns once the cgroup is empty.
    pub async fn end(&self, pgid: Option<i32>) {
        if let Some(pg) = pgid {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pg), nix::sys::signal::Signal::SIGKILL);
        }
        match &self.cgroup {
            Some(cg) => empty_cgroup(cg).await,
            None => {
                let id = self.record.lock().map(|r| r.attempt_id.clone()).unwrap_or_default();
                end_orphans(&id, children_of_self()).await;
            }
        }
    }

    /// Forgets the attempt: it has ended and so has everything it started.
    pub fn close(&self) {
        if self.saved.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.record_path);
        }
        // Its record is gone first: no record names a group that is reused.
        if let Some(cg) = &self.cgroup {
            let kept = !populated(cg)
                && self.spare.lock().is_ok_and(|mut s| {
                    let room = s.len() < SPARE_GROUPS;
                    if room {
                        s.push(cg.clone());
                    }
                    room
                });
            if !kept {
                let _ = std::fs::remove_dir(cg);
            }
        }
    }

    fn save(&self) -> std::io::Result<()> {
        let bytes = match self.record.lock() {
            Ok(r) => serde_json::to_vec(&*r).map_err(std::io::Error::other)?,
            Err(_) => return Ok(()),
        };
        // The first record is a new file written in one call, which no crash of the
        // agent can leave half-written; a later one replaces it whole. (A rename over
        // a file makes ext4 flush the new one to disk: one per attempt was a tenth of
        // the agent's time on a chain of short steps.)
        if !self.saved.swap(true, std::sync::atomic::Ordering::SeqCst) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&self.record_path)?;
            return f.write_all(&bytes);
        }
        let tmp = self.record_path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.record_path)
    }
}

/// SIGKILLs what the record at `path` names, at once and without waiting (the
/// warden's way: the agent itself cleans up after).
pub fn kill_now(path: &Path) {
    let Some(r) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()) else {
        return;
    };
    if let Some(cg) = r.cgroup.as_ref().filter(|c| c.is_dir())
        && std::fs::write(cg.join("cgroup.kill"), "1").is_err()
    {
        for pid in procs(cg) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    if let (Some(pid), Some(t)) = (r.pid, r.start_time)
        && start_time(pid) == Some(t)
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Ends what one record names; returns how many processes were still running.
async fn end_record(r: &Record) -> usize {
    let mut ended = 0;
    if let Some(cg) = r.cgroup.as_ref().filter(|c| c.is_dir()) {
        ended += procs(cg).len();
        kill_cgroup(cg).await;
    }
    if let (Some(pid), Some(t)) = (r.pid, r.start_time)
        && start_time(pid) == Some(t)
    {
        // The same process, not a recycled pid: it leads the tool's process group.
        ended += 1;
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    if r.cgroup.is_none() {
        // Whatever left the group: known by the attempt id in its environment.
        ended += end_orphans(&r.attempt_id, all_processes()).await;
    }
    ended
}

/// SIGKILLs (with their process groups) the processes among `pids` whose environment
/// names the attempt, and reaps those that are the agent's children; returns how many.
async fn end_orphans(attempt_id: &str, pids: Vec<i32>) -> usize {
    if attempt_id.is_empty() {
        return 0;
    }
    let mark = format!("BATON_ATTEMPT_ID={attempt_id}").into_bytes();
    let me = std::process::id() as i32;
    let mut n = 0;
    for pid in pids.into_iter().filter(|&p| p != me) {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !env.split(|&b| b == 0).any(|v| v == mark.as_slice()) {
            continue;
        }
        n += 1;
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::killpg(p, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        if parent_of(pid) == Some(me) {
            // Not a child tokio waits for (those are the tools themselves, done by now).
            let _ = tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(p, None)).await;
        }
    }
    n
}

/// The agent's children (`/proc/self/task/*/children`).
fn children_of_self() -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

fn all_processes() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILLs everything in a cgroup, waits (bounded) for it to empty, removes it.
/// Ends every process in `cg` and removes it.
async fn kill_cgroup(cg: &Path) {
    empty_cgroup(cg).await;
    if let Err(e) = std::fs::remove_dir(cg)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(cgroup = %cg.display(), error = %e, "cannot remove an attempt's cgroup");
    }
}

/// Ends every process in `cg` and waits (a little) until it is empty.
async fn empty_cgroup(cg: &Path) {
    if !populated(cg) {
        return;
    }
    if std::fs::write(cg.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill: signal each member.
        for pid in procs(cg) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let deadline = tokio::time::Instant::now() + EMPTY_WAIT;
    while populated(cg) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn procs(cg: &Path) -> Vec<i32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn populated(cg: &Path) -> bool {
    match std::fs::read_to_string(cg.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Removes what agents that died on this host (or were never restarted) left in the
/// cgroup tree beside `base`: attempt groups with no process in them for a minute, and
/// agent groups with nothing left in them. Groups in use are never empty that long.
fn remove_stale_groups(base: &Path) {
    let Some(parent) = base.parent() else { return };
    let stale = |p: &Path| {
        procs(p).is_empty()
            && std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > Duration::from_secs(60)))
    };
    for agent in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let path = agent.path();
        let name = agent.file_name();
        if path == base || !name.to_string_lossy().starts_with("baton-") || !path.is_dir() {
            continue;
        }
        for g in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            if g.path().is_dir() && stale(&g.path()) {
                let _ = std::fs::remove_dir(g.path());
            }
        }
        if stale(&path) {
            // Fails (and is left) while it still holds a group.
            let _ = std::fs::remove_dir(&path);
        }
    }
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Where this process may make cgroups: `<cgroup2 mount><own cgroup>/baton-<agent id>`.
fn own_cgroup_dir(agent_id: &str) -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        // A mount of the hierarchy's root; a bind of a subtree would shift paths.
        if fields.get(3) != Some(&"/") {
            return None;
        }
        fields.get(4).map(PathBuf::from)
    })?;
    let dir = mount.join(rel.trim_start_matches('/')).join(format!("baton-{}", safe_name(agent_id)));
    Some(dir)
}

/// A file name made of an id (ids are uuids; anything else is replaced).
fn safe_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_tell_a_process_from_a_recycled_pid() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[tokio::test]
    async fn a_tool_starts_inside_its_attempts_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let c = Containment::open(dir.path(), "test-agent-cgroup-join", true).unwrap();
        let Mode::Cgroup(base) = c.mode().clone() else {
            // Drills and CI run as root with cgroup v2, where this must not skip.
            assert!(std::env::var_os("BATON_REQUIRE_DRILLS").is_none(), "no cgroups to test with");
            return;
        };
        let r = pb::AttemptRef { attempt_id: "in-group".into(), ..Default::default() };
        let cell = c.cell(&r).unwrap();
        // The tool's first process already lists the group as its own.
        let mut cmd = crate::spawn::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        cell.prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        cell.spawned(child.id());
        let mut out = String::new();
        use tokio::io::AsyncReadExt;
        child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        assert!(child.wait().await.unwrap().success());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_end_matches('/').to_string();
        let name = base.file_name().unwrap().to_string_lossy();
        let v2 = out.lines().find(|l| l.starts_with("0::"));
        assert_eq!(v2, Some(format!("0::{own}/{name}/in-group").as_str()), "{out}");
        cell.end(Some(child.id() as i32)).await;
        cell.close();
        c.close();
    }

    #[tokio::test]
    async fn leftovers_of_a_previous_life_are_ended_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let c = Containment::open(dir.path(), "test-agent-leftovers", false).unwrap();
        let r = pb::AttemptRef {
            run_id: "r".into(),
            step_id: "s".into(),
            attempt_id: "a1".into(),
            lease_token: "l".into(),
        };
        let cell = c.cell(&r).unwrap();
        let mut cmd = crate::spawn::Command::new("sleep");
        cmd.arg("60");
        cell.prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        cell.spawned(child.id());
        // A new life finds the record and ends the process.
        let again = Containment::open(dir.path(), "test-agent-leftovers", false).unwrap();
        let reported = again.end_leftovers().await;
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].attempt.as_ref().unwrap().lease_token, "l");
        assert!(reported[0].error.contains("1 of its processes"), "{}", reported[0].error);
        let status = child.wait().await.unwrap();
        assert!(!status.success());
        assert!(std::fs::read_dir(dir.path().join("running")).unwrap().next().is_none());
        assert!(again.end_leftovers().await.is_empty());
    }
}
