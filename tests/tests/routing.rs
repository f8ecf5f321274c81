//! Routing end to end: rules map kinds to tools, strategies place steps on agents,
//! labels and drains exclude agents, reloads change the rules, and three tools (shell,
//! Python, aider) pass outputs along a workstream.

use std::collections::HashMap;
use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

/// How many steps of the run each agent ran.
fn per_agent(run: &proto::Run) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in &run.steps {
        for a in &s.attempts {
            *m.entry(a.agent_name.clone()).or_default() += 1;
        }
    }
    m
}

fn many(n: usize, kind: &str) -> String {
    let mut spec = String::from("name: many\nsteps:\n");
    for i in 0..n {
        spec.push_str(&format!("  - {{id: s{i}, kind: {kind}}}\n"));
    }
    spec
}

fn labeled(sb: &Sandbox, name: &str, slots: u32, labels: &[(&str, &str)]) -> baton_agent::Config {
    let mut cfg = sb.agent_config(name, slots);
    cfg.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    cfg
}

async fn round_robin_spreads_steps_evenly_whatever_the_free_slots(backend: Backend) {
    let router = r#"{"rules": [{"match": {"kind": "work"}, "tool": "noop", "strategy": "round_robin"}]}"#;
    let mut sb = Sandbox::builder().backend(backend).agents(0).router(router).build().await;
    for (name, slots) in [("rr-a", 30), ("rr-b", 10), ("rr-c", 10)] {
        sb.add_agent(name, slots);
    }
    sb.wait_agents(3).await;
    let mut c = sb.client().await;
    let id = sb.submit(&many(30, "work")).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let spread = per_agent(&run);
    assert_eq!(spread.len(), 3, "{spread:?}");
    for (agent, n) in &spread {
        assert!((9..=11).contains(n), "{agent} ran {n} of 30: {spread:?}");
    }
}

async fn fixed_pins_steps_to_named_agents_and_fails_over_in_order(backend: Backend) {
    let router = r#"{"rules": [{"match": {"kind": "pinned"}, "tool": "noop", "strategy": "fixed", "agents": ["second", "first"]}]}"#;
    let mut sb = Sandbox::builder().backend(backend).agents(0).router(router).build().await;
    // Enough slots that `second` is never full (a full agent fails over too).
    for name in ["first", "second", "other"] {
        sb.add_agent(name, 8);
    }
    sb.wait_agents(3).await;
    let mut c = sb.client().await;
    let run = wait_run(&mut c, &sb.submit(&many(6, "pinned")).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("second".to_string(), 6)]));
    // The preferred agent goes away: the next in the list takes over, never `other`.
    sb.stop_agent("second").await;
    let run = wait_run(&mut c, &sb.submit(&many(6, "pinned")).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("first".to_string(), 6)]));
}

async fn auto_prefers_free_slots_and_avoids_an_agent_whose_breaker_is_open(backend: Backend) {
    let mut engine = fast_engine();
    engine.breakers = baton_controller::engine::BreakerConfig::from_json(
        r#"{"agent": {"consecutive_failures": 1, "cooldown_ms": 600000}, "tools": {"shell": {"count": ["nonzero_exit"]}}}"#,
    )
    .unwrap();
    let mut sb = Sandbox::builder().backend(backend).agents(0).engine(engine).build().await;
    sb.add_agent("big", 3);
    sb.add_agent("small", 1);
    sb.wait_agents(2).await;
    let mut c = sb.client().await;
    // Four at once: the agent with more free slots gets them until the slots even out.
    let mut spec = String::from("name: slots\nsteps:\n");
    for i in 0..4 {
        spec.push_str(&format!("  - {{id: s{i}, tool: sleep, with: {{duration: 500ms}}}}\n"));
    }
    let run = wait_run(&mut c, &sb.submit(&spec).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("big".to_string(), 3), ("small".to_string(), 1)]));

    // A shell step that fails on `big` opens big's shell breaker; auto then sends shell
    // steps to `small`, though big has more free slots.
    let id = sb.submit("name: trip\nsteps:\n  - {id: t, tool: shell, with: {run: 'case \"$PWD\" in */big/*) exit 1;; esac'}}\n").await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(step(&run, "t").attempts[0].agent_name, "big");
    let mut spec = String::from("name: after\nsteps:\n");
    for i in 0..3 {
        spec.push_str(&format!("  - {{id: s{i}, tool: shell, with: {{run: 'true'}}}}\n"));
    }
    let run = wait_run(&mut c, &sb.submit(&spec).await, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(per_agent(&run), HashMap::from([("small".to_string(), 3)]));
}

