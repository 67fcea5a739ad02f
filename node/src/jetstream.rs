//! JetStream set-up: the four streams, the KV buckets, the recorded shard count and the
//! durable consumers, created or checked idempotently by every node at start.
//!
//! Every node runs [`ensure_streams`], [`ensure_kv`] and [`ensure_shard_count`] before it
//! serves; running them again (another node, a restart, two nodes at once) changes nothing
//! when the settings agree, updates a stream whose limits changed, and refuses a node whose
//! shard count differs from the one the cluster recorded. Works against nats-server 2.9.10
//! (Debian) and newer: async-nats 0.51's `create_key_value` cannot parse a 2.9 account-info
//! reply, so [`ensure_kv`] creates a bucket's backing stream itself, exactly as the client
//! would, and opens it with `get_key_value`. A 2.9 consumer has a single filter subject, so
//! each shard is read by its own consumer (`crate::shard::log_reader`), which starts at the shard's
//! applied sequence kept in sled. Subject and stream names
//! come from [`crate::subjects`]; this module never publishes application data.

use crate::backoff::Backoff;
use crate::subjects;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
use std::time::Duration;

/// Attempts for each set-up request that fails transiently (timeouts, no responders).
const SETUP_ATTEMPTS_MAX: u32 = 5;
/// First pause between set-up attempts; doubles each time (with jitter).
const SETUP_RETRY_INITIAL_MS: u64 = 200;
/// Longest pause between set-up attempts.
const SETUP_RETRY_MAX_MS: u64 = 3_200;

/// Size and age limits of one stream. `0` means "no limit" for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Messages older than this are removed, in seconds.
    pub max_age_s: u64,
    /// Total size of the stream, in bytes.
    pub max_bytes: u64,
}

/// Settings of the four streams; from the node config ([`Default`] is a sane single node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Replicas of every stream and KV bucket (1 on a single server; 3 on a NATS cluster).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped by a stream, in seconds (capped at a
    /// stream's max_age). Adapter retries and router redeliveries within it are stored once.
    pub duplicate_window_s: u64,
    /// Largest message any stream stores, in bytes (0: the server's `max_payload`). Must be
    /// above the ingest `payload_max_bytes` so that oversized events still reach the router
    /// and its dead-letter stream rather than being refused at publish.
    pub message_max_bytes: u32,
    /// CRM_INGEST. Full means new publishes are refused (adapters retry), never old events
    /// silently dropped.
    pub ingest: StreamLimits,
    /// CRM_SHARDS: the source of truth of every shard. Full means new publishes are refused.
    pub shards: StreamLimits,
    /// CRM_EVENTS: recent actor events for dashboards; the oldest are dropped when full.
    pub events: StreamLimits,
    /// CRM_DLQ: dead letters for operators; the oldest are dropped when full.
    pub dlq: StreamLimits,
    /// CRM_SNAPSHOTS: shard snapshots (superseded ones are purged). Full means a new
    /// snapshot is refused (the shard log keeps everything it needs meanwhile).
    pub snapshots: StreamLimits,
    /// CRM_AUDIT: one record per applied shard batch; the oldest are dropped when full.
    pub audit: StreamLimits,
}

impl Default for StreamSettings {
    fn default() -> Self {
        const GIB: u64 = 1024 * 1024 * 1024;
        const DAY_S: u64 = 24 * 3600;
        StreamSettings {
            replicas: 1,
            duplicate_window_s: 120,
            message_max_bytes: 1024 * 1024,
            ingest: StreamLimits {
                max_age_s: 7 * DAY_S,
                max_bytes: 4 * GIB,
            },
            shards: StreamLimits {
                max_age_s: 0,
                max_bytes: 16 * GIB,
            },
            events: StreamLimits {
                max_age_s: 3600,
                max_bytes: GIB,
            },
            dlq: StreamLimits {
                max_age_s: 30 * DAY_S,
                max_bytes: GIB,
            },
            snapshots: StreamLimits {
                max_age_s: 0,
                max_bytes: 16 * GIB,
            },
            audit: StreamLimits {
                max_age_s: DAY_S,
                max_bytes: GIB,
            },
        }
    }
}

