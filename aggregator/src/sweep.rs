//! `sweep`: for each configuration of a grid (worker processes × CPU threads × prefetch ×
//! upload concurrency × crop mode), start that many real `cropfleet-worker` processes on fresh
//! queues, enqueue the same workload, wait until every task's result event arrived, stop the
//! workers, and record the run — with its provenance (machine, build, workload, load) and this
//! machine's codec limit, measured before and after the grid (`floor`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use cropfleet::floor::{self, FloorSample, Limit};
use cropfleet::precheck::{Checker, Limits};
use cropfleet::produce::{self, Template};
use cropfleet::provenance::{load_average, Machine, Workload};
use cropfleet::queue::{self, amqp, pubsub, ConsumerOptions, Queue, QueueUri};
use cropfleet::secret::redact;
use cropfleet::stats::{short_commit, RunCollector, RunRecord};
use cropfleet::storage::{Location, Storage, StorageOptions, DEFAULT_MAX_SOURCE_BYTES};
use cropfleet::task::{CropMode, PixelPath, ResultEvent};
use cropfleet::CropBox;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    /// Worker process counts to try.
    #[arg(long, env = "CROPFLEET_PROCESSES", value_delimiter = ',', default_value = "1,2")]
    pub processes: Vec<u32>,
    /// CPU threads per worker to try.
    #[arg(long, env = "CROPFLEET_THREADS", value_delimiter = ',', default_value = "1,2,4")]
    pub threads: Vec<u32>,
    /// Tasks (source images) per configuration.
    #[arg(long, env = "CROPFLEET_TASKS", default_value_t = 200)]
    pub tasks: usize,
    /// Source image [default: the generated 12 MP sample].
    #[arg(long, env = "CROPFLEET_IMAGE", requires = "crops")]
    pub image: Option<String>,
    /// Crops CSV (header x,y,w,h) [default: the generated 50-box list].
    #[arg(long, env = "CROPFLEET_CROPS", requires = "image")]
    pub crops: Option<String>,
    /// Crop modes to run, each over the whole grid: decode, lossless (tasks carry the mode).
    #[arg(long, env = "CROPFLEET_CROP_MODES", value_delimiter = ',', default_value = "decode")]
    pub crop_modes: Vec<CropMode>,
    /// Decode mode's pixel paths to run, each over the whole grid: planar, rgb (tasks carry the
    /// path; runs are recorded as mode `decode` and `decode-rgb`).
    #[arg(long, env = "CROPFLEET_PIXEL_PATHS", value_delimiter = ',', default_value = "planar")]
    pub pixel_paths: Vec<PixelPath>,
    /// Size of the generated sample in megapixels (4:3; e.g. 50 for a memory check).
    #[arg(long, env = "CROPFLEET_SAMPLE_MP", default_value_t = 12)]
    pub sample_mp: u32,
    /// JPEG quality of the crops (4:2:0).
    #[arg(long, env = "CROPFLEET_QUALITY", default_value_t = 85, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Folder for runs.csv, runs.json, throughput.svg/png, worker logs and the sample workload.
    #[arg(long, env = "CROPFLEET_OUT", default_value = "results/sweep")]
    pub out: PathBuf,
    /// Scratch folder for queues and crops, emptied after each configuration
    /// [default: /dev/shm/cropfleet-sweep-PID when /dev/shm exists, else OUT/work].
    #[arg(long, env = "CROPFLEET_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Task queue base URI [default: a spool in the work folder]; each configuration gets its own
    /// queues derived from it (spool:ROOT → ROOT/p2t4/tasks; amqp://…?queue=crops → crops.p2t4
    /// and crops.p2t4.results, deleted before and after the run; pubsub://P/crops → topics
    /// crops.p2t4 and crops.p2t4.results with their subscriptions, likewise).
    #[arg(long, env = "CROPFLEET_QUEUE")]
    pub queue: Option<String>,
    /// Tasks each worker holds at once (worker --prefetch), a list like --threads: each value
    /// is one more axis of the grid.
    #[arg(long, env = "CROPFLEET_PREFETCH", value_delimiter = ',', default_value = "16")]
    pub prefetch: Vec<u32>,
    /// Uploads each worker runs at once (worker --upload-concurrency), a list like --threads.
    #[arg(long, env = "CROPFLEET_UPLOAD_CONCURRENCY", value_delimiter = ',', default_value = "128")]
    pub upload_concurrency: Vec<u32>,
    /// Seconds spent measuring this machine's codec floor for each crop mode, before and after
    /// the grid (the limit the `% limit` column compares with); 0 skips it.
    #[arg(long, env = "CROPFLEET_FLOOR_SECS", default_value_t = 2.0)]
    pub floor_secs: f64,
    /// Label of these runs in the table and picture [default: the queue backend, e.g. spool].
    #[arg(long, env = "CROPFLEET_LABEL")]
    pub label: Option<String>,
    /// The worker binary [default: next to this binary, else on PATH].
    #[arg(long, env = "CROPFLEET_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Extra argument passed to every worker (repeatable), e.g. --worker-arg=--crop-mode=lossless.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Give up on a configuration when no task finished for this many seconds.
    #[arg(long, env = "CROPFLEET_STALL_SECS", default_value_t = 120.0)]
    pub stall_secs: f64,
    /// Keep the crops of each configuration instead of deleting them.
    #[arg(long, env = "CROPFLEET_KEEP_OUTPUTS")]
    pub keep_outputs: bool,
    /// Who starts the workers (local processes, or compose/Kubernetes through shell templates).
    #[command(flatten)]
    pub launcher: crate::launcher::LauncherArgs,
}

