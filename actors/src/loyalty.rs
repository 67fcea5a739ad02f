//! The loyalty engine: points earned per order, pending points, expiring lots, returns that
//! take points back, redemption, and tiers on rolling net spend.
//!
//! [`crate::apply`] calls these functions while applying one command; they change the
//! [`Loyalty`] part of one customer's state and emit actor events through the
//! [`Emitter`]. All arithmetic is integer (minor units, basis points, ms; floors where a
//! fraction of a point appears), and every instant is an event time passed in by the caller:
//! this module never reads the wall clock, never fails, and never lets a balance go negative
//! (what a return cannot take back is recorded as a shortfall).

use crate::actor_event::{
    EarnReason, Landing, PointsEarned, PointsExpired, PointsReleased, TierChanged,
};
use crate::emit::Emitter;
use crate::ingest::Purchase;
use crate::money::{Money, MINOR_PER_MAJOR};
use crate::rules::{Rules, BASIS_POINTS_ONE};
use crate::state::{Loyalty, PendingPoints, PointsLot, TierChange};
use crate::time::{format_optional, format_rfc3339, DAY_MS};

/// Points an order earns before any bonus: each item line at its category multiplier, the
/// part of the amount not covered by items at 1.0x, all times the channel multiplier and
/// `points_per_currency_unit`, floored once at the end.
///
/// When the lines add up to more than the amount (an order-level discount), their weighted
/// value is scaled down to the amount.
pub fn order_points(rules: &Rules, channel: &str, purchase: &Purchase) -> i64 {
    if purchase.currency != rules.currency || purchase.amount_minor <= 0 {
        return 0;
    }
    let amount = i128::from(purchase.amount_minor);
    let mut items_total: i128 = 0;
    let mut weighted: i128 = 0;
    for item in &purchase.items {
        let line = i128::from(item.qty) * i128::from(item.price_minor.max(0));
        let multiplier = rules
            .earning
            .category_multiplier_basis_points
            .get(&item.category)
            .copied()
            .unwrap_or(BASIS_POINTS_ONE);
        items_total += line;
        weighted += line * i128::from(multiplier);
    }
    // `scaled` is minor units x basis points.
    let scaled = if items_total == 0 {
        amount * i128::from(BASIS_POINTS_ONE)
    } else if items_total <= amount {
        weighted + (amount - items_total) * i128::from(BASIS_POINTS_ONE)
    } else {
        weighted * amount / items_total
    };
    let channel_multiplier = rules
        .earning
        .channel_multiplier_basis_points
        .get(channel)
        .copied()
        .unwrap_or(BASIS_POINTS_ONE);
    let points = scaled
        * i128::from(channel_multiplier)
        * i128::from(rules.earning.points_per_currency_unit)
        / (i128::from(BASIS_POINTS_ONE)
            * i128::from(BASIS_POINTS_ONE)
            * i128::from(MINOR_PER_MAJOR));
    i64::try_from(points).unwrap_or(i64::MAX)
}

/// Spend per category for an order: item lines (scaled down to the amount when they exceed
/// it), the uncovered rest as `uncategorised`.
pub fn category_split(purchase: &Purchase) -> Vec<(String, i64)> {
    let amount = purchase.amount_minor;
    let lines: Vec<(String, i64)> = purchase
        .items
        .iter()
        .map(|i| {
            (
                i.category.clone(),
                i64::from(i.qty).saturating_mul(i.price_minor.max(0)),
            )
        })
        .collect();
    let items_total: i64 = lines.iter().map(|(_, v)| *v).fold(0, i64::saturating_add);
    let mut split = Vec::with_capacity(lines.len() + 1);
    if items_total <= amount {
        split.extend(lines.into_iter().filter(|(_, v)| *v > 0));
        if amount > items_total {
            split.push(("uncategorised".to_string(), amount - items_total));
        }
    } else {
        let mut assigned = 0;
        let count = lines.len();
        for (index, (category, value)) in lines.into_iter().enumerate() {
            let share = if index + 1 == count {
                amount - assigned
            } else {
                (i128::from(value) * i128::from(amount) / i128::from(items_total)) as i64
            };
            assigned += share;
            if share > 0 {
                split.push((category, share));
            }
        }
    }
    split
}

/// When a lot earned at `earned_at_ms` expires under `rules`.
pub fn expiry_for(rules: &Rules, earned_at_ms: i64) -> Option<i64> {
    (rules.expiry_days > 0).then(|| earned_at_ms.saturating_add(Rules::days_ms(rules.expiry_days)))
}

