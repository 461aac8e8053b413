//! Truth for the lossless crop mode: every crop carries the source's DCT coefficients for its
//! blocks, so its decoded luma equals the source's decoded luma inside the snapped box bit for
//! bit — for every subsampling, baseline/progressive/arithmetic sources and boxes touching the
//! right and bottom edges. Chroma planes (no upsampling) must match too; RGB may differ only
//! next to the crop's edges, where chroma upsampling reads past them. With an EXIF orientation
//! the reference is the whole image transformed losslessly (see [`reference_luma`]). Sources
//! the transform cannot take get a reason.

use cropfleet::crops::CropBox;
use cropfleet::lossless::{self, Layout, LosslessCrop};
use cropfleet::{exif, sample, EngineError};
use turbojpeg::{Colorspace, Compressor, Image, PixelFormat, Subsamp, Transform, TransformOp};
use turbojpeg_sys as sys;

const ALL_SUBSAMPS: [Subsamp; 7] =
    [Subsamp::None, Subsamp::Sub2x1, Subsamp::Sub2x2, Subsamp::Sub1x2, Subsamp::Sub4x1, Subsamp::Sub1x4, Subsamp::Gray];

#[derive(Clone, Copy, Default)]
struct Opts {
    progressive: bool,
    arithmetic: bool,
}

fn encode(rgb: &[u8], w: u32, h: u32, subsamp: Subsamp, opts: Opts) -> Vec<u8> {
    let mut c = Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    c.set_subsamp(subsamp).unwrap();
    c.set_progressive(opts.progressive).unwrap();
    c.set_arithmetic(opts.arithmetic).unwrap();
    let img =
        Image { pixels: rgb, width: w as usize, pitch: w as usize * 3, height: h as usize, format: PixelFormat::RGB };
    c.compress_to_vec(img).unwrap()
}

/// A single-channel plane.
struct Plane {
    px: Vec<u8>,
    w: usize,
    h: usize,
}

impl Plane {
    fn at(&self, x: usize, y: usize) -> u8 {
        self.px[y * self.w + x]
    }
}

fn decode_gray(jpeg: &[u8]) -> Plane {
    let img = turbojpeg::decompress(jpeg, PixelFormat::GRAY).unwrap();
    assert_eq!(img.pitch, img.width);
    Plane { px: img.pixels, w: img.width, h: img.height }
}

/// The decoded Y, Cb, Cr planes (chroma at its sampled resolution, no upsampling).
fn decode_planes(jpeg: &[u8]) -> Vec<Plane> {
    let yuv = turbojpeg::decompress_to_yuv(jpeg).unwrap();
    let (w, h, subsamp) = (yuv.width as i32, yuv.height as i32, yuv.subsamp as i32);
    let components = if yuv.subsamp == Subsamp::Gray { 1 } else { 3 };
    let mut offset = 0;
    (0..components)
        .map(|c| {
            // SAFETY: plain arithmetic functions.
            let (pw, ph) = unsafe { (sys::tj3YUVPlaneWidth(c, w, subsamp), sys::tj3YUVPlaneHeight(c, h, subsamp)) };
            let (pw, ph) = (pw as usize, ph as usize);
            let stride = pw.next_multiple_of(yuv.align);
            let mut px = Vec::with_capacity(pw * ph);
            for row in 0..ph {
                px.extend_from_slice(&yuv.pixels[offset + row * stride..offset + row * stride + pw]);
            }
            offset += stride * ph;
            Plane { px, w: pw, h: ph }
        })
        .collect()
}

