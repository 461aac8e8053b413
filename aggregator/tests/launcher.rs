//! `sweep --launcher command`: the code path `scripts/experiment.sh` drives on docker compose and
//! Kubernetes, exercised here with shell templates that start and stop local worker processes
//! instead of `docker compose up --scale` / `kubectl scale`. The workers get their
//! configuration only through the environment the templates receive (CROPFLEET_QUEUE,
//! CROPFLEET_THREADS, …), as compose and Kubernetes workers do.

mod common;

use std::process::Command;

use common::*;

const CROPS: usize = 8;

/// Starts `{processes}` workers in the background, recording their pids; the worker binary
/// and the folder come from the environment of the sweep.
const SCALE: &str = r#"echo "scale {tag} p={processes} t={threads} env=$CROPFLEET_PROCESSES,$CROPFLEET_THREADS" >> "$FLEET_DIR/calls"
for i in $(seq {processes}); do
  "$FLEET_WORKER" --http-addr off --log-format json --exit-when-idle 120 >> "$FLEET_DIR/{tag}-w$i.log" 2>&1 &
  echo $! >> "$FLEET_DIR/pids"
done"#;

/// SIGTERM every worker and return once each has exited (an orphan may stay a zombie).
const STOP: &str = r#"for p in $(cat "$FLEET_DIR/pids" 2>/dev/null); do kill -TERM "$p" 2>/dev/null; done
for p in $(cat "$FLEET_DIR/pids" 2>/dev/null); do
  while [ -d "/proc/$p" ] && [ "$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null)" != Z ]; do sleep 0.05; done
done
rm -f "$FLEET_DIR/pids"
echo "stop {tag}" >> "$FLEET_DIR/calls""#;

