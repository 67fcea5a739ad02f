//! Node counters: what the router and shard workers did, readable by `crm-node stats`.
//!
//! Plain atomics, bumped on the hot path with relaxed ordering, snapshotted as JSON by the
//! stats responder. Counts only; no rule logic here. [`NodeStats`] is the contract of the
//! `crm.node.stats` reply (docs/protocol.md "Node counters"): the snapshot, the identity
//! directory's counters and each shard's applied sequence.

use crate::ingest::identity_directory::DirectoryMetrics;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one node process since it started.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ingest_received: AtomicU64,
    pub ingest_routed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub shard_batches: AtomicU64,
    pub shard_messages: AtomicU64,
    /// Customer commands the shard workers processed (a routed record holds many).
    pub shard_commands: AtomicU64,
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub replay_skipped: AtomicU64,
    pub actor_events_published: AtomicU64,
    pub queries: AtomicU64,
    pub redeems: AtomicU64,
    pub ticks_appended: AtomicU64,
    /// Customers stored on this node: counted at start, then one per `customer.created`.
    pub stored_customers: AtomicU64,
    /// Merge transfers (a merged customer's state) appended to a survivor's shard log as a
    /// `MergeIn` and acked.
    pub transfers_published: AtomicU64,
    /// `MergeIn`s merged into their survivor (not counting those forwarded by a tombstone).
    pub merges_applied: AtomicU64,
    /// Channel events a survivor held back during a merge, applied when it completed.
    pub held_released: AtomicU64,
}

/// A point-in-time copy of [`Metrics`], as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct MetricsSnapshot {
    pub ingest_received: u64,
    pub ingest_routed: u64,
    pub dead_lettered: u64,
    pub shard_batches: u64,
    pub shard_messages: u64,
    pub shard_commands: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub replay_skipped: u64,
    pub actor_events_published: u64,
    pub queries: u64,
    pub redeems: u64,
    pub ticks_appended: u64,
    pub stored_customers: u64,
    pub transfers_published: u64,
    pub merges_applied: u64,
    pub held_released: u64,
}

/// The reply to `crm.node.stats`: one node's counters since its process started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct NodeStats {
    pub node_id: String,
    /// Per shard, the last shard-log sequence this node applied (0 where it does not serve
    /// the shard).
    pub applied_seq: Vec<u64>,
    /// The node's counters.
    pub metrics: MetricsSnapshot,
    /// The counters of the router's identity directory on this node.
    pub identity: DirectoryMetrics,
}

impl NodeStats {
    /// Shard `shard`'s applied sequence (0 when the reply does not list it).
    pub fn applied_seq(&self, shard: usize) -> u64 {
        self.applied_seq.get(shard).copied().unwrap_or(0)
    }
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            ingest_received: get(&self.ingest_received),
            ingest_routed: get(&self.ingest_routed),
            dead_lettered: get(&self.dead_lettered),
            shard_batches: get(&self.shard_batches),
            shard_messages: get(&self.shard_messages),
            shard_commands: get(&self.shard_commands),
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            rejected: get(&self.rejected),
            replay_skipped: get(&self.replay_skipped),
            actor_events_published: get(&self.actor_events_published),
            queries: get(&self.queries),
            redeems: get(&self.redeems),
            ticks_appended: get(&self.ticks_appended),
            stored_customers: get(&self.stored_customers),
            transfers_published: get(&self.transfers_published),
            merges_applied: get(&self.merges_applied),
            held_released: get(&self.held_released),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::identity_directory::DirectoryMetrics;

    /// Every counter of `crm.node.stats` has a row in docs/protocol.md's tables.
    #[test]
    fn every_counter_is_documented() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
        let text = std::fs::read_to_string(&docs).expect("docs/protocol.md exists");
        let section = text
            .split("## Node counters")
            .nth(1)
            .expect("docs/protocol.md has a Node counters section");
        let metrics = serde_json::to_value(MetricsSnapshot::default()).expect("serialises");
        let identity = serde_json::to_value(DirectoryMetrics::default()).expect("serialises");
        let names = metrics
            .as_object()
            .into_iter()
            .chain(identity.as_object())
            .flat_map(|fields| fields.keys());
        let mut count = 0;
        for name in names {
            count += 1;
            assert!(
                section.contains(&format!("| `{name}` |")),
                "docs/protocol.md lacks a row for the counter `{name}`"
            );
        }
        assert!(count >= 25, "only {count} counters found");
    }

    /// The reply keeps the keys of docs/protocol.md (`node_id`, `applied_seq`, `metrics`,
    /// `identity`) and reads back.
    #[test]
    fn the_stats_reply_keeps_its_keys() {
        let stats = NodeStats {
            node_id: "node-1".into(),
            applied_seq: vec![1042, 0],
            metrics: MetricsSnapshot {
                applied: 7,
                ..MetricsSnapshot::default()
            },
            identity: DirectoryMetrics {
                creates: 3,
                ..DirectoryMetrics::default()
            },
        };
        let value = serde_json::to_value(&stats).expect("serialises");
        let keys: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["applied_seq", "identity", "metrics", "node_id"]);
        assert_eq!(value["applied_seq"], serde_json::json!([1042, 0]));
        assert_eq!(value["metrics"]["applied"], 7);
        assert_eq!(value["identity"]["creates"], 3);
        let back: NodeStats = serde_json::from_value(value).expect("reads back");
        assert_eq!(back, stats);
        assert_eq!(back.applied_seq(1), 0);
        assert_eq!(back.applied_seq(5), 0);
        let schema = serde_json::to_string(&schemars::schema_for!(NodeStats)).expect("schema");
        assert!(schema.contains("read_ahead_used"));
    }
}
