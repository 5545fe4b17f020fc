//! One retry policy for every wait on a dependency: connecting to PostgreSQL, Keycloak's OIDC
//! discovery, its token and its Admin API requests.
//!
//! A caller says only what is worth repeating: each failed attempt answers a [`Retry`]. The
//! [`Policy`] says how long to wait (exponential backoff from `base`, doubling up to `cap`, with
//! equal jitter; or the delay the server asked for with `Retry-After`, up to `max_after`, plus
//! a little jitter) and when to give up (after so many retries, or once a deadline has passed).
//!
//! Jitter: replicas, and pods restarted together, that lose a dependency at the same moment
//! would otherwise retry in lockstep and hit it together each time it comes back. A backoff
//! whose exponential value is `b` (`base * 2^n`, at most `cap`) waits a random time in
//! `[b/2, b]` ("equal jitter": the spread of full jitter, and never a retry at once). A server's
//! `Retry-After` `a` is a minimum: the wait is in `[a, 1.25 a]`, never above `max_after` (an
//! ask above `max_after` waits `max_after`). Randomness comes from std's `RandomState` (keys
//! seeded from the OS per thread, a fresh key for each draw): no crate, and no two processes
//! draw the same sequence. Every wait ends at once when
//! the caller's [`CancellationToken`] fires: a shutdown or a run's deadline never sits out a
//! backoff. Nothing here logs or counts: the caller's `retrying` hook does, before each wait.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// A wait ended by its cancellation token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cancelled;

impl From<Cancelled> for Error {
    fn from(_: Cancelled) -> Self {
        Error::Cancelled
    }
}

/// Sleeps `d`, or less when `cancel` fires first (a token already cancelled ends it at once).
pub(crate) async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), Cancelled> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Cancelled),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

/// A `Retry-After` header's value in seconds (the HTTP-date form is not honoured: the backoff
/// applies then).
pub(crate) fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A random duration in `[0, max]`, uniform to the nanosecond.
pub(crate) fn spread(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Lemire's multiply-shift maps 64 random bits onto [0, nanos] without a modulo's bias
    // worth speaking of at these sizes.
    let r = random_u64();
    let n = ((u128::from(r) * (u128::from(nanos) + 1)) >> 64) as u64;
    Duration::from_nanos(n)
}

/// 64 random bits: each `RandomState` gets fresh SipHash keys (seeded from the OS once per
/// thread, then advanced), so hashing nothing with it yields an unpredictable value.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// When a policy gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// After this many retries (so one attempt more than that).
    Retries(u32),
    /// Once this long has passed since the first attempt; the last wait is cut to end there.
    Deadline(Duration),
}

/// How long to wait between attempts, and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The wait after the first failed attempt; each further one doubles.
    pub base: Duration,
    /// The longest backoff.
    pub cap: Duration,
    pub limit: Limit,
    /// The longest wait a server may ask for ([`Retry::After`]).
    pub max_after: Duration,
}

/// What a failed attempt asks for. `E` says why it failed, for the caller's warning and for its
/// error once the policy is spent.
#[derive(Debug)]
pub(crate) enum Retry<E> {
    /// Not worth repeating: stop with this error.
    Fail(Error),
    /// Repeat after the policy's backoff.
    Backoff(E),
    /// Repeat after the delay the server asked for (`Retry-After`), instead of the backoff.
    After(Duration, E),
    /// Repeat at once, as the same attempt (a renewed token). The caller bounds how often.
    Now,
}

/// Why [`Policy::run`] stopped without a value.
#[derive(Debug)]
pub(crate) enum Stop<E> {
    /// An attempt answered [`Retry::Fail`].
    Failed(Error),
    /// The policy is spent: the last failure, and how much was tried.
    Spent(E, Spent),
    /// The token fired during a wait.
    Cancelled,
}

/// How much was tried before giving up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spent {
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Since the first attempt started.
    pub waited: Duration,
}

