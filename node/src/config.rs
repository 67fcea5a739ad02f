//! Node configuration: the TOML file a node is started with (`crm-node run --config FILE`).
//!
//! [`Config::load`] reads the file, fills every missing field with its default, resolves the
//! rules path against the file's directory, takes the identity secret from
//! `CRM_IDENTITY_SECRET` when that is set, and validates every value. Every error a user
//! can cause ([`ConfigError`]) names the file, the field and the fix. Unknown keys are
//! errors, so a typo never silently falls back to a default. The CLI applies its flags
//! through [`Config::with_overrides`] and calls [`Config::validate`] again. Field reference:
//! `docs/config.md`. This module only reads and checks values; it never touches NATS.

use crate::jetstream::{IngestConsumerSettings, StreamLimits, StreamSettings};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable that, when set and non-empty, replaces `cluster.identity_secret`.
pub const IDENTITY_SECRET_ENV: &str = "CRM_IDENTITY_SECRET";
/// Shortest accepted identity secret, in bytes.
pub const IDENTITY_SECRET_MIN_BYTES: usize = 16;
/// Largest accepted config file, in bytes (a config is a few KB; this catches wrong files).
pub const CONFIG_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// Why a config could not be used. Each message names the file, the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config file ({source}); check the path given to --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, has an unknown key, or a value of the wrong type.
    #[error("{path}: {message}; see docs/config.md for the accepted keys and types")]
    Parse { path: PathBuf, message: String },
    /// A value is out of its range or inconsistent with another one.
    #[error("{path}: {field} = {value}: {problem}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        value: String,
        problem: String,
    },
}

/// The whole node configuration. Every field has a default (see `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub nats: NatsSection,
    pub cluster: ClusterSection,
    pub limits: LimitsSection,
    pub rules: RulesSection,
    /// The file this config was read from (for error messages); empty when built in code.
    #[serde(skip)]
    pub origin: PathBuf,
    /// `node.data_dir` was not given, so it follows `node.node_id` (`.data/<node_id>`).
    #[serde(skip)]
    data_dir_follows_node_id: bool,
}

/// `[node]`: who this node is and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Unique name of this node in the cluster (`[a-z0-9_-]`, 1 to 64 bytes).
    pub node_id: String,
    /// Directory of the sled store; relative paths are relative to the working directory.
    /// Default: `.data/<node_id>`.
    pub data_dir: PathBuf,
}

/// The servers of a `nats.url` value: one URL or several separated by commas.
pub fn nats_urls(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// `[nats]`: how to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// NATS server URL (or a comma-separated list of them).
    pub url: String,
    /// First wait before retrying an unreachable server, in ms; doubles up to the maximum.
    pub connect_retry_initial_ms: u64,
    /// Longest wait between connection attempts, in ms.
    pub connect_retry_max_ms: u64,
}

/// `[cluster]`: values every node of one cluster must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Cluster name (`[a-z0-9_-]`), for logs and client names.
    pub name: String,
    /// Number of shards; fixed for the life of the cluster's data.
    pub shards: u32,
    /// HMAC secret keying the identity directory; at least 16 bytes. `CRM_IDENTITY_SECRET`
    /// overrides it.
    pub identity_secret: String,
    /// JetStream replicas of every stream and bucket.
    pub stream_replicas: usize,
    /// How long JetStream remembers an ingest `Nats-Msg-Id` to drop a re-sent event, in s.
    pub ingest_duplicate_window_s: u64,
    /// How long routed events stay in `CRM_INGEST`, in s (0 = no age limit).
    pub ingest_max_age_s: u64,
    /// Size cap of `CRM_INGEST`, in bytes (0 = no size limit); when full, publishes are
    /// refused (adapters retry), never old events dropped.
    pub ingest_max_bytes: u64,
    /// How long actor events stay in `CRM_EVENTS`, in s (0 = no age limit).
    pub events_max_age_s: u64,
    /// Size cap of `CRM_EVENTS`, in bytes (0 = no size limit).
    pub events_max_bytes: u64,
    /// How long dead letters stay in `CRM_DLQ`, in s (0 = no age limit).
    pub dlq_max_age_s: u64,
    /// Size cap of `CRM_DLQ`, in bytes (0 = no size limit); the oldest go first.
    pub dlq_max_bytes: u64,
    /// Size cap of the shard log `CRM_SHARDS`, in bytes (0 = no size limit). The shard log
    /// is the source of truth: when full, new publishes are refused, nothing is dropped.
    pub shard_log_max_bytes: u64,
    /// How long shard-log records are kept, in s (0 = no age limit). Records older than
    /// every shard's last snapshot are no longer needed; the rule checked at start is
    /// `shard_log_max_age_s >= 3 * snapshot_interval_s`.
    pub shard_log_max_age_s: u64,
    /// Size cap of `CRM_SNAPSHOTS` (shard snapshots), in bytes (0 = no size limit).
    pub snapshot_max_bytes: u64,
    /// Interval of a node's heartbeat, lease renewals and coordinator rounds, in ms.
    pub heartbeat_interval_ms: u64,
    /// A node whose heartbeat has not changed for this long is dead, in ms.
    pub node_timeout_ms: u64,
    /// A lease not renewed for this long may be taken by another node, in ms.
    pub lease_timeout_ms: u64,
    /// A lease holder that could not renew stops applying this long before its lease
    /// can pass to another node, in ms.
    pub lease_margin_ms: u64,
    /// Most shards moving at once to balance the cluster (a dead node's shards are
    /// reassigned regardless).
    pub rebalance_max_moves: u32,
    /// A shard that applied anything is snapshotted at least this often, in s.
    pub snapshot_interval_s: u64,
    /// ... and after at most this many applied shard-log records (0 = by time only).
    pub snapshot_every_records: u64,
}

