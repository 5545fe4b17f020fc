//! Prometheus metrics with `prometheus-client`: one [`Registry`] per app (no global recorder), so
//! tests can run many apps in one process; rendered in the Prometheus text format 0.0.4.
//!
//! Labels are typed and bounded: outcomes, triggers, unit names, actions, sources and error kinds are
//! enums, never user data. Every series of a bounded label set that can move is registered at
//! start with 0 (run outcomes by the triggers the daemon runs, error kinds, the rows each unit can write, Keycloak request
//! outcomes, event batch outcomes), so `rate()` and `increase()` see the first error. Gauges that
//! describe the last full run (`seedkeeper_last_run_ok`, `seedkeeper_drift_items`,
//! `seedkeeper_identities_seen`, `seedkeeper_identities_unlisted`) are absent until a run has
//! produced them: before the first run there is no value to report, and a 0 would read as a
//! failure (or as a complete listing).
//!
//! Full runs and event batches are told apart by the trigger ([`crate::reconcile::Trigger::is_full_run`]:
//! `event` is a batch, every other trigger a full run): the series alerts read as "the realm is in sync"
//! (`seedkeeper_last_success_timestamp_seconds`, `seedkeeper_last_run_ok`,
//! `seedkeeper_run_duration_seconds`, and the last-run gauges) describe full runs only, because a
//! batch re-syncs a handful of users and says nothing about the rest: a trickle of successful
//! batches must never hide failing full runs. Batches have their own `seedkeeper_event_batch*`
//! series. `seedkeeper_runs_total`, `seedkeeper_run_errors_total` and
//! `seedkeeper_rows_changed_total` count every run, batches included: each is a `seed_runs` row
//! and writes rows, and dashboards built on them keep their meaning.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicI8, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

pub use crate::error::ErrorKind;
use crate::model::{Action, Outcome, RunReport, Tally, Trigger, Unit};
use crate::names::named;

/// Registers `metric` and returns it: the registry keeps a clone that shares its series.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The `Content-Type` of [`Metrics::render`].
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

const RUN_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Event batches: a few users, tens of milliseconds; seconds when Keycloak or PostgreSQL is slow.
const BATCH_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Keycloak requests: a page is tens of milliseconds, `keycloak.request_timeout` is 10 s.
const KEYCLOAK_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

named!(
    /// The identity source as the `source` label of `seedkeeper_identities_seen` (the
    /// configured choice is `crate::config::IdentitySource`).
    pub(crate) enum IdentitySourceLabel {
        Keycloak => "keycloak",
        RealmFile => "realm-file",
    }
);

named!(
    /// How one HTTP exchange with Keycloak ended (`seedkeeper_keycloak_requests_total`).
    pub enum KeycloakOutcome {
        Ok => "ok",
        ClientError => "client_error",
        RateLimited => "rate_limited",
        ServerError => "server_error",
        UnexpectedStatus => "unexpected_status",
        Malformed => "malformed",
        Timeout => "timeout",
        Transport => "transport",
    }
);

impl KeycloakOutcome {
    /// The outcome of an answer with this status (a 2xx is `ok` until its body proves
    /// unreadable; redirects are never followed, so a 3xx is `unexpected_status`).
    pub(crate) fn of_status(status: u16) -> Self {
        match status {
            200..=299 => KeycloakOutcome::Ok,
            429 => KeycloakOutcome::RateLimited,
            400..=499 => KeycloakOutcome::ClientError,
            500..=599 => KeycloakOutcome::ServerError,
            _ => KeycloakOutcome::UnexpectedStatus,
        }
    }

