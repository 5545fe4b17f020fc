//! Progress of long work: how far a run (or `migrate`) has got, for whoever is watching.
//!
//! The work itself only bumps [`Progress`], a few shared atomics: the stage (the unit running,
//! or the start before the first unit) and the user listing (users listed so far, out of the
//! source's count when it has one). The identity source adds to it once per page or batch, so a
//! run nobody watches pays a few atomic adds per batch and nothing else.
//!
//! A [`Reporter`] started beside the run reads the counters and ends with it, in one of two
//! ways ([`Display`]):
//!
//! - [`Display::Bar`], for `--once`, `plan` and `migrate` on a terminal with text logs: indicatif
//!   bars on stderr. A bar for the user listing (listed / `users/count`, rate, time left; a
//!   spinner with a count when the total is unknown) and a spinner naming the stage, each shown
//!   only once it has gone on for [`DRAW_AFTER`], so a short run draws nothing. Log lines are
//!   written above the bars ([`LogWriter`] suspends them), never through them.
//! - [`Display::Log`], everywhere else (the daemon, JSON logs, a pipe, CI): one INFO line
//!   `seeding_progress` every `progress_interval` (10 s by default) while the work goes on (nothing for shorter work),
//!   with `run.id`, `unit`, `users.listed`, `users.count` and `elapsed_ms`.
//!
//! The interval is the `progress_interval` key (`SEEDKEEPER_PROGRESS_INTERVAL`, 10 s
//! by default), which the caller passes to [`Reporter::start`]: this module reads no
//! configuration.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::model::Unit;

/// How long a stage or the listing goes on before its bar is drawn.
pub(crate) const DRAW_AFTER: Duration = Duration::from_secs(1);

/// How often the bars are refreshed from the counters.
const DRAW_TICK: Duration = Duration::from_millis(100);

/// `total` while the source has not said how many users it holds.
const UNKNOWN: u64 = u64::MAX;

/// Listing states kept in [`Counters::listing`].
const NOT_LISTING: usize = 0;
const LISTING: usize = 1;
const LISTED: usize = 2;

/// The counters of one run, shared by the work and its reporter. Cloning shares them.
#[derive(Clone)]
pub struct Progress(Arc<Counters>);

