//! Event times: a row's `created_at` in whichever form a Debezium configuration writes it.

use serde_json::Value;

use super::DecodeError;

/// The earliest and latest event time the daemon accepts (1970-01-01 to 9999-12-31, in ms): a time outside them
/// is a misread unit or a broken row, and MongoDB servers and drivers disagree on dates beyond year 9999.
pub const MIN_EVENT_TIME_MS: i64 = 0;
pub const MAX_EVENT_TIME_MS: i64 = 253_402_300_799_999;

pub(super) fn bad_created_at() -> DecodeError {
    DecodeError::BadField {
        field: "created_at",
        expected: "timestamp between 1970 and 9999 (RFC 3339 text or epoch number)",
    }
}

/// The creation time of a row, in ms: `None` when absent or null, an error when present and unreadable or out of
/// range. `schema_name` is the Connect schema name of the field, when the record carries its schema.
pub(super) fn created_at(
    v: Option<&Value>,
    schema_name: Option<&str>,
) -> Result<Option<i64>, DecodeError> {
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
pub(super) fn timestamp_from_str(s: &str, schema_name: Option<&str>) -> Result<i64, ()> {
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
