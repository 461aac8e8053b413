//! The picture of a run: throughput per configuration (x: threads, one series per label,
//! process count and any other axis the grid varies — prefetch, upload concurrency; y: tasks/s;
//! this machine's codec limit as a dashed line) and stage latencies (p50/p95) per configuration,
//! as SVG and PNG. A line under the title names the machine, or says that the runs come from
//! several machines.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use cropfleet::provenance;
use cropfleet::stats::{self, RunRecord};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Picture size in pixels (both formats).
pub const SIZE: (u32, u32) = (1200, 560);
/// Font size of point labels and x labels, pixels.
const SMALL: u32 = 12;

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
    let root = root.titled(title, ("sans-serif", 20))?;
    let (note, body) = root.split_vertically(22);
    note.draw(&Text::new(machine_note(records), (12, 2), ("sans-serif", 13).into_font().color(&RGBColor(60, 60, 60))))?;
    let (left, right) = body.split_horizontally(SIZE.0 * 55 / 100);
    throughput(&left, records)?;
    latency(&right, records)?;
    Ok(())
}

/// The line under the title: the machine and build, or how many machines the runs come from.
fn machine_note(records: &[RunRecord]) -> String {
    let machines = provenance::distinct_machines(records.iter().map(|r| &r.machine));
    match machines.as_slice() {
        [] => "machine not recorded".into(),
        [m] => {
            let r = records.iter().find(|r| &&r.machine == m).expect("a record of this machine");
            format!("{}; cropfleet {} ({})", m.describe(), r.build.version, stats::short_commit(&r.build.git_commit))
        }
        several => format!(
            "runs from {} different machines: {}",
            several.len(),
            several
                .iter()
                .map(|m| format!("{} ({} cores)", short_cpu(&m.cpu_model), m.cores))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// A CPU model without the family/model/stepping suffix.
fn short_cpu(model: &str) -> &str {
    model.split(" (family").next().unwrap_or(model)
}

/// The axis along x in the throughput panel: threads, unless another axis of the grid has more
/// values (e.g. `--threads 1 --upload-concurrency 8,32,128`: tasks/s against upload concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XAxis {
    Threads,
    Prefetch,
    Upload,
}

impl XAxis {
    fn choose(records: &[RunRecord]) -> XAxis {
        let count = |x: XAxis| records.iter().map(|r| x.of(r)).collect::<BTreeSet<_>>().len();
        [XAxis::Prefetch, XAxis::Upload]
            .into_iter()
            .filter(|&x| count(x) > count(XAxis::Threads))
            .max_by_key(|&x| count(x))
            .unwrap_or(XAxis::Threads)
    }

    fn of(self, r: &RunRecord) -> u32 {
        match self {
            XAxis::Threads => r.threads,
            XAxis::Prefetch => r.prefetch,
            XAxis::Upload => r.upload_concurrency,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            XAxis::Threads => "CPU threads per worker process",
            XAxis::Prefetch => "tasks prefetched per worker (--prefetch)",
            XAxis::Upload => "uploads at once per worker (--upload-concurrency)",
        }
    }
}

/// What tells one series from another: label, process count, and the other axes that vary (the
/// x axis's own field is 0).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    label: String,
    processes: u32,
    threads: u32,
    prefetch: u32,
    upload_concurrency: u32,
}

impl SeriesKey {
    fn of(r: &RunRecord, x: XAxis) -> SeriesKey {
        let keep = |axis: XAxis, v: u32| if axis == x { 0 } else { v };
        SeriesKey {
            label: r.label.clone(),
            processes: r.processes,
            threads: keep(XAxis::Threads, r.threads),
            prefetch: keep(XAxis::Prefetch, r.prefetch),
            upload_concurrency: keep(XAxis::Upload, r.upload_concurrency),
        }
    }

    /// `multi_label`: several labels; `(thr, pf, upc)`: which of those axes vary across series.
    fn name(&self, multi_label: bool, (thr, pf, upc): (bool, bool, bool)) -> String {
        let mut n = if multi_label {
            format!("{}, {} proc", self.label, self.processes)
        } else {
            format!("{} process{}", self.processes, if self.processes == 1 { "" } else { "es" })
        };
        if thr && self.threads > 0 {
            n.push_str(&format!(" x {} thr", self.threads));
        }
        if pf && self.prefetch > 0 {
            n.push_str(&format!(", prefetch {}", self.prefetch));
        }
        if upc && self.upload_concurrency > 0 {
            n.push_str(&format!(", upload {}", self.upload_concurrency));
        }
        n
    }
}

/// Which of threads, prefetch and upload concurrency vary across `records`.
fn varying(records: &[RunRecord]) -> (bool, bool, bool) {
    let varies = |f: fn(&RunRecord) -> u32| records.iter().map(f).collect::<BTreeSet<_>>().len() > 1;
    (varies(|r| r.threads), varies(|r| r.prefetch), varies(|r| r.upload_concurrency))
}

fn series(records: &[RunRecord], x: XAxis) -> Vec<SeriesKey> {
    let keys: BTreeSet<SeriesKey> = records.iter().map(|r| SeriesKey::of(r, x)).collect();
    keys.into_iter().collect()
}

fn multi_label(records: &[RunRecord]) -> bool {
    records.iter().map(|r| &r.label).collect::<BTreeSet<_>>().len() > 1
}

/// Distinct limits to draw: (y, text).
fn limit_lines(records: &[RunRecord]) -> Vec<(f64, String)> {
    let several_modes = records.iter().map(|r| &r.mode).collect::<BTreeSet<_>>().len() > 1;
    let mut lines: Vec<(f64, String)> = Vec::new();
    for r in records.iter().filter(|r| r.limit.measured()) {
        let y = r.limit.limit_tasks_per_s;
        let mode = if several_modes { format!("{} ", r.mode) } else { String::new() };
        let drift = if r.limit.drifted() { ", drifted" } else { "" };
        let text = format!(
            "{mode}limit {y:.1} tasks/s ({} cores / {:.1} ms CPU{drift})",
            r.cores,
            1000.0 * r.cores as f64 / y
        );
        if !lines.iter().any(|(ly, t)| (ly - y).abs() < 1e-6 && t == &text) {
            lines.push((y, text));
        }
    }
    lines
}

/// Move point labels up so none overlaps another at the same x nor crosses a horizontal line
/// (`lines`, the limits): `labels` are (x, y), `h` the height of one label in data units;
/// returns the y of each label's bottom, in input order.
fn spread_labels(labels: &[(f64, f64)], lines: &[f64], h: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| labels[a].0.total_cmp(&labels[b].0).then(labels[a].1.total_cmp(&labels[b].1)));
    let mut placed = vec![0.0; labels.len()];
    let mut prev: Option<(f64, f64)> = None; // (x, label y) of the label placed last
    for i in order {
        let (x, y) = labels[i];
        let mut ly = y + h * 0.15;
        if let Some((px, py)) = prev {
            if (px - x).abs() < 1e-9 && ly < py + h {
                ly = py + h;
            }
        }
        // Lines are sorted upwards, so a label moved above one is then checked against the next.
        for &line in lines {
            if ly - 0.1 * h < line && line < ly + h {
                ly = line + 0.15 * h;
            }
        }
        placed[i] = ly;
        prev = Some((x, ly));
    }
    placed
}

