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
//! 5. `cold`: in-process, no NATS: `ShardEngine::view` of customers not resident, after the
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
use crm_actors::command::{CustomerCommand, ShardMessage};
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::event::{parse_ingest, IngestLimits};
use crm_actors::rules::Rules;
use crm_actors::store::Store;
use crm_actors::time::{format_rfc3339, parse_rfc3339_ms};
use crm_node::loadgen::{Generator, GeneratorSpec};
use crm_node::subjects;
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use std::collections::{HashSet, VecDeque};
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
const PULL_BATCH_MAX: usize = 256;
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
/// How long the latency run waits for the last actor events after its last publish.
const LATENCY_TAIL_WAIT: Duration = Duration::from_secs(20);

#[derive(Parser, Debug)]
#[command(
    name = "crm-bench",
    about = "Benchmark of one crm-node: JetStream baseline, end-to-end throughput, latency, memory, cold activation. Writes bench/results.json."
)]
struct Args {
    /// Small sizes for a smoke run (about a minute).
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
    /// Seed of the generated traffic and of the samples.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Steps to skip, comma-separated: raw, kv, e2e, latency, rss, cold.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Keep every node's log in this directory (crm-node-<pid>.log); default: none kept.
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
        let steps = ["raw", "kv", "e2e", "latency", "rss", "cold"];
        for step in &args.skip {
            if !steps.contains(&step.as_str()) {
                bail!("--skip {step}: not a step; use raw, kv, e2e, latency, rss or cold");
            }
        }
        let crm_node = match args.crm_node {
            Some(path) => path,
            None => std::env::current_exe()
                .context("cannot locate this binary")?
                .with_file_name("crm-node"),
        };
        let plan = Plan {
            quick,
            events: pick(args.events, 200_000, 20_000).max(1),
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
        let needs_nats = ["raw", "kv", "e2e", "latency", "rss"]
            .iter()
            .any(|step| plan.runs(step));
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
    shards: u32,
    resident_max_customers: Option<u64>,
}

/// A `crm-node run` process with its config and data in a scratch directory.
struct CrmNode {
    child: Option<Child>,
    pid: u32,
    log: Arc<Mutex<VecDeque<String>>>,
    dir: ScratchDir,
}

impl CrmNode {
    fn start(plan: &Plan, nats_url: &str, settings: &NodeSettings) -> Result<CrmNode> {
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
            "[node]\nnode_id = \"bench-1\"\ndata_dir = \"{data}\"\n\n[nats]\nurl = \"{nats_url}\"\n\n\
             [cluster]\nname = \"crm-bench\"\nshards = {shards}\nidentity_secret = \"crm-bench-secret-0123456789\"\n\n\
             [limits]\ntick_interval_s = 0\n{resident}\n[rules]\npath = \"{rules}\"\n",
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
        let ready = Arc::new(AtomicBool::new(false));
        let mut keep = match &plan.node_logs {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("crm-node-{}.log", child.id()));
                say(format!("    node log: {}", path.display()));
                Some(std::fs::File::create(path)?)
            }
            None => None,
        };
        if let Some(stderr) = child.stderr.take() {
            let (log, ready) = (log.clone(), ready.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(file) = keep.as_mut() {
                        use std::io::Write as _;
                        let _ = writeln!(file, "{line}");
                    }
                    if line.contains("crm-node ready") {
                        ready.store(true, Ordering::Release);
                    }
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if log.len() >= NODE_LOG_LINES_MAX {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        let mut node = CrmNode {
            pid: child.id(),
            child: Some(child),
            log,
            dir,
        };
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        while !ready.load(Ordering::Acquire) {
            node.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "crm-node did not log 'crm-node ready' within {NODE_READY_TIMEOUT:?}:\n{}",
                    node.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(node)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("crm-node exited ({status}); its log:\n{}", self.log_tail());
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
        CpuSnapshot {
            at: Instant::now(),
            nats: proc_cpu_seconds(&nats_pid.to_string()).unwrap_or(0.0),
            node: node_pid
                .and_then(|pid| proc_cpu_seconds(&pid.to_string()))
                .unwrap_or(0.0),
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
}

impl StallWatch {
    fn new() -> StallWatch {
        StallWatch {
            last: None,
            since: Instant::now(),
        }
    }

    fn observe(&mut self, progress: (u64, u64, u64), what: &str) -> Result<()> {
        if self.last != Some(progress) {
            self.last = Some(progress);
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() >= STALL_AFTER {
            bail!(
                "no progress for {} s ({what}): the node is stalled (see 'Known problems' in docs/benchmark.md)",
                STALL_AFTER.as_secs()
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
    let mut stall = StallWatch::new();
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
    node: &mut CrmNode,
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
    wait_applied(client, node, plan.shards, Duration::from_secs(300)).await?;
    let stats_before = node_stats(client).await?;

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

    let cpu_before = CpuSnapshot::take(nats_pid, Some(node.pid));
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
    let cpu_published = CpuSnapshot::take(nats_pid, Some(node.pid));
    let wait_until = Instant::now() + LATENCY_TAIL_WAIT;
    while Instant::now() < wait_until && !earned_task.is_finished() {
        node.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (earned_ms, earned_missing, earned_worst) = earned_task.await.context("earned matcher")?;
    let (routed_ms, routed_missing, routed_worst) = routed_task.await.context("routed matcher")?;
    let (ack_ms, ack_failures) = ack_task.await.context("ack task")?;
    let stats_after = node_stats(client).await?;
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
        &NodeSettings {
            shards: plan.shards,
            resident_max_customers: Some(plan.resident_cap),
        },
    )?;
    let client = connect(&nats.url()).await?;
    let js = jetstream::new(client.clone());
    let rss_start = proc_status_mib(node.pid, "VmRSS:").unwrap_or(0.0);
    let customers = plan.customers;
    let start_ms = traffic_start_ms();
    let visit = move |i: u64| {
        let event_id = format!("m-{i}");
        let body = format!(
            r#"{{"v":1,"event_id":"{event_id}","type":"visit","occurred_at":"{}","identity":{{"customer_id":"bench-{i:09}"}}}}"#,
            format_rfc3339(start_ms + i as i64)
        );
        Outgoing {
            subject: subjects::ingest("store"),
            msg_id: event_id,
            payload: Bytes::from(body),
        }
    };
    let acked = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuSnapshot::take(nats.pid, Some(node.pid));
    let started = Instant::now();
    let in_flight = plan.in_flight;
    // The feed keeps at most FEED_BACKLOG_MAX events published but not applied, as a
    // steady adapter would, instead of dumping every customer into the ingest stream at
    // once (a huge backlog makes nats-server 2.9's filtered consumers slower).
    let publisher = {
        let (js, acked, client) = (js.clone(), acked.clone(), client.clone());
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
                let published =
                    publish_bounded(&js, (start..end).map(visit), in_flight, Some(acked.clone()))
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
    };
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
// Step 5: cold activation, in-process
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
            "step 1/5: raw JetStream baseline ({} events, {} in flight)",
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
    let mut node = CrmNode::start(
        plan,
        &nats.url(),
        &NodeSettings {
            shards: plan.shards,
            resident_max_customers: None,
        },
    )?;
    if plan.runs("e2e") {
        say(format!(
            "step 2/5: end-to-end throughput ({} events)",
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
                    "step 3/5: latency at {rate:.0} events/s for {} s",
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
            "step 4/5: memory: {} new customers through a fresh node (resident cap {})",
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
            "step 5/5: cold activation ({} customers stored, {} activations timed)",
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
    results.insert("events".into(), json!(plan.events));
    results.insert(
        "targets".into(),
        json!({"ratio_to_raw_min": 0.30, "p99_latency_ms_max": 50.0}),
    );
    results.insert("machine".into(), machine(plan));
    results.insert(
        "run".into(),
        json!({"mode": if plan.quick { "quick" } else { "full" }, "seconds": round(elapsed.as_secs_f64(), 1),
            "shards": plan.shards, "in_flight": plan.in_flight, "seed": plan.seed,
            "skipped": plan.skip.iter().collect::<Vec<_>>(),
            "node_config": "defaults, except tick_interval_s = 0, shards, and resident_max_customers in the memory run",
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
    let rows: [(String, String, String); 9] = [
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
