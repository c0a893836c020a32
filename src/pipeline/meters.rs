//! Metric handles of the per-record path, looked up once per label set, and the [`Tally`] that adds a run of
//! records' counts to them together. The `metrics` macros build, hash and look up a key in the recorder's registry
//! on every call, which cost more than decoding a record's fields; and every update of a shared counter or
//! histogram is a few atomic operations on memory every worker thread writes, a sixth to a fifth of the no-op
//! pipeline's CPU when done per record (docs/BENCHMARKS.md, "CPU per record").

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use metrics::{Counter, Histogram};

use crate::registry::Registry;

/// Handles per pair of label values, found by a linear scan: there are a handful (topics; handler and event
/// type). Bounded, so a stream of new label values cannot grow it without end: past the bound, handles are
/// looked up in the registry each time, as the macros do. Each kept entry has a slot number, its place in a
/// [`Tally`]; handles past the bound have none and are updated at once.
pub struct Handles<H> {
    entries: RwLock<Vec<(String, String, H)>>,
}

const MAX_ENTRIES: usize = 256;

impl<H> Default for Handles<H> {
    fn default() -> Self {
        Handles {
            entries: RwLock::new(Vec::new()),
        }
    }
}

impl<H: Clone> Handles<H> {
    /// The handles for `(a, b)`, made by `make` the first time, given their slot (`None` past the bound).
    pub fn get(&self, a: &str, b: &str, make: impl FnOnce(Option<usize>) -> H) -> H {
        let find = |entries: &[(String, String, H)]| {
            entries
                .iter()
                .find(|(x, y, _)| x == a && y == b)
                .map(|(_, _, h)| h.clone())
        };
        if let Ok(entries) = self.entries.read()
            && let Some(h) = find(&entries)
        {
            return h;
        }
        let Ok(mut entries) = self.entries.write() else {
            return make(None);
        };
        if let Some(h) = find(&entries) {
            return h;
        }
        if entries.len() >= MAX_ENTRIES {
            return make(None);
        }
        let h = make(Some(entries.len()));
        entries.push((a.to_string(), b.to_string(), h.clone()));
        h
    }
}

/// Per topic.
#[derive(Clone)]
pub struct TopicMetrics {
    slot: Option<usize>,
    consumed: Counter,
    processed: Counter,
}

/// Per handler and event type: the successful path.
#[derive(Clone)]
pub struct HandlerMetrics {
    slot: Option<usize>,
    /// Every attempt's duration, failed ones too (those are recorded at once: they are few).
    pub duration: Histogram,
    ok: Counter,
}

/// The cached handles of one processor.
#[derive(Default)]
pub struct RecordMetrics {
    topics: Handles<TopicMetrics>,
    handlers: Handles<HandlerMetrics>,
    /// Per event type, the handles of its handlers in the registry's order: made once, then read without a lock
    /// (a lock taken by every handler call would be contended by every worker thread).
    routes: OnceLock<HashMap<String, Vec<HandlerMetrics>>>,
}

impl RecordMetrics {
    pub fn topic(&self, topic: &str) -> TopicMetrics {
        self.topics.get(topic, "", |slot| TopicMetrics {
            slot,
            consumed: metrics::counter!(crate::catalogue::RECORDS_CONSUMED, "topic" => topic.to_string()),
            processed: metrics::counter!(crate::catalogue::RECORDS, "topic" => topic.to_string(), "outcome" => "processed"),
        })
    }

    /// The handles of `registry.handlers_for(event_type)`, index for index.
    pub fn route(&self, registry: &Registry, event_type: &str) -> &[HandlerMetrics] {
        let routes = self.routes.get_or_init(|| {
            registry
                .routes()
                .map(|(t, handlers)| {
                    let handles = handlers.iter().map(|h| self.handler(h.name(), t)).collect();
                    (t.to_string(), handles)
                })
                .collect()
        });
        routes.get(event_type).map_or(&[], Vec::as_slice)
    }

    pub fn handler(&self, handler: &str, event_type: &str) -> HandlerMetrics {
        self.handlers.get(handler, event_type, |slot| HandlerMetrics {
            slot,
            duration: metrics::histogram!(crate::catalogue::HANDLER_DURATION, "handler" => handler.to_string()),
            ok: metrics::counter!(crate::catalogue::HANDLER_RESULTS, "handler" => handler.to_string(), "event_type" => event_type.to_string(), "outcome" => "ok"),
        })
    }
}

/// Counts of the per-record path not yet added to the shared metrics: records consumed and processed per topic,
/// successful handler calls and their durations. One lane runner keeps one and flushes it every few records and
/// before it waits for work, so the shared counters and histograms are updated once per run of records instead of
/// once per record, and are exact whenever the daemon is idle. Dropping it flushes it.
#[derive(Default)]
pub struct Tally {
    /// By slot: the handles, records consumed, records processed.
    topics: Vec<Option<(TopicMetrics, u64, u64)>>,
    /// By slot: the handles and the durations of the successful calls (as many as there were).
    handlers: Vec<Option<(HandlerMetrics, Vec<f64>)>>,
    records: usize,
}

impl Tally {
    /// Records consumed since the last flush.
    pub fn pending(&self) -> usize {
        self.records
    }

