//! Unit tests of the sample-traffic generator: the ingest gate accepts every payload, the
//! stream is reproducible (and pinned), duplicates, returns, identifiers and the truth agree
//! with what was emitted.

use super::*;
use crate::fnv::Fnv1a64;
use crm_actors::identity::{Identity, IdentityKind};
use crm_actors::ingest::{parse_ingest, EventKind, IngestLimits};
use crm_actors::time::parse_rfc3339_ms;
use crm_actors::time::DAY_MS;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

fn spec(customers: usize, days: u32, seed: u64, duplicate_rate_percent: u8) -> GeneratorSpec {
    GeneratorSpec {
        customers,
        start_ms: parse_rfc3339_ms("2026-11-01T00:00:00Z").expect("start"),
        days,
        seed,
        duplicate_rate_percent,
    }
}

fn all(spec: GeneratorSpec) -> (Vec<GeneratedEvent>, Truth) {
    let mut generator = Generator::new(spec);
    let events: Vec<GeneratedEvent> = generator.by_ref().collect();
    (events, generator.into_truth())
}

#[test]
fn every_payload_passes_the_ingest_gate_in_time_order_within_the_window() {
    let spec = spec(600, 30, 7, 3);
    let (start, end) = (spec.start_ms, spec.start_ms + 30 * DAY_MS);
    let (events, _) = all(spec);
    assert!(events.len() > 5_000, "{} events", events.len());
    let limits = IngestLimits::default();
    let mut previous_ms = start;
    let mut types = HashSet::new();
    let mut channels = HashSet::new();
    for event in &events {
        let parsed =
            parse_ingest(&event.channel, &event.payload, &limits).unwrap_or_else(|rejection| {
                panic!("{rejection}: {}", String::from_utf8_lossy(&event.payload))
            });
        assert_eq!(parsed.event_id, event.event_id);
        assert_eq!(parsed.occurred_at_ms, event.occurred_at_ms);
        assert_eq!(event.occurred_at_ms % 1000, 0, "whole seconds");
        assert!(event.occurred_at_ms >= previous_ms, "event-time order");
        assert!(event.occurred_at_ms < end);
        previous_ms = event.occurred_at_ms;
        if let EventKind::Purchase(purchase) = &parsed.kind {
            let items: i64 = purchase
                .items
                .iter()
                .map(|i| i.price_minor * i64::from(i.qty))
                .sum();
            assert_eq!(items, purchase.amount_minor, "items add up to the amount");
            assert!((ORDER_MIN_MINOR..=ORDER_MAX_MINOR).contains(&purchase.amount_minor));
        }
        types.insert(parsed.kind.type_name());
        channels.insert(event.channel.clone());
    }
    assert_eq!(types.len(), 9, "every event type appears: {types:?}");
    for channel in ["web", "mobile", "store", "callcenter", "email", "social"] {
        assert!(channels.contains(channel), "channel {channel} appears");
    }
}

#[test]
fn the_same_spec_gives_the_same_bytes_and_another_seed_does_not() {
    let first: Vec<_> = Generator::new(spec(300, 3, 11, 5)).collect();
    let again: Vec<_> = Generator::new(spec(300, 3, 11, 5)).collect();
    assert_eq!(first, again);
    let other: Vec<_> = Generator::new(spec(300, 3, 12, 5)).collect();
    assert_ne!(first, other);
    let first_ids: HashSet<_> = first.iter().map(|e| e.event_id.clone()).collect();
    assert!(
        other.iter().all(|e| !first_ids.contains(&e.event_id)),
        "ids differ between specs"
    );
}

/// FNV-1a 64 of every field of the first `count` events of `spec`, in order.
fn digest(spec: GeneratorSpec, count: usize) -> u64 {
    let mut hash = Fnv1a64::new();
    for event in Generator::new(spec).take(count) {
        for text in [&event.channel, &event.event_id] {
            hash.write(&(text.len() as u64).to_le_bytes());
            hash.write(text.as_bytes());
        }
        hash.write(&(event.payload.len() as u64).to_le_bytes());
        hash.write(&event.payload);
        hash.write(&event.occurred_at_ms.to_le_bytes());
        hash.write(&(event.person as u64).to_le_bytes());
        let duplicate = match event.duplicate {
            None => 0u8,
            Some(Duplicate::SameEventId) => 1,
            Some(Duplicate::SameOrderNewEventId) => 2,
        };
        hash.write(&[duplicate]);
    }
    hash.finish()
}

