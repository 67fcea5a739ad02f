//! What the bench publishes and how: the generated sample traffic (the load generator's
//! multi-channel week, no duplicates), one `visit` per new customer (the memory and hand-off
//! feeds), JetStream publishing with a bound on acks in flight (a failed publish or ack is
//! sent again; the msg id dedups it), and a paced load at a fixed rate. Every publish goes to
//! `crm.ingest.<channel>` as an adapter's would.

use crate::cluster_status::node_stats;
use anyhow::{bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use crm_actors::time::{format_rfc3339, parse_rfc3339_ms};
use crm_node::loadgen::{Generator, GeneratorSpec};
use crm_node::subjects;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the generated traffic starts (event time).
pub const TRAFFIC_START: &str = "2026-11-01T00:00:00Z";
/// Days of generated traffic the throughput events are spread over.
const TRAFFIC_DAYS: u32 = 7;
/// Publish attempts of one message before the bench gives up.
const PUBLISH_ATTEMPTS_MAX: u32 = 5;
/// Most memory-feed events published but not yet applied.
const FEED_BACKLOG_MAX: u64 = 10_000;
/// Memory-feed events published between two backlog checks.
const FEED_CHUNK: u64 = 2_000;

/// One message to publish with JetStream.
#[derive(Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
}

/// The sample traffic of steps 1 to 3 (`traffic` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TrafficDetails {
    pub generator: GeneratorDetails,
    pub events: usize,
    pub mean_payload_bytes: f64,
}

/// The generator's settings (`crm_node::loadgen::GeneratorSpec`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GeneratorDetails {
    /// People (customers and visitors).
    pub people: usize,
    pub days: u32,
    pub seed: u64,
    pub duplicate_rate_percent: u8,
    /// The traffic window's start (RFC 3339).
    pub start: String,
}

/// What [`publish_bounded`] did.
pub struct Published {
    pub first_publish: Instant,
    pub last_ack: Instant,
    pub count: u64,
    pub duplicates: u64,
}

