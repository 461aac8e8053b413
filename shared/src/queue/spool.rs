//! `spool:PATH` — the embedded queue: a directory on local disk, safe across processes.
//!
//! Layout (scripts may rely on it):
//! - `PATH/ready/` — one JSON message per file, named `{eligible_ms}-{id}.a{attempt}.json`:
//!   `eligible_ms` (13 digits, Unix ms) is when it may be taken, so name order is delivery order
//!   and a delayed retry is a file whose name lies in the future; `attempt` counts deliveries.
//!   To enqueue by hand, write the file elsewhere on the same file system and `mv` it in.
//! - `PATH/inflight/` — a worker claims a message by atomic `rename` from `ready/`; the file's
//!   mtime is its lease, renewed while the worker holds it. Ack deletes the file. A claim whose
//!   lease has expired (its worker died) is moved back to `ready/` with its attempt raised, by
//!   whichever worker notices first.
//! - `PATH/dead/` — messages that failed for good or too often, each beside `NAME.reason`, a
//!   text file saying why.
//! - `PATH/tmp/` — where publishers write before the rename into `ready/`.

use std::collections::{HashSet, VecDeque};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::{Acker, Consumer, ConsumerOptions, DeadLetter, Delivery, Queue, QueueError};
use crate::util::now_ms;

const DIRS: [&str; 4] = ["ready", "inflight", "dead", "tmp"];

/// A spool directory queue.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

/// A parsed message file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageName {
    pub eligible_ms: u64,
    pub id: String,
    pub attempt: u32,
}

impl MessageName {
    pub fn parse(name: &str) -> Option<MessageName> {
        let stem = name.strip_suffix(".json")?;
        let (head, attempt) = stem.rsplit_once(".a")?;
        let (eligible, id) = head.split_once('-')?;
        Some(MessageName { eligible_ms: eligible.parse().ok()?, id: id.to_string(), attempt: attempt.parse().ok()? })
    }
    pub fn render(&self) -> String {
        format!("{:013}-{}.a{}.json", self.eligible_ms, self.id, self.attempt)
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> QueueError + 'a {
    move |source| QueueError::Io { op, path: path.to_path_buf(), source }
}

/// Set a file's mtime to now (one syscall); false if it is gone.
fn touch(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; a null `times` means "now".
    unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) == 0 }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| QueueError::Broker(format!("spool task panicked: {e}")))?
}

impl Spool {
    pub fn new(root: impl Into<PathBuf>) -> Spool {
        Spool { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn create_dirs(root: &Path) -> Result<(), QueueError> {
        for d in DIRS {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        Ok(())
    }

    /// Publish synchronously (used from blocking contexts and by `publish`).
    pub fn publish_blocking(root: &Path, payload: &[u8]) -> Result<(), QueueError> {
        let name =
            MessageName { eligible_ms: now_ms(), id: uuid::Uuid::now_v7().simple().to_string(), attempt: 1 }.render();
        let tmp = root.join("tmp").join(&name);
        if let Err(e) = std::fs::write(&tmp, payload) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io("write", &tmp)(e));
            }
            Self::create_dirs(root)?;
            std::fs::write(&tmp, payload).map_err(io("write", &tmp))?;
        }
        let dst = root.join("ready").join(&name);
        std::fs::rename(&tmp, &dst).map_err(io("rename", &dst))
    }

    fn count(root: &Path, dir: &str) -> Result<u64, QueueError> {
        let p = root.join(dir);
        match std::fs::read_dir(&p) {
            Ok(rd) => {
                Ok(rd.filter_map(Result::ok).filter(|e| e.file_name().as_bytes().ends_with(b".json")).count() as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io("list", &p)(e)),
        }
    }

    /// Messages in `inflight/` (claimed, not yet settled).
    pub fn inflight(&self) -> Result<u64, QueueError> {
        Self::count(&self.root, "inflight")
    }
}

#[async_trait]
impl Queue for Spool {
    async fn setup(&self) -> Result<(), QueueError> {
        let root = self.root.clone();
        blocking(move || Self::create_dirs(&root)).await
    }

    async fn publish(&self, payload: &[u8]) -> Result<(), QueueError> {
        let (root, payload) = (self.root.clone(), payload.to_vec());
        blocking(move || Self::publish_blocking(&root, &payload)).await
    }

    async fn publish_many(&self, payloads: &[Vec<u8>]) -> (usize, Option<QueueError>) {
        let (root, payloads) = (self.root.clone(), payloads.to_vec());
        let res = tokio::task::spawn_blocking(move || {
            for (i, p) in payloads.iter().enumerate() {
                if let Err(e) = Self::publish_blocking(&root, p) {
                    return (i, Some(e));
                }
            }
            (payloads.len(), None)
        })
        .await;
        res.unwrap_or_else(|e| (0, Some(QueueError::Broker(e.to_string()))))
    }

    async fn consumer(&self, opts: ConsumerOptions) -> Result<Box<dyn Consumer>, QueueError> {
        self.setup().await?;
        let held: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let keeper = tokio::spawn(lease_keeper(self.root.clone(), held.clone(), opts.clone()));
        Ok(Box::new(SpoolConsumer { root: self.root.clone(), cache: VecDeque::new(), held, keeper, opts }))
    }

