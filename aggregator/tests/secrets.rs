//! No secret in any output: a whole run over RabbitMQ as a user with a distinctive password
//! (created for this test with `rabbitmqctl`, deleted after), and every output searched for it:
//! the producer's summary and progress, `setup`, the worker's log lines (info and debug), dead-letter
//! reasons, result events, `collect` and `sweep` with their runs.json, runs.csv, tables and worker
//! logs, and the errors of bad URIs and unreachable brokers. An `http(s)://` source carrying the
//! password as a userinfo and as a token parameter is dead-lettered without showing either.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use cropfleet::queue::{self, ConsumerOptions};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A RabbitMQ user that exists for the length of the test.
struct User {
    name: String,
    password: String,
}

impl User {
    fn create() -> User {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let user = User { name: format!("cropfleet-secrets-{}", &id[..8]), password: format!("Pw{}zQ", &id[8..28]) };
        ctl(&["add_user", &user.name, &user.password]);
        ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    fn uri(&self, queue: &str) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f?queue={queue}&heartbeat=5", self.name, self.password)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", &self.name]).status();
    }
}

fn ctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").arg("-q").args(args).output().expect("running rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Everything a command printed, labelled.
fn run(name: &str, args: &[&str], log: &str) -> (Output, String) {
    let out = Command::new(bin(name)).args(args).env("RUST_LOG", log).stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "== {name} {}\n{}{}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Every file under `dir`, as text, labelled.
fn files(dir: &std::path::Path) -> String {
    let mut all = String::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return all };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            all.push_str(&files(&p));
        } else if !matches!(p.extension().and_then(|x| x.to_str()), Some("jpg" | "png")) {
            all.push_str(&format!("== {}\n{}\n", p.display(), String::from_utf8_lossy(&std::fs::read(&p).unwrap())));
        }
    }
    all
}

