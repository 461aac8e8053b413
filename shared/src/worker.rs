//! The worker loop: take tasks from a queue, run each through its stages (read the task, fetch
//! inputs, the CPU job, uploads as crops arrive, the result event; see `handle`), publish the
//! result event, then ack. CPU work runs on a dedicated rayon pool; the
//! async runtime only moves bytes. At most `prefetch` tasks are held at once, so downloads of the
//! next tasks overlap the CPU work of the current one; uploads start as each crop is encoded.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::crops::{self, CropBox};
use crate::engine::{self, CropBatch, EngineError, JobReport, JobSpec};
use crate::error::{Failure, TaskError};
use crate::queue::{ConsumerOptions, Delivery, Queue, QueueError};
use crate::secret::redact;
use crate::storage::{Location, Storage};
use crate::task::{CropMode, CropsSpec, PixelPath, ResultEvent, StageTimes, Task, RESULT_VERSION};
use crate::telemetry as tm;
use crate::util::now_ms;

/// Worker settings; the binary fills them from flags.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// CPU pool threads.
    pub threads: usize,
    /// Most tasks held (received, not yet acked) at once.
    pub prefetch: usize,
    /// Most uploads running at once, across all tasks.
    pub upload_concurrency: usize,
    /// Default JPEG quality when a task gives none.
    pub quality: u8,
    pub max_pixels: u64,
    pub max_source_bytes: u64,
    pub max_crops: usize,
    /// Deliveries before a transiently failing task is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Spool lease: how long a claim survives its worker.
    pub lease: Duration,
    /// Exit once the queue has been empty (and nothing in flight) this long.
    pub exit_when_idle: Option<Duration>,
    /// On shutdown, how long in-flight tasks may take to finish before being left for redelivery.
    pub shutdown_timeout: Duration,
    /// Identity in result events and logs.
    pub worker_id: String,
    /// Crop mode when a task names none.
    pub crop_mode: CropMode,
    /// Decode mode's pixel path when a task names none (default planar).
    pub pixel_path: PixelPath,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            prefetch: 16,
            upload_concurrency: 128,
            quality: engine::DEFAULT_QUALITY,
            max_pixels: engine::DEFAULT_MAX_PIXELS,
            max_source_bytes: crate::storage::DEFAULT_MAX_SOURCE_BYTES,
            max_crops: crops::DEFAULT_MAX_CROPS,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            exit_when_idle: None,
            shutdown_timeout: Duration::from_secs(25),
            worker_id: default_worker_id(),
            crop_mode: CropMode::Decode,
            pixel_path: PixelPath::Planar,
        }
    }
}

/// How long a receive under way when shutdown begins may still take (see [`Worker::run`]).
const RECEIVE_ON_SHUTDOWN: Duration = Duration::from_secs(2);

/// `hostname:pid`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Live state for health endpoints and tests.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// Connected to its queue and consuming.
    pub ready: AtomicBool,
    /// Shutdown requested: finishing in-flight work, taking no more.
    pub draining: AtomicBool,
    /// Unix ms of the last turn of the main loop (liveness).
    pub heartbeat_ms: AtomicU64,
    pub ok: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retried: AtomicU64,
}

/// What a finished `run` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSummary {
    pub ok: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    /// Tasks still running when the shutdown timeout ran out (left for redelivery).
    pub abandoned: u64,
}

struct Ctx {
    cfg: WorkerConfig,
    results: Arc<dyn Queue>,
    storage: Storage,
    pool: rayon::ThreadPool,
    uploads: Arc<Semaphore>,
    /// One permit per pool thread: at most `threads` CPU jobs exist at once, so a pool thread
    /// waiting inside one task's parallel encode cannot start yet another task's decode, and
    /// decoded buffers stay bounded by `threads`.
    cpu_jobs: Arc<Semaphore>,
    state: Arc<WorkerState>,
}

