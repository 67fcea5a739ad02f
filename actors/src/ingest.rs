//! Channel events: the public JSON (`"v": 1`) that adapters publish, and its validated form.
//!
//! [`parse_ingest`] is the single gate between untrusted bytes and the engine. It checks size,
//! JSON shape, version, type, time, identity and amounts against [`IngestLimits`], and either
//! returns a [`ChannelEvent`] (normalised identities, money in minor units, time in Unix ms)
//! or a [`Rejection`] whose reason becomes the dead-letter subject and whose message names the
//! field and the fix. The router calls it; nothing past it sees raw JSON.

use crate::identity::blocked::BlockedIdentities;
use crate::identity::{by_priority, Identity, IdentityKind};
use crate::money::{minor_from_json, AmountError};
use crate::time::parse_rfc3339_ms;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// The only public event version this build reads.
pub const EVENT_VERSION: u64 = 1;
/// Longest `event_id`, `order_id`, `request_id`, in bytes.
pub const ID_MAX_BYTES: usize = 128;
/// Longest free-text field (sku, category, campaign, purpose, profile value), in bytes.
pub const TEXT_MAX_BYTES: usize = 256;
/// Most profile attributes in one `identify` event.
pub const PROFILE_ATTRIBUTES_MAX: usize = 64;

/// Limits applied to every ingested event; from the node config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestLimits {
    /// Largest accepted payload, in bytes.
    pub payload_max_bytes: usize,
    /// Largest accepted purchase or return amount, in minor units.
    pub amount_max_minor: i64,
    /// Most line items in one purchase or return.
    pub items_max: usize,
    /// Largest quantity on one line item.
    pub item_qty_max: u32,
    /// Currencies accepted (ISO 4217 codes); from the rules file.
    pub currencies: Vec<String>,
    /// How far ahead of the reader's wall clock an `occurred_at` may be, ms (`None`: no
    /// bound); the router turns it into `occurred_at_max_ms` as it reads.
    pub occurred_at_future_max_ms: Option<i64>,
    /// Latest accepted `occurred_at`, Unix ms (`None`: no bound). The router sets it from
    /// its wall clock for each group of events it reads; the rules themselves never read
    /// the wall clock (the shard log holds only events that passed).
    pub occurred_at_max_ms: Option<i64>,
    /// Identifier values never linked to a customer; from the rules file
    /// (`[identity.<kind>] blocked`). Default: none.
    pub blocked_identities: BlockedIdentities,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            payload_max_bytes: 64 * 1024,
            amount_max_minor: 1_000_000 * 100,
            items_max: 200,
            item_qty_max: 10_000,
            currencies: vec!["EUR".to_string()],
            occurred_at_future_max_ms: None,
            occurred_at_max_ms: None,
            blocked_identities: BlockedIdentities::default(),
        }
    }
}

/// Why an input was sent to the dead-letter stream. The `as_str` value is the subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Larger than `payload_max_bytes`.
    Oversized,
    /// Not JSON, or not a JSON object.
    Malformed,
    /// `v` missing or not a version this build reads.
    UnsupportedVersion,
    /// `type` not one of the event types.
    UnknownType,
    /// No identity object, no known identifier in it, or an identifier that is unusable.
    NoIdentity,
    /// Every identifier of the event is blocked by the rules file (`[identity.<kind>]
    /// blocked`): none may be linked, so the event names no customer.
    BlockedIdentity,
    /// Amount negative, zero where it must be positive, too precise or above the limit.
    BadAmount,
    /// Any other missing or ill-formed field (event_id, occurred_at, currency, ...).
    Invalid,
    /// A valid event the customer's rules refused (e.g. a return for an unknown order).
    Unapplicable,
}

impl RejectReason {
    /// Every reason, for tests and docs.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Oversized,
        RejectReason::Malformed,
        RejectReason::UnsupportedVersion,
        RejectReason::UnknownType,
        RejectReason::NoIdentity,
        RejectReason::BlockedIdentity,
        RejectReason::BadAmount,
        RejectReason::Invalid,
        RejectReason::Unapplicable,
    ];

    /// The subject token: `crm.dlq.<as_str>`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Oversized => "oversized",
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::NoIdentity => "no_identity",
            RejectReason::BlockedIdentity => "blocked_identity",
            RejectReason::BadAmount => "bad_amount",
            RejectReason::Invalid => "invalid",
            RejectReason::Unapplicable => "unapplicable",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An input refused with a reason and a message that names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            message: message.into(),
        }
    }
}

