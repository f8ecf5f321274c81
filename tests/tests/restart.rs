//! kill -9 of a real controller process mid-run, and a restart on the same database.

use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

fn controller_args(addr: std::net::SocketAddr, db: &str) -> Vec<String> {
    [
        "--listen",
        &addr.to_string(),
        "--db",
        db,
        "--heartbeat-interval",
        "200ms",
        // Longer than a restart takes (on Postgres, the dead leader's 2s lease runs out
        // first), so agents keep their tools running for the new controller to adopt.
        "--stop-after",
        "4s",
        "--lost-after",
        "5s",
        "--failover-grace",
        "8s",
        "--kill-grace",
        "500ms",
        "--lease",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn a_killed_controller_restarts_and_the_run_completes_without_gaps(backend: Backend) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let test_db = TestDb::new(backend, dir.path()).await;
    let db = test_db.url.clone();
    let mut controller =
        Process::spawn("baton-controller", &controller_args(addr, &db), dir.path().join("c1.log"), &[]);

    let stop = tokio_util::sync::CancellationToken::new();
    let mut agents = Vec::new();
    for i in 1..=2 {
        let mut cfg = baton_agent::Config::new(
            url.clone(),
            format!("agent-{i}"),
            dir.path().join(format!("agent-{i}")),
        );
        cfg.slots = 2;
        cfg.reconnect_min = Duration::from_millis(20);
        cfg.reconnect_max = Duration::from_millis(200);
        agents.push(tokio::spawn(baton_agent::run(cfg, stop.clone())));
    }
    let marker = dir.path().join("slow-ran");
    let spec = format!(
        r#"
name: restart
steps:
  - {{id: first, tool: shell, with: {{run: "true"}}}}
  - {{id: slow, needs: first, tool: shell, with: {{run: "echo once >> {m}; sleep 5"}}}}
  - {{id: side, needs: first, tool: shell, with: {{run: "true"}}}}
  - {{id: after, needs: [slow, side], tool: shell, with: {{run: "true"}}}}
  - {{id: last, needs: after, tool: noop}}
"#,
        m = marker.display()
    );
    wait_leader(&url).await;
    let mut c = connect(&url).await;
    let id = submit(&mut c, &spec).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started" && e.step_id == "slow")
        .await;

    controller.kill9();
    // Same address, same database: the run goes on from where it was.
    let _controller =
        Process::spawn("baton-controller", &controller_args(addr, &db), dir.path().join("c2.log"), &[]);
    wait_leader(&url).await;
    let mut c = connect(&url).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}\n{}", controller.logs());
    for s in &run.steps {
        assert_eq!(s.state_name(), "succeeded", "{}", s.id);
    }
    // The attempt that ran across the crash was adopted, not run again.
    let slow = run.steps.iter().find(|s| s.id == "slow").unwrap();
    assert_eq!(slow.attempts.len(), 1, "{slow:#?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "once\n");

    let events = all_events(&mut c, &id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>(), "no gap, no duplicate");
    assert!(events.iter().any(|e| e.kind == "attempt_adopted" && e.step_id == "slow"));
    assert_eq!(events.iter().filter(|e| e.kind == "run_succeeded").count(), 1);
    stop.cancel();
    for a in agents {
        let _ = a.await;
    }
}

on_both!(a_killed_controller_restarts_and_the_run_completes_without_gaps);
