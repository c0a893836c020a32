//! The delivery loop: what is polled, when records start, when offsets are committed, and what happens to the
//! records of revoked partitions and on shutdown. The one file to read to change what is committed when.
//!
//! Two threads share the work. The poller (a thread of its own) drives the `StreamConsumer` and forwards, in
//! the order librdkafka produced them, records, errors and revokes; librdkafka runs its rebalance callbacks on
//! that thread, so a callback may block on the loop without blocking the runtime, whatever its flavour. The loop
//! (a task of the runtime) takes records in batches of up to `KAFKA_MAX_POLL_RECORDS`, records each offset in the
//! [`OffsetTracker`] before any work starts on it, submits it to the keyed lanes ([`Lanes`]), commits what
//! has finished, pauses the partitions while `PROCESSING_MAX_IN_FLIGHT` records are in flight, and answers
//! revokes: it drops what it holds of the revoked partitions, waits for their records in flight, and hands back
//! the offsets to commit before they move.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::access::AccessWatch;
use super::context::GroupContext;
use super::handoff::{Handoff, Polled, Revocation};
use super::{Kafka, OffsetTracker, Tp, client, is_missing_topic, to_tpl, tpl_to_vec};
use crate::config::Config;
use crate::health::Health;
use crate::lanes::Lanes;
use crate::pipeline::Processor;

/// Finished records are committed at most this often (and on revoke and shutdown).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A commit unanswered for this long is reported (once) as slow; librdkafka ends it within the session timeout
/// plus the request timeout, and the next commit waits for it.
const COMMIT_SLOW: Duration = Duration::from_secs(15);

/// How long the in-flight limit may hold the loop before it pauses the partitions and reads on without taking
/// records. Shorter stalls just leave records in librdkafka's queue: pausing drops its prefetched records, and
/// refetching them costs more than the wait.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// After a consumer error the poller waits this long before polling again, so a broker that is down is not
/// asked in a busy loop.
const AFTER_ERROR: Duration = Duration::from_millis(100);

/// Consumes until `shutdown` is cancelled (or the consumer cannot get back into its group), processing every
/// record with `processor`; then drains, commits what finished and leaves the group.
pub async fn run(
    config: &Config,
    processor: Arc<Processor>,
    health: Arc<Health>,
    access: Arc<AccessWatch>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    // A few bursts: while the in-flight limit holds the loop, records wait in librdkafka's queue instead.
    let (handoff, polled) = Handoff::channel(4);
    let handoff = Arc::new(handoff);
    let out_of_group = CancellationToken::new();
    let context = GroupContext {
        tracker: tracker.clone(),
        health: health.clone(),
        handoff: handoff.clone(),
        answer_within: config.rebalance_drain_timeout() + PAUSE_AFTER + Duration::from_secs(2),
        caught_up_at: Default::default(),
        rejoin: Mutex::new(super::RejoinWatch::new(config.kafka_rejoin_timeout_ms)),
        out_of_group: out_of_group.clone(),
        missing_topics: Default::default(),
        instance_slot: None,
        access: access.clone(),
    };
    let consumer = Arc::new(create_consumer(config, context).map_err(|e| {
        anyhow::anyhow!("creating the Kafka consumer (KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPICS): {e}")
    })?);
    info!(topics = ?config.topics(), group = %config.kafka_group_id, "Subscribed");
    let stop_polling = CancellationToken::new();
    let poller = spawn_poller(
        consumer.clone(),
        handoff,
        config.kafka_max_poll_records.max(1),
        stop_polling.clone(),
    )?;

    let work_cancel = processor.cancel.clone();
    let lanes = Lanes::new(processor, tracker.clone());
    let mut lp = Loop {
        config,
        consumer: consumer.clone(),
        polled,
        tracker,
        health,
        access,
        lanes: lanes.clone(),
        shutdown,
        out_of_group: out_of_group.clone(),
        work_cancel,
        carry: Vec::new(),
        paused: None,
        full_since: None,
        last_commit: Instant::now(),
        commit: None,
        last_stats: Instant::now(),
        stalled: Vec::new(),
        confirm_after: None,
    };
    let result = lp.run().await;
    lp.commit_final().await;
    let totals = lanes.totals();
    info!(
        total_processed = totals.processed,
        total_errors = totals.errors,
        total_skipped = totals.skipped,
        "event-processor stopped"
    );
    // Closing the channel first frees a poller waiting in a revoke; a revoke from here on (the consumer
    // leaving) commits what the tracker has not committed, as the loop is gone.
    drop(lp);
    if out_of_group.is_cancelled() {
        stop_polling.cancel();
        // Closing a consumer stuck outside its group can wait for good (for the commit it never got an answer
        // to): leave it, and the poller, to the process's exit.
        std::mem::forget(consumer);
        anyhow::bail!(
            "the Kafka consumer did not get back into its group within KAFKA_REJOIN_TIMEOUT_MS"
        );
    }
    leave_group(&consumer).await;
    stop_polling.cancel();
    tokio::task::spawn_blocking(move || {
        let _ = poller.join();
        if let Ok(c) = Arc::try_unwrap(consumer) {
            drop(c); // closes the consumer
        }
    })
    .await
    .ok();
    result
}