/// `[limits]`: a bound on every queue, batch, cache and input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest accepted event payload, in bytes.
    pub payload_max_bytes: usize,
    /// Largest accepted purchase or return amount, in major currency units (e.g. 1000000.00).
    pub amount_max: f64,
    /// Most line items in one purchase or return.
    pub items_max: usize,
    /// Largest quantity on one line item.
    pub item_qty_max: u32,
    /// How many days an event's `occurred_at` may lie ahead of the router's clock (0: no
    /// limit).
    pub occurred_at_future_max_days: u32,
    /// Most shard-log records a shard worker applies in one batch (one sled flush).
    pub batch_max_events: usize,
    /// Most ingest messages the router pulls at once.
    pub router_batch_max_events: usize,
    /// Most bytes of keys and values in one snapshot message.
    pub snapshot_piece_bytes: usize,
    /// Unacked ingest messages the router may hold (JetStream `max_ack_pending`).
    pub ingest_max_ack_pending: u32,
    /// How long JetStream waits for an ack before redelivering, in s.
    pub ack_wait_s: u64,
    /// Most customer actors resident on this node (spread evenly over its shards).
    pub resident_max_customers: usize,
    /// A customer actor idle this long (wall clock; passivation is not a rule) is passivated, in s.
    pub passivate_after_s: u64,
    /// Entries kept in the identity directory's in-memory cache (0 = no cache).
    pub identity_cache_max_entries: usize,
    /// sled page cache, in bytes.
    pub sled_cache_max_bytes: u64,
    /// Least time between the starts of two sled flushes, in ms (0 = back to back).
    pub flush_interval_ms: u64,
    /// Longest a query waits for its shard worker, in ms.
    pub query_timeout_ms: u64,
    /// Interval of the automatic clock tick written into every shard log, in s (0 = none).
    pub tick_interval_s: u64,
    /// Interval of the scheduled customer-value fit, in s (0 = on demand only).
    pub value_fit_interval_s: u64,
    /// Longest graceful shutdown before tasks are aborted, in s.
    pub shutdown_grace_s: u64,
}

/// `[rules]`: where the loyalty and retention rules are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesSection {
    /// Rules file; a relative path is relative to the config file's directory.
    pub path: PathBuf,
}

/// Values given on the command line or in the environment; `None` keeps the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub node_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub nats_url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: NodeSection::default(),
            nats: NatsSection::default(),
            cluster: ClusterSection::default(),
            limits: LimitsSection::default(),
            rules: RulesSection::default(),
            origin: PathBuf::new(),
            data_dir_follows_node_id: true,
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            node_id: "node-1".to_string(),
            // Empty means "not given": Config fills in `.data/<node_id>`.
            data_dir: PathBuf::new(),
        }
    }
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            url: "nats://127.0.0.1:4222".to_string(),
            connect_retry_initial_ms: 250,
            connect_retry_max_ms: 5_000,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        const GIB: u64 = 1024 * 1024 * 1024;
        ClusterSection {
            name: "crm".to_string(),
            shards: 64,
            identity_secret: String::new(),
            stream_replicas: 1,
            ingest_duplicate_window_s: 120,
            ingest_max_age_s: 7 * 86_400,
            ingest_max_bytes: 4 * GIB,
            events_max_age_s: 3_600,
            events_max_bytes: GIB,
            dlq_max_age_s: 30 * 86_400,
            dlq_max_bytes: GIB,
            shard_log_max_bytes: 16 * GIB,
            shard_log_max_age_s: 0,
            snapshot_max_bytes: 16 * GIB,
            heartbeat_interval_ms: 1_000,
            node_timeout_ms: 4_000,
            lease_timeout_ms: 5_000,
            lease_margin_ms: 1_500,
            rebalance_max_moves: 4,
            snapshot_interval_s: 60,
            snapshot_every_records: 10_000,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            payload_max_bytes: 64 * 1024,
            amount_max: 1_000_000.0,
            items_max: 200,
            item_qty_max: 10_000,
            occurred_at_future_max_days: 366,
            batch_max_events: 512,
            router_batch_max_events: 2048,
            snapshot_piece_bytes: 512 * 1024,
            ingest_max_ack_pending: 8_192,
            ack_wait_s: 30,
            resident_max_customers: 100_000,
            passivate_after_s: 600,
            identity_cache_max_entries: 200_000,
            sled_cache_max_bytes: 256 * 1024 * 1024,
            flush_interval_ms: 5,
            query_timeout_ms: 2_000,
            tick_interval_s: 3_600,
            value_fit_interval_s: 86_400,
            shutdown_grace_s: 20,
        }
    }
}

