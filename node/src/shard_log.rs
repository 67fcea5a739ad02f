//! Reading one shard's log strictly in order, from a position the caller owns.
//!
//! A shard's progress lives in sled with its state (the applied sequence), not in a
//! JetStream consumer: a durable consumer redelivers unacked records *after* newer ones (a
//! crash, a lost connection, a slow batch), which would reorder a customer's commands.
//! [`ShardLogReader`] reads with an ephemeral, ack-less pull consumer that starts at a
//! given stream sequence; every record must carry the next consumer sequence, so a gap
//! (a record lost in transit) is detected, and on any gap or error the consumer is
//! dropped and recreated from the record after the last one returned. Each call waits at
//! most `wait` for new records, so a reader can never hang on a silent consumer.

use crate::subjects;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{Context, Message};
use futures::StreamExt;
use std::time::Duration;
use tracing::{debug, warn};

/// How long an abandoned reader's consumer lingers on the server.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);

/// An in-order reader of `crm.shard.<n>`.
pub struct ShardLogReader {
    jetstream: Context,
    shard: u32,
    batch_max_events: usize,
    consumer: Option<PullConsumer>,
    /// Stream sequence of the next record to return.
    next_sequence: u64,
    /// Consumer sequence of the last record received from the current consumer.
    consumer_sequence: u64,
}

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
        }
    }

    /// Reads again from `next_sequence` (after a batch that could not be applied).
    pub async fn rewind(&mut self, next_sequence: u64) {
        self.next_sequence = next_sequence.max(1);
        self.drop_consumer().await;
    }

    /// The next records in log order: what is available at once, or else the first record to
    /// arrive within `wait` plus whatever followed it. Empty when nothing arrived (or the
    /// consumer had to be recreated).
    pub async fn next_batch(&mut self, wait: Duration) -> Vec<Message> {
        let Some(consumer) = self.consumer().await else {
            tokio::time::sleep(wait).await;
            return Vec::new();
        };
        let available = consumer
            .fetch()
            .max_messages(self.batch_max_events)
            .messages()
            .await;
        let mut records = self.collect(available.map_err(|e| e.to_string())).await;
        if records.is_empty() && self.consumer.is_some() {
            let first = consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await;
            records = self.collect(first.map_err(|e| e.to_string())).await;
            if !records.is_empty() && self.consumer.is_some() && self.batch_max_events > 1 {
                let rest = consumer
                    .fetch()
                    .max_messages(self.batch_max_events - 1)
                    .messages()
                    .await;
                records.extend(self.collect(rest.map_err(|e| e.to_string())).await);
            }
        }
        records
    }

    /// Takes records in order from one pull, dropping the consumer on a gap or an error.
    async fn collect<S>(&mut self, batch: Result<S, String>) -> Vec<Message>
    where
        S: futures::Stream<Item = Result<Message, async_nats::Error>> + Unpin,
    {
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                warn!(shard = self.shard, %error, "shard log pull failed; reopening the reader");
                self.drop_consumer().await;
                return Vec::new();
            }
        };
        let mut records = Vec::new();
        while let Some(item) = batch.next().await {
            let message = match item {
                Ok(message) => message,
                Err(error) => {
                    warn!(shard = self.shard, %error, "shard log read failed; reopening the reader");
                    self.drop_consumer().await;
                    break;
                }
            };
            let Ok(info) = message.info() else {
                warn!(
                    shard = self.shard,
                    "shard log record without JetStream info; reopening the reader"
                );
                self.drop_consumer().await;
                break;
            };
            let (consumer_sequence, stream_sequence) =
                (info.consumer_sequence, info.stream_sequence);
            if consumer_sequence != self.consumer_sequence + 1
                || stream_sequence < self.next_sequence
            {
                debug!(
                    shard = self.shard,
                    consumer_sequence,
                    expected = self.consumer_sequence + 1,
                    "gap in the shard log read; reopening the reader"
                );
                self.drop_consumer().await;
                break;
            }
            self.consumer_sequence = consumer_sequence;
            self.next_sequence = stream_sequence + 1;
            records.push(message);
        }
        records
    }

    async fn consumer(&mut self) -> Option<PullConsumer> {
        if let Some(consumer) = &self.consumer {
            return Some(consumer.clone());
        }
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
        match self
            .jetstream
            .create_consumer_on_stream(config, subjects::SHARDS_STREAM)
            .await
        {
            Ok(consumer) => {
                self.consumer_sequence = 0;
                self.consumer = Some(consumer.clone());
                Some(consumer)
            }
            Err(error) => {
                warn!(shard = self.shard, %error, "cannot open a shard log reader; retrying");
                None
            }
        }
    }

    async fn drop_consumer(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            let name = consumer.cached_info().name.clone();
            // Best effort: an abandoned consumer also expires after INACTIVE_THRESHOLD.
            if let Ok(stream) = self.jetstream.get_stream(subjects::SHARDS_STREAM).await {
                let _ = stream.delete_consumer(&name).await;
            }
        }
    }
}
