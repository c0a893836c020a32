//! Shared helpers for the integration tests: real services, a fresh topic, group and database per test, the
//! daemon run in-process through the same `run` that `main` calls, and black-box reads of what landed in
//! MongoDB and what the broker has committed.
//!
//! Services: `KAFKA_BOOTSTRAP_SERVERS` and `MONGODB_URI` when set (e.g. `eval "$(scripts/stack env)"`),
//! otherwise testcontainers when a Docker engine answers; with neither, the test fails and says how to provide
//! them. End-to-end tests also need `POSTGRES_URL` and `KAFKA_CONNECT_URL` (from `scripts/stack env`).
#![allow(dead_code)]

pub mod pipeline;
pub mod process;

use std::future::Future;
use std::sync::Once;
use std::time::{Duration, Instant};

use event_processor::{Config, Registry};
use mongodb::Database;
use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub struct Services {
    pub kafka: String,
    pub mongo: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();
static LOG: Once = Once::new();

/// Quiet unless `TEST_LOG` is set.
pub fn init_log() {
    LOG.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = event_processor::telemetry::init(
                &std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
                event_processor::config::LogFormat::Pretty,
            );
        }
    });
}

/// Kafka and MongoDB for this test binary.
pub async fn services() -> &'static Services {
    init_log();
    SERVICES
        .get_or_init(|| async {
            if let (Ok(kafka), Ok(mongo)) = (
                std::env::var("KAFKA_BOOTSTRAP_SERVERS"),
                std::env::var("MONGODB_URI"),
            ) {
                return Services { kafka, mongo };
            }
            match containers::start().await {
                Ok(s) => s,
                Err(e) => panic!(
                    "No Kafka/MongoDB for the integration tests: KAFKA_BOOTSTRAP_SERVERS and MONGODB_URI are not set \
                     and testcontainers could not start them ({e}). Either run `scripts/stack up` and \
                     `eval \"$(scripts/stack env)\"`, or provide a Docker engine."
                ),
            }
        })
        .await
}

/// PostgreSQL and Kafka Connect for end-to-end tests.
pub fn e2e_services() -> (String, String) {
    match (
        std::env::var("POSTGRES_URL"),
        std::env::var("KAFKA_CONNECT_URL"),
    ) {
        (Ok(pg), Ok(connect)) => (pg, connect),
        _ => panic!(
            "End-to-end tests need POSTGRES_URL and KAFKA_CONNECT_URL (PostgreSQL with wal_level=logical and Kafka \
             Connect with the Debezium PostgreSQL connector): run `scripts/stack up` and `eval \"$(scripts/stack env)\"`."
        ),
    }
}

mod containers {
    use super::Services;
    use testcontainers::ImageExt;
    use testcontainers::runners::AsyncRunner;
    use testcontainers_modules::{kafka::apache, mongo::Mongo};

    pub async fn start() -> Result<Services, String> {
        // The JVM image (apache/kafka), not the module's default GraalVM build (apache/kafka-native).
        let kafka = apache::Kafka::default()
            .with_jvm_image()
            .with_tag("4.1.0")
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let mongo = Mongo::default()
            .with_tag("8.0")
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let kport = kafka
            .get_host_port_ipv4(apache::KAFKA_PORT)
            .await
            .map_err(|e| e.to_string())?;
        let mport = mongo
            .get_host_port_ipv4(27017)
            .await
            .map_err(|e| e.to_string())?;
        // The containers live as long as the test binary.
        std::mem::forget(kafka);
        std::mem::forget(mongo);
        Ok(Services {
            kafka: format!("127.0.0.1:{kport}"),
            mongo: format!("mongodb://127.0.0.1:{mport}"),
        })
    }
}

/// A fresh name for a topic, group or database.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Everything one test owns.
pub struct TestEnv {
    pub kafka: String,
    pub mongo_uri: String,
    pub topic: String,
    pub group: String,
    pub dlq: String,
    pub db_name: String,
    pub db: Database,
    /// Partitions of the test's topics.
    pub partitions: i32,
    /// Topics besides `topic` that the daemon subscribes to, each with its declared record format
    /// (`RECORD_FORMATS`): made by [`TestEnv::produce_fixtures`] for Event Router output.
    pub declared: Vec<(String, String)>,
}

