//! The Pub/Sub backend against the real Pub/Sub emulator.
//!
//! The emulator is the one `PUBSUB_EMULATOR_HOST` names; when that is unset, `scripts/emulators.sh
//! start` starts one (its `env` output gives the address), and without that script the tests
//! start a private emulator on a free port, which dies with the test process.
//! Every test uses its own queue name (`t<uuid>`) and deletes its topics and subscriptions.
//!
//! The emulator runs with the fix in `deploy/pubsub-emulator-fix`: without it, the emulator
//! 0.8.20 fails in its stream-close path (`NoSuchMethodError:
//! io.grpc.InternalStatus.asRuntimeException` in its log) and keeps dispatching messages to a
//! stream that was closed ("zombie streams"), so a killed consumer's messages never came back.
//! Still: one stream per subscription where possible, short ack deadlines (10 s), generous
//! receive timeouts, no exact attempt numbers on redeliveries.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

use cropfleet::queue::pubsub::{PubSub, ATTEMPT_ATTR, REASON_ATTR};
use cropfleet::queue::{Consumer, ConsumerOptions, Delivery, Queue, QueueError};

const PROJECT: &str = "cropfleet-test";
/// The emulator's launcher with the fix ahead of its jar (see the module docs).
const EMULATOR_RUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/pubsub-emulator-fix/run.sh");

// ---------------------------------------------------------------------------------------------
// Emulator

/// `HOST:PORT` of a running emulator (see the module docs).
fn emulator() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        install_recorder();
        if let Ok(h) = std::env::var("PUBSUB_EMULATOR_HOST") {
            if !h.trim().is_empty() {
                return h.trim().to_string();
            }
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/emulators.sh");
        let host = if script.exists() { from_script(&script) } else { None };
        let host = host.unwrap_or_else(start_private_emulator);
        wait_ready(&host, Duration::from_secs(90));
        host
    })
    .clone()
}

