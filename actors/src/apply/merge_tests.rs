//! Unit tests of merges ([`super::merge`]): the merge commands, holding and releasing,
//! repeats, chains, and the state merge field by field.

use super::tests::{
    day, event, find, give_back, item, purchase, purchase_with, redeem, rules, rules_with, tick,
    types, Setup,
};
use super::*;
use crate::actor_event::ActorEvent;
use crate::identity::{Identity, IdentityKind};
use crate::ingest::EventKind;
use crate::shard_message::{IdentityNote, MergeRef, MergeTransfer, NoteReason, Released};
use crate::state::{PointsLot, RetentionStatus};
use crate::time::DAY_MS;
use crate::view::CustomerView;
use std::collections::BTreeMap;

fn merge_ref(merged: &str, survivor: &str, cause: &str, at_ms: i64) -> MergeRef {
    MergeRef {
        merged_id: merged.to_string(),
        survivor_id: survivor.to_string(),
        cause_event_id: cause.to_string(),
        at_ms,
    }
}

/// `command` (an `Event`) as the router writes it now, with notes and merges.
fn resolved(
    command: CustomerCommand,
    notes: Vec<IdentityNote>,
    merges: Vec<MergeRef>,
) -> CustomerCommand {
    match command {
        CustomerCommand::Event { event, .. } => CustomerCommand::ResolvedEvent {
            event,
            notes,
            merges,
        },
        other => panic!("not an event: {other:?}"),
    }
}

/// `command` (an event) carrying `value` of `kind` instead of the default loyalty card.
fn as_identity(command: CustomerCommand, kind: IdentityKind, value: &str) -> CustomerCommand {
    match command {
        CustomerCommand::Event {
            mut event,
            conflict,
        } => {
            event.identities = vec![Identity::normalise(kind, value).unwrap()];
            CustomerCommand::Event { event, conflict }
        }
        other => panic!("not an event: {other:?}"),
    }
}

fn merge_out(merge: &MergeRef) -> CustomerCommand {
    CustomerCommand::MergeOut {
        merge: merge.clone(),
    }
}

fn merge_in(transfer: &MergeTransfer) -> CustomerCommand {
    CustomerCommand::MergeIn {
        merge: transfer.merge.clone(),
        state: Box::new(transfer.state.clone()),
    }
}

fn transfer_of(outcome: ApplyOutcome) -> MergeTransfer {
    *outcome.transfer.expect("a transfer")
}

fn points(state: &CustomerState) -> i64 {
    state.loyalty.balance() + state.loyalty.pending_points()
}

/// Customer `id` after `commands`.
fn customer(id: &str, rules: &Rules, commands: &[CustomerCommand]) -> CustomerState {
    let mut state = CustomerState::new(id);
    for command in commands {
        let outcome = apply(&mut state, command, rules);
        assert!(
            !matches!(outcome.status, ApplyStatus::Rejected(_)),
            "{command:?}: {outcome:?}"
        );
    }
    state
}

/// Merges `merged` into `survivor` through the log's commands: the merged customer's
/// merge-out, then the survivor's merge-in. Returns the merge-in's outcome.
fn merge_by_log(
    survivor: &mut CustomerState,
    merged: &mut CustomerState,
    cause: &str,
    at_ms: i64,
    rules: &Rules,
) -> ApplyOutcome {
    let merge = merge_ref(&merged.customer_id, &survivor.customer_id, cause, at_ms);
    let transfer = transfer_of(apply(merged, &merge_out(&merge), rules));
    apply(survivor, &merge_in(&transfer), rules)
}

fn released(outcome: &ApplyOutcome) -> Vec<(&str, &ApplyStatus)> {
    outcome
        .released
        .iter()
        .map(|Released { event_id, status }| (event_id.as_str(), status))
        .collect()
}

