//! `UserCreated` -> `user_statistics`: sign-ups per day and the total, each event counted exactly once.
//!
//! Without transactions, "exactly once" must live in one document update: a bucket document per day and
//! event-id hash (`bucket:YYYY-MM-DD:hh`, 256 per day, so no list grows past 1/256 of a day's sign-ups) lists
//! the event ids it has counted, and its increment is guarded by that list. Everything else is derived and only
//! ever raised with `$max`, so it can neither double-count nor lose an event after a crash:
//! - `daily:YYYY-MM-DD` keeps each bucket's count (`buckets.hh`) and their sum (`signups`);
//! - `totals` keeps each day's sum (`days.YYYY-MM-DD`) and their sum (`total_users`).
//!
//! The day is the event's creation time (`created_at`). A deployment whose records carry no creation time falls
//! back to the Kafka timestamp, the time Debezium read the change: if Debezium emits the same row again (after a
//! connector restart) on the other side of midnight, the copies land in two days' buckets and both count.
//!
//! A recount reads only the buckets and days that changed since the last one, and is shared by every event of a
//! batch, so its cost does not grow with the number of sign-ups already counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::{USER_STATISTICS, occurred_at};
use mongodb::IndexModel;

use crate::event::OutboxEvent;
use crate::handler::{EventHandler, HandlerContext, HandlerError, classify, guarded_upsert};
use crate::writer::bson_int;

/// `_id` of the document holding `total_users`.
pub const TOTALS_ID: &str = "totals";

/// Counts sign-ups per day (`_id` = `daily:YYYY-MM-DD`, `signups`) and in total (`_id` = `totals`,
/// `total_users`).
#[derive(Default)]
pub struct UserStatisticsHandler {
    /// Tickets handed to events whose bucket write is acknowledged.
    issued: AtomicU64,
    /// The highest ticket a finished recount covers.
    covered: tokio::sync::Mutex<u64>,
    /// Buckets (`bucket:...` ids) written since the last recount.
    touched: std::sync::Mutex<BTreeSet<String>>,
}

/// The bucket of an event: a stable hash of its id, as two hex digits.
fn bucket_of(event_id: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let h = event_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:02x}", h & 0xff)
}

fn number(d: &Document, key: &str) -> i64 {
    bson_int(d.get(key)).unwrap_or(0)
}

/// The documents of `user_statistics` with these ids, projected.
async fn read(
    ctx: &HandlerContext,
    ids: Vec<String>,
    projection: Document,
) -> Result<Vec<Document>, HandlerError> {
    ctx.db
        .collection::<Document>(USER_STATISTICS)
        .find(doc! { "_id": { "$in": ids } })
        .projection(projection)
        .await
        .map_err(classify)?
        .try_collect()
        .await
        .map_err(classify)
}

/// Sums the values of a sub-document of numbers.
fn sum_of(d: &Document, key: &str) -> i64 {
    d.get_document(key)
        .map(|m| m.keys().map(|k| number(m, k)).sum())
        .unwrap_or(0)
}

/// Raises the derived documents to what the touched buckets say.
async fn recount(ctx: &HandlerContext, buckets: Vec<String>) -> Result<(), HandlerError> {
    // 1. Each touched bucket's count into its day.
    let mut per_day: BTreeMap<String, Document> = BTreeMap::new();
    for b in read(ctx, buckets, doc! { "signups": 1, "date": 1 }).await? {
        let (Ok(id), Ok(day)) = (b.get_str("_id"), b.get_str("date")) else {
            continue;
        };
        let hh = id.rsplit(':').next().unwrap_or_default();
        per_day
            .entry(day.to_string())
            .or_default()
            .insert(format!("buckets.{hh}"), number(&b, "signups"));
    }
    let days: Vec<String> = per_day.keys().cloned().collect();
    futures::future::try_join_all(per_day.into_iter().map(|(day, max)| async move {
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": format!("daily:{day}") },
            doc! { "$max": max, "$setOnInsert": { "kind": "daily", "date": &day } },
        )
        .await
    }))
    .await?;
    // 2. Each touched day's sum into the day and into the totals.
    let ids = days.iter().map(|d| format!("daily:{d}")).collect();
    let mut day_sums = Document::new();
    for d in read(ctx, ids, doc! { "buckets": 1, "date": 1 }).await? {
        let (Ok(id), Ok(day)) = (d.get_str("_id"), d.get_str("date")) else {
            continue;
        };
        let n = sum_of(&d, "buckets");
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": id },
            doc! { "$max": { "signups": n } },
        )
        .await?;
        day_sums.insert(format!("days.{day}"), n);
    }
    if day_sums.is_empty() {
        return Ok(());
    }
    guarded_upsert(
        ctx,
        USER_STATISTICS,
        doc! { "_id": TOTALS_ID },
        doc! { "$max": day_sums, "$setOnInsert": { "kind": "totals" } },
    )
    .await?;
    // 3. The total.
    let totals = read(ctx, vec![TOTALS_ID.to_string()], doc! { "days": 1 }).await?;
    let total = totals.first().map(|t| sum_of(t, "days")).unwrap_or(0);
    guarded_upsert(
        ctx,
        USER_STATISTICS,
        doc! { "_id": TOTALS_ID },
        doc! { "$max": { "total_users": total } },
    )
    .await
}

#[async_trait]
impl EventHandler for UserStatisticsHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }

    fn name(&self) -> &str {
        "UserStatisticsHandler"
    }

    fn indexes(&self) -> Vec<(String, IndexModel)> {
        vec![super::index(USER_STATISTICS, doc! { "kind": 1, "date": 1 })]
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let at = occurred_at(event);
        let day = at
            .try_to_rfc3339_string()
            .map_err(|e| HandlerError::invalid(format!("event time out of range: {e}")))?;
        let day = &day[..10];
        let bucket = format!("bucket:{day}:{}", bucket_of(&event.event_id));
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": &bucket, "event_ids": { "$ne": &event.event_id } },
            doc! {
                "$inc": { "signups": 1 },
                "$push": { "event_ids": &event.event_id },
                "$setOnInsert": { "kind": "bucket", "date": day },
            },
        )
        .await?;
        crate::lock(&self.touched).insert(bucket);

        // Recount every time (even when the event was already counted): a crash between the bucket write
        // and the recount must not leave the derived counts behind for good. Concurrent events share one recomputation that
        // started after their bucket write was acknowledged.
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = self.covered.lock().await;
        if *covered >= ticket {
            return Ok(());
        }
        let start = self.issued.load(Ordering::SeqCst);
        let buckets: Vec<String> = std::mem::take(&mut *crate::lock(&self.touched))
            .into_iter()
            .collect();
        if let Err(e) = recount(ctx, buckets.clone()).await {
            // Not recounted: keep the buckets for the next recount.
            crate::lock(&self.touched).extend(buckets);
            return Err(e);
        }
        *covered = start;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_of;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("a"), bucket_of("a"));
        assert_eq!(bucket_of("a").len(), 2);
        let ids: std::collections::BTreeSet<String> = (0..5000)
            .map(|i| bucket_of(&uuid::Uuid::from_u128(i * 7919).to_string()))
            .collect();
        assert_eq!(ids.len(), 256);
    }
}
