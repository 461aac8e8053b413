//! The CPU engine: probe, decode once, orient, cut crops as views, encode them. No I/O, and no
//! knowledge of queues, storage or the worker: its errors are its own ([`EngineError`]), and the
//! whole CPU job of a task is one synchronous call ([`run_job`]).
//!
//! JPEG goes through libjpeg-turbo (SIMD); PNG and WebP through the `image` crate. Decoded
//! pixels are packed RGB8. Per-thread libjpeg-turbo handles and output buffers are reused, and
//! decode buffers come from a small process-wide pool, because a fresh 36 MB buffer per 12 MP
//! decode costs ~17 ms of page faults — a third of the whole task.

use std::cell::RefCell;
use std::sync::Mutex;

use turbojpeg::{Colorspace, Compressor, Decompressor, Image, PixelFormat, Subsamp};

use crate::crops::CropBox;
use crate::exif;

mod error;
mod job;
pub mod planar;

pub use error::EngineError;
pub use job::{run_job, CropBatch, CropMode, JobReport, JobSpec, JobTimings, PixelPath};

/// Default limit on source pixels (width × height), checked from the header before decoding.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;
/// Default JPEG quality of encoded crops.
pub const DEFAULT_QUALITY: u8 = 85;

/// Source formats the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
}

/// What the header says, before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    /// Stored size (before orientation).
    pub width: u32,
    pub height: u32,
    /// EXIF orientation, 1 when absent.
    pub orientation: u8,
}

impl ImageInfo {
    /// Size as displayed, after EXIF orientation.
    pub fn display_size(&self) -> (u32, u32) {
        exif::oriented_size(self.orientation, self.width, self.height)
    }
}

/// Sniff the format from magic bytes.
pub fn sniff(bytes: &[u8]) -> Result<Format, EngineError> {
    if bytes.is_empty() {
        return Err(EngineError::Decode("the source is empty (0 bytes)".into()));
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(Format::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Ok(Format::WebP)
    } else {
        let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(EngineError::Decode(format!("not a JPEG, PNG or WebP image (starts with {head})")))
    }
}

/// Read format, size and orientation from the header only, and enforce the pixel limit —
/// a 30000×30000 PNG header is rejected here without allocating its pixels.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, EngineError> {
    let format = sniff(bytes)?;
    let (width, height, orientation) = match format {
        Format::Jpeg => {
            let header = with_decompressor(|d| d.read_header(bytes))
                .map_err(|e| EngineError::Decode(format!("bad JPEG header: {e}")))?;
            (header.width as u32, header.height as u32, exif::jpeg_orientation(bytes).unwrap_or(1))
        }
        Format::Png if png_header(bytes).is_some_and(|(w, h)| w as u64 * h as u64 > max_pixels) => {
            // Reject bombs from the IHDR alone, before any decoder reads further.
            let (w, h) = png_header(bytes).expect("checked above");
            return Err(EngineError::TooManyPixels {
                width: w as u64,
                height: h as u64,
                pixels: w as u64 * h as u64,
                limit: max_pixels,
            });
        }
        Format::Png | Format::WebP => {
            use image::ImageDecoder;
            let mut dec = image_decoder(bytes, format)?;
            let (w, h) = dec.dimensions();
            let o = dec.orientation().map(orientation_to_exif).unwrap_or(1);
            (w, h, o)
        }
    };
    if width == 0 || height == 0 {
        return Err(EngineError::Decode(format!("image has zero size {width}x{height}")));
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(EngineError::TooManyPixels {
            width: width as u64,
            height: height as u64,
            pixels,
            limit: max_pixels,
        });
    }
    Ok(ImageInfo { format, width, height, orientation })
}

/// Width and height from a PNG's IHDR chunk (always the first chunk).
fn png_header(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    Some((be(16), be(20)))
}

fn image_decoder(bytes: &[u8], format: Format) -> Result<Box<dyn image::ImageDecoder + '_>, EngineError> {
    let cursor = std::io::Cursor::new(bytes);
    let err = |e: image::ImageError| EngineError::Decode(e.to_string());
    Ok(match format {
        Format::Png => Box::new(image::codecs::png::PngDecoder::new(cursor).map_err(err)?),
        Format::WebP => Box::new(image::codecs::webp::WebPDecoder::new(cursor).map_err(err)?),
        Format::Jpeg => unreachable!("JPEG goes through libjpeg-turbo"),
    })
}

