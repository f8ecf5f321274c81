//! Resilience end to end: retries, timeouts, agent loss and fencing, re-sent results,
//! restarts, quarantine, cancel and deadlines, with real controllers and agents.

use std::time::Duration;

use baton_tests::on_both;
use baton_tests::*;
use nix::sys::signal::Signal;

/// A shell script that fails until it has run `n` times (counted in `file`).
fn flaky(file: &std::path::Path, n: u32) -> String {
    format!(
        "c=$(cat {f} 2>/dev/null || echo 0); c=$((c+1)); echo $c > {f}; test $c -gt {n}",
        f = file.display()
    )
}

async fn retries_back_off_exponentially_then_succeed(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("count");
    let spec = format!(
        r#"
name: flaky
steps:
  - id: flaky
    tool: shell
    with: {{run: "{}"}}
    retry: {{max_attempts: 3, backoff: {{initial: 300ms, max: 5s, multiplier: 2, jitter: 0}}}}
"#,
        flaky(&counter, 2)
    );
    let id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let s = step(&run, "flaky");
    assert_eq!(s.attempts.len(), 3);
    let gap = |i: usize| ms(&s.attempts[i].assigned_at) - ms(&s.attempts[i - 1].finished_at);
    assert!(gap(1) >= 300, "first retry after >= 300ms, was {}ms", gap(1));
    assert!(gap(2) >= 600, "second retry after >= 600ms, was {}ms", gap(2));
    assert_eq!(s.attempts[0].state_name(), "failed");
    assert_eq!(class_name(&s.attempts[0]), "nonzero_exit");
    let events = all_events(&mut c, &id).await;
    assert_eq!(events.iter().filter(|e| e.kind == "step_retry_wait").count(), 2);
}

async fn fail_fast_codes_retry_on_and_budgets_end_retries(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit(
            r#"
name: budgets
on_failure: continue
defaults:
  retry: {max_attempts: 4, backoff: {initial: 50ms, jitter: 0}}
steps:
  - {id: fast, tool: shell, with: {run: "exit 2"}, retry: {fail_fast_exit_codes: [2]}}
  - {id: not-retried, tool: shell, with: {run: "exit 1"}, retry: {retry_on: [timeout]}}
  - {id: spent, tool: shell, with: {run: "exit 1"}, retry: {max_attempts: 2}}
"#,
        )
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "failed");
    let fast = step(&run, "fast");
    assert_eq!(fast.attempts.len(), 1);
    assert!(fast.reason.contains("exit code 2 is in fail_fast_exit_codes"), "{}", fast.reason);
    let nr = step(&run, "not-retried");
    assert_eq!(nr.attempts.len(), 1);
    assert!(nr.reason.contains("nonzero_exit is not retried"), "{}", nr.reason);
    let spent = step(&run, "spent");
    assert_eq!(spent.attempts.len(), 2);
    assert!(spent.reason.contains("no retries left (2 of 2 attempts used)"), "{}", spent.reason);
}

async fn a_pending_retry_survives_a_controller_restart_and_fires_on_time(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("count");
    let spec = format!(
        r#"
name: durable-retry
steps:
  - id: s
    tool: shell
    with: {{run: "{}"}}
    retry: {{max_attempts: 2, backoff: {{initial: 2s, jitter: 0}}}}
"#,
        flaky(&counter, 1)
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "step_retry_wait").await;
    let due = ms(&step(&get_run(&mut c, &id).await, "s").next_attempt_at);
    assert!(due > 0);
    sb.restart_controller().await;
    let mut c = sb.client().await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let second = &step(&run, "s").attempts[1];
    assert!(ms(&second.assigned_at) >= due, "not early: {} < {due}", ms(&second.assigned_at));
    assert!(ms(&second.assigned_at) < due + 3_000, "not late: {}ms after due", ms(&second.assigned_at) - due);
}