impl Default for RulesSection {
    fn default() -> Self {
        RulesSection {
            path: PathBuf::from("rules.toml"),
        }
    }
}

impl Config {
    /// Reads, completes and validates the config file at `path`.
    ///
    /// Every field can also come from the environment as `CRM_<SECTION>__<FIELD>` (e.g.
    /// `CRM_LIMITS__BATCH_MAX_EVENTS=256`), which wins over the file; and
    /// `CRM_IDENTITY_SECRET`, when set and non-empty, replaces `cluster.identity_secret`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > CONFIG_FILE_MAX_BYTES {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "the file is {size} bytes, above {CONFIG_FILE_MAX_BYTES}; is this the node config?"
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let env_secret = std::env::var(IDENTITY_SECRET_ENV)
            .ok()
            .filter(|secret| !secret.is_empty());
        let fields: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with(ENV_FIELD_PREFIX) && name.contains("__"))
            .collect();
        let text = with_env_fields(&text, &fields).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        Config::from_toml(&text, path, env_secret)
    }

    /// Parses config text as if read from `origin` (which names it in errors and anchors
    /// the rules path), then validates it. Ignores the environment.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::from_toml(text, origin, None)
    }

    fn from_toml(
        text: &str,
        origin: &Path,
        env_secret: Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: one_line(&error.to_string()),
        })?;
        config.origin = origin.to_path_buf();
        config.data_dir_follows_node_id = config.node.data_dir.as_os_str().is_empty();
        config.fill_data_dir();
        if let Some(secret) = env_secret {
            config.cluster.identity_secret = secret;
        }
        if config.rules.path.is_relative() && !config.rules.path.as_os_str().is_empty() {
            if let Some(directory) = origin.parent() {
                config.rules.path = directory.join(&config.rules.path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Applies command-line/environment values. Call [`Config::validate`] afterwards.
    ///
    /// A new `node_id` also moves a `data_dir` that was not given explicitly.
    pub fn with_overrides(mut self, overrides: Overrides) -> Config {
        if let Some(node_id) = overrides.node_id {
            self.node.node_id = node_id;
            self.fill_data_dir();
        }
        if let Some(data_dir) = overrides.data_dir {
            self.node.data_dir = data_dir;
            self.data_dir_follows_node_id = false;
        }
        if let Some(url) = overrides.nats_url {
            self.nats.url = url;
        }
        self
    }

    fn fill_data_dir(&mut self) {
        if self.data_dir_follows_node_id {
            self.node.data_dir = Path::new(".data").join(&self.node.node_id);
        }
    }

    /// Checks every value against its range and the cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let node = &self.node;
        self.check_token("node.node_id", &node.node_id, 64)?;
        if node.data_dir.as_os_str().is_empty() {
            return Err(self.invalid(
                "node.data_dir",
                "\"\"",
                "is empty; give a directory for the state store, e.g. \".data/node-1\"",
            ));
        }

        let nats = &self.nats;
        let urls = nats_urls(&nats.url);
        let unusable = urls
            .iter()
            .find(|url| url.parse::<async_nats::ServerAddr>().is_err());
        if urls.is_empty() || nats.url.chars().any(char::is_whitespace) || unusable.is_some() {
            return Err(self.invalid(
                "nats.url",
                format!("{:?}", nats.url),
                "must be a NATS URL, or several separated by commas, without spaces, e.g. \
                 \"nats://127.0.0.1:4222\" or \"nats://10.0.0.1:4222,nats://10.0.0.2:4222\"",
            ));
        }
        self.range(
            "nats.connect_retry_initial_ms",
            nats.connect_retry_initial_ms,
            1,
            60_000,
        )?;
        self.range(
            "nats.connect_retry_max_ms",
            nats.connect_retry_max_ms,
            1,
            600_000,
        )?;
        if nats.connect_retry_max_ms < nats.connect_retry_initial_ms {
            return Err(self.invalid(
                "nats.connect_retry_max_ms",
                nats.connect_retry_max_ms,
                format!(
                    "is below nats.connect_retry_initial_ms = {}; raise it to at least that",
                    nats.connect_retry_initial_ms
                ),
            ));
        }

        let cluster = &self.cluster;
        self.check_token("cluster.name", &cluster.name, 64)?;
        self.range("cluster.shards", cluster.shards, 1, 4096)?;
        let secret_bytes = cluster.identity_secret.len();
        if secret_bytes < IDENTITY_SECRET_MIN_BYTES {
            let shown = if secret_bytes == 0 {
                "(missing)".to_string()
            } else {
                format!("({secret_bytes} bytes)")
            };
            return Err(self.invalid(
                "cluster.identity_secret",
                shown,
                format!(
                    "must be at least {IDENTITY_SECRET_MIN_BYTES} bytes; set it in [cluster] or in the \
                     environment variable {IDENTITY_SECRET_ENV} (the same value on every node)"
                ),
            ));
        }
        self.range("cluster.stream_replicas", cluster.stream_replicas, 1, 5)?;
        self.range(
            "cluster.ingest_duplicate_window_s",
            cluster.ingest_duplicate_window_s,
            1,
            86_400,
        )?;
        self.range(
            "cluster.ingest_max_age_s",
            cluster.ingest_max_age_s,
            0,
            10 * 365 * 86_400,
        )?;
        // Unrouted events expire with the same age: a router outage longer than it loses
        // events that adapters were told are durable.
        if (1..INGEST_MAX_AGE_MIN_S).contains(&cluster.ingest_max_age_s) {
            return Err(self.invalid(
                "cluster.ingest_max_age_s",
                cluster.ingest_max_age_s,
                format!("must be 0 (no age limit) or at least {INGEST_MAX_AGE_MIN_S}: events not yet routed expire too, so keep it well above the longest router outage"),
            ));
        }
        self.range(
            "cluster.ingest_max_bytes",
            cluster.ingest_max_bytes,
            0,
            i64::MAX as u64,
        )?;
        self.range(
            "cluster.events_max_age_s",
            cluster.events_max_age_s,
            0,
            10 * 365 * 86_400,
        )?;
        self.range(
            "cluster.events_max_bytes",
            cluster.events_max_bytes,
            0,
            i64::MAX as u64,
        )?;
        self.range(
            "cluster.dlq_max_age_s",
            cluster.dlq_max_age_s,
            0,
            10 * 365 * 86_400,
        )?;
        self.range(
            "cluster.dlq_max_bytes",
            cluster.dlq_max_bytes,
            0,
            i64::MAX as u64,
        )?;
        self.range(
            "cluster.shard_log_max_bytes",
            cluster.shard_log_max_bytes,
            0,
            i64::MAX as u64,
        )?;
        self.range(
            "cluster.snapshot_max_bytes",
            cluster.snapshot_max_bytes,
            0,
            i64::MAX as u64,
        )?;
        self.range(
            "cluster.heartbeat_interval_ms",
            cluster.heartbeat_interval_ms,
            100,
            60_000,
        )?;
        let heartbeat = cluster.heartbeat_interval_ms;
        self.range(
            "cluster.node_timeout_ms",
            cluster.node_timeout_ms,
            2 * heartbeat,
            600_000,
        )?;
        self.range(
            "cluster.lease_timeout_ms",
            cluster.lease_timeout_ms,
            3 * heartbeat,
            600_000,
        )?;
        // The holder must get at least two renewal chances before it has to stop.
        let margin_max = cluster.lease_timeout_ms.saturating_sub(2 * heartbeat);
        if cluster.lease_margin_ms < heartbeat || cluster.lease_margin_ms > margin_max {
            return Err(self.invalid(
                "cluster.lease_margin_ms",
                cluster.lease_margin_ms,
                format!(
                    "must be between heartbeat_interval_ms ({heartbeat}) and lease_timeout_ms -                      2 x heartbeat_interval_ms ({margin_max}); raise lease_timeout_ms for a larger margin"
                ),
            ));
        }
        self.range(
            "cluster.rebalance_max_moves",
            cluster.rebalance_max_moves,
            1,
            4096,
        )?;
        self.range(
            "cluster.snapshot_interval_s",
            cluster.snapshot_interval_s,
            1,
            86_400,
        )?;
        self.range(
            "cluster.snapshot_every_records",
            cluster.snapshot_every_records,
            0,
            100_000_000,
        )?;
        if cluster.shard_log_max_age_s != 0
            && cluster.shard_log_max_age_s < 3 * cluster.snapshot_interval_s
        {
            return Err(self.invalid(
                "cluster.shard_log_max_age_s",
                cluster.shard_log_max_age_s,
                format!(
                    "must be 0 (no age limit) or at least 3 x snapshot_interval_s ({}): a shard \
                     restores its last snapshot and replays the records after it, which must \
                     still be in the log",
                    3 * cluster.snapshot_interval_s
                ),
            ));
        }

        let limits = &self.limits;
        self.range(
            "limits.snapshot_piece_bytes",
            limits.snapshot_piece_bytes,
            4 * 1024,
            768 * 1024,
        )?;
        self.range(
            "limits.payload_max_bytes",
            limits.payload_max_bytes,
            256,
            1024 * 1024,
        )?;
        let amount = limits.amount_max;
        let amount_minor = amount * 100.0;
        if !amount.is_finite() || amount <= 0.0 || amount > 1e12 {
            return Err(self.invalid(
                "limits.amount_max",
                amount,
                "must be a positive amount in major units up to 1000000000000, e.g. 1000000",
            ));
        }
        if (amount_minor - amount_minor.round()).abs() > 1e-6 {
            return Err(self.invalid(
                "limits.amount_max",
                amount,
                "has more than 2 decimals; give major units with at most cents, e.g. 999.99",
            ));
        }
        self.range("limits.items_max", limits.items_max, 1, 10_000)?;
        self.range("limits.item_qty_max", limits.item_qty_max, 1, 1_000_000)?;
        self.range(
            "limits.occurred_at_future_max_days",
            limits.occurred_at_future_max_days,
            0,
            36_500,
        )?;
        self.range(
            "limits.batch_max_events",
            limits.batch_max_events,
            1,
            10_000,
        )?;
        self.range(
            "limits.router_batch_max_events",
            limits.router_batch_max_events,
            1,
            10_000,
        )?;
        self.range(
            "limits.ingest_max_ack_pending",
            limits.ingest_max_ack_pending,
            1,
            1_000_000,
        )?;
        if (limits.ingest_max_ack_pending as usize) < limits.router_batch_max_events {
            return Err(self.invalid(
                "limits.ingest_max_ack_pending",
                limits.ingest_max_ack_pending,
                format!(
                    "is below limits.router_batch_max_events = {}; raise it so a full batch can be pulled",
                    limits.router_batch_max_events
                ),
            ));
        }
        self.range("limits.ack_wait_s", limits.ack_wait_s, 5, 3_600)?;
        self.range(
            "limits.resident_max_customers",
            limits.resident_max_customers,
            1,
            100_000_000,
        )?;
        self.range(
            "limits.passivate_after_s",
            limits.passivate_after_s,
            1,
            30 * 86_400,
        )?;
        self.range(
            "limits.identity_cache_max_entries",
            limits.identity_cache_max_entries,
            0,
            100_000_000,
        )?;
        self.range(
            "limits.sled_cache_max_bytes",
            limits.sled_cache_max_bytes,
            1024 * 1024,
            1024 * 1024 * 1024 * 1024,
        )?;
        self.range(
            "limits.flush_interval_ms",
            limits.flush_interval_ms,
            0,
            1_000,
        )?;
        self.range(
            "limits.query_timeout_ms",
            limits.query_timeout_ms,
            1,
            60_000,
        )?;
        self.range(
            "limits.tick_interval_s",
            limits.tick_interval_s,
            0,
            365 * 86_400,
        )?;
        self.range(
            "limits.value_fit_interval_s",
            limits.value_fit_interval_s,
            0,
            365 * 86_400,
        )?;
        self.range("limits.shutdown_grace_s", limits.shutdown_grace_s, 0, 600)?;

        if self.rules.path.as_os_str().is_empty() {
            return Err(self.invalid(
                "rules.path",
                "\"\"",
                "is empty; give the rules file, e.g. \"rules.toml\" (relative to this config file)",
            ));
        }
        Ok(())
    }

    /// The rules file (already resolved against the config file's directory).
    pub fn rules_path(&self) -> PathBuf {
        self.rules.path.clone()
    }

    /// `limits.amount_max` in minor units (cents).
    pub fn amount_max_minor(&self) -> i64 {
        // validate() bounds amount_max to (0, 1e12] with at most 2 decimals.
        (self.limits.amount_max * 100.0).round() as i64
    }

    /// `limits.occurred_at_future_max_days` in ms (`None` for 0, no limit).
    pub fn occurred_at_future_max_ms(&self) -> Option<i64> {
        let days = self.limits.occurred_at_future_max_days;
        (days > 0).then(|| i64::from(days) * 86_400_000)
    }

    /// Stream limits for the JetStream set-up.
    pub fn stream_settings(&self) -> StreamSettings {
        let cluster = &self.cluster;
        StreamSettings {
            replicas: cluster.stream_replicas,
            duplicate_window_s: cluster.ingest_duplicate_window_s,
            ingest: StreamLimits {
                max_age_s: cluster.ingest_max_age_s,
                max_bytes: cluster.ingest_max_bytes,
            },
            shards: StreamLimits {
                max_age_s: cluster.shard_log_max_age_s,
                max_bytes: cluster.shard_log_max_bytes,
            },
            events: StreamLimits {
                max_age_s: cluster.events_max_age_s,
                max_bytes: cluster.events_max_bytes,
            },
            dlq: StreamLimits {
                max_age_s: cluster.dlq_max_age_s,
                max_bytes: cluster.dlq_max_bytes,
            },
            snapshots: StreamLimits {
                max_age_s: 0,
                max_bytes: cluster.snapshot_max_bytes,
            },
            // message_max_bytes: the set-up's default, above every accepted
            // payload_max_bytes, so an oversized event still reaches the router's DLQ.
            ..StreamSettings::default()
        }
    }

    /// The cluster protocol's timings and limits.
    pub fn cluster_settings(&self) -> crate::cluster::ClusterSettings {
        let cluster = &self.cluster;
        crate::cluster::ClusterSettings {
            heartbeat: Duration::from_millis(cluster.heartbeat_interval_ms),
            node_timeout: Duration::from_millis(cluster.node_timeout_ms),
            lease_timeout: Duration::from_millis(cluster.lease_timeout_ms),
            lease_margin: Duration::from_millis(cluster.lease_margin_ms),
            rebalance_max_moves: cluster.rebalance_max_moves,
            snapshot_interval: Duration::from_secs(cluster.snapshot_interval_s),
            snapshot_every_records: cluster.snapshot_every_records,
            snapshot_piece_bytes: self.limits.snapshot_piece_bytes,
        }
    }

    /// The router's shared ingest consumer.
    pub fn ingest_consumer_settings(&self) -> IngestConsumerSettings {
        IngestConsumerSettings {
            ack_wait_s: self.limits.ack_wait_s,
            max_ack_pending: self.limits.ingest_max_ack_pending,
        }
    }

    fn invalid(
        &self,
        field: &'static str,
        value: impl std::fmt::Display,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.clone(),
            field,
            value: value.to_string(),
            problem: problem.into(),
        }
    }

    fn range<T>(&self, field: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
    where
        T: PartialOrd + std::fmt::Display + Copy,
    {
        if value < min || value > max {
            return Err(self.invalid(field, value, format!("must be between {min} and {max}")));
        }
        Ok(())
    }

    fn check_token(
        &self,
        field: &'static str,
        value: &str,
        max_bytes: usize,
    ) -> Result<(), ConfigError> {
        let ok = (1..=max_bytes).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(self.invalid(
                field,
                format!("{value:?}"),
                format!(
                    "must be 1 to {max_bytes} characters of a-z, 0-9, '-' and '_', e.g. \"node-1\""
                ),
            ));
        }
        Ok(())
    }
}

