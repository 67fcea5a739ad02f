//! Step `merges`: what identity merges cost (ARCHITECTURE.md invariant 7). Two parts, each
//! on a fresh server and node:
//!
//! 1. merges/s: N pairs of customers (one known by email, one by loyalty card) created and
//!    applied; then N `identify` events carrying both identifiers, published as fast as the
//!    bounded publisher allows; timed from the first publish until the node's
//!    `merges_applied` counter has grown by N (every survivor's `MergeIn` applied: the
//!    router's `MergeOut`, the merged customer's transfer, the survivor's merge). Then
//!    every shard's applied sequence is awaited once more at its log's end (MergeIns are
//!    appended after the MergeOuts apply), to confirm nothing is left.
//! 2. end-to-end with links: the e2e step's run ([`crate::steps::e2e::end_to_end`]) twice,
//!    each on a fresh server and node: the sample traffic as is, and with
//!    `with_split_identities(p)`, p chosen so that about `--link-share` of the events link
//!    two customers ([`crate::traffic::split_percent_for_link_share`]). A run with links
//!    ends when the e2e wait has ended and the node has applied as many merges as the
//!    router decided (identity counter `merges`), confirmed by a second wait at the logs'
//!    ends. The actual share (`merges` / events) and `links_rate / plain_rate` are reported.

use crate::cluster_status::{identity_delta, metrics_delta, node_stats, MetricsSnapshot};
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::figures::{round, seconds_between};
use crate::plan::Plan;
use crate::processes::{nats_pid, start_nats, BenchNode, NodeSettings};
use crate::report::Report;
use crate::say;
use crate::steps::e2e::{end_to_end, EndToEndDetails};
use crate::traffic::{
    connect, generated_traffic_split, link_share, publish_bounded, split_percent_for_link_share,
    traffic_start_ms, Outgoing,
};
use crate::waits::{wait_applied, StallWatch, DRAIN_POLL, PROGRESS_EVERY};
use anyhow::{bail, Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use crm_actors::time::format_rfc3339;
use crm_node::ingest::identity_directory::DirectoryMetrics;
use crm_node::subjects;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The target of `ratio_with_links` (the issue: traffic with links within 15 % of without).
pub const RATIO_WITH_LINKS_MIN: f64 = 0.85;

/// The `merges` step's details (`merges` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MergesDetails {
    /// Part 1, absent when it failed.
    pub pairs: Option<PairMerges>,
    /// Part 2 without links, absent when it failed.
    pub plain: Option<LinksRun>,
    /// Part 2 with links, absent when it failed.
    pub with_links: Option<LinksRun>,
    /// The share of linking events asked for (`--link-share`).
    pub link_share_target: f64,
    /// `with_split_identities` percent chosen for that share (100 when even that links
    /// fewer events than asked).
    pub split_percent: u8,
    /// The share that percent is expected to give, by the generator's probe population.
    pub link_share_expected: f64,
    /// `with_links.events_per_s / plain.events_per_s`; target >= 0.85.
    pub ratio_with_links: Option<f64>,
}

/// Part 1: N pairs merged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PairMerges {
    pub pairs: u64,
    /// Creating the 2 N customers until applied.
    pub setup_seconds: f64,
    /// First linking publish until `merges_applied` grew by N.
    pub seconds: f64,
    pub merges_per_s: f64,
    pub publish_done_s: f64,
    /// First linking publish until every shard's applied sequence was again at its log's end.
    pub logs_applied_s: f64,
    pub duplicates_acked: u64,
    /// How much each node counter grew during the merges (e.g. `merges_applied`,
    /// `transfers_published`).
    pub node_counters: MetricsSnapshot,
    /// How much each identity-directory counter grew (`merges`: the router's decisions).
    pub identity_counters: DirectoryMetrics,
    pub cpu: CpuUse,
}

/// Part 2: one e2e run, with or without links.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LinksRun {
    /// `with_split_identities` percent (0: the plain traffic).
    pub split_percent: u8,
    pub events: u64,
    /// First publish until applied and, with links, every merge applied.
    pub seconds: f64,
    pub events_per_s: f64,
    /// Merges the router decided (identity counter `merges`).
    pub links: u64,
    /// `links / events`.
    pub link_share: f64,
    /// First publish until `merges_applied` reached `links` (null without links).
    pub merges_applied_s: Option<f64>,
    /// First publish until every shard was again at its log's end after the merges.
    pub logs_applied_s: f64,
    /// The e2e step's details of this run (its `seconds` ends at its own wait).
    pub end_to_end: EndToEndDetails,
}

