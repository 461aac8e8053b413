//! Consuming: a session (connection, `basic_qos`, `basic_consume`), reconnecting with backoff,
//! counting redeliveries as attempts, and settling deliveries by publishing copies (see
//! "Attempts", "Dead letters" and "Connection loss" in [`super`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use metrics::counter;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::connection::{connect, fault, patiently, Fault};
use super::headers::{copy_headers, copy_props, header_attempt};
use super::publish::{new_id, Outgoing, Publisher};
use super::topology::{declare_topology, retry_bucket};
use super::{Inner, Target, LAST_ERROR_HEADER, REASON_HEADER};
use crate::queue::backoff::Backoff;
use crate::queue::{Acker, Consumer, ConsumerOptions, Delivery, QueueError};
use crate::telemetry;

/// One consumer connection: its consume channel and stream, and a confirm channel for copies.
pub(super) struct Session {
    ch: Channel,
    stream: lapin::Consumer,
    out: Arc<Publisher>,
}

impl Session {
    /// Open a consumer session: connect, declare, qos, consume.
    pub(super) async fn open(inner: &Arc<Inner>, prefetch: u16) -> Result<Session, Fault> {
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

pub(super) struct AmqpConsumer {
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
    /// Connect and start consuming, retrying through an outage of up to
    /// [`super::PUBLISH_RECONNECT_BUDGET`].
    pub(super) async fn open(inner: Arc<Inner>, opts: ConsumerOptions) -> Result<AmqpConsumer, QueueError> {
        let prefetch = opts.prefetch.clamp(1, u16::MAX as usize) as u16;
        let session =
            patiently(&inner.names.queue, || Session::open(&inner, prefetch)).await.map_err(Fault::into_error)?;
        info!(queue = %inner.names.queue, prefetch, "consuming from RabbitMQ");
        Ok(AmqpConsumer {
            inner,
            opts,
            prefetch,
            session: Some(session),
            backoff: Backoff::new(),
            retry_at: None,
            lost_since: None,
            last_error: String::new(),
            stopped: false,
        })
    }

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
                match Session::open(&self.inner, self.prefetch).await {
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
pub(super) enum Copied {
    /// Copy confirmed, original acked (or its ack lost, making a duplicate).
    Yes,
    /// The connection died first; the broker will redeliver the original.
    Lost,
    /// The copy could not be stored; the original is untouched.
    Failed(QueueError),
}

/// Settles one delivery; holds the consumer connection open until it is used.
pub(super) struct AmqpAcker {
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
