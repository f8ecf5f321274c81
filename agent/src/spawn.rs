//! Starting a tool's process without copying the agent.
//!
//! `fork` copies the agent's page tables, and until the child has exec'd, every page
//! the agent writes is copied once more (copy-on-write faults): about 0.7 ms of the
//! agent's CPU per tool on a 2-core VM, more than `true` itself costs. The standard
//! library avoids that with `posix_spawn` (which glibc does with `CLONE_VM |
//! CLONE_VFORK`), but not for a child that must do something of its own before `exec`,
//! and a tool's child must: join the attempt's cgroup before it can start anything,
//! and die with the agent. So this module does what `posix_spawn` does, with those
//! steps added: the child shares the agent's memory and runs on a stack of its own
//! while the calling thread waits, makes only system calls on data prepared
//! beforehand, and execs (or reports why it could not in memory it shares with the
//! caller).
//!
//! Its exit is awaited on a pidfd (Linux 5.3 and later; older kernels: a blocking
//! `waitpid` on the blocking pool).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// Stack of the child between clone and exec: a few system calls deep.
const CHILD_STACK: usize = 64 * 1024;

/// Signals are 1 to 64 on Linux.
const NSIG: libc::c_int = 65;

/// A tool's command: program, arguments, environment, working directory; stdin is
/// `/dev/null`, stdout and stderr are pipes, and the process leads a process group of
/// its own, dies with the agent's thread that started it, and joins `cgroup` if set.
#[derive(Debug, Clone)]
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    /// Set on top of the agent's environment.
    env: BTreeMap<OsString, OsString>,
    dir: Option<PathBuf>,
    /// The `cgroup.procs` file of the group the process joins before it execs.
    cgroup_procs: Option<PathBuf>,
}

/// Which step of starting a process failed (in the child, or before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Exec = 1,
    ProcessGroup = 2,
    ParentDeath = 3,
    ParentGone = 4,
    Cgroup = 5,
    Stdio = 6,
    Chdir = 7,
    Signals = 8,
}

impl Stage {
    fn from_raw(v: i32) -> Stage {
        match v {
            2 => Stage::ProcessGroup,
            3 => Stage::ParentDeath,
            4 => Stage::ParentGone,
            5 => Stage::Cgroup,
            6 => Stage::Stdio,
            7 => Stage::Chdir,
            8 => Stage::Signals,
            _ => Stage::Exec,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Stage::Exec => "exec",
            Stage::ProcessGroup => "its own process group",
            Stage::ParentDeath => "the parent-death signal",
            Stage::ParentGone => "the agent is gone",
            Stage::Cgroup => "joining the attempt's cgroup",
            Stage::Stdio => "its stdin, stdout and stderr",
            Stage::Chdir => "changing to its working directory",
            Stage::Signals => "resetting its signals",
        }
    }
}

