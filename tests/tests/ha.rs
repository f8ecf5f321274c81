//! Several controllers on one Postgres database: one leads, a standby takes over when
//! the leader dies, and a leader that was paused and comes back can commit nothing.
//! Needs BATON_TEST_POSTGRES_URL (skipped, saying so, without it).

use std::time::{Duration, Instant};

use baton_tests::*;
use nix::sys::signal::Signal;

fn controller(addr: std::net::SocketAddr, db: &str, dir: &std::path::Path, name: &str) -> Process {
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--db",
        db,
        "--heartbeat-interval",
        "200ms",
        // Agents stop their tools only well after a standby has taken over (lease 2s),
        // so they reach the new leader first and it adopts what they run.
        "--stop-after",
        "6s",
        "--lost-after",
        "7s",
        "--failover-grace",
        "10s",
        "--kill-grace",
        "500ms",
        "--lease",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Process::spawn("baton-controller", &args, dir.join(format!("{name}.log")), &[("RUST_LOG", "info")])
}

/// Two controllers (the first leads), two in-process agents that know both.
struct Cluster {
    dir: tempfile::TempDir,
    _db: TestDb,
    urls: [String; 2],
    controllers: [Process; 2],
    stop: tokio_util::sync::CancellationToken,
}

impl Cluster {
    async fn start() -> Cluster {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(Backend::Postgres, dir.path()).await;
        let (a1, a2) = (free_addr(), free_addr());
        let urls = [format!("http://{a1}"), format!("http://{a2}")];
        let c1 = controller(a1, &db.url, dir.path(), "c1");
        wait_leader(&urls[0]).await;
        let c2 = controller(a2, &db.url, dir.path(), "c2");
        // The standby knows who leads.
        let mut standby = connect(&urls[1]).await;
        let leader = standby.get_leader(proto::GetLeaderRequest {}).await.unwrap().into_inner();
        assert!(!leader.is_leader);
        assert_eq!(leader.address, urls[0]);
        let stop = tokio_util::sync::CancellationToken::new();
        for i in 1..=2 {
            let mut cfg = baton_agent::Config::new(
                urls[0].clone(),
                format!("agent-{i}"),
                dir.path().join(format!("agent-{i}")),
            );
            cfg.controllers = urls.to_vec();
            cfg.slots = 4;
            cfg.reconnect_min = Duration::from_millis(20);
            cfg.reconnect_max = Duration::from_millis(300);
            let s = stop.clone();
            tokio::spawn(async move { baton_agent::run(cfg, s).await });
        }
        let cluster = Cluster { dir, _db: db, urls, controllers: [c1, c2], stop };
        let c = connect(&cluster.urls[0]).await;
        eventually(Duration::from_secs(20), "both agents on the leader", || {
            let mut c = c.clone();
            async move {
                let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
                (agents.iter().filter(|a| a.state_name() == "connected").count() == 2).then_some(())
            }
        })
        .await;
        cluster
    }

