//! Baton's agent: connects to a controller, runs the attempts it is assigned with the
//! tool adapters of this machine, and reports their progress and results.
//!
//! Attempts live independently of the controller stream: a broken stream loses no
//! running tool and no result. Results are kept until the controller acknowledges them
//! and are re-sent in the next Hello.

pub mod adapters;
mod artifacts;
pub mod contain;
mod pipeline;
mod scratch;
pub mod spawn;
pub mod warden;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use baton_common::outcome::{FailureClass, Outcome};
use baton_common::pb::agent_message::Msg as Out;
use baton_common::pb::controller_message::Msg as In;
use baton_common::{pb, proto};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use adapters::{Adapter, AttemptContext, Output};
use baton_common::metrics::Family;

/// Everything an agent needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Controller URLs (`http://host:port`), tried in turn.
    pub controllers: Vec<String>,
    pub name: String,
    /// Attempts run at once.
    pub slots: u32,
    /// Holds the agent id and the attempts' working directories.
    pub work_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Advertise only these tools (of those that work here); `None` for all.
    pub tools: Option<Vec<String>>,
    /// Never run these tools (e.g. `shell`, `aider`), whatever `tools` says.
    pub disable_tools: Vec<String>,
    /// Stop running tools when no heartbeat sent in this long was answered, so that a
    /// step the controller re-assigned elsewhere does not run twice. The controller's
    /// own `stop_after` (sent on connect) applies when it is shorter, or when unset.
    pub stop_after: Option<Duration>,
    /// Contain each attempt in a cgroup of its own where this process may create them.
    pub cgroups: bool,
    /// The agent executable, started as `--warden` beside the agent so that its tools
    /// are ended in time even when the agent is stopped or stuck; `None`: no warden.
    pub warden: Option<PathBuf>,
    /// Reconnect backoff bounds (exponential, jittered).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Serve `/metrics`, `/healthz` and `/readyz` on this address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS settings for `https://` controllers (CA; client certificate for mutual TLS).
    pub tls: baton_common::connect::ClientTls,
    /// A join token to enroll with, when the agent has no credential yet: it is traded
    /// once for the agent's own credential, kept in `WORK_DIR/agent-credential` (0600).
    pub join_token: Option<String>,
    /// Where to send OpenTelemetry traces (OTLP/gRPC): a span per attempt, a child of
    /// the controller's span for it.
    pub otlp: Option<String>,
}

impl Config {
    pub fn new(
        controller: impl Into<String>,
        name: impl Into<String>,
        work_dir: impl Into<PathBuf>,
    ) -> Config {
        Config {
            controllers: vec![controller.into()],
            name: name.into(),
            slots: 1,
            work_dir: work_dir.into(),
            labels: BTreeMap::new(),
            tools: None,
            disable_tools: Vec::new(),
            stop_after: None,
            cgroups: true,
            warden: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            metrics_listen: None,
            tls: Default::default(),
            join_token: None,
            otlp: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad configuration: {0}")]
    Config(String),
    /// The controller refuses this agent's credential (revoked, unknown, or not allowed
    /// to act as this agent): retrying will not help.
    #[error("the controller refused this agent: {0}")]
    Refused(String),
}

/// How long a stopping agent waits for the controller to acknowledge the results of
/// the attempts it stopped.
const SHUTDOWN_ACKS: Duration = Duration::from_secs(5);

/// Why the agent stopped a tool; decides the reported outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Timeout,
    Canceled,
    /// The controller no longer wants the attempt; its result is dropped.
    Abandoned,
    Shutdown,
    Unreachable,
}

enum Event {
    Output(pb::AttemptRef, u64, Vec<u8>),
    Finished(pb::AttemptFinished),
}

struct Running {
    attempt: pb::AttemptRef,
    stop: CancellationToken,
    /// Cuts the stop's grace short (SIGKILL now).
    kill: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl Running {
    fn stop(&self, why: StopReason) {
        let _ = self.reason.set(why);
        self.stop.cancel();
    }

    /// Stops the tool with at most `grace` between SIGTERM and SIGKILL.
    fn stop_within(&self, why: StopReason, grace: Duration) {
        if self.reason.get().is_some() {
            return;
        }
        self.stop(why);
        let kill = self.kill.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            kill.cancel();
        });
    }
}

/// The agent's lease with its controller: renewed by every answered heartbeat, from
/// the time the heartbeat was sent. When it runs out, the agent stops its tools.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Send time of the latest heartbeat (or Hello) the controller answered.
    renewed: Instant,
    stop_after: Duration,
    /// SIGTERM to SIGKILL when the lease ran out.
    grace: Duration,
}

impl Lease {
    fn expires(&self) -> Instant {
        self.renewed + self.stop_after
    }
}

struct Agent {
    cfg: Config,
    id: String,
    tools: Vec<pb::Tool>,
    adapters: HashMap<String, Arc<dyn Adapter>>,
    scratch: scratch::Scratch,
    running: HashMap<String, Running>,
    /// Attempts assigned beyond the slots (prefetched), started as slots free up.
    queued: std::collections::VecDeque<pb::Assign>,
    /// Finished results not acknowledged yet, oldest first.
    unacked: Vec<pb::AttemptFinished>,
    /// How recent attempts ended here, for the pipelined attempts that follow them.
    outcomes: pipeline::Outcomes,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    draining: bool,
    metrics: Arc<AgentMetrics>,
    /// Sessions opened so far.
    sessions: u64,
    /// The credential presented to the controller (none with a client certificate, or
    /// when the controller needs none).
    bearer: baton_common::connect::Bearer,
    contain: contain::Containment,
    /// The zero of heartbeats' `sent_ms`.
    clock: Instant,
    /// None before the first Welcome.
    lease: Option<Lease>,
    warden: Option<warden::Warden>,
    /// Since when no controller could be reached, and when that was last said.
    unreachable: Option<(Instant, Instant)>,
    traces: Option<Arc<baton_common::trace::Exporter>>,
    /// The current session's client, for artifacts (none between sessions).
    transfer: tokio::sync::watch::Sender<Option<artifacts::Transfer>>,
}

