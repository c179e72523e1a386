//! The one duration and the one size notation of config.toml: durations are seconds as a
//! number (`1.5`) or a string with a unit (`"500ms"`, `"3s"`, `"2m"`, `"1h"`, `"7d"`; a bare
//! `"3"` is seconds), sizes are bytes or a string with a unit (`"64MiB"`). Every section parses
//! them here, so a value valid for one key is valid for every key (within its range).

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::FieldError;

/// A duration as written: a number of seconds (`3`, `0.5`) or a string (`"500ms"`, `"3s"`,
/// `"2m"`, `"1h"`, `"7d"`, `"3"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(f64),
    Text(String),
}

/// A size: a number of bytes or a string with a unit (`"64MiB"`, `"512KiB"`, `"1GiB"`, `"10MB"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawBytes {
    Bytes(u64),
    Text(String),
}

/// `value` as a duration, if set; any duration is allowed.
pub(super) fn duration(key: &str, value: Option<&Spanned<RawDuration>>) -> Result<Option<Duration>, FieldError> {
    duration_in(key, value, Duration::ZERO, Duration::MAX)
}

/// `value` as a duration in `min..=max`, if set.
pub(super) fn duration_in(
    key: &str,
    value: Option<&Spanned<RawDuration>>,
    min: Duration,
    max: Duration,
) -> Result<Option<Duration>, FieldError> {
    let Some(value) = value else { return Ok(None) };
    let duration =
        parse_duration(value.get_ref()).map_err(|message| FieldError::new(key, Some(value.span()), message))?;
    if duration < min || duration > max {
        let max_text = if max == Duration::MAX { "no limit".to_string() } else { format!("{max:?}") };
        return Err(FieldError::new(
            key,
            Some(value.span()),
            format!("{duration:?} is out of range; allowed: {min:?} to {max_text}"),
        ));
    }
    Ok(Some(duration))
}

/// Seconds as a number (`3`, `0.5`, `"3"`), or a string with a unit: ms, s, m (min), h, d.
pub fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    const ALLOWED: &str =
        "not a duration; write seconds (3, 0.5) or a string with a unit (\"500ms\", \"3s\", \"2m\", \"1h\", \"7d\")";
    let seconds = match raw {
        RawDuration::Seconds(seconds) => *seconds,
        RawDuration::Text(text) => {
            let text = text.trim();
            let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let number: f64 = number.parse().map_err(|_| format!("{ALLOWED}, got {text:?}"))?;
            let scale = match unit.trim() {
                "ms" => 0.001,
                "" | "s" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return Err(format!("{ALLOWED}, got {text:?}")),
            };
            number * scale
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{ALLOWED}; it must be 0 or more, got {seconds}"))
}

/// Bytes as an integer, or a string with a unit: B, KB, MB, GB, KiB, MiB, GiB.
pub fn parse_bytes(raw: &RawBytes) -> Result<u64, String> {
    let allowed = "expected bytes (65536) or a string with a unit (\"512KiB\", \"64MiB\", \"1GiB\", \"10MB\")";
    match raw {
        RawBytes::Bytes(b) => Ok(*b),
        RawBytes::Text(text) => {
            let text = text.trim();
            let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let number: u64 = number.parse().map_err(|_| format!("{allowed}, got {text:?}"))?;
            let scale: u64 = match unit.trim() {
                "" | "B" => 1,
                "KB" => 1000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => return Err(format!("{allowed}, got {text:?}")),
            };
            number.checked_mul(scale).ok_or(format!("{text:?} is too large"))
        }
    }
}
