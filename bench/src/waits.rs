//! Waiting until a node or a cluster has applied what was published, without hanging: the
//! router's durable consumer drained, every shard's applied sequence at its log's last
//! record; a wait that sees no progress for [`STALL_AFTER`] fails its step (a stalled node)
//! instead of hanging the bench. [`Deployment`] is what the latency step drives: one node
//! ([`BenchNode`]) or a cluster ([`crate::bench_cluster::BenchCluster`]).

use crate::cluster_status::{node_stats, Counters, NodeStats};
use crate::processes::BenchNode;
use crate::say;
use anyhow::{anyhow, bail, Result};
use async_nats::jetstream;
use crm_node::subjects;
use std::time::{Duration, Instant};

/// Pause between two polls of the drain condition.
pub const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How often a long wait says what it waits for.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long a wait may see no progress at all before it declares the node stalled.
const STALL_AFTER: Duration = Duration::from_secs(30);
/// Extra patience for the router's consumer (its default ack wait equals STALL_AFTER).
const ROUTER_ACK_WAIT_SLACK: Duration = Duration::from_secs(15);

/// The router's durable consumer: (pending, unacked, ack floor stream sequence).
pub async fn router_progress(
    consumer: &mut jetstream::consumer::PullConsumer,
) -> Result<(u64, u64, u64)> {
    let info = consumer
        .info()
        .await
        .map_err(|e| anyhow!("router consumer info: {e}"))?;
    Ok((
        info.num_pending,
        info.num_ack_pending as u64,
        info.ack_floor.stream_sequence,
    ))
}

pub async fn router_consumer(js: &jetstream::Context) -> Result<jetstream::consumer::PullConsumer> {
    let stream = js
        .get_stream(subjects::INGEST_STREAM)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", subjects::INGEST_STREAM))?;
    stream
        .get_consumer(subjects::INGEST_DURABLE)
        .await
        .map_err(|e| anyhow!("consumer {}: {e}", subjects::INGEST_DURABLE))
}

/// The router's durable consumer: (pending, unacked), `None` while it does not exist yet.
pub async fn router_backlog(js: &jetstream::Context) -> Option<(u64, u64)> {
    let mut consumer = router_consumer(js).await.ok()?;
    router_progress(&mut consumer)
        .await
        .ok()
        .map(|(pending, unacked, _)| (pending, unacked))
}

/// The last sequence of every shard's log (0: none yet).
pub async fn shard_log_ends(js: &jetstream::Context, shards: u32) -> Result<Vec<u64>> {
    let stream = js
        .get_stream(subjects::SHARDS_STREAM)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", subjects::SHARDS_STREAM))?;
    let mut last = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        let sequence = stream
            .get_last_raw_message_by_subject(&subjects::shard(shard))
            .await
            .map(|m| m.sequence)
            .unwrap_or(0);
        last.push(sequence);
    }
    Ok(last)
}

/// Fails a wait when what it watches has not moved for [`STALL_AFTER`]: a node that
/// stopped making progress (a deadlock) ends the step instead of hanging the bench.
pub struct StallWatch {
    last: Option<(u64, u64, u64)>,
    since: Instant,
    limit: Duration,
}

impl StallWatch {
    pub fn new() -> StallWatch {
        StallWatch {
            last: None,
            since: Instant::now(),
            limit: STALL_AFTER,
        }
    }

    /// For the router's consumer: messages it holds unacked come back only after the
    /// consumer's ack wait (30 s by default, see [`RouterTail`]), which must not count as
    /// a stall.
    pub fn for_router() -> StallWatch {
        StallWatch {
            limit: STALL_AFTER + ROUTER_ACK_WAIT_SLACK,
            ..StallWatch::new()
        }
    }

