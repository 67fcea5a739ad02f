//! Applying one command to one customer: the single pure function from (state, command,
//! rules) to (new state, outcome).
//!
//! The customer actor calls [`apply`] for every command read from the shard log (channel
//! events, redeem requests, ticks), and a replay calls it again with the same commands in the
//! same order, so it must stay deterministic: no wall clock, no randomness, no I/O, no hash
//! iteration order. Event time drives everything: before an event (or a tick, or a redeem)
//! is applied, the time rules due up to its time fire in time order (pending release, lot
//! expiry, tier review, lapse, win-back); after it, the rules due up to the customer's clock
//! fire again so that a late event's consequences are never left behind. Dedup happens here:
//! a seen event id or order id is a [`ApplyStatus::Duplicate`] and changes nothing.
//!
//! By concern: this file holds the entry point and the time rules (ticks, settling);
//! [`event`] a channel event's phases; [`purchase`] purchases and returns; [`profile`]
//! identify (and its completion bonus); [`activity`] the counted interactions (views, carts,
//! support, email, visits, consent); [`redeem`] redeem requests; [`merge`] the merge
//! commands, the events a survivor holds back while a merge is under way, and the state
//! merge. A tombstone (a customer merged away) refuses channel events, denies redeems
//! (`merged_into:<survivor>`) and has no time rules or score.

mod activity;
mod event;
mod merge;
#[cfg(test)]
mod merge_tests;
mod profile;
mod purchase;
mod redeem;
#[cfg(test)]
mod tests;

pub use merge::merge_into;

use crate::emit::Emitter;
use crate::ingest::{RejectReason, Rejection};
use crate::loyalty;
use crate::retention;
use crate::rules::Rules;
use crate::shard_message::{ActorEvent, ApplyOutcome, ApplyStatus, CustomerCommand};
use crate::state::CustomerState;

/// Most time-rule firings one command may run (a safety stop; a clock jump of a century
/// with daily reviews stays far below it).
const FIRINGS_MAX: usize = 1_000_000;

/// Applies one command. See the module docs for the order of things.
pub fn apply(state: &mut CustomerState, command: &CustomerCommand, rules: &Rules) -> ApplyOutcome {
    match command {
        CustomerCommand::Event { event, conflict } => merge::apply_channel(
            state,
            merge::Channel {
                event,
                notes: &[],
                merges: &[],
                conflict: conflict.as_ref(),
            },
            rules,
        ),
        CustomerCommand::ResolvedEvent {
            event,
            notes,
            merges,
        } => merge::apply_channel(
            state,
            merge::Channel {
                event,
                notes,
                merges,
                conflict: None,
            },
            rules,
        ),
        CustomerCommand::MergeOut { merge } => merge::apply_merge_out(state, merge, rules),
        CustomerCommand::MergeIn {
            merge,
            state: merged,
        } => merge::apply_merge_in(state, merge, merged, rules),
        CustomerCommand::Redeem {
            request_id,
            reward_id,
            at_ms,
        } => redeem::apply_redeem(state, request_id, reward_id, *at_ms, rules),
        CustomerCommand::Tick { at_ms } => apply_tick(state, *at_ms, rules),
        CustomerCommand::Rescore { model } => rescore(
            state,
            model,
            rules,
            &format!("value-{}-{}", model.version, state.customer_id),
        ),
        CustomerCommand::RescoreMerged { model, merged_id } => rescore(
            state,
            model,
            rules,
            &format!("merge-{merged_id}-value-{}", model.version),
        ),
    }
}

/// Scores the customer under `model` (nothing for a tombstone or a customer not created).
fn rescore(
    state: &mut CustomerState,
    model: &crate::value::live::ValueModel,
    rules: &Rules,
    cause: &str,
) -> ApplyOutcome {
    if !state.is_created() || state.is_tombstone() {
        return outcome(ApplyStatus::Applied, Vec::new());
    }
    let mut emitter = Emitter::new(&state.customer_id, cause);
    crate::value::live::rescore(state, model, rules, &mut emitter);
    outcome(ApplyStatus::Applied, emitter.into_events())
}

