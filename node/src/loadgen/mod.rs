//! Sample multi-channel traffic with its ground truth: what `crm-node load` publishes, the
//! reference adapter's data, and the input of tests that check spend, counts and points.
//!
//! A [`Generator`] is an iterator of [`GeneratedEvent`]s (public ingest JSON, `"v": 1`, as
//! [`crm_actors::ingest::parse_ingest`] reads it) in event-time order, deterministic for a
//! [`GeneratorSpec`] (same spec, same bytes): its draws come from ChaCha12 seeded with the
//! spec's seed (`rand_chacha`, whose stream is fixed across versions and platforms, unlike
//! `rand`'s `StdRng`), and a test pins a digest of a fixed spec's stream. Memory is bounded by the number of people,
//! not of events: each person has one pending "next session" in a time-ordered queue, and a
//! session's few events (plus follow-ups such as a return or a ticket resolution) are queued
//! only when the session starts.
//!
//! People follow [`archetype_of`] their index (so scripts know who to query): repeat buyers
//! (shop on web, mobile and in store; email and device online, loyalty card in store, phone
//! at the call center, each new identifier linked by an `identify` event that also carries
//! a known one), one-timers, browsing-only visitors (device id only) and newsletter
//! subscribers. Identifier values follow the index too ([`email_of`], [`loyalty_card_of`],
//! [`phone_of`], [`device_id_of`]). Duplicates are injected at the configured rate: the
//! same message again (same `event_id`) or, for purchases, the same order under a new
//! `event_id`. [`Truth`] records, per person, the identifiers used and the distinct
//! purchases and returns actually emitted. Nothing here touches NATS.
//!
//! Laid out as: this module (the spec, the event, the archetypes and identifier helpers),
//! `generator` (the people's sessions and the events they emit), `payload` (the JSON
//! bodies and the catalogue they draw from) and `truth` (what was emitted, per person).

mod generator;
mod payload;
#[cfg(test)]
mod tests;
mod truth;

pub use generator::Generator;
pub use truth::{PersonTruth, TruePurchase, TrueReturn, Truth};

use payload::splitmix64;

/// Smallest order total generated, in minor units.
pub const ORDER_MIN_MINOR: i64 = 500;
/// Largest order total generated, in minor units.
pub const ORDER_MAX_MINOR: i64 = 40_000;
/// The currency of every generated order.
pub const CURRENCY: &str = "EUR";

const HOUR_MS: i64 = 3_600_000;
const MINUTE_MS: i64 = 60_000;
const SECOND_MS: i64 = 1_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorSpec {
    /// Number of people (not customers: a browsing visitor is a person too).
    pub customers: usize,
    /// Start of the traffic window, Unix ms (event time).
    pub start_ms: i64,
    /// Length of the window in days; no event is at or after `start + days`.
    pub days: u32,
    /// Random seed: the same spec yields the same bytes.
    pub seed: u64,
    /// Percent of emitted events followed by a duplicate (0 to 100).
    pub duplicate_rate_percent: u8,
}

/// One message to publish to `crm.ingest.<channel>` with `Nats-Msg-Id` = `event_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedEvent {
    pub channel: String,
    pub event_id: String,
    /// The public JSON v1 body.
    pub payload: Vec<u8>,
    /// The event's `occurred_at`, Unix ms.
    pub occurred_at_ms: i64,
    /// The generator's index of the person the event is about (see [`Truth::people`]).
    pub person: usize,
    /// `Some` when this message repeats an earlier one.
    pub duplicate: Option<Duplicate>,
}

/// How a duplicate repeats its original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Duplicate {
    /// The exact same message again (an adapter retry): same `event_id`, same bytes.
    SameEventId,
    /// The same purchase (same `order_id`) re-sent under a new `event_id` (a POS replay).
    SameOrderNewEventId,
}

/// The shape of a person's behaviour, fixed by their index (see [`archetype_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Archetype {
    /// Buys several times on web, mobile and in store; email, loyalty card, phone, device.
    RepeatBuyer,
    /// One purchase (web or mobile by email, or in store by loyalty card), maybe a return.
    OneTimer,
    /// Anonymous: views and cart changes by device id only, never buys.
    Browser,
    /// Newsletter subscriber by email: campaigns, some views, consent changes, no purchase.
    Subscriber,
}

/// The archetype of person `person`: by `person % 20`, 0-6 repeat buyers (35 %), 7-10
/// one-timers (20 %), 11-16 browsers (30 %), 17-19 subscribers (15 %). Persons 0, 1, 2 are
/// repeat buyers in every sample.
pub fn archetype_of(person: usize) -> Archetype {
    match person % 20 {
        0..=6 => Archetype::RepeatBuyer,
        7..=10 => Archetype::OneTimer,
        11..=16 => Archetype::Browser,
        _ => Archetype::Subscriber,
    }
}

/// The email of person `person` (normalised form), e.g. `customer000042@example.com`.
pub fn email_of(person: usize) -> String {
    format!("customer{person:06}@example.com")
}

/// The loyalty card number of person `person`, e.g. `LC-0000042`.
pub fn loyalty_card_of(person: usize) -> String {
    format!("LC-{person:07}")
}

/// The phone number of person `person` (E.164), e.g. `+491510000042`.
pub fn phone_of(person: usize) -> String {
    format!("+49151{person:07}")
}

/// The device id of person `person` (distinct for every index).
pub fn device_id_of(person: usize) -> String {
    format!("dev-{:016x}", splitmix64(person as u64))
}

/// Identifier kinds as bits of a person's identity mask.
const EMAIL: u8 = 1;
const CARD: u8 = 2;
const PHONE: u8 = 4;
const DEVICE: u8 = 8;
