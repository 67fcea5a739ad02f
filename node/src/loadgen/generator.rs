//! The generator proper: one pending session per person in a time-ordered queue, the
//! sessions each archetype has, and the events (and follow-ups) a session emits. Draws
//! every random choice from one ChaCha12 stream seeded by the spec.

use super::payload::{
    catalogue_item, category_name, fit_to_total, identity_json, identity_values, items_json,
    items_total, lowest_bit, profile_json, spec_prefix, type_name, whole_second_up, CAMPAIGNS,
    CATEGORIES, SKUS_PER_CATEGORY, STORES,
};
use super::*;
use crm_actors::identity::Identity;
use crm_actors::ingest::LineItem;
use crm_actors::money::to_decimal;
use crm_actors::time::{format_rfc3339, DAY_MS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

/// The deterministic traffic generator; see the module documentation.
pub struct Generator {
    spec: GeneratorSpec,
    end_ms: i64,
    rng: ChaCha12Rng,
    /// Short id of the spec, in every event, order and ticket id: different specs never
    /// collide, the same spec repeats its ids (so a re-run is deduplicated).
    prefix: String,
    queue: BinaryHeap<Pending>,
    ready: VecDeque<GeneratedEvent>,
    people: Vec<PersonState>,
    truth: Truth,
    keep_truth: bool,
    queued: u64,
    next_event: u64,
    next_order: u64,
    next_ticket: u64,
    /// Percent of people who first become two customers (see
    /// [`Generator::with_split_identities`]).
    split_percent: u8,
}

struct PersonState {
    /// Identifiers already used in planned events.
    introduced: u8,
    /// The person already made a second customer and linked it (split people do it once).
    split_done: bool,
    /// Identifiers already recorded in the truth (emitted).
    recorded: u8,
    email_consent: bool,
    favourite_category: usize,
    sessions: u32,
    mean_gap_ms: i64,
}

struct Pending {
    at_ms: i64,
    order: u64,
    person: usize,
    action: Action,
}

enum Action {
    Wake,
    Emit(Planned),
}

struct Planned {
    channel: &'static str,
    identities: u8,
    body: Body,
}

pub(super) enum Body {
    Identify {
        profile: bool,
    },
    View {
        sku: String,
        category: &'static str,
    },
    Cart {
        add: bool,
        item: LineItem,
    },
    Purchase {
        order: Order,
    },
    Return {
        order_id: String,
        items: Vec<LineItem>,
    },
    Support {
        ticket_id: String,
        resolved: Option<u8>,
    },
    Email {
        action: &'static str,
        campaign: &'static str,
    },
    Visit {
        store_id: String,
    },
    Consent {
        purpose: &'static str,
        granted: bool,
    },
}

#[derive(Clone)]
pub(super) struct Order {
    order_id: String,
    items: Vec<LineItem>,
    store_id: Option<String>,
}

impl Order {
    fn amount_minor(&self) -> i64 {
        items_total(&self.items)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed, so that `BinaryHeap` pops the earliest (then the first queued) first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.order).cmp(&(self.at_ms, self.order))
    }
}

/// A session being planned: events at increasing times from its start.
struct Session {
    person: usize,
    clock_ms: i64,
    events: Vec<(i64, Planned)>,
}

impl Session {
    fn push(&mut self, channel: &'static str, identities: u8, body: Body) {
        self.events.push((
            self.clock_ms,
            Planned {
                channel,
                identities,
                body,
            },
        ));
    }
}

