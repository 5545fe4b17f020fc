//! The command line (clap) and what each command does. `main` only parses, calls `execute`
//! and exits with its code; everything here is callable from tests. [`execute`] is the one
//! dispatcher, the daemon included: every command gets the process's cancel token (SIGTERM)
//! and the output writer, whose first failure turns the exit code into 74.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigLayers, LogFormat, Settings};
use crate::error::{exit, Error};
use crate::progress::{self, Progress, Reporter};
use crate::reconcile::{Count, Outcome, RunReport, Unit};
use crate::store;

pub(crate) const EXIT_CODES_HELP: &str = "Exit codes:
  0   ok (in sync; for `plan`: nothing to change)
  1   the reconcile failed (see the error and `seedkeeper status`)
  2   `plan` found changes pending
  64  usage error (bad command line)
  69  a dependency (PostgreSQL, Keycloak) stayed unavailable after startup.wait_timeout, or
      (--once, plan, migrate) another session held the run lock that long (the error names it), or
      PostgreSQL is a read-only server (a replica: point database.url at the primary)
  71  out of file descriptors (too many open files): raise LimitNOFILE / ulimit -n
  74  the command's own output could not be written (stdout full or closed)
  78  invalid configuration, reference seed or realm file (fix the input; do not restart)

Configuration: defaults < TOML (--config, SEEDKEEPER_CONFIG, else config/seedkeeper.toml) <
SEEDKEEPER_* environment (nested keys with __). Secrets also from <VAR>_FILE or
$CREDENTIALS_DIRECTORY. See `seedkeeper config` and the README.";

#[derive(Debug, Parser)]
#[command(name = "seedkeeper", version, about = "Keycloak-aware identity bootstrap daemon: keeps Keycloak and PostgreSQL in sync", after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// TOML config file (else SEEDKEEPER_CONFIG, else config/seedkeeper.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format (overrides log.format).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// One reconcile, then exit with its outcome (`seedkeeper --once` = `seedkeeper run --once`).
    /// Waits up to startup.wait_timeout for a run lock another session holds; exit 0 only after
    /// a run of its own succeeded.
    #[arg(long, global = true)]
    pub once: bool,
    /// With `--once` or `plan`: let exactly N users be offboarded by this run, past
    /// identity.offboard_limit (and past an empty listing). Any other number offboards nobody,
    /// rolls the identities unit back and exits 78. Recorded in the evidence.
    #[arg(long, global = true, value_name = "N")]
    pub allow_offboard: Option<u64>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Daemon: reconcile at start, then on schedule.cron; serves /healthz, /readyz, /metrics.
    /// With --once: one reconcile, then exit with its outcome.
    Run,
    /// Dry run: what a reconcile would change, per unit. Exit 0 in sync, 2 changes pending, 1 error.
    Plan {
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Apply pending schema migrations only; then check that every object of the applied
    /// migrations exists.
    Migrate {
        /// Re-create the tables, columns, constraints and indexes of applied migrations that are
        /// missing (dropped after they were recorded), from the embedded migrations, in one
        /// transaction.
        #[arg(long)]
        repair: bool,
    },
    /// The last runs from the evidence table, newest first.
    Status {
        #[arg(long, default_value_t = 10)]
        limit: i64,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Validate config and seed; print the effective config with every secret redacted.
    Config,
    /// The reference seed as one idempotent SQL script (psql -v ON_ERROR_STOP=1 -f).
    ExportSql,
    /// Probe a running daemon's liveness, /healthz: it serves and its scheduler ticks; a
    /// PostgreSQL or Keycloak outage does not fail it (container HEALTHCHECKs, without curl).
    Healthcheck {
        /// URL to probe; default http://<http.listen>/healthz (give .../readyz for readiness).
        #[arg(long)]
        url: Option<String>,
    },
}

impl Cli {
    /// Whether the command is `run` (given or implied), with or without `--once`.
    fn is_run(&self) -> bool {
        matches!(self.command, None | Some(Command::Run))
    }

    /// Whether the command is one run: `--once` or `plan` (what `--allow-offboard` applies to).
    pub(crate) fn runs_once(&self) -> bool {
        match &self.command {
            Some(Command::Plan { .. }) => true,
            _ => self.is_run() && self.once,
        }
    }

    /// The usage error of a flag given to a command it does not apply to.
    fn misplaced_flag(&self) -> Option<&'static str> {
        if self.once && !self.is_run() {
            return Some("--once applies to `run`: give it as `seedkeeper --once` or `seedkeeper run --once`, not to another command");
        }
        if self.allow_offboard.is_some() && !self.runs_once() {
            return Some("--allow-offboard applies to one run: give it with --once or plan, not to the daemon or another command");
        }
        None
    }

    /// `--allow-offboard N` as the engine takes it.
    fn allowed_offboard(&self) -> Option<i64> {
        self.allow_offboard
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// Parses arguments; usage errors exit 64 (clap's own default is 2, which means "changes
/// pending" here). A usage error is one JSON line when `--log-format json` or
/// `SEEDKEEPER_LOG__FORMAT=json` asks for JSON; `--help` and `--version` stay text.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Cli, u8> {
    let args: Vec<String> = args.into_iter().collect();
    match Cli::try_parse_from(&args) {
        Ok(c) => match c.misplaced_flag() {
            Some(why) => {
                crate::telemetry::print_error(why, "usage", exit::USAGE);
                Err(exit::USAGE)
            }
            None => Ok(c),
        },
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    exit::OK
                }
                _ => exit::USAGE,
            };
            if code == exit::USAGE && crate::telemetry::json_requested(&args) {
                crate::telemetry::set_format(LogFormat::Json);
                let text = e.render().to_string();
                let text = text.trim_end().trim_start_matches("error: ");
                crate::telemetry::print_error(text, "usage", code);
            } else {
                let _ = e.print();
            }
            Err(code)
        }
    }
}

