//! The ingest router: `CRM_INGEST` -> validate -> identity -> `crm.shard.<n>`.
//!
//! One node at a time runs the router (the holder of the router lease, see
//! [`crate::cluster`]) on the durable consumer `crm-router`, so each customer's events
//! reach the shard log in ingest order. For each chunk of ready messages it validates the payload
//! (`crm_actors::ingest::parse_ingest`), resolves the identifiers to a customer id through the
//! identity directory, and publishes the chunk's events as one [`ShardMessage::Routed`]
//! record per shard (many events per shard-log message: the server stores, indexes and
//! delivers one message where it would handle dozens), with a `Nats-Msg-Id` derived from the
//! ingest sequences it holds (so a chunk routed again is not logged twice; a regrouped one
//! is caught by the actors' event-id dedup). A prefetch task pulls ahead of the chunk in
//! hand, validates what it pulls and has the directory read ahead the identifiers the next
//! chunk will need ([`IdentityDirectory::read_ahead`]), so its KV reads overlap the
//! resolution of the chunk in hand.
//! An ingest message is acked only after its shard (or dead-letter) publish is acked: an
//! event the adapter saw acked is never lost. Inputs that fail validation go to the
//! dead-letter stream and are acked; they never block the pipeline. The router holds no
//! customer state and applies no rules itself: its [`IngestLimits`] carry what the rules
//! file says about ingest (accepted currencies, blocked identifiers), and `parse_ingest`
//! applies it (a blocked identifier is taken out before the directory ever sees it).
//!
//! Merges: when the directory merges customers for an event (the identity rules allow it),
//! the event goes to the survivor as a `ResolvedEvent` naming the merges, and a `MergeOut`
//! goes into each merged customer's shard log, at the event's place in ingest order: the
//! merged customer's earlier events are before it in its log, its later ones are routed to
//! the survivor. An ingest message is acked only once every record it is part of is acked.