/// The luma the crops must reproduce exactly: the source's, in the displayed frame.
///
/// For an upright source that is its decoded luma. For EXIF orientations 2–8 the crops carry
/// the source's coefficients rotated/flipped, so the reference is the luma of the *whole* image
/// transformed losslessly by the same operation (libjpeg-turbo, no crop): cropping must not
/// change a coefficient. Decoding first and rotating the pixels gives the same picture only
/// up to ±1 — the IDCT rounds a transposed or mirrored block differently — which is checked
/// too, so the geometry (which way is up) is right.
fn reference_luma(jpeg: &[u8]) -> Plane {
    let o = exif::jpeg_orientation(jpeg).unwrap_or(1);
    let stored = decode_gray(jpeg);
    if o == 1 {
        return stored;
    }
    let mut pixel_rotated = Vec::new();
    let (w, h) = exif::apply_orientation(o, &stored.px, stored.w as u32, stored.h as u32, 1, &mut pixel_rotated);
    let op = [
        TransformOp::Hflip,
        TransformOp::Rot180,
        TransformOp::Vflip,
        TransformOp::Transpose,
        TransformOp::Rot90,
        TransformOp::Transverse,
        TransformOp::Rot270,
    ][o as usize - 2];
    let mut t = Transform::op(op);
    t.perfect = true;
    t.copy_none = true;
    let whole = decode_gray(&turbojpeg::transform(&t, jpeg).unwrap());
    assert_eq!((whole.w, whole.h), (w as usize, h as usize), "orientation {o}");
    let worst = whole.px.iter().zip(&pixel_rotated).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "orientation {o}: the lossless transform is {worst} levels off the rotated pixels");
    whole
}

/// Check every crop against the source: sizes, snapping, exact luma; exact chroma planes and
/// near-exact RGB when the source is upright.
fn check(source: &[u8], boxes: &[CropBox], crops: &[LosslessCrop]) {
    let layout = lossless::inspect(source).unwrap();
    assert_eq!(crops.len(), boxes.len());
    let luma = reference_luma(source);
    assert_eq!((luma.w, luma.h), (layout.width as usize, layout.height as usize));
    let upright = layout.orientation == 1;
    let (src_planes, src_rgb) = if upright {
        (decode_planes(source), Some(turbojpeg::decompress(source, PixelFormat::RGB).unwrap()))
    } else {
        (Vec::new(), None)
    };
    for (i, (b, crop)) in boxes.iter().zip(crops).enumerate() {
        let s = crop.snapped;
        let ctx = format!("crop #{i} {b} -> {s} ({}x{} grid)", layout.mcu_width, layout.mcu_height);
        // Snapped outward onto the grid, right and bottom kept, inside the image.
        assert_eq!(s, lossless::snap(b, &layout), "{ctx}");
        assert!(s.x % layout.mcu_width as i64 == 0 && s.y % layout.mcu_height as i64 == 0, "{ctx}");
        assert!(s.x <= b.x && s.y <= b.y && s.x + s.w == b.x + b.w && s.y + s.h == b.y + b.h, "{ctx}");
        s.check(i, layout.width, layout.height).unwrap();
        // The crop is the snapped box, and its luma is the source's, bit for bit.
        let got = decode_gray(&crop.jpeg);
        assert_eq!((got.w, got.h), (s.w as usize, s.h as usize), "{ctx}: decoded size");
        for y in 0..got.h {
            for x in 0..got.w {
                let want = luma.at(s.x as usize + x, s.y as usize + y);
                assert_eq!(got.at(x, y), want, "{ctx}: luma differs at ({x}, {y}) of the crop");
            }
        }
        let Some(src_rgb) = &src_rgb else { continue };
        // Chroma planes: the same coefficients give the same samples.
        let planes = decode_planes(&crop.jpeg);
        assert_eq!(planes.len(), src_planes.len(), "{ctx}");
        for (c, (p, sp)) in planes.iter().zip(&src_planes).enumerate().skip(1) {
            let (fx, fy) = (luma.w.div_ceil(sp.w), luma.h.div_ceil(sp.h));
            let (x0, y0) = (s.x as usize / fx, s.y as usize / fy);
            for y in 0..p.h {
                for x in 0..p.w {
                    assert_eq!(p.at(x, y), sp.at(x0 + x, y0 + y), "{ctx}: plane {c} differs at ({x}, {y})");
                }
            }
        }
        // RGB: exact away from the crop's edges, close along them.
        let rgb = turbojpeg::decompress(&crop.jpeg, PixelFormat::RGB).unwrap();
        let (mut worst_inside, mut sum_edge, mut n_edge) = (0u8, 0u64, 0u64);
        for y in 0..rgb.height {
            for x in 0..rgb.width {
                let edge = x < 2 || y < 2 || x + 2 >= rgb.width || y + 2 >= rgb.height;
                for k in 0..3 {
                    let a = rgb.pixels[y * rgb.pitch + x * 3 + k];
                    let b = src_rgb.pixels[(s.y as usize + y) * src_rgb.pitch + (s.x as usize + x) * 3 + k];
                    let d = a.abs_diff(b);
                    if edge {
                        sum_edge += d as u64;
                        n_edge += 1;
                    } else {
                        worst_inside = worst_inside.max(d);
                    }
                }
            }
        }
        assert_eq!(worst_inside, 0, "{ctx}: RGB differs away from the crop's edges");
        let mean_edge = sum_edge as f64 / n_edge.max(1) as f64;
        assert!(mean_edge < 2.0, "{ctx}: RGB along the edges differs by {mean_edge:.2} on average");
    }
}

