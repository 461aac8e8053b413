//! The fleet over the real RabbitMQ on 127.0.0.1:5672, with the real binaries: workers killed
//! mid-task, poison messages, a broker restart, results counted once.

mod common;

use std::time::Duration;

use common::*;
use cropfleet::queue;

const CROPS: usize = 8;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn use_amqp(f: &mut Fleet, name: &str) -> Topology {
    f.tasks = amqp_uri(name);
    f.results = amqp_uri(&format!("{name}-results"));
    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    Topology(vec![f.tasks.clone(), f.results.clone()])
}

#[test]
fn three_workers_a_sigkill_and_poison_lose_nothing_and_count_once() {
    let _lock = broker_lock(false);
    let mut f = Fleet::new();
    let _topology = use_amqp(&mut f, "e2e");
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let n = 60;
    let p = run_ok(
        "cropfleet-producer",
        &[
            "--queue",
            &f.tasks,
            "--image",
            &img,
            "--crops",
            &crops,
            "--output",
            &out,
            "--repeat",
            &n.to_string(),
            "--run-id",
            "rmq",
        ],
    );
    assert!(String::from_utf8_lossy(&p.stdout).contains(&format!("{n} of {n} tasks confirmed")));
    // Poison, interleaved after the good tasks: raw bytes straight onto the queue.
    let poison: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        serde_json::json!({"v": 1, "id": "missing", "image": "/nope.jpg", "crops": crops, "output": out}).to_string().into(),
        serde_json::json!({"v": 1, "id": "oob", "image": img, "crops": [{"x": 790, "y": 0, "w": 20, "h": 5}], "output": out})
            .to_string()
            .into(),
        serde_json::json!({"v": 3, "id": "future"}).to_string().into(),
    ];
    // One runtime for every broker call of this test: a lapin connection lives on the runtime
    // that opened it.
    let rt = rt();
    let tasks_q = rt.block_on(queue::open(&f.tasks)).unwrap();
    let (sent, err) = rt.block_on(tasks_q.publish_many(&poison));
    assert_eq!((sent, err.is_none()), (poison.len(), true));

    // One slow worker that we kill while it holds unacked tasks, and two that finish the job.
    f.start_worker(&["--threads", "1", "--prefetch", "6"]);
    let results_q = rt.block_on(queue::open(&f.results)).unwrap();
    wait_until(Duration::from_secs(60), "first results", || rt.block_on(results_q.depth()).unwrap().unwrap_or(0) >= 3);
    f.signal(0, libc::SIGKILL);
    f.start_worker(&["--threads", "1", "--exit-when-idle", "3"]);
    f.start_worker(&["--threads", "1", "--exit-when-idle", "3"]);
    for w in f.workers.iter_mut().skip(1) {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(f.outputs().len(), n * CROPS, "lost crops; logs:\n{}", f.logs());
    let dead = rt.block_on(tasks_q.dead_letters(100)).unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), poison.len(), "{reasons:#?}");
    for want in ["not JSON", "not found", "crop #0", "unsupported task schema version 3"] {
        assert!(reasons.iter().any(|r| r.contains(want)), "no dead letter says {want:?}: {reasons:#?}");
    }
    // The killed worker's unacked tasks were redelivered; some may have been finished twice.
    let agg = f.path("agg");
    run_ok(
        "cropfleet-aggregator",
        &[
            "collect",
            "--results",
            &f.results,
            "--out",
            &agg.display().to_string(),
            "--idle-secs",
            "2",
            "--processes",
            "3",
        ],
    );
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(agg.join("runs.json")).unwrap()).unwrap();
    assert_eq!(runs[0]["tasks"], n as u64, "{runs}");
    assert_eq!(runs[0]["backend"], "rabbitmq");
}

#[test]
fn broker_restart_during_a_run_loses_nothing() {
    let _lock = broker_lock(true);
    let mut f = Fleet::new();
    let _topology = use_amqp(&mut f, "restart");
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let n = 80;
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", &n.to_string()],
    );
    f.start_worker(&["--threads", "1", "--prefetch", "4"]);
    f.start_worker(&["--threads", "1", "--prefetch", "4"]);
    wait_until(Duration::from_secs(60), "some crops", || f.outputs().len() >= 5 * CROPS);
    let ctl =
        |cmd: &str| assert!(std::process::Command::new("rabbitmqctl").args(["-q", cmd]).status().unwrap().success());
    ctl("stop_app");
    std::thread::sleep(Duration::from_secs(2));
    ctl("start_app");
    // Workers reconnect by themselves and finish every task.
    wait_until(Duration::from_secs(120), "all crops after the restart", || f.outputs().len() >= n * CROPS);
    for i in 0..2 {
        f.signal(i, libc::SIGTERM);
    }
    for w in &mut f.workers {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(f.outputs().len(), n * CROPS);
    let runs = f.collect_runs(2);
    assert_eq!(runs[0]["tasks"], n as u64, "{runs}\n{}", f.logs());
    assert!(f.logs().contains("receiving from the queue failed") || f.logs().contains("reconnect"), "{}", f.logs());
}
