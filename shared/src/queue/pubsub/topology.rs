//! Topology: the topics and subscriptions of one queue, created or converged to the wanted
//! settings, and deleted (see "Resources" and "Max attempts" in [`super`]).

use std::time::Duration;

use google_cloud_pubsub::model::{DeadLetterPolicy, RetryPolicy, Subscription};
use tracing::{info, warn};

use super::clients::{is_already_exists, is_not_found, Clients, Ctx};
use super::{MAX_DELIVERY_ATTEMPTS, MIN_DELIVERY_ATTEMPTS};
use crate::queue::QueueError;

/// Create the topics and subscriptions of a queue, or bring existing ones to its settings
/// (see "Resources" in [`super`]).
pub(super) async fn setup(ctx: &Ctx, c: &Clients) -> Result<(), QueueError> {
    let n = &ctx.names;
    ensure_topic(ctx, c, &n.topic).await?;
    ensure_topic(ctx, c, &n.dead_topic).await?;
    // The dead-letter subscription first: messages published to a topic without any
    // subscription are dropped.
    let dead_sub = Subscription::new()
        .set_name(&n.dead_subscription)
        .set_topic(&n.dead_topic)
        .set_ack_deadline_seconds(ctx.opts.ack_deadline.as_secs() as i32);
    ensure_subscription(ctx, c, dead_sub, false).await?;
    ensure_subscription(ctx, c, ctx.desired_subscription(ctx.opts.max_attempts), true).await
}

/// Delete the subscriptions and topics of a queue, with their messages (missing ones are fine).
pub(super) async fn delete_all(ctx: &Ctx, c: &Clients) -> Result<(), QueueError> {
    let n = &ctx.names;
    for sub in [&n.subscription, &n.dead_subscription] {
        match c.subs.delete_subscription().set_subscription(sub).send().await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(ctx.rpc_error(&format!("subscription {sub}"), "deleting", &e)),
        }
    }
    for topic in [&n.topic, &n.dead_topic] {
        match c.topics.delete_topic().set_topic(topic).send().await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(ctx.rpc_error(&format!("topic {topic}"), "deleting", &e)),
        }
    }
    Ok(())
}

pub(super) async fn ensure_topic(ctx: &Ctx, c: &Clients, topic: &str) -> Result<(), QueueError> {
    match c.topics.create_topic().set_name(topic).send().await {
        Ok(_) => {
            info!(topic, "created Pub/Sub topic");
            Ok(())
        }
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(ctx.rpc_error(&format!("topic {topic}"), "creating", &e)),
    }
}

/// Create `want` unless it exists; an existing one on another topic is a conflict, other
/// differences are updated (`check_all`: retry policy and ack deadline too).
pub(super) async fn ensure_subscription(
    ctx: &Ctx,
    c: &Clients,
    want: Subscription,
    check_all: bool,
) -> Result<(), QueueError> {
    let name = want.name.clone();
    let what = format!("subscription {name}");
    match c.subs.create_subscription().with_request(want.clone()).send().await {
        Ok(_) => {
            info!(subscription = %name, topic = %want.topic, "created Pub/Sub subscription");
            return Ok(());
        }
        Err(e) if is_already_exists(&e) => {}
        Err(e) => return Err(ctx.rpc_error(&what, "creating", &e)),
    }
    let have = c
        .subs
        .get_subscription()
        .set_subscription(&name)
        .send()
        .await
        .map_err(|e| ctx.rpc_error(&what, "reading", &e))?;
    if have.topic != want.topic {
        return Err(QueueError::Conflict(format!(
            "{what} already exists on topic {:?}, not {:?}: delete it or use another queue name",
            have.topic, want.topic
        )));
    }
    converge(c, &have, want, check_all).await;
    Ok(())
}

/// Update the settings of `have` that differ from `want`; failures are logged (an existing
/// subscription still works).
pub(super) async fn converge(c: &Clients, have: &Subscription, want: Subscription, check_all: bool) {
    let paths = differences(have, &want, check_all);
    if paths.is_empty() {
        return;
    }
    let mask = google_cloud_wkt::FieldMask::default().set_paths(paths.iter().copied());
    match c.subs.update_subscription().set_subscription(want).set_update_mask(mask).send().await {
        Ok(s) => info!(
            subscription = %s.name,
            updated = ?paths,
            max_delivery_attempts = s.dead_letter_policy.as_ref().map(|p| p.max_delivery_attempts),
            "updated Pub/Sub subscription settings"
        ),
        Err(e) => warn!(
            subscription = %have.name,
            differs = ?paths,
            error = %e,
            "could not update the subscription's settings; keeping the existing ones"
        ),
    }
}

impl Ctx {
    /// The subscription as `setup` wants it.
    pub(super) fn desired_subscription(&self, max_attempts: u32) -> Subscription {
        Subscription::new()
            .set_name(&self.names.subscription)
            .set_topic(&self.names.topic)
            .set_ack_deadline_seconds(self.opts.ack_deadline.as_secs() as i32)
            .set_retry_policy(
                RetryPolicy::new()
                    .set_minimum_backoff(wkt_duration(self.opts.min_backoff))
                    .set_maximum_backoff(wkt_duration(self.opts.max_backoff)),
            )
            .set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(&self.names.dead_topic)
                    .set_max_delivery_attempts(clamp_attempts(max_attempts) as i32),
            )
    }
}

/// The worker's max attempts as the service accepts them.
pub fn clamp_attempts(max_attempts: u32) -> u32 {
    max_attempts.clamp(MIN_DELIVERY_ATTEMPTS, MAX_DELIVERY_ATTEMPTS)
}

pub(super) fn wkt_duration(d: Duration) -> google_cloud_wkt::Duration {
    google_cloud_wkt::Duration::clamp(d.as_secs() as i64, d.subsec_nanos() as i32)
}

pub(super) fn std_duration(d: Option<&google_cloud_wkt::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds().max(0) as u64, d.nanos().max(0) as u32))
}

/// Which settings of an existing subscription differ from the wanted ones (update mask paths).
pub(super) fn differences(have: &Subscription, want: &Subscription, check_all: bool) -> Vec<&'static str> {
    let mut paths = Vec::new();
    let attempts = |s: &Subscription| {
        s.dead_letter_policy.as_ref().map(|p| (p.dead_letter_topic.clone(), p.max_delivery_attempts))
    };
    if attempts(have) != attempts(want) {
        paths.push("dead_letter_policy");
    }
    if check_all {
        let backoff = |s: &Subscription| {
            s.retry_policy
                .as_ref()
                .map(|p| (std_duration(p.minimum_backoff.as_ref()), std_duration(p.maximum_backoff.as_ref())))
        };
        if backoff(have) != backoff(want) {
            paths.push("retry_policy");
        }
        if have.ack_deadline_seconds != want.ack_deadline_seconds {
            paths.push("ack_deadline_seconds");
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::pubsub::{Names, PubSubOptions};

    #[test]
    fn finds_setting_differences() {
        let ctx = Ctx {
            uri: "pubsub://p/q".into(),
            names: Names::new("p", "q"),
            opts: PubSubOptions::default(),
            endpoint: None,
        };
        let want = ctx.desired_subscription(5);
        assert!(differences(&want, &want, true).is_empty());
        assert_eq!(differences(&want, &ctx.desired_subscription(9), false), vec!["dead_letter_policy"]);
        let other = want.clone().set_ack_deadline_seconds(30);
        assert_eq!(differences(&other, &want, false), Vec::<&str>::new());
        assert_eq!(differences(&other, &want, true), vec!["ack_deadline_seconds"]);
    }
}
