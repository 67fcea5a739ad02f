//! A cluster for the bench: a private server and nodes `node-1` .. `node-<n>` on it (each
//! with its own sled), started and stopped through [`crate::processes`]; waiting until it
//! is settled (every shard served by its assigned node, balanced) or has applied everything
//! published ([`wait_cluster_applied`], timed by the apply audit [`AuditWatch`] when it is
//! complete). Used by the cluster, failover and hand-off steps.

use crate::cluster_status::{all_node_stats, cluster_status, sum_stats, ClusterStatus, Counters};
use crate::plan::Plan;
use crate::processes::{start_nats, BenchNode, NodeSettings};
use crate::say;
use crate::traffic::connect;
use crate::waits::{
    router_backlog, shard_log_ends, Deployment, RouterTail, StallWatch, DRAIN_POLL, PROGRESS_EVERY,
};
use anyhow::{anyhow, bail, Result};
use async_nats::jetstream;
use crm_node::subjects;
use crm_testkit::multi_node::AuditRecord;
use crm_testkit::nats_server::NatsServer;
use crm_testkit::node_process::LogMark;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pause between two cluster status reads while a failover or hand-off is timed.
pub const STATUS_POLL: Duration = Duration::from_millis(100);
/// How long a cluster may take to own every shard as assigned, balanced.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a failover or hand-off may take before the run is declared failed.
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A private server and nodes `node-1` .. `node-<n>` on it, each with its own sled.
pub struct BenchCluster {
    /// Dropped first: the nodes stop before the server.
    pub nodes: Vec<BenchNode>,
    pub shards: u32,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub nats: NatsServer,
}

impl BenchCluster {
    /// A fresh server and `nodes` nodes: `node-1` first (it creates the streams and
    /// buckets), then the others at once.
    pub async fn start(
        plan: &Plan,
        label: &str,
        nodes: usize,
        shards: u32,
    ) -> Result<BenchCluster> {
        let nats = start_nats(plan, label)?;
        let client = connect(&nats.url()).await?;
        let js = jetstream::new(client.clone());
        let mut cluster = BenchCluster {
            nodes: Vec::new(),
            shards,
            client,
            js,
            nats,
        };
        cluster.add_nodes(plan, 1)?;
        cluster.add_nodes(plan, nodes.saturating_sub(1))?;
        Ok(cluster)
    }

    /// Starts `count` more nodes at once (`node-<k>` numbering on) and waits until each
    /// logged `crm-node ready`.
    pub fn add_nodes(&mut self, plan: &Plan, count: usize) -> Result<()> {
        let first = self.nodes.len();
        let url = self.nats.url();
        for index in first..first + count {
            let settings = NodeSettings {
                node_id: format!("node-{}", index + 1),
                shards: self.shards,
                resident_max_customers: None,
            };
            self.nodes.push(BenchNode::spawn(plan, &url, &settings)?);
        }
        for node in &mut self.nodes[first..] {
            node.wait_ready()?;
        }
        Ok(())
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.live().map(|n| n.node_id.clone()).collect()
    }

    pub fn live(&self) -> impl Iterator<Item = &BenchNode> {
        self.nodes.iter().filter(|n| n.is_started())
    }

    pub fn node(&self, id: &str) -> Option<&BenchNode> {
        self.nodes.iter().find(|n| n.node_id == id)
    }

    pub fn kill(&mut self, id: &str) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.node_id == id) {
            node.kill();
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus> {
        cluster_status(&self.js).await
    }

    /// Every node's marked log lines read at or after `since`, in time order, with the node.
    pub fn marks_since(&self, since: Instant) -> Vec<(String, LogMark)> {
        let mut marks: Vec<(String, LogMark)> = self
            .nodes
            .iter()
            .flat_map(|node| {
                node.marks_since(since)
                    .into_iter()
                    .map(|mark| (node.node_id.clone(), mark))
            })
            .collect();
        marks.sort_by_key(|(_, mark)| mark.at);
        marks
    }

    /// The last log lines of every live node (for error messages).
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("--- {}\n{}", node.node_id, node.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        // SIGTERM every node at once, then reap each (CrmNode's drop waits for its exit).
        for node in &self.nodes {
            node.process.begin_terminate();
        }
    }
}

impl Deployment for BenchCluster {
    fn check_alive(&mut self) -> Result<()> {
        for node in self.nodes.iter_mut() {
            node.check_alive()?;
        }
        Ok(())
    }

