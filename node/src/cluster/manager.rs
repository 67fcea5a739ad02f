//! The cluster manager: one task per node session that keeps the node's place in the
//! cluster. Every `heartbeat_interval_ms` it
//!
//! 1. writes the node's heartbeat (`crm_nodes`: id, instance, served shards and their
//!    applied sequences, load, roles);
//! 2. renews every lease it holds; a lease lost or not renewed in time stops its work
//!    (the fence already stops it before the lease can pass on);
//! 3. collects finished shard starts and hand-offs;
//! 4. as coordinator (one node, by lease) plans and writes the shard assignment;
//! 5. takes the router lease when it is free (one router in the cluster);
//! 6. hands off the shards no longer assigned to it (stop the worker, snapshot, release)
//!    and takes the ones assigned to it (lease with epoch + 1, restore the snapshot when
//!    newer than its sled copy, start the worker).
//!
//! The manager is the only writer of this node's leases, so renewals and releases never
//! race each other. When the session ends it stops the router and every worker, releases
//! its leases (so a restart or another node takes over at once) and removes its heartbeat.

use super::assignment::{plan, Assignment, Load};
use super::lease::{Fence, Held, Leases, Renewal};
use super::observer::BucketView;
use super::snapshot::{SnapshotError, Snapshots};
use super::ClusterSettings;
use crate::ingest::router::Router;
use crate::metrics::Metrics;
use crate::shard::worker::{ShardHandle, ShardTable, ShardWorker, WorkerSettings};
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::subjects;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{kv, Context};
use crm_actors::codec;
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::rules::Rules;
use crm_actors::shard_message::ShardMessage;
use crm_actors::store::Store;
use crm_actors::value::live::ValueModel;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Queue depth of each shard worker's request channel (views waiting between batches).
const SHARD_REQUESTS_MAX: usize = 256;
/// How long a change seen in a bucket waits for the rest of its burst before it is acted on.
const REACT_DEBOUNCE: Duration = Duration::from_millis(5);
/// How often finished shard starts and hand-offs are looked for between rounds.
const REAP_INTERVAL: Duration = Duration::from_millis(20);

/// A node's heartbeat, as stored in `crm_nodes` under its node id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    /// Random per process: tells a restarted node from its previous run.
    pub instance: String,
    pub version: String,
    pub pid: u32,
    /// Shards this node serves, with their applied shard-log sequence.
    pub shards: BTreeMap<u32, u64>,
    /// Lease epoch of each served shard.
    pub epochs: BTreeMap<u32, u64>,
    pub resident_customers: u64,
    pub stored_customers: u64,
    pub coordinator: bool,
    pub router: bool,
    pub draining: bool,
    pub at_ms: i64,
    /// The machine the node runs on (its host name), for operators.
    #[serde(default)]
    pub host: String,
    /// Shard commands applied per second, per served shard (a moving average over about
    /// [`LOAD_TIME_CONSTANT`]): what the coordinator balances by, besides counts.
    #[serde(default)]
    pub load: BTreeMap<u32, f64>,
}

/// Time constant of the moving average of each shard's load.
pub const LOAD_TIME_CONSTANT: Duration = Duration::from_secs(10);
/// How long an assignment stays unchanged before the coordinator moves shards for load
/// alone: a shard that just moved has no load measured on its new owner yet.
const LOAD_SETTLE: Duration = Duration::from_secs(60);

/// Per-shard load of this node: applied commands per second, moving average.
#[derive(Default)]
struct LoadMeter {
    last: Option<Instant>,
    counts: HashMap<u32, u64>,
    rates: BTreeMap<u32, f64>,
    /// When each shard was first sampled here.
    since: HashMap<u32, Instant>,
}

