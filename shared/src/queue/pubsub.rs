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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::options::RequestOptionsBuilder;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::{DeadLetterPolicy, Message, RetryPolicy, Subscription};
use google_cloud_pubsub::retry_policy::RetryableErrors;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior, ShutdownToken};
use metrics::counter;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Acker, Consumer, ConsumerOptions, DeadLetter, Delivery, Queue, QueueError};
use crate::{gcp, telemetry};

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
/// Longest pause between attempts to reopen a stream.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The service's endpoint when no emulator is configured.
const SERVICE_ENDPOINT: &str = "https://pubsub.googleapis.com";
/// Longest name accepted: `NAME-dead-sub` must fit the service's 255 characters.
const MAX_NAME: usize = 246;
/// Attribute values are limited to 1024 bytes by the service.
const MAX_ATTR: usize = 1024;
/// Per-attempt timeout of admin calls.
const ADMIN_ATTEMPT: Duration = Duration::from_secs(10);
/// Overall limit of admin calls (retries included).
const ADMIN_LIMIT: Duration = Duration::from_secs(30);
/// Limit of one reachability probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit of one REST call.
const REST_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// URI and options

/// Settings of one Pub/Sub queue, from the URI's query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubSubOptions {
    /// `batch_messages`: publisher batch size in messages (1..=1000, default 100).
    pub batch_messages: u32,
    /// `batch_bytes`: publisher batch size in bytes (1..=10 000 000, default 1 000 000).
    pub batch_bytes: u32,
    /// `batch_delay_ms`: longest a message waits for its batch to fill (default 10 ms).
    pub batch_delay: Duration,
    /// `ack_deadline` (seconds, 10..=600, default 10): the subscriptions' ack deadline and the
    /// consumer's lease extension, i.e. how soon the messages of a worker that died come back.
    pub ack_deadline: Duration,
    /// `max_attempts` (5..=100, default 5): the dead-letter policy `setup` creates; consumers
    /// replace it with their own `max_attempts` (clamped).
    pub max_attempts: u32,
    /// `min_backoff` (seconds, 0..=600, default 1): first redelivery delay after a nack.
    pub min_backoff: Duration,
    /// `max_backoff` (seconds, 0..=600, default 60): longest redelivery delay after nacks.
    pub max_backoff: Duration,
    /// `max_lease` (seconds, default 3600): how long a consumer keeps extending the lease of a
    /// message it holds; after that the service redelivers it.
    pub max_lease: Duration,
    /// `publish_timeout` (seconds, default 60): how long a publish keeps retrying.
    pub publish_timeout: Duration,
}

impl Default for PubSubOptions {
    fn default() -> Self {
        PubSubOptions {
            batch_messages: 100,
            batch_bytes: 1_000_000,
            batch_delay: Duration::from_millis(10),
            ack_deadline: Duration::from_secs(10),
            max_attempts: MIN_DELIVERY_ATTEMPTS,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_lease: Duration::from_secs(3600),
            publish_timeout: Duration::from_secs(60),
        }
    }
}

impl PubSubOptions {
    /// Apply one `key=value` query parameter.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let int = |lo: u64, hi: u64| -> Result<u64, String> {
            let v: u64 = value.parse().map_err(|_| format!("{key}={value:?} is not a whole number"))?;
            if !(lo..=hi).contains(&v) {
                return Err(format!("{key}={v} is outside {lo}..={hi}"));
            }
            Ok(v)
        };
        let secs = |hi: f64| -> Result<Duration, String> {
            let v: f64 = value.parse().map_err(|_| format!("{key}={value:?} is not a number of seconds"))?;
            if !(0.0..=hi).contains(&v) {
                return Err(format!("{key}={v} is outside 0..={hi} seconds"));
            }
            Ok(Duration::from_secs_f64(v))
        };
        match key {
            "batch_messages" => self.batch_messages = int(1, 1000)? as u32,
            "batch_bytes" => self.batch_bytes = int(1, 10_000_000)? as u32,
            "batch_delay_ms" => self.batch_delay = Duration::from_millis(int(0, 60_000)?),
            "ack_deadline" => self.ack_deadline = Duration::from_secs(int(10, 600)?),
            "max_attempts" => {
                self.max_attempts = int(u64::from(MIN_DELIVERY_ATTEMPTS), u64::from(MAX_DELIVERY_ATTEMPTS))? as u32
            }
            "min_backoff" => self.min_backoff = secs(600.0)?,
            "max_backoff" => self.max_backoff = secs(600.0)?,
            "max_lease" => self.max_lease = Duration::from_secs(int(10, 7 * 86_400)?),
            "publish_timeout" => self.publish_timeout = Duration::from_secs(int(1, 3600)?),
            _ => {
                return Err(format!(
                    "unknown parameter {key:?} (known: batch_messages, batch_bytes, batch_delay_ms, ack_deadline, \
                     max_attempts, min_backoff, max_backoff, max_lease, publish_timeout)"
                ))
            }
        }
        Ok(())
    }
}

