//! The command line and the resolved plan of a run: which steps run, with which sizes,
//! which binaries and rules. `--quick` picks small sizes; every size has a flag. Nothing
//! here starts a process; an unknown `--skip` step or a missing binary or rules file is an
//! error naming the flag or the build command that fixes it.

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use crm_testkit::paths::{repo_root, try_nats_server_binary};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Every step, in the order they run (`--skip` names).
pub const STEPS: [&str; 10] = [
    "raw", "kv", "e2e", "latency", "rss", "cluster", "failover", "handoff", "merges", "cold",
];

#[derive(Parser, Debug)]
#[command(
    name = "crm-bench",
    about = "Benchmark of crm-node: JetStream baseline, end-to-end throughput, latency, memory, cluster scaling, failover, shard hand-off, identity merges, cold activation. Writes bench/results.json."
)]
pub struct Args {
    /// Small sizes for a smoke run (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Events of the raw and end-to-end throughput runs [default: 200000, --quick 20000].
    #[arg(long)]
    events: Option<u64>,
    /// Distinct customers stored for the memory figure [default: 1000000, --quick 20000].
    #[arg(long)]
    customers: Option<u64>,
    /// `resident_max_customers` of the memory run [default: 100000, --quick 5000].
    #[arg(long)]
    resident_cap: Option<u64>,
    /// Shards of every node started.
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Publishes awaiting their ack at once (raw, end-to-end and memory runs).
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Length of the latency run in seconds [default: 30, --quick 5].
    #[arg(long)]
    latency_seconds: Option<f64>,
    /// Purchases of the latency run (instead of --latency-seconds).
    #[arg(long)]
    latency_events: Option<u64>,
    /// Publish rate of the latency run, events/s [default: half the end-to-end rate].
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Customers the latency purchases rotate over (identified before the run).
    #[arg(long, default_value_t = 1000)]
    latency_customers: u64,
    /// Seconds to wait after the memory feed so the node's LRU pass (every 60 s with the
    /// default `passivate_after_s`) trims residency to the cap [default: 65, --quick 0].
    #[arg(long)]
    settle_seconds: Option<u64>,
    /// Customers stored for the cold-activation measure [default: 20000, --quick 3000].
    #[arg(long)]
    cold_customers: Option<u64>,
    /// Activations timed [default: 5000, --quick 1000].
    #[arg(long)]
    cold_samples: Option<u64>,
    /// Keys written by the identity-directory diagnostic (KV get miss + create, as the router
    /// does for a new identifier) [default: 50000, --quick 10000].
    #[arg(long)]
    kv_keys: Option<u64>,
    /// Cluster sizes of the `cluster` step, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    cluster_nodes: Vec<usize>,
    /// Events of the cluster throughput runs [default: --events; --quick 10000].
    #[arg(long)]
    cluster_events: Option<u64>,
    /// Publish rate of the cluster latency runs, the same for every size, events/s
    /// [default: half the first size's rate by the nodes' counters].
    #[arg(long)]
    cluster_latency_rate: Option<f64>,
    /// Failover runs (fresh server and 3 nodes each) [default: 3, --quick 1].
    #[arg(long)]
    failover_runs: Option<u32>,
    /// Paced load of the failover runs, events/s.
    #[arg(long, default_value_t = 200.0)]
    failover_rate: f64,
    /// Customers of the one shard handed off, one run per value, comma-separated
    /// [default: 10000,100000; --quick 1000].
    #[arg(long, value_delimiter = ',')]
    handoff_customers: Vec<u64>,
    /// Pairs of customers merged by the `merges` step's first part [default: 5000,
    /// --quick 1000].
    #[arg(long)]
    merge_pairs: Option<u64>,
    /// Events of each of the `merges` step's end-to-end runs (without and with links)
    /// [default: --events].
    #[arg(long)]
    merge_events: Option<u64>,
    /// Share of linking events (0 to 0.5) the `merges` step's run with links aims at.
    #[arg(long, default_value_t = 0.05)]
    link_share: f64,
    /// Seed of the generated traffic and of the samples.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Steps to skip, comma-separated: raw, kv, e2e, latency, rss, cluster, failover,
    /// handoff, merges, cold.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Keep every node's log in this directory (crm-node-<node id>-<pid>.log); default:
    /// none kept.
    #[arg(long)]
    node_logs: Option<PathBuf>,
    /// Results file [default: <repo>/bench/results.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The crm-node binary [default: crm-node next to this binary].
    #[arg(long)]
    crm_node: Option<PathBuf>,
    /// The nats-server binary [default: $NATS_SERVER_BIN, PATH, /usr/sbin, /usr/local/bin].
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Rules file of the nodes [default: <repo>/cluster-config/rules.toml].
    #[arg(long)]
    rules: Option<PathBuf>,
}

