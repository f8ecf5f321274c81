//! The `baton-agent` binary refuses bad configuration with a clear message.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_baton-agent"))
        .args(args)
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn zero_slots_are_refused() {
    let (code, err) = agent(&["--slots", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("slots must be at least 1"), "{err}");
}

#[test]
fn malformed_labels_are_refused() {
    let (code, err) = agent(&["--label", "gpu"]);
    assert_eq!(code, 2);
    assert!(err.contains("label \"gpu\" must look like KEY=VALUE"), "{err}");
}

#[test]
fn unknown_tools_are_refused() {
    let (code, err) = agent(&["--tools", "shell,hammer"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown tool \"hammer\" in --tools"), "{err}");
}
