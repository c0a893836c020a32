//! `UserCreated` -> `user_statistics`: sign-ups per day and the total, each event counted exactly once.
//!
//! Without transactions, "exactly once" must live in one document update: a bucket document per day and
//! event-id hex digit (`bucket:YYYY-MM-DD:h`, 16 per day, so no list grows past a sixteenth of a day's sign-ups)
//! lists the event ids it has counted, and its increment is guarded by that list. The per-day documents
//! (`daily:YYYY-MM-DD`) and the total (`totals`) are derived from the buckets: recomputed and raised with `$max`,
//! so they can neither double-count nor lose an event after a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::{USER_STATISTICS, occurred_at};
use crate::event::OutboxEvent;
use crate::registry::{EventHandler, HandlerContext, HandlerError};
use crate::store::{classify, guarded_upsert};

/// `_id` of the document holding `total_users`.
pub const TOTALS_ID: &str = "totals";

/// Counts sign-ups per day (`_id` = `daily:YYYY-MM-DD`, `signups`) and in total (`_id` = `totals`,
/// `total_users`).
#[derive(Default)]
pub struct UserStatisticsHandler {
    /// Tickets handed to events whose daily write is acknowledged.
    issued: AtomicU64,
    /// The highest ticket a finished recomputation of the total covers.
    covered: tokio::sync::Mutex<u64>,
    /// Days whose buckets changed since the last recomputation.
    touched: std::sync::Mutex<BTreeSet<String>>,
}

/// Raises each day's `signups` to the sum of its buckets.
async fn refresh_days(ctx: &HandlerContext, days: &[String]) -> Result<(), HandlerError> {
    if days.is_empty() {
        return Ok(());
    }
    let sums = sum(ctx, doc! { "kind": "bucket", "date": { "$in": days } }).await?;
    for (day, n) in sums {
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": format!("daily:{day}") },
            doc! { "$max": { "signups": n }, "$setOnInsert": { "kind": "daily", "date": &day } },
        )
        .await?;
    }
    Ok(())
}

/// `signups` of the matching documents, summed per `date`.
async fn sum(
    ctx: &HandlerContext,
    filter: Document,
) -> Result<BTreeMap<String, i64>, HandlerError> {
    let mut docs = ctx
        .db
        .collection::<Document>(USER_STATISTICS)
        .find(filter)
        .projection(doc! { "signups": 1, "date": 1 })
        .await
        .map_err(classify)?;
    let mut out = BTreeMap::new();
    while let Some(d) = docs.try_next().await.map_err(classify)? {
        let n = match d.get("signups") {
            Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
            Some(mongodb::bson::Bson::Int64(n)) => *n,
            _ => 0,
        };
        *out.entry(d.get_str("date").unwrap_or_default().to_string())
            .or_insert(0) += n;
    }
    Ok(out)
}

#[async_trait]
impl EventHandler for UserStatisticsHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }

    fn name(&self) -> &str {
        "UserStatisticsHandler"
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let at = occurred_at(event);
        let day = at
            .try_to_rfc3339_string()
            .map_err(|e| HandlerError::invalid(format!("event time out of range: {e}")))?;
        let day = &day[..10];
        let bucket = event
            .event_id
            .chars()
            .last()
            .unwrap_or('0')
            .to_ascii_lowercase();
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": format!("bucket:{day}:{bucket}"), "event_ids": { "$ne": &event.event_id } },
            doc! {
                "$inc": { "signups": 1 },
                "$push": { "event_ids": &event.event_id },
                "$setOnInsert": { "kind": "bucket", "date": day },
            },
        )
        .await?;
        if let Ok(mut t) = self.touched.lock() {
            t.insert(day.to_string());
        }

        // Recompute the total every time (even when the day was already counted): a crash between the two
        // writes must not leave the total behind for good. Concurrent events share one recomputation that
        // started after their daily write was acknowledged.
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = self.covered.lock().await;
        if *covered >= ticket {
            return Ok(());
        }
        let start = self.issued.load(Ordering::SeqCst);
        let days: Vec<String> = match self.touched.lock() {
            Ok(mut t) => std::mem::take(&mut *t).into_iter().collect(),
            Err(_) => Vec::new(),
        };
        if let Err(e) = refresh_days(ctx, &days).await {
            // Not refreshed: put the days back for the next recomputation.
            if let Ok(mut t) = self.touched.lock() {
                t.extend(days);
            }
            return Err(e);
        }
        let total = sum(ctx, doc! { "kind": "daily" })
            .await?
            .values()
            .sum::<i64>();
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": TOTALS_ID },
            doc! { "$max": { "total_users": total }, "$setOnInsert": { "kind": "totals" } },
        )
        .await?;
        *covered = start;
        Ok(())
    }
}
