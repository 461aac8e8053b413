//! The CPU job of one task, as one synchronous function: source bytes and boxes in, encoded
//! crops out through a sink as they are ready, and a report of what was done and how long each
//! part took. No I/O, no runtime: the worker schedules [`run_job`] on its CPU pool, and tests and
//! benchmarks call it directly.
//!
//! The paths a job can take, chosen from [`JobSpec::mode`] and the source:
//! - **decode** ([`CropMode::Decode`], and every source the lossless path declines): decode once
//!   (header check, pixel limit), then cut and encode every box on the current rayon pool, by
//!   one of two pixel paths ([`PixelPath`]): **planar** (default) — a YCbCr or grayscale JPEG
//!   decoded to its planes and each crop encoded from plane windows, no colour conversion
//!   ([`super::planar`]); **rgb** — decoded to packed RGB with EXIF orientation applied, each crop
//!   encoded from RGB ([`super::encode_all`]); sources the planar path does not take go this way;
//! - **lossless** ([`CropMode::Lossless`] on a JPEG that [`lossless::can_transform`] accepts):
//!   every crop cut in the DCT domain in one pass ([`lossless::crop_all`]), boxes snapped to the
//!   iMCU grid, no decode and no re-encode.
//!
//! A new path (another pixel format, another codec) is one more private function here and, if
//! callers choose it, one more [`CropMode`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{decode, encode_all, planar, probe, EngineError};
use crate::crops::{self, CropBox};
use crate::lossless;

/// How crops are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Decode once, cut, re-encode every crop as JPEG (default).
    #[default]
    Decode,
    /// JPEG sources only: cut in the DCT domain, no decode, no re-encode, no generation loss;
    /// boxes snap outward to the iMCU grid. Other sources fall back to `decode`.
    Lossless,
}

impl std::str::FromStr for CropMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "decode" => Ok(CropMode::Decode),
            "lossless" => Ok(CropMode::Lossless),
            other => Err(format!("unknown crop mode {other:?} (decode, lossless)")),
        }
    }
}

impl std::fmt::Display for CropMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CropMode::Decode => "decode",
            CropMode::Lossless => "lossless",
        })
    }
}

/// Which pixels decode mode cuts crops from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelPath {
    /// YCbCr planes, crops encoded 4:2:0 without colour conversion (default); sources it does
    /// not take (EXIF-rotated, CMYK, PNG, WebP) use `rgb`.
    #[default]
    Planar,
    /// Packed RGB: decode with colour conversion, encode each crop from RGB.
    Rgb,
}

impl std::str::FromStr for PixelPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "planar" => Ok(PixelPath::Planar),
            "rgb" => Ok(PixelPath::Rgb),
            other => Err(format!("unknown pixel path {other:?} (planar, rgb)")),
        }
    }
}

impl std::fmt::Display for PixelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PixelPath::Planar => "planar",
            PixelPath::Rgb => "rgb",
        })
    }
}

/// Encoded crops handed to the sink: `(index in the box list, JPEG bytes)`, a few at a time.
pub type CropBatch = Vec<(usize, Vec<u8>)>;

/// What one job is asked to do, besides its source and boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSpec {
    /// How to cut (lossless falls back to decode for sources it cannot handle).
    pub mode: CropMode,
    /// Decode mode's pixels (planar falls back to rgb for sources it cannot handle).
    pub pixel_path: PixelPath,
    /// JPEG quality of re-encoded crops (the decode path), 1–100.
    pub quality: u8,
    /// Largest source accepted, in pixels, checked from the header before anything is decoded.
    pub max_pixels: u64,
    /// Most boxes accepted.
    pub max_crops: usize,
}

impl Default for JobSpec {
    /// Decode mode on the planar path, quality [`super::DEFAULT_QUALITY`], [`super::DEFAULT_MAX_PIXELS`],
    /// [`crops::DEFAULT_MAX_CROPS`].
    fn default() -> Self {
        JobSpec {
            mode: CropMode::Decode,
            pixel_path: PixelPath::Planar,
            quality: super::DEFAULT_QUALITY,
            max_pixels: super::DEFAULT_MAX_PIXELS,
            max_crops: crops::DEFAULT_MAX_CROPS,
        }
    }
}

/// How long each part of a job took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobTimings {
    /// Header checks, box validation and decoding (zero on the lossless path, which decodes nothing).
    pub decode: Duration,
    /// Cutting and encoding every crop (on the lossless path: the whole job).
    pub crop_encode: Duration,
}

/// What a finished job did.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    /// The mode that ran: [`CropMode::Decode`] when lossless was asked for but declined.
    pub mode: CropMode,
    /// Why the lossless path declined the source, when it did.
    pub fallback: Option<String>,
    /// The pixel path that ran (decode mode; `None` on the lossless path).
    pub pixel_path: Option<PixelPath>,
    /// Why the planar path declined the source, when it was asked for and did.
    pub pixel_fallback: Option<String>,
    /// The boxes actually written, when they differ from the requested ones (lossless: snapped).
    pub written: Option<Vec<CropBox>>,
    /// Width of the image as displayed (after EXIF orientation).
    pub width: u32,
    /// Height of the image as displayed.
    pub height: u32,
    pub timings: JobTimings,
}

