//! Reading one shard's log strictly in order, from a position the caller owns.
//!
//! A shard's progress lives in sled with its state (the applied sequence), not in a
//! JetStream consumer: a durable consumer redelivers unacked records *after* newer ones (a
//! crash, a lost connection, a slow batch), which would reorder a customer's commands.
//! [`ShardLogReader`] reads with an ephemeral, ack-less pull consumer that starts at a
//! given stream sequence; every record must carry the next consumer sequence, so a gap
//! (a record lost in transit) is detected, and on any gap or error (including missed
//! server heartbeats) the consumer is dropped and recreated from the record after the last
//! one returned. Each call waits at most `wait` for new records, so a reader can never hang
//! on a silent consumer.

use crate::backoff::Backoff;
use crate::subjects;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{Context, Message};
use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tracing::{debug, warn};

/// How long an abandoned reader's consumer lingers on the server.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);
/// Attempts to create the reader's consumer per call of `open` (the worker calls it again).
const CREATE_ATTEMPTS: u32 = 3;
/// How long one pull request of the reader stays open on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// The server sends a heartbeat this often while a pull request waits; a reader that misses
/// two of them reopens its consumer.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// First pause after the consumer could not be opened; doubles (with jitter) up to
/// [`REOPEN_PAUSE_MAX`] while opening keeps failing.
const REOPEN_PAUSE: Duration = Duration::from_millis(500);
/// Longest pause between two failed openings of the consumer.
const REOPEN_PAUSE_MAX: Duration = Duration::from_secs(4);

/// An in-order reader of `crm.shard.<n>`.
///
/// The consumer is read through one long-lived pull subscription (the client keeps pull
/// requests of `batch_max_events` open and renews them at half), so a busy shard costs no
/// request per batch and an idle one costs a heartbeat every few seconds.
pub struct ShardLogReader {
    jetstream: Context,
    shard: u32,
    batch_max_events: usize,
    consumer: Option<(String, pull::Stream)>,
    /// Stream sequence of the next record to return.
    next_sequence: u64,
    /// Consumer sequence of the last record received from the current consumer.
    consumer_sequence: u64,
    /// Pauses between failed openings of the consumer; reset once one opens.
    reopen: Backoff,
}

/// Most record bytes one batch collects (the first record always counts): about 2,000
/// events of a few hundred bytes, one or a few routed records.
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;

impl ShardLogReader {
    /// A reader whose first record will be the one at `next_sequence` or after.
    pub fn new(
        jetstream: Context,
        shard: u32,
        next_sequence: u64,
        batch_max_events: usize,
    ) -> Self {
        ShardLogReader {
            jetstream,
            shard,
            batch_max_events: batch_max_events.max(1),
            consumer: None,
            next_sequence: next_sequence.max(1),
            consumer_sequence: 0,
            reopen: Backoff::new(REOPEN_PAUSE, 2, REOPEN_PAUSE_MAX),
        }
    }

    /// Reads again from `next_sequence` (after a batch that could not be applied).
    pub async fn rewind(&mut self, next_sequence: u64) {
        self.next_sequence = next_sequence.max(1);
        self.drop_consumer().await;
    }

    /// The next records in log order: the first record to arrive within `wait` plus every
    /// record already received after it (at most `batch_max_events`, and no more once they
    /// hold [`BATCH_BYTES_MAX`]). Empty when nothing arrived (or the consumer had to be
    /// reopened, then after a pause that grows while opening keeps failing).
    pub async fn next_batch(&mut self, wait: Duration) -> Vec<Message> {
        if self.consumer.is_none() {
            if !self.open().await {
                tokio::time::sleep(self.reopen.next_delay()).await;
                return Vec::new();
            }
            self.reopen.reset();
        }
        let mut records = Vec::new();
        let first = {
            let Some((_, messages)) = self.consumer.as_mut() else {
                return records;
            };
            match tokio::time::timeout(wait, messages.next()).await {
                Err(_) => return records,
                Ok(item) => item,
            }
        };
        if !self.accept(first, &mut records).await {
            return records;
        }
        // Routed records carry up to 256 events each: a byte budget keeps a batch's events
        // (and the engine's work per batch) bounded whatever the record sizes.
        let mut bytes: usize = records.iter().map(|r| r.payload.len()).sum();
        while records.len() < self.batch_max_events && bytes < BATCH_BYTES_MAX {
            let Some((_, messages)) = self.consumer.as_mut() else {
                break;
            };
            let Some(item) = messages.next().now_or_never() else {
                break;
            };
            if !self.accept(item, &mut records).await {
                break;
            }
            bytes += records.last().map_or(0, |r| r.payload.len());
        }
        records
    }

    /// Appends `item` when it is the next record in order; otherwise drops the consumer
    /// (gap, error, end of the subscription) and returns `false`.
    async fn accept(
        &mut self,
        item: Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>,
        records: &mut Vec<Message>,
    ) -> bool {
        let message = match item {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                warn!(shard = self.shard, %error, "shard log read failed; reopening the reader");
                self.drop_consumer().await;
                return false;
            }
            None => {
                warn!(
                    shard = self.shard,
                    "shard log subscription ended; reopening the reader"
                );
                self.drop_consumer().await;
                return false;
            }
        };
        let Ok(info) = message.info() else {
            warn!(
                shard = self.shard,
                "shard log record without JetStream info; reopening the reader"
            );
            self.drop_consumer().await;
            return false;
        };
        let (consumer_sequence, stream_sequence) = (info.consumer_sequence, info.stream_sequence);
        if consumer_sequence != self.consumer_sequence + 1 || stream_sequence < self.next_sequence {
            debug!(
                shard = self.shard,
                consumer_sequence,
                expected = self.consumer_sequence + 1,
                "gap in the shard log read; reopening the reader"
            );
            self.drop_consumer().await;
            return false;
        }
        self.consumer_sequence = consumer_sequence;
        self.next_sequence = stream_sequence + 1;
        records.push(message);
        true
    }

    /// Creates the consumer at `next_sequence` and opens its pull subscription.
    async fn open(&mut self) -> bool {
        let config = pull::Config {
            description: Some(format!("in-order reader of shard {}", self.shard)),
            filter_subject: subjects::shard(self.shard),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: self.next_sequence,
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: INACTIVE_THRESHOLD,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let jetstream = &self.jetstream;
        let consumer: PullConsumer =
            match crate::jetstream::create_with_retries(CREATE_ATTEMPTS, || {
                jetstream.create_consumer_on_stream(config.clone(), subjects::SHARDS_STREAM)
            })
            .await
            {
                Ok(consumer) => consumer,
                Err(error) => {
                    warn!(shard = self.shard, %error, "cannot open a shard log reader; retrying");
                    return false;
                }
            };
        let name = consumer.cached_info().name.clone();
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.batch_max_events)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await;
        match messages {
            Ok(messages) => {
                self.consumer_sequence = 0;
                self.consumer = Some((name, messages));
                true
            }
            Err(error) => {
                warn!(shard = self.shard, %error, "cannot pull from a shard log reader; retrying");
                self.delete_consumer(&name).await;
                false
            }
        }
    }

    async fn drop_consumer(&mut self) {
        if let Some((name, messages)) = self.consumer.take() {
            drop(messages);
            self.delete_consumer(&name).await;
        }
    }

    async fn delete_consumer(&self, name: &str) {
        // Best effort: an abandoned consumer also expires after INACTIVE_THRESHOLD.
        if let Ok(stream) = self.jetstream.get_stream(subjects::SHARDS_STREAM).await {
            let _ = stream.delete_consumer(name).await;
        }
    }
}
