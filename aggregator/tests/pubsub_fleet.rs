//! The fleet over the Pub/Sub emulator with the real binaries: producer → Pub/Sub → 2 workers
//! → result events over Pub/Sub → `cropfleet-aggregator collect`, which counts every task once;
//! a poison message ends in `NAME-dead` with its reason.
//! The emulator comes from `PUBSUB_EMULATOR_HOST` when set, else from `scripts/emulators.sh start`.
//!
//! A worker killed mid-run is tested too. It needs the emulator fix in
//! `deploy/pubsub-emulator-fix`, which `scripts/emulators.sh` applies: the emulator (0.8.20) as
//! shipped fails in its stream-close path (`NoSuchMethodError:
//! io.grpc.InternalStatus.asRuntimeException` in its log) when a subscriber's stream closes, and
//! keeps that stream as a subscriber: its messages stay leased to nobody, and new messages go to it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use cropfleet::gcp;
use cropfleet::queue::pubsub::PubSub;
use cropfleet::queue::Queue;

const CROPS: usize = 8;
const TASKS: usize = 40;

/// Deletes the test's topics and subscriptions, even when it fails.
struct Topics(Vec<String>);

impl Drop for Topics {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for u in &self.0 {
                let _ = tokio::time::timeout(Duration::from_secs(20), PubSub::from_uri(u).unwrap().delete_all()).await;
            }
        });
    }
}

#[test]
fn two_workers_results_over_pubsub_count_once() {
    fleet(false);
}

#[test]
fn a_worker_killed_mid_run_loses_nothing() {
    fleet(true);
}

/// Run the fleet; with `kill`, the first worker gets SIGKILL mid-run and a second one finishes.
fn fleet(kill: bool) {
    let host = emulator_var(gcp::PUBSUB_EMULATOR_HOST);
    // The only test in this binary: the binaries inherit the variable.
    std::env::set_var(gcp::PUBSUB_EMULATOR_HOST, &host);
    let mut f = Fleet::new();
    let id = uuid::Uuid::new_v4().simple();
    // max_attempts=100 (and the same for the workers, so they leave the policy alone): the
    // emulator may hand a dead worker's messages to its closed stream a few more times, each
    // counting a delivery.
    f.tasks = format!("pubsub://cropfleet-test/e2e-{id}?ack_deadline=10&max_attempts=100");
    f.results = format!("pubsub://cropfleet-test/e2e-{id}.results?ack_deadline=10&max_attempts=100");
    let _topics = Topics(vec![f.tasks.clone(), f.results.clone()]);
    let setup = run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    assert!(String::from_utf8_lossy(&setup.stdout).contains("(pubsub)"));

    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let p = Command::new(bin("cropfleet-producer"))
        .args(["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out])
        .args(["--repeat", &TASKS.to_string(), "--run-id", "pubsub-e2e", "--log-format", "text"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&p.stdout), String::from_utf8_lossy(&p.stderr));
    assert!(p.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{TASKS} of {TASKS} tasks confirmed")), "{stdout}");
    assert!(stderr.contains("first_id") && stderr.contains("last_id"), "message ids reported: {stderr}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let tasks_q = PubSub::from_uri(&f.tasks).unwrap();
    rt.block_on(tasks_q.publish(b"{not json")).unwrap();

    let started = Instant::now();
    let worker = ["--threads", "1", "--prefetch", "4", "--max-attempts", "100"];
    f.start_worker(&worker);
    let mut done_at_kill = 0;
    if kill {
        wait_until(Duration::from_secs(60), "first crops", || !f.outputs().is_empty());
        // The first worker dies holding unacked tasks (the emulator does not enforce flow
        // control, so its client may hold all of them): they come back after the ack deadline.
        f.signal(0, libc::SIGKILL);
        let _ = f.workers[0].wait();
        done_at_kill = f.outputs().len() / CROPS;
        assert!(done_at_kill < TASKS, "the worker was killed mid-run ({done_at_kill} of {TASKS} done)");
    }
    f.start_worker(&worker);
    let t = Instant::now();
    while f.outputs().len() < TASKS * CROPS {
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "only {} of {} crops after 240 s; logs:\n{}",
            f.outputs().len(),
            TASKS * CROPS,
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "all {TASKS} tasks done {:.1} s after the start ({done_at_kill} before the kill)",
        started.elapsed().as_secs_f64()
    );
    // Stop the workers only now: a stream closed while messages wait strands them on the emulator.
    for i in usize::from(kill)..f.workers.len() {
        f.signal(i, libc::SIGTERM);
    }
    for w in f.workers.iter_mut().skip(usize::from(kill)) {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(f.outputs().len(), TASKS * CROPS, "lost or extra crops; logs:\n{}", f.logs());

    let dead = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = tasks_q.dead_letters(10).await.unwrap();
            if !d.is_empty() || Instant::now() > deadline {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].payload, b"{not json");
    assert!(dead[0].reason.contains("not JSON"), "{}", dead[0].reason);

    let runs = f.collect_runs(3);
    assert_eq!(runs[0]["tasks"], TASKS as u64, "{runs}\n{}", f.logs());
    assert_eq!(runs[0]["backend"], "pubsub");
}
