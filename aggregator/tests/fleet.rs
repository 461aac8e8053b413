//! End to end with the real binaries on spool queues: producer → spool → workers → aggregator.

mod common;

use std::time::Duration;

use common::poison::png_header;
use common::*;

const CROPS: usize = 12;

#[test]
fn producer_workers_aggregator_all_outputs_present() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let out = f.out.display().to_string();
    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    let p = run_ok(
        "cropfleet-producer",
        &[
            "--queue",
            &f.tasks,
            "--image",
            &w.image.display().to_string(),
            "--crops",
            &w.crops.display().to_string(),
            "--output",
            &out,
            "--repeat",
            "20",
            "--run-id",
            "e2e",
        ],
    );
    assert!(String::from_utf8_lossy(&p.stdout).contains("20 of 20 tasks confirmed"));
    assert_eq!(f.spool_files("tasks", "ready").len(), 20);
    f.start_worker(&["--threads", "2", "--exit-when-idle", "1"]);
    f.start_worker(&["--threads", "1", "--exit-when-idle", "1"]);
    for w in &mut f.workers {
        assert!(w.wait().unwrap().success());
    }
    let outputs = f.outputs();
    assert_eq!(outputs.len(), 20 * CROPS, "{}", f.logs());
    assert!(outputs.contains(&"e2e-000019/011.jpg".to_string()));
    assert!(f.spool_files("tasks", "ready").is_empty() && f.spool_files("tasks", "inflight").is_empty());
    assert!(f.spool_files("tasks", "dead").is_empty(), "{:?}", f.spool_files("tasks", "dead"));

    let agg = f.path("agg");
    let a = run_ok(
        "cropfleet-aggregator",
        &[
            "collect",
            "--results",
            &f.results,
            "--out",
            &agg.display().to_string(),
            "--expect",
            "20",
            "--processes",
            "2",
        ],
    );
    let csv = std::fs::read_to_string(agg.join("runs.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!((row[0], row[2], row[3]), ("2", "20", &*(20 * CROPS).to_string()), "{csv}");
    assert!(String::from_utf8_lossy(&a.stdout).contains("tasks/s"));
    // Every JSON log line parses, and task lines carry the task id.
    let logs = f.logs();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string());
    }
}

