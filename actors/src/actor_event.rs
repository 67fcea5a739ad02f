//! The actor events: what the rule engines tell dashboards, one variant per event type.
//!
//! [`crate::emit::Emitter`] collects them while a command is applied; the engine writes
//! them to the store's outbox and the node publishes them on
//! `crm.events.<type>.<customer_id>` (stream `CRM_EVENTS`). Their serde form IS the public
//! JSON contract ([`ActorEventJson`]: `{"v": 1, "id", "type", "customer_id", "at", ...the
//! type's fields}`), so the outbox stores exactly what is published, and a JSON Schema can
//! be generated from [`ActorEventJson`]. Event types are spelled once, in
//! [`actor_events!`]'s table. Nothing here decides anything: the payloads are plain data.

use crate::money::Money;
use crate::time::{format_rfc3339, parse_rfc3339_ms};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// The `v` of the public form.
pub const EVENT_VERSION: u32 = 1;

/// An event an actor emits for dashboards: published as JSON on
/// `crm.events.<event_type>.<customer_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ActorEventJson", try_from = "ActorEventJson")]
pub struct ActorEvent {
    pub customer_id: String,
    /// Event time it happened at, Unix ms.
    pub at_ms: i64,
    /// Deterministic unique id: `<cause>:<event_type>:<index>`; dashboards dedup on it.
    pub id: String,
    /// The type and its fields.
    pub data: ActorEventData,
}

impl ActorEvent {
    /// `customer.created`, `points.earned`, ...: the subject token and the JSON `type`.
    pub fn event_type(&self) -> &'static str {
        self.data.event_type()
    }

    /// The public JSON object.
    pub fn to_json(&self) -> Value {
        // Strings, integers, floats, bools and lists only: cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads an outbox entry: the public JSON, or the form builds before the typed events
    /// wrote (`{"event_type", "customer_id", "at_ms", "id", "data": {...}}`).
    pub fn from_stored_json(bytes: &[u8]) -> Result<ActorEvent, serde_json::Error> {
        let value: Value = serde_json::from_slice(bytes)?;
        let legacy = value
            .as_object()
            .is_some_and(|o| o.contains_key("event_type") && o.contains_key("data"));
        if !legacy {
            return serde_json::from_value(value);
        }
        let mut object = serde_json::Map::new();
        if let Value::Object(old) = value {
            if let Some(Value::Object(data)) = old.get("data") {
                object.extend(data.clone());
            }
            object.insert("v".into(), Value::from(EVENT_VERSION));
            for (new, key) in [
                ("type", "event_type"),
                ("id", "id"),
                ("customer_id", "customer_id"),
            ] {
                object.insert(new.into(), old.get(key).cloned().unwrap_or(Value::Null));
            }
            let at = old.get("at_ms").and_then(Value::as_i64).map(format_rfc3339);
            object.insert("at".into(), at.map_or(Value::Null, Value::from));
        }
        serde_json::from_value(Value::Object(object))
    }
}

/// The public JSON form of an [`ActorEvent`], as dashboards receive it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ActorEventJson {
    /// Format version: 1.
    pub v: u32,
    /// Deterministic unique id (`<cause>:<type>:<index>`); drop repeats by it.
    pub id: String,
    pub customer_id: String,
    /// Event time, RFC 3339.
    pub at: String,
    /// `type` and the type's fields.
    #[serde(flatten)]
    pub data: ActorEventData,
}

impl From<ActorEvent> for ActorEventJson {
    fn from(event: ActorEvent) -> ActorEventJson {
        ActorEventJson {
            v: EVENT_VERSION,
            id: event.id,
            customer_id: event.customer_id,
            at: format_rfc3339(event.at_ms),
            data: event.data,
        }
    }
}

impl TryFrom<ActorEventJson> for ActorEvent {
    type Error = String;

    fn try_from(json: ActorEventJson) -> Result<ActorEvent, String> {
        if json.v != EVENT_VERSION {
            return Err(format!(
                "actor event {} has v {}; this build reads v {EVENT_VERSION}",
                json.id, json.v
            ));
        }
        let at_ms = parse_rfc3339_ms(&json.at).map_err(|error| error.to_string())?;
        Ok(ActorEvent {
            customer_id: json.customer_id,
            at_ms,
            id: json.id,
            data: json.data,
        })
    }
}

