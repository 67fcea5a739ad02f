//! Commands, queries, the actor-event stream and cross-channel identity, through NATS,
//! against a real `nats-server` and a real `crm-node` process with
//! `tests/fixtures/rules-time-commands.toml` (1 point per EUR, spendable at once, lots
//! expire after 10 years; rewards `coffee` 100 points and `voucher-25` 250 points).
//!
//! Purchases are dated in autumn 2026 and lots live 10 years, so a redeem stamped with the
//! wall clock (the CLI sends no `occurred_at`) still sees every point the test granted.

use crm_node::subjects;
use crm_testkit::cluster_env::{minor, request, view, Outgoing};
use crm_testkit::node_process::run_cli;
use crm_testkit::test_support::{outgoing, replay_events, send, start_env, view_of, EventLog};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

const RULES: &str = "rules-time-commands.toml";

fn purchase(
    channel: &str,
    event_id: &str,
    identity: Value,
    order_id: &str,
    at: &str,
    amount: f64,
) -> Outgoing {
    outgoing(
        channel,
        json!({"v": 1, "event_id": event_id, "type": "purchase", "occurred_at": at,
               "identity": identity, "order_id": order_id, "amount": amount, "currency": "EUR"}),
    )
}

async fn redeem(client: &async_nats::Client, body: Value) -> Value {
    request(client, subjects::CMD_REDEEM, &body).await
}

/// A raw request whose body need not be JSON.
async fn raw_request(client: &async_nats::Client, subject: &str, body: &'static [u8]) -> Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_string(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject}"))
    .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
    serde_json::from_slice(&reply.payload).expect("reply is JSON")
}