#[test]
fn a_merge_out_sends_the_whole_state_and_leaves_a_tombstone_that_repeats_nothing() {
    let rules = rules();
    let mut b = customer("b", &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    let before = b.clone();
    let merge = merge_ref("b", "a", "link", day(3));
    let outcome = apply(&mut b, &merge_out(&merge), &rules);
    assert_eq!(outcome.status, ApplyStatus::Applied);
    assert!(outcome.events.is_empty());
    let transfer = transfer_of(outcome);
    assert_eq!(transfer.to_customer_id, "a");
    assert_eq!(transfer.merge, merge);
    assert_eq!(transfer.state, before);
    assert_eq!(transfer.message_id(), "m-b-a");

    assert!(b.exists() && b.is_tombstone());
    assert_eq!(b.merge.merged_into.as_deref(), Some("a"));
    assert_eq!(b.merge.merged_at_ms, Some(day(3)));
    assert_eq!(b.created_at_ms, before.created_at_ms);
    assert_eq!(b.clock_ms, before.clock_ms);
    assert_eq!((points(&b), b.orders.len(), b.identities.len()), (0, 0, 0));
    assert_eq!(b.next_due_ms(), None, "a tombstone has no timers");

    let again = apply(&mut b, &merge_out(&merge), &rules);
    assert_eq!(again.status, ApplyStatus::Duplicate);
    assert!(again.transfer.is_none());
    let elsewhere = apply(
        &mut b,
        &merge_out(&merge_ref("b", "z", "other", day(4))),
        &rules,
    );
    assert_eq!(status_reason(&elsewhere), Some(RejectReason::Unapplicable));
}

fn status_reason(outcome: &ApplyOutcome) -> Option<RejectReason> {
    super::tests::status(outcome)
}

#[test]
fn a_customer_that_never_existed_still_sends_an_empty_state_so_the_survivor_stops_waiting() {
    let rules = rules();
    let mut b = CustomerState::new("b");
    let transfer = transfer_of(apply(
        &mut b,
        &merge_out(&merge_ref("b", "a", "link", day(1))),
        &rules,
    ));
    assert!(!transfer.state.is_created());
    assert!(b.exists(), "the tombstone is stored");

    let mut a = customer("a", &rules, &[purchase("e1", "o1", day(0), 10_000)]);
    let link = resolved(
        purchase("link", "o2", day(1), 5_000),
        vec![],
        vec![transfer.merge.clone()],
    );
    apply(&mut a, &link, &rules);
    assert_eq!(a.merge.awaiting.len(), 1);
    let outcome = apply(&mut a, &merge_in(&transfer), &rules);
    assert_eq!(
        find(&outcome.events, "customer.merged").to_json()["points_moved"],
        0
    );
    assert_eq!(released(&outcome), vec![("link", &ApplyStatus::Applied)]);
    assert_eq!(a.purchases.count, 2);
}

#[test]
fn a_survivor_holds_channel_events_until_the_merged_state_arrives_then_applies_them_in_order() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 30_000)]);
    let mut b = customer(
        "b",
        &rules,
        &[
            as_identity(
                purchase("b1", "ob1", day(1), 10_000),
                IdentityKind::Email,
                "b@x.org",
            ),
            as_identity(
                give_back("b2", "ob1", day(2), 2_000),
                IdentityKind::Email,
                "b@x.org",
            ),
        ],
    );
    let merge = merge_ref("b", "a", "link", day(5));
    let link = resolved(
        purchase("link", "oa2", day(5), 1_000),
        vec![],
        vec![merge.clone()],
    );
    let held = apply(&mut a, &link, &rules);
    assert_eq!(held.status, ApplyStatus::Applied);
    assert!(held.events.is_empty(), "held: nothing published yet");
    assert_eq!(a.merge.awaiting.iter().collect::<Vec<_>>(), vec!["b"]);
    // A return of B's order must wait for B's orders: it would be refused before them.
    let later = give_back("later", "ob1", day(6), 1_000);
    assert_eq!(apply(&mut a, &later, &rules).status, ApplyStatus::Applied);
    assert_eq!(apply(&mut a, &link, &rules).status, ApplyStatus::Duplicate);
    assert_eq!(apply(&mut a, &later, &rules).status, ApplyStatus::Duplicate);
    assert_eq!(a.merge.held.len(), 2);
    // Redeems are never held: while a merged state is on its way they are refused
    // `merge_pending` (ask again), and nothing is spent.
    let spent = apply(&mut a, &redeem("r1", "sticker", day(5)), &rules);
    assert_eq!(
        spent.redeem.as_ref().and_then(|r| r.reason.as_deref()),
        Some("merge_pending")
    );
    assert_eq!(a.loyalty.balance(), 300);
    let view = CustomerView::of(&a, day(6), &rules);
    assert_eq!(view.awaiting_merges, vec!["b".to_string()]);
    assert_eq!(view.held_commands, 2);
    assert_eq!(a.purchases.count, 1);

    let b_points = points(&b);
    let transfer = transfer_of(apply(&mut b, &merge_out(&merge), &rules));
    let outcome = apply(&mut a, &merge_in(&transfer), &rules);
    assert_eq!(outcome.status, ApplyStatus::Applied);
    assert_eq!(
        released(&outcome),
        vec![
            ("link", &ApplyStatus::Applied),
            ("later", &ApplyStatus::Applied)
        ]
    );
    let kinds = types(&outcome.events);
    assert_eq!(kinds[0], "customer.merged", "{kinds:?}");
    assert!(kinds.contains(&"points.earned") && kinds.contains(&"points.reversed"));
    let merged = find(&outcome.events, "customer.merged").to_json();
    assert_eq!(merged["merged_customer_id"], "b");
    assert_eq!(merged["identifier_kinds"], serde_json::json!(["email"]));
    assert_eq!(merged["points_moved"], b_points);
    assert_eq!(merged["orders_moved"], 1);
    assert_eq!(merged["cause_event_id"], "link");
    assert_eq!(merged["id"], "merge-b:customer.merged:0");
    assert!(a.merge.awaiting.is_empty() && a.merge.held.is_empty());
    assert_eq!(a.purchases.count, 3);
    assert_eq!(a.orders["ob1"].returned_minor, 3_000);
    let view = CustomerView::of(&a, day(6), &rules);
    assert_eq!(view.merged_from.len(), 1);
    assert_eq!(view.merged_from[0].customer_id, "b");
    assert_eq!(view.merged_from[0].cause_event_id, "link");
    assert!(view.awaiting_merges.is_empty());
    assert_eq!(view.identities["email"], vec!["b@x.org".to_string()]);
}