/// Builds and subscribes the consumer; its context keeps the claimed group instance id.
fn create_consumer(config: &Config, mut context: GroupContext) -> KafkaResult<Kafka> {
    let (cc, slot) = client::consumer_config_with_membership(config);
    context.instance_slot = slot;
    let consumer: Kafka = cc.create_with_context(context)?;
    let topics = config.topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// How long a clean shutdown waits for the group to take the partitions back.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

/// Leaves the group while the poller still drives the consumer, so that the partitions move to the other
/// members at once. librdkafka sends a static member's leave (`group.instance.id`, classic protocol) only for an
/// unsubscribe completed while the consumer runs, not when it is closed: closed without it, a static member's
/// partitions would wait out its session timeout. A restart after a crash never gets here, and rejoins as the same
/// member instead.
async fn leave_group(consumer: &Arc<Kafka>) {
    consumer.unsubscribe();
    let deadline = tokio::time::Instant::now() + LEAVE_WITHIN;
    while tokio::time::Instant::now() < deadline {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        if assigned == 0 {
            // The leave request goes out right after the partitions are given up: let it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            info!("Left the consumer group");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    warn!(
        waited_ms = LEAVE_WITHIN.as_millis() as u64,
        "The group did not take the partitions back in time; closing anyway"
    );
}

/// Starts the poller thread: it drives the consumer (so librdkafka's callbacks run on it) and sends the loop,
/// burst by burst, what the consumer has ready, waiting while the channel is full. Ends on `stop` or once the
/// loop is gone.
fn spawn_poller(
    consumer: Arc<Kafka>,
    handoff: Arc<Handoff>,
    max: usize,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kafka-poller".into())
        .spawn(move || {
            // Not a tokio runtime: the revoke callback blocks this thread on the loop's answer.
            futures::executor::block_on(async {
                let mut stream = consumer.stream();
                loop {
                    let first = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        m = stream.next() => m,
                    };
                    let mut error = None;
                    match first {
                        Some(Ok(m)) => {
                            handoff.push(m.detach());
                        }
                        Some(Err(e)) => error = Some(e),
                        None => return,
                    }
                    // Then what is ready already, without waiting.
                    while error.is_none() {
                        match stream.next().now_or_never() {
                            Some(Some(Ok(m))) => {
                                if handoff.push(m.detach()) >= max {
                                    break;
                                }
                            }
                            Some(Some(Err(e))) => error = Some(e),
                            _ => break,
                        }
                    }
                    // Once the loop is gone (shutdown), records are let go (uncommitted, their next owner reads
                    // them) and the poller drives the consumer on until `stop`: leaving the group takes polls.
                    let records = handoff.take_pending();
                    if !records.is_empty()
                        && !handoff.send(Polled::Records(records), &stop).await
                        && stop.is_cancelled()
                    {
                        return;
                    }
                    if let Some(e) = error {
                        if !handoff.send(Polled::Error(e), &stop).await && stop.is_cancelled() {
                            return;
                        }
                        std::thread::sleep(AFTER_ERROR);
                    }
                }
            })
        })
}

struct Loop<'a> {
    config: &'a Config,
    consumer: Arc<Kafka>,
    polled: mpsc::Receiver<Polled>,
    tracker: Arc<Mutex<OffsetTracker>>,
    health: Arc<Health>,
    /// What the brokers refuse: a record received means that whatever it was is over.
    access: Arc<AccessWatch>,
    lanes: Lanes,
    shutdown: CancellationToken,
    /// Cancelled when the consumer gave up getting back into its group: the loop ends as on shutdown.
    out_of_group: CancellationToken,
    work_cancel: CancellationToken,
    /// Records received while the in-flight limit held the loop, processed next.
    carry: Vec<OwnedMessage>,
    /// The partitions paused for backpressure, if any.
    paused: Option<TopicPartitionList>,
    /// Since when the in-flight limit holds the loop.
    full_since: Option<Instant>,
    last_commit: Instant,
    /// The commit sent and not answered yet: one at a time, so they land in order.
    commit: Option<PendingCommit>,
    last_stats: Instant,
    /// The partitions reported stalled, with the offset that holds each.
    stalled: Vec<(Tp, i64)>,
    /// Set when the lanes were held after a gap (`lanes::away`): a commit sent after it and accepted confirms the
    /// assignment and releases them.
    confirm_after: Option<Instant>,
}

