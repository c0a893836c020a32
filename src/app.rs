//! Wiring: the HTTP endpoints, MongoDB (waited for, indexes created), the dead-letter producer, the processor
//! with its handlers, then the delivery loop ([`crate::kafka::delivery`]) until shutdown. No logic of its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dlq::KafkaDeadLetters;
use crate::handler::HandlerContext;
use crate::handlers;
use crate::health::Health;
use crate::kafka;
use crate::pipeline::{ProcessingSettings, Processor};
use crate::refusals::Refusals;
use crate::registry::Registry;
use crate::routes::{self, Routes};
use crate::store;

/// Runs the daemon until `shutdown` is cancelled, with the shipped handlers.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut registry = Registry::new();
    handlers::register_all(&mut registry).context("registering handlers")?;
    run_with_registry(config, registry, shutdown).await
}

/// Runs the daemon with the given handlers (tests register their own).
pub async fn run_with_registry(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve(config, registry, Target::Live, shutdown).await
}

/// Where the handlers' read models go.
#[derive(Clone, Debug)]
pub enum Target {
    /// The live read models: `MONGODB_DATABASE`, or where the route table sends each handler (`crate::routes`).
    Live,
    /// A rebuild's own database, whatever the route table says (`crate::rebuild`).
    Rebuild { database: String },
}

/// Runs the handlers of `registry` over the subscribed topics into `target` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    registry: Registry,
    target: Target,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    info!(config = ?config, handlers = ?registry.names(), target = ?target, "Starting event-processor");
    let health = Arc::new(Health::new());
    let http_stop = CancellationToken::new();
    if let Some(handle) = crate::http::metrics_handle() {
        let every = crate::http::UPKEEP_INTERVAL;
        tokio::spawn(crate::http::upkeep(handle, every, http_stop.clone()));
    }
    if config.http_port != 0 {
        let listener =
            tokio::net::TcpListener::bind((config.http_bind_address.as_str(), config.http_port))
                .await
                .with_context(|| {
                    format!(
                        "binding HTTP_BIND_ADDRESS {} and HTTP_PORT {}",
                        config.http_bind_address, config.http_port
                    )
                })?;
        let (h, stop) = (health.clone(), http_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, h, stop).await {
                error!(error = %e, "HTTP server failed");
            }
        });
    }

    let client = store::connect(config.mongodb_uri.expose(), "event-processor")
        .await
        .with_context(|| format!("parsing MONGODB_URI {}", config.mongodb_uri))?;
    let home = match &target {
        Target::Live => config.mongodb_database.clone(),
        Target::Rebuild { database } => database.clone(),
    };
    let db = client.database(&home);
    let routes = Arc::new(Routes::default());
    // MongoDB may come up after us: wait for it rather than fail, readiness says why we are not ready. Only the
    // registered handlers' indexes are created.
    let indexes = registry.indexes();
    let mongo_refusals = Arc::new(Refusals::default());
    loop {
        let ready = async {
            store::ping(&db).await?;
            store::ensure_indexes(&db, indexes.clone()).await?;
            match target {
                Target::Live => routes::start(&routes, &client, &home, &registry.names()).await,
                Target::Rebuild { .. } => Ok(()),
            }
        };
        match ready.await {
            Ok(()) => break,
            Err(e) if store::is_transient(&e) => {
                mongo_unavailable(&e, &mongo_refusals, &health, "waiting to create indexes");
                tokio::select! {
                    _ = shutdown.cancelled() => { http_stop.cancel(); return Ok(()); }
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Err(e) => return Err(e).context("creating MongoDB indexes"),
        }
    }
    health.set_mongo_reachable(true);
    mongo_available(&mongo_refusals, &health);
    let pinger = spawn_mongo_pinger(
        db.clone(),
        health.clone(),
        mongo_refusals,
        http_stop.clone(),
    );
    let follower = matches!(target, Target::Live).then(|| {
        tokio::spawn(routes::follow(
            routes.clone(),
            client.clone(),
            home.clone(),
            config.kafka_group_id.clone(),
            http_stop.clone(),
        ))
    });

    let access = kafka::access::AccessWatch::new(health.clone(), &config);
    let dead_letters = Arc::new(
        KafkaDeadLetters::new(&config, access.clone())
            .context("creating the dead-letter producer")?,
    );
    let processor = Arc::new(Processor {
        registry: Arc::new(registry),
        ctx: HandlerContext::new(db),
        routes,
        dead_letters: dead_letters.clone(),
        settings: ProcessingSettings::from_config(&config),
        cancel: CancellationToken::new(),
        metrics: Default::default(),
        health: health.clone(),
        outages: Default::default(),
    });
    let result = kafka::run(&config, processor, health, access, shutdown).await;
    dead_letters.flush(Duration::from_secs(5));
    http_stop.cancel();
    let _ = pinger.await;
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    result
}

fn spawn_mongo_pinger(
    db: mongodb::Database,
    health: Arc<Health>,
    refusals: Arc<Refusals>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ok = match tokio::time::timeout(Duration::from_secs(5), store::ping(&db)).await {
                Ok(Ok(())) => {
                    mongo_available(&refusals, &health);
                    true
                }
                Ok(Err(e)) => {
                    if store::refusal(&e).is_some() {
                        mongo_unavailable(&e, &refusals, &health, "pinging it");
                    }
                    false
                }
                Err(_) => false,
            };
            health.set_mongo_reachable(ok);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
            }
        }
    })
}

/// MongoDB failed an operation with a transient error: what it refuses this client, said once per cause
/// ([`Refusals`]) and in readiness; else that it is unreachable.
fn mongo_unavailable(e: &mongodb::error::Error, said: &Refusals, health: &Health, doing: &str) {
    match store::refusal(e) {
        Some((what, advice)) => {
            health.mongo_refused(Some(what));
            metrics::counter!(crate::catalogue::ACCESS_REFUSALS,
                "service" => "mongodb", "refused" => what)
            .increment(1);
            if said.note(what) {
                error!(refused = what, error = %e, "{advice}");
            } else {
                tracing::debug!(refused = what, error = %e, "MongoDB refusal (said already)");
            }
        }
        None => warn!(error = %e, "MongoDB unreachable; {doing}"),
    }
}

/// MongoDB answered: whatever it refused is over.
fn mongo_available(said: &Refusals, health: &Health) {
    if let Some(was) = said.clear() {
        health.mongo_refused(None);
        info!(was_refused = was, "MongoDB accepts this client again");
    }
}
