//! The shard worker: applies one shard's log, in order, through the customer actors.
//!
//! One task per owned shard reads `crm.shard.<n>` strictly in order with a
//! [`ShardLogReader`] that starts right after the shard's applied sequence in sled (the
//! shard's progress lives with its state, so a crash loses nothing and no record can arrive
//! after newer ones). It hands each ready chunk (at most `batch_max_events`) to the shard's
//! [`ShardEngine`] (dedup by applied sequence, actors, rules, one sled commit and one
//! flush), then publishes what the batch produced: dead letters for refused commands,
//! replies to waiting redeem requests, and actor events (from the engine's durable outbox,
//! removed once JetStream acked them). Merge transfers (a merged customer's state, from the
//! engine's durable transfer outbox) are appended to the survivor's shard log as a
//! `MergeIn` and removed once acked; one not acked stays and is sent again after a growing
//! pause (and at the next start). Held channel events a completed merge released are counted
//! and the refused ones dead-lettered like any refused command. On any read or apply
//! failure it reopens the reader from the applied sequence. Between batches it answers
//! view requests for its customers and passivates idle actors. It holds no rules itself.

use crate::backoff::Backoff;
use crate::cluster::lease::Fence;
use crate::cluster::snapshot::Snapshots;
use crate::dead_letters;
use crate::metrics::Metrics;
use crate::shard::log_reader::ShardLogReader;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{Context, Message};
use crm_actors::actor_event::ActorEventData;
use crm_actors::codec;
use crm_actors::engine::{MessageResult, OutboxKey, ShardEngine, TransferKey};
use crm_actors::ingest::{RejectReason, Rejection};
use crm_actors::shard_message::{
    ActorEvent, ApplyStatus, CustomerCommand, MergeTransfer, ShardMessage,
};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{error, info, info_span, warn, Instrument};

/// A request a shard worker answers between batches.
pub enum ShardRequest {
    /// The 360 view of a customer of this shard (`None`: not found).
    View {
        customer_id: String,
        reply: oneshot::Sender<Result<Option<Value>, String>>,
    },
}

/// How other tasks reach a shard worker.
#[derive(Clone)]
pub struct ShardHandle {
    pub shard: u32,
    pub sender: mpsc::Sender<ShardRequest>,
}

/// The shard workers this node runs now, by shard number (`None` where another node owns
/// the shard, or nobody yet). Changed by the cluster manager as shards move.
#[derive(Clone)]
pub struct ShardTable {
    slots: Arc<std::sync::RwLock<Vec<Option<ShardHandle>>>>,
}

impl ShardTable {
    /// A table of `count` shards, none served.
    pub fn new(count: u32) -> ShardTable {
        ShardTable {
            slots: Arc::new(std::sync::RwLock::new(vec![None; count as usize])),
        }
    }

    /// The worker of `shard`, if this node serves it.
    pub fn get(&self, shard: u32) -> Option<ShardHandle> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(shard as usize).cloned().flatten()
    }

    /// Every served shard's worker, by shard number.
    pub fn served(&self) -> Vec<ShardHandle> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().flatten().cloned().collect()
    }

    /// Sets (or clears) the worker of `shard`.
    pub fn set(&self, shard: u32, handle: Option<ShardHandle>) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(shard as usize) {
            *slot = handle;
        }
    }
}

/// Settings of one worker.
#[derive(Clone)]
pub struct WorkerSettings {
    pub batch_max_events: usize,
    pub passivate_every: Duration,
    /// The shard lease's epoch, recorded with every applied batch (sled meta and
    /// `crm.audit.<n>`).
    pub owner_epoch: u64,
    /// The shard lease's fence: no batch is applied once it has expired.
    pub fence: Fence,
    pub node_id: String,
    /// Periodic snapshots: where, and how often.
    pub snapshots: Option<Snapshots>,
    pub snapshot_interval: Duration,
    /// Applied records after which a snapshot is taken (0: by time only).
    pub snapshot_every_records: u64,
}