use crate::backoff::Backoff;
use crate::cluster::lease::Fence;
use crate::dead_letters;
use crate::ingest::identity_directory::{
    DirectoryError, EventIdentities, IdentityDirectory, Resolution,
};
use crate::jetstream::{self as setup, IngestConsumerSettings};
use crate::metrics::Metrics;
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::jetstream::consumer::pull::{self, MessagesError};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{Context, Message};
use crm_actors::codec;
use crm_actors::identity::Identity;
use crm_actors::ingest::{parse_ingest, ChannelEvent, IngestLimits, RejectReason, Rejection};
use crm_actors::shard_message::{CustomerCommand, RoutedCommand, ShardMessage};
use futures::{FutureExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// What the router needs; built by the node runtime (one per router lease taken).
#[derive(Clone)]
pub struct Router {
    pub jetstream: Context,
    pub directory: Arc<IdentityDirectory>,
    pub limits: IngestLimits,
    pub shards: u32,
    pub batch_max_events: usize,
    /// Settings to recreate the ingest consumer with when the router rewinds it.
    pub consumer_settings: IngestConsumerSettings,
    pub metrics: Arc<Metrics>,
    /// The router lease's fence: nothing is published once it has expired.
    pub fence: Fence,
}

impl Router {
    /// Pulls and routes until shutdown, keeping each customer's events in ingest order.
    ///
    /// Chunk `n + 1` is validated and resolved while chunk `n`'s shard publishes are being
    /// acked, but it is published only once every message of chunk `n` is in a log. When a
    /// message cannot be routed (NATS restarting, a publish or identity lookup failing) the
    /// router publishes nothing after it: it settles what is in flight and rewinds the
    /// ingest consumer to its ack floor, so the failed message comes back *before* the
    /// customer's later events (a nak would redeliver it after them). What was routed twice
    /// by the rewind is dropped by the shard log's `Nats-Msg-Id` dedup or the customers'
    /// event-id dedup.
    ///
    /// The router sets up (and rewinds) the durable consumer itself, retrying until it
    /// can, so whoever starts it is not held up by a slow JetStream.
    pub async fn run(self, mut shutdown: Shutdown) {
        // Another node may have routed (mapped identifiers, written customer records) since
        // this one last did.
        self.directory.clear_read_ahead();
        self.directory.forget_records();
        let mut backoff = Backoff::new(Duration::from_millis(100), 2, Duration::from_secs(5));
        let mut consumer: Option<PullConsumer> = None;
        let mut fenced = false;
        let mut setup_failures = 0;
        while !shutdown.is_triggered() && !fenced {
            let current = match consumer.take() {
                Some(current) => current,
                None => {
                    // The set-up deletes and recreates the shared durable consumer: never
                    // once the lease is gone (another router may be using it by then).
                    if !self.fence.valid() {
                        warn!("router lease not renewed in time; routing stops");
                        break;
                    }
                    match setup::ingest_consumer(&self.jetstream, &self.consumer_settings).await {
                        Ok(rewound) => {
                            setup_failures = 0;
                            rewound
                        }
                        Err(error) => {
                            setup_failures += 1;
                            if setup_failures >= SETUP_FAILURES_MAX {
                                // Ends the task: the manager releases the router lease, so
                                // a node that cannot route does not hold the role.
                                error!(%error, failures = setup_failures, "router: cannot set up the ingest consumer; giving the router role up");
                                break;
                            }
                            warn!(%error, "router: cannot rewind the ingest consumer; retrying");
                            if !pause(&mut shutdown, &mut backoff).await {
                                break;
                            }
                            continue;
                        }
                    }
                }
            };
            if !self.fence.valid() {
                warn!("router lease not renewed in time; routing stops");
                break;
            }
            let stream = match current
                .stream()
                .max_messages_per_batch(self.batch_max_events)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(stream) => stream,
                Err(error) => {
                    warn!(%error, "router: cannot pull from CRM_INGEST; retrying");
                    if !pause(&mut shutdown, &mut backoff).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            // A task of its own keeps pulling while a chunk is routed, so the next chunk is
            // ready (up to `batch_max_events`) when the router comes back: routing waits on
            // KV and publish round trips, and pulling only between chunks left each chunk
            // with what one pull delivered meanwhile. It also validates what it pulls and
            // has the identity directory read ahead what the chunk will need.
            let (prefetched, mut ready) =
                mpsc::channel(PREFETCH_CHUNKS * self.batch_max_events.max(1));
            let prefetch = tokio::spawn(prefetch(
                stream,
                prefetched,
                self.directory.clone(),
                self.limits.clone(),
                self.batch_max_events.max(1),
            ));
            let mut in_flight: Option<RoutedChunk> = None;
            loop {
                let first = match ready.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Nothing to overlap with: settle the chunk in flight now, so the
                        // end of a burst is acked at once, not when the next event comes.
                        if in_flight.is_some() && !settle(in_flight.take(), &self.metrics).await {
                            break;
                        }
                        tokio::select! {
                            item = ready.recv() => item,
                            _ = shutdown.wait() => break,
                        }
                    }
                };
                let Some(first) = first else { break };
                let mut chunk = vec![first];
                while chunk.len() < self.batch_max_events {
                    match ready.try_recv() {
                        Ok(item) => chunk.push(item),
                        Err(_) => break,
                    }
                }
                let mut messages = Vec::with_capacity(chunk.len());
                let mut broken = false;
                for item in chunk {
                    match item {
                        Ok(message) if !broken => messages.push(message),
                        Ok(_) => {}
                        Err(error) => {
                            warn!(%error, "router: pull stream error; rewinding the consumer");
                            broken = true;
                        }
                    }
                }
                let (prepared, settled) = tokio::join!(
                    self.prepare(messages),
                    settle(in_flight.take(), &self.metrics)
                );
                if !settled {
                    break;
                }
                if !self.fence.valid() {
                    warn!("router lease not renewed in time; routing stops");
                    fenced = true;
                    break;
                }
                let routed = self.publish(prepared).await;
                let complete = routed.complete;
                in_flight = Some(routed);
                if !complete || broken {
                    break;
                }
            }
            prefetch.abort();
            settle(in_flight.take(), &self.metrics).await;
            // Whatever ended the stream, what was pulled but not routed must come back in
            // order: start again from the first unacked message.
        }
        info!("router stopped");
    }

    /// Resolves the identities of a chunk's valid messages together (see
    /// [`IdentityDirectory::resolve_many`]). Publishes nothing.
    async fn prepare(&self, pulled: Vec<Validated>) -> Prepared {
        Metrics::add(&self.metrics.ingest_received, pulled.len() as u64);
        let (messages, parsed): (Vec<Message>, Vec<Result<ChannelEvent, Rejection>>) =
            pulled.into_iter().unzip();
        if messages.is_empty() {
            return Prepared {
                messages,
                parsed,
                resolutions: Vec::new(),
            };
        }
        let events: Vec<EventIdentities<'_>> = messages
            .iter()
            .zip(&parsed)
            .filter_map(|(message, event)| Some((message, event.as_ref().ok()?)))
            .map(|(message, event)| EventIdentities {
                identities: event.identities.as_slice(),
                event_id: &event.event_id,
                at_ms: event.occurred_at_ms,
                ingest_seq: message.info().map_or(u64::MAX, |i| i.stream_sequence),
            })
            .collect();
        // No identity key or record is written once the lease is gone: another router may
        // be mapping the same identifiers by then.
        let may_create = || self.fence.valid();
        let resolutions = match self
            .directory
            .resolve_events_guarded(&events, &may_create)
            .await
        {
            Ok(resolutions) => resolutions,
            Err(error) => {
                warn!(%error, "router: identities not resolved");
                Vec::new()
            }
        };
        Prepared {
            messages,
            parsed,
            resolutions,
        }
    }

    /// Publishes a prepared chunk: dead-letters the invalid messages and publishes the
    /// valid ones as one [`ShardMessage::Routed`] record per shard (split when it would
    /// pass [`RECORD_ENTRIES_MAX`] or [`RECORD_BYTES_MAX`]), each shard's events in ingest
    /// order. Nothing from the first message whose identity was not resolved onwards is
    /// published; a shard's second record is sent only after its first is acked, and none
    /// after a failed one. The other acks are awaited by [`settle`].
    async fn publish(&self, prepared: Prepared) -> RoutedChunk {
        let Prepared {
            messages,
            parsed,
            resolutions,
        } = prepared;
        let mut chunk = RoutedChunk {
            complete: true,
            ..RoutedChunk::default()
        };
        let mut resolutions = resolutions.into_iter();
        // Per shard: (index in `chunk.messages`, entry, estimated encoded bytes).
        let mut by_shard: BTreeMap<u32, Vec<(usize, RoutedCommand, usize)>> = BTreeMap::new();
        for (message, event) in messages.into_iter().zip(parsed) {
            let index = chunk.messages.len();
            let mut outcome = Outcome::NotPublished;
            if chunk.complete {
                match event {
                    Ok(event) => match resolutions.next() {
                        Some(Ok(resolution)) => {
                            let size = message.payload.len() + resolution.customer_id.len();
                            let entries = self.entries(&message, event, resolution);
                            // Acked only once every one of its records is stored.
                            outcome = Outcome::Routed {
                                records: entries.len(),
                                acks: Vec::new(),
                            };
                            for (shard, entry) in entries {
                                by_shard
                                    .entry(shard)
                                    .or_default()
                                    .push((index, entry, size));
                            }
                        }
                        Some(Err(error)) if error.is_transient() => {
                            warn!(%error, event_id = %event.event_id, "router: identity not resolved");
                            chunk.complete = false;
                        }
                        Some(Err(error)) => {
                            // Retrying cannot help (a corrupt directory key): the event is
                            // kept in the dead-letter stream with the fix in the reason.
                            let rejection =
                                Rejection::new(RejectReason::NoIdentity, error.to_string());
                            match self.dead_letter(&message, &rejection).await {
                                Some(ack) => {
                                    outcome = Outcome::DeadLetter(chunk.acks.len());
                                    chunk.acks.push(AckSlot::Pending(ack));
                                }
                                None => chunk.complete = false,
                            }
                        }
                        None => chunk.complete = false,
                    },
                    Err(rejection) => match self.dead_letter(&message, &rejection).await {
                        Some(ack) => {
                            outcome = Outcome::DeadLetter(chunk.acks.len());
                            chunk.acks.push(AckSlot::Pending(ack));
                        }
                        None => chunk.complete = false,
                    },
                }
            }
            chunk.messages.push((message, outcome));
        }
        let mut waves: Vec<_> = by_shard
            .into_iter()
            .map(|(shard, entries)| (shard, split_records(entries).into_iter()))
            .collect();
        loop {
            let mut sent = Vec::new();
            for (shard, records) in waves.iter_mut() {
                let Some(record) = records.next() else {
                    continue;
                };
                let indexes: Vec<usize> = record.iter().map(|(index, _, _)| *index).collect();
                let entries: Vec<RoutedCommand> =
                    record.into_iter().map(|(_, entry, _)| entry).collect();
                match self.publish_record(*shard, entries).await {
                    Some(ack) => {
                        let ack_index = chunk.acks.len();
                        chunk.acks.push(AckSlot::Pending(ack));
                        sent.push(ack_index);
                        for index in indexes {
                            if let Outcome::Routed { acks, .. } = &mut chunk.messages[index].1 {
                                acks.push(ack_index);
                            }
                        }
                    }
                    None => chunk.complete = false,
                }
            }
            if sent.is_empty() || !chunk.complete {
                break;
            }
            if waves.iter().all(|(_, records)| records.len() == 0) {
                break;
            }
            // A shard has another record: it may follow only a stored one.
            for ack_index in sent {
                if chunk.acks[ack_index].settle().await.is_err() {
                    chunk.complete = false;
                }
            }
            if !chunk.complete {
                break;
            }
        }
        chunk
    }

    /// Publishes an input that cannot be applied to the dead-letter stream.
    async fn dead_letter(
        &self,
        message: &Message,
        rejection: &Rejection,
    ) -> Option<PublishAckFuture> {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let subject = message.subject.as_str();
        debug!(%subject, sequence, reason = %rejection.reason, "dead letter");
        dead_letters::publish(
            &self.jetstream,
            rejection,
            subject,
            sequence,
            message.payload.clone(),
        )
        .await
        .ok()
    }

    /// The shard-log entries of a resolved event, each with its shard: the event for its
    /// customer (identifiers the directory did not link dropped, its notes and merges
    /// attached), and a merge-out for each customer it merges away.
    fn entries(
        &self,
        message: &Message,
        mut event: ChannelEvent,
        resolution: Resolution,
    ) -> Vec<(u32, RoutedCommand)> {
        let ingest_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        // An identifier the directory did not link to the customer (it belongs to another
        // customer that was not merged, or is one too many of its kind) must not reach its
        // state.
        let dropped: Vec<_> = resolution.dropped().collect();
        event
            .identities
            .retain(|identity| !dropped.contains(&identity.kind));
        let mut entries: Vec<(u32, RoutedCommand)> = resolution
            .merge_outs
            .iter()
            .map(|merge| {
                let entry = RoutedCommand {
                    ingest_seq,
                    customer_id: merge.merged_id.clone(),
                    command: CustomerCommand::MergeOut {
                        merge: merge.clone(),
                    },
                };
                (shard_of(&merge.merged_id, self.shards), entry)
            })
            .collect();
        let shard = shard_of(&resolution.customer_id, self.shards);
        entries.push((
            shard,
            RoutedCommand {
                ingest_seq,
                customer_id: resolution.customer_id,
                command: CustomerCommand::ResolvedEvent {
                    event,
                    notes: resolution.notes,
                    merges: resolution.merges,
                },
            },
        ));
        entries
    }

    /// Publishes one routed record to `crm.shard.<shard>`. Returns the ack future (None
    /// when nothing could be published).
    async fn publish_record(
        &self,
        shard: u32,
        entries: Vec<RoutedCommand>,
    ) -> Option<PublishAckFuture> {
        let id = record_id(shard, &entries);
        let record = ShardMessage::Routed { entries };
        let publish = Publish::build()
            .payload(codec::encode(&record).into())
            .message_id(id);
        match self
            .jetstream
            .send_publish(subjects::shard(shard), publish)
            .await
        {
            Ok(ack) => Some(ack),
            Err(error) => {
                warn!(%error, shard, "router: publish to the shard log failed");
                None
            }
        }
    }
}

