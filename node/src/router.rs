//! The ingest router: `CRM_INGEST` -> validate -> identity -> `crm.shard.<n>`.
//!
//! Every node runs one router on the shared durable consumer `crm-router`, so ingest load is
//! spread over the cluster. For each chunk of ready messages it validates the payload
//! (`crm_actors::event::parse_ingest`), resolves the identifiers to a customer id through the
//! identity directory, and publishes a [`ShardMessage`] to the customer's shard with
//! `Nats-Msg-Id = i<ingest sequence>` (so a redelivered ingest message is not logged twice).
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
use crm_actors::command::{CustomerCommand, IdentityConflict, ShardMessage};
use crm_actors::event::{parse_ingest, ChannelEvent, IngestLimits, Rejection};
use crm_actors::identity::Identity;
use futures::StreamExt;
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
            let mut chunks = stream.ready_chunks(self.batch_max_events);
            let (routed, to_ack) = mpsc::channel(CHUNKS_IN_FLIGHT_MAX);
            let acker = tokio::spawn(ack_routed(to_ack, self.metrics.clone()));
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    _ = shutdown.wait() => break,
                };
                let Some(chunk) = chunk else { break };
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
            // Every chunk published so far is acked (or nak'ed) before reading again.
            drop(routed);
            let _ = acker.await;
        }
        info!("router stopped");
    }

    /// Routes one chunk: validates every message, resolves the identities of the valid
    /// ones together (see [`IdentityDirectory::resolve_many`]) and publishes everything in
    /// ingest order. The publish acks are awaited by [`ack_routed`], while the next chunk is
    /// routed.
    async fn route_chunk(&self, messages: Vec<Message>) -> Vec<Routed> {
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
        let mut pending: Vec<Routed> = Vec::with_capacity(messages.len());
        for (message, event) in messages.into_iter().zip(parsed) {
            let (publish, dead) = match event {
                Ok(event) => match resolutions.next() {
                    Some(Ok(resolution)) => {
                        (self.publish_event(&message, event, resolution).await, false)
                    }
                    Some(Err(error)) => {
                        warn!(%error, event_id = %event.event_id, "router: identity not resolved");
                        (None, false)
                    }
                    None => (None, false),
                },
                Err(rejection) => (self.dead_letter(&message, &rejection).await, true),
            };
            pending.push((message, publish, dead));
        }
        pending
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

    /// Publishes a resolved event to its customer's shard. Returns the ack future (None
    /// when nothing could be published).
    async fn publish_event(
        &self,
        message: &Message,
        mut event: ChannelEvent,
        resolution: Resolution,
    ) -> Option<PublishAckFuture> {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
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
        let record = ShardMessage::Customer {
            customer_id: resolution.customer_id,
            command: CustomerCommand::Event { event, conflict },
            reply_to: None,
        };
        let publish = Publish::build()
            .payload(codec::encode(&record).into())
            .message_id(format!("i{sequence}"));
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

/// An ingest message with its shard (or dead-letter) publish: the ack future (None when
/// nothing could be published) and whether it was a dead letter.
type Routed = (Message, Option<PublishAckFuture>, bool);

/// Chunks of routed messages whose publish acks may be awaited at once.
const CHUNKS_IN_FLIGHT_MAX: usize = 4;

/// Awaits the publish acks of each routed chunk, in order, and acks the ingest messages
/// whose publish was acked; the others are nak'ed and come back.
async fn ack_routed(mut chunks: mpsc::Receiver<Vec<Routed>>, metrics: Arc<Metrics>) {
    while let Some(chunk) = chunks.recv().await {
        for (message, publish, dead) in chunk {
            let outcome = match publish {
                Some(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                None => Err("not published".to_string()),
            };
            match outcome {
                Ok(()) => {
                    let counter = if dead {
                        &metrics.dead_lettered
                    } else {
                        &metrics.ingest_routed
                    };
                    Metrics::add(counter, 1);
                    if let Err(error) = message.ack().await {
                        // The message comes back; the shard publish dedups on its msg id.
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