// ------------------------------------------------------------------------------------
// Redeem
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeem_approves_from_the_oldest_lot_denies_and_repeats_the_first_outcome() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let ann = json!({"email": "ann@example.com"});
    send(
        &client,
        vec![
            purchase(
                "web",
                "w-1",
                ann.clone(),
                "o-1",
                "2026-10-01T10:00:00Z",
                120.0,
            ),
            purchase(
                "web",
                "w-2",
                ann.clone(),
                "o-2",
                "2026-10-15T10:00:00Z",
                80.0,
            ),
        ],
    )
    .await;
    let before = view_of(&client, ann.clone()).await;
    let customer_id = before["customer_id"].as_str().unwrap().to_string();
    assert_eq!(before["loyalty"]["points_balance"], 200);

    // Approved, with the new balance.
    let approved = redeem(
        &client,
        json!({"request_id": "r-1", "reward_id": "coffee", "identity": ann,
               "occurred_at": "2026-10-20T10:00:00Z"}),
    )
    .await;
    assert_eq!(
        approved,
        json!({"request_id": "r-1", "customer_id": customer_id, "reward_id": "coffee",
               "approved": true, "points_spent": 100, "points_balance": 100, "reason": null})
    );
    // The oldest lot went first: o-1 keeps 20 of 120, o-2 is untouched.
    let after = view_of(&client, ann.clone()).await;
    assert_eq!(after["loyalty"]["points_balance"], 100);
    assert_eq!(after["loyalty"]["redeemed_total"], 100);
    let lots: Vec<(i64, &str)> = after["loyalty"]["lots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["points"].as_i64().unwrap(), l["source"].as_str().unwrap()))
        .collect();
    assert_eq!(lots, vec![(20, "o-1"), (80, "o-2")]);

    // The same request id again (even naming the customer by id): the same answer,
    // nothing more spent.
    let again = redeem(
        &client,
        json!({"request_id": "r-1", "reward_id": "coffee", "customer_id": customer_id}),
    )
    .await;
    assert_eq!(again, approved);
    assert_eq!(
        view_of(&client, ann.clone()).await["loyalty"]["points_balance"],
        100
    );

    // Not enough points.
    let denied = redeem(
        &client,
        json!({"request_id": "r-2", "reward_id": "voucher-25", "identity": ann,
               "occurred_at": "2026-10-21T10:00:00Z"}),
    )
    .await;
    assert_eq!(denied["approved"], false);
    assert_eq!(denied["reason"], "insufficient_points");
    assert_eq!(denied["points_spent"], 0);
    assert_eq!(denied["points_balance"], 100);
    assert_eq!(denied["customer_id"], customer_id);
    // A denial is remembered too.
    let denied_again = redeem(
        &client,
        json!({"request_id": "r-2", "reward_id": "voucher-25", "identity": ann}),
    )
    .await;
    assert_eq!(denied_again, denied);

    // A reward not in the catalogue.
    let unknown_reward = redeem(
        &client,
        json!({"request_id": "r-3", "reward_id": "unicorn", "identity": ann,
               "occurred_at": "2026-10-21T10:00:00Z"}),
    )
    .await;
    assert_eq!(unknown_reward["approved"], false);
    assert_eq!(unknown_reward["reason"], "unknown_reward");
    assert_eq!(unknown_reward["points_balance"], 100);

    // An identity never seen: denied, and no customer is created.
    let nobody = json!({"email": "nobody@example.com"});
    let unknown_customer = redeem(
        &client,
        json!({"request_id": "r-4", "reward_id": "coffee", "identity": nobody}),
    )
    .await;
    assert_eq!(unknown_customer["approved"], false);
    assert_eq!(unknown_customer["reason"], "unknown_customer");
    assert_eq!(unknown_customer["points_spent"], 0);
    assert_eq!(unknown_customer["request_id"], "r-4");
    assert_eq!(unknown_customer["reward_id"], "coffee");
    assert_eq!(unknown_customer["customer_id"], Value::Null);
    let missing = view(&client, nobody).await;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    // The same for a customer id nobody has: the command reaches its shard, is denied
    // there, and leaves no customer behind.
    let ghost = "c0123456789abcdef0123456789";
    let unknown_id = redeem(
        &client,
        json!({"request_id": "r-5", "reward_id": "coffee", "customer_id": ghost}),
    )
    .await;
    assert_eq!(unknown_id["approved"], false, "{unknown_id}");
    assert_eq!(unknown_id["reason"], "unknown_customer");
    let missing = request(
        &client,
        subjects::QUERY_CUSTOMER,
        &json!({"customer_id": ghost}),
    )
    .await;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");

    // One points.redeemed for r-1, with the documented fields.
    let redeemed = events.wait_for(&customer_id, "points.redeemed", 1).await;
    let event = &redeemed[0];
    assert_eq!(event["v"], 1);
    assert_eq!(event["id"], "r-1:points.redeemed:0");
    assert_eq!(event["request_id"], "r-1");
    assert_eq!(event["reward_id"], "coffee");
    assert_eq!(event["reward_name"], "Free coffee");
    assert_eq!(event["points"], 100);
    assert_eq!(event["points_balance"], 100);
    assert_eq!(event["at"], "2026-10-20T10:00:00Z");
    let stored = replay_events(&client, "crm.events.points.redeemed.*").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(
        stored[0].0,
        format!("crm.events.points.redeemed.{customer_id}")
    );
    assert_eq!(stored[0].1, *event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redeem_cli_prints_the_json_reply() {
    let env = start_env(RULES);
    let client = env.client().await;
    let bea = json!({"email": "bea@example.com"});
    send(
        &client,
        vec![purchase(
            "web",
            "b-1",
            bea.clone(),
            "o-1",
            "2026-11-01T10:00:00Z",
            130.0,
        )],
    )
    .await;
    let customer_id = view_of(&client, bea.clone()).await["customer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = env.nats.url();
    let cli = |request_id: &'static str, reward: &'static str| {
        let url = url.clone();
        tokio::task::block_in_place(move || {
            run_cli(&[
                "--nats-url",
                &url,
                "redeem",
                "--email",
                "Bea@Example.com",
                "--reward",
                reward,
                "--request-id",
                request_id,
            ])
        })
    };
    let (ok, stdout, stderr) = cli("cli-1", "coffee");
    assert!(ok, "crm-node redeem failed: {stdout} {stderr}");
    let reply: Value = serde_json::from_str(stdout.trim()).expect("redeem prints JSON");
    assert_eq!(
        reply,
        json!({"request_id": "cli-1", "customer_id": customer_id, "reward_id": "coffee",
               "approved": true, "points_spent": 100, "points_balance": 30, "reason": null})
    );
    // Repeated: the same JSON, and the balance stays.
    let (ok, stdout_again, _) = cli("cli-1", "coffee");
    assert!(ok);
    let again: Value = serde_json::from_str(stdout_again.trim()).expect("redeem prints JSON");
    assert_eq!(again, reply);
    // A denial is a reply, not a failure of the command.
    let (ok, stdout, stderr) = cli("cli-2", "coffee");
    assert!(ok, "{stdout} {stderr}");
    let denied: Value = serde_json::from_str(stdout.trim()).expect("redeem prints JSON");
    assert_eq!(denied["approved"], false);
    assert_eq!(denied["reason"], "insufficient_points");
    assert_eq!(view_of(&client, bea).await["loyalty"]["points_balance"], 30);
}

// ------------------------------------------------------------------------------------
// Query errors
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_for_unknown_customers_are_not_found_and_malformed_ones_bad_request() {
    let env = start_env(RULES);
    let client = env.client().await;
    send(
        &client,
        vec![purchase(
            "web",
            "q-1",
            json!({"email": "known@example.com"}),
            "o-1",
            "2026-11-01T10:00:00Z",
            10.0,
        )],
    )
    .await;
    let known = view_of(&client, json!({"email": "known@example.com"})).await;
    assert_eq!(known["purchases"]["count"], 1);

    let unknown = view(&client, json!({"email": "unknown@x.y"})).await;
    assert_eq!(unknown["error"]["code"], "not_found", "{unknown}");
    assert!(unknown["error"]["message"].is_string());
    let unknown_id = request(
        &client,
        subjects::QUERY_CUSTOMER,
        &json!({"customer_id": "c0000000000000000"}),
    )
    .await;
    assert_eq!(unknown_id["error"]["code"], "not_found", "{unknown_id}");

    for (body, what) in [
        (&b"not json at all"[..], "not JSON"),
        (&b"[1, 2, 3]"[..], "not an object"),
        (&b"{}"[..], "no identity or customer_id"),
        (&br#"{"customer_id": 42}"#[..], "customer_id not a string"),
        (&br#"{"identity": {}}"#[..], "empty identity"),
        (&br#"{"identity": {"phone": "12"}}"#[..], "phone not E.164"),
    ] {
        let reply = raw_request(&client, subjects::QUERY_CUSTOMER, body).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{what}: {reply}");
        assert!(
            !reply["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{what}: {reply}"
        );
    }

    let url = env.nats.url();
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        run_cli(&["--nats-url", &url, "query", "--email", "unknown@x.y"])
    });
    assert!(
        !ok,
        "crm-node query succeeded for an unknown customer: {stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("not_found"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        run_cli(&[
            "--nats-url",
            &url,
            "query",
            "--json",
            "--email",
            "unknown@x.y",
        ])
    });
    assert!(!ok);
    let reply: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("query --json prints JSON ({e}): {stdout} {stderr}"));
    assert_eq!(reply["error"]["code"], "not_found");
    // And a known one exits zero.
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        run_cli(&[
            "--nats-url",
            &url,
            "query",
            "--json",
            "--email",
            "known@example.com",
        ])
    });
    assert!(ok, "{stdout} {stderr}");
    let reply: Value = serde_json::from_str(stdout.trim()).expect("query --json prints JSON");
    assert_eq!(reply["customer_id"], known["customer_id"]);
}

