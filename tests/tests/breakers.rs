//! Circuit breakers end to end: an agent whose tool keeps failing is skipped, steps
//! wait (not fail) while every candidate is open, probes close a breaker again, state
//! survives a restart, operators reset, and a wait past `max_wait` quarantines.

use std::time::Duration;

use baton_controller::engine::BreakerConfig;
use baton_tests::on_both;
use baton_tests::*;

fn engine_with(breakers: &str) -> baton_controller::EngineConfig {
    let mut e = fast_engine();
    e.breakers = BreakerConfig::from_json(breakers).unwrap();
    e
}

async fn breakers(c: &mut Client) -> Vec<proto::Breaker> {
    c.list_breakers(proto::ListBreakersRequest {}).await.unwrap().into_inner().breakers
}

async fn an_agent_whose_tool_keeps_failing_is_skipped_and_its_breaker_persists(backend: Backend) {
    let cfg = r#"{"tool": {"failure_rate": 0},
                  "agent": {"consecutive_failures": 2, "cooldown_ms": 600000},
                  "tools": {"shell": {"count": ["nonzero_exit", "tool_error", "timeout"]}}}"#;
    let mut sb =
        Sandbox::builder().backend(backend).agents(2).slots(1).engine(engine_with(cfg)).build().await;
    let mut c = sb.client().await;
    let mut spec = String::from(
        "name: b\ndefaults:\n  retry: {max_attempts: 5, backoff: {initial: 50ms, jitter: 0}}\nsteps:\n",
    );
    for i in 0..6 {
        // Fails on agent-1 only (its attempts run under its work dir).
        spec.push_str(&format!(
            "  - {{id: s{i}, tool: shell, with: {{run: 'case \"$PWD\" in */agent-1/*) exit 1;; esac'}}}}\n"
        ));
    }
    let id = sb.submit(&spec).await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded", "steps retried on the healthy agent");
    let on_bad: Vec<&proto::Attempt> =
        run.steps.iter().flat_map(|s| &s.attempts).filter(|a| a.agent_name == "agent-1").collect();
    assert_eq!(on_bad.len(), 2, "no attempt went to agent-1 after its second failure");
    assert!(on_bad.iter().all(|a| a.state_name() == "failed"));
    let events = all_events(&mut c, &id).await;
    let opened = events.iter().find(|e| e.kind == "breaker_opened").expect("breaker_opened event");
    assert_eq!(opened.message, "breaker of tool shell on agent agent-1 open after a nonzero_exit failure");

    let list = breakers(&mut c).await;
    let state = |list: &[proto::Breaker], agent: &str| {
        list.iter().find(|b| b.tool == "shell" && b.agent_name == agent).map(|b| b.state_name().to_string())
    };
    assert_eq!(state(&list, "agent-1").as_deref(), Some("open"));
    assert_eq!(state(&list, "agent-2").as_deref(), Some("closed"));
    assert_eq!(state(&list, "").as_deref(), Some("closed"), "the tool as a whole is fine");

    // Persisted: a restarted controller still keeps agent-1 out.
    sb.restart_controller().await;
    let mut c = sb.client().await;
    assert_eq!(state(&breakers(&mut c).await, "agent-1").as_deref(), Some("open"));

    // An operator closes it.
    let req = proto::ResetBreakerRequest { tool: "shell".into(), agent: "agent-1".into() };
    let list = c.reset_breaker(req).await.unwrap().into_inner().breakers;
    assert_eq!(state(&list, "agent-1").as_deref(), Some("closed"));
    let err = c
        .reset_breaker(proto::ResetBreakerRequest { tool: "shell".into(), agent: "nobody".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("no agent named \"nobody\""), "{}", err.message());
    let err = c
        .reset_breaker(proto::ResetBreakerRequest { tool: "nothing".into(), agent: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err =
        c.drain_agent(proto::DrainAgentRequest { agent: "nobody".into(), undo: false }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

async fn steps_wait_while_breakers_are_open_and_a_probe_closes_them(backend: Backend) {
    let cfg = r#"{"agent": {"consecutive_failures": 1, "cooldown_ms": 1000},
                  "tools": {"shell": {"count": ["nonzero_exit"]}}}"#;
    let sb = Sandbox::builder().backend(backend).agents(1).slots(1).engine(engine_with(cfg)).build().await;
    let mut c = sb.client().await;
    let counter = sb.dir.path().join("count");
    let spec = format!(
        "name: w\nsteps:\n  - id: x\n    tool: shell\n    with: {{run: 'c=$(cat {f} 2>/dev/null || echo 0); c=$((c+1)); echo $c > {f}; test $c -gt 1'}}\n    retry: {{max_attempts: 3, backoff: {{initial: 50ms, jitter: 0}}}}\n",
        f = counter.display()
    );
    let id = sb.submit(&spec).await;
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "breaker_opened").await;
    // The retry is due at once, but the only agent is shut out: the step waits, and
    // says why.
    wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "step_ready" && e.step_id == "x").await;
    let run = get_run(&mut c, &id).await;
    let x = step(&run, "x");
    assert_eq!(x.state_name(), "ready");
    assert_eq!(x.reason, "waiting: the breakers of tool shell are open on every agent that has it (agent-1)");
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    let kinds: Vec<String> = all_events(&mut c, &id)
        .await
        .into_iter()
        .filter(|e| e.kind.starts_with("breaker_"))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["breaker_opened", "breaker_half_open", "breaker_closed"]);
    let x = step(&run, "x");
    assert!(
        ms(&x.attempts[1].assigned_at) - ms(&x.attempts[0].finished_at) >= 1000,
        "the probe waited for the cooldown"
    );
}

async fn waiting_on_open_breakers_past_max_wait_quarantines_the_run(backend: Backend) {
    let cfg = r#"{"agent": {"consecutive_failures": 1, "cooldown_ms": 600000},
                  "tools": {"shell": {"count": ["nonzero_exit"]}}}"#;
    let sb = Sandbox::builder().backend(backend).agents(1).slots(1).engine(engine_with(cfg)).build().await;
    let mut c = sb.client().await;
    let id = sb
        .submit(
            "name: m\nsteps:\n  - {id: y, tool: shell, with: {run: 'exit 1'}, max_wait: 500ms, retry: {max_attempts: 3, backoff: {initial: 10ms}}}\n",
        )
        .await;
    let ev = wait_event(&mut c, &id, Duration::from_secs(10), |e| e.kind == "run_quarantined").await;
    assert_eq!(
        ev.message,
        "step \"y\" waited 500ms (max_wait) for an agent: the breakers of tool shell are open on every agent that has it (agent-1)"
    );
    let run = get_run(&mut c, &id).await;
    assert_eq!(run.state_name(), "quarantined");
    assert_eq!(step(&run, "y").attempts.len(), 1, "it waited; it did not burn its retries");
}

on_both!(
    an_agent_whose_tool_keeps_failing_is_skipped_and_its_breaker_persists,
    steps_wait_while_breakers_are_open_and_a_probe_closes_them,
    waiting_on_open_breakers_past_max_wait_quarantines_the_run,
);
