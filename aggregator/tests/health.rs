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
    match request(&mut s, "GET", path) {
        Ok(r) => Some((r.status, r.body)),
        Err(e) => {
            eprintln!("GET {path}: {e}");
            None
        }
    }
}

/// One HTTP/1.1 response, read by its `content-length` (the connection stays open).
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Send one request on `s` and read exactly its response, so that the next request can follow
/// on the same connection (keep-alive). HEAD responses carry a length but no body.
fn request(s: &mut TcpStream, method: &str, path: &str) -> std::io::Result<Reply> {
    write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let bad = |what: &str| std::io::Error::other(format!("{what} in {head:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad("no status"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no content-length"))?;
    let mut body = vec![0u8; if method == "HEAD" { 0 } else { len }];
    s.read_exact(&mut body)?;
    Ok(Reply { status, head, body: String::from_utf8_lossy(&body).into_owned() })
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

    // GET and HEAD on one kept-alive connection, then 405 for another method (still kept alive).
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = request(&mut conn, "GET", "/healthz").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
    let r = request(&mut conn, "HEAD", "/readyz").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.head.to_ascii_lowercase().contains("content-length: 6\r\n"), "{r:?}");
    let r = request(&mut conn, "HEAD", "/metrics").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = request(&mut conn, "POST", "/healthz").unwrap();
    assert_eq!(r.status, 405, "{r:?}");
    assert!(r.head.to_ascii_lowercase().contains("allow: get, head\r\n"), "{r:?}");
    let r = request(&mut conn, "GET", "/readyz").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"), "{r:?}");
    drop(conn);

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

/// The README's "start several" example: the same command twice on one host, no --http-addr.
/// Both workers run and serve health; the one that found the default port taken says where it
/// listens instead. A taken port given explicitly stays an error.
#[test]
fn workers_started_with_the_same_command_share_a_host() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), 4);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", "10"],
    );
    for n in 0..2 {
        let log = std::fs::File::create(f.path(&format!("worker-{n}.log"))).unwrap();
        f.workers.push(
            std::process::Command::new(bin("cropfleet-worker"))
                .args(["--queue", &f.tasks, "--results", &f.results, "--threads", "2"])
                .env_remove("CROPFLEET_HTTP_ADDR")
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let listening = |n: usize| -> Option<std::net::SocketAddr> {
        let log = std::fs::read_to_string(f.path(&format!("worker-{n}.log"))).ok()?;
        let line = log.lines().find(|l| l.contains("health and metrics listener"))?;
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["fields"]["addr"].as_str()?.parse().ok()
    };
    wait_until(Duration::from_secs(30), "both listeners", || listening(0).is_some() && listening(1).is_some());
    let (a, b) = (listening(0).unwrap(), listening(1).unwrap());
    assert_ne!(a.port(), b.port(), "{}", f.logs());
    for addr in [a, b] {
        assert_eq!(get(addr.port(), "/healthz").map(|r| r.0), Some(200), "{addr}: {}", f.logs());
    }
    // At most one of them holds the default port; a worker that could not says so.
    let fell_back = f.logs().lines().filter(|l| l.contains("listening on a free port")).count();
    assert!(
        fell_back >= 1 && [a.port(), b.port()].iter().filter(|&&p| p == 9090).count() + fell_back == 2,
        "{}",
        f.logs()
    );
    wait_until(Duration::from_secs(60), "all tasks done", || {
        f.spool_files("tasks", "ready").is_empty() && f.spool_files("tasks", "inflight").is_empty()
    });
    assert_eq!(f.outputs().len(), 10 * 4);
    for n in 0..2 {
        f.signal(n, libc::SIGTERM);
    }
    for w in &mut f.workers {
        assert!(w.wait().unwrap().success());
    }

    // An address given explicitly is used as given: taken means an error, not another port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let out = std::process::Command::new(bin("cropfleet-worker"))
        .args(["--queue", &f.tasks, "--results", &f.results, "--http-addr", &taken, "--exit-when-idle", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("binding the health listener on {taken}")) && err.contains("in use"), "{err}");
}
