//! The machine's own limit: what one task's codec work costs on one core of this machine,
//! measured straight through libjpeg-turbo — decode into a reused buffer, then every crop
//! encoded from a strided view into a reused output buffer, nothing else (the engine bench's
//! `floor/*` group) — so a sweep's tasks/s reads as a fraction of what the machine can do at
//! all: limit = cores ÷ floor. The lossless mode's floor is its bit copy alone
//! ([`crate::lossless::crop_all`]).
//!
//! A floor is the median of a few repetitions on the calling thread after one warm-up; callers
//! run it off the async runtime. It is counted in the thread's CPU time, not wall time: on a
//! shared machine other processes stretch the wall clock of a single-thread loop by whatever
//! they take (80 vs 54 ms per task on the 2-core machine at load 8), while its CPU time is the
//! work itself at the cores' current speed — what the machine could do if nothing else ran. The
//! wall-clock median is recorded beside it. Machines still drift (clock speed, thermal limits,
//! the host under a VM), so the sweep measures the floor before and after its grid and flags a
//! difference over [`DRIFT_FLAG_PCT`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use turbojpeg::{Compressor, Decompressor, Image, PixelFormat, Subsamp};

use crate::crops::CropBox;
use crate::engine::EngineError;
use crate::engine::{self, Format};
use crate::lossless;
use crate::task::{CropMode, PixelPath};

/// Two floors (before and after a grid) further apart than this, in percent of the smaller,
/// flag the run: the machine's speed changed while it ran.
pub const DRIFT_FLAG_PCT: f64 = 10.0;

/// Raw libjpeg-turbo with reused handles and buffers: the cost floor of a task's codec work.
pub struct RawCodec {
    dec: Decompressor,
    comp: Compressor,
    pixels: Vec<u8>,
    out: Vec<u8>,
    width: usize,
    height: usize,
}

impl RawCodec {
    /// Handles for decoding to RGB and encoding 4:2:0 at `quality`.
    pub fn new(quality: u8) -> turbojpeg::Result<RawCodec> {
        let mut comp = Compressor::new()?;
        comp.set_quality(quality as i32)?;
        comp.set_subsamp(Subsamp::Sub2x2)?;
        Ok(RawCodec { dec: Decompressor::new()?, comp, pixels: Vec::new(), out: Vec::new(), width: 0, height: 0 })
    }

    /// Decode `jpeg` into the reused RGB buffer (stored orientation; grown, never shrunk).
    pub fn decode(&mut self, jpeg: &[u8]) -> turbojpeg::Result<()> {
        let h = self.dec.read_header(jpeg)?;
        (self.width, self.height) = (h.width, h.height);
        if self.pixels.len() < h.width * h.height * 3 {
            self.pixels.resize(h.width * h.height * 3, 0);
        }
        let (w, ht) = (self.width, self.height);
        let image = Image {
            pixels: &mut self.pixels[..w * ht * 3],
            width: w,
            pitch: w * 3,
            height: ht,
            format: PixelFormat::RGB,
        };
        self.dec.decompress(jpeg, image)
    }

    /// Encode every box of the last decoded image; returns the bytes written. Boxes are clamped
    /// to the stored image (an EXIF-rotated source's boxes refer to its displayed size).
    pub fn encode_crops(&mut self, boxes: &[CropBox]) -> turbojpeg::Result<usize> {
        let (w, h) = (self.width, self.height);
        let mut total = 0;
        for b in boxes {
            let x = (b.x.max(0) as usize).min(w.saturating_sub(1));
            let y = (b.y.max(0) as usize).min(h.saturating_sub(1));
            let (bw, bh) = ((b.w.max(1) as usize).min(w - x), (b.h.max(1) as usize).min(h - y));
            let need = self.comp.buf_len(bw, bh)?;
            if self.out.len() < need {
                self.out.resize(need, 0);
            }
            let start = (y * w + x) * 3;
            let end = start + (bh - 1) * w * 3 + bw * 3;
            let view = Image {
                pixels: &self.pixels[start..end],
                width: bw,
                pitch: w * 3,
                height: bh,
                format: PixelFormat::RGB,
            };
            total += self.comp.compress_to_slice(view, &mut self.out)?;
        }
        Ok(total)
    }
}

