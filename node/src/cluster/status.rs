//! What `crm-node status` and `crm-node drain` read and write: the cluster as the KV buckets
//! describe it (heartbeats, leases, assignment) plus each shard's lag in its log.
//!
//! [`ClusterStatus`] is the contract of `crm-node status --json`: its field names are the
//! JSON keys, so the table ([`render`]) and any reader use the same names. Only reads the
//! buckets and the shard stream, except [`request_drain`], which writes a drain request.

use super::assignment::Assignment;
use super::lease::Lease;
use super::manager::Heartbeat;
use crate::subjects;
use async_nats::jetstream::{self, kv, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest wait for a bucket's key listing.
const BUCKET_LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads every key of a bucket (last values); an absent bucket reads as empty.
async fn read_bucket(js: &Context, bucket: &str) -> Result<BTreeMap<String, bytes::Bytes>, String> {
    let Ok(store) = js.get_key_value(bucket).await else {
        return Ok(BTreeMap::new());
    };
    let mut values = BTreeMap::new();
    let keys: Vec<String> = match crate::jetstream::create_with_retries(3, || store.keys()).await {
        // Bounded: a key listing that never reports its end (seen once under load, in a
        // test whose status reads then hung for good) is an error the caller can retry.
        Ok(keys) => tokio::time::timeout(
            BUCKET_LIST_TIMEOUT,
            keys.filter_map(|k| async move { k.ok() }).collect(),
        )
        .await
        .map_err(|_| {
            format!(
                "cannot list bucket {bucket}: no end of the key list after {BUCKET_LIST_TIMEOUT:?}"
            )
        })?,
        Err(error) => return Err(format!("cannot list bucket {bucket}: {error}")),
    };
    for key in keys {
        if let Ok(Some(value)) = store.get(&key).await {
            values.insert(key, value);
        }
    }
    Ok(values)
}

/// The cluster status: what `crm-node status --json` prints (one JSON object) and what its
/// table is drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClusterStatus {
    /// Holder of the coordinator lease (`null`: nobody).
    pub coordinator: Option<String>,
    /// Holder of the router lease (`null`: nobody).
    pub router: Option<String>,
    /// Version of the coordinator's shard assignment (0: none yet).
    pub assignment_version: u64,
    /// Every node with a heartbeat in `crm_nodes`, alive or not.
    pub nodes: Vec<NodeStatus>,
    /// Every shard of the cluster, in order.
    pub shards: Vec<ShardStatus>,
}

/// One node as its last heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeStatus {
    pub node_id: String,
    /// Whether its last heartbeat is younger than the node timeout.
    pub alive: bool,
    /// The shards it serves.
    pub shards: Vec<u32>,
    /// Whether it is being drained (it says so, or a drain request names it).
    pub draining: bool,
    /// Whether it holds the coordinator lease.
    pub coordinator: bool,
    /// Whether it holds the router lease.
    pub router: bool,
    /// Customers held in memory.
    pub resident_customers: u64,
    /// Customers in its sled store.
    pub stored_customers: u64,
    /// Age of its last heartbeat, in ms (negative: its clock is ahead).
    pub heartbeat_age_ms: i64,
    /// The machine it runs on.
    pub host: String,
    /// Shard commands applied per second, over its shards (one decimal).
    pub load_per_s: f64,
    /// Its `crm-node` version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
}

/// One shard: who holds it, who should, and how far behind its log it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ShardStatus {
    pub shard: u32,
    /// Holder of the shard lease (`null`: nobody serves it now).
    pub owner: Option<String>,
    /// The node the assignment gives it to.
    pub assigned: Option<String>,
    /// Epoch of the shard lease (0 when nobody holds it).
    pub epoch: u64,
    /// Last shard-log sequence its owner applied (`null`: no alive node reports it).
    pub applied_seq: Option<u64>,
    /// Last sequence in its log (0: empty).
    pub last_seq: u64,
    /// Records in its log after `applied_seq` (`null`: unknown).
    pub lag: Option<u64>,
    /// Commands applied per second on its owner (`null`: not measured).
    pub load_per_s: Option<f64>,
}