/// How often an agent that cannot reach any controller says so again.
const UNREACHABLE_REMINDER: Duration = Duration::from_secs(60);

/// The agent's metrics.
pub struct AgentMetrics {
    running: Family,
    attempts: Family,
    reconnects: Family,
    connected: Family,
    slots: Family,
    build: Family,
    process: baton_common::metrics::ProcessMetrics,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        AgentMetrics {
            running: Family::gauge("baton_agent_running_attempts", "Attempts running on this agent.", &[]),
            attempts: Family::counter(
                "baton_agent_attempts_total",
                "Attempts that ended, by outcome.",
                &["outcome"],
            ),
            reconnects: Family::counter(
                "baton_agent_reconnects_total",
                "Sessions opened with a controller after the first.",
                &[],
            ),
            connected: Family::gauge("baton_agent_connected", "1 while a controller session is up.", &[]),
            slots: Family::gauge("baton_agent_slots", "Attempts this agent runs at once at most.", &[]),
            build: baton_common::metrics::build_info("baton-agent"),
            process: Default::default(),
        }
    }

    fn render(&self) -> String {
        self.process.refresh();
        let mut families =
            vec![&self.build, &self.running, &self.slots, &self.attempts, &self.reconnects, &self.connected];
        families.extend(self.process.families());
        baton_common::metrics::render(&families, &[])
    }
}

/// Longest wait for a controller to welcome a new session (a host that accepts the
/// connection but never answers, such as a paused controller).
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How a session ended.
enum SessionEnd {
    Shutdown,
    Broken(String),
    /// The controller refused the agent's credential.
    Refused(String),
    /// A standby answered, naming the leader: go there next.
    Redirect(String),
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    if cfg.controllers.is_empty() {
        return Err(AgentError::Config("no controller address given".into()));
    }
    if cfg.slots == 0 {
        return Err(AgentError::Config("slots must be at least 1".into()));
    }
    let attempts_dir = cfg.work_dir.join("attempts");
    std::fs::create_dir_all(&attempts_dir)
        .map_err(|e| AgentError::Io { path: attempts_dir.clone(), source: e })?;
    let id = agent_id(&cfg.work_dir)?;
    let (adapters, tools) = probe_tools(cfg.tools.as_deref(), &cfg.disable_tools)?;
    let credential = match credential(&cfg, &id, &shutdown).await? {
        Credential::ShutDown => return Ok(()),
        Credential::Bearer(c) => c,
    };
    let bearer = baton_common::connect::Bearer::new(credential.as_deref()).map_err(AgentError::Config)?;
    let contain = contain::Containment::open(&cfg.work_dir, &id, cfg.cgroups)
        .map_err(|e| AgentError::Io { path: cfg.work_dir.join("running"), source: e })?;
    // What a previous life left running ends before any new work is taken.
    let leftovers = contain.end_leftovers().await;
    let warden = cfg.warden.as_deref().and_then(|exe| warden::Warden::start(exe, &cfg.work_dir));
    info!(agent = %cfg.name, agent_id = %id, tools = %tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","), "agent starting");
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let traces = match &cfg.otlp {
        Some(endpoint) => {
            let e =
                baton_common::trace::Exporter::new(endpoint, "baton-agent").map_err(AgentError::Config)?;
            info!(endpoint = %endpoint, "sending traces of attempts over OTLP");
            Some(Arc::new(e))
        }
        None => None,
    };
    let metrics = Arc::new(AgentMetrics::new());
    metrics.slots.set(&[], f64::from(cfg.slots));
    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Config(format!("cannot listen on {addr} for metrics: {e}")))?;
        let m = metrics.clone();
        let render: baton_common::metrics::RenderFn = Arc::new(move || {
            let m = m.clone();
            Box::pin(async move { m.render() })
        });
        let m = metrics.clone();
        let ready: baton_common::metrics::ReadyFn = Arc::new(move || {
            let up = m.connected.get(&[]) > 0.0;
            Box::pin(async move { if up { Ok(()) } else { Err("no controller session".to_string()) } })
        });
        let probes = baton_common::metrics::Probes { render, ready, authorize: None };
        tokio::spawn(baton_common::metrics::serve(listener, probes, shutdown.clone()));
    }
    let mut agent = Agent {
        cfg,
        id,
        tools,
        adapters,
        scratch: scratch::Scratch::new(attempts_dir),
        running: HashMap::new(),
        queued: std::collections::VecDeque::new(),
        unacked: leftovers,
        outcomes: pipeline::Outcomes::default(),
        events_tx,
        events_rx,
        draining: false,
        metrics,
        sessions: 0,
        bearer,
        contain,
        clock: Instant::now(),
        lease: None,
        warden,
        unreachable: None,
        traces,
        transfer: tokio::sync::watch::channel(None).0,
    };
    let result = agent.main_loop(shutdown).await;
    agent.contain.close();
    if let Some(t) = agent.traces.take() {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    result
}

/// What the agent presents to the controller.
enum Credential {
    /// Its bearer credential; none with a client certificate, or for a controller
    /// without authentication.
    Bearer(Option<String>),
    /// Shut down while enrolling.
    ShutDown,
}