impl LoadMeter {
    /// Folds the counters in since the last sample, for the `served` shards only.
    fn sample(&mut self, applied: &[AtomicU64], served: &[u32]) {
        let now = Instant::now();
        let elapsed = self.last.map(|last| now - last);
        self.last = Some(now);
        let weight =
            elapsed.map(|dt| 1.0 - (-dt.as_secs_f64() / LOAD_TIME_CONSTANT.as_secs_f64()).exp());
        let mut counts = HashMap::new();
        let mut rates = BTreeMap::new();
        for &shard in served {
            let count = applied
                .get(shard as usize)
                .map(|a| a.load(Ordering::Relaxed))
                .unwrap_or(0);
            counts.insert(shard, count);
            let (Some(dt), Some(weight), Some(before)) = (elapsed, weight, self.counts.get(&shard))
            else {
                // First sample of the shard here: its average starts at 0.
                rates.insert(shard, 0.0);
                continue;
            };
            let now_rate = count.saturating_sub(*before) as f64 / dt.as_secs_f64().max(1e-3);
            let previous = self.rates.get(&shard).copied().unwrap_or(0.0);
            rates.insert(shard, previous + weight * (now_rate - previous));
        }
        self.counts = counts;
        self.rates = rates;
        self.since.retain(|shard, _| served.contains(shard));
        for &shard in served {
            self.since.entry(shard).or_insert(now);
        }
    }

    /// The rates of the shards measured for at least [`LOAD_SETTLE`] (a fresh average
    /// still climbs from 0 and would make a busy shard look idle).
    fn measured(&self) -> BTreeMap<u32, f64> {
        self.rates
            .iter()
            .filter(|(shard, _)| {
                self.since
                    .get(shard)
                    .is_some_and(|since| since.elapsed() >= LOAD_SETTLE)
            })
            .map(|(shard, rate)| (*shard, (rate * 10.0).round() / 10.0))
            .collect()
    }
}

/// What a shard worker needs, besides its shard and lease.
#[derive(Clone)]
pub struct WorkerSpec {
    pub rules: Arc<Rules>,
    pub engine_limits: EngineLimits,
    pub batch_max_events: usize,
    pub passivate_every: Duration,
    pub metrics: Arc<Metrics>,
    pub progress: Arc<Vec<AtomicU64>>,
    pub resident: Arc<Vec<AtomicU64>>,
    /// Shard commands applied per shard since the node started.
    pub applied: Arc<Vec<AtomicU64>>,
}

/// The cluster manager of one node session.
pub struct Manager {
    pub node_id: String,
    pub instance: String,
    pub settings: ClusterSettings,
    pub shards: u32,
    pub jetstream: Context,
    pub nodes_kv: kv::Store,
    pub cluster_kv: kv::Store,
    pub value_kv: kv::Store,
    pub leases: Leases,
    pub nodes: BucketView,
    pub cluster: BucketView,
    pub snapshots: Snapshots,
    pub store: Store,
    pub table: ShardTable,
    pub workers: WorkerSpec,
    /// The router to run while this node holds the router lease (its fence is set then).
    pub router: Router,
}

/// A running shard worker.
struct Serving {
    task: JoinHandle<()>,
    stop: ShutdownTrigger,
    handle: ShardHandle,
}

/// What this node is doing with a shard whose lease it holds.
enum Slot {
    /// Restoring and starting the worker.
    Starting(JoinHandle<Result<Serving, String>>),
    Serving(Serving),
    /// Stopping the worker (and, for a hand-off, writing the snapshot).
    Stopping(JoinHandle<()>),
}

impl Slot {
    fn is_finished(&self) -> bool {
        match self {
            Slot::Starting(task) => task.is_finished(),
            Slot::Stopping(task) => task.is_finished(),
            Slot::Serving(serving) => serving.task.is_finished(),
        }
    }
}

