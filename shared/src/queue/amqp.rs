//! `amqp://user:pass@host:port/vhost?queue=NAME` — RabbitMQ through lapin.
//!
//! # Topology
//! Declared idempotently by [`Queue::setup`], by every publisher connection and by every consumer
//! connection (so a broker that lost its state, or a queue deleted by hand, comes back):
//! - `NAME`: durable classic queue, `x-dead-letter-exchange = NAME.dlx`.
//! - `NAME.dlx`: durable fanout exchange, bound to
//! - `NAME.dead`: durable queue of messages that failed for good or too often.
//! - `NAME.retry.<ms>`: one durable queue per retry delay bucket ([`RETRY_BUCKETS_MS`]), declared
//!   on first use, with `x-message-ttl = <ms>` and dead-lettering back to `NAME` through the
//!   default exchange. One queue per delay because per-message expiry only fires at a queue's
//!   head: a long delay would hold up every shorter one behind it.
//!
//! Declaring against an existing object with other arguments fails with
//! [`QueueError::Conflict`] quoting the broker's `PRECONDITION_FAILED` text, which names the
//! argument, what cropfleet asked for ("received") and what the queue has ("current").
//!
//! # Messages
//! Persistent (`delivery_mode = 2`), published with `mandatory = true` on a channel in confirm
//! mode, each with a fresh UUIDv7 `message_id` (it becomes [`Delivery::id`]). A publish succeeds
//! only on a broker ack that did not come with a `basic.return`: an unroutable message (`312
//! NO_ROUTE`) or a nack is an error. [`Queue::publish_many`] pipelines up to [`PUBLISH_WINDOW`]
//! messages, then waits for their confirms, and counts only the confirmed prefix.
//!
//! # Attempts
//! The attempt number travels in the header [`ATTEMPT_HEADER`] (absent = 1).
//! - `retry(delay)` publishes a copy with attempt + 1 to the retry bucket for `delay` (rounded
//!   *up* to the next bucket, so a retry never comes early; delays past the largest bucket use
//!   the largest), waits for the confirm, then acks the original.
//! - A delivery with `redelivered = true` had an earlier delivery that was never settled (its
//!   worker died, stalled, or lost the connection). The consumer counts that as an attempt and
//!   makes the count durable before handing anything out: it republishes a copy to `NAME` with
//!   attempt + 1 and acks the original (the copy goes to the back of the queue). If the stamped
//!   attempt had already reached `max_attempts`, it dead-letters the message instead, with a
//!   reason. The `redelivered` flag is a yes/no, so without this re-stamping a message whose
//!   worker keeps dying would never reach `max_attempts`. Classic queues are used, not quorum
//!   queues: their `x-delivery-count` would also count releases and is not available on the
//!   retry hop.
//! - `release()` hands a message back without counting an attempt: a copy with the *same*
//!   attempt goes to `NAME`, then the original is acked. (A plain `nack(requeue)` would come back
//!   `redelivered` and be counted.) [`Consumer::stop`] does the same for messages the broker
//!   had already pushed to this consumer but that were never handed out.
//!
//! A broker restart or dropped connection also requeues unacked messages as `redelivered`, so it
//! counts one attempt for each message held at that moment: the consumer cannot tell a dying
//! worker from a dying connection.
//!
//! # Dead letters and their reasons
//! `reject` cannot add a header, so `dead_letter(reason)` publishes a copy to the `NAME.dlx`
//! exchange with [`REASON_HEADER`] = reason, waits for the confirm, then acks the original. The
//! queue's own `x-dead-letter-exchange` still catches whatever else the broker dead-letters
//! (a `reject` by another client, TTL, length limits); [`Queue::dead_letters`] reports those
//! with a reason built from `x-death`. If the copy cannot be confirmed for another reason than a
//! lost connection, the topology is declared again and the copy retried once; if that fails too
//! the original is requeued (`nack`) and the error returned, so nothing is dropped.
//!
//! # Connection loss
//! The consumer watches its stream; when the connection dies it reconnects with exponential
//! backoff (100 ms doubling to [`BACKOFF_MAX`], with jitter), declares the topology, sets
//! `basic_qos(prefetch)` and consumes again, counting [`crate::telemetry::RECONNECTS`]. While the
//! broker is unreachable [`Consumer::next`] returns [`QueueError::Broker`] after `wait` (so the
//! worker shows not-ready), and recovers by itself. Deliveries received on a dead channel cannot
//! be settled any more; the broker redelivers them, so settling one logs a warning and returns
//! `Ok`. Publishers reconnect too: a publish keeps trying for [`PUBLISH_RECONNECT_BUDGET`] of
//! broker outage, then fails; `publish_many` resumes after a reconnect from the first message
//! not yet confirmed (those in flight at the drop may be stored twice: delivery is at least once).
//!
//! Nothing here blocks the runtime: lapin's I/O runs on tokio, and every wait is async.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use metrics::counter;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Acker, Consumer, ConsumerOptions, DeadLetter, Delivery, Queue, QueueError};
use crate::telemetry;

/// Header carrying the attempt number of a message (integer; absent means 1).
pub const ATTEMPT_HEADER: &str = "x-cropfleet-attempt";
/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-cropfleet-reason";
/// Header carrying the error that caused the last retry (informational).
pub const LAST_ERROR_HEADER: &str = "x-cropfleet-last-error";
/// Retry delay buckets, in milliseconds: one queue `NAME.retry.<ms>` each, created on first use.
/// A requested delay is rounded up to the next bucket (the worker's default backoff, 500 ms
/// doubling to 60 s, maps onto them almost exactly).
pub const RETRY_BUCKETS_MS: &[u64] =
    &[100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 120_000, 300_000, 600_000];
