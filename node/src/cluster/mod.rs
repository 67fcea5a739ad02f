//! The cluster: membership, shard leases, the coordinator's assignment, shard moves.
//!
//! All coordination state is in JetStream KV buckets; nodes never talk to each other
//! directly. Every node writes a heartbeat (`crm_nodes`) and watches the leases
//! (`crm_leases`) and the assignment (`crm_cluster` key `assignment`). One node holds the
//! coordinator lease and assigns shards to the live nodes (balanced by count, at most
//! `rebalance_max_moves` moving at once); each node then acquires the leases of the shards
//! assigned to it (compare-and-set, epoch + 1), restores the shard's snapshot when it is
//! newer than its own sled copy, and serves the shard; a node that loses a shard's
//! assignment stops its worker, snapshots the shard and releases the lease. A lease holder
//! that cannot renew stops applying `lease_margin_ms` before the lease can pass to another
//! node (see [`lease`]). One node at a time holds the router lease and routes ingest, so each
//! customer's events reach the shard log in ingest order.

pub mod assignment;
pub mod lease;
pub mod manager;
pub mod observer;
pub mod snapshot;
pub mod status;

use std::time::Duration;

/// Timings and limits of the cluster protocol (from `[cluster]`).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    pub lease_timeout: Duration,
    pub lease_margin: Duration,
    pub rebalance_max_moves: u32,
    pub snapshot_interval: Duration,
    pub snapshot_every_records: u64,
    pub snapshot_piece_bytes: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            heartbeat: Duration::from_millis(1_000),
            node_timeout: Duration::from_millis(4_000),
            lease_timeout: Duration::from_millis(5_000),
            lease_margin: Duration::from_millis(1_500),
            rebalance_max_moves: 4,
            snapshot_interval: Duration::from_secs(60),
            snapshot_every_records: 10_000,
            snapshot_piece_bytes: 512 * 1024,
        }
    }
}

/// Unix time in ms (for records operators read; never for rules).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
