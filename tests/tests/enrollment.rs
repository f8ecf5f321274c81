//! Agents enroll with join tokens and then act only as themselves: impersonation and
//! reports on another agent's attempts are refused, and a revoked agent is cut off.

use std::time::Duration;

use baton_tests::*;
use proto::agent_message::Msg;

fn hello(agent_id: &str, name: &str, tools: &[&str]) -> proto::Hello {
    proto::Hello {
        agent_id: agent_id.into(),
        name: name.into(),
        version: "test".into(),
        tools: tools.iter().map(|t| proto::Tool { name: t.to_string(), version: "1".into() }).collect(),
        slots: 1,
        ..Default::default()
    }
}

fn agent_id_of(sb: &Sandbox, name: &str) -> String {
    std::fs::read_to_string(sb.dir.path().join(name).join("agent-id")).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_with_a_join_token_keep_their_credential_and_run_steps() {
    let mut sb = Sandbox::builder().auth(AuthMode::Required).agents(2).build().await;
    let mut c = sb.client().await;
    let id = submit(&mut c, "name: e\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo ok'}}\n  - {id: b, needs: a, tool: noop}\n").await;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(30)).await.state_name(), "succeeded");
    // The credential is on the agent's disk for its user only, and only its hash in the
    // database.
    let path = sb.dir.path().join("agent-1").join("agent-credential");
    let credential = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(credential.starts_with("bag_"), "{credential}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let db = std::fs::read(sb.dir.path().join("baton.db")).unwrap();
    let secret = credential.rsplit('_').next().unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "the credential is not stored");
    // Restarted without a join token, the agent comes back with its credential.
    sb.stop_agent("agent-1").await;
    let mut cfg = sb.agent_config("agent-1", 2);
    cfg.join_token = None;
    sb.add_agent_with(cfg);
    sb.wait_agents(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_up_and_expired_join_tokens_are_refused_and_labels_come_from_the_token() {
    let sb = Sandbox::builder().auth(AuthMode::Required).agents(0).build().await;
    let once = sb.new_join_token(1, [("pool".to_string(), "gpu".to_string())].into()).await;
    let mut first = sb.agent_config("first", 1);
    first.join_token = Some(once.token.clone());
    first.labels = [("pool".to_string(), "cpu".to_string()), ("os".to_string(), "linux".to_string())].into();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(baton_agent::run(first, stop.clone()));
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let a = agents.iter().find(|a| a.name == "first").unwrap();
    assert_eq!(a.labels.get("pool").map(String::as_str), Some("gpu"), "the token's labels win");
    assert_eq!(a.labels.get("os").map(String::as_str), Some("linux"));

    let mut second = sb.agent_config("second", 1);
    second.join_token = Some(once.token.clone());
    let err = baton_agent::run(second, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("the join token {} is used up (1 of 1 uses)", once.id)),
        "{err}"
    );

    let mut admin = sb.admin_as(sb.admin_token.as_deref()).await;
    let short = admin
        .create_join_token(proto::CreateJoinTokenRequest {
            ttl: Some(baton_common::proto::duration(1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let wait = (ms(&short.expires_at) - baton_common::time::now_ms()).max(0) as u64 + 1;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut late = sb.agent_config("late", 1);
    late.join_token = Some(short.token);
    let err = baton_agent::run(late, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains(&format!("the join token {} expired at", short.id)), "{err}");

    // A join token is for enrolling only.
    let fresh = sb.new_join_token(5, Default::default()).await;
    let ch = sb.channel_as(Some(&fresh.token)).await;
    assert_eq!(call_raw(ch.clone(), "/baton.v1.AgentService/Connect").await, tonic::Code::PermissionDenied);
    assert_eq!(call_raw(ch, "/baton.v1.BatonService/ListRuns").await, tonic::Code::PermissionDenied);
    // A name enrolled already cannot be taken by another agent id.
    let taken = enroll(sb.channel_as(Some(&fresh.token)).await, "00000000-aaaa", "first").await.unwrap_err();
    assert!(taken.message().contains("an agent named \"first\" is enrolled already"), "{}", taken.message());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_pose_as_another_nor_report_on_its_attempts() {
    let sb = Sandbox::builder().auth(AuthMode::Required).agents(1).slots(1).build().await;
    let a_id = agent_id_of(&sb, "agent-1");
    let join = sb.new_join_token(1, Default::default()).await;
    let b_id = "0b0b0b0b-0000-4000-8000-00000000000b";
    let b_cred = enroll(sb.channel_as(Some(&join.token)).await, b_id, "intruder").await.unwrap();

    // Without a credential, or with a user's token, the agent protocol is closed.
    let refused =
        AgentSession::open(sb.channel_as(None).await, hello("x", "x", &["shell"])).await.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let reader = sb.token("r", Role::Reader).await;
    let refused = AgentSession::open(sb.channel_as(Some(&reader)).await, hello("x", "x", &["shell"]))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // B's credential cannot connect under A's id, nor under A's name.
    for h in [
        hello(&a_id, "agent-1", &["shell"]),
        hello(&a_id, "intruder", &["shell"]),
        hello(b_id, "agent-1", &["shell"]),
    ] {
        let e = AgentSession::open(sb.channel_as(Some(&b_cred)).await, h).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    }

    // A runs a step; B, connected as itself (and offering no tools), tries to report
    // on it with A's lease token.
    let mut c = sb.client().await;
    let out = sb.dir.path().join("result");
    let spec = format!(
        "name: w\nsteps:\n  - {{id: work, tool: shell, with: {{run: 'while [ ! -e {f}.go ]; do sleep 0.05; done; echo genuine; echo \"{{\\\"by\\\": \\\"a\\\"}}\"'}}}}\n",
        f = out.display()
    );
    let id = submit(&mut c, &spec).await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "attempt_started").await;
    let store = baton_controller::store::Store::open(&sb.db).await.unwrap();
    let attempt = store.get_run(&id).await.unwrap().attempts.remove(0);
    store.close().await;
    assert_eq!(attempt.agent_id, a_id);
    let stolen = proto::AttemptRef {
        attempt_id: attempt.id.clone(),
        lease_token: attempt.lease_token.clone(),
        run_id: id.clone(),
        step_id: "work".into(),
    };
    let mut claim = hello(b_id, "intruder", &[]);
    claim.running = vec![stolen.clone()];
    let b = AgentSession::open(sb.channel_as(Some(&b_cred)).await, claim).await.unwrap();
    assert_eq!(b.welcome.abandon, vec![attempt.id.clone()], "B may not adopt A's attempt");
    assert!(b.welcome.adopted.is_empty());
    b.send(Msg::Started(proto::AttemptStarted { attempt: Some(stolen.clone()), pid: 1 })).await;
    b.send(Msg::Output(proto::AttemptOutput {
        attempt: Some(stolen.clone()),
        offset: 0,
        data: b"forged\n".to_vec(),
    }))
    .await;
    for outcome in [proto::Outcome::Succeeded, proto::Outcome::Canceled] {
        b.send(Msg::Finished(proto::AttemptFinished {
            attempt: Some(stolen.clone()),
            outcome: outcome as i32,
            failure_class: if outcome == proto::Outcome::Canceled {
                proto::FailureClass::Canceled as i32
            } else {
                0
            },
            exit_code: Some(0),
            result: Some(baton_common::proto::value(serde_json::json!({"by": "b"}))),
            ..Default::default()
        }))
        .await;
    }
    let rejected = |e: &proto::RunEvent| e.kind == "report_rejected" && e.message.contains("agent intruder");
    // Five rejections: the running attempt B claimed, its start, output and two results.
    let mut seen = 0;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| {
        seen += usize::from(rejected(e));
        seen == 5
    })
    .await;
    let run = get_run(&mut c, &id).await;
    assert_eq!(run.steps[0].state_name(), "running", "B's reports changed nothing");
    // Nor may B store artifacts for A's attempt, or fetch inputs under its lease.
    let mut files = proto::agent_service_client::AgentServiceClient::new(sb.channel_as(Some(&b_cred)).await);
    let header = proto::ArtifactHeader { attempt: Some(stolen.clone()), path: "forged.txt".into(), size: 1 };
    let parts = vec![
        proto::ArtifactUpload { part: Some(proto::artifact_upload::Part::Header(header)) },
        proto::ArtifactUpload { part: Some(proto::artifact_upload::Part::Data(b"x".to_vec())) },
    ];
    let e = files.upload_artifact(tokio_stream::iter(parts)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("it runs on agent agent-1"), "{}", e.message());
    let fetch = proto::FetchInputsRequest {
        attempt: Some(stolen.clone()),
        from_step: "work".into(),
        patterns: vec!["*".into()],
    };
    let e = files.fetch_inputs(fetch).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    // A finishes for real, and its result is the one accepted.
    std::fs::write(format!("{}.go", out.display()), "\n").unwrap();
    let run = wait_run(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(run.state_name(), "succeeded");
    assert_eq!(result_text(&run.steps[0].result), "{\"by\":\"a\"}");
    assert_eq!(run.steps[0].attempts.len(), 1);
    assert_eq!(run.steps[0].attempts[0].agent_name, "agent-1");
    let text = log_text(&logs(&mut c, &id, "work", 0, false).await);
    assert_eq!(text, "genuine\n{\"by\": \"a\"}\n", "B's output was not kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_at_once_and_refused_afterwards() {
    let mut sb = Sandbox::builder().auth(AuthMode::Required).agents(1).build().await;
    let agent = sb.agent_config("doomed", 1);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(baton_agent::run(agent, stop.clone()));
    sb.wait_agents(2).await;
    let mut c = sb.client().await;
    let mut admin = sb.admin_as(sb.admin_token.as_deref()).await;
    let started = std::time::Instant::now();
    let r =
        admin.revoke_agent(proto::RevokeAgentRequest { agent: "doomed".into() }).await.unwrap().into_inner();
    assert_eq!(r.closed, 1, "its open session was closed by the call");
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let doomed = agents.iter().find(|a| a.name == "doomed").unwrap();
    assert_ne!(doomed.state_name(), "connected", "no longer connected once the call returned");
    // The agent hears of it, tries again, is refused and stops.
    let err = tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap_err();
    eprintln!("revoked agent stopped {:?} after the revoke call", started.elapsed());
    assert!(err.to_string().contains("agent doomed was revoked at"), "{err}");
    // With its credential file it stays refused.
    let again = baton_agent::run(sb.agent_config("doomed", 1), tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(again.to_string().contains("was revoked"), "{again}");
    // The machine comes back under a new name: same agent id (its work dir), a fresh
    // enrollment. The credential proves the id, so the old name does not hold it.
    std::fs::remove_file(sb.dir.path().join("doomed").join("agent-credential")).unwrap();
    let mut reborn = sb.agent_config("doomed", 1);
    reborn.name = "reborn".into();
    reborn.join_token = Some(sb.new_join_token(1, Default::default()).await.token);
    sb.add_agent_with(reborn);
    eventually(Duration::from_secs(20), "the re-enrolled agent to connect", || {
        let mut c = c.clone();
        async move {
            let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.name == "reborn" && a.state_name() == "connected").then_some(())
        }
    })
    .await;
    // The other agent is untouched and work goes on.
    let id = submit(&mut c, "name: w\nsteps:\n  - {id: a, tool: noop}\n").await;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(20)).await.state_name(), "succeeded");
    sb.stop_agent("agent-1").await;
}
