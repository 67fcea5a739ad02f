//! Customer value end to end: purchases through NATS into a real node, a cluster fit on
//! `crm.cmd.value.fit` (and `crm-node value-fit`), and the 360 views' `value` blocks,
//! checked against the offline command `crm-node clv fit` on the same purchases.

use crm_node::subjects;
use crm_testkit::cluster_env::{fixture, request, NodeOptions, Outgoing, TestEnv};
use crm_testkit::node_process::run_cli;
use crm_testkit::schemas::assert_matches_schema;
use crm_testkit::test_support::{
    outgoing, replay_events, send, start_env, view_of, EventLog, SHARDS,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const RULES: &str = "rules-e2e.toml";
/// 2026-10-31, as days since 1970-01-01.
const AS_OF_DAY: i32 = 20_757;
const AS_OF: &str = "2026-10-31";
const CUSTOMERS: usize = 500;

fn date(day: i32) -> time::Date {
    crm_actors::time::date_of_day(day)
}

fn email(customer: usize) -> String {
    format!("value-{customer:04}@example.com")
}

/// Purchases drawn from the BG/NBD and Gamma-Gamma processes (rate ~ Gamma(0.8, 30 days),
/// drop-out ~ Beta(0.8, 3), spend ~ Gamma-Gamma(6, 4, 15)): (customer, day, amount in
/// cents). Some customers buy twice on one day; some buy after the as-of day (the fit must
/// ignore those).
fn purchases(seed: u64) -> Vec<(usize, i32, i64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lines = Vec::new();
    for customer in 0..CUSTOMERS {
        let rate = gamma(&mut rng, 0.8, 1.0 / 30.0);
        let (x, y) = (gamma(&mut rng, 0.8, 1.0), gamma(&mut rng, 3.0, 1.0));
        let drop_out = x / (x + y);
        let spend_rate = gamma(&mut rng, 4.0, 1.0 / 15.0);
        let mut day = f64::from(AS_OF_DAY - rng.gen_range(20..300));
        loop {
            let amount = gamma(&mut rng, 6.0, 1.0 / spend_rate);
            let cents = ((amount * 100.0).round() as i64).max(1);
            lines.push((customer, day as i32, cents));
            if rng.gen_bool(0.05) {
                lines.push((customer, day as i32, 1_250));
            }
            if rng.gen_bool(drop_out) {
                break;
            }
            day += -(1.0 - rng.gen::<f64>()).ln() / rate.max(1e-9);
            if day > f64::from(AS_OF_DAY + 20) {
                break;
            }
        }
    }
    lines
}

/// A Gamma(shape, scale) draw (Marsaglia and Tsang; shapes below 1 boosted).
fn gamma(rng: &mut StdRng, shape: f64, scale: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.gen();
        return gamma(rng, shape + 1.0, scale) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (u1, u2): (f64, f64) = (rng.gen(), rng.gen());
        let normal = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = (1.0 + c * normal).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.gen();
        if u.ln() < 0.5 * normal * normal + d - d * v + d * v.ln() {
            return d * v * scale;
        }
    }
}

/// The purchases as adapter events (event and order ids start with `prefix`), over web
/// and store.
fn purchase_events(lines: &[(usize, i32, i64)], prefix: &str) -> Vec<Outgoing> {
    lines
        .iter()
        .enumerate()
        .map(|(index, &(customer, day, cents))| {
            outgoing(
                if index % 3 == 0 { "store" } else { "web" },
                json!({"v": 1, "event_id": format!("{prefix}-{index}"), "type": "purchase",
                       "occurred_at": at(day, index),
                       "identity": {"email": email(customer)},
                       "order_id": format!("{prefix}o-{index}"),
                       "amount": cents as f64 / 100.0, "currency": "EUR"}),
            )
        })
        .collect()
}

