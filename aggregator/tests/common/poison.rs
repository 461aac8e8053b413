//! Bad input for end-to-end tests: every kind of poison message a worker must dead-letter with
//! a clear reason (and survive), built against a given valid source, crop list and output.
#![allow(dead_code)]

/// A PNG that is only a signature and an IHDR chunk declaring `w`×`h` pixels (a decompression
/// bomb as far as the header goes).
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&[0, 0, 0, 0]);
    png
}

/// One poison message: what it is, its exact bytes, and a phrase its dead-letter reason must hold.
#[derive(Debug, Clone)]
pub struct Poison {
    pub kind: &'static str,
    pub payload: Vec<u8>,
    pub reason: &'static str,
}

/// Where poison messages point and what they may upload.
pub struct PoisonInputs<'a> {
    /// A valid source image URI (an 800x600 JPEG) and its bytes.
    pub image: &'a str,
    pub image_bytes: &'a [u8],
    /// A valid crops CSV URI.
    pub crops: &'a str,
    /// The output prefix valid tasks use.
    pub output: &'a str,
    /// A source URI where nothing exists.
    pub missing: &'a str,
    /// The worker's `--max-crops`.
    pub max_crops: usize,
    /// Store a source object named `name` next to the valid ones; returns its URI.
    pub put: &'a mut dyn FnMut(&str, Vec<u8>) -> String,
    /// A prefix making poison task ids unique to the run.
    pub tag: &'a str,
}

/// Every kind of bad input: malformed JSON; missing, extra and ill-typed fields; an unknown
/// schema version; a missing source, an empty file, a truncated JPEG, a file that is not an
/// image, a PNG declaring 30000x30000; crop CSVs with no header, a non-numeric row, negative and
/// zero sizes, a box past the edge; more crops than the limit; ids and outputs that try to escape;
/// an http source on a loopback address.
pub fn all(p: PoisonInputs<'_>) -> Vec<Poison> {
    let PoisonInputs { image, image_bytes, crops, output, missing, max_crops, put, tag } = p;
    let task = |id: &str, image: &str, crops: serde_json::Value, output: &str| serde_json::json!({"v": 1, "id": format!("{tag}-{id}"), "image": image, "crops": crops, "output": output});
    let csv = serde_json::Value::from(crops);
    let mut v = Vec::new();
    let mut add = |kind: &'static str, payload: Vec<u8>, reason: &'static str| v.push(Poison { kind, payload, reason });
    add("malformed JSON", format!("{{\"v\": 1, \"id\": \"{tag}-broken\"").into_bytes(), "not JSON");
    let mut no_output = task("missing", image, csv.clone(), output);
    no_output.as_object_mut().unwrap().remove("output");
    add("missing field", no_output.to_string().into(), "missing field `output`");
    let mut extra = task("extra", image, csv.clone(), output);
    extra["priority"] = "high".into();
    add("extra field", extra.to_string().into(), "unknown field `priority`");
    let mut typed = task("typed", image, csv.clone(), output);
    typed["quality"] = "best".into();
    add("ill-typed field", typed.to_string().into(), "invalid type");
    let mut future = task("future", image, csv.clone(), output);
    future["v"] = 9.into();
    add("unknown schema version", future.to_string().into(), "unsupported task schema version 9");
    add("missing source", task("nosource", missing, csv.clone(), output).to_string().into(), "not found");
    let empty = put("empty.jpg", Vec::new());
    add("empty file", task("empty", &empty, csv.clone(), output).to_string().into(), "the source is empty");
    let truncated = put("truncated.jpg", image_bytes[..image_bytes.len() / 3].to_vec());
    add(
        "truncated JPEG",
        task("truncated", &truncated, csv.clone(), output).to_string().into(),
        "corrupt or truncated JPEG",
    );
    let text = put("notes.jpg", b"these are not the pixels you are looking for\n".to_vec());
    add("not an image", task("notimage", &text, csv.clone(), output).to_string().into(), "not a JPEG, PNG or WebP");
    let bomb = put("bomb.png", png_header(30000, 30000));
    add("30000x30000 PNG", task("bomb", &bomb, csv.clone(), output).to_string().into(), "30000x30000");
    for (kind, name, body, reason) in [
        ("CSV without header", "noheader.csv", "10,10,50,50\n", "has no column `x`"),
        ("CSV non-numeric row", "nonnumeric.csv", "x,y,w,h\n10,ten,50,50\n", "is not an integer"),
        ("CSV negative size", "negative.csv", "x,y,w,h\n10,10,-50,50\n", "zero or negative size"),
        ("CSV zero size", "zero.csv", "x,y,w,h\n10,10,50,0\n", "zero or negative size"),
        ("CSV box past the edge", "edge.csv", "x,y,w,h\n700,500,200,50\n", "outside the 800x600 image"),
    ] {
        let uri = put(name, body.as_bytes().to_vec());
        let id = name.trim_end_matches(".csv");
        add(kind, task(id, image, uri.into(), output).to_string().into(), reason);
    }
    let many: Vec<serde_json::Value> =
        (0..=max_crops).map(|i| serde_json::json!({"x": i % 700, "y": 0, "w": 10, "h": 10})).collect();
    add("too many crops", task("toomany", image, many.into(), output).to_string().into(), "too many crops");
    let escape = format!("{}/../escaped", output.trim_end_matches('/'));
    add("output with ..", task("dotdot", image, csv.clone(), &escape).to_string().into(), "contains a '..' segment");
    let mut up = task("x", image, csv.clone(), output);
    up["id"] = "../../escaped".into();
    add("task id with ..", up.to_string().into(), "invalid task id");
    let mut abs = task("x", image, csv.clone(), output);
    abs["id"] = "/etc/cropfleet-escaped".into();
    add("absolute task id", abs.to_string().into(), "invalid task id");
    add(
        "http source on loopback",
        task("loopback", "http://127.0.0.1:9/redirect?to=http://169.254.169.254/", csv, output).to_string().into(),
        "source refused",
    );
    v
}