    async fn depth(&self) -> Result<Option<u64>, QueueError> {
        let root = self.root.clone();
        blocking(move || Self::count(&root, "ready").map(Some)).await
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let dir = self.root.join("dead");
        blocking(move || {
            let mut names: Vec<String> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
                Err(e) => return Err(io("list", &dir)(e)),
            };
            names.sort();
            names
                .into_iter()
                .take(max)
                .map(|n| {
                    let p = dir.join(&n);
                    let payload = std::fs::read(&p).map_err(io("read", &p))?;
                    let reason = std::fs::read_to_string(dir.join(format!("{n}.reason"))).unwrap_or_default();
                    let id = MessageName::parse(&n).map(|m| m.id).unwrap_or(n);
                    Ok(DeadLetter { id, payload, reason: reason.trim().to_string() })
                })
                .collect()
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "spool"
    }
}

/// Renews the leases this consumer holds and returns expired claims of dead workers.
async fn lease_keeper(root: PathBuf, held: Arc<Mutex<HashSet<PathBuf>>>, opts: ConsumerOptions) {
    let tick = (opts.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(tick).await;
        let (root, held, opts) = (root.clone(), held.clone(), opts.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let mine: Vec<PathBuf> = held.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
            for p in &mine {
                touch(p);
            }
            reap(&root, &held, &opts);
        })
        .await;
    }
}

/// Move claims whose lease expired back to `ready/` (or to `dead/` after too many attempts).
fn reap(root: &Path, held: &Mutex<HashSet<PathBuf>>, opts: &ConsumerOptions) {
    let dir = root.join("inflight");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in rd.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(msg) = MessageName::parse(&name) else {
            continue;
        };
        if held.lock().unwrap_or_else(|e| e.into_inner()).contains(&path) {
            continue;
        }
        let Ok(mtime) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if now.duration_since(mtime).unwrap_or_default() <= opts.lease {
            continue;
        }
        if msg.attempt >= opts.max_attempts {
            let reason = format!(
                "lease expired on delivery {} of {}: the worker died or stalled every time it processed this message",
                msg.attempt, opts.max_attempts
            );
            let _ = std::fs::write(root.join("dead").join(format!("{name}.reason")), reason);
            let _ = std::fs::rename(&path, root.join("dead").join(&name));
        } else {
            let next = MessageName { eligible_ms: now_ms(), id: msg.id, attempt: msg.attempt + 1 };
            // Losing this race to another worker's reaper is fine: one rename wins.
            let _ = std::fs::rename(&path, root.join("ready").join(next.render()));
        }
    }
}

struct SpoolConsumer {
    root: PathBuf,
    cache: VecDeque<String>,
    held: Arc<Mutex<HashSet<PathBuf>>>,
    keeper: tokio::task::JoinHandle<()>,
    opts: ConsumerOptions,
}

impl Drop for SpoolConsumer {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl SpoolConsumer {
    /// Try to claim one eligible message: list `ready/` when the cache is empty, then rename.
    fn try_claim(
        root: &Path,
        cache: &mut VecDeque<String>,
    ) -> Result<Option<(MessageName, PathBuf, Vec<u8>)>, QueueError> {
        let ready = root.join("ready");
        if cache.is_empty() {
            let mut names: Vec<String> = std::fs::read_dir(&ready)
                .map_err(io("list", &ready))?
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect();
            names.sort();
            cache.extend(names);
        }
        let now = now_ms();
        let mut deferred = VecDeque::new();
        while let Some(name) = cache.pop_front() {
            let Some(msg) = MessageName::parse(&name) else {
                continue;
            };
            if msg.eligible_ms > now {
                deferred.push_back(name);
                continue;
            }
            let src = ready.join(&name);
            // Renew first, so a reaper never sees a fresh claim with an old mtime.
            if !touch(&src) {
                continue; // taken by another worker
            }
            let dst = root.join("inflight").join(&name);
            match std::fs::rename(&src, &dst) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("claim", &src)(e)),
            }
            let payload = std::fs::read(&dst).map_err(io("read", &dst))?;
            deferred.extend(cache.drain(..));
            *cache = deferred;
            return Ok(Some((msg, dst, payload)));
        }
        // Only future (delayed) messages remain; forget them so the next poll re-lists.
        Ok(None)
    }
}

#[async_trait]
impl Consumer for SpoolConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        loop {
            let root = self.root.clone();
            let mut cache = std::mem::take(&mut self.cache);
            let (claimed, cache) = tokio::task::spawn_blocking(move || {
                let r = Self::try_claim(&root, &mut cache);
                (r, cache)
            })
            .await
            .map_err(|e| QueueError::Broker(e.to_string()))?;
            self.cache = cache;
            if let Some((msg, path, payload)) = claimed? {
                self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone());
                let acker = SpoolAcker { root: self.root.clone(), path, msg: msg.clone(), held: self.held.clone() };
                return Ok(Some(Delivery { id: msg.id, payload, attempt: msg.attempt, acker: Box::new(acker) }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            let _ = &self.opts;
        }
    }
}

