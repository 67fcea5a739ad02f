//! Dead letters end to end, against a real `nats-server` and a real `crm-node`: every reason
//! of docs/protocol.md ("Dead letters") is provoked by publishing to `crm.ingest.<channel>`
//! with JetStream like an adapter (the node runs with the shipped rules file, whose blocked
//! identifiers give `blocked_identity`). Each bad input must appear in `CRM_DLQ` on
//! `crm.dlq.<reason>` with the original bytes as its body, `Crm-Reason` = the reason and a
//! `Crm-Message` that names the field; and the pipeline must keep flowing: a valid purchase
//! sent after all the bad ones is applied.

use async_nats::jetstream;
use crm_node::subjects;
use crm_testkit::cluster_env::{minor, repo_file, view, wait_drained, NodeOptions, TestEnv};
use crm_testkit::test_support::{publish, wait_for_dead_letters, DeadLetter};
use serde_json::{json, Value};
use std::time::Duration;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// `[limits] payload_max_bytes` of the test node (NATS itself accepts up to 1 MiB).
const PAYLOAD_MAX_BYTES: usize = 2048;

/// One input to publish and the dead letter it must become.
struct BadInput {
    /// What is wrong, for failure messages.
    what: &'static str,
    channel: &'static str,
    msg_id: String,
    body: Vec<u8>,
    reason: &'static str,
    /// A word `Crm-Message` must contain (the field it names).
    names: &'static str,
}

fn purchase(event_id: &str, email: &str, order_id: &str, amount: Value) -> Value {
    json!({"v": 1, "event_id": event_id, "type": "purchase", "occurred_at": "2026-03-01T10:15:00Z",
           "identity": {"email": email}, "order_id": order_id, "amount": amount, "currency": "EUR"})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().expect("object").remove(key);
    base
}

fn bad(
    what: &'static str,
    msg_id: &str,
    body: Vec<u8>,
    reason: &'static str,
    names: &'static str,
) -> BadInput {
    BadInput {
        what,
        channel: "web",
        msg_id: msg_id.to_string(),
        body,
        reason,
        names,
    }
}

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("json")
}

