//! Instruction counts of the engine's task path, from valgrind's callgrind: the same count on a
//! quiet or a busy machine, so a change of a percent is visible where wall-clock benches (the
//! `engine` and `lossless` criterion benches beside this one) drown it in noise.
//!
//! The 12 MP sample, 50 crops, quality 85, one thread:
//! - `floor_task_50`: raw libjpeg-turbo decode + 50 encodes (`cropfleet::floor::RawCodec`, the
//!   sweep's limit);
//! - `engine_decode`, `engine_crop_encode_50`: the engine's two halves;
//! - `engine_task_1_thread`: decode + `encode_all` on a 1-thread pool (the worker's CPU job);
//! - `lossless_crop_all_50`: the lossless mode's bit copy;
//! - `job_rgb_1_thread`, `job_planar_1_thread`: `engine::run_job` (the function the worker
//!   schedules, with its header and box checks) on a 1-thread pool, on each pixel path.
//!
//! How: the bench runs itself once per measurement under `valgrind --tool=callgrind
//! --toggle-collect=<that function>`, which counts only the instructions executed inside one
//! call of it (a first call outside it warms thread-local handles and the buffer pool), and
//! reads the total from callgrind's output. Each count is compared with the previous run's,
//! kept in `target/cropfleet-instructions.json`.
//!
//! Run: `cargo bench -p cropfleet --bench instructions` (needs valgrind; ~1 minute).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use cropfleet::floor::RawCodec;
use cropfleet::{engine, lossless, sample, CropBox};

const CHILD: &str = "CROPFLEET_INSTRUCTIONS_CHILD";
const QUALITY: u8 = 85;
const NAMES: [&str; 8] = [
    "floor_task_50",
    "floor_planar_task_50",
    "engine_decode",
    "engine_crop_encode_50",
    "engine_task_1_thread",
    "lossless_crop_all_50",
    "job_rgb_1_thread",
    "job_planar_1_thread",
];

fn workload_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cropfleet-bench-workload")
}

fn workload() -> (Vec<u8>, Vec<CropBox>) {
    let w = sample::write_workload(&workload_dir()).expect("sample workload");
    let jpeg = std::fs::read(&w.image).unwrap();
    let boxes = cropfleet::crops::parse_csv(&std::fs::read_to_string(&w.crops).unwrap()).unwrap();
    (jpeg, boxes)
}

// One function per measurement, never inlined, so callgrind can toggle on its name.

#[inline(never)]
fn measured_floor_task_50(raw: &mut RawCodec, jpeg: &[u8], boxes: &[CropBox]) -> usize {
    raw.decode(jpeg).unwrap();
    raw.encode_crops(boxes).unwrap()
}

/// The planar path's floor as the sweep measures it: decode to planes, encode every box.
#[inline(never)]
fn measured_floor_planar_task_50(jpeg: &[u8], info: &engine::ImageInfo, boxes: &[CropBox]) -> usize {
    cropfleet::floor::planar_task(jpeg, info, boxes, QUALITY).unwrap()
}

#[inline(never)]
fn measured_engine_decode(jpeg: &[u8]) -> engine::Decoded {
    engine::decode(jpeg, engine::DEFAULT_MAX_PIXELS).unwrap()
}

#[inline(never)]
fn measured_engine_crop_encode_50(d: &engine::Decoded, boxes: &[CropBox]) -> usize {
    boxes.iter().enumerate().map(|(i, b)| engine::encode_crop(d, i, b, QUALITY).unwrap().len()).sum()
}

