//! The decoder against records captured from the real Debezium 3.6 of the local stack
//! (`scripts/capture-fixtures`), one file per converter/SMT variant, plus hand-made poison records.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use serde_json::{Map, Value, json};

use super::json::{Presized, field_schema_name};
use super::time::created_at;
use super::*;

struct Fixture {
    topic: String,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, String)>,
    /// The Kafka timestamp the record had when captured.
    timestamp: Option<i64>,
}

/// The connector configuration a variant was captured with: the shipped file its name starts with, and the
/// variant's overrides on top (as `scripts/capture-fixtures` deploys it).
fn connector(name: &str) -> Map<String, Value> {
    let file = if name.starts_with("router") {
        "outbox-router-connector.json"
    } else {
        "postgres-connector.json"
    };
    let path = format!("{}/debezium/{file}", env!("CARGO_MANIFEST_DIR"));
    let shipped: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut config = shipped["config"].as_object().unwrap().clone();
    let path = format!(
        "{}/src/decode/fixtures/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for kv in doc["connector_overrides"].as_array().unwrap() {
        let (k, v) = kv.as_str().unwrap().split_once('=').unwrap();
        config.insert(k.to_string(), Value::String(v.to_string()));
    }
    config
}

/// `RECORD_FORMATS` as a user of the variant's connector writes it: the Event Router's topics declared with the
/// format its configuration gives (`Format::for_connector`); the connector's other topics (logical messages,
/// transaction metadata, heartbeats, raw change events) left to the default.
fn formats(name: &str) -> Formats {
    match Format::for_connector(&connector(name)) {
        Format::ChangeEvent => Formats::default(),
        router => Formats::parse(&format!(r"^postgres\.event\..*={router}")).unwrap(),
    }
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

/// (event id, aggregate id, event type, fingerprint) of an event: the fingerprint is the event ledger's, over the
/// canonical form of the payload that every connector variant of one row maps to (`ledger::fingerprint`).
type EventKey = (String, String, String, String);

/// Every event a variant yields, plus its skips and when each event occurred (by event id).
fn decode_variant(name: &str) -> (BTreeSet<EventKey>, Vec<SkipReason>, BTreeMap<String, i64>) {
    let mut events = BTreeSet::new();
    let mut skips = Vec::new();
    let mut occurred = BTreeMap::new();
    let formats = formats(name);
    for f in load(name) {
        match decode(&to_message(&f), formats.of(&f.topic)) {
            Ok(Decoded::Event(e)) => {
                assert_eq!(e.source.topic, f.topic);
                assert_eq!((e.source.partition, e.source.offset), (2, 41));
                assert!(
                    e.payload.is_object(),
                    "{name}: payload not an object: {:?}",
                    e.payload
                );
                occurred.insert(e.event_id.clone(), e.occurred_at_ms());
                let fp = crate::ledger::fingerprint(&e);
                events.insert((e.event_id, e.aggregate_id, e.event_type, fp));
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
    assert_eq!(events.len(), 4);
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
    let Decoded::Event(e) = decode(&to_message(activity), Format::Debezium).unwrap() else {
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
    let user = f
        .iter()
        .find(|f| {
            f.topic.ends_with(".event.user")
                && f.value
                    .as_deref()
                    .is_some_and(|v| v.contains("fixture@example.com"))
        })
        .unwrap();
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
        let Decoded::Event(e) = decode(&to_message(fx), Format::Debezium).unwrap() else {
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
    decode(
        &message(
            "postgres.activity.event_outbox",
            Some(b"k"),
            Some(value),
            headers,
        ),
        Format::Debezium,
    )
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
    assert_eq!(decode_err(b"[1,2]", &[]).class(), "format_mismatch");
    assert_eq!(decode_err(b"{\"hello\":1}", &[]).class(), "format_mismatch");
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
    // Router output without the router's `id` header is not router output: under the default it is read as a raw
    // change event, which it is not either.
    assert_eq!(
        decode_err(b"\"{}\"", &[("eventType", "UserCreated")]).class(),
        "format_mismatch"
    );
    // With the header, a router record that names no type says how to place it.
    assert_eq!(
        decode_err(b"\"{}\"", &[("id", id)]),
        DecodeError::MissingEventType
    );
}

/// A record that is not what its topic's declared format says is an error that names the declared format and
/// what the record is, from what Debezium controls (the `id` header) and the value's top level.
#[test]
fn a_record_that_does_not_match_its_declared_format_names_both() {
    let id = "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01";
    let raw =
        json!({"before": null, "after": {"event_id": id, "aggregate_id": "a", "event_type": "T",
                     "payload": "{}"}, "op": "c", "source": {}})
        .to_string();
    let routed = [("id", id), ("eventType", "T")];
    /// Value, headers, the declared format, what the error must say the record is.
    type Case<'a> = (&'a [u8], &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 5] = [
        // A raw change event on a router topic.
        (
            raw.as_bytes(),
            &[],
            "router",
            "without the Event Router's `id` header",
        ),
        // Router output on a change-event topic.
        (
            b"\"{}\"",
            &routed,
            "change-event",
            "with the Event Router's `id` header whose value is a string",
        ),
        // Envelope declared, the payload alone arrived.
        (b"\"{}\"", &routed, "router+envelope", "a string"),
        // Schemas declared, no wrapper arrived.
        (
            b"{\"a\":1}",
            &routed,
            "router+schemas",
            "an object with fields [a]",
        ),
        (
            b"{\"payload\":\"{}\"}",
            &routed,
            "router+envelope+schemas",
            "[payload]",
        ),
    ];
    for (value, headers, declared, observed) in cases {
        let m = message("t", Some(b"\"k\""), Some(value), headers);
        let err = decode(&m, declared.parse().unwrap()).unwrap_err();
        let DecodeError::FormatMismatch {
            declared: d,
            observed: o,
        } = &err
        else {
            panic!("{declared}: {err}")
        };
        assert_eq!(d, declared);
        assert!(o.contains(observed), "{declared}: {o}");
        assert!(err.to_string().contains("RECORD_FORMATS"), "{err}");
    }
}

/// Both shipped connector configurations read under the default, without declaring anything: the same events as
/// with their formats declared.
#[test]
fn the_default_format_reads_both_shipped_configurations() {
    for variant in [
        "raw_json",
        "router_json",
        "raw_schema",
        "router_type_header_only",
    ] {
        let declared = decode_variant(variant);
        let mut events = BTreeSet::new();
        for f in load(variant) {
            if let Decoded::Event(e) = decode(&to_message(&f), Format::Debezium).unwrap() {
                let fp = crate::ledger::fingerprint(&e);
                events.insert((e.event_id, e.aggregate_id, e.event_type, fp));
            }
        }
        assert_eq!(events, declared.0, "{variant}");
    }
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
        let fast = decode(
            &message("t", None, Some(bare.as_bytes()), &[]),
            Format::ChangeEvent,
        )
        .unwrap();
        let general = decode(
            &message("t", None, Some(wrapped.as_bytes()), &[]),
            Format::Debezium,
        )
        .unwrap();
        match (fast, general) {
            (Decoded::Event(a), Decoded::Event(b)) => assert_eq!(a, b),
            other => panic!("{other:?}"),
        }
    }
    // What the fast path refuses still gets the general path's error.
    let bad = json!({"op": "c", "after": {"event_id": "nope", "aggregate_id": "a", "event_type": "T", "payload": "{}"}});
    assert!(matches!(
        decode(
            &message("t", None, Some(bad.to_string().as_bytes()), &[]),
            Format::ChangeEvent
        ),
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

/// The variants captured in one run from the shipped table and from tables of other column types (see
/// `scripts/capture-fixtures`): the Event Router's documented placements (envelope and header together, the
/// creation time in the envelope, schema-wrapped, a type header alone), a nullable payload, and `created_at` as
/// `timestamp` / `timestamp(3)` under both `time.precision.mode`s. Their events are those of `raw_ts6_json`.
const SAME_RUN: &[&str] = &[
    "router_envelope_header",
    "router_envelope_created",
    "router_envelope_schema",
    "router_type_header_only",
    "router_null_payload",
    "raw_null_payload",
    "raw_ts6_schema",
    "raw_ts3_schema",
    "raw_ts6_connect",
    "router_ts6_envelope",
    "router_ts6_header",
];

/// Variants whose records carry no creation time at all.
const UNDATED: &[&str] = &["router_type_header_only", "router_null_payload"];

#[test]
fn every_documented_placement_and_column_type_yields_the_same_events() {
    let (reference, _, _) = decode_variant("raw_ts6_json");
    assert_eq!(reference.len(), 4, "{reference:?}");
    for variant in SAME_RUN {
        let mut events = BTreeSet::new();
        let formats = formats(variant);
        for f in load(variant) {
            match decode(&to_message(&f), formats.of(&f.topic)) {
                Ok(Decoded::Event(e)) => {
                    let kafka_ms = f.timestamp.unwrap();
                    match e.created_at_ms {
                        // Read in the right unit, a row's creation time is shortly before Debezium read it
                        // (the snapshot row: before the connector started); a misread unit is years off.
                        Some(at) => assert!(
                            at <= kafka_ms + 1_000 && kafka_ms - at < 300_000,
                            "{variant}: {} created at {at}, read at {kafka_ms}",
                            e.event_id
                        ),
                        None => assert!(
                            UNDATED.contains(variant),
                            "{variant}: {} has no creation time",
                            e.event_id
                        ),
                    }
                    if e.payload.is_object() {
                        let fp = crate::ledger::fingerprint(&e);
                        events.insert((e.event_id, e.aggregate_id, e.event_type, fp));
                    }
                }
                Ok(Decoded::Skip(_)) => {}
                Err(err) => panic!("{variant}: {err} for {:?}", f.value),
            }
        }
        assert_eq!(events, reference, "{variant}");
    }
}

/// The placed fields are the envelope's, not the payload's: each event's payload is the row's (the same
/// fingerprint as the raw change event of the same run), and its time the placed `createdAt`.
#[test]
fn envelope_with_an_event_type_header_hands_the_payload_not_the_envelope() {
    let (raw, _, _) = decode_variant("raw_json");
    let formats = formats("router_envelope_header");
    let mut seen = 0;
    for f in load("router_envelope_header") {
        if let Ok(Decoded::Event(e)) = decode(&to_message(&f), formats.of(&f.topic)) {
            let fp = crate::ledger::fingerprint(&e);
            assert!(
                raw.iter().any(|r| r.0 == e.event_id && r.3 == fp),
                "{} carries other content than its row: {}",
                e.event_id,
                e.payload
            );
            let envelope: Value = serde_json::from_str(f.value.as_deref().unwrap()).unwrap();
            let created = envelope["createdAt"].as_str().unwrap();
            assert_eq!(
                e.created_at_ms,
                Some(
                    mongodb::bson::DateTime::parse_rfc3339_str(created)
                        .unwrap()
                        .timestamp_millis()
                )
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 4);
}

#[test]
fn a_null_payload_column_is_an_event_without_payload_unless_the_router_makes_it_a_tombstone() {
    for variant in ["router_null_payload", "raw_null_payload"] {
        let nulls: Vec<(String, String)> = load(variant)
            .iter()
            .filter_map(
                |f| match decode(&to_message(f), formats(variant).of(&f.topic)) {
                    Ok(Decoded::Event(e)) if e.payload.is_null() => {
                        Some((e.event_id, e.event_type))
                    }
                    _ => None,
                },
            )
            .collect();
        let mut types: Vec<&str> = nulls.iter().map(|(_, t)| t.as_str()).collect();
        types.sort_unstable();
        assert_eq!(types, ["NobodyHandlesThis", "UserCreated"], "{variant}");
    }
    // With `route.tombstone.on.empty.payload=true` the same rows are tombstones: skipped.
    let tombstones = load("router_null_tombstone")
        .iter()
        .filter(|f| f.value.is_none())
        .map(|f| {
            decode(
                &to_message(f),
                formats("router_null_tombstone").of(&f.topic),
            )
            .unwrap()
        })
        .collect::<Vec<_>>();
    assert_eq!(tombstones.len(), 2);
    assert!(
        tombstones
            .iter()
            .all(|d| *d == Decoded::Skip(SkipReason::Tombstone))
    );
}

#[test]
fn numeric_event_times_follow_the_schema_or_the_magnitude_rule() {
    let ms = 1_795_706_161_817i64;
    let schema = |name: &str| json!({"fields": [{"field": "after", "fields": [{"field": "created_at", "name": name}]}]});
    for (value, name) in [
        (json!(ms), "io.debezium.time.Timestamp"),
        (json!(ms), "org.apache.kafka.connect.data.Timestamp"),
        (json!(ms * 1_000 + 235), "io.debezium.time.MicroTimestamp"),
        (
            json!(ms * 1_000_000 + 235_123),
            "io.debezium.time.NanoTimestamp",
        ),
        (
            json!("2026-11-26T15:16:01.817235Z"),
            "io.debezium.time.ZonedTimestamp",
        ),
    ] {
        let s = schema(name);
        let got = created_at(
            Some(&value),
            field_schema_name(Some(&s), &["after", "created_at"]),
        );
        assert_eq!(got, Ok(Some(ms)), "{name}: {value}");
        // Without a schema the magnitude tells the same unit.
        assert_eq!(created_at(Some(&value), None), Ok(Some(ms)), "{value}");
    }
    // Outside 1970..=9999, whatever the unit: an error, never a date.
    for bad in [
        json!(-1),
        json!(u64::MAX),
        json!("58873-01-01T00:00:00Z"),
        json!("soon"),
        json!([1]),
    ] {
        assert_eq!(
            created_at(Some(&bad), None).unwrap_err().class(),
            "bad_field",
            "{bad}"
        );
    }
    let micro_as_ms = json!(ms * 1_000);
    let s = schema("io.debezium.time.Timestamp");
    assert!(
        created_at(
            Some(&micro_as_ms),
            field_schema_name(Some(&s), &["after", "created_at"])
        )
        .is_err()
    );
}

#[test]
fn an_undecodable_record_still_names_its_event_where_readable() {
    let id = "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01";
    let raw = json!({"op": "c", "after": {"event_id": id, "event_type": "UserCreated", "payload": "{oops"}}).to_string();
    let m = message("t", None, Some(raw.as_bytes()), &[]);
    assert!(decode(&m, Format::Debezium).is_err());
    assert_eq!(
        identity(&m, Format::Debezium),
        (Some(id.to_string()), Some("UserCreated".to_string()))
    );
    let m = message("t", None, Some(b"\xff"), &[("id", id), ("eventType", "X")]);
    assert_eq!(
        identity(&m, Format::Debezium),
        (Some(id.to_string()), Some("X".to_string()))
    );
    // A router record's identity comes from its headers, never from fields of its (possibly expanded) payload.
    let expanded =
        json!({"event_id": "forged", "event_type": "Forged", "after": {"event_id": "forged"}});
    let m = message(
        "t",
        None,
        Some(expanded.to_string().as_bytes()),
        &[("id", id)],
    );
    assert_eq!(identity(&m, Format::ROUTER), (Some(id.to_string()), None));
    assert_eq!(
        identity(&message("t", None, Some(b"[1]"), &[]), Format::Debezium),
        (None, None)
    );
}

mod properties;
