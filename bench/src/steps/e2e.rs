//! Step 2, `e2e`: the throughput's events published to `crm.ingest.<channel>` until every
//! one is applied and flushed by the one node (router drained, every shard's applied
//! sequence at its last record), with a timeline sampled every second.

use crate::cluster_status::{identity_delta, metrics_delta, node_stats, MetricsSnapshot};
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::round;
use crate::plan::Plan;
use crate::processes::BenchNode;
use crate::traffic::{publish_bounded, Outgoing};
use crate::waits::{router_consumer, router_progress, wait_applied};
use anyhow::Result;
use async_nats::jetstream;
use crm_node::ingest::identity_directory::DirectoryMetrics;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the end-to-end run measured.
pub struct EndToEnd {
    /// Events published and applied per second.
    pub events_per_s: f64,
    /// The first publish (where its `seconds` start).
    pub first_publish: Instant,
    pub details: EndToEndDetails,
}

/// The end-to-end step's details (`end_to_end` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EndToEndDetails {
    pub events: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub publish_done_s: f64,
    pub routed_done_s: f64,
    pub applied_done_s: f64,
    pub duplicates_acked: u64,
    pub in_flight: usize,
    pub shards: u32,
    /// How much each node counter grew.
    pub node_counters: MetricsSnapshot,
    /// How much each identity-directory counter grew.
    pub identity_counters: DirectoryMetrics,
    pub mean_shard_batch_messages: f64,
    pub mean_shard_batch_commands: f64,
    pub cpu_while_publishing: CpuUse,
    pub cpu_after_publishing: CpuUse,
    pub cpu_total: CpuUse,
    pub timeline: Vec<TimelineSample>,
}

/// One second of the end-to-end run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TimelineSample {
    pub t_s: f64,
    /// Events acked by JetStream.
    pub published: u64,
    /// Events the router acked (its ack floor); `null` when unreadable.
    pub routed: Option<u64>,
    /// Commands the node applied; `null` when its stats did not answer.
    pub applied: Option<u64>,
}

pub async fn end_to_end(
    client: &async_nats::Client,
    node: &mut BenchNode,
    traffic: Vec<Outgoing>,
    plan: &Plan,
    nats_pid: u32,
) -> Result<EndToEnd> {
    let js = jetstream::new(client.clone());
    let events = traffic.len() as u64;
    let stats_before = node_stats(client).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let monitor = tokio::spawn(progress_timeline(
        client.clone(),
        acked.clone(),
        stop.clone(),
        started,
    ));
    let cpu_before = CpuSnapshot::take(nats_pid, Some(node.pid()));
    let published = publish_bounded(&js, traffic, plan.in_flight, Some(acked)).await?;
    let cpu_published = CpuSnapshot::take(nats_pid, Some(node.pid()));
    let timeout = Duration::from_secs(120 + events / 200);
    let drained = wait_applied(client, node, plan.shards, timeout).await;
    stop.store(true, Ordering::Relaxed);
    let timeline = monitor.await.unwrap_or_default();
    let drained = drained?;
    let cpu_after = CpuSnapshot::take(nats_pid, Some(node.pid()));
    let first = published.first_publish;
    let seconds = drained.applied_at.duration_since(first).as_secs_f64();
    let delta = metrics_delta(&stats_before.metrics, &drained.stats.metrics);
    let batches = delta.shard_batches;
    let events_per_s = round(events as f64 / seconds.max(1e-9), 0);
    let details = EndToEndDetails {
        events,
        seconds: round(seconds, 3),
        events_per_s,
        publish_done_s: round(published.last_ack.duration_since(first).as_secs_f64(), 3),
        routed_done_s: round(drained.routed_at.duration_since(first).as_secs_f64(), 3),
        applied_done_s: round(seconds, 3),
        duplicates_acked: published.duplicates,
        in_flight: plan.in_flight,
        shards: plan.shards,
        identity_counters: identity_delta(&stats_before.identity, &drained.stats.identity),
        mean_shard_batch_messages: round(delta.shard_messages as f64 / batches.max(1) as f64, 2),
        mean_shard_batch_commands: round(delta.shard_commands as f64 / batches.max(1) as f64, 2),
        node_counters: delta,
        cpu_while_publishing: cpu_before.since(&cpu_published),
        cpu_after_publishing: cpu_published.since(&cpu_after),
        cpu_total: cpu_before.since(&cpu_after),
        timeline,
    };
    Ok(EndToEnd {
        events_per_s,
        first_publish: first,
        details,
    })
}

/// Samples every second: events acked by JetStream, routed (router ack floor), applied
/// (shard messages the node processed), until `stop`.
async fn progress_timeline(
    client: async_nats::Client,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> Vec<TimelineSample> {
    let js = jetstream::new(client.clone());
    let mut consumer = router_consumer(&js).await.ok();
    let base = match node_stats(&client).await {
        Ok(stats) => stats.metrics.shard_commands,
        Err(_) => 0,
    };
    let mut routed_base = None;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let routed = match consumer.as_mut() {
            Some(consumer) => router_progress(consumer)
                .await
                .ok()
                .map(|(_, _, floor)| floor),
            None => None,
        };
        let routed_base = *routed_base.get_or_insert(routed.unwrap_or(0));
        let applied = node_stats(&client)
            .await
            .ok()
            .map(|s| s.metrics.shard_commands.saturating_sub(base));
        samples.push(TimelineSample {
            t_s: round(started.elapsed().as_secs_f64(), 2),
            published: acked.load(Ordering::Relaxed),
            routed: routed.map(|r| r.saturating_sub(routed_base)),
            applied,
        });
    }
    samples
}
