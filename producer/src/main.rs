//! `cropfleet-producer`: enqueue crop tasks (from flags repeated N times, or a JSONL manifest
//! file or stdin), or create queue topology with `setup`. Reports what the queue confirmed.

use std::io::{BufRead, IsTerminal};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cropfleet::logging::{self, LogFormat};
use cropfleet::precheck::{Checker, Limits};
use cropfleet::produce::{self, Template};
use cropfleet::queue::{self, Queue};
use cropfleet::secret::redact;
use indicatif::{ProgressBar, ProgressStyle};

/// Enqueue crop tasks. Every flag can also be set by the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "cropfleet-producer", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    enqueue: Enqueue,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the queues (spool folders, RabbitMQ topology, Pub/Sub topics); idempotent.
    Setup {
        /// Task queue URI.
        #[arg(long, env = "CROPFLEET_QUEUE", default_value = "spool:cropfleet-data/tasks")]
        queue: String,
        /// Results queue URI.
        #[arg(long, env = "CROPFLEET_RESULTS", default_value = "spool:cropfleet-data/results")]
        results: String,
    },
    /// List the messages in the task queue's dead-letter destination, each with its reason, and
    /// leave them there (RabbitMQ: NAME.dead; Pub/Sub: subscription NAME-dead-sub, whose messages
    /// are consumed by reading them; spool: PATH/dead).
    DeadLetters {
        /// Task queue URI (its dead-letter destination is read).
        #[arg(long, env = "CROPFLEET_QUEUE", default_value = "spool:cropfleet-data/tasks")]
        queue: String,
        /// At most this many messages.
        #[arg(long, env = "CROPFLEET_MAX", default_value_t = 100)]
        max: usize,
        /// One JSON object per line ({"id", "reason", "payload"}) instead of text.
        #[arg(long, env = "CROPFLEET_JSON")]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct Enqueue {
    /// Task queue: spool:PATH, amqp://user:pass@host:5672/%2f?queue=NAME or pubsub://PROJECT/NAME.
    #[arg(long, env = "CROPFLEET_QUEUE", default_value = "spool:cropfleet-data/tasks")]
    queue: String,
    /// Source image: path, file://, gs:// or http(s)://.
    #[arg(long, env = "CROPFLEET_IMAGE", required_unless_present = "manifest")]
    image: Option<String>,
    /// Crop boxes: a CSV URI/path (header x,y,w,h), inline `x,y,w,h;x,y,w,h`, or a JSON array.
    #[arg(long, env = "CROPFLEET_CROPS", required_unless_present = "manifest")]
    crops: Option<String>,
    /// Output prefix; crops land at {output}/{task_id}/{index:03}.jpg.
    #[arg(long, env = "CROPFLEET_OUTPUT", required_unless_present = "manifest")]
    output: Option<String>,
    /// How many tasks to enqueue from the flags (ids {run_id}-000000, -000001, …).
    #[arg(long, env = "CROPFLEET_REPEAT", default_value_t = 1)]
    repeat: usize,
    /// JPEG quality for these tasks [default: the worker's].
    #[arg(long, env = "CROPFLEET_QUALITY", value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: Option<u8>,
    /// Crop mode for these tasks: decode or lossless [default: the worker's].
    #[arg(long, env = "CROPFLEET_CROP_MODE")]
    crop_mode: Option<cropfleet::task::CropMode>,
    /// Decode mode's pixel path for these tasks: planar or rgb [default: the worker's].
    #[arg(long, env = "CROPFLEET_PIXEL_PATH")]
    pixel_path: Option<cropfleet::task::PixelPath>,
    /// JSONL manifest, one task object per line ("-" = stdin); v, id and run_id are filled in.
    #[arg(long, env = "CROPFLEET_MANIFEST", conflicts_with_all = ["image", "crops", "output"])]
    manifest: Option<String>,
    /// Publish each manifest line verbatim, unparsed and unchecked (replaying messages, or
    /// testing how workers treat bad input); needs --manifest.
    #[arg(long, env = "CROPFLEET_RAW", requires = "manifest")]
    raw: bool,
    /// Run id stamped on every task [default: run-{unix_ms}].
    #[arg(long, env = "CROPFLEET_RUN_ID")]
    run_id: Option<String>,
    /// Skip the checks before enqueueing (local image exists and is a supported image within
    /// --max-pixels, crop list parses and fits it, local paths made absolute): for local paths
    /// that exist only where the workers run.
    #[arg(long, env = "CROPFLEET_NO_CHECK")]
    no_check: bool,
    /// Largest source the check accepts (width x height); keep it equal to the workers'.
    #[arg(long, env = "CROPFLEET_MAX_PIXELS", default_value_t = cropfleet::engine::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Most crops per task the check accepts; keep it equal to the workers'.
    #[arg(long, env = "CROPFLEET_MAX_CROPS", default_value_t = cropfleet::crops::DEFAULT_MAX_CROPS)]
    max_crops: usize,
    /// Messages published per confirmed batch.
    #[arg(long, env = "CROPFLEET_BATCH", default_value_t = 256)]
    batch: usize,
    /// Log format: auto, text, json.
    #[arg(long, env = "CROPFLEET_LOG_FORMAT", default_value = "auto")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.enqueue.log_format);
    match args.cmd {
        Some(Cmd::Setup { queue, results }) => setup(&queue, &results).await,
        Some(Cmd::DeadLetters { queue, max, json }) => dead_letters(&queue, max, json).await,
        None => enqueue(args.enqueue).await,
    }
}

