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
