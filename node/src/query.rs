//! The query responder: `crm.query.customer` request/reply -> the 360 view as JSON.
//!
//! Any node answers (queue group `crm-query`). A request names the customer by our id
//! (`{"customer_id": "c…"}`) or by identifiers (`{"identity": {"email": …}}`); the
//! responder resolves it without creating anything, finds the shard, and asks that shard's
//! worker for the view. Errors are JSON too: `{"error": {"code", "message"}}` with codes
//! `bad_request`, `not_found`, `unavailable`.

use crate::identity_directory::IdentityDirectory;
use crate::metrics::Metrics;
use crate::shard_worker::{ShardHandle, ShardRequest};
use crate::sharding::shard_of;
use crate::shutdown::Shutdown;
use crate::subjects;
use async_nats::Client;
use crm_actors::event::parse_identities;
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
    /// Indexed by shard number; `None` where this node does not own the shard.
    pub handles: Arc<Vec<Option<ShardHandle>>>,
    pub directory: Arc<IdentityDirectory>,
    pub timeout: Duration,
}

/// An error reply: `{"error": {"code": code, "message": message}}`.
pub fn error_reply(code: &str, message: impl Into<String>) -> Value {
    json!({"error": {"code": code, "message": message.into()}})
}

/// Reads `customer_id` or `identity` from a request and resolves it without creating.
/// `Ok(None)`: no such customer.
pub async fn resolve_customer(
    directory: &IdentityDirectory,
    request: &Value,
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
        .map_err(|rejection| error_reply("bad_request", rejection.message))?;
    directory
        .lookup(&identities)
        .await
        .map_err(|error| error_reply("unavailable", format!("identity directory: {error}")))
}

impl Shards {
    /// The 360 view of a customer, or the error reply.
    pub async fn view(&self, customer_id: &str) -> Value {
        let shard = shard_of(customer_id, self.count);
        let Some(Some(handle)) = self.handles.get(shard as usize) else {
            return error_reply(
                "unavailable",
                format!("shard {shard} is not served by this node"),
            );
        };
        let (reply, answer) = oneshot::channel();
        let request = ShardRequest::View {
            customer_id: customer_id.to_string(),
            reply,
        };
        if handle.sender.send(request).await.is_err() {
            return error_reply("unavailable", format!("shard {shard} is stopping"));
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(Ok(Some(view)))) => view,
            Ok(Ok(Ok(None))) => not_found(customer_id),
            Ok(Ok(Err(error))) => error_reply("unavailable", error),
            Ok(Err(_)) => error_reply("unavailable", format!("shard {shard} is stopping")),
            Err(_) => error_reply(
                "unavailable",
                format!(
                    "shard {shard} did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            ),
        }
    }
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
    match resolve_customer(&shards.directory, &request).await {
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
