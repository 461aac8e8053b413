//! Task errors, classified as permanent (dead-letter now) or transient (retry with backoff).
//!
//! The split follows pict-rs's Abort vs Retry: bad input never gets better by retrying, while a
//! broker or storage outage usually does. A task error is a task-level problem (the message), or
//! wraps the error of the part that failed: the engine, storage or the queue, each of which
//! defines its own and knows nothing of the others.

use thiserror::Error;

use crate::engine::EngineError;
pub use crate::failure::Failure;
use crate::queue::QueueError;
use crate::storage::StorageError;

/// Everything that can go wrong while processing one task.
#[derive(Debug, Error)]
pub enum TaskError {
    #[error("malformed task message: {0}")]
    MalformedTask(String),
    #[error("unsupported task schema version {found} (this worker understands v{supported})")]
    UnsupportedVersion { found: u64, supported: u64 },
    #[error("invalid task {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// Crop list, limits, decode or encode (its message is the engine's, unchanged).
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// A failure of the worker itself (a panicking CPU job, a dropped upload task).
    #[error("internal: {0}")]
    Internal(String),
}

impl TaskError {
    /// Permanent (dead-letter) or transient (retry) — see [`Failure`].
    pub fn failure(&self) -> Failure {
        match self {
            TaskError::Storage(e) => e.failure(),
            TaskError::Engine(e) if e.is_permanent() => Failure::Permanent,
            TaskError::Engine(_) | TaskError::Queue(_) | TaskError::Internal(_) => Failure::Transient,
            _ => Failure::Permanent,
        }
    }

    /// A short machine-readable kind, used as a metric label and in dead-letter reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskError::MalformedTask(_) => "malformed_task",
            TaskError::UnsupportedVersion { .. } => "unsupported_version",
            TaskError::InvalidField { .. } => "invalid_field",
            TaskError::Engine(e) => e.kind(),
            TaskError::Storage(e) if e.failure() == Failure::Permanent => "storage_permanent",
            TaskError::Storage(_) => "storage",
            TaskError::Queue(_) => "queue",
            TaskError::Internal(_) => "internal",
        }
    }
}