impl TestEnv {
    /// A fresh topic with `partitions` partitions, group, dead-letter topic and database.
    pub async fn new(name: &str, partitions: i32) -> Self {
        let s = services().await;
        let topic = unique(&format!("t_{name}"));
        let dlq = format!("{topic}.dlq");
        create_topics(&s.kafka, &[(&topic, partitions), (&dlq, 1)]).await;
        let client = mongodb::Client::with_uri_str(&s.mongo)
            .await
            .expect("MongoDB client");
        let db_name = unique("ep");
        TestEnv {
            kafka: s.kafka.clone(),
            mongo_uri: s.mongo.clone(),
            group: unique("g"),
            db: client.database(&db_name),
            db_name,
            topic,
            dlq,
            partitions,
            declared: Vec::new(),
        }
    }

    /// The same, with the read models on another MongoDB-wire server (`uri`): what the daemon writes and what the
    /// test reads.
    pub async fn on_mongo(mut self, uri: &str) -> TestEnv {
        let client = mongodb::Client::with_uri_str(uri)
            .await
            .expect("MongoDB client");
        self.db = client.database(&self.db_name);
        self.mongo_uri = uri.to_string();
        self
    }

    /// The same topic, dead-letter topic and database under a fresh consumer group (it starts at offset 0).
    pub fn clone_with_new_group(&self) -> TestEnv {
        TestEnv {
            kafka: self.kafka.clone(),
            mongo_uri: self.mongo_uri.clone(),
            topic: self.topic.clone(),
            group: unique("g"),
            dlq: self.dlq.clone(),
            db_name: self.db_name.clone(),
            db: self.db.clone(),
            partitions: self.partitions,
            declared: self.declared.clone(),
        }
    }

    /// Every topic the daemon of this test subscribes to.
    pub fn topics(&self) -> Vec<String> {
        std::iter::once(self.topic.clone())
            .chain(self.declared.iter().map(|(t, _)| t.clone()))
            .collect()
    }

    /// Produces fixture variants as their connectors put them in Kafka: the records of the Event Router's topics
    /// (`*.event.*`) to a topic declared with the format the variant's connector configuration gives
    /// ([`fixture_format`]), one topic per format; every other record (raw change events, logical messages,
    /// transaction metadata, heartbeats) to the test's topic, read under the default format. Returns how many
    /// records were produced.
    pub async fn produce_fixtures(&mut self, variants: &[&str]) -> usize {
        let mut by_topic: Vec<(String, Vec<Rec>)> = vec![(self.topic.clone(), Vec::new())];
        for variant in variants {
            let format = fixture_format(variant);
            for (fixture_topic, rec) in fixture_with_topics(variant) {
                let topic = if fixture_topic.contains(".event.") {
                    let name = format!("{}.{}", self.topic, format.replace('+', "_"));
                    if !self.declared.iter().any(|(t, _)| *t == name) {
                        create_topics(&self.kafka, &[(&name, self.partitions)]).await;
                        self.declared.push((name.clone(), format.clone()));
                    }
                    name
                } else {
                    self.topic.clone()
                };
                match by_topic.iter_mut().find(|(t, _)| *t == topic) {
                    Some((_, recs)) => recs.push(rec),
                    None => by_topic.push((topic, vec![rec])),
                }
            }
        }
        let mut n = 0;
        for (topic, recs) in &by_topic {
            produce(&self.kafka, topic, recs).await;
            n += recs.len();
        }
        n
    }

