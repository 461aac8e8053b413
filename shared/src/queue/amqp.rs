//! `amqp://user:pass@host:port/vhost?queue=NAME` — RabbitMQ through lapin; `amqps://` for TLS
//! (see `tls.rs` for its parameters: `cacertfile`, `certfile`, `keyfile`, `server_name_indication`).
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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use metrics::counter;
use tokio::time::Instant;
use tracing::{info, warn};

use super::backoff::Backoff;
pub use super::backoff::BACKOFF_MAX;
use super::{Consumer, ConsumerOptions, DeadLetter, Queue, QueueError};
use crate::telemetry;
use connection::{connect, fault, on_temp_channel, patiently, Fault};
use consume::AmqpConsumer;
use headers::dead_reason;
use publish::{new_id, new_props, Outgoing, Publisher};
pub use tls::TlsParams;
use topology::{declare_retry, declare_topology};
pub use topology::{retry_bucket, Names};
pub use uri::{parse_uri, redact, uri_with_queue};

mod connection;
mod consume;
mod headers;
mod publish;
mod tls;
mod topology;
mod uri;

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
/// Longest wait for a TCP + AMQP handshake (lapin ignores the URI's `connection_timeout` on
/// the async path).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest queue name accepted: the longest derived name (`NAME.retry.600000`) must fit AMQP's
/// 255-byte short strings.
const MAX_NAME: usize = 200;
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
        match patiently(&self.inner.names.queue, || self.publisher()).await {
            Ok(p) => Ok(p),
            Err(Fault::Lost(m)) => {
                Err(QueueError::Broker(format!("RabbitMQ unreachable for {:.0} s: {m}", start.elapsed().as_secs_f64())))
            }
            Err(Fault::Fatal(e)) => Err(e),
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
        Ok(Box::new(AmqpConsumer::open(self.inner.clone(), opts).await?))
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