/// One configuration of the grid.
#[derive(Debug, Clone, Copy)]
struct Config {
    processes: u32,
    threads: u32,
    prefetch: u32,
    upload_concurrency: u32,
    mode: CropMode,
    /// Decode mode's pixel path (ignored by lossless).
    pixel: PixelPath,
    /// Whether the grid varies prefetch / upload concurrency (then the tag names them).
    axes: (bool, bool),
}

impl Config {
    /// Names the configuration's queues and folders: `p2t4`, `p2t4f8u32-lossless`, …
    fn tag(&self) -> String {
        let mut t = format!("p{}t{}", self.processes, self.threads);
        if self.axes.0 {
            t.push_str(&format!("f{}", self.prefetch));
        }
        if self.axes.1 {
            t.push_str(&format!("u{}", self.upload_concurrency));
        }
        if self.variant() != "decode" {
            t.push_str(&format!("-{}", self.variant()));
        }
        t
    }

    /// The crop mode and pixel path as runs record them: `decode` (planar), `decode-rgb`,
    /// `lossless`.
    fn variant(&self) -> String {
        variant(self.mode, self.pixel)
    }

    /// For the progress bar: `1 proc x 2 thr`, with the axes that vary.
    fn describe(&self) -> String {
        let mut d = format!("{} proc x {} thr", self.processes, self.threads);
        if self.axes.0 {
            d.push_str(&format!(" pf {}", self.prefetch));
        }
        if self.axes.1 {
            d.push_str(&format!(" upc {}", self.upload_concurrency));
        }
        d
    }
}

/// How a run records its crop mode and pixel path: `decode` (planar), `decode-rgb`, `lossless`.
fn variant(mode: CropMode, pixel: PixelPath) -> String {
    match (mode, pixel) {
        (CropMode::Decode, PixelPath::Rgb) => "decode-rgb".into(),
        (mode, _) => mode.to_string(),
    }
}

/// The (crop mode, pixel path) pairs of the sweep: each decode mode once per pixel path,
/// lossless once.
fn variants(a: &SweepArgs) -> Vec<(CropMode, PixelPath)> {
    let mut v = Vec::new();
    for &mode in &a.crop_modes {
        match mode {
            CropMode::Decode => v.extend(a.pixel_paths.iter().map(|&p| (mode, p))),
            CropMode::Lossless => v.push((mode, PixelPath::Planar)),
        }
    }
    v
}

/// Every combination of the axes, crop mode and pixel path outermost, threads innermost.
fn grid(a: &SweepArgs) -> Vec<Config> {
    let axes = (a.prefetch.len() > 1, a.upload_concurrency.len() > 1);
    let mut configs = Vec::new();
    for (mode, pixel) in variants(a) {
        for &upload_concurrency in &a.upload_concurrency {
            for &prefetch in &a.prefetch {
                for &processes in &a.processes {
                    for &threads in &a.threads {
                        configs.push(Config { processes, threads, prefetch, upload_concurrency, mode, pixel, axes });
                    }
                }
            }
        }
    }
    configs
}