async fn required_labels_exclude_agents_and_the_wait_says_which(backend: Backend) {
    let router = r#"{"rules": [{"match": {"kind": "train"}, "tool": "noop", "labels": {"gpu": "true"}}]}"#;
    let mut sb = Sandbox::builder().backend(backend).agents(0).router(router).build().await;
    let cpu = labeled(&sb, "cpu-only", 4, &[("gpu", "false")]);
    sb.add_agent_with(cpu);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let id = sb.submit(&many(3, "train")).await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "run_submitted").await;
    let run = get_run(&mut c, &id).await;
    assert_eq!(step(&run, "s0").state_name(), "ready");
    assert_eq!(step(&run, "s0").reason, "no agent with tool noop and label gpu=true");
    let gpu = labeled(&sb, "gpu-box", 4, &[("gpu", "true")]);
    sb.add_agent_with(gpu);
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("gpu-box".to_string(), 3)]));
}

async fn a_drained_agent_takes_no_new_work_until_undrained(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(0).build().await;
    sb.add_agent("keep", 1);
    sb.add_agent("drain-me", 8);
    sb.wait_agents(2).await;
    let mut c = sb.client().await;
    let a = c
        .drain_agent(proto::DrainAgentRequest { agent: "drain-me".into(), undo: false })
        .await
        .unwrap()
        .into_inner();
    assert!(a.draining);
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert!(agents.iter().any(|a| a.name == "drain-me" && a.draining));
    let run = wait_run(
        &mut c,
        &sb.submit(&many(4, "x").replace("kind: x", "tool: noop")).await,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(per_agent(&run), HashMap::from([("keep".to_string(), 4)]));
    c.drain_agent(proto::DrainAgentRequest { agent: "drain-me".into(), undo: true }).await.unwrap();
    let run = wait_run(
        &mut c,
        &sb.submit(&many(4, "x").replace("kind: x", "tool: noop")).await,
        Duration::from_secs(20),
    )
    .await;
    assert!(per_agent(&run).contains_key("drain-me"), "{:?}", per_agent(&run));
    let err =
        c.drain_agent(proto::DrainAgentRequest { agent: "ghost".into(), undo: false }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn reloading_the_router_applies_new_rules_and_refuses_bad_ones(backend: Backend) {
    let router =
        r#"{"rules": [{"match": {"kind": "job"}, "tool": "noop", "strategy": "fixed", "agents": ["one"]}]}"#;
    let mut sb = Sandbox::builder().backend(backend).agents(0).router(router).build().await;
    sb.add_agent("one", 2);
    sb.add_agent("two", 2);
    sb.wait_agents(2).await;
    let mut c = sb.client().await;
    let run = wait_run(&mut c, &sb.submit(&many(2, "job")).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("one".to_string(), 2)]));

    let path = sb.router.clone().unwrap();
    std::fs::write(
        &path,
        r#"{"rules": [{"match": {"kind": "job"}, "tool": "noop", "strategy": "fixed", "agents": ["two"]}]}"#,
    )
    .unwrap();
    let resp = c.reload_router(proto::ReloadRouterRequest {}).await.unwrap().into_inner();
    assert_eq!(resp.rules, 1);
    let run = wait_run(&mut c, &sb.submit(&many(2, "job")).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("two".to_string(), 2)]));

    std::fs::write(&path, r#"{"rules": [{"match": {"kind": "job"}, "tool": "noop"}, {"match": {"kind": "x"}, "strategy": "fixed"}]}"#).unwrap();
    let err = c.reload_router(proto::ReloadRouterRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("rule 1: strategy fixed needs a list of agents"), "{}", err.message());
    assert!(err.message().contains("the rules in force are kept"));
    let run = wait_run(&mut c, &sb.submit(&many(2, "job")).await, Duration::from_secs(20)).await;
    assert_eq!(per_agent(&run), HashMap::from([("two".to_string(), 2)]), "the old rules still apply");
}