    fn log(&self, i: usize) -> String {
        self.controllers[i].logs()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Each step has exactly one accepted (succeeded) attempt and the log has no gap.
async fn check_exactly_once(c: &mut Client, run: &proto::Run) {
    for s in &run.steps {
        let ok = s.attempts.iter().filter(|a| a.state_name() == "succeeded").count();
        assert_eq!(ok, 1, "step {} has {ok} successes: {:#?}", s.id, s.attempts);
    }
    let events = all_events(c, &run.id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>(), "gapless log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_is_killed_the_standby_takes_over_and_the_run_completes() {
    if !postgres_available() {
        return;
    }
    let mut cluster = Cluster::start().await;
    let mut c = connect(&cluster.urls[0]).await;
    let mut spec = String::from("name: fifty\nsteps:\n");
    for i in 0..50 {
        spec.push_str(&format!("  - {{id: s{i}, tool: shell, with: {{run: 'sleep 0.3'}}}}\n"));
    }
    let id = submit(&mut c, &spec).await;
    let mut done = 0;
    wait_event(&mut c, &id, Duration::from_secs(30), |e| {
        done += usize::from(e.kind == "step_succeeded");
        done >= 10
    })
    .await;
    // Followers on the command line, given both addresses, ride the failover.
    let both = format!("{},{}", cluster.urls[0], cluster.urls[1]);
    let follower = |args: &[&str]| {
        tokio::process::Command::new(binary("baton"))
            .arg("--controller")
            .arg(&both)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let watch = follower(&["runs", "watch", &id, "-o", "jsonl"]);
    let logs = follower(&["runs", "logs", &id, "--follow"]);

    cluster.controllers[0].kill9();
    let t0 = Instant::now();
    wait_leader(&cluster.urls[1]).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "the standby led after {took:?} (lease 2s)");

    let mut c = connect(&cluster.urls[1]).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(run.state_name(), "succeeded", "{}", cluster.log(1));
    assert_eq!(run.steps.len(), 50);
    check_exactly_once(&mut c, &run).await;
    let watched = watch.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(watched.status.success(), "{text}{}", String::from_utf8_lossy(&watched.stderr));
    assert_eq!(text.matches("\"run_succeeded\"").count(), 1, "{text}");
    assert_eq!(text.matches("\"step_succeeded\"").count(), 50, "each event once: {text}");
    let followed = logs.wait_with_output().await.unwrap();
    assert!(followed.status.success(), "{}", String::from_utf8_lossy(&followed.stderr));
    let events = all_events(&mut c, &id).await;
    let epochs: Vec<i64> = events.iter().map(|e| e.epoch).collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "epochs only go up: {epochs:?}");
    assert!(epochs.first() < epochs.last(), "both leaders wrote: {epochs:?}");
    // The command line finds the leader in a list whose first controller is gone.
    let out = tokio::process::Command::new(binary("baton"))
        .arg("--controller")
        .arg(format!("{},{}", cluster.urls[0], cluster.urls[1]))
        .args(["runs", "show", &id, "-o", "json"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "RUN_STATE_SUCCEEDED");
    let _ = &cluster.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_that_comes_back_commits_nothing() {
    if !postgres_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut c = connect(&cluster.urls[0]).await;
    let mut spec = String::from("name: paused\nsteps:\n");
    for i in 0..4 {
        spec.push_str(&format!("  - {{id: s{i}, tool: shell, with: {{run: 'sleep 8'}}}}\n"));
    }
    let id = submit(&mut c, &spec).await;
    let mut started = 0;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| {
        started += usize::from(e.kind == "attempt_started");
        started == 4
    })
    .await;

    // Pause the leader past its lease: the standby takes over, the agents follow it.
    cluster.controllers[0].signal(Signal::SIGSTOP);
    wait_leader(&cluster.urls[1]).await;
    let c2 = connect(&cluster.urls[1]).await;
    eventually(Duration::from_secs(20), "the agents on the new leader", || {
        let mut c = c2.clone();
        async move {
            let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            (agents.iter().filter(|a| a.state_name() == "connected").count() == 2).then_some(())
        }
    })
    .await;
    // Resumed, the old leader finds its agents silent and would mark their attempts
    // lost; its epoch is over, so nothing it tries is written.
    cluster.controllers[0].signal(Signal::SIGCONT);
    // Either its engine tries a commit first and is fenced, or its lease renewal finds
    // the lease taken first; both end in stepping down.
    let log = eventually(Duration::from_secs(20), "the old leader to step down", || {
        let log = cluster.log(0);
        async move { log.contains("stepping down").then_some(log) }
    })
    .await;
    assert!(log.contains("fenced") || log.contains("the lease was lost to another controller"), "{log}");

    let mut c = c2.clone();
    let run = wait_run(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(run.state_name(), "succeeded");
    for s in &run.steps {
        assert_eq!(s.attempts.len(), 1, "no attempt was lost or rerun: {:#?}", s.attempts);
    }
    check_exactly_once(&mut c, &run).await;
    // The old controller stands by now and points at the new leader.
    let mut old = connect(&cluster.urls[0]).await;
    let l = old.get_leader(proto::GetLeaderRequest {}).await.unwrap().into_inner();
    assert!(!l.is_leader);
    assert_eq!(l.address, cluster.urls[1]);
    // It still answers reads from the shared database; writes go to the leader.
    assert_eq!(old.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs.len(), 1);
    let err = old
        .submit_run(proto::SubmitRunRequest {
            spec: "name: x\nsteps: [{id: a, tool: noop}]\n".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        err.metadata().get("baton-leader").and_then(|v| v.to_str().ok()),
        Some(cluster.urls[1].as_str())
    );
}
