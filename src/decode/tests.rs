//! The decoder against records captured from the real Debezium 3.6 of the local stack
//! (`scripts/capture-fixtures`), one file per converter/SMT variant, plus hand-made poison records.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use serde_json::{Value, json};

use super::*;

struct Fixture {
    topic: String,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, String)>,
    /// The Kafka timestamp the record had when captured.
    timestamp: Option<i64>,
}

fn load(name: &str) -> Vec<Fixture> {
    let path = format!(
        "{}/src/decode/fixtures/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Fixture {
            topic: r["topic"].as_str().unwrap().replace("PREFIX", "postgres"),
            key: r["key"].as_str().map(str::to_string),
            value: r["value"].as_str().map(str::to_string),
            timestamp: r["timestamp"].as_i64(),
            headers: r["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
        })
        .collect()
}

fn message(
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> OwnedMessage {
    timed_message(topic, key, value, headers, 1_795_706_161_000)
}

fn timed_message(
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, &str)],
    timestamp: i64,
) -> OwnedMessage {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    OwnedMessage::new(
        value.map(<[u8]>::to_vec),
        key.map(<[u8]>::to_vec),
        topic.to_string(),
        Timestamp::CreateTime(timestamp),
        2,
        41,
        Some(h),
    )
}

fn to_message(f: &Fixture) -> OwnedMessage {
    let headers: Vec<(&str, &str)> = f
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    timed_message(
        &f.topic,
        f.key.as_deref().map(str::as_bytes),
        f.value.as_deref().map(str::as_bytes),
        &headers,
        f.timestamp
            .expect("captured fixtures carry their Kafka timestamp"),
    )
}

/// (event id, aggregate id, event type, payload) of an event.
type EventKey = (String, String, String, String);

/// Every event a variant yields, plus its skips and when each event occurred (by event id).
fn decode_variant(name: &str) -> (BTreeSet<EventKey>, Vec<SkipReason>, BTreeMap<String, i64>) {
    let mut events = BTreeSet::new();
    let mut skips = Vec::new();
    let mut occurred = BTreeMap::new();
    for f in load(name) {
        match decode(&to_message(&f)) {
            Ok(Decoded::Event(e)) => {
                assert_eq!(e.source.topic, f.topic);
                assert_eq!((e.source.partition, e.source.offset), (2, 41));
                assert!(
                    e.payload.is_object(),
                    "{name}: payload not an object: {:?}",
                    e.payload
                );
                occurred.insert(e.event_id.clone(), e.occurred_at_ms());
                events.insert((
                    e.event_id,
                    e.aggregate_id,
                    e.event_type,
                    e.payload.to_string(),
                ));
            }
            Ok(Decoded::Skip(r)) => skips.push(r),
            Err(err) => panic!("{name}: {err} for {:?}", f.value),
        }
    }
    (events, skips, occurred)
}

#[test]
fn raw_change_events_dispatch_inserts_and_snapshot_reads_only() {
    let (events, skips, _) = decode_variant("raw_json");
    let types: BTreeSet<_> = events.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        types,
        BTreeSet::from(["ActivityCreated", "ParticipantJoined", "UserCreated"])
    );
    assert_eq!(events.len(), 3);
    for r in [
        SkipReason::Update,
        SkipReason::Delete,
        SkipReason::Tombstone,
        SkipReason::LogicalMessage,
        SkipReason::TransactionMetadata,
        SkipReason::Heartbeat,
    ] {
        assert!(skips.contains(&r), "no {r:?} among {skips:?}");
    }
}

#[test]
fn every_variant_yields_the_same_events_at_the_same_time() {
    let (raw, _, raw_at) = decode_variant("raw_json");
    for variant in [
        "raw_schema",
        "router_json",
        "router_schema",
        "router_string",
        "router_envelope",
        "router_expanded",
    ] {
        let (events, skips, at) = decode_variant(variant);
        assert_eq!(events, raw, "{variant} differs from raw_json");
        // Where the event carries no creation time (the envelope variant), its Kafka timestamp stands in: the
        // time Debezium read the change, seconds after the commit. Day-bucketed read models depend on it.
        for (id, ms) in &at {
            let drift = (ms - raw_at[id]).abs();
            assert!(drift < 60_000, "{variant}: {id} occurred {drift} ms apart");
        }
        assert!(
            skips.contains(&SkipReason::LogicalMessage),
            "{variant}: {skips:?}"
        );
    }
}

