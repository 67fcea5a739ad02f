//! Customer identifiers: the kinds a channel can send, their normalisation and priority.
//!
//! An event names its customer through one or more identifiers (loyalty card, the company's
//! own customer id, email, phone, device id). Values are normalised here (lower-cased email,
//! E.164 phone) so that the same person sent by two channels resolves to the same key. When
//! identifiers in one event point at different customers, the one with the highest
//! [`IdentityKind::priority`] wins. The node's identity directory hashes these normalised
//! values; this module never sees NATS.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest identifier value accepted, in bytes.
pub const IDENTITY_VALUE_MAX_BYTES: usize = 256;

/// The kinds of identifier, declared from highest to lowest priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    LoyaltyCard,
    CustomerId,
    Email,
    Phone,
    DeviceId,
}

impl IdentityKind {
    /// Every kind, highest priority first.
    pub const ALL: [IdentityKind; 5] = [
        IdentityKind::LoyaltyCard,
        IdentityKind::CustomerId,
        IdentityKind::Email,
        IdentityKind::Phone,
        IdentityKind::DeviceId,
    ];

    /// The JSON field name of this kind (`loyalty_card`, `email`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::LoyaltyCard => "loyalty_card",
            IdentityKind::CustomerId => "customer_id",
            IdentityKind::Email => "email",
            IdentityKind::Phone => "phone",
            IdentityKind::DeviceId => "device_id",
        }
    }

    /// Reads a JSON field name; `None` for anything else.
    pub fn parse(name: &str) -> Option<IdentityKind> {
        IdentityKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// 0 is the highest priority (loyalty card).
    pub fn priority(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One normalised identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdentityKind,
    pub value: String,
}

/// Why an identifier value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity.{kind} '{value}' {problem}")]
pub struct IdentityError {
    pub kind: IdentityKind,
    pub value: String,
    pub problem: &'static str,
}

impl Identity {
    /// Normalises a raw value of the given kind.
    ///
    /// Email: trimmed, lower-cased, must hold one `@` with text on both sides. Phone: spaces,
    /// dashes, dots and parentheses dropped, a leading `00` read as `+`; must then be E.164
    /// (`+` and 8 to 15 digits). Other kinds: trimmed, non-empty, printable.
    pub fn normalise(kind: IdentityKind, raw: &str) -> Result<Identity, IdentityError> {
        let error = |problem| IdentityError {
            kind,
            value: raw.chars().take(64).collect(),
            problem,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(error("is empty; send a value or leave the field out"));
        }
        if trimmed.len() > IDENTITY_VALUE_MAX_BYTES {
            return Err(error("is longer than 256 bytes"));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(error("contains control characters"));
        }
        let value = match kind {
            IdentityKind::Email => {
                // `a@b.co.` (a fully qualified domain) is the same mailbox as `a@b.co`.
                let lower = trimmed.to_lowercase().trim_end_matches('.').to_string();
                match lower.split_once('@') {
                    Some((local, domain))
                        if !local.is_empty()
                            && !domain.is_empty()
                            && !domain.contains('@')
                            && !lower.contains(char::is_whitespace) =>
                    {
                        lower
                    }
                    _ => return Err(error("is not an email address (send name@domain)")),
                }
            }
            IdentityKind::Phone => {
                // `+49 (0)151 ...`: the "(0)" is the national trunk prefix, written beside
                // the country code but never dialled with it.
                let compact: String = trimmed
                    .replace("(0)", "")
                    .chars()
                    .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
                    .collect();
                let digits = if let Some(rest) = compact.strip_prefix('+') {
                    rest
                } else if let Some(rest) = compact.strip_prefix("00") {
                    rest
                } else {
                    return Err(error(
                        "is not an E.164 phone number (send +<country code><number>, e.g. +4915112345678)",
                    ));
                };
                if !(8..=15).contains(&digits.len())
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || digits.starts_with('0')
                {
                    return Err(error(
                        "is not an E.164 phone number (send +<country code><number>, e.g. +4915112345678)",
                    ));
                }
                format!("+{digits}")
            }
            IdentityKind::LoyaltyCard | IdentityKind::CustomerId | IdentityKind::DeviceId => {
                trimmed.to_string()
            }
        };
        Ok(Identity { kind, value })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.kind, self.value)
    }
}