/// Split `pubsub://PROJECT/NAME[?k=v&…]` into project, queue name and options.
pub fn parse_uri(uri: &str) -> Result<(String, String, PubSubOptions), QueueError> {
    let bad = |reason: String| QueueError::InvalidUri { uri: uri.to_string(), reason };
    let example = "expected pubsub://PROJECT/NAME, e.g. pubsub://my-project/crops";
    let Some(rest) = uri.strip_prefix("pubsub://") else {
        return Err(bad(example.into()));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let Some((project, name)) = path.split_once('/') else {
        return Err(bad(format!("missing the queue name: {example}")));
    };
    if project.is_empty() || !project.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:".contains(c))
    {
        return Err(bad(format!("bad project id {project:?}: lowercase letters, digits, '-', '.' and ':' only")));
    }
    check_name(name).map_err(|r| bad(format!("queue name {name:?}: {r}")))?;
    let mut opts = PubSubOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad(format!("query parameter {pair:?} has no value")))?;
        opts.set(k, v).map_err(bad)?;
    }
    if opts.min_backoff > opts.max_backoff {
        return Err(bad("min_backoff is larger than max_backoff".into()));
    }
    Ok((project.to_string(), name.to_string(), opts))
}

/// Validate a queue name against the service's rules for topic and subscription ids.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("must start with a letter".into());
    }
    if name.len() < 3 || name.len() > MAX_NAME {
        return Err(format!("must have 3 to {MAX_NAME} characters"));
    }
    if name.to_ascii_lowercase().starts_with("goog") {
        return Err("must not start with \"goog\"".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.~+%".contains(*c))) {
        return Err(format!("character {c:?} is not allowed (letters, digits, - _ . ~ + % only)"));
    }
    Ok(())
}

/// The same URI with another queue name (query parameters kept): how a tool derives related
/// queues, e.g. `pubsub://p/crops` → `pubsub://p/crops.p2t4`.
pub fn uri_with_name(uri: &str, name: &str) -> Result<String, QueueError> {
    let (project, _, _) = parse_uri(uri)?;
    let query = uri.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    let out = format!("pubsub://{project}/{name}{query}");
    parse_uri(&out)?;
    Ok(out)
}

/// Full resource names of everything one queue uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `projects/P/topics/NAME`
    pub topic: String,
    /// `projects/P/subscriptions/NAME-workers`
    pub subscription: String,
    /// `projects/P/topics/NAME-dead`
    pub dead_topic: String,
    /// `projects/P/subscriptions/NAME-dead-sub`
    pub dead_subscription: String,
}