impl Generator {
    /// A generator for `spec`; nothing is generated until it is iterated.
    pub fn new(spec: GeneratorSpec) -> Generator {
        let mut rng = ChaCha12Rng::seed_from_u64(spec.seed);
        let window_ms = i64::from(spec.days) * DAY_MS;
        let end_ms = spec.start_ms.saturating_add(window_ms);
        let prefix = spec_prefix(&spec);
        let mut people = Vec::with_capacity(spec.customers);
        let mut truth = Truth::default();
        let mut queue = BinaryHeap::with_capacity(spec.customers);
        let mut queued = 0u64;
        for person in 0..spec.customers {
            let archetype = archetype_of(person);
            let days = f64::from(spec.days);
            let expected_sessions = match archetype {
                Archetype::RepeatBuyer => 4.0 + days * 0.12,
                Archetype::OneTimer => 1.0,
                Archetype::Browser => 1.0 + days * 0.05,
                Archetype::Subscriber => 2.0 + days * 0.1,
            };
            let mean_gap_ms = ((window_ms as f64 / expected_sessions) as i64).max(10 * MINUTE_MS);
            let first_ms = whole_second_up(
                spec.start_ms + rng.gen_range(0..=mean_gap_ms.min(window_ms).max(1)),
            );
            people.push(PersonState {
                introduced: 0,
                split_done: false,
                recorded: 0,
                email_consent: false,
                favourite_category: rng.gen_range(0..CATEGORIES.len()),
                sessions: 0,
                mean_gap_ms,
            });
            truth.people.push(PersonTruth {
                archetype,
                identities: Vec::new(),
                purchases: Vec::new(),
                returns: Vec::new(),
                events: 0,
            });
            if first_ms < end_ms {
                queue.push(Pending {
                    at_ms: first_ms,
                    order: queued,
                    person,
                    action: Action::Wake,
                });
                queued += 1;
            }
        }
        Generator {
            spec,
            end_ms,
            rng,
            prefix,
            queue,
            ready: VecDeque::new(),
            people,
            truth,
            keep_truth: true,
            queued,
            next_event: 0,
            next_order: 0,
            next_ticket: 0,
            split_percent: 0,
        }
    }

    /// Makes `percent` of the people (chosen by index, so the choice uses no randomness)
    /// become two customers before they are one: the first time such a person uses an
    /// identifier the engine does not know yet beside one it knows, an `identify` with the
    /// new identifier alone comes first (a second customer), then the `identify` with both
    /// that links them (the engine merges the two). Every other event is as without it;
    /// the truth is still one customer per person. The ids of the traffic change (its
    /// prefix includes the percent) so it never collides with the traffic without splits.
    pub fn with_split_identities(mut self, percent: u8) -> Generator {
        self.split_percent = percent.min(100);
        if self.split_percent > 0 {
            let mut hash = crate::fnv::Fnv1a64::new();
            hash.write(self.prefix.as_bytes());
            hash.write(&[self.split_percent]);
            let hash = hash.finish();
            self.prefix = format!("{:08x}", (hash ^ (hash >> 32)) as u32);
        }
        self
    }

    /// Whether `person` is one of the split people (see `with_split_identities`).
    fn is_split(&self, person: usize) -> bool {
        (person.wrapping_mul(37) % 100) < usize::from(self.split_percent)
    }

    /// Stops recording purchases and returns in the truth (for long loads where only the
    /// events matter); counters and identities are still kept.
    pub fn without_truth(mut self) -> Generator {
        self.keep_truth = false;
        self
    }

    /// The spec this generator was built from.
    pub fn spec(&self) -> &GeneratorSpec {
        &self.spec
    }

    /// The ground truth of everything emitted so far (complete once iteration has ended).
    pub fn truth(&self) -> &Truth {
        &self.truth
    }

    /// The ground truth, consuming the generator.
    pub fn into_truth(self) -> Truth {
        self.truth
    }

    fn queue(&mut self, at_ms: i64, person: usize, action: Action) {
        // Whole seconds, as channels report them; rounding up keeps every order.
        let at_ms = whole_second_up(at_ms);
        // Nothing at or after the window's end is ever emitted; don't hold it.
        if at_ms >= self.end_ms {
            return;
        }
        self.queue.push(Pending {
            at_ms,
            order: self.queued,
            person,
            action,
        });
        self.queued += 1;
    }

    fn millis(&mut self, low_ms: i64, high_ms: i64) -> i64 {
        self.rng.gen_range(low_ms..=high_ms.max(low_ms))
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.gen_range(0..100) < percent
    }

