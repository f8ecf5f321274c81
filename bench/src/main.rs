//! `baton-bench`: Baton's benchmarks, side by side with GNU make and Dask on the same
//! DAGs. Each scenario starts a real controller and real agents (this binary in its
//! `controller` and `agent` roles) on loopback, on a fresh database.
//!
//! ```text
//! cargo run --release -p baton-bench -- [b1 b2 b3 b4 b8 b9 b10 b5 b6 idle] [--backend sqlite|postgres]
//! cargo run --release -p baton-bench -- --dashboard
//! ```

mod cluster;
mod compare;
mod dashboard;
mod scale;
mod scenarios;

use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cluster::Backend;

#[derive(Debug, Parser)]
#[command(name = "baton-bench", about = "Baton benchmarks, side by side with make and Dask")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Scenarios to run (default: all): b1 b2 b3 b4 b8 b9 b10 b5 b6 idle.
    scenarios: Vec<String>,
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Postgres server for --backend postgres (a database is created per scenario).
    #[arg(long, env = "BATON_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Skip the make and Dask comparisons.
    #[arg(long)]
    no_compare: bool,
    /// Seconds B5 runs for.
    #[arg(long, default_value_t = 60)]
    b5_seconds: u64,
    /// Simulated idle agents in B5.
    #[arg(long, default_value_t = 2000)]
    b5_agents: usize,
    /// Run the controllers with pipelined starts off (`baton-controller --no-pipeline`).
    #[arg(long)]
    no_pipeline: bool,
    /// Instead of the scenarios, the scale curves: B1 and B4 at 1,000, 10,000 and 100,000
    /// steps, as a table and a PNG chart at this path.
    #[arg(long)]
    scale: Option<std::path::PathBuf>,
    /// Instead of the scenarios, B11: the dashboard in headless Chromium (drawing runs of
    /// 2,000 and 10,000 steps; output reaching the open page).
    #[arg(long)]
    dashboard: bool,
    /// The `baton` CLI for the end-to-end times of B1–B3 (`baton submit FILE --watch`);
    /// default: `baton` next to this binary (`cargo build --release -p baton`).
    #[arg(long)]
    baton: Option<std::path::PathBuf>,
}

/// The processes a benchmark starts (this same binary).
#[derive(Debug, Subcommand)]
enum Role {
    #[command(hide = true)]
    Controller {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        metrics_listen: std::net::SocketAddr,
        #[arg(long)]
        http_listen: std::net::SocketAddr,
        #[arg(long)]
        db: String,
        #[arg(long, value_parser = baton_common::time::parse_duration)]
        heartbeat_interval: Duration,
        #[arg(long)]
        no_pipeline: bool,
    },
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        controller: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        slots: u32,
        #[arg(long)]
        work_dir: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    // Agents run on one thread, as `baton-agent` does.
    let rt = if matches!(args.role, Some(Role::Agent { .. })) {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    rt.block_on(async move {
        match args.role {
            Some(Role::Controller {
                listen,
                metrics_listen,
                http_listen,
                db,
                heartbeat_interval,
                no_pipeline,
            }) => {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                let metrics = std::net::TcpListener::bind(metrics_listen)?;
                metrics.set_nonblocking(true)?;
                let http = std::net::TcpListener::bind(http_listen)?;
                http.set_nonblocking(true)?;
                let mut config = baton_controller::Config::new(db);
                config.metrics = Some(metrics);
                config.http = Some(http);
                config.engine.heartbeat_interval = heartbeat_interval;
                config.engine.pipeline = !no_pipeline;
                baton_controller::run(listener, config, CancellationToken::new()).await?;
                Ok(())
            }
            Some(Role::Agent { controller, name, slots, work_dir }) => {
                let mut cfg = baton_agent::Config::new(controller, name, work_dir);
                cfg.slots = slots;
                baton_agent::run(cfg, CancellationToken::new()).await?;
                Ok(())
            }
            None => {
                let backend = match args.backend.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => anyhow::bail!("--backend must be sqlite or postgres, not {other:?}"),
                };
                let all = ["b1", "b2", "b3", "b4", "b8", "b9", "b10", "b5", "b6", "idle"];
                let chosen: Vec<String> = if args.scenarios.is_empty() {
                    all.iter().map(|s| s.to_string()).collect()
                } else {
                    args.scenarios
                };
                for s in &chosen {
                    if !all.contains(&s.as_str()) {
                        anyhow::bail!("unknown scenario {s:?} (known: {})", all.join(", "));
                    }
                }
                let baton = match args.baton {
                    Some(p) => Some(p),
                    None => {
                        let next_to = std::env::current_exe()?.with_file_name("baton");
                        next_to.exists().then_some(next_to)
                    }
                };
                let opts = scenarios::Options {
                    backend,
                    postgres_url: args.postgres_url,
                    compare: !args.no_compare,
                    b5_seconds: args.b5_seconds,
                    b5_agents: args.b5_agents,
                    pipeline: !args.no_pipeline,
                    baton,
                };
                match &args.scale {
                    _ if args.dashboard => dashboard::run(&opts).await,
                    Some(chart) => scale::run(&opts, chart).await,
                    None => scenarios::run_all(&chosen, &opts).await,
                }
            }
        }
    })
}
