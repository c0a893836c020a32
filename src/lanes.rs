//! Keyed lanes, continuously: records of one key (topic, partition, Kafka key) run one after the other in offset
//! order; different keys run concurrently, at most `PROCESSING_CONCURRENCY` records at a time. Records are
//! submitted as they are polled and nothing waits for a whole batch, so the MongoDB writer always has the next
//! statements queued while a command is in flight, and one slow aggregate holds up only its own lane.
//!
//! Owns the lanes, the in-flight count and the per-batch accounting; marks finished records in the
//! [`OffsetTracker`] and leaves committing to the caller. A record of a partition the tracker no longer owns
//! (revoked meanwhile) is not run.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use foldhash::fast::RandomState;

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::kafka::OffsetTracker;
use crate::pipeline::{BatchStats, Processor, RecordOutcome, Tally};

mod away;
use away::Away;

/// A lane: the hash of (topic, partition, Kafka key). Two keys whose hashes collide share a lane: each keeps
/// its order, they merely do not run concurrently.
type LaneKey = u64;

struct Item {
    msg: OwnedMessage,
    /// The generation of its partition's assignment when it was taken in (see [`OffsetTracker::track_at`]).
    generation: u64,
    batch: Arc<Batch>,
}

/// The records submitted together: counted until the last one ends, then logged as one batch.
struct Batch {
    started: Instant,
    records: usize,
    remaining: AtomicUsize,
    counts: Counts,
    done: Notify,
}

/// Outcome counters, updated without a lock.
#[derive(Default)]
struct Counts {
    processed: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    abandoned: AtomicU64,
}