/// One shard's worker.
pub struct ShardWorker {
    pub shard: u32,
    pub jetstream: Context,
    pub engine: ShardEngine,
    pub settings: WorkerSettings,
    pub metrics: Arc<Metrics>,
    pub requests: mpsc::Receiver<ShardRequest>,
    /// Applied sequence of every shard of the node, published for `crm.node.stats`.
    pub progress: Arc<Vec<AtomicU64>>,
    /// Resident customer actors of every shard of the node (0 where not served).
    pub resident: Arc<Vec<AtomicU64>>,
    /// Shard commands applied by this node per shard since it started (its load).
    pub applied: Arc<Vec<AtomicU64>>,
    /// Batches of actor events whose acks are awaited (see `publish_events`).
    pub publishing: JoinSet<()>,
}

/// Batches of actor events one worker may have awaiting their acks.
pub const PUBLISHING_BATCHES_MAX: usize = 16;

/// What became of a chunk of shard-log records.
enum Processed {
    /// Applied, durable, and its results published; `transfers_unsent`: a merge transfer
    /// could not be appended (it stays in the transfer outbox, to be sent again).
    Published { transfers_unsent: bool },
    /// Nothing of it was applied; the reader must be reopened.
    NotApplied,
    /// Applied and durable here, but the lease fence expired meanwhile: nothing published,
    /// and the worker must stop.
    Fenced,
}

/// Most waiting queries a worker with a backlog answers between two batches.
const QUERIES_BETWEEN_BATCHES_MAX: usize = 64;

/// Delay before the reader is reopened after a batch could not be applied, every time: the
/// worker answers no query while it waits, so it stays well under the default
/// `query_timeout_ms` (2 s) rather than growing.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest wait for new records before the worker looks at its other duties.
const READ_WAIT: Duration = Duration::from_millis(500);
/// First pause before merge transfers that could not be sent are tried again (doubling,
/// jittered, up to [`TRANSFER_RETRY_MAX`]): a survivor holds its events until they arrive.
const TRANSFER_RETRY_FIRST: Duration = Duration::from_secs(1);
const TRANSFER_RETRY_MAX: Duration = Duration::from_secs(30);

