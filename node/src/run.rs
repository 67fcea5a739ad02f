//! The node runtime behind `crm-node run`: connect, set up JetStream, start every task,
//! stop them gracefully.
//!
//! Start-up order: load and validate the config and the rules file (clear errors, nothing
//! started yet), connect to NATS with back-off until it answers, create or check the
//! streams and KV buckets and the recorded shard count, open the sled store, start the
//! cluster manager (which starts a shard worker for each shard lease it wins, and the
//! router while it holds the router lease), the query and command responders, the stats
//! responder and the ticker, and log `crm-node ready`. SIGTERM/SIGINT fire the
//! shutdown: the router stops pulling, every shard worker finishes its batch (apply, flush,
//! ack), and the process exits 0.

use crate::api::commands::Commands;
use crate::api::query::Shards;
use crate::backoff::Backoff;
use crate::cluster::lease::{Fence, Leases};
use crate::cluster::manager::{Manager, WorkerSpec};
use crate::cluster::observer::BucketView;
use crate::cluster::snapshot::Snapshots;
use crate::config::{Config, Overrides};
use crate::ingest::identity_directory::IdentityDirectory;
use crate::ingest::router::Router;
use crate::metrics::{Metrics, NodeStats};
use crate::shard::worker::ShardTable;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::value::service::ValueService;
use crate::{jetstream as setup, subjects};
use anyhow::{Context as _, Result};
use crm_actors::engine::EngineLimits;
use crm_actors::ingest::IngestLimits;
use crm_actors::rules::Rules;
use crm_actors::store::Store;
use futures::StreamExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Query and command requests handled at once per responder.
const RESPONDER_CONCURRENCY_MAX: usize = 64;

/// `crm-node run`: config file plus command-line/environment overrides.
pub async fn run_from_cli(
    config_path: &Path,
    nats_url: Option<String>,
    data_dir: Option<std::path::PathBuf>,
    node_id: Option<String>,
) -> Result<()> {
    let config = Config::load(config_path)?.with_overrides(Overrides {
        node_id,
        data_dir,
        nats_url,
    });
    config.validate()?;
    let (trigger, _) = shutdown::channel();
    tokio::spawn(fire_on_signal(trigger.clone()));
    run(config, trigger).await
}

async fn fire_on_signal(trigger: ShutdownTrigger) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("signal handlers unavailable; stop with SIGKILL only");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing the batch in hand, then stopping"),
        _ = int.recv() => info!("SIGINT: finishing the batch in hand, then stopping"),
    }
    trigger.fire();
}

/// Connects to NATS, retrying with back-off until it answers or shutdown is asked for.
/// `restored` receives a message when the connection is lost and then restored.
async fn connect(
    config: &Config,
    shutdown: &mut Shutdown,
    restored: mpsc::Sender<()>,
) -> Result<async_nats::Client> {
    let mut backoff = Backoff::new(
        Duration::from_millis(config.nats.connect_retry_initial_ms),
        2,
        Duration::from_millis(config.nats.connect_retry_max_ms),
    );
    let lost = Arc::new(AtomicBool::new(false));
    loop {
        let (restored, lost) = (restored.clone(), lost.clone());
        let attempt = async_nats::ConnectOptions::new()
            .name(format!("crm-node {}", config.node.node_id))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(move |event| {
                let (restored, lost) = (restored.clone(), lost.clone());
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            warn!("NATS connection lost");
                            lost.store(true, Ordering::Relaxed);
                        }
                        async_nats::Event::Connected if lost.swap(false, Ordering::Relaxed) => {
                            warn!("NATS connection restored");
                            let _ = restored.try_send(());
                        }
                        async_nats::Event::Connected => {}
                        other => info!(event = %other, "NATS client event"),
                    }
                }
            })
            .connect(crate::config::nats_urls(&config.nats.url))
            .await;
        let delay = match attempt {
            Ok(client) => return Ok(client),
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(url = %config.nats.url, %error, retry_in_ms = delay.as_millis() as u64, "NATS unreachable; retrying");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => anyhow::bail!("stopped while waiting for NATS at {}", config.nats.url),
        }
    }
}