/// A worker: a CPU pool plus the queues and storage it serves.
pub struct Worker {
    ctx: Arc<Ctx>,
    queue: Arc<dyn Queue>,
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        queue: Arc<dyn Queue>,
        results: Arc<dyn Queue>,
        storage: Storage,
    ) -> std::io::Result<Worker> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("cropfleet-cpu-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let uploads = Arc::new(Semaphore::new(cfg.upload_concurrency.max(1)));
        let cpu_jobs = Arc::new(Semaphore::new(cfg.threads.max(1)));
        let ctx = Ctx { cfg, results, storage, pool, uploads, cpu_jobs, state: Arc::default() };
        Ok(Worker { ctx: Arc::new(ctx), queue })
    }

    /// Shared live state (readiness, draining, counters).
    pub fn state(&self) -> Arc<WorkerState> {
        self.ctx.state.clone()
    }

    /// Consume until `shutdown` resolves (or the idle timeout), then drain in-flight work for up to
    /// `shutdown_timeout`. Errors only if the queue cannot be opened at all.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<WorkerSummary, QueueError> {
        let cfg = &self.ctx.cfg;
        let state = &self.ctx.state;
        let opts = ConsumerOptions { prefetch: cfg.prefetch.max(1), max_attempts: cfg.max_attempts, lease: cfg.lease };
        let mut consumer = self.queue.consumer(opts).await?;
        state.ready.store(true, Ordering::SeqCst);
        info!(worker = %cfg.worker_id, threads = cfg.threads, prefetch = cfg.prefetch, uploads = cfg.upload_concurrency, backend = self.queue.backend(), "worker started");
        let slots = Arc::new(Semaphore::new(cfg.prefetch.max(1)));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut idle_since = Instant::now();
        let mut backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);
        loop {
            state.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
            while tasks.try_join_next().is_some() {}
            let slot = tokio::select! {
                _ = &mut shutdown => break,
                s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
            };
            // A receive is not abandoned half-way: the spool claims a message (a rename) in a
            // blocking task that finishes even when its future is dropped, and a claim dropped
            // here would sit in `inflight/` until its lease ran out. So on shutdown the receive
            // may still complete (its wait is 250 ms), what it got is processed and drained, and
            // then the loop stops. Bounded, so a reconnect in progress (RabbitMQ's connect
            // timeout is 10 s) cannot hold up SIGTERM; dropping that loses no message.
            let mut stopping = false;
            let next = {
                let receive = consumer.next(Duration::from_millis(250));
                tokio::pin!(receive);
                tokio::select! {
                    n = &mut receive => n,
                    _ = &mut shutdown => {
                        stopping = true;
                        tokio::time::timeout(RECEIVE_ON_SHUTDOWN, receive).await.unwrap_or(Ok(None))
                    }
                }
            };
            match next {
                Ok(Some(delivery)) => {
                    idle_since = Instant::now();
                    backoff = Duration::from_millis(100);
                    state.ready.store(true, Ordering::SeqCst);
                    let ctx = self.ctx.clone();
                    tasks.spawn(async move {
                        gauge!(tm::IN_FLIGHT).increment(1.0);
                        process(&ctx, delivery).await;
                        gauge!(tm::IN_FLIGHT).decrement(1.0);
                        drop(slot);
                    });
                }
                Ok(None) => {
                    drop(slot);
                    if let Some(idle) = cfg.exit_when_idle {
                        if tasks.is_empty() && idle_since.elapsed() >= idle {
                            info!(idle_s = idle.as_secs_f64(), "queue idle; exiting");
                            break;
                        }
                    }
                }
                Err(e) => {
                    drop(slot);
                    state.ready.store(false, Ordering::SeqCst);
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "receiving from the queue failed");
                    if !stopping {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            if stopping {
                break;
            }
        }
        state.draining.store(true, Ordering::SeqCst);
        state.ready.store(false, Ordering::SeqCst);
        consumer.stop().await;
        let pending = tasks.len();
        if pending > 0 {
            info!(pending, timeout_s = cfg.shutdown_timeout.as_secs_f64(), "draining in-flight tasks");
        }
        let drained =
            tokio::time::timeout(cfg.shutdown_timeout, async { while tasks.join_next().await.is_some() {} }).await;
        let abandoned = if drained.is_err() {
            let n = tasks.len() as u64;
            warn!(abandoned = n, "shutdown timeout: leaving unfinished tasks unacked for redelivery");
            tasks.abort_all();
            n
        } else {
            0
        };
        drop(consumer);
        let s = WorkerSummary {
            ok: state.ok.load(Ordering::Relaxed),
            dead_lettered: state.dead_lettered.load(Ordering::Relaxed),
            retried: state.retried.load(Ordering::Relaxed),
            abandoned,
        };
        info!(
            ok = s.ok,
            dead_lettered = s.dead_lettered,
            retried = s.retried,
            abandoned = s.abandoned,
            "worker stopped"
        );
        Ok(s)
    }
}

