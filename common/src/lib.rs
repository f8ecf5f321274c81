//! Baton's shared contract: the generated gRPC API, the workstream spec and the pure
//! state machines and policies that the controller applies.

pub mod approval;
pub mod artifacts;
pub mod auth;
pub mod breaker;
pub mod certs;
pub mod connect;
pub mod expr;
pub mod metrics;
pub mod outcome;
pub mod process;
pub mod proto;
pub mod redact;
pub mod retry;
pub mod script;
pub mod spec;
pub mod state;
pub mod template;
pub mod time;
pub mod tools;
pub mod trace;

pub use proto::v1 as pb;

/// A binary's exit: 0, or its error on stderr as one line (`error: ...`) and 1.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// gRPC metadata key with which a standby controller names the leader's address.
pub const LEADER_HEADER: &str = "baton-leader";
