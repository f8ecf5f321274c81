//! A sandbox for end-to-end tests: a controller and agents on ephemeral loopback
//! ports in a temporary directory, either in this process or as real processes, with
//! helpers that await events and states with a deadline instead of sleeping.

pub mod browser;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_common::connect::{AuthChannel, Bearer, ClientTls};
use baton_common::pb;
use baton_common::pb::admin_service_client::AdminServiceClient;
use baton_common::pb::baton_service_client::BatonServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use baton_common::auth::Role;
pub use baton_common::pb as proto;
pub use baton_controller::auth::AuthMode;

/// Unix milliseconds of an optional timestamp of the API; 0 when unset.
pub fn ms(t: &Option<baton_common::proto::Timestamp>) -> i64 {
    t.as_ref().map_or(0, baton_common::proto::millis)
}

/// The name of an enum value of the API (`succeeded`, `timed_out`, ...); empty for
/// unspecified.
fn name<S>(
    v: i32,
    from: fn(i32) -> Result<S, baton_common::state::UnknownState>,
    s: fn(S) -> &'static str,
) -> &'static str {
    from(v).map_or("", s)
}

/// The state of an API message by name, as tests compare it.
pub trait StateName {
    fn state_name(&self) -> &'static str;
}

macro_rules! state_name {
    ($($t:ty => $e:ty),+ $(,)?) => {
        $(impl StateName for $t {
            fn state_name(&self) -> &'static str {
                name(self.state, <$e>::from_pb, <$e>::as_str)
            }
        })+
    };
}

use baton_common::state::{AgentState, AttemptState, RunState, StepState};
state_name!(
    pb::Run => RunState,
    pb::RunSummary => RunState,
    pb::CancelRunResponse => RunState,
    pb::ReleaseRunResponse => RunState,
    pb::Step => StepState,
    pb::Attempt => AttemptState,
    pb::Agent => AgentState,
    pb::Breaker => baton_common::breaker::BreakerState,
);

/// A result of the API as JSON text (empty when unset), as the store keeps it.
pub fn result_text(v: &Option<baton_common::proto::Value>) -> String {
    baton_common::proto::text_of_value(v.as_ref())
}

/// Params for a submit.
pub fn params(kv: &[(&str, &str)]) -> Option<baton_common::proto::Struct> {
    let m = kv.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
    Some(baton_common::proto::structure(m))
}

/// A run's param by name, as text.
pub fn param(run: &pb::Run, key: &str) -> Option<String> {
    let v = run.params.as_ref()?.fields.get(key)?;
    baton_common::proto::json(v).as_str().map(str::to_string)
}

/// Whether a step never ran: it has no attempt, or only pipelined ones (assigned ahead
/// of time behind an upstream step) that were canceled before they started.
pub fn never_ran(s: &pb::Step) -> bool {
    s.attempts.iter().all(|a| {
        !a.after.is_empty()
            && a.started_at.is_none()
            && a.state == baton_common::state::AttemptState::Canceled.to_pb()
    })
}

/// An attempt's failure class by name; empty when it did not fail.
pub fn class_name(a: &pb::Attempt) -> &'static str {
    name(
        a.failure_class,
        baton_common::outcome::FailureClass::from_pb,
        baton_common::outcome::FailureClass::as_str,
    )
}

/// The states an event names, by name.
pub trait EventStates {
    fn run_state_name(&self) -> &'static str;
    fn step_state_name(&self) -> &'static str;
    fn attempt_state_name(&self) -> &'static str;
}

impl EventStates for pb::RunEvent {
    fn run_state_name(&self) -> &'static str {
        name(self.run_state, RunState::from_pb, RunState::as_str)
    }
    fn step_state_name(&self) -> &'static str {
        name(self.step_state, StepState::from_pb, StepState::as_str)
    }
    fn attempt_state_name(&self) -> &'static str {
        name(self.attempt_state, AttemptState::from_pb, AttemptState::as_str)
    }
}

pub type Client = BatonServiceClient<AuthChannel>;
pub type Admin = AdminServiceClient<AuthChannel>;

