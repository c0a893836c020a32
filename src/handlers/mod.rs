//! The shipped read-model handlers and the one place they are registered. Adding a handler is two steps: write
//! it in a file here, add it to [`register_all`].
//!
//! Every handler keys its documents by a business id and writes with guarded upserts, so that a redelivered or
//! replayed event changes nothing (see `store::guarded_upsert`).

mod activities;
mod participants;
mod user_statistics;
mod users;

use std::sync::Arc;

use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Database, IndexModel};
use serde_json::{Map, Value};

pub use activities::ActivityCreatedHandler;
pub use participants::ParticipantJoinedHandler;
pub use user_statistics::UserStatisticsHandler;
pub use users::UserCreatedHandler;

use crate::event::OutboxEvent;
use crate::registry::{HandlerError, PayloadContract, Registry, RegistryError};

/// Collection names of the shipped read models.
pub const USERS: &str = "users";
pub const USER_STATISTICS: &str = "user_statistics";
pub const ACTIVITIES: &str = "activities";

/// Registers every shipped handler and the payload contract of each shipped event type. Custom handlers go here
/// too.
pub fn register_all(registry: &mut Registry) -> Result<(), RegistryError> {
    // What a payload must hold for its event to have happened at all, decided once for every handler of the type:
    // a sign-up the `users` projection cannot store is not counted in `user_statistics` either.
    registry.require(
        "UserCreated",
        PayloadContract::object().require_str("email"),
    );
    registry.require(
        "ActivityCreated",
        PayloadContract::object()
            .require_str("title")
            .require_str("organizer_id"),
    );
    registry.require(
        "ParticipantJoined",
        PayloadContract::object().require_str("user_id"),
    );
    registry.register(Arc::new(UserCreatedHandler))?;
    registry.register(Arc::new(UserStatisticsHandler::default()))?;
    registry.register(Arc::new(ActivityCreatedHandler))?;
    registry.register(Arc::new(ParticipantJoinedHandler))?;
    Ok(())
}

/// Creates the indexes the read models are queried by. Idempotent; run at start-up.
pub async fn ensure_indexes(db: &Database) -> Result<(), mongodb::error::Error> {
    db.collection::<Document>(USERS)
        .create_index(IndexModel::builder().keys(doc! { "email": 1 }).build())
        .await?;
    db.collection::<Document>(ACTIVITIES)
        .create_index(
            IndexModel::builder()
                .keys(doc! { "organizer_id": 1 })
                .build(),
        )
        .await?;
    db.collection::<Document>(USER_STATISTICS)
        .create_index(
            IndexModel::builder()
                .keys(doc! { "kind": 1, "date": 1 })
                .build(),
        )
        .await?;
    Ok(())
}

/// The payload as a JSON object, or a permanent error naming the event type.
pub(crate) fn payload_object(event: &OutboxEvent) -> Result<&Map<String, Value>, HandlerError> {
    event.payload.as_object().ok_or_else(|| {
        HandlerError::invalid(format!(
            "{} payload must be a JSON object",
            event.event_type
        ))
    })
}

/// A required, non-empty string field of the payload.
pub(crate) fn required<'a>(
    payload: &'a Map<String, Value>,
    event: &OutboxEvent,
    field: &str,
) -> Result<&'a str, HandlerError> {
    match payload.get(field).and_then(Value::as_str) {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(HandlerError::invalid(format!(
            "{} payload needs a non-empty string `{field}`",
            event.event_type
        ))),
    }
}

/// The payload's fields as a `$set` document. Unknown fields are kept; names MongoDB cannot take as an update
/// path (empty, `$`-prefixed, dotted, `_id`) are kept under `extra_fields` as key/value pairs instead.
pub(crate) fn payload_fields(payload: &Map<String, Value>) -> Result<Document, HandlerError> {
    let mut set = Document::new();
    let mut extra = Vec::new();
    for (k, v) in payload {
        let value = to_bson(v)?;
        if k.is_empty() || k.starts_with('$') || k.contains('.') || k == "_id" {
            extra.push(Bson::Document(doc! { "key": k, "value": value }));
        } else {
            set.insert(k, value);
        }
    }
    if !extra.is_empty() {
        set.insert("extra_fields", extra);
    }
    Ok(set)
}

pub(crate) fn to_bson(v: &Value) -> Result<Bson, HandlerError> {
    mongodb::bson::to_bson(v).map_err(|e| HandlerError::invalid(format!("payload value: {e}")))
}

/// When the event happened, as a BSON date: the state-ordering guards compare it.
pub(crate) fn occurred_at(event: &OutboxEvent) -> DateTime {
    DateTime::from_millis(event.occurred_at_ms())
}

/// Filter that matches a document whose `field` is absent or not newer than `at`: a stale event never
/// overwrites newer state. (`$not: {$gt}` rather than an `$or` of `$exists`/`$lte`: same documents, but servers
/// keep using the `_id` index for it.)
pub(crate) fn not_newer_than(id: &str, field: &str, at: DateTime) -> Document {
    doc! { "_id": id, field: { "$not": { "$gt": at } } }
}
