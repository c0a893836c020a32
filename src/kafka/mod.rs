//! Kafka plumbing: the consumer (group membership, rebalances, commits) and its configuration. Owns the rule
//! that offsets are committed only from the [`OffsetTracker`]; never processes records.

pub mod offsets;

use std::collections::HashMap;
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

/// Receives librdkafka's callbacks: rebalances and statistics. Runs on the thread that polls, so it
/// only commits what is finished (bounded by the commit timeout) and updates shared state.
pub struct ProcessorContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub health: Arc<Health>,
    /// Partitions revoked since the loop last looked; it drops their carried-over records.
    pub revoked: Arc<Mutex<Vec<Tp>>>,
    /// How long a revoke waits for in-flight records of the revoked partitions.
    pub drain_timeout: Duration,
    /// When each partition last had no lag (ms), for its lag in seconds.
    pub caught_up_at: Mutex<HashMap<Tp, i64>>,
    /// Whether the consumer stays out of its group.
    pub rejoin: Mutex<RejoinWatch>,
    /// Cancelled once [`RejoinWatch`] gives up: the loop ends and the process exits for a restart.
    pub out_of_group: tokio_util::sync::CancellationToken,
    /// How long a subscribed topic has been missing.
    pub missing_topics: Mutex<MissingTopic>,
}

/// A subscribed topic that does not exist is normal at first: a new deployment's connector creates its topic
/// with the first outbox row. One INFO line says the consumer waits for it; only once it has stayed missing for
/// [`MissingTopic::ERROR_AFTER`] is it an error, repeated at that interval while it lasts.
#[derive(Debug, Default)]
pub struct MissingTopic {
    since: Option<Instant>,
    last_error: Option<Instant>,
}

/// What to say about a missing topic now.
#[derive(Debug, PartialEq, Eq)]
pub enum MissingTopicLine {
    Waiting,
    StillMissing,
    Quiet,
}

impl MissingTopic {
    /// Five minutes: longer than a connector takes to start and snapshot an empty outbox, short enough that a
    /// misspelt `KAFKA_TOPICS` does not go unnoticed.
    pub const ERROR_AFTER: Duration = Duration::from_secs(300);

    pub fn observe(&mut self, now: Instant) -> MissingTopicLine {
        let since = *self.since.get_or_insert(now);
        if since == now {
            return MissingTopicLine::Waiting;
        }
        let due = self.last_error.map_or(since, |t| t) + Self::ERROR_AFTER;
        if now >= due {
            self.last_error = Some(now);
            MissingTopicLine::StillMissing
        } else {
            MissingTopicLine::Quiet
        }
    }

    /// The topic exists now (partitions were assigned).
    pub fn clear(&mut self) {
        *self = MissingTopic::default();
    }
}

/// Whether a librdkafka error says a subscribed topic does not exist.
pub fn is_missing_topic(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
}

/// Watches, one statistics report at a time, for a consumer that does not get back into its group: its group's
/// join state is not `steady` in any report for `timeout_ms`. After a broker restart librdkafka (2.12) can stay
/// so for good: the revoke of a lost assignment waits for a commit sent while the coordinator was away, that
/// commit waits in the queue of a coordinator no longer known, and no broker connection is made again to find
/// one (its debug log repeats "no broker available for coordinator query" with the broker up). Nothing short of
/// a new consumer gets it back.
#[derive(Debug)]
pub struct RejoinWatch {
    timeout_ms: i64,
    since_ms: Option<i64>,
}

impl RejoinWatch {
    /// `timeout_ms` 0: never gives up.
    pub fn new(timeout_ms: u64) -> Self {
        RejoinWatch {
            timeout_ms: timeout_ms as i64,
            since_ms: None,
        }
    }

    /// Takes one report; how long the consumer has been out of its group, once that reaches the timeout.
    pub fn observe(&mut self, join_state: Option<&str>, now_ms: i64) -> Option<i64> {
        let settled = join_state.is_none_or(|s| s == "steady");
        if self.timeout_ms <= 0 || settled {
            self.since_ms = None;
            return None;
        }
        let out_for = now_ms - *self.since_ms.get_or_insert(now_ms);
        (out_for >= self.timeout_ms).then_some(out_for)
    }
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