/// Engine timings short enough for tests.
pub fn fast_engine() -> baton_controller::EngineConfig {
    baton_controller::EngineConfig {
        heartbeat_interval: Duration::from_millis(200),
        stop_after: Duration::from_millis(1200),
        lost_after: Duration::from_secs(2),
        failover_grace: Duration::from_secs(4),
        kill_grace: Duration::from_millis(500),
        ..Default::default()
    }
}

/// Logs of the code under test, when `RUST_LOG` asks for them.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// The database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Whether Postgres tests can run (`BATON_TEST_POSTGRES_URL` is set); says so when not.
pub fn postgres_available() -> bool {
    let ok = baton_controller::store::testing::postgres_url().is_some();
    if !ok {
        eprintln!("SKIPPED (postgres): set BATON_TEST_POSTGRES_URL to run this test on Postgres");
    }
    ok
}

/// A fresh database for one test: a SQLite file in `dir`, or a Postgres database of its
/// own (dropped afterwards), so tests run in parallel.
pub struct TestDb {
    pub url: String,
    admin: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend, dir: &Path) -> TestDb {
        match backend {
            Backend::Sqlite => {
                TestDb { url: format!("sqlite://{}", dir.join("baton.db").display()), admin: None }
            }
            Backend::Postgres => {
                let admin =
                    baton_controller::store::testing::postgres_url().expect("BATON_TEST_POSTGRES_URL");
                let url =
                    baton_controller::store::testing::create_database(&admin).await.expect("create database");
                TestDb { url, admin: Some(admin) }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(admin) = self.admin.take() {
            let url = self.url.clone();
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    let _ = rt.block_on(baton_controller::store::testing::drop_database(&admin, &url));
                }
            })
            .join();
        }
    }
}

/// Runs each listed `async fn name(backend: Backend)` as two tests: `name::sqlite` and
/// `name::postgres` (skipped, saying so, without `BATON_TEST_POSTGRES_URL`).
#[macro_export]
macro_rules! on_both {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::postgres_available() {
                    super::$name($crate::Backend::Postgres).await;
                }
            }
        }
    )+};
}

pub struct SandboxBuilder {
    agents: u32,
    slots: u32,
    engine: baton_controller::EngineConfig,
    router: Option<String>,
    backend: Backend,
    auth: AuthMode,
    tls: bool,
    retention: baton_controller::Retention,
    otlp: Option<String>,
}

impl SandboxBuilder {
    pub fn agents(mut self, n: u32) -> Self {
        self.agents = n;
        self
    }

    pub fn slots(mut self, n: u32) -> Self {
        self.slots = n;
        self
    }

    pub fn engine(mut self, cfg: baton_controller::EngineConfig) -> Self {
        self.engine = cfg;
        self
    }

    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Routing rules (router_config.json text) for the controller.
    pub fn router(mut self, json: &str) -> Self {
        self.router = Some(json.to_string());
        self
    }

    /// Callers must authenticate; the sandbox's own clients use an admin token.
    pub fn auth(mut self, mode: AuthMode) -> Self {
        self.auth = mode;
        self
    }

    /// TLS on the controller (a CA and certificates made in the sandbox dir, client
    /// certificates accepted), `https://` URLs, and authentication; agents get agent
    /// certificates.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self.auth = AuthMode::Required;
        self
    }

    /// The controller and the agents send traces to this OTLP/gRPC endpoint.
    pub fn otlp(mut self, endpoint: &str) -> Self {
        self.otlp = Some(endpoint.to_string());
        self
    }

    /// How the controller prunes finished runs.
    pub fn retention(mut self, r: baton_controller::Retention) -> Self {
        self.retention = r;
        self
    }

    /// Starts an in-process controller and the agents, and waits until all agents are
    /// connected.
    pub async fn build(self) -> Sandbox {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let test_db = TestDb::new(self.backend, dir.path()).await;
        let db = test_db.url.clone();
        let router = self.router.map(|json| {
            let path = dir.path().join("router_config.json");
            std::fs::write(&path, json).expect("router config");
            path
        });
        let metrics_addr = free_addr();
        let http_addr = free_addr();
        let certs = self.tls.then(|| {
            let certs = dir.path().join("certs");
            baton_common::certs::create_ca(&certs).expect("CA");
            let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
            baton_common::certs::issue(&certs, baton_common::certs::Kind::Controller, "controller", &hosts)
                .expect("controller certificate");
            certs
        });
        let client_tls = ClientTls { ca: certs.as_ref().map(|c| c.join("ca.pem")), ..Default::default() };
        let admin = match self.auth {
            AuthMode::Off => None,
            AuthMode::Required => Some(bootstrap(&db).await),
        };
        let mut sb = Sandbox {
            dir,
            addr,
            db,
            _test_db: test_db,
            router,
            metrics_addr,
            http_addr,
            engine: self.engine,
            retention: self.retention,
            otlp: self.otlp,
            auth: self.auth,
            admin_token: admin,
            certs,
            client_tls,
            join_token: None,
            controller: None,
            agents: Vec::new(),
        };
        sb.start_controller_on(listener);
        wait_leader_with(&sb.url(), &sb.client_tls, sb.admin_token.as_deref()).await;
        if sb.auth == AuthMode::Required {
            sb.join_token = Some(sb.new_join_token(1000, Default::default()).await.token);
        }
        for i in 1..=self.agents {
            sb.add_agent(&format!("agent-{i}"), self.slots);
        }
        sb.wait_agents(self.agents as usize).await;
        sb
    }
}

