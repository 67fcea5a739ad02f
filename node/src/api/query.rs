//! The query responder: `crm.query.customer` request/reply -> the 360 view as JSON.
//!
//! Any node answers (queue group `crm-query`). A request names the customer by our id
//! (`{"customer_id": "c…"}`) or by identifiers (`{"identity": {"email": …}}`); the
//! responder resolves it without creating anything, finds the shard, and asks that shard's
//! worker for the view. Errors are JSON too: `{"error": {"code", "message"}}` with codes
//! `bad_request`, `not_found`, `unavailable`.

use crate::ingest::identity_directory::IdentityDirectory;
use crate::metrics::Metrics;
use crate::shard::worker::{ShardRequest, ShardTable};
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::Client;
use crm_actors::identity::blocked::BlockedIdentities;
use crm_actors::ingest::{parse_identities, without_blocked};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::warn;

/// Queue group shared by every node's responder.
pub const QUEUE_GROUP: &str = "crm-query";

/// Routes requests to the shard workers of this node.
#[derive(Clone)]
pub struct Shards {
    pub count: u32,
    /// The shards this node serves now.
    pub table: ShardTable,
    /// A client to forward queries to the owners of the other shards.
    pub client: Client,
    pub directory: Arc<IdentityDirectory>,
    /// Identifier values the rules block: never linked, so never looked up.
    pub blocked: Arc<BlockedIdentities>,
    pub timeout: Duration,
}

/// An error reply: `{"error": {"code": code, "message": message}}`.
pub fn error_reply(code: &str, message: impl Into<String>) -> Value {
    json!({"error": {"code": code, "message": message.into()}})
}

/// Reads `customer_id` or `identity` from a request and resolves it without creating.
/// `Ok(None)`: no such customer. Identifiers the rules block are left out, as ingest leaves
/// them out; a request naming only blocked ones is a `bad_request` that says so.
pub async fn resolve_customer(
    directory: &IdentityDirectory,
    blocked: &BlockedIdentities,
    request: &Value,
    timeout: Duration,
) -> Result<Option<String>, Value> {
    if let Some(id) = request.get("customer_id") {
        return match id.as_str() {
            Some(id) if subjects::is_token(id) => Ok(Some(id.to_string())),
            _ => Err(error_reply(
                "bad_request",
                "customer_id must be a customer id string such as \"c0a1b2...\"",
            )),
        };
    }
    if request.get("identity").is_none() {
        return Err(error_reply(
            "bad_request",
            "send {\"customer_id\": \"c…\"} or {\"identity\": {\"email\": \"…\"}}",
        ));
    }
    let identities = parse_identities(request.get("identity"))
        .and_then(|identities| without_blocked(identities, blocked))
        .map_err(|rejection| error_reply("bad_request", rejection.message))?;
    // The directory retries a failed read; the caller's deadline bounds them all.
    match tokio::time::timeout(timeout, directory.lookup(&identities)).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(error)) => {
            warn!(%error, "identity lookup failed");
            Err(error_reply(
                "unavailable",
                "the identity directory could not be read; retry in a moment",
            ))
        }
        Err(_) => Err(error_reply(
            "unavailable",
            format!(
                "the identity directory did not answer within {} ms; retry in a moment",
                timeout.as_millis()
            ),
        )),
    }
}

