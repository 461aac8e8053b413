//! Property-based fuzzing of the three bad-input surfaces: task JSON ([`Task::parse`]), crop
//! CSVs ([`crops::parse_csv`], [`crops::parse_inline`], [`crops::validate`]) and image headers
//! ([`engine::probe`], [`engine::decode`], [`lossless::inspect`], [`lossless::crop_all`]).
//!
//! `cargo fuzz` needs a nightly toolchain; these run on stable with proptest, from arbitrary
//! inputs and from structure-aware mutations of valid ones. Every input must give either a
//! result that obeys the documented rules or a permanent error with a message — never a panic,
//! and never an allocation past the pixel limit (checked with a tracking allocator).
//!
//! - `CROPFLEET_FUZZ_CASES` sets the cases per property (default [`DEFAULT_CASES`], sized for
//!   well under a minute in a debug build on 2 cores); `scripts/fuzz.sh` runs 100k.
//! - Failures are kept in `proptest-regressions/fuzz.txt` (replayed first on every run); inputs
//!   worth keeping as files go in `tests/fuzz-corpus/{task,crops,image}/`, which
//!   `corpus_replays_cleanly` runs through the same checks. `write_seed_corpus` (ignored)
//!   regenerates the image seeds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use cropfleet::crops::{self, CropBox};
use cropfleet::engine;
use cropfleet::error::{Failure, TaskError};
use cropfleet::lossless;
use cropfleet::storage::Location;
use cropfleet::task::{CropsSpec, Task, MAX_ID_LEN, TASK_VERSION};
use cropfleet::EngineError;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Value};

/// Cases per property when `CROPFLEET_FUZZ_CASES` is unset.
const DEFAULT_CASES: u32 = 10_000;

