//! The ground truth of a generated sample: per person, the identifiers used and the
//! distinct purchases and returns actually emitted, which tests and scripts compare the
//! cluster's answers with. Filled by [`super::Generator`] only.

use super::Archetype;
use crm_actors::identity::{Identity, IdentityKind};
use crm_actors::ingest::LineItem;

/// Ground truth: what was emitted, per person, counting each purchase and return once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Truth {
    /// Indexed by person (`GeneratedEvent::person`).
    pub people: Vec<PersonTruth>,
    /// Events emitted, duplicates excluded.
    pub events_distinct: u64,
    /// Duplicates emitted with the same `event_id`.
    pub duplicates_same_event_id: u64,
    /// Purchases re-sent under a new `event_id`.
    pub duplicates_same_order: u64,
}

/// What one person did in the emitted traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonTruth {
    pub archetype: Archetype,
    /// Normalised identifiers that appeared in this person's emitted events, in order of
    /// first appearance. Every one of them names this person and nobody else.
    pub identities: Vec<Identity>,
    /// Distinct purchases, in event-time order.
    pub purchases: Vec<TruePurchase>,
    /// Returns, in event-time order; at most one per order, never above its order.
    pub returns: Vec<TrueReturn>,
    /// Distinct events about this person (duplicates excluded).
    pub events: u64,
}

/// One distinct purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruePurchase {
    pub order_id: String,
    pub amount_minor: i64,
    pub channel: String,
    pub occurred_at_ms: i64,
    pub items: Vec<LineItem>,
    pub store_id: Option<String>,
}

/// One return of part (or all) of an earlier purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrueReturn {
    pub order_id: String,
    pub amount_minor: i64,
    pub channel: String,
    pub occurred_at_ms: i64,
    pub items: Vec<LineItem>,
}

impl PersonTruth {
    /// Sum of purchases minus returns, minor units.
    pub fn net_spend_minor(&self) -> i64 {
        self.gross_spend_minor() - self.returned_minor()
    }

    /// Sum of purchases, minor units.
    pub fn gross_spend_minor(&self) -> i64 {
        self.purchases.iter().map(|p| p.amount_minor).sum()
    }

    /// Sum of returns, minor units.
    pub fn returned_minor(&self) -> i64 {
        self.returns.iter().map(|r| r.amount_minor).sum()
    }

    /// The identifier of `kind`, if this person used one.
    pub fn identity(&self, kind: IdentityKind) -> Option<&Identity> {
        self.identities.iter().find(|i| i.kind == kind)
    }
}

impl Truth {
    /// Distinct purchases over everyone.
    pub fn purchases(&self) -> usize {
        self.people.iter().map(|p| p.purchases.len()).sum()
    }

    /// Returns over everyone.
    pub fn returns(&self) -> usize {
        self.people.iter().map(|p| p.returns.len()).sum()
    }

    /// Duplicates of either kind.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_same_event_id + self.duplicates_same_order
    }
}
