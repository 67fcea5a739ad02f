//! The single customer view: everything the engine knows about one customer.
//! (Placeholder shape; the domain helper fills it in.)

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    pub customer_id: String,
    /// Event time of the first applied event; `None` until the customer exists.
    pub created_at_ms: Option<i64>,
}

impl CustomerState {
    pub fn new(customer_id: &str) -> CustomerState {
        CustomerState { customer_id: customer_id.to_string(), created_at_ms: None }
    }
    /// Has any event been applied (should the state be stored)?
    pub fn exists(&self) -> bool {
        self.created_at_ms.is_some()
    }
    /// The earliest event time at which a time-driven rule may fire, if any.
    pub fn next_due_ms(&self) -> Option<i64> {
        None
    }
}