/// The event enum, its serde tags and [`ActorEventData::event_type`] from one table.
macro_rules! actor_events {
    ($( $(#[$doc:meta])* $name:literal => $variant:ident($payload:ident), )*) => {
        /// One actor event's type and fields (`type` in the JSON).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(tag = "type")]
        pub enum ActorEventData {
            $( $(#[$doc])* #[serde(rename = $name)] $variant($payload), )*
        }

        impl ActorEventData {
            /// Every event type, as published.
            pub const TYPES: &'static [&'static str] = &[$($name),*];

            /// The event type: the JSON `type` and the subject token.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $( ActorEventData::$variant(_) => $name, )*
                }
            }
        }

        $(
            impl From<$payload> for ActorEventData {
                fn from(payload: $payload) -> ActorEventData {
                    ActorEventData::$variant(payload)
                }
            }
        )*
    };
}

actor_events! {
    /// The first event of a customer created them.
    "customer.created" => CustomerCreated(CustomerCreated),
    /// Another customer (the same person, first seen apart) was merged into this one.
    "customer.merged" => CustomerMerged(CustomerMerged),
    /// An event brought an identifier the customer did not have.
    "identity.linked" => IdentityLinked(IdentityLinked),
    /// An identifier of an event belongs to another customer.
    "identity.conflict" => IdentityConflict(IdentityConflictEvent),
    /// An identifier of an event would merge another customer into this one, but this
    /// customer already absorbed `identity.merges_max_per_day` merges that day.
    "identity.merge_refused" => IdentityMergeRefused(IdentityMergeRefused),
    /// Points granted (pending or spendable).
    "points.earned" => PointsEarned(PointsEarned),
    /// Pending points became spendable.
    "points.released" => PointsReleased(PointsReleased),
    /// Lots reached their expiry.
    "points.expired" => PointsExpired(PointsExpired),
    /// A return took back the points of its order.
    "points.reversed" => PointsReversed(PointsReversed),
    /// Points spent on a reward.
    "points.redeemed" => PointsRedeemed(PointsRedeemed),
    /// The customer moved to another tier.
    "tier.changed" => TierChanged(TierChanged),
    /// A lapsed customer bought again.
    "retention.reactivated" => RetentionReactivated(RetentionReactivated),
    /// The customer lapsed.
    "retention.lapsed" => RetentionLapsed(RetentionLapsed),
    /// The win-back offer of the current lapse is due.
    "retention.winback_offered" => WinbackOffered(WinbackOffered),
    /// A new value model puts the customer in another segment.
    "value.segment_changed" => SegmentChanged(SegmentChanged),
    /// A new value model finds a valuable customer at risk.
    "churn.risk" => ChurnRisk(ChurnRisk),
}

/// A float that JSON may carry as `null` (serde_json writes a non-finite float as null).
fn f64_or_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerCreated {
    /// The channel of the creating event.
    pub channel: String,
    /// The type of the creating event (`purchase`, `identify`, ...).
    pub event_type: String,
    pub identities: Vec<IdentityValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityValue {
    /// `email`, `phone`, ...
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityLinked {
    pub kind: String,
    pub value: String,
    /// The event that brought it.
    pub event_id: String,
}

/// An identifier of an event that was not linked to the event's customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityConflictEvent {
    /// The kind of the identifier that was not linked.
    pub kind: String,
    /// The customer the identifier belongs to; absent for an identifier nobody holds
    /// (one too many of its kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_customer_id: Option<String>,
    pub event_id: String,
    /// Why it was not linked (absent in events written before merges: `conflict`).
    #[serde(default)]
    pub reason: ConflictReason,
    /// `max_per_customer`: the limit of `limit_kind` that linking would exceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `max_per_customer`: the kind whose `max_per_customer` is reached (the
    /// identifier's own kind, or another kind the other customer would bring along).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_kind: Option<String>,
}

/// Why an event's identifier was not linked (`reason` of `identity.conflict`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// It belongs to another customer (a record routed before merges existed).
    #[default]
    Conflict,
    /// It belongs to another customer and its kind never merges (`[identity.<kind>] merge
    /// = false`).
    MergeDisabled,
    /// Linking it (or merging its customer) would exceed `[identity.<kind>]
    /// max_per_customer`.
    MaxPerCustomer,
}

/// A merge the rules refused: the customers stay apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityMergeRefused {
    /// The kind of the identifier that would have merged.
    pub kind: String,
    /// The customer that would have been merged into this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_customer_id: Option<String>,
    /// `identity.merges_max_per_day`.
    pub limit: u32,
    pub event_id: String,
}

