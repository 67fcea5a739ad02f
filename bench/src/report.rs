//! What a run found: [`BenchResults`], the typed contents of `bench/results.json` (the
//! headline figures at the top, the targets, the machine and the run's settings, then each
//! step's details and the errors), the [`Report`] the steps fill as they go, and the table
//! printed at the end. The table reads typed fields only, so a misspelt figure is a compile
//! error rather than a "-" in the table.

use crate::figures::round;
use crate::plan::Plan;
use crate::steps::cluster::ClusterSizeDetails;
use crate::steps::cold::ColdDetails;
use crate::steps::e2e::EndToEndDetails;
use crate::steps::failover::FailoverRunDetails;
use crate::steps::kv::KvDiagnostic;
use crate::steps::latency::LatencyDetails;
use crate::steps::merges::{MergesDetails, RATIO_WITH_LINKS_MIN};
use crate::steps::raw::RawDetails;
use crate::steps::rss::MemoryDetails;
use crate::traffic::TrafficDetails;
use crm_actors::time::format_rfc3339;
use crm_testkit::paths::repo_root;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A figure per cluster size (`"1"`, `"2"`, ...); `null` where the size gave none.
pub type BySize = BTreeMap<String, Option<f64>>;

/// `bench/results.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BenchResults {
    pub end_to_end_events_per_s: Option<f64>,
    pub raw_jetstream_events_per_s: Option<f64>,
    /// End-to-end rate over the raw JetStream rate.
    pub ratio_to_raw: Option<f64>,
    pub p50_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub latency_rate_per_s: Option<f64>,
    /// RSS after the memory run's settle (named after the full run's million customers).
    pub rss_mb_1m_customers: Option<f64>,
    pub customers_stored: Option<u64>,
    pub rss_mb_resident_cap: Option<f64>,
    pub resident_cap: Option<u64>,
    pub cold_activation_us: Option<f64>,
    pub cold_activation_p99_us: Option<f64>,
    pub cluster_events_per_s: Option<BySize>,
    pub cluster_events_per_s_by_counters: Option<BySize>,
    pub cluster_latency_p50_ms: Option<BySize>,
    pub cluster_latency_p99_ms: Option<BySize>,
    pub cluster_latency_rate_per_s: Option<f64>,
    pub failover_s: Option<f64>,
    pub failover_median_s: Option<f64>,
    pub failover_caught_up_s: Option<f64>,
    pub failover_caught_up_median_s: Option<f64>,
    pub handoff_10k_s: Option<f64>,
    pub handoff_100k_s: Option<f64>,
    /// Merges applied per second (the `merges` step's pairs).
    pub merges_per_s: Option<f64>,
    /// The `merges` step's end-to-end rate without links and with them.
    pub merges_plain_events_per_s: Option<f64>,
    pub merges_links_events_per_s: Option<f64>,
    /// Linking events / events of the run with links.
    pub link_share: Option<f64>,
    /// With links over without; target >= 0.85.
    pub ratio_with_links: Option<f64>,
    /// `handoff_<customers>_s` of other `--handoff-customers` sizes.
    #[serde(flatten)]
    pub handoff_other_s: BTreeMap<String, Option<f64>>,
    pub events: u64,
    pub cluster_events: u64,
    pub targets: Targets,
    pub machine: Machine,
    pub run: RunSettings,
    pub load_average_at_start: Vec<f64>,
    /// Step details, absent when the step did not run or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_diagnostic: Option<KvDiagnostic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end: Option<EndToEndDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_warnings: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss: Option<MemoryDetails>,
    /// Per cluster size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<BTreeMap<String, ClusterSizeDetails>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverResults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffResults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merges: Option<MergesDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_activation: Option<ColdDetails>,
    /// Step name -> what failed.
    pub errors: BTreeMap<String, String>,
}

/// The targets the table checks.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Targets {
    pub ratio_to_raw_min: f64,
    pub p99_latency_ms_max: f64,
    pub failover_s_max: f64,
    pub handoff_10k_s_max: f64,
    pub ratio_with_links_min: f64,
}

impl Default for Targets {
    fn default() -> Targets {
        Targets {
            ratio_to_raw_min: 0.30,
            p99_latency_ms_max: 50.0,
            failover_s_max: 10.0,
            handoff_10k_s_max: 2.0,
            ratio_with_links_min: RATIO_WITH_LINKS_MIN,
        }
    }
}