/// The agent's own credential: the one it enrolled for before (in its work dir), else
/// one it enrolls for now with its join token, else none.
async fn credential(
    cfg: &Config,
    agent_id: &str,
    shutdown: &CancellationToken,
) -> Result<Credential, AgentError> {
    let path = cfg.work_dir.join("agent-credential");
    match tokio::fs::read_to_string(&path).await {
        Ok(s) if !s.trim().is_empty() => return Ok(Credential::Bearer(Some(s.trim().to_string()))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::Io { path, source: e }),
    }
    let Some(join) = cfg.join_token.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(Credential::Bearer(None));
    };
    let bearer = baton_common::connect::Bearer::new(Some(join)).map_err(AgentError::Config)?;
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut target = 0;
    loop {
        let url = &cfg.controllers[target % cfg.controllers.len()];
        target += 1;
        let req = pb::EnrollRequest { agent_id: agent_id.to_string(), name: cfg.name.clone() };
        let attempt = async {
            let endpoint = baton_common::connect::endpoint(url, &cfg.tls).map_err(|e| (None, e))?;
            let ch = endpoint
                .connect()
                .await
                .map_err(|e| (None, format!("connect {url}: {}", baton_common::connect::error_chain(&e))))?;
            let ch = tonic::service::interceptor::InterceptedService::new(ch, bearer.clone());
            pb::agent_service_client::AgentServiceClient::new(ch)
                .enroll(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| (Some(s.code()), s.message().to_string()))
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Credential::ShutDown),
            r = attempt => r,
        };
        match result {
            Ok(r) => {
                write_secret(&path, &r.credential)?;
                info!(agent = %cfg.name, labels = %r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","), credential = %path.display(), "enrolled with the controller");
                return Ok(Credential::Bearer(Some(r.credential)));
            }
            Err((Some(code), why)) if refusal(code) || code == tonic::Code::InvalidArgument => {
                return Err(AgentError::Refused(format!("enrolling with the join token: {why}")));
            }
            Err((_, why)) => {
                let delay = backoff.next_delay();
                warn!(controller = %url, %why, retry_in = %baton_common::time::format_duration(delay), "cannot enroll yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Credential::ShutDown),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Whether a status means "this credential will not do", not "try again later".
fn refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
    )
}

/// Writes a secret readable by the agent's user only, replacing the file whole.
fn write_secret(path: &Path, secret: &str) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |e| AgentError::Io { path: path.to_path_buf(), source: e };
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(format!("{secret}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The agent's stable id, created in the work dir on first start.
fn agent_id(work_dir: &Path) -> Result<String, AgentError> {
    let path = work_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, format!("{id}\n")).map_err(|e| AgentError::Io { path, source: e })?;
            Ok(id)
        }
    }
}

type Adapters = HashMap<String, Arc<dyn Adapter>>;

/// The adapters whose tools work on this machine, narrowed to `only` when given and
/// without the `disabled` ones. An agent runs no tool it does not advertise.
fn probe_tools(
    only: Option<&[String]>,
    disabled: &[String],
) -> Result<(Adapters, Vec<pb::Tool>), AgentError> {
    let all = adapters::all();
    for (flag, names) in [("--tools", only.unwrap_or_default()), ("--disable-tools", disabled)] {
        for name in names {
            if !all.iter().any(|a| a.name() == name) {
                let known: Vec<&str> = all.iter().map(|a| a.name()).collect();
                return Err(AgentError::Config(format!(
                    "unknown tool {name:?} in {flag} (known: {})",
                    known.join(", ")
                )));
            }
        }
    }
    let mut map = HashMap::new();
    let mut tools = Vec::new();
    for a in all {
        if only.is_some_and(|o| !o.iter().any(|n| n == a.name())) || disabled.iter().any(|d| d == a.name()) {
            info!(tool = a.name(), "tool switched off on this agent");
            continue;
        }
        match a.probe() {
            Some(version) => {
                tools.push(pb::Tool { name: a.name().to_string(), version });
                map.insert(a.name().to_string(), a);
            }
            None => info!(tool = a.name(), "tool not available on this machine"),
        }
    }
    Ok((map, tools))
}

