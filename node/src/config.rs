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

/// Range checks of one section, in the order given: `ranges!(self, limits { items_max:
/// 1..=10_000, ... })` checks `self.limits.items_max` and names it `limits.items_max` in the
/// error ("must be between 1 and 10000"), so a field's name is spelled once.
macro_rules! ranges {
    ($config:ident, $section:ident { $($field:ident: $range:expr),* $(,)? }) => {
        $(
            let range = $range;
            $config.range(
                concat!(stringify!($section), ".", stringify!($field)),
                $config.$section.$field,
                *range.start(),
                *range.end(),
            )?;
        )*
    };
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

    /// Checks every value against its range and the cross-field rules, section by section
    /// in file order; the first problem found is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_nats()?;
        self.validate_cluster()?;
        self.validate_limits()?;
        self.validate_rules()
    }

    fn validate_node(&self) -> Result<(), ConfigError> {
        let node = &self.node;
        self.check_token("node.node_id", &node.node_id, 64)?;
        if node.data_dir.as_os_str().is_empty() {
            return Err(self.invalid(
                "node.data_dir",
                "\"\"",
                "is empty; give a directory for the state store, e.g. \".data/node-1\"",
            ));
        }
        Ok(())
    }

    fn validate_nats(&self) -> Result<(), ConfigError> {
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
        ranges!(
            self,
            nats {
                connect_retry_initial_ms: 1..=60_000,
                connect_retry_max_ms: 1..=600_000,
            }
        );
        self.at_least(
            "nats.connect_retry_max_ms",
            nats.connect_retry_max_ms,
            "nats.connect_retry_initial_ms",
            nats.connect_retry_initial_ms,
            "raise it to at least that",
        )
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        self.check_token("cluster.name", &cluster.name, 64)?;
        ranges!(self, cluster { shards: 1..=4096 });
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
        ranges!(
            self,
            cluster {
                stream_replicas: 1..=5,
                ingest_duplicate_window_s: 1..=86_400,
                ingest_max_age_s: 0..=AGE_MAX_S,
            }
        );
        // Unrouted events expire with the same age: a router outage longer than it loses
        // events that adapters were told are durable.
        if (1..INGEST_MAX_AGE_MIN_S).contains(&cluster.ingest_max_age_s) {
            return Err(self.invalid(
                "cluster.ingest_max_age_s",
                cluster.ingest_max_age_s,
                format!("must be 0 (no age limit) or at least {INGEST_MAX_AGE_MIN_S}: events not yet routed expire too, so keep it well above the longest router outage"),
            ));
        }
        ranges!(
            self,
            cluster {
                ingest_max_bytes: 0..=BYTES_MAX,
                events_max_age_s: 0..=AGE_MAX_S,
                events_max_bytes: 0..=BYTES_MAX,
                dlq_max_age_s: 0..=AGE_MAX_S,
                dlq_max_bytes: 0..=BYTES_MAX,
                shard_log_max_bytes: 0..=BYTES_MAX,
                snapshot_max_bytes: 0..=BYTES_MAX,
                heartbeat_interval_ms: 100..=60_000,
            }
        );
        let heartbeat = cluster.heartbeat_interval_ms;
        ranges!(
            self,
            cluster {
                node_timeout_ms: 2 * heartbeat..=600_000,
                lease_timeout_ms: 3 * heartbeat..=600_000,
            }
        );
        // The holder must get at least two renewal chances before it has to stop.
        let margin_max = cluster.lease_timeout_ms.saturating_sub(2 * heartbeat);
        if cluster.lease_margin_ms < heartbeat || cluster.lease_margin_ms > margin_max {
            return Err(self.invalid(
                "cluster.lease_margin_ms",
                cluster.lease_margin_ms,
                format!(
                    "must be between heartbeat_interval_ms ({heartbeat}) and lease_timeout_ms - \
                     2 x heartbeat_interval_ms ({margin_max}); raise lease_timeout_ms for a \
                     larger margin"
                ),
            ));
        }
        ranges!(
            self,
            cluster {
                rebalance_max_moves: 1..=4096,
                snapshot_interval_s: 1..=86_400,
                snapshot_every_records: 0..=100_000_000,
            }
        );
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
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        ranges!(
            self,
            limits {
                snapshot_piece_bytes: 4 * 1024..=768 * 1024,
                payload_max_bytes: 256..=1024 * 1024,
            }
        );
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
        ranges!(
            self,
            limits {
                items_max: 1..=10_000,
                item_qty_max: 1..=1_000_000,
                occurred_at_future_max_days: 0..=36_500,
                batch_max_events: 1..=10_000,
                router_batch_max_events: 1..=10_000,
                ingest_max_ack_pending: 1..=1_000_000,
            }
        );
        self.at_least(
            "limits.ingest_max_ack_pending",
            limits.ingest_max_ack_pending as usize,
            "limits.router_batch_max_events",
            limits.router_batch_max_events,
            "raise it so a full batch can be pulled",
        )?;
        ranges!(
            self,
            limits {
                ack_wait_s: 5..=3_600,
                resident_max_customers: 1..=100_000_000,
                passivate_after_s: 1..=30 * 86_400,
                identity_cache_max_entries: 0..=100_000_000,
                sled_cache_max_bytes: 1024 * 1024..=1024 * 1024 * 1024 * 1024,
                flush_interval_ms: 0..=1_000,
                query_timeout_ms: 1..=60_000,
                tick_interval_s: 0..=365 * 86_400,
                value_fit_interval_s: 0..=365 * 86_400,
                shutdown_grace_s: 0..=600,
            }
        );
        Ok(())
    }

    fn validate_rules(&self) -> Result<(), ConfigError> {
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

    /// `field` (= `value`) must be at least `other` (= `floor`); `fix` says what to do.
    fn at_least<T>(
        &self,
        field: &'static str,
        value: T,
        other: &'static str,
        floor: T,
        fix: &str,
    ) -> Result<(), ConfigError>
    where
        T: PartialOrd + std::fmt::Display + Copy,
    {
        if value < floor {
            return Err(self.invalid(field, value, format!("is below {other} = {floor}; {fix}")));
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
/// Largest age limit of a stream, in seconds (ten years).
const AGE_MAX_S: u64 = 10 * 365 * 86_400;
/// Largest size limit of a stream, in bytes (what JetStream's signed 64-bit field holds).
const BYTES_MAX: u64 = i64::MAX as u64;

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
mod tests;
