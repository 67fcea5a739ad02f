//! Unit tests of [`super::apply`]: every rule through whole command sequences.

use super::*;
use crate::actor_event::ActorEvent;
use crate::identity::{Identity, IdentityKind};
use crate::ingest::{ChannelEvent, EmailAction, EventKind, LineItem, Purchase, Return};
use crate::shard_message::IdentityConflict;
use crate::state::RetentionStatus;
use crate::time::{parse_rfc3339_ms, DAY_MS};
use crate::view::customer_view;
use std::collections::BTreeMap;

pub(super) struct Setup {
    pub(super) pending_days: i64,
    pub(super) first_bonus: i64,
    pub(super) winback_delay_days: i64,
    pub(super) extra_earning: &'static str,
    pub(super) extra_limits: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            pending_days: 0,
            first_bonus: 0,
            winback_delay_days: 3,
            extra_earning: "",
            extra_limits: "",
        }
    }
}

pub(super) fn rules_with(setup: Setup) -> Rules {
    let text = format!(
        r#"
version = 7
currency = "EUR"
[limits]
timeline_max_entries = 5
{limits}
[earning]
points_per_currency_unit = 1
pending_days = {pending}
first_purchase_bonus_points = {bonus}
{extra}
[expiry]
expiry_days = 365
[[tiers]]
name = "member"
threshold = 0
[[tiers]]
name = "silver"
threshold = 500
[[tiers]]
name = "gold"
threshold = 2000
[[rewards]]
id = "coffee"
name = "Free coffee"
points_cost = 150
[[rewards]]
id = "sticker"
name = "Sticker"
points_cost = 50
[retention]
lapse_factor = 2.0
default_gap_days = 90
min_gap_days = 7
winback_delay_days = {winback}
"#,
        pending = setup.pending_days,
        bonus = setup.first_bonus,
        extra = setup.extra_earning,
        limits = setup.extra_limits,
        winback = setup.winback_delay_days,
    );
    Rules::from_toml_str(&text).unwrap()
}

pub(super) fn rules() -> Rules {
    rules_with(Setup::default())
}

pub(super) fn day(n: i64) -> i64 {
    parse_rfc3339_ms("2026-01-01T00:00:00Z").unwrap() + n * DAY_MS
}

pub(super) fn event(event_id: &str, channel: &str, at_ms: i64, kind: EventKind) -> CustomerCommand {
    CustomerCommand::Event {
        event: ChannelEvent {
            event_id: event_id.to_string(),
            channel: channel.to_string(),
            occurred_at_ms: at_ms,
            identities: vec![Identity::normalise(IdentityKind::LoyaltyCard, "LC-1").unwrap()],
            kind,
        },
        conflict: None,
    }
}

pub(super) fn purchase_with(
    event_id: &str,
    order_id: &str,
    channel: &str,
    at_ms: i64,
    amount_minor: i64,
    items: Vec<LineItem>,
) -> CustomerCommand {
    event(
        event_id,
        channel,
        at_ms,
        EventKind::Purchase(Purchase {
            order_id: order_id.to_string(),
            amount_minor,
            currency: "EUR".to_string(),
            items,
            store_id: None,
        }),
    )
}

/// `command`, a purchase, in US dollars (an accepted currency that is not the rules').
fn in_dollars(mut command: CustomerCommand) -> CustomerCommand {
    if let CustomerCommand::Event { event, .. } = &mut command {
        if let EventKind::Purchase(purchase) = &mut event.kind {
            purchase.currency = "USD".to_string();
        }
    }
    command
}

pub(super) fn status(outcome: &ApplyOutcome) -> Option<RejectReason> {
    match &outcome.status {
        ApplyStatus::Rejected(rejection) => Some(rejection.reason),
        _ => None,
    }
}

pub(super) fn purchase(
    event_id: &str,
    order_id: &str,
    at_ms: i64,
    amount_minor: i64,
) -> CustomerCommand {
    purchase_with(event_id, order_id, "web", at_ms, amount_minor, Vec::new())
}

pub(super) fn give_back(
    event_id: &str,
    order_id: &str,
    at_ms: i64,
    amount_minor: i64,
) -> CustomerCommand {
    event(
        event_id,
        "store",
        at_ms,
        EventKind::Return(Return {
            order_id: order_id.to_string(),
            amount_minor,
            items: Vec::new(),
        }),
    )
}

pub(super) fn tick(at_ms: i64) -> CustomerCommand {
    CustomerCommand::Tick { at_ms }
}

pub(super) fn redeem(request_id: &str, reward_id: &str, at_ms: i64) -> CustomerCommand {
    CustomerCommand::Redeem {
        request_id: request_id.to_string(),
        reward_id: reward_id.to_string(),
        at_ms,
    }
}

pub(super) fn item(category: &str, qty: u32, price_minor: i64) -> LineItem {
    LineItem {
        sku: format!("sku-{category}"),
        category: category.to_string(),
        qty,
        price_minor,
    }
}

