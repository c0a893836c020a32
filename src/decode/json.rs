//! Reading JSON the way the decoder needs it: a `jsonb` column's text parsed where it is read, and values built
//! with room for a few entries.

use serde::Deserialize;
use serde_json::{Map, Value};

/// A JSON document held in a JSON string (a `jsonb` column), parsed where the string is read: from the
/// deserializer's own buffer when the string has escapes (it always does), so the unescaped text is never copied
/// out. An error when the string holds no JSON.
pub(super) struct JsonText(pub Value);

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = JsonText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string holding JSON")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<JsonText, E> {
                serde_json::from_str(s)
                    .map(|Presized(v)| JsonText(v))
                    .map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// A JSON value as `serde_json::Value` reads it, but with objects and arrays made with room for a few entries:
/// grown from empty, a small payload's object was reallocated twice (a fifth of reading it).
pub(super) struct Presized(pub Value);

const PRESIZED: usize = 8;

impl<'de> Deserialize<'de> for Presized {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PresizedVisitor).map(Presized)
    }
}

struct PresizedVisitor;

impl<'de> serde::de::Visitor<'de> for PresizedVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(PRESIZED);
        while let Some(Presized(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::with_capacity(PRESIZED);
        while let Some(key) = map.next_key::<String>()? {
            let Presized(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// JsonConverter with `schemas.enable=true` wraps a key or value as exactly `{"schema": {...}, "payload": ...}`.
/// The value and, when it was wrapped, its schema. Only for JSON whose top level Kafka Connect wrote: a raw change
/// event's value, a key, or a value declared schema-wrapped; never for a value that may be the payload itself.
pub(super) fn unwrap_schema(value: Value) -> (Value, Option<Value>) {
    match value {
        Value::Object(mut obj)
            if obj.len() == 2
                && obj.contains_key("payload")
                && matches!(obj.get("schema"), Some(Value::Object(_))) =>
        {
            let schema = obj.remove("schema");
            (obj.remove("payload").unwrap_or(Value::Null), schema)
        }
        other => (other, None),
    }
}

/// The Connect schema name (`io.debezium.time.MicroTimestamp`, ...) of the struct field at `path` of `schema`.
pub(super) fn field_schema_name<'a>(schema: Option<&'a Value>, path: &[&str]) -> Option<&'a str> {
    let mut at = schema?;
    for name in path {
        at = at
            .get("fields")?
            .as_array()?
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(name))?;
    }
    at.get("name").and_then(Value::as_str)
}

/// What kind of JSON value `v` is, in words ("an object", "null"), for error messages.
pub fn shape_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