#[test]
fn no_password_in_any_output() {
    let _lock = broker_lock(false);
    let user = User::create();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (tasks, results) = (user.uri(&format!("secrets-{id}")), user.uri(&format!("secrets-{id}.results")));
    let sweep_base = user.uri(&format!("secrets-sweep-{id}"));
    let topology = Topology(vec![tasks.clone(), results.clone()]);
    let f = Fleet::new();
    let w = workload(f.dir.path(), 6);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let mut seen = String::new();
    let ok = |seen: &mut String, name: &str, args: &[&str], log: &str| {
        let (o, text) = run(name, args, log);
        assert!(o.status.success(), "{text}");
        seen.push_str(&text);
        text
    };

    // Setup, enqueue (the summary line names the queue), work, dead letters.
    let setup = ok(&mut seen, "cropfleet-producer", &["setup", "--queue", &tasks, "--results", &results], "info");
    assert!(setup.contains(&format!("amqp://{}:***@127.0.0.1:5672", user.name)), "{setup}");
    let summary = ok(
        &mut seen,
        "cropfleet-producer",
        &[
            "--queue", &tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", "5", "--run-id",
            "secrets",
        ],
        "debug",
    );
    assert!(summary.contains(&format!("5 of 5 tasks confirmed by amqp://{}:***@", user.name)), "{summary}");
    let leaky_source = format!("http://u:{0}@127.0.0.1:9/a.jpg?access_token={0}&sig={0}", user.password);
    let poison = serde_json::json!({"v": 1, "id": "leaky", "image": leaky_source, "crops": crops, "output": out});
    let rt = rt();
    let tasks_q = rt.block_on(queue::open(&tasks)).unwrap();
    rt.block_on(tasks_q.publish(poison.to_string().as_bytes())).unwrap();
    // One worker does the work at the default level; a second, at debug, finds the queue empty
    // and logs connecting, consuming, idling and stopping.
    for log in ["info", "debug"] {
        ok(
            &mut seen,
            "cropfleet-worker",
            &[
                "--queue",
                &tasks,
                "--results",
                &results,
                "--threads",
                "1",
                "--http-addr",
                "off",
                "--exit-when-idle",
                "2",
            ],
            log,
        );
    }
    assert_eq!(f.outputs().len(), 5 * 6, "{seen}");
    let dead = rt.block_on(tasks_q.dead_letters(10)).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("http://u:***@127.0.0.1:9/a.jpg?access_token=***&sig=***"), "{}", dead[0].reason);
    seen.push_str(&format!("== dead letter\n{}\n", dead[0].reason));

    // The result events themselves, then put back for `collect`.
    let results_q = rt.block_on(queue::open(&results)).unwrap();
    let events = rt.block_on(async {
        let mut c = results_q.consumer(ConsumerOptions { prefetch: 16, ..Default::default() }).await.unwrap();
        let mut events = Vec::new();
        while events.len() < 5 {
            let d = c.next(Duration::from_secs(10)).await.unwrap().expect("a result event");
            events.push(d.payload.clone());
            d.acker.ack().await.unwrap();
        }
        c.stop().await;
        events
    });
    for e in &events {
        seen.push_str(&format!("== result event\n{}\n", String::from_utf8_lossy(e)));
    }
    assert_eq!(rt.block_on(results_q.publish_many(&events)).0, 5);
    let agg = f.path("collect");
    ok(
        &mut seen,
        "cropfleet-aggregator",
        &["collect", "--results", &results, "--out", &agg.display().to_string(), "--expect", "5", "--idle-secs", "5"],
        "info",
    );
    seen.push_str(&files(&agg));

    // A sweep over the same broker: its table, progress, runs.json, runs.csv and worker logs.
    let sweep_out = f.path("sweep");
    let worker_bin = bin("cropfleet-worker").display().to_string();
    let sweep = ok(
        &mut seen,
        "cropfleet-aggregator",
        &[
            "sweep",
            "--queue",
            &sweep_base,
            "--processes",
            "1",
            "--threads",
            "1",
            "--tasks",
            "3",
            "--sample-mp",
            "1",
            "--out",
            &sweep_out.display().to_string(),
            "--worker-bin",
            &worker_bin,
        ],
        "info",
    );
    assert!(sweep.contains("tasks/s"), "{sweep}");
    seen.push_str(&files(&sweep_out));

    // Errors that name the URI: a bad queue name, TLS, another scheme, a closed port, a storage URI.
    let pw = &user.password;
    for (bin_name, args) in [
        (
            "cropfleet-producer",
            vec!["setup".to_string(), "--queue".into(), user.uri("amq.nope"), "--results".into(), results.clone()],
        ),
        (
            "cropfleet-producer",
            vec![
                "setup".into(),
                "--queue".into(),
                tasks.replace("amqp://", "amqps://"),
                "--results".into(),
                results.clone(),
            ],
        ),
        (
            "cropfleet-worker",
            vec!["--queue".into(), format!("kafka://u:{pw}@h/q"), "--results".into(), results.clone()],
        ),
        (
            "cropfleet-aggregator",
            vec!["collect".into(), "--results".into(), tasks.replace(":5672", ":1"), "--idle-secs".into(), "1".into()],
        ),
        (
            "cropfleet-producer",
            vec![
                "--queue".into(),
                tasks.clone(),
                "--image".into(),
                img.clone(),
                "--crops".into(),
                crops.clone(),
                "--output".into(),
                format!("https://u:{pw}@h/../out"),
            ],
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (o, text) = run(bin_name, &args, "debug");
        assert!(!o.status.success(), "expected a failure: {text}");
        seen.push_str(&text);
    }

    drop(topology);
    assert!(seen.len() > 10_000, "too little output to search:\n{seen}");
    if let Some(at) = seen.find(pw.as_str()) {
        let from = seen[..at].rfind("\n==").unwrap_or(0);
        panic!("the password appears in an output:\n{}", &seen[from..(at + 200).min(seen.len())]);
    }
}
