//! Latency hiding: the fleet writing its crops to Cloud Storage (fake-gcs-server) through a
//! proxy that adds a fixed delay to every request, as a distant object store would.
//!
//! In the suite these tests check correctness only: the proxy delays and cuts, and a sweep over
//! a slow store still writes every crop. The measurement (the same sweep with 0 and 50 ms added,
//! defaults for --prefetch and --upload-concurrency, ratio of tasks/s) is ignored by default and
//! run by `scripts/latency.sh` in release mode, since speed is shown by benchmarks, not asserted.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use cropfleet::storage::gcs::{GcsOptions, GcsStore};
use cropfleet::storage::{Location, ObjectStore};

/// Bucket on the emulator, unique to this test.
fn bucket(store: &GcsStore, rt: &tokio::runtime::Runtime) -> String {
    let b = format!("cf-lat-{}", uuid::Uuid::new_v4().simple());
    rt.block_on(store.create_bucket(&b)).unwrap();
    b
}

/// Run `cropfleet-aggregator sweep` with workers whose Cloud Storage is the proxy; returns the
/// records of runs.json.
fn sweep(proxy: &Proxy, out: &Path, output: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let res = Command::new(bin("cropfleet-aggregator"))
        .args(["sweep", "--out", &out.display().to_string(), "--output", output, "--log-format", "text"])
        .args(["--work-dir", &out.join("work").display().to_string()])
        // The test's worker binary: without it, a sweep run under cargo builds one itself.
        .args(["--worker-bin", &bin("cropfleet-worker").display().to_string()])
        .args(extra)
        .env("STORAGE_EMULATOR_HOST", format!("http://{}", proxy.addr()))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    if !res.status.success() {
        let mut logs = String::new();
        for e in std::fs::read_dir(out.join("logs")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            logs += &format!("== {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        panic!(
            "sweep failed:\n{}\n{}\n{logs}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
    }
    let json = std::fs::read_to_string(out.join("runs.json")).unwrap();
    serde_json::from_str::<Vec<serde_json::Value>>(&json).unwrap()
}

#[test]
fn proxy_forwards_delays_and_cuts() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let eaddr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let p = Proxy::start(eaddr);
    p.set_delay(Duration::from_millis(30));
    let mut c = std::net::TcpStream::connect(p.addr()).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // A lower bound only: the delay was applied (noise can only add to it).
        assert!(t.elapsed() >= Duration::from_millis(30), "each exchange is delayed");
    }
    assert_eq!(p.requests(), 3);
    p.cut();
    let mut b = [0u8; 4];
    let broken = c.write_all(b"ping").is_err() || c.read(&mut b).map(|n| n == 0).unwrap_or(true);
    assert!(broken, "a cut drops the open connection");
    let mut c2 = std::net::TcpStream::connect(p.addr()).unwrap();
    let refused = c2.write_all(b"x").is_err() || c2.read(&mut b).map(|n| n == 0).unwrap_or(true);
    assert!(refused, "new connections are reset while cut");
    p.restore();
    p.set_delay(Duration::ZERO);
    let mut c3 = std::net::TcpStream::connect(p.addr()).unwrap();
    c3.write_all(b"pong").unwrap();
    c3.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
}

#[test]
fn a_sweep_over_a_slow_store_writes_every_crop() {
    const TASKS: usize = 12;
    const CROPS: usize = 10;
    let endpoint = gcs_emulator_endpoint();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = GcsStore::new(GcsOptions::emulator(&endpoint));
    let b = bucket(&store, &rt);
    let proxy = Proxy::start_to(&endpoint);
    proxy.set_delay(Duration::from_millis(50));
    let dir = tempfile::tempdir().unwrap();
    let w = workload(dir.path(), CROPS);
    let recs = sweep(
        &proxy,
        &dir.path().join("sweep"),
        &format!("gs://{b}/slow"),
        &[
            "--stall-secs",
            "30",
            "--processes",
            "1",
            "--threads",
            "2",
            "--tasks",
            &TASKS.to_string(),
            "--image",
            &w.image.display().to_string(),
            "--crops",
            &w.crops.display().to_string(),
        ],
    );
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["tasks"], TASKS as u64);
    assert_eq!(recs[0]["storage"], "gcs");
    let names = rt.block_on(store.list(&Location::parse(&format!("gs://{b}/slow/p1t2")).unwrap())).unwrap();
    assert_eq!(names.len(), TASKS * CROPS, "{names:?}");
    assert!(proxy.requests() >= (TASKS * CROPS) as u64, "the uploads went through the proxy");
}

/// `scripts/latency.sh`: the same sweep with 0 and 50 ms added per storage request.
/// Knobs: CROPFLEET_LATENCY_TASKS (default 200), CROPFLEET_LATENCY_MS (50),
/// CROPFLEET_LATENCY_GRID ("1,2x1,2" = processes x threads), CROPFLEET_LATENCY_ARGS (extra sweep args).
#[test]
#[ignore = "a measurement: run by scripts/latency.sh"]
fn measure_latency_hiding() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let tasks = env("CROPFLEET_LATENCY_TASKS", "200");
    let ms: u64 = env("CROPFLEET_LATENCY_MS", "50").parse().unwrap();
    let grid = env("CROPFLEET_LATENCY_GRID", "1,2x1,2");
    let (procs, threads) = grid.split_once('x').expect("GRID is PROCESSESxTHREADS");
    let extra = env("CROPFLEET_LATENCY_ARGS", "");
    let endpoint = gcs_emulator_endpoint();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = GcsStore::new(GcsOptions::emulator(&endpoint));
    let b = bucket(&store, &rt);
    let proxy = Proxy::start_to(&endpoint);
    let dir = std::path::PathBuf::from(env("CROPFLEET_LATENCY_OUT", "results/latency"));
    let mut args = vec!["--processes", procs, "--threads", threads, "--tasks", &tasks];
    args.extend(extra.split_whitespace());
    let mut runs = Vec::new();
    for delay in [0, ms] {
        proxy.set_delay(Duration::from_millis(delay));
        let before = proxy.requests();
        let out = dir.join(format!("{delay}ms"));
        let recs = sweep(&proxy, &out, &format!("gs://{b}/d{delay}"), &args);
        eprintln!("{delay} ms: {} storage requests through the proxy", proxy.requests() - before);
        runs.push((delay, recs));
    }
    println!("\nstorage latency added per request: 0 vs {ms} ms ({tasks} tasks per configuration)");
    println!(
        "{:>5} {:>4} {:>4} {:>5} {:>9} {:>9} {:>7}",
        "proc",
        "thr",
        "pf",
        "upc",
        "0ms t/s",
        format!("{ms}ms t/s"),
        "ratio"
    );
    let best = |recs: &[serde_json::Value]| recs.iter().map(|r| r["tasks_per_s"].as_f64().unwrap()).fold(0.0, f64::max);
    for (a, b) in runs[0].1.iter().zip(&runs[1].1) {
        let (x, y) = (a["tasks_per_s"].as_f64().unwrap(), b["tasks_per_s"].as_f64().unwrap());
        let n = |k: &str| a[k].as_u64().unwrap_or(0);
        let (p, t, f, u) = (n("processes"), n("threads"), n("prefetch"), n("upload_concurrency"));
        println!("{p:>5} {t:>4} {f:>4} {u:>5} {x:>9.2} {y:>9.2} {:>6.0}%", 100.0 * y / x);
    }
    let (b0, b1) = (best(&runs[0].1), best(&runs[1].1));
    println!("best: {b0:.2} vs {b1:.2} tasks/s = {:.0}% with {ms} ms added", 100.0 * b1 / b0);
}
