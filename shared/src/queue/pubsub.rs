//! `pubsub://PROJECT/NAME` — Google Cloud Pub/Sub through the official `google-cloud-pubsub` 1.x.
//!
//! # Resources
//! Created idempotently by [`Queue::setup`] (`cropfleet-producer setup --queue pubsub://P/NAME`);
//! nothing else creates them, so a missing one is a [`QueueError::Missing`] naming that command.
//! - topic `NAME`, where tasks (or result events) are published;
//! - subscription `NAME-workers` on it, the one every worker pulls from (shared, so messages are
//!   spread over the fleet), with an ack deadline, a retry policy (exponential backoff between
//!   `min_backoff` and `max_backoff` for nacked messages) and a dead-letter policy to
//! - topic `NAME-dead`, with its own subscription `NAME-dead-sub` so dead letters are kept and can
//!   be read ([`Queue::dead_letters`]). The dead-letter subscription is created before the policy
//!   that feeds it: a message published to a topic without subscriptions is dropped.
//!
//! Topic and subscription names follow the service's rules: `NAME` starts with a letter, has at
//! most 246 characters (the longest derived name, `NAME-dead-sub`, must fit 255) of
//! `[A-Za-z0-9-_.~+%]`, and does not start with `goog`.
//! On real Google Cloud the dead-letter policy also needs IAM grants for the project's Pub/Sub
//! service agent (`service-PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com`): Publisher on
//! `NAME-dead` and Subscriber on `NAME-workers`. `setup` does not grant them; the emulator ignores
//! IAM.
//!
//! # Options (URI query parameters, all optional)
//! `pubsub://PROJECT/NAME?batch_messages=100&batch_bytes=1000000&batch_delay_ms=10&ack_deadline=10&max_attempts=5&min_backoff=1&max_backoff=60&max_lease=3600&publish_timeout=60`,
//! parsed into [`PubSubOptions`] (see its fields for units, ranges and defaults). The three
//! `batch_*` settings are the publisher's batching thresholds: a batch goes out as soon as any one
//! is reached.
//!
//! # Publishing
//! Each publish is awaited until the service returns its message id. [`Queue::publish_many`]
//! queues up to [`PUBLISH_WINDOW`] messages at once (the client has no flow control of its own),
//! then awaits their ids in order and counts the confirmed prefix; messages after the first
//! failure may still have been stored (delivery is at least once). The ids are logged (one `info`
//! line per call with the first and last id, every id at `debug`), which is how the producer
//! reports them; [`PubSub::publish_many_with_ids`] returns them to code that wants them.
//!
//! # Consuming
//! One StreamingPull stream per consumer, read by a background task that hands messages over
//! through a channel of one, so [`Consumer::next`] always returns within its `wait`, even when the
//! endpoint is dead (the client library retries opening a stream forever and would otherwise hang).
//! - Flow control: `max outstanding messages` = [`ConsumerOptions::prefetch`]. The service then
//!   leases at most that many messages to the stream. The emulator does **not** enforce it; there
//!   the bound holds on the worker side only (it takes a message only when it has a free slot),
//!   and the client may hold and lease-extend more messages than that in its buffer.
//! - Leases are extended automatically by the client (every few seconds, by `ack_deadline`) for as
//!   long as a message is held, up to `max_lease`; long tasks are safe.
//! - Attempts: [`Delivery::attempt`] is the service's `delivery_attempt` (1 on first delivery),
//!   which is filled because the subscription has a dead-letter policy. Every delivery counts,
//!   including those after a [`Acker::release`] or a worker that died.
//! - `ack` acks (after the work is stored: the worker calls it last). The client sends acks in the
//!   background within about 100 ms; dropping the consumer waits for them (see Shutdown).
//! - `retry(delay, reason)` nacks. Pub/Sub redelivers after the **subscription's retry policy**
//!   (exponential, per message, from `min_backoff` to `max_backoff`), not after `delay`: a nack
//!   cannot carry a delay, and the client has no modify-ack-deadline call of its own. The defaults
//!   (1 s to 60 s) follow the worker's `--retry-base-ms` and its 60 s cap.
//! - `dead_letter(reason)` publishes a copy (data and attributes) to `NAME-dead` with the
//!   attributes [`REASON_ATTR`] = reason, [`ATTEMPT_ATTR`] and [`SOURCE_ID_ATTR`], waits for its
//!   message id, then acks the original. If the copy cannot be stored, the original is nacked and
//!   the error returned, so nothing is dropped.
//! - Max attempts: the subscription's dead-letter policy forwards a message to `NAME-dead` after
//!   `max delivery attempts`, which the service allows only in 5..=100. `setup` sets it from the
//!   URI's `max_attempts` (default 5); [`Queue::consumer`] sets it to the worker's
//!   `--max-attempts`, clamped to 5..=100, when it differs (the workers' flag wins while they
//!   run; without `pubsub.subscriptions.update` permission it logs a warning and goes on). The
//!   worker dead-letters transient failures itself at its own `--max-attempts` (with the reason);
//!   the policy catches messages whose worker dies every time, and values below 5. Those copies
//!   are made by the service, without [`REASON_ATTR`]; [`Queue::dead_letters`] builds a reason
//!   from the service's `CloudPubSubDeadLetterSourceDeliveryCount` attribute.
//! - `release()` nacks: Pub/Sub has no way to hand a message back without counting a delivery.
//!
//! # Shutdown
//! Streams use [`ShutdownBehavior::WaitForProcessing`]. [`Consumer::stop`] (SIGTERM) stops
//! pulling and nacks the messages that were received but not handed out yet, so other workers get
//! them at once; messages already handed out keep their leases extended and can still be acked or
//! nacked while the worker drains. Dropping the consumer then waits (up to [`FLUSH_TIMEOUT`]) for
//! the client to send the last acks and nacks. With `NackImmediately` instead, acks of tasks that
//! finish during the drain would be ignored and their messages redelivered (work done twice);
//! without waiting on drop, the last acks could be lost at exit. A message whose handler is
//! dropped unsettled (a task that panicked or was aborted) is nacked; a worker process that dies
//! stops extending its leases, and the service redelivers its messages after `ack_deadline`.
//!
//! # Connection loss
//! While nothing arrives, the background task checks the subscription every [`PROBE_EVERY`]
//! (a cheap `GetSubscription`). While that fails, [`Consumer::next`] returns
//! [`QueueError::Broker`] after `wait` (so the worker shows not ready); a deleted subscription
//! gives [`QueueError::Missing`]. A stream that ends with an error is reopened with backoff
//! (100 ms doubling to [`BACKOFF_MAX`], with jitter), and so is the stream when the service
//! becomes reachable again; each counts one [`crate::telemetry::RECONNECTS`].
//!
//! # Depth and dead letters
//! [`Queue::depth`] is `None`: Pub/Sub has no cheap call for the backlog (Cloud Monitoring's
//! `subscription/num_undelivered_messages`, which KEDA's `gcp-pubsub` scaler reads, lags by
//! minutes). [`Queue::dead_letters`] reads `NAME-dead-sub` through the REST API (`:pull`, then
//! `:modifyAckDeadline` to 0 so the messages stay there and are available again at once): the
//! client library has StreamingPull only, whose messages cannot be put back without counting a
//! delivery. Only immediate pulls (`returnImmediately`, up to three tries when one comes back
//! empty) are used: a blocking pull that the client gives up on may still be handed messages,
//! which then stay leased to nobody for the ack deadline. So a dead letter that just arrived may
//! be missing from one reading; poll. Only REST is ever used on that subscription (the emulator
//! misbehaves when one subscription is read both ways).
//!
//! # The emulator
//! The Pub/Sub emulator (0.8.20, from the Google Cloud CLI) serves all of this with three gaps:
//! it does not enforce flow control (a stream may be handed every waiting message); after
//! `UpdateSubscription` changed the dead-letter policy it redelivers past the new limit and never
//! forwards; and it fails in its stream-close path (`NoSuchMethodError` in its log) when a
//! subscriber's stream or connection closes, after which it may keep dispatching to that dead
//! stream and keep its messages leased for minutes. So on the emulator, stop or kill workers only
//! when the queue is empty, and keep `max_attempts` equal to the workers' `--max-attempts`.
//!
//! # Endpoint and credentials
//! With `PUBSUB_EMULATOR_HOST=HOST:PORT` every client talks plain HTTP to `http://HOST:PORT` with
//! anonymous credentials (the 1.x crates do not read that variable themselves); otherwise they use
//! `pubsub.googleapis.com` and Application Default Credentials. TLS uses rustls with the `ring`
//! provider, installed on first use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use tokio::sync::OnceCell;
use tracing::warn;

