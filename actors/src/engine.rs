//! The shard engine: the NATS-free core of one shard that the node's shard worker drives.
//!
//! The worker decodes a chunk of `crm.shard.<n>` and calls [`ShardEngine::apply_batch`]:
//! messages at or below the shard's applied sequence are skipped (a redelivery), customer
//! commands go to their customer actors (activated from sled on demand, see
//! [`crate::actor`]), ticks run the time-driven rules of every customer whose timer is due.
//! The whole batch then becomes ONE atomic [`Store::commit`] (states, timer index, shard
//! meta, outbox of actor events) and ONE flush; only after `apply_batch` returns may the
//! worker ack the chunk. Actor events wait in the outbox until the worker has published
//! them and called [`ShardEngine::published`]; [`ShardEngine::pending_outbox`] lists what a
//! crash left behind. Merge transfers (a merged customer's state on its way to the
//! survivor, [`ApplyOutcome::transfer`]) are committed the same way, in the transfer outbox
//! of the same commit: the worker appends them to the survivor's shard log and calls
//! [`ShardEngine::transfers_sent`]; [`ShardEngine::pending_transfers`] lists what a crash
//! left. Held channel events that a completed merge released
//! ([`ApplyOutcome::released`]) come back as [`BatchResult::released`], so the worker counts
//! them and dead-letters the refused ones like any refused event.
//!
//! Between batches the worker calls [`ShardEngine::passivate`] (wall clock: passivation is
//! memory management, not a rule) to stop idle actors and keep the resident count under
//! [`EngineLimits::resident_max`]. A batch never passivates: its states are not committed
//! until it ends, so residency may exceed the cap by one batch's customers. If a batch
//! fails, every resident actor is stopped so that memory never runs ahead of sled.

use crate::actor::{spawn_customer, Applied, CustomerMessage};
use crate::actor_event::ActorEventData;
use crate::codec::{self, CodecError};
use crate::rules::Rules;
use crate::shard_message::{
    ActorEvent, ApplyStatus, CustomerCommand, MergeTransfer, RedeemOutcome, ShardMessage,
};
use crate::state::CustomerState;
use crate::store::{
    CommitBatch, CustomerWrite, DueTimer, EncodedState, ShardMeta, Store, StoreError,
};
use crate::value::live::ValueModel;
use ractor::concurrency::{oneshot, JoinHandle, OneshotReceiver};
use ractor::{ActorRef, ActorStatus, SpawnErr};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info_span, warn, Instrument};

pub use crate::store::{OutboxKey, TransferKey};

/// Limits of one shard engine; from the node config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most customer actors resident between batches (LRU beyond it).
    pub resident_max: usize,
    /// Wall-clock idle time after which a resident actor is stopped, in ms.
    pub passivate_after_ms: u64,
    /// Most due timers read and ticked at a time while running one tick (page size).
    pub tick_batch_max: usize,
}

/// Why a batch or a view failed. After a failed batch nothing of it is committed and every
/// actor was stopped: deliver the batch again.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("shard {shard}: state store: {source}")]
    Store {
        shard: u32,
        #[source]
        source: StoreError,
    },
    #[error("shard {shard}: customer {customer_id}: actor could not start: {source}")]
    Spawn {
        shard: u32,
        customer_id: String,
        #[source]
        source: SpawnErr,
    },
    #[error("shard {shard}: customer {customer_id}: actor stopped before answering (a panic in the rules?)")]
    ActorStopped { shard: u32, customer_id: String },
    #[error("shard {shard}: customer {customer_id}: state bytes: {source}")]
    Codec {
        shard: u32,
        customer_id: String,
        #[source]
        source: CodecError,
    },
}

/// What happened to one customer message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageResult {
    /// Its shard-log stream sequence.
    pub seq: u64,
    pub customer_id: String,
    pub status: ApplyStatus,
    /// The reply to a redeem command.
    pub redeem: Option<RedeemOutcome>,
    /// Where the reply goes (copied from the message).
    pub reply_to: Option<String>,
    /// The channel event's `event_id`, the redeem's `request_id`, or a merge command's
    /// `cause_event_id`; `None` for a tick.
    pub event_id: Option<String>,
    /// The ingest sequence of an entry of a [`ShardMessage::Routed`] record.
    pub ingest_seq: Option<u64>,
}

/// What one applied (committed and flushed) batch produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchResult {
    /// One entry per customer message applied, in log order (skipped ones and ticks have
    /// none).
    pub messages: Vec<MessageResult>,
    /// Actor events in the outbox, in order: publish, then call [`ShardEngine::published`].
    pub events: Vec<(OutboxKey, ActorEvent)>,
    /// Merge transfers in the transfer outbox, in order: append each to the shard log of
    /// its `to_customer_id` as a `MergeIn`, then call [`ShardEngine::transfers_sent`].
    pub transfers: Vec<(TransferKey, MergeTransfer)>,
    /// Channel events a survivor held back during a merge and applied in this batch (when
    /// the merge completed), in order, each with what became of it: `seq` and
    /// `customer_id` are those of the command that released it, `event_id` the held event's
    /// own; no ingest sequence, redeem or reply. Counted apart from `applied`,
    /// `duplicates` and `rejected` (the held command was counted when it was held).
    pub released: Vec<MessageResult>,
    /// Merged customers' states merged in here (`MergeIn` applied, not forwarded).
    pub merges_applied: u64,
    /// Customer messages applied (state changed or a rule ran).
    pub applied: u64,
    /// Customer messages recognised as already applied (same event id / order id).
    pub duplicates: u64,
    /// Customer messages refused by the rules (dead-letter them).
    pub rejected: u64,
    /// Messages at or below the applied sequence: redeliveries, applied zero times.
    pub skipped: u64,
    /// Tick applications (one per due customer per tick message).
    pub customers_ticked: u64,
    /// The shard meta after the batch.
    pub meta: ShardMeta,
}

