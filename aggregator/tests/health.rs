//! The worker's health and metrics listener, against a real worker process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    (0..3).find_map(|_| get_once(port, path))
}

fn get_once(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    if let Err(e) = s.read_to_string(&mut body) {
        eprintln!("GET {path}: {e}");
        return None;
    }
    let status = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// The value of a Prometheus sample line `name{labels} value`.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_count_what_was_processed_and_readiness_drops_while_draining() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), 10);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", "7"],
    );
    // One poison message as well (past the producer's own check, which would refuse it).
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", "/missing.jpg", "--crops", &crops, "--output", &out, "--no-check"],
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    f.workers.push(
        std::process::Command::new(bin("cropfleet-worker"))
            .args(["--queue", &f.tasks, "--results", &f.results, "--http-addr", &addr, "--threads", "1"])
            .args(["--shutdown-timeout", "20"])
            .stderr(std::fs::File::create(f.path("worker-0.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(20), "the listener", || get(port, "/healthz").is_some());
    wait_until(Duration::from_secs(30), "all tasks settled", || {
        f.spool_files("tasks", "ready").is_empty() && f.spool_files("tasks", "inflight").is_empty()
    });
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200), "{}", f.logs());
    assert_eq!(get(port, "/readyz").unwrap(), (200, "ready\n".into()));
    let (status, m) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&m, "cropfleet_tasks_total{outcome=\"ok\"}"), Some(7.0), "{m}");
    assert_eq!(sample(&m, "cropfleet_tasks_total{outcome=\"dead_lettered\"}"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "cropfleet_crops_total"), Some(70.0), "{m}");
    let bytes: u64 = f.outputs().iter().map(|o| std::fs::metadata(f.out.join(o)).unwrap().len()).sum();
    assert_eq!(sample(&m, "cropfleet_bytes_written_total"), Some(bytes as f64));
    assert_eq!(sample(&m, "cropfleet_stage_seconds_count{stage=\"decode\"}"), Some(7.0), "{m}");
    assert!(m.contains("# HELP cropfleet_stage_seconds"));
    assert!(m.contains("cropfleet_stage_seconds_bucket{stage=\"total\",le=\"0.001\"}"));
    assert_eq!(get(port, "/nope").unwrap().0, 404);

    // Drain: enqueue slow work (400 crops a task), SIGTERM mid-way; readiness must fail while
    // the worker finishes what it holds.
    let slow = cropfleet::sample::write_workload_sized(f.dir.path(), 800, 600, 400).unwrap();
    let slow_crops = slow.crops.display().to_string();
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &slow_crops, "--output", &out, "--repeat", "20"],
    );
    wait_until(Duration::from_secs(20), "new claims", || !f.spool_files("tasks", "inflight").is_empty());
    f.signal(0, libc::SIGTERM);
    let mut saw_draining = false;
    for _ in 0..200 {
        match get(port, "/readyz") {
            Some((503, body)) if body.contains("draining") => {
                saw_draining = true;
                break;
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
            None => break,
        }
    }
    assert!(saw_draining, "readiness never reported draining:\n{}", f.logs());
    assert!(f.workers[0].wait().unwrap().success());
    assert!(f.spool_files("tasks", "inflight").is_empty());
}
