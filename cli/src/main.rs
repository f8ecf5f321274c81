//! `baton`: the command-line client of a Baton controller, and `baton dev`, which runs
//! a controller and agents in one process.
//!
//! Exit codes: 0 success; 1 a run that did not succeed, or an error; 2 bad input (an
//! invalid spec or bad arguments) or something named that does not exist (a run, step,
//! attempt, agent, breaker, token, secret or context); 3 a watched run was quarantined.

/// Like `println!`, to stdout through [`output::write_out`]: a closed pipe ends the
/// program quietly with 0, as other Unix tools do.
macro_rules! out {
    () => { $crate::output::write_out(b"\n") };
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        $crate::output::write_out(line.as_bytes())
    }};
}

/// Like `print!`, through [`output::write_out`].
macro_rules! out_raw {
    ($($arg:tt)*) => { $crate::output::write_out(format!($($arg)*).as_bytes()) };
}

pub(crate) use baton_client as client;
mod context;
mod dev;
mod output;
mod style;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baton_common::pb;
use clap::{Args, Parser, Subcommand, ValueEnum};

use output::Format;

#[derive(Debug, Parser)]
#[command(name = "baton", version, about = "Baton: run workstreams of tools across machines")]
struct Cli {
    /// Controller URL: https:// for TLS, http:// without; a bare HOST:PORT is https://
    /// when TLS files are given, else http://. A comma-separated list finds the leader
    /// among several. Default: the context's, else http://127.0.0.1:7070.
    #[arg(long, global = true, env = "BATON_CONTROLLER")]
    controller: Option<String>,
    /// The context (a named controller in the config file, see `baton context`) to use
    /// instead of the current one.
    #[arg(long, global = true, env = "BATON_CONTEXT")]
    context: Option<String>,
    /// API token (see `baton tokens create`).
    #[arg(long, global = true, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file that holds the API token (used when --token is not given).
    #[arg(long, global = true, env = "BATON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the controller's certificate; without it,
    /// https:// URLs are checked against the system's roots.
    #[arg(long, global = true, env = "BATON_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "BATON_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long, global = true, env = "BATON_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long to keep retrying when no controller answers (it restarts, or leadership
    /// moves) before giving up.
    #[arg(long, global = true, env = "BATON_RECONNECT_TIMEOUT", default_value = "60s", value_parser = baton_common::time::parse_duration)]
    reconnect_timeout: std::time::Duration,
    /// Colour states in text output: auto (on a terminal, unless NO_COLOR is set or
    /// TERM=dumb), always or never.
    #[arg(long, global = true, env = "BATON_COLOR", value_enum, default_value = "auto")]
    color: style::ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a run of a workstream spec (YAML or JSON).
    Submit {
        /// The spec file; `-` reads it from stdin.
        file: PathBuf,
        /// Wait for the run to end, showing progress; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
        /// Run parameter KEY=VALUE; repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// A display name for the run.
        #[arg(long, default_value = "")]
        name: String,
        /// A label KEY=VALUE to find the run by (`runs list --label`); repeatable.
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Run every step, also those whose result the step cache holds.
        #[arg(long)]
        no_cache: bool,
        /// When agents' slots are scarce, higher priorities go first (-1000 to 1000).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Inspect and control runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Inspect agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Inspect and reset circuit breakers.
    #[command(subcommand)]
    Breakers(BreakersCommand),
    /// The step cache: results of steps with `cache:`.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Workstreams started at the times of a cron expression, or at an interval.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Manage the controller's routing rules.
    #[command(subcommand)]
    Router(RouterCommand),
    /// API tokens: create (printed once), list, revoke. Needs role admin.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Secrets for specs (${{ secrets.NAME }}), sealed at rest: set (value from stdin),
    /// list (names only), delete.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// A certificate authority for TLS: make a CA, issue certificates it signs.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Named controllers kept in ~/.config/baton/config.toml (or $BATON_CONFIG): add,
    /// use, list, remove. Flags and environment variables override the context's values.
    #[command(subcommand)]
    Context(ContextCommand),
    /// Show who the controller takes you for, and your role.
    Whoami {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Check a spec without running it; exit 2 when it is invalid.
    Validate {
        /// The spec file; `-` reads it from stdin.
        file: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Print a shell completion script, e.g. `baton completion bash >
    /// /etc/bash_completion.d/baton`, or `source <(baton completion zsh)`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (baton.1 and one per subcommand, e.g. baton-runs-list.1) to
    /// DIR.
    Man {
        /// The directory to write them to (made if missing).
        dir: PathBuf,
    },
    /// Run a workstream locally: a controller on SQLite and local agents in this
    /// process.
    Dev {
        /// The spec file; `-` reads it from stdin.
        file: PathBuf,
        /// Local agents to start.
        #[arg(long, default_value_t = 2)]
        agents: u32,
        /// Slots of each agent.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// SQLite file to keep the run in (default: a temporary one).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Routing rules for the controller (router_config.json).
        #[arg(long)]
        router: Option<PathBuf>,
        /// Run parameter KEY=VALUE; repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only runs in this state (pending, running, succeeded, failed, quarantined,
        /// canceled); repeatable.
        #[arg(long, value_parser = run_state)]
        state: Vec<baton_common::state::RunState>,
        /// Only runs of this workstream.
        #[arg(long, default_value = "")]
        workstream: String,
        /// Only runs with this label KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show a run with its steps and attempts.
    Show {
        /// The run's id.
        run: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Follow a run's events until it ends; exit 0 only if it succeeded.
    Watch {
        /// The run's id.
        run: String,
        /// Start from this event sequence number.
        #[arg(long, default_value_t = 1)]
        from_seq: i64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Cancel a run (or one step): running tools are stopped, nothing new starts.
    Cancel {
        /// The run's id.
        run: String,
        /// Cancel only this step; the steps that need it are skipped.
        #[arg(long)]
        step: Option<String>,
        /// Why, as events and reports show it.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Print attempt output: one step's (latest attempt, or --attempt N), or every
    /// step's, each line prefixed with its step; with -o json, jsonl or yaml, each chunk
    /// as an object (step_id, attempt, data in base64) as it arrives.
    Logs {
        /// The run's id.
        run: String,
        /// Only this step's output.
        step: Option<String>,
        /// The attempt's number (default: the latest).
        #[arg(long, requires = "step")]
        attempt: Option<u32>,
        /// Keep printing output as it arrives, until the step (or run) ends.
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List the files a run's steps left (`artifacts:` in the spec); with --download,
    /// fetch them into DIR/STEP/PATH, each checked against its SHA-256.
    Artifacts {
        /// The run's id.
        run: String,
        /// Write the artifacts under this directory.
        #[arg(long, value_name = "DIR")]
        download: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// A report of a run: steps, attempts, retries, breaker trips, quarantines, the
    /// critical path and a timeline.
    Report {
        /// The run's id.
        run: String,
        /// md (Markdown), json, or html (one self-contained file with an SVG timeline).
        #[arg(long, default_value = "md", value_parser = ["md", "json", "html"])]
        format: String,
        /// Write it to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete a finished run with its steps, attempts, events and output (finished runs
    /// are also pruned by the controller's --retain and a workstream's retain:).
    Delete {
        /// The run's id.
        run: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Resume a quarantined run; its failed steps get a fresh retry budget.
    Release {
        /// The run's id.
        run: String,
        /// A new cost budget in dollars (a run held for passing its budget needs one
        /// above what it has cost).
        #[arg(long, value_name = "USD")]
        raise_budget: Option<f64>,
        /// A new token budget.
        #[arg(long, value_name = "N")]
        raise_tokens: Option<u64>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Approve a step awaiting approval (tool `approval`): it succeeds, with the
    /// inputs given as its outputs, and the steps after it go on.
    Approve {
        /// The run's id.
        run: String,
        /// The approval step's id.
        step: String,
        /// Recorded with your identity in the run's events and the step's outputs.
        #[arg(long, default_value = "")]
        comment: String,
        /// A value the step asks for (`with.inputs`), NAME=VALUE; repeatable.
        #[arg(long = "input", value_parser = key_value)]
        inputs: Vec<(String, String)>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Reject a step awaiting approval: it fails, as a failed step would.
    Reject {
        /// The run's id.
        run: String,
        /// The approval step's id.
        step: String,
        /// Recorded with your identity in the run's events.
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Start a new run that repeats RUN from one step: that step and the steps
    /// downstream of it run again; every other step that succeeded is reused with its
    /// outputs. Prints the new run's id.
    #[command(group(clap::ArgGroup::new("start").required(true).args(["from", "only"])))]
    Rerun {
        /// The run's id.
        run: String,
        /// Run this step and every step downstream of it again.
        #[arg(long)]
        from: Option<String>,
        /// Run this step alone again; reuse every other.
        #[arg(long)]
        only: Option<String>,
        /// Run parameter KEY=VALUE over the old run's; repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Follow the new run until it ends; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
        /// Run the steps that run again also when the step cache holds their result.
        #[arg(long)]
        no_cache: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Run a failed or canceled run again in place: its failed, canceled and skipped
    /// steps get a fresh retry budget; succeeded steps keep their outputs.
    Retry {
        /// The run's id.
        run: String,
        /// Follow the retried run until it ends; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum SchedulesCommand {
    /// Start FILE's workstream at the times of --cron (in --timezone) or every
    /// --every; prints the schedule's id. Its runs carry the label schedule=ID.
    #[command(group(clap::ArgGroup::new("when").required(true).args(["cron", "every"])))]
    Create {
        /// The spec (YAML or JSON); - reads stdin.
        file: PathBuf,
        /// A cron expression: 5 fields (minute hour day month weekday), or 6 with
        /// seconds first.
        #[arg(long)]
        cron: Option<String>,
        /// An interval instead: 30s, 10m, 1h (at least 1s).
        #[arg(long, value_parser = duration)]
        every: Option<std::time::Duration>,
        /// The cron expression's time zone (IANA name).
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Run parameter KEY=VALUE; repeatable.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// When a time comes and the previous run is still going: skip it, queue it
        /// until that run ends, cancel_previous, or allow both.
        #[arg(long, default_value = "skip", value_parser = ["skip", "queue", "cancel_previous", "allow"])]
        overlap: String,
        /// Which times missed while no controller led start: none, the last, or all.
        #[arg(long, default_value = "none", value_parser = ["none", "last", "all"])]
        catchup: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Every schedule.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// One schedule, with its next times.
    Show {
        /// The schedule's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Start nothing more until resumed.
    Pause {
        /// The schedule's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Start again from the next time after now.
    Resume {
        /// The schedule's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete a schedule (its runs stay).
    Delete {
        /// The schedule's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Start a run of the schedule now; prints its id.
    Trigger {
        /// The schedule's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Cached results, newest first.
    List {
        /// Only those of this workstream.
        #[arg(long)]
        workstream: Option<String>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Forget cached results: those steps run again.
    #[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["workstream", "key", "all"])))]
    Purge {
        /// Those of this workstream.
        #[arg(long)]
        workstream: Option<String>,
        /// Those whose key starts with this.
        #[arg(long)]
        key: Option<String>,
        /// Every one.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BreakersCommand {
    /// List circuit breakers and their states.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Close a tool's breaker, or its breaker on one agent.
    Reset {
        /// The tool's name.
        tool: String,
        /// Agent name (or id).
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// List agents with their tools, labels and slots.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Stop new assignments to an agent (what it runs goes on); --undo resumes them.
    Drain {
        /// Agent name (or id).
        agent: String,
        /// Let it take work again.
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Make a join token and print it on stdout: give it to a new agent
    /// (baton-agent --join-token, with --tls-ca) to enroll it. Needs role admin.
    JoinToken {
        /// How long it may be used.
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: std::time::Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels the agents it enrolls get, as KEY=VALUE (they override the agents' own);
        /// repeat or comma-separate.
        #[arg(long = "labels", value_delimiter = ',', value_parser = key_value)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Revoke an agent: its stream is closed now and it is refused from then on.
    Revoke {
        /// Agent name.
        agent: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum ContextCommand {
    /// Add (or replace) a context from the connection flags given with it: --controller
    /// (required), --tls-ca, --tls-cert, --tls-key, --token-file.
    Add {
        /// The context's name.
        name: String,
        /// Make it the current context too.
        #[arg(long = "use")]
        use_it: bool,
    },
    /// Make a context the current one.
    Use {
        /// The context's name.
        name: String,
    },
    /// List the contexts; the current one is marked with `*`.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Remove a context.
    Remove {
        /// The context's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write DIR/ca.pem and DIR/ca-key.pem (kept 0600; keep it off the network).
    Ca {
        /// The directory to write them to.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write DIR/NAME.pem and DIR/NAME-key.pem, signed by the CA in DIR.
    Issue {
        /// The directory that holds the CA, where the certificate is written too.
        #[arg(long)]
        dir: PathBuf,
        /// controller (a server certificate), agent, or client (a user, with --client-role).
        #[arg(long, value_parser = ["controller", "agent", "client"])]
        role: String,
        /// The certificate's name: the controller's host, the agent's name, the user.
        #[arg(long)]
        name: String,
        /// A DNS name or IP address the certificate is valid for; repeatable (default:
        /// the name).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The role a client certificate carries: reader, submitter, operator or admin.
        #[arg(long, default_value = "reader")]
        client_role: String,
    },
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Store a secret; its value is read from stdin (one trailing newline dropped).
    Set {
        /// The secret's name, as specs refer to it.
        name: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List the secrets' names (never their values).
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create an API token and print it on stdout; it is not shown again.
    Create {
        /// The token's name, as events and reports show its actions.
        #[arg(long)]
        name: String,
        /// reader, submitter, operator or admin.
        #[arg(long)]
        role: String,
        /// Expire after this long (e.g. 30d, 12h); default: never.
        #[arg(long, value_parser = duration)]
        ttl: Option<std::time::Duration>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List tokens (not their secrets).
    List {
        /// Also revoked and expired ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Revoke a token by name or id: its next call fails.
    Revoke {
        /// The token's name or id.
        #[arg(value_name = "TOKEN")]
        name: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    baton_common::time::parse_duration(s)
}

#[derive(Debug, Subcommand)]
enum RouterCommand {
    /// Re-read the router config file the controller was started with; a bad file is
    /// refused and the rules in force are kept.
    Reload,
}

#[derive(Debug, Args)]
struct OutputArg {
    /// Output format: text for people; json (one document), jsonl (one object per line)
    /// or yaml for programs.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: OutputFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
    Jsonl,
    Yaml,
}

impl OutputArg {
    fn format(&self) -> Format {
        match self.output {
            OutputFormat::Text => Format::Text,
            OutputFormat::Json => Format::Json,
            OutputFormat::Jsonl => Format::Jsonl,
            OutputFormat::Yaml => Format::Yaml,
        }
    }
}

fn run_state(s: &str) -> Result<baton_common::state::RunState, String> {
    s.parse().map_err(|e: baton_common::state::UnknownState| {
        let all: Vec<&str> = baton_common::state::RunState::ALL.iter().map(|s| s.as_str()).collect();
        format!("{e} (states: {})", all.join(", "))
    })
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} must look like KEY=VALUE")),
    }
}

/// An error that decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad input, or a run, step, agent or token that does not exist: exit 2.
    Invalid(String),
    /// Anything else: exit 1.
    Other(anyhow::Error),
    /// Ctrl-C or SIGTERM (with the steps that were running): exit 130, as shells do.
    Interrupted(Vec<String>),
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
pub(crate) async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        // Without handlers the default action (ending the process) stays.
        _ => std::future::pending().await,
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::NotFound => Failure::Invalid(s.message().to_string()),
            _ => Failure::Other(anyhow::anyhow!(client::describe(&s))),
        }
    }
}

impl From<client::Error> for Failure {
    fn from(e: client::Error) -> Self {
        match e {
            client::Error::Status(s) => s.into(),
            client::Error::Config(msg) => Failure::Invalid(msg),
            e => Failure::Other(e.into()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    style::init(cli.color);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Invalid(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Interrupted(_)) => ExitCode::from(130),
    }
}

/// The controller list, TLS settings and token: from the flags (or their environment
/// variables), else from the context, else the defaults.
fn target(cli: &Cli) -> Result<client::Target, Failure> {
    let from_context = match context::path() {
        Some(path) => {
            let config = context::Config::load(&path).map_err(Failure::Other)?;
            config
                .pick(cli.context.as_deref().unwrap_or(""))
                .map_err(Failure::Invalid)?
                .map(|(_, c)| c.clone())
        }
        None if cli.context.is_some() => {
            return Err(Failure::Invalid("--context: no config file (set HOME or BATON_CONFIG)".into()));
        }
        None => None,
    }
    .unwrap_or_default();
    let token_file = cli.token_file.clone().or(from_context.token_file);
    let token = match (&cli.token, &token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let bearer = baton_common::connect::Bearer::new(token.as_deref()).map_err(Failure::Invalid)?;
    // A client certificate is taken whole, from the flags or from the context.
    let (cert, key) = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
        _ => (from_context.tls_cert, from_context.tls_key),
    };
    let tls = baton_common::connect::ClientTls { ca: cli.tls_ca.clone().or(from_context.tls_ca), cert, key };
    let urls = match (&cli.controller, from_context.controller) {
        (Some(u), _) => u.clone(),
        (None, u) if !u.is_empty() => u,
        _ => "http://127.0.0.1:7070".to_string(),
    };
    Ok(client::Target { urls, tls, bearer, reconnect_timeout: cli.reconnect_timeout })
}

/// `baton context ...`: edits the config file.
fn contexts(cli: &Cli, cmd: &ContextCommand) -> Result<u8, Failure> {
    let path =
        context::path().ok_or_else(|| Failure::Invalid("no config file: set HOME or BATON_CONFIG".into()))?;
    let mut config = context::Config::load(&path)?;
    let missing = |name: &str, config: &context::Config| {
        Failure::Invalid(config.pick(name).err().unwrap_or_else(|| format!("no context named {name:?}")))
    };
    match cmd {
        ContextCommand::Add { name, use_it } => {
            if name.trim().is_empty() {
                return Err(Failure::Invalid("a context needs a name".into()));
            }
            if cli.token.is_some() {
                return Err(Failure::Invalid(
                    "a context keeps a token file, not a token: give --token-file".into(),
                ));
            }
            let controller = cli.controller.clone().ok_or_else(|| {
                Failure::Invalid(format!("baton context add {name} needs --controller URL"))
            })?;
            if cli.tls_cert.is_some() != cli.tls_key.is_some() {
                return Err(Failure::Invalid(
                    "a client certificate needs both --tls-cert and --tls-key".into(),
                ));
            }
            let c = context::Context {
                controller,
                tls_ca: context::absolute(cli.tls_ca.clone())?,
                tls_cert: context::absolute(cli.tls_cert.clone())?,
                tls_key: context::absolute(cli.tls_key.clone())?,
                token_file: context::absolute(cli.token_file.clone())?,
            };
            let replaced = config.contexts.insert(name.clone(), c).is_some();
            if *use_it || config.current.is_empty() {
                config.current = name.clone();
            }
            config.save(&path)?;
            let what = if replaced { "replaced" } else { "added" };
            eprintln!("context {name} {what} in {}", path.display());
            if config.current == *name {
                eprintln!("context {name} is now in use");
            }
        }
        ContextCommand::Use { name } => {
            if !config.contexts.contains_key(name) {
                return Err(missing(name, &config));
            }
            config.current = name.clone();
            config.save(&path)?;
            eprintln!("context {name} is now in use");
        }
        ContextCommand::Remove { name } => {
            if config.contexts.remove(name).is_none() {
                return Err(missing(name, &config));
            }
            if config.current == *name {
                config.current.clear();
            }
            config.save(&path)?;
            eprintln!("context {name} removed");
        }
        ContextCommand::List { out } => match out.format() {
            Format::Text => {
                let rows = config
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        let file = |p: &Option<PathBuf>| {
                            p.as_ref().map_or("-".to_string(), |p| p.display().to_string())
                        };
                        vec![
                            if *name == config.current { "*".to_string() } else { String::new() },
                            name.clone(),
                            c.controller.clone(),
                            file(&c.tls_ca),
                            file(&c.token_file),
                        ]
                    })
                    .collect();
                output::table(&["CURRENT", "NAME", "CONTROLLER", "CA", "TOKEN FILE"], rows);
            }
            f => output::print_json(f, &config),
        },
    }
    Ok(0)
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Certs(cmd) => return certs(cmd),
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "baton",
                &mut script,
            );
            output::write_out(&script);
            return Ok(0);
        }
        Command::Man { dir } => return man_pages(dir),
        Command::Context(cmd) => return contexts(&cli, cmd),
        _ => {}
    }
    let target = target(&cli)?;
    match cli.command {
        Command::Validate { file, out } => validate(&file, out.format()),
        Command::Submit { file, watch, params, name, labels, no_cache, priority, out } => {
            let (source, text) = read_spec(&file)?;
            // One request id for every try: a submit whose answer was lost is not
            // made twice.
            let req = pb::SubmitRunRequest {
                spec: text,
                source,
                params: Some(client::params(params)),
                request_id: uuid::Uuid::new_v4().to_string(),
                name,
                labels: labels.into_iter().collect(),
                no_cache,
                priority,
            };
            let (mut c, run_id) = client::submit(&target, req).await?;
            if watch {
                if out.format() == Format::Text {
                    eprintln!("run {run_id} submitted");
                }
                return watch_until_interrupted(&mut c, &target, &run_id, 1, out.format(), None).await;
            }
            match out.format() {
                Format::Text => out!("{run_id}"),
                f => output::print_json(f, &serde_json::json!({ "run_id": run_id })),
            }
            Ok(0)
        }
        Command::Certs(_) | Command::Completion { .. } | Command::Man { .. } | Command::Context(_) => Ok(0),
        Command::Runs(cmd) => runs(&target, cmd).await,
        Command::Tokens(cmd) => tokens(&target, cmd).await,
        Command::Secrets(cmd) => secrets(&target, cmd).await,
        Command::Whoami { out } => {
            let me = client::admin(&target).await?.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            match out.format() {
                Format::Text if !me.auth_required => {
                    out!("{} (authentication is off on this controller)", me.name)
                }
                Format::Text => out!("{} ({}) via {}", me.name, me.role, me.via),
                f => output::print_json(f, &me),
            }
            Ok(0)
        }
        Command::Agents(AgentsCommand::List { out }) => {
            let mut c = client::connect(&target).await?;
            let agents = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
            output::agents(out.format(), &agents);
            Ok(0)
        }
        Command::Agents(AgentsCommand::Drain { agent, undo, out }) => {
            let mut c = client::connect(&target).await?;
            let a = c.drain_agent(pb::DrainAgentRequest { agent, undo }).await?.into_inner();
            match out.format() {
                Format::Text if a.draining => out!("agent {} is draining: it takes no new work", a.name),
                Format::Text => out!("agent {} takes work again", a.name),
                f => output::print_json(f, &a),
            }
            Ok(0)
        }
        Command::Agents(AgentsCommand::JoinToken { ttl, uses, labels, out }) => {
            let req = pb::CreateJoinTokenRequest {
                ttl: Some(baton_common::proto::duration(baton_common::time::ms(ttl))),
                uses,
                labels: labels.into_iter().collect(),
            };
            let r = client::admin(&target).await?.create_join_token(req).await?.into_inner();
            match out.format() {
                Format::Text => {
                    out!("{}", r.token);
                    eprintln!(
                        "join token {} for {} agent(s), valid until {}",
                        r.id,
                        r.uses,
                        output::time(output::ms(&r.expires_at))
                    );
                }
                f => output::print_json(f, &r),
            }
            Ok(0)
        }
        Command::Agents(AgentsCommand::Revoke { agent, out }) => {
            let r = client::admin(&target)
                .await?
                .revoke_agent(pb::RevokeAgentRequest { agent })
                .await?
                .into_inner();
            match out.format() {
                Format::Text => out!("agent {} revoked ({} session(s) closed)", r.name, r.closed),
                f => output::print_json(f, &r),
            }
            Ok(0)
        }
        Command::Router(RouterCommand::Reload) => {
            let mut c = client::connect(&target).await?;
            let r = c.reload_router(pb::ReloadRouterRequest {}).await?.into_inner();
            out!("router reloaded: {} rules", r.rules);
            Ok(0)
        }
        Command::Schedules(cmd) => schedules(&target, cmd).await,
        Command::Cache(CacheCommand::List { workstream, out }) => {
            let mut c = client::connect(&target).await?;
            let req = pb::ListCacheRequest { workstream: workstream.unwrap_or_default() };
            output::cache(out.format(), &c.list_cache(req).await?.into_inner().entries);
            Ok(0)
        }
        Command::Cache(CacheCommand::Purge { workstream, key, all: _ }) => {
            let mut c = client::connect(&target).await?;
            let req = pb::PurgeCacheRequest {
                workstream: workstream.unwrap_or_default(),
                key_prefix: key.unwrap_or_default(),
            };
            let n = c.purge_cache(req).await?.into_inner().purged;
            out!("{n} cached results forgotten");
            Ok(0)
        }
        Command::Breakers(cmd) => {
            let mut c = client::connect(&target).await?;
            let (breakers, out) = match cmd {
                BreakersCommand::List { out } => {
                    (c.list_breakers(pb::ListBreakersRequest {}).await?.into_inner().breakers, out)
                }
                BreakersCommand::Reset { tool, agent, out } => {
                    let req = pb::ResetBreakerRequest { tool, agent: agent.unwrap_or_default() };
                    (c.reset_breaker(req).await?.into_inner().breakers, out)
                }
            };
            output::breakers(out.format(), &breakers);
            Ok(0)
        }
        Command::Dev { file, agents, slots, db, router, params, out } => {
            let params: BTreeMap<String, String> = params.into_iter().collect();
            dev::run(&file, agents, slots, db, router, params, out.format()).await
        }
    }
}

/// Writes a man page for `baton` and for each of its subcommands, named by their path
/// (`baton-runs-list.1`).
fn man_pages(dir: &Path) -> Result<u8, Failure> {
    fn write(cmd: clap::Command, name: String, dir: &Path, written: &mut usize) -> anyhow::Result<()> {
        let cmd = cmd.name(name.clone());
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        *written += 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let mut written = 0;
    write(cmd, "baton".into(), dir, &mut written)?;
    eprintln!("{written} man pages written to {}", dir.display());
    Ok(0)
}

fn certs(cmd: &CertsCommand) -> Result<u8, Failure> {
    use baton_common::certs::{self, Kind};
    match cmd {
        CertsCommand::Ca { dir } => {
            let (cert, key) = certs::create_ca(dir).map_err(|e| Failure::Other(anyhow::anyhow!(e)))?;
            out!("{}", cert.display());
            eprintln!("CA written: {} and {} (keep the key secret)", cert.display(), key.display());
        }
        CertsCommand::Issue { dir, role, name, hosts, client_role } => {
            let kind = match role.as_str() {
                "controller" => Kind::Controller,
                "agent" => Kind::Agent,
                _ => {
                    let r: baton_common::auth::Role = client_role.parse().map_err(Failure::Invalid)?;
                    if !baton_common::auth::USER_ROLES.contains(&r) {
                        return Err(Failure::Invalid(format!(
                            "--client-role {r}: a client certificate carries reader, submitter, operator or admin"
                        )));
                    }
                    Kind::Client(r)
                }
            };
            let (cert, key) =
                certs::issue(dir, kind, name, hosts).map_err(|e| Failure::Other(anyhow::anyhow!(e)))?;
            out!("{}", cert.display());
            eprintln!("certificate written: {} and {}", cert.display(), key.display());
        }
    }
    Ok(0)
}

async fn secrets(target: &client::Target, cmd: SecretsCommand) -> Result<u8, Failure> {
    let mut a = client::admin(target).await?;
    match cmd {
        SecretsCommand::Set { name, out } => {
            use std::io::{IsTerminal, Read};
            if std::io::stdin().is_terminal() {
                eprintln!("value of secret {name} (end with Ctrl-D):");
            }
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).context("cannot read the value from stdin")?;
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            let info =
                a.set_secret(pb::SetSecretRequest { name, value: value.to_string() }).await?.into_inner();
            if value.len() < baton_common::redact::MIN_LEN {
                eprintln!(
                    "warning: values shorter than {} bytes are not masked in output",
                    baton_common::redact::MIN_LEN
                );
            }
            match out.format() {
                Format::Text => out!("secret {} stored", info.name),
                f => output::print_json(f, &info),
            }
        }
        SecretsCommand::List { out } => {
            let secrets = a.list_secrets(pb::ListSecretsRequest {}).await?.into_inner().secrets;
            output::secrets(out.format(), &secrets);
        }
        SecretsCommand::Delete { name, out } => {
            let info = a.delete_secret(pb::DeleteSecretRequest { name }).await?.into_inner();
            match out.format() {
                Format::Text => out!("secret {} deleted", info.name),
                f => output::print_json(f, &info),
            }
        }
    }
    Ok(0)
}

async fn tokens(target: &client::Target, cmd: TokensCommand) -> Result<u8, Failure> {
    let mut a = client::admin(target).await?;
    match cmd {
        TokensCommand::Create { name, role, ttl, out } => {
            let ttl = ttl.map(|t| baton_common::proto::duration(baton_common::time::ms(t)));
            let r = a.create_token(pb::CreateTokenRequest { name, role, ttl }).await?.into_inner();
            match out.format() {
                Format::Text => {
                    out!("{}", r.token);
                    if let Some(i) = &r.info {
                        eprintln!("token {:?} ({}) created; it is shown only this once", i.name, i.role);
                    }
                }
                f => output::print_json(f, &r),
            }
        }
        TokensCommand::List { all, out } => {
            let tokens = a.list_tokens(pb::ListTokensRequest { all }).await?.into_inner().tokens;
            output::tokens(out.format(), &tokens);
        }
        TokensCommand::Revoke { name, out } => {
            let t = a.revoke_token(pb::RevokeTokenRequest { token: name }).await?.into_inner();
            match out.format() {
                Format::Text => out!("token {:?} ({}) revoked", t.name, t.id),
                f => output::print_json(f, &t),
            }
        }
    }
    Ok(0)
}

async fn runs(target: &client::Target, cmd: RunsCommand) -> Result<u8, Failure> {
    // Following a run or its logs rides a controller restart or a leader change.
    let follows = matches!(cmd, RunsCommand::Watch { .. } | RunsCommand::Logs { follow: true, .. });
    let mut c =
        if follows { client::connect_waiting(target).await? } else { client::connect(target).await? };
    match cmd {
        RunsCommand::List { state, workstream, labels, limit, out } => {
            let mut req = pb::ListRunsRequest {
                states: state.iter().map(|s| s.to_pb()).collect(),
                workstream,
                labels: labels.into_iter().collect(),
                page_size: limit.min(1000),
                page_token: String::new(),
            };
            let mut runs = Vec::new();
            loop {
                let page = c.list_runs(req.clone()).await?.into_inner();
                runs.extend(page.runs);
                if page.next_page_token.is_empty() || runs.len() >= limit as usize {
                    break;
                }
                req.page_token = page.next_page_token;
            }
            runs.truncate(limit as usize);
            output::runs(out.format(), &runs);
        }
        RunsCommand::Show { run, out } => {
            let run =
                c.get_run(pb::GetRunRequest { run_id: run, ..Default::default() }).await?.into_inner().run;
            if let Some(run) = run {
                output::run(out.format(), &run);
            }
        }
        RunsCommand::Watch { run, from_seq, out } => {
            let run =
                c.get_run(pb::GetRunRequest { run_id: run, ..Default::default() }).await?.into_inner().run;
            let id = run.as_ref().map(|r| r.id.clone()).unwrap_or_default();
            return watch_until_interrupted(&mut c, target, &id, from_seq, out.format(), run).await;
        }
        RunsCommand::Cancel { run, step, reason, out } => {
            let req = pb::CancelRunRequest { run_id: run, reason, step_id: step.clone().unwrap_or_default() };
            let resp = c.cancel_run(req).await?.into_inner();
            match (out.format(), step) {
                (Format::Text, None) => out!("run {} {}", resp.run_id, output::run_state(resp.state)),
                (Format::Text, Some(s)) => {
                    out!(
                        "step {s} of run {} canceled; the run is {}",
                        resp.run_id,
                        output::run_state(resp.state)
                    )
                }
                (f, _) => output::print_json(f, &resp),
            }
        }
        RunsCommand::Logs { run, step, attempt, follow, out } => {
            let whole = step.is_none();
            let req = pb::GetLogsRequest {
                run_id: run,
                step_id: step.unwrap_or_default(),
                attempt: attempt.unwrap_or(0),
                follow,
                from_seq: 0,
            };
            let mut printer = output::LogPrinter::new(whole, out.format());
            // Bytes printed per (step, attempt): a stream opened again after a lost
            // controller starts from the beginning, and what was printed is skipped.
            let mut printed: std::collections::HashMap<(String, u32), usize> = Default::default();
            let mut down_since: Option<std::time::Instant> = None;
            loop {
                let result = async {
                    let mut stream = c.get_logs(req.clone()).await?.into_inner();
                    let mut seen: std::collections::HashMap<(String, u32), usize> = Default::default();
                    while let Some(mut chunk) = stream.message().await? {
                        down_since = None;
                        let key = (chunk.step_id.clone(), chunk.attempt);
                        let at = seen.entry(key.clone()).or_default();
                        let done = printed.entry(key).or_default();
                        let start = *at;
                        *at += chunk.data.len();
                        if *at <= *done {
                            continue;
                        }
                        chunk.data.drain(..done.saturating_sub(start));
                        *done = *at;
                        printer.chunk(&chunk);
                    }
                    Ok::<(), tonic::Status>(())
                }
                .await;
                match result {
                    Ok(()) => break,
                    Err(s) if follow && client::transient(&s) => {
                        let since = *down_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > target.reconnect_timeout {
                            return Err(s.into());
                        }
                        eprintln!("lost the controller ({}); reconnecting", s.message());
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        if let Ok(leader) = client::connect(target).await {
                            c = leader;
                        }
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            printer.finish();
        }
        RunsCommand::Report { run, format, out } => {
            let format = match format.as_str() {
                "json" => pb::ReportFormat::Json,
                "html" => pb::ReportFormat::Html,
                _ => pb::ReportFormat::Markdown,
            };
            let req = pb::GetReportRequest { run_id: run, format: format as i32 };
            let r = c.get_report(req).await?.into_inner();
            match out {
                Some(path) => {
                    std::fs::write(&path, &r.content)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("report written to {}", path.display());
                }
                None => out_raw!("{}", r.content),
            }
        }
        RunsCommand::Delete { run, out } => {
            let resp = c.delete_run(pb::DeleteRunRequest { run_id: run }).await?.into_inner();
            match out.format() {
                Format::Text => out!("run {} deleted ({} rows)", resp.run_id, resp.rows),
                f => output::print_json(f, &resp),
            }
        }
        RunsCommand::Rerun { run, from, only, params, watch, no_cache, out } => {
            let req = pb::RerunRunRequest {
                run_id: run,
                only: only.is_some(),
                from_step: only.or(from).unwrap_or_default(),
                params: Some(client::params(params)),
                request_id: uuid::Uuid::new_v4().to_string(),
                no_cache,
            };
            let resp = c.rerun_run(req).await?.into_inner();
            if watch {
                if out.format() == Format::Text {
                    eprintln!("run {} started ({} steps reused)", resp.run_id, resp.reused);
                }
                return watch_until_interrupted(&mut c, target, &resp.run_id, 1, out.format(), None).await;
            }
            match out.format() {
                Format::Text => out!("{}", resp.run_id),
                f => output::print_json(f, &resp),
            }
        }
        RunsCommand::Artifacts { run, download, out } => {
            let list = c.list_artifacts(pb::ListArtifactsRequest { run_id: run }).await?.into_inner();
            let Some(dir) = download else {
                output::artifacts(out.format(), &list.artifacts);
                return Ok(0);
            };
            for a in &list.artifacts {
                let path = download_artifact(&mut c, &list.run_id, a, &dir).await?;
                if out.format() == Format::Text {
                    out!(
                        "{} ({} bytes, sha256 {})",
                        path.display(),
                        a.size,
                        &a.sha256[..12.min(a.sha256.len())]
                    );
                }
            }
            if out.format() != Format::Text {
                output::artifacts(out.format(), &list.artifacts);
            }
        }
        RunsCommand::Retry { run, watch, out } => {
            let resp = c.retry_run(pb::RetryRunRequest { run_id: run }).await?.into_inner();
            if watch {
                eprintln!("run {} retried", resp.run_id);
                return watch_until_interrupted(&mut c, target, &resp.run_id, resp.seq, out.format(), None)
                    .await;
            }
            match out.format() {
                Format::Text => out!("run {} retried; it is {}", resp.run_id, output::run_state(resp.state)),
                f => output::print_json(f, &resp),
            }
        }
        RunsCommand::Approve { run, step, comment, inputs, out } => {
            decide(&mut c, run, step, true, comment, inputs, out.format()).await?;
        }
        RunsCommand::Reject { run, step, comment, out } => {
            decide(&mut c, run, step, false, comment, Vec::new(), out.format()).await?;
        }
        RunsCommand::Release { run, raise_budget, raise_tokens, out } => {
            let req =
                pb::ReleaseRunRequest { run_id: run, max_cost_usd: raise_budget, max_tokens: raise_tokens };
            let resp = c.release_run(req).await?.into_inner();
            match out.format() {
                Format::Text => {
                    out!("run {} released; it is {}", resp.run_id, output::run_state(resp.state))
                }
                f => output::print_json(f, &resp),
            }
        }
    }
    Ok(0)
}

/// Follows a run; Ctrl-C stops following (the run goes on) and says how to resume.
/// Approves or rejects an approval step.
async fn decide(
    c: &mut client::Client,
    run: String,
    step: String,
    approve: bool,
    comment: String,
    inputs: Vec<(String, String)>,
    format: Format,
) -> Result<(), Failure> {
    let req = pb::DecideApprovalRequest {
        run_id: run,
        step_id: step.clone(),
        approve,
        comment,
        inputs: Some(client::params(inputs)),
    };
    let resp = c.decide_approval(req).await?.into_inner();
    match format {
        Format::Text => {
            let how = if approve { "approved" } else { "rejected" };
            out!("step {step} of run {} {how}; the run is {}", resp.run_id, output::run_state(resp.state));
        }
        f => output::print_json(f, &resp),
    }
    Ok(())
}

async fn watch_until_interrupted(
    c: &mut client::Client,
    target: &client::Target,
    run_id: &str,
    from_seq: i64,
    format: Format,
    known: Option<pb::Run>,
) -> Result<u8, Failure> {
    tokio::select! {
        r = watch::watch(c, target, run_id, from_seq, format, known) => r,
        _ = interrupted() => {
            eprintln!("\nstopped watching; run {run_id} goes on (baton runs watch {run_id}, or baton runs cancel {run_id})");
            Err(Failure::Interrupted(Vec::new()))
        }
    }
}

/// The spec at `file`, or on stdin for `-`, with the name its errors are reported under.
fn read_spec(file: &Path) -> Result<(String, String), Failure> {
    let limit = baton_common::spec::MAX_SPEC_BYTES;
    let too_big = |source: &str, len: u64| {
        Failure::Invalid(format!("{source}: the spec is {len} bytes; the limit is {limit}"))
    };
    if file == Path::new("-") {
        use std::io::Read;
        let mut bytes = Vec::new();
        // One byte past the limit is enough to know it is too big.
        std::io::stdin()
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Invalid(format!("cannot read the spec from stdin: {e}")))?;
        if bytes.len() > limit {
            return Err(Failure::Invalid(format!("<stdin>: the spec is over the limit of {limit} bytes")));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| Failure::Invalid(format!("<stdin>: the spec is not UTF-8: {e}")))?;
        return Ok(("<stdin>".to_string(), text));
    }
    // A file past the limit is refused before it is read, like the controller would.
    if let Ok(meta) = std::fs::metadata(file)
        && meta.is_file()
        && meta.len() > limit as u64
    {
        return Err(too_big(&file.display().to_string(), meta.len()));
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))
        .map_err(|e| Failure::Invalid(format!("{e:#}")))?;
    Ok((file.display().to_string(), text))
}

fn validate(file: &Path, format: Format) -> Result<u8, Failure> {
    let (source, text) = read_spec(file)?;
    match baton_common::spec::parse(&source, &text) {
        Ok(ws) => {
            match format {
                Format::Text => {
                    out!("{source}: ok, workstream {:?} with {} steps", ws.name, ws.steps.len())
                }
                f => output::print_json(
                    f,
                    &serde_json::json!({"file": source, "valid": true, "workstream": ws.name, "steps": ws.steps.len()}),
                ),
            }
            Ok(0)
        }
        Err(e) => {
            if format != Format::Text {
                let problems: Vec<String> = e.to_string().lines().map(str::to_string).collect();
                output::print_json(
                    format,
                    &serde_json::json!({"file": source, "valid": false, "problems": problems}),
                );
            }
            Err(Failure::Invalid(e.to_string()))
        }
    }
}

/// `baton schedules ...`.
async fn schedules(target: &client::Target, cmd: SchedulesCommand) -> Result<u8, Failure> {
    let mut c = client::connect(target).await?;
    let by_id = |id: String| pb::ScheduleRequest { schedule_id: id };
    let (schedule, out) = match cmd {
        SchedulesCommand::Create { file, cron, every, timezone, params, overlap, catchup, out } => {
            let (source, spec) = read_spec(&file)?;
            let req = pb::CreateScheduleRequest {
                spec,
                source,
                cron: cron.unwrap_or_default(),
                every: every.map(|d| baton_common::proto::duration(d.as_millis() as i64)),
                timezone,
                params: Some(client::params(params)),
                overlap,
                catchup,
            };
            let s = c.create_schedule(req).await?.into_inner();
            match out.format() {
                Format::Text => out!("{}", s.id),
                f => output::print_json(f, &s),
            }
            return Ok(0);
        }
        SchedulesCommand::List { out } => {
            let list = c.list_schedules(pb::ListSchedulesRequest {}).await?.into_inner().schedules;
            output::schedules(out.format(), &list);
            return Ok(0);
        }
        SchedulesCommand::Show { id, out } => (c.get_schedule(by_id(id)).await?.into_inner(), out),
        SchedulesCommand::Pause { id, out } => (c.pause_schedule(by_id(id)).await?.into_inner(), out),
        SchedulesCommand::Resume { id, out } => (c.resume_schedule(by_id(id)).await?.into_inner(), out),
        SchedulesCommand::Delete { id, out } => (c.delete_schedule(by_id(id)).await?.into_inner(), out),
        SchedulesCommand::Trigger { id, out } => {
            let run_id = c.trigger_schedule(by_id(id)).await?.into_inner().run_id;
            match out.format() {
                Format::Text => out!("{run_id}"),
                f => output::print_json(f, &serde_json::json!({ "run_id": run_id })),
            }
            return Ok(0);
        }
    };
    output::schedule(out.format(), &schedule);
    Ok(0)
}

/// Fetches one artifact into `dir/STEP/PATH`, checked against its size and SHA-256;
/// written beside its place first and moved there once whole.
async fn download_artifact(
    c: &mut client::Client,
    run_id: &str,
    a: &pb::ArtifactInfo,
    dir: &std::path::Path,
) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    baton_common::artifacts::check_path(&a.path).map_err(anyhow::Error::msg)?;
    baton_common::artifacts::check_path(&a.step_id).map_err(anyhow::Error::msg)?;
    let path = dir.join(&a.step_id).join(&a.path);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let part = path.with_extension("part");
    let mut f =
        tokio::fs::File::create(&part).await.with_context(|| format!("cannot write {}", part.display()))?;
    let req = pb::GetArtifactRequest {
        run_id: run_id.to_string(),
        step_id: a.step_id.clone(),
        path: a.path.clone(),
    };
    let mut stream = c.get_artifact(req).await?.into_inner();
    let mut sum = baton_common::artifacts::Checksum::default();
    let mut n = 0u64;
    while let Some(chunk) = stream.message().await? {
        sum.update(&chunk.data);
        n += chunk.data.len() as u64;
        f.write_all(&chunk.data).await.with_context(|| format!("cannot write {}", part.display()))?;
    }
    f.flush().await?;
    let got = sum.finish();
    if n != a.size || got != a.sha256 {
        let _ = tokio::fs::remove_file(&part).await;
        anyhow::bail!(
            "{} of step {} arrived damaged: {n} bytes with SHA-256 {got}, expected {} bytes with {}",
            a.path,
            a.step_id,
            a.size,
            a.sha256
        );
    }
    tokio::fs::rename(&part, &path)
        .await
        .with_context(|| format!("cannot move {} into place", part.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and argument a user can see says what it is for.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && path != "baton" {
                missing.push(path.to_string());
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if !arg.is_hide_set() && arg.get_help().is_none() && id != "help" && id != "version" {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "baton", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
