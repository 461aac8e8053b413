//! Crop boxes: parsing the CSV crop list (the original study's format), inline lists, and
//! validation against the image they are cut from.

use serde::{Deserialize, Serialize};

use crate::engine::EngineError;

/// Default limit on crops per task.
pub const DEFAULT_MAX_CROPS: usize = 1000;

/// A box in pixels, top-left origin, in the image as displayed (after EXIF orientation).
/// Fields are signed so that a negative value is reported as such rather than as a parse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropBox {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

impl std::fmt::Display for CropBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(x={}, y={}, w={}, h={})", self.x, self.y, self.w, self.h)
    }
}

impl CropBox {
    /// Check that the box has a positive size and lies inside a `width`×`height` image.
    pub fn check(&self, index: usize, width: u32, height: u32) -> Result<(), EngineError> {
        let bad = |reason: String| Err(EngineError::BadBox { index, boxed: self.to_string(), reason });
        if self.w <= 0 || self.h <= 0 {
            return bad("has zero or negative size".into());
        }
        if self.x < 0 || self.y < 0 {
            return bad("starts at a negative coordinate".into());
        }
        let (right, bottom) = (self.x.saturating_add(self.w), self.y.saturating_add(self.h));
        if right > width as i64 || bottom > height as i64 {
            return bad(format!("reaches ({right}, {bottom}), outside the {width}x{height} image"));
        }
        Ok(())
    }
}

/// Check every box and the count; the error names the first bad box.
pub fn validate(boxes: &[CropBox], width: u32, height: u32, max_crops: usize) -> Result<(), EngineError> {
    check_count(boxes.len(), max_crops)?;
    boxes.iter().enumerate().try_for_each(|(i, b)| b.check(i, width, height))
}

/// An empty list or more than `max_crops` boxes is an error.
pub fn check_count(count: usize, max_crops: usize) -> Result<(), EngineError> {
    if count == 0 {
        return Err(EngineError::InvalidCrops("the crop list is empty".into()));
    }
    if count > max_crops {
        return Err(EngineError::TooManyCrops { count, limit: max_crops });
    }
    Ok(())
}

/// Parse a CSV crop list: a header line naming the columns `x`, `y`, `w`, `h` (any order,
/// other columns ignored), then one integer row per box. Blank lines are skipped.
pub fn parse_csv(text: &str) -> Result<Vec<CropBox>, EngineError> {
    let bad = |msg: String| EngineError::InvalidCrops(msg);
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| bad("the CSV is empty (expected a header `x,y,w,h`)".into()))?;
    let names: Vec<String> =
        header.split(',').map(|c| c.trim().trim_start_matches('\u{feff}').to_ascii_lowercase()).collect();
    let col = |want: &str| {
        names.iter().position(|n| n == want).ok_or_else(|| {
            bad(format!("the header line {header:?} has no column `{want}` (expected a header such as `x,y,w,h`)"))
        })
    };
    let cols = [col("x")?, col("y")?, col("w")?, col("h")?];
    let mut boxes = Vec::new();
    for (lineno, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let mut v = [0i64; 4];
        for (slot, (&c, name)) in v.iter_mut().zip(cols.iter().zip(["x", "y", "w", "h"])) {
            let raw =
                fields.get(c).ok_or_else(|| bad(format!("line {}: {line:?} has no column `{name}`", lineno + 1)))?;
            *slot = raw
                .parse()
                .map_err(|_| bad(format!("line {}: {raw:?} in column `{name}` is not an integer", lineno + 1)))?;
        }
        boxes.push(CropBox { x: v[0], y: v[1], w: v[2], h: v[3] });
    }
    Ok(boxes)
}

/// Write boxes as the CSV format [`parse_csv`] reads.
pub fn to_csv(boxes: &[CropBox]) -> String {
    let mut s = String::from("x,y,w,h\n");
    for b in boxes {
        s.push_str(&format!("{},{},{},{}\n", b.x, b.y, b.w, b.h));
    }
    s
}

/// Parse the producer's inline form `x,y,w,h;x,y,w,h;…`. Returns `None` when `s` is not in
/// that form (then it is a URI).
pub fn parse_inline(s: &str) -> Option<Result<Vec<CropBox>, EngineError>> {
    let s = s.trim();
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit() || matches!(c, ',' | ';' | '-' | ' ')) {
        return None;
    }
    Some(
        s.split(';')
            .filter(|p| !p.trim().is_empty())
            .enumerate()
            .map(|(i, part)| {
                let v: Vec<i64> =
                    part.split(',').map(|f| f.trim().parse()).collect::<Result<_, _>>().map_err(|_| {
                        EngineError::InvalidCrops(format!("inline box #{i} {part:?} is not four integers x,y,w,h"))
                    })?;
                match v[..] {
                    [x, y, w, h] => Ok(CropBox { x, y, w, h }),
                    _ => Err(EngineError::InvalidCrops(format!(
                        "inline box #{i} {part:?} has {} values, not 4",
                        v.len()
                    ))),
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_any_order_and_extra_columns() {
        let b = parse_csv("\u{feff}x,y,w,h\n1,2,3,4\n\n5, 6 ,7,8\n").unwrap();
        assert_eq!(b, vec![CropBox { x: 1, y: 2, w: 3, h: 4 }, CropBox { x: 5, y: 6, w: 7, h: 8 }]);
        let b = parse_csv("label,h,w,y,x\ncat,4,3,2,1\n").unwrap();
        assert_eq!(b, vec![CropBox { x: 1, y: 2, w: 3, h: 4 }]);
        assert_eq!(parse_csv(&to_csv(&b)).unwrap(), b);
    }

    #[test]
    fn csv_errors_name_the_line_and_column() {
        let e = parse_csv("1,2,3,4\n").unwrap_err().to_string();
        assert!(e.contains("no column `x`"), "{e}");
        let e = parse_csv("x,y,w,h\n1,2,three,4\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("column `w`"), "{e}");
        let e = parse_csv("x,y,w,h\n1,2,3\n").unwrap_err().to_string();
        assert!(e.contains("no column `h`"), "{e}");
        assert!(parse_csv("").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn boxes_are_checked_against_the_image() {
        let ok = CropBox { x: 0, y: 0, w: 100, h: 50 };
        ok.check(0, 100, 50).unwrap();
        let cases = [
            (CropBox { x: 0, y: 0, w: 0, h: 5 }, "zero or negative size"),
            (CropBox { x: 0, y: 0, w: 5, h: -1 }, "zero or negative size"),
            (CropBox { x: -1, y: 0, w: 5, h: 5 }, "negative coordinate"),
            (CropBox { x: 96, y: 0, w: 5, h: 5 }, "outside the 100x50 image"),
            (CropBox { x: 0, y: i64::MAX, w: 5, h: i64::MAX }, "outside"),
        ];
        for (b, want) in cases {
            let e = b.check(3, 100, 50).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("crop #3"), "{e}");
        }
        assert!(validate(&[], 10, 10, 5).unwrap_err().to_string().contains("empty"));
        assert!(matches!(validate(&[ok; 6], 100, 50, 5), Err(EngineError::TooManyCrops { count: 6, limit: 5 })));
    }

    #[test]
    fn inline_form() {
        assert_eq!(parse_inline("1,2,3,4;5,6,7,8").unwrap().unwrap().len(), 2);
        assert!(parse_inline("crops.csv").is_none());
        assert!(parse_inline("gs://b/c.csv").is_none());
        assert!(parse_inline("1,2,3").unwrap().is_err());
    }
}
