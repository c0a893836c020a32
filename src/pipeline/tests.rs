//! Fan-out, isolation, retries and dead letters, with in-memory handlers and dead-letter sink; the helpers serve
//! the lanes' tests too. (The same behaviour against real Kafka and MongoDB is in `tests/`.)

use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use rdkafka::Timestamp;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;

use std::sync::Mutex;

use super::*;
use crate::handler::HandlerError;
use crate::kafka::OffsetTracker;
use crate::lanes::Lanes;

#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) letters: Mutex<Vec<(String, Option<String>, u32)>>,
    fail_first: AtomicU32,
}

#[async_trait]
impl DeadLetterSink for Sink {
    async fn send(&self, l: &DeadLetter<'_>) -> Result<(), KafkaError> {
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err(KafkaError::Canceled);
        }
        self.letters.lock().unwrap().push((
            l.error_class.clone(),
            l.handler.map(str::to_string),
            l.attempts,
        ));
        Ok(())
    }
}

pub(crate) enum Behaviour {
    Ok,
    Permanent,
    Panic,
    TransientTimes(u32),
    /// Takes this long for the aggregate `slow`, no time for the others.
    SlowKey(Duration),
    /// Logs a line in every attempt; the first fails transiently.
    LogsAndFailsOnce,
}

pub(crate) struct TestHandler {
    name: &'static str,
    behaviour: Behaviour,
    pub(crate) calls: AtomicU32,
    pub(crate) seen: Mutex<Vec<i64>>,
}