#[test]
fn a_repeated_merge_in_or_announcement_changes_nothing() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 10_000)]);
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 10_000)]);
    let merge = merge_ref("b", "a", "link", day(2));
    let transfer = transfer_of(apply(&mut b, &merge_out(&merge), &rules));
    let link = resolved(
        purchase("link", "oa2", day(2), 1_000),
        vec![],
        vec![merge.clone()],
    );
    apply(&mut a, &link, &rules);
    apply(&mut a, &merge_in(&transfer), &rules);
    let settled = a.clone();

    let again = apply(&mut a, &merge_in(&transfer), &rules);
    assert_eq!(again.status, ApplyStatus::Duplicate);
    assert!(again.events.is_empty() && again.transfer.is_none());
    assert_eq!(apply(&mut a, &link, &rules).status, ApplyStatus::Duplicate);
    // The same merge announced again by another event (a re-routed one) waits for nothing.
    let rerouted = resolved(
        purchase("link-2", "oa3", day(3), 1_000),
        vec![],
        vec![merge],
    );
    let outcome = apply(&mut a, &rerouted, &rules);
    assert_eq!(
        find(&outcome.events, "points.earned").to_json()["order_id"],
        "oa3"
    );
    assert!(a.merge.awaiting.is_empty());
    assert_eq!(a.merge.merged_from, settled.merge.merged_from);
    assert_eq!(points(&a), points(&settled) + 10);
}

#[test]
fn a_merge_in_before_its_announcement_merges_at_once_and_the_announcement_waits_for_nothing() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 10_000)]);
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 20_000)]);
    let merge = merge_ref("b", "a", "link", day(2));
    let outcome = merge_by_log(&mut a, &mut b, "link", day(2), &rules);
    assert_eq!(types(&outcome.events)[0], "customer.merged");
    assert!(outcome.released.is_empty());
    assert_eq!(points(&a), 300);

    let link = resolved(purchase("link", "oa2", day(2), 1_000), vec![], vec![merge]);
    let applied = apply(&mut a, &link, &rules);
    assert_eq!(applied.status, ApplyStatus::Applied);
    assert!(!applied.events.is_empty(), "applied at once, not held");
    assert!(a.merge.awaiting.is_empty() && a.merge.held.is_empty());
    assert_eq!(a.purchases.count, 3);
}

#[test]
fn a_tombstone_forwards_a_merge_in_refuses_events_and_denies_redeems() {
    let rules = rules();
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(0), 10_000)]);
    let mut x = customer("x", &rules, &[purchase("x1", "ox1", day(0), 5_000)]);
    apply(
        &mut b,
        &merge_out(&merge_ref("b", "c", "link-bc", day(2))),
        &rules,
    );
    // X was merged into B by an earlier decision whose transfer arrives late.
    let x_into_b = transfer_of(apply(
        &mut x,
        &merge_out(&merge_ref("x", "b", "link-xb", day(1))),
        &rules,
    ));
    let tombstone = b.clone();
    let forwarded = apply(&mut b, &merge_in(&x_into_b), &rules);
    assert_eq!(forwarded.status, ApplyStatus::Applied);
    let onward = transfer_of(forwarded);
    assert_eq!(onward.to_customer_id, "c");
    assert_eq!(onward.merge, x_into_b.merge);
    assert_eq!(onward.state, x_into_b.state);
    assert_eq!(onward.message_id(), "m-x-c");
    assert_eq!(b, tombstone, "forwarding changes nothing");

    let refused = apply(&mut b, &purchase("late", "o9", day(3), 1_000), &rules);
    assert_eq!(status_reason(&refused), Some(RejectReason::Unapplicable));
    let denied = apply(&mut b, &redeem("r1", "sticker", day(3)), &rules);
    let denied = denied.redeem.expect("a redeem answer");
    assert!(!denied.approved);
    assert_eq!(denied.reason.as_deref(), Some("merged_into:c"));
    assert!(apply(&mut b, &tick(day(900)), &rules).events.is_empty());
    assert_eq!(b, tombstone);

    let mut c = customer("c", &rules, &[purchase("c1", "oc1", day(0), 1_000)]);
    apply(&mut c, &merge_in(&onward), &rules);
    assert_eq!(c.merge.merged_from[0].customer_id, "x");
    assert_eq!(points(&c), 10 + 50);
}

