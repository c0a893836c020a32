//! The decoded outbox event: what handlers see. Owns no I/O.

use serde_json::Value;

/// Where a record came from in Kafka. Carried on every event so that logs, metrics and dead letters can name
/// the exact record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp in milliseconds since the epoch, when the broker set one.
    pub timestamp_ms: Option<i64>,
}

/// One row of `activity.event_outbox`, as the application wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// The outbox row's primary key; the identity used to apply each event at most once.
    pub event_id: String,
    /// The business entity the event belongs to (user id, activity id, ...). Read models key on it.
    pub aggregate_id: String,
    /// `user`, `activity`, ...; absent when an Outbox Event Router deployment does not forward it.
    pub aggregate_type: Option<String>,
    /// `UserCreated`, `ActivityCreated`, ...; selects the handlers.
    pub event_type: String,
    /// The `payload` column, parsed.
    pub payload: Value,
    /// The row's `created_at` in milliseconds since the epoch, when the record carries it.
    pub created_at_ms: Option<i64>,
    /// The Kafka record this event was decoded from.
    pub source: KafkaCoordinates,
}

impl OutboxEvent {
    /// A string field of the payload, if present and a string.
    pub fn payload_str(&self, field: &str) -> Option<&str> {
        self.payload.get(field).and_then(Value::as_str)
    }

    /// When the event happened, for ordering guards: the row's `created_at`, else the Kafka timestamp, else 0.
    pub fn occurred_at_ms(&self) -> i64 {
        self.created_at_ms
            .or(self.source.timestamp_ms)
            .unwrap_or_default()
    }
}
