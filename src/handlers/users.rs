//! `UserCreated` -> `users`, one document per user (`_id` = user id), found by `email`.

use async_trait::async_trait;
use mongodb::bson::doc;

use super::{USERS, not_newer_than, occurred_at, payload_fields, payload_object, required};
use mongodb::IndexModel;

use crate::event::OutboxEvent;
use crate::handler::{EventHandler, HandlerContext, HandlerError, guarded_upsert};

/// Projects `UserCreated {email, username, first_name, last_name, ...}` into `users`.
pub struct UserCreatedHandler;

#[async_trait]
impl EventHandler for UserCreatedHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }

    fn name(&self) -> &str {
        "UserCreatedHandler"
    }

    fn indexes(&self) -> Vec<(String, IndexModel)> {
        vec![super::index(USERS, doc! { "email": 1 })]
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let payload = payload_object(event)?;
        required(payload, event, "email")?;
        let at = occurred_at(event);
        let mut set = payload_fields(payload)?;
        set.insert("created_at", at);
        set.insert("last_event_id", &event.event_id);
        set.insert("last_event_at", at);
        let filter = not_newer_than(&event.aggregate_id, "last_event_at", at);
        guarded_upsert(ctx, USERS, filter, doc! { "$set": set }).await?;
        Ok(())
    }
}
