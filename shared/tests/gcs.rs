//! The Cloud Storage backend against a real fake-gcs-server. The emulator comes from
//! `STORAGE_EMULATOR_HOST` when set, else from `scripts/emulators.sh start` (idempotent: it
//! reuses running emulators, or starts them and installs fake-gcs-server on first use). Every test
//! uses its own bucket.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cropfleet::gcp;
use cropfleet::storage::gcs::{GcsOptions, GcsStore};
use cropfleet::storage::{Location, ObjectStore, Storage, StorageError};
use cropfleet::Failure;

/// The emulator endpoint, starting the emulators once per test process if needed.
fn endpoint() -> String {
    static EP: OnceLock<String> = OnceLock::new();
    EP.get_or_init(|| {
        if let Some(ep) = gcp::emulator_host(gcp::STORAGE_EMULATOR_HOST) {
            return ep;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/emulators.sh");
        let out = Command::new(&script).arg("start").output().expect("running scripts/emulators.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "emulators.sh start failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let host = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("export STORAGE_EMULATOR_HOST="))
            .unwrap_or_else(|| panic!("no STORAGE_EMULATOR_HOST in:\n{stdout}"));
        gcp::endpoint_url(host)
    })
    .clone()
}

/// A store on the emulator and a fresh bucket.
async fn store_and_bucket() -> (GcsStore, String) {
    let store = GcsStore::new(GcsOptions::emulator(&endpoint()));
    let bucket = format!("cf-test-{}", uuid::Uuid::new_v4().simple());
    store.create_bucket(&bucket).await.unwrap();
    (store, bucket)
}

fn gs(bucket: &str, key: &str) -> Location {
    Location::parse(&format!("gs://{bucket}/{key}")).unwrap()
}

#[tokio::test]
async fn gcs_put_get_list_round_trip() {
    let (store, bucket) = store_and_bucket().await;
    let base = gs(&bucket, "out/run1");
    store.put(&base.join("t1").join("000.jpg"), b"first".to_vec()).await.unwrap();
    store.put(&base.join("t1").join("001.jpg"), vec![7u8; 100_000]).await.unwrap();
    store.put(&base.join("t2").join("000.jpg"), b"third".to_vec()).await.unwrap();
    store.put(&gs(&bucket, "out/run10/t9/000.jpg"), b"sibling prefix".to_vec()).await.unwrap();

    assert_eq!(store.get(&base.join("t1").join("000.jpg"), 1024).await.unwrap(), b"first");
    let big = store.get(&base.join("t1").join("001.jpg"), 1 << 20).await.unwrap();
    assert_eq!(big.len(), 100_000);
    assert!(big.iter().all(|b| *b == 7));
    // The prefix is a folder: out/run10 is not under out/run1.
    assert_eq!(store.list(&base).await.unwrap(), vec!["t1/000.jpg", "t1/001.jpg", "t2/000.jpg"]);
    assert_eq!(store.list(&gs(&bucket, "out/run1/")).await.unwrap().len(), 3);
    assert_eq!(store.list(&gs(&bucket, "")).await.unwrap().len(), 4);
    assert!(store.list(&gs(&bucket, "nothing-here")).await.unwrap().is_empty());

    // Deterministic names: writing again overwrites.
    store.put(&base.join("t1").join("000.jpg"), b"second".to_vec()).await.unwrap();
    assert_eq!(store.get(&base.join("t1").join("000.jpg"), 1024).await.unwrap(), b"second");
    assert_eq!(store.list(&base).await.unwrap().len(), 3);

    // Through the facade, as the worker uses it.
    let storage = Storage::local_only().with_gcs(Arc::new(store));
    let loc = gs(&bucket, "crops.csv");
    storage.put(&loc, b"x,y,w,h\n0,0,1,1\n".to_vec()).await.unwrap();
    assert_eq!(storage.get(&loc, 1024).await.unwrap(), b"x,y,w,h\n0,0,1,1\n");
}

#[tokio::test]
async fn gcs_put_many_50_objects() {
    let (store, bucket) = store_and_bucket().await;
    let storage = Storage::local_only().with_gcs(Arc::new(store));
    let base = gs(&bucket, "out/task-1");
    let items: Vec<(Location, Vec<u8>)> =
        (0..50).map(|i| (base.join(&format!("{i:03}.jpg")), format!("crop {i}").into_bytes())).collect();
    let want: u64 = items.iter().map(|(_, d)| d.len() as u64).sum();
    let t = Instant::now();
    assert_eq!(storage.put_many(items).await.unwrap(), want);
    let took = t.elapsed();
    let names = storage.list(&base).await.unwrap();
    assert_eq!(names.len(), 50, "{names:?}");
    assert_eq!(names[0], "000.jpg");
    assert_eq!(names[49], "049.jpg");
    assert_eq!(storage.get(&base.join("042.jpg"), 100).await.unwrap(), b"crop 42");
    eprintln!("put_many of 50 objects took {took:?}");
}

#[tokio::test]
async fn gcs_missing_object_is_permanent_not_found() {
    let (store, bucket) = store_and_bucket().await;
    let e = store.get(&gs(&bucket, "no/such/object.jpg"), 1024).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Permanent);
    assert!(e.to_string().contains("no/such/object.jpg"), "{e}");
    let e = store.get(&gs("cf-no-such-bucket-x", "a.jpg"), 1024).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");
    // Not an object name: refused before any request.
    let e = store.get(&gs(&bucket, ""), 1024).await.unwrap_err();
    assert!(matches!(e, StorageError::Invalid { .. }), "{e:?}");
}

#[tokio::test]
async fn gcs_size_limit() {
    let (store, bucket) = store_and_bucket().await;
    let loc = gs(&bucket, "src/big.jpg");
    store.put(&loc, vec![1u8; 10_000]).await.unwrap();
    let e = store.get(&loc, 9_999).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { limit: 9_999, .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Permanent);
    assert_eq!(store.get(&loc, 10_000).await.unwrap().len(), 10_000);
}

/// Nothing listens: connection refused is retried by the client, then reported as transient,
/// well within the call timeout.
#[tokio::test]
async fn gcs_unreachable_endpoint_is_transient_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let opts = GcsOptions {
        timeout: Duration::from_secs(10),
        attempts: 3,
        ..GcsOptions::emulator(&format!("127.0.0.1:{port}"))
    };
    let store = GcsStore::new(opts);
    let t = Instant::now();
    let e = store.get(&gs("bkt", "a.jpg"), 1024).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Transient);
    let e = store.put(&gs("bkt", "a.jpg"), b"x".to_vec()).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    let e = store.list(&gs("bkt", "out")).await.unwrap_err();
    assert_eq!(e.failure(), Failure::Transient, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
}

/// A server that accepts connections and never answers: the client alone would hang; the call
/// timeout turns it into a transient error.
#[tokio::test]
async fn gcs_silent_endpoint_times_out_as_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let opts = GcsOptions { timeout: Duration::from_secs(2), ..GcsOptions::emulator(&addr.to_string()) };
    let store = GcsStore::new(opts);
    let t = Instant::now();
    let e = store.get(&gs("bkt", "a.jpg"), 1024).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
    let e = store.put(&gs("bkt", "a.jpg"), b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.failure(), Failure::Transient, "{e:?}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(8), "took {took:?}");
    hold.abort();
}
