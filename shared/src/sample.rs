//! The deterministic sample workload: a photo-like 12-megapixel JPEG and 50 crop boxes.
//!
//! Decode speed depends on how an image compresses: pure noise or flat gradients would
//! mislead a benchmark. The generator layers fractal value noise (a 1/f spectrum, as natural
//! scenes have), hard-edged textured shapes (objects), slow colour fields and fine sensor grain,
//! which lands at about 1–2 bits per pixel at quality 90 — like a photograph.

use std::path::{Path, PathBuf};

use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

use crate::crops::{self, CropBox};
use crate::util::SplitMix64;

/// Sample image width and height (12 MP, 4:3).
pub const SAMPLE_WIDTH: u32 = 4000;
pub const SAMPLE_HEIGHT: u32 = 3000;
/// Crops in the sample list.
pub const SAMPLE_CROPS: usize = 50;

/// A lattice of random values, sampled with smooth interpolation.
struct Lattice {
    cell: f32,
    cols: usize,
    vals: Vec<f32>,
}

impl Lattice {
    fn new(width: u32, height: u32, cell: f32, rng: &mut SplitMix64) -> Lattice {
        let cols = (width as f32 / cell) as usize + 2;
        let rows = (height as f32 / cell) as usize + 2;
        Lattice { cell, cols, vals: (0..cols * rows).map(|_| rng.next_f32() * 2.0 - 1.0).collect() }
    }
    #[inline]
    fn at(&self, x: f32, y: f32) -> f32 {
        let (fx, fy) = (x / self.cell, y / self.cell);
        let (ix, iy) = (fx as usize, fy as usize);
        let (tx, ty) = (fx - ix as f32, fy - iy as f32);
        let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
        let i = iy * self.cols + ix;
        let (a, b, c, d) = (self.vals[i], self.vals[i + 1], self.vals[i + self.cols], self.vals[i + self.cols + 1]);
        let top = a + (b - a) * sx;
        let bot = c + (d - c) * sx;
        top + (bot - top) * sy
    }
}

/// Packed RGB8 pixels of a photo-like scene, fully determined by `seed`.
pub fn photo(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let scale = (width.max(height) as f32 / 4000.0).max(0.05);
    // Luma: octaves from landscape-sized to a few pixels, amplitude falling as 1/f.
    let octaves: Vec<(Lattice, f32)> = [640.0f32, 320.0, 160.0, 80.0, 40.0, 20.0, 10.0, 5.0, 2.5]
        .iter()
        .map(|&c| (Lattice::new(width, height, (c * scale).max(1.5), &mut rng), (c / 640.0).powf(0.55)))
        .collect();
    let chroma: Vec<Lattice> = (0..3).map(|_| Lattice::new(width, height, 500.0 * scale, &mut rng)).collect();
    // Objects: ellipses with their own colour and texture, and hard edges.
    let objects: Vec<(f32, f32, f32, f32, [f32; 3])> = (0..36)
        .map(|_| {
            let cx = rng.next_f32() * width as f32;
            let cy = rng.next_f32() * height as f32;
            let rx = (60.0 + rng.next_f32() * 500.0) * scale;
            let ry = (60.0 + rng.next_f32() * 500.0) * scale;
            (
                cx,
                cy,
                rx,
                ry,
                [rng.next_f32() * 200.0 + 30.0, rng.next_f32() * 200.0 + 30.0, rng.next_f32() * 200.0 + 30.0],
            )
        })
        .collect();
    let mut out = vec![0u8; width as usize * height as usize * 3];
    let mut grain = SplitMix64(seed ^ 0xA5A5);
    for y in 0..height {
        let fy = y as f32;
        for x in 0..width {
            let fx = x as f32;
            let mut l = 0.0;
            for (lat, amp) in &octaves {
                l += lat.at(fx, fy) * amp;
            }
            let mut base = [
                110.0 + 55.0 * chroma[0].at(fx, fy),
                115.0 + 50.0 * chroma[1].at(fx, fy),
                105.0 + 60.0 * chroma[2].at(fx, fy),
            ];
            let mut tex = 40.0;
            for (cx, cy, rx, ry, col) in &objects {
                let (dx, dy) = ((fx - cx) / rx, (fy - cy) / ry);
                if dx * dx + dy * dy < 1.0 {
                    base = *col;
                    tex = 22.0;
                }
            }
            let g = (grain.next_u64() & 7) as f32 - 3.5;
            let i = (y as usize * width as usize + x as usize) * 3;
            for c in 0..3 {
                out[i + c] = (base[c] + l * tex + g).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `count` boxes of 200–600 px inside a `width`×`height` image, fully determined by `seed`.
pub fn boxes(width: u32, height: u32, count: usize, seed: u64) -> Vec<CropBox> {
    let mut rng = SplitMix64(seed);
    (0..count)
        .map(|_| {
            let w = rng.range(200, 600.min(width as i64));
            let h = rng.range(200, 600.min(height as i64));
            CropBox { x: rng.range(0, width as i64 - w), y: rng.range(0, height as i64 - h), w, h }
        })
        .collect()
}

/// Encode RGB pixels as a baseline (or progressive) JPEG, 4:2:0.
pub fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8, progressive: bool) -> Vec<u8> {
    let mut c = Compressor::new().expect("turbojpeg compressor");
    c.set_quality(quality as i32).expect("quality");
    c.set_subsamp(Subsamp::Sub2x2).expect("subsamp");
    c.set_progressive(progressive).expect("progressive");
    let img = Image {
        pixels: rgb,
        width: width as usize,
        pitch: width as usize * 3,
        height: height as usize,
        format: PixelFormat::RGB,
    };
    c.compress_to_vec(img).expect("encode sample")
}

/// Encode RGB pixels as a PNG (for tests of the non-JPEG paths).
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        rgb,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )
    .expect("encode PNG");
    png
}

/// Paths of a generated workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub image: PathBuf,
    pub crops: PathBuf,
}

