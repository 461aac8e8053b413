//! Consuming: one StreamingPull stream per consumer, owned by a background task that reopens it
//! with backoff and probes the subscription while idle; deliveries and their settling (see
//! "Consuming", "Shutdown" and "Connection loss" in [`super`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::options::RequestOptionsBuilder;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::{Message, Subscription};
use google_cloud_pubsub::retry_policy::RetryableErrors;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior, ShutdownToken};
use metrics::counter;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::clients::{is_not_found, truncate, Clients, Ctx, MAX_ATTR, PROBE_TIMEOUT};
use super::publish::await_id;
use super::topology::converge;
use super::{ATTEMPT_ATTR, FLUSH_TIMEOUT, PROBE_EVERY, REASON_ATTR, SERVICE_ENDPOINT, SOURCE_ID_ATTR};
use crate::queue::backoff::Backoff;
use crate::queue::{Acker, Consumer, ConsumerOptions, Delivery, QueueError};
use crate::telemetry;

/// What a consumer knows about its link to the service.
#[derive(Debug, Clone)]
pub(super) enum Link {
    Up,
    Down { since: Instant, error: String },
    Missing { what: String, detail: String },
}

impl Link {
    fn error(&self) -> Option<QueueError> {
        match self {
            Link::Up => None,
            Link::Down { since, error } => Some(QueueError::Broker(format!(
                "Pub/Sub unreachable for {:.1} s (retrying with backoff): {error}",
                since.elapsed().as_secs_f64()
            ))),
            Link::Missing { what, detail } => Some(QueueError::Missing { what: what.clone(), detail: detail.clone() }),
        }
    }
}

/// Check the work subscription once: `Ok(Some)` when it exists, `Ok(None)` when the service
/// could not be reached, `Err(Missing)` when it does not exist.
pub(super) async fn probe(ctx: &Ctx, c: &Clients) -> Result<Option<Subscription>, Link> {
    let call = c
        .subs
        .get_subscription()
        .set_subscription(&ctx.names.subscription)
        .with_attempt_timeout(PROBE_TIMEOUT)
        .with_retry_policy(RetryableErrors.with_attempt_limit(1))
        .send();
    match tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(1), call).await {
        Ok(Ok(s)) => Ok(Some(s)),
        Ok(Err(e)) if is_not_found(&e) => Err(Link::Missing {
            what: format!("Pub/Sub subscription {}", ctx.names.subscription),
            detail: format!("{}; the service said: {e}", ctx.setup_hint()),
        }),
        Ok(Err(e)) => match ctx.rpc_error(&format!("subscription {}", ctx.names.subscription), "reading", &e) {
            QueueError::Broker(m) => Err(Link::Down { since: Instant::now(), error: m }),
            other => Err(Link::Down { since: Instant::now(), error: other.to_string() }),
        },
        Err(_) => Err(Link::Down {
            since: Instant::now(),
            error: format!(
                "no answer within {PROBE_TIMEOUT:?} from {}",
                ctx.endpoint.as_deref().unwrap_or(SERVICE_ENDPOINT)
            ),
        }),
    }
}

/// Start consuming `NAME-workers`: check the subscription (converging its dead-letter policy to
/// `opts.max_attempts`), then start the background task that owns the stream.
pub(super) async fn open(ctx: Arc<Ctx>, c: Arc<Clients>, opts: ConsumerOptions) -> Result<PubSubConsumer, QueueError> {
    let link = match probe(&ctx, &c).await {
        Ok(Some(have)) => {
            converge(&c, &have, ctx.desired_subscription(opts.max_attempts), false).await;
            Link::Up
        }
        Ok(None) => Link::Up,
        Err(Link::Missing { what, detail }) => return Err(QueueError::Missing { what, detail }),
        Err(down) => {
            if let Some(e) = down.error() {
                warn!(subscription = %ctx.names.subscription, error = %e, "Pub/Sub not reachable yet; consuming anyway");
            }
            down
        }
    };
    let prefetch = opts.prefetch.max(1);
    let link = Arc::new(Mutex::new(link));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let pump = Pump { ctx: ctx.clone(), clients: c.clone(), prefetch, link: link.clone(), tokens: tokens.clone() };
    let task = tokio::spawn(pump.run(tx, stop_rx));
    info!(subscription = %ctx.names.subscription, prefetch, "consuming from Pub/Sub");
    Ok(PubSubConsumer { ctx, clients: c, rx, stop_tx, link, tokens, task: Some(task), stopped: false })
}