impl Agent {
    async fn main_loop(&mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut target = 0usize;
        let mut redirect: Option<String> = None;
        // One redirect is followed at once; a second in a row waits like a failure, so
        // controllers that disagree during a takeover cannot make the agent spin.
        let mut redirected = false;
        loop {
            let url = match redirect.take() {
                Some(leader) => leader,
                None => {
                    target += 1;
                    self.cfg.controllers[(target - 1) % self.cfg.controllers.len()].clone()
                }
            };
            let end = self.session(&url, &shutdown, &mut backoff).await;
            self.transfer.send_replace(None);
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Broken(why) => {
                    // Said at once, then once a minute while it lasts, not at every try.
                    let now = Instant::now();
                    match &mut self.unreachable {
                        None => {
                            warn!(controller = %url, %why, "no session with the controller; retrying");
                            self.unreachable = Some((now, now));
                        }
                        Some((since, said)) if said.elapsed() >= UNREACHABLE_REMINDER => {
                            warn!(controller = %url, %why, unreachable_for = %baton_common::time::format_duration(since.elapsed()), "still cannot reach a controller; retrying");
                            *said = now;
                        }
                        Some(_) => debug!(controller = %url, %why, "no session"),
                    }
                }
                SessionEnd::Refused(why) => {
                    error!(controller = %url, %why, "the controller refuses this agent; stopping its tools");
                    self.stop_all(StopReason::Shutdown, None).await;
                    let hint = if self.bearer.is_set() {
                        format!(
                            "if it was revoked or its credential lost: remove {} and enroll again with a new join token",
                            self.cfg.work_dir.join("agent-credential").display()
                        )
                    } else {
                        "this agent has no credential: enroll it with --join-token (baton agents join-token) \
                         or give it an agent certificate (--tls-cert, --tls-key)"
                            .to_string()
                    };
                    return Err(AgentError::Refused(format!("{why} ({hint})")));
                }
                SessionEnd::Redirect(leader) => {
                    info!(standby = %url, %leader, "following the leader");
                    redirect = Some(leader);
                    if !redirected {
                        redirected = true;
                        continue;
                    }
                }
            }
            redirected = false;
            self.metrics.connected.set(&[], 0.0);
            let delay = backoff.next_delay();
            let wake = tokio::time::Instant::now() + delay;
            loop {
                self.fence_if_expired();
                let stop_check = self
                    .lease
                    .map(|l| tokio::time::Instant::from_std(l.expires()))
                    .filter(|t| *t > tokio::time::Instant::now() && self.holds_work())
                    .unwrap_or(wake);
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.stop_all(StopReason::Shutdown, None).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep_until(wake.min(stop_check)) => {
                        if tokio::time::Instant::now() >= wake {
                            break;
                        }
                    }
                    Some(ev) = self.events_rx.recv() => {
                        self.on_event(ev, None);
                    }
                }
            }
        }
        self.stop_all(StopReason::Shutdown, None).await;
        Ok(())
    }

    /// One connection to a controller, from Hello to its end.
    async fn session(
        &mut self,
        url: &str,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let endpoint = match baton_common::connect::endpoint(url, &self.cfg.tls) {
            Ok(e) => e,
            Err(e) => return SessionEnd::Broken(e),
        };
        let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(4096);
        let hello = pb::Hello {
            agent_id: self.id.clone(),
            name: self.cfg.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.cfg.labels.clone().into_iter().collect(),
            tools: self.tools.clone(),
            slots: self.cfg.slots,
            running: self.running.values().map(|r| r.attempt.clone()).collect(),
            unacked: self.unacked.clone(),
            queued: self.queued.iter().filter_map(|q| q.attempt.clone()).collect(),
        };
        let hello_sent = Instant::now();
        let bearer = self.bearer.clone();
        let establish = async {
            let channel = endpoint.connect().await.map_err(|e| {
                SessionEnd::Broken(format!("connect {url}: {}", baton_common::connect::error_chain(&e)))
            })?;
            let channel = tonic::service::interceptor::InterceptedService::new(channel, bearer);
            let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024);
            let transfer = client.clone();
            let _ = out_tx.try_send(msg(Out::Hello(hello)));
            let mut inbound = match client.connect(ReceiverStream::new(out_rx)).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    let leader = e.metadata().get(baton_common::LEADER_HEADER).and_then(|v| v.to_str().ok());
                    return Err(match leader {
                        Some(l) if l != url => SessionEnd::Redirect(l.to_string()),
                        _ if refusal(e.code()) => SessionEnd::Refused(e.message().to_string()),
                        _ => SessionEnd::Broken(format!("connect stream: {e}")),
                    });
                }
            };
            match inbound.message().await {
                Ok(Some(pb::ControllerMessage { msg: Some(In::Welcome(w)) })) => Ok((inbound, w, transfer)),
                Ok(_) => Err(SessionEnd::Broken("the controller did not welcome us".into())),
                Err(e) => Err(SessionEnd::Broken(format!("welcome: {e}"))),
            }
        };
        // A connection that takes long to come up (a black-holed link, a controller
        // that cannot commit) must not keep the agent from stopping its tools in time.
        let fence_at = self.fence_deadline();
        let established = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = tokio::time::sleep_until(fence_at.unwrap_or_else(tokio::time::Instant::now)), if fence_at.is_some() => {
                self.fence_if_expired();
                return SessionEnd::Broken("no controller answered before the lease ran out".into());
            }
            r = tokio::time::timeout(ESTABLISH_TIMEOUT, establish) => match r {
                Ok(r) => r,
                Err(_) => Err(SessionEnd::Broken(format!("no welcome from {url} within {ESTABLISH_TIMEOUT:?}"))),
            },
        };
        let (mut inbound, welcome, transfer) = match established {
            Ok(x) => x,
            Err(end) => return end,
        };
        self.transfer.send_replace(Some(transfer));
        backoff.reset();
        if self.sessions > 0 {
            self.metrics.reconnects.inc(&[]);
        }
        self.sessions += 1;
        self.metrics.connected.set(&[], 1.0);
        self.unreachable = None;
        info!(controller = %url, session = %welcome.session_id, adopted = welcome.adopted.len(), abandoned = welcome.abandon.len(), "connected");
        for id in &welcome.abandon {
            if let Some(r) = self.running.get(id) {
                warn!(attempt_id = %id, "controller abandoned attempt; stopping it");
                r.stop(StopReason::Abandoned);
            }
            self.unacked.retain(|f| f.attempt.as_ref().is_none_or(|a| &a.attempt_id != id));
            self.queued.retain(|q| q.attempt.as_ref().is_none_or(|a| &a.attempt_id != id));
        }
        let ms = |d: &Option<proto::Duration>| d.as_ref().map_or(0, proto::duration_millis);
        let hb_every = Duration::from_millis(ms(&welcome.heartbeat_interval).max(50) as u64);
        let idle_every = Duration::from_millis(ms(&welcome.idle_heartbeat_interval) as u64).max(hb_every);
        let mut last_heartbeat = Instant::now();
        // The controller's stop_after (or, from one that sends none, its lease
        // timeout), cut to this agent's own when that is shorter.
        let theirs = match ms(&welcome.stop_after) {
            t if t > 0 => t,
            _ => ms(&welcome.lease_timeout).max(1000),
        };
        let mut stop_after = Duration::from_millis(theirs as u64);
        if let Some(mine) = self.cfg.stop_after {
            stop_after = stop_after.min(mine);
        }
        self.lease = Some(Lease {
            renewed: hello_sent,
            stop_after,
            grace: Duration::from_millis(ms(&welcome.fence_grace) as u64),
        });
        self.update_warden();
        let mut heartbeat = tokio::time::interval(hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // The stopped attempts are reported, and their acks awaited (for a
                    // few seconds), so that the controller does not show them running
                    // until the agent's lease runs out: it retries them at once.
                    self.stop_all(StopReason::Shutdown, Some(&out_tx)).await;
                    while let Ok(ev) = self.events_rx.try_recv() {
                        self.on_event(ev, Some(&out_tx));
                    }
                    let deadline = tokio::time::Instant::now() + SHUTDOWN_ACKS;
                    while !self.unacked.is_empty() {
                        match tokio::time::timeout_at(deadline, inbound.message()).await {
                            Ok(Ok(Some(pb::ControllerMessage { msg: Some(m @ In::Ack(_)) }))) => {
                                let _ = self.on_controller(m, &out_tx);
                            }
                            // Nothing new is taken on while stopping.
                            Ok(Ok(Some(_))) => {}
                            _ => break,
                        }
                    }
                    if !self.unacked.is_empty() {
                        warn!(unacked = self.unacked.len(), "stopping before the controller acknowledged every result");
                    }
                    return SessionEnd::Shutdown;
                }
                _ = tokio::time::sleep_until(self.lease_expiry()) => {
                    let unanswered = self.lease.map(|l| l.renewed.elapsed()).unwrap_or_default();
                    warn!(controller = %url, unanswered = %baton_common::time::format_duration(unanswered), "no answer from the controller; stopping running tools and reconnecting");
                    self.fence_if_expired();
                    return SessionEnd::Broken("the controller does not answer".into());
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::ControllerMessage { msg: Some(m) })) => {
                        let was_idle = self.holds_no_work();
                        if let Err(e) = self.on_controller(m, &out_tx) {
                            return SessionEnd::Broken(e);
                        }
                        // Work arrived after a quiet spell: the lease was renewed up to
                        // an idle interval ago, so renew it now, not at the next tick.
                        if was_idle && !self.holds_no_work() {
                            last_heartbeat = Instant::now();
                            heartbeat.reset();
                            if out_tx.try_send(self.heartbeat()).is_err() {
                                return SessionEnd::Broken("outbound stream is stuck".into());
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Broken("the controller closed the stream".into()),
                    Err(e) => return SessionEnd::Broken(format!("stream: {e}")),
                },
                Some(ev) = self.events_rx.recv() => {
                    if !self.on_event(ev, Some(&out_tx)) {
                        return SessionEnd::Broken("outbound stream is stuck".into());
                    }
                }
                _ = heartbeat.tick() => {
                    let idle = self.holds_no_work();
                    let every = if idle { idle_every } else { hb_every };
                    // A controller that stopped answering is left well before the lease
                    // runs out, so that the agent can reach another one (a new leader)
                    // before it would have to stop its tools.
                    if let Some(l) = self.lease
                        && l.renewed.elapsed() > (every * 3).max(l.stop_after / 2)
                    {
                        warn!(controller = %url, unanswered = %baton_common::time::format_duration(l.renewed.elapsed()), "the controller does not answer; reconnecting");
                        return SessionEnd::Broken("the controller does not answer".into());
                    }
                    if !heartbeat_due(idle, last_heartbeat.elapsed(), hb_every, idle_every) {
                        continue;
                    }
                    last_heartbeat = Instant::now();
                    if out_tx.try_send(self.heartbeat()).is_err() {
                        return SessionEnd::Broken("outbound stream is stuck".into());
                    }
                }
            }
        }
    }

    fn on_controller(&mut self, m: In, out: &mpsc::Sender<pb::AgentMessage>) -> Result<(), String> {
        match m {
            In::Assign(a) => {
                let id = a.attempt.as_ref().map(|r| r.attempt_id.as_str()).unwrap_or("");
                let known = self.running.contains_key(id)
                    || self.queued.iter().any(|q| q.attempt.as_ref().is_some_and(|r| r.attempt_id == id));
                if known {
                    Ok(())
                } else if a.after.is_empty() && self.running.len() < self.cfg.slots as usize {
                    self.start_attempt(a, Some(out))
                } else {
                    // Pipelined (it waits for what it follows), or beyond the slots.
                    self.queued.push_back(a);
                    if self.start_queued(Some(out), false) {
                        Ok(())
                    } else {
                        Err("outbound stream is stuck".into())
                    }
                }
            }
            In::Cancel(c) => {
                if let Some(r) = self.running.get(&c.attempt_id) {
                    info!(attempt_id = %c.attempt_id, reason = %c.reason, "cancel");
                    r.stop(StopReason::Canceled);
                } else if let Some(i) = self
                    .queued
                    .iter()
                    .position(|q| q.attempt.as_ref().is_some_and(|r| r.attempt_id == c.attempt_id))
                    && let Some(q) = self.queued.remove(i)
                {
                    self.never_started(q, "canceled before it started");
                }
                Ok(())
            }
            In::Ack(a) => {
                self.unacked.retain(|f| f.attempt.as_ref().is_none_or(|r| r.attempt_id != a.attempt_id));
                if !a.accepted {
                    warn!(attempt_id = %a.attempt_id, "controller rejected our result (stale lease)");
                }
                Ok(())
            }
            In::Drain(_) => {
                info!("draining: no new work will be accepted");
                self.draining = true;
                Ok(())
            }
            In::Pong(p) => {
                let sent = self.clock + Duration::from_millis(p.heartbeat_sent_ms);
                if let Some(l) = &mut self.lease
                    && sent > l.renewed
                    && sent <= Instant::now()
                {
                    l.renewed = sent;
                }
                self.update_warden();
                Ok(())
            }
            In::Welcome(_) => Ok(()),
        }
    }

    /// When the lease runs out (far away before the first Welcome).
    fn lease_expiry(&self) -> tokio::time::Instant {
        match self.lease {
            Some(l) => tokio::time::Instant::from_std(l.expires()),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Tells the warden when the tools must be dead by, if the agent does not see to it.
    fn update_warden(&self) {
        if let Some(w) = &self.warden {
            let at = self.lease.filter(|_| self.holds_work()).map(|l| l.expires() + l.grace + warden::AFTER);
            w.set(at);
        }
    }

    fn holds_work(&self) -> bool {
        !self.running.is_empty() || !self.queued.is_empty()
    }

    /// When the lease runs out, while there is work it would have to stop then.
    fn fence_deadline(&self) -> Option<tokio::time::Instant> {
        let unstopped = self.running.values().any(|r| r.reason.get().is_none()) || !self.queued.is_empty();
        unstopped.then(|| self.lease_expiry())
    }

    /// With the lease run out, stops every tool (within the fence grace) and drops the
    /// queued attempts: the controller may give their steps to others soon.
    fn fence_if_expired(&mut self) {
        let Some(lease) = self.lease else { return };
        if Instant::now() < lease.expires() || !self.holds_work() {
            return;
        }
        if self.running.values().any(|r| r.reason.get().is_none()) || !self.queued.is_empty() {
            warn!(unanswered = %baton_common::time::format_duration(lease.renewed.elapsed()), stop_after = %baton_common::time::format_duration(lease.stop_after), running = self.running.len(), queued = self.queued.len(), "no answer from a controller for stop_after: stopping this agent's tools");
        }
        for q in std::mem::take(&mut self.queued) {
            self.never_started(q, "no answer from the controller; not started");
        }
        for r in self.running.values() {
            r.stop_within(StopReason::Unreachable, lease.grace);
        }
    }

    fn heartbeat(&self) -> pb::AgentMessage {
        msg(Out::Heartbeat(pb::Heartbeat {
            running: self.held(),
            free_slots: self.cfg.slots.saturating_sub(self.running.len() as u32),
            sent_ms: self.clock.elapsed().as_millis() as u64,
        }))
    }

    /// Nothing running, queued or waiting for its acknowledgement: the agent heartbeats
    /// at the idle interval.
    fn holds_no_work(&self) -> bool {
        self.running.is_empty() && self.queued.is_empty() && self.unacked.is_empty()
    }

    /// Every attempt this agent holds: running or queued.
    fn held(&self) -> Vec<pb::AttemptRef> {
        self.running
            .values()
            .map(|r| r.attempt.clone())
            .chain(self.queued.iter().filter_map(|q| q.attempt.clone()))
            .collect()
    }

    /// Reports a queued attempt that will not run, as canceled.
    fn never_started(&mut self, q: pb::Assign, why: &str) -> pb::AttemptFinished {
        let f = pb::AttemptFinished {
            attempt: q.attempt,
            outcome: Outcome::Canceled.to_pb(),
            failure_class: FailureClass::Canceled.to_pb(),
            error: why.to_string(),
            ..Default::default()
        };
        let _ = self.events_tx.send(Event::Finished(f.clone()));
        f
    }

    /// Starts queued attempts while slots are free, oldest first: pipelined ones once
    /// what they follow has succeeded here (never, reported canceled, if it did not);
    /// with `plain`, only ordinary ones.
    fn start_queued(&mut self, out: Option<&mpsc::Sender<pb::AgentMessage>>, plain: bool) -> bool {
        loop {
            let live = |id: &str| {
                self.running.contains_key(id)
                    || self.queued.iter().any(|q| q.attempt.as_ref().is_some_and(|r| r.attempt_id == id))
            };
            let mut pick = None;
            for (i, q) in self.queued.iter().enumerate() {
                if q.after.is_empty() {
                    pick.get_or_insert((i, None));
                    continue;
                }
                if plain {
                    continue;
                }
                match self.outcomes.readiness(q, &live) {
                    pipeline::Readiness::Now => {
                        pick.get_or_insert((i, None));
                    }
                    pipeline::Readiness::Later => {}
                    pipeline::Readiness::Never(why) => {
                        pick = Some((i, Some(why)));
                        break;
                    }
                }
            }
            let Some((i, never)) = pick else { return true };
            if never.is_none() && self.running.len() >= self.cfg.slots as usize {
                return true;
            }
            let Some(mut a) = self.queued.remove(i) else { return true };
            if let Some(why) = never {
                // Recorded at once, so that what follows it is dropped in turn.
                let f = self.never_started(a, &format!("not started: {why}"));
                self.outcomes.record(&f);
                continue;
            }
            if let Err(e) = self.outcomes.render(&mut a) {
                let f = pb::AttemptFinished {
                    attempt: a.attempt,
                    outcome: Outcome::Failed.to_pb(),
                    failure_class: FailureClass::ToolError.to_pb(),
                    error: format!("input: {e}"),
                    ..Default::default()
                };
                self.outcomes.record(&f);
                let _ = self.events_tx.send(Event::Finished(f));
                continue;
            }
            if self.start_attempt(a, out).is_err() {
                return false;
            }
        }
    }

    fn start_attempt(
        &mut self,
        a: pb::Assign,
        out: Option<&mpsc::Sender<pb::AgentMessage>>,
    ) -> Result<(), String> {
        let (Some(r), Some(req)) = (a.attempt, a.request) else {
            return Err("assign without attempt or request".into());
        };
        if self.running.contains_key(&r.attempt_id) {
            return Ok(());
        }
        let span =
            info_span!("attempt", run_id = %r.run_id, step_id = %r.step_id, attempt_id = %r.attempt_id);
        let _enter = span.enter();
        let started = pb::AttemptStarted { attempt: Some(r.clone()), pid: 0 };
        if let Some(out) = out
            && out.try_send(msg(Out::Started(started))).is_err()
        {
            return Err("outbound stream is stuck".into());
        }
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let reason: Arc<OnceLock<StopReason>> = Arc::new(OnceLock::new());
        let running =
            Running { attempt: r.clone(), stop: stop.clone(), kill: kill.clone(), reason: reason.clone() };
        let contain = self.contain.clone();
        let adapter = self.adapters.get(&req.tool).cloned();
        let input = req.input.as_ref().map(proto::json_object).unwrap_or_default();
        let scratch = self.scratch.clone();
        let timeout = req
            .timeout
            .as_ref()
            .map(proto::duration_millis)
            .filter(|&t| t > 0)
            .map(|t| Duration::from_millis(t as u64));
        if let Some(t) = timeout {
            let (stop, reason) = (stop.clone(), reason.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(t) => {
                        let _ = reason.set(StopReason::Timeout);
                        stop.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            });
        }
        // The attempt's trace context: this agent's span for it when it sends traces,
        // else the controller's; tools get it as TRACEPARENT.
        let parent = baton_common::trace::parse_traceparent(&req.traceparent);
        let own_span = baton_common::trace::span_id(&format!("agent:{}", r.attempt_id));
        let traces = self.traces.clone().filter(|_| parent.is_some());
        let mut env = req.env.clone();
        match (parent, &traces) {
            (Some((trace, _)), Some(_)) => {
                env.insert("TRACEPARENT".into(), baton_common::trace::traceparent(trace, own_span));
            }
            (Some(_), None) => {
                env.insert("TRACEPARENT".into(), req.traceparent.clone());
            }
            _ => {}
        }
        let agent_name = self.cfg.name.clone();
        let link = self.transfer.subscribe();
        let (inputs, mut globs) = (req.inputs.clone(), req.artifacts.clone());
        let optional = req.optional_artifacts.clone();
        let events = self.events_tx.clone();
        let stream_to = self.events_tx.clone();
        let stream_ref = r.clone();
        // What the controller says is secret is masked in everything this attempt
        // reports and logs.
        let redactor = Arc::new(baton_common::redact::Redactor::new(&req.redact));
        let output = Output::streaming(
            Arc::new(move |offset, data: &[u8]| {
                let _ = stream_to.send(Event::Output(stream_ref.clone(), offset, data.to_vec()));
            }),
            req.max_output_bytes,
            redactor.clone(),
        );
        debug!(tool = %req.tool, number = a.number, "attempt assigned");
        let task = async move {
            let t0 = Instant::now();
            let started_at = std::time::SystemTime::now();
            let made_dir = adapter.as_ref().is_some_and(|a| a.needs_dir());
            // The record, cgroup and directory are a few constant-cost calls, made on
            // the runtime thread (see `scratch` for why); deleting what a stray process
            // left in a kept directory goes to the blocking pool.
            let cell = contain.cell(&r).map(Arc::new).map_err(|e| e.to_string());
            let dir = match (&cell, made_dir) {
                (Ok(_), true) => scratch.take(&r.attempt_id).await.map(Some),
                _ => Ok(None),
            };
            let mut made = None;
            let mut stored = Vec::new();
            let outcome = match adapter {
                _ if cell.is_err() => adapters::Outcome::failure(
                    FailureClass::ToolError,
                    format!(
                        "cannot record the attempt in the agent's work dir: {}",
                        cell.as_ref().err().map(String::as_str).unwrap_or_default()
                    ),
                ),
                None => adapters::Outcome::failure(
                    FailureClass::ToolError,
                    format!("tool {:?} is not available on this agent", req.tool),
                ),
                Some(adapter) => match dir {
                    Err(e) => adapters::Outcome::failure(
                        FailureClass::ToolError,
                        format!("cannot create a working directory under {}: {e}", scratch.root().display()),
                    ),
                    Ok(None) if !inputs.is_empty() || !globs.is_empty() => adapters::Outcome::failure(
                        FailureClass::ToolError,
                        format!(
                            "tool {:?} has no working directory: it takes no inputs or artifacts",
                            req.tool
                        ),
                    ),
                    Ok(dir) => {
                        made = dir.clone();
                        let work = dir.clone().unwrap_or_default();
                        let (ref_, stop_) = (r.clone(), stop.clone());
                        let ctx = AttemptContext {
                            attempt_id: r.attempt_id.clone(),
                            run_id: r.run_id.clone(),
                            step_id: r.step_id.clone(),
                            number: a.number,
                            input,
                            env: env.into_iter().collect(),
                            dir: dir.unwrap_or_default(),
                            stop,
                            kill_grace: Duration::from_millis(
                                req.kill_grace.as_ref().map_or(0, proto::duration_millis) as u64,
                            ),
                            kill,
                            cell: cell.as_ref().ok().cloned(),
                            output: output.clone(),
                        };
                        match artifacts::fetch(&link, &stop_, &ref_, &inputs, &work).await {
                            Err(e) => {
                                adapters::Outcome::failure(FailureClass::ToolError, format!("inputs: {e}"))
                            }
                            Ok(_) => {
                                let mut outcome = adapter.run(ctx).await;
                                // The files the controller wants if the tool made them.
                                globs.extend(optional.iter().filter(|f| work.join(f).is_file()).cloned());
                                if outcome.succeeded && !globs.is_empty() {
                                    match artifacts::upload(&link, &stop_, &ref_, &globs, &work).await {
                                        Ok(infos) => stored = infos,
                                        Err(e) => {
                                            outcome = adapters::Outcome::failure(
                                                FailureClass::ToolError,
                                                format!("artifacts: {e}"),
                                            )
                                        }
                                    }
                                }
                                outcome
                            }
                        }
                    }
                },
            };

            let (state, class, error) = match reason.get() {
                Some(StopReason::Timeout) => (
                    Outcome::TimedOut,
                    Some(FailureClass::Timeout),
                    format!(
                        "timed out after {}",
                        baton_common::time::format_duration(timeout.unwrap_or_default())
                    ),
                ),
                Some(why) => (
                    Outcome::Canceled,
                    Some(FailureClass::Canceled),
                    format!("stopped: {why:?}").to_lowercase(),
                ),
                None if outcome.succeeded => (Outcome::Succeeded, None, String::new()),
                None => (
                    Outcome::Failed,
                    Some(outcome.error_class.unwrap_or(FailureClass::ToolError)),
                    redactor.text(&outcome.error),
                ),
            };
            output.finish();
            debug!(outcome = %state, %error, "attempt finished");
            if let (Some(exporter), Some((trace, controller_span))) = (&traces, parent) {
                exporter.span(baton_common::trace::SpanRecord {
                    name: format!("execute {}", req.tool),
                    trace,
                    span: own_span,
                    parent: Some(controller_span),
                    start: started_at,
                    end: std::time::SystemTime::now(),
                    attributes: vec![
                        baton_common::trace::KeyValue::new("baton.run_id", r.run_id.clone()),
                        baton_common::trace::KeyValue::new("baton.step_id", r.step_id.clone()),
                        baton_common::trace::KeyValue::new("baton.attempt_id", r.attempt_id.clone()),
                        baton_common::trace::KeyValue::new("baton.tool", req.tool.clone()),
                        baton_common::trace::KeyValue::new("baton.agent", agent_name.clone()),
                        baton_common::trace::KeyValue::new("baton.outcome", state.to_string()),
                    ],
                    error: (state != Outcome::Succeeded).then(|| error.clone()),
                });
            }
            let finished = pb::AttemptFinished {
                attempt: Some(r),
                outcome: state.to_pb(),
                exit_code: outcome.exit_code,
                failure_class: class.map_or(0, FailureClass::to_pb),
                error,
                result: proto::value_of_text(outcome.result.map(|j| redactor.json(&j)).as_deref()),
                output_tail: output.tail(),
                duration: Some(proto::duration(t0.elapsed().as_millis() as i64)),
                output_bytes: output.total_bytes(),
                artifacts: stored,
            };
            // Everything it started has ended: a new life of the agent has nothing to
            // end for it.
            if let Ok(cell) = cell {
                cell.close();
            }
            let _ = events.send(Event::Finished(finished));
            // Cleaning up comes after the result is on its way.
            if let Some(dir) = made {
                scratch.give_back(dir).await;
            }
        };
        tokio::spawn(task.instrument(span.clone()));
        self.running.insert(running.attempt.attempt_id.clone(), running);
        self.metrics.running.set(&[], self.running.len() as f64);
        self.update_warden();
        Ok(())
    }

    /// Handles an attempt event; with a stream, reports it. False when the stream is
    /// stuck.
    fn on_event(&mut self, ev: Event, out: Option<&mpsc::Sender<pb::AgentMessage>>) -> bool {
        match ev {
            // Output goes out while connected; offline it is dropped (the controller
            // marks the gap, and the tail in the result keeps the end).
            Event::Output(attempt, offset, data) => match out {
                Some(out) => {
                    let _ = out.try_send(msg(Out::Output(pb::AttemptOutput {
                        attempt: Some(attempt),
                        offset,
                        data,
                    })));
                    true
                }
                None => true,
            },
            Event::Finished(f) => {
                let id = f.attempt.as_ref().map(|a| a.attempt_id.clone()).unwrap_or_default();
                let abandoned =
                    self.running.remove(&id).is_some_and(|r| r.reason.get() == Some(&StopReason::Abandoned));
                let outcome = Outcome::from_pb(f.outcome).map_or("unknown", Outcome::as_str);
                self.metrics.attempts.inc(&[outcome]);
                // A slot is free: the next queued attempt starts before the result goes
                // out, so the tool is busy again at once. Pipelined ones start after it:
                // the controller must hear of this result before their starts.
                let mut ok = self.start_queued(out, true);
                if !abandoned {
                    self.unacked.push(f.clone());
                    if let Some(out) = out {
                        ok &= out.try_send(msg(Out::Finished(f.clone()))).is_ok();
                    }
                }
                let mut ended = f;
                if abandoned {
                    ended.outcome = Outcome::Canceled.to_pb();
                }
                self.outcomes.record(&ended);
                ok &= self.start_queued(out, false);
                self.metrics.running.set(&[], self.running.len() as f64);
                self.update_warden();
                ok
            }
        }
    }

    /// Stops every running tool and waits (bounded) for them to end; their results go
    /// to `out` when connected.
    async fn stop_all(&mut self, why: StopReason, out: Option<&mpsc::Sender<pb::AgentMessage>>) {
        for q in std::mem::take(&mut self.queued) {
            self.never_started(q, &format!("stopped before it started: {why:?}").to_lowercase());
        }
        if self.running.is_empty() {
            return;
        }
        for r in self.running.values() {
            r.stop(why);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(ev)) => {
                    self.on_event(ev, out);
                }
                _ => break,
            }
        }
    }
}

