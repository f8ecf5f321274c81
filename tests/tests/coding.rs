//! Coding workstreams: aider steps in worktrees of their own on branches of their own,
//! their commits and patches, a retry from a clean base, and merges that meet
//! conflicts. `aider` is the stand-in in tests/fixtures/bin (no LLM is reachable).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_tests::*;

const LONG: Duration = Duration::from_secs(60);

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.email=t@t", "-c", "user.name=t"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository with two files on `main`, and a clean work tree.
fn repo(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("a.py"), "A = 1\n").unwrap();
    std::fs::write(repo.join("b.py"), "B = 1\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "init"]);
    repo
}

fn result(run: &proto::Run, id: &str) -> serde_json::Value {
    serde_json::from_str(&result_text(&step(run, id).result)).unwrap()
}

/// `baton ARGS` against the sandbox's controller: its stdout (it must succeed).
async fn run_cli(sb: &Sandbox, args: &[&str]) -> String {
    let out = tokio::process::Command::new(binary("baton"))
        .arg("--controller")
        .arg(sb.url())
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "baton {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn coder(sb: &Sandbox) -> Process {
    let path = path_with_fixtures();
    let p = agent_process_with_env(&sb.url(), "coder", sb.dir.path(), &["--slots", "4"], &[("PATH", &path)]);
    sb.wait_agents(1).await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_coding_steps_work_in_worktrees_of_their_own_and_leave_commits() {
    let sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let repo = repo(sb.dir.path());
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let spec = format!(
        r#"name: code
steps:
  - {{id: left, tool: aider, with: {{prompt: "edit a", files: [a.py], repo: "{r}", base: main}}}}
  - {{id: right, tool: aider, with: {{prompt: "edit b", files: [b.py], repo: "{r}"}}, env: {{STANDIN_COST: "0.25"}}}}
"#,
        r = repo.display()
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    // Both ran at once, each in its own worktree.
    let (l, r) = (&step(&run, "left").attempts[0], &step(&run, "right").attempts[0]);
    let overlap = |a: &proto::Attempt, b: &proto::Attempt| {
        ms(&a.started_at) < ms(&b.finished_at) && ms(&b.started_at) < ms(&a.finished_at)
    };
    assert!(overlap(l, r), "the two steps did not run at the same time");

    let left = result(&run, "left");
    assert_eq!(left["branch"], format!("baton/{run_id}/left/1"));
    assert_eq!(left["base_commit"], head.trim());
    assert_eq!(left["changed_files"], serde_json::json!(["a.py"]));
    assert_eq!(left["changes"], serde_json::json!([{"path": "a.py", "added": 1, "removed": 0}]));
    assert_eq!(left["baton_tokens"], 2450);
    assert_eq!(result(&run, "right")["baton_cost_usd"], 0.25);
    // The commits are on their branches, each with only its own file changed.
    for (id, file, other) in [("left", "a.py", "b.py"), ("right", "b.py", "a.py")] {
        let res = result(&run, id);
        let commit = res["commit"].as_str().unwrap();
        let branch = res["branch"].as_str().unwrap();
        assert_eq!(git(&repo, &["rev-parse", branch]).trim(), commit);
        let shown = git(&repo, &["show", &format!("{commit}:{file}")]);
        assert!(shown.ends_with(&format!("# aider (default): edit {}\n", &file[..1])), "{shown}");
        assert_eq!(git(&repo, &["diff", "--name-only", head.trim(), commit]).trim(), file);
        assert!(!git(&repo, &["show", &format!("{commit}:{other}")]).contains("aider"));
        let message = git(&repo, &["log", "-1", "--format=%an %s", commit]);
        assert_eq!(message.trim(), format!("Baton baton: run {run_id} step {id} attempt 1"));
        // The patch is kept as an artifact of the step.
        assert!(
            step(&run, id).artifacts.iter().any(|a| a.path == "baton.patch"),
            "{:?}",
            step(&run, id).artifacts
        );
    }
    // The controller counts what the attempts reported.
    let (_, metrics) = http_request(sb.metrics_addr, "GET", "/metrics", None, "").await;
    let value = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(value("baton_tokens_total{tool=\"aider\"}"), Some(4900.0), "{metrics}");
    let cost = value("baton_cost_usd_total{tool=\"aider\"}").unwrap();
    assert!((cost - 0.26).abs() < 1e-9, "{cost}");
    // The repository's own work tree is as it was, and no worktree is left behind.
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&repo, &["worktree", "list"]).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_starts_from_the_base_not_from_the_failed_attempts_edits() {
    let sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let repo = repo(sb.dir.path());
    let mark = sb.dir.path().join("mark");
    let spec = format!(
        r#"name: retry
steps:
  - id: edit
    tool: aider
    retry: {{max_attempts: 2, backoff: {{initial: 10ms}}}}
    env: {{STANDIN_MARK: "{m}"}}
    with: {{prompt: "edit a", files: [a.py], model: flaky, repo: "{r}"}}
"#,
        r = repo.display(),
        m = mark.display()
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    let edit = step(&run, "edit");
    assert_eq!(edit.attempts.len(), 2);
    assert_eq!(edit.attempts[0].state_name(), "failed");
    let res = result(&run, "edit");
    assert_eq!(res["branch"], format!("baton/{run_id}/edit/2"));
    let a = git(&repo, &["show", &format!("{}:a.py", res["commit"].as_str().unwrap())]);
    assert_eq!(a, "A = 1\n# aider (flaky): edit a\n", "one edit: the failed attempt's is gone");
    // The failed attempt's branch is gone with its edits.
    assert!(!git(&repo, &["branch", "--list"]).contains(&format!("baton/{run_id}/edit/1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_go_onto_the_target_in_order_and_a_conflict_fails_with_its_paths() {
    let sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let repo = repo(sb.dir.path());
    let main = git(&repo, &["rev-parse", "main"]);
    let spec = format!(
        r#"name: integrate
on_failure: continue
steps:
  - {{id: one, tool: aider, with: {{prompt: "one", files: [a.py], repo: "{r}"}}}}
  - {{id: two, tool: aider, with: {{prompt: "two", files: [b.py], repo: "{r}"}}}}
  - {{id: clash, tool: aider, with: {{prompt: "clash", files: [a.py], repo: "{r}"}}}}
  - id: merge
    tool: git_merge
    needs: [one, two]
    with: {{repo: "{r}", target: integration, base: main, commits: ["${{{{ steps.one.outputs.commit }}}}", "${{{{ steps.two.outputs.commit }}}}"]}}
  - id: conflict
    tool: git_merge
    needs: [merge, clash]
    with: {{repo: "{r}", target: integration, commits: ["${{{{ steps.clash.outputs.commit }}}}"]}}
"#,
        r = repo.display()
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "failed");
    let merge = step(&run, "merge");
    assert_eq!(merge.state_name(), "succeeded", "{:?} {:?}", merge.reason, merge.attempts);

    let merged = result(&run, "merge");
    let tip = merged["commit"].as_str().unwrap();
    assert_eq!(git(&repo, &["rev-parse", "integration"]).trim(), tip);
    let a = git(&repo, &["show", "integration:a.py"]);
    let b = git(&repo, &["show", "integration:b.py"]);
    assert!(a.ends_with("# aider (default): one\n") && b.ends_with("# aider (default): two\n"), "{a}{b}");
    assert_eq!(git(&repo, &["rev-parse", "main"]), main, "main did not move");

    let conflict = step(&run, "conflict");
    assert_eq!(conflict.state_name(), "failed");
    assert_eq!(conflict.attempts.len(), 1, "a merge conflict is not retried by default");
    assert_eq!(class_name(&conflict.attempts[0]), "merge_conflict");
    assert!(
        conflict.attempts[0].error.contains("merge conflict") && conflict.attempts[0].error.contains("a.py")
    );
    // The failed attempt's result names the paths.
    let res: serde_json::Value = serde_json::from_str(&result_text(&conflict.attempts[0].result)).unwrap();
    assert_eq!(res["conflicts"], serde_json::json!(["a.py"]));
    assert_eq!(
        git(&repo, &["rev-parse", "integration"]).trim(),
        tip,
        "a conflict leaves the target as it was"
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");

    // A target checked out in a work tree is refused rather than moved under it.
    let spec = format!(
        "name: m\nsteps:\n  - {{id: m, tool: git_merge, with: {{repo: \"{r}\", target: main, commits: [\"{tip}\"]}}}}\n",
        r = repo.display()
    );
    let run = wait_run(&mut c, &sb.submit(&spec).await, LONG).await;
    let m = &step(&run, "m").attempts[0];
    assert_eq!(class_name(m), "tool_error");
    assert!(m.error.contains("main is checked out at"), "{}", m.error);
}

/// A router rule caps concurrent aider steps per model: each model's steps take turns,
/// while steps of another model run beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_rule_caps_aider_steps_per_model() {
    let router =
        r#"{"rules": [{"match": {"tool": "aider"}, "max_concurrent": 1, "max_concurrent_per": "model"}]}"#;
    let sb = Sandbox::builder().agents(0).router(router).build().await;
    let _coder = coder(&sb).await;
    let mut spec = String::from("name: models\nsteps:\n");
    for (i, model) in ["alpha", "alpha", "beta", "beta"].iter().enumerate() {
        spec.push_str(&format!(
            "  - {{id: s{i}, tool: aider, env: {{STANDIN_SLEEP: '0.5'}}, with: {{prompt: p, model: {model}}}}}\n"
        ));
    }
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let waiting = eventually(LONG, "a step waiting for its model's turn", || {
        let mut c = c.clone();
        let id = run_id.clone();
        async move {
            get_run(&mut c, &id).await.steps.iter().map(|s| s.reason.clone()).find(|r| r.contains("model"))
        }
    })
    .await;
    assert!(waiting.contains("concurrency key tool aider model "), "{waiting}");
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    let span = |id: &str| {
        let a = &step(&run, id).attempts[0];
        (ms(&a.started_at), ms(&a.finished_at))
    };
    let overlap = |x: (i64, i64), y: (i64, i64)| x.0 < y.1 && y.0 < x.1;
    assert!(!overlap(span("s0"), span("s1")), "two alpha steps ran at once");
    assert!(!overlap(span("s2"), span("s3")), "two beta steps ran at once");
    let across = [("s0", "s2"), ("s0", "s3"), ("s1", "s2"), ("s1", "s3")];
    assert!(across.iter().any(|(a, b)| overlap(span(a), span(b))), "alpha and beta never ran side by side");
}

/// Steps report $3 and $3 against a budget of $5: the run is held with the reason, its
/// running coding step is stopped, and a release with a raised budget finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_budget_is_quarantined_and_resumes_with_a_raised_budget() {
    let mut sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let gate = sb.dir.path().join("gate");
    let spec = format!(
        r#"name: spend
budget: {{max_cost_usd: 5}}
steps:
  - {{id: slow, tool: aider, env: {{STANDIN_GATE: "{g}"}}, with: {{prompt: p}}}}
  - {{id: a, tool: echo, with: {{baton_cost_usd: 3, baton_tokens: 1000}}}}
  - {{id: b, needs: a, tool: echo, with: {{baton_cost_usd: 3}}}}
  - {{id: c, needs: [b, slow], tool: noop}}
"#,
        g = gate.display()
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let held = wait_event(&mut c, &run_id, LONG, |e| e.kind == "run_quarantined").await;
    assert_eq!(held.message, "budget exceeded: $6.00 of $5.00");
    let run = get_run(&mut c, &run_id).await;
    assert_eq!(run.state_name(), "quarantined");
    assert_eq!((run.cost_usd, run.tokens), (6.0, 1000));
    assert_eq!(run.budget.as_ref().and_then(|b| b.max_cost_usd), Some(5.0));
    assert_eq!(step(&run, "b").cost_usd, 3.0);
    // The coding step that was running is stopped, and nothing new started.
    let slow = step(&run, "slow");
    assert_eq!(slow.state_name(), "failed");
    assert_eq!(slow.attempts[0].state_name(), "canceled");
    assert_eq!(step(&run, "c").state_name(), "waiting");
    let shown = run_cli(&sb, &["runs", "show", &run_id]).await;
    assert!(shown.contains("Cost:       $6.00 of $5.00, 1000 tokens"), "{shown}");
    // Kept with the run: a restarted controller knows what it cost.
    sb.restart_controller().await;
    let mut c = sb.client().await;
    let run = get_run(&mut c, &run_id).await;
    assert_eq!((run.state_name(), run.cost_usd, run.tokens), ("quarantined", 6.0, 1000));

    // Released as it is, it would go over again at once: refused.
    let err = c
        .release_run(proto::ReleaseRunRequest { run_id: run_id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("is over its budget ($6.00 of $5.00)"), "{}", err.message());
    std::fs::write(&gate, "").unwrap();
    let released = run_cli(&sb, &["runs", "release", &run_id, "--raise-budget", "10"]).await;
    assert!(released.contains("released"), "{released}");
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    assert_eq!(step(&run, "slow").attempts.len(), 2, "the stopped coding step ran again");
    assert_eq!(run.budget.as_ref().and_then(|b| b.max_cost_usd), Some(10.0));
    assert!((run.cost_usd - 6.01).abs() < 1e-9, "{}", run.cost_usd);
    let report = report_md(&mut c, &run_id).await;
    assert!(report.contains("- **Cost:** $6.01 of $10.00, 3450 tokens"), "{report}");
}

/// An approval step after coding steps is a review gate: `runs show`, the report and
/// the dashboard show the combined diff of the coding steps above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_gate_shows_the_combined_diff_of_the_coding_steps_above_it() {
    let sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let repo = repo(sb.dir.path());
    let spec = format!(
        r#"name: review
steps:
  - {{id: left, tool: aider, with: {{prompt: "edit a", files: [a.py], repo: "{r}"}}}}
  - {{id: right, tool: aider, with: {{prompt: "edit b", files: [b.py], repo: "{r}"}}}}
  - {{id: gate, tool: approval, needs: [left, right], with: {{message: "merge these?"}}}}
"#,
        r = repo.display()
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    wait_event(&mut c, &run_id, LONG, |e| e.kind == "approval_requested").await;
    let run = get_run(&mut c, &run_id).await;
    let commit = |id: &str| result(&run, id)["commit"].as_str().unwrap().to_string();
    let shown = run_cli(&sb, &["runs", "show", &run_id]).await;
    let review = shown.split("Review for gate:\n").nth(1).unwrap_or_else(|| panic!("no review:\n{shown}"));
    assert!(review.contains(&format!("  # step left (commit {})", commit("left"))), "{review}");
    assert!(review.contains(&format!("  # step right (commit {})", commit("right"))), "{review}");
    assert!(
        review.contains("  +# aider (default): edit a") && review.contains("  +# aider (default): edit b"),
        "{review}"
    );
    let report = report_md(&mut c, &run_id).await;
    assert!(report.contains("## Review: gate\n\n```diff\n# step left"), "{report}");

    if let Some(b) = baton_tests::browser::Browser::start().await {
        b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
        b.click("[data-node='gate']").await;
        b.until(
            "the diff to review",
            "const r = document.getElementById('review'); return !!r && r.textContent.includes('+# aider (default): edit b')",
        )
        .await;
        b.screenshot("review").await;
        b.close().await;
    }
    c.decide_approval(proto::DecideApprovalRequest {
        run_id: run_id.clone(),
        step_id: "gate".into(),
        approve: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(wait_run(&mut c, &run_id, LONG).await.state_name(), "succeeded");
}

/// A repository given by URL is cloned into the agent's work dir; the branch of the
/// coding step and the merged target are pushed back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_given_by_url_gets_the_branches_pushed_back() {
    let sb = Sandbox::builder().agents(0).build().await;
    let _coder = coder(&sb).await;
    let origin = repo(sb.dir.path());
    let url = format!("file://{}", origin.display());
    let spec = format!(
        r#"name: remote
steps:
  - {{id: edit, tool: aider, with: {{prompt: "edit a", files: [a.py], repo: "{url}", base: main}}}}
  - id: merge
    tool: git_merge
    needs: [edit]
    with: {{repo: "{url}", target: integration, base: main, commits: ["${{{{ steps.edit.outputs.commit }}}}"]}}
"#
    );
    let mut c = sb.client().await;
    let run_id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    let edit = result(&run, "edit");
    let branch = edit["branch"].as_str().unwrap();
    assert_eq!(git(&origin, &["rev-parse", branch]).trim(), edit["commit"].as_str().unwrap());
    assert_eq!(
        git(&origin, &["rev-parse", "integration"]).trim(),
        result(&run, "merge")["commit"].as_str().unwrap()
    );
    assert_eq!(git(&origin, &["status", "--porcelain"]), "", "the origin's work tree is untouched");
    assert!(sb.dir.path().join("coder/repos").is_dir(), "the clone is kept in the agent's work dir");
}

/// A step's own budget holds the run when that step's attempts pass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_own_budget_holds_the_run() {
    let sb = Sandbox::builder().agents(1).build().await;
    let mut c = sb.client().await;
    let run_id = sb
        .submit("name: s\nsteps:\n  - {id: a, tool: echo, budget: {max_tokens: 100}, with: {baton_tokens: 150}}\n  - {id: b, needs: a, tool: noop}\n")
        .await;
    let held = wait_event(&mut c, &run_id, LONG, |e| e.kind == "run_quarantined").await;
    assert_eq!(held.message, "budget exceeded: step \"a\" 150 tokens of 100");
    // Ready, and held: nothing more starts.
    let b = step(&get_run(&mut c, &run_id).await, "b").clone();
    assert_eq!((b.state_name(), b.attempts.len()), ("ready", 0), "{b:?}");
}
