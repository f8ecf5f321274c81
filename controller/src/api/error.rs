//! The errors of the API and the one place where they become gRPC status codes.

use tonic::Status;

use crate::engine::EngineError;
use crate::store::StoreError;

/// What an API call fails with. Unknown runs, steps, agents, tokens and breakers are
/// `NotFound` everywhere; bad input is `Invalid`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The call does not fit the state it finds (a run that ended, a missing config).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// Try again (later, or at the leader).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Deadline(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(m: impl Into<String>) -> ApiError {
        ApiError::Invalid(m.into())
    }

    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::NotFound(m.into())
    }

    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::Conflict(m.into())
    }

    pub fn denied(m: impl Into<String>) -> ApiError {
        ApiError::Denied(m.into())
    }

    pub fn unauthenticated(m: impl Into<String>) -> ApiError {
        ApiError::Unauthenticated(m.into())
    }

    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::Unavailable(m.into())
    }

    pub fn deadline(m: impl Into<String>) -> ApiError {
        ApiError::Deadline(m.into())
    }

    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::Internal(m.into())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::Conflict(m) => Status::failed_precondition(m),
            ApiError::Denied(m) => Status::permission_denied(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Deadline(m) => Status::deadline_exceeded(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Invalid(m) => ApiError::Invalid(m),
            EngineError::RunNotFound(_) => ApiError::NotFound(e.to_string()),
            EngineError::NotFound(m) => ApiError::NotFound(m),
            EngineError::Conflict(m) => ApiError::Conflict(m),
            EngineError::Denied(m) => ApiError::Denied(m),
            EngineError::Unavailable => ApiError::Unavailable(e.to_string()),
            EngineError::Store(s) => s.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::RunNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::AmbiguousRun { .. } => ApiError::Invalid(e.to_string()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Unauthenticated(m) => ApiError::Unauthenticated(m),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

/// For `?` on engine and store results in handlers: through [`ApiError`].
impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        ApiError::from(e).into()
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        ApiError::from(e).into()
    }
}
