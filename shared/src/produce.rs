//! Building tasks for the producer and the sweep: from a template repeated N times, or from
//! a JSONL manifest (one task object per line).

use crate::crops::{self, CropBox};
use crate::engine::EngineError;
use crate::error::TaskError;
use crate::task::{CropMode, CropsSpec, Task, TASK_VERSION};
use crate::util::now_ms;

/// A run id from the clock: `run-{unix_ms}` (unique per run, sortable).
pub fn new_run_id() -> String {
    format!("run-{}", now_ms())
}

/// Interpret the producer's `--crops` value: inline boxes (`x,y,w,h;…` or a JSON array) or a URI.
pub fn crops_spec(value: &str) -> Result<CropsSpec, TaskError> {
    let v = value.trim();
    if v.starts_with('[') {
        let boxes: Vec<CropBox> =
            serde_json::from_str(v).map_err(|e| EngineError::InvalidCrops(format!("inline JSON boxes: {e}")))?;
        return Ok(CropsSpec::Inline(boxes));
    }
    match crops::parse_inline(v) {
        Some(boxes) => Ok(CropsSpec::Inline(boxes?)),
        None => Ok(CropsSpec::Uri(v.to_string())),
    }
}

/// What every task of a repeated run shares.
#[derive(Debug, Clone)]
pub struct Template {
    pub image: String,
    pub crops: CropsSpec,
    pub output: String,
    pub quality: Option<u8>,
    /// Crop mode stamped on every task (`None`: the worker's default).
    pub crop_mode: Option<CropMode>,
    /// Pixel path stamped on every task (`None`: the worker's default).
    pub pixel_path: Option<crate::task::PixelPath>,
}

/// Task `index` of run `run_id`: id `{run_id}-{index:06}`.
pub fn task_from_template(t: &Template, run_id: &str, index: usize) -> Task {
    Task {
        v: TASK_VERSION,
        id: format!("{run_id}-{index:06}"),
        run_id: Some(run_id.to_string()),
        image: t.image.clone(),
        crops: t.crops.clone(),
        output: t.output.clone(),
        quality: t.quality,
        crop_mode: t.crop_mode,
        pixel_path: t.pixel_path,
        enqueued_ms: Some(now_ms()),
    }
}

/// Parse one manifest line (a task object). `v`, `id`, `run_id` and `enqueued_ms` are filled in
/// when absent (`id` = `{run_id}-{line:06}`); the result is validated like a queued task.
pub fn task_from_manifest_line(line: &str, run_id: &str, lineno: usize) -> Result<Task, TaskError> {
    let mut v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| TaskError::MalformedTask(format!("manifest line {lineno}: {e}")))?;
    let obj =
        v.as_object_mut().ok_or_else(|| TaskError::MalformedTask(format!("manifest line {lineno}: not an object")))?;
    obj.entry("v").or_insert(TASK_VERSION.into());
    obj.entry("id").or_insert(format!("{run_id}-{lineno:06}").into());
    obj.entry("run_id").or_insert(run_id.into());
    obj.entry("enqueued_ms").or_insert(now_ms().into());
    let bytes = serde_json::to_vec(&v).expect("json");
    Task::parse(&bytes).map_err(|e| match e {
        TaskError::MalformedTask(m) => TaskError::MalformedTask(format!("manifest line {lineno}: {m}")),
        other => TaskError::MalformedTask(format!("manifest line {lineno}: {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_value_forms() {
        assert!(matches!(crops_spec("1,2,3,4;5,6,7,8").unwrap(), CropsSpec::Inline(b) if b.len() == 2));
        assert!(matches!(crops_spec(r#"[{"x":1,"y":2,"w":3,"h":4}]"#).unwrap(), CropsSpec::Inline(b) if b.len() == 1));
        assert_eq!(crops_spec("data/crops.csv").unwrap(), CropsSpec::Uri("data/crops.csv".into()));
        assert!(crops_spec("1,2,3").is_err());
    }

    #[test]
    fn manifest_lines_get_defaults_and_validation() {
        let t = task_from_manifest_line(r#"{"image":"a.jpg","crops":"c.csv","output":"out"}"#, "r1", 3).unwrap();
        assert_eq!((t.id.as_str(), t.run_id.as_deref()), ("r1-000003", Some("r1")));
        let e = task_from_manifest_line(r#"{"image":"a.jpg","crops":"c.csv","output":"../x"}"#, "r1", 4).unwrap_err();
        assert!(e.to_string().contains("manifest line 4") && e.to_string().contains(".."), "{e}");
        assert!(task_from_manifest_line("nope", "r1", 5).unwrap_err().to_string().contains("line 5"));
    }
}
