//! Every read of the nodes' replies, in one place: `crm.node.stats` (the typed
//! [`NodeStats`]: counters, applied sequences) and the cluster status
//! (`crm_node::cluster::status::read`, the typed contract `crm-node status --json` prints).
//! Callers get typed fields ([`ClusterStatus`] over the node's `ShardStatus` rows,
//! [`Counters`]), never a key to spell.

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use crm_node::cluster::status::{self, ShardStatus};
use crm_node::ingest::identity_directory::DirectoryMetrics;
pub use crm_node::metrics::{MetricsSnapshot, NodeStats};
use crm_node::subjects;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// The node timeout of `crm-node status` (the default `node_timeout_ms`).
const STATUS_NODE_TIMEOUT: Duration = Duration::from_secs(4);

/// `crm.node.stats` of the node, retried while nobody answers yet (the node subscribes its
/// stats responder around the time it logs `crm-node ready`).
pub async fn node_stats(client: &async_nats::Client) -> Result<NodeStats> {
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
                    .context("crm.node.stats reply is not a NodeStats")
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

/// A node's counters, or several nodes' summed: what the steps compare before and after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Counters {
    pub metrics: MetricsSnapshot,
    pub identity: DirectoryMetrics,
}

impl From<NodeStats> for Counters {
    fn from(stats: NodeStats) -> Counters {
        Counters {
            metrics: stats.metrics,
            identity: stats.identity,
        }
    }
}

/// `$ty` with every field `$field` set to `$op(a.$field, b.$field)`: the field list is
/// checked by the compiler (a counter added to the node and not here fails to build).
macro_rules! each_counter {
    ($ty:ident, $a:expr, $b:expr, $op:expr, [$($field:ident),* $(,)?]) => {
        $ty { $($field: $op($a.$field, $b.$field)),* }
    };
}

/// `a` and `b` combined counter by counter with `op`.
fn combine_metrics(
    a: &MetricsSnapshot,
    b: &MetricsSnapshot,
    op: fn(u64, u64) -> u64,
) -> MetricsSnapshot {
    each_counter!(
        MetricsSnapshot,
        a,
        b,
        op,
        [
            ingest_received,
            ingest_routed,
            dead_lettered,
            shard_batches,
            shard_messages,
            shard_commands,
            applied,
            duplicates,
            rejected,
            replay_skipped,
            actor_events_published,
            queries,
            redeems,
            ticks_appended,
            stored_customers,
            transfers_published,
            merges_applied,
            held_released,
        ]
    )
}

/// `a` and `b` combined counter by counter with `op`.
fn combine_identity(
    a: &DirectoryMetrics,
    b: &DirectoryMetrics,
    op: fn(u64, u64) -> u64,
) -> DirectoryMetrics {
    each_counter!(
        DirectoryMetrics,
        a,
        b,
        op,
        [
            cache_hits,
            cache_misses,
            creates,
            links,
            conflicts,
            kv_retries,
            kv_reads,
            created_first,
            read_ahead,
            read_ahead_used,
            merges,
            merges_refused,
            identifiers_refused,
            record_writes,
        ]
    )
}

/// How much each node counter grew between two stats replies (0 where it did not).
pub fn metrics_delta(before: &MetricsSnapshot, after: &MetricsSnapshot) -> MetricsSnapshot {
    combine_metrics(after, before, u64::saturating_sub)
}

/// How the node's identity-directory counters (`crm.node.stats` `identity`) grew.
pub fn identity_delta(before: &DirectoryMetrics, after: &DirectoryMetrics) -> DirectoryMetrics {
    combine_identity(after, before, u64::saturating_sub)
}

/// `crm.node.stats` of every node: one request, the replies of up to `expected` nodes
/// (whoever answers within 2 s).
pub async fn all_node_stats(
    client: &async_nats::Client,
    expected: usize,
) -> Result<Vec<NodeStats>> {
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
                if let Ok(stats) = serde_json::from_slice::<NodeStats>(&message.payload) {
                    replies.push(stats);
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

/// The nodes' `metrics` and `identity` counters summed.
pub fn sum_stats(replies: &[NodeStats]) -> Counters {
    replies
        .iter()
        .fold(Counters::default(), |total, reply| Counters {
            metrics: combine_metrics(&total.metrics, &reply.metrics, u64::saturating_add),
            identity: combine_identity(&total.identity, &reply.identity, u64::saturating_add),
        })
}

/// The cluster status (`crm_node::cluster::status::read`).
pub async fn cluster_status(js: &jetstream::Context) -> Result<ClusterStatus> {
    status::read(js, STATUS_NODE_TIMEOUT)
        .await
        .map(|status| ClusterStatus { status })
        .map_err(|e| anyhow!("cluster status: {e}"))
}

/// One cluster status as read.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    status: status::ClusterStatus,
}

impl ClusterStatus {
    /// Every shard's row, in the status' order.
    pub fn shards(&self) -> &[ShardStatus] {
        &self.status.shards
    }

    /// The node holding the coordinator lease.
    pub fn coordinator(&self) -> Option<&str> {
        self.status.coordinator.as_deref()
    }

    /// The node holding the router lease.
    pub fn router(&self) -> Option<&str> {
        self.status.router.as_deref()
    }

    /// The shards `node` holds the lease of.
    pub fn owned_by(&self, node: &str) -> Vec<u32> {
        self.shards()
            .iter()
            .filter(|s| s.owner.as_deref() == Some(node))
            .map(|s| s.shard)
            .collect()
    }

    /// The sum of every shard's known lag.
    pub fn total_lag(&self) -> u64 {
        self.shards().iter().filter_map(|s| s.lag).sum()
    }

    /// The alive nodes and the shards each one's heartbeat says it serves.
    pub fn serving_nodes(&self) -> BTreeMap<String, HashSet<u32>> {
        self.status
            .nodes
            .iter()
            .filter(|node| node.alive)
            .map(|node| (node.node_id.clone(), node.shards.iter().copied().collect()))
            .collect()
    }

    /// Shards per node as the status shows them (lease owners).
    pub fn shard_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for shard in self.shards() {
            if let Some(owner) = &shard.owner {
                *counts.entry(owner.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// What keeps a cluster of `nodes` from being settled (`None`: settled): every shard's
    /// lease held by its assigned node, which is alive and serves it (its heartbeat lists
    /// the shard) with lag 0; the shards balanced over `nodes` (counts differ by at most
    /// one); a coordinator and a router.
    pub fn unsettled(&self, nodes: &[String]) -> Option<String> {
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
            let Some(owner) = shard.owner.as_deref() else {
                unowned += 1;
                continue;
            };
            if shard.assigned.as_deref() != Some(owner) {
                moving += 1;
            }
            if !serving.get(owner).is_some_and(|s| s.contains(&shard.shard)) {
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
