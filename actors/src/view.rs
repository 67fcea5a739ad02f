//! The public 360 view (`"v": 1`): one customer's state rendered as JSON for store
//! associates, call-center agents and web apps.
//!
//! The query responder calls [`full_view`] with the stored state, the shard's rule clock
//! as `as_of_ms` and the current rules. [`CustomerView`] and its blocks are the public
//! contract documented in `docs/rules.md` (a JSON Schema can be generated from them): add
//! fields, never rename or remove them. Money is a JSON decimal ([`Money`]), times are RFC
//! 3339, points are integers; a missing time or figure is `null`, never absent. Rendering
//! is read-only: it never changes the state, and recency is computed from `as_of_ms`
//! (never earlier than the customer's own clock), never from the wall clock.

use crate::loyalty;
use crate::money::Money;
use crate::retention;
use crate::rules::Rules;
use crate::state::{CustomerState, Loyalty, PurchaseSummary, RetentionStatus};
use crate::time::{format_optional, format_rfc3339, DAY_MS};
use crate::value::live::{self, NextBestAction, ValueBlock, ValueModel};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The view format version.
pub const VIEW_VERSION: u64 = 1;

fn money_map(map: &BTreeMap<String, i64>) -> BTreeMap<String, Money> {
    map.iter()
        .map(|(key, minor)| (key.clone(), Money(*minor)))
        .collect()
}

/// Days with one decimal, from ms.
fn days_decimal(ms: i64) -> f64 {
    let tenths = ms * 10 / DAY_MS;
    tenths as f64 / 10.0
}