/// Exponential backoff for attempt `n` (1-based), capped.
pub fn retry_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max)
}

async fn process(ctx: &Ctx, d: Delivery) {
    let Delivery { id, payload, attempt, acker } = d;
    let task_id = peek_id(&payload);
    let span = info_span!("task", task_id = %task_id, msg = %id, attempt);
    async move {
        debug!("task received");
        let result = handle(ctx, &payload, attempt).await;
        let settled = match result {
            Ok(ev) => match ctx.results.publish(&ev.to_json()).await {
                Ok(()) => {
                    debug!(total_ms = ev.stages_ms.total, "task done");
                    counter!(tm::TASKS, "outcome" => "ok").increment(1);
                    ctx.state.ok.fetch_add(1, Ordering::Relaxed);
                    acker.ack().await
                }
                Err(e) => {
                    settle_failure(
                        ctx,
                        acker,
                        attempt,
                        Failure::Transient,
                        &format!("publishing the result event failed: {e}"),
                    )
                    .await
                }
            },
            Err(e) => settle_failure(ctx, acker, attempt, e.failure(), &format!("{}: {e}", e.kind())).await,
        };
        if let Err(e) = settled {
            warn!(error = %e, "could not settle the message; it will be redelivered");
        }
    }
    .instrument(span)
    .await
}

async fn settle_failure(
    ctx: &Ctx,
    acker: Box<dyn crate::queue::Acker>,
    attempt: u32,
    failure: Failure,
    reason: &str,
) -> Result<(), QueueError> {
    let cfg = &ctx.cfg;
    if failure == Failure::Transient && attempt < cfg.max_attempts {
        let delay = retry_delay(cfg.retry_base, cfg.retry_max, attempt);
        warn!(reason, retry_in_ms = delay.as_millis() as u64, "transient failure; will retry");
        counter!(tm::TASKS, "outcome" => "retried").increment(1);
        ctx.state.retried.fetch_add(1, Ordering::Relaxed);
        acker.retry(delay, reason).await
    } else {
        let reason = if failure == Failure::Transient {
            format!("gave up after {attempt} attempts: {reason}")
        } else {
            reason.to_string()
        };
        warn!(reason = %reason, "dead-lettering task");
        counter!(tm::TASKS, "outcome" => "dead_lettered").increment(1);
        ctx.state.dead_lettered.fetch_add(1, Ordering::Relaxed);
        acker.dead_letter(&reason).await
    }
}

/// The task id for logs, even from a message that will fail to parse.
fn peek_id(payload: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Peek {
        id: String,
    }
    serde_json::from_slice::<Peek>(payload).map(|p| p.id.chars().take(128).collect()).unwrap_or_else(|_| "?".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The task path: read the message, fetch inputs, the CPU job, uploads as crops arrive, the result
// event and metrics. `handle` runs these stages in order; each is a function below it.

/// Run one task to the point where every crop is stored; returns its result event.
async fn handle(ctx: &Ctx, payload: &[u8], attempt: u32) -> Result<ResultEvent, TaskError> {
    let started = Instant::now();
    let started_ms = now_ms();
    let plan = read_task(&ctx.cfg, &ctx.storage, payload)?;
    let (source, boxes) = fetch_inputs(ctx, &plan).await?;
    let download = started.elapsed();
    let boxes = Arc::new(boxes);
    let (crops, cpu_job) = schedule_cpu_job(ctx, source, boxes.clone(), plan.spec).await;
    let mut uploads = Uploads::default();
    uploads.store_as_ready(ctx, &plan.out, crops).await;
    let report = match cpu_job.await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            uploads.abort();
            return Err(e);
        }
        Err(_) => return Err(TaskError::Internal("CPU pool dropped the job".into())),
    };
    let bytes = uploads.finish().await?;
    let stages = StageTimes {
        queue_wait: plan.task.enqueued_ms.map(|e| started_ms.saturating_sub(e) as f64).unwrap_or(0.0),
        download: ms(download),
        decode: ms(report.timings.decode),
        crop_encode: ms(report.timings.crop_encode),
        upload: ms(uploads.since_first_crop()),
        total: ms(started.elapsed()),
    };
    record_metrics(&stages, boxes.len(), bytes);
    Ok(result_event(&ctx.cfg, &plan, attempt, started_ms, report, bytes, stages, boxes.len()))
}