pub async fn run(a: SweepArgs) -> anyhow::Result<()> {
    let lists = [("--processes", &a.processes), ("--threads", &a.threads), ("--prefetch", &a.prefetch)];
    for (flag, list) in lists.into_iter().chain([("--upload-concurrency", &a.upload_concurrency)]) {
        if list.is_empty() || list.contains(&0) {
            bail!("{flag} needs positive counts");
        }
    }
    if a.crop_modes.is_empty() {
        bail!("--crop-modes needs at least one mode");
    }
    if a.pixel_paths.is_empty() {
        bail!("--pixel-paths needs at least one path");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let out = std::fs::canonicalize(&a.out)?;
    a.launcher.validate(a.queue.as_deref())?;
    let worker_bin =
        if a.launcher.is_local() { find_worker(a.worker_bin.clone())? } else { PathBuf::from("(external fleet)") };
    let (image, crops) = match (&a.image, &a.crops) {
        (Some(i), Some(c)) => {
            // The producer's checks (image readable and within limits, boxes fit), so a bad
            // workload is one clear error now rather than a dead letter per task.
            let limits = Limits { max_pixels: u64::MAX, max_crops: usize::MAX };
            let checked = Checker::new(limits)
                .check(i, &produce::crops_spec(c)?, "unused")
                .context("checking the workload (--image, --crops)")?;
            let crops = match checked.crops {
                cropfleet::task::CropsSpec::Uri(u) => u,
                cropfleet::task::CropsSpec::Inline(_) => c.clone(),
            };
            (checked.image, crops)
        }
        _ => {
            let (w, h) = sample_dims(a.sample_mp);
            eprintln!(
                "generating the sample workload ({w}x{h} photo-like JPEG, 50 crops) in {}",
                out.join("workload").display()
            );
            let dir = out.join("workload");
            let w = tokio::task::spawn_blocking(move || {
                cropfleet::sample::write_workload_sized(&dir, w, h, cropfleet::sample::SAMPLE_CROPS)
            })
            .await??;
            (w.image.display().to_string(), w.crops.display().to_string())
        }
    };
    let work = match &a.work_dir {
        Some(w) => w.clone(),
        None if Path::new("/dev/shm").is_dir() => {
            PathBuf::from(format!("/dev/shm/cropfleet-sweep-{}", std::process::id()))
        }
        None => out.join("work"),
    };
    std::fs::create_dir_all(&work)?;
    let work = std::fs::canonicalize(&work)?;
    let storage = a.launcher.storage().unwrap_or_else(|| fs_kind(&work));
    let configs = grid(&a);
    eprintln!(
        "sweep: {} configurations x {} tasks; worker {}; queues and crops in {} ({storage})",
        configs.len(),
        a.tasks,
        worker_bin.display(),
        work.display()
    );
    let source = load_workload(&image, &crops).await;
    let workload = match &source {
        Ok((bytes, boxes)) => Workload::describe(&image, bytes, boxes.len(), a.quality),
        Err(e) => {
            eprintln!(
                "sweep: cannot read the workload here ({e:#}): no workload details and no machine limit recorded"
            );
            Workload { image: redact(&image), format: "unknown".into(), quality: a.quality, ..Default::default() }
        }
    };
    let machine = Machine::this();
    let build = crate::this_build();
    eprintln!("machine: {}; cropfleet {} ({})", machine.describe(), build.version, short_commit(&build.git_commit));
    eprintln!("workload: {}", workload.describe_line());
    let source = source.ok().filter(|_| a.floor_secs > 0.0);
    let floors_before = floors(source.as_ref(), &a, "before the grid").await?;

    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut records = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        let rec = run_config(&a, *cfg, i, configs.len(), &worker_bin, &image, &crops, &work, &logs, &storage)
            .await
            .with_context(|| format!("configuration {} ({})", cfg.tag(), cfg.describe()))?;
        records.push(RunRecord { machine: machine.clone(), build: build.clone(), workload: workload.clone(), ..rec });
    }
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    let floors_after = floors(source.as_ref(), &a, "after the grid").await?;
    for r in &mut records {
        let of = |floors: &[(String, FloorSample, String)]| floors.iter().find(|f| f.0 == r.mode).cloned();
        if let (Some((_, before, method)), Some((_, after, _))) = (of(&floors_before), of(&floors_after)) {
            r.limit = Limit::new(method, &before, &after, r.cores).with_rate(r.tasks_per_s);
        }
    }
    for mode in variants(&a).into_iter().map(|(m, p)| variant(m, p)) {
        if let Some(r) = records.iter().find(|r| r.mode == mode && r.limit.drifted()) {
            eprintln!(
                "sweep: WARNING: the {mode} floor moved {:.1}% between before and after the grid ({:.1} -> {:.1} ms): \
                 this machine's speed changed while the sweep ran; compare runs of this sweep with care",
                r.limit.floor_drift_pct, r.limit.floor_before_ms, r.limit.floor_after_ms
            );
        }
    }
    crate::write_outputs(&records, &out, &format!("cropfleet sweep, {} tasks per configuration", a.tasks))
}

