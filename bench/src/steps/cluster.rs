//! Step 5, `cluster`: for each size of `--cluster-nodes`, a fresh server and that many
//! nodes (every shard owned by its assigned node, balanced): the throughput traffic until
//! the cluster has applied it (router drained, every shard's last record in the apply
//! audit, confirmed by the status), then the latency run at one fixed rate for every size
//! (half the first size's rate by the nodes' counters, unless given).

use crate::bench_cluster::{
    spawn_commands_watch, wait_cluster_applied, wait_settled, AuditWatch, BenchCluster,
    SETTLE_TIMEOUT,
};
use crate::cluster_status::{identity_delta, metrics_delta, MetricsSnapshot};
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::{round, seconds_between};
use crate::plan::Plan;
use crate::processes::nats_pid;
use crate::report::{BySize, Report};
use crate::say;
use crate::steps::latency::{latency, LatencyDetails};
use crate::traffic::{generated_traffic, publish_bounded, AbortOnDrop, Outgoing};
use crate::waits::{shard_log_ends, Deployment};
use anyhow::{bail, Context as _, Result};
use crm_node::ingest::identity_directory::DirectoryMetrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What one cluster size measured.
struct ClusterSize {
    events_per_s: f64,
    /// Every event applied once, by the nodes' counters.
    events_per_s_by_counters: Option<f64>,
    /// Publish -> `points.earned`, ms.
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    details: ClusterSizeDetails,
}

/// One cluster size's details (`cluster.<size>` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClusterSizeDetails {
    pub nodes: usize,
    pub shards: u32,
    pub settle_s: f64,
    pub coordinator: Option<String>,
    pub router: Option<String>,
    pub events_per_s: f64,
    pub throughput: ClusterThroughput,
    pub latency: LatencyDetails,
    /// Warnings and errors the nodes logged (`node: line`).
    pub node_warnings: Vec<String>,
}

/// The throughput half of a cluster size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClusterThroughput {
    pub events: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub publish_done_s: f64,
    pub routed_done_s: f64,
    pub applied_done_s: f64,
    /// Where `applied_done_s` comes from.
    pub applied_timing: AppliedTiming,
    pub status_confirmed_s: f64,
    /// When every event had been applied once, by the nodes' counters.
    pub commands_applied_s: Option<f64>,
    pub events_per_s_by_counters: Option<f64>,
    pub audit_records: u64,
    pub duplicates_acked: u64,
    /// How much each node counter grew, summed over the nodes.
    pub node_counters: MetricsSnapshot,
    pub identity_counters: DirectoryMetrics,
    pub mean_shard_batch_messages: f64,
    pub cpu_while_publishing: CpuUse,
    pub cpu_total: CpuUse,
    /// Shards per node (lease owners) once applied.
    pub shards_per_node: BTreeMap<String, usize>,
}

/// How the cluster's apply moment was timed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum AppliedTiming {
    /// Every shard's last record seen in the apply audit.
    #[serde(rename = "apply audit")]
    ApplyAudit,
    /// The audit was incomplete: the status confirmed it.
    #[serde(rename = "status")]
    #[default]
    Status,
}

pub async fn cluster_scaling(plan: &Plan, report: &mut Report) {
    say(format!(
        "generating {} events of sample traffic for the cluster runs",
        plan.cluster_events
    ));
    let (traffic, _) = generated_traffic(plan.cluster_events, plan.seed);
    let mut rate = plan.cluster_latency_rate;
    let (mut per_s, mut by_counters, mut p50, mut p99): (BySize, BySize, BySize, BySize) =
        Default::default();
    let mut details = BTreeMap::new();
    for &nodes in &plan.cluster_nodes {
        say(format!(
            "step 5/8: cluster of {nodes} node(s), {} shards: {} events, then latency",
            plan.shards,
            traffic.len()
        ));
        match cluster_size(plan, nodes, traffic.clone(), &mut rate).await {
            Ok(result) => {
                let key = nodes.to_string();
                per_s.insert(key.clone(), Some(result.events_per_s));
                by_counters.insert(key.clone(), result.events_per_s_by_counters);
                p50.insert(key.clone(), result.latency_p50_ms);
                p99.insert(key.clone(), result.latency_p99_ms);
                details.insert(key, result.details);
            }
            Err(error) => report.fail(&format!("cluster_{nodes}"), error),
        }
    }
    let results = &mut report.results;
    results.cluster_events_per_s = Some(per_s);
    results.cluster_events_per_s_by_counters = Some(by_counters);
    results.cluster_latency_p50_ms = Some(p50);
    results.cluster_latency_p99_ms = Some(p99);
    results.cluster_latency_rate_per_s = rate.map(|r| round(r, 1));
    results.cluster = Some(details);
}

