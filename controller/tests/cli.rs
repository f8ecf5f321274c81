//! The `baton-controller` binary refuses bad configuration with a clear message.

use std::process::Command;

fn controller(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-controller")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn failover_grace_must_exceed_lost_after() {
    let (code, err) =
        controller(&["--listen", "127.0.0.1:0", "--lost-after", "10s", "--failover-grace", "5s"]);
    assert_eq!(code, 1);
    assert!(err.contains("--failover-grace (5s) must be longer than --lost-after (10s)"), "{err}");
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
