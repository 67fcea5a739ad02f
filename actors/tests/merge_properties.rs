//! Properties of merges over random histories: for two or three customers built from
//! random purchases (order ids drawn from one shared pool, in two currencies), returns,
//! redeems (request ids shared too), ticks, profile bonuses and expiring and pending
//! points, merging conserves points (spendable plus pending), counts every order once
//! (purchase count, spend, the union of order ids, spend by channel and by category adding
//! up to the spend), and is deterministic (the same inputs give byte-identical encoded
//! states); events a survivor held back for a merge apply exactly as if the merged state
//! had come first, and a small `lots_max` folds lots without losing a point. The case
//! count is kept modest so the suite stays fast.

use crm_actors::apply::{apply, merge_into};
use crm_actors::codec;
use crm_actors::emit::Emitter;
use crm_actors::identity::{Identity, IdentityKind};
use crm_actors::ingest::{ChannelEvent, EventKind, LineItem, Purchase, Return};
use crm_actors::rules::Rules;
use crm_actors::shard_message::{ApplyStatus, CustomerCommand, MergeRef};
use crm_actors::state::CustomerState;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const DAY_MS: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z
const START_MS: i64 = 1_767_225_600_000;

fn rules() -> Rules {
    rules_with_limits("")
}

fn rules_with_limits(limits: &str) -> Rules {
    Rules::from_toml_str(&format!(
        r#"
version = 3
currency = "EUR"
accepted_currencies = ["EUR", "USD"]
[limits]
timeline_max_entries = 8
{limits}
[earning]
points_per_currency_unit = 1
pending_days = 14
first_purchase_bonus_points = 50
[earning.profile_completion]
bonus_points = 20
fields = ["first_name"]
[expiry]
expiry_days = 120
[[tiers]]
name = "member"
threshold = 0
[[tiers]]
name = "silver"
threshold = 300
[[tiers]]
name = "gold"
threshold = 1500
[[rewards]]
id = "sticker"
name = "Sticker"
points_cost = 30
[retention]
lapse_factor = 2.0
default_gap_days = 60
min_gap_days = 7
winback_delay_days = 3
"#
    ))
    .expect("the test rules load")
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    Purchase {
        order: u8,
        day: i64,
        amount_minor: i64,
        dollars: bool,
        channel: u8,
        category: u8,
    },
    Return {
        order: u8,
        day: i64,
        amount_minor: i64,
    },
    Redeem {
        request: u8,
        day: i64,
    },
    Tick {
        day: i64,
    },
    Identify {
        day: i64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0u8..12, 0i64..300, 100i64..60_000, prop::bool::weighted(0.15), 0u8..3, 0u8..4)
            .prop_map(|(order, day, amount_minor, dollars, channel, category)| Step::Purchase {
                order, day, amount_minor, dollars, channel, category
            }),
        2 => (0u8..12, 0i64..320, 100i64..30_000)
            .prop_map(|(order, day, amount_minor)| Step::Return { order, day, amount_minor }),
        1 => (0u8..6, 0i64..320).prop_map(|(request, day)| Step::Redeem { request, day }),
        1 => (0i64..400).prop_map(|day| Step::Tick { day }),
        1 => (0i64..300).prop_map(|day| Step::Identify { day }),
    ]
}

fn history() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 0..24)
}

fn at(day: i64) -> i64 {
    START_MS + day * DAY_MS + 36_000_000
}

fn channel_event(customer: &str, index: usize, day: i64, kind: EventKind) -> CustomerCommand {
    let card = format!("LC-{customer}");
    CustomerCommand::Event {
        event: ChannelEvent {
            event_id: format!("{customer}-{index}"),
            channel: ["web", "app", "store"][index % 3].to_string(),
            occurred_at_ms: at(day),
            identities: vec![Identity::normalise(IdentityKind::LoyaltyCard, &card).unwrap()],
            kind,
        },
        conflict: None,
    }
}

