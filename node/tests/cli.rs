//! The `crm-node` command line without NATS: a bad config or rules file is refused before the
//! node connects anywhere (every fixture points NATS at a closed port, and a node that got as
//! far as connecting would log "NATS unreachable"), each error names the file and the field,
//! and the client subcommands reject bad arguments before they connect.
//!
//! Every process runs with a bound: it is killed and the test fails if it has not exited
//! after [`PROCESS_TIMEOUT`] (a node that accepted a bad config would wait for NATS forever).

#[path = "support/process.rs"]
mod process;

use process::{run_crm_node, run_crm_node_with_env, Finished};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest a refused command may run; it normally exits in milliseconds.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// What the node logs when it got past config validation and tries to connect.
const CONNECT_ATTEMPT_LOG: &str = "NATS unreachable";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Runs `crm-node <args>`; fails the test if it is still running after
/// [`PROCESS_TIMEOUT`].
fn crm_node(args: &[&str]) -> Finished {
    run_crm_node(args, PROCESS_TIMEOUT)
}

/// `crm-node run --config <fixture>` must fail before connecting, naming every `needle`.
fn assert_run_refused(config: &Path, needles: &[&str]) -> Finished {
    let config_text = config.to_str().expect("utf-8 path");
    let finished = crm_node(&["run", "--config", config_text]);
    assert!(
        !finished.status.success(),
        "crm-node run accepted {}:\n{}",
        config.display(),
        finished.output()
    );
    assert!(
        !finished.stderr.contains(CONNECT_ATTEMPT_LOG),
        "crm-node tried to connect to NATS before refusing {}:\n{}",
        config.display(),
        finished.output()
    );
    for needle in needles {
        assert!(
            finished.stderr.contains(needle),
            "the error for {} does not name '{needle}':\n{}",
            config.display(),
            finished.output()
        );
    }
    finished
}

#[test]
fn run_with_a_missing_config_file_fails_naming_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("no-such-node.toml");
    assert_run_refused(&missing, &[missing.to_str().expect("utf-8 path")]);
}

#[test]
fn run_with_an_unknown_config_key_fails_naming_the_key_and_the_file() {
    let config = fixture("bad-config-unknown-key.toml");
    assert_run_refused(
        &config,
        &["payload_max_bytez", "bad-config-unknown-key.toml"],
    );
}

#[test]
fn run_with_zero_shards_fails_naming_cluster_shards() {
    let config = fixture("bad-config-zero-shards.toml");
    assert_run_refused(&config, &["cluster.shards", "bad-config-zero-shards.toml"]);
}

#[test]
fn run_with_a_too_short_identity_secret_fails_naming_it() {
    let config = fixture("bad-config-short-secret.toml");
    let finished = assert_run_refused(
        &config,
        &["cluster.identity_secret", "bad-config-short-secret.toml"],
    );
    assert!(
        !finished.stderr.contains("too-short"),
        "the error echoes the secret itself:\n{}",
        finished.output()
    );
}

#[test]
fn run_with_rules_tiers_out_of_order_fails_naming_the_tier_threshold() {
    let config = fixture("bad-config-rules-tiers-out-of-order.toml");
    assert_run_refused(
        &config,
        &["tiers[2].threshold", "bad-rules-tiers-out-of-order.toml"],
    );
}

#[test]
fn run_with_negative_points_per_currency_unit_fails_naming_the_rules_field() {
    let config = fixture("bad-config-rules-negative-points.toml");
    assert_run_refused(
        &config,
        &[
            "earning.points_per_currency_unit",
            "bad-rules-negative-points.toml",
        ],
    );
}

#[test]
fn run_with_an_unknown_rules_key_fails_naming_the_key() {
    let config = fixture("bad-config-rules-unknown-key.toml");
    assert_run_refused(&config, &["points_per_euro", "bad-rules-unknown-key.toml"]);
}

#[test]
fn query_without_a_customer_fails_with_a_usage_error() {
    let finished = crm_node(&["--nats-url", "nats://127.0.0.1:1", "query"]);
    assert!(!finished.status.success(), "{}", finished.output());
    // clap's usage errors exit with 2; a runtime error (e.g. no NATS) would exit with 1.
    assert_eq!(
        finished.status.code(),
        Some(2),
        "not a usage error:\n{}",
        finished.output()
    );
    assert!(
        finished.stderr.contains("Usage"),
        "no usage text:\n{}",
        finished.output()
    );
    assert!(
        finished.stderr.contains("--customer-id") && finished.stderr.contains("--email"),
        "the usage error does not say how to name the customer:\n{}",
        finished.output()
    );
}

#[test]
fn tick_with_a_time_that_is_not_rfc3339_fails_naming_the_format() {
    let finished = crm_node(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "tick",
        "--at",
        "yesterday",
    ]);
    assert!(!finished.status.success(), "{}", finished.output());
    for needle in ["--at", "yesterday", "RFC 3339"] {
        assert!(
            finished.stderr.contains(needle),
            "the error does not name '{needle}':\n{}",
            finished.output()
        );
    }
    assert!(
        !finished.stderr.contains("cannot connect"),
        "tick tried to connect before checking --at:\n{}",
        finished.output()
    );
}

#[test]
fn help_lists_every_subcommand() {
    let finished = crm_node(&["--help"]);
    assert!(finished.status.success(), "{}", finished.output());
    let commands: Vec<&str> = finished
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for command in [
        "run", "send", "query", "redeem", "watch", "tick", "load", "stats",
    ] {
        assert!(
            commands.contains(&command),
            "--help does not list '{command}' (listed: {commands:?}):\n{}",
            finished.output()
        );
    }
}

/// Every config field can also come from the environment as `CRM_<SECTION>__<FIELD>`,
/// winning over the file: shown with values the node must refuse, before it connects.
#[test]
fn config_fields_come_from_the_environment_too() {
    let config = fixture("bad-config-zero-shards.toml");
    let config_text = config.to_str().expect("utf-8 path");
    let run = |env: &[(&str, &str)]| {
        run_crm_node_with_env(&["run", "--config", config_text], PROCESS_TIMEOUT, env)
    };
    // The environment repairs the file's zero shards, and breaks the batch size instead.
    let finished = run(&[
        ("CRM_CLUSTER__SHARDS", "8"),
        ("CRM_LIMITS__BATCH_MAX_EVENTS", "0"),
    ]);
    assert!(!finished.status.success(), "{}", finished.output());
    assert!(
        finished.stderr.contains("limits.batch_max_events")
            && !finished.stderr.contains("cluster.shards"),
        "{}",
        finished.output()
    );
    assert!(
        !finished.stderr.contains(CONNECT_ATTEMPT_LOG),
        "{}",
        finished.output()
    );
    // A field name that does not exist, and a section that does not exist.
    let typo = run(&[
        ("CRM_CLUSTER__SHARDS", "8"),
        ("CRM_LIMITS__BATCH_MAX_EVENTZ", "5"),
    ]);
    assert!(
        typo.stderr.contains("batch_max_eventz"),
        "{}",
        typo.output()
    );
    let section = run(&[
        ("CRM_CLUSTER__SHARDS", "8"),
        ("CRM_LIMIT__BATCH_MAX_EVENTS", "5"),
    ]);
    assert!(
        section.stderr.contains("CRM_LIMIT__BATCH_MAX_EVENTS"),
        "{}",
        section.output()
    );
}
