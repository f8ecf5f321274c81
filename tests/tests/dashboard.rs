//! The web dashboard in a real browser (headless Chromium over WebDriver) against a real
//! controller and agents: runs appear live, a run's page draws every step, output
//! follows live, actions work for the roles that may take them and are refused by the
//! server for the others. Screenshots of each view land in target/screenshots/.

use std::time::Duration;

use baton_common::auth::Role;
use baton_controller::auth::AuthMode;
use baton_tests::browser::Browser;
use baton_tests::*;

const LONG: Duration = Duration::from_secs(60);

/// A step that prints, waits for a file, then prints again.
fn gated(file: &std::path::Path) -> String {
    format!(
        r#"name: gated
steps:
  - id: prepare
    tool: shell
    with: {{run: "echo preparing"}}
  - id: talk
    tool: shell
    needs: [prepare]
    with: {{run: "echo 'first line'; echo 'second  line'; while [ ! -f {f} ]; do sleep 0.05; done; echo 'after the gate'"}}
  - id: finish
    tool: shell
    needs: [talk]
    with: {{run: "echo done"}}
"#,
        f = file.display()
    )
}

const SLEEPER: &str = r#"name: sleeper
steps:
  - id: nap
    tool: shell
    with: {run: "sleep 300"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_run_appears_live_its_graph_has_every_step_and_its_output_follows() {
    let sb = Sandbox::builder().build().await;
    let Some(b) = Browser::start().await else { return };
    b.goto(&format!("{}/", sb.dashboard_url())).await;
    b.until("the runs page to be live", "return document.getElementById('live').textContent === 'live'")
        .await;
    // A mark on this very page: a reload would lose it.
    b.eval("window.__sameLoad = true; return true").await;

    let gate = sb.dir.path().join("gate");
    let run_id = sb.submit(&gated(&gate)).await;
    let row = format!("tr[data-run='{run_id}']");
    b.find(&row).await;
    assert_eq!(
        b.eval("return window.__sameLoad === true").await,
        serde_json::json!(true),
        "the page reloaded"
    );
    b.until(
        "the row to show the run running",
        &format!("return document.querySelector(\"{row}\").dataset.state === 'running'"),
    )
    .await;
    b.screenshot("runs").await;

    // The run's page: every step in the graph, without a reload.
    b.click(&format!("{row} a")).await;
    b.find("#graph svg").await;
    let nodes =
        b.eval("return [...document.querySelectorAll('#graph [data-node]')].map(n => n.dataset.node)").await;
    let mut nodes: Vec<String> = serde_json::from_value(nodes).unwrap();
    nodes.sort();
    assert_eq!(nodes, ["finish", "prepare", "talk"]);
    assert_eq!(
        b.eval("return window.__sameLoad === true").await,
        serde_json::json!(true),
        "the page reloaded"
    );
    assert_eq!(b.client.current_url().await.unwrap().path(), format!("/runs/{run_id}"));

    // The running step's output, live and with its line breaks.
    b.until(
        "talk to be running",
        "return document.querySelector(\"[data-node='talk']\").dataset.state === 'running'",
    )
    .await;
    b.click("[data-node='talk']").await;
    b.until(
        "the first lines of output",
        "const l = document.getElementById('log'); return !!l && l.textContent.includes('second  line')",
    )
    .await;
    let text = b.eval("return document.getElementById('log').textContent").await;
    assert_eq!(text.as_str().unwrap(), "first line\nsecond  line\n", "line breaks and spaces are kept");
    std::fs::write(&gate, "open").unwrap();
    b.until(
        "output printed after the page opened",
        "return document.getElementById('log').textContent.includes('after the gate')",
    )
    .await;
    // Search keeps the matching lines and marks the match.
    b.find("#log-search").await.send_keys("second").await.unwrap();
    b.until("the search to filter", "return document.querySelectorAll('#log mark').length === 1").await;
    assert_eq!(
        b.eval("return document.getElementById('log').textContent").await.as_str().unwrap(),
        "second  line\n"
    );

    // The graph follows the run to its end.
    b.until(
        "every node to show succeeded",
        "return [...document.querySelectorAll('#graph [data-node]')].every(n => n.dataset.state === 'succeeded')",
    )
    .await;
    b.until(
        "the timeline to draw the attempts",
        "return document.querySelectorAll('#gantt rect.att').length === 3",
    )
    .await;
    // A chain: every step is on the critical path.
    b.until(
        "the critical path to be marked",
        "return document.querySelectorAll('#graph .node.critical').length === 3",
    )
    .await;
    b.screenshot("run").await;

    b.goto(&format!("{}/agents", sb.dashboard_url())).await;
    b.find("tr[data-agent='agent-1']").await;
    b.screenshot("agents").await;
    b.click("tr[data-agent='agent-2'] [data-action='drain']").await;
    b.click("#confirm-ok").await;
    let c = sb.client().await;
    eventually(LONG, "agent-2 to drain", || {
        let mut c = c.clone();
        async move {
            let agents =
                c.list_agents(baton_common::pb::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.name == "agent-2" && a.draining).then_some(())
        }
    })
    .await;
    b.until(
        "the page to show it draining",
        "return !!document.querySelector(\"tr[data-agent='agent-2'] [data-action='undrain']\")",
    )
    .await;

    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_page_stops_the_run() {
    let sb = Sandbox::builder().agents(1).build().await;
    let Some(b) = Browser::start().await else { return };
    let mut c = sb.client().await;
    let run_id = sb.submit(SLEEPER).await;
    wait_event(&mut c, &run_id, LONG, |e| e.kind == "attempt_started").await;
    b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
    b.click("[data-action='cancel-run']").await;
    b.find("#confirm[open]").await;
    b.find("#confirm-comment").await.send_keys("not needed").await.unwrap();
    b.click("#confirm-ok").await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "canceled");
    assert!(run.reason.contains("not needed"), "{}", run.reason);
    b.until(
        "the page to show the run canceled",
        "return !!document.querySelector('.runhead [data-state=canceled]')",
    )
    .await;
    b.close().await;
}

/// With authentication, the page asks for a token; a reader's cancel is refused by the
/// server (the button is there; what it asks is not done), an operator's works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_by_the_server() {
    let sb = Sandbox::builder().agents(1).auth(AuthMode::Required).build().await;
    let reader = sb.token("viewer", Role::Reader).await;
    let operator = sb.token("ops", Role::Operator).await;
    let mut c = sb.client().await;
    let run_id = sb.submit(SLEEPER).await;
    wait_event(&mut c, &run_id, LONG, |e| e.kind == "attempt_started").await;

    // The HTTP API itself: no token, a reader's, an operator's.
    let cancel = format!(r#"{{"run_id": "{run_id}", "reason": "x"}}"#);
    let (status, body) = http_request(sb.http_addr, "POST", "/api/v1/GetRun", None, &cancel).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) =
        http_request(sb.http_addr, "POST", "/api/v1/CancelRun", Some(&reader), &cancel).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not call CancelRun: it needs role operator"), "{body}");
    let (status, body) = http_request(sb.http_addr, "POST", "/api/v1/SubmitRun", Some(&operator), "{}").await;
    assert_eq!(status, 404, "the dashboard's API has no SubmitRun: {body}");
    let (status, _) = http_request(sb.http_addr, "GET", "/", None, "").await;
    assert_eq!(status, 200, "the page itself holds no data and loads for anyone");
    // The port shares the probes and the metrics, on the same terms as --metrics-listen.
    let (status, _) = http_request(sb.http_addr, "GET", "/readyz", None, "").await;
    assert_eq!(status, 200);
    let (status, _) = http_request(sb.http_addr, "GET", "/metrics", None, "").await;
    assert_eq!(status, 401);
    let (status, body) = http_request(sb.http_addr, "GET", "/metrics", Some(&reader), "").await;
    assert!(status == 200 && body.contains("baton_runs"), "{status} {body}");

    let Some(b) = Browser::start().await else { return };
    b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
    b.find("#login[open]").await;
    b.find("#login-token").await.send_keys(&reader).await.unwrap();
    b.click("#login-submit").await;
    b.until(
        "the reader to be signed in",
        "return document.getElementById('who').textContent.includes('(reader)')",
    )
    .await;
    b.click("[data-action='cancel-run']").await;
    b.click("#confirm-ok").await;
    b.until(
        "the server's refusal to show",
        "return document.getElementById('toast').textContent.includes('may not call CancelRun')",
    )
    .await;
    assert_eq!(get_run(&mut c, &run_id).await.state_name(), "running", "a reader canceled the run");
    b.screenshot("refused").await;

    // Signed in again as an operator, in the same tab.
    b.click("#logout").await;
    b.find("#login[open]").await;
    b.find("#login-token").await.send_keys(&operator).await.unwrap();
    b.click("#login-submit").await;
    b.until(
        "the operator to be signed in",
        "return document.getElementById('who').textContent.includes('(operator)')",
    )
    .await;
    b.click("[data-action='cancel-run']").await;
    b.click("#confirm-ok").await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "canceled");
    let events = all_events(&mut c, &run_id).await;
    assert!(
        events.iter().any(|e| e.kind == "run_canceled" && e.actor == "token ops"),
        "the cancel is recorded as the operator's"
    );
    b.close().await;
}

