//! Applying one command to one customer (placeholder; the domain helper fills it in).
use crate::command::{ApplyOutcome, ApplyStatus, CustomerCommand};
use crate::rules::Rules;
use crate::state::CustomerState;

pub fn apply(state: &mut CustomerState, command: &CustomerCommand, _rules: &Rules) -> ApplyOutcome {
    if let CustomerCommand::Event { event, .. } = command {
        state.created_at_ms.get_or_insert(event.occurred_at_ms);
    }
    ApplyOutcome { status: ApplyStatus::Applied, events: Vec::new(), redeem: None }
}
