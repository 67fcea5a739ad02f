use crm_actors::command::{CustomerCommand, ShardMessage};
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::event::{parse_ingest, IngestLimits};
use crm_actors::rules::Rules;
use crm_actors::store::Store;
use std::sync::Arc;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let rules = Arc::new(Rules::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../cluster-config/rules.toml"))).unwrap());
    let mut engine = ShardEngine::new(0, store.clone(), rules, EngineLimits { resident_max: 5000, passivate_after_ms: 60000, tick_batch_max: 256 }).unwrap();
    let mk = |i: usize, c: usize| {
        let json = serde_json::json!({"v":1,"event_id":format!("e{i}"),"type":"purchase","occurred_at":"2026-01-02T10:00:00Z","identity":{"email":"a@b.c"},"order_id":format!("o{i}"),"amount":10.0,"currency":"EUR","items":[{"sku":"s","category":"bags","qty":1,"price":10.0}]});
        let event = parse_ingest("web", json.to_string().as_bytes(), &IngestLimits::default()).unwrap();
        ShardMessage::Customer { customer_id: format!("cust-{c}"), command: CustomerCommand::Event { event, conflict: None }, reply_to: None }
    };
    let n = 50_000; let batch = 500;
    let msgs: Vec<_> = (0..n).map(|i| (i as u64 + 1, mk(i, i % 20_000))).collect();
    let start = Instant::now();
    let mut spawn_t = std::time::Duration::ZERO;
    for chunk in msgs.chunks(batch) {
        let t = Instant::now();
        engine.apply_batch(chunk.to_vec(), 0).await.unwrap();
        spawn_t += t.elapsed();
        engine.passivate(Instant::now());
    }
    let el = start.elapsed();
    println!("{n} events in {el:?}: {:.0}/s, resident {}", n as f64 / el.as_secs_f64(), engine.resident_count());
    let t = Instant::now();
    let r = engine.apply_batch(vec![(n as u64 + 1, ShardMessage::Tick { at_ms: i64::MAX / 2 })], 0).await.unwrap();
    println!("tick {} customers in {:?}", r.customers_ticked, t.elapsed());
    engine.shutdown().await;
}