    /// The daemon's configuration for this test, with overrides.
    pub fn config(&self, overrides: &[(&str, &str)]) -> Config {
        let topics = self.topics().join(",");
        let formats = self
            .declared
            .iter()
            .map(|(t, f)| format!("{t}={f}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut vars: Vec<(String, String)> = vec![
            ("KAFKA_BOOTSTRAP_SERVERS", self.kafka.as_str()),
            ("MONGODB_URI", self.mongo_uri.as_str()),
            ("MONGODB_DATABASE", self.db_name.as_str()),
            ("KAFKA_TOPICS", topics.as_str()),
            ("RECORD_FORMATS", formats.as_str()),
            ("KAFKA_GROUP_ID", self.group.as_str()),
            ("DLQ_TOPIC", self.dlq.as_str()),
            ("HTTP_PORT", "0"),
            ("LOG_FORMAT", "pretty"),
            ("KAFKA_SESSION_TIMEOUT_MS", "10000"),
            ("SHUTDOWN_TIMEOUT_MS", "5000"),
            ("RETRY_INITIAL_BACKOFF_MS", "20"),
            ("RETRY_MAX_BACKOFF_MS", "500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in overrides {
            vars.retain(|(key, _)| key != k);
            vars.push((k.to_string(), v.to_string()));
        }
        Config::from_vars(vars).expect("test config")
    }

    /// Starts the daemon in the background with the shipped handlers.
    pub fn start(&self, overrides: &[(&str, &str)]) -> Daemon {
        let mut registry = Registry::new();
        event_processor::handlers::register_all(&mut registry).unwrap();
        self.start_with(registry, overrides)
    }

    pub fn start_with(&self, registry: Registry, overrides: &[(&str, &str)]) -> Daemon {
        let config = self.config(overrides);
        let token = CancellationToken::new();
        let t = token.clone();
        let handle =
            tokio::spawn(
                async move { event_processor::run_with_registry(config, registry, t).await },
            );
        Daemon { token, handle }
    }

    pub async fn produce(&self, records: &[Rec]) {
        produce(&self.kafka, &self.topic, records).await
    }

    /// Committed offsets of this test's group, per partition (`None`: nothing committed).
    pub fn committed(&self, partitions: i32) -> Vec<Option<i64>> {
        committed(&self.kafka, &self.group, &self.topic, partitions)
    }

    /// Each partition's end offset (`None`: the broker did not answer).
    pub fn end_offsets(&self, partitions: i32) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))
                    .ok()
                    .map(|(_, high)| high)
            })
            .collect()
    }

    pub async fn count(&self, coll: &str, filter: Document) -> u64 {
        self.db
            .collection::<Document>(coll)
            .count_documents(filter)
            .await
            .expect("count_documents")
    }

    pub async fn find_one(&self, coll: &str, filter: Document) -> Option<Document> {
        self.db
            .collection::<Document>(coll)
            .find_one(filter)
            .await
            .expect("find_one")
    }

    /// `user_statistics`' `total_users`, whichever integer width the server stored it in; `None` without a
    /// `totals` document.
    pub async fn total_users(&self) -> Option<i64> {
        let totals = self
            .find_one("user_statistics", doc! { "_id": "totals" })
            .await?;
        totals
            .get("total_users")
            .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
    }

    /// Every document of the shipped read models, sorted, for before/after comparisons.
    pub async fn snapshot(&self) -> Vec<(String, Vec<Document>)> {
        let mut out = Vec::new();
        for coll in ["users", "user_statistics", "activities"] {
            let mut docs: Vec<Document> = Vec::new();
            let mut cur = self
                .db
                .collection::<Document>(coll)
                .find(doc! {})
                .sort(doc! { "_id": 1 })
                .await
                .expect("find");
            while cur.advance().await.expect("cursor") {
                docs.push(cur.deserialize_current().expect("document"));
            }
            out.push((coll.to_string(), docs));
        }
        out
    }

    /// The dead letters written so far.
    pub fn dead_letters(&self, expect_at_least: usize) -> Vec<OwnedMessage> {
        read_all(
            &self.kafka,
            &self.dlq,
            expect_at_least,
            Duration::from_secs(30),
        )
    }
}

pub struct Daemon {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Sends the shutdown signal and waits for `run` to return; it must return `Ok`.
    pub async fn stop(self) {
        self.token.cancel();
        let r = tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("daemon did not stop within 60 s")
            .expect("daemon task panicked");
        r.expect("daemon returned an error");
    }
}

/// A record to produce.
#[derive(Clone, Debug)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
    /// Kafka timestamp (ms); `None`: the time of producing.
    pub timestamp: Option<i64>,
}

impl Rec {
    pub fn new(key: &str, value: &str) -> Self {
        Rec {
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: Vec::new(),
            partition: None,
            timestamp: None,
        }
    }
}

