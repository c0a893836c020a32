//! The consumer's callbacks from librdkafka, run on the thread that polls it (the delivery's poller): rebalances,
//! statistics and client errors. A revoke is handed to the delivery loop, which owns the records in flight,
//! and waits for its answer; everything else here only updates shared state, metrics and logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use tokio_util::sync::CancellationToken;

use super::handoff::{Handoff, Revocation};
use super::{OffsetTracker, Tp, to_tpl, tpl_to_vec};
use crate::health::Health;

/// Receives librdkafka's callbacks for the consumer.
pub(crate) struct GroupContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub health: Arc<Health>,
    /// The poller's way to the delivery loop: a revoke goes in behind the records polled before it.
    pub handoff: Arc<Handoff>,
    /// How long a revoke waits for the loop's answer: the loop's drain timeout, plus the time it may take to
    /// read the revoke while its in-flight limit holds it.
    pub answer_within: Duration,
    /// When each partition last had no lag (ms), for its lag in seconds.
    pub caught_up_at: Mutex<HashMap<Tp, i64>>,
    /// Whether the consumer stays out of its group.
    pub rejoin: Mutex<RejoinWatch>,
    /// Cancelled once [`RejoinWatch`] gives up: the loop ends and the process exits for a restart.
    pub out_of_group: CancellationToken,
    /// How long a subscribed topic has been missing.
    pub missing_topics: Mutex<MissingTopic>,
    /// The claimed group instance id (`KAFKA_GROUP_INSTANCE_ID=auto`), held as long as the consumer lives.
    pub instance_slot: Option<super::membership::InstanceSlot>,
    /// What the brokers refuse (credentials, certificate, ACLs), shared with the dead-letter producer.
    pub access: Arc<super::access::AccessWatch>,
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
/// join state is not `steady` in any report for `timeout_ms`. librdkafka can stay so for good after a broker
/// restart (docs/RELIABILITY.md, "Kafka broker restarted"), and nothing short of a new consumer gets it back.
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

impl GroupContext {
    /// Hands revoked partitions to the delivery loop and waits for its answer: the loop drops what it holds of
    /// them, waits for their records in flight (not for lost ones) and answers with the offsets to commit. The
    /// loop may be gone (shutdown, or the consumer closing) or late: then what the tracker has is taken as is.
    fn hand_over(&self, partitions: &[Tp], lost: bool) -> Vec<(Tp, i64)> {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let revocation = Revocation {
            partitions: partitions.to_vec(),
            lost,
            answer,
        };
        if self.handoff.send_revoke(revocation) {
            match answered.recv_timeout(self.answer_within) {
                Ok(offsets) => return offsets,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                    partitions = ?partitions,
                    waited_ms = self.answer_within.as_millis() as u64,
                    "The delivery loop did not answer a revoke in time; committing what has finished"
                ),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
        }
        crate::lock(&self.tracker).revoke(partitions)
    }

    fn watch_group(&self, stats: &Statistics, now_ms: i64) {
        let join_state = stats.cgrp.as_ref().map(|g| g.join_state.as_str());
        let out_for = crate::lock(&self.rejoin).observe(join_state, now_ms);
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

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::access::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.access.report("consumer", &error, reason) {
            return;
        }
        if is_missing_topic(&error) {
            let line = crate::lock(&self.missing_topics).observe(Instant::now());
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
        let now = crate::now_ms();
        self.watch_group(&stats, now);
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(crate::catalogue::CONSUMER_LAG_RECORDS,
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
                let oldest =
                    crate::lock(&self.tracker).oldest_unfinished_timestamp(topic, p.partition);
                let caught_up_at = {
                    let mut c = crate::lock(&self.caught_up_at);
                    let tp = (topic.clone(), p.partition);
                    if p.consumer_lag == 0 {
                        c.insert(tp.clone(), now);
                    }
                    c.get(&tp).copied()
                };
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

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = tpl_to_vec(tpl);
                // Lost: the group went on without this consumer (its session timed out, e.g. while the process
                // was stopped), so other consumers may own these partitions already. Nothing is committed for
                // them; of their records here, those already running finish (idempotently), the rest are dropped.
                let lost = consumer.assignment_lost();
                let kind = if lost { "lost" } else { "revoke" };
                metrics::counter!(crate::catalogue::REBALANCES, "kind" => kind).increment(1);
                let offsets = self.hand_over(&revoked, lost);
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
            }
            Rebalance::Assign(tpl) => {
                metrics::counter!(crate::catalogue::REBALANCES, "kind" => "assign").increment(1);
                if tpl.count() > 0 {
                    crate::lock(&self.missing_topics).clear();
                    self.access.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

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