impl TestHandler {
    pub(crate) fn new(name: &'static str, behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            name,
            behaviour,
            calls: AtomicU32::new(0),
            seen: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl EventHandler for TestHandler {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        self.name
    }
    async fn handle(&self, event: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behaviour {
            Behaviour::Ok => {
                self.seen.lock().unwrap().push(event.source.offset);
                Ok(())
            }
            Behaviour::Permanent => Err(HandlerError::invalid("bad payload")),
            Behaviour::Panic => panic!("handler bug"),
            Behaviour::TransientTimes(k) if n < k => {
                Err(HandlerError::Transient(anyhow::anyhow!("mongo down")))
            }
            Behaviour::TransientTimes(_) => Ok(()),
            Behaviour::LogsAndFailsOnce => {
                tracing::info!(attempt = n + 1, "handler's own line");
                if n == 0 {
                    return Err(HandlerError::Transient(anyhow::anyhow!("mongo down")));
                }
                Ok(())
            }
            Behaviour::SlowKey(d) => {
                if event.aggregate_id == "slow" {
                    tokio::time::sleep(d).await;
                }
                self.seen.lock().unwrap().push(event.source.offset);
                Ok(())
            }
        }
    }
}

pub(crate) fn record(offset: i64, key: &str, event_type: &str) -> OwnedMessage {
    let value = serde_json::json!({"op": "c", "after": {
        "event_id": uuid::Uuid::new_v4().to_string(), "aggregate_id": key, "aggregate_type": "user",
        "event_type": event_type, "payload": "{\"email\":\"a@b.c\"}", "created_at": "2026-11-26T10:00:00.000000Z"
    }});
    OwnedMessage::new(
        Some(value.to_string().into_bytes()),
        Some(key.as_bytes().to_vec()),
        "t".into(),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    )
}

pub(crate) fn processor(handlers: Vec<Arc<TestHandler>>, sink: Arc<Sink>) -> Processor {
    let mut registry = Registry::new();
    for h in handlers {
        registry.register(h).unwrap();
    }
    let client = mongodb::Client::with_options(
        mongodb::options::ClientOptions::builder()
            .hosts(vec![
                mongodb::options::ServerAddress::parse("127.0.0.1:1").unwrap(),
            ])
            .build(),
    )
    .unwrap();
    Processor {
        registry: Arc::new(registry),
        ctx: HandlerContext::new(client.database("unused")),
        routes: Default::default(),
        dead_letters: sink,
        settings: ProcessingSettings {
            concurrency: 8,
            max_attempts: 3,
            handler_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            // These tests have no MongoDB: the ledger is tested against a real server (tests/daemon.rs).
            ledger: false,
            dead_letter_topic: "dlq".into(),
            formats: Default::default(),
            away_threshold: Duration::from_secs(3),
        },
        cancel: CancellationToken::new(),
        metrics: Default::default(),
        health: Default::default(),
        outages: Default::default(),
    }
}

/// Runs a batch through keyed lanes to its end.
pub(crate) async fn run(
    p: Processor,
    batch: &[OwnedMessage],
    tracker: &Arc<Mutex<OffsetTracker>>,
) -> BatchStats {
    Lanes::new(Arc::new(p), tracker.clone())
        .submit(batch.to_vec())
        .finished()
        .await
}

#[tokio::test(start_paused = true)]
async fn failing_and_panicking_handlers_do_not_block_siblings() {
    let ok = TestHandler::new("ok", Behaviour::Ok);
    let bad = TestHandler::new("bad", Behaviour::Permanent);
    let boom = TestHandler::new("boom", Behaviour::Panic);
    let sink = Arc::new(Sink::default());
    let p = processor(vec![ok.clone(), bad.clone(), boom.clone()], sink.clone());
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let batch = [record(0, "a", "UserCreated"), record(1, "b", "Unknown")];
    let stats = run(p, &batch, &tracker).await;
    assert_eq!(stats.processed, 1);
    assert_eq!(stats.skipped, 1, "unknown event type is skipped");
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(*ok.seen.lock().unwrap(), [0]);
    assert_eq!(bad.calls.load(Ordering::SeqCst), 3, "bounded attempts");
    assert_eq!(boom.calls.load(Ordering::SeqCst), 3);
    let mut letters = sink.letters.lock().unwrap().clone();
    letters.sort();
    assert_eq!(
        letters,
        [
            ("handler.panic".to_string(), Some("boom".to_string()), 3),
            ("handler.permanent".to_string(), Some("bad".to_string()), 3),
        ]
    );
    assert_eq!(
        tracker.lock().unwrap().committable(),
        vec![(("t".to_string(), 0), 2)]
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_and_are_never_dead_lettered() {
    let flaky = TestHandler::new("flaky", Behaviour::TransientTimes(10));
    let sink = Arc::new(Sink::default());
    let p = processor(vec![flaky.clone()], sink.clone());
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let stats = run(p, &[record(5, "a", "UserCreated")], &tracker).await;
    assert_eq!(stats.processed, 1);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 11);
    assert!(sink.letters.lock().unwrap().is_empty());
}

thread_local! {
    /// The level and the log lines of the test running on this thread, while it captures them.
    static CAPTURED: std::cell::RefCell<Option<(tracing::Level, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Writes into this thread's [`CAPTURED`] lines.
struct ThreadLines;

impl std::io::Write for ThreadLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with_borrow_mut(|c| {
            if let Some((_, lines)) = c {
                lines.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One process-wide subscriber writing JSON with the current span (as the daemon does) for the threads that capture,
/// each at its own level. Its filter is global, as the daemon's `EnvFilter` is (a span it refuses is disabled),
/// and asked at every span and event, never cached per callsite: a subscriber per test thread (`set_default`)
/// raced with the tests running beside it, which could leave a callsite cached as disabled.
fn capture_logs(level: tracing::Level) {
    use tracing_subscriber::layer::SubscriberExt;
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let filter = tracing_subscriber::filter::DynFilterFn::new(|meta, _| {
            CAPTURED.with_borrow(|c| c.as_ref().is_some_and(|(level, _)| meta.level() <= level))
        })
        .with_callsite_filter(|_| tracing::subscriber::Interest::sometimes());
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(|| ThreadLines);
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(filter).with(layer),
        )
        .expect("no other global subscriber in the unit tests");
    });
    CAPTURED.set(Some((level, Vec::new())));
}

/// This thread's captured lines, parsed; capturing ends.
fn captured_lines() -> Vec<serde_json::Value> {
    let (_, bytes) = CAPTURED.take().expect("capturing");
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The log lines of one record whose handler logs a line per attempt and fails the first, at `level`.
async fn lines_of_a_handler_failing_once(level: tracing::Level) -> Vec<serde_json::Value> {
    capture_logs(level);
    let flaky = TestHandler::new("flaky", Behaviour::LogsAndFailsOnce);
    let p = processor(vec![flaky.clone()], Arc::new(Sink::default()));
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let stats = run(p, &[record(7, "a", "UserCreated")], &tracker).await;
    assert_eq!(stats.processed, 1);
    captured_lines()
}

fn event_spans(line: &serde_json::Value) -> usize {
    line["spans"]
        .as_array()
        .map_or(0, |s| s.iter().filter(|s| s["name"] == "event").count())
}

#[tokio::test(start_paused = true)]
async fn at_debug_level_every_line_of_an_event_is_in_its_one_span() {
    let lines = lines_of_a_handler_failing_once(tracing::Level::DEBUG).await;
    let of = |message: &str| {
        lines
            .iter()
            .filter(|l| l["message"] == message)
            .collect::<Vec<_>>()
    };
    let handler_lines = of("handler's own line");
    assert_eq!(handler_lines.len(), 2, "{lines:#?}");
    for l in handler_lines
        .iter()
        .chain(&of("Handler failed transiently; retrying"))
    {
        assert_eq!(l["span"]["offset"], 7, "{l}");
        assert_eq!(event_spans(l), 1, "not nested in a second event span: {l}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_is_logged_with_its_record_and_so_are_its_later_attempts() {
    let lines = lines_of_a_handler_failing_once(tracing::Level::INFO).await;
    let find = |message: &str, attempt: Option<u64>| {
        lines
            .iter()
            .find(|l| {
                l["message"] == message && attempt.is_none_or(|a| l["attempt"].as_u64() == Some(a))
            })
            .unwrap_or_else(|| panic!("no line {message:?} in {lines:#?}"))
            .clone()
    };
    // The first transient failure of an outage is one WARN line, in the record's span.
    let failed = find(
        "Unavailable: records that need it wait and are retried (a summary every 30 s while it lasts)",
        None,
    );
    assert_eq!(failed["dependency"], "handler flaky", "{failed}");
    assert_eq!(failed["span"]["topic"], "t", "{failed}");
    assert_eq!(failed["span"]["partition"], 0, "{failed}");
    assert_eq!(failed["span"]["offset"], 7, "{failed}");
    assert_eq!(failed["span"]["event_type"], "UserCreated", "{failed}");
    let event_id = failed["span"]["event_id"].as_str().expect("event id");
    assert_eq!(event_id.len(), 36, "{failed}");
    let retried = find("handler's own line", Some(2));
    assert_eq!(retried["span"]["event_id"], event_id, "{retried}");
    // At info level an event gets no span until a handler fails: one per event cost a third of its processing.
    let first = find("handler's own line", Some(1));
    assert!(first.get("span").is_none(), "{first}");
}

#[tokio::test(start_paused = true)]
async fn undecodable_record_is_dead_lettered_only_once_acknowledged() {
    let sink = Arc::new(Sink::default());
    sink.fail_first.store(2, Ordering::SeqCst);
    let p = processor(vec![], sink.clone());
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let poison = OwnedMessage::new(
        Some(b"not json".to_vec()),
        None,
        "t".into(),
        Timestamp::NotAvailable,
        0,
        9,
        None,
    );
    let stats = run(p, &[poison], &tracker).await;
    assert_eq!(stats.dead_lettered, 1);
    let letters = sink.letters.lock().unwrap().clone();
    assert_eq!(letters, [("decode.not_json".to_string(), None, 1)]);
    assert_eq!(
        tracker.lock().unwrap().committable(),
        vec![(("t".to_string(), 0), 10)]
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_unfinished_work_and_it_stays_uncommitted() {
    let sink = Arc::new(Sink::default());
    sink.fail_first.store(u32::MAX, Ordering::SeqCst); // dead-letter topic down
    let ok = TestHandler::new("ok", Behaviour::Ok);
    let p = processor(vec![ok], sink);
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let batch = [
        record(0, "a", "UserCreated"),
        OwnedMessage::new(
            Some(b"{".to_vec()),
            Some(b"b".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            1,
            None,
        ),
        record(2, "a", "UserCreated"),
    ];
    let cancel = p.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cancel.cancel();
    });
    let stats = run(p, &batch, &tracker).await;
    assert_eq!(stats.processed, 2);
    assert_eq!(stats.abandoned, 1);
    assert_eq!(
        tracker.lock().unwrap().committable(),
        vec![(("t".to_string(), 0), 1)]
    );
}

#[test]
fn backoff_is_capped_and_jittered() {
    let s = ProcessingSettings {
        concurrency: 1,
        max_attempts: 1,
        handler_timeout: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        ledger: false,
        dead_letter_topic: "dlq".into(),
        formats: Default::default(),
        away_threshold: Duration::from_secs(3),
    };
    for attempt in 1..40 {
        let d = backoff(&s, attempt);
        assert!(d <= Duration::from_secs(2), "{attempt}: {d:?}");
    }
    let first = backoff(&s, 1);
    assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
    assert!(backoff(&s, 30) >= Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn records_of_the_dead_letter_topic_are_skipped_never_processed() {
    let ok = TestHandler::new("ok", Behaviour::Ok);
    let sink = Arc::new(Sink::default());
    let p = processor(vec![ok.clone()], sink.clone());
    let in_dlq = |offset| {
        let r = record(offset, "a", "UserCreated");
        OwnedMessage::new(
            r.payload().map(<[u8]>::to_vec),
            r.key().map(<[u8]>::to_vec),
            "dlq".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    };
    let poison = OwnedMessage::new(
        Some(b"not json".to_vec()),
        None,
        "dlq".into(),
        Timestamp::NotAvailable,
        0,
        2,
        None,
    );
    for m in [in_dlq(0), in_dlq(1), poison] {
        assert_eq!(p.process_record(&m).await, RecordOutcome::Skipped);
    }
    assert!(ok.seen.lock().unwrap().is_empty());
    assert!(
        sink.letters.lock().unwrap().is_empty(),
        "no dead letter of a dead letter"
    );
    // The same record on another topic is processed.
    assert!(matches!(
        p.process_record(&record(3, "a", "UserCreated")).await,
        RecordOutcome::Processed { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_payload_reaches_no_handler_and_is_dead_lettered_once() {
    let users = TestHandler::new("users", Behaviour::Ok);
    let stats = TestHandler::new("stats", Behaviour::Ok);
    let sink = Arc::new(Sink::default());
    let mut p = processor(vec![users.clone(), stats.clone()], sink.clone());
    let mut registry = (*p.registry).clone();
    registry.require(
        "UserCreated",
        crate::registry::PayloadContract::object().require_str("email"),
    );
    p.registry = Arc::new(registry);
    let bad = {
        let value = serde_json::json!({"op": "c", "after": {
            "event_id": uuid::Uuid::new_v4().to_string(), "aggregate_id": "a", "event_type": "UserCreated",
            "payload": "{\"email\": 42}"}});
        OwnedMessage::new(
            Some(value.to_string().into_bytes()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        )
    };
    assert_eq!(p.process_record(&bad).await, RecordOutcome::DeadLettered);
    assert!(users.seen.lock().unwrap().is_empty() && stats.seen.lock().unwrap().is_empty());
    assert_eq!(
        *sink.letters.lock().unwrap(),
        [("invalid_payload".to_string(), None, 1)]
    );
}