pub(super) fn run(
    state: &mut CustomerState,
    rules: &Rules,
    commands: &[CustomerCommand],
) -> Vec<ActorEvent> {
    commands
        .iter()
        .flat_map(|c| apply(state, c, rules).events)
        .collect()
}

pub(super) fn types(events: &[ActorEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_type()).collect()
}

pub(super) fn find<'a>(events: &'a [ActorEvent], event_type: &str) -> &'a ActorEvent {
    events
        .iter()
        .find(|e| e.event_type() == event_type)
        .unwrap_or_else(|| panic!("no {event_type} in {:?}", types(events)))
}

pub(super) fn bytes(state: &CustomerState) -> Vec<u8> {
    bincode::serde::encode_to_vec(state, bincode::config::standard()).unwrap()
}

#[test]
fn the_first_event_creates_the_customer_with_deterministic_event_ids() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    assert!(!state.exists());
    let outcome = apply(&mut state, &purchase("e1", "o1", day(0), 1000), &rules);
    assert_eq!(outcome.status, ApplyStatus::Applied);
    assert!(state.exists());
    assert_eq!(outcome.events[0].event_type(), "customer.created");
    assert_eq!(outcome.events[0].id, "e1:customer.created:0");
    assert_eq!(outcome.events[1].id, "e1:points.earned:1");
    let later = apply(&mut state, &purchase("e2", "o2", day(1), 1000), &rules);
    assert!(!types(&later.events).contains(&"customer.created"));
}

#[test]
fn points_combine_channel_and_category_multipliers() {
    let rules = rules_with(Setup {
        extra_earning: "[earning.channel_multipliers]\napp = 1.5\n[earning.category_multipliers]\nshoes = 2.0\n",
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    // 40.00 of shoes at 2x + 60.00 not covered by items at 1x = 140, times app 1.5 = 210.
    let events = run(
        &mut state,
        &rules,
        &[purchase_with(
            "e1",
            "o1",
            "app",
            day(0),
            10_000,
            vec![item("shoes", 2, 2_000)],
        )],
    );
    let earned = find(&events, "points.earned");
    assert_eq!(earned.to_json()["base_points"], 210);
    assert_eq!(earned.to_json()["points"], 210);
    assert_eq!(state.loyalty.balance(), 210);
    assert_eq!(state.purchases.by_category_minor["shoes"], 4_000);
    assert_eq!(state.purchases.by_category_minor["uncategorised"], 6_000);
    // Fractions of a point are floored once: 9.99 on the web earns 9.
    run(&mut state, &rules, &[purchase("e2", "o2", day(1), 999)]);
    assert_eq!(state.loyalty.balance(), 219);
}

#[test]
fn the_first_purchase_bonus_is_granted_once() {
    let rules = rules_with(Setup {
        first_bonus: 100,
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    let events = run(&mut state, &rules, &[purchase("e1", "o1", day(0), 5_000)]);
    let earned = find(&events, "points.earned");
    assert_eq!(earned.to_json()["bonus_points"], 100);
    assert_eq!(state.loyalty.balance(), 150);
    run(&mut state, &rules, &[purchase("e2", "o2", day(1), 5_000)]);
    assert_eq!(state.loyalty.balance(), 200);
}

#[test]
fn a_repeated_event_id_or_order_id_is_applied_zero_times() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 5_000)]);
    let before = state.clone();
    let again = apply(&mut state, &purchase("e1", "o1", day(0), 5_000), &rules);
    assert_eq!(again.status, ApplyStatus::Duplicate);
    assert!(again.events.is_empty());
    let same_order = apply(&mut state, &purchase("e9", "o1", day(2), 5_000), &rules);
    assert_eq!(same_order.status, ApplyStatus::Duplicate);
    assert!(same_order.events.is_empty());
    assert_eq!(state, before);
    assert_eq!(state.loyalty.balance(), 50);
    assert_eq!(state.purchases.count, 1);
}

#[test]
fn a_partial_return_reverses_points_pro_rata_and_a_shortfall_never_goes_negative() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    let events = run(&mut state, &rules, &[give_back("r1", "o1", day(1), 3_000)]);
    let reversed = find(&events, "points.reversed");
    assert_eq!(reversed.to_json()["points"], 30);
    assert_eq!(state.loyalty.balance(), 70);
    assert_eq!(state.returns.count, 1);

    // Spend most of the rest, then return the rest of the order.
    let spent = apply(&mut state, &redeem("q1", "sticker", day(2)), &rules);
    assert!(spent.redeem.unwrap().approved);
    assert_eq!(state.loyalty.balance(), 20);
    let events = run(&mut state, &rules, &[give_back("r2", "o1", day(3), 7_000)]);
    let reversed = find(&events, "points.reversed");
    assert_eq!(reversed.to_json()["points"], 70);
    assert_eq!(reversed.to_json()["from_balance"], 20);
    assert_eq!(reversed.to_json()["shortfall"], 50);
    assert_eq!(state.loyalty.balance(), 0);
    assert_eq!(state.loyalty.shortfall_points, 50);
    let view = customer_view(&state, day(3), &rules);
    assert_eq!(view["loyalty"]["shortfall"], 50);
    assert_eq!(view["loyalty"]["points_balance"], 0);
    assert_eq!(view["returns"]["total"], serde_json::json!(100.0));
}

