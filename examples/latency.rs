//! Latency through the real pipeline, measured in one process with one clock.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo run --release --example latency -- pg 200 20        # PostgreSQL commit -> MongoDB ack, 200 events, 20/s
//! cargo run --release --example latency -- kafka 5000 1000  # Kafka append -> MongoDB ack, 5000 events, 1000/s
//! ```
//!
//! The daemon runs in-process with the shipped handlers plus a probe handler on `UserCreated` that makes one
//! MongoDB upsert and records when the server acknowledged it. Latency = that acknowledgement minus the moment the
//! event was handed to PostgreSQL (`pg`: before the autocommit `INSERT` is sent) or to Kafka (`kafka`: before the
//! produce call). `pg` goes through Debezium with the settings of `debezium/postgres-connector.json` as deployed by
//! `scripts/stack up`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use event_processor::{Config, EventHandler, HandlerContext, HandlerError, OutboxEvent, Registry};
use mongodb::bson::doc;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

struct Probe(Arc<Mutex<HashMap<String, i64>>>);

#[async_trait]
impl EventHandler for Probe {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "LatencyProbe"
    }
    async fn handle(&self, e: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        event_processor::store::update_one(
            ctx,
            "latency_probe",
            doc! { "_id": &e.event_id },
            doc! { "$set": { "seen": true } },
            true,
        )
        .await?;
        self.0
            .lock()
            .unwrap()
            .entry(e.event_id.clone())
            .or_insert_with(now_us);
        Ok(())
    }
}

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: eval \"$(scripts/stack env)\""))
}

fn change_event(event_id: &str, user: &str) -> String {
    let payload =
        serde_json::json!({"email": format!("{user}@example.com"), "username": user}).to_string();
    serde_json::json!({"before": null, "op": "c", "ts_ms": 0, "source": {}, "transaction": null, "after": {
        "event_id": event_id, "aggregate_id": user, "aggregate_type": "user", "event_type": "UserCreated",
        "payload": payload, "status": "pending", "created_at": "2026-11-26T15:16:01.817235Z"}})
    .to_string()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("pg").to_string();
    let count: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let rate: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let kafka = var("KAFKA_BOOTSTRAP_SERVERS");
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let topic = if mode == "pg" {
        "postgres.activity.event_outbox".to_string()
    } else {
        format!("latency_{suffix}")
    };
    // Tuning variables set in the environment (PROCESSING_*, KAFKA_MAX_POLL_RECORDS, ...) apply too.
    let tuning = std::env::vars().filter(|(k, _)| {
        k.starts_with("PROCESSING_")
            || k.starts_with("KAFKA_MAX_POLL")
            || k.starts_with("KAFKA_POLL")
    });
    let http_port = std::env::var("HTTP_PORT").unwrap_or_else(|_| "0".into());
    let config = Config::from_vars(tuning.chain([
        ("KAFKA_BOOTSTRAP_SERVERS".into(), kafka.clone()),
        ("MONGODB_URI".into(), var("MONGODB_URI")),
        ("MONGODB_DATABASE".into(), format!("latency_{suffix}")),
        ("KAFKA_TOPICS".into(), topic.clone()),
        ("KAFKA_GROUP_ID".into(), format!("latency_{suffix}")),
        ("KAFKA_AUTO_OFFSET_RESET".into(), "latest".into()),
        ("DLQ_TOPIC".into(), format!("latency_{suffix}.dlq")),
        ("HTTP_PORT".into(), http_port),
        (
            "LOG_LEVEL".into(),
            std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        ),
    ]))?;
    if mode != "pg" {
        event_processor_admin::create_topic(&kafka, &topic, 6).await?;
    }
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = Registry::new();
    // LATENCY_PROBE_ONLY=1 leaves the shipped handlers out, to see the pipeline without their writes.
    // LATENCY_HANDLERS=UserCreatedHandler,... keeps only the named shipped handlers.
    if std::env::var_os("LATENCY_PROBE_ONLY").is_none() {
        let mut all = Registry::new();
        event_processor::handlers::register_all(&mut all)?;
        let keep = std::env::var("LATENCY_HANDLERS").ok();
        for name in all.names() {
            if keep
                .as_deref()
                .is_none_or(|k| k.split(',').any(|n| n == name))
            {
                registry.register(all.by_name(name).unwrap().clone())?;
            }
        }
    }
    registry.register(Arc::new(Probe(seen.clone())))?;
    if let Ok(level) = std::env::var("LOG_LEVEL") {
        let _ =
            event_processor::telemetry::init(&level, event_processor::config::LogFormat::Pretty);
    }
    let token = CancellationToken::new();
    let daemon = tokio::spawn(event_processor::run_with_registry(
        config,
        registry,
        token.clone(),
    ));

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("linger.ms", "0")
        .create()?;
    let pg = if mode == "pg" {
        let (c, conn) =
            tokio_postgres::connect(&var("POSTGRES_URL"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Some(Arc::new(c))
    } else {
        None
    };
    // Each send is its own task, so it starts at its scheduled moment rather than when someone polls it.
    let send = |event_id: String, user: String| {
        let producer = producer.clone();
        let pg = pg.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            if let Some(pg) = pg {
                let payload =
                    serde_json::json!({"email": format!("{user}@example.com")}).to_string();
                pg.execute(
                    "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
                     VALUES ($1::text::uuid, $2::text::uuid, 'user', 'UserCreated', $3::text::jsonb)",
                    &[&event_id, &user, &payload],
                )
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
            } else {
                let key = serde_json::json!({"aggregate_id": user}).to_string();
                let value = change_event(&event_id, &user);
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
            if seen.lock().unwrap().contains_key(&id) {
                break 'warm;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(
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
        // Keep the sends flowing without waiting for each one (PostgreSQL: the client pipelines them).
        while inflight.len() > 64 {
            use futures::StreamExt;
            if let Some(r) = inflight.next().await {
                r??;
            }
        }
    }
    {
        use futures::StreamExt;
        while let Some(r) = inflight.next().await {
            r??;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent
        .iter()
        .any(|(id, _)| !seen.lock().unwrap().contains_key(id))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    daemon.await??;

    let seen = seen.lock().unwrap();
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(id, t0)| seen.get(id).map(|t1| (*t1 - *t0) as f64 / 1000.0))
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({
            "mode": mode, "events": count, "rate_per_s": rate, "received": ms.len(),
            "p50_ms": pct(&ms, 50.0), "p99_ms": pct(&ms, 99.0), "p999_ms": pct(&ms, 99.9), "max_ms": ms.last(),
        })
    );
    anyhow::ensure!(
        ms.len() == count,
        "{} of {count} events never arrived",
        count - ms.len()
    );
    Ok(())
}

mod event_processor_admin {
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    pub async fn create_topic(kafka: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", kafka)
            .create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await?
        {
            r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(())
    }
}
