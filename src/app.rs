//! Wiring and the consumer loop: poll a batch, process it, commit what is finished, repeat; drain and commit on
//! shutdown. Owns the order of these steps; never decodes or writes read models itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::dlq::KafkaDeadLetters;
use crate::handlers;
use crate::health::Health;
use crate::kafka::{self, Kafka, OffsetTracker, ProcessorContext, Tp};
use crate::pipeline::{BatchStats, ProcessingSettings, Processor};
use crate::registry::{HandlerContext, Registry};
use crate::store;

/// A batch that runs longer than this pauses its partitions and keeps polling, so that retries during an outage
/// do not exceed `max.poll.interval.ms` and drop the consumer out of the group.
const KEEPALIVE_AFTER: Duration = Duration::from_secs(5);

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
    let _ = crate::http::metrics_handle();
    let http_stop = CancellationToken::new();
    if config.http_port != 0 {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.http_port))
            .await
            .with_context(|| format!("binding HTTP_PORT {}", config.http_port))?;
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
    // MongoDB may come up after us: wait for it rather than fail, readiness says why we are not ready.
    loop {
        match handlers::ensure_indexes(&db).await {
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
    let consumer = Arc::new(
        kafka::create_consumer(
            &config,
            ProcessorContext {
                tracker: tracker.clone(),
                health: health.clone(),
                revoked: revoked.clone(),
            },
        )
        .context("creating the Kafka consumer (KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPICS)")?,
    );
    info!(topics = ?config.topics(), group = %config.kafka_group_id, "Subscribed");

    let work_cancel = CancellationToken::new();
    let processor = Processor {
        registry: Arc::new(registry),
        ctx: HandlerContext::new(db),
        dead_letters: dead_letters.clone(),
        settings: ProcessingSettings::from_config(&config),
        cancel: work_cancel.clone(),
    };
    let mut lp = Loop {
        config: &config,
        consumer: consumer.clone(),
        tracker,
        revoked,
        health: health.clone(),
        processor,
        shutdown: shutdown.clone(),
        work_cancel,
        carry: Vec::new(),
        totals: Totals::default(),
        last_stats: Instant::now(),
    };
    let result = lp.run().await;

    // Leave cleanly: commit what is finished, flush dead letters, leave the group.
    lp.commit_finished().await;
    dead_letters.flush(Duration::from_secs(5));
    info!(
        total_processed = lp.totals.processed,
        total_errors = lp.totals.errors,
        total_skipped = lp.totals.skipped,
        "event-processor stopped"
    );
    drop(lp);
    http_stop.cancel();
    let _ = pinger.await;
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

#[derive(Debug, Default)]
struct Totals {
    processed: u64,
    skipped: u64,
    errors: u64,
}

struct Loop<'a> {
    config: &'a Config,
    consumer: Arc<Kafka>,
    tracker: Arc<Mutex<OffsetTracker>>,
    revoked: Arc<Mutex<Vec<Tp>>>,
    health: Arc<Health>,
    processor: Processor,
    shutdown: CancellationToken,
    work_cancel: CancellationToken,
    /// Records received while a batch was in progress, processed next.
    carry: Vec<OwnedMessage>,
    totals: Totals,
    last_stats: Instant,
}

impl Loop<'_> {
    async fn run(&mut self) -> anyhow::Result<()> {
        while let Some(batch) = self.poll().await {
            for chunk in batch.chunks(self.config.processing_batch_size) {
                self.process(chunk).await;
                self.commit_finished().await;
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
            }
            self.periodic_stats();
        }
        Ok(())
    }

    /// Takes up to `KAFKA_MAX_POLL_RECORDS`: waits for the first, then whatever arrives within the linger.
    /// `None` on shutdown.
    async fn poll(&mut self) -> Option<Vec<OwnedMessage>> {
        let max = self.config.kafka_max_poll_records;
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(max);
        self.drop_revoked();
        let take = max.min(self.carry.len());
        batch.extend(self.carry.drain(..take));
        while batch.is_empty() {
            self.health.beat();
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                r = self.consumer.recv() => match r {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => self.recv_error(e).await,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.periodic_stats(),
            }
        }
        let linger = Duration::from_millis(self.config.kafka_poll_linger_ms);
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            tokio::select! {
                biased;
                r = self.consumer.recv() => match r {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => { self.recv_error(e).await; break; }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        Some(batch)
    }

    async fn recv_error(&self, e: rdkafka::error::KafkaError) {
        metrics::counter!("event_processor_consumer_errors_total").increment(1);
        warn!(error = %e, "Kafka consumer error");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Processes one chunk, polling in the background when it runs long (see [`KEEPALIVE_AFTER`]), and giving
    /// in-flight work `SHUTDOWN_TIMEOUT_MS` after a shutdown signal.
    async fn process(&mut self, chunk: &[OwnedMessage]) {
        let started = Instant::now();
        metrics::histogram!("event_processor_batch_size").record(chunk.len() as f64);
        metrics::gauge!("event_processor_in_flight_records").set(chunk.len() as f64);
        let tracker = self.tracker.clone();
        let processor = &self.processor;
        let fut = processor.process_batch(chunk, &tracker);
        tokio::pin!(fut);
        let mut paused: Option<TopicPartitionList> = None;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let consumer = self.consumer.clone();
        let stats: Option<BatchStats> = loop {
            let drain_sleep = async {
                match drain_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                s = &mut fut => break Some(s),
                _ = self.shutdown.cancelled(), if drain_deadline.is_none() => {
                    info!(timeout_ms = self.config.shutdown_timeout_ms, "Draining in-flight records before shutdown");
                    drain_deadline = Some(tokio::time::Instant::now() + self.config.shutdown_timeout());
                    // Retries stop now; handler calls already running get until the deadline.
                    self.work_cancel.cancel();
                }
                _ = drain_sleep => {
                    warn!("Shutdown deadline reached; abandoning unfinished records (they stay uncommitted)");
                    break None;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    self.health.beat();
                    if started.elapsed() >= KEEPALIVE_AFTER && drain_deadline.is_none() {
                        if paused.is_none() && let Ok(a) = consumer.assignment() {
                            {
                                match consumer.pause(&a) {
                                    Ok(()) => warn!(elapsed_ms = started.elapsed().as_millis() as u64, "Batch still retrying; partitions paused, staying in the group"),
                                    Err(e) => warn!(error = %e, "Pausing partitions failed"),
                                }
                                paused = Some(a);
                            }
                        }
                        // A poll keeps the membership alive; anything it returns is processed next.
                        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(10), consumer.recv()).await {
                            self.carry.push(m.detach());
                        }
                    }
                }
            }
        };
        if let Some(p) = paused {
            let assigned = consumer
                .assignment()
                .map(|a| kafka::tpl_to_vec(&a))
                .unwrap_or_default();
            let mut still = TopicPartitionList::new();
            for e in p.elements() {
                if assigned.contains(&(e.topic().to_string(), e.partition())) {
                    still.add_partition(e.topic(), e.partition());
                }
            }
            if let Err(e) = consumer.resume(&still) {
                warn!(error = %e, "Resuming partitions failed");
            } else {
                info!("Partitions resumed");
            }
        }
        metrics::gauge!("event_processor_in_flight_records").set(0.0);
        let elapsed = started.elapsed();
        let s = stats.unwrap_or(BatchStats {
            records: chunk.len(),
            abandoned: chunk.len(),
            ..Default::default()
        });
        self.totals.processed += s.processed as u64;
        self.totals.skipped += s.skipped as u64;
        self.totals.errors += s.dead_lettered as u64;
        if let Some(last) = chunk.iter().filter_map(|m| m.timestamp().to_millis()).max() {
            let lag = (crate::health::now_ms() - last).max(0) as f64 / 1000.0;
            metrics::gauge!("event_processor_last_batch_lag_seconds").set(lag);
        }
        info!(
            batch_size = s.records,
            processed = s.processed,
            skipped = s.skipped,
            dead_lettered = s.dead_lettered,
            abandoned = s.abandoned,
            total_processed = self.totals.processed,
            total_errors = self.totals.errors,
            processing_time_ms = elapsed.as_millis() as u64,
            "Batch done"
        );
    }

    /// Commits, per partition, up to the first unfinished record.
    async fn commit_finished(&mut self) {
        let offsets = match self.tracker.lock() {
            Ok(mut t) => t.committable(),
            Err(_) => return,
        };
        if offsets.is_empty() {
            return;
        }
        match kafka::commit(&self.consumer, offsets.clone()).await {
            Ok(()) => {
                debug!(?offsets, "Committed");
                if let Ok(mut t) = self.tracker.lock() {
                    t.committed(&offsets);
                }
                self.health.commit_result(true);
            }
            Err(e) => {
                // Not fatal: the records are finished and will be committed with the next batch (or redone,
                // idempotently, by the next owner).
                error!(error = %e, ?offsets, "Commit failed");
                self.health.commit_result(false);
            }
        }
    }

    fn drop_revoked(&mut self) {
        let revoked: Vec<Tp> = match self.revoked.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        if revoked.is_empty() || self.carry.is_empty() {
            return;
        }
        self.carry
            .retain(|m| !revoked.contains(&(m.topic().to_string(), m.partition())));
    }

    fn periodic_stats(&mut self) {
        if self.last_stats.elapsed() >= Duration::from_secs(self.config.stats_interval_secs.max(1))
        {
            self.last_stats = Instant::now();
            info!(
                total_processed = self.totals.processed,
                total_errors = self.totals.errors,
                total_skipped = self.totals.skipped,
                "Progress"
            );
        }
    }
}
