//! Human durations for policies (`rotate_after`, `max_key_age`): whole
//! numbers with units, largest first, such as "90d", "12h" or "1d12h".
//!
//! Units: `y` (365 days), `w` (7 days), `d`, `h`, `m` (minutes, never
//! months) and `s`.

use std::time::Duration;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;
const YEAR: u64 = 365 * DAY;

/// The longest duration accepted: 10000 years, far beyond any key's life
/// and small enough that adding it to any wall-clock time cannot overflow.
pub const MAX: Duration = Duration::from_secs(10_000 * YEAR);

/// What every error message ends with.
const FORMS: &str = "write whole numbers each followed by a unit, largest first: \
    y (365 days), w (weeks), d (days), h (hours), m (minutes) or s (seconds), \
    e.g. 90d, 12h, 30m or 1d12h";

/// A duration that could not be parsed, with the text and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {kind}; {FORMS}")]
pub struct DurationError {
    input: String,
    kind: DurationErrorKind,
}

impl DurationError {
    pub fn kind(&self) -> &DurationErrorKind {
        &self.kind
    }
}

/// What is wrong with a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationErrorKind {
    #[error("it is empty")]
    Empty,
    #[error("it is negative")]
    Negative,
    #[error("it is zero")]
    Zero,
    /// Longer than [`MAX`] (or beyond what can be counted at all).
    #[error("it is too long (at most 10000y)")]
    TooLong,
    #[error("{0} has no unit")]
    MissingUnit(String),
    #[error("unit {0:?} has no number before it")]
    MissingNumber(String),
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    #[error("unexpected {0:?}")]
    Unexpected(char),
    #[error("units must go from largest to smallest, each once")]
    Order,
}

/// Parses a duration such as "90d", "12h", "30m", "45s", "2w", "1y" (365
/// days) or a combination, largest unit first, such as "1d12h". Surrounding
/// whitespace is ignored. Empty, zero, negative and too long durations,
/// fractions and unknown units are refused with a message naming the
/// accepted forms.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    parse_secs(s.trim())
        .map(Duration::from_secs)
        .map_err(|kind| DurationError {
            input: s.to_owned(),
            kind,
        })
}

fn parse_secs(s: &str) -> Result<u64, DurationErrorKind> {
    if s.is_empty() {
        return Err(DurationErrorKind::Empty);
    }
    if s.starts_with('-') {
        return Err(DurationErrorKind::Negative);
    }
    let mut rest = s;
    let mut total: u64 = 0;
    let mut previous_unit = u64::MAX;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, after) = rest.split_at(digits_end);
        let unit_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        if digits.is_empty() {
            return Err(if !unit.is_empty() {
                DurationErrorKind::MissingNumber(unit.to_owned())
            } else {
                DurationErrorKind::Unexpected(rest.chars().next().unwrap_or_default())
            });
        }
        if unit.is_empty() {
            return Err(match after.chars().next() {
                None => DurationErrorKind::MissingUnit(digits.to_owned()),
                Some(c) => DurationErrorKind::Unexpected(c),
            });
        }
        let unit_secs = match unit {
            "y" => YEAR,
            "w" => WEEK,
            "d" => DAY,
            "h" => HOUR,
            "m" => MINUTE,
            "s" => 1,
            other => return Err(DurationErrorKind::UnknownUnit(other.to_owned())),
        };
        if unit_secs >= previous_unit {
            return Err(DurationErrorKind::Order);
        }
        previous_unit = unit_secs;
        // Only digits: the one way to fail is a number too large.
        let n: u64 = digits.parse().map_err(|_| DurationErrorKind::TooLong)?;
        total = n
            .checked_mul(unit_secs)
            .and_then(|secs| total.checked_add(secs))
            .ok_or(DurationErrorKind::TooLong)?;
        rest = after;
    }
    if total == 0 {
        return Err(DurationErrorKind::Zero);
    }
    if total > MAX.as_secs() {
        return Err(DurationErrorKind::TooLong);
    }
    Ok(total)
}

/// The duration as [`parse`] reads it back, in whole seconds (any fraction
/// of a second is dropped; zero is "0s"). Days are written as years or
/// weeks when they divide exactly ("1y", "2w", "90d"), then hours, minutes
/// and seconds, each only if not zero ("1d12h").
pub fn format(d: Duration) -> String {
    use std::fmt::Write;
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let days = secs / DAY;
    if days > 0 {
        let _ = if days.is_multiple_of(365) {
            write!(out, "{}y", days / 365)
        } else if days.is_multiple_of(7) {
            write!(out, "{}w", days / 7)
        } else {
            write!(out, "{days}d")
        };
    }
    let rem = secs % DAY;
    for (n, unit) in [
        (rem / HOUR, 'h'),
        (rem % HOUR / MINUTE, 'm'),
        (rem % MINUTE, 's'),
    ] {
        if n > 0 {
            let _ = write!(out, "{n}{unit}");
        }
    }
    out
}

