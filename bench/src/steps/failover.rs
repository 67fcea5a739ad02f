//! Step 6, `failover`: 3 nodes under a light paced load; one node that owns shards is
//! SIGKILLed; seconds until the status shows each of its shards served by a live node, and
//! until the backlog is applied. Each run is its phases: [`prepare`] (cluster, settle,
//! audit, load, warm-up), [`kill_victim`], [`watch_recovery`] (status polled until served,
//! then caught up), [`precise_moments`] (the same moments from the survivors' logs and the
//! apply audit), then the run's figures.

use crate::bench_cluster::{
    wait_settled, AuditWatch, BenchCluster, MOVE_TIMEOUT, SETTLE_TIMEOUT, STATUS_POLL,
};
use crate::cluster_status::ClusterStatus;
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::{median_and_worst, or_null, round, seconds_between, summary, Summary};
use crate::plan::Plan;
use crate::processes::{log_field, nats_pid, BenchNode};
use crate::report::{FailoverResults, NodeMoment, Report};
use crate::say;
use crate::traffic::{generated_traffic, spawn_paced_load, AbortOnDrop, Outgoing};
use crate::waits::{router_backlog, Deployment, PROGRESS_EVERY};
use anyhow::{anyhow, bail, Context as _, Result};
use crm_testkit::node_process::LogMark;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load before the failover's kill, so that every shard is busy when its owner dies.
const FAILOVER_WARMUP: Duration = Duration::from_secs(3);

const METHOD: &str = "status polled every 100 ms after the SIGKILL; served: every shard the killed node owned has a lease owner other than it, alive, whose heartbeat lists the shard, and lag not null; the load stops then; caught up: the router lease is held by a live node other than the killed one, the router consumer has nothing pending, and every shard has lag 0";

/// What one failover run measured (the figures the summary and the log lines use; the
/// rest is in `details`).
struct FailoverRun {
    killed: String,
    killed_roles: Vec<&'static str>,
    killed_shards: usize,
    failover_s: f64,
    failover_log_s: Option<f64>,
    caught_up_s: f64,
    caught_up_audit_s: Option<f64>,
    details: FailoverRunDetails,
}

/// One failover run's details (`failover.runs[]` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FailoverRunDetails {
    /// 1, 2, ...
    pub run: u32,
    pub settle_s: f64,
    pub killed: String,
    /// The cluster-wide roles the killed node held (`coordinator`, `router`).
    pub killed_roles: Vec<String>,
    pub killed_shards: usize,
    pub survivors: Vec<String>,
    pub failover_s: f64,
    pub failover_log_s: Option<f64>,
    pub first_apply_by_new_owner_worst_s: Option<f64>,
    pub caught_up_s: f64,
    pub caught_up_audit_s: Option<f64>,
    pub router_unacked_when_caught_up: Option<u64>,
    /// Shards of the killed node each survivor took (by its log).
    pub new_owners: BTreeMap<String, usize>,
    pub shards_restored_from_snapshot: u64,
    pub shard_start_ms: Summary,
    pub coordinator_taken_s: Option<NodeMoment>,
    pub router_taken_s: Option<NodeMoment>,
    pub first_assignment_after_kill: Option<NodeMoment>,
    pub status_polls: u64,
    pub status_read_ms: Summary,
    pub load_published: u64,
    pub load_failures: u64,
    pub shards_per_node_after: BTreeMap<String, usize>,
    pub cpu_survivors: CpuUse,
    /// The cluster events after the kill, from the survivors' logs (at most 40).
    pub timeline: Vec<TimelineLine>,
}

/// One marked log line of a survivor after the kill.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TimelineLine {
    /// Seconds after the kill.
    pub s: f64,
    pub node: String,
    /// The log line without its timestamp.
    pub line: String,
}

