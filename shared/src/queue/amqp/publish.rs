//! Publishing with confirms: a confirm-mode channel per connection, messages pipelined and
//! their confirms (and `basic.return`s) matched by message id (see "Messages" in [`super`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::connection::{fault, Fault};
use crate::queue::QueueError;

/// One message to publish.
pub(super) struct Outgoing<'a> {
    pub(super) exchange: &'a str,
    pub(super) routing_key: &'a str,
    pub(super) payload: &'a [u8],
    pub(super) props: BasicProperties,
    pub(super) id: String,
}

/// Persistent properties with a message id and optional headers.
pub(super) fn new_props(id: &str, headers: Option<FieldTable>) -> BasicProperties {
    let p = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
    match headers {
        Some(h) => p.with_headers(h),
        None => p,
    }
}

pub(super) fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A confirm-mode channel on one connection; publishes on it are serialized, so every
/// `basic.return` in a batch belongs to that batch.
pub(super) struct Publisher {
    pub(super) conn: Arc<Connection>,
    ch: tokio::sync::Mutex<Option<Channel>>,
}

impl Publisher {
    pub(super) fn new(conn: Arc<Connection>) -> Publisher {
        Publisher { conn, ch: tokio::sync::Mutex::new(None) }
    }

    pub(super) fn alive(&self) -> bool {
        self.conn.status().connected()
    }

    /// Publish `msgs` pipelined, then wait for every confirm. Returns how many, from the start,
    /// were confirmed (acked and not returned), and the first failure.
    pub(super) async fn send(&self, msgs: &[Outgoing<'_>]) -> (usize, Option<Fault>) {
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
