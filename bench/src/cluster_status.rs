//! Every read of the nodes' JSON replies, in one place: `crm.node.stats` (counters,
//! applied sequences) and the cluster status (`crm_node::cluster::status::gather`, what
//! `crm-node status --json` prints). They are read as `serde_json::Value` for now; when the
//! status has a typed contract, only this module changes. Callers get plain Rust values
//! ([`ClusterStatus`], [`ShardRow`], counters as `u64`), never a key to spell.

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use crm_node::subjects;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// The node timeout of `crm-node status` (the default `node_timeout_ms`).
const STATUS_NODE_TIMEOUT: Duration = Duration::from_secs(4);

/// `crm.node.stats` of the node, retried while nobody answers yet (the node subscribes its
/// stats responder around the time it logs `crm-node ready`).
pub async fn node_stats(client: &async_nats::Client) -> Result<Value> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subjects::NODE_STATS, Bytes::from_static(b"{}")),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => {
                return serde_json::from_slice(&reply.payload)
                    .context("crm.node.stats reply is not JSON")
            }
            Ok(Err(error)) if attempt < 100 => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(error)) => bail!("crm.node.stats: {error}"),
            Err(_) => bail!("no reply to crm.node.stats within 10 s"),
        }
    }
}

pub fn metric(stats: &Value, name: &str) -> u64 {
    stats["metrics"][name].as_u64().unwrap_or(0)
}

/// The node's counters that grew between two stats replies.
pub fn metrics_delta(before: &Value, after: &Value) -> Value {
    let mut delta = Map::new();
    if let Some(fields) = after["metrics"].as_object() {
        for (name, value) in fields {
            let grown = value
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(metric(before, name));
            delta.insert(name.clone(), json!(grown));
        }
    }
    Value::Object(delta)
}

/// How the node's identity-directory counters (`crm.node.stats` `identity`) grew.
pub fn identity_delta(before: &Value, after: &Value) -> Value {
    let mut delta = Map::new();
    if let Some(fields) = after["identity"].as_object() {
        for (name, value) in fields {
            let was = before["identity"][name].as_u64().unwrap_or(0);
            delta.insert(
                name.clone(),
                json!(value.as_u64().unwrap_or(0).saturating_sub(was)),
            );
        }
    }
    Value::Object(delta)
}

/// `crm.node.stats` of every node: one request, the replies of up to `expected` nodes
/// (whoever answers within 2 s).
pub async fn all_node_stats(client: &async_nats::Client, expected: usize) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies_sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    client
        .publish_with_reply(subjects::NODE_STATS, inbox, Bytes::from_static(b"{}"))
        .await
        .map_err(|e| anyhow!("crm.node.stats: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut replies = Vec::new();
    while replies.len() < expected {
        match tokio::time::timeout_at(deadline, replies_sub.next()).await {
            Ok(Some(message)) => {
                if let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
                    replies.push(value);
                }
            }
            _ => break,
        }
    }
    let _ = replies_sub.unsubscribe().await;
    if replies.is_empty() {
        bail!("no node answered crm.node.stats within 2 s");
    }
    Ok(replies)
}

/// The nodes' `metrics` and `identity` counters summed (what [`metrics_delta`] reads).
pub fn sum_stats(replies: &[Value]) -> Value {
    let sum = |section: &str| {
        let mut total = Map::new();
        for reply in replies {
            for (name, value) in reply[section].as_object().into_iter().flatten() {
                let was = total.get(name).and_then(Value::as_u64).unwrap_or(0);
                total.insert(name.clone(), json!(was + value.as_u64().unwrap_or(0)));
            }
        }
        Value::Object(total)
    };
    json!({
        "nodes": replies.iter().map(|r| r["node_id"].clone()).collect::<Vec<_>>(),
        "metrics": sum("metrics"),
        "identity": sum("identity"),
    })
}

/// Shard `shard`'s applied sequence in a `crm.node.stats` reply (0 when absent).
pub fn applied_seq(stats: &Value, shard: usize) -> u64 {
    stats["applied_seq"][shard].as_u64().unwrap_or(0)
}

/// The stored-customer count of a `crm.node.stats` reply (in `metrics`, or at the top in
/// older nodes).
pub fn stored_customers(stats: &Value) -> Option<u64> {
    stats["metrics"]["stored_customers"]
        .as_u64()
        .or_else(|| stats["stored_customers"].as_u64())
}

/// The cluster status (`crm_node::cluster::status::gather`).
pub async fn cluster_status(js: &jetstream::Context) -> Result<ClusterStatus> {
    crm_node::cluster::status::gather(js, STATUS_NODE_TIMEOUT)
        .await
        .map(|raw| ClusterStatus { raw })
        .map_err(|e| anyhow!("cluster status: {e}"))
}

