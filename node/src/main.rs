//! `crm-node`: the cluster node and its operator/developer commands.
//!
//! `run` starts a node (router, shard workers, responders); the other subcommands are NATS
//! clients: `send` (a reference channel adapter), `query`, `redeem`, `watch`, `tick`,
//! `load` (sample multi-channel traffic), `stats`, `status` and `drain`. `clv fit` needs no NATS: it fits the
//! customer-value models on a transactions file. Everything a command prints to stdout
//! is its result; logs go to stderr. `anyhow` lives only here, at the binary's edge.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::Write as _;
use std::path::PathBuf;

/// mimalloc instead of the system allocator: a node allocates and frees small buffers on
/// every message (NATS payloads, JSON, bincode, sled pages), and glibc's malloc took about
/// a third of the node's CPU under load (see docs/perf-journal.md, "Fifth pass").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "crm-node", version, about = "Distributed actor-based CRM node")]
struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "CRM_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node: route ingest, apply shard logs, answer queries and commands.
    Run {
        /// Node config file (TOML); see docs/config.md.
        #[arg(long, env = "CRM_CONFIG")]
        config: PathBuf,
        /// Overrides node.data_dir.
        #[arg(long, env = "CRM_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides node.node_id.
        #[arg(long, env = "CRM_NODE_ID")]
        node_id: Option<String>,
    },
    /// Publish one channel event (JSON) to crm.ingest.<channel> and print the ack.
    Send(crm_node::cli::client::SendArgs),
    /// Print a customer's 360 view.
    Query {
        #[command(flatten)]
        who: crm_node::cli::client::Who,
        /// Print the reply exactly as received.
        #[arg(long)]
        json: bool,
    },
    /// Spend points on a reward.
    Redeem {
        #[command(flatten)]
        who: crm_node::cli::client::Who,
        /// Reward id from the rules file's catalogue.
        #[arg(long)]
        reward: String,
        /// Idempotency key: repeating it returns the first outcome.
        #[arg(long)]
        request_id: String,
    },
    /// Print actor events live (crm.events.>).
    Watch(crm_node::cli::client::WatchArgs),
    /// Append a clock tick at a chosen time to every shard (moves time-driven rules).
    Tick {
        /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        at: String,
    },
    /// Publish generated sample traffic (several channels, realistic shapes).
    Load(LoadCommand),
    /// Print the counters of a running node.
    Stats,
    /// Print the cluster: nodes, shards per node, lease epochs, lag per shard, coordinator.
    Status {
        /// Print JSON (documented in docs/cluster.md).
        #[arg(long)]
        json: bool,
        /// A node whose heartbeat is older than this counts as dead, in ms.
        #[arg(long, default_value_t = 4000)]
        node_timeout_ms: u64,
    },
    /// Move every shard off a node, then report that it may stop.
    Drain {
        /// The node to drain.
        node_id: String,
        /// Let the node take shards again instead.
        #[arg(long)]
        cancel: bool,
        /// Longest wait for the node to hand its shards off, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// Fit the customer-value models on every customer of the cluster and publish them
    /// (crm.cmd.value.fit); later 360 views carry the value block.
    ValueFit(crm_node::cli::client::ValueFitArgs),
    /// Customer-value models (no NATS): `clv fit` scores customers from a transactions CSV.
    Clv(crm_node::value::cli::ClvCommand),
}

#[derive(Args, Debug)]
struct LoadCommand {
    #[command(flatten)]
    args: crm_node::cli::client::LoadArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Clv(command) = cli.command {
        // Pure computation on a file: no runtime, no NATS.
        let report = crm_node::value::cli::run(command)?;
        return match std::io::stdout().lock().write_all(report.as_bytes()) {
            Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
            _ => Ok(()),
        };
    }
    let is_node = matches!(cli.command, Command::Run { .. });
    crm_node::logging::init(if is_node { "info" } else { "warn" });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let url = cli.nats_url;
        match cli.command {
            Command::Run {
                config,
                data_dir,
                node_id,
            } => crm_node::run::run_from_cli(&config, url_override(&url), data_dir, node_id).await,
            Command::Send(args) => crm_node::cli::client::send(&url, args).await,
            Command::Query { who, json } => crm_node::cli::client::query(&url, who, json).await,
            Command::Redeem {
                who,
                reward,
                request_id,
            } => crm_node::cli::client::redeem(&url, who, reward, request_id).await,
            Command::Watch(args) => crm_node::cli::client::watch(&url, args).await,
            Command::Tick { at } => crm_node::cli::client::tick(&url, &at).await,
            Command::Load(load) => crm_node::cli::client::load(&url, load.args).await,
            Command::Stats => crm_node::cli::client::stats(&url).await,
            Command::Status {
                json,
                node_timeout_ms,
            } => crm_node::cli::client::status(&url, json, node_timeout_ms).await,
            Command::Drain {
                node_id,
                cancel,
                timeout_s,
            } => crm_node::cli::client::drain(&url, &node_id, cancel, timeout_s).await,
            Command::ValueFit(args) => crm_node::cli::client::value_fit(&url, args).await,
            Command::Clv(_) => unreachable!("clv runs before the runtime starts"),
        }
    })
}

/// The `--nats-url` given explicitly (flag or env) overrides the config file's `nats.url`.
fn url_override(url: &str) -> Option<String> {
    let explicit = std::env::args().any(|a| a == "--nats-url" || a.starts_with("--nats-url="))
        || std::env::var_os("CRM_NATS_URL").is_some();
    explicit.then(|| url.to_string())
}
