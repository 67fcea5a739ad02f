//! The client subcommands of `crm-node`: a reference channel adapter (`send`, `load`) and
//! the query, redeem, watch, tick and stats clients.
//!
//! They speak only the public contract (JSON on the subjects in [`crate::subjects`]), so
//! each is also an example of what an adapter or dashboard in any language does.

use crate::loadgen::{Generator, GeneratorSpec};
use crate::subjects;
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self};
use clap::Args;
use crm_actors::time::{format_rfc3339, parse_rfc3339_ms};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How a command names a customer.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Who {
    /// Our customer id (`c…`).
    #[arg(long)]
    pub customer_id: Option<String>,
    /// Email address.
    #[arg(long)]
    pub email: Option<String>,
    /// Any identifier as KIND=VALUE (loyalty_card, customer_id, email, phone, device_id).
    #[arg(long)]
    pub identity: Option<String>,
}

impl Who {
    /// The request fields naming the customer.
    pub fn to_request(&self) -> Result<Value> {
        if let Some(id) = &self.customer_id {
            return Ok(json!({"customer_id": id}));
        }
        if let Some(email) = &self.email {
            return Ok(json!({"identity": {"email": email}}));
        }
        if let Some(pair) = &self.identity {
            let (kind, value) = pair.split_once('=').ok_or_else(|| {
                anyhow!("--identity '{pair}' must be KIND=VALUE, e.g. loyalty_card=LC-123")
            })?;
            return Ok(json!({"identity": {kind: value}}));
        }
        bail!("name the customer with --customer-id, --email or --identity KIND=VALUE")
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Channel token: the event goes to crm.ingest.<channel>.
    #[arg(long, default_value = "web")]
    pub channel: String,
    /// The event as JSON text.
    #[arg(long, conflicts_with = "file")]
    pub json: Option<String>,
    /// A file holding the event JSON (one object), or '-' for stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Event types to show, as a subject pattern after crm.events. (e.g. 'points.>' or 'tier.changed.*').
    #[arg(long, default_value = ">")]
    pub filter: String,
    /// Print each event's JSON on one line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Number of people in the sample.
    #[arg(long, default_value_t = 3000)]
    pub customers: usize,
    /// Days of traffic.
    #[arg(long, default_value_t = 1)]
    pub days: u32,
    /// Random seed (the same seed sends the same traffic).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// First day, RFC 3339.
    #[arg(long, default_value = "2026-11-01T00:00:00Z")]
    pub start: String,
    /// Percent of events sent twice (same event id, or same order under a new event id).
    #[arg(long, default_value_t = 2)]
    pub duplicate_rate_percent: u8,
    /// Publishes awaiting their ack at once.
    #[arg(long, default_value_t = 2048)]
    pub in_flight_max: usize,
}

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(crate::config::nats_urls(url))
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {url}; start it with scripts/nats-up or pass --nats-url"
            )
        })
}

async fn request(client: &async_nats::Client, subject: &str, body: &Value) -> Result<Value> {
    request_within(client, subject, body, Duration::from_secs(10)).await
}

async fn request_within(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value> {
    let reply = tokio::time::timeout(
        timeout,
        client.request(subject.to_string(), serde_json::to_vec(body)?.into()),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "no reply on {subject} within {} s; is a crm-node running?",
            timeout.as_secs()
        )
    })?
    .map_err(|e| anyhow!("request on {subject} failed: {e}; is a crm-node running?"))?;
    serde_json::from_slice(&reply.payload)
        .with_context(|| format!("reply on {subject} is not JSON"))
}

/// `crm-node send`: publishes one event with `Nats-Msg-Id` = its `event_id`.
pub async fn send(url: &str, args: SendArgs) -> Result<()> {
    let text = match (&args.json, &args.file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the event from stdin")?
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the event from {}", path.display()))?,
        (None, None) => bail!("give the event with --json '{{...}}' or --file FILE"),
    };
    let event: Value = serde_json::from_str(&text).context("the event is not valid JSON")?;
    let event_id = event
        .get("event_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the event has no string event_id; adapters must send one"))?
        .to_string();
    let client = connect(url).await?;
    let js = jetstream::new(client);
    let ack = js
        .send_publish(
            subjects::ingest(&args.channel),
            Publish::build()
                .payload(text.into_bytes().into())
                .message_id(&event_id),
        )
        .await?
        .await
        .map_err(|e| anyhow!("the event was not accepted: {e}"))?;
    println!(
        "{}",
        json!({"stream": ack.stream, "sequence": ack.sequence, "duplicate": ack.duplicate, "event_id": event_id})
    );
    Ok(())
}