fn lot_key(lot: &PointsLot) -> (bool, i64, i64, &str) {
    (
        lot.expires_at_ms.is_none(),
        lot.expires_at_ms.unwrap_or(0),
        lot.earned_at_ms,
        lot.source.as_str(),
    )
}

/// Adds a spendable lot in expiry order. Beyond `lots_max`, the new points merge into the
/// latest-expiring lot (the customer keeps the later expiry).
pub fn add_lot(loyalty: &mut Loyalty, rules: &Rules, lot: PointsLot) {
    if lot.points <= 0 {
        return;
    }
    if let Some(same) = loyalty.lots.iter_mut().find(|l| {
        l.source == lot.source
            && l.expires_at_ms == lot.expires_at_ms
            && l.earned_at_ms == lot.earned_at_ms
    }) {
        same.points = same.points.saturating_add(lot.points);
        return;
    }
    if loyalty.lots.len() >= rules.limits.lots_max {
        if let Some(last) = loyalty.lots.pop() {
            let later_expiry = match (last.expires_at_ms, lot.expires_at_ms) {
                (None, _) | (_, None) => None,
                (Some(a), Some(b)) => Some(a.max(b)),
            };
            let merged = PointsLot {
                earned_at_ms: last.earned_at_ms.max(lot.earned_at_ms),
                expires_at_ms: later_expiry,
                points: last.points + lot.points,
                source: "merged".to_string(),
            };
            insert_lot(loyalty, merged);
            return;
        }
    }
    insert_lot(loyalty, lot);
}

fn insert_lot(loyalty: &mut Loyalty, lot: PointsLot) {
    let position = loyalty
        .lots
        .partition_point(|l| lot_key(l) <= lot_key(&lot));
    loyalty.lots.insert(position, lot);
}

/// Points to grant: who earned them, when, and whether they may wait in pending.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The order id, or `bonus:<kind>`.
    pub source: &'a str,
    pub earned_at_ms: i64,
    pub points: i64,
    /// Order points wait `pending_days`; bonuses for non-purchase actions do not.
    pub pending_allowed: bool,
}

/// Grants points: pending for `pending_days`, or a spendable lot at once. Emits
/// `points.earned` at `emit_at_ms` with the `reason` and the grant's fields. Returns whether
/// they went pending.
pub fn grant(
    loyalty: &mut Loyalty,
    rules: &Rules,
    grant: Grant<'_>,
    emit_at_ms: i64,
    emitter: &mut Emitter,
    reason: EarnReason,
) -> bool {
    let Grant {
        source,
        earned_at_ms,
        points,
        pending_allowed,
    } = grant;
    if points <= 0 {
        return false;
    }
    loyalty.earned_total = loyalty.earned_total.saturating_add(points);
    let pending = pending_allowed && rules.earning.pending_days > 0;
    let landing = if pending {
        let release_at_ms = earned_at_ms.saturating_add(Rules::days_ms(rules.earning.pending_days));
        let entry = PendingPoints {
            earned_at_ms,
            release_at_ms,
            points,
            source: source.to_string(),
        };
        let position = loyalty
            .pending
            .partition_point(|p| (p.release_at_ms, p.source.as_str()) <= (release_at_ms, source));
        loyalty.pending.insert(position, entry);
        Landing::Pending {
            available_at: format_rfc3339(release_at_ms),
        }
    } else {
        let expires_at_ms = expiry_for(rules, earned_at_ms);
        add_lot(
            loyalty,
            rules,
            PointsLot {
                earned_at_ms,
                expires_at_ms,
                points,
                source: source.to_string(),
            },
        );
        Landing::Spendable {
            expires_at: format_optional(expires_at_ms),
        }
    };
    emitter.emit(
        emit_at_ms,
        PointsEarned {
            reason,
            source: source.to_string(),
            points,
            pending,
            earned_at: format_rfc3339(earned_at_ms),
            landing,
            points_balance: loyalty.balance(),
            points_pending: loyalty.pending_points(),
        },
    );
    pending
}

/// Spends `points` from the lots, oldest expiry first. The caller checked the balance.
pub fn spend_oldest_first(loyalty: &mut Loyalty, points: i64) -> i64 {
    let mut left = points;
    for lot in loyalty.lots.iter_mut() {
        if left == 0 {
            break;
        }
        let take = lot.points.min(left);
        lot.points -= take;
        left -= take;
    }
    loyalty.lots.retain(|l| l.points > 0);
    points - left
}

/// Where the points a return takes back came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TakenBack {
    /// The order's own pending points.
    pub from_pending: i64,
    /// Spendable lots: the order's own first, then the others, earliest expiry first.
    pub from_balance: i64,
    /// Points of the order that had already expired: gone, so nothing is taken for them.
    pub from_expired: i64,
}