impl Shards {
    /// The 360 view of a customer, or the error reply: from this node's worker when it
    /// serves the shard, else forwarded to the owner (`crm.owner.<n>.view`). While nobody
    /// serves the shard (it is moving) the request is retried until the timeout.
    pub async fn view(&self, customer_id: &str) -> Value {
        let shard = shard_of(customer_id, self.count);
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let answer = match self.table.get(shard) {
                Some(handle) => {
                    self.local_view(&handle.sender, shard, customer_id, deadline)
                        .await
                }
                None => self.forward(shard, customer_id, deadline).await,
            };
            match answer {
                Some(view) => return view,
                None if tokio::time::Instant::now() + RETRY_PAUSE < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                None => {
                    return error_reply(
                        "unavailable",
                        format!(
                            "shard {shard} is not served by any node within {} ms (moving or no node alive); retry",
                            self.timeout.as_millis()
                        ),
                    )
                }
            }
        }
    }

    /// Asks this node's worker; `None` when it is stopping (the shard is moving).
    async fn local_view(
        &self,
        sender: &tokio::sync::mpsc::Sender<ShardRequest>,
        shard: u32,
        customer_id: &str,
        deadline: tokio::time::Instant,
    ) -> Option<Value> {
        let (reply, answer) = oneshot::channel();
        let request = ShardRequest::View {
            customer_id: customer_id.to_string(),
            reply,
        };
        // The worker's queue is bounded; a worker that does not take requests (a long
        // batch) must not hold this responder past the deadline.
        match tokio::time::timeout_at(deadline, sender.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return None,
            Err(_) => {
                return Some(error_reply(
                    "unavailable",
                    format!(
                        "shard {shard} is busy (its query queue stayed full for {} ms); retry in a moment",
                        self.timeout.as_millis()
                    ),
                ))
            }
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(Some(view)))) => Some(view),
            Ok(Ok(Ok(None))) => Some(not_found(customer_id)),
            Ok(Ok(Err(error))) => Some(view_failed(shard, &error)),
            Ok(Err(_)) => None,
            Err(_) => Some(error_reply(
                "unavailable",
                format!(
                    "shard {shard} did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    /// Asks the owner of `shard` over NATS; `None` when nobody answers (no owner now).
    async fn forward(
        &self,
        shard: u32,
        customer_id: &str,
        deadline: tokio::time::Instant,
    ) -> Option<Value> {
        let body = json!({"customer_id": customer_id}).to_string();
        let request = self
            .client
            .request(subjects::owner_view(shard), body.into());
        match tokio::time::timeout_at(deadline, request).await {
            Ok(Ok(reply)) => serde_json::from_slice::<Value>(&reply.payload)
                .ok()
                .filter(|view| view["error"]["code"] != "moving"),
            Ok(Err(_)) => None,
            Err(_) => Some(error_reply(
                "unavailable",
                format!(
                    "the owner of shard {shard} did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            )),
        }
    }
}

/// Pause before a query for a moving shard is tried again, every time until the query's
/// timeout: short and fixed, so the answer follows soon after the shard is served again and
/// the last try comes close to the timeout.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The reply when a shard could not build a view: logged here, not handed to the client.
pub fn view_failed(shard: u32, error: &dyn std::fmt::Display) -> Value {
    warn!(shard, %error, "view failed");
    error_reply(
        "unavailable",
        format!("shard {shard} could not read the customer (its node's log has the cause); retry in a moment"),
    )
}

fn not_found(what: &str) -> Value {
    error_reply("not_found", format!("no customer {what}"))
}

/// Answers one query request body.
pub async fn answer(shards: &Shards, body: &[u8]) -> Value {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return error_reply(
                "bad_request",
                "the request is not a JSON object; send {\"identity\": {\"email\": \"…\"}}",
            )
        }
    };
    match resolve_customer(&shards.directory, &shards.blocked, &request, shards.timeout).await {
        Ok(Some(customer_id)) => shards.view(&customer_id).await,
        Ok(None) => error_reply("not_found", "no customer has these identifiers"),
        Err(error) => error,
    }
}

/// Serves `crm.query.customer` until shutdown, `concurrency_max` requests at a time.
pub async fn serve(
    client: Client,
    shards: Shards,
    metrics: Arc<Metrics>,
    concurrency_max: usize,
    mut shutdown: Shutdown,
) {
    let subscription = match client
        .queue_subscribe(subjects::QUERY_CUSTOMER, QUEUE_GROUP.to_string())
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => {
            warn!(%error, "query responder could not subscribe");
            return;
        }
    };
    let work = subscription.for_each_concurrent(concurrency_max, |message| {
        let shards = shards.clone();
        let client = client.clone();
        let metrics = metrics.clone();
        async move {
            Metrics::add(&metrics.queries, 1);
            let reply = answer(&shards, &message.payload).await;
            if let Some(inbox) = message.reply {
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(error) = client.publish(inbox, body.into()).await {
                    warn!(%error, "query reply not sent");
                }
            }
        }
    });
    tokio::select! {
        _ = work => {}
        _ = shutdown.wait() => {}
    }
}
