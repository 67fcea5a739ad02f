//! The three-server NATS cluster of the test harness (`crm_testkit::nats_cluster`) against
//! real nats-server processes: an R3 stream keeps accepting publishes and serving every
//! message while one server is killed, and the restarted server catches up.

use async_nats::jetstream::{self, stream};
use crm_testkit::nats_cluster::NatsCluster;
use std::time::Duration;
use tokio::time::Instant;

const STREAM: &str = "CLUSTER_CHECK";
const SUBJECT: &str = "cluster.check";
/// How long one message may take to be acked, retries included (a leader election after
/// a server is killed takes a few seconds).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a restarted server may take to be a current replica again.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// Publishes message `number` with `Nats-Msg-Id` = `m-<number>` and retries until it is
/// acked (the id makes a retry of a stored message a duplicate, not a second copy).
async fn publish_until_acked(js: &jetstream::Context, number: u64) {
    let started = Instant::now();
    let deadline = started + PUBLISH_TIMEOUT;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("m-{number}").as_str(),
    );
    for attempt in 1.. {
        let outcome = async {
            js.publish_with_headers(SUBJECT, headers.clone(), payload(number))
                .await?
                .await
                .map_err(async_nats::Error::from)
        };
        match outcome.await {
            Ok(_) if attempt == 1 => return,
            Ok(_) => {
                eprintln!(
                    "message {number} acked at attempt {attempt}, after {:?}",
                    started.elapsed()
                );
                return;
            }
            Err(error) if Instant::now() < deadline => {
                if attempt == 1 {
                    eprintln!("message {number} not acked ({error}); retrying");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => {
                panic!("message {number} was not acked within {PUBLISH_TIMEOUT:?}: {error}")
            }
        }
    }
}

fn payload(number: u64) -> bytes::Bytes {
    format!("message {number}").into()
}

/// Asserts that the stream holds messages 1..=`count` exactly once, in order.
async fn assert_stream_holds(js: &jetstream::Context, count: u64) {
    let mut stream = js.get_stream(STREAM).await.expect("the stream exists");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, count, "messages in {STREAM}");
    assert_eq!(info.state.last_sequence, count, "last sequence of {STREAM}");
    for sequence in 1..=count {
        let message = stream
            .get_raw_message(sequence)
            .await
            .unwrap_or_else(|e| panic!("message {sequence} cannot be read: {e}"));
        assert_eq!(message.payload, payload(sequence), "message {sequence}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_keeps_every_message_through_a_killed_and_restarted_server() {
    let mut cluster = NatsCluster::start(3);
    assert_eq!(cluster.len(), 3);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.urls())
        .await
        .expect("a client connected to every URL reaches the cluster");
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js.create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec![SUBJECT.to_string()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("the cluster accepts an R3 stream");

    for number in 1..=50 {
        publish_until_acked(&js, number).await;
    }
    assert_stream_holds(&js, 50).await;

    // Kill the stream's leader: the hardest server to lose.
    let info = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .cached_info()
        .clone();
    let leader = info
        .cluster
        .and_then(|cluster| cluster.leader)
        .expect("an R3 stream has a leader");
    let victim = cluster
        .index_of(&leader)
        .unwrap_or_else(|| panic!("the leader {leader} is not a server of the cluster"));
    cluster.kill(victim);
    assert!(!cluster.is_running(victim));

    for number in 51..=100 {
        publish_until_acked(&js, number).await;
    }
    assert_stream_holds(&js, 100).await;

    cluster.restart(victim);
    assert!(cluster.is_running(victim));
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let mut stream = js.get_stream(STREAM).await.expect("stream");
        let info = stream.info().await.expect("stream info").clone();
        let cluster_info = info
            .cluster
            .clone()
            .expect("an R3 stream reports its cluster");
        let peers: Vec<&str> = cluster_info
            .leader
            .as_deref()
            .into_iter()
            .chain(cluster_info.replicas.iter().map(|peer| peer.name.as_str()))
            .collect();
        let healthy = cluster_info.leader.is_some()
            && cluster_info.replicas.len() == 2
            && peers.contains(&cluster.server_name(victim))
            && cluster_info
                .replicas
                .iter()
                .all(|peer| peer.current && !peer.offline && peer.lag.unwrap_or(0) == 0);
        if healthy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not become a current replica within {CATCH_UP_TIMEOUT:?}: {cluster_info:?}\n{}",
            cluster.server_name(victim),
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_stream_holds(&js, 100).await;
}
