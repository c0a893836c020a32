//! Wiring and the consumer loop: poll a batch, hand it to the keyed lanes (`dispatch`), commit what has finished,
//! repeat, with backpressure at `PROCESSING_MAX_IN_FLIGHT`; drain and commit on shutdown. Owns the order of these
//! steps; never decodes or writes read models itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::dlq::KafkaDeadLetters;
use crate::handlers;
use crate::health::Health;
use crate::kafka::{self, Kafka, OffsetTracker, ProcessorContext, Tp};
use crate::pipeline::{ProcessingSettings, Processor};
use crate::registry::{HandlerContext, Registry};
use crate::store;

/// Finished records are committed at most this often (and on revoke and shutdown).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A commit unanswered for this long is reported (once) as slow; librdkafka ends it within the session timeout
/// plus the request timeout, and the next commit waits for it.
const COMMIT_SLOW: Duration = Duration::from_secs(15);

/// How long the in-flight limit may hold the loop before it pauses the partitions and polls on without taking
/// records. Shorter stalls just leave records in librdkafka's queue: pausing drops its prefetched records, and
/// refetching them costs more than the wait.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown` is cancelled, with the shipped handlers.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut registry = Registry::new();
    handlers::register_all(&mut registry).context("registering handlers")?;
    run_with_registry(config, registry, shutdown).await
}

/// Runs the daemon with the given handlers (tests register their own).
pub async fn run_with_registry(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    info!(config = ?config, handlers = ?registry.names(), "Starting event-processor");
    let health = Arc::new(Health::new());
    let http_stop = CancellationToken::new();
    if let Some(handle) = crate::http::metrics_handle() {
        let every = crate::http::UPKEEP_INTERVAL;
        tokio::spawn(crate::http::upkeep(handle, every, http_stop.clone()));
    }
    if config.http_port != 0 {
        let listener =
            tokio::net::TcpListener::bind((config.http_bind_address.as_str(), config.http_port))
                .await
                .with_context(|| {
                    format!(
                        "binding HTTP_BIND_ADDRESS {} and HTTP_PORT {}",
                        config.http_bind_address, config.http_port
                    )
                })?;
        let (h, stop) = (health.clone(), http_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, h, stop).await {
                error!(error = %e, "HTTP server failed");
            }
        });
    }

    let client = store::connect(config.mongodb_uri.expose(), "event-processor")
        .await
        .with_context(|| format!("parsing MONGODB_URI {}", config.mongodb_uri))?;
    let db = client.database(&config.mongodb_database);
    // MongoDB may come up after us: wait for it rather than fail, readiness says why we are not ready. Only the
    // registered handlers' indexes are created.
    let indexes = registry.indexes();
    loop {
        let ready = async {
            store::ping(&db).await?;
            store::ensure_indexes(&db, indexes.clone()).await
        };
        match ready.await {
            Ok(()) => break,
            Err(e) if store::is_transient(&e) => {
                warn!(error = %e, "MongoDB unreachable; waiting to create indexes");
                tokio::select! {
                    _ = shutdown.cancelled() => { http_stop.cancel(); return Ok(()); }
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Err(e) => return Err(e).context("creating MongoDB indexes"),
        }
    }
    health.set_mongo_reachable(true);
    let pinger = spawn_mongo_pinger(db.clone(), health.clone(), http_stop.clone());

    let dead_letters =
        Arc::new(KafkaDeadLetters::new(&config).context("creating the dead-letter producer")?);
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let out_of_group = CancellationToken::new();
    let consumer = Arc::new(
        kafka::create_consumer(
            &config,
            ProcessorContext {
                tracker: tracker.clone(),
                health: health.clone(),
                revoked: revoked.clone(),
                drain_timeout: config.rebalance_drain_timeout(),
                caught_up_at: Default::default(),
                rejoin: Mutex::new(kafka::RejoinWatch::new(config.kafka_rejoin_timeout_ms)),
                out_of_group: out_of_group.clone(),
                missing_topics: Default::default(),
            },
        )
        .context("creating the Kafka consumer (KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPICS)")?,
    );
    info!(topics = ?config.topics(), group = %config.kafka_group_id, "Subscribed");

    let work_cancel = CancellationToken::new();
    let processor = Arc::new(Processor {
        registry: Arc::new(registry),
        ctx: HandlerContext::new(db),
        dead_letters: dead_letters.clone(),
        settings: ProcessingSettings::from_config(&config),
        cancel: work_cancel.clone(),
        metrics: Default::default(),
    });
    let dispatcher = Dispatcher::new(processor, tracker.clone());
    let mut lp = Loop {
        config: &config,
        consumer: consumer.clone(),
        tracker,
        revoked,
        health: health.clone(),
        dispatcher: dispatcher.clone(),
        shutdown: shutdown.clone(),
        out_of_group: out_of_group.clone(),
        work_cancel,
        carry: Vec::new(),
        paused: None,
        full_since: None,
        last_commit: Instant::now(),
        commit: None,
        last_stats: Instant::now(),
    };
    let result = lp.run().await;

    // Leave cleanly: commit what is finished, flush dead letters, leave the group.
    lp.commit_final().await;
    dead_letters.flush(Duration::from_secs(5));
    let totals = dispatcher.totals();
    info!(
        total_processed = totals.processed,
        total_errors = totals.errors,
        total_skipped = totals.skipped,
        "event-processor stopped"
    );
    drop(lp);
    http_stop.cancel();
    let _ = pinger.await;
    if out_of_group.is_cancelled() {
        // Closing a consumer stuck outside its group can wait for good (for the commit it never got an answer
        // to): leave it to the process's exit.
        std::mem::forget(consumer);
        anyhow::bail!(
            "the Kafka consumer did not get back into its group within KAFKA_REJOIN_TIMEOUT_MS"
        );
    }
    let consumer = Arc::try_unwrap(consumer).ok();
    tokio::task::spawn_blocking(move || {
        if let Some(c) = consumer {
            c.unsubscribe();
            drop(c); // closes the consumer: leaves the group
        }
    })
    .await
    .ok();
    result
}

fn spawn_mongo_pinger(
    db: mongodb::Database,
    health: Arc<Health>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ok = tokio::time::timeout(Duration::from_secs(5), store::ping(&db))
                .await
                .is_ok_and(|r| r.is_ok());
            health.set_mongo_reachable(ok);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
            }
        }
    })
}

