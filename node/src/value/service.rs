//! Customer value in the cluster: the on-demand fit (`crm.cmd.value.fit`) and the
//! hand-over of each published model to the shard logs.
//!
//! A fit request reaches one node (queue group). That node gathers the purchase-day
//! summaries of every customer from the owners of all shards (scatter/gather on
//! [`subjects::VALUE_COLLECT`]: each node reads the shards it serves from sled and answers
//! with identical summaries aggregated, in chunks), has `crm_actors::value::live` fit
//! the models and cut points, and publishes the result as JSON under
//! [`subjects::VALUE_MODEL_KEY`] in the KV bucket [`subjects::KV_VALUE`], its version one
//! above the last (compare-and-set, so two fits never publish one version twice). Every node
//! watches that key and appends each new model to the logs of the shards it serves
//! ([`append_models`]); the shard engines apply it in log order, so views carry the `value`
//! block and customers whose segment changed or who fell at risk raise actor events, and a
//! replay reproduces all of it. No rule lives here.

use crate::api::query::error_reply;
use crate::backoff::Backoff;
use crate::shard::worker::ShardTable;
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use async_nats::Client;
use crm_actors::codec;
use crm_actors::shard_message::ShardMessage;
use crm_actors::store::Store;
use crm_actors::value::live::{self, FitRequest, ValueModel};
use crm_actors::value::{ClvSettings, CustomerSummary, TimeUnit};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tracing::{info, warn};

/// Queue group of the fit responder.
pub const QUEUE_GROUP: &str = "crm-value";

/// Attempts at publishing a version when other fits publish at the same time.
const PUBLISH_ATTEMPTS_MAX: usize = 5;

/// What the fit responder needs.
#[derive(Clone)]
pub struct ValueService {
    pub client: Client,
    pub kv: kv::Store,
    pub store: Store,
    pub shard_count: u32,
    /// Indexed by shard number; `None` where this node does not serve the shard.
    pub table: ShardTable,
    pub node_id: String,
}

impl ValueService {
    /// Answers fit requests until shutdown, one at a time (a fit uses a whole core).
    pub async fn serve(self, mut shutdown: Shutdown) {
        let mut requests = match self
            .client
            .queue_subscribe(subjects::CMD_VALUE_FIT, QUEUE_GROUP.to_string())
            .await
        {
            Ok(subscription) => subscription,
            Err(error) => {
                warn!(%error, "value fit responder could not subscribe");
                return;
            }
        };
        while let Some(message) = next_message(&mut requests, &mut shutdown).await {
            let reply = self.fit(&message.payload).await;
            if let Some(inbox) = message.reply {
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(error) = self.client.publish(inbox, body.into()).await {
                    warn!(%error, "value fit reply not sent");
                }
            }
        }
    }

