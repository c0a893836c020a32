//! The daemon against real Kafka and a real MongoDB-wire server: records in, documents and committed offsets
//! out.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use event_processor::{EventHandler, HandlerContext, HandlerError, OutboxEvent, Registry};
use mongodb::bson::doc;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

/// Variants captured from the real Debezium in `src/decode/fixtures`, produced as captured (the envelope
/// variant's only event time is its Kafka timestamp).
const FIXTURE_VARIANTS: &[&str] = &[
    "raw_json",
    "raw_schema",
    "router_json",
    "router_schema",
    "router_string",
    "router_envelope",
    "router_expanded",
];

fn fixture_ids() -> (String, String, String) {
    // The three events every fixture variant carries: a user, an activity, and the user joining it.
    let path = format!(
        "{}/src/decode/fixtures/router_json.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let recs = doc["records"].as_array().unwrap();
    // The fixture user (the other user's sign-up carries Debezium's field names, see scripts/capture-fixtures).
    let key = |topic_suffix: &str| {
        let r = recs
            .iter()
            .find(|r| {
                r["topic"].as_str().unwrap().ends_with(topic_suffix)
                    && !r["value"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("envelope@")
            })
            .unwrap();
        r["key"].as_str().unwrap().trim_matches('"').to_string()
    };
    let activity = key(".event.activity");
    let user = key(".event.user");
    let participant = recs
        .iter()
        .find_map(|r| {
            let v: serde_json::Value = serde_json::from_str(r["value"].as_str()?).ok()?;
            let p: serde_json::Value = serde_json::from_str(v.as_str()?).ok()?;
            p.get("user_id")?.as_str().map(str::to_string)
        })
        .unwrap();
    (user, activity, participant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_shape_lands_once_in_mongodb() {
    let mut env = TestEnv::new("shapes", 3).await;
    let produced = env.produce_fixtures(FIXTURE_VARIANTS).await;
    let daemon = env.start(&[]);
    wait_committed(&env, 3, produced as i64, WAIT).await;
    daemon.stop().await;

    // Seven variants delivered the same four events; each landed exactly once.
    let (user, activity, participant) = fixture_ids();
    let u = env
        .find_one("users", doc! { "email": "fixture@example.com" })
        .await
        .expect("user");
    assert_eq!(u.get_str("_id").unwrap(), user);
    assert_eq!(u.get_str("first_name").unwrap(), "Fix");
    assert_eq!(env.count("users", doc! {}).await, 2);
    let a = env
        .find_one("activities", doc! { "_id": &activity })
        .await
        .expect("activity");
    assert_eq!(a.get_str("title").unwrap(), "Morning run");
    assert_eq!(a.get_i32("participant_count").unwrap(), 1);
    let parts = a.get_array("participants").unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(
        parts[0].as_document().unwrap().get_str("user_id").unwrap(),
        participant
    );
    let totals = env
        .find_one("user_statistics", doc! { "_id": "totals" })
        .await
        .unwrap();
    assert_eq!(totals.get_i64("total_users").unwrap(), 2);
    assert!(
        env.dead_letters(0).is_empty(),
        "no fixture shape may be dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_records_change_nothing() {
    let env = TestEnv::new("redeliver", 2).await;
    let mut records = Vec::new();
    let activity = new_id();
    records.push(change_event(
        "c",
        &new_id(),
        &activity,
        "ActivityCreated",
        &json!({"title": "Climb", "organizer_id": new_id(), "max_participants": 4}),
    ));
    for i in 0..20 {
        let user = new_id();
        records.push(change_event(
            "c",
            &new_id(),
            &user,
            "UserCreated",
            &json!({"email": format!("u{i}@example.com"), "username": format!("u{i}")}),
        ));
        if i % 4 == 0 {
            records.push(change_event(
                "c",
                &new_id(),
                &activity,
                "ParticipantJoined",
                &json!({"user_id": user}),
            ));
        }
    }
    env.produce(&records).await;
    let daemon = env.start(&[]);
    wait_committed(&env, 2, records.len() as i64, WAIT).await;
    let before = env.snapshot().await;

    // The same records again (Kafka's at-least-once, a connector restart), and a snapshot re-read (op=r).
    env.produce(&records).await;
    let reread: Vec<Rec> = records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let v = String::from_utf8(r.value.unwrap())
                .unwrap()
                .replace("\"op\":\"c\"", "\"op\":\"r\"");
            r.value = Some(v.into_bytes());
            r
        })
        .collect();
    env.produce(&reread).await;
    wait_committed(&env, 2, 3 * records.len() as i64, WAIT).await;
    daemon.stop().await;

    let after = env.snapshot().await;
    assert_eq!(before, after, "redelivery changed documents");

    // Replaying the whole topic from offset 0 (a new group) leaves every collection exactly as it was.
    let replay = env.clone_with_new_group();
    let daemon = replay.start(&[]);
    wait_committed(&replay, 2, 3 * records.len() as i64, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        before,
        env.snapshot().await,
        "replay from offset 0 changed documents"
    );
    let a = env
        .find_one("activities", doc! { "_id": &activity })
        .await
        .unwrap();
    assert_eq!(a.get_i32("participant_count").unwrap(), 5);
    let totals = env
        .find_one("user_statistics", doc! { "_id": "totals" })
        .await
        .unwrap();
    assert_eq!(totals.get_i64("total_users").unwrap(), 20);
}

struct AlwaysFails;

#[async_trait]
impl EventHandler for AlwaysFails {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "AlwaysFails"
    }
    async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        Err(HandlerError::invalid("this handler rejects everything"))
    }
}

struct Panics(AtomicU32);

#[async_trait]
impl EventHandler for Panics {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "Panics"
    }
    async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("a bug in a handler");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_does_not_stop_its_sibling_and_is_dead_lettered() {
    let env = TestEnv::new("isolation", 1).await;
    let user = new_id();
    let event_id = new_id();
    env.produce(&[change_event(
        "c",
        &event_id,
        &user,
        "UserCreated",
        &json!({"email": "iso@example.com"}),
    )])
    .await;
    let mut registry = Registry::new();
    event_processor::handlers::register_all(&mut registry).unwrap();
    registry.register(Arc::new(AlwaysFails)).unwrap();
    let panics = Arc::new(Panics(AtomicU32::new(0)));
    registry.register(panics.clone()).unwrap();
    let daemon = env.start_with(registry, &[("HANDLER_MAX_ATTEMPTS", "2")]);
    wait_committed(&env, 1, 1, WAIT).await;
    daemon.stop().await;

    assert!(
        env.find_one("users", doc! { "_id": &user }).await.is_some(),
        "sibling handler ran"
    );
    assert_eq!(panics.0.load(Ordering::SeqCst), 2);
    let letters = env.dead_letters(2);
    assert_eq!(letters.len(), 2, "one dead letter per failed handler");
    let mut by_handler: Vec<(String, String)> = letters
        .iter()
        .map(|m| {
            (
                header(m, "dlq.handler").unwrap(),
                header(m, "dlq.error.class").unwrap(),
            )
        })
        .collect();
    by_handler.sort();
    assert_eq!(
        by_handler,
        [
            ("AlwaysFails".to_string(), "handler.permanent".to_string()),
            ("Panics".to_string(), "handler.panic".to_string()),
        ]
    );
    for m in &letters {
        assert_eq!(
            header(m, "dlq.original.topic").as_deref(),
            Some(env.topic.as_str())
        );
        assert_eq!(header(m, "dlq.original.partition").as_deref(), Some("0"));
        assert_eq!(header(m, "dlq.original.offset").as_deref(), Some("0"));
        assert_eq!(header(m, "dlq.attempts").as_deref(), Some("2"));
        assert_eq!(
            header(m, "dlq.event.id").as_deref(),
            Some(event_id.as_str())
        );
        assert_eq!(
            header(m, "dlq.consumer.group").as_deref(),
            Some(env.group.as_str())
        );
        assert!(header(m, "dlq.original.timestamp").is_some_and(|t| t.parse::<i64>().is_ok()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offset_read_back_from_the_broker_is_last_plus_one() {
    let env = TestEnv::new("offsets", 1).await;
    let records = new_users(25, "o");
    env.produce(&records).await;
    assert_eq!(env.committed(1), [None]);
    let daemon = env.start(&[
        ("PROCESSING_BATCH_SIZE", "10"),
        ("KAFKA_MAX_POLL_RECORDS", "10"),
    ]);
    wait_committed(&env, 1, 25, WAIT).await;
    daemon.stop().await;
    // Offsets 0..=24 were processed: Kafka must hold 25, the next offset to read, not 24.
    assert_eq!(env.committed(1), [Some(25)]);
    assert_eq!(env.count("users", doc! {}).await, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_partition_keeps_moving() {
    let env = TestEnv::new("poison", 1).await;
    // A record over a broker's default 1 MB limit: the topics take 2 MiB whatever the broker's default.
    for topic in [&env.topic, &env.dlq] {
        set_topic_config(&env.kafka, topic, "max.message.bytes", "2097152").await;
    }
    let ok_user = new_id();
    let mut big = change_event(
        "c",
        &new_id(),
        &new_id(),
        "UserCreated",
        &json!({"email": "big@example.com"}),
    );
    big.value = Some(format!("{{\"junk\":\"{}\"}}", "x".repeat(1_100_000)).into_bytes());
    let records = vec![
        Rec::new("k", "not json at all"),
        Rec::new("k", "{\"hello\":\"world\"}"),
        Rec {
            value: Some(vec![0xff, 0xfe, 0x00]),
            ..Rec::new("k", "")
        },
        change_event(
            "c",
            "not-a-uuid",
            &new_id(),
            "UserCreated",
            &json!({"email": "x@example.com"}),
        ),
        Rec::new(
            "k",
            &json!({"op": "c", "after": {"event_id": new_id(), "aggregate_id": "a",
            "event_type": "UserCreated", "payload": "{not json"}})
            .to_string(),
        ),
        change_event(
            "c",
            &new_id(),
            &new_id(),
            "UserCreated",
            &json!({"username": "no email"}),
        ),
        change_event(
            "c",
            &new_id(),
            &new_id(),
            "SomethingNobodyHandles",
            &json!({}),
        ),
        big,
        Rec {
            value: None,
            ..Rec::new("k", "")
        },
        change_event(
            "c",
            &new_id(),
            &ok_user,
            "UserCreated",
            &json!({"email": "after-poison@example.com"}),
        ),
    ];
    env.produce(&records).await;
    let daemon = env.start(&[("HANDLER_MAX_ATTEMPTS", "1")]);
    wait_committed(&env, 1, records.len() as i64, WAIT).await;
    daemon.stop().await;

    assert!(
        env.find_one("users", doc! { "_id": &ok_user })
            .await
            .is_some(),
        "record after the poison processed"
    );
    let letters = env.dead_letters(7);
    let mut classes: Vec<String> = letters
        .iter()
        .map(|m| header(m, "dlq.error.class").unwrap())
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            "decode.bad_field",
            "decode.format_mismatch",
            "decode.format_mismatch",
            "decode.invalid_utf8",
            "decode.not_json",
            "decode.payload_not_json",
            "invalid_payload",
        ]
    );
    // Unknown event type and tombstone: skipped, not dead-lettered; everything else accounted for.
    let offsets: Vec<i64> = letters
        .iter()
        .map(|m| header(m, "dlq.original.offset").unwrap().parse().unwrap())
        .collect();
    assert!(
        offsets.contains(&7),
        "the 1 MiB record is dead-lettered too: {offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_commits_what_was_finished_and_restart_redoes_nothing_twice() {
    let env = TestEnv::new("shutdown", 3).await;
    let n = 600;
    let records = new_users(n, "s");
    env.produce(&records).await;
    let daemon = env.start(&[
        ("PROCESSING_BATCH_SIZE", "20"),
        ("KAFKA_MAX_POLL_RECORDS", "20"),
    ]);
    wait_until("some users written", WAIT, || async {
        env.count("users", doc! {}).await >= 60
    })
    .await;
    daemon.stop().await;

    let committed: i64 = env.committed(3).iter().map(|o| o.unwrap_or(0)).sum();
    let written = env.count("users", doc! {}).await as i64;
    assert!(committed > 0, "nothing committed on shutdown");
    assert!(
        committed <= written,
        "committed {committed} records but only {written} were written"
    );

    let daemon = env.start(&[]);
    wait_committed(&env, 3, n as i64, WAIT).await;
    daemon.stop().await;
    assert_eq!(env.count("users", doc! {}).await, n as u64);
    let totals = env
        .find_one("user_statistics", doc! { "_id": "totals" })
        .await
        .unwrap();
    assert_eq!(
        totals.get_i64("total_users").unwrap(),
        n as i64,
        "no sign-up counted twice"
    );
}

/// Succeeds and counts its calls; registered under a chosen name.
struct Counting(&'static str, Arc<AtomicU32>);

#[async_trait]
impl EventHandler for Counting {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        self.0
    }
    async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_dead_letters_reruns_only_the_failed_handler() {
    let env = TestEnv::new("replay", 1).await;
    let user = new_id();
    env.produce(&[change_event(
        "c",
        &new_id(),
        &user,
        "UserCreated",
        &json!({"email": "replay@example.com"}),
    )])
    .await;
    let sibling = Arc::new(AtomicU32::new(0));
    let mut registry = Registry::new();
    registry.register(Arc::new(AlwaysFails)).unwrap();
    registry
        .register(Arc::new(Counting("Sibling", sibling.clone())))
        .unwrap();
    let daemon = env.start_with(registry, &[("HANDLER_MAX_ATTEMPTS", "1")]);
    wait_committed(&env, 1, 1, WAIT).await;
    daemon.stop().await;
    assert_eq!(env.dead_letters(1).len(), 1);
    assert_eq!(sibling.load(Ordering::SeqCst), 1);

    // The cause is fixed: the handler of that name now succeeds.
    let fixed = Arc::new(AtomicU32::new(0));
    let replay_registry = || {
        let mut r = Registry::new();
        r.register(Arc::new(Counting("AlwaysFails", fixed.clone())))
            .unwrap();
        r.register(Arc::new(Counting("Sibling", sibling.clone())))
            .unwrap();
        r
    };
    let stats = event_processor::replay::replay_dead_letters(
        env.config(&[]),
        replay_registry(),
        Some("AlwaysFails".into()),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(stats.replayed, 1);
    assert_eq!(
        fixed.load(Ordering::SeqCst),
        1,
        "the failed handler ran again"
    );
    assert_eq!(
        sibling.load(Ordering::SeqCst),
        1,
        "its sibling did not run twice"
    );

    // Progress is committed: a second replay finds nothing left.
    let again = event_processor::replay::replay_dead_letters(
        env.config(&[]),
        replay_registry(),
        Some("AlwaysFails".into()),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(again.replayed, 0);
    assert_eq!(fixed.load(Ordering::SeqCst), 1);
}

/// A handler that writes nothing and declares no index.
struct Quiet;

#[async_trait]
impl EventHandler for Quiet {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "Quiet"
    }
    async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        Ok(())
    }
}

async fn index_names(env: &TestEnv, coll: &str) -> Vec<String> {
    let names = env
        .db
        .collection::<mongodb::bson::Document>(coll)
        .list_index_names()
        .await
        .unwrap_or_default();
    names.into_iter().filter(|n| n != "_id_").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_registered_handlers_indexes_are_created() {
    let env = TestEnv::new("indexes", 1).await;
    env.produce(&new_users(3, "idx")).await;
    let mut registry = Registry::new();
    registry.register(Arc::new(Quiet)).unwrap();
    let daemon = env.start_with(registry, &[]);
    wait_committed(&env, 1, 3, WAIT).await;
    daemon.stop().await;
    for coll in ["users", "activities", "user_statistics"] {
        assert_eq!(
            index_names(&env, coll).await,
            Vec::<String>::new(),
            "{coll}"
        );
    }
    // The shipped handlers bring theirs.
    let shipped = env.clone_with_new_group();
    let daemon = shipped.start(&[]);
    wait_committed(&shipped, 1, 3, WAIT).await;
    daemon.stop().await;
    assert_eq!(index_names(&env, "users").await, ["email_1"]);
    assert_eq!(index_names(&env, "activities").await, ["organizer_id_1"]);
    assert_eq!(
        index_names(&env, "user_statistics").await,
        ["kind_1_date_1"]
    );
}

/// Three replicas' statistics handlers (each with its own recount state) counting sign-ups of two days at once
/// on one database: every sign-up is counted once, in its day and in the total, however their recounts interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replicas_recounts_count_every_sign_up_once() {
    use event_processor::event::KafkaCoordinates;
    use event_processor::handlers::UserStatisticsHandler;

    let env = TestEnv::new("recount", 1).await;
    let replicas: Vec<(Arc<UserStatisticsHandler>, Arc<HandlerContext>)> = (0..3)
        .map(|_| {
            (
                Arc::new(UserStatisticsHandler::default()),
                Arc::new(HandlerContext::new(env.db.clone())),
            )
        })
        .collect();
    // 2026-11-26 and 2026-11-27, noon UTC.
    let days = [1_795_694_400_000i64, 1_795_780_800_000];
    let n = 150;
    let events: Vec<OutboxEvent> = (0..n)
        .map(|i| OutboxEvent {
            event_id: new_id(),
            aggregate_id: new_id(),
            aggregate_type: Some("user".into()),
            event_type: "UserCreated".into(),
            payload: json!({ "email": format!("r{i}@example.com") }),
            created_at_ms: Some(days[i % 2]),
            source: KafkaCoordinates {
                topic: env.topic.clone(),
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
            },
        })
        .collect();
    // Every event once, and a third of them a second time (a redelivery to another replica).
    let deliveries = events.iter().chain(events.iter().step_by(3));
    let tasks: Vec<_> = deliveries
        .enumerate()
        .map(|(i, e)| {
            let (h, ctx) = replicas[i % replicas.len()].clone();
            let e = e.clone();
            tokio::spawn(async move { h.handle(&e, &ctx).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("handler task").expect("handled");
    }
    let stats = env
        .db
        .collection::<mongodb::bson::Document>("user_statistics");
    let totals = stats
        .find_one(doc! { "_id": "totals" })
        .await
        .unwrap()
        .expect("totals");
    assert_eq!(totals.get_i64("total_users").unwrap(), n as i64);
    for day in ["2026-11-26", "2026-11-27"] {
        let daily = stats
            .find_one(doc! { "_id": format!("daily:{day}") })
            .await
            .unwrap()
            .expect("daily document");
        assert_eq!(daily.get_i64("signups").unwrap(), (n / 2) as i64, "{day}");
        let days = totals.get_document("days").unwrap();
        assert_eq!(days.get_i64(day).unwrap(), (n / 2) as i64, "{day}");
    }
}

/// The writer coalesces: under many concurrent statements across collections, every one is answered and applied,
/// statements share commands, and one refused statement costs its neighbours nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_answers_every_statement_of_concurrent_writers_across_collections() {
    let services = services().await;
    let updates = Arc::new(AtomicU32::new(0));
    let mut options = mongodb::options::ClientOptions::parse(&services.mongo)
        .await
        .unwrap();
    let counter = updates.clone();
    options.command_event_handler = Some(mongodb::event::EventHandler::callback(move |e| {
        if let mongodb::event::command::CommandEvent::Started(s) = e
            && s.command_name == "update"
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let client = mongodb::Client::with_options(options).unwrap();
    let db = client.database(&unique("writer"));
    let writer = event_processor::writer::Writer::start(db.clone());
    let collections = ["a", "b", "c", "d"];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..100 {
        let writer = writer.clone();
        tasks.spawn(async move {
            let mut results = Vec::new();
            for i in 0..12 {
                let collection = collections[(task + i) % collections.len()];
                // One statement the server must refuse: `$inc` of a string field.
                let update = if task == 42 && i == 7 {
                    doc! { "$inc": { "s": 1 } }
                } else {
                    doc! { "$set": { "task": task as i64, "i": i as i64 } }
                };
                let id = format!("{task}-{i}");
                if task == 42 && i == 7 {
                    // Make the document the refused statement targets hold a string.
                    writer
                        .update_one(
                            collection,
                            doc! { "_id": &id },
                            doc! { "$set": { "s": "x" } },
                            true,
                        )
                        .await
                        .unwrap();
                }
                let result = writer
                    .update_one(collection, doc! { "_id": &id }, update, true)
                    .await;
                results.push((id, result.is_ok()));
            }
            results
        });
    }
    let mut answered = 0;
    while let Some(results) = tokio::time::timeout(WAIT, tasks.join_next())
        .await
        .expect("every statement answered")
    {
        for (id, ok) in results.unwrap() {
            answered += 1;
            assert_eq!(ok, id != "42-7", "statement {id}");
        }
    }
    assert_eq!(answered, 1200);
    let commands = updates.load(Ordering::Relaxed);
    assert!(
        commands < 600,
        "1,201 statements in {commands} update commands: they should share commands"
    );
    let mut stored = 0;
    for c in collections {
        stored += db
            .collection::<mongodb::bson::Document>(c)
            .count_documents(doc! { "task": { "$exists": true } })
            .await
            .unwrap();
    }
    assert_eq!(stored, 1199, "every accepted statement applied");
    let _ = db.drop().await;
}
