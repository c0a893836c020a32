//! The daemon's entry point: read config, install telemetry and the shutdown signal, run.
//!
//! `event-processor` runs the daemon; `event-processor healthcheck` probes a running one (used by the image's
//! HEALTHCHECK); `event-processor replay-dlq [HANDLER]` re-runs the dead letters present now (of one handler).

use std::process::ExitCode;

use event_processor::{Config, redact, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Decoding JSON allocates many small objects per record; mimalloc serves them faster than the system allocator
/// (see `docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything can print: every secret of the environment is hidden from every line from here on.
    redact::install_from_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("run") => run().await,
        Some("healthcheck") => healthcheck().await,
        Some("replay-dlq") => replay(args.get(1).cloned()).await,
        Some(other) => {
            fail(&format!(
                "unknown command `{other}`; usage: event-processor [run|healthcheck|replay-dlq [HANDLER]]"
            ));
            ExitCode::from(2)
        }
    }
}

/// One line on stderr, secrets hidden.
fn fail(message: &str) {
    eprintln!("event-processor: {}", redact::scrub(message));
}

/// Configuration, logging and the shutdown signal, as every long-running command needs them; the exit code
/// when one of them fails (78, EX_CONFIG, for a bad variable).
fn start() -> Result<(Config, CancellationToken), ExitCode> {
    let config = Config::from_env().map_err(|e| {
        fail(&e.to_string());
        ExitCode::from(78)
    })?;
    telemetry::init(&config.log_level, config.log_format()).map_err(|e| {
        fail(&format!("cannot install logging: {e}"));
        ExitCode::FAILURE
    })?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    Ok((config, token))
}

async fn run() -> ExitCode {
    let (config, token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
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
    let (config, token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut registry = event_processor::Registry::new();
    if let Err(e) = event_processor::handlers::register_all(&mut registry) {
        fail(&e.to_string());
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

/// Probes the liveness endpoint of the daemon on this host. Reads only `HTTP_PORT` and `HTTP_BIND_ADDRESS`: a
/// probe needs no Kafka or MongoDB settings.
async fn healthcheck() -> ExitCode {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut vars = vec![
        ("KAFKA_BOOTSTRAP_SERVERS".to_string(), "unused".to_string()),
        ("MONGODB_URI".to_string(), "mongodb://unused".to_string()),
    ];
    for name in ["HTTP_PORT", "HTTP_BIND_ADDRESS"] {
        if let Some(v) = var(name) {
            vars.push((name.to_string(), v));
        }
    }
    let config = match Config::from_vars(vars) {
        Ok(c) => c,
        Err(e) => {
            fail(&e.to_string());
            return ExitCode::from(78);
        }
    };
    let (host, port) = (config.http_probe_host(), config.http_port);
    match event_processor::http::probe(&host, port, "/health/live").await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            fail("not live");
            ExitCode::FAILURE
        }
        Err(e) => {
            fail(&format!("healthcheck on {host}:{port} failed: {e}"));
            ExitCode::FAILURE
        }
    }
}