struct Resident {
    actor: ActorRef<CustomerMessage>,
    handle: JoinHandle<()>,
    /// Key in the engine's LRU order.
    touch: u64,
    last_used: Instant,
}

/// A command sent to an actor whose reply is not collected yet.
struct Pending {
    seq: u64,
    customer_id: String,
    /// `Some` for a customer message; `None` for a tick application.
    message: Option<PendingMessage>,
    reply: OneshotReceiver<Result<Applied, CodecError>>,
}

struct PendingMessage {
    reply_to: Option<String>,
    event_id: Option<String>,
    ingest_seq: Option<u64>,
    /// A `MergeIn` (counted in [`BatchResult::merges_applied`] when merged here).
    merge_in: bool,
}

impl PendingMessage {
    fn new(
        command: &CustomerCommand,
        reply_to: Option<String>,
        ingest_seq: Option<u64>,
    ) -> PendingMessage {
        let event_id = match command {
            CustomerCommand::Event { event, .. } | CustomerCommand::ResolvedEvent { event, .. } => {
                Some(event.event_id.clone())
            }
            CustomerCommand::Redeem { request_id, .. } => Some(request_id.clone()),
            CustomerCommand::MergeOut { merge } | CustomerCommand::MergeIn { merge, .. } => {
                Some(merge.cause_event_id.clone())
            }
            CustomerCommand::Tick { .. }
            | CustomerCommand::Rescore { .. }
            | CustomerCommand::RescoreMerged { .. } => None,
        };
        PendingMessage {
            reply_to,
            event_id,
            ingest_seq,
            merge_in: matches!(command, CustomerCommand::MergeIn { .. }),
        }
    }
}

/// What a batch has produced so far (nothing of it is committed yet).
#[derive(Default)]
struct BatchWork {
    /// Latest encoded state per customer changed in this batch: overrides the store.
    changed: HashMap<String, EncodedState>,
    outbox: Vec<(OutboxKey, ActorEvent)>,
    transfers: Vec<(TransferKey, MergeTransfer)>,
    /// Customers created by this batch (they join the shard's member index).
    created: Vec<String>,
    /// A customer-value model this batch applied (made current once committed).
    value_model: Option<ValueModel>,
    /// Next outbox index per sequence.
    next_index: HashMap<u64, u32>,
    /// Next transfer-outbox index per sequence.
    next_transfer_index: HashMap<u64, u32>,
    result: BatchResult,
}

impl BatchWork {
    /// Records what one command did to `customer_id` (the message at `seq`; `message` is
    /// `None` for a tick or rescore application): its new state, its actor events (outbox),
    /// its merge transfer (transfer outbox), the released held events, and the counts.
    fn record(
        &mut self,
        shard: u32,
        seq: u64,
        customer_id: String,
        message: Option<PendingMessage>,
        applied: Applied,
    ) {
        let Applied { outcome, changed } = applied;
        if outcome
            .events
            .iter()
            .any(|event| matches!(event.data, ActorEventData::CustomerCreated(_)))
        {
            self.created.push(customer_id.clone());
        }
        if let Some(state) = changed {
            self.changed.insert(customer_id.clone(), state);
        }
        let next_index = self.next_index.entry(seq).or_insert(0);
        for event in outcome.events {
            self.outbox.push((
                OutboxKey {
                    shard,
                    seq,
                    index: *next_index,
                },
                event,
            ));
            *next_index += 1;
        }
        let forwarded = outcome.transfer.is_some();
        if let Some(transfer) = outcome.transfer {
            let index = self.next_transfer_index.entry(seq).or_insert(0);
            self.transfers.push((
                TransferKey {
                    shard,
                    seq,
                    index: *index,
                },
                *transfer,
            ));
            *index += 1;
        }
        for released in outcome.released {
            self.result.released.push(MessageResult {
                seq,
                customer_id: customer_id.clone(),
                status: released.status,
                redeem: None,
                reply_to: None,
                event_id: Some(released.event_id),
                ingest_seq: None,
            });
        }
        match message {
            Some(message) => {
                match &outcome.status {
                    ApplyStatus::Applied => {
                        self.result.applied += 1;
                        // A MergeIn reaching a tombstone leaves again as a transfer.
                        if message.merge_in && !forwarded {
                            self.result.merges_applied += 1;
                        }
                    }
                    ApplyStatus::Duplicate => self.result.duplicates += 1,
                    ApplyStatus::Rejected(_) => self.result.rejected += 1,
                }
                self.result.messages.push(MessageResult {
                    seq,
                    customer_id,
                    status: outcome.status,
                    redeem: outcome.redeem,
                    reply_to: message.reply_to,
                    event_id: message.event_id,
                    ingest_seq: message.ingest_seq,
                });
            }
            None => {
                self.result.customers_ticked += 1;
                if let ApplyStatus::Rejected(rejection) = &outcome.status {
                    warn!(%customer_id, %rejection, "tick refused by the rules");
                }
            }
        }
    }
}

