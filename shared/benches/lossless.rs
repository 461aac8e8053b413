//! Lossless crop mode on the 12 MP sample (50 crops), one thread, against the default path:
//! - `lossless/crop_all_50`: the lossless mode: one pass over the scan, then every crop written
//!   by copying its blocks' entropy-coded bits (`lossless/bitcopy.rs`);
//! - `lossless/tj3transform_50`: the same crops from one `tj3Transform` call (the fallback for
//!   progressive, arithmetic and EXIF-rotated sources);
//! - `lossless/per_crop_calls_50`: one call per crop, as the `turbojpeg` crate's safe
//!   `Transformer::transform` does — the trap: every call re-reads the whole source;
//! - `lossless/default_task_50`: the default mode, decode once + 50 encodes (quality 85);
//! - `lossless/job_50`: the lossless mode through `engine::run_job`, as the worker runs it
//!   (header and box checks, then `crop_all_50`'s work, crops handed to a sink);
//! - `lossless/*_progressive`: the same source saved progressive (the lossless mode then runs
//!   `tj3Transform`).
//!
//! `keep_allocations_resident()` is called at start-up, as the worker does; set
//! `CROPFLEET_BENCH_MALLOC_DEFAULT=1` to measure glibc's default allocator behaviour instead
//! (the group is then named `lossless_malloc_default`).
//!
//! Run: `cargo bench -p cropfleet --bench lossless`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cropfleet::lossless::{self, Method};
use cropfleet::{engine, sample, CropBox};
use turbojpeg::PixelFormat;

fn workload() -> (Vec<u8>, Vec<CropBox>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cropfleet-bench-workload");
    let w = sample::write_workload(&dir).expect("sample workload");
    let jpeg = std::fs::read(&w.image).unwrap();
    let boxes = cropfleet::crops::parse_csv(&std::fs::read_to_string(&w.crops).unwrap()).unwrap();
    (jpeg, boxes)
}

fn default_task(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    let d = engine::decode(jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
    boxes.iter().enumerate().map(|(i, b)| engine::encode_crop(&d, i, b, 85).unwrap().len()).sum()
}

fn lossless_bytes(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    lossless::crop_all(jpeg, boxes).unwrap().iter().map(|c| c.jpeg.len()).sum()
}

fn tj3_bytes(jpeg: &[u8], boxes: &[CropBox]) -> usize {
    lossless::crop_all_with(jpeg, boxes, Method::Tj3Transform).unwrap().iter().map(|c| c.jpeg.len()).sum()
}

fn benches(c: &mut Criterion) {
    let resident = std::env::var_os("CROPFLEET_BENCH_MALLOC_DEFAULT").is_none();
    if resident {
        cropfleet::util::keep_allocations_resident();
    }
    let (jpeg, boxes) = workload();
    let (w, h) = (sample::SAMPLE_WIDTH, sample::SAMPLE_HEIGHT);
    let rgb = turbojpeg::decompress(&jpeg, PixelFormat::RGB).unwrap();
    let progressive = sample::encode_jpeg(&rgb.pixels, w, h, 90, true);
    drop(rgb);

    let layout = lossless::inspect(&jpeg).unwrap();
    let snapped: Vec<CropBox> = boxes.iter().map(|b| lossless::snap(b, &layout)).collect();
    let area = |bs: &[CropBox]| bs.iter().map(|b| (b.w * b.h) as f64).sum::<f64>();
    eprintln!(
        "sample: {w}x{h}, {} bytes baseline, {} bytes progressive, {} crops on a {}x{} grid; \
         snapping adds {:.1}% pixels; malloc {}",
        jpeg.len(),
        progressive.len(),
        boxes.len(),
        layout.mcu_width,
        layout.mcu_height,
        100.0 * (area(&snapped) / area(&boxes) - 1.0),
        if resident { "kept resident (mallopt)" } else { "glibc default" },
    );
    eprintln!(
        "output bytes for 50 crops: lossless {} (tj3Transform {}, from progressive {}), default q85 {}",
        lossless_bytes(&jpeg, &boxes),
        tj3_bytes(&jpeg, &boxes),
        lossless_bytes(&progressive, &boxes),
        default_task(&jpeg, &boxes),
    );

    let mut g = c.benchmark_group(if resident { "lossless" } else { "lossless_malloc_default" });
    g.sample_size(20).measurement_time(Duration::from_secs(6));
    g.bench_function("crop_all_50", |b| b.iter(|| black_box(lossless_bytes(&jpeg, &boxes))));
    g.bench_function("tj3transform_50", |b| b.iter(|| black_box(tj3_bytes(&jpeg, &boxes))));
    g.bench_function("default_task_50", |b| b.iter(|| black_box(default_task(&jpeg, &boxes))));
    let lossless_job = engine::JobSpec { mode: engine::CropMode::Lossless, ..engine::JobSpec::default() };
    g.bench_function("job_50", |b| {
        b.iter(|| {
            let n = std::sync::atomic::AtomicUsize::new(0);
            engine::run_job(&jpeg[..], &boxes, &lossless_job, |batch| {
                let bytes: usize = batch.iter().map(|(_, b)| b.len()).sum();
                n.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
            black_box(n.into_inner())
        })
    });
    g.bench_function("crop_all_50_progressive", |b| b.iter(|| black_box(lossless_bytes(&progressive, &boxes))));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("default_task_50_progressive", |b| b.iter(|| black_box(default_task(&progressive, &boxes))));
    g.bench_function("per_crop_calls_50", |b| {
        b.iter(|| {
            let total: usize = boxes.iter().map(|bx| lossless_bytes(&jpeg, std::slice::from_ref(bx))).sum();
            black_box(total)
        })
    });
    g.finish();
}

criterion_group!(lossless_benches, benches);
criterion_main!(lossless_benches);
