//! Processing of one record: decode, fan out to handlers, retry, isolate, dead-letter. Owns the per-record
//! contract of `DESIGN.md` section 4; never polls, orders or commits (`dispatch` runs records in keyed lanes,
//! the consumer loop in `app` commits).
//!
//! Within one event, every handler runs concurrently and fails alone.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::message::{Message, OwnedMessage};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, debug_span, error, info_span, warn};

use crate::decode::{Decoded, decode};
use crate::dlq::{DeadLetter, DeadLetterSink};
use crate::event::OutboxEvent;
use crate::registry::{EventHandler, HandlerContext, HandlerError, Registry};
use handles::HandlerMetrics;
pub use handles::RecordMetrics;

/// Retry and concurrency settings.
#[derive(Debug, Clone)]
pub struct ProcessingSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub handler_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl ProcessingSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            concurrency: c.processing_concurrency,
            max_attempts: c.handler_max_attempts,
            handler_timeout: c.handler_timeout(),
            initial_backoff: Duration::from_millis(c.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(c.retry_max_backoff_ms),
        }
    }
}

/// How one record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Every handler succeeded (or some were dead-lettered: see `dead_lettered`).
    Processed { dead_lettered: usize },
    /// Nothing to do: tombstone, update, heartbeat, ... or an event type without handlers.
    Skipped,
    /// The record could not be decoded and was dead-lettered.
    DeadLettered,
    /// Shutdown came first: not finished, must not be committed.
    Abandoned,
}

impl RecordOutcome {
    pub fn finished(self) -> bool {
        self != RecordOutcome::Abandoned
    }
}

/// Counts of one batch, for the batch log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    pub records: usize,
    pub processed: usize,
    pub skipped: usize,
    pub dead_lettered: usize,
    pub abandoned: usize,
}

/// Everything a record needs to be processed. Cheap to share.
pub struct Processor {
    pub registry: Arc<Registry>,
    pub ctx: HandlerContext,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    pub settings: ProcessingSettings,
    /// Cancelled on shutdown: retries stop, records not yet started are abandoned.
    pub cancel: CancellationToken,
    /// Metric handles of the per-record path.
    pub metrics: RecordMetrics,
}

/// One handler's fate for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandlerOutcome {
    Ok,
    DeadLettered,
    Abandoned,
}

impl Processor {
    /// Decodes one record and runs every handler of its event type.
    pub async fn process_record(&self, msg: &OwnedMessage) -> RecordOutcome {
        let topic = msg.topic();
        let partition = msg.partition();
        let offset = msg.offset();
        let topic_metrics = self.metrics.topic(topic);
        topic_metrics.consumed.increment(1);
        match decode(msg) {
            Err(e) => {
                warn!(topic, partition, offset, error = %e, error_class = e.class(), "Undecodable record; dead-lettering it");
                metrics::counter!("event_processor_records_total", "topic" => topic.to_string(), "outcome" => "undecodable")
                    .increment(1);
                let letter = DeadLetter {
                    record: msg,
                    error_class: format!("decode.{}", e.class()),
                    error_message: e.to_string(),
                    handler: None,
                    event_id: None,
                    event_type: None,
                    attempts: 1,
                };
                if self.dead_letter(&letter).await {
                    RecordOutcome::DeadLettered
                } else {
                    RecordOutcome::Abandoned
                }
            }
            Ok(Decoded::Skip(reason)) => {
                debug!(
                    topic,
                    partition,
                    offset,
                    reason = reason.as_str(),
                    "Record skipped"
                );
                metrics::counter!("event_processor_records_skipped_total", "topic" => topic.to_string(), "reason" => reason.as_str())
                    .increment(1);
                RecordOutcome::Skipped
            }
            Ok(Decoded::Event(event)) => {
                // At debug level every event has its span; otherwise a span is made only for a handler that
                // fails (see `run_handler`): making one per event, with its fields formatted, cost a third of a
                // record's processing at the default level.
                let span = debug_span!("event", topic, partition, offset, event_id = %event.event_id, event_type = %event.event_type);
                let outcome = self.dispatch(msg, &event).instrument(span).await;
                if matches!(outcome, RecordOutcome::Processed { .. }) {
                    topic_metrics.processed.increment(1);
                }
                outcome
            }
        }
    }