pub use super::backoff::BACKOFF_MAX;
use super::{Consumer, ConsumerOptions, DeadLetter, Queue, QueueError};
use crate::gcp;
pub use clients::emulator_endpoint;
use clients::{Clients, Ctx, RestError};
pub use topology::clamp_attempts;
pub use uri::{parse_uri, uri_with_name, Names, PubSubOptions};

mod clients;
mod consume;
mod publish;
mod topology;
mod uri;

/// Attribute carrying why a message was dead-lettered by cropfleet.
pub const REASON_ATTR: &str = "cropfleet-reason";
/// Attribute carrying the delivery attempt at which cropfleet dead-lettered a message.
pub const ATTEMPT_ATTR: &str = "cropfleet-attempt";
/// Attribute carrying the message id of the original of a dead-letter copy.
pub const SOURCE_ID_ATTR: &str = "cropfleet-source-id";
/// Attribute the service adds to messages its dead-letter policy forwarded.
pub const SERVICE_DELIVERY_COUNT_ATTR: &str = "CloudPubSubDeadLetterSourceDeliveryCount";
/// The environment variable naming the emulator (`HOST:PORT`).
pub const EMULATOR_ENV: &str = gcp::PUBSUB_EMULATOR_HOST;
/// Fewest delivery attempts a dead-letter policy accepts.
pub const MIN_DELIVERY_ATTEMPTS: u32 = 5;
/// Most delivery attempts a dead-letter policy accepts.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 100;
/// Most messages queued in the publisher before awaiting their ids.
pub const PUBLISH_WINDOW: usize = 1000;
/// How often an idle consumer checks that the subscription is reachable.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Longest wait, when a consumer is dropped, for its last acks and nacks to be sent.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The service's endpoint when no emulator is configured.
const SERVICE_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// A Pub/Sub queue (see the module docs for resources and semantics).
pub struct PubSub {
    ctx: Arc<Ctx>,
    clients: OnceCell<Arc<Clients>>,
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub").field("uri", &self.ctx.uri).field("topic", &self.ctx.names.topic).finish()
    }
}

