//! The `pubsub://PROJECT/NAME[?options]` URI: project, queue name and [`PubSubOptions`], the
//! resource names derived from them, and the URI of a related queue.

use std::time::Duration;

use super::{MAX_DELIVERY_ATTEMPTS, MIN_DELIVERY_ATTEMPTS};
use crate::queue::QueueError;

/// Longest name accepted: `NAME-dead-sub` must fit the service's 255 characters.
pub(super) const MAX_NAME: usize = 246;
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
pub(super) fn check_name(name: &str) -> Result<(), String> {
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
}
