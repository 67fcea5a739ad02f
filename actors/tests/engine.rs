//! The shard engine without NATS: batches of shard-log records in, sled contents, replies
//! and outbox entries out. Each test owns a temporary sled directory.

use crm_actors::apply;
use crm_actors::codec;
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::ingest::{parse_ingest, IngestLimits};
use crm_actors::rules::Rules;
use crm_actors::shard_message::{ApplyStatus, CustomerCommand, RoutedCommand, ShardMessage};
use crm_actors::state::CustomerState;
use crm_actors::store::{CommitBatch, CustomerWrite, EncodedState, Store};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SHARD: u32 = 2;
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
const EPOCH: u64 = 9;
/// 2026-01-02T10:00:00Z
const JAN_2_MS: i64 = 1_767_348_000_000;

fn rules() -> Arc<Rules> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config/rules.toml");
    Arc::new(Rules::load(&path).expect("the cluster's rules file loads"))
}

fn limits(resident_max: usize) -> EngineLimits {
    EngineLimits {
        resident_max,
        passivate_after_ms: 60_000,
        tick_batch_max: 2,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, CACHE_BYTES).expect("store opens")
}

fn engine(store: &Store, resident_max: usize) -> ShardEngine {
    ShardEngine::new(SHARD, store.clone(), rules(), limits(resident_max)).expect("engine")
}

/// A purchase of `amount` EUR by `email`, `minutes` after Jan 2nd 10:00.
fn purchase_command(event_id: &str, email: &str, amount: f64, minutes: i64) -> CustomerCommand {
    let at = time_text(JAN_2_MS + minutes * 60_000);
    let json = serde_json::json!({
        "v": 1, "event_id": event_id, "type": "purchase", "occurred_at": at,
        "identity": {"email": email},
        "order_id": format!("order-{event_id}"), "amount": amount, "currency": "EUR",
        "items": [{"sku": "s1", "category": "bags", "qty": 1, "price": amount}]
    });
    let event = parse_ingest("web", json.to_string().as_bytes(), &IngestLimits::default())
        .expect("test event is valid");
    CustomerCommand::Event {
        event,
        conflict: None,
    }
}

fn time_text(ms: i64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("test time is in range");
    time.format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

fn purchase(seq: u64, customer: &str, event_id: &str, minutes: i64) -> (u64, ShardMessage) {
    let email = format!("{customer}@example.com");
    (
        seq,
        ShardMessage::Customer {
            customer_id: customer.to_string(),
            command: purchase_command(event_id, &email, 40.0, minutes),
            reply_to: None,
        },
    )
}

fn statuses(result: &crm_actors::engine::BatchResult) -> Vec<ApplyStatus> {
    result.messages.iter().map(|m| m.status.clone()).collect()
}

fn stored_bytes(store: &Store, customer: &str) -> Vec<u8> {
    let state = store
        .load_customer(customer)
        .expect("load")
        .expect("customer stored");
    codec::encode(&state)
}

#[tokio::test]
async fn a_batch_delivered_twice_is_applied_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    let batch = vec![purchase(1, "ann", "e1", 0), purchase(2, "bob", "e2", 1)];

    let first = engine
        .apply_batch(batch.clone(), EPOCH)
        .await
        .expect("apply");
    assert_eq!((first.applied, first.skipped), (2, 0));
    assert_eq!(first.meta.applied_seq, 2);
    assert_eq!(first.meta.owner_epoch, EPOCH);
    let ann_after_first = stored_bytes(&store, "ann");

    let again = engine.apply_batch(batch, EPOCH).await.expect("redelivery");
    assert_eq!((again.applied, again.skipped), (0, 2));
    assert!(again.messages.is_empty() && again.events.is_empty());
    assert_eq!(stored_bytes(&store, "ann"), ann_after_first);

    let overlap = vec![purchase(2, "bob", "e2", 1), purchase(3, "ann", "e3", 2)];
    let third = engine.apply_batch(overlap, EPOCH).await.expect("overlap");
    assert_eq!((third.applied, third.skipped), (1, 1));
    assert_eq!(third.messages[0].seq, 3);
    assert_eq!(store.shard_meta(SHARD).expect("meta").applied_seq, 3);
    assert_ne!(stored_bytes(&store, "ann"), ann_after_first);
    engine.shutdown().await;
}

