//! Chaos suite (issue 7), one test per queue backend (spool, RabbitMQ, Pub/Sub emulator) and
//! storage (local disk, Cloud Storage emulator): N valid tasks and every kind of poison message,
//! interleaved, are processed by 3 real workers while the test SIGKILLs workers (restarting
//! them), restarts the broker, makes storage unreachable for a few seconds and sends SIGTERM to
//! one worker. Then a checker in the spirit of Jepsen's compares what exists against what must:
//!
//! - every valid task has exactly its crops under their deterministic names (lost = 0) and there
//!   is nothing else under the output prefix, nor anywhere an escaping task could write
//!   (unexpected = 0);
//! - result events, deduplicated by task id, cover every valid task and nothing else; events
//!   delivered more than once are counted as duplicate events;
//! - every poison message is in the dead-letter destination with the reason expected for its kind
//!   (M of M) and no valid task is;
//! - no worker exited except by our signals (the SIGTERMed one drained and exited 0), and each
//!   worker's peak RSS (from `wait4`) stays under [`RSS_BOUND_MIB`].
//!
//! A one-line summary goes to stdout (and is appended to `CROPFLEET_CHAOS_SUMMARY` when set).
//! `CROPFLEET_CHAOS_TASKS` sets N (default [`DEFAULT_TASKS`]; `scripts/chaos.sh` runs 200).
//!
//! Faults per backend:
//! - storage outage: local disk — the output prefix is a symlink, atomically repointed to a
//!   vanished volume (a dangling path) for a few seconds, so writes fail the way they do when a
//!   mount goes away; Cloud Storage — the workers reach the emulator through a fault proxy that
//!   is cut (connections reset) for a few seconds;
//! - broker restart: RabbitMQ over TLS (`rabbitmq_tls_local`) — the same on its own TLS node;
//!   RabbitMQ — `rabbitmqctl stop_app` / `start_app` (holding the broker lock
//!   exclusively for just that); spool — none (there is no broker: "n/a"); Pub/Sub — the
//!   emulator keeps everything in memory, so a real restart would lose every topic and message:
//!   it is simulated as a connection outage through the proxy the workers use.
//! - Pub/Sub and SIGKILL: the emulator needs the fix in `deploy/pubsub-emulator-fix` (which
//!   `scripts/emulators.sh` applies): as shipped (0.8.20) it keeps a closed subscriber stream and
//!   strands its messages, see `pubsub_fleet.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::poison::{self, Poison, PoisonInputs};
use common::proxy::Proxy;
use common::tls_broker::TlsBroker;
use common::*;
use cropfleet::gcp;
use cropfleet::queue::amqp::Amqp;
use cropfleet::queue::pubsub::PubSub;
use cropfleet::queue::{self, Consumer, ConsumerOptions};
use cropfleet::storage::gcs::{GcsOptions, GcsStore};
use cropfleet::storage::{Location, Storage};
use cropfleet::task::ResultEvent;

/// Valid tasks when `CROPFLEET_CHAOS_TASKS` is unset (CI size).
const DEFAULT_TASKS: usize = 30;
/// Crops per valid task (800x600 source).
const CROPS: usize = 48;
/// The workers' `--max-crops` (the "too many crops" poison has one more).
const MAX_CROPS: usize = 64;
const WORKERS: usize = 3;
/// Peak resident set size allowed per worker process.
const RSS_BOUND_MIB: u64 = 300;
/// How long storage and (simulated) broker outages last.
const OUTAGE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Spool,
    Rabbit,
    RabbitTls,
    PubSub,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Local,
    Gcs,
}

#[test]
fn spool_local() {
    chaos(Backend::Spool, Store::Local);
}

#[test]
fn spool_gcs() {
    chaos(Backend::Spool, Store::Gcs);
}

#[test]
fn rabbitmq_local() {
    chaos(Backend::Rabbit, Store::Local);
}

#[test]
fn rabbitmq_gcs() {
    chaos(Backend::Rabbit, Store::Gcs);
}

