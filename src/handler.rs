//! The handler API: the [`EventHandler`] trait, what a handler gets ([`HandlerContext`]), what it returns
//! ([`HandlerError`]), and the write primitive every shipped handler uses ([`guarded_upsert`]). A new read model
//! is one `EventHandler` in `handlers/`, registered in `handlers::register_all`.

use async_trait::async_trait;
use mongodb::bson::{Bson, Document};
use mongodb::error::Error as MongoError;
use mongodb::{Database, IndexModel};

use crate::event::OutboxEvent;
use crate::store::{DUPLICATE_KEY, TRANSIENT_CODES, error_code, is_transient};
use crate::writer::{WriteError, Writer};

/// What a handler gets besides the event: the MongoDB database its read models live in, and the coalescing
/// writer that batches its update statements with those of concurrent handlers (see [`guarded_upsert`]).
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
    /// The indexes this handler's read models are queried by, as (collection, index). The daemon creates the
    /// indexes of the handlers it runs at start-up (idempotently), and no others.
    fn indexes(&self) -> Vec<(String, IndexModel)> {
        Vec::new()
    }
    /// The collections this handler writes: what a rebuild (`event-processor rebuild`) fills anew and switches.
    /// By default the collections of its indexes; a handler that writes elsewhere must say so.
    fn collections(&self) -> Vec<String> {
        let mut names: Vec<String> = self.indexes().into_iter().map(|(c, _)| c).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Wraps a driver error as a handler error of the right class.
pub fn classify(err: MongoError) -> HandlerError {
    if is_transient(&err) {
        HandlerError::Transient(err.into())
    } else {
        HandlerError::Permanent(err.into())
    }
}

/// Wraps a coalesced write's failure as a handler error of the right class.
pub fn classify_write(err: WriteError) -> HandlerError {
    match err {
        WriteError::Command(e) => classify(e),
        WriteError::Statement { code, message } if TRANSIENT_CODES.contains(&code) => {
            HandlerError::Transient(anyhow::anyhow!("MongoDB write error {code}: {message}"))
        }
        WriteError::Statement { code, message } => {
            HandlerError::Permanent(anyhow::anyhow!("MongoDB write error {code}: {message}"))
        }
        WriteError::Concern { code, message } => HandlerError::Transient(anyhow::anyhow!(
            "MongoDB write concern not satisfied ({code}): {message}"
        )),
        WriteError::Closed => {
            HandlerError::Transient(anyhow::anyhow!("the MongoDB writer stopped"))
        }
    }
}

/// `updateOne` through the context's coalescing writer, errors classified.
pub async fn update_one(
    ctx: &HandlerContext,
    collection: &str,
    filter: Document,
    update: impl Into<Bson>,
    upsert: bool,
) -> Result<(), HandlerError> {
    ctx.writer
        .update_one(collection, filter, update, upsert)
        .await
        .map(|_| ())
        .map_err(classify_write)
}

/// An upsert whose filter carries a guard ("event not yet applied", "state not newer"). When the guard holds the
/// update back on an existing document, the upsert's insert collides on `_id` (E11000): the effect is already
/// there. One retry without upsert tells that apart from two writers racing to create the document.
pub async fn guarded_upsert(
    ctx: &HandlerContext,
    collection: &str,
    filter: Document,
    update: impl Into<Bson>,
) -> Result<(), HandlerError> {
    let update: Bson = update.into();
    match ctx
        .writer
        .update_one(collection, filter.clone(), update.clone(), true)
        .await
    {
        Ok(_) => Ok(()),
        Err(WriteError::Statement {
            code: DUPLICATE_KEY,
            ..
        }) => update_one(ctx, collection, filter, update, false).await,
        Err(WriteError::Command(e)) if error_code(&e) == Some(DUPLICATE_KEY) => {
            update_one(ctx, collection, filter, update, false).await
        }
        Err(e) => Err(classify_write(e)),
    }
}
