//! Processing of one record: decode, fan out to handlers, retry, isolate, dead-letter. Owns the per-record
//! contract (docs/ARCHITECTURE.md); never polls, orders or commits (`lanes` runs records in keyed lanes,
//! `kafka::delivery` commits).
//!
//! Within one event, every handler runs concurrently and fails alone.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::message::{Message, OwnedMessage};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, debug_span, error, info, info_span, warn};

use crate::decode::{Decoded, decode};
use crate::dlq::{DeadLetter, DeadLetterSink};
use crate::event::OutboxEvent;
use crate::handler::{EventHandler, HandlerContext, HandlerError};
use crate::ledger::Refusal;
use crate::registry::Registry;
use meters::HandlerMetrics;
pub use meters::{RecordMetrics, Tally};

/// Retry and concurrency settings.
#[derive(Debug, Clone)]
pub struct ProcessingSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub handler_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Whether events go through the event ledger (conflicting duplicates refused, undated events dated once).
    pub ledger: bool,
    /// The dead-letter topic: its records are never processed, even where a subscription pattern matches it.
    pub dead_letter_topic: String,
    /// What each topic carries (`RECORD_FORMATS`).
    pub formats: Arc<crate::decode::Formats>,
    /// The shortest gap in the process's running (stopped, frozen) after which no record starts until its
    /// partition is confirmed (`lanes::away`): a third of the session timeout, between 1 and 3 s.
    pub away_threshold: Duration,
}

impl ProcessingSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            concurrency: c.processing_concurrency,
            max_attempts: c.handler_max_attempts,
            handler_timeout: c.handler_timeout(),
            initial_backoff: Duration::from_millis(c.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(c.retry_max_backoff_ms),
            ledger: c.event_ledger,
            dead_letter_topic: c.dlq_topic.clone(),
            formats: Arc::new(c.record_formats()),
            away_threshold: Duration::from_millis(c.kafka_session_timeout_ms / 3)
                .clamp(Duration::from_secs(1), Duration::from_secs(3)),
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
    /// Where handlers routed away from `ctx`'s database by a rebuild write (`crate::routes`).
    pub routes: Arc<crate::routes::Routes>,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    pub settings: ProcessingSettings,
    /// Cancelled on shutdown: retries stop, records not yet started are abandoned.
    pub cancel: CancellationToken,
    /// Metric handles of the per-record path.
    pub metrics: RecordMetrics,
    /// Readiness: what the per-record path knows of it (dead letters the broker refuses).
    pub health: Arc<crate::health::Health>,
    /// What the logs say while a dependency is unavailable (`crate::outage`).
    pub outages: crate::outage::Outages,
}

/// One handler's fate for one event.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HandlerOutcome {
    /// Succeeded; its last attempt took this many seconds.
    Ok(f64),
    DeadLettered,
    Abandoned,
}

impl Processor {
    /// Decodes one record and runs every handler of its event type.
    pub async fn process_record(&self, msg: &OwnedMessage) -> RecordOutcome {
        self.process_counted(msg, &mut Tally::default()).await
    }

