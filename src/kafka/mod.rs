//! Kafka plumbing: the consumer (group membership, rebalances, commits) and its configuration. Owns the rule
//! that offsets are committed only from the [`OffsetTracker`]; never processes records.

pub mod offsets;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::health::Health;
pub use offsets::{OffsetTracker, Tp};

/// The consumer with its context.
pub type Kafka = StreamConsumer<ProcessorContext>;

/// Receives librdkafka's callbacks: rebalances, commit results, statistics. Runs on the thread that polls, so it
/// only commits what is finished (bounded by the commit timeout) and updates shared state.
pub struct ProcessorContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub health: Arc<Health>,
    /// Partitions revoked since the loop last looked; it drops their carried-over records.
    pub revoked: Arc<Mutex<Vec<Tp>>>,
    /// How long a revoke waits for in-flight records of the revoked partitions.
    pub drain_timeout: Duration,
    /// When the last asynchronous commit was issued (its callback records the latency).
    pub commit_issued: Mutex<Option<Instant>>,
}

impl ProcessorContext {
    /// Waits, up to the drain timeout, until no record of `revoked` is in flight.
    fn drain(&self, revoked: &[Tp]) {
        let unfinished = || {
            self.tracker
                .lock()
                .map(|t| t.unfinished_in(revoked))
                .unwrap_or(0)
        };
        let before = unfinished();
        if before == 0 {
            return;
        }
        let started = Instant::now();
        let wait = || {
            while unfinished() > 0 && started.elapsed() < self.drain_timeout {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The callback runs on the thread that polls. On a runtime worker, hand its other tasks to the rest of the
        // runtime while waiting; a current-thread runtime would have nobody left to finish the work.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => wait(),
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => {}
            Ok(_) => tokio::task::block_in_place(wait),
        }
        let left = unfinished();
        if left > 0 {
            tracing::warn!(
                in_flight = before,
                unfinished = left,
                waited_ms = started.elapsed().as_millis() as u64,
                "Rebalance drain deadline reached; unfinished records of revoked partitions are left to the next owner"
            );
        } else {
            tracing::info!(
                in_flight = before,
                waited_ms = started.elapsed().as_millis() as u64,
                "Drained in-flight records of revoked partitions"
            );
        }
    }
}

impl ClientContext for ProcessorContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("event_processor_consumer_lag_records",
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = tpl_to_vec(tpl);
                if !consumer.assignment_lost() {
                    self.drain(&revoked);
                }
                metrics::counter!("event_processor_rebalances_total", "kind" => "revoke")
                    .increment(1);
                let offsets = match self.tracker.lock() {
                    Ok(mut t) => t.revoke(&revoked),
                    Err(_) => Vec::new(),
                };
                // Commit what is finished before the partitions move, so the next owner does not redo it.
                // "Nothing to commit" is success.
                if !offsets.is_empty() && !consumer.assignment_lost() {
                    match to_tpl(&offsets).and_then(|l| consumer.commit(&l, CommitMode::Sync)) {
                        Ok(()) => tracing::info!(
                            ?offsets,
                            "Committed finished offsets of revoked partitions"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, ?offsets, "Commit on revoke failed; the next owner will redo these records")
                        }
                    }
                }
                self.health.remove_assigned(revoked.len());
                tracing::info!(partitions = ?revoked, "Partitions revoked");
                if let Ok(mut r) = self.revoked.lock() {
                    r.extend(revoked);
                }
            }
            Rebalance::Assign(tpl) => {
                metrics::counter!("event_processor_rebalances_total", "kind" => "assign")
                    .increment(1);
                self.health.add_assigned(tpl.count());
                tracing::info!(partitions = ?tpl_to_vec(tpl), "Partitions assigned");
            }
            Rebalance::Error(e) => {
                metrics::counter!("event_processor_rebalances_total", "kind" => "error")
                    .increment(1);
                tracing::error!(error = %e, "Rebalance error");
            }
        }
    }

    /// Results of commits (the loop's are asynchronous: it never blocks on the broker). A failed commit is
    /// forgotten by the tracker, so the next commit sends those offsets again. rdkafka 0.39 does not call this for
    /// manual asynchronous commits (fede1024/rust-rdkafka#856): until it does, the loop's periodic re-send of
    /// every position is what repairs a refused commit, and the commit latency histogram stays empty.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Some(issued) = self.commit_issued.lock().ok().and_then(|mut i| i.take()) {
            metrics::histogram!("event_processor_commit_duration_seconds")
                .record(issued.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                tracing::debug!(offsets = ?tpl_to_offsets(offsets), "Offsets committed");
                self.health.commit_result(true);
            }
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                metrics::counter!("event_processor_commit_failures_total").increment(1);
                let failed: Vec<(Tp, i64)> = tpl_to_offsets(offsets)
                    .into_iter()
                    .filter_map(|(topic, partition, next)| Some(((topic, partition), next?)))
                    .collect();
                tracing::warn!(error = %e, offsets = ?failed, "Offset commit failed; it is retried with the next one");
                self.health.commit_result(false);
                if let Ok(mut t) = self.tracker.lock() {
                    t.commit_failed(&failed);
                }
            }
        }
    }
}