    fn node_pids(&self) -> Vec<u32> {
        self.live().map(BenchNode::pid).collect()
    }

    async fn stats(&self, client: &async_nats::Client) -> Result<Counters> {
        let replies = all_node_stats(client, self.live().count()).await?;
        Ok(sum_stats(&replies))
    }

    async fn wait_applied(&mut self, client: &async_nats::Client, timeout: Duration) -> Result<()> {
        let _ = client;
        wait_cluster_applied(self, None, None, timeout)
            .await
            .map(|_| ())
    }
}

/// Polls every node's `shard_commands` counter (summed) every 100 ms until it reaches
/// `target` (then returns that moment) or `stop`.
pub fn spawn_commands_watch(
    client: async_nats::Client,
    nodes: usize,
    target: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(replies) = all_node_stats(&client, nodes).await {
                if replies.len() == nodes && sum_stats(&replies).metrics.shard_commands >= target {
                    return Some(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
}

/// The apply audit (`crm.audit.<n>`, one record per applied batch, published by the owner
/// after the batch is committed and flushed) as it arrives: when each shard's applied
/// sequence reached each value, and when each (shard, node) applied its first batch.
pub struct AuditWatch {
    seen: Arc<Mutex<AuditSeen>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct AuditSeen {
    /// Per shard, each time its highest audited sequence grew: (sequence, arrival).
    reached: Vec<Vec<(u64, Instant)>>,
    /// The arrival of the first batch of each (shard, node).
    first_batch: BTreeMap<(u32, String), Instant>,
    records: u64,
}

impl AuditWatch {
    pub async fn start(client: &async_nats::Client, shards: u32) -> Result<AuditWatch> {
        let mut subscription = client
            .subscribe(subjects::AUDIT_ALL)
            .await
            .map_err(|e| anyhow!("subscribe {}: {e}", subjects::AUDIT_ALL))?;
        client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
        let seen = Arc::new(Mutex::new(AuditSeen {
            reached: vec![Vec::new(); shards as usize],
            ..AuditSeen::default()
        }));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(message) = subscription.next().await {
                    let at = Instant::now();
                    let Ok(record) = serde_json::from_slice::<AuditRecord>(&message.payload) else {
                        continue;
                    };
                    let (shard, last, node) = (record.shard, record.last_seq, record.node);
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.records += 1;
                    seen.first_batch.entry((shard, node)).or_insert(at);
                    if let Some(list) = seen.reached.get_mut(shard as usize) {
                        if list.last().is_none_or(|(top, _)| last > *top) {
                            list.push((last, at));
                        }
                    }
                }
            })
        };
        Ok(AuditWatch { seen, task })
    }

    /// When the audit first showed `shard` applied up to `seq` or beyond.
    pub fn reached(&self, shard: u32, seq: u64) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let list = seen.reached.get(shard as usize)?;
        let index = list.partition_point(|(s, _)| *s < seq);
        list.get(index).map(|(_, at)| *at)
    }

    /// The highest sequence audited for `shard`.
    pub fn top(&self, shard: u32) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.reached
            .get(shard as usize)
            .and_then(|l| l.last())
            .map(|(s, _)| *s)
            .unwrap_or(0)
    }

    /// When `node` applied its first batch of `shard`.
    pub fn first_batch(&self, shard: u32, node: &str) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.first_batch.get(&(shard, node.to_string())).copied()
    }

    pub fn records(&self) -> u64 {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).records
    }
}

