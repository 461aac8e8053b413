//! Pixel truth: every crop decodes to exactly w×h and matches the same box cut from the source
//! as decoded by an independent decoder (the `image` crate's pure-Rust JPEG decoder), at
//! PSNR ≥ 35 dB for quality 85.

use cropfleet::crops::CropBox;
use cropfleet::engine;
use cropfleet::sample;

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn independent_decode(jpeg: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg).unwrap().into_rgb8()
}

fn check_crops(source: &[u8], boxes: &[CropBox]) {
    let reference = independent_decode(source);
    let decoded = engine::decode(source, engine::DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!((decoded.width, decoded.height), reference.dimensions());
    for (i, b) in boxes.iter().enumerate() {
        let out = engine::encode_crop(&decoded, i, b, 85).unwrap();
        let got = independent_decode(&out);
        assert_eq!(got.dimensions(), (b.w as u32, b.h as u32), "crop #{i} size");
        let want = image::imageops::crop_imm(&reference, b.x as u32, b.y as u32, b.w as u32, b.h as u32).to_image();
        let p = psnr(got.as_raw(), want.as_raw());
        assert!(p >= 35.0, "crop #{i} {b}: PSNR {p:.1} dB");
    }
}

#[test]
fn crops_match_an_independent_decode() {
    let (w, h) = (1600, 1200);
    let jpeg = sample::encode_jpeg(&sample::photo(w, h, 11), w, h, 90, false);
    let mut boxes = sample::boxes(w, h, 20, 3);
    // Edges and odd offsets too.
    boxes.push(CropBox { x: 0, y: 0, w: 1, h: 1 });
    boxes.push(CropBox { x: w as i64 - 333, y: h as i64 - 77, w: 333, h: 77 });
    boxes.push(CropBox { x: 1, y: 3, w: 599, h: 401 });
    check_crops(&jpeg, &boxes);
}

#[test]
fn progressive_sources_crop_the_same() {
    let (w, h) = (640, 480);
    let rgb = sample::photo(w, h, 5);
    let jpeg = sample::encode_jpeg(&rgb, w, h, 90, true);
    check_crops(&jpeg, &sample::boxes(w, h, 5, 9));
}

#[test]
fn boxes_refer_to_the_oriented_image() {
    let (w, h) = (400, 300);
    let jpeg = sample::encode_jpeg(&sample::photo(w, h, 2), w, h, 95, false);
    let rotated = cropfleet::exif::with_orientation(&jpeg, 6); // displayed as 300x400
    let d = engine::decode(&rotated, engine::DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!((d.width, d.height), (300, 400));
    let b = CropBox { x: 0, y: 0, w: 50, h: 40 };
    let crop = independent_decode(&engine::encode_crop(&d, 0, &b, 95).unwrap());
    // Display (x, y) comes from stored (y, h-1-x): the top-left of the displayed image is the
    // bottom-left of the stored one.
    let stored = independent_decode(&jpeg);
    let want = image::imageops::rotate90(&image::imageops::crop_imm(&stored, 0, h - 50, 40, 50).to_image());
    assert!(psnr(crop.as_raw(), want.as_raw()) >= 35.0);
}

/// Both paths through the whole CPU job on `source`: every crop exact in size, and each crop's
/// planar PSNR against the source's own pixels (an independent decode) at least its RGB PSNR
/// minus 0.3 dB — the bound the planar path must hold to be the default. Prints both for the
/// record.
fn planar_holds_the_quality_bound(name: &str, source: &[u8], boxes: &[CropBox]) {
    use cropfleet::engine::{run_job, JobSpec, PixelPath};
    let reference = independent_decode(source);
    let mut by_path = Vec::new();
    for path in [PixelPath::Planar, PixelPath::Rgb] {
        let got = std::sync::Mutex::new(Vec::new());
        let spec = JobSpec { pixel_path: path, quality: 85, ..JobSpec::default() };
        let r = run_job(source, boxes, &spec, |b| got.lock().unwrap().extend(b)).unwrap();
        assert_eq!(r.pixel_path, Some(path), "{name}: {:?}", r.pixel_fallback);
        let mut crops = got.into_inner().unwrap();
        crops.sort_by_key(|(i, _)| *i);
        assert_eq!(crops.len(), boxes.len());
        let psnrs: Vec<f64> = crops
            .iter()
            .zip(boxes)
            .map(|((i, jpeg), b)| {
                let got = independent_decode(jpeg);
                assert_eq!(got.dimensions(), (b.w as u32, b.h as u32), "{name} {path}: crop #{i} size");
                let want =
                    image::imageops::crop_imm(&reference, b.x as u32, b.y as u32, b.w as u32, b.h as u32).to_image();
                psnr(got.as_raw(), want.as_raw()).min(99.0)
            })
            .collect();
        by_path.push(psnrs);
    }
    let (planar, rgb) = (&by_path[0], &by_path[1]);
    let mut worst = (f64::INFINITY, 0.0, 0.0); // (planar - rgb, planar, rgb)
    for (i, (&pp, &p)) in planar.iter().zip(rgb).enumerate() {
        assert!(pp >= p - 0.3, "{name}: crop #{i} {}: planar {pp:.2} dB < rgb {p:.2} dB - 0.3", boxes[i]);
        if pp - p < worst.0 {
            worst = (pp - p, pp, p);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{name}: mean PSNR planar {:.2} dB, rgb {:.2} dB; worst crop planar - rgb {:+.2} dB ({:.2} vs {:.2})",
        mean(planar),
        mean(rgb),
        worst.0,
        worst.1,
        worst.2
    );
}

/// The quality bound for every chroma subsampling a camera or an editor writes, grayscale, odd
/// and even box edges and sizes.
#[test]
fn planar_and_rgb_paths_meet_the_quality_bound_for_every_subsampling() {
    use turbojpeg::Subsamp;
    let (w, h) = (1201, 901); // odd: partial MCUs and a last chroma sample covering one pixel
    let rgb = sample::photo(w, h, 17);
    let mut boxes = sample::boxes(w, h, 12, 5);
    boxes.extend([
        CropBox { x: 0, y: 0, w: 64, h: 64 },
        CropBox { x: 1, y: 0, w: 63, h: 64 },
        CropBox { x: 0, y: 1, w: 64, h: 63 },
        CropBox { x: 3, y: 5, w: 201, h: 99 },
        CropBox { x: 1, y: 1, w: 1, h: 1 },
        CropBox { x: w as i64 - 101, y: h as i64 - 51, w: 101, h: 51 },
        CropBox { x: 600, y: 400, w: 2, h: 3 },
    ]);
    for (name, ss) in [
        ("4:2:0", Subsamp::Sub2x2),
        ("4:4:4", Subsamp::None),
        ("4:2:2", Subsamp::Sub2x1),
        ("4:4:0", Subsamp::Sub1x2),
        ("4:1:1", Subsamp::Sub4x1),
        ("gray", Subsamp::Gray),
    ] {
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_quality(92).unwrap();
        c.set_subsamp(ss).unwrap();
        let (wu, hu) = (w as usize, h as usize);
        let img = turbojpeg::Image {
            pixels: &rgb[..],
            width: wu,
            pitch: wu * 3,
            height: hu,
            format: turbojpeg::PixelFormat::RGB,
        };
        let source = c.compress_to_vec(img).unwrap();
        planar_holds_the_quality_bound(name, &source, &boxes);
    }
}

/// The quality bound on the sweep's own workload: the 12 MP sample and its 50 boxes (40 of
/// them with an odd left or top edge).
#[test]
fn the_sample_s_50_crops_meet_the_quality_bound() {
    let dir = tempfile::tempdir().unwrap();
    let w = sample::write_workload(dir.path()).unwrap();
    let source = std::fs::read(&w.image).unwrap();
    let boxes = cropfleet::crops::parse_csv(&std::fs::read_to_string(&w.crops).unwrap()).unwrap();
    assert_eq!(boxes.len(), sample::SAMPLE_CROPS);
    planar_holds_the_quality_bound("sample 4000x3000 4:2:0", &source, &boxes);
}