/// Whether a heartbeat goes out at this tick (every `hb_every`): at each one while the
/// agent holds work, else once `idle_every` has (nearly) passed since the last.
fn heartbeat_due(idle: bool, since_last: Duration, hb_every: Duration, idle_every: Duration) -> bool {
    !idle || since_last + hb_every / 2 >= idle_every
}

fn msg(m: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// Exponential backoff with jitter: each delay is drawn from [base/2, base], and base
/// doubles up to the maximum, so a fleet does not reconnect in lock-step.
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt += 1;
        let half = base / 2;
        half + Duration::from_nanos(rand::random_range(0..=half.as_nanos().max(1) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_agent_heartbeats_at_the_idle_interval_and_a_busy_one_at_every_tick() {
        let (hb, idle) = (Duration::from_secs(1), Duration::from_secs(4));
        assert!(heartbeat_due(false, Duration::from_secs(1), hb, idle));
        // Idle: every fourth tick (ticks come a little early or late).
        assert!(!heartbeat_due(true, Duration::from_millis(1000), hb, idle));
        assert!(!heartbeat_due(true, Duration::from_millis(2990), hb, idle));
        assert!(heartbeat_due(true, Duration::from_millis(3600), hb, idle));
        assert!(heartbeat_due(true, Duration::from_millis(4010), hb, idle));
        // Without an idle interval of its own, every tick.
        assert!(heartbeat_due(true, Duration::from_millis(990), hb, hb));
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(2));
        }
        assert!(last >= Duration::from_secs(1), "capped base is 2s, jittered down to at least 1s: {last:?}");
        let draws: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 1, "delays are jittered");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn agent_id_is_stable_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent_id(dir.path()).unwrap();
        let b = agent_id(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn unknown_tool_filter_is_refused() {
        let err = probe_tools(Some(&["hammer".to_string()]), &[]).err().unwrap();
        assert!(err.to_string().contains("unknown tool \"hammer\" in --tools"), "{err}");
        let (_, tools) = probe_tools(Some(&["noop".to_string()]), &[]).unwrap();
        assert_eq!(tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["noop"]);
    }

    #[test]
    fn disabled_tools_are_neither_advertised_nor_run() {
        let (adapters, tools) = probe_tools(None, &["shell".to_string(), "aider".to_string()]).unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        assert!(
            !names.contains(&"shell") && !names.contains(&"aider") && names.contains(&"noop"),
            "{names:?}"
        );
        assert!(!adapters.contains_key("shell"), "no adapter, so an assignment for it fails");
        let err = probe_tools(None, &["drill".to_string()]).err().unwrap();
        assert!(err.to_string().contains("unknown tool \"drill\" in --disable-tools"), "{err}");
    }
}