impl Command {
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        Command {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            env: BTreeMap::new(),
            dir: None,
            cgroup_procs: None,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self.arg(a);
        }
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.env.insert(key.as_ref().to_os_string(), value.as_ref().to_os_string());
        self
    }

    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Command
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The process joins the cgroup whose `cgroup.procs` file this is, before it execs.
    pub fn cgroup(&mut self, procs: impl AsRef<Path>) -> &mut Command {
        self.cgroup_procs = Some(procs.as_ref().to_path_buf());
        self
    }

    pub fn get_program(&self) -> &OsStr {
        &self.program
    }

    /// Starts the process. Must be called on a thread that outlives it (the agent's
    /// runtime thread): the parent-death signal follows the thread, not the process.
    pub fn spawn(&self) -> std::io::Result<Child> {
        let prepared = Prepared::new(self)?;
        let stdin = open_cloexec(c"/dev/null", libc::O_RDONLY)?;
        let (out_r, out_w) = pipe_cloexec()?;
        let (err_r, err_w) = pipe_cloexec()?;
        let cgroup = match &self.cgroup_procs {
            Some(p) => Some(open_cloexec(&cstring(p.as_os_str())?, libc::O_WRONLY)?),
            None => None,
        };
        // The child dup2s these onto 0, 1 and 2: none of them may be one of those.
        let stdin = above_stdio(stdin)?;
        let out_w = above_stdio(out_w)?;
        let err_w = above_stdio(err_w)?;
        let mut args = ChildArgs {
            argv: prepared.argv.as_ptr(),
            envp: prepared.envp.as_ptr(),
            paths: prepared.path_ptrs.as_ptr(),
            dir: prepared.dir.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            stdio: [stdin.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
            cgroup: cgroup.as_ref().map_or(-1, |f| f.as_raw_fd()),
            parent: std::process::id() as libc::pid_t,
            errno: 0,
            stage: 0,
        };
        let mut stack = vec![0u8; CHILD_STACK];
        // SAFETY: the child runs `child_main` on `stack` (its top, 16-byte aligned)
        // with `args`, both alive until clone returns: with CLONE_VFORK this thread
        // waits until the child has exec'd or exited. All signals are blocked around
        // it so that no handler of the agent's runs in the child, which resets them.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK);
            let top = top.sub(top as usize % 16);
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&mut args as *mut ChildArgs).cast(),
            );
            let clone_error = std::io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_error);
            }
            pid
        };
        drop(stack);
        // SAFETY: the child wrote these before exec or exit, and clone has returned.
        let (errno, stage) =
            unsafe { (std::ptr::read_volatile(&args.errno), std::ptr::read_volatile(&args.stage)) };
        if errno != 0 {
            // The child has exited: reap it.
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let e = std::io::Error::from_raw_os_error(errno);
            return Err(match Stage::from_raw(stage) {
                Stage::Exec => e,
                s => std::io::Error::new(e.kind(), format!("{}: {e}", s.what())),
            });
        }
        drop((stdin, out_w, err_w, cgroup));
        // From here a failure drops the child, which kills it.
        let mut child = Child { pid, waiter: Waiter::new(pid), status: None, stdout: None, stderr: None };
        child.stdout = Some(pipe::Receiver::from_owned_fd(out_r)?);
        child.stderr = Some(pipe::Receiver::from_owned_fd(err_r)?);
        Ok(child)
    }
}

/// A started process. Dropped before it was waited for, it is killed (SIGKILL) and
/// reaped in the background.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    waiter: Waiter,
    status: Option<ExitStatus>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

#[derive(Debug)]
enum Waiter {
    /// Readable once the process has exited.
    Pidfd(AsyncFd<OwnedFd>),
    /// No pidfds (Linux before 5.3): a blocking waitpid, started at the first wait.
    Blocking(Option<tokio::task::JoinHandle<std::io::Result<ExitStatus>>>),
}

impl Waiter {
    fn new(pid: libc::pid_t) -> Waiter {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: a descriptor pidfd_open just returned, owned by nothing else, and
            // open for as long as the AsyncFd owns it.
            let registered = unsafe {
                let fd = OwnedFd::from_raw_fd(fd as RawFd);
                AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            };
            if let Ok(fd) = registered {
                return Waiter::Pidfd(fd);
            }
        }
        Waiter::Blocking(None)
    }
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let pid = self.pid;
        let status = match &mut self.waiter {
            Waiter::Pidfd(fd) => loop {
                if let Some(s) = try_wait(pid)? {
                    break s;
                }
                fd.readable().await?.clear_ready();
            },
            Waiter::Blocking(task) => {
                let task =
                    task.get_or_insert_with(|| tokio::task::spawn_blocking(move || wait_blocking(pid)));
                task.await.map_err(std::io::Error::other)??
            }
        };
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.pid;
        // SAFETY: our own child, not yet reaped, so the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if matches!(self.waiter, Waiter::Blocking(Some(_))) {
            // The waitpid already started reaps it.
            return;
        }
        let reap = move || {
            let _ = wait_blocking(pid);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(reap);
            }
            Err(_) => {
                std::thread::spawn(reap);
            }
        }
    }
}