#[test]
fn returns_for_unknown_orders_or_above_the_order_are_rejected_and_change_nothing() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    let before = state.clone();
    let unknown = apply(
        &mut state,
        &give_back("r1", "o-missing", day(1), 100),
        &rules,
    );
    match unknown.status {
        ApplyStatus::Rejected(rejection) => {
            assert_eq!(rejection.reason, RejectReason::Unapplicable);
            assert!(
                rejection.message.contains("o-missing"),
                "{}",
                rejection.message
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let too_much = apply(&mut state, &give_back("r2", "o1", day(1), 10_001), &rules);
    match too_much.status {
        ApplyStatus::Rejected(rejection) => {
            assert_eq!(rejection.reason, RejectReason::BadAmount);
            assert!(
                rejection.message.contains("100.00"),
                "{}",
                rejection.message
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(state, before);
}

#[test]
fn points_expire_at_the_tick_after_their_expiry() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    assert_eq!(
        state.next_due_ms(),
        Some(day(365)).min(state.retention.lapse_due_ms)
    );
    let events = run(&mut state, &rules, &[tick(day(364) + 1)]);
    assert!(!types(&events).contains(&"points.expired"));
    assert_eq!(state.loyalty.balance(), 100);
    let outcome = apply(&mut state, &tick(day(365)), &rules);
    let expired = find(&outcome.events, "points.expired");
    assert_eq!(expired.to_json()["points"], 100);
    assert_eq!(expired.at_ms, day(365));
    assert!(expired.id.starts_with(&format!(
        "tick-{}-{}:points.expired:",
        day(365),
        state.customer_id
    )));
    assert_eq!(state.loyalty.balance(), 0);
    assert_eq!(state.loyalty.expired_total, 100);
    // Another customer expiring at the same tick gets its own event id (a shared id
    // would be dropped by CRM_EVENTS's dedup).
    let mut other = CustomerState::new("c2");
    run(&mut other, &rules, &[purchase("e2", "o2", day(0), 10_000)]);
    let outcome = apply(&mut other, &tick(day(365)), &rules);
    assert_ne!(find(&outcome.events, "points.expired").id, expired.id);
}

#[test]
fn pending_points_release_by_tick_or_by_a_later_event() {
    let rules = rules_with(Setup {
        pending_days: 14,
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    let events = run(&mut state, &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    assert_eq!(find(&events, "points.earned").to_json()["pending"], true);
    assert_eq!(state.loyalty.balance(), 0);
    assert_eq!(state.loyalty.pending_points(), 100);
    assert_eq!(state.next_due_ms(), Some(day(14)));
    let events = run(&mut state, &rules, &[tick(day(14))]);
    assert_eq!(find(&events, "points.released").to_json()["points"], 100);
    assert_eq!(state.loyalty.balance(), 100);

    // A later event past the release time releases too, before it is applied.
    run(&mut state, &rules, &[purchase("e2", "o2", day(20), 5_000)]);
    let events = run(
        &mut state,
        &rules,
        &[event(
            "v1",
            "web",
            day(40),
            EventKind::Visit { store_id: None },
        )],
    );
    assert!(types(&events).contains(&"points.released"));
    assert_eq!(state.loyalty.balance(), 150);
    // The lot still expires a year after the purchase, not after the release.
    assert_eq!(state.loyalty.lots[1].expires_at_ms, Some(day(20 + 365)));
}

#[test]
fn a_return_inside_the_pending_window_takes_pending_points_first() {
    let rules = rules_with(Setup {
        pending_days: 14,
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 10_000),
            tick(day(14)),
            purchase("e2", "o2", day(20), 10_000),
        ],
    );
    let events = run(&mut state, &rules, &[give_back("r1", "o2", day(21), 5_000)]);
    let reversed = find(&events, "points.reversed");
    assert_eq!(reversed.to_json()["from_pending"], 50);
    assert_eq!(reversed.to_json()["from_balance"], 0);
    assert_eq!(state.loyalty.pending_points(), 50);
    assert_eq!(state.loyalty.balance(), 100);
}

#[test]
fn a_tier_upgrade_happens_at_once() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    let events = run(&mut state, &rules, &[purchase("e1", "o1", day(0), 60_000)]);
    let changed = find(&events, "tier.changed");
    assert_eq!(changed.to_json()["direction"], "up");
    assert_eq!(changed.to_json()["to"], "silver");
    assert_eq!(state.loyalty.tier.as_deref(), Some("silver"));
    assert_eq!(state.loyalty.tier_review_at_ms, Some(day(365)));
}

#[test]
fn a_tier_is_downgraded_only_at_its_anniversary() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 60_000),
            give_back("r1", "o1", day(10), 30_000),
        ],
    );
    // Spend is now 300, below silver, but the tier holds until its review date.
    let events = run(&mut state, &rules, &[tick(day(364))]);
    assert!(!types(&events).contains(&"tier.changed"));
    assert_eq!(state.loyalty.tier.as_deref(), Some("silver"));
    let events = run(&mut state, &rules, &[tick(day(365))]);
    let changed = find(&events, "tier.changed");
    assert_eq!(changed.to_json()["direction"], "down");
    assert_eq!(changed.to_json()["to"], "member");
    assert_eq!(changed.at_ms, day(365));
    assert_eq!(state.loyalty.tier_review_at_ms, None);
    assert_eq!(state.loyalty.tier_history.len(), 2);
}

#[test]
fn a_tier_still_qualifying_at_its_anniversary_rolls_forward_a_year() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 60_000),
            purchase("e2", "o2", day(200), 55_000),
        ],
    );
    let events = run(&mut state, &rules, &[tick(day(365))]);
    assert!(!types(&events).contains(&"tier.changed"));
    assert_eq!(state.loyalty.tier.as_deref(), Some("silver"));
    assert_eq!(state.loyalty.tier_review_at_ms, Some(day(730)));
    let events = run(&mut state, &rules, &[tick(day(800))]);
    let changed = find(&events, "tier.changed");
    assert_eq!(changed.to_json()["direction"], "down");
    assert_eq!(changed.at_ms, day(730));
}