/// The records of one fixture variant captured from the real Debezium (`src/decode/fixtures/<variant>.json`), as
/// captured: key, value, headers and Kafka timestamp.
pub fn fixture(variant: &str) -> Vec<Rec> {
    let path = format!(
        "{}/src/decode/fixtures/{variant}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Rec {
            key: r["key"].as_str().map(|s| s.as_bytes().to_vec()),
            value: r["value"].as_str().map(|s| s.as_bytes().to_vec()),
            headers: r["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            partition: None,
            timestamp: r["timestamp"].as_i64(),
        })
        .collect()
}

/// The records of a fixture variant with the topic each was captured from (`PREFIX.<...>`).
pub fn fixture_with_topics(variant: &str) -> Vec<(String, Rec)> {
    let path = format!(
        "{}/src/decode/fixtures/{variant}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let topics = doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["topic"].as_str().unwrap().to_string());
    topics.zip(fixture(variant)).collect()
}

/// The record format (`RECORD_FORMATS`) of a fixture variant's Event Router topics, from the connector
/// configuration it was captured with (the shipped file its name starts with, plus its overrides), as
/// `event_processor::decode::Format::for_connector` reads a user's connector.
pub fn fixture_format(variant: &str) -> String {
    let file = if variant.starts_with("router") {
        "outbox-router-connector.json"
    } else {
        "postgres-connector.json"
    };
    let read = |path: String| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let shipped = read(format!("{}/debezium/{file}", env!("CARGO_MANIFEST_DIR")));
    let mut config = shipped["config"].as_object().unwrap().clone();
    let captured = read(format!(
        "{}/src/decode/fixtures/{variant}.json",
        env!("CARGO_MANIFEST_DIR")
    ));
    for kv in captured["connector_overrides"].as_array().unwrap() {
        let (k, v) = kv.as_str().unwrap().split_once('=').unwrap();
        config.insert(k.into(), v.into());
    }
    event_processor::decode::Format::for_connector(&config).to_string()
}

/// A raw Debezium change event (JsonConverter, no schemas) for an outbox row, as the shipped connector emits.
pub fn change_event(
    op: &str,
    event_id: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &serde_json::Value,
) -> Rec {
    let row = serde_json::json!({
        "event_id": event_id, "aggregate_id": aggregate_id, "aggregate_type": "test",
        "event_type": event_type, "payload": payload.to_string(), "status": "pending",
        "created_at": "2026-11-26T15:16:01.817235Z",
    });
    let value = serde_json::json!({
        "before": null, "after": row, "op": op, "ts_ms": 1_795_706_161_873i64,
        "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": "postgres"},
        "transaction": null, "ts_us": 1_795_706_161_873_418i64, "ts_ns": 1_795_706_161_873_418_715i64,
    });
    Rec::new(
        &serde_json::json!({"aggregate_id": aggregate_id}).to_string(),
        &value.to_string(),
    )
}

/// `n` UserCreated change events for `n` new users (`<tag><i>@example.com`).
pub fn new_users(n: usize, tag: &str) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let email = format!("{tag}{i}@example.com");
            change_event(
                "c",
                &new_id(),
                &new_id(),
                "UserCreated",
                &serde_json::json!({ "email": email }),
            )
        })
        .collect()
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub async fn create_topics(kafka: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        // Kept regardless of age: fixtures are produced with the timestamps they were captured with, which the
        // broker's time-based retention would otherwise delete at its next check.
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)).set("retention.ms", "-1"))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics");
    for r in res {
        if let Err((t, e)) = r {
            assert_eq!(
                e,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating topic {t}"
            );
        }
    }
}

/// Sets one configuration entry of a topic (e.g. `max.message.bytes`), replacing the topic's other overrides.
pub async fn set_topic_config(kafka: &str, topic: &str, key: &str, value: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .expect("admin client");
    let change = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(topic))
        .set(key, value)
        .set("retention.ms", "-1");
    let res = admin
        .alter_configs(
            &[change],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("alter_configs");
    for r in res {
        r.unwrap_or_else(|(_, e)| panic!("setting {key} of {topic}: {e}"));
    }
}

