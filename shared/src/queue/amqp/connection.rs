//! Connections: opening one (with a timeout; over TLS for `amqps://`), and telling an error that a reconnect fixes (a
//! lost connection or channel) from one it does not (credentials, a conflicting declaration).
//! Every connection of this backend is opened by [`connect`].

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, Channel, Connection, ConnectionProperties, ErrorKind};

use tokio::time::Instant;
use tracing::warn;

use super::{redact, tls, CONNECT_TIMEOUT, PUBLISH_RECONNECT_BUDGET};
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

/// Connect with a timeout, over TLS for `amqps://` (see `tls.rs`). Refused/reset/timeouts are
/// `Lost` (retry); credentials, vhost and certificate problems are `Fatal`.
pub(super) async fn connect(url: &str, name: &str) -> Result<Connection, Fault> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let shown = redact(url);
    let (lapin_url, tls) =
        tls::split(url).map_err(|reason| Fault::Fatal(QueueError::InvalidUri { uri: shown.clone(), reason }))?;
    // The name the broker's certificate is verified for, for the error messages.
    let tls_name = tls.as_ref().map(|p| {
        p.server_name_indication
            .clone()
            .unwrap_or_else(|| lapin_url.parse::<AMQPUri>().map(|u| u.authority.host).unwrap_or_default())
    });
    let attempt = async {
        match tls {
            None => Connection::connect(&lapin_url, props).await,
            Some(params) => connect_tls(&lapin_url, &params, props).await.map_err(|e| match e {
                TlsFailure::Setup(m) => lapin::Error::from(std::io::Error::other(TlsSetup(m))),
                TlsFailure::Lapin(e) => e,
            }),
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => match e.kind() {
            ErrorKind::ProtocolError(a)
                if matches!(
                    a.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                ) =>
            {
                Err(Fault::Fatal(QueueError::Broker(format!("connecting to {shown}: {e}"))))
            }
            ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => {
                Err(Fault::Fatal(QueueError::Broker(format!("connecting to {shown}: {e}"))))
            }
            ErrorKind::IOError(io) if io.get_ref().is_some_and(|r| r.is::<TlsSetup>()) => {
                Err(Fault::Fatal(QueueError::Broker(format!("connecting to {shown}: {io}"))))
            }
            ErrorKind::IOError(io) if tls_name.is_some() => {
                match tls::explain_io(tls_name.as_deref().unwrap_or_default(), io) {
                    (m, true) => Err(Fault::Fatal(QueueError::Broker(format!("connecting to {shown}: {m}")))),
                    (m, false) => Err(Fault::Lost(format!("connecting to {shown}: {m}"))),
                }
            }
            _ => Err(Fault::Lost(format!("connecting to {shown}: {e}"))),
        },
        Err(_) => Err(Fault::Lost(format!("connecting to {shown}: timed out after {CONNECT_TIMEOUT:?}"))),
    }
}

/// A TLS set-up problem on our side (a file missing or malformed): permanent.
#[derive(Debug)]
struct TlsSetup(String);
impl std::fmt::Display for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for TlsSetup {}

enum TlsFailure {
    Setup(String),
    Lapin(lapin::Error),
}

/// TCP to the URI's host, then a rustls handshake verifying the certificate for
/// `server_name_indication` (default: the host), then AMQP on top. lapin's own amqps path
/// always verifies for the host, hence this connector.
async fn connect_tls(
    url: &str,
    params: &tls::TlsParams,
    props: ConnectionProperties,
) -> Result<Connection, TlsFailure> {
    let config = params.load().map_err(TlsFailure::Setup)?;
    let uri = url.parse::<AMQPUri>().map_err(|e| TlsFailure::Setup(format!("broker URL: {e}")))?;
    let name = params.server_name_indication.clone().unwrap_or_else(|| uri.authority.host.clone());
    let runtime = lapin::runtime::default_runtime().map_err(TlsFailure::Lapin)?;
    let open = async move |uri: AMQPUri, rt: _| -> lapin::Result<_> {
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port)).await?.collect();
        let stream = AsyncTcpStream::connect(&rt, addrs).await?;
        Ok(stream.into_tls(&name, config.as_ref()).await?)
    };
    Connection::connector(uri, runtime, open, props).await.map_err(TlsFailure::Lapin)
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
