//! Baton's controller: owns all run state in a database, schedules steps onto agents
//! over gRPC streams and serves the public API.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod engine;
pub mod leader;
pub mod logs;
pub mod metrics;
pub mod report;
pub mod router;
pub mod schedules;
pub mod secrets;
pub mod store;
pub mod tls;
pub mod traces;
pub mod web;

use std::time::Duration;

use baton_common::pb;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use engine::EngineConfig;

/// Everything a controller needs to run.
#[derive(Debug)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://...`.
    pub db: String,
    pub engine: EngineConfig,
    /// The router config file; read at start, and again on reload (SIGHUP when
    /// `reload_on_sighup`, or the ReloadRouter RPC).
    pub router: Option<std::path::PathBuf>,
    pub reload_on_sighup: bool,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (plain HTTP).
    pub metrics: Option<std::net::TcpListener>,
    /// Where to serve the dashboard (with `/metrics`, `/healthz` and `/readyz`), over
    /// TLS when the API port has it.
    pub http: Option<std::net::TcpListener>,
    /// With Postgres: a leader that does not renew its lease for this long is replaced.
    pub lease: Duration,
    /// The address clients and agents should use for this controller (default:
    /// `http://` and the listen address).
    pub advertise: Option<String>,
    /// Whether callers must authenticate (see [`auth::decide`]).
    pub auth: auth::AuthMode,
    /// TLS on the API port; reloaded on SIGHUP when `reload_on_sighup`.
    pub tls: Option<tls::TlsFiles>,
    /// The key that seals secrets (created when missing). Default with SQLite: beside
    /// the database file; with Postgres there is none and secrets are refused.
    pub secrets_key: Option<std::path::PathBuf>,
    /// How long finished runs are kept, and how often the leader prunes them.
    pub retention: Retention,
    /// Where to send OpenTelemetry traces (OTLP/gRPC, `http://collector:4317`).
    pub otlp: Option<String>,
    /// Where artifacts are kept: a directory or `s3://BUCKET/PREFIX`. Default with
    /// SQLite: beside the database file; with Postgres there is none and steps with
    /// `artifacts:` or `inputs:` fail.
    pub artifacts: Option<String>,
    /// Largest artifact accepted, in bytes.
    pub artifact_max_bytes: u64,
}

/// Pruning of finished runs (see [`store::Store::prune`]).
#[derive(Debug, Clone)]
pub struct Retention {
    /// How long a finished run is kept when its workstream does not say (`retain:`);
    /// `None`: kept until deleted.
    pub keep: Option<Duration>,
    /// How often the leader looks for runs to prune.
    pub every: Duration,
    /// Runs deleted per pass at most (each in its own transaction).
    pub batch: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep: None, every: Duration::from_secs(60), batch: 500 }
    }
}

impl Config {
    /// A controller on `db` with default settings.
    pub fn new(db: impl Into<String>) -> Config {
        Config {
            db: db.into(),
            engine: EngineConfig::default(),
            router: None,
            reload_on_sighup: false,
            metrics: None,
            http: None,
            lease: Duration::from_secs(5),
            advertise: None,
            auth: auth::AuthMode::Off,
            tls: None,
            secrets_key: None,
            retention: Retention::default(),
            otlp: None,
            artifacts: None,
            artifact_max_bytes: artifacts::DEFAULT_MAX_BYTES,
        }
    }
}

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the engine stopped: {0}")]
    Engine(String),
    #[error("{0}")]
    Listener(String),
    #[error("router config {path}: {error}")]
    Router { path: String, error: router::RouterError },
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Secrets(String),
    #[error("{0}")]
    Config(String),
}