impl ShardWorker {
    /// Runs until shutdown or until its lease fence expires; the batch in hand is finished
    /// (applied and flushed) first.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let span = info_span!("shard", shard = self.shard);
        async move {
            self.publish_outbox().await;
            // Merge transfers a previous run (or owner) left. Unsent ones are tried again
            // from the transfer outbox once `transfers_retry_at` has passed.
            let mut transfer_retry =
                Backoff::new(TRANSFER_RETRY_FIRST, 2, TRANSFER_RETRY_MAX);
            let mut transfers_retry_at = self
                .send_pending_transfers()
                .await
                .then(|| Instant::now() + transfer_retry.next_delay());
            self.record_progress();
            let client = self.jetstream.client();
            let mut forwarded = match client.subscribe(subjects::owner_view(self.shard)).await {
                Ok(subscription) => Some(subscription),
                Err(error) => {
                    warn!(%error, "forwarded queries cannot reach this shard");
                    None
                }
            };
            let mut reader = ShardLogReader::new(
                self.jetstream.clone(),
                self.shard,
                self.engine.meta().applied_seq + 1,
                self.settings.batch_max_events,
            );
            let mut last_passivation = Instant::now();
            let mut last_snapshot = Instant::now();
            let mut since_snapshot: u64 = 0;
            while !shutdown.is_triggered() {
                let records = {
                    let next = reader.next_batch(READ_WAIT);
                    tokio::pin!(next);
                    loop {
                        tokio::select! {
                            biased;
                            records = &mut next => break Some(records),
                            Some(request) = self.requests.recv() => self.answer(request).await,
                            Some(message) = next_forwarded(&mut forwarded) => {
                                self.answer_forwarded(&client, message).await;
                            }
                            _ = shutdown.wait() => break None,
                        }
                    }
                };
                let Some(records) = records else { break };
                if !self.settings.fence.valid() {
                    warn!(epoch = self.settings.owner_epoch, "shard lease not renewed in time; stopping before another node may take it");
                    break;
                }
                if !records.is_empty() {
                    let count = records.len() as u64;
                    match self.process(records).await {
                        Processed::Published { transfers_unsent } => {
                            since_snapshot += count;
                            if transfers_unsent && transfers_retry_at.is_none() {
                                transfers_retry_at =
                                    Some(Instant::now() + transfer_retry.next_delay());
                            }
                        }
                        Processed::NotApplied => {
                            tokio::time::sleep(RETRY_DELAY).await;
                            reader.rewind(self.engine.meta().applied_seq + 1).await;
                        }
                        Processed::Fenced => {
                            warn!(epoch = self.settings.owner_epoch, "shard lease ran out while a batch was applied (the process was stalled); the batch stays in this node's store and nothing of it is published");
                            break;
                        }
                    }
                    // While the log has a backlog the read above is always ready first;
                    // queries waiting meanwhile are answered between batches.
                    self.answer_waiting(&client, &mut forwarded).await;
                }
                if transfers_retry_at.is_some_and(|at| at <= Instant::now())
                    && self.settings.fence.valid()
                {
                    transfers_retry_at = if self.send_pending_transfers().await {
                        Some(Instant::now() + transfer_retry.next_delay())
                    } else {
                        transfer_retry.reset();
                        None
                    };
                }
                let every = self.settings.snapshot_every_records;
                let due = (every > 0 && since_snapshot >= every)
                    || (since_snapshot > 0
                        && last_snapshot.elapsed() >= self.settings.snapshot_interval);
                if due && self.settings.fence.valid() && self.settings.snapshots.is_some() {
                    // Events still awaiting their acks would sit in the snapshot's outbox
                    // and be published again by whoever restores it.
                    self.finish_publishing().await;
                    if let Some(snapshots) = &self.settings.snapshots {
                        match snapshots
                            .write(
                                self.engine.store(),
                                self.shard,
                                self.settings.owner_epoch,
                                &self.settings.node_id,
                            )
                            .await
                        {
                            Ok(_) => since_snapshot = 0,
                            Err(error) => warn!(%error, "periodic snapshot failed; the log keeps everything meanwhile"),
                        }
                    }
                    last_snapshot = Instant::now();
                }
                // The resident cap holds after every batch; idle actors go every
                // `passivate_every`.
                if self.engine.over_resident_cap()
                    || last_passivation.elapsed() >= self.settings.passivate_every
                {
                    self.engine.passivate(Instant::now());
                    last_passivation = Instant::now();
                }
            }
            drop(forwarded);
            self.finish_publishing().await;
            self.engine.shutdown().await;
            if let Some(slot) = self.resident.get(self.shard as usize) {
                slot.store(0, Ordering::Relaxed);
            }
            info!("shard worker stopped");
        }
        .instrument(span)
        .await
    }

    /// Answers the queries already waiting (local and forwarded), at most
    /// [`QUERIES_BETWEEN_BATCHES_MAX`], without waiting for more.
    async fn answer_waiting(
        &mut self,
        client: &async_nats::Client,
        forwarded: &mut Option<async_nats::Subscriber>,
    ) {
        for _ in 0..QUERIES_BETWEEN_BATCHES_MAX {
            if let Ok(request) = self.requests.try_recv() {
                self.answer(request).await;
            } else if let Some(Some(message)) = next_forwarded(forwarded).now_or_never() {
                self.answer_forwarded(client, message).await;
            } else {
                return;
            }
        }
    }

    /// Answers a view query another node forwarded (`crm.owner.<n>.view`).
    async fn answer_forwarded(
        &mut self,
        client: &async_nats::Client,
        message: async_nats::Message,
    ) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let customer_id = serde_json::from_slice::<Value>(&message.payload)
            .ok()
            .and_then(|body| body["customer_id"].as_str().map(str::to_string));
        let body = match customer_id {
            None => crate::api::query::error_reply("bad_request", "send {\"customer_id\": \"c…\"}"),
            Some(customer_id) => match self.engine.view(&customer_id).await {
                Ok(Some(view)) => view,
                Ok(None) => crate::api::query::error_reply(
                    "not_found",
                    format!("no customer {customer_id}"),
                ),
                Err(error) => crate::api::query::view_failed(self.shard, &error),
            },
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        if let Err(error) = client.publish(reply, body.into()).await {
            warn!(%error, "forwarded query reply not sent");
        }
    }

    async fn answer(&mut self, request: ShardRequest) {
        match request {
            // The asker gave up (its deadline passed): no view to build.
            ShardRequest::View { reply, .. } if reply.is_closed() => {}
            ShardRequest::View { customer_id, reply } => {
                let view = self
                    .engine
                    .view(&customer_id)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.send(view);
            }
        }
    }

    fn record_progress(&self) {
        if let Some(slot) = self.progress.get(self.shard as usize) {
            slot.store(self.engine.meta().applied_seq, Ordering::Relaxed);
        }
        if let Some(slot) = self.resident.get(self.shard as usize) {
            slot.store(self.engine.resident_count() as u64, Ordering::Relaxed);
        }
    }

    /// Applies one chunk: decode, engine (commit + flush), then publish the results, if the
    /// lease fence still holds once the chunk is durable.
    async fn process(&mut self, messages: Vec<Message>) -> Processed {
        Metrics::add(&self.metrics.shard_batches, 1);
        Metrics::add(&self.metrics.shard_messages, messages.len() as u64);
        let mut batch = Vec::with_capacity(messages.len());
        for message in &messages {
            let sequence = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(error) => {
                    warn!(%error, "shard message without JetStream info; skipped");
                    continue;
                }
            };
            match codec::decode::<ShardMessage>(&message.payload) {
                Ok(record) => batch.push((sequence, record)),
                Err(error) => {
                    // Only a foreign publisher can write an undecodable record: keep it.
                    let rejection = Rejection::new(
                        RejectReason::Malformed,
                        format!("shard log record is not a crm-node record ({error})"),
                    );
                    self.dead_letter(
                        &rejection,
                        message.subject.as_str(),
                        sequence,
                        message.payload.clone(),
                    )
                    .await;
                }
            }
        }
        let result = match self
            .engine
            .apply_batch(batch, self.settings.owner_epoch)
            .await
        {
            Ok(result) => result,
            Err(failure) => {
                error!(error = %failure, "batch could not be applied; reading it again");
                return Processed::NotApplied;
            }
        };
        self.record_progress();
        if !self.settings.fence.valid() {
            // The lease ran out while the batch was applied (a stalled process: the check
            // before it passed). Another node may apply these records now, so nothing of
            // this copy leaves the node: no audit, replies or events. They stay in the
            // outbox, which a later take-over either replaces (a newer snapshot) or
            // publishes again under the same event ids.
            return Processed::Fenced;
        }
        self.audit(&messages).await;
        Metrics::add(&self.metrics.shard_commands, result.messages.len() as u64);
        if let Some(applied) = self.applied.get(self.shard as usize) {
            applied.fetch_add(result.messages.len() as u64, Ordering::Relaxed);
        }
        Metrics::add(&self.metrics.applied, result.applied);
        Metrics::add(&self.metrics.duplicates, result.duplicates);
        Metrics::add(&self.metrics.rejected, result.rejected);
        Metrics::add(&self.metrics.replay_skipped, result.skipped);
        let created = result
            .events
            .iter()
            .filter(|(_, event)| matches!(event.data, ActorEventData::CustomerCreated(_)))
            .count();
        Metrics::add(&self.metrics.stored_customers, created as u64);
        let client = self.jetstream.client();
        for outcome in &result.messages {
            if let ApplyStatus::Rejected(rejection) = &outcome.status {
                let (subject, sequence, payload) = self
                    .original_input(&messages, outcome.seq, outcome.ingest_seq)
                    .await;
                self.dead_letter(rejection, &subject, sequence, payload)
                    .await;
            }
            if let (Some(reply_to), Some(redeem)) = (&outcome.reply_to, &outcome.redeem) {
                match serde_json::to_vec(redeem) {
                    Ok(body) => {
                        if let Err(error) = client.publish(reply_to.clone(), body.into()).await {
                            warn!(%error, "redeem reply could not be sent");
                        }
                    }
                    Err(error) => warn!(%error, "redeem reply could not be encoded"),
                }
            }
        }
        Metrics::add(&self.metrics.merges_applied, result.merges_applied);
        Metrics::add(&self.metrics.held_released, result.released.len() as u64);
        for released in &result.released {
            if let ApplyStatus::Rejected(rejection) = &released.status {
                // The node's `rejected` counts every refusal it dead-letters, released
                // ones included (the engine's batch counts leave them out).
                Metrics::add(&self.metrics.rejected, 1);
                self.dead_letter_released(rejection, released).await;
            }
        }
        self.publish_events(result.events).await;
        let transfers_unsent = self.send_transfers(result.transfers).await;
        Processed::Published { transfers_unsent }
    }

    /// The dead letter of a held channel event refused when its merge completed.
    async fn dead_letter_released(&self, rejection: &Rejection, released: &MessageResult) {
        let Some(event_id) = &released.event_id else {
            return;
        };
        Metrics::add(&self.metrics.dead_lettered, 1);
        let body = dead_letters::ReleasedDeadLetter {
            customer_id: released.customer_id.clone(),
            event_id: event_id.clone(),
            released_by_merge: true,
        };
        let subject = subjects::shard(self.shard);
        match dead_letters::publish_released(
            &self.jetstream,
            rejection,
            &subject,
            released.seq,
            &body,
        )
        .await
        {
            Ok(ack) => {
                if let Err(error) = ack.await {
                    warn!(%error, %event_id, "dead letter of a released event not acked");
                }
            }
            Err(error) => warn!(%error, %event_id, "dead letter of a released event not published"),
        }
    }

    /// Sends the transfers in the transfer outbox (left by a crash, a failed publish or the
    /// shard's previous owner); `true` when one could not be sent and should be tried again.
    async fn send_pending_transfers(&mut self) -> bool {
        match self.engine.pending_transfers() {
            Ok(transfers) => {
                if !transfers.is_empty() {
                    info!(
                        count = transfers.len(),
                        "sending merge transfers left in the transfer outbox"
                    );
                }
                self.send_transfers(transfers).await
            }
            Err(error) => {
                warn!(%error, "transfer outbox unreadable; tried again after the next batch");
                true
            }
        }
    }

    /// Appends each merge transfer to its survivor's shard log
    /// (`crm.shard.<shard of to_customer_id>`) as a `MergeIn` with `Nats-Msg-Id` the
    /// transfer's message id, awaits the acks, and removes the acked ones from the transfer
    /// outbox. Returns `true` when one failed for a reason that may pass (it stays and is
    /// sent again). One too large for the server is logged as an error naming the customer
    /// and kept (raise the server's `max_payload` and the shard stream's
    /// `message_max_bytes`, then restart the node); it does not by itself cause a retry.
    async fn send_transfers(&mut self, transfers: Vec<(TransferKey, MergeTransfer)>) -> bool {
        if transfers.is_empty() {
            return false;
        }
        let shards = self.shard_count();
        let max_payload = self.jetstream.client().max_payload();
        let mut unsent = false;
        let mut acks = Vec::with_capacity(transfers.len());
        for (key, transfer) in transfers {
            let subject =
                subjects::shard(crate::sharding::shard_of(&transfer.to_customer_id, shards));
            let message_id = transfer.message_id();
            let (merged_id, to_customer_id) = (
                transfer.merge.merged_id.clone(),
                transfer.to_customer_id.clone(),
            );
            let payload = merge_in_record(transfer);
            if payload.len() > max_payload {
                too_large(&merged_id, &to_customer_id, payload.len(), max_payload);
                continue;
            }
            let publish = Publish::build()
                .payload(payload.into())
                .message_id(message_id.as_str());
            match self.jetstream.send_publish(subject, publish).await {
                Ok(ack) => acks.push((key, merged_id, to_customer_id, ack)),
                Err(error) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    too_large(&merged_id, &to_customer_id, 0, max_payload);
                }
                Err(error) => {
                    warn!(%error, merged_id, to_customer_id, "merge transfer not sent; kept in the transfer outbox and sent again");
                    unsent = true;
                }
            }
        }
        let mut sent = Vec::with_capacity(acks.len());
        for (key, merged_id, to_customer_id, ack) in acks {
            match ack.await {
                Ok(_) => sent.push(key),
                Err(error) if exceeds_stream_message_max(&error) => {
                    too_large(&merged_id, &to_customer_id, 0, max_payload);
                }
                Err(error) => {
                    warn!(%error, merged_id, to_customer_id, "merge transfer not acked; kept in the transfer outbox and sent again");
                    unsent = true;
                }
            }
        }
        Metrics::add(&self.metrics.transfers_published, sent.len() as u64);
        if let Err(error) = self.engine.transfers_sent(&sent) {
            // Sent again later: the survivor's log drops it (message id) or the survivor
            // finds the customer already in its merged_from.
            warn!(%error, "transfer outbox not cleared; the transfers will be sent again");
        }
        unsent
    }

    /// The cluster's shard count: the node keeps one progress slot per shard.
    fn shard_count(&self) -> u32 {
        let count = u32::try_from(self.progress.len()).unwrap_or(u32::MAX);
        debug_assert!(self.shard < count, "progress has a slot per shard");
        count.max(self.shard + 1)
    }

    /// What a dead letter of a command of the shard record at `sequence` carries: the
    /// adapter's original bytes, subject and ingest sequence, read back from `CRM_INGEST`
    /// (`ingest_seq` for an entry of a routed record, else the record's `Nats-Msg-Id`
    /// `i<seq>` names it). When the ingest message is gone (past the ingest stream's
    /// retention, or a command that never went through ingest), the record as JSON with the
    /// shard subject and sequence.
    async fn original_input(
        &self,
        messages: &[Message],
        sequence: u64,
        ingest_seq: Option<u64>,
    ) -> (String, u64, bytes::Bytes) {
        let record = messages
            .iter()
            .find(|m| m.info().map(|i| i.stream_sequence).ok() == Some(sequence));
        if let Some(ingest_sequence) = ingest_seq.or_else(|| record.and_then(ingest_sequence_of)) {
            let original = async {
                let stream = self
                    .jetstream
                    .get_stream(subjects::INGEST_STREAM)
                    .await
                    .ok()?;
                stream.get_raw_message(ingest_sequence).await.ok()
            }
            .await;
            if let Some(original) = original {
                return (
                    original.subject.to_string(),
                    ingest_sequence,
                    original.payload,
                );
            }
        }
        let fallback = record
            .and_then(|m| codec::decode::<ShardMessage>(&m.payload).ok())
            .and_then(|record| match record {
                ShardMessage::Customer { command, .. } => serde_json::to_vec(&command).ok(),
                ShardMessage::Routed { entries } => entries
                    .iter()
                    .find(|entry| Some(entry.ingest_seq) == ingest_seq)
                    .and_then(|entry| serde_json::to_vec(&entry.command).ok()),
                ShardMessage::Tick { .. } | ShardMessage::ValueModel { .. } => None,
            })
            .unwrap_or_default();
        (subjects::shard(self.shard), sequence, fallback.into())
    }

    /// Publishes the batch's audit record on `crm.audit.<n>`: who applied which sequences
    /// under which lease epoch, and when (not awaited: the audit is for operators and
    /// tests, the state does not depend on it).
    async fn audit(&self, messages: &[Message]) {
        let sequences = messages
            .iter()
            .filter_map(|m| m.info().ok().map(|i| i.stream_sequence));
        let (first, last) = sequences.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        if last == 0 {
            return;
        }
        let record = serde_json::json!({
            "shard": self.shard,
            "node": self.settings.node_id,
            "epoch": self.settings.owner_epoch,
            "first_seq": first,
            "last_seq": last,
            "at_ms": crate::cluster::wall_ms(),
        });
        let client = self.jetstream.client();
        if let Err(error) = client
            .publish(subjects::audit(self.shard), record.to_string().into())
            .await
        {
            warn!(%error, "audit record not published");
        }
    }

    async fn dead_letter(
        &self,
        rejection: &Rejection,
        subject: &str,
        sequence: u64,
        payload: bytes::Bytes,
    ) {
        Metrics::add(&self.metrics.dead_lettered, 1);
        match dead_letters::publish(&self.jetstream, rejection, subject, sequence, payload).await {
            Ok(ack) => {
                if let Err(error) = ack.await {
                    warn!(%error, "dead letter not acked");
                }
            }
            Err(error) => warn!(%error, "dead letter not published"),
        }
    }

    /// Publishes events left in the outbox by a previous run (crash between commit and
    /// publish).
    async fn publish_outbox(&mut self) {
        match self.engine.pending_outbox() {
            Ok(events) if !events.is_empty() => {
                info!(
                    count = events.len(),
                    "publishing actor events left in the outbox"
                );
                self.publish_events(events).await;
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "outbox unreadable"),
        }
    }

    /// Publishes actor events to `CRM_EVENTS` (dedup by event id) and, in a task of its
    /// own, awaits the acks and clears the acked events from the outbox, so the next batch
    /// does not wait for them. At most [`PUBLISHING_BATCHES_MAX`] batches of events are in
    /// that state; the worker waits for the oldest beyond that. Events whose publish failed
    /// stay in the outbox and are published again when the shard's worker next starts.
    async fn publish_events(&mut self, events: Vec<(OutboxKey, ActorEvent)>) {
        if events.is_empty() {
            return;
        }
        let mut acks = Vec::with_capacity(events.len());
        for (key, event) in events {
            if let Some(ack) = send_event(&self.jetstream, &event).await {
                acks.push((key, ack));
            }
        }
        while self.publishing.try_join_next().is_some() {}
        while self.publishing.len() >= PUBLISHING_BATCHES_MAX {
            self.publishing.join_next().await;
        }
        let store = self.engine.store().clone();
        let metrics = self.metrics.clone();
        self.publishing.spawn(
            async move {
                let mut done = Vec::with_capacity(acks.len());
                for (key, ack) in acks {
                    match ack.await {
                        Ok(_) => done.push(key),
                        Err(error) => warn!(%error, "actor event not acked; kept in the outbox"),
                    }
                }
                Metrics::add(&metrics.actor_events_published, done.len() as u64);
                if let Err(error) = store.remove_outbox(&done) {
                    warn!(%error, "outbox not cleared; events may be published again (dedup by id)");
                }
            }
            .in_current_span(),
        );
    }

    /// Waits for every batch of events still being published.
    async fn finish_publishing(&mut self) {
        while self.publishing.join_next().await.is_some() {}
    }
}