#[test]
fn a_one_time_buyer_lapses_gets_one_winback_and_reactivates_on_the_next_purchase() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1_000)]);
    // default gap 90 days x 2.0 = lapsed strictly after 180 days.
    assert!(run(&mut state, &rules, &[tick(day(180))]).is_empty());
    let events = run(&mut state, &rules, &[tick(day(181))]);
    let lapsed = find(&events, "retention.lapsed");
    assert!(lapsed.to_json()["reason"]
        .as_str()
        .unwrap()
        .contains("default gap of 90 days"));
    assert!(!types(&events).contains(&"retention.winback_offered"));
    let events = run(&mut state, &rules, &[tick(day(184))]);
    assert_eq!(types(&events), vec!["retention.winback_offered"]);
    assert!(run(&mut state, &rules, &[tick(day(300))]).is_empty());
    assert_eq!(state.retention.status, RetentionStatus::Lapsed);
    let view = customer_view(&state, day(300), &rules);
    assert_eq!(view["retention"]["state"], "lapsed");
    assert_eq!(view["retention"]["winback_offered"], true);

    let events = run(&mut state, &rules, &[purchase("e2", "o2", day(310), 1_000)]);
    assert_eq!(
        find(&events, "retention.reactivated").to_json()["reactivated_count"],
        1
    );
    assert_eq!(state.retention.status, RetentionStatus::Active);
    // Own gap is now 310 days: the next lapse comes after 620 days, with a new offer.
    assert_eq!(state.retention.lapse_due_ms, Some(day(310 + 620) + 1));
    let events = run(&mut state, &rules, &[tick(day(1000))]);
    assert_eq!(
        types(&events),
        vec![
            "points.expired",
            "points.expired",
            "retention.lapsed",
            "retention.winback_offered"
        ]
    );
}

#[test]
fn a_repeat_buyer_lapses_after_k_times_their_own_mean_gap() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 1_000),
            purchase("e2", "o2", day(10), 1_000),
            purchase("e3", "o3", day(20), 1_000),
        ],
    );
    assert_eq!(state.retention.mean_gap_ms(), Some(10 * DAY_MS));
    assert_eq!(state.retention.lapse_due_ms, Some(day(40) + 1));
    let events = run(&mut state, &rules, &[tick(day(41))]);
    let reason = find(&events, "retention.lapsed").to_json()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("mean gap of 10 days"), "{reason}");
    let view = customer_view(&state, day(41), &rules);
    assert_eq!(view["retention"]["recency_days"], 21);
    assert_eq!(view["retention"]["frequency"], 3);
    assert_eq!(view["retention"]["mean_gap_days"], serde_json::json!(10.0));
}

#[test]
fn redeem_approves_denies_and_repeats_the_same_answer() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 10_000),
            purchase("e2", "o2", day(100), 10_000),
        ],
    );
    let first = apply(&mut state, &redeem("q1", "coffee", day(101)), &rules);
    let answer = first.redeem.clone().unwrap();
    assert!(answer.approved);
    assert_eq!(answer.points_spent, 150);
    assert_eq!(answer.points_balance, 50);
    assert_eq!(
        find(&first.events, "points.redeemed").to_json()["points"],
        150
    );
    // The oldest lot went first.
    assert_eq!(state.loyalty.lots.len(), 1);
    assert_eq!(state.loyalty.lots[0].source, "o2");

    let again = apply(&mut state, &redeem("q1", "coffee", day(102)), &rules);
    assert_eq!(again.status, ApplyStatus::Duplicate);
    assert_eq!(again.redeem.unwrap(), answer);
    assert_eq!(state.loyalty.balance(), 50);

    let poor = apply(&mut state, &redeem("q2", "coffee", day(102)), &rules)
        .redeem
        .unwrap();
    assert!(!poor.approved);
    assert_eq!(poor.reason.as_deref(), Some("insufficient_points"));
    let unknown = apply(&mut state, &redeem("q3", "unicorn", day(102)), &rules)
        .redeem
        .unwrap();
    assert_eq!(unknown.reason.as_deref(), Some("unknown_reward"));
    let repeated_denial = apply(&mut state, &redeem("q2", "sticker", day(103)), &rules);
    assert_eq!(repeated_denial.redeem.unwrap(), poor);

    let mut nobody = CustomerState::new("c2");
    let outcome = apply(&mut nobody, &redeem("q1", "coffee", day(0)), &rules);
    assert_eq!(
        outcome.redeem.unwrap().reason.as_deref(),
        Some("unknown_customer")
    );
    assert!(!nobody.exists());
    assert_eq!(nobody, CustomerState::new("c2"));
}