    /// Answers one fit request body: the published model, or an error reply.
    pub async fn fit(&self, body: &[u8]) -> Value {
        let request = match self.parse_request(body) {
            Ok(request) => request,
            Err(reply) => return reply,
        };
        let summaries = match self.collect(request).await {
            Ok(summaries) => summaries,
            Err(reply) => return reply,
        };
        // The fit does not depend on the version: fit once, number it at publication.
        let fitted =
            tokio::task::spawn_blocking(move || live::fit_value_model(&summaries, request, 0))
                .await;
        let mut model = match fitted {
            Ok(Ok(model)) => model,
            Ok(Err(error)) => return error_reply("fit_failed", error.to_string()),
            Err(error) => return error_reply("internal", error.to_string()),
        };
        for _ in 0..PUBLISH_ATTEMPTS_MAX {
            let (version, revision) = match self.current().await {
                Ok(Some((current, revision))) => (current.version + 1, Some(revision)),
                Ok(None) => (1, None),
                Err(reply) => return reply,
            };
            model.version = version;
            let body = match serde_json::to_vec(&model) {
                Ok(body) => body,
                Err(error) => return error_reply("internal", error.to_string()),
            };
            let published = match revision {
                Some(revision) => self
                    .kv
                    .update(subjects::VALUE_MODEL_KEY, body.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .kv
                    .create(subjects::VALUE_MODEL_KEY, body.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match published {
                Ok(()) => {
                    info!(
                        version,
                        customers = model.customers,
                        as_of = %model.as_of,
                        "customer-value model published"
                    );
                    return serde_json::to_value(&model).unwrap_or(Value::Null);
                }
                // Another fit published meanwhile: take the next version.
                Err(error) => warn!(%error, version, "value model version taken; retrying"),
            }
        }
        error_reply(
            "busy",
            "other fits kept publishing at the same time; ask again",
        )
    }

    /// Fits every `interval` (the first after one interval), unless a model younger than
    /// half the interval is already published (another node's turn), until shutdown.
    pub async fn run_schedule(self, interval: Duration, mut shutdown: Shutdown) {
        let mut timer = tokio::time::interval(interval);
        timer.tick().await;
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                _ = shutdown.wait() => return,
            }
            let fresh = match self.kv.entry(subjects::VALUE_MODEL_KEY).await {
                Ok(Some(entry)) => {
                    let age = time::OffsetDateTime::now_utc() - entry.created;
                    age < time::Duration::try_from(interval / 2).unwrap_or(time::Duration::ZERO)
                }
                _ => false,
            };
            if fresh {
                continue;
            }
            let reply = self.fit(b"{}").await;
            match reply.get("error") {
                None => {
                    info!(version = %reply["version"], "scheduled customer-value fit published")
                }
                Some(error) => {
                    warn!(%error, "scheduled customer-value fit failed; next interval retries")
                }
            }
        }
    }

    /// Gathers the summaries of every shard of the cluster: asks every node on
    /// [`subjects::VALUE_COLLECT`] and reads their chunks until the shards they cover are
    /// all the cluster's shards. A node's answer counts once it is complete and covers no
    /// shard already covered (a shard that moved meanwhile may be answered twice). Shards
    /// still missing after [`COLLECT_ROUND`] without news are asked for again (a node that
    /// was starting, or a shard that was moving); after [`COLLECT_TIMEOUT`] the error names
    /// the missing shards. This node answers its own request like any other.
    async fn collect(&self, request: FitRequest) -> Result<Vec<(CustomerSummary, f64)>, Value> {
        let unavailable =
            |e: String| error_reply("unavailable", format!("cannot collect summaries: {e}"));
        let mut covered = vec![false; self.shard_count as usize];
        let mut summaries = Vec::new();
        let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
        while covered.iter().any(|c| !c) {
            let missing: Vec<u32> = (0..self.shard_count)
                .filter(|s| !covered[*s as usize])
                .collect();
            let inbox = self.client.new_inbox();
            let mut replies = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let ask = CollectRequest {
                as_of_day: request.as_of_day,
                weeks: request.unit == TimeUnit::Weeks,
                shards: Some(missing.clone()),
            };
            let body = serde_json::to_vec(&ask).unwrap_or_default();
            self.client
                .publish_with_reply(subjects::VALUE_COLLECT, inbox, body.into())
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            // This round's answers, per node: chunks received and rows so far.
            let mut received: HashMap<String, u32> = HashMap::new();
            let mut pending: HashMap<String, Vec<SummaryRow>> = HashMap::new();
            loop {
                let round_end = (tokio::time::Instant::now() + COLLECT_ROUND).min(deadline);
                let message = match tokio::time::timeout_at(round_end, replies.next()).await {
                    // A node still reading its store ([`with_keepalive`]): news, wait on.
                    Ok(Some(message)) if message.payload.is_empty() => continue,
                    Ok(Some(message)) => message,
                    _ if tokio::time::Instant::now() >= deadline => {
                        let missing: Vec<usize> =
                            (0..covered.len()).filter(|s| !covered[*s]).collect();
                        return Err(error_reply(
                            "unavailable",
                            format!(
                                "no summaries for shards {missing:?} within {} s; are their nodes up?",
                                COLLECT_TIMEOUT.as_secs()
                            ),
                        ));
                    }
                    // Quiet for a round: ask again for what is still missing.
                    _ => break,
                };
                let chunk: SummaryChunk = codec::decode(&message.payload).map_err(|error| {
                    error_reply(
                        "internal",
                        format!(
                            "a summary chunk does not decode ({error}); nodes of different versions?"
                        ),
                    )
                })?;
                check_chunk(&mut received, &chunk)
                    .map_err(|message| error_reply("unavailable", message))?;
                let rows = pending.entry(chunk.node_id.clone()).or_default();
                rows.extend(chunk.rows);
                if chunk.chunks.is_none() {
                    continue;
                }
                let rows = pending.remove(&chunk.node_id).unwrap_or_default();
                let fresh = chunk
                    .shards_done
                    .iter()
                    .all(|s| covered.get(*s as usize).is_some_and(|c| !c));
                if !fresh {
                    continue;
                }
                for row in &rows {
                    for _ in 0..row.count {
                        summaries.push((row.summary(), row.mean_spend));
                    }
                }
                for shard in chunk.shards_done {
                    covered[shard as usize] = true;
                }
                if covered.iter().all(|c| *c) {
                    break;
                }
            }
        }
        Ok(summaries)
    }

    /// Answers summary requests ([`subjects::VALUE_COLLECT`]) for the shards this node
    /// serves until shutdown: identical summaries aggregated, in chunks of at most
    /// [`CHUNK_ROWS_MAX`] rows, the last one naming the shards it covers.
    pub async fn serve_collect(self, mut shutdown: Shutdown) {
        let mut requests = match self.client.subscribe(subjects::VALUE_COLLECT).await {
            Ok(subscription) => subscription,
            Err(error) => {
                warn!(%error, "value summary responder could not subscribe");
                return;
            }
        };
        while let Some(message) = next_message(&mut requests, &mut shutdown).await {
            let Some(reply) = message.reply else { continue };
            let Ok(ask) = serde_json::from_slice::<CollectRequest>(&message.payload) else {
                warn!("malformed value summary request ignored");
                continue;
            };
            let unit = if ask.weeks {
                TimeUnit::Weeks
            } else {
                TimeUnit::Days
            };
            let store = self.store.clone();
            let served: Vec<u32> = self
                .table
                .served()
                .iter()
                .map(|h| h.shard)
                .filter(|s| ask.shards.as_ref().is_none_or(|wanted| wanted.contains(s)))
                .collect();
            if served.is_empty() {
                continue;
            }
            let count = self.shard_count;
            let served_set: std::collections::HashSet<u32> = served.iter().copied().collect();
            let read = tokio::task::spawn_blocking(move || {
                let owned = |customer_id: &str| served_set.contains(&shard_of(customer_id, count));
                crm_actors::engine::summaries_from_store(&store, ask.as_of_day, unit, owned)
                    .map(|summaries| aggregate(&summaries))
            });
            // Reading a large store takes longer than the collector's quiet round: tell it
            // this node is at work, or it would ask again and drop this answer's inbox.
            let client = self.client.clone();
            let inbox = reply.clone();
            let rows = with_keepalive(read, KEEPALIVE_EVERY, || {
                let client = client.clone();
                let inbox = inbox.clone();
                async move {
                    let _ = client.publish(inbox, bytes::Bytes::new()).await;
                }
            })
            .await;
            let rows = match rows {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(error)) => Err(error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            let rows = match rows {
                Ok(rows) => rows,
                Err(failure) => {
                    warn!(%failure, "value summaries not readable");
                    let chunk = SummaryChunk {
                        node_id: self.node_id.clone(),
                        index: 0,
                        rows: Vec::new(),
                        chunks: Some(1),
                        shards_done: Vec::new(),
                        failed: Some(failure),
                    };
                    let _ = self
                        .client
                        .publish(reply, codec::encode(&chunk).into())
                        .await;
                    continue;
                }
            };
            let mut chunks: Vec<Vec<SummaryRow>> = rows
                .chunks(CHUNK_ROWS_MAX)
                .map(<[SummaryRow]>::to_vec)
                .collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            let count = chunks.len();
            for (index, rows) in chunks.into_iter().enumerate() {
                let last = index + 1 == count;
                let chunk = SummaryChunk {
                    node_id: self.node_id.clone(),
                    index: index as u32,
                    rows,
                    chunks: last.then_some(count as u32),
                    shards_done: if last { served.clone() } else { Vec::new() },
                    failed: None,
                };
                if let Err(error) = self
                    .client
                    .publish(reply.clone(), codec::encode(&chunk).into())
                    .await
                {
                    warn!(%error, "value summary chunk not sent");
                    break;
                }
            }
        }
    }

    /// The published model and its KV revision, if any.
    async fn current(&self) -> Result<Option<(ValueModel, u64)>, Value> {
        let entry = self
            .kv
            .entry(subjects::VALUE_MODEL_KEY)
            .await
            .map_err(|e| error_reply("unavailable", format!("value model bucket: {e}")))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.value.is_empty() {
            return Ok(None);
        }
        let model: ValueModel = serde_json::from_slice(&entry.value).map_err(|e| {
            error_reply(
                "internal",
                format!("the published value model is not readable: {e}"),
            )
        })?;
        Ok(Some((model, entry.revision)))
    }

    fn parse_request(&self, body: &[u8]) -> Result<FitRequest, Value> {
        let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Default::default())
        } else {
            match serde_json::from_slice(body) {
                Ok(value @ Value::Object(_)) => value,
                _ => return Err(error_reply(
                    "bad_request",
                    "send a JSON object {\"as_of\": \"YYYY-MM-DD\", \"time_unit\": \"days\"|\"weeks\", \"horizon\": N, \"discount_rate\": R} (every field optional)",
                )),
            }
        };
        let as_of_day = match request.get("as_of") {
            None | Some(Value::Null) => self.latest_rule_day(),
            Some(Value::String(text)) => parse_day(text).ok_or_else(|| {
                error_reply(
                    "bad_request",
                    format!("as_of '{text}' is not a date; send YYYY-MM-DD"),
                )
            })?,
            Some(other) => {
                return Err(error_reply(
                    "bad_request",
                    format!("as_of {other} is not a date; send \"YYYY-MM-DD\""),
                ))
            }
        };
        let unit = match request.get("time_unit").and_then(Value::as_str) {
            None => TimeUnit::Days,
            Some("days") => TimeUnit::Days,
            Some("weeks") => TimeUnit::Weeks,
            Some(other) => {
                return Err(error_reply(
                    "bad_request",
                    format!("time_unit '{other}' is unknown; send \"days\" or \"weeks\""),
                ))
            }
        };
        let horizon = match request.get("horizon") {
            None => unit.default_horizon_periods(),
            Some(value) => value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    error_reply(
                        "bad_request",
                        format!("horizon {value} is not a whole number of time units"),
                    )
                })?,
        };
        let discount_rate = match request.get("discount_rate") {
            None => 0.0,
            Some(value) => value.as_f64().ok_or_else(|| {
                error_reply(
                    "bad_request",
                    format!("discount_rate {value} is not a number"),
                )
            })?,
        };
        let settings = ClvSettings {
            horizon_periods: horizon,
            discount_rate,
        };
        settings
            .validate()
            .map_err(|error| error_reply("bad_request", error.to_string()))?;
        Ok(FitRequest {
            as_of_day,
            unit,
            settings,
        })
    }

    /// The day of the latest rule time any served shard has seen (the default as-of day).
    fn latest_rule_day(&self) -> i32 {
        let clock_ms = (0..self.shard_count)
            .filter(|shard| self.table.get(*shard).is_some())
            .filter_map(|shard| self.store.shard_meta(shard).ok())
            .map(|meta| meta.clock_ms)
            .max()
            .unwrap_or(0);
        crm_actors::time::day_number(clock_ms)
    }
}