/// The source bytes and crop boxes, read here (local files, or gs:// and http(s):// as the
/// workers would) for the workload's description and the floor.
async fn load_workload(image: &str, crops: &str) -> anyhow::Result<(Vec<u8>, Vec<CropBox>)> {
    let storage = Storage::from_env(StorageOptions { allow_private_sources: true, ..Default::default() })?;
    let bytes = storage
        .get(&Location::parse(image)?, DEFAULT_MAX_SOURCE_BYTES)
        .await
        .with_context(|| format!("reading {}", redact(image)))?;
    let boxes = match produce::crops_spec(crops)? {
        cropfleet::task::CropsSpec::Inline(b) => b,
        cropfleet::task::CropsSpec::Uri(u) => {
            let text = storage.get(&Location::parse(&u)?, 64 << 20).await.with_context(|| format!("reading {u}"))?;
            cropfleet::crops::parse_csv(&String::from_utf8_lossy(&text))?
        }
    };
    Ok((bytes, boxes))
}

/// This machine's codec floor for each crop mode of the sweep (none without a readable source).
async fn floors(
    source: Option<&(Vec<u8>, Vec<CropBox>)>,
    a: &SweepArgs,
    when: &str,
) -> anyhow::Result<Vec<(String, FloorSample, String)>> {
    let mut out = Vec::new();
    let Some((bytes, boxes)) = source else { return Ok(out) };
    for (crop_mode, pixel) in variants(a) {
        let (bytes, boxes, quality) = (bytes.clone(), boxes.clone(), a.quality);
        let budget = Duration::from_secs_f64(a.floor_secs);
        // CPU work: on a blocking thread, one at a time, nothing else of ours running.
        let (sample, method) =
            tokio::task::spawn_blocking(move || floor::measure(&bytes, &boxes, quality, crop_mode, pixel, budget))
                .await??;
        let mode = variant(crop_mode, pixel);
        eprintln!(
            "floor ({mode}, {when}): {:.1} ms CPU median of {} (min {:.1}, max {:.1}; wall {:.1} ms; {method})",
            sample.median_ms, sample.reps, sample.min_ms, sample.max_ms, sample.median_wall_ms
        );
        out.push((mode, sample, method));
    }
    Ok(out)
}

/// A 4:3 size of about `mp` megapixels, multiple of 16 (12 → the standard 4000x3000 sample).
pub(crate) fn sample_dims(mp: u32) -> (u32, u32) {
    if mp == 12 {
        return (cropfleet::sample::SAMPLE_WIDTH, cropfleet::sample::SAMPLE_HEIGHT);
    }
    let unit = ((mp.max(1) as f64 * 1e6 / 12.0).sqrt() / 4.0).round() as u32 * 4;
    (unit * 4, unit * 3)
}