/// The machine the run measured on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub memory_gib: Option<f64>,
    pub os: Option<String>,
    pub kernel: String,
    /// `nats-server --version`.
    pub nats_server: Option<String>,
    pub date: String,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub load_average_at_end: Vec<f64>,
}

/// The settings of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunSettings {
    /// `quick` or `full`.
    pub mode: String,
    pub seconds: f64,
    pub shards: u32,
    pub in_flight: usize,
    pub seed: u64,
    pub skipped: Vec<String>,
    pub node_config: String,
    pub cluster_nodes: Vec<usize>,
    pub failover_runs: u32,
    pub failover_rate_per_s: f64,
    pub handoff_customers: Vec<u64>,
    pub rules: String,
    pub command: String,
}

/// The failover step: every run's details, then the worst and the median.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FailoverResults {
    pub runs: Vec<FailoverRunDetails>,
    pub load_events_per_s: f64,
    pub nodes: u32,
    pub shards: u32,
    pub served_worst_s: Option<f64>,
    pub served_median_s: Option<f64>,
    pub served_by_node_logs_worst_s: Option<f64>,
    pub served_by_node_logs_median_s: Option<f64>,
    pub caught_up_worst_s: Option<f64>,
    pub caught_up_median_s: Option<f64>,
    pub method: String,
}

/// The hand-off step: one run per `--handoff-customers` value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HandoffResults {
    pub runs: Vec<HandoffRun>,
    pub method: String,
}

/// One hand-off run (see `steps::handoff`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HandoffRun {
    pub customers: u64,
    pub customers_published: u64,
    pub stored_customers: u64,
    pub feed_seconds: f64,
    pub sled_dir_mib_node_1: f64,
    /// From the drain request until node-2 serves the shard with nothing left to apply.
    pub handoff_s: f64,
    /// From the drain request until node-2 logs 'serving shard'.
    pub handoff_log_s: Option<f64>,
    pub assignment_written: Option<NodeMoment>,
    pub handing_off_s: Option<f64>,
    pub snapshot_written_s: Option<f64>,
    pub snapshot_bytes: Option<u64>,
    pub snapshot_entries: Option<u64>,
    pub snapshot_write_ms: Option<u64>,
    pub snapshot_restored_s: Option<f64>,
    pub snapshot_restore_ms: Option<u64>,
    pub shard_started_s: Option<f64>,
    pub shard_start_ms: Option<u64>,
    pub status_polls: u64,
    pub status_read_ms: crate::figures::Summary,
    pub status_trace: StatusTrace,
    pub cpu: crate::cpu::CpuUse,
}

/// A node and when (seconds after the run's reference moment) it logged something.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeMoment {
    pub node: String,
    pub s: f64,
}

/// Shard 0 as the hand-off's status polls saw it: `owner`, `assigned`, whether node-2
/// serves it, `applied_seq`, `last_seq`, `lag` (the names in [`StatusTrace::fields`]).
pub type SeenShard = (
    Option<String>,
    Option<String>,
    bool,
    Option<u64>,
    u64,
    Option<u64>,
);

/// The names of a [`SeenShard`]'s values, in order.
pub const SEEN_SHARD_FIELDS: [&str; 6] = [
    "owner",
    "assigned",
    "node-2 serves it",
    "applied_seq",
    "last_seq",
    "lag",
];

/// Every change of shard 0 the hand-off's status polls saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StatusTrace {
    /// What each value of `changes[].seen` is ([`SEEN_SHARD_FIELDS`]).
    pub fields: Vec<String>,
    pub changes: Vec<TraceChange>,
}

impl StatusTrace {
    pub fn new(changes: Vec<TraceChange>) -> StatusTrace {
        StatusTrace {
            fields: SEEN_SHARD_FIELDS.iter().map(|f| f.to_string()).collect(),
            changes,
        }
    }
}

/// Shard 0 as seen from `s` seconds after the drain request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TraceChange {
    pub s: f64,
    pub seen: SeenShard,
}

/// Everything the run found, as it goes.
#[derive(Default)]
pub struct Report {
    pub results: BenchResults,
}