#[test]
fn command_launcher_scales_an_external_fleet_per_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = workload(d, CROPS);
    let tasks = format!("spool:{}", d.join("q/tasks").display());
    let results = format!("spool:{}", d.join("q/results").display());
    run_ok("cropfleet-producer", &["setup", "--queue", &tasks, "--results", &results]);
    // An event of another run waiting in the shared results queue must not be counted.
    let foreign = serde_json::json!({
        "v": 1, "task_id": "old-000000", "run_id": "an-earlier-run", "worker": "w:1", "attempt": 1,
        "crops": CROPS, "bytes": 1, "output": "/x/old-000000", "mode": "decode", "width": 800, "height": 600,
        "started_ms": 1, "finished_ms": 2,
        "stages_ms": {"queue_wait": 0.0, "download": 0.0, "decode": 0.0, "crop_encode": 0.0, "upload": 0.0, "total": 1.0},
        "threads": 1, "upload_concurrency": 1
    });
    std::fs::write(d.join("q/results/ready/0000000000001-foreign.a1.json"), foreign.to_string()).unwrap();

    let out = d.join("sweep");
    let crops_out = d.join("crops");
    let o = Command::new(bin("cropfleet-aggregator"))
        .args(["sweep", "--launcher", "command", "--processes", "1,2", "--threads", "1,2", "--tasks", "6"])
        .args(["--image", &w.image.display().to_string(), "--crops", &w.crops.display().to_string()])
        .args(["--queue", &tasks, "--results", &results, "--output", &crops_out.display().to_string()])
        .args(["--out", &out.display().to_string(), "--work-dir", &d.join("work").display().to_string()])
        .args(["--scale-cmd", SCALE, "--stop-cmd", STOP, "--label", "compose-like", "--stall-secs", "60"])
        .env("FLEET_DIR", d)
        .env("FLEET_WORKER", bin("cropfleet-worker"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let logs = || {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        o.status.success(),
        "sweep failed:\n{}\n{}\nworker logs:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        logs()
    );

    // Every configuration was scaled up, then stopped, in order, with its values in the template
    // and in the environment.
    let calls = std::fs::read_to_string(d.join("calls")).unwrap();
    let want = "scale p1t1 p=1 t=1 env=1,1\nstop p1t1\nscale p1t2 p=1 t=2 env=1,2\nstop p1t2\n\
                scale p2t1 p=2 t=1 env=2,1\nstop p2t1\nscale p2t2 p=2 t=2 env=2,2\nstop p2t2\n";
    assert_eq!(calls, want);
    assert!(!d.join("pids").exists(), "the stop template ran last");

    // The workers were configured through the environment only: their start lines show the
    // threads of their configuration.
    for (tag, threads, n) in [("p1t1", 1, 1), ("p1t2", 2, 1), ("p2t1", 1, 2), ("p2t2", 2, 2)] {
        for i in 1..=n {
            let log = std::fs::read_to_string(d.join(format!("{tag}-w{i}.log"))).unwrap();
            let start = log.lines().find(|l| l.contains("worker started")).unwrap_or_else(|| panic!("{tag}: {log}"));
            let v: serde_json::Value = serde_json::from_str(start).unwrap();
            assert_eq!(v["fields"]["threads"].as_u64().or(v["threads"].as_u64()), Some(threads), "{start}");
        }
        // Crops of each configuration under --output/{tag}.
        let n_crops: usize = std::fs::read_dir(crops_out.join(tag))
            .unwrap()
            .map(|t| std::fs::read_dir(t.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(n_crops, 6 * CROPS, "{tag}");
    }

    // The same records and picture as the local sweep.
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect();
    let shape: Vec<(&str, &str, &str, &str)> =
        rows.iter().map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str(), r[7].as_str())).collect();
    assert_eq!(
        shape,
        [
            ("1", "1", "6", "compose-like"),
            ("1", "2", "6", "compose-like"),
            ("2", "1", "6", "compose-like"),
            ("2", "2", "6", "compose-like")
        ]
    );
    for r in &rows {
        assert_eq!(r[3], (6 * CROPS).to_string());
        assert!(r[5].parse::<f64>().unwrap() > 0.0, "{r:?}");
    }
    let svg = std::fs::read_to_string(out.join("throughput.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tasks/s"));
    assert!(image::open(out.join("throughput.png")).is_ok());
    // The foreign event was taken off the queue, and nothing is left in flight.
    assert!(std::fs::read_dir(d.join("q/results/ready")).unwrap().next().is_none());
    assert!(std::fs::read_dir(d.join("q/tasks/ready")).unwrap().next().is_none());
}

#[test]
fn command_launcher_stops_the_fleet_when_it_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = workload(d, 2);
    let tasks = format!("spool:{}", d.join("q/tasks").display());
    let results = format!("spool:{}", d.join("q/results").display());
    // A fleet that never comes up: the sweep gives up after --stall-secs and still stops it.
    let o = Command::new(bin("cropfleet-aggregator"))
        .args(["sweep", "--launcher", "command", "--processes", "1", "--threads", "1", "--tasks", "2"])
        .args(["--image", &w.image.display().to_string(), "--crops", &w.crops.display().to_string()])
        .args(["--queue", &tasks, "--results", &results])
        .args(["--out", &d.join("sweep").display().to_string(), "--work-dir", &d.join("work").display().to_string()])
        .args(["--scale-cmd", "echo scaled {processes} >> \"$FLEET_DIR/calls\""])
        .args(["--stop-cmd", "echo stopped >> \"$FLEET_DIR/calls\"", "--stall-secs", "1"])
        .env("FLEET_DIR", d)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no task finished for 1s"), "{err}");
    assert_eq!(std::fs::read_to_string(d.join("calls")).unwrap(), "scaled 1\nstopped\n");

    // Missing templates are named before anything runs.
    let o = Command::new(bin("cropfleet-aggregator"))
        .args(["sweep", "--launcher", "command", "--queue", &tasks, "--out", &d.join("s2").display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--scale-cmd, --stop-cmd, --results"), "{err}");
}