fn config(weight: u32) -> ProptestConfig {
    let cases = std::env::var("CROPFLEET_FUZZ_CASES").ok().and_then(|v| v.trim().parse::<u32>().ok());
    let cases = cases.unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        // Image properties decode and encode: they run a fraction of the cases.
        cases: (cases / weight).max(1),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/fuzz.txt"))),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made by this thread since the last reset.

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Run `f`, returning its result and the largest single allocation it made (on this thread).
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

// ---------------------------------------------------------------------------------------------
// Checks, shared by the properties and the corpus replay

/// The engine's errors reach a task as [`TaskError::Engine`]: checked the way the worker sees them.
fn assert_engine_permanent(e: &EngineError, kinds: &[&str]) {
    assert_permanent(&TaskError::from(e.clone()), kinds);
}

fn assert_permanent(e: &TaskError, kinds: &[&str]) {
    assert_eq!(e.failure(), Failure::Permanent, "not permanent: {e}");
    assert!(kinds.contains(&e.kind()), "unexpected error kind {}: {e}", e.kind());
    assert!(e.to_string().len() > 10, "error without a useful message: {e:?}");
}

/// Ids name folders: one safe path segment.
fn assert_safe_segment(id: &str) {
    assert!(!id.is_empty() && id.len() <= MAX_ID_LEN, "{id:?}");
    assert!(!id.starts_with('.'), "{id:?}");
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{id:?}");
}

/// Where the worker writes a task's crops — `{output}/{id}/NNN.jpg` — stays under `output`.
fn assert_contained(output: &str, id: &str) {
    let Ok(prefix) = Location::parse(output) else { return }; // the worker dead-letters it
    let obj = prefix.join(id).join("000.jpg");
    match (&prefix, &obj) {
        (Location::Local(p), Location::Local(o)) => {
            assert!(!o.components().any(|c| c == Component::ParentDir), "{output:?} + {id:?} -> {o:?} climbs out");
            assert_eq!(o.strip_prefix(p).ok(), Some(Path::new(id).join("000.jpg").as_path()), "{output:?} -> {o:?}");
        }
        (Location::Gcs { bucket, key }, Location::Gcs { bucket: b2, key: k2 }) => {
            assert_eq!(bucket, b2);
            assert!(!k2.split('/').any(|s| s == ".."), "{output:?} + {id:?} -> {k2:?}");
            assert!(k2.starts_with(key.trim_end_matches('/')), "{output:?} -> {k2:?}");
            assert!(k2.ends_with(&format!("{id}/000.jpg")), "{output:?} -> {k2:?}");
        }
        (Location::Http(_), _) => {} // refused by the worker: http(s) is read-only
        other => panic!("join changed the location kind: {other:?}"),
    }
}

/// A task message is either a valid task (by the documented rules) or a permanent error.
fn check_task(bytes: &[u8]) {
    match Task::parse(bytes) {
        Ok(t) => {
            assert_eq!(t.v, TASK_VERSION);
            assert_safe_segment(&t.id);
            if let Some(run) = &t.run_id {
                assert_safe_segment(run);
            }
            if let Some(q) = t.quality {
                assert!((1..=100).contains(&q), "quality {q}");
            }
            assert!(!t.image.trim().is_empty());
            if let CropsSpec::Uri(u) = &t.crops {
                assert!(!u.trim().is_empty());
            }
            assert!(!t.output.trim().is_empty() && !t.output.contains('\0'));
            assert_contained(&t.output, &t.id);
            let again = Task::parse(&t.to_json()).unwrap_or_else(|e| panic!("re-parsing {t:?}: {e}"));
            assert_eq!(again, t);
        }
        Err(e) => assert_permanent(&e, &["malformed_task", "unsupported_version", "invalid_field"]),
    }
}

/// A crop list parses to boxes or a permanent error; boxes that pass validation are in bounds.
fn check_crops(text: &str, width: u32, height: u32, max_crops: usize) {
    match crops::parse_csv(text) {
        Ok(boxes) => {
            assert_eq!(crops::parse_csv(&crops::to_csv(&boxes)).unwrap(), boxes, "round trip of {text:?}");
            check_boxes(&boxes, width, height, max_crops);
        }
        Err(e) => assert_engine_permanent(&e, &["invalid_crops"]),
    }
    match crops::parse_inline(text) {
        None => {}
        Some(Ok(boxes)) => check_boxes(&boxes, width, height, max_crops),
        Some(Err(e)) => assert_engine_permanent(&e, &["invalid_crops"]),
    }
}

fn check_boxes(boxes: &[CropBox], width: u32, height: u32, max_crops: usize) {
    match crops::validate(boxes, width, height, max_crops) {
        Ok(()) => {
            assert!(!boxes.is_empty() && boxes.len() <= max_crops, "{} boxes, limit {max_crops}", boxes.len());
            for b in boxes {
                assert!(b.w > 0 && b.h > 0 && b.x >= 0 && b.y >= 0, "{b}");
                let (right, bottom) = (b.x as i128 + b.w as i128, b.y as i128 + b.h as i128);
                assert!(right <= width as i128 && bottom <= height as i128, "{b} outside {width}x{height}");
            }
        }
        Err(e) => assert_engine_permanent(&e, &["invalid_crops", "too_many_crops", "bad_box"]),
    }
}

/// Header work (sniff, probe, inspect) allocates no more than this, whatever the header says.
fn header_budget(input: &[u8]) -> usize {
    (1 << 20).max(4 * input.len())
}

/// Decoding allocates at most 8 bytes per allowed pixel (the `image` crate's limit; RGB8 needs
/// 3, CMYK 4, 16-bit RGBA 8) on top of the header budget.
fn decode_budget(input: &[u8], max_pixels: u64) -> usize {
    (max_pixels as usize).saturating_mul(8).saturating_add(header_budget(input))
}

/// The decode path and the lossless path, as the worker runs them: probe (pixel limit from the
/// header), then decode and cut, or inspect and cut losslessly.
fn check_image(bytes: &[u8], max_pixels: u64) {
    let (probe, big) = largest_alloc(|| engine::probe(bytes, max_pixels));
    assert!(big <= header_budget(bytes), "probe allocated {big} bytes ({probe:?})");
    let info = match probe {
        Ok(info) => {
            assert!(info.width > 0 && info.height > 0);
            assert!(info.width as u64 * info.height as u64 <= max_pixels, "{info:?} over {max_pixels}");
            Some(info)
        }
        Err(e) => {
            assert_engine_permanent(&e, &["decode", "too_many_pixels"]);
            None
        }
    };

    let (decoded, big) = largest_alloc(|| engine::decode(bytes, max_pixels));
    assert!(big <= decode_budget(bytes, max_pixels), "decode allocated {big} bytes, limit {max_pixels} px");
    match (&decoded, info) {
        (Ok(d), Some(info)) => {
            assert_eq!((d.width, d.height), info.display_size());
            assert_eq!(d.rgb().len(), d.width as usize * d.height as usize * 3);
            let boxes = [
                CropBox { x: 0, y: 0, w: d.width as i64, h: d.height as i64 },
                CropBox { x: d.width as i64 - 1, y: d.height as i64 - 1, w: 1, h: 1 },
            ];
            crops::validate(&boxes, d.width, d.height, 10).unwrap();
            for (i, b) in boxes.iter().enumerate() {
                let jpeg = engine::encode_crop(d, i, b, 80).unwrap_or_else(|e| panic!("encoding {b}: {e}"));
                let out = engine::probe(&jpeg, max_pixels).unwrap();
                assert_eq!((out.width as i64, out.height as i64), (b.w, b.h));
            }
        }
        (Ok(d), None) => panic!("decoded {d:?} although the probe failed"),
        (Err(e), _) => assert_engine_permanent(e, &["decode", "too_many_pixels"]),
    }

    let (layout, big) = largest_alloc(|| lossless::inspect(bytes));
    assert!(big <= header_budget(bytes), "lossless::inspect allocated {big} bytes");
    let Ok(layout) = layout else { return };
    assert!(layout.width > 0 && layout.height > 0, "{layout:?}");
    assert!([8, 16, 32].contains(&layout.mcu_width) && [8, 16, 32].contains(&layout.mcu_height), "{layout:?}");
    // The worker only cuts losslessly what passed the pixel limit.
    let Some(info) = info else { return };
    assert_eq!((layout.width, layout.height), info.display_size(), "inspect and probe disagree");
    let (w, h) = (layout.width as i64, layout.height as i64);
    let boxes = [CropBox { x: 0, y: 0, w, h }, CropBox { x: w / 2, y: h / 2, w: w - w / 2, h: h - h / 2 }];
    match lossless::crop_all(bytes, &boxes) {
        Ok(out) => {
            assert_eq!(out.len(), boxes.len());
            for (b, c) in boxes.iter().zip(&out) {
                let s = c.snapped;
                assert!(s.x <= b.x && s.y <= b.y && s.x + s.w >= b.x + b.w && s.y + s.h >= b.y + b.h, "{b} -> {s}");
                s.check(0, layout.width, layout.height).unwrap();
                let got = engine::probe(&c.jpeg, u64::MAX).unwrap_or_else(|e| panic!("lossless crop {s}: {e}"));
                assert_eq!((got.width as i64, got.height as i64), (s.w, s.h), "lossless crop of {b}");
            }
        }
        Err(e) => assert_engine_permanent(&e, &["decode", "bad_box"]),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// Strings aimed at ids, prefixes and URIs: traversal, absolute paths, schemes, whitespace and
/// unicode tricks, NUL, over-long ids; plus arbitrary unicode and combinations.
fn nasty_string() -> impl Strategy<Value = String> {
    let atoms = vec![
        "",
        ".",
        "..",
        "../x",
        "a/../b",
        "a/..",
        "/",
        "/etc/passwd",
        "/abs/out",
        "out",
        "gs://",
        "gs://b",
        "gs://b/",
        "gs://b/..",
        "gs://b/../x",
        "gs:///x",
        "gs://b//..//x",
        "gs://B_ad/x",
        "gs://bucket/crops/run1",
        " ..",
        "..\n",
        "\t../x",
        "\u{a0}..",
        "..\u{3000}",
        "\u{2028}../etc",
        "file://..",
        "file:///tmp/../x",
        "file://",
        "x\0y",
        "a\\..\\b",
        "..\\x",
        "ftp://x",
        "http://h/x",
        "https://h/x.jpg",
        "t-1",
        "run.1",
        ".hidden",
        "日本語",
        "é",
        "\u{feff}x",
        "%2e%2e",
        "..%2f",
        "CON",
        "a b",
        "-",
        "_",
    ];
    prop_oneof![
        4 => select(atoms.clone()).prop_map(str::to_string),
        2 => "\\PC{0,40}",
        2 => "[a-zA-Z0-9._/\\\\: %-]{0,24}",
        2 => (select(atoms.clone()), select(atoms.clone()), select(vec!["", "/", " ", "\n", "/..", "://"]))
            .prop_map(|(a, b, sep)| format!("{a}{sep}{b}")),
        1 => (120usize..140, select(vec!['x', '.', '-', 'é'])).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec![0i64, 1, 2, -1, 100, 101, 255, 256, i64::MIN, i64::MAX]).prop_map(Value::from),
        select(vec![u64::MAX, u64::MAX - 1, 1 << 53]).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(vec![1.0f64, 0.5, -0.0, 1e300, -1e300, 1e-300]).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        json_number(),
        nasty_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((select(FIELDS.to_vec()), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

fn crop_box_value() -> impl Strategy<Value = Value> {
    let coord = prop_oneof![4 => (0i64..5000).prop_map(Value::from), 1 => json_number(), 1 => json_value()];
    (coord.clone(), coord.clone(), coord.clone(), coord, any::<bool>(), any::<bool>()).prop_map(
        |(x, y, w, h, drop_one, extra)| {
            let mut b = json!({"x": x, "y": y, "w": w, "h": h});
            if drop_one {
                b.as_object_mut().unwrap().remove("h");
            }
            if extra {
                b["label"] = "cat".into();
            }
            b
        },
    )
}

const FIELDS: [&str; 10] =
    ["v", "id", "run_id", "image", "crops", "output", "quality", "crop_mode", "enqueued_ms", "x"];

/// A value suited to one task field, often valid, often subtly not.
fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    match field {
        "v" => prop_oneof![3 => json_number(), 1 => json_value()].boxed(),
        "crops" => prop_oneof![
            proptest::collection::vec(crop_box_value(), 0..4).prop_map(Value::Array),
            nasty_string().prop_map(Value::from),
            json_value(),
        ]
        .boxed(),
        "quality" | "enqueued_ms" => prop_oneof![3 => json_number(), 1 => json_value()].boxed(),
        "crop_mode" => {
            prop_oneof![select(vec!["decode", "lossless", "Decode", "", "fast"]).prop_map(Value::from), json_value()]
                .boxed()
        }
        _ => prop_oneof![3 => nasty_string().prop_map(Value::from), 1 => json_value()].boxed(),
    }
}

#[derive(Debug, Clone)]
enum TaskEdit {
    Remove(&'static str),
    Set(&'static str, Value),
}

fn task_edit() -> impl Strategy<Value = TaskEdit> {
    select(FIELDS.to_vec()).prop_flat_map(
        |f| prop_oneof![1 => Just(TaskEdit::Remove(f)), 4 => field_value(f).prop_map(move |v| TaskEdit::Set(f, v))],
    )
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(usize),
    Overwrite(usize, u8),
    Insert(usize, Vec<u8>),
    /// Repeat a key: `{"v":1,` prepended inside the object.
    DuplicateKey(&'static str, Value),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        any::<usize>().prop_map(ByteEdit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Overwrite(i, b)),
        (any::<usize>(), select(vec![&b"\""[..], b"\\", b"}", b",", b"\xff", b"\xc3", b"\0", b"\\u0000", b"\\ud800"]))
            .prop_map(|(i, s)| ByteEdit::Insert(i, s.to_vec())),
        select(FIELDS.to_vec()).prop_flat_map(|f| field_value(f).prop_map(move |v| ByteEdit::DuplicateKey(f, v))),
    ]
}

fn apply_byte_edits(mut bytes: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            ByteEdit::Truncate(i) => bytes.truncate(i % n),
            ByteEdit::Overwrite(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % n] = *b;
                }
            }
            ByteEdit::Insert(i, s) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, s.iter().copied());
            }
            ByteEdit::DuplicateKey(k, v) => {
                if bytes.first() == Some(&b'{') {
                    let pair = format!("{}:{},", Value::from(*k), v);
                    bytes.splice(1..1, pair.into_bytes());
                }
            }
        }
    }
    bytes
}

fn valid_task() -> impl Strategy<Value = Value> {
    (
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}",
        select(vec!["/out", "out", "gs://bkt/crops", "file:///tmp/o", "./o", "gs://bkt"]),
        proptest::collection::vec((0i64..100, 0i64..100, 1i64..50, 1i64..50), 1..4),
    )
        .prop_map(|(id, output, boxes)| {
            let crops: Vec<Value> =
                boxes.into_iter().map(|(x, y, w, h)| json!({"x": x, "y": y, "w": w, "h": h})).collect();
            json!({"v": 1, "id": id, "image": "/img.jpg", "crops": crops, "output": output})
        })
}

