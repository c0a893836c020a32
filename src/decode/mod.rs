//! Turns one Kafka record into an [`OutboxEvent`], a reason to skip it, or an error that says why it cannot be
//! read. Owns every Debezium record shape the daemon accepts (see docs/ARCHITECTURE.md); never touches the
//! network and never panics on input.
//!
//! Accepted shapes:
//! - raw change events (`{"before","after","op",...}`), bare or wrapped as `{"schema","payload"}`; `c` and `r`
//!   become events, `u`, `d`, `t`, `m` are skipped;
//! - Outbox Event Router output: the payload as a JSON string literal, schema-wrapped, as plain JSON text
//!   (StringConverter), expanded into an object, or inside an envelope next to placed fields; the event id comes
//!   from header `id` (or the envelope), the event type from header `eventType` (or the envelope);
//! - tombstones, heartbeats and transaction metadata are skipped.

use std::borrow::Cow;

use rdkafka::message::{Headers, Message};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::{KafkaCoordinates, OutboxEvent};

/// Why a record carries no event to dispatch. Skips are counted, never errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A null value: Debezium's tombstone after a delete.
    Tombstone,
    /// `op = u`: the application changed the row (e.g. `status`); the event was dispatched on insert.
    Update,
    /// `op = d`.
    Delete,
    /// `op = t`.
    Truncate,
    /// `op = m`: a logical decoding message.
    LogicalMessage,
    /// A Debezium heartbeat record.
    Heartbeat,
    /// A transaction BEGIN/END metadata record.
    TransactionMetadata,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Tombstone => "tombstone",
            SkipReason::Update => "update",
            SkipReason::Delete => "delete",
            SkipReason::Truncate => "truncate",
            SkipReason::LogicalMessage => "logical_message",
            SkipReason::Heartbeat => "heartbeat",
            SkipReason::TransactionMetadata => "transaction_metadata",
        }
    }
}

/// The result of decoding one record that could be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Event(Box<OutboxEvent>),
    Skip(SkipReason),
}

/// A record that cannot be decoded. Permanent: retrying cannot help, so it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record value is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    #[error("record value is not JSON: {0}")]
    NotJson(String),
    #[error("record value is not a Debezium change event or outbox record: {0}")]
    UnknownShape(String),
    #[error("field `{field}` is missing or not a {expected}")]
    BadField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field `payload` does not hold JSON: {0}")]
    PayloadNotJson(String),
    #[error("unknown Debezium operation `{0}`")]
    UnknownOp(String),
    #[error(
        "no event type: set table.fields.additional.placement=event_type:header:eventType on the Outbox Event Router"
    )]
    MissingEventType,
    #[error("no event id: the Outbox Event Router sets header `id`; it is missing")]
    MissingEventId,
    #[error("no aggregate id: the record has no key")]
    MissingAggregateId,
}

impl DecodeError {
    /// A short, stable name for metrics and dead-letter headers.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::UnknownShape(_) => "unknown_shape",
            DecodeError::BadField { .. } => "bad_field",
            DecodeError::PayloadNotJson(_) => "payload_not_json",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::MissingEventType => "missing_event_type",
            DecodeError::MissingEventId => "missing_event_id",
            DecodeError::MissingAggregateId => "missing_aggregate_id",
        }
    }
}