/// `crm-node query`.
pub async fn query(url: &str, who: Who, raw: bool) -> Result<()> {
    let client = connect(url).await?;
    let reply = request(&client, subjects::QUERY_CUSTOMER, &who.to_request()?).await?;
    if raw {
        println!("{reply}");
    } else {
        print!("{}", render_view(&reply));
    }
    if reply.get("error").is_some() {
        std::process::exit(1);
    }
    Ok(())
}

/// A readable summary of a 360 view (or of an error reply). A view answered for a customer
/// merged into another (the reply names `requested_customer_id` and `merged_into`) opens
/// with `customer <requested> was merged into <survivor>`, then shows the survivor.
pub fn render_view(view: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let (Some(requested), Some(survivor)) = (
        view.get("requested_customer_id").and_then(Value::as_str),
        view.get("merged_into").and_then(Value::as_str),
    ) {
        let _ = writeln!(out, "customer {requested} was merged into {survivor}");
    }
    if let Some(error) = view.get("error") {
        let _ = writeln!(
            out,
            "error {}: {}",
            error["code"].as_str().unwrap_or("?"),
            error["message"].as_str().unwrap_or("")
        );
        return out;
    }
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let _ = writeln!(out, "customer   {}", s(&view["customer_id"]));
    let _ = writeln!(out, "identities {}", s(&view["identities"]));
    let p = &view["purchases"];
    let _ = writeln!(
        out,
        "purchases  {} orders, spend {} (first {}, last {})",
        s(&p["count"]),
        s(&p["total_spend"]),
        s(&p["first_at"]),
        s(&p["last_at"])
    );
    let _ = writeln!(out, "  by channel  {}", s(&p["by_channel"]));
    let _ = writeln!(out, "  by category {}", s(&p["by_category"]));
    let r = &view["returns"];
    let _ = writeln!(
        out,
        "returns    {} totalling {}",
        s(&r["count"]),
        s(&r["total"])
    );
    let l = &view["loyalty"];
    let _ = writeln!(
        out,
        "loyalty    tier {}, {} points (+{} pending)",
        s(&l["tier"]),
        s(&l["points_balance"]),
        s(&l["points_pending"])
    );
    let t = &view["retention"];
    let _ = writeln!(
        out,
        "retention  {} (recency {} d, mean gap {} d) {}",
        s(&t["state"]),
        s(&t["recency_days"]),
        s(&t["mean_gap_days"]),
        s(&t["reason"])
    );
    if let Some(timeline) = view["timeline"].as_array() {
        let _ = writeln!(out, "timeline   (latest {})", timeline.len());
        for entry in timeline.iter().take(5) {
            let _ = writeln!(
                out,
                "  {} {:<10} {:<9} {}",
                s(&entry["at"]),
                s(&entry["channel"]),
                s(&entry["type"]),
                s(&entry["summary"])
            );
        }
    }
    out
}

/// `crm-node redeem`.
pub async fn redeem(url: &str, who: Who, reward: String, request_id: String) -> Result<()> {
    let client = connect(url).await?;
    let mut body = who.to_request()?;
    body["reward_id"] = json!(reward);
    body["request_id"] = json!(request_id);
    let reply = request(&client, subjects::CMD_REDEEM, &body).await?;
    println!("{reply}");
    if reply.get("error").is_some() {
        std::process::exit(1);
    }
    Ok(())
}

/// `crm-node tick --at`.
pub async fn tick(url: &str, at: &str) -> Result<()> {
    parse_rfc3339_ms(at).map_err(|e| anyhow!("--at {e}"))?;
    let client = connect(url).await?;
    let reply = request(&client, subjects::CMD_TICK, &json!({"at": at})).await?;
    println!("{reply}");
    if reply.get("error").is_some() {
        std::process::exit(1);
    }
    Ok(())
}