fn at(day: i32, index: usize) -> String {
    let date = date(day);
    format!("{date}T{:02}:{:02}:00Z", 8 + index % 12, index % 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_value_block_matches_the_offline_models_on_the_same_purchases() {
    let env = start_env(RULES);
    let client = env.client().await;
    let events_seen = EventLog::start(&client).await;
    let lines = purchases(11);

    // Before any fit the view says so.
    send(
        &client,
        vec![outgoing(
            "web",
            json!({"v": 1, "event_id": "v-identify", "type": "identify",
                   "occurred_at": "2026-05-01T10:00:00Z",
                   "identity": {"email": email(0)}, "profile": {"first_name": "Val"}}),
        )],
    )
    .await;
    let before = view_of(&client, json!({"email": email(0)})).await;
    assert_eq!(before["value"]["status"], "no_model", "{before}");

    let events = purchase_events(&lines, "v");
    send(&client, events).await;

    // The offline command on the same purchases, as a CSV.
    let mut csv = String::from("customer_id,date,amount\n");
    for &(customer, day, cents) in &lines {
        csv.push_str(&format!(
            "{},{},{}.{:02}\n",
            email(customer),
            date(day),
            cents / 100,
            cents % 100
        ));
    }
    let csv_path = env.dir.path().join("transactions.csv");
    std::fs::write(&csv_path, &csv).expect("csv written");
    let csv_arg = csv_path.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "clv",
            "fit",
            "--transactions",
            &csv_arg,
            "--as-of",
            AS_OF,
            "--json",
        ])
    })
    .await
    .expect("cli ran");
    assert!(ok, "crm-node clv fit failed: {stderr}");
    let offline_json: Value = serde_json::from_str(&stdout).expect("clv fit --json prints JSON");
    // The example of docs/protocol.md is the request.
    let example = doc_example();
    assert_eq!(
        example["as_of"], AS_OF,
        "the docs' example changed its as_of"
    );
    let model = request(&client, subjects::CMD_VALUE_FIT, &example).await;
    for field in [
        "version",
        "as_of",
        "time_unit",
        "horizon_periods",
        "discount_rate",
        "bgnbd",
        "gamma_gamma",
        "log_likelihood",
        "customers",
        "repeat_buyers",
        "recency_days_quintiles",
        "frequency_quintiles",
        "monetary_quintiles",
        "clv_p99",
        "clv_p80",
        "clv_p50",
    ] {
        assert!(
            model.get(field).is_some(),
            "the fit reply lacks {field}: {model}"
        );
    }
    assert!(model.get("error").is_none(), "fit failed: {model}");
    assert_eq!(model["version"], 1);
    assert_eq!(model["as_of"], AS_OF);
    assert_eq!(model["customers"], CUSTOMERS as u64);

    for name in ["r", "alpha", "a", "b"] {
        close(
            &model["bgnbd"][name],
            &offline_json["purchase_model"]["params"][name],
            name,
        );
    }
    for name in ["p", "q", "gamma"] {
        close(
            &model["gamma_gamma"][name],
            &offline_json["spend_model"]["params"][name],
            name,
        );
    }

    let by_customer: BTreeMap<&str, &Value> = offline_json["customers"]
        .as_array()
        .expect("customers")
        .iter()
        .map(|c| (c["customer_id"].as_str().expect("id"), c))
        .collect();
    let mut segments = BTreeMap::new();
    for customer in (0..CUSTOMERS).step_by(7) {
        let identity = json!({"email": email(customer)});
        let value = scored_value(&client, identity).await;
        let expected = by_customer[email(customer).as_str()];
        assert_eq!(value["model_version"], 1);
        for (mine, theirs) in [
            ("frequency", "frequency"),
            ("recency", "recency"),
            ("T", "T"),
            ("monetary", "monetary"),
            ("p_alive", "p_alive"),
            ("expected_purchases", "expected_purchases"),
            ("expected_avg_spend", "expected_avg_spend"),
            ("clv", "clv"),
        ] {
            close(&value[mine], &expected[theirs], mine);
        }
        for score in ["r", "f", "m"] {
            let score = value["rfm"][score].as_u64().expect("rfm score");
            assert!((1..=5).contains(&score), "{value}");
        }
        let segment = value["segment"].as_str().expect("segment").to_string();
        // The model reached the shard log: the customer's segment was announced, and a
        // customer of a valuable segment at risk raised churn.risk.
        let view = view_of(&client, json!({"email": email(customer)})).await;
        let customer_id = view["customer_id"].as_str().expect("customer_id");
        let changes = events_seen
            .wait_for(customer_id, "value.segment_changed", 1)
            .await;
        assert_eq!(changes.last().expect("one")["to"], segment.as_str());
        let p_alive = value["p_alive"].as_f64().expect("p_alive");
        if p_alive < 0.5 && ["top_1_percent", "top_20_percent"].contains(&segment.as_str()) {
            events_seen.wait_for(customer_id, "churn.risk", 1).await;
        }
        *segments.entry(segment).or_insert(0) += 1;
    }
    assert!(
        segments.len() >= 2,
        "one segment for everybody: {segments:?}"
    );
    // Every customer's announcement is kept in CRM_EVENTS (ids name the customer, so the
    // stream's dedup keeps them all), once each.
    let stored = replay_events(&client, "crm.events.value.segment_changed.>").await;
    let customers: std::collections::BTreeSet<&str> = stored
        .iter()
        .map(|(_, event)| event["customer_id"].as_str().expect("customer_id"))
        .collect();
    assert_eq!(
        stored.len(),
        CUSTOMERS,
        "segment announcements kept in CRM_EVENTS"
    );
    assert_eq!(customers.len(), CUSTOMERS);

    // A second fit, from the CLI, publishes the next version; views follow it.
    let url = env.nats.url();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&["--nats-url", &url, "value-fit", "--as-of", AS_OF, "--json"])
    })
    .await
    .expect("cli ran");
    assert!(ok, "crm-node value-fit failed: {stderr}");
    let second: Value = serde_json::from_str(&stdout).expect("value-fit --json prints JSON");
    assert_eq!(second["version"], 2, "{second}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = view_of(&client, json!({"email": email(0)})).await;
        if view["value"]["model_version"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "views kept version 1: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fits_on_its_schedule_without_being_asked() {
    let env = TestEnv::start(NodeOptions {
        shards: SHARDS,
        rules: fixture(RULES),
        limits: "value_fit_interval_s = 2\n".to_string(),
        ..NodeOptions::default()
    });
    let client = env.client().await;
    let events = purchase_events(&purchases(11), "s");
    send(&client, events).await;
    // No request: the schedule fits (as of the latest event day) and the views follow.
    let value = scored_value(&client, json!({"email": email(3)})).await;
    assert!(
        value["model_version"].as_u64().expect("version") >= 1,
        "{value}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fit_requests_name_the_field_and_the_fix() {
    let env = start_env(RULES);
    let client = env.client().await;
    for (body, needle) in [
        (json!({"as_of": "31/10/2026"}), "YYYY-MM-DD"),
        (json!({"time_unit": "months"}), "\"days\" or \"weeks\""),
        (json!({"horizon": -3}), "horizon"),
        (json!({"discount_rate": -0.5}), "discount rate"),
        (json!([1, 2]), "JSON object"),
    ] {
        let reply = request(&client, subjects::CMD_VALUE_FIT, &body).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{body}: {reply}");
        let message = reply["error"]["message"].as_str().expect("message");
        assert!(message.contains(needle), "{body}: {message}");
    }
    // Nobody has bought anything: the fit fails with a reason, nothing is published.
    let reply = request(&client, subjects::CMD_VALUE_FIT, &json!({})).await;
    assert_eq!(reply["error"]["code"], "fit_failed", "{reply}");
}

/// The `json value-fit` block of docs/protocol.md.
fn doc_example() -> Value {
    let path = crm_testkit::cluster_env::repo_file("docs/protocol.md");
    let text = std::fs::read_to_string(&path).expect("docs/protocol.md");
    let start = text
        .find("```json value-fit\n")
        .expect("docs/protocol.md has a `json value-fit` example")
        + "```json value-fit\n".len();
    let end = start + text[start..].find("```").expect("the block ends");
    serde_json::from_str(&text[start..end]).expect("the value-fit example is JSON")
}

/// The view's value block once the node has the model (the model reaches shard workers
/// through a KV watch, a moment after the fit reply).
async fn scored_value(client: &async_nats::Client, identity: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = view_of(client, identity.clone()).await;
        if view["value"]["status"] == "scored" {
            assert_matches_schema("customer-reply.schema.json", &view, "a scored view");
            return view["value"].clone();
        }
        assert!(Instant::now() < deadline, "no scored value block: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn close(mine: &Value, theirs: &Value, name: &str) {
    let (a, b) = (
        mine.as_f64().unwrap_or_else(|| panic!("{name}: {mine}")),
        theirs
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: {theirs}")),
    );
    let scale = a.abs().max(b.abs()).max(1e-12);
    assert!(
        (a - b).abs() / scale < 1e-6 || (a - b).abs() < 1e-9,
        "{name}: view {a} vs offline {b}"
    );
}