#[test]
fn a_full_buffer_stops_the_wait_and_a_late_merge_in_still_merges_by_union() {
    let rules = rules_with(Setup {
        extra_limits: "merge_buffer_max = 2",
        ..Setup::default()
    });
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 10_000)]);
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 20_000)]);
    let merge = merge_ref("b", "a", "link", day(2));
    let link = resolved(
        purchase("link", "oa2", day(2), 1_000),
        vec![],
        vec![merge.clone()],
    );
    apply(&mut a, &link, &rules);
    apply(&mut a, &purchase("e2", "oa3", day(3), 1_000), &rules);
    assert_eq!(a.merge.held.len(), 2);
    let overflow = apply(&mut a, &purchase("e3", "oa4", day(4), 1_000), &rules);
    assert_eq!(overflow.status, ApplyStatus::Applied);
    assert_eq!(
        released(&overflow),
        vec![
            ("link", &ApplyStatus::Applied),
            ("e2", &ApplyStatus::Applied)
        ]
    );
    assert_eq!(
        types(&overflow.events)
            .iter()
            .filter(|t| **t == "points.earned")
            .count(),
        3
    );
    assert!(a.merge.awaiting.is_empty() && a.merge.held.is_empty());
    assert_eq!(a.purchases.count, 4);

    let before = points(&a) + points(&b);
    let transfer = transfer_of(apply(&mut b, &merge_out(&merge), &rules));
    let late = apply(&mut a, &merge_in(&transfer), &rules);
    assert_eq!(types(&late.events)[0], "customer.merged");
    assert_eq!(points(&a), before);
    assert_eq!(a.purchases.count, 5);
}

#[test]
fn a_chain_a_into_b_then_b_into_c_leaves_everything_with_c() {
    let rules = rules();
    let mut a = customer(
        "a",
        &rules,
        &[as_identity(
            purchase("a1", "oa1", day(0), 10_000),
            IdentityKind::Email,
            "a@x.org",
        )],
    );
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 20_000)]);
    let mut c = customer(
        "c",
        &rules,
        &[as_identity(
            purchase("c1", "oc1", day(2), 40_000),
            IdentityKind::Phone,
            "+441234567890",
        )],
    );
    let total = points(&a) + points(&b) + points(&c);
    // Event "ab" links A to B; then event "bc" links B to C before A's state reached B.
    let ab = merge_ref("a", "b", "ab", day(3));
    let bc = merge_ref("b", "c", "bc", day(4));
    let a_to_b = transfer_of(apply(&mut a, &merge_out(&ab), &rules));
    apply(
        &mut b,
        &resolved(purchase("ab", "ob2", day(3), 1_000), vec![], vec![ab]),
        &rules,
    );
    assert_eq!(
        apply(&mut b, &merge_out(&bc), &rules).status,
        ApplyStatus::Applied
    );
    assert_eq!(b.merge.held.len(), 2, "the merge-out waits for A's state");
    let repeated = apply(&mut b, &merge_out(&bc), &rules);
    assert_eq!(repeated.status, ApplyStatus::Duplicate);
    assert_eq!(b.merge.held.len(), 2);
    apply(
        &mut c,
        &resolved(purchase("bc", "oc2", day(4), 1_000), vec![], vec![bc]),
        &rules,
    );

    let completed = apply(&mut b, &merge_in(&a_to_b), &rules);
    assert_eq!(released(&completed), vec![("ab", &ApplyStatus::Applied)]);
    assert!(b.is_tombstone());
    let b_to_c = transfer_of(completed);
    assert_eq!(b_to_c.to_customer_id, "c");
    let outcome = apply(&mut c, &merge_in(&b_to_c), &rules);
    assert_eq!(released(&outcome), vec![("bc", &ApplyStatus::Applied)]);

    let view = CustomerView::of(&c, day(5), &rules);
    let from: Vec<&str> = view
        .merged_from
        .iter()
        .map(|m| m.customer_id.as_str())
        .collect();
    assert_eq!(from, vec!["a", "b"]);
    assert_eq!(view.purchases.count, 5);
    assert_eq!(
        view.loyalty.points_balance + view.loyalty.points_pending,
        total + 20
    );
    assert_eq!(view.identities.len(), 3, "{:?}", view.identities);
    assert_eq!(c.orders.len(), 5);
    // Every event of the three is a duplicate at C now.
    for command in [
        purchase("a1", "new-1", day(6), 1),
        purchase("b1", "new-2", day(6), 1),
    ] {
        assert_eq!(
            apply(&mut c, &command, &rules).status,
            ApplyStatus::Duplicate
        );
    }
    let b_view = CustomerView::of(&b, day(5), &rules);
    assert_eq!(b_view.merged_into.as_deref(), Some("c"));
    assert!(b_view.exists && b_view.purchases.count == 0);
}