#[test]
fn a_late_purchase_joins_history_without_moving_the_clock_back() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(100), 1_000)]);
    let events = run(&mut state, &rules, &[purchase("e0", "o0", day(50), 2_000)]);
    assert_eq!(state.clock_ms, day(100));
    assert_eq!(state.purchases.first_at_ms, Some(day(50)));
    assert_eq!(state.purchases.last_at_ms, Some(day(100)));
    assert_eq!(state.created_at_ms, Some(day(50)));
    assert_eq!(find(&events, "points.earned").at_ms, day(100));
    let late_lot = state
        .loyalty
        .lots
        .iter()
        .find(|l| l.source == "o0")
        .unwrap();
    assert_eq!(late_lot.expires_at_ms, Some(day(50 + 365)));
    let view = customer_view(&state, day(100), &rules);
    assert_eq!(view["timeline"][0]["at"], format_rfc3339_day(100));
    assert_eq!(view["timeline"][1]["at"], format_rfc3339_day(50));

    // A purchase so late that its points have already expired: earned, then expired.
    let events = run(
        &mut state,
        &rules,
        &[tick(day(500)), purchase("e-old", "o-old", day(10), 3_000)],
    );
    let kinds = types(&events);
    let earned = kinds.iter().position(|t| *t == "points.earned").unwrap();
    let expired = kinds.iter().rposition(|t| *t == "points.expired").unwrap();
    assert!(earned < expired, "{kinds:?}");
    assert_eq!(state.loyalty.balance(), 0);
    assert_eq!(state.clock_ms, day(500));
}

fn format_rfc3339_day(n: i64) -> String {
    crate::time::format_rfc3339(day(n))
}

#[test]
fn identities_are_gained_and_conflicts_reported() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1_000)]);
    let mut command = event(
        "e2",
        "web",
        day(1),
        EventKind::Identify {
            profile: BTreeMap::from([("first_name".to_string(), "Ann".to_string())]),
        },
    );
    if let CustomerCommand::Event { event, conflict } = &mut command {
        event
            .identities
            .push(Identity::normalise(IdentityKind::Email, "ann@example.com").unwrap());
        *conflict = Some(IdentityConflict {
            kind: IdentityKind::Email,
            other_customer_id: "c9".to_string(),
        });
    }
    let events = run(&mut state, &rules, &[command]);
    assert_eq!(find(&events, "identity.linked").to_json()["kind"], "email");
    assert_eq!(
        find(&events, "identity.conflict").to_json()["other_customer_id"],
        "c9"
    );
    assert_eq!(state.identities.len(), 2);
    let view = customer_view(&state, day(1), &rules);
    assert_eq!(view["identities"]["email"][0], "ann@example.com");
    assert_eq!(view["profile"]["first_name"], "Ann");
}

#[test]
fn the_profile_completion_bonus_is_granted_once() {
    let rules = rules_with(Setup {
        extra_earning: "[earning.profile_completion]\nbonus_points = 50\nfields = [\"first_name\", \"birthday\"]\n",
        ..Setup::default()
    });
    let identify = |id: &str, at: i64, key: &str| {
        event(
            id,
            "app",
            at,
            EventKind::Identify {
                profile: BTreeMap::from([(key.to_string(), "x".to_string())]),
            },
        )
    };
    let mut state = CustomerState::new("c1");
    assert!(
        run(&mut state, &rules, &[identify("e1", day(0), "first_name")])
            .iter()
            .all(|e| e.event_type() != "points.earned")
    );
    let events = run(&mut state, &rules, &[identify("e2", day(1), "birthday")]);
    assert_eq!(
        find(&events, "points.earned").to_json()["reason"],
        "profile_completion"
    );
    let events = run(&mut state, &rules, &[identify("e3", day(2), "birthday")]);
    assert!(events.iter().all(|e| e.event_type() != "points.earned"));
    assert_eq!(state.loyalty.balance(), 50);
}