/// One cluster status as read.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    raw: Value,
}

/// One shard's row of a status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardRow {
    pub shard: Option<u64>,
    /// The lease owner.
    pub owner: Option<String>,
    /// The node the assignment gives the shard to.
    pub assigned: Option<String>,
    pub applied_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// `None` while the owner's applied sequence is not known.
    pub lag: Option<u64>,
}

impl ShardRow {
    fn read(row: &Value) -> ShardRow {
        ShardRow {
            shard: row["shard"].as_u64(),
            owner: row["owner"].as_str().map(str::to_string),
            assigned: row["assigned"].as_str().map(str::to_string),
            applied_seq: row["applied_seq"].as_u64(),
            last_seq: row["last_seq"].as_u64(),
            lag: row["lag"].as_u64(),
        }
    }
}

impl ClusterStatus {
    /// Every shard's row, in the status' order.
    pub fn shards(&self) -> Vec<ShardRow> {
        self.raw["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .map(ShardRow::read)
            .collect()
    }

    /// Whether the status lists shards at all.
    fn has_shards(&self) -> bool {
        self.raw["shards"].is_array()
    }

    /// The node holding the coordinator lease.
    pub fn coordinator(&self) -> Option<&str> {
        self.raw["coordinator"].as_str()
    }

    /// The node holding the router lease.
    pub fn router(&self) -> Option<&str> {
        self.raw["router"].as_str()
    }

    /// The shards `node` holds the lease of.
    pub fn owned_by(&self, node: &str) -> Vec<u64> {
        self.shards()
            .into_iter()
            .filter(|s| s.owner.as_deref() == Some(node))
            .filter_map(|s| s.shard)
            .collect()
    }

    /// The sum of every shard's known lag.
    pub fn total_lag(&self) -> u64 {
        self.shards().iter().filter_map(|s| s.lag).sum()
    }

    /// The alive nodes and the shards each one's heartbeat says it serves.
    pub fn serving_nodes(&self) -> BTreeMap<String, HashSet<u64>> {
        self.raw["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|node| node["alive"] == true)
            .filter_map(|node| {
                let id = node["node_id"].as_str()?.to_string();
                let shards = node["shards"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .collect();
                Some((id, shards))
            })
            .collect()
    }

    /// Shards per node as the status shows them (lease owners).
    pub fn shard_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for shard in self.shards() {
            if let Some(owner) = shard.owner {
                *counts.entry(owner).or_insert(0) += 1;
            }
        }
        counts
    }

    /// What keeps a cluster of `nodes` from being settled (`None`: settled): every shard's
    /// lease held by its assigned node, which is alive and serves it (its heartbeat lists
    /// the shard) with lag 0; the shards balanced over `nodes` (counts differ by at most
    /// one); a coordinator and a router.
    pub fn unsettled(&self, nodes: &[String]) -> Option<String> {
        if !self.has_shards() {
            return None;
        }
        let serving = self.serving_nodes();
        let mut problems = Vec::new();
        if self.coordinator().is_none() {
            problems.push("no coordinator".to_string());
        }
        if self.router().is_none() {
            problems.push("no router".to_string());
        }
        let (mut unowned, mut moving, mut unserved, mut lagging) = (0, 0, 0, 0);
        let mut counts: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
        for shard in self.shards() {
            let number = shard.shard.unwrap_or(u64::MAX);
            let Some(owner) = shard.owner.as_deref() else {
                unowned += 1;
                continue;
            };
            if shard.assigned.as_deref() != Some(owner) {
                moving += 1;
            }
            if !serving.get(owner).is_some_and(|s| s.contains(&number)) {
                unserved += 1;
            }
            if shard.lag != Some(0) {
                lagging += 1;
            }
            if let Some(count) = counts.get_mut(owner) {
                *count += 1;
            }
        }
        for (what, count) in [
            ("without owner", unowned),
            ("moving", moving),
            ("not yet served", unserved),
            ("lagging", lagging),
        ] {
            if count > 0 {
                problems.push(format!("{count} shards {what}"));
            }
        }
        let (low, high) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        if high > low + 1 {
            problems.push(format!("unbalanced: {counts:?}"));
        }
        (!problems.is_empty()).then(|| problems.join(", "))
    }
}

/// How much counter `name` grew in a [`metrics_delta`].
pub fn grown(delta: &Value, name: &str) -> u64 {
    delta[name].as_u64().unwrap_or(0)
}