/// A shard with a long backlog (one event per shard-log record, flushes 200 ms apart)
/// still answers queries between its batches, instead of only once the backlog is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_working_through_a_backlog_still_answers_queries() {
    let env = crm_testkit::cluster_env::TestEnv::start(crm_testkit::cluster_env::NodeOptions {
        shards: crm_testkit::test_support::SHARDS,
        rules: crm_testkit::cluster_env::fixture(RULES),
        limits: "batch_max_events = 4\nrouter_batch_max_events = 1\nflush_interval_ms = 200"
            .to_string(),
        ..Default::default()
    });
    let client = env.client().await;
    const EVENTS: u64 = 150;
    let events: Vec<Outgoing> = (0..EVENTS)
        .map(|i| {
            purchase(
                "web",
                &format!("busy-{i}"),
                json!({"email": "busy@example.com"}),
                &format!("busy-o-{i}"),
                "2026-11-01T10:00:00Z",
                1.0,
            )
        })
        .collect();
    crm_testkit::cluster_env::publish_all(&client, events, 64, Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answered = loop {
        let reply = view(&client, json!({"email": "busy@example.com"})).await;
        if reply.get("error").is_none() {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no view within 10 s while the shard works through its backlog: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let applied = answered["purchases"]["count"].as_u64().expect("a count");
    assert!(
        applied < EVENTS,
        "answered only once the backlog was done ({applied} of {EVENTS} applied)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_are_bad_request() {
    let env = start_env(RULES);
    let client = env.client().await;
    for (subject, body, what) in [
        (subjects::CMD_REDEEM, &b"nope"[..], "redeem not JSON"),
        (
            subjects::CMD_REDEEM,
            &br#"{"reward_id": "coffee", "identity": {"email": "a@b.co"}}"#[..],
            "redeem without request_id",
        ),
        (
            subjects::CMD_REDEEM,
            &br#"{"request_id": "r", "identity": {"email": "a@b.co"}}"#[..],
            "redeem without reward_id",
        ),
        (
            subjects::CMD_REDEEM,
            &br#"{"request_id": "r", "reward_id": "coffee"}"#[..],
            "redeem naming no customer",
        ),
        (
            subjects::CMD_REDEEM,
            &br#"{"request_id": "r", "reward_id": "coffee", "identity": {"email": "a@b.co"}, "occurred_at": "yesterday"}"#[..],
            "redeem with a bad occurred_at",
        ),
        (
            subjects::CMD_REDEEM,
            &br#"{"request_id": "r", "reward_id": "coffee", "identity": {"email": "a@b.co"}, "occurred_at": "2099-01-01T00:00:00Z"}"#[..],
            "redeem dated 2099",
        ),
        (subjects::CMD_TICK, &b"{}"[..], "tick without at"),
        (subjects::CMD_TICK, &br#"{"at": "soon"}"#[..], "tick with a bad at"),
        (
            subjects::CMD_TICK,
            &br#"{"at": "2207-01-01T00:00:00Z"}"#[..],
            "tick dated 2207",
        ),
        (
            subjects::CMD_TICK,
            &br#"{"at": "1969-07-20T20:17:00Z"}"#[..],
            "tick before 1970",
        ),
    ] {
        let reply = raw_request(&client, subject, body).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{what}: {reply}");
    }
    // Nothing of them reached a shard log: no tick was appended.
    let stats = raw_request(&client, subjects::NODE_STATS, b"{}").await;
    assert_eq!(stats["metrics"]["ticks_appended"], 0, "{stats}");
}

// ------------------------------------------------------------------------------------
// Actor events kept in CRM_EVENTS
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_events_are_replayable_from_crm_events_and_never_stored_twice() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let cy = json!({"email": "cy@example.com"});
    let dee = json!({"loyalty_card": "LC-DEE"});
    let first = vec![
        purchase(
            "web",
            "s-1",
            cy.clone(),
            "o-c1",
            "2026-11-01T09:00:00Z",
            25.5,
        ),
        purchase(
            "store",
            "s-2",
            dee.clone(),
            "o-d1",
            "2026-11-01T11:00:00Z",
            40.0,
        ),
        purchase(
            "web",
            "s-3",
            cy.clone(),
            "o-c2",
            "2026-11-02T09:00:00Z",
            12.0,
        ),
    ];
    assert_eq!(send(&client, first.clone()).await, 0);
    // Re-sent: the same event ids (JetStream drops them), and the same order under a new
    // event id (the customer drops it).
    let duplicates = send(&client, first).await;
    assert_eq!(
        duplicates, 3,
        "JetStream did not report the same-event-id resends"
    );
    send(
        &client,
        vec![purchase(
            "web",
            "s-1-retry",
            cy.clone(),
            "o-c1",
            "2026-11-01T09:00:00Z",
            25.5,
        )],
    )
    .await;
    // A later event of the same customer marks the end of everything before it.
    send(
        &client,
        vec![purchase(
            "web",
            "s-4",
            cy.clone(),
            "o-c3",
            "2026-11-03T09:00:00Z",
            1.0,
        )],
    )
    .await;

    let cy_view = view_of(&client, cy.clone()).await;
    let dee_view = view_of(&client, dee.clone()).await;
    assert_eq!(cy_view["purchases"]["count"], 3);
    assert_eq!(minor(&cy_view["purchases"]["total_spend"]), 3_850);
    assert_eq!(cy_view["loyalty"]["points_balance"], 25 + 12 + 1);
    let cy_id = cy_view["customer_id"].as_str().unwrap().to_string();
    let dee_id = dee_view["customer_id"].as_str().unwrap().to_string();
    events.wait_for(&cy_id, "points.earned", 3).await;
    events.wait_for(&dee_id, "points.earned", 1).await;

    // customer.created, replayed by type.
    let created = replay_events(&client, "crm.events.customer.created.*").await;
    assert_eq!(created.len(), 2, "{created:?}");
    let cy_created = &created
        .iter()
        .find(|(_, e)| e["customer_id"] == cy_id.as_str())
        .expect("customer.created for cy")
        .1;
    assert_eq!(cy_created["v"], 1);
    assert_eq!(cy_created["type"], "customer.created");
    assert_eq!(cy_created["id"], "s-1:customer.created:0");
    assert_eq!(cy_created["at"], "2026-11-01T09:00:00Z");
    assert_eq!(cy_created["channel"], "web");
    assert_eq!(cy_created["event_type"], "purchase");
    assert_eq!(
        cy_created["identities"],
        json!([{"kind": "email", "value": "cy@example.com"}])
    );
    let dee_created = &created
        .iter()
        .find(|(_, e)| e["customer_id"] == dee_id.as_str())
        .expect("customer.created for dee")
        .1;
    assert_eq!(dee_created["channel"], "store");

    // points.earned, replayed by type: one per order, with the documented fields.
    let earned = replay_events(&client, "crm.events.points.earned.*").await;
    let mut orders: Vec<&str> = earned
        .iter()
        .map(|(_, e)| e["order_id"].as_str().unwrap())
        .collect();
    orders.sort();
    assert_eq!(orders, vec!["o-c1", "o-c2", "o-c3", "o-d1"], "{earned:?}");
    let (subject, first_earned) = earned
        .iter()
        .find(|(_, e)| e["order_id"] == "o-c1")
        .unwrap();
    assert_eq!(subject, &format!("crm.events.points.earned.{cy_id}"));
    assert_eq!(first_earned["v"], 1);
    assert_eq!(first_earned["id"], "s-1:points.earned:1");
    assert_eq!(first_earned["type"], "points.earned");
    assert_eq!(first_earned["customer_id"], cy_id.as_str());
    assert_eq!(first_earned["at"], "2026-11-01T09:00:00Z");
    assert_eq!(first_earned["points"], 25);
    assert_eq!(first_earned["source"], "o-c1");
    assert_eq!(first_earned["reason"], "purchase");
    assert_eq!(first_earned["pending"], false);
    assert_eq!(first_earned["channel"], "web");
    assert_eq!(minor(&first_earned["amount"]), 2_550);
    assert_eq!(first_earned["earned_at"], "2026-11-01T09:00:00Z");
    assert!(first_earned["expires_at"].is_string(), "{first_earned}");
    assert_eq!(first_earned["points_balance"], 25);

    // Everything in the stream: ids unique, subjects as documented.
    let all = replay_events(&client, subjects::EVENTS_ALL).await;
    let ids: HashSet<&str> = all.iter().map(|(_, e)| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "an event is stored twice: {all:?}");
    for (subject, event) in &all {
        assert_eq!(
            subject,
            &subjects::event(
                event["type"].as_str().unwrap(),
                event["customer_id"].as_str().unwrap()
            )
        );
    }
    // The live subscription saw the same set.
    assert_eq!(events.of(&cy_id, "points.earned").len(), 3);
}

// ------------------------------------------------------------------------------------
// Identity across channels
// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_email_and_a_store_loyalty_card_linked_by_identify_are_one_customer() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    send(
        &client,
        vec![purchase(
            "web",
            "web-1",
            json!({"email": "eve.lee@example.com"}),
            "o-web",
            "2026-11-01T10:00:00Z",
            59.9,
        )],
    )
    .await;
    send(
        &client,
        vec![outgoing(
            "store",
            json!({"v": 1, "event_id": "pos-1", "type": "identify",
                   "occurred_at": "2026-11-02T09:00:00Z",
                   "identity": {"loyalty_card": "LC-EVE", "email": "Eve.Lee@Example.com"},
                   "profile": {"first_name": "Eve", "city": "Lyon"}}),
        )],
    )
    .await;
    send(
        &client,
        vec![purchase(
            "store",
            "pos-2",
            json!({"loyalty_card": "LC-EVE"}),
            "o-store",
            "2026-11-03T12:00:00Z",
            20.0,
        )],
    )
    .await;

    let by_email = view_of(&client, json!({"email": "eve.lee@example.com"})).await;
    let by_card = view_of(&client, json!({"loyalty_card": "LC-EVE"})).await;
    assert_eq!(by_email["customer_id"], by_card["customer_id"]);
    assert_eq!(by_email, by_card);
    assert_eq!(by_card["purchases"]["count"], 2);
    assert_eq!(minor(&by_card["purchases"]["total_spend"]), 7_990);
    assert_eq!(minor(&by_card["purchases"]["by_channel"]["web"]), 5_990);
    assert_eq!(minor(&by_card["purchases"]["by_channel"]["store"]), 2_000);
    assert_eq!(
        by_card["identities"]["email"],
        json!(["eve.lee@example.com"])
    );
    assert_eq!(by_card["identities"]["loyalty_card"], json!(["LC-EVE"]));
    assert_eq!(by_card["profile"]["first_name"], "Eve");
    let customer_id = by_card["customer_id"].as_str().unwrap();

    let linked = events.wait_for(customer_id, "identity.linked", 1).await;
    assert_eq!(linked[0]["kind"], "loyalty_card");
    assert_eq!(linked[0]["value"], "LC-EVE");
    assert_eq!(linked[0]["event_id"], "pos-1");
    // Created once, by the web purchase.
    let all = replay_events(&client, "crm.events.customer.created.*").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(events.of(customer_id, "identity.conflict").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_of_two_customers_that_may_not_merge_raise_identity_conflict_and_go_to_the_emails_customer(
) {
    // Devices never merge (the rules' default): a kiosk shared by many is not a person.
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = json!({"email": "fay@example.com"});
    let device = json!({"device_id": "kiosk-fay"});
    send(
        &client,
        vec![
            purchase(
                "web",
                "f-1",
                email.clone(),
                "o-f1",
                "2026-11-01T10:00:00Z",
                10.0,
            ),
            purchase(
                "store",
                "f-2",
                device.clone(),
                "o-f2",
                "2026-11-01T11:00:00Z",
                20.0,
            ),
        ],
    )
    .await;
    let email_customer = view_of(&client, email.clone()).await["customer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let device_customer = view_of(&client, device.clone()).await["customer_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(email_customer, device_customer);

    // One event names both: it goes to the email's customer (the higher priority).
    send(
        &client,
        vec![purchase(
            "store",
            "f-3",
            json!({"device_id": "kiosk-fay", "email": "fay@example.com"}),
            "o-f3",
            "2026-11-02T10:00:00Z",
            30.0,
        )],
    )
    .await;
    let conflict = events
        .wait_for(&email_customer, "identity.conflict", 1)
        .await;
    assert_eq!(conflict.len(), 1);
    assert_eq!(conflict[0]["kind"], "device_id");
    assert_eq!(conflict[0]["reason"], "merge_disabled");
    assert_eq!(conflict[0]["other_customer_id"], device_customer.as_str());
    assert_eq!(conflict[0]["event_id"], "f-3");
    assert_eq!(
        conflict[0]["id"].as_str().unwrap().split(':').next(),
        Some("f-3")
    );

    let by_email = view_of(&client, email).await;
    assert_eq!(by_email["customer_id"], email_customer.as_str());
    assert_eq!(by_email["purchases"]["count"], 2);
    assert_eq!(minor(&by_email["purchases"]["total_spend"]), 4_000);
    // The device stays with its own customer, untouched.
    let by_device = view_of(&client, device).await;
    assert_eq!(by_device["customer_id"], device_customer.as_str());
    assert_eq!(by_device["purchases"]["count"], 1);
    assert!(events.of(&device_customer, "identity.conflict").is_empty());
    assert!(events.of(&email_customer, "customer.merged").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_identifier_stays_with_its_own_customer_only() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = json!({"email": "gus@example.com"});
    let device = json!({"device_id": "kiosk-gus"});
    send(
        &client,
        vec![
            purchase(
                "web",
                "g-1",
                email.clone(),
                "o-g1",
                "2026-11-01T10:00:00Z",
                10.0,
            ),
            purchase(
                "store",
                "g-2",
                device.clone(),
                "o-g2",
                "2026-11-01T11:00:00Z",
                20.0,
            ),
        ],
    )
    .await;
    send(
        &client,
        vec![purchase(
            "store",
            "g-3",
            json!({"device_id": "kiosk-gus", "email": "gus@example.com"}),
            "o-g3",
            "2026-11-02T10:00:00Z",
            30.0,
        )],
    )
    .await;
    let by_email = view_of(&client, email).await;
    let email_customer = by_email["customer_id"].as_str().unwrap().to_string();
    events
        .wait_for(&email_customer, "identity.conflict", 1)
        .await;
    // docs/protocol.md: "identifiers not seen before are linked to the customer"; the
    // device was seen (it is the other customer's, and devices never merge), so it is
    // reported, not linked.
    assert!(
        events.of(&email_customer, "identity.linked").is_empty(),
        "{:?}",
        events.of(&email_customer, "identity.linked")
    );
    assert_eq!(
        by_email["identities"],
        json!({"email": ["gus@example.com"]}),
        "the email's customer claims a device that resolves to another customer"
    );
}
