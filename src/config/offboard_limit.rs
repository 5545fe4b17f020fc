//! `identity.offboard_limit`: the most users one run may offboard, as a count (`500`) or a
//! percentage of the users in the realm as far as seedkeeper knows (`"10%"`: rows with a sub
//! that are not offboarded). A percentage is never below [`PERCENT_FLOOR`] users, so a small
//! realm can lose a few users in a day; a count means what it says (`0`: nobody without
//! `--allow-offboard`).
//!
//! Whatever the limit, a run that would offboard every one of those users (an empty listing, a
//! realm re-created before its users came back) is stopped: an input that looks empty is not
//! evidence that everyone left.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The fewest users a percentage limit allows.
pub(crate) const PERCENT_FLOOR: i64 = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OffboardLimit {
    Count(u64),
    /// Percent of the users in the realm, 0 to 100.
    Percent(f64),
}

impl Default for OffboardLimit {
    /// 10 %: a normal day's leavers in a realm of any size, far below "everyone".
    fn default() -> Self {
        OffboardLimit::Percent(10.0)
    }
}

impl OffboardLimit {
    /// The limit for a realm of `in_realm` users.
    pub(crate) fn resolve(self, in_realm: i64) -> i64 {
        match self {
            OffboardLimit::Count(n) => i64::try_from(n).unwrap_or(i64::MAX),
            OffboardLimit::Percent(p) => {
                let share = (p / 100.0 * in_realm.max(0) as f64).ceil() as i64;
                share.max(PERCENT_FLOOR)
            }
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bad = || {
            format!("identity.offboard_limit = {text:?}: expected a count of users (500) or a percentage of the users in the realm (\"10%\") (SEEDKEEPER_IDENTITY__OFFBOARD_LIMIT)")
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) || p.is_nan() {
                return Err(bad());
            }
            return Ok(OffboardLimit::Percent(p));
        }
        t.parse::<u64>()
            .map(OffboardLimit::Count)
            .map_err(|_| bad())
    }
}

impl fmt::Display for OffboardLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffboardLimit::Count(n) => write!(f, "{n}"),
            OffboardLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for OffboardLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OffboardLimit::Count(n) => s.serialize_u64(*n),
            OffboardLimit::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for OffboardLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OffboardLimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count of users (500) or a percentage (\"10%\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(OffboardLimit::Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v).map(OffboardLimit::Count).map_err(|_| {
                    E::custom(format!(
                        "identity.offboard_limit = {v}: a count cannot be negative"
                    ))
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                OffboardLimit::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentages_parse_and_resolve() {
        assert_eq!(OffboardLimit::parse("500"), Ok(OffboardLimit::Count(500)));
        assert_eq!(
            OffboardLimit::parse(" 2.5% "),
            Ok(OffboardLimit::Percent(2.5))
        );
        assert!(OffboardLimit::parse("110%").is_err());
        assert!(OffboardLimit::parse("-1").is_err());
        assert!(OffboardLimit::parse("lots").is_err());
        assert_eq!(OffboardLimit::Count(0).resolve(1_000), 0);
        assert_eq!(OffboardLimit::Percent(10.0).resolve(100_000), 10_000);
        assert_eq!(
            OffboardLimit::Percent(10.0).resolve(101),
            PERCENT_FLOOR.max(11)
        );
        assert_eq!(OffboardLimit::Percent(10.0).resolve(6), PERCENT_FLOOR);
        assert_eq!(OffboardLimit::Percent(1.0).resolve(1_001), 11);
    }
}
