//! The RabbitMQ backend against the real broker at 127.0.0.1:5672 (guest/guest).
//!
//! If it is not running: `rabbitmq-server -detached && rabbitmqctl await_startup`.
//! Every test uses its own queue names (`cropfleet.test.<what>.<uuid>`) and deletes them, even
//! when it fails. The one test that restarts the broker (`rabbitmqctl stop_app`/`start_app`)
//! holds an exclusive `flock` on [`LOCK_PATH`]; every other test here holds it shared, so they
//! never see the restart. Other test suites that use the broker can take the same lock.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use cropfleet::queue::amqp::{self, Amqp, ATTEMPT_HEADER, REASON_HEADER};
use cropfleet::queue::{self, Consumer, ConsumerOptions, Delivery, Queue, QueueError};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Shared by every broker test here; exclusive while the broker is being restarted.
const LOCK_PATH: &str = "/tmp/cropfleet-rabbitmq-tests.lock";

// ---------------------------------------------------------------------------------------------
// Helpers

/// Holds the broker lock (shared or exclusive) and deletes the test's topology when dropped.
struct Fixture {
    name: String,
    _lock: std::fs::File,
}

impl Fixture {
    async fn new(what: &str, exclusive: bool) -> Fixture {
        install_recorder();
        let lock = tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new().create(true).append(true).open(LOCK_PATH).expect("lock file");
            let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
            // SAFETY: a valid open file descriptor.
            assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op) }, 0, "flock {LOCK_PATH}");
            f
        })
        .await
        .unwrap();
        let name = format!("cropfleet.test.{what}.{}", uuid::Uuid::new_v4().simple());
        Fixture { name, _lock: lock }
    }

    fn uri(&self) -> String {
        format!("{BROKER}?queue={}", self.name)
    }

    fn queue(&self) -> Amqp {
        Amqp::from_uri(&self.uri()).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let uri = self.uri();
        // Runs even while a failed test unwinds; a separate thread owns its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(20), Amqp::from_uri(&uri).unwrap().delete_topology())
                    .await;
            })
        })
        .join();
    }
}

/// Counts `cropfleet_reconnects_total` increments (process-wide).
static RECONNECTS: AtomicU64 = AtomicU64::new(0);

struct Hits;
impl metrics::CounterFn for Hits {
    fn increment(&self, v: u64) {
        RECONNECTS.fetch_add(v, Ordering::SeqCst);
    }
    fn absolute(&self, _: u64) {}
}

struct Recorder;
impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == cropfleet::telemetry::RECONNECTS {
            metrics::Counter::from_arc(Arc::new(Hits))
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn install_recorder() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = metrics::set_global_recorder(Recorder);
        if std::env::var_os("CROPFLEET_TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_env_filter("cropfleet=debug").with_test_writer().try_init();
        }
    });
}

fn opts(prefetch: usize, max_attempts: u32) -> ConsumerOptions {
    ConsumerOptions { prefetch, max_attempts, ..Default::default() }
}

