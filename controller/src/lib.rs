//! Baton's controller: owns all run state in a database, schedules steps onto agents
//! over gRPC streams and serves the public API.

pub mod api;
pub mod engine;
pub mod logs;
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
}

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the engine stopped: {0}")]
    Engine(String),
}

/// Serves the controller on `listener` until `shutdown` is cancelled. Returns an error
/// when the store cannot be opened or fails for good while running.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let addr = listener.local_addr().ok();
    let store = store::Store::open(&config.db).await?;
    // `stop` ends everything: a shutdown request, or the engine failing.
    let stop = shutdown.child_token();
    let logs = logs::start(store.clone(), config.engine.max_output_bytes, stop.clone());
    let (engine, mut task) = engine::start(store.clone(), config.engine, logs.clone(), stop.clone()).await?;
    let (runs, agents) = api::services(engine, store.clone(), logs, stop.clone());
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
