//! Blocked identifier values: the addresses, numbers and cards the rules file says never
//! name one customer (`test@test.com`, `noreply@*`, `+10000000000`, a store's generic card).
//!
//! A [`Pattern`] is a value of one [`IdentityKind`] in which `*` stands for any run of
//! characters (none included), anywhere in it. Patterns are normalised like the values they
//! are matched against ([`Identity::normalise`]): an email pattern is NFC and lower-cased, a
//! phone pattern loses its spaces, dashes, dots, parentheses and `(0)` and reads a leading
//! `00` as `+`, so `+1 000 000 0000` blocks `+10000000000`. Matching is on the normalised
//! value. [`BlockedIdentities`] holds the patterns of every kind; the rules file fills it
//! (`[identity.<kind>] blocked`) and ingest and queries consult it. Pure: no I/O.

use super::{
    characters, compact_phone, fold_email, Identity, IdentityKind, IDENTITY_VALUE_MAX_BYTES,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// One blocked value or `*` pattern of one kind, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The normalised pattern, runs of `*` collapsed to one.
    text: String,
}

impl Pattern {
    /// Reads and normalises a pattern of `kind`; the error is the problem and its fix.
    ///
    /// Refused: an empty pattern, one made only of `*` (it would block every value), one
    /// longer than an identifier may be, one holding a control or invisible character, an
    /// exact value that is not a valid identifier of its kind (`+1 555` as a phone), and a
    /// phone pattern holding anything but digits, `+` and `*` once normalised.
    pub fn parse(kind: IdentityKind, raw: &str) -> Result<Pattern, String> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(
                "is empty; write a value or a pattern such as \"noreply@*\", or remove it"
                    .to_string(),
            );
        }
        if trimmed.chars().all(|c| c == '*') {
            return Err(format!(
                "('{trimmed}') would block every {kind}; block values or patterns with text, e.g. \"noreply@*\""
            ));
        }
        if trimmed.len() > IDENTITY_VALUE_MAX_BYTES {
            return Err(format!(
                "is longer than {IDENTITY_VALUE_MAX_BYTES} bytes, the longest identifier; shorten it"
            ));
        }
        if let Some(c) = trimmed
            .chars()
            .find(|&c| c.is_control() || characters::is_invisible(c))
        {
            let what = if c.is_control() {
                format!("U+{:04X} (a control character)", c as u32)
            } else {
                characters::describe(c)
            };
            return Err(format!(
                "holds a control or invisible character, {what}, which no accepted identifier holds; remove it"
            ));
        }
        if !trimmed.contains('*') {
            // An exact value: normalised exactly as ingest normalises the identifier.
            let identity = Identity::normalise(kind, trimmed)
                .map_err(|error| format!("('{}') {}", error.value, error.problem))?;
            return Ok(Pattern {
                text: identity.value,
            });
        }
        let text = match kind {
            IdentityKind::Email => fold_email(trimmed),
            IdentityKind::Phone => {
                let compact = compact_phone(trimmed);
                let compact = match compact.strip_prefix("00") {
                    Some(rest) => format!("+{rest}"),
                    None => compact,
                };
                // Normalised phones are `+` and digits: a pattern that does not start with `+`
                // or `*` (a national number, `555*`) or has a `+` further on matches nothing.
                if !compact
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '+' || c == '*')
                    || !(compact.starts_with('+') || compact.starts_with('*'))
                    || compact.chars().skip(1).any(|c| c == '+')
                {
                    return Err(format!(
                        "('{trimmed}') is not a phone pattern; write + and the country code, digits and *, e.g. \"+1555*\""
                    ));
                }
                compact
            }
            IdentityKind::LoyaltyCard | IdentityKind::CustomerId | IdentityKind::DeviceId => {
                trimmed.to_string()
            }
        };
        let mut collapsed = String::with_capacity(text.len());
        for c in text.chars() {
            if !(c == '*' && collapsed.ends_with('*')) {
                collapsed.push(c);
            }
        }
        // Judged once normalised: `*.` (an email's final dot dropped), `(*)`, `00*` or `+*`
        // (every phone starts with `+`) and `*@*` block every value of their kind too.
        let fixed: String = collapsed.chars().filter(|&c| c != '*').collect();
        let every_value = fixed.is_empty()
            || (kind == IdentityKind::Email && fixed == "@")
            || (kind == IdentityKind::Phone && fixed == "+");
        if every_value {
            return Err(format!(
                "('{trimmed}') would block every {kind} once normalised (as '{collapsed}'); block values or patterns with text, e.g. \"noreply@*\""
            ));
        }
        Ok(Pattern { text: collapsed })
    }

    /// The normalised pattern, as it is matched.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern holds a `*`.
    pub fn is_wildcard(&self) -> bool {
        self.text.contains('*')
    }

    /// Does this pattern match the normalised `value`? `*` matches any run of characters.
    pub fn matches(&self, value: &str) -> bool {
        let mut parts = self.text.split('*');
        let first = parts.next().unwrap_or("");
        let Some(last) = parts.next_back() else {
            return value == self.text;
        };
        if value.len() < first.len() + last.len()
            || !value.starts_with(first)
            || !value.ends_with(last)
        {
            return false;
        }
        // Between the fixed start and end, each middle part in order, leftmost first.
        let mut rest = &value[first.len()..value.len() - last.len()];
        for part in parts {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// The blocked patterns of every kind, indexed so that a check costs a few look-ups however
/// many patterns there are (the router checks every identifier of every event): exact
/// values, `prefix*` and `*suffix` patterns are looked up (one look-up per distinct prefix
/// or suffix length), and only patterns with a `*` inside (`a*b`, `*x*`) are scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockedIdentities {
    kinds: BTreeMap<IdentityKind, KindPatterns>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KindPatterns {
    exact: BTreeSet<String>,
    /// `prefix*` patterns by prefix length (bytes): prefix -> pattern text.
    prefixes: BTreeMap<usize, HashMap<String, String>>,
    /// `*suffix` patterns by suffix length (bytes): suffix -> pattern text.
    suffixes: BTreeMap<usize, HashMap<String, String>>,
    /// Every other `*` pattern, scanned; with `scanned_texts` for duplicates.
    scanned: Vec<Pattern>,
    scanned_texts: HashSet<String>,
}

impl KindPatterns {
    fn insert(&mut self, pattern: Pattern) -> bool {
        let text = pattern.text.clone();
        let stars = text.matches('*').count();
        if stars == 0 {
            self.exact.insert(text)
        } else if stars == 1 && text.ends_with('*') {
            let prefix = text[..text.len() - 1].to_string();
            let by_length = self.prefixes.entry(prefix.len()).or_default();
            by_length.insert(prefix, text).is_none()
        } else if stars == 1 && text.starts_with('*') {
            let suffix = text[1..].to_string();
            let by_length = self.suffixes.entry(suffix.len()).or_default();
            by_length.insert(suffix, text).is_none()
        } else if self.scanned_texts.insert(text) {
            self.scanned.push(pattern);
            true
        } else {
            false
        }
    }

    fn count(&self) -> usize {
        let looked_up = |by_length: &BTreeMap<usize, HashMap<String, String>>| {
            by_length.values().map(HashMap::len).sum::<usize>()
        };
        self.exact.len()
            + looked_up(&self.prefixes)
            + looked_up(&self.suffixes)
            + self.scanned.len()
    }

    fn matching(&self, value: &str) -> Option<&str> {
        if let Some(exact) = self.exact.get(value) {
            return Some(exact);
        }
        for (&length, patterns) in &self.prefixes {
            if let Some(prefix) = value.get(..length) {
                if let Some(text) = patterns.get(prefix) {
                    return Some(text);
                }
            }
        }
        for (&length, patterns) in &self.suffixes {
            let start = value.len().checked_sub(length);
            if let Some(suffix) = start.and_then(|start| value.get(start..)) {
                if let Some(text) = patterns.get(suffix) {
                    return Some(text);
                }
            }
        }
        self.scanned
            .iter()
            .find(|p| p.matches(value))
            .map(Pattern::as_str)
    }
}

impl BlockedIdentities {
    /// Adds a pattern of `kind`; false when that kind already holds it.
    pub fn insert(&mut self, kind: IdentityKind, pattern: Pattern) -> bool {
        self.kinds.entry(kind).or_default().insert(pattern)
    }

    /// How many patterns `kind` holds.
    pub fn count(&self, kind: IdentityKind) -> usize {
        self.kinds.get(&kind).map_or(0, KindPatterns::count)
    }

    /// No pattern of any kind.
    pub fn is_empty(&self) -> bool {
        self.kinds.values().all(|p| p.count() == 0)
    }

    /// The pattern that blocks `identity` (its normalised value), if any.
    pub fn matching(&self, identity: &Identity) -> Option<&str> {
        self.kinds.get(&identity.kind)?.matching(&identity.value)
    }

    /// Is `identity` blocked: never linked to a customer?
    pub fn is_blocked(&self, identity: &Identity) -> bool {
        self.matching(identity).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(kind: IdentityKind, patterns: &[&str]) -> BlockedIdentities {
        let mut blocked = BlockedIdentities::default();
        for raw in patterns {
            blocked.insert(kind, Pattern::parse(kind, raw).unwrap());
        }
        blocked
    }

    fn id(kind: IdentityKind, raw: &str) -> Identity {
        Identity::normalise(kind, raw).unwrap()
    }

    #[test]
    fn an_exact_value_blocks_that_value_only() {
        let email = blocked(IdentityKind::Email, &["test@test.com"]);
        assert!(email.is_blocked(&id(IdentityKind::Email, "test@test.com")));
        assert!(!email.is_blocked(&id(IdentityKind::Email, "test@test.co")));
        assert!(!email.is_blocked(&id(IdentityKind::Email, "atest@test.com")));
        // Another kind with the same text is not blocked.
        assert!(!email.is_blocked(&id(IdentityKind::CustomerId, "test@test.com")));
    }

    #[test]
    fn a_star_matches_any_run_at_the_end_the_start_or_the_middle() {
        let email = blocked(
            IdentityKind::Email,
            &["noreply@*", "*@test.com", "bounce-*@*.example.org"],
        );
        for value in [
            "noreply@shop.com",
            "noreply@x",
            "ann@test.com",
            "@x@test.com",
            "bounce-17@mail.example.org",
            "bounce-@.example.org",
        ] {
            let identity = Identity {
                kind: IdentityKind::Email,
                value: value.to_string(),
            };
            assert!(email.is_blocked(&identity), "{value}");
        }
        for value in [
            "noreplyx@shop.com",
            "anoreply@shop.com",
            "ann@test.com.au",
            "ann@nottest.co",
            "bounce-17@example.org",
            "bounce@mail.example.org",
        ] {
            assert!(
                !email.is_blocked(&id(IdentityKind::Email, value)),
                "{value}"
            );
        }
    }

    #[test]
    fn the_matching_pattern_is_named() {
        let email = blocked(IdentityKind::Email, &["test@test.com", "noreply@*"]);
        let identity = id(IdentityKind::Email, "NoReply@Shop.com");
        assert_eq!(email.matching(&identity), Some("noreply@*"));
        let identity = id(IdentityKind::Email, "Test@Test.com");
        assert_eq!(email.matching(&identity), Some("test@test.com"));
    }

    #[test]
    fn email_patterns_are_lower_cased_and_in_nfc_like_emails() {
        let email = blocked(
            IdentityKind::Email,
            &["NoReply@*", "*@EXAMPLE.TEST", "Ame\u{301}lie@*"],
        );
        assert!(email.is_blocked(&id(IdentityKind::Email, "NOREPLY@Shop.com")));
        assert!(email.is_blocked(&id(IdentityKind::Email, "ann@example.test")));
        assert!(email.is_blocked(&id(IdentityKind::Email, "am\u{e9}lie@shop.fr")));
        assert_eq!(
            Pattern::parse(IdentityKind::Email, " NoReply@* ")
                .unwrap()
                .as_str(),
            "noreply@*"
        );
    }

    #[test]
    fn phone_patterns_lose_their_formatting_like_phones() {
        let phone = blocked(
            IdentityKind::Phone,
            &["+1 000 000 0000", "+49 (0)151 0000*", "00 44 20 *"],
        );
        assert!(phone.is_blocked(&id(IdentityKind::Phone, "+10000000000")));
        assert!(phone.is_blocked(&id(IdentityKind::Phone, "+1 (000) 000-0000")));
        assert!(phone.is_blocked(&id(IdentityKind::Phone, "+49 151 0000 1234")));
        assert!(phone.is_blocked(&id(IdentityKind::Phone, "+44 20 7946 0958")));
        assert!(!phone.is_blocked(&id(IdentityKind::Phone, "+10000000001")));
        assert!(!phone.is_blocked(&id(IdentityKind::Phone, "+4915112345678")));
        assert_eq!(
            Pattern::parse(IdentityKind::Phone, "+49 (0)151 0000*")
                .unwrap()
                .as_str(),
            "+491510000*"
        );
    }

    #[test]
    fn other_kinds_match_as_written() {
        let card = blocked(IdentityKind::LoyaltyCard, &["STORE-0000", "GUEST-*"]);
        assert!(card.is_blocked(&id(IdentityKind::LoyaltyCard, " STORE-0000 ")));
        assert!(card.is_blocked(&id(IdentityKind::LoyaltyCard, "GUEST-17")));
        assert!(!card.is_blocked(&id(IdentityKind::LoyaltyCard, "store-0000")));
    }

    #[test]
    fn runs_of_stars_are_one_star() {
        let pattern = Pattern::parse(IdentityKind::DeviceId, "a**b***").unwrap();
        assert_eq!(pattern.as_str(), "a*b*");
        assert!(pattern.matches("ab"));
        assert!(pattern.matches("axxbyy"));
        assert!(!pattern.matches("ba"));
    }

    #[test]
    fn a_star_matches_nothing_too_but_parts_never_overlap() {
        let pattern = Pattern::parse(IdentityKind::DeviceId, "ab*ba").unwrap();
        assert!(pattern.matches("abba"));
        assert!(pattern.matches("ab-ba"));
        assert!(!pattern.matches("aba"));
    }

    #[test]
    fn unusable_patterns_are_refused_with_the_fix() {
        let cases = [
            (IdentityKind::Email, "  ", "is empty"),
            (IdentityKind::Email, "*", "would block every email"),
            (IdentityKind::Phone, "***", "would block every phone"),
            (IdentityKind::Phone, "+1 555", "E.164"),
            (IdentityKind::Phone, "+1555-abc*", "not a phone pattern"),
            // National numbers and a `+` further on match no normalised phone.
            (IdentityKind::Phone, "555*", "+ and the country code"),
            (IdentityKind::Phone, "+1*+2", "not a phone pattern"),
            // Patterns that block every value once normalised.
            (
                IdentityKind::Email,
                "*.",
                "would block every email once normalised",
            ),
            (IdentityKind::Email, "*@*", "would block every email"),
            (IdentityKind::Phone, "(*)", "would block every phone"),
            (IdentityKind::Phone, "00*", "would block every phone"),
            (IdentityKind::Phone, "+*", "would block every phone"),
            (IdentityKind::Email, "nobody", "not an email address"),
            (IdentityKind::Email, "no\u{200B}reply@*", "U+200B"),
            (IdentityKind::DeviceId, "dev\n*", "control or invisible"),
        ];
        for (kind, raw, problem) in cases {
            let error = Pattern::parse(kind, raw).unwrap_err();
            assert!(error.contains(problem), "{kind} {raw:?}: {error}");
        }
        let long = format!("{}*", "a".repeat(IDENTITY_VALUE_MAX_BYTES));
        let error = Pattern::parse(IdentityKind::DeviceId, &long).unwrap_err();
        assert!(error.contains("256 bytes"), "{error}");
    }

    #[test]
    fn prefix_suffix_and_inner_patterns_are_found_among_many() {
        // 3,000 patterns of each shape: each check is a few look-ups, and finds the right one.
        let mut blocked = BlockedIdentities::default();
        let kind = IdentityKind::Email;
        for n in 0..3000 {
            for raw in [
                format!("bounce{n}@*"),
                format!("*@spam{n}.example"),
                format!("*+tag{n}@*"),
            ] {
                assert!(blocked.insert(kind, Pattern::parse(kind, &raw).unwrap()));
            }
        }
        let matched = |value: &str| {
            blocked
                .matching(&Identity {
                    kind,
                    value: value.to_string(),
                })
                .map(str::to_string)
        };
        assert_eq!(matched("bounce17@x.com").as_deref(), Some("bounce17@*"));
        assert_eq!(
            matched("ann@spam2999.example").as_deref(),
            Some("*@spam2999.example")
        );
        assert_eq!(matched("ann+tag5@shop.com").as_deref(), Some("*+tag5@*"));
        assert_eq!(matched("ann@spam3000.example"), None);
        assert_eq!(matched("bounce@x.com"), None);
        assert_eq!(blocked.count(kind), 9000);
    }

    #[test]
    fn a_pattern_listed_twice_is_reported() {
        let mut blocked = BlockedIdentities::default();
        let kind = IdentityKind::Email;
        assert!(blocked.insert(kind, Pattern::parse(kind, "a@b.co").unwrap()));
        assert!(!blocked.insert(kind, Pattern::parse(kind, "A@B.CO").unwrap()));
        assert!(blocked.insert(kind, Pattern::parse(kind, "x@*").unwrap()));
        assert!(!blocked.insert(kind, Pattern::parse(kind, "X@**").unwrap()));
        assert_eq!(blocked.count(kind), 2);
        assert_eq!(blocked.count(IdentityKind::Phone), 0);
        assert!(!blocked.is_empty());
        assert!(BlockedIdentities::default().is_empty());
    }
}
