//! A throwaway PostgreSQL cluster of a test's own (initdb in a temp dir, trust auth, a free
//! port), for tests that stop and start the server or change its configuration without
//! touching the server the other tests share. Run as `postgres` through `runuser` when the
//! tests run as root (initdb refuses root).

use std::path::PathBuf;
use std::process::{Command, Output};

use super::{text, TempDir};

pub struct OwnCluster {
    bin: PathBuf,
    /// The temp dir: the data directory is `pg/` in it; the rest is the test's.
    pub dir: TempDir,
    pub port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl OwnCluster {
    /// A new cluster, initialised and not started: the caller may add to its configuration
    /// first (see [`OwnCluster::pgdata`]).
    pub fn init() -> OwnCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql are needed for this test: install Debian's postgresql package (apt-get install postgresql)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql/*/bin: install Debian's postgresql package (apt-get install postgresql)");
        let port = super::spawn::free_port();
        let c = OwnCluster {
            bin,
            dir: TempDir::new(),
            port,
        };
        std::fs::create_dir_all(c.pgdata()).unwrap();
        c.chown();
        let out = c
            .as_postgres("initdb")
            .arg("-D")
            .arg(c.pgdata())
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {}", text(&out));
        c
    }

    /// A hot standby of `primary` (started), made by `pg_basebackup -R`: it streams from the
    /// primary and answers reads; every write is refused (SQLSTATE 25006).
    pub fn standby_of(primary: &OwnCluster) -> OwnCluster {
        let c = OwnCluster {
            bin: primary.bin.clone(),
            dir: TempDir::new(),
            port: super::spawn::free_port(),
        };
        c.chown();
        let out = c
            .as_postgres("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(c.pgdata())
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()
            .expect("pg_basebackup");
        assert!(out.status.success(), "pg_basebackup: {}", text(&out));
        c.start();
        c
    }

    /// A new cluster, started.
    pub fn new() -> OwnCluster {
        let c = OwnCluster::init();
        c.start();
        c
    }

    /// The data directory.
    pub fn pgdata(&self) -> PathBuf {
        self.dir.0.join("pg")
    }

    /// `program` of the server's binaries, run as `postgres` when the tests run as root.
    pub fn as_postgres(&self, program: &str) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        }
    }

    /// Gives the temp dir to `postgres` when the tests run as root (after writing files in it).
    pub fn chown(&self) {
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&self.dir.0)
                .status();
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.pgdata())
            .args(args)
            .output()
            .expect("pg_ctl")
    }

    /// Starts the server on 127.0.0.1 and its port, with its socket in the data directory.
    pub fn start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.pgdata().display()
        );
        let log = self.pgdata().join("server.log");
        let out = self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn stop(&self) {
        let out = self.pg_ctl(&["-w", "-m", "fast", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    /// The `postgres` database over TCP, as `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}
