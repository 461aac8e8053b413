//! The service: the clients of one queue (built lazily, pointed at the emulator or at Google
//! Cloud with Application Default Credentials), hand-made REST calls, and turning service errors
//! into user-facing ones (see "Endpoint and credentials" in [`super`]).

use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::retry_policy::RetryableErrors;

use super::{Names, PubSubOptions, EMULATOR_ENV, SERVICE_ENDPOINT};
use crate::gcp;
use crate::queue::QueueError;

/// Attribute values are limited to 1024 bytes by the service.
pub(super) const MAX_ATTR: usize = 1024;
/// Per-attempt timeout of admin calls.
pub(super) const ADMIN_ATTEMPT: Duration = Duration::from_secs(10);
/// Overall limit of admin calls (retries included).
pub(super) const ADMIN_LIMIT: Duration = Duration::from_secs(30);
/// Limit of one reachability probe.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit of one REST call.
pub(super) const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// `http://HOST:PORT` from [`EMULATOR_ENV`], when it is set.
pub fn emulator_endpoint() -> Option<String> {
    gcp::emulator_host(EMULATOR_ENV)
}

pub(super) fn code_of(e: &google_cloud_pubsub::Error) -> Option<Code> {
    e.status().map(|s| s.code)
}

pub(super) fn is_not_found(e: &google_cloud_pubsub::Error) -> bool {
    code_of(e) == Some(Code::NotFound) || e.http_status_code() == Some(404)
}

pub(super) fn is_already_exists(e: &google_cloud_pubsub::Error) -> bool {
    code_of(e) == Some(Code::AlreadyExists) || e.http_status_code() == Some(409)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Everything needed to turn service errors into user-facing ones.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) uri: String,
    pub(super) names: Names,
    pub(super) opts: PubSubOptions,
    /// The emulator's endpoint (`http://HOST:PORT`), or `None` for the real service.
    pub(super) endpoint: Option<String>,
}

impl Ctx {
    pub(super) fn setup_hint(&self) -> String {
        format!(
            "run `cropfleet-producer setup --queue {}` (or `--results` for a results queue) to create the topics \
             and subscriptions",
            self.uri
        )
    }

    pub(super) fn missing(&self, what: String, e: impl std::fmt::Display) -> QueueError {
        QueueError::Missing { what, detail: format!("{}; the service said: {e}", self.setup_hint()) }
    }

    /// A user-facing error for a failed call about `what` (a resource name).
    pub(super) fn rpc_error(&self, what: &str, op: &str, e: &google_cloud_pubsub::Error) -> QueueError {
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

    pub(super) fn publish_error(&self, topic: &str, e: PublishError) -> QueueError {
        match e {
            PublishError::Rpc(e) => self.rpc_error(&format!("topic {topic}"), "publishing to", &e),
            other => QueueError::Broker(format!("publishing to topic {topic}: {other}")),
        }
    }
}

/// The clients of one queue, built on first use (connections are lazy: building never fails for
/// an unreachable endpoint).
pub(super) struct Clients {
    pub(super) topics: TopicAdmin,
    pub(super) subs: SubscriptionAdmin,
    pub(super) subscriber: Subscriber,
    pub(super) publisher: Publisher,
    pub(super) dead: Publisher,
    pub(super) http: reqwest::Client,
    /// Base URL of the REST API.
    pub(super) rest: String,
    /// Credentials for hand-made REST calls (`None` for the emulator).
    pub(super) rest_creds: Option<google_cloud_auth::credentials::Credentials>,
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
    pub(super) async fn build(ctx: &Ctx) -> Result<Clients, QueueError> {
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
    pub(super) async fn rest(
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
pub(super) enum RestError {
    NotFound(String),
    Other(String),
}