fn throughput<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, records: &[RunRecord]) -> DrawResult<DB> {
    let axis = XAxis::choose(records);
    // Categorical positions 1..=n for the distinct values along x, so 8, 32, 128 are evenly spaced.
    let values: Vec<u32> = records.iter().map(|r| axis.of(r)).collect::<BTreeSet<_>>().into_iter().collect();
    let pos = |r: &RunRecord| values.iter().position(|&v| v == axis.of(r)).unwrap_or(0) as f64 + 1.0;
    let max_t = values.len().max(1) as u32;
    let limits = limit_lines(records);
    let top = records.iter().map(|r| r.tasks_per_s).chain(limits.iter().map(|l| l.0)).fold(0.0, f64::max).max(1.0);
    let keys = series(records, axis);
    // Room above the highest point for stacked labels: one label height per series.
    let max_y = top * (1.12 + 0.03 * keys.len() as f64);
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (tasks/s)", ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..(max_t as f64 + 0.5), 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc(axis.describe())
        .y_desc("tasks/s")
        .x_labels(max_t as usize + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() > 1e-6 || i < 1.0 {
                return String::new();
            }
            values.get(i as usize - 1).map(|v| v.to_string()).unwrap_or_default()
        })
        .label_style(("sans-serif", 13))
        .draw()?;
    let plot_h = chart.plotting_area().dim_in_pixel().1.max(1) as f64;
    let label_h = (SMALL as f64 + 2.0) * max_y / plot_h;
    // Limits are dashed lines named in the legend (text on the plot would collide with points).
    const LIMIT_COLORS: [RGBColor; 4] =
        [RGBColor(70, 70, 70), RGBColor(140, 90, 40), RGBColor(40, 80, 140), RGBColor(120, 40, 110)];
    for (k, (y, text)) in limits.iter().enumerate() {
        let style = ShapeStyle::from(&LIMIT_COLORS[k % LIMIT_COLORS.len()]).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new([(0.5, *y), (max_t as f64 + 0.5, *y)], 8, 5, style))?
            .label(text.clone())
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (7, 0)], style)
                    + PathElement::new(vec![(11, 0), (18, 0)], style)
            });
    }
    let multi = multi_label(records);
    let axes = varying(records);
    let mut labels: Vec<(f64, f64)> = Vec::new();
    let mut label_colors = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut pts: Vec<(f64, f64)> =
            records.iter().filter(|r| &SeriesKey::of(r, axis) == key).map(|r| (pos(r), r.tasks_per_s)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(key.name(multi, axes))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))?;
        labels.extend(&pts);
        label_colors.extend(std::iter::repeat_n(color, pts.len()));
    }
    let mut lines: Vec<f64> = limits.iter().map(|l| l.0).collect();
    lines.sort_by(f64::total_cmp);
    let placed = spread_labels(&labels, &lines, label_h);
    // A pale box under each label, so a line crossing it does not strike its digits through.
    let plot_w = chart.plotting_area().dim_in_pixel().0.max(1) as f64;
    let unit_x = max_t as f64 / plot_w; // data units per pixel along x
    chart.draw_series(labels.iter().zip(&placed).map(|(&(x, y), &ly)| {
        let w = format!("{y:.1}").len() as f64 * SMALL as f64 * 0.62 * unit_x;
        Rectangle::new([(x + 0.05 - unit_x, ly), (x + 0.05 + w, ly + label_h * 0.9)], WHITE.mix(0.8).filled())
    }))?;
    chart.draw_series(labels.iter().zip(&placed).zip(&label_colors).map(|((&(x, y), &ly), &color)| {
        // Darker than the line, so the text stays legible on white.
        let c = RGBColor((color.0 as f64 * 0.6) as u8, (color.1 as f64 * 0.6) as u8, (color.2 as f64 * 0.6) as u8);
        let style = ("sans-serif", SMALL).into_font().color(&c).pos(Pos::new(HPos::Left, VPos::Bottom));
        Text::new(format!("{y:.1}"), (x + 0.05, ly), style)
    }))?;
    // The legend goes in the corner that hides the fewest points and labels.
    let names: Vec<String> =
        limits.iter().map(|l| l.1.clone()).chain(keys.iter().map(|k| k.name(multi, axes))).collect();
    let legend_w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as i32 * 7 + 40;
    let legend_h = names.len() as i32 * 18 + 10;
    let (px, py) = chart.plotting_area().get_base_pixel();
    let occupied: Vec<(i32, i32)> = labels
        .iter()
        .zip(&placed)
        .flat_map(|(&(x, y), &ly)| [(x, y), (x + 0.2, ly + label_h / 2.0)])
        .map(|p| {
            let (x, y) = chart.backend_coord(&p);
            (x - px, y - py)
        })
        .collect();
    let (w, h) = chart.plotting_area().dim_in_pixel();
    let corner = legend_corner((w as i32, h as i32), (legend_w, legend_h), &occupied);
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// The corner of a `plot`-sized area (pixels) where a `legend`-sized box covers the fewest of
/// the `occupied` pixels; lower right on a tie.
fn legend_corner(plot: (i32, i32), legend: (i32, i32), occupied: &[(i32, i32)]) -> SeriesLabelPosition {
    let ((w, h), (lw, lh)) = (plot, legend);
    let margin = 14; // around the box, for the markers' radius and the labels' extent
    let corners = [
        (SeriesLabelPosition::LowerRight, (w - lw, h - lh)),
        (SeriesLabelPosition::UpperRight, (w - lw, 0)),
        (SeriesLabelPosition::LowerLeft, (0, h - lh)),
        (SeriesLabelPosition::UpperLeft, (0, 0)),
        (SeriesLabelPosition::MiddleRight, (w - lw, (h - lh) / 2)),
        (SeriesLabelPosition::MiddleLeft, (0, (h - lh) / 2)),
    ];
    let covered = |(x0, y0): (i32, i32)| {
        occupied
            .iter()
            .filter(|(x, y)| (x0 - margin..x0 + lw + margin).contains(x) && (y0 - margin..y0 + lh + margin).contains(y))
            .count()
    };
    corners.into_iter().min_by_key(|(_, at)| covered(*at)).map(|(c, _)| c).expect("six corners")
}

