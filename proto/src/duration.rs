//! Durations as people write them: `30s`, `15m`, `24h`, `7d` (one number, one unit).

use std::time::Duration;

/// Why a duration did not parse; the message says how to write one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration: write a whole number and a unit, e.g. 30s, 15m, 24h or 7d")]
pub struct BadDuration(pub String);

/// Parses `30s`, `15m`, `24h` or `7d`. Zero is allowed here; callers that need a
/// positive duration say so themselves.
pub fn parse(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(bad)?;
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() || number.len() > 12 {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// The shortest exact way to write `d` (whole seconds): `90s`, `15m`, `24h`, `7d`.
pub fn format(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_round_trips() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(604_800)));
        for text in [
            "",
            "s",
            "10",
            "1.5h",
            "-3s",
            "10 m",
            "3w",
            "1h30m",
            "9999999999999d",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        for text in ["45s", "15m", "25h", "7d", "0s"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(format(Duration::from_secs(90)), "90s");
    }
}
