//! Guarantees against input nobody here wrote, on real Kafka and a real MongoDB-wire server: every Outbox Event
//! Router placement captured from Debezium, hostile records between good ones, conflicting duplicates, undated
//! re-emissions, a statement the server refuses, dead letters that cannot be forged or lost.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use event_processor::{EventHandler, HandlerContext, HandlerError, OutboxEvent, Registry};
use mongodb::bson::{Document, doc};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// Failed attempts per event id, counted around the real handlers.
type Failures = Arc<Mutex<HashMap<String, u32>>>;

struct Counting {
    inner: Arc<dyn EventHandler>,
    failures: Failures,
}

#[async_trait]
impl EventHandler for Counting {
    fn event_type(&self) -> &str {
        self.inner.event_type()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let result = self.inner.handle(event, ctx).await;
        count_failure(&self.failures, event, &result);
        result
    }
}

/// Counts a failed attempt of `event` when `result` is one.
fn count_failure(failures: &Failures, event: &OutboxEvent, result: &Result<(), HandlerError>) {
    if result.is_err() {
        *failures
            .lock()
            .unwrap()
            .entry(event.event_id.clone())
            .or_default() += 1;
    }
}

/// The shipped handlers and contracts, each handler's failures counted.
fn counted_shipped(failures: &Failures) -> Registry {
    let mut r = Registry::new();
    event_processor::handlers::register_all(&mut r).unwrap();
    r.wrap(|inner| {
        Arc::new(Counting {
            inner,
            failures: failures.clone(),
        })
    })
}

/// A raw change event whose `after` row is given whole (fields may be missing or mistyped).
fn raw_row(row: Value) -> Rec {
    let value =
        json!({"before": null, "after": row, "op": "c", "source": {"name": "x"}, "ts_ms": 1});
    Rec::new("\"k\"", &value.to_string())
}

fn user_row(event_id: &str, aggregate_id: &str, payload_text: &str) -> Value {
    json!({"event_id": event_id, "aggregate_id": aggregate_id, "aggregate_type": "user",
           "event_type": "UserCreated", "payload": payload_text, "created_at": "2026-11-30T10:00:00.000001Z"})
}

fn user(event_id: &str, aggregate_id: &str, payload: &Value) -> Rec {
    raw_row(user_row(event_id, aggregate_id, &payload.to_string()))
}

/// A bad input: what it is, its record, the dead-letter class expected (`None`: not dead-lettered), and whether
/// it is a valid sign-up after all (applied like any good one).
struct Bad {
    what: &'static str,
    rec: Rec,
    class: Option<&'static str>,
    event_id: Option<String>,
    valid_signup: bool,
}

fn bad(what: &'static str, rec: Rec, class: Option<&'static str>) -> Bad {
    Bad {
        what,
        rec,
        class,
        event_id: None,
        valid_signup: false,
    }
}

