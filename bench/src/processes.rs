//! The processes the bench starts, all through the test kit (`crm_testkit`): a private
//! `nats-server` per step (ready once it logs "Server is ready" and answers, like every
//! test's) and `crm-node` processes with the bench's config (defaults except
//! `tick_interval_s = 0`, the shard count, the node id and the resident cap of the memory
//! run), a bounded log, the log marks the failover and hand-off steps time, and SIGTERM on
//! drop. Nothing outlives the bench: the kit ties every child to this process.

use crate::plan::Plan;
use anyhow::{anyhow, bail, Result};
use crm_testkit::nats_server::{NatsOptions, NatsServer};
use crm_testkit::node_process::{LogMark, NodeProcess, NodeSpec};
use crm_testkit::scratch::try_scratch_dir;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a node may take to log `crm-node ready`.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Node log lines kept in memory (for error messages and warnings).
const NODE_LOG_LINES_MAX: usize = 200;
/// Node log lines kept with the instant they were read (cluster events; see `LOG_MARKS`).
const NODE_MARKS_MAX: usize = 50_000;
/// How long a node may take to exit after SIGTERM when the bench drops it.
const NODE_STOP_GRACE: Duration = Duration::from_secs(10);
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

/// A fresh private `nats-server -js` (`plan.nats_server`, plus `CRM_BENCH_NATS_ARGS`, e.g.
/// `--profile 6061` for Go's pprof endpoints).
pub fn start_nats(plan: &Plan, label: &str) -> Result<NatsServer> {
    let extra_args = std::env::var("CRM_BENCH_NATS_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(Into::into)
        .collect();
    let options = NatsOptions {
        binary: Some(plan.nats_server.clone()),
        extra_args,
    };
    NatsServer::try_start(&options).map_err(|problem| anyhow!("nats-server ({label}): {problem}"))
}

/// The pid of a server that runs (0 once it stopped: its CPU then reads as none).
pub fn nats_pid(nats: &NatsServer) -> u32 {
    nats.pid().unwrap_or(0)
}

/// Node settings the bench changes from the defaults.
pub struct NodeSettings {
    pub node_id: String,
    pub shards: u32,
    pub resident_max_customers: Option<u64>,
}

impl NodeSettings {
    /// The one node of the single-node steps.
    pub fn single(shards: u32, resident_max_customers: Option<u64>) -> NodeSettings {
        NodeSettings {
            node_id: "bench-1".to_string(),
            shards,
            resident_max_customers,
        }
    }
}

/// A `crm-node run` process with its config and data in a scratch directory.
pub struct BenchNode {
    /// Declared before `dir`: the process stops before its directory is removed.
    pub process: NodeProcess,
    pub node_id: String,
    pub shards: u32,
    dir: tempfile::TempDir,
}

/// The stream size caps of `cluster-config/` (3 GiB in all), far above what a run writes:
/// nats-server reserves every cap on its disk when the stream is created, and with the
/// defaults (39 GiB) a node did not start on a machine with less than about 52 GB free.
const STREAM_CAPS: &str = "ingest_max_bytes = 536870912\nshard_log_max_bytes = 1073741824\n\
     snapshot_max_bytes = 1073741824\nevents_max_bytes = 268435456\ndlq_max_bytes = 134217728\n";

impl BenchNode {
    pub fn start(plan: &Plan, nats_url: &str, settings: &NodeSettings) -> Result<BenchNode> {
        let mut node = BenchNode::spawn(plan, nats_url, settings)?;
        node.wait_ready()?;
        Ok(node)
    }

    /// Starts the process without waiting for `crm-node ready` (see [`BenchNode::wait_ready`]).
    pub fn spawn(plan: &Plan, nats_url: &str, settings: &NodeSettings) -> Result<BenchNode> {
        let dir = try_scratch_dir("bench-node")?;
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
             [cluster]\nname = \"crm-bench\"\nshards = {shards}\nidentity_secret = \"crm-bench-secret-0123456789\"\n{caps}\n\
             [limits]\ntick_interval_s = 0\n{resident}\n[rules]\npath = \"{rules}\"\n",
            node_id = settings.node_id,
            caps = STREAM_CAPS,
            data = dir.path().join("data").display(),
            shards = settings.shards,
            rules = plan.rules.display(),
        );
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, config)?;
        let spec = NodeSpec {
            binary: plan.crm_node.clone(),
            config: config_path,
            nats_url: nats_url.to_string(),
            env: Vec::new(),
            rust_log: "info".to_string(),
            label: settings.node_id.clone(),
            keep_log_dir: plan.node_logs.clone(),
            log_lines_max: Some(NODE_LOG_LINES_MAX),
            marks: &LOG_MARKS,
            marks_max: NODE_MARKS_MAX,
            stop_on_drop: Some(NODE_STOP_GRACE),
        };
        let process = NodeProcess::launch(spec)?;
        if let Some(path) = process.kept_log() {
            crate::say(format!("    node log: {}", path.display()));
        }
        Ok(BenchNode {
            process,
            node_id: settings.node_id.clone(),
            shards: settings.shards,
            dir,
        })
    }

    /// Waits until the node logs `crm-node ready`.
    pub fn wait_ready(&mut self) -> Result<()> {
        Ok(self.process.wait_ready(NODE_READY_TIMEOUT)?)
    }

    /// The node's sled directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the bench has not killed the node (it may still have exited on its own;
    /// see [`BenchNode::check_alive`]).
    pub fn is_started(&self) -> bool {
        self.process.has_child()
    }

    /// SIGKILL, no grace: the node dies holding its leases.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Fails when the node has exited, with its last log lines.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.process.exit_status() {
            bail!(
                "crm-node {} exited ({status}); its log:\n{}",
                self.node_id,
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail(40)
    }

    /// The marked log lines (see `LOG_MARKS`) read at or after `since`.
    pub fn marks_since(&self, since: Instant) -> Vec<LogMark> {
        self.process.marks_since(since)
    }

    /// Warnings and errors the node logged (the last ones kept).
    pub fn problems(&self) -> Vec<String> {
        self.process.problems()
    }
}

/// The value of the `key=value` field `key` in a log line, e.g. `bytes` in
/// `snapshot written shard=0 seq=412 entries=10000 bytes=5242880 ms=91`.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim_matches(|c| c == '"' || c == ',').to_string())
}