#[tokio::test]
async fn commands_for_one_customer_apply_in_log_order_within_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    let batch = vec![
        purchase(1, "ann", "e1", 0),
        purchase(2, "bob", "e2", 0),
        purchase(3, "ann", "e1", 0),
        purchase(4, "ann", "e3", 5),
    ];
    let result = engine.apply_batch(batch, EPOCH).await.expect("apply");
    assert_eq!(
        statuses(&result),
        vec![
            ApplyStatus::Applied,
            ApplyStatus::Applied,
            ApplyStatus::Duplicate,
            ApplyStatus::Applied
        ]
    );
    let seqs: Vec<u64> = result.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(result.messages[2].event_id.as_deref(), Some("e1"));
    assert_eq!((result.applied, result.duplicates), (3, 1));
    engine.shutdown().await;
}

/// A router's record: (ingest sequence, customer, event id, minutes) per entry.
fn routed(seq: u64, entries: &[(u64, &str, &str, i64)]) -> (u64, ShardMessage) {
    let entries = entries
        .iter()
        .map(|&(ingest_seq, customer, event_id, minutes)| RoutedCommand {
            ingest_seq,
            customer_id: customer.to_string(),
            command: purchase_command(event_id, &format!("{customer}@example.com"), 40.0, minutes),
        })
        .collect();
    (seq, ShardMessage::Routed { entries })
}

#[tokio::test]
async fn a_routed_record_applies_its_entries_in_order_once_and_quotes_their_ingest_sequences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    let first = routed(
        1,
        &[
            (10, "ann", "e1", 0),
            (12, "bob", "e2", 0),
            (15, "ann", "e3", 5),
        ],
    );
    let result = engine
        .apply_batch(vec![first.clone()], EPOCH)
        .await
        .expect("apply");
    assert_eq!(statuses(&result), vec![ApplyStatus::Applied; 3]);
    let quoted: Vec<(u64, Option<u64>, &str)> = result
        .messages
        .iter()
        .map(|m| (m.seq, m.ingest_seq, m.customer_id.as_str()))
        .collect();
    assert_eq!(
        quoted,
        vec![
            (1, Some(10), "ann"),
            (1, Some(12), "bob"),
            (1, Some(15), "ann")
        ]
    );
    let ann = store.load_customer("ann").expect("load").expect("ann");
    assert_eq!(ann.purchases.count, 2);
    // Outbox keys of one record count its events across entries, none repeated.
    let mut keys: Vec<_> = result.events.iter().map(|(key, _)| *key).collect();
    keys.dedup();
    assert_eq!(keys.len(), result.events.len());
    assert!(keys.iter().all(|key| key.seq == 1));

    // The same record again is skipped; a regrouped record repeating e3 is a duplicate.
    let again = engine.apply_batch(vec![first], EPOCH).await.expect("again");
    assert_eq!((again.applied, again.skipped), (0, 1));
    let regrouped = routed(2, &[(15, "ann", "e3", 5), (16, "bob", "e4", 6)]);
    let result = engine
        .apply_batch(vec![regrouped], EPOCH)
        .await
        .expect("regrouped");
    assert_eq!(
        statuses(&result),
        vec![ApplyStatus::Duplicate, ApplyStatus::Applied]
    );
    let ann = store.load_customer("ann").expect("load").expect("ann");
    assert_eq!(ann.purchases.count, 2);
    engine.shutdown().await;
}

#[tokio::test]
async fn state_survives_engine_drop_and_store_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let view_before;
    {
        let store = open(dir.path());
        let mut engine = engine(&store, 100);
        engine
            .apply_batch(
                vec![purchase(1, "ann", "e1", 0), purchase(2, "ann", "e2", 30)],
                EPOCH,
            )
            .await
            .expect("apply");
        view_before = engine.view("ann").await.expect("view").expect("ann exists");
        drop(engine);
    }
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    assert_eq!(engine.meta().applied_seq, 2);
    assert_eq!(engine.resident_count(), 0);
    let view_after = engine.view("ann").await.expect("view").expect("ann exists");
    assert_eq!(view_after, view_before);
    assert_eq!(engine.view("nobody").await.expect("view"), None);
    assert_eq!(
        engine.resident_count(),
        1,
        "a view of nobody activates nobody"
    );

    // Cold activation sees the applied event ids: a retry is a duplicate.
    let retry = engine
        .apply_batch(vec![purchase(3, "ann", "e2", 30)], EPOCH)
        .await
        .expect("retry");
    assert_eq!(statuses(&retry), vec![ApplyStatus::Duplicate]);
    engine.shutdown().await;
}

