//! A ready-made test environment: a private `nats-server`, a config file and one `crm-node`
//! in a temporary directory, plus the async client helpers the integration tests share
//! (generating sample traffic, publishing like an adapter, waiting until every log is
//! drained, querying).

use crate::nats_server::NatsServer;
use crate::node_process::NodeProcess;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use crm_node::loadgen::{GeneratedEvent, Generator, GeneratorSpec, PersonTruth, Truth};
use crm_node::metrics::NodeStats;
use crm_node::subjects;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a node may take to become ready in tests.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of a test node's config.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub shards: u32,
    /// Rules file (absolute path).
    pub rules: PathBuf,
    /// Extra lines appended to the `[limits]` section.
    pub limits: String,
    /// Extra lines appended to the `[cluster]` section.
    pub cluster: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            shards: 8,
            rules: fixture("rules-e2e.toml"),
            limits: String::new(),
            cluster: String::new(),
        }
    }
}

pub use crate::paths::{fixture, repo_file};

/// Stream settings for tests that set JetStream up directly: the defaults with small size
/// caps, because nats-server reserves each cap on disk when it creates the stream and the
/// defaults (39 GiB in all) need more free disk than a test machine may have.
pub fn test_stream_settings() -> crm_node::jetstream::StreamSettings {
    const MIB: u64 = 1024 * 1024;
    let mut settings = crm_node::jetstream::StreamSettings::default();
    settings.ingest.max_bytes = 256 * MIB;
    settings.shards.max_bytes = 1024 * MIB;
    settings.events.max_bytes = 256 * MIB;
    settings.dlq.max_bytes = 64 * MIB;
    settings.snapshots.max_bytes = 1024 * MIB;
    settings.audit.max_bytes = 64 * MIB;
    settings
}

/// Writes a node config into `dir` and returns its path.
pub fn write_config(dir: &Path, node_id: &str, nats_url: &str, options: &NodeOptions) -> PathBuf {
    let data_dir = dir.join(node_id);
    let text = format!(
        r#"[node]
node_id = "{node_id}"
data_dir = "{data}"

[nats]
url = "{nats_url}"
connect_retry_initial_ms = 100
connect_retry_max_ms = 1000

[cluster]
name = "crm-test"
shards = {shards}
identity_secret = "integration-test-secret-0123456789"
# Small stream caps: nats-server reserves each cap on disk at create, and a test machine's
# free disk need not hold the production defaults.
ingest_max_bytes = 268435456
events_max_bytes = 268435456
dlq_max_bytes = 67108864
shard_log_max_bytes = 1073741824
snapshot_max_bytes = 1073741824
{cluster}

[limits]
tick_interval_s = 0
ack_wait_s = 5
{limits}

[rules]
path = "{rules}"
"#,
        data = data_dir.display(),
        shards = options.shards,
        limits = options.limits,
        cluster = options.cluster,
        rules = options.rules.display(),
    );
    let path = dir.join(format!("{node_id}.toml"));
    std::fs::write(&path, text).expect("config written");
    path
}

/// A NATS server and one node, in a temporary directory; everything stops on drop.
pub struct TestEnv {
    pub node: NodeProcess,
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub options: NodeOptions,
}

impl TestEnv {
    pub fn start(options: NodeOptions) -> TestEnv {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = write_config(dir.path(), "node-1", &nats.url(), &options);
        let node = NodeProcess::start(&config, &nats.url(), NODE_READY_TIMEOUT);
        TestEnv {
            node,
            nats,
            dir,
            options,
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        connect(&self.nats.url()).await
    }
}

/// A client that keeps reconnecting (tests restart servers under it); `url` may list
/// several servers separated by commas.
pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .max_reconnects(None)
        // Shown with --nocapture: when a test's own connection moved between servers.
        .event_callback(|event| async move {
            eprintln!("{}: test client: {event}", crm_node::cluster::wall_ms())
        })
        .connect(crm_node::config::nats_urls(url))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// One event to publish like an adapter: channel, `Nats-Msg-Id`, body.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub channel: String,
    pub event_id: String,
    pub payload: Vec<u8>,
}