/// Decodes one record. Generic over rdkafka's [`Message`] so tests can use `OwnedMessage` without a broker.
pub fn decode<M: Message>(msg: &M) -> Result<Decoded, DecodeError> {
    let Some(bytes) = msg.payload() else {
        return Ok(Decoded::Skip(SkipReason::Tombstone));
    };
    if msg.topic().starts_with("__debezium-heartbeat") {
        return Ok(Decoded::Skip(SkipReason::Heartbeat));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8(e.to_string()))?;
    if let Some(skip) = struct_text(text)? {
        return Ok(Decoded::Skip(skip));
    }
    if let Some(decoded) = decode_fast(text, msg) {
        return Ok(decoded);
    }
    let coords = coordinates(msg);
    let value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let (value, schema) = unwrap_schema(value);

    if let Value::Object(obj) = &value {
        if obj.contains_key("op") {
            return decode_change_event(obj, schema.as_ref(), coords);
        }
        if is_heartbeat(obj) {
            return Ok(Decoded::Skip(SkipReason::Heartbeat));
        }
        if is_transaction_metadata(obj) {
            return Ok(Decoded::Skip(SkipReason::TransactionMetadata));
        }
    }
    decode_router_record(msg, value, schema.as_ref(), coords)
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

fn coordinates<M: Message>(msg: &M) -> KafkaCoordinates {
    KafkaCoordinates {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis(),
    }
}

/// A JSON document held in a JSON string (a `jsonb` column), parsed where the string is read: from the
/// deserializer's own buffer when the string has escapes (it always does), so the unescaped text is never copied
/// out. An error when the string holds no JSON.
struct JsonText(Value);

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = JsonText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string holding JSON")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<JsonText, E> {
                serde_json::from_str(s)
                    .map(|Presized(v)| JsonText(v))
                    .map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// A JSON value as `serde_json::Value` reads it, but with objects and arrays made with room for a few entries:
/// grown from empty, a small payload's object was reallocated twice (a fifth of reading it).
struct Presized(Value);

const PRESIZED: usize = 8;

impl<'de> Deserialize<'de> for Presized {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PresizedVisitor).map(Presized)
    }
}

struct PresizedVisitor;

impl<'de> serde::de::Visitor<'de> for PresizedVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(PRESIZED);
        while let Some(Presized(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::with_capacity(PRESIZED);
        while let Some(key) = map.next_key::<String>()? {
            let Presized(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// With StringConverter, records the Outbox Event Router passes through unchanged (logical messages, updates)
/// arrive as Kafka Connect's `Struct{...}` text. Those that are not events are skipped; an insert in that form
/// cannot be read faithfully, so it is an error that names the fix.
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

/// JsonConverter with `schemas.enable=true` wraps every key and value as `{"schema": ..., "payload": ...}`. Returns
/// the value and, when it was wrapped, its schema (its field types name the timestamp encodings).
fn unwrap_schema(value: Value) -> (Value, Option<Value>) {
    match value {
        Value::Object(mut obj)
            if obj.len() == 2
                && obj.contains_key("payload")
                && matches!(obj.get("schema"), Some(Value::Object(_))) =>
        {
            let schema = obj.remove("schema");
            (obj.remove("payload").unwrap_or(Value::Null), schema)
        }
        other => (other, None),
    }
}

/// The Connect schema name (`io.debezium.time.MicroTimestamp`, ...) of the struct field at `path` of `schema`.
fn field_schema_name<'a>(schema: Option<&'a Value>, path: &[&str]) -> Option<&'a str> {
    let mut at = schema?;
    for name in path {
        at = at
            .get("fields")?
            .as_array()?
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(name))?;
    }
    at.get("name").and_then(Value::as_str)
}

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

fn decode_change_event(
    obj: &Map<String, Value>,
    schema: Option<&Value>,
    coords: KafkaCoordinates,
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
    let payload = parse_payload(row.get("payload"))?;
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
        source: coords,
    })))
}

/// Names the Outbox Event Router's `table.fields.additional.placement` documentation uses for placed columns
/// (aliases as in its examples, or the column names themselves).
const PLACED_NAMES: &[&str] = &[
    "eventType",
    "event_type",
    "eventId",
    "event_id",
    "id",
    "createdAt",
    "created_at",
    "aggregateType",
    "aggregate_type",
    "aggregateId",
    "aggregate_id",
    "timestamp",
];

/// Whether a router value is an envelope (`{payload, <placed fields>}`) rather than an expanded payload: it holds
/// `payload` beside at least one placed field, and every field beside `payload` is a column value (a string,
/// number or null; a placed column is never an object or array). Decided from the value alone: an `eventType`
/// header may be placed as well.
fn is_envelope(obj: &Map<String, Value>) -> bool {
    obj.contains_key("payload")
        && obj.len() >= 2
        && obj.keys().any(|k| PLACED_NAMES.contains(&k.as_str()))
        && obj.iter().all(|(k, v)| {
            k == "payload" || matches!(v, Value::String(_) | Value::Number(_) | Value::Null)
        })
}