    /// Plans the session starting at `at_ms` and the person's next wake-up.
    fn wake(&mut self, person: usize, at_ms: i64) {
        let mut session = Session {
            person,
            clock_ms: at_ms,
            events: Vec::new(),
        };
        let first = self.people[person].sessions == 0;
        self.people[person].sessions += 1;
        let more = match archetype_of(person) {
            Archetype::RepeatBuyer => {
                self.repeat_buyer_session(&mut session, first);
                true
            }
            Archetype::OneTimer => {
                self.one_timer_session(&mut session);
                false
            }
            Archetype::Browser => {
                self.browser_session(&mut session);
                true
            }
            Archetype::Subscriber => {
                self.subscriber_session(&mut session, first);
                true
            }
        };
        let end_ms = session.clock_ms;
        for (time_ms, planned) in session.events {
            self.queue(time_ms, person, Action::Emit(planned));
        }
        if more {
            let mean = self.people[person].mean_gap_ms as f64;
            let uniform: f64 = 1.0 - self.rng.gen::<f64>();
            let gap_ms = ((-uniform.ln()) * mean) as i64;
            let next_ms = end_ms.saturating_add(gap_ms.clamp(10 * MINUTE_MS, 60 * DAY_MS));
            self.queue(next_ms, person, Action::Wake);
        }
    }

    fn step(&mut self, session: &mut Session, low_s: i64, high_s: i64) {
        session.clock_ms += self.rng.gen_range(low_s..=high_s.max(low_s)) * SECOND_MS;
    }

    /// Makes sure `wanted` identifiers are known before they are used alone: a new one is
    /// introduced by an `identify` event that also carries a known one (so the directory
    /// links it to the same customer); with nothing known yet, the first event introduces
    /// them together.
    fn ensure(&mut self, session: &mut Session, channel: &'static str, wanted: u8) {
        let split = self.is_split(session.person);
        let state = &mut self.people[session.person];
        let missing = wanted & !state.introduced;
        if missing == 0 {
            return;
        }
        if state.introduced != 0 {
            let known = lowest_bit(state.introduced & CARD)
                .or(lowest_bit(state.introduced & EMAIL))
                .or(lowest_bit(state.introduced))
                .unwrap_or(0);
            state.introduced |= missing;
            // Devices never merge (the rules' default), so a device alone makes no split.
            if split && !state.split_done && missing & (CARD | EMAIL | PHONE) != 0 {
                // A second customer first, then the event that links the two.
                state.split_done = true;
                session.push(channel, missing, Body::Identify { profile: false });
                self.step(session, 5, 60);
            }
            session.push(channel, missing | known, Body::Identify { profile: false });
            self.step(session, 5, 60);
        } else {
            state.introduced |= missing;
        }
    }