/// How long a node keeps trying to start its tasks again after a restored connection.
const SESSION_RETRY_MAX: Duration = Duration::from_secs(300);
/// First pause before the tasks are started again; doubles (with jitter) up to
/// [`SESSION_RETRY_PAUSE_MAX`].
const SESSION_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause between two tries to start the tasks again.
const SESSION_RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// How one session on one NATS connection ended.
enum SessionEnd {
    /// Shutdown was asked for.
    Stopped,
    /// The connection was lost and restored: run a new session on a fresh connection.
    ConnectionRestored,
}

/// Runs a node until `trigger` fires. A task that ends on its own (a bug or a fatal store
/// error) fires it too, and the node exits with an error so a supervisor restarts it.
///
/// The node's tasks run in a *session* bound to one NATS connection. When NATS goes away and
/// comes back, the session is stopped gracefully (the batch in hand is finished) and a new
/// one starts on a fresh connection, from the positions kept in sled and JetStream: a client
/// whose connection was restored may hold stale request state (async-nats 0.51 stops
/// matching JetStream replies to requests after a server restart), and a fresh session
/// re-checks the streams the restarted server recovered.
pub async fn run(config: Config, trigger: ShutdownTrigger) -> Result<()> {
    let rules_path = config.rules_path();
    let rules = Arc::new(Rules::load(&rules_path)?);
    info!(node_id = %config.node.node_id, rules = %rules_path.display(), rules_version = rules.version, "starting");
    let store_path = config.node.data_dir.join("sled");
    let store = Store::open(&store_path, config.limits.sled_cache_max_bytes)
        .with_context(|| format!("opening the state store at {}", store_path.display()))?;
    store.set_flush_interval(Duration::from_millis(config.limits.flush_interval_ms));
    let metrics = Arc::new(Metrics::default());
    let stored = store
        .customer_count()
        .context("counting the stored customers")?;
    Metrics::add(&metrics.stored_customers, stored as u64);
    let progress: Arc<Vec<AtomicU64>> = Arc::new(
        (0..config.cluster.shards)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    // Since when sessions started after a lost connection keep failing.
    let mut failing_since: Option<std::time::Instant> = None;
    let mut session_retry = Backoff::new(SESSION_RETRY_PAUSE, 2, SESSION_RETRY_PAUSE_MAX);
    let mut restarted = false;
    let node = NodeParts {
        config: &config,
        trigger: &trigger,
        rules: &rules,
        store: &store,
        metrics: &metrics,
        progress: &progress,
    };
    loop {
        match session(&node).await {
            Ok(SessionEnd::Stopped) => break,
            Ok(SessionEnd::ConnectionRestored) => {
                warn!("restarting the node's tasks on a fresh NATS connection");
                restarted = true;
                failing_since = None;
                session_retry.reset();
            }
            // A session started after a lost connection may find JetStream still electing
            // leaders (a NATS server of a cluster died) and its set-up timing out: try
            // again, for up to SESSION_RETRY_MAX, rather than exit. The first session's
            // errors (bad settings, a shard count the cluster does not have) end the
            // process at once with a clear message, as does a restart that keeps failing.
            Err(error)
                if restarted
                    && failing_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        < SESSION_RETRY_MAX =>
            {
                let pause = session_retry.next_delay();
                warn!(error = %format!("{error:#}"), retry_in_ms = pause.as_millis() as u64, "the node's tasks could not start again; retrying");
                let mut shutdown = trigger.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait() => break,
                }
            }
            Err(error) => return Err(error),
        }
    }
    store.flush().await?;
    info!("crm-node stopped");
    Ok(())
}

/// What a node keeps across its sessions: config, rules, store and counters.
struct NodeParts<'a> {
    config: &'a Config,
    trigger: &'a ShutdownTrigger,
    rules: &'a Arc<Rules>,
    store: &'a Store,
    metrics: &'a Arc<Metrics>,
    /// Applied shard-log sequence per shard, for `crm.node.stats`.
    progress: &'a Arc<Vec<AtomicU64>>,
}

/// The buckets and the identity directory a session's tasks share.
struct Infrastructure {
    jetstream: async_nats::jetstream::Context,
    cluster_kv: async_nats::jetstream::kv::Store,
    nodes_kv: async_nats::jetstream::kv::Store,
    leases_kv: async_nats::jetstream::kv::Store,
    snapshots_kv: async_nats::jetstream::kv::Store,
    value_kv: async_nats::jetstream::kv::Store,
    directory: Arc<IdentityDirectory>,
}

