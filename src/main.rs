//! The daemon's entry point: read config, install telemetry and the shutdown signal, run.
//!
//! `event-processor` runs the daemon; `event-processor healthcheck` probes a running one (used by the image's
//! HEALTHCHECK); `event-processor replay-dlq [HANDLER]` re-runs the dead letters present now (of one handler).

use std::process::ExitCode;

use event_processor::{Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Decoding JSON allocates many small objects per record; mimalloc serves them faster than the system allocator
/// (see `docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("run") => run().await,
        Some("healthcheck") => healthcheck().await,
        Some("replay-dlq") => replay(args.get(1).cloned()).await,
        Some(other) => {
            eprintln!(
                "unknown command `{other}`; usage: event-processor [run|healthcheck|replay-dlq [HANDLER]]"
            );
            ExitCode::from(2)
        }
    }
}

async fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("event-processor: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    if let Err(e) = telemetry::init(&config.log_level, config.log_format()) {
        eprintln!("event-processor: cannot install logging: {e}");
        return ExitCode::FAILURE;
    }
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    match event_processor::run(config, token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "event-processor failed");
            // Now, not by returning: the runtime's shutdown would wait for its blocking threads, and one may be
            // in a Kafka call that never returns (see `KAFKA_REJOIN_TIMEOUT_MS`).
            std::process::exit(1)
        }
    }
}

async fn replay(handler: Option<String>) -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("event-processor: {e}");
            return ExitCode::from(78);
        }
    };
    if let Err(e) = telemetry::init(&config.log_level, config.log_format()) {
        eprintln!("event-processor: cannot install logging: {e}");
        return ExitCode::FAILURE;
    }
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    let mut registry = event_processor::Registry::new();
    if let Err(e) = event_processor::handlers::register_all(&mut registry) {
        eprintln!("event-processor: {e}");
        return ExitCode::FAILURE;
    }
    match event_processor::replay::replay_dead_letters(config, registry, handler, token).await {
        Ok(stats) => {
            println!(
                "replayed {}, failed again {}, other handlers {}, not replayable {}",
                stats.replayed, stats.failed_again, stats.other_handlers, stats.not_replayable
            );
            if stats.not_replayable > 0 {
                // Not a success: letters stay unconsumed, and the logs name each one.
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "replay failed");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck() -> ExitCode {
    let port = std::env::var("HTTP_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9090);
    match event_processor::http::probe(port, "/health/live").await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("not live");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck on port {port} failed: {e}");
            ExitCode::FAILURE
        }
    }
}