/// Serves the controller on `listener` until `shutdown` is cancelled. With SQLite it
/// leads at once; with Postgres it takes part in leader election (see `leader`).
/// Returns an error when the store cannot be opened, or (SQLite) fails for good.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    config.engine.check().map_err(ControllerError::Config)?;
    if !config.db.starts_with("sqlite:") && config.lease >= config.engine.stop_after {
        // Safe either way; but agents then stop their tools before a standby leads, and
        // what they ran is run again instead of adopted.
        tracing::warn!(
            lease = %baton_common::time::format_duration(config.lease),
            stop_after = %baton_common::time::format_duration(config.engine.stop_after),
            "--lease is not shorter than --stop-after: after a failover, agents will have stopped their tools and their steps run again"
        );
    }
    let addr = listener.local_addr().ok();
    let tls = config.tls.clone().map(tls::Tls::load).transpose().map_err(ControllerError::Tls)?;
    match config.secrets_key.clone().or_else(|| default_secrets_key(&config.db)) {
        Some(path) => {
            let (sealer, created) =
                secrets::SecretBox::open_or_create(&path).map_err(ControllerError::Secrets)?;
            if created {
                info!(key = %path.display(), "secrets key created: back it up with the database, secrets cannot be read without it");
            }
            config.engine.secrets = Some(std::sync::Arc::new(sealer));
        }
        None => info!("no --secrets-key: secrets and secret parameters are refused"),
    }
    if let Some(path) = &config.router {
        config.engine.router = router::Rules::new(
            router::Router::load(path)
                .map_err(|error| ControllerError::Router { path: path.display().to_string(), error })?,
        );
    }
    let store = store::Store::open(&config.db).await?;
    let artifact_store = match config.artifacts.clone().or_else(|| default_artifacts(&config.db)) {
        Some(at) => Some(
            artifacts::Artifacts::open(&at, config.artifact_max_bytes)
                .map_err(|e| ControllerError::Config(e.to_string()))?,
        ),
        None => {
            info!("no --artifacts: steps with artifacts: or inputs: fail");
            None
        }
    };
    config.engine.keeps_artifacts = artifact_store.is_some();
    // `stop` ends everything: a shutdown request, or (SQLite) the engine failing.
    let stop = shutdown.child_token();
    // Every task that outlives a call is tracked: the controller waits for them before
    // it closes the store. The output writer stops last, once the engine has stopped
    // pushing, and stores what is still queued first.
    let tasks = tokio_util::task::TaskTracker::new();
    let drain_logs = CancellationToken::new();
    let logs = logs::start(store.clone(), config.engine.max_output_bytes, &tasks, drain_logs.clone());
    let metrics = metrics::Metrics::new();
    let (role_tx, leadership) = leader::Leadership::channel();
    let router = config.engine.router.clone();
    let alone = match store.backend() {
        store::Backend::Sqlite => Some(
            leader::lead_alone(
                store.clone(),
                config.engine.clone(),
                logs.clone(),
                metrics.clone(),
                &role_tx,
                &stop,
            )
            .await?,
        ),
        store::Backend::Postgres => None,
    };
    tasks.spawn(schedules::run(leadership.clone(), store.clone(), router.clone(), stop.clone()));
    tasks.spawn(prune(
        config.retention.clone(),
        leadership.clone(),
        (store.clone(), artifact_store.clone()),
        metrics.clone(),
        stop.clone(),
    ));
    if let Some(endpoint) = &config.otlp {
        let exporter = baton_common::trace::Exporter::new(endpoint, "baton-controller")
            .map_err(ControllerError::Config)?;
        info!(endpoint = %endpoint, "sending traces of runs over OTLP");
        tasks.spawn(traces::follow(leadership.clone(), std::sync::Arc::new(exporter), stop.clone()));
    }
    let authenticator = auth::Authenticator::new(config.auth, store.clone());
    let probes = baton_common::metrics::Probes {
        render: render_metrics(metrics.clone(), leadership.clone(), store.clone()),
        ready: readiness(leadership.clone(), store.clone()),
        authorize: authenticator.metrics_gate(),
    };
    if let Some(listener) = config.metrics {
        let listener = TcpListener::from_std(listener)
            .map_err(|e| ControllerError::Listener(format!("metrics listener: {e}")))?;
        info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
        tasks.spawn(baton_common::metrics::serve(listener, probes.clone(), stop.clone()));
    }
    if config.reload_on_sighup && (config.router.is_some() || tls.is_some()) {
        // Registered before the controller says it is up, so an early SIGHUP reloads
        // instead of killing the process.
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(hup) => {
                let reload =
                    Reload { router_path: config.router.clone(), router: router.clone(), tls: tls.clone() };
                tasks.spawn(reload.on_sighup(hup, stop.clone()));
            }
            Err(e) => error!(error = %e, "cannot listen for SIGHUP; nothing will be reloaded"),
        }
    }
    let services = api::services(api::Context {
        leadership,
        router: router.clone(),
        store: store.clone(),
        logs: logs.clone(),
        router_path: config.router.clone(),
        auth: authenticator.clone(),
        secrets: config.engine.secrets.clone(),
        shutdown: stop.clone(),
        tasks: tasks.clone(),
        artifacts: artifact_store.clone(),
    });
    if let Some(listener) = config.http {
        let listener = TcpListener::from_std(listener)
            .map_err(|e| ControllerError::Listener(format!("dashboard listener: {e}")))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        info!(url = %format!("{scheme}://{at}/"), "dashboard listening");
        let web = web::Web {
            runs: services.run_api.clone(),
            admin: services.admin_api.clone(),
            auth: authenticator.clone(),
            probes: Some(probes),
        };
        tasks.spawn(web::serve(listener, tls.clone(), std::sync::Arc::new(web), stop.clone()));
    }
    // grpc.health.v1 and server reflection, so that any gRPC client can find its way.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::baton_service_server::BatonServiceServer<api::RunApi>>().await;
    health.set_serving::<pb::agent_service_server::AgentServiceServer<api::AgentApi>>().await;
    health.set_serving::<pb::admin_service_server::AdminServiceServer<api::AdminApi>>().await;
    // Reflection in both versions, each listing both: grpcurl and current tools speak
    // v1, the Python grpc_reflection client, older grpcurl, Postman and Evans v1alpha.
    let reflection_of = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_err =
        |e: tonic_reflection::server::Error| ControllerError::Engine(format!("reflection: {e}"));
    let reflection = reflection_of().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection_of().build_v1alpha().map_err(reflection_err)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let incoming = tls::incoming(listener, tls.clone(), stop.clone());
    let address = config.advertise.clone().unwrap_or_else(|| match addr {
        Some(a) => format!("{scheme}://{a}"),
        None => String::new(),
    });
    let auth_text = match config.auth {
        auth::AuthMode::Required => "required",
        auth::AuthMode::Off => "off (loopback without TLS: anyone who reaches the port may do anything)",
    };
    let tls_text = match &config.tls {
        None => "off".to_string(),
        Some(f) if f.client_ca.is_some() => "on, with client certificates".to_string(),
        Some(_) => "on".to_string(),
    };
    info!(addr = %addr.map(|a| a.to_string()).unwrap_or_default(), %address, db = %redact(&config.db), tls = %tls_text, authentication = auth_text, "controller listening");
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(auth::AuthLayer::new(authenticator))
        .add_service(services.runs)
        .add_service(services.agents)
        .add_service(services.admin)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    let lease =
        leader::LeaseConfig { holder: uuid::Uuid::new_v4().to_string(), address, lease: config.lease };
    let terms = async {
        match alone {
            // SQLite: the engine ending (failing) ends the controller.
            Some(task) => {
                task.await.unwrap_or_else(|e| Err(store::StoreError::Corrupt(format!("engine task: {e}"))))
            }
            None => {
                let parts = leader::EngineParts { store: store.clone(), cfg: config.engine, logs, metrics };
                leader::run_terms(parts, lease, role_tx, stop.clone()).await
            }
        }
    };
    tokio::pin!(server);
    tokio::pin!(terms);
    let result = tokio::select! {
        r = &mut server => {
            stop.cancel();
            let _ = (&mut terms).await;
            r.map_err(ControllerError::from)
        }
        r = &mut terms => {
            stop.cancel();
            let _ = server.await;
            r.map_err(|e| {
                error!(error = %e, "engine failed");
                ControllerError::Store(e)
            })
        }
    };
    drain_logs.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    result
}

