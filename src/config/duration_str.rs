//! Durations as `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds (a number or a
//! string of digits).
//!
//! Parsed by `humantime`, whose arithmetic is checked: a value too large for a `Duration` is
//! refused, not wrapped. It also takes combined spans (`"1h 30m"`), longer unit names (`"5min"`,
//! `"2 hours"`), days and weeks (`"2d"`, `"1w"`) and decimals (`"1.5s"`). Two of its forms are
//! refused here all the same: months and years (`"5M"` would be five months where five minutes
//! were meant; both are calendar approximations), and anything finer than a millisecond
//! (`statement_timeout` and `lock_timeout` are sent to PostgreSQL in whole milliseconds:
//! `"500us"` would become 0, which turns the timeout off). So every accepted value formats back
//! exactly.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// humantime's units for months and years.
const CALENDAR_UNITS: &[&str] = &["M", "month", "months", "y", "yr", "yrs", "year", "years"];

pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // humantime wants a unit: a bare number is seconds, as it has always been here.
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| out_of_range(s));
    }
    if s.split(|c: char| !c.is_alphabetic())
        .any(|unit| CALENDAR_UNITS.contains(&unit))
    {
        return Err(unknown_unit(s));
    }
    let d = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => unknown_unit(s),
        humantime::DurationError::NumberOverflow => out_of_range(s),
        _ => format!("{s:?} is not a duration like 30s, 5m or 250ms"),
    })?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "{s:?} is finer than a millisecond: give whole milliseconds (e.g. 250ms)"
        ));
    }
    Ok(d)
}

fn unknown_unit(s: &str) -> String {
    format!("{s:?} has an unknown unit (use ms, s, m or h)")
}

fn out_of_range(s: &str) -> String {
    format!("{s:?} is out of range: too large, or finer than a millisecond")
}

pub(crate) fn format(d: &Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(d))
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(Duration::from_secs(n)),
        Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_forms_accepted_before_humantime_parse_as_before() {
        for (input, want) in [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("30", Duration::from_secs(30)),
            ("0", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("007s", Duration::from_secs(7)),
            (" 30s ", Duration::from_secs(30)),
            ("5 m", Duration::from_secs(300)),
            ("1500ms", Duration::from_millis(1500)),
            (
                "18446744073709551615",
                Duration::from_secs(18446744073709551615),
            ),
        ] {
            assert_eq!(parse(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn humantime_adds_combined_spans_and_longer_names() {
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("2 hours"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1000us"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn refusals_keep_their_messages() {
        let not_a_duration = "is not a duration like 30s, 5m or 250ms";
        let unknown = "has an unknown unit (use ms, s, m or h)";
        for (input, want) in [
            ("soon", not_a_duration),
            ("", not_a_duration),
            ("-5s", not_a_duration),
            ("s", not_a_duration),
            ("10x", unknown),
            ("5S", unknown),
            // humantime's months and years: refused, so a capital M is not a month.
            ("5M", unknown),
            ("1y", unknown),
            ("2 months", unknown),
        ] {
            let e = parse(input).expect_err(input);
            assert!(e.contains(want), "{input:?}: {e}");
            assert!(
                e.starts_with(&format!("{:?}", input.trim())),
                "{input:?}: {e}"
            );
        }
    }

    #[test]
    fn overflowing_and_sub_millisecond_durations_are_refused() {
        for input in [
            "99999999999999999h",
            "18446744073709551616",
            "999999999999999999999s",
        ] {
            let e = parse(input).expect_err(input);
            assert!(e.contains("out of range"), "{input:?}: {e}");
        }
        let e = parse("500us").expect_err("500us");
        assert!(e.contains("finer than a millisecond"), "{e}");
    }

    proptest! {
        /// Every `<n><unit>` the hand-written parser took (with optional spaces) still gives the
        /// same duration; where it overflowed (`n * 3600` unchecked) it is now refused. One
        /// change: humantime counts in nanoseconds below a second, so more than about 584 years
        /// written in milliseconds (`n * 1_000_000` past `u64::MAX`) is refused too.
        #[test]
        fn number_and_unit_parse_as_before(
            n in prop_oneof![0u64..100_000, any::<u64>()],
            unit in prop::sample::select(vec!["", "s", "ms", "m", "h"]),
            space in prop::sample::select(vec!["", " "]),
            pad in prop::sample::select(vec!["", " ", "\t"]),
        ) {
            let input = format!("{pad}{n}{space}{unit}{pad}");
            let want = match unit {
                "" | "s" => Some(Duration::from_secs(n)),
                "ms" => n.checked_mul(1_000_000).map(|_| Duration::from_millis(n)),
                "m" => n.checked_mul(60).map(Duration::from_secs),
                _ => n.checked_mul(3600).map(Duration::from_secs),
            };
            match want {
                Some(d) => prop_assert_eq!(parse(&input), Ok(d)),
                None => prop_assert!(parse(&input).is_err_and(|e| e.contains("out of range"))),
            }
        }

        /// Whatever is accepted formats back to itself.
        #[test]
        fn accepted_durations_format_back_to_themselves(ms in 0u64..u64::MAX / 1_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse(&format(&d)), Ok(d));
        }
    }
}