fn mutated_task() -> impl Strategy<Value = Vec<u8>> {
    (
        valid_task(),
        proptest::collection::vec(task_edit(), 0..4),
        prop_oneof![3 => Just(vec![]), 1 => proptest::collection::vec(byte_edit(), 1..3)],
    )
        .prop_map(|(mut task, edits, bytes)| {
            let obj = task.as_object_mut().unwrap();
            for e in edits {
                match e {
                    TaskEdit::Remove(f) => {
                        obj.remove(f);
                    }
                    TaskEdit::Set(f, v) => {
                        obj.insert(f.to_string(), v);
                    }
                }
            }
            apply_byte_edits(serde_json::to_vec(&task).unwrap(), &bytes)
        })
}

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0i64..5000).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => select(vec![
            "-1", "0", "+5", " 7 ", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
            "99999999999999999999", "1e3", "1.5", "0x10", "", "١٢", "７", "NaN", "-", "\"3\"",
        ])
        .prop_map(str::to_string),
    ]
}

#[derive(Debug, Clone)]
enum CsvEdit {
    Truncate(usize),
    Insert(usize, String),
    BlankLines,
    Crlf,
    Bom,
}

fn mutated_csv() -> impl Strategy<Value = String> {
    let header = prop_oneof![
        3 => Just("x,y,w,h".to_string()),
        1 => Just("label,h,w,y,x".to_string()),
        1 => Just(" X , Y , W , H ,extra".to_string()),
        1 => Just("x,y,w".to_string()),
        1 => Just("x,x,y,w,h".to_string()),
        1 => "[xywh, ]{0,12}",
    ];
    let row = proptest::collection::vec(number_text(), 0..6).prop_map(|f| f.join(","));
    let edit = prop_oneof![
        any::<usize>().prop_map(CsvEdit::Truncate),
        (any::<usize>(), prop_oneof![Just("\n".to_string()), Just(",".to_string()), "\\PC{0,4}"])
            .prop_map(|(i, s)| CsvEdit::Insert(i, s)),
        Just(CsvEdit::BlankLines),
        Just(CsvEdit::Crlf),
        Just(CsvEdit::Bom),
    ];
    (header, proptest::collection::vec(row, 0..8), proptest::collection::vec(edit, 0..3)).prop_map(
        |(header, rows, edits)| {
            let mut text = format!("{header}\n{}\n", rows.join("\n"));
            for e in edits {
                let at = |i: usize, t: &str| {
                    let mut k = i % (t.len() + 1);
                    while !t.is_char_boundary(k) {
                        k -= 1;
                    }
                    k
                };
                match e {
                    CsvEdit::Truncate(i) => text.truncate(at(i, &text)),
                    CsvEdit::Insert(i, s) => text.insert_str(at(i, &text), &s),
                    CsvEdit::BlankLines => text = text.replace('\n', "\n \n"),
                    CsvEdit::Crlf => text = text.replace('\n', "\r\n"),
                    CsvEdit::Bom => text.insert(0, '\u{feff}'),
                }
            }
            text
        },
    )
}