/// The resolved settings of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub events: u64,
    pub customers: u64,
    pub resident_cap: u64,
    pub shards: u32,
    pub in_flight: usize,
    pub latency_seconds: f64,
    pub latency_events: Option<u64>,
    pub latency_rate: Option<f64>,
    pub latency_customers: u64,
    pub settle_seconds: u64,
    pub cold_customers: u64,
    pub cold_samples: u64,
    pub kv_keys: u64,
    pub cluster_nodes: Vec<usize>,
    pub cluster_events: u64,
    pub cluster_latency_rate: Option<f64>,
    pub failover_runs: u32,
    pub failover_rate: f64,
    pub handoff_customers: Vec<u64>,
    pub merge_pairs: u64,
    pub merge_events: u64,
    pub link_share: f64,
    pub seed: u64,
    pub skip: BTreeSet<String>,
    pub node_logs: Option<PathBuf>,
    pub out: PathBuf,
    pub crm_node: PathBuf,
    pub nats_server: PathBuf,
    pub rules: PathBuf,
}

impl Plan {
    pub fn from_args(args: Args) -> Result<Plan> {
        let quick = args.quick;
        let pick = |value: Option<u64>, full: u64, small: u64| {
            value.unwrap_or(if quick { small } else { full })
        };
        for step in &args.skip {
            if !STEPS.contains(&step.as_str()) {
                bail!("--skip {step}: not a step; use {}", STEPS.join(", "));
            }
        }
        let events = pick(args.events, 200_000, 20_000).max(1);
        let mut cluster_nodes: Vec<usize> = args.cluster_nodes.iter().map(|&n| n.max(1)).collect();
        cluster_nodes.dedup();
        let handoff_customers = if args.handoff_customers.is_empty() {
            if quick {
                vec![1_000]
            } else {
                vec![10_000, 100_000]
            }
        } else {
            args.handoff_customers.iter().map(|&c| c.max(1)).collect()
        };
        if !(0.0..=0.5).contains(&args.link_share) {
            bail!(
                "--link-share {}: not a share of events; use a number from 0 to 0.5 (e.g. 0.05 for 5 %)",
                args.link_share
            );
        }
        let crm_node = match args.crm_node {
            Some(path) => path,
            None => std::env::current_exe()
                .context("cannot locate this binary")?
                .with_file_name("crm-node"),
        };
        let plan = Plan {
            quick,
            events,
            customers: pick(args.customers, 1_000_000, 20_000).max(1),
            resident_cap: pick(args.resident_cap, 100_000, 5_000).max(1),
            shards: args.shards.max(1),
            in_flight: args.in_flight.max(1),
            latency_seconds: args
                .latency_seconds
                .unwrap_or(if quick { 5.0 } else { 30.0 })
                .max(0.1),
            latency_events: args.latency_events,
            latency_rate: args.latency_rate,
            latency_customers: args.latency_customers.max(1),
            settle_seconds: pick(args.settle_seconds, 65, 0),
            cold_customers: pick(args.cold_customers, 20_000, 3_000).max(1),
            cold_samples: pick(args.cold_samples, 5_000, 1_000).max(1),
            kv_keys: pick(args.kv_keys, 50_000, 10_000).max(100),
            cluster_nodes,
            cluster_events: args
                .cluster_events
                .unwrap_or(if quick { events.min(10_000) } else { events })
                .max(1),
            cluster_latency_rate: args.cluster_latency_rate,
            failover_runs: args
                .failover_runs
                .unwrap_or(if quick { 1 } else { 3 })
                .max(1),
            failover_rate: args.failover_rate.max(1.0),
            handoff_customers,
            merge_pairs: pick(args.merge_pairs, 5_000, 1_000).max(1),
            merge_events: args.merge_events.unwrap_or(events).max(1),
            link_share: args.link_share,
            seed: args.seed,
            skip: args.skip.into_iter().collect(),
            node_logs: args.node_logs,
            out: args
                .out
                .unwrap_or_else(|| repo_root().join("bench/results.json")),
            crm_node,
            nats_server: match args.nats_server {
                Some(path) => path,
                None => try_nats_server_binary()
                    .map_err(|problem| anyhow::anyhow!("{problem}, or pass --nats-server"))?,
            },
            rules: args
                .rules
                .unwrap_or_else(|| repo_root().join("cluster-config/rules.toml")),
        };
        let needs_nats = STEPS.iter().any(|step| *step != "cold" && plan.runs(step));
        if needs_nats && !plan.crm_node.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release -p crm-node --bins` (scripts/bench does)",
                plan.crm_node.display()
            );
        }
        let rules = std::fs::canonicalize(&plan.rules)
            .with_context(|| format!("rules file {}", plan.rules.display()))?;
        Ok(Plan { rules, ..plan })
    }

    pub fn runs(&self, step: &str) -> bool {
        !self.skip.contains(step)
    }
}
