//! The wire schema: task messages (producer → worker) and result events (worker → aggregator).
//!
//! Both are JSON objects with a schema version `"v": 1`; `schema/task.v1.json` and
//! `schema/result.v1.json` in the repository describe them. Unknown fields are rejected so
//! that a typo in a manifest is an error rather than a silently ignored option.

use serde::{Deserialize, Serialize};

use crate::crops::CropBox;
use crate::error::TaskError;

/// The task schema version this build reads and writes.
pub const TASK_VERSION: u64 = 1;
/// The result-event schema version this build reads and writes.
pub const RESULT_VERSION: u64 = 1;
/// Longest accepted task id.
pub const MAX_ID_LEN: usize = 128;

/// Where a task's crop boxes come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CropsSpec {
    /// Boxes listed in the message itself.
    Inline(Vec<CropBox>),
    /// A CSV object (`x,y,w,h` header, one box per row) at this URI or path.
    Uri(String),
}

pub use crate::engine::{CropMode, PixelPath};

/// One unit of work: cut every box of `crops` out of `image`, store them under `output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Schema version, always [`TASK_VERSION`].
    pub v: u64,
    /// Unique id; names the output folder `{output}/{id}/`. `[A-Za-z0-9._-]`, at most 128 chars.
    pub id: String,
    /// The run (fleet configuration) this task belongs to, for the aggregator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Source image: a path, `file://`, `gs://bucket/key` or `http(s)://` URI.
    pub image: String,
    /// Boxes inline, or a CSV URI.
    pub crops: CropsSpec,
    /// Output prefix: a path, `file://` or `gs://bucket/prefix`.
    pub output: String,
    /// JPEG quality 1–100 for this task; the worker's `--quality` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// Crop mode for this task; the worker's `--crop-mode` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_mode: Option<CropMode>,
    /// Decode mode's pixel path for this task; the worker's `--pixel-path` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_path: Option<PixelPath>,
    /// When the producer enqueued the task (Unix epoch, milliseconds), for queue-wait latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_ms: Option<u64>,
}

impl Task {
    /// Parse and validate a task message. Every failure is permanent (bad input).
    pub fn parse(bytes: &[u8]) -> Result<Task, TaskError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| TaskError::MalformedTask(format!("not JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| TaskError::MalformedTask("not a JSON object".into()))?;
        match obj.get("v") {
            None => return Err(TaskError::MalformedTask("missing field `v` (schema version)".into())),
            Some(v) => match v.as_u64() {
                Some(TASK_VERSION) => {}
                Some(found) => return Err(TaskError::UnsupportedVersion { found, supported: TASK_VERSION }),
                None => return Err(TaskError::MalformedTask(format!("field `v` must be an integer, got {v}"))),
            },
        }
        let task: Task = serde_json::from_value(value).map_err(|e| TaskError::MalformedTask(e.to_string()))?;
        task.validate()?;
        Ok(task)
    }

    /// Check ids, prefixes and quality; see [`validate_id`] and [`validate_output`].
    pub fn validate(&self) -> Result<(), TaskError> {
        validate_id(&self.id)?;
        if let Some(run) = &self.run_id {
            validate_id(run).map_err(|e| match e {
                TaskError::InvalidField { reason, .. } => TaskError::InvalidField { field: "run_id", reason },
                other => other,
            })?;
        }
        if self.image.trim().is_empty() {
            return Err(TaskError::InvalidField { field: "image", reason: "is empty".into() });
        }
        validate_output(&self.output)?;
        if let Some(q) = self.quality {
            if !(1..=100).contains(&q) {
                return Err(TaskError::InvalidField { field: "quality", reason: format!("{q} is not in 1..=100") });
            }
        }
        if let CropsSpec::Uri(u) = &self.crops {
            if u.trim().is_empty() {
                return Err(TaskError::InvalidField { field: "crops", reason: "is an empty URI".into() });
            }
        }
        Ok(())
    }

    /// Serialize to the wire form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("task serializes")
    }
}