impl From<GeneratedEvent> for Outgoing {
    fn from(event: GeneratedEvent) -> Outgoing {
        Outgoing {
            channel: event.channel,
            event_id: event.event_id,
            payload: event.payload,
        }
    }
}

/// The spec of the sample traffic the tests publish: `customers` people over `days` days
/// from `start` (RFC 3339), 5 % of the events sent twice.
pub fn traffic_spec(start: &str, customers: usize, days: u32, seed: u64) -> GeneratorSpec {
    GeneratorSpec {
        customers,
        start_ms: crm_actors::time::parse_rfc3339_ms(start).expect("start"),
        days,
        seed,
        duplicate_rate_percent: 5,
    }
}

/// Every event of `generator`, as an adapter publishes them.
pub fn outgoing_events(generator: &mut Generator) -> Vec<Outgoing> {
    generator.by_ref().map(Outgoing::from).collect()
}

/// The sample traffic of `spec` and its ground truth.
pub fn generated_traffic(spec: GeneratorSpec) -> (Vec<Outgoing>, Truth) {
    let mut generator = Generator::new(spec);
    let events = outgoing_events(&mut generator);
    (events, generator.into_truth())
}

/// The identity a query finds a generated person by (their first identifier).
pub fn identity_of(person: &PersonTruth) -> Value {
    let identity = &person.identities[0];
    json!({ identity.kind.as_str(): identity.value })
}

