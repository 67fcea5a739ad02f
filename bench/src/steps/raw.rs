//! Step 1, `raw`: the JetStream baseline on the same server, without the node: the
//! throughput's generator payloads published to a scratch stream (bounded in-flight acks),
//! then pulled and acked one by one, as the router would. What end-to-end is compared with.

use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::round;
use crate::plan::Plan;
use crate::traffic::{publish_bounded, Outgoing};
use anyhow::{anyhow, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Scratch stream of the raw JetStream baseline.
const RAW_STREAM: &str = "BENCH_RAW";
/// Messages per pull request, as the router (`router_batch_max_events` default).
pub const PULL_BATCH_MAX: usize = 2048;
/// Unacked messages the raw consumer may hold, as the router (`ingest_max_ack_pending`).
const RAW_MAX_ACK_PENDING: i64 = 8192;

/// What the raw baseline measured.
pub struct Raw {
    /// Events published and consumed per second.
    pub events_per_s: f64,
    pub details: RawDetails,
}

/// The raw baseline's details (`raw` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RawDetails {
    pub events: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub publish_seconds: f64,
    pub publish_events_per_s: f64,
    pub consume_seconds: f64,
    pub consume_events_per_s: f64,
    pub in_flight: usize,
    pub pull_batch: usize,
    pub cpu_publish: CpuUse,
    pub cpu_consume: CpuUse,
}

pub async fn raw_jetstream(
    client: &async_nats::Client,
    traffic: &[Outgoing],
    plan: &Plan,
    nats_pid: u32,
) -> Result<Raw> {
    let js = jetstream::new(client.clone());
    let duplicate_window = Duration::from_secs(120);
    let stream = js
        .create_stream(stream::Config {
            name: RAW_STREAM.to_string(),
            subjects: vec!["bench.raw.>".to_string()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the scratch stream {RAW_STREAM}: {e}"))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".to_string()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: RAW_MAX_ACK_PENDING,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the scratch consumer: {e}"))?;
    let messages = traffic.iter().map(|m| Outgoing {
        subject: format!(
            "bench.raw.{}",
            m.subject.rsplit('.').next().unwrap_or("web")
        ),
        msg_id: m.msg_id.clone(),
        payload: m.payload.clone(),
    });
    let cpu_before = CpuSnapshot::take(nats_pid, None);
    let published = publish_bounded(&js, messages, plan.in_flight, None).await?;
    let publish_done = Instant::now();
    let cpu_published = CpuSnapshot::take(nats_pid, None);
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH_MAX)
        .messages()
        .await
        .map_err(|e| anyhow!("cannot pull the scratch stream: {e}"))?;
    let expected = published.count - published.duplicates;
    let mut consumed = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while consumed < expected {
        let next = tokio::time::timeout_at(deadline.into(), pulled.next())
            .await
            .map_err(|_| anyhow!("consumed only {consumed} of {expected} in 600 s"))?;
        let message = next
            .ok_or_else(|| anyhow!("the pull stream ended"))?
            .map_err(|e| anyhow!("pull: {e}"))?;
        message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        consumed += 1;
    }
    client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    let last_ack = Instant::now();
    let cpu_after = CpuSnapshot::take(nats_pid, None);
    drop(pulled);
    let seconds = last_ack
        .duration_since(published.first_publish)
        .as_secs_f64();
    let publish_seconds = publish_done
        .duration_since(published.first_publish)
        .as_secs_f64();
    let consume_seconds = last_ack.duration_since(publish_done).as_secs_f64();
    let _ = js.delete_stream(RAW_STREAM).await;
    let events_per_s = round(consumed as f64 / seconds.max(1e-9), 0);
    let details = RawDetails {
        events: consumed,
        seconds: round(seconds, 3),
        events_per_s,
        publish_seconds: round(publish_seconds, 3),
        publish_events_per_s: round(published.count as f64 / publish_seconds.max(1e-9), 0),
        consume_seconds: round(consume_seconds, 3),
        consume_events_per_s: round(consumed as f64 / consume_seconds.max(1e-9), 0),
        in_flight: plan.in_flight,
        pull_batch: PULL_BATCH_MAX,
        cpu_publish: cpu_before.since(&cpu_published),
        cpu_consume: cpu_published.since(&cpu_after),
    };
    Ok(Raw {
        events_per_s,
        details,
    })
}
