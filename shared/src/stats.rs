//! Throughput records: turn the result events of one run (one fleet configuration) into a row
//! of the table — tasks/s, crops/s, stage percentiles, CPU cost — and write CSV/JSON.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::floor::Limit;
use crate::provenance::{self, Build, Machine, Workload};
use crate::task::ResultEvent;

/// p50/p95/p99 of one stage, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (empty → zeros).
    pub fn of(values: &mut [f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Percentiles { p50: at(0.50), p95: at(0.95), p99: at(0.99) }
    }
}

/// Stage latency percentiles of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub queue_wait: Percentiles,
    pub download: Percentiles,
    pub decode: Percentiles,
    pub crop_encode: Percentiles,
    pub upload: Percentiles,
    pub total: Percentiles,
}

/// One row of the throughput table: one fleet configuration on one workload. Fields added after
/// the first release default when absent, so older `runs.json` files still load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// Free-form label (e.g. `spool`, `rabbitmq`, `lossless`).
    pub label: String,
    pub backend: String,
    pub storage: String,
    pub mode: String,
    pub processes: u32,
    pub threads: u32,
    pub upload_concurrency: u32,
    pub prefetch: u32,
    /// Distinct tasks completed.
    pub tasks: u64,
    pub crops: u64,
    pub bytes: u64,
    /// Result events for tasks already seen (a task processed twice).
    pub duplicates: u64,
    /// From the first task started to the last finished, seconds.
    pub wall_s: f64,
    pub tasks_per_s: f64,
    pub crops_per_s: f64,
    pub stages_ms: StageStats,
    /// Worker CPU seconds (user+system) per task, when measured.
    pub cpu_s_per_task: f64,
    /// CPU cores of the machine the run used.
    pub cores: u32,
    /// tasks/s divided by the cores the fleet could use: what a configuration costs.
    pub tasks_per_s_per_core: f64,
    /// Peak RSS of the largest worker, MiB (0 when not measured).
    pub peak_rss_mib: f64,
    /// When the configuration started, UTC, ISO 8601 (`2026-05-01T12:34:56Z`).
    pub started_utc: String,
    /// 1-minute load average just before the configuration started (-1 when unknown).
    pub load_before: f64,
    /// The machine that ran the sweep (and, with the local launcher, the fleet).
    pub machine: Machine,
    /// The build of the sweep.
    pub build: Build,
    /// The source image and crop list every task of the run repeats.
    pub workload: Workload,
    /// The task queue, credentials removed.
    pub queue_uri: String,
    /// Where the crops went (output prefix), credentials removed.
    pub storage_uri: String,
    /// This machine's codec limit for the run's crop mode and the run's place against it.
    pub limit: Limit,
    /// tasks/s by an outside clock: tasks ÷ the span from the first to the last crop file
    /// written, read from the files' modification times (local outputs; 0 when not measured).
    pub outside_tasks_per_s: f64,
}

/// Collects result events of one run, counting each task once.
#[derive(Debug, Default)]
pub struct RunCollector {
    events: HashMap<String, ResultEvent>,
    duplicates: u64,
}

impl RunCollector {
    /// Record an event; returns false if this task was already counted.
    pub fn add(&mut self, ev: ResultEvent) -> bool {
        if self.events.contains_key(&ev.task_id) {
            self.duplicates += 1;
            return false;
        }
        self.events.insert(ev.task_id.clone(), ev);
        true
    }

    /// Distinct tasks seen.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Tasks per second so far (first start to latest finish).
    pub fn rate(&self) -> f64 {
        let (first, last) = self.span();
        if last > first {
            self.events.len() as f64 * 1000.0 / (last - first) as f64
        } else {
            0.0
        }
    }

    /// When the earliest task started (Unix ms; 0 when empty).
    pub fn started_ms(&self) -> u64 {
        self.span().0
    }

    fn span(&self) -> (u64, u64) {
        let first = self.events.values().map(|e| e.started_ms).min().unwrap_or(0);
        let last = self.events.values().map(|e| e.finished_ms).max().unwrap_or(0);
        (first, last)
    }

