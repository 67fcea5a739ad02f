//! Merges, the customer's side (docs/rules.md, "Merges"): the merge commands of the shard
//! log, holding channel events back while a merge is under way, and [`merge_into`], the
//! state merge field by field.
//!
//! The router decides a merge of B into the survivor A and writes `MergeOut` into B's log
//! and the linking event, as a `ResolvedEvent` naming the merge, into A's. B's `MergeOut`
//! sends B's state away in [`ApplyOutcome::transfer`] and leaves a tombstone; the node
//! appends it to A's log as a `MergeIn`. A, from the announcing event until every merged
//! state it waits for has arrived, holds its channel events and merge-outs back (at most
//! `limits.merge_buffer_max`), then applies them in order. Every step is idempotent (a
//! repeated `MergeOut`, `MergeIn` or announcement changes nothing) and deterministic like
//! all of [`super`]: no point is created or lost, and the same two states give the same
//! merged state byte for byte.

use super::event::{self, IdentityReport};
use super::{outcome, settle, unapplicable};
use crate::actor_event::CustomerMerged;
use crate::emit::Emitter;
use crate::ingest::ChannelEvent;
use crate::loyalty;
use crate::retention;
use crate::rules::Rules;
use crate::shard_message::{
    ApplyOutcome, ApplyStatus, IdentityConflict, IdentityNote, MergeRef, MergeTransfer, Released,
};
use crate::state::{
    ChannelActivity, CustomerState, Dedup, HeldCommand, MergedFrom, OrderRecord, TimelineEntry,
    OPEN_TICKETS_MAX,
};
use std::collections::{BTreeMap, BTreeSet};

/// A channel event as the log carries it: a resolved event (notes, merges) or a record
/// routed before merges (a conflict).
#[derive(Debug, Clone, Copy)]
pub(super) struct Channel<'a> {
    pub event: &'a ChannelEvent,
    pub notes: &'a [IdentityNote],
    pub merges: &'a [MergeRef],
    pub conflict: Option<&'a IdentityConflict>,
}

/// Whether a command may start waiting for merges it announces. Commands released because
/// the buffer overflowed may not (they would fill it again at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

/// `Event` and `ResolvedEvent`: refused at a tombstone; a repeat of an applied or held
/// event is a duplicate; the merges it announces that are not applied yet start the wait;
/// held while waiting, applied otherwise.
pub(super) fn apply_channel(
    state: &mut CustomerState,
    command: Channel<'_>,
    rules: &Rules,
) -> ApplyOutcome {
    channel(state, command, rules, Wait::Yes)
}

fn channel(
    state: &mut CustomerState,
    command: Channel<'_>,
    rules: &Rules,
    wait: Wait,
) -> ApplyOutcome {
    let event = command.event;
    // A tombstone keeps the event ids it applied: an event redelivered after the merge is
    // recognised as applied already (the survivor has it from the merged state).
    if state.is_tombstone() && state.dedup.contains(&event.event_id) {
        return outcome(ApplyStatus::Duplicate, Vec::new());
    }
    if let Some(into) = &state.merge.merged_into {
        return unapplicable(format!(
            "event {} reached customer {}, which was merged into {into}: nothing was applied; send it again, the router now routes the customer's identifiers to {into}",
            event.event_id, state.customer_id
        ));
    }
    if state.dedup.contains(&event.event_id) || is_held(state, &event.event_id) {
        return outcome(ApplyStatus::Duplicate, Vec::new());
    }
    if wait == Wait::Yes {
        for merge in command.merges {
            if merge.merged_id != state.customer_id && !state.merge.has_merged(&merge.merged_id) {
                state.merge.awaiting.insert(merge.merged_id.clone());
            }
        }
    }
    if !state.merge.awaiting.is_empty() {
        // A record routed before merges is never behind a merge in a log (older records
        // come first); were one held, its conflict report would not be published.
        let held = HeldCommand::Event {
            event: event.clone(),
            notes: command.notes.to_vec(),
            merges: command.merges.to_vec(),
        };
        return hold(state, held, rules);
    }
    let reports: Vec<IdentityReport<'_>> = command
        .conflict
        .map(IdentityReport::Conflict)
        .into_iter()
        .chain(command.notes.iter().map(IdentityReport::Note))
        .collect();
    event::apply_event(state, event, &reports, rules)
}