/// A task whose message was read and checked: where its inputs and outputs are, how to cut.
struct Plan {
    task: Task,
    image: Location,
    /// `{output}/{task id}`: the folder or prefix its crops go to.
    out: Location,
    spec: JobSpec,
}

/// Stage 1: parse and check the message, before any download. Locations without a backend in
/// this worker (e.g. gs:// on a worker without Cloud Storage) fail here, permanently, naming
/// the URI.
fn read_task(cfg: &WorkerConfig, storage: &Storage, payload: &[u8]) -> Result<Plan, TaskError> {
    let task = Task::parse(payload)?;
    let image = Location::parse(&task.image)?;
    let out = Location::parse(&task.output)?;
    if matches!(out, Location::Http(_)) {
        return Err(TaskError::InvalidField {
            field: "output",
            reason: "http(s) outputs are not supported (read-only)".into(),
        });
    }
    storage.check(&image)?;
    storage.check(&out)?;
    let out = out.join(&task.id);
    let spec = JobSpec {
        mode: task.crop_mode.unwrap_or(cfg.crop_mode),
        pixel_path: task.pixel_path.unwrap_or(cfg.pixel_path),
        quality: task.quality.unwrap_or(cfg.quality),
        max_pixels: cfg.max_pixels,
        max_crops: cfg.max_crops,
    };
    Ok(Plan { task, image, out, spec })
}

/// Stage 2: the source image and the crop boxes, downloaded at once.
async fn fetch_inputs(ctx: &Ctx, plan: &Plan) -> Result<(Vec<u8>, Vec<CropBox>), TaskError> {
    let max = ctx.cfg.max_source_bytes;
    let (source, boxes) = tokio::try_join!(
        async { ctx.storage.get(&plan.image, max).await.map_err(TaskError::from) },
        load_boxes(&ctx.storage, &plan.task.crops, max),
    )?;
    crops::check_count(boxes.len(), ctx.cfg.max_crops)?;
    Ok((source, boxes))
}

async fn load_boxes(storage: &Storage, spec: &CropsSpec, max_bytes: u64) -> Result<Vec<CropBox>, TaskError> {
    match spec {
        CropsSpec::Inline(b) => Ok(b.clone()),
        CropsSpec::Uri(u) => {
            let loc = Location::parse(u)?;
            let bytes = storage.get(&loc, max_bytes.min(16 * 1024 * 1024)).await?;
            let text = String::from_utf8(bytes)
                .map_err(|_| EngineError::InvalidCrops(format!("{} is not UTF-8 text", redact(u))))?;
            Ok(crops::parse_csv(&text)?)
        }
    }
}

/// Stage 3: the CPU job ([`engine::run_job`]) on the CPU pool, once a CPU slot is free. Crops
/// come back on the first receiver as they are encoded; the job's report (or its error, or its
/// panic as an internal error) on the second once it is done.
async fn schedule_cpu_job(
    ctx: &Ctx,
    source: Vec<u8>,
    boxes: Arc<Vec<CropBox>>,
    spec: JobSpec,
) -> (mpsc::UnboundedReceiver<CropBatch>, oneshot::Receiver<Result<JobReport, TaskError>>) {
    let (tx, rx) = mpsc::unbounded_channel::<CropBatch>();
    let (done_tx, done_rx) = oneshot::channel();
    let permit = ctx.cpu_jobs.clone().acquire_owned().await.expect("semaphore never closed");
    ctx.pool.spawn(move || {
        let _permit = permit;
        gauge!(tm::CPU_BUSY).increment(1.0);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine::run_job(source, &boxes, &spec, |batch| {
                let _ = tx.send(batch);
            })
        }));
        gauge!(tm::CPU_BUSY).decrement(1.0);
        let res = match run {
            Ok(r) => r.map_err(TaskError::from),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(TaskError::Internal(format!("CPU job panicked: {msg}")))
            }
        };
        let _ = done_tx.send(res);
    });
    (rx, done_rx)
}

