//! The public JSON form of an actor event, as dashboards receive it on
//! `crm.events.<type>.<customer_id>` and replay it from `CRM_EVENTS`.
//!
//! `{"v": 1, "id": ..., "type": ..., "customer_id": ..., "at": RFC 3339, ...type fields}`.
//! `id` is deterministic (cause and index), so a dashboard can drop repeats.

use crm_actors::shard_message::ActorEvent;
use crm_actors::time::format_rfc3339;
use serde_json::{Map, Value};

/// The JSON object published for one actor event.
pub fn event_json(event: &ActorEvent) -> Value {
    let mut object = Map::with_capacity(event.data.len() + 5);
    object.insert("v".into(), Value::from(1));
    object.insert("id".into(), Value::from(event.id.clone()));
    object.insert("type".into(), Value::from(event.event_type.clone()));
    object.insert("customer_id".into(), Value::from(event.customer_id.clone()));
    object.insert("at".into(), Value::from(format_rfc3339(event.at_ms)));
    for (key, value) in &event.data {
        object.entry(key.clone()).or_insert_with(|| value.clone());
    }
    Value::Object(object)
}
