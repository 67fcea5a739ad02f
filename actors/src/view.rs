//! The 360 view JSON (placeholder; the domain helper fills it in).
use crate::rules::Rules;
use crate::state::CustomerState;

pub fn customer_view(state: &CustomerState, _as_of_ms: i64, _rules: &Rules) -> serde_json::Value {
    serde_json::json!({"customer_id": state.customer_id})
}