/// Every reason the router decides (all but `unapplicable`), with the field it must name.
fn router_rejections() -> Vec<BadInput> {
    let ok = |id: &str| purchase(id, "dl@example.com", &format!("o-{id}"), json!(19.99));
    // A valid purchase padded with a long field to just above the payload limit.
    let mut oversized = ok("dl-oversized");
    oversized["note"] = json!("x".repeat(PAYLOAD_MAX_BYTES));
    let oversized = bytes(&oversized);
    assert!(oversized.len() > PAYLOAD_MAX_BYTES);
    vec![
        bad(
            "payload above payload_max_bytes",
            "dl-oversized",
            oversized,
            "oversized",
            "payload_max_bytes",
        ),
        bad(
            "not JSON",
            "dl-not-json",
            b"{\"v\": 1, \"event_id\": \"dl-not-json\", oops".to_vec(),
            "malformed",
            "JSON",
        ),
        bad(
            "a JSON array",
            "dl-array",
            bytes(&json!([ok("dl-array")])),
            "malformed",
            "object",
        ),
        bad(
            "\"v\": 2",
            "dl-v2",
            bytes(&with(ok("dl-v2"), "v", json!(2))),
            "unsupported_version",
            "\"v\"",
        ),
        bad(
            "no \"v\"",
            "dl-no-v",
            bytes(&without(ok("dl-no-v"), "v")),
            "unsupported_version",
            "\"v\"",
        ),
        bad(
            "unknown type",
            "dl-teleport",
            bytes(&with(ok("dl-teleport"), "type", json!("teleport"))),
            "unknown_type",
            "type",
        ),
        bad(
            "no type",
            "dl-no-type",
            bytes(&without(ok("dl-no-type"), "type")),
            "unknown_type",
            "type",
        ),
        bad(
            "no identity",
            "dl-no-identity",
            bytes(&without(ok("dl-no-identity"), "identity")),
            "no_identity",
            "identity",
        ),
        bad(
            "empty identity",
            "dl-empty-identity",
            bytes(&with(ok("dl-empty-identity"), "identity", json!({}))),
            "no_identity",
            "identity",
        ),
        bad(
            "phone not in E.164",
            "dl-bad-phone",
            bytes(&with(
                ok("dl-bad-phone"),
                "identity",
                json!({"phone": "12345"}),
            )),
            "no_identity",
            "phone",
        ),
        bad(
            "only an email the rules block",
            "dl-blocked",
            bytes(&with(
                ok("dl-blocked"),
                "identity",
                json!({"email": "NoReply@Shop.example"}),
            )),
            "blocked_identity",
            "identity.email.blocked",
        ),
        bad(
            "negative amount",
            "dl-negative",
            bytes(&with(ok("dl-negative"), "amount", json!(-5))),
            "bad_amount",
            "amount",
        ),
        bad(
            "amount with 3 decimals",
            "dl-decimals",
            bytes(&with(ok("dl-decimals"), "amount", json!(10.125))),
            "bad_amount",
            "amount",
        ),
        bad(
            "amount above amount_max",
            "dl-too-much",
            bytes(&with(ok("dl-too-much"), "amount", json!(1_000_000.01))),
            "bad_amount",
            "amount_max",
        ),
        bad(
            "no event_id",
            "dl-no-event-id",
            bytes(&without(ok("dl-no-event-id"), "event_id")),
            "invalid",
            "event_id",
        ),
        bad(
            "occurred_at not RFC 3339",
            "dl-bad-time",
            bytes(&with(
                ok("dl-bad-time"),
                "occurred_at",
                json!("last tuesday"),
            )),
            "invalid",
            "occurred_at",
        ),
        bad(
            "event_id with a line break (it could not go into a header)",
            "dl-crlf",
            bytes(&with(
                ok("dl-crlf"),
                "event_id",
                json!("dl-crlf\r\nX-Injected: 1"),
            )),
            "invalid",
            "event_id",
        ),
        bad(
            "occurred_at in the year 9999",
            "dl-far-future",
            bytes(&with(
                ok("dl-far-future"),
                "occurred_at",
                json!("9999-01-01T00:00:00Z"),
            )),
            "invalid",
            "occurred_at_future_max_days",
        ),
        bad(
            "a key twice in one object",
            "dl-twice",
            {
                let text = String::from_utf8(bytes(&ok("dl-twice"))).expect("utf-8");
                format!("{{\"amount\": -5, {}", &text[1..]).into_bytes()
            },
            "malformed",
            "twice",
        ),
        bad(
            "unknown currency",
            "dl-currency",
            bytes(&with(ok("dl-currency"), "currency", json!("XYZ"))),
            "invalid",
            "currency",
        ),
    ]
}

