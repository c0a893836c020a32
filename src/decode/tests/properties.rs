//! Generated input, not examples: any bytes and any JSON in every place the decoder reads, and payloads made of
//! Debezium's own field names at any depth, written as every shipped and documented connector configuration
//! writes them, decoded back to exactly themselves.

use super::*;
use proptest::prelude::*;

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e300f64..1e300).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_$.]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The field names Debezium itself writes: the change event envelope and its source block, transaction metadata,
/// heartbeats, the JsonConverter's schema wrapper and its schemas, the Event Router's value, envelope aliases and
/// headers, and the outbox row's columns.
const DEBEZIUM_NAMES: &[&str] = &[
    "op",
    "ts_ms",
    "ts_us",
    "ts_ns",
    "before",
    "after",
    "source",
    "transaction",
    "payload",
    "schema",
    "id",
    "status",
    "event_count",
    "data_collections",
    "data_collection",
    "total_order",
    "eventType",
    "eventId",
    "aggregateType",
    "aggregateId",
    "createdAt",
    "event_id",
    "event_type",
    "aggregate_id",
    "aggregate_type",
    "created_at",
    "fields",
    "field",
    "name",
    "type",
    "optional",
    "version",
    "snapshot",
    "connector",
    "lsn",
    "txId",
    "message",
    "prefix",
    "content",
];

/// Words Debezium writes as values: operation codes, transaction states, schema types and names.
const DEBEZIUM_WORDS: &[&str] = &[
    "c",
    "r",
    "u",
    "d",
    "t",
    "m",
    "BEGIN",
    "END",
    "struct",
    "string",
    "io.debezium.data.Json",
    "io.debezium.time.ZonedTimestamp",
    "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01",
    "2026-11-26T15:16:01.817235Z",
];

fn debezium_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(DEBEZIUM_NAMES).prop_map(str::to_string),
        1 => "[a-zA-Z_$.]{0,8}",
    ]
}

/// JSON whose object keys are mostly Debezium's names and whose strings are often Debezium's words, at any depth.
fn debezium_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        prop::sample::select(DEBEZIUM_WORDS).prop_map(|w| json!(w)),
        ".{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(debezium_key(), inner, 0..7)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A payload as an application writes it: an object, of Debezium's names and words at any depth.