    pub fn consumed(&mut self, m: &TopicMetrics) {
        self.records += 1;
        match slot(&mut self.topics, m.slot, || (m.clone(), 0, 0)) {
            Some(entry) => entry.1 += 1,
            None => m.consumed.increment(1),
        }
    }

    pub fn processed(&mut self, m: &TopicMetrics) {
        match slot(&mut self.topics, m.slot, || (m.clone(), 0, 0)) {
            Some(entry) => entry.2 += 1,
            None => m.processed.increment(1),
        }
    }

    /// A handler call that succeeded after `seconds` (its last attempt's).
    pub fn handled(&mut self, m: &HandlerMetrics, seconds: f64) {
        match slot(&mut self.handlers, m.slot, || (m.clone(), Vec::new())) {
            Some((_, durations)) => durations.push(seconds),
            None => {
                m.duration.record(seconds);
                m.ok.increment(1);
            }
        }
    }

    /// Adds everything counted since the last flush to the shared metrics.
    pub fn flush(&mut self) {
        self.records = 0;
        for (m, consumed, processed) in self.topics.iter_mut().flatten() {
            if *consumed > 0 {
                m.consumed.increment(std::mem::take(consumed));
            }
            if *processed > 0 {
                m.processed.increment(std::mem::take(processed));
            }
        }
        for (m, durations) in self.handlers.iter_mut().flatten() {
            if !durations.is_empty() {
                m.ok.increment(durations.len() as u64);
            }
            for d in durations.drain(..) {
                m.duration.record(d);
            }
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The tally's entry of `slot`, made by `make` on first use; `None` for handles without a slot.
fn slot<E>(
    entries: &mut Vec<Option<E>>,
    slot: Option<usize>,
    make: impl FnOnce() -> E,
) -> Option<&mut E> {
    let i = slot?;
    if entries.len() <= i {
        entries.resize_with(i + 1, || None);
    }
    Some(entries[i].get_or_insert_with(make))
}

#[cfg(test)]
mod tests {
    use super::Handles;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn made_once_per_label_pair_and_bounded() {
        let made = AtomicUsize::new(0);
        let h: Handles<(usize, Option<usize>)> = Handles::default();
        let make = |slot| (made.fetch_add(1, Ordering::SeqCst), slot);
        assert_eq!(h.get("t", "", make), (0, Some(0)));
        assert_eq!(h.get("t", "", make), (0, Some(0)), "cached");
        assert_eq!(h.get("t", "x", make), (1, Some(1)), "another pair");
        assert_eq!(made.load(Ordering::SeqCst), 2);
        for i in 0..super::MAX_ENTRIES + 10 {
            h.get(&i.to_string(), "", |slot| (0, slot));
        }
        assert_eq!(h.entries.read().unwrap().len(), super::MAX_ENTRIES);
        assert_eq!(h.get("past the bound", "", |slot| (7, slot)), (7, None));
    }

    /// The value of the sample of `metric` whose labels include every one of `labels`, in a Prometheus page; 0 when
    /// absent.
    fn sample(page: &str, metric: &str, labels: &[&str]) -> f64 {
        page.lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) && labels.iter().all(|x| l.contains(x))
            })
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn a_tally_reaches_the_metrics_when_flushed_or_dropped_and_a_handle_without_slot_at_once() {
        use crate::catalogue::{HANDLER_DURATION, HANDLER_RESULTS, RECORDS, RECORDS_CONSUMED};
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let page = recorder.handle();
        let (topic, handler, unslotted) = metrics::with_local_recorder(&recorder, || {
            let m = super::RecordMetrics::default();
            let unslotted = super::TopicMetrics {
                slot: None,
                ..m.topic("other")
            };
            (m.topic("orders"), m.handler("h", "UserCreated"), unslotted)
        });
        let consumed = |label| sample(&page.render(), RECORDS_CONSUMED, &[label]);
        let mut tally = super::Tally::default();
        for _ in 0..3 {
            tally.consumed(&topic);
        }
        tally.processed(&topic);
        tally.handled(&handler, 0.25);
        tally.handled(&handler, 0.5);
        assert_eq!(tally.pending(), 3);
        assert_eq!(consumed(r#"topic="orders""#), 0.0, "nothing before a flush");

        tally.flush();
        let text = page.render();
        assert_eq!(tally.pending(), 0);
        let orders = r#"topic="orders""#;
        assert_eq!(sample(&text, RECORDS_CONSUMED, &[orders]), 3.0);
        // Both topics have a `processed` series (the other's at 0): the page lists them in no fixed order.
        assert_eq!(
            sample(&text, RECORDS, &[orders, r#"outcome="processed""#]),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                HANDLER_RESULTS,
                &[r#"handler="h""#, r#"outcome="ok""#]
            ),
            2.0
        );
        let duration = |suffix: &str| {
            sample(
                &text,
                &format!("{HANDLER_DURATION}_{suffix}"),
                &[r#"handler="h""#],
            )
        };
        assert_eq!((duration("count"), duration("sum")), (2.0, 0.75));

        tally.flush();
        assert_eq!(
            consumed(r#"topic="orders""#),
            3.0,
            "a flush adds each count once"
        );

        tally.consumed(&unslotted);
        assert_eq!(
            consumed(r#"topic="other""#),
            1.0,
            "no slot: counted at once"
        );
        tally.consumed(&topic);
        drop(tally);
        assert_eq!(consumed(r#"topic="orders""#), 4.0, "dropping flushes");
    }
}