    fn repeat_buyer_session(&mut self, session: &mut Session, first: bool) {
        if first {
            if self.chance(60) {
                let channel = if self.chance(60) { "web" } else { "mobile" };
                self.ensure(session, channel, EMAIL | DEVICE);
                session.push(channel, EMAIL | DEVICE, Body::Identify { profile: true });
                self.step(session, 10, 90);
                let granted = self.chance(80);
                self.consent(session, channel, EMAIL, "email_marketing", granted);
                self.shop_online(session, channel, 50);
            } else {
                let with_email = if self.chance(70) { EMAIL } else { 0 };
                self.ensure(session, "store", CARD | with_email);
                session.push("store", CARD | with_email, Body::Identify { profile: true });
                self.step(session, 20, 120);
                if with_email != 0 && self.chance(60) {
                    self.consent(session, "store", CARD, "email_marketing", true);
                }
                self.shop_in_store(session, 90);
            }
            return;
        }
        let can_email = self.people[session.person].email_consent;
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=29 => self.shop_online(session, "web", 65),
            30..=51 => self.shop_online(session, "mobile", 65),
            52..=79 => self.shop_in_store(session, 80),
            80..=87 if can_email => self.email_campaign(session),
            80..=87 => self.shop_online(session, "web", 65),
            88..=93 => {
                if self.chance(70) {
                    self.support(session, "callcenter", PHONE);
                } else {
                    self.support(session, "social", EMAIL);
                }
            }
            94..=96 => {
                self.ensure(session, "social", EMAIL);
                let views = self.rng.gen_range(1..=2);
                self.views(session, "social", EMAIL, views);
            }
            _ => {
                self.ensure(session, "web", EMAIL);
                let granted = !self.people[session.person].email_consent;
                let (purpose, granted) = if self.chance(70) {
                    ("email_marketing", granted)
                } else {
                    ("sms_marketing", self.chance(50))
                };
                self.consent(session, "web", EMAIL, purpose, granted);
            }
        }
    }

    fn one_timer_session(&mut self, session: &mut Session) {
        let roll = self.rng.gen_range(0..100);
        let (channel, identity) = match roll {
            0..=54 => ("web", EMAIL),
            55..=69 => ("mobile", EMAIL),
            _ => ("store", CARD),
        };
        self.ensure(session, channel, identity);
        if channel == "store" {
            let store_id = self.store_id();
            session.push(
                channel,
                identity,
                Body::Visit {
                    store_id: store_id.clone(),
                },
            );
            self.step(session, 120, 1_200);
            let order = self.order(session.person, Some(store_id));
            session.push(channel, identity, Body::Purchase { order });
        } else {
            let views = self.rng.gen_range(0..=3);
            self.views(session, channel, identity, views);
            let order = self.order(session.person, None);
            session.push(channel, identity, Body::Purchase { order });
        }
        if self.chance(15) {
            // "Where is my order?" a day or two later, to the call center.
            let delay_ms = self.millis(2 * HOUR_MS, 2 * DAY_MS);
            let ticket_id = self.ticket_id();
            let at_ms = session.clock_ms + delay_ms;
            self.queue(
                at_ms,
                session.person,
                Action::Emit(Planned {
                    channel: "callcenter",
                    identities: identity,
                    body: Body::Support {
                        ticket_id,
                        resolved: None,
                    },
                }),
            );
        }
    }

    fn browser_session(&mut self, session: &mut Session) {
        let channel = if self.chance(60) { "web" } else { "mobile" };
        self.ensure(session, channel, DEVICE);
        let views = self.rng.gen_range(1..=6);
        self.views(session, channel, DEVICE, views);
        if self.chance(35) {
            let adds = self.rng.gen_range(1..=2);
            let mut cart = Vec::new();
            for _ in 0..adds {
                let item = self.item(session.person);
                session.push(
                    channel,
                    DEVICE,
                    Body::Cart {
                        add: true,
                        item: item.clone(),
                    },
                );
                self.step(session, 10, 120);
                cart.push(item);
            }
            if self.chance(30) {
                if let Some(item) = cart.pop() {
                    session.push(channel, DEVICE, Body::Cart { add: false, item });
                    self.step(session, 10, 120);
                }
            }
        }
    }

    fn subscriber_session(&mut self, session: &mut Session, first: bool) {
        if first {
            self.ensure(session, "web", EMAIL);
            session.push("web", EMAIL, Body::Identify { profile: true });
            self.step(session, 5, 60);
            self.consent(session, "web", EMAIL, "email_marketing", true);
            return;
        }
        let roll = self.rng.gen_range(0..100);
        let can_email = self.people[session.person].email_consent;
        match roll {
            0..=59 if can_email => self.email_campaign(session),
            0..=79 => {
                let channel = if roll % 2 == 0 { "social" } else { "web" };
                let views = self.rng.gen_range(1..=3);
                self.views(session, channel, EMAIL, views);
            }
            80..=89 => {
                let views = self.rng.gen_range(1..=4);
                self.views(session, "web", EMAIL, views);
            }
            90..=94 => self.support(session, "social", EMAIL),
            _ => {
                let granted = !can_email;
                self.consent(session, "web", EMAIL, "email_marketing", granted);
            }
        }
    }

    /// Views, maybe cart changes, and with `buy_percent` a purchase, on web or mobile.
    fn shop_online(&mut self, session: &mut Session, channel: &'static str, buy_percent: u32) {
        self.ensure(session, channel, EMAIL | DEVICE);
        let identity = if self.chance(70) {
            EMAIL | DEVICE
        } else {
            EMAIL
        };
        let views = self.rng.gen_range(1..=5);
        self.views(session, channel, identity, views);
        let mut cart = Vec::new();
        let adds = self.rng.gen_range(0..=2);
        for _ in 0..adds {
            let item = self.item(session.person);
            session.push(
                channel,
                identity,
                Body::View {
                    sku: item.sku.clone(),
                    category: category_name(&item.category),
                },
            );
            self.step(session, 10, 90);
            session.push(
                channel,
                identity,
                Body::Cart {
                    add: true,
                    item: item.clone(),
                },
            );
            self.step(session, 10, 120);
            cart.push(item);
        }
        if cart.len() >= 2 && self.chance(25) {
            if let Some(item) = cart.pop() {
                session.push(channel, identity, Body::Cart { add: false, item });
                self.step(session, 10, 120);
            }
        }
        let buy = if cart.is_empty() {
            buy_percent / 2
        } else {
            buy_percent
        };
        if self.chance(buy) {
            let order = if cart.is_empty() {
                self.order(session.person, None)
            } else {
                self.order_of(cart, None)
            };
            session.push(channel, identity, Body::Purchase { order });
            self.step(session, 1, 30);
        }
    }

    fn shop_in_store(&mut self, session: &mut Session, buy_percent: u32) {
        self.ensure(session, "store", CARD);
        let store_id = self.store_id();
        session.push(
            "store",
            CARD,
            Body::Visit {
                store_id: store_id.clone(),
            },
        );
        self.step(session, 120, 1_800);
        if self.chance(buy_percent) {
            let order = self.order(session.person, Some(store_id));
            session.push("store", CARD, Body::Purchase { order });
            self.step(session, 1, 30);
        }
    }

    fn email_campaign(&mut self, session: &mut Session) {
        self.ensure(session, "email", EMAIL);
        let campaign = CAMPAIGNS[self.rng.gen_range(0..CAMPAIGNS.len())];
        session.push(
            "email",
            EMAIL,
            Body::Email {
                action: "sent",
                campaign,
            },
        );
        if !self.chance(55) {
            return;
        }
        self.step(session, 600, 6 * 3_600);
        session.push(
            "email",
            EMAIL,
            Body::Email {
                action: "opened",
                campaign,
            },
        );
        if !self.chance(35) {
            return;
        }
        self.step(session, 10, 300);
        session.push(
            "email",
            EMAIL,
            Body::Email {
                action: "clicked",
                campaign,
            },
        );
        self.step(session, 5, 60);
        let views = self.rng.gen_range(1..=2);
        self.views(session, "web", EMAIL, views);
    }

    fn support(&mut self, session: &mut Session, channel: &'static str, identity: u8) {
        self.ensure(session, channel, identity);
        let ticket_id = self.ticket_id();
        session.push(
            channel,
            identity,
            Body::Support {
                ticket_id,
                resolved: None,
            },
        );
        self.step(session, 60, 900);
    }

    fn consent(
        &mut self,
        session: &mut Session,
        channel: &'static str,
        identity: u8,
        purpose: &'static str,
        granted: bool,
    ) {
        if purpose == "email_marketing" {
            self.people[session.person].email_consent = granted;
        }
        session.push(channel, identity, Body::Consent { purpose, granted });
        self.step(session, 5, 60);
    }

    fn views(&mut self, session: &mut Session, channel: &'static str, identity: u8, count: u32) {
        for _ in 0..count {
            let item = self.item(session.person);
            session.push(
                channel,
                identity,
                Body::View {
                    sku: item.sku,
                    category: category_name(&item.category),
                },
            );
            self.step(session, 8, 180);
        }
    }

    fn store_id(&mut self) -> String {
        format!("S{:03}", self.rng.gen_range(1..=STORES))
    }

    fn ticket_id(&mut self) -> String {
        self.next_ticket += 1;
        format!("T{}-{:06}", self.prefix, self.next_ticket)
    }

    /// A line item: the person's favourite category half of the time; usually one unit.
    fn item(&mut self, person: usize) -> LineItem {
        let category = if self.chance(50) {
            self.people[person].favourite_category
        } else {
            self.rng.gen_range(0..CATEGORIES.len())
        };
        let number = self.rng.gen_range(0..SKUS_PER_CATEGORY);
        let qty = match self.rng.gen_range(0..100) {
            0..=84 => 1,
            85..=96 => 2,
            _ => 3,
        };
        catalogue_item(category, number, qty)
    }

    /// An order of 1 to 4 lines whose total is within [ORDER_MIN_MINOR, ORDER_MAX_MINOR].
    fn order(&mut self, person: usize, store_id: Option<String>) -> Order {
        let lines = match self.rng.gen_range(0..100) {
            0..=49 => 1,
            50..=79 => 2,
            80..=94 => 3,
            _ => 4,
        };
        let items: Vec<LineItem> = (0..lines).map(|_| self.item(person)).collect();
        self.order_of(items, store_id)
    }

    /// An order of exactly these lines (trimmed to ORDER_MAX_MINOR) under a new order id.
    fn order_of(&mut self, items: Vec<LineItem>, store_id: Option<String>) -> Order {
        self.next_order += 1;
        Order {
            order_id: format!("O{}-{:07}", self.prefix, self.next_order),
            items: fit_to_total(items),
            store_id,
        }
    }

    /// Emits one planned event: builds its JSON, records the truth, queues follow-ups
    /// and, at the configured rate, a duplicate.
    fn emit(&mut self, at_ms: i64, person: usize, planned: Planned) -> GeneratedEvent {
        self.next_event += 1;
        let event_id = format!("E{}-{:08}", self.prefix, self.next_event);
        let mut object = Map::new();
        object.insert("v".into(), json!(1));
        object.insert("event_id".into(), json!(event_id));
        object.insert("type".into(), json!(type_name(&planned.body)));
        object.insert("occurred_at".into(), json!(format_rfc3339(at_ms)));
        object.insert(
            "identity".into(),
            identity_json(person, planned.identities, planned.channel),
        );
        self.record_identities(person, planned.identities);
        self.truth.events_distinct += 1;
        self.truth.people[person].events += 1;
        let mut purchase = false;
        match &planned.body {
            Body::Identify { profile } => {
                if *profile {
                    object.insert("profile".into(), profile_json(person));
                }
            }
            Body::View { sku, category } => {
                object.insert("sku".into(), json!(sku));
                object.insert("category".into(), json!(category));
            }
            Body::Cart { add, item } => {
                object.insert("action".into(), json!(if *add { "add" } else { "remove" }));
                object.insert("sku".into(), json!(item.sku));
                object.insert("category".into(), json!(item.category));
                object.insert("qty".into(), json!(item.qty));
                object.insert("price".into(), to_decimal(item.price_minor));
            }
            Body::Purchase { order } => {
                purchase = true;
                object.insert("order_id".into(), json!(order.order_id));
                object.insert("amount".into(), to_decimal(order.amount_minor()));
                object.insert("currency".into(), json!(CURRENCY));
                object.insert("items".into(), items_json(&order.items));
                if let Some(store_id) = &order.store_id {
                    object.insert("store_id".into(), json!(store_id));
                }
                if self.keep_truth {
                    self.truth.people[person].purchases.push(TruePurchase {
                        order_id: order.order_id.clone(),
                        amount_minor: order.amount_minor(),
                        channel: planned.channel.to_string(),
                        occurred_at_ms: at_ms,
                        items: order.items.clone(),
                        store_id: order.store_id.clone(),
                    });
                }
            }
            Body::Return { order_id, items } => {
                object.insert("order_id".into(), json!(order_id));
                object.insert("amount".into(), to_decimal(items_total(items)));
                object.insert("items".into(), items_json(items));
                if self.keep_truth {
                    self.truth.people[person].returns.push(TrueReturn {
                        order_id: order_id.clone(),
                        amount_minor: items_total(items),
                        channel: planned.channel.to_string(),
                        occurred_at_ms: at_ms,
                        items: items.clone(),
                    });
                }
            }
            Body::Support {
                ticket_id,
                resolved,
            } => {
                object.insert("ticket_id".into(), json!(ticket_id));
                match resolved {
                    None => {
                        object.insert("status".into(), json!("opened"));
                    }
                    Some(satisfaction) => {
                        object.insert("status".into(), json!("resolved"));
                        object.insert("satisfaction".into(), json!(satisfaction));
                    }
                }
            }
            Body::Email { action, campaign } => {
                object.insert("action".into(), json!(action));
                object.insert("campaign".into(), json!(campaign));
            }
            Body::Visit { store_id } => {
                object.insert("store_id".into(), json!(store_id));
            }
            Body::Consent { purpose, granted } => {
                object.insert("purpose".into(), json!(purpose));
                object.insert("granted".into(), json!(granted));
            }
        }
        let object = Value::Object(object);
        let event = GeneratedEvent {
            channel: planned.channel.to_string(),
            event_id,
            payload: object.to_string().into_bytes(),
            occurred_at_ms: at_ms,
            person,
            duplicate: None,
        };
        self.follow_ups(at_ms, person, planned);
        if self.spec.duplicate_rate_percent > 0
            && self.chance(u32::from(self.spec.duplicate_rate_percent))
        {
            if purchase && self.chance(50) {
                self.next_event += 1;
                let new_id = format!("E{}-{:08}", self.prefix, self.next_event);
                let mut copy = object;
                copy["event_id"] = json!(new_id);
                self.truth.duplicates_same_order += 1;
                self.ready.push_back(GeneratedEvent {
                    event_id: new_id,
                    payload: copy.to_string().into_bytes(),
                    duplicate: Some(Duplicate::SameOrderNewEventId),
                    ..event.clone()
                });
            } else {
                self.truth.duplicates_same_event_id += 1;
                self.ready.push_back(GeneratedEvent {
                    duplicate: Some(Duplicate::SameEventId),
                    ..event.clone()
                });
            }
        }
        event
    }

    /// Events caused by an emitted one: a (partial) return of some purchases, the
    /// resolution of an opened ticket.
    fn follow_ups(&mut self, at_ms: i64, person: usize, planned: Planned) {
        let window_ms = i64::from(self.spec.days) * DAY_MS;
        match planned.body {
            Body::Purchase { order } => {
                // Mostly part of an order: a single unit comes back less often than a line
                // out of several.
                let single_unit = order.items.len() == 1 && order.items[0].qty == 1;
                let percent = match (archetype_of(person), single_unit) {
                    (_, true) => 5,
                    (Archetype::RepeatBuyer, false) => 18,
                    (_, false) => 15,
                };
                if self.chance(percent) {
                    let delay_ms =
                        self.millis(HOUR_MS, (window_ms / 3).clamp(2 * HOUR_MS, 14 * DAY_MS));
                    let items = self.returned_items(&order.items);
                    debug_assert!(items_total(&items) <= order.amount_minor());
                    self.queue(
                        at_ms + delay_ms,
                        person,
                        Action::Emit(Planned {
                            channel: planned.channel,
                            identities: planned.identities,
                            body: Body::Return {
                                order_id: order.order_id,
                                items,
                            },
                        }),
                    );
                }
            }
            // Most tickets are resolved, with a satisfaction score.
            Body::Support {
                ticket_id,
                resolved: None,
            } if self.chance(85) => {
                let delay_ms =
                    self.millis(30 * MINUTE_MS, (window_ms / 4).clamp(HOUR_MS, 2 * DAY_MS));
                let satisfaction = match self.rng.gen_range(0..100) {
                    0..=4 => 1,
                    5..=14 => 2,
                    15..=34 => 3,
                    35..=69 => 4,
                    _ => 5,
                };
                self.queue(
                    at_ms + delay_ms,
                    person,
                    Action::Emit(Planned {
                        channel: planned.channel,
                        identities: planned.identities,
                        body: Body::Support {
                            ticket_id,
                            resolved: Some(satisfaction),
                        },
                    }),
                );
            }
            _ => {}
        }
    }

    /// Part of an order: a proper subset of its lines, or fewer units of a single line;
    /// the whole order only when it is one unit of one item.
    fn returned_items(&mut self, items: &[LineItem]) -> Vec<LineItem> {
        if items.len() > 1 {
            let keep = self.rng.gen_range(1..items.len());
            let mut returned: Vec<LineItem> = items.to_vec();
            while returned.len() > keep {
                let index = self.rng.gen_range(0..returned.len());
                returned.remove(index);
            }
            return returned;
        }
        let mut line = items[0].clone();
        if line.qty > 1 {
            line.qty = self.rng.gen_range(1..line.qty);
        }
        vec![line]
    }

    fn record_identities(&mut self, person: usize, mask: u8) {
        let new = mask & !self.people[person].recorded;
        if new == 0 {
            return;
        }
        self.people[person].recorded |= new;
        for (bit, kind, value) in identity_values(person, new) {
            debug_assert!(new & bit != 0);
            if let Ok(identity) = Identity::normalise(kind, &value) {
                self.truth.people[person].identities.push(identity);
            }
        }
    }
}

impl Iterator for Generator {
    type Item = GeneratedEvent;

    fn next(&mut self) -> Option<GeneratedEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let pending = self.queue.pop()?;
            debug_assert!(pending.at_ms < self.end_ms);
            match pending.action {
                Action::Wake => self.wake(pending.person, pending.at_ms),
                Action::Emit(planned) => {
                    return Some(self.emit(pending.at_ms, pending.person, planned));
                }
            }
        }
    }
}