async fn setup(queue_uri: &str, results_uri: &str) -> anyhow::Result<()> {
    for uri in [queue_uri, results_uri] {
        let shown = redact(uri);
        let q = queue::open(uri).await.with_context(|| format!("opening {shown}"))?;
        q.setup().await.with_context(|| format!("setting up {shown}"))?;
        println!("ready: {shown} ({})", q.backend());
    }
    Ok(())
}

async fn dead_letters(queue_uri: &str, max: usize, json: bool) -> anyhow::Result<()> {
    let shown = redact(queue_uri);
    let q = queue::open(queue_uri).await.with_context(|| format!("opening {shown}"))?;
    let dead = q.dead_letters(max).await.with_context(|| format!("reading the dead letters of {shown}"))?;
    for d in &dead {
        let payload = String::from_utf8_lossy(&d.payload);
        if json {
            println!("{}", serde_json::json!({ "id": d.id, "reason": d.reason, "payload": payload }));
        } else {
            println!("{}\t{}\t{}", d.id, d.reason, payload.chars().take(200).collect::<String>());
        }
    }
    eprintln!("{} dead letters ({})", dead.len(), q.backend());
    Ok(())
}

async fn enqueue(a: Enqueue) -> anyhow::Result<()> {
    let run_id = a.run_id.clone().unwrap_or_else(produce::new_run_id);
    cropfleet::task::validate_id(&run_id).context("--run-id")?;
    let mut checker = (!a.no_check).then(|| Checker::new(Limits { max_pixels: a.max_pixels, max_crops: a.max_crops }));
    let tasks: Vec<Vec<u8>> = match &a.manifest {
        Some(path) if a.raw => read_lines(path)?.into_iter().map(|(_, l)| l.into_bytes()).collect(),
        Some(path) => read_manifest(path, &run_id, checker.as_mut())?,
        None => {
            let mut t = Template {
                image: a.image.clone().expect("required by clap"),
                crops: produce::crops_spec(a.crops.as_deref().expect("required by clap")).context("--crops")?,
                output: a.output.clone().expect("required by clap"),
                quality: a.quality,
                crop_mode: a.crop_mode,
                pixel_path: a.pixel_path,
            };
            if let Some(c) = checker.as_mut() {
                let ok = c.check(&t.image, &t.crops, &t.output).context(CHECK_HINT)?;
                (t.image, t.crops, t.output) = (ok.image, ok.crops, ok.output);
            }
            (0..a.repeat)
                .map(|i| {
                    let task = produce::task_from_template(&t, &run_id, i);
                    task.validate().map(|_| task.to_json())
                })
                .collect::<Result<_, _>>()
                .context("invalid task")?
        }
    };
    let q = queue::open(&a.queue).await.with_context(|| format!("opening {}", redact(&a.queue)))?;
    let total = tasks.len();
    let (confirmed, err) = publish(&*q, &tasks, a.batch.max(1)).await;
    println!("run {run_id}: {confirmed} of {total} tasks confirmed by {} ({})", redact(&a.queue), q.backend());
    if let Some(e) = err {
        bail!("publishing stopped after {confirmed} of {total} confirmed: {e}");
    }
    Ok(())
}

/// Context of a failed check: how to get past it when the workers see what the producer cannot.
const CHECK_HINT: &str = "checking the task before enqueueing (nothing was enqueued; --no-check skips the check)";

fn read_manifest(path: &str, run_id: &str, mut checker: Option<&mut Checker>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for (lineno, line) in read_lines(path)? {
        let mut task = produce::task_from_manifest_line(&line, run_id, lineno)?;
        if let Some(c) = checker.as_deref_mut() {
            let ok = c
                .check(&task.image, &task.crops, &task.output)
                .with_context(|| format!("manifest line {lineno}"))
                .context(CHECK_HINT)?;
            (task.image, task.crops, task.output) = (ok.image, ok.crops, ok.output);
        }
        out.push(task.to_json());
    }
    Ok(out)
}

/// The manifest's lines with their 1-based numbers, without blank and `#` lines.
fn read_lines(path: &str) -> anyhow::Result<Vec<(usize, String)>> {
    let reader: Box<dyn BufRead> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening manifest {path}"))?,
        ))
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading manifest {path}"))?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        out.push((i + 1, line));
    }
    Ok(out)
}

/// Publish in confirmed batches, showing progress; returns the confirmed count and any error.
async fn publish(q: &dyn Queue, tasks: &[Vec<u8>], batch: usize) -> (usize, Option<queue::QueueError>) {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = ProgressBar::new(tasks.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{spinner} confirmed {pos}/{len} [{bar:30}] {per_sec} eta {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut confirmed = 0;
    let mut last_line = Instant::now();
    for chunk in tasks.chunks(batch) {
        let (n, err) = q.publish_many(chunk).await;
        confirmed += n;
        bar.set_position(confirmed as u64);
        if !tty && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!("confirmed {confirmed}/{}", tasks.len());
            last_line = Instant::now();
        }
        if err.is_some() {
            bar.abandon();
            return (confirmed, err);
        }
    }
    bar.finish_and_clear();
    (confirmed, None)
}
