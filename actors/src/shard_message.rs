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
    /// A channel event as the router resolved it under the identity rules: what the router
    /// noted about its identifiers (conflicts, refusals, each with its reason; the
    /// identifiers concerned are already dropped from `event.identities`) and the customers
    /// this event merges into this one (the survivor). The survivor holds this event (and
    /// every later channel event or merge-out) back until each merged customer's state
    /// has arrived ([`CustomerCommand::MergeIn`]), then applies them in order. What the
    /// router writes for every event (`Event` is the older record, still read).
    ResolvedEvent {
        event: ChannelEvent,
        notes: Vec<IdentityNote>,
        merges: Vec<MergeRef>,
    },
    /// This customer is merged into `merge.survivor_id`: its state leaves in a
    /// [`MergeTransfer`] (the engine appends it to the survivor's shard log as a `MergeIn`)
    /// and it becomes a tombstone that says where it went. Written by the router into the
    /// merged customer's shard log at the position of the event that caused the merge.
    MergeOut { merge: MergeRef },
    /// The state of a merged customer, as it was when its `MergeOut` applied: merged into
    /// this customer field by field (`docs/rules.md`), exactly once per merged customer.
    MergeIn {
        merge: MergeRef,
        state: Box<crate::state::CustomerState>,
    },
    /// Score a survivor under the shard's current customer-value model right after a
    /// merged customer's state came in (made by the engine after each `MergeIn` when the
    /// shard has a model; never written to a log, like `Rescore`): the merged purchases
    /// change the survivor's value at once, not at the next model. Its events are caused by
    /// `merge-<merged_id>-value-<version>`.
    RescoreMerged {
        model: ValueModel,
        merged_id: String,
    },
}

/// One merge: `merged_id` goes into `survivor_id` because of the event `cause_event_id`.
/// A customer is merged away at most once, so `merged_id` identifies the merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRef {
    pub merged_id: String,
    pub survivor_id: String,
    /// The linking event's id.
    pub cause_event_id: String,
    /// The linking event's time (Unix ms).
    pub at_ms: i64,
}

/// What the router noted about one identifier of an event it did not link as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityNote {
    pub kind: IdentityKind,
    /// The customer the identifier belongs to (`None`: an unknown identifier that was not
    /// linked, e.g. one too many of its kind).
    pub other_customer_id: Option<String>,
    pub reason: NoteReason,
}

/// Why an identifier of an event was not linked to (or merged into) the event's customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteReason {
    /// It belongs to another customer and its kind may not join two customers
    /// (`[identity.<kind>] merge = false`): `identity.conflict`, reason `merge_disabled`.
    MergeDisabled,
    /// Linking it, or merging its customer, would give the customer more identifiers of a
    /// kind than `[identity.<kind>] max_per_customer`: `identity.conflict`, reason
    /// `max_per_customer`.
    MaxPerCustomer { kind: IdentityKind, limit: u32 },
    /// The survivor already absorbed `identity.merges_max_per_day` merges on the event's
    /// day: `identity.merge_refused`.
    MergesPerDay { limit: u32 },
}

/// A merged customer's state on its way to the survivor's shard log, made when its
/// `MergeOut` applied (or forwarded by a survivor that was itself merged away meanwhile).
/// The node appends it to `crm.shard.<shard of to_customer_id>` as a
/// [`CustomerCommand::MergeIn`] with `Nats-Msg-Id` [`MergeTransfer::message_id`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeTransfer {
    pub merge: MergeRef,
    /// Where the state goes: `merge.survivor_id`, or where that customer went.
    pub to_customer_id: String,
    pub state: crate::state::CustomerState,
}

impl MergeTransfer {
    /// The shard-log message id: the same transfer appended twice is stored once.
    pub fn message_id(&self) -> String {
        format!("m-{}-{}", self.merge.merged_id, self.to_customer_id)
    }
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
    /// A merged customer's state to append to the survivor's shard log (a `MergeOut`, or
    /// a `MergeIn` that reached a customer merged away meanwhile).
    pub transfer: Option<Box<MergeTransfer>>,
    /// Channel events held back for a merge and applied by this command (the `MergeIn`
    /// that completed the merge), in order, with what became of each: the node counts
    /// them and dead-letters the refused ones.
    pub released: Vec<Released>,
}

/// A held-back channel event applied when its merge completed.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub event_id: String,
    pub status: ApplyStatus,
}

impl Default for ApplyOutcome {
    /// Applied, with nothing to publish.
    fn default() -> Self {
        ApplyOutcome {
            status: ApplyStatus::Applied,
            events: Vec::new(),
            redeem: None,
            transfer: None,
            released: Vec::new(),
        }
    }
}
