//! TLS on the API port end to end: runs over mutual TLS, plaintext and strangers
//! refused, roles carried by client certificates, and certificates reloaded on SIGHUP
//! without dropping the streams that are up.

use std::path::Path;
use std::time::Duration;

use baton_common::certs::{self, Kind};
use baton_common::connect::ClientTls;
use baton_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_goes_end_to_end_over_mutual_tls() {
    let sb = Sandbox::builder().tls().agents(2).build().await;
    assert!(sb.url().starts_with("https://"));
    let mut c = sb.client().await;
    let id = submit(&mut c, "name: t\nsteps:\n  - {id: a, tool: shell, with: {run: 'echo hi'}}\n  - {id: b, needs: a, tool: noop}\n").await;
    let run = wait_run(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(run.state_name(), "succeeded");
    let agents = c.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.iter().filter(|a| a.state_name() == "connected").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_clients_of_another_ca_are_refused() {
    let sb = Sandbox::builder().tls().agents(0).build().await;
    let token = sb.admin_token.clone();
    // Plaintext to the TLS port: no call gets through.
    let plain = format!("http://{}", sb.addr);
    let endpoint = baton_common::connect::endpoint(&plain, &ClientTls::default()).unwrap();
    let call = async {
        let ch = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut c = proto::baton_service_client::BatonServiceClient::new(ch);
        c.list_runs(proto::ListRunsRequest::default()).await.map_err(|e| e.to_string())
    };
    assert!(call.await.is_err(), "a plaintext call was answered");

    // A client that trusts another CA does not accept the controller.
    let other = sb.dir.path().join("other-ca");
    certs::create_ca(&other).unwrap();
    let stranger = ClientTls { ca: Some(other.join("ca.pem")), ..Default::default() };
    let endpoint = baton_common::connect::endpoint(&sb.url(), &stranger).unwrap();
    let err = endpoint.connect().await.expect_err("a client of another CA connected");
    let chain = baton_common::connect::error_chain(&err);
    assert!(chain.contains("certificate") || chain.contains("UnknownIssuer"), "{chain}");

    // A client certificate of another CA is refused by the controller (it trusts the
    // controller, but the controller does not trust it).
    let (cert, key) = certs::issue(&other, Kind::Client(Role::Admin), "mallory", &[]).unwrap();
    let mallory = ClientTls { ca: sb.client_tls.ca.clone(), cert: Some(cert), key: Some(key) };
    let endpoint = baton_common::connect::endpoint(&sb.url(), &mallory).unwrap();
    let refused = async {
        let ch = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut c = proto::admin_service_client::AdminServiceClient::new(ch);
        c.who_am_i(proto::WhoAmIRequest {}).await.map_err(|e| e.to_string())
    };
    assert!(refused.await.is_err(), "a certificate of another CA was accepted");

    // The sandbox's own client still works.
    let mut c = sb.client_as(token.as_deref()).await;
    c.list_runs(proto::ListRunsRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_carries_its_role() {
    let sb = Sandbox::builder().tls().agents(0).build().await;
    let dir = sb.certs.clone().unwrap();
    let (cert, key) = certs::issue(&dir, Kind::Client(Role::Operator), "alice", &[]).unwrap();
    let alice = ClientTls { ca: sb.client_tls.ca.clone(), cert: Some(cert), key: Some(key) };
    let ch = channel_as(&sb.url(), &alice, None).await;
    let me = proto::admin_service_client::AdminServiceClient::new(ch.clone())
        .who_am_i(proto::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((me.name.as_str(), me.role.as_str(), me.via.as_str()), ("alice", "operator", "certificate"));
    assert_ne!(
        call_raw(ch.clone(), "/baton.v1.BatonService/DrainAgent").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        call_raw(ch.clone(), "/baton.v1.AdminService/CreateToken").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(call_raw(ch, "/baton.v1.AgentService/Connect").await, tonic::Code::PermissionDenied);

    // What alice does is recorded as hers.
    let mut c = connect_as(&sb.url(), &alice, None).await;
    let id = submit(&mut c, "name: w\nsteps:\n  - {id: a, tool: noop}\n").await;
    c.cancel_run(proto::CancelRunRequest { run_id: id.clone(), ..Default::default() }).await.unwrap();
    let events = all_events(&mut c, &id).await;
    assert!(events.iter().any(|e| e.kind == "run_canceled" && e.actor == "certificate alice"));

    // A controller's certificate is not a caller's.
    let ctl = ClientTls {
        ca: sb.client_tls.ca.clone(),
        cert: Some(dir.join("controller.pem")),
        key: Some(dir.join("controller-key.pem")),
    };
    let code = call_raw(channel_as(&sb.url(), &ctl, None).await, "/baton.v1.BatonService/ListRuns").await;
    assert_eq!(code, tonic::Code::Unauthenticated);
}

/// Copies a certificate and key over the files a controller serves.
fn install(from: &Path, name: &str, cert: &Path, key: &Path) {
    std::fs::copy(from.join(format!("{name}.pem")), cert).unwrap();
    std::fs::copy(from.join(format!("{name}-key.pem")), key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_the_streams_that_are_up() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (dir.path().join("old"), dir.path().join("new"));
    let hosts = ["127.0.0.1".to_string()];
    for ca in [&old_ca, &new_ca] {
        certs::create_ca(ca).unwrap();
        certs::issue(ca, Kind::Controller, "controller", &hosts).unwrap();
    }
    let (cert, key) = (dir.path().join("served.pem"), dir.path().join("served-key.pem"));
    install(&old_ca, "controller", &cert, &key);
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let admin = bootstrap(&db).await;
    let addr = free_addr();
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--db",
        &db,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-client-ca",
        old_ca.join("ca.pem").to_str().unwrap(),
        "--heartbeat-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let controller = Process::spawn("baton-controller", &args, dir.path().join("controller.log"), &[]);
    let url = format!("https://{addr}");
    let old = ClientTls { ca: Some(old_ca.join("ca.pem")), ..Default::default() };
    let new = ClientTls { ca: Some(new_ca.join("ca.pem")), ..Default::default() };
    wait_leader_with(&url, &old, Some(&admin)).await;

    // An agent (certificate of the old CA) and a watch, both up before the reload.
    let (acert, akey) = certs::issue(&old_ca, Kind::Agent, "steady", &[]).unwrap();
    let mut acfg = baton_agent::Config::new(url.clone(), "steady", dir.path().join("steady"));
    acfg.tls = ClientTls { ca: old.ca.clone(), cert: Some(acert), key: Some(akey) };
    acfg.reconnect_min = Duration::from_millis(20);
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(baton_agent::run(acfg, stop.clone()));
    let mut c = connect_as(&url, &old, Some(&admin)).await;
    let connected_at = eventually(Duration::from_secs(20), "the agent to connect", || {
        let mut c = c.clone();
        async move {
            let agents = c.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents
                .iter()
                .find(|a| a.name == "steady" && a.state_name() == "connected")
                .map(|a| ms(&a.connected_at))
        }
    })
    .await;
    let id = submit(&mut c, "name: w\nsteps:\n  - {id: slow, tool: sleep, with: {duration: 1500ms}}\n  - {id: after, needs: slow, tool: noop}\n").await;
    let mut watch = c
        .watch_run(proto::WatchRunRequest { run_id: id.clone(), from_seq: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = watch.message().await.unwrap().expect("event");
        if ev.kind == "attempt_started" {
            break;
        }
    }

    // The new certificate is served after SIGHUP: a client that trusts only the new CA
    // gets in, one that trusts only the old CA no longer does.
    install(&new_ca, "controller", &cert, &key);
    controller.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the new certificate to be served", || {
        let (url, new) = (url.clone(), new.clone());
        async move { baton_common::connect::endpoint(&url, &new).ok()?.connect().await.ok() }
    })
    .await;
    let stale = baton_common::connect::endpoint(&url, &old).unwrap().connect().await;
    assert!(stale.is_err(), "a client of the old CA still connects");

    // The watch opened before the reload sees the run to its end, and the agent kept
    // its session.
    let mut last = String::new();
    while let Some(ev) = watch.message().await.expect("the watch survived the reload") {
        last = format!("{} {}", ev.kind, ev.run_state_name());
    }
    assert_eq!(last, "run_succeeded succeeded");
    let mut c2 = connect_as(&url, &new, Some(&admin)).await;
    let agents = c2.list_agents(proto::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let steady = agents.iter().find(|a| a.name == "steady").unwrap();
    assert_eq!((steady.state_name(), ms(&steady.connected_at)), ("connected", connected_at), "same session");
    assert!(controller.logs().contains("TLS certificate and key reloaded"), "{}", controller.logs());

    // A bad file is refused and the certificate in force kept.
    std::fs::write(&cert, "not a certificate").unwrap();
    controller.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the refusal to be logged", || {
        let logs = controller.logs();
        async move { logs.contains("TLS files refused").then_some(()) }
    })
    .await;
    baton_common::connect::endpoint(&url, &new).unwrap().connect().await.expect("still served");
    stop.cancel();
    let _ = agent.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_is_good_for_its_own_name_and_no_other_agents_id() {
    let sb = Sandbox::builder().tls().agents(1).build().await;
    let dir = sb.certs.clone().unwrap();
    let victim =
        std::fs::read_to_string(sb.dir.path().join("agent-1").join("agent-id")).unwrap().trim().to_string();
    let (cert, key) = certs::issue(&dir, Kind::Agent, "mallet", &[]).unwrap();
    let mallet = ClientTls { ca: sb.client_tls.ca.clone(), cert: Some(cert), key: Some(key) };
    let hello = |id: &str, name: &str| proto::Hello {
        agent_id: id.into(),
        name: name.into(),
        slots: 1,
        tools: vec![proto::Tool { name: "shell".into(), version: "1".into() }],
        ..Default::default()
    };
    for (id, name) in [(victim.as_str(), "mallet"), ("0c0c0c0c-2222", "agent-1")] {
        let e = AgentSession::open(channel_as(&sb.url(), &mallet, None).await, hello(id, name))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{id} {name}: {}", e.message());
    }
    let ok = AgentSession::open(channel_as(&sb.url(), &mallet, None).await, hello("0c0c0c0c-2222", "mallet"))
        .await;
    assert!(ok.is_ok(), "as itself it may connect");
    // A revoked agent certificate is refused.
    let mut admin = sb.admin_as(sb.admin_token.as_deref()).await;
    admin.revoke_agent(proto::RevokeAgentRequest { agent: "mallet".into() }).await.unwrap();
    let e = AgentSession::open(channel_as(&sb.url(), &mallet, None).await, hello("0c0c0c0c-2222", "mallet"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("agent mallet was revoked"), "{}", e.message());
}