    /// Runs all handlers of the event concurrently, each isolated from the others' errors and panics.
    async fn dispatch(&self, msg: &OwnedMessage, event: &OutboxEvent) -> RecordOutcome {
        let handlers = self.registry.handlers_for(&event.event_type);
        let mut handles = self.metrics.route(&self.registry, &event.event_type);
        let made;
        if handles.len() != handlers.len() {
            // Only if the registry was replaced after the routes were made: never run fewer handlers.
            made = handlers
                .iter()
                .map(|h| self.metrics.handler(h.name(), &event.event_type))
                .collect::<Vec<_>>();
            handles = &made;
        }
        // The handlers start together: one clock read serves as every first attempt's start. The runtime's clock,
        // which is the system's unless a test paused it: timeouts are measured on it.
        let started = Instant::now();
        match (handlers, handles) {
            ([], _) => {
                debug!("No handler for this event type; skipped");
                metrics::counter!("event_processor_records_skipped_total", "topic" => event.source.topic.clone(), "reason" => "unknown_event_type")
                    .increment(1);
                RecordOutcome::Skipped
            }
            // Most event types have one handler: no joined set of futures to build.
            ([h], [m]) => {
                let outcome = self.run_handler(h.as_ref(), m, started, msg, event).await;
                record_outcome([outcome])
            }
            _ => record_outcome(
                futures::future::join_all(
                    handlers
                        .iter()
                        .zip(handles)
                        .map(|(h, m)| self.run_handler(h.as_ref(), m, started, msg, event)),
                )
                .await,
            ),
        }
    }

    /// Re-runs a dead letter's original record: only `handler` when the letter names one that is registered
    /// (its siblings already succeeded), else the whole record. A failure is dead-lettered again.
    pub async fn replay(&self, original: &OwnedMessage, handler: Option<&str>) -> RecordOutcome {
        let Some(h) = handler.and_then(|name| self.registry.by_name(name)) else {
            return self.process_record(original).await;
        };
        match decode(original) {
            Ok(Decoded::Event(event)) => {
                let m = self.metrics.handler(h.name(), &event.event_type);
                let now = Instant::now();
                let outcome = self
                    .run_handler(h.as_ref(), &m, now, original, &event)
                    .await;
                record_outcome([outcome])
            }
            _ => self.process_record(original).await,
        }
    }