/// Crops per batch handed to the sink on the lossless path, where every crop of a task comes
/// out of one call at once (the decode path batches by pool thread, see [`super::encode_all`]).
const LOSSLESS_BATCH: usize = 8;

/// Run the CPU job of one task: check the header (pixel limit) and the boxes against the image
/// as displayed, then cut and encode every box, handing each batch of finished crops to `sink`
/// as soon as it is ready (from whichever pool thread made it). Boxes are validated here, so
/// callers need not. The source is dropped as soon as it is decoded, so a task holds its
/// compressed and decoded image at once only briefly.
///
/// Runs on the current rayon pool (the worker's CPU pool when it schedules the job there, the
/// global pool otherwise). Panics are not caught: the caller decides what a panic means.
pub fn run_job<S, F>(source: S, boxes: &[CropBox], spec: &JobSpec, sink: F) -> Result<JobReport, EngineError>
where
    S: AsRef<[u8]>,
    F: Fn(CropBatch) + Sync,
{
    let started = Instant::now();
    let info = probe(source.as_ref(), spec.max_pixels)?;
    let (width, height) = info.display_size();
    crops::validate(boxes, width, height, spec.max_crops)?;
    let fallback = match spec.mode {
        CropMode::Lossless => match lossless::can_transform(source.as_ref()) {
            Ok(()) => return lossless_path(source.as_ref(), boxes, (width, height), started, &sink),
            Err(reason) => Some(reason),
        },
        CropMode::Decode => None,
    };
    decode_path(source, boxes, spec, fallback, started, &sink)
}

/// Every crop in the DCT domain, from one pass over the source.
fn lossless_path<F>(
    source: &[u8],
    boxes: &[CropBox],
    (width, height): (u32, u32),
    started: Instant,
    sink: &F,
) -> Result<JobReport, EngineError>
where
    F: Fn(CropBatch) + Sync,
{
    let crops = lossless::crop_all(source, boxes)?;
    let crop_encode = started.elapsed();
    let written = crops.iter().map(|c| c.snapped).collect();
    let mut items = crops.into_iter().map(|c| c.jpeg).enumerate().peekable();
    while items.peek().is_some() {
        sink(items.by_ref().take(LOSSLESS_BATCH).collect());
    }
    Ok(JobReport {
        mode: CropMode::Lossless,
        fallback: None,
        pixel_path: None,
        pixel_fallback: None,
        written: Some(written),
        width,
        height,
        timings: JobTimings { decode: Duration::ZERO, crop_encode },
    })
}