impl<E> Stop<E> {
    /// The error to report: `give_up` turns the last failure of a spent policy into one.
    pub(crate) fn into_error(self, give_up: impl FnOnce(E, Spent) -> Error) -> Error {
        match self {
            Stop::Failed(e) => e,
            Stop::Spent(why, spent) => give_up(why, spent),
            Stop::Cancelled => Error::Cancelled,
        }
    }
}

impl Policy {
    /// Backoff from `base` doubling up to `cap`, until `limit`; a server may ask for `cap` at most.
    pub(crate) const fn new(base: Duration, cap: Duration, limit: Limit) -> Self {
        Policy {
            base,
            cap,
            limit,
            max_after: cap,
        }
    }

    /// The exponential value after failed attempt `attempt` (0 for the first), without jitter:
    /// the upper bound of [`Policy::backoff`].
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.cap)
    }

    /// The backoff after failed attempt `attempt`: random in `[ceiling / 2, ceiling]` (see the
    /// module docs).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + spread(ceiling - half)
    }

    /// The wait after failed attempt `attempt`, `elapsed` since the first started: what the
    /// server `asked` (at most `max_after`) or the backoff, cut at a deadline; `None` when the
    /// policy is spent.
    pub(crate) fn delay(
        &self,
        attempt: u32,
        asked: Option<Duration>,
        elapsed: Duration,
    ) -> Option<Duration> {
        let d = asked
            .map(|a| (a + spread(a / 4)).min(self.max_after))
            .unwrap_or_else(|| self.backoff(attempt));
        match self.limit {
            Limit::Retries(max) => (attempt < max).then_some(d),
            Limit::Deadline(total) => (elapsed < total).then(|| d.min(total - elapsed)),
        }
    }

    /// Runs `attempt` (given its number, from 0) until it succeeds, fails for good, the policy is
    /// spent or `cancel` fires during a wait. Before each wait, `retrying` hears why, the number
    /// of the attempt that failed and how long the wait is (to warn and count).
    pub async fn run<T, E, Fut>(
        &self,
        cancel: &CancellationToken,
        mut attempt: impl FnMut(u32) -> Fut,
        mut retrying: impl FnMut(&E, u32, Duration),
    ) -> Result<T, Stop<E>>
    where
        Fut: Future<Output = Result<T, Retry<E>>>,
    {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            let (why, asked) = match attempt(n).await {
                Ok(v) => return Ok(v),
                Err(Retry::Fail(e)) => return Err(Stop::Failed(e)),
                Err(Retry::Now) => continue,
                Err(Retry::Backoff(why)) => (why, None),
                Err(Retry::After(d, why)) => (why, Some(d)),
            };
            let Some(wait) = self.delay(n, asked, start.elapsed()) else {
                let spent = Spent {
                    attempts: n + 1,
                    waited: start.elapsed(),
                };
                return Err(Stop::Spent(why, spent));
            };
            retrying(&why, n, wait);
            sleep_or_cancel(wait, cancel)
                .await
                .map_err(|Cancelled| Stop::Cancelled)?;
            n += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn retries(max: u32) -> Policy {
        Policy {
            base: 200 * MS,
            cap: 5000 * MS,
            limit: Limit::Retries(max),
            max_after: 30_000 * MS,
        }
    }

    /// One scripted attempt.
    type Answer = fn() -> Result<u32, Retry<&'static str>>;

    /// Runs `answers` in turn (the last one again when they run out) under `policy`: the result,
    /// the attempts made and the waits announced.
    async fn drive(
        policy: Policy,
        cancel: &CancellationToken,
        answers: Vec<Answer>,
    ) -> (Result<u32, Stop<&'static str>>, u32, Vec<(u32, Duration)>) {
        let mut calls = 0u32;
        let mut waits = Vec::new();
        let r = policy
            .run(
                cancel,
                |_| {
                    let answer = answers[(calls as usize).min(answers.len() - 1)];
                    calls += 1;
                    async move { answer() }
                },
                |_, n, d| waits.push((n, d)),
            )
            .await;
        (r, calls, waits)
    }

    #[test]
    fn backoff_doubles_from_base_up_to_cap_without_overflowing() {
        let p = retries(5);
        let ceilings: Vec<u64> = (0..7).map(|n| p.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(p.ceiling(u32::MAX), p.cap);
        assert!(p.backoff(u32::MAX) <= p.cap);
    }

    #[test]
    fn every_backoff_is_jittered_between_half_and_all_of_its_ceiling() {
        let p = retries(5);
        for n in 0..8 {
            let ceiling = p.ceiling(n);
            let draws: Vec<Duration> = (0..200).map(|_| p.backoff(n)).collect();
            for d in &draws {
                assert!(
                    *d >= ceiling / 2 && *d <= ceiling,
                    "attempt {n}: {d:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
            let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
            assert!(
                distinct.len() > 150,
                "attempt {n}: {} distinct",
                distinct.len()
            );
            // Both halves of the range are used: the jitter spreads, it does not just nudge.
            let mid = ceiling / 2 + ceiling / 4;
            assert!(draws.iter().any(|d| *d < mid) && draws.iter().any(|d| *d > mid));
        }
        assert_eq!(spread(Duration::ZERO), Duration::ZERO);
        assert!(spread(Duration::from_nanos(1)) <= Duration::from_nanos(1));
    }

    #[test]
    fn two_independent_backoff_sequences_differ() {
        let p = retries(10);
        let sequence = || (0..10).map(|n| p.backoff(n)).collect::<Vec<_>>();
        let (a, b) = (sequence(), sequence());
        assert_ne!(a, b);
        // Not just somewhere: nearly every step differs (two equal draws of a range of
        // hundreds of millions of nanoseconds are as good as impossible).
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same <= 1, "{a:?} vs {b:?}");
        // In another thread (another seed) too.
        let c = std::thread::spawn(move || (0..10).map(|n| p.backoff(n)).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn a_server_s_delay_is_a_minimum_jittered_up_to_a_quarter_and_capped_at_max_after() {
        let p = retries(5);
        for _ in 0..200 {
            let d = p.delay(0, Some(2000 * MS), Duration::ZERO).unwrap();
            assert!(d >= 2000 * MS && d <= 2500 * MS, "{d:?}");
            let d = p.delay(4, Some(MS), Duration::ZERO).unwrap();
            assert!(d >= MS && d <= MS + MS / 4, "{d:?}");
            let near = p.delay(0, Some(28_000 * MS), Duration::ZERO).unwrap();
            assert!(near >= 28_000 * MS && near <= p.max_after, "{near:?}");
        }
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(3600)), Duration::ZERO),
            Some(p.max_after)
        );
        assert_eq!(p.delay(5, Some(MS), Duration::ZERO), None);
    }

    #[test]
    fn a_deadline_cuts_the_last_wait_and_then_gives_up() {
        let p = Policy {
            limit: Limit::Deadline(1000 * MS),
            ..retries(0)
        };
        assert_eq!(p.delay(9, None, Duration::ZERO), Some(1000 * MS));
        assert_eq!(p.delay(0, None, 900 * MS), Some(100 * MS));
        assert_eq!(p.delay(0, None, 1000 * MS), None);
        let none = Policy {
            limit: Limit::Deadline(Duration::ZERO),
            ..p
        };
        assert_eq!(none.delay(0, None, Duration::ZERO), None);
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        assert_eq!(retry_after(" 2 "), Some(2000 * MS));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after("-1"), None);
    }

    #[tokio::test]
    async fn retries_are_counted_and_spent_after_max_retries() {
        let fast = Policy {
            base: MS,
            cap: MS,
            ..retries(3)
        };
        let (r, calls, waits) = drive(
            fast,
            &CancellationToken::new(),
            vec![|| Err(Retry::Backoff("down"))],
        )
        .await;
        let Err(Stop::Spent(why, spent)) = r else {
            panic!("not spent: {r:?}")
        };
        assert_eq!((why, spent.attempts, calls), ("down", 4, 4));
        let numbers: Vec<u32> = waits.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [0, 1, 2]);
        assert!(
            waits.iter().all(|(_, d)| *d >= MS / 2 && *d <= MS),
            "{waits:?}"
        );
    }

    #[tokio::test]
    async fn success_after_failures_returns_the_value_and_fail_stops_at_once() {
        let fast = Policy {
            base: MS,
            cap: MS,
            ..retries(5)
        };
        let cancel = CancellationToken::new();
        let (r, calls, _) = drive(
            fast,
            &cancel,
            vec![
                || Err(Retry::Backoff("down")),
                || Err(Retry::After(MS, "429")),
                || Ok(7),
            ],
        )
        .await;
        assert_eq!((r.unwrap(), calls), (7, 3));
        let (r, calls, waits) = drive(
            fast,
            &cancel,
            vec![|| Err(Retry::Fail(Error::keycloak("users", "403")))],
        )
        .await;
        assert!(matches!(r, Err(Stop::Failed(Error::Keycloak { .. }))));
        assert_eq!((calls, waits.len()), (1, 0));
    }

    #[tokio::test]
    async fn an_immediate_retry_neither_waits_nor_counts_as_an_attempt() {
        let (r, calls, waits) = drive(
            retries(0),
            &CancellationToken::new(),
            vec![|| Err(Retry::Now), || Err(Retry::Backoff("500"))],
        )
        .await;
        let Err(Stop::Spent(_, spent)) = r else {
            panic!("not spent: {r:?}")
        };
        assert_eq!((spent.attempts, calls, waits.len()), (1, 2, 0));
    }

    #[tokio::test]
    async fn a_deadline_policy_gives_up_once_the_deadline_has_passed() {
        let p = Policy {
            base: 10 * MS,
            cap: 10 * MS,
            limit: Limit::Deadline(50 * MS),
            max_after: 10 * MS,
        };
        let (r, calls, waits) = drive(
            p,
            &CancellationToken::new(),
            vec![|| Err(Retry::Backoff("down"))],
        )
        .await;
        let Err(Stop::Spent(_, spent)) = r else {
            panic!("not spent: {r:?}")
        };
        assert!(spent.waited >= 50 * MS, "{spent:?}");
        assert_eq!(spent.attempts, calls);
        assert_eq!(waits.len() as u32, calls - 1);
        assert!(waits.iter().all(|(_, d)| *d <= 10 * MS));
    }

    #[tokio::test]
    async fn cancellation_ends_a_sleep_at_once() {
        let cancel = CancellationToken::new();
        let later = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(10 * MS).await;
            later.cancel();
        });
        let hour = Duration::from_secs(3600);
        let r = tokio::time::timeout(Duration::from_secs(10), sleep_or_cancel(hour, &cancel)).await;
        assert_eq!(r, Ok(Err(Cancelled)));
        // Already cancelled: not even a zero wait is slept.
        assert_eq!(
            sleep_or_cancel(Duration::ZERO, &cancel).await,
            Err(Cancelled)
        );
        assert_eq!(sleep_or_cancel(MS, &CancellationToken::new()).await, Ok(()));
    }

    #[tokio::test]
    async fn cancellation_ends_a_backoff_at_once_and_makes_no_further_attempt() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let hours = Policy {
            base: Duration::from_secs(3600),
            cap: Duration::from_secs(3600),
            ..retries(5)
        };
        let run = drive(hours, &cancel, vec![|| Err(Retry::Backoff("down"))]);
        let (r, calls, waits) = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap();
        assert!(matches!(r, Err(Stop::Cancelled)), "{r:?}");
        assert_eq!((calls, waits.len()), (1, 1));
        let e = Stop::<()>::Cancelled.into_error(|_, _| Error::Io("spent".into()));
        assert!(matches!(e, Error::Cancelled));
    }
}
