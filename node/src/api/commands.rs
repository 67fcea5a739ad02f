//! Command responders: `crm.cmd.redeem` (spend points) and `crm.cmd.tick` (move the rule
//! clock), plus the automatic ticker.
//!
//! Both write into the shard log rather than touching state directly, so a replay of the
//! log reproduces them. A redeem request waits for its reply from the shard worker (sent
//! only after the outcome is durable); it is idempotent by `request_id` because the customer
//! remembers the outcome of each request id. Ticks are appended by the shard's owner: the
//! `tick` command appends one to every shard this node serves, the ticker does the same
//! every `tick_interval_s` with the wall clock.
//!
//! Merges: a redeem for a customer merged into another must spend the survivor's points.
//! Before the redeem is written, its customer id is resolved to the end of its merge chain
//! through the views, as a query does ([`Shards::follow_merges`]), and the redeem goes into
//! the survivor's shard log. One race remains: the customer's `MergeOut` may already be in
//! its log, not yet applied, when its view is read; the redeem then reaches the tombstone,
//! which refuses it with the reason `merged_into:<survivor>` and remembers nothing. So that
//! refusal is not the answer: the same request (same `request_id`) is written once more,
//! for the end of the chain that starts at the named survivor, and that outcome is the
//! answer. Writing it there is safe: the survivor never saw the request. A reply for a
//! merged customer carries `requested_customer_id` and `merged_into` as a query does.

use crate::api::query::{error_reply, resolve_customer, Followed, Shards};
use crate::metrics::Metrics;
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::jetstream::Context;
use async_nats::Client;
use crm_actors::codec;
use crm_actors::ingest::{check_rule_time, ID_MAX_BYTES};
use crm_actors::shard_message::{CustomerCommand, ShardMessage};
use crm_actors::time::{format_rfc3339, parse_rfc3339_ms};
use futures::StreamExt;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// Queue group of the command responders.
pub const QUEUE_GROUP: &str = "crm-cmd";

/// What the command responders need.
#[derive(Clone)]
pub struct Commands {
    pub client: Client,
    pub jetstream: Context,
    pub shards: Shards,
    pub metrics: Arc<Metrics>,
    /// How far ahead of the wall clock a command's time may be (`None`: no bound); as
    /// `limits.occurred_at_future_max_days` bounds events.
    pub occurred_at_future_max_ms: Option<i64>,
}

/// A redeem for `customer_id` through its merges (see the module notes): `follow` resolves
/// an id to the end of its merge chain, `redeem_on` writes the redeem for an id and waits
/// for the reply. At most two redeems are written: the second only when a tombstone refused
/// the first (its customer was merged away meanwhile).
async fn redeem_through_merges<Fo, FoFut, Re, ReFut>(
    customer_id: &str,
    mut follow: Fo,
    mut redeem_on: Re,
) -> Value
where
    Fo: FnMut(String) -> FoFut,
    FoFut: Future<Output = Result<Followed, Value>>,
    Re: FnMut(String) -> ReFut,
    ReFut: Future<Output = Value>,
{
    // A view that cannot be read (a moving shard) leaves the id as it is: the redeem is
    // logged there, and a tombstone's refusal below still sends it on.
    let mut target = match follow(customer_id.to_string()).await {
        Ok(followed) => followed.survivor,
        Err(chain_error) => return chain_error,
    };
    let mut reply = redeem_on(target.clone()).await;
    if let Some(into) = merged_away(&reply).filter(|into| *into != target) {
        target = match follow(into.to_string()).await {
            Ok(followed) => followed.survivor,
            Err(chain_error) => return chain_error,
        };
        reply = redeem_on(target.clone()).await;
    }
    with_merge_fields(reply, customer_id, &target)
}

/// The reason prefix of a redeem a tombstone refused: `merged_into:<survivor>`.
const MERGED_INTO_REASON: &str = "merged_into:";

/// Where the customer of a refused redeem went, when a tombstone refused it.
fn merged_away(reply: &Value) -> Option<&str> {
    if reply.get("error").is_some() || reply.get("approved") != Some(&Value::Bool(false)) {
        return None;
    }
    reply
        .get("reason")?
        .as_str()?
        .strip_prefix(MERGED_INTO_REASON)
        .filter(|id| subjects::is_token(id))
}

/// `reply` plus `requested_customer_id` and `merged_into` when the redeem was applied to
/// the survivor of the customer asked for.
fn with_merge_fields(mut reply: Value, requested: &str, survivor: &str) -> Value {
    if requested != survivor && reply.get("error").is_none() {
        if let Some(fields) = reply.as_object_mut() {
            fields.insert("requested_customer_id".into(), json!(requested));
            fields.insert("merged_into".into(), json!(survivor));
        }
    }
    reply
}

