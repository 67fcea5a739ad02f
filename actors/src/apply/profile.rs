//! Identify events: profile fields updated (newest wins per field) and the one-time
//! profile-completion bonus. Called by [`super::event::apply_event`]; returns the timeline
//! summary.

use crate::actor_event::EarnReason;
use crate::emit::Emitter;
use crate::ingest::ChannelEvent;
use crate::loyalty::{self, Grant};
use crate::rules::Rules;
use crate::state::{CustomerState, ProfileValue};

pub(super) fn apply_identify(
    state: &mut CustomerState,
    event: &ChannelEvent,
    profile: &std::collections::BTreeMap<String, String>,
    rules: &Rules,
    emitter: &mut Emitter,
) -> String {
    let at = event.occurred_at_ms;
    let mut changed = Vec::new();
    for (key, value) in profile {
        let newer = state
            .profile
            .get(key)
            .is_none_or(|existing| at >= existing.updated_at_ms);
        if newer {
            state.profile.insert(
                key.clone(),
                ProfileValue {
                    value: value.clone(),
                    updated_at_ms: at,
                },
            );
            changed.push(key.as_str());
        }
    }
    let bonus = rules.earning.profile_completion_bonus_points;
    let complete = !rules.earning.profile_completion_fields.is_empty()
        && rules.earning.profile_completion_fields.iter().all(|field| {
            state
                .profile
                .get(field)
                .is_some_and(|v| !v.value.trim().is_empty())
        });
    if bonus > 0 && complete && !state.loyalty.profile_bonus_granted {
        state.loyalty.profile_bonus_granted = true;
        let now = state.clock_ms;
        loyalty::grant(
            &mut state.loyalty,
            rules,
            Grant {
                source: "bonus:profile_completion",
                earned_at_ms: now,
                points: bonus,
                pending_allowed: false,
            },
            now,
            emitter,
            EarnReason::ProfileCompletion {
                event_id: event.event_id.clone(),
            },
        );
    }
    if changed.is_empty() {
        "profile seen".to_string()
    } else {
        format!("profile updated: {}", changed.join(", "))
    }
}
