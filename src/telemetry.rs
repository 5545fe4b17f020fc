//! Logging: `tracing` to stderr, text or JSON. `RUST_LOG` overrides `log.filter`. The cron
//! scheduler logs every tick at INFO, so it is held to WARN unless asked for.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, filter: &str) {
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| filter.to_string());
    let directives = if base.contains("tokio_cron_scheduler") {
        base
    } else {
        format!("{base},tokio_cron_scheduler=warn")
    };
    let env = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_cron_scheduler=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// rustls needs one process-wide crypto provider; ring keeps cmake and aws-lc out of the build.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