/// Builds and subscribes the consumer.
pub fn create_consumer(config: &Config, context: ProcessorContext) -> KafkaResult<Kafka> {
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka_properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &config.kafka_bootstrap_servers)
        .set("group.id", &config.kafka_group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", &config.kafka_auto_offset_reset)
        .set(
            "session.timeout.ms",
            config.kafka_session_timeout_ms.to_string(),
        )
        .set(
            "max.poll.interval.ms",
            config.kafka_max_poll_interval_ms.to_string(),
        )
        .set("topic.metadata.refresh.interval.ms", "10000");
    if !config
        .kafka_properties
        .contains_key("partition.assignment.strategy")
    {
        cc.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if !config
        .kafka_properties
        .contains_key("statistics.interval.ms")
    {
        cc.set("statistics.interval.ms", "5000");
    }
    if !config.kafka_properties.contains_key("client.id") {
        cc.set("client.id", format!("event-processor-{}", hostname()));
    }
    if let Some(id) = config
        .kafka_group_instance_id
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        cc.set("group.instance.id", id);
    }
    cc.set_log_level(RDKafkaLogLevel::Warning);
    let consumer: Kafka = cc.create_with_context(context)?;
    let topics = config.topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// Sends a commit without waiting for the broker. A synchronous commit can wait forever while the group
/// coordinator is away (a broker restart), and the loop must keep polling through that. The result is meant to
/// arrive in [`ProcessorContext::commit_callback`], but with rdkafka 0.39 it does not (a manual asynchronous commit
/// produces no event), so the loop sends every position again periodically instead of relying on it.
pub fn commit_async(consumer: &Kafka, offsets: &[(Tp, i64)]) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    if let Ok(mut issued) = consumer.context().commit_issued.lock() {
        issued.get_or_insert_with(Instant::now);
    }
    consumer.commit(&to_tpl(offsets)?, CommitMode::Async)
}

/// A synchronous commit for the last one before leaving, given up after `timeout`.
pub async fn commit_sync(
    consumer: &Arc<Kafka>,
    offsets: Vec<(Tp, i64)>,
    timeout: Duration,
) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let c = Arc::clone(consumer);
    let started = Instant::now();
    let call = tokio::task::spawn_blocking(move || {
        let tpl = to_tpl(&offsets)?;
        c.commit(&tpl, CommitMode::Sync)
    });
    let res = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(KafkaError::Canceled),
        Err(_) => Err(KafkaError::Canceled),
    };
    metrics::histogram!("event_processor_commit_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    if res.is_err() {
        metrics::counter!("event_processor_commit_failures_total").increment(1);
    }
    res
}

pub fn to_tpl(offsets: &[(Tp, i64)]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    Ok(tpl)
}

pub fn tpl_to_vec(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn tpl_to_offsets(tpl: &TopicPartitionList) -> Vec<(String, i32, Option<i64>)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition(), e.offset().to_raw()))
        .collect()
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