/// A floor: single-thread milliseconds per task, over `reps` repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FloorSample {
    /// Median CPU time of the thread per repetition: the floor.
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Median wall-clock time per repetition (longer than the CPU time when other processes
    /// share the cores).
    pub median_wall_ms: f64,
    pub reps: u32,
}

/// CPU time of the calling thread, milliseconds.
fn thread_cpu_ms() -> f64 {
    // SAFETY: clock_gettime writes into the zeroed timespec we pass.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1000.0 + t.tv_nsec as f64 / 1e6
}

/// What a floor measured, for records: `libjpeg-turbo decode + 50 encodes` etc.
pub fn method(format_is_jpeg: bool, mode: CropMode, crops: usize, lossless_ok: bool, planar_ok: bool) -> String {
    match (mode, lossless_ok, format_is_jpeg) {
        (CropMode::Lossless, true, _) => format!("lossless bit copy of {crops} crops, 1 thread"),
        (CropMode::Decode, _, true) if planar_ok => {
            format!("libjpeg-turbo decode to YCbCr planes + {crops} encodes from planes, 1 thread")
        }
        (_, _, true) => format!("libjpeg-turbo decode + {crops} encodes, 1 thread"),
        (_, _, false) => format!("engine decode (image crate) + {crops} libjpeg-turbo encodes, 1 thread"),
    }
}