/// Takes back `points` of the order `source`: its pending points first, then its own
/// lots, then up to `expired` of its points that already expired (nothing left to take),
/// then the other lots, earliest expiry first. What none of these covers is the caller's
/// shortfall.
pub fn take_back(loyalty: &mut Loyalty, source: &str, points: i64, expired: i64) -> TakenBack {
    let mut left = points;
    let mut from_pending = 0;
    for entry in loyalty.pending.iter_mut().filter(|p| p.source == source) {
        let take = entry.points.min(left);
        entry.points -= take;
        left -= take;
        from_pending += take;
    }
    loyalty.pending.retain(|p| p.points > 0);
    let mut from_balance = 0;
    for lot in loyalty.lots.iter_mut().filter(|l| l.source == source) {
        let take = lot.points.min(left);
        lot.points -= take;
        left -= take;
        from_balance += take;
    }
    loyalty.lots.retain(|l| l.points > 0);
    let from_expired = expired.clamp(0, left);
    left -= from_expired;
    from_balance += spend_oldest_first(loyalty, left);
    TakenBack {
        from_pending,
        from_balance,
        from_expired,
    }
}

/// Moves pending points whose release time is at or before `now_ms` into lots.
pub fn release_due(loyalty: &mut Loyalty, rules: &Rules, now_ms: i64, emitter: &mut Emitter) {
    let due = loyalty
        .pending
        .partition_point(|p| p.release_at_ms <= now_ms);
    if due == 0 {
        return;
    }
    let released: Vec<PendingPoints> = loyalty.pending.drain(..due).collect();
    for entry in released {
        let expires_at_ms = expiry_for(rules, entry.earned_at_ms);
        add_lot(
            loyalty,
            rules,
            PointsLot {
                earned_at_ms: entry.earned_at_ms,
                expires_at_ms,
                points: entry.points,
                source: entry.source.clone(),
            },
        );
        emitter.emit(
            entry.release_at_ms,
            PointsReleased {
                source: entry.source,
                points: entry.points,
                earned_at: format_rfc3339(entry.earned_at_ms),
                expires_at: format_optional(expires_at_ms),
                points_balance: loyalty.balance(),
                points_pending: loyalty.pending_points(),
            },
        );
    }
}

/// Removes lots expired at or before `now_ms`; emits one `points.expired` for them.
pub fn expire_due(loyalty: &mut Loyalty, now_ms: i64, emitter: &mut Emitter) -> Vec<(String, i64)> {
    let mut expired: i64 = 0;
    let mut gone = Vec::new();
    loyalty.lots.retain(|lot| match lot.expires_at_ms {
        Some(at) if at <= now_ms => {
            expired = expired.saturating_add(lot.points);
            gone.push((lot.source.clone(), lot.points));
            false
        }
        _ => true,
    });
    if gone.is_empty() {
        return gone;
    }
    loyalty.expired_total = loyalty.expired_total.saturating_add(expired);
    emitter.emit(
        now_ms,
        PointsExpired {
            points: expired,
            lots: gone.len() as u64,
            sources: gone.iter().map(|(source, _)| source.clone()).collect(),
            points_balance: loyalty.balance(),
        },
    );
    gone
}

/// UTC day index of an instant.
pub fn day_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(DAY_MS)
}

/// Adds `delta_minor` (negative for returns) to the net spend of the day of `at_ms`.
pub fn record_spend(loyalty: &mut Loyalty, at_ms: i64, delta_minor: i64) {
    let entry = loyalty.spend_by_day_minor.entry(day_of(at_ms)).or_insert(0);
    *entry = entry.saturating_add(delta_minor);
    if *entry == 0 {
        loyalty.spend_by_day_minor.remove(&day_of(at_ms));
    }
}

/// Drops spend days that can no longer count at or after `clock_ms`.
pub fn prune_spend(loyalty: &mut Loyalty, rules: &Rules, clock_ms: i64) {
    let first_counted = day_of(clock_ms) - rules.tiering.rolling_window_days + 1;
    loyalty.spend_by_day_minor = loyalty.spend_by_day_minor.split_off(&first_counted);
}

/// Net spend of the `rolling_window_days` UTC days ending with the day of `now_ms`.
pub fn rolling_spend(loyalty: &Loyalty, rules: &Rules, now_ms: i64) -> i64 {
    let today = day_of(now_ms);
    let first = today - rules.tiering.rolling_window_days + 1;
    loyalty
        .spend_by_day_minor
        .range(first..=today)
        .map(|(_, v)| *v)
        .sum::<i64>()
        .max(0)
}