fn nested(depth: usize) -> String {
    format!(
        "{{\"email\":\"deep@example.com\",\"n\":{}1{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

/// Invalid sign-ups of many shapes, drawn from a strategy with a fixed seed: the mix is not chosen by hand.
fn generated_invalid_signups(n: usize) -> Vec<Value> {
    let shape = proptest::prop_oneof![
        proptest::num::i64::ANY.prop_map(|n| json!({"email": n})),
        "[a-z@.]{0,12}".prop_map(|s| json!([{"email": s}])),
        "[a-z@.]{0,12}".prop_map(|s| json!(format!("{{\"email\": \"{s}\"}}"))),
        proptest::strategy::Just(Value::Null),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(|n| json!({"email": "big@example.com", "n": n})),
        "[ \t]{0,3}".prop_map(|s| json!({"email": s})),
        "[a-z]{1,8}".prop_map(|s| json!({"username": s})),
        proptest::bool::ANY.prop_map(|b| json!({"email": b})),
    ];
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| shape.new_tree(&mut runner).unwrap().current())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_between_good_ones_harm_none_of_them() {
    let env = TestEnv::new("hostile", 1).await;
    // A topic that takes a 5 MB record (the broker's own limit is 2 MB); the dead-letter topic keeps it.
    let big_topic_env = env;
    common::set_topic_config(
        &big_topic_env.kafka,
        &big_topic_env.topic,
        "max.message.bytes",
        "8000000",
    )
    .await;
    let env = big_topic_env;

    let first_of_conflict = new_id();
    let conflict_user = new_id();
    let first_email = json!({"email": "first@example.com"});
    let id = "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01";
    let mut bads = vec![
        bad(
            "not JSON",
            Rec::new("k", "not json at all"),
            Some("decode.not_json"),
        ),
        Bad {
            rec: Rec {
                value: Some(vec![0xff, 0xfe, 0x00]),
                headers: vec![
                    ("id".into(), id.into()),
                    ("eventType".into(), "UserCreated".into()),
                ],
                ..Rec::new("k", "")
            },
            event_id: Some(id.into()),
            ..bad(
                "invalid UTF-8",
                Rec::new("k", ""),
                Some("decode.invalid_utf8"),
            )
        },
        bad("empty value", Rec::new("k", ""), Some("decode.not_json")),
        bad(
            "tombstone (no value)",
            Rec {
                value: None,
                ..Rec::new("k", "")
            },
            None,
        ),
        bad(
            "JSON null, no headers",
            Rec::new("k", "null"),
            Some("decode.format_mismatch"),
        ),
        bad(
            "JSON array",
            Rec::new("k", "[1,2]"),
            Some("decode.format_mismatch"),
        ),
        bad(
            "Kafka Connect Struct text",
            Rec::new("k", "Struct{after=Struct{event_id=1},op=c}"),
            Some("decode.unknown_shape"),
        ),
        bad(
            "heartbeat",
            Rec::new("k", "{\"ts_ms\":1795706161873}"),
            None,
        ),
        bad(
            "payload nested 200 deep (beyond the JSON parser's limit)",
            raw_row(user_row(&new_id(), &new_id(), &nested(200))),
            Some("decode.payload_not_json"),
        ),
        bad(
            "payload nested 100 deep",
            raw_row(user_row(&new_id(), &new_id(), &nested(100))),
            Some("invalid_payload"),
        ),
        Bad {
            valid_signup: true,
            ..bad(
                "5 MB valid sign-up",
                user(
                    &new_id(),
                    &new_id(),
                    &json!({"email": "huge@example.com", "bio": "x".repeat(5_000_000)}),
                ),
                None,
            )
        },
        bad(
            "5 MB invalid sign-up (dead letter without its value)",
            user(&new_id(), &new_id(), &json!({"bio": "x".repeat(5_000_000)})),
            Some("invalid_payload"),
        ),
        Bad {
            valid_signup: true,
            ..bad(
                "$-keys and dotted keys",
                user(
                    &new_id(),
                    &new_id(),
                    &json!({"email": "dollar@example.com", "$where": "1", "a.b": 2, "": 3, "_id": "x"}),
                ),
                None,
            )
        },
        Bad {
            valid_signup: true,
            ..bad(
                "a sign-up whose payload holds Debezium's own fields (op u, after, source, schema, payload)",
                user(
                    &new_id(),
                    &new_id(),
                    &json!({"email": "op-u@example.com", "op": "u", "before": null, "after": {"op": "d"},
                            "source": {"db": "x"}, "schema": {"type": "struct"}, "payload": "p", "ts_ms": 1}),
                ),
                None,
            )
        },
        Bad {
            valid_signup: true,
            ..bad(
                "MongoDB Extended JSON in a payload (stored as written, not as a date or a long)",
                user(
                    &new_id(),
                    &new_id(),
                    &json!({"email": "extjson@example.com", "when": {"$date": "not a date"},
                            "n": {"$numberLong": "5"}, "id": {"$oid": "0123456789abcdef01234567"}}),
                ),
                None,
            )
        },
        bad(
            "a NUL character in a nested field name",
            user(
                &new_id(),
                &new_id(),
                &json!({"email": "nul@example.com", "profile": {"a\0b": 1}}),
            ),
            Some("invalid_payload"),
        ),
        bad(
            "missing event id",
            raw_row(
                json!({"aggregate_id": new_id(), "event_type": "UserCreated", "payload": "{}"}),
            ),
            Some("decode.bad_field"),
        ),
        bad(
            "event id not a UUID",
            raw_row(user_row("not-a-uuid", &new_id(), "{\"email\":\"a@b.c\"}")),
            Some("decode.bad_field"),
        ),
        bad(
            "missing aggregate id",
            raw_row(json!({"event_id": new_id(), "event_type": "UserCreated", "payload": "{}"})),
            Some("decode.bad_field"),
        ),
        bad(
            "router record without its id header",
            Rec {
                headers: vec![("eventType".into(), "UserCreated".into())],
                ..Rec::new("\"agg\"", "\"{\\\"email\\\":\\\"a@b.c\\\"}\"")
            },
            Some("decode.format_mismatch"),
        ),
        bad(
            "created_at in year 58873",
            raw_row(
                json!({"event_id": new_id(), "aggregate_id": new_id(), "event_type": "UserCreated",
                           "payload": "{\"email\":\"late@example.com\"}", "created_at": "58873-01-01T00:00:00Z"}),
            ),
            Some("decode.bad_field"),
        ),
        bad(
            "created_at as microseconds read as milliseconds would be year 58873",
            raw_row(
                json!({"event_id": new_id(), "aggregate_id": new_id(), "event_type": "UserCreated",
                           "payload": "{\"email\":\"micro@example.com\"}", "created_at": 1_795_706_161_817_235i64}),
            ),
            None,
        ),
        bad(
            "unknown operation",
            Rec::new("k", &json!({"op": "x", "after": {}}).to_string()),
            Some("decode.unknown_op"),
        ),
        bad(
            "unknown event type",
            raw_row(
                json!({"event_id": new_id(), "aggregate_id": new_id(), "event_type": "NobodyHandles",
                           "payload": "null"}),
            ),
            None,
        ),
        bad(
            "forged dlq.* headers on an undecodable record",
            Rec {
                headers: vec![
                    ("dlq.original.topic".into(), "forged-topic".into()),
                    ("dlq.original.offset".into(), "999999".into()),
                ],
                ..Rec::new("k", "{forged")
            },
            Some("decode.not_json"),
        ),
    ];
    // Valid-looking ids, invalid payloads of generated shapes.
    for payload in generated_invalid_signups(24) {
        let event_id = new_id();
        let text = payload.to_string();
        bads.push(Bad {
            event_id: Some(event_id.clone()),
            ..bad(
                "generated invalid sign-up",
                raw_row(user_row(&event_id, &new_id(), &text)),
                Some("invalid_payload"),
            )
        });
    }
    // Conflicting duplicates of a good event: the same id later with other content, in the same aggregate and in
    // another one. The good first version comes first, as a good record.
    let conflicts = [
        (
            "same event id, other content, same aggregate",
            user(
                &first_of_conflict,
                &conflict_user,
                &json!({"email": "second@example.com"}),
            ),
        ),
        (
            "same event id, other content, other aggregate",
            user(&first_of_conflict, &new_id(), &first_email),
        ),
    ];

    // Three good sign-ups before and after every bad record, all in one partition.
    let mut records = Vec::new();
    let mut good: Vec<String> = Vec::new();
    let mut expect_at: Vec<(usize, usize)> = Vec::new(); // (index in bads, offset)
    let push_good = |records: &mut Vec<Rec>, good: &mut Vec<String>| {
        for _ in 0..3 {
            let (event_id, aggregate) = (new_id(), new_id());
            records.push(user(
                &event_id,
                &aggregate,
                &json!({"email": format!("{aggregate}@example.com")}),
            ));
            good.push(aggregate);
        }
    };
    records.push(user(&first_of_conflict, &conflict_user, &first_email));
    good.push(conflict_user.clone());
    for (i, b) in bads.iter().enumerate() {
        push_good(&mut records, &mut good);
        expect_at.push((i, records.len()));
        records.push(b.rec.clone());
    }
    let mut conflict_offsets = Vec::new();
    for (_, rec) in &conflicts {
        push_good(&mut records, &mut good);
        conflict_offsets.push(records.len());
        records.push(rec.clone());
    }
    push_good(&mut records, &mut good);
    env.produce(&records).await;

    let failures: Failures = Default::default();
    let daemon = env.start_with(
        counted_shipped(&failures),
        &[
            ("HANDLER_MAX_ATTEMPTS", "2"),
            ("PROCESSING_CONCURRENCY", "64"),
        ],
    );
    wait_committed(&env, 1, records.len() as i64, WAIT).await;
    daemon.stop().await;

    // Every good record applied, none charged a failed attempt.
    let failures = failures.lock().unwrap().clone();
    for aggregate in &good {
        assert!(
            env.find_one("users", doc! { "_id": aggregate })
                .await
                .is_some(),
            "good sign-up {aggregate} not applied"
        );
    }
    assert!(failures.is_empty(), "failed attempts: {failures:?}");

    // Each bad input did what its row says.
    let expected_letters = bads.iter().filter(|b| b.class.is_some()).count() + conflicts.len();
    let letters = env.dead_letters(expected_letters);
    let by_offset: HashMap<i64, &rdkafka::message::OwnedMessage> = letters
        .iter()
        .map(|m| {
            (
                header(m, "dlq.original.offset").unwrap().parse().unwrap(),
                m,
            )
        })
        .collect();
    assert_eq!(
        letters.len(),
        expected_letters,
        "one dead letter per refused record"
    );
    let mut table = Vec::new();
    for (i, offset) in &expect_at {
        let b = &bads[*i];
        let letter = by_offset.get(&(*offset as i64));
        let class = letter.map(|m| header(m, "dlq.error.class").unwrap());
        assert_eq!(class.as_deref(), b.class, "{}", b.what);
        if let (Some(m), Some(id)) = (letter, &b.event_id) {
            assert_eq!(
                header(m, "dlq.event.id").as_ref(),
                Some(id),
                "{}: event id",
                b.what
            );
            assert!(
                header(m, "dlq.event.type").is_some(),
                "{}: event type",
                b.what
            );
        }
        if let Some(m) = letter {
            assert_eq!(
                header(m, "dlq.original.topic").as_ref(),
                Some(&env.topic),
                "{}",
                b.what
            );
        }
        table.push(json!({"input": b.what, "dead_letter_class": class,
                          "value_omitted": letter.map(|m| m.payload().is_none())}));
    }
    for (j, offset) in conflict_offsets.iter().enumerate() {
        let m = by_offset[&(*offset as i64)];
        assert_eq!(
            header(m, "dlq.error.class").as_deref(),
            Some("conflicting_duplicate"),
            "{}",
            conflicts[j].0
        );
        assert_eq!(header(m, "dlq.event.id"), Some(first_of_conflict.clone()));
        table.push(json!({"input": conflicts[j].0, "dead_letter_class": "conflicting_duplicate"}));
    }
    // The first version of the conflicting event stands, in its aggregate and nowhere else.
    let first = env
        .find_one("users", doc! { "_id": &conflict_user })
        .await
        .unwrap();
    assert_eq!(first.get_str("email").unwrap(), "first@example.com");
    assert_eq!(
        env.count("users", doc! { "last_event_id": &first_of_conflict })
            .await,
        1
    );

    // The read models agree with each other: every counted sign-up has its user document.
    let valid_bad = bads.iter().filter(|b| b.valid_signup).count() as i64;
    let users = env.count("users", doc! {}).await as i64;
    // The microseconds case is a valid sign-up too.
    assert_eq!(users, good.len() as i64 + valid_bad + 1);
    assert_eq!(env.total_users().await, Some(users));
    let micro = env
        .find_one("users", doc! { "email": "micro@example.com" })
        .await
        .unwrap();
    let at = micro.get_datetime("created_at").unwrap().timestamp_millis();
    assert_eq!(at, 1_795_706_161_817, "microseconds read as such");

    let summary =
        json!({"good_records": good.len(), "good_with_failed_attempts": 0, "inputs": table});
    let dir = format!("{}/target/hostile", env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        format!("{dir}/table.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
}

/// Writes a statement the server refuses (two operators on one path) for the one event marked `poison`, and a
/// normal document for every other: the statements share commands.
struct ConflictWriter {
    failures: Failures,
}

#[async_trait]
impl EventHandler for ConflictWriter {
    fn event_type(&self) -> &str {
        "UserCreated"
    }
    fn name(&self) -> &str {
        "ConflictWriter"
    }
    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let at = mongodb::bson::DateTime::from_millis(1_795_706_161_817);
        let mut update = doc! { "$set": { "at": at, "event_id": &event.event_id } };
        if event.payload.get("poison").is_some() {
            // Two operators on one path: MongoDB refuses the statement ("would create a conflict").
            update.insert("$inc", doc! { "at": 1 });
        }
        let result = event_processor::handler::guarded_upsert(
            ctx,
            "dates",
            doc! { "_id": &event.aggregate_id },
            update,
        )
        .await;
        count_failure(&self.failures, event, &result);
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_the_server_refuses_is_charged_to_its_record_alone() {
    let env = TestEnv::new("refused", 1).await;
    let mut records = new_users(31, "before");
    let poison = new_id();
    records.push(change_event(
        "c",
        &poison,
        &new_id(),
        "UserCreated",
        &json!({"email": "p@x.y", "poison": true}),
    ));
    records.extend(new_users(31, "after"));
    env.produce(&records).await;
    let failures: Failures = Default::default();
    let mut registry = Registry::new();
    registry
        .register(Arc::new(ConflictWriter {
            failures: failures.clone(),
        }))
        .unwrap();
    // Everything is in the topic before the daemon starts: the statements of a poll go out together.
    let daemon = env.start_with(registry, &[("HANDLER_MAX_ATTEMPTS", "2")]);
    wait_committed(&env, 1, records.len() as i64, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        env.count("dates", doc! {}).await,
        62,
        "every good statement applied"
    );
    let failures = failures.lock().unwrap().clone();
    assert_eq!(
        failures.keys().collect::<Vec<_>>(),
        [&poison],
        "only the culprit failed: {failures:?}"
    );
    assert_eq!(failures[&poison], 2);
    let letters = env.dead_letters(1);
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "dlq.event.id"), Some(poison));
    assert_eq!(
        header(&letters[0], "dlq.error.class").as_deref(),
        Some("handler.permanent")
    );
}

/// The user id of the captured run the `fxcap` variants share.
fn captured_user() -> (String, String) {
    for r in fixture("raw_ts6_json") {
        let Some(v) = r.value else { continue };
        let v: Value = serde_json::from_slice(&v).unwrap();
        if v["after"]["event_type"] == "UserCreated" {
            return (
                v["after"]["aggregate_id"].as_str().unwrap().to_string(),
                v["after"]["event_id"].as_str().unwrap().to_string(),
            );
        }
    }
    panic!("no UserCreated in raw_ts6_json")
}

/// Every placement, converter and column type captured from the real Debezium in one run, each variant's Event
/// Router topics declared with the format its connector configuration gives: one document per row, whichever
/// variants carried it. One of the rows is a sign-up whose payload holds Debezium's own field names (`op: "u"`,
/// `after`, `schema`, `payload`, ...) and null members (which the Event Router's expansion drops): it is applied,
/// and its copies through the other variants are the same event (one fingerprint), not conflicting duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_placement_and_column_type_makes_the_same_documents() {
    let mut env = TestEnv::new("placements", 6).await;
    let variants = [
        "raw_ts6_json",
        "raw_json",
        "raw_schema",
        "router_json",
        "router_schema",
        "router_string",
        "router_envelope",
        "router_expanded",
        "router_envelope_header",
        "router_envelope_created",
        "router_envelope_schema",
        "router_type_header_only",
        "router_null_payload",
        "router_null_tombstone",
        "raw_null_payload",
        "raw_ts6_schema",
        "raw_ts3_schema",
        "raw_ts6_connect",
        "router_ts6_envelope",
        "router_ts6_header",
    ];
    let produced = env.produce_fixtures(&variants).await;
    let failures: Failures = Default::default();
    let daemon = env.start_with(counted_shipped(&failures), &[("HANDLER_MAX_ATTEMPTS", "1")]);
    wait_committed(&env, 6, produced as i64, WAIT).await;
    daemon.stop().await;
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );

    let (user_id, user_event) = captured_user();
    let user = env
        .find_one("users", doc! { "_id": &user_id })
        .await
        .expect("user document");
    assert_eq!(user.get_str("email").unwrap(), "fixture@example.com");
    for placed in ["payload", "eventType", "eventId", "createdAt"] {
        assert!(
            !user.contains_key(placed),
            "{placed} stored as a payload field: {user:?}"
        );
    }
    // The row's creation time, read in its own unit by every variant (December 2026, not year 58873).
    let created = user.get_datetime("created_at").unwrap().timestamp_millis();
    let captured_at = fixture("raw_ts6_json")
        .iter()
        .filter_map(|r| r.timestamp)
        .max()
        .unwrap();
    assert!(
        (captured_at - created).abs() < 300_000,
        "created_at {created}, captured {captured_at}"
    );
    // The sign-up whose payload holds Debezium's field names: applied from every variant, its fields as the
    // application wrote them.
    let envelope = env
        .find_one("users", doc! { "email": "envelope@example.com" })
        .await
        .expect("the sign-up whose payload says op: u");
    assert_eq!(envelope.get_str("op").unwrap(), "u");
    assert_eq!(envelope.get_document("after").unwrap(), &doc! { "op": "d" });
    assert_eq!(envelope.get_str("payload").unwrap(), "text");
    assert_eq!(
        env.count("users", doc! {}).await,
        2,
        "one user per row, however many variants carried it"
    );
    assert_eq!(env.total_users().await, Some(2));
    let activity = env
        .find_one("activities", doc! { "title": "Morning run" })
        .await
        .expect("activity");
    assert_eq!(activity.get_i32("participant_count").unwrap(), 1);

    // The events without payload: the sign-up is refused by its type's contract and dead-lettered, naming the
    // event; the type nobody handles is skipped. The tombstone variant dead-letters nothing, and no copy of a row
    // through another variant is a conflicting duplicate.
    let letters = env.dead_letters(2);
    let classes: Vec<Option<String>> = letters
        .iter()
        .map(|m| header(m, "dlq.error.class"))
        .collect();
    assert_eq!(
        letters.len(),
        2,
        "the two null-payload sign-ups (router, raw), nothing else: {classes:?}"
    );
    for m in &letters {
        assert_eq!(
            header(m, "dlq.error.class").as_deref(),
            Some("invalid_payload")
        );
        assert_eq!(header(m, "dlq.event.type").as_deref(), Some("UserCreated"));
        let id = header(m, "dlq.event.id").expect("event id on the letter");
        assert_ne!(id, user_event);
    }
}

/// A copy of an event re-emitted with a later creation time (a re-snapshot of an updated row, a replay by the
/// application), raw or through the Event Router, dated or not: the first time the ledger recorded stands, the
/// user's `created_at` does not move and the sign-up is counted once, on its first day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reemitted_event_with_a_later_creation_time_changes_nothing() {
    let env = TestEnv::new("redated", 2).await;
    let (event_id, user_id) = (new_id(), new_id());
    let payload = json!({"email": "redated@example.com"});
    let raw = |op: &str, created: &str| {
        let row = json!({"event_id": event_id, "aggregate_id": user_id, "aggregate_type": "user",
                         "event_type": "UserCreated", "payload": payload.to_string(), "created_at": created});
        Rec::new(
            &json!({"aggregate_id": user_id}).to_string(),
            &json!({"before": null, "after": row, "op": op, "source": {"name": "x"}}).to_string(),
        )
    };
    let routed = |created: Option<&str>| {
        let mut headers = vec![
            ("id".to_string(), event_id.clone()),
            ("eventType".to_string(), "UserCreated".to_string()),
        ];
        if let Some(c) = created {
            headers.push(("createdAt".to_string(), c.to_string()));
        }
        Rec {
            headers,
            ..Rec::new(
                &json!(user_id).to_string(),
                &json!(payload.to_string()).to_string(),
            )
        }
    };
    env.produce(&[raw("c", "2026-11-20T10:00:00.000001Z")])
        .await;
    let daemon = env.start(&[]);
    wait_committed(&env, 2, 1, WAIT).await;
    let before = env.snapshot().await;
    // Later copies: a snapshot read of the row re-dated two days on, the same through the Event Router five days
    // on, and an undated Event Router copy.
    env.produce(&[
        raw("r", "2026-11-22T10:00:00.000001Z"),
        routed(Some("2026-11-25T10:00:00.000001Z")),
        routed(None),
    ])
    .await;
    wait_committed(&env, 2, 4, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        before,
        env.snapshot().await,
        "a re-dated copy moved the read models"
    );
    let user = env
        .find_one("users", doc! { "_id": &user_id })
        .await
        .expect("user");
    assert_eq!(
        user.get_datetime("created_at")
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap(),
        "2026-11-20T10:00:00Z"
    );
    assert_eq!(env.total_users().await, Some(1));
    for (day, n) in [("2026-11-20", 1), ("2026-11-22", 0), ("2026-11-25", 0)] {
        let daily = env
            .find_one("user_statistics", doc! { "_id": format!("daily:{day}") })
            .await;
        let signups = daily.and_then(|d| {
            d.get_i64("signups")
                .ok()
                .or(d.get_i32("signups").ok().map(i64::from))
        });
        assert_eq!(signups.unwrap_or(0), n, "sign-ups on {day}");
    }
    assert!(env.dead_letters(0).is_empty(), "no copy is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reemitted_event_without_creation_time_changes_nothing() {
    let env = TestEnv::new("reemit", 6).await;
    // An Event Router deployment that places the event type only: its records carry no creation time.
    // The first copies two days before the re-emission (the broker refuses timestamps far in the future).
    let two_days = 2 * 24 * 3_600_000;
    let first: Vec<Rec> = fixture("router_type_header_only")
        .into_iter()
        .map(|r| Rec {
            timestamp: r.timestamp.map(|t| t - two_days),
            ..r
        })
        .collect();
    env.produce(&first).await;
    let daemon = env.start(&[]);
    wait_committed(&env, 6, first.len() as i64, WAIT).await;
    let before = env.snapshot().await;
    // Debezium emits the same rows again (a connector restart, a snapshot) two days later.
    let again: Vec<Rec> = first
        .iter()
        .map(|r| Rec {
            timestamp: r.timestamp.map(|t| t + two_days),
            ..r.clone()
        })
        .collect();
    env.produce(&again).await;
    wait_committed(&env, 6, 2 * first.len() as i64, WAIT).await;
    daemon.stop().await;
    let after = env.snapshot().await;
    assert_eq!(before, after, "a re-emission moved the read models");
    assert_eq!(env.total_users().await, Some(2));
    // The event's time is its first copy's Kafka timestamp.
    let (user_id, _) = captured_user();
    let user: Document = env
        .find_one("users", doc! { "_id": &user_id })
        .await
        .unwrap();
    let at = user.get_datetime("created_at").unwrap().timestamp_millis();
    let first_ts: Vec<i64> = first.iter().filter_map(|r| r.timestamp).collect();
    assert!(
        first_ts.contains(&at),
        "created_at {at} is not a first-copy timestamp {first_ts:?}"
    );
}

/// Fails permanently while `broken` is set; records the source of every event it applies.
struct Fixable {
    broken: Arc<std::sync::atomic::AtomicBool>,
    applied: Arc<Mutex<Vec<(String, String, i64)>>>,
}

#[async_trait]
impl EventHandler for Fixable {
    fn event_type(&self) -> &str {
        "Big"
    }
    fn name(&self) -> &str {
        "Fixable"
    }
    async fn handle(&self, event: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HandlerError::invalid("not fixed yet"));
        }
        self.applied.lock().unwrap().push((
            event.event_id.clone(),
            event.source.topic.clone(),
            event.source.offset,
        ));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refetches_omitted_values_reports_lost_ones_and_ignores_forged_origins() {
    let env = TestEnv::new("replay_big", 1).await;
    set_topic_config(&env.kafka, &env.topic, "max.message.bytes", "8000000").await;
    let big = |id: &str| {
        change_event(
            "c",
            id,
            &new_id(),
            "Big",
            &json!({"blob": "x".repeat(3_000_000)}),
        )
    };
    let (lost, kept, forged) = (new_id(), new_id(), new_id());
    let mut forged_rec = change_event("c", &forged, &new_id(), "Big", &json!({"small": true}));
    forged_rec.headers = vec![
        ("dlq.original.topic".into(), "forged-topic".into()),
        ("dlq.original.offset".into(), "999999".into()),
        ("dlq.handler".into(), "NoSuchHandler".into()),
    ];
    // Offsets 0, 1, 2: the first will be deleted from the topic before the replay.
    env.produce(&[big(&lost), big(&kept), forged_rec]).await;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let applied: Arc<Mutex<Vec<(String, String, i64)>>> = Default::default();
    let registry = || {
        let mut r = Registry::new();
        r.register(Arc::new(Fixable {
            broken: broken.clone(),
            applied: applied.clone(),
        }))
        .unwrap();
        r
    };
    let daemon = env.start_with(registry(), &[("HANDLER_MAX_ATTEMPTS", "1")]);
    wait_committed(&env, 1, 3, WAIT).await;
    daemon.stop().await;
    let mut letters = env.dead_letters(3);
    assert_eq!(letters.len(), 3);
    letters.sort_by_key(|m| {
        header(m, "dlq.original.offset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    });
    for m in &letters[..2] {
        assert!(m.payload().is_none(), "a 3 MB value fits no dead letter");
        assert!(header(m, "dlq.value.omitted").is_some());
    }
    // The record's own dlq.* headers are kept under another name; ours are the only dlq.* ones.
    let forged_letter = &letters[2];
    let dlq_names: Vec<&str> = forged_letter
        .headers()
        .unwrap()
        .iter()
        .map(|h| h.key)
        .filter(|k| k.starts_with("dlq."))
        .collect();
    assert_eq!(
        dlq_names
            .iter()
            .filter(|k| **k == "dlq.original.topic")
            .count(),
        1
    );
    assert_eq!(
        header(forged_letter, "dlq.original.topic").as_ref(),
        Some(&env.topic)
    );
    assert_eq!(
        header(forged_letter, "original.dlq.original.topic").as_deref(),
        Some("forged-topic")
    );
    let rebuilt = event_processor::replay::original_record(forged_letter).unwrap();
    assert_eq!((rebuilt.topic(), rebuilt.offset()), (env.topic.as_str(), 2));
    assert_eq!(
        header(&rebuilt, "dlq.original.topic").as_deref(),
        Some("forged-topic")
    );

    // The topic's retention has taken the first record.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.kafka)
            .create()
            .unwrap();
    let mut upto = rdkafka::TopicPartitionList::new();
    upto.add_partition_offset(&env.topic, 0, rdkafka::Offset::Offset(1))
        .unwrap();
    admin
        .delete_records(&upto, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete_records");

    // Where the replay group must stop: at the letter of the deleted record.
    let lost_letter = letters[0].offset();
    let held_at = if lost_letter == 0 {
        None
    } else {
        Some(lost_letter)
    };
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    for run in 1..=2 {
        let stats = event_processor::replay::replay_dead_letters(
            env.config(&[]),
            registry(),
            None,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("replay");
        assert_eq!(stats.not_replayable, 1, "run {run}: {stats:?}");
        // The first run replays both others; a later one those after the held letter again (idempotently).
        let expected = if run == 1 {
            2
        } else {
            2 - lost_letter as usize
        };
        assert_eq!(stats.replayed, expected, "run {run}: {stats:?}");
        // Held at the letter it could not replay: the next run reports it again.
        let group = format!("{}.dlq-replay.all", env.group);
        let committed = committed(&env.kafka, &group, &env.dlq, 1);
        assert_eq!(committed, [held_at], "run {run}");
    }
    let applied = applied.lock().unwrap().clone();
    assert!(
        applied.contains(&(kept.clone(), env.topic.clone(), 1)),
        "{applied:?}"
    );
    assert!(
        applied.contains(&(forged.clone(), env.topic.clone(), 2)),
        "{applied:?}"
    );
    assert!(!applied.iter().any(|(id, _, _)| *id == lost), "{applied:?}");
}

/// Field names and values generated with the ones MongoDB refuses or treats specially among them (a NUL
/// character, `$`-prefixed, dotted, empty, `_id`, a name of too many dotted words, Extended JSON), in sign-ups that
/// are otherwise valid, through the shipped handlers on the real server: every handler of an event gets the same
/// verdict. Refused (by the documented rules, an oracle written here) is one `invalid_payload` dead letter, no
/// user and no count; accepted is a user whose fields are the payload's as written and a count, with no failed
/// attempt anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_of_an_event_gets_one_verdict_on_its_field_names() {
    use proptest::prelude::*;
    let long_dotted = vec!["w"; 300].join(".");
    let key = prop_oneof![
        4 => "[a-z]{1,6}",
        2 => "\\$[a-z]{0,5}",
        2 => "[a-z]{1,3}\\.[a-z]{1,3}",
        1 => Just(String::new()),
        1 => Just("_id".to_string()),
        1 => Just("extra_fields".to_string()),
        1 => "[a-z]{0,2}\u{0}[a-z]{0,2}",
        1 => Just(long_dotted.clone()),
        1 => "\\PC{1,4}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        "[a-z\u{0}]{0,6}".prop_map(Value::String),
        Just(json!({"$date": "not a date"})),
        Just(json!({"$numberLong": "5"})),
    ];
    let value = leaf.prop_recursive(3, 16, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    let top_key = prop_oneof![
        4 => "[a-z]{1,6}",
        2 => "\\$[a-z]{0,5}",
        2 => "[a-z]{1,3}\\.[a-z]{1,3}",
        1 => Just(String::new()),
        1 => Just("_id".to_string()),
        1 => Just("extra_fields".to_string()),
        1 => "[a-z]{0,2}\u{0}[a-z]{0,2}",
    ];
    let fields = prop::collection::vec((top_key, value), 1..5);
    let mut runner = TestRunner::deterministic();
    let n = 40;
    let payloads: Vec<Value> = (0..n)
        .map(|i| {
            let mut obj = serde_json::Map::new();
            for (k, v) in fields.new_tree(&mut runner).unwrap().current() {
                if k != "email" {
                    obj.insert(k, v);
                }
            }
            obj.insert("email".into(), json!(format!("gen{i}@example.com")));
            Value::Object(obj)
        })
        .collect();

    /// The documented rules, independently of the daemon: a NUL in any field name, or a name of more than 254
    /// dotted words, cannot be stored.
    fn refused(v: &Value) -> bool {
        match v {
            Value::Object(m) => m
                .iter()
                .any(|(k, v)| k.contains('\0') || k.split('.').count() > 254 || refused(v)),
            Value::Array(items) => items.iter().any(refused),
            _ => false,
        }
    }
    /// A JSON value as the application wrote it, in BSON.
    fn as_written(v: &Value) -> mongodb::bson::Bson {
        use mongodb::bson::Bson;
        match v {
            Value::Null => Bson::Null,
            Value::Bool(b) => Bson::Boolean(*b),
            Value::Number(n) => n
                .as_i64()
                .map_or_else(|| Bson::Double(n.as_f64().unwrap()), Bson::Int64),
            Value::String(s) => Bson::String(s.clone()),
            Value::Array(items) => Bson::Array(items.iter().map(as_written).collect()),
            Value::Object(m) => {
                let mut d = Document::new();
                for (k, v) in m {
                    d.insert(k.clone(), as_written(v));
                }
                Bson::Document(d)
            }
        }
    }

    let env = TestEnv::new("verdicts", 3).await;
    let events: Vec<(String, String, &Value)> =
        payloads.iter().map(|p| (new_id(), new_id(), p)).collect();
    let records: Vec<Rec> = events.iter().map(|(e, a, p)| user(e, a, p)).collect();
    env.produce(&records).await;
    let failures: Failures = Default::default();
    let daemon = env.start_with(counted_shipped(&failures), &[("HANDLER_MAX_ATTEMPTS", "2")]);
    wait_committed(&env, 3, records.len() as i64, WAIT).await;
    daemon.stop().await;
    assert!(
        failures.lock().unwrap().is_empty(),
        "a handler failed where the verdict should have been made for all: {:?}",
        failures.lock().unwrap()
    );
    let expected_refusals = payloads.iter().filter(|p| refused(p)).count();
    assert!(
        expected_refusals > 0 && expected_refusals < n,
        "the generated mix holds both verdicts ({expected_refusals} of {n} refused)"
    );
    let letters = env.dead_letters(expected_refusals);
    let refused_ids: Vec<String> = letters
        .iter()
        .inspect(|m| {
            assert_eq!(
                header(m, "dlq.error.class").as_deref(),
                Some("invalid_payload")
            )
        })
        .filter_map(|m| header(m, "dlq.event.id"))
        .collect();
    let mut accepted = 0;
    for (event_id, user_id, payload) in &events {
        // Read as the raw BSON stored: deserializing into a `Document` would read `{"$numberLong": ...}` as a long.
        let doc = env
            .db
            .collection::<mongodb::bson::RawDocumentBuf>("users")
            .find_one(doc! { "_id": user_id })
            .await
            .unwrap()
            .map(|raw| raw.to_document().unwrap());
        if refused(payload) {
            assert!(refused_ids.contains(event_id), "{payload} not refused");
            assert!(doc.is_none(), "{payload} refused yet stored");
            continue;
        }
        accepted += 1;
        assert!(!refused_ids.contains(event_id), "{payload} refused");
        let doc = doc.unwrap_or_else(|| panic!("{payload} accepted but not stored"));
        let awkward = |k: &str| k.is_empty() || k.starts_with('$') || k.contains('.') || k == "_id";
        let object = payload.as_object().unwrap();
        // Names that cannot be update paths are kept as values, with the payload's own `extra_fields` beside them.
        let any_awkward = object.keys().any(|k| awkward(k));
        let extra = doc.get_array("extra_fields").ok();
        for (k, v) in object {
            let kept = match extra {
                Some(list) if awkward(k) || (any_awkward && k == "extra_fields") => list
                    .iter()
                    .filter_map(|e| e.as_document())
                    .find(|e| e.get_str("key") == Ok(k.as_str()))
                    .and_then(|e| e.get("value").cloned()),
                _ => doc.get(k).cloned(),
            };
            assert_eq!(kept, Some(as_written(v)), "field {k:?} of {payload}");
        }
    }
    assert_eq!(env.total_users().await, Some(accepted));
    assert_eq!(letters.len(), expected_refusals);
}