/// Every failover run, then the worst and the median.
pub async fn failover(plan: &Plan, report: &mut Report) {
    let count =
        (plan.failover_rate * (FAILOVER_WARMUP + MOVE_TIMEOUT).as_secs_f64() * 1.1).ceil() as u64;
    let (traffic, _) = generated_traffic(count.max(100), plan.seed + 1);
    let mut runs = Vec::new();
    for run in 0..plan.failover_runs {
        say(format!(
            "step 6/8: failover run {} of {}: 3 nodes, {:.0} events/s, SIGKILL of one node",
            run + 1,
            plan.failover_runs,
            plan.failover_rate
        ));
        match failover_run(plan, run, &traffic).await {
            Ok(result) => {
                let roles = if result.killed_roles.is_empty() {
                    "no cluster-wide role".to_string()
                } else {
                    result.killed_roles.join(" + ")
                };
                say(format!(
                    "    killed {} ({} shards, {roles}): served again after {} s (node logs: {} s)",
                    result.killed,
                    result.killed_shards,
                    result.failover_s,
                    or_null(result.failover_log_s),
                ));
                say(format!(
                    "    caught up after {} s (apply audit: {} s)",
                    result.caught_up_s,
                    or_null(result.caught_up_audit_s)
                ));
                runs.push(result);
            }
            Err(error) => report.fail(&format!("failover_{}", run + 1), error),
        }
    }
    let (served_median, served_worst) =
        median_and_worst(runs.iter().map(|r| r.failover_s).collect());
    let (caught_median, caught_worst) =
        median_and_worst(runs.iter().map(|r| r.caught_up_s).collect());
    let (log_median, log_worst) =
        median_and_worst(runs.iter().filter_map(|r| r.failover_log_s).collect());
    let results = &mut report.results;
    results.failover_s = served_worst;
    results.failover_median_s = served_median;
    results.failover_caught_up_s = caught_worst;
    results.failover_caught_up_median_s = caught_median;
    results.failover = Some(FailoverResults {
        runs: runs.into_iter().map(|run| run.details).collect(),
        load_events_per_s: plan.failover_rate,
        nodes: 3,
        shards: plan.shards,
        served_worst_s: served_worst,
        served_median_s: served_median,
        served_by_node_logs_worst_s: log_worst,
        served_by_node_logs_median_s: log_median,
        caught_up_worst_s: caught_worst,
        caught_up_median_s: caught_median,
        method: METHOD.to_string(),
    });
}

/// Which node a failover run kills: run 1 a node with neither cluster-wide role, run 2
/// the router, run 3 the coordinator (then again); a node that owns shards in any case,
/// any such node when the preferred one does not exist.
fn pick_victim(status: &ClusterStatus, run: u32) -> Option<String> {
    let counts = status.shard_counts();
    let coordinator = status.coordinator();
    let router = status.router();
    let owners: Vec<&String> = counts.keys().collect();
    let preferred = owners.iter().find(|id| {
        let id = Some(id.as_str());
        match run % 3 {
            0 => id != coordinator && id != router,
            1 => id == router,
            _ => id == coordinator,
        }
    });
    preferred.or(owners.first()).map(|id| id.to_string())
}

/// A settled cluster of 3 under the paced load, warmed up.
struct Prepared {
    cluster: BenchCluster,
    node_ids: Vec<String>,
    settle_s: f64,
    /// Every shard's last sequence when the cluster had settled.
    base: Vec<u64>,
    audit: AuditWatch,
    stop: Arc<AtomicBool>,
    load: tokio::task::JoinHandle<(u64, u64)>,
    _load_guard: AbortOnDrop,
}

