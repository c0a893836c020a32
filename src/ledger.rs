//! The event ledger: one small MongoDB document per event id the daemon has taken in (`event_ledger`, `_id` =
//! event id), holding a fingerprint of the event's content and the time that dates it. Owns the answer to "has
//! this event id been seen, and with the same content?"; never writes a read model.
//!
//! Two guarantees rest on it:
//! - **A conflicting duplicate is refused.** A record whose event id was already taken in with other content
//!   (type, aggregate or payload) is not handed to any handler: the read models stay as the first version made
//!   them, in every aggregate, and the record is dead-lettered as `conflicting_duplicate`.
//! - **An event's time never moves.** The first time the ledger recorded for an event id stands for every later
//!   copy, dated or not: the copy's creation time where the first copy carried one, else (an Outbox Event Router
//!   deployment that does not place `created_at`) the Kafka timestamp of the first copy. A re-emission days later
//!   (a snapshot, a replay by the application with a later `created_at`) is dated the same, so it changes nothing
//!   and is counted nowhere again.
//!
//! The fingerprint leaves out where and when the record was read (topic, offset, Kafka timestamp, aggregate
//! type, the placed creation time), and is taken over a canonical form of the payload that every Debezium variant
//! of one row maps to the same value ([`fingerprint`]), so a re-emission, a snapshot or another connector variant
//! of the same row is the same event.

use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::ReturnDocument;
use sha2::{Digest, Sha256};

use crate::event::OutboxEvent;
use crate::handler::{HandlerContext, HandlerError, classify, classify_write};
use crate::store::{DUPLICATE_KEY, error_code};
use crate::writer::WriteError;

/// The ledger's collection.
pub const LEDGER: &str = "event_ledger";

/// Why an event was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// The event id was taken in before with other content.
    Conflict { first: String, now: String },
    /// The ledger could not be read or written; retrying may help (or not, per the class).
    Failed(HandlerError),
}

/// The fingerprint of an event's content: SHA-256 over its type, aggregate id and the canonical form of its
/// payload, the first 128 bits as hex. The canonical form is what every connector variant of one outbox row
/// agrees on:
/// - object members in sorted key order (JSON object order carries no meaning; PostgreSQL's `jsonb` reorders);
/// - an object member whose value is `null` or an empty array counts as absent (the Event Router's
///   `table.expand.json.payload` drops such members by default, `table.json.payload.null.behavior` and
///   `table.json.payload.empty.array.behavior` being `ignore`, and fills members missing from one object of an
///   array with `null`); elements of an array all stay;
/// - a number by its value: an integral one as an integer (`100`, `100.0` and `1e2` alike: `jsonb` keeps what was
///   written, the expansion writes a double), any other as the shortest decimal of its double (`1.10` as `1.1`).
pub fn fingerprint(event: &OutboxEvent) -> String {
    digest(event, true)
}

/// The fingerprint before the canonical form (nulls and number forms as they came): an entry written by an older
/// version still matches a copy of its event.
fn legacy_fingerprint(event: &OutboxEvent) -> String {
    digest(event, false)
}

fn digest(event: &OutboxEvent, canonical: bool) -> String {
    let mut h = Sha256::new();
    h.update(event.event_type.as_bytes());
    h.update([0]);
    h.update(event.aggregate_id.as_bytes());
    h.update([0]);
    feed(&mut h, &event.payload, canonical);
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an object member's value counts as the member being absent, in the canonical form.
fn absent(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

/// A number as the canonical form writes it (see [`fingerprint`]).
fn canonical_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or_default();
    // Integral doubles within 64-bit signed read as the integer they are (-0.0 as 0).
    if f.fract() == 0.0 && f.abs() < 9.2e18 {
        return (f as i64).to_string();
    }
    format!("{f}")
}

/// Feeds a JSON value to the hash unambiguously: a tag per kind, lengths before contents. Recursive: payloads
/// reach the ledger only after their depth was bounded (`registry::check_storable`).
fn feed(h: &mut Sha256, v: &serde_json::Value, canonical: bool) {
    use serde_json::Value;
    let text = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            if canonical {
                text(h, &canonical_number(n));
            } else {
                text(h, &n.to_string());
            }
        }
        Value::String(s) => {
            h.update(b"s");
            text(h, s);
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for i in items {
                feed(h, i, canonical);
            }
        }
        Value::Object(map) => {
            h.update(b"{");
            let mut keys: Vec<&String> = map
                .iter()
                .filter(|(_, v)| !(canonical && absent(v)))
                .map(|(k, _)| k)
                .collect();
            h.update((keys.len() as u64).to_le_bytes());
            keys.sort_unstable();
            for k in keys {
                text(h, k);
                feed(h, &map[k], canonical);
            }
        }
    }
}

