//! What `crm-node status` and `crm-node drain` read and write: the cluster as the KV buckets
//! describe it (heartbeats, leases, assignment) plus each shard's lag in its log.

use super::assignment::Assignment;
use super::lease::Lease;
use super::manager::Heartbeat;
use crate::subjects;
use async_nats::jetstream::{self, kv, Context};
use futures::StreamExt;
use serde_json::{json, Value};
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

/// The cluster status as JSON (the `--json` output of `crm-node status`): `nodes`,
/// `shards`, `coordinator`, `router`, `assignment_version`.
pub async fn gather(js: &Context, node_timeout: Duration) -> Result<Value, String> {
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
    let nodes: Vec<Value> = beats
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
            json!({
                "node_id": beat.node_id,
                "alive": alive,
                "shards": beat.shards.keys().collect::<Vec<_>>(),
                "draining": beat.draining
                    || cluster.contains_key(&subjects::drain_key(&beat.node_id)),
                "coordinator": beat.coordinator,
                "router": beat.router,
                "resident_customers": beat.resident_customers,
                "stored_customers": beat.stored_customers,
                "heartbeat_age_ms": age,
                "host": beat.host,
                "load_per_s": (beat.load.values().sum::<f64>() * 10.0).round() / 10.0,
                "version": beat.version,
                "pid": beat.pid,
            })
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
            (Some(seq), _) if seq >= last => json!(0),
            (Some(seq), Some(stream)) => pending_after(stream, shard, seq).await,
            _ => Value::Null,
        };
        shards.push(json!({
            "shard": shard,
            "owner": held.as_ref().map(|l| l.owner.clone()),
            "assigned": assignment.owner(shard),
            "epoch": held.as_ref().map(|l| l.epoch).unwrap_or(0),
            "applied_seq": applied_seq,
            "last_seq": last,
            "lag": lag,
            "load_per_s": held
                .as_ref()
                .and_then(|l| loads.get(l.owner.as_str())?.get(&shard)),
        }));
    }
    Ok(json!({
        "coordinator": lease(subjects::LEASE_COORDINATOR).map(|l| l.owner),
        "router": lease(subjects::LEASE_ROUTER).map(|l| l.owner),
        "assignment_version": assignment.version,
        "nodes": nodes,
        "shards": shards,
    }))
}

/// Records of `shard`'s log after sequence `seq` (an ephemeral consumer's pending count).
async fn pending_after(stream: &jetstream::stream::Stream, shard: u32, seq: u64) -> Value {
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
    match consumer {
        Ok(mut consumer) => consumer
            .info()
            .await
            .map(|info| json!(info.num_pending))
            .unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The human table of `crm-node status`.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    out.push_str(&format!(
        "coordinator {}   router {}   assignment v{}\n\n",
        text(&status["coordinator"]),
        text(&status["router"]),
        status["assignment_version"]
    ));
    out.push_str("node        alive  shards  resident   stored   load/s  roles\n");
    for node in status["nodes"].as_array().into_iter().flatten() {
        let mut roles = Vec::new();
        for (flag, name) in [
            ("coordinator", "coordinator"),
            ("router", "router"),
            ("draining", "draining"),
        ] {
            if node[flag] == true {
                roles.push(name);
            }
        }
        out.push_str(&format!(
            "{:<11} {:<6} {:>6} {:>9} {:>8} {:>8.1}  {}\n",
            text(&node["node_id"]),
            if node["alive"] == true { "yes" } else { "no" },
            node["shards"].as_array().map(Vec::len).unwrap_or(0),
            node["resident_customers"].as_u64().unwrap_or(0),
            node["stored_customers"].as_u64().unwrap_or(0),
            node["load_per_s"].as_f64().unwrap_or(0.0),
            roles.join(",")
        ));
    }
    out.push_str("\nshard  owner       epoch   applied      lag  assigned\n");
    for shard in status["shards"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:>5}  {:<11} {:>5} {:>9} {:>8}  {}\n",
            shard["shard"].as_u64().unwrap_or(0),
            text(&shard["owner"]),
            shard["epoch"].as_u64().unwrap_or(0),
            shard["applied_seq"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or("-".into()),
            shard["lag"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or("-".into()),
            text(&shard["assigned"]),
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