struct Counters {
    started: Instant,
    /// 0 before the first unit; `i + 1` while `Unit::ALL[i]` runs.
    stage: AtomicUsize,
    /// When the stage was entered, in ms since `started`.
    stage_since: AtomicU64,
    listing: AtomicUsize,
    listing_since: AtomicU64,
    listed: AtomicU64,
    total: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Progress(Arc::new(Counters {
            started: Instant::now(),
            stage: AtomicUsize::new(0),
            stage_since: AtomicU64::new(0),
            listing: AtomicUsize::new(NOT_LISTING),
            listing_since: AtomicU64::new(0),
            listed: AtomicU64::new(0),
            total: AtomicU64::new(UNKNOWN),
        }))
    }

    fn now_ms(&self) -> u64 {
        self.0.started.elapsed().as_millis() as u64
    }

    /// `unit` starts.
    pub(crate) fn enter(&self, unit: Unit) {
        let index = Unit::ALL.iter().position(|u| *u == unit).unwrap_or(0);
        self.0.stage_since.store(self.now_ms(), Ordering::Relaxed);
        self.0.stage.store(index + 1, Ordering::Relaxed);
    }

    /// The user listing starts; `total` is the source's count of users, when it has one.
    pub(crate) fn listing_started(&self, total: Option<u64>) {
        self.0.listed.store(0, Ordering::Relaxed);
        self.0
            .total
            .store(total.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.0.listing_since.store(self.now_ms(), Ordering::Relaxed);
        self.0.listing.store(LISTING, Ordering::Relaxed);
    }

    /// `n` more users listed (once per page or batch, not per user).
    pub(crate) fn listed(&self, n: u64) {
        self.0.listed.fetch_add(n, Ordering::Relaxed);
    }

    /// The listing is complete.
    pub(crate) fn listing_done(&self) {
        self.0.listing.store(LISTED, Ordering::Relaxed);
    }

    /// What the counters say now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let c = &self.0;
        let now = self.now_ms();
        let stage = c.stage.load(Ordering::Relaxed);
        let unit = stage.checked_sub(1).and_then(|i| Unit::ALL.get(i).copied());
        let listing = c.listing.load(Ordering::Relaxed);
        let total = c.total.load(Ordering::Relaxed);
        let listed = c.listed.load(Ordering::Relaxed);
        Snapshot {
            elapsed: Duration::from_millis(now),
            unit,
            in_stage: Duration::from_millis(
                now.saturating_sub(c.stage_since.load(Ordering::Relaxed)),
            ),
            listing: match listing {
                NOT_LISTING => None,
                _ => Some(Listing {
                    listed,
                    // A source's count can fall behind its listing (users created while it
                    // runs, a page repeated by paging): the total never shows less than what
                    // has been listed.
                    total: (total != UNKNOWN).then_some(total.max(listed)),
                    done: listing == LISTED,
                    going_for: Duration::from_millis(
                        now.saturating_sub(c.listing_since.load(Ordering::Relaxed)),
                    ),
                }),
            },
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub elapsed: Duration,
    /// `None` before the first unit (the identity source check, the database connection).
    pub unit: Option<Unit>,
    /// How long the current stage has been going.
    pub in_stage: Duration,
    /// `None` until the user listing starts.
    pub listing: Option<Listing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Listing {
    pub listed: u64,
    pub total: Option<u64>,
    pub done: bool,
    pub going_for: Duration,
}

impl Snapshot {
    /// The stage's name on a bar.
    fn stage_name(&self) -> &'static str {
        self.unit.map_or("starting", Unit::as_str)
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Display {
    /// Bars on stderr (a terminal, text logs, a command someone waits for).
    Bar,
    /// `seeding_progress` log lines every `progress_interval` (10 s by default).
    #[default]
    Log,
}

impl Display {
    /// For a command someone waits for (`--once`, `plan`, `migrate`): bars when stderr is a
    /// terminal and the logs are text; JSON logs (`json_logs`) are for a machine, which gets
    /// log lines.
    pub(crate) fn interactive(json_logs: bool) -> Display {
        if std::io::stderr().is_terminal() && !json_logs {
            Display::Bar
        } else {
            Display::Log
        }
    }
}

/// Shows a run's progress until the run ends ([`Reporter::finish`], or dropping it).
pub(crate) struct Reporter {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting `progress`. A [`Display::Log`] reporter logs every `log_interval` (the
    /// `progress_interval` key) inside the current span, so its lines carry the run's fields
    /// like every other line of the run.
    pub(crate) fn start(
        display: Display,
        progress: Progress,
        run_id: Option<Uuid>,
        log_interval: Duration,
    ) -> Reporter {
        let stop = CancellationToken::new();
        let task = match display {
            Display::Log => tokio::spawn(
                log_lines(progress, run_id, log_interval, stop.clone()).in_current_span(),
            ),
            Display::Bar => tokio::spawn(draw(progress, stop.clone())),
        };
        Reporter {
            stop,
            task: Some(task),
        }
    }

    /// Stops reporting and waits until the bars are cleared, so what the command prints next
    /// is not drawn over.
    pub(crate) async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Reporter {
    /// A run dropped where it stands (its deadline, a shutdown) still ends its reporter.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn log_lines(
    progress: Progress,
    run_id: Option<Uuid>,
    every: Duration,
    stop: CancellationToken,
) {
    // The first line comes one interval in: shorter work logs nothing.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => log_line(&progress.snapshot(), run_id),
        }
    }
}

fn log_line(s: &Snapshot, run_id: Option<Uuid>) {
    let listed = s.listing.map(|l| l.listed);
    let count = s.listing.and_then(|l| l.total);
    tracing::info!(
        run.id = run_id.map(tracing::field::display),
        unit = s.unit.map(Unit::as_str),
        users.listed = listed,
        users.count = count,
        elapsed_ms = s.elapsed.as_millis() as u64,
        "seeding_progress"
    );
}

/// The bars being drawn, if any: [`LogWriter`] writes log lines above them.
static DRAWING: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn set_drawing(m: Option<MultiProgress>) {
    if let Ok(mut slot) = DRAWING.lock() {
        *slot = m;
    }
}

/// The log writer (`tracing_subscriber`'s `MakeWriter`): stderr, with the bars lifted while a
/// line is written, so log lines and bars never share a terminal line.
#[derive(Clone, Copy, Default)]
pub(crate) struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bars = DRAWING.lock().ok().and_then(|m| m.clone());
        match bars {
            // One event is one write (the subscriber formats a line, then writes it whole).
            Some(m) => m.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `12s`, `3m05s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// The listing's rate so far and, with a total, the time left at that rate.
fn pace(l: &Listing) -> String {
    let secs = l.going_for.as_secs_f64().max(0.001);
    let rate = l.listed as f64 / secs;
    let per_sec = format!("{rate:.0}/s");
    match l.total {
        Some(total) if rate > 0.0 => {
            let left = total.saturating_sub(l.listed) as f64 / rate;
            format!(
                "{per_sec}, {} left",
                seconds(Duration::from_secs_f64(left.ceil()))
            )
        }
        Some(_) => format!("{per_sec}, time left unknown"),
        None => per_sec,
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The bars, redrawn from the counters every [`DRAW_TICK`] and cleared when the run ends.
async fn draw(progress: Progress, stop: CancellationToken) {
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let mut board = Board::default();
    let mut ticks = tokio::time::interval(DRAW_TICK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => board.update(&bars, &progress.snapshot()),
        }
    }
    board.clear();
    set_drawing(None);
    let _ = bars.clear();
}

/// The bars on screen: the stage's spinner and the listing's bar.
#[derive(Default)]
struct Board {
    stage: Option<(Option<Unit>, ProgressBar)>,
    listing: Option<ProgressBar>,
}

impl Board {
    fn update(&mut self, bars: &MultiProgress, s: &Snapshot) {
        if self.stage.as_ref().is_some_and(|(u, _)| *u != s.unit) {
            if let Some((_, bar)) = self.stage.take() {
                bar.finish_and_clear();
            }
        }
        if self.stage.is_none() && s.in_stage >= DRAW_AFTER {
            let bar = ProgressBar::new_spinner();
            bar.set_style(style("{spinner} {prefix}: running for {msg}"));
            bar.set_prefix(s.stage_name());
            self.stage = Some((s.unit, self.add(bars, bar)));
        }
        if let Some((_, bar)) = &self.stage {
            // The stage's own clock: the spinner appears a second into it.
            bar.set_message(seconds(s.in_stage));
            bar.tick();
        }
        let Some(l) = s.listing else { return };
        if l.done {
            if let Some(bar) = self.listing.take() {
                bar.finish_and_clear();
            }
            return;
        }
        if self.listing.is_none() && l.going_for >= DRAW_AFTER {
            let bar = match l.total {
                Some(total) => {
                    let bar = ProgressBar::new(total);
                    bar.set_style(style("{prefix} [{bar:30}] {pos}/{len} users listed, {msg}"));
                    bar
                }
                None => {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(style("{spinner} {prefix}: {pos} users listed, {msg}"));
                    bar
                }
            };
            bar.set_prefix("identities");
            bar.set_position(l.listed);
            bar.set_message(pace(&l));
            self.listing = Some(self.add(bars, bar));
        }
        if let Some(bar) = &self.listing {
            // Rate and time left over the whole listing so far, not indicatif's estimate: the
            // bar appears a second in, with users already listed, which its estimator would
            // take for a burst.
            bar.set_message(pace(&l));
            bar.set_position(l.listed);
            if l.total.is_none() {
                bar.tick();
            }
        }
    }

    fn add(&self, bars: &MultiProgress, bar: ProgressBar) -> ProgressBar {
        // The log writer lifts the bars only once there are bars to lift.
        set_drawing(Some(bars.clone()));
        bars.add(bar)
    }

    fn clear(&mut self) {
        if let Some((_, bar)) = self.stage.take() {
            bar.finish_and_clear();
        }
        if let Some(bar) = self.listing.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_follow_the_stage_and_the_listing() {
        let p = Progress::new();
        let s = p.snapshot();
        assert_eq!(s.unit, None);
        assert_eq!(s.listing, None);
        p.enter(Unit::Identities);
        p.listing_started(Some(10));
        p.listed(4);
        p.listed(3);
        let s = p.snapshot();
        assert_eq!(s.unit, Some(Unit::Identities));
        let l = s.listing.unwrap_or_else(|| panic!("listing"));
        assert_eq!((l.listed, l.total, l.done), (7, Some(10), false));
        p.listing_done();
        assert!(p.snapshot().listing.is_some_and(|l| l.done));
        p.listing_started(Some(5));
        p.listed(8);
        let l = p.snapshot().listing.unwrap_or_else(|| panic!("listing"));
        assert_eq!(
            (l.listed, l.total),
            (8, Some(8)),
            "never a total below the listed"
        );
        p.listing_started(None);
        assert_eq!(p.snapshot().listing.and_then(|l| l.total), None);
    }

    #[test]
    fn the_pace_is_the_average_rate_and_the_time_left_at_it() {
        let l = Listing {
            listed: 250,
            total: Some(1000),
            done: false,
            going_for: Duration::from_secs(5),
        };
        assert_eq!(pace(&l), "50/s, 15s left");
        let l = Listing {
            total: Some(50_000),
            ..l
        };
        assert_eq!(pace(&l), "50/s, 16m35s left");
        let l = Listing { total: None, ..l };
        assert_eq!(pace(&l), "50/s");
        let l = Listing {
            listed: 0,
            total: Some(10),
            ..l
        };
        assert_eq!(pace(&l), "0/s, time left unknown");
    }
}