/// Settings of the shared ingest consumer (`crm-router`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConsumerSettings {
    /// Time a delivered message may stay unacked before redelivery, in seconds.
    pub ack_wait_s: u64,
    /// Most delivered-but-unacked messages across every router of the cluster.
    pub max_ack_pending: u32,
}

impl Default for IngestConsumerSettings {
    fn default() -> Self {
        IngestConsumerSettings {
            ack_wait_s: 30,
            max_ack_pending: 10_000,
        }
    }
}

/// Why JetStream could not be set up. Each message names the stream, bucket or consumer and
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("JetStream {action} of stream {stream} failed: {detail}; check that nats-server runs with JetStream enabled (-js) and is reachable")]
    Stream {
        stream: String,
        action: &'static str,
        detail: String,
    },
    #[error("nats-server cannot reserve the {max_bytes} bytes of disk configured for stream {stream}: its JetStream store limit (max_store; by default 75% of the disk that was free when the server started) is below the sum of the streams' size caps. Lower the cluster.*_max_bytes settings of the node config (docs/config.md), free disk space, or raise the server's jetstream max_store")]
    StreamStorage { stream: String, max_bytes: i64 },
    #[error("stream {stream} exists with settings the server refuses to change to the configured ones ({detail}); restore the old setting in the node config, or remove the stream (`nats stream rm {stream}`, losing its messages) and restart")]
    StreamConflict { stream: String, detail: String },
    #[error("KV bucket {bucket}: {detail}; check that nats-server runs with JetStream enabled (-js) and is reachable")]
    Kv { bucket: String, detail: String },
    #[error("stream {stream} exists but is not a KV bucket (max_msgs_per_subject < 1 or subjects not {subjects}); remove it (`nats stream rm {stream}`) and restart")]
    NotKv { stream: String, subjects: String },
    #[error("KV bucket name '{bucket}' is invalid; use letters, digits, '-' and '_'")]
    InvalidBucket { bucket: String },
    #[error("the shard count must be at least 1 (got {configured}); set cluster.shards in the node config")]
    InvalidShardCount { configured: u32 },
    #[error("this node is configured with {configured} shards but the cluster recorded {recorded} shards (KV bucket {bucket}, key {key}); set cluster.shards = {recorded} in the node config. The shard count of a cluster cannot change: every stored shard log and state store is laid out by it")]
    ShardCountMismatch {
        configured: u32,
        recorded: u32,
        bucket: &'static str,
        key: &'static str,
    },
    #[error("this node's cluster.identity_secret (fingerprint {configured}) is not the one this cluster's identities were recorded with (fingerprint {recorded}); give every node the same secret (CRM_IDENTITY_SECRET or the config), or its router would create a second customer for every known person")]
    IdentitySecretMismatch {
        configured: String,
        recorded: String,
    },
    #[error("KV bucket {bucket} key {key} holds '{value}', not a shard count; fix the value (`nats kv put {bucket} {key} <shards>`) or delete the key to let the next node record its count")]
    ShardCountUnreadable {
        value: String,
        bucket: &'static str,
        key: &'static str,
    },
    #[error("durable consumer {consumer} on stream {stream} could not be created or updated: {detail}; if its settings changed incompatibly, remove it (`nats consumer rm {stream} {consumer}`; unacked messages are redelivered to the new one) and restart")]
    Consumer {
        stream: &'static str,
        consumer: String,
        detail: String,
    },
}

/// Creates the six streams, or updates their limits to the configured ones.
pub async fn ensure_streams(js: &Context, settings: &StreamSettings) -> Result<(), SetupError> {
    for config in stream_configs(settings) {
        ensure_stream(js, config).await?;
    }
    Ok(())
}