fn listing(letters: &[DeadLetter]) -> String {
    letters
        .iter()
        .map(DeadLetter::describe)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks the dead letter of `input`; returns the problems found (empty = fine).
fn check(
    input: &BadInput,
    letter: Option<&DeadLetter>,
    source_sequence: Option<u64>,
) -> Vec<String> {
    let Some(letter) = letter else {
        return vec![format!(
            "{} ({}): no dead letter with its original bytes on {}.{}",
            input.what,
            input.msg_id,
            subjects::DLQ_PREFIX,
            input.reason
        )];
    };
    let mut problems = Vec::new();
    let mut expect = |ok: bool, problem: String| {
        if !ok {
            problems.push(format!(
                "{} ({}): {problem}; got {}",
                input.what,
                input.msg_id,
                letter.describe()
            ));
        }
    };
    expect(
        letter.subject == format!("{}.{}", subjects::DLQ_PREFIX, input.reason),
        format!("subject is not crm.dlq.{}", input.reason),
    );
    expect(
        letter.reason.as_deref() == Some(input.reason),
        format!("Crm-Reason is not {}", input.reason),
    );
    expect(
        letter
            .message
            .as_deref()
            .is_some_and(|m| m.contains(input.names)),
        format!("Crm-Message does not name '{}'", input.names),
    );
    if let Some(sequence) = source_sequence {
        let subject = subjects::ingest(input.channel);
        expect(
            letter.source_subject.as_deref() == Some(subject.as_str()),
            format!("Crm-Source-Subject is not {subject}"),
        );
        expect(
            letter.source_sequence.as_deref() == Some(sequence.to_string().as_str()),
            format!("Crm-Source-Sequence is not the ingest sequence {sequence}"),
        );
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ingest_rejection_is_dead_lettered_unchanged_with_its_reason_and_later_events_still_apply(
) {
    let env = TestEnv::start(NodeOptions {
        limits: format!("payload_max_bytes = {PAYLOAD_MAX_BYTES}"),
        rules: repo_file("cluster-config/rules.toml"),
        ..NodeOptions::default()
    });
    let client = env.client().await;
    let js = jetstream::new(client.clone());

    let inputs = router_rejections();
    let mut sequences = Vec::with_capacity(inputs.len());
    for input in &inputs {
        sequences.push(publish(&js, input.channel, &input.msg_id, input.body.clone()).await);
    }
    // Sent after every bad input: must still be applied.
    let after = purchase("dl-after", "after.bad@example.com", "o-after", json!(42.5));
    publish(&js, "web", "dl-after", bytes(&after)).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let letters = wait_for_dead_letters(&js, inputs.len()).await;
    let mut problems = Vec::new();
    for (input, sequence) in inputs.iter().zip(&sequences) {
        let letter = letters
            .iter()
            .find(|l| l.body == input.body && l.subject.ends_with(input.reason));
        let letter = letter.or_else(|| letters.iter().find(|l| l.body == input.body));
        problems.extend(check(input, letter, Some(*sequence)));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\n\nCRM_DLQ holds:\n{}",
        problems.len(),
        problems.join("\n"),
        listing(&letters)
    );
    assert_eq!(
        letters.len(),
        inputs.len(),
        "CRM_DLQ holds more or fewer letters than bad inputs:\n{}",
        listing(&letters)
    );

    let view = view(&client, json!({"email": "after.bad@example.com"})).await;
    assert_eq!(
        view["purchases"]["count"],
        json!(1),
        "the purchase after the bad inputs was not applied: {view}"
    );
    assert_eq!(minor(&view["purchases"]["total_spend"]), 4250, "{view}");
    assert!(
        env.node.log_lines().iter().all(|l| !l.contains("panicked")),
        "{}",
        env.node.log_tail(40)
    );
}

/// docs/protocol.md (ingest, identifiers): an email typed decomposed (`e` + combining acute,
/// as macOS types it) and composed (`é`, as Windows does) is one customer, found by either;
/// the same email with a zero-width space is dead-lettered `no_identity` naming the
/// character and the fix, not minted as a look-alike second customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_typed_decomposed_or_composed_is_one_customer_and_one_with_a_zero_width_space_is_dead_lettered(
) {
    let env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let composed = "am\u{e9}lie@example.fr";
    let decomposed = "Ame\u{301}lie@Example.fr";
    let hidden = "am\u{e9}lie\u{200B}@example.fr";

    publish(
        &js,
        "web",
        "nfc-1",
        bytes(&purchase("nfc-1", composed, "o-nfc-1", json!(10))),
    )
    .await;
    publish(
        &js,
        "store",
        "nfd-2",
        bytes(&purchase("nfd-2", decomposed, "o-nfd-2", json!(20))),
    )
    .await;
    let zero_width = bad(
        "email with a zero-width space",
        "zw-3",
        bytes(&purchase("zw-3", hidden, "o-zw-3", json!(40))),
        "no_identity",
        "U+200B",
    );
    let sequence = publish(&js, "web", &zero_width.msg_id, zero_width.body.clone()).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let by_composed = view(&client, json!({"email": composed})).await;
    let by_decomposed = view(&client, json!({"email": decomposed})).await;
    assert_eq!(by_composed["purchases"]["count"], json!(2), "{by_composed}");
    assert_eq!(
        minor(&by_composed["purchases"]["total_spend"]),
        3000,
        "{by_composed}"
    );
    assert!(by_composed["customer_id"].is_string(), "{by_composed}");
    assert_eq!(by_composed["customer_id"], by_decomposed["customer_id"]);

    let letters = wait_for_dead_letters(&js, 1).await;
    let letter = letters.iter().find(|l| l.body == zero_width.body);
    let problems = check(&zero_width, letter, Some(sequence));
    assert!(problems.is_empty(), "{problems:?}\n{}", listing(&letters));
    let message = letter.and_then(|l| l.message.clone()).unwrap_or_default();
    for part in [
        "identity.email",
        "invisible character",
        "zero width space",
        "send the value without it",
    ] {
        assert!(
            message.contains(part),
            "Crm-Message {message:?} lacks {part:?}"
        );
    }
    assert_eq!(letters.len(), 1, "{}", listing(&letters));
    // Asked for, the look-alike is refused too, never answered as another customer.
    let asked = view(&client, json!({"email": hidden})).await;
    assert_eq!(asked["error"]["code"], json!("bad_request"), "{asked}");
    assert!(
        asked["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("U+200B")),
        "{asked}"
    );
}

/// docs/rules.md (`[identity]`), under the shipped rules (which block `test@test.com`): a
/// purchase with that email and a loyalty card applies to the card's customer and the email
/// is never linked: the view does not list it, a second card sent with it stays another
/// customer (no merge, no conflict), a query by it alone is refused as blocked, and a
/// purchase with only that email is dead-lettered `blocked_identity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_email_is_never_linked_and_alone_is_dead_lettered_blocked_identity() {
    let env = TestEnv::start(NodeOptions {
        rules: repo_file("cluster-config/rules.toml"),
        ..NodeOptions::default()
    });
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let with_identity = |event_id: &str, identity: Value, amount: Value| {
        with(
            purchase(
                event_id,
                "unused@example.com",
                &format!("o-{event_id}"),
                amount,
            ),
            "identity",
            identity,
        )
    };

    let events = [
        ("bl-1", json!({"loyalty_card": "LC-BL-1"}), json!(10)),
        (
            "bl-2",
            json!({"email": "Test@Test.com", "loyalty_card": "LC-BL-1"}),
            json!(20),
        ),
        (
            "bl-3",
            json!({"email": "test@test.com", "loyalty_card": "LC-BL-2"}),
            json!(5),
        ),
    ];
    for (event_id, identity, amount) in events {
        let body = bytes(&with_identity(event_id, identity, amount));
        publish(&js, "store", event_id, body).await;
    }
    let alone = BadInput {
        channel: "store",
        ..bad(
            "only an email the rules block",
            "bl-4",
            bytes(&purchase("bl-4", "test@test.com", "o-bl-4", json!(40))),
            "blocked_identity",
            "identity.email 'test@test.com' (identity.email.blocked \"test@test.com\") is blocked by the rules file",
        )
    };
    let sequence = publish(&js, alone.channel, &alone.msg_id, alone.body.clone()).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let card = view(&client, json!({"loyalty_card": "LC-BL-1"})).await;
    assert_eq!(card["purchases"]["count"], json!(2), "{card}");
    assert_eq!(minor(&card["purchases"]["total_spend"]), 3000, "{card}");
    assert!(
        !card["identities"].to_string().contains("test@test.com"),
        "the blocked email was linked: {card}"
    );
    let other = view(&client, json!({"loyalty_card": "LC-BL-2"})).await;
    assert_eq!(other["purchases"]["count"], json!(1), "{other}");
    assert!(other["customer_id"].is_string(), "{other}");
    assert_ne!(
        other["customer_id"], card["customer_id"],
        "one blocked email merged two customers"
    );
    assert!(
        !other["identities"].to_string().contains("test@test.com"),
        "{other}"
    );

    let letters = wait_for_dead_letters(&js, 1).await;
    let letter = letters.iter().find(|l| l.body == alone.body);
    let problems = check(&alone, letter, Some(sequence));
    assert!(problems.is_empty(), "{problems:?}\n{}", listing(&letters));
    assert_eq!(letters.len(), 1, "{}", listing(&letters));

    // Asked for alone, the blocked email is refused as blocked; beside the card, ignored.
    let asked = view(&client, json!({"email": "TEST@test.com"})).await;
    assert_eq!(asked["error"]["code"], json!("bad_request"), "{asked}");
    assert!(
        asked["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("blocked by the rules file")),
        "{asked}"
    );
    let beside = view(
        &client,
        json!({"email": "test@test.com", "loyalty_card": "LC-BL-1"}),
    )
    .await;
    assert_eq!(beside["customer_id"], card["customer_id"], "{beside}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_for_an_order_the_customer_never_had_is_dead_lettered_unapplicable_with_its_original_bytes(
) {
    let env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let email = "returner@example.com";

    // The customer exists and has one order...
    let first = purchase("ua-1", email, "o-real", json!(30));
    publish(&js, "web", "ua-1", bytes(&first)).await;
    // ...but the return names another one.
    let bogus = json!({"v": 1, "event_id": "ua-2", "type": "return", "occurred_at": "2026-03-02T10:00:00Z",
                       "identity": {"email": email}, "order_id": "o-never", "amount": 10.00});
    let bogus_bytes = bytes(&bogus);
    publish(&js, "store", "ua-2", bogus_bytes.clone()).await;
    let after = purchase("ua-3", email, "o-later", json!(12.34));
    publish(&js, "web", "ua-3", bytes(&after)).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let letters = wait_for_dead_letters(&js, 1).await;
    let input = BadInput {
        what: "return for an unknown order",
        channel: "store",
        msg_id: "ua-2".to_string(),
        body: bogus_bytes.clone(),
        reason: "unapplicable",
        names: "order_id",
    };
    let on_subject: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.subject == "crm.dlq.unapplicable")
        .collect();
    assert_eq!(
        on_subject.len(),
        1,
        "expected exactly one dead letter on crm.dlq.unapplicable; CRM_DLQ holds:\n{}",
        listing(&letters)
    );
    let letter = on_subject[0];
    assert_eq!(
        letter.reason.as_deref(),
        Some("unapplicable"),
        "{}",
        letter.describe()
    );
    assert!(
        letter
            .message
            .as_deref()
            .is_some_and(|m| m.contains("order_id") && m.contains("o-never")),
        "Crm-Message does not name order_id 'o-never': {}",
        letter.describe()
    );
    // docs/protocol.md: "The body is the original bytes, unchanged" (for every dead letter).
    assert!(
        letter.body == bogus_bytes,
        "the unapplicable dead letter's body is not the original bytes.\n  published: {}\n  \
         dead letter: {}\n(node/src/shard_worker.rs rejected_event_json re-encodes the shard \
         record's CustomerCommand instead of keeping the adapter's bytes)",
        String::from_utf8_lossy(&bogus_bytes),
        letter.describe()
    );
    assert!(
        check(&input, Some(letter), None).is_empty(),
        "{:?}",
        check(&input, Some(letter), None)
    );

    let view = view(&client, json!({"email": email})).await;
    assert_eq!(
        view["purchases"]["count"],
        json!(2),
        "the purchase after the refused return was not applied: {view}"
    );
    assert_eq!(
        view["returns"]["count"],
        json!(0),
        "the refused return was counted: {view}"
    );
}

/// An input near the server's largest message no longer fits once the dead letter's
/// headers are added: its body is cut (the whole input stays in CRM_INGEST) and routing
/// goes on, instead of the router retrying the same refused dead letter for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_too_big_to_dead_letter_whole_is_cut_and_routing_goes_on() {
    let env = TestEnv::start(NodeOptions::default());
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let huge = vec![b'x'; client.server_info().max_payload - 200];
    publish(&js, "web", "dl-huge", huge.clone()).await;
    let after = purchase(
        "dl-after-huge",
        "after.huge@example.com",
        "o-huge",
        json!(10.0),
    );
    publish(&js, "web", "dl-after-huge", bytes(&after)).await;
    wait_drained(&client, env.options.shards, DRAIN_TIMEOUT).await;

    let letters = wait_for_dead_letters(&js, 1).await;
    assert_eq!(letters.len(), 1, "{}", listing(&letters));
    let letter = &letters[0];
    assert_eq!(letter.reason.as_deref(), Some("oversized"));
    assert!(
        letter.body.len() < huge.len() && huge.starts_with(&letter.body),
        "the body is the input's beginning: {} of {} bytes",
        letter.body.len(),
        huge.len()
    );
    let view = view(&client, json!({"email": "after.huge@example.com"})).await;
    assert_eq!(view["purchases"]["count"], json!(1), "{view}");
}