#[tokio::test]
async fn passivation_keeps_residency_under_the_cap_and_loses_nothing() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let store_a = open(dir_a.path());
    let store_b = open(dir_b.path());
    let resident_max = 3;
    let mut passivating = engine(&store_a, resident_max);
    let mut resident = engine(&store_b, 1_000);

    let customers: Vec<String> = (0..10).map(|i| format!("cust-{i}")).collect();
    let mut seq = 0;
    for round in 0..3 {
        let batch: Vec<(u64, ShardMessage)> = customers
            .iter()
            .map(|c| {
                seq += 1;
                purchase(seq, c, &format!("{c}-r{round}"), round * 60)
            })
            .collect();
        let a = passivating
            .apply_batch(batch.clone(), EPOCH)
            .await
            .expect("a");
        let b = resident.apply_batch(batch, EPOCH).await.expect("b");
        assert_eq!(statuses(&a), statuses(&b));
        assert_eq!(a.events, b.events);
        assert_eq!(
            passivating.resident_count(),
            customers.len(),
            "no passivation mid-batch"
        );
        let stopped = passivating.passivate(Instant::now());
        assert_eq!(stopped, customers.len() - resident_max);
        assert_eq!(passivating.resident_count(), resident_max);
    }
    for c in &customers {
        assert_eq!(stored_bytes(&store_a, c), stored_bytes(&store_b, c), "{c}");
        let view_a = passivating.view(c).await.expect("view");
        let view_b = resident.view(c).await.expect("view");
        assert_eq!(view_a, view_b, "{c}");
        passivating.passivate(Instant::now());
        assert!(passivating.resident_count() <= resident_max);
    }

    // Idle: everyone goes after passivate_after_ms of wall-clock silence.
    let later = Instant::now() + Duration::from_millis(limits(0).passivate_after_ms + 1);
    passivating.passivate(later);
    assert_eq!(passivating.resident_count(), 0);
    let retry = passivating
        .apply_batch(vec![purchase(seq + 1, "cust-0", "cust-0-r0", 0)], EPOCH)
        .await
        .expect("retry");
    assert_eq!(statuses(&retry), vec![ApplyStatus::Duplicate]);
    passivating.shutdown().await;
    resident.shutdown().await;
}

/// Stores `customer` (after one purchase) with an artificial timer entry at `due_ms`.
fn store_with_due(store: &Store, customer: &str, due_ms: i64) -> CustomerState {
    let mut state = CustomerState::new(customer);
    let command = purchase_command(
        &format!("{customer}-0"),
        &format!("{customer}@x.org"),
        10.0,
        0,
    );
    apply::apply(&mut state, &command, &rules());
    assert!(state.exists());
    let batch = CommitBatch {
        customers: vec![CustomerWrite {
            customer_id: customer.to_string(),
            state: EncodedState {
                bytes: codec::encode(&state),
                next_due_ms: Some(due_ms),
            },
        }],
        ..CommitBatch::default()
    };
    store.commit(SHARD, &batch).expect("commit");
    state
}

