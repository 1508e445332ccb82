//! apexd's log output: the tracing subscriber the daemon installs (the filter and the format,
//! text or JSON, on standard error). The lines themselves are written where things happen
//! (`shard::session_log` for sessions); the ready line on standard output is not a log line
//! and never goes through here.

use std::io::IsTerminal;

use anyhow::{anyhow, Result};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the process's subscriber: events passing `filter` (a tracing filter such as
/// `info` or `apexd=debug`) go to standard error as `format` says. JSON lines carry
/// `timestamp`, `level`, `target`, `fields` (the message among them) and the span's fields.
pub fn init(filter: &str, format: LogFormat) -> Result<()> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| anyhow!("invalid --log filter '{filter}': {e}"))?;
    // Colours only for a person at a terminal: a file, a pipe or the journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(false).try_init(),
    };
    installed.map_err(|e| anyhow!("cannot install the log subscriber: {e}"))
}
