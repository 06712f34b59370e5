//! Logging for code that runs inside someone else's process: silent unless asked.

use std::path::Path;
use std::sync::Once;

/// Installs a `tracing` subscriber if `BPFTIME_LOG` is set: to `BPFTIME_LOG_FILE` when given,
/// else stderr. Without `BPFTIME_LOG` nothing is ever printed.
pub fn init_from_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(level) = std::env::var("BPFTIME_LOG") else {
            return;
        };
        init(
            &level,
            std::env::var_os("BPFTIME_LOG_FILE")
                .as_deref()
                .map(Path::new),
        );
    });
}

/// Installs a `tracing` subscriber at `level`, writing to `file` when given (else stderr); for
/// an agent injected by `bpftime attach --log`, whose environment says nothing. A no-op when a
/// subscriber is already installed.
pub fn init(level: &str, file: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false);
    let _ = match file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    }) {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