/// Measure the floor of one task of `mode` on `source` with `boxes` at `quality`: one warm-up,
/// then repetitions until `budget` has passed (at least 3, at most 50); the median of the
/// thread's CPU time per repetition counts. Returns the sample and a description of what was
/// measured.
pub fn measure(
    source: &[u8],
    boxes: &[CropBox],
    quality: u8,
    mode: CropMode,
    pixel: PixelPath,
    budget: Duration,
) -> Result<(FloorSample, String), EngineError> {
    let info = engine::probe(source, u64::MAX)?;
    let jpeg = info.format == Format::Jpeg;
    let lossless_ok = mode == CropMode::Lossless && lossless::can_transform(source).is_ok();
    let planar_ok =
        mode == CropMode::Decode && pixel == PixelPath::Planar && engine::planar::eligible(source, &info).is_ok();
    let what = method(jpeg, mode, boxes.len(), lossless_ok, planar_ok);
    let codec_err = |e: turbojpeg::Error| EngineError::Decode(format!("floor measurement: {e}"));
    let mut raw = RawCodec::new(quality).map_err(codec_err)?;
    let clamped: Vec<CropBox> = boxes.iter().map(|b| clamp(b, info.width, info.height)).collect();
    let mut once = || -> Result<(), EngineError> {
        if lossless_ok {
            std::hint::black_box(lossless::crop_all(source, boxes)?);
        } else if planar_ok {
            std::hint::black_box(planar_task(source, &info, &clamped, quality)?);
        } else if jpeg {
            raw.decode(source).map_err(codec_err)?;
            std::hint::black_box(raw.encode_crops(boxes).map_err(codec_err)?);
        } else {
            let d = engine::decode(source, u64::MAX)?;
            for (i, b) in boxes.iter().enumerate() {
                let clamped = clamp(b, d.width, d.height);
                std::hint::black_box(engine::encode_crop(&d, i, &clamped, quality)?);
            }
        }
        Ok(())
    };
    once()?;
    let start = Instant::now();
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    while cpu.len() < 50 && (cpu.len() < 3 || start.elapsed() < budget) {
        let (t, c) = (Instant::now(), thread_cpu_ms());
        once()?;
        cpu.push(thread_cpu_ms() - c);
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    cpu.sort_by(f64::total_cmp);
    wall.sort_by(f64::total_cmp);
    let sample = FloorSample {
        median_ms: cpu[cpu.len() / 2],
        min_ms: cpu[0],
        max_ms: cpu[cpu.len() - 1],
        median_wall_ms: wall[wall.len() / 2],
        reps: cpu.len() as u32,
    };
    Ok((sample, what))
}

/// The planar path's codec work for one task, on this thread: decode `source` to its planes,
/// then [`planar_encodes`]. The planar path's own calls are the raw TurboJPEG ones, so this is
/// its floor (the sweep's, and the benches'). Returns the bytes written.
pub fn planar_task(
    source: &[u8],
    info: &engine::ImageInfo,
    boxes: &[CropBox],
    quality: u8,
) -> Result<usize, EngineError> {
    let p = engine::planar::decode(source, info)?;
    planar_encodes(&p, boxes, quality)
}

/// Encode every box (inside the image) of `p` from plane windows, one after another; bytes written.
pub fn planar_encodes(p: &engine::planar::Planes, boxes: &[CropBox], quality: u8) -> Result<usize, EngineError> {
    let mut bytes = 0;
    for (i, b) in boxes.iter().enumerate() {
        bytes += engine::planar::encode_crop(p, i, b, quality)?.len();
    }
    Ok(bytes)
}

fn clamp(b: &CropBox, width: u32, height: u32) -> CropBox {
    let x = b.x.clamp(0, width as i64 - 1);
    let y = b.y.clamp(0, height as i64 - 1);
    CropBox { x, y, w: b.w.clamp(1, width as i64 - x), h: b.h.clamp(1, height as i64 - y) }
}

/// The machine's limit for one configuration's records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limit {
    /// What the floor measured (see [`method`]); empty when no floor was measured.
    pub method: String,
    /// Floor before the grid (median CPU ms per task, one thread).
    pub floor_before_ms: f64,
    /// Floor after the grid.
    pub floor_after_ms: f64,
    /// The same repetitions' median wall-clock ms, before and after the grid: above the CPU
    /// time by what other processes took from the measuring thread.
    pub floor_before_wall_ms: f64,
    pub floor_after_wall_ms: f64,
    /// Cores ÷ the mean of the two floors: tasks/s this machine could do doing nothing but the
    /// codec work, on every core.
    pub limit_tasks_per_s: f64,
    /// The configuration's tasks/s as a percentage of [`Limit::limit_tasks_per_s`].
    pub pct_of_limit: f64,
    /// |after − before| as a percentage of the smaller floor; over [`DRIFT_FLAG_PCT`] the run is
    /// flagged.
    pub floor_drift_pct: f64,
}

impl Limit {
    /// The limit of `cores` from the floors measured before and after the grid (0 when either
    /// is missing).
    pub fn new(method: String, before: &FloorSample, after: &FloorSample, cores: u32) -> Limit {
        let (b, a) = (before.median_ms, after.median_ms);
        let base = Limit {
            method,
            floor_before_ms: b,
            floor_after_ms: a,
            floor_before_wall_ms: before.median_wall_ms,
            floor_after_wall_ms: after.median_wall_ms,
            ..Default::default()
        };
        if b <= 0.0 || a <= 0.0 {
            return base;
        }
        let floor_s = (b + a) / 2.0 / 1000.0;
        Limit {
            limit_tasks_per_s: cores.max(1) as f64 / floor_s,
            floor_drift_pct: (b - a).abs() / b.min(a) * 100.0,
            ..base
        }
    }

    /// The same limit with `tasks_per_s` placed against it.
    pub fn with_rate(&self, tasks_per_s: f64) -> Limit {
        let pct = if self.limit_tasks_per_s > 0.0 { tasks_per_s / self.limit_tasks_per_s * 100.0 } else { 0.0 };
        Limit { pct_of_limit: pct, ..self.clone() }
    }

    /// Whether a limit was measured.
    pub fn measured(&self) -> bool {
        self.limit_tasks_per_s > 0.0
    }