/// Sorts identifiers highest priority first (and by value, for a stable order).
pub fn by_priority(identities: &mut [Identity]) {
    identities.sort();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's identity keys are HMACs of these values: an ASCII identifier must
    /// normalise exactly as it always has, or its customer stops resolving.
    #[test]
    fn ascii_identifiers_normalise_as_they_always_have() {
        let pinned = [
            (
                IdentityKind::Email,
                " Ann.Lee@Example.COM ",
                "ann.lee@example.com",
            ),
            (IdentityKind::Email, "a@b.co.", "a@b.co"),
            (
                IdentityKind::Email,
                "O'Brien+crm@Mail.Example.ORG",
                "o'brien+crm@mail.example.org",
            ),
            (
                IdentityKind::Email,
                "customer000042@example.com",
                "customer000042@example.com",
            ),
            (IdentityKind::Phone, "+49 151 12345678", "+4915112345678"),
            (
                IdentityKind::Phone,
                "0049 (0)151 1234-5678",
                "+4915112345678",
            ),
            (IdentityKind::Phone, "+1 (555) 010.0199", "+15550100199"),
            (IdentityKind::Phone, "+33 6 12 34 56 78", "+33612345678"),
            (IdentityKind::LoyaltyCard, " LC-42 ", "LC-42"),
            (IdentityKind::CustomerId, "CRM/00017", "CRM/00017"),
            (IdentityKind::DeviceId, "dev-9 Ab", "dev-9 Ab"),
        ];
        for (kind, raw, value) in pinned {
            let id = Identity::normalise(kind, raw).unwrap();
            assert_eq!(id.value, value, "{kind} {raw:?}");
        }
    }

    #[test]
    fn email_is_lower_cased_and_trimmed() {
        let id = Identity::normalise(IdentityKind::Email, "  Ann.Lee@Example.COM ").unwrap();
        assert_eq!(id.value, "ann.lee@example.com");
    }

    #[test]
    fn a_trunk_zero_and_a_final_dot_do_not_make_a_second_key() {
        let plain = Identity::normalise(IdentityKind::Phone, "+49 151 12345678").unwrap();
        let trunk = Identity::normalise(IdentityKind::Phone, "+49 (0)151 12345678").unwrap();
        assert_eq!(plain, trunk);
        let uk = Identity::normalise(IdentityKind::Phone, "+44 (0)20 7946 0958").unwrap();
        assert_eq!(uk.value, "+442079460958");
        let email = Identity::normalise(IdentityKind::Email, "a@b.co.").unwrap();
        assert_eq!(email.value, "a@b.co");
        assert!(Identity::normalise(IdentityKind::Email, "a@.").is_err());
    }

    #[test]
    fn phone_is_normalised_to_e164() {
        let id = Identity::normalise(IdentityKind::Phone, "+49 (151) 123-45678").unwrap();
        assert_eq!(id.value, "+4915112345678");
        let id = Identity::normalise(IdentityKind::Phone, "0049 151 12345678").unwrap();
        assert_eq!(id.value, "+4915112345678");
    }

    #[test]
    fn a_local_phone_number_is_refused_with_the_fix() {
        let error = Identity::normalise(IdentityKind::Phone, "0151 1234567").unwrap_err();
        assert!(error.to_string().contains("E.164"), "{error}");
    }

    #[test]
    fn loyalty_card_outranks_every_other_kind() {
        let mut ids = vec![
            Identity::normalise(IdentityKind::DeviceId, "d1").unwrap(),
            Identity::normalise(IdentityKind::Email, "a@b.c").unwrap(),
            Identity::normalise(IdentityKind::LoyaltyCard, "L1").unwrap(),
        ];
        by_priority(&mut ids);
        assert_eq!(ids[0].kind, IdentityKind::LoyaltyCard);
        assert_eq!(ids[2].kind, IdentityKind::DeviceId);
    }
}