/// What SIGHUP reloads: the router config and the TLS files. A bad file is logged and
/// what is in force is kept.
struct Reload {
    router_path: Option<std::path::PathBuf>,
    router: router::Rules,
    tls: Option<std::sync::Arc<tls::Tls>>,
}

impl Reload {
    async fn on_sighup(self, mut hup: tokio::signal::unix::Signal, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            if let Some(tls) = &self.tls {
                match tls.reload() {
                    Ok(()) => info!("TLS certificate and key reloaded; new connections use them"),
                    Err(e) => error!(error = %e, "TLS files refused; keeping the certificate in force"),
                }
            }
            let Some(path) = &self.router_path else { continue };
            match router::Router::load(path) {
                Ok(r) => {
                    let n = r.rules.len();
                    self.router.replace(r);
                    info!(path = %path.display(), rules = n, "router config reloaded; runs submitted from now on follow it");
                }
                Err(e) => {
                    error!(path = %path.display(), error = %e, "router config refused; keeping the rules in force")
                }
            }
        }
    }
}

/// While this controller leads, deletes finished runs past their retention every
/// `every`, in passes of at most `batch` runs; the engine's own commits go on between
/// the runs of a pass.
async fn prune(
    retention: Retention,
    leadership: leader::Leadership,
    (store, artifacts): (store::Store, Option<artifacts::Artifacts>),
    metrics: std::sync::Arc<metrics::Metrics>,
    stop: CancellationToken,
) {
    let keep = retention.keep.map(|d| baton_common::time::ms(d) as i64);
    let mut tick = tokio::time::interval(retention.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !matches!(leadership.role(), leader::Role::Leader { .. }) {
            continue;
        }
        match store.prune(baton_common::time::now_ms(), keep, i64::from(retention.batch)).await {
            Ok(p) if p.runs > 0 => {
                if let Some(a) = &artifacts {
                    for id in &p.ids {
                        if let Err(e) = a.delete_run(id).await {
                            warn!(run_id = %id, error = %e, "deleting a pruned run's artifacts failed");
                        }
                    }
                }
                metrics.pruned_runs.add(&[], p.runs as f64);
                metrics.pruned_rows.add(&[], p.rows as f64);
                info!(runs = p.runs, rows = p.rows, "finished runs past their retention pruned");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning finished runs failed; trying again later"),
        }
    }
}

/// Renders the metrics, reading gauges from the engine and the store first.
fn render_metrics(
    m: std::sync::Arc<metrics::Metrics>,
    leadership: leader::Leadership,
    store: store::Store,
) -> baton_common::metrics::RenderFn {
    std::sync::Arc::new(move || {
        let (m, leadership, store) = (m.clone(), leadership.clone(), store.clone());
        Box::pin(async move {
            let gauge = |map: std::collections::BTreeMap<String, u32>| {
                map.into_iter().map(|(k, v)| (vec![k], f64::from(v))).collect::<Vec<_>>()
            };
            let gauges = match leadership.engine() {
                Ok((engine, _)) => engine.gauges().await.ok(),
                Err(_) => None,
            };
            m.leader.set(&[], if gauges.is_some() { 1.0 } else { 0.0 });
            if let Some(g) = gauges {
                m.steps.set_all(gauge(g.steps));
                m.agents.set_all(gauge(g.agents));
                m.breakers.set_all(gauge(g.breakers));
                m.slots.set(&["used"], f64::from(g.slots_used));
                m.slots.set(&["total"], f64::from(g.slots_total));
            }
            if let Ok(runs) = store.run_counts().await {
                m.runs.set_all(gauge(runs.into_iter().collect()));
            }
            if let Ok(bytes) = store.size_bytes().await {
                m.database_bytes.set(&[], bytes as f64);
            }
            m.render()
        })
    })
}

/// Ready when this controller leads, its engine answers and the database does.
fn readiness(leadership: leader::Leadership, store: store::Store) -> baton_common::metrics::ReadyFn {
    std::sync::Arc::new(move || {
        let (leadership, store) = (leadership.clone(), store.clone());
        Box::pin(async move {
            let wait = Duration::from_secs(2);
            let engine = match leadership.role() {
                leader::Role::Leader { engine, .. } => engine,
                leader::Role::Standby { leader } => {
                    return Err(format!(
                        "standby; the leader is {}",
                        leader.unwrap_or_else(|| "unknown".into())
                    ));
                }
            };
            match tokio::time::timeout(wait, engine.gauges()).await {
                Ok(Ok(_)) => {}
                _ => return Err("the engine does not answer".to_string()),
            }
            if let Some(why) = store.refusing() {
                return Err(format!("the database refuses writes: {why}"));
            }
            match tokio::time::timeout(wait, store.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("database: {e}")),
                Err(_) => Err("the database does not answer".to_string()),
            }
        })
    })
}

/// Where artifacts are kept by default: beside a SQLite database file.
pub fn default_artifacts(db: &str) -> Option<String> {
    default_secrets_key(db).map(|p| p.display().to_string().replace(".secrets-key", ".artifacts"))
}

/// Where the secrets key lives by default: beside a SQLite database file.
pub fn default_secrets_key(db: &str) -> Option<std::path::PathBuf> {
    let path = db.strip_prefix("sqlite://").or_else(|| db.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or("");
    (!path.is_empty() && !path.contains(":memory:"))
        .then(|| std::path::PathBuf::from(format!("{path}.secrets-key")))
}

/// A database URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