    /// Whether the floors before and after the grid differ by more than [`DRIFT_FLAG_PCT`].
    pub fn drifted(&self) -> bool {
        self.measured() && self.floor_drift_pct > DRIFT_FLAG_PCT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    #[test]
    fn floors_of_both_modes_on_a_small_image() {
        let rgb = sample::photo(320, 240, 3);
        let jpeg = sample::encode_jpeg(&rgb, 320, 240, 90, false);
        let boxes = sample::boxes(320, 240, 5, 1);
        let budget = Duration::from_millis(1);
        let (d, what) = measure(&jpeg, &boxes, 85, CropMode::Decode, PixelPath::Rgb, budget).unwrap();
        assert!(d.reps >= 3 && d.min_ms > 0.0 && d.min_ms <= d.median_ms && d.median_ms <= d.max_ms, "{d:?}");
        assert!(d.median_wall_ms > 0.0, "{d:?}");
        assert_eq!(what, "libjpeg-turbo decode + 5 encodes, 1 thread");
        let (_, what) = measure(&jpeg, &boxes, 85, CropMode::Lossless, PixelPath::Rgb, budget).unwrap();
        assert_eq!(what, "lossless bit copy of 5 crops, 1 thread");
        let (p, what) = measure(&jpeg, &boxes, 85, CropMode::Decode, PixelPath::Planar, budget).unwrap();
        assert_eq!(what, "libjpeg-turbo decode to YCbCr planes + 5 encodes from planes, 1 thread");
        assert!(p.reps >= 3 && p.median_ms > 0.0, "{p:?}");
        // A source the planar path does not take is measured on the path the worker would run.
        let png = sample::encode_png(&rgb, 320, 240);
        let (_, what) = measure(&png, &boxes, 85, CropMode::Decode, PixelPath::Planar, budget).unwrap();
        assert_eq!(what, "engine decode (image crate) + 5 libjpeg-turbo encodes, 1 thread");
        // A progressive source is no obstacle; garbage is an error, not a number.
        let prog = sample::encode_jpeg(&rgb, 320, 240, 90, true);
        measure(&prog, &boxes, 85, CropMode::Decode, PixelPath::Rgb, budget).unwrap();
        assert!(measure(b"not an image", &boxes, 85, CropMode::Decode, PixelPath::Planar, budget).is_err());
    }

    #[test]
    fn raw_codec_encodes_every_box() {
        let rgb = sample::photo(200, 100, 2);
        let jpeg = sample::encode_jpeg(&rgb, 200, 100, 90, false);
        let mut raw = RawCodec::new(85).unwrap();
        raw.decode(&jpeg).unwrap();
        let one = raw.encode_crops(&[CropBox { x: 0, y: 0, w: 50, h: 50 }]).unwrap();
        // A box past the edge is clamped, not a panic.
        let two =
            raw.encode_crops(&[CropBox { x: 0, y: 0, w: 50, h: 50 }, CropBox { x: 190, y: 90, w: 50, h: 50 }]).unwrap();
        assert!(one > 100 && two > one, "{one} {two}");
    }

    #[test]
    fn limit_from_two_floors() {
        let f = |ms: f64| FloorSample { median_ms: ms, median_wall_ms: ms * 1.5, ..Default::default() };
        let l = Limit::new("m".into(), &f(100.0), &f(100.0), 2);
        assert!((l.limit_tasks_per_s - 20.0).abs() < 1e-9 && !l.drifted());
        assert_eq!((l.floor_before_wall_ms, l.floor_after_wall_ms), (150.0, 150.0));
        assert!((l.with_rate(19.0).pct_of_limit - 95.0).abs() < 1e-9);
        let d = Limit::new("m".into(), &f(100.0), &f(115.0), 2);
        assert!((d.floor_drift_pct - 15.0).abs() < 1e-9 && d.drifted());
        let none = Limit::new(String::new(), &f(0.0), &f(0.0), 2);
        assert!(!none.measured() && !none.drifted() && none.with_rate(5.0).pct_of_limit == 0.0);
    }
}
