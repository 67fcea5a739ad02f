//! The cluster under faults, against a real `nats-server` and real `crm-node` processes:
//! three nodes under continuous load lose one to SIGKILL, gain a fourth, and drain one; a
//! node restarted with its sled resumes where it was; a node cut from NATS by a proxy stops
//! applying before its shards pass on; a node frozen mid-batch past its leases publishes
//! nothing when it runs again; a shard whose snapshot is damaged is rebuilt from its whole
//! log. Every time, every customer's spend, purchase count
//! and points end exact (through merges too, where the traffic has people who are two
//! customers until an event links them), and the apply audit shows that no shard was ever applied by two
//! lease holders at once.

use crm_node::subjects;
use crm_testkit::cluster_env::request;
use crm_testkit::cluster_env::{
    assert_buyers_exact, expected_points, generated_traffic, publish_all, publish_paced,
    purchase_arrivals, traffic_spec, NodeOptions, NODE_READY_TIMEOUT,
};
use crm_testkit::multi_node::{
    assert_single_writer, audit_records, owned_by, settled, status, status_cli,
    wait_cluster_settled, wait_status, ClusterEnv,
};
use crm_testkit::node_process::run_cli;
use crm_testkit::schemas::assert_matches_schema;
use crm_testkit::tcp_proxy::TcpProxy;
use serde_json::{json, Value};
use std::time::Duration;

const START: &str = "2026-01-05T00:00:00Z";
const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The JSON example tagged `tag` in docs/cluster.md.
fn doc_example(tag: &str) -> Value {
    let text = std::fs::read_to_string(crm_testkit::cluster_env::repo_file("docs/cluster.md"))
        .expect("docs/cluster.md");
    let open = format!("```json {tag}\n");
    let start = text.find(&open).unwrap_or_else(|| panic!("no {open}")) + open.len();
    let end = start + text[start..].find("```").expect("the block ends");
    serde_json::from_str(&text[start..end]).expect("the example is JSON")
}

/// Asserts that `real` has every key of `example` (objects; first element of arrays).
fn has_keys_of(example: &Value, real: &Value, path: &str) {
    match (example, real) {
        (Value::Object(example), Value::Object(real)) => {
            for (key, value) in example {
                let inner = real
                    .get(key)
                    .unwrap_or_else(|| panic!("{path}.{key} documented but missing in {real:?}"));
                has_keys_of(value, inner, &format!("{path}.{key}"));
            }
        }
        (Value::Array(example), Value::Array(real)) => {
            if let (Some(example), Some(real)) = (example.first(), real.first()) {
                has_keys_of(example, real, &format!("{path}[0]"));
            }
        }
        _ => {}
    }
}