    /// Runs one handler with retries: transient failures retry with capped exponential backoff until they
    /// succeed or shutdown; permanent failures and panics retry up to `max_attempts`, then dead-letter.
    /// `started`: when the first attempt starts (the caller has read the clock).
    async fn run_handler(
        &self,
        handler: &dyn EventHandler,
        handler_metrics: &HandlerMetrics,
        mut started: Instant,
        msg: &OwnedMessage,
        event: &OutboxEvent,
    ) -> HandlerOutcome {
        let name = handler.name();
        let mut failures: u32 = 0;
        let mut attempt: u32 = 0;
        // The record's span once the handler has failed: its log lines, and its handler's in later attempts, name
        // the record.
        let mut span = Span::none();
        loop {
            attempt += 1;
            if attempt > 1 {
                started = Instant::now();
            }
            let call = AssertUnwindSafe(tokio::time::timeout_at(
                started + self.settings.handler_timeout,
                handler.handle(event, &self.ctx),
            ))
            .catch_unwind()
            .instrument(span.clone())
            .await;
            handler_metrics
                .duration
                .record(started.elapsed().as_secs_f64());
            let (class, err): (&str, String) = match call {
                Ok(Ok(Ok(()))) => {
                    handler_metrics.ok.increment(1);
                    return HandlerOutcome::Ok;
                }
                Ok(Ok(Err(HandlerError::Transient(e)))) => ("transient", format!("{e:#}")),
                Ok(Err(_elapsed)) => (
                    "transient",
                    format!("timed out after {:?}", self.settings.handler_timeout),
                ),
                Ok(Ok(Err(HandlerError::Permanent(e)))) => ("permanent", format!("{e:#}")),
                Err(panic) => ("panic", panic_message(&panic)),
            };
            metrics::counter!("event_processor_handler_results_total", "handler" => name.to_string(), "event_type" => event.event_type.clone(), "outcome" => class.to_string())
                .increment(1);
            if span.is_none() {
                span = record_span(event);
            }
            if class == "transient" {
                // Never dead-lettered: the world, not the event, is at fault. The backoff restarts from the
                // first failure of each outage.
                span.in_scope(|| warn!(handler = name, attempt, error = %err, "Handler failed transiently; retrying"));
            } else {
                failures += 1;
                if failures >= self.settings.max_attempts {
                    span.in_scope(|| error!(handler = name, attempts = attempt, error_class = class, error = %err, "Handler failed permanently; dead-lettering"));
                    let letter = DeadLetter {
                        record: msg,
                        error_class: format!("handler.{class}"),
                        error_message: err,
                        handler: Some(name),
                        event_id: Some(&event.event_id),
                        event_type: Some(&event.event_type),
                        attempts: attempt,
                    };
                    return if self.dead_letter(&letter).instrument(span).await {
                        HandlerOutcome::DeadLettered
                    } else {
                        HandlerOutcome::Abandoned
                    };
                }
                span.in_scope(|| warn!(handler = name, attempt, error_class = class, error = %err, "Handler failed; retrying"));
            }
            if !self.sleep(backoff(&self.settings, attempt)).await {
                return HandlerOutcome::Abandoned;
            }
        }
    }

    /// Writes a dead letter, retrying until the broker acknowledges it or shutdown. False when abandoned: the
    /// record then stays uncommitted.
    async fn dead_letter(&self, letter: &DeadLetter<'_>) -> bool {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.dead_letters.send(letter).await {
                Ok(()) => {
                    metrics::counter!("event_processor_dead_letters_total", "topic" => letter.record.topic().to_string(), "class" => letter.error_class.clone())
                        .increment(1);
                    return true;
                }
                Err(e) => {
                    metrics::counter!("event_processor_dead_letter_failures_total").increment(1);
                    error!(topic = letter.record.topic(), partition = letter.record.partition(), offset = letter.record.offset(),
                        error = %e, attempt, "Dead-letter topic unavailable; the record stays uncommitted");
                }
            }
            if !self.sleep(backoff(&self.settings, attempt)).await {
                return false;
            }
        }
    }

    /// Sleeps unless shutdown comes first (then false).
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// The span that names `event`'s record in log lines: the one the event runs in, when enabled (debug level), else
/// a new one at info level.
fn record_span(event: &OutboxEvent) -> Span {
    let current = Span::current();
    if !current.is_disabled() && current.metadata().is_some_and(|m| m.name() == "event") {
        return current;
    }
    let s = &event.source;
    info_span!("event", topic = %s.topic, partition = s.partition, offset = s.offset, event_id = %event.event_id, event_type = %event.event_type)
}

/// A record's outcome from its handlers': abandoned if any was, else processed, counting dead letters.
fn record_outcome(handlers: impl IntoIterator<Item = HandlerOutcome>) -> RecordOutcome {
    let mut dead_lettered = 0;
    for outcome in handlers {
        match outcome {
            HandlerOutcome::Abandoned => return RecordOutcome::Abandoned,
            HandlerOutcome::DeadLettered => dead_lettered += 1,
            HandlerOutcome::Ok => {}
        }
    }
    RecordOutcome::Processed { dead_lettered }
}

/// Capped exponential backoff with full jitter in [d/2, d].
pub fn backoff(s: &ProcessingSettings, attempt: u32) -> Duration {
    let exp = s
        .initial_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(s.max_backoff);
    let half = capped / 2;
    half + half.mul_f64(fastrand::f64())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

mod handles;
#[cfg(test)]
mod tests;