fn is_held(state: &CustomerState, event_id: &str) -> bool {
    state.merge.held.iter().any(|held| match held {
        HeldCommand::Event { event, .. } => event.event_id == event_id,
        HeldCommand::MergeOut { .. } => false,
    })
}

/// Holds `command` back (status `Applied`, no events) while there is room; when the
/// buffer is full the customer stops waiting: it applies what it holds and `command`, in
/// order, and forgets whom it waited for (their states merge when they come).
fn hold(state: &mut CustomerState, command: HeldCommand, rules: &Rules) -> ApplyOutcome {
    if state.merge.held.len() < rules.limits.merge_buffer_max {
        state.merge.held.push_back(command);
        return ApplyOutcome::default();
    }
    state.merge.awaiting.clear();
    let mut released = ApplyOutcome::default();
    release_held(state, rules, &mut released, Wait::No);
    let own = run_held(state, &command, rules, Wait::No);
    released.status = own.status;
    released.events.extend(own.events);
    if own.transfer.is_some() {
        released.transfer = own.transfer;
    }
    released
}

fn run_held(
    state: &mut CustomerState,
    command: &HeldCommand,
    rules: &Rules,
    wait: Wait,
) -> ApplyOutcome {
    match command {
        HeldCommand::Event {
            event,
            notes,
            merges,
        } => {
            let command = Channel {
                event,
                notes,
                merges,
                conflict: None,
            };
            channel(state, command, rules, wait)
        }
        HeldCommand::MergeOut { merge } => merge_out(state, merge, rules),
    }
}

/// Applies the held commands in order into `out` (their events, their statuses in
/// `released`, a transfer). A released event that announces a merge not applied yet
/// starts a new wait: it and the commands after it are held again.
fn release_held(state: &mut CustomerState, rules: &Rules, out: &mut ApplyOutcome, wait: Wait) {
    let mut queue = std::mem::take(&mut state.merge.held);
    while let Some(command) = queue.pop_front() {
        if !state.merge.awaiting.is_empty() {
            state.merge.held.push_back(command);
            state.merge.held.append(&mut queue);
            return;
        }
        let held_before = state.merge.held.len();
        let applied = run_held(state, &command, rules, wait);
        let held_again = state.merge.held.len() > held_before;
        out.events.extend(applied.events);
        if applied.transfer.is_some() {
            debug_assert!(out.transfer.is_none(), "one merge-out per customer");
            out.transfer = applied.transfer;
        }
        if let (HeldCommand::Event { event, .. }, false) = (&command, held_again) {
            out.released.push(Released {
                event_id: event.event_id.clone(),
                status: applied.status,
            });
        }
    }
}

/// `MergeOut`: the customer's state leaves in a transfer to the survivor and a tombstone
/// stays; a repeat is a duplicate; held while the customer itself waits for merges (so
/// that what leaves includes them).
pub(super) fn apply_merge_out(
    state: &mut CustomerState,
    merge: &MergeRef,
    rules: &Rules,
) -> ApplyOutcome {
    if merge.merged_id == state.customer_id
        && !state.is_tombstone()
        && !state.merge.awaiting.is_empty()
    {
        let repeated = state.merge.held.iter().any(|held| match held {
            HeldCommand::MergeOut { merge: held } => held == merge,
            HeldCommand::Event { .. } => false,
        });
        if repeated {
            return outcome(ApplyStatus::Duplicate, Vec::new());
        }
        return hold(
            state,
            HeldCommand::MergeOut {
                merge: merge.clone(),
            },
            rules,
        );
    }
    merge_out(state, merge, rules)
}

