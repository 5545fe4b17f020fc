//! Wiring only: parse the command line, load config, start logging, run, exit with the code.

use std::process::ExitCode;

use seedkeeper::cli::{self, Command};
use seedkeeper::config::Sources;
use seedkeeper::error::exit;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args()) {
        Ok(c) => c,
        Err(code) => return ExitCode::from(code),
    };
    let sources = Sources::from_process(cli.config.clone());
    let settings = match cli::load_settings(&cli, &sources) {
        Ok(s) => s,
        Err(code) => return ExitCode::from(code),
    };
    seedkeeper::telemetry::init(settings.log.format, &settings.log.filter);
    seedkeeper::telemetry::install_crypto();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            seedkeeper::telemetry::print_error(
                &format!("cannot start the async runtime: {e}"),
                "io",
                exit::RECONCILE_FAILED,
            );
            return ExitCode::from(exit::RECONCILE_FAILED);
        }
    };
    let code = runtime.block_on(async move {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone());
        let daemon = matches!(cli.command, Some(Command::Run { once: false }) | None) && !cli.once;
        if daemon {
            run_daemon(settings, cancel).await
        } else {
            cli::execute(&cli, settings, cancel, &mut std::io::stdout()).await
        }
    });
    // The scheduler keeps helper tasks alive; do not let them hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

async fn run_daemon(settings: seedkeeper::config::Settings, cancel: CancellationToken) -> u8 {
    let application = match seedkeeper::app::Application::build(settings).await {
        Ok(a) => a,
        Err(e) => {
            let code = e.exit_code();
            seedkeeper::telemetry::print_error(&e.to_string(), e.kind().as_str(), code);
            return code;
        }
    };
    tracing::info!(http.listen = %application.local_addr(), "seedkeeper daemon started");
    match application.run_until_stopped(cancel).await {
        Ok(()) => exit::OK,
        Err(e) => cli::fail(&e),
    }
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
        seedkeeper::telemetry::print_error("second signal: exiting now", "signal", 130);
        std::process::exit(130);
    });
}
