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
//! 8. `cold`: in-process, no NATS: `ShardEngine::view` of customers not resident, after the
//!    sled store was closed and reopened.
//!
//! Between 1 and 2 a diagnostic (`kv`) times the identity directory's KV round trips alone.
//! A wait that sees no progress for 30 s fails its step (a stalled node) instead of
//! hanging. For profiling, `CRM_BENCH_NATS_ARGS` adds arguments to the server's command
//! line (e.g. `--profile 6061` for Go's pprof endpoints), `CRM_BENCH_NODE_LIMITS` adds
//! `[limits]` lines to the node's config (`;`-separated, e.g.
//! `flush_interval_ms = 20;router_batch_max_events = 1024`) and `--node-logs DIR` keeps
//! the nodes' logs.

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Parser;
use crm_actors::codec;
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::ingest::{parse_ingest, IngestLimits};
use crm_actors::rules::Rules;
use crm_actors::shard_message::{CustomerCommand, ShardMessage};
use crm_actors::store::Store;
use crm_actors::time::{format_rfc3339, parse_rfc3339_ms};
use crm_node::loadgen::{Generator, GeneratorSpec};
use crm_node::subjects;
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the generated traffic starts (event time).
const TRAFFIC_START: &str = "2026-11-01T00:00:00Z";
/// Days of generated traffic the throughput events are spread over.
const TRAFFIC_DAYS: u32 = 7;
/// Scratch stream of the raw JetStream baseline.
const RAW_STREAM: &str = "BENCH_RAW";
/// Messages per pull request, as the router (`router_batch_max_events` default).
const PULL_BATCH_MAX: usize = 2048;
/// Unacked messages the raw consumer may hold, as the router (`ingest_max_ack_pending`).
const RAW_MAX_ACK_PENDING: i64 = 8192;
/// How long a node may take to log `crm-node ready`.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Node log lines kept for error messages.
const NODE_LOG_LINES_MAX: usize = 200;
/// Pause between two polls of the drain condition.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Publish attempts of one message before the bench gives up.
const PUBLISH_ATTEMPTS_MAX: u32 = 5;
/// Most memory-feed events published but not yet applied.
const FEED_BACKLOG_MAX: u64 = 10_000;
/// Memory-feed events published between two backlog checks.
const FEED_CHUNK: u64 = 2_000;
/// How often a long wait says what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long a wait may see no progress at all before it declares the node stalled.
const STALL_AFTER: Duration = Duration::from_secs(30);
/// Extra patience for the router's consumer (its default ack wait equals STALL_AFTER).
const ROUTER_ACK_WAIT_SLACK: Duration = Duration::from_secs(15);
/// How long the latency run waits for the last actor events after its last publish.
const LATENCY_TAIL_WAIT: Duration = Duration::from_secs(20);
/// Every step, in the order they run (`--skip` names).
const STEPS: [&str; 9] = [
    "raw", "kv", "e2e", "latency", "rss", "cluster", "failover", "handoff", "cold",
];
/// The node timeout of `crm-node status` (the default `node_timeout_ms`).
const STATUS_NODE_TIMEOUT: Duration = Duration::from_secs(4);
/// Pause between two cluster status reads while a failover or hand-off is timed.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// How long a cluster may take to own every shard as assigned, balanced.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a failover or hand-off may take before the run is declared failed.
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Load before the failover's kill, so that every shard is busy when its owner dies.
const FAILOVER_WARMUP: Duration = Duration::from_secs(3);
/// Node log lines kept with the instant they were read (cluster events; see `LOG_MARKS`).
const NODE_MARKS_MAX: usize = 50_000;
/// Node log lines kept with their arrival instant: what a failover or hand-off is made of.
const LOG_MARKS: [&str; 10] = [
    "crm-node ready",
    "serving shard",
    "shard started",
    "handing shard off",
    "snapshot written",
    "snapshot restored",
    "this node is the coordinator",
    "this node routes ingest",
    "shard assignment written",
    "lease",
];