#[test]
fn the_stream_of_a_fixed_spec_never_changes() {
    // Pinned: a changed generator (another RNG, another draw order, another payload
    // spelling) changes the sample every script, doc and test was written against.
    // Change the pinned value only on purpose, with the figures that come from it.
    let digest = digest(spec(500, 10, 42, 5), 1_000);
    assert_eq!(digest, 0x3800_cbbe_1d2f_9838, "digest {digest:#018x}");
}

#[test]
fn duplicates_appear_at_about_the_configured_rate() {
    let (events, truth) = all(spec(2_000, 7, 3, 5));
    let originals = events.iter().filter(|e| e.duplicate.is_none()).count() as f64;
    let duplicates = events.iter().filter(|e| e.duplicate.is_some()).count() as f64;
    let rate = 100.0 * duplicates / originals;
    assert!((4.0..6.0).contains(&rate), "duplicate rate {rate:.2} %");
    assert_eq!(truth.duplicates() as f64, duplicates);
    assert_eq!(truth.events_distinct as f64, originals);

    let by_id: HashMap<&str, &GeneratedEvent> = events
        .iter()
        .filter(|e| e.duplicate.is_none())
        .map(|e| (e.event_id.as_str(), e))
        .collect();
    let (mut same_id, mut same_order) = (0, 0);
    for (index, event) in events.iter().enumerate() {
        match event.duplicate {
            Some(Duplicate::SameEventId) => {
                same_id += 1;
                assert_eq!(by_id[event.event_id.as_str()].payload, event.payload);
            }
            Some(Duplicate::SameOrderNewEventId) => {
                same_order += 1;
                assert!(!by_id.contains_key(event.event_id.as_str()));
                let original = &events[index - 1];
                let a: Value = serde_json::from_slice(&original.payload).expect("json");
                let b: Value = serde_json::from_slice(&event.payload).expect("json");
                assert_eq!(a["order_id"], b["order_id"]);
                assert_eq!(a["amount"], b["amount"]);
            }
            None => {}
        }
    }
    assert!(same_id > 0 && same_order > 0, "{same_id} {same_order}");
    let none: Vec<_> = Generator::new(spec(300, 3, 3, 0)).collect();
    assert!(none.iter().all(|e| e.duplicate.is_none()));
}

#[test]
fn returns_reference_an_earlier_order_and_never_exceed_it() {
    let (events, truth) = all(spec(1_500, 30, 5, 2));
    let limits = IngestLimits::default();
    let mut orders: HashMap<String, (i64, usize)> = HashMap::new();
    let mut returned: HashSet<String> = HashSet::new();
    let mut returns = 0;
    for event in events.iter().filter(|e| e.duplicate.is_none()) {
        match parse_ingest(&event.channel, &event.payload, &limits)
            .expect("valid")
            .kind
        {
            EventKind::Purchase(p) => {
                orders.insert(p.order_id, (p.amount_minor, event.person));
            }
            EventKind::Return(r) => {
                returns += 1;
                let (amount, person) = orders[&r.order_id];
                assert!(
                    r.amount_minor <= amount,
                    "return {} above order {amount}",
                    r.amount_minor
                );
                assert_eq!(person, event.person);
                assert!(returned.insert(r.order_id), "one return per order");
            }
            _ => {}
        }
    }
    assert!(returns > 20, "{returns} returns");
    assert_eq!(truth.returns(), returns);
    assert_eq!(truth.purchases(), orders.len());
    let partial = truth
        .people
        .iter()
        .flat_map(|p| p.returns.iter().map(move |r| (p, r)))
        .filter(|(p, r)| {
            let order = p
                .purchases
                .iter()
                .find(|o| o.order_id == r.order_id)
                .expect("order");
            r.amount_minor < order.amount_minor
        })
        .count();
    assert!(
        partial * 2 > returns,
        "mostly partial returns: {partial} of {returns}"
    );
}