#[test]
fn producer_checks_before_it_enqueues_and_makes_paths_absolute() {
    let f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let dir = f.dir.path();
    std::fs::write(dir.join("bad.csv"), "x,y,w,h\n10,ten,50,50\n").unwrap();
    std::fs::write(dir.join("edge.csv"), "x,y,w,h\n700,500,200,50\n").unwrap();
    std::fs::write(dir.join("notes.jpg"), "not pixels\n").unwrap();
    std::fs::write(dir.join("bomb.png"), png_header(30000, 30000)).unwrap();
    let producer = |args: &[&str]| {
        std::process::Command::new(bin("cropfleet-producer"))
            .args(["--queue", &f.tasks, "--output", "out"])
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let (img, crops) = ("sample-800x600.jpg", &*format!("crops-800x600-{CROPS}.csv"));
    assert!(w.image.ends_with(img) && w.crops.ends_with(crops));
    for (image, crops, want) in [
        ("nope.jpg", crops, "nope.jpg: not found"),
        ("notes.jpg", crops, "not a JPEG, PNG or WebP"),
        ("bomb.png", crops, "30000x30000"),
        (img, "nope.csv", "nope.csv: not found"),
        (img, "bad.csv", "is not an integer"),
        (img, "edge.csv", "outside the 800x600 image"),
        (img, "700,500,200,50", "outside the 800x600 image"),
    ] {
        let o = producer(&["--image", image, "--crops", crops, "--repeat", "3"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want) && err.contains("nothing was enqueued"),
            "{image} {crops}: {err}"
        );
        assert!(f.spool_files("tasks", "ready").is_empty(), "{image} {crops}: something was enqueued");
    }
    // A good task goes in with absolute paths; --no-check passes a bad one through unchanged.
    let o = producer(&["--image", img, "--crops", crops, "--run-id", "ok"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = producer(&["--image", "nope.jpg", "--crops", crops, "--run-id", "unchecked", "--no-check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut tasks: Vec<serde_json::Value> = f
        .spool_files("tasks", "ready")
        .iter()
        .map(|n| serde_json::from_slice(&std::fs::read(f.path("tasks/ready").join(n)).unwrap()).unwrap())
        .collect();
    tasks.sort_by_key(|t| t["run_id"].as_str().unwrap().to_string());
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["image"], w.image.display().to_string());
    assert_eq!(tasks[0]["crops"], w.crops.display().to_string());
    assert_eq!(tasks[0]["output"], dir.join("out").display().to_string());
    assert_eq!((&tasks[1]["image"], &tasks[1]["output"]), (&"nope.jpg".into(), &"out".into()));
    // A manifest is checked line by line, and the error names the line.
    std::fs::write(
        dir.join("m.jsonl"),
        format!("{{\"image\":\"{img}\",\"crops\":\"{crops}\",\"output\":\"o\"}}\n{{\"image\":\"nope.jpg\",\"crops\":\"{crops}\",\"output\":\"o\"}}\n"),
    )
    .unwrap();
    let o = std::process::Command::new(bin("cropfleet-producer"))
        .args(["--queue", &f.tasks, "--manifest", "m.jsonl"])
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("manifest line 2") && err.contains("nope.jpg: not found"), "{err}");
    assert_eq!(f.spool_files("tasks", "ready").len(), 2, "the manifest enqueued nothing");
}

#[test]
fn poison_messages_are_dead_lettered_and_good_tasks_finish() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    // Poison: corrupt JPEG, a 30000x30000 PNG header, a missing source, a box past the edge.
    let corrupt = f.path("corrupt.jpg");
    let mut bytes = std::fs::read(&w.image).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, bytes).unwrap();
    let bomb = f.path("bomb.png");
    std::fs::write(&bomb, png_header(30000, 30000)).unwrap();
    let task = |id: &str, image: &str, crops: serde_json::Value| {
        serde_json::json!({"v": 1, "id": id, "image": image, "crops": crops, "output": out}).to_string()
    };
    let good_crops = serde_json::Value::from(crops.clone());
    let lines = [
        task("good-1", &img, good_crops.clone()),
        "{this is not json".to_string(),
        task("corrupt", &corrupt.display().to_string(), good_crops.clone()),
        task("good-2", &img, good_crops.clone()),
        task("bomb", &bomb.display().to_string(), good_crops.clone()),
        task("missing", "/nonexistent/x.jpg", good_crops.clone()),
        task("oob", &img, serde_json::json!([{"x": 700, "y": 0, "w": 200, "h": 10}])),
        serde_json::json!({"v": 9, "id": "future"}).to_string(),
        task("good-3", &img, good_crops),
    ];
    // Write messages straight into the spool, as a script would (the producer validates first).
    for (i, l) in lines.iter().enumerate() {
        let name = format!("{:013}-poison{i}.a1.json", i);
        std::fs::write(f.path("tasks/tmp").join(&name), l).unwrap();
        std::fs::rename(f.path("tasks/tmp").join(&name), f.path("tasks/ready").join(&name)).unwrap();
    }
    f.start_worker(&["--threads", "2", "--exit-when-idle", "1", "--max-attempts", "2", "--retry-base-ms", "50"]);
    assert!(f.workers[0].wait().unwrap().success(), "{}", f.logs());
    let dead = f.spool_files("tasks", "dead");
    let reasons: Vec<String> = dead
        .iter()
        .filter(|n| n.ends_with(".reason"))
        .map(|n| std::fs::read_to_string(f.path("tasks/dead").join(n)).unwrap())
        .collect();
    assert_eq!(reasons.len(), 6, "{reasons:#?}");
    let all = reasons.join("\n");
    for want in [
        "not JSON",
        "corrupt or truncated JPEG",
        "30000x30000",
        "not found",
        "crop #0",
        "unsupported task schema version 9",
    ] {
        assert!(all.contains(want), "no reason mentions {want:?}:\n{all}");
    }
    let outputs = f.outputs();
    assert_eq!(outputs.len(), 3 * CROPS, "{outputs:?}");
    assert!(outputs.iter().all(|o| o.starts_with("good-")));
}

#[test]
fn gs_locations_on_a_worker_without_cloud_storage_are_dead_lettered_at_once() {
    let f = Fleet::new();
    let w = workload(f.dir.path(), 3);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    let lines = [
        serde_json::json!({"v": 1, "id": "gs-out", "image": img, "crops": crops, "output": "gs://bkt/crops"}),
        serde_json::json!({"v": 1, "id": "gs-in", "image": "gs://bkt/in/a.jpg", "crops": crops, "output": out}),
        serde_json::json!({"v": 1, "id": "good", "image": img, "crops": crops, "output": out}),
    ];
    for (i, l) in lines.iter().enumerate() {
        let name = format!("{i:013}-gs{i}.a1.json");
        std::fs::write(f.path("tasks/tmp").join(&name), l.to_string()).unwrap();
        std::fs::rename(f.path("tasks/tmp").join(&name), f.path("tasks/ready").join(&name)).unwrap();
    }
    // A local run: no emulator, no credentials, an empty HOME. On a Google Cloud machine the
    // metadata server would count as credentials, so there the test checks `--gcs off` instead.
    let home = f.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let home_s = home.display().to_string();
    let on_gcp =
        cropfleet::gcp::detect_credentials_in(&|k| (k == "HOME").then(|| home_s.clone()), std::path::Path::new("/"))
            .is_some();
    let mode = if on_gcp { "off" } else { "auto" };
    let mut cmd = std::process::Command::new(bin("cropfleet-worker"));
    cmd.args(["--queue", &f.tasks, "--results", &f.results, "--http-addr", "off", "--log-format", "json"])
        .args(["--exit-when-idle", "1", "--max-attempts", "5", "--gcs", mode])
        .env("HOME", &home)
        .env("RUST_LOG", "info");
    for k in ["STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GCE_METADATA_HOST"] {
        cmd.env_remove(k);
    }
    let run = cmd.output().unwrap();
    let logs = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{logs}");
    assert!(logs.contains("Cloud Storage (gs://) not configured"), "{logs}");
    let reasons: Vec<String> = f
        .spool_files("tasks", "dead")
        .iter()
        .filter(|n| n.ends_with(".reason"))
        .map(|n| std::fs::read_to_string(f.path("tasks/dead").join(n)).unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:#?}\n{logs}");
    for uri in ["gs://bkt/crops", "gs://bkt/in/a.jpg"] {
        let r =
            reasons.iter().find(|r| r.contains(uri)).unwrap_or_else(|| panic!("no reason names {uri}: {reasons:#?}"));
        assert!(r.contains("Cloud Storage is not configured for this worker"), "{r}");
        assert!(!r.contains("gave up after"), "retried instead of dead-lettered at once: {r}");
    }
    // Dead-lettered on the first delivery: nothing retried, nothing left, the good task done.
    assert!(!logs.contains("will retry"), "{logs}");
    assert!(f.spool_files("tasks", "ready").is_empty() && f.spool_files("tasks", "inflight").is_empty());
    assert_eq!(f.outputs().len(), 3, "{:?}", f.outputs());
}

#[test]
fn killed_worker_loses_nothing_and_duplicates_count_once() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let n = 40;
    run_ok(
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
            "kill",
        ],
    );
    // A slow worker (1 thread, many in flight) that we SIGKILL while it holds claims.
    f.start_worker(&["--threads", "1", "--prefetch", "8", "--lease-secs", "1"]);
    wait_until(Duration::from_secs(30), "claims by the first worker", || f.spool_files("tasks", "inflight").len() >= 4);
    f.signal(0, libc::SIGKILL);
    let held = f.spool_files("tasks", "inflight").len();
    assert!(held >= 1);
    f.start_worker(&["--threads", "2", "--lease-secs", "1", "--exit-when-idle", "3"]);
    assert!(f.workers[1].wait().unwrap().success(), "{}", f.logs());
    assert_eq!(f.outputs().len(), n * CROPS, "lost crops; logs:\n{}", f.logs());
    assert!(f.spool_files("tasks", "dead").is_empty());
    // Redelivered claims carry a raised attempt count in their result events.
    let results = f.spool_files("results", "ready");
    assert!(results.len() >= n, "{} result events", results.len());
    // Publish one duplicate result event by hand: the aggregator must count the task once.
    let first = f.path("results/ready").join(&results[0]);
    let dup = f.path("results/ready").join(results[0].replace(".a1.json", "x.a1.json"));
    std::fs::copy(&first, &dup).unwrap();
    let runs = f.collect_runs(1);
    assert_eq!(runs[0]["tasks"], n as u64);
    assert!(runs[0]["duplicates"].as_u64().unwrap() >= 1);
}

