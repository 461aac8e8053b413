//! The picture of a run: throughput per configuration (x: threads, one series per process
//! count and label, y: tasks/s) and stage latencies (p50/p95) per configuration, as SVG and PNG.

use std::path::Path;

use anyhow::Context;
use cropfleet::stats::RunRecord;
use plotters::coord::Shift;
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Picture size in pixels (both formats).
pub const SIZE: (u32, u32) = (1200, 560);

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Write `stem.svg` and `stem.png` into `dir`.
pub fn write(records: &[RunRecord], dir: &Path, stem: &str, title: &str) -> anyhow::Result<()> {
    register_font();
    let svg = dir.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&root, records, title)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("drawing {}", svg.display()))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let png = dir.join(format!("{stem}.png"));
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&root, records, title)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("drawing {}", png.display()))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// A latency series: its name and how to read it from a record.
type Stage = (&'static str, fn(&RunRecord) -> f64);

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, records: &[RunRecord], title: &str) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(SIZE.0 * 55 / 100);
    throughput(&left, records)?;
    latency(&right, records)?;
    Ok(())
}

/// Series key: label and process count.
fn series(records: &[RunRecord]) -> Vec<(String, u32)> {
    let mut keys: Vec<(String, u32)> = records.iter().map(|r| (r.label.clone(), r.processes)).collect();
    keys.sort();
    keys.dedup();
    keys
}

fn throughput<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, records: &[RunRecord]) -> DrawResult<DB> {
    let max_t = records.iter().map(|r| r.threads).max().unwrap_or(1).max(1);
    let max_y = records.iter().map(|r| r.tasks_per_s).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (tasks/s)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..(max_t as f64 + 0.5), 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc("CPU threads per worker process")
        .y_desc("tasks/s")
        .x_labels(max_t as usize + 1)
        .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() })
        .label_style(("sans-serif", 13))
        .draw()?;
    let keys = series(records);
    let multi_label = keys.iter().map(|k| &k.0).collect::<std::collections::BTreeSet<_>>().len() > 1;
    for (i, (label, procs)) in keys.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut pts: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| &r.label == label && r.processes == *procs)
            .map(|r| (r.threads as f64, r.tasks_per_s))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let name = if multi_label {
            format!("{label}, {procs} proc")
        } else {
            format!("{procs} process{}", if *procs == 1 { "" } else { "es" })
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))?;
        chart.draw_series(pts.iter().map(|&(x, y)| {
            Text::new(format!("{y:.1}"), (x, y + max_y * 0.02), ("sans-serif", 12).into_font().color(&BLACK))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

fn latency<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, records: &[RunRecord]) -> DrawResult<DB> {
    let n = records.len().max(1);
    let stages: [Stage; 5] = [
        ("decode p50", |r| r.stages_ms.decode.p50),
        ("crop+encode p50", |r| r.stages_ms.crop_encode.p50),
        ("upload p50", |r| r.stages_ms.upload.p50),
        ("total p50", |r| r.stages_ms.total.p50),
        ("total p95", |r| r.stages_ms.total.p95),
    ];
    let max_y = records.iter().flat_map(|r| stages.iter().map(move |(_, f)| f(r))).fold(0.0, f64::max).max(1.0) * 1.1;
    let names: Vec<String> = records
        .iter()
        .map(|r| {
            let base = format!("{}x{}", r.processes, r.threads);
            if series(records).iter().map(|k| &k.0).collect::<std::collections::BTreeSet<_>>().len() > 1 {
                format!("{}:{base}", r.label.chars().take(6).collect::<String>())
            } else {
                base
            }
        })
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Stage latency per task (ms)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc("configuration (processes x threads)")
        .y_desc("ms")
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 12))
        .draw()?;
    for (k, (name, f)) in stages.iter().enumerate() {
        let color = Palette99::pick(k + 5).to_rgba();
        let pts: Vec<(f64, f64)> = records.iter().enumerate().map(|(i, r)| (i as f64, f(r))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}