/// The current tier's index in `rules` (the base tier if unknown to these rules).
pub fn tier_index(loyalty: &Loyalty, rules: &Rules) -> usize {
    loyalty
        .tier
        .as_deref()
        .and_then(|name| rules.tier_index(name))
        .unwrap_or(0)
}

/// Puts a new customer in the base tier.
pub fn start_in_base_tier(loyalty: &mut Loyalty, rules: &Rules, at_ms: i64) {
    loyalty.tier = Some(rules.tiers[0].name.clone());
    loyalty.tier_since_ms = Some(at_ms);
    loyalty.tier_review_at_ms = None;
}

fn change_tier(
    loyalty: &mut Loyalty,
    rules: &Rules,
    to: usize,
    at_ms: i64,
    direction: &str,
    spend_minor: i64,
    emitter: &mut Emitter,
) {
    let from = loyalty.tier.clone();
    let name = rules.tiers[to].name.clone();
    loyalty.tier = Some(name.clone());
    loyalty.tier_since_ms = Some(at_ms);
    loyalty.tier_review_at_ms =
        (to > 0).then(|| at_ms.saturating_add(Rules::days_ms(rules.tiering.review_period_days)));
    loyalty.tier_history.push_back(TierChange {
        at_ms,
        from: from.clone(),
        to: name.clone(),
        direction: direction.to_string(),
        rolling_spend_minor: spend_minor,
    });
    while loyalty.tier_history.len() > rules.limits.tier_history_max {
        loyalty.tier_history.pop_front();
    }
    emitter.emit(
        at_ms,
        TierChanged {
            from,
            to: name,
            direction: direction.to_string(),
            rolling_spend: Money(spend_minor),
            review_at: format_optional(loyalty.tier_review_at_ms),
        },
    );
}

/// Upgrades at once when the rolling spend at `now_ms` qualifies for a higher tier.
pub fn upgrade_if_qualified(
    loyalty: &mut Loyalty,
    rules: &Rules,
    now_ms: i64,
    emitter: &mut Emitter,
) {
    let spend = rolling_spend(loyalty, rules, now_ms);
    let qualifying = rules.qualifying_tier(spend);
    let known = loyalty.tier.as_deref().and_then(|n| rules.tier_index(n));
    if known.is_none() || qualifying > tier_index(loyalty, rules) {
        if known.is_none() && qualifying == 0 {
            start_in_base_tier(loyalty, rules, now_ms);
            return;
        }
        change_tier(loyalty, rules, qualifying, now_ms, "up", spend, emitter);
    }
}

/// The tier's review date has come: downgrade to the tier the rolling spend qualifies for,
/// or keep the tier for another review period.
pub fn review_tier(loyalty: &mut Loyalty, rules: &Rules, now_ms: i64, emitter: &mut Emitter) {
    let spend = rolling_spend(loyalty, rules, now_ms);
    let qualifying = rules.qualifying_tier(spend);
    let current = tier_index(loyalty, rules);
    if qualifying < current {
        change_tier(loyalty, rules, qualifying, now_ms, "down", spend, emitter);
    } else if qualifying > current {
        change_tier(loyalty, rules, qualifying, now_ms, "up", spend, emitter);
    } else {
        let period = Rules::days_ms(rules.tiering.review_period_days);
        loyalty.tier_review_at_ms = loyalty.tier_review_at_ms.map(|at| {
            let mut next = at.saturating_add(period);
            if next <= now_ms {
                next = now_ms.saturating_add(period);
            }
            next
        });
        if current == 0 {
            loyalty.tier_review_at_ms = None;
        }
    }
}