/// (De)serializes an `Option<Duration>` as a duration string ("90d"):
/// `#[serde(default, with = "crate::duration::serde_opt", skip_serializing_if = "Option::is_none")]`.
pub mod serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> u64 {
        parse(s).unwrap().as_secs()
    }

    fn kind(s: &str) -> DurationErrorKind {
        parse(s).unwrap_err().kind().clone()
    }

    #[test]
    fn parses_each_unit() {
        assert_eq!(secs("45s"), 45);
        assert_eq!(secs("30m"), 30 * 60);
        assert_eq!(secs("12h"), 12 * 3600);
        assert_eq!(secs("90d"), 90 * 86400);
        assert_eq!(secs("2w"), 14 * 86400);
        assert_eq!(secs("1y"), 365 * 86400);
        assert_eq!(secs(" 7d\n"), 7 * 86400);
    }

    #[test]
    fn parses_combinations() {
        assert_eq!(secs("1d12h"), 36 * 3600);
        assert_eq!(
            secs("1y2w3d4h5m6s"),
            365 * 86400 + 17 * 86400 + 4 * 3600 + 5 * 60 + 6
        );
        assert_eq!(secs("0d1s"), 1);
        assert_eq!(secs("36h"), 36 * 3600);
    }

    #[test]
    fn refuses_bad_input_naming_the_forms() {
        assert_eq!(kind(""), DurationErrorKind::Empty);
        assert_eq!(kind("   "), DurationErrorKind::Empty);
        assert_eq!(kind("-5d"), DurationErrorKind::Negative);
        assert_eq!(kind("0d"), DurationErrorKind::Zero);
        assert_eq!(kind("0h0s"), DurationErrorKind::Zero);
        assert_eq!(kind("90"), DurationErrorKind::MissingUnit("90".into()));
        assert_eq!(kind("d"), DurationErrorKind::MissingNumber("d".into()));
        assert_eq!(kind("1d h"), DurationErrorKind::Unexpected(' '));
        assert_eq!(kind("1.5d"), DurationErrorKind::Unexpected('.'));
        assert_eq!(kind("+1d"), DurationErrorKind::Unexpected('+'));
        assert_eq!(kind("6mo"), DurationErrorKind::UnknownUnit("mo".into()));
        assert_eq!(kind("3days"), DurationErrorKind::UnknownUnit("days".into()));
        assert_eq!(kind("1D"), DurationErrorKind::UnknownUnit("D".into()));
        assert_eq!(kind("12h1d"), DurationErrorKind::Order);
        assert_eq!(kind("1d1d"), DurationErrorKind::Order);
        assert_eq!(kind("99999999999999999999s"), DurationErrorKind::TooLong);
        assert_eq!(kind("999999999999999y"), DurationErrorKind::TooLong);
        assert_eq!(kind("10001y"), DurationErrorKind::TooLong);
        assert_eq!(parse("10000y").unwrap(), MAX);
        let msg = parse("6mo").unwrap_err().to_string();
        assert!(msg.contains("\"6mo\""), "{msg}");
        assert!(msg.contains("unknown unit \"mo\""), "{msg}");
        assert!(
            msg.contains("m (minutes)") && msg.contains("1d12h"),
            "{msg}"
        );
    }

    #[test]
    fn formats_shortest_exact() {
        let f = |s: u64| format(Duration::from_secs(s));
        assert_eq!(f(90 * 86400), "90d");
        assert_eq!(f(36 * 3600), "1d12h");
        assert_eq!(f(14 * 86400), "2w");
        assert_eq!(f(365 * 86400), "1y");
        assert_eq!(f(730 * 86400), "2y");
        assert_eq!(f(366 * 86400), "366d");
        assert_eq!(f(45), "45s");
        assert_eq!(f(3600 + 1), "1h1s");
        assert_eq!(f(7 * 86400 + 30 * 60), "1w30m");
        assert_eq!(f(0), "0s");
        assert_eq!(format(Duration::from_millis(90_500)), "1m30s");
    }

    #[test]
    fn format_reads_back() {
        for s in [
            1,
            59,
            60,
            61,
            3599,
            3600,
            86399,
            86400,
            86401,
            7 * 86400,
            365 * 86400,
            365 * 86400 + 1,
            MAX.as_secs(),
        ] {
            assert_eq!(secs(&format(Duration::from_secs(s))), s, "{s}");
        }
        for s in ["90d", "1d12h", "2w", "1y", "45s", "366d", "3h15m"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }

    proptest::proptest! {
        #[test]
        fn format_reads_back_any(s in 1..=MAX.as_secs()) {
            proptest::prop_assert_eq!(secs(&format(Duration::from_secs(s))), s);
        }
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Policy {
        #[serde(
            default,
            with = "crate::duration::serde_opt",
            skip_serializing_if = "Option::is_none"
        )]
        rotate_after: Option<Duration>,
    }

    #[test]
    fn serde_opt_in_toml_and_json() {
        let p: Policy = toml::from_str("rotate_after = \"1d12h\"").unwrap();
        assert_eq!(p.rotate_after, Some(Duration::from_secs(36 * 3600)));
        assert_eq!(
            toml::to_string(&p).unwrap().trim(),
            "rotate_after = \"1d12h\""
        );

        let none: Policy = toml::from_str("").unwrap();
        assert_eq!(none.rotate_after, None);
        assert_eq!(toml::to_string(&none).unwrap().trim(), "");

        let err = toml::from_str::<Policy>("rotate_after = \"6mo\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown unit \"mo\""), "{err}");

        let p: Policy = serde_json::from_str(r#"{"rotate_after":"90d"}"#).unwrap();
        assert_eq!(p.rotate_after, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"rotate_after":"90d"}"#
        );
        let p: Policy = serde_json::from_str(r#"{"rotate_after":null}"#).unwrap();
        assert_eq!(p.rotate_after, None);
        assert_eq!(serde_json::to_string(&p).unwrap(), "{}");
        assert!(serde_json::from_str::<Policy>(r#"{"rotate_after":"0s"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"rotate_after":5}"#).is_err());
    }
}