    /// Build the record. `processes`, `cpu_seconds` (all workers together, 0 if unknown) and
    /// `cores` come from whoever ran the fleet.
    pub fn record(&self, base: RunRecord, cpu_seconds: f64) -> RunRecord {
        let evs: Vec<&ResultEvent> = self.events.values().collect();
        let (first, last) = self.span();
        let wall_s = (last.saturating_sub(first)) as f64 / 1000.0;
        let tasks = evs.len() as u64;
        let crops: u64 = evs.iter().map(|e| e.crops as u64).sum();
        let stage = |f: fn(&ResultEvent) -> f64| Percentiles::of(&mut evs.iter().map(|e| f(e)).collect::<Vec<_>>());
        let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        let threads = if base.threads > 0 { base.threads } else { evs.first().map(|e| e.threads).unwrap_or(0) };
        let tasks_per_s = per_s(tasks);
        let cores = base.cores.max(1);
        let usable = (base.processes.max(1) * threads.max(1)).min(cores);
        RunRecord {
            threads,
            upload_concurrency: if base.upload_concurrency > 0 {
                base.upload_concurrency
            } else {
                evs.first().map(|e| e.upload_concurrency).unwrap_or(0)
            },
            tasks,
            crops,
            bytes: evs.iter().map(|e| e.bytes).sum(),
            duplicates: self.duplicates,
            wall_s,
            tasks_per_s,
            crops_per_s: per_s(crops),
            stages_ms: StageStats {
                queue_wait: stage(|e| e.stages_ms.queue_wait),
                download: stage(|e| e.stages_ms.download),
                decode: stage(|e| e.stages_ms.decode),
                crop_encode: stage(|e| e.stages_ms.crop_encode),
                upload: stage(|e| e.stages_ms.upload),
                total: stage(|e| e.stages_ms.total),
            },
            cpu_s_per_task: if tasks > 0 { cpu_seconds / tasks as f64 } else { 0.0 },
            tasks_per_s_per_core: tasks_per_s / usable as f64,
            cores,
            ..base
        }
    }
}

/// The CSV header; the first seven columns are a contract other tools rely on.
pub const CSV_HEADER: &str = "processes,threads,tasks,crops,wall_s,tasks_per_s,crops_per_s,label,backend,storage,mode,upload_concurrency,prefetch,duplicates,bytes,\
download_p50_ms,decode_p50_ms,crop_encode_p50_ms,upload_p50_ms,total_p50_ms,total_p95_ms,total_p99_ms,queue_wait_p50_ms,cpu_s_per_task,tasks_per_s_per_core,cores,peak_rss_mib,\
pct_of_limit,limit_tasks_per_s,floor_before_ms,floor_after_ms,floor_drift_pct,floor_before_wall_ms,floor_after_wall_ms,outside_tasks_per_s,started_utc,load_before,\
cpu_model,machine_cores,simd,kernel,version,git_commit,image,image_width,image_height,image_bytes,subsampling,jpeg_process,\
crops_per_task,quality,queue_uri,storage_uri";

