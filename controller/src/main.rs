//! `baton-controller`: parses flags, sets up logging, runs the controller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use baton_common::auth::Role;
use baton_controller::auth::AuthFlag;
use baton_controller::engine::BreakerConfig;
use baton_controller::{Config, EngineConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Baton's controller: holds run state and schedules steps onto agents.
#[derive(Debug, Parser)]
#[command(name = "baton-controller", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of the gRPC API (clients and agents). Off loopback it needs TLS.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Database: sqlite://PATH (created when missing) or postgres://USER@HOST/DB.
    #[arg(long, env = "BATON_DB", default_value = "sqlite://baton.db", global = true)]
    db: String,
    /// auto: callers must authenticate with TLS or off loopback, not on loopback without
    /// TLS; required: always.
    #[arg(long, env = "BATON_AUTH", default_value = "auto", value_parser = ["auto", "required"])]
    auth: String,
    /// Serve plaintext gRPC off loopback (authentication stays required). Tokens and
    /// secrets then cross the network unencrypted.
    #[arg(long, env = "BATON_INSECURE")]
    insecure: bool,
    /// TLS certificate (PEM, with its chain) of the API port; re-read on SIGHUP.
    #[arg(long, env = "BATON_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Key (PEM) of --tls-cert; re-read on SIGHUP.
    #[arg(long, env = "BATON_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) whose client certificates identify callers (mutual TLS); callers may
    /// still use tokens.
    #[arg(long, env = "BATON_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// How often agents send heartbeats.
    #[arg(long, env = "BATON_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = duration)]
    heartbeat_interval: Duration,
    /// How often an agent that holds no work sends a heartbeat (default: four heartbeat
    /// intervals, at most a third of --lost-after).
    #[arg(long, env = "BATON_IDLE_HEARTBEAT_INTERVAL", value_parser = duration)]
    idle_heartbeat_interval: Option<Duration>,
    /// An agent whose heartbeats went unanswered this long stops its tools by itself,
    /// so that a step retried elsewhere never runs twice; sent to agents on connect.
    #[arg(long, env = "BATON_STOP_AFTER", default_value = "10s", value_parser = duration)]
    stop_after: Duration,
    /// An agent silent this long is lost, and its attempts are retried elsewhere (more
    /// than --stop-after plus 500ms).
    #[arg(long, env = "BATON_LOST_AFTER", default_value = "15s", value_parser = duration)]
    lost_after: Duration,
    /// After a start, how long agents have to reconnect before they count as lost.
    #[arg(long, env = "BATON_FAILOVER_GRACE", default_value = "30s", value_parser = duration)]
    failover_grace: Duration,
    /// Time between SIGTERM and SIGKILL when a tool is stopped.
    #[arg(long, env = "BATON_KILL_GRACE", default_value = "10s", value_parser = duration)]
    kill_grace: Duration,
    /// Quarantine a run whose step was lost with its agent this many times in a row.
    #[arg(long, env = "BATON_POISON_AFTER", default_value_t = 3)]
    poison_after: u32,
    /// Circuit breaker policies (JSON): {"default": {...}, "tools": {"shell": {...}}}.
    #[arg(long, env = "BATON_BREAKERS")]
    breakers: Option<std::path::PathBuf>,
    /// Routing rules (JSON); reloaded on SIGHUP and by `baton router reload`.
    #[arg(long, env = "BATON_ROUTER")]
    router: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this address.
    #[arg(long, env = "BATON_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the web dashboard on this address, with /metrics, /healthz and /readyz (it
    /// may replace --metrics-listen). Same TLS and tokens as the API; off loopback it
    /// needs TLS (or --insecure).
    #[arg(long, env = "BATON_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// With Postgres and several controllers: a leader that does not renew its lease for
    /// this long is replaced by a standby.
    #[arg(long, env = "BATON_LEASE", default_value = "5s", value_parser = duration)]
    lease: Duration,
    /// The address clients and agents should use for this controller, as given to
    /// them by standbys (default: http:// or https:// and the listen address).
    #[arg(long, env = "BATON_ADVERTISE")]
    advertise: Option<String>,
    /// Key file that seals secrets and secret parameters (created, 0600, when missing);
    /// every controller on one database needs the same key. Default with SQLite: the
    /// database path with `.secrets-key` appended; with Postgres, none (secrets refused).
    #[arg(long, env = "BATON_SECRETS_KEY")]
    secrets_key: Option<std::path::PathBuf>,
    /// Env variables whose values are masked like secrets (`*` matches anything).
    #[arg(
        long,
        env = "BATON_REDACT_ENV",
        value_delimiter = ',',
        default_value = "*_TOKEN,*_SECRET,*_PASSWORD,*_KEY"
    )]
    redact_env: Vec<String>,
    /// Output kept per attempt (bytes); the rest is cut with a marker.
    #[arg(long, env = "BATON_MAX_OUTPUT", default_value_t = 8 * 1024 * 1024)]
    max_output: u64,
    /// Do not assign a step ahead of time to the agent that runs all its unfinished
    /// dependencies (pipelined starts; see the README).
    #[arg(long, env = "BATON_NO_PIPELINE")]
    no_pipeline: bool,
    /// Keep finished runs this long (e.g. 30d), then delete them with their steps,
    /// attempts, events and output; a workstream's `retain:` overrides it. Default:
    /// keep them until `baton runs delete`.
    #[arg(long, env = "BATON_RETAIN", value_parser = duration)]
    retain: Option<Duration>,
    /// How often the leader looks for finished runs past their retention.
    #[arg(long, env = "BATON_PRUNE_EVERY", default_value = "1m", value_parser = duration)]
    prune_every: Duration,
    /// Send traces (a span per run, step and attempt) over OTLP/gRPC to this endpoint,
    /// e.g. http://otel-collector:4317.
    #[arg(long, env = "BATON_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Where the files steps leave (`artifacts:`) are kept: a directory, or
    /// s3://BUCKET/PREFIX (credentials, region and endpoint from the AWS_* variables).
    /// Default with SQLite: the database path with `.artifacts` appended; with
    /// Postgres, none (several controllers need a place they share).
    #[arg(long, env = "BATON_ARTIFACTS")]
    artifacts: Option<String>,
    /// Largest artifact accepted, in bytes.
    #[arg(long, env = "BATON_ARTIFACT_MAX_BYTES", default_value_t = baton_controller::artifacts::DEFAULT_MAX_BYTES)]
    artifact_max_bytes: u64,
    /// Log format: text or json. RUST_LOG sets the filter (default info).
    #[arg(long, env = "BATON_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create the first admin token in the database and print it on stdout; refused
    /// when an admin token exists. Run it on the controller's host.
    Bootstrap {
        /// The token's name, as events and `baton tokens list` show it.
        #[arg(long, default_value = "bootstrap")]
        name: String,
    },
    /// Write a consistent copy of the SQLite database to FILE while the controller
    /// runs (`VACUUM INTO`); start a controller on the copy to restore it. Keep the
    /// secrets key (DB.secrets-key) with it. For PostgreSQL use pg_dump.
    Backup {
        /// The file to write; it must not exist.
        file: std::path::PathBuf,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    baton_common::time::parse_duration(s)
}