/// Reports an error (text, or one JSON line with `log.format = json`) and gives its exit code.
pub(crate) fn fail(e: &Error) -> u8 {
    let code = e.exit_code();
    crate::telemetry::print_error(&e.to_string(), e.kind().as_str(), code);
    code
}

/// Loads the settings (exit 78 on problems). Their errors are printed in the log format that
/// `--log-format`, `SEEDKEEPER_LOG__FORMAT` or the config file's `log.format` asks for (see
/// [`crate::telemetry::early_format`]).
pub(crate) fn load_settings(cli: &Cli, sources: &ConfigLayers) -> Result<Settings, u8> {
    crate::telemetry::set_format(crate::telemetry::early_format(cli.log_format, sources));
    let offline = matches!(
        cli.command,
        Some(Command::ExportSql) | Some(Command::Healthcheck { .. })
    );
    let loaded = if offline {
        config::load_offline(sources)
    } else {
        config::load(sources)
    };
    let mut s = loaded.map_err(|e| fail(&e))?;
    if let Some(f) = cli.log_format {
        s.log.format = f;
    }
    Ok(s)
}

fn print(out: &mut dyn Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The command's output, with its first write error kept: a command whose output was lost
/// must not exit as if it had said what it had to say.
struct Checked<'a> {
    out: &'a mut dyn Write,
    failed: Option<std::io::Error>,
}

impl Write for Checked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf).inspect_err(|e| {
            self.failed
                .get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().inspect_err(|e| {
            self.failed
                .get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        })
    }
}

/// The exit code once the output is known lost: 74 where the code would have said "done" (0)
/// or "see the changes" (2); an error's own code otherwise (its message is already out).
fn output_failed(e: &std::io::Error, code: u8) -> u8 {
    let code = match code {
        exit::OK | exit::CHANGES_PENDING => exit::IO_ERROR,
        other => other,
    };
    crate::telemetry::print_error(
        &format!("cannot write the command's output to stdout: {e}. Free space on the device stdout goes to, or send it elsewhere"),
        "output",
        code,
    );
    code
}

/// Runs the command, the daemon included, until it ends or `cancel` stops it; its exit code.
pub(crate) async fn execute(
    cli: &Cli,
    settings: Settings,
    cancel: CancellationToken,
    out: &mut dyn Write,
) -> u8 {
    let mut checked = Checked { out, failed: None };
    let out = &mut checked;
    let code = match &cli.command {
        Some(Command::Config) => config(settings, out),
        Some(Command::ExportSql) => export_sql(&settings, out),
        Some(Command::Migrate { repair }) => migrate(&settings, *repair, &cancel, out).await,
        Some(Command::Status { limit, format }) => {
            status(&settings, *limit, *format, &cancel, out).await
        }
        Some(Command::Healthcheck { url }) => healthcheck(&settings, url.as_deref(), out).await,
        Some(Command::Plan { format }) => {
            plan(settings, *format, cli.allowed_offboard(), &cancel, out).await
        }
        Some(Command::Run) | None if cli.once => {
            once(settings, cli.allowed_offboard(), &cancel, out).await
        }
        Some(Command::Run) | None => daemon(settings, cancel).await,
    };
    match &checked.failed {
        Some(e) => output_failed(e, code),
        None => code,
    }
}