/// Records the event in the ledger, or refuses it. On success the event's `created_at_ms` is the time the ledger
/// holds for it: its own on first sight, the first copy's ever after.
pub async fn admit(ctx: &HandlerContext, event: &mut OutboxEvent) -> Result<(), Refusal> {
    let fp = fingerprint(event);
    match event.created_at_ms {
        Some(at) => admit_dated(ctx, event, &fp, at).await,
        None => admit_undated(ctx, event, &fp).await,
    }
}

/// With a creation time, the common answers (first sight, or a copy with the same content and time) take one
/// statement through the coalescing writer: an upsert matching id, fingerprint and time. Anything else collides on
/// the id and is read back: other content is a conflict, the same content with another time takes the stored one.
async fn admit_dated(
    ctx: &HandlerContext,
    event: &mut OutboxEvent,
    fp: &str,
    at: i64,
) -> Result<(), Refusal> {
    let filter = doc! { "_id": &event.event_id, "fp": fp, "at": DateTime::from_millis(at) };
    let update = doc! { "$setOnInsert": { "aggregate_id": &event.aggregate_id } };
    let collided = match ctx.writer.update_one(LEDGER, filter, update, true).await {
        Ok(_) => return Ok(()),
        // The id is taken: by other content, by this content at another time, or by a copy inserted at the same
        // moment.
        Err(WriteError::Statement {
            code: DUPLICATE_KEY,
            ..
        }) => true,
        Err(WriteError::Command(e)) if error_code(&e) == Some(DUPLICATE_KEY) => true,
        Err(e) => return Err(Refusal::Failed(classify_write(e))),
    };
    debug_assert!(collided);
    let entry = compare(ctx, event, fp).await?;
    take_stored_time(&entry, event);
    Ok(())
}

/// Without a creation time the stored time is needed back: a find-and-modify that inserts the entry if absent
/// and returns it.
async fn admit_undated(
    ctx: &HandlerContext,
    event: &mut OutboxEvent,
    fp: &str,
) -> Result<(), Refusal> {
    let first_seen = event
        .source
        .timestamp_ms
        .filter(|t| {
            (crate::decode::MIN_EVENT_TIME_MS..=crate::decode::MAX_EVENT_TIME_MS).contains(t)
        })
        .unwrap_or_else(|| DateTime::now().timestamp_millis());
    let update = doc! { "$setOnInsert": {
        "fp": fp, "aggregate_id": &event.aggregate_id, "at": DateTime::from_millis(first_seen),
    } };
    let coll = ctx.db.collection::<Document>(LEDGER);
    // Two copies inserted at once: the loser's upsert collides on `_id`; the entry exists then.
    let mut entry = None;
    for _ in 0..2 {
        match coll
            .find_one_and_update(doc! { "_id": &event.event_id }, update.clone())
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
        {
            Ok(found) => {
                entry = found;
                break;
            }
            Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => continue,
            Err(e) => return Err(Refusal::Failed(classify(e))),
        }
    }
    let Some(entry) = entry else {
        return Err(Refusal::Failed(HandlerError::Transient(anyhow::anyhow!(
            "the event ledger returned no entry for {}",
            event.event_id
        ))));
    };
    check(&entry, event, fp)?;
    take_stored_time(&entry, event);
    Ok(())
}

