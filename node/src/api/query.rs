//! The query responder: `crm.query.customer` request/reply -> the 360 view as JSON.
//!
//! Any node answers (queue group `crm-query`). A request names the customer by our id
//! (`{"customer_id": "c…"}`) or by identifiers (`{"identity": {"email": …}}`); the
//! responder resolves it without creating anything, finds the shard, and asks that shard's
//! worker for the view. Errors are JSON too: `{"error": {"code", "message"}}` with codes
//! `bad_request`, `not_found`, `unavailable`.
//!
//! Merges: a customer merged into another is a tombstone whose view says `merged_into`. The
//! responder follows that chain (at most [`MERGE_HOPS_MAX`] hops, each on the shard of the
//! customer it names) and answers with the survivor's view plus `requested_customer_id` (the
//! id asked for) and `merged_into` (the survivor). A longer or cyclic chain is an
//! `unavailable` error naming the ids. The redeem command resolves its customer the same way
//! ([`Shards::follow_merges`]).

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
use std::future::Future;
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

/// Most `merged_into` hops followed from a tombstone to its survivor (a chain A <- B <- C
/// is two hops: C was merged into B, which was merged into A).
pub const MERGE_HOPS_MAX: usize = 16;

/// Where a customer's merge chain ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Followed {
    /// The customer asked for.
    pub requested: String,
    /// The end of its merge chain: `requested` itself when it was not merged away.
    pub survivor: String,
    /// The survivor's view (or the error reply its shard gave).
    pub view: Value,
}

impl Followed {
    /// The reply to a query: the survivor's view, with `requested_customer_id` and
    /// `merged_into` when the customer asked for was merged away (an error reply met on the
    /// way says so too).
    pub fn into_reply(self) -> Value {
        let Followed {
            requested,
            survivor,
            mut view,
        } = self;
        if requested == survivor {
            return view;
        }
        if let Some(error) = view.get("error") {
            let code = error["code"].as_str().unwrap_or("unavailable").to_string();
            let message = error["message"].as_str().unwrap_or_default();
            return error_reply(
                &code,
                format!("customer {requested} was merged into {survivor}: {message}"),
            );
        }
        if let Some(fields) = view.as_object_mut() {
            fields.insert("requested_customer_id".into(), json!(requested));
            fields.insert("merged_into".into(), json!(survivor));
        }
        view
    }
}

/// The customer a view says this one was merged into: `Ok(None)` for a customer not merged
/// away (or an error reply), an error when the id it names is not a customer id.
fn merged_into(view: &Value) -> Result<Option<&str>, String> {
    if view.get("error").is_some() {
        return Ok(None);
    }
    match view.get("merged_into") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if subjects::is_token(id) => Ok(Some(id)),
        Some(other) => Err(format!("merged_into {other} is not a customer id")),
    }
}

/// Follows `customer_id`'s merge chain with `view_of` (the view of one customer id, or its
/// error reply): at most [`MERGE_HOPS_MAX`] hops; `Err` (an `unavailable` reply naming the
/// ids) for a longer or cyclic chain.
pub async fn follow_merges<F, Fut>(customer_id: &str, mut view_of: F) -> Result<Followed, Value>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Value>,
{
    let mut chain = vec![customer_id.to_string()];
    let mut view = view_of(customer_id.to_string()).await;
    loop {
        let next = match merged_into(&view) {
            Ok(None) => break,
            Ok(Some(next)) => next.to_string(),
            Err(problem) => {
                warn!(chain = ?chain, %problem, "unreadable merge chain");
                return Err(error_reply(
                    "unavailable",
                    format!(
                        "the merge chain of customer {customer_id} cannot be followed: {} says {problem}",
                        chain.join(" -> ")
                    ),
                ));
            }
        };
        if chain.contains(&next) {
            chain.push(next);
            warn!(chain = ?chain, "cyclic merge chain");
            return Err(error_reply(
                "unavailable",
                format!(
                    "the merge chain of customer {customer_id} is cyclic ({}); the identity directory and the shard logs disagree, report it",
                    chain.join(" -> ")
                ),
            ));
        }
        if chain.len() > MERGE_HOPS_MAX {
            chain.push(next);
            warn!(chain = ?chain, "merge chain too long");
            return Err(error_reply(
                "unavailable",
                format!(
                    "the merge chain of customer {customer_id} is longer than {MERGE_HOPS_MAX} hops ({}); retry later or report it",
                    chain.join(" -> ")
                ),
            ));
        }
        view = view_of(next.clone()).await;
        chain.push(next);
    }
    let survivor = chain.pop().unwrap_or_else(|| customer_id.to_string());
    Ok(Followed {
        requested: customer_id.to_string(),
        survivor,
        view,
    })
}