#[tokio::test]
async fn a_tick_runs_only_due_customers_and_moves_their_timers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let tick_ms = JAN_2_MS + 1_000;
    // Five due customers: more than one page of tick_batch_max = 2.
    let due: Vec<String> = (0..5).map(|i| format!("due-{i}")).collect();
    for (i, c) in due.iter().enumerate() {
        store_with_due(&store, c, tick_ms - 10 + i as i64);
    }
    store_with_due(&store, "later", tick_ms + 1);
    store_with_due(&store, "much-later", i64::MAX);
    let mut engine = engine(&store, 100);

    let result = engine
        .apply_batch(vec![(1, ShardMessage::Tick { at_ms: tick_ms })], EPOCH)
        .await
        .expect("tick");
    assert_eq!(result.customers_ticked, 5);
    assert!(
        result.messages.is_empty(),
        "a tick has no per-message reply"
    );
    assert_eq!(result.meta.clock_ms, tick_ms);
    for c in &due {
        let state = store.load_customer(c).expect("load").expect("stored");
        let index_due = store.customer_due(c).expect("due");
        assert_eq!(
            index_due,
            state.next_due_ms(),
            "{c}: index follows the state"
        );
        assert!(
            !matches!(index_due, Some(d) if d <= tick_ms),
            "{c}: {index_due:?}"
        );
    }
    assert_eq!(store.customer_due("later").expect("due"), Some(tick_ms + 1));
    assert_eq!(
        store.customer_due("much-later").expect("due"),
        Some(i64::MAX)
    );
    assert!(store
        .due_customers(SHARD, tick_ms, 100)
        .expect("due")
        .is_empty());

    // The same tick again finds nobody due.
    let again = engine
        .apply_batch(vec![(2, ShardMessage::Tick { at_ms: tick_ms })], EPOCH)
        .await
        .expect("tick");
    assert_eq!(again.customers_ticked, 0);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_tick_sees_the_earlier_messages_of_its_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let tick_ms = JAN_2_MS + 1_000;
    // The index says ann is due, but a purchase in the same batch, before the tick, moves
    // her timer to whatever the rules say: the tick must follow the new due time.
    let mut expected = store_with_due(&store, "ann", tick_ms - 1);
    let before = codec::encode(&expected);
    let command = purchase_command("ann-1", "ann@example.com", 40.0, 0);
    apply::apply(&mut expected, &command, &rules());
    assert_ne!(
        codec::encode(&expected),
        before,
        "a new purchase changes the state"
    );
    let expect_ticked = u64::from(expected.next_due_ms().is_some_and(|d| d <= tick_ms));

    let mut engine = engine(&store, 100);
    let result = engine
        .apply_batch(
            vec![
                (
                    1,
                    ShardMessage::Customer {
                        customer_id: "ann".to_string(),
                        command,
                        reply_to: Some("_INBOX.1".to_string()),
                    },
                ),
                (2, ShardMessage::Tick { at_ms: tick_ms }),
            ],
            EPOCH,
        )
        .await
        .expect("apply");
    assert_eq!(result.customers_ticked, expect_ticked);
    assert_eq!(result.messages.len(), 1);
    assert_eq!(result.messages[0].reply_to.as_deref(), Some("_INBOX.1"));
    let state = store.load_customer("ann").expect("load").expect("stored");
    assert_eq!(store.customer_due("ann").expect("due"), state.next_due_ms());
    engine.shutdown().await;
}

#[tokio::test]
async fn events_wait_in_the_outbox_until_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    let result = engine
        .apply_batch(
            vec![purchase(1, "ann", "e1", 0), purchase(2, "bob", "e2", 0)],
            EPOCH,
        )
        .await
        .expect("apply");
    assert!(
        !result.events.is_empty(),
        "a first purchase emits actor events"
    );
    assert!(result.events.iter().all(|(key, _)| key.shard == SHARD));
    assert_eq!(engine.pending_outbox().expect("outbox"), result.events);

    let (first, rest) = result.events.split_at(1);
    let first_keys: Vec<_> = first.iter().map(|(key, _)| *key).collect();
    engine.published(&first_keys).expect("published");
    assert_eq!(engine.pending_outbox().expect("outbox"), rest.to_vec());
    let rest_keys: Vec<_> = rest.iter().map(|(key, _)| *key).collect();
    engine.published(&rest_keys).expect("published");
    assert!(engine.pending_outbox().expect("outbox").is_empty());
    engine.shutdown().await;
}

#[tokio::test]
async fn the_outbox_survives_a_crash_before_publication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events;
    {
        let store = open(dir.path());
        let mut engine = engine(&store, 100);
        events = engine
            .apply_batch(vec![purchase(1, "ann", "e1", 0)], EPOCH)
            .await
            .expect("apply")
            .events;
        // Dropped without publishing: the node crashed after the ack.
    }
    let store = open(dir.path());
    let engine = engine(&store, 100);
    assert_eq!(engine.pending_outbox().expect("outbox"), events);
}

