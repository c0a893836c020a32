//! Raw change events of the outbox table (the `change-event` format): Debezium's own envelope at the top level,
//! the row in `after`, the payload column a JSON string inside it. The top level is Debezium's, so it may be read
//! to tell a change event from a heartbeat or a transaction marker of the same connector; the payload column is
//! only ever parsed, never looked into.

use std::borrow::Cow;

use rdkafka::message::Message;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::json::{JsonText, field_schema_name, unwrap_schema};
use super::time::{created_at, timestamp_from_str};
use super::{
    DecodeError, Decoded, Format, SkipReason, coordinates, mismatch, parse_payload, validate_uuid,
};
use crate::event::OutboxEvent;

/// Decodes a record of a topic that carries raw change events. `declared` names the format in errors.
pub(super) fn decode<M: Message>(
    text: &str,
    msg: &M,
    declared: Format,
) -> Result<Decoded, DecodeError> {
    if let Some(skip) = struct_text(text)? {
        return Ok(Decoded::Skip(skip));
    }
    if let Some(decoded) = decode_fast(text, msg) {
        return Ok(decoded);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let (value, schema) = unwrap_schema(value);
    let Value::Object(obj) = &value else {
        return Err(mismatch(declared, msg, Some(&value)));
    };
    if obj.contains_key("op") {
        return decode_envelope(obj, schema.as_ref(), msg);
    }
    if is_heartbeat(obj) {
        return Ok(Decoded::Skip(SkipReason::Heartbeat));
    }
    if is_transaction_metadata(obj) {
        return Ok(Decoded::Skip(SkipReason::TransactionMetadata));
    }
    Err(mismatch(declared, msg, Some(&value)))
}

/// The shape nearly every record has, a raw change event without the schema wrapper, read into borrowed fields
/// without building a JSON tree of the whole record (that tree was most of a record's cost). `None` when the
/// record is anything else or anything in it is off: the general path then decodes it, or words the error. For
/// every record it accepts, it gives what the general path gives (the fixture tests compare the two).
fn decode_fast<M: Message>(text: &str, msg: &M) -> Option<Decoded> {
    #[derive(Deserialize)]
    struct Change<'a> {
        #[serde(borrow)]
        op: Cow<'a, str>,
        #[serde(borrow, default)]
        after: Option<Row<'a>>,
    }
    #[derive(Deserialize)]
    struct Row<'a> {
        #[serde(borrow)]
        event_id: Cow<'a, str>,
        #[serde(borrow)]
        aggregate_id: Cow<'a, str>,
        #[serde(borrow, default)]
        aggregate_type: Option<Cow<'a, str>>,
        #[serde(borrow)]
        event_type: Cow<'a, str>,
        #[serde(default)]
        payload: Option<JsonText>,
        #[serde(borrow, default)]
        created_at: Option<Cow<'a, str>>,
    }
    let change: Change<'_> = serde_json::from_str(text).ok()?;
    if let Some(reason) = op_skip(&change.op).ok()? {
        return Some(Decoded::Skip(reason));
    }
    let row = change.after?;
    if row.event_id.is_empty() || row.aggregate_id.is_empty() || row.event_type.is_empty() {
        return None;
    }
    validate_uuid("event_id", &row.event_id).ok()?;
    let payload = row.payload.map_or(Value::Null, |p| p.0);
    let created_at_ms = match row.created_at {
        None => None,
        Some(t) => Some(timestamp_from_str(&t, None).ok()?),
    };
    Some(Decoded::Event(Box::new(OutboxEvent {
        event_id: row.event_id.into_owned(),
        aggregate_id: row.aggregate_id.into_owned(),
        aggregate_type: row.aggregate_type.map(Cow::into_owned),
        event_type: row.event_type.into_owned(),
        payload,
        created_at_ms,
        source: coordinates(msg),
    })))
}

