//! Liveness and readiness as the processing loop sees them. Owns only atomics that the loop, the Kafka context
//! and the MongoDB pinger update; the HTTP layer reads them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::now_ms;

/// Liveness fails when the loop has not beaten for this long.
pub const LIVENESS_STALL: Duration = Duration::from_secs(60);
/// Readiness fails when commits have failed for this long.
pub const COMMIT_STALL: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Health {
    assigned_partitions: AtomicUsize,
    mongo_reachable: AtomicBool,
    last_beat_ms: AtomicI64,
    /// When commits started failing (0 while they succeed).
    commit_failing_since_ms: AtomicI64,
    /// Records whose dead letter the broker refuses now (`dlq::is_refusal`).
    letters_refused: AtomicUsize,
    /// Partitions whose oldest waiting record has waited past `PARTITION_STALL_TIMEOUT_MS`.
    stalled: Mutex<Vec<StalledPartition>>,
    /// What Kafka refuses this client now (`kafka::access`), and what MongoDB does.
    kafka_refused: Mutex<Option<&'static str>>,
    mongo_refused: Mutex<Option<&'static str>>,
}

/// A partition that has not committed for the stall bound, though a record of it waits.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StalledPartition {
    pub topic: String,
    pub partition: i32,
    /// The record it waits for.
    pub offset: i64,
    pub waiting_s: u64,
}

/// What `/health/ready` reports.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub assigned_partitions: usize,
    pub mongo_reachable: bool,
    pub commits_stalled: bool,
    /// Records whose dead letter the broker refuses: their partitions wait behind them.
    pub dead_letters_refused: usize,
    /// Partitions whose oldest waiting record has waited past the stall bound, whatever the cause.
    pub stalled_partitions: Vec<StalledPartition>,
    /// What Kafka refuses this client (credentials, certificate, topic/group/cluster authorization), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_refused: Option<String>,
    /// What MongoDB refuses it (credentials, certificate, authorization), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongo_refused: Option<String>,
}

impl Health {
    pub fn new() -> Self {
        let h = Self::default();
        h.beat();
        h
    }

    /// The processing loop is making progress.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn add_assigned(&self, n: usize) {
        self.assigned_partitions.fetch_add(n, Ordering::Relaxed);
    }

    pub fn remove_assigned(&self, n: usize) {
        let _ = self
            .assigned_partitions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    pub fn set_mongo_reachable(&self, ok: bool) {
        self.mongo_reachable.store(ok, Ordering::Relaxed);
    }

    pub fn commit_result(&self, ok: bool) {
        if ok {
            self.commit_failing_since_ms.store(0, Ordering::Relaxed);
        } else {
            let _ = self.commit_failing_since_ms.compare_exchange(
                0,
                now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A record's dead letter is refused (`true`), or went after all (`false`).
    pub fn letter_refused(&self, refused: bool) {
        if refused {
            self.letters_refused.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self
                .letters_refused
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(1))
                });
        }
    }

    /// What Kafka refuses this client now; `None` once it works again.
    pub fn kafka_refused(&self, what: Option<&'static str>) {
        *crate::lock(&self.kafka_refused) = what;
    }

    /// What MongoDB refuses this client now; `None` once it works again.
    pub fn mongo_refused(&self, what: Option<&'static str>) {
        *crate::lock(&self.mongo_refused) = what;
    }

    /// The partitions stalled now (replaces the previous list).
    pub fn set_stalled(&self, stalled: Vec<StalledPartition>) {
        *crate::lock(&self.stalled) = stalled;
    }

    pub fn live(&self) -> bool {
        now_ms() - self.last_beat_ms.load(Ordering::Relaxed) < LIVENESS_STALL.as_millis() as i64
    }

    pub fn readiness(&self) -> Readiness {
        let since = self.commit_failing_since_ms.load(Ordering::Relaxed);
        let commits_stalled = since != 0 && now_ms() - since > COMMIT_STALL.as_millis() as i64;
        let assigned_partitions = self.assigned_partitions.load(Ordering::Relaxed);
        let mongo_reachable = self.mongo_reachable.load(Ordering::Relaxed);
        let dead_letters_refused = self.letters_refused.load(Ordering::Relaxed);
        let stalled_partitions = crate::lock(&self.stalled).clone();
        let kafka_refused = crate::lock(&self.kafka_refused).map(str::to_string);
        let mongo_refused = crate::lock(&self.mongo_refused).map(str::to_string);
        Readiness {
            ready: assigned_partitions > 0
                && mongo_reachable
                && !commits_stalled
                && dead_letters_refused == 0
                && stalled_partitions.is_empty()
                && kafka_refused.is_none()
                && mongo_refused.is_none(),
            assigned_partitions,
            mongo_reachable,
            commits_stalled,
            dead_letters_refused,
            stalled_partitions,
            kafka_refused,
            mongo_refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_partitions_and_mongo() {
        let h = Health::new();
        assert!(h.live());
        assert!(!h.readiness().ready);
        h.add_assigned(3);
        assert!(!h.readiness().ready);
        h.set_mongo_reachable(true);
        assert!(h.readiness().ready);
        h.remove_assigned(3);
        assert!(!h.readiness().ready);
    }

    #[test]
    fn a_refused_dead_letter_or_a_stalled_partition_makes_it_not_ready() {
        let h = Health::new();
        h.add_assigned(1);
        h.set_mongo_reachable(true);
        h.letter_refused(true);
        assert!(!h.readiness().ready);
        assert_eq!(h.readiness().dead_letters_refused, 1);
        h.letter_refused(false);
        assert!(h.readiness().ready);
        h.set_stalled(vec![StalledPartition {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            waiting_s: 61,
        }]);
        assert!(!h.readiness().ready);
        h.set_stalled(Vec::new());
        assert!(h.readiness().ready);
        h.kafka_refused(Some("credentials"));
        assert!(!h.readiness().ready);
        h.kafka_refused(None);
        h.mongo_refused(Some("certificate"));
        assert!(!h.readiness().ready);
        h.mongo_refused(None);
        assert!(h.readiness().ready);
    }
}