/// The next delivery within `secs`, riding out `Err`s (a broker outage); panics on timeout.
async fn next_within(c: &mut Box<dyn Consumer>, secs: u64) -> (Delivery, usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut errors = 0;
    loop {
        assert!(Instant::now() < deadline, "no delivery within {secs} s ({errors} errors on the way)");
        match c.next(Duration::from_millis(500)).await {
            Ok(Some(d)) => return (d, errors),
            Ok(None) => {}
            Err(e) => {
                errors += 1;
                eprintln!("next(): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Assert nothing arrives for `ms`.
async fn assert_empty(c: &mut Box<dyn Consumer>, ms: u64) {
    if let Some(d) = c.next(Duration::from_millis(ms)).await.unwrap() {
        panic!("unexpected delivery {d:?}: {:?}", String::from_utf8_lossy(&d.payload));
    }
}

async fn raw_connection() -> lapin::Connection {
    lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672")
}

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl").args(args).output().await.expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{prefix}-{i:03}").into_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn uri_without_queue_is_invalid() {
    let e = queue::open("amqp://worker:s3cret@127.0.0.1:5672/%2f?heartbeat=5").await.err().expect("must fail");
    assert!(matches!(e, QueueError::InvalidUri { .. }), "{e:?}");
    assert!(e.to_string().contains("missing the queue name"), "{e}");
    assert!(!e.to_string().contains("s3cret"), "password leaked: {e}");
    let q = queue::open(&format!("{BROKER}?heartbeat=5&queue=x")).await.unwrap();
    assert_eq!(q.backend(), "rabbitmq");
}

#[tokio::test]
async fn publish_consume_ack_with_prefetch() {
    let fx = Fixture::new("basic", false).await;
    let q = queue::open(&fx.uri()).await.unwrap();
    q.setup().await.unwrap();
    q.setup().await.expect("setup is idempotent");
    let msgs = payloads("task", 3);
    let (n, err) = q.publish_many(&msgs).await;
    assert_eq!((n, err.map(|e| e.to_string())), (3, None));
    assert_eq!(q.depth().await.unwrap(), Some(3));

    let mut c = q.consumer(opts(2, 5)).await.unwrap();
    let (d1, _) = next_within(&mut c, 5).await;
    let (d2, _) = next_within(&mut c, 5).await;
    assert_eq!((d1.payload.as_slice(), d1.attempt), (msgs[0].as_slice(), 1));
    assert_eq!((d2.payload.as_slice(), d2.attempt), (msgs[1].as_slice(), 1));
    assert!(!d1.id.is_empty() && d1.id != d2.id);
    // prefetch 2: with both unacked the broker holds the third back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(q.depth().await.unwrap(), Some(1));
    assert_empty(&mut c, 300).await;
    d1.acker.ack().await.unwrap();
    let (d3, _) = next_within(&mut c, 5).await;
    assert_eq!(d3.payload, msgs[2]);
    d2.acker.ack().await.unwrap();
    d3.acker.ack().await.unwrap();
    assert_empty(&mut c, 300).await;
    assert_eq!(q.depth().await.unwrap(), Some(0));
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn retry_comes_back_after_the_delay_with_the_next_attempt() {
    let fx = Fixture::new("retry", false).await;
    let q = fx.queue();
    q.publish(b"flaky").await.unwrap();
    let mut c = q.consumer(opts(4, 5)).await.unwrap();
    let (d, _) = next_within(&mut c, 5).await;
    assert_eq!(d.attempt, 1);
    let id = d.id.clone();
    let t = Instant::now();
    d.acker.retry(Duration::from_millis(400), "storage 503").await.unwrap(); // bucket 500 ms
    assert_empty(&mut c, 300).await;
    let (d, _) = next_within(&mut c, 5).await;
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_secs(3), "came back after {waited:?}");
    assert_eq!((d.payload.as_slice(), d.attempt, d.id.as_str()), (&b"flaky"[..], 2, id.as_str()));
    // A zero delay goes straight back to the queue.
    d.acker.retry(Duration::ZERO, "again").await.unwrap();
    let (d, _) = next_within(&mut c, 5).await;
    assert_eq!(d.attempt, 3);
    d.acker.ack().await.unwrap();
    // The retry queue exists with its TTL, and is empty.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            q.names().retry(500).as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("retry queue NAME.retry.500");
    assert_eq!(r.message_count(), 0);
    let _ = conn.close(200, "ok".into()).await;
    assert_eq!(amqp::retry_bucket(Duration::from_millis(400)), Some(500));
}

#[tokio::test]
async fn dead_letter_lands_in_dead_queue_with_its_reason() {
    let fx = Fixture::new("dead", false).await;
    let q = fx.queue();
    let (n, _) = q.publish_many(&[b"poison".to_vec(), b"fine".to_vec()]).await;
    assert_eq!(n, 2);
    let mut c = q.consumer(opts(4, 5)).await.unwrap();
    let (poison, _) = next_within(&mut c, 5).await;
    let poison_id = poison.id.clone();
    poison.acker.dead_letter("corrupt image: premature end of JPEG data").await.unwrap();
    // The queue is not stalled behind the poison message.
    let (fine, _) = next_within(&mut c, 5).await;
    assert_eq!(fine.payload, b"fine");
    fine.acker.ack().await.unwrap();
    assert_empty(&mut c, 300).await;
    for _ in 0..2 {
        // Reading dead letters leaves them in place.
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].payload, b"poison");
        assert_eq!(dead[0].id, poison_id);
        assert_eq!(dead[0].reason, "corrupt image: premature end of JPEG data");
    }
    assert_eq!(q.depth().await.unwrap(), Some(0));
    // It is a real message in NAME.dead, with the reason header.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let m = ch.basic_get(q.names().dead.as_str().into(), Default::default()).await.unwrap().expect("in NAME.dead");
    let headers = m.delivery.properties.headers().clone().unwrap();
    let reason = headers.inner().get(REASON_HEADER).and_then(AMQPValue::as_long_string).map(|s| s.to_string());
    assert_eq!(reason.as_deref(), Some("corrupt image: premature end of JPEG data"));
    assert!(headers.inner().contains_key(ATTEMPT_HEADER));
    let _ = conn.close(200, "ok".into()).await;
}

#[tokio::test]
async fn unroutable_publish_is_an_error() {
    let fx = Fixture::new("noroute", false).await;
    let q = fx.queue();
    q.publish(b"before").await.unwrap();
    // Delete the queue behind the publisher's back: its connection stays up, so the next
    // publish is unroutable rather than re-declaring.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(fx.name.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = conn.close(200, "ok".into()).await;
    let e = q.publish(b"lost?").await.expect_err("an unroutable publish must fail");
    let text = e.to_string();
    assert!(text.contains("NO_ROUTE") && text.contains("unroutable"), "{text}");
    let (n, err) = q.publish_many(&payloads("batch", 3)).await;
    assert_eq!(n, 0);
    assert!(err.expect("error").to_string().contains("NO_ROUTE"));
    // `setup` re-declares, and publishing works again.
    q.setup().await.unwrap();
    let q2 = fx.queue(); // a fresh connection declares on connect
    q2.publish(b"after").await.unwrap();
    assert_eq!(q2.depth().await.unwrap(), Some(1));
}

#[tokio::test]
async fn publish_many_counts_only_confirmed_messages() {
    let fx = Fixture::new("limit", false).await;
    let q = fx.queue();
    q.setup().await.unwrap();
    // A policy (not queue arguments, so no conflict): at most 2 messages, refuse the rest.
    let policy = format!("{}.policy", fx.name);
    let pattern = format!("^{}$", regex_escape(&fx.name));
    rabbitmqctl(&[
        "set_policy",
        &policy,
        &pattern,
        r#"{"max-length":2,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ])
    .await;
    let t = Instant::now();
    while !rabbitmqctl(&["list_queues", "name", "policy", "--no-table-headers"]).await.contains(&policy) {
        assert!(t.elapsed() < Duration::from_secs(10), "policy never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (n, err) = q.publish_many(&payloads("m", 5)).await;
    rabbitmqctl(&["clear_policy", &policy]).await;
    let err = err.expect("the third message must be refused");
    assert_eq!(n, 2, "confirmed count; error: {err}");
    assert!(err.to_string().contains("nacked"), "{err}");
    assert_eq!(q.depth().await.unwrap(), Some(2));
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c == '.' { vec!['\\', '.'] } else { vec![c] }).collect()
}

#[tokio::test]
async fn conflicting_declaration_is_a_clear_conflict() {
    let fx = Fixture::new("conflict", false).await;
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("somebody.elses.dlx".into()));
    ch.queue_declare(fx.name.as_str().into(), QueueDeclareOptions::durable(), args).await.unwrap();
    let _ = conn.close(200, "ok".into()).await;

    let q = fx.queue();
    for attempt in 0..2 {
        let e = q.setup().await.expect_err("must conflict");
        let text = e.to_string();
        assert!(matches!(e, QueueError::Conflict(_)), "attempt {attempt}: {e:?}");
        assert!(
            text.contains(&format!("queue '{}'", fx.name))
                && text.contains("x-dead-letter-exchange")
                && text.contains("somebody.elses.dlx")
                && text.contains(&format!("{}.dlx", fx.name)),
            "{text}"
        );
    }
    let e = q.publish(b"x").await.expect_err("publish declares too");
    assert!(matches!(e, QueueError::Conflict(_)), "{e:?}");
    let e = q.consumer(opts(1, 5)).await.err().expect("consumer declares too");
    assert!(matches!(e, QueueError::Conflict(_)), "{e:?}");
}

#[tokio::test]
async fn unacked_messages_of_a_dead_consumer_are_redelivered_and_counted() {
    let fx = Fixture::new("redeliver", false).await;
    let q = fx.queue();
    let msgs = payloads("job", 3);
    assert_eq!(q.publish_many(&msgs).await.0, 3);
    let mut a = q.consumer(opts(10, 5)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_within(&mut a, 5).await.0);
    }
    // Consumer B is idle while A holds everything.
    let mut b = q.consumer(opts(10, 5)).await.unwrap();
    assert_empty(&mut b, 300).await;
    // A "dies": its connection closes with three unacked messages.
    drop(a);
    drop(held);
    let mut got = BTreeSet::new();
    for _ in 0..3 {
        let (d, _) = next_within(&mut b, 10).await;
        assert_eq!(d.attempt, 2, "a redelivery counts as an attempt");
        got.insert(d.payload.clone());
        d.acker.ack().await.unwrap();
    }
    assert_eq!(got, msgs.into_iter().collect());
    assert_empty(&mut b, 300).await;
    assert!(q.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_message_whose_worker_keeps_dying_is_dead_lettered() {
    let fx = Fixture::new("crashy", false).await;
    let q = fx.queue();
    q.publish(b"crashy").await.unwrap();
    for attempt in 1..=2 {
        let mut c = q.consumer(opts(1, 2)).await.unwrap();
        let (d, _) = next_within(&mut c, 10).await;
        assert_eq!(d.attempt, attempt);
        drop(c);
        drop(d); // never settled: as if the process was killed
    }
    let mut c = q.consumer(opts(1, 2)).await.unwrap();
    assert_empty(&mut c, 1000).await;
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"crashy");
    assert!(dead[0].reason.contains("delivered 2 times without being settled"), "{}", dead[0].reason);
}

#[tokio::test]
async fn release_and_stop_hand_messages_back_without_counting() {
    let fx = Fixture::new("stop", false).await;
    let q = fx.queue();
    let msgs = payloads("s", 5);
    assert_eq!(q.publish_many(&msgs).await.0, 5);
    let mut a = q.consumer(opts(5, 5)).await.unwrap();
    let (first, _) = next_within(&mut a, 5).await;
    let (second, _) = next_within(&mut a, 5).await;
    first.acker.release().await.unwrap();
    // Shutdown: stop consuming; the three prefetched but never handed out go back at once.
    a.stop().await;
    assert_empty(&mut a, 200).await;
    // A message handed out before stop() can still be settled.
    assert_eq!(second.attempt, 1);
    second.acker.ack().await.unwrap();
    let mut b = q.consumer(opts(5, 5)).await.unwrap();
    let mut got = BTreeSet::new();
    for _ in 0..4 {
        let (d, _) = next_within(&mut b, 5).await;
        assert_eq!(d.attempt, 1, "released/stopped messages keep their attempt: {:?}", d);
        got.insert(d.payload.clone());
        d.acker.ack().await.unwrap();
    }
    let want: BTreeSet<Vec<u8>> = msgs.into_iter().filter(|m| *m != second.payload).collect();
    assert_eq!(got, want);
    assert_empty(&mut b, 300).await;
}

/// The pid of every broker connection whose name mentions `needle`.
async fn connections_named(needle: &str) -> Vec<String> {
    rabbitmqctl(&["list_connections", "pid", "client_properties", "--no-table-headers"])
        .await
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn consumer_reconnects_after_its_connection_is_closed() {
    let fx = Fixture::new("reconnect", false).await;
    let q = fx.queue();
    assert_eq!(q.publish_many(&payloads("r", 2)).await.0, 2);
    let mut c = q.consumer(opts(1, 5)).await.unwrap();
    let (held, _) = next_within(&mut c, 5).await;
    let before = RECONNECTS.load(Ordering::SeqCst);
    let pids = connections_named(&format!("cropfleet consumer {} ", fx.name)).await;
    assert_eq!(pids.len(), 1, "{pids:?}");
    rabbitmqctl(&["close_connection", &pids[0], "test: simulated network failure"]).await;
    // Settling a delivery from the dead connection is not an error: the broker redelivers it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.acker.ack().await.expect("ack after the connection died is logged, not an error");
    let mut got = Vec::new();
    for _ in 0..2 {
        let (d, _) = next_within(&mut c, 20).await;
        got.push((d.payload.clone(), d.attempt));
        d.acker.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, vec![(b"r-000".to_vec(), 2), (b"r-001".to_vec(), 1)]);
    assert!(RECONNECTS.load(Ordering::SeqCst) > before, "the reconnect was not counted");
    // The publisher survives the same treatment.
    let pids = connections_named(&format!("cropfleet publisher {} ", fx.name)).await;
    assert_eq!(pids.len(), 1, "{pids:?}");
    rabbitmqctl(&["close_connection", &pids[0], "test: simulated network failure"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    q.publish(b"after").await.expect("publish reconnects");
    let (d, _) = next_within(&mut c, 10).await;
    assert_eq!(d.payload, b"after");
    d.acker.ack().await.unwrap();
}

/// Starts the broker app again if the restart test fails half-way.
struct StartAppOnDrop;
impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test]
async fn consumer_and_publisher_ride_out_a_broker_restart() {
    let fx = Fixture::new("restart", true).await;
    let q = Arc::new(fx.queue());
    let msgs = payloads("t", 20);
    assert_eq!(q.publish_many(&msgs).await.0, 20);
    let mut c = q.consumer(opts(4, 10)).await.unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let (d, _) = next_within(&mut c, 5).await;
        seen.insert(d.payload.clone());
        d.acker.ack().await.unwrap();
    }
    let (held, _) = next_within(&mut c, 5).await; // in flight across the restart
    let before = RECONNECTS.load(Ordering::SeqCst);

    let _restart_guard = StartAppOnDrop;
    rabbitmqctl(&["stop_app"]).await;
    // Publishing during the outage waits for the broker instead of failing.
    let publisher = {
        let q = q.clone();
        tokio::spawn(async move { q.publish(b"during-outage").await })
    };
    let mut errors = 0;
    for _ in 0..4 {
        if c.next(Duration::from_millis(500)).await.is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0, "next() should report the outage");
    held.acker.ack().await.expect("settling a delivery from the dead connection is not an error");
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;

    publisher.await.unwrap().expect("publish across the restart");
    let mut extra = 0;
    let t = Instant::now();
    while seen.len() < 21 {
        assert!(t.elapsed() < Duration::from_secs(60), "only {} of 21 after the restart", seen.len());
        let (d, _) = next_within(&mut c, 30).await;
        if !seen.insert(d.payload.clone()) {
            extra += 1; // at least once: a redelivery of something already acked is allowed
        }
        d.acker.ack().await.unwrap();
    }
    let mut want: BTreeSet<Vec<u8>> = msgs.into_iter().collect();
    want.insert(b"during-outage".to_vec());
    assert_eq!(seen, want, "every message survived ({extra} duplicates)");
    assert_empty(&mut c, 500).await;
    assert!(RECONNECTS.load(Ordering::SeqCst) >= before + 2, "consumer and publisher reconnects are counted");
}
