//! `baton.v1.AgentService`: enrollment, and one bidirectional stream per agent session.
//! An agent connects only as itself: the id and name its credential was issued for.

use std::pin::Pin;
use std::time::Duration;

use super::ApiError;
use baton_common::pb;
use baton_common::time::now_ms;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::auth::{Identity, Via, tokens};
use crate::engine::Binding;
use crate::leader::Leadership;
use crate::store::{Enrollment, Store};

pub struct AgentApi {
    leadership: Leadership,
    store: Store,
    tasks: tokio_util::task::TaskTracker,
    artifacts: Option<crate::artifacts::Artifacts>,
}

impl AgentApi {
    pub fn new(
        leadership: Leadership,
        store: Store,
        tasks: tokio_util::task::TaskTracker,
        artifacts: Option<crate::artifacts::Artifacts>,
    ) -> AgentApi {
        AgentApi { leadership, store, tasks, artifacts }
    }
}

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

/// What the caller's identity lets it connect as.
fn binding(identity: &Identity, hello: &pb::Hello) -> Result<Binding, Status> {
    let claim = |what: &str| {
        ApiError::denied(format!(
            "{} may not connect as agent {:?} (id {}): {what}",
            identity.actor(),
            hello.name,
            hello.agent_id
        ))
        .into()
    };
    match &identity.via {
        Via::Agent { agent_id } => {
            if *agent_id != hello.agent_id {
                return Err(claim(&format!("its credential is for agent id {agent_id}")));
            }
            if identity.name != hello.name {
                return Err(claim(&format!("its credential is for the name {:?}", identity.name)));
            }
            Ok(Binding { strict: true, id_proven: true, labels: identity.labels.clone() })
        }
        Via::Certificate => {
            if identity.name != hello.name {
                return Err(claim(&format!("its certificate is for the name {:?}", identity.name)));
            }
            Ok(Binding { strict: true, id_proven: false, labels: identity.labels.clone() })
        }
        // Authentication is off: the agent is who it says.
        Via::Anonymous => Ok(Binding::default()),
        Via::Token { .. } | Via::JoinToken { .. } => Err(claim("it is not an agent's credential")),
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = Outbound;
    type FetchInputsStream = super::artifacts::ChunkStream;

    async fn upload_artifact(
        &self,
        req: Request<Streaming<pb::ArtifactUpload>>,
    ) -> Result<Response<pb::ArtifactInfo>, Status> {
        let identity = Identity::of(&req);
        let artifacts = super::artifacts::store_of(&self.artifacts)?;
        let info = super::artifacts::upload(&self.store, artifacts, &identity, req.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn fetch_inputs(
        &self,
        req: Request<pb::FetchInputsRequest>,
    ) -> Result<Response<Self::FetchInputsStream>, Status> {
        let identity = Identity::of(&req);
        let artifacts = super::artifacts::store_of(&self.artifacts)?.clone();
        let rows = super::artifacts::inputs(&self.store, &identity, req.get_ref()).await?;
        Ok(Response::new(super::artifacts::stream(artifacts, rows)))
    }

    async fn connect(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let identity = Identity::of(&req);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| ApiError::deadline("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Hello(h)) => h,
            _ => {
                return Err(ApiError::invalid("the first message of a session must be hello").into());
            }
        };
        let binding = binding(&identity, &hello)?;
        let agent_id = hello.agent_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (engine, term) = self.leadership.engine()?;
        let session = engine.connect(hello, tx, binding).await?;
        let shutdown = term;
        self.tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(pb::AgentMessage { msg: Some(m) })) => {
                        if !engine.agent_message(agent_id.clone(), session, m).await {
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

    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let identity = Identity::of(&req);
        let Via::JoinToken { id: join_id } = &identity.via else {
            return Err(ApiError::conflict(
                "enrolling needs a join token (baton agents join-token); this controller may not require one",
            )
            .into());
        };
        let req = req.into_inner();
        super::check_name("agent", &req.name)?;
        let id_ok = !req.agent_id.is_empty()
            && req.agent_id.len() <= 64
            && req.agent_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !id_ok {
            return Err(ApiError::invalid(format!("agent id {:?} is not valid", req.agent_id)).into());
        }
        let minted = tokens::mint(tokens::Kind::Agent);
        let labels = self
            .store
            .enroll(&Enrollment {
                join_id,
                name: &req.name,
                agent_id: &req.agent_id,
                cred_id: &minted.id,
                secret_hash: &minted.hash,
                now: now_ms(),
            })
            .await?;
        info!(agent = %req.name, agent_id = %req.agent_id, join_token = %join_id, "agent enrolled");
        let labels: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&labels).unwrap_or_default();
        Ok(Response::new(pb::EnrollResponse {
            credential: minted.token,
            labels: labels.into_iter().collect(),
        }))
    }
}