impl Report {
    /// Records that `step` failed (the run goes on with the next step).
    pub fn fail(&mut self, step: &str, error: anyhow::Error) {
        eprintln!("!!! {step} failed: {error:#}");
        self.results
            .errors
            .insert(step.to_string(), format!("{error:#}"));
    }

    /// The results with the figures that need the whole run: the ratio to raw, the
    /// settings, the machine.
    pub fn finish(self, plan: &Plan, elapsed: Duration) -> BenchResults {
        let mut results = self.results;
        results.ratio_to_raw = match (
            results.end_to_end_events_per_s,
            results.raw_jetstream_events_per_s,
        ) {
            (Some(e2e), Some(raw)) if raw > 0.0 => Some(round(e2e / raw, 3)),
            _ => None,
        };
        results.events = plan.events;
        results.cluster_events = plan.cluster_events;
        results.targets = Targets::default();
        results.machine = machine(plan);
        results.run = RunSettings {
            mode: if plan.quick { "quick" } else { "full" }.to_string(),
            seconds: round(elapsed.as_secs_f64(), 1),
            shards: plan.shards,
            in_flight: plan.in_flight,
            seed: plan.seed,
            skipped: plan.skip.iter().cloned().collect(),
            node_config: "defaults, except tick_interval_s = 0, shards, node_id, resident_max_customers in the memory run, and shards = 1 in the hand-off runs".to_string(),
            cluster_nodes: plan.cluster_nodes.clone(),
            failover_runs: plan.failover_runs,
            failover_rate_per_s: plan.failover_rate,
            handoff_customers: plan.handoff_customers.clone(),
            rules: plan.rules.display().to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        };
        results
    }
}

/// The 1, 5 and 15 minute load averages (other work on the machine skews every figure).
pub fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn machine(plan: &Plan) -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    let memory_kib: Option<f64> = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string());
    let git = Path::new("git");
    let dirty = command_output(git, &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model,
        memory_gib: memory_kib.map(|k| round(k / 1048576.0, 1)),
        os,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        nats_server: command_output(&plan.nats_server, &["--version"]),
        date: format_rfc3339(now_ms),
        git_commit: command_output(git, &["rev-parse", "--short", "HEAD"]),
        git_dirty: dirty,
        load_average_at_end: load_average(),
    }
}

/// What `program args` printed (stdout, or stderr when stdout is empty), run at the
/// repository root; `None` when it failed.
fn command_output(program: &Path, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if text.is_empty() {
                String::from_utf8_lossy(&o.stderr).trim().to_string()
            } else {
                text
            }
        })
}

/// `value` with `decimals` decimals, or `-`.
fn figure(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(value) => format!("{value:.decimals$}"),
        None => "-".to_string(),
    }
}

/// `met`, `MISSED` or `-`.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "-",
    }
}

/// One row of the table: metric, value, target.
type Row = (String, String, String);

/// Prints the table of the headline figures and the failed steps.
pub fn print_table(results: &BenchResults) {
    let machine = &results.machine;
    println!();
    println!(
        "crm-bench ({}) on {} cores {}, {} GiB, {}",
        results.run.mode,
        machine.cores,
        machine.cpu_model.as_deref().unwrap_or("?"),
        crate::figures::or_null(machine.memory_gib),
        machine.nats_server.as_deref().unwrap_or("nats-server ?"),
    );
    let mut rows = single_node_rows(results);
    rows.extend(cluster_rows(results));
    rows.extend(failover_rows(results));
    rows.extend(handoff_rows(results));
    rows.extend(merges_rows(results));
    println!("{:<62} {:>12}  target", "metric", "value");
    for (name, value, target) in rows {
        println!("{name:<62} {value:>12}  {target}");
    }
    for (step, error) in &results.errors {
        println!("step {step} FAILED: {error}");
    }
}

