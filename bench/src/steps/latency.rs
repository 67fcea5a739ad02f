//! Step 3, `latency` (also the latency half of the `cluster` step): purchases of known,
//! resident customers published at a fixed rate; for each, the time from its publish to
//! its `points.earned` actor event, to its record in the shard log and to its PubAck.

use crate::cluster_status::{metrics_delta, MetricsSnapshot};
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::{round, summary, Summary};
use crate::plan::Plan;
use crate::traffic::{publish_bounded, traffic_start_ms, Outgoing};
use crate::waits::Deployment;
use anyhow::{anyhow, Context as _, Result};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use crm_actors::codec;
use crm_actors::shard_message::{CustomerCommand, ShardMessage};
use crm_actors::time::format_rfc3339;
use crm_node::subjects;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The actor event the step times (a type of `crm_actors::actor_event::ActorEventData`;
/// a unit test checks it is one).
const POINTS_EARNED: &str = "points.earned";

/// How long the latency run waits for the last actor events after its last publish.
const LATENCY_TAIL_WAIT: Duration = Duration::from_secs(20);

/// What a latency run measured.
pub struct Latency {
    /// The publish rate aimed at, events/s (rounded).
    pub target_rate_per_s: f64,
    /// Publish -> `points.earned`, ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub details: LatencyDetails,
}

/// A latency run's details (`latency` in bench/results.json, and in each cluster size's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LatencyDetails {
    pub target_rate_per_s: f64,
    pub achieved_rate_per_s: f64,
    pub events: usize,
    pub customers: u64,
    pub seconds: f64,
    pub publish_to_points_earned_ms: Summary,
    pub publish_to_shard_log_ms: Summary,
    pub publish_to_pub_ack_ms: Summary,
    /// The worst latency of the events sent in each second of the run.
    pub points_earned_worst_ms_by_second: Vec<f64>,
    pub shard_log_worst_ms_by_second: Vec<f64>,
    pub points_earned_missing: u64,
    pub shard_log_missing: u64,
    pub pub_ack_failures: u64,
    /// How much each node counter grew (summed over the nodes of a cluster).
    pub node_counters: MetricsSnapshot,
    pub cpu: CpuUse,
}

/// The one field the latency run reads of an actor event: its id (`lat-<i>:...`).
#[derive(Deserialize)]
struct ActorEventId {
    id: String,
}

/// What the latency run publishes to `crm.ingest.web`, as an adapter would (the ingest
/// JSON of docs/protocol.md; only the fields the run sends).
#[derive(Serialize)]
struct IngestBody<'a> {
    v: u32,
    event_id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    occurred_at: String,
    identity: EmailIdentity,
    #[serde(flatten)]
    body: IngestKind,
}

#[derive(Serialize)]
struct EmailIdentity {
    email: String,
}

/// The type-specific fields of an [`IngestBody`].
#[derive(Serialize)]
#[serde(untagged)]
enum IngestKind {
    Identify {
        profile: Profile,
    },
    Purchase {
        order_id: String,
        amount: f64,
        currency: &'static str,
        items: [Item; 2],
    },
}

#[derive(Serialize)]
struct Profile {
    first_name: &'static str,
}

#[derive(Serialize)]
struct Item {
    sku: &'static str,
    category: &'static str,
    qty: u32,
    price: f64,
}

