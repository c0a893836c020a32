//! The handler registry: which handlers run for which event type. Owns the [`EventHandler`] trait, the error a
//! handler returns, and registration. It never runs handlers itself (the pipeline does, with retries and
//! isolation) and never decides what a failure means beyond what the handler says.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use mongodb::Database;

use crate::event::OutboxEvent;
use crate::writer::Writer;

/// What a handler gets besides the event: the MongoDB database its read models live in, and the coalescing
/// writer that batches its update statements with those of concurrent handlers (see `store::guarded_upsert`).
#[derive(Clone, Debug)]
pub struct HandlerContext {
    pub db: Database,
    pub writer: Writer,
}

impl HandlerContext {
    /// A context whose writes go through a new coalescing writer for `db`. Needs a tokio runtime.
    pub fn new(db: Database) -> Self {
        HandlerContext {
            writer: Writer::start(db.clone()),
            db,
        }
    }
}

/// A handler's failure, and whether trying again can help. The pipeline acts on the variant, never on the text.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The world is temporarily unable (MongoDB unreachable, timeout, not primary): retried with backoff, never
    /// dead-lettered.
    #[error("transient: {0}")]
    Transient(#[source] anyhow::Error),
    /// The event cannot be applied (invalid payload, a write the server rejects): retried a bounded number of
    /// times, then dead-lettered.
    #[error("permanent: {0}")]
    Permanent(#[source] anyhow::Error),
}

impl HandlerError {
    /// A permanent error from a message, for validation failures.
    pub fn invalid(msg: impl Into<String>) -> Self {
        HandlerError::Permanent(anyhow::anyhow!(msg.into()))
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, HandlerError::Transient(_))
    }
}

/// A read-model projection for one event type. Every effect must be safe to repeat: Kafka delivers at least once.
#[async_trait]
pub trait EventHandler: Send + Sync {
    /// The `event_type` this handler serves, e.g. `"UserCreated"`.
    fn event_type(&self) -> &str;
    /// Unique name, used in logs, metrics and dead letters (a replay re-runs only the named handler).
    fn name(&self) -> &str;
    /// Applies the event. Return `Transient` when retrying can help, `Permanent` when it cannot.
    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError>;
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