/// An approval step is approved from the page, and the approver is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_given_from_the_page() {
    let sb = Sandbox::builder().agents(1).build().await;
    let Some(b) = Browser::start().await else { return };
    let mut c = sb.client().await;
    let run_id = sb
        .submit(
            r#"name: gate
steps:
  - id: review
    tool: approval
  - id: ship
    tool: shell
    needs: [review]
    with: {run: "echo shipped"}
"#,
        )
        .await;
    wait_event(&mut c, &run_id, LONG, |e| e.kind == "approval_requested").await;
    b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
    b.click("[data-node='review']").await;
    b.find("#step-reason").await;
    b.click("[data-action='approve']").await;
    b.find("#confirm-comment").await.send_keys("looks good").await.unwrap();
    b.click("#confirm-ok").await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "succeeded");
    let events = all_events(&mut c, &run_id).await;
    let approved = events.iter().find(|e| e.kind == "step_approved").expect("step_approved");
    assert!(approved.message.contains("looks good"), "{}", approved.message);
    b.close().await;
}

/// Expansions of a matrix step are one node with counts until opened; breakers show
/// what they counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_groups_collapse_and_breakers_are_listed() {
    let sb = Sandbox::builder().agents(1).build().await;
    let Some(b) = Browser::start().await else { return };
    let mut c = sb.client().await;
    let run_id = sb
        .submit(
            r#"name: grid
steps:
  - id: test
    tool: shell
    matrix: {os: [debian, alpine], py: ["3.11", "3.12"]}
    with: {run: "echo ${{ matrix.os }}"}
  - id: broken
    tool: shell
    needs: [test]
    with: {run: "exit 3"}
"#,
        )
        .await;
    let run = wait_run(&mut c, &run_id, LONG).await;
    assert_eq!(run.state_name(), "failed");
    b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
    b.until(
        "the matrix to show as one node of four",
        "const n = document.querySelector(\"[data-node='group:test']\"); return !!n && n.textContent.includes('test ×4 · 4 done')",
    )
    .await;
    b.click("[data-node='group:test']").await;
    b.until(
        "the group to open",
        "return document.querySelectorAll('#graph [data-node^=\"test[\"]').length === 4",
    )
    .await;
    assert_eq!(
        b.eval("return document.querySelector(\"[data-node='broken']\").dataset.state").await,
        serde_json::json!("failed")
    );
    b.goto(&format!("{}/breakers", sb.dashboard_url())).await;
    b.find("tr[data-breaker^='shell/']").await;
    b.screenshot("breakers").await;
    b.close().await;
}

