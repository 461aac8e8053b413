//! Whether a failure is worth retrying. Its own module because storage, queue, engine and worker
//! errors all classify themselves with it, and none of them should depend on another's errors.

/// Whether a failed task should be retried or dead-lettered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    /// Bad input: retrying cannot help; the message goes to the dead-letter destination.
    Permanent,
    /// An outage or timeout: the message is retried with backoff, up to the attempt limit.
    Transient,
}