    fn watch_group(&self, stats: &Statistics, now_ms: i64) {
        let join_state = stats.cgrp.as_ref().map(|g| g.join_state.as_str());
        let out_for = self
            .rejoin
            .lock()
            .ok()
            .and_then(|mut w| w.observe(join_state, now_ms));
        if let Some(ms) = out_for
            && !self.out_of_group.is_cancelled()
        {
            let group = stats.cgrp.as_ref();
            // Connections librdkafka has up to real brokers (not the coordinator's logical handle).
            let brokers_up = stats
                .brokers
                .values()
                .filter(|b| b.nodeid >= 0 && b.source != "logical" && b.state == "UP")
                .count();
            tracing::error!(
                out_of_group_s = ms / 1000,
                group_state = group.map(|g| g.state.as_str()),
                join_state,
                rebalance_reason = group.map(|g| g.rebalance_reason.as_str()),
                brokers_up,
                "The consumer has not got back into its group (KAFKA_REJOIN_TIMEOUT_MS); exiting so that the \
                 process is restarted"
            );
            self.out_of_group.cancel();
        }
    }
}

impl ClientContext for ProcessorContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_missing_topic(&error) {
            let line = match self.missing_topics.lock() {
                Ok(mut m) => m.observe(Instant::now()),
                Err(_) => MissingTopicLine::StillMissing,
            };
            match line {
                MissingTopicLine::Waiting => tracing::info!(
                    reason,
                    "Waiting for a subscribed topic to be created (a new deployment's connector creates it with the first outbox row)"
                ),
                MissingTopicLine::StillMissing => tracing::error!(
                    reason,
                    minutes = MissingTopic::ERROR_AFTER.as_secs() / 60,
                    "A subscribed topic is still missing: check KAFKA_TOPICS and the connector"
                ),
                MissingTopicLine::Quiet => {}
            }
            return;
        }
        tracing::error!(error = %error, reason, "librdkafka error");
    }

    fn stats(&self, stats: Statistics) {
        let now = crate::health::now_ms();
        self.watch_group(&stats, now);
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(crate::catalogue::CONSUMER_LAG_RECORDS,
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
                let oldest = self
                    .tracker
                    .lock()
                    .ok()
                    .and_then(|t| t.oldest_unfinished_timestamp(topic, p.partition));
                let caught_up_at = self.caught_up_at.lock().ok().and_then(|mut c| {
                    let tp = (topic.clone(), p.partition);
                    if p.consumer_lag == 0 {
                        c.insert(tp.clone(), now);
                    }
                    c.get(&tp).copied()
                });
                if let Some(seconds) = lag_seconds(p.consumer_lag, oldest, caught_up_at, now) {
                    metrics::gauge!(crate::catalogue::CONSUMER_LAG_SECONDS,
                        "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(seconds);
                }
            }
        }
    }
}

/// A partition's lag in seconds: 0 when caught up; else the age of its oldest record in flight (its Kafka
/// timestamp, see [`OffsetTracker::oldest_unfinished_timestamp`]); with none in flight (records not fetched yet,
/// or paused), how long since it was last caught up; unknown when it never was (e.g. a backlog at start).
fn lag_seconds(
    lag_records: i64,
    oldest_unfinished: Option<i64>,
    caught_up_at: Option<i64>,
    now_ms: i64,
) -> Option<f64> {
    if lag_records <= 0 {
        return Some(0.0);
    }
    oldest_unfinished
        .or(caught_up_at)
        .map(|since| (now_ms - since).max(0) as f64 / 1000.0)
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = tpl_to_vec(tpl);
                // Lost: the group went on without this consumer (its session timed out, e.g. while the process
                // was stopped), so other consumers may own these partitions already. Nothing is committed for
                // them; of their records here, those already running finish (idempotently), the rest are dropped.
                let lost = consumer.assignment_lost();
                if !lost {
                    self.drain(&revoked);
                }
                let kind = if lost { "lost" } else { "revoke" };
                metrics::counter!(crate::catalogue::REBALANCES, "kind" => kind).increment(1);
                let offsets = match self.tracker.lock() {
                    Ok(mut t) => t.revoke(&revoked),
                    Err(_) => Vec::new(),
                };
                // Commit what is finished before the partitions move, so the next owner does not redo it.
                // "Nothing to commit" is success.
                if !offsets.is_empty() && !lost {
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
                if lost {
                    tracing::warn!(partitions = ?revoked, "Partitions lost: the group went on without this consumer (its session timed out); their uncommitted records are redone by their next owner");
                } else {
                    tracing::info!(partitions = ?revoked, "Partitions revoked");
                }
                if let Ok(mut r) = self.revoked.lock() {
                    r.extend(revoked);
                }
            }
            Rebalance::Assign(tpl) => {
                metrics::counter!(crate::catalogue::REBALANCES, "kind" => "assign").increment(1);
                if tpl.count() > 0
                    && let Ok(mut m) = self.missing_topics.lock()
                {
                    m.clear();
                }
                self.health.add_assigned(tpl.count());
                tracing::info!(partitions = ?tpl_to_vec(tpl), "Partitions assigned");
            }
            Rebalance::Error(e) => {
                metrics::counter!(crate::catalogue::REBALANCES, "kind" => "error").increment(1);
                tracing::error!(error = %e, "Rebalance error");
            }
        }
    }
}