impl Names {
    /// Names derived from the project and the queue name.
    pub fn new(project: &str, name: &str) -> Names {
        Names {
            topic: format!("projects/{project}/topics/{name}"),
            subscription: format!("projects/{project}/subscriptions/{name}-workers"),
            dead_topic: format!("projects/{project}/topics/{name}-dead"),
            dead_subscription: format!("projects/{project}/subscriptions/{name}-dead-sub"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoint, credentials, errors

/// `http://HOST:PORT` from [`EMULATOR_ENV`], when it is set.
pub fn emulator_endpoint() -> Option<String> {
    gcp::emulator_host(EMULATOR_ENV)
}

fn code_of(e: &google_cloud_pubsub::Error) -> Option<Code> {
    e.status().map(|s| s.code)
}

fn is_not_found(e: &google_cloud_pubsub::Error) -> bool {
    code_of(e) == Some(Code::NotFound) || e.http_status_code() == Some(404)
}

fn is_already_exists(e: &google_cloud_pubsub::Error) -> bool {
    code_of(e) == Some(Code::AlreadyExists) || e.http_status_code() == Some(409)
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// What a consumer knows about its link to the service.
#[derive(Debug, Clone)]
enum Link {
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

/// Everything needed to turn service errors into user-facing ones.
#[derive(Debug)]
struct Ctx {
    uri: String,
    names: Names,
    opts: PubSubOptions,
    /// The emulator's endpoint (`http://HOST:PORT`), or `None` for the real service.
    endpoint: Option<String>,
}

impl Ctx {
    fn setup_hint(&self) -> String {
        format!(
            "run `cropfleet-producer setup --queue {}` (or `--results` for a results queue) to create the topics \
             and subscriptions",
            self.uri
        )
    }

    fn missing(&self, what: String, e: impl std::fmt::Display) -> QueueError {
        QueueError::Missing { what, detail: format!("{}; the service said: {e}", self.setup_hint()) }
    }

    /// A user-facing error for a failed call about `what` (a resource name).
    fn rpc_error(&self, what: &str, op: &str, e: &google_cloud_pubsub::Error) -> QueueError {
        if is_not_found(e) {
            return self.missing(format!("Pub/Sub {what}"), e);
        }
        match code_of(e) {
            Some(Code::PermissionDenied) | Some(Code::Unauthenticated) => QueueError::Broker(format!(
                "{op} {what}: permission denied: {e} (check the credentials and the IAM roles, e.g. \
                 roles/pubsub.editor)"
            )),
            _ => QueueError::Broker(format!("{op} {what}: {e}")),
        }
    }

    fn publish_error(&self, topic: &str, e: PublishError) -> QueueError {
        match e {
            PublishError::Rpc(e) => self.rpc_error(&format!("topic {topic}"), "publishing to", &e),
            other => QueueError::Broker(format!("publishing to topic {topic}: {other}")),
        }
    }

    /// The subscription as `setup` wants it.
    fn desired_subscription(&self, max_attempts: u32) -> Subscription {
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

fn wkt_duration(d: Duration) -> google_cloud_wkt::Duration {
    google_cloud_wkt::Duration::clamp(d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn std_duration(d: Option<&google_cloud_wkt::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds().max(0) as u64, d.nanos().max(0) as u32))
}

/// Which settings of an existing subscription differ from the wanted ones (update mask paths).
fn differences(have: &Subscription, want: &Subscription, check_all: bool) -> Vec<&'static str> {
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

// ---------------------------------------------------------------------------------------------
// Clients

/// The clients of one queue, built on first use (connections are lazy: building never fails for
/// an unreachable endpoint).
struct Clients {
    topics: TopicAdmin,
    subs: SubscriptionAdmin,
    subscriber: Subscriber,
    publisher: Publisher,
    dead: Publisher,
    http: reqwest::Client,
    /// Base URL of the REST API.
    rest: String,
    /// Credentials for hand-made REST calls (`None` for the emulator).
    rest_creds: Option<google_cloud_auth::credentials::Credentials>,
}

macro_rules! wire {
    ($builder:expr, $endpoint:expr) => {{
        let b = $builder;
        match $endpoint {
            Some(ep) => b.with_endpoint(ep.clone()).with_credentials(gcp::anonymous_credentials()),
            None => b,
        }
    }};
}

impl Clients {
    async fn build(ctx: &Ctx) -> Result<Clients, QueueError> {
        gcp::install_crypto_provider();
        let ep = ctx.endpoint.clone();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            QueueError::Broker(format!(
                "building the Pub/Sub {what} client: {e} (for the emulator set {EMULATOR_ENV}=HOST:PORT; for Google \
                 Cloud configure Application Default Credentials, e.g. `gcloud auth application-default login`)"
            ))
        };
        let admin_retry = || RetryableErrors.with_attempt_limit(5).with_time_limit(ADMIN_LIMIT);
        let topics = wire!(TopicAdmin::builder(), &ep)
            .with_retry_policy(admin_retry())
            .with_attempt_timeout(ADMIN_ATTEMPT)
            .build()
            .await
            .map_err(|e| fail("topic admin", &e))?;
        let subs = wire!(SubscriptionAdmin::builder(), &ep)
            .with_retry_policy(admin_retry())
            .with_attempt_timeout(ADMIN_ATTEMPT)
            .build()
            .await
            .map_err(|e| fail("subscription admin", &e))?;
        let subscriber = wire!(Subscriber::builder(), &ep).build().await.map_err(|e| fail("subscriber", &e))?;
        let base = wire!(BasePublisher::builder(), &ep)
            .with_retry_policy(RetryableErrors.with_time_limit(ctx.opts.publish_timeout))
            .build()
            .await
            .map_err(|e| fail("publisher", &e))?;
        let batching = |b: google_cloud_pubsub::builder::publisher::PublisherPartialBuilder| {
            b.set_message_count_threshold(ctx.opts.batch_messages)
                .set_byte_threshold(ctx.opts.batch_bytes)
                .set_delay_threshold(ctx.opts.batch_delay)
                .build()
        };
        let publisher = batching(base.publisher(&ctx.names.topic));
        let dead = batching(base.publisher(&ctx.names.dead_topic));
        let rest_creds = match &ep {
            Some(_) => None,
            None => Some(
                google_cloud_auth::credentials::Builder::default()
                    .build()
                    .map_err(|e| fail("REST (credentials)", &e))?,
            ),
        };
        let http = reqwest::Client::builder().timeout(REST_TIMEOUT).build().map_err(|e| fail("REST", &e))?;
        Ok(Clients {
            topics,
            subs,
            subscriber,
            publisher,
            dead,
            http,
            rest: ep.unwrap_or_else(|| SERVICE_ENDPOINT.to_string()),
            rest_creds,
        })
    }

    /// POST `{rest}/v1/{resource}:{method}` with a JSON body.
    async fn rest(
        &self,
        resource: &str,
        method: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, RestError> {
        let mut req = self.http.post(format!("{}/v1/{resource}:{method}", self.rest)).json(&body);
        if let Some(creds) = &self.rest_creds {
            use google_cloud_auth::credentials::CacheableResource;
            match creds.headers(http::Extensions::new()).await {
                Ok(CacheableResource::New { data, .. }) => req = req.headers(data),
                Ok(CacheableResource::NotModified) => {}
                Err(e) => return Err(RestError::Other(format!("credentials: {e}"))),
            }
        }
        let resp = req.send().await.map_err(|e| RestError::Other(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| RestError::Other(e.to_string()))?;
        if status.as_u16() == 404 {
            return Err(RestError::NotFound(text));
        }
        if !status.is_success() {
            return Err(RestError::Other(format!("HTTP {status}: {}", truncate(&text, 500))));
        }
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| RestError::Other(format!("bad JSON from :{method}: {e}")))
    }
}

#[derive(Debug)]
enum RestError {
    NotFound(String),
    Other(String),
}

// ---------------------------------------------------------------------------------------------
// The queue

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

    async fn clients(&self) -> Result<Arc<Clients>, QueueError> {
        self.clients.get_or_try_init(|| async { Clients::build(&self.ctx).await.map(Arc::new) }).await.cloned()
    }

    /// Publish `payloads` to `NAME`; returns the message ids of the confirmed prefix and the
    /// first failure (see the module docs).
    pub async fn publish_many_with_ids(&self, payloads: &[Vec<u8>]) -> (Vec<String>, Option<QueueError>) {
        let c = match self.clients().await {
            Ok(c) => c,
            Err(e) => return (Vec::new(), Some(e)),
        };
        let topic = &self.ctx.names.topic;
        let limit = self.ctx.opts.publish_timeout + Duration::from_secs(5);
        let mut ids = Vec::with_capacity(payloads.len());
        let mut failure = None;
        'outer: for chunk in payloads.chunks(PUBLISH_WINDOW) {
            let futures: Vec<_> =
                chunk.iter().map(|p| c.publisher.publish(Message::new().set_data(p.clone()))).collect();
            for f in futures {
                match tokio::time::timeout(limit, f).await {
                    Ok(Ok(id)) => {
                        debug!(topic = %topic, message_id = %id, "published");
                        ids.push(id);
                    }
                    Ok(Err(e)) => {
                        failure = Some(self.ctx.publish_error(topic, e));
                        break 'outer;
                    }
                    Err(_) => {
                        failure = Some(QueueError::Broker(format!(
                            "publishing to topic {topic}: no message id after {limit:?}"
                        )));
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

    /// Delete the subscriptions and topics of this queue, with their messages (missing ones are
    /// fine). For tests, sweeps and tear-down scripts.
    pub async fn delete_all(&self) -> Result<(), QueueError> {
        let c = self.clients().await?;
        let n = &self.ctx.names;
        for sub in [&n.subscription, &n.dead_subscription] {
            match c.subs.delete_subscription().set_subscription(sub).send().await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.ctx.rpc_error(&format!("subscription {sub}"), "deleting", &e)),
            }
        }
        for topic in [&n.topic, &n.dead_topic] {
            match c.topics.delete_topic().set_topic(topic).send().await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.ctx.rpc_error(&format!("topic {topic}"), "deleting", &e)),
            }
        }
        Ok(())
    }

    async fn ensure_topic(&self, c: &Clients, topic: &str) -> Result<(), QueueError> {
        match c.topics.create_topic().set_name(topic).send().await {
            Ok(_) => {
                info!(topic, "created Pub/Sub topic");
                Ok(())
            }
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(self.ctx.rpc_error(&format!("topic {topic}"), "creating", &e)),
        }
    }

    /// Create `want` unless it exists; an existing one on another topic is a conflict, other
    /// differences are updated (`check_all`: retry policy and ack deadline too).
    async fn ensure_subscription(&self, c: &Clients, want: Subscription, check_all: bool) -> Result<(), QueueError> {
        let name = want.name.clone();
        let what = format!("subscription {name}");
        match c.subs.create_subscription().with_request(want.clone()).send().await {
            Ok(_) => {
                info!(subscription = %name, topic = %want.topic, "created Pub/Sub subscription");
                return Ok(());
            }
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(self.ctx.rpc_error(&what, "creating", &e)),
        }
        let have = c
            .subs
            .get_subscription()
            .set_subscription(&name)
            .send()
            .await
            .map_err(|e| self.ctx.rpc_error(&what, "reading", &e))?;
        if have.topic != want.topic {
            return Err(QueueError::Conflict(format!(
                "{what} already exists on topic {:?}, not {:?}: delete it or use another queue name",
                have.topic, want.topic
            )));
        }
        self.converge(c, &have, want, check_all).await;
        Ok(())
    }

    /// Update the settings of `have` that differ from `want`; failures are logged (an existing
    /// subscription still works).
    async fn converge(&self, c: &Clients, have: &Subscription, want: Subscription, check_all: bool) {
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

    /// Check the work subscription once: `Ok(Some)` when it exists, `Ok(None)` when the service
    /// could not be reached, `Err(Missing)` when it does not exist.
    async fn probe(ctx: &Ctx, c: &Clients) -> Result<Option<Subscription>, Link> {
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
}

#[async_trait]
impl Queue for PubSub {
    async fn setup(&self) -> Result<(), QueueError> {
        let c = self.clients().await?;
        let n = &self.ctx.names;
        self.ensure_topic(&c, &n.topic).await?;
        self.ensure_topic(&c, &n.dead_topic).await?;
        // The dead-letter subscription first: messages published to a topic without any
        // subscription are dropped.
        let dead_sub = Subscription::new()
            .set_name(&n.dead_subscription)
            .set_topic(&n.dead_topic)
            .set_ack_deadline_seconds(self.ctx.opts.ack_deadline.as_secs() as i32);
        self.ensure_subscription(&c, dead_sub, false).await?;
        self.ensure_subscription(&c, self.ctx.desired_subscription(self.ctx.opts.max_attempts), true).await
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
        let c = self.clients().await?;
        let ctx = self.ctx.clone();
        let link = match PubSub::probe(&ctx, &c).await {
            Ok(Some(have)) => {
                self.converge(&c, &have, ctx.desired_subscription(opts.max_attempts), false).await;
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
        Ok(Box::new(PubSubConsumer { ctx, clients: c, rx, stop_tx, link, tokens, task: Some(task), stopped: false }))
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

// ---------------------------------------------------------------------------------------------
// Consuming

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

/// The background task that owns the stream (see "Consuming" and "Connection loss").
struct Pump {
    ctx: Arc<Ctx>,
    clients: Arc<Clients>,
    prefetch: usize,
    link: Arc<Mutex<Link>>,
    tokens: Arc<Mutex<Vec<ShutdownToken>>>,
}

/// What the pump's wait ended with (short-lived; its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Event {
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
                        match PubSub::probe(&self.ctx, &self.clients).await {
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

/// A consumer of `NAME-workers` (see the module docs).
struct PubSubConsumer {
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
struct PubSubAcker {
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
        let limit = self.ctx.opts.publish_timeout + Duration::from_secs(5);
        let outcome = match tokio::time::timeout(limit, self.dead.publish(msg)).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(self.ctx.publish_error(&topic, e)),
            Err(_) => Err(QueueError::Broker(format!("publishing to topic {topic}: no message id after {limit:?}"))),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pubsub_uris() {
        let (p, n, o) = parse_uri("pubsub://my-project/crops").unwrap();
        assert_eq!((p.as_str(), n.as_str()), ("my-project", "crops"));
        assert_eq!(o, PubSubOptions::default());
        let (_, _, o) = parse_uri(
            "pubsub://p1/a.b?batch_messages=50&batch_bytes=1000&batch_delay_ms=5&ack_deadline=20&max_attempts=7\
             &min_backoff=0.5&max_backoff=30&max_lease=600&publish_timeout=9",
        )
        .unwrap();
        assert_eq!(o.batch_messages, 50);
        assert_eq!(o.batch_bytes, 1000);
        assert_eq!(o.batch_delay, Duration::from_millis(5));
        assert_eq!(o.ack_deadline, Duration::from_secs(20));
        assert_eq!(o.max_attempts, 7);
        assert_eq!(o.min_backoff, Duration::from_millis(500));
        assert_eq!(o.max_backoff, Duration::from_secs(30));
        assert_eq!(o.max_lease, Duration::from_secs(600));
        assert_eq!(o.publish_timeout, Duration::from_secs(9));
        for bad in [
            "pubsub://p",
            "pubsub:///crops",
            "pubsub://P/crops",
            "pubsub://p/1crops",
            "pubsub://p/goog-x",
            "pubsub://p/ab",
            "pubsub://p/a/b",
            "pubsub://p/crops?ack_deadline=5",
            "pubsub://p/crops?max_attempts=101",
            "pubsub://p/crops?nope=1",
            "pubsub://p/crops?min_backoff=9&max_backoff=2",
        ] {
            let e = parse_uri(bad).unwrap_err();
            assert!(matches!(e, QueueError::InvalidUri { .. }), "{bad}: {e}");
        }
        assert!(parse_uri(&format!("pubsub://p/{}", "x".repeat(246))).is_ok());
        assert!(parse_uri(&format!("pubsub://p/{}", "x".repeat(247))).is_err());
    }

    #[test]
    fn derives_names_and_uris() {
        let n = Names::new("p", "crops");
        assert_eq!(n.topic, "projects/p/topics/crops");
        assert_eq!(n.subscription, "projects/p/subscriptions/crops-workers");
        assert_eq!(n.dead_topic, "projects/p/topics/crops-dead");
        assert_eq!(n.dead_subscription, "projects/p/subscriptions/crops-dead-sub");
        assert_eq!(
            uri_with_name("pubsub://p/crops?ack_deadline=10", "crops.p2t4").unwrap(),
            "pubsub://p/crops.p2t4?ack_deadline=10"
        );
        assert!(uri_with_name("pubsub://p/crops", "no/slash").is_err());
    }

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