/// Task ids name folders, so they must be one safe path segment.
pub fn validate_id(id: &str) -> Result<(), TaskError> {
    let bad = |reason: String| Err(TaskError::InvalidField { field: "id", reason });
    if id.is_empty() {
        return bad("is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return bad(format!("is {} characters long, over {MAX_ID_LEN}", id.len()));
    }
    if id.starts_with('.') {
        return bad(format!("{id:?} starts with '.'"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(format!("{id:?} contains {c:?}; only A-Z a-z 0-9 . _ - are allowed"));
    }
    Ok(())
}

/// Output prefixes may not climb out of themselves with `..` segments or carry NUL bytes.
/// The check runs on the prefix as [`Location::parse`](crate::storage::Location::parse) reads
/// it, surrounding whitespace trimmed: `" .."` is the parent folder too (found by
/// `tests/fuzz.rs`).
pub fn validate_output(output: &str) -> Result<(), TaskError> {
    let bad = |reason: String| Err(TaskError::InvalidField { field: "output", reason });
    if output.trim().is_empty() {
        return bad("is empty".into());
    }
    if output.contains('\0') {
        return bad("contains a NUL byte".into());
    }
    let trimmed = output.trim();
    let path = trimmed.split_once("://").map(|(_, rest)| rest).unwrap_or(trimmed);
    if path.split(['/', '\\']).any(|seg| seg == "..") {
        return bad(format!("{:?} contains a '..' segment", crate::secret::redact(output)));
    }
    Ok(())
}

/// Durations of each stage of one task, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    /// From enqueue to the worker starting the task (0 when the producer gave no timestamp).
    pub queue_wait: f64,
    /// Reading the source image and crop list.
    pub download: f64,
    /// Decoding (and orienting) the source.
    pub decode: f64,
    /// Cutting and encoding every crop (wall time on the CPU pool).
    pub crop_encode: f64,
    /// From the first crop ready to the last crop stored.
    pub upload: f64,
    /// From the worker starting the task to the result being ready to publish.
    pub total: f64,
}

/// What a worker publishes once every crop of a task is stored, before it acks the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    /// Schema version, always [`RESULT_VERSION`].
    pub v: u64,
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Worker identity (`hostname:pid`).
    pub worker: String,
    /// Delivery attempt that succeeded (1 = first).
    pub attempt: u32,
    /// Number of crops stored.
    pub crops: u32,
    /// Total encoded bytes stored.
    pub bytes: u64,
    /// Where the crops are: `{output}/{task_id}`.
    pub output: String,
    /// How the crops were made (`decode` or `lossless`).
    pub mode: CropMode,
    /// Why a task that asked for `lossless` was decoded instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Decode mode: the pixel path that ran (`planar` or `rgb`); absent for lossless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_path: Option<PixelPath>,
    /// Why a task that asked for the planar path took the rgb path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_fallback: Option<String>,
    /// Lossless mode: the boxes actually written (snapped outward to the iMCU grid), in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_boxes: Option<Vec<CropBox>>,
    /// Source image size as displayed (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    /// Unix epoch milliseconds when the worker started and finished the task.
    pub started_ms: u64,
    pub finished_ms: u64,
    pub stages_ms: StageTimes,
    /// CPU threads and upload concurrency of the worker, for grouping results by configuration.
    pub threads: u32,
    pub upload_concurrency: u32,
}

impl ResultEvent {
    /// Parse a result event, rejecting unknown versions.
    pub fn parse(bytes: &[u8]) -> Result<ResultEvent, TaskError> {
        let ev: ResultEvent = serde_json::from_slice(bytes).map_err(|e| TaskError::MalformedTask(e.to_string()))?;
        if ev.v != RESULT_VERSION {
            return Err(TaskError::UnsupportedVersion { found: ev.v, supported: RESULT_VERSION });
        }
        Ok(ev)
    }

    /// Serialize to the wire form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("result serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> serde_json::Value {
        serde_json::json!({"v":1,"id":"t-1","image":"/img.jpg","crops":[{"x":0,"y":0,"w":10,"h":10}],"output":"/out"})
    }

    #[test]
    fn parses_inline_and_uri_crops() {
        let t = Task::parse(good().to_string().as_bytes()).unwrap();
        assert_eq!(t.crops, CropsSpec::Inline(vec![CropBox { x: 0, y: 0, w: 10, h: 10 }]));
        let mut v = good();
        v["crops"] = "gs://b/crops.csv".into();
        let t = Task::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(t.crops, CropsSpec::Uri("gs://b/crops.csv".into()));
        assert_eq!(Task::parse(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn rejects_bad_messages_with_reasons() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "not JSON"),
            (b"[1,2]".to_vec(), "not a JSON object"),
            (br#"{"id":"x"}"#.to_vec(), "missing field `v`"),
            (br#"{"v":2,"id":"x"}"#.to_vec(), "unsupported task schema version 2"),
            (br#"{"v":"1"}"#.to_vec(), "must be an integer"),
        ];
        for (msg, want) in cases {
            let err = Task::parse(&msg).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        let mut v = good();
        v["extra"] = 1.into();
        assert!(Task::parse(v.to_string().as_bytes()).unwrap_err().to_string().contains("unknown field `extra`"));
        let mut v = good();
        v["id"] = 7.into();
        assert!(Task::parse(v.to_string().as_bytes()).is_err());
        let mut v = good();
        v.as_object_mut().unwrap().remove("output");
        assert!(Task::parse(v.to_string().as_bytes()).unwrap_err().to_string().contains("missing field `output`"));
    }

    #[test]
    fn rejects_escaping_ids_and_outputs() {
        for id in ["..", "../x", "a/b", "", ".hidden", "a b", &"x".repeat(200)] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        validate_id("run-2026.11_25-000001").unwrap();
        for out in ["../up", "/data/../etc", "gs://b/../x", "a\\..\\b", "", "x\0y", " ..", "..\n", "\u{a0}../x"] {
            assert!(validate_output(out).is_err(), "{out:?}");
        }
        validate_output("/data/out").unwrap();
        validate_output("gs://bucket/crops/run1").unwrap();
        let mut v = good();
        v["quality"] = 0.into();
        assert!(Task::parse(v.to_string().as_bytes()).unwrap_err().to_string().contains("quality"));
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    fn schema(name: &str) -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema").join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn task_schema_matches_the_struct() {
        let s = schema("task.v1.json");
        let full = Task {
            v: 1,
            id: "a".into(),
            run_id: Some("r".into()),
            image: "i".into(),
            crops: CropsSpec::Uri("c".into()),
            output: "o".into(),
            quality: Some(80),
            crop_mode: Some(CropMode::Decode),
            pixel_path: Some(PixelPath::Rgb),
            enqueued_ms: Some(1),
        };
        assert_eq!(keys(&serde_json::to_value(&full).unwrap()), keys(&s["properties"]));
        let mut required: Vec<String> =
            s["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        required.sort();
        let minimal =
            Task { run_id: None, quality: None, crop_mode: None, pixel_path: None, enqueued_ms: None, ..full };
        assert_eq!(keys(&serde_json::to_value(&minimal).unwrap()), required);
    }

    #[test]
    fn result_schema_matches_the_struct() {
        let s = schema("result.v1.json");
        let ev = ResultEvent {
            v: 1,
            task_id: "t".into(),
            run_id: Some("r".into()),
            worker: "w".into(),
            attempt: 1,
            crops: 1,
            bytes: 1,
            output: "o".into(),
            mode: CropMode::Lossless,
            fallback: Some("f".into()),
            pixel_path: Some(PixelPath::Planar),
            pixel_fallback: Some("p".into()),
            written_boxes: Some(vec![CropBox { x: 0, y: 0, w: 1, h: 1 }]),
            width: 1,
            height: 1,
            started_ms: 1,
            finished_ms: 2,
            stages_ms: StageTimes::default(),
            threads: 1,
            upload_concurrency: 1,
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(keys(&v), keys(&s["properties"]));
        assert_eq!(keys(&v["stages_ms"]), keys(&s["properties"]["stages_ms"]["properties"]));
    }
}