/// Sample boxes plus the awkward ones: a single pixel at the origin, odd offsets, the whole
/// image, and boxes ending on the right edge, the bottom edge and the bottom-right corner.
fn boxes_for(w: u32, h: u32, seed: u64) -> Vec<CropBox> {
    let (wi, hi) = (w as i64, h as i64);
    let mut boxes = sample::boxes(w, h, 8, seed);
    boxes.extend([
        CropBox { x: 0, y: 0, w: 1, h: 1 },
        CropBox { x: 1, y: 3, w: 37, h: 29 },
        CropBox { x: 0, y: 0, w: wi, h: hi },
        CropBox { x: wi - 37, y: 5, w: 37, h: 50 },
        CropBox { x: 9, y: hi - 21, w: 60, h: 21 },
        CropBox { x: wi - 1, y: hi - 1, w: 1, h: 1 },
        CropBox { x: wi - 100, y: hi - 77, w: 100, h: 77 },
    ]);
    boxes
}

#[test]
fn luma_is_exact_for_every_subsampling_and_coding() {
    // Neither side a multiple of any iMCU size: partial iMCUs on the right and bottom.
    let (w, h) = (330, 250);
    let rgb = sample::photo(w, h, 17);
    let boxes = boxes_for(w, h, 4);
    for subsamp in ALL_SUBSAMPS {
        for opts in [
            Opts::default(),
            Opts { progressive: true, arithmetic: false },
            Opts { progressive: false, arithmetic: true },
        ] {
            let jpeg = encode(&rgb, w, h, subsamp, opts);
            let layout = lossless::inspect(&jpeg).unwrap();
            let (mw, mh) = (subsamp.mcu_width() as u32, subsamp.mcu_height() as u32);
            let want = Layout { width: w, height: h, mcu_width: mw, mcu_height: mh, orientation: 1 };
            assert_eq!(layout, want, "{subsamp:?}");
            let crops = lossless::crop_all(&jpeg, &boxes).unwrap();
            check(&jpeg, &boxes, &crops);
            // Outputs are baseline Huffman whatever the source used.
            for c in &crops {
                assert!(c.jpeg.windows(2).any(|m| m == [0xFF, 0xC0]), "{subsamp:?}: not baseline");
            }
        }
    }
}

#[test]
fn sample_like_workload_baseline_and_progressive() {
    let (w, h) = (1600, 1200);
    let rgb = sample::photo(w, h, 11);
    let boxes = sample::boxes(w, h, 50, 3);
    for progressive in [false, true] {
        let jpeg = sample::encode_jpeg(&rgb, w, h, 90, progressive);
        let crops = lossless::crop_all(&jpeg, &boxes).unwrap();
        check(&jpeg, &boxes, &crops);
    }
}

