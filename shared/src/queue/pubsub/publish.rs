//! Publishing: each message awaited until the service returns its id, in windows of
//! [`PUBLISH_WINDOW`] (see "Publishing" in [`super`]).

use std::time::Duration;

use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;
use tracing::{debug, info};

use super::clients::{Clients, Ctx};
use super::PUBLISH_WINDOW;
use crate::queue::QueueError;

/// Publish `payloads` to `NAME`; returns the message ids of the confirmed prefix and the
/// first failure (see "Publishing" in [`super`]).
pub(super) async fn publish_many(ctx: &Ctx, c: &Clients, payloads: &[Vec<u8>]) -> (Vec<String>, Option<QueueError>) {
    let topic = &ctx.names.topic;
    let mut ids = Vec::with_capacity(payloads.len());
    let mut failure = None;
    'outer: for chunk in payloads.chunks(PUBLISH_WINDOW) {
        let futures: Vec<_> = chunk.iter().map(|p| c.publisher.publish(Message::new().set_data(p.clone()))).collect();
        for f in futures {
            match await_id(ctx, topic, f).await {
                Ok(id) => {
                    debug!(topic = %topic, message_id = %id, "published");
                    ids.push(id);
                }
                Err(e) => {
                    failure = Some(e);
                    break 'outer;
                }
            }
        }
    }
    if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
        if payloads.len() > 1 {
            info!(topic = %topic, confirmed = ids.len(), first_id = %first, last_id = %last, "published to Pub/Sub");
        }
    }
    (ids, failure)
}

/// Wait for the message id of one publish to `topic`, up to the queue's `publish_timeout` (the
/// client's own retry limit) plus 5 s.
pub(super) async fn await_id<F>(ctx: &Ctx, topic: &str, publish: F) -> Result<String, QueueError>
where
    F: std::future::Future<Output = Result<String, PublishError>>,
{
    let limit = ctx.opts.publish_timeout + Duration::from_secs(5);
    match tokio::time::timeout(limit, publish).await {
        Ok(Ok(id)) => Ok(id),
        Ok(Err(e)) => Err(ctx.publish_error(topic, e)),
        Err(_) => Err(QueueError::Broker(format!("publishing to topic {topic}: no message id after {limit:?}"))),
    }
}