/// The stream configurations [`ensure_streams`] creates, for tests and docs.
pub fn stream_configs(settings: &StreamSettings) -> [stream::Config; 6] {
    let config = |name: &str, subject: &str, limits: StreamLimits, discard: DiscardPolicy| {
        let max_age = Duration::from_secs(limits.max_age_s);
        // The server refuses a duplicate window longer than max_age.
        let mut duplicate_window = Duration::from_secs(settings.duplicate_window_s.max(1));
        if !max_age.is_zero() {
            duplicate_window = duplicate_window.min(max_age);
        }
        stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: settings.replicas.max(1),
            discard,
            max_age,
            max_bytes: limit(limits.max_bytes),
            max_messages: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            max_message_size: if settings.message_max_bytes == 0 {
                -1
            } else {
                i32::try_from(settings.message_max_bytes).unwrap_or(i32::MAX)
            },
            duplicate_window,
            ..Default::default()
        }
    };
    [
        config(
            subjects::INGEST_STREAM,
            subjects::INGEST_ALL,
            settings.ingest,
            DiscardPolicy::New,
        ),
        config(
            subjects::SHARDS_STREAM,
            subjects::SHARDS_ALL,
            settings.shards,
            DiscardPolicy::New,
        ),
        config(
            subjects::EVENTS_STREAM,
            subjects::EVENTS_ALL,
            settings.events,
            DiscardPolicy::Old,
        ),
        config(
            subjects::DLQ_STREAM,
            subjects::DLQ_ALL,
            settings.dlq,
            DiscardPolicy::Old,
        ),
        config(
            subjects::SNAPSHOTS_STREAM,
            subjects::SNAPSHOTS_ALL,
            settings.snapshots,
            DiscardPolicy::New,
        ),
        config(
            subjects::AUDIT_STREAM,
            subjects::AUDIT_ALL,
            settings.audit,
            DiscardPolicy::Old,
        ),
    ]
}

fn limit(value: u64) -> i64 {
    if value == 0 {
        -1
    } else {
        i64::try_from(value).unwrap_or(i64::MAX)
    }
}

/// The fields this module manages, as they differ between `existing` and `desired`.
fn managed_differences(existing: &stream::Config, desired: &stream::Config) -> Vec<&'static str> {
    let mut differences = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            differences.push(name);
        }
    };
    check("subjects", existing.subjects == desired.subjects);
    check("retention", existing.retention == desired.retention);
    check("storage", existing.storage == desired.storage);
    check(
        "num_replicas",
        existing.num_replicas == desired.num_replicas,
    );
    check("discard", existing.discard == desired.discard);
    check("max_age", existing.max_age == desired.max_age);
    check("max_bytes", existing.max_bytes == desired.max_bytes);
    check(
        "max_msg_size",
        existing.max_message_size == desired.max_message_size,
    );
    check(
        "duplicate_window",
        existing.duplicate_window == desired.duplicate_window,
    );
    check(
        "max_msgs_per_subject",
        existing.max_messages_per_subject == desired.max_messages_per_subject,
    );
    check(
        "allow_rollup",
        existing.allow_rollup == desired.allow_rollup,
    );
    check("deny_delete", existing.deny_delete == desired.deny_delete);
    check(
        "allow_direct",
        existing.allow_direct == desired.allow_direct,
    );
    differences
}

