//! Redeem requests: spend points on a reward of the catalogue, idempotent by request id
//! (a repeated request gets the first answer). The time rules due by the request fire
//! first, so expired points cannot be spent.

use super::event::add_timeline;
use super::{run_due, settle};
use crate::actor_event::PointsRedeemed;
use crate::emit::Emitter;
use crate::loyalty;
use crate::rules::Rules;
use crate::shard_message::{ApplyOutcome, ApplyStatus, RedeemOutcome};
use crate::state::{CustomerState, Redemption, TimelineEntry};

pub(super) fn apply_redeem(
    state: &mut CustomerState,
    request_id: &str,
    reward_id: &str,
    at_ms: i64,
    rules: &Rules,
) -> ApplyOutcome {
    let deny = |state: &CustomerState, reason: &str| RedeemOutcome {
        request_id: request_id.to_string(),
        customer_id: state.customer_id.clone(),
        reward_id: reward_id.to_string(),
        approved: false,
        points_spent: 0,
        points_balance: state.loyalty.balance(),
        reason: Some(reason.to_string()),
    };
    if let Some(into) = &state.merge.merged_into {
        // Merged away: the requester asks again of the survivor; nothing is remembered.
        return ApplyOutcome {
            redeem: Some(deny(state, &format!("merged_into:{into}"))),
            ..ApplyOutcome::default()
        };
    }
    if let Some(previous) = state
        .loyalty
        .redemptions
        .iter()
        .find(|r| r.outcome.request_id == request_id)
    {
        return ApplyOutcome {
            status: ApplyStatus::Duplicate,
            events: Vec::new(),
            redeem: Some(previous.outcome.clone()),
            ..ApplyOutcome::default()
        };
    }
    if !state.merge.awaiting.is_empty() {
        // A merged customer's state is on its way: the request may be one that customer
        // already answered (a retry), which only its state can tell. Nothing is remembered:
        // asked again once the merge completed, it gets the right answer.
        return ApplyOutcome {
            redeem: Some(deny(state, "merge_pending")),
            ..ApplyOutcome::default()
        };
    }
    if !state.is_created() {
        return ApplyOutcome {
            status: ApplyStatus::Applied,
            events: Vec::new(),
            redeem: Some(deny(state, "unknown_customer")),
            ..ApplyOutcome::default()
        };
    }
    let mut emitter = Emitter::new(&state.customer_id, request_id);
    run_due(state, rules, at_ms, &mut emitter);
    state.clock_ms = state.clock_ms.max(at_ms);
    let now = state.clock_ms;

    let result = match rules.rewards.get(reward_id) {
        None => deny(state, "unknown_reward"),
        Some(reward) if state.loyalty.balance() < reward.points_cost => {
            deny(state, "insufficient_points")
        }
        Some(reward) => {
            let spent = loyalty::spend_oldest_first(&mut state.loyalty, reward.points_cost);
            debug_assert_eq!(spent, reward.points_cost);
            state.loyalty.redeemed_total = state.loyalty.redeemed_total.saturating_add(spent);
            let balance = state.loyalty.balance();
            emitter.emit(
                now,
                PointsRedeemed {
                    request_id: request_id.to_string(),
                    reward_id: reward.id.clone(),
                    reward_name: reward.name.clone(),
                    points: spent,
                    points_balance: balance,
                },
            );
            add_timeline(
                state,
                rules,
                TimelineEntry {
                    at_ms: now,
                    channel: "loyalty".to_string(),
                    entry_type: "redeem".to_string(),
                    summary: format!("redeemed {} for {spent} points", reward.name),
                    cause_id: request_id.to_string(),
                },
            );
            RedeemOutcome {
                request_id: request_id.to_string(),
                customer_id: state.customer_id.clone(),
                reward_id: reward_id.to_string(),
                approved: true,
                points_spent: spent,
                points_balance: balance,
                reason: None,
            }
        }
    };
    state.loyalty.redemptions.push_back(Redemption {
        at_ms: now,
        outcome: result.clone(),
    });
    while state.loyalty.redemptions.len() > rules.limits.redemptions_max {
        state.loyalty.redemptions.pop_front();
    }
    settle(state, rules, &mut emitter);
    ApplyOutcome {
        status: ApplyStatus::Applied,
        events: emitter.into_events(),
        redeem: Some(result),
        ..ApplyOutcome::default()
    }
}