/// Builds and subscribes the consumer.
pub fn create_consumer(config: &Config, context: ProcessorContext) -> KafkaResult<Kafka> {
    let consumer: Kafka = consumer_config(config).create_with_context(context)?;
    let topics = config.topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// What every Kafka client of the daemon starts from (the consumer, the dead-letter producer, the replay's
/// clients): the `KAFKA_PROPERTY_*` variables (security, tuning) and the brokers.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka_properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &config.kafka_bootstrap_servers);
    cc
}

/// The consumer's librdkafka configuration: the common client settings, then the properties the delivery
/// guarantee needs, then defaults those variables did not set.
fn consumer_config(config: &Config) -> ClientConfig {
    let mut cc = client_config(config);
    cc.set("group.id", &config.kafka_group_id)
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
    // Defaults a `KAFKA_PROPERTY_*` variable may override. librdkafka fetches ahead up to `queued.min.messages`
    // records per partition (100,000 by default) or `queued.max.messages.kbytes` in all (64 MiB) and, once over
    // either, waits `fetch.queue.backoff.ms` (1 s by default) before fetching that partition again: a consumer
    // catching up on a backlog drained its queue and then idled for most of that second. A smaller queue,
    // refilled within 20 ms, keeps it busy and bounds the memory the prefetched records take.
    let client_id = format!("event-processor-{}", hostname());
    for (key, value) in [
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("statistics.interval.ms", "5000"),
        ("client.id", client_id.as_str()),
        ("queued.min.messages", "10000"),
        ("fetch.queue.backoff.ms", "20"),
    ] {
        if !config.kafka_properties.contains_key(key) {
            cc.set(key, value);
        }
    }
    if let Some(id) = config
        .kafka_group_instance_id
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        // `{hostname}` makes one setting serve every replica: a container keeps its host name when it is
        // restarted in place, so it rejoins as the same member and takes its partitions back without a rebalance.
        cc.set("group.instance.id", id.replace("{hostname}", &hostname()));
    }
    // librdkafka's `debug` contexts (`KAFKA_PROPERTY_DEBUG=cgrp,...`) log at debug level: let them through.
    cc.set_log_level(if config.kafka_properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    });
    cc
}