    /// [`Self::process_record`], its counts added to `tally` (for the caller to flush) rather than to the metrics.
    pub async fn process_counted(&self, msg: &OwnedMessage, tally: &mut Tally) -> RecordOutcome {
        let topic = msg.topic();
        let partition = msg.partition();
        let offset = msg.offset();
        let topic_metrics = self.metrics.topic(topic);
        tally.consumed(&topic_metrics);
        if topic == self.settings.dead_letter_topic {
            // A subscription pattern matched the dead-letter topic (a topic created after start-up can): its
            // letters are never processed here, or one bad record would feed on its own dead letters.
            warn!(
                topic,
                partition,
                offset,
                "Record of the dead-letter topic skipped; the subscription matches it"
            );
            count_skip(topic, "dead_letter_topic");
            return RecordOutcome::Skipped;
        }
        let format = self.settings.formats.of(topic);
        match decode(msg, format) {
            Err(e) => {
                let (event_id, event_type) = crate::decode::identity(msg, format);
                warn!(topic, partition, offset, event_id, event_type, error = %e, error_class = e.class(), "Undecodable record; dead-lettering it");
                metrics::counter!(crate::catalogue::RECORDS, "topic" => topic.to_string(), "outcome" => "undecodable")
                    .increment(1);
                let letter = DeadLetter {
                    record: msg,
                    error_class: format!("decode.{}", e.class()),
                    error_message: e.to_string(),
                    handler: None,
                    event_id: event_id.as_deref(),
                    event_type: event_type.as_deref(),
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
                count_skip(topic, reason.as_str());
                RecordOutcome::Skipped
            }
            Ok(Decoded::Event(mut event)) => {
                // At debug level every event has its span; otherwise a span is made only for a record that fails
                // (see `record_span`), which keeps formatting its fields off the path of every record.
                let span = debug_span!("event", topic, partition, offset, event_id = %event.event_id, event_type = %event.event_type);
                let outcome = async {
                    if self.registry.handlers_for(&event.event_type).is_empty() {
                        debug!("No handler for this event type; skipped");
                        count_skip(topic, "unknown_event_type");
                        return RecordOutcome::Skipped;
                    }
                    if let Err(outcome) = self.admit(msg, &mut event).await {
                        return outcome;
                    }
                    self.fan_out(msg, &event, tally).await
                }
                .instrument(span)
                .await;
                if matches!(outcome, RecordOutcome::Processed { .. }) {
                    tally.processed(&topic_metrics);
                }
                outcome
            }
        }
    }

    /// What an event must pass before any handler runs: its type's payload contract (decided once for all its
    /// handlers), then the event ledger (a conflicting duplicate is refused; an undated event gets the time of its
    /// first copy). `Err`: the record's outcome without its handlers: dead-lettered, or abandoned on shutdown.
    async fn admit(
        &self,
        msg: &OwnedMessage,
        event: &mut OutboxEvent,
    ) -> Result<(), RecordOutcome> {
        if let Err(why) = self.registry.validate(event) {
            record_span(event).in_scope(|| warn!(error = %why, "Payload invalid for its event type; dead-lettering the event, no handler runs"));
            return Err(self.refuse(msg, event, "invalid_payload", why, 1).await);
        }
        if !self.settings.ledger {
            return Ok(());
        }
        let (mut attempt, mut failures) = (0u32, 0u32);
        let ledger = self.outages.of("MongoDB (event ledger)");
        let waiting = waiting_of(msg);
        loop {
            attempt += 1;
            let err = match crate::ledger::admit(&self.ctx, event).await {
                Ok(()) => {
                    if attempt > 1 {
                        ledger.succeeded(&waiting);
                    }
                    return Ok(());
                }
                Err(Refusal::Conflict { first, now }) => {
                    ledger.forget(&waiting);
                    let why = format!(
                        "event id {} was taken in before with other content (fingerprint {first}, now {now}); the \
                         first version stands",
                        event.event_id
                    );
                    record_span(event).in_scope(|| warn!(error = %why, "Conflicting duplicate; dead-lettering it, no handler runs"));
                    return Err(self
                        .refuse(msg, event, "conflicting_duplicate", why, attempt)
                        .await);
                }
                Err(Refusal::Failed(e)) => e,
            };
            metrics::counter!(crate::catalogue::LEDGER_FAILURES, "class" => if err.is_transient() { "transient" } else { "permanent" })
                .increment(1);
            if err.is_transient() {
                // One line per outage and a summary while it lasts (crate::outage), not one per record and retry.
                record_span(event).in_scope(|| {
                    ledger.failed(waiting.clone(), &format!("{err:#}"));
                    debug!(error = %err, attempt, "Event ledger unavailable; retrying")
                });
            } else {
                failures += 1;
                if failures >= self.settings.max_attempts {
                    ledger.forget(&waiting);
                    let why = format!("{err:#}");
                    record_span(event).in_scope(|| error!(error = %why, attempts = attempt, "Event ledger refused the event; dead-lettering it"));
                    return Err(self
                        .refuse(msg, event, "ledger.permanent", why, attempt)
                        .await);
                }
                record_span(event).in_scope(
                    || warn!(error = %err, attempt, "Event ledger refused the event; retrying"),
                );
            }
            if !self.sleep(backoff(&self.settings, attempt)).await {
                ledger.forget(&waiting);
                return Err(RecordOutcome::Abandoned);
            }
        }
    }

    /// Dead-letters an event that no handler may run (`class` says why), naming it; its outcome.
    async fn refuse(
        &self,
        msg: &OwnedMessage,
        event: &OutboxEvent,
        class: &str,
        why: String,
        attempts: u32,
    ) -> RecordOutcome {
        metrics::counter!(crate::catalogue::RECORDS, "topic" => event.source.topic.clone(), "outcome" => class.to_string())
            .increment(1);
        let letter = DeadLetter {
            record: msg,
            error_class: class.to_string(),
            error_message: why,
            handler: None,
            event_id: Some(&event.event_id),
            event_type: Some(&event.event_type),
            attempts,
        };
        if self.dead_letter(&letter).await {
            RecordOutcome::DeadLettered
        } else {
            RecordOutcome::Abandoned
        }
    }

    /// Runs all handlers of the event concurrently, each isolated from the others' errors and panics.
    async fn fan_out(
        &self,
        msg: &OwnedMessage,
        event: &OutboxEvent,
        tally: &mut Tally,
    ) -> RecordOutcome {
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
            ([], _) => RecordOutcome::Skipped,
            // Most event types have one handler: no joined set of futures to build.
            ([h], [m]) => {
                let outcome = self.run_handler(h.as_ref(), m, started, msg, event).await;
                record_outcome([(m, outcome)], tally)
            }
            _ => record_outcome(
                handles.iter().zip(
                    futures::future::join_all(
                        handlers
                            .iter()
                            .zip(handles)
                            .map(|(h, m)| self.run_handler(h.as_ref(), m, started, msg, event)),
                    )
                    .await,
                ),
                tally,
            ),
        }
    }