/// The router while this node holds its lease.
struct Routing {
    held: Held,
    stop: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl Manager {
    /// Runs until `shutdown`, then stops everything and releases the leases.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut state = State::default();
        // Act on the buckets' current state, not on an empty view.
        let wait = self.settings.heartbeat * 5;
        for view in [&self.leases.view, &self.nodes, &self.cluster] {
            if !view.wait_ready(wait).await {
                warn!(
                    "cluster state not read within {} ms; going on",
                    wait.as_millis()
                );
            }
        }
        let mut timer = tokio::time::interval(self.settings.heartbeat);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Finished starts and hand-offs are collected sooner than a round, so a shard
        // serves (and a released lease frees) as soon as it can.
        let mut reaper = tokio::time::interval(REAP_INTERVAL);
        reaper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A change of the assignment, a lease or a heartbeat is acted on at once (a released
        // lease taken, a new assignment followed), not at the next round.
        let mut changes = [
            self.leases.view.subscribe(),
            self.cluster.subscribe(),
            self.nodes.subscribe(),
        ];
        loop {
            let [leases, cluster, nodes] = &mut changes;
            let changed = tokio::select! {
                _ = timer.tick() => {
                    self.round(&mut state).await;
                    false
                }
                _ = reaper.tick() => {
                    if state.slots.values().any(Slot::is_finished) {
                        self.reap(&mut state).await;
                    }
                    // A shard that starts or stops serving is announced at once (status
                    // readers and operators see moves without waiting for a round).
                    if std::mem::take(&mut state.served_changed) {
                        let draining = self
                            .cluster
                            .get(&subjects::drain_key(&self.node_id))
                            .is_some();
                        self.heartbeat(&state, draining).await;
                    }
                    false
                }
                Ok(()) = leases.changed() => true,
                Ok(()) = cluster.changed() => true,
                Ok(()) = nodes.changed() => true,
                _ = shutdown.wait() => break,
            };
            if changed {
                // Let a burst (a node renewing all its leases) arrive, then act once.
                tokio::time::sleep(REACT_DEBOUNCE).await;
                for receiver in changes.iter_mut() {
                    receiver.borrow_and_update();
                }
                self.react(&mut state).await;
            }
        }
        self.stop_all(&mut state).await;
    }

    async fn round(&self, state: &mut State) {
        let draining = self
            .cluster
            .get(&subjects::drain_key(&self.node_id))
            .is_some();
        let served: Vec<u32> = state
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Serving(_)))
            .map(|(shard, _)| *shard)
            .collect();
        state.load.sample(&self.workers.applied, &served);
        // A heartbeat that NATS is slow to confirm must not delay the renewals.
        let beat = self.beat(state, draining);
        tokio::join!(self.write_heartbeat(beat), self.renew(state));
        self.reap(state).await;
        self.coordinate(state, draining).await;
        self.route(state, draining).await;
        self.place_shards(state, draining).await;
    }

    /// A round without heartbeat and renewals, on a change seen in a bucket.
    async fn react(&self, state: &mut State) {
        let draining = self
            .cluster
            .get(&subjects::drain_key(&self.node_id))
            .is_some();
        self.reap(state).await;
        self.coordinate(state, draining).await;
        self.route(state, draining).await;
        self.place_shards(state, draining).await;
        if std::mem::take(&mut state.served_changed) {
            self.heartbeat(state, draining).await;
        }
    }

    async fn heartbeat(&self, state: &State, draining: bool) {
        self.write_heartbeat(self.beat(state, draining)).await;
    }

    /// This node's heartbeat as of now.
    fn beat(&self, state: &State, draining: bool) -> Heartbeat {
        let mut shards = BTreeMap::new();
        let mut epochs = BTreeMap::new();
        for (shard, slot) in &state.slots {
            if let Slot::Serving(_) = slot {
                let applied = self
                    .workers
                    .progress
                    .get(*shard as usize)
                    .map(|p| p.load(Ordering::Relaxed))
                    .unwrap_or(0);
                shards.insert(*shard, applied);
                if let Some(held) = state.held.get(shard) {
                    epochs.insert(*shard, held.epoch);
                }
            }
        }
        let metrics = self.workers.metrics.snapshot();
        Heartbeat {
            node_id: self.node_id.clone(),
            instance: self.instance.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            shards,
            epochs,
            resident_customers: self
                .workers
                .resident
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .sum(),
            stored_customers: metrics.stored_customers,
            coordinator: state.coordinator.is_some(),
            router: state.routing.is_some(),
            draining,
            at_ms: super::wall_ms(),
            host: host_name(),
            load: state.load.measured(),
        }
    }

    async fn write_heartbeat(&self, beat: Heartbeat) {
        let value = serde_json::to_vec(&beat).unwrap_or_default();
        if let Err(error) = self.nodes_kv.put(&self.node_id, value.into()).await {
            warn!(%error, "heartbeat not written");
        }
    }

    /// Renews every held lease at once; acts on the lost ones.
    async fn renew(&self, state: &mut State) {
        let mut shard_leases: Vec<(u32, Held)> = state.held.drain().collect();
        let mut singles: Vec<Held> = Vec::new();
        if let Some(held) = state.coordinator.take() {
            singles.push(held);
        }
        let routing_index = state.routing.as_ref().map(|_| singles.len());
        if let Some(routing) = &state.routing {
            singles.push(routing.held.clone());
        }
        let shard_results = futures::future::join_all(
            shard_leases
                .iter_mut()
                .map(|(_, held)| self.leases.renew(held)),
        )
        .await;
        let single_results =
            futures::future::join_all(singles.iter_mut().map(|held| self.leases.renew(held))).await;
        for ((shard, held), renewal) in shard_leases.into_iter().zip(shard_results) {
            if self.kept(&held, renewal) {
                state.held.insert(shard, held);
            } else {
                warn!(
                    shard,
                    epoch = held.epoch,
                    "shard lease lost; its worker stops"
                );
                if let Some(slot) = state.slots.remove(&shard) {
                    self.table.set(shard, None);
                    state.slots.insert(shard, self.abandon(slot));
                }
            }
        }
        let mut singles = singles.into_iter().zip(single_results).enumerate();
        if let Some((index, (held, renewal))) = singles.next() {
            if Some(index) == routing_index {
                self.keep_routing(state, held, renewal);
            } else if self.kept(&held, renewal) {
                state.coordinator = Some(held);
            } else {
                warn!("coordinator lease lost");
            }
        }
        if let Some((_, (held, renewal))) = singles.next() {
            self.keep_routing(state, held, renewal);
        }
    }

    fn keep_routing(&self, state: &mut State, held: Held, renewal: Renewal) {
        if self.kept(&held, renewal) {
            if let Some(routing) = state.routing.as_mut() {
                routing.held = held;
            }
        } else if let Some(routing) = state.routing.take() {
            warn!("router lease lost; routing stops");
            routing.stop.fire();
            state.router_stopping = Some((routing.task, None));
        }
    }

    /// Whether a renewal leaves the lease usable.
    fn kept(&self, held: &Held, renewal: Renewal) -> bool {
        match renewal {
            Renewal::Renewed => true,
            Renewal::Lost => false,
            Renewal::Unconfirmed(error) => {
                warn!(key = %held.key, %error, "lease renewal unconfirmed");
                held.fence.valid()
            }
        }
    }

    /// Stops a slot's work without a snapshot (the lease is gone or going).
    fn abandon(&self, slot: Slot) -> Slot {
        match slot {
            Slot::Serving(serving) => {
                serving.stop.fire();
                Slot::Stopping(tokio::spawn(async move {
                    let _ = serving.task.await;
                }))
            }
            Slot::Starting(task) => Slot::Stopping(tokio::spawn(async move {
                if let Ok(Ok(serving)) = task.await {
                    serving.stop.fire();
                    let _ = serving.task.await;
                }
            })),
            stopping @ Slot::Stopping(_) => stopping,
        }
    }

    /// Collects finished starts, hand-offs and workers that stopped on their own.
    async fn reap(&self, state: &mut State) {
        let shards: Vec<u32> = state.slots.keys().copied().collect();
        for shard in shards {
            if !state.slots.get(&shard).is_some_and(Slot::is_finished) {
                continue;
            }
            match state.slots.remove(&shard).expect("listed") {
                Slot::Starting(task) => match task.await {
                    Ok(Ok(serving)) => {
                        self.table.set(shard, Some(serving.handle.clone()));
                        // A model published while the shard was starting found it in
                        // nobody's table (the model watch appends only to served shards):
                        // append the current one again now that it is served here (its
                        // message id makes a second append of one version a no-op).
                        let (jetstream, kv, store) = (
                            self.jetstream.clone(),
                            self.value_kv.clone(),
                            self.store.clone(),
                        );
                        tokio::spawn(async move {
                            append_current_model(&jetstream, &kv, &store, shard).await;
                        });
                        state.served_changed = true;
                        info!(
                            shard,
                            epoch = state.held.get(&shard).map(|h| h.epoch),
                            "serving shard"
                        );
                        state.slots.insert(shard, Slot::Serving(serving));
                    }
                    Ok(Err(error)) => {
                        warn!(shard, %error, "shard not started; its lease is released");
                        self.release(state, shard).await;
                    }
                    Err(error) => {
                        warn!(shard, %error, "shard start failed; its lease is released");
                        self.release(state, shard).await;
                    }
                },
                Slot::Serving(_) => {
                    warn!(
                        shard,
                        "shard worker stopped on its own; its lease is released"
                    );
                    self.table.set(shard, None);
                    self.release(state, shard).await;
                }
                Slot::Stopping(_) => self.release(state, shard).await,
            }
        }
    }

    async fn release(&self, state: &mut State, shard: u32) {
        if let Some(held) = state.held.remove(&shard) {
            if let Err(error) = self.leases.release(&held).await {
                warn!(shard, %error, "shard lease not released; it expires instead");
            }
        }
    }

    /// Takes the coordinator lease when free; as coordinator, plans the assignment.
    async fn coordinate(&self, state: &mut State, draining: bool) {
        if draining {
            if let Some(held) = state.coordinator.take() {
                info!("draining: coordinator lease released");
                let _ = self.leases.release(&held).await;
            }
            return;
        }
        if state.coordinator.is_none() {
            state.coordinator = self.leases.acquire(subjects::LEASE_COORDINATOR).await;
            if state.coordinator.is_some() {
                info!("this node is the coordinator");
            }
        }
        if state.coordinator.as_ref().is_some_and(|h| h.fence.valid()) {
            if let Err(error) = self.plan_round().await {
                warn!(%error, "assignment not written; next round retries");
            }
        }
    }

    /// The live, non-draining nodes (sorted), as observed.
    pub fn eligible_nodes(&self) -> Vec<String> {
        let mut eligible: Vec<String> = self
            .nodes
            .all()
            .into_iter()
            .filter(|(_, seen)| seen.since.elapsed() < self.settings.node_timeout)
            .filter_map(|(id, seen)| {
                let beat: Heartbeat = serde_json::from_slice(&seen.value).ok()?;
                (!beat.draining).then_some(id)
            })
            .filter(|id| self.cluster.get(&subjects::drain_key(id)).is_none())
            .collect();
        if !eligible.contains(&self.node_id)
            && self
                .cluster
                .get(&subjects::drain_key(&self.node_id))
                .is_none()
        {
            eligible.push(self.node_id.clone());
        }
        eligible.sort();
        eligible
    }

    async fn plan_round(&self) -> Result<(), String> {
        let observed = self.cluster.get(subjects::CLUSTER_KEY_ASSIGNMENT);
        let current: Assignment = observed
            .as_ref()
            .and_then(|o| serde_json::from_slice(&o.value).ok())
            .unwrap_or_default();
        let eligible = self.eligible_nodes();
        let settled = |shard: u32| {
            let assigned = current.owner(shard);
            let holder = self.leases.holder(&subjects::shard_key(shard));
            assigned.is_some() && holder.map(|h| h.owner).as_deref() == assigned
        };
        // Each shard's load as its assigned owner reports it (measured shards only).
        let beats: HashMap<String, Heartbeat> = self
            .nodes
            .all()
            .into_iter()
            .filter(|(id, _)| eligible.contains(id))
            .filter_map(|(id, seen)| Some((id, serde_json::from_slice(&seen.value).ok()?)))
            .collect();
        let load: BTreeMap<u32, f64> = (0..self.shards)
            .filter_map(|shard| {
                let beat = beats.get(current.owner(shard)?)?;
                Some((shard, *beat.load.get(&shard)?))
            })
            .collect();
        let all_measured = load.len() == self.shards as usize;
        let unchanged_for = observed
            .as_ref()
            .map(|o| o.since.elapsed())
            .unwrap_or_default();
        let owners = plan(
            &current.owners,
            self.shards,
            &eligible,
            settled,
            self.settings.rebalance_max_moves,
            &Load {
                per_shard: load,
                moves_allowed: unchanged_for >= LOAD_SETTLE && all_measured,
            },
        );
        if owners == current.owners {
            return Ok(());
        }
        let next = Assignment {
            version: current.version + 1,
            owners,
        };
        let value: bytes::Bytes = serde_json::to_vec(&next).unwrap_or_default().into();
        let revision = observed.map(|o| o.revision).unwrap_or(0);
        let written = self
            .cluster_kv
            .update(subjects::CLUSTER_KEY_ASSIGNMENT, value.clone(), revision)
            .await
            .map_err(|e| e.to_string())?;
        self.cluster
            .note_write(subjects::CLUSTER_KEY_ASSIGNMENT, value, written);
        let moved = (0..self.shards)
            .filter(|&s| current.owner(s) != next.owner(s))
            .count();
        info!(version = next.version, moved, nodes = ?eligible, "shard assignment written");
        Ok(())
    }

    /// Takes the router lease when free and runs the router while it holds it.
    async fn route(&self, state: &mut State, draining: bool) {
        // A router told to stop is awaited here, round after round, not inline (it may be
        // inside a slow consumer set-up): no new router starts before it has ended, and
        // its lease, when still held, is released only then.
        if let Some((task, _)) = &state.router_stopping {
            if !task.is_finished() {
                return;
            }
            if let Some((_, Some(held))) = state.router_stopping.take() {
                let _ = self.leases.release(&held).await;
                info!("router stopped; router lease released");
            }
        }
        if let Some(routing) = &state.routing {
            if draining || routing.task.is_finished() {
                let routing = state.routing.take().expect("checked");
                routing.stop.fire();
                state.router_stopping = Some((routing.task, Some(routing.held)));
                state.served_changed = true;
            }
            return;
        }
        if draining {
            return;
        }
        let Some(held) = self.leases.acquire(subjects::LEASE_ROUTER).await else {
            return;
        };
        // The router sets up its consumer in its own task: that may take many seconds
        // while JetStream elects leaders, and this loop must keep renewing leases meanwhile.
        let mut router = self.router.clone();
        router.fence = held.fence.clone();
        let (stop, stopped) = shutdown::channel();
        let task = tokio::spawn(router.run(stopped));
        info!(epoch = held.epoch, "this node routes ingest");
        state.routing = Some(Routing { held, stop, task });
    }

    /// Hands off the shards assigned elsewhere and takes the ones assigned here.
    async fn place_shards(&self, state: &mut State, draining: bool) {
        let Some(assignment) = self
            .cluster
            .get(subjects::CLUSTER_KEY_ASSIGNMENT)
            .and_then(|o| serde_json::from_slice::<Assignment>(&o.value).ok())
        else {
            return;
        };
        // Hand-offs first: they free leases other nodes wait for.
        let leaving: Vec<u32> = state
            .slots
            .iter()
            .filter(|(shard, slot)| {
                matches!(slot, Slot::Serving(_))
                    && assignment.owner(**shard) != Some(self.node_id.as_str())
            })
            .map(|(shard, _)| *shard)
            .collect();
        for shard in leaving {
            let Some(Slot::Serving(serving)) = state.slots.remove(&shard) else {
                continue;
            };
            let epoch = state.held.get(&shard).map(|h| h.epoch).unwrap_or(0);
            self.table.set(shard, None);
            state.served_changed = true;
            serving.stop.fire();
            let (snapshots, store, node_id) = (
                self.snapshots.clone(),
                self.store.clone(),
                self.node_id.clone(),
            );
            info!(shard, to = ?assignment.owner(shard), "handing shard off");
            state.slots.insert(
                shard,
                Slot::Stopping(tokio::spawn(async move {
                    let _ = serving.task.await;
                    if let Err(error) = snapshots.write(&store, shard, epoch, &node_id).await {
                        warn!(shard, %error, "hand-off snapshot failed; the next owner replays more of the log");
                    }
                })),
            );
        }
        if draining {
            return;
        }
        let wanted: Vec<u32> = (0..self.shards)
            .filter(|&s| assignment.owner(s) == Some(self.node_id.as_str()))
            .filter(|s| !state.slots.contains_key(s))
            .collect();
        for shard in wanted {
            if state.held.contains_key(&shard) {
                // Held without a slot cannot last: let it go and take it afresh.
                self.release(state, shard).await;
                continue;
            }
            let Some(held) = self.leases.acquire(&subjects::shard_key(shard)).await else {
                continue;
            };
            let task = tokio::spawn(start_shard(
                StartContext {
                    shard,
                    node_id: self.node_id.clone(),
                    jetstream: self.jetstream.clone(),
                    value_kv: self.value_kv.clone(),
                    snapshots: self.snapshots.clone(),
                    store: self.store.clone(),
                    workers: self.workers.clone(),
                    settings: self.settings.clone(),
                },
                held.epoch,
                held.fence.clone(),
            ));
            state.held.insert(shard, held);
            state.slots.insert(shard, Slot::Starting(task));
        }
    }

    /// Session end: stop the router and every worker, release every lease, leave.
    async fn stop_all(&self, state: &mut State) {
        if let Some((task, held)) = state.router_stopping.take() {
            let _ = task.await;
            if let Some(held) = held {
                let _ = self.leases.release(&held).await;
            }
        }
        if let Some(routing) = state.routing.take() {
            routing.stop.fire();
            let _ = routing.task.await;
            let _ = self.leases.release(&routing.held).await;
        }
        for (shard, slot) in std::mem::take(&mut state.slots) {
            self.table.set(shard, None);
            if let Slot::Stopping(task) = self.abandon(slot) {
                let _ = task.await;
            }
        }
        let held: Vec<Held> = state
            .held
            .drain()
            .map(|(_, h)| h)
            .chain(state.coordinator.take())
            .collect();
        futures::future::join_all(held.iter().map(|h| self.leases.release(h))).await;
        if let Err(error) = self.nodes_kv.delete(&self.node_id).await {
            warn!(%error, "heartbeat not removed; the node counts as dead after the timeout");
        }
        info!("left the cluster");
    }
}