/// The NATS connection of a session, and what ends the session besides a task.
struct Connection {
    client: async_nats::Client,
    /// Fired when the process stops or the connection is restored.
    session_trigger: ShutdownTrigger,
    /// Set when the session ended because the connection was lost and restored.
    restored: Arc<AtomicBool>,
}

/// One session: connect, set up, run every task until shutdown or a restored connection.
async fn session(node: &NodeParts<'_>) -> Result<SessionEnd> {
    let mut process_shutdown = node.trigger.subscribe();
    let connection = connect_session(node.config, &mut process_shutdown).await?;
    let shutdown = connection.session_trigger.subscribe();
    let infrastructure = set_up(&connection.client, node.config, node.rules).await?;
    let mut tasks = spawn_tasks(node, &connection.client, infrastructure, &shutdown);
    info!(node_id = %node.config.node.node_id, shards = node.config.cluster.shards, nats = %node.config.nats.url, "crm-node ready");
    let failure = run_until_stopped(node, &connection, &mut tasks, shutdown).await;
    stop(node, &connection.client, tasks).await?;
    if let Some(failure) = failure {
        anyhow::bail!("{failure}");
    }
    Ok(
        if connection.restored.load(Ordering::Relaxed) && !process_shutdown.is_triggered() {
            SessionEnd::ConnectionRestored
        } else {
            SessionEnd::Stopped
        },
    )
}

/// Connects (with back-off) and starts the watch that ends the session when the process
/// stops or the lost connection comes back.
async fn connect_session(config: &Config, process_shutdown: &mut Shutdown) -> Result<Connection> {
    let (restored_sender, mut restorations) = mpsc::channel(4);
    let client = connect(config, process_shutdown, restored_sender).await?;
    let session_trigger = shutdown::channel().0;
    let restored = Arc::new(AtomicBool::new(false));
    {
        let (session_trigger, restored) = (session_trigger.clone(), restored.clone());
        let mut process_shutdown = process_shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = process_shutdown.wait() => {}
                restored_now = restorations.recv() => match restored_now {
                    Some(()) => restored.store(true, Ordering::Relaxed),
                    // The client is gone (the session ended): so is this watch.
                    None => return,
                },
            }
            session_trigger.fire();
        });
    }
    Ok(Connection {
        client,
        session_trigger,
        restored,
    })
}

/// Creates or checks the streams, the buckets, the recorded shard count and the identity
/// secret's fingerprint (idempotent; a mismatch with the cluster is an error).
async fn set_up(
    client: &async_nats::Client,
    config: &Config,
    rules: &Rules,
) -> Result<Infrastructure> {
    let jetstream = async_nats::jetstream::new(client.clone());
    setup::ensure_streams(&jetstream, &config.stream_settings()).await?;
    let replicas = config.cluster.stream_replicas;
    let cluster_kv =
        setup::ensure_kv_replicated(&jetstream, subjects::KV_CLUSTER, 1, replicas).await?;
    setup::ensure_shard_count(&cluster_kv, config.cluster.shards).await?;
    let identity_kv =
        setup::ensure_kv_replicated(&jetstream, subjects::KV_IDENTITY, 1, replicas).await?;
    let directory = Arc::new(
        IdentityDirectory::new(
            identity_kv,
            config.cluster.identity_secret.as_bytes(),
            config.limits.identity_cache_max_entries,
        )
        .with_rules(rules.identity.clone()),
    );
    setup::ensure_identity_fingerprint(&cluster_kv, &directory.secret_fingerprint()).await?;
    let nodes_kv = setup::ensure_kv_replicated(&jetstream, subjects::KV_NODES, 1, replicas).await?;
    let leases_kv =
        setup::ensure_kv_replicated(&jetstream, subjects::KV_LEASES, 1, replicas).await?;
    let snapshots_kv =
        setup::ensure_kv_replicated(&jetstream, subjects::KV_SNAPSHOTS, 1, replicas).await?;
    let value_kv = setup::ensure_kv_replicated(&jetstream, subjects::KV_VALUE, 1, replicas).await?;
    Ok(Infrastructure {
        jetstream,
        cluster_kv,
        nodes_kv,
        leases_kv,
        snapshots_kv,
        value_kv,
        directory,
    })
}

