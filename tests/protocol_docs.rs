//! The examples of the public docs are executed, so the docs cannot drift from the engine.
//!
//! docs/protocol.md: every fenced block whose info string is `json ingest <channel>` is
//! published to `crm.ingest.<channel>` (JetStream, `Nats-Msg-Id` = its `event_id`) and must
//! be applied, not dead-lettered; every `json dead-letter <reason>` block must land on
//! `crm.dlq.<reason>` with its bytes unchanged; the `json query` block must return a view with
//! every field of the reply table, and the `json redeem` block a reply with the documented
//! fields. The node runs with `cluster-config/rules.toml`, the rules the docs describe.
//!
//! docs/config.md: the full example config loads and validates and holds the defaults it
//! claims; the smallest example loads; every default in the field tables is the code's.

use async_nats::jetstream::{self, message::PublishMessage};
use crm_node::config::Config;
use crm_node::subjects;
use crm_testkit::cluster_env::{repo_file, request, wait_drained, NodeOptions, TestEnv};
use crm_testkit::schemas::{assert_matches_schema, schema_violations};
use crm_testkit::test_support::{publish, wait_for_dead_letters, DeadLetter};
use serde_json::{json, Value};
use std::time::Duration;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One fenced block: its info string (after the backticks) and its text.
#[derive(Debug, Clone)]
struct Block {
    info: String,
    text: String,
    /// 1-based line of the opening fence, for failure messages.
    line: usize,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match open.as_mut() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some(Block {
                        info: info.trim().to_string(),
                        text: String::new(),
                        line: index + 1,
                    });
                }
            }
            Some(block) => {
                if trimmed.starts_with("```") {
                    blocks.push(open.take().expect("open block"));
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "an unterminated fenced block");
    blocks
}

