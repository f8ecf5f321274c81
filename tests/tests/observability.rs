//! Observability end to end: Prometheus metrics of controller and agent, health and
//! readiness, gRPC health and reflection, progress with ETA on GetRun and WatchRun,
//! resuming a watch, and run reports (JSON, Markdown, HTML rendered in Chromium).

use std::collections::HashMap;
use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

/// Parses the Prometheus text format into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

async fn controller_and_agent_metrics_are_scraped_and_parsed(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let agent_metrics = free_addr();
    let mut cfg = sb.agent_config("measured", 2);
    cfg.metrics_listen = Some(agent_metrics);
    sb.add_agent_with(cfg);
    sb.wait_agents(2).await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("n");
    let spec = format!(
        "name: m\non_failure: continue\nsteps:\n  - id: flaky\n    tool: shell\n    retry: {{max_attempts: 2, backoff: {{initial: 10ms}}}}\n    with: {{run: 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; test $n -gt 1'}}\n  - {{id: broken, tool: shell, with: {{run: 'exit 3'}}}}\n  - {{id: fine, tool: noop}}\n",
        f = counter.display()
    );
    let id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");

    let (status, body) = http_get(sb.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = parse_metrics(&body);
    let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no {k} in\n{body}"));
    assert_eq!(get("baton_runs{state=\"failed\"}"), 1.0);
    assert_eq!(get("baton_attempts_total{outcome=\"failed\",error_class=\"nonzero_exit\"}"), 2.0);
    assert_eq!(get("baton_attempts_total{outcome=\"succeeded\",error_class=\"\"}"), 2.0);
    assert_eq!(get("baton_agents{state=\"connected\"}"), 2.0);
    assert_eq!(get("baton_dispatch_latency_seconds_count"), 4.0, "one per started attempt");
    assert_eq!(get("baton_step_duration_seconds_count{tool=\"shell\"}"), 3.0);
    assert_eq!(get("baton_step_duration_seconds_count{tool=\"noop\"}"), 1.0);
    assert!(get("baton_store_commit_seconds_count") >= 1.0);
    assert!(get("baton_store_commit_batch_size_sum") >= 10.0);
    assert_eq!(get("baton_results_fenced_total"), 0.0);
    assert!(get("baton_run_events_total") >= 10.0);
    assert!(body.contains("# TYPE baton_dispatch_latency_seconds histogram"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        get(&format!("baton_build_info{{component=\"baton-controller\",version=\"{version}\"}}")),
        1.0
    );
    assert_eq!(get("baton_leader"), 1.0);
    assert_eq!(get("baton_agent_slots{state=\"used\"}"), 0.0);
    assert!(get("baton_agent_slots{state=\"total\"}") >= 2.0);
    assert!(get("process_resident_memory_bytes") > 0.0);
    assert!(get("process_open_fds") > 0.0);
    assert!(get("process_cpu_seconds_total") > 0.0);
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text");

    assert_eq!(http_get(sb.metrics_addr, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(sb.metrics_addr, "/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(http_get(sb.metrics_addr, "/nope").await.0, 404);

    let (_, agent_body) = http_get(agent_metrics, "/metrics").await;
    let am = parse_metrics(&agent_body);
    assert_eq!(am.get("baton_agent_running_attempts"), Some(&0.0));
    assert_eq!(am.get("baton_agent_connected"), Some(&1.0));
    assert_eq!(am.get("baton_agent_reconnects_total"), Some(&0.0));
    assert_eq!(
        am.get(&format!("baton_build_info{{component=\"baton-agent\",version=\"{version}\"}}")),
        Some(&1.0)
    );
    assert!(am.get("baton_agent_slots").is_some_and(|s| *s >= 1.0), "{agent_body}");
    assert!(am.get("process_resident_memory_bytes").is_some_and(|v| *v > 0.0), "{agent_body}");
    let ran: f64 =
        am.iter().filter(|(k, _)| k.starts_with("baton_agent_attempts_total")).map(|(_, v)| v).sum();
    assert_eq!(
        ran,
        run.steps.iter().flat_map(|s| &s.attempts).filter(|a| a.agent_name == "measured").count() as f64
    );
    assert_eq!(http_get(agent_metrics, "/readyz").await.0, 200);

    // The agent counts its reconnect after a controller restart.
    sb.restart_controller().await;
    sb.wait_agents(2).await;
    let reconnected = eventually(Duration::from_secs(10), "the agent's reconnect count", || async move {
        let (_, body) = http_get(agent_metrics, "/metrics").await;
        let v = parse_metrics(&body).get("baton_agent_reconnects_total").copied()?;
        (v >= 1.0).then_some(v)
    })
    .await;
    assert_eq!(reconnected, 1.0);
}

async fn grpc_health_is_serving_and_reflection_lists_the_services(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let channel = tonic::transport::Endpoint::from_shared(sb.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "baton.v1.BatonService", "baton.v1.AgentService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.to_string() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "baton.v1.BatonService",
        "baton.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // The older protocol, which the Python grpc_reflection client, Postman and Evans
    // speak: it lists the same services and hands out a service's file.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut refl = alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let reqs = vec![
        alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "baton.v1.BatonService".into(),
            )),
        },
    ];
    let mut stream = refl.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("{resp:?}")
    };
    let alpha_names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(alpha_names, names, "v1alpha lists what v1 lists");
    let resp = stream.message().await.unwrap().unwrap();
    let Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        resp.message_response
    else {
        panic!("{resp:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty(), "the file of baton.v1.BatonService");
}

async fn progress_carries_an_eta_learned_from_earlier_runs(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let spec = "name: eta\nsteps:\n  - {id: a, tool: sleep, with: {duration: 600ms}}\n  - {id: b, needs: a, tool: sleep, with: {duration: 600ms}}\n";
    // The first run has no history: its ETA is unknown.
    let first = sb.submit(spec).await;
    let running = |e: &proto::RunEvent| e.progress.is_some() && e.run_state_name() == "running";
    let ev = wait_event(&mut c, &first, Duration::from_secs(10), running).await;
    assert_eq!(ev.progress.as_ref().map(|p| p.eta), Some(None), "unknown: {ev:?}");
    let done = wait_run(&mut c, &first, Duration::from_secs(20)).await;
    // What the second run can learn: a then b, as long as they took (600 ms each and
    // whatever a busy machine added).
    let learned: i64 = done.steps.iter().map(|s| ms(&s.finished_at) - ms(&s.started_at)).sum();
    assert!(learned >= 1200, "{learned}");
    // The second run knows how long its steps took last time.
    let second = sb.submit(spec).await;
    // Events streamed live carry the ETA (those read back from the log do not).
    let with_eta = |e: &proto::RunEvent| running(e) && e.progress.as_ref().is_some_and(|p| p.eta.is_some());
    let ev = wait_event(&mut c, &second, Duration::from_secs(10), with_eta).await;
    let p = ev.progress.expect("progress");
    assert_eq!(p.total, 2);
    let eta_ms = |p: &proto::Progress| p.eta.as_ref().map_or(-1, baton_common::proto::duration_millis);
    assert!((0..=learned).contains(&eta_ms(&p)), "at most a and b in a row, {learned} ms: {}", eta_ms(&p));
    if p.done == 0 {
        assert!(eta_ms(&p) >= 600, "b alone takes 600ms: {}", eta_ms(&p));
    }
    let run = get_run(&mut c, &second).await;
    let eta = eta_ms(&run.progress.unwrap());
    assert!((0..=learned).contains(&eta), "{eta} of {learned}");
    let run = wait_run(&mut c, &second, Duration::from_secs(20)).await;
    assert_eq!(eta_ms(&run.progress.unwrap()), 0, "an ended run has nothing left");
}

async fn a_watcher_that_reconnects_misses_nothing_and_sees_nothing_twice(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let mut spec = String::from("name: w\nsteps:\n");
    for i in 0..12 {
        spec.push_str(&format!("  - {{id: s{i}, tool: sleep, with: {{duration: 30ms}}}}\n"));
    }
    let id = sb.submit(&spec).await;
    let mut seen: Vec<i64> = Vec::new();
    // Three short sessions, each dropped after a few events, then one to the end.
    for _ in 0..3 {
        let from = seen.last().map(|s| s + 1).unwrap_or(1);
        let mut s = c
            .watch_run(proto::WatchRunRequest { run_id: id.clone(), from_seq: from, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        for _ in 0..5 {
            match s.message().await.unwrap() {
                Some(ev) => seen.push(ev.seq),
                None => break,
            }
        }
        drop(s);
    }
    let from = seen.last().map(|s| s + 1).unwrap_or(1);
    let mut s = c
        .watch_run(proto::WatchRunRequest { run_id: id.clone(), from_seq: from, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    while let Some(ev) = s.message().await.unwrap() {
        seen.push(ev.seq);
    }
    let all = all_events(&mut c, &id).await;
    assert_eq!(seen, all.iter().map(|e| e.seq).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(all.last().unwrap().kind, "run_succeeded");
}

async fn reports_tell_retries_failures_and_the_critical_path(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("n");
    let spec = format!(
        r#"
name: report
on_failure: continue
steps:
  - {{id: start, tool: noop}}
  - {{id: slow, needs: start, tool: sleep, with: {{duration: 400ms}}}}
  - id: quick
    needs: start
    tool: shell
    retry: {{max_attempts: 2, backoff: {{initial: 10ms}}}}
    with: {{run: 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; test $n -gt 1'}}
  - {{id: join, needs: [slow, quick], tool: noop}}
  - {{id: broken, tool: fail, with: {{message: "on purpose", class: tool_error}}}}
"#,
        f = counter.display()
    );
    let id = sb.submit(&spec).await;
    wait_run(&mut c, &id, Duration::from_secs(20)).await;
    let report = |format: &str| {
        let mut c = c.clone();
        let id = id.clone();
        let format = match format {
            "json" => proto::ReportFormat::Json,
            "html" => proto::ReportFormat::Html,
            _ => proto::ReportFormat::Markdown,
        } as i32;
        async move {
            c.get_report(proto::GetReportRequest { run_id: id, format }).await.unwrap().into_inner().content
        }
    };
    let json: serde_json::Value = serde_json::from_str(&report("json").await).unwrap();
    assert_eq!(json["run"]["state"], "failed");
    assert_eq!(json["summary"]["retries"], 1);
    assert_eq!(json["summary"]["attempts"], 6);
    assert_eq!(json["critical_path"], serde_json::json!(["start", "slow", "join"]));
    let steps = json["steps"].as_array().unwrap();
    let quick = steps.iter().find(|s| s["id"] == "quick").unwrap();
    assert_eq!(quick["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(quick["attempts"][0]["outcome"], "failed");
    assert_eq!(quick["attempts"][0]["exit_code"], 1);
    assert_eq!(quick["attempts"][0]["error_class"], "nonzero_exit");
    assert!(quick["attempts"][0]["agent"].as_str().unwrap().starts_with("agent-"));
    let broken = steps.iter().find(|s| s["id"] == "broken").unwrap();
    assert_eq!(broken["attempts"][0]["error"], "on purpose");
    assert_eq!(broken["attempts"][0]["error_class"], "tool_error");
    assert_eq!(json["retries"][0]["step"], "quick");

    let md = report("md").await;
    assert!(md.contains("## Critical path") && md.contains("start → slow → join"), "{md}");
    assert!(md.contains("| broken | fail | failed | 1 |"), "{md}");
    assert!(md.contains("## Retries"), "{md}");

    let html = report("html").await;
    assert!(html.starts_with("<!doctype html>") && html.contains("<svg") && html.contains("</svg>"));
    assert!(
        !html.contains("http://")
            || html.matches("http://").all(|_| html.contains("xmlns=\"http://www.w3.org/2000/svg\"")),
        "no network needed"
    );
    assert_eq!(html.matches("<rect").count() - 1, 6, "one bar per attempt (plus the background)");
    let bad = c.get_report(proto::GetReportRequest { run_id: id.clone(), format: 99 }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    render_in_chromium(&html, sb.dir.path());
}

/// Renders the HTML report in headless Chromium and checks the screenshot is not blank.
/// CI installs Chromium and sets BATON_REQUIRE_CHROMIUM=1; elsewhere a missing Chromium
/// skips this check, saying so.
fn render_in_chromium(html: &str, dir: &std::path::Path) {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    let Some(chromium) = chromium else {
        assert!(
            std::env::var_os("BATON_REQUIRE_CHROMIUM").is_none(),
            "chromium is required but not installed"
        );
        eprintln!("SKIPPED: rendering the HTML report: chromium is not installed");
        return;
    };
    let page = dir.join("report.html");
    std::fs::write(&page, html).unwrap();
    let shot = dir.join("report.png");
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colors: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    assert!(colors.len() > 20, "the page rendered blank ({} colours)", colors.len());
    // The timeline's green (a succeeded attempt) is on the page.
    assert!(
        buf[..info.buffer_size()].chunks(px).any(|p| p[..3] == [0x2f, 0x9e, 0x5b]),
        "no timeline bar rendered"
    );
}

on_both!(
    controller_and_agent_metrics_are_scraped_and_parsed,
    grpc_health_is_serving_and_reflection_lists_the_services,
    progress_carries_an_eta_learned_from_earlier_runs,
    a_watcher_that_reconnects_misses_nothing_and_sees_nothing_twice,
    reports_tell_retries_failures_and_the_critical_path,
);

/// An agent that cannot reach its controller says so at the default level, in JSON logs
/// whose fields are all at the top and hold no Rust debug text.
#[tokio::test]
async fn an_agent_without_a_controller_says_so_in_flat_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://{}", free_addr());
    let args: Vec<String> = [
        "--controller",
        &dead,
        "--name",
        "lonely",
        "--work-dir",
        &dir.path().join("w").display().to_string(),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The agent's default level (info), whatever the test run sets.
    let agent = Process::spawn("baton-agent", &args, dir.path().join("agent.log"), &[("RUST_LOG", "info")]);
    let line = eventually(Duration::from_secs(20), "the agent to say it has no controller", || async {
        agent.logs().lines().find(|l| l.contains("no session with the controller")).map(str::to_string)
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "WARN", "{line}");
    assert_eq!(v["controller"], dead.as_str(), "{line}");
    assert!(v["why"].as_str().is_some_and(|w| w.contains("Connection refused")), "{line}");
    for l in agent.logs().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("fields").is_none() && v.get("span").is_none(), "{l}");
        assert!(!l.contains("Some(") && !l.contains("None"), "{l}");
    }
}

/// An OTLP/gRPC trace receiver on a free port: what it was sent.
struct Receiver(std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Traces over OTLP: a span per run, step and attempt from the controller, the agent's
/// span for the attempt under the controller's, one trace per run (its id), and the
/// tool sees its trace context as TRACEPARENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_steps_and_attempts_are_traced_over_otlp_down_to_the_tool() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Receiver(spans.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let sb = Sandbox::builder().agents(1).otlp(&endpoint).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit("name: traced\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo \"$TRACEPARENT\"'}}\n  - {id: b, needs: a, tool: noop}\n")
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let trace = baton_common::trace::trace_id(&id).unwrap().to_vec();
    // Run, 2 steps, 2 attempts from the controller; 2 attempts from the agent.
    let got = eventually(Duration::from_secs(30), "the spans to arrive", || {
        let (spans, trace) = (spans.clone(), trace.clone());
        async move {
            let got = spans.lock().unwrap().clone();
            (got.iter().filter(|(_, s)| s.trace_id == trace).count() >= 7).then_some(got)
        }
    })
    .await;
    let of = |name: &str| -> Vec<&opentelemetry_proto::tonic::trace::v1::Span> {
        got.iter().map(|(_, s)| s).filter(|s| s.name == name && s.trace_id == trace).collect()
    };
    let (runs, steps, attempts, executes) = (of("run"), of("step"), of("attempt"), of("execute shell"));
    assert_eq!((runs.len(), steps.len(), attempts.len(), executes.len()), (1, 2, 2, 1), "{got:#?}");
    assert_eq!(of("execute noop").len(), 1);
    let run_span = &runs[0];
    assert!(run_span.parent_span_id.is_empty(), "the run is the trace's root");
    assert!(run_span.end_time_unix_nano >= run_span.start_time_unix_nano);
    for s in &steps {
        assert_eq!(s.parent_span_id, run_span.span_id);
    }
    let step_a = baton_common::trace::step_span(&id, "a").to_vec();
    let attempt_a = attempts.iter().find(|s| s.parent_span_id == step_a).expect("step a's attempt");
    let exec = executes[0];
    assert_eq!(exec.parent_span_id, attempt_a.span_id, "the agent's span is the attempt's child");
    assert!(got.iter().any(|(service, s)| service.contains("baton-agent") && s.span_id == exec.span_id));

    // The tool saw the agent's span as its parent.
    let chunks = logs(&mut c, &id, "a", 0, false).await;
    let logs: String = chunks.iter().map(|ch| String::from_utf8_lossy(&ch.data).into_owned()).collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(logs.trim(), format!("00-{}-{}-01", hex(&trace), hex(&exec.span_id)));
}