/// A stand-in for the identity directory: the first event that carries an identifier
/// maps it to the customer of the event's known identifiers (or a new one).
#[test]
fn identifiers_are_linked_before_use_so_each_person_is_one_customer() {
    let (events, truth) = all(spec(1_000, 30, 9, 2));
    let limits = IngestLimits::default();
    let mut directory: HashMap<Identity, usize> = HashMap::new();
    let mut customers = 0usize;
    let mut customer_of_person: HashMap<usize, usize> = HashMap::new();
    for event in &events {
        let parsed = parse_ingest(&event.channel, &event.payload, &limits).expect("valid");
        let known: HashSet<usize> = parsed
            .identities
            .iter()
            .filter_map(|i| directory.get(i).copied())
            .collect();
        assert!(
            known.len() <= 1,
            "an event never joins two customers: {}",
            String::from_utf8_lossy(&event.payload)
        );
        let customer = known.into_iter().next().unwrap_or_else(|| {
            customers += 1;
            customers
        });
        for identity in parsed.identities {
            directory.entry(identity).or_insert(customer);
        }
        let expected = *customer_of_person.entry(event.person).or_insert(customer);
        assert_eq!(
            customer, expected,
            "person {} stays one customer",
            event.person
        );
    }
    assert_eq!(customers, customer_of_person.len());
    for (person, truth) in truth.people.iter().enumerate() {
        for identity in &truth.identities {
            assert_eq!(directory.get(identity), customer_of_person.get(&person));
        }
    }
    let linked = truth
        .people
        .iter()
        .filter(|p| {
            p.identity(IdentityKind::Email).is_some()
                && p.identity(IdentityKind::LoyaltyCard).is_some()
        })
        .filter(|p| {
            let channels: HashSet<&str> = p.purchases.iter().map(|o| o.channel.as_str()).collect();
            channels.contains("store") && (channels.contains("web") || channels.contains("mobile"))
        })
        .count();
    assert!(
        linked > 50,
        "repeat buyers buy online and in store: {linked}"
    );
}

#[test]
fn the_truth_matches_the_distinct_purchases_in_the_stream() {
    let (events, truth) = all(spec(800, 10, 21, 10));
    let limits = IngestLimits::default();
    let mut spend: HashMap<usize, i64> = HashMap::new();
    let mut seen_orders = HashSet::new();
    for event in &events {
        match parse_ingest(&event.channel, &event.payload, &limits)
            .expect("valid")
            .kind
        {
            EventKind::Purchase(p) if seen_orders.insert(p.order_id.clone()) => {
                *spend.entry(event.person).or_default() += p.amount_minor;
            }
            EventKind::Return(r) if event.duplicate.is_none() => {
                *spend.entry(event.person).or_default() -= r.amount_minor;
            }
            _ => {}
        }
    }
    for (person, person_truth) in truth.people.iter().enumerate() {
        assert_eq!(
            person_truth.net_spend_minor(),
            spend.get(&person).copied().unwrap_or(0)
        );
        match person_truth.archetype {
            Archetype::Browser => {
                assert!(person_truth.purchases.is_empty());
                assert!(person_truth
                    .identities
                    .iter()
                    .all(|i| i.kind == IdentityKind::DeviceId));
            }
            Archetype::Subscriber => assert!(person_truth.purchases.is_empty()),
            Archetype::OneTimer => assert!(person_truth.purchases.len() <= 1),
            Archetype::RepeatBuyer => {}
        }
    }
    let repeat_buyers = truth
        .people
        .iter()
        .filter(|p| p.purchases.len() >= 2)
        .count();
    assert!(repeat_buyers > 100, "{repeat_buyers}");
    assert_eq!(truth.people[0].archetype, Archetype::RepeatBuyer);
}