impl Counts {
    fn add(&self, outcome: RecordOutcome) {
        let counter = match outcome {
            RecordOutcome::Processed { dead_lettered } => {
                self.dead_lettered
                    .fetch_add(dead_lettered as u64, Ordering::Relaxed);
                &self.processed
            }
            RecordOutcome::Skipped => &self.skipped,
            RecordOutcome::DeadLettered => &self.dead_lettered,
            RecordOutcome::Abandoned => &self.abandoned,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn stats(&self, records: usize) -> BatchStats {
        BatchStats {
            records,
            processed: Self::get(&self.processed) as usize,
            skipped: Self::get(&self.skipped) as usize,
            dead_lettered: Self::get(&self.dead_lettered) as usize,
            abandoned: Self::get(&self.abandoned) as usize,
        }
    }
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
    lanes: Mutex<HashMap<LaneKey, VecDeque<Item>, RandomState>>,
    hasher: RandomState,
    /// How many runners there are: `PROCESSING_CONCURRENCY`.
    concurrency: usize,
    /// Whether the runners were started (on the first submit, inside the runtime).
    runners_started: std::sync::atomic::AtomicBool,
    /// Set once the processor's cancellation token is cancelled, by a task that waits for it: asking the token
    /// takes its lock, which every runner would contend for on every record.
    stopping: std::sync::atomic::AtomicBool,
    /// New lanes waiting for a runner, in the order they arrived.
    ready: Mutex<VecDeque<(LaneKey, Item)>>,
    /// Wakes a runner when a lane is ready.
    work: Notify,
    /// Cancelled when the last handle of the lanes are dropped: idle runners end.
    closed: CancellationToken,
    in_flight: AtomicUsize,
    in_flight_gauge: metrics::Gauge,
    progress: Notify,
    /// Since start: processed, skipped, errors (dead-lettered records and handlers), abandoned.
    totals: Counts,
    /// Holds the lanes after the process was away long enough to have lost its partitions.
    away: Away,
}

/// Runs submitted records in keyed lanes. Cheap to clone.
#[derive(Clone)]
pub struct Lanes {
    inner: Arc<Inner>,
    _close: Arc<CloseOnDrop>,
}

/// Ends the idle runners once the last handle of their lanes is gone (they hold the state, not a handle).
struct CloseOnDrop(CancellationToken);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A submitted batch. The loop never waits for one (records are committed one by one as they finish); tests
/// wait for its last record with `finished`.
pub struct BatchHandle(#[cfg_attr(not(test), allow(dead_code))] Arc<Batch>);

impl BatchHandle {
    /// Waits until every record of the batch has ended, and returns its counts.
    #[cfg(test)]
    pub async fn finished(self) -> BatchStats {
        loop {
            let notified = self.0.done.notified();
            if self.0.remaining.load(Ordering::SeqCst) == 0 {
                return self.0.counts.stats(self.0.records);
            }
            notified.await;
        }
    }
}

impl Lanes {
    pub fn new(processor: Arc<Processor>, tracker: Arc<Mutex<OffsetTracker>>) -> Self {
        let concurrency = processor.settings.concurrency.max(1);
        let processor_away_threshold = processor.settings.away_threshold;
        let closed = CancellationToken::new();
        Lanes {
            _close: Arc::new(CloseOnDrop(closed.clone())),
            inner: Arc::new(Inner {
                processor,
                tracker,
                lanes: Mutex::new(HashMap::default()),
                hasher: RandomState::default(),
                concurrency,
                runners_started: std::sync::atomic::AtomicBool::new(false),
                stopping: std::sync::atomic::AtomicBool::new(false),
                ready: Mutex::new(VecDeque::new()),
                work: Notify::new(),
                closed,
                in_flight: AtomicUsize::new(0),
                in_flight_gauge: metrics::gauge!(crate::catalogue::IN_FLIGHT),
                progress: Notify::new(),
                totals: Counts::default(),
                away: Away::new(processor_away_threshold),
            }),
        }
    }

    /// Takes records into processing: tracked at once, run as their lanes get to them.
    pub fn submit(&self, records: Vec<OwnedMessage>) -> BatchHandle {
        let batch = Arc::new(Batch {
            started: Instant::now(),
            records: records.len(),
            remaining: AtomicUsize::new(records.len()),
            counts: Counts::default(),
            done: Notify::new(),
        });
        if records.is_empty() {
            return BatchHandle(batch);
        }
        metrics::histogram!(crate::catalogue::BATCH_SIZE).record(records.len() as f64);
        let generations: Vec<u64> = {
            let mut t = crate::lock(&self.inner.tracker);
            records
                .iter()
                .map(|r| {
                    t.track_at(
                        r.topic(),
                        r.partition(),
                        r.offset(),
                        r.timestamp().to_millis(),
                    )
                })
                .collect()
        };
        let n = self
            .inner
            .in_flight
            .fetch_add(records.len(), Ordering::SeqCst)
            + records.len();
        self.inner.in_flight_gauge.set(n as f64);
        self.start_runners();
        let mut fresh = Vec::new();
        let mut lanes = crate::lock(&self.inner.lanes);
        for (msg, generation) in records.into_iter().zip(generations) {
            let key = self
                .inner
                .hasher
                .hash_one((msg.topic(), msg.partition(), msg.key()));
            let item = Item {
                msg,
                generation,
                batch: batch.clone(),
            };
            match lanes.get_mut(&key) {
                Some(queue) => queue.push_back(item),
                None => {
                    lanes.insert(key, VecDeque::new());
                    fresh.push((key, item));
                }
            }
        }
        drop(lanes);
        let woken = fresh.len();
        crate::lock(&self.inner.ready).extend(fresh);
        for _ in 0..woken {
            self.inner.work.notify_one();
        }
        BatchHandle(batch)
    }

    /// `PROCESSING_CONCURRENCY` runners, each taking the next ready lane and running it until it is empty: a
    /// pool instead of a task per new key (most keys are new ones).
    fn start_runners(&self) {
        if self.inner.runners_started.swap(true, Ordering::AcqRel) {
            return;
        }
        for _ in 0..self.inner.concurrency {
            tokio::spawn(runner(self.inner.clone()));
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = inner.processor.cancel.cancelled() => inner.stopping.store(true, Ordering::Release),
                _ = inner.closed.cancelled() => {}
            }
        });
        // The clock's reading that tells a gap (`away`).
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = inner.closed.cancelled() => return,
                    _ = tokio::time::sleep(away::TICK) => inner.away.check(),
                }
            }
        });
    }

    /// Resolves once the lanes were held after a gap (see `lanes::away`): the assignment needs confirming.
    pub async fn away_noticed(&self) {
        self.inner.away.noticed().await;
    }

    /// Whether the lanes are held after a gap.
    pub fn held(&self) -> bool {
        self.inner.away.is_held()
    }

    /// The assignment is confirmed: held records start.
    pub fn release(&self) {
        self.inner.away.release();
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
        self.inner.totals()
    }
}