fn single_node_rows(r: &BenchResults) -> Vec<Row> {
    let targets = Targets::default();
    let at_rate = format!("at {} events/s", figure(r.latency_rate_per_s, 0));
    vec![
        (
            "raw JetStream publish+consume (events/s)".into(),
            figure(r.raw_jetstream_events_per_s, 0),
            String::new(),
        ),
        (
            "end-to-end, published -> applied+flushed (events/s)".into(),
            figure(r.end_to_end_events_per_s, 0),
            String::new(),
        ),
        (
            "  ratio to raw".into(),
            figure(r.ratio_to_raw, 3),
            format!(
                ">= 0.30: {}",
                verdict(r.ratio_to_raw.map(|x| x >= targets.ratio_to_raw_min))
            ),
        ),
        (
            format!("latency p50 {at_rate} (ms)"),
            figure(r.p50_latency_ms, 2),
            String::new(),
        ),
        (
            format!("latency p99 {at_rate} (ms)"),
            figure(r.p99_latency_ms, 2),
            format!(
                "<= 50 ms: {}",
                verdict(r.p99_latency_ms.map(|p| p <= targets.p99_latency_ms_max))
            ),
        ),
        (
            format!(
                "RSS, resident cap reached ({} customers) (MiB)",
                figure(r.resident_cap.map(|c| c as f64), 0)
            ),
            figure(r.rss_mb_resident_cap, 0),
            String::new(),
        ),
        (
            format!(
                "RSS, {} customers stored (MiB)",
                figure(r.customers_stored.map(|c| c as f64), 0)
            ),
            figure(r.rss_mb_1m_customers, 0),
            String::new(),
        ),
        (
            "cold activation, mean (us)".into(),
            figure(r.cold_activation_us, 1),
            String::new(),
        ),
        (
            "cold activation, p99 (us)".into(),
            figure(r.cold_activation_p99_us, 1),
            String::new(),
        ),
    ]
}

fn merges_rows(r: &BenchResults) -> Vec<Row> {
    let targets = Targets::default();
    let share = r.link_share.map(|share| share * 100.0);
    vec![
        (
            "merges applied, pairs linked on one node (merges/s)".into(),
            figure(r.merges_per_s, 0),
            String::new(),
        ),
        (
            "end-to-end without links (events/s)".into(),
            figure(r.merges_plain_events_per_s, 0),
            String::new(),
        ),
        (
            format!(
                "end-to-end with {} % linking events (events/s)",
                figure(share, 1)
            ),
            figure(r.merges_links_events_per_s, 0),
            String::new(),
        ),
        (
            "  ratio with links / without".into(),
            figure(r.ratio_with_links, 3),
            format!(
                ">= 0.85: {}",
                verdict(
                    r.ratio_with_links
                        .map(|x| x >= targets.ratio_with_links_min)
                )
            ),
        ),
    ]
}

fn cluster_rows(r: &BenchResults) -> Vec<Row> {
    let in_map = |map: &Option<BySize>, size: &str, decimals: usize| {
        figure(
            map.as_ref().and_then(|m| m.get(size).copied().flatten()),
            decimals,
        )
    };
    let present = |map: &Option<BySize>, size: &str| {
        map.as_ref()
            .and_then(|m| m.get(size).copied().flatten())
            .is_some()
    };
    let mut rows = Vec::new();
    for size in r.run.cluster_nodes.iter().map(usize::to_string) {
        if !present(&r.cluster_events_per_s, &size) && !present(&r.cluster_latency_p99_ms, &size) {
            continue;
        }
        rows.push((
            format!("cluster, {size} node(s): published -> applied (events/s)"),
            in_map(&r.cluster_events_per_s, &size, 0),
            String::new(),
        ));
        rows.push((
            "  every event applied once, by the nodes' counters (events/s)".into(),
            in_map(&r.cluster_events_per_s_by_counters, &size, 0),
            String::new(),
        ));
        rows.push((
            format!(
                "cluster, {size} node(s): latency p50 / p99 at {} events/s (ms)",
                figure(r.cluster_latency_rate_per_s, 0)
            ),
            format!(
                "{} / {}",
                in_map(&r.cluster_latency_p50_ms, &size, 1),
                in_map(&r.cluster_latency_p99_ms, &size, 1)
            ),
            String::new(),
        ));
    }
    rows
}

