//! Durations as operators write them: `500ms`, `1.5s`, `10m`, `2h`, `7d`, or a bare number
//! of seconds, in flags and in the TOML file alike.

use std::time::Duration;

/// Reads a duration; the error says what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m, h or d (for example 1.5s)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (for example 500ms, 1.5s, 10m)"))?;
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .map_err(|_| format!("{text:?} is out of range"))
}

/// A duration, or `never`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrNever(pub Option<Duration>);

/// Reads a duration of at least a minute, or `never` (how long to keep what is unseen).
pub fn parse_or_never(text: &str) -> Result<OrNever, String> {
    or_never(text, Duration::from_secs(60), "1m")
}

/// Reads a duration of at least a second, or `never` (how often to do something).
pub fn parse_every_or_never(text: &str) -> Result<OrNever, String> {
    or_never(text, Duration::from_secs(1), "1s")
}

fn or_never(text: &str, least: Duration, least_text: &str) -> Result<OrNever, String> {
    if text.trim() == "never" {
        return Ok(OrNever(None));
    }
    let d = parse_duration(text)?;
    if d < least {
        return Err(format!(
            "{text:?} is too short: at least {least_text}, or never"
        ));
    }
    Ok(OrNever(Some(d)))
}

/// Serde helpers: optional durations in the config file, written like the flags (a
/// string such as `"1.5s"`) or as a number of seconds.
mod serde_text {
    use serde::{Deserialize, Deserializer};

    /// The value as text, whichever way it was written; `None` if absent.
    pub fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(f64),
        }
        Ok(Option::<Raw>::deserialize(d)?.map(|raw| match raw {
            Raw::Text(t) => t,
            Raw::Seconds(s) => s.to_string(),
        }))
    }
}

/// Serde helper: an optional [`OrNever`], written like the flag.
pub mod serde_or_never {
    use serde::Deserializer;

    use super::OrNever;

    /// Reads `"30d"`, `"never"` or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OrNever>, D::Error> {
        super::serde_text::read(d)?
            .map(|text| super::parse_or_never(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Serde helper: like [`serde_or_never`], for [`super::parse_every_or_never`].
pub mod serde_every_or_never {
    use serde::Deserializer;

    use super::OrNever;

    /// Reads `"24h"`, `"never"` or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OrNever>, D::Error> {
        super::serde_text::read(d)?
            .map(|text| super::parse_every_or_never(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Serde helper: an optional duration written as a string or a number of seconds.
pub mod serde_opt {
    use std::time::Duration;

    use serde::Deserializer;

    /// Reads `"1.5s"` or `1.5` into `Some(Duration)`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::serde_text::read(d)?
            .map(|text| super::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_units_operators_write_and_refuses_the_rest() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e999s").is_err());
        assert_eq!(parse_or_never("never"), Ok(OrNever(None)));
        assert_eq!(
            parse_or_never("30d"),
            Ok(OrNever(Some(Duration::from_secs(30 * 86_400))))
        );
        assert!(parse_or_never("5s").is_err());
    }
}
