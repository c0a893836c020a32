//! The tracing subscriber: JSON lines in containers, human-readable output on a terminal. Owns nothing else.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to stdout. Returns an error when one is already installed (tests
/// install their own).
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    init_with_writer(level, format, std::io::stdout)
}

/// [`init`], writing to `writer` (the benchmark keeps the daemon's lines in a file).
pub fn init_with_writer<W>(level: &str, format: LogFormat, writer: W) -> Result<(), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}