#[tokio::test]
async fn new_rules_reach_resident_actors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    engine
        .apply_batch(vec![purchase(1, "ann", "e1", 0)], EPOCH)
        .await
        .expect("apply");
    let mut newer = (*rules()).clone();
    newer.version += 1;
    engine.set_rules(Arc::new(newer));
    assert_eq!(engine.rules().version, rules().version + 1);
    assert_eq!(engine.resident_count(), 1);
    let result = engine
        .apply_batch(vec![purchase(2, "ann", "e2", 1)], EPOCH)
        .await
        .expect("apply");
    assert_eq!(statuses(&result), vec![ApplyStatus::Applied]);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_failed_batch_commits_nothing_and_keeps_no_actor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    // A stored state this build cannot read (another format version).
    let unreadable = CommitBatch {
        customers: vec![CustomerWrite {
            customer_id: "broken".to_string(),
            state: EncodedState {
                bytes: vec![codec::FORMAT_VERSION + 1, 0, 0],
                next_due_ms: None,
            },
        }],
        ..CommitBatch::default()
    };
    store.commit(SHARD, &unreadable).expect("commit");
    let mut engine = engine(&store, 100);

    let error = engine
        .apply_batch(
            vec![purchase(1, "ann", "e1", 0), purchase(2, "broken", "e2", 0)],
            EPOCH,
        )
        .await
        .expect_err("the broken customer cannot be activated");
    let text = error.to_string();
    assert!(
        text.contains("c/broken") && text.contains("format version"),
        "{text}"
    );
    assert_eq!(
        engine.resident_count(),
        0,
        "uncommitted actor state is dropped"
    );
    assert_eq!(engine.meta().applied_seq, 0);
    assert_eq!(store.shard_meta(SHARD).expect("meta").applied_seq, 0);
    assert!(store.load_customer("ann").expect("load").is_none());
    assert!(engine.pending_outbox().expect("outbox").is_empty());

    // Delivered again without the poison, ann's purchase applies once.
    let retry = engine
        .apply_batch(vec![purchase(1, "ann", "e1", 0)], EPOCH)
        .await
        .expect("retry");
    assert_eq!(statuses(&retry), vec![ApplyStatus::Applied]);
    engine.shutdown().await;
}

#[tokio::test]
async fn the_engine_runs_on_a_spawned_task_and_views_use_the_shard_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    let task = tokio::spawn(async move {
        engine
            .apply_batch(
                vec![
                    purchase(1, "ann", "e1", 0),
                    (
                        2,
                        ShardMessage::Tick {
                            at_ms: JAN_2_MS + 3_600_000,
                        },
                    ),
                ],
                EPOCH,
            )
            .await
            .expect("apply");
        let view = engine.view("ann").await.expect("view");
        let clock = engine.meta().clock_ms;
        engine.shutdown().await;
        (view, clock)
    });
    let (view, clock) = task.await.expect("task");
    assert_eq!(clock, JAN_2_MS + 3_600_000);
    let state = store.load_customer("ann").expect("load").expect("stored");
    let expected = crm_actors::view::full_view(&state, clock, &rules(), None);
    assert_eq!(view, Some(expected));
}

#[tokio::test]
async fn a_large_tick_keeps_no_extra_actors_and_later_messages_see_its_effects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let tick_ms = JAN_2_MS + 400 * 86_400_000;
    let mut expected = None;
    for i in 0..5 {
        let state = store_with_due(&store, &format!("due-{i}"), JAN_2_MS + i);
        if i == 0 {
            expected = Some(state);
        }
    }
    // What due-0 must end as: the tick, then a purchase later in the same batch.
    let mut expected = expected.expect("due-0 stored");
    let command = purchase_command("due-0-late", "due-0@x.org", 25.0, 400 * 24 * 60 + 1);
    apply::apply(
        &mut expected,
        &CustomerCommand::Tick { at_ms: tick_ms },
        &rules(),
    );
    apply::apply(&mut expected, &command, &rules());

    let mut engine = engine(&store, 100);
    let result = engine
        .apply_batch(
            vec![
                (1, ShardMessage::Tick { at_ms: tick_ms }),
                (
                    2,
                    ShardMessage::Customer {
                        customer_id: "due-0".to_string(),
                        command,
                        reply_to: None,
                    },
                ),
            ],
            EPOCH,
        )
        .await
        .expect("apply");
    assert_eq!(result.customers_ticked, 5);
    assert_eq!(statuses(&result), vec![ApplyStatus::Applied]);
    assert_eq!(
        engine.resident_count(),
        1,
        "actors activated only for the tick were stopped"
    );
    assert_eq!(stored_bytes(&store, "due-0"), codec::encode(&expected));
    engine.shutdown().await;
}

