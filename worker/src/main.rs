//! `cropfleet-worker`: consume crop tasks from a queue until stopped (SIGTERM/SIGINT drain
//! in-flight work) or, with `--exit-when-idle`, until the queue stays empty.
//! Thin wiring: flags → [`cropfleet::worker::Worker`], plus the health/metrics listener.

mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use cropfleet::logging::{self, LogFormat};
use cropfleet::secret::redact;
use cropfleet::worker::{Worker, WorkerConfig};
use cropfleet::{engine, queue, storage};

/// Consume crop tasks: download, decode once, crop, encode, upload every crop in parallel,
/// publish a result event, ack. Every flag can also be set by the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "cropfleet-worker", version)]
struct Args {
    /// Task queue: spool:PATH, amqp://user:pass@host:5672/%2f?queue=NAME or pubsub://PROJECT/NAME.
    #[arg(long, env = "CROPFLEET_QUEUE", default_value = "spool:cropfleet-data/tasks")]
    queue: String,
    /// Where result events go (same URI forms as --queue).
    #[arg(long, env = "CROPFLEET_RESULTS", default_value = "spool:cropfleet-data/results")]
    results: String,
    /// CPU threads for decoding and encoding [default: number of cores].
    #[arg(long, env = "CROPFLEET_THREADS")]
    threads: Option<usize>,
    /// Tasks held at once (received, not yet acked). Downloads and uploads of other tasks overlap
    /// the CPU work of the current ones; with ~50 ms per storage request a task spends ~0.2 s in
    /// flight, so ~35 tasks/s needs ~7 held: 16 leaves room (measured: 96–98% of the no-latency
    /// throughput with 50 ms added, scripts/latency.sh). Each slot costs one source file (a few
    /// MB), not a decoded image: those are bounded by --threads.
    #[arg(long, env = "CROPFLEET_PREFETCH", default_value_t = 16)]
    prefetch: usize,
    /// Uploads running at once across all tasks. Hiding ~50 ms per request at ~35 tasks/s × 50
    /// crops takes 1750 × 0.05 ≈ 88 in flight; 128 leaves room (32 measured 55% of the
    /// no-latency throughput for one worker, 128 measured 98%). Local disk needs far fewer.
    #[arg(long, env = "CROPFLEET_UPLOAD_CONCURRENCY", default_value_t = 128)]
    upload_concurrency: usize,
    /// JPEG quality of crops when a task gives none (1-100; 4:2:0 chroma).
    #[arg(long, env = "CROPFLEET_QUALITY", default_value_t = engine::DEFAULT_QUALITY, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Crop mode when a task names none: decode (decode once, re-encode each crop) or lossless
    /// (JPEG sources cut in the DCT domain, no re-encode; boxes snap outward to the 8/16 px
    /// grid; other sources fall back to decode and the result event says why).
    #[arg(long, env = "CROPFLEET_CROP_MODE", default_value = "decode")]
    crop_mode: cropfleet::task::CropMode,
    /// Decode mode's pixels when a task names none: planar (YCbCr JPEGs decoded to their planes,
    /// crops encoded 4:2:0 from plane windows, no colour conversion; EXIF-rotated, CMYK, PNG and
    /// WebP sources take rgb, and the result event says why) or rgb (decode to packed RGB,
    /// encode each crop from RGB).
    #[arg(long, env = "CROPFLEET_PIXEL_PATH", default_value = "planar")]
    pixel_path: cropfleet::task::PixelPath,
    /// Largest source image accepted, in pixels (checked from the header, before decoding).
    #[arg(long, env = "CROPFLEET_MAX_PIXELS", default_value_t = engine::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Largest source file accepted, in bytes. Sources (image, crops CSV) may be local paths,
    /// gs://bucket/key or http(s):// URLs; outputs local paths or gs://bucket/prefix. gs:// uses
    /// Application Default Credentials, or the emulator named by STORAGE_EMULATOR_HOST.
    #[arg(long, env = "CROPFLEET_MAX_SOURCE_BYTES", default_value_t = storage::DEFAULT_MAX_SOURCE_BYTES)]
    max_source_bytes: u64,
    /// Let http(s):// sources reach loopback, private and link-local addresses. Off by default:
    /// such sources (also as redirect targets) are refused and dead-lettered.
    #[arg(long, env = "CROPFLEET_ALLOW_PRIVATE_SOURCES")]
    allow_private_sources: bool,
    /// Cloud Storage (gs://): auto serves it when STORAGE_EMULATOR_HOST or Application Default
    /// Credentials are found without a network call (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    /// ADC file, or running on Google Cloud), else gs:// tasks are dead-lettered at once
    /// ("Cloud Storage is not configured for this worker"); on always uses ADC; off never.
    #[arg(long, env = "CROPFLEET_GCS", default_value = "auto")]
    gcs: storage::GcsMode,
    /// Most crops in one task.
    #[arg(long, env = "CROPFLEET_MAX_CROPS", default_value_t = cropfleet::crops::DEFAULT_MAX_CROPS)]
    max_crops: usize,
    /// Deliveries before a task that keeps failing transiently is dead-lettered.
    #[arg(long, env = "CROPFLEET_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt, capped at 60 s.
    #[arg(long, env = "CROPFLEET_RETRY_BASE_MS", default_value_t = 500)]
    retry_base_ms: u64,
    /// Spool queues: seconds a claim survives without renewal before another worker takes it
    /// back (how soon a killed worker's tasks are redelivered).
    #[arg(long, env = "CROPFLEET_LEASE_SECS", default_value_t = 30.0)]
    lease_secs: f64,
    /// Exit once the queue has been empty and nothing is in flight for this many seconds.
    #[arg(long, env = "CROPFLEET_EXIT_WHEN_IDLE")]
    exit_when_idle: Option<f64>,
    /// On SIGTERM, seconds in-flight tasks may take to finish; unfinished ones are left unacked
    /// for redelivery. Keep it below the orchestrator's grace period.
    #[arg(long, env = "CROPFLEET_SHUTDOWN_TIMEOUT", default_value_t = 25.0)]
    shutdown_timeout: f64,
    /// Health and metrics listener (/healthz, /readyz, /metrics); "off" disables it. When this
    /// flag (or its variable) is not given and the default port is taken, e.g. by another worker
    /// on the same host, the worker listens on a free port and logs the address; a given address
    /// that is taken is an error.
    #[arg(long, env = "CROPFLEET_HTTP_ADDR", default_value = http::DEFAULT_ADDR)]
    http_addr: String,
    /// Log format: auto (text on a terminal, JSON otherwise), text, json.
    #[arg(long, env = "CROPFLEET_LOG_FORMAT", default_value = "auto")]
    log_format: LogFormat,
    /// Identity in logs and result events [default: hostname:pid].
    #[arg(long, env = "CROPFLEET_WORKER_ID")]
    worker_id: Option<String>,
}

