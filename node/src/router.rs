//! The ingest router: `CRM_INGEST` -> validate -> identity -> `crm.shard.<n>`.
//!
//! Every node runs one router on the shared durable consumer `crm-router`, so ingest load is
//! spread over the cluster. For each chunk of ready messages it validates the payload
//! (`crm_actors::event::parse_ingest`), resolves the identifiers to a customer id through the
//! identity directory, and publishes the chunk's events as one [`ShardMessage::Routed`]
//! record per shard (many events per shard-log message: the server stores, indexes and
//! delivers one message where it would handle dozens), with a `Nats-Msg-Id` derived from the
//! ingest sequences it holds (so a chunk routed again is not logged twice; a regrouped one
//! is caught by the actors' event-id dedup).
//! An ingest message is acked only after its shard (or dead-letter) publish is acked: an
//! event the adapter saw acked is never lost. Inputs that fail validation go to the
//! dead-letter stream and are acked; they never block the pipeline. The router holds no
//! rules and no customer state.

use crate::dlq;
use crate::identity_directory::IdentityDirectory;
use crate::identity_directory::Resolution;
use crate::metrics::Metrics;
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{AckKind, Context, Message};
use crm_actors::codec;
use crm_actors::command::{CustomerCommand, IdentityConflict, RoutedCommand, ShardMessage};
use crm_actors::event::{parse_ingest, ChannelEvent, IngestLimits, Rejection};
use crm_actors::identity::Identity;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// What the router needs; built by the node runtime.
pub struct Router {
    pub jetstream: Context,
    pub directory: Arc<IdentityDirectory>,
    pub limits: IngestLimits,
    pub shards: u32,
    pub batch_max_events: usize,
    pub metrics: Arc<Metrics>,
}

/// Delay before a message whose routing failed (NATS trouble) is delivered again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