/// Decode once, then cut and encode every box in parallel, from planes or from RGB.
fn decode_path<S, F>(
    source: S,
    boxes: &[CropBox],
    spec: &JobSpec,
    fallback: Option<String>,
    started: Instant,
    sink: &F,
) -> Result<JobReport, EngineError>
where
    S: AsRef<[u8]>,
    F: Fn(CropBatch) + Sync,
{
    let mut pixel_fallback = None;
    if spec.pixel_path == PixelPath::Planar {
        let info = probe(source.as_ref(), spec.max_pixels)?;
        match planar::eligible(source.as_ref(), &info) {
            Ok(()) => {
                let planes = planar::decode(source.as_ref(), &info)?;
                drop(source);
                let decode_time = started.elapsed();
                let t = Instant::now();
                planar::encode_all(&planes, boxes, spec.quality, sink)?;
                return Ok(JobReport {
                    mode: CropMode::Decode,
                    fallback,
                    pixel_path: Some(PixelPath::Planar),
                    pixel_fallback: None,
                    written: None,
                    width: planes.width,
                    height: planes.height,
                    timings: JobTimings { decode: decode_time, crop_encode: t.elapsed() },
                });
            }
            Err(reason) => pixel_fallback = Some(reason),
        }
    }
    let decoded = decode(source.as_ref(), spec.max_pixels)?;
    drop(source);
    let decode_time = started.elapsed();
    let t = Instant::now();
    encode_all(&decoded, boxes, spec.quality, sink)?;
    Ok(JobReport {
        mode: CropMode::Decode,
        fallback,
        pixel_path: Some(PixelPath::Rgb),
        pixel_fallback,
        written: None,
        width: decoded.width,
        height: decoded.height,
        timings: JobTimings { decode: decode_time, crop_encode: t.elapsed() },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{exif, sample};

    fn collect(source: &[u8], boxes: &[CropBox], spec: &JobSpec) -> (Result<JobReport, EngineError>, CropBatch) {
        let got = Mutex::new(Vec::new());
        let r = run_job(source, boxes, spec, |batch| got.lock().unwrap().extend(batch));
        let mut crops = got.into_inner().unwrap();
        crops.sort_by_key(|(i, _)| *i);
        (r, crops)
    }

    fn size(jpeg: &[u8]) -> (i64, i64) {
        let info = probe(jpeg, u64::MAX).unwrap();
        (info.width as i64, info.height as i64)
    }

    #[test]
    fn decode_and_lossless_jobs_hand_every_crop_to_the_sink() {
        let jpeg = sample::encode_jpeg(&sample::photo(320, 240, 3), 320, 240, 90, false);
        let boxes: Vec<CropBox> = (0..20).map(|i| CropBox { x: i * 7, y: i * 5, w: 40 + i, h: 30 }).collect();
        let (r, crops) = collect(&jpeg, &boxes, &JobSpec::default());
        let r = r.unwrap();
        assert_eq!(
            (r.mode, r.fallback.as_deref(), r.written.as_ref(), r.width, r.height),
            (CropMode::Decode, None, None, 320, 240)
        );
        assert_eq!(crops.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
        for ((_, c), b) in crops.iter().zip(&boxes) {
            assert_eq!(size(c), (b.w, b.h));
        }

        let spec = JobSpec { mode: CropMode::Lossless, ..JobSpec::default() };
        let (r, crops) = collect(&jpeg, &boxes, &spec);
        let r = r.unwrap();
        assert_eq!((r.mode, r.fallback.as_deref(), r.timings.decode), (CropMode::Lossless, None, Duration::ZERO));
        let written = r.written.unwrap();
        assert_eq!((crops.len(), written.len()), (20, 20));
        for ((_, c), w) in crops.iter().zip(&written) {
            assert_eq!(size(c), (w.w, w.h));
        }
    }

    #[test]
    fn lossless_falls_back_to_decode_with_the_reason() {
        let png = sample::encode_png(&sample::photo(64, 48, 1), 64, 48);
        let spec = JobSpec { mode: CropMode::Lossless, ..JobSpec::default() };
        let (r, crops) = collect(&png, &[CropBox { x: 1, y: 2, w: 10, h: 10 }], &spec);
        let r = r.unwrap();
        assert_eq!(r.mode, CropMode::Decode);
        assert!(r.fallback.as_deref().is_some_and(|f| f.contains("PNG")), "{:?}", r.fallback);
        assert_eq!(crops.len(), 1);
    }

    #[test]
    fn the_report_names_the_pixel_path_that_ran_and_why_rgb_did() {
        let rgb = sample::photo(64, 48, 3);
        let jpeg = sample::encode_jpeg(&rgb, 64, 48, 90, false);
        let boxes = [CropBox { x: 3, y: 5, w: 20, h: 11 }, CropBox { x: 10, y: 10, w: 16, h: 16 }];
        let path = |bytes: &[u8], spec: &JobSpec| {
            let (r, crops) = collect(bytes, &boxes, spec);
            let r = r.unwrap();
            assert_eq!(crops.len(), boxes.len());
            (r.pixel_path, r.pixel_fallback)
        };
        // The default takes the planar path for a YCbCr JPEG; rgb forced is no fallback.
        assert_eq!(path(&jpeg, &JobSpec::default()), (Some(PixelPath::Planar), None));
        let rgb_spec = JobSpec { pixel_path: PixelPath::Rgb, ..JobSpec::default() };
        assert_eq!(path(&jpeg, &rgb_spec), (Some(PixelPath::Rgb), None));
        // A PNG cannot go planar: the RGB path runs and the report says why.
        let (p, why) = path(&sample::encode_png(&rgb, 64, 48), &JobSpec::default());
        assert_eq!(p, Some(PixelPath::Rgb));
        assert!(why.as_deref().is_some_and(|w| w.contains("Png")), "{why:?}");
        // So does an EXIF-rotated JPEG (rotation is applied in RGB).
        let rotated = exif::with_orientation(&jpeg, 6);
        let (p, why) = path(&rotated, &JobSpec::default());
        assert_eq!(p, Some(PixelPath::Rgb));
        assert!(why.as_deref().is_some_and(|w| w.contains("orientation 6")), "{why:?}");
    }

    #[test]
    fn boxes_are_checked_against_the_displayed_image_before_any_crop() {
        let jpeg = sample::encode_jpeg(&sample::photo(64, 32, 2), 64, 32, 90, false);
        let rotated = exif::with_orientation(&jpeg, 6); // displayed 32x64
        let tall = [CropBox { x: 0, y: 40, w: 32, h: 24 }];
        for mode in [CropMode::Decode, CropMode::Lossless] {
            let spec = JobSpec { mode, ..JobSpec::default() };
            let (r, crops) = collect(&jpeg, &tall, &spec);
            assert!(matches!(r, Err(EngineError::BadBox { index: 0, .. })), "{r:?}");
            assert!(crops.is_empty());
            assert_eq!(collect(&rotated, &tall, &spec).0.unwrap().height, 64);
        }
        let (r, _) = collect(&jpeg, &[], &JobSpec::default());
        assert_eq!(r.unwrap_err().kind(), "invalid_crops");
        let small = JobSpec { max_pixels: 100, ..JobSpec::default() };
        assert_eq!(collect(&jpeg, &tall, &small).0.unwrap_err().kind(), "too_many_pixels");
    }
}
