//! Connecting to the controller's API.

use std::time::Duration;

use anyhow::anyhow;
use baton_common::pb::baton_service_client::BatonServiceClient;
use tonic::transport::Channel;

pub type Client = BatonServiceClient<Channel>;

pub async fn connect(url: &str) -> anyhow::Result<Client> {
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