fn valid_csv() -> impl Strategy<Value = String> {
    proptest::collection::vec((0i64..200, 0i64..200, 1i64..100, 1i64..100), 1..20)
        .prop_map(|b| crops::to_csv(&b.into_iter().map(|(x, y, w, h)| CropBox { x, y, w, h }).collect::<Vec<_>>()))
}

fn image_size() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        4 => (1u32..400, 1u32..400),
        1 => (0u32..3, 0u32..3),
        1 => (any::<u32>(), any::<u32>()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Image seeds and mutations

fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus").join(kind)
}

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(kind))
        .unwrap_or_else(|e| panic!("{}: {e}", corpus_dir(kind).display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// Small valid images of every format and JPEG flavour the engine meets, generated in-process.
fn seed_images() -> Vec<(&'static str, Vec<u8>)> {
    use cropfleet::{exif, sample};
    let (w, h) = (48u32, 32u32);
    let rgb = sample::photo(w, h, 3);
    let mut seeds = vec![
        ("small-420.jpg", sample::encode_jpeg(&rgb, w, h, 85, false)),
        ("small-progressive.jpg", sample::encode_jpeg(&rgb, w, h, 85, true)),
        ("exif-rotate90.jpg", exif::with_orientation(&sample::encode_jpeg(&rgb, w, h, 85, false), 6)),
    ];
    let odd = sample::photo(37, 23, 4);
    seeds.push(("odd-size-rotate180.jpg", exif::with_orientation(&sample::encode_jpeg(&odd, 37, 23, 85, false), 3)));
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[1]).collect();
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_subsamp(turbojpeg::Subsamp::Gray).unwrap();
    let img =
        turbojpeg::Image { pixels: &gray[..], width: 48, pitch: 48, height: 32, format: turbojpeg::PixelFormat::GRAY };
    seeds.push(("gray.jpg", c.compress_to_vec(img).unwrap()));
    let cmyk: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 200]).collect();
    let img =
        turbojpeg::Image { pixels: &cmyk[..], width: 48, pitch: 192, height: 32, format: turbojpeg::PixelFormat::CMYK };
    seeds.push(("cmyk.jpg", turbojpeg::Compressor::new().unwrap().compress_to_vec(img).unwrap()));
    let encode = |enc: &dyn Fn(&mut Vec<u8>) -> image::ImageResult<()>| {
        let mut out = Vec::new();
        enc(&mut out).unwrap();
        out
    };
    use image::ImageEncoder;
    seeds.push((
        "small.png",
        encode(&|o| image::codecs::png::PngEncoder::new(o).write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)),
    ));
    let rgba16: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[0], p[1], p[1], p[2], p[2], 0xff, 0x80]).collect();
    seeds.push((
        "rgba16.png",
        encode(&|o| {
            image::codecs::png::PngEncoder::new(o).write_image(&rgba16, w, h, image::ExtendedColorType::Rgba16)
        }),
    ));
    seeds.push((
        "small.webp",
        encode(&|o| {
            image::codecs::webp::WebPEncoder::new_lossless(o).write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        }),
    ));
    seeds
}

