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
