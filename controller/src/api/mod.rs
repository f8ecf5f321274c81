//! The gRPC surface: thin services that read the store and send the engine messages.

mod admin;
mod agents;
pub(crate) mod convert;
mod logs;
mod runs;

use baton_common::pb;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::engine::EngineError;
use crate::store::{Store, StoreError};

pub use admin::{AdminApi, check_name, new_token};
pub use agents::AgentApi;
pub use runs::RunApi;

/// Largest gRPC message accepted, and largest spec.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The services of the API port.
pub struct Services {
    pub runs: pb::baton_service_server::BatonServiceServer<RunApi>,
    pub agents: pb::agent_service_server::AgentServiceServer<AgentApi>,
    pub admin: pb::admin_service_server::AdminServiceServer<AdminApi>,
}

/// What the services of the API port share.
pub struct Context {
    pub leadership: crate::leader::Leadership,
    pub router: std::sync::Arc<std::sync::Mutex<crate::router::Router>>,
    pub store: Store,
    pub logs: crate::logs::Logs,
    pub router_path: Option<std::path::PathBuf>,
    pub auth: std::sync::Arc<crate::auth::Authenticator>,
    pub secrets: Option<std::sync::Arc<crate::secrets::SecretBox>>,
    pub shutdown: CancellationToken,
}

pub fn services(cx: Context) -> Services {
    let runs = pb::baton_service_server::BatonServiceServer::new(RunApi::new(
        cx.leadership.clone(),
        cx.router,
        cx.store.clone(),
        cx.logs,
        cx.router_path,
        cx.shutdown,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let agents = pb::agent_service_server::AgentServiceServer::new(AgentApi::new(
        cx.leadership.clone(),
        cx.store.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin = pb::admin_service_server::AdminServiceServer::new(AdminApi::new(
        cx.store,
        cx.auth,
        cx.leadership,
        cx.secrets,
    ));
    Services { runs, agents, admin }
}

/// The one place where errors become gRPC status codes.
impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::Invalid(m) => Status::invalid_argument(m),
            EngineError::RunNotFound(_) => Status::not_found(e.to_string()),
            EngineError::Conflict(m) => Status::failed_precondition(m),
            EngineError::Denied(m) => Status::permission_denied(m),
            EngineError::Unavailable => Status::unavailable(e.to_string()),
            EngineError::Store(s) => s.into(),
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::RunNotFound(_) => Status::not_found(e.to_string()),
            StoreError::AmbiguousRun { .. } => Status::invalid_argument(e.to_string()),
            StoreError::Conflict(m) => Status::failed_precondition(m),
            StoreError::NotFound(m) => Status::not_found(m),
            StoreError::Unauthenticated(m) => Status::unauthenticated(m),
            _ => Status::internal(e.to_string()),
        }
    }
}

/// UNAVAILABLE with the reason while the database refuses the engine's writes; the
/// controller retries them and resumes by itself.
pub(crate) fn writable(store: &crate::store::Store) -> Result<(), Status> {
    match store.refusing() {
        None => Ok(()),
        Some(why) => Err(Status::unavailable(format!(
            "the database refuses writes ({why}); the controller retries and resumes by itself once it accepts them"
        ))),
    }
}
