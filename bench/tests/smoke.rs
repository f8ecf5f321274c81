//! The harness end to end: real controller and agent processes, one table.

use std::process::Command;

#[test]
fn the_harness_runs_scenarios_and_prints_the_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-bench"))
        .args(["idle", "b2", "--no-compare"])
        .output()
        .expect("run baton-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("## Results (sqlite)"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("no {name} row in\n{stdout}"))
            .split('|')
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let b2 = row("B2 chain of 1000 shell");
    assert_eq!(b2[2], "1000");
    assert!(b2[3].ends_with('s') && b2[3] != "-", "makespan: {b2:?}");
    assert!(b2[18].contains("commits, mean"), "{b2:?}");
    // With the CLI next to the harness, B1–B3 are also timed through `baton submit --watch`.
    let cli = std::path::Path::new(env!("CARGO_BIN_EXE_baton-bench")).with_file_name("baton");
    if cli.exists() {
        assert!(b2[14].ends_with('s') && b2[14] != "-", "CLI end to end: {b2:?}");
    }
    let idle = row("idle");
    assert!(idle[6].ends_with("s") && idle[6] != "-", "p50: {idle:?}");
}

#[test]
fn unknown_scenarios_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-bench")).arg("b99").output().expect("run baton-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown scenario \"b99\""), "{err}");
}