/// Runs both parts; fills the headline figures and `merges`.
pub async fn merges(plan: &Plan, report: &mut Report) {
    let mut details = MergesDetails {
        link_share_target: plan.link_share,
        ..Default::default()
    };
    say(format!(
        "step merges 1/2: {} pairs of customers merged on one node",
        plan.merge_pairs
    ));
    match pair_merges(plan).await {
        Ok(pairs) => {
            report.results.merges_per_s = Some(pairs.merges_per_s);
            details.pairs = Some(pairs);
        }
        Err(error) => report.fail("merges_pairs", error),
    }
    (details.split_percent, details.link_share_expected) =
        split_percent_for_link_share(plan.seed, plan.link_share);
    if details.link_share_expected + 0.005 < plan.link_share {
        say(format!(
            "    note: the generator links at most about {:.1} % of its events (every person split); --link-share {} is out of its reach",
            details.link_share_expected * 100.0,
            plan.link_share
        ));
    }
    for split_percent in [0, details.split_percent] {
        say(format!(
            "step merges 2/2: end-to-end, {} events, {split_percent} % of people split",
            plan.merge_events
        ));
        let (traffic, _) = generated_traffic_split(plan.merge_events, plan.seed, split_percent);
        match links_run(plan, traffic, split_percent).await {
            Ok(run) if split_percent == 0 => details.plain = Some(run),
            Ok(run) => details.with_links = Some(run),
            Err(error) => report.fail(&format!("merges_e2e_split_{split_percent}"), error),
        }
    }
    if let (Some(plain), Some(links)) = (&details.plain, &details.with_links) {
        report.results.merges_plain_events_per_s = Some(plain.events_per_s);
        report.results.merges_links_events_per_s = Some(links.events_per_s);
        report.results.link_share = Some(links.link_share);
        details.ratio_with_links = ratio(links.events_per_s, plain.events_per_s);
        report.results.ratio_with_links = details.ratio_with_links;
    }
    report.results.merges = Some(details);
}

/// `links / plain`, 3 decimals; `None` without a plain rate.
pub fn ratio(links: f64, plain: f64) -> Option<f64> {
    (plain > 0.0).then(|| round(links / plain, 3))
}