#[test]
fn the_demo_sample_is_a_busy_day_whose_first_people_can_be_queried() {
    let mut generator = Generator::new(spec(3_000, 1, 7, 2));
    let events = generator.by_ref().count();
    let truth = generator.truth();
    assert!((10_000..100_000).contains(&events), "{events} events");
    assert!(truth.purchases() > 1_000, "{} purchases", truth.purchases());
    // scripts/demo queries the first people by email, or by loyalty card.
    for person in 0..5 {
        let by_email = truth.people[person].identity(IdentityKind::Email);
        let by_card = truth.people[person].identity(IdentityKind::LoyaltyCard);
        assert!(
            by_email
                .map(|i| i.value == email_of(person))
                .unwrap_or(false)
                || by_card
                    .map(|i| i.value == loyalty_card_of(person))
                    .unwrap_or(false)
        );
    }
}

#[test]
fn an_empty_spec_yields_nothing() {
    assert_eq!(Generator::new(spec(0, 3, 1, 5)).count(), 0);
    assert_eq!(Generator::new(spec(100, 0, 1, 5)).count(), 0);
}

#[test]
fn identifier_helpers_are_already_normal_and_distinct() {
    for person in [0, 1, 42, 9_999_999] {
        for (kind, value) in [
            (IdentityKind::Email, email_of(person)),
            (IdentityKind::Phone, phone_of(person)),
            (IdentityKind::LoyaltyCard, loyalty_card_of(person)),
            (IdentityKind::DeviceId, device_id_of(person)),
        ] {
            assert_eq!(
                Identity::normalise(kind, &value).expect("valid").value,
                value
            );
        }
    }
    assert_ne!(device_id_of(1), device_id_of(2));
}

/// The identifiers of an event (kind, raw value), read back from its payload.
fn identity_pairs(event: &GeneratedEvent) -> Vec<(String, String)> {
    let json: Value = serde_json::from_slice(&event.payload).expect("json");
    let mut pairs: Vec<(String, String)> = json["identity"]
        .as_object()
        .expect("identity")
        .iter()
        .map(|(kind, value)| {
            let kind = IdentityKind::parse(kind).expect("a kind");
            let identity = Identity::normalise(kind, value.as_str().unwrap_or("")).expect("valid");
            (kind.as_str().to_string(), identity.value)
        })
        .collect();
    pairs.sort();
    pairs
}

#[test]
fn split_people_first_become_a_second_customer_then_an_identify_links_both() {
    let plain: Vec<GeneratedEvent> = Generator::new(spec(300, 30, 11, 0)).collect();
    let mut split_generator = Generator::new(spec(300, 30, 11, 0)).with_split_identities(20);
    let split: Vec<GeneratedEvent> = split_generator.by_ref().collect();
    let again: Vec<GeneratedEvent> = Generator::new(spec(300, 30, 11, 0))
        .with_split_identities(20)
        .collect();
    assert_eq!(split, again, "the same split traffic every time");
    assert!(
        split.len() > plain.len(),
        "{} vs {}",
        split.len(),
        plain.len()
    );
    assert_ne!(split[0].event_id, plain[0].event_id, "another id prefix");
    // Walk each person's events: a split shows as an event whose identifiers are all new,
    // after the person already had a known one, followed by one holding both.
    let mut known: HashMap<usize, HashSet<(String, String)>> = HashMap::new();
    let mut splits = 0;
    for (index, event) in split.iter().enumerate() {
        let pairs = identity_pairs(event);
        let seen = known.entry(event.person).or_default();
        if !seen.is_empty() && pairs.iter().all(|pair| !seen.contains(pair)) {
            splits += 1;
            assert!(
                event.person.wrapping_mul(37) % 100 < 20,
                "only split people"
            );
            let link = split[index + 1..]
                .iter()
                .find(|next| next.person == event.person)
                .expect("a linking event follows");
            let link_pairs = identity_pairs(link);
            assert!(pairs.iter().all(|pair| link_pairs.contains(pair)));
            assert!(
                link_pairs.iter().any(|pair| seen.contains(pair)),
                "{pairs:?} then {link_pairs:?}, known {seen:?}"
            );
        }
        seen.extend(pairs);
    }
    assert!(splits > 10, "{splits} splits");
    assert_eq!(split_generator.truth().people.len(), 300);
}
