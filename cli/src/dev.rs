//! `baton dev`: a controller on SQLite and local agents in this process, running one
//! workstream and exiting like `submit --watch`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use baton_common::pb;
use tokio_util::sync::CancellationToken;

use crate::output::Format;
use crate::{Failure, client, read_spec, watch};

pub async fn run(
    file: &Path,
    agents: u32,
    slots: u32,
    db: Option<PathBuf>,
    router: Option<PathBuf>,
    params: BTreeMap<String, String>,
    format: Format,
) -> Result<u8, Failure> {
    if agents == 0 || slots == 0 {
        return Err(Failure::Invalid("--agents and --slots must be at least 1".into()));
    }
    let _ = baton_common::process::init_tracing("text", "warn");
    // Validate before starting anything, with the same messages as `baton validate`.
    let (source, text) = read_spec(file)?;
    baton_common::spec::parse(&source, &text).map_err(|e| Failure::Invalid(e.to_string()))?;

    let tmp = tempfile::Builder::new()
        .prefix("baton-dev-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let db_path = db.unwrap_or_else(|| tmp.path().join("baton.db"));
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot listen on 127.0.0.1")?;
    let addr = listener.local_addr().context("no local address")?;
    let url = format!("http://{addr}");
    let http = std::net::TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
    http.set_nonblocking(true).context("cannot listen on 127.0.0.1")?;
    let dashboard = format!("http://{}", http.local_addr().context("no local address")?);
    let shutdown = CancellationToken::new();
    let config = baton_controller::Config {
        router,
        reload_on_sighup: false,
        metrics: None,
        http: Some(http),
        lease: Duration::from_secs(5),
        advertise: None,
        auth: baton_controller::auth::AuthMode::Off,
        tls: None,
        secrets_key: None,
        retention: Default::default(),
        otlp: None,
        artifacts: None,
        artifact_max_bytes: baton_controller::artifacts::DEFAULT_MAX_BYTES,
        db: format!("sqlite://{}", db_path.display()),
        engine: baton_controller::EngineConfig {
            heartbeat_interval: Duration::from_millis(500),
            stop_after: Duration::from_secs(3),
            lost_after: Duration::from_secs(5),
            failover_grace: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            ..Default::default()
        },
    };
    let controller = tokio::spawn(baton_controller::run(listener, config, shutdown.clone()));
    let mut tasks = Vec::new();
    for i in 1..=agents {
        let mut cfg =
            baton_agent::Config::new(url.clone(), format!("dev-{i}"), tmp.path().join(format!("agent-{i}")));
        cfg.slots = slots;
        tasks.push(tokio::spawn(baton_agent::run(cfg, shutdown.clone())));
    }
    let result = drive(&url, &dashboard, source, text, params, agents, format).await;
    if let Err(Failure::Interrupted(running)) = &result {
        // The agents stop their tools (SIGTERM, then SIGKILL after the kill grace)
        // before they end; say what that was.
        eprintln!("interrupted: stopping {}", stopping(running));
    }
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if matches!(result, Err(Failure::Interrupted(_))) {
        eprintln!("stopped: the local agents and their tools have ended");
    }
    match controller.await {
        Ok(Err(e)) => eprintln!("warning: controller: {e}"),
        Err(e) => eprintln!("warning: controller task: {e}"),
        Ok(Ok(())) => {}
    }
    result
}

async fn drive(
    url: &str,
    dashboard: &str,
    source: String,
    text: String,
    params: BTreeMap<String, String>,
    agents: u32,
    format: Format,
) -> Result<u8, Failure> {
    let target = client::Target::new(url);
    let mut c = client::connect(&target).await?;
    // Wait (briefly) for the agents so the first steps do not queue for nothing.
    for _ in 0..100 {
        let n = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents.len();
        if n as u32 >= agents {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = pb::SubmitRunRequest {
        source,
        params: Some(crate::client::params(params.into_iter().collect())),
        ..client::submission(text)
    };
    let (mut c, run_id) = client::submit(&target, req).await?;
    if format == Format::Text {
        eprintln!("run {run_id} started on {agents} local agents");
        eprintln!("dashboard: {dashboard}/runs/{run_id}");
    }
    let mut watching = c.clone();
    tokio::select! {
        r = watch::watch(&mut watching, &target, &run_id, 1, format, None) => r,
        _ = crate::interrupted() => {
            let run = c.get_run(pb::GetRunRequest { run_id: run_id.clone(), ..Default::default() }).await?.into_inner().run;
            let running = run
                .map(|r| {
                    r.steps
                        .into_iter()
                        .filter(|s| s.state == baton_common::state::StepState::Running.to_pb())
                        .map(|s| s.id)
                        .collect()
                })
                .unwrap_or_default();
            Err(Failure::Interrupted(running))
        }
    }
}

/// The running steps an interrupted `baton dev` stops, in words.
fn stopping(steps: &[String]) -> String {
    match steps.len() {
        0 => "nothing was running".to_string(),
        1 => format!("step {} and its processes", steps[0]),
        n => format!("{n} steps and their processes: {}", steps.join(", ")),
    }
}