fn try_wait(pid: libc::pid_t) -> std::io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: waitpid on our own child, with WNOHANG.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some(ExitStatus::from_raw(status))),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn wait_blocking(pid: libc::pid_t) -> std::io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What the child reads: pointers into [`Prepared`] and descriptors, and where it
/// reports a failure (it shares the caller's memory).
#[repr(C)]
struct ChildArgs {
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The paths to try, null-terminated: the program itself, or it in each
    /// directory of `PATH`.
    paths: *const *const libc::c_char,
    dir: *const libc::c_char,
    stdio: [RawFd; 3],
    cgroup: RawFd,
    parent: libc::pid_t,
    errno: i32,
    stage: i32,
}

/// Everything the child needs, as C strings, built before it starts.
struct Prepared {
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    _paths: Vec<CString>,
    path_ptrs: Vec<*const libc::c_char>,
    dir: Option<CString>,
}

impl Prepared {
    fn new(cmd: &Command) -> std::io::Result<Prepared> {
        let mut strings = Vec::with_capacity(1 + cmd.args.len());
        strings.push(cstring(&cmd.program)?);
        for a in &cmd.args {
            strings.push(cstring(a)?);
        }
        let argv_len = strings.len();
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        for (k, v) in &cmd.env {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in &env {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            strings.push(CString::new(kv).map_err(|_| nul_error(k))?);
        }
        let mut argv: Vec<*const libc::c_char> = strings[..argv_len].iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = strings[argv_len..].iter().map(|s| s.as_ptr()).collect();
        envp.push(std::ptr::null());
        let paths = candidates(&cmd.program, env.get(OsStr::new("PATH")).map(OsString::as_os_str))?;
        let mut path_ptrs: Vec<*const libc::c_char> = paths.iter().map(|p| p.as_ptr()).collect();
        path_ptrs.push(std::ptr::null());
        let dir = cmd.dir.as_ref().map(|d| cstring(d.as_os_str())).transpose()?;
        Ok(Prepared { _strings: strings, argv, envp, _paths: paths, path_ptrs, dir })
    }
}

/// Where the program is looked for, as `execvp` does: itself when it names a path,
/// else in each directory of `PATH` (the tool's own, else the agent's), an empty
/// entry meaning the working directory.
fn candidates(program: &OsStr, path: Option<&OsStr>) -> std::io::Result<Vec<CString>> {
    if program.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the program is empty"));
    }
    if program.as_bytes().contains(&b'/') {
        return Ok(vec![cstring(program)?]);
    }
    let path = path.map(OsStr::as_bytes).unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    path.split(|&b| b == b':')
        .map(|dir| {
            let mut p = if dir.is_empty() { b".".to_vec() } else { dir.to_vec() };
            p.push(b'/');
            p.extend_from_slice(program.as_bytes());
            cstring(&OsString::from_vec(p))
        })
        .collect()
}

fn cstring(s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| nul_error(s))
}

fn nul_error(s: &OsStr) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{s:?} contains a NUL byte"))
}

