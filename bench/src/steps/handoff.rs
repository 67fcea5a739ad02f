//! Step 7, `handoff`: one node, one shard holding N customers; a second node starts and
//! the first is drained; seconds from the drain request until the second node serves the
//! shard with nothing left to apply (and the moments of the hand-off from both nodes' logs).

use crate::bench_cluster::{wait_settled, BenchCluster, MOVE_TIMEOUT, SETTLE_TIMEOUT, STATUS_POLL};
use crate::cluster_status::node_stats;
use crate::cpu::CpuSnapshot;
use crate::figures::{or_null, round, seconds_between, summary};
use crate::plan::Plan;
use crate::processes::{log_field, nats_pid};
use crate::report::{HandoffResults, HandoffRun, NodeMoment, Report, StatusTrace, TraceChange};
use crate::say;
use crate::steps::rss::dir_bytes;
use crate::traffic::{spawn_customer_feed, AbortOnDrop};
use crate::waits::Deployment;
use anyhow::{anyhow, bail, Context as _, Result};
use crm_testkit::node_process::LogMark;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const METHOD: &str = "shards = 1; node-1 alone is fed one visit per new customer and applies it; node-2 starts and the cluster settles (node-1 keeps the shard); then the drain of node-1 is requested (crm_node::cluster::status::request_drain) and the status is polled every 100 ms until shard 0's lease owner is node-2, node-2's heartbeat lists it, and its lag is 0. handoff_log_s: from the drain request until node-2 logs 'serving shard'";

/// `10k` for 10,000; the number itself when it is not a whole thousand.
fn customers_label(customers: u64) -> String {
    if customers.is_multiple_of(1000) {
        format!("{}k", customers / 1000)
    } else {
        customers.to_string()
    }
}

pub async fn handoff(plan: &Plan, report: &mut Report) {
    let mut runs = Vec::new();
    for &customers in &plan.handoff_customers {
        say(format!(
            "step 7/8: hand-off of one shard holding {customers} customers (drain node-1, node-2 takes it)"
        ));
        match handoff_run(plan, customers).await {
            Ok(result) => {
                say(format!(
                    "    served by node-2 after {} s (node log: {} s), snapshot {} bytes",
                    result.handoff_s,
                    or_null(result.handoff_log_s),
                    or_null(result.snapshot_bytes)
                ));
                let results = &mut report.results;
                match customers_label(customers).as_str() {
                    "10k" => results.handoff_10k_s = Some(result.handoff_s),
                    "100k" => results.handoff_100k_s = Some(result.handoff_s),
                    label => {
                        results
                            .handoff_other_s
                            .insert(format!("handoff_{label}_s"), Some(result.handoff_s));
                    }
                }
                runs.push(result);
            }
            Err(error) => report.fail(&format!("handoff_{}", customers_label(customers)), error),
        }
    }
    report.results.handoff = Some(HandoffResults {
        runs,
        method: METHOD.to_string(),
    });
}