/// Takes ready lanes one after the other until the lanes are dropped.
async fn runner(inner: Arc<Inner>) {
    // Dropped (flushed) when the runner ends, and so when the runtime drops it.
    let mut tally = Tally::default();
    loop {
        let next = crate::lock(&inner.ready).pop_front();
        if let Some((key, first)) = next {
            run_lane(&inner, key, first, &mut tally).await;
            continue;
        }
        inner.flush(&mut tally);
        let notified = inner.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !crate::lock(&inner.ready).is_empty() {
            continue;
        }
        tokio::select! {
            _ = notified => {}
            _ = inner.closed.cancelled() => return,
        }
    }
}

/// Runs a lane until its queue is empty, then removes it.
async fn run_lane(inner: &Inner, key: LaneKey, first: Item, tally: &mut Tally) {
    let mut item = first;
    loop {
        // A record is abandoned on shutdown (then so is every later one) or when its partition's assignment
        // ended (then so did that of every later record of the lane taken in under it; records of the partition
        // fetched again under a new assignment queue behind them and run). Checked when the record's turn comes:
        // a new lane may have waited long for a runner (all of them busy), and its partition may have moved.
        // After a gap the record waits until its partition is confirmed ours (or dropped as lost).
        tokio::select! {
            _ = inner.away.pass() => {}
            _ = inner.processor.cancel.cancelled() => {}
        }
        let outcome = if inner.stopping.load(Ordering::Acquire) || !inner.owns(&item) {
            RecordOutcome::Abandoned
        } else {
            inner.processor.process_counted(&item.msg, tally).await
        };
        // While records queue for a runner the counts wait for a few more; otherwise every record's are in the
        // metrics before its end is (a test, or an operator, that sees a record finished sees it counted).
        if tally.pending() >= TALLY_RECORDS
            || inner.in_flight.load(Ordering::Relaxed) <= inner.concurrency
        {
            inner.flush(tally);
        }
        inner.ended(&item, outcome);
        let next = {
            let mut lanes = crate::lock(&inner.lanes);
            let next = lanes.get_mut(&key).and_then(VecDeque::pop_front);
            if next.is_none() {
                lanes.remove(&key);
            }
            next
        };
        match next {
            Some(next) => item = next,
            None => return,
        }
    }
}

/// Records a lane runner counts before it adds them to the shared metrics, at most.
const TALLY_RECORDS: usize = 64;

impl Inner {
    /// Adds the tally to the shared metrics, with the number of records in flight.
    fn flush(&self, tally: &mut Tally) {
        tally.flush();
        self.in_flight_gauge
            .set(self.in_flight.load(Ordering::Relaxed) as f64);
    }

    fn owns(&self, item: &Item) -> bool {
        let msg = &item.msg;
        crate::lock(&self.tracker).is_pending(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            item.generation,
        )
    }

    fn ended(&self, item: &Item, outcome: RecordOutcome) {
        let msg = &item.msg;
        if outcome.finished() {
            crate::lock(&self.tracker).finish(
                msg.topic(),
                msg.partition(),
                msg.offset(),
                item.generation,
            );
        }
        self.totals.add(outcome);
        item.batch.counts.add(outcome);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if item.batch.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            batch_done(&item.batch, msg, self.totals());
        }
        self.progress.notify_one();
    }

    fn totals(&self) -> Totals {
        let t = &self.totals;
        Totals {
            processed: Counts::get(&t.processed),
            skipped: Counts::get(&t.skipped),
            errors: Counts::get(&t.dead_lettered),
            abandoned: Counts::get(&t.abandoned),
        }
    }
}

