//! Helpers shared by the integration tests that drive one node with hand-written events:
//! starting a small node with a rules fixture, building and sending adapter events, watching
//! actor events live on `crm.events.>` ([`EventLog`]) and reading them back from
//! `CRM_EVENTS`, and publishing raw messages and reading `CRM_DLQ` (dead letters).

use crate::cluster_env::{
    fixture, publish_all, view, wait_drained, NodeOptions, Outgoing, TestEnv,
};
use async_nats::jetstream::{self, message::PublishMessage};
use crm_node::dead_letters::{DeadLetterHeaders, DeadLetterHeadersError};
use crm_node::subjects;
use futures::StreamExt;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shards of the node [`start_env`] starts.
pub const SHARDS: u32 = 4;
/// Bound on [`send`] waiting until every log is applied.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on [`send`] getting every publish acked.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on waiting for actor events ([`EventLog::wait_for`], [`replay_events`]).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on waiting for dead letters ([`wait_for_dead_letters`]; they normally take
/// milliseconds).
pub const DLQ_TIMEOUT: Duration = Duration::from_secs(60);

/// A NATS server and a node with [`SHARDS`] shards and the rules of `tests/fixtures/<rules>`.
pub fn start_env(rules: &str) -> TestEnv {
    TestEnv::start(NodeOptions {
        shards: SHARDS,
        rules: fixture(rules),
        ..NodeOptions::default()
    })
}

