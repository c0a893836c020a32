//! From an `INSERT` in PostgreSQL, through the shipped Debezium connector configs in Kafka Connect, through
//! Kafka and the daemon, to documents in MongoDB. Each test deploys its own copy of the shipped connector file
//! (own name, topic prefix and replication slot; nothing else changed unless the test says so).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::pipeline::Pipeline;
use common::*;
use event_processor::{EventHandler, HandlerContext, HandlerError, OutboxEvent, Registry};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

async fn wait_for_doc(env: &TestEnv, coll: &str, filter: Document) -> Document {
    wait_until(&format!("{coll} {filter}"), WAIT, || async {
        env.find_one(coll, filter.clone()).await.is_some()
    })
    .await;
    env.find_one(coll, filter).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_sample_insert_makes_the_user_findable_by_email() {
    let env = TestEnv::new("e2e_readme", 1).await;
    let p = Pipeline::deploy("postgres-connector.json", &[("snapshot.mode", "no_data")]).await;
    let daemon = env.start(&[("KAFKA_TOPICS", &p.topics(false))]);
    // The README's sample INSERT, verbatim.
    let row = p
        .pg
        .query_one(
            "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
             VALUES (gen_random_uuid(), gen_random_uuid(), 'user', 'UserCreated', \
             '{\"email\": \"test@example.com\", \"username\": \"testuser\", \"first_name\": \"Test\", \"last_name\": \"User\"}') \
             RETURNING aggregate_id::text",
            &[],
        )
        .await
        .unwrap();
    let user_id: String = row.get(0);
    let user = wait_for_doc(&env, "users", doc! { "_id": &user_id }).await;
    let by_email = env
        .find_one("users", doc! { "email": "test@example.com" })
        .await
        .unwrap();
    assert_eq!(by_email.get_str("_id").unwrap(), user_id);
    assert_eq!(user.get_str("username").unwrap(), "testuser");
    assert_eq!(user.get_str("last_name").unwrap(), "User");
    daemon.stop().await;
    p.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_with_two_participants_counts_two() {
    let env = TestEnv::new("e2e_activity", 1).await;
    let p = Pipeline::deploy("postgres-connector.json", &[("snapshot.mode", "no_data")]).await;
    let daemon = env.start(&[("KAFKA_TOPICS", &p.topics(false))]);
    let activity = new_id();
    let (u1, u2) = (new_id(), new_id());
    p.insert(
        "ActivityCreated",
        &activity,
        "activity",
        &json!({"title": "Ride", "organizer_id": u1, "max_participants": 8}),
    )
    .await;
    p.insert(
        "ParticipantJoined",
        &activity,
        "activity",
        &json!({"user_id": u1}),
    )
    .await;
    p.insert(
        "ParticipantJoined",
        &activity,
        "activity",
        &json!({"user_id": u2}),
    )
    .await;
    let a = wait_for_doc(
        &env,
        "activities",
        doc! { "_id": &activity, "participant_count": 2 },
    )
    .await;
    assert_eq!(a.get_str("title").unwrap(), "Ride");
    let users: Vec<&str> = a
        .get_array("participants")
        .unwrap()
        .iter()
        .map(|p| p.as_document().unwrap().get_str("user_id").unwrap())
        .collect();
    assert_eq!(
        users,
        [u1.as_str(), u2.as_str()],
        "in commit order, once each"
    );
    daemon.stop().await;
    p.remove().await;
}

/// Counts dispatches per event id with a non-idempotent `$inc`, to observe a second dispatch.
struct DispatchCounter;

#[async_trait]
impl EventHandler for DispatchCounter {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "DispatchCounter"
    }
    async fn handle(&self, e: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        ctx.db
            .collection::<Document>("dispatches")
            .update_one(doc! { "_id": &e.event_id }, doc! { "$inc": { "n": 1 } })
            .upsert(true)
            .await
            .map_err(event_processor::handler::classify)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_the_status_column_dispatches_nothing_a_second_time() {
    let env = TestEnv::new("e2e_update", 1).await;
    let p = Pipeline::deploy("postgres-connector.json", &[("snapshot.mode", "no_data")]).await;
    let mut registry = Registry::new();
    event_processor::handlers::register_all(&mut registry).unwrap();
    registry.register(Arc::new(DispatchCounter)).unwrap();
    let daemon = env.start_with(registry, &[("KAFKA_TOPICS", &p.topics(false))]);
    let user = new_id();
    let id = p
        .insert(
            "UserCreated",
            &user,
            "user",
            &json!({"email": "upd@example.com"}),
        )
        .await;
    wait_for_doc(&env, "dispatches", doc! { "_id": &id }).await;
    p.pg.execute(
        "UPDATE activity.event_outbox SET status = 'processed' WHERE event_id = $1::text::uuid",
        &[&id],
    )
    .await
    .unwrap();
    // A later event on the same key: once it is processed, the update before it has been consumed too.
    let sentinel = p
        .insert(
            "UserCreated",
            &user,
            "user",
            &json!({"email": "upd@example.com"}),
        )
        .await;
    wait_for_doc(&env, "dispatches", doc! { "_id": &sentinel }).await;
    let d = env
        .find_one("dispatches", doc! { "_id": &id })
        .await
        .unwrap();
    assert_eq!(
        d.get_i32("n").unwrap(),
        1,
        "the status update dispatched the event again"
    );
    daemon.stop().await;
    p.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_before_the_connector_was_deployed_are_not_lost() {
    let env = TestEnv::new("e2e_snapshot", 1).await;
    let (pg_url, _) = e2e_services();
    let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let user = new_id();
    pg.execute(
        "INSERT INTO activity.event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
         VALUES (gen_random_uuid(), $1::text::uuid, 'user', 'UserCreated', $2::text::jsonb)",
        &[&user, &json!({"email": "early@example.com"}).to_string()],
    )
    .await
    .unwrap();
    // The shipped config as is: snapshot.mode=initial reads existing rows first.
    let p = Pipeline::deploy("postgres-connector.json", &[]).await;
    let daemon = env.start(&[("KAFKA_TOPICS", &p.topics(false))]);
    let u = wait_for_doc(&env, "users", doc! { "_id": &user }).await;
    assert_eq!(u.get_str("email").unwrap(), "early@example.com");
    daemon.stop().await;
    p.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_event_router_variant_gives_the_same_result() {
    let env = TestEnv::new("e2e_router", 1).await;
    let p = Pipeline::deploy(
        "outbox-router-connector.json",
        &[("snapshot.mode", "no_data")],
    )
    .await;
    let daemon = env.start(&[("KAFKA_TOPICS", &p.topics(true))]);
    let (user, activity) = (new_id(), new_id());
    p.insert(
        "UserCreated",
        &user,
        "user",
        &json!({"email": "router@example.com", "username": "r"}),
    )
    .await;
    p.insert(
        "ActivityCreated",
        &activity,
        "activity",
        &json!({"title": "Swim", "organizer_id": user}),
    )
    .await;
    p.insert(
        "ParticipantJoined",
        &activity,
        "activity",
        &json!({"user_id": user}),
    )
    .await;
    let u = wait_for_doc(&env, "users", doc! { "email": "router@example.com" }).await;
    assert_eq!(u.get_str("_id").unwrap(), user);
    let a = wait_for_doc(
        &env,
        "activities",
        doc! { "_id": &activity, "participant_count": 1 },
    )
    .await;
    assert_eq!(a.get_str("title").unwrap(), "Swim");
    // Every connector sees every outbox row, so other tests' sign-ups land here too: ours must be counted once,
    // and the total must agree with the per-bucket counts it is derived from.
    let user_event = u.get_str("last_event_id").unwrap().to_string();
    let bucket = wait_for_doc(
        &env,
        "user_statistics",
        doc! { "kind": "bucket", "event_ids": &user_event },
    )
    .await;
    let ids = bucket.get_array("event_ids").unwrap();
    assert_eq!(
        ids.iter()
            .filter(|i| i.as_str() == Some(user_event.as_str()))
            .count(),
        1
    );
    wait_until(
        "total_users equal to the sum of the buckets",
        WAIT,
        || async {
            let mut sum = 0i64;
            let mut cur = env
                .db
                .collection::<Document>("user_statistics")
                .find(doc! { "kind": "bucket" })
                .await
                .unwrap();
            while cur.advance().await.unwrap() {
                let d = cur.deserialize_current().unwrap();
                sum += d
                    .get_i32("signups")
                    .map(i64::from)
                    .or_else(|_| d.get_i64("signups"))
                    .unwrap_or(0);
            }
            let totals = env
                .find_one("user_statistics", doc! { "_id": "totals" })
                .await;
            totals.and_then(|t| t.get_i64("total_users").ok()) == Some(sum)
        },
    )
    .await;
    assert!(env.dead_letters(0).is_empty());
    daemon.stop().await;
    p.remove().await;
}

/// History the topics no longer hold, replayed from PostgreSQL: the topic's records are deleted (as retention
/// would), a rebuild refuses to start and names the offsets it cannot reach; `snapshot-outbox` writes an
/// `execute-snapshot` row into the shipped signal table, the shipped connector emits the outbox rows again as
/// `op: r` records, and the rebuild then starts and brings the users back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_snapshot_through_the_signal_table_restores_history_retention_removed() {
    let env = TestEnv::new("e2e_snapshot", 1).await;
    let p = Pipeline::deploy("postgres-connector.json", &[("snapshot.mode", "no_data")]).await;
    let topics = p.topics(false);
    let daemon = env.start(&[("KAFKA_TOPICS", &topics)]);
    let mut users = Vec::new();
    for i in 0..3 {
        let user = new_id();
        p.insert(
            "UserCreated",
            &user,
            "user",
            &json!({"email": format!("snap{i}@example.com")}),
        )
        .await;
        users.push(user);
    }
    for u in &users {
        wait_for_doc(&env, "users", doc! { "_id": u }).await;
    }
    daemon.stop().await;

    // Retention removed every record the topic held.
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topics), Duration::from_secs(10))
        .unwrap();
    let mut trim = rdkafka::TopicPartitionList::new();
    for part in metadata.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(&topics, part.id(), Duration::from_secs(10))
            .unwrap();
        trim.add_partition_offset(&topics, part.id(), rdkafka::Offset::Offset(high))
            .unwrap();
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.kafka)
            .create()
            .unwrap();
    admin
        .delete_records(&trim, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete_records");
    let config = env.config(&[("KAFKA_TOPICS", &topics)]);
    let options = event_processor::rebuild::Options {
        handlers: vec!["UserCreatedHandler".into()],
        allow_incomplete_history: false,
    };
    let registry = || {
        let mut r = event_processor::Registry::new();
        event_processor::handlers::register_all(&mut r).unwrap();
        r
    };
    let refused = event_processor::rebuild::run(
        config.clone(),
        registry(),
        options.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("a rebuild over a trimmed topic must not start");
    assert!(
        format!("{refused:#}").contains("history is incomplete"),
        "{refused:#}"
    );

    // The snapshot: requested through the signal table, emitted by the connector as `op: r` records.
    let (pg_url, _) = e2e_services();
    event_processor::rebuild::snapshot_outbox(
        &config,
        &pg_url,
        "activity.debezium_signal",
        "activity.event_outbox",
    )
    .await
    .expect("snapshot-outbox");
    let mut wanted: std::collections::HashSet<String> = users.iter().cloned().collect();
    let c: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("group.id", unique("snapshot_reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topics.as_str()]).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !wanted.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot did not re-emit users {wanted:?}"
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), c.recv()).await else {
            continue;
        };
        let v: Value = rdkafka::Message::payload(&m)
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or(Value::Null);
        if v["op"] == "r"
            && let Some(agg) = v["after"]["aggregate_id"].as_str()
        {
            wanted.remove(agg);
        }
    }

    // Now the rebuild starts and the users are back, from PostgreSQL's rows.
    let done = event_processor::rebuild::run(
        config,
        registry(),
        options,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rebuild after the snapshot")
    .expect("finished");
    let client = mongodb::Client::with_uri_str(&env.mongo_uri).await.unwrap();
    let users_now = client
        .database(&done.database)
        .collection::<Document>("users");
    for u in &users {
        assert!(
            users_now
                .find_one(doc! { "_id": u })
                .await
                .unwrap()
                .is_some(),
            "user {u} rebuilt from the snapshot"
        );
    }
    p.remove().await;
}

/// Records the payload each event reached its handler with, by topic and event id.
struct Recording {
    seen: Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
}

#[async_trait]
impl EventHandler for Recording {
    fn event_type(&self) -> &str {
        "Probe"
    }
    fn name(&self) -> &str {
        "Recording"
    }
    async fn handle(&self, e: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push((
            e.source.topic.clone(),
            e.event_id.clone(),
            e.payload.clone(),
        ));
        Ok(())
    }
}

/// A JSON value as every connector variant of one row agrees on it: object members that are null or empty
/// arrays dropped (the Event Router's expansion drops them, and fills the missing members of an array's objects
/// with null), numbers by value.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|(k, v)| (k.clone(), canonical(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            Some(f) => json!(f),
            None => v.clone(),
        },
        other => other.clone(),
    }
}