/// Merges: `from`'s points, redemptions, totals, spend days and tier history join
/// `into`'s (docs/rules.md, Merges). No point is created or lost: every lot and pending
/// entry keeps its own dates (lots with the same dates and source add up), redemptions
/// unite by request id, bonus flags are or-ed, totals add up. The tier is
/// [`absorb_tier`]'s; the `lots_max` bound is [`fold_lots_to_max`]'s, run after the time
/// rules so that folding never makes points expire at the merge.
pub fn absorb(into: &mut Loyalty, from: Loyalty, rules: &Rules) {
    let mut lots = std::mem::take(&mut into.lots);
    lots.extend(from.lots);
    lots.sort_by(|a, b| lot_key(a).cmp(&lot_key(b)));
    let mut combined: Vec<PointsLot> = Vec::with_capacity(lots.len());
    for lot in lots {
        match combined.last_mut() {
            Some(last) if lot_key(last) == lot_key(&lot) => {
                last.points = last.points.saturating_add(lot.points);
            }
            _ => combined.push(lot),
        }
    }
    into.lots = combined;

    into.pending.extend(from.pending);
    into.pending
        .sort_by(|a, b| (a.release_at_ms, &a.source).cmp(&(b.release_at_ms, &b.source)));

    for redemption in from.redemptions {
        let known = into
            .redemptions
            .iter()
            .any(|r| r.outcome.request_id == redemption.outcome.request_id);
        if !known {
            into.redemptions.push_back(redemption);
        }
    }
    into.redemptions.make_contiguous().sort_by_key(|r| r.at_ms);
    while into.redemptions.len() > rules.limits.redemptions_max {
        into.redemptions.pop_front();
    }

    for (day, minor) in from.spend_by_day_minor {
        let entry = into.spend_by_day_minor.entry(day).or_insert(0);
        *entry = entry.saturating_add(minor);
        if *entry == 0 {
            into.spend_by_day_minor.remove(&day);
        }
    }

    into.tier_history.extend(from.tier_history);
    into.tier_history.make_contiguous().sort_by_key(|c| c.at_ms);
    while into.tier_history.len() > rules.limits.tier_history_max {
        into.tier_history.pop_front();
    }

    into.shortfall_points = into.shortfall_points.saturating_add(from.shortfall_points);
    into.profile_bonus_granted |= from.profile_bonus_granted;
    into.first_purchase_bonus_granted |= from.first_purchase_bonus_granted;
    into.earned_total = into.earned_total.saturating_add(from.earned_total);
    into.redeemed_total = into.redeemed_total.saturating_add(from.redeemed_total);
    into.expired_total = into.expired_total.saturating_add(from.expired_total);
    into.reversed_total = into.reversed_total.saturating_add(from.reversed_total);
}

/// Merges: the tier after `into` absorbed a customer whose tier was `from_tier` (with its
/// `since` and review date): the higher of the two, then an upgrade at `now_ms` if the
/// combined rolling spend qualifies for more. Never a downgrade. Taking the merged
/// customer's higher tier is recorded in the history and announced (`tier.changed`, `up`)
/// like any upgrade; it keeps that tier's review date. A survivor without a tier (no event
/// of its own applied) takes the merged customer's quietly.
pub fn absorb_tier(
    into: &mut Loyalty,
    from_tier: &Loyalty,
    rules: &Rules,
    now_ms: i64,
    emitter: &mut Emitter,
) {
    let from_index = from_tier.tier.as_deref().and_then(|n| rules.tier_index(n));
    if into.tier.is_none() {
        into.tier.clone_from(&from_tier.tier);
        into.tier_since_ms = from_tier.tier_since_ms;
        into.tier_review_at_ms = from_tier.tier_review_at_ms;
    } else if let Some(from_index) = from_index {
        if from_index > tier_index(into, rules) {
            let spend = rolling_spend(into, rules, now_ms);
            let from = into.tier.clone();
            let name = rules.tiers[from_index].name.clone();
            into.tier = Some(name.clone());
            into.tier_since_ms = from_tier.tier_since_ms.or(Some(now_ms));
            into.tier_review_at_ms = from_tier.tier_review_at_ms.or_else(|| {
                Some(now_ms.saturating_add(Rules::days_ms(rules.tiering.review_period_days)))
            });
            into.tier_history.push_back(TierChange {
                at_ms: now_ms,
                from: from.clone(),
                to: name.clone(),
                direction: "up".to_string(),
                rolling_spend_minor: spend,
            });
            while into.tier_history.len() > rules.limits.tier_history_max {
                into.tier_history.pop_front();
            }
            emitter.emit(
                now_ms,
                TierChanged {
                    from,
                    to: name,
                    direction: "up".to_string(),
                    rolling_spend: Money(spend),
                    review_at: format_optional(into.tier_review_at_ms),
                },
            );
        }
    }
    upgrade_if_qualified(into, rules, now_ms, emitter);
}

/// Keeps at most `lots_max` lots without losing a point: each lot beyond the bound (the
/// latest-expiring ones) is folded into the latest-expiring lot kept, whose expiry is the
/// same or earlier (its source becomes `merged` when they differ).
pub fn fold_lots_to_max(loyalty: &mut Loyalty, rules: &Rules) {
    let max = rules.limits.lots_max.max(1);
    while loyalty.lots.len() > max {
        let (Some(dropped), Some(mut kept)) = (loyalty.lots.pop(), loyalty.lots.pop()) else {
            return;
        };
        kept.points = kept.points.saturating_add(dropped.points);
        if kept.source != dropped.source {
            kept.source = "merged".to_string();
        }
        insert_lot(loyalty, kept);
    }
}