/// Queue URIs (tasks, results) for one configuration: a fresh spool folder, for RabbitMQ
/// `…?queue=BASE` → queues `BASE.{tag}` and `BASE.{tag}.results`, for Pub/Sub
/// `pubsub://P/BASE` → topics `BASE.{tag}` and `BASE.{tag}.results` (with their subscriptions).
fn queues_for(base: Option<&str>, dir: &Path, tag: &str) -> anyhow::Result<(String, String)> {
    match base {
        None => {
            Ok((format!("spool:{}", dir.join("tasks").display()), format!("spool:{}", dir.join("results").display())))
        }
        Some(b) if b.starts_with("spool:") => {
            let root = b.trim_start_matches("spool:").trim_start_matches("//");
            Ok((format!("spool:{root}/{tag}/tasks"), format!("spool:{root}/{tag}/results")))
        }
        Some(b) if b.starts_with("amqp://") || b.starts_with("amqps://") => {
            let QueueUri::Amqp { queue, .. } = QueueUri::parse(b)? else { unreachable!("amqp:// parses as Amqp") };
            Ok((
                amqp::uri_with_queue(b, &format!("{queue}.{tag}"))?,
                amqp::uri_with_queue(b, &format!("{queue}.{tag}.results"))?,
            ))
        }
        Some(b) if b.starts_with("pubsub://") => {
            let QueueUri::PubSub { name, .. } = QueueUri::parse(b)? else { unreachable!("pubsub:// parses as PubSub") };
            Ok((
                pubsub::uri_with_name(b, &format!("{name}.{tag}"))?,
                pubsub::uri_with_name(b, &format!("{name}.{tag}.results"))?,
            ))
        }
        Some(other) => bail!("sweep cannot derive per-configuration queues from {:?}", redact(other)),
    }
}

