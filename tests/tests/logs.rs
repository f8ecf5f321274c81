//! Attempt output streamed from agents, kept per attempt (capped), read back and
//! followed live.

use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;

async fn output_is_kept_per_attempt_and_read_back_by_step_and_attempt(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("n");
    let spec = format!(
        "name: l\nsteps:\n  - id: s\n    tool: shell\n    retry: {{max_attempts: 2, backoff: {{initial: 10ms}}}}\n    with: {{run: 'n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; echo out of attempt $n; echo err of attempt $n >&2; test $n -gt 1'}}\n  - {{id: t, needs: s, tool: shell, with: {{run: 'echo from t'}}}}\n",
        f = counter.display()
    );
    let id = sb.submit(&spec).await;
    wait_run(&mut c, &id, Duration::from_secs(20)).await;
    let latest = log_text(&logs(&mut c, &id, "s", 0, false).await);
    assert!(latest.contains("out of attempt 2") && latest.contains("err of attempt 2"), "{latest}");
    assert!(!latest.contains("attempt 1"));
    let first = log_text(&logs(&mut c, &id, "s", 1, false).await);
    assert!(first.contains("out of attempt 1"), "{first}");
    let all = logs(&mut c, &id, "", 0, false).await;
    assert_eq!(all.iter().map(|c| c.step_id.as_str()).collect::<std::collections::BTreeSet<_>>().len(), 2);
    assert!(log_text(&all).contains("from t"));
    let err = c
        .get_logs(proto::GetLogsRequest { run_id: id.clone(), step_id: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn output_past_the_cap_is_truncated_with_a_marker(backend: Backend) {
    let mut engine = fast_engine();
    engine.max_output_bytes = 4096;
    let sb = Sandbox::builder().backend(backend).agents(1).engine(engine).build().await;
    let mut c = sb.client().await;
    // 200 KB of output: more than the agent keeps as tail and the controller keeps.
    let id = sb.submit("name: big\nsteps:\n  - {id: s, tool: shell, with: {run: 'yes 0123456789 | head -c 200000; echo; echo END'}}\n").await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let kept = log_text(&logs(&mut c, &id, "s", 0, false).await);
    assert!(kept.starts_with("0123456789\n0123456789"), "{}", &kept[..40]);
    assert!(kept.contains("[... output truncated: the limit of 4096 bytes per attempt was reached ...]"));
    assert!(kept.len() < 4096 + 200, "{} bytes kept", kept.len());
    // The attempt's tail still ends with the end of the output.
    let tail = &run.steps[0].attempts[0].output_tail;
    assert!(tail.trim_end().ends_with("END"));
    assert!(tail.starts_with("[... "), "the tail says it was cut: {}", &tail[..40]);
}

async fn following_a_step_streams_output_as_it_is_written(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let gate = sb.dir.path().join("gate");
    // Prints, then waits for the test to open the gate, then prints again.
    let spec = format!(
        "name: f\nsteps:\n  - {{id: s, tool: shell, with: {{run: 'echo before; while [ ! -e {g} ]; do sleep 0.05; done; echo after'}}}}\n",
        g = gate.display()
    );
    let id = sb.submit(&spec).await;
    let req = proto::GetLogsRequest {
        run_id: id.clone(),
        step_id: "s".into(),
        attempt: 0,
        follow: true,
        from_seq: 0,
    };
    let mut s = c.get_logs(req).await.unwrap().into_inner();
    let mut seen = String::new();
    while !seen.contains("before") {
        let chunk =
            tokio::time::timeout(Duration::from_secs(20), s.message()).await.unwrap().unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(!seen.contains("after"), "the step is still waiting at its gate");
    std::fs::write(&gate, "").unwrap();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), s.message()).await.unwrap().unwrap()
    {
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert_eq!(seen, "before\nafter\n", "the stream ends after the step did, with everything in it");
}

/// A follower that reconnects with the seq after the last chunk it saw gets the rest
/// of the output: nothing missed, nothing twice. Resuming needs one attempt.
async fn a_log_follower_resumes_from_a_chunk(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let gate = sb.dir.path().join("gate");
    let spec = format!(
        "name: f\nsteps:\n  - {{id: s, tool: shell, with: {{run: 'for i in 1 2 3; do echo line $i; sleep 0.05; done; while [ ! -e {g} ]; do sleep 0.05; done; echo line 4'}}}}\n",
        g = gate.display()
    );
    let id = sb.submit(&spec).await;
    let req = |from_seq| proto::GetLogsRequest {
        run_id: id.clone(),
        step_id: "s".into(),
        attempt: 1,
        follow: true,
        from_seq,
    };
    let mut s = c.get_logs(req(0)).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), s.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.seq, 1);
    drop(s);
    std::fs::write(&gate, "").unwrap();
    let mut s = c.get_logs(req(first.seq + 1)).await.unwrap().into_inner();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), s.message()).await.unwrap().unwrap()
    {
        rest.push(chunk);
    }
    let seqs: Vec<i64> = rest.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (2..2 + rest.len() as i64).collect::<Vec<_>>(), "chunks follow on without gaps");
    let text = format!("{}{}", String::from_utf8_lossy(&first.data), log_text(&rest));
    assert_eq!(text, "line 1\nline 2\nline 3\nline 4\n");
    let err = c
        .get_logs(proto::GetLogsRequest {
            run_id: id.clone(),
            step_id: "s".into(),
            from_seq: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("give step_id and attempt"), "{}", err.message());
}

/// WatchRuns streams the events of every run from the moment of the call.
async fn watching_all_runs_streams_each_runs_events(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let mut all =
        c.watch_runs(proto::WatchRunsRequest { run_events_only: false }).await.unwrap().into_inner();
    let mut only_runs =
        c.watch_runs(proto::WatchRunsRequest { run_events_only: true }).await.unwrap().into_inner();
    let a = sb.submit("name: a\nsteps:\n  - {id: s, tool: noop}\n").await;
    let b = sb.submit("name: b\nsteps:\n  - {id: s, tool: noop}\n").await;
    let mut ended = std::collections::BTreeSet::new();
    let mut steps = 0;
    while ended.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(20), all.message()).await.unwrap().unwrap().unwrap();
        assert!(e.run_id == a || e.run_id == b, "an event of another run: {e:?}");
        if !e.step_id.is_empty() {
            steps += 1;
        }
        if e.kind == "run_succeeded" {
            ended.insert(e.run_id.clone());
        }
    }
    assert!(steps >= 2, "step events are streamed too");
    let mut kinds = Vec::new();
    while kinds.iter().filter(|k: &&String| *k == "run_succeeded").count() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(20), only_runs.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(e.kind.starts_with("run_"), "{}", e.kind);
        kinds.push(e.kind);
    }
}

on_both!(
    a_log_follower_resumes_from_a_chunk,
    watching_all_runs_streams_each_runs_events,
    output_is_kept_per_attempt_and_read_back_by_step_and_attempt,
    output_past_the_cap_is_truncated_with_a_marker,
    following_a_step_streams_output_as_it_is_written,
);
