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
use crm_actors::event::{parse_ingest, IngestLimits};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
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
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    _ = shutdown.wait() => return,
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
                self.route_chunk(messages).await;
                if broken {
                    break;
                }
            }
        }
        info!("router stopped");
    }

    /// Routes one chunk: publishes everything, awaits the publish acks, then acks ingest.
    async fn route_chunk(&self, messages: Vec<Message>) {
        Metrics::add(&self.metrics.ingest_received, messages.len() as u64);
        let mut pending: Vec<(Message, Option<PublishAckFuture>, bool)> =
            Vec::with_capacity(messages.len());
        for message in messages {
            let (publish, dead) = self.route_one(&message).await;
            pending.push((message, publish, dead));
        }
        for (message, publish, dead) in pending {
            let outcome = match publish {
                Some(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                None => Err("not published".to_string()),
            };
            match outcome {
                Ok(()) => {
                    let counter = if dead {
                        &self.metrics.dead_lettered
                    } else {
                        &self.metrics.ingest_routed
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

    /// Publishes one message to its shard or to the dead-letter stream. Returns the ack
    /// future (None when nothing could be published) and whether it was a dead letter.
    async fn route_one(&self, message: &Message) -> (Option<PublishAckFuture>, bool) {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let subject = message.subject.as_str();
        let channel = subjects::channel_from_ingest_subject(subject).unwrap_or("");
        let event = match parse_ingest(channel, &message.payload, &self.limits) {
            Ok(event) => event,
            Err(rejection) => {
                debug!(%subject, sequence, reason = %rejection.reason, "dead letter");
                let publish = dlq::publish(
                    &self.jetstream,
                    &rejection,
                    subject,
                    sequence,
                    message.payload.clone(),
                )
                .await;
                return (publish.ok(), true);
            }
        };
        let resolution = match self.directory.resolve(&event.identities).await {
            Ok(resolution) => resolution,
            Err(error) => {
                warn!(%error, event_id = %event.event_id, "router: identity directory unavailable");
                return (None, false);
            }
        };
        let conflict = resolution
            .conflicts
            .first()
            .map(|(kind, other)| IdentityConflict {
                kind: *kind,
                other_customer_id: other.clone(),
            });
        // An identifier that belongs to another customer is not the winner's: it must not be
        // linked to it (merging two customers is an explicit, later operation).
        let mut event = event;
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
            Ok(ack) => (Some(ack), false),
            Err(error) => {
                warn!(%error, shard, "router: publish to the shard log failed");
                (None, false)
            }
        }
    }
}
