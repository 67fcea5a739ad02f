//! Replay determinism: a customer's state is a pure function of its shard log and the rules.
//! A second node with an empty store replays every shard log from the start (the same
//! JetStream records the first node applied, ticks included) and must end with
//! byte-identical customer states and the same shard clocks. The traffic has people who
//! are two customers before an event links them, so merges replay too (merge-outs, the
//! merged states appended to the survivors' logs, the held events).

use crm_actors::store::Store;
use crm_node::loadgen::Generator;
use crm_node::subjects;
use crm_testkit::cluster_env::{
    outgoing_events, publish_all, request, traffic_spec, wait_drained, write_config, NodeOptions,
    TestEnv, NODE_READY_TIMEOUT,
};
use crm_testkit::node_process::NodeProcess;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn stored_states(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let store = Store::open(data_dir.join("sled"), 16 * 1024 * 1024).expect("store opens");
    store
        .encoded_customers()
        .collect::<Result<_, _>>()
        .expect("states readable")
}

fn shard_clocks(data_dir: &Path, shards: u32) -> Vec<(u64, i64)> {
    let store = Store::open(data_dir.join("sled"), 16 * 1024 * 1024).expect("store opens");
    (0..shards)
        .map(|shard| {
            let meta = store.shard_meta(shard).expect("meta readable");
            (meta.applied_seq, meta.clock_ms)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_shard_logs_into_an_empty_store_yields_byte_identical_state() {
    let mut env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let events = outgoing_events(
        &mut Generator::new(traffic_spec("2026-02-01T00:00:00Z", 250, 20, 5))
            .with_split_identities(20)
            .without_truth(),
    );
    publish_all(&client, events, 512, Duration::from_secs(120)).await;
    // Time-driven rules must replay too: expiry, pending release, lapse, tier review.
    for at in ["2026-03-15T00:00:00Z", "2027-06-01T00:00:00Z"] {
        let reply = request(&client, subjects::CMD_TICK, &json!({ "at": at })).await;
        assert_eq!(reply["shards"], json!(env.options.shards), "{reply}");
    }
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    assert!(
        env.node.terminate(STOP_TIMEOUT),
        "first node did not stop cleanly"
    );

    let second_config = write_config(env.dir.path(), "node-2", &env.nats.url(), &env.options);
    let mut second = NodeProcess::start(&second_config, &env.nats.url(), NODE_READY_TIMEOUT);
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    assert!(
        second.terminate(STOP_TIMEOUT),
        "second node did not stop cleanly"
    );

    let original = stored_states(&env.dir.path().join("node-1"));
    let replayed = stored_states(&env.dir.path().join("node-2"));
    assert!(
        original.len() >= 200,
        "only {} customers stored",
        original.len()
    );
    assert_eq!(original.len(), replayed.len(), "customer counts differ");
    let tombstones = original
        .iter()
        .filter(|(_, bytes)| {
            crm_actors::codec::decode_state(bytes)
                .expect("state decodes")
                .merge
                .merged_into
                .is_some()
        })
        .count();
    assert!(tombstones >= 10, "only {tombstones} customers merged away");
    for ((id_a, bytes_a), (id_b, bytes_b)) in original.iter().zip(&replayed) {
        assert_eq!(id_a, id_b);
        assert!(
            bytes_a == bytes_b,
            "customer {id_a}: replayed state differs"
        );
    }
    assert_eq!(
        shard_clocks(&env.dir.path().join("node-1"), env.options.shards),
        shard_clocks(&env.dir.path().join("node-2"), env.options.shards),
        "shard applied sequences or clocks differ"
    );
}