#[test]
fn jsonb_payload_is_parsed_twice_and_keeps_nested_values() {
    let f = load("raw_json");
    let activity = f
        .iter()
        .find(|f| {
            f.value
                .as_deref()
                .is_some_and(|v| v.contains("ActivityCreated") && v.contains("\"op\":\"c\""))
        })
        .unwrap();
    let Decoded::Event(e) = decode(&to_message(activity)).unwrap() else {
        panic!("not an event")
    };
    assert_eq!(
        e.payload["location"],
        json!({"city": "Berlin", "lat": 52.52})
    );
    assert_eq!(e.payload["max_participants"], json!(10));
    assert_eq!(e.aggregate_type.as_deref(), Some("activity"));
    let created = e.created_at_ms.unwrap();
    assert!(created > 1_700_000_000_000, "{created}");
}

#[test]
fn router_event_id_and_type_come_from_headers_looked_up_by_name() {
    let f = load("router_json");
    let user = f.iter().find(|f| f.topic.ends_with(".event.user")).unwrap();
    let id = user
        .headers
        .iter()
        .find(|(k, _)| k == "id")
        .unwrap()
        .1
        .clone();
    // Debezium's own context headers come first; shuffle ours to the front to show position does not matter.
    let mut shuffled = Fixture {
        topic: user.topic.clone(),
        key: user.key.clone(),
        value: user.value.clone(),
        headers: user.headers.clone(),
        timestamp: user.timestamp,
    };
    shuffled.headers.reverse();
    for fx in [user, &shuffled] {
        let Decoded::Event(e) = decode(&to_message(fx)).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(e.event_id, id);
        assert_eq!(e.event_type, "UserCreated");
        assert_eq!(e.aggregate_type.as_deref(), Some("user"));
        assert_eq!(e.payload_str("email"), Some("fixture@example.com"));
        assert_eq!(Some(format!("\"{}\"", e.aggregate_id)), user.key);
    }
}

fn decode_err(value: &[u8], headers: &[(&str, &str)]) -> DecodeError {
    decode(&message(
        "postgres.activity.event_outbox",
        Some(b"k"),
        Some(value),
        headers,
    ))
    .unwrap_err()
}

#[test]
fn poison_records_get_a_clear_error() {
    assert!(matches!(
        decode_err(b"\xff\xfe", &[]),
        DecodeError::InvalidUtf8(_)
    ));
    assert!(matches!(
        decode_err(b"not json", &[]),
        DecodeError::NotJson(_)
    ));
    assert_eq!(decode_err(b"[1,2]", &[]).class(), "unknown_shape");
    assert_eq!(
        decode_err(b"{\"hello\":1}", &[]),
        DecodeError::MissingEventType
    );
    assert_eq!(
        decode_err(b"{\"op\":\"x\",\"after\":{}}", &[]),
        DecodeError::UnknownOp("x".into())
    );
    let row = |payload: &str, event_id: &str| {
        json!({"op": "c", "after": {
            "event_id": event_id, "aggregate_id": "a1", "aggregate_type": "user",
            "event_type": "UserCreated", "payload": payload, "created_at": "2026-11-26T15:16:01.817235Z"
        }})
        .to_string()
    };
    let id = "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01";
    assert!(matches!(
        decode_err(row("{oops", id).as_bytes(), &[]),
        DecodeError::PayloadNotJson(_)
    ));
    assert_eq!(
        decode_err(row("{}", "not-a-uuid").as_bytes(), &[]),
        DecodeError::BadField {
            field: "event_id",
            expected: "UUID"
        }
    );
    let missing = json!({"op": "r", "after": {"event_id": id, "payload": "{}"}}).to_string();
    assert_eq!(decode_err(missing.as_bytes(), &[]).class(), "bad_field");
    let typed_wrong = json!({"op": "c", "after": {"event_id": 7}}).to_string();
    assert_eq!(decode_err(typed_wrong.as_bytes(), &[]).class(), "bad_field");
    // A router record without the id header.
    assert_eq!(
        decode_err(b"\"{}\"", &[("eventType", "UserCreated")]),
        DecodeError::MissingEventId
    );
}

