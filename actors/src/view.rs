//! The public 360 view (`"v": 1`): one customer's state rendered as JSON for store
//! associates, call-center agents and web apps.
//!
//! The query responder calls [`customer_view`] with the stored state, the shard's rule clock
//! as `as_of_ms` and the current rules. The field names are a public contract documented in
//! `docs/rules.md`: add fields, never rename or remove them. Money is a JSON decimal, times
//! are RFC 3339, points are integers. Rendering is read-only: it never changes the state,
//! and recency is computed from `as_of_ms` (never earlier than the customer's own clock),
//! never from the wall clock.

use crate::emit::optional_time;
use crate::loyalty;
use crate::money::to_decimal;
use crate::retention;
use crate::rules::Rules;
use crate::state::{CustomerState, RetentionStatus};
use crate::time::{format_rfc3339, DAY_MS};
use crate::value::live::{self, ValueModel};
use serde_json::{json, Map, Value};

/// The view format version.
pub const VIEW_VERSION: u64 = 1;

fn money_map(map: &std::collections::BTreeMap<String, i64>) -> Value {
    Value::Object(
        map.iter()
            .map(|(key, minor)| (key.clone(), to_decimal(*minor)))
            .collect(),
    )
}

/// Days with one decimal, from ms.
fn days_decimal(ms: i64) -> Value {
    let tenths = ms * 10 / DAY_MS;
    serde_json::Number::from_f64(tenths as f64 / 10.0).map_or(Value::Null, Value::Number)
}

/// Renders the 360 view of `state` as of `as_of_ms` (raised to the customer's clock).
/// What `crm.query.customer` answers: [`customer_view`] plus the `value` block scored under
/// `value_model` and the `next_best_actions` (see [`crate::value::live`]).
pub fn full_view(
    state: &CustomerState,
    as_of_ms: i64,
    rules: &Rules,
    value_model: Option<&ValueModel>,
) -> Value {
    // `customer_view` settles the time rules due by `as_of_ms`; the value block stays as
    // the model's rescore left it (scored as of the model's day, like the offline fit).
    let mut view = customer_view(state, as_of_ms, rules);
    let value = live::value_block(state, value_model);
    let actions = live::next_best_actions(state, &value, rules, as_of_ms);
    if let Some(object) = view.as_object_mut() {
        object.insert("value".to_string(), value);
        object.insert("next_best_actions".to_string(), actions.into());
    }
    view
}