/// The background task that owns the stream (see "Consuming" and "Connection loss").
pub(super) struct Pump {
    ctx: Arc<Ctx>,
    clients: Arc<Clients>,
    prefetch: usize,
    link: Arc<Mutex<Link>>,
    tokens: Arc<Mutex<Vec<ShutdownToken>>>,
}

/// What the pump's wait ended with (short-lived; its size does not matter).
#[allow(clippy::large_enum_variant)]
pub(super) enum Event {
    Stop,
    Probe,
    Item(Option<google_cloud_pubsub::Result<(Message, Handler)>>),
}

impl Pump {
    fn open(&self) -> MessageStream {
        let stream = self
            .clients
            .subscriber
            .subscribe(&self.ctx.names.subscription)
            .set_max_outstanding_messages(self.prefetch as i64)
            .set_max_lease(self.ctx.opts.max_lease)
            .set_max_lease_extension(self.ctx.opts.ack_deadline)
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.push(stream.shutdown_token());
        stream
    }

    /// Record `next`; returns true when this is the service coming back after being unreachable.
    fn set_link(&self, next: Link) -> bool {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        let recovered = matches!((&*link, &next), (Link::Down { .. }, Link::Up));
        if let (Link::Down { since, .. }, Link::Down { error, .. }) = (&*link, &next) {
            // Keep when the outage began.
            *link = Link::Down { since: *since, error: error.clone() };
        } else {
            *link = next;
        }
        recovered
    }

    fn recovered(&self) {
        counter!(telemetry::RECONNECTS).increment(1);
        info!(subscription = %self.ctx.names.subscription, "Pub/Sub reachable again");
    }

    async fn run(self, tx: mpsc::Sender<(Message, Handler)>, mut stop: watch::Receiver<bool>) {
        let sub = self.ctx.names.subscription.clone();
        let mut backoff = Backoff::new();
        let mut reopen = false;
        'outer: loop {
            if *stop.borrow() {
                break;
            }
            let mut stream = self.open();
            if reopen {
                counter!(telemetry::RECONNECTS).increment(1);
                info!(subscription = %sub, "reopened the Pub/Sub stream");
            }
            let mut probe_at = Instant::now() + PROBE_EVERY;
            let why: String = loop {
                let event = tokio::select! {
                    biased;
                    _ = stop.changed() => Event::Stop,
                    item = stream.next() => Event::Item(item),
                    _ = tokio::time::sleep_until(probe_at) => Event::Probe,
                };
                match event {
                    Event::Stop => break 'outer,
                    Event::Item(Some(Ok((m, h)))) => {
                        if self.set_link(Link::Up) {
                            self.recovered();
                        }
                        backoff.reset();
                        probe_at = Instant::now() + PROBE_EVERY;
                        tokio::select! {
                            biased;
                            // Not handed out: dropping the handler nacks it.
                            _ = stop.changed() => break 'outer,
                            sent = tx.send((m, h)) => if sent.is_err() { break 'outer },
                        }
                    }
                    Event::Item(Some(Err(e))) => {
                        let err = self.ctx.rpc_error(&format!("subscription {sub}"), "pulling from", &e);
                        let next = match &err {
                            QueueError::Missing { what, detail } => {
                                Link::Missing { what: what.clone(), detail: detail.clone() }
                            }
                            other => Link::Down { since: Instant::now(), error: other.to_string() },
                        };
                        self.set_link(next);
                        break err.to_string();
                    }
                    Event::Item(None) => break "the stream ended".to_string(),
                    Event::Probe => {
                        probe_at = Instant::now() + PROBE_EVERY;
                        match probe(&self.ctx, &self.clients).await {
                            Ok(_) => {
                                if self.set_link(Link::Up) {
                                    // The client backs off up to 60 s between attempts to open
                                    // a stream: start a fresh one now.
                                    self.recovered();
                                    reopen = false;
                                    drop(stream);
                                    continue 'outer;
                                }
                            }
                            Err(next) => {
                                if let Some(e) = next.error() {
                                    debug!(subscription = %sub, error = %e, "Pub/Sub probe failed");
                                }
                                self.set_link(next);
                            }
                        }
                    }
                }
            };
            drop(stream);
            reopen = true;
            let d = backoff.step();
            warn!(subscription = %sub, reason = %why, retry_in_ms = d.as_millis() as u64, "Pub/Sub stream ended; reopening");
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(d) => {}
            }
        }
        debug!(subscription = %sub, "Pub/Sub receiver stopped");
    }
}

