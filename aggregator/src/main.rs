//! `cropfleet-aggregator`: turn result events into throughput records.
//! - `sweep`: run a grid of fleet configurations (worker processes × threads) on one workload,
//!   starting real `cropfleet-worker` processes (or, with `--launcher command`, scaling a compose or
//!   Kubernetes fleet through shell templates), and record each run;
//! - `collect`: record runs from a results queue fed by a fleet running elsewhere;
//! - `report`: redraw the table and pictures from `runs.json` files of earlier runs.

mod collect;
mod launcher;
mod plot;
mod sweep;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use cropfleet::logging::{self, LogFormat};
use cropfleet::stats::{self, RunRecord};

/// Measure cropfleet throughput. Every flag can also be set by the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "cropfleet-aggregator", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format: auto, text, json.
    #[arg(long, global = true, env = "CROPFLEET_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every configuration of a grid on the same workload and record each run.
    Sweep(Box<sweep::SweepArgs>),
    /// Consume result events from a queue and record the runs they belong to.
    Collect(collect::CollectArgs),
    /// Write the generated sample workload (the sweep's): DIR/sample.jpg, a 4:3 photograph-like
    /// JPEG (quality 90, 4:2:0), and DIR/crops.csv, its 50 boxes of 200-600 px; existing files
    /// are kept.
    Sample {
        /// Folder for sample.jpg and crops.csv.
        #[arg(long, env = "CROPFLEET_DIR", default_value = "cropfleet-data/in")]
        dir: PathBuf,
        /// Size in megapixels (12 gives 4000x3000).
        #[arg(long, env = "CROPFLEET_SAMPLE_MP", default_value_t = 12)]
        sample_mp: u32,
    },
    /// Redraw the table and pictures from runs.json files (e.g. spool vs RabbitMQ side by side).
    Report {
        /// runs.json files written by sweep or collect.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Folder for runs.csv, runs.json, throughput.svg and throughput.png.
        #[arg(long, env = "CROPFLEET_OUT", default_value = "results/report")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    cropfleet::util::keep_allocations_resident();
    let args = Args::parse();
    logging::init(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        match args.cmd {
            Cmd::Sweep(a) => sweep::run(*a).await,
            Cmd::Collect(a) => collect::run(a).await,
            Cmd::Report { runs, out } => report(&runs, &out),
            Cmd::Sample { dir, sample_mp } => write_sample(&dir, sample_mp),
        }
    })
}

fn write_sample(dir: &Path, mp: u32) -> anyhow::Result<()> {
    let (w, h) = sweep::sample_dims(mp);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let workload = cropfleet::sample::Workload { image: dir.join("sample.jpg"), crops: dir.join("crops.csv") };
    cropfleet::sample::write_workload_to(&workload, w, h, cropfleet::sample::SAMPLE_CROPS)
        .with_context(|| format!("writing the sample into {}", dir.display()))?;
    println!("{} ({w}x{h}), {}", workload.image.display(), workload.crops.display());
    Ok(())
}

/// This binary's version and git commit (stamped by build.rs).
pub fn this_build() -> cropfleet::provenance::Build {
    cropfleet::provenance::Build {
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit: env!("CROPFLEET_GIT_COMMIT").into(),
    }
}

fn report(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut records = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut rs: Vec<RunRecord> = serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
        records.append(&mut rs);
    }
    write_outputs(&records, out, "cropfleet throughput")
}

/// Write runs.csv, runs.json and the pictures into `out`, and print where the runs come from
/// and the table. The picture's title is `title` followed by every label of `records`.
pub fn write_outputs(records: &[RunRecord], out: &Path, title: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("runs.csv"), stats::to_csv(records)).context("writing runs.csv")?;
    std::fs::write(out.join("runs.json"), serde_json::to_string_pretty(records)?).context("writing runs.json")?;
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    plot::write(records, out, "throughput", &format!("{title}: {}", labels.join(", ")))?;
    println!("\n{}{}", stats::describe(records), stats::to_table(records));
    println!("wrote {0}/runs.csv, {0}/runs.json, {0}/throughput.svg, {0}/throughput.png", out.display());
    Ok(())
}