impl PubSub {
    /// The queue `name` of `project`. Nothing connects until the first operation.
    pub fn new(project: &str, name: &str, opts: PubSubOptions) -> PubSub {
        let ctx = Ctx {
            uri: format!("pubsub://{project}/{name}"),
            names: Names::new(project, name),
            opts,
            endpoint: emulator_endpoint(),
        };
        PubSub { ctx: Arc::new(ctx), clients: OnceCell::new() }
    }

    /// The same queue on an emulator at `endpoint` (`HOST:PORT` or `http://HOST:PORT`) with
    /// anonymous credentials, whatever [`EMULATOR_ENV`] says. For tests and tools.
    pub fn with_emulator(self, endpoint: &str) -> PubSub {
        let endpoint = gcp::endpoint_url(endpoint);
        let ctx = Ctx {
            uri: self.ctx.uri.clone(),
            names: self.ctx.names.clone(),
            opts: self.ctx.opts.clone(),
            endpoint: Some(endpoint),
        };
        PubSub { ctx: Arc::new(ctx), clients: OnceCell::new() }
    }

    /// Parse `pubsub://PROJECT/NAME[?options]` (see [`parse_uri`]).
    pub fn from_uri(uri: &str) -> Result<PubSub, QueueError> {
        let (project, name, opts) = parse_uri(uri)?;
        Ok(PubSub::new(&project, &name, opts))
    }

    /// Resource names of the topics and subscriptions.
    pub fn names(&self) -> &Names {
        &self.ctx.names
    }

    /// The options in force.
    pub fn options(&self) -> &PubSubOptions {
        &self.ctx.opts
    }

    /// Publish `payloads` to `NAME`; returns the message ids of the confirmed prefix and the
    /// first failure (see "Publishing" above).
    pub async fn publish_many_with_ids(&self, payloads: &[Vec<u8>]) -> (Vec<String>, Option<QueueError>) {
        match self.clients().await {
            Ok(c) => publish::publish_many(&self.ctx, &c, payloads).await,
            Err(e) => (Vec::new(), Some(e)),
        }
    }

    /// Delete the subscriptions and topics of this queue, with their messages (missing ones are
    /// fine). For tests, sweeps and tear-down scripts.
    pub async fn delete_all(&self) -> Result<(), QueueError> {
        topology::delete_all(&self.ctx, &*self.clients().await?).await
    }

    async fn clients(&self) -> Result<Arc<Clients>, QueueError> {
        self.clients.get_or_try_init(|| async { Clients::build(&self.ctx).await.map(Arc::new) }).await.cloned()
    }
}

#[async_trait]
impl Queue for PubSub {
    async fn setup(&self) -> Result<(), QueueError> {
        topology::setup(&self.ctx, &*self.clients().await?).await
    }

