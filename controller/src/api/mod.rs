//! The gRPC surface: thin services that read the store and send the engine messages.

mod admin;
mod agents;
mod artifacts;
pub(crate) mod convert;
mod error;
mod logs;
mod runs;
mod schedules;

use baton_common::pb;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::Store;

pub use admin::{AdminApi, check_name, new_token};
pub use agents::AgentApi;
pub use error::ApiError;
pub use runs::RunApi;

/// Largest gRPC message of the agent protocol.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest message of the public API the server decodes: above the spec limit (a run
/// of 100,000 steps takes more than 4 MiB), so that a spec past it is refused by the
/// handler, which names both sizes, rather than by the transport.
const MAX_API_MESSAGE_BYTES: usize = baton_common::spec::MAX_SPEC_BYTES + MAX_MESSAGE_BYTES;

/// The services of the API port.
pub struct Services {
    pub runs: pb::baton_service_server::BatonServiceServer<RunApi>,
    pub agents: pb::agent_service_server::AgentServiceServer<AgentApi>,
    pub admin: pb::admin_service_server::AdminServiceServer<AdminApi>,
    /// The services themselves, for the dashboard's calls.
    pub run_api: std::sync::Arc<RunApi>,
    pub admin_api: std::sync::Arc<AdminApi>,
}

/// What the services of the API port share.
pub struct Context {
    pub leadership: crate::leader::Leadership,
    pub router: crate::router::Rules,
    pub store: Store,
    pub logs: crate::logs::Logs,
    pub router_path: Option<std::path::PathBuf>,
    pub auth: std::sync::Arc<crate::auth::Authenticator>,
    pub secrets: Option<std::sync::Arc<crate::secrets::SecretBox>>,
    pub shutdown: CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
    /// Where artifacts are kept; `None`: they are refused.
    pub artifacts: Option<crate::artifacts::Artifacts>,
}

pub fn services(cx: Context) -> Services {
    let run_api = std::sync::Arc::new(RunApi::new(&cx));
    let runs = pb::baton_service_server::BatonServiceServer::from_arc(run_api.clone())
        .max_decoding_message_size(MAX_API_MESSAGE_BYTES);
    let agents = pb::agent_service_server::AgentServiceServer::new(AgentApi::new(
        cx.leadership.clone(),
        cx.store.clone(),
        cx.tasks,
        cx.artifacts,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin_api = std::sync::Arc::new(AdminApi::new(cx.store, cx.auth, cx.leadership, cx.secrets));
    let admin = pb::admin_service_server::AdminServiceServer::from_arc(admin_api.clone());
    Services { runs, agents, admin, run_api, admin_api }
}

/// UNAVAILABLE with the reason while the database refuses the engine's writes; the
/// controller retries them and resumes by itself.
pub(crate) fn writable(store: &crate::store::Store) -> Result<(), Status> {
    match store.refusing() {
        None => Ok(()),
        Some(why) => Err(ApiError::unavailable(format!(
            "the database refuses writes ({why}); the controller retries and resumes by itself once it accepts them"
        )).into()),
    }
}