fn seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut s: Vec<(String, Vec<u8>)> = seed_images().into_iter().map(|(n, b)| (n.to_string(), b)).collect();
        s.extend(corpus("image"));
        s
    })
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Offset of a JPEG's frame header (the byte after the SOFn length), if any.
fn jpeg_sof(b: &[u8]) -> Option<usize> {
    let mut i = 2;
    while i + 4 <= b.len() && b[i] == 0xFF {
        let m = b[i + 1];
        if (0xC0..=0xCF).contains(&m) && !matches!(m, 0xC4 | 0xC8 | 0xCC) {
            return Some(i + 4);
        }
        if m == 0xDA {
            return None;
        }
        i += 2 + u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
    }
    None
}

/// Rewrite the dimensions a header claims: JPEG SOF, PNG IHDR (CRC fixed up or not), WebP
/// VP8X canvas / VP8L / VP8 frame.
fn set_dimensions(b: &mut [u8], w: u32, h: u32, fix_crc: bool) {
    if b.starts_with(&[0xFF, 0xD8]) {
        if let Some(o) = jpeg_sof(b).filter(|o| o + 5 <= b.len()) {
            b[o + 1..o + 3].copy_from_slice(&(h.min(0xFFFF) as u16).to_be_bytes());
            b[o + 3..o + 5].copy_from_slice(&(w.min(0xFFFF) as u16).to_be_bytes());
        }
    } else if b.starts_with(b"\x89PNG") && b.len() >= 33 {
        b[16..20].copy_from_slice(&w.to_be_bytes());
        b[20..24].copy_from_slice(&h.to_be_bytes());
        if fix_crc {
            let crc = crc32(&b[12..29]);
            b[29..33].copy_from_slice(&crc.to_be_bytes());
        }
    } else if b.len() >= 30 && &b[12..16] == b"VP8X" {
        let (w1, h1) = (w.saturating_sub(1).min(0xFF_FFFF), h.saturating_sub(1).min(0xFF_FFFF));
        b[24..27].copy_from_slice(&w1.to_le_bytes()[..3]);
        b[27..30].copy_from_slice(&h1.to_le_bytes()[..3]);
    } else if b.len() >= 25 && &b[12..16] == b"VP8L" {
        // 14-bit width-1 and height-1 after the 0x2f signature byte.
        let (w1, h1) = (w.saturating_sub(1).min(0x3FFF), h.saturating_sub(1).min(0x3FFF));
        let old = u32::from_le_bytes([b[21], b[22], b[23], b[24]]);
        let v = (old & 0xF000_0000) | w1 | (h1 << 14);
        b[21..25].copy_from_slice(&v.to_le_bytes());
    } else if b.len() >= 30 && &b[12..16] == b"VP8 " {
        b[26..28].copy_from_slice(&(w.min(0x3FFF) as u16).to_le_bytes());
        b[28..30].copy_from_slice(&(h.min(0x3FFF) as u16).to_le_bytes());
    }
}

