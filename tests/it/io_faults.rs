//! The I/O edges, with the real binary: a log that cannot be written (stderr on `/dev/full`, a
//! log file on a full tmpfs) never stops a run and is counted; a command whose own output cannot
//! be written exits 74; hostile HTTP clients (2,000 slowloris connections, silent and idle
//! kept-alive connections, a cap filled with idle connections) are closed by the server while
//! the probes keep answering; running out of file descriptors is named as such (exit 71), not
//! as PostgreSQL being unavailable.

use std::fs::OpenOptions;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::spawn::{command, free_port, wait_for_port};
use crate::harness::*;

/// `/dev/full`, opened for writing: every write fails with ENOSPC.
fn dev_full() -> std::fs::File {
    OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full (a Linux character device) opened for writing")
}

fn env_of(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// The value of an unlabelled sample (`name value`) in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn once_with_stderr_on_dev_full_converges_the_database_and_exits_0() {
    let db = TestDb::new().await;
    for format in ["text", "json"] {
        // Debug logging: many lines, every one of them lost.
        let env = env_of(
            &db,
            &[("RUST_LOG", "debug"), ("SEEDKEEPER_LOG__FORMAT", format)],
        );
        let out = command(&["--once"], &env)
            .stdout(Stdio::piped())
            .stderr(dev_full())
            .output()
            .expect("run seedkeeper --once");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{format}: --once 2>/dev/full must run and exit 0; stdout: {stdout}"
        );
        assert!(stdout.contains("succeeded"), "{format}: {stdout}");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 6);
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_whose_output_cannot_be_written_exits_74_and_says_so_on_stderr() {
    let db = TestDb::new().await;
    let env = db.env();
    let to_full = |args: &[&str]| {
        command(args, &env)
            .stdout(dev_full())
            .stderr(Stdio::piped())
            .output()
            .expect("run seedkeeper")
    };
    for args in [
        &["config"][..],
        &["export-sql"],
        &["--once"],
        &["status"],
        &["migrate"],
    ] {
        let out = to_full(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{args:?} >/dev/full: {stderr}");
        assert!(
            stderr.contains("cannot write the command's output to stdout")
                && stderr.contains("No space left on device"),
            "{args:?}: {stderr}"
        );
    }
    // The run itself happened: only its summary was lost.
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 6);
    // `plan` in sync would exit 0, with changes 2: either way its listing is lost, so 74.
    let out = to_full(&["plan"]);
    assert_eq!(out.status.code(), Some(74), "{}", text(&out));
    // The same commands to a working stdout exit 0 (the 74 above is the output's doing).
    let ok = command(&["config"], &env).output().expect("config");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
}

/// A tmpfs of 64 KiB mounted for the test, filled up; unmounted on drop.
struct FullTmpfs(TempDir);

impl FullTmpfs {
    fn new() -> FullTmpfs {
        let dir = TempDir::new();
        let path = dir.0.display().to_string();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", &path])
            .output()
            .expect("run mount");
        assert!(
            mounted.status.success(),
            "mounting a 64 KiB tmpfs at {path} failed ({}): this test needs root (CAP_SYS_ADMIN) \
             to make a full filesystem for the daemon's log: {}",
            mounted.status,
            String::from_utf8_lossy(&mounted.stderr)
        );
        let fs = FullTmpfs(dir);
        // Fill it: the write fails with ENOSPC once the 64 KiB are used.
        let mut filler = std::fs::File::create(fs.0 .0.join("filler")).expect("the filler file");
        let chunk = vec![b'x'; 4096];
        let full = loop {
            if let Err(e) = std::io::Write::write_all(&mut filler, &chunk) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(28), "ENOSPC: {full}");
        fs
    }
}

impl Drop for FullTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.0 .0)
            .status();
    }
}