#[test]
fn sigterm_drains_in_flight_work() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", "30"],
    );
    f.start_worker(&["--threads", "1", "--prefetch", "4"]);
    wait_until(Duration::from_secs(30), "first results", || !f.spool_files("results", "ready").is_empty());
    f.signal(0, libc::SIGTERM);
    let status = f.workers[0].wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", f.logs());
    // Every claimed task was finished and acked: nothing left in flight, and each finished task
    // has all its crops.
    assert!(f.spool_files("tasks", "inflight").is_empty(), "{:?}", f.spool_files("tasks", "inflight"));
    let done = f.spool_files("results", "ready").len();
    assert!(done < 30, "should have stopped early");
    assert_eq!(f.outputs().len(), done * CROPS);
    assert_eq!(f.spool_files("tasks", "ready").len(), 30 - done);
    assert!(f.logs().contains("draining"));
}

/// Run a sweep of `w` into `out` with scratch space in `dir`; `grid` and `more` are its flags.
fn sweep(
    w: &cropfleet::sample::Workload,
    dir: &std::path::Path,
    out: &std::path::Path,
    grid: &[&str],
    more: &[&str],
) -> std::process::Output {
    let (image, crops) = (w.image.display().to_string(), w.crops.display().to_string());
    let (out, work) = (out.display().to_string(), dir.join("work").display().to_string());
    let args =
        [&["sweep", "--image", &image, "--crops", &crops, "--out", &out, "--work-dir", &work], grid, more].concat();
    run_ok("cropfleet-aggregator", &args)
}