fn batch_done(batch: &Batch, last: &OwnedMessage, totals: Totals) {
    let s = batch.counts.stats(batch.records);
    if let Some(ts) = last.timestamp().to_millis() {
        let lag = (crate::now_ms() - ts).max(0) as f64 / 1000.0;
        metrics::gauge!(crate::catalogue::LAST_BATCH_LAG).set(lag);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::pipeline::tests::{Behaviour, Sink, TestHandler, processor, record};

    #[tokio::test(start_paused = true)]
    async fn one_slow_key_holds_up_only_its_own_lane_and_the_commit() {
        let h = TestHandler::new("h", Behaviour::SlowKey(Duration::from_secs(4)));
        let p = Arc::new(processor(vec![h.clone()], Arc::new(Sink::default())));
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let d = Lanes::new(p, tracker.clone());
        let first = d.submit(vec![
            record(0, "slow", "UserCreated"),
            record(1, "b", "UserCreated"),
            record(2, "slow", "UserCreated"),
        ]);
        // A later batch runs while the first is still busy with the slow key.
        let second = d.submit(vec![
            record(3, "b", "UserCreated"),
            record(4, "c", "UserCreated"),
        ]);
        assert_eq!(second.finished().await.processed, 2);
        assert_eq!(*h.seen.lock().unwrap(), [1, 3, 4]);
        assert!(
            tracker.lock().unwrap().committable().is_empty(),
            "offset 0 is unfinished: nothing may be committed"
        );
        assert_eq!(d.in_flight(), 2);
        assert_eq!(first.finished().await.processed, 3);
        assert_eq!(*h.seen.lock().unwrap(), [1, 3, 4, 0, 2], "key order kept");
        assert_eq!(
            tracker.lock().unwrap().committable(),
            vec![(("t".to_string(), 0), 5)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_a_revoked_partition_are_not_run() {
        let h = TestHandler::new("h", Behaviour::SlowKey(Duration::from_secs(3)));
        let p = Arc::new(processor(vec![h.clone()], Arc::new(Sink::default())));
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let d = Lanes::new(p, tracker.clone());
        let batch = d.submit(vec![
            record(0, "slow", "UserCreated"),
            record(1, "slow", "UserCreated"),
        ]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracker.lock().unwrap().revoke(&[("t".to_string(), 0)]);
        let stats = batch.finished().await;
        assert_eq!((stats.processed, stats.abandoned), (1, 1));
        assert_eq!(
            *h.seen.lock().unwrap(),
            [0],
            "the queued record did not run"
        );
    }

    /// A partition revoked while records of a key are queued, then assigned back and fetched again from its committed
    /// offset: the queued records of the old assignment must not run (nor run ahead of the new ones), and the new
    /// ones must run, so the partition's commit moves on instead of stalling.
    #[tokio::test(start_paused = true)]
    async fn a_partition_assigned_back_runs_its_records_again_and_the_commit_moves_on() {
        let h = TestHandler::new("h", Behaviour::SlowKey(Duration::from_secs(3)));
        let p = Arc::new(processor(vec![h.clone()], Arc::new(Sink::default())));
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let d = Lanes::new(p, tracker.clone());
        let old = d.submit((0..3).map(|o| record(o, "slow", "UserCreated")).collect());
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracker.lock().unwrap().revoke(&[("t".to_string(), 0)]);
        // Assigned back at once, nothing committed: fetched again from offset 0 while offset 0 still runs.
        let new = d.submit((0..3).map(|o| record(o, "slow", "UserCreated")).collect());
        let old = old.finished().await;
        assert_eq!((old.processed, old.abandoned), (1, 2), "old: {old:?}");
        let new = new.finished().await;
        assert_eq!((new.processed, new.abandoned), (3, 0), "new: {new:?}");
        assert_eq!(
            *h.seen.lock().unwrap(),
            [0, 0, 1, 2],
            "the old assignment's queued records did not run; the new ones ran in order"
        );
        assert_eq!(
            tracker.lock().unwrap().committable(),
            vec![(("t".to_string(), 0), 3)]
        );
        assert_eq!(d.in_flight(), 0);
    }

    /// With every lane runner busy, a new lane waits for one; if its partition is revoked meanwhile, its record is not
    /// run once a runner comes (the next owner runs it).
    #[tokio::test(start_paused = true)]
    async fn a_record_whose_partition_moved_while_it_waited_for_a_runner_is_not_run() {
        let h = TestHandler::new("h", Behaviour::SlowKey(Duration::from_secs(3)));
        let mut p = processor(vec![h.clone()], Arc::new(Sink::default()));
        p.settings.concurrency = 1;
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let d = Lanes::new(Arc::new(p), tracker.clone());
        let batch = d.submit(vec![
            record(0, "slow", "UserCreated"),
            record(1, "other", "UserCreated"),
        ]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracker.lock().unwrap().revoke(&[("t".to_string(), 0)]);
        let s = batch.finished().await;
        assert_eq!((s.processed, s.abandoned), (1, 1), "{s:?}");
        assert_eq!(
            *h.seen.lock().unwrap(),
            [0],
            "only the record already running ran"
        );
        assert_eq!(d.in_flight(), 0);
    }
}