async fn a_run_deadline_beats_retries_and_stops_running_tools(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit(
            r#"
name: deadline
deadline: 1s
on_failure: continue
steps:
  - {id: doomed, tool: shell, with: {run: "exit 1"}, retry: {max_attempts: 10, backoff: {initial: 5s}}}
  - {id: slow, tool: sleep, with: {duration: 60s}}
"#,
        )
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");
    assert_eq!(run.reason, "run deadline of 1s exceeded");
    let doomed = step(&run, "doomed");
    assert_eq!(doomed.attempts.len(), 1, "no retry can finish before the deadline");
    assert!(doomed.reason.contains("deadline leaves no time"), "{}", doomed.reason);
    let slow = step(&run, "slow");
    assert_eq!(slow.state_name(), "canceled");
    assert!(ms(&run.finished_at) - ms(&run.created_at) < 5_000);
}

async fn a_step_timeout_kills_the_whole_process_group(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let pidfile = sb.dir.path().join("bg.pid");
    let spec = format!(
        r#"
name: timeout
steps:
  - id: hang
    tool: shell
    timeout: 700ms
    with: {{run: "sleep 60 & echo $! > {}; wait"}}
"#,
        pidfile.display()
    );
    let id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");
    let a = &step(&run, "hang").attempts[0];
    assert_eq!(a.state_name(), "timed_out");
    assert_eq!(class_name(a), "timeout");
    assert!(a.error.contains("timed out after 700ms"), "{}", a.error);
    let bg: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    eventually(Duration::from_secs(3), "the background child to die", || async move {
        (!process_alive(bg)).then_some(())
    })
    .await;
}

async fn the_controller_times_out_an_attempt_whose_agent_is_silent_and_fences_its_late_result(
    backend: Backend,
) {
    let mut engine = fast_engine();
    engine.lost_after = Duration::from_secs(20);
    engine.failover_grace = Duration::from_secs(30);
    engine.kill_grace = Duration::from_millis(300);
    let sb = Sandbox::builder().backend(backend).agents(0).engine(engine).build().await;
    let mut c = sb.client().await;
    let agent = agent_process(&sb.url(), "frozen", sb.dir.path(), &[]);
    sb.wait_agents(1).await;
    let id = sb
        .submit(
            "name: t\nsteps:\n  - {id: s, tool: shell, timeout: 1s, with: {run: 'sleep 0.3; echo late'}}\n",
        )
        .await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    agent.signal(Signal::SIGSTOP);
    // Deadline (1s) + grace (300ms) pass long before the agent counts as lost (20s).
    let run = wait_run(&mut c, &id, Duration::from_secs(10)).await;
    let a = &step(&run, "s").attempts[0];
    assert_eq!(a.state_name(), "timed_out");
    assert_eq!(a.error, "no result by the step timeout plus kill grace");
    agent.signal(Signal::SIGCONT);
    // Its result (a success, from its point of view) arrives late and changes nothing.
    let events = all_events(&mut c, &id).await;
    assert_eq!(events.last().unwrap().kind, "run_failed");
    let run = get_run(&mut c, &id).await;
    assert_eq!(step(&run, "s").attempts[0].state_name(), "timed_out");
}

