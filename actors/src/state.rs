//! The single customer view: everything the engine knows about one customer, as stored.
//!
//! [`crate::apply::apply`] is the only writer; the store persists it with bincode, the view
//! renders it as JSON. The state is deterministic data: integers only (minor units, points,
//! Unix ms), ordered collections only (`BTreeMap`, `BTreeSet`, `VecDeque`, sorted `Vec`), and
//! every collection is bounded by a `[limits]` value of the rules file, so replaying the same
//! log yields byte-identical bincode. It must never hold floats, hash maps, wall-clock times
//! or untyped JSON, and it never enforces rules itself: it only records what apply decided.

use crate::identity::Identity;
use crate::shard_message::RedeemOutcome;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One customer's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    pub customer_id: String,
    /// Earliest event time seen; `None` until the customer exists.
    pub created_at_ms: Option<i64>,
    /// The customer's rule clock: the latest event or tick time applied. Never goes back.
    pub clock_ms: i64,
    /// Version of the rules that last changed this state.
    pub rules_version: u32,
    /// Every identifier seen on this customer's events.
    pub identities: BTreeSet<Identity>,
    /// Profile attributes, newest event time wins.
    pub profile: BTreeMap<String, ProfileValue>,
    /// Consents by purpose, newest event time wins.
    pub consents: BTreeMap<String, Consent>,
    /// Activity per channel.
    pub channels: BTreeMap<String, ChannelActivity>,
    /// Most recent interactions, ascending by time, at most `timeline_max_entries`.
    pub timeline: VecDeque<TimelineEntry>,
    pub purchases: PurchaseSummary,
    pub returns: ReturnSummary,
    /// Recent orders by order id, at most `orders_max` (the one applied longest ago
    /// dropped).
    pub orders: BTreeMap<String, OrderRecord>,
    pub browsing: Browsing,
    pub support: Support,
    pub email: EmailEngagement,
    pub visits: Visits,
    pub loyalty: Loyalty,
    pub retention: RetentionState,
    pub dedup: Dedup,
    /// Purchase days for the customer-value models (`crate::value::live`).
    pub value: ValueHistory,
    /// Where the last applied customer-value model put the customer.
    pub value_standing: ValueStanding,
    /// Merges: where this customer went, who was merged into it, and what it holds back
    /// while a merge is under way. Last, so that a format-3 state decodes with it appended.
    pub merge: MergeState,
}

/// A customer's part in merges (`docs/rules.md`, Merges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeState {
    /// Set once this customer was merged away: it is a tombstone, and every query,
    /// command and event for it belongs to this customer (follow the chain).
    pub merged_into: Option<String>,
    pub merged_at_ms: Option<i64>,
    /// Every customer merged into this one (directly or through chains), by customer id;
    /// at most `limits.merged_from_max` (the earliest merge forgotten beyond it).
    pub merged_from: Vec<MergedFrom>,
    /// Merged customers whose state has not arrived yet.
    pub awaiting: BTreeSet<String>,
    /// Commands held back until `awaiting` is empty, in log order, at most
    /// `limits.merge_buffer_max`.
    pub held: VecDeque<HeldCommand>,
}

impl MergeState {
    /// Does this customer take part in a merge (merged away, merged into, or waiting)?
    pub fn is_involved(&self) -> bool {
        self.merged_into.is_some()
            || !self.merged_from.is_empty()
            || !self.awaiting.is_empty()
            || !self.held.is_empty()
    }

    /// Is a merge of `customer_id` into this customer already applied (while remembered:
    /// at most `limits.merged_from_max` merges)?
    pub fn has_merged(&self, customer_id: &str) -> bool {
        self.merged_from
            .iter()
            .any(|m| m.customer_id == customer_id)
    }
}

/// A command a survivor holds back while a merge is under way: channel events and
/// merge-outs (redeems, ticks and rescores apply at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldCommand {
    Event {
        event: crate::ingest::ChannelEvent,
        notes: Vec<crate::shard_message::IdentityNote>,
        merges: Vec<crate::shard_message::MergeRef>,
    },
    MergeOut {
        merge: crate::shard_message::MergeRef,
    },
}

