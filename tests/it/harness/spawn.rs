//! The one way tests and benches start the `seedkeeper` binary: the executable cargo built for
//! them (debug for tests, release for `cargo bench`), a clean environment (`PATH` and the pairs
//! given, nothing inherited, so a developer's `SEEDKEEPER_*` never leaks in), run from the crate
//! root. Self-contained: the benches include it with `#[path]`.

use std::process::{Child, Command, Output, Stdio};

/// The binary with `args` and `env`, not started: the caller picks where its output goes.
pub fn command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seedkeeper"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to its end; its exit status and captured output.
pub fn run_bin(args: &[&str], env: &[(String, String)]) -> Output {
    command(args, env).output().expect("run seedkeeper binary")
}

/// Starts the binary with its output discarded (a daemon, or a run to be killed).
pub fn spawn_bin(args: &[&str], env: &[(String, String)]) -> Child {
    command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn seedkeeper binary")
}

/// A port free at the time of asking, for a process started here to listen on (its
/// `http.listen`, a server's port): the OS picks it, then the probe lets it go.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("the bound address")
        .port()
}