/// Stage 4: the uploads of one task, each started as its crops arrive and bounded by the
/// worker-wide semaphore (one permit per crop).
#[derive(Default)]
struct Uploads {
    running: JoinSet<Result<u64, TaskError>>,
    /// When the first crop arrived: the upload stage's time runs from there.
    first_crop: Option<Instant>,
}

impl Uploads {
    /// Start uploading every batch from `crops` until the CPU job closes it.
    async fn store_as_ready(&mut self, ctx: &Ctx, out: &Location, mut crops: mpsc::UnboundedReceiver<CropBatch>) {
        let capacity = ctx.cfg.upload_concurrency.max(1);
        while let Some(batch) = crops.recv().await {
            self.first_crop.get_or_insert_with(Instant::now);
            let mut rest = batch.into_iter().peekable();
            while rest.peek().is_some() {
                let items: Vec<(Location, Vec<u8>)> =
                    rest.by_ref().take(capacity).map(|(i, bytes)| (out.join(&format!("{i:03}.jpg")), bytes)).collect();
                let permit =
                    ctx.uploads.clone().acquire_many_owned(items.len() as u32).await.expect("semaphore never closed");
                let storage = ctx.storage.clone();
                self.running.spawn(async move {
                    let n = items.len() as f64;
                    gauge!(tm::UPLOADS_IN_FLIGHT).increment(n);
                    let r = storage.put_many(items).await;
                    gauge!(tm::UPLOADS_IN_FLIGHT).decrement(n);
                    drop(permit);
                    r.map_err(TaskError::from)
                });
            }
        }
    }

    /// Wait for every upload; the bytes stored, or the first failure (the rest are aborted).
    async fn finish(&mut self) -> Result<u64, TaskError> {
        let mut bytes = 0;
        while let Some(r) = self.running.join_next().await {
            match r {
                Ok(Ok(n)) => bytes += n,
                Ok(Err(e)) => {
                    self.abort();
                    return Err(e);
                }
                Err(e) => return Err(TaskError::Internal(format!("upload task failed: {e}"))),
            }
        }
        Ok(bytes)
    }

    fn abort(&mut self) {
        self.running.abort_all();
    }

    fn since_first_crop(&self) -> Duration {
        self.first_crop.map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// Stage 5a: the stage histograms and throughput counters.
fn record_metrics(stages: &StageTimes, crops: usize, bytes: u64) {
    for (stage, v) in [
        ("queue_wait", stages.queue_wait),
        ("download", stages.download),
        ("decode", stages.decode),
        ("crop_encode", stages.crop_encode),
        ("upload", stages.upload),
        ("total", stages.total),
    ] {
        histogram!(tm::STAGE_SECONDS, "stage" => stage).record(v / 1000.0);
    }
    counter!(tm::CROPS).increment(crops as u64);
    counter!(tm::BYTES).increment(bytes);
}

/// Stage 5b: the result event, published by the caller before it acks.
#[allow(clippy::too_many_arguments)]
fn result_event(
    cfg: &WorkerConfig,
    plan: &Plan,
    attempt: u32,
    started_ms: u64,
    report: JobReport,
    bytes: u64,
    stages: StageTimes,
    crops: usize,
) -> ResultEvent {
    ResultEvent {
        v: RESULT_VERSION,
        task_id: plan.task.id.clone(),
        run_id: plan.task.run_id.clone(),
        worker: cfg.worker_id.clone(),
        attempt,
        crops: crops as u32,
        bytes,
        output: plan.out.to_string(),
        mode: report.mode,
        fallback: report.fallback,
        pixel_path: report.pixel_path,
        pixel_fallback: report.pixel_fallback,
        written_boxes: report.written,
        width: report.width,
        height: report.height,
        started_ms,
        finished_ms: now_ms(),
        stages_ms: stages,
        threads: cfg.threads as u32,
        upload_concurrency: cfg.upload_concurrency as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(retry_delay(b, m, 1), Duration::from_millis(100));
        assert_eq!(retry_delay(b, m, 3), Duration::from_millis(400));
        assert_eq!(retry_delay(b, m, 30), m);
    }
}