/// The daemon (`run`): serves until `cancel`; 0 after a graceful shutdown. It prints nothing
/// of its own on stdout: it logs.
async fn daemon(settings: Settings, cancel: CancellationToken) -> u8 {
    let daemon = match crate::app::Daemon::build(settings).await {
        Ok(d) => d,
        Err(e) => {
            let code = e.exit_code();
            crate::telemetry::print_error(&e.to_string(), e.kind().as_str(), code);
            return code;
        }
    };
    tracing::info!(http.listen = %daemon.local_addr(), "seedkeeper daemon started");
    match daemon.run_until_stopped(cancel).await {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

/// `config`: the effective configuration, secrets redacted, once everything it points at is
/// valid.
fn config(settings: Settings, out: &mut dyn Write) -> u8 {
    let redacted = settings.redacted_toml();
    let provenance = settings.provenance();
    // The engine's build loads the seed and checks everything the config points at.
    let engine = match crate::app::build_engine(settings) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let seed = &engine.seed;
    let text = format!("# effective seedkeeper configuration (secrets redacted)\n# {provenance}\n# reference seed: {} (digest {})\n{redacted}", seed.source_name, seed.digest);
    print(out, &text);
    exit::OK
}

/// `export-sql`: the reference seed as SQL.
fn export_sql(settings: &Settings, out: &mut dyn Write) -> u8 {
    match crate::seed::ReferenceSeed::load(settings.seed.path.as_deref()) {
        Ok(seed) => {
            print(out, &crate::reconcile::reference::export_sql(&seed));
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `plan`: what a run would change, written nowhere.
async fn plan(
    settings: Settings,
    format: OutputFormat,
    allow_offboard: Option<i64>,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> u8 {
    let gate = match one_run_gate(settings, allow_offboard) {
        Ok(gate) => gate,
        Err(code) => return code,
    };
    let report = gate.plan(cancel).await;
    match format {
        OutputFormat::Json => print(
            out,
            &format!(
                "{}\n",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            ),
        ),
        OutputFormat::Text => print(out, &render_plan(&report)),
    }
    plan_exit(&report)
}

/// `plan`'s exit code: the error's own when it could not plan; else 2 when the apply would
/// write anything, 0 when not. Findings that would fail the apply (a username clash, offboarding
/// stopped) are shown under `!` and are not an error of the plan.
pub(crate) fn plan_exit(report: &RunReport) -> u8 {
    match &report.error {
        Some(e) if !matches!(e, Error::Findings { .. }) => fail(e),
        _ => plan_exit_code(report),
    }
}

/// `--once`: one run, its summary, and the exit code that says how it ended.
async fn once(
    settings: Settings,
    allow_offboard: Option<i64>,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> u8 {
    let gate = match one_run_gate(settings, allow_offboard) {
        Ok(gate) => gate,
        Err(code) => return code,
    };
    let report = gate.once(cancel).await;
    if crate::telemetry::is_json() {
        print(out, &format!("{}\n", summary_json(&report)));
    } else {
        print(out, &render_summary(&report));
    }
    match (&report.error, report.outcome) {
        // A failed run always has its error (the findings that failed it included).
        (Some(e), _) => fail(e),
        // Exit 0 means a run of its own converged the database. A `--once` waits for the
        // run lock instead of being skipped, so this is not expected; were it to happen,
        // it must not pass for a success.
        (None, Outcome::Skipped) => {
            crate::telemetry::print_error(
                crate::reconcile::SKIPPED_LOCKED_OUT,
                "run_lock_held",
                exit::UNAVAILABLE,
            );
            exit::UNAVAILABLE
        }
        (None, _) => exit::OK,
    }
}

/// The gate of a command's one run (`--once`, `plan`): progress bars on a terminal, and the
/// `--allow-offboard` of the command line; the exit code, its error reported, when the inputs
/// are invalid.
fn one_run_gate(
    settings: Settings,
    allow_offboard: Option<i64>,
) -> Result<std::sync::Arc<crate::gate::RunGate>, u8> {
    let mut components = crate::app::build(settings).map_err(|e| fail(&e))?;
    components.engine.allow_offboard = allow_offboard;
    components.engine.progress = progress::Display::interactive(crate::telemetry::is_json());
    Ok(components.into_gate())
}

/// The `--once` summary as one JSON log line: the run's id, trigger, outcome, duration and seed
/// digest, `counts` per unit and `findings` as JSON (as in `seed_runs`), and the error.
pub(crate) fn summary_json(r: &RunReport) -> String {
    let level = match r.outcome {
        Outcome::Failed => "ERROR",
        _ => "INFO",
    };
    let mut fields: Vec<(String, serde_json::Value)> = vec![
        ("run.id".into(), r.id.to_string().into()),
        ("trigger".into(), r.trigger.as_str().into()),
        ("mode".into(), r.mode.as_str().into()),
        ("outcome".into(), r.outcome.as_str().into()),
        ("duration_ms".into(), r.duration_ms.into()),
        ("seed_digest".into(), r.seed_digest.clone().into()),
        ("counts".into(), r.counts_json()),
        ("findings".into(), r.findings_json()),
    ];
    if let Some(e) = &r.error {
        fields.push(("error".into(), e.to_string().into()));
    }
    crate::telemetry::json_line(level, "seedkeeper::cli", "run summary", fields)
}

pub(crate) fn render_summary(r: &RunReport) -> String {
    let mut s = format!(
        "run {} {} in {} ms (seed {})\n",
        r.id,
        r.outcome.as_str(),
        r.duration_ms,
        &r.seed_digest[..12.min(r.seed_digest.len())]
    );
    for u in &r.units {
        let counts: Vec<String> = u
            .counts
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.push_str(&format!(
            "  {:<15} {}\n",
            u.unit,
            if counts.is_empty() {
                "-".to_string()
            } else {
                counts.join(" ")
            }
        ));
        if let Some(e) = &u.error {
            s.push_str(&format!("  {:<15} error: {e}\n", ""));
        }
        for f in &u.findings {
            if f.kind.in_summary() {
                s.push_str(&format!(
                    "  {:<15} {} {}: {}\n",
                    "", f.kind, f.entity, f.detail
                ));
            }
        }
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("  error: {e}\n"));
    }
    s
}

pub fn render_plan(r: &RunReport) -> String {
    let mut s = String::new();
    for u in &r.units {
        let pending = u.writes();
        s.push_str(&format!(
            "{}: {}\n",
            u.unit,
            if u.error.is_some() {
                "could not be planned".to_string()
            } else if pending == 0 {
                "in sync".to_string()
            } else {
                format!("{pending} change(s) pending")
            }
        ));
        for c in &u.changes {
            s.push_str(&format!("  + {c}\n"));
        }
        if u.changes_unlisted > 0 {
            s.push_str(&format!(
                "  + … and {} more (counted, not listed)\n",
                u.changes_unlisted
            ));
        }
        for f in &u.findings {
            if f.kind.needs_attention() {
                s.push_str(&format!("  ! {} {}: {}\n", f.kind, f.entity, f.detail));
            }
        }
        if let Some(e) = &u.error {
            s.push_str(&format!("  error: {e}\n"));
        }
    }
    let code = plan_exit_code(r);
    s.push_str(&match (code, &r.error) {
        (exit::CHANGES_PENDING, Some(e)) => {
            format!("plan: changes pending, and the run would not succeed: {e} (exit 2)\n")
        }
        (exit::CHANGES_PENDING, None) => "plan: changes pending (exit 2)\n".to_string(),
        (exit::OK, Some(e)) => {
            format!("plan: in sync, but the run would not succeed: {e} (exit 0)\n")
        }
        (exit::OK, None) => "plan: in sync (exit 0)\n".to_string(),
        (_, Some(e)) => format!("plan: could not plan: {e} (exit {code})\n"),
        (_, None) => format!("plan: {} (exit {code})\n", r.outcome),
    });
    s
}

/// [`plan_exit`] without reporting the error.
fn plan_exit_code(r: &RunReport) -> u8 {
    match &r.error {
        Some(Error::Findings { .. }) | None if r.changes_pending() => exit::CHANGES_PENDING,
        Some(Error::Findings { .. }) | None => exit::OK,
        Some(e) => e.exit_code(),
    }
}

/// `migrate`, with its progress shown as the `schema` unit's (waiting for the lock included).
async fn migrate(
    settings: &Settings,
    repair: bool,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> u8 {
    let progress = Progress::new();
    progress.enter(Unit::Schema);
    let reporter = Reporter::start(
        progress::Display::interactive(crate::telemetry::is_json()),
        progress,
        None,
        settings.progress_interval,
    );
    let r = migrate_schema(settings, repair, cancel).await;
    reporter.finish().await;
    if let Ok(rep) = &r {
        for statement in &rep.repaired {
            print(out, &format!("repaired: {statement}\n"));
        }
    }
    match r {
        Ok(rep) if rep.applied.is_empty() => {
            print(
                out,
                &format!(
                    "schema up to date ({} migration(s) applied before)\n",
                    store::migrate::MIGRATIONS.len()
                ),
            );
            exit::OK
        }
        Ok(rep) => {
            print(out, &format!("applied: {}\n", rep.applied.join(", ")));
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

async fn migrate_schema(
    settings: &Settings,
    repair: bool,
    cancel: &CancellationToken,
) -> Result<store::migrate::SchemaReport, Error> {
    let wait = settings.startup.wait_timeout;
    let mut db = store::connect_with_wait(&settings.database, wait, cancel).await?;
    // Wait for a run in flight rather than migrate under it, as `--once` does: up to
    // startup.wait_timeout, then exit 69 naming the session that holds the lock.
    let lock = match store::lock::RunLock::try_take(&settings.database).await? {
        Some(lock) => lock,
        None => {
            let holder = store::lock::holder(&db.client).await?.map_or_else(
                || "a session that has just let it go".into(),
                |h| h.to_string(),
            );
            tracing::warn!(holder = %holder, wait = %config::duration_str::format(&wait), "the run lock is held by another session: waiting for it (startup.wait_timeout)");
            store::lock::RunLock::acquire_within(&settings.database, wait, cancel).await?
        }
    };
    let r = async {
        let mut report = store::migrate::run(
            &mut db.client,
            config::SchemaMode::Apply,
            store::migrate::MIGRATIONS,
        )
        .await?;
        if repair {
            report.repaired = store::schema_check::repair(&mut db.client).await?;
        }
        // What a run checks: every object of the applied migrations is there.
        store::schema_check::check(&db.client, &db.target, false).await?;
        Ok(report)
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not commit the run lock's transaction; closing its connection released the lock");
    }
    r
}

/// `status`: the last runs, newest first, and the event follower's state. Its wait for the
/// database ends with the process's `cancel` (SIGTERM).
async fn status(
    settings: &Settings,
    limit: i64,
    format: OutputFormat,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> u8 {
    let db =
        match store::connect_with_wait(&settings.database, settings.startup.wait_timeout, cancel)
            .await
        {
            Ok(db) => db,
            Err(e) => return fail(&e),
        };
    // Said first: a replica shows the primary's runs (or none) and records none of its own.
    let read_only = match store::server::read_only(&db.client).await {
        Ok(why) => why.map(|why| store::server::read_only_message(&db.target, &why)),
        Err(e) => return fail(&Error::db("asking whether the server takes writes", e)),
    };
    if let Some(line) = &read_only {
        tracing::warn!(db.target = %db.target, "{line}");
        if format == OutputFormat::Text {
            print(out, &format!("{line}\n"));
        }
    }
    match store::table_exists(&db.client, "seed_runs").await {
        Ok(true) => {}
        Ok(false) => {
            print(out, "no runs recorded: the schema is not applied yet (run `seedkeeper --once` or `seedkeeper migrate`)\n");
            return exit::OK;
        }
        Err(e) => return fail(&e),
    }
    let runs = match store::runs::list(&db.client, limit.max(1)).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if format == OutputFormat::Json {
        print(
            out,
            &format!(
                "{}\n",
                serde_json::to_string_pretty(&runs).unwrap_or_default()
            ),
        );
        return exit::OK;
    }
    let mut s = render_runs(&runs);
    match crate::events::status_lines(&db.client).await {
        Ok(lines) => lines.iter().for_each(|l| {
            s.push_str(l);
            s.push('\n');
        }),
        Err(e) => return fail(&e),
    }
    print(out, &s);
    exit::OK
}

/// The `status` table: a line per run, its writes and notable counts, or its error.
fn render_runs(runs: &[store::runs::RunRecord]) -> String {
    let mut s = format!(
        "{:<25} {:<10} {:<9} {:>8}  {}\n",
        "started (UTC)", "outcome", "trigger", "ms", "changes / error"
    );
    for r in runs {
        let ms = r
            .finished_at
            .map(|f| (f - r.started_at).num_milliseconds().to_string())
            .unwrap_or_else(|| "-".into());
        let changes = notable_counts(&r.counts);
        let tail = match &r.error {
            Some(e) => format!("error: {}", e.lines().next().unwrap_or("")),
            None if changes.is_empty() => "no changes".into(),
            None => changes.join(" "),
        };
        s.push_str(&format!(
            "{:<25} {:<10} {:<9} {:>8}  {}\n",
            r.started_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            r.outcome,
            r.trigger,
            ms,
            tail
        ));
    }
    s
}

/// `unit[key=n ...]` for each unit of a `seed_runs.counts` object with a non-zero notable count.
fn notable_counts(counts: &serde_json::Value) -> Vec<String> {
    let Some(units) = counts.as_object() else {
        return Vec::new();
    };
    let mut changes = Vec::new();
    for (unit, c) in units {
        let parts: Vec<String> = Count::all()
            .filter(|k| k.notable())
            .map(Count::as_str)
            .filter_map(|k| {
                let n = c.get(k)?.as_i64().filter(|v| *v != 0)?;
                Some(format!("{k}={n}"))
            })
            .collect();
        if !parts.is_empty() {
            changes.push(format!("{unit}[{}]", parts.join(" ")));
        }
    }
    changes
}

async fn healthcheck(settings: &Settings, url: Option<&str>, out: &mut dyn Write) -> u8 {
    let url = url.map(str::to_string).unwrap_or_else(|| {
        let listen = settings
            .http
            .listen
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]");
        format!("http://{listen}/healthz")
    });
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(3));
    // reqwest has no roots of its own (Cargo.toml): an https:// URL trusts the OS store.
    if url.starts_with("https://") {
        match crate::trust::https_client_config(None, true) {
            Ok(tls) => builder = builder.use_preconfigured_tls(tls),
            Err(e) => {
                crate::telemetry::stderr_line(&format!("seedkeeper healthcheck: {e}"));
                return exit::RECONCILE_FAILED;
            }
        }
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            crate::telemetry::stderr_line(&format!("seedkeeper healthcheck: {e}"));
            return exit::RECONCILE_FAILED;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => {
            print(out, &format!("ok ({url})\n"));
            exit::OK
        }
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            crate::telemetry::stderr_line(&format!(
                "unhealthy ({url}): {status} {}",
                body.chars().take(300).collect::<String>()
            ));
            exit::RECONCILE_FAILED
        }
        Err(e) => {
            crate::telemetry::stderr_line(&format!("not reachable ({url}): {e}"));
            exit::UNAVAILABLE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn once_is_one_flag_for_run_given_or_implied_and_a_usage_error_elsewhere() {
        for line in ["seedkeeper --once", "seedkeeper run --once"] {
            let cli = parse(args(line)).unwrap();
            assert!(cli.runs_once() && cli.is_run(), "{line}");
        }
        let daemon = parse(args("seedkeeper run")).unwrap();
        assert!(daemon.is_run() && !daemon.runs_once());
        for line in ["seedkeeper status --once", "seedkeeper --once plan"] {
            assert_eq!(parse(args(line)).err(), Some(exit::USAGE), "{line}");
        }
        assert_eq!(
            parse(args("seedkeeper run --allow-offboard 3")).err(),
            Some(exit::USAGE)
        );
    }

    #[tokio::test]
    async fn status_stops_waiting_for_the_database_when_the_process_is_told_to_stop() {
        let settings = config::load(&ConfigLayers {
            file: None,
            env: vec![
                (
                    "SEEDKEEPER_DATABASE__URL".into(),
                    "postgres://nobody@127.0.0.1:1/none".into(),
                ),
                ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT".into(), "60s".into()),
            ],
        })
        .unwrap();
        let cli = parse(args("seedkeeper status")).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let code = execute(&cli, settings, cancel, &mut out).await;
        assert_ne!(code, exit::OK);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "status waited {:?} after SIGTERM",
            started.elapsed()
        );
    }
}
