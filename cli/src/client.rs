//! Connecting to the leading controller of a list (`--controller a,b,c`), with the
//! caller's TLS settings and token.

use anyhow::anyhow;
use baton_common::connect::{AuthChannel, Bearer, ClientTls, endpoint, error_chain};
use baton_common::pb;
use baton_common::pb::admin_service_client::AdminServiceClient;
use baton_common::pb::baton_service_client::BatonServiceClient;

pub type Client = BatonServiceClient<AuthChannel>;
pub type Admin = AdminServiceClient<AuthChannel>;

/// Where and how to reach the controller.
#[derive(Debug, Clone)]
pub struct Target {
    /// Comma-separated controller URLs.
    pub urls: String,
    pub tls: ClientTls,
    pub bearer: Bearer,
    /// How long calls that may be repeated keep retrying while no controller answers.
    pub reconnect_timeout: std::time::Duration,
}

async fn channel(url: &str, target: &Target) -> anyhow::Result<AuthChannel> {
    let endpoint = endpoint(url, &target.tls).map_err(|e| anyhow!(e))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the controller at {url}: {}", error_chain(&e)))?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, target.bearer.clone()))
}

fn client(ch: AuthChannel) -> Client {
    BatonServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024)
}

/// Connects to the controller that leads: the first of the URLs that answers, or the
/// leader it names when it is a standby.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    Ok(client(leader(target).await?))
}

/// [`connect`], retried with backoff while no controller leads (one restarts, or a
/// standby takes over), for up to the reconnect timeout; says so on stderr.
pub async fn connect_waiting(target: &Target) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + target.reconnect_timeout;
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match connect(target).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() + delay <= deadline => {
                eprintln!("{e:#}; retrying in {}", baton_common::time::format_duration(delay));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
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

/// Submits `req` (which carries a request id), retrying on transport errors and while
/// no controller leads, for up to the reconnect timeout; the same request id makes a
/// retry return the run the first try created.
pub async fn submit(target: &Target, req: pb::SubmitRunRequest) -> Result<(Client, String), crate::Failure> {
    let deadline = tokio::time::Instant::now() + target.reconnect_timeout;
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        let failure = match connect(target).await {
            Ok(mut c) => match c.submit_run(req.clone()).await {
                Ok(r) => return Ok((c, r.into_inner().run_id)),
                Err(s) if transient(&s) => anyhow!("{}", status_error(s)),
                Err(s) => return Err(s.into()),
            },
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(failure.into());
        }
        eprintln!("submit: {failure:#}; retrying in {}", baton_common::time::format_duration(delay));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// The admin service of the leading controller.
pub async fn admin(target: &Target) -> anyhow::Result<Admin> {
    Ok(AdminServiceClient::new(leader(target).await?))
}

async fn leader(target: &Target) -> anyhow::Result<AuthChannel> {
    let list: Vec<&str> = target.urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let mut problems = Vec::new();
    for url in &list {
        let ch = match channel(url, target).await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{e:#}"));
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
                        Err(e) => problems.push(format!("{url} names the leader {}: {e:#}", r.address)),
                    }
                } else {
                    problems.push(format!("{url} is a standby and knows no leader yet"));
                }
            }
            Err(s) => problems.push(format!("{url}: {}", status_error(s))),
        }
    }
    match problems.len() {
        0 => Err(anyhow!("no controller address given")),
        1 => Err(anyhow!("{}", problems[0])),
        _ => Err(anyhow!("no leading controller found: {}", problems.join("; "))),
    }
}

/// A gRPC status as a one-line error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow!("controller unavailable: {}", s.message()),
        tonic::Code::NotFound | tonic::Code::FailedPrecondition => anyhow!("{}", s.message()),
        tonic::Code::Unauthenticated => anyhow!("not authenticated: {}", s.message()),
        tonic::Code::PermissionDenied => anyhow!("permission denied: {}", s.message()),
        code => anyhow!("{code:?}: {}", s.message()),
    }
}

/// `--param` values as the API takes them (strings).
pub fn params(params: Vec<(String, String)>) -> baton_common::proto::Struct {
    baton_common::proto::structure(
        params.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect(),
    )
}
