//! `UserCreated` -> `user_statistics`: sign-ups per day and the total, each event counted exactly once.
//!
//! Without transactions, "exactly once" must live in one document update: each day's document lists the event
//! ids it has counted and the increment is guarded by that list. The total is derived from the daily counts
//! (recomputed, raised with `$max`), so it can neither double-count nor lose a day after a crash.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::{USER_STATISTICS, occurred_at};
use crate::event::OutboxEvent;
use crate::registry::{EventHandler, HandlerContext, HandlerError};
use crate::store::{classify, guarded_upsert};

/// `_id` of the document holding `total_users`.
pub const TOTALS_ID: &str = "totals";

/// Counts sign-ups per day (`_id` = `daily:YYYY-MM-DD`) and in total (`_id` = `totals`).
pub struct UserStatisticsHandler;

#[async_trait]
impl EventHandler for UserStatisticsHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }

    fn name(&self) -> &str {
        "UserStatisticsHandler"
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let coll = ctx.db.collection::<Document>(USER_STATISTICS);
        let at = occurred_at(event);
        let day = at
            .try_to_rfc3339_string()
            .map_err(|e| HandlerError::invalid(format!("event time out of range: {e}")))?;
        let day = &day[..10];
        guarded_upsert(
            &coll,
            doc! { "_id": format!("daily:{day}"), "event_ids": { "$ne": &event.event_id } },
            doc! {
                "$inc": { "signups": 1 },
                "$push": { "event_ids": &event.event_id },
                "$setOnInsert": { "kind": "daily", "date": day },
            },
        )
        .await?;

        // Recompute the total every time (even when the day was already counted): a crash between the two
        // writes must not leave the total behind for good.
        let mut days = coll
            .find(doc! { "kind": "daily" })
            .projection(doc! { "signups": 1 })
            .await
            .map_err(classify)?;
        let mut total: i64 = 0;
        while let Some(d) = days.try_next().await.map_err(classify)? {
            total += match d.get("signups") {
                Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
                Some(mongodb::bson::Bson::Int64(n)) => *n,
                _ => 0,
            };
        }
        coll.update_one(
            doc! { "_id": TOTALS_ID },
            doc! { "$max": { "total_users": total }, "$setOnInsert": { "kind": "totals" } },
        )
        .upsert(true)
        .await
        .map_err(classify)?;
        Ok(())
    }
}
