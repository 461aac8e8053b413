//! The engine on the 12 MP sample (50 crops, quality 85, 4:2:0), one thread:
//! - `floor/*`: raw libjpeg-turbo with reused buffers and nothing else — the cost limit of each
//!   pixel path, the same code the sweep's limit measurement runs (`cropfleet::floor`): `decode`
//!   and `encode_50` through packed RGB; `planar_task`, a decode to YCbCr planes and 50 encodes
//!   from plane windows (the planar path's own TurboJPEG calls, one thread, no pool);
//! - `engine/*`: cropfleet's decode, crop+encode and whole CPU task (`task_1_thread`: RGB decode,
//!   then `encode_all`; `job_1_thread` / `job_1_thread_rgb`: through `engine::run_job`, the
//!   function the worker schedules, with its header and box checks, on the planar (default) and
//!   the RGB pixel path);
//! - `progressive/decode`: the same image saved progressive (slow on purpose).
//!
//! Run: `cargo bench -p cropfleet --bench engine`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cropfleet::floor::RawCodec;
use cropfleet::{engine, sample};
use turbojpeg::PixelFormat;

fn workload() -> (Vec<u8>, Vec<cropfleet::CropBox>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cropfleet-bench-workload");
    let w = sample::write_workload(&dir).expect("sample workload");
    let jpeg = std::fs::read(&w.image).unwrap();
    let boxes = cropfleet::crops::parse_csv(&std::fs::read_to_string(&w.crops).unwrap()).unwrap();
    (jpeg, boxes)
}

fn benches(c: &mut Criterion) {
    let (jpeg, boxes) = workload();
    let (w, h) = (sample::SAMPLE_WIDTH as usize, sample::SAMPLE_HEIGHT as usize);
    eprintln!(
        "sample: {}x{}, {} bytes = {:.2} bits/pixel, {} crops",
        w,
        h,
        jpeg.len(),
        jpeg.len() as f64 * 8.0 / (w * h) as f64,
        boxes.len()
    );

    // The floor as the sweep measures it (cropfleet::floor::RawCodec): raw libjpeg-turbo,
    // reused handles and buffers, nothing else.
    let mut g = c.benchmark_group("floor");
    g.sample_size(20).measurement_time(Duration::from_secs(6));
    let mut raw = RawCodec::new(85).unwrap();
    g.bench_function("decode", |b| b.iter(|| raw.decode(&jpeg).unwrap()));
    g.bench_function("encode_50", |b| b.iter(|| black_box(raw.encode_crops(&boxes).unwrap())));
    let info = engine::probe(&jpeg, u64::MAX).unwrap();
    // The planar path's two halves, for the decode | 50 encodes | task table in the README.
    g.bench_function("planar_decode", |b| b.iter(|| black_box(engine::planar::decode(&jpeg, &info).unwrap())));
    let planes = engine::planar::decode(&jpeg, &info).unwrap();
    g.bench_function("planar_encode_50", |b| {
        b.iter(|| black_box(cropfleet::floor::planar_encodes(&planes, &boxes, 85).unwrap()))
    });
    drop(planes);
    g.bench_function("planar_task", |b| {
        b.iter(|| black_box(cropfleet::floor::planar_task(&jpeg, &info, &boxes, 85).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.sample_size(20).measurement_time(Duration::from_secs(6));
    g.bench_function("decode", |b| b.iter(|| black_box(engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap())));
    let decoded = engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
    g.bench_function("crop_encode_50", |b| {
        b.iter(|| {
            let total: usize =
                boxes.iter().enumerate().map(|(i, bx)| engine::encode_crop(&decoded, i, bx, 85).unwrap().len()).sum();
            black_box(total)
        })
    });
    drop(decoded);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    g.bench_function("task_1_thread", |b| {
        b.iter(|| {
            pool.install(|| {
                let d = engine::decode(&jpeg, engine::DEFAULT_MAX_PIXELS).unwrap();
                let n = std::sync::atomic::AtomicUsize::new(0);
                engine::encode_all(&d, &boxes, 85, |batch| {
                    let bytes: usize = batch.iter().map(|(_, b)| b.len()).sum();
                    n.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                })
                .unwrap();
                black_box(n.into_inner())
            })
        })
    });
    for (name, pixel_path) in
        [("job_1_thread", engine::PixelPath::Planar), ("job_1_thread_rgb", engine::PixelPath::Rgb)]
    {
        g.bench_function(name, |b| {
            let spec = engine::JobSpec { pixel_path, ..engine::JobSpec::default() };
            b.iter(|| {
                pool.install(|| {
                    let n = std::sync::atomic::AtomicUsize::new(0);
                    engine::run_job(&jpeg[..], &boxes, &spec, |batch| {
                        let bytes: usize = batch.iter().map(|(_, b)| b.len()).sum();
                        n.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    })
                    .unwrap();
                    black_box(n.into_inner())
                })
            })
        });
    }
    g.finish();

    let rgb = turbojpeg::decompress(&jpeg, PixelFormat::RGB).unwrap();
    let progressive = sample::encode_jpeg(&rgb.pixels, w as u32, h as u32, 90, true);
    drop(rgb);
    let mut g = c.benchmark_group("progressive");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(engine::decode(&progressive, engine::DEFAULT_MAX_PIXELS).unwrap()))
    });
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