/// RabbitMQ over `amqps://` (a TLS-only node that requires a client certificate, see
/// `common/tls_broker.rs`): the broker restart is that node's `stop_app`/`start_app`.
#[test]
fn rabbitmq_tls_local() {
    chaos(Backend::RabbitTls, Store::Local);
}

#[test]
fn pubsub_local() {
    chaos(Backend::PubSub, Store::Local);
}

#[test]
fn pubsub_gcs() {
    chaos(Backend::PubSub, Store::Gcs);
}

fn tasks_wanted() -> usize {
    std::env::var("CROPFLEET_CHAOS_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TASKS)
}

/// How one worker process ended (`slot` and `pid` show in failure messages).
#[derive(Debug)]
#[allow(dead_code)]
struct Ended {
    slot: usize,
    pid: i32,
    /// The signal we sent it, if any.
    sent: Option<i32>,
    /// Raw wait status.
    status: i32,
    rss_kib: u64,
}

impl Ended {
    /// Whether it ended the way our signal (or a clean exit when asked) explains.
    fn expected(&self) -> bool {
        match self.sent {
            Some(libc::SIGKILL) => libc::WIFSIGNALED(self.status) && libc::WTERMSIG(self.status) == libc::SIGKILL,
            Some(_) => libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0,
            None => false,
        }
    }
}

/// Three worker slots; each slot's process can be killed and replaced.
struct Workers {
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    slots: Vec<Option<Child>>,
    started: usize,
    ended: Vec<Ended>,
}

impl Workers {
    fn start(&mut self, slot: usize) {
        let n = self.started;
        self.started += 1;
        let log = std::fs::File::create(self.dir.join(format!("worker-{n}.log"))).unwrap();
        let child = Command::new(bin("cropfleet-worker"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,cropfleet::worker=debug") // each task received and done, for a failure's story
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.slots[slot] = Some(child);
    }

    /// Reap a process with `wait4` (for its own rusage); `None` if it is still running.
    fn reap(pid: i32, block: bool) -> Option<(i32, u64)> {
        let mut status = 0;
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if block { 0 } else { libc::WNOHANG };
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        (r == pid).then_some((status, ru.ru_maxrss as u64))
    }

    /// Send `sig` to a slot's process and reap it (SIGTERM: it drains first, within a deadline).
    /// Reaped with `wait4`, not `Child::wait`.
    #[allow(clippy::zombie_processes)]
    fn stop(&mut self, slot: usize, sig: i32) -> &Ended {
        let child = self.slots[slot].take().expect("slot running");
        let pid = child.id() as i32;
        unsafe { libc::kill(pid, sig) };
        let t = Instant::now();
        let (status, rss_kib) = loop {
            if let Some(r) = Workers::reap(pid, false) {
                break r;
            }
            if t.elapsed() > Duration::from_secs(90) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let (s, r) = Workers::reap(pid, true).unwrap();
                break (s | 0x10000, r); // never "expected"
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.ended.push(Ended { slot, pid, sent: Some(sig), status, rss_kib });
        self.ended.last().unwrap()
    }

    /// Reap processes that exited by themselves (crashes), restarting their slots.
    fn check(&mut self) {
        for slot in 0..self.slots.len() {
            let Some(pid) = self.slots[slot].as_ref().map(|c| c.id() as i32) else { continue };
            if let Some((status, rss_kib)) = Workers::reap(pid, false) {
                self.slots[slot] = None;
                self.ended.push(Ended { slot, pid, sent: None, status, rss_kib });
                self.start(slot);
            }
        }
    }

    fn logs(&self) -> String {
        let all: String = (0..self.started)
            .map(|n| std::fs::read_to_string(self.dir.join(format!("worker-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let interesting: Vec<&str> = all.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        let tail = interesting.len().saturating_sub(60);
        interesting[tail..].join("\n")
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in self.slots.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Result events read so far, by task id.
struct Results {
    consumer: Box<dyn Consumer>,
    events: usize,
    by_id: BTreeMap<String, usize>,
}

impl Results {
    /// Read (and ack) whatever arrives within `time`, returning early once nothing comes for
    /// a short while.
    async fn drain(&mut self, time: Duration) {
        let t = Instant::now();
        while t.elapsed() < time {
            match self.consumer.next(Duration::from_millis(100)).await {
                Ok(Some(d)) => {
                    let ev = ResultEvent::parse(&d.payload).expect("result events parse");
                    self.events += 1;
                    *self.by_id.entry(ev.task_id).or_default() += 1;
                    let _ = d.acker.ack().await;
                }
                Ok(None) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Deletes the test's broker topology, even when it fails.
struct Cleanup(Backend, Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for u in &self.1 {
                let _ = tokio::time::timeout(Duration::from_secs(20), async {
                    match self.0 {
                        Backend::Rabbit => drop(Amqp::from_uri(u).unwrap().delete_topology().await),
                        Backend::PubSub => drop(PubSub::from_uri(u).unwrap().delete_all().await),
                        // The TLS node and everything on it go away with the test.
                        Backend::Spool | Backend::RabbitTls => {}
                    }
                })
                .await;
            }
        });
    }
}

/// Repoint a symlink atomically (rename over it).
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("swap");
    let _ = std::fs::remove_file(&tmp);
    symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

fn files_under(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

fn chaos(backend: Backend, store: Store) {
    let n = tasks_wanted();
    let label = format!(
        "{}/{}",
        match backend {
            Backend::Spool => "spool",
            Backend::Rabbit => "rabbitmq",
            Backend::RabbitTls => "rabbitmq-tls",
            Backend::PubSub => "pubsub",
        },
        match store {
            Store::Local => "local",
            Store::Gcs => "gcs",
        }
    );
    let t0 = Instant::now();
    // First declared, last dropped: the TLS node outlives every client of it.
    let tls_broker = (backend == Backend::RabbitTls).then(TlsBroker::start);
    let worker_bin = bin("cropfleet-worker");
    eprintln!("{label}: binaries ready after {:.1} s ({})", t0.elapsed().as_secs_f64(), worker_bin.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uid = uuid::Uuid::new_v4().simple().to_string();
    let tag = format!("chaos{}", &uid[..8]);
    let mut worker_env: Vec<(String, String)> = Vec::new();

    // Storage: the test's own view (straight to the emulator) and the workers' (through a proxy).
    let mut storage = Storage::local_only();
    let mut gcs_proxy = None;
    let mut bucket = String::new();
    if store == Store::Gcs {
        let endpoint = gcp::endpoint_url(&emulator_var(gcp::STORAGE_EMULATOR_HOST));
        let gcs = GcsStore::new(GcsOptions::emulator(&endpoint));
        bucket = format!("cf-chaos-{uid}");
        rt.block_on(gcs.create_bucket(&bucket)).unwrap();
        storage = storage.with_gcs(Arc::new(gcs));
        let p = Proxy::start_to(&endpoint);
        worker_env.push((gcp::STORAGE_EMULATOR_HOST.into(), format!("http://{}", p.addr())));
        gcs_proxy = Some(p);
    }
    let src = |name: &str| match store {
        Store::Local => d.join("src").join(name).display().to_string(),
        Store::Gcs => format!("gs://{bucket}/src/{name}"),
    };
    let put = |name: &str, bytes: Vec<u8>| {
        let uri = src(name);
        rt.block_on(storage.put(&Location::parse(&uri).unwrap(), bytes)).unwrap();
        uri
    };
    let w = workload(&d.join("sample"), CROPS);
    let image_bytes = std::fs::read(&w.image).unwrap();
    let image = put("photo.jpg", image_bytes.clone());
    let crops = put("crops.csv", std::fs::read(&w.crops).unwrap());
    // Local outputs go through a symlink that the storage outage repoints.
    let out_real = d.join("out.real");
    let out_link = d.join("out");
    let output = match store {
        Store::Local => {
            std::fs::create_dir_all(&out_real).unwrap();
            symlink(&out_real, &out_link).unwrap();
            out_link.display().to_string()
        }
        Store::Gcs => format!("gs://{bucket}/out"),
    };

    // Queues.
    let mut pubsub_proxy = None;
    let (tasks_uri, results_uri) = match backend {
        Backend::Spool => {
            (format!("spool:{}", d.join("tasks").display()), format!("spool:{}", d.join("results").display()))
        }
        Backend::Rabbit => (
            amqp_uri(&format!("chaos-{}", label.replace('/', "-"))),
            amqp_uri(&format!("chaos-{}-results", label.replace('/', "-"))),
        ),
        Backend::RabbitTls => {
            let b = tls_broker.as_ref().unwrap();
            (b.uri("chaos-tls", ""), b.uri("chaos-tls-results", ""))
        }
        Backend::PubSub => {
            let host = emulator_var(gcp::PUBSUB_EMULATOR_HOST);
            let p = Proxy::start_to(&host);
            worker_env.push((gcp::PUBSUB_EMULATOR_HOST.into(), p.addr().to_string()));
            pubsub_proxy = Some(p);
            let opts = "ack_deadline=10&max_attempts=100";
            (
                format!("pubsub://cropfleet-test/chaos-{uid}?{opts}"),
                format!("pubsub://cropfleet-test/chaos-{uid}.results?{opts}"),
            )
        }
    };
    let _cleanup = Cleanup(backend, vec![tasks_uri.clone(), results_uri.clone()]);
    let mut shared_lock = (backend == Backend::Rabbit).then(|| broker_lock(false));
    run_ok("cropfleet-producer", &["setup", "--queue", &tasks_uri, "--results", &results_uri]);

    // N valid tasks and M poison messages, interleaved.
    let mut put_mut = put;
    let poison: Vec<Poison> = poison::all(PoisonInputs {
        image: &image,
        image_bytes: &image_bytes,
        crops: &crops,
        output: &output,
        missing: &src("does-not-exist.jpg"),
        max_crops: MAX_CROPS,
        put: &mut put_mut,
        tag: &tag,
    });
    let m = poison.len();
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i:06}")).collect();
    // The faults (in this order), each while a wave of tasks is being worked on.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        Kill(usize),
        Term(usize),
        Storage,
        Broker,
    }
    let mut plan: Vec<Fault> = vec![
        Fault::Kill(0),
        Fault::Storage,
        Fault::Kill(1),
        Fault::Broker,
        Fault::Kill(2),
        Fault::Term(0),
        Fault::Kill(1),
    ];
    if backend == Backend::Spool {
        plan.retain(|f| !matches!(f, Fault::Broker));
    }
    // Tasks are enqueued in waves, one more than faults, as a producer would keep enqueueing: a
    // fault strikes once a third of the current wave is done, then the next wave goes out, so
    // every fault hits a fleet with work in hand however fast it runs. Poison is spread evenly.
    let waves_n = plan.len() + 1;
    assert!(n >= waves_n, "{n} tasks cannot fill {waves_n} waves");
    // Sizes that differ by one at most, so no wave is empty (30 tasks in waves of 5 left the
    // seventh of 7 empty, and the last fault struck an idle fleet).
    let wave_size = |k: usize| n / waves_n + usize::from(k < n % waves_n);
    let every = (n / m).max(1);
    let mut pi = poison.iter();
    let mut waves: Vec<(usize, Vec<Vec<u8>>)> = vec![(0, Vec::new())];
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if waves.last().unwrap().0 == wave_size(waves.len() - 1) {
            waves.push((0, Vec::new()));
        }
        let wave = waves.last_mut().unwrap();
        let t = serde_json::json!({"v": 1, "id": id, "run_id": tag, "image": image, "crops": crops, "output": output});
        wave.0 += 1;
        wave.1.push(t.to_string().into_bytes());
        if (i + 1) % every == 0 {
            if let Some(p) = pi.next() {
                wave.1.push(p.payload.clone());
            }
        }
    }
    waves.last_mut().unwrap().1.extend(pi.map(|p| p.payload.clone()));
    for w in &waves {
        payloads.extend(w.1.iter().cloned());
    }
    let tasks_q = rt.block_on(queue::open(&tasks_uri)).unwrap();
    let mut waves = waves.into_iter();
    let mut publish_wave = |published: &mut usize, current: &mut usize| {
        if let Some((valid, msgs)) = waves.next() {
            let (sent, err) = rt.block_on(tasks_q.publish_many(&msgs));
            assert!(err.is_none() && sent == msgs.len(), "publishing: {sent} of {}: {err:?}", msgs.len());
            *published += valid;
            *current = valid;
        }
    };
    let (mut published, mut current) = (0, 0);
    publish_wave(&mut published, &mut current);

    let results_q = rt.block_on(queue::open(&results_uri)).unwrap();
    let opts = ConsumerOptions { prefetch: 64, max_attempts: 100, lease: Duration::from_secs(30) };
    let consumer = rt.block_on(results_q.consumer(opts)).unwrap();
    let mut results = Results { consumer, events: 0, by_id: BTreeMap::new() };

    let mut args: Vec<String> = vec!["--queue".into(), tasks_uri.clone(), "--results".into(), results_uri.clone()];
    for a in [
        "--http-addr",
        "off",
        "--log-format",
        "json",
        "--threads",
        "1",
        "--prefetch",
        "2",
        "--max-attempts",
        "100",
        "--retry-base-ms",
        "100",
        "--lease-secs",
        "2",
        "--shutdown-timeout",
        "30",
        "--max-crops",
    ] {
        args.push(a.into());
    }
    args.push(MAX_CROPS.to_string());
    let mut workers = Workers {
        dir: d.to_path_buf(),
        args,
        env: worker_env,
        slots: (0..WORKERS).map(|_| None).collect(),
        started: 0,
        ended: vec![],
    };
    for s in 0..WORKERS {
        workers.start(s);
    }

    let (mut kills, mut terms, mut storage_outages, mut broker_restarts) = (0, 0, 0, 0);
    let mut fault_log: Vec<String> = Vec::new();
    let mut term_ok = true;
    let mut pending_at_faults = Vec::new();
    let started = Instant::now();
    let limit = Duration::from_secs(150 + 3 * n as u64);
    eprintln!("{label}: {n} tasks and {m} poison messages in {waves_n} waves; faults {plan:?}");
    let mut next = 0;
    loop {
        rt.block_on(results.drain(Duration::from_millis(50)));
        workers.check();
        let done = ids.iter().filter(|id| results.by_id.contains_key(*id)).count();
        if next < plan.len() && done + current * 2 / 3 >= published {
            let fault = plan[next];
            // The next wave goes out first, so the fault meets queued and in-flight work.
            publish_wave(&mut published, &mut current);
            fault_log.push(format!("{fault:?}@{done}/{published}"));
            pending_at_faults.push(published - done);
            match fault {
                Fault::Kill(s) => {
                    workers.stop(s, libc::SIGKILL);
                    workers.start(s);
                    kills += 1;
                }
                Fault::Term(s) => {
                    let e = workers.stop(s, libc::SIGTERM);
                    term_ok &= e.expected();
                    workers.start(s);
                    terms += 1;
                }
                Fault::Storage => {
                    match store {
                        Store::Local => {
                            repoint(&out_link, &d.join("gone").join("volume"));
                            std::thread::sleep(OUTAGE);
                            repoint(&out_link, &out_real);
                        }
                        Store::Gcs => {
                            let p = gcs_proxy.as_ref().unwrap();
                            p.cut();
                            std::thread::sleep(OUTAGE);
                            p.restore();
                        }
                    }
                    storage_outages += 1;
                }
                Fault::Broker => {
                    match backend {
                        Backend::Rabbit => {
                            // Exclusive for the restart only; never upgrade while holding it shared.
                            drop(shared_lock.take());
                            let lock = broker_lock(true);
                            let ctl = |cmd: &str| {
                                assert!(Command::new("rabbitmqctl").args(["-q", cmd]).status().unwrap().success())
                            };
                            ctl("stop_app");
                            std::thread::sleep(OUTAGE);
                            ctl("start_app");
                            drop(lock);
                            shared_lock = Some(broker_lock(false));
                        }
                        Backend::RabbitTls => {
                            let b = tls_broker.as_ref().unwrap();
                            b.ctl(&["stop_app"]);
                            std::thread::sleep(OUTAGE);
                            b.ctl(&["start_app"]);
                        }
                        Backend::PubSub => {
                            let p = pubsub_proxy.as_ref().unwrap();
                            p.cut();
                            std::thread::sleep(OUTAGE);
                            p.restore();
                        }
                        Backend::Spool => unreachable!(),
                    }
                    broker_restarts += 1;
                }
            }
            next += 1;
        }
        if done == n && next == plan.len() {
            break;
        }
        if started.elapsed() > limit {
            eprintln!("{label}: deadline: {done} of {n} tasks have a result after {limit:?}");
            break;
        }
    }
    let run_s = started.elapsed().as_secs_f64();

    // Dead letters: wait (bounded) until every poison message is there.
    let poison_payloads: BTreeSet<&[u8]> = poison.iter().map(|p| p.payload.as_slice()).collect();
    let valid_payloads: BTreeSet<&[u8]> =
        payloads.iter().map(|p| p.as_slice()).filter(|p| !poison_payloads.contains(p)).collect();
    let t = Instant::now();
    let dead = loop {
        let dead = rt.block_on(tasks_q.dead_letters(n + 4 * m)).unwrap_or_default();
        let found = poison.iter().filter(|p| dead.iter().any(|x| x.payload == p.payload)).count();
        if found == m || t.elapsed() > Duration::from_secs(60) {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut dead_ok = 0;
    let mut dead_problems = Vec::new();
    for p in &poison {
        match dead.iter().find(|x| x.payload == p.payload) {
            Some(x) if x.reason.contains(p.reason) => dead_ok += 1,
            Some(x) => dead_problems.push(format!("{}: reason {:?} lacks {:?}", p.kind, x.reason, p.reason)),
            None => dead_problems.push(format!("{}: not dead-lettered", p.kind)),
        }
    }
    let valid_dead: Vec<String> = dead
        .iter()
        .filter(|x| valid_payloads.contains(x.payload.as_slice()))
        .map(|x| format!("{}: {}", String::from_utf8_lossy(&x.payload), x.reason))
        .collect();

    // Stop the fleet: every remaining worker gets SIGTERM and must drain and exit 0.
    for s in 0..WORKERS {
        if workers.slots[s].is_some() {
            workers.stop(s, libc::SIGTERM);
        }
    }
    rt.block_on(results.drain(Duration::from_secs(5)));
    rt.block_on(results.consumer.stop());

    // Objects: expected vs present.
    let expected: BTreeSet<String> =
        ids.iter().flat_map(|id| (0..CROPS).map(move |j| format!("{id}/{j:03}.jpg"))).collect();
    let listed = match store {
        Store::Local => rt.block_on(storage.list(&Location::Local(out_real.clone()))).unwrap(),
        Store::Gcs => rt.block_on(storage.list(&Location::parse(&output).unwrap())).unwrap(),
    };
    let present: BTreeSet<String> = listed.into_iter().collect();
    let no_result: BTreeSet<&String> = ids.iter().filter(|id| !results.by_id.contains_key(*id)).collect();
    let missing: Vec<&String> = expected.difference(&present).collect();
    let lost = missing.len();
    let mut unexpected = present.difference(&expected).count();
    // Anywhere an escaping task or the outage could have written.
    unexpected += match store {
        Store::Local => {
            files_under(&d.join("escaped"))
                + files_under(&d.join("gone"))
                + files_under(Path::new("/etc/cropfleet-escaped"))
        }
        Store::Gcs => {
            let all = rt.block_on(storage.list(&Location::parse(&format!("gs://{bucket}")).unwrap())).unwrap();
            all.iter().filter(|k| !k.starts_with("src/") && !k.starts_with("out/")).count()
        }
    };
    let unknown_events: Vec<&String> = results.by_id.keys().filter(|k| !ids.contains(k)).collect();
    let duplicates = results.events - results.by_id.len();
    let retries = (0..workers.started)
        .map(|i| std::fs::read_to_string(d.join(format!("worker-{i}.log"))).unwrap_or_default())
        .map(|l| l.matches("transient failure; will retry").count())
        .sum::<usize>();
    // What the outages looked like to the workers (classified transient: retried, not dead-lettered).
    let all_logs: String = (0..workers.started)
        .map(|i| std::fs::read_to_string(d.join(format!("worker-{i}.log"))).unwrap_or_default())
        .collect();
    if let Some(line) = all_logs.lines().find(|l| l.contains("transient failure; will retry")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        eprintln!("{label}: first transient failure: {}", v["fields"]["reason"]);
    }
    let crashes: Vec<&Ended> = workers.ended.iter().filter(|e| !e.expected()).collect();
    let peak_kib = workers.ended.iter().map(|e| e.rss_kib).max().unwrap_or(0);
    let peak_mib = peak_kib.div_ceil(1024);

    let broker = if backend == Backend::Spool {
        "n/a".to_string()
    } else if backend == Backend::PubSub {
        format!("{broker_restarts} (simulated: connection cut)")
    } else {
        broker_restarts.to_string()
    };
    let summary = format!(
        "chaos {label}: tasks {n}, poison {m}, kills {kills}, broker restarts {broker}, storage outages \
         {storage_outages}, sigterm {terms} -> lost {lost}, unexpected {unexpected}, duplicate events {duplicates}, \
         dead letters {dead_ok}/{m}, worker crashes {}, peak RSS {peak_mib} MiB (bound {RSS_BOUND_MIB}); \
         {retries} transient retries, {run_s:.0} s",
        crashes.len()
    );
    println!("{summary}");
    eprintln!("{label}: faults at results done: {}", fault_log.join(" "));
    if let Ok(path) = std::env::var("CROPFLEET_CHAOS_SUMMARY") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(f, "{summary}").unwrap();
    }

    let logs = workers.logs();
    assert!(pending_at_faults.iter().all(|&p| p > 0), "a fault struck an idle fleet: {fault_log:?}");
    assert!(next == plan.len(), "not every fault ran: {fault_log:?}");
    assert!(term_ok, "the SIGTERMed worker did not drain and exit 0: {:?}\n{logs}", workers.ended);
    assert!(crashes.is_empty(), "workers ended unexpectedly: {crashes:?}\n{logs}");
    // What every worker said about the tasks without a result (any level), to tell a task that
    // was never redelivered from one that hung or kept failing.
    let about_lost: Vec<String> = (0..workers.started)
        .flat_map(|i| {
            let log = std::fs::read_to_string(d.join(format!("worker-{i}.log"))).unwrap_or_default();
            log.lines()
                .filter(|l| no_result.iter().any(|id| l.contains(id.as_str())))
                .map(|l| format!("worker-{i}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();
    let about_lost = about_lost[about_lost.len().saturating_sub(40)..].join("\n");
    assert_eq!(
        lost,
        0,
        "lost crops: {:?}\nworker log lines naming the {} tasks without a result ({no_result:?}):\n{about_lost}\n{logs}",
        &missing[..missing.len().min(20)],
        no_result.len()
    );
    assert_eq!(unexpected, 0, "unexpected objects\n{logs}");
    assert!(unknown_events.is_empty(), "result events for unknown tasks: {unknown_events:?}");
    assert!(valid_dead.is_empty(), "valid tasks dead-lettered: {valid_dead:#?}\n{logs}");
    assert!(dead_problems.is_empty(), "dead letters: {dead_problems:#?}\n{logs}");
    assert_eq!(dead_ok, m);
    assert!(peak_mib < RSS_BOUND_MIB, "peak RSS {peak_mib} MiB over the bound {RSS_BOUND_MIB} MiB");
    assert!(no_result.is_empty(), "{} tasks have no result event: {no_result:?}\n{logs}", no_result.len());
    assert_eq!((kills, terms), (4, 1));
    assert_eq!(storage_outages, 1);
}
