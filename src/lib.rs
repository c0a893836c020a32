//! # event-processor
//!
//! Turns a PostgreSQL application's transactional outbox into MongoDB read models:
//!
//! ```text
//! PostgreSQL WAL -> Debezium (Kafka Connect) -> Kafka -> [kafka] -> [lanes] -> [pipeline] -> handlers -> MongoDB
//!                                                          |            |                          |
//!                                                     commit from   undecodable            permanent failure
//!                                                     [kafka::offsets]   `--------> [dlq] <--------'
//! ```
//!
//! Delivery guarantee: Kafka delivers each record at least once, and a partition's offset is committed only past
//! records whose every handler succeeded or whose failure the dead-letter topic acknowledged. Every handler
//! write is an idempotent, guarded upsert keyed by a business id, so a redelivered or replayed event changes
//! nothing. Together that is effectively-once processing on a standalone MongoDB, without transactions.
//!
//! ## Layout
//! docs/ARCHITECTURE.md has the picture, each module's job and where each guarantee is kept.
//! - [`config`]: environment variables, validated once; [`app`]: wiring ([`app::run`]); [`shutdown`]: the signal.
//! - [`kafka`]: delivery: the poller and the consumer loop ([`kafka::delivery`]), what may be committed
//!   ([`kafka::offsets`]), librdkafka's callbacks, every client's configuration ([`kafka::client`]).
//! - [`lanes`]: keyed lanes (per-key order, bounded concurrency across keys); [`pipeline`]: one record: decode,
//!   fan-out, retries, isolation, dead letters; [`decode`]: every Debezium record shape into an
//!   [`event::OutboxEvent`].
//! - [`handler`]: the [`EventHandler`] API; [`registry`]: which handlers run for which event type;
//!   [`handlers`]: the shipped read models.
//! - [`store`]: MongoDB client and error classes; [`writer`]: coalesces handlers' writes into bulk commands;
//!   [`ledger`]: event ids seen; [`dlq`]: the dead-letter topic; [`replay`]: re-running dead letters.
//! - [`rebuild`]: rebuilding read models from history while the daemon runs; [`routes`]: where each read model
//!   lives, followed by readers and the daemon (docs/REBUILDING.md).
//! - [`health`], [`http`], [`telemetry`], [`redact`], [`catalogue`]: what operators see, and what they never see.

pub mod app;
pub mod catalogue;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod event;
pub mod handler;
pub mod handlers;
pub mod health;
pub mod http;
pub mod kafka;
pub mod lanes;
pub mod ledger;
pub mod names;
pub mod outage;
pub mod pipeline;
pub mod rebuild;
pub mod redact;
pub mod refusals;
pub mod registry;
pub mod replay;
pub mod routes;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod writer;

pub use app::{run, run_with_registry};
pub use config::Config;
pub use event::OutboxEvent;
pub use handler::{EventHandler, HandlerContext, HandlerError};
pub use registry::Registry;

/// Locks a mutex of the daemon's bookkeeping. These locks guard only bookkeeping that cannot panic; a poisoned
/// one means a bug, and carrying on with its state could commit past an unfinished record, so the caller fails
/// loudly instead.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("a thread panicked while holding a bookkeeping lock")
}

/// Wall-clock milliseconds since the Unix epoch: the clock Kafka timestamps use, for lags and ages.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