    async fn publish(&self, payload: &[u8]) -> Result<(), QueueError> {
        match self.publish_many_with_ids(&[payload.to_vec()]).await {
            (_, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    async fn publish_many(&self, payloads: &[Vec<u8>]) -> (usize, Option<QueueError>) {
        let (ids, e) = self.publish_many_with_ids(payloads).await;
        (ids.len(), e)
    }

    async fn consumer(&self, opts: ConsumerOptions) -> Result<Box<dyn Consumer>, QueueError> {
        Ok(Box::new(consume::open(self.ctx.clone(), self.clients().await?, opts).await?))
    }

    async fn depth(&self) -> Result<Option<u64>, QueueError> {
        Ok(None)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let c = self.clients().await?;
        let sub = &self.ctx.names.dead_subscription;
        let what = format!("subscription {sub}");
        let rest_err = |e: RestError| match e {
            RestError::NotFound(m) => self.ctx.missing(format!("Pub/Sub {what}"), m),
            RestError::Other(m) => QueueError::Broker(format!("reading {what}: {m}")),
        };
        let mut out: Vec<DeadLetter> = Vec::new();
        let mut ack_ids: Vec<String> = Vec::new();
        let mut empty = 0;
        let mut result = Ok(());
        while out.len() < max {
            // Immediate pulls only: a blocking pull given up by the client may still be handed
            // messages by the service, which then stay leased to nobody for the ack deadline.
            let want = (max - out.len()).min(1000);
            let body = serde_json::json!({ "maxMessages": want, "returnImmediately": true });
            let v = match c.rest(sub, "pull", body).await {
                Ok(v) => v,
                Err(e) => {
                    result = Err(rest_err(e));
                    break;
                }
            };
            let got = v["receivedMessages"].as_array().cloned().unwrap_or_default();
            if got.is_empty() {
                // An immediate pull may come back empty although messages wait: try thrice.
                empty += 1;
                if empty >= 3 || !out.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            for m in got {
                if let Some(a) = m["ackId"].as_str() {
                    ack_ids.push(a.to_string());
                }
                let msg = &m["message"];
                let id = msg["messageId"].as_str().unwrap_or_default().to_string();
                if out.iter().any(|d| d.id == id) {
                    continue;
                }
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(msg["data"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                let attrs: HashMap<String, String> = msg["attributes"]
                    .as_object()
                    .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                    .unwrap_or_default();
                out.push(DeadLetter { id, payload, reason: dead_reason(&attrs) });
            }
        }
        // Put them back: a zero ack deadline makes them available again at once.
        for chunk in ack_ids.chunks(1000) {
            let body = serde_json::json!({ "ackIds": chunk, "ackDeadlineSeconds": 0 });
            if let Err(e) = c.rest(sub, "modifyAckDeadline", body).await {
                warn!(subscription = %sub, error = ?e, "could not hand dead letters back; they return after the ack deadline");
            }
        }
        result.map(|_| {
            out.truncate(max);
            out
        })
    }

    fn backend(&self) -> &'static str {
        "pubsub"
    }
}

/// Why a message is in `NAME-dead`, from its attributes.
pub fn dead_reason(attrs: &HashMap<String, String>) -> String {
    if let Some(r) = attrs.get(REASON_ATTR) {
        return r.clone();
    }
    if let Some(n) = attrs.get(SERVICE_DELIVERY_COUNT_ATTR) {
        let from = attrs.get("CloudPubSubDeadLetterSourceSubscription").map(String::as_str).unwrap_or("?");
        return format!(
            "delivered {n} times without being acked (the dead-letter policy of subscription {from}): its workers \
             died, stalled or kept failing"
        );
    }
    "dead-lettered without a recorded reason".into()
}

#[cfg(test)]
mod tests {
    use super::clients::truncate;
    use super::*;

    #[test]
    fn clamps_attempts_and_explains_dead_letters() {
        assert_eq!(clamp_attempts(1), 5);
        assert_eq!(clamp_attempts(8), 8);
        assert_eq!(clamp_attempts(1000), 100);
        let mut a = HashMap::new();
        assert!(dead_reason(&a).contains("without a recorded reason"));
        a.insert(SERVICE_DELIVERY_COUNT_ATTR.to_string(), "5".to_string());
        assert!(dead_reason(&a).contains("delivered 5 times"), "{}", dead_reason(&a));
        a.insert(REASON_ATTR.to_string(), "bad input".to_string());
        assert_eq!(dead_reason(&a), "bad input");
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