#[derive(Debug, Clone)]
enum ImageEdit {
    BitFlip(usize, u8),
    Byte(usize, u8),
    Truncate(usize),
    /// Cut a slice out of the middle.
    Remove(usize, usize),
    Dimensions(u32, u32, bool),
}

fn dimension() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => select(vec![0u32, 1, 8, 30000, 65535, 65536, 16384, 1 << 24, u32::MAX]),
        1 => 1u32..2000,
        1 => any::<u32>(),
    ]
}

fn image_edit() -> impl Strategy<Value = ImageEdit> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, bit)| ImageEdit::BitFlip(i, bit)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ImageEdit::Byte(i, b)),
        // Flips and edits in the first 64 bytes (the headers).
        3 => (0usize..64, 0u8..8).prop_map(|(i, bit)| ImageEdit::BitFlip(i, bit)),
        2 => any::<usize>().prop_map(ImageEdit::Truncate),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| ImageEdit::Remove(i, n)),
        3 => (dimension(), dimension(), any::<bool>()).prop_map(|(w, h, c)| ImageEdit::Dimensions(w, h, c)),
    ]
}

fn mutated_image() -> impl Strategy<Value = (String, Vec<u8>, Vec<ImageEdit>)> {
    (0..seeds().len(), proptest::collection::vec(image_edit(), 1..4)).prop_map(|(i, edits)| {
        let (name, seed) = &seeds()[i];
        let mut b = seed.clone();
        for e in &edits {
            let n = b.len().max(1);
            match *e {
                ImageEdit::BitFlip(i, bit) if !b.is_empty() => b[i % n] ^= 1 << bit,
                ImageEdit::Byte(i, v) if !b.is_empty() => b[i % n] = v,
                ImageEdit::Truncate(i) => b.truncate(i % n),
                ImageEdit::Remove(i, k) => {
                    let at = i % n;
                    b.drain(at..(at + k).min(b.len()));
                }
                ImageEdit::Dimensions(w, h, fix) => set_dimensions(&mut b, w, h, fix),
                _ => {}
            }
        }
        (name.clone(), b, edits)
    })
}