#[test]
fn the_timeline_keeps_the_most_recent_entries_newest_first() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    for n in 0..8 {
        let command = event(
            &format!("v{n}"),
            if n % 2 == 0 { "web" } else { "store" },
            day(n),
            EventKind::Visit {
                store_id: Some(format!("s{n}")),
            },
        );
        apply(&mut state, &command, &rules);
    }
    let view = customer_view(&state, day(8), &rules);
    let timeline = view["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 5);
    assert_eq!(timeline[0]["summary"], "visited store s7");
    assert_eq!(timeline[4]["summary"], "visited store s3");
    assert_eq!(view["visits"]["last_store_id"], "s7");
}

#[test]
fn the_view_holds_every_public_field() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1_250)]);
    let view = customer_view(&state, day(3), &rules);
    assert_eq!(view["v"], 1);
    assert_eq!(view["customer_id"], "c1");
    for field in [
        "identities",
        "profile",
        "consents",
        "timeline",
        "support",
        "email",
    ] {
        assert!(!view[field].is_null(), "{field} missing");
    }
    for field in [
        "count",
        "total_spend",
        "first_at",
        "last_at",
        "by_channel",
        "by_category",
    ] {
        assert!(
            view["purchases"].get(field).is_some(),
            "purchases.{field} missing"
        );
    }
    for field in ["count", "total"] {
        assert!(
            view["returns"].get(field).is_some(),
            "returns.{field} missing"
        );
    }
    for field in [
        "points_balance",
        "points_pending",
        "tier",
        "lots",
        "tier_history",
        "shortfall",
    ] {
        assert!(
            view["loyalty"].get(field).is_some(),
            "loyalty.{field} missing"
        );
    }
    for field in [
        "state",
        "recency_days",
        "frequency",
        "monetary",
        "mean_gap_days",
        "reason",
        "winback_offered",
    ] {
        assert!(
            view["retention"].get(field).is_some(),
            "retention.{field} missing"
        );
    }
    assert_eq!(view["purchases"]["total_spend"], serde_json::json!(12.5));
    assert_eq!(view["loyalty"]["lots"][0]["points"], 12);
    assert_eq!(view["retention"]["state"], "active");
    assert_eq!(view["retention"]["recency_days"], 3);
    let fresh = customer_view(&CustomerState::new("c2"), day(0), &rules);
    assert_eq!(fresh["retention"]["state"], "new");
}

/// A mixed log: purchases over two years, returns, redeems, ticks, other channels.
fn mixed_log() -> Vec<CustomerCommand> {
    let mut log = Vec::new();
    for n in 0..40 {
        let at = day(n * 17);
        log.push(purchase_with(
            &format!("p{n}"),
            &format!("o{n}"),
            ["web", "app", "store"][(n % 3) as usize],
            at,
            1_000 + n * 731,
            vec![item(["shoes", "bags"][(n % 2) as usize], 1, 500 + n * 100)],
        ));
        if n % 5 == 0 {
            log.push(give_back(
                &format!("r{n}"),
                &format!("o{n}"),
                at + DAY_MS,
                400,
            ));
        }
        if n % 7 == 0 {
            log.push(redeem(&format!("q{n}"), "sticker", at + 2 * DAY_MS));
        }
        if n % 4 == 0 {
            log.push(tick(at + 9 * DAY_MS));
        }
        log.push(event(
            &format!("m{n}"),
            "email",
            at + 3 * DAY_MS,
            EventKind::Email {
                action: EmailAction::Opened,
                campaign: format!("c{n}"),
            },
        ));
    }
    log.push(tick(day(2000)));
    log
}

/// A small deterministic shuffle (no randomness crate needed).
fn shuffled(mut log: Vec<CustomerCommand>, seed: u64) -> Vec<CustomerCommand> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for i in (1..log.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = ((x >> 33) % (i as u64 + 1)) as usize;
        log.swap(i, j);
    }
    log
}

#[test]
fn replaying_the_same_log_yields_byte_identical_state() {
    let rules = rules_with(Setup {
        pending_days: 14,
        first_bonus: 100,
        ..Setup::default()
    });
    for seed in [0, 1, 2, 3] {
        let log = if seed == 0 {
            mixed_log()
        } else {
            shuffled(mixed_log(), seed)
        };
        let mut first = CustomerState::new("c1");
        let mut second = CustomerState::new("c1");
        let outcomes_first: Vec<ApplyOutcome> =
            log.iter().map(|c| apply(&mut first, c, &rules)).collect();
        let events_second = run(&mut second, &rules, &log);
        assert_eq!(bytes(&first), bytes(&second), "seed {seed}");
        let events_first: Vec<ActorEvent> = outcomes_first
            .iter()
            .flat_map(|o| o.events.clone())
            .collect();
        assert_eq!(events_first, events_second, "seed {seed}");
        let (decoded, _): (CustomerState, usize) =
            bincode::serde::decode_from_slice(&bytes(&first), bincode::config::standard()).unwrap();
        assert_eq!(decoded, first);

        // Redelivering every applied command changes nothing and emits nothing (a
        // return that arrived before its purchase was rejected, so it may apply now).
        let before = bytes(&first);
        let applied: Vec<CustomerCommand> = log
            .iter()
            .zip(&outcomes_first)
            .filter(|(_, o)| o.status == ApplyStatus::Applied)
            .map(|(c, _)| c.clone())
            .collect();
        let redelivered = run(&mut first, &rules, &applied);
        assert!(redelivered.is_empty(), "{:?}", types(&redelivered));
        assert_eq!(bytes(&first), before, "seed {seed}");
    }
}