    pub fn observe(&mut self, progress: (u64, u64, u64), what: &str) -> Result<()> {
        if self.last != Some(progress) {
            self.last = Some(progress);
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() >= self.limit {
            bail!(
                "no progress for {} s ({what}): the node is stalled (see 'Known problems' in docs/benchmark.md)",
                self.limit.as_secs()
            );
        }
        Ok(())
    }
}

/// When the drain condition became true.
pub struct Drained {
    /// The router had nothing pending or unacked.
    pub routed_at: Instant,
    /// Every shard's applied sequence had reached its last record.
    pub applied_at: Instant,
    pub stats: NodeStats,
}

/// Waits until everything published so far is applied and flushed: the router's durable
/// consumer has nothing pending or unacked (it acks ingest only after the shard publish is
/// acked, so the shard logs are then complete), and every shard's `applied_seq` (from
/// `crm.node.stats`, recorded after the engine's commit and flush) has reached the last
/// record of `crm.shard.<n>`. The logic of `src/cluster_env.rs` `busy_logs`, split in two
/// phases so that each poll stays cheap.
pub async fn wait_applied(
    client: &async_nats::Client,
    node: &mut BenchNode,
    shards: u32,
    timeout: Duration,
) -> Result<Drained> {
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + timeout;
    let mut consumer = router_consumer(&js).await?;
    let mut last_report = Instant::now();
    let mut stall = StallWatch::for_router();
    let mut tail = RouterTail::default();
    let routed_at = loop {
        node.check_alive()?;
        let (pending, unacked, floor) = router_progress(&mut consumer).await?;
        stall.observe(
            (pending, unacked, floor),
            &format!("router: {pending} pending, {unacked} unacked"),
        )?;
        if pending == 0 && unacked == 0 {
            break Instant::now();
        }
        tail.observe(pending, unacked);
        if last_report.elapsed() >= PROGRESS_EVERY {
            say(format!(
                "    waiting for the router: {pending} pending, {unacked} unacked"
            ));
            last_report = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!("router not drained within {timeout:?}: {pending} pending, {unacked} unacked");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let last = shard_log_ends(&js, shards).await?;
    let mut stall = StallWatch::new();
    loop {
        node.check_alive()?;
        let stats = node_stats(client).await?;
        let behind = (0..shards as usize)
            .filter(|&shard| stats.applied_seq(shard) < last[shard])
            .count();
        let applied_sum = (0..shards as usize)
            .map(|shard| stats.applied_seq(shard))
            .sum();
        stall.observe(
            (applied_sum, behind as u64, 0),
            &format!("{behind} shards behind their log"),
        )?;
        if last_report.elapsed() >= PROGRESS_EVERY && behind > 0 {
            let lagging: Vec<String> = (0..shards as usize)
                .filter(|&shard| stats.applied_seq(shard) < last[shard])
                .take(4)
                .map(|shard| {
                    format!(
                        "shard {shard} at {} of {}",
                        stats.applied_seq(shard),
                        last[shard]
                    )
                })
                .collect();
            say(format!(
                "    waiting for {behind} shards: {}",
                lagging.join(", ")
            ));
            last_report = Instant::now();
        }
        if behind == 0 {
            return Ok(Drained {
                routed_at,
                applied_at: Instant::now(),
                stats,
            });
        }
        if Instant::now() >= deadline {
            bail!("{behind} shards not applied within {timeout:?}");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What the latency run drives: one node, or a cluster of them.
pub trait Deployment {
    /// Fails when a node the run relies on has exited.
    fn check_alive(&mut self) -> Result<()>;
    /// The nodes' processes (for CPU accounting).
    fn node_pids(&self) -> Vec<u32>;
    /// `crm.node.stats`; for several nodes, every node's counters summed.
    async fn stats(&self, client: &async_nats::Client) -> Result<Counters>;
    /// Waits until everything published so far is applied.
    async fn wait_applied(&mut self, client: &async_nats::Client, timeout: Duration) -> Result<()>;
}

impl Deployment for BenchNode {
    fn check_alive(&mut self) -> Result<()> {
        BenchNode::check_alive(self)
    }

    fn node_pids(&self) -> Vec<u32> {
        vec![self.pid()]
    }

    async fn stats(&self, client: &async_nats::Client) -> Result<Counters> {
        node_stats(client).await.map(Counters::from)
    }

    async fn wait_applied(&mut self, client: &async_nats::Client, timeout: Duration) -> Result<()> {
        let shards = self.shards;
        wait_applied(client, self, shards, timeout)
            .await
            .map(|_| ())
    }
}

/// Notices a router that holds delivered messages unacked with nothing pending (they come
/// back only after the consumer's ack wait, `ack_wait_s`) and says so once.
#[derive(Default)]
pub struct RouterTail {
    since: Option<(u64, Instant)>,
    said: bool,
}

impl RouterTail {
    pub fn observe(&mut self, pending: u64, unacked: u64) {
        if pending != 0 || unacked == 0 || unacked == u64::MAX {
            self.since = None;
            return;
        }
        match self.since {
            Some((count, at)) if count == unacked => {
                if !self.said && at.elapsed() >= Duration::from_secs(5) {
                    say(format!(
                        "    note: the router holds {unacked} delivered messages unacked with nothing pending for {:.0} s; the server redelivers them after the consumer's ack wait (ack_wait_s, 30 s by default)",
                        at.elapsed().as_secs_f64()
                    ));
                    self.said = true;
                }
            }
            _ => self.since = Some((unacked, Instant::now())),
        }
    }
}