/// Creates `desired`, or updates the managed fields of an existing stream of that name.
async fn ensure_stream(js: &Context, desired: stream::Config) -> Result<stream::Info, SetupError> {
    let name = desired.name.clone();
    let stream_error = |action, detail: String| SetupError::Stream {
        stream: name.clone(),
        action,
        detail,
    };
    let mut backoff = setup_backoff();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let transient = match js.get_stream(&name).await {
            Ok(stream) => {
                let existing = stream.cached_info().config.clone();
                let differences = managed_differences(&existing, &desired);
                if differences.is_empty() {
                    return Ok(stream.cached_info().clone());
                }
                tracing::info!(stream = %name, changed = ?differences, "updating stream settings");
                // Keep whatever else the server or an operator set; change only what we manage.
                let mut update = existing;
                update.subjects = desired.subjects.clone();
                update.retention = desired.retention;
                update.storage = desired.storage;
                update.num_replicas = desired.num_replicas;
                update.discard = desired.discard;
                update.max_age = desired.max_age;
                update.max_bytes = desired.max_bytes;
                update.max_message_size = desired.max_message_size;
                update.duplicate_window = desired.duplicate_window;
                update.max_messages_per_subject = desired.max_messages_per_subject;
                update.allow_rollup = desired.allow_rollup;
                update.deny_delete = desired.deny_delete;
                update.allow_direct = desired.allow_direct;
                match js.update_stream(&update).await {
                    Ok(info) => return Ok(info),
                    Err(error) => match error.kind() {
                        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::Response => {
                            error.to_string()
                        }
                        CreateStreamErrorKind::JetStreamUnavailable => error.to_string(),
                        _ => {
                            return Err(SetupError::StreamConflict {
                                stream: name.clone(),
                                detail: format!("changing {}: {error}", differences.join(", ")),
                            })
                        }
                    },
                }
            }
            Err(error) => match error.kind() {
                GetStreamErrorKind::JetStream(js_error)
                    if js_error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    match js.create_stream(desired.clone()).await {
                        Ok(stream) => return Ok(stream.cached_info().clone()),
                        Err(error) => match error.kind() {
                            // Another node created it between our look-up and create: check it.
                            CreateStreamErrorKind::JetStream(js_error)
                                if js_error.error_code() == ErrorCode::STREAM_NAME_EXIST =>
                            {
                                error.to_string()
                            }
                            CreateStreamErrorKind::TimedOut
                            | CreateStreamErrorKind::Response
                            | CreateStreamErrorKind::JetStreamUnavailable => error.to_string(),
                            CreateStreamErrorKind::JetStream(js_error)
                                if js_error.error_code()
                                    == ErrorCode::STORAGE_RESOURCES_EXCEEDED =>
                            {
                                return Err(SetupError::StreamStorage {
                                    stream: name.clone(),
                                    max_bytes: desired.max_bytes,
                                })
                            }
                            _ => return Err(stream_error("create", error.to_string())),
                        },
                    }
                }
                GetStreamErrorKind::Request => error.to_string(),
                _ => return Err(stream_error("look-up", error.to_string())),
            },
        };
        if attempt >= SETUP_ATTEMPTS_MAX {
            return Err(stream_error(
                "set-up",
                format!("{transient} (after {attempt} attempts)"),
            ));
        }
        tracing::warn!(stream = %name, error = %transient, attempt, "stream set-up failed; retrying");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// How long attempt `attempt` (1-based) to create an ephemeral consumer may take: 2 s,
/// 2 s, 4 s, 4 s, then 8 s. A fresh attempt is usually better than a long wait: after a
/// server of a NATS cluster dies, nats-server 2.9 keeps placing some new ephemeral consumers
/// on the dead server until it notices it is gone (a minute or more, nats-server PR 7165),
/// and such a create never answers, while the next one, placed again, usually lands on a
/// live server. A create that answers late leaves a consumer that its inactivity threshold
/// removes.
pub fn consumer_create_timeout(attempt: u32) -> Duration {
    Duration::from_secs(2 << (attempt.saturating_sub(1) / 2).min(2))
}

/// Runs `create` (an ephemeral consumer's creation: an ordered consumer, a KV watch) up to
/// `attempts` times, each bounded by [`consumer_create_timeout`]; the last error otherwise.
pub async fn create_with_retries<T, E, F, Fut>(attempts: u32, mut create: F) -> Result<T, String>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut last = String::from("no attempt made");
    let mut backoff = setup_backoff();
    for attempt in 1..=attempts.max(1) {
        match tokio::time::timeout(consumer_create_timeout(attempt), create()).await {
            Ok(Ok(created)) => return Ok(created),
            Ok(Err(error)) => {
                last = error.to_string();
                if attempt < attempts {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
            Err(_) => {
                last = format!(
                    "timed out after {} ms",
                    consumer_create_timeout(attempt).as_millis()
                )
            }
        }
    }
    Err(last)
}

/// The pauses between set-up attempts: 200 ms doubling up to 3.2 s, with jitter.
fn setup_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(SETUP_RETRY_INITIAL_MS),
        2,
        Duration::from_millis(SETUP_RETRY_MAX_MS),
    )
}