/// Publishes every event with JetStream, at most `in_flight_max` unacked, and retries any
/// publish that is not acked (as an adapter must) until `deadline`. Returns how many acks
/// said `duplicate`.
pub async fn publish_all(
    client: &async_nats::Client,
    events: impl IntoIterator<Item = Outgoing>,
    in_flight_max: usize,
    deadline: Duration,
) -> u64 {
    let js = jetstream::new(client.clone());
    let until = Instant::now() + deadline;
    let mut in_flight: VecDeque<(Outgoing, AckTask)> = VecDeque::new();
    let mut duplicates = 0;
    let mut retry: VecDeque<Outgoing> = VecDeque::new();
    let mut source = events.into_iter();
    loop {
        let next = retry.pop_front().or_else(|| source.next());
        let Some(event) = next else {
            if in_flight.is_empty() {
                return duplicates;
            }
            let (event, ack) = in_flight.pop_front().expect("not empty");
            settle(event, ack, &mut duplicates, &mut retry, until).await;
            continue;
        };
        let publish = PublishMessage::build()
            .payload(event.payload.clone().into())
            .message_id(&event.event_id);
        match js
            .send_publish(subjects::ingest(&event.channel), publish)
            .await
        {
            Ok(ack) => in_flight.push_back((event, ack_task(ack))),
            Err(_) => {
                assert!(
                    Instant::now() < until,
                    "publishing did not succeed before the deadline"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                retry.push_back(event);
            }
        }
        if in_flight.len() >= in_flight_max {
            let (event, ack) = in_flight.pop_front().expect("not empty");
            settle(event, ack, &mut duplicates, &mut retry, until).await;
        }
    }
}

/// Publishes `events` at about `per_second` (in tenths of a second), each slice through
/// [`publish_all`]: continuous load while a test kills, adds and drains nodes.
pub async fn publish_paced(
    client: &async_nats::Client,
    events: Vec<Outgoing>,
    per_second: usize,
    deadline: Duration,
) {
    let slice = (per_second / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in events.chunks(slice) {
        tick.tick().await;
        publish_all(client, chunk.to_vec(), slice, deadline).await;
    }
}

/// A publish ack awaited by a task of its own.
type AckTask = tokio::task::JoinHandle<Result<PublishAck, PublishError>>;

/// Starts awaiting `ack` at once: async-nats starts an ack's timeout only when the ack is
/// awaited, so acks awaited one after the other that never come (a NATS server died) would
/// each wait out the timeout in turn, minutes for a few dozen.
fn ack_task(ack: PublishAckFuture) -> AckTask {
    tokio::spawn(ack.into_future())
}

async fn settle(
    event: Outgoing,
    ack: AckTask,
    duplicates: &mut u64,
    retry: &mut VecDeque<Outgoing>,
    until: Instant,
) {
    match ack.await.expect("ack task") {
        Ok(ack) => *duplicates += u64::from(ack.duplicate),
        Err(error) => {
            assert!(
                Instant::now() < until,
                "publishing did not succeed before the deadline"
            );
            eprintln!(
                "{}: publish of {} not acked: {error}",
                crm_node::cluster::wall_ms(),
                event.event_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            retry.push_back(event);
        }
    }
}

/// Waits until the router has nothing pending or unacked and every shard's applied
/// sequence (from `crm.node.stats`) has reached the last record of its shard log.
pub async fn wait_drained(client: &async_nats::Client, shards: u32, timeout: Duration) {
    let until = Instant::now() + timeout;
    let mut quiet_rounds = 0;
    loop {
        let busy = busy_logs(client, shards).await;
        if busy.is_empty() {
            quiet_rounds += 1;
            if quiet_rounds >= 2 {
                return;
            }
        } else {
            quiet_rounds = 0;
        }
        assert!(
            Instant::now() < until,
            "logs not drained within {timeout:?}: {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the router's durable consumer still holds (`None`: nothing pending or unacked).
pub async fn router_busy(js: &jetstream::Context) -> Option<String> {
    let ingest = async {
        let stream = js.get_stream(subjects::INGEST_STREAM).await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(subjects::INGEST_DURABLE).await.ok()?;
        consumer.info().await.ok().cloned()
    }
    .await;
    match ingest {
        Some(info) if info.num_pending == 0 && info.num_ack_pending == 0 => None,
        Some(info) => Some(format!(
            "router: {} pending, {} unacked",
            info.num_pending, info.num_ack_pending
        )),
        None => Some("router consumer not readable yet".to_string()),
    }
}

/// What is still pending: the router's consumer, and shards whose log is ahead of the
/// node's applied sequence. Empty when everything is applied.
pub async fn busy_logs(client: &async_nats::Client, shards: u32) -> Vec<String> {
    let js = jetstream::new(client.clone());
    let mut busy: Vec<String> = router_busy(&js).await.into_iter().collect();
    let stats = match tokio::time::timeout(
        Duration::from_secs(2),
        client.request(subjects::NODE_STATS, "{}".into()),
    )
    .await
    {
        Ok(Ok(reply)) => match serde_json::from_slice::<NodeStats>(&reply.payload) {
            Ok(stats) => stats,
            Err(error) => {
                busy.push(format!("crm.node.stats reply not readable: {error}"));
                return busy;
            }
        },
        _ => {
            busy.push("no node answers crm.node.stats".to_string());
            return busy;
        }
    };
    let Ok(stream) = js.get_stream(subjects::SHARDS_STREAM).await else {
        busy.push("shard log not readable".to_string());
        return busy;
    };
    for shard in 0..shards {
        let last = stream
            .get_last_raw_message_by_subject(&subjects::shard(shard))
            .await
            .map(|m| m.sequence)
            .unwrap_or(0);
        let applied = stats.applied_seq(shard as usize);
        if applied < last {
            busy.push(format!("shard {shard}: applied {applied} of {last}"));
        }
    }
    busy
}

/// Where each purchase's `order_id` first arrived in `CRM_INGEST` (its stream sequence).
///
/// A publisher that retries a failed publish (as adapters do while NATS restarts) can land a
/// customer's purchases in another order than their event times; the engine grants the
/// first-purchase bonus to the first purchase it applies, in log order, so an exact oracle
/// orders purchases by arrival, not by event time.
pub async fn purchase_arrivals(client: &async_nats::Client) -> HashMap<String, u64> {
    let mut arrivals = HashMap::new();
    for (sequence, payload) in read_stream(client, subjects::INGEST_STREAM).await {
        if let Ok(body) = serde_json::from_slice::<Value>(&payload) {
            if body["type"] == "purchase" {
                if let Some(order_id) = body["order_id"].as_str() {
                    arrivals.entry(order_id.to_string()).or_insert(sequence);
                }
            }
        }
    }
    arrivals
}

/// Every message of `stream` as (stream sequence, payload), in order, read with an ordered
/// consumer. A read that fails (JetStream not answering, e.g. while a NATS cluster elects
/// new leaders after losing a server) starts over, for up to [`READ_STREAM_TIMEOUT`].
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<(u64, bytes::Bytes)> {
    let deadline = Instant::now() + READ_STREAM_TIMEOUT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_read_stream(client, stream).await {
            Ok(read) => return read,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "{stream}: not read within {READ_STREAM_TIMEOUT:?} ({attempt} attempts); last error: {error}"
                );
                eprintln!("reading {stream} failed ({error}); reading again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// How long [`read_stream`] keeps trying.
pub const READ_STREAM_TIMEOUT: Duration = Duration::from_secs(120);

async fn try_read_stream(
    client: &async_nats::Client,
    stream: &str,
) -> Result<Vec<(u64, bytes::Bytes)>, String> {
    let js = jetstream::new(client.clone());
    let handle = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream info: {e}"))?;
    let mut consumer = crm_node::jetstream::create_with_retries(3, || {
        handle.create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
    })
    .await
    .map_err(|e| format!("ordered consumer: {e}"))?;
    let mut read = Vec::new();
    let info = consumer
        .info()
        .await
        .map_err(|e| format!("consumer info: {e}"))?;
    if info.num_pending == 0 {
        return Ok(read);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("messages: {e}"))?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| "no message for 30 s".to_string())?
            .ok_or_else(|| "the consumer ended".to_string())?
            .map_err(|e| format!("message: {e}"))?;
        let info = message.info().map_err(|e| format!("JetStream info: {e}"))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        read.push((sequence, message.payload.clone()));
        if pending == 0 {
            return Ok(read);
        }
    }
}

/// Points under tests/fixtures/rules-e2e.toml, computed from the ground truth alone:
/// floor(amount × channel multiplier) per order (mobile 2×, else 1×), +100 on the first
/// order to arrive (`arrivals`: order id -> first sequence in `CRM_INGEST`), returns take
/// back floor(granted × returned so far / amount) cumulatively.
pub fn expected_points(person: &PersonTruth, arrivals: &HashMap<String, u64>) -> i64 {
    let mut granted: BTreeMap<&str, (i64, i64)> = BTreeMap::new(); // order -> (points, amount)
    let mut purchases: Vec<_> = person.purchases.iter().collect();
    purchases.sort_by_key(|p| {
        let arrived = arrivals.get(&p.order_id).copied();
        (arrived.unwrap_or(u64::MAX), p.occurred_at_ms)
    });
    for (index, purchase) in purchases.iter().enumerate() {
        let multiplier = if purchase.channel == "mobile" { 2 } else { 1 };
        let mut points = purchase.amount_minor * multiplier / 100;
        if index == 0 {
            points += 100;
        }
        granted.insert(&purchase.order_id, (points, purchase.amount_minor));
    }
    let mut returned: BTreeMap<&str, i64> = BTreeMap::new();
    let mut reversed_total = 0;
    let mut returns: Vec<_> = person.returns.iter().collect();
    returns.sort_by_key(|r| r.occurred_at_ms);
    for ret in returns {
        let (points, amount) = granted[ret.order_id.as_str()];
        let before = returned.get(ret.order_id.as_str()).copied().unwrap_or(0);
        let after = before + ret.amount_minor;
        returned.insert(&ret.order_id, after);
        let target_before = (points * before / amount).min(points);
        let target_after = (points * after / amount).min(points);
        reversed_total += target_after - target_before;
    }
    granted.values().map(|(p, _)| p).sum::<i64>() - reversed_total
}

/// Sends a request and parses the JSON reply (retrying while no node answers yet).
pub async fn request(client: &async_nats::Client, subject: &str, body: &Value) -> Value {
    let payload = serde_json::to_vec(body).expect("json");
    for _ in 0..50 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject.to_string(), payload.clone().into()),
        )
        .await
        {
            Ok(Ok(reply)) => return serde_json::from_slice(&reply.payload).expect("reply is JSON"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    panic!("no reply on {subject} for {body}");
}

/// The 360 view of the customer with `identity` (`{"email": ...}`).
pub async fn view(client: &async_nats::Client, identity: Value) -> Value {
    request(
        client,
        subjects::QUERY_CUSTOMER,
        &serde_json::json!({"identity": identity}),
    )
    .await
}

/// Decimal JSON money as minor units (exact for two-decimal values).
pub fn minor(value: &Value) -> i64 {
    crm_actors::money::minor_from_json(value)
        .unwrap_or_else(|e| panic!("{value} is not money: {e}"))
}

/// Asserts that every buyer of `truth` has, in their 360 view, exactly the purchase count,
/// gross spend, return count and returned total of the ground truth (a lost or doubled event
/// changes one of them), and, where `expected_points` gives a balance, that balance with
/// nothing pending. Returns how many buyers were checked.
pub async fn assert_buyers_exact(
    client: &async_nats::Client,
    truth: &Truth,
    expected_points: impl Fn(&PersonTruth) -> Option<i64>,
) -> usize {
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (index, person) in truth.people.iter().enumerate() {
        if person.purchases.is_empty() {
            continue;
        }
        let view = view(client, identity_of(person)).await;
        let points = expected_points(person);
        let got = (
            view["purchases"]["count"].as_u64().unwrap_or(u64::MAX) as usize,
            minor(&view["purchases"]["total_spend"]),
            view["returns"]["count"].as_u64().unwrap_or(u64::MAX) as usize,
            minor(&view["returns"]["total"]),
            points.map(|_| {
                (
                    view["loyalty"]["points_balance"]
                        .as_i64()
                        .unwrap_or(i64::MIN),
                    view["loyalty"]["points_pending"]
                        .as_i64()
                        .unwrap_or(i64::MIN),
                )
            }),
        );
        let want = (
            person.purchases.len(),
            person.gross_spend_minor(),
            person.returns.len(),
            person.returned_minor(),
            points.map(|balance| (balance, 0)),
        );
        if got != want {
            mismatches.push(format!("person {index}: got {got:?}, want {want:?}"));
        }
        checked += 1;
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked} customers differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    checked
}

/// The shard snapshot store of a private server (its streams and the snapshot bucket set
/// up), with small pieces so that a snapshot of a few customers takes several, and the
/// JetStream context it uses.
pub async fn test_snapshots(
    server: &NatsServer,
) -> (crm_node::cluster::snapshot::Snapshots, jetstream::Context) {
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client);
    crm_node::jetstream::ensure_streams(&js, &test_stream_settings())
        .await
        .expect("streams");
    let kv = crm_node::jetstream::ensure_kv(&js, subjects::KV_SNAPSHOTS, 1)
        .await
        .expect("bucket");
    let snapshots = crm_node::cluster::snapshot::Snapshots {
        jetstream: js.clone(),
        kv,
        piece_bytes: 200,
    };
    (snapshots, js)
}