/// A run held for its budget is released from its page, and a failed run retried from
/// its page: each button asks first, says what the server answered, and the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_retry_from_the_page() {
    let sb = Sandbox::builder().agents(1).build().await;
    let Some(b) = Browser::start().await else { return };
    let mut c = sb.client().await;
    let toast_says = |text: &str| {
        format!("const t = document.getElementById('toast'); return !t.hidden && t.textContent === {text:?}")
    };

    let held = sb
        .submit("name: held\nsteps:\n  - {id: a, tool: echo, budget: {max_tokens: 100}, with: {baton_tokens: 150}}\n  - {id: b, needs: a, tool: noop}\n")
        .await;
    wait_event(&mut c, &held, LONG, |e| e.kind == "run_quarantined").await;
    b.goto(&format!("{}/runs/{held}", sb.dashboard_url())).await;
    b.click("[data-action='release']").await;
    b.find("#confirm[open]").await;
    b.click("#confirm-ok").await;
    b.until("the release to be reported done", &toast_says("Release: done")).await;
    let run = wait_run(&mut c, &held, LONG).await;
    assert_eq!(run.state_name(), "succeeded", "b ran after the release");
    b.until(
        "the page to show the run succeeded",
        "return !!document.querySelector('.runhead [data-state=succeeded]')",
    )
    .await;

    let gate = sb.dir.path().join("retry-gate");
    let spec = format!(
        "name: flaky\nsteps:\n  - {{id: f, tool: shell, with: {{run: 'test -e {}'}}}}\n",
        gate.display()
    );
    let failed = sb.submit(&spec).await;
    assert_eq!(wait_run(&mut c, &failed, LONG).await.state_name(), "failed");
    std::fs::write(&gate, "").unwrap();
    b.goto(&format!("{}/runs/{failed}", sb.dashboard_url())).await;
    b.click("[data-action='retry']").await;
    b.find("#confirm[open]").await;
    b.click("#confirm-ok").await;
    b.until("the retry to be reported done", &toast_says("Retry: done")).await;
    wait_event(&mut c, &failed, LONG, |e| e.kind == "run_retried").await;
    let run = wait_run(&mut c, &failed, LONG).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(step(&run, "f").attempts.len(), 2, "the retry ran f again");
    b.close().await;
}