#[test]
fn purchases_in_any_order_add_up_to_the_same_totals() {
    let rules = rules_with(Setup {
        first_bonus: 100,
        ..Setup::default()
    });
    let purchases: Vec<CustomerCommand> = (0..20)
        .map(|n| {
            purchase(
                &format!("p{n}"),
                &format!("o{n}"),
                day(n * 3),
                1_000 + n * 99,
            )
        })
        .collect();
    let mut reference = CustomerState::new("c1");
    run(&mut reference, &rules, &purchases);
    for seed in 1..5 {
        let mut state = CustomerState::new("c1");
        run(&mut state, &rules, &shuffled(purchases.clone(), seed));
        assert_eq!(state.purchases, reference.purchases);
        assert_eq!(state.loyalty.balance(), reference.loyalty.balance());
        assert_eq!(state.loyalty.tier, reference.loyalty.tier);
        assert_eq!(
            state.retention.mean_gap_ms(),
            reference.retention.mean_gap_ms()
        );
        assert_eq!(state.clock_ms, reference.clock_ms);
    }
}

#[test]
fn a_late_purchase_dated_before_the_lapse_does_not_reactivate() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    // Gap 10 days: lapsed 20 days after day 10, offer 3 days later.
    let events = run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 1000),
            purchase("e2", "o2", day(10), 1000),
            tick(day(40)),
        ],
    );
    assert!(types(&events).contains(&"retention.winback_offered"));
    let late = apply(&mut state, &purchase("e0", "o0", day(5), 1000), &rules);
    assert_eq!(late.status, ApplyStatus::Applied);
    assert_eq!(types(&late.events), vec!["points.earned"]);
    assert_eq!(state.retention.status, RetentionStatus::Lapsed);
    assert_eq!(
        (
            state.retention.lapse_count,
            state.retention.reactivated_count
        ),
        (1, 0)
    );
    assert_eq!(state.retention.lapsed_at_ms, Some(day(30) + 1));
    // A purchase after the lapse still reactivates.
    let back = apply(&mut state, &purchase("e3", "o3", day(41), 1000), &rules);
    assert!(types(&back.events).contains(&"retention.reactivated"));
    assert_eq!(state.retention.status, RetentionStatus::Active);
}

#[test]
fn returning_an_order_whose_points_expired_takes_nothing_from_other_lots() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 10_000),
            purchase("e2", "o2", day(300), 5_000),
            tick(day(366)),
        ],
    );
    assert_eq!(state.loyalty.balance(), 50, "o1's 100 points expired");
    let events = run(
        &mut state,
        &rules,
        &[give_back("r1", "o1", day(367), 10_000)],
    );
    let reversed = find(&events, "points.reversed");
    assert_eq!(reversed.to_json()["points"], 100);
    assert_eq!(reversed.to_json()["from_expired"], 100);
    assert_eq!(reversed.to_json()["from_balance"], 0);
    assert_eq!(reversed.to_json()["shortfall"], 0);
    assert_eq!(state.loyalty.balance(), 50, "o2's points stay");
    assert_eq!(state.loyalty.shortfall_points, 0);
}

#[test]
fn a_partly_expired_order_takes_back_its_spent_points_from_other_lots() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 10_000),
            redeem("q1", "sticker", day(1)),
            purchase("e2", "o2", day(300), 20_000),
            tick(day(366)),
        ],
    );
    // o1: 100 points, 50 spent on the sticker, 50 expired; o2: 200 points.
    assert_eq!(state.loyalty.balance(), 200);
    let events = run(
        &mut state,
        &rules,
        &[give_back("r1", "o1", day(367), 10_000)],
    );
    let reversed = find(&events, "points.reversed");
    assert_eq!(reversed.to_json()["from_expired"], 50);
    assert_eq!(reversed.to_json()["from_balance"], 50, "the spent half");
    assert_eq!(state.loyalty.balance(), 150);
}

#[test]
fn a_late_order_older_than_every_kept_one_still_guards_its_order_id() {
    let rules = rules_with(Setup {
        extra_limits: "orders_max = 2",
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(10), 1000),
            purchase("e2", "o2", day(20), 1000),
            purchase("e0", "o0", day(5), 1000),
        ],
    );
    assert!(state.orders.contains_key("o0"), "{:?}", state.orders.keys());
    assert!(
        !state.orders.contains_key("o1"),
        "the order applied longest ago goes"
    );
    let again = apply(
        &mut state,
        &purchase("e0-retry", "o0", day(5), 1000),
        &rules,
    );
    assert_eq!(again.status, ApplyStatus::Duplicate);
    assert_eq!(state.loyalty.earned_total, 30);
}