impl Loop<'_> {
    /// Polls and submits until shutdown, then drains.
    async fn run(&mut self) -> anyhow::Result<()> {
        let result = loop {
            match self.poll().await {
                Ok(Some(mut batch)) => {
                    while !batch.is_empty() {
                        let rest =
                            batch.split_off(batch.len().min(self.config.processing_batch_size));
                        self.lanes.submit(std::mem::replace(&mut batch, rest));
                    }
                    self.commit_if_due().await;
                    self.periodic_stats();
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.drain().await;
        result
    }

    /// Takes up to `KAFKA_MAX_POLL_RECORDS`: waits for the first, then whatever arrives within the linger.
    /// Meanwhile commits what finishes, answers revokes, and pauses the partitions while
    /// `PROCESSING_MAX_IN_FLIGHT` records are in flight (still reading, so the poller keeps polling and the group
    /// keeps us). `None` on shutdown.
    async fn poll(&mut self) -> anyhow::Result<Option<Vec<OwnedMessage>>> {
        let max = self.config.kafka_max_poll_records;
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(max);
        let tick = tokio::time::sleep(COMMIT_INTERVAL);
        tokio::pin!(tick);
        loop {
            let full = self.lanes.in_flight() >= self.config.processing_max_in_flight;
            self.flow_control(full);
            if !full {
                let take = max.min(self.carry.len());
                batch.extend(self.carry.drain(..take));
            }
            if !batch.is_empty() {
                break;
            }
            self.health.beat();
            // While full, records wait in the channel and librdkafka's queue; once full for PAUSE_AFTER the
            // partitions are paused and the loop reads on (revokes need an answer) into `carry`.
            let receive = !full || self.paused.is_some();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(None),
                _ = self.out_of_group.cancelled() => return Ok(None),
                p = self.polled.recv(), if receive => {
                    self.take(p, &mut batch, full).await?;
                }
                _ = self.lanes.progressed() => self.commit_if_due().await,
                _ = self.lanes.away_noticed() => {
                    self.confirm_after = Some(Instant::now());
                    self.commit_finished().await;
                }
                _ = &mut tick => {
                    self.commit_finished().await;
                    self.check_stalls();
                    self.periodic_stats();
                    tick.as_mut().reset(tokio::time::Instant::now() + COMMIT_INTERVAL);
                }
            }
        }
        let linger = Duration::from_millis(self.config.kafka_poll_linger_ms);
        if linger.is_zero() {
            // What has arrived already, without waiting for a timer.
            while batch.len() < max {
                match self.polled.try_recv() {
                    Ok(p) => {
                        if !self.take(Some(p), &mut batch, false).await? {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        } else {
            let linger = tokio::time::sleep(linger);
            tokio::pin!(linger);
            while batch.len() < max {
                tokio::select! {
                    biased;
                    p = self.polled.recv() => if !self.take(p, &mut batch, false).await? { break },
                    _ = &mut linger => break,
                }
            }
        }
        Ok(Some(batch))
    }

    /// Takes what the poller sent: a record into the batch (into `carry` while `hold`), an error into the logs,
    /// a revoke answered. False when the batch should go as it is (after an error); an error when the poller
    /// is gone.
    async fn take(
        &mut self,
        polled: Option<Polled>,
        batch: &mut Vec<OwnedMessage>,
        hold: bool,
    ) -> anyhow::Result<bool> {
        if matches!(polled, Some(Polled::Records(_))) {
            self.access.clear();
        }
        match polled {
            Some(Polled::Records(r)) if hold => self.carry.extend(r),
            Some(Polled::Records(r)) => batch.extend(r),
            Some(Polled::Error(e)) => {
                recv_error(e, &self.access);
                return Ok(false);
            }
            Some(Polled::Revoked(r)) => self.revoked(r, batch).await,
            None => anyhow::bail!("the Kafka poller thread ended"),
        }
        Ok(true)
    }

    /// Answers a revoke: forgets the records of the revoked partitions received and not started (submitted,
    /// they would be tracked as a new assignment of a partition another consumer now owns, and committed over
    /// that owner's offsets), waits up to `REBALANCE_DRAIN_TIMEOUT_MS` for those in flight (unless lost), and
    /// hands back the finished offsets for the callback to commit before the partitions move.
    async fn revoked(&mut self, r: Revocation, batch: &mut Vec<OwnedMessage>) {
        let dropped =
            drop_records_of(&r.partitions, &mut self.carry) + drop_records_of(&r.partitions, batch);
        if dropped > 0 {
            info!(
                dropped,
                partitions = ?r.partitions,
                "Dropped received records of revoked partitions; their next owner reads them"
            );
        }
        if !r.lost {
            self.drain_partitions(&r.partitions).await;
        }
        let offsets = crate::lock(&self.tracker).revoke(&r.partitions);
        // The callback may have stopped waiting; then it committed what the tracker had without us.
        let _ = r.answer.send(offsets);
    }

    /// Waits, up to the drain timeout, until no record of `partitions` is in flight.
    async fn drain_partitions(&self, partitions: &[Tp]) {
        let unfinished = || crate::lock(&self.tracker).unfinished_in(partitions);
        let before = unfinished();
        if before == 0 {
            return;
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.rebalance_drain_timeout();
        while unfinished() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = self.lanes.progressed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        let left = unfinished();
        if left > 0 {
            warn!(
                in_flight = before,
                unfinished = left,
                waited_ms = started.elapsed().as_millis() as u64,
                "Rebalance drain deadline reached; unfinished records of revoked partitions are left to the next owner"
            );
        } else {
            info!(
                in_flight = before,
                waited_ms = started.elapsed().as_millis() as u64,
                "Drained in-flight records of revoked partitions"
            );
        }
    }

    /// Pauses every assigned partition once it has been `full` for [`PAUSE_AFTER`], resumes those still assigned
    /// when not.
    fn flow_control(&mut self, full: bool) {
        if !full {
            self.full_since = None;
        }
        let since = full.then(|| *self.full_since.get_or_insert_with(Instant::now));
        if self.paused.is_none() && since.is_some_and(|s| s.elapsed() >= PAUSE_AFTER) {
            if let Ok(a) = self.consumer.assignment() {
                match self.consumer.pause(&a) {
                    Ok(()) => {
                        debug!(
                            in_flight = self.lanes.in_flight(),
                            "In-flight limit reached; partitions paused"
                        );
                        metrics::counter!(crate::catalogue::BACKPRESSURE_PAUSES).increment(1);
                    }
                    Err(e) => warn!(error = %e, "Pausing partitions failed"),
                }
                self.paused = Some(a);
            }
        } else if !full && let Some(p) = self.paused.take() {
            let assigned = self
                .consumer
                .assignment()
                .map(|a| tpl_to_vec(&a))
                .unwrap_or_default();
            let mut still = TopicPartitionList::new();
            for e in p.elements() {
                if assigned.contains(&(e.topic().to_string(), e.partition())) {
                    still.add_partition(e.topic(), e.partition());
                }
            }
            if let Err(e) = self.consumer.resume(&still) {
                warn!(error = %e, "Resuming partitions failed");
            } else {
                debug!("Partitions resumed");
            }
        }
    }

    /// Shutdown: stop fetching, stop retries, give the handler calls already running `SHUTDOWN_TIMEOUT_MS`, then
    /// commit what is finished (the caller does).
    async fn drain(&mut self) {
        if self.lanes.in_flight() == 0 {
            return;
        }
        info!(
            in_flight = self.lanes.in_flight(),
            timeout_ms = self.config.shutdown_timeout_ms,
            "Draining in-flight records before shutdown"
        );
        // Retries stop and records not yet started are abandoned; handler calls already running go on.
        self.work_cancel.cancel();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout();
        while self.lanes.in_flight() > 0 {
            tokio::select! {
                _ = self.lanes.progressed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(in_flight = self.lanes.in_flight(), "Shutdown deadline reached; abandoning unfinished records (they stay uncommitted)");
                    return;
                }
            }
        }
    }

    async fn commit_if_due(&mut self) {
        if self.last_commit.elapsed() >= COMMIT_INTERVAL {
            self.commit_finished().await;
        }
    }

    /// Commits, per partition, up to the first unfinished record. On a blocking thread, so the loop never waits
    /// for the broker, and one at a time: while one is unanswered the next waits (what finishes meanwhile goes
    /// with it). A refused commit leaves the tracker as it was, so the next one sends those offsets again.
    async fn commit_finished(&mut self) {
        self.last_commit = Instant::now();
        if !self.commit_answered().await {
            return;
        }
        let offsets = if self.confirm_after.is_some() {
            // Every partition with records taken in, committed or not: the coordinator accepts the commit only
            // from a member of the current generation, which confirms the assignment after a gap.
            let positions = crate::lock(&self.tracker).positions();
            if positions.is_empty() {
                // Nothing taken in is waiting: nothing can run for a partition that is not ours.
                self.confirm_after = None;
                self.lanes.release();
                return;
            }
            positions
        } else {
            crate::lock(&self.tracker).committable()
        };
        if offsets.is_empty() {
            return;
        }
        self.commit = Some(PendingCommit {
            task: spawn_commit(&self.consumer, offsets.clone()),
            offsets,
            sent: Instant::now(),
            reported_slow: false,
        });
    }

    /// Takes in the answer to the commit sent last, if it came; false while it is still awaited.
    async fn commit_answered(&mut self) -> bool {
        let Some(c) = self.commit.as_mut() else {
            return true;
        };
        if !c.task.is_finished() {
            if !c.reported_slow && c.sent.elapsed() >= COMMIT_SLOW {
                c.reported_slow = true;
                warn!(waited_s = c.sent.elapsed().as_secs(), offsets = ?c.offsets, "Commit not answered yet; later commits wait for it");
            }
            return false;
        }
        let Some(c) = self.commit.take() else {
            return true;
        };
        let result = c.task.await.unwrap_or(Err(KafkaError::Canceled));
        match result {
            Ok(()) => {
                debug!(offsets = ?c.offsets, "Offsets committed");
                crate::lock(&self.tracker).committed(&c.offsets);
                self.health.commit_result(true);
                if self.confirm_after.is_some_and(|t| c.sent >= t) {
                    self.confirm_after = None;
                    self.lanes.release();
                }
            }
            Err(e) => {
                // Not fatal: the records are finished; the next commit sends their offsets again (or the next
                // owner redoes them, idempotently).
                warn!(error = %e, offsets = ?c.offsets, "Offset commit failed; it is sent again with the next one");
                self.health.commit_result(false);
            }
        }
        true
    }

    /// The last commit before leaving: after the one in flight, synchronous, both within `SHUTDOWN_TIMEOUT_MS`.
    async fn commit_final(&mut self) {
        // One budget for both: the commit still unanswered (so the final one cannot land before it) and the last.
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout();
        if let Some(c) = self.commit.as_mut() {
            let _ = tokio::time::timeout_at(deadline, &mut c.task).await;
            self.commit = None;
        }
        let offsets = crate::lock(&self.tracker).positions();
        if offsets.is_empty() {
            return;
        }
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(500));
        let result =
            match tokio::time::timeout(left, spawn_commit(&self.consumer, offsets.clone())).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => Err(KafkaError::Canceled),
            };
        match result {
            Ok(()) => {
                // Closing the consumer revokes its partitions: what is committed here is not committed again.
                crate::lock(&self.tracker).committed(&offsets);
                info!(?offsets, "Final commit done")
            }
            Err(e) => {
                error!(error = %e, ?offsets, "Final commit failed; the next owner redoes these records")
            }
        }
    }

    /// Reports partitions whose oldest waiting record has held their commit past `PARTITION_STALL_TIMEOUT_MS`:
    /// not ready while any does, one ERROR when one starts, one INFO when it moves again.
    fn check_stalls(&mut self) {
        let bound = Duration::from_millis(self.config.partition_stall_timeout_ms);
        let now_stalled = crate::lock(&self.tracker).stalled(bound, Instant::now());
        let held: Vec<(Tp, i64)> = now_stalled
            .iter()
            .map(|(tp, o, _)| (tp.clone(), *o))
            .collect();
        if held == self.stalled {
            if !now_stalled.is_empty() {
                self.health.set_stalled(stalled_list(&now_stalled));
            }
            return;
        }
        for ((topic, partition), offset, waited) in &now_stalled {
            if !self
                .stalled
                .iter()
                .any(|(tp, o)| tp.0 == *topic && tp.1 == *partition && o == offset)
            {
                error!(
                    topic,
                    partition,
                    offset,
                    waited_s = waited.as_secs(),
                    "A partition's commit has been held by this record past PARTITION_STALL_TIMEOUT_MS; not ready \
                     until it moves (the record's own log lines say why it waits)"
                );
            }
        }
        for ((topic, partition), offset) in &self.stalled {
            if !held
                .iter()
                .any(|(tp, _)| tp.0 == *topic && tp.1 == *partition)
            {
                info!(
                    topic,
                    partition, offset, "The stalled partition moves again"
                );
            }
        }
        self.health.set_stalled(stalled_list(&now_stalled));
        self.stalled = held;
    }

    fn periodic_stats(&mut self) {
        if self.last_stats.elapsed() >= Duration::from_secs(self.config.stats_interval_secs.max(1))
        {
            self.last_stats = Instant::now();
            let t = self.lanes.totals();
            info!(
                total_processed = t.processed,
                total_errors = t.errors,
                total_skipped = t.skipped,
                in_flight = self.lanes.in_flight(),
                "Progress"
            );
        }
    }
}

fn stalled_list(stalled: &[(Tp, i64, Duration)]) -> Vec<crate::health::StalledPartition> {
    stalled
        .iter()
        .map(
            |((topic, partition), offset, waited)| crate::health::StalledPartition {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                waiting_s: waited.as_secs(),
            },
        )
        .collect()
}

fn recv_error(e: KafkaError, access: &AccessWatch) {
    metrics::counter!(crate::catalogue::CONSUMER_ERRORS).increment(1);
    // A refusal is said by the watch (once, not with every poll that returns it).
    if access.report("consumer", &e, "returned by a poll") {
        return;
    }
    if is_missing_topic(&e) {
        // The consumer's context says it, once, and again only if the topic stays missing.
        debug!(error = %e, "Kafka consumer error");
    } else {
        warn!(error = %e, "Kafka consumer error");
    }
}

/// A commit sent from the loop and not yet answered.
struct PendingCommit {
    task: tokio::task::JoinHandle<KafkaResult<()>>,
    offsets: Vec<(Tp, i64)>,
    sent: Instant,
    reported_slow: bool,
}

/// A commit on a blocking thread, so that its result comes back (the result of an asynchronous one never reaches
/// the consumer context with rdkafka 0.39, fede1024/rust-rdkafka#856) while the loop goes on. librdkafka bounds
/// it: a commit waiting for the group coordinator fails after the session timeout. Records its duration and
/// failure in the metrics; "nothing to commit" is success.
fn spawn_commit(
    consumer: &Arc<Kafka>,
    offsets: Vec<(Tp, i64)>,
) -> tokio::task::JoinHandle<KafkaResult<()>> {
    let c = Arc::clone(consumer);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let res = to_tpl(&offsets).and_then(|tpl| c.commit(&tpl, CommitMode::Sync));
        metrics::histogram!(crate::catalogue::COMMIT_DURATION)
            .record(started.elapsed().as_secs_f64());
        match res {
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => {
                metrics::counter!(crate::catalogue::COMMIT_FAILURES).increment(1);
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    })
}

/// Removes the records of `revoked` partitions from `records`; how many.
fn drop_records_of(revoked: &[Tp], records: &mut Vec<OwnedMessage>) -> usize {
    if revoked.is_empty() || records.is_empty() {
        return 0;
    }
    let before = records.len();
    records.retain(|m| {
        !revoked
            .iter()
            .any(|(t, p)| *p == m.partition() && t == m.topic())
    });
    before - records.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            topic.into(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn records_of_revoked_partitions_are_dropped_and_the_others_kept_in_order() {
        let mut batch = vec![
            record("a", 0, 1),
            record("a", 1, 1),
            record("b", 0, 1),
            record("a", 0, 2),
            record("a", 2, 1),
        ];
        let revoked = vec![("a".to_string(), 0), ("b".to_string(), 3)];
        assert_eq!(drop_records_of(&revoked, &mut batch), 2);
        let places: Vec<(String, i32, i64)> = batch
            .iter()
            .map(|m| (m.topic().to_string(), m.partition(), m.offset()))
            .collect();
        assert_eq!(
            places,
            [("a".into(), 1, 1), ("b".into(), 0, 1), ("a".into(), 2, 1)]
        );
        assert_eq!(drop_records_of(&[], &mut batch), 0, "nothing revoked");
    }
}