/// A validated event from one channel about one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelEvent {
    /// The adapter's unique id for this event (also its JetStream `Nats-Msg-Id`).
    pub event_id: String,
    /// The channel token from the ingest subject (`web`, `store`, ...).
    pub channel: String,
    /// When it happened, Unix ms (event time; rules use nothing else).
    pub occurred_at_ms: i64,
    /// Normalised identifiers, highest priority first; never empty.
    pub identities: Vec<Identity>,
    pub kind: EventKind,
}

impl ChannelEvent {
    /// The identifier with the highest priority.
    pub fn primary_identity(&self) -> &Identity {
        debug_assert!(!self.identities.is_empty());
        &self.identities[0]
    }
}

/// One line of an order or a return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub category: String,
    pub qty: u32,
    /// Unit price, minor units.
    pub price_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub order_id: String,
    /// Order total, minor units, > 0.
    pub amount_minor: i64,
    pub currency: String,
    pub items: Vec<LineItem>,
    pub store_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Return {
    /// The order this return belongs to.
    pub order_id: String,
    /// Refunded amount, minor units, > 0.
    pub amount_minor: i64,
    pub items: Vec<LineItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CartAction {
    Add,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupportStatus {
    Opened,
    Resolved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailAction {
    Sent,
    Opened,
    Clicked,
}

/// The type-specific part of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Profile attributes (name, city, birthday, ...) and, through `identity`, new identifiers.
    Identify {
        profile: BTreeMap<String, String>,
    },
    View {
        sku: Option<String>,
        category: Option<String>,
    },
    Cart {
        action: CartAction,
        sku: String,
        category: Option<String>,
        qty: u32,
        price_minor: i64,
    },
    Purchase(Purchase),
    Return(Return),
    Support {
        ticket_id: String,
        status: SupportStatus,
        satisfaction: Option<u8>,
    },
    Email {
        action: EmailAction,
        campaign: String,
    },
    Visit {
        store_id: Option<String>,
    },
    Consent {
        purpose: String,
        granted: bool,
    },
}

impl EventKind {
    /// The public `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Identify { .. } => "identify",
            EventKind::View { .. } => "view",
            EventKind::Cart { .. } => "cart",
            EventKind::Purchase(_) => "purchase",
            EventKind::Return(_) => "return",
            EventKind::Support { .. } => "support",
            EventKind::Email { .. } => "email",
            EventKind::Visit { .. } => "visit",
            EventKind::Consent { .. } => "consent",
        }
    }
}

/// The public event types, as adapters spell them.
pub const EVENT_TYPES: [&str; 9] = [
    "identify", "view", "cart", "purchase", "return", "support", "email", "visit", "consent",
];