impl Shards {
    /// Follows `customer_id`'s merge chain through the views of the shards on the way
    /// ([`follow_merges`]), every hop within the one query timeout.
    pub async fn follow_merges(&self, customer_id: &str) -> Result<Followed, Value> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        follow_merges(customer_id, |id| async move {
            self.view_until(&id, deadline).await
        })
        .await
    }

    /// The 360 view of a customer by `deadline`, or the error reply: from this node's
    /// worker when it serves the shard, else forwarded to the owner (`crm.owner.<n>.view`).
    /// While nobody serves the shard (it is moving) the request is retried until the
    /// deadline. A merged customer's view is its tombstone (see [`Shards::follow_merges`]).
    pub async fn view_until(&self, customer_id: &str, deadline: tokio::time::Instant) -> Value {
        let shard = shard_of(customer_id, self.count);
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
        Ok(Some(customer_id)) => match shards.follow_merges(&customer_id).await {
            Ok(followed) => followed.into_reply(),
            Err(error) => error,
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Views by customer id as the shards would answer them: a tombstone names where its
    /// customer went; an id without a view is not found.
    fn views(entries: &[(&str, Option<&str>)]) -> HashMap<String, Value> {
        entries
            .iter()
            .map(|(id, into)| {
                let view = match into {
                    Some(into) => json!({"customer_id": id, "merged_into": into}),
                    None => {
                        json!({"customer_id": id, "merged_into": null, "purchases": {"count": 2}})
                    }
                };
                (id.to_string(), view)
            })
            .collect()
    }

    async fn follow(views: &HashMap<String, Value>, id: &str) -> (Result<Followed, Value>, usize) {
        let mut asked = 0;
        let followed = follow_merges(id, |id| {
            asked += 1;
            let view = views.get(&id).cloned().unwrap_or_else(|| not_found(&id));
            async move { view }
        })
        .await;
        (followed, asked)
    }

    #[tokio::test]
    async fn a_customer_not_merged_is_answered_as_it_is() {
        let views = views(&[("c-ann", None)]);
        let (followed, asked) = follow(&views, "c-ann").await;
        let reply = followed.expect("no chain").into_reply();
        assert_eq!(reply, views["c-ann"]);
        assert_eq!(asked, 1);
        assert!(reply.get("requested_customer_id").is_none());
    }

    #[tokio::test]
    async fn a_merged_customer_is_answered_with_the_survivors_view_through_a_chain() {
        // bob went into cat, cat into ann.
        let views = views(&[
            ("c-bob", Some("c-cat")),
            ("c-cat", Some("c-ann")),
            ("c-ann", None),
        ]);
        let (followed, asked) = follow(&views, "c-bob").await;
        let followed = followed.expect("a chain of two hops");
        assert_eq!(followed.survivor, "c-ann");
        assert_eq!(asked, 3);
        let reply = followed.into_reply();
        assert_eq!(reply["customer_id"], "c-ann");
        assert_eq!(reply["purchases"]["count"], 2);
        assert_eq!(reply["requested_customer_id"], "c-bob");
        assert_eq!(reply["merged_into"], "c-ann");
    }

    #[tokio::test]
    async fn a_survivor_that_cannot_be_read_is_an_error_that_says_where_the_customer_went() {
        let views = views(&[("c-bob", Some("c-ann"))]);
        let (followed, _) = follow(&views, "c-bob").await;
        let reply = followed.expect("one hop").into_reply();
        assert_eq!(reply["error"]["code"], "not_found");
        let message = reply["error"]["message"].as_str().expect("a message");
        assert!(message.contains("c-bob was merged into c-ann"), "{message}");
    }

    #[tokio::test]
    async fn a_cyclic_chain_is_unavailable_and_names_the_ids() {
        let views = views(&[("c-bob", Some("c-cat")), ("c-cat", Some("c-bob"))]);
        let (followed, asked) = follow(&views, "c-bob").await;
        let error = followed.expect_err("a cycle");
        assert_eq!(error["error"]["code"], "unavailable");
        let message = error["error"]["message"].as_str().expect("a message");
        assert!(message.contains("c-bob -> c-cat -> c-bob"), "{message}");
        assert_eq!(asked, 2);
    }

    #[tokio::test]
    async fn a_chain_of_sixteen_hops_is_followed_and_a_longer_one_refused() {
        let ids: Vec<String> = (0..=17).map(|i| format!("c{i:02}")).collect();
        let entries: Vec<(&str, Option<&str>)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), ids.get(i + 1).map(String::as_str)))
            .collect();
        let views = views(&entries);
        // c01 -> ... -> c17: 16 hops.
        let (followed, asked) = follow(&views, "c01").await;
        assert_eq!(followed.expect("16 hops").survivor, "c17");
        assert_eq!(asked, 17);
        // c00 -> ... -> c17: 17 hops.
        let (followed, asked) = follow(&views, "c00").await;
        let error = followed.expect_err("17 hops");
        let message = error["error"]["message"].as_str().expect("a message");
        assert!(message.contains("longer than 16 hops"), "{message}");
        assert!(
            message.contains("c00 -> c01") && message.contains("c16 -> c17"),
            "{message}"
        );
        assert_eq!(asked, 17, "the 17th hop is not asked for");
    }

    #[tokio::test]
    async fn a_merged_into_that_is_not_a_customer_id_is_unavailable() {
        let mut views = views(&[]);
        views.insert(
            "c-bob".into(),
            json!({"customer_id": "c-bob", "merged_into": "no such.id"}),
        );
        let (followed, _) = follow(&views, "c-bob").await;
        let error = followed.expect_err("unusable id");
        assert_eq!(error["error"]["code"], "unavailable");
    }
}
