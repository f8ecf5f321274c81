//! Connecting to the leading controller of a list (`--controller a,b,c`).

use std::time::Duration;

use anyhow::anyhow;
use baton_common::pb;
use baton_common::pb::baton_service_client::BatonServiceClient;
use tonic::transport::Channel;

pub type Client = BatonServiceClient<Channel>;

async fn channel(url: &str) -> anyhow::Result<Client> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow!("bad controller url {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the controller at {url}: {}", source_chain(&e)))?;
    Ok(BatonServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024))
}

/// Connects to the controller that leads: the first of `urls` (comma-separated) that
/// answers, or the leader it names when it is a standby.
pub async fn connect(urls: &str) -> anyhow::Result<Client> {
    let list: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let mut problems = Vec::new();
    for url in &list {
        let mut c = match channel(url).await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        };
        match c.get_leader(pb::GetLeaderRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.is_leader {
                    return Ok(c);
                }
                if !r.address.is_empty() {
                    match channel(&r.address).await {
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
        tonic::Code::NotFound => anyhow!("{}", s.message()),
        tonic::Code::FailedPrecondition => anyhow!("{}", s.message()),
        code => anyhow!("{code:?}: {}", s.message()),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
