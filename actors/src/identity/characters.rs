//! The Unicode character classes identifier normalisation needs: invisible format characters
//! (general category Cf: zero-width space and joiners, bidi marks, the BOM, tag characters,
//! ...), refused in every identifier, and the decimal digits of every script (category Nd),
//! read as ASCII digits in phone numbers.

use unicode_general_category::{get_general_category, GeneralCategory};

/// Whether `c` is an invisible format character: Unicode general category Cf, and the
/// whole tag block U+E0000..U+E007F (whose unassigned code points are no more visible).
pub(super) fn is_invisible(c: char) -> bool {
    matches!(c, '\u{E0000}'..='\u{E007F}') || get_general_category(c) == GeneralCategory::Format
}

/// `text` with every invisible character written as `<U+XXXX>`, so that an error quoting a
/// value shows where the character is (and a bidi override cannot reorder the message).
pub(super) fn visible(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if is_invisible(c) {
            shown.push_str(&format!("<U+{:04X}>", c as u32));
        } else {
            shown.push(c);
        }
    }
    shown
}

/// What an error calls an invisible character: `U+200B (zero width space)`.
pub(super) fn describe(c: char) -> String {
    let code = c as u32;
    let name = match code {
        0xE0000..=0xE007F => Some("tag character"),
        _ => NAMES
            .iter()
            .find(|(point, _)| *point == code)
            .map(|(_, name)| *name),
    };
    match name {
        Some(name) => format!("U+{code:04X} ({name})"),
        None => format!("U+{code:04X} (a format character)"),
    }
}

/// Names of the invisible characters most often pasted into identifiers by accident.
const NAMES: &[(u32, &str)] = &[
    (0x00AD, "soft hyphen"),
    (0x061C, "arabic letter mark"),
    (0x180E, "mongolian vowel separator"),
    (0x200B, "zero width space"),
    (0x200C, "zero width non-joiner"),
    (0x200D, "zero width joiner"),
    (0x200E, "left-to-right mark"),
    (0x200F, "right-to-left mark"),
    (0x202A, "left-to-right embedding"),
    (0x202B, "right-to-left embedding"),
    (0x202C, "pop directional formatting"),
    (0x202D, "left-to-right override"),
    (0x202E, "right-to-left override"),
    (0x2060, "word joiner"),
    (0x2061, "function application"),
    (0x2062, "invisible times"),
    (0x2063, "invisible separator"),
    (0x2064, "invisible plus"),
    (0x2066, "left-to-right isolate"),
    (0x2067, "right-to-left isolate"),
    (0x2068, "first strong isolate"),
    (0x2069, "pop directional isolate"),
    (0xFEFF, "zero width no-break space, the byte order mark"),
];

/// The zero of every run of decimal digits (general category Nd) in Unicode 16, ascending.
/// Unicode encodes each script's digits 0 to 9 at ten consecutive code points, so a
/// digit's value is its distance from the zero before it (checked by the tests against the
/// category table).
const DIGIT_ZEROS: [u32; 76] = [
    0x0030, 0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6,
    0x0D66, 0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80,
    0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0,
    0xFF10, 0x104A0, 0x10D30, 0x10D40, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450,
    0x114D0, 0x11650, 0x116C0, 0x116D0, 0x116DA, 0x11730, 0x118E0, 0x11950, 0x11BF0, 0x11C50,
    0x11D50, 0x11DA0, 0x11F50, 0x16130, 0x16A60, 0x16AC0, 0x16B50, 0x16D70, 0x1CCF0, 0x1D7CE,
    0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E4F0, 0x1E5F1, 0x1E950, 0x1FBF0,
];

/// The ASCII digit a decimal digit of any script stands for (`٣`, `۳`, `३`, `３` -> `3`);
/// `None` for anything else.
pub(super) fn ascii_digit(c: char) -> Option<char> {
    let code = c as u32;
    let after = DIGIT_ZEROS.partition_point(|&zero| zero <= code);
    let zero = DIGIT_ZEROS[after.checked_sub(1)?];
    char::from_digit(code - zero, 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_decimal_digit(c: char) -> bool {
        get_general_category(c) == GeneralCategory::DecimalNumber
    }

    #[test]
    fn the_digit_table_holds_every_decimal_digit_and_nothing_else() {
        assert!(
            DIGIT_ZEROS.windows(2).all(|w| w[1] - w[0] >= 10),
            "ascending, no overlap"
        );
        for zero in DIGIT_ZEROS {
            for value in 0..10 {
                let c = char::from_u32(zero + value).expect("a char");
                assert!(is_decimal_digit(c) && c.is_numeric(), "U+{:04X}", c as u32);
                assert_eq!(
                    ascii_digit(c),
                    char::from_digit(value, 10),
                    "U+{:04X}",
                    c as u32
                );
            }
        }
        for c in (0..=char::MAX as u32).filter_map(char::from_u32) {
            assert_eq!(
                ascii_digit(c).is_some(),
                is_decimal_digit(c),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn every_named_character_is_invisible() {
        for (code, name) in NAMES {
            let c = char::from_u32(*code).expect("a char");
            assert!(is_invisible(c), "U+{code:04X} {name}");
        }
        assert!(!is_invisible('a') && !is_invisible(' ') && !is_invisible('\u{e9}'));
        assert_eq!(visible("a\u{200B}b"), "a<U+200B>b");
        assert_eq!(describe('\u{E0041}'), "U+E0041 (tag character)");
        assert_eq!(describe('\u{0600}'), "U+0600 (a format character)");
    }
}
