//! The Rust client of a Baton controller, as the `baton` command uses it: finds the
//! leading controller of a list, submits runs with a request id (so a retried submit
//! makes no second run), and follows a run's events across controller restarts and
//! leader changes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), baton_client::Error> {
//! use baton_client::{Target, Watched};
//! let target = Target::new("https://ctl-1:7070,https://ctl-2:7070")
//!     .token(Some("TOKEN"))?
//!     .ca("ca.pem");
//! let spec = std::fs::read_to_string("build.yaml").unwrap_or_default();
//! let (mut client, run_id) = baton_client::submit(&target, baton_client::submission(spec)).await?;
//! let mut watch = baton_client::Watch::new(&target, &run_id, 1);
//! while let Some(item) = watch.next(&mut client).await? {
//!     if let Watched::Event(ev) = item {
//!         println!("{} {} {}", ev.seq, ev.kind, ev.step_id);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Calls return [`Client`] and [`Admin`], the generated tonic clients of
//! `baton.v1.BatonService` and `baton.v1.AdminService` (see docs/api.md), with the
//! caller's token attached to every call.

use std::time::Duration;

use baton_common::connect::{AuthChannel, Bearer, ClientTls, endpoint, error_chain};
use baton_common::pb;
use baton_common::pb::admin_service_client::AdminServiceClient;
use baton_common::pb::baton_service_client::BatonServiceClient;

/// The public API of the leading controller.
pub type Client = BatonServiceClient<AuthChannel>;
/// The admin API of the leading controller.
pub type Admin = AdminServiceClient<AuthChannel>;

/// What went wrong talking to a controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No controller could be reached, or none leads; says why for each address.
    #[error("{0}")]
    Connect(String),
    /// The controller answered with an error.
    #[error("{}", describe(.0))]
    Status(tonic::Status),
    /// Bad settings (an unreadable CA file, a token a header cannot carry).
    #[error("{0}")]
    Config(String),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

/// Where and how to reach the controller.
#[derive(Debug, Clone)]
pub struct Target {
    /// Comma-separated controller URLs (`https://`, `http://`, or a bare `host:port`).
    pub urls: String,
    pub tls: ClientTls,
    pub bearer: Bearer,
    /// How long calls that may be repeated keep retrying while no controller answers.
    pub reconnect_timeout: Duration,
}

impl Target {
    /// The controllers at `urls`, without a token or TLS files, retrying for 60 s.
    pub fn new(urls: &str) -> Target {
        Target {
            urls: urls.to_string(),
            tls: ClientTls::default(),
            bearer: Bearer::default(),
            reconnect_timeout: Duration::from_secs(60),
        }
    }

    /// With this API token (none: no `authorization` header).
    pub fn token(mut self, token: Option<&str>) -> Result<Target, Error> {
        self.bearer = Bearer::new(token).map_err(Error::Config)?;
        Ok(self)
    }

    /// With this CA certificate (PEM file) to check the controller's certificate.
    pub fn ca(mut self, path: impl Into<std::path::PathBuf>) -> Target {
        self.tls.ca = Some(path.into());
        self
    }

    /// With a client certificate and its key (PEM files) for mutual TLS.
    pub fn identity(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Target {
        self.tls.cert = Some(cert.into());
        self.tls.key = Some(key.into());
        self
    }
}

async fn channel(url: &str, target: &Target) -> Result<AuthChannel, Error> {
    let endpoint = endpoint(url, &target.tls).map_err(Error::Config)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Error::Connect(format!("cannot reach the controller at {url}: {}", error_chain(&e))))?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, target.bearer.clone()))
}

fn client(ch: AuthChannel) -> Client {
    BatonServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024)
}

/// Connects to the controller that leads: the first of the URLs that answers, or the
/// leader it names when it is a standby.
pub async fn connect(target: &Target) -> Result<Client, Error> {
    Ok(client(leader(target).await?))
}

/// Says on stderr that a call is being retried: the first failure, then only a
/// different one, or the same one again after 10 s, so that a wait does not fill the
/// screen with one line.
#[derive(Default)]
struct RetryNote {
    last: Option<(String, tokio::time::Instant)>,
}

impl RetryNote {
    fn say(&mut self, what: &str, e: &Error, timeout: Duration) {
        let text = e.to_string();
        let now = tokio::time::Instant::now();
        let repeat = self
            .last
            .as_ref()
            .is_some_and(|(t, at)| *t == text && now.duration_since(*at) < Duration::from_secs(10));
        if !repeat {
            let limit = baton_common::time::format_duration(timeout);
            eprintln!("{what}{text}; retrying for up to {limit}");
            self.last = Some((text, now));
        }
    }
}

