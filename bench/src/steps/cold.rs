//! Step 8, `cold`: in-process, no NATS: `ShardEngine::view` of customers that are not
//! resident, after the sled store was closed and reopened (sled's page cache cold); then
//! the same views warm, and the sled read and decode alone.

use crate::figures::{round, summary, Summary};
use crate::plan::Plan;
use crate::traffic::spec;
use anyhow::{anyhow, bail, Result};
use crm_actors::engine::{EngineLimits, ShardEngine};
use crm_actors::ingest::{parse_ingest, IngestLimits};
use crm_actors::rules::Rules;
use crm_actors::shard_message::{CustomerCommand, ShardMessage};
use crm_actors::store::Store;
use crm_node::loadgen::Generator;
use crm_testkit::scratch::try_scratch_dir;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

/// What the cold-activation run measured.
pub struct ColdActivation {
    /// Cold views, µs.
    pub mean_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub details: ColdDetails,
}

/// What the cold views time (`method` in bench/results.json).
const COLD_METHOD: &str = "in-process ShardEngine::view() of a customer not resident, after the sled store was closed and reopened (sled page cache cold, OS page cache warm): sled read + decode + ractor actor spawn + 360 view JSON; no NATS";

/// The cold-activation run's details (`cold_activation` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ColdDetails {
    pub method: String,
    pub customers_stored: usize,
    pub events_applied: u64,
    pub fill_seconds: f64,
    pub fill_events_per_s: f64,
    pub mean_state_bytes: f64,
    pub cold_view_us: Summary,
    pub warm_view_us: Summary,
    /// Mean cold view minus mean warm view.
    pub activation_only_mean_us: f64,
    pub sled_load_decode_us: Summary,
    pub resident_after_cold_views: usize,
    pub runtime: String,
}

pub async fn cold_activation(plan: &Plan) -> Result<ColdActivation> {
    let dir = try_scratch_dir("bench-cold")?;
    let sled_path = dir.path().join("sled");
    let rules = Arc::new(Rules::load(&plan.rules).map_err(|e| anyhow!("{e}"))?);
    let limits = IngestLimits {
        currencies: rules.currencies(),
        ..IngestLimits::default()
    };
    let engine_limits = |resident_max: usize| EngineLimits {
        resident_max,
        passivate_after_ms: 3_600_000,
        tick_batch_max: 512,
    };
    const SHARD: u32 = 0;
    const CACHE_BYTES: u64 = 256 * 1024 * 1024;

    // Store the customers: the generator's traffic, one customer per person.
    let people = plan.cold_customers as usize;
    let store = Store::open(&sled_path, CACHE_BYTES).map_err(|e| anyhow!("{e}"))?;
    let mut engine = ShardEngine::new(SHARD, store.clone(), rules.clone(), engine_limits(10_000))
        .map_err(|e| anyhow!("{e}"))?;
    let mut seq = 0u64;
    let mut batch = Vec::with_capacity(512);
    let mut customers: HashSet<String> = HashSet::new();
    let mut events = 0u64;
    let fill_started = Instant::now();
    for event in Generator::new(spec(people, plan.seed)).without_truth() {
        let parsed = parse_ingest(&event.channel, &event.payload, &limits)
            .map_err(|r| anyhow!("generated event refused: {r}"))?;
        let customer_id = format!("c{:024x}", event.person);
        customers.insert(customer_id.clone());
        seq += 1;
        events += 1;
        batch.push((
            seq,
            ShardMessage::Customer {
                customer_id,
                command: CustomerCommand::Event {
                    event: parsed,
                    conflict: None,
                },
                reply_to: None,
            },
        ));
        if batch.len() == 512 {
            engine
                .apply_batch(std::mem::take(&mut batch), 0)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            engine.passivate(Instant::now());
        }
    }
    if !batch.is_empty() {
        engine
            .apply_batch(batch, 0)
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    engine.shutdown().await;
    drop(engine);
    store.flush().await.map_err(|e| anyhow!("{e}"))?;
    drop(store);

    // Reopen: sled's page cache is empty, nothing is resident (the OS page cache is warm).
    let store = Store::open(&sled_path, CACHE_BYTES).map_err(|e| anyhow!("{e}"))?;
    let samples = plan.cold_samples as usize;
    let mut engine = ShardEngine::new(SHARD, store.clone(), rules, engine_limits(samples * 2 + 16))
        .map_err(|e| anyhow!("{e}"))?;
    let mut ids: Vec<String> = customers.into_iter().collect();
    ids.sort();
    ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(plan.seed));
    let (view_ids, rest) = ids.split_at(samples.min(ids.len()));
    let load_ids = &rest[..samples.min(rest.len())];

    // The sled read and decode alone, on other customers (also cold in sled's cache).
    let mut load_us = Vec::with_capacity(load_ids.len());
    let mut state_bytes = Vec::with_capacity(load_ids.len());
    for id in load_ids {
        let started = Instant::now();
        let loaded = store
            .load_customer_encoded(id)
            .map_err(|e| anyhow!("{e}"))?;
        load_us.push(started.elapsed().as_secs_f64() * 1e6);
        if let Some((_, bytes)) = loaded {
            state_bytes.push(bytes.len() as f64);
        }
    }
    // Cold: not resident, activated from sled by the view.
    let mut cold_us = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        let started = Instant::now();
        let view = engine.view(id).await.map_err(|e| anyhow!("{e}"))?;
        cold_us.push(started.elapsed().as_secs_f64() * 1e6);
        if view.is_none() {
            bail!("customer {id} was stored but its view is empty");
        }
    }
    let resident_after = engine.resident_count();
    // Warm: the same customers again, now resident.
    let mut warm_us = Vec::with_capacity(view_ids.len());
    for id in view_ids {
        let started = Instant::now();
        engine.view(id).await.map_err(|e| anyhow!("{e}"))?;
        warm_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    engine.shutdown().await;
    let cold_mean = cold_us.iter().sum::<f64>() / cold_us.len().max(1) as f64;
    let warm_mean = warm_us.iter().sum::<f64>() / warm_us.len().max(1) as f64;
    let cold_view_us = summary(cold_us, 1);
    let (mean_us, p99_us) = (cold_view_us.mean(), cold_view_us.p99());
    let details = ColdDetails {
        method: COLD_METHOD.to_string(),
        customers_stored: people,
        events_applied: events,
        fill_seconds: round(fill_seconds, 2),
        fill_events_per_s: round(events as f64 / fill_seconds.max(1e-9), 0),
        mean_state_bytes: round(
            state_bytes.iter().sum::<f64>() / state_bytes.len().max(1) as f64,
            0,
        ),
        cold_view_us,
        warm_view_us: summary(warm_us, 1),
        activation_only_mean_us: round(cold_mean - warm_mean, 1),
        sled_load_decode_us: summary(load_us, 1),
        resident_after_cold_views: resident_after,
        runtime: "tokio multi-thread, 2 workers".to_string(),
    };
    Ok(ColdActivation {
        mean_us,
        p99_us,
        details,
    })
}