/// Start the emulators through the project script and read the address from its `env` output.
fn from_script(script: &Path) -> Option<String> {
    let start = Command::new("bash").arg(script).arg("start").stdout(Stdio::null()).status().ok()?;
    if !start.success() {
        eprintln!("{} start failed; starting a private emulator", script.display());
        return None;
    }
    let out = Command::new("bash").arg(script).arg("env").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let v = l.trim().trim_start_matches("export ").strip_prefix("PUBSUB_EMULATOR_HOST=")?;
        Some(v.trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private emulator on a free port, owned by a thread that lives as long as the process: the
/// emulator gets SIGKILL when that thread's process exits (`PR_SET_PDEATHSIG`).
fn start_private_emulator() -> String {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(EMULATOR_RUN);
        cmd.arg("--host=127.0.0.1").arg(format!("--port={port}"));
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting the Pub/Sub emulator");
        tx.send(()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap();
    eprintln!("started a private Pub/Sub emulator on {host}");
    host
}

fn wait_ready(host: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(host) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(start.elapsed() < limit, "the Pub/Sub emulator at {host} did not come up within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

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

fn unique(what: &str) -> String {
    format!("t{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh queue on the emulator; its resources are deleted when the fixture drops.
struct Fixture {
    uri: String,
    host: String,
}

impl Fixture {
    fn new(what: &str, query: &str) -> Fixture {
        let host = emulator();
        let q = if query.is_empty() { String::new() } else { format!("?{query}") };
        Fixture { uri: format!("pubsub://{PROJECT}/{}{q}", unique(what)), host }
    }

    fn queue(&self) -> PubSub {
        PubSub::from_uri(&self.uri).unwrap().with_emulator(&self.host)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let (uri, host) = (self.uri.clone(), self.host.clone());
        // Runs even while a failed test unwinds; a separate thread owns its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let q = PubSub::from_uri(&uri).unwrap().with_emulator(&host);
                let _ = tokio::time::timeout(Duration::from_secs(20), q.delete_all()).await;
            })
        })
        .join();
    }
}

fn opts(prefetch: usize, max_attempts: u32) -> ConsumerOptions {
    ConsumerOptions { prefetch, max_attempts, ..Default::default() }
}

/// The next delivery within `secs`, riding out `Err`s; panics on timeout.
async fn next_within(c: &mut Box<dyn Consumer>, secs: u64) -> Delivery {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        assert!(Instant::now() < deadline, "no delivery within {secs} s");
        match c.next(Duration::from_millis(500)).await {
            Ok(Some(d)) => return d,
            Ok(None) => {}
            Err(e) => {
                eprintln!("next(): {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Poll the dead letters until one with `payload` shows up, within `secs`.
async fn dead_letter_within(q: &PubSub, payload: &[u8], secs: u64) -> cropfleet::queue::DeadLetter {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let dead = q.dead_letters(100).await.unwrap();
        if let Some(d) = dead.iter().find(|d| d.payload == payload) {
            return d.clone();
        }
        if !dead.is_empty() {
            eprintln!("other dead letters: {dead:?}");
        }
        assert!(Instant::now() < deadline, "no dead letter {:?} within {secs} s", String::from_utf8_lossy(payload));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack() {
    let f = Fixture::new("ack", "");
    let q = f.queue();
    q.setup().await.unwrap();
    q.setup().await.unwrap(); // idempotent
    let payloads: Vec<Vec<u8>> = (0..5).map(|i| format!("task-{i}").into_bytes()).collect();
    let (ids, err) = q.publish_many_with_ids(&payloads).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(ids.len(), 5);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 5, "distinct message ids: {ids:?}");
    assert_eq!(q.publish_many(&payloads[..1]).await.0, 1);
    q.publish(b"single").await.unwrap();

    let mut c = q.consumer(opts(4, 5)).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 7 {
        let d = next_within(&mut c, 45).await;
        assert!(d.attempt >= 1);
        assert!(!d.id.is_empty());
        got.insert((String::from_utf8(d.payload.clone()).unwrap(), d.id.clone()));
        d.acker.ack().await.unwrap();
    }
    let bodies: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(bodies, ["single", "task-0", "task-0", "task-1", "task-2", "task-3", "task-4"]);
    // Acked: nothing comes back, not even after the ack deadline (10 s).
    if let Some(d) = c.next(Duration::from_secs(13)).await.unwrap() {
        panic!("acked message came back: {d:?}");
    }
    assert_eq!(q.depth().await.unwrap(), None);
    assert_eq!(q.backend(), "pubsub");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_with_a_higher_attempt() {
    let f = Fixture::new("nack", "min_backoff=0.2&max_backoff=1");
    let q = f.queue();
    q.setup().await.unwrap();
    q.publish(b"flaky").await.unwrap();
    let mut c = q.consumer(opts(2, 10)).await.unwrap();
    let first = next_within(&mut c, 45).await;
    assert_eq!(first.payload, b"flaky");
    let (id, a1) = (first.id.clone(), first.attempt);
    first.acker.retry(Duration::from_millis(200), "storage timed out").await.unwrap();
    let again = next_within(&mut c, 45).await;
    assert_eq!(again.payload, b"flaky");
    assert_eq!(again.id, id, "same message");
    assert!(again.attempt > a1, "attempt {} after {a1}", again.attempt);
    // release() also hands it back (counting a delivery: Pub/Sub cannot do otherwise).
    let a2 = again.attempt;
    again.acker.release().await.unwrap();
    let third = next_within(&mut c, 45).await;
    assert!(third.attempt > a2);
    third.acker.ack().await.unwrap();
    assert!(q.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_goes_to_the_dead_letter_topic_with_its_reason() {
    let f = Fixture::new("dead", "");
    let q = f.queue();
    q.setup().await.unwrap();
    q.publish(b"{not json").await.unwrap();
    q.publish(b"fine").await.unwrap();
    let mut c = q.consumer(opts(2, 5)).await.unwrap();
    for _ in 0..2 {
        let d = next_within(&mut c, 45).await;
        if d.payload == b"fine" {
            d.acker.ack().await.unwrap();
        } else {
            let long = format!("malformed JSON: {}", "x".repeat(3000));
            d.acker.dead_letter(&long).await.unwrap();
        }
    }
    let dead = dead_letter_within(&q, b"{not json", 30).await;
    assert!(dead.reason.starts_with("malformed JSON: xxx"), "{}", dead.reason);
    assert!(dead.reason.len() <= 1024, "reason cut to the attribute limit: {}", dead.reason.len());
    // Reading does not remove: it is still there.
    let again = q.dead_letters(10).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].payload, b"{not json");
    // The original was acked: it does not come back.
    if let Some(d) = c.next(Duration::from_secs(12)).await.unwrap() {
        panic!("dead-lettered message came back: {d:?}");
    }
    let _ = (REASON_ATTR, ATTEMPT_ATTR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_dead_letters_through_the_subscription_policy() {
    // The worker's max attempts (3) is clamped to the service's minimum, 5, which is what setup
    // created. (A different value would be written to the subscription by consumer(); the emulator
    // then keeps redelivering past it and never forwards the message: not tested here.)
    let f = Fixture::new("max", "min_backoff=0&max_backoff=0");
    let q = f.queue();
    q.setup().await.unwrap();
    q.publish(b"poison").await.unwrap();
    let mut c = q.consumer(opts(1, 3)).await.unwrap();
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "not dead-lettered; attempts seen: {attempts:?}");
        match c.next(Duration::from_secs(2)).await {
            Ok(Some(d)) => {
                attempts.push(d.attempt);
                d.acker.retry(Duration::ZERO, "still failing").await.unwrap();
            }
            Ok(None) => {
                if !q.dead_letters(10).await.unwrap().is_empty() {
                    break;
                }
            }
            Err(e) => eprintln!("next(): {e}"),
        }
    }
    let dead = dead_letter_within(&q, b"poison", 5).await;
    assert!(dead.reason.contains("delivered 5 times"), "{} (attempts seen {attempts:?})", dead.reason);
    assert!(attempts.len() <= 5, "{attempts:?}");
    assert_eq!(attempts.last().copied(), Some(5), "{attempts:?}");
}

/// Kills a child process when a test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run only as a child process of `a_dead_consumer_s_message_goes_to_another_after_the_ack_deadline`:
/// take one message, report it, and hang until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of another test"]
async fn child_holds_one_message() {
    let (Ok(uri), Ok(host)) = (std::env::var("CHILD_PUBSUB_URI"), std::env::var("CHILD_PUBSUB_HOST")) else {
        return;
    };
    let q = PubSub::from_uri(&uri).unwrap().with_emulator(&host);
    let mut c = q.consumer(opts(1, 100)).await.unwrap();
    let d = next_within(&mut c, 60).await;
    println!("GOT {} {}", d.id, d.attempt);
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(d);
}

/// Needs the emulator fix (see the module docs): the unfixed emulator keeps the dead
/// subscriber's stream and its messages leased for minutes (even a REST pull sees nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumer_s_message_goes_to_another_after_the_ack_deadline() {
    // max_attempts=100: the emulator may hand the message to the dead stream again a few times
    // (each counts a delivery); with 5 it could end in the dead-letter topic instead.
    let f = Fixture::new("died", "ack_deadline=10&max_attempts=100");
    let q = f.queue();
    q.setup().await.unwrap();
    q.publish(b"survivor").await.unwrap();
    let log = std::env::temp_dir().join(format!("cropfleet-pubsub-child-{}.log", uuid::Uuid::new_v4().simple()));
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holds_one_message", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CHILD_PUBSUB_URI", &f.uri)
        .env("CHILD_PUBSUB_HOST", &f.host)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        // libtest prints "test NAME ... " before the line, without a newline.
        BufReader::new(stdout).lines().map_while(Result::ok).find_map(|l| Some(l.split_once("GOT ")?.1.to_string()))
    });
    let line = match tokio::time::timeout(Duration::from_secs(90), line).await {
        Ok(Ok(Some(l))) => l,
        other => panic!(
            "the child did not report a message ({other:?}); its stderr:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    let _ = std::fs::remove_file(&log);
    let held_id = line.split_whitespace().next().unwrap().to_string();
    // The worker dies without settling anything.
    child.0.kill().unwrap();
    let _ = child.0.wait();
    let killed = Instant::now();
    let mut c = q.consumer(opts(1, 100)).await.unwrap();
    let d = next_within(&mut c, 150).await;
    assert_eq!(d.payload, b"survivor");
    assert_eq!(d.id, held_id);
    assert!(d.attempt >= 2, "a redelivery: attempt {}", d.attempt);
    eprintln!("redelivered {:.1} s after the kill, attempt {}", killed.elapsed().as_secs_f64(), d.attempt);
    d.acker.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_resources_without_setup_name_the_setup_command() {
    let f = Fixture::new("missing", "publish_timeout=10");
    let q = f.queue();
    let e = q.publish(b"x").await.unwrap_err();
    assert!(matches!(e, QueueError::Missing { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cropfleet-producer setup --queue pubsub://"), "{msg}");
    assert!(msg.contains("topic"), "{msg}");
    let (n, e) = q.publish_many(&[b"a".to_vec(), b"b".to_vec()]).await;
    assert_eq!(n, 0);
    assert!(matches!(e, Some(QueueError::Missing { .. })), "{e:?}");
    let e = q.consumer(opts(1, 5)).await.err().expect("no consumer without a subscription");
    assert!(matches!(e, QueueError::Missing { .. }) && e.to_string().contains("subscription"), "{e}");
    let e = q.dead_letters(5).await.unwrap_err();
    assert!(matches!(e, QueueError::Missing { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_returns_within_the_wait_when_the_endpoint_is_dead() {
    install_recorder();
    // Nothing listens on a closed port; a black hole accepts connections and never answers.
    let closed = format!("127.0.0.1:{}", free_port());
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    for host in [closed, hole_addr] {
        let q = PubSub::from_uri(&format!("pubsub://{PROJECT}/{}?publish_timeout=2", unique("deadend")))
            .unwrap()
            .with_emulator(&host);
        let t = Instant::now();
        let mut c = tokio::time::timeout(Duration::from_secs(15), q.consumer(opts(2, 5)))
            .await
            .expect("consumer() returns")
            .expect("a consumer even while the endpoint is down");
        assert!(t.elapsed() < Duration::from_secs(10), "consumer() took {:?}", t.elapsed());
        for wait in [Duration::from_millis(300), Duration::from_secs(2)] {
            let t = Instant::now();
            let r = c.next(wait).await;
            let took = t.elapsed();
            assert!(took < wait + Duration::from_millis(500), "{host}: next({wait:?}) took {took:?}");
            match r {
                Err(QueueError::Broker(m)) => assert!(m.contains("unreachable"), "{m}"),
                other => panic!("{host}: expected a Broker error, got {other:?}"),
            }
        }
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(20), q.publish(b"x")).await.expect("publish gives up");
        assert!(r.is_err(), "{host}: publish to a dead endpoint succeeded");
        assert!(t.elapsed() < Duration::from_secs(15), "publish took {:?}", t.elapsed());
        let t = Instant::now();
        c.stop().await;
        drop(c);
        assert!(t.elapsed() < Duration::from_secs(12), "stop + drop took {:?}", t.elapsed());
    }
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_still_lets_handed_out_messages_be_acked() {
    let f = Fixture::new("stop", "");
    let q = f.queue();
    q.setup().await.unwrap();
    q.publish(b"in-flight").await.unwrap();
    let mut c = q.consumer(opts(1, 5)).await.unwrap();
    let d = next_within(&mut c, 45).await;
    c.stop().await;
    assert!(c.next(Duration::from_millis(200)).await.unwrap().is_none());
    // The drain finishes after stop(): the ack still counts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.acker.ack().await.unwrap();
    drop(c);
    let mut c2 = q.consumer(opts(1, 5)).await.unwrap();
    if let Some(d) = c2.next(Duration::from_secs(14)).await.unwrap() {
        panic!("acked after stop() but came back: {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uris_open_through_the_generic_entry_point() {
    let q = cropfleet::queue::open("pubsub://p-1/crops?ack_deadline=20").await.unwrap();
    assert_eq!(q.backend(), "pubsub");
    let e = cropfleet::queue::open("pubsub://p-1/goog").await.err().expect("reserved name");
    assert!(matches!(e, QueueError::InvalidUri { .. }), "{e}");
}
