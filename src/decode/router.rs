//! Outbox Event Router output (the `router` formats). The router adds header `id` (the event id) to every record
//! it routes; the value is the payload column alone, or, with envelope placements, an object holding it as
//! `payload` beside the placed fields; either may be wrapped by the JsonConverter's schema. Which of these a topic
//! carries is declared: the value may be the application's own JSON (`table.expand.json.payload=true`, or
//! StringConverter), whose fields are never read to tell.

use rdkafka::message::Message;
use serde_json::{Map, Value};

use super::json::{field_schema_name, unwrap_schema};
use super::time::{bad_created_at, created_at, timestamp_from_str};
use super::{
    DecodeError, Decoded, Format, coordinates, has_header, header, mismatch, parse_payload,
    validate_uuid,
};
use crate::event::OutboxEvent;

/// Decodes a router record of a topic declared `router[+envelope][+schemas]`.
pub(super) fn decode<M: Message>(
    text: &str,
    msg: &M,
    envelope: bool,
    schemas: bool,
) -> Result<Decoded, DecodeError> {
    let declared = Format::Router { envelope, schemas };
    let Some(event_id) = header(msg, "id") else {
        if has_header(msg, "id") {
            // The router placed a null event id.
            return Err(DecodeError::BadField {
                field: "id",
                expected: "UUID",
            });
        }
        return Err(mismatch(
            declared,
            msg,
            serde_json::from_str(text).ok().as_ref(),
        ));
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let (value, schema) = if schemas {
        match unwrap_schema(value) {
            (v, Some(s)) => (v, Some(s)),
            (v, None) => return Err(mismatch(declared, msg, Some(&v))),
        }
    } else {
        (value, None)
    };
    let (payload, placed) = if envelope {
        match value {
            Value::Object(mut obj) if obj.contains_key("payload") => {
                let payload = obj.remove("payload").unwrap_or(Value::Null);
                (payload, Some(obj))
            }
            other => return Err(mismatch(declared, msg, Some(&other))),
        }
    } else {
        (value, None)
    };
    let placed_str = |names: &[&str]| placed.as_ref().and_then(|e| first_str(e, names));

    let event_type = header(msg, "eventType")
        .or_else(|| header(msg, "event_type"))
        .or_else(|| placed_str(&["eventType", "event_type"]))
        .ok_or(DecodeError::MissingEventType)?;
    validate_uuid("id", &event_id)?;
    let aggregate_id = router_key(msg)
        .or_else(|| placed_str(&["aggregateId", "aggregate_id"]))
        .ok_or(DecodeError::MissingAggregateId)?;
    let aggregate_type = header(msg, "aggregateType")
        .or_else(|| header(msg, "aggregate_type"))
        .or_else(|| placed_str(&["aggregateType", "aggregate_type"]));
    // A placed creation time: in the envelope (typed by the value's schema when it has one) or in a header.
    let placed_time = placed.as_ref().and_then(|e| {
        ["createdAt", "created_at"]
            .iter()
            .find_map(|n| e.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
    });
    let created_at_ms = match placed_time {
        Some((name, v)) => created_at(Some(v), field_schema_name(schema.as_ref(), &[name]))?,
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
        payload: parse_payload(payload)?,
        created_at_ms,
        source: coordinates(msg),
    })))
}

fn first_str(obj: &Map<String, Value>, names: &[&str]) -> Option<String> {
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
            Value::Object(o) => first_str(&o, &["aggregate_id", "aggregateId"]),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
        Err(_) => Some(key.to_string()),
    }
}

/// The event id and type of a router record that cannot be decoded, from its headers and placed fields: for the
/// dead letter.
pub(super) fn identity<M: Message>(
    msg: &M,
    envelope: bool,
    schemas: bool,
) -> (Option<String>, Option<String>) {
    let id = header(msg, "id");
    let mut event_type = header(msg, "eventType").or_else(|| header(msg, "event_type"));
    if event_type.is_none() && envelope {
        let value = msg
            .payload()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .map(|v| if schemas { unwrap_schema(v).0 } else { v });
        if let Some(Value::Object(obj)) = value {
            event_type = first_str(&obj, &["eventType", "event_type"]);
        }
    }
    (id, event_type)
}