/// Opens KV bucket `bucket` keeping `history` values per key, creating it first if needed,
/// with one replica.
pub async fn ensure_kv(js: &Context, bucket: &str, history: i64) -> Result<kv::Store, SetupError> {
    ensure_kv_replicated(js, bucket, history, 1).await
}

/// [`ensure_kv`] with `replicas` replicas of the backing stream.
///
/// The backing stream is the one `create_key_value` would create (`KV_<bucket>`, subjects
/// `$KV.<bucket>.>`, roll-ups allowed, deletes denied, direct get, `max_msgs_per_subject` =
/// history, discard new), made here because async-nats 0.51's `create_key_value` fails on
/// nats-server 2.9. A bucket made by any NATS client with the same history opens unchanged.
pub async fn ensure_kv_replicated(
    js: &Context,
    bucket: &str,
    history: i64,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    let valid = !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(SetupError::InvalidBucket {
            bucket: bucket.to_string(),
        });
    }
    let desired = stream::Config {
        name: subjects::kv_stream(bucket),
        subjects: vec![subjects::kv_subjects(bucket)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        discard: DiscardPolicy::New,
        max_messages_per_subject: history.clamp(1, 64),
        max_age: Duration::ZERO,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        duplicate_window: Duration::from_secs(120),
        allow_rollup: true,
        deny_delete: true,
        // Direct gets may be answered by a replica that has not applied the latest write
        // yet: with replicas, reads go to the leader (read-your-writes for leases and the
        // identity directory).
        allow_direct: replicas <= 1,
        ..Default::default()
    };
    // A stream of that name that is not a KV bucket is an operator mistake: do not "fix" it.
    if let Ok(stream) = js.get_stream(&desired.name).await {
        let config = &stream.cached_info().config;
        if config.max_messages_per_subject < 1 || config.subjects != desired.subjects {
            return Err(SetupError::NotKv {
                stream: desired.name.clone(),
                subjects: subjects::kv_subjects(bucket),
            });
        }
    }
    ensure_stream(js, desired).await?;
    js.get_key_value(bucket)
        .await
        .map_err(|error| SetupError::Kv {
            bucket: bucket.to_string(),
            detail: format!("opening the bucket failed: {error}"),
        })
}

/// Records `shards` as the cluster's shard count if none is recorded yet (the first node),
/// otherwise checks that it equals the recorded one. `kv` is the [`subjects::KV_CLUSTER`]
/// bucket.
pub async fn ensure_shard_count(kv: &kv::Store, shards: u32) -> Result<(), SetupError> {
    const KEY: &str = subjects::CLUSTER_KEY_SHARD_COUNT;
    if shards == 0 {
        return Err(SetupError::InvalidShardCount { configured: shards });
    }
    let text = record_once(kv, KEY, &shards.to_string()).await?;
    let recorded: u32 = match text.trim().parse() {
        Ok(recorded) if recorded > 0 => recorded,
        _ => {
            return Err(SetupError::ShardCountUnreadable {
                value: text.chars().take(64).collect(),
                bucket: subjects::KV_CLUSTER,
                key: KEY,
            })
        }
    };
    if recorded != shards {
        return Err(SetupError::ShardCountMismatch {
            configured: shards,
            recorded,
            bucket: subjects::KV_CLUSTER,
            key: KEY,
        });
    }
    Ok(())
}

/// Records the fingerprint of the cluster's identity secret the first time, and refuses a
/// node whose secret gives another one: with another secret every identifier hashes to a
/// new key, so its router would create a second customer for every known person.
pub async fn ensure_identity_fingerprint(
    kv: &kv::Store,
    fingerprint: &str,
) -> Result<(), SetupError> {
    let recorded = record_once(kv, subjects::CLUSTER_KEY_IDENTITY_FINGERPRINT, fingerprint).await?;
    if recorded.trim() != fingerprint {
        return Err(SetupError::IdentitySecretMismatch {
            configured: fingerprint.to_string(),
            recorded: recorded.chars().take(64).collect(),
        });
    }
    Ok(())
}