pub fn customer_view(state: &CustomerState, as_of_ms: i64, rules: &Rules) -> Value {
    // Time rules due by `as_of` are shown as done (a redeem would run them first).
    let state = &*crate::apply::settled_as_of(state, as_of_ms, rules);
    let as_of = if state.exists() {
        as_of_ms.max(state.clock_ms)
    } else {
        as_of_ms
    };

    let mut identities: Map<String, Value> = Map::new();
    for identity in &state.identities {
        if let Value::Array(list) = identities
            .entry(identity.kind.as_str())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(json!(identity.value));
        }
    }

    let profile: Map<String, Value> = state
        .profile
        .iter()
        .map(|(key, value)| (key.clone(), json!(value.value)))
        .collect();
    let consents: Map<String, Value> = state
        .consents
        .iter()
        .map(|(purpose, consent)| {
            (
                purpose.clone(),
                json!({"granted": consent.granted, "at": format_rfc3339(consent.at_ms), "channel": consent.channel}),
            )
        })
        .collect();
    let channels: Map<String, Value> = state
        .channels
        .iter()
        .map(|(channel, activity)| {
            (
                channel.clone(),
                json!({
                    "events": activity.events,
                    "first_at": format_rfc3339(activity.first_at_ms),
                    "last_at": format_rfc3339(activity.last_at_ms),
                }),
            )
        })
        .collect();

    let purchases = &state.purchases;
    let average_order_value = if purchases.count_in_currency > 0 {
        to_decimal(purchases.total_spend_minor / purchases.count_in_currency as i64)
    } else {
        Value::Null
    };

    let lo = &state.loyalty;
    let tier_index = loyalty::tier_index(lo, rules);
    let rolling_spend = loyalty::rolling_spend(lo, rules, as_of);
    let next_tier = rules.tiers.get(tier_index + 1).map(|tier| {
        json!({
            "name": tier.name,
            "threshold": to_decimal(tier.threshold_minor),
            "spend_needed": to_decimal((tier.threshold_minor - rolling_spend).max(0)),
        })
    });
    let next_expiry = lo.lots.iter().filter_map(|l| l.expires_at_ms).min();
    let expiring_next = next_expiry.map(|at| {
        let points: i64 = lo
            .lots
            .iter()
            .filter(|l| l.expires_at_ms == Some(at))
            .map(|l| l.points)
            .sum();
        json!({"points": points, "at": format_rfc3339(at)})
    });

    let ret = &state.retention;
    let last_purchase = ret.last_purchase_ms();
    let recency_days = last_purchase.map(|last| (as_of - last).max(0) / DAY_MS);
    let churn_risk = match ret.status {
        RetentionStatus::New => Value::Null,
        RetentionStatus::Lapsed => json!(100),
        RetentionStatus::Active => {
            let threshold = retention::lapse_after_ms(ret, rules).max(1);
            let since = last_purchase.map_or(0, |last| (as_of - last).max(0));
            json!((i128::from(since) * 100 / i128::from(threshold)).min(100))
        }
    };
    let support = &state.support;
    let satisfaction_mean =
        match (support.satisfaction_sum * 100).checked_div(support.satisfaction_count) {
            Some(hundredths) => serde_json::Number::from_f64(hundredths as f64 / 100.0)
                .map_or(Value::Null, Value::Number),
            None => Value::Null,
        };

    json!({
        "v": VIEW_VERSION,
        "customer_id": state.customer_id,
        "exists": state.exists(),
        "created_at": optional_time(state.created_at_ms),
        "as_of": format_rfc3339(as_of),
        "rules_version": state.rules_version,
        "identities": identities,
        "profile": profile,
        "consents": consents,
        "channels": channels,
        "purchases": {
            "count": purchases.count,
            "total_spend": to_decimal(purchases.total_spend_minor),
            "first_at": optional_time(purchases.first_at_ms),
            "last_at": optional_time(purchases.last_at_ms),
            "average_order_value": average_order_value,
            "by_channel": money_map(&purchases.by_channel_minor),
            "by_category": money_map(&purchases.by_category_minor),
        },
        "returns": {
            "count": state.returns.count,
            "total": to_decimal(state.returns.total_minor),
            "last_at": optional_time(state.returns.last_at_ms),
        },
        "loyalty": {
            "points_balance": lo.balance(),
            "points_pending": lo.pending_points(),
            "tier": lo.tier.clone().unwrap_or_else(|| rules.tiers[0].name.clone()),
            "tier_since": optional_time(lo.tier_since_ms),
            "tier_review_at": optional_time(lo.tier_review_at_ms),
            "rolling_spend": to_decimal(rolling_spend),
            "next_tier": next_tier,
            "lots": lo.lots.iter().map(|lot| json!({
                "points": lot.points,
                "earned_at": format_rfc3339(lot.earned_at_ms),
                "expires_at": optional_time(lot.expires_at_ms),
                "source": lot.source,
            })).collect::<Vec<_>>(),
            "pending": lo.pending.iter().map(|p| json!({
                "points": p.points,
                "earned_at": format_rfc3339(p.earned_at_ms),
                "available_at": format_rfc3339(p.release_at_ms),
                "source": p.source,
            })).collect::<Vec<_>>(),
            "expiring_next": expiring_next,
            "tier_history": lo.tier_history.iter().rev().map(|change| json!({
                "at": format_rfc3339(change.at_ms),
                "from": change.from,
                "to": change.to,
                "direction": change.direction,
                "rolling_spend": to_decimal(change.rolling_spend_minor),
            })).collect::<Vec<_>>(),
            "shortfall": lo.shortfall_points,
            "earned_total": lo.earned_total,
            "redeemed_total": lo.redeemed_total,
            "expired_total": lo.expired_total,
            "reversed_total": lo.reversed_total,
        },
        "retention": {
            "state": ret.status.as_str(),
            "recency_days": recency_days,
            "frequency": purchases.count,
            "monetary": to_decimal(purchases.total_spend_minor - state.returns.total_minor),
            "mean_gap_days": ret.mean_gap_ms().map_or(Value::Null, days_decimal),
            "churn_risk": churn_risk,
            "reason": ret.lapse_reason,
            "lapsed_at": optional_time(if ret.status == RetentionStatus::Lapsed { ret.lapsed_at_ms } else { None }),
            "lapse_due_at": optional_time(ret.lapse_due_ms),
            "winback_offered": ret.status == RetentionStatus::Lapsed && ret.winback_offered,
            "lapse_count": ret.lapse_count,
            "reactivated_count": ret.reactivated_count,
        },
        "timeline": state.timeline.iter().rev().map(|entry| json!({
            "at": format_rfc3339(entry.at_ms),
            "channel": entry.channel,
            "type": entry.entry_type,
            "summary": entry.summary,
        })).collect::<Vec<_>>(),
        "support": {
            "open_tickets": support.open_tickets.iter().collect::<Vec<_>>(),
            "opened": support.opened,
            "resolved": support.resolved,
            "satisfaction_mean": satisfaction_mean,
            "satisfaction_count": support.satisfaction_count,
            "last_at": optional_time(support.last_at_ms),
        },
        "email": {
            "sent": state.email.sent,
            "opened": state.email.opened,
            "clicked": state.email.clicked,
            "last_campaign": state.email.last_campaign,
            "last_engaged_at": optional_time(state.email.last_engaged_at_ms),
        },
        "browsing": {
            "views": state.browsing.views,
            "cart_adds": state.browsing.cart_adds,
            "cart_removes": state.browsing.cart_removes,
            "last_viewed_category": state.browsing.last_viewed_category,
            "last_at": optional_time(state.browsing.last_at_ms),
        },
        "visits": {
            "count": state.visits.count,
            "last_at": optional_time(state.visits.last_at_ms),
            "last_store_id": state.visits.last_store_id,
        },
    })
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
}