/// The next request, or `None` at shutdown or when the subscription ends.
async fn next_message(
    requests: &mut async_nats::Subscriber,
    shutdown: &mut Shutdown,
) -> Option<async_nats::Message> {
    tokio::select! {
        message = requests.next() => message,
        _ = shutdown.wait() => None,
    }
}

/// Longest a fit waits for the summaries of every shard.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a node reading its summaries tells the collector it is still at work (well
/// under [`COLLECT_ROUND`]).
const KEEPALIVE_EVERY: Duration = Duration::from_millis(500);

/// Awaits `work`, calling `keepalive` every `every` until it is done.
async fn with_keepalive<T, K, KF>(
    work: impl std::future::Future<Output = T>,
    every: Duration,
    keepalive: K,
) -> T
where
    K: Fn() -> KF,
    KF: std::future::Future<Output = ()>,
{
    tokio::pin!(work);
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => keepalive().await,
        }
    }
}
/// Quiet time after which the shards still missing from a gather are asked for again.
pub const COLLECT_ROUND: Duration = Duration::from_secs(2);
/// Most summary rows in one chunk (~48 bytes each: well under NATS's 1 MiB payload).
pub const CHUNK_ROWS_MAX: usize = 8_192;

/// What a fit asks every node for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CollectRequest {
    as_of_day: i32,
    weeks: bool,
    /// The shards wanted (None: all); a node answers for those it serves, if any.
    #[serde(default)]
    shards: Option<Vec<u32>>,
}