/// Every shard has an owner, the one the coordinator assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_lose_one_gain_one_and_drain_one_under_load_and_stay_exact() {
    let options = NodeOptions {
        shards: 12,
        limits: "batch_max_events = 64".to_string(),
        // Periodic snapshots, so the crash failover restores one and replays the rest.
        cluster: "snapshot_every_records = 150".to_string(),
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(3, options));
    let client = env.client().await;
    let url = env.url.clone();
    let status = wait_status(&client, "three nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s)
            && ["node-1", "node-2", "node-3"]
                .iter()
                .all(|n| owned_by(s, n).len() == 4)
    })
    .await;
    assert!(status["coordinator"].is_string(), "{status}");

    let (events, truth) = generated_traffic(traffic_spec(START, 400, 30, 41));
    let total = events.len();
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

    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        run_cli(&["--nats-url", &url, "drain", "node-1", "--timeout-s", "60"])
    });
    assert!(ok, "drain failed: {stderr}\n{}", env.logs(30));
    assert!(stdout.contains("may stop"), "{stdout}");
    let status = wait_status(&client, "node-1 drained", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, "node-1").is_empty()
    })
    .await;
    assert_ne!(status["coordinator"], "node-1", "{status}");

    publisher.await.expect("publisher");
    wait_cluster_settled(&client, Duration::from_secs(120)).await;
    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked > 100, "only {checked} buyers among {total} events");

    let epochs = assert_single_writer(&audit_records(&client).await);
    assert_eq!(
        epochs.len(),
        12,
        "every shard applied something: {epochs:?}"
    );
    let restored = env
        .nodes
        .iter()
        .filter(|(_, node)| {
            node.log_lines()
                .iter()
                .any(|l| l.contains("snapshot restored"))
        })
        .count();
    assert!(
        restored >= 1,
        "no node restored a snapshot:\n{}",
        env.logs(20)
    );
    assert!(
        epochs.values().filter(|e| e.len() > 1).count() >= 4,
        "shards moved under several epochs: {epochs:?}"
    );

    // The documented status JSON and audit record, from the CLI and the stream.
    let status = tokio::task::block_in_place(|| status_cli(&url));
    has_keys_of(&doc_example("status"), &status, "status");
    assert_matches_schema(
        "cluster-status.schema.json",
        &status,
        "crm-node status --json",
    );
    let audit = crm_testkit::cluster_env::read_stream(&client, subjects::AUDIT_STREAM).await;
    let record: Value = serde_json::from_slice(&audit[0].1).expect("audit JSON");
    has_keys_of(&doc_example("audit"), &record, "audit");
    let nodes = status["nodes"].as_array().expect("nodes");
    let node = |id: &str| {
        nodes
            .iter()
            .find(|n| n["node_id"] == id)
            .cloned()
            .expect(id)
    };
    assert_eq!(node("node-2")["alive"], false, "{status}");
    assert_eq!(node("node-3")["alive"], true, "{status}");
    assert!(node("node-1")["shards"]
        .as_array()
        .expect("shards")
        .is_empty());
    let shards = status["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 12);
    for shard in shards {
        assert!(
            shard["owner"].is_string() && shard["epoch"].as_u64() > Some(0),
            "{shard}"
        );
        assert_eq!(shard["lag"], 0, "{shard}");
    }
    assert!(status["coordinator"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_sled_takes_its_shards_back_without_a_full_replay() {
    let options = NodeOptions {
        shards: 8,
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(2, options));
    let client = env.client().await;
    wait_status(&client, "two nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, "node-2").len() == 4
    })
    .await;
    let (events, truth) = generated_traffic(traffic_spec(START, 200, 30, 43));
    let (first, second) = events.split_at(events.len() / 2);
    publish_all(&client, first.to_vec(), 256, Duration::from_secs(120)).await;
    wait_cluster_settled(&client, Duration::from_secs(120)).await;
    let mine = owned_by(&status(&client).await, "node-2");

    // SIGKILL and straight back, before its leases expire: it takes them back itself.
    let log_before = env.node("node-2").log_lines().len();
    tokio::task::block_in_place(|| env.node("node-2").restart(NODE_READY_TIMEOUT));
    wait_status(
        &client,
        "node-2 serves its shards again",
        MOVE_TIMEOUT,
        |s| settled(s) && owned_by(s, "node-2") == mine,
    )
    .await;
    publish_all(&client, second.to_vec(), 256, Duration::from_secs(120)).await;
    wait_cluster_settled(&client, Duration::from_secs(120)).await;

    let restarted_log = env.node("node-2").log_lines()[log_before..].join("\n");
    assert!(
        !restarted_log.contains("snapshot restored"),
        "its own sled was current:\n{restarted_log}"
    );
    let records = audit_records(&client).await;
    assert_single_writer(&records);
    for shard in &mine {
        let of_shard: Vec<_> = records
            .iter()
            .filter(|r| u64::from(r.shard) == *shard)
            .collect();
        let first_ever = of_shard.iter().map(|r| r.first_seq).min().expect("applied");
        let last_epoch = of_shard.iter().map(|r| r.epoch).max().expect("epochs");
        let resumed_at = of_shard
            .iter()
            .filter(|r| r.epoch == last_epoch)
            .map(|r| r.first_seq)
            .min()
            .expect("batches of the last epoch");
        assert!(
            resumed_at > first_ever && of_shard.iter().all(|r| r.epoch < last_epoch || r.node == "node-2"),
            "shard {shard}: after the restart node-2 started at {resumed_at}, the log at {first_ever}"
        );
    }
    let arrivals = purchase_arrivals(&client).await;
    assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;

    // A value fit gathers every shard's summaries from both nodes (a missing shard would
    // make it "unavailable"; too few buyers for the models is "fit_failed").
    let fit = request(&client, subjects::CMD_VALUE_FIT, &json!({})).await;
    assert_ne!(fit["error"]["code"], "unavailable", "{fit}");
    if fit.get("error").is_none() {
        assert!(fit["customers"].as_u64() > Some(100), "{fit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_snapshot_is_damaged_is_rebuilt_from_its_whole_log() {
    let options = NodeOptions {
        shards: 4,
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(2, options));
    let client = env.client().await;
    wait_status(&client, "two nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, "node-2").len() == 2
    })
    .await;
    let (events, truth) = generated_traffic(traffic_spec(START, 150, 30, 47));
    let (first, second) = events.split_at(events.len() / 2);
    publish_all(&client, first.to_vec(), 256, Duration::from_secs(120)).await;
    wait_cluster_settled(&client, Duration::from_secs(120)).await;
    let moved = owned_by(&status(&client).await, "node-2");

    // The snapshots of node-2's shards name pieces that are not there (a newer sequence
    // than anyone's copy, so the next owner must try them).
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value(subjects::KV_SNAPSHOTS)
        .await
        .expect("snapshot bucket");
    for shard in &moved {
        let manifest = json!({"shard": shard, "id": "9-999999-0", "seq": 999_999, "epoch": 9,
            "pieces": 2, "entries": 10, "bytes": 100, "checksum": "0000000000000000",
            "node": "node-2", "at_ms": 0});
        kv.put(
            subjects::shard_key(*shard as u32),
            manifest.to_string().into(),
        )
        .await
        .expect("manifest written");
    }
    tokio::task::block_in_place(|| env.node("node-2").kill());
    wait_status(
        &client,
        "node-2's shards served by node-1",
        MOVE_TIMEOUT,
        |s| settled(s) && owned_by(s, "node-1").len() == 4,
    )
    .await;
    publish_all(&client, second.to_vec(), 256, Duration::from_secs(120)).await;
    wait_cluster_settled(&client, Duration::from_secs(120)).await;

    let log = env.node("node-1").log_lines().join("\n");
    let rebuilt = log
        .matches("rebuilding the shard from its whole log")
        .count();
    assert_eq!(rebuilt, moved.len(), "{log}");
    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked > 50, "only {checked} buyers checked");
    assert_single_writer(&audit_records(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_nats_stops_applying_before_its_shards_pass_to_another() {
    let options = NodeOptions {
        shards: 8,
        limits: "batch_max_events = 32".to_string(),
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(1, options));
    let proxy = TcpProxy::start(env.server().port());
    let cut = tokio::task::block_in_place(|| env.add_node_with_url(&proxy.url()));
    let client = env.client().await;
    wait_status(&client, "two nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, &cut).len() == 4
    })
    .await;
    let (events, truth) = generated_traffic(traffic_spec(START, 300, 30, 47));
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            publish_paced(&client, events, 400, Duration::from_secs(120)).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.cut();
    wait_status(
        &client,
        "the cut node's shards served by node-1",
        MOVE_TIMEOUT,
        |s| settled(s) && owned_by(s, &cut).is_empty(),
    )
    .await;
    let log = env.node(&cut).log_lines().join("\n");
    assert!(
        log.contains("not renewed in time"),
        "the cut node did not stop on its own:\n{}",
        env.node(&cut).log_tail(40)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.heal();
    publisher.await.expect("publisher");
    wait_cluster_settled(&client, Duration::from_secs(120)).await;
    let arrivals = purchase_arrivals(&client).await;
    assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert_single_writer(&audit_records(&client).await);
}

/// A process can be frozen as a whole (SIGSTOP here; a stalled VM or a swap storm in life)
/// with its connections open, in the middle of a batch. It cannot stop itself in time, so
/// the fence must hold when it runs again: whatever it finishes after losing its leases
/// stays in its own sled, and nothing of it (audit, actor events, routed records) reaches
/// NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_leases_publishes_nothing_when_it_runs_again() {
    let options = NodeOptions {
        shards: 8,
        // Flushes 300 ms apart: each worker spends most of its time inside a batch,
        // waiting for that batch's flush, so the freeze catches them there.
        limits: "batch_max_events = 32\nflush_interval_ms = 300".to_string(),
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start(2, options));
    let client = env.client().await;
    let before = wait_status(&client, "two nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, "node-2").len() == 4 && s["router"].is_string()
    })
    .await;
    // The router's holder, so that routing and applying both pass to the other node.
    let frozen = before["router"].as_str().expect("a router").to_string();
    let other = if frozen == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    let (events, truth) = generated_traffic(traffic_spec(START, 300, 30, 59));
    // Faster than the nodes apply, so that the freeze finds the router and the shard
    // workers in the middle of their batches.
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            publish_paced(&client, events, 3000, Duration::from_secs(120)).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.node(&frozen).pause();
    wait_status(
        &client,
        "the other node routes and serves every shard",
        MOVE_TIMEOUT,
        |s| settled(s) && owned_by(s, other).len() == 8 && s["router"] == other,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.node(&frozen).resume();
    publisher.await.expect("publisher");
    wait_cluster_settled(&client, Duration::from_secs(120)).await;
    let log = env.node(&frozen).log_lines().join("\n");
    assert!(
        log.contains("shard lease ran out while a batch was applied"),
        "the freeze caught no batch in the middle (the test proves nothing):\n{}",
        env.node(&frozen).log_tail(40)
    );
    let audit = audit_records(&client).await;
    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked > 50, "only {checked} buyers checked");
    assert_single_writer(&audit);
}

/// On nats-server 2.9 a killed server is taken for alive for a minute or more, so some new
/// ephemeral consumers are placed on it and their creation never answers: the nodes (shard
/// readers, bucket watches, status) and this test's readers retry with short timeouts
/// (`crm_node::jetstream::create_with_retries`). Nodes connected to the killed server
/// reconnect to another one and restart their tasks; leases may move meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nats_server_of_three_killed_under_load_loses_nothing() {
    let options = NodeOptions {
        shards: 8,
        cluster: "stream_replicas = 3".to_string(),
        ..NodeOptions::default()
    };
    let mut env = tokio::task::block_in_place(|| ClusterEnv::start_on_nats_cluster(2, 3, options));
    let client = env.client().await;
    wait_status(&client, "two nodes share the shards", MOVE_TIMEOUT, |s| {
        settled(s) && owned_by(s, "node-2").len() == 4
    })
    .await;
    // A fifth of the people are two customers until an event links them: merges (records
    // in KV, merge-outs, merged states appended to shard logs) run through the lost server.
    let mut generator = crm_node::loadgen::Generator::new(traffic_spec(START, 300, 30, 53))
        .with_split_identities(20);
    let events = crm_testkit::cluster_env::outgoing_events(&mut generator);
    let truth = generator.into_truth();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            publish_paced(&client, events, 300, Duration::from_secs(180)).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The server node-1 is connected to, so that it reconnects and restarts its tasks.
    let port = connected_port(&env.node("node-1").log_lines()).expect("node-1 logged its server");
    let cluster = env.nats_cluster.as_mut().expect("a NATS cluster");
    let index = cluster
        .urls()
        .iter()
        .position(|url| url.ends_with(&format!(":{port}")))
        .expect("node-1's server is one of the cluster's");
    let killed = std::time::Instant::now();
    tokio::task::block_in_place(|| cluster.kill(index));
    publisher.await.expect("publisher");
    eprintln!("published {:?} after the kill", killed.elapsed());
    wait_cluster_settled(&client, Duration::from_secs(180)).await;
    eprintln!("settled {:?} after the kill", killed.elapsed());
    let arrivals = purchase_arrivals(&client).await;
    let checked =
        assert_buyers_exact(&client, &truth, |p| Some(expected_points(p, &arrivals))).await;
    assert!(checked > 100, "only {checked} buyers checked");
    assert_single_writer(&audit_records(&client).await);
}

/// The port of the NATS server a node's log says it last connected to (async-nats logs
/// `connected successfully server=<port>`).
fn connected_port(log: &[String]) -> Option<u16> {
    log.iter().rev().find_map(|line| {
        let plain = strip_ansi(line);
        if !plain.contains("connected successfully") {
            return None;
        }
        let after = &plain[plain.find("server=")? + "server=".len()..];
        after
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// `line` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for code in chars.by_ref() {
                if code == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