fn pixel_limit() -> impl Strategy<Value = u64> {
    select(vec![1u64 << 12, 1 << 16, 1 << 20])
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn task_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_task(&bytes);
    }

    #[test]
    fn task_arbitrary_json(v in json_value()) {
        check_task(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn task_mutated(bytes in mutated_task()) {
        check_task(&bytes);
    }

    #[test]
    fn task_prefix_and_id(output in nasty_string(), id in nasty_string(), run in proptest::option::of(nasty_string())) {
        let mut t = json!({"v": 1, "id": id, "image": "gs://b/i.jpg", "crops": "c.csv", "output": output});
        if let Some(r) = run {
            t["run_id"] = r.into();
        }
        check_task(&serde_json::to_vec(&t).unwrap());
    }

    #[test]
    fn crops_arbitrary_text(text in "\\PC{0,200}", (w, h) in image_size(), max in 0usize..30) {
        check_crops(&text, w, h, max);
    }

    #[test]
    fn crops_csv_alphabet(text in "[0-9xywhXYWH,;\\n -]{0,200}", (w, h) in image_size(), max in 0usize..30) {
        check_crops(&text, w, h, max);
    }

    #[test]
    fn crops_mutated(text in prop_oneof![mutated_csv(), valid_csv()], (w, h) in image_size(), max in 0usize..30) {
        check_crops(&text, w, h, max);
    }
}

proptest! {
    #![proptest_config(config(4))]

    #[test]
    fn image_arbitrary_bytes(
        magic in select(vec![&b""[..], b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"RIFF\x20\0\0\0WEBPVP8X"]),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
        max in pixel_limit(),
    ) {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&tail);
        check_image(&bytes, max);
    }

    #[test]
    fn image_mutated((_seed, bytes, _edits) in mutated_image(), max in pixel_limit()) {
        check_image(&bytes, max);
    }

    #[test]
    fn image_giant_header_rejected_before_decoding(
        i in 0..seeds().len(),
        (w, h) in (20_000u32..70_000, 20_000u32..70_000),
        fix_crc in any::<bool>(),
    ) {
        let mut b = seeds()[i].1.clone();
        set_dimensions(&mut b, w, h, fix_crc);
        // The default limit (100 MP): anything claiming ≥ 20000×20000 (400 MP) must be refused
        // from the header, without allocating its pixels.
        let (r, big) = largest_alloc(|| engine::decode(&b, engine::DEFAULT_MAX_PIXELS));
        prop_assert!(big <= header_budget(&b), "decode allocated {} bytes for a {}x{} header", big, w, h);
        prop_assert!(r.is_err());
        check_image(&b, 1 << 16);
    }
}

