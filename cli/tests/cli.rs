//! The `baton` command against a real controller and agents.

use std::path::Path;
use std::time::Duration;

use baton_tests::*;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn baton(controller: &str, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .env("BATON_CONTROLLER", controller)
        .env("NO_COLOR", "1")
        .args(args)
        .output()
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The id of the newest run (in `state`, when given), by `runs list`.
async fn newest_run(url: &str, state: Option<&str>) -> String {
    let mut args = vec!["runs", "list", "-o", "json"];
    args.extend(state.map(|s| ["--state", s]).into_iter().flatten());
    let out = baton(url, &args).await;
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    list[0]["id"].as_str().unwrap().to_string()
}

/// `runs show RUN -o json`, parsed.
async fn shown(url: &str, id: &str) -> serde_json::Value {
    let out = baton(url, &["runs", "show", id, "-o", "json"]).await;
    serde_json::from_str(&out.stdout).unwrap()
}

#[tokio::test]
async fn validate_accepts_the_examples_and_rejects_bad_specs_with_exit_2() {
    let ok = baton("http://127.0.0.1:9", &["validate", &example("hello.yaml")]).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("ok, workstream \"hello\" with 8 steps"), "{}", ok.stdout);

    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "name: bad\nsteps:\n  - id: build\n    tool: shell\n    with: {run: make}\n    needs: [compile]\n",
    );
    let out = baton("http://127.0.0.1:9", &["validate", &bad]).await;
    assert_eq!(out.code, 2);
    assert_eq!(out.stderr.trim(), format!("{bad}:3: step \"build\": depends on unknown step \"compile\""));

    let yaml = write(dir.path(), "broken.yaml", "name: b\nsteps:\n  - id: a\n    tool: noop\n   oops: [\n");
    let out = baton("http://127.0.0.1:9", &["validate", &yaml]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.starts_with(&format!("{yaml}:5:")), "{}", out.stderr);

    let json = baton("http://127.0.0.1:9", &["validate", &yaml, "-o", "json"]).await;
    assert_eq!(json.code, 2);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["valid"], false);

    let missing = baton("http://127.0.0.1:9", &["validate", "/no/such/file.yaml"]).await;
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("cannot read /no/such/file.yaml"), "{}", missing.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_show_list_and_cancel() {
    let sb = Sandbox::builder().agents(2).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();

    // submit -o json prints the run id only.
    let out = baton(&url, &["submit", &example("hello.yaml"), "-o", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let run_id = v["run_id"].as_str().unwrap().to_string();

    // runs watch exits 0 for a run that succeeds, and prints a per-step summary.
    let watch = baton(&url, &["runs", "watch", &run_id[..8]]).await;
    assert_eq!(watch.code, 0, "{}{}", watch.stdout, watch.stderr);
    assert!(watch.stdout.contains("run_succeeded"), "{}", watch.stdout);
    assert!(watch.stdout.contains(&format!("run {run_id} succeeded")), "{}", watch.stdout);
    // Resuming one past the last event (the reconnect recipe) ends at once with the
    // final state, as does resuming further on.
    let show = baton(&url, &["runs", "show", &run_id, "-o", "json"]).await;
    let run: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    // The protobuf JSON mapping: 64-bit integers as strings, enums by name.
    let last: i64 = run["last_seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("last_seq in {}", show.stdout));
    for from in [last + 1, last + 50] {
        let from = from.to_string();
        let resumed = tokio::time::timeout(
            Duration::from_secs(60),
            baton(&url, &["runs", "watch", &run_id, "--from-seq", &from]),
        )
        .await
        .expect("the watch ends instead of waiting for events that will never come");
        assert_eq!(resumed.code, 0, "{}{}", resumed.stdout, resumed.stderr);
        assert!(resumed.stdout.contains(&format!("run {run_id} succeeded")), "{}", resumed.stdout);
        assert!(!resumed.stdout.contains("run_succeeded"), "no event is repeated: {}", resumed.stdout);
    }

    let show = baton(&url, &["runs", "show", &run_id, "-o", "json"]).await;
    let run: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(run["state"], "RUN_STATE_SUCCEEDED");
    assert_eq!(run["steps"].as_array().unwrap().len(), 8);
    let text = baton(&url, &["runs", "show", &run_id]).await;
    assert!(text.stdout.contains("build-windows") && text.stdout.contains("succeeded"), "{}", text.stdout);

    // submit --watch exits 1 for a run that fails; -o jsonl gives one event per line.
    let failing =
        write(dir.path(), "fail.yaml", "name: f\nsteps:\n  - {id: a, tool: shell, with: {run: 'exit 4'}}\n");
    let out = baton(&url, &["submit", &failing, "--watch", "-o", "jsonl"]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    let events: Vec<serde_json::Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.last().unwrap()["kind"], "run_failed");

    let list = baton(&url, &["runs", "list", "-o", "jsonl"]).await;
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    let failed = baton(&url, &["runs", "list", "--state", "failed", "-o", "json"]).await;
    let failed: serde_json::Value = serde_json::from_str(&failed.stdout).unwrap();
    assert_eq!(failed.as_array().unwrap().len(), 1);

    let agents = baton(&url, &["agents", "list", "-o", "json"]).await;
    let agents: serde_json::Value = serde_json::from_str(&agents.stdout).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 2);
    assert!(agents[0]["tools"].as_array().unwrap().iter().any(|t| t["name"] == "shell"));

    // Cancel a long run by id prefix.
    let long =
        write(dir.path(), "long.yaml", "name: l\nsteps:\n  - {id: a, tool: sleep, with: {duration: 60s}}\n");
    let id = baton(&url, &["submit", &long]).await.stdout.trim().to_string();
    let mut c = sb.client().await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started").await;
    let cancel = baton(&url, &["runs", "cancel", &id[..10]]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert_eq!(cancel.stdout.trim(), format!("run {id} canceled"));
    let watch = baton(&url, &["runs", "watch", &id]).await;
    assert_eq!(watch.code, 1);

    // Bad input from the controller side is exit 2 as well.
    let kind = write(dir.path(), "kind.yaml", "name: k\nsteps:\n  - {id: a, kind: build}\n");
    let out = baton(&url, &["submit", &kind]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("no router rule maps kind \"build\""), "{}", out.stderr);
}

#[tokio::test]
async fn a_spec_past_the_size_limit_is_invalid_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::File::create(&big).unwrap().set_len(100 * 1024 * 1024).unwrap();
    let big = big.display().to_string();
    for args in [vec!["validate", big.as_str()], vec!["submit", big.as_str()]] {
        let out = baton("http://127.0.0.1:9", &args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("{big}: the spec is 104857600 bytes; the limit is 16777216")),
            "{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn an_unreachable_controller_is_a_clear_error() {
    let out = baton("http://127.0.0.1:9", &["runs", "list"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot reach the controller at http://127.0.0.1:9"), "{}", out.stderr);
}

#[tokio::test]
async fn dev_runs_the_example_and_prints_a_summary() {
    let out = baton("http://127.0.0.1:9", &["dev", &example("hello.yaml")]).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for step in ["fetch", "build-linux", "build-mac", "build-windows", "test-linux", "report"] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(step) && l.contains("shell"))
            .unwrap_or_else(|| panic!("no summary line for {step}:\n{}", out.stdout));
        assert!(line.contains("succeeded"), "{line}");
    }
    assert!(out.stdout.contains("succeeded in"), "{}", out.stdout);
    // It says where the run's page is on the dashboard.
    let url = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("dashboard: http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no dashboard URL:\n{}", out.stderr));
    assert!(url.contains("/runs/"), "{url}");

    let dir = tempfile::tempdir().unwrap();
    let failing = write(
        dir.path(),
        "f.yaml",
        "name: f\nsteps:\n  - {id: a, tool: fail}\n  - {id: b, needs: a, tool: noop}\n",
    );
    let db = dir.path().join("dev.db");
    let out =
        baton("http://127.0.0.1:9", &["dev", &failing, "--agents", "1", "--db", db.to_str().unwrap()]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("skipped"), "{}", out.stdout);
    assert!(db.exists(), "--db keeps the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_logs_step_cancel_and_breakers_from_the_command_line() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("n");
    let q = write(
        dir.path(),
        "q.yaml",
        &format!(
            "name: q\non_failure: quarantine\nsteps:\n  - {{id: x, tool: shell, with: {{run: 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; echo try $n; test $n -gt 1'}}}}\n",
            f = counter.display()
        ),
    );
    // A watched run that is quarantined exits 3 and says how to go on.
    let out = baton(&url, &["submit", &q, "--watch"]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("is quarantined"), "{}", out.stderr);
    assert!(out.stderr.contains("baton runs release"), "{}", out.stderr);
    let id = baton(&url, &["runs", "list", "--state", "quarantined", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&id.stdout).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    let rel = baton(&url, &["runs", "release", &id]).await;
    assert_eq!(rel.code, 0, "{}", rel.stderr);
    assert_eq!(rel.stdout.trim(), format!("run {id} released; it is running"));
    assert_eq!(baton(&url, &["runs", "watch", &id]).await.code, 0);
    let logs = baton(&url, &["runs", "logs", &id, "x"]).await;
    assert_eq!(logs.stdout, "try 2\n");
    let first = baton(&url, &["runs", "logs", &id, "x", "--attempt", "1"]).await;
    assert_eq!(first.stdout, "try 1\n");
    let all = baton(&url, &["runs", "logs", &id]).await;
    assert_eq!(all.stdout, "x | try 2\n");
    let report = baton(&url, &["runs", "report", &id]).await;
    assert!(report.stdout.starts_with(&format!("# Run {id} — q")), "{}", report.stdout);
    assert!(report.stdout.contains("## Quarantines"), "{}", report.stdout);
    let html = dir.path().join("r.html");
    let out =
        baton(&url, &["runs", "report", &id, "--format", "html", "--out", html.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));

    // Cancel one step of a running run.
    let sc = write(
        dir.path(),
        "sc.yaml",
        "name: sc\nsteps:\n  - {id: long, tool: sleep, with: {duration: 60s}}\n  - {id: next, needs: long, tool: noop}\n",
    );
    let id = baton(&url, &["submit", &sc]).await.stdout.trim().to_string();
    let mut c = sb.client().await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started").await;
    let out = baton(&url, &["runs", "cancel", &id, "--step", "long"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with(&format!("step long of run {id} canceled")), "{}", out.stdout);
    let show = baton(&url, &["runs", "show", &id, "-o", "json"]).await;
    let run: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(run["state"], "RUN_STATE_FAILED");
    assert_eq!(run["steps"][1]["state"], "STEP_STATE_SKIPPED");

    let b = baton(&url, &["breakers", "list"]).await;
    assert_eq!(b.code, 0);
    assert!(b.stdout.starts_with("TOOL"), "{}", b.stdout);
    let r = baton(&url, &["breakers", "reset", "hammer"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no breaker for tool hammer"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_router_reload_from_the_command_line() {
    let sb = Sandbox::builder().agents(1).router(r#"{"rules": []}"#).build().await;
    let url = sb.url();
    let out = baton(&url, &["agents", "drain", "agent-1"]).await;
    assert_eq!(out.stdout.trim(), "agent agent-1 is draining: it takes no new work");
    let list = baton(&url, &["agents", "list"]).await;
    assert!(list.stdout.contains("connected (draining)"), "{}", list.stdout);
    let out = baton(&url, &["agents", "drain", "agent-1", "--undo"]).await;
    assert_eq!(out.stdout.trim(), "agent agent-1 takes work again");
    let out = baton(&url, &["router", "reload"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, "router reloaded: 0 rules"));
    std::fs::write(sb.router.as_ref().unwrap(), "{\"rules\": [{\"tool\": \"hammer\"}]}").unwrap();
    let out = baton(&url, &["router", "reload"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("rule 0: unknown tool \"hammer\""), "{}", out.stderr);
}

/// The `baton` command with extra environment and stdin.
async fn baton_with(envs: &[(&str, &str)], args: &[&str], stdin: &str) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.env("NO_COLOR", "1").args(args).stdin(std::process::Stdio::piped());
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The README's deployment, on one machine: a CA and certificates, the first admin
/// token, a controller with TLS, an agent enrolled with a join token, a secret, a
/// submitter's token, and a run whose output shows the secret masked.
#[tokio::test]
async fn a_secure_deployment_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki").display().to_string();
    let ok = |o: &Out, what: &str| assert_eq!(o.code, 0, "{what}: {}{}", o.stdout, o.stderr);
    let o = baton_with(&[], &["certs", "ca", "--dir", &pki], "").await;
    ok(&o, "certs ca");
    let o = baton_with(
        &[],
        &["certs", "issue", "--dir", &pki, "--role", "controller", "--name", "ctl", "--host", "127.0.0.1"],
        "",
    )
    .await;
    ok(&o, "certs issue");
    let db = format!("sqlite://{}", d.join("baton.db").display());
    let boot = std::process::Command::new(binary("baton-controller"))
        .args(["bootstrap", "--db", &db])
        .output()
        .unwrap();
    assert!(boot.status.success(), "{}", String::from_utf8_lossy(&boot.stderr));
    let admin = String::from_utf8(boot.stdout).unwrap().trim().to_string();
    let addr = free_addr();
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--db",
        &db,
        "--tls-cert",
        &format!("{pki}/ctl.pem"),
        "--tls-key",
        &format!("{pki}/ctl-key.pem"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _controller = Process::spawn("baton-controller", &args, d.join("controller.log"), &[]);
    let url = format!("https://{addr}");
    let ca = format!("{pki}/ca.pem");
    let as_admin =
        [("BATON_CONTROLLER", url.as_str()), ("BATON_TLS_CA", ca.as_str()), ("BATON_TOKEN", admin.as_str())];
    eventually(Duration::from_secs(20), "the controller to answer", || async {
        (baton_with(&as_admin, &["whoami"], "").await.code == 0).then_some(())
    })
    .await;
    let me = baton_with(&as_admin, &["whoami"], "").await;
    assert_eq!(me.stdout.trim(), "bootstrap (admin) via token");

    // Plaintext, or no token: refused.
    let plain = format!("http://{addr}");
    let o = baton_with(&[("BATON_CONTROLLER", &plain), ("BATON_TOKEN", &admin)], &["runs", "list"], "").await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    let o = baton_with(&[("BATON_CONTROLLER", &url), ("BATON_TLS_CA", &ca)], &["runs", "list"], "").await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("not authenticated: no credential"), "{}", o.stderr);

    // An agent enrolls with a join token.
    let join =
        baton_with(&as_admin, &["agents", "join-token", "--ttl", "10m", "--labels", "zone=b"], "").await;
    ok(&join, "join-token");
    let work = d.join("w1").display().to_string();
    let agent_args: Vec<String> =
        ["--controller", &url, "--tls-ca", &ca, "--name", "w1", "--work-dir", &work]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let _agent = Process::spawn(
        "baton-agent",
        &agent_args,
        d.join("agent.log"),
        &[("BATON_JOIN_TOKEN", join.stdout.trim()), ("RUST_LOG", "info")],
    );
    eventually(Duration::from_secs(20), "the agent to connect", || async {
        let o = baton_with(&as_admin, &["agents", "list"], "").await;
        (o.stdout.contains("w1") && o.stdout.contains("connected")).then_some(())
    })
    .await;
    let o = baton_with(&as_admin, &["agents", "list"], "").await;
    assert!(o.stdout.contains("zone=b"), "the join token's labels: {}", o.stdout);

    // A secret from stdin, a submitter's token, and a run that uses the secret.
    ok(&baton_with(&as_admin, &["secrets", "set", "db"], "correct-horse-battery\n").await, "secrets set");
    let list = baton_with(&as_admin, &["secrets", "list"], "").await;
    assert!(list.stdout.contains("db") && !list.stdout.contains("correct-horse"), "{}", list.stdout);
    let ci = baton_with(&as_admin, &["tokens", "create", "--name", "ci", "--role", "submitter"], "").await;
    ok(&ci, "tokens create");
    let as_ci = [
        ("BATON_CONTROLLER", url.as_str()),
        ("BATON_TLS_CA", ca.as_str()),
        ("BATON_TOKEN", ci.stdout.trim()),
    ];
    let spec = write(
        d,
        "deploy.yaml",
        "name: deploy\nparams: {target: prod}\nsteps:\n  - id: push\n    tool: shell\n    env: {DB_PASSWORD: '${{ secrets.db }}'}\n    with: {run: 'echo \"to ${{ params.target }} with $DB_PASSWORD\"'}\n",
    );
    let submitted = baton_with(&as_ci, &["submit", &spec], "").await;
    ok(&submitted, "submit");
    let run_id = submitted.stdout.trim().to_string();
    ok(&baton_with(&as_ci, &["runs", "watch", &run_id], "").await, "runs watch");
    let logs = baton_with(&as_ci, &["runs", "logs", &run_id, "push"], "").await;
    ok(&logs, "runs logs");
    assert_eq!(logs.stdout, "to prod with ***\n");
    let report = baton_with(&as_ci, &["runs", "report", &run_id], "").await;
    assert!(report.stdout.contains("by token ci"), "{}", report.stdout);
    // The submitter may not manage tokens.
    let o = baton_with(&as_ci, &["tokens", "list"], "").await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("permission denied: token ci (role submitter) may not call ListTokens"),
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn submit_waits_for_a_controller_that_comes_up_and_creates_one_run() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let spec = write(dir.path(), "w.yaml", "name: later\nsteps:\n  - {id: a, tool: noop}\n");
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .env("BATON_CONTROLLER", &url)
        .args(["--reconnect-timeout", "60s", "submit", &spec])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first try finds nobody and says it will retry.
    let mut err = tokio::io::BufReader::new(cli.stderr.take().unwrap()).lines();
    let first = err.next_line().await.unwrap().unwrap_or_default();
    let waiting_since = std::time::Instant::now();
    assert!(
        first.contains("cannot reach the controller") && first.contains("retrying for up to 1m"),
        "{first}"
    );
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let _controller = Process::spawn(
        "baton-controller",
        &["--listen".to_string(), addr.to_string(), "--db".to_string(), db],
        dir.path().join("controller.log"),
        &[],
    );
    // The same failure is not said again at every try: once more per 10 s at most.
    let mut again = 0;
    while let Some(line) = err.next_line().await.unwrap() {
        again += usize::from(line.contains("cannot reach the controller"));
    }
    assert!(again as u64 <= waiting_since.elapsed().as_secs() / 10, "{again} repeats");
    let out = cli.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let run_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let list = baton(&url, &["runs", "list", "-o", "json"]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert_eq!(list.stdout.matches("\"id\"").count(), 1, "one run: {}", list.stdout);
    assert!(list.stdout.contains(&run_id), "{}", list.stdout);
}

/// `baton ARGS` with its stdout a pipe whose reader has gone, as in `baton runs show X |
/// head -0`.
async fn baton_into_closed_pipe(controller: &str, args: &[&str]) -> Out {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // `output()` would replace stdout with a pipe of its own.
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .env("BATON_CONTROLLER", controller)
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_every_read_command_quietly_with_0() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "p.yaml",
        "name: p\nsteps:\n  - {id: s, tool: shell, with: {run: 'seq 1 20000'}}\n",
    );
    let run = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let id = baton(&url, &["runs", "list", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&id.stdout).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    for args in [
        vec!["runs", "show", &id],
        vec!["runs", "show", &id, "-o", "json"],
        vec!["runs", "list", "-o", "jsonl"],
        vec!["runs", "report", &id],
        vec!["runs", "logs", &id, "s"],
        vec!["runs", "logs", &id, "-f"],
        vec!["runs", "watch", &id],
        vec!["agents", "list"],
    ] {
        let out = baton_into_closed_pipe(&url, &args).await;
        assert_eq!((out.code, out.stderr.as_str()), (0, ""), "baton {}", args.join(" "));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_from_stdin_a_bare_address_and_yaml_output() {
    let sb = Sandbox::builder().agents(1).build().await;
    let bare = sb.url().trim_start_matches("http://").to_string();
    let env = [("BATON_CONTROLLER", bare.as_str())];
    let spec = "name: piped\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo from-stdin'}}\n";
    let out = baton_with(&env, &["submit", "-", "--watch"], spec).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    let out = baton_with(&env, &["runs", "list", "-o", "yaml"], "").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let runs: serde_json::Value = serde_norway::from_str(&out.stdout).unwrap();
    assert_eq!(runs[0]["workstream"], "piped");
    assert_eq!(runs[0]["state"], "RUN_STATE_SUCCEEDED");
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let logs = baton_with(&env, &["runs", "logs", &id, "a", "-o", "jsonl"], "").await;
    let chunk: serde_json::Value = serde_json::from_str(logs.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(chunk["step_id"], "a");

    // `runs show` shows the params, secret ones masked, and the steps' outputs.
    let spec = "name: shown\nparams: {who: {}, key: {secret: true}}\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo greeting=hello-$WHO >> $BATON_OUTPUT'}, env: {WHO: '${{ params.who }}'}}\n";
    let out = baton_with(
        &env,
        &["submit", "-", "--watch", "--param", "who=ann", "--param", "key=hunter2-secret"],
        spec,
    )
    .await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let runs = baton_with(&env, &["runs", "list", "-o", "json"], "").await;
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    let show = baton_with(&env, &["runs", "show", runs[0]["id"].as_str().unwrap()], "").await;
    assert!(show.stdout.contains("  who = ann\n"), "{}", show.stdout);
    assert!(show.stdout.contains("  key = ***\n"), "{}", show.stdout);
    assert!(!show.stdout.contains("hunter2"), "{}", show.stdout);
    assert!(show.stdout.contains("Outputs:\n  a.greeting = hello-ann\n"), "{}", show.stdout);

    // A bad spec on stdin is named as such.
    let out = baton_with(&env, &["validate", "-"], "name: x\nsteps: []\n").await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.starts_with("<stdin>"), "{}", out.stderr);
}

#[tokio::test]
async fn completion_scripts_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = baton("http://127.0.0.1:9", &["completion", shell]).await;
        assert_eq!(out.code, 0, "{shell}: {}", out.stderr);
        assert!(out.stdout.contains("submit") && out.stdout.contains("runs"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bash = baton("http://127.0.0.1:9", &["completion", "bash"]).await;
    let script = write(dir.path(), "baton.bash", &bash.stdout);
    let check = tokio::process::Command::new("bash").args(["-n", &script]).output().await.unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));

    let out = baton("http://127.0.0.1:9", &["man", dir.path().to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let page = std::fs::read_to_string(dir.path().join("baton-runs-list.1")).unwrap();
    assert!(page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH baton-runs-list"), "{page}");
    assert!(page.contains("List runs, newest first"), "{page}");
    for name in ["baton.1", "baton-submit.1", "baton-runs-logs.1", "baton-tokens-create.1"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_name_controllers_and_flags_override_them() {
    let sb = Sandbox::builder().agents(1).build().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml").display().to_string();
    let env = [("BATON_CONFIG", config.as_str())];
    let ok = |o: &Out| assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);

    let add = baton_with(&env, &["context", "add", "local", "--controller", &sb.url()], "").await;
    ok(&add);
    assert!(add.stderr.contains("context local is now in use"), "{}", add.stderr);
    ok(&baton_with(&env, &["context", "add", "dead", "--controller", "http://127.0.0.1:9"], "").await);
    let list = baton_with(&env, &["context", "list"], "").await;
    ok(&list);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert!(lines[1].starts_with("         dead"), "{}", list.stdout);
    assert!(lines[2].starts_with("*        local"), "{}", list.stdout);

    // The current context is used; --context and --controller override it.
    ok(&baton_with(&env, &["runs", "list"], "").await);
    let dead = baton_with(&env, &["--context", "dead", "runs", "list"], "").await;
    assert_eq!(dead.code, 1);
    assert!(dead.stderr.contains("127.0.0.1:9"), "{}", dead.stderr);
    ok(&baton_with(&env, &["--context", "dead", "--controller", &sb.url(), "runs", "list"], "").await);
    ok(&baton_with(&env, &["context", "use", "dead"], "").await);
    assert_eq!(baton_with(&env, &["runs", "list"], "").await.code, 1);

    let none = baton_with(&env, &["--context", "prod", "runs", "list"], "").await;
    assert_eq!(none.code, 2);
    assert_eq!(none.stderr.trim(), "no context named \"prod\" (contexts: dead, local)");
    let token = baton_with(&env, &["context", "add", "t", "--controller", "x:1", "--token", "abc"], "").await;
    assert_eq!(token.code, 2);
    assert!(token.stderr.contains("give --token-file"), "{}", token.stderr);
    ok(&baton_with(&env, &["context", "remove", "dead"], "").await);
    let json = baton_with(&env, &["context", "list", "-o", "json"], "").await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["current"], serde_json::Value::Null);
    assert_eq!(v["contexts"]["local"]["controller"], sb.url());
}

/// Whatever names something that does not exist exits 2 with one line on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_that_is_not_there_exits_2_with_one_line() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let id = baton(&url, &["submit", &example("hello.yaml"), "--watch"]).await;
    assert_eq!(id.code, 0, "{}", id.stderr);
    let run = baton(&url, &["runs", "list", "-o", "json"]).await;
    let run: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let run = run[0]["id"].as_str().unwrap().to_string();
    let nope = "0190aaaa-0000-7000-8000-000000000000";
    let mut wrong = Vec::new();
    for args in [
        vec!["runs", "show", nope],
        vec!["runs", "watch", nope],
        vec!["runs", "logs", nope],
        vec!["runs", "logs", nope, "-f"],
        vec!["runs", "logs", &run, "nosuchstep"],
        vec!["runs", "logs", &run, "fetch", "--attempt", "9"],
        vec!["runs", "report", nope],
        vec!["runs", "cancel", nope],
        vec!["runs", "cancel", &run, "--step", "nosuchstep"],
        vec!["runs", "release", nope],
        vec!["agents", "drain", "nosuchagent"],
        vec!["breakers", "reset", "nosuchtool"],
    ] {
        let out = baton(&url, &args).await;
        let what = format!("baton {}: {} {}", args.join(" "), out.code, out.stderr);
        let line = out.stderr.trim();
        let says = line.contains("not found") || line.starts_with("no ") || line.contains(" no ");
        if out.code != 2 || line.lines().count() != 1 || !says {
            wrong.push(what);
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_pruned_by_retention_and_deleted_by_hand() {
    let retention = baton_controller::Retention {
        keep: Some(Duration::from_secs(3600)),
        every: Duration::from_millis(50),
        ..Default::default()
    };
    let sb = Sandbox::builder().agents(1).retention(retention).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let short = write(
        dir.path(),
        "short.yaml",
        "name: short\nretain: 1ms\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo gone'}}\n",
    );
    let kept = write(dir.path(), "kept.yaml", "name: kept\nsteps:\n  - {id: a, tool: noop}\n");
    let submit = |f: String| {
        let url = url.clone();
        async move {
            let out = baton(&url, &["submit", &f, "-o", "json"]).await;
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            v["run_id"].as_str().unwrap().to_string()
        }
    };
    let (short_id, kept_id) = (submit(short).await, submit(kept).await);
    assert_eq!(baton(&url, &["runs", "watch", &kept_id]).await.code, 0);
    // The run whose workstream keeps it 1ms goes; the one under the controller's hour stays.
    eventually(Duration::from_secs(20), "the short-lived run to be pruned", || async {
        (baton(&url, &["runs", "show", &short_id]).await.code == 2).then_some(())
    })
    .await;
    let logs = baton(&url, &["runs", "logs", &short_id]).await;
    assert_eq!(logs.code, 2, "{}", logs.stderr);
    assert_eq!(baton(&url, &["runs", "show", &kept_id]).await.code, 0);
    let (_, metrics) = http_get(sb.metrics_addr, "/metrics").await;
    assert!(metrics.contains("baton_pruned_runs_total 1"), "{metrics}");
    assert!(metrics.contains("baton_database_bytes "), "{metrics}");

    // By hand: a running run is refused, a finished one goes.
    let long = write(
        dir.path(),
        "long.yaml",
        "name: long\nsteps:\n  - {id: a, tool: sleep, with: {duration: 60s}}\n",
    );
    let running = baton(&url, &["submit", &long]).await.stdout.trim().to_string();
    let refused = baton(&url, &["runs", "delete", &running]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("only finished runs are deleted (cancel it first)"),
        "{}",
        refused.stderr
    );
    // A backup of the live database opens as one of its own, with the run in it.
    let copy = dir.path().join("backup.db");
    let backup = std::process::Command::new(binary("baton-controller"))
        .args(["backup", copy.to_str().unwrap(), "--db", &sb.db])
        .output()
        .unwrap();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let restored =
        baton_controller::store::Store::open(&format!("sqlite://{}", copy.display())).await.unwrap();
    assert_eq!(restored.get_run(&kept_id).await.unwrap().run.workstream, "kept");
    let again = std::process::Command::new(binary("baton-controller"))
        .args(["backup", copy.to_str().unwrap(), "--db", &sb.db])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    let deleted = baton(&url, &["runs", "delete", &kept_id]).await;
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    assert!(deleted.stdout.starts_with(&format!("run {kept_id} deleted (")), "{}", deleted.stdout);
    assert_eq!(baton(&url, &["runs", "show", &kept_id]).await.code, 2);
}

/// Ctrl-C on `baton dev` stops its tools (no process is left behind), says what it
/// stopped, and exits 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_dev_stops_its_tools_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let spec = write(
        dir.path(),
        "long.yaml",
        &format!(
            "name: long\nsteps:\n  - {{id: forever, tool: shell, with: {{run: 'echo $$ > {}; exec sleep 600'}}}}\n",
            pid_file.display()
        ),
    );
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["dev", &spec, "--agents", "1"])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tool: i32 = eventually(Duration::from_secs(30), "the tool to start", || async {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .await;
    assert!(process_alive(tool));
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: stopping step forever and its processes"), "{stderr}");
    assert!(stderr.contains("stopped: the local agents and their tools have ended"), "{stderr}");
    assert!(!process_alive(tool), "the tool {tool} outlived baton dev");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_summarizes_big_runs_shows_failures_and_colours_on_request() {
    let sb = Sandbox::builder().agents(2).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let mut big = String::from("name: big\nsteps:\n");
    for i in 0..200 {
        big.push_str(&format!("  - {{id: s{i}, tool: noop}}\n"));
    }
    let big = write(dir.path(), "big.yaml", &big);
    let out = baton(&url, &["submit", &big, "--watch"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    // Not one line per event (there are more than 600): run events, ten summaries and
    // the final table of 200 steps.
    let summaries = lines.iter().filter(|l| l.starts_with("progress: ")).count();
    assert_eq!(summaries, 10, "{}", out.stdout);
    assert!(lines.contains(&"progress: 200/200 steps done (200 succeeded)"), "{}", out.stdout);
    assert!(!out.stdout.contains("attempt_started"), "{}", out.stdout);
    assert!(lines.len() < 260, "{} lines", lines.len());

    // A failed run's summary shows what its failing step printed last.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "name: bad\nsteps:\n  - {id: b, tool: shell, with: {run: 'echo one; echo two; echo the cause >&2; exit 3'}}\n",
    );
    let out = baton(&url, &["submit", &bad, "--watch"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("step b failed (attempt 1, exit 3)"), "{}", out.stdout);
    assert!(out.stdout.contains("  | the cause\n"), "{}", out.stdout);
    assert!(!out.stdout.contains('\x1b'), "no colour into a pipe: {}", out.stdout);

    let coloured = baton(&url, &["submit", &bad, "--watch", "--color", "always"]).await;
    assert!(coloured.stdout.contains("\x1b[31mfailed\x1b[0m"), "{}", coloured.stdout);
    let never = baton(&url, &["submit", &bad, "--watch", "--color", "never"]).await;
    assert!(never.stdout.contains("step b failed") && !never.stdout.contains('\x1b'));

    // On a terminal (a pty of 60 columns): coloured and cut to its width by default;
    // NO_COLOR and TERM=dumb turn colour (and the redrawn progress line) off.
    let baton_bin = env!("CARGO_BIN_EXE_baton");
    let on_tty = |env: &'static str| {
        let cmd = format!("stty rows 24 cols 60; {env} {baton_bin} --controller {url} submit {bad} --watch");
        async move {
            let out = tokio::process::Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .env_remove("NO_COLOR")
                .env("TERM", "xterm")
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let tty = on_tty("").await;
    assert!(tty.contains("\x1b[31mfailed\x1b[0m"), "{tty}");
    assert!(!on_tty("NO_COLOR=1").await.contains("\x1b[31m"));
    let dumb = on_tty("TERM=dumb").await;
    assert!(!dumb.contains('\x1b'), "{dumb:?}");
    assert!(dumb.contains("step b failed"), "{dumb}");
    // `HH:MM:SS  #1    run_submitted    run [pending]  workstream "bad" with 1 steps`
    // is longer than 60 columns.
    let submitted = dumb.lines().find(|l| l.contains("run_submitted")).map(str::to_string);
    let submitted = submitted.unwrap_or_else(|| panic!("{dumb}"));
    let submitted = submitted.trim_end_matches('\r');
    assert_eq!(submitted.chars().count(), 60, "{submitted:?}");
    assert!(submitted.ends_with('…'), "{submitted:?}");
}

/// Ctrl-C on `submit --watch` stops watching, not the run, and says how to go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_a_watch_leaves_the_run_going() {
    let sb = Sandbox::builder().agents(1).build().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "long.yaml",
        "name: long\nsteps:\n  - {id: s, tool: sleep, with: {duration: 60s}}\n",
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .env("BATON_CONTROLLER", sb.url())
        .args(["submit", &spec, "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = sb.client().await;
    let run_id = eventually(Duration::from_secs(20), "the run to start", || {
        let mut c = c.clone();
        async move {
            let runs =
                c.list_runs(baton_common::pb::ListRunsRequest::default()).await.ok()?.into_inner().runs;
            runs.first()
                .filter(|r| r.state == baton_common::pb::RunState::Running as i32)
                .map(|r| r.id.clone())
        }
    })
    .await;
    wait_event(&mut c, &run_id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains(&format!("stopped watching; run {run_id} goes on")), "{stderr}");
    let run = get_run(&mut c, &run_id).await;
    assert_eq!(run.state_name(), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_retried_in_place_and_its_succeeded_steps_do_not_run_again() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("n");
    let ran_a = dir.path().join("a-ran");
    // b fails the first time it runs and succeeds after; c needs b.
    let spec = write(
        dir.path(),
        "r.yaml",
        &format!(
            "name: r\nsteps:\n  - {{id: a, tool: shell, with: {{run: 'echo a >> {a}'}}}}\n  - {{id: b, needs: a, tool: shell, retry: {{max_attempts: 1}}, with: {{run: 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; test $n -gt 1'}}}}\n  - {{id: c, needs: b, tool: shell, with: {{run: 'echo c'}}}}\n",
            a = ran_a.display(),
            f = counter.display()
        ),
    );
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let id = newest_run(&url, Some("failed")).await;

    let out = baton(&url, &["runs", "retry", &id, "--watch"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(&format!("run {id} retried")), "{}", out.stderr);
    let run = shown(&url, &id).await;
    assert_eq!(run["state"], "RUN_STATE_SUCCEEDED");
    // Attempts that ran (a pipelined one dropped when b failed never started).
    let ran: Vec<usize> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["attempts"].as_array().unwrap().iter().filter(|a| a.get("started_at").is_some()).count())
        .collect();
    assert_eq!(ran, vec![1, 2, 1], "{run}");
    assert_eq!(std::fs::read_to_string(&ran_a).unwrap(), "a\n", "a ran once");

    // Its whole log, watched from the start, goes past the first end to the second.
    let w = baton(&url, &["runs", "watch", &id]).await;
    assert_eq!(w.code, 0, "{}{}", w.stdout, w.stderr);
    assert!(w.stdout.contains("retried"), "{}", w.stdout);
    let report = baton(&url, &["runs", "report", &id]).await;
    assert!(report.stdout.contains("run_retried: retried: 2 steps run again"), "{}", report.stdout);

    // A run that succeeded has nothing to retry; a running one is not retried.
    let again = baton(&url, &["runs", "retry", &id]).await;
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("succeeded: there is nothing to retry"), "{}", again.stderr);
    let long =
        write(dir.path(), "l.yaml", "name: l\nsteps:\n  - {id: s, tool: sleep, with: {duration: 60s}}\n");
    let lid = baton(&url, &["submit", &long]).await.stdout.trim().to_string();
    let busy = baton(&url, &["runs", "retry", &lid]).await;
    assert_eq!(busy.code, 1, "{}", busy.stderr);
    assert!(busy.stderr.contains("only a failed or canceled run can be retried"), "{}", busy.stderr);
    // A canceled run is retried too.
    assert_eq!(baton(&url, &["runs", "cancel", &lid]).await.code, 0);
    let r = baton(&url, &["runs", "retry", &lid]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), format!("run {lid} retried; it is running"));
    let mut c = sb.client().await;
    let started =
        wait_event(&mut c, &lid, Duration::from_secs(10), |e| e.kind == "attempt_started" && e.seq > 1).await;
    assert_eq!(started.step_id, "s");
    assert_eq!(baton(&url, &["runs", "cancel", &lid]).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_from_a_step_reuses_what_is_upstream_and_links_both_runs() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // a gives an output; d stands apart; b needs a; c needs b, reads a's output, and
    // fails the first time it runs.
    let spec = write(
        dir.path(),
        "r.yaml",
        &format!(
            "name: rr\nsteps:\n  - {{id: a, tool: shell, with: {{run: 'echo a >> {d}/a; echo x=1 >> $BATON_OUTPUT'}}}}\n  - {{id: d, tool: shell, with: {{run: 'echo d >> {d}/d'}}}}\n  - {{id: b, needs: a, tool: shell, with: {{run: 'echo b >> {d}/b'}}}}\n  - {{id: c, needs: b, tool: shell, retry: {{max_attempts: 1}}, env: {{X: '${{{{ steps.a.outputs.x }}}}'}}, with: {{run: 'echo c >> {d}/c; echo a said $X; test $(wc -l < {d}/c) -gt 1'}}}}\n"
        ),
    );
    let lines =
        |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default().lines().count();
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let old = newest_run(&url, Some("failed")).await;

    let bad = baton(&url, &["runs", "rerun", &old, "--from", "nope"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("has no step \"nope\""), "{}", bad.stderr);

    let out = baton(&url, &["runs", "rerun", &old, "--from", "b", "--watch"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("(2 steps reused)"), "{}", out.stderr);
    assert_eq!((lines("a"), lines("d"), lines("b"), lines("c")), (1, 1, 2, 2), "a and d not run again");
    let new = newest_run(&url, Some("succeeded")).await;
    let run = shown(&url, &new).await;
    assert_eq!(run["rerun_of"], old.as_str());
    let states: Vec<(&str, &str)> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("a", "STEP_STATE_REUSED"),
            ("d", "STEP_STATE_REUSED"),
            ("b", "STEP_STATE_SUCCEEDED"),
            ("c", "STEP_STATE_SUCCEEDED")
        ]
    );
    assert!(
        run["steps"][0]["attempts"].as_array().is_none_or(|a| a.is_empty()),
        "a reused step makes no attempt"
    );
    assert_eq!(run["steps"][0]["result"]["x"], "1", "it keeps its outputs");
    // c read the output a gave in the old run.
    let logs = baton(&url, &["runs", "logs", &new, "c"]).await;
    assert_eq!(logs.stdout, "a said 1\n");
    assert_eq!(shown(&url, &old).await["reruns"], serde_json::json!([new.clone()]));

    // --only: b alone runs again; c is reused from the rerun.
    let only = baton(&url, &["runs", "rerun", &new, "--only", "b", "--watch"]).await;
    assert_eq!(only.code, 0, "{}{}", only.stdout, only.stderr);
    assert_eq!((lines("a"), lines("d"), lines("b"), lines("c")), (1, 1, 3, 2));
    let text = baton(&url, &["runs", "show", &new]).await;
    assert!(text.stdout.contains(&format!("Rerun of:   {old}")), "{}", text.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrix_step_runs_each_combination_within_max_parallel_and_its_join_gets_the_list() {
    let sb = Sandbox::builder().agents(2).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    // Each expansion holds a lock while it runs: two at once would fail one of them.
    let spec = write(
        dir.path(),
        "m.yaml",
        &format!(
            "name: mx\nsteps:\n  - id: test\n    tool: shell\n    matrix: {{n: [1, 2, 3]}}\n    max_parallel: 1\n    with: {{run: 'mkdir {l} || exit 9; echo v=${{{{ matrix.n }}}} >> $BATON_OUTPUT; sleep 0.3; rmdir {l}'}}\n  - id: join\n    needs: test\n    tool: shell\n    env: {{ALL: '${{{{ steps.test.outputs.v }}}}'}}\n    with: {{run: 'echo \"all=$ALL\"'}}\n",
            l = lock.display()
        ),
    );
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let id = newest_run(&url, None).await;
    let run = shown(&url, &id).await;
    let ids: Vec<&str> = run["steps"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["test[n=1]", "test[n=2]", "test[n=3]", "join"]);
    let logs = baton(&url, &["runs", "logs", &id, "join"]).await;
    assert_eq!(logs.stdout, "all=[\"1\",\"2\",\"3\"]\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_skip_without_failing_and_cleanup_runs_after_a_failure() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Nothing changed: deploy is skipped (and what needs it), the run succeeds.
    let spec = write(
        dir.path(),
        "c.yaml",
        &format!(
            "name: cond\nparams: {{env: prod}}\nsteps:\n  - {{id: check, tool: shell, with: {{run: 'echo changed=false >> $BATON_OUTPUT'}}}}\n  - {{id: deploy, needs: check, if: \"${{{{ steps.check.outputs.changed == true && params.env == 'prod' }}}}\", tool: shell, with: {{run: 'touch {d}/deployed'}}}}\n  - {{id: announce, needs: deploy, tool: shell, with: {{run: 'touch {d}/announced'}}}}\n  - {{id: cleanup, needs: deploy, when: always, tool: shell, with: {{run: 'touch {d}/cleaned'}}}}\n"
        ),
    );
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!dir.path().join("deployed").exists() && !dir.path().join("announced").exists());
    assert!(dir.path().join("cleaned").exists(), "cleanup runs whatever happened upstream");
    let id = newest_run(&url, None).await;
    let run = shown(&url, &id).await;
    assert_eq!(run["steps"][1]["state"], "STEP_STATE_SKIPPED");
    assert!(run["steps"][1]["reason"].as_str().unwrap().contains("condition false"), "{run}");

    // A failing step: cleanup and on_failure notification still run; the run fails.
    let spec = write(
        dir.path(),
        "f.yaml",
        &format!(
            "name: fails\nsteps:\n  - {{id: build, tool: shell, with: {{run: 'exit 3'}}}}\n  - {{id: test, needs: build, tool: shell, with: {{run: 'true'}}}}\n  - {{id: notify, needs: test, when: on_failure, tool: shell, with: {{run: 'touch {d}/notified'}}}}\n  - {{id: logs, needs: test, when: always, tool: shell, with: {{run: 'touch {d}/collected'}}}}\n"
        ),
    );
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(dir.path().join("notified").exists() && dir.path().join("collected").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_step_runs_once_for_the_same_input_and_again_when_it_changes() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let spec = write(
        dir.path(),
        "k.yaml",
        &format!(
            "name: cached\nparams: {{v: a}}\nsteps:\n  - {{id: build, tool: shell, cache: {{ttl: 1h}}, with: {{run: 'echo ran >> {d}/runs; echo out=${{{{ params.v }}}} >> $BATON_OUTPUT'}}}}\n  - {{id: use, needs: build, tool: shell, env: {{OUT: '${{{{ steps.build.outputs.out }}}}'}}, with: {{run: 'echo got $OUT'}}}}\n"
        ),
    );
    let runs = || std::fs::read_to_string(dir.path().join("runs")).unwrap_or_default().lines().count();
    let submit = |args: Vec<&str>| {
        let url = url.clone();
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = baton(&url, &args).await;
            assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
            newest_run(&url, None).await
        }
    };
    submit(vec!["submit", &spec, "--watch"]).await;
    assert_eq!(runs(), 1);
    // The same input: build makes no attempt, and use gets its outputs.
    let second = submit(vec!["submit", &spec, "--watch"]).await;
    assert_eq!(runs(), 1, "a second identical run makes no attempt");
    let run = shown(&url, &second).await;
    assert_eq!(run["steps"][0]["state"], "STEP_STATE_CACHED");
    assert!(run["steps"][0]["attempts"].as_array().is_none_or(|a| a.is_empty()));
    assert_eq!(baton(&url, &["runs", "logs", &second, "use"]).await.stdout, "got a\n");
    // One byte of its input changed: one attempt.
    submit(vec!["submit", &spec, "--param", "v=b", "--watch"]).await;
    assert_eq!(runs(), 2);
    // --no-cache runs it whatever the cache holds.
    submit(vec!["submit", &spec, "--no-cache", "--watch"]).await;
    assert_eq!(runs(), 3);
    let list = baton(&url, &["cache", "list", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["step_id"], "build");
    let bad = baton(&url, &["cache", "purge"]).await;
    assert_eq!(bad.code, 2, "purge names what to forget: {}", bad.stderr);
    let purge = baton(&url, &["cache", "purge", "--workstream", "cached"]).await;
    assert_eq!(purge.stdout.trim(), "2 cached results forgotten", "{}", purge.stderr);
    submit(vec!["submit", &spec, "--watch"]).await;
    assert_eq!(runs(), 4, "after a purge it runs again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_for_each_step_expands_at_run_time_across_a_restart_and_its_join_gets_the_list() {
    let mut sb = Sandbox::builder().agents(2).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // list makes the items; each expansion marks that it started, then waits for `go`.
    let spec = write(
        dir.path(),
        "f.yaml",
        &format!(
            "name: fe\nsteps:\n  - {{id: list, tool: shell, with: {{run: 'echo {{\\\"files\\\": [\\\"a.txt\\\", \\\"b.txt\\\", \\\"c.txt\\\"]}} > $BATON_OUTPUT'}}}}\n  - id: fan\n    needs: list\n    for_each: '${{{{ steps.list.outputs.files }}}}'\n    tool: shell\n    with: {{run: 'echo ${{{{ index }}}} >> {d}/ran-${{{{ item }}}}; while [ ! -e {d}/go ]; do sleep 0.05; done; echo size=${{{{ index }}}}0 >> $BATON_OUTPUT'}}\n  - {{id: join, needs: fan, tool: shell, env: {{ALL: '${{{{ steps.fan.outputs.size }}}}'}}, with: {{run: 'echo \"all=$ALL\"'}}}}\n"
        ),
    );
    let out = baton(&url, &["submit", &spec]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let id = out.stdout.trim().to_string();
    let ran = |f: &str| std::fs::read_to_string(dir.path().join(format!("ran-{f}"))).unwrap_or_default();
    eventually(Duration::from_secs(20), "every expansion started", || async {
        ["a.txt", "b.txt", "c.txt"].iter().all(|f| !ran(f).is_empty()).then_some(())
    })
    .await;
    // The expansion is durable: a restarted controller has the same steps and runs
    // none of them twice.
    sb.restart_controller().await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    let w = baton(&url, &["runs", "watch", &id]).await;
    assert_eq!(w.code, 0, "{}{}", w.stdout, w.stderr);
    assert_eq!((ran("a.txt"), ran("b.txt"), ran("c.txt")), ("0\n".into(), "1\n".into(), "2\n".into()));
    let run = shown(&url, &id).await;
    let ids: Vec<&str> = run["steps"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["list", "fan", "join", "fan[0]", "fan[1]", "fan[2]"]);
    assert_eq!(run["steps"][1]["reason"], "for_each: all 3 expansions succeeded");
    let logs = baton(&url, &["runs", "logs", &id, "join"]).await;
    assert_eq!(logs.stdout, "all=[\"00\",\"10\",\"20\"]\n");
    assert!(
        w.stdout.contains("for_each: 3 items from ${{ steps.list.outputs.files }}: fan[0], fan[1], fan[2]"),
        "{}",
        w.stdout
    );

    // A rerun from one expansion runs it and the join again, and reuses the rest.
    let again = baton(&url, &["runs", "rerun", &id, "--from", "fan[1]", "--watch"]).await;
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert_eq!((ran("a.txt"), ran("b.txt"), ran("c.txt")), ("0\n".into(), "1\n1\n".into(), "2\n".into()));
    // A rerun from the list expands anew.
    let again = baton(&url, &["runs", "rerun", &id, "--from", "list", "--watch"]).await;
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert_eq!(ran("a.txt"), "0\n0\n");
    let new = newest_run(&url, None).await;
    assert_eq!(shown(&url, &new).await["steps"].as_array().unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_pass_between_agents_with_separate_work_dirs_and_download_checked() {
    // make runs on agent-1 only, use on agent-2 only.
    let router = r#"{"rules": [
        {"match": {"kind": "make"}, "tool": "shell", "strategy": "fixed", "agents": ["agent-1"]},
        {"match": {"kind": "use"}, "tool": "shell", "strategy": "fixed", "agents": ["agent-2"]}]}"#;
    let sb = Sandbox::builder().agents(2).router(router).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "a.yaml",
        "name: art\nsteps:\n  - {id: build, kind: make, artifacts: ['dist/**/*.tgz'], with: {run: 'mkdir -p dist/sub && echo hello > dist/app.tgz && printf x > dist/sub/b.tgz && echo no > build.log'}}\n  - {id: use, kind: use, needs: build, inputs: {from: build, artifacts: ['dist/*.tgz']}, with: {run: 'cat dist/app.tgz; test ! -e dist/sub/b.tgz && test ! -e build.log && echo only-what-was-asked'}}\n",
    );
    let out = baton(&url, &["submit", &spec, "--watch"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let id = newest_run(&url, None).await;
    let run = shown(&url, &id).await;
    let agents: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["attempts"][0]["agent_name"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["agent-1", "agent-2"], "{run}");
    let logs = baton(&url, &["runs", "logs", &id, "use"]).await;
    assert_eq!(logs.stdout, "hello\nonly-what-was-asked\n");

    let list = baton(&url, &["runs", "artifacts", &id]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.contains("dist/app.tgz") && list.stdout.contains("dist/sub/b.tgz"),
        "{}",
        list.stdout
    );
    assert!(!list.stdout.contains("build.log"), "{}", list.stdout);
    let into = dir.path().join("got");
    let got = baton(&url, &["runs", "artifacts", &id, "--download", &into.display().to_string()]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(std::fs::read_to_string(into.join("build/dist/app.tgz")).unwrap(), "hello\n");
    assert_eq!(std::fs::read_to_string(into.join("build/dist/sub/b.tgz")).unwrap(), "x");
    let text = baton(&url, &["runs", "show", &id]).await;
    assert!(text.stdout.contains("Artifacts:\n  build: dist/app.tgz (6 bytes, sha256 "), "{}", text.stdout);
    let report = baton(&url, &["runs", "report", &id]).await;
    assert!(
        report.stdout.contains("## Artifacts") && report.stdout.contains("| build | dist/sub/b.tgz | 1 |"),
        "{}",
        report.stdout
    );

    // What is not there, or too big, fails the step with the reason.
    let bad = write(
        dir.path(),
        "b.yaml",
        "name: bad\non_failure: continue\nsteps:\n  - {id: none, kind: make, artifacts: ['*.zip'], with: {run: 'true'}}\n  - {id: big, kind: make, artifacts: [big.bin], with: {run: 'head -c 2097152 /dev/zero > big.bin'}}\n  - {id: build, kind: make, artifacts: ['*.txt'], with: {run: 'echo a > a.txt'}}\n  - {id: want, kind: use, needs: build, inputs: {from: build, artifacts: ['*.whl']}, with: {run: 'true'}}\n",
    );
    let out = baton(&url, &["submit", &bad, "--watch"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let id = newest_run(&url, None).await;
    let run = shown(&url, &id).await;
    let reason = |i: usize| run["steps"][i]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason(0).contains(r#"artifacts: "*.zip" matched no file"#), "{run}");
    assert!(
        reason(1).contains("big.bin: artifact \"big.bin\" is 2097152 bytes; the limit is 1048576"),
        "{run}"
    );
    assert!(
        reason(3).contains(r#"inputs: no artifact of step "build" matches "*.whl" (it left: a.txt)"#),
        "{run}"
    );
}

/// The runs a schedule started, by scheduled time: (time ms, run id, state).
async fn scheduled_runs(url: &str, schedule: &str) -> Vec<(i64, String, String)> {
    let out = baton(url, &["runs", "list", "--label", &format!("schedule={schedule}"), "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut runs: Vec<(i64, String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let at = r["labels"]["schedule_at"].as_str().unwrap().parse().unwrap();
            (at, r["id"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string())
        })
        .collect();
    runs.sort();
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_schedule_starts_each_time_exactly_once_across_a_restart() {
    let mut sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "s.yaml", "name: tick\nsteps:\n  - {id: t, tool: noop}\n");
    let out = baton(
        &url,
        &["schedules", "create", &spec, "--every", "1s", "--catchup", "all", "--overlap", "allow"],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    eventually(Duration::from_secs(20), "three scheduled runs", || async {
        (scheduled_runs(&url, &id).await.len() >= 3).then_some(())
    })
    .await;
    // Down for a while: the times it missed start when it is back (catchup all).
    sb.stop_controller().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sb.restart_controller().await;
    let before = scheduled_runs(&url, &id).await.len();
    eventually(Duration::from_secs(20), "runs after the restart", || async {
        (scheduled_runs(&url, &id).await.len() >= before + 5).then_some(())
    })
    .await;
    assert_eq!(baton(&url, &["schedules", "pause", &id]).await.code, 0);
    let runs = scheduled_runs(&url, &id).await;
    let times: Vec<i64> = runs.iter().map(|r| r.0).collect();
    // Every second from the first to the last, each once.
    let expected: Vec<i64> = (0..times.len() as i64).map(|i| times[0] + i * 1000).collect();
    assert_eq!(times, expected, "{runs:?}");
    let show = baton(&url, &["schedules", "show", &id]).await;
    assert!(
        show.stdout.contains("State:      paused") && show.stdout.contains("When:       every 1s"),
        "{}",
        show.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_policies_decide_what_a_time_does_while_the_previous_run_goes() {
    let sb = Sandbox::builder().agents(1).slots(4).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    // Each run takes longer than the interval.
    let spec = write(
        dir.path(),
        "s.yaml",
        "name: slow\nsteps:\n  - {id: s, tool: sleep, with: {duration: 2500ms}}\n",
    );
    let create = |policy: &'static str| {
        let (url, spec) = (url.clone(), spec.clone());
        async move {
            let out =
                baton(&url, &["schedules", "create", &spec, "--every", "1s", "--overlap", policy]).await;
            assert_eq!(out.code, 0, "{}", out.stderr);
            out.stdout.trim().to_string()
        }
    };
    let skip = create("skip").await;
    let cancel = create("cancel_previous").await;
    let queue = create("queue").await;
    eventually(Duration::from_secs(30), "runs of all three", || async {
        let (s, c) = (scheduled_runs(&url, &skip).await, scheduled_runs(&url, &cancel).await);
        let q = scheduled_runs(&url, &queue).await;
        let q_done = q.iter().filter(|r| r.2 == "RUN_STATE_SUCCEEDED").count();
        (s.len() >= 2 && c.len() >= 3 && q_done >= 2).then_some(())
    })
    .await;
    for id in [&skip, &cancel, &queue] {
        assert_eq!(baton(&url, &["schedules", "delete", id]).await.code, 0);
    }
    // skip: one run at a time, so the times between were not started.
    let s = scheduled_runs(&url, &skip).await;
    assert!(s.windows(2).all(|w| w[1].0 - w[0].0 >= 2000), "{s:?}");
    assert!(s[..s.len() - 1].iter().all(|r| r.2 == "RUN_STATE_SUCCEEDED"), "{s:?}");
    // cancel_previous: each new time canceled the run before it.
    let c = scheduled_runs(&url, &cancel).await;
    assert!(c.windows(2).all(|w| w[1].0 - w[0].0 == 1000), "{c:?}");
    assert!(c[..c.len() - 1].iter().all(|r| r.2 == "RUN_STATE_CANCELED"), "{c:?}");
    // queue: every time has its run, and they run one after another, in order.
    let q = scheduled_runs(&url, &queue).await;
    assert!(q.windows(2).all(|w| w[1].0 - w[0].0 == 1000), "{q:?}");
    assert!(q.iter().any(|r| r.2 == "RUN_STATE_PENDING"), "later times wait: {q:?}");
    let mut c = sb.client().await;
    let mut spans = Vec::new();
    for (_, id, _) in q.iter().filter(|r| r.2 == "RUN_STATE_SUCCEEDED") {
        let run = get_run(&mut c, id).await;
        spans.push((ms(&run.started_at), ms(&run.finished_at)));
    }
    assert!(spans.windows(2).all(|w| w[1].0 >= w[0].1), "queued runs overlapped: {spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_takes_a_priority_and_runs_show_prints_it() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "p.yaml", "name: p\nsteps:\n  - {id: a, tool: noop}\n");
    let out = baton(&url, &["submit", &spec, "--priority", "-3", "-o", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let run = v["run_id"].as_str().unwrap().to_string();
    let show = baton(&url, &["runs", "show", &run]).await;
    assert!(show.stdout.contains("Priority:   -3"), "{}", show.stdout);
    let bad = baton(&url, &["submit", &spec, "--priority", "5000"]).await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("priority 5000 is out of range: -1000 to 1000"), "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_approve_and_reject_decide_approval_steps() {
    let sb = Sandbox::builder().agents(1).build().await;
    let url = sb.url();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "a.yaml",
        "name: gated\nsteps:\n  - {id: gate, tool: approval, with: {message: go?, inputs: {version: string}}}\n  - {id: after, needs: gate, tool: shell, with: {run: 'echo v=${{ steps.gate.outputs.version }}'}}\n",
    );
    let submit = || async {
        let out = baton(&url, &["submit", &spec, "-o", "json"]).await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["run_id"].as_str().unwrap().to_string()
    };
    let first = submit().await;
    let shown = eventually(Duration::from_secs(20), "the step to await approval", || {
        let url = url.clone();
        let first = first.clone();
        async move {
            let show = baton(&url, &["runs", "show", &first]).await;
            show.stdout.contains("awaiting_approval").then_some(show.stdout)
        }
    })
    .await;
    assert!(shown.contains("awaiting approval by the operator role or above: go?"), "{shown}");
    let bad = baton(&url, &["runs", "approve", &first, "gate"]).await;
    assert_eq!(bad.code, 2, "a missing input is bad input: {}", bad.stderr);
    assert!(bad.stderr.contains("input \"version\" (string) is required"), "{}", bad.stderr);
    let ok =
        baton(&url, &["runs", "approve", &first, "gate", "--input", "version=2.0", "--comment", "ok"]).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.starts_with("step gate of run"), "{}", ok.stdout);
    assert_eq!(baton(&url, &["runs", "watch", &first]).await.code, 0);
    assert_eq!(baton(&url, &["runs", "logs", &first, "after"]).await.stdout, "v=2.0\n");

    let second = submit().await;
    eventually(Duration::from_secs(20), "the step to await approval", || {
        let url = url.clone();
        let second = second.clone();
        async move {
            baton(&url, &["runs", "show", &second]).await.stdout.contains("awaiting_approval").then_some(())
        }
    })
    .await;
    let no = baton(&url, &["runs", "reject", &second, "gate", "--comment", "not now"]).await;
    assert_eq!(no.code, 0, "{}", no.stderr);
    let watch = baton(&url, &["runs", "watch", &second]).await;
    assert_ne!(watch.code, 0, "a rejected run fails");
    let show = baton(&url, &["runs", "show", &second]).await;
    assert!(show.stdout.contains("rejected by anonymous: not now"), "{}", show.stdout);
}
