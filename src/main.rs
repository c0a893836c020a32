//! The daemon's entry point: read config, install telemetry and the shutdown signal, run.
//!
//! `event-processor` runs the daemon; `event-processor healthcheck` probes a running one (used by the image's
//! HEALTHCHECK).

use std::process::ExitCode;

use event_processor::{Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("run") => run().await,
        Some("healthcheck") => healthcheck().await,
        Some(other) => {
            eprintln!("unknown command `{other}`; usage: event-processor [run|healthcheck]");
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
