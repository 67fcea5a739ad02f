//! Identity merges end to end, against a real `nats-server` and `crm-node`: a person who
//! bought online under an email (one customer) and in a store with a loyalty card (another)
//! registers the card in the web shop; the two become one customer whose purchases, points
//! and orders are exactly both sides', every identifier and both customer ids answer with
//! it, and later events for either side apply to it. Also: the identity rules' refusals
//! reach the survivor as actor events, and a chain of merges ends with everything in one.

use crm_node::subjects;
use crm_testkit::cluster_env::{minor, request, Outgoing};
use crm_testkit::test_support::{outgoing, send, start_env, EventLog};
use serde_json::{json, Value};

const RULES: &str = "rules-time.toml";

fn purchase(event_id: &str, identity: Value, order_id: &str, at: &str, amount: f64) -> Outgoing {
    outgoing(
        "web",
        json!({"v": 1, "event_id": event_id, "type": "purchase", "occurred_at": at,
               "identity": identity, "order_id": order_id, "amount": amount,
               "currency": "EUR"}),
    )
}

fn identify(event_id: &str, identity: Value, at: &str) -> Outgoing {
    outgoing(
        "web",
        json!({"v": 1, "event_id": event_id, "type": "identify", "occurred_at": at,
               "identity": identity, "profile": {"first_name": "Ann"}}),
    )
}

async fn query(client: &async_nats::Client, body: Value) -> Value {
    let reply = request(client, subjects::QUERY_CUSTOMER, &body).await;
    assert!(reply.get("error").is_none(), "query {body}: {reply}");
    reply
}

