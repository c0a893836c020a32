//! The daemon's entry point: parse the command line, read the configuration, install telemetry and the shutdown
//! signal, run the command.
//!
//! Exit codes: 0 done, 1 failed, 2 a usage error (an unknown command or option), 78 a configuration error (a
//! variable missing or malformed: `EX_CONFIG`), 130 a rebuild stopped by a signal (resumable).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use event_processor::{Config, redact, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Decoding JSON allocates many small objects per record; mimalloc serves them faster than the system allocator
/// (see `docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`'s text: the version, and the commit it was built from when known (`build.rs`).
fn version() -> String {
    match option_env!("EVENT_PROCESSOR_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("{} (commit {commit})", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Turns a PostgreSQL application's transactional outbox, as Debezium publishes it to Kafka, into MongoDB read
/// models. Configured by environment variables (see .env.example); `event-processor config` shows what it got.
#[derive(Parser, Debug)]
#[command(name = "event-processor", about, long_about = None, disable_version_flag = true)]
struct Cli {
    /// Print the version (and the commit it was built from) and exit.
    #[arg(short = 'V', long, action = clap::ArgAction::SetTrue)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (what runs without a command).
    Run,
    /// Probe the liveness endpoint of a daemon running on this host; exit 0 when it is live (the image's
    /// HEALTHCHECK). Reads only HTTP_PORT and HTTP_BIND_ADDRESS.
    Healthcheck,
    /// Re-run the dead letters present in DLQ_TOPIC now: only the handler a letter names (its siblings succeeded),
    /// or the whole record. Progress is kept under the group `<KAFKA_GROUP_ID>.dlq-replay.<handler|all>`.
    ReplayDlq {
        /// Replay only the letters of this handler.
        handler: Option<String>,
    },
    /// Rebuild read models from the topics' history while the live daemon runs, then switch readers and the
    /// daemon to them (docs/REBUILDING.md). Progress: a bar on a terminal, JSON lines otherwise.
    Rebuild(RebuildArgs),
    /// Ask Debezium, through its signal table, for an incremental snapshot of the outbox table: its rows are
    /// emitted again (history retention removed from the topics). Needs OUTBOX_DATABASE_URL.
    SnapshotOutbox {
        /// The outbox table.
        #[arg(
            long,
            value_name = "SCHEMA.TABLE",
            default_value = "activity.event_outbox"
        )]
        table: String,
        /// The connector's signal table (`signal.data.collection`).
        #[arg(
            long,
            value_name = "SCHEMA.TABLE",
            default_value = "activity.debezium_signal"
        )]
        signal_table: String,
    },
    /// Print the configuration the daemon would run with, as JSON: every variable with the value it takes
    /// (defaults included) and the KAFKA_PROPERTY_* pass-through, secrets hidden. Exits 78 when it is invalid.
    Config,
    /// Print the RECORD_FORMATS format of the records a Kafka Connect connector configuration produces (the JSON
    /// PUT to /connectors/<name>/config, or a file holding {"name": ..., "config": {...}}).
    Format {
        /// The connector configuration file.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RebuildArgs {
    /// A handler whose read models to rebuild (repeat for several).
    #[arg(
        long = "handler",
        value_name = "NAME",
        required_unless_present = "drop_retired"
    )]
    handlers: Vec<String>,
    /// Rebuild from what the topics still hold even when their oldest events are gone.
    #[arg(long, conflicts_with = "drop_retired")]
    allow_incomplete_history: bool,
    /// Remove the collections earlier rebuilds replaced, instead of rebuilding.
    #[arg(long)]
    drop_retired: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything can print: every secret of the environment is hidden from every line from here on.
    redact::install_from_env();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and usage go where clap sends them (help to stdout, exit 0; a usage error to stderr, exit 2).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if cli.version {
        out(&format!("event-processor {}", version()));
        return ExitCode::SUCCESS;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run().await,
        Command::Healthcheck => healthcheck().await,
        Command::ReplayDlq { handler } => replay(handler).await,
        Command::Rebuild(args) => rebuild(args).await,
        Command::SnapshotOutbox {
            table,
            signal_table,
        } => snapshot(&table, &signal_table).await,
        Command::Config => print_config(),
        Command::Format { file } => print_format(&file),
    }
}

/// A command's result on stdout. A reader that went away (`| head`) is not an error of the command.
fn out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// One line on stderr, secrets hidden.
fn fail(message: &str) {
    eprintln!("event-processor: {}", redact::scrub(message.trim_end()));
}

/// The configuration from the environment, or the exit code 78 (EX_CONFIG) after saying what is wrong.
fn configuration() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|e| {
        fail(&e.to_string());
        ExitCode::from(78)
    })
}

/// Configuration, logging and the shutdown signal, as every long-running command needs them.
fn start() -> Result<(Config, CancellationToken), ExitCode> {
    let config = configuration()?;
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

fn registry() -> Result<event_processor::Registry, ExitCode> {
    let mut registry = event_processor::Registry::new();
    event_processor::handlers::register_all(&mut registry).map_err(|e| {
        fail(&e.to_string());
        ExitCode::FAILURE
    })?;
    Ok(registry)
}

async fn rebuild(args: RebuildArgs) -> ExitCode {
    let (config, token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    if args.drop_retired {
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
    let registry = match registry() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let options = event_processor::rebuild::Options {
        handlers: args.handlers,
        allow_incomplete_history: args.allow_incomplete_history,
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

async fn snapshot(table: &str, signal_table: &str) -> ExitCode {
    let Some(url) = std::env::var(event_processor::names::OUTBOX_DATABASE_URL)
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
    match event_processor::rebuild::snapshot_outbox(&config, &url, signal_table, table).await {
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

async fn replay(handler: Option<String>) -> ExitCode {
    let (config, token) = match start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    let registry = match registry() {
        Ok(r) => r,
        Err(code) => return code,
    };
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

/// The effective configuration as JSON, secrets hidden: what a container really got.
fn print_config() -> ExitCode {
    let config = match configuration() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shown = config.effective();
    // Hidden twice over: `Config` serializes its secrets redacted, and the text goes through the same redaction as
    // every other output.
    match serde_json::to_string_pretty(&shown) {
        Ok(text) => {
            out(&redact::scrub(&text));
            ExitCode::SUCCESS
        }
        Err(e) => {
            fail(&format!("cannot print the configuration: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The record format of a connector configuration file.
fn print_format(file: &std::path::Path) -> ExitCode {
    let parsed = std::fs::read_to_string(file)
        .map_err(|e| format!("reading {}: {e}", file.display()))
        .and_then(|text| {
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("{} is not JSON: {e}", file.display()))
        });
    let doc = match parsed {
        Ok(doc) => doc,
        Err(e) => {
            fail(&e);
            return ExitCode::FAILURE;
        }
    };
    let config = doc.get("config").unwrap_or(&doc);
    let Some(config) = config.as_object() else {
        fail(&format!(
            "{} holds no connector configuration object",
            file.display()
        ));
        return ExitCode::FAILURE;
    };
    out(&event_processor::decode::Format::for_connector(config).to_string());
    ExitCode::SUCCESS
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
