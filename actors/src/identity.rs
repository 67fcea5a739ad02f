//! Customer identifiers: the kinds a channel can send, their normalisation and priority.
//!
//! An event names its customer through one or more identifiers (loyalty card, the company's
//! own customer id, email, phone, device id). Values are normalised here as a person means
//! them (NFC and lower-cased email, E.164 phone read from the digits of any script; no
//! invisible characters) so that the same person sent by two channels resolves to the same
//! key. When
//! identifiers in one event point at different customers, the one with the highest
//! [`IdentityKind::priority`] wins. The node's identity directory hashes these normalised
//! values; this module never sees NATS.

use serde::{Deserialize, Serialize};
use std::fmt;
use unicode_normalization::{is_nfc, UnicodeNormalization};

pub mod blocked;
mod characters;

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
    pub problem: String,
}

impl Identity {
    /// Normalises a raw value of the given kind.
    ///
    /// Every kind: trimmed, non-empty, at most 256 bytes, no control character and no
    /// invisible format character (Unicode category Cf: zero-width space and joiners, bidi
    /// marks, the BOM, soft hyphen, tag characters, ...), which would make a look-alike
    /// second customer. Email: Unicode NFC (one code point for `é`, as Windows types it,
    /// rather than `e` and a combining accent, as macOS does), lower-cased, a final `.` of
    /// the domain dropped; must hold one `@` with text on both sides. Phone: the digits of
    /// any script (`٠`-`٩`, `۰`-`۹`, `०`-`९`, `０`-`９`, ...) read as ASCII digits and
    /// fullwidth `＋ （ ） － ．` and the ideographic space as their ASCII forms; spaces,
    /// dashes, dots, parentheses and a `(0)` trunk prefix dropped, a leading `00` read as
    /// `+`; must then be E.164 (`+` and 8 to 15 digits). Other kinds: nothing more. An
    /// ASCII value normalises exactly as before these Unicode rules (stored keys stay).
    pub fn normalise(kind: IdentityKind, raw: &str) -> Result<Identity, IdentityError> {
        let error = |problem: &str| IdentityError {
            kind,
            value: characters::visible(&raw.chars().take(64).collect::<String>()),
            problem: problem.to_string(),
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
        if let Some(invisible) = trimmed.chars().find(|&c| characters::is_invisible(c)) {
            return Err(error(&format!(
                "holds an invisible character, {}; send the value without it",
                characters::describe(invisible)
            )));
        }
        let value = match kind {
            IdentityKind::Email => {
                let lower = fold_email(trimmed);
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
                let compact = compact_phone(trimmed);
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

impl Identity {
    /// The form this identifier was stored under before emails were NFC-normalised, when
    /// it differs: an email typed decomposed (`e` + U+0301, as macOS keyboards send) was
    /// lower-cased as typed, so its directory key was made from the decomposed (NFD) text.
    /// `None` for every other kind and for emails whose NFD form is the same (all ASCII
    /// ones). The identity directory looks this form up when the current one is unknown,
    /// so customers stored before keep resolving.
    pub fn legacy_form(&self) -> Option<Identity> {
        if self.kind != IdentityKind::Email || self.value.is_ascii() {
            return None;
        }
        let decomposed: String = self.value.nfd().collect();
        (decomposed != self.value).then_some(Identity {
            kind: IdentityKind::Email,
            value: decomposed,
        })
    }
}

/// `text` in Unicode Normalization Form C.
fn nfc(text: &str) -> String {
    if is_nfc(text) {
        text.to_string()
    } else {
        text.nfc().collect()
    }
}

/// A phone number's character as the ASCII the caller meant: a digit of any script as its
/// ASCII digit, fullwidth `＋ （ ） － ．` and the ideographic space as `+ ( ) - .` and space.
fn phone_ascii(c: char) -> char {
    match c {
        '\u{FF0B}' => '+',
        '\u{FF08}' => '(',
        '\u{FF09}' => ')',
        '\u{FF0D}' => '-',
        '\u{FF0E}' => '.',
        '\u{3000}' => ' ',
        _ => characters::ascii_digit(c).unwrap_or(c),
    }
}

/// An email as one mailbox: NFC before lower-casing and again after it (lower-casing a
/// composed letter can leave a sequence NFC would compose), so that folding a folded value
/// changes nothing (ASCII is NFC: the fast path); a final dot dropped (`a@b.co.`, a fully
/// qualified domain, is the mailbox `a@b.co`). Shared by ingest and the blocked patterns.
pub(crate) fn fold_email(trimmed: &str) -> String {
    nfc(&nfc(trimmed).to_lowercase())
        .trim_end_matches('.')
        .to_string()
}

/// A phone as its digits: every digit form read as ASCII, `(0)` dropped (the national trunk
/// prefix, written beside the country code but never dialled with it), and spaces, dashes,
/// dots and brackets removed. Shared by ingest and the blocked patterns.
pub(crate) fn compact_phone(trimmed: &str) -> String {
    let ascii: String = trimmed.chars().map(phone_ascii).collect();
    ascii
        .replace("(0)", "")
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect()
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
    fn an_email_typed_decomposed_or_composed_is_one_mailbox() {
        // "Amélie" as macOS types it (e + U+0301 combining acute) and as Windows does (é).
        let decomposed =
            Identity::normalise(IdentityKind::Email, "Ame\u{301}lie@Exe\u{301}mple.fr").unwrap();
        let composed =
            Identity::normalise(IdentityKind::Email, "am\u{e9}lie@ex\u{e9}mple.fr").unwrap();
        assert_eq!(decomposed, composed);
        assert_eq!(composed.value, "am\u{e9}lie@ex\u{e9}mple.fr");
        // An upper-case decomposed letter: É = E + U+0301.
        let upper = Identity::normalise(IdentityKind::Email, "E\u{301}MILE@EXAMPLE.FR").unwrap();
        assert_eq!(upper.value, "\u{e9}mile@example.fr");
    }

    #[test]
    fn normalising_a_normalised_value_changes_nothing() {
        let samples = [
            (IdentityKind::Email, "Ame\u{301}lie@Example.fr"),
            (IdentityKind::Email, "\u{130}STANBUL@\u{1E9E}.de"),
            (IdentityKind::Email, "A\u{30A}NGSTR\u{D6}M@\u{212B}.se"),
            (IdentityKind::Email, "\u{3A3}\u{391}\u{3A3}@\u{3A3}.gr"),
            (IdentityKind::Phone, "\u{FF0B}\u{FF14}\u{FF19} \u{FF11}\u{FF15}\u{FF11} \u{FF11}\u{FF12}\u{FF13}\u{FF14}\u{FF15}\u{FF16}\u{FF17}\u{FF18}"),
            (IdentityKind::Phone, "+\u{669}\u{666}\u{666} \u{665}\u{660} \u{661}\u{662}\u{663} \u{664}\u{665}\u{666}\u{667}"),
        ];
        for (kind, raw) in samples {
            let once = Identity::normalise(kind, raw).unwrap();
            let twice = Identity::normalise(kind, &once.value).unwrap();
            assert_eq!(once, twice, "{raw:?}");
        }
    }

    #[test]
    fn phone_digits_of_any_script_are_read_as_ascii_digits() {
        let ascii = "+966501234567";
        for raw in [
            // Arabic-Indic and Extended Arabic-Indic (Persian, Urdu) digits.
            "+\u{669}\u{666}\u{666} \u{665}\u{660} \u{661}\u{662}\u{663} \u{664}\u{665}\u{666}\u{667}",
            "+\u{6F9}\u{6F6}\u{6F6} \u{6F5}\u{6F0} \u{6F1}\u{6F2}\u{6F3} \u{6F4}\u{6F5}\u{6F6}\u{6F7}",
            // Devanagari and Bengali.
            "+\u{96F}\u{96C}\u{96C}\u{96B}\u{966}\u{967}\u{968}\u{969}\u{96A}\u{96B}\u{96C}\u{96D}",
            "+\u{9EF}\u{9EC}\u{9EC}\u{9EB}\u{9E6}\u{9E7}\u{9E8}\u{9E9}\u{9EA}\u{9EB}\u{9EC}\u{9ED}",
            // Fullwidth digits, plus, dashes, parentheses and the ideographic space.
            "\u{FF0B}\u{FF19}\u{FF16}\u{FF16}\u{3000}\u{FF08}\u{FF15}\u{FF10}\u{FF09}\u{FF0D}\u{FF11}\u{FF12}\u{FF13}\u{FF0E}\u{FF14}\u{FF15}\u{FF16}\u{FF17}",
            // Thai, with a leading 00, and ASCII mixed in.
            "\u{E50}\u{E50}966 50 \u{E51}\u{E52}\u{E53} 4567",
        ] {
            let id = Identity::normalise(IdentityKind::Phone, raw).unwrap();
            assert_eq!(id.value, ascii, "{raw:?}");
        }
        // Still E.164: eleven Arabic-Indic digits without a country code are refused.
        let local = "\u{660}\u{661}\u{665}\u{661}\u{661}\u{662}\u{663}\u{664}\u{665}\u{666}\u{667}";
        assert!(Identity::normalise(IdentityKind::Phone, local).is_err());
    }

    #[test]
    fn an_invisible_character_is_refused_in_every_kind_with_its_name_and_the_fix() {
        let invisible = [
            ('\u{200B}', "zero width space"),
            ('\u{200C}', "zero width non-joiner"),
            ('\u{200D}', "zero width joiner"),
            ('\u{200E}', "left-to-right mark"),
            ('\u{200F}', "right-to-left mark"),
            ('\u{202A}', "left-to-right embedding"),
            ('\u{202B}', "right-to-left embedding"),
            ('\u{202C}', "pop directional formatting"),
            ('\u{202D}', "left-to-right override"),
            ('\u{202E}', "right-to-left override"),
            ('\u{2060}', "word joiner"),
            ('\u{2061}', "function application"),
            ('\u{2062}', "invisible times"),
            ('\u{2063}', "invisible separator"),
            ('\u{2064}', "invisible plus"),
            ('\u{2066}', "left-to-right isolate"),
            ('\u{2067}', "right-to-left isolate"),
            ('\u{2068}', "first strong isolate"),
            ('\u{2069}', "pop directional isolate"),
            ('\u{061C}', "arabic letter mark"),
            ('\u{FEFF}', "byte order mark"),
            ('\u{00AD}', "soft hyphen"),
            ('\u{180E}', "mongolian vowel separator"),
            ('\u{E0000}', "tag character"),
            ('\u{E0001}', "tag character"),
            ('\u{E0041}', "tag character"),
            ('\u{E007F}', "tag character"),
            ('\u{0600}', "format character"),
        ];
        let valid = [
            (IdentityKind::LoyaltyCard, "LC-42"),
            (IdentityKind::CustomerId, "c-17"),
            (IdentityKind::Email, "ann@example.com"),
            (IdentityKind::Phone, "+4915112345678"),
            (IdentityKind::DeviceId, "dev-9"),
        ];
        for (c, name) in invisible {
            let code = format!("U+{:04X}", c as u32);
            for (kind, value) in valid {
                // In the middle, at the start and at the end (trimming keeps it: it is not
                // white space).
                for raw in [
                    format!("{}{c}{}", &value[..2], &value[2..]),
                    format!("{c}{value}"),
                    format!("{value}{c} "),
                ] {
                    let error = Identity::normalise(kind, &raw).unwrap_err();
                    let message = error.to_string();
                    for part in [
                        format!("identity.{kind} "),
                        "invisible character".to_string(),
                        code.clone(),
                        name.to_string(),
                        "send the value without it".to_string(),
                    ] {
                        assert!(
                            message.contains(&part),
                            "{code}: {message:?} lacks {part:?}"
                        );
                    }
                    // The quoted value shows where the character is, not the character.
                    assert!(!message.contains(c), "{message:?}");
                    assert!(message.contains(&format!("<{code}>")), "{message:?}");
                }
            }
        }
        // A look-alike made of other (visible) letters is not this check's business.
        assert!(Identity::normalise(IdentityKind::Email, "ann@ex\u{e4}mple.com").is_ok());
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

    #[test]
    fn an_email_with_accents_has_its_decomposed_legacy_form_and_ascii_ones_none() {
        let composed = Identity::normalise(IdentityKind::Email, "Ren\u{e9}@example.com").unwrap();
        let typed_decomposed =
            Identity::normalise(IdentityKind::Email, "Rene\u{301}@example.com").unwrap();
        assert_eq!(composed, typed_decomposed, "one mailbox");
        let legacy = composed.legacy_form().expect("a decomposed form");
        assert_eq!(legacy.value, "rene\u{301}@example.com");
        assert_eq!(
            legacy.legacy_form(),
            None,
            "already decomposed: nothing older"
        );
        let ascii = Identity::normalise(IdentityKind::Email, "ann@example.com").unwrap();
        assert_eq!(ascii.legacy_form(), None);
        let card = Identity::normalise(IdentityKind::LoyaltyCard, "K\u{e4}se-1").unwrap();
        assert_eq!(card.legacy_form(), None);
    }
}