/// Is `token` a usable channel name (`[a-z0-9_-]`, 1 to 32 bytes)?
pub fn is_channel_token(token: &str) -> bool {
    (1..=32).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Validates one ingested payload from `channel`.
pub fn parse_ingest(
    channel: &str,
    payload: &[u8],
    limits: &IngestLimits,
) -> Result<ChannelEvent, Rejection> {
    if payload.len() > limits.payload_max_bytes {
        return Err(Rejection::new(
            RejectReason::Oversized,
            format!(
                "payload is {} bytes, above payload_max_bytes = {}; split or trim the event",
                payload.len(),
                limits.payload_max_bytes
            ),
        ));
    }
    if !is_channel_token(channel) {
        return Err(Rejection::new(
            RejectReason::Invalid,
            format!("channel '{channel}' is not a token of [a-z0-9_-] (publish to crm.ingest.<channel>, e.g. crm.ingest.web)"),
        ));
    }
    // serde_json keeps the last of repeated keys; a reader that keeps the first would see
    // another event (`"amount": -5, "amount": 5`), so repeats are refused in the same pass.
    let StrictValue(value) = serde_json::from_slice(payload).map_err(|error| {
        let message = if error.is_data() {
            format!("payload has {error}; send each field once")
        } else {
            format!("payload is not valid JSON ({error}); send one JSON object")
        };
        Rejection::new(RejectReason::Malformed, message)
    })?;
    let Value::Object(object) = value else {
        return Err(Rejection::new(
            RejectReason::Malformed,
            "payload is JSON but not an object; send {\"v\": 1, \"event_id\": ..., ...}",
        ));
    };
    let fields = Fields(&object);

    match object.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(EVENT_VERSION) => {}
        Some(other) => {
            return Err(Rejection::new(
                RejectReason::UnsupportedVersion,
                format!("\"v\" is {other}; this node reads \"v\": 1"),
            ))
        }
        None => {
            return Err(Rejection::new(
                RejectReason::UnsupportedVersion,
                "\"v\" is missing; send \"v\": 1",
            ))
        }
    }
    let event_id = fields.id("event_id")?;
    let type_name = match object.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) | None => {
            return Err(Rejection::new(
                RejectReason::UnknownType,
                format!("\"type\" is missing or not a string; send one of {EVENT_TYPES:?}"),
            ))
        }
    };
    if !EVENT_TYPES.contains(&type_name) {
        return Err(Rejection::new(
            RejectReason::UnknownType,
            format!(
                "type '{}' is unknown; send one of {EVENT_TYPES:?}",
                truncate(type_name)
            ),
        ));
    }
    let occurred_at_ms = match object.get("occurred_at") {
        Some(Value::String(text)) => parse_rfc3339_ms(text)
            .map_err(|e| Rejection::new(RejectReason::Invalid, format!("occurred_at {e}")))?,
        _ => {
            return Err(Rejection::new(
                RejectReason::Invalid,
                "occurred_at is missing; send an RFC 3339 time, e.g. \"2026-03-01T10:15:00Z\"",
            ))
        }
    };
    check_rule_time("occurred_at", occurred_at_ms, limits.occurred_at_max_ms).map_err(invalid)?;
    let identities = parse_identities(object.get("identity"))?;
    let identities = without_blocked(identities, &limits.blocked_identities)?;
    let kind = parse_kind(type_name, &fields, limits)?;
    Ok(ChannelEvent {
        event_id,
        channel: channel.to_string(),
        occurred_at_ms,
        identities,
        kind,
    })
}

/// Checks a time the rules will run at (an event's `occurred_at`, a redeem's, a tick's):
/// not before 1970, and not after `latest_ms` (the reader's clock plus
/// `limits.occurred_at_future_max_days`). One time far in the future would move every rule
/// clock it reaches there for good (every lot expired, every customer lapsed).
pub fn check_rule_time(field: &str, at_ms: i64, latest_ms: Option<i64>) -> Result<(), String> {
    if at_ms < 0 {
        return Err(format!(
            "{field} {} is before 1970-01-01T00:00:00Z; send the time it happened",
            crate::time::format_rfc3339(at_ms)
        ));
    }
    match latest_ms {
        Some(latest) if at_ms > latest => Err(format!(
            "{field} {} is after {}, further ahead of this node's clock than \
             limits.occurred_at_future_max_days allows; check the sender's clock and the year",
            crate::time::format_rfc3339(at_ms),
            crate::time::format_rfc3339(latest)
        )),
        _ => Ok(()),
    }
}

/// Reads an `identity` object (`{"email": ..., "loyalty_card": ...}`) into normalised
/// identifiers, highest priority first. Used by ingest and by query requests.
pub fn parse_identities(value: Option<&Value>) -> Result<Vec<Identity>, Rejection> {
    let Some(Value::Object(map)) = value else {
        return Err(Rejection::new(
            RejectReason::NoIdentity,
            "identity is missing; send an object with one or more of loyalty_card, customer_id, email, phone, device_id",
        ));
    };
    let mut identities = Vec::with_capacity(map.len());
    for (name, raw) in map {
        let Some(kind) = IdentityKind::parse(name) else {
            return Err(Rejection::new(
                RejectReason::NoIdentity,
                format!("identity.{} is not an identifier kind; use loyalty_card, customer_id, email, phone or device_id", truncate(name)),
            ));
        };
        let raw = match raw {
            Value::String(s) => s.clone(),
            // Whole numbers only: a float's text (1e3 -> "1000.0", 2^70 -> "1.18e21") would
            // map different identifiers to one key, or one to two.
            Value::Number(n) if n.as_u64().is_some() => n.to_string(),
            Value::Null => continue,
            _ => {
                return Err(Rejection::new(
                    RejectReason::NoIdentity,
                    format!("identity.{name} must be a string (or a whole number from 0 to 18446744073709551615)"),
                ))
            }
        };
        let identity = Identity::normalise(kind, &raw)
            .map_err(|e| Rejection::new(RejectReason::NoIdentity, e.to_string()))?;
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(Rejection::new(
            RejectReason::NoIdentity,
            "identity has no identifier; send one or more of loyalty_card, customer_id, email, phone, device_id",
        ));
    }
    by_priority(&mut identities);
    Ok(identities)
}

