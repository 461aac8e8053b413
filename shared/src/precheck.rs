//! The producer's checks before it enqueues anything. For sources on local disk: the image
//! exists and its header is a supported image (JPEG, PNG, WebP) within the pixel limit; the
//! crop list parses and every box fits the image (and the count is within the limit). Local
//! paths — image, crop list, output prefix — are made absolute, because a worker started in
//! another folder (or a container mounting the same path) would resolve a relative one
//! elsewhere. `gs://` and `http(s)://` are left as they are: only the workers may be able to
//! reach them (the producer's `--no-check` skips everything, for local paths that exist only
//! where the workers run).
//!
//! Each distinct (image, crop list) pair is checked once, so a manifest repeating one source
//! costs one check.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::crops::{self, CropBox};
use crate::engine;
use crate::engine::EngineError;
use crate::storage::Location;
use crate::task::CropsSpec;

/// How much of a source is read to probe its header first; the rest only if the header is
/// not in it (a JPEG with megabytes of metadata before its frame header).
const HEADER_PREFIX: u64 = 4 << 20;

/// Why a task was refused before it was enqueued. Every variant names the input.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("image {path}: not found")]
    ImageMissing { path: String },
    #[error("image {path}: cannot read it: {reason}")]
    ImageUnreadable { path: String, reason: String },
    #[error("image {path}: {reason}")]
    ImageInvalid { path: String, reason: String },
    #[error("crop list {path}: not found")]
    CropsMissing { path: String },
    #[error("crop list {path}: {reason}")]
    CropsInvalid { path: String, reason: String },
    #[error("crop list {crops} does not fit image {image} ({width}x{height}): {reason}")]
    CropsDoNotFit { crops: String, image: String, width: u32, height: u32, reason: String },
    #[error("{what} {value:?}: {reason}")]
    BadPath { what: &'static str, value: String, reason: String },
}

/// Limits the workers apply, checked here the same way.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest source (width × height); the worker's `--max-pixels`.
    pub max_pixels: u64,
    /// Most crops per task; the worker's `--max-crops`.
    pub max_crops: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_pixels: engine::DEFAULT_MAX_PIXELS, max_crops: crops::DEFAULT_MAX_CROPS }
    }
}

/// A task's sources after the check: local paths absolute, the rest unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub image: String,
    pub crops: CropsSpec,
    pub output: String,
}

/// Checks tasks, remembering each (image, crop list) pair it has seen.
#[derive(Debug)]
pub struct Checker {
    limits: Limits,
    seen: HashMap<(String, String), Result<(), CheckError>>,
}

impl Checker {
    pub fn new(limits: Limits) -> Checker {
        Checker { limits, seen: HashMap::new() }
    }

    /// Distinct (image, crop list) pairs checked so far.
    pub fn checked(&self) -> usize {
        self.seen.len()
    }

    /// Check one task's sources and make its local paths absolute.
    pub fn check(&mut self, image: &str, crops: &CropsSpec, output: &str) -> Result<Checked, CheckError> {
        let image = absolute("image", image)?;
        let crops = match crops {
            CropsSpec::Uri(u) => CropsSpec::Uri(absolute("crop list", u)?),
            inline => inline.clone(),
        };
        let output = absolute("output", output)?;
        let key = (image.clone(), serde_json::to_string(&crops).expect("crops serialize"));
        let limits = self.limits;
        self.seen.entry(key).or_insert_with(|| check_sources(&image, &crops, limits)).clone()?;
        Ok(Checked { image, crops, output })
    }
}

/// A local path or `file://` URI made absolute (against the current folder; the file need not
/// exist); anything else unchanged.
pub fn absolute(what: &'static str, value: &str) -> Result<String, CheckError> {
    match local_path(value) {
        Some(p) if p.is_absolute() => Ok(p.display().to_string()),
        Some(p) => std::path::absolute(&p).map(|a| a.display().to_string()).map_err(|e| CheckError::BadPath {
            what,
            value: value.into(),
            reason: e.to_string(),
        }),
        None => Ok(value.to_string()),
    }
}

fn local_path(value: &str) -> Option<PathBuf> {
    match Location::parse(value) {
        Ok(Location::Local(p)) => Some(p),
        _ => None,
    }
}

