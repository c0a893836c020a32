//! What the logs say while something the records need is unavailable (MongoDB behind the event ledger or a handler,
//! the dead-letter topic): one line when it becomes unavailable, a summary at most every [`SUMMARY_EVERY`] while it
//! stays so (failed attempts, records waiting, the oldest of them), one line when it is back. Each record's own
//! retries log at DEBUG: an outage of a minute under load is a few lines, not one per record per retry. Owns only
//! that bookkeeping; never decides whether to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How often a summary is logged while a dependency stays unavailable.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// A record waiting on a dependency: topic, partition, offset.
pub type Waiting = (String, i32, i64);

#[derive(Default)]
struct State {
    /// When the current outage started; `None` while available.
    since: Option<Instant>,
    last_summary: Option<Instant>,
    failures: u64,
    last_error: String,
    /// Records waiting now, with when each first failed.
    waiting: HashMap<Waiting, Instant>,
}

/// One dependency's availability, as the records that need it see it.
pub struct Outage {
    name: String,
    state: Mutex<State>,
}

impl Outage {
    fn new(name: &str) -> Self {
        Outage {
            name: name.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    /// A record's attempt failed for want of the dependency.
    pub fn failed(&self, record: Waiting, error: &str) {
        self.failed_at(record, error, Instant::now());
    }

    fn failed_at(&self, record: Waiting, error: &str, now: Instant) {
        let mut s = crate::lock(&self.state);
        s.failures += 1;
        s.last_error = error.to_string();
        s.waiting.entry(record.clone()).or_insert(now);
        match s.since {
            None => {
                s.since = Some(now);
                s.last_summary = Some(now);
                let (topic, partition, offset) = record;
                warn!(dependency = %self.name, error, topic, partition, offset,
                    "Unavailable: records that need it wait and are retried (a summary every 30 s while it lasts)");
            }
            Some(since) => {
                if s.last_summary
                    .is_some_and(|t| now.duration_since(t) >= SUMMARY_EVERY)
                {
                    s.last_summary = Some(now);
                    let oldest = s.waiting.iter().min_by_key(|(_, t)| **t);
                    let (oldest_record, oldest_waiting_s) = match oldest {
                        Some(((t, p, o), at)) => {
                            (format!("{t}/{p}@{o}"), now.duration_since(*at).as_secs())
                        }
                        None => (String::new(), 0),
                    };
                    warn!(dependency = %self.name, unavailable_s = now.duration_since(since).as_secs(),
                        failed_attempts = s.failures, waiting_records = s.waiting.len(), oldest_record,
                        oldest_waiting_s, last_error = %s.last_error, "Still unavailable");
                }
            }
        }
    }

    /// A record's attempt succeeded: it waits no more, and an outage, if there was one, is over.
    pub fn succeeded(&self, record: &Waiting) {
        self.succeeded_at(record, Instant::now());
    }

    fn succeeded_at(&self, record: &Waiting, now: Instant) {
        let mut s = crate::lock(&self.state);
        if s.since.is_none() && s.waiting.is_empty() {
            return;
        }
        s.waiting.remove(record);
        if let Some(since) = s.since.take() {
            info!(dependency = %self.name, unavailable_s = now.duration_since(since).as_secs(),
                failed_attempts = s.failures, still_waiting = s.waiting.len(), "Available again");
            s.failures = 0;
            s.last_summary = None;
        }
    }

    /// A record gave up waiting (shutdown, its partition revoked, dead-lettered).
    pub fn forget(&self, record: &Waiting) {
        crate::lock(&self.state).waiting.remove(record);
    }

    /// Whether the dependency is unavailable now.
    pub fn is_down(&self) -> bool {
        crate::lock(&self.state).since.is_some()
    }
}

/// The outages of one processor, by dependency name.
#[derive(Default)]
pub struct Outages {
    by_name: Mutex<HashMap<String, Arc<Outage>>>,
}

impl Outages {
    pub fn of(&self, name: &str) -> Arc<Outage> {
        crate::lock(&self.by_name)
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Outage::new(name)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_line_a_summary_per_interval_and_one_line_when_over() {
        let o = Outage::new("MongoDB");
        let t0 = Instant::now();
        let rec = |o: i64| ("t".to_string(), 0, o);
        o.failed_at(rec(1), "down", t0);
        assert!(o.is_down());
        for i in 0..100 {
            o.failed_at(
                rec(i % 7),
                "down",
                t0 + Duration::from_millis(i as u64 * 100),
            );
        }
        {
            let s = crate::lock(&o.state);
            assert_eq!(s.waiting.len(), 7);
            assert_eq!(s.failures, 101);
            assert_eq!(s.last_summary, Some(t0), "no summary within the first 30 s");
        }
        o.failed_at(rec(1), "down", t0 + SUMMARY_EVERY);
        assert_eq!(crate::lock(&o.state).last_summary, Some(t0 + SUMMARY_EVERY));
        o.succeeded_at(&rec(1), t0 + SUMMARY_EVERY * 2);
        assert!(!o.is_down());
        let s = crate::lock(&o.state);
        assert_eq!(
            s.waiting.len(),
            6,
            "the others still wait for their own retry"
        );
        assert_eq!(s.failures, 0);
    }
}