/// Most messages published before waiting for their confirms.
pub const PUBLISH_WINDOW: usize = 512;
/// How long a publish keeps reconnecting through a broker outage before it fails.
pub const PUBLISH_RECONNECT_BUDGET: Duration = Duration::from_secs(30);
/// Longest pause between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest wait for a TCP + AMQP handshake (lapin ignores the URI's `connection_timeout` on
/// the async path).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest queue name accepted: the longest derived name (`NAME.retry.600000`) must fit AMQP's
/// 255-byte short strings.
const MAX_NAME: usize = 200;
/// Reasons and errors stored in headers are cut to this many bytes.
const MAX_HEADER_TEXT: usize = 4000;

/// The names of everything one cropfleet queue uses on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The work queue, `NAME`.
    pub queue: String,
    /// The dead-letter exchange, `NAME.dlx` (fanout).
    pub dlx: String,
    /// The dead-letter queue, `NAME.dead`.
    pub dead: String,
}

impl Names {
    /// Names derived from the work queue's name.
    pub fn new(queue: &str) -> Names {
        Names { queue: queue.to_string(), dlx: format!("{queue}.dlx"), dead: format!("{queue}.dead") }
    }

    /// The retry queue of one delay bucket: `NAME.retry.<ms>`.
    pub fn retry(&self, bucket_ms: u64) -> String {
        format!("{}.retry.{bucket_ms}", self.queue)
    }
}

/// The retry bucket for `delay`: the smallest bucket at least as long, or the largest one;
/// `None` for a zero delay (republished straight to `NAME`).
pub fn retry_bucket(delay: Duration) -> Option<u64> {
    let ms = delay.as_millis();
    if ms == 0 {
        return None;
    }
    let last = *RETRY_BUCKETS_MS.last().expect("buckets");
    Some(RETRY_BUCKETS_MS.iter().copied().find(|&b| u128::from(b) >= ms).unwrap_or(last))
}

/// Split an `amqp://…?queue=NAME&…` URI into the broker URL handed to lapin (without `queue`,
/// other query parameters such as `heartbeat` kept) and the queue name.
pub fn parse_uri(uri: &str) -> Result<(String, String), QueueError> {
    let bad = |reason: String| QueueError::InvalidUri { uri: redact(uri), reason };
    if uri.starts_with("amqps://") {
        return Err(bad("amqps:// (TLS) is not built in: lapin's TLS features pull in a C crypto build; \
             use amqp:// (e.g. over a TLS-terminating sidecar) or enable lapin's `rustls` feature"
            .into()));
    }
    if !uri.starts_with("amqp://") {
        return Err(bad("expected amqp://user:pass@host:port/vhost?queue=NAME".into()));
    }
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut queue: Option<String> = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("queue", v)) => {
                if queue.is_some() {
                    return Err(bad("`queue` is given twice".into()));
                }
                queue = Some(percent_decode(v).map_err(|e| bad(format!("queue name: {e}")))?);
            }
            _ => rest.push(pair),
        }
    }
    let example = "add ?queue=NAME, e.g. amqp://guest:guest@127.0.0.1:5672/%2f?queue=crops";
    let queue = match queue {
        None => return Err(bad(format!("missing the queue name: {example}"))),
        Some(q) if q.is_empty() => return Err(bad(format!("empty queue name: {example}"))),
        Some(q) => q,
    };
    if queue.len() > MAX_NAME {
        return Err(bad(format!("queue name longer than {MAX_NAME} bytes")));
    }
    if queue.starts_with("amq.") {
        return Err(bad("queue names starting with `amq.` are reserved by RabbitMQ".into()));
    }
    if queue.chars().any(char::is_control) {
        return Err(bad("queue name contains control characters".into()));
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    url.parse::<lapin::uri::AMQPUri>().map_err(|e| bad(format!("broker URL: {e}")))?;
    Ok((url, queue))
}

/// The same broker URI with another queue name (other parameters kept): how a tool derives
/// related queues, e.g. `…?queue=crops` → `…?queue=crops.p2t4`.
pub fn uri_with_queue(uri: &str, queue: &str) -> Result<String, QueueError> {
    let (url, _) = parse_uri(uri)?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let encoded: String = queue
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let out = format!("{url}{sep}queue={encoded}");
    parse_uri(&out)?;
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after %-decoding".to_string())
}

/// The URI with its password replaced by `***`, for logs and errors.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => uri.to_string(),
        },
        None => uri.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why an operation failed: the connection went away (retry after reconnecting) or something
/// that a reconnect will not fix.
#[derive(Debug)]
enum Fault {
    Lost(String),
    Fatal(QueueError),
}

impl Fault {
    fn into_error(self) -> QueueError {
        match self {
            Fault::Lost(m) => QueueError::Broker(m),
            Fault::Fatal(e) => e,
        }
    }
}