/// [`connect`], retried with backoff while no controller leads (one restarts, or a
/// standby takes over), for up to the reconnect timeout; says so on stderr.
pub async fn connect_waiting(target: &Target) -> Result<Client, Error> {
    let deadline = tokio::time::Instant::now() + target.reconnect_timeout;
    let mut delay = Duration::from_millis(200);
    let mut note = RetryNote::default();
    loop {
        match connect(target).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() + delay <= deadline => {
                note.say("", &e, target.reconnect_timeout);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a call that failed this way may be made again: the controller was not
/// reached, or went away before it answered.
pub fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// A submit of `spec` (YAML or JSON text) with a fresh request id.
pub fn submission(spec: String) -> pb::SubmitRunRequest {
    pb::SubmitRunRequest { spec, request_id: uuid::Uuid::new_v4().to_string(), ..Default::default() }
}

/// Submits `req`, retrying on transport errors and while no controller leads, for up to
/// the reconnect timeout. A request without a request id is given one; the same id
/// makes a retry return the run the first try created.
pub async fn submit(target: &Target, mut req: pb::SubmitRunRequest) -> Result<(Client, String), Error> {
    if req.request_id.is_empty() {
        req.request_id = uuid::Uuid::new_v4().to_string();
    }
    let deadline = tokio::time::Instant::now() + target.reconnect_timeout;
    let mut delay = Duration::from_millis(200);
    let mut note = RetryNote::default();
    loop {
        let failure = match connect(target).await {
            Ok(mut c) => match c.submit_run(req.clone()).await {
                Ok(r) => return Ok((c, r.into_inner().run_id)),
                Err(s) if transient(&s) => Error::Status(s),
                Err(s) => return Err(s.into()),
            },
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(failure);
        }
        note.say("submit: ", &failure, target.reconnect_timeout);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The admin service of the leading controller.
pub async fn admin(target: &Target) -> Result<Admin, Error> {
    Ok(AdminServiceClient::new(leader(target).await?))
}

async fn leader(target: &Target) -> Result<AuthChannel, Error> {
    let list: Vec<&str> = target.urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let mut problems = Vec::new();
    for url in &list {
        let ch = match channel(url, target).await {
            Ok(c) => c,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        match client(ch.clone()).get_leader(pb::GetLeaderRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.is_leader {
                    return Ok(ch);
                }
                if !r.address.is_empty() {
                    match channel(&r.address, target).await {
                        Ok(leader) => return Ok(leader),
                        Err(e) => problems.push(format!("{url} names the leader {}: {e}", r.address)),
                    }
                } else {
                    problems.push(format!("{url} is a standby and knows no leader yet"));
                }
            }
            Err(s) => problems.push(format!("{url}: {}", describe(&s))),
        }
    }
    Err(Error::Connect(match problems.len() {
        0 => "no controller address given".to_string(),
        1 => problems.remove(0),
        _ => format!("no leading controller found: {}", problems.join("; ")),
    }))
}

/// A gRPC status in one line, as a person reads it.
pub fn describe(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unavailable => format!("controller unavailable: {}", s.message()),
        tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
            s.message().to_string()
        }
        tonic::Code::Unauthenticated => format!("not authenticated: {}", s.message()),
        tonic::Code::PermissionDenied => format!("permission denied: {}", s.message()),
        code => format!("{code:?}: {}", s.message()),
    }
}

/// Run params as the API takes them (strings).
pub fn params(params: Vec<(String, String)>) -> baton_common::proto::Struct {
    baton_common::proto::structure(
        params.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect(),
    )
}

/// What [`Watch::next`] yields.
#[derive(Debug)]
pub enum Watched {
    /// The run's next event.
    Event(Box<pb::RunEvent>),
    /// The controller went away; the watch looks for the leader again and resumes
    /// after the last event it yielded.
    Reconnecting(String),
}

/// A run's events from a sequence number until the one that ends the run, resumed
/// after a dropped stream (a restart, a new leader) without a gap or a repeat.
pub struct Watch {
    target: Target,
    run_id: String,
    next_seq: i64,
    stream: Option<tonic::Streaming<pb::RunEvent>>,
    down_since: Option<tokio::time::Instant>,
    done: bool,
}

impl Watch {
    /// Watches `run_id` (a full id) from event `from_seq`.
    pub fn new(target: &Target, run_id: &str, from_seq: i64) -> Watch {
        Watch {
            target: target.clone(),
            run_id: run_id.to_string(),
            next_seq: from_seq.max(1),
            stream: None,
            down_since: None,
            done: false,
        }
    }

    /// The sequence number of the next event to come.
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// The next event, a note that the watch reconnects, or `None` once the run has
    /// ended. `c` is replaced by a client of the new leader after a failover. Errors
    /// that retrying cannot mend (the run does not exist, the token is refused) and a
    /// controller gone for longer than the reconnect timeout end the watch.
    pub async fn next(&mut self, c: &mut Client) -> Result<Option<Watched>, Error> {
        if self.done {
            return Ok(None);
        }
        loop {
            let result = match &mut self.stream {
                Some(stream) => stream.message().await,
                None => {
                    let req = pb::WatchRunRequest {
                        run_id: self.run_id.clone(),
                        from_seq: self.next_seq,
                        ..Default::default()
                    };
                    match c.watch_run(req).await {
                        Ok(s) => {
                            self.stream = Some(s.into_inner());
                            continue;
                        }
                        Err(s) => Err(s),
                    }
                }
            };
            match result {
                Ok(Some(ev)) => {
                    self.down_since = None;
                    self.next_seq = ev.seq + 1;
                    return Ok(Some(Watched::Event(Box::new(ev))));
                }
                Ok(None) => {
                    self.done = true;
                    return Ok(None);
                }
                Err(s) if transient(&s) || s.code() == tonic::Code::Internal => {
                    self.stream = None;
                    let since = *self.down_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > self.target.reconnect_timeout {
                        return Err(s.into());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    // The leader may have changed: find it again.
                    if let Ok(leader) = connect(&self.target).await {
                        *c = leader;
                    }
                    return Ok(Some(Watched::Reconnecting(format!(
                        "lost the controller ({}); reconnecting",
                        s.message()
                    ))));
                }
                Err(s) => return Err(s.into()),
            }
        }
    }
}
