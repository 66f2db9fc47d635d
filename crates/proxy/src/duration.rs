//! Go-style durations (`30s`, `1m30s`, `500ms`, `1.5h`), the format kamal-proxy's flags and
//! Kamal's command lines use. Stored in the state file in the same text form.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration that parses and prints the way Go's `time.ParseDuration` and
/// `Duration.String` do, so flags written for kamal-proxy mean the same here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl GoDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        let mut rest = input.trim();
        if let Some(stripped) = rest.strip_prefix('+') {
            rest = stripped;
        }
        if rest.starts_with('-') {
            return Err(fail("negative durations are not allowed"));
        }
        if rest == "0" {
            return Ok(Self(Duration::ZERO));
        }
        if rest.is_empty() {
            return Err(fail("empty"));
        }
        let mut total_nanos: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| fail("missing unit (use ns, us, ms, s, m or h)"))?;
            let (number, after) = rest.split_at(number_len);
            if number.is_empty() || number == "." || number.matches('.').count() > 1 {
                return Err(fail("expected a number"));
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let scale = UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| fail("unknown unit (use ns, us, ms, s, m or h)"))?;
            let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| fail("number too large"))?
            };
            let mut nanos = whole
                .checked_mul(scale)
                .ok_or_else(|| fail("number too large"))?;
            let mut place = scale;
            for digit in fraction.bytes().take(18) {
                place /= 10;
                nanos += u128::from(digit - b'0') * place;
            }
            total_nanos = total_nanos
                .checked_add(nanos)
                .ok_or_else(|| fail("number too large"))?;
            rest = after;
        }
        let total = u64::try_from(total_nanos).map_err(|_| fail("number too large"))?;
        Ok(Self(Duration::from_nanos(total)))
    }
}

impl fmt::Display for GoDuration {
    /// Prints like Go: `1h2m3s`, `1m30s`, `500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000_000_000 {
            let (scale, unit) = if nanos < 1_000 {
                (1, "ns")
            } else if nanos < 1_000_000 {
                (1_000, "µs")
            } else {
                (1_000_000, "ms")
            };
            return write_decimal(f, nanos, scale, unit);
        }
        let hours = nanos / 3_600_000_000_000;
        let minutes = (nanos / 60_000_000_000) % 60;
        let second_nanos = nanos % 60_000_000_000;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write_decimal(f, second_nanos, 1_000_000_000, "s")
    }
}

fn write_decimal(f: &mut fmt::Formatter<'_>, value: u128, scale: u128, unit: &str) -> fmt::Result {
    let whole = value / scale;
    let fraction = value % scale;
    if fraction == 0 {
        return write!(f, "{whole}{unit}");
    }
    let width = scale.ilog10() as usize;
    let digits = format!("{fraction:0width$}");
    write!(f, "{whole}.{}{unit}", digits.trim_end_matches('0'))
}

impl serde::Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Duration {
        s.parse::<GoDuration>().unwrap().0
    }

    #[test]
    fn parses_the_forms_kamal_uses() {
        assert_eq!(parse("30s"), Duration::from_secs(30));
        assert_eq!(parse("1m30s"), Duration::from_secs(90));
        assert_eq!(parse("500ms"), Duration::from_millis(500));
        assert_eq!(parse("1.5h"), Duration::from_secs(5400));
        assert_eq!(parse("2h45m"), Duration::from_secs(9900));
        assert_eq!(parse("0"), Duration::ZERO);
        assert_eq!(parse("100us"), Duration::from_micros(100));
        assert_eq!(parse(".5s"), Duration::from_millis(500));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            "",
            "30",
            "s",
            "10x",
            "-1s",
            "1..5s",
            "1s2",
            "99999999999999999999h",
        ] {
            assert!(bad.parse::<GoDuration>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn prints_like_go() {
        assert_eq!(GoDuration(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(GoDuration(Duration::from_secs(90)).to_string(), "1m30s");
        assert_eq!(GoDuration(Duration::from_secs(3600)).to_string(), "1h0m0s");
        assert_eq!(GoDuration(Duration::from_millis(500)).to_string(), "500ms");
        assert_eq!(GoDuration(Duration::from_millis(1500)).to_string(), "1.5s");
        assert_eq!(GoDuration(Duration::ZERO).to_string(), "0s");
    }

    #[test]
    fn display_round_trips() {
        for s in ["30s", "1m30s", "500ms", "1h0m0s", "1.25s", "250µs"] {
            assert_eq!(
                parse(s).as_nanos(),
                parse(&GoDuration(parse(s)).to_string()).as_nanos()
            );
        }
    }
}
