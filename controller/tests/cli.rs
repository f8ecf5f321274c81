//! The `baton-controller` binary refuses bad configuration with a clear message.

use std::process::Command;

fn controller(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-controller")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn failover_grace_must_exceed_lost_after() {
    let (code, err) = controller(&[
        "--listen",
        "127.0.0.1:0",
        "--stop-after",
        "4s",
        "--lost-after",
        "10s",
        "--failover-grace",
        "5s",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--failover-grace (5s) must be longer than --lost-after (10s)"), "{err}");
}

#[test]
fn timers_that_would_let_a_step_run_twice_are_refused() {
    // A cut-off agent stops its tools at --stop-after; retrying its steps elsewhere
    // before that (plus the slack) would run them twice.
    let (code, err) = controller(&["--listen", "127.0.0.1:0", "--lost-after", "4s"]);
    assert_eq!(code, 1);
    assert!(err.contains("--lost-after (4s) must be longer than --stop-after (10s) plus 500ms"), "{err}");
    let (code, err) =
        controller(&["--listen", "127.0.0.1:0", "--heartbeat-interval", "3s", "--stop-after", "5s"]);
    assert_eq!(code, 1);
    assert!(err.contains("--stop-after (5s) must be at least twice --heartbeat-interval (3s)"), "{err}");
}

#[test]
fn unsupported_database_urls_are_refused() {
    let (code, err) = controller(&["--listen", "127.0.0.1:0", "--db", "mysql://x/y"]);
    assert_eq!(code, 1);
    assert!(err.contains("unsupported database url \"mysql://x/y\""), "{err}");
}

#[test]
fn bad_durations_are_refused() {
    let (code, err) = controller(&["--lost-after", "soon"]);
    assert_eq!(code, 2);
    assert!(err.contains("bad duration \"soon\""), "{err}");
}

#[test]
fn a_bad_router_config_is_refused_at_start_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router_config.json");
    std::fs::write(&path, r#"{"rules": [{"match": {"kind": "a"}, "tool": "shell"}, {"match": {"kind": "b"}, "strategy": "fixed"}]}"#).unwrap();
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let (code, err) =
        controller(&["--listen", "127.0.0.1:0", "--db", &db, "--router", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("rule 1: strategy fixed needs a list of agents"), "{err}");
}

#[test]
fn sighup_reloads_the_router_and_keeps_the_old_rules_when_the_new_ones_are_bad() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router_config.json");
    std::fs::write(&path, r#"{"rules": []}"#).unwrap();
    let db = format!("sqlite://{}", dir.path().join("h.db").display());
    /// Kills the controller however the test ends.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Guard(
        Command::new(env!("CARGO_BIN_EXE_baton-controller"))
            .args(["--listen", "127.0.0.1:0", "--db", &db, "--router", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut wait_for = |needle: &str| {
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the controller never logged {needle:?}");
    };
    wait_for("controller listening");
    std::fs::write(&path, r#"{"rules": [{"match": {"kind": "k"}, "tool": "noop"}]}"#).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let line = wait_for("router config");
    assert!(line.contains("router config reloaded") && line.contains("rules=1"), "{line}");
    std::fs::write(&path, "{oops").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let line = wait_for("router config");
    assert!(line.contains("router config refused; keeping the rules in force"), "{line}");
}

#[test]
fn a_controller_off_loopback_without_tls_refuses_to_start_naming_the_flags() {
    let (code, err) = controller(&["--listen", "0.0.0.0:0"]);
    assert_eq!(code, 1);
    assert!(err.contains("refusing to listen on 0.0.0.0:0 without TLS"), "{err}");
    assert!(err.contains("--tls-cert and --tls-key") && err.contains("--insecure"), "{err}");
}

#[test]
fn bootstrap_prints_the_first_admin_token_once_and_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let run =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_baton-controller")).args(args).output().unwrap();
    let first = run(&["bootstrap", "--db", &db]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let token = String::from_utf8(first.stdout).unwrap();
    assert!(token.trim().starts_with("btk_") && token.lines().count() == 1, "{token:?}");
    let second = run(&["bootstrap", "--db", &db]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("an admin token exists already (\"bootstrap\""), "{err}");
    assert!(second.stdout.is_empty(), "nothing on stdout when refused");
    // The database keeps a hash of the token, never the token.
    let bytes = std::fs::read(dir.path().join("b.db")).unwrap();
    let secret = token.trim().rsplit('_').next().unwrap();
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the token's secret is not stored");
}

/// What the controller logs up to and including the line that says it listens.
fn start_log(args: &[&str]) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton-controller"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("controller listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

#[test]
fn the_controller_says_at_start_whether_callers_must_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let db = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
    let log = start_log(&["--listen", "127.0.0.1:0", "--db", &db("a.db")]);
    assert!(log.contains("authentication=\"off (loopback without TLS"), "{log}");
    let log = start_log(&["--listen", "127.0.0.1:0", "--db", &db("b.db"), "--auth", "required"]);
    assert!(log.contains("authentication=\"required\""), "{log}");
    let log = start_log(&["--listen", "0.0.0.0:0", "--db", &db("c.db"), "--insecure"]);
    assert!(log.contains("WARNING: INSECURE: serving plaintext gRPC on 0.0.0.0:0"), "{log}");
    assert!(log.contains("authentication=\"required\""), "plaintext off loopback still authenticates: {log}");
}