fn decode_router_record<M: Message>(
    msg: &M,
    value: Value,
    schema: Option<&Value>,
    coords: KafkaCoordinates,
) -> Result<Decoded, DecodeError> {
    let (payload, envelope) = match value {
        Value::Object(mut obj) if is_envelope(&obj) => {
            let payload = obj.remove("payload").unwrap_or(Value::Null);
            (payload, Some(obj))
        }
        other => (other, None),
    };
    let placed = |names: &[&str]| envelope.as_ref().and_then(|e| envelope_str(e, names));

    let event_type = header(msg, "eventType")
        .or_else(|| header(msg, "event_type"))
        .or_else(|| placed(&["eventType", "event_type"]))
        .ok_or_else(|| {
            if matches!(payload, Value::Object(_) | Value::String(_) | Value::Null) {
                DecodeError::MissingEventType
            } else {
                DecodeError::UnknownShape(shape_of(&payload).to_string())
            }
        })?;
    let event_id = header(msg, "id")
        .or_else(|| placed(&["eventId", "event_id", "id"]))
        .ok_or(DecodeError::MissingEventId)?;
    validate_uuid("id", &event_id)?;
    let aggregate_id = router_key(msg)
        .or_else(|| placed(&["aggregateId", "aggregate_id"]))
        .ok_or(DecodeError::MissingAggregateId)?;
    let aggregate_type = header(msg, "aggregateType")
        .or_else(|| header(msg, "aggregate_type"))
        .or_else(|| placed(&["aggregateType", "aggregate_type"]));
    // A placed creation time: in the envelope (typed by the value's schema when it has one) or in a header.
    let placed_time = envelope.as_ref().and_then(|e| {
        ["createdAt", "created_at"]
            .iter()
            .find_map(|n| e.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
    });
    let created_at_ms = match placed_time {
        Some((name, v)) => created_at(Some(v), field_schema_name(schema, &[name]))?,
        None => match header(msg, "createdAt").or_else(|| header(msg, "created_at")) {
            Some(s) => Some(timestamp_from_str(&s, None).map_err(|()| bad_created_at())?),
            None => None,
        },
    };
    Ok(Decoded::Event(Box::new(OutboxEvent {
        event_id,
        aggregate_id,
        aggregate_type,
        event_type,
        payload: parse_payload(Some(&payload))?,
        created_at_ms,
        source: coords,
    })))
}

fn envelope_str(obj: &Map<String, Value>, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| obj.get(*n).and_then(Value::as_str))
        .map(str::to_string)
}

/// The router's key is the aggregate id: a quoted JSON string (JsonConverter), bare text (StringConverter), or a
/// schema-wrapped string.
fn router_key<M: Message>(msg: &M) -> Option<String> {
    let key = std::str::from_utf8(msg.key()?).ok()?.trim();
    if key.is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(key) {
        Ok(v) => match unwrap_schema(v).0 {
            Value::String(s) => Some(s),
            Value::Object(o) => envelope_str(&o, &["aggregate_id", "aggregateId"]),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
        Err(_) => Some(key.to_string()),
    }
}

/// A header's value as UTF-8, looked up by name (Debezium adds its own headers; position means nothing).
fn header<M: Message>(msg: &M, name: &str) -> Option<String> {
    let raw = raw_header(msg, name)?;
    // JsonConverter-style header converters quote strings; plain ones do not.
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(s)) => Some(s),
        _ => Some(raw.to_string()),
    }
}

/// A header's value as it arrived, if it is UTF-8.
fn raw_header<'m, M: Message>(msg: &'m M, name: &str) -> Option<&'m str> {
    let headers = msg.headers()?;
    let h = headers.iter().find(|h| h.key == name)?;
    std::str::from_utf8(h.value?).ok()
}

