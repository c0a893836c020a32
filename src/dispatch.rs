//! Keyed lanes, continuously: records of one key (topic, partition, Kafka key) run one after the other in offset
//! order; different keys run concurrently, at most `PROCESSING_CONCURRENCY` records at a time. Records are
//! submitted as they are polled and nothing waits for a whole batch, so the MongoDB writer always has the next
//! statements queued while a command is in flight, and one slow aggregate holds up only its own lane.
//!
//! Owns the lanes, the in-flight count and the per-batch accounting; marks finished records in the
//! [`OffsetTracker`] and leaves committing to the caller. A record of a partition the tracker no longer owns
//! (revoked meanwhile) is not run.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{Notify, Semaphore};
use tracing::info;

use crate::kafka::OffsetTracker;
use crate::pipeline::{BatchStats, Processor, RecordOutcome};

/// A lane: one key of one partition.
type LaneKey = (String, i32, Option<Vec<u8>>);

struct Item {
    msg: OwnedMessage,
    batch: Arc<Batch>,
}

/// The records submitted together: counted until the last one ends, then logged as one batch.
struct Batch {
    started: Instant,
    remaining: AtomicUsize,
    stats: Mutex<BatchStats>,
    done: Notify,
}

/// Totals since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub processed: u64,
    pub skipped: u64,
    pub errors: u64,
    pub abandoned: u64,
}

struct Inner {
    processor: Arc<Processor>,
    tracker: Arc<Mutex<OffsetTracker>>,
    lanes: Mutex<HashMap<LaneKey, VecDeque<Item>>>,
    permits: Semaphore,
    in_flight: AtomicUsize,
    progress: Notify,
    totals: Mutex<Totals>,
}

/// Runs submitted records in keyed lanes. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

/// A submitted batch; [`BatchHandle::finished`] waits for its last record.
pub struct BatchHandle(Arc<Batch>);

impl BatchHandle {
    /// Waits until every record of the batch has ended, and returns its counts.
    pub async fn finished(self) -> BatchStats {
        loop {
            let notified = self.0.done.notified();
            if self.0.remaining.load(Ordering::SeqCst) == 0 {
                return self.0.stats.lock().map(|s| *s).unwrap_or_default();
            }
            notified.await;
        }
    }
}

impl Dispatcher {
    pub fn new(processor: Arc<Processor>, tracker: Arc<Mutex<OffsetTracker>>) -> Self {
        let concurrency = processor.settings.concurrency.max(1);
        Dispatcher {
            inner: Arc::new(Inner {
                processor,
                tracker,
                lanes: Mutex::new(HashMap::new()),
                permits: Semaphore::new(concurrency),
                in_flight: AtomicUsize::new(0),
                progress: Notify::new(),
                totals: Mutex::new(Totals::default()),
            }),
        }
    }

    /// Takes records into processing: tracked at once, run as their lanes get to them.
    pub fn submit(&self, records: Vec<OwnedMessage>) -> BatchHandle {
        let batch = Arc::new(Batch {
            started: Instant::now(),
            remaining: AtomicUsize::new(records.len()),
            stats: Mutex::new(BatchStats {
                records: records.len(),
                ..Default::default()
            }),
            done: Notify::new(),
        });
        if records.is_empty() {
            return BatchHandle(batch);
        }
        metrics::histogram!("event_processor_batch_size").record(records.len() as f64);
        if let Ok(mut t) = self.inner.tracker.lock() {
            for r in &records {
                t.track(r.topic(), r.partition(), r.offset());
            }
        }
        let n = self
            .inner
            .in_flight
            .fetch_add(records.len(), Ordering::SeqCst)
            + records.len();
        metrics::gauge!("event_processor_in_flight_records").set(n as f64);
        let Ok(mut lanes) = self.inner.lanes.lock() else {
            return BatchHandle(batch);
        };
        for msg in records {
            let key = (
                msg.topic().to_string(),
                msg.partition(),
                msg.key().map(<[u8]>::to_vec),
            );
            let item = Item {
                msg,
                batch: batch.clone(),
            };
            match lanes.get_mut(&key) {
                Some(queue) => queue.push_back(item),
                None => {
                    lanes.insert(key.clone(), VecDeque::new());
                    tokio::spawn(run_lane(self.inner.clone(), key, item));
                }
            }
        }
        BatchHandle(batch)
    }

    /// Records submitted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves after some record ended (or at once if one ended since the last call).
    pub async fn progressed(&self) {
        self.inner.progress.notified().await;
    }

    pub fn totals(&self) -> Totals {
        self.inner.totals.lock().map(|t| *t).unwrap_or_default()
    }
}

/// Runs a lane until its queue is empty, then removes it.
async fn run_lane(inner: Arc<Inner>, key: LaneKey, first: Item) {
    let mut item = first;
    let mut abandoned = false;
    loop {
        // Once a record of a lane is abandoned, later records of the same key must not run ahead of it.
        let outcome =
            if abandoned || inner.processor.cancel.is_cancelled() || !inner.owns(&item.msg) {
                RecordOutcome::Abandoned
            } else {
                let _permit = inner.permits.acquire().await.ok();
                inner.processor.process_record(&item.msg).await
            };
        abandoned = outcome == RecordOutcome::Abandoned;
        inner.ended(&item, outcome);
        let next = match inner.lanes.lock() {
            Ok(mut lanes) => match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => Some(next),
                None => {
                    lanes.remove(&key);
                    None
                }
            },
            Err(_) => None,
        };
        match next {
            Some(next) => item = next,
            None => return,
        }
    }
}

impl Inner {
    fn owns(&self, msg: &OwnedMessage) -> bool {
        self.tracker
            .lock()
            .is_ok_and(|t| t.is_pending(msg.topic(), msg.partition(), msg.offset()))
    }

    fn ended(&self, item: &Item, outcome: RecordOutcome) {
        let msg = &item.msg;
        if outcome.finished()
            && let Ok(mut t) = self.tracker.lock()
        {
            t.finish(msg.topic(), msg.partition(), msg.offset());
        }
        if let Ok(mut t) = self.totals.lock() {
            match outcome {
                RecordOutcome::Processed { dead_lettered } => {
                    t.processed += 1;
                    t.errors += dead_lettered as u64;
                }
                RecordOutcome::Skipped => t.skipped += 1,
                RecordOutcome::DeadLettered => t.errors += 1,
                RecordOutcome::Abandoned => t.abandoned += 1,
            }
        }
        if let Ok(mut s) = item.batch.stats.lock() {
            s.add(outcome);
        }
        let n = self
            .in_flight
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        metrics::gauge!("event_processor_in_flight_records").set(n as f64);
        if item.batch.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            batch_done(
                &item.batch,
                msg,
                self.totals.lock().map(|t| *t).unwrap_or_default(),
            );
        }
        self.progress.notify_one();
    }
}

fn batch_done(batch: &Batch, last: &OwnedMessage, totals: Totals) {
    let s = batch.stats.lock().map(|s| *s).unwrap_or_default();
    if let Some(ts) = last.timestamp().to_millis() {
        let lag = (crate::health::now_ms() - ts).max(0) as f64 / 1000.0;
        metrics::gauge!("event_processor_last_batch_lag_seconds").set(lag);
    }
    info!(
        batch_size = s.records,
        processed = s.processed,
        skipped = s.skipped,
        dead_lettered = s.dead_lettered,
        abandoned = s.abandoned,
        total_processed = totals.processed,
        total_errors = totals.errors,
        processing_time_ms = batch.started.elapsed().as_millis() as u64,
        "Batch done"
    );
    batch.done.notify_waiters();
}