#[test]
fn the_routers_notes_are_published_when_the_event_applies() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 10_000)]);
    let note = |kind, other: Option<&str>, reason| IdentityNote {
        kind,
        other_customer_id: other.map(str::to_string),
        reason,
    };
    let notes = vec![
        note(IdentityKind::DeviceId, Some("d"), NoteReason::MergeDisabled),
        note(
            IdentityKind::Email,
            None,
            NoteReason::MaxPerCustomer {
                kind: IdentityKind::Email,
                limit: 5,
            },
        ),
        note(
            IdentityKind::Phone,
            Some("p"),
            NoteReason::MergesPerDay { limit: 10 },
        ),
    ];
    let command = resolved(purchase("e2", "oa2", day(1), 1_000), notes, vec![]);
    let events = apply(&mut a, &command, &rules).events;
    let conflicts: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.event_type() == "identity.conflict")
        .map(ActorEvent::to_json)
        .collect();
    assert_eq!(conflicts.len(), 2);
    assert_eq!(conflicts[0]["reason"], "merge_disabled");
    assert_eq!(conflicts[0]["other_customer_id"], "d");
    assert!(conflicts[0].get("limit").is_none());
    assert_eq!(conflicts[1]["reason"], "max_per_customer");
    assert_eq!(conflicts[1]["limit"], 5);
    assert_eq!(conflicts[1]["limit_kind"], "email");
    assert!(conflicts[1].get("other_customer_id").is_none());
    let refused = find(&events, "identity.merge_refused").to_json();
    assert_eq!(refused["kind"], "phone");
    assert_eq!(refused["other_customer_id"], "p");
    assert_eq!(refused["limit"], 10);
    assert_eq!(refused["event_id"], "e2");

    let mut legacy = purchase("e3", "oa3", day(2), 1_000);
    if let CustomerCommand::Event { conflict, .. } = &mut legacy {
        *conflict = Some(crate::shard_message::IdentityConflict {
            kind: IdentityKind::Email,
            other_customer_id: "c9".to_string(),
        });
    }
    let events = apply(&mut a, &legacy, &rules).events;
    let old = find(&events, "identity.conflict").to_json();
    assert_eq!(old["reason"], "conflict");
    assert_eq!(old["other_customer_id"], "c9");
    let back: ActorEvent = serde_json::from_value(old).unwrap();
    assert_eq!(&back, find(&events, "identity.conflict"));
}

#[test]
fn a_shared_order_counts_once_and_the_survivors_record_is_kept() {
    let rules = rules();
    let shoes = vec![item("shoes", 1, 6_000), item("hats", 1, 4_000)];
    let mut a = customer(
        "a",
        &rules,
        &[purchase_with(
            "a1",
            "shared",
            "web",
            day(0),
            10_000,
            shoes.clone(),
        )],
    );
    let mut b = customer(
        "b",
        &rules,
        &[
            purchase_with("b1", "shared", "app", day(0), 10_000, shoes),
            purchase_with(
                "b2",
                "ob2",
                "store",
                day(1),
                5_000,
                vec![item("socks", 1, 5_000)],
            ),
            give_back("b3", "shared", day(2), 2_000),
        ],
    );
    let before = points(&a) + points(&b);
    let outcome = merge_by_log(&mut a, &mut b, "link", day(3), &rules);
    assert_eq!(
        find(&outcome.events, "customer.merged").to_json()["orders_moved"],
        1
    );
    assert_eq!(
        points(&a),
        before,
        "points are never lost, even of a shared order"
    );
    assert_eq!(a.purchases.count, 2);
    assert_eq!(a.purchases.count_in_currency, 2);
    assert_eq!(a.purchases.total_spend_minor, 15_000);
    assert_eq!(a.orders["shared"].channel, "web", "the survivor's record");
    assert_eq!(a.orders["shared"].returned_minor, 0);
    assert_eq!(a.returns.count, 1);
    assert_eq!(
        a.returns.total_minor, 0,
        "the merged copy's refund left with it"
    );
    assert_eq!(
        a.purchases.by_channel_minor,
        BTreeMap::from([("web".to_string(), 10_000), ("store".to_string(), 5_000)])
    );
    let categories: i64 = a.purchases.by_category_minor.values().sum();
    assert_eq!(categories, 15_000);
    assert_eq!(a.purchases.by_category_minor["socks"], 5_000);
    assert_eq!(a.loyalty.spend_by_day_minor.values().sum::<i64>(), 15_000);
    let value_days: i64 = a.value.days.values().sum();
    assert_eq!(value_days, 15_000);
    assert_eq!(a.retention.purchase_times_ms.len(), 2);
}

#[test]
fn points_keep_their_dates_and_lots_max_folds_without_losing_a_point() {
    let rules = rules_with(Setup {
        extra_limits: "lots_max = 3",
        ..Setup::default()
    });
    let mut a = customer(
        "a",
        &rules,
        &[
            purchase("a1", "oa1", day(0), 10_000),
            purchase("a2", "oa2", day(10), 20_000),
        ],
    );
    let mut b = customer(
        "b",
        &rules,
        &[
            purchase("b1", "ob1", day(5), 40_000),
            purchase("b2", "ob2", day(20), 80_000),
        ],
    );
    merge_by_log(&mut a, &mut b, "link", day(30), &rules);
    assert_eq!(points(&a), 100 + 200 + 400 + 800);
    assert_eq!(a.loyalty.lots.len(), 3);
    let dates: Vec<(i64, i64)> = a
        .loyalty
        .lots
        .iter()
        .map(|l| (l.earned_at_ms, l.points))
        .collect();
    // The two latest-expiring lots folded into the kept one of the earlier expiry.
    assert_eq!(dates, vec![(day(0), 100), (day(5), 400), (day(10), 1_000)]);
    assert_eq!(a.loyalty.lots[2].source, "merged");
    assert_eq!(a.loyalty.earned_total, 1_500);
    let expiry = a.loyalty.lots[0].expires_at_ms;
    assert_eq!(expiry, Some(day(365)));
}

