//! Topology: the names of everything one queue uses on the broker, the retry bucket of a delay,
//! and the idempotent declarations (see "Topology" in the module docs of [`super`]).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

use super::connection::{fault, on_temp_channel, Fault};
use super::RETRY_BUCKETS_MS;

/// The names of everything one cropfleet queue uses on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The work queue, `NAME`.
    pub queue: String,
    /// The dead-letter exchange, `NAME.dlx` (fanout).
    pub dlx: String,
    /// The dead-letter queue, `NAME.dead`.
    pub dead: String,
}

impl Names {
    /// Names derived from the work queue's name.
    pub fn new(queue: &str) -> Names {
        Names { queue: queue.to_string(), dlx: format!("{queue}.dlx"), dead: format!("{queue}.dead") }
    }

    /// The retry queue of one delay bucket: `NAME.retry.<ms>`.
    pub fn retry(&self, bucket_ms: u64) -> String {
        format!("{}.retry.{bucket_ms}", self.queue)
    }
}

/// The retry bucket for `delay`: the smallest bucket at least as long, or the largest one;
/// `None` for a zero delay (republished straight to `NAME`).
pub fn retry_bucket(delay: Duration) -> Option<u64> {
    let ms = delay.as_millis();
    if ms == 0 {
        return None;
    }
    let last = *RETRY_BUCKETS_MS.last().expect("buckets");
    Some(RETRY_BUCKETS_MS.iter().copied().find(|&b| u128::from(b) >= ms).unwrap_or(last))
}

pub(super) fn str_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub(super) fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

/// Declare `NAME`, `NAME.dlx` and `NAME.dead`, idempotently.
pub(super) async fn declare_topology(conn: &Connection, n: &Names) -> Result<(), Fault> {
    on_temp_channel(conn, |ch| async move {
        let cn = Some(conn);
        ch.exchange_declare(n.dlx.as_str().into(), ExchangeKind::Fanout, durable_exchange(), FieldTable::default())
            .await
            .map_err(|e| fault(&format!("exchange '{}'", n.dlx), &e, cn))?;
        ch.queue_declare(n.dead.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(|e| fault(&format!("queue '{}'", n.dead), &e, cn))?;
        ch.queue_bind(
            n.dead.as_str().into(),
            n.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fault(&format!("binding '{}' to '{}'", n.dead, n.dlx), &e, cn))?;
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), str_arg(&n.dlx));
        ch.queue_declare(n.queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| fault(&format!("queue '{}'", n.queue), &e, cn))?;
        Ok(())
    })
    .await
}

/// Declare the retry queue of one bucket.
pub(super) async fn declare_retry(conn: &Connection, n: &Names, bucket_ms: u64) -> Result<(), Fault> {
    let name = n.retry(bucket_ms);
    on_temp_channel(conn, |ch| async move {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(bucket_ms as i32));
        args.insert("x-dead-letter-exchange".into(), str_arg(""));
        args.insert("x-dead-letter-routing-key".into(), str_arg(&n.queue));
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| fault(&format!("queue '{name}'"), &e, Some(conn)))?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_buckets() {
        assert_eq!(retry_bucket(Duration::ZERO), None);
        assert_eq!(retry_bucket(Duration::from_millis(1)), Some(100));
        assert_eq!(retry_bucket(Duration::from_millis(500)), Some(500));
        assert_eq!(retry_bucket(Duration::from_millis(501)), Some(1_000));
        assert_eq!(retry_bucket(Duration::from_secs(60)), Some(60_000));
        assert_eq!(retry_bucket(Duration::from_secs(86_400)), Some(600_000));
        assert_eq!(Names::new("q").retry(500), "q.retry.500");
    }
}