/// One cluster size: settle, throughput, latency. Sets `rate` (half this size's rate)
/// when it is not known yet.
async fn cluster_size(
    plan: &Plan,
    nodes: usize,
    traffic: Vec<Outgoing>,
    rate: &mut Option<f64>,
) -> Result<ClusterSize> {
    let label = format!("nats-cluster-{nodes}");
    let mut cluster = BenchCluster::start(plan, &label, nodes, plan.shards).await?;
    let node_ids = cluster.node_ids();
    let (settled, settle_s) = wait_settled(&mut cluster, &node_ids, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    say(format!(
        "    settled in {settle_s:.1} s: {:?}",
        settled.shard_counts()
    ));
    let client = cluster.client.clone();
    let js = cluster.js.clone();
    let base = shard_log_ends(&js, plan.shards).await?;
    let audit = AuditWatch::start(&client, plan.shards).await?;
    let stats_before = cluster.stats(&client).await?;
    let events = traffic.len() as u64;
    let pids = cluster.node_pids();
    let cpu_before = CpuSnapshot::take_many(nats_pid(&cluster.nats), &pids);
    let stop_watch = Arc::new(AtomicBool::new(false));
    let commands_watch = spawn_commands_watch(
        client.clone(),
        pids.len(),
        stats_before.metrics.shard_commands + events,
        stop_watch.clone(),
    );
    let _watch_guard = AbortOnDrop::new(&commands_watch);
    let published = publish_bounded(&js, traffic, plan.in_flight, None).await?;
    let cpu_published = CpuSnapshot::take_many(nats_pid(&cluster.nats), &pids);
    let timeout = Duration::from_secs(120 + events / 200);
    let applied = wait_cluster_applied(&mut cluster, Some(&audit), Some(&base), timeout).await;
    stop_watch.store(true, Ordering::Relaxed);
    let commands_at = commands_watch.await.ok().flatten();
    let applied = applied?;
    let cpu_after = CpuSnapshot::take_many(nats_pid(&cluster.nats), &pids);
    let stats_after = cluster.stats(&client).await?;
    let first = published.first_publish;
    let seconds = applied.applied_at.duration_since(first).as_secs_f64();
    let delta = metrics_delta(&stats_before.metrics, &stats_after.metrics);
    let events_per_s = events as f64 / seconds.max(1e-9);
    let events_per_s_by_counters = commands_at.map(|at| {
        round(
            events as f64 / at.duration_since(first).as_secs_f64().max(1e-9),
            0,
        )
    });
    let throughput = ClusterThroughput {
        events,
        seconds: round(seconds, 3),
        events_per_s: round(events_per_s, 0),
        publish_done_s: round(published.last_ack.duration_since(first).as_secs_f64(), 3),
        routed_done_s: round(applied.routed_at.duration_since(first).as_secs_f64(), 3),
        applied_done_s: round(seconds, 3),
        applied_timing: if applied.audit_complete {
            AppliedTiming::ApplyAudit
        } else {
            AppliedTiming::Status
        },
        status_confirmed_s: round(applied.confirmed_at.duration_since(first).as_secs_f64(), 3),
        commands_applied_s: commands_at.map(|at| seconds_between(first, at)),
        events_per_s_by_counters,
        audit_records: audit.records(),
        duplicates_acked: published.duplicates,
        identity_counters: identity_delta(&stats_before.identity, &stats_after.identity),
        mean_shard_batch_messages: round(
            delta.shard_messages as f64 / delta.shard_batches.max(1) as f64,
            2,
        ),
        node_counters: delta,
        cpu_while_publishing: cpu_before.since(&cpu_published),
        cpu_total: cpu_before.since(&cpu_after),
        shards_per_node: applied.status.shard_counts(),
    };
    drop(audit);
    say(format!(
        "    {nodes} node(s): {events} events in {seconds:.2} s = {events_per_s:.0} events/s"
    ));
    // Half the rate at which every event had been applied once (the nodes' counters): the
    // strict figure above also waits for the router's last ingest acks, which can lag by
    // the consumer's ack wait (see RouterTail) and would make the rate meaningless.
    let capacity = events_per_s_by_counters.unwrap_or(events_per_s);
    let rate = *rate.get_or_insert(capacity / 2.0);
    say(format!(
        "    latency at {rate:.0} events/s for {} s",
        plan.latency_seconds
    ));
    let nats_pid = nats_pid(&cluster.nats);
    let latency = latency(&client, &mut cluster, plan, rate, nats_pid).await;
    let (latency, latency_error) = match latency {
        Ok(latency) => (Some(latency), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let warnings: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| {
            n.problems()
                .into_iter()
                .map(|line| format!("{}: {}", n.node_id, line))
        })
        .collect();
    let Some(latency) = latency else {
        bail!("latency: {}", latency_error.unwrap_or_default());
    };
    let details = ClusterSizeDetails {
        nodes,
        shards: plan.shards,
        settle_s: round(settle_s, 2),
        coordinator: settled.coordinator().map(str::to_string),
        router: settled.router().map(str::to_string),
        events_per_s: round(events_per_s, 0),
        throughput,
        latency: latency.details,
        node_warnings: warnings,
    };
    Ok(ClusterSize {
        events_per_s: round(events_per_s, 0),
        events_per_s_by_counters,
        latency_p50_ms: latency.p50_ms,
        latency_p99_ms: latency.p99_ms,
        details,
    })
}
