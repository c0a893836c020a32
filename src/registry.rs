//! The handler registry: which handlers run for which event type, and the payload contract each event type must
//! meet. It never runs handlers itself (the pipeline does, with retries and isolation) and never decides what a
//! failure means beyond what the handler says.

use std::collections::HashMap;
use std::sync::Arc;

use mongodb::IndexModel;

use crate::event::OutboxEvent;
use crate::handler::EventHandler;

/// What every handler of an event type may rely on in the payload, checked once per event before any handler
/// runs. An event that breaks its type's contract is dead-lettered as a whole (`invalid_payload`): its handlers
/// never disagree about whether it happened (one counting a sign-up whose user document was refused).
#[derive(Clone, Debug, Default)]
pub struct PayloadContract {
    object: bool,
    required_strings: Vec<String>,
}

impl PayloadContract {
    /// The payload must be a JSON object.
    pub fn object() -> Self {
        PayloadContract {
            object: true,
            required_strings: Vec::new(),
        }
    }

    /// The payload must be an object with a non-blank string `field`.
    pub fn require_str(mut self, field: &str) -> Self {
        self.object = true;
        self.required_strings.push(field.to_string());
        self
    }

    fn check(&self, event: &OutboxEvent) -> Result<(), String> {
        if !self.object {
            return Ok(());
        }
        let Some(payload) = event.payload.as_object() else {
            return Err(format!(
                "{} payload must be a JSON object, not {}",
                event.event_type,
                crate::decode::shape_of(&event.payload)
            ));
        };
        for field in &self.required_strings {
            match payload.get(field).and_then(serde_json::Value::as_str) {
                Some(s) if !s.trim().is_empty() => {}
                _ => {
                    return Err(format!(
                        "{} payload needs a non-empty string `{field}`",
                        event.event_type
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How deep a payload may nest. MongoDB refuses documents nested deeper than 100 levels, and a read model keeps
/// the payload a few levels down (inside the update statement and its operators).
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// How large a payload may be, roughly as BSON: a read-model document holds it beside its own fields, and no
/// MongoDB document may pass 16 MiB.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// A field name may hold at most this many `.`-separated words: MongoDB refuses more (its manual, "Field Names
/// with Periods").
pub const MAX_FIELD_NAME_WORDS: usize = 254;

/// Whether a payload can be stored at all, whatever its type, by MongoDB's documented rules for the documents the
/// shipped handlers write: no field name with a NUL character at any depth (BSON writes names as C strings), at
/// most [`MAX_FIELD_NAME_WORDS`] dotted words in a name, integers within 64-bit signed, a bounded depth and
/// size. Names that are empty, `$`-prefixed or dotted are storable: MongoDB 5.0+ keeps them in stored documents and
/// in a field replaced whole, and at the top level (where handlers would take them for update paths) the handlers
/// keep them as values (`handlers::payload_fields`). Checked for every event with handlers, before any of them
/// runs, so that either all of an event's handlers run or none does.
pub fn check_storable(payload: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    // (value, depth) pairs still to visit; iterative so that no payload can exhaust the stack.
    let mut todo: Vec<(&Value, usize)> = vec![(payload, 1)];
    let mut bytes = 0usize;
    while let Some((v, depth)) = todo.pop() {
        if depth > MAX_PAYLOAD_DEPTH {
            return Err(format!(
                "payload nests deeper than {MAX_PAYLOAD_DEPTH} levels"
            ));
        }
        match v {
            Value::Number(n) => {
                if n.is_u64() && n.as_i64().is_none() {
                    return Err(format!(
                        "payload number {n} is beyond MongoDB's 64-bit signed integers"
                    ));
                }
                bytes += 9;
            }
            Value::String(s) => bytes += s.len() + 6,
            Value::Array(items) => {
                bytes += 5 + items.len() * 4;
                todo.extend(items.iter().map(|i| (i, depth + 1)));
            }
            Value::Object(map) => {
                bytes += 5;
                for (k, item) in map {
                    check_field_name(k)?;
                    bytes += k.len() + 2;
                    todo.push((item, depth + 1));
                }
            }
            Value::Null | Value::Bool(_) => bytes += 2,
        }
        if bytes > MAX_PAYLOAD_BYTES {
            return Err(format!(
                "payload is larger than {} MiB",
                MAX_PAYLOAD_BYTES / (1024 * 1024)
            ));
        }
    }
    Ok(())
}

fn check_field_name(k: &str) -> Result<(), String> {
    if k.contains('\0') {
        return Err(format!(
            "payload field name {:?} holds a NUL character, which no BSON field name may",
            k.escape_debug().to_string()
        ));
    }
    if k.split('.').count() > MAX_FIELD_NAME_WORDS {
        return Err(format!(
            "payload field name of {} dotted words (MongoDB takes at most {MAX_FIELD_NAME_WORDS})",
            k.split('.').count()
        ));
    }
    Ok(())
}

/// Registration mistakes, reported at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("two handlers are named `{0}`; handler names must be unique")]
    DuplicateName(String),
}

/// Event type -> the handlers that serve it, in registration order.
#[derive(Default, Clone)]
pub struct Registry {
    by_type: HashMap<String, Vec<Arc<dyn EventHandler>>>,
    contracts: HashMap<String, Vec<PayloadContract>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler. Several handlers may serve one event type; names must be unique.
    pub fn register(&mut self, handler: Arc<dyn EventHandler>) -> Result<(), RegistryError> {
        if self.by_name(handler.name()).is_some() {
            return Err(RegistryError::DuplicateName(handler.name().to_string()));
        }
        self.by_type
            .entry(handler.event_type().to_string())
            .or_default()
            .push(handler);
        Ok(())
    }

    /// Adds a payload contract to an event type: every handler of the type may rely on it, and an event that
    /// breaks it reaches none of them. Several contracts of one type must all hold.
    pub fn require(&mut self, event_type: &str, contract: PayloadContract) {
        self.contracts
            .entry(event_type.to_string())
            .or_default()
            .push(contract);
    }

    /// Whether the event is valid for its type: a storable payload and every contract of the type. The reason
    /// when not.
    pub fn validate(&self, event: &OutboxEvent) -> Result<(), String> {
        check_storable(&event.payload)?;
        for c in self.contracts.get(&event.event_type).into_iter().flatten() {
            c.check(event)?;
        }
        Ok(())
    }

    /// The same registry with every handler replaced by `f(handler)` (a decorator that counts, traces or guards
    /// calls); the payload contracts are kept. `f` must keep each handler's name and event type.
    pub fn wrap(self, f: impl Fn(Arc<dyn EventHandler>) -> Arc<dyn EventHandler>) -> Registry {
        Registry {
            by_type: self
                .by_type
                .into_iter()
                .map(|(t, hs)| (t, hs.into_iter().map(&f).collect()))
                .collect(),
            contracts: self.contracts,
        }
    }

    /// The same registry with only the named handlers (and every payload contract, so an event invalid for the
    /// full set is invalid for the subset too): what a rebuild runs.
    pub fn only(&self, names: &[String]) -> Registry {
        Registry {
            by_type: self
                .by_type
                .iter()
                .map(|(t, hs)| {
                    let kept = hs.iter().filter(|h| names.iter().any(|n| n == h.name()));
                    (t.clone(), kept.cloned().collect::<Vec<_>>())
                })
                .filter(|(_, hs)| !hs.is_empty())
                .collect(),
            contracts: self.contracts.clone(),
        }
    }

    /// Every registered handler.
    pub fn handlers(&self) -> impl Iterator<Item = &Arc<dyn EventHandler>> {
        self.by_type.values().flatten()
    }

    /// The handlers for an event type; empty when the type is unknown.
    pub fn handlers_for(&self, event_type: &str) -> &[Arc<dyn EventHandler>] {
        self.by_type.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// Every event type with its handlers.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &[Arc<dyn EventHandler>])> {
        self.by_type.iter().map(|(t, h)| (t.as_str(), h.as_slice()))
    }

    /// The handler with this name, for dead-letter replays.
    pub fn by_name(&self, name: &str) -> Option<&Arc<dyn EventHandler>> {
        self.by_type.values().flatten().find(|h| h.name() == name)
    }

    /// The indexes every registered handler declares, each once.
    pub fn indexes(&self) -> Vec<(String, IndexModel)> {
        let mut out: Vec<(String, IndexModel)> = Vec::new();
        for (collection, index) in self.by_type.values().flatten().flat_map(|h| h.indexes()) {
            let seen = out
                .iter()
                .any(|(c, i)| *c == collection && i.keys == index.keys);
            if !seen {
                out.push((collection, index));
            }
        }
        out
    }

    /// Every registered handler name, for start-up logs.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_type.values().flatten().map(|h| h.name()).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{HandlerContext, HandlerError};
    use async_trait::async_trait;

    struct Named(&'static str, &'static str);

    #[async_trait]
    impl EventHandler for Named {
        fn event_type(&self) -> &str {
            self.0
        }
        fn name(&self) -> &str {
            self.1
        }
        async fn handle(&self, _: &OutboxEvent, _: &HandlerContext) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[test]
    fn several_handlers_serve_one_event_type_in_registration_order() {
        let mut r = Registry::new();
        r.register(Arc::new(Named("UserCreated", "users"))).unwrap();
        r.register(Arc::new(Named("UserCreated", "stats"))).unwrap();
        r.register(Arc::new(Named("ActivityCreated", "activities")))
            .unwrap();
        let names: Vec<_> = r
            .handlers_for("UserCreated")
            .iter()
            .map(|h| h.name())
            .collect();
        assert_eq!(names, ["users", "stats"]);
        assert_eq!(r.handlers_for("ActivityCreated").len(), 1);
        assert!(r.handlers_for("Unknown").is_empty());
    }

    fn event(payload: serde_json::Value) -> OutboxEvent {
        OutboxEvent {
            event_id: "e".into(),
            aggregate_id: "a".into(),
            aggregate_type: None,
            event_type: "UserCreated".into(),
            payload,
            created_at_ms: None,
            source: crate::event::KafkaCoordinates {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
            },
        }
    }

    #[test]
    fn a_contract_is_decided_once_for_the_event_type() {
        use serde_json::json;
        let mut r = Registry::new();
        r.require(
            "UserCreated",
            PayloadContract::object().require_str("email"),
        );
        assert!(
            r.validate(&event(json!({"email": "a@b.c", "x": 1})))
                .is_ok()
        );
        for bad in [
            json!({"email": 7}),
            json!({"email": "  "}),
            json!([{"email": "a@b.c"}]),
            json!(null),
            json!("{\"email\": \"a@b.c\"}"),
            json!({"email": "a@b.c", "n": u64::MAX}),
        ] {
            assert!(r.validate(&event(bad.clone())).is_err(), "{bad}");
        }
        // Without a contract only storability counts.
        let mut other = event(json!(null));
        other.event_type = "Other".into();
        assert!(r.validate(&other).is_ok());
    }

    #[test]
    fn unstorable_payloads_are_refused() {
        let mut deep = serde_json::Value::Null;
        for _ in 0..1_000 {
            deep = serde_json::Value::Array(vec![deep]);
        }
        assert!(check_storable(&deep).unwrap_err().contains("deeper"));
        let big = serde_json::Value::String("x".repeat(MAX_PAYLOAD_BYTES + 1));
        assert!(check_storable(&big).unwrap_err().contains("larger"));
        assert!(check_storable(&serde_json::json!({"a": [1, -2, 1.5, "s"]})).is_ok());
        let mut nested = serde_json::Value::Null;
        for _ in 0..MAX_PAYLOAD_DEPTH - 1 {
            nested = serde_json::json!({ "k": nested });
        }
        assert!(check_storable(&nested).is_ok());
        // Field names: NUL at any depth and too many dotted words are refused; MongoDB's other awkward names are
        // storable.
        let dotted = vec!["w"; MAX_FIELD_NAME_WORDS + 1].join(".");
        for bad in [
            serde_json::json!({"a\0b": 1}),
            serde_json::json!({"ok": [{"deep": {"\0": true}}]}),
            serde_json::json!({ dotted: 1 }),
        ] {
            assert!(check_storable(&bad).is_err(), "{bad}");
        }
        let fine = vec!["w"; MAX_FIELD_NAME_WORDS].join(".");
        for good in [
            serde_json::json!({"$x": {"$date": "not a date", "a.b": 1, "": 2, "_id": 3}}),
            serde_json::json!({ fine: "\0 in a value is fine" }),
        ] {
            assert!(check_storable(&good).is_ok(), "{good}");
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut r = Registry::new();
        r.register(Arc::new(Named("A", "h"))).unwrap();
        let err = r.register(Arc::new(Named("B", "h"))).unwrap_err();
        assert_eq!(err, RegistryError::DuplicateName("h".into()));
        assert!(r.by_name("h").is_some());
        assert_eq!(r.names(), ["h"]);
    }
}
