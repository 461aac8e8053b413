//! Task errors, classified as permanent (dead-letter now) or transient (retry with backoff).
//!
//! The split follows pict-rs's Abort vs Retry: bad input never gets better by retrying, while a
//! broker or storage outage usually does.

use thiserror::Error;

/// Whether a failed task should be retried or dead-lettered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    /// Bad input: retrying cannot help; the message goes to the dead-letter destination.
    Permanent,
    /// An outage or timeout: the message is retried with backoff, up to the attempt limit.
    Transient,
}

/// Everything that can go wrong while processing one task.
#[derive(Debug, Error)]
pub enum TaskError {
    #[error("malformed task message: {0}")]
    MalformedTask(String),
    #[error("unsupported task schema version {found} (this worker understands v{supported})")]
    UnsupportedVersion { found: u64, supported: u64 },
    #[error("invalid task {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("invalid crop list: {0}")]
    InvalidCrops(String),
    #[error("crop #{index} {boxed} {reason}")]
    BadBox { index: usize, boxed: String, reason: String },
    #[error("too many crops: {count} > limit {limit}")]
    TooManyCrops { count: usize, limit: usize },
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u64, height: u64, pixels: u64, limit: u64 },
    #[error("source {uri} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("cannot encode crop #{index}: {reason}")]
    Encode { index: usize, reason: String },
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("queue: {0}")]
    Queue(#[from] crate::queue::QueueError),
    #[error("internal: {0}")]
    Internal(String),
}

impl TaskError {
    /// Permanent (dead-letter) or transient (retry) — see [`Failure`].
    pub fn failure(&self) -> Failure {
        match self {
            TaskError::Storage(e) => e.failure(),
            TaskError::Queue(_) | TaskError::Internal(_) => Failure::Transient,
            _ => Failure::Permanent,
        }
    }

    /// A short machine-readable kind, used as a metric label and in dead-letter reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskError::MalformedTask(_) => "malformed_task",
            TaskError::UnsupportedVersion { .. } => "unsupported_version",
            TaskError::InvalidField { .. } => "invalid_field",
            TaskError::InvalidCrops(_) => "invalid_crops",
            TaskError::BadBox { .. } => "bad_box",
            TaskError::TooManyCrops { .. } => "too_many_crops",
            TaskError::TooManyPixels { .. } => "too_many_pixels",
            TaskError::TooLarge { .. } => "too_large",
            TaskError::Decode(_) => "decode",
            TaskError::Encode { .. } => "encode",
            TaskError::Storage(e) if e.failure() == Failure::Permanent => "storage_permanent",
            TaskError::Storage(_) => "storage",
            TaskError::Queue(_) => "queue",
            TaskError::Internal(_) => "internal",
        }
    }
}