#[test]
fn sweep_writes_table_csv_json_and_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let w = workload(dir.path(), CROPS);
    let out = dir.path().join("sweep");
    let worker = bin("cropfleet-worker").display().to_string();
    let o = sweep(
        &w,
        dir.path(),
        &out,
        &["--processes", "1,2", "--threads", "1", "--tasks", "6"],
        &["--worker-bin", &worker, "--floor-secs", "0.2"],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("tasks/s"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("processes,threads,tasks,crops,wall_s,tasks_per_s,crops_per_s"));
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 2);
    for (row, procs) in rows.iter().zip(["1", "2"]) {
        assert_eq!((row[0].as_str(), row[2].as_str(), row[3].as_str()), (procs, "6", &*(6 * CROPS).to_string()));
        assert!(row[5].parse::<f64>().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(out.join("throughput.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tasks/s"));
    let png = image::open(out.join("throughput.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 560));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    // Provenance: machine, build, workload, time, load, URIs; this machine's limit, measured
    // before and after the grid, and each run against it; the outside clock.
    for r in json.as_array().unwrap() {
        let m = &r["machine"];
        assert!(m["cpu_model"].as_str().unwrap().len() > 3 && m["cores"].as_u64().unwrap() >= 1, "{r:#}");
        assert!(["AVX2", "SSE2", "NEON"].contains(&m["simd"].as_str().unwrap()), "{r:#}");
        assert!(m["kernel"].as_str().unwrap().starts_with("Linux "), "{r:#}");
        assert_eq!(r["build"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(!r["build"]["git_commit"].as_str().unwrap().is_empty());
        let started = r["started_utc"].as_str().unwrap();
        assert!(started.len() == 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T', "{started}");
        assert!(r["load_before"].as_f64().unwrap() >= 0.0);
        let wl = &r["workload"];
        assert_eq!(
            (wl["width"].as_u64(), wl["height"].as_u64(), wl["crops"].as_u64()),
            (Some(800), Some(600), Some(CROPS as u64))
        );
        assert_eq!(
            (wl["subsampling"].as_str(), wl["process"].as_str(), wl["quality"].as_u64()),
            (Some("4:2:0"), Some("baseline"), Some(85))
        );
        assert_eq!(wl["bytes"].as_u64(), Some(std::fs::metadata(&w.image).unwrap().len()));
        assert!(r["queue_uri"].as_str().unwrap().starts_with("spool:"), "{r:#}");
        let l = &r["limit"];
        let (before, after) = (l["floor_before_ms"].as_f64().unwrap(), l["floor_after_ms"].as_f64().unwrap());
        let cores = r["cores"].as_f64().unwrap();
        assert!(before > 0.0 && after > 0.0, "{l:#}");
        let limit = l["limit_tasks_per_s"].as_f64().unwrap();
        assert!((limit - cores * 2000.0 / (before + after)).abs() < 1e-6 * limit, "{l:#}");
        let pct = r["tasks_per_s"].as_f64().unwrap() / limit * 100.0;
        assert!((l["pct_of_limit"].as_f64().unwrap() - pct).abs() < 1e-6 * pct, "{l:#}");
        assert!(r["outside_tasks_per_s"].as_f64().unwrap() > 0.0, "{r:#}");
    }
    assert!(
        stdout.contains("% limit")
            && stdout.contains("machine: ")
            && stdout.contains("workload: 800x600 jpeg baseline 4:2:0"),
        "{stdout}"
    );
    let header = csv.lines().next().unwrap();
    for col in ["pct_of_limit", "limit_tasks_per_s", "started_utc", "cpu_model", "git_commit", "simd", "subsampling"] {
        assert!(header.split(',').any(|c| c == col), "{col} missing from {header}");
    }
}

#[test]
fn sweep_takes_lists_of_prefetch_and_upload_concurrency_and_report_names_other_machines() {
    let dir = tempfile::tempdir().unwrap();
    let w = workload(dir.path(), 4);
    let out = dir.path().join("sweep");
    let grid_args = ["--processes", "1", "--threads", "1", "--prefetch", "1,4", "--upload-concurrency", "2,8"];
    let o = sweep(&w, dir.path(), &out, &grid_args, &["--tasks", "2", "--floor-secs", "0"]);
    let runs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs.json")).unwrap()).unwrap();
    let grid: Vec<(u64, u64)> =
        runs.iter().map(|r| (r["prefetch"].as_u64().unwrap(), r["upload_concurrency"].as_u64().unwrap())).collect();
    assert_eq!(grid, [(1, 2), (4, 2), (1, 8), (4, 8)]);
    // --floor-secs 0: no limit, shown as "-".
    assert!(runs.iter().all(|r| r["limit"]["limit_tasks_per_s"] == 0.0));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(" pf ") && stdout.contains(" upc "), "{stdout}");
    // The same runs as if from another machine: report says so.
    let mut other = runs.clone();
    for r in &mut other {
        r["machine"]["cpu_model"] = "Another CPU".into();
        r["label"] = "other".into();
    }
    let other_file = dir.path().join("other.json");
    std::fs::write(&other_file, serde_json::to_string(&other).unwrap()).unwrap();
    let rep = dir.path().join("report");
    let o = run_ok(
        "cropfleet-aggregator",
        &[
            "report",
            &out.join("runs.json").display().to_string(),
            &other_file.display().to_string(),
            "--out",
            &rep.display().to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("runs from 2 different machines"), "{stdout}");
    let svg = std::fs::read_to_string(rep.join("throughput.svg")).unwrap();
    assert!(
        svg.contains("runs from 2 different machines") && svg.contains("spool, other"),
        "title and note in the picture"
    );
}

#[test]
fn lossless_mode_snaps_boxes_and_falls_back_for_png() {
    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let png = f.path("source.png");
    image::open(&w.image).unwrap().save(&png).unwrap();
    let png = png.display().to_string();
    for (image, run) in [(&img, "jpg"), (&png, "png")] {
        run_ok(
            "cropfleet-producer",
            &[
                "--queue",
                &f.tasks,
                "--image",
                image,
                "--crops",
                &crops,
                "--output",
                &out,
                "--repeat",
                "3",
                "--run-id",
                run,
                "--crop-mode",
                "lossless",
            ],
        );
    }
    f.start_worker(&["--threads", "2", "--exit-when-idle", "1"]);
    assert!(f.workers[0].wait().unwrap().success(), "{}", f.logs());
    assert_eq!(f.outputs().len(), 6 * CROPS);
    let events: Vec<serde_json::Value> = f
        .spool_files("results", "ready")
        .iter()
        .map(|n| serde_json::from_slice(&std::fs::read(f.path("results/ready").join(n)).unwrap()).unwrap())
        .collect();
    assert_eq!(events.len(), 6);
    let boxes = cropfleet::crops::parse_csv(&std::fs::read_to_string(&w.crops).unwrap()).unwrap();
    for ev in &events {
        if ev["run_id"] == "jpg" {
            assert_eq!(ev["mode"], "lossless", "{ev}");
            let written: Vec<cropfleet::CropBox> = serde_json::from_value(ev["written_boxes"].clone()).unwrap();
            for (b, wb) in boxes.iter().zip(&written) {
                assert!(wb.x <= b.x && wb.y <= b.y && wb.x % 8 == 0 && wb.y % 8 == 0, "{b} -> {wb}");
                assert!(wb.x + wb.w >= b.x + b.w && wb.y + wb.h >= b.y + b.h, "{b} -> {wb}");
            }
            // The crop on disk has the snapped size.
            let first = image::open(f.out.join(ev["task_id"].as_str().unwrap()).join("000.jpg")).unwrap();
            assert_eq!((first.width() as i64, first.height() as i64), (written[0].w, written[0].h));
        } else {
            assert_eq!(ev["mode"], "decode", "{ev}");
            assert!(ev["fallback"].as_str().unwrap().contains("JPEG"), "{ev}");
        }
    }
}
