//! The node's side of a merge, through NATS, against a real `nats-server` and a real
//! `crm-node` (`tests/fixtures/rules-time-commands.toml`: 1 point per EUR, spendable at
//! once): a `MergeOut` written straight into the merged customer's shard log (what the
//! router writes when an event links two customers) makes the shard worker append the
//! merged state to the survivor's shard log as a `MergeIn`; a query or a redeem for the
//! merged customer then reaches the survivor, and `crm-node query` says where it went.
//! Events a survivor held while waiting for the state are released when it arrives, and a
//! released event the rules refuse is dead-lettered. A transfer not yet acked when its
//! shard moves travels in the shard's snapshot to the next owner.
//!
//! The router is bypassed on purpose: this file tests the transfer outbox, its publication
//! and the query and command side, not the router's decision (the merge tests of the router
//! cover that).

use async_nats::jetstream::{self, message::PublishMessage};
use crm_actors::codec;
use crm_actors::shard_message::{CustomerCommand, MergeRef, MergeTransfer, ShardMessage};
use crm_actors::state::CustomerState;
use crm_actors::store::{CommitBatch, CustomerWrite, EncodedState, ShardMeta, Store, TransferKey};
use crm_node::sharding::shard_of;
use crm_node::subjects;
use crm_testkit::cluster_env::{minor, request, wait_drained};
use crm_testkit::node_process::run_cli;
use crm_testkit::test_support::{
    outgoing, send, start_env, view_of, wait_for_dead_letters, DRAIN_TIMEOUT, SHARDS,
};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const RULES: &str = "rules-time-commands.toml";
/// Bound on waiting for a transfer to reach the survivor and be merged there.
const MERGE_TIMEOUT: Duration = Duration::from_secs(30);

fn purchase(
    event_id: &str,
    email: &str,
    order_id: &str,
    amount: f64,
) -> crm_testkit::cluster_env::Outgoing {
    outgoing(
        "web",
        json!({"v": 1, "event_id": event_id, "type": "purchase",
               "occurred_at": "2026-10-01T10:00:00Z", "identity": {"email": email},
               "order_id": order_id, "amount": amount, "currency": "EUR"}),
    )
}

fn merge_of(bob: &str, ann: &str) -> MergeRef {
    MergeRef {
        merged_id: bob.to_string(),
        survivor_id: ann.to_string(),
        cause_event_id: "e-link".to_string(),
        at_ms: 1_790_000_000_000,
    }
}

/// Appends a record for `customer_id` to its shard log (as the router would), under
/// `message_id`.
async fn write_record(
    client: &async_nats::Client,
    customer_id: &str,
    command: CustomerCommand,
    message_id: &str,
) {
    let record = ShardMessage::Customer {
        customer_id: customer_id.to_string(),
        command,
        reply_to: None,
    };
    let js = jetstream::new(client.clone());
    js.send_publish(
        subjects::shard(shard_of(customer_id, SHARDS)),
        PublishMessage::build()
            .payload(codec::encode(&record).into())
            .message_id(message_id),
    )
    .await
    .expect("the shard log takes the record")
    .await
    .expect("acked");
}

/// Writes `bob`'s MergeOut into his shard log, as the router would, under `message_id`.
async fn write_merge_out(client: &async_nats::Client, bob: &str, ann: &str, message_id: &str) {
    let merge_out = CustomerCommand::MergeOut {
        merge: merge_of(bob, ann),
    };
    write_record(client, bob, merge_out, message_id).await;
}

async fn query_id(client: &async_nats::Client, customer_id: &str) -> Value {
    request(
        client,
        subjects::QUERY_CUSTOMER,
        &json!({"customer_id": customer_id}),
    )
    .await
}