/// Render records as CSV (header + one row each).
pub fn to_csv(records: &[RunRecord]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in records {
        let st = &r.stages_ms;
        s.push_str(&format!(
            "{},{},{},{},{:.3},{:.2},{:.1},{},{},{},{},{},{},{},{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.4},{:.2},{},{:.1}\n",
            r.processes, r.threads, r.tasks, r.crops, r.wall_s, r.tasks_per_s, r.crops_per_s, csv_field(&r.label), r.backend, r.storage, r.mode,
            r.upload_concurrency, r.prefetch, r.duplicates, r.bytes, st.download.p50, st.decode.p50, st.crop_encode.p50, st.upload.p50,
            st.total.p50, st.total.p95, st.total.p99, st.queue_wait.p50, r.cpu_s_per_task, r.tasks_per_s_per_core, r.cores, r.peak_rss_mib
        ));
        s.pop();
        let (l, m, b, w) = (&r.limit, &r.machine, &r.build, &r.workload);
        s.push_str(&format!(
            ",{:.1},{:.2},{:.2},{:.2},{:.1},{:.2},{:.2},{:.2},{},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            l.pct_of_limit,
            l.limit_tasks_per_s,
            l.floor_before_ms,
            l.floor_after_ms,
            l.floor_drift_pct,
            l.floor_before_wall_ms,
            l.floor_after_wall_ms,
            r.outside_tasks_per_s,
            r.started_utc,
            r.load_before,
            csv_field(&m.cpu_model),
            m.cores,
            m.simd,
            csv_field(&m.kernel),
            b.version,
            b.git_commit,
            csv_field(&w.image),
            w.width,
            w.height,
            w.bytes,
            w.subsampling,
            w.process,
            w.crops,
            w.quality,
            csv_field(&r.queue_uri),
            csv_field(&r.storage_uri)
        ));
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Index of the cheapest run (highest tasks/s per core) reaching 90% of the best tasks/s.
pub fn cheapest_near_best(records: &[RunRecord]) -> Option<usize> {
    let best = records.iter().map(|r| r.tasks_per_s).fold(0.0, f64::max);
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.tasks_per_s >= 0.9 * best && best > 0.0)
        .max_by(|a, b| {
            let cost = |r: &RunRecord| (r.processes * r.threads, -(r.tasks_per_s_per_core * 1000.0) as i64);
            // fewer processes×threads first, then better per-core throughput
            cost(b.1).cmp(&cost(a.1))
        })
        .map(|(i, _)| i)
}

/// Which grid axes besides processes × threads vary across `records`: (prefetch, upload
/// concurrency). The table and the picture show an axis only when it varies.
pub fn extra_axes(records: &[RunRecord]) -> (bool, bool) {
    let varies = |f: fn(&RunRecord) -> u32| records.iter().any(|r| f(r) != f(&records[0]));
    if records.is_empty() {
        return (false, false);
    }
    (varies(|r| r.prefetch), varies(|r| r.upload_concurrency))
}

/// A fixed-width text table for terminals; the cheapest run near the best is marked `*`, a run
/// whose machine drifted (floors before and after the grid more than 10% apart) `!`.
pub fn to_table(records: &[RunRecord]) -> String {
    let mark = cheapest_near_best(records);
    let (pf, upc) = extra_axes(records);
    let opt = |on: bool, v: String| if on { v } else { String::new() };
    let mut s = format!(
        "  {:<16} {:>4} {:>4}{}{} {:>6} {:>8} {:>8} {:>8} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8}\n",
        "label",
        "proc",
        "thr",
        opt(pf, format!(" {:>4}", "pf")),
        opt(upc, format!(" {:>4}", "upc")),
        "tasks",
        "wall_s",
        "tasks/s",
        "% limit",
        "load",
        "crops/s",
        "dec p50",
        "enc p50",
        "upl p50",
        "tot p95",
        "cpu_s/t",
        "t/s/core",
        "rss MiB"
    );
    let mut drifted = false;
    for (i, r) in records.iter().enumerate() {
        let st = &r.stages_ms;
        let pct = if r.limit.measured() {
            drifted |= r.limit.drifted();
            format!("{:.1}%{}", r.limit.pct_of_limit, if r.limit.drifted() { "!" } else { "" })
        } else {
            "-".into()
        };
        // Unknown in records without provenance (before it was recorded, or `collect`).
        let load =
            if r.started_utc.is_empty() || r.load_before < 0.0 { "-".into() } else { format!("{:.1}", r.load_before) };
        s.push_str(&format!(
            "{} {:<16} {:>4} {:>4}{}{} {:>6} {:>8.2} {:>8.2} {:>8} {:>5} {:>9.0} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>8.4} {:>9.2} {:>8}\n",
            if Some(i) == mark { "*" } else { " " },
            truncate(&r.label, 16), r.processes, r.threads,
            opt(pf, format!(" {:>4}", r.prefetch)), opt(upc, format!(" {:>4}", r.upload_concurrency)),
            r.tasks, r.wall_s, r.tasks_per_s, pct, load, r.crops_per_s, st.decode.p50, st.crop_encode.p50,
            st.upload.p50, st.total.p95, r.cpu_s_per_task, r.tasks_per_s_per_core,
            // 0 = not measured (e.g. an external fleet).
            if r.peak_rss_mib > 0.0 { format!("{:.0}", r.peak_rss_mib) } else { "-".into() }
        ));
    }
    if mark.is_some() {
        s.push_str("* cheapest configuration (fewest processes x threads) within 90% of the best tasks/s\n");
    }
    if records.iter().any(|r| r.limit.measured()) {
        s.push_str(
            "% limit: tasks/s against this machine's codec limit (cores / single-thread CPU floor, see above); \
             load: 1-minute load average before the run\n",
        );
    }
    if drifted {
        s.push_str(&format!(
            "! the machine drifted: its floors before and after the grid differ by more than {:.0}%\n",
            crate::floor::DRIFT_FLAG_PCT
        ));
    }
    s
}

/// Where the records come from, one line per distinct machine, build, workload and limit:
/// printed above the table.
pub fn describe(records: &[RunRecord]) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut push = |line: String| {
        if !lines.contains(&line) {
            lines.push(line);
        }
    };
    let machines = provenance::distinct_machines(records.iter().map(|r| &r.machine));
    if machines.len() > 1 {
        push(format!("runs from {} different machines:", machines.len()));
    }
    for r in records {
        if r.machine.cpu_model.is_empty() {
            continue;
        }
        push(format!(
            "machine: {}; cropfleet {} ({})",
            r.machine.describe(),
            r.build.version,
            short_commit(&r.build.git_commit)
        ));
    }
    for r in records.iter().filter(|r| r.workload.crops > 0) {
        push(format!("workload: {}", r.workload.describe_line()));
    }
    for r in records.iter().filter(|r| r.limit.measured()) {
        let l = &r.limit;
        push(format!(
            "limit ({}): {:.1} tasks/s = {} cores / {:.1} ms CPU per task ({}; floor {:.1} ms before, {:.1} ms after \
             the grid, {:.1}% apart{}; wall {:.1} / {:.1} ms)",
            r.mode,
            l.limit_tasks_per_s,
            r.cores,
            (l.floor_before_ms + l.floor_after_ms) / 2.0,
            l.method,
            l.floor_before_ms,
            l.floor_after_ms,
            l.floor_drift_pct,
            if l.drifted() { ": DRIFTED" } else { "" },
            l.floor_before_wall_ms,
            l.floor_after_wall_ms,
        ));
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The first 12 characters of a commit hash (`unknown` stays).
pub fn short_commit(c: &str) -> &str {
    if c.is_empty() {
        "unknown"
    } else {
        c.get(..12).unwrap_or(c)
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CropMode, StageTimes};

    fn ev(id: &str, start: u64, end: u64) -> ResultEvent {
        ResultEvent {
            v: 1,
            task_id: id.into(),
            run_id: None,
            worker: "w".into(),
            attempt: 1,
            crops: 50,
            bytes: 1000,
            output: "o".into(),
            mode: CropMode::Decode,
            fallback: None,
            pixel_path: None,
            pixel_fallback: None,
            written_boxes: None,
            width: 10,
            height: 10,
            started_ms: start,
            finished_ms: end,
            stages_ms: StageTimes { total: (end - start) as f64, ..Default::default() },
            threads: 2,
            upload_concurrency: 8,
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Percentiles::of(&mut v), Percentiles { p50: 50.0, p95: 95.0, p99: 99.0 });
        assert_eq!(Percentiles::of(&mut [7.0]), Percentiles { p50: 7.0, p95: 7.0, p99: 7.0 });
    }

    #[test]
    fn counts_each_task_once_and_computes_rates() {
        let mut c = RunCollector::default();
        assert!(c.add(ev("a", 1000, 1500)));
        assert!(c.add(ev("b", 1200, 3000)));
        assert!(!c.add(ev("a", 2000, 2500)));
        let r = c.record(RunRecord { processes: 2, cores: 2, ..Default::default() }, 1.0);
        assert_eq!((r.tasks, r.crops, r.duplicates, r.threads), (2, 100, 1, 2));
        assert!(
            (r.wall_s - 2.0).abs() < 1e-9 && (r.tasks_per_s - 1.0).abs() < 1e-9 && (r.crops_per_s - 50.0).abs() < 1e-9
        );
        assert!((r.cpu_s_per_task - 0.5).abs() < 1e-9);
        assert!((r.tasks_per_s_per_core - 0.5).abs() < 1e-9);
        let csv = to_csv(std::slice::from_ref(&r));
        assert!(csv.starts_with("processes,threads,tasks,crops,wall_s,tasks_per_s,crops_per_s,"));
        assert_eq!(csv.lines().nth(1).unwrap().split(',').count(), CSV_HEADER.split(',').count());
    }

    #[test]
    fn marks_cheapest_within_ninety_percent() {
        let rec = |p, t, tps: f64| RunRecord { processes: p, threads: t, tasks_per_s: tps, ..Default::default() };
        let rs = vec![rec(1, 1, 10.0), rec(1, 2, 19.0), rec(2, 2, 20.0)];
        assert_eq!(cheapest_near_best(&rs), Some(1));
        assert!(to_table(&rs).lines().nth(2).unwrap().starts_with('*'));
    }
}