/// With StringConverter, raw change events arrive as Kafka Connect's `Struct{...}` text (the logical messages and
/// updates an Event Router deployment passes through, say). Those that are not events are skipped; an insert in
/// that form cannot be read faithfully, so it is an error that names the fix.
fn struct_text(text: &str) -> Result<Option<SkipReason>, DecodeError> {
    if !text.starts_with("Struct{") {
        return Ok(None);
    }
    let op = text
        .split([',', '{'])
        .find_map(|part| part.strip_prefix("op="))
        .unwrap_or("");
    match op_skip(op) {
        Ok(Some(reason)) => Ok(Some(reason)),
        // An insert (or an unknown operation) in this form cannot be read faithfully.
        _ => Err(DecodeError::UnknownShape(
            "Kafka Connect Struct text (StringConverter on raw change events); use JsonConverter"
                .to_string(),
        )),
    }
}

/// A heartbeat (`{"ts_ms": ...}`) that reached a change-event topic: on its own topic it is skipped by name.
fn is_heartbeat(obj: &Map<String, Value>) -> bool {
    obj.len() == 1 && obj.get("ts_ms").is_some_and(Value::is_i64)
}

fn is_transaction_metadata(obj: &Map<String, Value>) -> bool {
    matches!(
        obj.get("status").and_then(Value::as_str),
        Some("BEGIN" | "END")
    ) && obj.contains_key("id")
        && obj.contains_key("event_count")
}

/// What a Debezium operation code means for the outbox: `c` and `r` are new events, the rest are skipped.
fn op_skip(op: &str) -> Result<Option<SkipReason>, ()> {
    match op {
        "c" | "r" => Ok(None),
        "u" => Ok(Some(SkipReason::Update)),
        "d" => Ok(Some(SkipReason::Delete)),
        "t" => Ok(Some(SkipReason::Truncate)),
        "m" => Ok(Some(SkipReason::LogicalMessage)),
        _ => Err(()),
    }
}

fn decode_envelope<M: Message>(
    obj: &Map<String, Value>,
    schema: Option<&Value>,
    msg: &M,
) -> Result<Decoded, DecodeError> {
    let op = obj
        .get("op")
        .and_then(Value::as_str)
        .ok_or(DecodeError::BadField {
            field: "op",
            expected: "string",
        })?;
    match op_skip(op) {
        Ok(None) => {}
        Ok(Some(reason)) => return Ok(Decoded::Skip(reason)),
        Err(()) => return Err(DecodeError::UnknownOp(op.to_string())),
    }
    let Some(Value::Object(row)) = obj.get("after") else {
        return Err(DecodeError::BadField {
            field: "after",
            expected: "object",
        });
    };
    let event_id = required_str(row, "event_id")?;
    validate_uuid("event_id", event_id)?;
    let aggregate_id = required_str(row, "aggregate_id")?;
    let event_type = required_str(row, "event_type")?;
    let payload = parse_payload(row.get("payload").cloned().unwrap_or(Value::Null))?;
    let created_at_ms = created_at(
        row.get("created_at"),
        field_schema_name(schema, &["after", "created_at"]),
    )?;
    Ok(Decoded::Event(Box::new(OutboxEvent {
        event_id: event_id.to_string(),
        aggregate_id: aggregate_id.to_string(),
        aggregate_type: row
            .get("aggregate_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        event_type: event_type.to_string(),
        payload,
        created_at_ms,
        source: coordinates(msg),
    })))
}

fn required_str<'a>(
    row: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    match row.get(field).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(DecodeError::BadField {
            field,
            expected: "non-empty string",
        }),
    }
}

/// The event id and type of a change event that cannot be decoded, where its row has them: for the dead letter.
pub(super) fn identity(value: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(Value::Object(obj)) = value
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .map(|v| unwrap_schema(v).0)
    else {
        return (None, None);
    };
    let Some(Value::Object(row)) = obj.get("after") else {
        return (None, None);
    };
    let text = |name: &str| {
        row.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    (text("event_id"), text("event_type"))
}