fn outcome(status: ApplyStatus, events: Vec<ActorEvent>) -> ApplyOutcome {
    ApplyOutcome {
        status,
        events,
        ..ApplyOutcome::default()
    }
}

/// The customer as the time rules will leave them at `at_ms` (expired lots gone, pending
/// points released, a due lapse declared), for a view only: the stored state is not
/// touched, and the events those rules emit when a tick or an event really runs them are
/// dropped here. Borrowed unchanged when nothing is due by then.
pub fn settled_as_of<'a>(
    state: &'a CustomerState,
    at_ms: i64,
    rules: &Rules,
) -> std::borrow::Cow<'a, CustomerState> {
    match state.next_due_ms() {
        Some(due) if due <= at_ms => {
            let mut settled = state.clone();
            let mut dropped = Emitter::new(&state.customer_id, "view");
            run_due(&mut settled, rules, at_ms, &mut dropped);
            std::borrow::Cow::Owned(settled)
        }
        _ => std::borrow::Cow::Borrowed(state),
    }
}

/// Fires every time rule due at or before `until_ms`, in time order.
fn run_due(state: &mut CustomerState, rules: &Rules, until_ms: i64, emitter: &mut Emitter) {
    for _ in 0..FIRINGS_MAX {
        let Some(due) = state.next_due_ms() else {
            return;
        };
        if due > until_ms {
            return;
        }
        fire_at(state, rules, due, emitter);
    }
    debug_assert!(
        false,
        "time rules did not settle within {FIRINGS_MAX} firings"
    );
}

fn fire_at(state: &mut CustomerState, rules: &Rules, now_ms: i64, emitter: &mut Emitter) {
    state.clock_ms = state.clock_ms.max(now_ms);
    loyalty::release_due(&mut state.loyalty, rules, now_ms, emitter);
    for (source, points) in loyalty::expire_due(&mut state.loyalty, now_ms, emitter) {
        // A return of that order must not take these points again from other lots.
        if let Some(order) = state.orders.get_mut(&source) {
            order.points_expired = order.points_expired.saturating_add(points);
        }
    }
    if state
        .loyalty
        .tier_review_at_ms
        .is_some_and(|at| at <= now_ms)
    {
        loyalty::review_tier(&mut state.loyalty, rules, now_ms, emitter);
    }
    if state.retention.lapse_due_ms.is_some_and(|at| at <= now_ms) {
        retention::lapse(&mut state.retention, rules, now_ms, emitter);
    }
    if state
        .retention
        .winback_due_ms
        .is_some_and(|at| at <= now_ms)
    {
        retention::offer_winback(&mut state.retention, now_ms, emitter);
    }
}

/// Housekeeping after every applied command.
fn settle(state: &mut CustomerState, rules: &Rules, emitter: &mut Emitter) {
    let clock = state.clock_ms;
    // Rules may have been reloaded since the lapse time was computed.
    retention::schedule(&mut state.retention, rules);
    run_due(state, rules, clock, emitter);
    loyalty::prune_spend(&mut state.loyalty, rules, clock);
    state.rules_version = rules.version;
}

fn apply_tick(state: &mut CustomerState, at_ms: i64, rules: &Rules) -> ApplyOutcome {
    if !state.is_created() || state.is_tombstone() {
        return outcome(ApplyStatus::Applied, Vec::new());
    }
    // A tick reaches every due customer of the shard: the cause names the customer too, or
    // their events would share ids (and CRM_EVENTS would keep only the first).
    let cause = format!("tick-{at_ms}-{}", state.customer_id);
    let mut emitter = Emitter::new(&state.customer_id, &cause);
    run_due(state, rules, at_ms, &mut emitter);
    state.clock_ms = state.clock_ms.max(at_ms);
    settle(state, rules, &mut emitter);
    outcome(ApplyStatus::Applied, emitter.into_events())
}

fn unapplicable(message: String) -> ApplyOutcome {
    outcome(
        ApplyStatus::Rejected(Rejection::new(RejectReason::Unapplicable, message)),
        Vec::new(),
    )
}