/// `crm-node value-fit`: asks the cluster to fit the customer-value models and prints the
/// published model (`--json`: as received). Exits 1 on an error reply.
pub async fn value_fit(url: &str, args: ValueFitArgs) -> Result<()> {
    let mut body = serde_json::Map::new();
    if let Some(as_of) = args.as_of {
        body.insert("as_of".into(), json!(as_of));
    }
    if let Some(unit) = args.time_unit {
        body.insert("time_unit".into(), json!(unit));
    }
    if let Some(horizon) = args.horizon {
        body.insert("horizon".into(), json!(horizon));
    }
    if let Some(rate) = args.discount_rate {
        body.insert("discount_rate".into(), json!(rate));
    }
    let client = connect(url).await?;
    // A fit reads every customer: allow it minutes, not seconds.
    let reply = request_within(
        &client,
        subjects::CMD_VALUE_FIT,
        &Value::Object(body),
        Duration::from_secs(args.timeout_s),
    )
    .await?;
    if reply.get("error").is_some() || args.json {
        println!("{reply}");
        if reply.get("error").is_some() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let number = |path: &[&str]| {
        path.iter()
            .fold(&reply, |value, key| &value[*key])
            .as_f64()
            .map_or("-".to_string(), |n| format!("{n:.6}"))
    };
    println!(
        "customer-value model version {} as of {} ({} customers, {} repeat buyers)",
        reply["version"], reply["as_of"], reply["customers"], reply["repeat_buyers"]
    );
    println!(
        "BG/NBD       r {}  alpha {}  a {}  b {}  (log-likelihood {})",
        number(&["bgnbd", "r"]),
        number(&["bgnbd", "alpha"]),
        number(&["bgnbd", "a"]),
        number(&["bgnbd", "b"]),
        number(&["log_likelihood"])
    );
    println!(
        "Gamma-Gamma  p {}  q {}  gamma {}",
        number(&["gamma_gamma", "p"]),
        number(&["gamma_gamma", "q"]),
        number(&["gamma_gamma", "gamma"])
    );
    println!(
        "CLV over {} {}: top 1% from {}, top 20% from {}, median {}",
        reply["horizon_periods"],
        reply["time_unit"].as_str().unwrap_or("days"),
        number(&["clv_p99"]),
        number(&["clv_p80"]),
        number(&["clv_p50"])
    );
    Ok(())
}

/// Options of `crm-node value-fit`.
#[derive(Args, Debug)]
pub struct ValueFitArgs {
    /// Cut the purchase histories at this day, YYYY-MM-DD [default: the latest event day]
    #[arg(long)]
    pub as_of: Option<String>,
    /// Unit of every time in the models: days or weeks [default: days]
    #[arg(long, value_parser = ["days", "weeks"])]
    pub time_unit: Option<String>,
    /// CLV horizon in time units [default: 365 days / 52 weeks]
    #[arg(long)]
    pub horizon: Option<u32>,
    /// Discount rate per time unit, e.g. 0.001 [default: 0]
    #[arg(long)]
    pub discount_rate: Option<f64>,
    /// Print the reply as received (JSON)
    #[arg(long)]
    pub json: bool,
    /// Longest wait for the reply, seconds
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// Most node replies `crm-node stats` collects.
const STATS_REPLIES_MAX: usize = 1024;
/// `crm-node stats` stops collecting after this long without a new reply.
const STATS_QUIET: Duration = Duration::from_millis(300);

/// `crm-node stats`: every node answers `crm.node.stats`; prints one JSON line per node,
/// by node id.
pub async fn stats(url: &str) -> Result<()> {
    let client = connect(url).await?;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subjects::NODE_STATS.to_string(), inbox, "{}".into())
        .await?;
    let no_node = || {
        anyhow!(
            "no reply on {} within 10 s; is a crm-node running?",
            subjects::NODE_STATS
        )
    };
    let first = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .map_err(|_| no_node())?
        .ok_or_else(no_node)?;
    let mut answers = vec![first];
    while answers.len() < STATS_REPLIES_MAX {
        match tokio::time::timeout(STATS_QUIET, replies.next()).await {
            Ok(Some(message)) => answers.push(message),
            _ => break,
        }
    }
    // Each reply as the node sent it (a node of another version may have other counters),
    // by node id; a reply that is not a JSON object with a node id first, as unreadable.
    let mut lines: Vec<(String, Value)> = answers
        .iter()
        .map(|m| match serde_json::from_slice::<Value>(&m.payload) {
            Ok(reply) => match reply.get("node_id").and_then(Value::as_str) {
                Some(node_id) => (node_id.to_string(), reply.clone()),
                None => (String::new(), json!({"unreadable": true})),
            },
            Err(_) => (String::new(), json!({"unreadable": true})),
        })
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, line) in lines {
        println!("{line}");
    }
    Ok(())
}

/// `crm-node status`: the cluster's nodes, shards, leases and lag.
pub async fn status(url: &str, json_out: bool, node_timeout_ms: u64) -> Result<()> {
    let client = connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let status = crate::cluster::status::read(&js, Duration::from_millis(node_timeout_ms))
        .await
        .map_err(anyhow::Error::msg)?;
    if json_out {
        // Through a JSON value: its keys print in alphabetical order, as they always did.
        println!("{}", serde_json::to_value(&status)?);
    } else {
        print!("{}", crate::cluster::status::render(&status));
    }
    Ok(())
}