/// A customer-value model whose cut points put every buyer in `top_20_percent` (or, with
/// `everybody_middle`, in `middle`), as of 400 days after Jan 2nd.
fn value_model(version: u64, everybody_middle: bool) -> crm_actors::value::live::ValueModel {
    use crm_actors::value::live::{BgNbdJson, GammaGammaJson, ValueModel};
    let as_of_day = crm_actors::time::day_number(JAN_2_MS) + 400;
    ValueModel {
        version,
        as_of_day,
        as_of: crm_actors::value::live::day_text(as_of_day),
        time_unit: "days".to_string(),
        horizon_periods: 365,
        discount_rate: 0.0,
        bgnbd: BgNbdJson {
            r: 0.5,
            alpha: 10.0,
            a: 0.8,
            b: 2.5,
        },
        gamma_gamma: GammaGammaJson {
            p: 6.0,
            q: 4.0,
            gamma: 15.0,
        },
        log_likelihood: -1.0,
        customers: 2,
        repeat_buyers: 1,
        recency_days_quintiles: [10.0, 20.0, 30.0, 40.0],
        frequency_quintiles: [1.0, 1.0, 2.0, 3.0],
        monetary_quintiles: [10.0, 20.0, 30.0, 40.0],
        clv_p99: f64::MAX,
        clv_p80: if everybody_middle { f64::MAX } else { 0.0 },
        clv_p50: 0.0,
    }
}

fn value_events(result: &crm_actors::engine::BatchResult) -> Vec<(String, String)> {
    let mut events: Vec<(String, String)> = result
        .events
        .iter()
        .map(|(_, e)| (e.customer_id.clone(), e.event_type().to_string()))
        .collect();
    events.sort();
    events
}

#[tokio::test]
async fn a_value_model_record_rescores_every_customer_once_and_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut engine = engine(&store, 100);
    // ann buys three times in ten days, bob once; both long before the model's day.
    let purchases = vec![
        purchase(1, "ann", "a1", 0),
        purchase(2, "ann", "a2", 60 * 24 * 4),
        purchase(3, "ann", "a3", 60 * 24 * 10),
        purchase(4, "bob", "b1", 5),
    ];
    engine
        .apply_batch(purchases, EPOCH)
        .await
        .expect("purchases");
    let ann = store.load_customer("ann").expect("load").expect("ann");
    let model = value_model(1, false);
    let crm_actors::value::live::Assessment::Scored(scored) =
        crm_actors::value::live::assess(&ann, Some(&model))
    else {
        panic!("ann has purchases");
    };
    assert!(
        scored.score.p_alive < 0.5,
        "ann is at risk: {:?}",
        scored.score
    );

    let first = engine
        .apply_batch(
            vec![(
                5,
                ShardMessage::ValueModel {
                    model: model.clone(),
                },
            )],
            EPOCH,
        )
        .await
        .expect("model");
    assert_eq!(
        value_events(&first),
        vec![
            ("ann".to_string(), "churn.risk".to_string()),
            ("ann".to_string(), "value.segment_changed".to_string()),
            ("bob".to_string(), "value.segment_changed".to_string()),
        ]
    );
    let changed = first
        .events
        .iter()
        .find(|(_, e)| e.customer_id == "bob")
        .map(|(_, e)| e.to_json())
        .expect("bob's event");
    assert_eq!(changed["to"], "top_20_percent");
    assert_eq!(changed["from"], serde_json::Value::Null);

    // The same version again changes nothing; a new one moves both to `middle`, and ann,
    // no longer in a valuable segment, is no longer at risk (no new churn.risk).
    let again = engine
        .apply_batch(vec![(6, ShardMessage::ValueModel { model })], EPOCH)
        .await
        .expect("again");
    assert!(again.events.is_empty());
    let second = engine
        .apply_batch(
            vec![(
                7,
                ShardMessage::ValueModel {
                    model: value_model(2, true),
                },
            )],
            EPOCH,
        )
        .await
        .expect("second model");
    assert_eq!(
        value_events(&second),
        vec![
            ("ann".to_string(), "value.segment_changed".to_string()),
            ("bob".to_string(), "value.segment_changed".to_string()),
        ]
    );
    let ann = store.load_customer("ann").expect("load").expect("ann");
    assert_eq!(ann.value_standing.segment.as_deref(), Some("middle"));
    assert_eq!(ann.value_standing.model_version, 2);
    assert!(!ann.value_standing.at_risk);
    engine.shutdown().await;
    drop(engine);

    // A reopened engine has the model and scores views with it.
    let mut reopened =
        ShardEngine::new(SHARD, store.clone(), rules(), limits(100)).expect("engine");
    assert_eq!(reopened.value_model().map(|m| m.version), Some(2));
    let view = reopened.view("bob").await.expect("view").expect("bob");
    assert_eq!(view["value"]["model_version"], 2);
    assert_eq!(view["value"]["segment"], "middle");
    assert!(view["next_best_actions"].is_array());
    reopened.shutdown().await;
}