#[derive(Default)]
struct State {
    /// A shard started or stopped serving since the last heartbeat.
    served_changed: bool,
    held: HashMap<u32, Held>,
    slots: HashMap<u32, Slot>,
    coordinator: Option<Held>,
    routing: Option<Routing>,
    /// A router told to stop, and its lease when it is still held (to release once the
    /// task has ended).
    router_stopping: Option<(JoinHandle<()>, Option<Held>)>,
    load: LoadMeter,
}

/// This machine's host name (Linux), or empty; read once.
fn host_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

struct StartContext {
    shard: u32,
    node_id: String,
    jetstream: Context,
    value_kv: kv::Store,
    snapshots: Snapshots,
    store: Store,
    workers: WorkerSpec,
    settings: ClusterSettings,
}

/// Whether `CRM_SHARDS` still holds every record ever written to it (none removed by age,
/// size or a purge), so that any shard can be rebuilt by replaying it from sequence 1.
async fn shard_log_is_whole(jetstream: &Context) -> Result<bool, String> {
    let mut stream = jetstream
        .get_stream(subjects::SHARDS_STREAM)
        .await
        .map_err(|e| format!("{}: {e}", subjects::SHARDS_STREAM))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("{}: {e}", subjects::SHARDS_STREAM))?;
    Ok(info.state.first_sequence <= 1)
}