    /// Re-runs a dead letter's original record: only `handler` when the letter names one that is registered
    /// (its siblings already succeeded), else the whole record. The event passes its contract and the ledger
    /// again first. A failure is dead-lettered again.
    pub async fn replay(&self, original: &OwnedMessage, handler: Option<&str>) -> RecordOutcome {
        let Some(h) = handler.and_then(|name| self.registry.by_name(name)) else {
            return self.process_record(original).await;
        };
        match decode(original, self.settings.formats.of(original.topic())) {
            Ok(Decoded::Event(mut event)) => {
                if let Err(outcome) = self.admit(original, &mut event).await {
                    return outcome;
                }
                let m = self.metrics.handler(h.name(), &event.event_type);
                let now = Instant::now();
                let outcome = self
                    .run_handler(h.as_ref(), &m, now, original, &event)
                    .await;
                record_outcome([(&m, outcome)], &mut Tally::default())
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
        // The handler's outage once it has failed transiently.
        let mut outage: Option<Arc<crate::outage::Outage>> = None;
        // The record's span once the handler has failed: its log lines, and its handler's in later attempts, name
        // the record.
        let mut span = Span::none();
        loop {
            attempt += 1;
            if attempt > 1 {
                started = Instant::now();
            }
            // Held for this attempt: a switch of routes waits for it (see `crate::routes`).
            let routes = self.routes.lease();
            let ctx = routes.context(name).unwrap_or(&self.ctx);
            let call = AssertUnwindSafe(tokio::time::timeout_at(
                started + self.settings.handler_timeout,
                handler.handle(event, ctx),
            ))
            .catch_unwind()
            .instrument(span.clone())
            .await;
            let seconds = started.elapsed().as_secs_f64();
            let (class, err): (FailureClass, String) = match call {
                Ok(Ok(Ok(()))) => {
                    if let Some(o) = &outage {
                        o.succeeded(&waiting_of(msg));
                    }
                    return HandlerOutcome::Ok(seconds);
                }
                Ok(Ok(Err(HandlerError::Transient(e)))) => {
                    (FailureClass::Transient, format!("{e:#}"))
                }
                Ok(Err(_elapsed)) => (
                    FailureClass::Transient,
                    format!("timed out after {:?}", self.settings.handler_timeout),
                ),
                Ok(Ok(Err(HandlerError::Permanent(e)))) => {
                    (FailureClass::Permanent, format!("{e:#}"))
                }
                Err(panic) => (FailureClass::Panic, panic_message(&panic)),
            };
            handler_metrics.duration.record(seconds);
            let class_name = class.as_str();
            metrics::counter!(crate::catalogue::HANDLER_RESULTS, "handler" => name.to_string(), "event_type" => event.event_type.clone(), "outcome" => class_name)
                .increment(1);
            if span.is_none() {
                span = record_span(event);
            }
            if class == FailureClass::Transient {
                // Never dead-lettered: the world, not the event, is at fault. The backoff restarts from the
                // first failure of each outage. One line per outage and a summary while it lasts, not one per
                // record and retry (crate::outage).
                let o = outage.get_or_insert_with(|| self.outages.of(&format!("handler {name}")));
                span.in_scope(|| {
                    o.failed(waiting_of(msg), &err);
                    debug!(handler = name, attempt, error = %err, "Handler failed transiently; retrying")
                });
            } else {
                failures += 1;
                if failures >= self.settings.max_attempts {
                    if let Some(o) = &outage {
                        o.forget(&waiting_of(msg));
                    }
                    span.in_scope(|| error!(handler = name, attempts = attempt, error_class = class_name, error = %err, "Handler failed permanently; dead-lettering"));
                    let letter = DeadLetter {
                        record: msg,
                        error_class: format!("handler.{class_name}"),
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
                span.in_scope(|| warn!(handler = name, attempt, error_class = class_name, error = %err, "Handler failed; retrying"));
            }
            if !self.sleep(backoff(&self.settings, attempt)).await {
                if let Some(o) = &outage {
                    o.forget(&waiting_of(msg));
                }
                return HandlerOutcome::Abandoned;
            }
        }
    }

    /// Writes a dead letter, retrying until the broker acknowledges it or shutdown. False when abandoned: the
    /// record then stays uncommitted. A letter the broker refuses for a reason retrying cannot cure (size,
    /// authorisation, a topic it cannot make: `dlq::is_refusal`) is an ERROR naming the record and makes the process
    /// not ready until it goes; it is tried again at the longest backoff, so that a fixed cause (an ACL granted, the
    /// topic made) lets the partition go on.
    async fn dead_letter(&self, letter: &DeadLetter<'_>) -> bool {
        let r = letter.record;
        let waiting = waiting_of(r);
        let topic = self.outages.of("dead-letter topic");
        let mut refused = false;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self.dead_letters.send(letter).await {
                Ok(()) => {
                    metrics::counter!(crate::catalogue::DEAD_LETTERS, "topic" => r.topic().to_string(), "class" => letter.error_class.clone())
                        .increment(1);
                    topic.succeeded(&waiting);
                    if refused {
                        info!(
                            topic = r.topic(),
                            partition = r.partition(),
                            offset = r.offset(),
                            attempt,
                            "The dead-letter topic took the letter it refused; the partition goes on"
                        );
                    }
                    break true;
                }
                Err(e) => {
                    metrics::counter!(crate::catalogue::DEAD_LETTER_FAILURES).increment(1);
                    if crate::dlq::is_refusal(&e) {
                        if !refused {
                            refused = true;
                            self.health.letter_refused(true);
                            error!(topic = r.topic(), partition = r.partition(), offset = r.offset(),
                                event_id = letter.event_id, error_class = %letter.error_class, error = %e,
                                "The dead-letter topic refuses this record's letter; its partition is not committed past it \
                                 and the process is not ready until the letter goes (tried again every RETRY_MAX_BACKOFF_MS)");
                        }
                    } else {
                        topic.failed(waiting.clone(), &e.to_string());
                        debug!(topic = r.topic(), partition = r.partition(), offset = r.offset(),
                            error = %e, attempt, "Dead-letter topic unavailable; the record stays uncommitted");
                    }
                }
            }
            let wait = if refused {
                self.settings.max_backoff
            } else {
                backoff(&self.settings, attempt)
            };
            if !self.sleep(wait).await {
                topic.forget(&waiting);
                break false;
            }
        };
        if refused {
            self.health.letter_refused(false);
        }
        result
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

/// How a record is named in outage summaries.
fn waiting_of(msg: &OwnedMessage) -> crate::outage::Waiting {
    (msg.topic().to_string(), msg.partition(), msg.offset())
}

fn count_skip(topic: &str, reason: &'static str) {
    metrics::counter!(crate::catalogue::RECORDS_SKIPPED, "topic" => topic.to_string(), "reason" => reason)
        .increment(1);
}

/// A record's outcome from its handlers': abandoned if any was, else processed, counting dead letters. Every
/// success is tallied, an abandoned sibling's too.
fn record_outcome<'a>(
    handlers: impl IntoIterator<Item = (&'a HandlerMetrics, HandlerOutcome)>,
    tally: &mut Tally,
) -> RecordOutcome {
    let mut dead_lettered = 0;
    let mut abandoned = false;
    for (m, outcome) in handlers {
        match outcome {
            HandlerOutcome::Abandoned => abandoned = true,
            HandlerOutcome::DeadLettered => dead_lettered += 1,
            HandlerOutcome::Ok(seconds) => tally.handled(m, seconds),
        }
    }
    if abandoned {
        RecordOutcome::Abandoned
    } else {
        RecordOutcome::Processed { dead_lettered }
    }
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

/// How a handler call failed: a transient failure is retried without limit, a permanent one or a panic a
/// bounded number of times before its event is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureClass {
    Transient,
    Permanent,
    Panic,
}

impl FailureClass {
    /// The name in metrics, logs and the dead letter's `handler.*` class.
    fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
            FailureClass::Panic => "panic",
        }
    }
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

mod meters;
#[cfg(test)]
pub(crate) mod tests;
