//! The process: parse the command line, load config, start logging, run, exit with the code.
//! The binary (`src/main.rs`) only calls [`main`]; this is the library's one public entry.

use std::process::ExitCode;

use crate::cli;
use crate::config::ConfigLayers;
use crate::error::exit;
use tokio_util::sync::CancellationToken;

/// Runs seedkeeper with the process's arguments and environment; returns its exit code.
pub fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args()) {
        Ok(c) => c,
        Err(code) => return ExitCode::from(code),
    };
    // Any other error (no /dev/null in a bare chroot) says nothing of the limit: start anyway.
    if descriptors_to_start().is_err_and(|e| crate::error::is_too_many_open_files(&e)) {
        return out_of_descriptors("starting the async runtime and its signal handlers");
    }
    // The runtime first: SIGHUP's default action (terminate) is replaced before anything else
    // happens, config loading included.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) if crate::error::is_too_many_open_files(&e) => {
            return out_of_descriptors("starting the async runtime");
        }
        Err(e) => {
            crate::telemetry::print_error(
                &format!("cannot start the async runtime: {e}"),
                "io",
                exit::RECONCILE_FAILED,
            );
            return ExitCode::from(exit::RECONCILE_FAILED);
        }
    };
    let hangup = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    });
    let sources = ConfigLayers::from_process(cli.config.clone());
    let settings = match cli::load_settings(&cli, &sources) {
        Ok(s) => s,
        Err(code) => return ExitCode::from(code),
    };
    crate::telemetry::init(settings.log.format, &settings.log.filter);
    crate::telemetry::install_crypto();
    settings.log_provenance();
    let code = runtime.block_on(async move {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone());
        if let Some(hangup) = hangup {
            tokio::spawn(ignore_hangups(hangup));
        }
        cli::execute(&cli, settings, cancel, &mut std::io::stdout()).await
    });
    // The scheduler keeps helper tasks alive; do not let them hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

/// The descriptors the async runtime and its signal handlers open before anything can report
/// an error (the I/O driver's poller and waker, the signal pipe), plus one: under `ulimit -n` 6
/// or 7 the signal handlers' setup panicked inside tokio instead.
const STARTUP_DESCRIPTORS: usize = 5;

/// Whether [`STARTUP_DESCRIPTORS`] descriptors can be opened (then closed at once).
fn descriptors_to_start() -> std::io::Result<()> {
    let mut held = Vec::with_capacity(STARTUP_DESCRIPTORS);
    for _ in 0..STARTUP_DESCRIPTORS {
        held.push(std::fs::File::open("/dev/null")?);
    }
    Ok(())
}

/// Exits 71 when the process is out of descriptors before it could start (`doing`), with the
/// message every run out of descriptors gives (the limit to raise).
fn out_of_descriptors(doing: &str) -> ExitCode {
    let e = crate::error::Error::TooManyOpenFiles {
        doing: doing.to_string(),
    };
    crate::telemetry::print_error(&e.to_string(), "too_many_open_files", exit::OS_ERROR);
    ExitCode::from(exit::OS_ERROR)
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once.
fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received: stopping (send it again to exit at once)");
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        crate::telemetry::print_error("second signal: exiting now", "signal", 130);
        std::process::exit(130);
    });
}

/// SIGHUP is logged and ignored, whatever runs (the daemon, `--once`, any command). Its
/// default action would end the process mid-run, and it comes uninvited: logrotate's
/// `postrotate` sends it, as does a closing terminal or `systemctl reload`. seedkeeper logs to
/// stderr, so there is no log file to reopen, and the configuration is read once per process
/// (restart it to apply a change), so there is nothing to reload.
async fn ignore_hangups(mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        tracing::info!(
            signal = "SIGHUP",
            "SIGHUP received and ignored: seedkeeper logs to stderr (nothing to reopen) and reads its configuration at start (restart it to apply a change)"
        );
    }
}