fn command(customer: &str, index: usize, step: &Step) -> CustomerCommand {
    match step {
        Step::Purchase {
            order,
            day,
            amount_minor,
            dollars,
            channel,
            category,
        } => {
            let mut command = channel_event(
                customer,
                index,
                *day,
                EventKind::Purchase(Purchase {
                    order_id: format!("o{order}"),
                    amount_minor: *amount_minor,
                    currency: if *dollars { "USD" } else { "EUR" }.to_string(),
                    items: vec![LineItem {
                        sku: format!("sku-{category}"),
                        category: ["shoes", "hats", "socks", "bags"][usize::from(*category)]
                            .to_string(),
                        qty: 1,
                        price_minor: amount_minor / 2,
                    }],
                    store_id: None,
                }),
            );
            if let CustomerCommand::Event { event, .. } = &mut command {
                event.channel = ["web", "app", "store"][usize::from(*channel)].to_string();
            }
            command
        }
        Step::Return {
            order,
            day,
            amount_minor,
        } => channel_event(
            customer,
            index,
            *day,
            EventKind::Return(Return {
                order_id: format!("o{order}"),
                amount_minor: *amount_minor,
                items: Vec::new(),
            }),
        ),
        Step::Redeem { request, day } => CustomerCommand::Redeem {
            request_id: format!("r{request}"),
            reward_id: "sticker".to_string(),
            at_ms: at(*day),
        },
        Step::Tick { day } => CustomerCommand::Tick { at_ms: at(*day) },
        Step::Identify { day } => channel_event(
            customer,
            index,
            *day,
            EventKind::Identify {
                profile: BTreeMap::from([("first_name".to_string(), customer.to_string())]),
            },
        ),
    }
}

fn build(customer: &str, steps: &[Step], rules: &Rules) -> CustomerState {
    let mut state = CustomerState::new(customer);
    for (index, step) in steps.iter().enumerate() {
        apply(&mut state, &command(customer, index, step), rules);
    }
    state
}

fn points(state: &CustomerState) -> i64 {
    state.loyalty.balance() + state.loyalty.pending_points()
}

/// `state` with its time rules run up to `clock_ms` (what the merge runs on the union).
fn settled(state: &CustomerState, clock_ms: i64, rules: &Rules) -> CustomerState {
    let mut state = state.clone();
    apply(
        &mut state,
        &CustomerCommand::Tick { at_ms: clock_ms },
        rules,
    );
    state
}

fn merged(survivor: &CustomerState, other: &CustomerState, rules: &Rules) -> CustomerState {
    let merge = MergeRef {
        merged_id: other.customer_id.clone(),
        survivor_id: survivor.customer_id.clone(),
        cause_event_id: format!("link-{}", other.customer_id),
        at_ms: survivor.clock_ms.max(other.clock_ms),
    };
    let mut result = survivor.clone();
    let mut emitter = Emitter::new(&survivor.customer_id, "merge");
    merge_into(&mut result, other.clone(), &merge, rules, &mut emitter);
    result
}

/// What two customers' purchase figures must add up to once merged, each order once.
#[derive(Debug, PartialEq)]
struct Purchases {
    count: u64,
    count_in_currency: u64,
    spend_minor: i64,
    refunds_minor: i64,
    orders: BTreeSet<String>,
}

fn expected_purchases(survivor: &CustomerState, other: &CustomerState, rules: &Rules) -> Purchases {
    let shared: Vec<_> = other
        .orders
        .iter()
        .filter(|(id, _)| survivor.orders.contains_key(*id))
        .map(|(_, order)| order)
        .collect();
    let in_currency: Vec<_> = shared
        .iter()
        .filter(|order| order.currency == rules.currency)
        .collect();
    Purchases {
        count: survivor.purchases.count + other.purchases.count - shared.len() as u64,
        count_in_currency: survivor.purchases.count_in_currency + other.purchases.count_in_currency
            - in_currency.len() as u64,
        spend_minor: survivor.purchases.total_spend_minor + other.purchases.total_spend_minor
            - in_currency.iter().map(|o| o.amount_minor).sum::<i64>(),
        refunds_minor: survivor.returns.total_minor + other.returns.total_minor
            - in_currency.iter().map(|o| o.returned_minor).sum::<i64>(),
        orders: survivor
            .orders
            .keys()
            .chain(other.orders.keys())
            .cloned()
            .collect(),
    }
}