#[test]
fn pending_points_redemptions_and_totals_are_united() {
    let rules = rules_with(Setup {
        pending_days: 14,
        ..Setup::default()
    });
    let mut a = customer(
        "a",
        &rules,
        &[
            purchase("a1", "oa1", day(0), 30_000),
            tick(day(20)),
            redeem("r-a", "coffee", day(21)),
            purchase("a2", "oa2", day(22), 10_000),
        ],
    );
    let mut b = customer(
        "b",
        &rules,
        &[
            purchase("b1", "ob1", day(0), 20_000),
            tick(day(20)),
            redeem("r-b", "sticker", day(21)),
            redeem("r-a", "sticker", day(21)),
            purchase("b2", "ob2", day(23), 10_000),
        ],
    );
    let before = points(&a) + points(&b);
    merge_by_log(&mut a, &mut b, "link", day(24), &rules);
    assert_eq!(points(&a), before);
    assert_eq!(a.loyalty.pending.len(), 2);
    assert_eq!(a.loyalty.pending[0].release_at_ms, day(36));
    assert_eq!(a.loyalty.pending[1].release_at_ms, day(37));
    let requests: Vec<&str> = a
        .loyalty
        .redemptions
        .iter()
        .map(|r| r.outcome.request_id.as_str())
        .collect();
    assert_eq!(
        requests,
        vec!["r-a", "r-b"],
        "united by request id, the survivor's kept"
    );
    assert_eq!(a.loyalty.redeemed_total, 150 + 50 + 50);
    assert_eq!(a.loyalty.earned_total, 300 + 100 + 200 + 100);
    // A repeated request id of either side answers as before.
    let repeat = apply(&mut a, &redeem("r-b", "sticker", day(25)), &rules);
    assert_eq!(repeat.status, ApplyStatus::Duplicate);
    // And the pending points release on their own dates.
    apply(&mut a, &tick(day(36)), &rules);
    assert_eq!(a.loyalty.pending.len(), 1);
}

#[test]
fn a_merge_upgrades_the_tier_on_the_combined_spend_but_never_downgrades() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 30_000)]);
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 30_000)]);
    assert_eq!(a.loyalty.tier.as_deref(), Some("member"));
    let outcome = merge_by_log(&mut a, &mut b, "link", day(2), &rules);
    let changed = find(&outcome.events, "tier.changed").to_json();
    assert_eq!(
        (changed["from"].as_str(), changed["to"].as_str()),
        (Some("member"), Some("silver"))
    );
    assert_eq!(changed["direction"], "up");
    assert_eq!(a.loyalty.tier.as_deref(), Some("silver"));
    assert_eq!(
        a.loyalty.tier_history.back().map(|c| c.to.as_str()),
        Some("silver")
    );

    // A gold customer merged into a member keeps gold with its own review date.
    let mut gold = customer("g", &rules, &[purchase("g1", "og1", day(0), 250_000)]);
    let review = gold.loyalty.tier_review_at_ms;
    let mut member = customer("m", &rules, &[purchase("m1", "om1", day(1), 1_000)]);
    let outcome = merge_by_log(&mut member, &mut gold, "link-2", day(2), &rules);
    assert_eq!(member.loyalty.tier.as_deref(), Some("gold"));
    assert_eq!(member.loyalty.tier_review_at_ms, review);
    assert_eq!(
        find(&outcome.events, "tier.changed").to_json()["to"],
        "gold"
    );

    // A member merged into a gold customer changes nothing of the tier.
    let mut gold = customer("g2", &rules, &[purchase("g1", "og1", day(0), 250_000)]);
    let mut small = customer("s", &rules, &[purchase("s1", "os1", day(1), 1_000)]);
    let outcome = merge_by_log(&mut gold, &mut small, "link-3", day(2), &rules);
    assert_eq!(gold.loyalty.tier.as_deref(), Some("gold"));
    assert!(!types(&outcome.events).contains(&"tier.changed"));
}