/// Takes the identifiers the rules block out of `identities` (normalised, highest priority
/// first): they are never linked to a customer, and what is left keeps its order. With
/// nothing left the input names no customer: refused `blocked_identity`, naming each
/// blocked identifier, the entry of the rules file it matched and the fix. Used by ingest
/// and by query requests.
pub fn without_blocked(
    identities: Vec<Identity>,
    blocked: &BlockedIdentities,
) -> Result<Vec<Identity>, Rejection> {
    if blocked.is_empty() {
        return Ok(identities);
    }
    let mut matched = Vec::new();
    let mut kept = Vec::with_capacity(identities.len());
    for identity in identities {
        match blocked.matching(&identity) {
            Some(pattern) => matched.push(format!(
                "identity.{} '{}' (identity.{}.blocked \"{}\")",
                identity.kind,
                truncate(&identity.value),
                identity.kind,
                truncate(pattern)
            )),
            None => kept.push(identity),
        }
    }
    if kept.is_empty() && !matched.is_empty() {
        return Err(Rejection::new(
            RejectReason::BlockedIdentity,
            format!(
                "{} {} blocked by the rules file, and nothing else names the customer: a blocked value is never linked to one; send an identifier of the customer (loyalty_card, customer_id, ...), or take the value out of [identity.<kind>] blocked in the rules file if it is a real customer's",
                matched.join(", "),
                if matched.len() == 1 { "is" } else { "are" }
            ),
        ));
    }
    Ok(kept)
}

fn parse_kind(
    type_name: &str,
    fields: &Fields<'_>,
    limits: &IngestLimits,
) -> Result<EventKind, Rejection> {
    Ok(match type_name {
        "identify" => {
            let mut profile = BTreeMap::new();
            if let Some(value) = fields.0.get("profile") {
                let Value::Object(map) = value else {
                    return Err(invalid("profile must be an object of attribute: value"));
                };
                if map.len() > PROFILE_ATTRIBUTES_MAX {
                    return Err(invalid(format!(
                        "profile has {} attributes, above {PROFILE_ATTRIBUTES_MAX}",
                        map.len()
                    )));
                }
                for (key, value) in map {
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => String::new(),
                        _ => {
                            return Err(invalid(format!(
                                "profile.{} must be a string, number or boolean",
                                truncate(key)
                            )))
                        }
                    };
                    check_text(&format!("profile.{key}"), &text)?;
                    check_text("profile attribute name", key)?;
                    profile.insert(key.clone(), text);
                }
            }
            EventKind::Identify { profile }
        }
        "view" => EventKind::View {
            sku: fields.opt_text("sku")?,
            category: fields.opt_text("category")?,
        },
        "cart" => EventKind::Cart {
            action: match fields.text("action")?.as_str() {
                "add" => CartAction::Add,
                "remove" => CartAction::Remove,
                other => {
                    return Err(invalid(format!(
                        "action '{}' is not add or remove",
                        truncate(other)
                    )))
                }
            },
            sku: fields.text("sku")?,
            category: fields.opt_text("category")?,
            qty: fields.opt_qty("qty", limits)?.unwrap_or(1),
            price_minor: match fields.0.get("price") {
                Some(v) => amount("price", v, limits, true)?,
                None => 0,
            },
        },
        "purchase" => {
            let currency = fields.text("currency")?;
            if !limits.currencies.iter().any(|c| c == &currency) {
                return Err(invalid(format!(
                    "currency '{}' is not accepted; accepted: {}",
                    truncate(&currency),
                    limits.currencies.join(", ")
                )));
            }
            EventKind::Purchase(Purchase {
                order_id: fields.id("order_id")?,
                amount_minor: fields.positive_amount("amount", limits)?,
                currency,
                items: fields.items(limits)?,
                store_id: fields.opt_text("store_id")?,
            })
        }
        "return" => EventKind::Return(Return {
            order_id: fields.id("order_id")?,
            amount_minor: fields.positive_amount("amount", limits)?,
            items: fields.items(limits)?,
        }),
        "support" => EventKind::Support {
            ticket_id: fields.id("ticket_id")?,
            status: match fields.text("status")?.as_str() {
                "opened" => SupportStatus::Opened,
                "resolved" => SupportStatus::Resolved,
                other => {
                    return Err(invalid(format!(
                        "status '{}' is not opened or resolved",
                        truncate(other)
                    )))
                }
            },
            satisfaction: match fields.0.get("satisfaction") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(s @ 1..=5) => Some(s as u8),
                    _ => return Err(invalid("satisfaction must be a whole number from 1 to 5")),
                },
                Some(_) => return Err(invalid("satisfaction must be a whole number from 1 to 5")),
            },
        },
        "email" => EventKind::Email {
            action: match fields.text("action")?.as_str() {
                "sent" => EmailAction::Sent,
                "opened" => EmailAction::Opened,
                "clicked" => EmailAction::Clicked,
                other => {
                    return Err(invalid(format!(
                        "action '{}' is not sent, opened or clicked",
                        truncate(other)
                    )))
                }
            },
            campaign: fields.text("campaign")?,
        },
        "visit" => EventKind::Visit {
            store_id: fields.opt_text("store_id")?,
        },
        "consent" => EventKind::Consent {
            purpose: fields.text("purpose")?,
            granted: match fields.0.get("granted") {
                Some(Value::Bool(b)) => *b,
                _ => return Err(invalid("granted must be true or false")),
            },
        },
        other => {
            // EVENT_TYPES was checked by the caller; keep the match total all the same.
            return Err(Rejection::new(
                RejectReason::UnknownType,
                format!("type '{}' is unknown", truncate(other)),
            ));
        }
    })
}