/// The cluster status as the KV buckets describe it, with each shard's lag in its log.
pub async fn read(js: &Context, node_timeout: Duration) -> Result<ClusterStatus, String> {
    let now = super::wall_ms();
    let nodes_kv = read_bucket(js, subjects::KV_NODES).await?;
    let leases = read_bucket(js, subjects::KV_LEASES).await?;
    let cluster = read_bucket(js, subjects::KV_CLUSTER).await?;
    let shard_count: u32 = cluster
        .get(subjects::CLUSTER_KEY_SHARD_COUNT)
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .ok_or("no cluster found (no shard count in KV crm_cluster): has a node ever started on this NATS?")?;
    let assignment: Assignment = cluster
        .get(subjects::CLUSTER_KEY_ASSIGNMENT)
        .and_then(|v| serde_json::from_slice(v).ok())
        .unwrap_or_default();
    let lease = |key: &str| -> Option<Lease> {
        leases
            .get(key)
            .and_then(|v| serde_json::from_slice::<Lease>(v).ok())
            .filter(|l| !l.owner.is_empty())
    };
    let beats: Vec<Heartbeat> = nodes_kv
        .values()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .collect();
    let mut applied: BTreeMap<u32, u64> = BTreeMap::new();
    // Each alive node's measured shard loads; a shard's is its lease owner's.
    let mut loads: BTreeMap<&str, &BTreeMap<u32, f64>> = BTreeMap::new();
    let nodes: Vec<NodeStatus> = beats
        .iter()
        .map(|beat| {
            let age = now - beat.at_ms;
            let alive = age >= -1_000 && age < node_timeout.as_millis() as i64;
            if alive {
                for (shard, seq) in &beat.shards {
                    applied.insert(*shard, *seq);
                }
                loads.insert(beat.node_id.as_str(), &beat.load);
            }
            NodeStatus {
                node_id: beat.node_id.clone(),
                alive,
                shards: beat.shards.keys().copied().collect(),
                draining: beat.draining
                    || cluster.contains_key(&subjects::drain_key(&beat.node_id)),
                coordinator: beat.coordinator,
                router: beat.router,
                resident_customers: beat.resident_customers,
                stored_customers: beat.stored_customers,
                heartbeat_age_ms: age,
                host: beat.host.clone(),
                load_per_s: node_load(&beat.load),
                version: beat.version.clone(),
                pid: beat.pid,
            }
        })
        .collect();
    let stream = js.get_stream(subjects::SHARDS_STREAM).await.ok();
    let mut shards = Vec::with_capacity(shard_count as usize);
    for shard in 0..shard_count {
        let held = lease(&subjects::shard_key(shard));
        let last = match &stream {
            Some(stream) => stream
                .get_last_raw_message_by_subject(&subjects::shard(shard))
                .await
                .map(|m| m.sequence)
                .unwrap_or(0),
            None => 0,
        };
        let applied_seq = applied.get(&shard).copied();
        let lag = match (applied_seq, &stream) {
            (Some(seq), _) if seq >= last => Some(0),
            (Some(seq), Some(stream)) => pending_after(stream, shard, seq).await,
            _ => None,
        };
        shards.push(ShardStatus {
            shard,
            owner: held.as_ref().map(|l| l.owner.clone()),
            assigned: assignment.owner(shard).map(str::to_string),
            epoch: held.as_ref().map(|l| l.epoch).unwrap_or(0),
            applied_seq,
            last_seq: last,
            lag,
            load_per_s: held
                .as_ref()
                .and_then(|l| loads.get(l.owner.as_str())?.get(&shard))
                .copied(),
        });
    }
    Ok(ClusterStatus {
        coordinator: lease(subjects::LEASE_COORDINATOR).map(|l| l.owner),
        router: lease(subjects::LEASE_ROUTER).map(|l| l.owner),
        assignment_version: assignment.version,
        nodes,
        shards,
    })
}

/// Records of `shard`'s log after sequence `seq` (an ephemeral consumer's pending count).
async fn pending_after(stream: &jetstream::stream::Stream, shard: u32, seq: u64) -> Option<u64> {
    let consumer = crate::jetstream::create_with_retries(2, || {
        stream.create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::shard(shard),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            ..Default::default()
        })
    })
    .await;
    let mut consumer = consumer.ok()?;
    consumer.info().await.ok().map(|info| info.num_pending)
}

/// The human table of `crm-node status`.
pub fn render(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let text = |v: &Option<String>| v.as_deref().unwrap_or("-").to_string();
    let number = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or("-".into());
    out.push_str(&format!(
        "coordinator {}   router {}   assignment v{}\n\n",
        text(&status.coordinator),
        text(&status.router),
        status.assignment_version
    ));
    out.push_str("node        alive  shards  resident   stored   load/s  roles\n");
    for node in &status.nodes {
        let roles: Vec<&str> = [
            (node.coordinator, "coordinator"),
            (node.router, "router"),
            (node.draining, "draining"),
        ]
        .into_iter()
        .filter_map(|(flag, name)| flag.then_some(name))
        .collect();
        out.push_str(&format!(
            "{:<11} {:<6} {:>6} {:>9} {:>8} {:>8.1}  {}\n",
            node.node_id,
            if node.alive { "yes" } else { "no" },
            node.shards.len(),
            node.resident_customers,
            node.stored_customers,
            node.load_per_s,
            roles.join(",")
        ));
    }
    out.push_str("\nshard  owner       epoch   applied      lag  assigned\n");
    for shard in &status.shards {
        out.push_str(&format!(
            "{:>5}  {:<11} {:>5} {:>9} {:>8}  {}\n",
            shard.shard,
            text(&shard.owner),
            shard.epoch,
            number(shard.applied_seq),
            number(shard.lag),
            text(&shard.assigned),
        ));
    }
    out
}