async fn handoff_run(plan: &Plan, customers: u64) -> Result<HandoffRun> {
    let label = format!("nats-handoff-{}", customers_label(customers));
    let mut cluster = BenchCluster::start(plan, &label, 1, 1).await?;
    wait_settled(&mut cluster, &["node-1".to_string()], SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    let client = cluster.client.clone();
    let acked = Arc::new(AtomicU64::new(0));
    let feed = spawn_customer_feed(&client, customers, plan.in_flight, acked.clone());
    let _feed_guard = AbortOnDrop::new(&feed);
    let started = Instant::now();
    let mut last_report = Instant::now();
    while !feed.is_finished() {
        cluster.check_alive()?;
        if last_report.elapsed() >= Duration::from_secs(15) {
            say(format!(
                "    {} of {customers} customers published",
                acked.load(Ordering::Relaxed)
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let published = feed.await.context("feed")??;
    cluster
        .wait_applied(&client, Duration::from_secs(600 + customers / 100))
        .await?;
    let feed_seconds = started.elapsed().as_secs_f64();
    let stats = node_stats(&client).await?;
    let stored = stats.metrics.stored_customers;
    let sled_mib = cluster
        .node("node-1")
        .map(|n| dir_bytes(&n.data_dir()) as f64 / 1048576.0)
        .unwrap_or(0.0);

    cluster.add_nodes(plan, 1)?;
    let both = vec!["node-1".to_string(), "node-2".to_string()];
    let (settled, _) = wait_settled(&mut cluster, &both, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    let owner = settled.shards().first().and_then(|s| s.owner.clone());
    if owner.as_deref() != Some("node-1") {
        bail!("shard 0 moved to {} before the drain", or_null(owner));
    }
    let pids = cluster.node_pids();
    let cpu_before = CpuSnapshot::take_many(nats_pid(&cluster.nats), &pids);
    let drain_at = Instant::now();
    crm_node::cluster::status::request_drain(&cluster.js, "node-1", false)
        .await
        .map_err(|e| anyhow!("drain request: {e}"))?;
    let mut polls = 0u64;
    let mut poll_ms = Vec::new();
    let mut trace: Vec<TraceChange> = Vec::new();
    let mut last_problem = String::from("no status yet");
    let done_at = loop {
        cluster.check_alive()?;
        if drain_at.elapsed() >= MOVE_TIMEOUT {
            bail!(
                "shard 0 not served by node-2 within {MOVE_TIMEOUT:?} of the drain request: {last_problem}\n{}",
                cluster.log_tails()
            );
        }
        let asked = Instant::now();
        let status = cluster.status().await;
        poll_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
        match status {
            Ok(status) => {
                polls += 1;
                let Some(shard) = status.shards().first().cloned() else {
                    last_problem = "the status lists no shard".to_string();
                    tokio::time::sleep(STATUS_POLL).await;
                    continue;
                };
                let serving = status.serving_nodes();
                let served = shard.owner.as_deref() == Some("node-2")
                    && serving.get("node-2").is_some_and(|s| s.contains(&0));
                let seen = (
                    shard.owner.clone(),
                    shard.assigned.clone(),
                    served,
                    shard.applied_seq,
                    shard.last_seq,
                    shard.lag,
                );
                if trace.last().map(|t| &t.seen) != Some(&seen) {
                    trace.push(TraceChange {
                        s: seconds_between(drain_at, Instant::now()),
                        seen,
                    });
                }
                if served && shard.lag == Some(0) {
                    break Instant::now();
                }
                last_problem = format!(
                    "owner {}, assigned {}, lag {}",
                    or_null(shard.owner),
                    or_null(shard.assigned),
                    or_null(shard.lag)
                );
            }
            Err(error) => last_problem = format!("{error:#}"),
        }
        tokio::time::sleep(STATUS_POLL).await;
    };
    let cpu_after = CpuSnapshot::take_many(nats_pid(&cluster.nats), &pids);
    let marks = cluster.marks_since(drain_at);
    let find = |node: &str, needle: &str| {
        marks
            .iter()
            .find(|(n, m)| n == node && m.line.contains(needle))
            .map(|(_, m)| m.clone())
    };
    let at = |mark: &Option<LogMark>| mark.as_ref().map(|m| seconds_between(drain_at, m.at));
    let number = |mark: &Option<LogMark>, key: &str| {
        mark.as_ref()
            .and_then(|m| log_field(&m.line, key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let handing_off = find("node-1", "handing shard off");
    let written = find("node-1", "snapshot written");
    let restored = find("node-2", "snapshot restored");
    let started_mark = find("node-2", "shard started");
    let serving = find("node-2", "serving shard");
    let assignment = marks
        .iter()
        .find(|(_, m)| m.line.contains("shard assignment written"))
        .map(|(node, m)| NodeMoment {
            node: node.clone(),
            s: seconds_between(drain_at, m.at),
        });
    Ok(HandoffRun {
        customers,
        customers_published: published.count,
        stored_customers: stored,
        feed_seconds: round(feed_seconds, 1),
        sled_dir_mib_node_1: round(sled_mib, 1),
        handoff_s: seconds_between(drain_at, done_at),
        handoff_log_s: at(&serving),
        assignment_written: assignment,
        handing_off_s: at(&handing_off),
        snapshot_written_s: at(&written),
        snapshot_bytes: number(&written, "bytes"),
        snapshot_entries: number(&written, "entries"),
        snapshot_write_ms: number(&written, "ms"),
        snapshot_restored_s: at(&restored),
        snapshot_restore_ms: number(&restored, "ms"),
        shard_started_s: at(&started_mark),
        shard_start_ms: number(&started_mark, "ms"),
        status_polls: polls,
        status_read_ms: summary(poll_ms, 1),
        status_trace: StatusTrace::new(trace),
        cpu: cpu_before.since(&cpu_after),
    })
}