/// The per-shard engine; see the module notes.
pub struct ShardEngine {
    shard: u32,
    store: Store,
    rules: Arc<Rules>,
    /// The customer-value model views are scored with (`None`: none published yet).
    value_model: Option<Arc<ValueModel>>,
    limits: EngineLimits,
    meta: ShardMeta,
    resident: HashMap<String, Resident>,
    /// Resident customers by last use, oldest first.
    lru: BTreeMap<u64, String>,
    next_touch: u64,
}

impl std::fmt::Debug for ShardEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardEngine")
            .field("shard", &self.shard)
            .field("meta", &self.meta)
            .field("resident", &self.resident.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ShardEngine {
    /// An engine for `shard`, starting from the shard meta in `store`.
    pub fn new(
        shard: u32,
        store: Store,
        rules: Arc<Rules>,
        limits: EngineLimits,
    ) -> Result<ShardEngine, EngineError> {
        let meta = store
            .shard_meta(shard)
            .map_err(|source| EngineError::Store { shard, source })?;
        let value_model = store
            .value_model(shard)
            .map_err(|source| EngineError::Store { shard, source })?
            .map(Arc::new);
        Ok(ShardEngine {
            shard,
            store,
            rules,
            value_model,
            limits: EngineLimits {
                tick_batch_max: limits.tick_batch_max.max(1),
                ..limits
            },
            meta,
            resident: HashMap::new(),
            lru: BTreeMap::new(),
            next_touch: 0,
        })
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// The shard meta as last committed.
    pub fn meta(&self) -> ShardMeta {
        self.meta
    }

    /// Customer actors resident now.
    pub fn resident_count(&self) -> usize {
        self.resident.len()
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Applies `messages` (stream sequence, record) in order, commits and flushes them as
    /// one batch, and returns what they produced. Messages with a sequence at or below the
    /// applied sequence are skipped. On error nothing is committed and all actors stopped.
    pub async fn apply_batch(
        &mut self,
        messages: Vec<(u64, ShardMessage)>,
        owner_epoch: u64,
    ) -> Result<BatchResult, EngineError> {
        let span = info_span!("apply_batch", shard = self.shard, messages = messages.len());
        let outcome = self
            .apply_batch_inner(messages, owner_epoch)
            .instrument(span)
            .await;
        if outcome.is_err() {
            // Actors may hold state that was never committed: forget them all.
            self.stop_all();
        }
        outcome
    }

    async fn apply_batch_inner(
        &mut self,
        messages: Vec<(u64, ShardMessage)>,
        owner_epoch: u64,
    ) -> Result<BatchResult, EngineError> {
        let mut work = BatchWork::default();
        let mut pending: Vec<Pending> = Vec::new();
        let mut last_seq = self.meta.applied_seq;
        let mut clock_ms = self.meta.clock_ms;
        for (seq, message) in messages {
            if seq <= last_seq {
                work.result.skipped += 1;
                continue;
            }
            last_seq = seq;
            match message {
                ShardMessage::Customer {
                    customer_id,
                    command,
                    reply_to,
                } => {
                    let message = PendingMessage::new(&command, reply_to, None);
                    clock_ms = clock_ms.max(command_time_ms(&command));
                    let rescore = self.rescore_after(&command, &work);
                    let (reply, _) = self
                        .send_apply(&customer_id, command, &work.changed)
                        .await?;
                    pending.push(Pending {
                        seq,
                        customer_id: customer_id.clone(),
                        message: Some(message),
                        reply,
                    });
                    if let Some(rescore) = rescore {
                        // Right behind it in the actor's mailbox: the merged state scored.
                        let (reply, _) = self
                            .send_apply(&customer_id, rescore, &work.changed)
                            .await?;
                        pending.push(Pending {
                            seq,
                            customer_id,
                            message: None,
                            reply,
                        });
                    }
                }
                ShardMessage::Routed { entries } => {
                    for entry in entries {
                        let message =
                            PendingMessage::new(&entry.command, None, Some(entry.ingest_seq));
                        clock_ms = clock_ms.max(command_time_ms(&entry.command));
                        let (reply, _) = self
                            .send_apply(&entry.customer_id, entry.command, &work.changed)
                            .await?;
                        pending.push(Pending {
                            seq,
                            customer_id: entry.customer_id,
                            message: Some(message),
                            reply,
                        });
                    }
                }
                ShardMessage::ValueModel { model } => {
                    // Customers see every earlier message of the batch applied.
                    self.collect(&mut pending, &mut work).await?;
                    let current = work
                        .value_model
                        .as_ref()
                        .or(self.value_model.as_deref())
                        .map_or(0, |m| m.version);
                    if model.version > current {
                        self.run_rescore(seq, &model, &mut work).await?;
                        work.value_model = Some(model);
                    } else {
                        debug!(
                            version = model.version,
                            current, "older value model skipped"
                        );
                    }
                }
                ShardMessage::Tick { at_ms } => {
                    // Ticks see every earlier message of the batch applied.
                    self.collect(&mut pending, &mut work).await?;
                    clock_ms = clock_ms.max(at_ms);
                    self.run_tick(seq, at_ms, &mut work).await?;
                }
            }
        }
        self.collect(&mut pending, &mut work).await?;

        self.commit(work, last_seq, clock_ms, owner_epoch).await
    }

    /// Commits what the batch produced (states, timer index, meta up to `last_seq`, outbox,
    /// transfer outbox, member index, value model) as one sled batch and flushes it; nothing
    /// when no message of the batch was new.
    async fn commit(
        &mut self,
        mut work: BatchWork,
        last_seq: u64,
        clock_ms: i64,
        owner_epoch: u64,
    ) -> Result<BatchResult, EngineError> {
        if last_seq == self.meta.applied_seq {
            work.result.meta = self.meta;
            return Ok(work.result);
        }
        let meta = ShardMeta {
            applied_seq: last_seq,
            clock_ms,
            owner_epoch,
        };
        let mut customers: Vec<CustomerWrite> = work
            .changed
            .into_iter()
            .map(|(customer_id, state)| CustomerWrite { customer_id, state })
            .collect();
        customers.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        let applied_model = work.value_model.take();
        let batch = CommitBatch {
            customers,
            meta,
            outbox: work.outbox,
            created: work.created,
            value_model: applied_model.clone(),
            transfers: work.transfers,
        };
        self.store
            .commit(self.shard, &batch)
            .map_err(|source| self.store_error(source))?;
        self.store
            .flush()
            .await
            .map_err(|source| self.store_error(source))?;
        self.meta = meta;
        if let Some(model) = applied_model {
            self.value_model = Some(Arc::new(model));
        }
        debug!(
            applied_seq = meta.applied_seq,
            customers = batch.customers.len(),
            events = batch.outbox.len(),
            transfers = batch.transfers.len(),
            "batch committed"
        );
        work.result.events = batch.outbox;
        work.result.transfers = batch.transfers;
        work.result.meta = meta;
        Ok(work.result)
    }

    /// The rescore that follows `command`: after a merged state comes in (`MergeIn`), the
    /// survivor is scored under the shard's current value model (this batch's, else the
    /// committed one), if there is one. Deterministic: the model is the one the log has
    /// applied up to this record.
    fn rescore_after(
        &self,
        command: &CustomerCommand,
        work: &BatchWork,
    ) -> Option<CustomerCommand> {
        let CustomerCommand::MergeIn { merge, .. } = command else {
            return None;
        };
        let model = work
            .value_model
            .clone()
            .or_else(|| self.value_model.as_deref().cloned())?;
        Some(CustomerCommand::RescoreMerged {
            model,
            merged_id: merge.merged_id.clone(),
        })
    }

    /// Sends `command` to the customer's actor without waiting; activates the actor (from
    /// `changed`, this batch's uncommitted states, else the store) and then says so.
    async fn send_apply(
        &mut self,
        customer_id: &str,
        command: CustomerCommand,
        changed: &HashMap<String, EncodedState>,
    ) -> Result<(OneshotReceiver<Result<Applied, CodecError>>, bool), EngineError> {
        let (actor, activated) = self.activate(customer_id, Some(changed)).await?;
        let (sender, receiver) = oneshot();
        actor
            .cast(CustomerMessage::Apply {
                command,
                reply: sender.into(),
            })
            .map_err(|_| EngineError::ActorStopped {
                shard: self.shard,
                customer_id: customer_id.to_string(),
            })?;
        Ok((receiver, activated))
    }

    /// Waits for every pending reply, in send order, and records it.
    async fn collect(
        &mut self,
        pending: &mut Vec<Pending>,
        work: &mut BatchWork,
    ) -> Result<(), EngineError> {
        for item in pending.drain(..) {
            let applied = match item.reply.await {
                Ok(Ok(applied)) => applied,
                Ok(Err(source)) => {
                    return Err(EngineError::Codec {
                        shard: self.shard,
                        customer_id: item.customer_id,
                        source,
                    })
                }
                Err(_) => {
                    return Err(EngineError::ActorStopped {
                        shard: self.shard,
                        customer_id: item.customer_id,
                    })
                }
            };
            work.record(
                self.shard,
                item.seq,
                item.customer_id,
                item.message,
                applied,
            );
        }
        Ok(())
    }

    /// Applies `Tick { at_ms }` to every customer of the shard due at or before `at_ms`:
    /// those in the store's timer index (unless this batch changed them) and those this
    /// batch changed whose new due time has come. Each customer is ticked once per tick.
    /// A customer activated only for the tick is stopped again once its reply is in (its
    /// new state waits in `work.changed`), so a tick over many customers keeps at most
    /// `tick_batch_max` extra actors resident.
    async fn run_tick(
        &mut self,
        seq: u64,
        at_ms: i64,
        work: &mut BatchWork,
    ) -> Result<(), EngineError> {
        let page_max = self.limits.tick_batch_max;
        let mut ticked: HashSet<String> = HashSet::new();
        let mut cursor: Option<DueTimer> = None;
        let tick = || CustomerCommand::Tick { at_ms };
        loop {
            let page = self
                .store
                .due_timers(self.shard, at_ms, cursor.as_ref(), page_max)
                .map_err(|source| self.store_error(source))?;
            let full = page.len() >= page_max;
            cursor = page.last().cloned();
            let customers: Vec<String> = page
                .into_iter()
                .map(|timer| timer.customer_id)
                // The store's entry is stale for a customer changed in this batch.
                .filter(|id| !work.changed.contains_key(id) && ticked.insert(id.clone()))
                .collect();
            self.apply_to_page(seq, customers, tick, work).await?;
            if !full {
                break;
            }
        }
        let mut changed_due: Vec<String> = work
            .changed
            .iter()
            .filter(|(id, state)| {
                state.next_due_ms.is_some_and(|due| due <= at_ms) && !ticked.contains(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        changed_due.sort();
        for chunk in changed_due.chunks(page_max) {
            self.apply_to_page(seq, chunk.to_vec(), tick, work).await?;
        }
        Ok(())
    }

    /// Scores every customer of the shard under `model` (the member index, plus customers
    /// this batch created), in pages of `tick_batch_max`.
    async fn run_rescore(
        &mut self,
        seq: u64,
        model: &ValueModel,
        work: &mut BatchWork,
    ) -> Result<(), EngineError> {
        let page_max = self.limits.tick_batch_max;
        let mut done: HashSet<String> = HashSet::new();
        let mut after: Option<String> = None;
        let rescore = || CustomerCommand::Rescore {
            model: model.clone(),
        };
        loop {
            let mut page = self
                .store
                .shard_customers(self.shard, after.as_deref(), page_max)
                .map_err(|source| self.store_error(source))?;
            let full = page.len() >= page_max;
            after = page.last().cloned();
            if !full {
                // The last page also takes the customers created by this batch.
                page.extend(work.created.iter().cloned());
            }
            page.retain(|id| done.insert(id.clone()));
            self.apply_to_page(seq, page, rescore, work).await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Applies `command()` to each of `customers` (one page of a tick or a rescore), waits
    /// for every reply, and stops again the actors woken only for it (their new states wait
    /// in `work.changed`), so a page keeps at most its own customers extra resident.
    async fn apply_to_page(
        &mut self,
        seq: u64,
        customers: Vec<String>,
        command: impl Fn() -> CustomerCommand,
        work: &mut BatchWork,
    ) -> Result<(), EngineError> {
        let mut pending = Vec::with_capacity(customers.len());
        let mut activated_here = Vec::new();
        for customer_id in customers {
            let (reply, activated) = self
                .send_apply(&customer_id, command(), &work.changed)
                .await?;
            if activated {
                activated_here.push(customer_id.clone());
            }
            pending.push(tick_pending(seq, customer_id, reply));
        }
        self.collect(&mut pending, work).await?;
        self.forget_all(&mut activated_here);
        Ok(())
    }

    /// The resident actor of `customer_id`, and whether it was activated just now: from
    /// `changed` (states of the running batch, not yet committed), else from the store, else
    /// as a new customer.
    async fn activate(
        &mut self,
        customer_id: &str,
        changed: Option<&HashMap<String, EncodedState>>,
    ) -> Result<(ActorRef<CustomerMessage>, bool), EngineError> {
        let touch = self.next_touch;
        self.next_touch += 1;
        if let Some(resident) = self.resident.get_mut(customer_id) {
            if is_alive(&resident.actor) {
                self.lru.remove(&resident.touch);
                self.lru.insert(touch, customer_id.to_string());
                resident.touch = touch;
                resident.last_used = Instant::now();
                return Ok((resident.actor.clone(), false));
            }
        }
        // Not resident, or its actor died (a panic): start from what is committed.
        self.forget(customer_id);
        let loaded = match changed.and_then(|changed| changed.get(customer_id)) {
            Some(encoded) => {
                let state =
                    codec::decode_state(&encoded.bytes).map_err(|source| EngineError::Codec {
                        shard: self.shard,
                        customer_id: customer_id.to_string(),
                        source,
                    })?;
                Some((state, encoded.bytes.clone()))
            }
            None => self
                .store
                .load_customer_encoded(customer_id)
                .map_err(|source| self.store_error(source))?,
        };
        let (state, stored_bytes) =
            loaded.unwrap_or_else(|| (CustomerState::new(customer_id), Vec::new()));
        let actor = self
            .spawn_resident(customer_id, state, stored_bytes, touch)
            .await?;
        Ok((actor, true))
    }

    async fn spawn_resident(
        &mut self,
        customer_id: &str,
        state: CustomerState,
        stored_bytes: Vec<u8>,
        touch: u64,
    ) -> Result<ActorRef<CustomerMessage>, EngineError> {
        let (actor, handle) = spawn_customer(state, stored_bytes, self.rules.clone())
            .await
            .map_err(|source| EngineError::Spawn {
                shard: self.shard,
                customer_id: customer_id.to_string(),
                source,
            })?;
        self.lru.insert(touch, customer_id.to_string());
        self.resident.insert(
            customer_id.to_string(),
            Resident {
                actor: actor.clone(),
                handle,
                touch,
                last_used: Instant::now(),
            },
        );
        Ok(actor)
    }

    /// The 360 view of `customer_id` as of the shard clock; `None` if it does not exist.
    /// Activates a stored customer; never creates one.
    pub async fn view(&mut self, customer_id: &str) -> Result<Option<Value>, EngineError> {
        let resident = self
            .resident
            .get(customer_id)
            .is_some_and(|r| is_alive(&r.actor));
        let actor = if resident {
            self.activate(customer_id, None).await?.0
        } else {
            let loaded = self
                .store
                .load_customer_encoded(customer_id)
                .map_err(|source| self.store_error(source))?;
            let Some((state, stored_bytes)) = loaded else {
                return Ok(None);
            };
            self.forget(customer_id);
            let touch = self.next_touch;
            self.next_touch += 1;
            self.spawn_resident(customer_id, state, stored_bytes, touch)
                .await?
        };
        let (sender, receiver) = oneshot();
        let stopped = || EngineError::ActorStopped {
            shard: self.shard,
            customer_id: customer_id.to_string(),
        };
        actor
            .cast(CustomerMessage::View {
                as_of_ms: self.meta.clock_ms,
                value_model: self.value_model.clone(),
                reply: sender.into(),
            })
            .map_err(|_| stopped())?;
        receiver.await.map_err(|_| stopped())
    }

    /// Stops actors idle for `passivate_after_ms` or more at `now`, then the least recently
    /// used while more than `resident_max` are resident. Call only between batches. Returns
    /// how many were stopped.
    pub fn passivate(&mut self, now: Instant) -> usize {
        let idle_max = Duration::from_millis(self.limits.passivate_after_ms);
        let mut stopped = 0;
        while let Some((&touch, customer_id)) = self.lru.first_key_value() {
            let Some(resident) = self.resident.get(customer_id) else {
                debug_assert!(false, "LRU entry without a resident actor");
                self.lru.remove(&touch);
                continue;
            };
            let over_cap = self.resident.len() > self.limits.resident_max;
            let idle = now.saturating_duration_since(resident.last_used) >= idle_max;
            if !over_cap && !idle {
                break;
            }
            let customer_id = customer_id.clone();
            self.forget(&customer_id);
            stopped += 1;
        }
        debug_assert!(self.resident.len() <= self.limits.resident_max);
        debug_assert_eq!(self.resident.len(), self.lru.len());
        if stopped > 0 {
            debug!(
                shard = self.shard,
                stopped,
                resident = self.resident.len(),
                "passivated"
            );
        }
        stopped
    }

    /// More actors are resident than `resident_max`: call [`passivate`](Self::passivate)
    /// before the next batch.
    pub fn over_resident_cap(&self) -> bool {
        self.resident.len() > self.limits.resident_max
    }

    /// Uses `rules` for every later command: resident actors get them before their next
    /// message, activations start with them.
    /// The customer-value model this shard applied last (views are scored with it).
    pub fn value_model(&self) -> Option<&ValueModel> {
        self.value_model.as_deref()
    }

    pub fn set_rules(&mut self, rules: Arc<Rules>) {
        self.rules = rules;
        let mut dead = Vec::new();
        for (customer_id, resident) in &self.resident {
            if resident
                .actor
                .cast(CustomerMessage::SetRules(self.rules.clone()))
                .is_err()
            {
                dead.push(customer_id.clone());
            }
        }
        for customer_id in dead {
            self.forget(&customer_id);
        }
    }

    /// Actor events committed but not yet published (left by a crash or a failed publish).
    pub fn pending_outbox(&self) -> Result<Vec<(OutboxKey, ActorEvent)>, EngineError> {
        self.store
            .outbox(self.shard)
            .map_err(|source| self.store_error(source))
    }

    /// The store this engine writes to (the outbox is cleared through it by whoever
    /// publishes the events).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Removes published events from the outbox.
    pub fn published(&self, keys: &[OutboxKey]) -> Result<(), EngineError> {
        debug_assert!(keys.iter().all(|key| key.shard == self.shard));
        self.store
            .remove_outbox(keys)
            .map_err(|source| self.store_error(source))
    }

    /// Merge transfers committed but not yet appended to their survivors' shard logs (left
    /// by a crash, a failed publish, or a previous owner whose snapshot this shard restored).
    pub fn pending_transfers(&self) -> Result<Vec<(TransferKey, MergeTransfer)>, EngineError> {
        self.store
            .transfers(self.shard)
            .map_err(|source| self.store_error(source))
    }

    /// Removes transfers the survivors' shard logs acked from the transfer outbox.
    pub fn transfers_sent(&self, keys: &[TransferKey]) -> Result<(), EngineError> {
        debug_assert!(keys.iter().all(|key| key.shard == self.shard));
        self.store
            .remove_transfers(keys)
            .map_err(|source| self.store_error(source))
    }

    /// Stops every actor and waits for them to end.
    pub async fn shutdown(&mut self) {
        let handles: Vec<JoinHandle<()>> = self
            .resident
            .drain()
            .map(|(_, resident)| {
                resident.actor.stop(None);
                resident.handle
            })
            .collect();
        self.lru.clear();
        for handle in handles {
            let _ = handle.await;
        }
    }

    fn stop_all(&mut self) {
        for (_, resident) in self.resident.drain() {
            resident.actor.stop(None);
        }
        self.lru.clear();
    }

    /// Stops the actors of `customer_ids` (emptied).
    fn forget_all(&mut self, customer_ids: &mut Vec<String>) {
        for customer_id in customer_ids.drain(..) {
            self.forget(&customer_id);
        }
    }

    /// Stops the customer's actor (if resident) and drops it from the maps.
    fn forget(&mut self, customer_id: &str) {
        if let Some(resident) = self.resident.remove(customer_id) {
            self.lru.remove(&resident.touch);
            resident.actor.stop(None);
        }
    }

    fn store_error(&self, source: StoreError) -> EngineError {
        EngineError::Store {
            shard: self.shard,
            source,
        }
    }
}

impl Drop for ShardEngine {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn tick_pending(
    seq: u64,
    customer_id: String,
    reply: OneshotReceiver<Result<Applied, CodecError>>,
) -> Pending {
    Pending {
        seq,
        customer_id,
        message: None,
        reply,
    }
}

fn is_alive(actor: &ActorRef<CustomerMessage>) -> bool {
    !matches!(
        actor.get_status(),
        ActorStatus::Stopping | ActorStatus::Stopped
    )
}

/// The rule time a command carries.
fn command_time_ms(command: &CustomerCommand) -> i64 {
    match command {
        CustomerCommand::Event { event, .. } | CustomerCommand::ResolvedEvent { event, .. } => {
            event.occurred_at_ms
        }
        CustomerCommand::Redeem { at_ms, .. } | CustomerCommand::Tick { at_ms } => *at_ms,
        CustomerCommand::MergeOut { merge } | CustomerCommand::MergeIn { merge, .. } => merge.at_ms,
        // A model is not an event in time: it never moves the clock.
        CustomerCommand::Rescore { .. } | CustomerCommand::RescoreMerged { .. } => i64::MIN,
    }
}

/// Every stored customer with a purchase by `as_of_day` for which `owned` is true, as
/// (summary, mean spend per purchase day): the input of
/// [`crate::value::live::fit_value_model`]. The store side of a fit: this reads and decodes
/// every stored state and hands each to the pure [`crate::value::live::summary_with_spend`].
/// A batch job, not the hot path.
pub fn summaries_from_store(
    store: &Store,
    as_of_day: i32,
    unit: crate::value::TimeUnit,
    owned: impl Fn(&str) -> bool,
) -> Result<Vec<(crate::value::CustomerSummary, f64)>, StoreError> {
    let mut summaries = Vec::new();
    for item in store.encoded_customers() {
        let (customer_id, bytes) = item?;
        if !owned(&customer_id) {
            continue;
        }
        let state: CustomerState =
            codec::decode_state(&bytes).map_err(|source| StoreError::Codec {
                key: format!("c/{customer_id}"),
                source,
            })?;
        if let Some(row) = crate::value::live::summary_with_spend(&state, as_of_day, unit) {
            summaries.push(row);
        }
    }
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{RejectReason, Rejection};
    use crate::shard_message::{ApplyOutcome, MergeRef, Released};
    use std::path::Path;

    const SHARD: u32 = 3;
    const CACHE_BYTES: u64 = 8 * 1024 * 1024;

    fn rules() -> Arc<Rules> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/rules.toml");
        Arc::new(Rules::load(&path).expect("the cluster's rules file loads"))
    }

    fn new_engine(store: &Store) -> ShardEngine {
        let limits = EngineLimits {
            resident_max: 100,
            passivate_after_ms: 60_000,
            tick_batch_max: 8,
        };
        ShardEngine::new(SHARD, store.clone(), rules(), limits).expect("engine")
    }

    fn merge(merged: &str, survivor: &str) -> MergeRef {
        MergeRef {
            merged_id: merged.to_string(),
            survivor_id: survivor.to_string(),
            cause_event_id: format!("link-{merged}"),
            at_ms: 5_000,
        }
    }

    fn transfer(merged: &str, survivor: &str) -> MergeTransfer {
        let mut state = CustomerState::new(merged);
        state.created_at_ms = Some(1_000);
        MergeTransfer {
            merge: merge(merged, survivor),
            to_customer_id: survivor.to_string(),
            state,
        }
    }

    fn message(command: &CustomerCommand) -> Option<PendingMessage> {
        Some(PendingMessage::new(command, None, Some(77)))
    }

    /// The plumbing of a merge without the rules: outcomes as the apply side makes them
    /// (built by hand here), recorded and committed as a batch is.
    #[tokio::test]
    async fn a_transfer_and_released_events_of_an_outcome_are_returned_and_the_transfer_persisted()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let mut engine = new_engine(&store);
        let mut work = BatchWork::default();

        // seq 4: bob's MergeOut; his state leaves as a transfer to ann.
        let merge_out = CustomerCommand::MergeOut {
            merge: merge("bob", "ann"),
        };
        let outcome = ApplyOutcome {
            transfer: Some(Box::new(transfer("bob", "ann"))),
            ..ApplyOutcome::default()
        };
        let applied = |outcome| Applied {
            outcome,
            changed: None,
        };
        work.record(
            SHARD,
            4,
            "bob".into(),
            message(&merge_out),
            applied(outcome),
        );
        // seq 5: carl's state reaches ann, which completes her merge and releases two
        // held events (one refused by the rules).
        let merge_in = CustomerCommand::MergeIn {
            merge: merge("carl", "ann"),
            state: Box::new(transfer("carl", "ann").state),
        };
        let rejection = Rejection::new(RejectReason::Unapplicable, "return of an unknown order");
        let outcome = ApplyOutcome {
            released: vec![
                Released {
                    event_id: "e-held-1".into(),
                    status: ApplyStatus::Applied,
                },
                Released {
                    event_id: "e-held-2".into(),
                    status: ApplyStatus::Rejected(rejection.clone()),
                },
            ],
            ..ApplyOutcome::default()
        };
        work.record(SHARD, 5, "ann".into(), message(&merge_in), applied(outcome));
        // seq 6: dave's state reaches erin, a tombstone by now: it leaves again, forwarded
        // (applied, but not merged here).
        let forward = CustomerCommand::MergeIn {
            merge: merge("dave", "erin"),
            state: Box::new(transfer("dave", "erin").state),
        };
        let outcome = ApplyOutcome {
            transfer: Some(Box::new(transfer("dave", "fay"))),
            ..ApplyOutcome::default()
        };
        work.record(SHARD, 6, "erin".into(), message(&forward), applied(outcome));

        let result = engine
            .commit(work, 6, 5_000, 2)
            .await
            .expect("the batch commits");
        let key = |seq| TransferKey {
            shard: SHARD,
            seq,
            index: 0,
        };
        let expected = vec![
            (key(4), transfer("bob", "ann")),
            (key(6), transfer("dave", "fay")),
        ];
        assert_eq!(result.transfers, expected);
        assert_eq!(engine.pending_transfers().expect("pending"), expected);
        assert_eq!(
            result.merges_applied, 1,
            "carl's state merged; dave's forwarded"
        );
        assert_eq!(result.applied, 3);
        let released: Vec<_> = result
            .released
            .iter()
            .map(|r| {
                (
                    r.seq,
                    r.customer_id.as_str(),
                    r.event_id.as_deref(),
                    &r.status,
                )
            })
            .collect();
        assert_eq!(
            released,
            vec![
                (5, "ann", Some("e-held-1"), &ApplyStatus::Applied),
                (
                    5,
                    "ann",
                    Some("e-held-2"),
                    &ApplyStatus::Rejected(rejection)
                ),
            ]
        );
        assert!(result.released.iter().all(|r| r.ingest_seq.is_none()));
        // The merge commands name their cause event.
        assert_eq!(result.messages[0].event_id.as_deref(), Some("link-bob"));

        // Sent and acked: gone, also after a reopen.
        engine.transfers_sent(&[key(4)]).expect("sent");
        assert_eq!(
            engine.pending_transfers().expect("pending"),
            vec![(key(6), transfer("dave", "fay"))]
        );
        engine.shutdown().await;
        drop(engine);
        store.flush().await.expect("flush");
        drop(store);
        let store = Store::open(dir.path(), CACHE_BYTES).expect("reopen");
        assert_eq!(
            new_engine(&store).pending_transfers().expect("pending"),
            vec![(key(6), transfer("dave", "fay"))]
        );
    }

    /// A customer event for `customer` that creates them (a purchase).
    fn purchase(seq: u64, customer: &str, event_id: &str) -> (u64, ShardMessage) {
        let json = serde_json::json!({
            "v": 1, "event_id": event_id, "type": "purchase",
            "occurred_at": "2026-01-02T10:00:00Z",
            "identity": {"email": format!("{customer}@example.com")},
            "order_id": format!("order-{event_id}"), "amount": 40.0, "currency": "EUR",
            "items": [{"sku": "s1", "category": "bags", "qty": 1, "price": 40.0}]
        });
        let event = crate::ingest::parse_ingest(
            "web",
            json.to_string().as_bytes(),
            &crate::ingest::IngestLimits::default(),
        )
        .expect("test event is valid");
        (
            seq,
            ShardMessage::Customer {
                customer_id: customer.to_string(),
                command: CustomerCommand::ResolvedEvent {
                    event,
                    notes: Vec::new(),
                    merges: Vec::new(),
                },
                reply_to: None,
            },
        )
    }

    /// End to end through the actors and the rules: a `MergeOut` makes a transfer.
    #[tokio::test]
    async fn a_merge_out_applied_in_a_batch_returns_and_persists_its_transfer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let mut engine = new_engine(&store);
        let merge_out = (
            2,
            ShardMessage::Customer {
                customer_id: "bob".into(),
                command: CustomerCommand::MergeOut {
                    merge: merge("bob", "ann"),
                },
                reply_to: None,
            },
        );
        let result = engine
            .apply_batch(vec![purchase(1, "bob", "e1"), merge_out], 1)
            .await
            .expect("apply");
        assert_eq!(result.rejected, 0, "{:?}", result.messages);
        assert_eq!(result.transfers.len(), 1, "{:?}", result.messages);
        let (key, sent) = &result.transfers[0];
        assert_eq!((key.shard, key.seq), (SHARD, 2));
        assert_eq!(sent.to_customer_id, "ann");
        assert_eq!(sent.merge, merge("bob", "ann"));
        assert_eq!(sent.state.purchases.count, 1, "bob's purchase travels");
        assert_eq!(
            engine.pending_transfers().expect("pending"),
            result.transfers
        );
        let tombstone = store.load_customer("bob").expect("load").expect("stored");
        assert_eq!(tombstone.merge.merged_into.as_deref(), Some("ann"));
        // Delivered again: skipped, no second transfer.
        let again = engine
            .apply_batch(vec![purchase(1, "bob", "e1")], 1)
            .await
            .expect("apply");
        assert!(again.transfers.is_empty());
        engine.shutdown().await;
    }

    #[tokio::test]
    async fn a_survivor_is_rescored_under_the_current_model_when_a_merged_state_comes_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let mut engine = new_engine(&store);
        let model = (
            2,
            ShardMessage::ValueModel {
                model: crate::value::live::ValueModel {
                    as_of_day: 20_460,
                    as_of: "2026-01-07".to_string(),
                    recency_days_quintiles: [1.0, 2.0, 3.0, 4.0],
                    frequency_quintiles: [1.0, 2.0, 3.0, 4.0],
                    monetary_quintiles: [1.0, 2.0, 3.0, 4.0],
                    ..crate::value::live::ValueModel::example(7)
                },
            },
        );
        let mut merged = CustomerState::new("bob");
        merged.created_at_ms = Some(1_000);
        let merge_in = (
            3,
            ShardMessage::Customer {
                customer_id: "ann".into(),
                command: CustomerCommand::MergeIn {
                    merge: merge("bob", "ann"),
                    state: Box::new(merged),
                },
                reply_to: None,
            },
        );
        // The model comes before ann's first purchase: nothing scores ann until the merge.
        let model = (1, model.1);
        let result = engine
            .apply_batch(vec![model, purchase(2, "ann", "e1")], 1)
            .await
            .expect("apply");
        assert_eq!(result.rejected, 0);
        let ann = store.load_customer("ann").expect("load").expect("stored");
        assert_eq!(ann.value_standing.model_version, 0);
        let result = engine.apply_batch(vec![merge_in], 1).await.expect("apply");
        assert_eq!(result.merges_applied, 1);
        let ann = store.load_customer("ann").expect("load").expect("stored");
        assert_eq!(
            ann.value_standing.model_version, 7,
            "{:?}",
            ann.value_standing
        );
        assert!(
            result
                .events
                .iter()
                .any(|(_, event)| event.id.starts_with("merge-bob-value-7")),
            "{:?}",
            result.events
        );
        engine.shutdown().await;
    }
}
