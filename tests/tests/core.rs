//! The core promises end to end: a real controller and real agents on loopback.

use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

const HELLO: &str = include_str!("../../examples/hello.yaml");

async fn fan_out_and_join_runs_in_dependency_order_across_agents(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).slots(2).build().await;
    let mut c = sb.client().await;
    let id = sb.submit(HELLO).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    assert_eq!(run.steps.len(), 8);
    let progress = run.progress.clone().unwrap();
    assert_eq!((progress.done, progress.total), (8, 8));
    for s in &run.steps {
        assert_eq!(s.state_name(), "succeeded", "step {}", s.id);
        assert_eq!(s.attempts.len(), 1, "step {} ran once", s.id);
        assert_eq!(s.attempts[0].exit_code, Some(0));
        // A step starts only after every step it needs has finished (it may have been
        // assigned before, pipelined behind them on their agent).
        for n in &s.needs {
            let up = step(&run, n);
            assert!(
                ms(&s.attempts[0].started_at) >= ms(&up.finished_at),
                "{} started before {} finished",
                s.id,
                n
            );
        }
    }
    assert!(step(&run, "fetch").attempts[0].output_tail.contains("hello from fetch"));
    assert!(step(&run, "report").attempts[0].output_tail.contains("report: all green"));
    // The three builds ran side by side (each sleeps 300ms) on both agents.
    let builds: Vec<&proto::Attempt> =
        ["build-linux", "build-mac", "build-windows"].iter().map(|b| &step(&run, b).attempts[0]).collect();
    let first_end = builds.iter().map(|a| ms(&a.finished_at)).min().unwrap();
    let last_start = builds.iter().map(|a| ms(&a.started_at)).max().unwrap();
    assert!(last_start < first_end, "builds did not overlap");
    let agents: std::collections::HashSet<&str> =
        run.steps.iter().map(|s| s.attempts[0].agent_name.as_str()).collect();
    assert_eq!(agents.len(), 2, "both agents took work: {agents:?}");
    // The summary view is the same run without the steps' needs.
    let summary = c
        .get_run(proto::GetRunRequest { run_id: id.clone(), view: proto::RunView::Summary as i32 })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert!(run.steps.iter().any(|s| !s.needs.is_empty()));
    assert!(summary.steps.iter().all(|s| s.needs.is_empty()));
    let without_needs = |r: &proto::Run| {
        let mut r = r.clone();
        r.steps.iter_mut().for_each(|s| s.needs.clear());
        r.progress = None;
        r
    };
    assert_eq!(without_needs(&summary), without_needs(&run));

    // The event log is gapless, ends with the run's end, and every step transition is in it.
    let events = all_events(&mut c, &id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    assert_eq!(events.first().unwrap().kind, "run_submitted");
    assert_eq!(events.last().unwrap().kind, "run_succeeded");
    assert_eq!(events.iter().filter(|e| e.kind == "step_succeeded").count(), 8);

    // Watching resumes from any sequence number, without repeats.
    let mut s = c
        .watch_run(proto::WatchRunRequest { run_id: id.clone(), from_seq: 5, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut resumed = Vec::new();
    while let Some(ev) = s.message().await.unwrap() {
        resumed.push(ev.seq);
    }
    assert_eq!(resumed, (5..=events.len() as i64).collect::<Vec<_>>());
}

async fn a_failing_step_skips_its_dependents_and_fails_the_run(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit(
            r#"
name: failing
steps:
  - {id: prepare, tool: shell, with: {run: "true"}}
  - {id: compile, needs: prepare, tool: shell, with: {run: "echo broken >&2; exit 3"}}
  - {id: test, needs: compile, tool: shell, with: {run: "true"}}
  - {id: publish, needs: test, tool: shell, with: {run: "true"}}
"#,
        )
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "failed");
    assert_eq!(run.reason, "step \"compile\" failed");
    assert_eq!(step(&run, "prepare").state_name(), "succeeded");
    let compile = step(&run, "compile");
    assert_eq!(compile.state_name(), "failed");
    assert_eq!(compile.attempts[0].exit_code, Some(3));
    assert_eq!(class_name(&compile.attempts[0]), "nonzero_exit");
    assert!(compile.attempts[0].output_tail.contains("broken"));
    assert!(compile.reason.contains("exit code 3"), "{}", compile.reason);
    for s in ["test", "publish"] {
        let st = step(&run, s);
        assert_eq!(st.state_name(), "skipped", "{s}");
        assert!(never_ran(st), "{s} never ran: {:?}", st.attempts);
        assert_eq!(st.reason, "upstream step \"compile\" failed");
    }
}

async fn canceling_a_run_kills_its_process_and_starts_nothing_more(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let pidfile = sb.dir.path().join("sleeper.pid");
    let spec = format!(
        r#"
name: cancel-me
steps:
  - id: long
    tool: shell
    with: {{run: "echo $$ > {pid}; exec sleep 60"}}
  - {{id: after, needs: long, tool: shell, with: {{run: "true"}}}}
"#,
        pid = pidfile.display()
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started" && e.step_id == "long")
        .await;
    let pid: i32 = eventually(Duration::from_secs(10), "the pid file", || {
        let p = pidfile.clone();
        async move { std::fs::read_to_string(p).ok()?.trim().parse().ok() }
    })
    .await;
    assert!(process_alive(pid));

    let resp = c
        .cancel_run(proto::CancelRunRequest {
            run_id: id.clone(),
            reason: "test says stop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.state_name(), "canceled");
    eventually(Duration::from_secs(3), "the tool to be killed", || async move {
        (!process_alive(pid)).then_some(())
    })
    .await;
    let run = get_run(&mut c, &id).await;
    assert_eq!(run.state_name(), "canceled");
    assert_eq!(run.reason, "test says stop");
    assert_eq!(step(&run, "long").state_name(), "canceled");
    assert_eq!(step(&run, "long").attempts[0].state_name(), "canceled");
    assert_eq!(step(&run, "after").state_name(), "canceled");
    assert!(never_ran(step(&run, "after")), "{:?}", step(&run, "after").attempts);
    // Canceling again is harmless; the run stays canceled.
    let again =
        c.cancel_run(proto::CancelRunRequest { run_id: id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(again.into_inner().state_name(), "canceled");
}

async fn invalid_specs_are_rejected_over_grpc_and_nothing_is_stored(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let cases = [
        (
            "name: x\nsteps:\n  - {id: a, tool: noop, needs: b}\n  - {id: b, tool: noop, needs: a}\n",
            "dependency cycle: a -> b -> a",
        ),
        ("name: x\nsteps:\n  - {id: a, tool: noop, needs: zz}\n", "depends on unknown step \"zz\""),
        ("name: x\nsteps:\n  - {id: a, tool: noop}\n  - {id: a, tool: noop}\n", "duplicate step id"),
        ("name: x\nsteps:\n  - {id: '', tool: noop}\n", "non-empty id"),
        ("name: x\nsteps:\n  - {id: a, tool: hammer}\n", "unknown tool \"hammer\""),
        ("name: x\nsteps:\n  - {id: a, tool: noop, timeout: 5 fortnights}\n", "bad duration"),
        ("name: x\nsteps:\n  - id: a\n    tool: noop\n   bad: [\n", "test.yaml:5:"),
        ("name: x\nsteps:\n  - {id: a, kind: build}\n", "no router rule maps kind \"build\""),
    ];
    for (spec, want) in cases {
        let err = c
            .submit_run(proto::SubmitRunRequest {
                spec: spec.into(),
                source: "test.yaml".into(),
                params: Default::default(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{spec}");
        assert!(err.message().contains(want), "{spec}: {}", err.message());
        assert!(err.message().starts_with("test.yaml"), "names the source: {}", err.message());
    }
    let runs = c.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    assert!(runs.is_empty(), "nothing stored: {runs:?}");
}

async fn unknown_runs_are_not_found(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let err = c
        .get_run(proto::GetRunRequest { run_id: "deadbeef".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("\"deadbeef\""), "{}", err.message());
    let err = c
        .cancel_run(proto::CancelRunRequest { run_id: "nope!".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn a_submit_repeated_with_its_request_id_returns_the_same_run(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let req = |id: &str| proto::SubmitRunRequest {
        spec: "name: idem\nsteps:\n  - {id: a, tool: noop}\n".into(),
        request_id: id.into(),
        ..Default::default()
    };
    let first = c.submit_run(req("req-1")).await.unwrap().into_inner().run_id;
    let again = c.submit_run(req("req-1")).await.unwrap().into_inner().run_id;
    assert_eq!(first, again, "a retried submit answers with the run the first one created");
    let other = c.submit_run(req("req-2")).await.unwrap().into_inner().run_id;
    assert_ne!(first, other);
    wait_run(&mut c, &first, Duration::from_secs(20)).await;
    wait_run(&mut c, &other, Duration::from_secs(20)).await;
    // After the run ended and the controller restarted, the store still knows the id.
    sb.stop_controller().await;
    sb.restart_controller().await;
    let mut c = sb.client().await;
    let later = c.submit_run(req("req-1")).await.unwrap().into_inner().run_id;
    assert_eq!(first, later);
    let runs = c.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    assert_eq!(runs.len(), 2, "two request ids, two runs: {runs:?}");
    // Without a request id every submit is a new run; a malformed id is refused.
    let a = c.submit_run(req("")).await.unwrap().into_inner().run_id;
    let b = c.submit_run(req("")).await.unwrap().into_inner().run_id;
    assert_ne!(a, b);
    let err = c.submit_run(req("has space")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("request_id"), "{}", err.message());
}

async fn a_deeply_nested_spec_is_refused_at_once_and_stalls_nothing(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let n = 100_000;
    let deep = format!(
        "name: x\nsteps:\n  - id: a\n    tool: noop\n    with: {{k: {}{}}}\n",
        "[".repeat(n),
        "]".repeat(n)
    );
    let mut c = sb.client().await;
    let mut other = sb.client().await;
    let (bad, ok) = tokio::join!(
        c.submit_run(proto::SubmitRunRequest {
            spec: deep,
            source: "deep.yaml".into(),
            ..Default::default()
        }),
        other.submit_run(proto::SubmitRunRequest {
            spec: "name: fine\nsteps:\n  - {id: a, tool: noop}\n".into(),
            ..Default::default()
        })
    );
    let e = bad.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("deep.yaml:5: collections nested 65 deep"), "{}", e.message());
    let id = ok.unwrap().into_inner().run_id;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(20)).await.state_name(), "succeeded");
}

/// A chain on one agent: each step is assigned with its predecessor, pipelined behind
/// it, started by the agent when it succeeds (its input rendered there from the
/// predecessor's outputs), and accepted after it; a failure drops what follows.
async fn a_chain_runs_pipelined_on_its_agent_and_a_failure_drops_what_follows(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let marks = sb.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let spec = format!(
        r#"
name: chain
steps:
  - {{id: a, tool: echo, with: {{version: "1.2"}}}}
  - id: b
    needs: a
    tool: shell
    env: {{V: "${{{{ steps.a.outputs.version }}}}"}}
    with: {{run: 'echo "b got $V" && echo "seen=$V" > "$BATON_OUTPUT"'}}
  - id: c
    needs: b
    tool: shell
    with: {{run: 'echo "c got ${{{{ steps.b.outputs.seen }}}}"; touch {m}/c'}}
"#,
        m = marks.display()
    );
    let id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    let (a, b, cc) = (step(&run, "a"), step(&run, "b"), step(&run, "c"));
    for s in [b, cc] {
        assert_eq!(s.attempts.len(), 1, "{} ran once", s.id);
    }
    assert_eq!(b.attempts[0].after, vec![a.attempts[0].id.clone()], "b was pipelined behind a");
    assert_eq!(cc.attempts[0].after, vec![b.attempts[0].id.clone()], "c behind b");
    assert!(b.attempts[0].output_tail.contains("b got 1.2"), "{}", b.attempts[0].output_tail);
    assert!(cc.attempts[0].output_tail.contains("c got 1.2"), "{}", cc.attempts[0].output_tail);
    let events = all_events(&mut c, &id).await;
    assert_eq!(events.iter().filter(|e| e.kind == "attempt_assigned").count(), 3, "one Assign per step");
    assert!(events.iter().any(|e| e.kind == "attempt_assigned" && e.message.contains("pipelined")));
    let (_, metrics) = http_get(sb.metrics_addr, "/metrics").await;
    assert!(metrics.contains("baton_pipelined_starts_total 2"), "{metrics}");
    let json = c
        .get_report(proto::GetReportRequest { run_id: id.clone(), format: proto::ReportFormat::Json as i32 })
        .await
        .unwrap()
        .into_inner()
        .content;
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["summary"]["pipelined"], 2);
    let c_report = report["steps"].as_array().unwrap().iter().find(|s| s["id"] == "c").unwrap();
    assert_eq!(c_report["attempts"][0]["pipelined_after"], serde_json::json!(["b#1"]));

    // b fails: c, pipelined behind it, never starts and is skipped.
    let failing = spec.replace("echo \"b got $V\"", "exit 4").replace("name: chain", "name: chain-fails");
    std::fs::remove_file(marks.join("c")).unwrap();
    let id = sb.submit(&failing).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "failed");
    let cc = step(&run, "c");
    assert_eq!(cc.state_name(), "skipped");
    assert!(never_ran(cc), "{:?}", cc.attempts);
    assert!(!marks.join("c").exists(), "c's tool never ran");
}

on_both!(
    a_chain_runs_pipelined_on_its_agent_and_a_failure_drops_what_follows,
    a_deeply_nested_spec_is_refused_at_once_and_stalls_nothing,
    a_submit_repeated_with_its_request_id_returns_the_same_run,
    fan_out_and_join_runs_in_dependency_order_across_agents,
    a_failing_step_skips_its_dependents_and_fails_the_run,
    canceling_a_run_kills_its_process_and_starts_nothing_more,
    invalid_specs_are_rejected_over_grpc_and_nothing_is_stored,
    unknown_runs_are_not_found,
);