/// The router, with the ingest limits of the config and the rules' currencies and blocked
/// identifiers.
fn router(node: &NodeParts<'_>, infrastructure: &Infrastructure) -> Router {
    let config = node.config;
    Router {
        consumer_settings: config.ingest_consumer_settings(),
        jetstream: infrastructure.jetstream.clone(),
        directory: infrastructure.directory.clone(),
        limits: IngestLimits {
            payload_max_bytes: config.limits.payload_max_bytes,
            amount_max_minor: config.amount_max_minor(),
            items_max: config.limits.items_max,
            item_qty_max: config.limits.item_qty_max,
            currencies: node.rules.currencies(),
            occurred_at_future_max_ms: config.occurred_at_future_max_ms(),
            occurred_at_max_ms: None,
            blocked_identities: node.rules.identity.blocked.clone(),
        },
        shards: config.cluster.shards,
        batch_max_events: config.limits.router_batch_max_events,
        metrics: node.metrics.clone(),
        fence: Fence::unbounded(),
    }
}

/// The cluster manager: membership, leases, assignment, snapshots; it starts a shard
/// worker for each shard lease it wins and the router while it holds the router lease.
fn manager(
    node: &NodeParts<'_>,
    infrastructure: &Infrastructure,
    table: &ShardTable,
    shutdown: &Shutdown,
) -> Manager {
    let config = node.config;
    let shards = config.cluster.shards;
    let settings = config.cluster_settings();
    let counters =
        || -> Arc<Vec<AtomicU64>> { Arc::new((0..shards).map(|_| AtomicU64::new(0)).collect()) };
    let jetstream = &infrastructure.jetstream;
    Manager {
        node_id: config.node.node_id.clone(),
        instance: format!("{:016x}", rand_instance()),
        shards,
        jetstream: jetstream.clone(),
        nodes_kv: infrastructure.nodes_kv.clone(),
        cluster_kv: infrastructure.cluster_kv.clone(),
        value_kv: infrastructure.value_kv.clone(),
        leases: Leases {
            kv: infrastructure.leases_kv.clone(),
            view: BucketView::start(infrastructure.leases_kv.clone(), shutdown.clone()),
            node_id: config.node.node_id.clone(),
            timeout: settings.lease_timeout,
            margin: settings.lease_margin,
        },
        nodes: BucketView::start(infrastructure.nodes_kv.clone(), shutdown.clone()),
        cluster: BucketView::start(infrastructure.cluster_kv.clone(), shutdown.clone()),
        snapshots: Snapshots {
            jetstream: jetstream.clone(),
            kv: infrastructure.snapshots_kv.clone(),
            piece_bytes: settings.snapshot_piece_bytes,
        },
        store: node.store.clone(),
        table: table.clone(),
        workers: WorkerSpec {
            rules: node.rules.clone(),
            engine_limits: EngineLimits {
                resident_max: (config.limits.resident_max_customers / shards as usize).max(1),
                passivate_after_ms: config.limits.passivate_after_s * 1000,
                tick_batch_max: config.limits.batch_max_events,
            },
            batch_max_events: config.limits.batch_max_events,
            passivate_every: Duration::from_secs(config.limits.passivate_after_s.clamp(1, 60)),
            metrics: node.metrics.clone(),
            progress: node.progress.clone(),
            resident: counters(),
            applied: counters(),
        },
        router: router(node, infrastructure),
        settings,
    }
}