/// Produces `records` and waits for every acknowledgement. A record not acknowledged within a minute (a producer
/// made while the broker restarts can stay without a usable connection) is sent again by a new producer, up to
/// three times; only those records, so none is written twice unless the broker wrote it and lost the answer.
pub async fn produce(kafka: &str, topic: &str, records: &[Rec]) {
    let mut pending: Vec<&Rec> = records.iter().collect();
    for attempt in 1..=3 {
        let failed = send_all(kafka, topic, &pending).await;
        if failed.is_empty() {
            return;
        }
        let (_, e) = &failed[0];
        assert!(attempt < 3, "produce: {e} ({} records)", failed.len());
        eprintln!(
            "produce: {} of {} records not acknowledged ({e}); sending them again",
            failed.len(),
            pending.len()
        );
        pending = failed.into_iter().map(|(r, _)| r).collect();
    }
}

/// The records of `records` that failed, with their error.
async fn send_all<'r>(
    kafka: &str,
    topic: &str,
    records: &[&'r Rec],
) -> Vec<(&'r Rec, rdkafka::error::KafkaError)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "5")
        .set("message.max.bytes", "10000000")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    let futures: Vec<_> = records
        .iter()
        .map(|r| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(k) = &r.key {
                fr = fr.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                fr = fr.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                fr = fr.partition(p);
            }
            if let Some(t) = r.timestamp {
                fr = fr.timestamp(t);
            }
            producer.send(fr, Duration::from_secs(30))
        })
        .collect();
    let mut failed = Vec::new();
    for (r, f) in records.iter().zip(futures) {
        if let Err((e, _)) = f.await {
            failed.push((*r, e));
        }
    }
    failed
}

fn is_coordinator_starting(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::NotCoordinator | C::CoordinatorLoadInProgress | C::CoordinatorNotAvailable)
    )
}

pub fn committed(kafka: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let out: Vec<Option<i64>> = {
        // Drop the list before the consumer: dropping a consumer while a list it returned is alive hangs.
        // A broker that has just started answers NotCoordinator (or "loading") until its offsets topic is ready.
        let deadline = Instant::now() + Duration::from_secs(60);
        let c = loop {
            match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline && is_coordinator_starting(&e) => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                Err(e) => panic!("committed_offsets: {e:?}"),
            }
        };
        c.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .collect()
    };
    drop(consumer);
    out
}

/// Reads a whole topic from the beginning with a throwaway group.
pub fn read_all(
    kafka: &str,
    topic: &str,
    expect_at_least: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(m.detach());
                quiet_since = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {
                if out.len() >= expect_at_least && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    out
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
}

/// Polls `check` until it returns true; fails the test with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of committed offsets equals `total` (everything produced is finished and committed). Fails when the
/// sum has not moved for `stalled` (a stalled consumer), or after three times that in all (a consumer that
/// crawls); how fast a slow machine applies a backlog is not what these tests check. On failure it names each
/// partition's committed offset and end.
pub async fn wait_committed(env: &TestEnv, partitions: i32, total: i64, stalled: Duration) {
    let started = Instant::now();
    let (mut last_sum, mut last_move) = (i64::MIN, Instant::now());
    loop {
        let (kafka, group, topics) = (env.kafka.clone(), env.group.clone(), env.topics());
        let offsets = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .flat_map(|t| committed(&kafka, &group, t, partitions))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let sum = offsets.iter().map(|o| o.unwrap_or(0)).sum::<i64>();
        if sum >= total {
            return;
        }
        if sum != last_sum {
            (last_sum, last_move) = (sum, Instant::now());
        }
        if last_move.elapsed() >= stalled || started.elapsed() >= stalled * 3 {
            let ends = env.end_offsets(partitions);
            panic!(
                "waiting for committed offsets to reach {total}: unchanged for {:?}, {:?} in all; per partition \
                 (committed, end of {}): {:?}",
                last_move.elapsed(),
                started.elapsed(),
                env.topic,
                offsets.iter().zip(ends).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 client: status and body (`base` as `http://host:port`; a JSON body when given).
pub async fn http_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(hostport)
        .await
        .unwrap_or_else(|e| panic!("connecting to {hostport}: {e}"));
    let body = body.unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nAccept: */*\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The samples of a Prometheus text page: `name{labels}` (as printed) to value.
pub fn samples(page: &str) -> std::collections::HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}