impl IngestBody<'_> {
    fn payload(&self) -> Bytes {
        // A struct of strings and numbers always serialises.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

fn latency_email(customer: u64) -> String {
    format!("bench-lat-{customer:06}@example.com")
}

fn latency_event_id(index: u64) -> String {
    format!("lat-{index}")
}

/// The index in a `lat-<i>` event id (also the prefix of actor event ids).
fn latency_index(id: &str) -> Option<usize> {
    id.split(':').next()?.strip_prefix("lat-")?.parse().ok()
}

pub async fn latency(
    client: &async_nats::Client,
    target: &mut impl Deployment,
    plan: &Plan,
    rate: f64,
    nats_pid: u32,
) -> Result<Latency> {
    let js = jetstream::new(client.clone());
    // Identify every customer of the run first, so purchases hit known, resident customers.
    let base_ms = traffic_start_ms() + 30 * 86_400_000;
    let identifies = (0..plan.latency_customers).map(|c| {
        let event_id = format!("lat-id-{c}");
        let payload = IngestBody {
            v: 1,
            event_id: &event_id,
            kind: "identify",
            occurred_at: format_rfc3339(base_ms),
            identity: EmailIdentity {
                email: latency_email(c),
            },
            body: IngestKind::Identify {
                profile: Profile {
                    first_name: "Bench",
                },
            },
        }
        .payload();
        Outgoing {
            subject: subjects::ingest("web"),
            msg_id: event_id,
            payload,
        }
    });
    publish_bounded(&js, identifies, plan.in_flight, None).await?;
    target
        .wait_applied(client, Duration::from_secs(300))
        .await?;
    let stats_before = target.stats(client).await?;

    let count = plan
        .latency_events
        .unwrap_or((rate * plan.latency_seconds).round() as u64)
        .max(1) as usize;
    let sent_ns: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let earned = client
        .subscribe(subjects::events_of_type(POINTS_EARNED))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    let routed = client
        .subscribe(format!("{}.>", subjects::SHARD_PREFIX))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    client.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let earned_task = tokio::spawn(match_arrivals(
        earned,
        sent_ns.clone(),
        t0,
        stop.clone(),
        |payload: &[u8]| {
            let event: Option<ActorEventId> = serde_json::from_slice(payload).ok();
            event
                .and_then(|event| latency_index(&event.id))
                .into_iter()
                .collect()
        },
    ));
    let routed_task = tokio::spawn(match_arrivals(
        routed,
        sent_ns.clone(),
        t0,
        stop.clone(),
        |payload: &[u8]| {
            let event_index = |command: &CustomerCommand| match command {
                CustomerCommand::Event { event, .. } => latency_index(&event.event_id),
                _ => None,
            };
            match codec::decode::<ShardMessage>(payload) {
                Ok(ShardMessage::Customer { command, .. }) => {
                    event_index(&command).into_iter().collect()
                }
                // The router batches: a record holds the events of one chunk for its shard.
                Ok(ShardMessage::Routed { entries }) => entries
                    .iter()
                    .filter_map(|entry| event_index(&entry.command))
                    .collect(),
                _ => Vec::new(),
            }
        },
    ));
    // PubAcks are awaited by their own task so that they never hold back the schedule.
    let (ack_sender, mut ack_receiver) =
        tokio::sync::mpsc::channel::<(Instant, PublishAckFuture)>(plan.in_flight.max(1));
    let ack_task = tokio::spawn(async move {
        let mut ack_ms = Vec::new();
        let mut failures = 0u64;
        while let Some((sent, ack)) = ack_receiver.recv().await {
            match ack.await {
                Ok(_) => ack_ms.push(sent.elapsed().as_secs_f64() * 1000.0),
                Err(_) => failures += 1,
            }
        }
        (ack_ms, failures)
    });

    let cpu_before = CpuSnapshot::take_many(nats_pid, &target.node_pids());
    let interval_s = 1.0 / rate.max(1e-3);
    let start = Instant::now();
    for index in 0..count {
        let due = start + Duration::from_secs_f64(index as f64 * interval_s);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let customer = index as u64 % plan.latency_customers;
        let event_id = latency_event_id(index as u64);
        let payload = IngestBody {
            v: 1,
            event_id: &event_id,
            kind: "purchase",
            occurred_at: format_rfc3339(base_ms + 1000 + index as i64 * 1000),
            identity: EmailIdentity {
                email: latency_email(customer),
            },
            body: IngestKind::Purchase {
                order_id: format!("lat-o-{index}"),
                amount: 59.90,
                currency: "EUR",
                items: [
                    Item {
                        sku: "sku-1",
                        category: "shoes",
                        qty: 1,
                        price: 49.90,
                    },
                    Item {
                        sku: "sku-2",
                        category: "socks",
                        qty: 2,
                        price: 5.00,
                    },
                ],
            },
        }
        .payload();
        let sent = Instant::now();
        sent_ns[index].store(
            sent.duration_since(t0).as_nanos() as u64 + 1,
            Ordering::Release,
        );
        let publish = PublishMessage::build()
            .payload(payload)
            .message_id(&event_id);
        let ack = js
            .send_publish(subjects::ingest("web"), publish)
            .await
            .map_err(|e| anyhow!("publish {event_id}: {e}"))?;
        ack_sender
            .send((sent, ack))
            .await
            .map_err(|_| anyhow!("the ack task ended"))?;
    }
    let publish_seconds = start.elapsed().as_secs_f64();
    drop(ack_sender);
    let cpu_published = CpuSnapshot::take_many(nats_pid, &target.node_pids());
    let wait_until = Instant::now() + LATENCY_TAIL_WAIT;
    while Instant::now() < wait_until && !earned_task.is_finished() {
        target.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (earned_ms, earned_missing, earned_worst) = earned_task.await.context("earned matcher")?;
    let (routed_ms, routed_missing, routed_worst) = routed_task.await.context("routed matcher")?;
    let (ack_ms, ack_failures) = ack_task.await.context("ack task")?;
    let stats_after = target.stats(client).await?;
    let e2e = summary(earned_ms, 2);
    let (p50_ms, p99_ms) = (e2e.p50(), e2e.p99());
    let target_rate_per_s = round(rate, 1);
    let details = LatencyDetails {
        target_rate_per_s,
        achieved_rate_per_s: round(count as f64 / publish_seconds.max(1e-9), 1),
        events: count,
        customers: plan.latency_customers,
        seconds: round(publish_seconds, 2),
        publish_to_points_earned_ms: e2e,
        publish_to_shard_log_ms: summary(routed_ms, 2),
        publish_to_pub_ack_ms: summary(ack_ms, 2),
        points_earned_worst_ms_by_second: earned_worst,
        shard_log_worst_ms_by_second: routed_worst,
        points_earned_missing: earned_missing,
        shard_log_missing: routed_missing,
        pub_ack_failures: ack_failures,
        node_counters: metrics_delta(&stats_before.metrics, &stats_after.metrics),
        cpu: cpu_before.since(&cpu_published),
    };
    Ok(Latency {
        target_rate_per_s,
        p50_ms,
        p99_ms,
        details,
    })
}

/// Receives messages until every sent index was matched once or `stop`; returns the
/// latencies (ms from the recorded send instant), how many indices were never matched, and
/// the worst latency of the events sent in each second of the run (to place outliers).
async fn match_arrivals(
    mut subscription: async_nats::Subscriber,
    sent_ns: Arc<Vec<AtomicU64>>,
    t0: Instant,
    stop: Arc<AtomicBool>,
    indexes_of: impl Fn(&[u8]) -> Vec<usize>,
) -> (Vec<f64>, u64, Vec<f64>) {
    let total = sent_ns.len();
    let mut matched = vec![false; total];
    let mut latencies = Vec::with_capacity(total);
    let mut worst_by_second: Vec<f64> = Vec::new();
    while latencies.len() < total && !stop.load(Ordering::Relaxed) {
        let next = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await;
        let message = match next {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(_) => continue,
        };
        let arrived = t0.elapsed().as_nanos() as u64;
        for index in indexes_of(&message.payload) {
            if index >= total || matched[index] {
                continue;
            }
            let sent = sent_ns[index].load(Ordering::Acquire);
            if sent == 0 {
                continue;
            }
            matched[index] = true;
            let latency_ms = arrived.saturating_sub(sent - 1) as f64 / 1e6;
            latencies.push(latency_ms);
            let second = ((sent - 1) / 1_000_000_000) as usize;
            if worst_by_second.len() <= second {
                worst_by_second.resize(second + 1, 0.0);
            }
            worst_by_second[second] = worst_by_second[second].max(round(latency_ms, 1));
        }
    }
    let missing = (total - latencies.len()) as u64;
    (latencies, missing, worst_by_second)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_timed_event_is_an_actor_event_type() {
        assert!(crm_actors::actor_event::ActorEventData::TYPES.contains(&super::POINTS_EARNED));
    }
}