/// True when the error means the connection (not just one channel) is gone.
fn connection_lost(e: &lapin::Error) -> bool {
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
fn fault(what: &str, e: &lapin::Error, conn: Option<&Connection>) -> Fault {
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
fn explain(what: &str, e: &lapin::Error) -> QueueError {
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

// ---------------------------------------------------------------------------------------------
// Connections and topology

fn str_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

/// Connect with a timeout. Refused/reset/timeouts are `Lost` (retry); credentials and vhost
/// problems are `Fatal`.
async fn connect(url: &str, name: &str) -> Result<Connection, Fault> {
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
async fn on_temp_channel<T, F, Fut>(conn: &Connection, f: F) -> Result<T, Fault>
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

/// Declare `NAME`, `NAME.dlx` and `NAME.dead`, idempotently.
async fn declare_topology(conn: &Connection, n: &Names) -> Result<(), Fault> {
    on_temp_channel(conn, |ch| async move {
        let cn = Some(conn);
        ch.exchange_declare(n.dlx.as_str().into(), ExchangeKind::Fanout, durable_exchange(), FieldTable::default())
            .await
            .map_err(|e| fault(&format!("exchange '{}'", n.dlx), &e, cn))?;
        ch.queue_declare(n.dead.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(|e| fault(&format!("queue '{}'", n.dead), &e, cn))?;
        ch.queue_bind(
            n.dead.as_str().into(),
            n.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fault(&format!("binding '{}' to '{}'", n.dead, n.dlx), &e, cn))?;
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), str_arg(&n.dlx));
        ch.queue_declare(n.queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| fault(&format!("queue '{}'", n.queue), &e, cn))?;
        Ok(())
    })
    .await
}

/// Declare the retry queue of one bucket.
async fn declare_retry(conn: &Connection, n: &Names, bucket_ms: u64) -> Result<(), Fault> {
    let name = n.retry(bucket_ms);
    on_temp_channel(conn, |ch| async move {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(bucket_ms as i32));
        args.insert("x-dead-letter-exchange".into(), str_arg(""));
        args.insert("x-dead-letter-routing-key".into(), str_arg(&n.queue));
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| fault(&format!("queue '{name}'"), &e, Some(conn)))?;
        Ok(())
    })
    .await
}

/// Exponential backoff with jitter: 100 ms doubling to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        d.mul_f64(rand::random_range(0.8..1.2))
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing

/// One message to publish.
struct Outgoing<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    payload: &'a [u8],
    props: BasicProperties,
    id: String,
}

