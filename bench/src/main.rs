//! `crm-bench`: the benchmark of one `crm-node` on this machine. Not a test: it asserts
//! nothing, prints a table and writes `bench/results.json` (see `docs/benchmark.md`).
//!
//! It starts everything it measures: a private `nats-server -js` (free port, temporary
//! store) and `crm-node run` processes (`target/release/crm-node`, a config in a temporary
//! directory, the repository's `cluster-config/rules.toml`), and stops them at the end, on
//! error and on Ctrl-C (guards with `Drop`; every child also gets `PR_SET_PDEATHSIG`, so a
//! killed bench takes its children with it). Steps, in order:
//!
//! 1. `raw`: the JetStream baseline on the same server: N generator payloads published to a
//!    scratch stream (bounded in-flight acks), then pulled and acked one by one.
//! 2. `e2e`: the same N events published to `crm.ingest.<channel>` until every one is
//!    applied and flushed (router drained, every shard's applied sequence at its last
//!    record).
//! 3. `latency`: purchases at half the end-to-end rate; publish -> `points.earned` event.
//! 4. `rss`: a fresh server and node fed one `visit` per new customer; the node's RSS when
//!    the resident cap is reached and when every customer is stored.
//! 5. `cluster`: for 1, 2 and 3 nodes on a fresh server each (every shard owned by its
//!    assigned node, balanced): the e2e traffic until the cluster has applied it (router
//!    drained, every shard's last record in the apply audit, confirmed by the status), then
//!    the latency run at one fixed rate (half the 1-node rate by the nodes' counters) for
//!    every size.
//! 6. `failover`: 3 nodes under a light paced load; one node that owns shards is SIGKILLed;
//!    seconds until the status shows each of its shards served by a live node, and until
//!    the backlog is applied.
//! 7. `handoff`: one node, one shard holding N customers; a second node starts and the
//!    first is drained; seconds from the drain request until the second node serves the
//!    shard with nothing left to apply.
//! 8. `merges`: on fresh servers and nodes: N pairs of customers linked by N `identify`
//!    events until every merge is applied (merges/s); then the e2e run twice, the sample
//!    traffic as is and with about `--link-share` linking events (as many as the
//!    generator makes, 1.8 % at most), and the ratio of the two rates.
//! 9. `cold`: in-process, no NATS: `ShardEngine::view` of customers not resident, after the
//!    sled store was closed and reopened.
//!
//! Between 1 and 2 a diagnostic (`kv`) times the identity directory's KV round trips alone.
//! A wait that sees no progress for 30 s fails its step (a stalled node) instead of
//! hanging. For profiling, `CRM_BENCH_NATS_ARGS` adds arguments to the server's command
//! line (e.g. `--profile 6061` for Go's pprof endpoints), `CRM_BENCH_NODE_LIMITS` adds
//! `[limits]` lines to the node's config (`;`-separated, e.g.
//! `flush_interval_ms = 20;router_batch_max_events = 1024`) and `--node-logs DIR` keeps
//! the nodes' logs.
//!
//! This file is the run: the arguments ([`plan`]), the steps in order ([`steps`], one module
//! each), and the results written and printed ([`report`]). Every process is started
//! through the test kit ([`processes`]); the nodes' JSON replies are read in
//! [`cluster_status`] only.

mod bench_cluster;
mod cluster_status;
mod cpu;
mod figures;
mod plan;
mod processes;
mod report;
mod steps;
mod traffic;
mod waits;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use figures::round;
use plan::{Args, Plan};
use processes::{nats_pid, start_nats, BenchNode, NodeSettings};
use report::{load_average, print_table, Report};
use std::process::ExitCode;
use std::time::Instant;
use traffic::{connect, generated_traffic, GeneratorDetails, TrafficDetails, TRAFFIC_START};

/// A line of progress on stderr.
fn say(text: impl AsRef<str>) {
    eprintln!("==> {}", text.as_ref());
}

