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
