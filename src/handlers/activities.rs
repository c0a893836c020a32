//! `ActivityCreated` -> `activities`, one document per activity (`_id` = activity id). Participants are owned
//! by `ParticipantJoinedHandler`; this handler never touches them beyond starting an empty list.

use async_trait::async_trait;
use mongodb::bson::doc;

use super::{ACTIVITIES, not_newer_than, occurred_at, payload_fields, payload_object, required};
use mongodb::IndexModel;

use crate::event::OutboxEvent;
use crate::handler::{EventHandler, HandlerContext, HandlerError, guarded_upsert};

/// Projects `ActivityCreated {title, description?, organizer_id, starts_at?, location?, max_participants?}`.
pub struct ActivityCreatedHandler;

#[async_trait]
impl EventHandler for ActivityCreatedHandler {
    fn event_type(&self) -> &str {
        "ActivityCreated"
    }

    fn name(&self) -> &str {
        "ActivityCreatedHandler"
    }

    fn indexes(&self) -> Vec<(String, IndexModel)> {
        vec![super::index(ACTIVITIES, doc! { "organizer_id": 1 })]
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let payload = payload_object(event)?;
        required(payload, event, "title")?;
        required(payload, event, "organizer_id")?;
        let at = occurred_at(event);
        let mut set = payload_fields(payload)?;
        // The payload may not rename or replace the participant list.
        set.remove("participants");
        set.remove("participant_count");
        set.insert("created_at", at);
        set.insert("details_event_id", &event.event_id);
        set.insert("details_at", at);
        // A `ParticipantJoined` may have created the document first: keep its participants.
        let update = doc! {
            "$set": set,
            "$setOnInsert": { "participants": [], "participant_count": 0 },
        };
        guarded_upsert(
            ctx,
            ACTIVITIES,
            not_newer_than(&event.aggregate_id, "details_at", at),
            update,
        )
        .await?;
        Ok(())
    }
}
