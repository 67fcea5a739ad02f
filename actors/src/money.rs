//! Money as integer minor units (cents), parsed exactly from the decimals that JSON carries.
//!
//! Adapters send amounts as JSON numbers or strings (`12.5`, `"12.50"`); inside the engine every
//! amount is an `i64` count of minor units so that points, spend and pro-rata returns never
//! drift. Only two-decimal currencies are supported; `to_decimal` turns minor units back into
//! a JSON number for replies and events.

use serde_json::Value;

/// Minor units per major unit (two-decimal currencies).
pub const MINOR_PER_MAJOR: i64 = 100;

/// Why an amount could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("is not a number or a decimal string (send e.g. 12.50)")]
    NotANumber,
    #[error("has more than 2 decimals (send at most cents, e.g. 12.34)")]
    TooPrecise,
    #[error("is too large")]
    TooLarge,
}

/// Parses a decimal text such as `12`, `12.5`, `-3.25` into minor units, exactly.
pub fn parse_decimal_minor(text: &str) -> Result<i64, AmountError> {
    let text = text.trim();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = match digits.split_once('.') {
        Some((w, f)) => (w, f),
        None => (digits, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(AmountError::NotANumber);
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::NotANumber);
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 2 {
        return Err(AmountError::TooPrecise);
    }
    let whole_value: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| AmountError::TooLarge)?
    };
    let mut fraction_value: i64 = 0;
    for (index, byte) in fraction.bytes().enumerate() {
        let digit = i64::from(byte - b'0');
        fraction_value += if index == 0 { digit * 10 } else { digit };
    }
    let minor = whole_value
        .checked_mul(MINOR_PER_MAJOR)
        .and_then(|m| m.checked_add(fraction_value))
        .ok_or(AmountError::TooLarge)?;
    Ok(if negative { -minor } else { minor })
}

/// Reads a JSON number or decimal string as minor units.
pub fn minor_from_json(value: &Value) -> Result<i64, AmountError> {
    match value {
        // serde_json prints an f64 in its shortest round-trip form, so `12.5` reads as "12.5".
        Value::Number(number) => parse_decimal_minor(&number.to_string()),
        Value::String(text) => parse_decimal_minor(text),
        _ => Err(AmountError::NotANumber),
    }
}

/// Minor units as a JSON decimal number (`1250` -> `12.5`).
pub fn to_decimal(minor: i64) -> Value {
    // Exact for every amount below 2^53 cents; the ingest limit is far below that.
    let number = serde_json::Number::from_f64(minor as f64 / MINOR_PER_MAJOR as f64);
    number.map(Value::Number).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_exactly_into_minor_units() {
        assert_eq!(parse_decimal_minor("12"), Ok(1200));
        assert_eq!(parse_decimal_minor("12.5"), Ok(1250));
        assert_eq!(parse_decimal_minor("12.50"), Ok(1250));
        assert_eq!(parse_decimal_minor("0.07"), Ok(7));
        assert_eq!(parse_decimal_minor("-3.25"), Ok(-325));
        assert_eq!(parse_decimal_minor(".5"), Ok(50));
    }

    #[test]
    fn bad_amounts_are_rejected_with_a_reason() {
        assert_eq!(parse_decimal_minor("1.234"), Err(AmountError::TooPrecise));
        assert_eq!(parse_decimal_minor("abc"), Err(AmountError::NotANumber));
        assert_eq!(parse_decimal_minor(""), Err(AmountError::NotANumber));
        assert_eq!(
            parse_decimal_minor("99999999999999999999"),
            Err(AmountError::TooLarge)
        );
    }

    #[test]
    fn json_numbers_and_strings_read_the_same() {
        assert_eq!(minor_from_json(&serde_json::json!(19.99)), Ok(1999));
        assert_eq!(minor_from_json(&serde_json::json!("19.99")), Ok(1999));
        assert_eq!(minor_from_json(&serde_json::json!(20)), Ok(2000));
        assert_eq!(to_decimal(1999), serde_json::json!(19.99));
    }
}