impl Router {
    /// Pulls and routes until shutdown. Stream errors (a NATS restart) are retried with
    /// back-off; nothing is acked that was not routed.
    pub async fn run(self, consumer: PullConsumer, mut shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_triggered() {
            let stream = match consumer
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
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // A task of its own keeps pulling while a chunk is routed, so the next chunk is
            // ready (up to `batch_max_events`) when the router comes back: routing waits on
            // KV and publish round trips, and pulling only between chunks left each chunk
            // with what one pull delivered meanwhile.
            let (prefetched, mut ready) =
                mpsc::channel(PREFETCH_CHUNKS * self.batch_max_events.max(1));
            let prefetch = tokio::spawn(async move {
                let mut stream = stream;
                while let Some(item) = stream.next().await {
                    if prefetched.send(item).await.is_err() {
                        break;
                    }
                }
            });
            let (routed, to_ack) = mpsc::channel(CHUNKS_IN_FLIGHT_MAX);
            let acker = tokio::spawn(ack_routed(to_ack, self.metrics.clone()));
            loop {
                let first = tokio::select! {
                    item = ready.recv() => item,
                    _ = shutdown.wait() => break,
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
                        Ok(message) => messages.push(message),
                        Err(error) => {
                            warn!(%error, "router: pull stream error; reconnecting the consumer");
                            broken = true;
                        }
                    }
                }
                let chunk = self.route_chunk(messages).await;
                if routed.send(chunk).await.is_err() || broken {
                    break;
                }
            }
            // Every chunk published so far is acked (or nak'ed) before reading again; what
            // was prefetched but not routed is redelivered (it was never acked).
            prefetch.abort();
            drop(routed);
            let _ = acker.await;
        }
        info!("router stopped");
    }

    /// Routes one chunk: validates every message, resolves the identities of the valid
    /// ones together (see [`IdentityDirectory::resolve_many`]), dead-letters the invalid
    /// ones and publishes the rest as one [`ShardMessage::Routed`] record per shard (split
    /// when it would pass [`RECORD_ENTRIES_MAX`] or [`RECORD_BYTES_MAX`]), each shard's
    /// events in ingest order. The publish acks are awaited by [`ack_routed`], while the
    /// next chunk is routed.
    async fn route_chunk(&self, messages: Vec<Message>) -> RoutedChunk {
        Metrics::add(&self.metrics.ingest_received, messages.len() as u64);
        let parsed: Vec<Result<ChannelEvent, Rejection>> = messages
            .iter()
            .map(|message| {
                let channel =
                    subjects::channel_from_ingest_subject(message.subject.as_str()).unwrap_or("");
                parse_ingest(channel, &message.payload, &self.limits)
            })
            .collect();
        let identities: Vec<&[Identity]> = parsed
            .iter()
            .filter_map(|event| event.as_ref().ok())
            .map(|event| event.identities.as_slice())
            .collect();
        let mut resolutions = match self.directory.resolve_many(&identities).await {
            Ok(resolutions) => resolutions.into_iter(),
            Err(error) => {
                warn!(%error, "router: identity directory unavailable");
                Vec::new().into_iter()
            }
        };
        let mut chunk = RoutedChunk::default();
        // Per shard: (index in `chunk.messages`, entry, estimated encoded bytes).
        let mut by_shard: BTreeMap<u32, Vec<(usize, RoutedCommand, usize)>> = BTreeMap::new();
        for (message, event) in messages.into_iter().zip(parsed) {
            let index = chunk.messages.len();
            let mut outcome = Outcome::NotPublished;
            match event {
                Ok(event) => match resolutions.next() {
                    Some(Ok(resolution)) => {
                        let size = message.payload.len() + resolution.customer_id.len();
                        let (shard, entry) = self.entry(&message, event, resolution);
                        by_shard
                            .entry(shard)
                            .or_default()
                            .push((index, entry, size));
                    }
                    Some(Err(error)) => {
                        warn!(%error, event_id = %event.event_id, "router: identity not resolved");
                    }
                    None => {}
                },
                Err(rejection) => {
                    if let Some(ack) = self.dead_letter(&message, &rejection).await {
                        outcome = Outcome::DeadLetter(chunk.acks.len());
                        chunk.acks.push(ack);
                    }
                }
            }
            chunk.messages.push((message, outcome));
        }
        for (shard, entries) in by_shard {
            for record in split_records(entries) {
                let indexes: Vec<usize> = record.iter().map(|(index, _, _)| *index).collect();
                let entries: Vec<RoutedCommand> =
                    record.into_iter().map(|(_, entry, _)| entry).collect();
                if let Some(ack) = self.publish_record(shard, entries).await {
                    let ack_index = chunk.acks.len();
                    chunk.acks.push(ack);
                    for index in indexes {
                        chunk.messages[index].1 = Outcome::Routed(ack_index);
                    }
                }
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
        dlq::publish(
            &self.jetstream,
            rejection,
            subject,
            sequence,
            message.payload.clone(),
        )
        .await
        .ok()
    }

    /// The shard and the shard-log entry of a resolved event.
    fn entry(
        &self,
        message: &Message,
        mut event: ChannelEvent,
        resolution: Resolution,
    ) -> (u32, RoutedCommand) {
        let ingest_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let conflict = resolution
            .conflicts
            .first()
            .map(|(kind, other)| IdentityConflict {
                kind: *kind,
                other_customer_id: other.clone(),
            });
        // An identifier that belongs to another customer is not the winner's: it must not be
        // linked to it (merging two customers is an explicit, later operation).
        event.identities.retain(|identity| {
            !resolution
                .conflicts
                .iter()
                .any(|(kind, _)| *kind == identity.kind)
        });
        let shard = shard_of(&resolution.customer_id, self.shards);
        let entry = RoutedCommand {
            ingest_seq,
            customer_id: resolution.customer_id,
            command: CustomerCommand::Event { event, conflict },
        };
        (shard, entry)
    }

    /// Publishes one routed record to `crm.shard.<shard>`. Returns the ack future (None
    /// when nothing could be published).
    async fn publish_record(
        &self,
        shard: u32,
        entries: Vec<RoutedCommand>,
    ) -> Option<PublishAckFuture> {
        let id = record_id(&entries);
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

/// The `Nats-Msg-Id` of a routed record: `r<first ingest seq>-<entries>-<hash of every
/// ingest seq>`. The same entries routed again (a redelivered chunk) make the same id and
/// are stored once; a regrouped redelivery makes another record, whose repeated events the
/// customer actors recognise by event id.
fn record_id(entries: &[RoutedCommand]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for entry in entries {
        for byte in entry.ingest_seq.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let first = entries.first().map(|e| e.ingest_seq).unwrap_or(0);
    format!("r{first}-{}-{hash:016x}", entries.len())
}

/// What became of one ingest message of a chunk: published in the record (or dead letter)
/// whose ack is `acks[i]`, or not published (it is nak'ed and comes back).
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Routed(usize),
    DeadLetter(usize),
    NotPublished,
}

/// A routed chunk: its ingest messages, in order, and the publish acks they wait for.
#[derive(Default)]
struct RoutedChunk {
    messages: Vec<(Message, Outcome)>,
    acks: Vec<PublishAckFuture>,
}

/// Chunks (of `batch_max_events`) the router may hold pulled but not yet routed.
const PREFETCH_CHUNKS: usize = 2;

/// Chunks of routed messages whose publish acks may be awaited at once.
const CHUNKS_IN_FLIGHT_MAX: usize = 4;

/// Awaits the publish acks of each routed chunk and then acks, in order, the ingest
/// messages whose publish was acked; the others are nak'ed and come back.
async fn ack_routed(mut chunks: mpsc::Receiver<RoutedChunk>, metrics: Arc<Metrics>) {
    let not_published: Result<(), String> = Err("not published".to_string());
    while let Some(chunk) = chunks.recv().await {
        let mut acked = Vec::with_capacity(chunk.acks.len());
        for ack in chunk.acks {
            acked.push(ack.await.map(|_| ()).map_err(|e| e.to_string()));
        }
        for (message, outcome) in chunk.messages {
            let (result, counter) = match outcome {
                Outcome::Routed(i) => (&acked[i], &metrics.ingest_routed),
                Outcome::DeadLetter(i) => (&acked[i], &metrics.dead_lettered),
                Outcome::NotPublished => (&not_published, &metrics.ingest_routed),
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
                    warn!(%error, subject = %message.subject, "router: publish failed; redelivering");
                    let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                }
            }
        }
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
        let id = |seqs: &[u64]| record_id(&seqs.iter().map(|s| entry(*s)).collect::<Vec<_>>());
        assert_eq!(id(&[5, 7, 9]), id(&[5, 7, 9]));
        assert_ne!(id(&[5, 7, 9]), id(&[5, 9]));
        assert_ne!(id(&[5, 7, 9]), id(&[5, 8, 9]));
        assert!(id(&[5, 7, 9]).starts_with("r5-3-"));
    }
}
