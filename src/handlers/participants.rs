//! `ParticipantJoined` (aggregate = activity) -> the participant added once to `activities.participants`, with
//! `participant_count` changed in the same single-document update so the two always agree.

use async_trait::async_trait;
use mongodb::bson::{Bson, doc};

use super::{ACTIVITIES, occurred_at, payload_object, required, to_bson};
use crate::event::OutboxEvent;
use crate::handler::{EventHandler, HandlerContext, HandlerError, guarded_upsert};

/// Adds `{user_id, joined_at, event_id}` to the activity. Works before `ActivityCreated` arrives (the document
/// is created with just the participant) and on redelivery (the filter finds the user already present).
pub struct ParticipantJoinedHandler;

#[async_trait]
impl EventHandler for ParticipantJoinedHandler {
    fn event_type(&self) -> &str {
        "ParticipantJoined"
    }

    fn name(&self) -> &str {
        "ParticipantJoinedHandler"
    }

    fn collections(&self) -> Vec<String> {
        vec![ACTIVITIES.to_string()]
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let payload = payload_object(event)?;
        let user_id = required(payload, event, "user_id")?;
        let joined_at = match payload.get("joined_at") {
            Some(v) if !v.is_null() => to_bson(v)?,
            _ => Bson::DateTime(occurred_at(event)),
        };
        let filter =
            doc! { "_id": &event.aggregate_id, "participants.user_id": { "$ne": user_id } };
        let update = doc! {
            "$push": { "participants": {
                "user_id": user_id, "joined_at": joined_at, "event_id": &event.event_id,
            } },
            "$inc": { "participant_count": 1 },
        };
        guarded_upsert(ctx, ACTIVITIES, filter, update).await?;
        Ok(())
    }
}
