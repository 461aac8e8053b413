//! Queues: one small trait, one module per backend, chosen by URI.
//!
//! Every backend keeps the same semantics: at-least-once delivery, manual ack after the work
//! is stored, a bounded number of messages in flight per worker (the worker's `--prefetch`),
//! redelivery of unacked work when a worker dies, and a dead-letter destination with a reason
//! for messages that fail for good or too often.

pub mod amqp;
mod backoff;
pub mod pubsub;
pub mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

/// Queue failures. All are transient for a task (the broker may come back) except
/// [`QueueError::InvalidUri`] and [`QueueError::Missing`], which are configuration errors.
/// A URI in an error is always redacted ([`crate::secret::redact`]): no password in messages.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("invalid queue URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{what} does not exist; create it with `cropfleet-producer setup --queue …`: {detail}")]
    Missing { what: String, detail: String },
    #[error("spool {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("broker: {0}")]
    Broker(String),
    #[error("topology conflict: {0}")]
    Conflict(String),
}

/// Parsed queue URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueUri {
    /// `spool:PATH` — a directory queue on local disk.
    Spool(PathBuf),
    /// `amqp://user:pass@host:port/vhost?queue=NAME` — a RabbitMQ queue ([`amqp`]).
    Amqp {
        /// The broker URL handed to lapin: the URI without `queue=`, other parameters kept.
        url: String,
        /// The work queue's name.
        queue: String,
    },
    /// `pubsub://PROJECT/NAME[?options]` — Google Cloud Pub/Sub topic `NAME` ([`pubsub`]).
    PubSub {
        /// The Google Cloud project id.
        project: String,
        /// The queue name: topic `NAME`, subscription `NAME-workers`, dead letters `NAME-dead`.
        name: String,
        /// Batching, ack deadline, retry and dead-letter settings from the query.
        options: pubsub::PubSubOptions,
    },
}

impl QueueUri {
    /// Parse `spool:PATH`, `amqp://user:pass@host:port/vhost?queue=NAME` or `pubsub://PROJECT/NAME`.
    pub fn parse(uri: &str) -> Result<QueueUri, QueueError> {
        let bad = |reason: &str| QueueError::InvalidUri { uri: crate::secret::redact(uri), reason: reason.into() };
        if let Some(rest) = uri.strip_prefix("spool:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.is_empty() {
                return Err(bad("spool: needs a directory path, e.g. spool:/tmp/cropfleet/tasks"));
            }
            return Ok(QueueUri::Spool(PathBuf::from(rest)));
        }
        if uri.starts_with("amqp://") || uri.starts_with("amqps://") {
            let (url, queue) = amqp::parse_uri(uri)?;
            return Ok(QueueUri::Amqp { url, queue });
        }
        if uri.starts_with("pubsub://") {
            let (project, name, options) = pubsub::parse_uri(uri)?;
            return Ok(QueueUri::PubSub { project, name, options });
        }
        Err(bad("expected spool:PATH, amqp://user:pass@host:port/vhost?queue=NAME or pubsub://PROJECT/NAME"))
    }
}

/// How a consumer behaves; the worker derives it from its flags.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Most messages held unacked by this consumer at once.
    pub prefetch: usize,
    /// Deliveries after which a message whose worker keeps dying is dead-lettered.
    pub max_attempts: u32,
    /// Spool only: how long a claim lives without being renewed before others may take it back.
    pub lease: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions { prefetch: 4, max_attempts: 5, lease: Duration::from_secs(30) }
    }
}

/// A message handed to a consumer; settle it exactly once through its [`Acker`].
pub struct Delivery {
    /// Backend message id (file name, delivery tag, Pub/Sub message id).
    pub id: String,
    pub payload: Vec<u8>,
    /// 1 on first delivery.
    pub attempt: u32,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: remove the message for good.
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// Transient failure: deliver again after `delay`, counting an attempt.
    async fn retry(self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError>;
    /// Permanent failure: move to the dead-letter destination with `reason`.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError>;
    /// Shutting down before the work started: hand it back at once without counting an attempt.
    async fn release(self: Box<Self>) -> Result<(), QueueError>;
}

/// A stream of deliveries.
#[async_trait]
pub trait Consumer: Send {
    /// Wait up to `wait` for the next message; `None` when none arrived in that time.
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, QueueError>;
    /// Stop taking new messages (shutdown); messages already handed out may still be settled.
    async fn stop(&mut self) {}
}

/// A dead-lettered message and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// One queue (tasks or results).
#[async_trait]
pub trait Queue: Send + Sync {
    /// Create whatever the queue needs (folders, topology, topics); idempotent.
    async fn setup(&self) -> Result<(), QueueError>;
    /// Publish one message durably; returns once the backend confirmed it.
    async fn publish(&self, payload: &[u8]) -> Result<(), QueueError>;
    /// Publish many; returns how many were confirmed before the first failure, and that failure.
    async fn publish_many(&self, payloads: &[Vec<u8>]) -> (usize, Option<QueueError>) {
        for (i, p) in payloads.iter().enumerate() {
            if let Err(e) = self.publish(p).await {
                return (i, Some(e));
            }
        }
        (payloads.len(), None)
    }
    /// Start consuming.
    async fn consumer(&self, opts: ConsumerOptions) -> Result<Box<dyn Consumer>, QueueError>;
    /// Messages waiting (not in flight), when the backend can tell.
    async fn depth(&self) -> Result<Option<u64>, QueueError>;
    /// Read (without removing) up to `max` dead letters, when the backend can.
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// A short name for tables and logs (`spool`, `rabbitmq`, `pubsub`).
    fn backend(&self) -> &'static str;
}

/// Open a queue by URI.
pub async fn open(uri: &str) -> Result<Arc<dyn Queue>, QueueError> {
    match QueueUri::parse(uri)? {
        QueueUri::Spool(path) => Ok(Arc::new(spool::Spool::new(path))),
        QueueUri::Amqp { url, queue } => Ok(Arc::new(amqp::Amqp::new(url, &queue))),
        QueueUri::PubSub { project, name, options } => Ok(Arc::new(pubsub::PubSub::new(&project, &name, options))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(QueueUri::parse("spool:/tmp/q").unwrap(), QueueUri::Spool("/tmp/q".into()));
        assert_eq!(QueueUri::parse("spool:rel/q").unwrap(), QueueUri::Spool("rel/q".into()));
        assert!(QueueUri::parse("spool:").is_err());
        assert!(QueueUri::parse("kafka://x").unwrap_err().to_string().contains("kafka://x"));
        assert_eq!(
            QueueUri::parse("amqp://guest:guest@127.0.0.1:5672/%2f?queue=crops&heartbeat=10").unwrap(),
            QueueUri::Amqp { url: "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10".into(), queue: "crops".into() }
        );
        let e = QueueUri::parse("amqp://127.0.0.1/%2f").unwrap_err();
        assert!(matches!(e, QueueError::InvalidUri { .. }) && e.to_string().contains("queue"), "{e}");
    }
}
