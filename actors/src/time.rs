//! Event time: instants as Unix milliseconds, read from and written as RFC 3339.
//!
//! Rules never look at the wall clock; every instant they use comes from an event's
//! `occurred_at` or from a tick written into the shard log. This module is the one place that
//! converts between RFC 3339 text and the `i64` milliseconds the state stores.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds in one day.
pub const DAY_MS: i64 = 86_400_000;

/// An RFC 3339 text that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{text}' is not an RFC 3339 timestamp (send e.g. 2026-03-01T10:15:00Z)")]
pub struct TimeError {
    pub text: String,
}

/// Parses RFC 3339 into Unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, TimeError> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| TimeError {
        text: text.to_string(),
    })?;
    Ok((parsed.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Formats Unix milliseconds as RFC 3339 in UTC.
pub fn format_rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{ms}ms"))
}

/// An optional instant as RFC 3339 (`None` stays `None`: JSON `null`).
pub fn format_optional(ms: Option<i64>) -> Option<String> {
    ms.map(format_rfc3339)
}

/// Whole days from `earlier` to `later` (floor; negative when `later` is before `earlier`).
pub fn days_between(earlier_ms: i64, later_ms: i64) -> i64 {
    (later_ms - earlier_ms).div_euclid(DAY_MS)
}

/// Julian day number of 1970-01-01: day numbers ([`day_number`]) count from it.
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// A `YYYY-MM-DD` calendar date, or `None` when the text is not one.
pub fn parse_date(text: &str) -> Option<time::Date> {
    time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()
}

/// The day number (days since 1970-01-01) of a calendar date.
pub fn day_of_date(date: time::Date) -> i32 {
    date.to_julian_day() - UNIX_EPOCH_JULIAN_DAY
}

/// The calendar date of a day number (clamped to the dates `time` can hold).
pub fn date_of_day(day: i32) -> time::Date {
    time::Date::from_julian_day(day.saturating_add(UNIX_EPOCH_JULIAN_DAY)).unwrap_or(if day < 0 {
        time::Date::MIN
    } else {
        time::Date::MAX
    })
}

/// The UTC calendar day of an instant: days since 1970-01-01 (negative before it).
pub fn day_number(ms: i64) -> i32 {
    ms.div_euclid(DAY_MS)
        .clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_through_milliseconds() {
        let ms = parse_rfc3339_ms("2026-03-01T10:15:00Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2026-03-01T10:15:00Z");
        assert_eq!(parse_rfc3339_ms("2026-03-01T12:15:00+02:00").unwrap(), ms);
    }

    #[test]
    fn a_bad_timestamp_names_the_text() {
        let error = parse_rfc3339_ms("yesterday").unwrap_err();
        assert!(error.to_string().contains("'yesterday'"));
    }
}
