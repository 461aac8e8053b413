//! End to end over Cloud Storage (fake-gcs-server): producer → spool → 2 workers that read a
//! `gs://` source image and crops CSV and write `gs://` crops → aggregator. The emulator comes
//! from `STORAGE_EMULATOR_HOST` when set, else from `scripts/emulators.sh start`.

mod common;

use common::*;
use cropfleet::gcp;
use cropfleet::storage::gcs::{GcsOptions, GcsStore};
use cropfleet::storage::{Location, ObjectStore};

const CROPS: usize = 12;
const TASKS: usize = 10;

#[test]
fn gcs_sources_and_outputs_with_two_workers() {
    let endpoint = gcs_emulator_endpoint();
    // The only test in this binary: the workers inherit the variable.
    std::env::set_var(gcp::STORAGE_EMULATOR_HOST, &endpoint);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = GcsStore::new(GcsOptions::emulator(&endpoint));
    let bucket = format!("cf-e2e-{}", uuid::Uuid::new_v4().simple());
    let gs = |key: &str| format!("gs://{bucket}/{key}");

    let mut f = Fleet::new();
    let w = workload(f.dir.path(), CROPS);
    rt.block_on(async {
        store.create_bucket(&bucket).await.unwrap();
        let img = std::fs::read(&w.image).unwrap();
        let csv = std::fs::read(&w.crops).unwrap();
        store.put(&Location::parse(&gs("src/photo.jpg")).unwrap(), img).await.unwrap();
        store.put(&Location::parse(&gs("src/crops.csv")).unwrap(), csv).await.unwrap();
    });

    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    let p = run_ok(
        "cropfleet-producer",
        &[
            "--queue",
            &f.tasks,
            "--image",
            &gs("src/photo.jpg"),
            "--crops",
            &gs("src/crops.csv"),
            "--output",
            &gs("out/run1"),
            "--repeat",
            &TASKS.to_string(),
            "--run-id",
            "gcs",
        ],
    );
    assert!(String::from_utf8_lossy(&p.stdout).contains(&format!("{TASKS} of {TASKS} tasks confirmed")));
    f.start_worker(&["--threads", "1", "--exit-when-idle", "1"]);
    f.start_worker(&["--threads", "1", "--exit-when-idle", "1", "--upload-concurrency", "8"]);
    for w in &mut f.workers {
        assert!(w.wait().unwrap().success());
    }
    assert!(f.spool_files("tasks", "dead").is_empty(), "{:?}\n{}", f.spool_files("tasks", "dead"), f.logs());

    let names = rt.block_on(store.list(&Location::parse(&gs("out/run1")).unwrap())).unwrap();
    assert_eq!(names.len(), TASKS * CROPS, "{}", f.logs());
    assert!(names.contains(&"gcs-000000/000.jpg".to_string()), "{names:?}");
    assert!(names.contains(&format!("gcs-{:06}/{:03}.jpg", TASKS - 1, CROPS - 1)), "{names:?}");
    let crop = rt.block_on(store.get(&Location::parse(&gs("out/run1/gcs-000003/007.jpg")).unwrap(), 1 << 20)).unwrap();
    assert_eq!(&crop[..2], &[0xFF, 0xD8], "a JPEG");
    let agg = f.path("agg");
    run_ok(
        "cropfleet-aggregator",
        &["collect", "--results", &f.results, "--out", &agg.display().to_string(), "--expect", &TASKS.to_string()],
    );
    let csv = std::fs::read_to_string(agg.join("runs.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!((row[2], row[3]), (&*TASKS.to_string(), &*(TASKS * CROPS).to_string()), "{csv}");
}