/// SIGTERM, then the exit status within 15 s (killed after).
fn stop(mut child: Child) -> Option<i32> {
    sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_logging_to_a_full_disk_keeps_running_and_counts_the_lost_lines() {
    let db = TestDb::new().await;
    let fs = FullTmpfs::new();
    let log = std::fs::File::create(fs.0 .0.join("seedkeeper.log")).expect("the log file");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_of(
        &db,
        &[
            ("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *"),
            ("SEEDKEEPER_HTTP__LISTEN", &listen),
            ("RUST_LOG", "debug"),
        ],
    );
    let mut child = command(&["run"], &env)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn the daemon");
    wait_for_port("the daemon", port, &mut child, 30);
    let base = format!("http://{listen}");
    // Several runs, each of which logs: none stopped by its first lost line.
    until(
        "5 runs recorded while every log line is lost",
        60,
        || async {
            db.scalar_or_zero("SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'")
                .await
                >= 5
        },
    )
    .await;
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 6);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lost = sample(&metrics, "seedkeeper_log_write_errors_total")
        .unwrap_or_else(|| panic!("no seedkeeper_log_write_errors_total in /metrics: {metrics}"));
    assert!(lost > 0.0, "lost log lines counted: {lost}");
    let runs: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("seedkeeper_runs_total{outcome=\"succeeded\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(runs >= 5.0, "runs_total moves: {runs}");
    assert_eq!(status_of(&format!("{base}/healthz")).await, 200);
    assert_eq!(status_of(&format!("{base}/readyz")).await, 200);
    println!("{runs} runs, {lost} log lines lost and counted");
    assert_eq!(stop(child), Some(0), "SIGTERM: exit 0");
    drop(fs);
}

/// A daemon process of the test's own on a free port, ready (its startup run succeeded).
async fn ready_daemon(db: &TestDb, extra: &[(&str, &str)]) -> (Child, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut pairs = vec![
        ("SEEDKEEPER_HTTP__LISTEN", listen.as_str()),
        ("SEEDKEEPER_EVENTS__ENABLED", "false"),
    ];
    pairs.extend_from_slice(extra);
    let env = env_of(db, &pairs);
    let mut child = command(&["run"], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the daemon");
    wait_for_port("the daemon", port, &mut child, 30);
    let base = format!("http://{listen}");
    let ready = format!("{base}/readyz");
    until("the daemon is ready", 30, || async {
        status_of(&ready).await == 200
    })
    .await;
    (child, base)
}

/// A GET on a new connection (as a kubelet probe makes it): its status and how long it took.
async fn probe(url: &str) -> (u16, Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let t = Instant::now();
    let status = match client.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    };
    (status, t.elapsed())
}

/// How long after it was connected the server closed a connection (EOF or reset), waiting at
/// most `limit`; `None` if it was still open then. Whatever `trickle` writes is sent every
/// `every`, as long as the server takes it.
async fn closed_after(
    mut stream: TcpStream,
    first: &'static [u8],
    trickle: &'static [u8],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    closed_since(Instant::now(), &mut stream, first, trickle, every, limit).await
}

/// [`closed_after`], timed from `start` (when the connection was made).
async fn closed_since(
    start: Instant,
    stream: &mut TcpStream,
    first: &'static [u8],
    trickle: &'static [u8],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    if stream.write_all(first).await.is_err() {
        return Some(start.elapsed());
    }
    let (mut rd, mut wr) = stream.split();
    let reader = async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    };
    let writer = async {
        loop {
            tokio::time::sleep(every).await;
            if trickle.is_empty() {
                continue;
            }
            if wr.write_all(trickle).await.is_err() {
                // Writing failed: the reader sees the close.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        closed = reader => Some(closed),
        _ = writer => None,
        _ = tokio::time::sleep(limit) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_slowloris_connections_are_closed_within_the_header_timeout_and_probes_answer_meanwhile(
) {
    const HOSTILE: usize = 2000;
    let header_timeout = Duration::from_secs(8);
    let db = TestDb::new().await;
    // A cap above the 2,000, so that every one is held until its header timeout (the cap's own
    // test is below).
    let (child, base) = ready_daemon(
        &db,
        &[
            ("SEEDKEEPER_HTTP__HEADER_READ_TIMEOUT", "8s"),
            ("SEEDKEEPER_HTTP__MAX_CONNECTIONS", "4096"),
            ("SEEDKEEPER_SCHEDULE__CRON", "*/2 * * * * *"),
        ],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&metrics, "seedkeeper_log_write_errors_total"),
        Some(0.0),
        "the counter is on /metrics from the start, at 0"
    );

    // Every connection: a request line and one header, then one more header every second
    // (harsher than every 5 s: a server that restarted its timer on every byte would never
    // close it). Connected all at once, each timed from its own connect.
    let connected = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let hostile: Vec<_> = (0..HOSTILE)
        .map(|_| {
            let addr = addr.clone();
            let connected = connected.clone();
            let gone = gone.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(&addr)
                    .await
                    .expect("a slowloris connection");
                let start = Instant::now();
                connected.add_permits(1);
                let closed = closed_since(
                    start,
                    &mut s,
                    b"GET /healthz HTTP/1.1\r\nHost: seedkeeper\r\n",
                    b"X-Slow: 1\r\n",
                    Duration::from_secs(1),
                    Duration::from_secs(20),
                )
                .await;
                gone.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                closed
            })
        })
        .collect();
    let all = connected.acquire_many(HOSTILE as u32).await.unwrap();
    all.forget();
    let connecting = began.elapsed();

    // Probes on new connections while the 2,000 are open (their timeout has not passed yet).
    let mut latencies = Vec::new();
    // Until 1.5 s before the first connection's timeout (every connection is younger than
    // `began`), so that every probe meets all 2,000 open.
    while began.elapsed() < header_timeout - Duration::from_millis(1500) {
        for path in ["/healthz", "/readyz"] {
            let (status, took) = probe(&format!("{base}{path}")).await;
            assert_eq!(status, 200, "{path} under 2,000 slowloris connections");
            // Every probe counted was made while all 2,000 were open.
            assert_eq!(
                gone.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "a slowloris connection closed during the probes (connecting took {connecting:?})"
            );
            latencies.push(took);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        latencies.len() >= 10,
        "only {} probes while all 2,000 were open (connecting took {connecting:?})",
        latencies.len()
    );
    let mut closed = Vec::with_capacity(HOSTILE);
    for h in hostile {
        closed.push(h.await.unwrap());
    }
    let open_after_20s = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open_after_20s, 0, "slowloris connections the server kept");
    let closed: Vec<Duration> = closed.into_iter().flatten().collect();
    let (first, last) = (
        closed.iter().min().copied().unwrap_or_default(),
        closed.iter().max().copied().unwrap_or_default(),
    );
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    let median = latencies[latencies.len() / 2];
    println!(
        "{HOSTILE} slowloris connections (opened in {:.2} s) closed {:.2}..{:.2} s after they \
         were opened (header timeout {:.0} s); {} probes meanwhile: median {:.1} ms, max {:.1} ms",
        connecting.as_secs_f64(),
        first.as_secs_f64(),
        last.as_secs_f64(),
        header_timeout.as_secs_f64(),
        latencies.len(),
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    // The target is an answer within 1 s. In `make test` this test shares 2 cores with the
    // whole suite, which can hold one probe's connect a moment past it (1.004 s seen once in
    // CI; alone the slowest probe is under 10 ms): most probes within 1 s, every probe within 3 s.
    let p90 = latencies[latencies.len() * 9 / 10];
    assert!(
        p90 < Duration::from_secs(1),
        "probe latency under load: 90th percentile {p90:?}"
    );
    assert!(
        max < Duration::from_secs(3),
        "probe latency under load: {max:?}"
    );
    // Closed by the header timeout, not by a trickled header (the first comes after 5 s) and not
    // much later than the timeout.
    assert!(
        first >= header_timeout - Duration::from_millis(500),
        "closed before the timeout: {first:?}"
    );
    assert!(
        last <= header_timeout + Duration::from_secs(2),
        "closed too late: {last:?}"
    );
    assert_eq!(status_of(&format!("{base}/readyz")).await, 200);
    assert_eq!(stop(child), Some(0), "SIGTERM: exit 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_and_an_idle_kept_alive_one_are_closed_after_the_header_timeout() {
    let db = TestDb::new().await;
    let (child, base) = ready_daemon(&db, &[("SEEDKEEPER_HTTP__HEADER_READ_TIMEOUT", "1s")]).await;
    let addr = base.trim_start_matches("http://").to_string();
    let every = Duration::from_secs(60);
    let limit = Duration::from_secs(10);
    // Connects and says nothing.
    let silent = TcpStream::connect(&addr).await.unwrap();
    let silent = tokio::spawn(closed_after(silent, b"", b"", every, limit));
    // One whole request, answered and kept alive, then nothing.
    let kept = TcpStream::connect(&addr).await.unwrap();
    let kept = tokio::spawn(closed_after(
        kept,
        b"GET /healthz HTTP/1.1\r\nHost: seedkeeper\r\n\r\n",
        b"",
        every,
        limit,
    ));
    for (what, h) in [("silent", silent), ("idle kept-alive", kept)] {
        let closed = h
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the {what} connection was still open after {limit:?}"));
        println!("{what} connection closed after {closed:?}");
        assert!(
            closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
            "{what}: {closed:?}"
        );
    }
    assert_eq!(stop(child), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_connection_cap_a_probe_takes_the_place_of_the_oldest_idle_connection_at_once() {
    let db = TestDb::new().await;
    let (child, base) = ready_daemon(
        &db,
        &[
            ("SEEDKEEPER_HTTP__MAX_CONNECTIONS", "50"),
            ("SEEDKEEPER_HTTP__HEADER_READ_TIMEOUT", "30s"),
        ],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    // The cap filled with connections that say nothing (the readiness probe's connection is
    // gone: reqwest's pool is per client).
    let mut idle = Vec::new();
    for _ in 0..50 {
        let s = TcpStream::connect(&addr).await.unwrap();
        idle.push(tokio::spawn(closed_after(
            s,
            b"",
            b"",
            Duration::from_secs(60),
            Duration::from_secs(10),
        )));
        // In order: the first is the oldest for the server too.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let (status, took) = probe(&format!("{base}/healthz")).await;
        assert_eq!(status, 200, "a probe at the cap");
        latencies.push(took);
    }
    println!("probes at the cap: {latencies:?}");
    assert!(latencies.iter().all(|l| *l < Duration::from_secs(1)));
    // Each probe took the place of the oldest idle connection, closed at once (well before the
    // 30 s header timeout, and before the 10 s the test waits).
    let first = idle.remove(0).await.unwrap();
    let first = first.expect("the oldest idle connection was closed to make room");
    assert!(
        first < t.elapsed() + Duration::from_secs(1),
        "closed at once: {first:?}"
    );
    assert_eq!(stop(child), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_exits_71_naming_the_limit_never_69() {
    let db = TestDb::new().await;
    // The descriptors a run needs depend on the runtime and the libraries: each limit from too
    // few to enough is tried, and none may pass for PostgreSQL being unavailable, for a bad
    // input (78: the realm file could not be opened), or panic (101: under 6 and 7 tokio's
    // signal handlers did, before the process checked it could start).
    let mut named = None;
    for limit in 5..=16 {
        // The same binary and clean environment as `command`, under `ulimit -n`.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" --once"))
            .arg(env!("CARGO_BIN_EXE_seedkeeper"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env_of(&db, &[("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "3s")]))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("sh");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let code = out.status.code();
        assert_ne!(code, Some(69), "limit {limit}: {stderr}");
        assert!(
            !stderr.contains("is unavailable after waiting"),
            "limit {limit} read as a dependency down: {stderr}"
        );
        assert!(
            code != Some(78) && code != Some(101) && !stderr.contains("panicked"),
            "limit {limit}: exit {code:?}: {stderr}"
        );
        if limit <= 7 {
            assert_eq!(code, Some(71), "limit {limit}: {stderr}");
        }
        if code == Some(71) {
            assert!(
                stderr.contains("too many open files while ")
                    && stderr.contains("LimitNOFILE")
                    && stderr.contains("ulimit -n")
                    && stderr.contains("http.max_connections"),
                "limit {limit}: {stderr}"
            );
            if stderr.contains("too many open files while connecting to PostgreSQL") {
                named.get_or_insert(limit);
            }
        }
    }
    let limit = named.expect("some descriptor limit from 8 to 16 ran out at the connection");
    println!("ran out connecting to PostgreSQL at ulimit -n {limit}");
}