/// Part 1's events of pair `i`: an `identify` by email alone, one by card alone, and the
/// `identify` with both that links them (a day later).
fn pair_event(i: u64, email: bool, card: bool) -> Outgoing {
    let tag = match (email, card) {
        (true, false) => "e",
        (false, true) => "c",
        _ => "l",
    };
    let event_id = format!("mp-{i}-{tag}");
    let mut identity = Vec::with_capacity(2);
    if email {
        identity.push(format!(r#""email":"merge-pair-{i:07}@example.com""#));
    }
    if card {
        identity.push(format!(r#""loyalty_card":"MP-{i:07}""#));
    }
    let day_ms = if email && card { 86_400_000 } else { 0 };
    let body = format!(
        r#"{{"v":1,"event_id":"{event_id}","type":"identify","occurred_at":"{}","identity":{{{}}}}}"#,
        format_rfc3339(traffic_start_ms() + day_ms + i as i64),
        identity.join(",")
    );
    Outgoing {
        subject: subjects::ingest("store"),
        msg_id: event_id,
        payload: Bytes::from(body),
    }
}

async fn pair_merges(plan: &Plan) -> Result<PairMerges> {
    let pairs = plan.merge_pairs;
    let nats = start_nats(plan, "nats-merges")?;
    let client = connect(&nats.url()).await?;
    let mut node = BenchNode::start(plan, &nats.url(), &NodeSettings::single(plan.shards, None))?;
    let js = jetstream::new(client.clone());
    let timeout = Duration::from_secs(120 + pairs / 50);
    let setup_started = Instant::now();
    publish_bounded(
        &js,
        (0..pairs).flat_map(|i| [pair_event(i, true, false), pair_event(i, false, true)]),
        plan.in_flight,
        None,
    )
    .await
    .context("creating the pairs")?;
    wait_applied(&client, &mut node, plan.shards, timeout)
        .await
        .context("creating the pairs")?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let before = node_stats(&client).await?;
    let cpu_before = CpuSnapshot::take(nats_pid(&nats), Some(node.pid()));
    let published = publish_bounded(
        &js,
        (0..pairs).map(|i| pair_event(i, true, true)),
        plan.in_flight,
        None,
    )
    .await
    .context("publishing the links")?;
    let first = published.first_publish;
    let target = before.metrics.merges_applied + pairs;
    let merged_at = wait_merges_applied(&client, &mut node, target, timeout).await?;
    let drained = wait_applied(&client, &mut node, plan.shards, timeout)
        .await
        .context("after the merges")?;
    let cpu_after = CpuSnapshot::take(nats_pid(&nats), Some(node.pid()));
    let seconds = seconds_between(first, merged_at);
    Ok(PairMerges {
        pairs,
        setup_seconds: round(setup_seconds, 3),
        seconds: round(seconds, 3),
        merges_per_s: round(pairs as f64 / seconds.max(1e-9), 0),
        publish_done_s: round(seconds_between(first, published.last_ack), 3),
        logs_applied_s: round(seconds_between(first, drained.applied_at), 3),
        duplicates_acked: published.duplicates,
        node_counters: metrics_delta(&before.metrics, &drained.stats.metrics),
        identity_counters: identity_delta(&before.identity, &drained.stats.identity),
        cpu: cpu_before.since(&cpu_after),
    })
}

/// One e2e run on a fresh server and node; with links, until every merge is applied too.
async fn links_run(plan: &Plan, traffic: Vec<Outgoing>, split_percent: u8) -> Result<LinksRun> {
    let events = traffic.len() as u64;
    let nats = start_nats(plan, &format!("nats-merges-{split_percent}"))?;
    let client = connect(&nats.url()).await?;
    let mut node = BenchNode::start(plan, &nats.url(), &NodeSettings::single(plan.shards, None))?;
    let before = node_stats(&client).await?;
    let e2e = end_to_end(&client, &mut node, traffic, plan, nats_pid(&nats)).await?;
    let first = e2e.first_publish;
    let links = e2e.details.identity_counters.merges;
    let timeout = Duration::from_secs(120 + events / 200);
    let merged_at = match links {
        0 => None,
        _ => {
            let target = before.metrics.merges_applied + links;
            Some(wait_merges_applied(&client, &mut node, target, timeout).await?)
        }
    };
    let drained = wait_applied(&client, &mut node, plan.shards, timeout)
        .await
        .context("after the merges")?;
    let applied_s = e2e.details.seconds;
    let merges_applied_s = merged_at.map(|at| seconds_between(first, at));
    let seconds = applied_s.max(merges_applied_s.unwrap_or(0.0));
    Ok(LinksRun {
        split_percent,
        events,
        seconds: round(seconds, 3),
        events_per_s: round(events as f64 / seconds.max(1e-9), 0),
        links,
        link_share: link_share(links, events),
        merges_applied_s: merges_applied_s.map(|s| round(s, 3)),
        logs_applied_s: round(seconds_between(first, drained.applied_at), 3),
        end_to_end: e2e.details,
    })
}

/// Waits until the node's `merges_applied` counter reaches `target`; fails when it does not
/// move for the stall limit or by `timeout`. Returns the moment it did.
async fn wait_merges_applied(
    client: &async_nats::Client,
    node: &mut BenchNode,
    target: u64,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    let mut stall = StallWatch::new();
    let mut last_report = Instant::now();
    loop {
        node.check_alive()?;
        let stats = node_stats(client).await?;
        let applied = stats.metrics.merges_applied;
        if applied >= target {
            return Ok(Instant::now());
        }
        let transfers = stats.metrics.transfers_published;
        stall.observe(
            (applied, transfers, stats.metrics.applied),
            &format!("merges_applied {applied} of {target}, transfers_published {transfers}"),
        )?;
        if last_report.elapsed() >= PROGRESS_EVERY {
            say(format!(
                "    waiting for merges: merges_applied {applied} of {target}, transfers_published {transfers}"
            ));
            last_report = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!("merges_applied {applied}, not {target}, within {timeout:?}: see the node's log (--node-logs DIR)");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_links_over_plain_and_none_without_a_plain_rate() {
        assert_eq!(ratio(17_000.0, 20_000.0), Some(0.85));
        assert_eq!(ratio(1.0, 0.0), None);
    }

    #[test]
    fn a_pair_is_two_customers_and_a_link_carrying_both_identifiers() {
        let text = |o: &Outgoing| String::from_utf8(o.payload.to_vec()).expect("utf-8");
        let (email, card, link) = (
            pair_event(42, true, false),
            pair_event(42, false, true),
            pair_event(42, true, true),
        );
        let ids = [&email.msg_id, &card.msg_id, &link.msg_id];
        assert_eq!(ids, ["mp-42-e", "mp-42-c", "mp-42-l"]);
        for outgoing in [&email, &card, &link] {
            let value: serde_json::Value =
                serde_json::from_str(&text(outgoing)).expect("an event is JSON");
            assert_eq!(value["type"], "identify");
            assert_eq!(value["event_id"].as_str(), Some(outgoing.msg_id.as_str()));
        }
        let identity = |o: &Outgoing| {
            let value: serde_json::Value = serde_json::from_str(&text(o)).expect("JSON");
            value["identity"].clone()
        };
        assert_eq!(
            identity(&link),
            serde_json::json!({"email": "merge-pair-0000042@example.com", "loyalty_card": "MP-0000042"})
        );
        assert_eq!(identity(&email)["loyalty_card"], serde_json::Value::Null);
        assert_eq!(identity(&card)["email"], serde_json::Value::Null);
    }
}
