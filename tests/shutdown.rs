//! Graceful shutdown and start-up against a real `nats-server` and real `crm-node` processes:
//! SIGTERM under load exits 0 after logging "crm-node stopped" and loses nothing (a restarted
//! node makes every customer exact); a node started while NATS is down waits, warns, and
//! becomes ready (and serves) once NATS comes up.

use crm_node::subjects;
use crm_testkit::cluster_env::{
    assert_buyers_exact, connect, generated_traffic, minor, publish_all, request, traffic_spec,
    view, wait_drained, write_config, NodeOptions, Outgoing, TestEnv, NODE_READY_TIMEOUT,
};
use crm_testkit::node_process::{
    clear_developer_env, crm_node_binary, log_lines, log_tail, terminate_child, wait_for_log_line,
};
use crm_testkit::{spawn_tied_to_test_process, NatsServer};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const START: &str = "2026-01-05T00:00:00Z";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const PUBLISH_DEADLINE: Duration = Duration::from_secs(120);
/// Bound on a graceful stop (the node's shutdown_grace_s is 20 s by default).
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);

async fn stats(client: &async_nats::Client) -> Value {
    request(client, subjects::NODE_STATS, &json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_a_restarted_node_makes_every_customer_exact() {
    let mut env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let (events, truth) = generated_traffic(traffic_spec(START, 300, 30, 41));
    assert!(
        events.len() >= 2000,
        "only {} events generated",
        events.len()
    );
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move { publish_all(&client, events, 16, PUBLISH_DEADLINE).await })
    };
    // Stop once the node is demonstrably busy: it has routed some events while the publisher
    // (at most 16 publishes in flight, so it is still sending) keeps the node's backlog full.
    let until = Instant::now() + PUBLISH_DEADLINE;
    loop {
        let routed = stats(&client).await["metrics"]["ingest_routed"]
            .as_u64()
            .unwrap_or(0);
        if routed >= 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the node routed nothing:\n{}",
            env.node.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing = !publisher.is_finished();
    let backlog = crm_testkit::cluster_env::busy_logs(&client, env.options.shards).await;
    let clean = tokio::task::block_in_place(|| env.node.terminate(TERMINATE_TIMEOUT));
    assert!(
        clean,
        "SIGTERM did not end the node with exit 0 within {TERMINATE_TIMEOUT:?}:\n{}",
        env.node.log_tail(40)
    );
    let lines = env.node.log_lines();
    assert!(
        lines.iter().any(|l| l.contains("crm-node stopped")),
        "no 'crm-node stopped' in the log:\n{}",
        env.node.log_tail(40)
    );
    assert!(
        !lines.iter().any(|l| l.contains("after the grace period")),
        "the shutdown needed the grace period (tasks were aborted):\n{}",
        env.node.log_tail(40)
    );

    // The adapter keeps publishing into JetStream while no node runs; a new node applies all.
    tokio::task::block_in_place(|| env.node.restart(NODE_READY_TIMEOUT));
    publisher.await.expect("publisher");
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    let checked = assert_buyers_exact(&client, &truth, |_| None).await;
    assert!(checked >= 100, "only {checked} buyers checked");
    eprintln!(
        "stopped while publishing: {publishing}, backlog at SIGTERM: {backlog:?}; {checked} buyers exact"
    );
}

/// A `crm-node run` started by hand (the harness's NodeProcess waits for readiness on start,
/// which a node waiting for NATS never reaches): stderr collected, killed on drop.
struct WaitingNode {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl WaitingNode {
    fn start(config: &std::path::Path, nats_url: &str) -> WaitingNode {
        let mut command = Command::new(crm_node_binary());
        clear_developer_env(&mut command)
            .args(["--nats-url", nats_url, "run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied_to_test_process(command).expect("crm-node starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        WaitingNode {
            child: Some(child),
            log,
        }
    }

    fn lines(&self) -> Vec<String> {
        log_lines(&self.log)
    }

    fn tail(&self) -> String {
        log_tail(&self.log, 40)
    }

    /// Waits until a log line contains `needle` (panics with the log if the node exits or
    /// `timeout` passes).
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        wait_for_log_line(&mut self.child, &self.log, needle, timeout);
    }

    /// SIGTERM, then waits; returns whether it exited with success.
    fn terminate(&mut self, timeout: Duration) -> bool {
        self.child
            .take()
            .is_some_and(|child| terminate_child(child, timeout))
    }
}

impl Drop for WaitingNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_warns_retries_and_serves_once_nats_is_up() {
    // A server started then stopped: its port is known and nothing listens on it.
    let mut nats = NatsServer::start();
    nats.stop();
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = NodeOptions::default();
    let config = write_config(dir.path(), "node-1", &nats.url(), &options);
    let mut node = WaitingNode::start(&config, &nats.url());

    // It keeps trying (the config retries every 100 ms up to 1 s) and says so.
    tokio::task::block_in_place(|| node.wait_for("NATS unreachable; retrying", NODE_READY_TIMEOUT));
    let warnings_before = node
        .lines()
        .iter()
        .filter(|l| l.contains("NATS unreachable"))
        .count();
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        while node
            .lines()
            .iter()
            .filter(|l| l.contains("NATS unreachable"))
            .count()
            < warnings_before + 1
        {
            assert!(
                Instant::now() < deadline,
                "no second attempt:\n{}",
                node.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(
        !node.lines().iter().any(|l| l.contains("crm-node ready")),
        "ready without NATS:\n{}",
        node.tail()
    );
    assert!(
        node.lines().iter().any(|l| l.contains("WARN")),
        "the retry is not logged as a warning:\n{}",
        node.tail()
    );

    // NATS comes up on that port: the node connects, sets up and becomes ready.
    tokio::task::block_in_place(|| nats.restart());
    tokio::task::block_in_place(|| node.wait_for("crm-node ready", NODE_READY_TIMEOUT));

    // And it serves: an event is applied and queryable.
    let client = connect(&nats.url()).await;
    let event = json!({"v": 1, "event_id": "late-1", "type": "purchase", "occurred_at": "2026-03-01T10:00:00Z",
                       "identity": {"email": "late@example.com"}, "order_id": "o-late", "amount": 12.5, "currency": "EUR"});
    publish_all(
        &client,
        [Outgoing {
            channel: "web".to_string(),
            event_id: "late-1".to_string(),
            payload: serde_json::to_vec(&event).expect("json"),
        }],
        1,
        PUBLISH_DEADLINE,
    )
    .await;
    wait_drained(&client, options.shards, DRAIN_TIMEOUT).await;
    let view = view(&client, json!({"email": "late@example.com"})).await;
    assert_eq!(view["purchases"]["count"], json!(1), "{view}");
    assert_eq!(minor(&view["purchases"]["total_spend"]), 1250, "{view}");

    let clean = tokio::task::block_in_place(|| node.terminate(TERMINATE_TIMEOUT));
    assert!(
        clean,
        "SIGTERM did not end the node with exit 0:\n{}",
        node.tail()
    );
    assert!(
        node.lines().iter().any(|l| l.contains("crm-node stopped")),
        "{}",
        node.tail()
    );
}
