//! Turns one Kafka record into an [`OutboxEvent`], a reason to skip it, or an error that says why it cannot be
//! read. Owns every Debezium record shape the daemon accepts (docs/ARCHITECTURE.md); never touches the network and
//! never panics on input.
//!
//! What a record is comes from its topic's declared [`Format`] (`RECORD_FORMATS`), never from fields inside the
//! payload column, which are the application's and may carry any name Debezium also uses:
//! - `change-event` ([`change`]): raw change events, bare or schema-wrapped; `c` and `r` become events, `u`, `d`,
//!   `t`, `m`, heartbeats and transaction metadata are skipped;
//! - `router[+envelope][+schemas]` ([`router`]): Outbox Event Router output; the event id is header `id`, the
//!   event type header `eventType` (or a placed field of the envelope);
//! - `debezium`, the default: `router` for a record with the Event Router's `id` header, else `change-event`.
//!
//! Tombstones (null values) and records of Debezium's heartbeat topics are skipped whatever the format. A record
//! that does not match its topic's format is an error naming both ([`DecodeError::FormatMismatch`]).

mod change;
mod format;
mod json;
mod router;
mod time;

use rdkafka::message::{Headers, Message};
use serde_json::Value;

pub use format::{Format, Formats};
pub use json::shape_of;
pub use time::{MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS};

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
    #[error(
        "record does not match its topic's declared format `{declared}` (RECORD_FORMATS): it is {observed}"
    )]
    FormatMismatch { declared: String, observed: String },
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
            DecodeError::FormatMismatch { .. } => "format_mismatch",
            DecodeError::BadField { .. } => "bad_field",
            DecodeError::PayloadNotJson(_) => "payload_not_json",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::MissingEventType => "missing_event_type",
            DecodeError::MissingAggregateId => "missing_aggregate_id",
        }
    }
}

/// Decodes one record of a topic whose declared format is `format`. Generic over rdkafka's [`Message`] so tests
/// can use `OwnedMessage` without a broker.
pub fn decode<M: Message>(msg: &M, format: Format) -> Result<Decoded, DecodeError> {
    let Some(bytes) = msg.payload() else {
        return Ok(Decoded::Skip(SkipReason::Tombstone));
    };
    if msg.topic().starts_with("__debezium-heartbeat") {
        return Ok(Decoded::Skip(SkipReason::Heartbeat));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8(e.to_string()))?;
    match resolve(msg, format) {
        Format::Router { envelope, schemas } => router::decode(text, msg, envelope, schemas),
        _ => change::decode(text, msg, format),
    }
}

/// `debezium` made concrete for one record: Event Router output when it carries the router's `id` header.
fn resolve<M: Message>(msg: &M, format: Format) -> Format {
    match format {
        Format::Debezium if has_header(msg, "id") => Format::ROUTER,
        other => other,
    }
}

/// The event id and type of a record that cannot be decoded, as far as its format lets them be read: for the
/// dead letter, so that an operator can tell which event it was. Never fails.
pub fn identity<M: Message>(msg: &M, format: Format) -> (Option<String>, Option<String>) {
    match resolve(msg, format) {
        Format::Router { envelope, schemas } => router::identity(msg, envelope, schemas),
        _ => change::identity(msg.payload().and_then(|b| std::str::from_utf8(b).ok())),
    }
}

fn coordinates<M: Message>(msg: &M) -> KafkaCoordinates {
    KafkaCoordinates {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis(),
    }
}

/// The error for a record that is not what its topic's format says, describing what it is from what Debezium
/// controls (the router's `id` header) and the value's top level.
fn mismatch<M: Message>(declared: Format, msg: &M, value: Option<&Value>) -> DecodeError {
    let router = if has_header(msg, "id") {
        "a record with the Event Router's `id` header"
    } else {
        "a record without the Event Router's `id` header"
    };
    let value = match value {
        Some(Value::Object(obj)) => {
            let mut names: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
            if obj.len() > names.len() {
                names.push("...");
            }
            format!("an object with fields [{}]", names.join(", "))
        }
        Some(v) => shape_of(v).to_string(),
        None => "not JSON".to_string(),
    };
    DecodeError::FormatMismatch {
        declared: declared.to_string(),
        observed: format!("{router} whose value is {value}"),
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

fn has_header<M: Message>(msg: &M, name: &str) -> bool {
    msg.headers()
        .is_some_and(|h| h.iter().any(|h| h.key == name))
}

fn validate_uuid(field: &'static str, s: &str) -> Result<(), DecodeError> {
    uuid::Uuid::parse_str(s)
        .map(|_| ())
        .map_err(|_| DecodeError::BadField {
            field,
            expected: "UUID",
        })
}

/// The payload column as a record carries it: `jsonb` as a string holding JSON text (parsed a second time), an
/// expanded payload as the value itself. A NULL payload column is an event without payload (`Value::Null`):
/// whether its type accepts that is for the type's payload contract to say, not the decoder.
fn parse_payload(raw: Value) -> Result<Value, DecodeError> {
    match raw {
        Value::String(s) => {
            serde_json::from_str(&s).map_err(|e| DecodeError::PayloadNotJson(e.to_string()))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests;
