//! Collecting the actor events of one command.
//!
//! [`crate::apply`] makes one [`Emitter`] per command and hands it to the rule engines
//! ([`crate::loyalty`], [`crate::retention`], [`crate::value::live`]), which add the events
//! their rules fire. This module sits below all of them: it depends on none of the rule
//! engines (the module graph is `apply -> rule engines -> emit`), and it never decides
//! anything itself: no clock, no I/O, ids are derived from the command's cause only.

use crate::actor_event::{ActorEvent, ActorEventData};

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
    pub fn emit(&mut self, at_ms: i64, data: impl Into<ActorEventData>) {
        let data = data.into();
        let id = format!("{}:{}:{}", self.cause, data.event_type(), self.events.len());
        self.events.push(ActorEvent {
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
