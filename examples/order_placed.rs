//! A handler of your own beside the shipped ones: `OrderPlaced {order_id, customer_id, total, ...}` -> `orders`,
//! one document per order (`_id` = the aggregate id). Runs like the daemon, with the same environment variables:
//! `cargo run --example order_placed`. The README's "Adding a handler" shows the part between the markers.

use std::sync::Arc;

use event_processor::{Config, Registry, redact, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

// README example: begin
use async_trait::async_trait;
use event_processor::handler::guarded_upsert;
use event_processor::handlers::{index, not_newer_than, occurred_at, payload_object, to_bson};
use event_processor::registry::PayloadContract;
use event_processor::{EventHandler, HandlerContext, HandlerError, OutboxEvent};
use mongodb::IndexModel;
use mongodb::bson::doc;

pub struct OrderPlacedHandler;

#[async_trait]
impl EventHandler for OrderPlacedHandler {
    fn event_type(&self) -> &str {
        "OrderPlaced"
    }

    fn name(&self) -> &str {
        "OrderPlacedHandler"
    }

    /// Created at start-up, because this handler is registered.
    fn indexes(&self) -> Vec<(String, IndexModel)> {
        vec![index("orders", doc! { "customer_id": 1 })]
    }

    async fn handle(&self, event: &OutboxEvent, ctx: &HandlerContext) -> Result<(), HandlerError> {
        // The contract registered below has been checked: an object with string `order_id` and `customer_id`.
        let payload = payload_object(event)?;
        let at = occurred_at(event);
        let total = to_bson(payload.get("total").unwrap_or(&serde_json::Value::Null))?;
        guarded_upsert(
            ctx,
            "orders",
            // A stale event (an older one delivered late) never overwrites newer state.
            not_newer_than(&event.aggregate_id, "updated_at", at),
            doc! { "$set": {
                "customer_id": payload["customer_id"].as_str(),
                "total": total,
                "updated_at": at,
                "last_event_id": &event.event_id,
            } },
        )
        .await // MongoDB errors arrive classified: transient ones are retried, permanent ones dead-lettered
    }
}

/// The shipped handlers, and this one with what its event type's payload must hold.
pub fn registry() -> Result<Registry, event_processor::registry::RegistryError> {
    let mut registry = Registry::new();
    event_processor::handlers::register_all(&mut registry)?;
    registry.require(
        "OrderPlaced",
        PayloadContract::object()
            .require_str("order_id")
            .require_str("customer_id"),
    );
    registry.register(Arc::new(OrderPlacedHandler))?;
    Ok(registry)
}
// README example: end

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    redact::install_from_env();
    let config = Config::from_env()?;
    telemetry::init(&config.log_level, config.log_format()).map_err(anyhow::Error::msg)?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    event_processor::run_with_registry(config, registry()?, token).await
}