fn check_sources(image: &str, crops: &CropsSpec, limits: Limits) -> Result<(), CheckError> {
    let size = match local_path(image) {
        Some(p) => {
            let info = probe_file(&p, limits.max_pixels)?;
            Some(info.display_size())
        }
        None => None,
    };
    let (boxes, crops_name): (Option<Vec<CropBox>>, String) = match crops {
        CropsSpec::Inline(b) => (Some(b.clone()), "(inline)".into()),
        CropsSpec::Uri(u) => match local_path(u) {
            Some(p) => (Some(read_crops(&p)?), p.display().to_string()),
            None => (None, u.clone()),
        },
    };
    let Some(boxes) = boxes else { return Ok(()) };
    let err = |reason: EngineError| CheckError::CropsInvalid { path: crops_name.clone(), reason: reason.to_string() };
    crops::check_count(boxes.len(), limits.max_crops).map_err(err)?;
    if let Some((width, height)) = size {
        crops::validate(&boxes, width, height, limits.max_crops).map_err(|e| CheckError::CropsDoNotFit {
            crops: crops_name.clone(),
            image: image.into(),
            width,
            height,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

fn probe_file(p: &Path, max_pixels: u64) -> Result<engine::ImageInfo, CheckError> {
    let path = p.display().to_string();
    let unreadable = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CheckError::ImageMissing { path: path.clone() }
        } else {
            CheckError::ImageUnreadable { path: path.clone(), reason: e.to_string() }
        }
    };
    let mut f = std::fs::File::open(p).map_err(unreadable)?;
    let meta = f.metadata().map_err(unreadable)?;
    let len = meta.len();
    if meta.is_dir() {
        return Err(CheckError::ImageUnreadable { path, reason: "is a folder".into() });
    }
    let mut head = Vec::new();
    (&mut f).take(HEADER_PREFIX).read_to_end(&mut head).map_err(unreadable)?;
    let invalid = |e: EngineError| CheckError::ImageInvalid { path: path.clone(), reason: e.to_string() };
    match engine::probe(&head, max_pixels) {
        Ok(info) => Ok(info),
        // The header may lie beyond the prefix: read the rest and ask again.
        Err(EngineError::Decode(_)) if len > HEADER_PREFIX => {
            f.read_to_end(&mut head).map_err(unreadable)?;
            engine::probe(&head, max_pixels).map_err(invalid)
        }
        Err(e) => Err(invalid(e)),
    }
}

fn read_crops(p: &Path) -> Result<Vec<CropBox>, CheckError> {
    let path = p.display().to_string();
    let text = std::fs::read_to_string(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CheckError::CropsMissing { path: path.clone() },
        _ => CheckError::CropsInvalid { path: path.clone(), reason: e.to_string() },
    })?;
    crops::parse_csv(&text).map_err(|e| CheckError::CropsInvalid { path, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    fn files() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let w = sample::write_workload_sized(dir.path(), 320, 240, 5).unwrap();
        (dir, w.image.display().to_string(), w.crops.display().to_string())
    }

    fn uri(s: &str) -> CropsSpec {
        CropsSpec::Uri(s.into())
    }

    #[test]
    fn good_local_sources_pass_and_paths_become_absolute() {
        let (dir, image, crops) = files();
        let mut c = Checker::new(Limits::default());
        let ok = c.check(&image, &uri(&crops), "out/run1").unwrap();
        assert_eq!((ok.image.as_str(), &ok.crops), (image.as_str(), &uri(&crops)));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(ok.output, cwd.join("out/run1").display().to_string());
        // file:// URIs become plain absolute paths; remote ones are left alone and unchecked.
        let f = c.check(&format!("file://{image}"), &uri(&crops), "gs://b/out").unwrap();
        assert_eq!((f.image.as_str(), f.output.as_str()), (image.as_str(), "gs://b/out"));
        c.check("gs://bucket/a.jpg", &uri("https://h/c.csv"), "out").unwrap();
        // Inline boxes are checked against the image.
        c.check(&image, &CropsSpec::Inline(vec![CropBox { x: 0, y: 0, w: 10, h: 10 }]), "out").unwrap();
        // file://IMAGE is the same pair as IMAGE once absolute: checked once.
        assert_eq!(c.checked(), 3);
        drop(dir);
    }

    #[test]
    fn each_bad_input_is_a_clear_error() {
        let (dir, image, crops) = files();
        let d = dir.path();
        let put = |name: &str, body: &[u8]| {
            std::fs::write(d.join(name), body).unwrap();
            d.join(name).display().to_string()
        };
        let notes = put("notes.jpg", b"not an image at all");
        // A PNG signature and an IHDR claiming 30000x30000, nothing behind it.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&30000u32.to_be_bytes());
        png.extend_from_slice(&30000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let big_png = put("big.png", &png);
        let bad_csv = put("bad.csv", b"x,y,w,h\n1,2,three,4\n");
        let edge_csv = put("edge.csv", b"x,y,w,h\n300,200,50,50\n");
        let empty_csv = put("empty.csv", b"x,y,w,h\n");
        let mut c = Checker::new(Limits { max_pixels: engine::DEFAULT_MAX_PIXELS, max_crops: 3 });
        let cases: Vec<(String, CropsSpec, &str)> = vec![
            (d.join("nope.jpg").display().to_string(), uri(&crops), "nope.jpg: not found"),
            (notes.clone(), uri(&crops), "not a JPEG, PNG or WebP"),
            (big_png, uri(&crops), "30000x30000"),
            (d.display().to_string(), uri(&crops), "is a folder"),
            (image.clone(), uri(&d.join("nope.csv").display().to_string()), "nope.csv: not found"),
            (image.clone(), uri(&bad_csv), "is not an integer"),
            (image.clone(), uri(&empty_csv), "is empty"),
            (image.clone(), uri(&edge_csv), "outside the 320x240 image"),
            // 5 boxes, limit 3.
            (image.clone(), uri(&crops), "too many crops: 5 > limit 3"),
            // Crops that cannot be checked against a remote image are still parsed.
            ("gs://b/x.jpg".into(), uri(&bad_csv), "is not an integer"),
        ];
        for (img, crops, want) in cases {
            let e = c.check(&img, &crops, "out").unwrap_err().to_string();
            assert!(e.contains(want), "{img} {crops:?}: {e}");
        }
        let e = c.check(&image, &uri(&edge_csv), "out").unwrap_err();
        assert!(matches!(e, CheckError::CropsDoNotFit { width: 320, height: 240, .. }), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_current_folder() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute("image", "a/b.jpg").unwrap(), cwd.join("a/b.jpg").display().to_string());
        assert_eq!(absolute("image", "file://a.jpg").unwrap(), cwd.join("a.jpg").display().to_string());
        assert_eq!(absolute("image", "/x/y.jpg").unwrap(), "/x/y.jpg");
        assert_eq!(absolute("image", "https://h/y.jpg").unwrap(), "https://h/y.jpg");
    }
}