/// Identical customer summaries of one node, counted (bincode on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SummaryRow {
    frequency: u32,
    recency: f64,
    age: f64,
    monetary: f64,
    mean_spend: f64,
    count: u32,
}

impl SummaryRow {
    fn summary(&self) -> CustomerSummary {
        CustomerSummary {
            customer_id: String::new(),
            frequency: self.frequency,
            recency: self.recency,
            age: self.age,
            monetary: self.monetary,
        }
    }
}

/// One reply chunk. A node's chunks are numbered from 0; its last one says how many it
/// sent and lists the shards its rows cover, so a lost chunk is noticed; a node that could
/// not read its summaries sends one chunk with `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SummaryChunk {
    node_id: String,
    index: u32,
    rows: Vec<SummaryRow>,
    /// Set on the last chunk: how many chunks the node sent.
    chunks: Option<u32>,
    shards_done: Vec<u32>,
    failed: Option<String>,
}

/// Whether `chunk` is the next one of its node (numbered from 0, none lost, the last one's
/// count matching) and not a failure report; counts it in `received`.
fn check_chunk(received: &mut HashMap<String, u32>, chunk: &SummaryChunk) -> Result<(), String> {
    if let Some(failure) = &chunk.failed {
        return Err(format!(
            "node {} could not read its summaries: {failure}",
            chunk.node_id
        ));
    }
    let seen = received.entry(chunk.node_id.clone()).or_insert(0);
    let complete =
        chunk.index == *seen && chunk.chunks.is_none_or(|chunks| chunks == chunk.index + 1);
    if !complete {
        return Err(format!(
            "summaries from node {} arrived incomplete (chunk {} after {} received); ask again",
            chunk.node_id, chunk.index, seen
        ));
    }
    *seen += 1;
    Ok(())
}