fn payload() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(debezium_key(), debezium_json(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

const ID: &str = "0b4f8a52-3c1e-4a7e-9d55-7f1b2c3d4e01";
const AGG: &str = "6f1c2a8e-2b7c-4d1e-9a55-0c1f0e3d9b21";
const CREATED: &str = "2026-11-26T15:16:01.817235Z";

/// A record as a connector configuration writes one outbox row: key, value, headers.
type Written = (String, String, Vec<(&'static str, String)>);

/// The Event Router's headers with the type (and creation time) placed in headers, as the shipped config does.
fn routed_headers() -> Vec<(&'static str, String)> {
    vec![
        ("__debezium.context.connectorLogicalName", "outbox".into()),
        ("id", ID.into()),
        ("eventType", "T".into()),
        ("createdAt", CREATED.into()),
    ]
}

fn row(payload: &Value) -> Value {
    json!({"event_id": ID, "aggregate_id": AGG, "aggregate_type": "user", "event_type": "T",
           "payload": payload.to_string(), "status": "pending", "created_at": CREATED})
}

fn change_event(payload: &Value) -> Value {
    json!({"before": null, "after": row(payload), "op": "c", "ts_ms": 1_795_706_161_873i64,
           "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": "postgres"},
           "transaction": null})
}

fn struct_schema(name: &str, fields: Value) -> Value {
    json!({"type": "struct", "fields": fields, "optional": false, "name": name})
}

/// Every shipped and documented connector configuration: its name, the formats it may be read as (its declared
/// one, and `debezium` where it is a shipped configuration), and how it writes a row with `payload`.
#[allow(clippy::type_complexity)]
fn configurations() -> Vec<(&'static str, Vec<Format>, fn(&Value) -> Written)> {
    let router = Format::ROUTER;
    let r = |envelope, schemas| Format::Router { envelope, schemas };
    vec![
        (
            "raw, JsonConverter (shipped)",
            vec![Format::ChangeEvent, Format::Debezium],
            |p| {
                (
                    json!({"aggregate_id": AGG}).to_string(),
                    change_event(p).to_string(),
                    vec![],
                )
            },
        ),
        (
            "raw, schemas.enable=true",
            vec![Format::ChangeEvent, Format::Debezium],
            |p| {
                let schema = struct_schema("postgres.activity.event_outbox.Envelope", json!([]));
                (
                    json!({"schema": {"type": "struct"}, "payload": {"aggregate_id": AGG}})
                        .to_string(),
                    json!({"schema": schema, "payload": change_event(p)}).to_string(),
                    vec![],
                )
            },
        ),
        (
            "router, JsonConverter (shipped)",
            vec![router, Format::Debezium],
            |p| {
                (
                    json!(AGG).to_string(),
                    json!(p.to_string()).to_string(),
                    routed_headers(),
                )
            },
        ),
        (
            "router, StringConverter",
            vec![router, Format::Debezium],
            |p| (AGG.to_string(), p.to_string(), routed_headers()),
        ),
        (
            "router, expand.json.payload",
            vec![router, Format::Debezium],
            |p| (json!(AGG).to_string(), p.to_string(), routed_headers()),
        ),
        ("router, schemas.enable=true", vec![r(false, true)], |p| {
            let schema = json!({"type": "string", "optional": false, "name": "io.debezium.data.Json", "version": 1});
            (
                json!({"schema": {"type": "string"}, "payload": AGG}).to_string(),
                json!({"schema": schema, "payload": p.to_string()}).to_string(),
                routed_headers(),
            )
        }),
        (
            "router, schemas.enable=true, expanded",
            vec![r(false, true)],
            |p| {
                let schema = json!({"type": "struct", "fields": [], "optional": true});
                (
                    json!(AGG).to_string(),
                    json!({"schema": schema, "payload": p}).to_string(),
                    routed_headers(),
                )
            },
        ),
        ("router, envelope placement", vec![r(true, false)], |p| {
            let value = json!({"payload": p.to_string(), "eventType": "T", "eventId": ID, "createdAt": CREATED});
            (
                json!(AGG).to_string(),
                value.to_string(),
                vec![("id", ID.into())],
            )
        }),
        (
            "router, envelope placement, expanded",
            vec![r(true, false)],
            |p| {
                let value = json!({"payload": p, "eventType": "T", "eventId": ID});
                let mut headers = vec![("id", ID.to_string())];
                headers.push(("createdAt", CREATED.into()));
                (json!(AGG).to_string(), value.to_string(), headers)
            },
        ),
        (
            "router, envelope placement, schemas.enable=true",
            vec![r(true, true)],
            |p| {
                let schema = struct_schema(
                    "outbox.activity.event_outbox.user.Value",
                    json!([{"type": "string", "name": "io.debezium.data.Json", "field": "payload"},
                       {"type": "string", "field": "eventType"},
                       {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "field": "createdAt"}]),
                );
                let value =
                    json!({"payload": p.to_string(), "eventType": "T", "createdAt": CREATED});
                (
                    json!(AGG).to_string(),
                    json!({"schema": schema, "payload": value}).to_string(),
                    vec![("id", ID.into())],
                )
            },
        ),
        (
            "router, envelope placement, schemas.enable=true, expanded",
            vec![r(true, true)],
            |p| {
                let schema = struct_schema("outbox.activity.event_outbox.user.Value", json!([]));
                let value = json!({"payload": p, "eventType": "T"});
                (
                    json!(AGG).to_string(),
                    json!({"schema": schema, "payload": value}).to_string(),
                    routed_headers(),
                )
            },
        ),
    ]
}

fn raw_message(
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: &[(String, Vec<u8>)],
) -> OwnedMessage {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    OwnedMessage::new(
        value,
        key,
        "t".into(),
        Timestamp::CreateTime(1),
        0,
        0,
        Some(h),
    )
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop_oneof![
                Just("id".to_string()),
                Just("eventType".to_string()),
                Just("createdAt".to_string()),
                ".{0,6}".prop_map(|s| s)
            ],
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..5,
    )
}

/// Every format a topic may be declared with.
fn every_format() -> Vec<Format> {
    let mut all = vec![Format::Debezium, Format::ChangeEvent];
    for envelope in [false, true] {
        for schemas in [false, true] {
            all.push(Format::Router { envelope, schemas });
        }
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Any bytes in, under every format, never a panic: an event, a skip or an error, and the dead letter's
    /// identity look-up.
    #[test]
    fn any_bytes_decode_without_panic(
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        value in prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        headers in headers(),
    ) {
        let m = raw_message(key, value, &headers);
        for format in every_format() {
            let _ = decode(&m, format);
            let _ = identity(&m, format);
        }
    }

    /// Any JSON text in, in every place the decoder reads JSON, under every format: never a panic.
    #[test]
    fn any_json_in_any_place_decodes_without_panic(v in any_json(), op in "[crudtmx]", headers in headers()) {
        let shapes = [
            v.clone(),
            json!({"op": op, "after": v}),
            json!({"op": "c", "after": {"event_id": ID, "aggregate_id": "a",
                   "event_type": "T", "payload": v, "created_at": v}}),
            json!({"schema": {"fields": [{"field": "after", "fields": v}]}, "payload": {"op": "c", "after": v}}),
            json!({"payload": v, "eventType": "T", "eventId": v, "createdAt": v}),
            json!({"schema": {"fields": v}, "payload": {"payload": v, "createdAt": v}}),
        ];
        for s in shapes {
            let m = raw_message(Some(b"\"k\"".to_vec()), Some(s.to_string().into_bytes()), &headers);
            for format in every_format() {
                let _ = decode(&m, format);
                let _ = identity(&m, format);
            }
        }
    }

    /// A payload made of Debezium's own field names and words, at any depth, written as each shipped and
    /// documented connector configuration writes it, decodes under that configuration's format to exactly the
    /// payload written, with the row's id, type, aggregate and time: a field inside the payload never decides what
    /// the record is.
    #[test]
    fn payloads_of_debeziums_own_names_decode_to_themselves_in_every_configuration(p in payload()) {
        for (name, formats, write) in configurations() {
            let (key, value, headers) = write(&p);
            let headers: Vec<(String, Vec<u8>)> =
                headers.into_iter().map(|(k, v)| (k.to_string(), v.into_bytes())).collect();
            let m = raw_message(Some(key.into_bytes()), Some(value.into_bytes()), &headers);
            for format in formats {
                match decode(&m, format) {
                    Ok(Decoded::Event(e)) => {
                        prop_assert_eq!(&e.payload, &p, "{} as {}", name, format);
                        prop_assert_eq!(
                            (e.event_id.as_str(), e.event_type.as_str(), e.aggregate_id.as_str()),
                            (ID, "T", AGG),
                            "{} as {}", name, format
                        );
                        prop_assert_eq!(e.created_at_ms, Some(1_795_706_161_817), "{} as {}", name, format);
                    }
                    other => prop_assert!(false, "{name} as {format}: {other:?}"),
                }
            }
        }
    }
}