pub async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Publishes every message with at most `in_flight_max` acks outstanding; a message whose
/// publish or ack fails is sent again (the msg id dedups it). Bumps `progress` per ack.
pub async fn publish_bounded(
    js: &jetstream::Context,
    messages: impl IntoIterator<Item = Outgoing>,
    in_flight_max: usize,
    progress: Option<Arc<AtomicU64>>,
) -> Result<Published> {
    let mut in_flight: VecDeque<(Outgoing, u32, PublishAckFuture)> =
        VecDeque::with_capacity(in_flight_max);
    let mut acks = Acks {
        retry: VecDeque::new(),
        count: 0,
        duplicates: 0,
        progress,
    };
    let mut source = messages.into_iter();
    let mut first_publish = None;
    loop {
        let next = acks
            .retry
            .pop_front()
            .or_else(|| source.next().map(|message| (message, 0)));
        let Some((message, attempts)) = next else {
            let Some(oldest) = in_flight.pop_front() else {
                break;
            };
            acks.settle(oldest).await?;
            continue;
        };
        first_publish.get_or_insert_with(Instant::now);
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.msg_id);
        match js.send_publish(message.subject.clone(), publish).await {
            Ok(ack) => in_flight.push_back((message, attempts + 1, ack)),
            Err(error) => {
                if attempts + 1 >= PUBLISH_ATTEMPTS_MAX {
                    bail!(
                        "publish to {} failed {} times: {error}",
                        message.subject,
                        attempts + 1
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                acks.retry.push_back((message, attempts + 1));
            }
        }
        if in_flight.len() >= in_flight_max {
            if let Some(oldest) = in_flight.pop_front() {
                acks.settle(oldest).await?;
            }
        }
    }
    let now = Instant::now();
    Ok(Published {
        first_publish: first_publish.unwrap_or(now),
        last_ack: now,
        count: acks.count,
        duplicates: acks.duplicates,
    })
}

/// The acks [`publish_bounded`] has settled, and the messages to send again.
struct Acks {
    retry: VecDeque<(Outgoing, u32)>,
    count: u64,
    duplicates: u64,
    progress: Option<Arc<AtomicU64>>,
}

impl Acks {
    /// Awaits the ack of a message sent `attempts` times: counts it, or queues the message
    /// again, or fails after [`PUBLISH_ATTEMPTS_MAX`] attempts.
    async fn settle(
        &mut self,
        (message, attempts, ack): (Outgoing, u32, PublishAckFuture),
    ) -> Result<()> {
        match ack.await {
            Ok(ack) => {
                self.count += 1;
                self.duplicates += u64::from(ack.duplicate);
                if let Some(progress) = &self.progress {
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(error) if attempts < PUBLISH_ATTEMPTS_MAX => {
                eprintln!(
                    "    publish to {} not acked ({error}); sending it again",
                    message.subject
                );
                self.retry.push_back((message, attempts));
                Ok(())
            }
            Err(error) => bail!(
                "publish to {} not acked after {attempts} attempts: {error}",
                message.subject
            ),
        }
    }
}

pub fn traffic_start_ms() -> i64 {
    parse_rfc3339_ms(TRAFFIC_START).unwrap_or(0)
}

pub fn spec(customers: usize, seed: u64) -> GeneratorSpec {
    GeneratorSpec {
        customers,
        start_ms: traffic_start_ms(),
        days: TRAFFIC_DAYS,
        seed,
        duplicate_rate_percent: 0,
    }
}

/// The first `events` messages of generated multi-channel traffic (no duplicates), from a
/// population sized so that the generator's whole week yields about that many.
pub fn generated_traffic(events: u64, seed: u64) -> (Vec<Outgoing>, GeneratorSpec) {
    generated_traffic_split(events, seed, 0)
}

/// The generator of the sample traffic, `split_percent` of its people split in two
/// customers that a later `identify` links (`Generator::with_split_identities`; 0: none).
fn generator(spec: GeneratorSpec, split_percent: u8) -> Generator {
    Generator::new(spec)
        .with_split_identities(split_percent)
        .without_truth()
}

/// People of the probe that sizes a population (and estimates the share of links).
const PROBE_PEOPLE: usize = 2_000;

/// [`generated_traffic`] with `split_percent` of the people split (see [`generator`]).
pub fn generated_traffic_split(
    events: u64,
    seed: u64,
    split_percent: u8,
) -> (Vec<Outgoing>, GeneratorSpec) {
    let probe = generator(spec(PROBE_PEOPLE, seed), split_percent).count();
    let per_person = (probe as f64 / PROBE_PEOPLE as f64).max(0.1);
    let mut people = ((events as f64 / per_person) * 1.02).ceil() as usize;
    loop {
        let spec = spec(people.max(10), seed);
        let messages: Vec<Outgoing> = generator(spec.clone(), split_percent)
            .take(events as usize)
            .map(|event| Outgoing {
                subject: subjects::ingest(&event.channel),
                msg_id: event.event_id,
                payload: Bytes::from(event.payload),
            })
            .collect();
        if messages.len() as u64 >= events {
            return (messages, spec);
        }
        people = people * 3 / 2 + 10;
    }
}

/// The split percent expected to make `link_share` (0..1) of the events linking events,
/// and the share it is expected to make (less than asked when even a 100 % split links
/// fewer), from the probe population's events without splits and with every person split
/// (each split adds one event, the second customer's `identify`, and turns the `identify`
/// that links into a merge, so the difference counts the links of a 100 % split).
pub fn split_percent_for_link_share(seed: u64, link_share: f64) -> (u8, f64) {
    let plain = generator(spec(PROBE_PEOPLE, seed), 0).count() as u64;
    let all_split = generator(spec(PROBE_PEOPLE, seed), 100).count() as u64;
    let percent = split_percent_for(plain, all_split, link_share);
    let links = f64::from(percent) / 100.0 * all_split.saturating_sub(plain) as f64;
    let expected = links / (plain as f64 + links).max(1.0);
    (percent, crate::figures::round(expected, 4))
}

/// With `plain` events without splits and `all_split` with every person split, the percent
/// p (1 to 100) where links / events = `link_share`: links = p/100 * (all_split - plain),
/// events = plain + links, so p/100 = share * plain / ((all_split - plain) * (1 - share)).
/// 100 when even a full split yields fewer links than asked; 0 for a share of 0.
pub fn split_percent_for(plain: u64, all_split: u64, link_share: f64) -> u8 {
    if link_share <= 0.0 {
        return 0;
    }
    let links_at_full = all_split.saturating_sub(plain) as f64;
    if links_at_full <= 0.0 || link_share >= 1.0 {
        return 100;
    }
    let fraction = link_share * plain as f64 / (links_at_full * (1.0 - link_share));
    (fraction * 100.0).round().clamp(1.0, 100.0) as u8
}

/// Linking events over events, rounded to 4 decimals; 0 without events.
pub fn link_share(links: u64, events: u64) -> f64 {
    if events == 0 {
        return 0.0;
    }
    crate::figures::round(links as f64 / events as f64, 4)
}

/// Aborts a background task when the step that spawned it ends, however it ends (a step
/// that fails half-way must not leave a publisher running into the next one).
pub struct AbortOnDrop(tokio::task::AbortHandle);

impl AbortOnDrop {
    pub fn new<T>(task: &tokio::task::JoinHandle<T>) -> AbortOnDrop {
        AbortOnDrop(task.abort_handle())
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One `visit` of the new customer `bench-<i>` (the memory feed's event).
pub fn visit_of_new_customer(i: u64) -> Outgoing {
    let event_id = format!("m-{i}");
    let body = format!(
        r#"{{"v":1,"event_id":"{event_id}","type":"visit","occurred_at":"{}","identity":{{"customer_id":"bench-{i:09}"}}}}"#,
        format_rfc3339(traffic_start_ms() + i as i64)
    );
    Outgoing {
        subject: subjects::ingest("store"),
        msg_id: event_id,
        payload: Bytes::from(body),
    }
}

/// Publishes one `visit` per new customer (`bench-0` .. `bench-<customers - 1>`), bumping
/// `acked` per ack. The feed keeps at most FEED_BACKLOG_MAX events published but not
/// applied (the `applied` counter of `crm.node.stats`: one node), as a steady adapter
/// would, instead of dumping every customer into the ingest stream at once (a huge
/// backlog makes nats-server 2.9's filtered consumers slower).
pub fn spawn_customer_feed(
    client: &async_nats::Client,
    customers: u64,
    in_flight: usize,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<Published>> {
    let client = client.clone();
    let js = jetstream::new(client.clone());
    tokio::spawn(async move {
        let mut first_publish = None;
        let mut count = 0;
        let mut start = 0;
        while start < customers {
            loop {
                let applied = node_stats(&client).await?.metrics.applied;
                if acked.load(Ordering::Relaxed).saturating_sub(applied) <= FEED_BACKLOG_MAX {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let end = (start + FEED_CHUNK).min(customers);
            let published = publish_bounded(
                &js,
                (start..end).map(visit_of_new_customer),
                in_flight,
                Some(acked.clone()),
            )
            .await?;
            first_publish.get_or_insert(published.first_publish);
            count += published.count;
            start = end;
        }
        let now = Instant::now();
        Ok::<Published, anyhow::Error>(Published {
            first_publish: first_publish.unwrap_or(now),
            last_ack: now,
            count,
            duplicates: 0,
        })
    })
}

/// Publishes `messages` at `rate` per second until they run out or `stop`; PubAcks are
/// awaited by a second task so that they never hold the schedule back. Returns how many
/// were published and how many publishes or acks failed.
pub fn spawn_paced_load(
    js: jetstream::Context,
    messages: Vec<Outgoing>,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (ack_sender, mut ack_receiver) = tokio::sync::mpsc::channel::<PublishAckFuture>(4096);
        let acks = tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(ack) = ack_receiver.recv().await {
                if ack.await.is_err() {
                    failures += 1;
                }
            }
            failures
        });
        let interval = 1.0 / rate.max(1e-3);
        let start = Instant::now();
        let (mut published, mut failures) = (0u64, 0u64);
        for (index, message) in messages.into_iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let due = start + Duration::from_secs_f64(index as f64 * interval);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            let publish = PublishMessage::build()
                .payload(message.payload)
                .message_id(&message.msg_id);
            match js.send_publish(message.subject, publish).await {
                Ok(ack) => {
                    published += 1;
                    if ack_sender.send(ack).await.is_err() {
                        break;
                    }
                }
                Err(_) => failures += 1,
            }
        }
        drop(ack_sender);
        failures += acks.await.unwrap_or(0);
        (published, failures)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_percent_solves_links_over_events_for_the_share() {
        // 1,000 events without splits, 1,200 with everyone split: 200 links at 100 %.
        // 5 %: p/100 * 200 = 0.05 * (1000 + p/100 * 200) -> p = 26.3 %.
        assert_eq!(split_percent_for(1_000, 1_200, 0.05), 26);
        let p = f64::from(split_percent_for(1_000, 1_200, 0.05)) / 100.0;
        let share = p * 200.0 / (1_000.0 + p * 200.0);
        assert!((share - 0.05).abs() < 0.002, "{share}");
    }

    #[test]
    fn the_split_percent_is_bounded() {
        assert_eq!(split_percent_for(1_000, 1_010, 0.05), 100, "too few links");
        assert_eq!(
            split_percent_for(1_000, 1_000, 0.05),
            100,
            "no links at all"
        );
        assert_eq!(
            split_percent_for(1_000, 900_000, 0.05),
            1,
            "at least one percent"
        );
        assert_eq!(
            split_percent_for(1_000, 1_200, 0.0),
            0,
            "no share, no split"
        );
    }

    #[test]
    fn the_link_share_is_links_over_events() {
        assert_eq!(link_share(50, 1_000), 0.05);
        assert_eq!(link_share(1, 3), 0.3333);
        assert_eq!(link_share(5, 0), 0.0);
    }

    #[test]
    fn split_traffic_has_more_events_per_person_and_other_ids() {
        let plain = generator(spec(200, 7), 0).count();
        let split = generator(spec(200, 7), 100).count();
        assert!(split > plain, "{split} <= {plain}");
        let (traffic, _) = generated_traffic_split(500, 7, 20);
        assert_eq!(traffic.len(), 500);
        let (plain_traffic, _) = generated_traffic(500, 7);
        assert_ne!(traffic[0].msg_id, plain_traffic[0].msg_id);
    }
}