async fn a_frozen_agent_is_lost_its_step_reruns_elsewhere_and_its_late_reports_change_nothing(
    backend: Backend,
) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let agent = agent_process(&sb.url(), "a-frozen", sb.dir.path(), &[]);
    sb.wait_agents(1).await;
    // `after` keeps the run going while the frozen agent comes back: rejections are
    // recorded in the log of a run that is still active.
    let id = sb
        .submit("name: f\nsteps:\n  - {id: s, tool: shell, with: {run: 'sleep 1.5; echo done'}}\n  - {id: after, needs: s, tool: sleep, with: {duration: 3s}}\n")
        .await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    agent.signal(Signal::SIGSTOP);
    let mut sb = sb;
    sb.add_agent("b-healthy", 1);
    // Lost after 2s of silence; the step runs again on the healthy agent.
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "step_succeeded" && e.step_id == "s")
        .await;
    agent.signal(Signal::SIGCONT);
    // The resumed agent finds its lease run out: it stops its old attempt and says so
    // when it reconnects (or, if a heartbeat goes out first, that report is rejected);
    // either way the loss stands.
    let seen = c.clone();
    eventually(Duration::from_secs(20), "the resumed agent to reconnect", || {
        let mut c = seen.clone();
        async move {
            let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.name == "a-frozen" && a.state_name() == "connected").then_some(())
        }
    })
    .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let s = step(&run, "s");
    assert_eq!(s.attempts.len(), 2);
    assert_eq!((s.attempts[0].agent_name.as_str(), s.attempts[0].state_name()), ("a-frozen", "lost"));
    assert_eq!(class_name(&s.attempts[0]), "agent_lost");
    assert_eq!((s.attempts[1].agent_name.as_str(), s.attempts[1].state_name()), ("b-healthy", "succeeded"));
    assert_eq!(
        s.attempts.iter().filter(|a| a.state_name() == "succeeded").count(),
        1,
        "exactly one accepted success"
    );
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert!(agents.iter().any(|a| a.name == "a-frozen"));
}

async fn an_agent_cut_off_from_the_controller_stops_its_tools(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(0).build().await;
    // No stop_after of its own: the controller's (1.2s in tests) applies.
    let cfg = sb.agent_config("cut-off", 1);
    assert_eq!(cfg.stop_after, None);
    sb.add_agent_with(cfg);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let pidfile = sb.dir.path().join("tool.pid");
    let marker = sb.dir.path().join("first-done");
    // The first attempt hangs; a retry (after the agent's own stop) finishes at once.
    let spec = format!(
        "name: s\nsteps:\n  - {{id: s, tool: shell, with: {{run: 'if [ -e {m} ]; then exit 0; fi; touch {m}; echo $$ > {p}; exec sleep 60'}}}}\n",
        m = marker.display(),
        p = pidfile.display()
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    let pid: i32 = eventually(Duration::from_secs(5), "the pid file", || {
        let p = pidfile.clone();
        async move { std::fs::read_to_string(p).ok()?.trim().parse().ok() }
    })
    .await;
    sb.stop_controller().await;
    // With no answer for stop_after, the agent kills its tool by itself.
    eventually(Duration::from_secs(5), "the agent to stop its tool", || async move {
        (!process_alive(pid)).then_some(())
    })
    .await;
    sb.restart_controller().await;
    let mut c = sb.client().await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let s = step(&run, "s");
    assert_eq!(s.attempts[0].state_name(), "lost", "{:#?}", s.attempts);
    assert_eq!(s.attempts.last().unwrap().state_name(), "succeeded");
}

async fn a_start_lost_with_the_stream_is_recorded_when_the_attempt_is_adopted(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let hello = proto::Hello {
        agent_id: "raw-agent".into(),
        name: "raw".into(),
        version: "test".into(),
        tools: vec![proto::Tool { name: "sleep".into(), version: "1".into() }],
        slots: 1,
        ..Default::default()
    };
    let mut first = AgentSession::open(sb.channel_as(None).await, hello.clone()).await.unwrap();
    let id = sb.submit("name: a\nsteps:\n  - {id: s, tool: sleep, with: {duration: 1s}}\n").await;
    let attempt = loop {
        match first.inbound.message().await.unwrap().and_then(|m| m.msg) {
            Some(proto::controller_message::Msg::Assign(a)) => break a.attempt.unwrap(),
            Some(_) => continue,
            None => panic!("stream ended before an assignment"),
        }
    };
    // The agent started it, but its Started report went down with the stream.
    drop(first);
    let again = proto::Hello { running: vec![attempt.clone()], ..hello };
    let second = AgentSession::open(sb.channel_as(None).await, again).await.unwrap();
    assert_eq!(second.welcome.adopted, vec![attempt.attempt_id.clone()]);
    let ev = wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started").await;
    assert_eq!(ev.attempt_id, attempt.attempt_id);
    let run = get_run(&mut c, &id).await;
    let a = &step(&run, "s").attempts[0];
    assert_eq!(a.state_name(), "running");
    assert!(ms(&a.started_at) > 0, "{a:?}");
    second
        .send(proto::agent_message::Msg::Finished(proto::AttemptFinished {
            attempt: Some(attempt),
            outcome: proto::Outcome::Succeeded as i32,
            ..Default::default()
        }))
        .await;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(10)).await.state_name(), "succeeded");
}