/// The run's page follows the run across a restart of the controller: its event stream
/// reconnects from the last sequence number it saw and the page reaches the run's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_resumes_its_streams_after_the_controller_restarts() {
    let mut sb = Sandbox::builder().agents(1).build().await;
    let Some(b) = Browser::start().await else { return };
    let mut c = sb.client().await;
    let gate = sb.dir.path().join("gate");
    let run_id = sb.submit(&gated(&gate)).await;
    wait_event(&mut c, &run_id, LONG, |e| e.kind == "attempt_started" && e.step_id == "talk").await;
    b.goto(&format!("{}/runs/{run_id}", sb.dashboard_url())).await;
    b.until("the page to be live", "return document.getElementById('live').textContent === 'live'").await;
    b.eval("window.__sameLoad = true; return true").await;
    b.click("[data-node='talk']").await;
    b.until(
        "the output so far",
        "const l = document.getElementById('log'); return !!l && l.textContent.includes('second')",
    )
    .await;

    sb.stop_controller().await;
    b.until(
        "the page to see the drop",
        "return document.getElementById('live').textContent === 'reconnecting'",
    )
    .await;
    sb.restart_controller().await;
    // Printed once the controller is back: the page's streams must have reconnected
    // to show it.
    std::fs::write(&gate, "open").unwrap();
    b.until(
        "every node to show succeeded",
        "return [...document.querySelectorAll('#graph [data-node]')].every(n => n.dataset.state === 'succeeded')",
    )
    .await;
    b.until(
        "the rest of the output, once",
        "return document.getElementById('log').textContent === 'first line\\nsecond  line\\nafter the gate\\n'",
    )
    .await;
    assert_eq!(
        b.eval("return window.__sameLoad === true").await,
        serde_json::json!(true),
        "the page reloaded"
    );
    b.close().await;
}

/// With TLS on the API port, the dashboard's port serves HTTPS with the same
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_port_speaks_tls_when_the_api_does() {
    let sb = Sandbox::builder().agents(0).tls().build().await;
    let certs = sb.certs.clone().unwrap();
    let Ok(out) = std::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(certs.join("ca.pem"))
        .arg(format!("{}/healthz", sb.dashboard_url()))
        .output()
    else {
        eprintln!("SKIPPED: curl is not installed");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    // Plain HTTP gets no page: the port wants a TLS handshake.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sb.http_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP was answered on a TLS port");
}