#[test]
fn profile_and_consents_take_the_latest_per_field_ties_to_the_survivor() {
    let rules = rules();
    let identify = |id: &str, at: i64, fields: &[(&str, &str)]| {
        event(
            id,
            "web",
            at,
            EventKind::Identify {
                profile: fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
    };
    let consent = |id: &str, at: i64, purpose: &str, granted: bool| {
        event(
            id,
            "web",
            at,
            EventKind::Consent {
                purpose: purpose.to_string(),
                granted,
            },
        )
    };
    let mut a = customer(
        "a",
        &rules,
        &[
            identify("a1", day(1), &[("first_name", "Ann"), ("city", "Oslo")]),
            consent("a2", day(1), "email", true),
            consent("a3", day(5), "sms", true),
        ],
    );
    let mut b = customer(
        "b",
        &rules,
        &[
            identify(
                "b1",
                day(3),
                &[("first_name", "Anna"), ("birthday", "1990-01-01")],
            ),
            identify("b2", day(1), &[("city", "Bergen")]),
            consent("b3", day(2), "email", false),
            consent("b4", day(5), "sms", false),
        ],
    );
    merge_by_log(&mut a, &mut b, "link", day(6), &rules);
    let profile: BTreeMap<&str, &str> = a
        .profile
        .iter()
        .map(|(k, v)| (k.as_str(), v.value.as_str()))
        .collect();
    assert_eq!(
        profile,
        BTreeMap::from([
            ("birthday", "1990-01-01"),
            ("city", "Oslo"),
            ("first_name", "Anna")
        ])
    );
    assert!(!a.consents["email"].granted, "the later decision wins");
    assert!(a.consents["sms"].granted, "a tie keeps the survivor's");
}

#[test]
fn activity_counts_add_up_and_last_values_come_from_the_later_side() {
    let rules = rules();
    let view = |id: &str, at: i64, category: &str| {
        event(
            id,
            "web",
            at,
            EventKind::View {
                sku: None,
                category: Some(category.to_string()),
            },
        )
    };
    let visit = |id: &str, at: i64, store: &str| {
        event(
            id,
            "store",
            at,
            EventKind::Visit {
                store_id: Some(store.to_string()),
            },
        )
    };
    let mut a = customer(
        "a",
        &rules,
        &[
            view("a1", day(1), "shoes"),
            visit("a2", day(4), "s-a"),
            view("a3", day(2), "hats"),
        ],
    );
    let mut b = customer(
        "b",
        &rules,
        &[view("b1", day(3), "socks"), visit("b2", day(2), "s-b")],
    );
    merge_by_log(&mut a, &mut b, "link", day(5), &rules);
    assert_eq!(a.browsing.views, 3);
    assert_eq!(a.browsing.last_viewed_category.as_deref(), Some("socks"));
    assert_eq!(a.visits.count, 2);
    assert_eq!(a.visits.last_store_id.as_deref(), Some("s-a"));
    assert_eq!(a.channels["web"].events, 3);
    assert_eq!(a.channels["web"].first_at_ms, day(1));
    assert_eq!(a.channels["web"].last_at_ms, day(3));
    assert_eq!(a.channels["store"].events, 2);
    assert_eq!(a.created_at_ms, Some(day(1)));
    assert_eq!(a.clock_ms, day(4));
    // The timeline is merged by time, records the merge, and keeps the most recent
    // timeline_max_entries (5).
    let timeline: Vec<&str> = a.timeline.iter().map(|e| e.cause_id.as_str()).collect();
    assert_eq!(timeline, vec!["a3", "b2", "b1", "a2", "link"]);
    let merge_entry = a.timeline.back().expect("the merge entry");
    assert_eq!(merge_entry.entry_type, "merge");
    assert_eq!(
        merge_entry.summary,
        "customer b merged in: 0 orders, 0 points"
    );
}

#[test]
fn identities_unite_within_identities_max() {
    let rules = rules_with(Setup {
        extra_limits: "identities_max = 2",
        ..Setup::default()
    });
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 1_000)]);
    let mut b = customer(
        "b",
        &rules,
        &[
            as_identity(
                purchase("b1", "ob1", day(0), 1_000),
                IdentityKind::Email,
                "b@x.org",
            ),
            as_identity(
                purchase("b2", "ob2", day(0), 1_000),
                IdentityKind::Phone,
                "+441234567890",
            ),
        ],
    );
    let outcome = merge_by_log(&mut a, &mut b, "link", day(1), &rules);
    assert_eq!(a.identities.len(), 2);
    assert!(a
        .identities
        .iter()
        .any(|i| i.kind == IdentityKind::LoyaltyCard));
    assert_eq!(
        find(&outcome.events, "customer.merged").to_json()["identifier_kinds"],
        serde_json::json!(["email", "phone"])
    );
}

#[test]
fn retention_is_recomputed_from_the_combined_purchases() {
    let rules = rules();
    // A lapsed long ago; B bought recently: the customer is active, the mean gap combined.
    let mut a = customer(
        "a",
        &rules,
        &[purchase("a1", "oa1", day(0), 1_000), tick(day(200))],
    );
    assert_eq!(a.retention.status, RetentionStatus::Lapsed);
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(190), 1_000)]);
    merge_by_log(&mut a, &mut b, "link", day(200), &rules);
    assert_eq!(a.retention.status, RetentionStatus::Active);
    assert_eq!(a.retention.mean_gap_ms(), Some(190 * DAY_MS));
    assert_eq!(a.retention.lapse_count, 1);
    // 2.0 x 190 days after the last purchase (and a moment).
    assert_eq!(a.retention.lapse_due_ms, Some(day(190 + 380) + 1));
}