fn doc(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn blocks_with_info(blocks: &[Block], words: &[&str]) -> Vec<(Block, Vec<String>)> {
    blocks
        .iter()
        .filter_map(|block| {
            let tokens: Vec<&str> = block.info.split_whitespace().collect();
            (tokens.len() >= words.len() && tokens[..words.len()] == *words).then(|| {
                let rest = tokens[words.len()..]
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                (block.clone(), rest)
            })
        })
        .collect()
}

fn parse_json(block: &Block) -> Value {
    serde_json::from_str(&block.text).unwrap_or_else(|e| {
        panic!(
            "docs block at line {} ({}) is not JSON: {e}\n{}",
            block.line, block.info, block.text
        )
    })
}

/// Asserts `value` has every dotted path of `paths` (a present `null` counts: the doc lists
/// the field, the engine may have no value yet).
fn missing_fields(value: &Value, paths: &[&str]) -> Vec<String> {
    paths
        .iter()
        .filter(|path| {
            let mut cursor = value;
            for key in path.split('.') {
                match cursor.get(key) {
                    Some(next) => cursor = next,
                    None => return true,
                }
            }
            false
        })
        .map(|p| p.to_string())
        .collect()
}

/// The reply fields the query table of docs/protocol.md lists.
const VIEW_FIELDS: [&str; 29] = [
    "v",
    "customer_id",
    "identities",
    "profile",
    "consents",
    "purchases.count",
    "purchases.total_spend",
    "purchases.first_at",
    "purchases.last_at",
    "purchases.by_channel",
    "purchases.by_category",
    "returns.count",
    "returns.total",
    "loyalty.points_balance",
    "loyalty.points_pending",
    "loyalty.tier",
    "loyalty.lots",
    "loyalty.tier_history",
    "loyalty.shortfall",
    "retention.state",
    "retention.recency_days",
    "retention.frequency",
    "retention.monetary",
    "retention.mean_gap_days",
    "retention.reason",
    "retention.winback_offered",
    "timeline",
    "value.status",
    "next_best_actions",
];

/// The reply fields of `crm.cmd.redeem` in docs/protocol.md.
const REDEEM_FIELDS: [&str; 7] = [
    "request_id",
    "customer_id",
    "reward_id",
    "approved",
    "points_spent",
    "points_balance",
    "reason",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_example_is_accepted_dead_lettered_or_answered_as_documented() {
    let blocks = fenced_blocks(&doc("docs/protocol.md"));
    let ingest = blocks_with_info(&blocks, &["json", "ingest"]);
    let dead = blocks_with_info(&blocks, &["json", "dead-letter"]);
    let queries = blocks_with_info(&blocks, &["json", "query"]);
    let redeems = blocks_with_info(&blocks, &["json", "redeem"]);
    assert!(
        ingest.len() >= 9,
        "only {} ingest examples found",
        ingest.len()
    );
    assert!(!dead.is_empty(), "no dead-letter examples found");
    assert_eq!(queries.len(), 1, "expected one `json query` example");
    assert_eq!(redeems.len(), 1, "expected one `json redeem` example");
    let mut types_shown: Vec<String> = ingest
        .iter()
        .map(|(b, _)| parse_json(b)["type"].as_str().unwrap_or("?").to_string())
        .collect();
    types_shown.sort();
    types_shown.dedup();
    assert_eq!(
        types_shown.len(),
        crm_actors::ingest::EVENT_TYPES.len(),
        "the ingest examples do not show every event type: {types_shown:?}"
    );

    let env = TestEnv::start(NodeOptions {
        rules: repo_file("cluster-config/rules.toml"),
        ..NodeOptions::default()
    });
    let client = env.client().await;
    let js = jetstream::new(client.clone());

    // Ingest examples, in document order (the return needs the purchase and the identify).
    let mut accepted = Vec::new();
    for (block, rest) in &ingest {
        assert_eq!(
            rest.len(),
            1,
            "line {}: `json ingest <channel>` expected",
            block.line
        );
        let event = parse_json(block);
        let event_id = event["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("line {}: no event_id", block.line));
        let sequence = publish(&js, &rest[0], event_id, &block.text).await;
        accepted.push((block.clone(), rest[0].clone(), event, sequence));
    }
    // Dead-letter examples.
    let mut refused = Vec::new();
    for (block, rest) in &dead {
        assert_eq!(
            rest.len(),
            1,
            "line {}: `json dead-letter <reason>` expected",
            block.line
        );
        let event = parse_json(block);
        let event_id = event["event_id"]
            .as_str()
            .unwrap_or("doc-dead-letter")
            .to_string();
        let sequence = publish(&js, "web", &event_id, &block.text).await;
        refused.push((block.clone(), rest[0].clone(), sequence));
    }
    // "repeating the publish with the same Nats-Msg-Id ... returns "duplicate": true".
    let (first_block, first_channel, first_event, _) = &accepted[0];
    let repeat = js
        .send_publish(
            subjects::ingest(first_channel),
            PublishMessage::build()
                .payload(first_block.text.as_bytes().to_vec().into())
                .message_id(first_event["event_id"].as_str().expect("event_id")),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert!(
        repeat.duplicate,
        "a repeated Nats-Msg-Id was stored again: {repeat:?}"
    );
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let letters = wait_for_dead_letters(&js, refused.len()).await;
    let describe = |letters: &[DeadLetter]| {
        letters
            .iter()
            .map(|l| {
                format!(
                    "{} {:?} {:?} #{:?}: {}",
                    l.subject,
                    l.reason,
                    l.message,
                    l.source_sequence,
                    String::from_utf8_lossy(&l.body)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut problems = Vec::new();

    // No ingest example may be dead-lettered, and each must be applied (its timeline entry).
    for (block, channel, event, sequence) in &accepted {
        // The router keeps the bytes; a shard-level refusal names the event id in its message.
        let event_id = event["event_id"].as_str().unwrap_or("?");
        let ingest_sequence = sequence.to_string();
        if let Some(letter) = letters.iter().find(|l| {
            l.body == block.text.as_bytes()
                || l.source_sequence.as_deref() == Some(ingest_sequence.as_str())
                    && l.body.is_empty()
                || l.message.as_deref().is_some_and(|m| m.contains(event_id))
        }) {
            problems.push(format!(
                "ingest example at line {} was dead-lettered: {} {:?}",
                block.line, letter.subject, letter.message
            ));
            continue;
        }
        let view = request(
            &client,
            subjects::QUERY_CUSTOMER,
            &json!({"identity": event["identity"]}),
        )
        .await;
        let applied = view["timeline"].as_array().is_some_and(|timeline| {
            timeline.iter().any(|entry| {
                entry["type"] == event["type"]
                    && entry["channel"] == json!(channel)
                    && entry["at"] == event["occurred_at"]
            })
        });
        if !applied {
            problems.push(format!(
                "ingest example at line {} ({}) was not applied; view: {view}",
                block.line, event["event_id"]
            ));
        }
    }
    // Every dead-letter example lands on its subject with its bytes unchanged.
    for (block, reason, _) in &refused {
        match letters.iter().find(|l| l.body == block.text.as_bytes()) {
            None => problems.push(format!(
                "dead-letter example at line {} is not in CRM_DLQ",
                block.line
            )),
            Some(letter) => {
                if letter.subject != format!("crm.dlq.{reason}")
                    || letter.reason.as_deref() != Some(reason.as_str())
                {
                    problems.push(format!(
                        "dead-letter example at line {} landed on {} (Crm-Reason {:?}, {:?}), not crm.dlq.{reason}",
                        block.line, letter.subject, letter.reason, letter.message
                    ));
                }
            }
        }
    }

    // The query example, after the ingest examples: every documented field.
    let (query_block, _) = &queries[0];
    let view = request(&client, subjects::QUERY_CUSTOMER, &parse_json(query_block)).await;
    let missing = missing_fields(&view, &VIEW_FIELDS);
    if !missing.is_empty() {
        problems.push(format!(
            "the query example's reply lacks {missing:?}: {view}"
        ));
    }
    for violation in schema_violations("customer-reply.schema.json", &view) {
        problems.push(format!(
            "the query example's reply breaks docs/schema/customer-reply.schema.json {violation}: {view}"
        ));
    }
    // What the examples tell: one purchase of 59.90 linked to LC-42 through the email, and
    // one return of 10.00 of it.
    if view["purchases"]["count"] != json!(1) || view["returns"]["count"] != json!(1) {
        problems.push(format!(
            "the LC-42 customer does not hold the example purchase and return: {view}"
        ));
    }

    // A node's counters, as `crm.node.stats` answers.
    let stats = request(&client, subjects::NODE_STATS, &json!({})).await;
    for violation in schema_violations("node-stats.schema.json", &stats) {
        problems.push(format!(
            "the crm.node.stats reply breaks docs/schema/node-stats.schema.json {violation}: {stats}"
        ));
    }

    // The redeem example.
    let (redeem_block, _) = &redeems[0];
    let redeem = request(&client, subjects::CMD_REDEEM, &parse_json(redeem_block)).await;
    let missing = missing_fields(&redeem, &REDEEM_FIELDS);
    if !missing.is_empty() {
        problems.push(format!(
            "the redeem example's reply lacks {missing:?}: {redeem}"
        ));
    }
    if redeem["customer_id"] != view["customer_id"] {
        problems.push(format!(
            "the redeem example did not reach the LC-42 customer: {redeem}"
        ));
    }

    assert!(
        problems.is_empty(),
        "{} problems with docs/protocol.md:\n{}\n\nCRM_DLQ holds:\n{}",
        problems.len(),
        problems.join("\n"),
        describe(&letters)
    );
}

#[test]
fn the_redeem_example_names_a_reward_of_the_rules_catalogue() {
    let blocks = fenced_blocks(&doc("docs/protocol.md"));
    let redeems = blocks_with_info(&blocks, &["json", "redeem"]);
    assert_eq!(redeems.len(), 1, "expected one `json redeem` example");
    let example = parse_json(&redeems[0].0);
    let reward = example["reward_id"]
        .as_str()
        .expect("reward_id")
        .to_string();
    let rules = crm_actors::rules::Rules::load(&repo_file("cluster-config/rules.toml"))
        .expect("cluster-config/rules.toml loads");
    assert!(
        rules.rewards.contains_key(&reward),
        "docs/protocol.md (line {}): the redeem example asks for reward_id '{reward}', which is not in \
         cluster-config/rules.toml (rewards: {:?}); it can only ever be denied with unknown_reward",
        redeems[0].0.line,
        rules.rewards.keys().collect::<Vec<_>>()
    );
}

#[test]
fn the_full_config_example_loads_validates_and_holds_the_defaults() {
    let blocks = fenced_blocks(&doc("docs/config.md"));
    let toml_blocks: Vec<&Block> = blocks.iter().filter(|b| b.info == "toml").collect();
    assert_eq!(
        toml_blocks.len(),
        1,
        "expected one ```toml example in docs/config.md"
    );
    let block = toml_blocks[0];
    // As if the example were a file in docs/: its rules path is "../cluster-config/rules.toml".
    let origin = repo_file("docs/example-node.toml");
    let config = Config::from_toml_str(&block.text, &origin).unwrap_or_else(|e| {
        panic!(
            "docs/config.md example (line {}) is refused: {e}",
            block.line
        )
    });
    config.validate().expect("the example validates");
    assert!(
        config.rules_path().is_file(),
        "the example's rules path does not name a file: {}",
        config.rules_path().display()
    );

    // "A full config with the default values (except the node identity and the secret)".
    let defaults = serde_json::to_value(Config::default()).expect("json");
    let example = serde_json::to_value(&config).expect("json");
    let mut differences = Vec::new();
    for section in ["node", "nats", "cluster", "limits"] {
        for (key, default) in defaults[section].as_object().expect("section") {
            let field = format!("{section}.{key}");
            if ["node.node_id", "node.data_dir", "cluster.identity_secret"]
                .contains(&field.as_str())
            {
                continue;
            }
            let value = &example[section][key];
            let same = match (value.as_f64(), default.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => value == default,
            };
            if !same {
                differences.push(format!("{field} = {value} (default {default})"));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "docs/config.md says its full example holds the defaults except the node identity and the \
         secret, but it differs in: {differences:?}"
    );
}

#[test]
fn the_smallest_config_example_loads() {
    let markdown = doc("docs/config.md");
    let blocks = fenced_blocks(&markdown);
    let smallest = blocks
        .iter()
        .find(|b| b.text.contains("identity_secret") && b.info != "toml")
        .expect("the smallest-file example");
    let config = Config::from_toml_str(&smallest.text, &repo_file("cluster-config/smallest.toml"))
        .unwrap_or_else(|e| {
            panic!(
                "docs/config.md smallest example (line {}) is refused: {e}",
                smallest.line
            )
        });
    assert_eq!(config.cluster.shards, Config::default().cluster.shards);
}

/// Each row of the `[section]` tables: `| \`field\` | \`default\` | range | meaning |`.
#[test]
fn every_default_in_the_config_tables_is_the_code_default() {
    let markdown = doc("docs/config.md");
    let defaults = serde_json::to_value(Config::default()).expect("json");
    let mut section = String::new();
    let mut checked = 0;
    let mut differences = Vec::new();
    for line in markdown.lines() {
        if let Some(name) = line
            .strip_prefix("## `[")
            .and_then(|rest| rest.strip_suffix("]`"))
        {
            section = name.to_string();
            continue;
        }
        if line.starts_with("## ") {
            section.clear();
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if section.is_empty() || cells.len() < 4 {
            continue;
        }
        let (Some(field), Some(default_text)) = (
            cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`')),
            cells[2].strip_prefix('`').and_then(|c| c.strip_suffix('`')),
        ) else {
            continue;
        };
        let code = &defaults[section.as_str()][field];
        if code.is_null() {
            differences.push(format!(
                "{section}.{field}: documented, but not a config field"
            ));
            continue;
        }
        let documented: Value = if let Some(text) = default_text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
        {
            json!(text)
        } else if let Ok(number) = default_text.parse::<f64>() {
            json!(number)
        } else {
            continue;
        };
        if documented.as_str().is_some_and(|t| t.contains('<')) {
            continue; // ".data/<node_id>": derived, checked by the config unit tests
        }
        let same = match (documented.as_f64(), code.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => &documented == code,
        };
        checked += 1;
        if !same {
            differences.push(format!(
                "{section}.{field}: documented {documented}, code {code}"
            ));
        }
    }
    assert!(checked >= 30, "only {checked} table defaults were read");
    assert!(
        differences.is_empty(),
        "docs/config.md tables disagree with the code: {differences:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_event_example_matches_the_event_published_for_the_purchase_example() {
    let blocks = fenced_blocks(&doc("docs/protocol.md"));
    let example = blocks
        .iter()
        .find(|b| b.info == "json actor-event")
        .map(parse_json)
        .expect("the actor event example");
    let event_id = example["id"]
        .as_str()
        .expect("id")
        .split(':')
        .next()
        .expect("event id");
    let (purchase_block, rest) = blocks_with_info(&blocks, &["json", "ingest"])
        .into_iter()
        .find(|(b, _)| parse_json(b)["event_id"] == json!(event_id))
        .expect("the ingest example the actor event example belongs to");

    let env = TestEnv::start(NodeOptions {
        rules: repo_file("cluster-config/rules.toml"),
        ..NodeOptions::default()
    });
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    publish(&js, &rest[0], event_id, &purchase_block.text).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;
    let purchase = parse_json(&purchase_block);
    let view = request(
        &client,
        subjects::QUERY_CUSTOMER,
        &json!({"identity": purchase["identity"]}),
    )
    .await;
    let subject = format!(
        "crm.events.{}.{}",
        example["type"].as_str().expect("type"),
        view["customer_id"].as_str().expect("customer_id")
    );
    let message = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("CRM_EVENTS")
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap_or_else(|e| panic!("no actor event on {subject}: {e}"));
    let event: Value = serde_json::from_slice(&message.payload).expect("actor event JSON");
    assert_matches_schema(
        "actor-event.schema.json",
        &event,
        "the published actor event",
    );
    let missing: Vec<&String> = example
        .as_object()
        .expect("object")
        .keys()
        .filter(|k| event.get(k.as_str()).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "the published event lacks {missing:?} shown in the example: {event}"
    );
    // With cluster-config/rules.toml (the rules the docs describe), so the id and points
    // shown must be what the engine publishes for that purchase.
    assert_eq!(
        (&event["id"], &event["points"]),
        (&example["id"], &example["points"]),
        "docs/protocol.md actor event example {example} differs from the event published for \
         ingest example {event_id} under cluster-config/rules.toml: {event}"
    );
}
