//! Logs go to journald (structured fields) when systemd started us with its journal as our
//! stream, to stderr otherwise.

use crate::config::LogFormat;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// `RUST_LOG` overrides the configured level, for debugging a single run.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            registry
                .with(journald.with_syslog_identifier("gatewayd".into()))
                .init();
            return;
        }
    }
    use std::io::IsTerminal;
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => registry.with(stderr).init(),
        LogFormat::Json => registry.with(stderr.json()).init(),
    }
}