/// The x label of each configuration in the stage panel.
fn config_names(records: &[RunRecord]) -> Vec<String> {
    let multi = multi_label(records);
    let (pf, upc) = stats::extra_axes(records);
    records
        .iter()
        .map(|r| {
            let mut n = format!("{}x{}", r.processes, r.threads);
            if pf {
                n.push_str(&format!(" f{}", r.prefetch));
            }
            if upc {
                n.push_str(&format!(" u{}", r.upload_concurrency));
            }
            if multi {
                n = format!("{} {n}", r.label);
            }
            n
        })
        .collect()
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
    let names = config_names(records);
    // Horizontal labels while they fit side by side; else turned upright (drawn by hand below
    // the axis: the mesh anchors rotated labels in the plot), with room for the longest.
    let longest = names.iter().map(|s| s.chars().count()).max().unwrap_or(1) as u32;
    let text_w = longest * SMALL * 6 / 10 + 8;
    let slot = (area.dim_in_pixel().0.saturating_sub(90)) / n as u32;
    let upright = text_w > slot;
    let label_area = if upright { (text_w + 12).min(170) } else { 40 };
    let mut chart = ChartBuilder::on(area)
        .caption("Stage latency per task (ms)", ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(label_area)
        .y_label_area_size(62)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc(if upright { "" } else { "configuration (processes x threads)" })
        .y_desc("ms")
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if upright || (x - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            names.get(i as usize).cloned().unwrap_or_default()
        })
        .label_style(("sans-serif", SMALL))
        .draw()?;
    if upright {
        let base = area.get_base_pixel();
        let style = TextStyle::from(("sans-serif", SMALL).into_font()).transform(FontTransform::Rotate90);
        for (i, name) in names.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64, 0.0));
            // Rotated a quarter turn clockwise, the text runs down from its anchor and its
            // glyphs stand to the anchor's left: centre them on the tick.
            let at = (x - base.0 + SMALL as i32 / 2, y - base.1 + 6);
            area.draw(&Text::new(name.clone(), at, style.clone()))?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_at_one_x_are_stacked_apart() {
        // 110.1 and 108.5 at the same x, 1.0 units per label: the upper one moves up.
        let placed = spread_labels(&[(2.0, 110.1), (2.0, 108.5), (1.0, 60.0)], &[], 1.0);
        assert!((placed[1] - 108.65).abs() < 1e-9, "{placed:?}");
        assert!(placed[0] >= placed[1] + 1.0 - 1e-9, "{placed:?}");
        assert!((placed[2] - 60.15).abs() < 1e-9, "{placed:?}");
        // A label that would cross a limit line goes above it.
        let placed = spread_labels(&[(1.0, 36.8)], &[37.5], 1.0);
        assert!((placed[0] - 37.65).abs() < 1e-9, "{placed:?}");
    }

    #[test]
    fn the_legend_avoids_the_points() {
        let plot = (600, 400);
        let legend = (200, 100);
        // Points along the bottom right: the legend goes up.
        let low_right = [(500, 380), (550, 350), (450, 390)];
        assert!(matches!(legend_corner(plot, legend, &low_right), SeriesLabelPosition::UpperRight));
        // Nothing anywhere: lower right.
        assert!(matches!(legend_corner(plot, legend, &[]), SeriesLabelPosition::LowerRight));
    }

    #[test]
    fn series_names_carry_the_axes_that_vary() {
        let k = SeriesKey { label: "spool".into(), processes: 2, threads: 0, prefetch: 8, upload_concurrency: 32 };
        assert_eq!(k.name(false, (true, false, false)), "2 processes");
        assert_eq!(k.name(true, (true, false, true)), "spool, 2 proc, upload 32");
        assert_eq!(k.name(false, (false, true, true)), "2 processes, prefetch 8, upload 32");
        let k = SeriesKey { threads: 4, upload_concurrency: 0, ..k };
        assert_eq!(k.name(false, (true, false, true)), "2 processes x 4 thr");
    }

    #[test]
    fn the_x_axis_is_the_one_with_most_values() {
        let r = |threads, upload_concurrency| RunRecord { threads, upload_concurrency, ..Default::default() };
        assert_eq!(XAxis::choose(&[r(1, 8), r(2, 8), r(4, 8)]), XAxis::Threads);
        assert_eq!(XAxis::choose(&[r(1, 8), r(1, 32), r(1, 128)]), XAxis::Upload);
        // A tie keeps threads along x.
        assert_eq!(XAxis::choose(&[r(1, 8), r(2, 8), r(1, 32), r(2, 32)]), XAxis::Threads);
    }
}
