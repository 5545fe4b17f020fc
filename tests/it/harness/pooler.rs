//! A real PgBouncer of a test's own (Debian's `pgbouncer` package), in front of the test
//! PostgreSQL: a config in a temp dir, `auth_type = trust` with the admin URL's user in its
//! `auth_file`, a wildcard `[databases]` entry (every database name goes to the server under the
//! same name, so each test's own database is reachable through it), listening on a free loopback
//! port; started here and stopped on `Drop`. Run as `postgres` when the tests run as root
//! (PgBouncer refuses root).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;

use super::{admin_url, TempDir};

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

pub struct PgBouncer {
    child: Child,
    pub dir: TempDir,
    pub port: u16,
    user: String,
}

fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("pgbouncer is needed for the connection pooler tests (tests/it/pooler.rs) and is not installed: apt-get install pgbouncer (.ci/run installs it)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgBouncer {
    /// PgBouncer in `mode` with `default_pool_size` server connections per database and user,
    /// and `extra` lines for its `[pgbouncer]` section (`ignore_startup_parameters = options`,
    /// say); ready (accepting connections) when this returns.
    pub fn start(mode: PoolMode, pool_size: u32, extra: &[&str]) -> PgBouncer {
        let server = tokio_postgres::Config::from_str(&admin_url())
            .expect("SEEDKEEPER_TEST_DATABASE_URL is a PostgreSQL URL");
        let host = match server.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let user = server.get_user().unwrap_or("postgres").to_string();
        let port = super::spawn::free_port();
        let dir = TempDir::new();
        dir.write("users.txt", &format!("\"{user}\" \"\"\n"));
        let config = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 200\n\
             logfile = {log}\n\
             {extra}\n",
            auth = dir.0.join("users.txt").display(),
            mode = mode.as_str(),
            log = dir.0.join("pgbouncer.log").display(),
            extra = extra.join("\n"),
        );
        let ini = dir.write("pgbouncer.ini", &config);
        let mut cmd = Command::new(binary());
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir.0)
                .status();
            cmd.args(["-u", "postgres"]);
        }
        let mut child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        super::spawn::wait_for_port("pgbouncer", port, &mut child, 30);
        PgBouncer {
            child,
            dir,
            port,
            user,
        }
    }

    /// The URL of database `db` through this PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{db}", self.user, self.port)
    }

    /// PgBouncer's log so far (for a failing assertion's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