/// Creates `key` with `value` in [`subjects::KV_CLUSTER`] unless it exists; returns the
/// value recorded (ours, or the one already there).
async fn record_once(kv: &kv::Store, key: &'static str, value: &str) -> Result<String, SetupError> {
    let kv_error = |detail: String| SetupError::Kv {
        bucket: subjects::KV_CLUSTER.to_string(),
        detail: format!("key {key}: {detail}"),
    };
    let mut backoff = setup_backoff();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let transient = match kv.create(key, value.to_string().into()).await {
            Ok(_) => {
                tracing::info!(key, value, "recorded in the cluster metadata");
                return Ok(value.to_string());
            }
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                match kv.get(key).await {
                    Ok(Some(recorded)) => {
                        return Ok(String::from_utf8_lossy(&recorded).into_owned())
                    }
                    // Deleted between our create and get: try to record it again.
                    Ok(None) => "the key vanished while it was read".to_string(),
                    Err(error) => error.to_string(),
                }
            }
            Err(error) if error.kind() == kv::CreateErrorKind::InvalidKey => {
                return Err(kv_error(error.to_string()))
            }
            Err(error) => error.to_string(),
        };
        if attempt >= SETUP_ATTEMPTS_MAX {
            return Err(kv_error(format!("{transient} (after {attempt} attempts)")));
        }
        tracing::warn!(error = %transient, attempt, key, "recording cluster metadata failed; retrying");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// The ingest consumer every node's router shares (durable `crm-router`, every message of
/// `CRM_INGEST`, explicit acks, bounded unacked messages). JetStream spreads its messages
/// over the routers pulling from it.
///
/// It is rewound to its ack floor first: after a crash or a lost connection, a durable
/// consumer would redeliver the unacked messages only after `ack_wait`, *after* newer ones,
/// and the router would reorder one customer's events (a return before its purchase, an
/// event using a new identifier before the event that links it). Recreating the consumer
/// from the first unacked message replays them in order; the ones already routed are
/// dropped by the shard log's `Nats-Msg-Id` dedup (and, past its window, by the customer's
/// event-id dedup).
///
/// The floor is recorded in [`subjects::KV_CLUSTER`] before the consumer is deleted, so a
/// failure or a crash between the delete and the create does not send the next router back
/// to the stream's first message (days of events routed again, past every dedup window);
/// and a consumer whose floor cannot be read is not deleted at all.
pub async fn ingest_consumer(
    js: &Context,
    settings: &IngestConsumerSettings,
) -> Result<PullConsumer, SetupError> {
    let floor_error = |detail: String| SetupError::Consumer {
        stream: subjects::INGEST_STREAM,
        consumer: subjects::INGEST_DURABLE.to_string(),
        detail,
    };
    let floors = js.get_key_value(subjects::KV_CLUSTER).await.map_err(|e| {
        floor_error(format!(
            "the {} bucket, which records its ack floor, cannot be opened: {e}",
            subjects::KV_CLUSTER
        ))
    })?;
    let recorded = match floors.get(subjects::CLUSTER_KEY_INGEST_FLOOR).await {
        Ok(Some(value)) => String::from_utf8_lossy(&value).trim().parse::<u64>().ok(),
        Ok(None) => None,
        Err(e) => {
            return Err(floor_error(format!(
                "its recorded ack floor cannot be read: {e}"
            )))
        }
    };
    let mut start_sequence = recorded.unwrap_or(1).max(1);
    if let Ok(stream) = js.get_stream(subjects::INGEST_STREAM).await {
        let last = stream.cached_info().state.last_sequence;
        if start_sequence > last.saturating_add(1) {
            // A floor beyond the stream's end: the stream was removed and created again
            // (its sequences restarted), so the recorded floor is not about this stream.
            tracing::warn!(
                recorded = start_sequence,
                last,
                "recorded ingest floor is beyond CRM_INGEST's last message (the stream was recreated); routing from its start"
            );
            start_sequence = 1;
        }
        let existing: Result<PullConsumer, _> = stream.get_consumer(subjects::INGEST_DURABLE).await;
        if let Ok(mut consumer) = existing {
            let info = consumer.info().await.map_err(|e| {
                floor_error(format!(
                    "its ack floor cannot be read, so it is not rewound: {e}"
                ))
            })?;
            start_sequence = start_sequence.max(info.ack_floor.stream_sequence + 1);
            floors
                .put(
                    subjects::CLUSTER_KEY_INGEST_FLOOR,
                    start_sequence.to_string().into(),
                )
                .await
                .map_err(|e| floor_error(format!("its ack floor cannot be recorded: {e}")))?;
            stream
                .delete_consumer(subjects::INGEST_DURABLE)
                .await
                .map_err(|e| SetupError::Consumer {
                    stream: subjects::INGEST_STREAM,
                    consumer: subjects::INGEST_DURABLE.to_string(),
                    detail: format!("could not rewind it to its ack floor: {e}"),
                })?;
        }
    }
    let config = pull::Config {
        durable_name: Some(subjects::INGEST_DURABLE.to_string()),
        description: Some("ingest router shared by every node".to_string()),
        // No filter: the stream holds only `crm.ingest.>`, so the same messages arrive, and
        // nats-server 2.9 recounts a filtered consumer's pending messages on every delivery
        // (measured: 3x slower routing with the filter; docs/perf-journal.md, "Where the time goes").
        filter_subject: String::new(),
        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(settings.ack_wait_s.max(1)),
        max_ack_pending: i64::from(settings.max_ack_pending.max(1)),
        max_deliver: -1,
        ..Default::default()
    };
    ensure_consumer(
        js,
        subjects::INGEST_STREAM,
        subjects::INGEST_DURABLE.to_string(),
        config,
    )
    .await
}