/// Spendable plus pending points of a view.
fn points(view: &Value) -> i64 {
    view["loyalty"]["points_balance"].as_i64().unwrap_or(0)
        + view["loyalty"]["points_pending"].as_i64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_customer_and_a_store_customer_linked_by_one_event_become_one() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    let email = json!({"email": "ann@example.com"});
    let card = json!({"loyalty_card": "LC-1"});
    send(
        &client,
        vec![
            purchase("w-1", email.clone(), "o-web", "2026-03-01T10:00:00Z", 120.0),
            purchase("s-1", card.clone(), "o-store", "2026-03-02T10:00:00Z", 80.0),
            // The same order seen by both channels counts once after the merge.
            purchase("w-2", email.clone(), "o-both", "2026-03-03T10:00:00Z", 30.0),
            purchase("s-2", card.clone(), "o-both", "2026-03-03T10:00:00Z", 30.0),
        ],
    )
    .await;
    let web = query(&client, json!({"identity": email})).await;
    let store = query(&client, json!({"identity": card})).await;
    let (web_id, store_id) = (
        web["customer_id"].as_str().unwrap().to_string(),
        store["customer_id"].as_str().unwrap().to_string(),
    );
    assert_ne!(web_id, store_id, "two customers before the link");
    let points_before = points(&web) + points(&store);
    assert!(points_before > 0);

    send(
        &client,
        vec![identify(
            "link-1",
            json!({"email": "ann@example.com", "loyalty_card": "LC-1"}),
            "2026-03-04T10:00:00Z",
        )],
    )
    .await;
    // The loyalty card has the higher priority: the store customer survives.
    let merged_events = events.wait_for(&store_id, "customer.merged", 1).await;
    assert_eq!(merged_events[0]["merged_customer_id"], json!(web_id));

    for body in [
        json!({"identity": {"email": "ann@example.com"}}),
        json!({"identity": {"loyalty_card": "LC-1"}}),
        json!({"customer_id": web_id}),
        json!({"customer_id": store_id}),
    ] {
        let view = query(&client, body.clone()).await;
        assert_eq!(view["customer_id"], json!(store_id), "{body}: {view}");
        assert_eq!(view["purchases"]["count"], json!(3), "{body}: {view}");
        assert_eq!(minor(&view["purchases"]["total_spend"]), 23_000, "{body}");
        assert_eq!(
            points(&view),
            points_before,
            "no point created or lost: {view}"
        );
        assert_eq!(
            view["merged_from"][0]["customer_id"],
            json!(web_id),
            "{view}"
        );
    }
    let by_old_id = query(&client, json!({"customer_id": web_id})).await;
    assert_eq!(by_old_id["merged_into"], json!(store_id), "{by_old_id}");
    assert_eq!(
        by_old_id["requested_customer_id"],
        json!(web_id),
        "{by_old_id}"
    );

    // Later events for either side apply to the survivor; a repeated link merges nothing.
    send(
        &client,
        vec![
            purchase(
                "w-3",
                email.clone(),
                "o-later",
                "2026-03-05T10:00:00Z",
                10.0,
            ),
            identify(
                "link-2",
                json!({"email": "ann@example.com", "loyalty_card": "LC-1"}),
                "2026-03-06T10:00:00Z",
            ),
        ],
    )
    .await;
    let view = query(&client, json!({"identity": card})).await;
    assert_eq!(view["purchases"]["count"], json!(4), "{view}");
    assert_eq!(events.of(&store_id, "customer.merged").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_merges_leave_everything_with_the_last_survivor() {
    let env = start_env(RULES);
    let client = env.client().await;
    send(
        &client,
        vec![
            purchase(
                "a-1",
                json!({"phone": "+49 151 1111111"}),
                "o-a",
                "2026-04-01T10:00:00Z",
                10.0,
            ),
            purchase(
                "b-1",
                json!({"email": "bea@example.com"}),
                "o-b",
                "2026-04-01T11:00:00Z",
                20.0,
            ),
            purchase(
                "c-1",
                json!({"loyalty_card": "LC-9"}),
                "o-c",
                "2026-04-01T12:00:00Z",
                40.0,
            ),
            // A into B (email beats phone), then B into C (card beats email).
            identify(
                "ab",
                json!({"email": "bea@example.com", "phone": "+49 151 1111111"}),
                "2026-04-02T10:00:00Z",
            ),
            identify(
                "bc",
                json!({"email": "bea@example.com", "loyalty_card": "LC-9"}),
                "2026-04-03T10:00:00Z",
            ),
        ],
    )
    .await;
    let by_phone = query(&client, json!({"identity": {"phone": "+49 151 1111111"}})).await;
    let by_card = query(&client, json!({"identity": {"loyalty_card": "LC-9"}})).await;
    assert_eq!(by_phone["customer_id"], by_card["customer_id"]);
    assert_eq!(by_card["purchases"]["count"], json!(3), "{by_card}");
    assert_eq!(minor(&by_card["purchases"]["total_spend"]), 7_000);
    let merged_from: Vec<&str> = by_card["merged_from"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["customer_id"].as_str())
        .collect();
    assert_eq!(merged_from.len(), 2, "{by_card}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_shared_by_two_customers_is_a_conflict_with_its_reason_not_a_merge() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    send(
        &client,
        vec![
            purchase(
                "d-1",
                json!({"device_id": "kiosk-1"}),
                "o-d",
                "2026-05-01T10:00:00Z",
                10.0,
            ),
            purchase(
                "e-1",
                json!({"email": "eve@example.com"}),
                "o-e",
                "2026-05-01T11:00:00Z",
                10.0,
            ),
            identify(
                "de",
                json!({"email": "eve@example.com", "device_id": "kiosk-1"}),
                "2026-05-02T10:00:00Z",
            ),
        ],
    )
    .await;
    let eve = query(&client, json!({"identity": {"email": "eve@example.com"}})).await;
    let kiosk = query(&client, json!({"identity": {"device_id": "kiosk-1"}})).await;
    assert_ne!(eve["customer_id"], kiosk["customer_id"]);
    let eve_id = eve["customer_id"].as_str().unwrap();
    let conflict = events.wait_for(eve_id, "identity.conflict", 1).await;
    assert_eq!(
        conflict[0]["reason"],
        json!("merge_disabled"),
        "{conflict:?}"
    );
    assert_eq!(conflict[0]["other_customer_id"], kiosk["customer_id"]);
    assert!(events.of(eve_id, "customer.merged").is_empty());
}

/// Many people who were two customers (a web one and a store one) are linked while the
/// cluster loses a node to SIGKILL and gains one: every person ends as one customer, with
/// exact purchases, spend and points, whichever of their identifiers asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_merge_many_split_people_through_a_sigkill_and_a_join_and_stay_exact() {
    use crm_testkit::cluster_env::{
        assert_buyers_exact, expected_points, outgoing_events, publish_paced, purchase_arrivals,
        traffic_spec, view, NodeOptions,
    };
    use crm_testkit::multi_node::{
        assert_single_writer, audit_records, owned_by, settled, wait_cluster_settled, wait_status,
        ClusterEnv,
    };
    use std::time::Duration;
    const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

    let options = NodeOptions {
        shards: 12,
        limits: "batch_max_events = 64".to_string(),
        cluster: "snapshot_every_records = 150".to_string(),
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(3, options));
    let client = env.client().await;
    wait_status(&client, "three nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s)
            && ["node-1", "node-2", "node-3"]
                .iter()
                .all(|n| owned_by(s, n).len() == 4)
    })
    .await;

    let mut generator =
        crm_node::loadgen::Generator::new(traffic_spec("2026-01-05T00:00:00Z", 300, 30, 43))
            .with_split_identities(40);
    let events = outgoing_events(&mut generator);
    let truth = generator.into_truth();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            publish_paced(&client, events, 300, Duration::from_secs(120)).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::block_in_place(|| env.node("node-2").kill());
    wait_status(
        &client,
        "node-2's shards served elsewhere",
        MOVE_TIMEOUT,
        |s| settled(s) && owned_by(s, "node-2").is_empty(),
    )
    .await;
    let joined = tokio::task::block_in_place(|| env.add_node());
    wait_status(&client, "the new node serves shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, &joined).len() >= 3
    })
    .await;
    publisher.await.expect("publisher");
    wait_cluster_settled(&client, Duration::from_secs(120)).await;

    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked > 80, "only {checked} buyers checked");
    // Every identifier of a person answers with the same customer.
    let mut people_with_merges = 0;
    for (index, person) in truth.people.iter().enumerate() {
        let mut customers = std::collections::BTreeSet::new();
        let mut merged = false;
        for identity in &person.identities {
            let reply = view(&client, json!({ identity.kind.as_str(): identity.value })).await;
            assert!(reply.get("error").is_none(), "person {index}: {reply}");
            merged |= reply["merged_from"]
                .as_array()
                .is_some_and(|from| !from.is_empty());
            customers.insert(reply["customer_id"].as_str().unwrap_or("").to_string());
        }
        assert!(customers.len() <= 1, "person {index} is {customers:?}");
        people_with_merges += usize::from(merged);
    }
    assert!(
        people_with_merges >= 20,
        "only {people_with_merges} people merged"
    );
    assert_single_writer(&audit_records(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_beyond_merges_max_per_day_is_refused_with_an_event() {
    let env = start_env("rules-merges.toml");
    let client = env.client().await;
    let events = EventLog::start(&client).await;
    send(
        &client,
        vec![
            purchase(
                "s-1",
                json!({"loyalty_card": "STORE-1"}),
                "o-s",
                "2026-06-01T09:00:00Z",
                10.0,
            ),
            purchase(
                "a-1",
                json!({"email": "a@example.com"}),
                "o-a",
                "2026-06-01T09:10:00Z",
                10.0,
            ),
            purchase(
                "b-1",
                json!({"email": "b@example.com"}),
                "o-b",
                "2026-06-01T09:20:00Z",
                10.0,
            ),
            identify(
                "l-a",
                json!({"loyalty_card": "STORE-1", "email": "a@example.com"}),
                "2026-06-01T10:00:00Z",
            ),
            identify(
                "l-b",
                json!({"loyalty_card": "STORE-1", "email": "b@example.com"}),
                "2026-06-01T11:00:00Z",
            ),
        ],
    )
    .await;
    let store = query(&client, json!({"identity": {"loyalty_card": "STORE-1"}})).await;
    let b = query(&client, json!({"identity": {"email": "b@example.com"}})).await;
    let store_id = store["customer_id"].as_str().unwrap();
    assert_eq!(store["purchases"]["count"], json!(2), "one merge: {store}");
    assert_ne!(
        b["customer_id"], store["customer_id"],
        "the second merge was refused"
    );
    let refused = events.wait_for(store_id, "identity.merge_refused", 1).await;
    assert_eq!(
        refused[0]["other_customer_id"], b["customer_id"],
        "{refused:?}"
    );
    assert_eq!(refused[0]["limit"], json!(1), "{refused:?}");
}
