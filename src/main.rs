//! The daemon's entry point: read config, install telemetry and the shutdown signal, run.
//!
//! `event-processor` runs the daemon; `event-processor healthcheck` probes a running one (used by the image's
//! HEALTHCHECK); `event-processor replay-dlq [HANDLER]` re-runs the dead letters present now (of one handler);
//! `event-processor rebuild --handler NAME...` rebuilds read models from history while the daemon runs
//! (`--drop-retired` removes the collections rebuilds replaced); `event-processor snapshot-outbox` asks Debezium
//! to emit the outbox table's rows again.

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
        Some("rebuild") => rebuild(&args[1..]).await,
        Some("snapshot-outbox") => snapshot(&args[1..]).await,
        Some(other) => {
            fail(&format!("unknown command `{other}`; {USAGE}"));
            ExitCode::from(2)
        }
    }
}

const USAGE: &str = "usage: event-processor [run | healthcheck | replay-dlq [HANDLER] | rebuild --handler NAME... \
     [--allow-incomplete-history] | rebuild --drop-retired | snapshot-outbox [--table SCHEMA.TABLE] \
     [--signal-table SCHEMA.TABLE]]";

/// Command-line options: `--name VALUE` (or `--name=VALUE`) for the names in `valued`, repeatable, and the bare
/// `flags`; anything else is an error.
struct Args {
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    fn parse(args: &[String], valued: &[&str], flags: &[&str]) -> Result<Args, String> {
        let mut out = Args {
            values: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some((name, v)) = a.split_once('=').filter(|(n, _)| valued.contains(n)) {
                out.values.push((name.to_string(), v.to_string()));
            } else if valued.contains(&a.as_str()) {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                out.values.push((a.clone(), v.clone()));
            } else if flags.contains(&a.as_str()) {
                out.flags.push(a.clone());
            } else {
                return Err(format!("unexpected argument `{a}`"));
            }
        }
        Ok(out)
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn last_or(&self, name: &str, default: &str) -> String {
        self.all(name).pop().unwrap_or_else(|| default.to_string())
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn usage_error(e: String) -> ExitCode {
    fail(&format!("{e}; {USAGE}"));
    ExitCode::from(2)
}

async fn rebuild(args: &[String]) -> ExitCode {
    let args = match Args::parse(
        args,
        &["--handler"],
        &["--allow-incomplete-history", "--drop-retired"],
    ) {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    let (config, token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    if args.has("--drop-retired") {
        return match event_processor::rebuild::drop_retired(&config).await {
            Ok(dropped) => {
                println!(
                    "dropped {} retired collections: {}",
                    dropped.len(),
                    dropped.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                fail(&format!("{e:#}"));
                ExitCode::FAILURE
            }
        };
    }
    let mut registry = event_processor::Registry::new();
    if let Err(e) = event_processor::handlers::register_all(&mut registry) {
        fail(&e.to_string());
        return ExitCode::FAILURE;
    }
    let options = event_processor::rebuild::Options {
        handlers: args.all("--handler"),
        allow_incomplete_history: args.has("--allow-incomplete-history"),
    };
    match event_processor::rebuild::run(config, registry, options, token).await {
        Ok(Some(done)) => {
            println!(
                "rebuild {} finished in {:.1} s: {} records; {} now read from database {} (route generation {})",
                done.number,
                done.elapsed.as_secs_f64(),
                done.records,
                done.collections.join(", "),
                done.database,
                done.generation
            );
            ExitCode::SUCCESS
        }
        // Stopped by a signal: resumable, and not finished.
        Ok(None) => ExitCode::from(130),
        Err(e) => {
            fail(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn snapshot(args: &[String]) -> ExitCode {
    let args = match Args::parse(args, &["--table", "--signal-table"], &[]) {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    let table = args.last_or("--table", "activity.event_outbox");
    let signal_table = args.last_or("--signal-table", "activity.debezium_signal");
    let Some(url) = std::env::var(event_processor::rebuild::OUTBOX_DATABASE_URL)
        .ok()
        .filter(|u| !u.is_empty())
    else {
        fail("OUTBOX_DATABASE_URL is not set (postgres://user:password@host:port/database)");
        return ExitCode::from(78);
    };
    let (config, _token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    match event_processor::rebuild::snapshot_outbox(&config, &url, &signal_table, &table).await {
        Ok(id) => {
            println!(
                "requested an incremental snapshot of {table} (signal {id} in {signal_table})"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            fail(&format!("{e:#}"));
            ExitCode::FAILURE
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
