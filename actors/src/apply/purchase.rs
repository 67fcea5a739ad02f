//! Purchases and returns: orders recorded (and deduplicated by order id), spend and value
//! history counted in the loyalty currency, points granted or taken back pro rata, the
//! retention clock and tier upgrades. Called by [`super::event::apply_event`]; returns
//! the timeline summary.

use super::event::bounded_key;
use crate::actor_event::{EarnReason, PointsReversed};
use crate::emit::Emitter;
use crate::ingest::{ChannelEvent, Purchase, Return};
use crate::loyalty::{self, Grant};
use crate::money::Money;
use crate::retention;
use crate::rules::Rules;
use crate::state::{CustomerState, OrderRecord};

pub(super) fn apply_purchase(
    state: &mut CustomerState,
    event: &ChannelEvent,
    purchase: &Purchase,
    rules: &Rules,
    emitter: &mut Emitter,
) -> String {
    let at = event.occurred_at_ms;
    let now = state.clock_ms;
    let in_loyalty_currency = purchase.currency == rules.currency;
    let base_points = loyalty::order_points(rules, &event.channel, purchase);
    let bonus_points = if !state.loyalty.first_purchase_bonus_granted && in_loyalty_currency {
        state.loyalty.first_purchase_bonus_granted = true;
        rules.earning.first_purchase_bonus_points
    } else {
        0
    };
    let points = base_points.saturating_add(bonus_points);

    state.orders.insert(
        purchase.order_id.clone(),
        OrderRecord {
            at_ms: at,
            amount_minor: purchase.amount_minor,
            currency: purchase.currency.clone(),
            channel: event.channel.clone(),
            points_granted: points,
            points_reversed: 0,
            returned_minor: 0,
            points_expired: 0,
            applied_n: state.purchases.count,
        },
    );
    // Dropped by application order, not order time: a late order older than every kept
    // one still guards its order id for the next `orders_max` purchases.
    while state.orders.len() > rules.limits.orders_max {
        let oldest = state
            .orders
            .iter()
            .min_by_key(|(_, o)| o.applied_n)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => state.orders.remove(&id),
            None => break,
        };
    }

    let summary = &mut state.purchases;
    summary.count += 1;
    summary.first_at_ms = Some(summary.first_at_ms.map_or(at, |f| f.min(at)));
    summary.last_at_ms = Some(summary.last_at_ms.map_or(at, |l| l.max(at)));
    if in_loyalty_currency {
        summary.count_in_currency += 1;
        summary.total_spend_minor = summary
            .total_spend_minor
            .saturating_add(purchase.amount_minor);
        let channel = bounded_key(
            &summary.by_channel_minor,
            &event.channel,
            rules.limits.channels_max,
        );
        let channel_total = summary.by_channel_minor.entry(channel).or_insert(0);
        *channel_total = channel_total.saturating_add(purchase.amount_minor);
        for (category, amount) in loyalty::category_split(purchase) {
            let category = bounded_key(
                &summary.by_category_minor,
                &category,
                rules.limits.categories_max,
            );
            let category_total = summary.by_category_minor.entry(category).or_insert(0);
            *category_total = category_total.saturating_add(amount);
        }
        loyalty::record_spend(&mut state.loyalty, at, purchase.amount_minor);
        crate::value::live::record_purchase_day(
            &mut state.value,
            at,
            purchase.amount_minor,
            rules.limits.purchase_days_max,
        );
    }

    if points > 0 {
        let reason = EarnReason::Purchase {
            order_id: purchase.order_id.clone(),
            base_points,
            bonus_points,
            amount: Money(purchase.amount_minor),
            channel: event.channel.clone(),
        };
        loyalty::grant(
            &mut state.loyalty,
            rules,
            Grant {
                source: &purchase.order_id,
                earned_at_ms: at,
                points,
                pending_allowed: true,
            },
            now,
            emitter,
            reason,
        );
    }
    retention::record_purchase(
        &mut state.retention,
        rules,
        at,
        now,
        &purchase.order_id,
        emitter,
    );
    loyalty::upgrade_if_qualified(&mut state.loyalty, rules, now, emitter);

    let items: u64 = purchase.items.iter().map(|i| u64::from(i.qty)).sum();
    let mut text = format!(
        "order {}: {} {}",
        purchase.order_id,
        Money(purchase.amount_minor),
        purchase.currency
    );
    if items > 0 {
        text.push_str(&format!(
            ", {items} item{}",
            if items == 1 { "" } else { "s" }
        ));
    }
    if points > 0 {
        text.push_str(&format!(", +{points} points"));
    }
    text
}

pub(super) fn apply_return(
    state: &mut CustomerState,
    event: &ChannelEvent,
    ret: &Return,
    rules: &Rules,
    emitter: &mut Emitter,
) -> String {
    let now = state.clock_ms;
    let Some(order) = state.orders.get_mut(&ret.order_id) else {
        // check_event refused unknown orders; nothing to do.
        return format!("return for unknown order {}", ret.order_id);
    };
    let returned = order.returned_minor + ret.amount_minor;
    let target = i64::try_from(
        i128::from(order.points_granted) * i128::from(returned)
            / i128::from(order.amount_minor.max(1)),
    )
    .unwrap_or(order.points_granted)
    .min(order.points_granted);
    let to_reverse = (target - order.points_reversed).max(0);
    order.points_reversed += to_reverse;
    order.returned_minor = returned;
    let order_expired = order.points_expired;
    let order_at = order.at_ms;
    let counts_for_spend = order.currency == rules.currency;
    let fully_returned = returned >= order.amount_minor;

    state.returns.count += 1;
    state.returns.last_at_ms = state.returns.last_at_ms.max(Some(event.occurred_at_ms));
    if counts_for_spend {
        // A refund in another currency cannot be netted against spend in this one.
        state.returns.total_minor = state.returns.total_minor.saturating_add(ret.amount_minor);
        loyalty::record_spend(&mut state.loyalty, order_at, -ret.amount_minor);
    }

    if to_reverse > 0 {
        let taken =
            loyalty::take_back(&mut state.loyalty, &ret.order_id, to_reverse, order_expired);
        let (from_pending, from_balance) = (taken.from_pending, taken.from_balance);
        if let Some(order) = state.orders.get_mut(&ret.order_id) {
            order.points_expired -= taken.from_expired;
        }
        let shortfall = to_reverse - from_pending - from_balance - taken.from_expired;
        state.loyalty.shortfall_points = state.loyalty.shortfall_points.saturating_add(shortfall);
        state.loyalty.reversed_total = state
            .loyalty
            .reversed_total
            .saturating_add(from_pending + from_balance);
        emitter.emit(
            now,
            PointsReversed {
                order_id: ret.order_id.clone(),
                return_amount: Money(ret.amount_minor),
                points: to_reverse,
                from_pending,
                from_balance,
                from_expired: taken.from_expired,
                shortfall,
                points_balance: state.loyalty.balance(),
                points_pending: state.loyalty.pending_points(),
            },
        );
    }
    let mut text = format!(
        "return for order {}: {}{}",
        ret.order_id,
        Money(ret.amount_minor),
        if fully_returned {
            " (fully returned)"
        } else {
            ""
        }
    );
    if to_reverse > 0 {
        text.push_str(&format!(", -{to_reverse} points"));
    }
    text
}
