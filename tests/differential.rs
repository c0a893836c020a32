//! The same stream of events applied by the daemon against two MongoDB-wire servers, `secantusd-rs` (the
//! stack's) and `secantusd-py` (`DIFFERENTIAL_MONGODB_URI`), must give the same read models document by document.
//! A difference is a bug in one of the servers or in what the daemon assumes of MongoDB (docs/RELIABILITY.md,
//! "Two servers, one result").
//!
//! Run by `scripts/test` (which starts the second server with `scripts/stack start mongo-py`); not a default test
//! target: it needs both servers.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{Document, RawDocumentBuf, doc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

/// The second server, or a failure that says how to provide one.
fn second_server() -> String {
    std::env::var("DIFFERENTIAL_MONGODB_URI").unwrap_or_else(|_| {
        panic!(
            "the differential check needs a second MongoDB-wire server: `scripts/stack start mongo-py` and \
             DIFFERENTIAL_MONGODB_URI=mongodb://127.0.0.1:$STACK_MONGO_PY_PORT (scripts/test does both)"
        )
    })
}

/// A raw change event of an outbox row with a given creation time.
fn row(event_id: &str, aggregate: &str, event_type: &str, payload: &Value, created: &str) -> Rec {
    let row = json!({"event_id": event_id, "aggregate_id": aggregate, "aggregate_type": "x",
                     "event_type": event_type, "payload": payload.to_string(), "created_at": created});
    Rec::new(
        &json!({"aggregate_id": aggregate}).to_string(),
        &json!({"before": null, "after": row, "op": "c", "source": {"name": "d"}}).to_string(),
    )
}

/// Generated events of the shipped types over a few aggregates (so that one aggregate gets several events, joins
/// come before their activity and after it), with payloads holding awkward names and values, creation times over
/// three days, conflicting duplicates, and every record delivered twice in different orders.
fn generated(n: usize) -> Vec<Rec> {
    let users: Vec<String> = (0..12).map(|_| new_id()).collect();
    let activities: Vec<String> = (0..6).map(|_| new_id()).collect();
    let key = prop_oneof![
        4 => "[a-z]{1,6}",
        1 => "\\$[a-z]{1,4}",
        1 => "[a-z]{1,3}\\.[a-z]{1,3}",
        1 => Just("_id".to_string()),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-zA-Z0-9 ]{0,8}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(2, 8, 3, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let extra = prop::collection::btree_map(key, value, 0..4);
    let mut runner = TestRunner::deterministic();
    let mut pick = |range: usize| -> usize {
        (0..range)
            .new_tree(&mut runner)
            .map(|t| t.current())
            .unwrap_or(0)
    };
    let mut extras = TestRunner::deterministic();
    let mut records = Vec::new();
    for i in 0..n {
        let mut payload: serde_json::Map<String, Value> = extra
            .new_tree(&mut extras)
            .unwrap()
            .current()
            .into_iter()
            .collect();
        let day = 1 + pick(3);
        let created = format!(
            "2026-11-{:02}T{:02}:{:02}:00.{:06}Z",
            day,
            pick(24),
            pick(60),
            pick(999_999)
        );
        let (event_type, aggregate) = match pick(3) {
            0 => {
                payload.insert("email".into(), json!(format!("u{i}@example.com")));
                ("UserCreated", users[pick(users.len())].clone())
            }
            1 => {
                payload.insert("title".into(), json!(format!("activity {i}")));
                payload.insert("organizer_id".into(), json!(users[pick(users.len())]));
                (
                    "ActivityCreated",
                    activities[pick(activities.len())].clone(),
                )
            }
            _ => {
                payload.insert("user_id".into(), json!(users[pick(users.len())]));
                if pick(2) == 0 {
                    payload.insert("joined_at".into(), json!(created));
                }
                (
                    "ParticipantJoined",
                    activities[pick(activities.len())].clone(),
                )
            }
        };
        let event_id = new_id();
        let payload = Value::Object(payload);
        records.push(row(&event_id, &aggregate, event_type, &payload, &created));
        // Every tenth event again with other content: a conflicting duplicate.
        if i % 10 == 9 {
            let mut other = payload.clone();
            other["conflict"] = json!(true);
            records.push(row(&event_id, &aggregate, event_type, &other, &created));
        }
    }
    // Delivered again, the second time in reverse order.
    let again: Vec<Rec> = records.iter().rev().cloned().collect();
    records.extend(again);
    records
}

/// Every document of a collection, sorted by `_id`, as stored (raw BSON read without Extended JSON's reading).
async fn documents(db: &mongodb::Database, coll: &str) -> Vec<Document> {
    let mut cur = db
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .expect("find");
    let mut out = Vec::new();
    while cur.advance().await.expect("cursor") {
        let raw = cur.deserialize_current().expect("document");
        out.push(raw.to_document().expect("document"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_events_make_the_same_read_models_on_both_servers() {
    let second = second_server();
    let mut env = TestEnv::new("differential", 3).await;
    // The captured variants that date their events (an undated copy takes the time of whichever copy the ledger
    // took in first, which depends on the order two topics are read in, not on the server).
    let fixtures = env
        .produce_fixtures(&[
            "raw_json",
            "raw_schema",
            "router_json",
            "router_schema",
            "router_string",
            "router_expanded",
            "router_envelope_header",
            "router_envelope_schema",
            "raw_null_payload",
            "raw_ts6_json",
            "raw_ts3_schema",
        ])
        .await;
    let events = generated(300);
    env.produce(&events).await;
    let total = (fixtures + events.len()) as i64;

    let other = env.clone_with_new_group();
    let first = env.start(&[]);
    let second_daemon = other.start(&[("MONGODB_URI", second.as_str())]);
    wait_committed(&env, 3, total, WAIT).await;
    wait_committed(&other, 3, total, WAIT).await;
    first.stop().await;
    second_daemon.stop().await;

    let client = mongodb::Client::with_uri_str(&second)
        .await
        .expect("second server");
    let theirs = client.database(&env.db_name);
    let mut compared = 0;
    for coll in ["users", "activities", "user_statistics", "event_ledger"] {
        let (a, b) = (
            documents(&env.db, coll).await,
            documents(&theirs, coll).await,
        );
        assert!(!a.is_empty(), "{coll}: nothing written");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "{coll}: the two servers differ");
        }
        assert_eq!(a.len(), b.len(), "{coll}: document counts differ");
        compared += a.len();
    }
    println!("differential: {total} records, {compared} documents identical on both servers");
}
