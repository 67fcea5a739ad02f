//! The retention engine: when a customer counts as lapsed, the one win-back offer per lapse,
//! and reactivation when a lapsed customer buys again.
//!
//! A customer lapses when the time since their last purchase exceeds k times their own mean
//! gap between distinct purchase times (`retention.lapse_factor`), with `default_gap_days`
//! for one-time buyers and `min_gap_days` as a floor. [`crate::apply`] calls
//! [`record_purchase`] for every purchase and [`lapse`] / [`offer_winback`] when the due
//! times stored in [`RetentionState`] come (by tick or by a later event). Everything runs on
//! event time in integer ms; this module never reads the wall clock and never touches
//! loyalty points.

use crate::actor_event::{RetentionLapsed, RetentionReactivated, WinbackOffered};
use crate::emit::Emitter;
use crate::rules::{Rules, BASIS_POINTS_ONE};
use crate::state::{RetentionState, RetentionStatus};
use crate::time::{format_optional, format_rfc3339, DAY_MS};

/// The gap used for lapse decisions, ms, and whether it is the default (single purchase).
pub fn effective_gap_ms(retention: &RetentionState, rules: &Rules) -> (i64, bool) {
    let min_gap = Rules::days_ms(rules.retention.min_gap_days);
    match retention.mean_gap_ms() {
        Some(gap) => (gap.max(min_gap), false),
        None => (Rules::days_ms(rules.retention.default_gap_days), true),
    }
}

/// How long after the last purchase the customer lapses, ms (k x gap).
pub fn lapse_after_ms(retention: &RetentionState, rules: &Rules) -> i64 {
    let (gap, _) = effective_gap_ms(retention, rules);
    let threshold = i128::from(gap) * i128::from(rules.retention.lapse_factor_basis_points)
        / i128::from(BASIS_POINTS_ONE);
    i64::try_from(threshold).unwrap_or(i64::MAX)
}

/// Recomputes when an active customer lapses: strictly more than the threshold after the
/// last purchase.
pub fn schedule(retention: &mut RetentionState, rules: &Rules) {
    retention.lapse_due_ms = match (retention.status, retention.last_purchase_ms()) {
        (RetentionStatus::Active, Some(last)) => Some(
            last.saturating_add(lapse_after_ms(retention, rules))
                .saturating_add(1),
        ),
        _ => None,
    };
}

/// Records a purchase at `at_ms`, applied while the clock is `now_ms`; emits
/// `retention.reactivated` when a lapsed customer buys again. A late purchase dated before
/// the lapse was declared does not reactivate: it joins the history (and the mean gap),
/// and the customer stays lapsed with the offer already made or due.
pub fn record_purchase(
    retention: &mut RetentionState,
    rules: &Rules,
    at_ms: i64,
    now_ms: i64,
    order_id: &str,
    emitter: &mut Emitter,
) {
    retention.purchase_times_ms.insert(at_ms);
    while retention.purchase_times_ms.len() > rules.limits.orders_max {
        retention.purchase_times_ms.pop_first();
    }
    match retention.status {
        RetentionStatus::New => retention.status = RetentionStatus::Active,
        RetentionStatus::Active => {}
        RetentionStatus::Lapsed if retention.lapsed_at_ms.is_some_and(|l| at_ms < l) => {}
        RetentionStatus::Lapsed => {
            retention.status = RetentionStatus::Active;
            retention.reactivated_count += 1;
            let lapsed_at = retention.lapsed_at_ms;
            let event = RetentionReactivated {
                order_id: order_id.to_string(),
                lapsed_at: format_optional(lapsed_at),
                days_lapsed: lapsed_at.map_or(0, |l| (at_ms - l).max(0) / DAY_MS),
                winback_offered: retention.winback_offered,
                reactivated_count: retention.reactivated_count,
            };
            retention.winback_due_ms = None;
            retention.lapse_reason = None;
            emitter.emit(at_ms.max(now_ms), event);
        }
    }
    schedule(retention, rules);
}

