//! `baton-agent`: parses flags, sets up logging, runs the agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use baton_agent::Config;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Baton's agent: runs the steps a controller assigns on this machine.
#[derive(Debug, Parser)]
#[command(name = "baton-agent", version)]
struct Args {
    /// Controller URL; a comma-separated list is tried in turn.
    #[arg(long, env = "BATON_CONTROLLER", default_value = "http://127.0.0.1:7070", value_delimiter = ',')]
    controller: Vec<String>,
    /// Name shown in `baton agents list` (default: the host name).
    #[arg(long, env = "BATON_AGENT_NAME")]
    name: Option<String>,
    /// Attempts run at once.
    #[arg(long, env = "BATON_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Directory for the agent id and the attempts' working directories.
    #[arg(long, env = "BATON_WORK_DIR", default_value = "baton-agent")]
    work_dir: PathBuf,
    /// Labels for routing, as KEY=VALUE; repeat or comma-separate.
    #[arg(long = "label", env = "BATON_LABELS", value_delimiter = ',', value_parser = label)]
    labels: Vec<(String, String)>,
    /// Advertise (and run) only these tools (comma-separated).
    #[arg(long, env = "BATON_TOOLS", value_delimiter = ',')]
    tools: Option<Vec<String>>,
    /// Never run these tools (comma-separated), e.g. `shell,aider` on an agent that
    /// should run only Python functions and built-ins.
    #[arg(long, env = "BATON_DISABLE_TOOLS", value_delimiter = ',')]
    disable_tools: Vec<String>,
    /// Kill running tools after this long without a controller (keep it below the
    /// controller's --lost-after).
    #[arg(long, env = "BATON_STOP_AFTER", value_parser = duration)]
    stop_after: Option<Duration>,
    /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this address.
    #[arg(long, env = "BATON_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// CA certificate (PEM) that signed the controller's certificate (https:// URLs);
    /// without it the system's roots are used.
    #[arg(long, env = "BATON_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS: an agent certificate identifies the agent.
    #[arg(long, env = "BATON_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Key (PEM) of --tls-cert.
    #[arg(long, env = "BATON_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Join token (`baton agents join-token`): traded once for this agent's own
    /// credential, kept in WORK_DIR/agent-credential; ignored once that exists.
    #[arg(long, env = "BATON_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Send traces (a span per attempt, child of the controller's) over OTLP/gRPC to
    /// this endpoint, e.g. http://otel-collector:4317.
    #[arg(long, env = "BATON_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log format: text or json. RUST_LOG sets the filter (default info).
    #[arg(long, env = "BATON_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Put each attempt in a cgroup of its own where this process may create them
    /// (root, or systemd's Delegate=yes); false: process groups only.
    #[arg(long, env = "BATON_CGROUPS", default_value_t = true, action = clap::ArgAction::Set)]
    cgroups: bool,
    /// Run as the warden of the agent whose work dir this is (started by the agent).
    #[arg(long, hide = true)]
    warden: Option<PathBuf>,
}

fn duration(s: &str) -> Result<Duration, String> {
    baton_common::time::parse_duration(s)
}

fn label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("label {s:?} must look like KEY=VALUE")),
    }
}

fn main() -> std::process::ExitCode {
    baton_common::exit_code(run())
}

/// One thread: an agent mostly waits on its tools and its stream, and a single thread
/// does that without cross-thread wakeups, leaving the cores to the tools.
#[tokio::main(flavor = "current_thread")]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(work_dir) = &args.warden {
        baton_agent::warden::run(work_dir.clone())?;
        return Ok(());
    }
    baton_common::process::init_tracing(&args.log_format, "info")?;
    let name = args.name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "agent".to_string())
    });
    let cfg = Config {
        controllers: args.controller,
        name,
        slots: args.slots,
        work_dir: args.work_dir,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        tools: args.tools,
        disable_tools: args.disable_tools,
        stop_after: args.stop_after,
        metrics_listen: args.metrics_listen,
        tls: baton_common::connect::ClientTls { ca: args.tls_ca, cert: args.tls_cert, key: args.tls_key },
        join_token: args.join_token,
        otlp: args.otlp_endpoint,
        warden: std::env::current_exe().ok(),
        cgroups: args.cgroups,
        ..Config::new("", "", "")
    };
    let shutdown = CancellationToken::new();
    baton_common::process::cancel_on_signal(shutdown.clone());
    baton_agent::run(cfg, shutdown).await?;
    Ok(())
}