/// A commit on a blocking thread, so that its result comes back (the result of an asynchronous one never reaches
/// the consumer context with rdkafka 0.39, fede1024/rust-rdkafka#856) while the loop goes on polling. librdkafka
/// bounds it: a commit waiting for the group coordinator fails after the session timeout. Records its duration and
/// failure in the metrics; "nothing to commit" is success.
pub fn spawn_commit(
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

/// A synchronous commit for the last one before leaving, given up after `timeout`.
pub async fn commit_sync(
    consumer: &Arc<Kafka>,
    offsets: Vec<(Tp, i64)>,
    timeout: Duration,
) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(timeout, spawn_commit(consumer, offsets)).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => Err(KafkaError::Canceled),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Config {
        let base = [
            ("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092"),
            ("MONGODB_URI", "mongodb://mongo:27017"),
        ];
        Config::from_vars(
            base.iter()
                .chain(vars)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .expect("valid configuration")
    }

    #[test]
    fn a_partition_is_fetched_again_within_20_ms_once_its_queue_has_room_unless_configured() {
        let cc = consumer_config(&config(&[]));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(cc.get("queued.min.messages"), Some("10000"));
        assert_eq!(
            cc.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));

        let cc = consumer_config(&config(&[
            ("KAFKA_PROPERTY_FETCH_QUEUE_BACKOFF_MS", "250"),
            ("KAFKA_PROPERTY_QUEUED_MIN_MESSAGES", "500"),
            ("KAFKA_PROPERTY_PARTITION_ASSIGNMENT_STRATEGY", "range"),
        ]));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(cc.get("queued.min.messages"), Some("500"));
        assert_eq!(cc.get("partition.assignment.strategy"), Some("range"));
    }

    #[test]
    fn a_missing_topic_is_waited_for_then_an_error_every_interval() {
        let mut m = MissingTopic::default();
        let t0 = Instant::now();
        assert_eq!(m.observe(t0), MissingTopicLine::Waiting);
        assert_eq!(
            m.observe(t0 + Duration::from_secs(1)),
            MissingTopicLine::Quiet
        );
        let after = t0 + MissingTopic::ERROR_AFTER;
        assert_eq!(m.observe(after), MissingTopicLine::StillMissing);
        assert_eq!(
            m.observe(after + Duration::from_secs(1)),
            MissingTopicLine::Quiet
        );
        assert_eq!(
            m.observe(after + MissingTopic::ERROR_AFTER),
            MissingTopicLine::StillMissing
        );
        m.clear();
        assert_eq!(
            m.observe(after + Duration::from_secs(999)),
            MissingTopicLine::Waiting
        );
    }

    #[test]
    fn gives_up_only_after_a_whole_timeout_out_of_the_group() {
        let mut w = RejoinWatch::new(60_000);
        let wait = Some("wait-incr-unassign-to-complete");
        assert_eq!(w.observe(Some("steady"), 0), None);
        assert_eq!(w.observe(wait, 5_000), None, "out since 5 s");
        assert_eq!(w.observe(Some("wait-join"), 60_000), None, "55 s");
        assert_eq!(w.observe(wait, 65_000), Some(60_000));
        // Back in the group: the count starts again.
        assert_eq!(w.observe(Some("steady"), 70_000), None);
        assert_eq!(w.observe(wait, 75_000), None, "out since 75 s");
        assert_eq!(w.observe(wait, 130_000), None);
        assert_eq!(w.observe(wait, 140_000), Some(65_000));
        // No group in the report: nothing to watch.
        assert_eq!(w.observe(None, 300_000), None);
        let mut off = RejoinWatch::new(0);
        assert_eq!(off.observe(wait, 0), None);
        assert_eq!(off.observe(wait, 10_000_000), None);
    }

    #[test]
    fn librdkafka_logs_warnings_unless_its_debug_contexts_are_asked_for() {
        let level = |cc: &ClientConfig| format!("{:?}", cc.log_level);
        assert_eq!(level(&consumer_config(&config(&[]))), "Warning");
        let cc = consumer_config(&config(&[("KAFKA_PROPERTY_DEBUG", "cgrp,fetch")]));
        assert_eq!(cc.get("debug"), Some("cgrp,fetch"));
        assert_eq!(level(&cc), "Debug");
    }

    #[test]
    fn lag_in_seconds_is_zero_when_caught_up_and_the_age_of_the_awaited_record_otherwise() {
        assert_eq!(lag_seconds(0, Some(1_000), None, 61_000), Some(0.0));
        assert_eq!(lag_seconds(0, None, None, 61_000), Some(0.0));
        assert_eq!(
            lag_seconds(5, Some(1_000), Some(50_000), 61_000),
            Some(60.0),
            "oldest in flight"
        );
        assert_eq!(
            lag_seconds(5, Some(62_000), None, 61_000),
            Some(0.0),
            "clock skew"
        );
        // Nothing in flight: a burst after an idle hour is not an hour of lag.
        assert_eq!(
            lag_seconds(5, None, Some(58_000), 61_000),
            Some(3.0),
            "since caught up"
        );
        assert_eq!(
            lag_seconds(5, None, None, 61_000),
            None,
            "never caught up, nothing taken in yet"
        );
    }
}