/// A listener on `addr` for a controller's HTTP port (the port may be taken for a
/// moment after a restart: then there is none).
fn listen_on(addr: SocketAddr) -> Option<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).ok()?;
    l.set_nonblocking(true).ok()?;
    Some(l)
}

struct InProcess {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub db: String,
    _test_db: TestDb,
    pub engine: baton_controller::EngineConfig,
    pub retention: baton_controller::Retention,
    pub otlp: Option<String>,
    /// The router config file, when the sandbox has one (rewrite it, then reload).
    pub router: Option<PathBuf>,
    /// Where the controller serves /metrics, /healthz and /readyz.
    pub metrics_addr: SocketAddr,
    /// Where the controller serves the dashboard.
    pub http_addr: SocketAddr,
    pub auth: AuthMode,
    /// With authentication: an admin token, made by bootstrapping the database.
    pub admin_token: Option<String>,
    /// With TLS: the directory of the sandbox's CA and certificates.
    pub certs: Option<PathBuf>,
    /// What the sandbox's clients use to reach the controller.
    pub client_tls: ClientTls,
    /// With authentication: a join token its agents enroll with.
    pub join_token: Option<String>,
    controller: Option<InProcess>,
    agents: Vec<(String, InProcess)>,
}

impl Sandbox {
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder {
            agents: 2,
            slots: 2,
            engine: fast_engine(),
            router: None,
            backend: Backend::Sqlite,
            auth: AuthMode::Off,
            tls: false,
            retention: Default::default(),
            otlp: None,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.certs.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn metrics_listener(&self) -> Option<std::net::TcpListener> {
        listen_on(self.metrics_addr)
    }

    /// The dashboard's address, as a browser opens it.
    pub fn dashboard_url(&self) -> String {
        let scheme = if self.certs.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    fn start_controller_on(&mut self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        let cfg = baton_controller::Config {
            db: self.db.clone(),
            engine: self.engine.clone(),
            router: self.router.clone(),
            reload_on_sighup: false,
            metrics: self.metrics_listener(),
            http: listen_on(self.http_addr),
            lease: Duration::from_secs(2),
            advertise: None,
            auth: self.auth,
            tls: self.certs.as_ref().map(|c| baton_controller::tls::TlsFiles {
                cert: c.join("controller.pem"),
                key: c.join("controller-key.pem"),
                client_ca: Some(c.join("ca.pem")),
            }),
            secrets_key: Some(self.dir.path().join("secrets.key")),
            retention: self.retention.clone(),
            otlp: self.otlp.clone(),
            artifacts: Some(self.dir.path().join("artifacts").display().to_string()),
            artifact_max_bytes: 1 << 20,
        };
        let s = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = baton_controller::run(listener, cfg, s).await {
                eprintln!("controller ended with error: {e}");
            }
        });
        self.controller = Some(InProcess { stop, task });
    }