#[test]
fn merge_into_is_a_pure_function_of_its_inputs() {
    let rules = rules();
    let a = customer(
        "a",
        &rules,
        &[purchase("a1", "oa1", day(0), 10_000), tick(day(3))],
    );
    let b = customer(
        "b",
        &rules,
        &[
            purchase("b1", "ob1", day(1), 20_000),
            redeem("r1", "sticker", day(2)),
        ],
    );
    let merge = merge_ref("b", "a", "link", day(3));
    let run_once = || {
        let mut survivor = a.clone();
        let mut emitter = Emitter::new("a", "merge-b");
        merge_into(&mut survivor, b.clone(), &merge, &rules, &mut emitter);
        (crate::codec::encode(&survivor), emitter.into_events())
    };
    assert_eq!(run_once(), run_once());
    let (bytes, _) = run_once();
    let merged: CustomerState = crate::codec::decode_state(&bytes).unwrap();
    assert_eq!(points(&merged), points(&a) + points(&b));
    assert_eq!(merged.dedup.seen.len(), 2, "a1 and b1");
}

#[test]
fn tombstones_are_left_out_of_the_value_fit_and_have_no_timers() {
    let rules = rules();
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(0), 10_000)]);
    apply(
        &mut b,
        &merge_out(&merge_ref("b", "a", "link", day(1))),
        &rules,
    );
    assert!(
        crate::value::live::summary_with_spend(&b, 400, crate::value::TimeUnit::Days).is_none()
    );
    let lots = vec![PointsLot {
        earned_at_ms: 0,
        expires_at_ms: Some(1),
        points: 1,
        source: "x".into(),
    }];
    // Even a (corrupt) tombstone with lots has no timer.
    let mut odd = b.clone();
    odd.loyalty.lots = lots;
    assert_eq!(odd.next_due_ms(), None);
}

#[test]
fn a_shared_order_filed_under_other_categories_on_each_side_still_leaves_spend_consistent() {
    let rules = rules();
    let mut a = customer(
        "a",
        &rules,
        &[purchase_with(
            "a1",
            "shared",
            "web",
            day(0),
            10_000,
            vec![item("shoes", 1, 10_000)],
        )],
    );
    let mut b = customer(
        "b",
        &rules,
        &[
            purchase_with(
                "b1",
                "shared",
                "web",
                day(0),
                10_000,
                vec![item("hats", 1, 10_000)],
            ),
            purchase_with(
                "b2",
                "ob2",
                "web",
                day(1),
                3_000,
                vec![item("hats", 1, 1_000)],
            ),
        ],
    );
    merge_by_log(&mut a, &mut b, "link", day(2), &rules);
    assert_eq!(a.purchases.total_spend_minor, 13_000);
    assert_eq!(a.purchases.by_category_minor.values().sum::<i64>(), 13_000);
    assert_eq!(a.purchases.by_category_minor["shoes"], 10_000);
    assert_eq!(a.purchases.by_channel_minor["web"], 13_000);
}

#[test]
fn a_tombstone_recognises_an_event_it_applied_before_its_merge_out() {
    let rules = rules();
    let mut b = customer("b", &rules, &[purchase("b1", "ob1", day(1), 10_000)]);
    apply(
        &mut b,
        &merge_out(&merge_ref("b", "a", "link", day(2))),
        &rules,
    );
    // The same event again (a redelivery): applied already, a duplicate, not refused.
    let again = resolved(purchase("b1", "ob1", day(1), 10_000), vec![], vec![]);
    let outcome = apply(&mut b, &again, &rules);
    assert_eq!(outcome.status, ApplyStatus::Duplicate);
    // A new event is refused: it belongs to the survivor.
    let new = resolved(purchase("b2", "ob2", day(3), 10_000), vec![], vec![]);
    assert_eq!(
        status_reason(&apply(&mut b, &new, &rules)),
        Some(RejectReason::Unapplicable)
    );
}

#[test]
fn a_redeem_while_a_merged_state_is_on_its_way_is_refused_merge_pending_and_not_remembered() {
    let rules = rules();
    let mut a = customer("a", &rules, &[purchase("a1", "oa1", day(0), 30_000)]);
    let link = resolved(
        purchase("link", "o-link", day(1), 1_000),
        vec![],
        vec![merge_ref("b", "a", "link", day(1))],
    );
    apply(&mut a, &link, &rules);
    let redeem = CustomerCommand::Redeem {
        request_id: "r-1".into(),
        reward_id: "coffee".into(),
        at_ms: day(1) + 1,
    };
    let outcome = apply(&mut a, &redeem, &rules);
    let reply = outcome.redeem.expect("a reply");
    assert!(!reply.approved);
    assert_eq!(reply.reason.as_deref(), Some("merge_pending"));
    assert!(a.loyalty.redemptions.is_empty(), "nothing remembered");
}