/// Restores the shard's snapshot when newer than the local copy, brings the shard up to the
/// published customer-value model, and starts its worker.
async fn start_shard(context: StartContext, epoch: u64, fence: Fence) -> Result<Serving, String> {
    let StartContext {
        shard,
        node_id,
        jetstream,
        value_kv,
        snapshots,
        store,
        workers,
        settings,
    } = context;
    let started = Instant::now();
    let restored = match snapshots.restore_if_newer(&store, shard).await {
        Ok(restored) => restored,
        // The failed restore cleared the local copy: rebuild it from the whole log, which
        // the worker replays from sequence 1, if nothing was ever removed from the log.
        Err(error @ SnapshotError::Damaged { .. }) => {
            if !shard_log_is_whole(&jetstream).await? {
                return Err(format!(
                    "{error}; {} no longer starts at its first record (shard_log_max_age_s or \
                     a purge removed records), so the shard cannot be rebuilt from it: \
                     restore the stream or a good snapshot",
                    subjects::SHARDS_STREAM
                ));
            }
            warn!(shard, %error, "rebuilding the shard from its whole log");
            None
        }
        Err(error) => return Err(error.to_string()),
    };
    append_current_model(&jetstream, &value_kv, &store, shard).await;
    let engine = ShardEngine::new(
        shard,
        store.clone(),
        workers.rules.clone(),
        workers.engine_limits,
    )
    .map_err(|e| e.to_string())?;
    let (sender, requests) = mpsc::channel(SHARD_REQUESTS_MAX);
    let handle = ShardHandle { shard, sender };
    let worker = ShardWorker {
        shard,
        jetstream: jetstream.clone(),
        engine,
        settings: WorkerSettings {
            batch_max_events: workers.batch_max_events,
            passivate_every: workers.passivate_every,
            owner_epoch: epoch,
            fence,
            node_id,
            snapshots: Some(snapshots),
            snapshot_interval: settings.snapshot_interval,
            snapshot_every_records: settings.snapshot_every_records,
        },
        metrics: workers.metrics.clone(),
        requests,
        progress: workers.progress.clone(),
        resident: workers.resident.clone(),
        applied: workers.applied.clone(),
        publishing: tokio::task::JoinSet::new(),
    };
    let (stop, stopped) = shutdown::channel();
    let task = tokio::spawn(worker.run(stopped));
    info!(
        shard,
        epoch,
        restored_seq = restored.map(|m| m.seq),
        ms = started.elapsed().as_millis() as u64,
        "shard started"
    );
    Ok(Serving { task, stop, handle })
}