    /// Stops the in-process controller (gracefully) and waits for it.
    pub async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.stop.cancel();
            let _ = c.task.await;
        }
    }

    /// Starts the in-process controller again on the same address and database.
    pub async fn restart_controller(&mut self) {
        self.stop_controller().await;
        // The freed port may be taken for a moment by an outgoing connection of another
        // test (ports come from the same ephemeral range): try again until it is free.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 250 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.start_controller_on(listener);
        wait_leader_with(&self.url(), &self.client_tls, self.admin_token.as_deref()).await;
    }

    /// An agent's settings; with TLS it gets an agent certificate of its own, with
    /// authentication alone a join token to enroll with.
    pub fn agent_config(&self, name: &str, slots: u32) -> baton_agent::Config {
        let mut cfg = baton_agent::Config::new(self.url(), name, self.dir.path().join(name));
        cfg.slots = slots;
        if self.auth == AuthMode::Required && self.certs.is_none() {
            cfg.join_token = Some(self.join_token.clone().expect("join token"));
        }
        if let Some(certs) = &self.certs {
            let (cert, key) =
                match baton_common::certs::issue(certs, baton_common::certs::Kind::Agent, name, &[]) {
                    Ok(files) => files,
                    // Issued before (an agent restarted under the same name).
                    Err(_) => (certs.join(format!("{name}.pem")), certs.join(format!("{name}-key.pem"))),
                };
            cfg.tls = ClientTls { ca: self.client_tls.ca.clone(), cert: Some(cert), key: Some(key) };
        }
        cfg.reconnect_min = Duration::from_millis(20);
        cfg.reconnect_max = Duration::from_millis(300);
        cfg.otlp = self.otlp.clone();
        cfg
    }

    pub fn add_agent(&mut self, name: &str, slots: u32) {
        let cfg = self.agent_config(name, slots);
        self.add_agent_with(cfg);
    }

    pub fn add_agent_with(&mut self, cfg: baton_agent::Config) {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let name = cfg.name.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = baton_agent::run(cfg, s).await {
                eprintln!("agent ended with error: {e}");
            }
        });
        self.agents.push((name, InProcess { stop, task }));
    }

    /// Stops an in-process agent (it kills its tools) and waits for it.
    pub async fn stop_agent(&mut self, name: &str) {
        if let Some(i) = self.agents.iter().position(|(n, _)| n == name) {
            let (_, a) = self.agents.remove(i);
            a.stop.cancel();
            let _ = a.task.await;
        }
    }

    /// A client with the admin token (when the sandbox has one).
    pub async fn client(&self) -> Client {
        connect_as(&self.url(), &self.client_tls, self.admin_token.as_deref()).await
    }

    /// A client that presents `token` (or nothing).
    pub async fn client_as(&self, token: Option<&str>) -> Client {
        connect_as(&self.url(), &self.client_tls, token).await
    }

    /// The admin service, as `token`.
    pub async fn admin_as(&self, token: Option<&str>) -> Admin {
        AdminServiceClient::new(channel_as(&self.url(), &self.client_tls, token).await)
    }

    /// A channel to the controller that presents `token` (or nothing).
    pub async fn channel_as(&self, token: Option<&str>) -> AuthChannel {
        channel_as(&self.url(), &self.client_tls, token).await
    }

    /// A new join token for `uses` agents, made with the admin token.
    pub async fn new_join_token(
        &self,
        uses: u32,
        labels: std::collections::HashMap<String, String>,
    ) -> pb::CreateJoinTokenResponse {
        let mut a = self.admin_as(self.admin_token.as_deref()).await;
        a.create_join_token(pb::CreateJoinTokenRequest { ttl: None, uses, labels })
            .await
            .expect("create join token")
            .into_inner()
    }

    /// A new API token with `role`, made with the admin token.
    pub async fn token(&self, name: &str, role: Role) -> String {
        let mut a = self.admin_as(self.admin_token.as_deref()).await;
        a.create_token(pb::CreateTokenRequest { name: name.into(), role: role.to_string(), ttl: None })
            .await
            .expect("create token")
            .into_inner()
            .token
    }

    /// Waits until at least `n` agents are connected.
    pub async fn wait_agents(&self, n: usize) {
        let c = self.client().await;
        eventually(Duration::from_secs(20), "agents to connect", || {
            let mut c = c.clone();
            async move {
                let agents = c.list_agents(pb::ListAgentsRequest {}).await.ok()?.into_inner().agents;
                (agents.iter().filter(|a| a.state_name() == "connected").count() >= n).then_some(())
            }
        })
        .await;
    }

    pub async fn submit(&self, spec: &str) -> String {
        submit(&mut self.client().await, spec).await
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, a) in &self.agents {
            a.stop.cancel();
        }
        if let Some(c) = &self.controller {
            c.stop.cancel();
        }
    }
}

