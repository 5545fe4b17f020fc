//! The schedule's cron expressions, read as `tokio-cron-scheduler` reads them (its own parser,
//! `croner`): six fields, seconds first, UTC. Both the config's validation and the retry
//! backoff's cap ask for an expression's interval here.

use std::time::Duration;

use chrono::Utc;
use croner::parser::{CronParser, Seconds};

/// The schedule's interval: the time between its next two fire times (for an irregular
/// expression such as `0 0 9,17 * * *`, the gap that comes next). Parsed as the scheduler parses
/// it. An error when the expression does not parse or never fires again.
pub(crate) fn interval(cron: &str) -> std::result::Result<Duration, String> {
    let schedule = CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(cron)
        .map_err(|e| e.to_string())?;
    let never = |_| "it never fires (twice) from now on".to_string();
    let first = schedule
        .find_next_occurrence(&Utc::now(), false)
        .map_err(never)?;
    let second = schedule
        .find_next_occurrence(&first, false)
        .map_err(never)?;
    (second - first)
        .to_std()
        .map_err(|_| "its fire times do not follow one another".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_the_time_between_the_next_two_fire_times() {
        let s = Duration::from_secs;
        assert_eq!(interval("0 */5 * * * *"), Ok(s(300)));
        assert_eq!(interval("*/1 * * * * *"), Ok(s(1)));
        assert_eq!(interval("0 0 * * * *"), Ok(s(3600)));
        // Once a year: the cap is a year, so the backoff doubles as long as failures go on.
        assert!(interval("0 0 0 1 1 *").unwrap() >= s(365 * 86400));
        assert!(interval("0 0 0 30 2 *").is_err(), "February 30 never comes");
        assert!(interval("not cron").is_err());
    }
}
