//! `baton.v1.AgentService`: one bidirectional stream per agent session.

use std::pin::Pin;
use std::time::Duration;

use baton_common::pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::leader::Leadership;

pub struct AgentApi {
    leadership: Leadership,
}

impl AgentApi {
    pub fn new(leadership: Leadership) -> AgentApi {
        AgentApi { leadership }
    }
}

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = Outbound;

    async fn connect(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument("the first message of a session must be hello"));
            }
        };
        let agent_id = hello.agent_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (engine, term) = self.leadership.engine()?;
        let session = engine.connect(hello, tx).await?;
        let shutdown = term;
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(pb::AgentMessage { msg: Some(m) })) => {
                        if !engine.agent_message(agent_id.clone(), m).await {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    // End of stream or a broken one: a disconnect, not an error.
                    Ok(None) => break,
                    Err(e) => {
                        debug!(agent_id, error = %e, "agent stream broke");
                        break;
                    }
                }
            }
            engine.disconnect(agent_id, session).await;
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}
