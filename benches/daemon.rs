//! The benchmark behind `docs/BENCHMARKS.md`. Run it with `scripts/bench` (brings the local stack up, builds,
//! runs this, draws the chart), or against running services:
//!
//! ```sh
//! eval "$(scripts/stack env)"
//! cargo build --release --bin event-processor
//! cargo bench --bench daemon            # BENCH_REPEAT=3 runs of each measurement; BENCH_QUICK=1 for a smoke run
//! ```
//!
//! Every throughput figure is taken in the same run as its baseline, repeat by repeat, so the ratios hold on a
//! shared, noisy machine; the order of the measurements rotates from one repeat to the next, and each repeat's own
//! ratio is reported beside the ratio of the medians. Prints one JSON document (also written to `BENCH_OUT` if
//! set, after each part).
//!
//! The daemon logs as it does by default (level `info`, JSON; `BENCH_LOG_LEVEL` sets another level), into
//! `target/bench/`.
//!
//! - **pipeline ceiling**: a bare rdkafka consume loop vs the daemon's pipeline with no-op handlers, over the same
//!   pre-filled topic of raw Debezium change records (`JsonConverter`, no schemas, as the shipped connector
//!   writes them).
//! - **with MongoDB**: the daemon with the four shipped handlers vs the same handlers called in a tight loop
//!   without Kafka (the server's own ceiling for exactly these writes, through the same bulk writer), and vs the
//!   per-event design being replaced (one awaited write per handler per event, commit every 100 records).
//! - **latency**: Kafka append -> MongoDB acknowledgement at fixed rates; PostgreSQL commit -> MongoDB
//!   acknowledgement through Debezium (the connector `scripts/stack up` deployed from `debezium/`).
//! - **resources**: resident memory of the release binary (`BENCH_BIN`) under steady load, and while it catches up
//!   on a backlog (the pipeline ceiling's topic, with the shipped handlers).
//! - **scaling**: one vs three processes of the release binary in one group, six partitions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use event_processor::decode::{Decoded, Format, decode};
use event_processor::handler::HandlerContext;
use event_processor::writer::Writer;
use event_processor::{Config, EventHandler, HandlerError, OutboxEvent, Registry};
use futures::StreamExt;
use mongodb::bson::doc;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 6;

/// The daemon's allocator (`src/main.rs`), so the in-process pipeline runs as the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Env {
    kafka: String,
    mongo: String,
    postgres: String,
    run: String,
    repeat: usize,
    quick: bool,
    bin: Option<PathBuf>,
    /// The command that restarts the MongoDB-wire server on an empty data directory (`BENCH_FRESH_MONGO`).
    fresh_mongo: Option<String>,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: eval \"$(scripts/stack env)\""))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The order of `parts` measurements in repeat `i`: rotated each repeat, so that a server or machine that slows down
/// (or warms up) over a run does not always favour the one measured first.
fn in_turn(i: usize, parts: usize) -> impl Iterator<Item = usize> {
    (0..parts).map(move |k| (k + i) % parts)
}

/// `a[i] / b[i]`: each repeat's ratio, from measurements taken minutes apart at most.
fn paired_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------------------------
// Workload: raw Debezium change records of the outbox table, keyed by aggregate id.

fn change_record(
    event_id: &str,
    event_type: &str,
    aggregate: &str,
    payload: Value,
) -> (String, String) {
    let row = json!({
        "event_id": event_id, "aggregate_id": aggregate, "aggregate_type": "bench",
        "event_type": event_type, "payload": payload.to_string(), "status": "pending",
        "created_at": "2026-11-26T15:16:01.817235Z",
    });
    let value = json!({
        "before": null, "after": row, "op": "c", "ts_ms": 1_795_706_161_873i64,
        "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": "postgres", "ts_ms": 1_795_706_161_873i64,
                   "snapshot": "false", "db": "app", "schema": "activity", "table": "event_outbox", "txId": 771, "lsn": 27_060_368},
        "transaction": null, "ts_us": 1_795_706_161_873_418i64, "ts_ns": 1_795_706_161_873_418_715i64,
    });
    (
        json!({"aggregate_id": aggregate}).to_string(),
        value.to_string(),
    )
}

/// `n` records: 70% sign-ups, 10% new activities, 20% joins of those activities.
fn workload(n: usize) -> Vec<(String, String)> {
    let mut activities: Vec<String> = Vec::new();
    let mut users: Vec<String> = Vec::new();
    (0..n)
        .map(|i| match i % 10 {
            0 | 5 if !users.is_empty() => {
                let a = uuid::Uuid::new_v4().to_string();
                activities.push(a.clone());
                change_record(
                    &uuid::Uuid::new_v4().to_string(),
                    "ActivityCreated",
                    &a,
                    json!({"title": format!("Run {i}"), "organizer_id": users[i % users.len()]}),
                )
            }
            3 if !activities.is_empty() => change_record(
                &uuid::Uuid::new_v4().to_string(),
                "ParticipantJoined",
                &activities[i % activities.len()].clone(),
                json!({"user_id": users[i % users.len()]}),
            ),
            _ => {
                let u = uuid::Uuid::new_v4().to_string();
                users.push(u.clone());
                change_record(
                    &uuid::Uuid::new_v4().to_string(),
                    "UserCreated",
                    &u,
                    json!({"email": format!("{u}@example.com"), "username": format!("user{i}"),
                           "first_name": "Ada", "last_name": "Lovelace"}),
                )
            }
        })
        .collect()
}