fn main() -> std::process::ExitCode {
    baton_common::exit_code(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Command::Bootstrap { name }) => return bootstrap(&args.db, name).await,
        Some(Command::Backup { file }) => return backup(&args.db, file).await,
        None => {}
    }
    let auth_flag = if args.auth == "required" { AuthFlag::Required } else { AuthFlag::Auto };
    let tls = args.tls_cert.clone().zip(args.tls_key.clone()).map(|(cert, key)| {
        baton_controller::tls::TlsFiles { cert, key, client_ca: args.tls_client_ca.clone() }
    });
    let (mut auth, warning) =
        baton_controller::auth::decide(args.listen, tls.is_some(), args.insecure, auth_flag)
            .map_err(|e| anyhow::anyhow!(e))?;
    let mut warnings: Vec<String> = warning.into_iter().collect();
    // The dashboard's port is held to the same rule: off loopback, TLS (or --insecure)
    // and authentication, whatever the API port's address.
    if let Some(http) = args.http_listen {
        let (mode, warning) = baton_controller::auth::decide(http, tls.is_some(), args.insecure, auth_flag)
            .map_err(|e| anyhow::anyhow!("--http-listen: {e}"))?;
        if mode == baton_controller::auth::AuthMode::Required {
            auth = mode;
        }
        warnings.extend(warning);
    }
    baton_common::process::init_tracing(&args.log_format, "info")?;
    for w in warnings {
        tracing::warn!("{w}");
        eprintln!("WARNING: {w}");
    }
    let breakers = match &args.breakers {
        None => BreakerConfig::default(),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            BreakerConfig::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
    };
    let engine = EngineConfig {
        heartbeat_interval: args.heartbeat_interval,
        idle_heartbeat_interval: args.idle_heartbeat_interval,
        stop_after: args.stop_after,
        lost_after: args.lost_after,
        failover_grace: args.failover_grace,
        kill_grace: args.kill_grace,
        poison_after: args.poison_after,
        breakers,
        max_output_bytes: args.max_output,
        redact_env: args.redact_env,
        pipeline: !args.no_pipeline,
        ..EngineConfig::default()
    };
    engine.check().map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = Config {
        db: args.db,
        engine,
        router: args.router,
        reload_on_sighup: true,
        lease: args.lease,
        advertise: args.advertise,
        auth,
        tls,
        secrets_key: args.secrets_key,
        otlp: args.otlp_endpoint,
        artifacts: args.artifacts,
        artifact_max_bytes: args.artifact_max_bytes,
        retention: baton_controller::Retention {
            keep: args.retain,
            every: args.prune_every,
            ..Default::default()
        },
        http: args.http_listen.map(listen).transpose()?,
        metrics: args.metrics_listen.map(listen).transpose()?,
    };
    let shutdown = CancellationToken::new();
    baton_common::process::cancel_on_signal(shutdown.clone());
    baton_controller::run(listener, config, shutdown).await?;
    Ok(())
}

/// A listener for a plain HTTP port (metrics, the dashboard), served by the runtime.
fn listen(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// `baton-controller backup FILE`.
async fn backup(db: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let store = baton_controller::store::Store::open(db).await?;
    let result = store.backup(file).await;
    store.close().await;
    result?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    eprintln!("{} written ({size} bytes): a copy of {}", file.display(), baton_controller::redact(db));
    if let Some(key) = baton_controller::default_secrets_key(db)
        && key.exists()
    {
        eprintln!("keep the secrets key {} with it: sealed secrets cannot be read without it", key.display());
    }
    Ok(())
}

/// `baton-controller bootstrap`: the first admin token, printed once.
async fn bootstrap(db: &str, name: &str) -> anyhow::Result<()> {
    baton_controller::api::check_name("token", name).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let store = baton_controller::store::Store::open(db).await?;
    let (token, row) = baton_controller::api::new_token(name, Role::Admin, 0, "bootstrap");
    let result = store.bootstrap_admin(&row, baton_common::time::now_ms()).await;
    store.close().await;
    result?;
    println!("{token}");
    eprintln!(
        "admin token {name:?} (id {}) created; it is shown only this once. Use it with --token or BATON_TOKEN.",
        row.id
    );
    Ok(())
}