/// A customer merged into this one (the survivor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerMerged {
    /// The customer merged away (a tombstone now: queries by it answer with this customer).
    pub merged_customer_id: String,
    /// The kinds of the merged customer's identifiers, sorted, each once.
    pub identifier_kinds: Vec<String>,
    /// The merged customer's points, spendable plus pending, now this customer's.
    pub points_moved: i64,
    /// The merged customer's orders this customer did not already have.
    pub orders_moved: u64,
    /// The event that linked the two customers.
    pub cause_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointsEarned {
    /// Why (`reason`) and its own fields.
    #[serde(flatten)]
    pub reason: EarnReason,
    /// What the points are tied to: the order id, or `bonus:<reason>`.
    pub source: String,
    pub points: i64,
    /// `true`: the points wait `available_at`; `false`: spendable at once.
    pub pending: bool,
    pub earned_at: String,
    /// `available_at` (pending) or `expires_at` (spendable).
    #[serde(flatten)]
    pub landing: Landing,
    pub points_balance: i64,
    pub points_pending: i64,
}

/// Why points were earned (`reason` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum EarnReason {
    Purchase {
        order_id: String,
        base_points: i64,
        bonus_points: i64,
        amount: Money,
        channel: String,
    },
    ProfileCompletion {
        /// The identify event that completed the profile.
        event_id: String,
    },
}

