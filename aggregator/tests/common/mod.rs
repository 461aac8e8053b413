//! Helpers for end-to-end tests: locate (or build) the real binaries, run them on spool queues
//! in a temporary folder, wait for conditions with a deadline.
#![allow(dead_code)]

pub mod poison;
pub mod proxy;
pub mod tls_broker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of a workspace binary. The first call in a test process runs `cargo build --bins`
/// (a no-op when fresh): cargo builds only this package's binaries for its own tests, and a
/// stale worker binary would test old code.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    BUILT.get_or_init(|| {
        // scripts/test.sh builds every binary before the tests and sets this, so parallel
        // tests do not queue on cargo's build lock.
        if std::env::var_os("CROPFLEET_TEST_BINS_BUILT").is_some() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building the workspace binaries failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// Run a binary to completion, asserting success; returns its output.
pub fn run_ok(name: &str, args: &[&str]) -> Output {
    let out = Command::new(bin(name)).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A spool-backed fleet in a temporary folder.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub tasks: String,
    pub results: String,
    pub out: PathBuf,
    pub workers: Vec<Child>,
}

impl Fleet {
    pub fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let tasks = format!("spool:{}", dir.path().join("tasks").display());
        let results = format!("spool:{}", dir.path().join("results").display());
        let out = dir.path().join("out");
        Fleet { dir, tasks, results, out, workers: vec![] }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Start a worker with extra flags; logs go to `worker-N.log`.
    pub fn start_worker(&mut self, extra: &[&str]) -> u32 {
        let n = self.workers.len();
        let log = std::fs::File::create(self.path(&format!("worker-{n}.log"))).unwrap();
        let child = Command::new(bin("cropfleet-worker"))
            .args(["--queue", &self.tasks, "--results", &self.results, "--http-addr", "off", "--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.workers.push(child);
        pid
    }

    /// Files directly in a spool sub-folder (`ready`, `inflight`, `dead`) of a queue dir.
    pub fn spool_files(&self, queue: &str, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(queue).join(sub))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Crop files under the output folder, relative paths.
    pub fn outputs(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.out) else { return out };
        for task in rd.filter_map(Result::ok) {
            for f in std::fs::read_dir(task.path()).unwrap().filter_map(Result::ok) {
                out.push(format!("{}/{}", task.file_name().to_string_lossy(), f.file_name().to_string_lossy()));
            }
        }
        out.sort();
        out
    }

    pub fn logs(&self) -> String {
        (0..self.workers.len())
            .map(|n| std::fs::read_to_string(self.path(&format!("worker-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn signal(&self, index: usize, sig: i32) {
        unsafe { libc::kill(self.workers[index].id() as i32, sig) };
    }

    /// Run `cropfleet-aggregator collect` on the results queue until it has been idle for
    /// `idle_secs`, into `agg/`; its runs.json.
    pub fn collect_runs(&self, idle_secs: u32) -> serde_json::Value {
        let agg = self.path("agg");
        let idle = idle_secs.to_string();
        run_ok(
            "cropfleet-aggregator",
            &["collect", "--results", &self.results, "--out", &agg.display().to_string(), "--idle-secs", &idle],
        );
        serde_json::from_str(&std::fs::read_to_string(agg.join("runs.json")).unwrap()).unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Poll `cond` until it holds or `limit` passes (then panic with `what`).
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small photo-like workload (800x600, `crops` boxes) in `dir`.
pub fn workload(dir: &Path, crops: usize) -> cropfleet::sample::Workload {
    cropfleet::sample::write_workload_sized(dir, 800, 600, crops).unwrap()
}

/// The broker lock shared with `shared/tests/rabbitmq.rs`: tests that restart RabbitMQ hold it
/// exclusively, every other RabbitMQ test holds it shared.
pub struct BrokerLock(std::fs::File);

pub fn broker_lock(exclusive: bool) -> BrokerLock {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/tmp/cropfleet-rabbitmq-tests.lock")
        .expect("lock file");
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op) }, 0);
    BrokerLock(f)
}

/// RabbitMQ queues (by URI) whose topology is deleted when the test ends, passed or not.
pub struct Topology(pub Vec<String>);

impl Drop for Topology {
    fn drop(&mut self) {
        let uris = std::mem::take(&mut self.0);
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            for u in uris {
                let _ = cropfleet::queue::amqp::Amqp::from_uri(&u).unwrap().delete_topology().await;
            }
        });
    }
}

/// A RabbitMQ URI for a fresh queue name unique to this test.
pub fn amqp_uri(prefix: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:5672/%2f?queue={prefix}-{}&heartbeat=5", uuid::Uuid::new_v4().simple())
}

/// An emulator variable (`STORAGE_EMULATOR_HOST`, `PUBSUB_EMULATOR_HOST`): its value when set,
/// else the one printed by `scripts/emulators.sh start`, which starts (or finds) the emulators.
pub fn emulator_var(var: &str) -> String {
    if let Ok(h) = std::env::var(var) {
        if !h.trim().is_empty() {
            return h.trim().to_string();
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/emulators.sh");
    let out = Command::new(&script).arg("start").output().expect("running scripts/emulators.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "emulators.sh start failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("export {var}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {var} in:\n{stdout}"))
}

/// The Cloud Storage emulator's endpoint URL (see [`emulator_var`]).
pub fn gcs_emulator_endpoint() -> String {
    cropfleet::gcp::endpoint_url(&emulator_var(cropfleet::gcp::STORAGE_EMULATOR_HOST))
}
