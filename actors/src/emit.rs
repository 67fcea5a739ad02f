//! Collecting the actor events of one command.
//!
//! [`crate::apply`] makes one [`Emitter`] per command and hands it to the rule engines
//! ([`crate::loyalty`], [`crate::retention`], [`crate::value::live`]), which add the events
//! their rules fire. This module sits below all of them: it depends on none of the rule
//! engines (the module graph is `apply -> rule engines -> emit`), and it never decides
//! anything itself: no clock, no I/O, ids are derived from the command's cause only.

use crate::shard_message::ActorEvent;
use crate::time::format_rfc3339;
use serde_json::{Map, Value};

/// Collects the actor events of one command, with deterministic ids
/// `<cause>:<event_type>:<index>`.
#[derive(Debug)]
pub struct Emitter {
    customer_id: String,
    cause: String,
    events: Vec<ActorEvent>,
}

impl Emitter {
    pub fn new(customer_id: &str, cause: &str) -> Emitter {
        Emitter {
            customer_id: customer_id.to_string(),
            cause: cause.to_string(),
            events: Vec::new(),
        }
    }

    /// Adds one event at event time `at_ms`.
    pub fn emit(&mut self, event_type: &str, at_ms: i64, data: Map<String, Value>) {
        let id = format!("{}:{}:{}", self.cause, event_type, self.events.len());
        self.events.push(ActorEvent {
            event_type: event_type.to_string(),
            customer_id: self.customer_id.clone(),
            at_ms,
            id,
            data,
        });
    }

    pub fn into_events(self) -> Vec<ActorEvent> {
        self.events
    }
}

/// The fields of a JSON object (empty for anything else): the `data` of an actor event.
pub(crate) fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// An optional instant as RFC 3339 or JSON null.
pub fn optional_time(at_ms: Option<i64>) -> Value {
    at_ms.map_or(Value::Null, |t| Value::from(format_rfc3339(t)))
}