#[test]
fn every_perfect_orientation_is_applied() {
    // 320x240 is whole 16x16 iMCUs: every orientation's transform is perfect.
    let (w, h) = (320, 240);
    let rgb = sample::photo(w, h, 23);
    for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::Gray] {
        let jpeg = encode(&rgb, w, h, subsamp, Opts::default());
        for o in 1..=8u8 {
            let src = exif::with_orientation(&jpeg, o);
            let layout = lossless::inspect(&src).unwrap_or_else(|e| panic!("{subsamp:?} orientation {o}: {e}"));
            assert_eq!(layout.orientation, o);
            let (dw, dh) = exif::oriented_size(o, w, h);
            assert_eq!((layout.width, layout.height), (dw, dh));
            let (mw, mh) = (subsamp.mcu_width() as u32, subsamp.mcu_height() as u32);
            let want_grid = if o >= 5 { (mh, mw) } else { (mw, mh) };
            assert_eq!((layout.mcu_width, layout.mcu_height), want_grid, "{subsamp:?} orientation {o}");
            let boxes = boxes_for(dw, dh, o as u64);
            let crops = lossless::crop_all(&src, &boxes).unwrap();
            check(&src, &boxes, &crops);
            // The crops are upright: no EXIF orientation is carried over.
            assert!(crops.iter().all(|c| exif::jpeg_orientation(&c.jpeg).is_none()));
        }
    }
}

#[test]
fn imperfect_orientations_are_refused_and_perfect_ones_kept() {
    // 4:2:0, 336x250: whole iMCUs across (336 = 21 x 16), a partial iMCU row at the bottom.
    let (w, h) = (336, 250);
    let jpeg = encode(&sample::photo(w, h, 29), w, h, Subsamp::Sub2x2, Opts::default());
    for o in [3u8, 4, 6, 7] {
        let e = lossless::can_transform(&exif::with_orientation(&jpeg, o)).unwrap_err();
        assert!(e.contains(&format!("orientation {o}")) && e.contains("not lossless") && e.contains("height"), "{e}");
        let err = lossless::crop_all(&exif::with_orientation(&jpeg, o), &[CropBox { x: 0, y: 0, w: 8, h: 8 }]);
        assert!(matches!(err, Err(EngineError::Decode(ref m)) if m.contains("cannot crop losslessly")), "{err:?}");
    }
    // A horizontal flip, a transpose and a 90° counter-clockwise rotation only move the right
    // edge, or nothing, to the top/left.
    for o in [2u8, 5, 8] {
        let src = exif::with_orientation(&jpeg, o);
        let l = lossless::inspect(&src).unwrap_or_else(|e| panic!("orientation {o}: {e}"));
        let boxes = boxes_for(l.width, l.height, 7);
        check(&src, &boxes, &lossless::crop_all(&src, &boxes).unwrap());
    }
}

#[test]
fn sources_the_transform_cannot_take_get_a_reason() {
    let (w, h) = (64u32, 48u32);
    let rgb = sample::photo(w, h, 3);
    let img = Image {
        pixels: &rgb[..],
        width: w as usize,
        pitch: w as usize * 3,
        height: h as usize,
        format: PixelFormat::RGB,
    };

    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();

    let mut c = Compressor::new().unwrap();
    c.set_lossless(true).unwrap();
    let lossless_jpeg = c.compress_to_vec(img).unwrap();

    let cmyk: Vec<u8> = rgb.chunks_exact(3).flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0]).collect();
    let mut c = Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    c.set_subsamp(Subsamp::None).unwrap();
    let cmyk_jpeg = c
        .compress_to_vec(Image {
            pixels: &cmyk[..],
            width: w as usize,
            pitch: w as usize * 4,
            height: h as usize,
            format: PixelFormat::CMYK,
        })
        .unwrap();

    let mut c = Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    c.set_subsamp(Subsamp::None).unwrap();
    c.set_colorspace(Colorspace::RGB).unwrap();
    let rgb_jpeg = c.compress_to_vec(img).unwrap();

    let cases: [(&str, &[u8], &str); 6] = [
        ("png", &png, "PNG"),
        ("lossless", &lossless_jpeg, "lossless JPEG"),
        ("cmyk", &cmyk_jpeg, "CMYK"),
        ("rgb-coded", &rgb_jpeg, "RGB-coded"),
        ("garbage", b"GIF89a not an image", "not a JPEG"),
        ("empty", b"", "empty"),
    ];
    for (name, bytes, want) in cases {
        let reason = lossless::can_transform(bytes).unwrap_err();
        eprintln!("{name}: {reason}");
        assert!(reason.contains(want), "{name}: {reason}");
        let err = lossless::crop_all(bytes, &[CropBox { x: 0, y: 0, w: 8, h: 8 }]).unwrap_err();
        assert!(matches!(err, EngineError::Decode(_)) && err.to_string().contains(want), "{name}: {err}");
    }
}