/// A JSON value read like `serde_json::Value`, except that an object repeating a key is an
/// error (serde_json's `Value` keeps the last one silently).
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictValueVisitor)
    }
}

struct StrictValueVisitor;

impl<'de> serde::de::Visitor<'de> for StrictValueVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key \"{}\" twice in one object",
                    truncate(&key)
                )));
            }
            object.insert(key, value);
        }
        Ok(StrictValue(Value::Object(object)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::new();
        while let Some(StrictValue(value)) = seq.next_element()? {
            list.push(value);
        }
        Ok(StrictValue(Value::Array(list)))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::Bool(value)))
    }
    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::from(value)))
    }
    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::from(value)))
    }
    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::from(value)))
    }
    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::String(value.to_string())))
    }
    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::String(value)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(StrictValue(Value::Null))
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn id(&self, name: &str) -> Result<String, Rejection> {
        match self.0.get(name) {
            Some(Value::String(s)) if s.len() > ID_MAX_BYTES => Err(invalid(format!(
                "{name} is longer than {ID_MAX_BYTES} bytes"
            ))),
            // An id travels in NATS headers (Nats-Msg-Id), where a line break cannot go.
            Some(Value::String(s)) if s.chars().any(char::is_control) => Err(invalid(format!(
                "{name} contains a control character (a line break, a tab, ...); send printable text"
            ))),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            _ => Err(invalid(format!(
                "{name} is missing or empty; send a non-empty string"
            ))),
        }
    }

    fn text(&self, name: &str) -> Result<String, Rejection> {
        self.opt_text(name)?
            .ok_or_else(|| invalid(format!("{name} is missing; send a string")))
    }

    fn opt_text(&self, name: &str) -> Result<Option<String>, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                check_text(name, s)?;
                Ok(Some(s.clone()))
            }
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(invalid(format!("{name} must be a string"))),
        }
    }

    fn opt_qty(&self, name: &str, limits: &IngestLimits) -> Result<Option<u32>, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(q) if q >= 1 && q <= u64::from(limits.item_qty_max) => Ok(Some(q as u32)),
                _ => Err(Rejection::new(
                    RejectReason::BadAmount,
                    format!(
                        "{name} must be a whole number from 1 to {}",
                        limits.item_qty_max
                    ),
                )),
            },
            Some(_) => Err(invalid(format!("{name} must be a whole number"))),
        }
    }

    fn positive_amount(&self, name: &str, limits: &IngestLimits) -> Result<i64, Rejection> {
        match self.0.get(name) {
            Some(value) => amount(name, value, limits, false),
            None => Err(Rejection::new(
                RejectReason::BadAmount,
                format!("{name} is missing; send a positive decimal, e.g. 19.99"),
            )),
        }
    }

    fn items(&self, limits: &IngestLimits) -> Result<Vec<LineItem>, Rejection> {
        let list = match self.0.get("items") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(invalid(
                    "items must be an array of {sku, category, qty, price}",
                ))
            }
        };
        if list.len() > limits.items_max {
            return Err(invalid(format!(
                "items has {} lines, above items_max = {}",
                list.len(),
                limits.items_max
            )));
        }
        let mut items = Vec::with_capacity(list.len());
        for (index, item) in list.iter().enumerate() {
            let Value::Object(map) = item else {
                return Err(invalid(format!("items[{index}] must be an object")));
            };
            let fields = Fields(map);
            let prefix =
                |e: Rejection| Rejection::new(e.reason, format!("items[{index}].{}", e.message));
            items.push(LineItem {
                sku: fields.text("sku").map_err(prefix)?,
                category: fields
                    .opt_text("category")
                    .map_err(prefix)?
                    .unwrap_or_else(|| "uncategorised".to_string()),
                qty: fields.opt_qty("qty", limits).map_err(prefix)?.unwrap_or(1),
                price_minor: match map.get("price") {
                    Some(v) => amount("price", v, limits, true).map_err(prefix)?,
                    None => 0,
                },
            });
        }
        Ok(items)
    }
}

