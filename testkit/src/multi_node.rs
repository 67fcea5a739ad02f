//! Several `crm-node` processes on one NATS: start, add, kill, restart and drain nodes,
//! wait until the cluster has applied everything, and check the apply audit (no shard ever
//! applied by two lease epochs at once).

use crate::cluster_env::{
    connect, read_stream, router_busy, write_config, NodeOptions, NODE_READY_TIMEOUT,
};
use crate::nats_cluster::NatsCluster;
use crate::nats_server::NatsServer;
use crate::node_process::{run_cli, NodeProcess};
use async_nats::jetstream;
use crm_node::cluster::status::{self as cluster_status, ClusterStatus};
use crm_node::subjects;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A NATS server (or a NATS cluster) and named nodes, in a temporary directory; everything
/// stops on drop.
pub struct ClusterEnv {
    pub nodes: Vec<(String, NodeProcess)>,
    /// The single server, when not on a NATS cluster.
    pub nats: Option<NatsServer>,
    /// The NATS cluster, when on one.
    pub nats_cluster: Option<NatsCluster>,
    /// Every client URL, comma-separated.
    pub url: String,
    pub dir: tempfile::TempDir,
    pub options: NodeOptions,
}

impl ClusterEnv {
    /// Starts `count` nodes (`node-1` ...) on one NATS server, one after the other.
    pub fn start(count: usize, options: NodeOptions) -> ClusterEnv {
        let nats = NatsServer::start();
        let mut env = ClusterEnv {
            nodes: Vec::new(),
            url: nats.url(),
            nats: Some(nats),
            nats_cluster: None,
            dir: tempfile::tempdir().expect("temporary directory"),
            options,
        };
        for _ in 0..count {
            env.add_node();
        }
        env
    }

    /// Starts `count` nodes on a cluster of `servers` NATS servers (every node knows every
    /// server).
    pub fn start_on_nats_cluster(count: usize, servers: usize, options: NodeOptions) -> ClusterEnv {
        let cluster = NatsCluster::start(servers);
        let mut env = ClusterEnv {
            nodes: Vec::new(),
            url: cluster.urls().join(","),
            nats: None,
            nats_cluster: Some(cluster),
            dir: tempfile::tempdir().expect("temporary directory"),
            options,
        };
        for _ in 0..count {
            env.add_node();
        }
        env
    }

    /// The single NATS server (panics on a NATS cluster).
    pub fn server(&self) -> &NatsServer {
        self.nats.as_ref().expect("a single NATS server")
    }

    /// Starts the next node (`node-<n+1>`) and returns its id.
    pub fn add_node(&mut self) -> String {
        let url = self.url.clone();
        self.add_node_with_url(&url)
    }

    /// Starts the next node connected to NATS through `url` (e.g. a [`crate::tcp_proxy`]).
    pub fn add_node_with_url(&mut self, url: &str) -> String {
        let id = format!("node-{}", self.nodes.len() + 1);
        let config = write_config(self.dir.path(), &id, url, &self.options);
        let node = NodeProcess::start(&config, url, NODE_READY_TIMEOUT);
        self.nodes.push((id.clone(), node));
        id
    }

    /// The process of node `id`.
    pub fn node(&mut self, id: &str) -> &mut NodeProcess {
        &mut self
            .nodes
            .iter_mut()
            .find(|(node_id, _)| node_id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
            .1
    }

    pub async fn client(&self) -> async_nats::Client {
        connect(&self.url).await
    }

    /// Every node's last log lines, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|(id, node)| format!("--- {id}\n{}", node.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ClusterEnv {
    /// With `CRM_TEST_LOGS=<dir>` set, every node's whole log is kept there
    /// (`<dir>/<pid>-<node>.log`), for looking into a fault test after it ran.
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("CRM_TEST_LOGS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        for (id, node) in &self.nodes {
            let path = dir.join(format!("{}-{id}.log", std::process::id()));
            let _ = std::fs::write(&path, node.log_lines().join("\n"));
        }
    }
}

/// The cluster status (`crm_node::cluster::status::read`, what `crm-node status --json`
/// prints), or why it could not be read (JetStream busy electing leaders, say).
pub async fn read_status(client: &async_nats::Client) -> Result<ClusterStatus, String> {
    let js = jetstream::new(client.clone());
    cluster_status::read(&js, Duration::from_secs(4)).await
}

/// `crm-node status --json` through the library, as JSON (what the CLI prints).
pub async fn status(client: &async_nats::Client) -> Value {
    try_status(client)
        .await
        .unwrap_or_else(|e| panic!("status: {e}"))
}

/// [`status`], or why it could not be read (JetStream busy electing leaders, say).
pub async fn try_status(client: &async_nats::Client) -> Result<Value, String> {
    let status = read_status(client).await?;
    serde_json::to_value(&status).map_err(|error| format!("status not serialisable: {error}"))
}