#[test]
fn truncated_and_corrupt_jpegs_are_errors_not_panics() {
    let (w, h) = (320, 240);
    let jpeg = encode(&sample::photo(w, h, 31), w, h, Subsamp::Sub2x2, Opts::default());
    let boxes = boxes_for(w, h, 2);
    for cut in [jpeg.len() - 2, jpeg.len() * 2 / 3, jpeg.len() / 2, 700, 300, 100, 20, 3] {
        let part = &jpeg[..cut];
        match lossless::crop_all(part, &boxes) {
            Err(EngineError::Decode(m)) => assert!(!m.is_empty()),
            other => panic!("cut at {cut}: {other:?}"),
        }
        // A header that is still whole passes the check; the pixels then fail in crop_all.
        if cut < 100 {
            assert!(lossless::can_transform(part).is_err(), "cut at {cut}");
        }
        // The thread's handle recovers: the whole image still crops.
        check(&jpeg, &boxes[..2], &lossless::crop_all(&jpeg, &boxes[..2]).unwrap());
    }
    // Corrupt entropy-coded data in the middle: an error or a crop, never a panic.
    let mut corrupt = jpeg.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 64].fill(0xFF);
    let _ = lossless::crop_all(&corrupt, &boxes);
}

#[test]
fn bad_boxes_are_named() {
    let (w, h) = (320, 240);
    let jpeg = encode(&sample::photo(w, h, 5), w, h, Subsamp::Sub2x2, Opts::default());
    let boxes = [CropBox { x: 0, y: 0, w: 10, h: 10 }, CropBox { x: 300, y: 0, w: 21, h: 10 }];
    let e = lossless::crop_all(&jpeg, &boxes).unwrap_err();
    assert!(matches!(e, EngineError::BadBox { index: 1, .. }), "{e}");
    let e = lossless::crop_all(&jpeg, &[CropBox { x: 0, y: 0, w: 0, h: 10 }]).unwrap_err();
    assert!(matches!(e, EngineError::BadBox { index: 0, .. }), "{e}");
    assert!(lossless::crop_all(&jpeg, &[]).unwrap().is_empty());
}

#[test]
fn exif_is_dropped_and_icc_kept() {
    let (w, h) = (160, 128);
    let jpeg = encode(&sample::photo(w, h, 8), w, h, Subsamp::Sub2x2, Opts::default());
    // APP2 ICC_PROFILE chunk 1 of 1 with an opaque payload, then EXIF (orientation 1) in front.
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
    let mut app2 = vec![0xFF, 0xE2];
    app2.extend_from_slice(&((2 + 12 + 2 + payload.len()) as u16).to_be_bytes());
    app2.extend_from_slice(b"ICC_PROFILE\0\x01\x01");
    app2.extend_from_slice(&payload);
    let mut src = exif::with_orientation(&jpeg, 1);
    src.splice(2..2, app2.iter().copied());
    let crops = lossless::crop_all(&src, &[CropBox { x: 20, y: 20, w: 50, h: 40 }]).unwrap();
    let out = &crops[0].jpeg;
    assert!(out.windows(app2.len()).any(|win| win == &app2[..]), "ICC profile not carried over");
    assert!(!out.windows(6).any(|win| win == b"Exif\0\0"), "EXIF carried over");
}

#[test]
fn crops_on_other_threads_work_too() {
    let (w, h) = (320, 240);
    let jpeg = encode(&sample::photo(w, h, 41), w, h, Subsamp::Sub2x2, Opts::default());
    let boxes = boxes_for(w, h, 9);
    let want = lossless::crop_all(&jpeg, &boxes).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| lossless::crop_all(&jpeg, &boxes).unwrap())).collect();
        for t in handles {
            assert_eq!(t.join().unwrap(), want);
        }
    });
}