fn purchases_of(state: &CustomerState) -> Purchases {
    Purchases {
        count: state.purchases.count,
        count_in_currency: state.purchases.count_in_currency,
        spend_minor: state.purchases.total_spend_minor,
        refunds_minor: state.returns.total_minor,
        orders: state.orders.keys().cloned().collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn merging_two_customers_conserves_points_and_counts_every_order_once(
        a_steps in history(),
        b_steps in history(),
    ) {
        let rules = rules();
        let a = build("a", &a_steps, &rules);
        let b = build("b", &b_steps, &rules);
        let clock = a.clock_ms.max(b.clock_ms);
        let expected_points = points(&settled(&a, clock, &rules)) + points(&settled(&b, clock, &rules));
        let merged = merged(&a, &b, &rules);

        prop_assert_eq!(points(&merged), expected_points);
        prop_assert!(merged.loyalty.lots.iter().all(|lot| lot.points > 0));
        prop_assert_eq!(purchases_of(&merged), expected_purchases(&a, &b, &rules));
        let spend = merged.purchases.total_spend_minor;
        prop_assert_eq!(merged.purchases.by_channel_minor.values().sum::<i64>(), spend);
        prop_assert_eq!(merged.purchases.by_category_minor.values().sum::<i64>(), spend);
        prop_assert_eq!(
            merged.loyalty.earned_total,
            a.loyalty.earned_total + b.loyalty.earned_total
        );
        prop_assert_eq!(
            merged.loyalty.redeemed_total,
            a.loyalty.redeemed_total + b.loyalty.redeemed_total
        );
        // Every event id of either side is a repeat now.
        for id in a.dedup.order.iter().chain(b.dedup.order.iter()) {
            prop_assert!(merged.dedup.contains(id), "{} forgotten", id);
        }
        prop_assert!(merged.merge.has_merged("b"));
        prop_assert_eq!(merged.created_at_ms, match (a.created_at_ms, b.created_at_ms) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        });
    }

    #[test]
    fn a_small_lots_max_folds_lots_without_losing_a_point(
        a_steps in history(),
        b_steps in history(),
    ) {
        let rules = rules_with_limits("lots_max = 2");
        let a = build("a", &a_steps, &rules);
        let b = build("b", &b_steps, &rules);
        // The time rules only move points from the balance to the expired total.
        let held = |s: &CustomerState| points(s) + s.loyalty.expired_total;
        let merged = merged(&a, &b, &rules);
        prop_assert_eq!(held(&merged), held(&a) + held(&b));
        prop_assert!(merged.loyalty.lots.len() <= 2);
        prop_assert!(merged.loyalty.lots.iter().all(|lot| lot.points > 0));
    }

    #[test]
    fn merging_is_deterministic_and_the_log_path_matches(
        a_steps in history(),
        b_steps in history(),
    ) {
        let rules = rules();
        let a = build("a", &a_steps, &rules);
        let b = build("b", &b_steps, &rules);
        let once = codec::encode(&merged(&a, &b, &rules));
        let twice = codec::encode(&merged(&a, &b, &rules));
        prop_assert_eq!(&once, &twice);

        // Through the log: B's merge-out, then A's merge-in, applied twice.
        let merge = MergeRef {
            merged_id: "b".to_string(),
            survivor_id: "a".to_string(),
            cause_event_id: "link-b".to_string(),
            at_ms: a.clock_ms.max(b.clock_ms),
        };
        let mut tombstone = b.clone();
        let out = apply(&mut tombstone, &CustomerCommand::MergeOut { merge: merge.clone() }, &rules);
        let transfer = out.transfer.expect("a merge-out sends the state");
        prop_assert_eq!(&transfer.state, &b);
        let merge_in = CustomerCommand::MergeIn { merge, state: Box::new(transfer.state) };
        let mut survivor = a.clone();
        let first = apply(&mut survivor, &merge_in, &rules);
        prop_assert_eq!(first.status, ApplyStatus::Applied);
        let after_first = codec::encode(&survivor);
        prop_assert_eq!(&after_first, &once);
        let second = apply(&mut survivor, &merge_in, &rules);
        prop_assert_eq!(second.status, ApplyStatus::Duplicate);
        prop_assert_eq!(codec::encode(&survivor), after_first);
    }

    #[test]
    fn events_held_for_a_merge_apply_as_if_the_merged_state_had_come_first(
        a_steps in history(),
        b_steps in history(),
        after in prop::collection::vec(step(), 0..10),
    ) {
        let rules = rules();
        let a = build("a", &a_steps, &rules);
        let b = build("b", &b_steps, &rules);
        let merge = MergeRef {
            merged_id: "b".to_string(),
            survivor_id: "a".to_string(),
            cause_event_id: "a-link".to_string(),
            at_ms: at(310),
        };
        // The linking event and the survivor's later channel events (redeems and ticks
        // are never held, so they are left out of the comparison).
        let mut channel: Vec<CustomerCommand> = vec![CustomerCommand::ResolvedEvent {
            event: match channel_event("a", 900, 310, EventKind::Visit { store_id: None }) {
                CustomerCommand::Event { mut event, .. } => {
                    event.event_id = "a-link".to_string();
                    event
                }
                _ => unreachable!("channel_event makes events"),
            },
            notes: Vec::new(),
            merges: vec![merge.clone()],
        }];
        channel.extend(
            after
                .iter()
                .enumerate()
                .filter(|(_, step)| !matches!(step, Step::Redeem { .. } | Step::Tick { .. }))
                .map(|(index, step)| command("a", 1000 + index, step)),
        );
        let merge_in = CustomerCommand::MergeIn { merge, state: Box::new(b.clone()) };

        let mut held = a.clone();
        for command in &channel {
            prop_assert_eq!(apply(&mut held, command, &rules).status, ApplyStatus::Applied);
        }
        prop_assert_eq!(held.merge.held.len(), channel.len());
        let released = apply(&mut held, &merge_in, &rules);
        prop_assert_eq!(released.released.len(), channel.len());
        prop_assert!(held.merge.held.is_empty() && held.merge.awaiting.is_empty());

        let mut first = a.clone();
        apply(&mut first, &merge_in, &rules);
        let mut statuses = Vec::new();
        for command in &channel {
            statuses.push(apply(&mut first, command, &rules).status);
        }
        let released_statuses: Vec<ApplyStatus> =
            released.released.into_iter().map(|r| r.status).collect();
        prop_assert_eq!(released_statuses, statuses);
        prop_assert_eq!(codec::encode(&held), codec::encode(&first));
    }

    #[test]
    fn merging_three_customers_in_a_chain_conserves_everything(
        a_steps in history(),
        b_steps in history(),
        c_steps in history(),
    ) {
        let rules = rules();
        let a = build("a", &a_steps, &rules);
        let b = build("b", &b_steps, &rules);
        let c = build("c", &c_steps, &rules);
        let clock = a.clock_ms.max(b.clock_ms).max(c.clock_ms);
        let expected_points: i64 = [&a, &b, &c]
            .iter()
            .map(|state| points(&settled(state, clock, &rules)))
            .sum();
        // A into B, then B (holding A) into C.
        let b_with_a = merged(&b, &a, &rules);
        let all = merged(&c, &b_with_a, &rules);
        prop_assert_eq!(points(&all), expected_points);
        let mut orders: BTreeSet<String> = BTreeSet::new();
        for state in [&a, &b, &c] {
            orders.extend(state.orders.keys().cloned());
        }
        prop_assert_eq!(all.orders.keys().cloned().collect::<BTreeSet<_>>(), orders);
        prop_assert_eq!(all.purchases.count, all.orders.len() as u64);
        let merged_from: Vec<&str> = all
            .merge
            .merged_from
            .iter()
            .map(|m| m.customer_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        prop_assert_eq!(merged_from, vec!["a", "b"]);
        let spend = all.purchases.total_spend_minor;
        prop_assert_eq!(all.purchases.by_category_minor.values().sum::<i64>(), spend);
    }
}
