//! Authentication and authorization end to end: every RPC against every role, token
//! revocation and expiry, and who did what in events and reports.

use std::time::Duration;

use baton_common::connect::ClientTls;
use baton_controller::auth::table::{Need, RPCS};
use baton_tests::*;

/// A credential of the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cred {
    User(Role),
    Agent,
    Join,
}

/// Every RPC of the table, called with no credential, with a token of each user role,
/// an enrolled agent's credential and a join token: allowed exactly when the table says
/// so, PERMISSION_DENIED otherwise, and UNAUTHENTICATED without a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_make_exactly_the_calls_the_table_gives_it() {
    let sb = Sandbox::builder().agents(0).auth(AuthMode::Required).build().await;
    let mut creds = Vec::new();
    for role in [Role::Reader, Role::Submitter, Role::Operator, Role::Admin] {
        creds.push((Cred::User(role), sb.token(&format!("t-{role}"), role).await));
    }
    let join = sb.new_join_token(100, Default::default()).await.token;
    let agent = enroll(sb.channel_as(Some(&join)).await, "0a0a0a0a-1111", "matrix").await.unwrap();
    creds.push((Cred::Agent, agent));
    creds.push((Cred::Join, join));
    let mut checked = 0;
    for (service, method, need) in RPCS {
        let path = format!("{service}{method}");
        let anonymous = call_raw(channel_as(&sb.url(), &ClientTls::default(), None).await, &path).await;
        match need {
            Need::Public => assert!(!denied(anonymous), "{path} without a credential: {anonymous:?}"),
            _ => assert_eq!(anonymous, tonic::Code::Unauthenticated, "{path} without a credential"),
        }
        for (cred, token) in &creds {
            let code = call_raw(channel_as(&sb.url(), &ClientTls::default(), Some(token)).await, &path).await;
            let allowed = match (need, cred) {
                (Need::Public | Need::Authenticated, _) => true,
                (Need::Role(r), Cred::User(have)) => have.includes(*r),
                (Need::Role(r), Cred::Agent) => *r == Role::Agent,
                (Need::Role(_), Cred::Join) => false,
                (Need::JoinToken, c) => *c == Cred::Join,
            };
            if allowed {
                assert!(!denied(code), "{cred:?} calling {path} was refused: {code:?}");
            } else {
                assert_eq!(code, tonic::Code::PermissionDenied, "{cred:?} calling {path}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, RPCS.len() * 6);
    // A garbage token is not a credential.
    let code = call_raw(
        channel_as(&sb.url(), &ClientTls::default(), Some("btk_00_11")).await,
        "/baton.v1.BatonService/ListRuns",
    )
    .await;
    assert_eq!(code, tonic::Code::Unauthenticated);
}

fn denied(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_fails_on_its_next_call_and_an_expired_one_soon_after_it_expires() {
    let sb = Sandbox::builder().agents(0).auth(AuthMode::Required).build().await;
    let token = sb.token("ci", Role::Reader).await;
    let mut c = sb.client_as(Some(&token)).await;
    c.list_runs(proto::ListRunsRequest::default()).await.expect("a fresh token works");
    let mut admin = sb.admin_as(sb.admin_token.as_deref()).await;
    let revoked =
        admin.revoke_token(proto::RevokeTokenRequest { token: "ci".into() }).await.unwrap().into_inner();
    assert!(revoked.revoked_at.is_some());
    let err = c.list_runs(proto::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("token \"ci\" was revoked"), "{}", err.message());
    // The list shows it revoked; a second revoke finds nothing to revoke.
    let all = admin.list_tokens(proto::ListTokensRequest { all: true }).await.unwrap().into_inner().tokens;
    assert!(all.iter().any(|t| t.name == "ci" && ms(&t.revoked_at) > 0));
    let active =
        admin.list_tokens(proto::ListTokensRequest { all: false }).await.unwrap().into_inner().tokens;
    assert!(active.iter().all(|t| t.name != "ci"));
    let again = admin.revoke_token(proto::RevokeTokenRequest { token: "ci".into() }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);

    // A token that expires: works, then is refused once expired. Answers are cached for
    // at most a second, so a second after it expires no call gets through.
    let short = admin
        .create_token(proto::CreateTokenRequest {
            name: "short".into(),
            role: "reader".into(),
            ttl: Some(baton_common::proto::duration(4000)),
        })
        .await
        .unwrap()
        .into_inner();
    let expires = ms(&short.info.unwrap().expires_at);
    let mut c = sb.client_as(Some(&short.token)).await;
    c.list_runs(proto::ListRunsRequest::default()).await.expect("works before it expires");
    let wait = (expires + 1000 - baton_common::time::now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let err = c.list_runs(proto::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("token \"short\" expired at"), "{}", err.message());

    // Names of active tokens are unique; roles are checked.
    let dup = admin
        .create_token(proto::CreateTokenRequest { name: "t".into(), role: "reader".into(), ttl: None })
        .await;
    assert!(dup.is_ok());
    let dup = admin
        .create_token(proto::CreateTokenRequest { name: "t".into(), role: "admin".into(), ttl: None })
        .await
        .unwrap_err();
    assert!(dup.message().contains("a token named \"t\" exists"), "{}", dup.message());
    let bad = admin
        .create_token(proto::CreateTokenRequest { name: "x".into(), role: "agent".into(), ttl: None })
        .await
        .unwrap_err();
    assert!(bad.message().contains("cannot have role agent"), "{}", bad.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_released_a_quarantined_run_is_in_its_events() {
    let sb = Sandbox::builder().agents(1).auth(AuthMode::Required).build().await;
    let submitter = sb.token("ci-bot", Role::Submitter).await;
    let operator = sb.token("ops", Role::Operator).await;
    let mut c = sb.client_as(Some(&submitter)).await;
    let id = submit(&mut c, "name: q\non_failure: quarantine\nsteps:\n  - {id: a, tool: fail}\n").await;
    wait_event(&mut c, &id, Duration::from_secs(20), |e| e.kind == "run_quarantined").await;
    let err = c
        .release_run(proto::ReleaseRunRequest { run_id: id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "a submitter may not release");
    let mut ops = sb.client_as(Some(&operator)).await;
    ops.release_run(proto::ReleaseRunRequest { run_id: id.clone(), ..Default::default() }).await.unwrap();
    let released = wait_event(&mut ops, &id, Duration::from_secs(20), |e| e.kind == "run_released").await;
    assert_eq!(released.actor, "token ops");
    // The controller's own decisions name no actor.
    let quarantined =
        wait_event(&mut ops, &id, Duration::from_secs(20), |e| e.kind == "run_quarantined").await;
    assert_eq!(quarantined.actor, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_submitted_and_canceled_is_in_the_events_and_the_report() {
    let sb = Sandbox::builder().agents(0).auth(AuthMode::Required).build().await;
    let submitter = sb.token("ci-bot", Role::Submitter).await;
    let operator = sb.token("ops", Role::Operator).await;
    let mut c = sb.client_as(Some(&submitter)).await;
    // No agent: the step waits, so the run can be canceled.
    let id = submit(&mut c, "name: w\nsteps:\n  - {id: a, tool: noop}\n").await;
    let err =
        c.cancel_run(proto::CancelRunRequest { run_id: id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "a submitter may not cancel");
    let mut ops = sb.client_as(Some(&operator)).await;
    ops.cancel_run(proto::CancelRunRequest {
        run_id: id.clone(),
        reason: "not today".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let events = all_events(&mut ops, &id).await;
    let submitted = events.iter().find(|e| e.kind == "run_submitted").unwrap();
    assert_eq!(submitted.actor, "token ci-bot");
    let canceled = events.iter().find(|e| e.kind == "run_canceled").unwrap();
    assert_eq!(canceled.actor, "token ops");
    let report = ops
        .get_report(proto::GetReportRequest { run_id: id.clone(), format: proto::ReportFormat::Json as i32 })
        .await
        .unwrap()
        .into_inner()
        .content;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["run"]["submitted_by"], "token ci-bot");
    let actions: Vec<String> = report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["actor"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions.contains(&"token ci-bot".to_string()) && actions.contains(&"token ops".to_string()),
        "{actions:?}"
    );
    let md = ops
        .get_report(proto::GetReportRequest { run_id: id, format: proto::ReportFormat::Markdown as i32 })
        .await
        .unwrap()
        .into_inner()
        .content;
    assert!(md.contains("by token ci-bot"), "{md}");
    assert!(md.contains("(by token ops)"), "{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_routed_to_a_pool_that_does_not_allow_its_tool_is_refused_at_submit() {
    let router = r#"{"rules": [
        {"match": {"kind": "compute"}, "tool": "python", "labels": {"pool": "py"}},
        {"match": {"kind": "script"}, "tool": "shell", "labels": {"pool": "py"}}
    ]}"#;
    let mut sb = Sandbox::builder().agents(0).router(router).build().await;
    let mut cfg = sb.agent_config("py-1", 1);
    cfg.labels = [("pool".to_string(), "py".to_string())].into();
    cfg.disable_tools = vec!["shell".into(), "aider".into()];
    sb.add_agent_with(cfg);
    sb.wait_agents(1).await;
    let mut c = sb.client().await;
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert!(agents[0].tools.iter().all(|t| t.name != "shell" && t.name != "aider"), "switched off");
    let err = c
        .submit_run(proto::SubmitRunRequest {
            spec: "name: p\nsteps:\n  - {id: fine, kind: compute, with: {script: 'result = 1'}}\n  - {id: sh, kind: script, with: {run: 'id'}}\n".into(),
            source: "p.yaml".into(),
            params: Default::default(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains(
            "step \"sh\": tool shell is not allowed in pool label pool=py: its agents (py-1) allow only"
        ),
        "{}",
        err.message()
    );
    let runs = c.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    assert!(runs.is_empty(), "nothing was stored, nothing dispatched");
    let id = submit(&mut c, "name: p\nsteps:\n  - {id: fine, kind: compute, with: {script: 'result = 1'}}\n")
        .await;
    assert_eq!(wait_run(&mut c, &id, Duration::from_secs(20)).await.state_name(), "succeeded");
}

/// GET over plain HTTP with an optional bearer token: the status.
async fn http_status(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_readers_token_when_authentication_is_on_and_probes_do_not() {
    let sb = Sandbox::builder().agents(0).auth(AuthMode::Required).build().await;
    let addr = sb.metrics_addr;
    eventually(Duration::from_secs(10), "the metrics listener", || async move {
        (http_status(addr, "/healthz", None).await == 200).then_some(())
    })
    .await;
    assert_eq!(http_status(addr, "/metrics", None).await, 401);
    assert_eq!(http_status(addr, "/metrics", Some("btk_00_11")).await, 401);
    let reader = sb.token("prometheus", Role::Reader).await;
    assert_eq!(http_status(addr, "/metrics", Some(&reader)).await, 200);
    assert_eq!(http_status(addr, "/readyz", None).await, 200);
}