/// toml's messages span several lines (a source excerpt); keep them on one line for logs.
/// Least `cluster.ingest_max_age_s` other than 0 (one day).
const INGEST_MAX_AGE_MIN_S: u64 = 86_400;

/// Environment variables that set one config field: `CRM_<SECTION>__<FIELD>`.
pub const ENV_FIELD_PREFIX: &str = "CRM_";
/// The sections an environment variable may name.
const SECTIONS: [&str; 5] = ["node", "nats", "cluster", "limits", "rules"];

/// The config text with the fields given by `CRM_<SECTION>__<FIELD>` variables set (the
/// text itself when there are none). A value is read as a TOML value (`256`, `true`,
/// `["a", "b"]`), else taken as a string (`nats://host:4222`).
fn with_env_fields(text: &str, variables: &[(String, String)]) -> Result<String, String> {
    if variables.is_empty() {
        return Ok(text.to_string());
    }
    let mut document: toml::Table = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
    for (name, raw) in variables {
        let Some((section, field)) = name[ENV_FIELD_PREFIX.len()..].split_once("__") else {
            continue;
        };
        let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
        if !SECTIONS.contains(&section.as_str()) || field.is_empty() {
            return Err(format!(
                "environment variable {name} names no config field: write CRM_<SECTION>__<FIELD> with a section of {SECTIONS:?}, e.g. CRM_LIMITS__BATCH_MAX_EVENTS"
            ));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut parsed| parsed.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let table = document
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(table) = table else {
            return Err(format!("[{section}] is not a table"));
        };
        table.insert(field, value);
    }
    toml::to_string(&document).map_err(|e| one_line(&e.to_string()))
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && *line != "|")
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "[cluster]\nidentity_secret = \"0123456789abcdef-test\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("cluster-config/x.toml"))
    }

    fn error_of(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_file_with_only_the_secret_gets_every_default() {
        let config = parse(SECRET).expect("minimal config");
        assert_eq!(config.node.node_id, "node-1");
        assert_eq!(config.node.data_dir, Path::new(".data/node-1"));
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.cluster.shards, 64);
        assert_eq!(config.cluster.stream_replicas, 1);
        assert_eq!(config.cluster.ingest_duplicate_window_s, 120);
        assert_eq!(config.cluster.events_max_age_s, 3600);
        assert_eq!(config.limits.payload_max_bytes, 65536);
        assert_eq!(config.amount_max_minor(), 100_000_000);
        assert_eq!(config.limits.items_max, 200);
        assert_eq!(config.limits.item_qty_max, 10_000);
        assert_eq!(config.limits.batch_max_events, 512);
        assert_eq!(config.limits.resident_max_customers, 100_000);
        assert_eq!(config.limits.passivate_after_s, 600);
        assert_eq!(config.limits.identity_cache_max_entries, 200_000);
        assert_eq!(config.limits.tick_interval_s, 3600);
        assert_eq!(config.rules_path(), Path::new("cluster-config/rules.toml"));
    }

    #[test]
    fn defaults_match_the_ingest_limits_of_the_domain() {
        let config = parse(SECRET).expect("minimal config");
        let domain = crm_actors::ingest::IngestLimits::default();
        assert_eq!(config.limits.payload_max_bytes, domain.payload_max_bytes);
        assert_eq!(config.amount_max_minor(), domain.amount_max_minor);
        assert_eq!(config.limits.items_max, domain.items_max);
        assert_eq!(config.limits.item_qty_max, domain.item_qty_max);
    }

    #[test]
    fn a_relative_rules_path_resolves_against_the_config_directory() {
        let text = format!("{SECRET}[rules]\npath = \"rules/loyalty.toml\"\n");
        let config = Config::from_toml_str(&text, Path::new("/etc/crm/node.toml")).expect("config");
        assert_eq!(
            config.rules_path(),
            Path::new("/etc/crm/rules/loyalty.toml")
        );
        let text = format!("{SECRET}[rules]\npath = \"/opt/rules.toml\"\n");
        let config = Config::from_toml_str(&text, Path::new("/etc/crm/node.toml")).expect("config");
        assert_eq!(config.rules_path(), Path::new("/opt/rules.toml"));
    }

    #[test]
    fn an_out_of_range_number_names_file_field_and_range() {
        let message = error_of(&format!("{SECRET}[limits]\nbatch_max_events = 0\n"));
        assert_eq!(
            message,
            "cluster-config/x.toml: limits.batch_max_events = 0: must be between 1 and 10000"
        );
        let message = error_of(&format!("{SECRET}shards = 5000\n"));
        assert!(
            message.contains("cluster.shards = 5000: must be between 1 and 4096"),
            "{message}"
        );
    }

    #[test]
    fn an_ingest_age_shorter_than_a_day_is_refused() {
        let message = error_of(&format!("{SECRET}ingest_max_age_s = 60\n"));
        assert!(
            message.contains("cluster.ingest_max_age_s = 60") && message.contains("at least 86400"),
            "{message}"
        );
        for fine in ["0", "86400"] {
            let text = format!("{SECRET}ingest_max_age_s = {fine}\n");
            Config::from_toml_str(&text, Path::new("x.toml")).expect(fine);
        }
    }

    #[test]
    fn environment_fields_set_typed_values_and_name_a_bad_section() {
        let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let text = with_env_fields(
            SECRET,
            &vars(&[
                ("CRM_LIMITS__BATCH_MAX_EVENTS", "256"),
                ("CRM_NATS__URL", "nats://10.0.0.5:4222"),
                ("CRM_CLUSTER__STREAM_REPLICAS", "3"),
            ]),
        )
        .expect("applied");
        let config = Config::from_toml_str(&text, Path::new("x.toml")).expect("config");
        assert_eq!(config.limits.batch_max_events, 256);
        assert_eq!(config.nats.url, "nats://10.0.0.5:4222");
        assert_eq!(config.cluster.stream_replicas, 3);
        let error = with_env_fields(SECRET, &vars(&[("CRM_LIMIT__X", "1")])).unwrap_err();
        assert!(error.contains("CRM_LIMIT__X"), "{error}");
    }

    #[test]
    fn a_nats_url_list_is_split_and_each_server_checked() {
        assert_eq!(
            nats_urls("nats://a:4222,nats://b:4223"),
            vec!["nats://a:4222".to_string(), "nats://b:4223".to_string()]
        );
        let ok = parse(&format!(
            "[nats]\nurl = \"nats://127.0.0.1:4222,nats://127.0.0.1:4223\"\n{SECRET}"
        ));
        assert!(ok.is_ok(), "{ok:?}");
        let message = error_of(&format!(
            "[nats]\nurl = \"nats://a:4222,nats://b:x\"\n{SECRET}"
        ));
        assert!(
            message.contains("nats.url") && message.contains("separated by commas"),
            "{message}"
        );
    }

    #[test]
    fn cluster_timings_and_the_shard_log_retention_rule_are_checked() {
        let message = error_of(&format!("{SECRET}shard_log_max_age_s = 100\n"));
        assert!(
            message.contains("cluster.shard_log_max_age_s = 100")
                && message.contains("at least 3 x snapshot_interval_s (180)"),
            "{message}"
        );
        let ok = parse(&format!(
            "{SECRET}shard_log_max_age_s = 180\nsnapshot_interval_s = 60\n"
        ));
        assert!(ok.is_ok(), "{ok:?}");
        let message = error_of(&format!("{SECRET}lease_margin_ms = 4000\n"));
        assert!(
            message.contains("cluster.lease_margin_ms = 4000")
                && message.contains("raise lease_timeout_ms"),
            "{message}"
        );
        let message = error_of(&format!("{SECRET}node_timeout_ms = 1500\n"));
        assert!(message.contains("cluster.node_timeout_ms"), "{message}");
        let settings = parse(SECRET).expect("defaults").cluster_settings();
        assert_eq!(settings.lease_timeout, Duration::from_secs(5));
        assert_eq!(settings.snapshot_piece_bytes, 512 * 1024);
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let message = error_of(&format!("{SECRET}shards = \"many\"\n"));
        assert!(message.starts_with("cluster-config/x.toml: "), "{message}");
        assert!(message.contains("shards"), "{message}");
        assert!(message.contains("invalid type"), "{message}");
        let message = error_of(&format!("{SECRET}[limits]\nitems_max = -3\n"));
        assert!(message.contains("items_max"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_the_key() {
        let message = error_of(&format!("{SECRET}[limits]\nbatch_max_event = 10\n"));
        assert!(
            message.contains("unknown field `batch_max_event`"),
            "{message}"
        );
        assert!(message.contains("docs/config.md"), "{message}");
        let message = error_of(&format!("{SECRET}[limitz]\n"));
        assert!(message.contains("unknown field `limitz`"), "{message}");
    }

    #[test]
    fn a_missing_or_short_secret_says_how_to_set_it() {
        let message = error_of("[node]\nnode_id = \"node-1\"\n");
        assert!(
            message.contains("cluster.identity_secret = (missing)"),
            "{message}"
        );
        assert!(message.contains(IDENTITY_SECRET_ENV), "{message}");
        let message = error_of("[cluster]\nidentity_secret = \"short\"\n");
        assert!(message.contains("(5 bytes)"), "{message}");
        assert!(
            !message.contains("short"),
            "a secret is never echoed: {message}"
        );
    }

    #[test]
    fn the_environment_secret_replaces_the_file_secret() {
        let config = Config::from_toml(
            "",
            Path::new("x.toml"),
            Some("from-the-environment-0123".to_string()),
        )
        .expect("config");
        assert_eq!(config.cluster.identity_secret, "from-the-environment-0123");
    }

    #[test]
    fn bad_toml_syntax_names_the_line() {
        let message = error_of(&format!("{SECRET}[limits\nitems_max = 3\n"));
        assert!(message.starts_with("cluster-config/x.toml: "), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn cross_field_limits_are_checked() {
        let message = error_of(&format!(
            "{SECRET}[limits]\nrouter_batch_max_events = 4000\ningest_max_ack_pending = 100\n"
        ));
        assert!(
            message.contains("limits.ingest_max_ack_pending = 100"),
            "{message}"
        );
        let message = error_of(&format!(
            "{SECRET}[nats]\nconnect_retry_initial_ms = 900\nconnect_retry_max_ms = 100\n"
        ));
        assert!(
            message.contains("nats.connect_retry_max_ms = 100"),
            "{message}"
        );
        let message = error_of(&format!("{SECRET}[limits]\namount_max = 10.005\n"));
        assert!(message.contains("more than 2 decimals"), "{message}");
        let message = error_of(&format!("{SECRET}[node]\nnode_id = \"Node 1\"\n"));
        assert!(message.contains("node.node_id = \"Node 1\""), "{message}");
    }

    #[test]
    fn amount_max_accepts_integers_and_decimals() {
        let config = parse(&format!("{SECRET}[limits]\namount_max = 2500\n")).expect("config");
        assert_eq!(config.amount_max_minor(), 250_000);
        let config = parse(&format!("{SECRET}[limits]\namount_max = 999.99\n")).expect("config");
        assert_eq!(config.amount_max_minor(), 99_999);
    }

    #[test]
    fn overrides_replace_file_values_and_move_a_derived_data_dir() {
        let config = parse(SECRET).expect("config").with_overrides(Overrides {
            node_id: Some("node-7".to_string()),
            data_dir: None,
            nats_url: Some("nats://10.0.0.5:4222".to_string()),
        });
        config.validate().expect("valid");
        assert_eq!(config.node.node_id, "node-7");
        assert_eq!(config.node.data_dir, Path::new(".data/node-7"));
        assert_eq!(config.nats.url, "nats://10.0.0.5:4222");

        let explicit = parse(&format!("{SECRET}[node]\ndata_dir = \"/var/lib/crm\"\n"))
            .expect("config")
            .with_overrides(Overrides {
                node_id: Some("node-2".to_string()),
                ..Overrides::default()
            });
        assert_eq!(explicit.node.data_dir, Path::new("/var/lib/crm"));
        let moved = explicit.with_overrides(Overrides {
            data_dir: Some(PathBuf::from("/tmp/n2")),
            ..Overrides::default()
        });
        assert_eq!(moved.node.data_dir, Path::new("/tmp/n2"));

        let bad = parse(SECRET).expect("config").with_overrides(Overrides {
            node_id: Some("bad id".to_string()),
            ..Overrides::default()
        });
        assert!(bad.validate().is_err());
    }

    #[test]
    fn derived_stream_settings_match_the_jetstream_defaults() {
        let config = parse(SECRET).expect("config");
        assert_eq!(config.stream_settings(), StreamSettings::default());
        assert_eq!(config.ingest_consumer_settings().ack_wait_s, 30);
        assert_eq!(config.ingest_consumer_settings().max_ack_pending, 8192);
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let error = Config::load(Path::new("/nonexistent/crm.toml")).expect_err("missing file");
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/crm.toml: cannot read"),
            "{error}"
        );
    }

    #[test]
    fn every_cluster_config_file_loads_and_validates() {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config");
        let mut node_ids = Vec::new();
        for name in ["single.toml", "node-1.toml", "node-2.toml", "node-3.toml"] {
            let path = directory.join(name);
            let text = std::fs::read_to_string(&path).expect("cluster-config file exists");
            let config = Config::from_toml_str(&text, &path)
                .unwrap_or_else(|error| panic!("{name} must load: {error}"));
            assert_eq!(config.rules_path(), directory.join("rules.toml"), "{name}");
            if name != "single.toml" {
                node_ids.push((config.node.node_id.clone(), config.node.data_dir.clone()));
            }
        }
        node_ids.sort();
        node_ids.dedup_by(|a, b| a.0 == b.0 || a.1 == b.1);
        assert_eq!(
            node_ids.len(),
            3,
            "node-N files need distinct node ids and data dirs"
        );
    }

    #[test]
    fn the_documented_example_is_a_valid_full_config() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let text = std::fs::read_to_string(&docs).expect("docs/config.md exists");
        let example = text
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/config.md has a ```toml example");
        let parsed: toml::Value = toml::from_str(example).expect("example is TOML");
        let config = Config::from_toml_str(example, &docs).expect("example validates");
        // A full example: every section and every field is spelled out.
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialise");
        for (section, fields) in defaults.as_table().into_iter().flatten() {
            for field in fields.as_table().into_iter().flatten().map(|(k, _)| k) {
                assert!(
                    parsed.get(section).and_then(|s| s.get(field)).is_some(),
                    "docs example lacks {section}.{field}"
                );
            }
        }
        assert_eq!(config.node.node_id, "node-1");
    }
}
