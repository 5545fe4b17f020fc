//! The one way tests and benches start the `seedkeeper` binary: the executable cargo built for
//! them (debug for tests, release for `cargo bench`), a clean environment (`PATH` and the pairs
//! given, nothing inherited, so a developer's `SEEDKEEPER_*` never leaks in), run from the crate
//! root. Self-contained: the benches include it with `#[path]`.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

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

/// A child started by [`spawn_bin_watched`]: its stdout discarded, its stderr (the log) kept
/// line by line as it comes, by a thread that reads it to the end so the pipe never fills.
pub struct Watched {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    /// The log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().expect("the log lines").clone()
    }

    /// Whether a line so far contains every one of `parts`.
    pub fn logged(&self, parts: &[&str]) -> bool {
        self.lines
            .lock()
            .expect("the log lines")
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }
}

/// Starts the binary with its log (stderr) watched, for a test that waits for a line of it.
pub fn spawn_bin_watched(args: &[&str], env: &[(String, String)]) -> Watched {
    let mut child = command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn seedkeeper binary");
    let stderr = child.stderr.take().expect("the child's stderr");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            keep.lock().expect("the log lines").push(line);
        }
    });
    Watched { child, lines }
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

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (a server `child` started,
/// named `what`); fails the test after `secs` seconds, saying what it waited for and how the
/// child ended if it did.
pub fn wait_for_port(what: &str, port: u16, child: &mut Child, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before it listened on 127.0.0.1:{port}");
        }
        if std::time::Instant::now() >= deadline {
            panic!("{what} did not listen on 127.0.0.1:{port} within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs the binary as `run_bin` does, but on a pseudo-terminal (stdin, stdout and stderr all on
/// it, 24x120, `TERM=xterm`), as a person at a terminal would: what it drew, stdout and stderr
/// mixed as the terminal showed them, comes back as stdout. Python's `pty` module makes the
/// terminal: it is on every CI machine, unlike a pty crate, and behaves the same everywhere,
/// unlike the options of `script`.
pub fn run_bin_in_terminal(args: &[&str], env: &[(String, String)]) -> Output {
    const RELAY: &str = r#"
import fcntl, os, pty, struct, subprocess, sys, termios
master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
child = subprocess.Popen(sys.argv[1:], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
os.close(slave)
out = bytearray()
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:  # EIO: the terminal's other side is closed, the child is done
        break
    if not chunk:
        break
    out += chunk
code = child.wait()
sys.stdout.buffer.write(bytes(out))
sys.exit(code if code >= 0 else 128 - code)
"#;
    let plain = command(args, env);
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(RELAY)
        .arg(plain.get_program())
        .args(plain.get_args())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "python3 (with its pty module) runs the binary on a pseudo-terminal and could not be \
             started ({e}): install Debian's python3 package (apt-get install python3)"
        )
    })
}
