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
//! batch, so its cost does not grow with the number of sign-ups already counted: four round trips (two reads,
//! two pipeline updates) whatever the batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};

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

/// An aggregation expression: the sum of the values of the sub-document `field` (0 when it is absent).
fn sum_of(field: &str) -> Document {
    doc! { "$sum": { "$map": {
        "input": { "$objectToArray": { "$ifNull": [format!("${field}"), {}] } },
        "in": "$$this.v",
    } } }
}

/// An aggregation expression: `field` raised to `value` (aggregation `$max` passes over an absent field).
fn raised(field: &str, value: impl Into<Bson>) -> Document {
    doc! { "$max": [format!("${field}"), value.into()] }
}

/// Raises the derived documents to what the touched buckets say, in four round trips: read the buckets, update
/// their days, read the days, update the totals. Each update raises its sub-counts and recomputes its sum from the
/// document it just raised, in one atomic pipeline update, so recounts running at once (in other replicas) cannot
/// leave a sum that misses a raise: the later of two updates of a document sees both raises.
async fn recount(ctx: &HandlerContext, buckets: Vec<String>) -> Result<(), HandlerError> {
    // 1. Each touched bucket's count, by day.
    let mut per_day: BTreeMap<String, Document> = BTreeMap::new();
    for b in read(ctx, buckets, doc! { "signups": 1, "date": 1 }).await? {
        let (Ok(id), Ok(day)) = (b.get_str("_id"), b.get_str("date")) else {
            continue;
        };
        let hh = id.rsplit(':').next().unwrap_or_default();
        let field = format!("buckets.{hh}");
        let raise = raised(&field, number(&b, "signups"));
        per_day
            .entry(day.to_string())
            .or_default()
            .insert(field, raise);
    }
    // 2. Into each day, and the day's sum (the days' updates go in one command).
    let days: Vec<String> = per_day.keys().cloned().collect();
    futures::future::try_join_all(per_day.into_iter().map(|(day, mut set)| async move {
        set.insert("kind", "daily");
        set.insert("date", doc! { "$literal": &day });
        let pipeline = vec![
            doc! { "$set": set },
            doc! { "$set": { "signups": raised("signups", sum_of("buckets")) } },
        ];
        guarded_upsert(
            ctx,
            USER_STATISTICS,
            doc! { "_id": format!("daily:{day}") },
            pipeline,
        )
        .await
    }))
    .await?;
    // 3. Each touched day's sum into the totals, and the total.
    let ids = days.iter().map(|d| format!("daily:{d}")).collect();
    let mut set = Document::new();
    for d in read(ctx, ids, doc! { "signups": 1, "date": 1 }).await? {
        let Ok(day) = d.get_str("date") else {
            continue;
        };
        let field = format!("days.{day}");
        let raise = raised(&field, number(&d, "signups"));
        set.insert(field, raise);
    }
    if set.is_empty() {
        return Ok(());
    }
    set.insert("kind", "totals");
    let pipeline = vec![
        doc! { "$set": set },
        doc! { "$set": { "total_users": raised("total_users", sum_of("days")) } },
    ];
    guarded_upsert(ctx, USER_STATISTICS, doc! { "_id": TOTALS_ID }, pipeline).await
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