fn open_cloexec(path: &std::ffi::CStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: a valid C string; the descriptor returned is owned by nothing else.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors, owned by nothing else.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The same file under a descriptor above 2 (when the agent runs with 0, 1 or 2
/// closed, a new descriptor can be one of them).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: duplicates a descriptor we own; the new one is owned by nothing else.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The child, between clone and exec: on its own stack, in the agent's memory, with
/// all signals blocked. Only system calls on what `ChildArgs` points to; no
/// allocation, no locks, no panics. On failure it writes errno and the stage into
/// `ChildArgs` and exits with 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the caller's `ChildArgs`, alive and unchanged while this runs
    // (the caller waits); every pointer in it is valid and null-terminated.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        let fail = |a: &mut ChildArgs, stage: Stage| -> libc::c_int {
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(&mut a.errno, if errno == 0 { libc::EINVAL } else { errno });
            std::ptr::write_volatile(&mut a.stage, stage as i32);
            libc::_exit(127)
        };
        // Handlers of the agent's are not the tool's: back to the default, and
        // SIGPIPE too (the agent ignores it; a tool in a pipeline must not).
        for sig in 1..NSIG {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let ignored = old.sa_sigaction == libc::SIG_IGN;
            if old.sa_sigaction != libc::SIG_DFL && (!ignored || sig == libc::SIGPIPE) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                if libc::sigaction(sig, &dfl, std::ptr::null_mut()) != 0 {
                    return fail(a, Stage::Signals);
                }
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(a, Stage::ProcessGroup);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return fail(a, Stage::ParentDeath);
        }
        // The agent died before the signal was set: nobody would end this one.
        if libc::getppid() != a.parent {
            *libc::__errno_location() = libc::ESRCH;
            return fail(a, Stage::ParentGone);
        }
        if a.cgroup >= 0 && libc::write(a.cgroup, b"0\n".as_ptr().cast(), 2) < 0 {
            return fail(a, Stage::Cgroup);
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                return fail(a, Stage::Stdio);
            }
        }
        if !a.dir.is_null() && libc::chdir(a.dir) != 0 {
            return fail(a, Stage::Chdir);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // As execvp: the first candidate that runs; past one that exists but may not
        // be run, that error unless a later one runs.
        let mut denied = false;
        let mut p = a.paths;
        while !(*p).is_null() {
            libc::execve(*p, a.argv, a.envp);
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                _ => return fail(a, Stage::Exec),
            }
            p = p.add(1);
        }
        *libc::__errno_location() = if denied { libc::EACCES } else { libc::ENOENT };
        fail(a, Stage::Exec)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    async fn read_all(mut r: pipe::Receiver) -> String {
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        s
    }

    #[tokio::test]
    async fn a_program_runs_with_its_args_env_and_dir_and_its_output_is_piped() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("pwd; echo \"$GREETING\" \"$1\"; echo oops >&2; read x; echo \"stdin:$x.\"; exit 3")
            .arg("sh")
            .arg("one arg")
            .env("GREETING", "hi")
            .current_dir(dir.path());
        let mut child = cmd.spawn().unwrap();
        let out = tokio::spawn(read_all(child.stdout.take().unwrap()));
        let err = tokio::spawn(read_all(child.stderr.take().unwrap()));
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        let dir = dir.path().canonicalize().unwrap();
        assert_eq!(out.await.unwrap(), format!("{}\nhi one arg\nstdin:.\n", dir.display()));
        assert_eq!(err.await.unwrap(), "oops\n");
        assert_eq!(child.wait().await.unwrap().code(), Some(3), "a second wait gives the same status");
    }

    #[tokio::test]
    async fn programs_are_found_on_the_tools_path_and_missing_ones_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("my-tool");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A file of the same name that may not be run comes first on PATH.
        let first = dir.path().join("first");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("my-tool"), "not runnable").unwrap();
        let path = format!("/no/such/dir:{}:{}", first.display(), bin.display());
        let mut cmd = Command::new("my-tool");
        cmd.env("PATH", &path);
        let mut child = cmd.spawn().unwrap();
        let out = read_all(child.stdout.take().unwrap()).await;
        assert!(child.wait().await.unwrap().success());
        assert_eq!(out, "found\n");

        let e = Command::new("no-such-program-anywhere").spawn().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        let mut cmd = Command::new("my-tool");
        cmd.env("PATH", first.display().to_string());
        let e = cmd.spawn().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        let e = Command::new("/bin/sh").current_dir(dir.path().join("missing")).spawn().unwrap_err();
        assert!(e.to_string().starts_with("changing to its working directory"), "{e}");
    }

    #[tokio::test]
    async fn the_process_leads_its_own_group_and_sigpipe_is_default_again() {
        // The agent ignores SIGPIPE (Rust does): a tool in a pipeline must see it as
        // the default, or `yes` would report a broken pipe and fail.
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("cut -d' ' -f5 /proc/$$/stat; yes | head -n1");
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let out = tokio::spawn(read_all(child.stdout.take().unwrap()));
        let err = read_all(child.stderr.take().unwrap()).await;
        assert!(child.wait().await.unwrap().success());
        let out = out.await.unwrap();
        let mut lines = out.lines();
        assert_eq!(lines.next().map(str::trim), Some(pid.to_string().as_str()));
        assert_eq!(lines.next(), Some("y"));
        assert_eq!(err, "", "no broken pipe reported");
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        drop(child);
        // Killed and reaped in the background: the pid is gone soon.
        let gone = || unsafe { libc::kill(pid, 0) } != 0;
        for _ in 0..500 {
            if gone() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone(), "sleep {pid} survived its Child");
    }
}
