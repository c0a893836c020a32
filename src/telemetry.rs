//! The tracing subscriber: JSON lines in containers, human-readable output on a terminal. Every line leaves
//! through a writer that hides the secrets of the environment (`redact::scrub`). Owns nothing else.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;
use crate::redact::Scrubbing;

/// Installs the global subscriber, writing to stdout (in colour only when stdout is a terminal). Returns an error
/// when one is already installed (tests install their own).
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    install(
        level,
        format,
        std::io::stdout,
        std::io::stdout().is_terminal(),
    )
}

/// [`init`], writing to `writer`, without colour (the benchmark keeps the daemon's lines in a file).
pub fn init_with_writer<W>(level: &str, format: LogFormat, writer: W) -> Result<(), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    install(level, format, writer, false)
}

fn install<W>(level: &str, format: LogFormat, writer: W, ansi: bool) -> Result<(), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(ScrubbingWriter(writer));
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

/// Makes writers that scrub secrets from what they write.
struct ScrubbingWriter<W>(W);

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for ScrubbingWriter<W> {
    type Writer = Scrubbing<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Scrubbing(self.0.make_writer())
    }
}