/// Payloads generated from Debezium's own field names and words (`op`, `after`, `payload`, `schema`, `id`, ...,
/// at any depth), inserted in PostgreSQL and carried by the real connector three ways at once: raw change events,
/// the Event Router with its payload expanded, and the Event Router with envelope placements (declared
/// `router+envelope`). Each copy reaches the handler with the payload written (the expanded ones as
/// Debezium's expansion leaves it: nulls dropped), and the three copies of a row are one event to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_made_of_debeziums_field_names_reach_the_handlers_as_written() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    let names = prop::sample::select(vec![
        "op",
        "before",
        "after",
        "source",
        "transaction",
        "payload",
        "schema",
        "id",
        "ts_ms",
        "status",
        "event_count",
        "eventType",
        "eventId",
        "createdAt",
        "event_id",
        "event_type",
        "fields",
        "name",
        "type",
    ])
    .prop_map(str::to_string);
    let key = prop_oneof![3 => names, 1 => "[a-z_$.]{0,6}"];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        prop::sample::select(vec!["c", "u", "d", "r", "m", "BEGIN", "END", "struct"])
            .prop_map(|w| json!(w)),
        "[a-zA-Z0-9 ]{0,8}".prop_map(Value::String),
    ];
    // Arrays of one kind of value, of arrays of numbers, or of objects of strings. The expansion infers one schema
    // per array from its first element, and in Debezium 3.6.1 a row whose values then do not fit it (mixed types
    // across an array) kills the connector's task ("Invalid type for STRUCT"), and the nested objects of an
    // array's later objects lose the members the first lacks: Debezium's own limits (docs/RELIABILITY.md), not
    // what this test is about.
    let flat = prop::collection::btree_map(key.clone(), "[a-z]{0,4}".prop_map(Value::String), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    let array = prop_oneof![
        prop::collection::vec("[a-z ]{0,6}".prop_map(Value::String), 0..4),
        prop::collection::vec(any::<i32>().prop_map(|n| json!(n)), 0..4),
        prop::collection::vec(any::<bool>().prop_map(Value::Bool), 0..4),
        prop::collection::vec(flat, 0..3),
        prop::collection::vec(
            prop::collection::vec(any::<i32>().prop_map(|n| json!(n)), 1..3).prop_map(Value::Array),
            0..3
        ),
    ]
    .prop_map(Value::Array);
    let value = prop_oneof![3 => leaf, 1 => array.clone()].prop_recursive(3, 24, 5, {
        let key = key.clone();
        move |inner| {
            prop_oneof![
                array.clone(),
                prop::collection::btree_map(key.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        }
    });
    let payload = prop::collection::btree_map(key, value, 1..7)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let payloads: Vec<Value> = (0..25)
        .map(|_| payload.new_tree(&mut runner).unwrap().current())
        .collect();

    let env = TestEnv::new("e2e_names", 1).await;
    let raw = Pipeline::deploy("postgres-connector.json", &[("snapshot.mode", "no_data")]).await;
    let expand = ("transforms.outbox.table.expand.json.payload", "true");
    let expanded = Pipeline::deploy(
        "outbox-router-connector.json",
        &[("snapshot.mode", "no_data"), expand],
    )
    .await;
    // Envelope placements without expansion: with both, Debezium 3.6 keeps the value schema of the first record it
    // routed, and the first row whose payload expands to another structure (or does not expand) kills the task
    // ("Invalid type for STRUCT"), so arbitrary payloads cannot go through that combination at all.
    let envelope = Pipeline::deploy(
        "outbox-router-connector.json",
        &[
            ("snapshot.mode", "no_data"),
            (
                "transforms.outbox.table.fields.additional.placement",
                "event_type:envelope:eventType,event_id:envelope:eventId,created_at:envelope:createdAt",
            ),
        ],
    )
    .await;
    let topics = [
        raw.topics(false),
        expanded.topics(true),
        envelope.topics(true),
    ]
    .join(",");
    let formats = [
        raw.record_formats(),
        expanded.record_formats(),
        envelope.record_formats(),
    ]
    .into_iter()
    .filter(|f| !f.is_empty())
    .collect::<Vec<_>>()
    .join(",");
    assert!(formats.contains("=router+envelope"), "{formats}");
    let seen: Arc<std::sync::Mutex<Vec<(String, String, Value)>>> = Default::default();
    let mut registry = Registry::new();
    registry
        .register(Arc::new(Recording { seen: seen.clone() }))
        .unwrap();
    let daemon = env.start_with(
        registry,
        &[("KAFKA_TOPICS", &topics), ("RECORD_FORMATS", &formats)],
    );
    let mut written = std::collections::HashMap::new();
    for p in &payloads {
        let id = raw.insert("Probe", &new_id(), "probe", p).await;
        written.insert(id, p.clone());
    }
    let copies = 3 * payloads.len();
    let deadline = std::time::Instant::now() + WAIT;
    while seen.lock().unwrap().len() < copies {
        if std::time::Instant::now() > deadline {
            // Say which copies went where instead: the dead letters with the payload each row was written with.
            let letters: Vec<String> = env
                .dead_letters(1)
                .iter()
                .map(|m| {
                    let id = header(m, "dlq.event.id").unwrap_or_default();
                    let copies: Vec<String> = seen
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(_, i, _)| *i == id)
                        .map(|(t, _, p)| format!("{t}: {p}"))
                        .collect();
                    format!(
                        "{}: {:?}\n  value {}\n  written {}\n  handled copies {copies:?}",
                        header(m, "dlq.original.topic").unwrap_or_default(),
                        header(m, "dlq.error.message"),
                        String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap_or_default()),
                        written.get(&id).map(Value::to_string).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "{} of {copies} copies handled; dead letters:\n{}",
                seen.lock().unwrap().len(),
                letters.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), copies, "{seen:?}");
    for (topic, id, payload) in &seen {
        let wrote = &written[id];
        if topic.ends_with(".activity.event_outbox") {
            assert_eq!(payload, wrote, "raw copy of {id}");
        } else {
            assert_eq!(
                canonical(payload),
                canonical(wrote),
                "{topic}: copy of {id}"
            );
        }
    }
    assert!(
        env.dead_letters(0).is_empty(),
        "a copy was refused (a conflicting duplicate?)"
    );
    for p in [raw, expanded, envelope] {
        p.remove().await;
    }
}