// ---------------------------------------------------------------------------------------------
// Corpus

#[test]
fn corpus_replays_cleanly() {
    let tasks = corpus("task");
    let csvs = corpus("crops");
    let images = corpus("image");
    assert!(tasks.len() >= 5 && csvs.len() >= 5 && images.len() >= 5, "the seed corpus went missing");
    for (name, bytes) in &tasks {
        eprintln!("task/{name}");
        check_task(bytes);
    }
    for (name, bytes) in &csvs {
        eprintln!("crops/{name}");
        let text = String::from_utf8_lossy(bytes);
        for (w, h) in [(100, 100), (4000, 3000), (0, 0), (u32::MAX, u32::MAX)] {
            check_crops(&text, w, h, 1000);
            check_crops(&text, w, h, 1);
        }
    }
    for (name, bytes) in &images {
        eprintln!("image/{name}");
        for max in [1 << 12, 1 << 20, engine::DEFAULT_MAX_PIXELS] {
            check_image(bytes, max);
        }
    }
}

/// Regenerate the generated image seeds in `tests/fuzz-corpus/image/`:
/// `cargo test -p cropfleet --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let dir = corpus_dir("image");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seed_images() {
        std::fs::write(dir.join(name), &bytes).unwrap();
        let mut bomb = bytes.clone();
        set_dimensions(&mut bomb, 30000, 30000, true);
        if bomb != bytes {
            let stem = name.split_once('.').unwrap();
            std::fs::write(dir.join(format!("{}-giant-header.{}", stem.0, stem.1)), &bomb).unwrap();
        }
    }
    let jpeg = &seed_images()[0].1;
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    // APP0 marker 0xE0 -> 0x60: poisoned the thread's TurboJPEG decompressor, so every JPEG after
    // it on that thread failed (fixed in engine.rs). Sorted first, so the replay checks good
    // JPEGs after it on the same thread.
    let mut bad = jpeg.clone();
    bad[3] ^= 0x80;
    std::fs::write(dir.join("bad-marker-poisoned-decompressor.jpg"), &bad).unwrap();
}