async fn prepare(plan: &Plan, traffic: &[Outgoing]) -> Result<Prepared> {
    let mut cluster = BenchCluster::start(plan, "nats-failover", 3, plan.shards).await?;
    let node_ids = cluster.node_ids();
    let (settled, settle_s) = wait_settled(&mut cluster, &node_ids, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    let base: Vec<u64> = settled.shards().iter().map(|s| s.last_seq).collect();
    let audit = AuditWatch::start(&cluster.client, plan.shards).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_paced_load(
        cluster.js.clone(),
        traffic.to_vec(),
        plan.failover_rate,
        stop.clone(),
    );
    let load_guard = AbortOnDrop::new(&load);
    tokio::time::sleep(FAILOVER_WARMUP).await;
    cluster.check_alive()?;
    Ok(Prepared {
        cluster,
        node_ids,
        settle_s,
        base,
        audit,
        stop,
        load,
        _load_guard: load_guard,
    })
}

/// The node killed, what it held, and when.
struct Killed {
    victim: String,
    victim_shards: Vec<u32>,
    roles: Vec<&'static str>,
    survivors: Vec<String>,
    survivor_pids: Vec<u32>,
    cpu_before: CpuSnapshot,
    killed_at: Instant,
}

/// Picks the victim (see [`pick_victim`]) and SIGKILLs it.
async fn kill_victim(prepared: &mut Prepared, run: u32) -> Result<Killed> {
    let cluster = &mut prepared.cluster;
    let before = cluster.status().await?;
    let victim = pick_victim(&before, run).ok_or_else(|| anyhow!("no node owns shards"))?;
    let victim_shards = before.owned_by(&victim);
    let mut roles = Vec::new();
    if before.coordinator() == Some(victim.as_str()) {
        roles.push("coordinator");
    }
    if before.router() == Some(victim.as_str()) {
        roles.push("router");
    }
    let survivors: Vec<String> = prepared
        .node_ids
        .iter()
        .filter(|id| **id != victim)
        .cloned()
        .collect();
    let survivor_pids: Vec<u32> = cluster
        .live()
        .filter(|n| n.node_id != victim)
        .map(BenchNode::pid)
        .collect();
    let cpu_before = CpuSnapshot::take_many(nats_pid(&cluster.nats), &survivor_pids);
    let killed_at = Instant::now();
    cluster.kill(&victim);
    Ok(Killed {
        victim,
        victim_shards,
        roles,
        survivors,
        survivor_pids,
        cpu_before,
        killed_at,
    })
}

/// When the status showed the victim's shards served again, and the backlog applied.
struct Recovery {
    served_at: Instant,
    caught_up_at: Instant,
    final_status: ClusterStatus,
    router_unacked: Option<u64>,
    polls: u64,
    poll_ms: Vec<f64>,
}

/// Polls the status every [`STATUS_POLL`] until every shard of the victim is served by a
/// live node (the load stops then), and then until the router and every shard caught up.
async fn watch_recovery(prepared: &mut Prepared, killed: &Killed) -> Result<Recovery> {
    let (cluster, stop) = (&mut prepared.cluster, &prepared.stop);
    let (victim, victim_shards, killed_at) =
        (&killed.victim, &killed.victim_shards, killed.killed_at);
    let mut served_at = None;
    let mut polls = 0u64;
    let mut poll_ms = Vec::new();
    let mut last_problem = String::new();
    let mut last_report = Instant::now();
    loop {
        cluster.check_alive()?;
        if killed_at.elapsed() >= MOVE_TIMEOUT {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "{victim}'s shards not {} within {MOVE_TIMEOUT:?} of its SIGKILL: {last_problem}\n{}",
                if served_at.is_some() { "caught up" } else { "served again" },
                cluster.log_tails()
            );
        }
        let asked = Instant::now();
        let status = cluster.status().await;
        poll_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
        let status = match status {
            Ok(status) => status,
            Err(error) => {
                last_problem = format!("{error:#}");
                tokio::time::sleep(STATUS_POLL).await;
                continue;
            }
        };
        polls += 1;
        let now = Instant::now();
        let serving = status.serving_nodes();
        let shards = status.shards();
        let not_served = shards
            .iter()
            .filter(|s| victim_shards.contains(&s.shard))
            .filter(|s| {
                let served = s.owner.as_deref().is_some_and(|owner| {
                    owner != victim && serving.get(owner).is_some_and(|set| set.contains(&s.shard))
                });
                !served || s.lag.is_none()
            })
            .count();
        if served_at.is_none() {
            if not_served == 0 {
                served_at = Some(now);
                // Stop the load: "lag 0" is then a fixed point the cluster reaches.
                stop.store(true, Ordering::Relaxed);
            } else {
                last_problem = format!("{not_served} of {} shards not served", victim_shards.len());
            }
        }
        if let Some(served_at) = served_at {
            let backlog = router_backlog(&cluster.js).await;
            let lagging = shards.iter().filter(|s| s.lag != Some(0)).count();
            let router = status.router().map(str::to_string);
            let router_live = router
                .as_ref()
                .is_some_and(|r| r != victim && serving.contains_key(r));
            let pending = backlog.map(|(pending, _)| pending);
            if router_live && pending == Some(0) && lagging == 0 && not_served == 0 {
                return Ok(Recovery {
                    served_at,
                    caught_up_at: Instant::now(),
                    final_status: status,
                    router_unacked: backlog.map(|(_, unacked)| unacked),
                    polls,
                    poll_ms,
                });
            }
            last_problem = format!(
                "router {router:?}, router backlog {backlog:?} (pending, unacked), {lagging} shards lagging"
            );
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            say(format!(
                "    {:.0} s after the kill: {last_problem}",
                killed_at.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// The same moments, precisely, from the survivors' logs and the apply audit.
struct Moments {
    marks: Vec<(String, LogMark)>,
    failover_log_s: Option<f64>,
    new_owners: BTreeMap<String, usize>,
    start_ms: Vec<f64>,
    restored: u64,
    first_apply_s: Option<f64>,
    caught_up_audit_s: Option<f64>,
}

fn precise_moments(prepared: &Prepared, killed: &Killed, recovery: &Recovery) -> Moments {
    let killed_at = killed.killed_at;
    let victim_shards = &killed.victim_shards;
    let marks = prepared.cluster.marks_since(killed_at);
    let shard_of =
        |mark: &LogMark| log_field(&mark.line, "shard").and_then(|s| s.parse::<u32>().ok());
    let mut served_by_log: BTreeMap<u32, (String, Instant)> = BTreeMap::new();
    let mut start_ms = Vec::new();
    let mut restored = 0u64;
    for (node, mark) in &marks {
        let Some(shard) = shard_of(mark).filter(|s| victim_shards.contains(s)) else {
            continue;
        };
        if mark.line.contains("serving shard") {
            served_by_log
                .entry(shard)
                .or_insert((node.clone(), mark.at));
        } else if mark.line.contains("shard started") {
            if let Some(ms) = log_field(&mark.line, "ms").and_then(|v| v.parse::<f64>().ok()) {
                start_ms.push(ms);
            }
        } else if mark.line.contains("snapshot restored") {
            restored += 1;
        }
    }
    let failover_log_s = (served_by_log.len() == victim_shards.len())
        .then(|| served_by_log.values().map(|(_, at)| *at).max())
        .flatten()
        .map(|at| seconds_between(killed_at, at));
    let mut new_owners: BTreeMap<String, usize> = BTreeMap::new();
    for (node, _) in served_by_log.values() {
        *new_owners.entry(node.clone()).or_insert(0) += 1;
    }
    let audit = &prepared.audit;
    let first_apply_s = victim_shards
        .iter()
        .filter_map(|&shard| {
            killed
                .survivors
                .iter()
                .filter_map(|node| audit.first_batch(shard, node))
                .filter(|at| *at >= killed_at)
                .min()
        })
        .max()
        .map(|at| seconds_between(killed_at, at));
    // Caught up by the audit: every shard at the last sequence the final status showed.
    let mut audit_complete = true;
    let mut audit_caught_up = killed_at;
    for shard in recovery.final_status.shards() {
        let (number, last) = (shard.shard, shard.last_seq);
        if last <= prepared.base.get(number as usize).copied().unwrap_or(0) {
            continue;
        }
        match audit.reached(number, last) {
            Some(at) => audit_caught_up = audit_caught_up.max(at),
            None => audit_complete = false,
        }
    }
    Moments {
        marks,
        failover_log_s,
        new_owners,
        start_ms,
        restored,
        first_apply_s,
        caught_up_audit_s: audit_complete.then(|| seconds_between(killed_at, audit_caught_up)),
    }
}

/// The cluster events after the kill, from the survivors' logs (at most 40 lines).
fn timeline(marks: &[(String, LogMark)], killed_at: Instant) -> Vec<TimelineLine> {
    marks
        .iter()
        .filter(|(_, m)| {
            [
                "coordinator",
                "routes ingest",
                "assignment written",
                "lease",
            ]
            .iter()
            .any(|needle| m.line.contains(needle))
        })
        .take(40)
        .map(|(node, m)| {
            let text = m
                .line
                .split_once("  ")
                .map(|(_, rest)| rest)
                .unwrap_or(&m.line);
            TimelineLine {
                s: seconds_between(killed_at, m.at),
                node: node.clone(),
                line: text.trim().to_string(),
            }
        })
        .collect()
}

async fn failover_run(plan: &Plan, run: u32, traffic: &[Outgoing]) -> Result<FailoverRun> {
    let mut prepared = prepare(plan, traffic).await?;
    let killed = kill_victim(&mut prepared, run).await?;
    let recovery = watch_recovery(&mut prepared, &killed).await?;
    prepared.stop.store(true, Ordering::Relaxed);
    let (published, publish_failures) = (&mut prepared.load).await.unwrap_or((0, 0));
    let cpu_after = CpuSnapshot::take_many(nats_pid(&prepared.cluster.nats), &killed.survivor_pids);
    let moments = precise_moments(&prepared, &killed, &recovery);
    let killed_at = killed.killed_at;
    let first_mark = |needle: &str| {
        moments
            .marks
            .iter()
            .find(|(_, m)| m.line.contains(needle))
            .map(|(node, m)| NodeMoment {
                node: node.clone(),
                s: seconds_between(killed_at, m.at),
            })
    };
    let failover_s = seconds_between(killed_at, recovery.served_at);
    let caught_up_s = seconds_between(killed_at, recovery.caught_up_at);
    let details = FailoverRunDetails {
        run: run + 1,
        settle_s: round(prepared.settle_s, 2),
        killed: killed.victim.clone(),
        killed_roles: killed.roles.iter().map(|r| r.to_string()).collect(),
        killed_shards: killed.victim_shards.len(),
        survivors: killed.survivors.clone(),
        failover_s,
        failover_log_s: moments.failover_log_s,
        first_apply_by_new_owner_worst_s: moments.first_apply_s,
        caught_up_s,
        caught_up_audit_s: moments.caught_up_audit_s,
        router_unacked_when_caught_up: recovery.router_unacked,
        new_owners: moments.new_owners.clone(),
        shards_restored_from_snapshot: moments.restored,
        shard_start_ms: summary(moments.start_ms.clone(), 1),
        coordinator_taken_s: first_mark("this node is the coordinator"),
        router_taken_s: first_mark("this node routes ingest"),
        first_assignment_after_kill: first_mark("shard assignment written"),
        status_polls: recovery.polls,
        status_read_ms: summary(recovery.poll_ms.clone(), 1),
        load_published: published,
        load_failures: publish_failures,
        shards_per_node_after: recovery.final_status.shard_counts(),
        cpu_survivors: killed.cpu_before.since(&cpu_after),
        timeline: timeline(&moments.marks, killed_at),
    };
    Ok(FailoverRun {
        killed_shards: killed.victim_shards.len(),
        killed: killed.victim,
        killed_roles: killed.roles,
        failover_s,
        failover_log_s: moments.failover_log_s,
        caught_up_s,
        caught_up_audit_s: moments.caught_up_audit_s,
        details,
    })
}