/// Where earned points went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Landing {
    /// Pending until then.
    Pending { available_at: String },
    /// Spendable now; expiring then (`null`: never).
    Spendable { expires_at: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointsReleased {
    pub source: String,
    pub points: i64,
    pub earned_at: String,
    /// `null`: never.
    pub expires_at: Option<String>,
    pub points_balance: i64,
    pub points_pending: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointsExpired {
    pub points: i64,
    /// How many lots expired.
    pub lots: u64,
    pub sources: Vec<String>,
    pub points_balance: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointsReversed {
    pub order_id: String,
    pub return_amount: Money,
    pub points: i64,
    pub from_pending: i64,
    pub from_balance: i64,
    /// Points of the order that had expired already (nothing to take).
    pub from_expired: i64,
    /// What none of them covered (owed by the customer).
    pub shortfall: i64,
    pub points_balance: i64,
    pub points_pending: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointsRedeemed {
    pub request_id: String,
    pub reward_id: String,
    pub reward_name: String,
    pub points: i64,
    pub points_balance: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TierChanged {
    /// `null` for a customer without a tier before.
    pub from: Option<String>,
    pub to: String,
    /// `up` or `down`.
    pub direction: String,
    pub rolling_spend: Money,
    /// `null` in the base tier.
    pub review_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetentionReactivated {
    pub order_id: String,
    pub lapsed_at: Option<String>,
    pub days_lapsed: i64,
    pub winback_offered: bool,
    pub reactivated_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetentionLapsed {
    pub reason: String,
    pub last_purchase_at: String,
    pub days_since_purchase: i64,
    pub mean_gap_days: i64,
    pub lapse_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WinbackOffered {
    pub lapsed_at: Option<String>,
    pub reason: String,
    pub lapse_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SegmentChanged {
    /// `null`: not scored before.
    pub from: Option<String>,
    /// `null`: not scored under this model (no purchase by its day).
    pub to: Option<String>,
    #[serde(deserialize_with = "f64_or_null")]
    pub clv: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub p_alive: f64,
    pub model_version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChurnRisk {
    #[serde(deserialize_with = "f64_or_null")]
    pub p_alive: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub threshold: f64,
    pub segment: Option<String>,
    #[serde(deserialize_with = "f64_or_null")]
    pub clv: f64,
    pub model_version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn earned(reason: EarnReason, landing: Landing) -> ActorEvent {
        ActorEvent {
            customer_id: "c1".into(),
            at_ms: 1_772_360_100_000,
            id: "e1:points.earned:0".into(),
            data: PointsEarned {
                reason,
                source: "o1".into(),
                points: 10,
                pending: matches!(landing, Landing::Pending { .. }),
                earned_at: "2026-03-01T10:15:00Z".into(),
                landing,
                points_balance: 0,
                points_pending: 10,
            }
            .into(),
        }
    }

    #[test]
    fn the_public_json_has_the_envelope_then_the_type_fields_and_reads_back() {
        let purchase = EarnReason::Purchase {
            order_id: "o1".into(),
            base_points: 10,
            bonus_points: 0,
            amount: Money(1250),
            channel: "web".into(),
        };
        let event = earned(
            purchase,
            Landing::Pending {
                available_at: "2026-03-15T10:15:00Z".into(),
            },
        );
        let json = event.to_json();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1, "id": "e1:points.earned:0", "type": "points.earned", "customer_id": "c1",
                "at": "2026-03-01T10:15:00Z", "reason": "purchase", "order_id": "o1",
                "base_points": 10, "bonus_points": 0, "amount": 12.5, "channel": "web",
                "source": "o1", "points": 10, "pending": true, "earned_at": "2026-03-01T10:15:00Z",
                "available_at": "2026-03-15T10:15:00Z", "points_balance": 0, "points_pending": 10
            })
        );
        let back: ActorEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);

        let bonus = earned(
            EarnReason::ProfileCompletion {
                event_id: "i1".into(),
            },
            Landing::Spendable { expires_at: None },
        );
        let json = bonus.to_json();
        assert_eq!(json["expires_at"], Value::Null);
        assert!(json.get("available_at").is_none());
        assert_eq!(json["reason"], "profile_completion");
        let bytes = serde_json::to_vec(&bonus).unwrap();
        assert_eq!(ActorEvent::from_stored_json(&bytes).unwrap(), bonus);
    }

    #[test]
    fn an_outbox_entry_of_the_untyped_form_still_reads() {
        let old = serde_json::json!({
            "event_type": "points.expired", "customer_id": "c1", "at_ms": 1_772_360_100_000_i64,
            "id": "t:points.expired:0",
            "data": {"points": 5, "lots": 1, "sources": ["o1"], "points_balance": 0}
        });
        let event = ActorEvent::from_stored_json(old.to_string().as_bytes()).unwrap();
        assert_eq!(event.event_type(), "points.expired");
        assert_eq!(event.to_json()["at"], "2026-03-01T10:15:00Z");
        let unknown = serde_json::json!({"v": 1, "id": "x", "type": "points.gone",
            "customer_id": "c1", "at": "2026-03-01T10:15:00Z"});
        assert!(ActorEvent::from_stored_json(unknown.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_non_finite_score_is_published_as_null_and_reads_back() {
        let event = ActorEvent {
            customer_id: "c1".into(),
            at_ms: 0,
            id: "m:value.segment_changed:0".into(),
            data: SegmentChanged {
                from: None,
                to: Some("champions".into()),
                clv: f64::NAN,
                p_alive: 0.5,
                model_version: 2,
            }
            .into(),
        };
        let json = event.to_json();
        assert_eq!(json["clv"], Value::Null);
        let back: ActorEvent = serde_json::from_value(json).unwrap();
        assert!(matches!(back.data, ActorEventData::SegmentChanged(ref s) if s.clv.is_nan()));
    }

    /// docs/protocol.md shows a `customer.merged` event: it reads as one.
    #[test]
    fn the_documented_merge_event_reads_back() {
        let docs = include_str!("../../docs/protocol.md");
        let start = docs.find("```json merged-event\n").expect("the example") + 21;
        let end = start + docs[start..].find("```").expect("its end");
        let event: ActorEvent = serde_json::from_str(&docs[start..end]).expect("an event");
        let ActorEventData::CustomerMerged(merged) = &event.data else {
            panic!("{event:?}");
        };
        assert_eq!(merged.identifier_kinds, vec!["email".to_string()]);
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::from_str::<Value>(&docs[start..end]).unwrap()
        );
    }

    #[test]
    fn every_type_is_a_subject_token_and_there_is_a_schema() {
        for name in ActorEventData::TYPES {
            assert!(name
                .split('.')
                .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        }
        let schema = serde_json::to_value(schemars::schema_for!(ActorEventJson)).unwrap();
        assert!(schema.to_string().contains("points.earned"), "{schema}");
    }
}
