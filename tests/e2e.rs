//! End to end on one node, against a real `nats-server` and a real `crm-node` process:
//! thousands of multi-channel events for hundreds of people, with duplicates (same
//! `event_id`, and the same `order_id` under a new `event_id`), must leave every customer's
//! purchase count, spend, returns and points exactly equal to an independent calculation —
//! also when the node is killed with SIGKILL mid-stream, and when NATS restarts mid-stream.

use crm_testkit::cluster_env::{
    assert_buyers_exact, expected_points, generated_traffic, publish_all, purchase_arrivals,
    traffic_spec, wait_drained, NodeOptions, TestEnv,
};
use std::time::Duration;

const START: &str = "2026-01-05T00:00:00Z";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const PUBLISH_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_customer_is_exact_after_thousands_of_events_with_duplicates() {
    let env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let (events, truth) = generated_traffic(traffic_spec(START, 400, 30, 11));
    assert!(
        events.len() >= 3000,
        "only {} events generated",
        events.len()
    );
    assert!(truth.duplicates_same_event_id > 0 && truth.duplicates_same_order > 0);
    let deduplicated = publish_all(&client, events, 512, PUBLISH_DEADLINE).await;
    assert!(
        deduplicated >= truth.duplicates_same_event_id,
        "JetStream dropped the same-event-id resends"
    );
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked >= 100, "only {checked} buyers checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_mid_stream_is_still_exact_after_restart() {
    let mut env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let (events, truth) = generated_traffic(traffic_spec(START, 300, 30, 23));
    let half = events.len() / 2;
    let (first, second) = events.split_at(half);
    publish_all(&client, first.to_vec(), 512, PUBLISH_DEADLINE).await;
    // Kill while the node is still routing and applying the first half.
    env.node.kill();
    let publisher = {
        let client = client.clone();
        let second = second.to_vec();
        tokio::spawn(async move { publish_all(&client, second, 256, PUBLISH_DEADLINE).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| env.node.restart(Duration::from_secs(60)));
    publisher.await.expect("publisher");
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    let arrivals = purchase_arrivals(&client).await;
    assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_the_node_resumes_and_is_exact() {
    let mut env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let (events, truth) = generated_traffic(traffic_spec(START, 300, 30, 31));
    let half = events.len() / 2;
    let (first, second) = events.split_at(half);
    publish_all(&client, first.to_vec(), 512, PUBLISH_DEADLINE).await;
    tokio::task::block_in_place(|| env.nats.restart());
    publish_all(&client, second.to_vec(), 256, PUBLISH_DEADLINE).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    assert!(
        env.node.is_running(),
        "the node died with NATS:\n{}",
        env.node.log_tail(30)
    );
    let arrivals = purchase_arrivals(&client).await;
    assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
}
