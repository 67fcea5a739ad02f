//! Step 4, `rss`: a fresh server and node (with `resident_max_customers` = the resident
//! cap) fed one `visit` per new customer; the node's RSS, sampled every second, when the
//! resident cap is reached, when every customer is stored, and after the passivation pass.

use crate::cluster_status::node_stats;
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::round;
use crate::plan::Plan;
use crate::processes::{nats_pid, start_nats, BenchNode, NodeSettings};
use crate::say;
use crate::traffic::{connect, spawn_customer_feed, AbortOnDrop};
use crate::waits::{wait_applied, StallWatch};
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the memory run measured.
pub struct Memory {
    /// RSS after the passivation pass, MiB.
    pub rss_mib_after_settle: f64,
    /// RSS when the resident cap was reached, MiB (`None` if it never was).
    pub rss_mib_resident_cap: Option<f64>,
    pub customers_applied: u64,
    pub details: MemoryDetails,
}

/// The memory run's details (`rss` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryDetails {
    pub customers_published: u64,
    pub customers_applied: u64,
    /// `stored_customers` of the node's counters at the end.
    pub stored_customers_reported: u64,
    pub resident_cap: u64,
    pub rss_mib_at_start: f64,
    /// `null` when the resident cap was never reached.
    pub rss_mib_resident_cap: Option<f64>,
    pub at_cap: Option<AtCap>,
    pub rss_mib_end_of_feed: f64,
    pub rss_mib_after_settle: f64,
    pub settle_seconds: u64,
    pub rss_mib_peak: f64,
    pub sled_dir_mib: f64,
    pub feed_seconds: f64,
    pub new_customers_per_s: f64,
    pub cpu: CpuUse,
    /// One a second while feeding.
    pub samples: Vec<RssSample>,
}

/// The moment the resident cap was reached.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AtCap {
    pub applied: u64,
    pub rss_mib: f64,
    pub t_s: f64,
}

/// One second of the memory run's feed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RssSample {
    pub t_s: f64,
    pub published: u64,
    pub applied: u64,
    pub rss_mib: f64,
}

pub async fn memory(plan: &Plan) -> Result<Memory> {
    let nats = start_nats(plan, "nats-rss")?;
    let mut node = BenchNode::start(
        plan,
        &nats.url(),
        &NodeSettings::single(plan.shards, Some(plan.resident_cap)),
    )?;
    let client = connect(&nats.url()).await?;
    let rss_start = node.process.rss_mib().unwrap_or(0.0);
    let customers = plan.customers;
    let acked = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuSnapshot::take(nats_pid(&nats), Some(node.pid()));
    let started = Instant::now();
    let publisher = spawn_customer_feed(&client, customers, plan.in_flight, acked.clone());
    let _publisher_guard = AbortOnDrop::new(&publisher);
    let mut samples = Vec::new();
    let mut at_cap: Option<AtCap> = None;
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(600 + customers / 100);
    // Sample once a second until every customer is applied.
    let mut stall = StallWatch::new();
    let applied = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.check_alive()?;
        let stats = node_stats(&client).await?;
        let applied = stats.metrics.applied;
        stall.observe(
            (applied, acked.load(Ordering::Relaxed), 0),
            &format!("{applied} of {customers} customers stored"),
        )?;
        let rss = node.process.rss_mib().unwrap_or(0.0);
        let t_s = started.elapsed().as_secs_f64();
        samples.push(RssSample {
            t_s: round(t_s, 1),
            published: acked.load(Ordering::Relaxed),
            applied,
            rss_mib: round(rss, 1),
        });
        if at_cap.is_none() && applied >= plan.resident_cap {
            at_cap = Some(AtCap {
                applied,
                rss_mib: round(rss, 1),
                t_s: round(t_s, 1),
            });
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            say(format!(
                "    {applied} of {customers} customers stored, {:.0}/s, RSS {rss:.0} MiB",
                applied as f64 / t_s.max(1e-9)
            ));
            last_print = Instant::now();
        }
        if applied >= customers {
            break applied;
        }
        if Instant::now() >= deadline {
            bail!(
                "only {applied} of {customers} customers stored in {:?}",
                started.elapsed()
            );
        }
        if publisher.is_finished() && stats.metrics.dead_lettered > 0 {
            bail!(
                "the node dead-lettered {} visits",
                stats.metrics.dead_lettered
            );
        }
    };
    let published = publisher.await.context("publisher")??;
    let drained = wait_applied(&client, &mut node, plan.shards, Duration::from_secs(600)).await?;
    let cpu_after = CpuSnapshot::take(nats_pid(&nats), Some(node.pid()));
    let feed_seconds = drained
        .applied_at
        .duration_since(published.first_publish)
        .as_secs_f64();
    let rss_fed = node.process.rss_mib().unwrap_or(0.0);
    if plan.settle_seconds > 0 {
        say(format!(
            "    waiting {} s for the node's passivation pass",
            plan.settle_seconds
        ));
        tokio::time::sleep(Duration::from_secs(plan.settle_seconds)).await;
    }
    let rss_settled = node.process.rss_mib().unwrap_or(0.0);
    let hwm = node.process.peak_rss_mib().unwrap_or(0.0);
    let stats = node_stats(&client).await?;
    let stored = stats.metrics.stored_customers;
    let sled_bytes = dir_bytes(&node.data_dir());
    let rss_mib_resident_cap = at_cap
        .as_ref()
        .map(|c| round(c.rss_mib, 1))
        .filter(|mib| mib.is_finite());
    drop(node);
    drop(nats);
    let rss_mib_after_settle = round(rss_settled, 1);
    let details = MemoryDetails {
        customers_published: published.count,
        customers_applied: applied,
        stored_customers_reported: stored,
        resident_cap: plan.resident_cap,
        rss_mib_at_start: round(rss_start, 1),
        rss_mib_resident_cap,
        at_cap,
        rss_mib_end_of_feed: round(rss_fed, 1),
        rss_mib_after_settle,
        settle_seconds: plan.settle_seconds,
        rss_mib_peak: round(hwm, 1),
        sled_dir_mib: round(sled_bytes as f64 / 1048576.0, 1),
        feed_seconds: round(feed_seconds, 1),
        new_customers_per_s: round(published.count as f64 / feed_seconds.max(1e-9), 0),
        cpu: cpu_before.since(&cpu_after),
        samples,
    };
    Ok(Memory {
        rss_mib_after_settle,
        rss_mib_resident_cap,
        customers_applied: applied,
        details,
    })
}

/// Total size of the files under `path`.
pub fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            _ => entry.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}
