//! Unit tests of the node configuration: defaults, parsing, environment fields, overrides
//! and every range and cross-field check (each error names the file, the field and the fix).

use super::*;

const SECRET: &str = "[cluster]\nidentity_secret = \"0123456789abcdef-test\"\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("cluster-config/x.toml"))
}

fn error_of(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_file_with_only_the_secret_gets_every_default() {
    let config = parse(SECRET).expect("minimal config");
    assert_eq!(config.node.node_id, "node-1");
    assert_eq!(config.node.data_dir, Path::new(".data/node-1"));
    assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(config.cluster.shards, 64);
    assert_eq!(config.cluster.stream_replicas, 1);
    assert_eq!(config.cluster.ingest_duplicate_window_s, 120);
    assert_eq!(config.cluster.events_max_age_s, 3600);
    assert_eq!(config.limits.payload_max_bytes, 65536);
    assert_eq!(config.amount_max_minor(), 100_000_000);
    assert_eq!(config.limits.items_max, 200);
    assert_eq!(config.limits.item_qty_max, 10_000);
    assert_eq!(config.limits.batch_max_events, 512);
    assert_eq!(config.limits.resident_max_customers, 100_000);
    assert_eq!(config.limits.passivate_after_s, 600);
    assert_eq!(config.limits.identity_cache_max_entries, 200_000);
    assert_eq!(config.limits.tick_interval_s, 3600);
    assert_eq!(config.rules_path(), Path::new("cluster-config/rules.toml"));
}

#[test]
fn defaults_match_the_ingest_limits_of_the_domain() {
    let config = parse(SECRET).expect("minimal config");
    let domain = crm_actors::ingest::IngestLimits::default();
    assert_eq!(config.limits.payload_max_bytes, domain.payload_max_bytes);
    assert_eq!(config.amount_max_minor(), domain.amount_max_minor);
    assert_eq!(config.limits.items_max, domain.items_max);
    assert_eq!(config.limits.item_qty_max, domain.item_qty_max);
}

#[test]
fn a_relative_rules_path_resolves_against_the_config_directory() {
    let text = format!("{SECRET}[rules]\npath = \"rules/loyalty.toml\"\n");
    let config = Config::from_toml_str(&text, Path::new("/etc/crm/node.toml")).expect("config");
    assert_eq!(
        config.rules_path(),
        Path::new("/etc/crm/rules/loyalty.toml")
    );
    let text = format!("{SECRET}[rules]\npath = \"/opt/rules.toml\"\n");
    let config = Config::from_toml_str(&text, Path::new("/etc/crm/node.toml")).expect("config");
    assert_eq!(config.rules_path(), Path::new("/opt/rules.toml"));
}

#[test]
fn an_out_of_range_number_names_file_field_and_range() {
    let message = error_of(&format!("{SECRET}[limits]\nbatch_max_events = 0\n"));
    assert_eq!(
        message,
        "cluster-config/x.toml: limits.batch_max_events = 0: must be between 1 and 10000"
    );
    let message = error_of(&format!("{SECRET}shards = 5000\n"));
    assert!(
        message.contains("cluster.shards = 5000: must be between 1 and 4096"),
        "{message}"
    );
}

#[test]
fn an_ingest_age_shorter_than_a_day_is_refused() {
    let message = error_of(&format!("{SECRET}ingest_max_age_s = 60\n"));
    assert!(
        message.contains("cluster.ingest_max_age_s = 60") && message.contains("at least 86400"),
        "{message}"
    );
    for fine in ["0", "86400"] {
        let text = format!("{SECRET}ingest_max_age_s = {fine}\n");
        Config::from_toml_str(&text, Path::new("x.toml")).expect(fine);
    }
}

#[test]
fn environment_fields_set_typed_values_and_name_a_bad_section() {
    let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let text = with_env_fields(
        SECRET,
        &vars(&[
            ("CRM_LIMITS__BATCH_MAX_EVENTS", "256"),
            ("CRM_NATS__URL", "nats://10.0.0.5:4222"),
            ("CRM_CLUSTER__STREAM_REPLICAS", "3"),
        ]),
    )
    .expect("applied");
    let config = Config::from_toml_str(&text, Path::new("x.toml")).expect("config");
    assert_eq!(config.limits.batch_max_events, 256);
    assert_eq!(config.nats.url, "nats://10.0.0.5:4222");
    assert_eq!(config.cluster.stream_replicas, 3);
    let error = with_env_fields(SECRET, &vars(&[("CRM_LIMIT__X", "1")])).unwrap_err();
    assert!(error.contains("CRM_LIMIT__X"), "{error}");
}

#[test]
fn a_nats_url_list_is_split_and_each_server_checked() {
    assert_eq!(
        nats_urls("nats://a:4222,nats://b:4223"),
        vec!["nats://a:4222".to_string(), "nats://b:4223".to_string()]
    );
    let ok = parse(&format!(
        "[nats]\nurl = \"nats://127.0.0.1:4222,nats://127.0.0.1:4223\"\n{SECRET}"
    ));
    assert!(ok.is_ok(), "{ok:?}");
    let message = error_of(&format!(
        "[nats]\nurl = \"nats://a:4222,nats://b:x\"\n{SECRET}"
    ));
    assert!(
        message.contains("nats.url") && message.contains("separated by commas"),
        "{message}"
    );
}

#[test]
fn cluster_timings_and_the_shard_log_retention_rule_are_checked() {
    let message = error_of(&format!("{SECRET}shard_log_max_age_s = 100\n"));
    assert!(
        message.contains("cluster.shard_log_max_age_s = 100")
            && message.contains("at least 3 x snapshot_interval_s (180)"),
        "{message}"
    );
    let ok = parse(&format!(
        "{SECRET}shard_log_max_age_s = 180\nsnapshot_interval_s = 60\n"
    ));
    assert!(ok.is_ok(), "{ok:?}");
    let message = error_of(&format!("{SECRET}lease_margin_ms = 4000\n"));
    assert!(
        message.contains("cluster.lease_margin_ms = 4000")
            && message.contains("raise lease_timeout_ms"),
        "{message}"
    );
    let message = error_of(&format!("{SECRET}node_timeout_ms = 1500\n"));
    assert!(message.contains("cluster.node_timeout_ms"), "{message}");
    let settings = parse(SECRET).expect("defaults").cluster_settings();
    assert_eq!(settings.lease_timeout, Duration::from_secs(5));
    assert_eq!(settings.snapshot_piece_bytes, 512 * 1024);
}

#[test]
fn a_value_of_the_wrong_type_names_the_key() {
    let message = error_of(&format!("{SECRET}shards = \"many\"\n"));
    assert!(message.starts_with("cluster-config/x.toml: "), "{message}");
    assert!(message.contains("shards"), "{message}");
    assert!(message.contains("invalid type"), "{message}");
    let message = error_of(&format!("{SECRET}[limits]\nitems_max = -3\n"));
    assert!(message.contains("items_max"), "{message}");
}

#[test]
fn an_unknown_key_is_an_error_naming_the_key() {
    let message = error_of(&format!("{SECRET}[limits]\nbatch_max_event = 10\n"));
    assert!(
        message.contains("unknown field `batch_max_event`"),
        "{message}"
    );
    assert!(message.contains("docs/config.md"), "{message}");
    let message = error_of(&format!("{SECRET}[limitz]\n"));
    assert!(message.contains("unknown field `limitz`"), "{message}");
}

#[test]
fn a_missing_or_short_secret_says_how_to_set_it() {
    let message = error_of("[node]\nnode_id = \"node-1\"\n");
    assert!(
        message.contains("cluster.identity_secret = (missing)"),
        "{message}"
    );
    assert!(message.contains(IDENTITY_SECRET_ENV), "{message}");
    let message = error_of("[cluster]\nidentity_secret = \"short\"\n");
    assert!(message.contains("(5 bytes)"), "{message}");
    assert!(
        !message.contains("short"),
        "a secret is never echoed: {message}"
    );
}

#[test]
fn the_environment_secret_replaces_the_file_secret() {
    let config = Config::from_toml(
        "",
        Path::new("x.toml"),
        Some("from-the-environment-0123".to_string()),
    )
    .expect("config");
    assert_eq!(config.cluster.identity_secret, "from-the-environment-0123");
}

#[test]
fn bad_toml_syntax_names_the_line() {
    let message = error_of(&format!("{SECRET}[limits\nitems_max = 3\n"));
    assert!(message.starts_with("cluster-config/x.toml: "), "{message}");
    assert!(message.contains("line 3"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn cross_field_limits_are_checked() {
    let message = error_of(&format!(
        "{SECRET}[limits]\nrouter_batch_max_events = 4000\ningest_max_ack_pending = 100\n"
    ));
    assert!(
        message.contains("limits.ingest_max_ack_pending = 100"),
        "{message}"
    );
    let message = error_of(&format!(
        "{SECRET}[nats]\nconnect_retry_initial_ms = 900\nconnect_retry_max_ms = 100\n"
    ));
    assert!(
        message.contains("nats.connect_retry_max_ms = 100"),
        "{message}"
    );
    let message = error_of(&format!("{SECRET}[limits]\namount_max = 10.005\n"));
    assert!(message.contains("more than 2 decimals"), "{message}");
    let message = error_of(&format!("{SECRET}[node]\nnode_id = \"Node 1\"\n"));
    assert!(message.contains("node.node_id = \"Node 1\""), "{message}");
}

#[test]
fn amount_max_accepts_integers_and_decimals() {
    let config = parse(&format!("{SECRET}[limits]\namount_max = 2500\n")).expect("config");
    assert_eq!(config.amount_max_minor(), 250_000);
    let config = parse(&format!("{SECRET}[limits]\namount_max = 999.99\n")).expect("config");
    assert_eq!(config.amount_max_minor(), 99_999);
}

#[test]
fn overrides_replace_file_values_and_move_a_derived_data_dir() {
    let config = parse(SECRET).expect("config").with_overrides(Overrides {
        node_id: Some("node-7".to_string()),
        data_dir: None,
        nats_url: Some("nats://10.0.0.5:4222".to_string()),
    });
    config.validate().expect("valid");
    assert_eq!(config.node.node_id, "node-7");
    assert_eq!(config.node.data_dir, Path::new(".data/node-7"));
    assert_eq!(config.nats.url, "nats://10.0.0.5:4222");

    let explicit = parse(&format!("{SECRET}[node]\ndata_dir = \"/var/lib/crm\"\n"))
        .expect("config")
        .with_overrides(Overrides {
            node_id: Some("node-2".to_string()),
            ..Overrides::default()
        });
    assert_eq!(explicit.node.data_dir, Path::new("/var/lib/crm"));
    let moved = explicit.with_overrides(Overrides {
        data_dir: Some(PathBuf::from("/tmp/n2")),
        ..Overrides::default()
    });
    assert_eq!(moved.node.data_dir, Path::new("/tmp/n2"));

    let bad = parse(SECRET).expect("config").with_overrides(Overrides {
        node_id: Some("bad id".to_string()),
        ..Overrides::default()
    });
    assert!(bad.validate().is_err());
}

#[test]
fn derived_stream_settings_match_the_jetstream_defaults() {
    let config = parse(SECRET).expect("config");
    assert_eq!(config.stream_settings(), StreamSettings::default());
    assert_eq!(config.ingest_consumer_settings().ack_wait_s, 30);
    assert_eq!(config.ingest_consumer_settings().max_ack_pending, 8192);
}

#[test]
fn a_missing_file_names_the_path() {
    let error = Config::load(Path::new("/nonexistent/crm.toml")).expect_err("missing file");
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/crm.toml: cannot read"),
        "{error}"
    );
}

#[test]
fn every_cluster_config_file_loads_and_validates() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config");
    let mut node_ids = Vec::new();
    for name in ["single.toml", "node-1.toml", "node-2.toml", "node-3.toml"] {
        let path = directory.join(name);
        let text = std::fs::read_to_string(&path).expect("cluster-config file exists");
        let config = Config::from_toml_str(&text, &path)
            .unwrap_or_else(|error| panic!("{name} must load: {error}"));
        assert_eq!(config.rules_path(), directory.join("rules.toml"), "{name}");
        if name != "single.toml" {
            node_ids.push((config.node.node_id.clone(), config.node.data_dir.clone()));
        }
    }
    node_ids.sort();
    node_ids.dedup_by(|a, b| a.0 == b.0 || a.1 == b.1);
    assert_eq!(
        node_ids.len(),
        3,
        "node-N files need distinct node ids and data dirs"
    );
}

#[test]
fn the_documented_example_is_a_valid_full_config() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
    let text = std::fs::read_to_string(&docs).expect("docs/config.md exists");
    let example = text
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/config.md has a ```toml example");
    let parsed: toml::Value = toml::from_str(example).expect("example is TOML");
    let config = Config::from_toml_str(example, &docs).expect("example validates");
    // A full example: every section and every field is spelled out.
    let defaults = toml::Value::try_from(Config::default()).expect("defaults serialise");
    for (section, fields) in defaults.as_table().into_iter().flatten() {
        for field in fields.as_table().into_iter().flatten().map(|(k, _)| k) {
            assert!(
                parsed.get(section).and_then(|s| s.get(field)).is_some(),
                "docs example lacks {section}.{field}"
            );
        }
    }
    assert_eq!(config.node.node_id, "node-1");
}
