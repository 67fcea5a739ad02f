//! Time-driven rules through NATS, against a real `nats-server` and a real `crm-node`
//! process with `tests/fixtures/rules-time.toml` (1 point per EUR, pending 7 days, expiry 30
//! days, tiers member 0 / silver 100 / gold 300 reviewed yearly, lapse after 2 x the mean
//! gap, win-back 2 days after lapsing).
//!
//! Time only moves by event times and by `crm.cmd.tick` (the nodes' own ticker is off in
//! tests), so every expected instant below is computed from the fixture by hand. Actor
//! events are observed on a core NATS subscription to `crm.events.>` opened before acting,
//! and, where a count matters, read back from the `CRM_EVENTS` stream.

use crm_node::subjects;
use crm_testkit::cluster_env::{minor, request, wait_drained, Outgoing};
use crm_testkit::node_process::run_cli;
use crm_testkit::test_support::{
    self, outgoing, replay_events, send, start_env, EventLog, DRAIN_TIMEOUT, SHARDS,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

const RULES: &str = "rules-time.toml";

fn purchase(event_id: &str, email: &str, order_id: &str, at: &str, amount: &str) -> Outgoing {
    outgoing(
        "web",
        json!({"v": 1, "event_id": event_id, "type": "purchase", "occurred_at": at,
               "identity": {"email": email}, "order_id": order_id,
               "amount": amount.parse::<f64>().unwrap(), "currency": "EUR"}),
    )
}

fn give_back(event_id: &str, email: &str, order_id: &str, at: &str, amount: &str) -> Outgoing {
    outgoing(
        "store",
        json!({"v": 1, "event_id": event_id, "type": "return", "occurred_at": at,
               "identity": {"email": email}, "order_id": order_id,
               "amount": amount.parse::<f64>().unwrap()}),
    )
}

/// `crm.cmd.tick` at `at`, checks the documented reply, then waits until it is applied.
async fn tick(client: &async_nats::Client, at: &str) {
    let reply = request(client, subjects::CMD_TICK, &json!({ "at": at })).await;
    assert_eq!(reply["v"], 1, "tick reply: {reply}");
    assert_eq!(reply["at"], at, "tick reply: {reply}");
    assert_eq!(reply["shards"], SHARDS, "tick reply: {reply}");
    wait_drained(client, SHARDS, DRAIN_TIMEOUT).await;
}

/// The view of `email`, asserting it exists.
async fn view_of(client: &async_nats::Client, email: &str) -> Value {
    let view = test_support::view_of(client, json!({ "email": email })).await;
    assert_eq!(view["v"], 1);
    view
}

/// Every actor event in `CRM_EVENTS` whose subject matches `filter`, from the start.
async fn stored_events(client: &async_nats::Client, filter: &str) -> Vec<Value> {
    replay_events(client, filter)
        .await
        .into_iter()
        .map(|(_, event)| event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_expire_at_a_tick_past_their_expiry_and_points_expired_is_published() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = "expiry@example.com";
    send(
        &client,
        vec![purchase(
            "e-1",
            email,
            "o-1",
            "2025-01-01T10:00:00Z",
            "80.00",
        )],
    )
    .await;
    // Release (7 days) through the CLI tick: the lot appears with its expiry, 30 days
    // after the purchase (not after the release).
    let url = env.nats.url();
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        run_cli(&["--nats-url", &url, "tick", "--at", "2025-01-10T00:00:00Z"])
    });
    assert!(ok, "crm-node tick failed: {stdout} {stderr}");
    let reply: Value = serde_json::from_str(stdout.trim()).expect("tick prints JSON");
    assert_eq!(reply["v"], 1);
    assert_eq!(reply["at"], "2025-01-10T00:00:00Z");
    assert_eq!(reply["shards"], SHARDS);
    wait_drained(&client, SHARDS, DRAIN_TIMEOUT).await;

    let before = view_of(&client, email).await;
    let customer_id = before["customer_id"].as_str().unwrap().to_string();
    assert_eq!(before["loyalty"]["points_balance"], 80);
    assert_eq!(
        before["loyalty"]["lots"],
        json!([{"points": 80, "earned_at": "2025-01-01T10:00:00Z",
                "expires_at": "2025-01-31T10:00:00Z", "source": "o-1"}])
    );
    assert_eq!(
        before["loyalty"]["expiring_next"],
        json!({"points": 80, "at": "2025-01-31T10:00:00Z"})
    );

    // Just before the expiry nothing expires.
    tick(&client, "2025-01-31T09:59:59Z").await;
    let still = view_of(&client, email).await;
    assert_eq!(still["loyalty"]["points_balance"], 80);
    assert_eq!(still["loyalty"]["expired_total"], 0);

    tick(&client, "2025-02-01T00:00:00Z").await;
    let after = view_of(&client, email).await;
    assert_eq!(after["loyalty"]["points_balance"], 0);
    assert_eq!(after["loyalty"]["expired_total"], 80);
    assert_eq!(after["loyalty"]["lots"], json!([]));

    let expired = events.wait_for(&customer_id, "points.expired", 1).await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    let expired = &expired[0];
    assert_eq!(expired["v"], 1);
    assert_eq!(expired["points"], 80);
    assert_eq!(expired["lots"], 1);
    assert_eq!(expired["sources"], json!(["o-1"]));
    assert_eq!(expired["points_balance"], 0);
    // It fires at the lot's expiry, caused by the tick that reached it.
    assert_eq!(expired["at"], "2025-01-31T10:00:00Z");
    let tick_ms = crm_actors::time::parse_rfc3339_ms("2025-02-01T00:00:00Z").unwrap();
    assert!(
        expired["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tick-{tick_ms}-{customer_id}:points.expired:")),
        "{expired}"
    );
    events.assert_subjects();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_points_are_released_by_a_tick_after_pending_days() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = "pending@example.com";
    send(
        &client,
        vec![purchase(
            "p-1",
            email,
            "o-1",
            "2025-03-01T12:00:00Z",
            "45.50",
        )],
    )
    .await;
    let view = view_of(&client, email).await;
    let customer_id = view["customer_id"].as_str().unwrap().to_string();
    assert_eq!(view["loyalty"]["points_pending"], 45);
    assert_eq!(view["loyalty"]["points_balance"], 0);
    assert_eq!(
        view["loyalty"]["pending"],
        json!([{"points": 45, "earned_at": "2025-03-01T12:00:00Z",
                "available_at": "2025-03-08T12:00:00Z", "source": "o-1"}])
    );
    let earned = events.wait_for(&customer_id, "points.earned", 1).await;
    assert_eq!(earned[0]["pending"], true);
    assert_eq!(earned[0]["available_at"], "2025-03-08T12:00:00Z");
    assert_eq!(earned[0]["points_pending"], 45);

    // A tick before pending_days have passed releases nothing.
    tick(&client, "2025-03-08T11:59:59Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["loyalty"]["points_pending"], 45);
    assert_eq!(view["loyalty"]["points_balance"], 0);

    tick(&client, "2025-03-09T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["loyalty"]["points_pending"], 0);
    assert_eq!(view["loyalty"]["points_balance"], 45);
    assert_eq!(view["loyalty"]["pending"], json!([]));
    assert_eq!(
        view["loyalty"]["lots"][0]["expires_at"],
        "2025-03-31T12:00:00Z"
    );

    let released = events.wait_for(&customer_id, "points.released", 1).await;
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0]["points"], 45);
    assert_eq!(released[0]["source"], "o-1");
    assert_eq!(released[0]["at"], "2025-03-08T12:00:00Z");
    assert_eq!(released[0]["expires_at"], "2025-03-31T12:00:00Z");
    assert_eq!(released[0]["points_balance"], 45);
    assert_eq!(released[0]["points_pending"], 0);
    events.assert_subjects();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_upgrades_at_once_and_downgrades_only_at_its_anniversary() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = "tiers@example.com";

    // 150 -> silver at once.
    send(
        &client,
        vec![purchase(
            "t-1",
            email,
            "o-1",
            "2025-01-01T00:00:00Z",
            "150.00",
        )],
    )
    .await;
    let view = view_of(&client, email).await;
    let customer_id = view["customer_id"].as_str().unwrap().to_string();
    assert_eq!(view["loyalty"]["tier"], "silver");
    let up = events.wait_for(&customer_id, "tier.changed", 1).await;
    assert_eq!(up[0]["direction"], "up");
    assert_eq!(up[0]["from"], "member");
    assert_eq!(up[0]["to"], "silver");

    // 150 + 200 = 350 -> gold at once; its review is a year later.
    send(
        &client,
        vec![purchase(
            "t-2",
            email,
            "o-2",
            "2025-03-01T00:00:00Z",
            "200.00",
        )],
    )
    .await;
    let view = view_of(&client, email).await;
    assert_eq!(view["loyalty"]["tier"], "gold");
    assert_eq!(view["loyalty"]["tier_review_at"], "2026-03-01T00:00:00Z");
    let ups = events.wait_for(&customer_id, "tier.changed", 2).await;
    assert_eq!(ups[1]["direction"], "up");
    assert_eq!(ups[1]["from"], "silver");
    assert_eq!(ups[1]["to"], "gold");
    assert_eq!(minor(&ups[1]["rolling_spend"]), 35_000);
    assert_eq!(ups[1]["review_at"], "2026-03-01T00:00:00Z");

    // A return brings the rolling spend to 200, below gold: the tier holds.
    send(
        &client,
        vec![give_back(
            "t-3",
            email,
            "o-2",
            "2025-03-10T00:00:00Z",
            "150.00",
        )],
    )
    .await;
    tick(&client, "2025-06-01T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["returns"]["count"], 1);
    assert_eq!(minor(&view["loyalty"]["rolling_spend"]), 20_000);
    assert_eq!(view["loyalty"]["tier"], "gold");
    // A day before the anniversary: still gold although only 50 of spend is left.
    tick(&client, "2026-02-28T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(minor(&view["loyalty"]["rolling_spend"]), 5_000);
    assert_eq!(view["loyalty"]["tier"], "gold");
    assert_eq!(view["loyalty"]["tier_history"].as_array().unwrap().len(), 2);

    // After the anniversary: down to what the rolling spend qualifies for.
    tick(&client, "2026-03-02T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["loyalty"]["tier"], "member");
    assert_eq!(view["loyalty"]["tier_review_at"], Value::Null);
    let history = view["loyalty"]["tier_history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(history[0]["direction"], "down");
    assert_eq!(history[0]["from"], "gold");
    assert_eq!(history[0]["to"], "member");
    assert_eq!(history[0]["at"], "2026-03-01T00:00:00Z");

    let changes = events.wait_for(&customer_id, "tier.changed", 3).await;
    // Events of one customer arrive in order: no downgrade came before the anniversary.
    let directions: Vec<&str> = changes
        .iter()
        .map(|c| c["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, vec!["up", "up", "down"]);
    let down = &changes[2];
    assert_eq!(down["from"], "gold");
    assert_eq!(down["to"], "member");
    assert_eq!(down["at"], "2026-03-01T00:00:00Z");
    assert_eq!(down["review_at"], Value::Null);
    events.assert_subjects();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_buyer_lapses_gets_one_winback_offer_and_reactivates_on_a_new_purchase() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = "lapse@example.com";
    // Every 10 days: lapsed strictly after 2.0 x 10 = 20 days without a purchase.
    send(
        &client,
        vec![
            purchase("l-1", email, "o-1", "2025-01-01T00:00:00Z", "10.00"),
            purchase("l-2", email, "o-2", "2025-01-11T00:00:00Z", "10.00"),
            purchase("l-3", email, "o-3", "2025-01-21T00:00:00Z", "10.00"),
        ],
    )
    .await;
    let view = view_of(&client, email).await;
    let customer_id = view["customer_id"].as_str().unwrap().to_string();
    assert_eq!(view["retention"]["state"], "active");
    assert_eq!(view["retention"]["mean_gap_days"], json!(10.0));
    assert_eq!(
        view["retention"]["lapse_due_at"],
        "2025-02-10T00:00:00.001Z"
    );

    // Exactly 20 days: not yet.
    tick(&client, "2025-02-10T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["retention"]["state"], "active");

    tick(&client, "2025-02-11T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["retention"]["state"], "lapsed");
    let reason = view["retention"]["reason"]
        .as_str()
        .expect("a lapse reason");
    assert!(reason.contains("mean gap of 10 days"), "{reason}");
    assert_eq!(view["retention"]["churn_risk"], 100);
    // The offer comes 2 days after lapsing.
    assert_eq!(view["retention"]["winback_offered"], false);
    let lapsed = events.wait_for(&customer_id, "retention.lapsed", 1).await;
    assert_eq!(lapsed[0]["reason"], reason);
    assert_eq!(lapsed[0]["last_purchase_at"], "2025-01-21T00:00:00Z");
    assert_eq!(lapsed[0]["mean_gap_days"], 10);
    assert_eq!(lapsed[0]["lapse_count"], 1);
    assert_eq!(lapsed[0]["at"], "2025-02-10T00:00:00.001Z");

    for at in [
        "2025-02-13T00:00:00Z",
        "2025-02-20T00:00:00Z",
        "2025-03-15T00:00:00Z",
        "2025-06-01T00:00:00Z",
    ] {
        tick(&client, at).await;
        let view = view_of(&client, email).await;
        assert_eq!(view["retention"]["state"], "lapsed", "at {at}");
        assert_eq!(view["retention"]["winback_offered"], true, "at {at}");
    }

    // A new purchase reactivates.
    send(
        &client,
        vec![purchase(
            "l-4",
            email,
            "o-4",
            "2025-06-10T00:00:00Z",
            "10.00",
        )],
    )
    .await;
    let view = view_of(&client, email).await;
    assert_eq!(view["retention"]["state"], "active");
    assert_eq!(view["retention"]["reason"], Value::Null);
    assert_eq!(view["retention"]["winback_offered"], false);
    assert_eq!(view["retention"]["reactivated_count"], 1);
    let reactivated = events
        .wait_for(&customer_id, "retention.reactivated", 1)
        .await;
    assert_eq!(reactivated[0]["order_id"], "o-4");
    assert_eq!(reactivated[0]["winback_offered"], true);
    assert_eq!(reactivated[0]["reactivated_count"], 1);

    // The reactivation came after every tick's events: one offer in all, live and stored.
    let offers = events.of(&customer_id, "retention.winback_offered");
    assert_eq!(offers.len(), 1, "{:?}", events.types_of(&customer_id));
    assert_eq!(offers[0]["lapse_count"], 1);
    assert_eq!(offers[0]["at"], "2025-02-12T00:00:00.001Z");
    let stored = stored_events(
        &client,
        &format!("crm.events.retention.winback_offered.{customer_id}"),
    )
    .await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(events.of(&customer_id, "retention.lapsed").len(), 1);
    events.assert_subjects();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_event_is_applied_without_running_the_rule_clock_backwards() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = "late@example.com";
    send(
        &client,
        vec![purchase(
            "x-2",
            email,
            "o-2",
            "2025-05-01T00:00:00Z",
            "50.00",
        )],
    )
    .await;
    tick(&client, "2025-05-20T00:00:00Z").await;
    let before = view_of(&client, email).await;
    let customer_id = before["customer_id"].as_str().unwrap().to_string();
    assert_eq!(before["as_of"], "2025-05-20T00:00:00Z");
    assert_eq!(before["retention"]["recency_days"], 19);
    assert_eq!(before["loyalty"]["points_balance"], 50);

    // A purchase that happened a month earlier arrives now.
    send(
        &client,
        vec![purchase(
            "x-1",
            email,
            "o-1",
            "2025-04-01T00:00:00Z",
            "30.00",
        )],
    )
    .await;
    let after = view_of(&client, email).await;
    assert_eq!(after["purchases"]["count"], 2);
    assert_eq!(minor(&after["purchases"]["total_spend"]), 8_000);
    assert_eq!(after["purchases"]["first_at"], "2025-04-01T00:00:00Z");
    assert_eq!(after["purchases"]["last_at"], "2025-05-01T00:00:00Z");
    assert_eq!(after["created_at"], "2025-04-01T00:00:00Z");
    assert_eq!(after["as_of"], "2025-05-20T00:00:00Z");
    assert_eq!(after["retention"]["recency_days"], 19);
    assert_eq!(after["retention"]["mean_gap_days"], json!(30.0));
    // Its points were due for release (7 days) and for expiry (30 days) long ago: both
    // happen in the same command, so the balance is unchanged.
    assert_eq!(after["loyalty"]["points_balance"], 50);
    assert_eq!(after["loyalty"]["points_pending"], 0);
    assert_eq!(after["loyalty"]["expired_total"], 30);
    assert_eq!(after["loyalty"]["earned_total"], 80);
    // The timeline is by event time, newest first.
    let timeline: Vec<&str> = after["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["at"].as_str().unwrap())
        .collect();
    assert_eq!(
        timeline,
        vec!["2025-05-01T00:00:00Z", "2025-04-01T00:00:00Z"]
    );

    let expired = events.wait_for(&customer_id, "points.expired", 1).await;
    assert_eq!(expired[0]["sources"], json!(["o-1"]));
    assert_eq!(expired[0]["points"], 30);
    let earned = events.of(&customer_id, "points.earned");
    let late = earned
        .iter()
        .find(|e| e["order_id"] == "o-1")
        .expect("points.earned for the late order");
    // Emitted at the customer's clock, not in the past.
    assert_eq!(late["at"], "2025-05-20T00:00:00Z");

    // A tick from the past does not move the clock back either.
    tick(&client, "2025-05-05T00:00:00Z").await;
    let view = view_of(&client, email).await;
    assert_eq!(view["as_of"], "2025-05-20T00:00:00Z");
    assert_eq!(view["retention"]["recency_days"], 19);
    assert_eq!(view["loyalty"]["points_balance"], 50);

    // Every event id is unique.
    let stored = stored_events(&client, &subjects::events_of_customer(&customer_id)).await;
    let ids: HashSet<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), stored.len(), "{stored:?}");
    events.assert_subjects();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rebuilt_from_the_shard_logs_reproduces_every_tick_driven_effect() {
    let mut env = start_env(RULES);
    let client = env.client().await;
    let emails = ["replay-a@example.com", "replay-b@example.com"];
    send(
        &client,
        vec![
            purchase("r-1", emails[0], "o-1", "2025-01-01T00:00:00Z", "150.00"),
            purchase("r-2", emails[0], "o-2", "2025-01-11T00:00:00Z", "20.00"),
            purchase("r-3", emails[1], "o-3", "2025-01-05T00:00:00Z", "40.00"),
        ],
    )
    .await;
    for at in [
        "2025-01-20T00:00:00Z",
        "2025-02-20T00:00:00Z",
        "2025-04-01T00:00:00Z",
        "2026-01-02T00:00:00Z",
    ] {
        tick(&client, at).await;
    }
    let mut before = Vec::new();
    for email in emails {
        before.push(view_of(&client, email).await);
    }
    // Everything happened: released, expired, lapsed, downgraded.
    assert_eq!(before[0]["loyalty"]["expired_total"], 170);
    assert_eq!(before[0]["loyalty"]["tier"], "member");
    assert_eq!(
        before[0]["loyalty"]["tier_history"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(before[0]["retention"]["state"], "lapsed");
    assert_eq!(before[1]["retention"]["state"], "lapsed");

    // Lose the node's store entirely: the shard logs (events and ticks) rebuild it.
    env.node.kill();
    std::fs::remove_dir_all(env.dir.path().join("node-1")).expect("remove the node's data");
    tokio::task::block_in_place(|| env.node.restart(Duration::from_secs(60)));
    wait_drained(&client, SHARDS, DRAIN_TIMEOUT).await;
    for (email, want) in emails.iter().zip(&before) {
        let got = view_of(&client, email).await;
        assert_eq!(&got, want, "{email} differs after the rebuild");
    }
    // The replay published its actor events again under the same ids: stored once.
    let stored = stored_events(&client, subjects::EVENTS_ALL).await;
    let ids: HashSet<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), stored.len(), "an actor event is stored twice");
}
