//! The event ledger: one small MongoDB document per event id the daemon has taken in (`event_ledger`, `_id` =
//! event id), holding a fingerprint of the event's content and the time that dates it. Owns the answer to "has
//! this event id been seen, and with the same content?"; never writes a read model.
//!
//! Two guarantees rest on it:
//! - **A conflicting duplicate is refused.** A record whose event id was already taken in with other content
//!   (type, aggregate or payload) is not handed to any handler: the read models stay as the first version made
//!   them, in every aggregate, and the record is dead-lettered as `conflicting_duplicate`.
//! - **An event's time never moves.** A record that carries no creation time (an Outbox Event Router deployment
//!   that does not place `created_at`) is dated by the ledger: the Kafka timestamp of the first copy taken in.
//!   A re-emission days later is dated the same, so it changes nothing and is counted nowhere again.
//!
//! The fingerprint leaves out where and when the record was read (topic, offset, Kafka timestamp, aggregate
//! type, the placed creation time), so a Debezium re-emission, a snapshot or another connector variant of the
//! same row is the same event.

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

/// The fingerprint of an event's content: SHA-256 over its type, aggregate id and payload, the payload's object
/// keys taken in sorted order (JSON object order carries no meaning), the first 128 bits as hex.
pub fn fingerprint(event: &OutboxEvent) -> String {
    let mut h = Sha256::new();
    h.update(event.event_type.as_bytes());
    h.update([0]);
    h.update(event.aggregate_id.as_bytes());
    h.update([0]);
    feed(&mut h, &event.payload);
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Feeds a JSON value to the hash unambiguously: a tag per kind, lengths before contents. Recursive: payloads
/// reach the ledger only after their depth was bounded (`registry::check_storable`).
fn feed(h: &mut Sha256, v: &serde_json::Value) {
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
            text(h, &n.to_string());
        }
        Value::String(s) => {
            h.update(b"s");
            text(h, s);
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for i in items {
                feed(h, i);
            }
        }
        Value::Object(map) => {
            h.update(b"{");
            h.update((map.len() as u64).to_le_bytes());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            for k in keys {
                text(h, k);
                feed(h, &map[k]);
            }
        }
    }
}

/// Records the event in the ledger, or refuses it. On success an event without a creation time gets the time of
/// its first copy in `created_at_ms`.
pub async fn admit(ctx: &HandlerContext, event: &mut OutboxEvent) -> Result<(), Refusal> {
    let fp = fingerprint(event);
    match event.created_at_ms {
        Some(at) => admit_dated(ctx, event, &fp, at).await,
        None => admit_undated(ctx, event, &fp).await,
    }
}

/// With a creation time the ledger's answer is only "same or not": one statement through the coalescing writer.
async fn admit_dated(
    ctx: &HandlerContext,
    event: &OutboxEvent,
    fp: &str,
    at: i64,
) -> Result<(), Refusal> {
    let filter = doc! { "_id": &event.event_id, "fp": fp };
    let update = doc! { "$setOnInsert": {
        "aggregate_id": &event.aggregate_id, "at": DateTime::from_millis(at),
    } };
    match ctx.writer.update_one(LEDGER, filter, update, true).await {
        Ok(_) => Ok(()),
        // The id is taken: by other content, or by a copy of this one inserted at the same moment.
        Err(WriteError::Statement {
            code: DUPLICATE_KEY,
            ..
        }) => compare(ctx, event, fp).await.map(|_| ()),
        Err(WriteError::Command(e)) if error_code(&e) == Some(DUPLICATE_KEY) => {
            compare(ctx, event, fp).await.map(|_| ())
        }
        Err(e) => Err(Refusal::Failed(classify_write(e))),
    }
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
    check(&entry, fp)?;
    if let Ok(at) = entry.get_datetime("at") {
        event.created_at_ms = Some(at.timestamp_millis());
    }
    Ok(())
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
    check(&entry, fp)?;
    Ok(entry)
}

fn check(entry: &Document, fp: &str) -> Result<(), Refusal> {
    match entry.get_str("fp") {
        Ok(first) if first == fp => Ok(()),
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
            json!({"email": "a@b.c", "n": 1.0}),
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
}