/// Polls the query for `bob` until it answers with `ann`'s view holding both purchases.
async fn wait_merged(client: &async_nats::Client, bob: &str, ann: &str) -> Value {
    let until = Instant::now() + MERGE_TIMEOUT;
    loop {
        let reply = query_id(client, bob).await;
        if reply["merged_into"] == ann && reply["purchases"]["count"] == 2 {
            return reply;
        }
        assert!(
            Instant::now() < until,
            "{bob} not merged into {ann} within {MERGE_TIMEOUT:?}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_customers_state_reaches_the_survivor_and_queries_and_redeems_follow_it() {
    let env = start_env(RULES);
    let client = env.client().await;
    send(
        &client,
        vec![
            purchase("e-ann", "ann@example.com", "o-ann", 40.0),
            purchase("e-bob", "bob@example.com", "o-bob", 60.0),
        ],
    )
    .await;
    let ann = view_of(&client, json!({"email": "ann@example.com"})).await["customer_id"]
        .as_str()
        .expect("ann's id")
        .to_string();
    let bob = view_of(&client, json!({"email": "bob@example.com"})).await["customer_id"]
        .as_str()
        .expect("bob's id")
        .to_string();
    assert_ne!(ann, bob);

    write_merge_out(&client, &bob, &ann, "mo-1").await;
    let reply = wait_merged(&client, &bob, &ann).await;
    assert_eq!(reply["customer_id"], ann.as_str());
    assert_eq!(reply["requested_customer_id"], bob.as_str());
    assert_eq!(minor(&reply["purchases"]["total_spend"]), 10_000);
    assert_eq!(reply["loyalty"]["points_balance"], 100, "{reply}");
    // The survivor asked for by its own id: its view, nothing added.
    let direct = query_id(&client, &ann).await;
    assert!(direct.get("requested_customer_id").is_none(), "{direct}");
    assert_eq!(direct["purchases"]["count"], 2);

    // A redeem for the merged customer spends the survivor's points.
    let redeemed = request(
        &client,
        subjects::CMD_REDEEM,
        &json!({"customer_id": bob, "request_id": "r-1", "reward_id": "coffee"}),
    )
    .await;
    assert_eq!(redeemed["approved"], true, "{redeemed}");
    assert_eq!(redeemed["customer_id"], ann.as_str());
    assert_eq!(redeemed["requested_customer_id"], bob.as_str());
    assert_eq!(redeemed["merged_into"], ann.as_str());
    assert_eq!(redeemed["points_balance"], 0);

    // The router may write the same MergeOut again (a redelivered chunk): a duplicate at
    // the tombstone, nothing travels twice.
    write_merge_out(&client, &bob, &ann, "mo-2").await;
    wait_drained(&client, SHARDS, DRAIN_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_drained(&client, SHARDS, DRAIN_TIMEOUT).await;
    let after = query_id(&client, &ann).await;
    assert_eq!(after["purchases"]["count"], 2, "{after}");
    assert_eq!(after["loyalty"]["points_balance"], 0, "{after}");

    // The command line says where the customer went, then shows the survivor.
    let url = env.nats.url();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run_cli(&["--nats-url", &url, "query", "--customer-id", &bob])
    });
    assert!(ok, "query failed: {err}");
    assert_eq!(
        out.lines().next(),
        Some(format!("customer {bob} was merged into {ann}").as_str()),
        "{out}"
    );
    assert!(out.contains(&format!("customer   {ann}")), "{out}");
    let (ok, out, _) = tokio::task::block_in_place(|| {
        run_cli(&["--nats-url", &url, "query", "--customer-id", &bob, "--json"])
    });
    assert!(ok);
    let raw: Value = serde_json::from_str(out.trim()).expect("--json prints the reply");
    assert_eq!(raw["merged_into"], ann.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_for_a_merge_are_released_when_the_state_arrives_and_a_refused_one_is_dead_lettered(
) {
    let env = start_env(RULES);
    let client = env.client().await;
    send(
        &client,
        vec![
            purchase("e-ann", "ann@example.com", "o-ann", 40.0),
            purchase("e-bob", "bob@example.com", "o-bob", 60.0),
        ],
    )
    .await;
    let id_of = |view: Value| view["customer_id"].as_str().expect("an id").to_string();
    let ann = id_of(view_of(&client, json!({"email": "ann@example.com"})).await);
    let bob = id_of(view_of(&client, json!({"email": "bob@example.com"})).await);

    // The linking event announces the merge in ann's log (as the router writes it)...
    let link = purchase("e-link", "ann@example.com", "o-link", 10.0);
    let event = crm_actors::ingest::parse_ingest(
        "web",
        &link.payload,
        &crm_actors::ingest::IngestLimits::default(),
    )
    .expect("the linking event is valid");
    let announce = CustomerCommand::ResolvedEvent {
        event,
        notes: Vec::new(),
        merges: vec![merge_of(&bob, &ann)],
    };
    write_record(&client, &ann, announce, "link-1").await;
    // ...so ann holds her later events until bob's state arrives: a purchase, and a
    // return of an order nobody had (refused once it is applied).
    let refused = outgoing(
        "store",
        json!({"v": 1, "event_id": "e-ret", "type": "return",
               "occurred_at": "2026-10-02T10:00:00Z", "identity": {"email": "ann@example.com"},
               "order_id": "o-never", "amount": 5.0}),
    );
    send(
        &client,
        vec![
            purchase("e-ann-2", "ann@example.com", "o-ann-2", 20.0),
            refused,
        ],
    )
    .await;
    let waiting = query_id(&client, &ann).await;
    assert_eq!(
        waiting["purchases"]["count"], 1,
        "held, not applied: {waiting}"
    );
    assert_eq!(waiting["awaiting_merges"], json!([bob]), "{waiting}");

    // Bob's MergeOut: his state travels, ann's held events apply in order.
    write_merge_out(&client, &bob, &ann, "mo-1").await;
    let until = Instant::now() + MERGE_TIMEOUT;
    let merged = loop {
        let reply = query_id(&client, &bob).await;
        if reply["merged_into"] == ann.as_str() && reply["purchases"]["count"] == 4 {
            break reply;
        }
        assert!(Instant::now() < until, "not merged and released: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(merged["awaiting_merges"], json!([]), "{merged}");
    assert_eq!(minor(&merged["purchases"]["total_spend"]), 13_000);

    let js = jetstream::new(client.clone());
    let letters = wait_for_dead_letters(&js, 1).await;
    let released: Vec<Value> = letters
        .iter()
        .filter(|l| l.subject == "crm.dlq.unapplicable")
        .map(|l| serde_json::from_slice(&l.body).expect("a JSON body"))
        .collect();
    assert_eq!(
        released,
        vec![json!({"customer_id": ann, "event_id": "e-ret", "released_by_merge": true})]
    );
}

/// A shard that moves before its transfers were acked: the snapshot the old owner writes
/// carries the transfer outbox, and the new owner's store lists the transfer to send.
#[tokio::test]
async fn a_pending_transfer_travels_in_the_shard_snapshot_to_the_next_owner() {
    const SHARD: u32 = 2;
    let server = crm_testkit::NatsServer::start();
    let (snapshots, _js) = crm_testkit::cluster_env::test_snapshots(&server).await;

    // The old owner applied bob's MergeOut (tombstone and transfer in one commit) and
    // stopped before the survivor's log acked the transfer.
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = Store::open(owner_dir.path(), 8 << 20).expect("store");
    let mut bob = CustomerState::new("c-bob");
    bob.created_at_ms = Some(1_000);
    let mut tombstone = bob.clone();
    tombstone.merge.merged_into = Some("c-ann".to_string());
    let key = TransferKey {
        shard: SHARD,
        seq: 12,
        index: 0,
    };
    let transfer = MergeTransfer {
        merge: merge_of("c-bob", "c-ann"),
        to_customer_id: "c-ann".to_string(),
        state: bob,
    };
    let batch = CommitBatch {
        customers: vec![CustomerWrite {
            customer_id: "c-bob".to_string(),
            state: EncodedState {
                bytes: codec::encode(&tombstone),
                next_due_ms: None,
            },
        }],
        meta: ShardMeta {
            applied_seq: 12,
            clock_ms: 1_000,
            owner_epoch: 1,
        },
        created: vec!["c-bob".to_string()],
        transfers: vec![(key, transfer.clone())],
        ..CommitBatch::default()
    };
    owner.commit(SHARD, &batch).expect("commit");
    snapshots
        .write(&owner, SHARD, 1, "node-a")
        .await
        .expect("snapshot written");

    // The next owner restores it: the transfer is in its outbox, sent when its worker starts.
    let taker_dir = tempfile::tempdir().expect("tempdir");
    let taker = Store::open(taker_dir.path(), 8 << 20).expect("store");
    assert!(taker.transfers(SHARD).expect("transfers").is_empty());
    let restored = snapshots
        .restore_if_newer(&taker, SHARD)
        .await
        .expect("restored");
    assert!(restored.is_some());
    assert_eq!(
        taker.transfers(SHARD).expect("transfers"),
        vec![(key, transfer)]
    );
    let stored = taker
        .load_customer("c-bob")
        .expect("load")
        .expect("the tombstone");
    assert_eq!(stored.merge.merged_into.as_deref(), Some("c-ann"));
}