struct Loop<'a> {
    config: &'a Config,
    consumer: Arc<Kafka>,
    tracker: Arc<Mutex<OffsetTracker>>,
    revoked: Arc<Mutex<Vec<Tp>>>,
    health: Arc<Health>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    /// Cancelled when the consumer gave up getting back into its group: the loop ends as on shutdown.
    out_of_group: CancellationToken,
    work_cancel: CancellationToken,
    /// Records received while the partitions were paused, processed next.
    carry: Vec<OwnedMessage>,
    /// The partitions paused for backpressure, if any.
    paused: Option<TopicPartitionList>,
    /// Since when the in-flight limit holds the loop.
    full_since: Option<Instant>,
    last_commit: Instant,
    /// The commit sent and not answered yet: one at a time, so they land in order.
    commit: Option<PendingCommit>,
    last_stats: Instant,
}

impl Loop<'_> {
    /// Polls and submits until shutdown, then drains.
    async fn run(&mut self) -> anyhow::Result<()> {
        while let Some(batch) = self.poll().await {
            let mut batch = batch;
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(self.config.processing_batch_size));
                self.dispatcher.submit(std::mem::replace(&mut batch, rest));
            }
            self.commit_if_due().await;
            self.periodic_stats();
        }
        self.drain().await;
        Ok(())
    }

    /// Takes up to `KAFKA_MAX_POLL_RECORDS`: waits for the first, then whatever arrives within the linger.
    /// Meanwhile commits what finishes, and pauses the partitions while `PROCESSING_MAX_IN_FLIGHT` records are
    /// in flight (still polling, so the group keeps us). `None` on shutdown.
    async fn poll(&mut self) -> Option<Vec<OwnedMessage>> {
        let max = self.config.kafka_max_poll_records;
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(max);
        self.drop_revoked(&mut batch);
        let tick = tokio::time::sleep(COMMIT_INTERVAL);
        tokio::pin!(tick);
        loop {
            let full = self.dispatcher.in_flight() >= self.config.processing_max_in_flight;
            self.flow_control(full);
            if !full {
                let take = max.min(self.carry.len());
                batch.extend(self.carry.drain(..take));
            }
            if !batch.is_empty() {
                break;
            }
            self.health.beat();
            // While full, records stay in librdkafka's queue; once full for PAUSE_AFTER the partitions are paused
            // and the loop keeps polling (rebalances and membership need it) without taking records.
            let receive = !full || self.paused.is_some();
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = self.out_of_group.cancelled() => return None,
                r = self.consumer.recv(), if receive => match r {
                    // Paused partitions may still hand out what was fetched before the pause: keep it for later.
                    Ok(m) => self.take(m.detach(), &mut batch, full),
                    Err(e) => self.recv_error(e).await,
                },
                _ = self.dispatcher.progressed() => self.commit_if_due().await,
                _ = &mut tick => {
                    self.commit_finished().await;
                    self.periodic_stats();
                    tick.as_mut().reset(tokio::time::Instant::now() + COMMIT_INTERVAL);
                }
            }
            self.drop_revoked(&mut batch);
        }
        let linger = tokio::time::sleep(Duration::from_millis(self.config.kafka_poll_linger_ms));
        tokio::pin!(linger);
        while batch.len() < max {
            tokio::select! {
                biased;
                r = self.consumer.recv() => match r {
                    Ok(m) => self.take(m.detach(), &mut batch, false),
                    Err(e) => { self.recv_error(e).await; break; }
                },
                _ = &mut linger => break,
            }
        }
        // A revoke in a `recv` that returned no record (the linger ended first) postdates the whole batch.
        self.drop_revoked(&mut batch);
        Some(batch)
    }

    /// Takes a record `recv` returned into the batch (into `carry` while `hold`), after dropping the records of
    /// partitions revoked so far. A rebalance runs inside `recv`: every record taken before it was fetched under
    /// the old assignment, but the one this `recv` returned was fetched after it (librdkafka discards what an
    /// earlier assignment fetched), even from a partition revoked and assigned back meanwhile. Dropping it would
    /// skip it for good: the consumer has moved past it, and the later records of its partition would be
    /// committed over it.
    fn take(&mut self, m: OwnedMessage, batch: &mut Vec<OwnedMessage>, hold: bool) {
        let revoked = self.take_revoked();
        let dropped = admit(&revoked, &mut self.carry, batch, m, hold);
        log_dropped(dropped, &revoked);
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
                            in_flight = self.dispatcher.in_flight(),
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
                .map(|a| kafka::tpl_to_vec(&a))
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

    async fn recv_error(&self, e: rdkafka::error::KafkaError) {
        metrics::counter!(crate::catalogue::CONSUMER_ERRORS).increment(1);
        if kafka::is_missing_topic(&e) {
            // The consumer's context says it, once, and again only if the topic stays missing.
            debug!(error = %e, "Kafka consumer error");
        } else {
            warn!(error = %e, "Kafka consumer error");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Shutdown: stop fetching, stop retries, give the handler calls already running `SHUTDOWN_TIMEOUT_MS`, then
    /// commit what is finished (the caller does).
    async fn drain(&mut self) {
        if self.dispatcher.in_flight() == 0 {
            return;
        }
        info!(
            in_flight = self.dispatcher.in_flight(),
            timeout_ms = self.config.shutdown_timeout_ms,
            "Draining in-flight records before shutdown"
        );
        // Retries stop and records not yet started are abandoned; handler calls already running go on.
        self.work_cancel.cancel();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout();
        while self.dispatcher.in_flight() > 0 {
            tokio::select! {
                _ = self.dispatcher.progressed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(in_flight = self.dispatcher.in_flight(), "Shutdown deadline reached; abandoning unfinished records (they stay uncommitted)");
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
        let offsets = crate::lock(&self.tracker).committable();
        if offsets.is_empty() {
            return;
        }
        self.commit = Some(PendingCommit {
            task: kafka::spawn_commit(&self.consumer, offsets.clone()),
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
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(500));
        match kafka::commit_sync(&self.consumer, offsets.clone(), left).await {
            Ok(()) => info!(?offsets, "Final commit done"),
            Err(e) => {
                error!(error = %e, ?offsets, "Final commit failed; the next owner redoes these records")
            }
        }
    }

    /// Forgets the records of partitions revoked since the last call, held back (`carry`) or received into the
    /// batch being built. Submitted, they would be tracked as a new assignment of a partition another consumer
    /// now owns, and their finished offsets committed over that owner's.
    fn drop_revoked(&mut self, batch: &mut Vec<OwnedMessage>) {
        let revoked = self.take_revoked();
        let dropped = drop_records_of(&revoked, &mut self.carry) + drop_records_of(&revoked, batch);
        log_dropped(dropped, &revoked);
    }

    /// The partitions revoked since the last call.
    fn take_revoked(&self) -> Vec<Tp> {
        std::mem::take(&mut *crate::lock(&self.revoked))
    }

    fn periodic_stats(&mut self) {
        if self.last_stats.elapsed() >= Duration::from_secs(self.config.stats_interval_secs.max(1))
        {
            self.last_stats = Instant::now();
            let t = self.dispatcher.totals();
            info!(
                total_processed = t.processed,
                total_errors = t.errors,
                total_skipped = t.skipped,
                in_flight = self.dispatcher.in_flight(),
                "Progress"
            );
        }
    }
}

/// A commit sent from the loop and not yet answered.
struct PendingCommit {
    task: tokio::task::JoinHandle<KafkaResult<()>>,
    offsets: Vec<(Tp, i64)>,
    sent: Instant,
    reported_slow: bool,
}

/// Drops the held records (`carry`, `batch`) of `revoked` partitions, then holds `m`, which was received after
/// the revoke, in `carry` while `hold`, else in `batch`; how many were dropped.
fn admit(
    revoked: &[Tp],
    carry: &mut Vec<OwnedMessage>,
    batch: &mut Vec<OwnedMessage>,
    m: OwnedMessage,
    hold: bool,
) -> usize {
    let dropped = drop_records_of(revoked, carry) + drop_records_of(revoked, batch);
    if hold {
        carry.push(m);
    } else {
        batch.push(m);
    }
    dropped
}

fn log_dropped(dropped: usize, revoked: &[Tp]) {
    if dropped > 0 {
        info!(
            dropped,
            partitions = ?revoked,
            "Dropped received records of revoked partitions; their next owner reads them"
        );
    }
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
        assert_eq!(
            places(&batch),
            [("a".into(), 1, 1), ("b".into(), 0, 1), ("a".into(), 2, 1)]
        );
        assert_eq!(drop_records_of(&[], &mut batch), 0, "nothing revoked");
    }

    fn places(records: &[OwnedMessage]) -> Vec<(String, i32, i64)> {
        records
            .iter()
            .map(|m| (m.topic().to_string(), m.partition(), m.offset()))
            .collect()
    }

    /// A partition revoked and assigned back within one `recv`: the records held from before go, the record that
    /// `recv` returned (fetched again from the committed offset) stays.
    #[test]
    fn a_record_received_after_its_partition_came_back_is_kept() {
        let revoked = vec![("a".to_string(), 0)];
        let mut carry = vec![record("a", 0, 7), record("a", 1, 7)];
        let mut batch = vec![record("a", 0, 8), record("b", 0, 1)];
        let dropped = admit(&revoked, &mut carry, &mut batch, record("a", 0, 5), false);
        assert_eq!(dropped, 2);
        assert_eq!(places(&carry), [("a".into(), 1, 7)]);
        assert_eq!(places(&batch), [("b".into(), 0, 1), ("a".into(), 0, 5)]);

        // Held back while full: it goes to `carry`, behind what is left there.
        let dropped = admit(&[], &mut carry, &mut batch, record("a", 0, 6), true);
        assert_eq!(dropped, 0);
        assert_eq!(places(&carry), [("a".into(), 1, 7), ("a".into(), 0, 6)]);
        assert_eq!(batch.len(), 2);
    }
}