/// Actor events seen on a core subscription to `crm.events.>` (subject, body).
pub struct EventLog {
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    /// Subscribes before the test acts; the flush makes sure the server has the interest.
    pub async fn start(client: &async_nats::Client) -> EventLog {
        let mut subscription = client
            .subscribe(subjects::EVENTS_ALL)
            .await
            .expect("subscribe to crm.events.>");
        client.flush().await.expect("flush the subscription");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let body: Value = serde_json::from_slice(&message.payload)
                    .unwrap_or_else(|e| panic!("actor event is not JSON ({e}): {message:?}"));
                sink.lock()
                    .unwrap()
                    .push((message.subject.to_string(), body));
            }
        });
        EventLog { seen, task }
    }

    /// Events of `customer_id` with type `event_type`, in arrival order.
    pub fn of(&self, customer_id: &str, event_type: &str) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["customer_id"] == customer_id && e["type"] == event_type)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Types of every event of `customer_id`, in arrival order.
    pub fn types_of(&self, customer_id: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["customer_id"] == customer_id)
            .map(|(_, e)| e["type"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// Waits until at least `count` events of that type for that customer have arrived.
    pub async fn wait_for(&self, customer_id: &str, event_type: &str, count: usize) -> Vec<Value> {
        let until = Instant::now() + EVENT_TIMEOUT;
        loop {
            let found = self.of(customer_id, event_type);
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < until,
                "expected {count} {event_type} for {customer_id}, got {}; all events of the customer: {:?}",
                found.len(),
                self.types_of(customer_id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every subject an event arrived on, checked against the documented pattern.
    pub fn assert_subjects(&self) {
        for (subject, event) in self.seen.lock().unwrap().iter() {
            let want = format!(
                "crm.events.{}.{}",
                event["type"].as_str().unwrap(),
                event["customer_id"].as_str().unwrap()
            );
            assert_eq!(
                subject, &want,
                "event published on the wrong subject: {event}"
            );
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One adapter event on `channel` (its `event_id` is the `Nats-Msg-Id`).
pub fn outgoing(channel: &str, event: Value) -> Outgoing {
    Outgoing {
        channel: channel.to_string(),
        event_id: event["event_id"].as_str().expect("event_id").to_string(),
        payload: serde_json::to_vec(&event).expect("json"),
    }
}

/// Publishes like an adapter and waits until every log of a [`start_env`] node is applied.
/// Returns how many acks said duplicate.
pub async fn send(client: &async_nats::Client, events: Vec<Outgoing>) -> u64 {
    let duplicates = publish_all(client, events, 64, PUBLISH_DEADLINE).await;
    wait_drained(client, SHARDS, DRAIN_TIMEOUT).await;
    duplicates
}

/// The view of the customer with `identity`, asserting it exists.
pub async fn view_of(client: &async_nats::Client, identity: Value) -> Value {
    let view = view(client, identity.clone()).await;
    assert!(view.get("error").is_none(), "query for {identity}: {view}");
    view
}

/// Every actor event in `CRM_EVENTS` on subjects matching `filter` (subject, body), from the
/// start, read the way a dashboard replays them: an ordered (ephemeral) consumer with one
/// filter.
pub async fn replay_events(client: &async_nats::Client, filter: &str) -> Vec<(String, Value)> {
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("CRM_EVENTS exists");
    let mut consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer on CRM_EVENTS");
    let pending = consumer.info().await.expect("consumer info").num_pending;
    let mut events = Vec::new();
    if pending == 0 {
        return events;
    }
    let mut messages = consumer.messages().await.expect("messages");
    while let Some(message) = tokio::time::timeout(EVENT_TIMEOUT, messages.next())
        .await
        .expect("CRM_EVENTS read")
    {
        let message = message.expect("CRM_EVENTS message");
        events.push((
            message.subject.to_string(),
            serde_json::from_slice(&message.payload).expect("stored event is JSON"),
        ));
        if message.info().expect("JetStream info").pending == 0 {
            break;
        }
    }
    events
}

/// Publishes one message like an adapter (asserting it is not taken for a duplicate);
/// returns its sequence in `CRM_INGEST`.
pub async fn publish(
    js: &jetstream::Context,
    channel: &str,
    msg_id: &str,
    body: impl AsRef<[u8]>,
) -> u64 {
    let ack = js
        .send_publish(
            subjects::ingest(channel),
            PublishMessage::build()
                .payload(body.as_ref().to_vec().into())
                .message_id(msg_id),
        )
        .await
        .unwrap_or_else(|e| panic!("publish of {msg_id} failed: {e}"))
        .await
        .unwrap_or_else(|e| panic!("publish of {msg_id} not acked: {e}"));
    assert!(!ack.duplicate, "{msg_id} was taken for a duplicate");
    ack.sequence
}

/// A dead letter read back from `CRM_DLQ`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub subject: String,
    pub body: Vec<u8>,
    /// Its headers, read with [`DeadLetterHeaders::from_headers`] (an error when one is
    /// missing or malformed: then the four fields below are `None`).
    pub headers: Result<DeadLetterHeaders, DeadLetterHeadersError>,
    /// `Crm-Reason`.
    pub reason: Option<String>,
    /// `Crm-Message`.
    pub message: Option<String>,
    /// `Crm-Source-Subject`.
    pub source_subject: Option<String>,
    /// `Crm-Source-Sequence`, as text.
    pub source_sequence: Option<String>,
}

impl DeadLetter {
    /// The dead letter of `subject`, `body` and its NATS headers.
    pub fn read(subject: String, body: Vec<u8>, headers: &async_nats::HeaderMap) -> Self {
        let headers = DeadLetterHeaders::from_headers(headers);
        let known = headers.as_ref().ok();
        DeadLetter {
            subject,
            body,
            reason: known.map(|h| h.reason.clone()),
            message: known.map(|h| h.message.clone()),
            source_subject: known.map(|h| h.source_subject.clone()),
            source_sequence: known.map(|h| h.source_sequence.to_string()),
            headers,
        }
    }

    /// One line with the subject, the headers and the body, for failure messages.
    pub fn describe(&self) -> String {
        let headers = match &self.headers {
            Ok(headers) => format!(
                "reason={:?} message={:?} source={:?}#{}{}",
                headers.reason,
                headers.message,
                headers.source_subject,
                headers.source_sequence,
                headers
                    .truncated
                    .map(|length| format!(" truncated={length}"))
                    .unwrap_or_default()
            ),
            Err(error) => format!("headers not readable: {error}"),
        };
        format!(
            "{} {headers} body={}",
            self.subject,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Every message in `CRM_DLQ`.
pub async fn dead_letters(js: &jetstream::Context) -> Vec<DeadLetter> {
    let mut stream = js
        .get_stream(subjects::DLQ_STREAM)
        .await
        .expect("the CRM_DLQ stream exists");
    let state = stream.info().await.expect("CRM_DLQ info").state.clone();
    let mut letters = Vec::new();
    for sequence in state.first_sequence.max(1)..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        letters.push(DeadLetter::read(
            message.subject.to_string(),
            message.payload.to_vec(),
            &message.headers,
        ));
    }
    letters
}

/// Waits until `CRM_DLQ` holds at least `count` messages (or [`DLQ_TIMEOUT`] passes), then
/// returns them all.
pub async fn wait_for_dead_letters(js: &jetstream::Context, count: usize) -> Vec<DeadLetter> {
    let until = Instant::now() + DLQ_TIMEOUT;
    loop {
        let letters = dead_letters(js).await;
        if letters.len() >= count || Instant::now() >= until {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