#[inline(never)]
fn measured_engine_task_1_thread(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    // Runs on the pool's one thread (see child()): decode and every encode happen here.
    let d = engine::decode(jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    engine::encode_all(&d, boxes, QUALITY, |batch| {
        n.fetch_add(batch.iter().map(|(_, b)| b.len()).sum(), std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    n.into_inner()
}

#[inline(never)]
fn measured_lossless_crop_all_50(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    lossless::crop_all(jpeg, boxes).unwrap().iter().map(|c| c.jpeg.len()).sum()
}

fn run_job(jpeg: &[u8], boxes: &[CropBox], pixel_path: engine::PixelPath) -> usize {
    let spec = engine::JobSpec { pixel_path, quality: QUALITY, ..engine::JobSpec::default() };
    let n = std::sync::atomic::AtomicUsize::new(0);
    let report = engine::run_job(jpeg, boxes, &spec, |batch| {
        n.fetch_add(batch.iter().map(|(_, b)| b.len()).sum(), std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(report.pixel_path, Some(pixel_path), "{report:?}");
    n.into_inner()
}

#[inline(never)]
fn measured_job_rgb_1_thread(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    run_job(jpeg, boxes, engine::PixelPath::Rgb)
}

#[inline(never)]
fn measured_job_planar_1_thread(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    run_job(jpeg, boxes, engine::PixelPath::Planar)
}

/// Under callgrind: a warm-up call, then the measured one.
fn child(name: &str) {
    cropfleet::util::keep_allocations_resident();
    let (jpeg, boxes) = workload();
    match name {
        "floor_task_50" => {
            let mut raw = RawCodec::new(QUALITY).unwrap();
            raw.decode(&jpeg).unwrap();
            black_box(raw.encode_crops(&boxes).unwrap());
            black_box(measured_floor_task_50(&mut raw, &jpeg, &boxes));
        }
        "floor_planar_task_50" => {
            let info = engine::probe(&jpeg, u64::MAX).unwrap();
            let p = engine::planar::decode(&jpeg, &info).unwrap();
            black_box(engine::planar::encode_crop(&p, 0, &boxes[0], QUALITY).unwrap());
            drop(p);
            black_box(measured_floor_planar_task_50(&jpeg, &info, &boxes));
        }
        "engine_decode" => {
            drop(engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap());
            black_box(measured_engine_decode(&jpeg));
        }
        "engine_crop_encode_50" => {
            let d = engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
            black_box(engine::encode_crop(&d, 0, &boxes[0], QUALITY).unwrap());
            black_box(measured_engine_crop_encode_50(&d, &boxes));
        }
        "engine_task_1_thread" => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            pool.install(|| {
                let d = engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
                black_box(engine::encode_crop(&d, 0, &boxes[0], QUALITY).unwrap());
                drop(d);
                black_box(measured_engine_task_1_thread(&jpeg, &boxes))
            });
        }
        "lossless_crop_all_50" => {
            black_box(lossless::crop_all(&jpeg, &boxes[..1]).unwrap());
            black_box(measured_lossless_crop_all_50(&jpeg, &boxes));
        }
        "job_rgb_1_thread" | "job_planar_1_thread" => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            pool.install(|| {
                if name == "job_rgb_1_thread" {
                    black_box(run_job(&jpeg, &boxes, engine::PixelPath::Rgb));
                    black_box(measured_job_rgb_1_thread(&jpeg, &boxes))
                } else {
                    black_box(run_job(&jpeg, &boxes, engine::PixelPath::Planar));
                    black_box(measured_job_planar_1_thread(&jpeg, &boxes))
                }
            });
        }
        other => panic!("unknown measurement {other}"),
    }
}

/// Run one measurement under callgrind; the instructions counted.
fn count(exe: &Path, name: &str, dir: &Path) -> Result<u64, String> {
    let out_file = dir.join(format!("callgrind.{name}.out"));
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(format!("--toggle-collect=*measured_{name}*"))
        .arg(exe)
        .env(CHILD, name)
        .output()
        .map_err(|e| format!("running valgrind: {e}"))?;
    if !out.status.success() {
        return Err(format!("valgrind failed on {name}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = std::fs::read_to_string(&out_file).map_err(|e| format!("reading {}: {e}", out_file.display()))?;
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no totals in {}", out_file.display()))?;
    if total == 0 {
        return Err(format!("callgrind counted nothing inside measured_{name}: was it inlined?"));
    }
    Ok(total)
}

fn main() {
    if let Ok(name) = std::env::var(CHILD) {
        return child(&name);
    }
    // `cargo bench` passes --bench; a filter argument picks measurements by substring.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("instructions: valgrind is not installed; skipping (apt-get install valgrind)");
        return;
    }
    workload(); // generated outside valgrind, once
    let exe = std::env::current_exe().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cropfleet-instructions");
    std::fs::create_dir_all(&dir).unwrap();
    let saved = dir.with_extension("json");
    let previous: serde_json::Map<String, serde_json::Value> =
        std::fs::read(&saved).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut now = previous.clone();
    println!("{:<24} {:>16} {:>16} {:>9}", "measurement", "instructions", "previous", "change");
    for name in NAMES.iter().filter(|n| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()))) {
        let n = match count(&exe, name, &dir) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("instructions: {e}");
                std::process::exit(1);
            }
        };
        let prev = previous.get(*name).and_then(|v| v.as_u64());
        let change = prev.map(|p| format!("{:+.2}%", (n as f64 / p as f64 - 1.0) * 100.0)).unwrap_or_default();
        let prev = prev.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        println!("{name:<24} {n:>16} {prev:>16} {change:>9}");
        now.insert(name.to_string(), n.into());
    }
    std::fs::write(&saved, serde_json::to_vec_pretty(&now).unwrap()).unwrap();
}