/// Starts every task of the session: the cluster manager, the query and command
/// responders, the ticker, the customer-value tasks and the stats responder.
fn spawn_tasks(
    node: &NodeParts<'_>,
    client: &async_nats::Client,
    infrastructure: Infrastructure,
    shutdown: &Shutdown,
) -> JoinSet<()> {
    let config = node.config;
    let mut tasks = JoinSet::new();
    let table = ShardTable::new(config.cluster.shards);
    tasks.spawn(manager(node, &infrastructure, &table, shutdown).run(shutdown.clone()));

    let shard_map = Shards {
        count: config.cluster.shards,
        table: table.clone(),
        client: client.clone(),
        directory: infrastructure.directory.clone(),
        blocked: Arc::new(node.rules.identity.blocked.clone()),
        timeout: Duration::from_millis(config.limits.query_timeout_ms),
    };
    tasks.spawn(crate::api::query::serve(
        client.clone(),
        shard_map.clone(),
        node.metrics.clone(),
        RESPONDER_CONCURRENCY_MAX,
        shutdown.clone(),
    ));
    let commands = Commands {
        client: client.clone(),
        jetstream: infrastructure.jetstream.clone(),
        shards: shard_map,
        metrics: node.metrics.clone(),
        occurred_at_future_max_ms: config.occurred_at_future_max_ms(),
    };
    tasks.spawn(commands.clone().serve(
        subjects::CMD_REDEEM,
        RESPONDER_CONCURRENCY_MAX,
        |commands: Commands, body: bytes::Bytes| async move { commands.redeem(&body).await },
        shutdown.clone(),
    ));
    tasks.spawn(commands.clone().serve(
        subjects::CMD_TICK,
        4,
        |commands: Commands, body: bytes::Bytes| async move { commands.tick(&body).await },
        shutdown.clone(),
    ));
    if config.limits.tick_interval_s > 0 {
        tasks.spawn(commands.run_ticker(
            Duration::from_secs(config.limits.tick_interval_s),
            shutdown.clone(),
        ));
    }

    tasks.spawn(crate::value::service::append_models(
        infrastructure.jetstream.clone(),
        infrastructure.value_kv.clone(),
        table.clone(),
        shutdown.clone(),
    ));
    let value_service = ValueService {
        client: client.clone(),
        kv: infrastructure.value_kv,
        store: node.store.clone(),
        shard_count: config.cluster.shards,
        table,
        node_id: config.node.node_id.clone(),
    };
    if config.limits.value_fit_interval_s > 0 {
        tasks.spawn(value_service.clone().run_schedule(
            Duration::from_secs(config.limits.value_fit_interval_s),
            shutdown.clone(),
        ));
    }
    tasks.spawn(value_service.clone().serve_collect(shutdown.clone()));
    tasks.spawn(value_service.serve(shutdown.clone()));
    tasks.spawn(serve_stats(
        client.clone(),
        config.node.node_id.clone(),
        node.metrics.clone(),
        node.progress.clone(),
        infrastructure.directory,
        shutdown.clone(),
    ));
    tasks
}

/// Waits for shutdown (of the process or the session) or a task that ends on its own;
/// the latter is a failure that stops the whole node. Returns the failure, if any.
async fn run_until_stopped(
    node: &NodeParts<'_>,
    connection: &Connection,
    tasks: &mut JoinSet<()>,
    mut shutdown: Shutdown,
) -> Option<String> {
    let failure = tokio::select! {
        _ = shutdown.wait() => None,
        Some(ended) = tasks.join_next() => Some(match ended {
            Ok(()) => "a node task ended on its own".to_string(),
            Err(error) => format!("a node task failed: {error}"),
        }),
    };
    // A task that ends because shutdown was asked for is no failure.
    let failure = failure.filter(|_| !shutdown.is_triggered());
    if let Some(failure) = &failure {
        error!(%failure, "stopping the node");
        node.trigger.fire();
        connection.session_trigger.fire();
    }
    failure
}

/// Lets the tasks finish within the grace period (then aborts them), flushes the store and
/// the connection.
async fn stop(
    node: &NodeParts<'_>,
    client: &async_nats::Client,
    mut tasks: JoinSet<()>,
) -> Result<()> {
    let grace = Duration::from_secs(node.config.limits.shutdown_grace_s);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            grace_s = grace.as_secs(),
            "tasks still busy after the grace period; stopping anyway"
        );
        tasks.abort_all();
    }
    node.store.flush().await?;
    // A client whose server is gone would wait for it: bounded.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

/// A per-process random id (tells a restarted node from its previous run in heartbeats).
fn rand_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Answers `crm.node.stats` with this node's counters.
async fn serve_stats(
    client: async_nats::Client,
    node_id: String,
    metrics: Arc<Metrics>,
    progress: Arc<Vec<AtomicU64>>,
    directory: Arc<IdentityDirectory>,
    mut shutdown: Shutdown,
) {
    let Ok(mut subscription) = client.subscribe(subjects::NODE_STATS).await else {
        warn!("stats responder could not subscribe");
        return;
    };
    loop {
        tokio::select! {
            message = subscription.next() => {
                let Some(message) = message else { return };
                let stats = NodeStats {
                    node_id: node_id.clone(),
                    applied_seq: progress.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
                    metrics: metrics.snapshot(),
                    identity: directory.metrics(),
                };
                let Ok(body) = serde_json::to_vec(&stats) else {
                    warn!("stats reply not serialisable");
                    continue;
                };
                if let Some(inbox) = message.reply {
                    let _ = client.publish(inbox, body.into()).await;
                }
            }
            _ = shutdown.wait() => return,
        }
    }
}