/// The time the ledger holds for the event becomes the event's.
fn take_stored_time(entry: &Document, event: &mut OutboxEvent) {
    if let Ok(at) = entry.get_datetime("at") {
        event.created_at_ms = Some(at.timestamp_millis());
    }
}

/// Reads the entry of the event and compares fingerprints.
async fn compare(ctx: &HandlerContext, event: &OutboxEvent, fp: &str) -> Result<Document, Refusal> {
    let entry = ctx
        .db
        .collection::<Document>(LEDGER)
        .find_one(doc! { "_id": &event.event_id })
        .await
        .map_err(|e| Refusal::Failed(classify(e)))?
        .ok_or_else(|| {
            Refusal::Failed(HandlerError::Transient(anyhow::anyhow!(
                "the event ledger entry of {} collided but cannot be read",
                event.event_id
            )))
        })?;
    check(&entry, event, fp)?;
    Ok(entry)
}

fn check(entry: &Document, event: &OutboxEvent, fp: &str) -> Result<(), Refusal> {
    match entry.get_str("fp") {
        Ok(first) if first == fp || first == legacy_fingerprint(event) => Ok(()),
        Ok(first) => Err(Refusal::Conflict {
            first: first.to_string(),
            now: fp.to_string(),
        }),
        Err(_) => Err(Refusal::Conflict {
            first: "(none)".to_string(),
            now: fp.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KafkaCoordinates;
    use serde_json::json;

    fn event(payload: serde_json::Value, offset: i64, created: Option<i64>) -> OutboxEvent {
        OutboxEvent {
            event_id: "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01".into(),
            aggregate_id: "a".into(),
            aggregate_type: Some("user".into()),
            event_type: "UserCreated".into(),
            payload,
            created_at_ms: created,
            source: KafkaCoordinates {
                topic: "t".into(),
                partition: 0,
                offset,
                timestamp_ms: Some(offset * 1000),
            },
        }
    }

    #[test]
    fn the_fingerprint_is_the_content_not_the_copy() {
        let a = event(json!({"email": "a@b.c", "n": 1}), 1, None);
        let b = event(
            serde_json::from_str(r#"{"n":1,"email":"a@b.c"}"#).unwrap(),
            99,
            Some(5),
        );
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 32);
        let mut c = a.clone();
        for other in [
            json!({"email": "other@b.c", "n": 1}),
            json!({"email": "a@b.c", "n": 1.5}),
            json!({"email": "a@b.c", "n": "1"}),
            json!({"email": "a@b.c", "n": [1]}),
            json!({"email": "a@b.c"}),
            json!(null),
        ] {
            c.payload = other;
            assert_ne!(fingerprint(&a), fingerprint(&c), "{}", c.payload);
        }
        let mut d = a.clone();
        d.aggregate_id = "b".into();
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    /// One row as the raw connector (the `jsonb` text PostgreSQL wrote) and as the Event Router's expanded payload
    /// (nulls dropped, missing members of an array's objects filled with null, numbers as doubles) writes it.
    #[test]
    fn every_connector_variant_of_a_row_has_one_fingerprint() {
        let raw: serde_json::Value = serde_json::from_str(
            r#"{"a": null, "n": 100, "f": 1.10, "e": 1e2, "list": [{"x": 1}, {"y": null, "z": 2}, null],
                "nested": {"k": null, "v": [1, 2.0], "none": []}, "tags": []}"#,
        )
        .unwrap();
        let expanded: serde_json::Value = serde_json::from_str(
            r#"{"nested": {"v": [1, 2.0]}, "list": [{"x": 1, "z": null}, {"x": null, "z": 2}, null],
                "e": 100.0, "f": 1.1, "n": 100}"#,
        )
        .unwrap();
        assert_eq!(
            fingerprint(&event(raw, 1, None)),
            fingerprint(&event(expanded, 2, None))
        );
        // A payload without nulls or doubles has the fingerprint older versions stored.
        let plain = event(json!({"email": "a@b.c", "n": 1, "l": ["x", 2]}), 1, None);
        assert_eq!(fingerprint(&plain), legacy_fingerprint(&plain));
    }
}