/// The event id and type of a record that cannot be decoded, as far as they can be read: for the dead letter,
/// so that an operator can tell which event it was. Never fails.
pub fn identity<M: Message>(msg: &M) -> (Option<String>, Option<String>) {
    let mut id = header(msg, "id");
    let mut event_type = header(msg, "eventType").or_else(|| header(msg, "event_type"));
    if id.is_some() && event_type.is_some() {
        return (id, event_type);
    }
    let value = msg
        .payload()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .map(|v| unwrap_schema(v).0);
    if let Some(Value::Object(obj)) = value {
        let row = match obj.get("after") {
            Some(Value::Object(row)) => row,
            _ => &obj,
        };
        let text = |names: &[&str]| envelope_str(row, names).filter(|s| !s.is_empty());
        id = id.or_else(|| text(&["event_id", "eventId"]));
        event_type = event_type.or_else(|| text(&["event_type", "eventType"]));
    }
    (id, event_type)
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

fn validate_uuid(field: &'static str, s: &str) -> Result<(), DecodeError> {
    uuid::Uuid::parse_str(s)
        .map(|_| ())
        .map_err(|_| DecodeError::BadField {
            field,
            expected: "UUID",
        })
}

/// `jsonb` arrives as a string holding JSON text (parse it a second time); an expanded router payload is
/// already a value. A NULL payload column is an event without payload (`Value::Null`): whether its type accepts
/// that is for the type's payload contract to say, not the decoder.
fn parse_payload(raw: Option<&Value>) -> Result<Value, DecodeError> {
    match raw {
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| DecodeError::PayloadNotJson(e.to_string()))
        }
        Some(Value::Null) | None => Ok(Value::Null),
        Some(v) => Ok(v.clone()),
    }
}

/// The earliest and latest event time the daemon accepts (1970-01-01 to 9999-12-31, in ms): a time outside them
/// is a misread unit or a broken row, and MongoDB servers and drivers disagree on dates beyond year 9999.
pub const MIN_EVENT_TIME_MS: i64 = 0;
pub const MAX_EVENT_TIME_MS: i64 = 253_402_300_799_999;

fn bad_created_at() -> DecodeError {
    DecodeError::BadField {
        field: "created_at",
        expected: "timestamp between 1970 and 9999 (RFC 3339 text or epoch number)",
    }
}

/// The creation time of a row, in ms: `None` when absent or null, an error when present and unreadable or out of
/// range. `schema_name` is the Connect schema name of the field, when the record carries its schema.
fn created_at(v: Option<&Value>, schema_name: Option<&str>) -> Result<Option<i64>, DecodeError> {
    let ms = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => timestamp_from_str(s, schema_name),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or(())
            .and_then(|n| epoch_to_ms(n, schema_name)),
        Some(_) => Err(()),
    };
    ms.map(Some).map_err(|()| bad_created_at())
}

/// A timestamp as text: RFC 3339 (`ZonedTimestamp`, what `timestamptz` becomes), else an epoch number as text
/// (a header placed by a plain header converter).
fn timestamp_from_str(s: &str, schema_name: Option<&str>) -> Result<i64, ()> {
    let ms = match mongodb::bson::DateTime::parse_rfc3339_str(s) {
        Ok(d) => d.timestamp_millis(),
        Err(_) => return epoch_to_ms(s.trim().parse::<i64>().map_err(|_| ())?, schema_name),
    };
    in_range(ms)
}

/// An epoch number in milliseconds. The unit comes from the field's Connect schema name where the record has one
/// (Debezium's `time.precision.mode=adaptive` gives `Timestamp` in ms for `timestamp(0..3)`, `MicroTimestamp`
/// in us for `timestamp(4..6)`, `NanoTimestamp` in ns; `connect` mode gives Kafka Connect's `Timestamp` in ms).
/// Without a schema, one rule: below 10^14 it is milliseconds (up to year 5138), below 10^17 microseconds,
/// else nanoseconds.
fn epoch_to_ms(n: i64, schema_name: Option<&str>) -> Result<i64, ()> {
    let divisor = match schema_name {
        Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => 1,
        Some("io.debezium.time.MicroTimestamp") => 1_000,
        Some("io.debezium.time.NanoTimestamp") => 1_000_000,
        _ => match n.unsigned_abs() {
            a if a < 100_000_000_000_000 => 1,
            a if a < 100_000_000_000_000_000 => 1_000,
            _ => 1_000_000,
        },
    };
    in_range(n.div_euclid(divisor))
}

fn in_range(ms: i64) -> Result<i64, ()> {
    if (MIN_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(())
    }
}

/// What kind of JSON value `v` is, in words ("an object", "null"), for error messages.
pub fn shape_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
