//! Metric handles of the per-record path, looked up once per label set. The `metrics` macros build, hash and
//! look up a key in the recorder's registry on every call, which cost more than decoding a record's fields.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use metrics::{Counter, Histogram};

use crate::registry::Registry;

/// Handles per pair of label values, found by a linear scan: there are a handful (topics; handler and event
/// type). Bounded, so a stream of new label values cannot grow it without end: past the bound, handles are
/// looked up in the registry each time, as the macros do.
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
    /// The handles for `(a, b)`, made by `make` the first time.
    pub fn get(&self, a: &str, b: &str, make: impl FnOnce() -> H) -> H {
        if let Ok(entries) = self.entries.read()
            && let Some((_, _, h)) = entries.iter().find(|(x, y, _)| x == a && y == b)
        {
            return h.clone();
        }
        let h = make();
        if let Ok(mut entries) = self.entries.write()
            && entries.len() < MAX_ENTRIES
            && !entries.iter().any(|(x, y, _)| x == a && y == b)
        {
            entries.push((a.to_string(), b.to_string(), h.clone()));
        }
        h
    }
}

/// Per topic.
#[derive(Clone)]
pub struct TopicMetrics {
    pub consumed: Counter,
    pub processed: Counter,
}

/// Per handler and event type: the successful path.
#[derive(Clone)]
pub struct HandlerMetrics {
    pub duration: Histogram,
    pub ok: Counter,
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
        self.topics.get(topic, "", || TopicMetrics {
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
        self.handlers.get(handler, event_type, || HandlerMetrics {
            duration: metrics::histogram!(crate::catalogue::HANDLER_DURATION, "handler" => handler.to_string()),
            ok: metrics::counter!(crate::catalogue::HANDLER_RESULTS, "handler" => handler.to_string(), "event_type" => event_type.to_string(), "outcome" => "ok"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Handles;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn made_once_per_label_pair_and_bounded() {
        let made = AtomicUsize::new(0);
        let h: Handles<usize> = Handles::default();
        let make = || made.fetch_add(1, Ordering::SeqCst);
        assert_eq!(h.get("t", "", make), 0);
        assert_eq!(h.get("t", "", make), 0, "cached");
        assert_eq!(h.get("t", "x", make), 1, "another pair");
        assert_eq!(made.load(Ordering::SeqCst), 2);
        for i in 0..super::MAX_ENTRIES + 10 {
            h.get(&i.to_string(), "", || 0);
        }
        assert_eq!(h.entries.read().unwrap().len(), super::MAX_ENTRIES);
    }
}