fn merge_out(state: &mut CustomerState, merge: &MergeRef, rules: &Rules) -> ApplyOutcome {
    if merge.merged_id != state.customer_id {
        return unapplicable(format!(
            "merge-out of customer {} into {} (event {}) reached customer {}; the router writes a merge-out into the merged customer's own log",
            merge.merged_id, merge.survivor_id, merge.cause_event_id, state.customer_id
        ));
    }
    if merge.survivor_id == state.customer_id {
        return unapplicable(format!(
            "merge-out of customer {} into itself (event {}); a customer is never merged into itself",
            merge.merged_id, merge.cause_event_id
        ));
    }
    if let Some(into) = &state.merge.merged_into {
        if *into == merge.survivor_id {
            return outcome(ApplyStatus::Duplicate, Vec::new());
        }
        return unapplicable(format!(
            "merge-out of customer {} into {} (event {}), but it was merged into {into} already; a customer is merged away once",
            merge.merged_id, merge.survivor_id, merge.cause_event_id
        ));
    }
    let mut tombstone = CustomerState::new(&state.customer_id);
    tombstone.created_at_ms = state.created_at_ms;
    tombstone.clock_ms = state.clock_ms;
    tombstone.rules_version = rules.version;
    tombstone.merge.merged_into = Some(merge.survivor_id.clone());
    tombstone.merge.merged_at_ms = Some(merge.at_ms);
    // Its event ids stay (bounded as before): a redelivered event is a duplicate here.
    tombstone.dedup = state.dedup.clone();
    let leaving = std::mem::replace(state, tombstone);
    ApplyOutcome {
        transfer: Some(Box::new(MergeTransfer {
            merge: merge.clone(),
            to_customer_id: merge.survivor_id.clone(),
            state: leaving,
        })),
        ..ApplyOutcome::default()
    }
}

/// `MergeIn`: a merge already applied is a duplicate; a tombstone forwards the state to
/// where it went; otherwise the state merges ([`merge_into`], `customer.merged`) and, once
/// nothing more is awaited, the held commands apply in order.
pub(super) fn apply_merge_in(
    state: &mut CustomerState,
    merge: &MergeRef,
    merged: &CustomerState,
    rules: &Rules,
) -> ApplyOutcome {
    if merge.merged_id == state.customer_id || merged.customer_id != merge.merged_id {
        return unapplicable(format!(
            "merge-in of customer {} (state of {}, event {}) reached customer {}; a customer's state merges into another customer, under its own id",
            merge.merged_id, merged.customer_id, merge.cause_event_id, state.customer_id
        ));
    }
    if merged.is_tombstone() {
        return unapplicable(format!(
            "merge-in of customer {} (event {}) carries a tombstone (merged into {}), not a state; a merged customer's state is sent once, when its merge-out applies",
            merge.merged_id,
            merge.cause_event_id,
            merged.merge.merged_into.as_deref().unwrap_or_default()
        ));
    }
    if state.merge.has_merged(&merge.merged_id) {
        return outcome(ApplyStatus::Duplicate, Vec::new());
    }
    if let Some(into) = &state.merge.merged_into {
        return ApplyOutcome {
            transfer: Some(Box::new(MergeTransfer {
                merge: merge.clone(),
                to_customer_id: into.clone(),
                state: merged.clone(),
            })),
            ..ApplyOutcome::default()
        };
    }
    let cause = format!("merge-{}", merge.merged_id);
    let mut emitter = Emitter::new(&state.customer_id, &cause);
    merge_into(state, merged.clone(), merge, rules, &mut emitter);
    let mut out = outcome(ApplyStatus::Applied, emitter.into_events());
    if state.merge.awaiting.is_empty() && !state.merge.held.is_empty() {
        release_held(state, rules, &mut out, Wait::Yes);
    }
    out
}

