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
/// path (empty, `$`-prefixed, dotted, `_id`) are kept under `extra_fields` as key/value pairs instead (with the
/// payload's own `extra_fields`, if it has one, so that nothing is overwritten). Each value replaces its field
/// whole, which MongoDB allows whatever names the value nests (docs/RELIABILITY.md, "Hostile input").
pub fn payload_fields(payload: &Map<String, Value>) -> Result<Document, HandlerError> {
    let awkward = |k: &str| k.is_empty() || k.starts_with('$') || k.contains('.') || k == "_id";
    let any_awkward = payload.keys().any(|k| awkward(k));
    let mut set = Document::new();
    let mut extra = Vec::new();
    for (k, v) in payload {
        let value = to_bson(v)?;
        if awkward(k) || (any_awkward && k == "extra_fields") {
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

/// A payload value as BSON, exactly as the application wrote it: objects stay documents with the same field
/// names (MongoDB Extended JSON such as `{"$date": ...}` or `{"$numberLong": ...}` is not interpreted: it is
/// the application's data), integers are 64-bit, other numbers doubles. An integer beyond 64-bit signed is refused;
/// the payload contract refuses it before any handler runs (`registry::check_storable`).
pub fn to_bson(v: &Value) -> Result<Bson, HandlerError> {
    Ok(match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Bson::Int64(i),
            (None, Some(f)) if !n.is_u64() => Bson::Double(f),
            _ => {
                return Err(HandlerError::invalid(format!(
                    "payload number {n} is beyond MongoDB's 64-bit signed integers"
                )));
            }
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(to_bson).collect::<Result<_, _>>()?),
        Value::Object(map) => {
            let mut d = Document::new();
            for (k, v) in map {
                d.insert(k.clone(), to_bson(v)?);
            }
            Bson::Document(d)
        }
    })
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