#[derive(Parser, Debug)]
#[command(
    name = "crm-bench",
    about = "Benchmark of crm-node: JetStream baseline, end-to-end throughput, latency, memory, cluster scaling, failover, shard hand-off, cold activation. Writes bench/results.json."
)]
struct Args {
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
    /// Seed of the generated traffic and of the samples.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Steps to skip, comma-separated: raw, kv, e2e, latency, rss, cluster, failover,
    /// handoff, cold.
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
struct Plan {
    quick: bool,
    events: u64,
    customers: u64,
    resident_cap: u64,
    shards: u32,
    in_flight: usize,
    latency_seconds: f64,
    latency_events: Option<u64>,
    latency_rate: Option<f64>,
    latency_customers: u64,
    settle_seconds: u64,
    cold_customers: u64,
    cold_samples: u64,
    kv_keys: u64,
    cluster_nodes: Vec<usize>,
    cluster_events: u64,
    cluster_latency_rate: Option<f64>,
    failover_runs: u32,
    failover_rate: f64,
    handoff_customers: Vec<u64>,
    seed: u64,
    skip: HashSet<String>,
    node_logs: Option<PathBuf>,
    out: PathBuf,
    crm_node: PathBuf,
    nats_server: PathBuf,
    rules: PathBuf,
}

impl Plan {
    fn from_args(args: Args) -> Result<Plan> {
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
            seed: args.seed,
            skip: args.skip.into_iter().collect(),
            node_logs: args.node_logs,
            out: args
                .out
                .unwrap_or_else(|| repo_root().join("bench/results.json")),
            crm_node,
            nats_server: match args.nats_server {
                Some(path) => path,
                None => nats_server_binary()?,
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

    fn runs(&self, step: &str) -> bool {
        !self.skip.contains(step)
    }
}

/// The repository root (this file is `node/src/bin/crm-bench.rs`).
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$NATS_SERVER_BIN`, then `PATH`, then `/usr/sbin`, `/usr/local/bin`.
fn nats_server_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")]);
    dirs.iter()
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!("nats-server not found: run scripts/setup (or `apt-get install -y nats-server`), or pass --nats-server")
        })
}

// ---------------------------------------------------------------------------------------
// Processes and scratch directories: nothing outlives the bench.
// ---------------------------------------------------------------------------------------

/// Spawns `command` so that the child gets SIGKILL when this process dies, however it dies.
/// The fork happens on a thread that lives as long as the process, because
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends.
fn spawn_tied_to_this_process(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("bench-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in requests {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(error) = thread {
            eprintln!("warning: no spawner thread ({error}); children are killed on drop only");
        }
        Mutex::new(sender)
    });
    let mut command = command;
    // SAFETY: runs in the forked child before exec; prctl and getppid are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the bench exited during spawn"));
            }
            Ok(())
        });
    }
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Sends `signal` to our own child `child`.
fn signal_child(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; always reaps the child.
fn stop_child(child: &mut Child, grace: Duration) {
    signal_child(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A directory under the system temporary directory, removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new(label: &str) -> Result<ScratchDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "crm-bench-{label}-{}-{nanos:09}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free TCP port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Whether a NATS server on 127.0.0.1:`port` sends its `INFO` greeting.
fn accepts_clients(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
}

/// A private `nats-server -js` on a free port with its store in a scratch directory.
struct NatsServer {
    child: Option<Child>,
    pid: u32,
    port: u16,
    dir: ScratchDir,
}

impl NatsServer {
    fn start(binary: &Path, label: &str) -> Result<NatsServer> {
        let dir = ScratchDir::new(label)?;
        let log_path = dir.path.join("nats-server.log");
        let mut last_problem = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
            let mut command = Command::new(binary);
            command
                .arg("-js")
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .arg("-sd")
                .arg(dir.path.join("store"))
                .args(
                    std::env::var("CRM_BENCH_NATS_ARGS")
                        .unwrap_or_default()
                        .split_whitespace(),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let mut child = spawn_tied_to_this_process(command)
                .with_context(|| format!("cannot run {}", binary.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_problem = format!("exited with {status}");
                    break;
                }
                if accepts_clients(port) {
                    return Ok(NatsServer {
                        pid: child.id(),
                        child: Some(child),
                        port,
                        dir,
                    });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_problem = "did not accept clients within 10 s".to_string();
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let mut log = String::new();
        let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut log));
        bail!("nats-server {last_problem}; its log:\n{log}")
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
        // `dir` (the store) is removed after the process is gone.
        let _ = &self.dir;
    }
}

/// Node settings the bench changes from the defaults.
struct NodeSettings {
    node_id: String,
    shards: u32,
    resident_max_customers: Option<u64>,
}

impl NodeSettings {
    /// The one node of the single-node steps.
    fn single(shards: u32, resident_max_customers: Option<u64>) -> NodeSettings {
        NodeSettings {
            node_id: "bench-1".to_string(),
            shards,
            resident_max_customers,
        }
    }
}

/// A node log line of interest (see [`LOG_MARKS`]) and when the bench read it.
#[derive(Clone)]
struct LogMark {
    at: Instant,
    line: String,
}

/// A `crm-node run` process with its config and data in a scratch directory.
struct CrmNode {
    child: Option<Child>,
    pid: u32,
    node_id: String,
    shards: u32,
    log: Arc<Mutex<VecDeque<String>>>,
    marks: Arc<Mutex<Vec<LogMark>>>,
    ready: Arc<AtomicBool>,
    dir: ScratchDir,
}

impl CrmNode {
    fn start(plan: &Plan, nats_url: &str, settings: &NodeSettings) -> Result<CrmNode> {
        let mut node = CrmNode::spawn(plan, nats_url, settings)?;
        node.wait_ready()?;
        Ok(node)
    }

    /// Starts the process without waiting for `crm-node ready` (see [`CrmNode::wait_ready`]).
    fn spawn(plan: &Plan, nats_url: &str, settings: &NodeSettings) -> Result<CrmNode> {
        let dir = ScratchDir::new("node")?;
        let mut resident = settings
            .resident_max_customers
            .map(|cap| format!("resident_max_customers = {cap}\n"))
            .unwrap_or_default();
        // Experiments: extra `[limits]` lines for the node (e.g. flush_interval_ms = 20).
        if let Ok(extra) = std::env::var("CRM_BENCH_NODE_LIMITS") {
            resident.push_str(&extra.replace(';', "\n"));
            resident.push('\n');
        }
        let config = format!(
            "[node]\nnode_id = \"{node_id}\"\ndata_dir = \"{data}\"\n\n[nats]\nurl = \"{nats_url}\"\n\n\
             [cluster]\nname = \"crm-bench\"\nshards = {shards}\nidentity_secret = \"crm-bench-secret-0123456789\"\n\n\
             [limits]\ntick_interval_s = 0\n{resident}\n[rules]\npath = \"{rules}\"\n",
            node_id = settings.node_id,
            data = dir.path.join("data").display(),
            shards = settings.shards,
            rules = plan.rules.display(),
        );
        let config_path = dir.path.join("node.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(&plan.crm_node);
        command
            .args(["--nats-url", nats_url, "run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("CRM_IDENTITY_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied_to_this_process(command)
            .with_context(|| format!("cannot run {}", plan.crm_node.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let marks = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(AtomicBool::new(false));
        let mut keep = match &plan.node_logs {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("crm-node-{}-{}.log", settings.node_id, child.id()));
                say(format!("    node log: {}", path.display()));
                Some(std::fs::File::create(path)?)
            }
            None => None,
        };
        if let Some(stderr) = child.stderr.take() {
            let (log, marks, ready) = (log.clone(), marks.clone(), ready.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at = Instant::now();
                    if let Some(file) = keep.as_mut() {
                        use std::io::Write as _;
                        let _ = writeln!(file, "{line}");
                    }
                    if line.contains("crm-node ready") {
                        ready.store(true, Ordering::Release);
                    }
                    if LOG_MARKS.iter().any(|mark| line.contains(mark)) {
                        let mut marks = marks.lock().unwrap_or_else(|p| p.into_inner());
                        if marks.len() < NODE_MARKS_MAX {
                            marks.push(LogMark {
                                at,
                                line: strip_ansi(&line),
                            });
                        }
                    }
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if log.len() >= NODE_LOG_LINES_MAX {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        Ok(CrmNode {
            pid: child.id(),
            child: Some(child),
            node_id: settings.node_id.clone(),
            shards: settings.shards,
            log,
            marks,
            ready,
            dir,
        })
    }

    /// Waits until the node logs `crm-node ready`.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        while !self.ready.load(Ordering::Acquire) {
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "crm-node {} did not log 'crm-node ready' within {NODE_READY_TIMEOUT:?}:\n{}",
                    self.node_id,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// SIGKILL, no grace: the node dies holding its leases.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The marked log lines (see [`LOG_MARKS`]) read at or after `since`.
    fn marks_since(&self, since: Instant) -> Vec<LogMark> {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.iter().filter(|m| m.at >= since).cloned().collect()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "crm-node {} exited ({status}); its log:\n{}",
                    self.node_id,
                    self.log_tail()
                );
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let skip = log.len().saturating_sub(40);
        log.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Warnings and errors the node logged (the last ones kept).
    fn problems(&self) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }
}

/// `line` without terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of the `key=value` field `key` in a log line, e.g. `bytes` in
/// `snapshot written shard=0 seq=412 entries=10000 bytes=5242880 ms=91`.
fn log_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim_matches(|c| c == '"' || c == ',').to_string())
}

impl Drop for CrmNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
        let _ = &self.dir;
    }
}

// ---------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// User + system CPU seconds of a process (`self` or a pid) from `/proc/<pid>/stat`.
fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second.max(1.0))
}

/// Busy CPU seconds of the whole machine (all cores) from `/proc/stat`.
fn machine_busy_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let busy: f64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy / per_second.max(1.0))
}

/// CPU seconds of the server, the node, the bench and the whole machine at one instant.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    nats: f64,
    node: f64,
    bench: f64,
    machine: f64,
}

impl CpuSnapshot {
    fn take(nats_pid: u32, node_pid: Option<u32>) -> CpuSnapshot {
        CpuSnapshot::take_many(nats_pid, node_pid.as_slice())
    }

    /// The same with several nodes (`crm_node` sums them; a dead node counts 0 from then
    /// on, so take both ends of a span over the same live nodes).
    fn take_many(nats_pid: u32, node_pids: &[u32]) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            nats: proc_cpu_seconds(&nats_pid.to_string()).unwrap_or(0.0),
            node: node_pids
                .iter()
                .filter_map(|pid| proc_cpu_seconds(&pid.to_string()))
                .sum(),
            bench: proc_cpu_seconds("self").unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// CPU used since `self`, as JSON (seconds and cores busy on average). `other_cores` is
    /// what the rest of the machine used meanwhile: a busy neighbour skews every figure.
    fn since(&self, later: &CpuSnapshot) -> Value {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let (nats, node, bench) = (
            later.nats - self.nats,
            later.node - self.node,
            later.bench - self.bench,
        );
        json!({
            "wall_s": round(wall, 3),
            "nats_server_cpu_s": round(nats, 2),
            "crm_node_cpu_s": round(node, 2),
            "bench_cpu_s": round(bench, 2),
            "nats_server_cores": round(nats / wall, 2),
            "crm_node_cores": round(node / wall, 2),
            "bench_cores": round(bench / wall, 2),
            "other_cores": round(((later.machine - self.machine) - nats - node - bench).max(0.0) / wall, 2),
        })
    }
}

// ---------------------------------------------------------------------------------------
// NATS helpers
// ---------------------------------------------------------------------------------------

/// One message to publish with JetStream.
#[derive(Clone)]
struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

/// What [`publish_bounded`] did.
struct Published {
    first_publish: Instant,
    last_ack: Instant,
    count: u64,
    duplicates: u64,
}

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Publishes every message with at most `in_flight_max` acks outstanding; a message whose
/// publish or ack fails is sent again (the msg id dedups it). Bumps `progress` per ack.
async fn publish_bounded(
    js: &jetstream::Context,
    messages: impl IntoIterator<Item = Outgoing>,
    in_flight_max: usize,
    progress: Option<Arc<AtomicU64>>,
) -> Result<Published> {
    let mut in_flight: VecDeque<(Outgoing, u32, PublishAckFuture)> =
        VecDeque::with_capacity(in_flight_max);
    let mut retry: VecDeque<(Outgoing, u32)> = VecDeque::new();
    let mut source = messages.into_iter();
    let mut first_publish = None;
    let (mut count, mut duplicates) = (0u64, 0u64);
    loop {
        let next = retry
            .pop_front()
            .or_else(|| source.next().map(|message| (message, 0)));
        let Some((message, attempts)) = next else {
            let Some((message, attempts, ack)) = in_flight.pop_front() else {
                break;
            };
            settle(
                message,
                attempts,
                ack,
                &mut retry,
                &mut count,
                &mut duplicates,
                &progress,
            )
            .await?;
            continue;
        };
        first_publish.get_or_insert_with(Instant::now);
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.msg_id);
        match js.send_publish(message.subject.clone(), publish).await {
            Ok(ack) => in_flight.push_back((message, attempts + 1, ack)),
            Err(error) => {
                if attempts + 1 >= PUBLISH_ATTEMPTS_MAX {
                    bail!(
                        "publish to {} failed {} times: {error}",
                        message.subject,
                        attempts + 1
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                retry.push_back((message, attempts + 1));
            }
        }
        if in_flight.len() >= in_flight_max {
            if let Some((message, attempts, ack)) = in_flight.pop_front() {
                settle(
                    message,
                    attempts,
                    ack,
                    &mut retry,
                    &mut count,
                    &mut duplicates,
                    &progress,
                )
                .await?;
            }
        }
    }
    let now = Instant::now();
    Ok(Published {
        first_publish: first_publish.unwrap_or(now),
        last_ack: now,
        count,
        duplicates,
    })
}

async fn settle(
    message: Outgoing,
    attempts: u32,
    ack: PublishAckFuture,
    retry: &mut VecDeque<(Outgoing, u32)>,
    count: &mut u64,
    duplicates: &mut u64,
    progress: &Option<Arc<AtomicU64>>,
) -> Result<()> {
    match ack.await {
        Ok(ack) => {
            *count += 1;
            *duplicates += u64::from(ack.duplicate);
            if let Some(progress) = progress {
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
        Err(error) if attempts < PUBLISH_ATTEMPTS_MAX => {
            eprintln!(
                "    publish to {} not acked ({error}); sending it again",
                message.subject
            );
            retry.push_back((message, attempts));
            Ok(())
        }
        Err(error) => bail!(
            "publish to {} not acked after {attempts} attempts: {error}",
            message.subject
        ),
    }
}

/// `crm.node.stats` of the node, retried while nobody answers yet (the node subscribes its
/// stats responder around the time it logs `crm-node ready`).
async fn node_stats(client: &async_nats::Client) -> Result<Value> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subjects::NODE_STATS, Bytes::from_static(b"{}")),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => {
                return serde_json::from_slice(&reply.payload)
                    .context("crm.node.stats reply is not JSON")
            }
            Ok(Err(error)) if attempt < 100 => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(error)) => bail!("crm.node.stats: {error}"),
            Err(_) => bail!("no reply to crm.node.stats within 10 s"),
        }
    }
}

fn metric(stats: &Value, name: &str) -> u64 {
    stats["metrics"][name].as_u64().unwrap_or(0)
}

/// The node's counters that grew between two stats replies.
fn metrics_delta(before: &Value, after: &Value) -> Value {
    let mut delta = Map::new();
    if let Some(fields) = after["metrics"].as_object() {
        for (name, value) in fields {
            let grown = value
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(metric(before, name));
            delta.insert(name.clone(), json!(grown));
        }
    }
    Value::Object(delta)
}

/// How the node's identity-directory counters (`crm.node.stats` `identity`) grew.
fn identity_delta(before: &Value, after: &Value) -> Value {
    let mut delta = Map::new();
    if let Some(fields) = after["identity"].as_object() {
        for (name, value) in fields {
            let was = before["identity"][name].as_u64().unwrap_or(0);
            delta.insert(
                name.clone(),
                json!(value.as_u64().unwrap_or(0).saturating_sub(was)),
            );
        }
    }
    Value::Object(delta)
}

/// The router's durable consumer: (pending, unacked, ack floor stream sequence).
async fn router_progress(
    consumer: &mut jetstream::consumer::PullConsumer,
) -> Result<(u64, u64, u64)> {
    let info = consumer
        .info()
        .await
        .map_err(|e| anyhow!("router consumer info: {e}"))?;
    Ok((
        info.num_pending,
        info.num_ack_pending as u64,
        info.ack_floor.stream_sequence,
    ))
}

async fn router_consumer(js: &jetstream::Context) -> Result<jetstream::consumer::PullConsumer> {
    let stream = js
        .get_stream(subjects::INGEST_STREAM)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", subjects::INGEST_STREAM))?;
    stream
        .get_consumer(subjects::INGEST_DURABLE)
        .await
        .map_err(|e| anyhow!("consumer {}: {e}", subjects::INGEST_DURABLE))
}

/// Fails a wait when what it watches has not moved for [`STALL_AFTER`]: a node that
/// stopped making progress (a deadlock) ends the step instead of hanging the bench.
struct StallWatch {
    last: Option<(u64, u64, u64)>,
    since: Instant,
    limit: Duration,
}

impl StallWatch {
    fn new() -> StallWatch {
        StallWatch {
            last: None,
            since: Instant::now(),
            limit: STALL_AFTER,
        }
    }

    /// For the router's consumer: messages it holds unacked come back only after the
    /// consumer's ack wait (30 s by default, see [`RouterTail`]), which must not count as
    /// a stall.
    fn for_router() -> StallWatch {
        StallWatch {
            limit: STALL_AFTER + ROUTER_ACK_WAIT_SLACK,
            ..StallWatch::new()
        }
    }

    fn observe(&mut self, progress: (u64, u64, u64), what: &str) -> Result<()> {
        if self.last != Some(progress) {
            self.last = Some(progress);
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() >= self.limit {
            bail!(
                "no progress for {} s ({what}): the node is stalled (see 'Known problems' in docs/benchmark.md)",
                self.limit.as_secs()
            );
        }
        Ok(())
    }
}

/// When the drain condition became true.
struct Drained {
    /// The router had nothing pending or unacked.
    routed_at: Instant,
    /// Every shard's applied sequence had reached its last record.
    applied_at: Instant,
    stats: Value,
}

/// Waits until everything published so far is applied and flushed: the router's durable
/// consumer has nothing pending or unacked (it acks ingest only after the shard publish is
/// acked, so the shard logs are then complete), and every shard's `applied_seq` (from
/// `crm.node.stats`, recorded after the engine's commit and flush) has reached the last
/// record of `crm.shard.<n>`. The logic of `src/cluster_env.rs` `busy_logs`, split in two
/// phases so that each poll stays cheap.
async fn wait_applied(
    client: &async_nats::Client,
    node: &mut CrmNode,
    shards: u32,
    timeout: Duration,
) -> Result<Drained> {
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + timeout;
    let mut consumer = router_consumer(&js).await?;
    let mut last_report = Instant::now();
    let mut stall = StallWatch::for_router();
    let mut tail = RouterTail::default();
    let routed_at = loop {
        node.check_alive()?;
        let (pending, unacked, floor) = router_progress(&mut consumer).await?;
        stall.observe(
            (pending, unacked, floor),
            &format!("router: {pending} pending, {unacked} unacked"),
        )?;
        if pending == 0 && unacked == 0 {
            break Instant::now();
        }
        tail.observe(pending, unacked);
        if last_report.elapsed() >= PROGRESS_EVERY {
            say(format!(
                "    waiting for the router: {pending} pending, {unacked} unacked"
            ));
            last_report = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!("router not drained within {timeout:?}: {pending} pending, {unacked} unacked");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let shard_stream = js
        .get_stream(subjects::SHARDS_STREAM)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", subjects::SHARDS_STREAM))?;
    let mut last = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        let sequence = shard_stream
            .get_last_raw_message_by_subject(&subjects::shard(shard))
            .await
            .map(|m| m.sequence)
            .unwrap_or(0);
        last.push(sequence);
    }
    let mut stall = StallWatch::new();
    loop {
        node.check_alive()?;
        let stats = node_stats(client).await?;
        let behind = (0..shards as usize)
            .filter(|&shard| stats["applied_seq"][shard].as_u64().unwrap_or(0) < last[shard])
            .count();
        let applied_sum = (0..shards as usize)
            .map(|shard| stats["applied_seq"][shard].as_u64().unwrap_or(0))
            .sum();
        stall.observe(
            (applied_sum, behind as u64, 0),
            &format!("{behind} shards behind their log"),
        )?;
        if last_report.elapsed() >= PROGRESS_EVERY && behind > 0 {
            let lagging: Vec<String> = (0..shards as usize)
                .filter(|&shard| stats["applied_seq"][shard].as_u64().unwrap_or(0) < last[shard])
                .take(4)
                .map(|shard| {
                    format!(
                        "shard {shard} at {} of {}",
                        stats["applied_seq"][shard], last[shard]
                    )
                })
                .collect();
            say(format!(
                "    waiting for {behind} shards: {}",
                lagging.join(", ")
            ));
            last_report = Instant::now();
        }
        if behind == 0 {
            return Ok(Drained {
                routed_at,
                applied_at: Instant::now(),
                stats,
            });
        }
        if Instant::now() >= deadline {
            bail!("{behind} shards not applied within {timeout:?}");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What the latency run drives: one node, or a cluster of them.
trait Deployment {
    /// Fails when a node the run relies on has exited.
    fn check_alive(&mut self) -> Result<()>;
    /// The nodes' processes (for CPU accounting).
    fn node_pids(&self) -> Vec<u32>;
    /// `crm.node.stats`; for several nodes, every node's counters summed.
    async fn stats(&self, client: &async_nats::Client) -> Result<Value>;
    /// Waits until everything published so far is applied.
    async fn wait_applied(&mut self, client: &async_nats::Client, timeout: Duration) -> Result<()>;
}

impl Deployment for CrmNode {
    fn check_alive(&mut self) -> Result<()> {
        CrmNode::check_alive(self)
    }

    fn node_pids(&self) -> Vec<u32> {
        vec![self.pid]
    }

    async fn stats(&self, client: &async_nats::Client) -> Result<Value> {
        node_stats(client).await
    }

    async fn wait_applied(&mut self, client: &async_nats::Client, timeout: Duration) -> Result<()> {
        let shards = self.shards;
        wait_applied(client, self, shards, timeout)
            .await
            .map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------

fn traffic_start_ms() -> i64 {
    parse_rfc3339_ms(TRAFFIC_START).unwrap_or(0)
}

fn spec(customers: usize, seed: u64) -> GeneratorSpec {
    GeneratorSpec {
        customers,
        start_ms: traffic_start_ms(),
        days: TRAFFIC_DAYS,
        seed,
        duplicate_rate_percent: 0,
    }
}

/// The first `events` messages of generated multi-channel traffic (no duplicates), from a
/// population sized so that the generator's whole week yields about that many.
fn generated_traffic(events: u64, seed: u64) -> (Vec<Outgoing>, GeneratorSpec) {
    const PROBE_PEOPLE: usize = 2_000;
    let probe = Generator::new(spec(PROBE_PEOPLE, seed))
        .without_truth()
        .count();
    let per_person = (probe as f64 / PROBE_PEOPLE as f64).max(0.1);
    let mut people = ((events as f64 / per_person) * 1.02).ceil() as usize;
    loop {
        let spec = spec(people.max(10), seed);
        let messages: Vec<Outgoing> = Generator::new(spec.clone())
            .without_truth()
            .take(events as usize)
            .map(|event| Outgoing {
                subject: subjects::ingest(&event.channel),
                msg_id: event.event_id,
                payload: Bytes::from(event.payload),
            })
            .collect();
        if messages.len() as u64 >= events {
            return (messages, spec);
        }
        people = people * 3 / 2 + 10;
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and output
// ---------------------------------------------------------------------------------------

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], percent: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Count, mean and percentiles of `values` (any unit), as JSON.
fn summary(mut values: Vec<f64>, decimals: i32) -> Value {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return json!({"count": 0});
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    json!({
        "count": values.len(),
        "mean": round(mean, decimals),
        "p50": round(percentile(&values, 50.0), decimals),
        "p90": round(percentile(&values, 90.0), decimals),
        "p99": round(percentile(&values, 99.0), decimals),
        "p999": round(percentile(&values, 99.9), decimals),
        "max": round(values[values.len() - 1], decimals),
    })
}

/// Everything the run found, as it goes.
#[derive(Default)]
struct Report {
    top: Map<String, Value>,
    errors: Map<String, Value>,
}

impl Report {
    fn set(&mut self, key: &str, value: Value) {
        self.top.insert(key.to_string(), value);
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        self.top.get(key).and_then(Value::as_f64)
    }

    fn fail(&mut self, step: &str, error: anyhow::Error) {
        eprintln!("!!! {step} failed: {error:#}");
        self.errors
            .insert(step.to_string(), json!(format!("{error:#}")));
    }
}

fn say(text: impl AsRef<str>) {
    eprintln!("==> {}", text.as_ref());
}

// ---------------------------------------------------------------------------------------
// Step 1: raw JetStream baseline
// ---------------------------------------------------------------------------------------

async fn raw_jetstream(
    client: &async_nats::Client,
    traffic: &[Outgoing],
    plan: &Plan,
    nats_pid: u32,
) -> Result<Value> {
    let js = jetstream::new(client.clone());
    let duplicate_window = Duration::from_secs(120);
    let stream = js
        .create_stream(stream::Config {
            name: RAW_STREAM.to_string(),
            subjects: vec!["bench.raw.>".to_string()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the scratch stream {RAW_STREAM}: {e}"))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".to_string()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: RAW_MAX_ACK_PENDING,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the scratch consumer: {e}"))?;
    let messages = traffic.iter().map(|m| Outgoing {
        subject: format!(
            "bench.raw.{}",
            m.subject.rsplit('.').next().unwrap_or("web")
        ),
        msg_id: m.msg_id.clone(),
        payload: m.payload.clone(),
    });
    let cpu_before = CpuSnapshot::take(nats_pid, None);
    let published = publish_bounded(&js, messages, plan.in_flight, None).await?;
    let publish_done = Instant::now();
    let cpu_published = CpuSnapshot::take(nats_pid, None);
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH_MAX)
        .messages()
        .await
        .map_err(|e| anyhow!("cannot pull the scratch stream: {e}"))?;
    let expected = published.count - published.duplicates;
    let mut consumed = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while consumed < expected {
        let next = tokio::time::timeout_at(deadline.into(), pulled.next())
            .await
            .map_err(|_| anyhow!("consumed only {consumed} of {expected} in 600 s"))?;
        let message = next
            .ok_or_else(|| anyhow!("the pull stream ended"))?
            .map_err(|e| anyhow!("pull: {e}"))?;
        message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        consumed += 1;
    }
    client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    let last_ack = Instant::now();
    let cpu_after = CpuSnapshot::take(nats_pid, None);
    drop(pulled);
    let seconds = last_ack
        .duration_since(published.first_publish)
        .as_secs_f64();
    let publish_seconds = publish_done
        .duration_since(published.first_publish)
        .as_secs_f64();
    let consume_seconds = last_ack.duration_since(publish_done).as_secs_f64();
    let _ = js.delete_stream(RAW_STREAM).await;
    Ok(json!({
        "events": consumed,
        "seconds": round(seconds, 3),
        "events_per_s": round(consumed as f64 / seconds.max(1e-9), 0),
        "publish_seconds": round(publish_seconds, 3),
        "publish_events_per_s": round(published.count as f64 / publish_seconds.max(1e-9), 0),
        "consume_seconds": round(consume_seconds, 3),
        "consume_events_per_s": round(consumed as f64 / consume_seconds.max(1e-9), 0),
        "in_flight": plan.in_flight,
        "pull_batch": PULL_BATCH_MAX,
        "cpu_publish": cpu_before.since(&cpu_published),
        "cpu_consume": cpu_published.since(&cpu_after),
    }))
}

// ---------------------------------------------------------------------------------------
// Diagnostic: the identity directory's KV operations alone
// ---------------------------------------------------------------------------------------

/// A 64-hex key like the identity directory's HMAC keys (distinct for every `index`).
fn kv_key(index: u64) -> String {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}{:048x}", z ^ (z >> 31), index)
}

/// What the router pays per new identifier, without the node: a KV `get` that misses then a
/// KV `create`, one after the other, on a bucket configured like `crm_identity`, as it
/// grows to `keys` keys (mean microseconds per tenth); then the same creates with 64 in
/// flight, to show what pipelining the router's look-ups would buy.
async fn kv_diagnostic(client: &async_nats::Client, keys: u64) -> Result<Value> {
    const BUCKET: &str = "bench_identity";
    const PIPELINE: usize = 64;
    let js = jetstream::new(client.clone());
    let kv = crm_node::jetstream::ensure_kv(&js, BUCKET, 1)
        .await
        .map_err(|e| anyhow!("scratch bucket: {e}"))?;
    let value = Bytes::from_static(b"c0123456789abcdef01234567");
    let window = (keys / 10).max(1);
    let mut windows = Vec::new();
    let (mut get_us, mut create_us) = (0.0f64, 0.0f64);
    let started = Instant::now();
    for index in 0..keys {
        let key = kv_key(index);
        let before = Instant::now();
        let found = kv.get(&key).await.map_err(|e| anyhow!("kv get: {e}"))?;
        let between = Instant::now();
        if found.is_some() {
            bail!("kv key {key} exists before it was created");
        }
        kv.create(&key, value.clone())
            .await
            .map_err(|e| anyhow!("kv create: {e}"))?;
        get_us += between.duration_since(before).as_secs_f64() * 1e6;
        create_us += between.elapsed().as_secs_f64() * 1e6;
        if (index + 1) % window == 0 {
            windows.push(json!({"keys_after": index + 1,
                "get_miss_mean_us": round(get_us / window as f64, 1),
                "create_mean_us": round(create_us / window as f64, 1)}));
            get_us = 0.0;
            create_us = 0.0;
        }
    }
    let sequential_seconds = started.elapsed().as_secs_f64();
    let pipelined_keys = window * 2;
    let started = Instant::now();
    let creates = futures::stream::iter(keys..keys + pipelined_keys)
        .map(|index| {
            let (kv, value) = (kv.clone(), value.clone());
            async move { kv.create(kv_key(index), value).await }
        })
        .buffer_unordered(PIPELINE)
        .collect::<Vec<_>>()
        .await;
    let pipelined_seconds = started.elapsed().as_secs_f64();
    let failed = creates.iter().filter(|r| r.is_err()).count();
    let _ = js.delete_stream(subjects::kv_stream(BUCKET)).await;
    Ok(json!({
        "keys": keys,
        "sequential_get_then_create_per_s": round(keys as f64 / sequential_seconds.max(1e-9), 0),
        "windows": windows,
        "pipelined_creates": pipelined_keys,
        "pipelined_in_flight": PIPELINE,
        "pipelined_creates_per_s": round(pipelined_keys as f64 / pipelined_seconds.max(1e-9), 0),
        "pipelined_failures": failed,
    }))
}

// ---------------------------------------------------------------------------------------
// Step 2: end-to-end throughput
// ---------------------------------------------------------------------------------------

async fn end_to_end(
    client: &async_nats::Client,
    node: &mut CrmNode,
    traffic: Vec<Outgoing>,
    plan: &Plan,
    nats_pid: u32,
) -> Result<Value> {
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
    let cpu_before = CpuSnapshot::take(nats_pid, Some(node.pid));
    let published = publish_bounded(&js, traffic, plan.in_flight, Some(acked)).await?;
    let cpu_published = CpuSnapshot::take(nats_pid, Some(node.pid));
    let timeout = Duration::from_secs(120 + events / 200);
    let drained = wait_applied(client, node, plan.shards, timeout).await;
    stop.store(true, Ordering::Relaxed);
    let timeline = monitor.await.unwrap_or_default();
    let drained = drained?;
    let cpu_after = CpuSnapshot::take(nats_pid, Some(node.pid));
    let first = published.first_publish;
    let seconds = drained.applied_at.duration_since(first).as_secs_f64();
    let delta = metrics_delta(&stats_before, &drained.stats);
    let batches = delta["shard_batches"].as_u64().unwrap_or(0);
    let shard_messages = delta["shard_messages"].as_u64().unwrap_or(0);
    let shard_commands = delta["shard_commands"].as_u64().unwrap_or(0);
    Ok(json!({
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events as f64 / seconds.max(1e-9), 0),
        "publish_done_s": round(published.last_ack.duration_since(first).as_secs_f64(), 3),
        "routed_done_s": round(drained.routed_at.duration_since(first).as_secs_f64(), 3),
        "applied_done_s": round(seconds, 3),
        "duplicates_acked": published.duplicates,
        "in_flight": plan.in_flight,
        "shards": plan.shards,
        "node_counters": delta,
        "identity_counters": identity_delta(&stats_before, &drained.stats),
        "mean_shard_batch_messages": round(shard_messages as f64 / (batches.max(1)) as f64, 2),
        "mean_shard_batch_commands": round(shard_commands as f64 / (batches.max(1)) as f64, 2),
        "cpu_while_publishing": cpu_before.since(&cpu_published),
        "cpu_after_publishing": cpu_published.since(&cpu_after),
        "cpu_total": cpu_before.since(&cpu_after),
        "timeline": timeline,
    }))
}

/// Samples every second: events acked by JetStream, routed (router ack floor), applied
/// (shard messages the node processed), until `stop`.
async fn progress_timeline(
    client: async_nats::Client,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> Vec<Value> {
    let js = jetstream::new(client.clone());
    let mut consumer = router_consumer(&js).await.ok();
    let base = match node_stats(&client).await {
        Ok(stats) => metric(&stats, "shard_commands"),
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
            .map(|s| metric(&s, "shard_commands").saturating_sub(base));
        samples.push(json!({
            "t_s": round(started.elapsed().as_secs_f64(), 2),
            "published": acked.load(Ordering::Relaxed),
            "routed": routed.map(|r| r.saturating_sub(routed_base)),
            "applied": applied,
        }));
    }
    samples
}

// ---------------------------------------------------------------------------------------
// Step 3: latency at a fixed rate
// ---------------------------------------------------------------------------------------

fn latency_email(customer: u64) -> String {
    format!("bench-lat-{customer:06}@example.com")
}

fn latency_event_id(index: u64) -> String {
    format!("lat-{index}")
}

/// The index in a `lat-<i>` event id (also the prefix of actor event ids).
fn latency_index(id: &str) -> Option<usize> {
    id.split(':').next()?.strip_prefix("lat-")?.parse().ok()
}

async fn latency(
    client: &async_nats::Client,
    target: &mut impl Deployment,
    plan: &Plan,
    rate: f64,
    nats_pid: u32,
) -> Result<Value> {
    let js = jetstream::new(client.clone());
    // Identify every customer of the run first, so purchases hit known, resident customers.
    let base_ms = traffic_start_ms() + 30 * 86_400_000;
    let identifies = (0..plan.latency_customers).map(|c| {
        let body = json!({"v": 1, "event_id": format!("lat-id-{c}"), "type": "identify",
            "occurred_at": format_rfc3339(base_ms), "identity": {"email": latency_email(c)},
            "profile": {"first_name": "Bench"}});
        Outgoing {
            subject: subjects::ingest("web"),
            msg_id: format!("lat-id-{c}"),
            payload: Bytes::from(body.to_string()),
        }
    });
    publish_bounded(&js, identifies, plan.in_flight, None).await?;
    target
        .wait_applied(client, Duration::from_secs(300))
        .await?;
    let stats_before = target.stats(client).await?;

    let count = plan
        .latency_events
        .unwrap_or((rate * plan.latency_seconds).round() as u64)
        .max(1) as usize;
    let sent_ns: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let earned = client
        .subscribe(subjects::events_of_type("points.earned"))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    let routed = client
        .subscribe(format!("{}.>", subjects::SHARD_PREFIX))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let earned_task = tokio::spawn(match_arrivals(
        earned,
        sent_ns.clone(),
        t0,
        stop.clone(),
        |payload: &[u8]| {
            let event: Option<Value> = serde_json::from_slice(payload).ok();
            event
                .and_then(|event| latency_index(event["id"].as_str()?))
                .into_iter()
                .collect()
        },
    ));
    let routed_task = tokio::spawn(match_arrivals(
        routed,
        sent_ns.clone(),
        t0,
        stop.clone(),
        |payload: &[u8]| {
            let event_index = |command: &CustomerCommand| match command {
                CustomerCommand::Event { event, .. } => latency_index(&event.event_id),
                _ => None,
            };
            match codec::decode::<ShardMessage>(payload) {
                Ok(ShardMessage::Customer { command, .. }) => {
                    event_index(&command).into_iter().collect()
                }
                // The router batches: a record holds the events of one chunk for its shard.
                Ok(ShardMessage::Routed { entries }) => entries
                    .iter()
                    .filter_map(|entry| event_index(&entry.command))
                    .collect(),
                _ => Vec::new(),
            }
        },
    ));
    // PubAcks are awaited by their own task so that they never hold back the schedule.
    let (ack_sender, mut ack_receiver) =
        tokio::sync::mpsc::channel::<(Instant, PublishAckFuture)>(plan.in_flight.max(1));
    let ack_task = tokio::spawn(async move {
        let mut ack_ms = Vec::new();
        let mut failures = 0u64;
        while let Some((sent, ack)) = ack_receiver.recv().await {
            match ack.await {
                Ok(_) => ack_ms.push(sent.elapsed().as_secs_f64() * 1000.0),
                Err(_) => failures += 1,
            }
        }
        (ack_ms, failures)
    });

    let cpu_before = CpuSnapshot::take_many(nats_pid, &target.node_pids());
    let interval_s = 1.0 / rate.max(1e-3);
    let start = Instant::now();
    for index in 0..count {
        let due = start + Duration::from_secs_f64(index as f64 * interval_s);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let customer = index as u64 % plan.latency_customers;
        let event_id = latency_event_id(index as u64);
        let body = json!({"v": 1, "event_id": event_id, "type": "purchase",
            "occurred_at": format_rfc3339(base_ms + 1000 + index as i64 * 1000),
            "identity": {"email": latency_email(customer)},
            "order_id": format!("lat-o-{index}"), "amount": 59.90, "currency": "EUR",
            "items": [{"sku": "sku-1", "category": "shoes", "qty": 1, "price": 49.90},
                      {"sku": "sku-2", "category": "socks", "qty": 2, "price": 5.00}]});
        let payload = Bytes::from(body.to_string());
        let sent = Instant::now();
        sent_ns[index].store(
            sent.duration_since(t0).as_nanos() as u64 + 1,
            Ordering::Release,
        );
        let publish = PublishMessage::build()
            .payload(payload)
            .message_id(&event_id);
        let ack = js
            .send_publish(subjects::ingest("web"), publish)
            .await
            .map_err(|e| anyhow!("publish {event_id}: {e}"))?;
        ack_sender
            .send((sent, ack))
            .await
            .map_err(|_| anyhow!("the ack task ended"))?;
    }
    let publish_seconds = start.elapsed().as_secs_f64();
    drop(ack_sender);
    let cpu_published = CpuSnapshot::take_many(nats_pid, &target.node_pids());
    let wait_until = Instant::now() + LATENCY_TAIL_WAIT;
    while Instant::now() < wait_until && !earned_task.is_finished() {
        target.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (earned_ms, earned_missing, earned_worst) = earned_task.await.context("earned matcher")?;
    let (routed_ms, routed_missing, routed_worst) = routed_task.await.context("routed matcher")?;
    let (ack_ms, ack_failures) = ack_task.await.context("ack task")?;
    let stats_after = target.stats(client).await?;
    let e2e = summary(earned_ms, 2);
    Ok(json!({
        "target_rate_per_s": round(rate, 1),
        "achieved_rate_per_s": round(count as f64 / publish_seconds.max(1e-9), 1),
        "events": count,
        "customers": plan.latency_customers,
        "seconds": round(publish_seconds, 2),
        "publish_to_points_earned_ms": e2e,
        "publish_to_shard_log_ms": summary(routed_ms, 2),
        "publish_to_pub_ack_ms": summary(ack_ms, 2),
        "points_earned_worst_ms_by_second": earned_worst,
        "shard_log_worst_ms_by_second": routed_worst,
        "points_earned_missing": earned_missing,
        "shard_log_missing": routed_missing,
        "pub_ack_failures": ack_failures,
        "node_counters": metrics_delta(&stats_before, &stats_after),
        "cpu": cpu_before.since(&cpu_published),
    }))
}

/// Receives messages until every sent index was matched once or `stop`; returns the
/// latencies (ms from the recorded send instant), how many indices were never matched, and
/// the worst latency of the events sent in each second of the run (to place outliers).
async fn match_arrivals(
    mut subscription: async_nats::Subscriber,
    sent_ns: Arc<Vec<AtomicU64>>,
    t0: Instant,
    stop: Arc<AtomicBool>,
    indexes_of: impl Fn(&[u8]) -> Vec<usize>,
) -> (Vec<f64>, u64, Vec<f64>) {
    let total = sent_ns.len();
    let mut matched = vec![false; total];
    let mut latencies = Vec::with_capacity(total);
    let mut worst_by_second: Vec<f64> = Vec::new();
    while latencies.len() < total && !stop.load(Ordering::Relaxed) {
        let next = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await;
        let message = match next {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(_) => continue,
        };
        let arrived = t0.elapsed().as_nanos() as u64;
        for index in indexes_of(&message.payload) {
            if index >= total || matched[index] {
                continue;
            }
            let sent = sent_ns[index].load(Ordering::Acquire);
            if sent == 0 {
                continue;
            }
            matched[index] = true;
            let latency_ms = arrived.saturating_sub(sent - 1) as f64 / 1e6;
            latencies.push(latency_ms);
            let second = ((sent - 1) / 1_000_000_000) as usize;
            if worst_by_second.len() <= second {
                worst_by_second.resize(second + 1, 0.0);
            }
            worst_by_second[second] = worst_by_second[second].max(round(latency_ms, 1));
        }
    }
    let missing = (total - latencies.len()) as u64;
    (latencies, missing, worst_by_second)
}

// ---------------------------------------------------------------------------------------
// Step 4: memory with many stored customers
// ---------------------------------------------------------------------------------------

async fn memory(plan: &Plan) -> Result<Value> {
    let nats = NatsServer::start(&plan.nats_server, "nats-rss")?;
    let mut node = CrmNode::start(
        plan,
        &nats.url(),
        &NodeSettings::single(plan.shards, Some(plan.resident_cap)),
    )?;
    let client = connect(&nats.url()).await?;
    let rss_start = proc_status_mib(node.pid, "VmRSS:").unwrap_or(0.0);
    let customers = plan.customers;
    let acked = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuSnapshot::take(nats.pid, Some(node.pid));
    let started = Instant::now();
    let publisher = spawn_customer_feed(&client, customers, plan.in_flight, acked.clone());
    let _publisher_guard = AbortOnDrop::new(&publisher);
    let mut samples = Vec::new();
    let mut at_cap: Option<Value> = None;
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(600 + customers / 100);
    // Sample once a second until every customer is applied.
    let mut stall = StallWatch::new();
    let applied = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.check_alive()?;
        let stats = node_stats(&client).await?;
        let applied = metric(&stats, "applied");
        stall.observe(
            (applied, acked.load(Ordering::Relaxed), 0),
            &format!("{applied} of {customers} customers stored"),
        )?;
        let rss = proc_status_mib(node.pid, "VmRSS:").unwrap_or(0.0);
        let t_s = started.elapsed().as_secs_f64();
        samples.push(
            json!({"t_s": round(t_s, 1), "published": acked.load(Ordering::Relaxed),
            "applied": applied, "rss_mib": round(rss, 1)}),
        );
        if at_cap.is_none() && applied >= plan.resident_cap {
            at_cap =
                Some(json!({"applied": applied, "rss_mib": round(rss, 1), "t_s": round(t_s, 1)}));
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
        if publisher.is_finished() && metric(&stats, "dead_lettered") > 0 {
            bail!(
                "the node dead-lettered {} visits",
                metric(&stats, "dead_lettered")
            );
        }
    };
    let published = publisher.await.context("publisher")??;
    let drained = wait_applied(&client, &mut node, plan.shards, Duration::from_secs(600)).await?;
    let cpu_after = CpuSnapshot::take(nats.pid, Some(node.pid));
    let feed_seconds = drained
        .applied_at
        .duration_since(published.first_publish)
        .as_secs_f64();
    let rss_fed = proc_status_mib(node.pid, "VmRSS:").unwrap_or(0.0);
    if plan.settle_seconds > 0 {
        say(format!(
            "    waiting {} s for the node's passivation pass",
            plan.settle_seconds
        ));
        tokio::time::sleep(Duration::from_secs(plan.settle_seconds)).await;
    }
    let rss_settled = proc_status_mib(node.pid, "VmRSS:").unwrap_or(0.0);
    let hwm = proc_status_mib(node.pid, "VmHWM:").unwrap_or(0.0);
    let stats = node_stats(&client).await?;
    let stored = stats["metrics"]["stored_customers"]
        .as_u64()
        .or_else(|| stats["stored_customers"].as_u64());
    let sled_bytes = dir_bytes(&node.dir.path.join("data"));
    let rss_at_cap = at_cap
        .as_ref()
        .and_then(|c| c["rss_mib"].as_f64())
        .unwrap_or(f64::NAN);
    drop(node);
    drop(nats);
    Ok(json!({
        "customers_published": published.count,
        "customers_applied": applied,
        "stored_customers_reported": stored,
        "resident_cap": plan.resident_cap,
        "rss_mib_at_start": round(rss_start, 1),
        "rss_mib_resident_cap": round(rss_at_cap, 1),
        "at_cap": at_cap,
        "rss_mib_end_of_feed": round(rss_fed, 1),
        "rss_mib_after_settle": round(rss_settled, 1),
        "settle_seconds": plan.settle_seconds,
        "rss_mib_peak": round(hwm, 1),
        "sled_dir_mib": round(sled_bytes as f64 / 1048576.0, 1),
        "feed_seconds": round(feed_seconds, 1),
        "new_customers_per_s": round(published.count as f64 / feed_seconds.max(1e-9), 0),
        "cpu": cpu_before.since(&cpu_after),
        "samples": samples,
    }))
}

/// Aborts a background task when the step that spawned it ends, however it ends (a step
/// that fails half-way must not leave a publisher running into the next one).
struct AbortOnDrop(tokio::task::AbortHandle);

impl AbortOnDrop {
    fn new<T>(task: &tokio::task::JoinHandle<T>) -> AbortOnDrop {
        AbortOnDrop(task.abort_handle())
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One `visit` of the new customer `bench-<i>` (the memory feed's event).
fn visit_of_new_customer(i: u64) -> Outgoing {
    let event_id = format!("m-{i}");
    let body = format!(
        r#"{{"v":1,"event_id":"{event_id}","type":"visit","occurred_at":"{}","identity":{{"customer_id":"bench-{i:09}"}}}}"#,
        format_rfc3339(traffic_start_ms() + i as i64)
    );
    Outgoing {
        subject: subjects::ingest("store"),
        msg_id: event_id,
        payload: Bytes::from(body),
    }
}

/// Publishes one `visit` per new customer (`bench-0` .. `bench-<customers - 1>`), bumping
/// `acked` per ack. The feed keeps at most FEED_BACKLOG_MAX events published but not
/// applied (the `applied` counter of `crm.node.stats`: one node), as a steady adapter
/// would, instead of dumping every customer into the ingest stream at once (a huge
/// backlog makes nats-server 2.9's filtered consumers slower).
fn spawn_customer_feed(
    client: &async_nats::Client,
    customers: u64,
    in_flight: usize,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<Published>> {
    let client = client.clone();
    let js = jetstream::new(client.clone());
    tokio::spawn(async move {
        let mut first_publish = None;
        let mut count = 0;
        let mut start = 0;
        while start < customers {
            loop {
                let applied = metric(&node_stats(&client).await?, "applied");
                if acked.load(Ordering::Relaxed).saturating_sub(applied) <= FEED_BACKLOG_MAX {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let end = (start + FEED_CHUNK).min(customers);
            let published = publish_bounded(
                &js,
                (start..end).map(visit_of_new_customer),
                in_flight,
                Some(acked.clone()),
            )
            .await?;
            first_publish.get_or_insert(published.first_publish);
            count += published.count;
            start = end;
        }
        let now = Instant::now();
        Ok::<Published, anyhow::Error>(Published {
            first_publish: first_publish.unwrap_or(now),
            last_ack: now,
            count,
            duplicates: 0,
        })
    })
}

/// Total size of the files under `path`.
fn dir_bytes(path: &Path) -> u64 {
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

// ---------------------------------------------------------------------------------------
// Clusters: several nodes on one server
// ---------------------------------------------------------------------------------------

/// A private server and nodes `node-1` .. `node-<n>` on it, each with its own sled.
struct BenchCluster {
    /// Dropped first: the nodes stop before the server.
    nodes: Vec<CrmNode>,
    shards: u32,
    client: async_nats::Client,
    js: jetstream::Context,
    nats: NatsServer,
}

impl BenchCluster {
    /// A fresh server and `nodes` nodes: `node-1` first (it creates the streams and
    /// buckets), then the others at once.
    async fn start(plan: &Plan, label: &str, nodes: usize, shards: u32) -> Result<BenchCluster> {
        let nats = NatsServer::start(&plan.nats_server, label)?;
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
    fn add_nodes(&mut self, plan: &Plan, count: usize) -> Result<()> {
        let first = self.nodes.len();
        let url = self.nats.url();
        for index in first..first + count {
            let settings = NodeSettings {
                node_id: format!("node-{}", index + 1),
                shards: self.shards,
                resident_max_customers: None,
            };
            self.nodes.push(CrmNode::spawn(plan, &url, &settings)?);
        }
        for node in &mut self.nodes[first..] {
            node.wait_ready()?;
        }
        Ok(())
    }

    fn node_ids(&self) -> Vec<String> {
        self.live().map(|n| n.node_id.clone()).collect()
    }

    fn live(&self) -> impl Iterator<Item = &CrmNode> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    fn node(&self, id: &str) -> Option<&CrmNode> {
        self.nodes.iter().find(|n| n.node_id == id)
    }

    fn kill(&mut self, id: &str) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.node_id == id) {
            node.kill();
        }
    }

    async fn status(&self) -> Result<Value> {
        crm_node::cluster::status::gather(&self.js, STATUS_NODE_TIMEOUT)
            .await
            .map_err(|e| anyhow!("cluster status: {e}"))
    }

    /// Every node's marked log lines read at or after `since`, in time order, with the node.
    fn marks_since(&self, since: Instant) -> Vec<(String, LogMark)> {
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
    fn log_tails(&self) -> String {
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
            if let Some(child) = node.child.as_ref() {
                signal_child(child, libc::SIGTERM);
            }
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
        self.live().map(|n| n.pid).collect()
    }

    async fn stats(&self, client: &async_nats::Client) -> Result<Value> {
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
fn spawn_commands_watch(
    client: async_nats::Client,
    nodes: usize,
    target: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(replies) = all_node_stats(&client, nodes).await {
                if replies.len() == nodes
                    && metric(&sum_stats(&replies), "shard_commands") >= target
                {
                    return Some(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
}

/// `crm.node.stats` of every node: one request, the replies of up to `expected` nodes
/// (whoever answers within 2 s).
async fn all_node_stats(client: &async_nats::Client, expected: usize) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies_sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    client
        .publish_with_reply(subjects::NODE_STATS, inbox, Bytes::from_static(b"{}"))
        .await
        .map_err(|e| anyhow!("crm.node.stats: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut replies = Vec::new();
    while replies.len() < expected {
        match tokio::time::timeout_at(deadline, replies_sub.next()).await {
            Ok(Some(message)) => {
                if let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
                    replies.push(value);
                }
            }
            _ => break,
        }
    }
    let _ = replies_sub.unsubscribe().await;
    if replies.is_empty() {
        bail!("no node answered crm.node.stats within 2 s");
    }
    Ok(replies)
}

/// The nodes' `metrics` and `identity` counters summed (what [`metrics_delta`] reads).
fn sum_stats(replies: &[Value]) -> Value {
    let sum = |section: &str| {
        let mut total = Map::new();
        for reply in replies {
            for (name, value) in reply[section].as_object().into_iter().flatten() {
                let was = total.get(name).and_then(Value::as_u64).unwrap_or(0);
                total.insert(name.clone(), json!(was + value.as_u64().unwrap_or(0)));
            }
        }
        Value::Object(total)
    };
    json!({
        "nodes": replies.iter().map(|r| r["node_id"].clone()).collect::<Vec<_>>(),
        "metrics": sum("metrics"),
        "identity": sum("identity"),
    })
}

/// The apply audit (`crm.audit.<n>`, one record per applied batch, published by the owner
/// after the batch is committed and flushed) as it arrives: when each shard's applied
/// sequence reached each value, and when each (shard, node) applied its first batch.
struct AuditWatch {
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
    async fn start(client: &async_nats::Client, shards: u32) -> Result<AuditWatch> {
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
                    let Ok(record) = serde_json::from_slice::<Value>(&message.payload) else {
                        continue;
                    };
                    let (Some(shard), Some(last)) =
                        (record["shard"].as_u64(), record["last_seq"].as_u64())
                    else {
                        continue;
                    };
                    let node = record["node"].as_str().unwrap_or("?").to_string();
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.records += 1;
                    seen.first_batch.entry((shard as u32, node)).or_insert(at);
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
    fn reached(&self, shard: u32, seq: u64) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let list = seen.reached.get(shard as usize)?;
        let index = list.partition_point(|(s, _)| *s < seq);
        list.get(index).map(|(_, at)| *at)
    }

    /// The highest sequence audited for `shard`.
    fn top(&self, shard: u32) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.reached
            .get(shard as usize)
            .and_then(|l| l.last())
            .map(|(s, _)| *s)
            .unwrap_or(0)
    }

    /// When `node` applied its first batch of `shard`.
    fn first_batch(&self, shard: u32, node: &str) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.first_batch.get(&(shard, node.to_string())).copied()
    }

    fn records(&self) -> u64 {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).records
    }
}

impl Drop for AuditWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The last sequence of every shard's log (0: none yet).
async fn shard_log_ends(js: &jetstream::Context, shards: u32) -> Result<Vec<u64>> {
    let stream = js
        .get_stream(subjects::SHARDS_STREAM)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", subjects::SHARDS_STREAM))?;
    let mut last = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        let sequence = stream
            .get_last_raw_message_by_subject(&subjects::shard(shard))
            .await
            .map(|m| m.sequence)
            .unwrap_or(0);
        last.push(sequence);
    }
    Ok(last)
}

/// The router's durable consumer: (pending, unacked), `None` while it does not exist yet.
async fn router_backlog(js: &jetstream::Context) -> Option<(u64, u64)> {
    let mut consumer = router_consumer(js).await.ok()?;
    router_progress(&mut consumer)
        .await
        .ok()
        .map(|(pending, unacked, _)| (pending, unacked))
}

/// The alive nodes of a status and the shards each one's heartbeat says it serves.
fn serving_nodes(status: &Value) -> BTreeMap<String, HashSet<u64>> {
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|node| node["alive"] == true)
        .filter_map(|node| {
            let id = node["node_id"].as_str()?.to_string();
            let shards = node["shards"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            Some((id, shards))
        })
        .collect()
}

/// What keeps a cluster of `nodes` from being settled (`None`: settled): every shard's
/// lease held by its assigned node, which is alive and serves it (its heartbeat lists the
/// shard) with lag 0; the shards balanced over `nodes` (counts differ by at most one);
/// a coordinator and a router.
fn unsettled(status: &Value, nodes: &[String]) -> Option<String> {
    let shards = status["shards"].as_array()?;
    let serving = serving_nodes(status);
    let mut problems = Vec::new();
    if status["coordinator"].is_null() {
        problems.push("no coordinator".to_string());
    }
    if status["router"].is_null() {
        problems.push("no router".to_string());
    }
    let (mut unowned, mut moving, mut unserved, mut lagging) = (0, 0, 0, 0);
    let mut counts: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for shard in shards {
        let number = shard["shard"].as_u64().unwrap_or(u64::MAX);
        let Some(owner) = shard["owner"].as_str() else {
            unowned += 1;
            continue;
        };
        if shard["assigned"].as_str() != Some(owner) {
            moving += 1;
        }
        if !serving.get(owner).is_some_and(|s| s.contains(&number)) {
            unserved += 1;
        }
        if shard["lag"].as_u64() != Some(0) {
            lagging += 1;
        }
        if let Some(count) = counts.get_mut(owner) {
            *count += 1;
        }
    }
    for (what, count) in [
        ("without owner", unowned),
        ("moving", moving),
        ("not yet served", unserved),
        ("lagging", lagging),
    ] {
        if count > 0 {
            problems.push(format!("{count} shards {what}"));
        }
    }
    let (low, high) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    if high > low + 1 {
        problems.push(format!("unbalanced: {counts:?}"));
    }
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// Shards per node as the status shows them (lease owners).
fn shard_counts(status: &Value) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for shard in status["shards"].as_array().into_iter().flatten() {
        if let Some(owner) = shard["owner"].as_str() {
            *counts.entry(owner.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until the cluster of `nodes` is settled (see [`unsettled`]); returns the status
/// and how long it took.
async fn wait_settled(
    cluster: &mut BenchCluster,
    nodes: &[String],
    timeout: Duration,
) -> Result<(Value, f64)> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        cluster.check_alive()?;
        let problem = match cluster.status().await {
            Ok(status) => match unsettled(&status, nodes) {
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

/// Notices a router that holds delivered messages unacked with nothing pending (they come
/// back only after the consumer's ack wait, `ack_wait_s`) and says so once.
#[derive(Default)]
struct RouterTail {
    since: Option<(u64, Instant)>,
    said: bool,
}

impl RouterTail {
    fn observe(&mut self, pending: u64, unacked: u64) {
        if pending != 0 || unacked == 0 || unacked == u64::MAX {
            self.since = None;
            return;
        }
        match self.since {
            Some((count, at)) if count == unacked => {
                if !self.said && at.elapsed() >= Duration::from_secs(5) {
                    say(format!(
                        "    note: the router holds {unacked} delivered messages unacked with nothing pending for {:.0} s; the server redelivers them after the consumer's ack wait (ack_wait_s, 30 s by default)",
                        at.elapsed().as_secs_f64()
                    ));
                    self.said = true;
                }
            }
            _ => self.since = Some((unacked, Instant::now())),
        }
    }
}

/// When a cluster had applied everything published so far.
struct ClusterApplied {
    /// The router had nothing pending or unacked.
    routed_at: Instant,
    /// The apply audit showed every shard at its last record, and the router had drained
    /// (the status' moment when the audit is not complete).
    applied_at: Instant,
    /// The status confirmed it: every shard served by its assigned owner with lag 0.
    confirmed_at: Instant,
    /// Whether `applied_at` comes from the audit.
    audit_complete: bool,
    status: Value,
}

/// Waits until a cluster has applied everything published so far: the router's durable
/// consumer has nothing pending or unacked (the shard logs are then complete), then, with
/// an audit watch, until every shard whose log grew past `base` has an audit record at
/// its last sequence (the later of the two is the precise moment it had applied
/// everything), and in any case until the status shows every
/// shard served by its assigned owner with lag 0 (the status lags the truth by up to a
/// heartbeat interval: it reads the applied sequences of the nodes' heartbeats).
async fn wait_cluster_applied(
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
        let problem = unsettled(&status, &nodes);
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
                let lag: u64 = status["shards"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["lag"].as_u64())
                    .sum();
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

/// Median and worst of some seconds.
fn median_and_worst(mut values: Vec<f64>) -> (Option<f64>, Option<f64>) {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return (None, None);
    }
    let middle = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    (Some(round(median, 3)), values.last().map(|v| round(*v, 3)))
}

/// Seconds from `from` to `to` (negative when `to` came first), rounded to the ms.
fn seconds_between(from: Instant, to: Instant) -> f64 {
    let seconds = if to >= from {
        to.duration_since(from).as_secs_f64()
    } else {
        -from.duration_since(to).as_secs_f64()
    };
    round(seconds, 3)
}

// ---------------------------------------------------------------------------------------
// Step 5: throughput and latency with 1, 2 and 3 nodes
// ---------------------------------------------------------------------------------------

/// The e2e traffic through clusters of each size in `--cluster-nodes`, a fresh server
/// each; then purchases at one fixed rate (half the first size's rate).
async fn cluster_scaling(plan: &Plan, report: &mut Report) {
    say(format!(
        "generating {} events of sample traffic for the cluster runs",
        plan.cluster_events
    ));
    let (traffic, _) = generated_traffic(plan.cluster_events, plan.seed);
    let mut rate = plan.cluster_latency_rate;
    let (mut per_s, mut by_counters, mut p50, mut p99, mut details) =
        (Map::new(), Map::new(), Map::new(), Map::new(), Map::new());
    for &nodes in &plan.cluster_nodes {
        say(format!(
            "step 5/8: cluster of {nodes} node(s), {} shards: {} events, then latency",
            plan.shards,
            traffic.len()
        ));
        match cluster_size(plan, nodes, traffic.clone(), &mut rate).await {
            Ok(result) => {
                let key = nodes.to_string();
                per_s.insert(key.clone(), result["events_per_s"].clone());
                by_counters.insert(
                    key.clone(),
                    result["throughput"]["events_per_s_by_counters"].clone(),
                );
                let earned = &result["latency"]["publish_to_points_earned_ms"];
                if !earned.is_null() {
                    p50.insert(key.clone(), earned["p50"].clone());
                    p99.insert(key.clone(), earned["p99"].clone());
                }
                details.insert(key, result);
            }
            Err(error) => report.fail(&format!("cluster_{nodes}"), error),
        }
    }
    report.set("cluster_events_per_s", Value::Object(per_s));
    report.set(
        "cluster_events_per_s_by_counters",
        Value::Object(by_counters),
    );
    report.set("cluster_latency_p50_ms", Value::Object(p50));
    report.set("cluster_latency_p99_ms", Value::Object(p99));
    report.set(
        "cluster_latency_rate_per_s",
        rate.map(|r| json!(round(r, 1))).unwrap_or(Value::Null),
    );
    report.set("cluster", Value::Object(details));
}

/// One cluster size: settle, throughput, latency. Sets `rate` (half this size's rate)
/// when it is not known yet.
async fn cluster_size(
    plan: &Plan,
    nodes: usize,
    traffic: Vec<Outgoing>,
    rate: &mut Option<f64>,
) -> Result<Value> {
    let label = format!("nats-cluster-{nodes}");
    let mut cluster = BenchCluster::start(plan, &label, nodes, plan.shards).await?;
    let node_ids = cluster.node_ids();
    let (settled, settle_s) = wait_settled(&mut cluster, &node_ids, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    say(format!(
        "    settled in {settle_s:.1} s: {:?}",
        shard_counts(&settled)
    ));
    let client = cluster.client.clone();
    let js = cluster.js.clone();
    let base = shard_log_ends(&js, plan.shards).await?;
    let audit = AuditWatch::start(&client, plan.shards).await?;
    let stats_before = cluster.stats(&client).await?;
    let events = traffic.len() as u64;
    let pids = cluster.node_pids();
    let cpu_before = CpuSnapshot::take_many(cluster.nats.pid, &pids);
    let stop_watch = Arc::new(AtomicBool::new(false));
    let commands_watch = spawn_commands_watch(
        client.clone(),
        pids.len(),
        metric(&stats_before, "shard_commands") + events,
        stop_watch.clone(),
    );
    let _watch_guard = AbortOnDrop::new(&commands_watch);
    let published = publish_bounded(&js, traffic, plan.in_flight, None).await?;
    let cpu_published = CpuSnapshot::take_many(cluster.nats.pid, &pids);
    let timeout = Duration::from_secs(120 + events / 200);
    let applied = wait_cluster_applied(&mut cluster, Some(&audit), Some(&base), timeout).await;
    stop_watch.store(true, Ordering::Relaxed);
    let commands_at = commands_watch.await.ok().flatten();
    let applied = applied?;
    let cpu_after = CpuSnapshot::take_many(cluster.nats.pid, &pids);
    let stats_after = cluster.stats(&client).await?;
    let first = published.first_publish;
    let seconds = applied.applied_at.duration_since(first).as_secs_f64();
    let delta = metrics_delta(&stats_before, &stats_after);
    let batches = delta["shard_batches"].as_u64().unwrap_or(0);
    let shard_messages = delta["shard_messages"].as_u64().unwrap_or(0);
    let events_per_s = events as f64 / seconds.max(1e-9);
    let throughput = json!({
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events_per_s, 0),
        "publish_done_s": round(published.last_ack.duration_since(first).as_secs_f64(), 3),
        "routed_done_s": round(applied.routed_at.duration_since(first).as_secs_f64(), 3),
        "applied_done_s": round(seconds, 3),
        "applied_timing": if applied.audit_complete { "apply audit" } else { "status" },
        "status_confirmed_s": round(applied.confirmed_at.duration_since(first).as_secs_f64(), 3),
        "commands_applied_s": commands_at.map(|at| seconds_between(first, at)),
        "events_per_s_by_counters": commands_at
            .map(|at| round(events as f64 / at.duration_since(first).as_secs_f64().max(1e-9), 0)),
        "audit_records": audit.records(),
        "duplicates_acked": published.duplicates,
        "node_counters": delta,
        "identity_counters": identity_delta(&stats_before, &stats_after),
        "mean_shard_batch_messages": round(shard_messages as f64 / batches.max(1) as f64, 2),
        "cpu_while_publishing": cpu_before.since(&cpu_published),
        "cpu_total": cpu_before.since(&cpu_after),
        "shards_per_node": shard_counts(&applied.status),
    });
    drop(audit);
    say(format!(
        "    {nodes} node(s): {events} events in {seconds:.2} s = {events_per_s:.0} events/s"
    ));
    // Half the rate at which every event had been applied once (the nodes' counters): the
    // strict figure above also waits for the router's last ingest acks, which can lag by
    // the consumer's ack wait (see RouterTail) and would make the rate meaningless.
    let capacity = throughput["events_per_s_by_counters"]
        .as_f64()
        .unwrap_or(events_per_s);
    let rate = *rate.get_or_insert(capacity / 2.0);
    say(format!(
        "    latency at {rate:.0} events/s for {} s",
        plan.latency_seconds
    ));
    let nats_pid = cluster.nats.pid;
    let latency = latency(&client, &mut cluster, plan, rate, nats_pid).await;
    let (latency, latency_error) = match latency {
        Ok(latency) => (latency, Value::Null),
        Err(error) => (Value::Null, json!(format!("{error:#}"))),
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
    if !latency_error.is_null() {
        bail!("latency: {}", latency_error.as_str().unwrap_or("failed"));
    }
    Ok(json!({
        "nodes": nodes,
        "shards": plan.shards,
        "settle_s": round(settle_s, 2),
        "coordinator": settled["coordinator"],
        "router": settled["router"],
        "events_per_s": throughput["events_per_s"],
        "throughput": throughput,
        "latency": latency,
        "node_warnings": warnings,
    }))
}

// ---------------------------------------------------------------------------------------
// Step 6: failover after a SIGKILL
// ---------------------------------------------------------------------------------------

/// Publishes `messages` at `rate` per second until they run out or `stop`; PubAcks are
/// awaited by a second task so that they never hold the schedule back. Returns how many
/// were published and how many publishes or acks failed.
fn spawn_paced_load(
    js: jetstream::Context,
    messages: Vec<Outgoing>,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (ack_sender, mut ack_receiver) = tokio::sync::mpsc::channel::<PublishAckFuture>(4096);
        let acks = tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(ack) = ack_receiver.recv().await {
                if ack.await.is_err() {
                    failures += 1;
                }
            }
            failures
        });
        let interval = 1.0 / rate.max(1e-3);
        let start = Instant::now();
        let (mut published, mut failures) = (0u64, 0u64);
        for (index, message) in messages.into_iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let due = start + Duration::from_secs_f64(index as f64 * interval);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            let publish = PublishMessage::build()
                .payload(message.payload)
                .message_id(&message.msg_id);
            match js.send_publish(message.subject, publish).await {
                Ok(ack) => {
                    published += 1;
                    if ack_sender.send(ack).await.is_err() {
                        break;
                    }
                }
                Err(_) => failures += 1,
            }
        }
        drop(ack_sender);
        failures += acks.await.unwrap_or(0);
        (published, failures)
    })
}

/// Which node a failover run kills: run 1 a node with neither cluster-wide role, run 2
/// the router, run 3 the coordinator (then again); a node that owns shards in any case,
/// any such node when the preferred one does not exist.
fn pick_victim(status: &Value, run: u32) -> Option<String> {
    let counts = shard_counts(status);
    let coordinator = status["coordinator"].as_str();
    let router = status["router"].as_str();
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

/// Every failover run, then the worst and the median.
async fn failover(plan: &Plan, report: &mut Report) {
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
                let roles: Vec<&str> = result["killed_roles"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let roles = if roles.is_empty() {
                    "no cluster-wide role".to_string()
                } else {
                    roles.join(" + ")
                };
                say(format!(
                    "    killed {} ({} shards, {roles}): served again after {} s (node logs: {} s)",
                    result["killed"].as_str().unwrap_or("?"),
                    result["killed_shards"],
                    result["failover_s"],
                    result["failover_log_s"],
                ));
                say(format!(
                    "    caught up after {} s (apply audit: {} s)",
                    result["caught_up_s"], result["caught_up_audit_s"]
                ));
                runs.push(result);
            }
            Err(error) => report.fail(&format!("failover_{}", run + 1), error),
        }
    }
    let figures = |key: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[key].as_f64()).collect() };
    let (served_median, served_worst) = median_and_worst(figures("failover_s"));
    let (caught_median, caught_worst) = median_and_worst(figures("caught_up_s"));
    let (log_median, log_worst) = median_and_worst(figures("failover_log_s"));
    report.set("failover_s", json!(served_worst));
    report.set("failover_median_s", json!(served_median));
    report.set("failover_caught_up_s", json!(caught_worst));
    report.set("failover_caught_up_median_s", json!(caught_median));
    report.set(
        "failover",
        json!({
            "runs": runs,
            "load_events_per_s": plan.failover_rate,
            "nodes": 3,
            "shards": plan.shards,
            "served_worst_s": served_worst,
            "served_median_s": served_median,
            "served_by_node_logs_worst_s": log_worst,
            "served_by_node_logs_median_s": log_median,
            "caught_up_worst_s": caught_worst,
            "caught_up_median_s": caught_median,
            "method": "status polled every 100 ms after the SIGKILL; served: every shard the killed node owned has a lease owner other than it, alive, whose heartbeat lists the shard, and lag not null; the load stops then; caught up: the router lease is held by a live node other than the killed one, the router consumer has nothing pending, and every shard has lag 0",
        }),
    );
}

async fn failover_run(plan: &Plan, run: u32, traffic: &[Outgoing]) -> Result<Value> {
    let mut cluster = BenchCluster::start(plan, "nats-failover", 3, plan.shards).await?;
    let node_ids = cluster.node_ids();
    let (settled, settle_s) = wait_settled(&mut cluster, &node_ids, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    let base: Vec<u64> = settled["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["last_seq"].as_u64().unwrap_or(0))
        .collect();
    let audit = AuditWatch::start(&cluster.client, plan.shards).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_paced_load(
        cluster.js.clone(),
        traffic.to_vec(),
        plan.failover_rate,
        stop.clone(),
    );
    let _load_guard = AbortOnDrop::new(&load);
    tokio::time::sleep(FAILOVER_WARMUP).await;
    cluster.check_alive()?;
    let before = cluster.status().await?;
    let victim = pick_victim(&before, run).ok_or_else(|| anyhow!("no node owns shards"))?;
    let victim_shards: Vec<u64> = before["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["owner"].as_str() == Some(victim.as_str()))
        .filter_map(|s| s["shard"].as_u64())
        .collect();
    let mut roles = Vec::new();
    if before["coordinator"].as_str() == Some(victim.as_str()) {
        roles.push("coordinator");
    }
    if before["router"].as_str() == Some(victim.as_str()) {
        roles.push("router");
    }
    let survivors: Vec<String> = node_ids
        .iter()
        .filter(|id| **id != victim)
        .cloned()
        .collect();
    let survivor_pids: Vec<u32> = cluster
        .live()
        .filter(|n| n.node_id != victim)
        .map(|n| n.pid)
        .collect();
    let cpu_before = CpuSnapshot::take_many(cluster.nats.pid, &survivor_pids);
    let killed_at = Instant::now();
    cluster.kill(&victim);
    let mut served_at = None;
    let mut caught_up = None;
    let mut router_unacked = None;
    let mut polls = 0u64;
    let mut poll_ms = Vec::new();
    let mut last_problem = String::new();
    let mut last_report = Instant::now();
    while caught_up.is_none() {
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
        let serving = serving_nodes(&status);
        let shards = status["shards"].as_array().cloned().unwrap_or_default();
        let of_victim = |s: &&Value| {
            s["shard"]
                .as_u64()
                .is_some_and(|n| victim_shards.contains(&n))
        };
        let not_served = shards
            .iter()
            .filter(of_victim)
            .filter(|s| {
                let number = s["shard"].as_u64().unwrap_or(u64::MAX);
                let served = s["owner"].as_str().is_some_and(|owner| {
                    owner != victim && serving.get(owner).is_some_and(|set| set.contains(&number))
                });
                !served || s["lag"].is_null()
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
        if served_at.is_some() {
            let backlog = router_backlog(&cluster.js).await;
            let lagging = shards
                .iter()
                .filter(|s| s["lag"].as_u64() != Some(0))
                .count();
            let router = status["router"].as_str().map(str::to_string);
            let router_live = router
                .as_ref()
                .is_some_and(|r| *r != victim && serving.contains_key(r));
            let pending = backlog.map(|(pending, _)| pending);
            if router_live && pending == Some(0) && lagging == 0 && not_served == 0 {
                router_unacked = backlog.map(|(_, unacked)| unacked);
                caught_up = Some((Instant::now(), status));
            } else {
                last_problem = format!(
                    "router {router:?}, router backlog {backlog:?} (pending, unacked), {lagging} shards lagging"
                );
            }
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
    let (caught_up_at, final_status) = caught_up.expect("loop ends when caught up");
    let served_at = served_at.expect("served before caught up");
    stop.store(true, Ordering::Relaxed);
    let (published, publish_failures) = load.await.unwrap_or((0, 0));
    let cpu_after = CpuSnapshot::take_many(cluster.nats.pid, &survivor_pids);

    // The same moments, precisely, from the survivors' logs and the apply audit.
    let marks = cluster.marks_since(killed_at);
    let shard_of =
        |mark: &LogMark| log_field(&mark.line, "shard").and_then(|s| s.parse::<u64>().ok());
    let mut served_by_log: BTreeMap<u64, (String, Instant)> = BTreeMap::new();
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
    let first_mark = |needle: &str| {
        marks
            .iter()
            .find(|(_, m)| m.line.contains(needle))
            .map(|(node, m)| json!({"node": node, "s": seconds_between(killed_at, m.at)}))
    };
    let first_apply_s = victim_shards
        .iter()
        .filter_map(|&shard| {
            survivors
                .iter()
                .filter_map(|node| audit.first_batch(shard as u32, node))
                .filter(|at| *at >= killed_at)
                .min()
        })
        .max()
        .map(|at| seconds_between(killed_at, at));
    // Caught up by the audit: every shard at the last sequence the final status showed.
    let mut audit_complete = true;
    let mut audit_caught_up = killed_at;
    for shard in final_status["shards"].as_array().into_iter().flatten() {
        let (Some(number), Some(last)) = (shard["shard"].as_u64(), shard["last_seq"].as_u64())
        else {
            continue;
        };
        if last <= base.get(number as usize).copied().unwrap_or(0) {
            continue;
        }
        match audit.reached(number as u32, last) {
            Some(at) => audit_caught_up = audit_caught_up.max(at),
            None => audit_complete = false,
        }
    }
    let timeline: Vec<Value> = marks
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
            json!({"s": seconds_between(killed_at, m.at), "node": node, "line": text.trim()})
        })
        .collect();
    Ok(json!({
        "run": run + 1,
        "settle_s": round(settle_s, 2),
        "killed": victim,
        "killed_roles": roles,
        "killed_shards": victim_shards.len(),
        "survivors": survivors,
        "failover_s": seconds_between(killed_at, served_at),
        "failover_log_s": failover_log_s,
        "first_apply_by_new_owner_worst_s": first_apply_s,
        "caught_up_s": seconds_between(killed_at, caught_up_at),
        "caught_up_audit_s": audit_complete.then(|| seconds_between(killed_at, audit_caught_up)),
        "router_unacked_when_caught_up": router_unacked,
        "new_owners": new_owners,
        "shards_restored_from_snapshot": restored,
        "shard_start_ms": summary(start_ms, 1),
        "coordinator_taken_s": first_mark("this node is the coordinator"),
        "router_taken_s": first_mark("this node routes ingest"),
        "first_assignment_after_kill": first_mark("shard assignment written"),
        "status_polls": polls,
        "status_read_ms": summary(poll_ms, 1),
        "load_published": published,
        "load_failures": publish_failures,
        "shards_per_node_after": shard_counts(&final_status),
        "cpu_survivors": cpu_before.since(&cpu_after),
        "timeline": timeline,
    }))
}

// ---------------------------------------------------------------------------------------
// Step 7: hand-off of one shard holding N customers
// ---------------------------------------------------------------------------------------

/// `10k` for 10,000; the number itself when it is not a whole thousand.
fn customers_label(customers: u64) -> String {
    if customers.is_multiple_of(1000) {
        format!("{}k", customers / 1000)
    } else {
        customers.to_string()
    }
}

async fn handoff(plan: &Plan, report: &mut Report) {
    let mut runs = Vec::new();
    for &customers in &plan.handoff_customers {
        say(format!(
            "step 7/8: hand-off of one shard holding {customers} customers (drain node-1, node-2 takes it)"
        ));
        match handoff_run(plan, customers).await {
            Ok(result) => {
                say(format!(
                    "    served by node-2 after {} s (node log: {} s), snapshot {} bytes",
                    result["handoff_s"], result["handoff_log_s"], result["snapshot_bytes"]
                ));
                report.set(
                    &format!("handoff_{}_s", customers_label(customers)),
                    result["handoff_s"].clone(),
                );
                runs.push(result);
            }
            Err(error) => report.fail(&format!("handoff_{}", customers_label(customers)), error),
        }
    }
    report.set(
        "handoff",
        json!({
            "runs": runs,
            "method": "shards = 1; node-1 alone is fed one visit per new customer and applies it; node-2 starts and the cluster settles (node-1 keeps the shard); then the drain of node-1 is requested (crm_node::cluster::status::request_drain) and the status is polled every 100 ms until shard 0's lease owner is node-2, node-2's heartbeat lists it, and its lag is 0. handoff_log_s: from the drain request until node-2 logs 'serving shard'",
        }),
    );
}

async fn handoff_run(plan: &Plan, customers: u64) -> Result<Value> {
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
    let stored = metric(&stats, "stored_customers");
    let sled_mib = cluster
        .node("node-1")
        .map(|n| dir_bytes(&n.dir.path.join("data")) as f64 / 1048576.0)
        .unwrap_or(0.0);

    cluster.add_nodes(plan, 1)?;
    let both = vec!["node-1".to_string(), "node-2".to_string()];
    let (settled, _) = wait_settled(&mut cluster, &both, SETTLE_TIMEOUT)
        .await
        .with_context(|| cluster.log_tails())?;
    if settled["shards"][0]["owner"].as_str() != Some("node-1") {
        bail!(
            "shard 0 moved to {} before the drain",
            settled["shards"][0]["owner"]
        );
    }
    let pids = cluster.node_pids();
    let cpu_before = CpuSnapshot::take_many(cluster.nats.pid, &pids);
    let drain_at = Instant::now();
    crm_node::cluster::status::request_drain(&cluster.js, "node-1", false)
        .await
        .map_err(|e| anyhow!("drain request: {e}"))?;
    let mut polls = 0u64;
    let mut poll_ms = Vec::new();
    let mut trace: Vec<Value> = Vec::new();
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
                let shard = &status["shards"][0];
                let serving = serving_nodes(&status);
                let served = shard["owner"].as_str() == Some("node-2")
                    && serving.get("node-2").is_some_and(|s| s.contains(&0));
                let seen = json!([
                    shard["owner"],
                    shard["assigned"],
                    served,
                    shard["applied_seq"],
                    shard["last_seq"],
                    shard["lag"]
                ]);
                if trace.last().map(|t: &Value| &t["seen"]) != Some(&seen) {
                    trace.push(
                        json!({"s": seconds_between(drain_at, Instant::now()), "seen": seen}),
                    );
                }
                if served && shard["lag"].as_u64() == Some(0) {
                    break Instant::now();
                }
                last_problem = format!(
                    "owner {}, assigned {}, lag {}",
                    shard["owner"], shard["assigned"], shard["lag"]
                );
            }
            Err(error) => last_problem = format!("{error:#}"),
        }
        tokio::time::sleep(STATUS_POLL).await;
    };
    let cpu_after = CpuSnapshot::take_many(cluster.nats.pid, &pids);
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
        .map(|(node, m)| json!({"node": node, "s": seconds_between(drain_at, m.at)}));
    Ok(json!({
        "customers": customers,
        "customers_published": published.count,
        "stored_customers": stored,
        "feed_seconds": round(feed_seconds, 1),
        "sled_dir_mib_node_1": round(sled_mib, 1),
        "handoff_s": seconds_between(drain_at, done_at),
        "handoff_log_s": at(&serving),
        "assignment_written": assignment,
        "handing_off_s": at(&handing_off),
        "snapshot_written_s": at(&written),
        "snapshot_bytes": number(&written, "bytes"),
        "snapshot_entries": number(&written, "entries"),
        "snapshot_write_ms": number(&written, "ms"),
        "snapshot_restored_s": at(&restored),
        "snapshot_restore_ms": number(&restored, "ms"),
        "shard_started_s": at(&started_mark),
        "shard_start_ms": number(&started_mark, "ms"),
        "status_polls": polls,
        "status_read_ms": summary(poll_ms, 1),
        "status_trace": {"fields": ["owner", "assigned", "node-2 serves it", "applied_seq", "last_seq", "lag"], "changes": trace},
        "cpu": cpu_before.since(&cpu_after),
    }))
}

// ---------------------------------------------------------------------------------------
// Step 8: cold activation, in-process
// ---------------------------------------------------------------------------------------

async fn cold_activation(plan: &Plan) -> Result<Value> {
    let dir = ScratchDir::new("cold")?;
    let sled_path = dir.path.join("sled");
    let rules = Arc::new(Rules::load(&plan.rules).map_err(|e| anyhow!("{e}"))?);
    let limits = IngestLimits {
        currencies: rules.currencies(),
        ..IngestLimits::default()
    };
    let engine_limits = |resident_max: usize| EngineLimits {
        resident_max,
        passivate_after_ms: 3_600_000,
        tick_batch_max: 512,
    };
    const SHARD: u32 = 0;
    const CACHE_BYTES: u64 = 256 * 1024 * 1024;

    // Store the customers: the generator's traffic, one customer per person.
    let people = plan.cold_customers as usize;
    let store = Store::open(&sled_path, CACHE_BYTES).map_err(|e| anyhow!("{e}"))?;
    let mut engine = ShardEngine::new(SHARD, store.clone(), rules.clone(), engine_limits(10_000))
        .map_err(|e| anyhow!("{e}"))?;
    let mut seq = 0u64;
    let mut batch = Vec::with_capacity(512);
    let mut customers: HashSet<String> = HashSet::new();
    let mut events = 0u64;
    let fill_started = Instant::now();
    for event in Generator::new(spec(people, plan.seed)).without_truth() {
        let parsed = parse_ingest(&event.channel, &event.payload, &limits)
            .map_err(|r| anyhow!("generated event refused: {r}"))?;
        let customer_id = format!("c{:024x}", event.person);
        customers.insert(customer_id.clone());
        seq += 1;
        events += 1;
        batch.push((
            seq,
            ShardMessage::Customer {
                customer_id,
                command: CustomerCommand::Event {
                    event: parsed,
                    conflict: None,
                },
                reply_to: None,
            },
        ));
        if batch.len() == 512 {
            engine
                .apply_batch(std::mem::take(&mut batch), 0)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            engine.passivate(Instant::now());
        }
    }
    if !batch.is_empty() {
        engine
            .apply_batch(batch, 0)
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    engine.shutdown().await;
    drop(engine);
    store.flush().await.map_err(|e| anyhow!("{e}"))?;
    drop(store);

    // Reopen: sled's page cache is empty, nothing is resident (the OS page cache is warm).
    let store = Store::open(&sled_path, CACHE_BYTES).map_err(|e| anyhow!("{e}"))?;
    let samples = plan.cold_samples as usize;
    let mut engine = ShardEngine::new(SHARD, store.clone(), rules, engine_limits(samples * 2 + 16))
        .map_err(|e| anyhow!("{e}"))?;
    let mut ids: Vec<String> = customers.into_iter().collect();
    ids.sort();
    ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(plan.seed));
    let (view_ids, rest) = ids.split_at(samples.min(ids.len()));
    let load_ids = &rest[..samples.min(rest.len())];

    // The sled read and decode alone, on other customers (also cold in sled's cache).
    let mut load_us = Vec::with_capacity(load_ids.len());
    let mut state_bytes = Vec::with_capacity(load_ids.len());
    for id in load_ids {
        let started = Instant::now();
        let loaded = store
            .load_customer_encoded(id)
            .map_err(|e| anyhow!("{e}"))?;
        load_us.push(started.elapsed().as_secs_f64() * 1e6);
        if let Some((_, bytes)) = loaded {
            state_bytes.push(bytes.len() as f64);
        }
    }
    // Cold: not resident, activated from sled by the view.
    let mut cold_us = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        let started = Instant::now();
        let view = engine.view(id).await.map_err(|e| anyhow!("{e}"))?;
        cold_us.push(started.elapsed().as_secs_f64() * 1e6);
        if view.is_none() {
            bail!("customer {id} was stored but its view is empty");
        }
    }
    let resident_after = engine.resident_count();
    // Warm: the same customers again, now resident.
    let mut warm_us = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        let started = Instant::now();
        engine.view(id).await.map_err(|e| anyhow!("{e}"))?;
        warm_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    engine.shutdown().await;
    let cold_mean = cold_us.iter().sum::<f64>() / cold_us.len().max(1) as f64;
    let warm_mean = warm_us.iter().sum::<f64>() / warm_us.len().max(1) as f64;
    Ok(json!({
        "method": "in-process ShardEngine::view() of a customer not resident, after the sled store was closed and reopened (sled page cache cold, OS page cache warm): sled read + decode + ractor actor spawn + 360 view JSON; no NATS",
        "customers_stored": people,
        "events_applied": events,
        "fill_seconds": round(fill_seconds, 2),
        "fill_events_per_s": round(events as f64 / fill_seconds.max(1e-9), 0),
        "mean_state_bytes": round(state_bytes.iter().sum::<f64>() / state_bytes.len().max(1) as f64, 0),
        "cold_view_us": summary(cold_us, 1),
        "warm_view_us": summary(warm_us, 1),
        "activation_only_mean_us": round(cold_mean - warm_mean, 1),
        "sled_load_decode_us": summary(load_us, 1),
        "resident_after_cold_views": resident_after,
        "runtime": "tokio multi-thread, 2 workers",
    }))
}

// ---------------------------------------------------------------------------------------
// Machine and the run
// ---------------------------------------------------------------------------------------

/// The 1, 5 and 15 minute load averages (other work on the machine skews every figure).
fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn machine(plan: &Plan) -> Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    let memory_kib: Option<f64> = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string());
    let command_output = |program: &Path, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if text.is_empty() {
                    String::from_utf8_lossy(&o.stderr).trim().to_string()
                } else {
                    text
                }
            })
    };
    let git = Path::new("git");
    let dirty = command_output(git, &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model,
        "memory_gib": memory_kib.map(|k| round(k / 1048576.0, 1)),
        "os": os,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "nats_server": command_output(&plan.nats_server, &["--version"]),
        "date": format_rfc3339(now_ms),
        "git_commit": command_output(git, &["rev-parse", "--short", "HEAD"]),
        "git_dirty": dirty,
        "load_average_at_end": load_average(),
    })
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
    report.set(
        "traffic",
        json!({"generator": {"people": spec.customers, "days": spec.days, "seed": spec.seed,
            "duplicate_rate_percent": spec.duplicate_rate_percent, "start": TRAFFIC_START},
            "events": traffic.len(), "mean_payload_bytes": round(mean_bytes, 0)}),
    );
    let nats = NatsServer::start(&plan.nats_server, "nats")?;
    let client = connect(&nats.url()).await?;
    if plan.runs("raw") {
        say(format!(
            "step 1/8: raw JetStream baseline ({} events, {} in flight)",
            traffic.len(),
            plan.in_flight
        ));
        match raw_jetstream(&client, &traffic, plan, nats.pid).await {
            Ok(raw) => {
                report.set("raw_jetstream_events_per_s", raw["events_per_s"].clone());
                report.set("raw", raw);
            }
            Err(error) => report.fail("raw", error),
        }
    }
    if plan.runs("kv") {
        say(format!(
            "diagnostic: identity-directory KV operations ({} keys)",
            plan.kv_keys
        ));
        match kv_diagnostic(&client, plan.kv_keys).await {
            Ok(kv) => report.set("kv_diagnostic", kv),
            Err(error) => report.fail("kv", error),
        }
    }
    if !plan.runs("e2e") && !plan.runs("latency") {
        return Ok(());
    }
    say(format!("starting crm-node ({} shards)", plan.shards));
    let mut node = CrmNode::start(plan, &nats.url(), &NodeSettings::single(plan.shards, None))?;
    if plan.runs("e2e") {
        say(format!(
            "step 2/8: end-to-end throughput ({} events)",
            traffic.len()
        ));
        match end_to_end(&client, &mut node, traffic, plan, nats.pid).await {
            Ok(e2e) => {
                report.set("end_to_end_events_per_s", e2e["events_per_s"].clone());
                report.set("end_to_end", e2e);
            }
            Err(error) => report.fail("e2e", error),
        }
    }
    if plan.runs("latency") {
        let rate = plan
            .latency_rate
            .or_else(|| report.get_f64("end_to_end_events_per_s").map(|r| r / 2.0));
        match rate {
            Some(rate) => {
                say(format!(
                    "step 3/8: latency at {rate:.0} events/s for {} s",
                    plan.latency_seconds
                ));
                match latency(&client, &mut node, plan, rate, nats.pid).await {
                    Ok(latency) => {
                        let e2e = &latency["publish_to_points_earned_ms"];
                        report.set("p50_latency_ms", e2e["p50"].clone());
                        report.set("p99_latency_ms", e2e["p99"].clone());
                        report.set("latency_rate_per_s", latency["target_rate_per_s"].clone());
                        report.set("latency", latency);
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
        report.set("node_warnings", json!(problems));
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
            "step 4/8: memory: {} new customers through a fresh node (resident cap {})",
            plan.customers, plan.resident_cap
        ));
        match memory(plan).await {
            Ok(rss) => {
                report.set("rss_mb_1m_customers", rss["rss_mib_after_settle"].clone());
                report.set("customers_stored", rss["customers_applied"].clone());
                report.set("rss_mb_resident_cap", rss["rss_mib_resident_cap"].clone());
                report.set("resident_cap", json!(plan.resident_cap));
                report.set("rss", rss);
            }
            Err(error) => report.fail("rss", error),
        }
    }
    if plan.runs("cluster") {
        cluster_scaling(plan, report).await;
    }
    if plan.runs("failover") {
        failover(plan, report).await;
    }
    if plan.runs("handoff") {
        handoff(plan, report).await;
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
    report.set("load_average_at_start", json!(load_average()));
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
        say(format!(
            "step 8/8: cold activation ({} customers stored, {} activations timed)",
            plan.cold_customers, plan.cold_samples
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let outcome = runtime.block_on(async {
            tokio::select! {
                outcome = cold_activation(&plan) => Some(outcome),
                _ = interrupted() => None,
            }
        });
        match outcome {
            Some(Ok(cold)) => {
                report.set("cold_activation_us", cold["cold_view_us"]["mean"].clone());
                report.set(
                    "cold_activation_p99_us",
                    cold["cold_view_us"]["p99"].clone(),
                );
                report.set("cold_activation", cold);
            }
            Some(Err(error)) => report.fail("cold", error),
            None => bail!("interrupted"),
        }
    }
    let results = results_json(&plan, report, started.elapsed());
    if let Some(parent) = plan.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(&results)? + "\n";
    std::fs::write(&plan.out, text)
        .with_context(|| format!("cannot write {}", plan.out.display()))?;
    print_table(&results);
    println!("results: {}", plan.out.display());
    Ok(results["errors"].as_object().is_none_or(Map::is_empty))
}

fn results_json(plan: &Plan, report: Report, elapsed: Duration) -> Value {
    let Report { mut top, errors } = report;
    let e2e = top.get("end_to_end_events_per_s").and_then(Value::as_f64);
    let raw = top
        .get("raw_jetstream_events_per_s")
        .and_then(Value::as_f64);
    let ratio = match (e2e, raw) {
        (Some(e2e), Some(raw)) if raw > 0.0 => json!(round(e2e / raw, 3)),
        _ => Value::Null,
    };
    let mut results = Map::new();
    let mut take = |key: &str| top.remove(key).unwrap_or(Value::Null);
    results.insert(
        "end_to_end_events_per_s".into(),
        take("end_to_end_events_per_s"),
    );
    results.insert(
        "raw_jetstream_events_per_s".into(),
        take("raw_jetstream_events_per_s"),
    );
    results.insert("ratio_to_raw".into(), ratio);
    results.insert("p50_latency_ms".into(), take("p50_latency_ms"));
    results.insert("p99_latency_ms".into(), take("p99_latency_ms"));
    results.insert("latency_rate_per_s".into(), take("latency_rate_per_s"));
    results.insert("rss_mb_1m_customers".into(), take("rss_mb_1m_customers"));
    results.insert("customers_stored".into(), take("customers_stored"));
    results.insert("rss_mb_resident_cap".into(), take("rss_mb_resident_cap"));
    results.insert("resident_cap".into(), take("resident_cap"));
    results.insert("cold_activation_us".into(), take("cold_activation_us"));
    results.insert(
        "cold_activation_p99_us".into(),
        take("cold_activation_p99_us"),
    );
    for key in [
        "cluster_events_per_s",
        "cluster_events_per_s_by_counters",
        "cluster_latency_p50_ms",
        "cluster_latency_p99_ms",
        "cluster_latency_rate_per_s",
        "failover_s",
        "failover_median_s",
        "failover_caught_up_s",
        "failover_caught_up_median_s",
        "handoff_10k_s",
        "handoff_100k_s",
    ] {
        results.insert(key.into(), take(key));
    }
    results.insert("events".into(), json!(plan.events));
    results.insert("cluster_events".into(), json!(plan.cluster_events));
    results.insert(
        "targets".into(),
        json!({"ratio_to_raw_min": 0.30, "p99_latency_ms_max": 50.0,
            "failover_s_max": 10.0, "handoff_10k_s_max": 2.0}),
    );
    results.insert("machine".into(), machine(plan));
    results.insert(
        "run".into(),
        json!({"mode": if plan.quick { "quick" } else { "full" }, "seconds": round(elapsed.as_secs_f64(), 1),
            "shards": plan.shards, "in_flight": plan.in_flight, "seed": plan.seed,
            "skipped": plan.skip.iter().collect::<Vec<_>>(),
            "node_config": "defaults, except tick_interval_s = 0, shards, node_id, resident_max_customers in the memory run, and shards = 1 in the hand-off runs",
            "cluster_nodes": plan.cluster_nodes, "failover_runs": plan.failover_runs,
            "failover_rate_per_s": plan.failover_rate, "handoff_customers": plan.handoff_customers,
            "rules": plan.rules.display().to_string(),
            "command": std::env::args().collect::<Vec<_>>().join(" ")}),
    );
    for (key, value) in top {
        results.insert(key, value);
    }
    results.insert("errors".into(), Value::Object(errors));
    Value::Object(results)
}

fn print_table(results: &Value) {
    let number = |key: &str, decimals: usize| match results[key].as_f64() {
        Some(value) => format!("{value:.decimals$}"),
        None => "-".to_string(),
    };
    let machine = &results["machine"];
    println!();
    println!(
        "crm-bench ({}) on {} cores {}, {} GiB, {}",
        results["run"]["mode"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["nats_server"].as_str().unwrap_or("nats-server ?"),
    );
    let ratio = results["ratio_to_raw"].as_f64();
    let p99 = results["p99_latency_ms"].as_f64();
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "-",
    };
    let at_rate = format!("at {} events/s", number("latency_rate_per_s", 0));
    let mut rows: Vec<(String, String, String)> = vec![
        (
            "raw JetStream publish+consume (events/s)".into(),
            number("raw_jetstream_events_per_s", 0),
            String::new(),
        ),
        (
            "end-to-end, published -> applied+flushed (events/s)".into(),
            number("end_to_end_events_per_s", 0),
            String::new(),
        ),
        (
            "  ratio to raw".into(),
            number("ratio_to_raw", 3),
            format!(">= 0.30: {}", verdict(ratio.map(|r| r >= 0.30))),
        ),
        (
            format!("latency p50 {at_rate} (ms)"),
            number("p50_latency_ms", 2),
            String::new(),
        ),
        (
            format!("latency p99 {at_rate} (ms)"),
            number("p99_latency_ms", 2),
            format!("<= 50 ms: {}", verdict(p99.map(|p| p <= 50.0))),
        ),
        (
            format!(
                "RSS, resident cap reached ({} customers) (MiB)",
                number("resident_cap", 0)
            ),
            number("rss_mb_resident_cap", 0),
            String::new(),
        ),
        (
            format!(
                "RSS, {} customers stored (MiB)",
                number("customers_stored", 0)
            ),
            number("rss_mb_1m_customers", 0),
            String::new(),
        ),
        (
            "cold activation, mean (us)".into(),
            number("cold_activation_us", 1),
            String::new(),
        ),
        (
            "cold activation, p99 (us)".into(),
            number("cold_activation_p99_us", 1),
            String::new(),
        ),
    ];
    let in_map = |key: &str, size: &str, decimals: usize| match results[key][size].as_f64() {
        Some(value) => format!("{value:.decimals$}"),
        None => "-".to_string(),
    };
    let sizes: Vec<String> = results["run"]["cluster_nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| n.to_string())
        .filter(|n| {
            !results["cluster_events_per_s"][n].is_null()
                || !results["cluster_latency_p99_ms"][n].is_null()
        })
        .collect();
    for size in &sizes {
        rows.push((
            format!("cluster, {size} node(s): published -> applied (events/s)"),
            in_map("cluster_events_per_s", size, 0),
            String::new(),
        ));
        rows.push((
            "  every event applied once, by the nodes' counters (events/s)".into(),
            in_map("cluster_events_per_s_by_counters", size, 0),
            String::new(),
        ));
        rows.push((
            format!(
                "cluster, {size} node(s): latency p50 / p99 at {} events/s (ms)",
                number("cluster_latency_rate_per_s", 0)
            ),
            format!(
                "{} / {}",
                in_map("cluster_latency_p50_ms", size, 1),
                in_map("cluster_latency_p99_ms", size, 1)
            ),
            String::new(),
        ));
    }
    if !results["failover"].is_null() {
        let runs = results["failover"]["runs"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        let failover = results["failover_s"].as_f64();
        rows.push((
            format!("failover, SIGKILL -> shards served (s, worst of {runs})"),
            number("failover_s", 2),
            format!("<= 10 s: {}", verdict(failover.map(|f| f <= 10.0))),
        ));
        rows.push((
            "  median".into(),
            number("failover_median_s", 2),
            String::new(),
        ));
        rows.push((
            format!("failover, SIGKILL -> backlog applied (s, worst of {runs})"),
            number("failover_caught_up_s", 2),
            String::new(),
        ));
    }
    for run in results["handoff"]["runs"].as_array().into_iter().flatten() {
        let customers = run["customers"].as_u64().unwrap_or(0);
        let seconds = run["handoff_s"].as_f64();
        let target = if customers == 10_000 {
            format!("<= 2 s: {}", verdict(seconds.map(|s| s <= 2.0)))
        } else {
            String::new()
        };
        let text = |v: &Value, decimals: usize| match v.as_f64() {
            Some(value) => format!("{value:.decimals$}"),
            None => "-".to_string(),
        };
        rows.push((
            format!("hand-off, shard of {customers} customers: drain -> served (s)"),
            text(&run["handoff_s"], 2),
            target,
        ));
        rows.push((
            "  drain -> 'serving shard' in node-2's log (s)".into(),
            text(&run["handoff_log_s"], 2),
            String::new(),
        ));
        rows.push((
            "  snapshot (MiB)".into(),
            run["snapshot_bytes"]
                .as_f64()
                .map(|b| format!("{:.1}", b / 1048576.0))
                .unwrap_or_else(|| "-".into()),
            String::new(),
        ));
    }
    println!("{:<62} {:>12}  target", "metric", "value");
    for (name, value, target) in rows {
        println!("{name:<62} {value:>12}  {target}");
    }
    if let Some(errors) = results["errors"].as_object() {
        for (step, error) in errors {
            println!("step {step} FAILED: {}", error.as_str().unwrap_or("?"));
        }
    }
}