fn main() -> anyhow::Result<()> {
    cropfleet::util::keep_allocations_resident();
    let matches = Args::command().get_matches();
    let http_addr_given = matches.value_source("http_addr") != Some(ValueSource::DefaultValue);
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(args.log_format);
    // The async side only moves bytes; two threads are plenty, the CPU pool is separate.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cropfleet-io")
        .enable_all()
        .build()?;
    rt.block_on(run(args, http_addr_given))
}

async fn run(args: Args, http_addr_given: bool) -> anyhow::Result<()> {
    let defaults = WorkerConfig::default();
    let cfg = WorkerConfig {
        threads: args.threads.unwrap_or(defaults.threads).max(1),
        prefetch: args.prefetch.max(1),
        upload_concurrency: args.upload_concurrency.max(1),
        quality: args.quality,
        max_pixels: args.max_pixels,
        max_source_bytes: args.max_source_bytes,
        max_crops: args.max_crops,
        max_attempts: args.max_attempts.max(1),
        retry_base: Duration::from_millis(args.retry_base_ms),
        lease: Duration::from_secs_f64(args.lease_secs.max(0.2)),
        exit_when_idle: args.exit_when_idle.map(Duration::from_secs_f64),
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        worker_id: args.worker_id.clone().unwrap_or(defaults.worker_id),
        crop_mode: args.crop_mode,
        pixel_path: args.pixel_path,
        ..defaults
    };
    let metrics = http::install_metrics()?;
    let tasks =
        queue::open(&args.queue).await.with_context(|| format!("opening task queue {}", redact(&args.queue)))?;
    let results =
        queue::open(&args.results).await.with_context(|| format!("opening results queue {}", redact(&args.results)))?;
    let storage = storage::Storage::from_env(storage::StorageOptions {
        allow_private_sources: args.allow_private_sources,
        gcs: args.gcs,
    })
    .context("setting up storage")?;
    match (storage.gcs_status(), args.gcs) {
        (Ok(()), storage::GcsMode::On) => tracing::info!("Cloud Storage (gs://) on (--gcs on)"),
        (Ok(()), _) => {
            let via = cropfleet::gcp::detect_credentials().unwrap_or_default();
            tracing::info!(credentials = %via, "Cloud Storage (gs://) configured")
        }
        (Err(reason), _) => {
            tracing::info!(reason, "Cloud Storage (gs://) not configured; gs:// tasks are dead-lettered")
        }
    }
    let worker = Worker::new(cfg, tasks, results, storage).context("starting the CPU pool")?;
    if args.http_addr != "off" {
        let addr: SocketAddr = args.http_addr.parse().with_context(|| format!("--http-addr {:?}", args.http_addr))?;
        let listener = http::bind(addr, http_addr_given).await?;
        tracing::info!(addr = %listener.local_addr()?, "health and metrics listener");
        tokio::spawn(http::serve(listener, worker.state(), Arc::new(metrics)));
    }
    let summary = worker.run(shutdown_signal()).await.context("worker failed")?;
    if summary.abandoned > 0 {
        tracing::warn!(abandoned = summary.abandoned, "exiting with unfinished tasks left for redelivery");
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
