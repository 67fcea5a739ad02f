//! What the shard log carries, and what applying it yields.
//!
//! The router turns a validated [`ChannelEvent`] into a [`ShardMessage`] for the customer's
//! shard (batched: a [`ShardMessage::Routed`] record holds a routed chunk's events for one
//! shard); redeem commands and clock ticks travel the same log, so replaying a shard's log
//! reproduces every state change, time-driven ones included. [`ApplyOutcome`] is what one
//! command did to one customer: the actor events to publish, whether it was a duplicate or
//! refused, and the reply owed to a waiting client.

pub use crate::actor_event::ActorEvent;
use crate::identity::IdentityKind;
use crate::ingest::{ChannelEvent, Rejection};
use crate::value::live::ValueModel;
use serde::{Deserialize, Serialize};

/// One record of the shard log `crm.shard.<n>` (bincode, behind the codec's version byte).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // decoded once per record and moved; boxing buys nothing
pub enum ShardMessage {
    /// A command for one customer.
    Customer {
        customer_id: String,
        command: CustomerCommand,
        /// Where the node should send the command's reply once it is durable (an inbox the
        /// requester listens on); `None` when nobody waits.
        reply_to: Option<String>,
    },
    /// The shard's rule clock moves to `at_ms`: time-driven rules fire for every customer of
    /// the shard whose next due time is at or before it.
    Tick { at_ms: i64 },
    /// Channel events of several customers of the shard, in ingest order: what the router
    /// publishes, one record per shard per routed chunk, so that the shard log carries many
    /// events per message. Applied entry by entry, like that many `Customer` records.
    Routed { entries: Vec<RoutedCommand> },
    /// A new customer-value model (a cluster fit): every customer of the shard is scored
    /// under it (`value.segment_changed`, `churn.risk`), and later views use it. Appended
    /// by the shard's owner; a version at or below the shard's current one is skipped.
    ValueModel { model: ValueModel },
}

/// One entry of a [`ShardMessage::Routed`] record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedCommand {
    /// The `CRM_INGEST` stream sequence the event came from (a dead letter quotes it).
    pub ingest_seq: u64,
    pub customer_id: String,
    pub command: CustomerCommand,
}

/// A command applied by one customer actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerCommand {
    /// A channel event, with what the router learned while resolving its identity.
    Event {
        event: ChannelEvent,
        /// Set when a lower-priority identifier of the event belongs to another customer.
        conflict: Option<IdentityConflict>,
    },
    /// Spend points on a reward from the catalogue; idempotent by `request_id`.
    Redeem {
        request_id: String,
        reward_id: String,
        at_ms: i64,
    },
    /// Time-driven rules (expiry, pending release, lapse, tier anniversary) at `at_ms`.
    Tick { at_ms: i64 },
    /// Score the customer under a new customer-value model (made by the engine for every
    /// customer of the shard when a [`ShardMessage::ValueModel`] record is applied).
    Rescore { model: ValueModel },
}

/// Identifiers of one event that resolve to two customers; the event was applied to the
/// customer of the highest-priority identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityConflict {
    /// The kind of the identifier that pointed elsewhere.
    pub kind: IdentityKind,
    /// The customer that identifier belongs to.
    pub other_customer_id: String,
}

/// What happened to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApplyStatus {
    /// State changed (or a time rule ran).
    Applied,
    /// Already applied (same event id, or same order id): acknowledged, applied zero times.
    Duplicate,
    /// Valid input the rules refused; goes to the dead-letter stream with this reason.
    Rejected(Rejection),
}

/// The outcome of a redeem command: the JSON reply on `crm.cmd.redeem`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeemOutcome {
    pub request_id: String,
    pub customer_id: String,
    pub reward_id: String,
    /// `true`: the points were spent.
    pub approved: bool,
    /// Points spent (0 when denied).
    pub points_spent: i64,
    /// Balance after the command.
    pub points_balance: i64,
    /// Why it was denied (`insufficient_points`, `unknown_reward`, `unknown_customer`, ...).
    pub reason: Option<String>,
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    pub status: ApplyStatus,
    pub events: Vec<ActorEvent>,
    /// The reply owed to the requester of a `Redeem` (also for a repeated request id).
    pub redeem: Option<RedeemOutcome>,
}