/// Remove what a previous run left in a configuration's queues (spool folders are fresh anyway).
async fn clear_queue(uri: &str) -> anyhow::Result<()> {
    if uri.starts_with("amqp://") {
        amqp::Amqp::from_uri(uri)?.delete_topology().await.with_context(|| format!("clearing {}", redact(uri)))?;
    }
    if uri.starts_with("pubsub://") {
        pubsub::PubSub::from_uri(uri)?.delete_all().await.with_context(|| format!("clearing {}", redact(uri)))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_config(
    a: &SweepArgs,
    cfg: Config,
    index: usize,
    of: usize,
    worker_bin: &Path,
    image: &str,
    crops: &str,
    work: &Path,
    logs: &Path,
    storage: &str,
) -> anyhow::Result<RunRecord> {
    let tag = cfg.tag();
    let started_utc = cropfleet::util::iso8601_utc(cropfleet::util::now_ms());
    let load_before = load_average().unwrap_or(-1.0);
    let dir = work.join(&tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (tasks_uri, results_uri) = match a.launcher.fixed_queues(a.queue.as_deref()) {
        Some(fixed) => fixed,
        None => queues_for(a.queue.as_deref(), &dir, &tag)?,
    };
    clear_queue(&tasks_uri).await?;
    clear_queue(&results_uri).await?;
    let tasks_q = queue::open(&tasks_uri).await?;
    let results_q = queue::open(&results_uri).await?;
    tasks_q.setup().await?;
    results_q.setup().await?;

    // Enqueue the whole workload first, so workers start on a full queue.
    let run_id = format!("sweep-{}-{tag}", cropfleet::util::now_ms());
    let output = a.launcher.output_for(&tag).unwrap_or_else(|| dir.join("out").display().to_string());
    let template = Template {
        image: image.to_string(),
        crops: produce::crops_spec(crops)?,
        output: output.clone(),
        quality: Some(a.quality),
        crop_mode: Some(cfg.mode),
        pixel_path: Some(cfg.pixel),
    };
    let payloads: Vec<Vec<u8>> =
        (0..a.tasks).map(|i| produce::task_from_template(&template, &run_id, i).to_json()).collect();
    let (n, err) = tasks_q.publish_many(&payloads).await;
    if let Some(e) = err {
        bail!("enqueueing stopped after {n} of {}: {e}", a.tasks);
    }

    let scale = crate::launcher::Scale {
        processes: cfg.processes,
        threads: cfg.threads,
        prefetch: cfg.prefetch,
        upload_concurrency: cfg.upload_concurrency,
        queue: &tasks_uri,
        results: &results_uri,
        tag: &tag,
        run_id: &run_id,
    };
    let external = a.launcher.scale(&scale).await?;
    let mut workers = Vec::new();
    for w in (0..cfg.processes).filter(|_| external.is_none()) {
        workers.push(spawn_worker(
            a,
            cfg,
            worker_bin,
            &tasks_uri,
            &results_uri,
            &logs.join(format!("{tag}-w{w}.log")),
        )?);
    }
    let bar = ProgressBar::new(a.tasks as u64);
    bar.set_style(
        ProgressStyle::with_template("[{prefix}] {bar:30} {pos}/{len} tasks  {msg}  eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    let several = variants(a).len() > 1;
    let mode = if several { format!(" {}", cfg.variant()) } else { String::new() };
    bar.set_prefix(format!("{}/{} {}{mode}", index + 1, of, cfg.describe()));
    let collected = collect_results(
        &*results_q,
        &run_id,
        a.tasks,
        &mut workers,
        external.is_some(),
        &bar,
        Duration::from_secs_f64(a.stall_secs),
    )
    .await;
    bar.finish_and_clear();
    let (usage, stopped) = match external {
        Some(fleet) => (Usage { cpu_seconds: fleet.cpu_seconds().await, peak_rss_bytes: 0 }, fleet.stop().await),
        None => (stop_workers(workers).await, Ok(())),
    };
    let collector = collected?;
    stopped?;
    // The outside clock: the span from the first to the last crop file written, as the files'
    // modification times tell it (local outputs only).
    let outside_tasks_per_s = match Location::parse(&output) {
        Ok(Location::Local(p)) => outside_rate(&p).await,
        _ => 0.0,
    };
    let record = collector.record(
        RunRecord {
            label: match &a.label {
                Some(l) => l.clone(),
                None if !several && cfg.variant() == "decode" => tasks_q.backend().to_string(),
                None => format!("{}-{}", tasks_q.backend(), cfg.variant()),
            },
            backend: tasks_q.backend().into(),
            storage: storage.into(),
            mode: cfg.variant(),
            processes: cfg.processes,
            threads: cfg.threads,
            upload_concurrency: cfg.upload_concurrency,
            prefetch: cfg.prefetch,
            started_utc,
            load_before,
            queue_uri: redact(&tasks_uri),
            storage_uri: redact(&output),
            outside_tasks_per_s,
            cores: a
                .launcher
                .cores()
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)),
            peak_rss_mib: usage.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            ..Default::default()
        },
        usage.cpu_seconds,
    );
    let outside = if outside_tasks_per_s > 0.0 {
        format!(
            "; outside clock {:.2} tasks/s ({:+.1}%)",
            outside_tasks_per_s,
            (record.tasks_per_s / outside_tasks_per_s - 1.0) * 100.0
        )
    } else {
        String::new()
    };
    eprintln!(
        "{tag}: {} tasks in {:.2}s = {:.2} tasks/s, {:.0} crops/s, {:.3} CPU-s/task, load {:.2} before{outside}",
        record.tasks, record.wall_s, record.tasks_per_s, record.crops_per_s, record.cpu_s_per_task, load_before
    );
    if !a.keep_outputs {
        let _ = std::fs::remove_dir_all(&dir);
    }
    clear_queue(&tasks_uri).await?;
    clear_queue(&results_uri).await?;
    Ok(record)
}

fn spawn_worker(
    a: &SweepArgs,
    cfg: Config,
    bin: &Path,
    tasks: &str,
    results: &str,
    log: &Path,
) -> anyhow::Result<Child> {
    let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(bin)
        .args(["--queue", tasks, "--results", results])
        .args(["--threads", &cfg.threads.to_string()])
        .args(["--prefetch", &cfg.prefetch.to_string()])
        .args(["--upload-concurrency", &cfg.upload_concurrency.to_string()])
        .args(["--http-addr", "off", "--log-format", "text"])
        .args(["--exit-when-idle", "60"])
        .args(&a.worker_args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn collect_results(
    results: &dyn Queue,
    run_id: &str,
    expect: usize,
    workers: &mut [Child],
    external: bool,
    bar: &ProgressBar,
    stall: Duration,
) -> anyhow::Result<RunCollector> {
    let mut consumer = results.consumer(ConsumerOptions { prefetch: 256, ..Default::default() }).await?;
    let mut c = RunCollector::default();
    let mut last_progress = Instant::now();
    while c.len() < expect {
        match consumer.next(Duration::from_millis(200)).await? {
            Some(d) => {
                let ev = ResultEvent::parse(&d.payload).context("a worker published a malformed result event")?;
                // A shared results queue (an external fleet) may hold events of other runs.
                if ev.run_id.as_deref() == Some(run_id) && c.add(ev) {
                    last_progress = Instant::now();
                    bar.set_position(c.len() as u64);
                    bar.set_message(format!("{:.2} tasks/s", c.rate()));
                }
                d.acker.ack().await?;
            }
            None => {
                let alive = workers.iter_mut().map(|w| w.try_wait()).filter(|r| matches!(r, Ok(None))).count();
                if alive == 0 && !external {
                    bail!("every worker exited with {} of {expect} tasks done; see the worker logs", c.len());
                }
                if last_progress.elapsed() > stall {
                    bail!("no task finished for {:.0}s ({} of {expect} done)", stall.as_secs_f64(), c.len());
                }
            }
        }
    }
    Ok(c)
}

struct Usage {
    cpu_seconds: f64,
    peak_rss_bytes: u64,
}

/// SIGTERM every worker, wait for each, and sum their CPU time; the largest peak RSS is kept.
async fn stop_workers(workers: Vec<Child>) -> Usage {
    for w in &workers {
        // SAFETY: sending a signal to a child we spawned and have not yet reaped.
        unsafe { libc::kill(w.id() as libc::pid_t, libc::SIGTERM) };
    }
    let pids: Vec<u32> = workers.iter().map(|w| w.id()).collect();
    // Reap with wait4 (not Child::wait) to get each child's own rusage.
    tokio::task::spawn_blocking(move || {
        let mut usage = Usage { cpu_seconds: 0.0, peak_rss_bytes: 0 };
        for pid in pids {
            let mut status = 0;
            // SAFETY: zeroed rusage is a valid out-parameter; pid is our unreaped child.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) } > 0 {
                let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                usage.cpu_seconds += tv(ru.ru_utime) + tv(ru.ru_stime);
                usage.peak_rss_bytes = usage.peak_rss_bytes.max(ru.ru_maxrss as u64 * 1024);
            }
        }
        drop(workers);
        usage
    })
    .await
    .unwrap_or(Usage { cpu_seconds: 0.0, peak_rss_bytes: 0 })
}

/// "tmpfs", "ext4", … for the table (outputs on tmpfs measure the engine; disks add file-create cost).
fn fs_kind(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return "unknown".into() };
    // SAFETY: statfs fills the zeroed struct for a valid NUL-terminated path.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown".into();
    }
    match s.f_type as i64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x9123_683E => "btrfs".into(),
        0x5846_5342 => "xfs".into(),
        0x794c_7630 => "overlayfs".into(),
        other => format!("fs-0x{other:x}"),
    }
}

/// tasks/s by the files' own clock: task folders under `out` ÷ the span between the first and
/// the last crop file's modification time (0 when there is nothing to measure).
async fn outside_rate(out: &Path) -> f64 {
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (mut first, mut last, mut tasks) = (None::<SystemTime>, None::<SystemTime>, 0u64);
        for task in std::fs::read_dir(&out).into_iter().flatten().flatten() {
            tasks += 1;
            for f in std::fs::read_dir(task.path()).into_iter().flatten().flatten() {
                if let Ok(t) = f.metadata().and_then(|m| m.modified()) {
                    first = Some(first.map_or(t, |x| x.min(t)));
                    last = Some(last.map_or(t, |x| x.max(t)));
                }
            }
        }
        match (first, last) {
            (Some(f), Some(l)) if l > f => tasks as f64 / l.duration_since(f).unwrap_or_default().as_secs_f64(),
            _ => 0.0,
        }
    })
    .await
    .unwrap_or(0.0)
}

/// Find `cropfleet-worker`: the flag, else beside this binary, else on PATH. Nothing is built
/// here: `scripts/sweep.sh` builds the workspace once (a second cargo build from in here would
/// resolve other features and rebuild dependencies, silently, for minutes).
fn find_worker(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let sibling = exe.with_file_name("cropfleet-worker");
    if sibling.exists() {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if std::env::var_os("CARGO").is_some() && modified(&sibling) < modified(&exe) {
            eprintln!(
                "sweep: note: {} is older than this binary and `cargo run -p cropfleet-aggregator` does not \
                 rebuild it; scripts/sweep.sh (or cargo build --release --bins) builds both",
                sibling.display()
            );
        }
        return Ok(sibling);
    }
    if let Some(p) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("cropfleet-worker")).find(|p| p.exists()))
    {
        return Ok(p);
    }
    bail!(
        "cannot find cropfleet-worker next to {} or on PATH: run scripts/sweep.sh (sets up, builds the workspace once, \
         runs the sweep), or build it (cargo build --release --bins), or pass --worker-bin",
        exe.display()
    )
}