/// A customer merged into this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedFrom {
    pub customer_id: String,
    pub at_ms: i64,
    pub cause_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileValue {
    pub value: String,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub granted: bool,
    pub at_ms: i64,
    pub channel: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelActivity {
    pub events: u64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at_ms: i64,
    pub channel: String,
    /// `purchase`, `return`, `redeem`, ... (the event type or the loyalty action).
    pub entry_type: String,
    pub summary: String,
    /// The event or request id that caused it.
    pub cause_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseSummary {
    /// Purchases in every accepted currency.
    pub count: u64,
    /// Purchases in the loyalty currency: those `total_spend_minor` adds up.
    pub count_in_currency: u64,
    /// Gross spend in the loyalty currency, minor units (returns are in
    /// [`ReturnSummary`]).
    pub total_spend_minor: i64,
    pub first_at_ms: Option<i64>,
    pub last_at_ms: Option<i64>,
    pub by_channel_minor: BTreeMap<String, i64>,
    pub by_category_minor: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnSummary {
    /// Returns in every accepted currency.
    pub count: u64,
    /// Refunds of orders in the loyalty currency, minor units.
    pub total_minor: i64,
    pub last_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub at_ms: i64,
    pub amount_minor: i64,
    /// ISO 4217 code; only orders in the rules' currency count toward spend and tiers.
    pub currency: String,
    pub channel: String,
    /// Points granted for the order (multiplied points plus any first-purchase bonus),
    /// pending ones included.
    pub points_granted: i64,
    /// Points already taken back by returns.
    pub points_reversed: i64,
    /// Amount already returned, minor units.
    pub returned_minor: i64,
    /// Points of the order's own lots that expired and that no return has accounted for
    /// yet: a return takes these back from nothing (they are gone already), not from the
    /// customer's other lots.
    pub points_expired: i64,
    /// The customer's purchase count when the order was applied (0 for the first): the
    /// order applied longest ago is the one dropped beyond `orders_max`.
    pub applied_n: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Browsing {
    pub views: u64,
    pub cart_adds: u64,
    pub cart_removes: u64,
    pub last_viewed_category: Option<String>,
    pub last_at_ms: Option<i64>,
}

/// Most open tickets remembered.
pub const OPEN_TICKETS_MAX: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Support {
    pub open_tickets: BTreeSet<String>,
    pub opened: u64,
    pub resolved: u64,
    /// Sum and count of satisfaction scores (1 to 5).
    pub satisfaction_sum: u64,
    pub satisfaction_count: u64,
    pub last_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailEngagement {
    pub sent: u64,
    pub opened: u64,
    pub clicked: u64,
    pub last_campaign: Option<String>,
    pub last_engaged_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visits {
    pub count: u64,
    pub last_at_ms: Option<i64>,
    pub last_store_id: Option<String>,
}

/// Points that are spendable: one lot per order (or bonus), spent oldest expiry first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsLot {
    pub earned_at_ms: i64,
    /// `None`: never expires.
    pub expires_at_ms: Option<i64>,
    pub points: i64,
    /// The order id, or `bonus:<kind>`.
    pub source: String,
}

/// Points earned but not yet spendable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPoints {
    pub earned_at_ms: i64,
    pub release_at_ms: i64,
    pub points: i64,
    /// The order id, or `bonus:<kind>`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierChange {
    pub at_ms: i64,
    pub from: Option<String>,
    pub to: String,
    /// `up`, `down` or `initial`.
    pub direction: String,
    /// Rolling net spend at the change, minor units.
    pub rolling_spend_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redemption {
    pub at_ms: i64,
    pub outcome: RedeemOutcome,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loyalty {
    /// Sorted by (expiry, earn time, source); expiry `None` last.
    pub lots: Vec<PointsLot>,
    /// Sorted by (release time, source).
    pub pending: Vec<PendingPoints>,
    pub tier: Option<String>,
    pub tier_since_ms: Option<i64>,
    /// When the current tier is next reviewed for a downgrade; `None` for the base tier.
    pub tier_review_at_ms: Option<i64>,
    pub tier_history: VecDeque<TierChange>,
    /// Net spend (purchases minus returns, by order day) per UTC day index, for tiers.
    pub spend_by_day_minor: BTreeMap<i64, i64>,
    /// Points a return should have taken back but the balance could not cover.
    pub shortfall_points: i64,
    /// Redeem requests by arrival, at most `redemptions_max`.
    pub redemptions: VecDeque<Redemption>,
    pub profile_bonus_granted: bool,
    /// Was the first-purchase bonus granted (on the first purchase in the loyalty
    /// currency applied)?
    pub first_purchase_bonus_granted: bool,
    pub earned_total: i64,
    pub redeemed_total: i64,
    pub expired_total: i64,
    pub reversed_total: i64,
}

impl Loyalty {
    /// Spendable points.
    pub fn balance(&self) -> i64 {
        self.lots
            .iter()
            .fold(0i64, |sum, l| sum.saturating_add(l.points))
    }

    /// Earned, not yet spendable points.
    pub fn pending_points(&self) -> i64 {
        self.pending
            .iter()
            .fold(0i64, |sum, p| sum.saturating_add(p.points))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionStatus {
    /// No purchase yet.
    #[default]
    New,
    Active,
    Lapsed,
}

impl RetentionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionStatus::New => "new",
            RetentionStatus::Active => "active",
            RetentionStatus::Lapsed => "lapsed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionState {
    pub status: RetentionStatus,
    /// Distinct purchase times, at most `orders_max` (the oldest dropped).
    pub purchase_times_ms: BTreeSet<i64>,
    /// When the customer lapses if they do not buy again (active customers only).
    pub lapse_due_ms: Option<i64>,
    pub lapsed_at_ms: Option<i64>,
    pub lapse_reason: Option<String>,
    pub lapse_count: u32,
    /// When the win-back offer for the current lapse is due (cleared once made).
    pub winback_due_ms: Option<i64>,
    /// Was the offer made for the current lapse?
    pub winback_offered: bool,
    pub winback_offered_at_ms: Option<i64>,
    pub reactivated_count: u32,
}

impl RetentionState {
    /// Mean gap between distinct purchase times, ms; `None` below two purchases.
    pub fn mean_gap_ms(&self) -> Option<i64> {
        let first = *self.purchase_times_ms.first()?;
        let last = *self.purchase_times_ms.last()?;
        let gaps = self.purchase_times_ms.len() as i64 - 1;
        (gaps > 0).then(|| (last - first) / gaps)
    }

    pub fn last_purchase_ms(&self) -> Option<i64> {
        self.purchase_times_ms.last().copied()
    }
}

/// Recently applied event ids (FIFO, at most `event_ids_max`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    pub seen: BTreeSet<String>,
    pub order: VecDeque<String>,
}

impl Dedup {
    pub fn contains(&self, event_id: &str) -> bool {
        self.seen.contains(event_id)
    }

    pub fn remember(&mut self, event_id: &str, max: usize) {
        if self.seen.insert(event_id.to_string()) {
            self.order.push_back(event_id.to_string());
        }
        while self.order.len() > max {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

impl CustomerState {
    pub fn new(customer_id: &str) -> CustomerState {
        CustomerState {
            customer_id: customer_id.to_string(),
            created_at_ms: None,
            clock_ms: i64::MIN,
            rules_version: 0,
            identities: BTreeSet::new(),
            profile: BTreeMap::new(),
            consents: BTreeMap::new(),
            channels: BTreeMap::new(),
            timeline: VecDeque::new(),
            purchases: PurchaseSummary::default(),
            returns: ReturnSummary::default(),
            orders: BTreeMap::new(),
            browsing: Browsing::default(),
            support: Support::default(),
            email: EmailEngagement::default(),
            visits: Visits::default(),
            loyalty: Loyalty::default(),
            retention: RetentionState::default(),
            dedup: Dedup::default(),
            value: ValueHistory::default(),
            value_standing: ValueStanding::default(),
            merge: MergeState::default(),
        }
    }

    /// Should the state be stored: an event was applied to the customer, or it takes part
    /// in a merge (a tombstone, a survivor holding events back or remembering whom it
    /// merged, even one whose own events were all refused).
    pub fn exists(&self) -> bool {
        self.is_created() || self.merge.is_involved()
    }

    /// Has an event been applied to this customer itself (or merged into it)?
    pub fn is_created(&self) -> bool {
        self.created_at_ms.is_some()
    }

    /// Was this customer merged into another (is it a tombstone)?
    pub fn is_tombstone(&self) -> bool {
        self.merge.merged_into.is_some()
    }

    /// The earliest event time at which a time-driven rule may fire (lot expiry, pending
    /// release, tier review, lapse, win-back), if any. A tombstone has none.
    pub fn next_due_ms(&self) -> Option<i64> {
        if !self.is_created() || self.is_tombstone() {
            return None;
        }
        let lots = self.loyalty.lots.iter().filter_map(|l| l.expires_at_ms);
        let pending = self.loyalty.pending.iter().map(|p| p.release_at_ms);
        lots.chain(pending)
            .chain(self.loyalty.tier_review_at_ms)
            .chain(self.retention.lapse_due_ms)
            .chain(self.retention.winback_due_ms)
            .min()
    }
}

/// What the customer-value models need of a customer: the UTC calendar days on which they
/// bought (in the loyalty currency) with the amount bought that day, minor units. At most
/// `limits.purchase_days_max` days are kept one by one; older days are folded into
/// [`FoldedDays`], which keeps frequency, recency and monetary exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueHistory {
    /// Day number (days since 1970-01-01 UTC) -> amount bought that day.
    pub days: BTreeMap<i32, i64>,
    pub folded: FoldedDays,
}

/// The oldest purchase days, folded out of [`ValueHistory::days`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldedDays {
    /// Days folded (0: none).
    pub count: u32,
    /// Amount bought on the folded days, first day included.
    pub amount_minor: i64,
    /// The first purchase day ever and its amount.
    pub first_day: i32,
    pub first_amount_minor: i64,
    /// The latest folded day.
    pub last_day: i32,
}

/// The customer's standing under the last customer-value model the shard applied: what
/// `value.segment_changed` and `churn.risk` compare against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueStanding {
    /// Value segment (`top_1_percent`, ...); `None` before any model scored the customer.
    pub segment: Option<String>,
    /// The model version that set it (0: none).
    pub model_version: u64,
    /// Whether `churn.risk` was raised and still holds.
    pub at_risk: bool,
}
