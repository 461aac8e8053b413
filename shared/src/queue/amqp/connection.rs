//! Connections: opening one (with a timeout), and telling an error that a reconnect fixes (a
//! lost connection or channel) from one it does not (credentials, a conflicting declaration).
//! Every connection of this backend is opened by [`connect`].

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};

use tokio::time::Instant;
use tracing::warn;

use super::{redact, CONNECT_TIMEOUT, PUBLISH_RECONNECT_BUDGET};
use crate::queue::backoff::Backoff;
use crate::queue::QueueError;

/// Why an operation failed: the connection went away (retry after reconnecting) or something
/// that a reconnect will not fix.
#[derive(Debug)]
pub(super) enum Fault {
    Lost(String),
    Fatal(QueueError),
}

impl Fault {
    pub(super) fn into_error(self) -> QueueError {
        match self {
            Fault::Lost(m) => QueueError::Broker(m),
            Fault::Fatal(e) => e,
        }
    }
}

/// True when the error means the connection (not just one channel) is gone.
pub(super) fn connection_lost(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::ParsingError(_)
        | ErrorKind::SerialisationError(_) => true,
        ErrorKind::ProtocolError(a) => matches!(a.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

/// Classify a lapin error from an operation on `what` over `conn`.
pub(super) fn fault(what: &str, e: &lapin::Error, conn: Option<&Connection>) -> Fault {
    if connection_lost(e) || conn.is_some_and(|c| !c.status().connected()) {
        return Fault::Lost(format!("{what}: connection lost: {e}"));
    }
    if let ErrorKind::InvalidChannelState(..) = e.kind() {
        // The channel was closed under us (by a soft error elsewhere); a new one will do.
        return Fault::Lost(format!("{what}: channel closed: {e}"));
    }
    Fault::Fatal(explain(what, e))
}

/// A user-facing error for a failed AMQP operation on `what`.
pub(super) fn explain(what: &str, e: &lapin::Error) -> QueueError {
    if let ErrorKind::ProtocolError(a) = e.kind() {
        let msg = a.get_message().to_string();
        let detail = msg.split_once(" - ").map(|(_, d)| d.to_string()).unwrap_or_else(|| msg.clone());
        match a.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                return QueueError::Conflict(format!(
                    "{what} already exists with different settings than cropfleet declares \
                     (\"received\" is cropfleet's, \"current\" is the broker's): {detail}. \
                     Delete it (e.g. `rabbitmqctl delete_queue NAME`) or use another queue name."
                ));
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                return QueueError::Missing { what: what.to_string(), detail };
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return QueueError::Broker(format!("{what}: access refused: {detail}"));
            }
            _ => {}
        }
    }
    QueueError::Broker(format!("{what}: {e}"))
}

/// Connect with a timeout. Refused/reset/timeouts are `Lost` (retry); credentials and vhost
/// problems are `Fatal`.
pub(super) async fn connect(url: &str, name: &str) -> Result<Connection, Fault> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => match e.kind() {
            ErrorKind::ProtocolError(a)
                if matches!(
                    a.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                ) =>
            {
                Err(Fault::Fatal(QueueError::Broker(format!("connecting to {}: {e}", redact(url)))))
            }
            ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => {
                Err(Fault::Fatal(QueueError::Broker(format!("connecting to {}: {e}", redact(url)))))
            }
            _ => Err(Fault::Lost(format!("connecting to {}: {e}", redact(url)))),
        },
        Err(_) => Err(Fault::Lost(format!("connecting to {}: timed out after {CONNECT_TIMEOUT:?}", redact(url)))),
    }
}

/// Run `f` on a throwaway channel (a soft error closes the channel it happens on), then close it.
pub(super) async fn on_temp_channel<T, F, Fut>(conn: &Connection, f: F) -> Result<T, Fault>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, Fault>>,
{
    let ch = conn.create_channel().await.map_err(|e| fault("opening a channel", &e, Some(conn)))?;
    let keep = ch.clone();
    let r = f(ch).await;
    if keep.status().connected() {
        let _ = keep.close(200, "ok".into()).await;
    }
    r
}

/// Run `attempt` (a connect, or a connect and declare) until it succeeds, fails for a reason a
/// reconnect will not fix, or the broker has been unreachable for [`PUBLISH_RECONNECT_BUDGET`];
/// then the last [`Fault::Lost`] is returned.
pub(super) async fn patiently<T, F, Fut>(queue: &str, mut attempt: F) -> Result<T, Fault>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Fault>>,
{
    let start = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match attempt().await {
            Err(Fault::Lost(m)) if start.elapsed() < PUBLISH_RECONNECT_BUDGET => {
                let d = backoff.step();
                warn!(queue, error = %m, retry_in_ms = d.as_millis() as u64, "RabbitMQ unreachable; retrying");
                tokio::time::sleep(d).await;
            }
            other => return other,
        }
    }
}
