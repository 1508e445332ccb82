//! apexd's log output: the tracing subscriber the daemon installs (the filter and the format,
//! text or JSON, on standard error). The lines themselves are written where things happen
//! (`shard::session_log` for sessions); the ready line on standard output is not a log line
//! and never goes through here.

use std::io::IsTerminal;

use anyhow::{anyhow, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogFormat;
use crate::reload::SetLogFilter;

/// Installs the process's subscriber: events passing `filter` (a tracing filter such as
/// `info` or `apexd=debug`) go to standard error as `format` says. JSON lines carry
/// `timestamp`, `level`, `target`, `fields` (the message among them) and the span's fields.
/// Returns what changes the filter later (a reload: SIGHUP).
pub fn init(filter: &str, format: LogFormat) -> Result<SetLogFilter> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| anyhow!("invalid --log filter '{filter}': {e}"))?;
    // Colours only for a person at a terminal: a file, a pipe or the journal gets plain text.
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(text),
        LogFormat::Json => Box::new(text.json().flatten_event(false)),
    };
    // The filter sits behind a reload layer so that SIGHUP can change it.
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(lines)
        .with(filter)
        .try_init()
        .map_err(|e| anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(Box::new(move |log: &str| {
        let filter =
            EnvFilter::try_new(log).map_err(|e| anyhow!("'{log}' is not a log filter: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| anyhow!("cannot change the log filter: {e}"))
    }))
}