/// Asks the coordinator to move every shard off `node_id` (or, with `cancel`, lets the node
/// take shards again).
pub async fn request_drain(js: &Context, node_id: &str, cancel: bool) -> Result<(), String> {
    let store: kv::Store = js
        .get_key_value(subjects::KV_CLUSTER)
        .await
        .map_err(|e| format!("no cluster found (KV {}): {e}", subjects::KV_CLUSTER))?;
    let key = subjects::drain_key(node_id);
    if cancel {
        store.delete(&key).await.map_err(|e| e.to_string())
    } else {
        let value = json!({"node_id": node_id, "at_ms": super::wall_ms()}).to_string();
        store
            .put(&key, value.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Whether `node_id` holds nothing any more: no shard lease, not coordinator, not router.
pub async fn drained(js: &Context, node_id: &str) -> Result<bool, String> {
    let leases = read_bucket(js, subjects::KV_LEASES).await?;
    let holds = leases
        .values()
        .any(|v| serde_json::from_slice::<Lease>(v).is_ok_and(|l| l.owner == node_id));
    Ok(!holds)
}

/// A node's load: the sum of its measured shards' loads, to one decimal.
fn node_load(loads: &BTreeMap<u32, f64>) -> f64 {
    // A fold from +0.0: `sum` of no f64 is -0.0, which printed "-0.0" for an idle node.
    let total = loads.values().fold(0.0, |total, load| total + load);
    (total * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_node_has_a_load_of_plus_zero() {
        let idle = node_load(&BTreeMap::new());
        assert!(idle == 0.0 && idle.is_sign_positive(), "{idle}");
        let busy = node_load(&BTreeMap::from([(0, 1.25), (3, 2.0)]));
        assert_eq!(busy, 3.3);
    }

    fn sample() -> ClusterStatus {
        ClusterStatus {
            coordinator: Some("node-1".into()),
            router: None,
            assignment_version: 3,
            nodes: vec![NodeStatus {
                node_id: "node-1".into(),
                alive: true,
                shards: vec![0, 1],
                draining: false,
                coordinator: true,
                router: false,
                resident_customers: 10,
                stored_customers: 12,
                heartbeat_age_ms: 250,
                host: "h1".into(),
                load_per_s: 1.5,
                version: "0.1.0".into(),
                pid: 42,
            }],
            shards: vec![
                ShardStatus {
                    shard: 0,
                    owner: Some("node-1".into()),
                    assigned: Some("node-1".into()),
                    epoch: 2,
                    applied_seq: Some(7),
                    last_seq: 9,
                    lag: Some(2),
                    load_per_s: Some(0.5),
                },
                ShardStatus {
                    shard: 1,
                    owner: None,
                    assigned: None,
                    epoch: 0,
                    applied_seq: None,
                    last_seq: 0,
                    lag: None,
                    load_per_s: None,
                },
            ],
        }
    }

    #[test]
    fn the_json_keeps_its_documented_keys() {
        let expected = json!({
            "coordinator": "node-1",
            "router": null,
            "assignment_version": 3,
            "nodes": [{
                "node_id": "node-1", "alive": true, "shards": [0, 1], "draining": false,
                "coordinator": true, "router": false, "resident_customers": 10,
                "stored_customers": 12, "heartbeat_age_ms": 250, "host": "h1",
                "load_per_s": 1.5, "version": "0.1.0", "pid": 42,
            }],
            "shards": [
                {"shard": 0, "owner": "node-1", "assigned": "node-1", "epoch": 2,
                 "applied_seq": 7, "last_seq": 9, "lag": 2, "load_per_s": 0.5},
                {"shard": 1, "owner": null, "assigned": null, "epoch": 0,
                 "applied_seq": null, "last_seq": 0, "lag": null, "load_per_s": null},
            ],
        });
        let value = serde_json::to_value(sample()).expect("serialisable");
        assert_eq!(value, expected);
        let back: ClusterStatus = serde_json::from_value(value).expect("reads back");
        assert_eq!(back, sample());
    }

    #[test]
    fn the_table_shows_every_node_and_shard() {
        let table = render(&sample());
        assert!(table.starts_with("coordinator node-1   router -   assignment v3\n"));
        assert!(
            table.contains("node-1      yes         2        10       12      1.5  coordinator\n"),
            "{table}"
        );
        assert!(
            table.contains("    0  node-1          2         7        2  node-1\n"),
            "{table}"
        );
        assert!(
            table.contains("    1  -               0         -        -  -\n"),
            "{table}"
        );
    }
}
