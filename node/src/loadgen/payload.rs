//! The JSON bodies of generated events and the catalogue they draw from: identity and
//! profile objects, line items, order totals, and the small mixing helpers behind ids.
//! Pure functions of their arguments; the generator owns every random draw.

use super::generator::Body;
use super::*;
use crate::fnv::Fnv1a64;
use crm_actors::identity::IdentityKind;
use crm_actors::ingest::LineItem;
use crm_actors::money::to_decimal;
use serde_json::{json, Map, Value};

/// (category, sku prefix, lowest unit price, highest unit price) in minor units.
pub(super) const CATEGORIES: [(&str, &str, i64, i64); 8] = [
    ("shoes", "SHO", 2_999, 14_999),
    ("apparel", "APP", 999, 8_999),
    ("accessories", "ACC", 599, 4_999),
    ("beauty", "BEA", 599, 3_999),
    ("home", "HOM", 799, 12_999),
    ("electronics", "ELE", 1_999, 29_999),
    ("sports", "SPO", 999, 9_999),
    ("kids", "KID", 599, 3_999),
];
pub(super) const SKUS_PER_CATEGORY: u64 = 250;
pub(super) const STORES: usize = 24;
pub(super) const CAMPAIGNS: [&str; 6] = [
    "weekly-newsletter",
    "new-arrivals",
    "loyalty-double-points",
    "seasonal-sale",
    "we-miss-you",
    "birthday-treat",
];
const FIRST_NAMES: [&str; 20] = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karla",
    "Leon", "Mia", "Noah", "Olga", "Paul", "Rosa", "Simon", "Tara", "Victor",
];
const LAST_NAMES: [&str; 16] = [
    "Schmidt", "Martin", "Rossi", "Garcia", "Novak", "Jansen", "Dubois", "Weber", "Silva", "Berg",
    "Costa", "Fischer", "Moreau", "Kowalski", "Larsen", "Bauer",
];
const CITIES: [&str; 10] = [
    "Berlin",
    "Paris",
    "Madrid",
    "Rome",
    "Amsterdam",
    "Vienna",
    "Lisbon",
    "Prague",
    "Dublin",
    "Copenhagen",
];

pub(super) fn type_name(body: &Body) -> &'static str {
    match body {
        Body::Identify { .. } => "identify",
        Body::View { .. } => "view",
        Body::Cart { .. } => "cart",
        Body::Purchase { .. } => "purchase",
        Body::Return { .. } => "return",
        Body::Support { .. } => "support",
        Body::Email { .. } => "email",
        Body::Visit { .. } => "visit",
        Body::Consent { .. } => "consent",
    }
}

/// (bit, kind, value as the person's channels send it) for each bit of `mask`.
pub(super) fn identity_values(person: usize, mask: u8) -> Vec<(u8, IdentityKind, String)> {
    let mut values = Vec::with_capacity(4);
    if mask & CARD != 0 {
        values.push((CARD, IdentityKind::LoyaltyCard, loyalty_card_of(person)));
    }
    if mask & EMAIL != 0 {
        values.push((EMAIL, IdentityKind::Email, email_of(person)));
    }
    if mask & PHONE != 0 {
        values.push((PHONE, IdentityKind::Phone, phone_of(person)));
    }
    if mask & DEVICE != 0 {
        values.push((DEVICE, IdentityKind::DeviceId, device_id_of(person)));
    }
    values
}

/// The `identity` object. Channels spell identifiers their own way (the mobile app keeps
/// the email's capitals, the call center types phone numbers with spaces); normalisation
/// makes them one key.
pub(super) fn identity_json(person: usize, mask: u8, channel: &str) -> Value {
    let mut object = Map::new();
    for (_, kind, value) in identity_values(person, mask) {
        let sent = match (kind, channel) {
            (IdentityKind::Email, "mobile") => format!("Customer{person:06}@Example.com"),
            (IdentityKind::Phone, "callcenter") => format!("+49 151 {person:07}"),
            _ => value,
        };
        object.insert(kind.as_str().to_string(), Value::String(sent));
    }
    Value::Object(object)
}

pub(super) fn profile_json(person: usize) -> Value {
    let first = FIRST_NAMES[person % FIRST_NAMES.len()];
    let last = LAST_NAMES[(person / FIRST_NAMES.len() + person * 7) % LAST_NAMES.len()];
    let city = CITIES[(person * 3 + person / 10) % CITIES.len()];
    let birth_year = 1950 + (splitmix64(person as u64 ^ 0x5eed) % 56);
    json!({"first_name": first, "last_name": last, "city": city, "birth_year": birth_year})
}

pub(super) fn items_json(items: &[LineItem]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| {
                json!({"sku": item.sku, "category": item.category, "qty": item.qty,
                       "price": to_decimal(item.price_minor)})
            })
            .collect(),
    )
}

pub(super) fn items_total(items: &[LineItem]) -> i64 {
    items
        .iter()
        .map(|item| item.price_minor * i64::from(item.qty))
        .sum()
}

/// A catalogue item: the same sku always has the same category and price (x.99).
pub(super) fn catalogue_item(category: usize, number: u64, qty: u32) -> LineItem {
    let (name, code, low, high) = CATEGORIES[category];
    let span = (high - low) as u64 / 100 + 1;
    let price_minor =
        (low / 100 + (splitmix64(number * 31 + category as u64) % span) as i64) * 100 + 99;
    LineItem {
        sku: format!("{code}-{number:04}"),
        category: name.to_string(),
        qty,
        price_minor: price_minor.min(high),
    }
}

pub(super) fn category_name(category: &str) -> &'static str {
    CATEGORIES
        .iter()
        .find(|(name, ..)| *name == category)
        .map(|(name, ..)| *name)
        .unwrap_or("uncategorised")
}

/// Trims quantities, then lines, until the total is at most ORDER_MAX_MINOR. Every catalogue
/// price is at least ORDER_MIN_MINOR, so a non-empty order stays above the minimum.
pub(super) fn fit_to_total(mut items: Vec<LineItem>) -> Vec<LineItem> {
    while items_total(&items) > ORDER_MAX_MINOR {
        if let Some(line) = items.iter_mut().find(|line| line.qty > 1) {
            line.qty -= 1;
        } else if items.len() > 1 {
            items.pop();
        } else {
            break;
        }
    }
    debug_assert!(!items.is_empty());
    debug_assert!((ORDER_MIN_MINOR..=ORDER_MAX_MINOR).contains(&items_total(&items)));
    items
}

pub(super) fn whole_second_up(ms: i64) -> i64 {
    ms.saturating_add((SECOND_MS - ms.rem_euclid(SECOND_MS)) % SECOND_MS)
}

pub(super) fn lowest_bit(mask: u8) -> Option<u8> {
    (mask != 0).then(|| mask & mask.wrapping_neg())
}

/// A bijective 64-bit mix (SplitMix64's finaliser): distinct inputs, distinct outputs.
pub(super) fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Eight hex digits identifying the spec (FNV-1a over its fields).
pub(super) fn spec_prefix(spec: &GeneratorSpec) -> String {
    let mut hash = Fnv1a64::new();
    hash.write(&(spec.customers as u64).to_le_bytes());
    hash.write(&spec.start_ms.to_le_bytes());
    hash.write(&spec.days.to_le_bytes());
    hash.write(&spec.seed.to_le_bytes());
    hash.write(&[spec.duplicate_rate_percent]);
    let hash = hash.finish();
    format!("{:08x}", (hash ^ (hash >> 32)) as u32)
}