    /// The outcome of a request that got no complete answer.
    pub(crate) fn of_reqwest(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            KeycloakOutcome::Timeout
        } else {
            KeycloakOutcome::Transport
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RunLabels {
    outcome: Outcome,
    trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RowLabels {
    unit: Unit,
    action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UnitLabels {
    unit: Unit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: IdentitySourceLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeycloakLabels {
    outcome: KeycloakOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// The git revision the binary was built from, when the build said (`SEEDKEEPER_REVISION`
    /// at compile time, as the image build does), else `unknown`.
    revision: &'static str,
    seed_digest: String,
}

/// The revision compiled in (see `BuildLabels::revision`).
pub const REVISION: &str = match option_env!("SEEDKEEPER_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// The Keycloak source's instruments. Cheap to clone (the series are shared); the source
/// records into them and [`Metrics`] registers them.
#[derive(Debug, Clone)]
pub struct KeycloakMetrics {
    requests: Family<KeycloakLabels, Counter>,
    duration: Histogram,
    retries: Counter,
    /// `seedkeeper_keycloak_info`: the server's version once read.
    info: Arc<KeycloakInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeycloakInfoLabels {
    version: String,
    tested: &'static str,
}

/// `seedkeeper_keycloak_info{version, tested}`: absent until the version is read (the service
/// account may not be allowed to read it), then 1. A gauge of its own rather than a label on
/// `seedkeeper_build_info`: that one describes the binary and is fixed at start, while this is
/// learned from the server after start, exists with the keycloak source only, and may change
/// when Keycloak is upgraded under a running daemon; queries joining on build_info keep their
/// meaning.
#[derive(Debug, Default)]
struct KeycloakInfo(std::sync::Mutex<Option<KeycloakInfoLabels>>);

impl Collector for KeycloakInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(labels) = self.0.lock().ok().and_then(|g| g.clone()) else {
            return Ok(());
        };
        let gauge = ConstGauge::new(1i64);
        let mut metric = encoder.encode_descriptor(
            "seedkeeper_keycloak_info",
            "The Keycloak server's version, read at start from GET /admin/serverinfo (needs realm-management manage-realm, Keycloak 26.5 or later; absent when not readable), and whether it is in the tested range (always 1)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric.encode_family(&labels)?)
    }
}

impl Default for KeycloakMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl KeycloakMetrics {
    pub fn new() -> Self {
        let requests = Family::<KeycloakLabels, Counter>::default();
        for &outcome in KeycloakOutcome::ALL {
            let _ = requests.get_or_create(&KeycloakLabels { outcome });
        }
        KeycloakMetrics {
            requests,
            duration: Histogram::new(KEYCLOAK_BUCKETS.iter().copied()),
            retries: Counter::default(),
            info: Arc::new(KeycloakInfo::default()),
        }
    }

    /// The Keycloak server's version, and whether it is in the range the conformance suite ran
    /// against.
    pub(crate) fn set_server_version(&self, version: &str, tested: bool) {
        if let Ok(mut g) = self.info.0.lock() {
            *g = Some(KeycloakInfoLabels {
                version: version.to_string(),
                tested: if tested { "true" } else { "false" },
            });
        }
    }

    /// One HTTP exchange with Keycloak (discovery, JWKS, token or admin API) and how long it
    /// took.
    pub(crate) fn request(&self, outcome: KeycloakOutcome, took: Duration) {
        self.requests
            .get_or_create(&KeycloakLabels { outcome })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// A request repeated after a failed attempt.
    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "seedkeeper_keycloak_requests",
            "HTTP requests to Keycloak (discovery, token, admin API) by outcome",
            self.requests.clone(),
        );
        registry.register(
            "seedkeeper_keycloak_request_duration_seconds",
            "Duration of HTTP requests to Keycloak, whatever their outcome",
            self.duration.clone(),
        );
        registry.register(
            "seedkeeper_keycloak_retries",
            "Keycloak requests repeated after a failed attempt (5xx, 429, timeout, connection error, unreadable body, a 401 answered by renewing the token)",
            self.retries.clone(),
        );
        registry.register_collector(Box::new(self.info.clone()));
    }
}

/// `seedkeeper_last_run_ok`: absent until a run succeeds or fails, then 1 or 0.
#[derive(Debug, Default)]
struct LastRunOk(AtomicI8);

/// 0 (the default): no run has finished yet.
impl LastRunOk {
    const FAILED: i8 = 1;
    const SUCCEEDED: i8 = 2;
}

impl Collector for LastRunOk {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let value = match self.0.load(Ordering::Relaxed) {
            Self::SUCCEEDED => 1,
            Self::FAILED => 0,
            _ => return Ok(()),
        };
        let gauge = ConstGauge::new(value as i64);
        let metric = encoder.encode_descriptor(
            "seedkeeper_last_run_ok",
            "1 when the last finished full run succeeded, 0 when it failed; absent before the first full run finishes (skipped runs and event batches do not count)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// A gauge of the last full run that is absent until a full run has set it: before one there is
/// no value to report, and a 0 would claim a fact nobody observed.
#[derive(Debug)]
struct LastValue {
    name: &'static str,
    help: &'static str,
    value: AtomicI64,
    set: AtomicBool,
}

impl LastValue {
    fn new(name: &'static str, help: &'static str) -> Self {
        LastValue {
            name,
            help,
            value: AtomicI64::new(0),
            set: AtomicBool::new(false),
        }
    }

    fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
        self.set.store(true, Ordering::Relaxed);
    }
}

impl Collector for LastValue {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if !self.set.load(Ordering::Relaxed) {
            return Ok(());
        }
        let gauge = ConstGauge::new(self.value.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

/// The event batches' own series, registered with the follower's ([`Series::events`]).
struct BatchMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    last_success: Gauge<f64, AtomicU64>,
}

impl BatchMetrics {
    fn new() -> Self {
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        for &outcome in Outcome::ALL {
            let _ = outcomes.get_or_create(&OutcomeLabels { outcome });
        }
        BatchMetrics {
            outcomes,
            duration: Histogram::new(BATCH_BUCKETS.iter().copied()),
            last_success: Gauge::default(),
        }
    }

    fn record(&self, report: &RunReport) {
        let outcome = report.outcome;
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.duration.observe(report.duration_ms as f64 / 1000.0);
        if outcome == Outcome::Succeeded {
            self.last_success.set(now_seconds());
        }
    }
}

/// Unix time in seconds, with milliseconds.
fn now_seconds() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    rows: Family<RowLabels, Counter>,
    drift: Family<UnitLabels, Gauge>,
    identities: Family<SourceLabels, Gauge>,
    last_success: Gauge<f64, AtomicU64>,
    skipped_ticks: Counter,
    last_run_ok: Arc<LastRunOk>,
    unlisted: Arc<LastValue>,
    offboard_stopped: Arc<LastValue>,
    batches: BatchMetrics,
    keycloak: KeycloakMetrics,
    events: EventMetrics,
}

/// The series every run moves, full run or event batch (see [`Metrics::record_run`]).
struct EveryRunSeries {
    runs: Family<RunLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    rows: Family<RowLabels, Counter>,
}

impl EveryRunSeries {
    fn register(r: &mut Registry) -> Self {
        let runs = register(
            r,
            "seedkeeper_runs",
            "Reconcile runs by outcome and by what started them (a retry of a failed run is a run)",
            at_zero(Outcome::ALL.iter().flat_map(|&outcome| {
                let in_daemon = Trigger::ALL.iter().filter(|t| t.in_daemon());
                in_daemon.map(move |&trigger| RunLabels { outcome, trigger })
            })),
        );
        let errors = register(
            r,
            "seedkeeper_run_errors",
            "Failed runs by error kind (every kind starts at 0)",
            at_zero(ErrorKind::ALL.iter().map(|&kind| ErrorLabels { kind })),
        );
        let duration = register(
            r,
            "seedkeeper_run_duration_seconds",
            "Duration of full runs (event batches: seedkeeper_event_batch_duration_seconds)",
            Histogram::new(RUN_BUCKETS.iter().copied()),
        );
        let rows = register(
            r,
            "seedkeeper_rows_changed",
            "Rows written, by unit and action",
            at_zero(Unit::ALL.iter().flat_map(|&unit| {
                unit.actions()
                    .iter()
                    .map(move |&action| RowLabels { unit, action })
            })),
        );
        EveryRunSeries {
            runs,
            errors,
            duration,
            rows,
        }
    }
}

/// The series that say what the last full run found; event batches leave them alone.
struct LastFullRunSeries {
    drift: Family<UnitLabels, Gauge>,
    identities: Family<SourceLabels, Gauge>,
    last_success: Gauge<f64, AtomicU64>,
    last_run_ok: Arc<LastRunOk>,
    unlisted: Arc<LastValue>,
    offboard_stopped: Arc<LastValue>,
}

impl LastFullRunSeries {
    fn register(r: &mut Registry) -> Self {
        let drift = register(
            r,
            "seedkeeper_drift_items",
            "Items found differing from the seed in the last full run, by unit",
            Family::<UnitLabels, Gauge>::default(),
        );
        let identities = register(
            r,
            "seedkeeper_identities_seen",
            "Identities listed by the source in the last full run",
            Family::<SourceLabels, Gauge>::default(),
        );
        let last_success = register(
            r,
            "seedkeeper_last_success_timestamp_seconds",
            "Unix time of the last successful full run (0: none yet; event batches do not count)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let last_run_ok = Arc::new(LastRunOk::default());
        r.register_collector(Box::new(last_run_ok.clone()));
        let unlisted = Arc::new(LastValue::new(
            "seedkeeper_identities_unlisted",
            "Users the source counts but did not list in the last full run (users/count minus the distinct users listed; 0 when the listing is complete)",
        ));
        r.register_collector(Box::new(unlisted.clone()));
        let offboard_stopped = Arc::new(LastValue::new(
            "seedkeeper_offboard_stopped",
            "Users the last full run (or a later event batch) would have offboarded but did not, because that exceeded identity.offboard_limit or the listing was empty; 0 when offboarding went through",
        ));
        r.register_collector(Box::new(offboard_stopped.clone()));
        LastFullRunSeries {
            drift,
            identities,
            last_success,
            last_run_ok,
            unlisted,
            offboard_stopped,
        }
    }
}

/// The series of the daemon and the process around the runs: the skipped ticks (returned) and
/// the log lines that could not be written.
fn register_process_series(r: &mut Registry) -> Counter {
    let skipped_ticks = register(
        r,
        "seedkeeper_skipped_ticks",
        "Scheduled ticks skipped because a run was still going",
        Counter::default(),
    );
    // Process-wide (stderr is): a clone of the one counter the log sink counts into.
    r.register(
        "seedkeeper_log_write_errors",
        "Log lines (and error lines of the process's own) dropped because stderr or the log file could not be written (a full disk, a closed pipe); the work goes on",
        crate::telemetry::log_write_errors().clone(),
    );
    skipped_ticks
}

/// Which parts' series a daemon's registry holds beside the run series.
#[derive(Debug, Clone, Copy, Default)]
pub struct Series {
    /// The identity source is Keycloak: `seedkeeper_keycloak_*`.
    pub keycloak: bool,
    /// The daemon follows Keycloak's events: `seedkeeper_events_*` and the event batches'
    /// series. Without, they do not exist, so an alert on `seedkeeper_events_following == 0`
    /// finds nothing where nothing is meant to follow.
    pub events: bool,
}

/// The event follower's instruments (`seedkeeper_events_following`, `seedkeeper_event_*`).
#[derive(Debug, Clone, Default)]
pub struct EventMetrics {
    /// 1 while events are followed, 0 in schedule-only mode (and before the follower starts).
    pub following: Gauge,
    pub users_applied: Counter,
    pub full_runs_asked: Counter,
    pub polls: Counter,
}

/// A counter family with a series at 0 for each of `labels`, so that a rate over it starts
/// before the first event.
fn at_zero<L>(labels: impl Iterator<Item = L>) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + prometheus_client::encoding::EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<L, Counter>::default();
    for l in labels {
        let _ = family.get_or_create(&l);
    }
    family
}

/// `seedkeeper_build_info`: version, revision and the seed's digest.
fn register_build(r: &mut Registry, seed_digest: &str) {
    let build = Info::new(BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
        revision: REVISION,
        seed_digest: seed_digest.to_string(),
    });
    r.register(
        "seedkeeper_build",
        "The running build: package version, git revision and the digest of the reference seed it applies (always 1)",
        build,
    );
}

impl Metrics {
    /// The registry of one daemon, built before the parts it counts for: the seed digest in
    /// `seedkeeper_build_info`, the run series, and the series of `parts`. Each part is then
    /// handed its instruments ([`Metrics::keycloak`], [`Metrics::events`]).
    pub fn new(seed_digest: &str, parts: Series) -> Self {
        let mut m = Self::with_seed_digest(seed_digest);
        if parts.keycloak {
            m.keycloak.register(&mut m.registry);
        }
        if parts.events {
            m.register_events();
        }
        m
    }

    /// The Keycloak client's instruments (registered with a keycloak source).
    pub fn keycloak(&self) -> &KeycloakMetrics {
        &self.keycloak
    }

    /// The event follower's instruments (registered when events are followed).
    pub(crate) fn events(&self) -> &EventMetrics {
        &self.events
    }

    fn register_events(&mut self) {
        let e = self.events.clone();
        self.registry.register(
            "seedkeeper_events_following",
            "1 while Keycloak's events are followed, 0 in schedule-only mode (see seedkeeper status for why)",
            e.following,
        );
        self.registry.register(
            "seedkeeper_event_batches",
            "Event batches by outcome (each a seed_runs row with trigger event)",
            self.batches.outcomes.clone(),
        );
        self.registry.register(
            "seedkeeper_event_batch_duration_seconds",
            "Duration of event batches (full runs are in seedkeeper_run_duration_seconds)",
            self.batches.duration.clone(),
        );
        self.registry.register(
            "seedkeeper_event_batch_last_success_timestamp_seconds",
            "Unix time of the last successful event batch (0: none yet)",
            self.batches.last_success.clone(),
        );
        self.registry.register(
            "seedkeeper_event_users",
            "Users re-synced from events",
            e.users_applied,
        );
        self.registry.register(
            "seedkeeper_event_full_runs",
            "Full runs asked for by events: structural changes, a checkpoint past the event expiration, bursts",
            e.full_runs_asked,
        );
        self.registry.register(
            "seedkeeper_event_polls",
            "Polls of Keycloak's event endpoints",
            e.polls,
        );
    }

    /// The run metrics and `seedkeeper_build_info` only.
    pub(crate) fn with_seed_digest(seed_digest: &str) -> Self {
        let mut registry = Registry::default();
        register_build(&mut registry, seed_digest);
        let every_run = EveryRunSeries::register(&mut registry);
        let last_full_run = LastFullRunSeries::register(&mut registry);
        let skipped_ticks = register_process_series(&mut registry);
        Metrics {
            registry,
            runs: every_run.runs,
            errors: every_run.errors,
            duration: every_run.duration,
            rows: every_run.rows,
            drift: last_full_run.drift,
            identities: last_full_run.identities,
            last_success: last_full_run.last_success,
            skipped_ticks,
            last_run_ok: last_full_run.last_run_ok,
            unlisted: last_full_run.unlisted,
            offboard_stopped: last_full_run.offboard_stopped,
            batches: BatchMetrics::new(),
            keycloak: KeycloakMetrics::new(),
            events: EventMetrics::default(),
        }
    }

    /// Counts a finished run: every run in the run, error and row counters; then a full run in
    /// the series of the last full run, an event batch in its own.
    pub(crate) fn record_run(&self, report: &RunReport, source: &str) {
        let (outcome, trigger) = (report.outcome, report.trigger);
        self.runs
            .get_or_create(&RunLabels { outcome, trigger })
            .inc();
        let kind = report.error.as_ref().map(crate::error::Error::kind);
        if let Some(kind) = kind {
            self.errors.get_or_create(&ErrorLabels { kind }).inc();
        }
        for u in &report.units {
            let unit = u.unit;
            for &action in Action::ALL {
                let n = u.get(action);
                if n > 0 {
                    self.rows
                        .get_or_create(&RowLabels { unit, action })
                        .inc_by(n as u64);
                }
            }
        }
        if report.trigger.is_full_run() {
            self.record_full_run(report, source);
        } else {
            self.batches.record(report);
            // A stopped batch says so until the next full run decides again.
            let stopped = report
                .unit(Unit::Identities)
                .map(|u| u.get(Tally::OffboardStopped));
            if let Some(n) = stopped.filter(|n| *n > 0) {
                self.offboard_stopped.set(n);
            }
        }
    }

    /// The series that describe the last full run. A batch's drift, listing and unlisted count
    /// cover its few users only, so they never overwrite these.
    fn record_full_run(&self, report: &RunReport, source: &str) {
        self.duration.observe(report.duration_ms as f64 / 1000.0);
        for u in report.units.iter().filter(|u| u.error.is_none()) {
            self.drift
                .get_or_create(&UnitLabels { unit: u.unit })
                .set(u.get(Tally::Drift).max(0));
        }
        // A unit that failed has no counts: its 0 would read as "all listed".
        if let Some(id) = report.unit(Unit::Identities).filter(|u| u.error.is_none()) {
            if let Some(source) = IdentitySourceLabel::from_name(source) {
                self.identities
                    .get_or_create(&SourceLabels { source })
                    .set(id.get(Tally::Listed).max(0));
            }
            self.unlisted.set(id.get(Tally::Unlisted).max(0));
            self.offboard_stopped
                .set(id.get(Tally::OffboardStopped).max(0));
        }
        match report.outcome {
            Outcome::Succeeded => {
                self.last_success.set(now_seconds());
                self.last_run_ok
                    .0
                    .store(LastRunOk::SUCCEEDED, Ordering::Relaxed);
            }
            Outcome::Failed => self
                .last_run_ok
                .0
                .store(LastRunOk::FAILED, Ordering::Relaxed),
            Outcome::Skipped => {}
        }
    }

    pub(crate) fn record_skipped_tick(&self) {
        self.skipped_ticks.inc();
    }

    /// The Prometheus text exposition (format 0.0.4, [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "rendering /metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_error_kind_is_some_error_s_and_no_two_variants_share_one() {
        use crate::error::{DbFailure, Error};
        let failure = DbFailure {
            context: "c".into(),
            code: None,
            message: "m".into(),
            hint: None,
        };
        let errors = [
            Error::config("x"),
            Error::Seed {
                source_name: "s".into(),
                problems: crate::error::Problems(vec![]),
            },
            Error::RealmFile {
                path: "p".into(),
                message: "m".into(),
            },
            Error::DatabaseUnavailable {
                target: "t".into(),
                waited_secs: 1,
                reason: "r".into(),
            },
            Error::KeycloakUnavailable {
                target: "t".into(),
                waited_secs: 1,
                reason: "r".into(),
            },
            Error::RunLockHeld {
                holder: "pid 1".into(),
                waited_secs: 1,
            },
            Error::KeycloakAuth("x".into()),
            Error::keycloak("users", "x"),
            Error::ReadOnly {
                context: "c".into(),
                why: "w".into(),
            },
            Error::Schema("x".into()),
            Error::Database(failure.clone()),
            Error::Unit {
                unit: "tenants",
                failure,
            },
            Error::Findings {
                kind: ErrorKind::IdentityClash,
                message: "x".into(),
            },
            Error::Findings {
                kind: ErrorKind::OffboardLimit,
                message: "x".into(),
            },
            Error::OffboardMismatch {
                allowed: 1,
                would: 2,
            },
            Error::Io("x".into()),
            Error::TooManyOpenFiles { doing: "x".into() },
            Error::Cancelled,
            Error::Timeout("x".into()),
        ];
        let kinds: std::collections::BTreeSet<ErrorKind> = errors.iter().map(Error::kind).collect();
        assert_eq!(kinds.len(), errors.len(), "two variants share a kind");
        assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ErrorKind::ALL);
    }

    #[test]
    fn before_any_run_every_counter_series_is_0_and_last_run_ok_is_absent() {
        let m = Metrics::with_seed_digest("abc123");
        let text = m.render();
        let build = format!(
            "seedkeeper_build_info{{version=\"{}\",revision=\"{REVISION}\",seed_digest=\"abc123\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &build), Some(1.0), "{text}");
        for kind in ErrorKind::ALL {
            let s = format!("seedkeeper_run_errors_total{{kind=\"{}\"}}", kind.as_str());
            assert_eq!(sample(&text, &s), Some(0.0), "{s} in {text}");
        }
        for outcome in Outcome::ALL {
            for trigger in Trigger::ALL {
                let s = format!(
                    "seedkeeper_runs_total{{outcome=\"{}\",trigger=\"{}\"}}",
                    outcome.as_str(),
                    trigger.as_str()
                );
                let want = trigger.in_daemon().then_some(0.0);
                assert_eq!(sample(&text, &s), want, "{s}");
            }
        }
        for (unit, action) in Unit::ALL
            .iter()
            .flat_map(|&u| u.actions().iter().map(move |&a| (u, a)))
        {
            let s = format!(
                "seedkeeper_rows_changed_total{{unit=\"{}\",action=\"{}\"}}",
                unit.as_str(),
                action.as_str()
            );
            assert_eq!(sample(&text, &s), Some(0.0), "{s}");
        }
        assert!(!text.contains("seedkeeper_last_run_ok"), "{text}");
        assert_eq!(
            sample(&text, "seedkeeper_last_success_timestamp_seconds"),
            Some(0.0)
        );
        assert!(
            text.contains("# TYPE seedkeeper_runs_total counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE seedkeeper_run_duration_seconds histogram"));
        assert!(
            !text.contains("seedkeeper_keycloak_"),
            "no Keycloak source, no Keycloak series"
        );
    }

    /// A finished run of `trigger` with an identities unit that listed `listed` users and
    /// missed `unlisted`.
    fn run(trigger: Trigger, outcome: Outcome, listed: i64, unlisted: i64) -> RunReport {
        let mut identities = crate::reconcile::UnitReport::new(Unit::Identities);
        identities.bump(Tally::Listed, listed);
        identities.bump(Tally::Unlisted, unlisted);
        identities.bump(Action::Inserted, 1);
        RunReport {
            id: uuid::Uuid::nil(),
            trigger,
            mode: crate::reconcile::Mode::Apply,
            outcome,
            seed_digest: "d".into(),
            duration_ms: 40,
            units: vec![identities],
            error: None,
        }
    }

    fn with_events() -> Metrics {
        Metrics::new(
            "d",
            Series {
                keycloak: false,
                events: true,
            },
        )
    }

    #[test]
    fn every_trigger_but_the_event_batch_is_a_full_run() {
        for &t in Trigger::ALL {
            assert_eq!(t.is_full_run(), t != Trigger::Event, "{t}");
        }
    }

    #[test]
    fn event_batch_series_start_at_zero() {
        let m = with_events();
        let text = m.render();
        for outcome in Outcome::ALL {
            let s = format!(
                "seedkeeper_event_batches_total{{outcome=\"{}\"}}",
                outcome.as_str()
            );
            assert_eq!(sample(&text, &s), Some(0.0), "{s} in {text}");
        }
        assert_eq!(
            sample(
                &text,
                "seedkeeper_event_batch_last_success_timestamp_seconds"
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, "seedkeeper_events_following"), Some(0.0));
    }

    /// A full run that failed, then two event batches that succeeded and one that failed.
    fn failed_full_run_then_three_batches() -> Metrics {
        let m = with_events();
        m.record_run(&run(Trigger::Schedule, Outcome::Failed, 6, 0), "keycloak");
        m.record_run(&run(Trigger::Event, Outcome::Succeeded, 1, 0), "keycloak");
        m.record_run(&run(Trigger::Event, Outcome::Succeeded, 1, 0), "keycloak");
        m.record_run(&run(Trigger::Event, Outcome::Failed, 1, 0), "keycloak");
        m
    }

    #[test]
    fn event_batches_move_their_own_series_and_never_the_full_runs() {
        // Batches succeeded after the full run failed: the full-run series still say it failed.
        let text = failed_full_run_then_three_batches().render();
        assert_eq!(sample(&text, "seedkeeper_last_run_ok"), Some(0.0), "{text}");
        assert_eq!(
            sample(&text, "seedkeeper_last_success_timestamp_seconds"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "seedkeeper_run_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "seedkeeper_identities_seen{source=\"keycloak\"}"),
            Some(6.0),
            "a batch's one user is not the realm's listing"
        );
        assert_eq!(
            sample(
                &text,
                "seedkeeper_event_batches_total{outcome=\"succeeded\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "seedkeeper_event_batches_total{outcome=\"failed\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "seedkeeper_event_batch_duration_seconds_count"),
            Some(3.0)
        );
        assert!(
            sample(
                &text,
                "seedkeeper_event_batch_last_success_timestamp_seconds"
            )
            .is_some_and(|t| t > 1.7e9),
            "{text}"
        );
        // Every run, batches included, is a seed_runs row and counted as one.
        for (series, n) in [
            ("{outcome=\"succeeded\",trigger=\"event\"}", 2.0),
            ("{outcome=\"failed\",trigger=\"event\"}", 1.0),
            ("{outcome=\"failed\",trigger=\"schedule\"}", 1.0),
        ] {
            let series = format!("seedkeeper_runs_total{series}");
            assert_eq!(sample(&text, &series), Some(n), "{series}");
        }
        assert_eq!(
            sample(
                &text,
                "seedkeeper_rows_changed_total{unit=\"identities\",action=\"inserted\"}"
            ),
            Some(4.0)
        );
    }

    #[test]
    fn a_full_run_after_event_batches_moves_the_full_run_series_again() {
        let m = failed_full_run_then_three_batches();
        // A full run under a trigger this module has never heard of counts as one.
        m.record_run(&run(Trigger::Retry, Outcome::Succeeded, 6, 0), "keycloak");
        let text = m.render();
        assert_eq!(sample(&text, "seedkeeper_last_run_ok"), Some(1.0));
        assert!(
            sample(&text, "seedkeeper_last_success_timestamp_seconds").is_some_and(|t| t > 1.7e9)
        );
        assert_eq!(
            sample(&text, "seedkeeper_event_batch_duration_seconds_count"),
            Some(3.0)
        );
    }

    #[test]
    fn identities_unlisted_follows_the_last_full_run_that_reached_the_identities_unit() {
        let m = Metrics::with_seed_digest("d");
        assert!(
            !m.render().contains("seedkeeper_identities_unlisted"),
            "absent before a full run"
        );
        m.record_run(
            &run(Trigger::Startup, Outcome::Succeeded, 247, 1),
            "keycloak",
        );
        let text = m.render();
        assert_eq!(
            sample(&text, "seedkeeper_identities_unlisted"),
            Some(1.0),
            "{text}"
        );
        assert!(
            text.contains("# TYPE seedkeeper_identities_unlisted gauge"),
            "{text}"
        );

        // A batch lists its own users only: it leaves the gauge.
        m.record_run(&run(Trigger::Event, Outcome::Succeeded, 1, 0), "keycloak");
        assert_eq!(
            sample(&m.render(), "seedkeeper_identities_unlisted"),
            Some(1.0)
        );

        // A full run whose identities unit failed has no counts: the gauge stays.
        let mut failed = run(Trigger::Schedule, Outcome::Failed, 0, 0);
        failed.units = vec![crate::reconcile::UnitReport::failed(
            Unit::Identities,
            &crate::error::Error::keycloak("users", "x"),
        )];
        m.record_run(&failed, "keycloak");
        assert_eq!(
            sample(&m.render(), "seedkeeper_identities_unlisted"),
            Some(1.0)
        );

        // A full run that stopped before the identities unit leaves it too.
        let mut early = run(Trigger::Schedule, Outcome::Failed, 0, 0);
        early.units.clear();
        m.record_run(&early, "keycloak");
        assert_eq!(
            sample(&m.render(), "seedkeeper_identities_unlisted"),
            Some(1.0)
        );

        // The listing is complete again.
        m.record_run(
            &run(Trigger::Schedule, Outcome::Succeeded, 248, 0),
            "keycloak",
        );
        assert_eq!(
            sample(&m.render(), "seedkeeper_identities_unlisted"),
            Some(0.0)
        );
    }

    #[test]
    fn keycloak_outcomes_start_at_0_and_count() {
        let k = KeycloakMetrics::new();
        let mut m = Metrics::with_seed_digest("d");
        k.register(&mut m.registry);
        k.request(KeycloakOutcome::ServerError, Duration::from_millis(20));
        k.retry();
        k.request(KeycloakOutcome::Ok, Duration::from_millis(30));
        let text = m.render();
        for outcome in KeycloakOutcome::ALL {
            let s = format!(
                "seedkeeper_keycloak_requests_total{{outcome=\"{}\"}}",
                outcome.as_str()
            );
            let want = match outcome {
                KeycloakOutcome::Ok | KeycloakOutcome::ServerError => 1.0,
                _ => 0.0,
            };
            assert_eq!(sample(&text, &s), Some(want), "{s} in {text}");
        }
        assert_eq!(
            sample(&text, "seedkeeper_keycloak_retries_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "seedkeeper_keycloak_request_duration_seconds_count"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "seedkeeper_keycloak_request_duration_seconds_bucket{le=\"0.025\"}"
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn statuses_map_to_bounded_outcomes() {
        assert_eq!(KeycloakOutcome::of_status(200), KeycloakOutcome::Ok);
        assert_eq!(
            KeycloakOutcome::of_status(302),
            KeycloakOutcome::UnexpectedStatus
        );
        assert_eq!(
            KeycloakOutcome::of_status(401),
            KeycloakOutcome::ClientError
        );
        assert_eq!(
            KeycloakOutcome::of_status(429),
            KeycloakOutcome::RateLimited
        );
        assert_eq!(
            KeycloakOutcome::of_status(503),
            KeycloakOutcome::ServerError
        );
    }
}