/// Steps 1 to 3 on one server and one node.
async fn throughput_and_latency(plan: &Plan, report: &mut Report) -> Result<()> {
    say(format!(
        "generating {} events of sample traffic",
        plan.events
    ));
    let (traffic, spec) = generated_traffic(plan.events, plan.seed);
    let mean_bytes =
        traffic.iter().map(|m| m.payload.len()).sum::<usize>() as f64 / traffic.len().max(1) as f64;
    report.results.traffic = Some(TrafficDetails {
        generator: GeneratorDetails {
            people: spec.customers,
            days: spec.days,
            seed: spec.seed,
            duplicate_rate_percent: spec.duplicate_rate_percent,
            start: TRAFFIC_START.to_string(),
        },
        events: traffic.len(),
        mean_payload_bytes: round(mean_bytes, 0),
    });
    let nats = start_nats(plan, "nats")?;
    let client = connect(&nats.url()).await?;
    if plan.runs("raw") {
        say(format!(
            "step 1/9: raw JetStream baseline ({} events, {} in flight)",
            traffic.len(),
            plan.in_flight
        ));
        match steps::raw::raw_jetstream(&client, &traffic, plan, nats_pid(&nats)).await {
            Ok(raw) => {
                report.results.raw_jetstream_events_per_s = Some(raw.events_per_s);
                report.results.raw = Some(raw.details);
            }
            Err(error) => report.fail("raw", error),
        }
    }
    if plan.runs("kv") {
        say(format!(
            "diagnostic: identity-directory KV operations ({} keys)",
            plan.kv_keys
        ));
        match steps::kv::kv_diagnostic(&client, plan.kv_keys).await {
            Ok(kv) => report.results.kv_diagnostic = Some(kv),
            Err(error) => report.fail("kv", error),
        }
    }
    if !plan.runs("e2e") && !plan.runs("latency") {
        return Ok(());
    }
    say(format!("starting crm-node ({} shards)", plan.shards));
    let mut node = BenchNode::start(plan, &nats.url(), &NodeSettings::single(plan.shards, None))?;
    if plan.runs("e2e") {
        say(format!(
            "step 2/9: end-to-end throughput ({} events)",
            traffic.len()
        ));
        match steps::e2e::end_to_end(&client, &mut node, traffic, plan, nats_pid(&nats)).await {
            Ok(e2e) => {
                report.results.end_to_end_events_per_s = Some(e2e.events_per_s);
                report.results.end_to_end = Some(e2e.details);
            }
            Err(error) => report.fail("e2e", error),
        }
    }
    if plan.runs("latency") {
        let rate = plan
            .latency_rate
            .or_else(|| report.results.end_to_end_events_per_s.map(|r| r / 2.0));
        match rate {
            Some(rate) => {
                say(format!(
                    "step 3/9: latency at {rate:.0} events/s for {} s",
                    plan.latency_seconds
                ));
                match steps::latency::latency(&client, &mut node, plan, rate, nats_pid(&nats)).await
                {
                    Ok(latency) => {
                        let results = &mut report.results;
                        results.p50_latency_ms = latency.p50_ms;
                        results.p99_latency_ms = latency.p99_ms;
                        results.latency_rate_per_s = Some(latency.target_rate_per_s);
                        results.latency = Some(latency.details);
                    }
                    Err(error) => report.fail("latency", error),
                }
            }
            None => report.fail(
                "latency",
                anyhow!("no end-to-end rate to halve; pass --latency-rate"),
            ),
        }
    }
    let problems = node.problems();
    if !problems.is_empty() {
        report.results.node_warnings = Some(problems);
    }
    Ok(())
}

async fn nats_steps(plan: &Plan, report: &mut Report) {
    if ["raw", "kv", "e2e", "latency"]
        .iter()
        .any(|step| plan.runs(step))
    {
        if let Err(error) = throughput_and_latency(plan, report).await {
            report.fail("throughput", error);
        }
    }
    if plan.runs("rss") {
        say(format!(
            "step 4/9: memory: {} new customers through a fresh node (resident cap {})",
            plan.customers, plan.resident_cap
        ));
        match steps::rss::memory(plan).await {
            Ok(rss) => {
                let results = &mut report.results;
                results.rss_mb_1m_customers = Some(rss.rss_mib_after_settle);
                results.customers_stored = Some(rss.customers_applied);
                results.rss_mb_resident_cap = rss.rss_mib_resident_cap;
                results.resident_cap = Some(plan.resident_cap);
                results.rss = Some(rss.details);
            }
            Err(error) => report.fail("rss", error),
        }
    }
    if plan.runs("cluster") {
        steps::cluster::cluster_scaling(plan, report).await;
    }
    if plan.runs("failover") {
        steps::failover::failover(plan, report).await;
    }
    if plan.runs("handoff") {
        steps::handoff::handoff(plan, report).await;
    }
    if plan.runs("merges") {
        steps::merges::merges(plan, report).await;
    }
}

async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs every step; `Ok(false)` when a step failed (the results file is written anyway).
fn run() -> Result<bool> {
    let plan = Plan::from_args(Args::parse())?;
    let mut report = Report::default();
    let started = Instant::now();
    report.results.load_average_at_start = load_average();
    // One thread for the NATS steps: the bench shares the cores with the server and node.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let finished = runtime.block_on(async {
        tokio::select! {
            _ = nats_steps(&plan, &mut report) => true,
            _ = interrupted() => false,
        }
    });
    drop(runtime);
    if !finished {
        bail!("interrupted; every process the bench started was stopped");
    }
    if plan.runs("cold") {
        cold_step(&plan, &mut report)?;
    }
    let results = report.finish(&plan, started.elapsed());
    if let Some(parent) = plan.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Through a `Value`, so that the keys come out sorted as before.
    let text = serde_json::to_string_pretty(&serde_json::to_value(&results)?)? + "\n";
    std::fs::write(&plan.out, text)
        .with_context(|| format!("cannot write {}", plan.out.display()))?;
    print_table(&results);
    println!("results: {}", plan.out.display());
    Ok(results.errors.is_empty())
}

/// Step 8, in-process on a runtime of its own (two workers, like a node's).
fn cold_step(plan: &Plan, report: &mut Report) -> Result<()> {
    say(format!(
        "step 9/9: cold activation ({} customers stored, {} activations timed)",
        plan.cold_customers, plan.cold_samples
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = steps::cold::cold_activation(plan) => Some(outcome),
            _ = interrupted() => None,
        }
    });
    match outcome {
        Some(Ok(cold)) => {
            let results = &mut report.results;
            results.cold_activation_us = cold.mean_us;
            results.cold_activation_p99_us = cold.p99_us;
            results.cold_activation = Some(cold.details);
        }
        Some(Err(error)) => report.fail("cold", error),
        None => bail!("interrupted"),
    }
    Ok(())
}