fn orientation_to_exif(o: image::metadata::Orientation) -> u8 {
    use image::metadata::Orientation::*;
    match o {
        NoTransforms => 1,
        FlipHorizontal => 2,
        Rotate180 => 3,
        FlipVertical => 4,
        Rotate90FlipH => 5,
        Rotate90 => 6,
        Rotate270FlipH => 7,
        Rotate270 => 8,
    }
}

// ---------------------------------------------------------------------------------------------
// Buffer pool

/// How many decode buffers the pool keeps; more are allocated when needed and dropped on return.
const POOL_KEEP: usize = 8;
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A pixel buffer borrowed from the process-wide pool; it goes back on drop.
/// Its `Vec` keeps the largest length it ever had, so reuse never re-zeroes memory.
pub struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
}

impl PooledBuf {
    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn take(len: usize) -> PooledBuf {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Prefer the smallest buffer that fits, so big buffers stay for big images.
        let pick = pool.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
        let mut buf = match pick {
            Some(i) => pool.swap_remove(i),
            None => pool.pop().unwrap_or_default(),
        };
        drop(pool);
        if buf.len() < len {
            // vec![0; n] comes from calloc: fresh zero pages, no memset.
            buf = vec![0u8; len];
        }
        PooledBuf { buf, len }
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}
impl Drop for PooledBuf {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_KEEP {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-thread codec handles

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
    static COMPRESSOR: RefCell<Option<(Compressor, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's decompressor. A handle that reported an error is dropped, not
/// reused: TurboJPEG leaves a failed header read half-done (libjpeg's state and its unread
/// marker survive), so every later header on that handle failed the same way — one corrupt
/// JPEG made its pool thread reject all good JPEGs after it (found by `tests/fuzz.rs`).
fn with_decompressor<T>(f: impl FnOnce(&mut Decompressor) -> turbojpeg::Result<T>) -> turbojpeg::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decompressor::new()?);
        }
        let res = f(slot.as_mut().expect("initialised above"));
        if res.is_err() {
            *slot = None;
        }
        res
    })
}

// ---------------------------------------------------------------------------------------------
// Decode

/// A decoded, upright RGB8 image.
pub struct Decoded {
    pixels: PooledBuf,
    pub width: u32,
    pub height: u32,
    pub info: ImageInfo,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("info", &self.info)
            .finish()
    }
}

impl Decoded {
    /// Packed RGB rows, `width * 3` bytes each.
    pub fn rgb(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixels of one box as a strided view into the decoded buffer (no copy).
    /// The box must have been checked with [`CropBox::check`].
    pub fn view(&self, b: &CropBox) -> Image<&[u8]> {
        let stride = self.width as usize * 3;
        let (x, y, w, h) = (b.x as usize, b.y as usize, b.w as usize, b.h as usize);
        let start = y * stride + x * 3;
        let end = start + (h - 1) * stride + w * 3;
        Image { pixels: &self.pixels[start..end], width: w, pitch: stride, height: h, format: PixelFormat::RGB }
    }
}

/// Decode a source image once: header check (pixel limit), decode, EXIF orientation.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Decoded, EngineError> {
    let info = probe(bytes, max_pixels)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let mut pixels = match info.format {
        Format::Jpeg => decode_jpeg(bytes, w, h)?,
        Format::Png | Format::WebP => {
            let mut dec = image_decoder(bytes, info.format)?;
            let mut limits = image::Limits::default();
            limits.max_alloc = Some(max_pixels.saturating_mul(8));
            dec.set_limits(limits).map_err(|e| EngineError::Decode(e.to_string()))?;
            let img = image::DynamicImage::from_decoder(dec).map_err(|e| EngineError::Decode(e.to_string()))?;
            let rgb = img.into_rgb8();
            let mut buf = PooledBuf::take(rgb.len());
            buf.copy_from_slice(rgb.as_raw());
            buf
        }
    };
    let (mut width, mut height) = (info.width, info.height);
    if info.orientation != 1 {
        let mut out = Vec::new();
        (width, height) = exif::apply_orientation(info.orientation, &pixels, width, height, 3, &mut out);
        pixels.copy_from_slice(&out);
    }
    Ok(Decoded { pixels, width, height, info })
}