async fn create_topic(kafka: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

fn producer(kafka: &str, linger_ms: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", linger_ms)
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

async fn fill(env: &Env, records: &[(String, String)]) -> anyhow::Result<String> {
    let topic = format!("bench_{}_{}", env.run, uuid::Uuid::new_v4().simple());
    create_topic(&env.kafka, &topic).await?;
    let p = producer(&env.kafka, "20")?;
    let sends = records.iter().map(|(k, v)| {
        p.send(
            FutureRecord::to(&topic).key(k).payload(v),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(topic)
}

fn consumer_config(env: &Env, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &env.kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c
}

/// The daemon's configuration: defaults, plus any `BENCH_DAEMON_<VARIABLE>` of the environment as `<VARIABLE>`
/// (e.g. `BENCH_DAEMON_PROCESSING_CONCURRENCY=256`) to measure other settings.
fn daemon_config(env: &Env, topic: &str, db: &str) -> anyhow::Result<Config> {
    let overrides = std::env::vars().filter_map(|(k, v)| {
        k.strip_prefix("BENCH_DAEMON_")
            .map(|k| (k.to_string(), v.clone()))
    });
    Ok(Config::from_vars(
        [
            ("KAFKA_BOOTSTRAP_SERVERS".to_string(), env.kafka.clone()),
            ("KAFKA_TOPICS".into(), topic.to_string()),
            ("KAFKA_GROUP_ID".into(), format!("{db}_group")),
            ("MONGODB_URI".into(), env.mongo.clone()),
            ("MONGODB_DATABASE".into(), db.to_string()),
            ("DLQ_TOPIC".into(), format!("{db}.dlq")),
            ("HTTP_PORT".into(), "0".into()),
            ("LOG_LEVEL".into(), log_level()),
        ]
        .into_iter()
        .chain(overrides),
    )?)
}

fn fresh(env: &Env, what: &str) -> String {
    format!(
        "bench_{}_{what}_{}",
        env.run,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Counting what handlers finished, with the time of the first and the last.

/// Costs the measured path one atomic add per handler call: the clock is read by the first call and by the one
/// that completes the expected count (a lock and a clock read per call were a visible share of a no-op call).
struct Counter {
    expected: usize,
    done: AtomicUsize,
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
}

impl Counter {
    fn new(expected: usize) -> Self {
        Counter {
            expected,
            done: AtomicUsize::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
        }
    }

    fn rate(&self, events: usize) -> f64 {
        let (Some(first), Some(last)) = (self.first.get(), self.last.get()) else {
            return f64::NAN;
        };
        events as f64 / (*last - *first).as_secs_f64().max(1e-9)
    }

    async fn wait(&self, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.done.load(Ordering::SeqCst) < self.expected {
            ensure!(
                Instant::now() < deadline,
                "{what}: {} of {} handler calls after 600 s",
                self.done.load(Ordering::SeqCst),
                self.expected
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

struct Counted {
    inner: Arc<dyn EventHandler>,
    counter: Arc<Counter>,
}

#[async_trait]
impl EventHandler for Counted {
    fn event_type(&self) -> &str {
        self.inner.event_type()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn handle(&self, e: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.counter.first.get_or_init(Instant::now);
        self.inner.handle(e, ctx).await?;
        if self.counter.done.fetch_add(1, Ordering::SeqCst) + 1 == self.counter.expected {
            let _ = self.counter.last.set(Instant::now());
        }
        Ok(())
    }
}

struct NoOp(&'static str, &'static str);

#[async_trait]
impl EventHandler for NoOp {
    fn event_type(&self) -> &str {
        self.0
    }
    fn name(&self) -> &str {
        self.1
    }
    async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn shipped() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    event_processor::handlers::register_all(&mut r)?;
    Ok(r)
}

fn noops() -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    for (t, n) in [
        ("UserCreated", "NoOpUsers"),
        ("UserCreated", "NoOpStatistics"),
        ("ActivityCreated", "NoOpActivities"),
        ("ParticipantJoined", "NoOpParticipants"),
    ] {
        r.register(Arc::new(NoOp(t, n)))?;
    }
    Ok(r)
}

fn counted(base: &Registry, counter: &Arc<Counter>) -> anyhow::Result<Registry> {
    Ok(base.clone().wrap(|inner| {
        Arc::new(Counted {
            inner,
            counter: counter.clone(),
        })
    }))
}

/// Handler calls the records make under `registry`.
fn calls(registry: &Registry, records: &[(String, String)]) -> usize {
    events(records)
        .iter()
        .map(|e| registry.handlers_for(&e.event_type).len())
        .sum()
}

fn messages(records: &[(String, String)]) -> impl Iterator<Item = OwnedMessage> + '_ {
    records.iter().enumerate().map(|(i, (k, v))| {
        OwnedMessage::new(
            Some(v.as_bytes().to_vec()),
            Some(k.as_bytes().to_vec()),
            "bench".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            i as i64,
            None,
        )
    })
}

fn events(records: &[(String, String)]) -> Vec<OutboxEvent> {
    messages(records)
        .filter_map(|m| match decode(&m, Format::Debezium) {
            Ok(Decoded::Event(e)) => Some(*e),
            _ => None,
        })
        .collect()
}

/// Decoding alone, on one thread, the topic's format `format`: microseconds per record, the decoded events dropped
/// as the pipeline drops them.
fn decode_us(records: &[(String, String)], format: Format) -> f64 {
    let msgs: Vec<OwnedMessage> = messages(records).collect();
    let started = Instant::now();
    let events = msgs
        .iter()
        .filter(|m| matches!(decode(*m, format), Ok(Decoded::Event(_))))
        .count();
    let us = started.elapsed().as_secs_f64() * 1e6 / msgs.len().max(1) as f64;
    std::hint::black_box(events);
    us
}

// ---------------------------------------------------------------------------------------------------------------
// Throughput.

/// A bare consume loop: receive and copy out every record, nothing else.
async fn bare_consume(env: &Env, topic: &str, n: usize) -> anyhow::Result<f64> {
    let c: StreamConsumer = consumer_config(env, &fresh(env, "bare")).create()?;
    c.subscribe(&[topic])?;
    let mut first = None;
    let mut seen = 0;
    let mut bytes = 0usize;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv())
            .await
            .context("bare consumer: no record within 60 s")??
            .detach();
        first.get_or_insert_with(Instant::now);
        bytes += m.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    let rate = n as f64 / first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    std::hint::black_box(bytes);
    Ok(rate)
}

/// The daemon's pipeline over the topic's `records` with `base`'s handlers (`calls` handler calls in all, see
/// [`calls`]), from its first handler call to its last.
/// `ledger`: false runs the daemon without the event ledger (a MongoDB statement per event): the no-op ceiling
/// measures the consumer without any storage. True leaves the configuration's setting (on unless
/// `BENCH_DAEMON_EVENT_LEDGER=false`).
async fn pipeline(
    env: &Env,
    topic: &str,
    (records, calls): (usize, usize),
    base: &Registry,
    ledger: bool,
) -> anyhow::Result<f64> {
    let counter = Arc::new(Counter::new(calls));
    let registry = counted(base, &counter)?;
    let db = fresh(env, "pipe");
    log_in_process(env)?;
    let token = CancellationToken::new();
    let mut config = daemon_config(env, topic, &db)?;
    config.event_ledger &= ledger;
    let daemon = tokio::spawn(event_processor::run_with_registry(
        config,
        registry,
        token.clone(),
    ));
    let waited = counter.wait("pipeline").await;
    token.cancel();
    daemon.await??;
    waited?;
    drop_db(env, &db).await;
    Ok(counter.rate(records))
}

/// The shipped handlers called in a tight loop, no Kafka: what the server does for exactly these writes through
/// the same bulk writer. Events go in slices of 1000 at once, in workload order.
async fn server_ceiling(env: &Env, records: &[(String, String)]) -> anyhow::Result<f64> {
    let db_name = fresh(env, "ceiling");
    let client = mongodb::Client::with_uri_str(&env.mongo).await?;
    let db = client.database(&db_name);
    event_processor::store::ensure_indexes(&db, shipped()?.indexes()).await?;
    let ctx = HandlerContext::new(db);
    let ctx = &ctx;
    let registry = shipped()?;
    let events = events(records);
    let started = Instant::now();
    for slice in events.chunks(1000) {
        let calls = slice.iter().flat_map(|e| {
            registry
                .handlers_for(&e.event_type)
                .iter()
                .map(move |h| h.handle(e, ctx))
                .collect::<Vec<_>>()
        });
        for r in futures::future::join_all(calls).await {
            r.map_err(|e| anyhow::anyhow!("ceiling: {e}"))?;
        }
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    drop_db(env, &db_name).await;
    Ok(rate)
}

/// The design being replaced: one record at a time, every handler's write awaited on its own, a commit every
/// 100 records.
async fn per_event(env: &Env, topic: &str, n: usize) -> anyhow::Result<f64> {
    let db_name = fresh(env, "perevent");
    let design = PerEvent::start(env, &db_name, None).await?;
    let c: StreamConsumer = consumer_config(env, &fresh(env, "perevent")).create()?;
    c.subscribe(&[topic])?;
    let mut first = None;
    for i in 1..=n {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv())
            .await
            .context("per-event consumer: no record within 60 s")??;
        first.get_or_insert_with(Instant::now);
        design.apply(&m).await?;
        if i % 100 == 0 {
            c.commit_message(&m, CommitMode::Sync)?;
        }
    }
    let rate = n as f64 / first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    drop_db(env, &db_name).await;
    Ok(rate)
}

/// The per-event design's handlers: the shipped ones, each write its own command (`Writer::direct`), through a
/// client counted by the command monitoring; with a latency probe right after the first handler of its type.
struct PerEvent {
    ctx: HandlerContext,
    registry: Registry,
    probe: Option<Arc<Probe>>,
}

impl PerEvent {
    async fn start(
        env: &Env,
        db_name: &str,
        probe: Option<Arc<Probe>>,
    ) -> anyhow::Result<PerEvent> {
        let client = event_processor::store::connect(&env.mongo, "per-event").await?;
        let db = client.database(db_name);
        let registry = shipped()?;
        event_processor::store::ensure_indexes(&db, registry.indexes()).await?;
        let ctx = HandlerContext {
            db: db.clone(),
            writer: Writer::direct(db),
        };
        Ok(PerEvent {
            ctx,
            registry,
            probe,
        })
    }

    /// Decodes a record and runs its handlers one after the other, each awaited.
    async fn apply<M: rdkafka::Message>(&self, m: &M) -> anyhow::Result<()> {
        let Ok(Decoded::Event(e)) = decode(m, Format::Debezium) else {
            return Ok(());
        };
        let mut handlers = self.registry.handlers_for(&e.event_type).to_vec();
        if let Some(probe) = self
            .probe
            .as_ref()
            .filter(|p| p.event_type() == e.event_type)
        {
            probe.received(&e.event_id);
            handlers.insert(1.min(handlers.len()), probe.clone());
        }
        for h in handlers {
            h.handle(&e, &self.ctx)
                .await
                .map_err(|e| anyhow::anyhow!("per-event: {e}"))?;
        }
        Ok(())
    }
}

async fn drop_db(env: &Env, name: &str) {
    if let Ok(c) = mongodb::Client::with_uri_str(&env.mongo).await {
        let _ = c.database(name).drop().await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Latency: a probe handler beside the shipped ones records when MongoDB acknowledged its upsert.

/// Marks when an event's `users` document is visible. Run by the daemon, it writes a statement of its own to
/// `users`, which goes in the same command as the user's (one command per collection per write round), so its
/// acknowledgement is the user document's. Run by the per-event design right after the `users` handler, which
/// awaited its write, it writes nothing. Keeps, per event id, when the event reached the handlers (the daemon's
/// probe: when it was called; the per-event design's: when the record was decoded, before any handler) and when
/// the user document was acknowledged (0 until then).
struct Probe {
    seen: Arc<Mutex<HashMap<String, (i64, i64)>>>,
    write: bool,
}

impl Probe {
    /// Marks that the event reached the handlers.
    fn received(&self, event_id: &str) {
        self.seen
            .lock()
            .unwrap()
            .entry(event_id.to_string())
            .or_insert((now_us(), 0));
    }

    /// Whether the user document of `event_id` is acknowledged.
    fn acked(seen: &Mutex<HashMap<String, (i64, i64)>>, event_id: &str) -> bool {
        seen.lock()
            .unwrap()
            .get(event_id)
            .is_some_and(|(_, a)| *a > 0)
    }
}

#[async_trait]
impl EventHandler for Probe {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "LatencyProbe"
    }
    async fn handle(&self, e: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let called = now_us();
        if self.write {
            event_processor::handler::update_one(
                ctx,
                "users",
                doc! { "_id": format!("probe:{}", e.event_id) },
                doc! { "$set": { "probe": true } },
                true,
            )
            .await?;
        }
        let mut seen = self.seen.lock().unwrap();
        let times = seen.entry(e.event_id.clone()).or_insert((called, 0));
        if times.1 == 0 {
            times.1 = now_us();
        }
        Ok(())
    }
}

/// `env.repeat` latency runs, each summed up as its p50, p99 and p99.9 in milliseconds.
async fn latency_runs(env: &Env, pg: bool, count: usize, rate: f64) -> anyhow::Result<Vec<Value>> {
    let mut runs = Vec::new();
    for _ in 0..env.repeat {
        fresh_server(env)?;
        let (ms, _) = latency(env, pg, count, rate, Subject::Daemon).await?;
        runs.push(latency_run(&ms));
    }
    Ok(runs)
}

fn latency_run(ms: &[f64]) -> Value {
    json!({"p50_ms": pct(ms, 50.0), "p99_ms": pct(ms, 99.0), "p999_ms": pct(ms, 99.9), "events": ms.len()})
}

/// Who consumes in a latency run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// The daemon, in process.
    Daemon,
    /// The design being replaced: one record at a time, each handler awaited in turn, one statement per
    /// command (the probe right after the `users` write, so that it marks when the user document is visible).
    PerEvent,
}

/// Kafka -> MongoDB latency of the daemon and of the per-event design at `rate`, `env.repeat` times each,
/// alternating, each subject on a fresh server when `BENCH_FRESH_MONGO` says how to get one.
async fn latency_pair(env: &Env, count: usize, rate: f64) -> anyhow::Result<Value> {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for i in 0..env.repeat {
        for part in in_turn(i, 2) {
            fresh_server(env)?;
            let subject = if part == 0 {
                Subject::Daemon
            } else {
                Subject::PerEvent
            };
            let before = MongoWork::now();
            let (ms, to_handlers) = latency(env, false, count, rate, subject).await?;
            let mut run = latency_run(&ms);
            // Where the time goes: before the handlers (Kafka and the consumer; the daemon's hand-offs to a lane
            // and its event ledger's round trip) and after (the user document's write).
            run["to_handlers_p50_ms"] = json!(pct(&to_handlers, 50.0));
            run["to_handlers_p99_ms"] = json!(pct(&to_handlers, 99.0));
            // What each event cost MongoDB, start-up and the daemon's route-table reads included: commands and
            // the sum of their round trips. At 20/s the events do not overlap, so on a server that runs one
            // command at a time that sum is how long one event holds the server.
            let work = MongoWork::now().since(&before, count);
            run["mongodb_commands_per_event"] = json!(work.commands / 1000.0);
            run["mongodb_ms_per_event"] = json!(work.seconds);
            if part == 0 {
                ours.push(run);
            } else {
                base.push(run);
            }
        }
    }
    let (ours, base) = (summarize(ours), summarize(base));
    let ratio =
        |k: &str| ours[k].as_f64().unwrap_or(f64::NAN) / base[k].as_f64().unwrap_or(f64::NAN);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "[bench]   daemon p50 {:.1} / p99 {:.1} ms (handlers called at p50 {:.1} ms; {:.1} MongoDB commands, \
         {:.1} ms of round trips per event); \
         per-event p50 {:.1} / p99 {:.1} ms (handlers reached at p50 {:.1} ms; {:.1} commands, {:.1} ms)",
        f(&ours, "p50_ms"),
        f(&ours, "p99_ms"),
        f(&ours, "to_handlers_p50_ms"),
        f(&ours, "mongodb_commands_per_event"),
        f(&ours, "mongodb_ms_per_event"),
        f(&base, "p50_ms"),
        f(&base, "p99_ms"),
        f(&base, "to_handlers_p50_ms"),
        f(&base, "mongodb_commands_per_event"),
        f(&base, "mongodb_ms_per_event"),
    );
    Ok(
        json!({"events": count, "rate_per_s": rate, "daemon": ours, "per_event": base,
        "p50_ratio_to_per_event": ratio("p50_ms"), "p99_ratio_to_per_event": ratio("p99_ms")}),
    )
}

/// Restarts the MongoDB-wire server on an empty data directory when `BENCH_FRESH_MONGO` names the command that
/// does it (`scripts/bench` sets `scripts/stack fresh mongo`): its cost per command grows with the writes one
/// server process has served, so every measured subject starts from the same state.
fn fresh_server(env: &Env) -> anyhow::Result<()> {
    let Some(cmd) = &env.fresh_mongo else {
        return Ok(());
    };
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(
        status.success(),
        "BENCH_FRESH_MONGO `{cmd}` failed: {status}"
    );
    Ok(())
}

/// The per-event design consuming `topic` until `stop`: see [`Subject::PerEvent`].
async fn per_event_consumer(
    env: &Env,
    topic: &str,
    db_name: &str,
    probe: Arc<Probe>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let design = PerEvent::start(env, db_name, Some(probe)).await?;
    let mut config = consumer_config(env, &fresh(env, "perevent"));
    config.set("auto.offset.reset", "latest");
    let c: StreamConsumer = config.create()?;
    c.subscribe(&[topic])?;
    let mut taken = 0u64;
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = c.recv() => m?,
        };
        design.apply(&m).await?;
        taken += 1;
        if taken.is_multiple_of(100) {
            c.commit_message(&m, CommitMode::Sync)?;
        }
    }
}

/// Sends `count` sign-ups at `rate` per second, to Kafka (`pg == false`) or as outbox rows to PostgreSQL, and
/// returns each one's latency in milliseconds: the probe's acknowledgement minus the moment it was handed over;
/// and, as a part of it, when its handlers were reached (see [`Probe`]).
async fn latency(
    env: &Env,
    pg: bool,
    count: usize,
    rate: f64,
    subject: Subject,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let topic = if pg {
        "postgres.activity.event_outbox".to_string()
    } else {
        let t = fresh(env, "latency");
        create_topic(&env.kafka, &t).await?;
        t
    };
    let db = fresh(env, "latency");
    let mut config = daemon_config(env, &topic, &db)?;
    config.kafka_auto_offset_reset = "latest".into();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let probe = Arc::new(Probe {
        seen: seen.clone(),
        write: subject == Subject::Daemon,
    });
    let token = CancellationToken::new();
    let consumer = if subject == Subject::PerEvent {
        let (env, topic, db, probe, token) =
            (env.clone(), topic.clone(), db.clone(), probe, token.clone());
        tokio::spawn(async move { per_event_consumer(&env, &topic, &db, probe, token).await })
    } else {
        let mut registry = shipped()?;
        registry.register(probe)?;
        log_in_process(env)?;
        let daemon = event_processor::run_with_registry(config, registry, token.clone());
        tokio::spawn(daemon)
    };
    let result = drive_latency(env, pg, &topic, count, rate, &seen).await;
    token.cancel();
    consumer.await??;
    drop_db(env, &db).await;
    result
}

async fn drive_latency(
    env: &Env,
    pg: bool,
    topic: &str,
    count: usize,
    rate: f64,
    seen: &Arc<Mutex<HashMap<String, (i64, i64)>>>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let producer = producer(&env.kafka, "0")?;
    let pg = if pg {
        let (c, conn) = tokio_postgres::connect(&env.postgres, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Some(Arc::new(c))
    } else {
        None
    };
    // Each send is its own task, so it starts at its scheduled moment rather than when someone polls it.
    let send = |event_id: String, user: String| {
        let producer = producer.clone();
        let pg = pg.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            if let Some(pg) = pg {
                let payload = json!({"email": format!("{user}@example.com")}).to_string();
                pg.execute(
                    "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
                     VALUES ($1::text::uuid, $2::text::uuid, 'user', 'UserCreated', $3::text::jsonb)",
                    &[&event_id, &user, &payload],
                )
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
            } else {
                let (key, value) = change_record(
                    &event_id,
                    "UserCreated",
                    &user,
                    json!({"email": format!("{user}@example.com")}),
                );
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| anyhow::Error::from(e))
            }
        })
    };
    // Warm up: the group has joined and the partitions are assigned once one event comes through.
    let deadline = Instant::now() + Duration::from_secs(120);
    'warm: loop {
        let id = uuid::Uuid::new_v4().to_string();
        send(id.clone(), uuid::Uuid::new_v4().to_string()).await??;
        for _ in 0..50 {
            if Probe::acked(seen, &id) {
                break 'warm;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            Instant::now() < deadline,
            "the daemon saw nothing within 120 s"
        );
    }
    let mut sent: Vec<(String, i64)> = Vec::with_capacity(count);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for i in 0..count {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let id = uuid::Uuid::new_v4().to_string();
        sent.push((id.clone(), now_us()));
        inflight.push(send(id, uuid::Uuid::new_v4().to_string()));
        while inflight.len() > 64 {
            if let Some(r) = inflight.next().await {
                r??;
            }
        }
    }
    while let Some(r) = inflight.next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while sent.iter().any(|(id, _)| !Probe::acked(seen, id)) {
        ensure!(
            Instant::now() < deadline,
            "events lost: not all arrived within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap();
    let since = |t0: i64, t: i64| (t - t0) as f64 / 1000.0;
    let (mut ms, mut called): (Vec<f64>, Vec<f64>) = sent
        .iter()
        .filter_map(|(id, t0)| seen.get(id).map(|(c, a)| (since(*t0, *a), since(*t0, *c))))
        .unzip();
    ms.sort_by(f64::total_cmp);
    called.sort_by(f64::total_cmp);
    Ok((ms, called))
}

// ---------------------------------------------------------------------------------------------------------------
// The release binary as a separate process: memory and scaling.

fn spawn_daemon(
    env: &Env,
    topic: &str,
    db: &str,
    group: &str,
) -> anyhow::Result<std::process::Child> {
    let bin = env
        .bin
        .as_ref()
        .context("BENCH_BIN (the release binary) is not set")?;
    Ok(std::process::Command::new(bin)
        .arg("run")
        .env("KAFKA_BOOTSTRAP_SERVERS", &env.kafka)
        .env("KAFKA_TOPICS", topic)
        .env("KAFKA_GROUP_ID", group)
        .env("MONGODB_URI", &env.mongo)
        .env("MONGODB_DATABASE", db)
        .env("DLQ_TOPIC", format!("{db}.dlq"))
        .env("HTTP_PORT", "0")
        .env("LOG_LEVEL", log_level())
        .stdout(daemon_log(db)?)
        .spawn()?)
}

/// The daemon's log level: its default unless `BENCH_LOG_LEVEL` is set.
fn log_level() -> String {
    std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into())
}

/// The daemons run in this process log as the binary does, JSON at [`log_level`], into one file
/// (`target/bench/<run>-in-process-1.log`). Installed once.
fn log_in_process(env: &Env) -> anyhow::Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_none() {
        let file = daemon_log(&format!("bench_{}_in-process", env.run))?;
        event_processor::telemetry::init_with_writer(
            &log_level(),
            event_processor::config::LogFormat::Json,
            Mutex::new(file),
        )
        .map_err(|e| anyhow::anyhow!("log subscriber: {e}"))?;
        let _ = INSTALLED.set(());
    }
    Ok(())
}

/// Where a spawned daemon's log goes: `target/bench/<database>-<n>.log`, kept for a run that goes wrong.
fn daemon_log(db: &str) -> anyhow::Result<std::fs::File> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    for n in 1.. {
        let path = dir.join(format!("{db}-{n}.log"));
        if let Ok(f) = std::fs::File::create_new(&path) {
            return Ok(f);
        }
    }
    unreachable!("some name is free")
}

/// CPU time (user and system, every thread, including librdkafka's) this process has used, in seconds: what a
/// measured phase cost, whatever the other processes on the machine took meanwhile.
fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) ends with ')': utime and stime are the 12th and
            // 13th of them, in clock ticks of 1/100 s.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        });
    ticks.map_or(f64::NAN, |t| t as f64 / 100.0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resident memory of one daemon process while `rate` sign-ups per second flow for `secs`, sampled each second.
async fn resident_memory(env: &Env, rate: f64, secs: u64) -> anyhow::Result<(f64, f64)> {
    let topic = fresh(env, "rss");
    create_topic(&env.kafka, &topic).await?;
    let db = fresh(env, "rss");
    let child = spawn_daemon(env, &topic, &db, &format!("{db}_group"))?;
    let pid = child.id();
    let p = producer(&env.kafka, "5")?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = start + Duration::from_secs(5);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let (k, v) = workload(1).remove(0);
        let _ = p.send_result(FutureRecord::to(&topic).key(&k).payload(&v));
        i += 1;
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            samples.push(rss_kib(pid).context("the daemon exited")? as f64 / 1024.0);
        }
    }
    Ok(stop_sampled(env, child, &db, samples).await)
}

/// Stops a daemon whose resident memory was sampled and drops its database: the samples' median and maximum.
async fn stop_sampled(
    env: &Env,
    mut child: std::process::Child,
    db: &str,
    samples: Vec<f64>,
) -> (f64, f64) {
    let _ = child.kill();
    let _ = child.wait();
    drop_db(env, db).await;
    let max = samples.iter().cloned().fold(0.0, f64::max);
    (median(samples), max)
}

/// Resident memory of one daemon process catching up on `topic`, a backlog far larger than it gets through in
/// `secs` (the shipped handlers against MongoDB), sampled each second: what the prefetch queue and the records in
/// flight take when the consumer is behind. Median and maximum, MiB.
async fn catch_up_memory(env: &Env, topic: &str, secs: u64) -> anyhow::Result<(f64, f64)> {
    let db = fresh(env, "backlog");
    let child = spawn_daemon(env, topic, &db, &format!("{db}_group"))?;
    let pid = child.id();
    let mut samples = Vec::new();
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_kib(pid).context("the daemon exited")? as f64 / 1024.0);
    }
    Ok(stop_sampled(env, child, &db, samples).await)
}