#[test]
fn timestamps_with_microseconds_and_large_integers_are_exact() {
    assert_eq!(
        created_at(Some(&json!("2026-11-26T15:16:01.817235Z")), None),
        Ok(Some(1_795_706_161_817))
    );
    // ts_ns exceeds 2^53; it must not pass through f64 anywhere in the decoder.
    let v: Value = serde_json::from_str(r#"{"ts_ns":1795706161873418715}"#).unwrap();
    assert_eq!(v["ts_ns"].as_i64(), Some(1_795_706_161_873_418_715));
}

/// The fast path (bare raw change events) and the general path (the same event schema-wrapped) agree, also on
/// escaped text, absent optional fields and a numeric timestamp (which only the general path reads).
#[test]
fn fast_and_general_paths_give_the_same_event() {
    let rows = [
        json!({"event_id": "6f1c2a8e-2b7c-4d1e-9a55-0c1f0e3d9b21", "aggregate_id": "a\"b", "aggregate_type": "user",
               "event_type": "UserCreated", "payload": "{\"email\":\"\\u00e9@example.com\",\"n\":[1,{\"x\":null}]}",
               "created_at": "2026-11-26T15:16:01.817235Z"}),
        json!({"event_id": "6f1c2a8e-2b7c-4d1e-9a55-0c1f0e3d9b22", "aggregate_id": "b", "event_type": "T",
               "payload": "null", "created_at": null}),
        json!({"event_id": "6f1c2a8e-2b7c-4d1e-9a55-0c1f0e3d9b23", "aggregate_id": "c", "event_type": "T",
               "payload": "{}", "created_at": 1_795_706_161_000i64}),
    ];
    for row in rows {
        let bare =
            json!({"before": null, "after": row, "op": "c", "source": {"name": "x"}}).to_string();
        let wrapped =
            json!({"schema": {"type": "struct"}, "payload": {"after": row, "op": "c"}}).to_string();
        let fast = decode(&message("t", None, Some(bare.as_bytes()), &[])).unwrap();
        let general = decode(&message("t", None, Some(wrapped.as_bytes()), &[])).unwrap();
        match (fast, general) {
            (Decoded::Event(a), Decoded::Event(b)) => assert_eq!(a, b),
            other => panic!("{other:?}"),
        }
    }
    // What the fast path refuses still gets the general path's error.
    let bad = json!({"op": "c", "after": {"event_id": "nope", "aggregate_id": "a", "event_type": "T", "payload": "{}"}});
    assert!(matches!(
        decode(&message("t", None, Some(bad.to_string().as_bytes()), &[])),
        Err(DecodeError::BadField {
            field: "event_id",
            ..
        })
    ));
}

#[test]
fn a_presized_value_reads_as_serde_json_reads_it() {
    for text in [
        r#"{"email":"a@b.c","n":-3,"big":18446744073709551615,"f":1.5e3,"ok":true,"none":null}"#,
        r#"{"nested":{"list":[1,[2,{"x":"\u00e9\n"}],{}],"empty":[]},"dup":1,"dup":2}"#,
        r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"j":10}"#,
        r#"[0.1,-0,"s",false]"#,
        r#""just a string""#,
        "42",
    ] {
        let expected: Value = serde_json::from_str(text).unwrap();
        let Presized(got) = serde_json::from_str(text).unwrap();
        assert_eq!(got, expected, "{text}");
        assert_eq!(got.to_string(), expected.to_string(), "key order of {text}");
    }
    assert!(serde_json::from_str::<Presized>("{\"a\":").is_err());
}
