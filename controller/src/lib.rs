//! Baton's controller: owns all run state in a database, schedules steps onto agents
//! over gRPC streams and serves the public API.

pub mod api;
pub mod engine;
pub mod logs;
pub mod router;
pub mod store;

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::{error, info};

pub use engine::EngineConfig;

/// Everything a controller needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://...`.
    pub db: String,
    pub engine: EngineConfig,
    /// The router config file; read at start, and again on reload (SIGHUP when
    /// `reload_on_sighup`, or the ReloadRouter RPC).
    pub router: Option<std::path::PathBuf>,
    pub reload_on_sighup: bool,
}

impl Config {
    /// A controller on `db` with default settings.
    pub fn new(db: impl Into<String>) -> Config {
        Config { db: db.into(), engine: EngineConfig::default(), router: None, reload_on_sighup: false }
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
    #[error("router config {path}: {error}")]
    Router { path: String, error: router::RouterError },
}

/// Serves the controller on `listener` until `shutdown` is cancelled. Returns an error
/// when the store cannot be opened or fails for good while running.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let addr = listener.local_addr().ok();
    if let Some(path) = &config.router {
        config.engine.router = router::Router::load(path)
            .map_err(|error| ControllerError::Router { path: path.display().to_string(), error })?;
    }
    let store = store::Store::open(&config.db).await?;
    // `stop` ends everything: a shutdown request, or the engine failing.
    let stop = shutdown.child_token();
    let logs = logs::start(store.clone(), config.engine.max_output_bytes, stop.clone());
    let (engine, mut task) = engine::start(store.clone(), config.engine, logs.clone(), stop.clone()).await?;
    if let (Some(path), true) = (config.router.clone(), config.reload_on_sighup) {
        // Registered before the controller says it is up, so an early SIGHUP reloads
        // instead of killing the process.
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(hup) => {
                tokio::spawn(reload_on_sighup(hup, path, engine.clone(), stop.clone()));
            }
            Err(e) => error!(error = %e, "cannot listen for SIGHUP; reload the router over the API"),
        }
    }
    let (runs, agents) = api::services(engine, store.clone(), logs, config.router.clone(), stop.clone());
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    info!(?addr, db = %redact(&config.db), "controller listening");
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(runs)
        .add_service(agents)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => {
            stop.cancel();
            let _ = (&mut task).await;
            r.map_err(ControllerError::from)
        }
        r = &mut task => {
            stop.cancel();
            let _ = server.await;
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    error!(error = %e, "engine failed");
                    Err(ControllerError::Store(e))
                }
                Err(e) => Err(ControllerError::Engine(e.to_string())),
            }
        }
    };
    store.close().await;
    result
}

/// Reloads the router config on each SIGHUP; a bad file is logged and the rules in
/// force are kept.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    engine: engine::EngineHandle,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        match router::Router::load(&path) {
            Ok(r) => {
                let n = r.rules.len();
                if engine.set_router(r).await.is_ok() {
                    info!(path = %path.display(), rules = n, "router config reloaded");
                }
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "router config refused; keeping the rules in force")
            }
        }
    }
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
