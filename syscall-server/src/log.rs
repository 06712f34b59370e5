//! Logging to stderr, only when `BPFTIME_LOG` is set (its value is a `tracing` filter such as
//! `debug`); otherwise nothing is ever printed into the loader's output.

use std::sync::Once;

static INIT: Once = Once::new();

/// Installs the stderr logger once, if `BPFTIME_LOG` is set.
pub fn init() {
    INIT.call_once(|| {
        let Ok(spec) = std::env::var(crate::LOG_ENV) else {
            return;
        };
        if spec.is_empty() {
            return;
        }
        let filter = tracing_subscriber::EnvFilter::try_new(&spec)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .try_init();
    });
}