async fn ensure_consumer(
    js: &Context,
    stream: &'static str,
    durable: String,
    config: pull::Config,
) -> Result<PullConsumer, SetupError> {
    let consumer_error = |detail: String| SetupError::Consumer {
        stream,
        consumer: durable.clone(),
        detail,
    };
    let mut backoff = setup_backoff();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Create-or-update: the same config is a no-op, a changed ack_wait or max_ack_pending
        // is applied, an incompatible change (filter, deliver or ack policy) is refused.
        match js.create_consumer_on_stream(config.clone(), stream).await {
            Ok(consumer) => return Ok(consumer),
            Err(error) => {
                let transient = matches!(
                    error.kind(),
                    async_nats::jetstream::stream::ConsumerErrorKind::TimedOut
                        | async_nats::jetstream::stream::ConsumerErrorKind::Request
                );
                if !transient || attempt >= SETUP_ATTEMPTS_MAX {
                    return Err(consumer_error(format!("{error} (attempt {attempt})")));
                }
                tracing::warn!(%stream, consumer = %durable, %error, attempt, "consumer set-up failed; retrying");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn create_timeouts_start_short_and_grow_to_eight_seconds() {
        let secs: Vec<u64> = (1..=7)
            .map(|a| consumer_create_timeout(a).as_secs())
            .collect();
        assert_eq!(secs, [2, 2, 4, 4, 8, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_that_never_answers_is_tried_again_and_errors_are_reported() {
        let calls = AtomicU32::new(0);
        // First attempt hangs (placed on a dead server), the second answers.
        let created = create_with_retries(3, || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if call == 0 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(call)
            }
        })
        .await;
        assert_eq!(created, Ok(1));

        let failed: Result<(), String> =
            create_with_retries(2, || async { Err("no responders") }).await;
        assert_eq!(failed, Err("no responders".to_string()));
        let hung: Result<(), String> =
            create_with_retries(1, std::future::pending::<Result<(), String>>).await;
        assert_eq!(hung, Err("timed out after 2000 ms".to_string()));
    }
}
