//! The public JSON form of an actor event, as dashboards receive it on
//! `crm.events.<type>.<customer_id>` and replay it from `CRM_EVENTS`.
//!
//! `{"v": 1, "id": ..., "type": ..., "customer_id": ..., "at": RFC 3339, ...type fields}`.
//! `id` is deterministic (cause and index), so a dashboard can drop repeats. The shape is
//! the serde form of [`crm_actors::actor_event::ActorEventJson`] (one struct per type, a
//! JSON Schema can be generated from it); this module only names it for the publisher.

use crm_actors::shard_message::ActorEvent;
use serde_json::Value;

/// The JSON object published for one actor event.
pub fn event_json(event: &ActorEvent) -> Value {
    event.to_json()
}