/// Appends the published customer-value model to the shard's log when the shard has not
/// applied it (a shard that moved may have missed the append of the node that owned it).
async fn append_current_model(jetstream: &Context, kv: &kv::Store, store: &Store, shard: u32) {
    let Ok(Some(entry)) = kv.entry(subjects::VALUE_MODEL_KEY).await else {
        return;
    };
    let Ok(model) = serde_json::from_slice::<ValueModel>(&entry.value) else {
        return;
    };
    let applied = store
        .value_model(shard)
        .ok()
        .flatten()
        .map(|m| m.version)
        .unwrap_or(0);
    if model.version <= applied || model.validate().is_err() {
        return;
    }
    let version = model.version;
    let record = codec::encode(&ShardMessage::ValueModel { model });
    let publish = Publish::build()
        .payload(record.into())
        .message_id(format!("value-{version}-{shard}"));
    let appended = match jetstream
        .send_publish(subjects::shard(shard), publish)
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = appended {
        warn!(shard, version, %error, "value model not appended; the next start of the shard or the next published model brings it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_meter_averages_applied_commands_per_served_shard() {
        let applied: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let mut meter = LoadMeter::default();
        meter.sample(&applied, &[0, 1]);
        assert_eq!(
            meter.rates.get(&0),
            Some(&0.0),
            "no rate before a second sample"
        );
        // Shard 0 applies steadily, shard 1 nothing; shard 2 is not served here.
        let started = Instant::now();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            applied[0].fetch_add(100, Ordering::Relaxed);
            applied[2].fetch_add(100, Ordering::Relaxed);
            meter.sample(&applied, &[0, 1]);
        }
        let true_rate = 500.0 / started.elapsed().as_secs_f64();
        let rate = meter.rates[&0];
        // The average starts at 0 and moves towards the true rate with a 10 s time
        // constant: after 0.1 s it is about 1 % of the way there (half way after 7 s).
        assert!(
            meter.measured().is_empty(),
            "not measured for long enough yet"
        );
        assert!(
            rate > 0.0 && rate < true_rate * 0.5,
            "{rate} of {true_rate}"
        );
        assert_eq!(meter.rates[&1], 0.0);
        assert!(!meter.rates.contains_key(&2));
        // A shard no longer served is forgotten; counters that restart (a new session)
        // count as nothing applied, not as a negative load.
        applied[0].store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(10));
        meter.sample(&applied, &[0]);
        assert!(meter.rates[&0] <= rate);
        assert!(!meter.rates.contains_key(&1));
    }
}