async fn without_cgroups_a_daemon_a_tool_leaves_ends_with_its_attempt_and_its_agent(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let mut agent =
        agent_process_with_env(&sb.url(), "no-cgroups", sb.dir.path(), &[], &[("BATON_CGROUPS", "false")]);
    sb.wait_agents(1).await;
    let pids = sb.dir.path().join("daemons");
    std::fs::create_dir_all(&pids).unwrap();
    // A daemon in a session of its own: out of the tool's process group.
    let spec = |step: &str, then: &str| {
        format!(
            "name: d\nsteps:\n  - {{id: {step}, tool: shell, with: {{run: 'setsid sh -c \"echo \\$\\$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 300\" & while [ ! -e {p} ]; do sleep 0.01; done; {then}'}}}}\n",
            p = pids.join(step).display()
        )
    };
    let daemon = |step: &str| {
        let p = pids.join(step);
        async move {
            eventually(Duration::from_secs(10), "the daemon's pid", || {
                let p = p.clone();
                async move { std::fs::read_to_string(p).ok()?.trim().parse::<i32>().ok() }
            })
            .await
        }
    };
    let id = sb.submit(&spec("ends", "true")).await;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(20)).await.state_name(), "succeeded");
    let pid = daemon("ends").await;
    eventually(Duration::from_secs(5), "the daemon to end with its attempt", || async move {
        (!process_alive(pid)).then_some(())
    })
    .await;
    // An agent killed while its tool runs: the daemon ends when it starts again.
    let id = sb.submit(&spec("crash", "exec sleep 300")).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    let pid = daemon("crash").await;
    agent.kill9();
    assert!(process_alive(pid), "the daemon outlived the agent so far");
    let _again =
        agent_process_with_env(&sb.url(), "no-cgroups", sb.dir.path(), &[], &[("BATON_CGROUPS", "false")]);
    eventually(Duration::from_secs(10), "the restarted agent to end the daemon", || async move {
        (!process_alive(pid)).then_some(())
    })
    .await;
    c.cancel_run(proto::CancelRunRequest { run_id: id, ..Default::default() }).await.unwrap();
}

async fn an_assignment_never_started_is_lost_and_retried(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let fake = FakeAgent::start(&sb.url(), "zz-fake", &["shell"]).await;
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let id = sb.submit("name: n\nsteps:\n  - {id: s, tool: shell, with: {run: 'true'}}\n").await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_assigned").await;
    assert_eq!(fake.assigned.lock().unwrap().len(), 1);
    // The step shows why it is not running.
    let run = get_run(&mut c, &id).await;
    assert_eq!(step(&run, "s").reason, "assigned to agent zz-fake, not started yet");
    sb.add_agent("a-real", 1);
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let s = step(&run, "s");
    assert_eq!(s.attempts[0].state_name(), "lost");
    assert_eq!(s.attempts[0].error, "agent zz-fake never started it");
    assert_eq!(s.attempts[1].agent_name, "a-real");
}

