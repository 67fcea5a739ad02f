//! The client subcommands as a user runs them: `send` (the reference adapter, from JSON
//! text and from a file), `watch` (live actor events), `query --customer-id` and `stats`.

use crm_cluster::cluster_env::{wait_drained, NodeOptions, TestEnv};
use crm_cluster::node_process::{crm_node_binary, run_cli};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const PURCHASE: &str = r#"{"v": 1, "event_id": "cli-1", "type": "purchase", "occurred_at": "2026-05-01T10:00:00Z",
 "identity": {"email": "cli@example.com"}, "order_id": "o-cli-1", "amount": 30.00, "currency": "EUR"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_watch_query_and_stats_work_from_the_command_line() {
    let env = TestEnv::start(NodeOptions::default());
    let url = env.nats.url();
    let client = env.client().await;

    // `watch --count 2 --json` prints the first two actor events and exits.
    let mut watch = Command::new(crm_node_binary())
        .args(["--nats-url", &url, "watch", "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch starts");
    // Give the subscription a moment to reach the server before the events happen.
    std::thread::sleep(Duration::from_millis(500));

    let (ok, out, err) = run_cli(&[
        "--nats-url",
        &url,
        "send",
        "--channel",
        "web",
        "--json",
        PURCHASE,
    ]);
    assert!(ok, "send failed: {err}");
    let ack: Value = serde_json::from_str(out.trim()).expect("send prints the ack as JSON");
    assert_eq!(ack["stream"], "CRM_INGEST");
    assert_eq!(ack["duplicate"], false);

    // The same event again, from a file: JetStream drops it as a duplicate.
    let file = env.dir.path().join("event.json");
    std::fs::write(&file, PURCHASE).expect("event file");
    let (ok, out, _) = run_cli(&[
        "--nats-url",
        &url,
        "send",
        "--channel",
        "web",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(ok);
    let ack: Value = serde_json::from_str(out.trim()).expect("ack");
    assert_eq!(ack["duplicate"], true);

    wait_drained(&client, env.options.shards, Duration::from_secs(60)).await;
    let lines: Vec<Value> = tokio::task::spawn_blocking(move || {
        let stdout = watch.stdout.take().expect("stdout");
        let lines = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| serde_json::from_str(&l).expect("watch --json prints JSON lines"))
            .collect();
        let status = watch.wait().expect("watch exits");
        assert!(status.success());
        lines
    })
    .await
    .expect("watch");
    let types: Vec<&str> = lines.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        vec!["customer.created", "points.earned"],
        "{lines:?}"
    );
    let customer_id = lines[0]["customer_id"]
        .as_str()
        .expect("customer id")
        .to_string();

    let (ok, out, _) = run_cli(&[
        "--nats-url",
        &url,
        "query",
        "--customer-id",
        &customer_id,
        "--json",
    ]);
    assert!(ok);
    let view: Value = serde_json::from_str(out.trim()).expect("query --json prints the reply");
    assert_eq!(view["purchases"]["count"], 1);
    let (ok, out, _) = run_cli(&["--nats-url", &url, "query", "--email", "CLI@example.com"]);
    assert!(ok);
    assert!(
        out.contains(&customer_id) && out.contains("1 orders"),
        "{out}"
    );

    let (ok, out, _) = run_cli(&["--nats-url", &url, "stats"]);
    assert!(ok);
    let stats: Value = serde_json::from_str(out.trim()).expect("stats JSON");
    assert_eq!(stats["metrics"]["ingest_routed"], 1);
    assert_eq!(stats["metrics"]["stored_customers"], 1);
}
