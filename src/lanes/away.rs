//! Whether the process has been away (stopped with `SIGSTOP`, frozen, starved of CPU) long enough for its group
//! to have gone on without it. Kafka takes a member's partitions once its session times out; librdkafka learns
//! that only some time after the process runs again, and meanwhile the records queued in the lanes would run for
//! partitions another member may own now. So the lanes start no record after such a gap until the delivery loop
//! has confirmed the assignment (a commit accepted by the group coordinator, which checks membership) or has
//! dropped what was lost. Records already running when the process stopped finish (they are idempotent).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often the clock is read while the process runs: a gap is measured against the last reading.
pub const TICK: Duration = Duration::from_millis(250);

pub struct Away {
    origin: Instant,
    /// Milliseconds since `origin` at the last tick.
    last_tick_ms: AtomicU64,
    /// A gap at least this long holds the lanes.
    threshold: Duration,
    held: AtomicBool,
    /// Since when the lanes are held (ms since `origin`) and how long the gap was, for the log.
    held_since_ms: AtomicU64,
    gap_ms: AtomicU64,
    /// Wakes runners waiting for the lanes to be released.
    released: Notify,
    /// Wakes the delivery loop when the lanes were held.
    noticed: Notify,
}

impl Away {
    /// `threshold`: the shortest gap that holds the lanes; well under the session timeout, so that a member that
    /// may have been dropped is never taken for one that was not.
    pub fn new(threshold: Duration) -> Self {
        Away {
            origin: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            threshold,
            held: AtomicBool::new(false),
            held_since_ms: AtomicU64::new(0),
            gap_ms: AtomicU64::new(0),
            released: Notify::new(),
            noticed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Reads the clock: called every [`TICK`] by a task, and by a runner before each record (which may run first
    /// when the process resumes). Holds the lanes when the clock jumped by the threshold since the last reading.
    pub fn check(&self) {
        let now = self.now_ms();
        let last = self.last_tick_ms.swap(now, Ordering::AcqRel);
        let gap = now.saturating_sub(last);
        if gap >= self.threshold.as_millis() as u64 && !self.held.swap(true, Ordering::AcqRel) {
            self.held_since_ms.store(now, Ordering::Release);
            self.gap_ms.store(gap, Ordering::Release);
            tracing::warn!(
                away_ms = gap,
                "The process was away (stopped or starved) long enough for its group to have gone on; no record \
                 starts until a commit confirms its partitions"
            );
            self.noticed.notify_one();
        }
    }

    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Resolves once the lanes were held (at once if they were since the last call).
    pub async fn noticed(&self) {
        self.noticed.notified().await;
    }

    /// The assignment is confirmed (or what was lost is dropped): records start again.
    pub fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            let held_ms = self
                .now_ms()
                .saturating_sub(self.held_since_ms.load(Ordering::Acquire));
            tracing::info!(
                away_ms = self.gap_ms.load(Ordering::Acquire),
                held_ms,
                "Partitions confirmed; records start again"
            );
            // The runners' own reading starts from now, not from before the gap.
            self.last_tick_ms.store(self.now_ms(), Ordering::Release);
            self.released.notify_waiters();
        }
    }

    /// Before a record starts: holds the lanes if the clock jumped since the last reading (without writing the
    /// shared reading otherwise: runners on every core call this per record), then waits while they are held.
    pub async fn pass(&self) {
        let last = self.last_tick_ms.load(Ordering::Acquire);
        if self.now_ms().saturating_sub(last) >= self.threshold.as_millis() as u64 {
            self.check();
        }
        while self.is_held() {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.is_held() {
                return;
            }
            released.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gap_holds_the_lanes_until_released() {
        let away = std::sync::Arc::new(Away::new(Duration::from_millis(50)));
        away.check();
        assert!(!away.is_held());
        std::thread::sleep(Duration::from_millis(80));
        let a = away.clone();
        let waiter = tokio::spawn(async move { a.pass().await });
        tokio::time::timeout(Duration::from_secs(1), away.noticed())
            .await
            .expect("the loop is told");
        assert!(away.is_held());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no record starts while held");
        away.release();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .unwrap();
        away.check();
        assert!(!away.is_held(), "the reading after the release starts anew");
    }
}
