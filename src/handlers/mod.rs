//! The shipped read-model handlers and the one place they are registered. Adding a handler is two steps: write
//! it in a file here, add it to [`register_all`].
//!
//! Every handler keys its documents by a business id and writes with guarded upserts, so that a redelivered or
//! replayed event changes nothing (see `handler::guarded_upsert`).

mod activities;
mod participants;
mod user_statistics;
mod users;

use std::sync::Arc;

use mongodb::IndexModel;
use mongodb::bson::{Bson, DateTime, Document, doc};
use serde_json::{Map, Value};

pub use activities::ActivityCreatedHandler;
pub use participants::ParticipantJoinedHandler;
pub use user_statistics::UserStatisticsHandler;
pub use users::UserCreatedHandler;

use crate::event::OutboxEvent;
use crate::handler::HandlerError;
use crate::registry::{PayloadContract, Registry, RegistryError};

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

/// An index on `keys` of `collection`, as handlers declare them (`EventHandler::indexes`).
pub fn index(collection: &str, keys: Document) -> (String, IndexModel) {
    (
        collection.to_string(),
        IndexModel::builder().keys(keys).build(),
    )
}

/// The payload as a JSON object, or a permanent error naming the event type.
pub fn payload_object(event: &OutboxEvent) -> Result<&Map<String, Value>, HandlerError> {
    event.payload.as_object().ok_or_else(|| {
        HandlerError::invalid(format!(
            "{} payload must be a JSON object",
            event.event_type
        ))
    })
}

/// A required, non-empty string field of the payload.
pub fn required<'a>(
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
pub fn payload_fields(payload: &Map<String, Value>) -> Result<Document, HandlerError> {
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

pub fn to_bson(v: &Value) -> Result<Bson, HandlerError> {
    mongodb::bson::to_bson(v).map_err(|e| HandlerError::invalid(format!("payload value: {e}")))
}

/// When the event happened, as a BSON date: the state-ordering guards compare it.
pub fn occurred_at(event: &OutboxEvent) -> DateTime {
    DateTime::from_millis(event.occurred_at_ms())
}

/// Filter that matches a document whose `field` is absent or not newer than `at`: a stale event never
/// overwrites newer state. (`$not: {$gt}` rather than an `$or` of `$exists`/`$lte`: same documents, but servers
/// keep using the `_id` index for it.)
pub fn not_newer_than(id: &str, field: &str, at: DateTime) -> Document {
    doc! { "_id": id, field: { "$not": { "$gt": at } } }
}