async fn a_re_sent_result_is_applied_once(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let proxy = Proxy::start(sb.addr).await;
    let mut cfg = sb.agent_config("behind-proxy", 1);
    cfg.controllers = vec![proxy.url()];
    // b waits for an agent with its tool (not this one, so it is not pipelined here):
    // the run is still going when the result comes again.
    cfg.disable_tools = vec!["noop".into()];
    sb.add_agent_with(cfg);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let id = sb
        .submit("name: r\nsteps:\n  - {id: a, tool: shell, with: {run: 'sleep 0.3'}}\n  - {id: b, needs: a, tool: noop}\n")
        .await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started" && e.step_id == "a")
        .await;
    // The result goes up; the Ack never comes down.
    proxy.hold_downstream(true);
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "step_succeeded" && e.step_id == "a")
        .await;
    proxy.cut();
    proxy.hold_downstream(false);
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "result_redelivered" && e.step_id == "a")
        .await;
    sb.add_agent("with-noop", 1);
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(step(&run, "a").attempts.len(), 1);
    let events = all_events(&mut c, &id).await;
    let succeeded_a = events.iter().filter(|e| e.kind == "step_succeeded" && e.step_id == "a").count();
    assert_eq!(succeeded_a, 1, "applied once");
    assert!(
        events.iter().any(|e| e.kind == "result_redelivered" && e.step_id == "a"),
        "the agent re-sent its unacknowledged result: {:#?}",
        events
            .iter()
            .map(|e| format!("{} {} {} {}", e.seq, e.kind, e.step_id, e.message))
            .collect::<Vec<_>>()
    );
    assert!(!events.iter().any(|e| e.kind == "report_rejected"));
}