impl Drop for AuditWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the cluster of `nodes` is settled (see [`unsettled`]); returns the status
/// and how long it took.
pub async fn wait_settled(
    cluster: &mut BenchCluster,
    nodes: &[String],
    timeout: Duration,
) -> Result<(ClusterStatus, f64)> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        cluster.check_alive()?;
        let problem = match cluster.status().await {
            Ok(status) => match status.unsettled(nodes) {
                None => return Ok((status, started.elapsed().as_secs_f64())),
                Some(what) => what,
            },
            Err(error) => format!("{error:#}"),
        };
        if started.elapsed() >= timeout {
            bail!(
                "the cluster of {} did not settle within {timeout:?}: {problem}",
                nodes.join(", ")
            );
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            say(format!("    waiting for the cluster to settle: {problem}"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// When a cluster had applied everything published so far.
pub struct ClusterApplied {
    /// The router had nothing pending or unacked.
    pub routed_at: Instant,
    /// The apply audit showed every shard at its last record, and the router had drained
    /// (the status' moment when the audit is not complete).
    pub applied_at: Instant,
    /// The status confirmed it: every shard served by its assigned owner with lag 0.
    pub confirmed_at: Instant,
    /// Whether `applied_at` comes from the audit.
    pub audit_complete: bool,
    pub status: ClusterStatus,
}

/// Waits until a cluster has applied everything published so far: the router's durable
/// consumer has nothing pending or unacked (the shard logs are then complete), then, with
/// an audit watch, until every shard whose log grew past `base` has an audit record at
/// its last sequence (the later of the two is the precise moment it had applied
/// everything), and in any case until the status shows every
/// shard served by its assigned owner with lag 0 (the status lags the truth by up to a
/// heartbeat interval: it reads the applied sequences of the nodes' heartbeats).
pub async fn wait_cluster_applied(
    cluster: &mut BenchCluster,
    audit: Option<&AuditWatch>,
    base: Option<&[u64]>,
    timeout: Duration,
) -> Result<ClusterApplied> {
    let deadline = Instant::now() + timeout;
    let js = cluster.js.clone();
    let mut last_report = Instant::now();
    let mut stall = StallWatch::for_router();
    let mut tail = RouterTail::default();
    let routed_at = loop {
        cluster.check_alive()?;
        let backlog = router_backlog(&js).await;
        let (pending, unacked) = backlog.unwrap_or((u64::MAX, u64::MAX));
        stall.observe((pending, unacked, 0), "router consumer")?;
        if backlog == Some((0, 0)) {
            break Instant::now();
        }
        tail.observe(pending, unacked);
        if last_report.elapsed() >= PROGRESS_EVERY {
            match backlog {
                Some(_) => say(format!(
                    "    waiting for the router: {pending} pending, {unacked} unacked"
                )),
                None => say("    waiting for the router's consumer to exist"),
            }
            last_report = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!("router not drained within {timeout:?}: {pending} pending, {unacked} unacked");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let mut applied_at = None;
    if let Some(audit) = audit {
        let last = shard_log_ends(&js, cluster.shards).await?;
        let mut stall = StallWatch::new();
        loop {
            cluster.check_alive()?;
            let waiting: Vec<u32> = (0..cluster.shards)
                .filter(|&s| {
                    let grew = last[s as usize] > base.map_or(0, |b| b[s as usize]);
                    grew && audit.reached(s, last[s as usize]).is_none()
                })
                .collect();
            if waiting.is_empty() {
                // Never before the router drained: "applied everything" includes the
                // router's acks (as the single-node wait does).
                applied_at = (0..cluster.shards)
                    .filter_map(|s| audit.reached(s, last[s as usize]))
                    .max()
                    .map(|at| at.max(routed_at))
                    .or(Some(routed_at));
                break;
            }
            let audited: u64 = waiting.iter().map(|&s| audit.top(s)).sum();
            let stalled = stall.observe(
                (waiting.len() as u64, audited, 0),
                &format!("{} shards not audited at their last record", waiting.len()),
            );
            if stalled.is_err() || Instant::now() >= deadline {
                // Audit records are core NATS messages: a lost one must not hang the wait;
                // the status below decides, and its moment is used.
                say(format!(
                    "    the apply audit misses {} shards (e.g. shard {}); timing by the status",
                    waiting.len(),
                    waiting[0]
                ));
                break;
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                say(format!(
                    "    waiting for {} shards to apply their last record",
                    waiting.len()
                ));
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let nodes = cluster.node_ids();
    let mut stall = StallWatch::new();
    loop {
        cluster.check_alive()?;
        let status = cluster.status().await?;
        let problem = status.unsettled(&nodes);
        match problem {
            None => {
                let confirmed_at = Instant::now();
                return Ok(ClusterApplied {
                    routed_at,
                    applied_at: applied_at.unwrap_or(confirmed_at),
                    confirmed_at,
                    audit_complete: applied_at.is_some(),
                    status,
                });
            }
            Some(problem) => {
                let lag = status.total_lag();
                stall.observe((lag, 0, 0), &format!("status: {problem}"))?;
                if Instant::now() >= deadline {
                    bail!("the cluster did not apply everything within {timeout:?}: {problem}");
                }
                if last_report.elapsed() >= PROGRESS_EVERY {
                    say(format!("    waiting for the status: {problem}"));
                    last_report = Instant::now();
                }
            }
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}