/// The first admin token of a database (as `baton-controller bootstrap` makes it).
pub async fn bootstrap(db: &str) -> String {
    let store = baton_controller::store::Store::open(db).await.expect("open store");
    let (token, row) = baton_controller::api::new_token("admin", Role::Admin, 0, "bootstrap");
    store.bootstrap_admin(&row, baton_common::time::now_ms()).await.expect("bootstrap");
    store.close().await;
    token
}

/// A channel that retries the connection until the controller answers, and presents
/// `token` on every call.
pub async fn channel_as(url: &str, tls: &ClientTls, token: Option<&str>) -> AuthChannel {
    let endpoint = baton_common::connect::endpoint(url, tls).expect("endpoint");
    let bearer = Bearer::new(token).expect("bearer");
    for _ in 0..200 {
        if let Ok(ch) = endpoint.connect().await {
            return tonic::service::interceptor::InterceptedService::new(ch, bearer);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("controller at {url} never answered");
}

/// A client that retries the connection until the controller answers.
pub async fn connect(url: &str) -> Client {
    connect_as(url, &ClientTls::default(), None).await
}

pub async fn connect_as(url: &str, tls: &ClientTls, token: Option<&str>) -> Client {
    BatonServiceClient::new(channel_as(url, tls, token).await)
}

/// Waits until the controller at `url` leads (at once with SQLite; with Postgres once
/// it holds the lease).
pub async fn wait_leader(url: &str) {
    wait_leader_with(url, &ClientTls::default(), None).await
}

pub async fn wait_leader_with(url: &str, tls: &ClientTls, token: Option<&str>) {
    let c = connect_as(url, tls, token).await;
    eventually(Duration::from_secs(30), "the controller to lead", || {
        let mut c = c.clone();
        async move { c.get_leader(pb::GetLeaderRequest {}).await.ok()?.into_inner().is_leader.then_some(()) }
    })
    .await;
}

pub async fn submit(c: &mut Client, spec: &str) -> String {
    c.submit_run(pb::SubmitRunRequest {
        spec: spec.to_string(),
        source: "test.yaml".into(),
        params: Default::default(),
        request_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    })
    .await
    .expect("submit")
    .into_inner()
    .run_id
}

pub async fn get_run(c: &mut Client, run_id: &str) -> pb::Run {
    c.get_run(pb::GetRunRequest { run_id: run_id.to_string(), ..Default::default() })
        .await
        .expect("get run")
        .into_inner()
        .run
        .expect("run")
}

/// Follows the run's events (resuming across controller restarts) until the first
/// one that `pred` accepts, and returns it. Panics after `within`.
pub async fn wait_event(
    c: &mut Client,
    run_id: &str,
    within: Duration,
    mut pred: impl FnMut(&pb::RunEvent) -> bool,
) -> pb::RunEvent {
    let deadline = tokio::time::Instant::now() + within;
    let mut next = 1;
    loop {
        let attempt = async {
            let mut s = c
                .watch_run(pb::WatchRunRequest {
                    run_id: run_id.to_string(),
                    from_seq: next,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while let Some(ev) = s.message().await? {
                next = ev.seq + 1;
                if pred(&ev) {
                    return Ok(Some(ev));
                }
            }
            Ok::<_, tonic::Status>(None)
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(Some(ev))) => return ev,
            Ok(Ok(None)) => panic!("run {run_id} ended without the awaited event"),
            // The controller went away: follow it to its next life.
            Ok(Err(_)) => {
                if tokio::time::Instant::now() >= deadline {
                    panic!("timed out waiting for an event of run {run_id}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => panic!("timed out after {within:?} waiting for an event of run {run_id}"),
        }
    }
}

/// The run's step `id`; panics naming it when the run has none.
pub fn step<'a>(run: &'a pb::Run, id: &str) -> &'a pb::Step {
    run.steps.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("no step {id}"))
}

/// Waits until the run is final and returns it.
pub async fn wait_run(c: &mut Client, run_id: &str, within: Duration) -> pb::Run {
    wait_event(c, run_id, within, |e| {
        e.kind.starts_with("run_") && matches!(e.run_state_name(), "succeeded" | "failed" | "canceled")
    })
    .await;
    get_run(c, run_id).await
}

/// Polls `check` until it yields a value. For conditions with no event to await
/// (a process exiting, an agent list changing).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A run's output chunks (one step's, or every step's with `step` empty; `attempt` 0
/// for the latest), following live with `follow`.
pub async fn logs(c: &mut Client, run_id: &str, step: &str, attempt: u32, follow: bool) -> Vec<pb::LogChunk> {
    let req =
        pb::GetLogsRequest { run_id: run_id.into(), step_id: step.into(), attempt, follow, from_seq: 0 };
    let mut s = c.get_logs(req).await.expect("get logs").into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("logs did not end")
        .expect("logs failed")
    {
        out.push(chunk);
    }
    out
}

/// The text of output chunks.
pub fn log_text(chunks: &[pb::LogChunk]) -> String {
    chunks.iter().map(|c| String::from_utf8_lossy(&c.data).into_owned()).collect()
}

/// All events of a final run, in order.
pub async fn all_events(c: &mut Client, run_id: &str) -> Vec<pb::RunEvent> {
    let mut s = c
        .watch_run(pb::WatchRunRequest { run_id: run_id.to_string(), from_seq: 1, ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
            Ok(Ok(Some(ev))) => out.push(ev),
            Ok(Ok(None)) => return out,
            Ok(Err(e)) => panic!("watch of {run_id} failed: {e}"),
            Err(_) => panic!("watch of {run_id} did not end: is the run final?"),
        }
    }
}

/// Path of a binary of this workspace, built by `cargo test --workspace` /
/// `cargo nextest run --workspace` (each binary's own crate has an integration test, so
/// cargo builds it before any test runs).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A real process whose output goes to files in the sandbox dir, killed on drop.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(bin: &str, args: &[String], log: PathBuf, envs: &[(&str, &str)]) -> Process {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(binary(bin));
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn");
        Process { child, log }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), sig);
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    /// SIGTERM first, so an agent removes its cgroup and a controller closes its
    /// database; SIGKILL for what has not ended after a moment.
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Calls `path` (`/package.Service/Method`) with one empty message, whatever its
/// types, and returns the status the call ends with (`Ok` once a first answer came).
/// For walking the table of RPCs.
pub async fn call_raw(channel: AuthChannel, path: &str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let path = path.parse::<tonic::codegen::http::uri::PathAndQuery>().expect("path");
    let req = tonic::Request::new(tokio_stream::once(()));
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        match grpc.streaming(req, path, RawCodec).await {
            Ok(resp) => match resp.into_inner().message().await {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            },
            Err(s) => s.code(),
        }
    })
    .await;
    result.unwrap_or(tonic::Code::DeadlineExceeded)
}