async fn quarantine_holds_a_run_until_release_gives_a_fresh_budget(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(1).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("count");
    let spec = format!(
        r#"
name: q
on_failure: quarantine
steps:
  - {{id: x, tool: shell, with: {{run: "{}"}}}}
  - {{id: after, needs: x, tool: noop}}
"#,
        flaky(&counter, 1)
    );
    let id = sb.submit(&spec).await;
    let ev = wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "run_quarantined").await;
    assert!(ev.message.contains("step \"x\" failed"), "{}", ev.message);
    let run = get_run(&mut c, &id).await;
    assert_eq!(run.state_name(), "quarantined");
    assert!(run.reason.contains("step \"x\" failed"));
    assert_eq!(step(&run, "after").state_name(), "waiting", "kept as it was, not skipped");
    assert_eq!(step(&run, "after").reason, "waiting for x");
    // Release: the failed step gets a fresh budget and succeeds on its second attempt.
    let resp = c
        .release_run(proto::ReleaseRunRequest { run_id: id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.state_name(), "running");
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(step(&run, "x").attempts.len(), 2);
    let err = c
        .release_run(proto::ReleaseRunRequest { run_id: id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

async fn on_failure_continue_runs_independent_branches_to_the_end(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit(
            r#"
name: c
on_failure: continue
steps:
  - {id: bad, tool: shell, with: {run: "exit 1"}}
  - {id: bad-child, needs: bad, tool: noop}
  - {id: slow, tool: sleep, with: {duration: 500ms}}
  - {id: slow-child, needs: slow, tool: noop}
"#,
        )
        .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");
    assert_eq!(step(&run, "bad-child").state_name(), "skipped");
    assert_eq!(step(&run, "slow-child").state_name(), "succeeded", "started after the failure");
    assert!(ms(&step(&run, "slow-child").attempts[0].started_at) > ms(&step(&run, "bad").finished_at));
}

async fn a_poison_step_that_keeps_killing_agents_quarantines_its_run(backend: Backend) {
    let mut engine = fast_engine();
    engine.poison_after = 2;
    let sb = Sandbox::builder().backend(backend).agents(0).engine(engine).build().await;
    let mut c = sb.client().await;
    let _a1 = agent_process(&sb.url(), "victim-1", sb.dir.path(), &[]);
    let _a2 = agent_process(&sb.url(), "victim-2", sb.dir.path(), &[]);
    sb.wait_agents(2).await;
    // The tool kills the agent that runs it.
    let id = sb
        .submit("name: p\nsteps:\n  - {id: poison, tool: shell, with: {run: 'kill -9 $PPID; sleep 5'}}\n")
        .await;
    let ev = wait_event(&mut c, &id, Duration::from_secs(30), |e| e.kind == "run_quarantined").await;
    assert!(ev.message.contains("lost with its agent 2 times in a row"), "{}", ev.message);
    let run = get_run(&mut c, &id).await;
    assert_eq!(run.state_name(), "quarantined");
    let s = step(&run, "poison");
    assert_eq!(s.attempts.len(), 2);
    assert!(s.attempts.iter().all(|a| a.state_name() == "lost"));
    let names: std::collections::HashSet<&str> = s.attempts.iter().map(|a| a.agent_name.as_str()).collect();
    assert_eq!(names.len(), 2, "it took down both agents");
    // An operator ends it.
    let resp =
        c.cancel_run(proto::CancelRunRequest { run_id: id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(resp.into_inner().state_name(), "canceled");
}

async fn canceling_one_step_kills_it_skips_its_dependents_and_lets_the_rest_finish(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(2).build().await;
    let mut c = sb.client().await;
    let pidfile = sb.dir.path().join("a.pid");
    let spec = format!(
        "name: sc\nsteps:\n  - {{id: a, tool: shell, with: {{run: 'echo $$ > {}; exec sleep 60'}}}}\n  - {{id: a-child, needs: a, tool: noop}}\n  - {{id: other, tool: sleep, with: {{duration: 300ms}}}}\n",
        pidfile.display()
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started" && e.step_id == "a")
        .await;
    let req = proto::CancelRunRequest { run_id: id.clone(), reason: String::new(), step_id: "ghost".into() };
    let err = c.cancel_run(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "an unknown step: {err}");
    let pid: i32 = eventually(Duration::from_secs(5), "the pid file", || {
        let p = pidfile.clone();
        async move { std::fs::read_to_string(p).ok()?.trim().parse().ok() }
    })
    .await;
    let req = proto::CancelRunRequest { run_id: id.clone(), step_id: "a".into(), reason: String::new() };
    c.cancel_run(req).await.unwrap();
    // Killed, not left to its 60 s sleep (a bound well under it, for a loaded machine).
    eventually(Duration::from_secs(20), "the step's process to die", || async move {
        (!process_alive(pid)).then_some(())
    })
    .await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "failed");
    assert_eq!(run.reason, "step \"a\" canceled");
    assert_eq!(step(&run, "a").state_name(), "canceled");
    assert_eq!(step(&run, "a-child").state_name(), "skipped");
    assert!(never_ran(step(&run, "a-child")), "{:?}", step(&run, "a-child").attempts);
    assert_eq!(step(&run, "other").state_name(), "succeeded");
}

async fn oversized_requests_are_refused(backend: Backend) {
    let sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut c = sb.client().await;
    let mut many = String::from("name: m\nsteps:\n");
    for i in 0..=baton_common::spec::MAX_STEPS {
        many.push_str(&format!("  - {{id: s{i}, tool: noop}}\n"));
    }
    let err = c
        .submit_run(proto::SubmitRunRequest { spec: many, source: "big.yaml".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("100001 steps; the limit is 100000"), "{}", err.message());
    let huge = "x".repeat(17 * 1024 * 1024);
    let err = c
        .submit_run(proto::SubmitRunRequest { spec: huge, source: "huge.yaml".into(), ..Default::default() })
        .await
        .unwrap_err();
    // Past the spec limit but within what the server decodes: the controller says which
    // limit and by how much.
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("huge.yaml: spec is 17825792 bytes; the limit is 16777216"), "{err}");
    // Past what the server decodes at all: refused before it is read.
    let huger = "x".repeat(21 * 1024 * 1024);
    let err = c
        .submit_run(proto::SubmitRunRequest {
            spec: huger,
            source: "huger.yaml".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(c.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs.is_empty());
}

async fn a_controller_back_within_stop_after_adopts_what_its_agents_run(backend: Backend) {
    // An agent keeps its tools running while its lease holds (stop_after, 4s here):
    // a controller that restarts sooner adopts them, and no attempt is added. (One that
    // takes longer finds them stopped: see an_agent_cut_off_from_the_controller_stops_its_tools.)
    let mut engine = fast_engine();
    // On Postgres the new controller first waits out the old one's lease (2s); the
    // restart must fit in stop_after, with room for a loaded machine.
    engine.stop_after = Duration::from_secs(10);
    engine.lost_after = Duration::from_secs(11);
    engine.failover_grace = Duration::from_secs(15);
    let mut sb = Sandbox::builder().backend(backend).agents(0).engine(engine).build().await;
    let _agent = agent_process(&sb.url(), "comes-back", sb.dir.path(), &[]);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    // The tool runs until the test opens its gate, however long the restart takes.
    let gate = sb.dir.path().join("gate");
    let spec = format!(
        "name: g\nsteps:\n  - {{id: s, tool: shell, with: {{run: 'while [ ! -e {g} ]; do sleep 0.05; done'}}}}\n",
        g = gate.display()
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started").await;
    sb.stop_controller().await;
    sb.restart_controller().await;
    let mut c = sb.client().await;
    wait_event(&mut c, &id, Duration::from_secs(30), |e| e.kind == "attempt_adopted").await;
    std::fs::write(&gate, "").unwrap();
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let s = step(&run, "s");
    assert_eq!(s.attempts.len(), 1, "adopted, not lost: {:#?}", s.attempts);
}

async fn steps_without_an_eligible_agent_wait_and_say_why(backend: Backend) {
    let mut sb = Sandbox::builder().backend(backend).agents(0).build().await;
    let mut cfg = sb.agent_config("shell-only", 1);
    cfg.tools = Some(vec!["shell".into()]);
    sb.add_agent_with(cfg);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let id = sb
        .submit("name: w\nsteps:\n  - {id: e, tool: echo, with: {x: 1}}\n  - {id: s, tool: sleep, with: {duration: 60s}}\n  - {id: after, needs: e, tool: shell, with: {run: 'true'}}\n")
        .await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "run_submitted").await;
    let run = get_run(&mut c, &id).await;
    assert_eq!(step(&run, "e").reason, "no agent with tool echo");
    assert_eq!(step(&run, "after").reason, "waiting for e");
    // An agent that vanishes leaves its steps waiting, with the reason.
    sb.add_agent("sleeper", 1);
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "attempt_started" && e.step_id == "s")
        .await;
    sb.stop_agent("sleeper").await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "step_ready" && e.step_id == "s").await;
    let run = get_run(&mut c, &id).await;
    let s = step(&run, "s");
    assert_eq!(s.attempts[0].state_name(), "lost", "stopped with its agent");
    assert_eq!(s.reason, "no connected agent with tool sleep (1 known but disconnected or draining)");
    assert_eq!(run.state_name(), "running");
}

/// An agent that is stopped (SIGTERM, Ctrl-C) reports the attempts it stopped before it
/// exits: the controller retries them at once instead of showing them running until the
/// agent's lease runs out.
async fn a_stopped_agent_reports_what_it_stopped_and_its_step_runs_elsewhere(backend: Backend) {
    let engine = baton_controller::EngineConfig {
        lost_after: Duration::from_secs(600),
        failover_grace: Duration::from_secs(601),
        ..fast_engine()
    };
    let mut sb = Sandbox::builder().backend(backend).engine(engine).agents(0).build().await;
    sb.add_agent("leaving", 1);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let dir = sb.dir.path().display().to_string();
    let id = sb
        .submit(&format!(
            "name: w\nsteps:\n  - {{id: s, tool: shell, with: {{run: 'if [ -e {dir}/second ]; then exit 0; fi; touch {dir}/second; sleep 60'}}}}\n"
        ))
        .await;
    let marker = sb.dir.path().join("second");
    eventually(Duration::from_secs(10), "the first attempt to run", || async {
        marker.exists().then_some(())
    })
    .await;
    sb.stop_agent("leaving").await;
    // Reported before the agent went: no lease had to run out (it is 10 minutes here).
    let run = get_run(&mut c, &id).await;
    let s = step(&run, "s");
    assert_eq!(s.attempts[0].state_name(), "lost", "{:#?}", s.attempts);
    assert!(s.attempts[0].error.contains("shutdown"), "{:#?}", s.attempts[0]);
    assert_eq!(s.state_name(), "ready");
    sb.add_agent("staying", 1);
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(step(&run, "s").attempts[1].agent_name, "staying");
}

/// The controller's count of heartbeats received.
async fn heartbeats(sb: &Sandbox) -> u64 {
    let (_, metrics) = http_get(sb.metrics_addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("baton_heartbeats_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no baton_heartbeats_total in {metrics}")) as u64
}

/// An agent that holds no work heartbeats at the idle interval, stays connected, and
/// takes work up again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_heartbeats_at_the_idle_interval_and_stays_connected() {
    let engine = fast_engine();
    let (every, idle) = (engine.heartbeat_interval, engine.idle_heartbeat());
    assert!(idle >= every * 3, "the test needs an idle interval well above the heartbeat's");
    let sb = Sandbox::builder().engine(engine).agents(1).build().await;
    let mut c = sb.client().await;
    let agent = || async {
        let mut c = sb.client().await;
        c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents.remove(0)
    };
    let before = agent().await;
    let h0 = heartbeats(&sb).await;
    // The window is the measurement: what an idle agent sends in 15 heartbeat intervals.
    let window = every * 15;
    tokio::time::sleep(window).await;
    let sent = heartbeats(&sb).await - h0;
    let most = (window.as_millis() / idle.as_millis()) as u64 + 2;
    assert!(sent <= most, "{sent} heartbeats in {window:?}, at most {most} at one per {idle:?}");
    assert!(sent >= 1, "an idle agent still heartbeats");
    let after = agent().await;
    assert_eq!(after.state_name(), "connected");
    assert_eq!(after.connected_at, before.connected_at, "the same session: no reconnect for lack of answers");
    // Work after the quiet spell runs, its lease renewed at the busy rate.
    let id = sb.submit("name: w\nsteps:\n  - {id: s, tool: sleep, with: {duration: 2s}}\n").await;
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded", "{run:#?}");
    assert_eq!(step(&run, "s").attempts.len(), 1, "not stopped for a lapsed lease");
}

on_both!(
    a_stopped_agent_reports_what_it_stopped_and_its_step_runs_elsewhere,
    retries_back_off_exponentially_then_succeed,
    fail_fast_codes_retry_on_and_budgets_end_retries,
    a_pending_retry_survives_a_controller_restart_and_fires_on_time,
    a_run_deadline_beats_retries_and_stops_running_tools,
    a_step_timeout_kills_the_whole_process_group,
    the_controller_times_out_an_attempt_whose_agent_is_silent_and_fences_its_late_result,
    a_frozen_agent_is_lost_its_step_reruns_elsewhere_and_its_late_reports_change_nothing,
    an_agent_cut_off_from_the_controller_stops_its_tools,
    an_assignment_never_started_is_lost_and_retried,
    a_start_lost_with_the_stream_is_recorded_when_the_attempt_is_adopted,
    without_cgroups_a_daemon_a_tool_leaves_ends_with_its_attempt_and_its_agent,
    a_re_sent_result_is_applied_once,
    quarantine_holds_a_run_until_release_gives_a_fresh_budget,
    on_failure_continue_runs_independent_branches_to_the_end,
    a_poison_step_that_keeps_killing_agents_quarantines_its_run,
    canceling_one_step_kills_it_skips_its_dependents_and_lets_the_rest_finish,
    oversized_requests_are_refused,
    a_controller_back_within_stop_after_adopts_what_its_agents_run,
    steps_without_an_eligible_agent_wait_and_say_why,
);