/// Most events in one routed shard record.
pub const RECORD_ENTRIES_MAX: usize = 256;
/// Most estimated bytes (ingest payloads plus customer ids) in one routed shard record;
/// well under the server's default 1 MiB `max_payload` (an event alone is at most the
/// ingest `payload_max_bytes`).
pub const RECORD_BYTES_MAX: usize = 256 * 1024;

/// Cuts one shard's entries of a chunk into records of at most [`RECORD_ENTRIES_MAX`]
/// entries and [`RECORD_BYTES_MAX`] estimated bytes (a record holds at least one entry).
fn split_records<T>(entries: Vec<(usize, T, usize)>) -> Vec<Vec<(usize, T, usize)>> {
    let mut records = Vec::new();
    let mut current: Vec<(usize, T, usize)> = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        if !current.is_empty()
            && (current.len() >= RECORD_ENTRIES_MAX || bytes + entry.2 > RECORD_BYTES_MAX)
        {
            records.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += entry.2;
        current.push(entry);
    }
    if !current.is_empty() {
        records.push(current);
    }
    records
}

/// The `Nats-Msg-Id` of a routed record: `r<first ingest seq>-<entries>-<hash of the shard
/// and every ingest seq>`. The same entries routed again (a redelivered chunk) make the
/// same id and are stored once; a regrouped redelivery makes another record, whose repeated
/// events the customer actors recognise by event id. The shard is in the hash because one
/// ingest message can be in the records of two shards (an event and its merge-out).
fn record_id(shard: u32, entries: &[RoutedCommand]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in shard.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    for entry in entries {
        for byte in entry.ingest_seq.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let first = entries.first().map(|e| e.ingest_seq).unwrap_or(0);
    format!("r{first}-{}-{hash:016x}", entries.len())
}

/// What became of one ingest message of a chunk: routed into `records` shard-log records
/// (more than one when it merges customers of other shards), of which those published so
/// far have their acks at `acks` (routed only once all `records` are there and acked); in
/// the dead letter whose ack is `acks[i]`; or not published (it comes back when the router
/// rewinds).
#[derive(Debug, Clone)]
enum Outcome {
    Routed { records: usize, acks: Vec<usize> },
    DeadLetter(usize),
    NotPublished,
}

/// A validated and resolved chunk, not yet published.
struct Prepared {
    messages: Vec<Message>,
    parsed: Vec<Result<ChannelEvent, Rejection>>,
    /// One per valid message, in order; shorter when the directory failed.
    resolutions: Vec<Result<Resolution, DirectoryError>>,
}

/// A publish ack, awaited or not yet.
enum AckSlot {
    Pending(PublishAckFuture),
    Done(Result<(), String>),
}

impl AckSlot {
    /// Awaits the ack (once) and returns its result.
    async fn settle(&mut self) -> Result<(), String> {
        if let AckSlot::Pending(_) = self {
            let AckSlot::Pending(ack) = std::mem::replace(self, AckSlot::Done(Ok(()))) else {
                unreachable!("checked above")
            };
            *self = AckSlot::Done(ack.await.map(|_| ()).map_err(|e| e.to_string()));
        }
        match self {
            AckSlot::Done(result) => result.clone(),
            AckSlot::Pending(_) => unreachable!("settled above"),
        }
    }
}

/// A published chunk: its ingest messages, in order, and the publish acks they wait for.
/// `complete` is false when some message was not published.
#[derive(Default)]
struct RoutedChunk {
    messages: Vec<(Message, Outcome)>,
    acks: Vec<AckSlot>,
    complete: bool,
}

/// Chunks (of `batch_max_events`) the router may hold pulled but not yet routed.
const PREFETCH_CHUNKS: usize = 2;
/// Read-ahead calls of the identity directory the prefetch task keeps running at once.
const READ_AHEAD_TASKS: usize = 4;

/// An ingest message and what validating it gave.
type Validated = (Message, Result<ChannelEvent, Rejection>);

/// Validates an ingest message (the channel is the subject's last token).
fn validate(message: Message, limits: &IngestLimits) -> Validated {
    let channel = subjects::channel_from_ingest_subject(message.subject.as_str()).unwrap_or("");
    let event = parse_ingest(channel, &message.payload, limits);
    (message, event)
}

/// The router's prefetch task: pulls from the ingest consumer into `ready` (bounded), a
/// group of what is already there at a time, validates each message, and has the
/// directory read ahead the identities of each group (at most [`READ_AHEAD_TASKS`] groups
/// at once; a group that finds them all busy goes without). Ends with the stream or when
/// the router drops `ready`; aborting it aborts its reads.
async fn prefetch(
    mut stream: pull::Stream,
    ready: mpsc::Sender<Result<Validated, MessagesError>>,
    directory: Arc<IdentityDirectory>,
    mut limits: IngestLimits,
    group_max: usize,
) {
    let mut reading = JoinSet::new();
    while let Some(item) = stream.next().await {
        let mut items = vec![item];
        while items.len() < group_max {
            match stream.next().now_or_never() {
                Some(Some(item)) => items.push(item),
                _ => break,
            }
        }
        limits.occurred_at_max_ms = limits
            .occurred_at_future_max_ms
            .map(|ahead| crate::api::commands::wall_clock_ms().saturating_add(ahead));
        let group: Vec<Result<Validated, MessagesError>> = items
            .into_iter()
            .map(|item| item.map(|message| validate(message, &limits)))
            .collect();
        while reading.try_join_next().is_some() {}
        if reading.len() < READ_AHEAD_TASKS {
            let identities: Vec<Vec<Identity>> = group
                .iter()
                .filter_map(|item| item.as_ref().ok())
                .filter_map(|(_, event)| event.as_ref().ok())
                .map(|event| event.identities.clone())
                .collect();
            if !identities.is_empty() {
                let directory = directory.clone();
                reading.spawn(async move {
                    let slices: Vec<&[Identity]> = identities.iter().map(Vec::as_slice).collect();
                    directory.read_ahead(&slices).await;
                });
            }
        }
        for item in group {
            if ready.send(item).await.is_err() {
                return;
            }
        }
    }
}
/// Failed set-ups of the ingest consumer in a row after which the router gives its role up.
const SETUP_FAILURES_MAX: u32 = 10;

/// Awaits the publish acks of a routed chunk and then acks, in order, the ingest messages
/// whose publish was acked. Returns whether every message of the chunk is in a log (true
/// for no chunk); the others are not acked and come back when the router rewinds.
async fn settle(chunk: Option<RoutedChunk>, metrics: &Metrics) -> bool {
    let Some(mut chunk) = chunk else {
        return true;
    };
    let mut acked = Vec::with_capacity(chunk.acks.len());
    for ack in chunk.acks.iter_mut() {
        acked.push(ack.settle().await);
    }
    let mut complete = chunk.complete;
    for (message, outcome) in chunk.messages {
        let (result, counter) = match outcome {
            // A record of it was never published: it comes back when the router rewinds.
            Outcome::Routed { records, acks } if acks.len() < records || acks.is_empty() => {
                complete = false;
                continue;
            }
            Outcome::Routed { acks, .. } => (
                acks.iter()
                    .map(|i| &acked[*i])
                    .find(|result| result.is_err())
                    .unwrap_or(&acked[acks[0]]),
                &metrics.ingest_routed,
            ),
            Outcome::DeadLetter(i) => (&acked[i], &metrics.dead_lettered),
            Outcome::NotPublished => {
                complete = false;
                continue;
            }
        };
        match result {
            Ok(()) => {
                Metrics::add(counter, 1);
                if let Err(error) = message.ack().await {
                    // The message comes back; the actors recognise its event id.
                    warn!(%error, "router: ack to CRM_INGEST failed");
                }
            }
            Err(error) => {
                warn!(%error, subject = %message.subject, "router: publish failed; will rewind");
                complete = false;
            }
        }
    }
    complete
}

/// Sleeps the next `backoff` delay unless shutdown comes first (then false).
async fn pause(shutdown: &mut Shutdown, backoff: &mut Backoff) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.next_delay()) => true,
        _ = shutdown.wait() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ingest_seq: u64) -> RoutedCommand {
        RoutedCommand {
            ingest_seq,
            customer_id: "c".to_string(),
            command: CustomerCommand::Tick { at_ms: 0 },
        }
    }

    #[test]
    fn records_are_cut_at_the_entry_and_byte_limits_and_keep_their_order() {
        let many: Vec<(usize, u64, usize)> = (0..600).map(|i| (i, i as u64, 10)).collect();
        let records = split_records(many);
        let sizes: Vec<usize> = records.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![RECORD_ENTRIES_MAX, RECORD_ENTRIES_MAX, 88]);
        let order: Vec<usize> = records.iter().flatten().map(|(i, _, _)| *i).collect();
        assert_eq!(order, (0..600).collect::<Vec<_>>());

        let big = RECORD_BYTES_MAX / 3 + 1;
        let records = split_records((0..5).map(|i| (i, (), big)).collect());
        let sizes: Vec<usize> = records.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        // An entry above the byte limit still travels, alone.
        let records = split_records(vec![(0, (), 1), (1, (), RECORD_BYTES_MAX * 2), (2, (), 1)]);
        let sizes: Vec<usize> = records.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn a_record_id_names_exactly_its_set_of_ingest_sequences() {
        let id = |seqs: &[u64]| record_id(3, &seqs.iter().map(|s| entry(*s)).collect::<Vec<_>>());
        assert_eq!(id(&[5, 7, 9]), id(&[5, 7, 9]));
        // An event's record and its merge-out's record (same sequence, two shards) differ.
        assert_ne!(record_id(3, &[entry(5)]), record_id(4, &[entry(5)]));
        assert_ne!(id(&[5, 7, 9]), id(&[5, 9]));
        assert_ne!(id(&[5, 7, 9]), id(&[5, 8, 9]));
        assert!(id(&[5, 7, 9]).starts_with("r5-3-"));
    }
}
