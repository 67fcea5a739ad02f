//! A channel event applied to one customer, in the phases [`apply_event`] lists. The
//! kinds with rules of their own live beside it ([`super::purchase`], [`super::profile`],
//! [`super::activity`]); this file owns the refusals, the customer's creation, identities,
//! channel counts and the timeline. Deterministic like all of [`super`].

use super::{activity, outcome, profile, purchase, run_due, settle, unapplicable};
use crate::actor_event::{
    ConflictReason, CustomerCreated, IdentityConflictEvent, IdentityLinked, IdentityMergeRefused,
    IdentityValue,
};
use crate::emit::Emitter;
use crate::ingest::{ChannelEvent, EventKind, RejectReason, Rejection};
use crate::loyalty;
use crate::money::Money;
use crate::rules::Rules;
use crate::shard_message::{ApplyOutcome, ApplyStatus, IdentityConflict, IdentityNote, NoteReason};
use crate::state::{ChannelActivity, CustomerState, TimelineEntry};

/// What the router reported about an event's identifiers, each an actor event when the
/// event applies.
#[derive(Debug, Clone, Copy)]
pub(super) enum IdentityReport<'a> {
    /// A record routed before merges: `identity.conflict`, reason `conflict`.
    Conflict(&'a IdentityConflict),
    /// A note of a resolved event: `identity.conflict` with the note's reason, or
    /// `identity.merge_refused`.
    Note(&'a IdentityNote),
}

/// Refusals that must be decided before anything changes.
fn check_event(state: &CustomerState, event: &ChannelEvent, rules: &Rules) -> Option<ApplyOutcome> {
    if state.dedup.contains(&event.event_id) {
        return Some(outcome(ApplyStatus::Duplicate, Vec::new()));
    }
    match &event.kind {
        EventKind::Identify { profile } => {
            let new: Vec<&str> = profile
                .keys()
                .filter(|key| !state.profile.contains_key(*key))
                .map(String::as_str)
                .collect();
            let max = rules.limits.profile_fields_max;
            (state.profile.len() + new.len() > max).then(|| {
                unapplicable(format!(
                    "identify {} would give the customer {} profile fields (new: {}), above limits.profile_fields_max = {max}; send fewer distinct fields or raise the limit in the rules file",
                    event.event_id,
                    state.profile.len() + new.len(),
                    new.join(", ")
                ))
            })
        }
        EventKind::Consent { purpose, .. }
            if !state.consents.contains_key(purpose)
                && state.consents.len() >= rules.limits.consent_purposes_max =>
        {
            Some(unapplicable(format!(
                "consent {} names a new purpose '{purpose}', but the customer already has limits.consent_purposes_max = {} purposes; reuse a purpose or raise the limit in the rules file",
                event.event_id, rules.limits.consent_purposes_max
            )))
        }
        EventKind::Purchase(purchase) if state.orders.contains_key(&purchase.order_id) => {
            Some(outcome(ApplyStatus::Duplicate, Vec::new()))
        }
        EventKind::Return(ret) => {
            let Some(order) = state.orders.get(&ret.order_id) else {
                return Some(unapplicable(format!(
                    "return {} names order_id '{}', which this customer has no record of (unknown, or older than the last orders_max orders); send the purchase first or fix the order_id",
                    event.event_id, ret.order_id
                )));
            };
            let returnable = order.amount_minor - order.returned_minor;
            if ret.amount_minor > returnable {
                return Some(outcome(
                    ApplyStatus::Rejected(Rejection::new(
                        RejectReason::BadAmount,
                        format!(
                            "return {} amount {} is above what order '{}' has left to return ({} of {}); send at most the remaining amount",
                            event.event_id,
                            Money(ret.amount_minor),
                            ret.order_id,
                            Money(returnable),
                            Money(order.amount_minor)
                        ),
                    )),
                    Vec::new(),
                ));
            }
            None
        }
        _ => None,
    }
}

/// Applies one channel event, phase by phase: refusals decided before anything changes;
/// the customer created (or the time rules due by the event fired); identities linked and
/// the router's identity reports published; the channel counted; the event's own kind applied; then the
/// timeline, the dedup memory and the housekeeping every command ends with.
pub(super) fn apply_event(
    state: &mut CustomerState,
    event: &ChannelEvent,
    reports: &[IdentityReport<'_>],
    rules: &Rules,
) -> ApplyOutcome {
    if let Some(refused) = check_event(state, event, rules) {
        return refused;
    }
    let mut emitter = Emitter::new(&state.customer_id, &event.event_id);
    let is_new = start_or_catch_up(state, event, rules, &mut emitter);
    link_identities(state, event, reports, is_new, rules, &mut emitter);
    count_channel(state, event, rules);
    let summary = apply_kind(state, event, rules, &mut emitter);
    let at = event.occurred_at_ms;
    add_timeline(
        state,
        rules,
        TimelineEntry {
            at_ms: at,
            channel: event.channel.clone(),
            entry_type: event.kind.type_name().to_string(),
            summary,
            cause_id: event.event_id.clone(),
        },
    );
    state
        .dedup
        .remember(&event.event_id, rules.limits.event_ids_max);
    settle(state, rules, &mut emitter);
    outcome(ApplyStatus::Applied, emitter.into_events())
}

/// A new customer starts at the event (in the base tier, `customer.created`); a known one
/// first has the time rules due by the event fired. Returns whether the customer is new.
fn start_or_catch_up(
    state: &mut CustomerState,
    event: &ChannelEvent,
    rules: &Rules,
    emitter: &mut Emitter,
) -> bool {
    let at = event.occurred_at_ms;
    let is_new = !state.is_created();
    if is_new {
        state.created_at_ms = Some(at);
        state.clock_ms = at;
        loyalty::start_in_base_tier(&mut state.loyalty, rules, at);
        emitter.emit(
            at,
            CustomerCreated {
                channel: event.channel.clone(),
                event_type: event.kind.type_name().to_string(),
                identities: event
                    .identities
                    .iter()
                    .map(|i| IdentityValue {
                        kind: i.kind.as_str().to_string(),
                        value: i.value.clone(),
                    })
                    .collect(),
            },
        );
    } else {
        run_due(state, rules, at, emitter);
        state.created_at_ms = state.created_at_ms.map(|c| c.min(at));
    }
    state.clock_ms = state.clock_ms.max(at);
    is_new
}

/// Adds the event's identifiers the customer lacks (up to `identities_max`;
/// `identity.linked` unless the customer is new) and publishes what the router reported.
fn link_identities(
    state: &mut CustomerState,
    event: &ChannelEvent,
    reports: &[IdentityReport<'_>],
    is_new: bool,
    rules: &Rules,
    emitter: &mut Emitter,
) {
    let now = state.clock_ms;
    for identity in &event.identities {
        if state.identities.contains(identity) {
            continue;
        }
        if state.identities.len() >= rules.limits.identities_max {
            break;
        }
        state.identities.insert(identity.clone());
        if !is_new {
            emitter.emit(
                now,
                IdentityLinked {
                    kind: identity.kind.as_str().to_string(),
                    value: identity.value.clone(),
                    event_id: event.event_id.clone(),
                },
            );
        }
    }
    for report in reports {
        report_identity(report, &event.event_id, now, emitter);
    }
}

/// The actor event of one identity report.
fn report_identity(report: &IdentityReport<'_>, event_id: &str, now: i64, emitter: &mut Emitter) {
    let conflict = |kind: &str, other: Option<&String>, reason, limit: Option<(&str, u32)>| {
        IdentityConflictEvent {
            kind: kind.to_string(),
            other_customer_id: other.cloned(),
            event_id: event_id.to_string(),
            reason,
            limit: limit.map(|(_, limit)| limit),
            limit_kind: limit.map(|(kind, _)| kind.to_string()),
        }
    };
    match report {
        IdentityReport::Conflict(found) => emitter.emit(
            now,
            conflict(
                found.kind.as_str(),
                Some(&found.other_customer_id),
                ConflictReason::Conflict,
                None,
            ),
        ),
        IdentityReport::Note(note) => {
            let other = note.other_customer_id.as_ref();
            let kind = note.kind.as_str();
            match note.reason {
                NoteReason::MergeDisabled => emitter.emit(
                    now,
                    conflict(kind, other, ConflictReason::MergeDisabled, None),
                ),
                NoteReason::MaxPerCustomer {
                    kind: limit_kind,
                    limit,
                } => emitter.emit(
                    now,
                    conflict(
                        kind,
                        other,
                        ConflictReason::MaxPerCustomer,
                        Some((limit_kind.as_str(), limit)),
                    ),
                ),
                NoteReason::MergesPerDay { limit } => emitter.emit(
                    now,
                    IdentityMergeRefused {
                        kind: kind.to_string(),
                        other_customer_id: other.cloned(),
                        limit,
                        event_id: event_id.to_string(),
                    },
                ),
            }
        }
    }
}

/// Counts the event under its channel (or `other` beyond `channels_max`).
fn count_channel(state: &mut CustomerState, event: &ChannelEvent, rules: &Rules) {
    let at = event.occurred_at_ms;
    let channel = bounded_key(&state.channels, &event.channel, rules.limits.channels_max);
    let activity = state.channels.entry(channel).or_insert(ChannelActivity {
        events: 0,
        first_at_ms: at,
        last_at_ms: at,
    });
    activity.events += 1;
    activity.first_at_ms = activity.first_at_ms.min(at);
    activity.last_at_ms = activity.last_at_ms.max(at);
}

/// Applies what the event's kind changes; returns its timeline summary.
fn apply_kind(
    state: &mut CustomerState,
    event: &ChannelEvent,
    rules: &Rules,
    emitter: &mut Emitter,
) -> String {
    match &event.kind {
        EventKind::Purchase(purchase) => {
            purchase::apply_purchase(state, event, purchase, rules, emitter)
        }
        EventKind::Return(ret) => purchase::apply_return(state, event, ret, rules, emitter),
        EventKind::Identify { profile } => {
            profile::apply_identify(state, event, profile, rules, emitter)
        }
        _ => activity::apply_activity(state, event),
    }
}

/// Inserts in time order and keeps the most recent `timeline_max_entries`.
pub(super) fn add_timeline(state: &mut CustomerState, rules: &Rules, entry: TimelineEntry) {
    let position = state.timeline.partition_point(|e| e.at_ms <= entry.at_ms);
    state.timeline.insert(position, entry);
    while state.timeline.len() > rules.limits.timeline_max_entries {
        state.timeline.pop_front();
    }
}

/// The key to count `key` under in `map`, which holds at most `max` keys one by one: the
/// key itself while there is room (or it is there already), else `other`.
pub(super) fn bounded_key<V>(
    map: &std::collections::BTreeMap<String, V>,
    key: &str,
    max: usize,
) -> String {
    if map.contains_key(key) || map.len() < max {
        key.to_string()
    } else {
        OTHER_KEY.to_string()
    }
}

/// Where channels and categories beyond their limits are counted.
const OTHER_KEY: &str = "other";