fn amount(
    name: &str,
    value: &Value,
    limits: &IngestLimits,
    zero_ok: bool,
) -> Result<i64, Rejection> {
    let minor = minor_from_json(value).map_err(|error| {
        Rejection::new(RejectReason::BadAmount, format!("{name} {value} {error}"))
    })?;
    if minor < 0 || (minor == 0 && !zero_ok) {
        return Err(Rejection::new(
            RejectReason::BadAmount,
            format!("{name} {value} must be positive"),
        ));
    }
    if minor > limits.amount_max_minor {
        return Err(Rejection::new(
            RejectReason::BadAmount,
            format!(
                "{name} {value} is above amount_max = {}; check the units (major units, e.g. 19.99)",
                crate::money::to_decimal(limits.amount_max_minor)
            ),
        ));
    }
    let _ = AmountError::TooLarge;
    Ok(minor)
}

fn check_text(name: &str, text: &str) -> Result<(), Rejection> {
    if text.len() > TEXT_MAX_BYTES {
        return Err(invalid(format!(
            "{} is longer than {TEXT_MAX_BYTES} bytes",
            truncate(name)
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{} contains a control character (a line break, a tab, ...); send printable text",
            truncate(name)
        )));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::Invalid, message)
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<ChannelEvent, Rejection> {
        parse_ingest(
            "web",
            value.to_string().as_bytes(),
            &IngestLimits::default(),
        )
    }

    fn purchase() -> Value {
        json!({"v": 1, "event_id": "e1", "type": "purchase", "occurred_at": "2026-01-02T10:00:00Z",
               "identity": {"email": "Ann@Example.com", "loyalty_card": "LC-1"},
               "order_id": "o1", "amount": 25.5, "currency": "EUR",
               "items": [{"sku": "s1", "category": "shoes", "qty": 1, "price": 25.5}]})
    }

    #[test]
    fn a_purchase_is_read_into_minor_units_and_normalised_identities() {
        let event = parse(purchase()).unwrap();
        assert_eq!(event.identities[0].kind, IdentityKind::LoyaltyCard);
        assert_eq!(event.identities[1].value, "ann@example.com");
        let EventKind::Purchase(p) = event.kind else {
            panic!()
        };
        assert_eq!(p.amount_minor, 2550);
        assert_eq!(p.items[0].price_minor, 2550);
    }

    #[test]
    fn each_bad_input_gets_its_reason() {
        let limits = IngestLimits::default();
        let oversized = vec![b' '; limits.payload_max_bytes + 1];
        assert_eq!(
            parse_ingest("web", &oversized, &limits).unwrap_err().reason,
            RejectReason::Oversized
        );
        assert_eq!(
            parse_ingest("web", b"{not json", &limits)
                .unwrap_err()
                .reason,
            RejectReason::Malformed
        );
        let mut v = purchase();
        v["v"] = json!(2);
        assert_eq!(
            parse(v).unwrap_err().reason,
            RejectReason::UnsupportedVersion
        );
        let mut v = purchase();
        v["type"] = json!("teleport");
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::UnknownType);
        let mut v = purchase();
        v["identity"] = json!({});
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::NoIdentity);
        let mut v = purchase();
        v["amount"] = json!(-5);
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::BadAmount);
        let mut v = purchase();
        v["amount"] = json!(1e12);
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::BadAmount);
        let mut v = purchase();
        v["occurred_at"] = json!("last tuesday");
        let error = parse(v).unwrap_err();
        assert_eq!(error.reason, RejectReason::Invalid);
        assert!(error.message.contains("occurred_at"), "{}", error.message);
    }

    #[test]
    fn control_characters_in_ids_and_text_are_refused() {
        for (field, value) in [
            ("event_id", "a\r\nb"),
            ("order_id", "o\n1"),
            ("store_id", "s\u{1b}[31m"),
        ] {
            let mut v = purchase();
            v[field] = json!(value);
            let error = parse(v).unwrap_err();
            assert_eq!(error.reason, RejectReason::Invalid, "{field}");
            assert!(error.message.contains(field), "{}", error.message);
            assert!(
                error.message.contains("control character"),
                "{}",
                error.message
            );
        }
        let mut v = purchase();
        v["items"][0]["sku"] = json!("a\u{0}b");
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::Invalid);
        let mut v = purchase();
        v["identity"] = json!({"customer_id": "c\n1"});
        assert_eq!(parse(v).unwrap_err().reason, RejectReason::NoIdentity);
        // An invisible character refuses the whole event like a control character does,
        // even beside a usable identifier: dropping only that identifier would hide it.
        let mut v = purchase();
        v["identity"] = json!({"email": "ann\u{200B}@example.com", "loyalty_card": "LC-1"});
        let rejection = parse(v).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::NoIdentity);
        assert!(
            rejection.message.contains("U+200B"),
            "{}",
            rejection.message
        );
    }

    fn blocking(kind: IdentityKind, patterns: &[&str]) -> IngestLimits {
        let mut blocked = BlockedIdentities::default();
        for raw in patterns {
            let pattern = crate::identity::blocked::Pattern::parse(kind, raw).unwrap();
            blocked.insert(kind, pattern);
        }
        IngestLimits {
            blocked_identities: blocked,
            ..IngestLimits::default()
        }
    }

    fn parse_with(value: Value, limits: &IngestLimits) -> Result<ChannelEvent, Rejection> {
        parse_ingest("web", value.to_string().as_bytes(), limits)
    }

    #[test]
    fn a_blocked_identifier_is_taken_out_and_the_others_kept() {
        let limits = blocking(IdentityKind::Email, &["ann@*"]);
        // purchase(): email Ann@Example.com and loyalty card LC-1.
        let event = parse_with(purchase(), &limits).unwrap();
        assert_eq!(
            event.identities,
            vec![Identity::normalise(IdentityKind::LoyaltyCard, "LC-1").unwrap()]
        );
        // Not blocked: both kept, in priority order.
        let event = parse_with(purchase(), &blocking(IdentityKind::Email, &["bob@*"])).unwrap();
        assert_eq!(event.identities.len(), 2);
    }

    #[test]
    fn an_event_with_only_blocked_identifiers_is_refused_blocked_identity() {
        let mut limits = blocking(IdentityKind::Email, &["test@test.com", "noreply@*"]);
        let phone =
            crate::identity::blocked::Pattern::parse(IdentityKind::Phone, "+1 000 000 0000");
        limits
            .blocked_identities
            .insert(IdentityKind::Phone, phone.unwrap());
        let mut v = purchase();
        v["identity"] = json!({"email": "NoReply@Shop.example"});
        let rejection = parse_with(v, &limits).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::BlockedIdentity);
        for part in [
            "identity.email 'noreply@shop.example' (identity.email.blocked \"noreply@*\") is blocked by the rules file",
            "never linked",
            "send an identifier of the customer",
            "[identity.<kind>] blocked",
        ] {
            assert!(rejection.message.contains(part), "{}", rejection.message);
        }
        let mut v = purchase();
        v["identity"] = json!({"email": "test@test.com", "phone": "+1 (000) 000-0000"});
        let rejection = parse_with(v, &limits).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::BlockedIdentity);
        assert!(
            rejection.message.contains(
                "identity.email 'test@test.com' (identity.email.blocked \"test@test.com\"), identity.phone '+10000000000' (identity.phone.blocked \"+10000000000\") are blocked"
            ),
            "{}",
            rejection.message
        );
        // An unusable identifier is still no_identity, blocked or not: it is checked first.
        let mut v = purchase();
        v["identity"] = json!({"email": "test@test.com", "phone": "555"});
        assert_eq!(
            parse_with(v, &limits).unwrap_err().reason,
            RejectReason::NoIdentity
        );
    }

    /// docs/protocol.md's `blocked_identity` example, under the shipped rules, gets the
    /// message the docs quote.
    #[test]
    fn the_blocked_identity_example_reads_as_documented() {
        let rules = crate::rules::Rules::from_toml_str(crate::rules::tests::SHIPPED).unwrap();
        let limits = IngestLimits {
            blocked_identities: rules.identity.blocked,
            ..IngestLimits::default()
        };
        let docs = include_str!("../../docs/protocol.md");
        let block = docs
            .split("```json dead-letter blocked_identity\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the example");
        let rejection = parse_ingest("web", block.as_bytes(), &limits).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::BlockedIdentity);
        let flat = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat(docs).contains(&format!("`{}`", flat(&rejection.message))),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn every_reason_has_its_own_token() {
        let tokens: std::collections::BTreeSet<&str> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(tokens.len(), RejectReason::ALL.len());
        assert!(tokens.contains("blocked_identity"));
        // docs/protocol.md's dead-letter table has a row for each.
        let docs = include_str!("../../docs/protocol.md");
        for token in &tokens {
            assert!(docs.contains(&format!("\n| `{token}` | ")), "{token}");
        }
        for reason in RejectReason::ALL {
            let json = serde_json::to_value(reason).unwrap();
            assert_eq!(json, json!(reason.as_str()));
        }
    }

    #[test]
    fn numeric_identifiers_must_be_whole_numbers() {
        let mut v = purchase();
        v["identity"] = json!({"customer_id": 123456789});
        assert_eq!(parse(v).unwrap().identities[0].value, "123456789");
        for number in [json!(1e3), json!(1.5), json!(-7)] {
            let mut v = purchase();
            v["identity"] = json!({"customer_id": number});
            assert_eq!(parse(v).unwrap_err().reason, RejectReason::NoIdentity);
        }
        // 2^70 is not a u64: as a float it would share its text with its neighbours.
        let text =
            br#"{"v": 1, "event_id": "e1", "type": "view", "occurred_at": "2026-01-02T10:00:00Z",
                        "identity": {"customer_id": 1180591620717411303424}}"#;
        let error = parse_ingest("web", text, &IngestLimits::default()).unwrap_err();
        assert_eq!(error.reason, RejectReason::NoIdentity);
    }

    #[test]
    fn a_key_repeated_in_one_object_is_malformed() {
        let limits = IngestLimits::default();
        for text in [
            &br#"{"v": 2, "v": 1, "event_id": "e1", "type": "view", "occurred_at": "2026-01-02T10:00:00Z", "identity": {"email": "a@b.co"}}"#[..],
            &br#"{"v": 1, "event_id": "e1", "type": "view", "occurred_at": "2026-01-02T10:00:00Z", "identity": {"email": "a@b.co", "email": "c@d.co"}}"#[..],
        ] {
            let error = parse_ingest("web", text, &limits).unwrap_err();
            assert_eq!(error.reason, RejectReason::Malformed);
            assert!(error.message.contains("twice"), "{}", error.message);
        }
        // The same key in two different objects is fine.
        let text = br#"{"v": 1, "event_id": "e1", "type": "view", "occurred_at": "2026-01-02T10:00:00Z", "identity": {"email": "a@b.co"}, "sku": "s", "category": "c"}"#;
        parse_ingest("web", text, &limits).expect("valid");
    }

    #[test]
    fn occurred_at_must_lie_between_1970_and_the_allowed_future() {
        let mut v = purchase();
        v["occurred_at"] = json!("1969-12-31T23:59:59Z");
        let error = parse(v).unwrap_err();
        assert_eq!(error.reason, RejectReason::Invalid);
        assert!(error.message.contains("1970"), "{}", error.message);

        let limits = IngestLimits {
            occurred_at_max_ms: Some(
                crate::time::parse_rfc3339_ms("2026-01-03T00:00:00Z").unwrap(),
            ),
            ..IngestLimits::default()
        };
        let ok = purchase();
        parse_ingest("web", ok.to_string().as_bytes(), &limits).expect("before the bound");
        let mut v = purchase();
        v["occurred_at"] = json!("9999-12-31T23:59:59Z");
        let error = parse_ingest("web", v.to_string().as_bytes(), &limits).unwrap_err();
        assert_eq!(error.reason, RejectReason::Invalid);
        assert!(
            error.message.contains("occurred_at_future_max_days"),
            "{}",
            error.message
        );
    }
}