/// One customer as the query responder answers (without the `value` and
/// `next_best_actions` blocks that [`full_view`] adds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerView {
    /// The view format version, [`VIEW_VERSION`].
    pub v: u64,
    pub customer_id: String,
    /// `false`: nothing is known of this customer: no event of it was ever applied and it
    /// takes part in no merge (every block is empty). A tombstone exists.
    pub exists: bool,
    pub created_at: Option<String>,
    /// The time the view is rendered at (the shard's rule clock, at least the customer's).
    pub as_of: String,
    /// The rules version that last changed the customer.
    pub rules_version: u32,
    /// Identifier values by kind (`email`, `phone`, ...).
    pub identities: BTreeMap<String, Vec<String>>,
    pub profile: BTreeMap<String, String>,
    /// Consent by purpose.
    pub consents: BTreeMap<String, ConsentView>,
    /// Activity by channel.
    pub channels: BTreeMap<String, ChannelView>,
    pub purchases: PurchasesView,
    pub returns: ReturnsView,
    pub loyalty: LoyaltyView,
    pub retention: RetentionView,
    /// Most recent first.
    pub timeline: Vec<TimelineView>,
    pub support: SupportView,
    pub email: EmailView,
    pub browsing: BrowsingView,
    pub visits: VisitsView,
    /// Set when this customer was merged into another (a tombstone): every block is empty
    /// and the survivor, at the end of this chain, holds everything (a query by this
    /// customer answers with the survivor's view).
    pub merged_into: Option<String>,
    /// When it was merged away; `null` unless `merged_into` is set.
    pub merged_at: Option<String>,
    /// The customers merged into this one (directly or through chains), oldest first.
    pub merged_from: Vec<MergedFromView>,
    /// Merged customers whose state has not arrived yet: a merge under way.
    pub awaiting_merges: Vec<String>,
    /// Channel events (and merge-outs) held back until the awaited states arrive.
    pub held_commands: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MergedFromView {
    pub customer_id: String,
    /// The time of the event that linked the two customers.
    pub merged_at: String,
    pub cause_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConsentView {
    pub granted: bool,
    pub at: String,
    pub channel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChannelView {
    pub events: u64,
    pub first_at: String,
    pub last_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PurchasesView {
    /// Every purchase, in any currency.
    pub count: u64,
    /// Spend in the loyalty currency.
    pub total_spend: Money,
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    /// Mean order value in the loyalty currency; `null` without such an order.
    pub average_order_value: Option<Money>,
    pub by_channel: BTreeMap<String, Money>,
    pub by_category: BTreeMap<String, Money>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReturnsView {
    pub count: u64,
    /// Refunded in the loyalty currency.
    pub total: Money,
    pub last_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoyaltyView {
    pub points_balance: i64,
    pub points_pending: i64,
    pub tier: String,
    pub tier_since: Option<String>,
    pub tier_review_at: Option<String>,
    pub rolling_spend: Money,
    /// `null` in the top tier.
    pub next_tier: Option<NextTierView>,
    pub lots: Vec<LotView>,
    pub pending: Vec<PendingView>,
    /// The points of the lots that expire first; `null` when none expire.
    pub expiring_next: Option<ExpiringView>,
    /// Most recent first.
    pub tier_history: Vec<TierChangeView>,
    pub shortfall: i64,
    pub earned_total: i64,
    pub redeemed_total: i64,
    pub expired_total: i64,
    pub reversed_total: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NextTierView {
    pub name: String,
    pub threshold: Money,
    pub spend_needed: Money,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LotView {
    pub points: i64,
    pub earned_at: String,
    pub expires_at: Option<String>,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PendingView {
    pub points: i64,
    pub earned_at: String,
    pub available_at: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExpiringView {
    pub points: i64,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TierChangeView {
    pub at: String,
    pub from: Option<String>,
    pub to: String,
    /// `up`, `down` or `initial`.
    pub direction: String,
    pub rolling_spend: Money,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetentionView {
    /// `new`, `active` or `lapsed`.
    pub state: String,
    /// Whole days since the last purchase; `null` without one.
    pub recency_days: Option<i64>,
    pub frequency: u64,
    /// Spend net of returns, loyalty currency.
    pub monetary: Money,
    /// Mean days between purchases, one decimal; `null` below two purchases.
    pub mean_gap_days: Option<f64>,
    /// 0..=100; `null` for a customer without a purchase.
    pub churn_risk: Option<i64>,
    /// Why the customer lapsed.
    pub reason: Option<String>,
    pub lapsed_at: Option<String>,
    pub lapse_due_at: Option<String>,
    pub winback_offered: bool,
    pub lapse_count: u32,
    pub reactivated_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TimelineView {
    pub at: String,
    pub channel: String,
    #[serde(rename = "type")]
    pub entry_type: String,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SupportView {
    pub open_tickets: Vec<String>,
    pub opened: u64,
    pub resolved: u64,
    /// Mean satisfaction (1..=5) with two decimals; `null` without a score.
    pub satisfaction_mean: Option<f64>,
    pub satisfaction_count: u64,
    pub last_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EmailView {
    pub sent: u64,
    pub opened: u64,
    pub clicked: u64,
    pub last_campaign: Option<String>,
    pub last_engaged_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BrowsingView {
    pub views: u64,
    pub cart_adds: u64,
    pub cart_removes: u64,
    pub last_viewed_category: Option<String>,
    pub last_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VisitsView {
    pub count: u64,
    pub last_at: Option<String>,
    pub last_store_id: Option<String>,
}

/// What `crm.query.customer` answers for a customer: the [`CustomerView`] plus the `value`
/// block scored under the published model and the `next_best_actions` (see
/// [`crate::value::live`]). A tombstone's reply is small (its blocks are empty); the query
/// responder follows its `merged_into` and answers with the survivor's reply, naming the
/// customer asked for in `requested_customer_id` (and `merged_into` then says where that
/// customer went: the survivor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerReply {
    /// Present only on a survivor's reply to a query that named a merged customer: that
    /// customer's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_customer_id: Option<String>,
    #[serde(flatten)]
    pub view: CustomerView,
    /// Customer value under the published model, tagged by `status`.
    pub value: ValueBlock,
    /// What to do next, best first, each with its reason.
    pub next_best_actions: Vec<NextBestAction>,
}

impl CustomerReply {
    /// The reply for `state` as of `as_of_ms` (raised to the customer's clock).
    pub fn of(
        state: &CustomerState,
        as_of_ms: i64,
        rules: &Rules,
        value_model: Option<&ValueModel>,
    ) -> Self {
        // The view settles the time rules due by `as_of_ms`; the value block stays as the
        // model's rescore left it (scored as of the model's day, like the offline fit).
        let view = CustomerView::of(state, as_of_ms, rules);
        let value = live::value_block(state, value_model);
        let next_best_actions = live::next_best_actions(state, &value, rules, as_of_ms);
        CustomerReply {
            requested_customer_id: None,
            view,
            value,
            next_best_actions,
        }
    }
}

/// [`CustomerReply::of`] as JSON: what `crm.query.customer` answers.
pub fn full_view(
    state: &CustomerState,
    as_of_ms: i64,
    rules: &Rules,
    value_model: Option<&ValueModel>,
) -> Value {
    // Every field is a string, number, bool, map with string keys or list: cannot fail.
    serde_json::to_value(CustomerReply::of(state, as_of_ms, rules, value_model))
        .unwrap_or(Value::Null)
}

/// [`CustomerView::of`] as JSON.
pub fn customer_view(state: &CustomerState, as_of_ms: i64, rules: &Rules) -> Value {
    // Every field is a string, number, bool, map with string keys or list: cannot fail.
    serde_json::to_value(CustomerView::of(state, as_of_ms, rules)).unwrap_or(Value::Null)
}

impl CustomerView {
    /// The view of `state` as of `as_of_ms` (raised to the customer's clock), with the
    /// time rules due by then shown as done (a redeem would run them first).
    pub fn of(state: &CustomerState, as_of_ms: i64, rules: &Rules) -> CustomerView {
        let state = &*crate::apply::settled_as_of(state, as_of_ms, rules);
        let as_of = if state.exists() {
            as_of_ms.max(state.clock_ms)
        } else {
            as_of_ms
        };
        let mut identities: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for identity in &state.identities {
            identities
                .entry(identity.kind.as_str().to_string())
                .or_default()
                .push(identity.value.clone());
        }
        CustomerView {
            v: VIEW_VERSION,
            customer_id: state.customer_id.clone(),
            exists: state.exists(),
            created_at: format_optional(state.created_at_ms),
            as_of: format_rfc3339(as_of),
            rules_version: state.rules_version,
            identities,
            profile: state
                .profile
                .iter()
                .map(|(key, value)| (key.clone(), value.value.clone()))
                .collect(),
            consents: state
                .consents
                .iter()
                .map(|(purpose, consent)| {
                    let view = ConsentView {
                        granted: consent.granted,
                        at: format_rfc3339(consent.at_ms),
                        channel: consent.channel.clone(),
                    };
                    (purpose.clone(), view)
                })
                .collect(),
            channels: state
                .channels
                .iter()
                .map(|(channel, activity)| {
                    let view = ChannelView {
                        events: activity.events,
                        first_at: format_rfc3339(activity.first_at_ms),
                        last_at: format_rfc3339(activity.last_at_ms),
                    };
                    (channel.clone(), view)
                })
                .collect(),
            purchases: PurchasesView::of(&state.purchases),
            returns: ReturnsView {
                count: state.returns.count,
                total: Money(state.returns.total_minor),
                last_at: format_optional(state.returns.last_at_ms),
            },
            loyalty: LoyaltyView::of(&state.loyalty, rules, as_of),
            retention: RetentionView::of(state, rules, as_of),
            timeline: state
                .timeline
                .iter()
                .rev()
                .map(|entry| TimelineView {
                    at: format_rfc3339(entry.at_ms),
                    channel: entry.channel.clone(),
                    entry_type: entry.entry_type.clone(),
                    summary: entry.summary.clone(),
                })
                .collect(),
            support: SupportView::of(state),
            email: EmailView {
                sent: state.email.sent,
                opened: state.email.opened,
                clicked: state.email.clicked,
                last_campaign: state.email.last_campaign.clone(),
                last_engaged_at: format_optional(state.email.last_engaged_at_ms),
            },
            browsing: BrowsingView {
                views: state.browsing.views,
                cart_adds: state.browsing.cart_adds,
                cart_removes: state.browsing.cart_removes,
                last_viewed_category: state.browsing.last_viewed_category.clone(),
                last_at: format_optional(state.browsing.last_at_ms),
            },
            visits: VisitsView {
                count: state.visits.count,
                last_at: format_optional(state.visits.last_at_ms),
                last_store_id: state.visits.last_store_id.clone(),
            },
            merged_into: state.merge.merged_into.clone(),
            merged_at: format_optional(state.merge.merged_at_ms),
            merged_from: state
                .merge
                .merged_from
                .iter()
                .map(|merged| MergedFromView {
                    customer_id: merged.customer_id.clone(),
                    merged_at: format_rfc3339(merged.at_ms),
                    cause_event_id: merged.cause_event_id.clone(),
                })
                .collect(),
            awaiting_merges: state.merge.awaiting.iter().cloned().collect(),
            held_commands: state.merge.held.len() as u64,
        }
    }
}

impl PurchasesView {
    fn of(purchases: &PurchaseSummary) -> PurchasesView {
        let average_order_value = (purchases.count_in_currency > 0)
            .then(|| Money(purchases.total_spend_minor / purchases.count_in_currency as i64));
        PurchasesView {
            count: purchases.count,
            total_spend: Money(purchases.total_spend_minor),
            first_at: format_optional(purchases.first_at_ms),
            last_at: format_optional(purchases.last_at_ms),
            average_order_value,
            by_channel: money_map(&purchases.by_channel_minor),
            by_category: money_map(&purchases.by_category_minor),
        }
    }
}

impl LoyaltyView {
    fn of(lo: &Loyalty, rules: &Rules, as_of: i64) -> LoyaltyView {
        let tier_index = loyalty::tier_index(lo, rules);
        let rolling_spend = loyalty::rolling_spend(lo, rules, as_of);
        let next_tier = rules.tiers.get(tier_index + 1).map(|tier| NextTierView {
            name: tier.name.clone(),
            threshold: Money(tier.threshold_minor),
            spend_needed: Money((tier.threshold_minor - rolling_spend).max(0)),
        });
        let next_expiry = lo.lots.iter().filter_map(|l| l.expires_at_ms).min();
        let expiring_next = next_expiry.map(|at| ExpiringView {
            points: lo
                .lots
                .iter()
                .filter(|l| l.expires_at_ms == Some(at))
                .map(|l| l.points)
                .sum(),
            at: format_rfc3339(at),
        });
        LoyaltyView {
            points_balance: lo.balance(),
            points_pending: lo.pending_points(),
            tier: lo
                .tier
                .clone()
                .unwrap_or_else(|| rules.tiers[0].name.clone()),
            tier_since: format_optional(lo.tier_since_ms),
            tier_review_at: format_optional(lo.tier_review_at_ms),
            rolling_spend: Money(rolling_spend),
            next_tier,
            lots: lo
                .lots
                .iter()
                .map(|lot| LotView {
                    points: lot.points,
                    earned_at: format_rfc3339(lot.earned_at_ms),
                    expires_at: format_optional(lot.expires_at_ms),
                    source: lot.source.clone(),
                })
                .collect(),
            pending: lo
                .pending
                .iter()
                .map(|p| PendingView {
                    points: p.points,
                    earned_at: format_rfc3339(p.earned_at_ms),
                    available_at: format_rfc3339(p.release_at_ms),
                    source: p.source.clone(),
                })
                .collect(),
            expiring_next,
            tier_history: lo
                .tier_history
                .iter()
                .rev()
                .map(|change| TierChangeView {
                    at: format_rfc3339(change.at_ms),
                    from: change.from.clone(),
                    to: change.to.clone(),
                    direction: change.direction.clone(),
                    rolling_spend: Money(change.rolling_spend_minor),
                })
                .collect(),
            shortfall: lo.shortfall_points,
            earned_total: lo.earned_total,
            redeemed_total: lo.redeemed_total,
            expired_total: lo.expired_total,
            reversed_total: lo.reversed_total,
        }
    }
}

impl RetentionView {
    fn of(state: &CustomerState, rules: &Rules, as_of: i64) -> RetentionView {
        let ret = &state.retention;
        let last_purchase = ret.last_purchase_ms();
        let churn_risk = match ret.status {
            RetentionStatus::New => None,
            RetentionStatus::Lapsed => Some(100),
            RetentionStatus::Active => {
                let threshold = retention::lapse_after_ms(ret, rules).max(1);
                let since = last_purchase.map_or(0, |last| (as_of - last).max(0));
                let risk = (i128::from(since) * 100 / i128::from(threshold)).min(100);
                Some(i64::try_from(risk).unwrap_or(100))
            }
        };
        let lapsed = ret.status == RetentionStatus::Lapsed;
        RetentionView {
            state: ret.status.as_str().to_string(),
            recency_days: last_purchase.map(|last| (as_of - last).max(0) / DAY_MS),
            frequency: state.purchases.count,
            monetary: Money(state.purchases.total_spend_minor - state.returns.total_minor),
            mean_gap_days: ret.mean_gap_ms().map(days_decimal),
            churn_risk,
            reason: ret.lapse_reason.clone(),
            lapsed_at: format_optional(if lapsed { ret.lapsed_at_ms } else { None }),
            lapse_due_at: format_optional(ret.lapse_due_ms),
            winback_offered: lapsed && ret.winback_offered,
            lapse_count: ret.lapse_count,
            reactivated_count: ret.reactivated_count,
        }
    }
}

impl SupportView {
    fn of(state: &CustomerState) -> SupportView {
        let support = &state.support;
        let satisfaction_mean = (support.satisfaction_sum * 100)
            .checked_div(support.satisfaction_count)
            .map(|hundredths| hundredths as f64 / 100.0);
        SupportView {
            open_tickets: support.open_tickets.iter().cloned().collect(),
            opened: support.opened,
            resolved: support.resolved,
            satisfaction_mean,
            satisfaction_count: support.satisfaction_count,
            last_at: format_optional(support.last_at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::apply;
    use crate::identity::{Identity, IdentityKind};
    use crate::ingest::{ChannelEvent, EventKind, LineItem, Purchase};
    use crate::shard_message::CustomerCommand;
    use crate::time::parse_rfc3339_ms;

    #[test]
    fn the_view_never_counts_recency_from_before_the_customers_clock() {
        let rules = Rules::from_toml_str(crate::rules::tests::SHIPPED).unwrap();
        let at = parse_rfc3339_ms("2026-03-01T10:00:00Z").unwrap();
        let mut state = CustomerState::new("c1");
        let command = CustomerCommand::Event {
            event: ChannelEvent {
                event_id: "e1".to_string(),
                channel: "app".to_string(),
                occurred_at_ms: at,
                identities: vec![Identity::normalise(IdentityKind::Email, "a@b.c").unwrap()],
                kind: EventKind::Purchase(Purchase {
                    order_id: "o1".to_string(),
                    amount_minor: 10_000,
                    currency: "EUR".to_string(),
                    items: vec![LineItem {
                        sku: "s1".to_string(),
                        category: "shoes".to_string(),
                        qty: 1,
                        price_minor: 4_000,
                    }],
                    store_id: None,
                }),
            },
            conflict: None,
        };
        apply(&mut state, &command, &rules);
        let view = customer_view(&state, at - 10 * DAY_MS, &rules);
        assert_eq!(view["as_of"], "2026-03-01T10:00:00Z");
        assert_eq!(view["retention"]["recency_days"], 0);
        // 40 x 2.0 + 60 = 140, x 1.5 (app) = 210, + 100 first-purchase bonus, pending 14 days.
        assert_eq!(view["loyalty"]["points_pending"], 310);
        assert_eq!(view["loyalty"]["points_balance"], 0);
        assert_eq!(view["loyalty"]["tier"], "member");
        assert_eq!(
            view["loyalty"]["next_tier"]["spend_needed"],
            serde_json::json!(400.0)
        );
    }

    #[test]
    fn a_tombstones_reply_is_small_and_says_where_the_customer_went() {
        let rules = Rules::from_toml_str(crate::rules::tests::SHIPPED).unwrap();
        let mut state = CustomerState::new("b");
        state.created_at_ms = Some(5);
        state.merge.merged_into = Some("a".to_string());
        state.merge.merged_at_ms = Some(7);
        let reply = serde_json::to_value(CustomerReply::of(&state, 10, &rules, None)).unwrap();
        assert_eq!(reply["merged_into"], "a");
        assert_eq!(reply["merged_at"], "1970-01-01T00:00:00.007Z");
        assert_eq!(reply["exists"], true);
        assert_eq!(reply["purchases"]["count"], 0);
        assert!(reply.get("requested_customer_id").is_none());
        assert!(reply.to_string().len() < 2_000, "{reply}");

        let mut survivor = CustomerState::new("a");
        survivor.created_at_ms = Some(1);
        survivor.merge.merged_from.push(crate::state::MergedFrom {
            customer_id: "b".to_string(),
            at_ms: 7,
            cause_event_id: "e9".to_string(),
        });
        survivor.merge.awaiting.insert("c".to_string());
        let view = customer_view(&survivor, 10, &rules);
        assert_eq!(view["merged_into"], Value::Null);
        assert_eq!(view["merged_from"][0]["customer_id"], "b");
        assert_eq!(view["merged_from"][0]["cause_event_id"], "e9");
        assert_eq!(view["awaiting_merges"], serde_json::json!(["c"]));
        assert_eq!(view["held_commands"], 0);
        let schema = serde_json::to_value(schemars::schema_for!(CustomerReply)).unwrap();
        assert!(
            schema.to_string().contains("requested_customer_id"),
            "{schema}"
        );
        assert!(schema.to_string().contains("awaiting_merges"), "{schema}");
    }

    #[test]
    fn the_view_json_reads_back_into_the_typed_view_and_has_a_schema() {
        let rules = Rules::from_toml_str(crate::rules::tests::SHIPPED).unwrap();
        let mut state = CustomerState::new("c1");
        let json = customer_view(&state, 0, &rules);
        assert_eq!(json["created_at"], Value::Null, "absent times are null");
        assert_eq!(json["purchases"]["average_order_value"], Value::Null);
        assert_eq!(json["loyalty"]["next_tier"]["name"], "silver");
        state.created_at_ms = Some(5);
        let view = CustomerView::of(&state, 10, &rules);
        let back: CustomerView = serde_json::from_value(serde_json::to_value(&view).unwrap())
            .expect("the view reads back");
        assert_eq!(back, view);
        let schema = serde_json::to_value(schemars::schema_for!(CustomerView)).unwrap();
        assert!(schema["properties"]["loyalty"].is_object(), "{schema}");
    }
}