/// [`check_rule_time`] for a command's time, against this node's wall clock.
fn check_command_time(field: &str, at_ms: i64, future_max_ms: Option<i64>) -> Result<(), Value> {
    let latest = future_max_ms.map(|ahead| wall_clock_ms().saturating_add(ahead));
    check_rule_time(field, at_ms, latest).map_err(|message| error_reply("bad_request", message))
}

/// The wall clock in Unix ms (only for stamping commands that carry no time of their own).
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Commands {
    /// Answers one redeem request body.
    pub async fn redeem(&self, body: &[u8]) -> Value {
        let request: Value = match serde_json::from_slice(body) {
            Ok(value @ Value::Object(_)) => value,
            _ => return error_reply("bad_request", "send a JSON object {\"request_id\", \"reward_id\", \"identity\" or \"customer_id\"}"),
        };
        let text = |name: &str| -> Result<String, Value> {
            match request.get(name).and_then(Value::as_str) {
                // Ids end up in NATS headers (Nats-Msg-Id), where a line break cannot go.
                Some(s)
                    if !s.trim().is_empty()
                        && s.len() <= ID_MAX_BYTES
                        && !s.chars().any(char::is_control) =>
                {
                    Ok(s.to_string())
                }
                _ => Err(error_reply(
                    "bad_request",
                    format!("{name} is missing or not a non-empty string of printable text of at most {ID_MAX_BYTES} bytes"),
                )),
            }
        };
        let (request_id, reward_id) = match (text("request_id"), text("reward_id")) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let at_ms = match request.get("occurred_at").and_then(Value::as_str) {
            Some(text) => match parse_rfc3339_ms(text) {
                Ok(ms) => ms,
                Err(error) => return error_reply("bad_request", format!("occurred_at {error}")),
            },
            None => wall_clock_ms(),
        };
        if let Err(error) = check_command_time("occurred_at", at_ms, self.occurred_at_future_max_ms)
        {
            return error;
        }
        let customer_id = match resolve_customer(
            &self.shards.directory,
            &self.shards.blocked,
            &request,
            self.shards.timeout,
        )
        .await
        {
            Ok(Some(id)) => id,
            Ok(None) => {
                return json!({"request_id": request_id, "reward_id": reward_id, "approved": false,
                              "points_spent": 0, "points_balance": 0, "reason": "unknown_customer",
                              "customer_id": null})
            }
            Err(error) => return error,
        };
        Metrics::add(&self.metrics.redeems, 1);
        redeem_through_merges(
            &customer_id,
            |id| async move { self.shards.follow_merges(&id).await },
            |id| {
                let (request_id, reward_id) = (request_id.clone(), reward_id.clone());
                async move { self.redeem_on(id, request_id, reward_id, at_ms).await }
            },
        )
        .await
    }

    /// Writes the redeem into `customer_id`'s shard log and waits for its reply.
    async fn redeem_on(
        &self,
        customer_id: String,
        request_id: String,
        reward_id: String,
        at_ms: i64,
    ) -> Value {
        let inbox = self.client.new_inbox();
        let mut replies = match self.client.subscribe(inbox.clone()).await {
            Ok(subscription) => subscription,
            Err(error) => {
                return error_reply("unavailable", format!("cannot wait for the reply: {error}"))
            }
        };
        let shard = shard_of(&customer_id, self.shards.count);
        let record = ShardMessage::Customer {
            customer_id,
            command: CustomerCommand::Redeem {
                request_id,
                reward_id,
                at_ms,
            },
            reply_to: Some(inbox),
        };
        let published = match self
            .jetstream
            .publish(subjects::shard(shard), codec::encode(&record).into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = published {
            return error_reply(
                "unavailable",
                format!("the shard log did not accept the command: {error}"),
            );
        }
        match tokio::time::timeout(self.shards.timeout, replies.next()).await {
            Ok(Some(message)) => serde_json::from_slice(&message.payload)
                .unwrap_or_else(|_| error_reply("unavailable", "unreadable reply from the shard")),
            _ => error_reply(
                "timeout",
                "the command is logged and will be applied; repeat it with the same request_id to read its outcome",
            ),
        }
    }

    /// Answers one tick request body `{"at": RFC 3339}`.
    pub async fn tick(&self, body: &[u8]) -> Value {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let at_ms = match request
            .get("at")
            .and_then(Value::as_str)
            .map(parse_rfc3339_ms)
        {
            Some(Ok(ms)) => ms,
            Some(Err(error)) => return error_reply("bad_request", format!("at {error}")),
            None => return error_reply("bad_request", "send {\"at\": \"2027-01-01T00:00:00Z\"}"),
        };
        if let Err(error) = check_command_time("at", at_ms, self.occurred_at_future_max_ms) {
            return error;
        }
        let every_shard: Vec<u32> = (0..self.shards.count).collect();
        match self.append_ticks(at_ms, &every_shard).await {
            Ok(shards) => json!({"v": 1, "at": format_rfc3339(at_ms), "shards": shards}),
            Err(error) => error_reply("unavailable", error),
        }
    }

    /// Appends `Tick { at_ms }` to the logs of `shards` (any node may write any shard's
    /// log; the owner applies it).
    pub async fn append_ticks(&self, at_ms: i64, shards: &[u32]) -> Result<u32, String> {
        let mut acks = Vec::new();
        let record = codec::encode(&ShardMessage::Tick { at_ms });
        for &shard in shards {
            let ack = self
                .jetstream
                .publish(subjects::shard(shard), record.clone().into())
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack);
        }
        let count = acks.len() as u32;
        for ack in acks {
            ack.await.map_err(|e| e.to_string())?;
        }
        Metrics::add(&self.metrics.ticks_appended, u64::from(count));
        Ok(count)
    }

    /// Serves `subject` with `handler` until shutdown.
    pub async fn serve<F, Fut>(
        self,
        subject: &'static str,
        concurrency_max: usize,
        handler: F,
        mut shutdown: Shutdown,
    ) where
        F: Fn(Commands, bytes::Bytes) -> Fut + Clone,
        Fut: std::future::Future<Output = Value>,
    {
        let subscription = match self
            .client
            .queue_subscribe(subject, QUEUE_GROUP.to_string())
            .await
        {
            Ok(subscription) => subscription,
            Err(error) => {
                warn!(%error, subject, "command responder could not subscribe");
                return;
            }
        };
        let work = subscription.for_each_concurrent(concurrency_max, |message| {
            let commands = self.clone();
            let handler = handler.clone();
            async move {
                let client = commands.client.clone();
                let reply = handler(commands, message.payload).await;
                if let Some(inbox) = message.reply {
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    if let Err(error) = client.publish(inbox, body.into()).await {
                        warn!(%error, "command reply not sent");
                    }
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = shutdown.wait() => {}
        }
    }

    /// Appends a wall-clock tick to every served shard every `interval` until shutdown.
    pub async fn run_ticker(self, interval: Duration, mut shutdown: Shutdown) {
        let mut timer = tokio::time::interval(interval);
        timer.tick().await;
        loop {
            tokio::select! {
                _ = timer.tick() => {
                    let at_ms = wall_clock_ms();
                    // Each owner ticks its own shards: every shard once per interval.
                    let served: Vec<u32> =
                        self.shards.table.served().iter().map(|h| h.shard).collect();
                    match self.append_ticks(at_ms, &served).await {
                        Ok(count) => info!(shards = count, at = %format_rfc3339(at_ms), "ticks appended"),
                        Err(error) => warn!(%error, "ticks not appended; next interval retries"),
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// The cluster as the redeem sees it: which customers are merged into which (applied
    /// merges), and the redeems written, in order.
    struct Cluster {
        merged_into: Vec<(String, String)>,
        written: RefCell<Vec<String>>,
        points: i64,
    }

    impl Cluster {
        fn new(merged: &[(&str, &str)]) -> Cluster {
            Cluster {
                merged_into: merged
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
                written: RefCell::new(Vec::new()),
                points: 500,
            }
        }

        fn survivor(&self, id: &str) -> String {
            let mut id = id.to_string();
            while let Some((_, into)) = self.merged_into.iter().find(|(from, _)| *from == id) {
                id = into.clone();
            }
            id
        }

        /// A tombstone refuses, naming where its customer went; a live customer approves
        /// when it has the points.
        fn redeem(&self, id: String) -> Value {
            self.written.borrow_mut().push(id.clone());
            let into = self.merged_into.iter().find(|(from, _)| *from == id);
            let approved = into.is_none() && self.points >= 100;
            let reason = match into {
                Some((_, into)) => json!(format!("merged_into:{into}")),
                None if approved => Value::Null,
                None => json!("insufficient_points"),
            };
            json!({"request_id": "r1", "customer_id": id, "reward_id": "w", "approved": approved,
                   "points_spent": if approved { 100 } else { 0 },
                   "points_balance": 0, "reason": reason})
        }

        async fn run(&self, id: &str) -> Value {
            redeem_through_merges(
                id,
                |id| {
                    let survivor = self.survivor(&id);
                    async move {
                        Ok(Followed {
                            requested: id,
                            survivor,
                            view: json!({}),
                        })
                    }
                },
                |id| {
                    let reply = self.redeem(id);
                    async move { reply }
                },
            )
            .await
        }
    }

    #[tokio::test]
    async fn a_redeem_for_a_customer_not_merged_is_written_once_for_it() {
        let cluster = Cluster::new(&[]);
        let reply = cluster.run("c-ann").await;
        assert_eq!(reply["approved"], true);
        assert_eq!(*cluster.written.borrow(), vec!["c-ann"]);
        assert!(reply.get("merged_into").is_none());
    }

    #[tokio::test]
    async fn a_redeem_for_a_merged_customer_is_written_for_the_end_of_its_chain() {
        let cluster = Cluster::new(&[("c-bob", "c-cat"), ("c-cat", "c-ann")]);
        let reply = cluster.run("c-bob").await;
        assert_eq!(*cluster.written.borrow(), vec!["c-ann"]);
        assert_eq!(reply["approved"], true);
        assert_eq!(reply["customer_id"], "c-ann");
        assert_eq!(reply["requested_customer_id"], "c-bob");
        assert_eq!(reply["merged_into"], "c-ann");
    }

    #[tokio::test]
    async fn a_redeem_that_reached_a_tombstone_in_a_race_is_written_once_more_for_the_survivor() {
        // bob's view still showed him when the redeem was written, but his MergeOut was in
        // his log ahead of it: the tombstone refused it, naming cat, who went into ann
        // meanwhile.
        let cluster = Cluster::new(&[("c-bob", "c-cat"), ("c-cat", "c-ann")]);
        let reply = redeem_through_merges(
            "c-bob",
            // The first look sees bob as he was; later looks see the merge.
            {
                let mut looks = 0;
                let cluster = &cluster;
                move |id: String| {
                    looks += 1;
                    let survivor = if looks == 1 {
                        id.clone()
                    } else {
                        cluster.survivor(&id)
                    };
                    async move {
                        Ok(Followed {
                            requested: id,
                            survivor,
                            view: json!({}),
                        })
                    }
                }
            },
            |id| {
                let reply = cluster.redeem(id);
                async move { reply }
            },
        )
        .await;
        assert_eq!(*cluster.written.borrow(), vec!["c-bob", "c-ann"]);
        assert_eq!(reply["approved"], true);
        assert_eq!(reply["merged_into"], "c-ann");
        assert_eq!(reply["customer_id"], "c-ann");
        assert_eq!(reply["requested_customer_id"], "c-bob");
    }

    #[tokio::test]
    async fn a_refused_redeem_of_a_customer_still_not_merged_is_not_written_again() {
        let cluster = Cluster {
            points: 0,
            ..Cluster::new(&[])
        };
        let reply = cluster.run("c-ann").await;
        assert_eq!(reply["approved"], false);
        assert_eq!(*cluster.written.borrow(), vec!["c-ann"]);
    }

    #[tokio::test]
    async fn a_merge_chain_that_cannot_be_followed_writes_nothing() {
        let written = RefCell::new(0);
        let reply = redeem_through_merges(
            "c-bob",
            |_| async { Err(error_reply("unavailable", "cyclic")) },
            |_| {
                *written.borrow_mut() += 1;
                async { json!({"approved": true}) }
            },
        )
        .await;
        assert_eq!(reply["error"]["code"], "unavailable");
        assert_eq!(*written.borrow(), 0);
    }

    #[test]
    fn only_a_tombstones_refusal_sends_a_redeem_on() {
        let refusal = |reason: &str| json!({"approved": false, "reason": reason});
        assert_eq!(merged_away(&refusal("merged_into:c-ann")), Some("c-ann"));
        assert_eq!(merged_away(&refusal("insufficient_points")), None);
        assert_eq!(merged_away(&refusal("merged_into:")), None);
        assert_eq!(merged_away(&refusal("merged_into:a b")), None);
        assert_eq!(
            merged_away(&json!({"approved": true, "reason": "merged_into:c-ann"})),
            None
        );
        assert_eq!(merged_away(&error_reply("timeout", "logged")), None);
    }
}