/// The next forwarded query, or never when there is no subscription.
async fn next_forwarded(
    subscription: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match subscription {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

/// The shard-log record that carries a merge transfer to its survivor: a `MergeIn` for
/// `to_customer_id`, nobody waiting for a reply.
fn merge_in_record(transfer: MergeTransfer) -> Vec<u8> {
    let MergeTransfer {
        merge,
        to_customer_id,
        state,
    } = transfer;
    codec::encode(&ShardMessage::Customer {
        customer_id: to_customer_id,
        command: CustomerCommand::MergeIn {
            merge,
            state: Box::new(state),
        },
        reply_to: None,
    })
}

/// The stream refused a message larger than its `max_message_size` (JetStream error
/// 10054): sending it again cannot succeed until the stream's limit is raised.
fn exceeds_stream_message_max(error: &PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|error| error.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// Logs a transfer the server cannot take (`size` 0: the server said so).
fn too_large(merged_id: &str, to_customer_id: &str, size: usize, max_payload: usize) {
    error!(
        merged_id,
        to_customer_id,
        size,
        max_payload,
        "the state of customer {merged_id}, merged into {to_customer_id}, is larger than the NATS server takes in one message: it stays in the transfer outbox, and the merge waits; raise the server's max_payload and the shard stream's message_max_bytes, then restart this node to send it"
    );
}

/// Publishes one actor event on `crm.events.<type>.<customer_id>` with its id as
/// `Nats-Msg-Id`; `None` (logged) when it could not be sent.
async fn send_event(jetstream: &Context, event: &ActorEvent) -> Option<PublishAckFuture> {
    // The serde form of an actor event is its public JSON (`ActorEventJson`).
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(error) => {
            warn!(%error, "actor event not encodable");
            return None;
        }
    };
    let publish = Publish::build().payload(body.into());
    // A header value cannot hold a line break (async-nats would panic); the ingest gate
    // refuses such ids, so this only guards records written by something else.
    let publish = if event.id.chars().any(char::is_control) {
        warn!(id = ?event.id, "actor event id holds a control character; published without dedup id");
        publish
    } else {
        publish.message_id(event.id.as_str())
    };
    let subject = subjects::event(event.event_type(), &event.customer_id);
    match jetstream.send_publish(subject, publish).await {
        Ok(ack) => Some(ack),
        Err(error) => {
            warn!(%error, "actor event not published; kept in the outbox");
            None
        }
    }
}

/// The `Nats-Msg-Id` the router gives a shard record: `i<ingest sequence>`.
fn ingest_sequence_of(message: &Message) -> Option<u64> {
    let headers = message.headers.as_ref()?;
    let id = headers.get(async_nats::header::NATS_MESSAGE_ID)?;
    id.as_str().strip_prefix('i')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_actors::shard_message::MergeRef;
    use crm_actors::state::CustomerState;

    #[test]
    fn a_message_above_the_streams_limit_is_told_from_a_passing_failure() {
        let refusal = |err_code: u64| {
            let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 400, "err_code": err_code,
                "description": "message size exceeds maximum allowed"
            }))
            .expect("a JetStream API error");
            PublishError::with_source(PublishErrorKind::Other, error)
        };
        assert!(exceeds_stream_message_max(&refusal(10054)));
        assert!(!exceeds_stream_message_max(&refusal(10077)));
        assert!(!exceeds_stream_message_max(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
    }

    #[test]
    fn a_transfer_travels_as_a_merge_in_for_where_it_goes() {
        let mut state = CustomerState::new("c-bob");
        state.created_at_ms = Some(1_000);
        let merge = MergeRef {
            merged_id: "c-bob".into(),
            survivor_id: "c-ann".into(),
            cause_event_id: "e-link".into(),
            at_ms: 2_000,
        };
        // Forwarded by a tombstone: it goes where the survivor went, not to the survivor.
        let transfer = MergeTransfer {
            merge: merge.clone(),
            to_customer_id: "c-cat".into(),
            state: state.clone(),
        };
        assert_eq!(transfer.message_id(), "m-c-bob-c-cat");
        let record: ShardMessage =
            codec::decode(&merge_in_record(transfer)).expect("a shard-log record");
        assert_eq!(
            record,
            ShardMessage::Customer {
                customer_id: "c-cat".into(),
                command: CustomerCommand::MergeIn {
                    merge,
                    state: Box::new(state),
                },
                reply_to: None,
            }
        );
    }
}