/// A consumer of `NAME-workers` (see "Consuming" in [`super`]).
pub(super) struct PubSubConsumer {
    ctx: Arc<Ctx>,
    clients: Arc<Clients>,
    rx: mpsc::Receiver<(Message, Handler)>,
    stop_tx: watch::Sender<bool>,
    link: Arc<Mutex<Link>>,
    tokens: Arc<Mutex<Vec<ShutdownToken>>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stopped: bool,
}

impl PubSubConsumer {
    fn delivery(&self, m: Message, h: Handler) -> Delivery {
        let attempt = h.delivery_attempt().map(|a| a.max(1) as u32).unwrap_or(1);
        let id = m.message_id.clone();
        let payload = m.data.to_vec();
        let acker = PubSubAcker {
            ctx: self.ctx.clone(),
            dead: self.clients.dead.clone(),
            handler: Some(h),
            id: id.clone(),
            attempt,
            message: m,
        };
        Delivery { id, payload, attempt, acker: Box::new(acker) }
    }

    /// Stop the receiver and nack what it received but did not hand out; returns how many.
    fn halt(&mut self) -> usize {
        self.stopped = true;
        let _ = self.stop_tx.send(true);
        self.rx.close();
        let mut returned = 0;
        while let Ok(item) = self.rx.try_recv() {
            drop(item);
            returned += 1;
        }
        returned
    }
}

#[async_trait]
impl Consumer for PubSubConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        if self.stopped {
            tokio::time::sleep_until(deadline).await;
            return Ok(None);
        }
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some((m, h))) => Ok(Some(self.delivery(m, h))),
            Ok(None) => {
                tokio::time::sleep_until(deadline).await;
                Err(QueueError::Broker("the Pub/Sub receiver task ended".into()))
            }
            Err(_) => {
                let link = self.link.lock().unwrap_or_else(|e| e.into_inner()).clone();
                link.error().map_or(Ok(None), Err)
            }
        }
    }

    async fn stop(&mut self) {
        if self.stopped {
            return;
        }
        let returned = self.halt();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        info!(subscription = %self.ctx.names.subscription, returned, "stopped consuming from Pub/Sub");
    }
}

impl Drop for PubSubConsumer {
    fn drop(&mut self) {
        self.halt();
        let tokens: Vec<ShutdownToken> = std::mem::take(&mut *self.tokens.lock().unwrap_or_else(|e| e.into_inner()));
        let flush = async move {
            for t in tokens {
                t.shutdown().await;
            }
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            // Send the last acks and nacks before the process may exit (see "Shutdown").
            let done = tokio::task::block_in_place(|| handle.block_on(tokio::time::timeout(FLUSH_TIMEOUT, flush)));
            if done.is_err() {
                warn!(subscription = %self.ctx.names.subscription, "some messages were still held when the consumer was dropped; the service redelivers them");
            }
        } else {
            handle.spawn(async move {
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush).await;
            });
        }
    }
}

/// Settles one delivery; dropping it unsettled nacks the message.
pub(super) struct PubSubAcker {
    ctx: Arc<Ctx>,
    dead: Publisher,
    handler: Option<Handler>,
    id: String,
    attempt: u32,
    /// The message as received (data and attributes), for the dead-letter copy.
    message: Message,
}

impl PubSubAcker {
    fn nack(&mut self) {
        if let Some(h) = self.handler.take() {
            h.nack();
        }
    }
}

#[async_trait]
impl Acker for PubSubAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        if let Some(h) = self.handler.take() {
            h.ack();
        }
        Ok(())
    }

    async fn retry(mut self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError> {
        debug!(msg = %self.id, attempt = self.attempt, requested_delay_ms = delay.as_millis() as u64, reason, "nack: redelivery after the subscription's retry policy");
        self.nack();
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        let mut attrs = self.message.attributes.clone();
        attrs.insert(REASON_ATTR.into(), truncate(reason, MAX_ATTR));
        attrs.insert(ATTEMPT_ATTR.into(), self.attempt.to_string());
        attrs.insert(SOURCE_ID_ATTR.into(), self.id.clone());
        let msg = Message::new().set_data(self.message.data.clone()).set_attributes(attrs);
        let topic = self.ctx.names.dead_topic.clone();
        let outcome = await_id(&self.ctx, &topic, self.dead.publish(msg)).await;
        match outcome {
            Ok(copy) => {
                debug!(msg = %self.id, copy = %copy, "dead-lettered");
                if let Some(h) = self.handler.take() {
                    h.ack();
                }
                Ok(())
            }
            Err(e) => {
                self.nack();
                Err(e)
            }
        }
    }

    async fn release(mut self: Box<Self>) -> Result<(), QueueError> {
        self.nack();
        Ok(())
    }
}
