//! Message headers: the attempt number, the dead-letter reason, and the properties of the copies
//! that retries, releases and dead letters publish (see "Attempts" in [`super`]).

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use super::publish::new_props;
use super::topology::str_arg;
use super::{ATTEMPT_HEADER, REASON_HEADER};

/// Reasons and errors stored in headers are cut to this many bytes.
pub(super) const MAX_HEADER_TEXT: usize = 4000;

pub(super) fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

pub(super) fn value_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The attempt header as a number (any integer type, or a numeric string).
pub(super) fn header_attempt(props: &BasicProperties) -> Option<u32> {
    let n: i64 = match header(props, ATTEMPT_HEADER)? {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        other => value_string(other)?.trim().parse().ok()?,
    };
    u32::try_from(n).ok().filter(|&n| n >= 1)
}

/// Why a message is in `NAME.dead`: our header, else what the broker's `x-death` says.
pub(super) fn dead_reason(props: &BasicProperties) -> String {
    if let Some(r) = header(props, REASON_HEADER).and_then(value_string) {
        return r;
    }
    let first = |k: &str| header(props, k).and_then(value_string);
    match (first("x-first-death-reason"), first("x-first-death-queue")) {
        (Some(reason), queue) => {
            let queue = queue.map(|q| format!(" from queue '{q}'")).unwrap_or_default();
            let what = match reason.as_str() {
                "rejected" => "rejected by a consumer without requeue",
                "expired" => "its TTL expired",
                "maxlen" => "the queue's length limit was reached",
                "delivery_limit" => "the delivery limit was reached",
                other => other,
            };
            format!("dead-lettered by the broker{queue}: {what}")
        }
        (None, _) => "no reason recorded".into(),
    }
}

pub(super) fn cut(s: &str) -> String {
    if s.len() <= MAX_HEADER_TEXT {
        return s.to_string();
    }
    let mut end = MAX_HEADER_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Headers for a copy: the original's minus the broker's death bookkeeping, with `attempt` and
/// the given extras.
pub(super) fn copy_headers(props: &BasicProperties, attempt: u32, extra: &[(&str, &str)]) -> FieldTable {
    let mut h: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .filter(|(k, _)| {
                    let k = k.as_str();
                    k != "x-death" && !k.starts_with("x-first-death-") && !k.starts_with("x-last-death-")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(attempt.min(i32::MAX as u32) as i32));
    for (k, v) in extra {
        h.insert((*k).into(), str_arg(&cut(v)));
    }
    FieldTable::from(h)
}

/// Properties for a copy of a delivery: persistent, same message id and content metadata,
/// no expiration or user id.
pub(super) fn copy_props(props: &BasicProperties, id: &str, headers: FieldTable) -> BasicProperties {
    let mut p = new_props(id, Some(headers));
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_header_and_copies() {
        let p = BasicProperties::default();
        assert_eq!(header_attempt(&p), None);
        let mut h = FieldTable::default();
        h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(3));
        h.insert("x-death".into(), AMQPValue::FieldArray(vec![].into()));
        h.insert("x-first-death-reason".into(), str_arg("expired"));
        h.insert("tenant".into(), str_arg("t1"));
        let p = BasicProperties::default().with_headers(h).with_content_type("application/json".into());
        assert_eq!(header_attempt(&p), Some(3));
        let c = copy_props(&p, "id1", copy_headers(&p, 4, &[(REASON_HEADER, "bad input")]));
        assert_eq!(header_attempt(&c), Some(4));
        assert_eq!(dead_reason(&c), "bad input");
        let keys: Vec<&str> = c.headers().as_ref().unwrap().inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, vec!["tenant", ATTEMPT_HEADER, REASON_HEADER]);
        assert_eq!(c.delivery_mode(), &Some(2));
        assert_eq!(c.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        assert!(dead_reason(&p).contains("TTL expired"), "{}", dead_reason(&p));
    }
}