/// Counts identical summaries (the models only see (x, t_x, T, m̄) and the mean spend).
fn aggregate(summaries: &[(CustomerSummary, f64)]) -> Vec<SummaryRow> {
    let mut counts: std::collections::BTreeMap<[u64; 5], u32> = Default::default();
    for (s, mean_spend) in summaries {
        let key = [
            u64::from(s.frequency),
            s.recency.to_bits(),
            s.age.to_bits(),
            s.monetary.to_bits(),
            mean_spend.to_bits(),
        ];
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
        .into_iter()
        .map(|(key, count)| SummaryRow {
            frequency: key[0] as u32,
            recency: f64::from_bits(key[1]),
            age: f64::from_bits(key[2]),
            monetary: f64::from_bits(key[3]),
            mean_spend: f64::from_bits(key[4]),
            count,
        })
        .collect()
}

/// `YYYY-MM-DD` as a day number (days since 1970-01-01).
fn parse_day(text: &str) -> Option<i32> {
    crm_actors::time::parse_date(text).map(crm_actors::time::day_of_date)
}

/// Appends the published model, and every later one, to the log of every shard this node
/// serves, until shutdown: the shard engines apply it in log order (scoring every customer,
/// raising `value.segment_changed` and `churn.risk`), so a replay reproduces it. The record
/// id names the version and the shard, and an engine skips a version it already has, so
/// appending again after a restart changes nothing. A model that does not parse is skipped
/// with a warning.
pub async fn append_models(
    jetstream: Context,
    kv: kv::Store,
    table: ShardTable,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), 2, Duration::from_secs(5));
    while !shutdown.is_triggered() {
        let mut watch = match kv.watch_with_history(subjects::VALUE_MODEL_KEY).await {
            Ok(watch) => {
                // The pauses after a watch ends stay short; only failed starts grow them.
                backoff.reset();
                watch
            }
            Err(error) => {
                warn!(%error, "cannot watch the value model; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.wait() => break,
                }
                continue;
            }
        };
        loop {
            let entry = tokio::select! {
                entry = watch.next() => entry,
                _ = shutdown.wait() => return,
            };
            let Some(Ok(entry)) = entry else {
                // The watch ended or failed: start it again after a pause.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.wait() => return,
                }
                break;
            };
            if entry.value.is_empty() {
                continue;
            }
            let model: ValueModel = match serde_json::from_slice(&entry.value) {
                Ok(model) => model,
                Err(error) => {
                    warn!(%error, "published value model not readable; kept the previous one");
                    continue;
                }
            };
            if let Err(error) = model.validate() {
                warn!(%error, version = model.version, "published value model unusable; not applied");
                continue;
            }
            let version = model.version;
            let record = codec::encode(&ShardMessage::ValueModel { model });
            let mut appended_all = true;
            for handle in table.served() {
                let publish = Publish::build()
                    .payload(record.clone().into())
                    .message_id(format!("value-{version}-{}", handle.shard));
                let appended = match jetstream
                    .send_publish(subjects::shard(handle.shard), publish)
                    .await
                {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                if let Err(error) = appended {
                    warn!(%error, shard = handle.shard, version, "value model not appended; retrying");
                    appended_all = false;
                    break;
                }
            }
            if !appended_all {
                // The watch starts over (with history) and appends the model again.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.wait() => return,
                }
                break;
            }
            info!(version, "customer-value model appended to the shard logs");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_summaries_travel_once_with_their_count() {
        let summary = |frequency, recency| CustomerSummary {
            customer_id: "ignored".to_string(),
            frequency,
            recency,
            age: 30.0,
            monetary: 12.5,
        };
        let summaries = vec![
            (summary(2, 10.0), 20.0),
            (summary(0, 0.0), 5.0),
            (summary(2, 10.0), 20.0),
            (summary(2, 10.0), 21.0),
        ];
        let rows = aggregate(&summaries);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.iter().map(|r| r.count).sum::<u32>(), 4);
        let twice = rows.iter().find(|r| r.count == 2).expect("a pair");
        assert_eq!((twice.frequency, twice.mean_spend), (2, 20.0));
        assert_eq!(twice.summary().customer_id, "");
        let chunk = SummaryChunk {
            node_id: "node-1".to_string(),
            index: 0,
            rows,
            chunks: Some(1),
            failed: None,
            shards_done: vec![0, 3],
        };
        let back: SummaryChunk = codec::decode(&codec::encode(&chunk)).expect("round trip");
        assert_eq!(back, chunk);
    }

    #[test]
    fn a_lost_or_failed_summary_chunk_fails_the_gather() {
        let chunk = |node: &str, index, chunks, failed: Option<&str>| SummaryChunk {
            node_id: node.to_string(),
            index,
            rows: Vec::new(),
            chunks,
            shards_done: Vec::new(),
            failed: failed.map(str::to_string),
        };
        let mut received = HashMap::new();
        assert!(check_chunk(&mut received, &chunk("a", 0, None, None)).is_ok());
        assert!(check_chunk(&mut received, &chunk("b", 0, Some(1), None)).is_ok());
        assert!(check_chunk(&mut received, &chunk("a", 1, Some(2), None)).is_ok());
        // Node c's chunk 0 was lost.
        let lost = check_chunk(&mut received, &chunk("c", 1, Some(2), None)).unwrap_err();
        assert!(
            lost.contains("node c") && lost.contains("incomplete"),
            "{lost}"
        );
        // A last chunk whose count disagrees with what arrived.
        let mut received = HashMap::new();
        assert!(check_chunk(&mut received, &chunk("d", 0, Some(3), None)).is_err());
        let failed = check_chunk(&mut received, &chunk("e", 0, Some(1), Some("disk"))).unwrap_err();
        assert!(
            failed.contains("node e") && failed.contains("disk"),
            "{failed}"
        );
    }

    #[test]
    fn days_are_counted_from_1970() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2026-11-23"), Some(20_780));
        assert_eq!(parse_day("2026-13-01"), None);
        assert_eq!(crm_actors::value::live::day_text(20_780), "2026-11-23");
    }

    #[tokio::test]
    async fn a_long_read_sends_keepalives_until_it_is_done() {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = sent.clone();
        let answer = with_keepalive(
            async {
                tokio::time::sleep(Duration::from_millis(330)).await;
                7
            },
            Duration::from_millis(50),
            || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            },
        )
        .await;
        assert_eq!(answer, 7);
        let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!((4..=7).contains(&sent), "{sent} keepalives");
        // A quick read sends none.
        let quiet = with_keepalive(async { 1 }, Duration::from_millis(50), || async {
            panic!("no keepalive for a read that is already done")
        })
        .await;
        assert_eq!(quiet, 1);
    }
}