fn failover_rows(r: &BenchResults) -> Vec<Row> {
    let Some(failover) = &r.failover else {
        return Vec::new();
    };
    let runs = failover.runs.len();
    let max = Targets::default().failover_s_max;
    vec![
        (
            format!("failover, SIGKILL -> shards served (s, worst of {runs})"),
            figure(r.failover_s, 2),
            format!("<= 10 s: {}", verdict(r.failover_s.map(|f| f <= max))),
        ),
        (
            "  median".into(),
            figure(r.failover_median_s, 2),
            String::new(),
        ),
        (
            format!("failover, SIGKILL -> backlog applied (s, worst of {runs})"),
            figure(r.failover_caught_up_s, 2),
            String::new(),
        ),
    ]
}

fn handoff_rows(r: &BenchResults) -> Vec<Row> {
    let max = Targets::default().handoff_10k_s_max;
    let mut rows = Vec::new();
    for run in r.handoff.iter().flat_map(|h| &h.runs) {
        let target = if run.customers == 10_000 {
            format!("<= 2 s: {}", verdict(Some(run.handoff_s <= max)))
        } else {
            String::new()
        };
        rows.push((
            format!(
                "hand-off, shard of {} customers: drain -> served (s)",
                run.customers
            ),
            figure(Some(run.handoff_s), 2),
            target,
        ));
        rows.push((
            "  drain -> 'serving shard' in node-2's log (s)".into(),
            figure(run.handoff_log_s, 2),
            String::new(),
        ));
        rows.push((
            "  snapshot (MiB)".into(),
            figure(run.snapshot_bytes.map(|b| b as f64 / 1048576.0), 1),
            String::new(),
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every headline figure is written, `null` when its step did not run; a step's details
    /// only when it ran; other hand-off sizes sit at the top like `handoff_10k_s`.
    #[test]
    fn results_keep_the_keys_of_results_json() {
        let mut results = BenchResults::default();
        results
            .handoff_other_s
            .insert("handoff_1k_s".to_string(), Some(0.5));
        let value = serde_json::to_value(&results).expect("results serialize");
        for key in [
            "end_to_end_events_per_s",
            "raw_jetstream_events_per_s",
            "ratio_to_raw",
            "p99_latency_ms",
            "cluster_events_per_s",
            "failover_s",
            "handoff_10k_s",
            "handoff_100k_s",
            "merges_per_s",
            "ratio_with_links",
        ] {
            assert_eq!(value[key], serde_json::Value::Null, "{key}");
        }
        assert_eq!(value["handoff_1k_s"], serde_json::json!(0.5));
        assert!(value.get("raw").is_none());
        assert!(value["errors"].as_object().is_some_and(|e| e.is_empty()));
        let back: BenchResults = serde_json::from_value(value).expect("results read back");
        assert_eq!(back.handoff_other_s.get("handoff_1k_s"), Some(&Some(0.5)));
    }

    /// Every step's details filled (defaults, one run or size each).
    fn every_step() -> BenchResults {
        BenchResults {
            traffic: Some(Default::default()),
            raw: Some(Default::default()),
            kv_diagnostic: Some(crate::steps::kv::KvDiagnostic {
                windows: vec![Default::default()],
                ..Default::default()
            }),
            end_to_end: Some(EndToEndDetails {
                timeline: vec![Default::default()],
                ..Default::default()
            }),
            latency: Some(Default::default()),
            node_warnings: Some(vec!["node-1: WARN something".to_string()]),
            rss: Some(crate::steps::rss::MemoryDetails {
                at_cap: Some(Default::default()),
                samples: vec![Default::default()],
                ..Default::default()
            }),
            cluster: Some(BTreeMap::from([("1".to_string(), Default::default())])),
            failover: Some(FailoverResults {
                runs: vec![FailoverRunDetails {
                    killed_roles: vec!["router".to_string()],
                    coordinator_taken_s: Some(NodeMoment {
                        node: "node-2".to_string(),
                        s: 1.5,
                    }),
                    timeline: vec![Default::default()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            handoff: Some(HandoffResults {
                runs: vec![HandoffRun {
                    assignment_written: Some(NodeMoment {
                        node: "node-1".to_string(),
                        s: 0.2,
                    }),
                    status_trace: StatusTrace::new(vec![TraceChange {
                        s: 0.1,
                        seen: (Some("node-1".into()), None, false, Some(3), 4, Some(1)),
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            merges: Some(MergesDetails {
                pairs: Some(Default::default()),
                plain: Some(Default::default()),
                with_links: Some(Default::default()),
                ..Default::default()
            }),
            cold_activation: Some(Default::default()),
            ..Default::default()
        }
    }

    /// The keys of the object at `path` (`/`-separated, as a JSON pointer).
    fn keys(value: &serde_json::Value, path: &str) -> Vec<String> {
        let mut keys: Vec<String> = value
            .pointer(path)
            .and_then(serde_json::Value::as_object)
            .unwrap_or_else(|| panic!("no object at {path}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        names.sort();
        names
    }

    /// Every step's details read back as written.
    #[test]
    fn every_step_round_trips() {
        let value = serde_json::to_value(every_step()).expect("results serialize");
        let back: BenchResults = serde_json::from_value(value.clone()).expect("read back");
        let again = serde_json::to_value(&back).expect("results serialize again");
        assert_eq!(again, value);
    }

    /// Each step's details keep the keys bench/results.json had (and docs/benchmark.md names).
    #[test]
    fn every_step_keeps_its_keys() {
        let value = serde_json::to_value(every_step()).expect("results serialize");
        let cpu = sorted(&[
            "wall_s",
            "nats_server_cpu_s",
            "crm_node_cpu_s",
            "bench_cpu_s",
            "nats_server_cores",
            "crm_node_cores",
            "bench_cores",
            "other_cores",
        ]);
        assert_eq!(keys(&value, "/raw/cpu_publish"), cpu);
        let expected: [(&str, &[&str]); 20] = [
            (
                "/merges",
                &[
                    "pairs",
                    "plain",
                    "with_links",
                    "link_share_target",
                    "link_share_expected",
                    "split_percent",
                    "ratio_with_links",
                ],
            ),
            (
                "/merges/pairs",
                &[
                    "pairs",
                    "setup_seconds",
                    "seconds",
                    "merges_per_s",
                    "publish_done_s",
                    "logs_applied_s",
                    "duplicates_acked",
                    "node_counters",
                    "identity_counters",
                    "cpu",
                ],
            ),
            (
                "/merges/with_links",
                &[
                    "split_percent",
                    "events",
                    "seconds",
                    "events_per_s",
                    "links",
                    "link_share",
                    "merges_applied_s",
                    "logs_applied_s",
                    "end_to_end",
                ],
            ),
            ("/traffic", &["generator", "events", "mean_payload_bytes"]),
            (
                "/traffic/generator",
                &["people", "days", "seed", "duplicate_rate_percent", "start"],
            ),
            (
                "/raw",
                &[
                    "events",
                    "seconds",
                    "events_per_s",
                    "publish_seconds",
                    "publish_events_per_s",
                    "consume_seconds",
                    "consume_events_per_s",
                    "in_flight",
                    "pull_batch",
                    "cpu_publish",
                    "cpu_consume",
                ],
            ),
            (
                "/kv_diagnostic",
                &[
                    "keys",
                    "sequential_get_then_create_per_s",
                    "windows",
                    "pipelined_creates",
                    "pipelined_in_flight",
                    "pipelined_creates_per_s",
                    "pipelined_failures",
                ],
            ),
            (
                "/kv_diagnostic/windows/0",
                &["keys_after", "get_miss_mean_us", "create_mean_us"],
            ),
            (
                "/end_to_end",
                &[
                    "events",
                    "seconds",
                    "events_per_s",
                    "publish_done_s",
                    "routed_done_s",
                    "applied_done_s",
                    "duplicates_acked",
                    "in_flight",
                    "shards",
                    "node_counters",
                    "identity_counters",
                    "mean_shard_batch_messages",
                    "mean_shard_batch_commands",
                    "cpu_while_publishing",
                    "cpu_after_publishing",
                    "cpu_total",
                    "timeline",
                ],
            ),
            (
                "/end_to_end/timeline/0",
                &["t_s", "published", "routed", "applied"],
            ),
            (
                "/latency",
                &[
                    "target_rate_per_s",
                    "achieved_rate_per_s",
                    "events",
                    "customers",
                    "seconds",
                    "publish_to_points_earned_ms",
                    "publish_to_shard_log_ms",
                    "publish_to_pub_ack_ms",
                    "points_earned_worst_ms_by_second",
                    "shard_log_worst_ms_by_second",
                    "points_earned_missing",
                    "shard_log_missing",
                    "pub_ack_failures",
                    "node_counters",
                    "cpu",
                ],
            ),
            (
                "/rss",
                &[
                    "customers_published",
                    "customers_applied",
                    "stored_customers_reported",
                    "resident_cap",
                    "rss_mib_at_start",
                    "rss_mib_resident_cap",
                    "at_cap",
                    "rss_mib_end_of_feed",
                    "rss_mib_after_settle",
                    "settle_seconds",
                    "rss_mib_peak",
                    "sled_dir_mib",
                    "feed_seconds",
                    "new_customers_per_s",
                    "cpu",
                    "samples",
                ],
            ),
            ("/rss/at_cap", &["applied", "rss_mib", "t_s"]),
            (
                "/rss/samples/0",
                &["t_s", "published", "applied", "rss_mib"],
            ),
            (
                "/cluster/1",
                &[
                    "nodes",
                    "shards",
                    "settle_s",
                    "coordinator",
                    "router",
                    "events_per_s",
                    "throughput",
                    "latency",
                    "node_warnings",
                ],
            ),
            (
                "/cluster/1/throughput",
                &[
                    "events",
                    "seconds",
                    "events_per_s",
                    "publish_done_s",
                    "routed_done_s",
                    "applied_done_s",
                    "applied_timing",
                    "status_confirmed_s",
                    "commands_applied_s",
                    "events_per_s_by_counters",
                    "audit_records",
                    "duplicates_acked",
                    "node_counters",
                    "identity_counters",
                    "mean_shard_batch_messages",
                    "cpu_while_publishing",
                    "cpu_total",
                    "shards_per_node",
                ],
            ),
            (
                "/failover/runs/0",
                &[
                    "run",
                    "settle_s",
                    "killed",
                    "killed_roles",
                    "killed_shards",
                    "survivors",
                    "failover_s",
                    "failover_log_s",
                    "first_apply_by_new_owner_worst_s",
                    "caught_up_s",
                    "caught_up_audit_s",
                    "router_unacked_when_caught_up",
                    "new_owners",
                    "shards_restored_from_snapshot",
                    "shard_start_ms",
                    "coordinator_taken_s",
                    "router_taken_s",
                    "first_assignment_after_kill",
                    "status_polls",
                    "status_read_ms",
                    "load_published",
                    "load_failures",
                    "shards_per_node_after",
                    "cpu_survivors",
                    "timeline",
                ],
            ),
            ("/failover/runs/0/coordinator_taken_s", &["node", "s"]),
            ("/handoff/runs/0/status_trace", &["fields", "changes"]),
            (
                "/cold_activation",
                &[
                    "method",
                    "customers_stored",
                    "events_applied",
                    "fill_seconds",
                    "fill_events_per_s",
                    "mean_state_bytes",
                    "cold_view_us",
                    "warm_view_us",
                    "activation_only_mean_us",
                    "sled_load_decode_us",
                    "resident_after_cold_views",
                    "runtime",
                ],
            ),
        ];
        for (path, names) in expected {
            assert_eq!(keys(&value, path), sorted(names), "{path}");
        }
        assert_eq!(
            value["cluster"]["1"]["throughput"]["applied_timing"],
            serde_json::json!("status")
        );
        assert_eq!(
            value["end_to_end"]["node_counters"]["shard_commands"],
            serde_json::json!(0)
        );
        assert_eq!(
            value["end_to_end"]["identity_counters"]["read_ahead_used"],
            serde_json::json!(0)
        );
        assert_eq!(
            value["handoff"]["runs"][0]["status_trace"],
            serde_json::json!({
                "fields": ["owner", "assigned", "node-2 serves it", "applied_seq", "last_seq", "lag"],
                "changes": [{"s": 0.1, "seen": ["node-1", null, false, 3, 4, 1]}],
            })
        );
        assert_eq!(
            value["handoff"]["runs"][0]["assignment_written"],
            serde_json::json!({"node": "node-1", "s": 0.2})
        );
    }

    #[test]
    fn results_have_a_schema() {
        let schema = schemars::schema_for!(BenchResults);
        let text = serde_json::to_string(&schema).expect("schema serializes");
        assert!(text.contains("raw_jetstream_events_per_s"));
    }
}