/// Write the sample workload (`sample.jpg`, `crops.csv`) into `dir`, unless it is already there.
/// Quality 90, 4:2:0, baseline; 4000×3000 and 50 boxes of 200–600 px.
pub fn write_workload(dir: &Path) -> std::io::Result<Workload> {
    write_workload_sized(dir, SAMPLE_WIDTH, SAMPLE_HEIGHT, SAMPLE_CROPS)
}

/// As [`write_workload`], at another size (tests use small images).
pub fn write_workload_sized(dir: &Path, width: u32, height: u32, count: usize) -> std::io::Result<Workload> {
    std::fs::create_dir_all(dir)?;
    let w = Workload {
        image: dir.join(format!("sample-{width}x{height}.jpg")),
        crops: dir.join(format!("crops-{width}x{height}-{count}.csv")),
    };
    write_workload_to(&w, width, height, count)?;
    Ok(w)
}

/// Write the sample image and its crop list to the paths of `w`, each unless it already exists
/// (the image through a temporary file, so a reader never sees half of it).
pub fn write_workload_to(w: &Workload, width: u32, height: u32, count: usize) -> std::io::Result<()> {
    if !w.image.exists() {
        let jpeg = encode_jpeg(&photo(width, height, 2026), width, height, 90, false);
        let tmp = w.image.with_extension("jpg.tmp");
        std::fs::write(&tmp, jpeg)?;
        std::fs::rename(&tmp, &w.image)?;
    }
    if !w.crops.exists() {
        let b = boxes(width, height, count, 50);
        std::fs::write(&w.crops, crops::to_csv(&b))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_inside() {
        assert_eq!(photo(64, 48, 3), photo(64, 48, 3));
        assert_ne!(photo(64, 48, 3), photo(64, 48, 4));
        let b = boxes(1000, 800, 50, 1);
        assert_eq!(b, boxes(1000, 800, 50, 1));
        crops::validate(&b, 1000, 800, 50).unwrap();
        assert!(b.iter().all(|b| (200..=600).contains(&b.w) && (200..=600).contains(&b.h)));
    }

    #[test]
    fn compresses_like_a_photograph() {
        // 1-2 bits per pixel at quality 90; measured on a 1 MP crop of the generator to keep
        // the test fast (the full 12 MP sample is reported by the bench).
        let (w, h) = (1200, 900);
        let jpeg = encode_jpeg(&photo(w, h, 2026), w, h, 90, false);
        let bpp = jpeg.len() as f64 * 8.0 / (w * h) as f64;
        assert!((1.0..=2.0).contains(&bpp), "{bpp:.2} bits per pixel");
    }
}