struct SpoolAcker {
    root: PathBuf,
    path: PathBuf,
    msg: MessageName,
    held: Arc<Mutex<HashSet<PathBuf>>>,
}

impl SpoolAcker {
    fn forget(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.path);
    }

    /// Move the claim back to `ready/`, eligible after `delay`, with `attempt`.
    async fn requeue(self: Box<Self>, delay: Duration, attempt: u32) -> Result<(), QueueError> {
        self.forget();
        let next = MessageName { eligible_ms: now_ms() + delay.as_millis() as u64, id: self.msg.id.clone(), attempt };
        let dst = self.root.join("ready").join(next.render());
        blocking(move || match std::fs::rename(&self.path, &dst) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()), // lease lost: already requeued
            other => other.map_err(io("requeue", &dst)),
        })
        .await
    }
}

#[async_trait]
impl Acker for SpoolAcker {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.forget();
        blocking(move || match std::fs::remove_file(&self.path) {
            // Our lease expired and another worker took the message back: it will be processed
            // again, which deterministic output names make harmless.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(io("ack", &self.path)),
        })
        .await
    }

    async fn retry(self: Box<Self>, delay: Duration, _reason: &str) -> Result<(), QueueError> {
        let attempt = self.msg.attempt + 1;
        self.requeue(delay, attempt).await
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        self.forget();
        let reason = reason.to_string();
        blocking(move || {
            let name = self.msg.render();
            let dead = self.root.join("dead");
            let note = dead.join(format!("{name}.reason"));
            std::fs::write(&note, reason).map_err(io("write", &note))?;
            match std::fs::rename(&self.path, dead.join(&name)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other.map_err(io("dead-letter", &self.path)),
            }
        })
        .await
    }

    async fn release(self: Box<Self>) -> Result<(), QueueError> {
        let attempt = self.msg.attempt;
        self.requeue(Duration::ZERO, attempt).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_eligibility() {
        let m = MessageName { eligible_ms: 1_732_000_000_000, id: "abc".into(), attempt: 3 };
        assert_eq!(MessageName::parse(&m.render()), Some(m.clone()));
        let later = MessageName { eligible_ms: m.eligible_ms + 1, ..m.clone() };
        assert!(m.render() < later.render());
        assert_eq!(MessageName::parse("junk.json"), None);
    }

    #[tokio::test]
    async fn publish_claim_ack_retry_dead() {
        let dir = tempfile::tempdir().unwrap();
        let q = Spool::new(dir.path());
        q.setup().await.unwrap();
        q.publish(b"one").await.unwrap();
        q.publish(b"two").await.unwrap();
        assert_eq!(q.depth().await.unwrap(), Some(2));
        let mut c = q.consumer(ConsumerOptions::default()).await.unwrap();
        let d1 = c.next(Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!((d1.payload.as_slice(), d1.attempt), (&b"one"[..], 1));
        d1.acker.retry(Duration::from_millis(300), "flaky").await.unwrap();
        let d2 = c.next(Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(d2.payload, b"two");
        d2.acker.dead_letter("bad input: test").await.unwrap();
        // The retried message is delayed, then comes back with attempt 2.
        let t = std::time::Instant::now();
        let d3 = c.next(Duration::from_secs(3)).await.unwrap().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!((d3.payload.as_slice(), d3.attempt), (&b"one"[..], 2));
        d3.acker.ack().await.unwrap();
        assert!(c.next(Duration::from_millis(50)).await.unwrap().is_none());
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].payload.as_slice(), dead[0].reason.as_str()), (&b"two"[..], "bad input: test"));
        assert_eq!(q.inflight().unwrap(), 0);
    }

    #[tokio::test]
    async fn expired_leases_come_back_then_die() {
        let dir = tempfile::tempdir().unwrap();
        let q = Spool::new(dir.path());
        q.publish(b"crashy").await.unwrap();
        let opts = ConsumerOptions { lease: Duration::from_millis(300), max_attempts: 2, ..Default::default() };
        // A consumer that claims and then "dies" (is dropped without settling).
        let mut dying = q.consumer(opts.clone()).await.unwrap();
        let d = dying.next(Duration::from_secs(1)).await.unwrap().unwrap();
        drop(dying);
        std::mem::forget(d.acker); // never settled, as if the process was killed
        let mut c = q.consumer(opts.clone()).await.unwrap();
        let d = c.next(Duration::from_secs(5)).await.unwrap().expect("redelivered after lease expiry");
        assert_eq!(d.attempt, 2);
        drop(c);
        std::mem::forget(d.acker);
        let c2 = q.consumer(opts).await.unwrap();
        let t = std::time::Instant::now();
        while q.dead_letters(1).await.unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "never dead-lettered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(c2);
        let dead = q.dead_letters(1).await.unwrap();
        assert!(dead[0].reason.contains("lease expired on delivery 2 of 2"), "{}", dead[0].reason);
    }
}