/// A codec that sends empty messages (every proto3 message's defaults) and ignores what
/// comes back.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// A free loopback port (bound, then released) for processes that need a fixed address.
/// GET over plain HTTP: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// A real `baton-agent` process with one slot and fast reconnects.
pub fn agent_process(url: &str, name: &str, dir: &Path, extra: &[&str]) -> Process {
    agent_process_with_env(url, name, dir, extra, &[])
}

/// Directory of the test stand-ins for external tools (an `aider` that follows its
/// command-line contract).
pub fn fixtures_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bin")
}

/// `PATH` with the stand-ins first.
pub fn path_with_fixtures() -> String {
    format!("{}:{}", fixtures_bin().display(), std::env::var("PATH").unwrap_or_default())
}

/// An agent process with extra environment (a `PATH` with stand-ins, say).
pub fn agent_process_with_env(
    url: &str,
    name: &str,
    dir: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Process {
    let mut args: Vec<String> =
        ["--controller", url, "--name", name, "--work-dir"].iter().map(|s| s.to_string()).collect();
    args.push(dir.join(name).display().to_string());
    // One slot unless `extra` says how many.
    if !extra.contains(&"--slots") {
        args.extend(["--slots".to_string(), "1".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut all = vec![("RUST_LOG", "info")];
    all.extend_from_slice(envs);
    Process::spawn("baton-agent", &args, dir.join(format!("{name}.log")), &all)
}

/// An agent that speaks the protocol but never runs anything: it says Hello, swallows
/// whatever it is sent and heartbeats with nothing running. For tests of what the
/// controller does with a misbehaving agent.
pub struct FakeAgent {
    stop: CancellationToken,
    pub assigned: std::sync::Arc<std::sync::Mutex<Vec<pb::Assign>>>,
}

impl FakeAgent {
    pub async fn start(url: &str, name: &str, tools: &[&str]) -> FakeAgent {
        use pb::agent_message::Msg;
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let hello = pb::Hello {
            agent_id: format!("fake-{name}"),
            name: name.to_string(),
            version: "fake".into(),
            tools: tools.iter().map(|t| pb::Tool { name: t.to_string(), version: "fake".into() }).collect(),
            slots: 1,
            ..Default::default()
        };
        tx.send(pb::AgentMessage { msg: Some(Msg::Hello(hello)) }).await.expect("hello");
        let mut inbound = client
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let stop = CancellationToken::new();
        let assigned = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, got) = (stop.clone(), assigned.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    m = inbound.message() => match m {
                        Ok(Some(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Assign(a)) })) => {
                            got.lock().expect("lock").push(a);
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                    _ = tick.tick() => {
                        let hb = pb::Heartbeat { running: vec![], free_slots: 1, ..Default::default() };
                        if tx.send(pb::AgentMessage { msg: Some(Msg::Heartbeat(hb)) }).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        FakeAgent { stop, assigned }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One agent session spoken by hand, for tests of what the controller accepts from an
/// agent: says `hello`, then sends whatever the test wants.
pub struct AgentSession {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub inbound: tonic::Streaming<pb::ControllerMessage>,
    pub welcome: pb::Welcome,
}

impl AgentSession {
    pub async fn open(channel: AuthChannel, hello: pb::Hello) -> Result<AgentSession, tonic::Status> {
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) }).await.expect("hello");
        let mut inbound = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        match inbound.message().await? {
            Some(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(welcome)) }) => {
                Ok(AgentSession { tx, inbound, welcome })
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx.send(pb::AgentMessage { msg: Some(msg) }).await.expect("send");
    }
}

/// Trades a join token for an agent credential over the protocol, as an agent does.
pub async fn enroll(channel: AuthChannel, agent_id: &str, name: &str) -> Result<String, tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let req = pb::EnrollRequest { agent_id: agent_id.into(), name: name.into() };
    Ok(client.enroll(req).await?.into_inner().credential)
}

/// A TCP proxy for cutting or holding the link between an agent and its controller.
pub struct Proxy {
    pub addr: SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (hold, hold_rx) = tokio::sync::watch::channel(false);
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
                let (hold, mut cut) = (hold_rx.clone(), cut_rx.clone());
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // A cut wins over data released at the same time.
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = pump(cr, sw, None) => {}
                        _ = pump(sr, cw, Some(hold)) => {}
                    }
                });
            }
        });
        Proxy { addr, hold, cut, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While held, nothing flows from the controller to the agent.
    pub fn hold_downstream(&self, on: bool) {
        let _ = self.hold.send(on);
    }

    /// Closes every connection through the proxy (new ones are accepted).
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: Option<tokio::sync::watch::Receiver<bool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(h) = hold.as_mut() {
            while *h.borrow_and_update() {
                if h.changed().await.is_err() {
                    return;
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One plain HTTP/1.1 request (as a browser's script makes them) to `addr`, with a
/// bearer token when given: the answer's status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP port");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send the request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read the answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A run's report in Markdown.
pub async fn report_md(c: &mut Client, run_id: &str) -> String {
    c.get_report(pb::GetReportRequest {
        run_id: run_id.to_string(),
        format: pb::ReportFormat::Markdown as i32,
    })
    .await
    .expect("report")
    .into_inner()
    .content
}