async fn three_kinds_go_to_three_tools_on_three_kinds_of_agents_and_pass_outputs(backend: Backend) {
    let router = r#"{"rules": [
        {"match": {"kind": "compute"}, "tool": "python", "labels": {"role": "py"}},
        {"match": {"kind": "edit"}, "tool": "aider", "labels": {"role": "coder"}, "strategy": "fixed", "agents": ["coder-1"]},
        {"match": {"kind": "script"}, "tool": "shell", "labels": {"role": "sh"}, "strategy": "round_robin"}
    ]}"#;
    let mut sb = Sandbox::builder().backend(backend).agents(0).router(router).build().await;
    let py = labeled(&sb, "py-1", 2, &[("role", "py")]);
    sb.add_agent_with(py);
    let sh = labeled(&sb, "sh-1", 2, &[("role", "sh")]);
    sb.add_agent_with(sh);
    let path = path_with_fixtures();
    let _coder = agent_process_with_env(
        &sb.url(),
        "coder-1",
        sb.dir.path(),
        &["--label", "role=coder"],
        &[("PATH", &path)],
    );
    sb.wait_agents(3).await;
    let mut c = sb.client().await;

    // Only the agent with the aider binary advertises aider.
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let has = |name: &str, tool: &str| {
        agents.iter().any(|a| a.name == name && a.tools.iter().any(|t| t.name == tool))
    };
    assert!(has("coder-1", "aider") && !has("py-1", "aider") && !has("sh-1", "aider"));
    assert!(
        agents
            .iter()
            .find(|a| a.name == "coder-1")
            .unwrap()
            .tools
            .iter()
            .any(|t| t.name == "aider" && t.version == "0.0.0-standin")
    );

    // A git repository for aider to edit, and a Python module to compute with.
    let repo = sb.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("app.py"), "VERSION = '1.0.0'\n").unwrap();
    std::fs::write(repo.join("other.py"), "x = 1\n").unwrap();
    for args in [
        vec!["init", "-q"],
        vec!["add", "."],
        vec!["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"],
    ] {
        assert!(std::process::Command::new("git").args(&args).current_dir(&repo).status().unwrap().success());
    }
    let lib = sb.dir.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("release.py"), "def next_version(current, bump):\n    major, minor, patch = map(int, current.split('.'))\n    return {'version': f'{major}.{minor + bump}.0'}\n").unwrap();

    let spec = format!(
        r#"
name: release
params: {{current: "1.0.0", bump: null}}
steps:
  - id: compute
    kind: compute
    with: {{function: "release:next_version", args: {{current: "${{{{ params.current }}}}", bump: 1}}, path: ["{lib}"]}}
  - id: edit
    kind: edit
    needs: compute
    with: {{prompt: "set VERSION to ${{{{ steps.compute.outputs.version }}}}", files: [app.py], repo: "{repo}"}}
  - id: report
    kind: script
    needs: edit
    env: {{CHANGED: "${{{{ steps.edit.outputs.changed_files }}}}", BUMP: "${{{{ params.bump }}}}"}}
    with: {{run: 'echo "changed=$CHANGED bump=$BUMP"'}}
"#,
        lib = lib.display(),
        repo = repo.display()
    );
    // A declared parameter without a default must be given.
    let err = c
        .submit_run(proto::SubmitRunRequest {
            spec: spec.clone(),
            source: "r.yaml".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("params.bump has no default and was not given"), "{}", err.message());
    let req = proto::SubmitRunRequest {
        spec,
        source: "r.yaml".into(),
        params: params(&[("bump", "2")]),
        ..Default::default()
    };
    let id = c.submit_run(req).await.unwrap().into_inner().run_id;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    let ran_on = |s: &str| step(&run, s).attempts[0].agent_name.clone();
    assert_eq!(
        (ran_on("compute"), ran_on("edit"), ran_on("report")),
        ("py-1".into(), "coder-1".into(), "sh-1".into())
    );
    assert_eq!(
        (
            step(&run, "compute").tool.as_str(),
            step(&run, "edit").tool.as_str(),
            step(&run, "report").tool.as_str()
        ),
        ("python", "aider", "shell")
    );
    assert_eq!(result_text(&step(&run, "compute").result), r#"{"version":"1.1.0"}"#);
    let edit: serde_json::Value = serde_json::from_str(&result_text(&step(&run, "edit").result)).unwrap();
    assert_eq!(edit["changed_files"], serde_json::json!(["app.py"]), "other.py was not touched");
    assert_eq!(edit["exit_code"], 0);
    // The edit is on the attempt's branch, committed; the repository's files are as
    // they were.
    let commit = edit["commit"].as_str().expect("a commit");
    let shown = std::process::Command::new("git")
        .args(["show", &format!("{commit}:app.py")])
        .current_dir(&repo)
        .output()
        .unwrap();
    let app = String::from_utf8_lossy(&shown.stdout);
    assert!(app.ends_with("# aider (default): set VERSION to 1.1.0\n"), "{app}");
    assert_eq!(std::fs::read_to_string(repo.join("app.py")).unwrap(), "VERSION = '1.0.0'\n");
    let tail = &step(&run, "edit").attempts[0].output_tail;
    assert!(
        tail.contains("--message=set VERSION to 1.1.0 --yes-always --no-auto-commits -- app.py"),
        "{tail}"
    );
    assert_eq!(step(&run, "report").attempts[0].output_tail, "changed=[\"app.py\"] bump=2\n");
}

async fn a_missing_output_fails_the_step_before_it_runs(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit("name: o\nsteps:\n  - {id: a, tool: echo, with: {x: 1}}\n  - {id: b, needs: a, tool: shell, with: {run: 'echo ${{ steps.a.outputs.y }}'}}\n")
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    let b = step(&run, "b");
    assert_eq!(b.state_name(), "failed");
    assert!(never_ran(b), "{:?}", b.attempts);
    assert_eq!(b.reason, "input: steps.a.outputs.y is not set (step \"a\" has outputs: x)");
}

async fn aider_failures_are_reported_with_their_exit_status(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let path = path_with_fixtures();
    let _coder = agent_process_with_env(&sb.url(), "coder", sb.dir.path(), &[], &[("PATH", &path)]);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let repo = sb.dir.path().join("plain-dir");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("a.py"), "").unwrap();
    let spec = format!(
        "name: a\non_failure: continue\nsteps:\n  - {{id: bad-model, tool: aider, with: {{prompt: p, files: [a.py], model: unavailable, repo: '{r}'}}}}\n  - {{id: no-repo, tool: aider, with: {{prompt: p, repo: /no/such/repo}}}}\n  - {{id: not-git, tool: aider, with: {{prompt: p, files: [a.py], repo: '{r}'}}}}\n",
        r = repo.display()
    );
    let run = wait_run(&mut c, &sb.submit(&spec).await, Duration::from_secs(30)).await;
    let bad = &step(&run, "bad-model").attempts[0];
    assert_eq!((bad.state_name(), bad.exit_code, class_name(bad)), ("failed", Some(1), "nonzero_exit"));
    assert!(bad.output_tail.contains("model unavailable is not available"), "{}", bad.output_tail);
    let no_repo = &step(&run, "no-repo").attempts[0];
    assert_eq!(class_name(no_repo), "tool_error");
    assert_eq!(no_repo.error, "with.repo /no/such/repo is not a directory");
    let plain = step(&run, "not-git");
    assert_eq!(plain.state_name(), "succeeded");
    let result: serde_json::Value = serde_json::from_str(&result_text(&plain.result)).unwrap();
    assert_eq!(result["git"], false, "outside git nothing can be said about changed files");
    assert_eq!(result["changed_files"], serde_json::json!([]));
}

on_both!(
    round_robin_spreads_steps_evenly_whatever_the_free_slots,
    fixed_pins_steps_to_named_agents_and_fails_over_in_order,
    auto_prefers_free_slots_and_avoids_an_agent_whose_breaker_is_open,
    required_labels_exclude_agents_and_the_wait_says_which,
    a_drained_agent_takes_no_new_work_until_undrained,
    reloading_the_router_applies_new_rules_and_refuses_bad_ones,
    three_kinds_go_to_three_tools_on_three_kinds_of_agents_and_pass_outputs,
    a_missing_output_fails_the_step_before_it_runs,
    aider_failures_are_reported_with_their_exit_status,
);