#[test]
fn the_first_purchase_bonus_waits_for_a_purchase_in_the_loyalty_currency() {
    let rules = rules_with(Setup {
        first_bonus: 100,
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    run(
        &mut state,
        &rules,
        &[in_dollars(purchase("e1", "o1", day(0), 1000))],
    );
    assert_eq!(state.loyalty.earned_total, 0);
    let euros = run(&mut state, &rules, &[purchase("e2", "o2", day(1), 1000)]);
    assert_eq!(find(&euros, "points.earned").to_json()["points"], 110);
    let more = run(&mut state, &rules, &[purchase("e3", "o3", day(2), 1000)]);
    assert_eq!(find(&more, "points.earned").to_json()["points"], 10);
}

#[test]
fn point_totals_saturate_instead_of_overflowing() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1000)]);
    state.loyalty.earned_total = i64::MAX - 3;
    state.loyalty.lots[0].points = i64::MAX - 3;
    run(&mut state, &rules, &[purchase("e2", "o2", day(1), 1000)]);
    assert_eq!(state.loyalty.earned_total, i64::MAX);
    assert_eq!(state.loyalty.balance(), i64::MAX);
}

#[test]
fn profile_consent_channel_and_category_counts_are_bounded() {
    let rules = rules_with(Setup {
        extra_limits:
            "profile_fields_max = 2\nconsent_purposes_max = 1\nchannels_max = 1\ncategories_max = 1",
        ..Setup::default()
    });
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1000)]);
    let identify = |id: &str, fields: &[&str]| {
        event(
            id,
            "web",
            day(1),
            EventKind::Identify {
                profile: fields
                    .iter()
                    .map(|f| (f.to_string(), "x".to_string()))
                    .collect(),
            },
        )
    };
    let refused = apply(&mut state, &identify("i1", &["a", "b", "c"]), &rules);
    assert_eq!(status(&refused), Some(RejectReason::Unapplicable));
    assert!(
        state.profile.is_empty(),
        "a refused identify changes nothing"
    );
    let fits = apply(&mut state, &identify("i2", &["a", "b"]), &rules);
    assert_eq!(fits.status, ApplyStatus::Applied);
    let same = apply(&mut state, &identify("i3", &["a"]), &rules);
    assert_eq!(
        same.status,
        ApplyStatus::Applied,
        "updating a kept field is fine"
    );

    let consent = |id: &str, purpose: &str| {
        event(
            id,
            "web",
            day(2),
            EventKind::Consent {
                purpose: purpose.to_string(),
                granted: true,
            },
        )
    };
    assert_eq!(
        apply(&mut state, &consent("k1", "email"), &rules).status,
        ApplyStatus::Applied
    );
    let second = apply(&mut state, &consent("k2", "sms"), &rules);
    assert_eq!(status(&second), Some(RejectReason::Unapplicable));

    run(
        &mut state,
        &rules,
        &[purchase_with(
            "e2",
            "o2",
            "app",
            day(3),
            2000,
            vec![item("shoes", 1, 1000), item("bags", 1, 1000)],
        )],
    );
    let channels: Vec<&String> = state.channels.keys().collect();
    assert_eq!(channels, vec!["other", "web"]);
    let spend: Vec<&String> = state.purchases.by_channel_minor.keys().collect();
    assert_eq!(spend, vec!["other", "web"]);
    assert!(
        state.purchases.by_category_minor.len() <= 2,
        "{:?}",
        state.purchases.by_category_minor
    );
    assert!(state.purchases.by_category_minor.contains_key("other"));
}

#[test]
fn a_view_shows_the_time_rules_due_by_its_time_without_storing_them() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    run(&mut state, &rules, &[purchase("e1", "o1", day(0), 1000)]);
    let before = bytes(&state);
    let view = customer_view(&state, day(400), &rules);
    assert_eq!(
        view["loyalty"]["points_balance"], 0,
        "the lot expired on day 365"
    );
    assert_eq!(
        view["retention"]["state"], "lapsed",
        "{}",
        view["retention"]
    );
    assert_eq!(bytes(&state), before, "the stored state is untouched");
    assert_eq!(state.loyalty.balance(), 10);
    let early = customer_view(&state, day(10), &rules);
    assert_eq!(early["loyalty"]["points_balance"], 10);
}

#[test]
fn money_in_another_currency_stays_out_of_the_loyalty_currency_figures() {
    let rules = rules();
    let mut state = CustomerState::new("c1");
    let dollars = in_dollars(purchase("e2", "o2", day(1), 10_000));
    run(
        &mut state,
        &rules,
        &[
            purchase("e1", "o1", day(0), 10_000),
            dollars,
            give_back("r2", "o2", day(2), 10_000),
        ],
    );
    let view = customer_view(&state, day(3), &rules);
    assert_eq!(view["purchases"]["count"], 2);
    assert_eq!(
        view["purchases"]["average_order_value"].as_f64(),
        Some(100.0)
    );
    assert_eq!(view["returns"]["count"], 1);
    assert_eq!(view["returns"]["total"].as_f64(), Some(0.0));
    assert_eq!(view["retention"]["monetary"].as_f64(), Some(100.0));
}