/// `crm-node status --json` through the CLI.
pub fn status_cli(nats_url: &str) -> Value {
    let (ok, stdout, stderr) = run_cli(&["--nats-url", nats_url, "status", "--json"]);
    assert!(ok, "crm-node status failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {stdout}"))
}

/// What keeps the cluster from being idle and settled (empty: nothing): ingest not yet
/// routed, shards without an owner or owned by another node than assigned, records not
/// applied.
pub async fn cluster_busy(client: &async_nats::Client) -> Vec<String> {
    let js = jetstream::new(client.clone());
    let mut busy: Vec<String> = router_busy(&js).await.into_iter().collect();
    let status = match read_status(client).await {
        Ok(status) => status,
        Err(error) => {
            busy.push(error);
            return busy;
        }
    };
    let shown = |name: &Option<String>| name.as_deref().unwrap_or("null").to_string();
    for shard in &status.shards {
        if shard.owner.is_none() || shard.owner != shard.assigned {
            busy.push(format!(
                "shard {}: owner {}, assigned {}",
                shard.shard,
                shown(&shard.owner),
                shown(&shard.assigned)
            ));
        } else if shard.lag != Some(0) {
            let lag = shard.lag.map_or("null".to_string(), |lag| lag.to_string());
            busy.push(format!("shard {}: lag {lag}", shard.shard));
        }
    }
    busy
}

/// Waits until [`cluster_busy`] is empty; panics with what is still busy after `timeout`.
pub async fn wait_cluster_settled(client: &async_nats::Client, timeout: Duration) {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut next_report = started + Duration::from_secs(10);
    loop {
        let busy = cluster_busy(client).await;
        if busy.is_empty() {
            return;
        }
        if Instant::now() >= next_report {
            // Shown with --nocapture: what a slow settle waited for.
            eprintln!("{:?}: still busy: {}", started.elapsed(), busy.join("; "));
            next_report += Duration::from_secs(10);
        }
        assert!(
            Instant::now() < deadline,
            "cluster not settled after {timeout:?}:\n{}",
            busy.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the status shows `predicate` true; panics with the status after `timeout`.
pub async fn wait_status(
    client: &async_nats::Client,
    what: &str,
    timeout: Duration,
    predicate: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        // A status that cannot be read is asked again.
        let status = try_status(client)
            .await
            .unwrap_or_else(|e| Value::String(format!("not read: {e}")));
        if status.is_object() && predicate(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached after {timeout:?}; status: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether every shard of a status is served by the node it is assigned to.
pub fn settled(status: &Value) -> bool {
    status["shards"].as_array().is_some_and(|shards| {
        shards
            .iter()
            .all(|s| !s["owner"].is_null() && s["owner"] == s["assigned"])
    })
}

/// The shards `node` owns according to a status.
pub fn owned_by(status: &Value, node: &str) -> Vec<u64> {
    status["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["owner"] == node)
        .filter_map(|s| s["shard"].as_u64())
        .collect()
}

/// One applied batch, as recorded on `crm.audit.<n>`.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditRecord {
    pub shard: u32,
    pub node: String,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub at_ms: i64,
}

/// Every audit record in `CRM_AUDIT`, in stream order.
pub async fn audit_records(client: &async_nats::Client) -> Vec<AuditRecord> {
    read_stream(client, subjects::AUDIT_STREAM)
        .await
        .into_iter()
        .map(|(_, payload)| serde_json::from_slice(&payload).expect("audit record JSON"))
        .collect()
}

/// Asserts, per shard, that every lease epoch was applied by one node only and that the
/// batches of successive epochs never interleave in time (epoch e's last batch before
/// epoch e+1's first): never two owners applying at once. Returns the epochs seen per
/// shard.
pub fn assert_single_writer(records: &[AuditRecord]) -> BTreeMap<u32, Vec<u64>> {
    let mut by_shard: BTreeMap<u32, BTreeMap<u64, (String, i64, i64)>> = BTreeMap::new();
    let mut problems = Vec::new();
    for record in records {
        let epochs = by_shard.entry(record.shard).or_default();
        let entry = epochs
            .entry(record.epoch)
            .or_insert_with(|| (record.node.clone(), record.at_ms, record.at_ms));
        if entry.0 != record.node {
            problems.push(format!(
                "shard {} epoch {} applied by {} and {}",
                record.shard, record.epoch, entry.0, record.node
            ));
        }
        entry.1 = entry.1.min(record.at_ms);
        entry.2 = entry.2.max(record.at_ms);
    }
    for (shard, epochs) in &by_shard {
        let spans: Vec<(&u64, &(String, i64, i64))> = epochs.iter().collect();
        for pair in spans.windows(2) {
            let ((e1, (n1, _, last1)), (e2, (n2, first2, _))) = (pair[0], pair[1]);
            if last1 > first2 {
                problems.push(format!(
                    "shard {shard}: epoch {e1} ({n1}) applied until {last1}, after epoch {e2} ({n2}) began at {first2}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    by_shard
        .into_iter()
        .map(|(shard, epochs)| (shard, epochs.into_keys().collect()))
        .collect()
}