/// Merges `merged` (the state a `MergeIn` carries) into `survivor`, field by field as
/// docs/rules.md ("Merges") says, records the merge, emits `customer.merged` (and
/// `tier.changed` for an upgrade), then runs the time rules due by the combined clock like
/// every command. No point is created or lost: the survivor's balance plus pending
/// afterwards is the sum of both sides' (before the time rules run). Deterministic.
pub fn merge_into(
    survivor: &mut CustomerState,
    mut merged: CustomerState,
    merge: &MergeRef,
    rules: &Rules,
    emitter: &mut Emitter,
) {
    let points_moved = merged
        .loyalty
        .balance()
        .saturating_add(merged.loyalty.pending_points());
    let identifier_kinds: BTreeSet<&str> =
        merged.identities.iter().map(|i| i.kind.as_str()).collect();
    let identifier_kinds: Vec<String> = identifier_kinds.into_iter().map(str::to_string).collect();
    let shared: Vec<String> = merged
        .orders
        .keys()
        .filter(|id| survivor.orders.contains_key(*id))
        .cloned()
        .collect();
    let orders_moved = (merged.orders.len() - shared.len()) as u64;
    for order_id in &shared {
        if let Some(order) = merged.orders.remove(order_id) {
            let categories = &survivor.purchases.by_category_minor;
            uncount_shared_order(&mut merged, &order, categories, rules);
            if !merged
                .orders
                .values()
                .any(|other| other.at_ms == order.at_ms)
            {
                merged.retention.purchase_times_ms.remove(&order.at_ms);
            }
        }
    }

    survivor.created_at_ms = match (survivor.created_at_ms, merged.created_at_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    survivor.clock_ms = survivor.clock_ms.max(merged.clock_ms);
    for identity in std::mem::take(&mut merged.identities) {
        if survivor.identities.len() >= rules.limits.identities_max {
            break;
        }
        survivor.identities.insert(identity);
    }
    merge_profile(survivor, &mut merged, rules);
    merge_activity(survivor, &mut merged, rules);
    merge_purchases(survivor, &mut merged, rules);
    for entry in std::mem::take(&mut merged.timeline) {
        event::add_timeline(survivor, rules, entry);
    }
    event::add_timeline(
        survivor,
        rules,
        TimelineEntry {
            at_ms: merge.at_ms,
            channel: "identity".to_string(),
            entry_type: "merge".to_string(),
            summary: format!(
                "customer {} merged in: {orders_moved} order{}, {points_moved} points",
                merge.merged_id,
                if orders_moved == 1 { "" } else { "s" }
            ),
            cause_id: merge.cause_event_id.clone(),
        },
    );
    merge_dedup(
        &mut survivor.dedup,
        &merged.dedup,
        rules.limits.event_ids_max,
    );
    let merged_tier = crate::state::Loyalty {
        tier: merged.loyalty.tier.clone(),
        tier_since_ms: merged.loyalty.tier_since_ms,
        tier_review_at_ms: merged.loyalty.tier_review_at_ms,
        ..crate::state::Loyalty::default()
    };
    loyalty::absorb(
        &mut survivor.loyalty,
        std::mem::take(&mut merged.loyalty),
        rules,
    );
    retention::absorb(
        &mut survivor.retention,
        std::mem::take(&mut merged.retention),
        rules,
    );
    crate::value::live::absorb_history(
        &mut survivor.value,
        std::mem::take(&mut merged.value),
        rules.limits.purchase_days_max,
    );
    if merged.value_standing.model_version > survivor.value_standing.model_version {
        survivor.value_standing = std::mem::take(&mut merged.value_standing);
    }
    record_merge(survivor, &mut merged, merge, rules);

    emitter.emit(
        merge.at_ms,
        CustomerMerged {
            merged_customer_id: merge.merged_id.clone(),
            identifier_kinds,
            points_moved,
            orders_moved,
            cause_event_id: merge.cause_event_id.clone(),
        },
    );
    if survivor.is_created() {
        let now = survivor.clock_ms;
        loyalty::absorb_tier(&mut survivor.loyalty, &merged_tier, rules, now, emitter);
        settle(survivor, rules, emitter);
    }
    loyalty::fold_lots_to_max(&mut survivor.loyalty, rules);
}

/// Takes an order the survivor also has out of the merged side's figures, so that it
/// counts once (the survivor's record is kept; the caller takes its purchase time out of
/// the merged side's retention history): purchase count and spend, spend by
/// channel and by category ([`subtract_shared_categories`]), its refunds, its tier spend and its purchase day.
fn uncount_shared_order(
    merged: &mut CustomerState,
    order: &OrderRecord,
    survivor_categories: &BTreeMap<String, i64>,
    rules: &Rules,
) {
    let purchases = &mut merged.purchases;
    purchases.count = purchases.count.saturating_sub(1);
    if order.currency != rules.currency {
        return;
    }
    let amount = order.amount_minor.max(0);
    purchases.count_in_currency = purchases.count_in_currency.saturating_sub(1);
    purchases.total_spend_minor = (purchases.total_spend_minor - amount).max(0);
    let channel_key = if purchases.by_channel_minor.contains_key(&order.channel) {
        order.channel.clone()
    } else {
        "other".to_string()
    };
    subtract_from(&mut purchases.by_channel_minor, &channel_key, amount);
    subtract_shared_categories(
        &mut purchases.by_category_minor,
        survivor_categories,
        amount,
    );
    merged.returns.total_minor = (merged.returns.total_minor - order.returned_minor).max(0);
    let day = loyalty::day_of(order.at_ms);
    if merged.loyalty.spend_by_day_minor.contains_key(&day) {
        loyalty::record_spend(
            &mut merged.loyalty,
            order.at_ms,
            -(amount - order.returned_minor).max(0),
        );
    }
    let value_day = crate::time::day_number(order.at_ms);
    if let Some(total) = merged.value.days.get_mut(&value_day) {
        *total = (*total - amount).max(0);
        if *total == 0 {
            merged.value.days.remove(&value_day);
        }
    }
}

fn subtract_from(map: &mut BTreeMap<String, i64>, key: &str, amount: i64) {
    if let Some(total) = map.get_mut(key) {
        *total = (*total - amount).max(0);
        if *total == 0 {
            map.remove(key);
        }
    }
}

/// Subtracts a shared order's `amount` from the merged side's spend by category: first
/// in proportion to what each category could hold of an order both sides have (the
/// smaller of the two sides' figures), the rest in proportion to what is left, so the sum
/// falls by `amount` (or to 0). Exact when the order's categories are the only ones both
/// customers bought in.
fn subtract_shared_categories(
    merged: &mut BTreeMap<String, i64>,
    survivor: &BTreeMap<String, i64>,
    amount: i64,
) {
    let common: BTreeMap<String, i64> = merged
        .iter()
        .map(|(key, value)| {
            (
                key.clone(),
                (*value).min(survivor.get(key).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, value)| *value > 0)
        .collect();
    let left = subtract_pro_rata(merged, &common, amount);
    let rest = merged.clone();
    subtract_pro_rata(merged, &rest, left);
}

/// Subtracts up to `amount` from the values of `map` in proportion to `weights` (each at
/// most its weight and its value; floored, the rest one unit at a time from the largest
/// weight); returns what it could not subtract.
fn subtract_pro_rata(
    map: &mut BTreeMap<String, i64>,
    weights: &BTreeMap<String, i64>,
    amount: i64,
) -> i64 {
    let capacity = |key: &String, weight: i64, map: &BTreeMap<String, i64>| {
        weight.min(map.get(key).copied().unwrap_or(0)).max(0)
    };
    let total: i64 = weights
        .iter()
        .map(|(key, weight)| capacity(key, *weight, map))
        .fold(0, i64::saturating_add);
    if total <= 0 || amount <= 0 {
        return amount.max(0);
    }
    let target = amount.min(total);
    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    for (key, weight) in weights {
        let cap = capacity(key, *weight, map);
        let share = (i128::from(cap) * i128::from(target) / i128::from(total)) as i64;
        taken.insert(key.clone(), share);
    }
    let mut left = target - taken.values().sum::<i64>();
    let mut by_weight: Vec<(i64, &String)> = weights.iter().map(|(k, w)| (*w, k)).collect();
    by_weight.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    while left > 0 {
        let before = left;
        for (weight, key) in &by_weight {
            let share = taken.entry((*key).clone()).or_insert(0);
            if left > 0 && *share < capacity(key, *weight, map) {
                *share += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    for (key, share) in taken {
        subtract_from(map, &key, share);
    }
    amount - target + left
}

/// Profile attributes and consents: per field (purpose) the later time wins, ties the
/// survivor; fields new to the survivor join while there is room, the most recent first.
fn merge_profile(survivor: &mut CustomerState, merged: &mut CustomerState, rules: &Rules) {
    let mut new_fields = Vec::new();
    for (key, value) in std::mem::take(&mut merged.profile) {
        match survivor.profile.get_mut(&key) {
            Some(existing) if value.updated_at_ms > existing.updated_at_ms => *existing = value,
            Some(_) => {}
            None => new_fields.push((key, value)),
        }
    }
    new_fields.sort_by(|a, b| {
        (b.1.updated_at_ms)
            .cmp(&a.1.updated_at_ms)
            .then_with(|| a.0.cmp(&b.0))
    });
    for (key, value) in new_fields {
        if survivor.profile.len() >= rules.limits.profile_fields_max {
            break;
        }
        survivor.profile.insert(key, value);
    }

    let mut new_purposes = Vec::new();
    for (purpose, consent) in std::mem::take(&mut merged.consents) {
        match survivor.consents.get_mut(&purpose) {
            Some(existing) if consent.at_ms > existing.at_ms => *existing = consent,
            Some(_) => {}
            None => new_purposes.push((purpose, consent)),
        }
    }
    new_purposes.sort_by(|a, b| b.1.at_ms.cmp(&a.1.at_ms).then_with(|| a.0.cmp(&b.0)));
    for (purpose, consent) in new_purposes {
        if survivor.consents.len() >= rules.limits.consent_purposes_max {
            break;
        }
        survivor.consents.insert(purpose, consent);
    }
}

/// Channels, browsing, support, email and visits: counts add up, first times are the
/// earlier, last times the later, and a "last" value comes from the side with the later
/// time (ties: the survivor's).
fn merge_activity(survivor: &mut CustomerState, merged: &mut CustomerState, rules: &Rules) {
    for (channel, activity) in std::mem::take(&mut merged.channels) {
        let key = event::bounded_key(&survivor.channels, &channel, rules.limits.channels_max);
        let into = survivor
            .channels
            .entry(key)
            .or_insert_with(|| ChannelActivity {
                events: 0,
                first_at_ms: activity.first_at_ms,
                last_at_ms: activity.last_at_ms,
            });
        into.events = into.events.saturating_add(activity.events);
        into.first_at_ms = into.first_at_ms.min(activity.first_at_ms);
        into.last_at_ms = into.last_at_ms.max(activity.last_at_ms);
    }

    let (b, from) = (&mut survivor.browsing, &mut merged.browsing);
    b.views = b.views.saturating_add(from.views);
    b.cart_adds = b.cart_adds.saturating_add(from.cart_adds);
    b.cart_removes = b.cart_removes.saturating_add(from.cart_removes);
    b.last_viewed_category = later_value(
        &mut b.last_viewed_category,
        &mut from.last_viewed_category,
        from.last_at_ms > b.last_at_ms,
    );
    b.last_at_ms = b.last_at_ms.max(from.last_at_ms);

    let (s, from) = (&mut survivor.support, &mut merged.support);
    for ticket in std::mem::take(&mut from.open_tickets) {
        if s.open_tickets.len() >= OPEN_TICKETS_MAX {
            break;
        }
        s.open_tickets.insert(ticket);
    }
    s.opened = s.opened.saturating_add(from.opened);
    s.resolved = s.resolved.saturating_add(from.resolved);
    s.satisfaction_sum = s.satisfaction_sum.saturating_add(from.satisfaction_sum);
    s.satisfaction_count = s.satisfaction_count.saturating_add(from.satisfaction_count);
    s.last_at_ms = s.last_at_ms.max(from.last_at_ms);

    let (e, from) = (&mut survivor.email, &mut merged.email);
    e.sent = e.sent.saturating_add(from.sent);
    e.opened = e.opened.saturating_add(from.opened);
    e.clicked = e.clicked.saturating_add(from.clicked);
    e.last_campaign = later_value(
        &mut e.last_campaign,
        &mut from.last_campaign,
        from.last_engaged_at_ms > e.last_engaged_at_ms,
    );
    e.last_engaged_at_ms = e.last_engaged_at_ms.max(from.last_engaged_at_ms);

    let (v, from) = (&mut survivor.visits, &mut merged.visits);
    v.count = v.count.saturating_add(from.count);
    if from.last_at_ms > v.last_at_ms {
        v.last_at_ms = from.last_at_ms;
        v.last_store_id = from.last_store_id.take();
    }
}

/// Purchases, returns and orders (shared orders were taken out of the merged side): the
/// summaries add up, the merged customer's orders join as applied after the survivor's
/// (the order applied longest ago dropped beyond `orders_max`).
/// A "last" value of the merged state: the merged side's when it is the later one
/// (`merged_is_later`), else the survivor's; either side's when the other has none.
fn later_value(
    survivor: &mut Option<String>,
    merged: &mut Option<String>,
    merged_is_later: bool,
) -> Option<String> {
    if merged_is_later {
        merged.take().or(survivor.take())
    } else {
        survivor.take().or(merged.take())
    }
}

fn merge_purchases(survivor: &mut CustomerState, merged: &mut CustomerState, rules: &Rules) {
    let applied_before = survivor.purchases.count;
    for (order_id, mut order) in std::mem::take(&mut merged.orders) {
        order.applied_n = applied_before.saturating_add(order.applied_n);
        survivor.orders.insert(order_id, order);
    }
    while survivor.orders.len() > rules.limits.orders_max {
        let oldest = survivor
            .orders
            .iter()
            .min_by_key(|(_, o)| o.applied_n)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => survivor.orders.remove(&id),
            None => break,
        };
    }

    let (p, from) = (&mut survivor.purchases, &mut merged.purchases);
    p.count = p.count.saturating_add(from.count);
    p.count_in_currency = p.count_in_currency.saturating_add(from.count_in_currency);
    p.total_spend_minor = p.total_spend_minor.saturating_add(from.total_spend_minor);
    p.first_at_ms = match (p.first_at_ms, from.first_at_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    p.last_at_ms = p.last_at_ms.max(from.last_at_ms);
    add_bounded(
        &mut p.by_channel_minor,
        std::mem::take(&mut from.by_channel_minor),
        rules.limits.channels_max,
    );
    add_bounded(
        &mut p.by_category_minor,
        std::mem::take(&mut from.by_category_minor),
        rules.limits.categories_max,
    );

    let (r, from) = (&mut survivor.returns, &merged.returns);
    r.count = r.count.saturating_add(from.count);
    r.total_minor = r.total_minor.saturating_add(from.total_minor);
    r.last_at_ms = r.last_at_ms.max(from.last_at_ms);
}

fn add_bounded(into: &mut BTreeMap<String, i64>, from: BTreeMap<String, i64>, max: usize) {
    for (key, minor) in from {
        let key = event::bounded_key(into, &key, max);
        let total = into.entry(key).or_insert(0);
        *total = total.saturating_add(minor);
    }
}

/// Event ids of both sides, within `event_ids_max`: the merged customer's first, so the
/// survivor's are forgotten last.
fn merge_dedup(survivor: &mut Dedup, merged: &Dedup, max: usize) {
    let mut united = Dedup::default();
    for event_id in merged.order.iter().chain(survivor.order.iter()) {
        united.remember(event_id, max);
    }
    *survivor = united;
}

/// Records the merge (and every merge the merged customer had absorbed) in
/// `merged_from`, by time, at most `merged_from_max` (the earliest forgotten), and stops
/// waiting for them. A merged state that was itself waiting (it never is: its merge-out
/// is held until it stops) hands its wait and held commands over.
fn record_merge(
    survivor: &mut CustomerState,
    merged: &mut CustomerState,
    merge: &MergeRef,
    rules: &Rules,
) {
    let mut entries: Vec<MergedFrom> = std::mem::take(&mut survivor.merge.merged_from);
    entries.extend(std::mem::take(&mut merged.merge.merged_from));
    entries.push(MergedFrom {
        customer_id: merge.merged_id.clone(),
        at_ms: merge.at_ms,
        cause_event_id: merge.cause_event_id.clone(),
    });
    entries.sort_by_key(|entry| entry.at_ms);
    let mut seen = BTreeSet::new();
    entries.retain(|entry| seen.insert(entry.customer_id.clone()));
    let excess = entries.len().saturating_sub(rules.limits.merged_from_max);
    entries.drain(..excess);
    for entry in &entries {
        survivor.merge.awaiting.remove(&entry.customer_id);
    }
    survivor.merge.awaiting.remove(&merge.merged_id);
    survivor.merge.merged_from = entries;
    for waiting in std::mem::take(&mut merged.merge.awaiting) {
        if waiting != survivor.customer_id && !survivor.merge.has_merged(&waiting) {
            survivor.merge.awaiting.insert(waiting);
        }
    }
    survivor
        .merge
        .held
        .extend(std::mem::take(&mut merged.merge.held));
}