/// Resident memory at steady load and while catching up on a backlog (the pipeline ceiling's topic), into `out`.
async fn memory(
    env: &Env,
    rate: f64,
    backlog: &str,
    out: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let secs = if env.quick { 10 } else { 30 };
    eprintln!("[bench] resident memory at {rate}/s");
    let (med, max) = resident_memory(env, rate, secs).await?;
    out.insert(
        "resident_memory".into(),
        json!({"rate_per_s": rate, "median_mib": med, "max_mib": max}),
    );
    eprintln!("[bench] resident memory catching up on a backlog");
    let (med, max) = catch_up_memory(env, backlog, secs).await?;
    out.insert(
        "catch_up_memory".into(),
        json!({"seconds": secs, "median_mib": med, "max_mib": max}),
    );
    save(out)
}

/// Sum of the group's committed offsets over the topic's partitions.
fn committed_total(env: &Env, group: &str, topic: &str) -> anyhow::Result<i64> {
    let c: BaseConsumer = consumer_config(env, group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    let total = got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    drop(got);
    Ok(total)
}

/// `k` daemon processes in one group over a pre-filled topic: records per second from the first commit to the
/// last (group joins are not counted).
async fn scaling(env: &Env, records: &[(String, String)], k: usize) -> anyhow::Result<f64> {
    let topic = fill(env, records).await?;
    let db = fresh(env, "scale");
    let group = format!("{db}_group");
    let mut children = (0..k)
        .map(|_| spawn_daemon(env, &topic, &db, &group))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, i64)> = None;
    let result = loop {
        let total = committed_total(env, &group, &topic)?;
        if total > 0 && first.is_none() {
            first = Some((Instant::now(), total));
        }
        if total as usize >= records.len() {
            let (t0, c0) = first.unwrap_or((Instant::now(), 0));
            break Ok((total - c0) as f64 / t0.elapsed().as_secs_f64().max(1e-9));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "scaling x{k}: {total} of {} committed after 600 s",
                records.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop_db(env, &db).await;
    result
}

// ---------------------------------------------------------------------------------------------------------------

/// The pipeline with no-op handlers against a bare consume loop, over the same pre-filled topic.
/// Returns the filled topic.
async fn pipeline_ceiling(
    env: &Env,
    n_kafka: usize,
    out: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<String> {
    eprintln!(
        "[bench] pipeline ceiling: {n_kafka} records, {} repeats",
        env.repeat
    );
    let records = workload(n_kafka);
    let topic = fill(env, &records).await?;
    let noop = noops()?;
    let work = (records.len(), calls(&noop, &records));
    let (mut bare, mut pipe) = (Vec::new(), Vec::new());
    let (mut bare_cpu, mut pipe_cpu, mut decoding) = (Vec::new(), Vec::new(), Vec::new());
    let mut declared = Vec::new();
    let per_record_us = |cpu_s: f64| cpu_s * 1e6 / n_kafka as f64;
    for i in 0..env.repeat {
        // The default format (`debezium`: a header look-up per record) and the format declared.
        decoding.push(decode_us(&records, Format::Debezium));
        declared.push(decode_us(&records, Format::ChangeEvent));
        for part in in_turn(i, 2) {
            let cpu = cpu_seconds();
            if part == 0 {
                bare.push(bare_consume(env, &topic, n_kafka).await?);
                bare_cpu.push(per_record_us(cpu_seconds() - cpu));
            } else {
                pipe.push(pipeline(env, &topic, work, &noop, false).await?);
                pipe_cpu.push(per_record_us(cpu_seconds() - cpu));
            }
        }
    }
    let (b, p) = (median(bare.clone()), median(pipe.clone()));
    let (bc, pc) = (median(bare_cpu.clone()), median(pipe_cpu.clone()));
    let dc = median(decoding.clone());
    let dd = median(declared.clone());
    let paired = paired_ratios(&pipe, &bare);
    eprintln!(
        "[bench]   bare {b:.0}/s ({bc:.1} us CPU per record), pipeline {p:.0}/s ({pc:.1} us CPU per record); decoding alone {dc:.2} us per record ({dd:.2} with the format declared); ratio {:.2}, repeat by repeat {paired:.2?}",
        p / b
    );
    out.insert(
        "pipeline_ceiling".into(),
        json!({
            "records": n_kafka, "bare_consume_per_s": bare, "pipeline_noop_per_s": pipe,
            "median_bare_per_s": b, "median_pipeline_per_s": p, "ratio": p / b,
            "ratio_per_repeat": paired, "median_ratio_per_repeat": median(paired.clone()),
            "bare_cpu_us_per_record": bare_cpu, "pipeline_cpu_us_per_record": pipe_cpu,
            "median_bare_cpu_us_per_record": bc, "median_pipeline_cpu_us_per_record": pc,
            "decode_us_per_record": decoding, "median_decode_us_per_record": dc,
            "decode_declared_us_per_record": declared, "median_decode_declared_us_per_record": dd,
        }),
    );
    Ok(topic)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let env = Env {
        kafka: var("KAFKA_BOOTSTRAP_SERVERS")?,
        mongo: var("MONGODB_URI")?,
        postgres: var("POSTGRES_URL")?,
        run: uuid::Uuid::new_v4().simple().to_string()[..6].to_string(),
        repeat: std::env::var("BENCH_REPEAT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 1 } else { 3 }),
        quick,
        bin: std::env::var_os("BENCH_BIN").map(PathBuf::from),
        fresh_mongo: std::env::var("BENCH_FRESH_MONGO")
            .ok()
            .filter(|c| !c.is_empty()),
    };
    let (n_kafka, n_mongo, n_per_event) = if env.quick {
        (5_000, 600, 150)
    } else {
        (200_000, 20_000, 3_000)
    };
    let mut out = serde_json::Map::new();
    out.insert("machine".into(), machine());
    // BENCH_ONLY=pipeline stops after the pipeline ceiling (for profiling it); BENCH_ONLY=mongodb measures only
    // the throughput with MongoDB; BENCH_ONLY=scaling only one against three processes (once each);
    // BENCH_ONLY=memory only resident memory (at 100 events/s, and catching up on a backlog); BENCH_ONLY=latency
    // only the latency at 20/s and 100/s.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let only_pipeline = only == "pipeline";
    let only_mongodb = only == "mongodb";
    // BENCH_ONLY=latency: Kafka -> MongoDB latency at the low rates where waiting for more records would show
    // (20/s and 100/s, 10 s of events each per repeat).
    if only == "latency" {
        low_load_latency(&env, &mut out).await?;
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    // BENCH_ONLY=rebuild: how long `event-processor rebuild` takes over 10,000 and 100,000 events.
    if only == "rebuild" {
        rebuild_times(&env, &mut out).await?;
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    // BENCH_ONLY=decode: decoding alone (no services), the default format against the format declared.
    if only == "decode" {
        let records = workload(n_kafka);
        let (mut default, mut declared) = (Vec::new(), Vec::new());
        for i in 0..env.repeat {
            for part in in_turn(i, 2) {
                if part == 0 {
                    default.push(decode_us(&records, Format::Debezium));
                } else {
                    declared.push(decode_us(&records, Format::ChangeEvent));
                }
            }
        }
        let (d, c) = (median(default.clone()), median(declared.clone()));
        eprintln!(
            "[bench] decoding alone: {d:.3} us per record by default, {c:.3} with the format declared"
        );
        out.insert(
            "decode".into(),
            json!({"records": records.len(), "default_us_per_record": default, "declared_us_per_record": declared,
                   "median_default_us_per_record": d, "median_declared_us_per_record": c}),
        );
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    if only == "scaling" {
        let records = workload(n_mongo);
        let (one, three) = (
            scaling(&env, &records, 1).await?,
            scaling(&env, &records, 3).await?,
        );
        println!("{}", json!({"one_per_s": one, "three_per_s": three}));
        return Ok(());
    }

    if only == "memory" {
        let backlog = fill(&env, &workload(n_kafka)).await?;
        memory(&env, 100.0, &backlog, &mut out).await?;
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    let mut backlog = None;
    if !only_mongodb {
        backlog = Some(pipeline_ceiling(&env, n_kafka, &mut out).await?);
        save(&out)?;
    }
    if only_pipeline {
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    eprintln!("[bench] with MongoDB: {n_mongo} records (per-event design: {n_per_event})");
    let records = workload(n_mongo);
    let topic = fill(&env, &records).await?;
    let handlers = shipped()?;
    let work = (records.len(), calls(&handlers, &records));
    let (mut ceil, mut ours, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_work, mut base_work) = (Vec::new(), Vec::new());
    let mut ours_by_name = Vec::new();
    for i in 0..env.repeat {
        for part in in_turn(i, 3) {
            fresh_server(&env)?;
            let before = MongoWork::now();
            let names_before = commands_by_name();
            match part {
                0 => ceil.push(server_ceiling(&env, &records).await?),
                1 => {
                    ours.push(pipeline(&env, &topic, work, &handlers, true).await?);
                    ours_work.push(MongoWork::now().since(&before, records.len()));
                    ours_by_name.push(per_thousand(
                        &commands_by_name(),
                        &names_before,
                        records.len(),
                    ));
                }
                _ => {
                    base.push(per_event(&env, &topic, n_per_event).await?);
                    base_work.push(MongoWork::now().since(&before, n_per_event));
                }
            }
        }
    }
    let (ours_work, base_work) = (MongoWork::median(&ours_work), MongoWork::median(&base_work));
    eprintln!(
        "[bench]   MongoDB work per 1,000 events: daemon {:.0} commands, {:.0} statements, {:.0} KiB; per-event \
         {:.0} commands, {:.0} statements, {:.0} KiB",
        ours_work.commands,
        ours_work.statements,
        ours_work.bytes / 1024.0,
        base_work.commands,
        base_work.statements,
        base_work.bytes / 1024.0
    );
    let ours_by_name = median_by_name(&ours_by_name);
    eprintln!("[bench]   daemon commands per 1,000 events by name: {ours_by_name}");
    out.insert(
        "mongodb_work_per_1000_events".into(),
        json!({
            "daemon": ours_work.to_json(), "per_event": base_work.to_json(),
            "daemon_commands_by_name": ours_by_name,
            "command_ratio_to_per_event": ours_work.commands / base_work.commands,
            "statement_ratio_to_per_event": ours_work.statements / base_work.statements,
        }),
    );
    let (c, o, b) = (
        median(ceil.clone()),
        median(ours.clone()),
        median(base.clone()),
    );
    let (to_ceiling, to_per_event) = (paired_ratios(&ours, &ceil), paired_ratios(&ours, &base));
    eprintln!(
        "[bench]   server ceiling {c:.0}/s, pipeline {o:.0}/s, per-event {b:.0}/s; of the server {:.2} (repeat by repeat {to_ceiling:.2?})",
        o / c
    );
    out.insert("with_mongodb".into(), json!({
        "records": n_mongo, "per_event_records": n_per_event, "server": server_state(&env),
        "server_ceiling_per_s": ceil, "pipeline_per_s": ours, "per_event_per_s": base,
        "median_server_ceiling_per_s": c, "median_pipeline_per_s": o, "median_per_event_per_s": b,
        "ratio_to_ceiling": o / c, "ratio_to_per_event": o / b,
        "ratio_to_ceiling_per_repeat": to_ceiling, "median_ratio_to_ceiling_per_repeat": median(to_ceiling.clone()),
        "ratio_to_per_event_per_repeat": to_per_event, "median_ratio_to_per_event_per_repeat": median(to_per_event.clone()),
    }));
    save(&out)?;
    if only_mongodb {
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }

    low_load_latency(&env, &mut out).await?;
    save(&out)?;

    // Latency at fixed rates: 1000/s, and half the pipeline's measured maximum.
    let half = (o / 2.0).max(1.0).round();
    let secs = if env.quick { 2.0 } else { 5.0 };
    let mut lat = serde_json::Map::new();
    for rate in [1000.0, half] {
        let count = (rate * secs).max(50.0) as usize;
        eprintln!("[bench] Kafka -> MongoDB latency at {rate}/s, {count} events");
        let runs = latency_runs(&env, false, count, rate).await?;
        lat.insert(format!("kafka_{rate}_per_s"), summarize(runs));
    }
    for rate in [20.0, 100.0] {
        let count = (rate * if env.quick { 2.0 } else { 10.0 }) as usize;
        eprintln!("[bench] PostgreSQL -> MongoDB latency at {rate}/s, {count} events");
        let runs = latency_runs(&env, true, count, rate).await?;
        lat.insert(format!("postgres_{rate}_per_s"), summarize(runs));
    }
    out.insert("latency".into(), Value::Object(lat));
    save(&out)?;

    if env.bin.is_some() {
        let rate = (o / 2.0).max(1.0).round();
        let backlog = backlog.context("the pipeline ceiling's topic")?;
        memory(&env, rate, &backlog, &mut out).await?;
        let records = workload(n_mongo);
        let (mut one, mut two, mut three) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..env.repeat.min(2) {
            eprintln!(
                "[bench] scaling: 1, 2 and 3 processes, {} records",
                records.len()
            );
            fresh_server(&env)?;
            one.push(scaling(&env, &records, 1).await?);
            fresh_server(&env)?;
            two.push(scaling(&env, &records, 2).await?);
            fresh_server(&env)?;
            three.push(scaling(&env, &records, 3).await?);
        }
        let (a, b, c) = (
            median(one.clone()),
            median(two.clone()),
            median(three.clone()),
        );
        out.insert(
            "scaling".into(),
            json!({"records": records.len(), "one_per_s": one, "two_per_s": two, "three_per_s": three,
            "median_one_per_s": a, "median_two_per_s": b, "median_three_per_s": c,
            "ratio_two": b / a, "ratio": c / a}),
        );
    } else {
        bail!("BENCH_BIN is not set: build the release binary and point BENCH_BIN at it");
    }

    save(&out)?;
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}

/// Kafka -> MongoDB latency at the low rates where waiting for more records would show (20/s and 100/s, 10 s
/// of events per run), the daemon against the per-event design.
async fn low_load_latency(
    env: &Env,
    out: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let mut lat = serde_json::Map::new();
    for rate in [20.0, 100.0] {
        let count = if env.quick {
            40
        } else {
            (rate * 10.0) as usize
        };
        eprintln!(
            "[bench] Kafka -> MongoDB latency at {rate}/s, {count} events: daemon and per-event design"
        );
        lat.insert(
            format!("kafka_{rate}_per_s"),
            latency_pair(env, count, rate).await?,
        );
    }
    lat.insert("server".into(), json!(server_state(env)));
    out.insert("low_load_latency".into(), Value::Object(lat));
    Ok(())
}

/// The time a rebuild takes over a topic of `n` events of the standard mix, on a fresh server: first one read
/// model (`users`) with no live daemon (the rebuild follows the topic to its end); then, at 10,000 events, the live
/// daemon applying the events from scratch with every handler, and a rebuild of all four handlers beside it.
/// (At 100,000 events the MongoDB-wire server's cost per statement grows with its data until the shipped
/// statistics' writes take it to a few records per second, for the live daemon and a rebuild alike: the
/// all-handlers pair is not run there.)
async fn rebuild_times(env: &Env, out: &mut serde_json::Map<String, Value>) -> anyhow::Result<()> {
    let sizes: &[usize] = if env.quick {
        &[2_000]
    } else {
        &[10_000, 100_000]
    };
    let mut results = serde_json::Map::new();
    for &n in sizes {
        let mut runs: Vec<serde_json::Map<String, Value>> = Vec::new();
        for i in 0..env.repeat {
            runs.push(rebuild_run(env, n, i).await?);
        }
        let mut row = serde_json::Map::new();
        for key in ["users_s", "live_from_scratch_s", "all_handlers_s"] {
            let values: Vec<f64> = runs.iter().filter_map(|r| r.get(key)?.as_f64()).collect();
            if !values.is_empty() {
                row.insert(format!("median_{key}"), json!(median(values.clone())));
                row.insert(key.into(), json!(values));
            }
        }
        eprintln!("[bench]   {n} events, medians of {}: {row:?}", env.repeat);
        results.insert(n.to_string(), Value::Object(row));
    }
    results.insert("server".into(), json!(server_state(env)));
    out.insert("rebuild".into(), Value::Object(results));
    Ok(())
}

/// One repeat of [`rebuild_times`] at `n` events.
async fn rebuild_run(
    env: &Env,
    n: usize,
    repeat: usize,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    eprintln!("[bench] rebuild over {n} events, repeat {}", repeat + 1);
    let records = workload(n);
    let topic = fill(env, &records).await?;
    let db = fresh(env, "rebuild");
    fresh_server(env)?;
    log_in_process(env)?;
    let config = daemon_config(env, &topic, &db)?;
    let rebuild = |handlers: Vec<String>| {
        let config = config.clone();
        async move {
            let started = Instant::now();
            event_processor::rebuild::run(
                config,
                shipped()?,
                event_processor::rebuild::Options {
                    handlers,
                    allow_incomplete_history: false,
                },
                CancellationToken::new(),
            )
            .await?
            .ok_or_else(|| anyhow::anyhow!("the rebuild stopped before its end"))?;
            anyhow::Ok(started.elapsed().as_secs_f64())
        }
    };
    let mut row = serde_json::Map::new();
    let users = rebuild(vec!["UserCreatedHandler".to_string()]).await?;
    eprintln!("[bench]   {n} events: rebuild of users {users:.1} s");
    row.insert("users_s".into(), json!(users));
    if n <= 10_000 {
        let group = config.kafka_group_id.clone();
        let token = CancellationToken::new();
        let started = Instant::now();
        let live = tokio::spawn(event_processor::run_with_registry(
            config.clone(),
            shipped()?,
            token.clone(),
        ));
        while committed_total(env, &group, &topic)? < n as i64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let live_secs = started.elapsed().as_secs_f64();
        token.cancel();
        live.await??;
        let all: Vec<String> = shipped()?.names().iter().map(|s| s.to_string()).collect();
        let all = rebuild(all).await?;
        eprintln!(
            "[bench]   {n} events: live daemon from scratch {live_secs:.1} s, rebuild of all handlers {all:.1} s"
        );
        row.insert("live_from_scratch_s".into(), json!(live_secs));
        row.insert("all_handlers_s".into(), json!(all));
    }
    Ok(row)
}

/// What state each measured subject found the MongoDB-wire server in.
fn server_state(env: &Env) -> &'static str {
    if env.fresh_mongo.is_some() {
        "restarted on an empty data directory before each subject"
    } else {
        "shared by every subject (BENCH_FRESH_MONGO not set)"
    }
}

/// The daemon's metrics page as a scrape would see it (the recorder is installed by the first call).
fn metrics_page() -> String {
    event_processor::http::metrics_handle()
        .map(|h| h.render())
        .unwrap_or_default()
}

/// The samples of the series `name` on `page`: each line, and its value.
fn samples<'a>(page: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    page.lines()
        .filter(move |l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| Some((l, l.rsplit(' ').next()?.parse::<f64>().ok()?)))
}

/// The commands sent to MongoDB so far, by command name (`event_processor_mongodb_commands_total{command}`).
fn commands_by_name() -> HashMap<String, f64> {
    let page = metrics_page();
    let mut out = HashMap::new();
    for (line, value) in samples(&page, event_processor::catalogue::MONGODB_COMMANDS) {
        if let Some(name) = line
            .split("command=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            *out.entry(name.to_string()).or_default() += value;
        }
    }
    out
}

/// Per 1,000 of `events`, by command name, since `before`.
fn per_thousand(
    now: &HashMap<String, f64>,
    before: &HashMap<String, f64>,
    events: usize,
) -> HashMap<String, f64> {
    let per = 1000.0 / events.max(1) as f64;
    now.iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).unwrap_or(&0.0)) * per))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// The median per command name over runs (a name a run did not send counts as 0 in it).
fn median_by_name(runs: &[HashMap<String, f64>]) -> Value {
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    names.sort();
    names.dedup();
    let map: serde_json::Map<String, Value> = names
        .into_iter()
        .map(|n| {
            let m = median(runs.iter().map(|r| *r.get(n).unwrap_or(&0.0)).collect());
            (n.clone(), json!(m))
        })
        .collect();
    Value::Object(map)
}

/// What was sent to MongoDB, from the driver's command monitoring as the daemon exports it
/// (`event_processor_mongodb_*_total`, every client made by `store::connect`): it does not depend on how fast
/// the server is.
#[derive(Clone, Copy, Default)]
struct MongoWork {
    commands: f64,
    statements: f64,
    bytes: f64,
    /// The commands' round trips, seconds (per 1,000 events: milliseconds per event).
    seconds: f64,
}

impl MongoWork {
    /// The counters so far (the recorder is installed by the first call).
    fn now() -> MongoWork {
        let page = metrics_page();
        let total = |name: &str| -> f64 { samples(&page, name).map(|(_, v)| v).sum() };
        MongoWork {
            commands: total(event_processor::catalogue::MONGODB_COMMANDS),
            statements: total(event_processor::catalogue::MONGODB_STATEMENTS),
            bytes: total(event_processor::catalogue::MONGODB_BYTES),
            seconds: total(&format!(
                "{}_sum",
                event_processor::catalogue::MONGODB_COMMAND_DURATION
            )),
        }
    }

    /// Per 1,000 of `events`, since `before`.
    fn since(&self, before: &MongoWork, events: usize) -> MongoWork {
        let per = 1000.0 / events.max(1) as f64;
        MongoWork {
            commands: (self.commands - before.commands) * per,
            statements: (self.statements - before.statements) * per,
            bytes: (self.bytes - before.bytes) * per,
            seconds: (self.seconds - before.seconds) * per,
        }
    }

    fn median(runs: &[MongoWork]) -> MongoWork {
        let m = |f: fn(&MongoWork) -> f64| median(runs.iter().map(f).collect());
        MongoWork {
            commands: m(|w| w.commands),
            statements: m(|w| w.statements),
            bytes: m(|w| w.bytes),
            seconds: m(|w| w.seconds),
        }
    }

    fn to_json(self) -> Value {
        json!({"commands": self.commands, "statements": self.statements, "bytes": self.bytes, "command_seconds": self.seconds})
    }
}

/// Writes what is measured so far to `BENCH_OUT` (if set), after every part: a part that fails late does not
/// take the earlier ones with it.
fn save(out: &serde_json::Map<String, Value>) -> anyhow::Result<()> {
    if let Some(path) = std::env::var_os("BENCH_OUT") {
        std::fs::write(path, serde_json::to_string_pretty(out)?)?;
    }
    Ok(())
}

/// Median of each percentile over the runs, and the runs.
fn summarize(runs: Vec<Value>) -> Value {
    let m = |k: &str| median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
    let mut summary =
        json!({"p50_ms": m("p50_ms"), "p99_ms": m("p99_ms"), "p999_ms": m("p999_ms")});
    for k in [
        "mongodb_commands_per_event",
        "mongodb_ms_per_event",
        "to_handlers_p50_ms",
        "to_handlers_p99_ms",
    ] {
        if runs.iter().any(|r| r.get(k).is_some()) {
            summary[k] = json!(m(k));
        }
    }
    summary["runs"] = json!(runs);
    summary
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    json!({"cpu": cpu, "cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "memory_gib": mem_gib})
}