/// `1.5`-style text for basis points.
pub fn factor_text(basis_points: i64) -> String {
    let whole = basis_points / BASIS_POINTS_ONE;
    let fraction = basis_points % BASIS_POINTS_ONE;
    if fraction == 0 {
        format!("{whole}.0")
    } else {
        let digits = format!("{fraction:04}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// The lapse time has come: mark the customer lapsed, say why, schedule the win-back offer.
pub fn lapse(retention: &mut RetentionState, rules: &Rules, now_ms: i64, emitter: &mut Emitter) {
    retention.lapse_due_ms = None;
    let Some(last) = retention.last_purchase_ms() else {
        return;
    };
    let (gap_ms, default_gap) = effective_gap_ms(retention, rules);
    let factor = factor_text(rules.retention.lapse_factor_basis_points);
    let days_since = (now_ms - last) / DAY_MS;
    let threshold_days = lapse_after_ms(retention, rules) / DAY_MS;
    let reason = if default_gap {
        format!(
            "no second purchase for {days_since} days after the only one: past {factor} x the default gap of {} days ({threshold_days} days)",
            rules.retention.default_gap_days
        )
    } else {
        format!(
            "no purchase for {days_since} days: past {factor} x the customer's mean gap of {} days between purchases ({threshold_days} days)",
            gap_ms / DAY_MS
        )
    };
    retention.status = RetentionStatus::Lapsed;
    retention.lapsed_at_ms = Some(now_ms);
    retention.lapse_reason = Some(reason.clone());
    retention.lapse_count += 1;
    retention.winback_offered = false;
    retention.winback_offered_at_ms = None;
    retention.winback_due_ms =
        Some(now_ms.saturating_add(Rules::days_ms(rules.retention.winback_delay_days)));
    emitter.emit(
        now_ms,
        RetentionLapsed {
            reason,
            last_purchase_at: format_rfc3339(last),
            days_since_purchase: days_since,
            mean_gap_days: gap_ms / DAY_MS,
            lapse_count: retention.lapse_count,
        },
    );
}

/// The win-back offer for the current lapse (at most once per lapse).
pub fn offer_winback(retention: &mut RetentionState, now_ms: i64, emitter: &mut Emitter) {
    retention.winback_due_ms = None;
    if retention.status != RetentionStatus::Lapsed || retention.winback_offered {
        return;
    }
    retention.winback_offered = true;
    retention.winback_offered_at_ms = Some(now_ms);
    emitter.emit(
        now_ms,
        WinbackOffered {
            lapsed_at: format_optional(retention.lapsed_at_ms),
            reason: retention.lapse_reason.clone().unwrap_or_default(),
            lapse_count: retention.lapse_count,
        },
    );
}

/// Merges: `from`'s purchase times join `into`'s (at most `orders_max`, the oldest
/// dropped) and the lapse state is recomputed from them: the side whose last purchase is
/// the later one (ties: `into`) says whether the customer is active or lapsed (with its
/// lapse time, reason and win-back), lapse and reactivation counts add up, and the next
/// lapse is scheduled from the combined mean gap (the caller's time rules then run, so a
/// combined history already past its threshold lapses at the merge).
pub fn absorb(into: &mut RetentionState, from: RetentionState, rules: &Rules) {
    let from_is_later = from.last_purchase_ms() > into.last_purchase_ms();
    into.purchase_times_ms
        .extend(from.purchase_times_ms.iter().copied());
    while into.purchase_times_ms.len() > rules.limits.orders_max {
        into.purchase_times_ms.pop_first();
    }
    into.lapse_count = into.lapse_count.saturating_add(from.lapse_count);
    into.reactivated_count = into
        .reactivated_count
        .saturating_add(from.reactivated_count);
    if from_is_later {
        into.status = from.status;
        into.lapsed_at_ms = from.lapsed_at_ms;
        into.lapse_reason = from.lapse_reason;
        into.winback_due_ms = from.winback_due_ms;
        into.winback_offered = from.winback_offered;
        into.winback_offered_at_ms = from.winback_offered_at_ms;
    }
    schedule(into, rules);
}