/// Persistent properties with a message id and optional headers.
fn new_props(id: &str, headers: Option<FieldTable>) -> BasicProperties {
    let p = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
    match headers {
        Some(h) => p.with_headers(h),
        None => p,
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A confirm-mode channel on one connection; publishes on it are serialized, so every
/// `basic.return` in a batch belongs to that batch.
struct Publisher {
    conn: Arc<Connection>,
    ch: tokio::sync::Mutex<Option<Channel>>,
}

impl Publisher {
    fn new(conn: Arc<Connection>) -> Publisher {
        Publisher { conn, ch: tokio::sync::Mutex::new(None) }
    }

    fn alive(&self) -> bool {
        self.conn.status().connected()
    }

    /// Publish `msgs` pipelined, then wait for every confirm. Returns how many, from the start,
    /// were confirmed (acked and not returned), and the first failure.
    async fn send(&self, msgs: &[Outgoing<'_>]) -> (usize, Option<Fault>) {
        let mut slot = self.ch.lock().await;
        let ch = match slot.as_ref() {
            Some(c) if c.status().connected() => c.clone(),
            _ => {
                let conn = Some(&*self.conn);
                let c = match self.conn.create_channel().await {
                    Ok(c) => c,
                    Err(e) => return (0, Some(fault("opening a publish channel", &e, conn))),
                };
                if let Err(e) = c.confirm_select(ConfirmSelectOptions::default()).await {
                    return (0, Some(fault("enabling publisher confirms", &e, conn)));
                }
                *slot = Some(c.clone());
                c
            }
        };
        let opts = BasicPublishOptions { mandatory: true, immediate: false };
        let mut pending = Vec::with_capacity(msgs.len());
        let mut send_err = None;
        for m in msgs {
            match ch.basic_publish(m.exchange.into(), m.routing_key.into(), opts, m.payload, m.props.clone()).await {
                Ok(c) => pending.push(c),
                Err(e) => {
                    send_err = Some(e);
                    break;
                }
            }
        }
        let mut results = Vec::with_capacity(pending.len());
        for c in pending {
            results.push(c.await);
        }
        // lapin pairs each basic.return with whichever confirm completes next, which under
        // `multiple` acks need not be its own message: match returns by message id instead.
        let mut returned: BTreeMap<String, (u16, String)> = BTreeMap::new();
        let mut stray = HashSet::new();
        for (i, r) in results.iter().enumerate() {
            if let Ok(Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret))) = r {
                let info = (ret.reply_code, ret.reply_text.to_string());
                match ret.delivery.properties.message_id() {
                    Some(id) if msgs.iter().any(|m| m.id == id.as_str()) => {
                        returned.insert(id.to_string(), info);
                    }
                    _ => {
                        stray.insert(i);
                    }
                }
            }
        }
        for (i, r) in results.iter().enumerate() {
            let m = &msgs[i];
            let target = || {
                if m.exchange.is_empty() {
                    format!("queue '{}'", m.routing_key)
                } else {
                    format!("exchange '{}' (routing key '{}')", m.exchange, m.routing_key)
                }
            };
            let failure = match r {
                Ok(Confirmation::Ack(_)) | Ok(Confirmation::Nack(_)) if returned.contains_key(&m.id) => {
                    let (code, text) = &returned[&m.id];
                    Some(Fault::Fatal(QueueError::Broker(format!(
                        "message {} to {} was returned by the broker as unroutable ({code} {text}): no queue \
                         received it; run `cropfleet-producer setup` or check the queue name",
                        m.id,
                        target()
                    ))))
                }
                Ok(Confirmation::Ack(_)) if stray.contains(&i) => Some(Fault::Fatal(QueueError::Broker(format!(
                    "a message to {} was returned by the broker as unroutable",
                    target()
                )))),
                Ok(Confirmation::Ack(_)) => None,
                Ok(Confirmation::Nack(_)) => Some(Fault::Fatal(QueueError::Broker(format!(
                    "message {} to {} was refused (nacked) by the broker; it may be out of resources or the \
                     queue full",
                    m.id,
                    target()
                )))),
                Ok(Confirmation::NotRequested) => {
                    Some(Fault::Fatal(QueueError::Broker("publisher confirms are not enabled on the channel".into())))
                }
                Err(e) => Some(fault(&format!("publishing to {}", target()), e, Some(&self.conn))),
            };
            if let Some(f) = failure {
                return (i, Some(f));
            }
        }
        match send_err {
            Some(e) => (results.len(), Some(fault("publishing", &e, Some(&self.conn)))),
            None => (msgs.len(), None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The queue

/// What every connection of one queue shares.
struct Inner {
    url: String,
    names: Names,
    /// Retry buckets declared by this process (forgotten when a retry copy comes back unroutable).
    retry_declared: Mutex<HashSet<u64>>,
}

impl Inner {
    fn conn_name(&self, role: &str) -> String {
        format!("cropfleet {role} {} pid {}", self.names.queue, std::process::id())
    }

    fn bucket_known(&self, b: u64) -> bool {
        self.retry_declared.lock().unwrap_or_else(|e| e.into_inner()).contains(&b)
    }

    fn set_bucket(&self, b: u64, known: bool) {
        let mut set = self.retry_declared.lock().unwrap_or_else(|e| e.into_inner());
        if known {
            set.insert(b);
        } else {
            set.remove(&b);
        }
    }

    /// (exchange, routing key) of a copy's destination.
    fn route(&self, t: Target) -> (String, String) {
        match t {
            Target::Main => (String::new(), self.names.queue.clone()),
            Target::Retry(b) => (String::new(), self.names.retry(b)),
            Target::Dead => (self.names.dlx.clone(), self.names.queue.clone()),
        }
    }

    /// Make sure a copy's destination exists: always for `force`, else only unknown buckets.
    async fn prepare(&self, conn: &Connection, t: Target, force: bool) -> Result<(), Fault> {
        match t {
            Target::Retry(b) if force || !self.bucket_known(b) => {
                declare_retry(conn, &self.names, b).await?;
                self.set_bucket(b, true);
                Ok(())
            }
            Target::Main | Target::Dead if force => declare_topology(conn, &self.names).await,
            _ => Ok(()),
        }
    }
}

/// Where a copy of a delivery goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Main,
    Retry(u64),
    Dead,
}

/// A RabbitMQ queue (see the module docs for topology and semantics).
pub struct Amqp {
    inner: Arc<Inner>,
    /// The publishing connection, opened on first use and replaced after it drops (a dead one
    /// stays here until then, which is how a reconnect is told from a first connect).
    link: tokio::sync::Mutex<Option<Arc<Publisher>>>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp").field("url", &redact(&self.inner.url)).field("queue", &self.inner.names.queue).finish()
    }
}

impl Amqp {
    /// A queue named `queue` on the broker at `url` (an `amqp://` URL without `queue=`).
    /// Nothing connects until the first operation.
    pub fn new(url: impl Into<String>, queue: &str) -> Amqp {
        let inner = Inner { url: url.into(), names: Names::new(queue), retry_declared: Mutex::default() };
        Amqp { inner: Arc::new(inner), link: tokio::sync::Mutex::new(None) }
    }

    /// Parse `amqp://…?queue=NAME` (see [`parse_uri`]).
    pub fn from_uri(uri: &str) -> Result<Amqp, QueueError> {
        let (url, queue) = parse_uri(uri)?;
        Ok(Amqp::new(url, &queue))
    }

    /// The names of the queue, its dead-letter exchange and queue.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The publishing connection, (re)connecting and declaring the topology when needed.
    async fn publisher(&self) -> Result<Arc<Publisher>, Fault> {
        let mut link = self.link.lock().await;
        if let Some(p) = link.as_ref() {
            if p.alive() {
                return Ok(p.clone());
            }
        }
        let conn = connect(&self.inner.url, &self.inner.conn_name("publisher")).await?;
        declare_topology(&conn, &self.inner.names).await?;
        if link.is_some() {
            counter!(telemetry::RECONNECTS).increment(1);
            info!(queue = %self.inner.names.queue, "publisher reconnected to RabbitMQ");
        }
        let p = Arc::new(Publisher::new(Arc::new(conn)));
        *link = Some(p.clone());
        Ok(p)
    }

    /// [`Self::publisher`], retrying through an outage of up to [`PUBLISH_RECONNECT_BUDGET`].
    async fn publisher_patiently(&self) -> Result<Arc<Publisher>, QueueError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            match self.publisher().await {
                Ok(p) => return Ok(p),
                Err(Fault::Lost(m)) if start.elapsed() < PUBLISH_RECONNECT_BUDGET => {
                    let d = backoff.step();
                    warn!(queue = %self.inner.names.queue, error = %m, retry_in_ms = d.as_millis() as u64, "RabbitMQ unreachable; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(Fault::Lost(m)) => {
                    return Err(QueueError::Broker(format!(
                        "RabbitMQ unreachable for {:.0} s: {m}",
                        start.elapsed().as_secs_f64()
                    )))
                }
                Err(Fault::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Publish payloads to `NAME`, resuming after reconnects, within the outage budget.
    async fn publish_payloads(&self, payloads: &[&[u8]]) -> (usize, Option<QueueError>) {
        let ids: Vec<String> = payloads.iter().map(|_| new_id()).collect();
        let queue = self.inner.names.queue.as_str();
        let mut done = 0;
        let mut backoff = Backoff::new();
        let mut outage: Option<Instant> = None;
        while done < payloads.len() {
            let step = match self.publisher().await {
                Ok(p) => {
                    let end = (done + PUBLISH_WINDOW).min(payloads.len());
                    let msgs: Vec<Outgoing> = (done..end)
                        .map(|i| Outgoing {
                            exchange: "",
                            routing_key: queue,
                            payload: payloads[i],
                            props: new_props(&ids[i], None),
                            id: ids[i].clone(),
                        })
                        .collect();
                    let (n, f) = p.send(&msgs).await;
                    done += n;
                    if n > 0 {
                        outage = None;
                        backoff.reset();
                    }
                    f
                }
                Err(f) => Some(f),
            };
            match step {
                None => {}
                Some(Fault::Fatal(e)) => return (done, Some(e)),
                Some(Fault::Lost(m)) => {
                    let since = *outage.get_or_insert_with(Instant::now);
                    if since.elapsed() >= PUBLISH_RECONNECT_BUDGET {
                        let e = QueueError::Broker(format!(
                            "RabbitMQ unreachable for {:.0} s while publishing: {m}",
                            since.elapsed().as_secs_f64()
                        ));
                        return (done, Some(e));
                    }
                    let d = backoff.step();
                    warn!(queue, error = %m, confirmed = done, retry_in_ms = d.as_millis() as u64, "publish interrupted; reconnecting");
                    tokio::time::sleep(d).await;
                }
            }
        }
        (done, None)
    }

    /// Delete everything this queue uses on the broker: `NAME`, `NAME.dead`, every
    /// `NAME.retry.<ms>` and the `NAME.dlx` exchange, with their messages. For tests, sweeps and
    /// tear-down scripts.
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let conn = connect(&self.inner.url, &self.inner.conn_name("admin")).await.map_err(Fault::into_error)?;
        let n = &self.inner.names;
        let mut queues = vec![n.queue.clone(), n.dead.clone()];
        queues.extend(RETRY_BUCKETS_MS.iter().map(|&b| n.retry(b)));
        let r = on_temp_channel(&conn, |ch| async move {
            for q in &queues {
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| fault(&format!("deleting queue '{q}'"), &e, None))?;
            }
            ch.exchange_delete(n.dlx.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| fault(&format!("deleting exchange '{}'", n.dlx), &e, None))?;
            Ok(())
        })
        .await;
        self.inner.retry_declared.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = conn.close(200, "ok".into()).await;
        r.map_err(Fault::into_error)
    }

    /// Open a consumer session: connect, declare, qos, consume.
    async fn open_session(inner: &Arc<Inner>, prefetch: u16) -> Result<Session, Fault> {
        let conn = Arc::new(connect(&inner.url, &inner.conn_name("consumer")).await?);
        declare_topology(&conn, &inner.names).await?;
        let c = Some(&*conn);
        let ch = conn.create_channel().await.map_err(|e| fault("opening the consume channel", &e, c))?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| fault("basic.qos", &e, c))?;
        let stream = ch
            .basic_consume(
                inner.names.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| fault(&format!("consuming from '{}'", inner.names.queue), &e, c))?;
        let out = Arc::new(Publisher::new(conn.clone()));
        Ok(Session { ch, stream, out })
    }
}

#[async_trait]
impl Queue for Amqp {
    async fn setup(&self) -> Result<(), QueueError> {
        self.publisher_patiently().await.map(|_| ())
    }

    async fn publish(&self, payload: &[u8]) -> Result<(), QueueError> {
        match self.publish_payloads(&[payload]).await {
            (_, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    async fn publish_many(&self, payloads: &[Vec<u8>]) -> (usize, Option<QueueError>) {
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        self.publish_payloads(&slices).await
    }

    async fn consumer(&self, opts: ConsumerOptions) -> Result<Box<dyn Consumer>, QueueError> {
        let prefetch = opts.prefetch.clamp(1, u16::MAX as usize) as u16;
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let session = loop {
            match Amqp::open_session(&self.inner, prefetch).await {
                Ok(s) => break s,
                Err(Fault::Lost(m)) if start.elapsed() < PUBLISH_RECONNECT_BUDGET => {
                    let d = backoff.step();
                    warn!(queue = %self.inner.names.queue, error = %m, retry_in_ms = d.as_millis() as u64, "RabbitMQ unreachable; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(f) => return Err(f.into_error()),
            }
        };
        info!(queue = %self.inner.names.queue, prefetch, "consuming from RabbitMQ");
        Ok(Box::new(AmqpConsumer {
            inner: self.inner.clone(),
            opts,
            prefetch,
            session: Some(session),
            backoff: Backoff::new(),
            retry_at: None,
            lost_since: None,
            last_error: String::new(),
            stopped: false,
        }))
    }

    async fn depth(&self) -> Result<Option<u64>, QueueError> {
        let p = self.publisher_patiently().await?;
        let q = self.inner.names.queue.clone();
        let n = on_temp_channel(&p.conn, |ch| async move {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map(|d| d.message_count())
            .map_err(|e| fault(&format!("queue '{q}'"), &e, None))
        })
        .await
        .map_err(Fault::into_error)?;
        Ok(Some(u64::from(n)))
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let p = self.publisher_patiently().await?;
        let dead = self.inner.names.dead.clone();
        on_temp_channel(&p.conn, |ch| async move {
            let mut out = Vec::new();
            let mut last = None;
            while out.len() < max {
                let got = ch
                    .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| fault(&format!("reading queue '{dead}'"), &e, None))?;
                let Some(m) = got else { break };
                let d = m.delivery;
                last = Some(d.delivery_tag);
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| format!("dead-{}", d.delivery_tag));
                out.push(DeadLetter { id, reason: dead_reason(&d.properties), payload: d.data });
            }
            // Put them all back where they were; closing the channel would too.
            if let Some(tag) = last {
                ch.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true })
                    .await
                    .map_err(|e| fault(&format!("returning messages to '{dead}'"), &e, None))?;
            }
            Ok(out)
        })
        .await
        .map_err(Fault::into_error)
    }

    fn backend(&self) -> &'static str {
        "rabbitmq"
    }
}

// ---------------------------------------------------------------------------------------------
// Headers

fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

fn value_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The attempt header as a number (any integer type, or a numeric string).
fn header_attempt(props: &BasicProperties) -> Option<u32> {
    let n: i64 = match header(props, ATTEMPT_HEADER)? {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        other => value_string(other)?.trim().parse().ok()?,
    };
    u32::try_from(n).ok().filter(|&n| n >= 1)
}

/// Why a message is in `NAME.dead`: our header, else what the broker's `x-death` says.
fn dead_reason(props: &BasicProperties) -> String {
    if let Some(r) = header(props, REASON_HEADER).and_then(value_string) {
        return r;
    }
    let first = |k: &str| header(props, k).and_then(value_string);
    match (first("x-first-death-reason"), first("x-first-death-queue")) {
        (Some(reason), queue) => {
            let queue = queue.map(|q| format!(" from queue '{q}'")).unwrap_or_default();
            let what = match reason.as_str() {
                "rejected" => "rejected by a consumer without requeue",
                "expired" => "its TTL expired",
                "maxlen" => "the queue's length limit was reached",
                "delivery_limit" => "the delivery limit was reached",
                other => other,
            };
            format!("dead-lettered by the broker{queue}: {what}")
        }
        (None, _) => "no reason recorded".into(),
    }
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_HEADER_TEXT {
        return s.to_string();
    }
    let mut end = MAX_HEADER_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Headers for a copy: the original's minus the broker's death bookkeeping, with `attempt` and
/// the given extras.
fn copy_headers(props: &BasicProperties, attempt: u32, extra: &[(&str, &str)]) -> FieldTable {
    let mut h: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .filter(|(k, _)| {
                    let k = k.as_str();
                    k != "x-death" && !k.starts_with("x-first-death-") && !k.starts_with("x-last-death-")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(attempt.min(i32::MAX as u32) as i32));
    for (k, v) in extra {
        h.insert((*k).into(), str_arg(&cut(v)));
    }
    FieldTable::from(h)
}

/// Properties for a copy of a delivery: persistent, same message id and content metadata,
/// no expiration or user id.
fn copy_props(props: &BasicProperties, id: &str, headers: FieldTable) -> BasicProperties {
    let mut p = new_props(id, Some(headers));
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Consuming

/// One consumer connection: its consume channel and stream, and a confirm channel for copies.
struct Session {
    ch: Channel,
    stream: lapin::Consumer,
    out: Arc<Publisher>,
}

struct AmqpConsumer {
    inner: Arc<Inner>,
    opts: ConsumerOptions,
    prefetch: u16,
    session: Option<Session>,
    backoff: Backoff,
    /// While disconnected: the earliest next reconnect attempt.
    retry_at: Option<Instant>,
    /// While disconnected: since when.
    lost_since: Option<Instant>,
    last_error: String,
    stopped: bool,
}

impl AmqpConsumer {
    fn lose(&mut self, why: String) {
        warn!(queue = %self.inner.names.queue, error = %why, "lost the RabbitMQ connection; reconnecting");
        self.session = None;
        self.lost_since.get_or_insert_with(Instant::now);
        self.retry_at = Some(Instant::now());
        self.backoff.reset();
        self.last_error = why;
    }

    fn down_error(&self) -> QueueError {
        let secs = self.lost_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
        QueueError::Broker(format!(
            "not connected to RabbitMQ for {secs:.1} s (reconnecting with backoff): {}",
            self.last_error
        ))
    }

    /// Turn a broker delivery into one for the worker, or settle it here (see "Attempts").
    async fn admit(&self, d: lapin::message::Delivery, out: &Arc<Publisher>) -> Option<Delivery> {
        if !d.acker.usable() {
            debug!(tag = d.delivery_tag, "skipping a delivery from a dead channel; it will be redelivered");
            return None;
        }
        let stamped = header_attempt(&d.properties).unwrap_or(1);
        let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_else(new_id);
        let redelivered = d.redelivered;
        let acker = Box::new(AmqpAcker {
            inner: self.inner.clone(),
            out: out.clone(),
            acker: d.acker,
            id: id.clone(),
            attempt: stamped,
            payload: d.data.clone(),
            props: d.properties,
        });
        if !redelivered {
            return Some(Delivery { id, payload: d.data, attempt: stamped, acker });
        }
        let max = self.opts.max_attempts.max(1);
        if stamped >= max {
            let reason = format!(
                "delivered {stamped} times without being settled (max attempts {max}): its worker died, stalled or \
                 lost the broker connection every time"
            );
            warn!(msg = %id, %reason, "dead-lettering a message that keeps coming back");
            match acker.copy(Target::Dead, stamped, &[(REASON_HEADER, &reason)]).await {
                Copied::Yes | Copied::Lost => None,
                Copied::Failed(e) => {
                    warn!(msg = %id, error = %e, "could not dead-letter; handing it out once more");
                    Some(Delivery { id, payload: d.data, attempt: stamped + 1, acker })
                }
            }
        } else {
            debug!(msg = %id, attempt = stamped + 1, "redelivered: recording the attempt before handing it out");
            match acker.copy(Target::Main, stamped + 1, &[]).await {
                Copied::Yes | Copied::Lost => None,
                Copied::Failed(e) => {
                    warn!(msg = %id, error = %e, "could not record the attempt; handing it out as is");
                    Some(Delivery { id, payload: d.data, attempt: stamped + 1, acker })
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            if self.stopped {
                tokio::time::sleep_until(deadline).await;
                return Ok(None);
            }
            if self.session.is_none() {
                if let Some(at) = self.retry_at {
                    if at >= deadline {
                        tokio::time::sleep_until(deadline).await;
                        return Err(self.down_error());
                    }
                    tokio::time::sleep_until(at).await;
                }
                match Amqp::open_session(&self.inner, self.prefetch).await {
                    Ok(s) => {
                        let down = self.lost_since.take().map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
                        counter!(telemetry::RECONNECTS).increment(1);
                        info!(queue = %self.inner.names.queue, down_s = down, "consumer reconnected to RabbitMQ");
                        self.session = Some(s);
                        self.retry_at = None;
                        self.backoff.reset();
                    }
                    Err(f) => {
                        self.retry_at = Some(Instant::now() + self.backoff.step());
                        match f {
                            Fault::Lost(m) => {
                                debug!(queue = %self.inner.names.queue, error = %m, "reconnect failed");
                                self.last_error = m;
                                if Instant::now() >= deadline {
                                    return Err(self.down_error());
                                }
                                continue;
                            }
                            Fault::Fatal(e) => {
                                self.last_error = e.to_string();
                                return Err(e);
                            }
                        }
                    }
                }
            }
            let s = self.session.as_mut().expect("connected above");
            let got = tokio::time::timeout_at(deadline, s.stream.next()).await;
            match got {
                Err(_) => return Ok(None),
                Ok(Some(Ok(d))) => {
                    let out = s.out.clone();
                    if let Some(d) = self.admit(d, &out).await {
                        return Ok(Some(d));
                    }
                }
                Ok(Some(Err(e))) => self.lose(e.to_string()),
                Ok(None) => self.lose("the consumer was cancelled (queue deleted?) or its channel closed".into()),
            }
        }
    }

    async fn stop(&mut self) {
        self.stopped = true;
        let Some(s) = self.session.as_mut() else { return };
        if let Err(e) = s.ch.basic_cancel(s.stream.tag(), BasicCancelOptions::default()).await {
            debug!(error = %e, "basic.cancel failed (connection gone?)");
            return;
        }
        // Messages the broker pushed before the cancel but nobody took: hand them back without
        // counting an attempt (plus one if they were themselves redeliveries).
        let mut returned = 0;
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), s.stream.next()).await {
            if !d.acker.usable() {
                continue;
            }
            let attempt = header_attempt(&d.properties).unwrap_or(1) + u32::from(d.redelivered);
            let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_else(new_id);
            let acker = AmqpAcker {
                inner: self.inner.clone(),
                out: s.out.clone(),
                acker: d.acker,
                id,
                attempt,
                payload: d.data,
                props: d.properties,
            };
            if let Err(e) = Box::new(acker).release().await {
                warn!(error = %e, "could not hand back a prefetched message; it will be redelivered");
            }
            returned += 1;
        }
        info!(queue = %self.inner.names.queue, returned, "stopped consuming");
    }
}

/// Outcome of publishing a copy of a delivery and acking the original.
enum Copied {
    /// Copy confirmed, original acked (or its ack lost, making a duplicate).
    Yes,
    /// The connection died first; the broker will redeliver the original.
    Lost,
    /// The copy could not be stored; the original is untouched.
    Failed(QueueError),
}

/// Settles one delivery; holds the consumer connection open until it is used.
struct AmqpAcker {
    inner: Arc<Inner>,
    out: Arc<Publisher>,
    acker: lapin::Acker,
    id: String,
    attempt: u32,
    payload: Vec<u8>,
    props: BasicProperties,
}

impl AmqpAcker {
    /// Ack the original; a dead channel means the broker redelivers it (logged, not an error).
    async fn ack_original(&self, after: &str) {
        match self.acker.ack(Default::default()).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(msg = %self.id, after, "could not ack: the channel is gone; the message will be redelivered")
            }
            Err(e) => warn!(msg = %self.id, after, error = %e, "ack failed; the message will be redelivered"),
        }
    }

    /// Requeue the original at once (after a failure that leaves it unsettled).
    async fn requeue_original(&self) {
        if let Err(e) = self.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await {
            warn!(msg = %self.id, error = %e, "nack failed; the message will be redelivered when the channel closes");
        }
    }

    /// Publish a copy to `target` with `attempt` and `extra` headers, wait for its confirm, then
    /// ack the original. On an unroutable/missing destination, declare it and try once more.
    async fn copy(&self, target: Target, attempt: u32, extra: &[(&str, &str)]) -> Copied {
        if !self.acker.usable() {
            warn!(msg = %self.id, "the delivery's channel is gone; the broker will redeliver it");
            return Copied::Lost;
        }
        let (exchange, routing_key) = self.inner.route(target);
        let props = copy_props(&self.props, &self.id, copy_headers(&self.props, attempt, extra));
        let msg = Outgoing {
            exchange: &exchange,
            routing_key: &routing_key,
            payload: &self.payload,
            props,
            id: self.id.clone(),
        };
        let mut last = None;
        for round in 0..2 {
            if let Err(f) = self.inner.prepare(&self.out.conn, target, round == 1).await {
                last = Some(f);
                break;
            }
            match self.out.send(std::slice::from_ref(&msg)).await {
                (1, _) => {
                    self.ack_original("copy confirmed").await;
                    return Copied::Yes;
                }
                (_, f) => {
                    if let Target::Retry(b) = target {
                        self.inner.set_bucket(b, false);
                    }
                    last = f;
                    if matches!(last, Some(Fault::Lost(_))) && !self.out.alive() {
                        break;
                    }
                }
            }
        }
        match last {
            Some(Fault::Lost(m)) if !self.out.alive() => {
                warn!(msg = %self.id, error = %m, "connection lost before the copy was confirmed; the broker will redeliver the message");
                Copied::Lost
            }
            Some(f) => Copied::Failed(f.into_error()),
            None => Copied::Failed(QueueError::Broker("copy failed".into())),
        }
    }

    /// Copy, and on failure requeue the original and report the error.
    async fn copy_or_requeue(&self, target: Target, attempt: u32, extra: &[(&str, &str)]) -> Result<(), QueueError> {
        match self.copy(target, attempt, extra).await {
            Copied::Yes | Copied::Lost => Ok(()),
            Copied::Failed(e) => {
                self.requeue_original().await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.ack_original("done").await;
        Ok(())
    }

    async fn retry(self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError> {
        let target = retry_bucket(delay).map_or(Target::Main, Target::Retry);
        self.copy_or_requeue(target, self.attempt + 1, &[(LAST_ERROR_HEADER, reason)]).await
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        self.copy_or_requeue(Target::Dead, self.attempt, &[(REASON_HEADER, reason)]).await
    }

    async fn release(self: Box<Self>) -> Result<(), QueueError> {
        self.copy_or_requeue(Target::Main, self.attempt, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_uris() {
        let (url, q) = parse_uri("amqp://guest:guest@127.0.0.1:5672/%2f?queue=crops").unwrap();
        assert_eq!((url.as_str(), q.as_str()), ("amqp://guest:guest@127.0.0.1:5672/%2f", "crops"));
        let (url, q) = parse_uri("amqp://u:p@h:5672/v?heartbeat=10&queue=a%2Eb&frame_max=8192").unwrap();
        assert_eq!((url.as_str(), q.as_str()), ("amqp://u:p@h:5672/v?heartbeat=10&frame_max=8192", "a.b"));
        let e = parse_uri("amqp://u:secret@h/%2f").unwrap_err().to_string();
        assert!(e.contains("missing the queue name") && !e.contains("secret"), "{e}");
        assert!(parse_uri("amqp://h/%2f?queue=").unwrap_err().to_string().contains("empty queue name"));
        assert!(parse_uri("amqp://h/%2f?queue=a&queue=b").is_err());
        assert!(parse_uri("amqp://h/%2f?queue=amq.x").unwrap_err().to_string().contains("reserved"));
        assert!(parse_uri(&format!("amqp://h/%2f?queue={}", "x".repeat(201))).is_err());
        assert!(parse_uri("amqps://h/%2f?queue=a").unwrap_err().to_string().contains("TLS"));
        assert!(parse_uri("amqp://h:notaport/%2f?queue=a").is_err());
        let u = uri_with_queue("amqp://u:p@h/%2f?queue=crops&heartbeat=5", "crops.p2t4 x").unwrap();
        assert_eq!(u, "amqp://u:p@h/%2f?heartbeat=5&queue=crops.p2t4%20x");
        assert_eq!(parse_uri(&u).unwrap().1, "crops.p2t4 x");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("amqp://u:pw@h:1/%2f?queue=q"), "amqp://u:***@h:1/%2f?queue=q");
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
    }

    #[test]
    fn delays_round_up_to_buckets() {
        assert_eq!(retry_bucket(Duration::ZERO), None);
        assert_eq!(retry_bucket(Duration::from_millis(1)), Some(100));
        assert_eq!(retry_bucket(Duration::from_millis(500)), Some(500));
        assert_eq!(retry_bucket(Duration::from_millis(501)), Some(1_000));
        assert_eq!(retry_bucket(Duration::from_secs(60)), Some(60_000));
        assert_eq!(retry_bucket(Duration::from_secs(86_400)), Some(600_000));
        assert_eq!(Names::new("q").retry(500), "q.retry.500");
    }

    #[test]
    fn attempt_header_and_copies() {
        let p = BasicProperties::default();
        assert_eq!(header_attempt(&p), None);
        let mut h = FieldTable::default();
        h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(3));
        h.insert("x-death".into(), AMQPValue::FieldArray(vec![].into()));
        h.insert("x-first-death-reason".into(), str_arg("expired"));
        h.insert("tenant".into(), str_arg("t1"));
        let p = BasicProperties::default().with_headers(h).with_content_type("application/json".into());
        assert_eq!(header_attempt(&p), Some(3));
        let c = copy_props(&p, "id1", copy_headers(&p, 4, &[(REASON_HEADER, "bad input")]));
        assert_eq!(header_attempt(&c), Some(4));
        assert_eq!(dead_reason(&c), "bad input");
        let keys: Vec<&str> = c.headers().as_ref().unwrap().inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, vec!["tenant", ATTEMPT_HEADER, REASON_HEADER]);
        assert_eq!(c.delivery_mode(), &Some(2));
        assert_eq!(c.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        assert!(dead_reason(&p).contains("TTL expired"), "{}", dead_reason(&p));
    }
}
