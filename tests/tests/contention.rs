//! Work under contention: concurrency keys hold across runs and agents.

use std::time::Duration;

use baton_tests::*;

/// The most attempts of `runs` that were running at one moment, from their start and
/// end times.
fn most_at_once(runs: &[proto::Run]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for run in runs {
        for s in &run.steps {
            for a in &s.attempts {
                let (start, end) = (ms(&a.started_at), ms(&a.finished_at));
                assert!(start > 0 && end >= start, "attempt {} has no start or end", a.id);
                edges.push((start, 1));
                edges.push((end, -1));
            }
        }
    }
    // An end and a start at the same moment: the end first.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_key_is_never_exceeded_across_runs_and_agents() {
    let sb = Sandbox::builder().agents(4).slots(2).build().await;
    let mut c = sb.client().await;
    let mut spec = String::from("name: deploy\nparams: {env: prod}\nsteps:\n");
    for i in 0..8 {
        spec.push_str(&format!(
            "  - {{id: d{i}, tool: sleep, with: {{duration: 300ms}}, concurrency: {{key: 'deploy-${{{{ params.env }}}}', limit: 2}}}}\n"
        ));
    }
    // Two runs share the key deploy-prod; a third, on staging, has a key of its own.
    let prod = [submit(&mut c, &spec).await, submit(&mut c, &spec).await];
    let req = proto::SubmitRunRequest {
        spec: spec.clone(),
        params: params(&[("env", "staging")]),
        ..Default::default()
    };
    let staging = c.submit_run(req).await.unwrap().into_inner().run_id;
    let waiting = eventually(Duration::from_secs(20), "a step waiting for the key", || {
        let mut c = c.clone();
        let id = prod[1].clone();
        async move {
            let run = get_run(&mut c, &id).await;
            run.steps.iter().map(|s| s.reason.clone()).find(|r| r.contains("concurrency key deploy-prod"))
        }
    })
    .await;
    assert!(waiting.contains("concurrency key deploy-prod: 2/2 in use by run"), "{waiting}");
    let mut done = Vec::new();
    for id in &prod {
        let run = wait_run(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(run.state_name(), "succeeded");
        done.push(run);
    }
    assert_eq!(most_at_once(&done), 2, "at most two deploy-prod steps at once, and two did run together");
    let staging = wait_run(&mut c, &staging, Duration::from_secs(60)).await;
    assert_eq!(most_at_once(std::slice::from_ref(&staging)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_rules_max_concurrent_caps_its_tool_across_runs() {
    // Steps of kind `llm` call a rate-limited service: at most two at once over all runs
    // and agents, whatever the free slots.
    let router = r#"{"rules": [
        {"match": {"kind": "llm"}, "tool": "sleep", "max_concurrent": 2, "with": {"duration": "300ms"}},
        {"match": {"kind": "fast"}, "tool": "noop"}
    ]}"#;
    let sb = Sandbox::builder().agents(3).slots(3).router(router).build().await;
    let mut c = sb.client().await;
    let mut spec = String::from("name: ask\nsteps:\n  - {id: first, kind: fast}\n");
    for i in 0..6 {
        spec.push_str(&format!("  - {{id: q{i}, kind: llm}}\n"));
    }
    let runs = [submit(&mut c, &spec).await, submit(&mut c, &spec).await];
    let waiting = eventually(Duration::from_secs(20), "a step waiting for the tool's limit", || {
        let mut c = c.clone();
        let ids = runs.clone();
        async move {
            for id in &ids {
                let run = get_run(&mut c, id).await;
                if let Some(r) = run.steps.iter().map(|s| s.reason.clone()).find(|r| r.contains("tool sleep"))
                {
                    return Some(r);
                }
            }
            None
        }
    })
    .await;
    assert!(waiting.contains("concurrency key tool sleep: 2/2 in use by run"), "{waiting}");
    let mut done = Vec::new();
    for id in &runs {
        let run = wait_run(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(run.state_name(), "succeeded");
        let mut run = run;
        run.steps.retain(|s| s.id != "first");
        done.push(run);
    }
    assert_eq!(most_at_once(&done), 2, "at most two sleep steps at once over nine free slots");
}

/// When each of the run's attempts was assigned (controller time, ms).
fn assigned(run: &proto::Run) -> Vec<i64> {
    run.steps.iter().flat_map(|s| s.attempts.iter().map(|a| ms(&a.assigned_at))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_goes_first_and_a_small_run_is_not_starved_by_a_big_one() {
    // Three runs queue up while there is no agent: 10,000 steps, then 10, then 10 at
    // priority 5. Then one agent with two slots comes.
    let mut sb = Sandbox::builder().agents(0).build().await;
    let mut c = sb.client().await;
    let spec = |name: &str, n: usize| {
        let mut s = format!("name: {name}\nsteps:\n");
        for i in 0..n {
            s.push_str(&format!("  - {{id: s{i}, tool: sleep, with: {{duration: 5ms}}}}\n"));
        }
        s
    };
    let big = submit(&mut c, &spec("big", 10_000)).await;
    let small = submit(&mut c, &spec("small", 10)).await;
    let req = proto::SubmitRunRequest { spec: spec("urgent", 10), priority: 5, ..Default::default() };
    let urgent = c.submit_run(req).await.unwrap().into_inner().run_id;
    let out_of_range = proto::SubmitRunRequest { spec: spec("x", 1), priority: 1001, ..Default::default() };
    let err = c.submit_run(out_of_range).await.unwrap_err();
    assert!(err.message().contains("priority 1001 is out of range: -1000 to 1000"), "{}", err.message());

    let start = std::time::Instant::now();
    sb.add_agent("only", 2);
    let urgent = wait_run(&mut c, &urgent, Duration::from_secs(120)).await;
    let small = wait_run(&mut c, &small, Duration::from_secs(120)).await;
    let took = start.elapsed();
    assert_eq!((urgent.state_name(), small.state_name()), ("succeeded", "succeeded"));
    assert_eq!(urgent.priority, 5);
    let big_run = get_run(&mut c, &big).await;
    c.cancel_run(proto::CancelRunRequest { run_id: big.clone(), ..Default::default() }).await.unwrap();

    // Every urgent step was assigned before any step of the other two runs.
    let last_urgent = assigned(&urgent).into_iter().max().unwrap();
    let first_other =
        assigned(&small).into_iter().chain(assigned(&big_run)).filter(|&t| t > 0).min().unwrap();
    assert!(
        last_urgent <= first_other,
        "urgent's last assignment at {last_urgent}, another run's first at {first_other}"
    );
    // The small run took turns with the big one: by its last assignment, the big run
    // had had about as many, not its 10,000 first.
    let last_small = assigned(&small).into_iter().max().unwrap();
    let big_before = assigned(&big_run).into_iter().filter(|&t| t > 0 && t < last_small).count();
    eprintln!(
        "fairness: the 10-step run was done {took:?} after the agent came, with {big_before} of the 10,000-step run's steps assigned before its last"
    );
    assert!(big_before <= 12, "{big_before} steps of the big run were assigned before the small run's last");
}

/// A workstream with a run-level key; its one step waits for the file `go-GATE`.
fn keyed(dir: &std::path::Path, on_conflict: &str) -> String {
    format!(
        "name: deploy\nparams: {{env: prod, gate: a}}\nconcurrency: {{key: 'deploy-${{{{ params.env }}}}', on_conflict: {on_conflict}}}\nsteps:\n  - {{id: hold, tool: shell, with: {{run: 'while [ ! -e {}/go-${{{{ params.gate }}}} ]; do sleep 0.05; done'}}}}\n",
        dir.display()
    )
}

async fn submit_with(c: &mut Client, spec: &str, kv: &[(&str, &str)]) -> String {
    let req = proto::SubmitRunRequest { spec: spec.to_string(), params: params(kv), ..Default::default() };
    c.submit_run(req).await.unwrap().into_inner().run_id
}

async fn until_running(c: &mut Client, run_id: &str) {
    eventually(Duration::from_secs(20), "the run's step to run", || {
        let mut c = c.clone();
        let id = run_id.to_string();
        async move { (get_run(&mut c, &id).await.steps[0].state_name() == "running").then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workstream_key_queues_runs_oldest_first_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Sandbox::builder().agents(2).slots(2).build().await;
    let mut c = sb.client().await;
    let spec = keyed(dir.path(), "queue");
    let first = submit_with(&mut c, &spec, &[("gate", "1")]).await;
    until_running(&mut c, &first).await;
    let second = submit_with(&mut c, &spec, &[("gate", "2")]).await;
    let third = submit_with(&mut c, &spec, &[("gate", "2")]).await;
    let staging = submit_with(&mut c, &spec, &[("env", "staging"), ("gate", "s")]).await;
    // Another key is not held up.
    until_running(&mut c, &staging).await;
    let waiting = get_run(&mut c, &second).await;
    assert_eq!(waiting.state_name(), "pending");
    assert_eq!(waiting.reason, format!("waiting: concurrency key deploy-prod: 1/1 in use by run {first}"));
    assert_eq!(waiting.steps[0].reason, waiting.reason);

    // Queued runs stay queued across a restart, behind the run that holds the key.
    sb.restart_controller().await;
    let mut c = sb.client().await;
    assert_eq!(get_run(&mut c, &second).await.state_name(), "pending");
    assert_eq!(get_run(&mut c, &third).await.state_name(), "pending");
    std::fs::write(dir.path().join("go-1"), "").unwrap();
    std::fs::write(dir.path().join("go-2"), "").unwrap();
    std::fs::write(dir.path().join("go-s"), "").unwrap();
    let mut done = Vec::new();
    for id in [&first, &second, &third, &staging] {
        let run = wait_run(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(run.state_name(), "succeeded", "{id}");
        done.push(run);
    }
    // One prod run at a time, in the order they were submitted: each starts after the
    // one before it ended.
    for pair in done[..3].windows(2) {
        assert!(ms(&pair[1].started_at) >= ms(&pair[0].finished_at), "runs overlapped");
    }
    let events = all_events(&mut c, &second).await;
    assert!(events.iter().any(|e| e.kind == "run_queued") && events.iter().any(|e| e.kind == "run_admitted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_conflict_cancel_new_and_cancel_old() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::builder().agents(1).slots(2).build().await;
    let mut c = sb.client().await;
    let new = keyed(dir.path(), "cancel_new");
    let holder = submit_with(&mut c, &new, &[("env", "n")]).await;
    until_running(&mut c, &holder).await;
    let refused = submit_with(&mut c, &new, &[("env", "n")]).await;
    let run = wait_run(&mut c, &refused, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "canceled");
    assert_eq!(
        run.reason,
        format!("concurrency key deploy-n: 1/1 in use by run {holder} (on_conflict: cancel_new)")
    );
    assert!(never_ran(&run.steps[0]));

    let old = keyed(dir.path(), "cancel_old");
    let superseded = submit_with(&mut c, &old, &[("env", "o")]).await;
    until_running(&mut c, &superseded).await;
    let newer = submit_with(&mut c, &old, &[("env", "o")]).await;
    let run = wait_run(&mut c, &superseded, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "canceled");
    assert_eq!(
        run.reason,
        format!("superseded by run {newer} (concurrency key deploy-o, on_conflict: cancel_old)")
    );
    std::fs::write(dir.path().join("go-a"), "").unwrap();
    assert_eq!(wait_run(&mut c, &newer, Duration::from_secs(30)).await.state_name(), "succeeded");
    assert_eq!(wait_run(&mut c, &holder, Duration::from_secs(30)).await.state_name(), "succeeded");
}
