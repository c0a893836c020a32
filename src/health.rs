//! Liveness and readiness as the processing loop sees them. Owns only atomics that the loop, the Kafka context
//! and the MongoDB pinger update; the HTTP layer reads them.

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
}

/// What `/health/ready` reports.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub assigned_partitions: usize,
    pub mongo_reachable: bool,
    pub commits_stalled: bool,
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

    pub fn live(&self) -> bool {
        now_ms() - self.last_beat_ms.load(Ordering::Relaxed) < LIVENESS_STALL.as_millis() as i64
    }

    pub fn readiness(&self) -> Readiness {
        let since = self.commit_failing_since_ms.load(Ordering::Relaxed);
        let commits_stalled = since != 0 && now_ms() - since > COMMIT_STALL.as_millis() as i64;
        let assigned_partitions = self.assigned_partitions.load(Ordering::Relaxed);
        let mongo_reachable = self.mongo_reachable.load(Ordering::Relaxed);
        Readiness {
            ready: assigned_partitions > 0 && mongo_reachable && !commits_stalled,
            assigned_partitions,
            mongo_reachable,
            commits_stalled,
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
}