fn decode_jpeg(bytes: &[u8], w: usize, h: usize) -> Result<PooledBuf, EngineError> {
    let header = with_decompressor(|d| d.read_header(bytes))
        .map_err(|e| EngineError::Decode(format!("bad JPEG header: {e}")))?;
    let err = |e: turbojpeg::Error| EngineError::Decode(format!("corrupt or truncated JPEG: {e}"));
    let mut rgb = PooledBuf::take(w * h * 3);
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
        // libjpeg-turbo cannot convert CMYK to RGB itself; decode CMYK and convert here.
        let mut cmyk = PooledBuf::take(w * h * 4);
        with_decompressor(|d| {
            d.decompress(
                bytes,
                Image { pixels: &mut cmyk[..], width: w, pitch: w * 4, height: h, format: PixelFormat::CMYK },
            )
        })
        .map_err(err)?;
        // Adobe writes inverted CMYK (the common case); an APP14 "Adobe" marker says so.
        let inverted = bytes.windows(9).take(64 * 1024).any(|win| win[..2] == [0xFF, 0xEE] && &win[4..] == b"Adobe");
        for (px, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
            let (c, m, y, k) = if inverted {
                (px[0] as u32, px[1] as u32, px[2] as u32, px[3] as u32)
            } else {
                (255 - px[0] as u32, 255 - px[1] as u32, 255 - px[2] as u32, 255 - px[3] as u32)
            };
            out[0] = (c * k / 255) as u8;
            out[1] = (m * k / 255) as u8;
            out[2] = (y * k / 255) as u8;
        }
    } else {
        with_decompressor(|d| {
            d.decompress(
                bytes,
                Image { pixels: &mut rgb[..], width: w, pitch: w * 3, height: h, format: PixelFormat::RGB },
            )
        })
        .map_err(err)?;
    }
    Ok(rgb)
}

// ---------------------------------------------------------------------------------------------
// Encode

/// Encode one crop of `img` as a baseline JPEG (4:2:0) at `quality`.
pub fn encode_crop(img: &Decoded, index: usize, b: &CropBox, quality: u8) -> Result<Vec<u8>, EngineError> {
    encode_rgb(img.view(b), quality).map_err(|e| EngineError::Encode { index, reason: e.to_string() })
}

/// Encode packed (possibly strided) RGB pixels as JPEG 4:2:0, reusing this thread's compressor
/// and output buffer.
pub fn encode_rgb(image: Image<&[u8]>, quality: u8) -> turbojpeg::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut c = Compressor::new()?;
            c.set_subsamp(Subsamp::Sub2x2)?;
            *slot = Some((c, Vec::new()));
        }
        let (c, out) = slot.as_mut().expect("initialised above");
        let res = compress(c, out, image, quality);
        if res.is_err() {
            *slot = None; // as for the decompressor: never reuse a handle after an error
        }
        res
    })
}

fn compress(c: &mut Compressor, out: &mut Vec<u8>, image: Image<&[u8]>, quality: u8) -> turbojpeg::Result<Vec<u8>> {
    c.set_quality(quality as i32)?;
    let need = c.buf_len(image.width, image.height)?;
    if out.len() < need {
        out.resize(need, 0);
    }
    let n = c.compress_to_slice(image, out)?;
    Ok(out[..n].to_vec())
}

/// Cut and encode every box on the current rayon pool, handing finished crops to `sink` in
/// small batches as soon as each batch is ready (from whichever pool thread encoded it).
/// Boxes must be checked first.
pub fn encode_all<F>(img: &Decoded, boxes: &[CropBox], quality: u8, sink: F) -> Result<(), EngineError>
where
    F: Fn(Vec<(usize, Vec<u8>)>) + Sync,
{
    for_each_batch(boxes, sink, |i, b| encode_crop(img, i, b, quality))
}