/// `crm-node drain <node-id>`: moves every shard off the node, then says it may stop.
pub async fn drain(url: &str, node_id: &str, cancel: bool, timeout_s: u64) -> Result<()> {
    let client = connect(url).await?;
    let js = async_nats::jetstream::new(client);
    crate::cluster::status::request_drain(&js, node_id, cancel)
        .await
        .map_err(anyhow::Error::msg)?;
    if cancel {
        println!("{node_id}: drain cancelled; the coordinator assigns it shards again");
        return Ok(());
    }
    eprintln!("{node_id}: draining (its shards move to the other nodes)...");
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_s);
    loop {
        // The request is only seen once the coordinator has acted on it: give it a round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if crate::cluster::status::drained(&js, node_id)
            .await
            .map_err(anyhow::Error::msg)?
        {
            println!("{node_id} holds no shard, router or coordinator lease: it may stop now");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{node_id} still holds leases after {timeout_s} s; check `crm-node status` (is another node alive to take its shards?) and run drain again"
            );
        }
    }
}

/// `crm-node watch`.
pub async fn watch(url: &str, args: WatchArgs) -> Result<()> {
    let client = connect(url).await?;
    let mut subscription = client
        .subscribe(format!("{}.{}", subjects::EVENTS_PREFIX, args.filter))
        .await
        .map_err(|e| anyhow!("cannot subscribe: {e}"))?;
    let mut seen = 0u64;
    while let Some(message) = subscription.next().await {
        let event: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        if args.json {
            println!("{event}");
        } else {
            let mut rest = event.clone();
            if let Some(map) = rest.as_object_mut() {
                for key in ["v", "id", "type", "customer_id", "at"] {
                    map.remove(key);
                }
            }
            println!(
                "{} {:<26} {} {}",
                event["at"].as_str().unwrap_or("?"),
                event["type"].as_str().unwrap_or("?"),
                event["customer_id"].as_str().unwrap_or("?"),
                rest
            );
        }
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

/// `crm-node load`: publishes generated traffic with at most `in_flight_max` unacked.
pub async fn load(url: &str, args: LoadArgs) -> Result<()> {
    let start_ms = parse_rfc3339_ms(&args.start).map_err(|e| anyhow!("--start {e}"))?;
    let client = connect(url).await?;
    let js = jetstream::new(client);
    let generator = Generator::new(GeneratorSpec {
        customers: args.customers,
        start_ms,
        days: args.days,
        seed: args.seed,
        duplicate_rate_percent: args.duplicate_rate_percent,
    });
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(args.in_flight_max);
    let (mut sent, mut duplicates) = (0u64, 0u64);
    for event in generator {
        let publish = Publish::build()
            .payload(event.payload.into())
            .message_id(&event.event_id);
        in_flight.push_back(
            js.send_publish(subjects::ingest(&event.channel), publish)
                .await?,
        );
        sent += 1;
        if in_flight.len() >= args.in_flight_max {
            if let Some(ack) = in_flight.pop_front() {
                duplicates += u64::from(ack.await?.duplicate);
            }
        }
    }
    while let Some(ack) = in_flight.pop_front() {
        duplicates += u64::from(ack.await?.duplicate);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"published": sent, "deduplicated_by_jetstream": duplicates, "seconds": (seconds * 1000.0).round() / 1000.0,
               "events_per_s": (sent as f64 / seconds.max(1e-9)).round(), "from": format_rfc3339(start_ms), "days": args.days})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(customer_id: &str) -> Value {
        json!({"customer_id": customer_id, "identities": ["email"],
               "purchases": {"count": 3, "total_spend": 120.5},
               "loyalty": {"tier": "silver", "points_balance": 240, "points_pending": 0}})
    }

    #[test]
    fn the_view_of_a_merged_customer_opens_with_where_it_went() {
        let mut reply = view("c-ann");
        reply["requested_customer_id"] = json!("c-bob");
        reply["merged_into"] = json!("c-ann");
        let text = render_view(&reply);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("customer c-bob was merged into c-ann"));
        assert_eq!(lines.next(), Some("customer   c-ann"));
        assert!(text.contains("tier silver, 240 points"), "{text}");
    }

    #[test]
    fn the_view_of_a_customer_not_merged_starts_with_the_customer() {
        let text = render_view(&view("c-ann"));
        assert!(text.starts_with("customer   c-ann\n"), "{text}");
        assert!(!text.contains("merged"), "{text}");
    }
}
