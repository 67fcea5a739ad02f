//! Money as integer minor units (cents), parsed exactly from the decimals that JSON carries.
//!
//! Adapters send amounts as JSON numbers or strings (`12.5`, `"12.50"`); inside the engine every
//! amount is an `i64` count of minor units so that points, spend and pro-rata returns never
//! drift. Only two-decimal currencies are supported. [`Money`] is the one way back out: its
//! `Display` is the text of summaries and error messages (`12.50`, `-0.50`; `{:#}` gives the
//! compact form a rules file writes, `400`), and its serde form is the JSON number of
//! replies, views and events (`12.5`). Never rounds, never panics.

use serde_json::Value;
use std::fmt;

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

/// An amount in minor units (cents) of a two-decimal currency.
///
/// `Display`: always two decimals with the sign (`1250` -> `12.50`, `-50` -> `-0.50`); the
/// alternate form `{:#}` drops `.00` (`40000` -> `400`, `49999` -> `499.99`), as a rules
/// file writes amounts. Serialized as a JSON number (`12.5`), exact below 2^53 cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(pub i64);

impl Money {
    /// The amount in minor units.
    pub fn minor(self) -> i64 {
        self.0
    }

    /// The amount as a JSON decimal number (`1250` -> `12.5`).
    pub fn to_json(self) -> Value {
        // Exact for every amount below 2^53 cents; the ingest limit is far below that.
        serde_json::Number::from_f64(self.major_f64()).map_or(Value::Null, Value::Number)
    }

    fn major_f64(self) -> f64 {
        self.0 as f64 / MINOR_PER_MAJOR as f64
    }
}

impl From<i64> for Money {
    fn from(minor: i64) -> Money {
        Money(minor)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, cents) = (abs / 100, abs % 100);
        if f.alternate() && cents == 0 {
            write!(f, "{sign}{whole}")
        } else {
            write!(f, "{sign}{whole}.{cents:02}")
        }
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.major_f64())
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        struct MoneyVisitor;
        impl serde::de::Visitor<'_> for MoneyVisitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount with at most 2 decimals, e.g. 12.50")
            }
            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Money, E> {
                // Shortest round-trip text, as serde_json prints it: `12.5` reads as 1250.
                parse_decimal_minor(&value.to_string())
                    .map(Money)
                    .map_err(|error| E::custom(format!("amount {value} {error}")))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Money, E> {
                value
                    .checked_mul(MINOR_PER_MAJOR)
                    .map(Money)
                    .ok_or_else(|| E::custom(format!("amount {value} {}", AmountError::TooLarge)))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Money, E> {
                let value = i64::try_from(value)
                    .map_err(|_| E::custom(format!("amount {value} {}", AmountError::TooLarge)))?;
                self.visit_i64(value)
            }
        }
        deserializer.deserialize_f64(MoneyVisitor)
    }
}

impl schemars::JsonSchema for Money {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Money".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "description": "An amount in the currency's major unit with at most 2 decimals (12.5 is 12.50)."
        })
    }
}

/// Minor units as a JSON decimal number (`1250` -> `12.5`): [`Money::to_json`].
pub fn to_decimal(minor: i64) -> Value {
    Money(minor).to_json()
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

    #[test]
    fn money_displays_with_its_sign_and_two_decimals() {
        let cases = [
            (-1, "-0.01", "-0.01"),
            (-99, "-0.99", "-0.99"),
            (-100, "-1.00", "-1"),
            (0, "0.00", "0"),
            (12345, "123.45", "123.45"),
            (40000, "400.00", "400"),
        ];
        for (minor, text, compact) in cases {
            assert_eq!(Money(minor).to_string(), text, "{minor}");
            assert_eq!(format!("{:#}", Money(minor)), compact, "{minor}");
        }
    }

    #[test]
    fn money_is_a_json_number_both_ways() {
        for minor in [-1, -99, -100, 0, 12345, 1200] {
            let json = serde_json::to_value(Money(minor)).unwrap();
            assert_eq!(json, to_decimal(minor), "{minor}");
            assert_eq!(serde_json::from_value::<Money>(json).unwrap(), Money(minor));
        }
        assert_eq!(serde_json::to_string(&Money(1250)).unwrap(), "12.5");
        assert_eq!(serde_json::from_str::<Money>("12").unwrap(), Money(1200));
        assert!(serde_json::from_str::<Money>("1.234").is_err());
        let bytes = crate::codec::encode(&Money(-99));
        assert_eq!(crate::codec::decode::<Money>(&bytes).unwrap(), Money(-99));
    }
}