/// `encode` every box on the current rayon pool, in batches of about four per pool thread:
/// that keeps crops flowing to `sink` early while cutting the cross-thread wake-ups per task
/// from one per crop to a handful.
fn for_each_batch<F, E>(boxes: &[CropBox], sink: F, encode: E) -> Result<(), EngineError>
where
    F: Fn(Vec<(usize, Vec<u8>)>) + Sync,
    E: Fn(usize, &CropBox) -> Result<Vec<u8>, EngineError> + Sync,
{
    use rayon::prelude::*;
    let batches = (rayon::current_num_threads() * 4).max(1);
    let chunk = boxes.len().div_ceil(batches).max(1);
    boxes.par_chunks(chunk).enumerate().try_for_each(|(c, part)| {
        let mut out = Vec::with_capacity(part.len());
        for (k, b) in part.iter().enumerate() {
            let i = c * chunk + k;
            out.push((i, encode(i, b)?));
        }
        sink(out);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    fn jpeg(w: usize, h: usize) -> (Vec<u8>, Vec<u8>) {
        let rgb = sample::photo(w as u32, h as u32, 7);
        let img = Image { pixels: &rgb[..], width: w, pitch: w * 3, height: h, format: PixelFormat::RGB };
        (encode_rgb(img, 95).unwrap(), rgb)
    }

    #[test]
    fn decode_probe_and_limits() {
        let (j, _) = jpeg(320, 200);
        let d = decode(&j, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((d.width, d.height), (320, 200));
        let e = decode(&j, 1000).unwrap_err();
        assert!(matches!(e, EngineError::TooManyPixels { pixels: 64000, .. }), "{e}");
        assert!(decode(b"", 10).unwrap_err().to_string().contains("empty"));
        assert!(decode(b"GIF89a....", 10).unwrap_err().to_string().contains("not a JPEG, PNG or WebP"));
        let truncated = &j[..j.len() / 2];
        assert!(decode(truncated, DEFAULT_MAX_PIXELS).unwrap_err().to_string().contains("JPEG"));
    }

    #[test]
    fn a_bad_header_does_not_poison_the_thread_decompressor() {
        let (j, _) = jpeg(64, 48);
        let mut bad = j.clone();
        bad[3] ^= 0x80; // APP0 marker 0xE0 -> 0x60: "Unsupported marker type"
        assert!(probe(&bad, DEFAULT_MAX_PIXELS).is_err());
        assert!(decode(&bad, DEFAULT_MAX_PIXELS).is_err());
        probe(&j, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(decode(&j, DEFAULT_MAX_PIXELS).unwrap().width, 64);
    }

    #[test]
    fn crops_are_views_with_the_right_size() {
        let (j, _) = jpeg(320, 200);
        let d = decode(&j, DEFAULT_MAX_PIXELS).unwrap();
        let b = CropBox { x: 250, y: 150, w: 70, h: 50 };
        let out = encode_crop(&d, 0, &b, 85).unwrap();
        let back = turbojpeg::decompress(&out, PixelFormat::RGB).unwrap();
        assert_eq!((back.width, back.height), (70, 50));
    }

    #[test]
    fn exif_orientation_is_applied_before_cropping() {
        let (j, _) = jpeg(64, 32);
        let upright = decode(&j, DEFAULT_MAX_PIXELS).unwrap();
        let rotated = decode(&exif::with_orientation(&j, 6), DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((rotated.width, rotated.height), (32, 64));
        // Rotated 90° clockwise: display pixel (x, y) is stored pixel (y, h-1-x).
        let (x, y) = (5usize, 9usize);
        let r = &rotated.rgb()[(y * 32 + x) * 3..][..3];
        let u = &upright.rgb()[((32 - 1 - x) * 64 + y) * 3..][..3];
        assert_eq!(r, u);
    }

    #[test]
    fn png_and_grayscale_and_cmyk_sources() {
        let rgb = sample::photo(40, 30, 1);
        let png = sample::encode_png(&rgb, 40, 30);
        let d = decode(&png, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(d.rgb(), &rgb[..]);

        let gray: Vec<u8> = rgb.chunks(3).map(|p| p[1]).collect();
        let mut c = Compressor::new().unwrap();
        c.set_subsamp(Subsamp::Gray).unwrap();
        let gj = c
            .compress_to_vec(Image { pixels: &gray[..], width: 40, pitch: 40, height: 30, format: PixelFormat::GRAY })
            .unwrap();
        let d = decode(&gj, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((d.width, d.height), (40, 30));

        let cmyk: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        let mut c = Compressor::new().unwrap();
        c.set_quality(95).unwrap();
        let cj = c
            .compress_to_vec(Image { pixels: &cmyk[..], width: 40, pitch: 160, height: 30, format: PixelFormat::CMYK })
            .unwrap();
        let d = decode(&cj, DEFAULT_MAX_PIXELS).unwrap();
        let diff: u64 = d.rgb().iter().zip(&rgb).map(|(a, b)| (*a as i64 - *b as i64).unsigned_abs()).sum();
        assert!(diff / (rgb.len() as u64) < 12, "mean abs diff {}", diff / rgb.len() as u64);
    }

    #[test]
    fn decompression_bomb_rejected_from_header() {
        // A PNG header claiming 30000x30000 with no pixel data behind it.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&30000u32.to_be_bytes());
        ihdr.extend_from_slice(&30000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        let e = decode(&png, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(e, EngineError::TooManyPixels { width: 30000, height: 30000, .. }), "{e}");
    }

    pub(crate) fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
