//! The `amqp://` and `amqps://` URI: the broker URL handed to lapin, the queue name, and the URI
//! of a related queue. TLS parameters are checked here and applied at connect (`tls.rs`). Errors
//! and logs show URIs through [`redact`] only.

use super::MAX_NAME;
use crate::queue::QueueError;
pub use crate::secret::redact;

/// Split an `amqp(s)://…?queue=NAME&…` URI into the broker URL (without `queue`, other query
/// parameters such as `heartbeat` or `cacertfile` kept) and the queue name. For `amqps://` the
/// TLS parameters (`cacertfile`, `certfile`, `keyfile`, `server_name_indication`, `verify`) are
/// checked here; their files are read at connect.
pub fn parse_uri(uri: &str) -> Result<(String, String), QueueError> {
    let bad = |reason: String| QueueError::InvalidUri { uri: redact(uri), reason };
    if !uri.starts_with("amqp://") && !uri.starts_with("amqps://") {
        return Err(bad("expected amqp://user:pass@host:port/vhost?queue=NAME or amqps://… (TLS)".into()));
    }
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut queue: Option<String> = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("queue", v)) => {
                if queue.is_some() {
                    return Err(bad("`queue` is given twice".into()));
                }
                queue = Some(percent_decode(v).map_err(|e| bad(format!("queue name: {e}")))?);
            }
            _ => rest.push(pair),
        }
    }
    let example = "add ?queue=NAME, e.g. amqp://guest:guest@127.0.0.1:5672/%2f?queue=crops";
    let queue = match queue {
        None => return Err(bad(format!("missing the queue name: {example}"))),
        Some(q) if q.is_empty() => return Err(bad(format!("empty queue name: {example}"))),
        Some(q) => q,
    };
    if queue.len() > MAX_NAME {
        return Err(bad(format!("queue name longer than {MAX_NAME} bytes")));
    }
    if queue.starts_with("amq.") {
        return Err(bad("queue names starting with `amq.` are reserved by RabbitMQ".into()));
    }
    if queue.chars().any(char::is_control) {
        return Err(bad("queue name contains control characters".into()));
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    let (lapin_url, _) = super::tls::split(&url).map_err(bad)?;
    lapin_url.parse::<lapin::uri::AMQPUri>().map_err(|e| bad(format!("broker URL: {e}")))?;
    Ok((url, queue))
}

/// The same broker URI with another queue name (other parameters kept): how a tool derives
/// related queues, e.g. `…?queue=crops` → `…?queue=crops.p2t4`.
pub fn uri_with_queue(uri: &str, queue: &str) -> Result<String, QueueError> {
    let (url, _) = parse_uri(uri)?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let encoded: String = queue
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let out = format!("{url}{sep}queue={encoded}");
    parse_uri(&out)?;
    Ok(out)
}

pub(super) fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after %-decoding".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_uris() {
        let (url, q) = parse_uri("amqp://guest:guest@127.0.0.1:5672/%2f?queue=crops").unwrap();
        assert_eq!((url.as_str(), q.as_str()), ("amqp://guest:guest@127.0.0.1:5672/%2f", "crops"));
        let (url, q) = parse_uri("amqp://u:p@h:5672/v?heartbeat=10&queue=a%2Eb&frame_max=8192").unwrap();
        assert_eq!((url.as_str(), q.as_str()), ("amqp://u:p@h:5672/v?heartbeat=10&frame_max=8192", "a.b"));
        let e = parse_uri("amqp://u:secret@h/%2f").unwrap_err().to_string();
        assert!(e.contains("missing the queue name") && !e.contains("secret"), "{e}");
        assert!(parse_uri("amqp://h/%2f?queue=").unwrap_err().to_string().contains("empty queue name"));
        assert!(parse_uri("amqp://h/%2f?queue=a&queue=b").is_err());
        assert!(parse_uri("amqp://h/%2f?queue=amq.x").unwrap_err().to_string().contains("reserved"));
        assert!(parse_uri(&format!("amqp://h/%2f?queue={}", "x".repeat(201))).is_err());
        let (url, q) = parse_uri("amqps://u:p@h:5671/%2f?queue=a&cacertfile=/ca.pem").unwrap();
        assert_eq!((url.as_str(), q.as_str()), ("amqps://u:p@h:5671/%2f?cacertfile=/ca.pem", "a"));
        let e = parse_uri("amqp://u:secret@h/%2f?queue=a&cacertfile=/ca.pem").unwrap_err().to_string();
        assert!(e.contains("use amqps://") && !e.contains("secret"), "{e}");
        assert!(parse_uri("http://h/%2f?queue=a").unwrap_err().to_string().contains("amqps://"));
        assert!(parse_uri("amqp://h:notaport/%2f?queue=a").is_err());
        let u = uri_with_queue("amqp://u:p@h/%2f?queue=crops&heartbeat=5", "crops.p2t4 x").unwrap();
        assert_eq!(u, "amqp://u:p@h/%2f?heartbeat=5&queue=crops.p2t4%20x");
        assert_eq!(parse_uri(&u).unwrap().1, "crops.p2t4 x");
    }
}
