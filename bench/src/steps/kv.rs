//! Diagnostic `kv` (between steps 1 and 2): the identity directory's KV round trips alone,
//! on a scratch bucket configured like `crm_identity`, to tell the router's per-identifier
//! cost from the rest of the pipeline.

use crate::figures::round;
use anyhow::{anyhow, bail, Result};
use async_nats::jetstream;
use bytes::Bytes;
use crm_node::subjects;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// A 64-hex key like the identity directory's HMAC keys (distinct for every `index`).
fn kv_key(index: u64) -> String {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}{:048x}", z ^ (z >> 31), index)
}

/// The KV diagnostic's findings (`kv_diagnostic` in bench/results.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct KvDiagnostic {
    pub keys: u64,
    pub sequential_get_then_create_per_s: f64,
    /// One per tenth of the keys, in order.
    pub windows: Vec<KvWindow>,
    pub pipelined_creates: u64,
    pub pipelined_in_flight: usize,
    pub pipelined_creates_per_s: f64,
    pub pipelined_failures: usize,
}

/// The sequential round trips of one tenth of the keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct KvWindow {
    /// Keys in the bucket at the end of the window.
    pub keys_after: u64,
    pub get_miss_mean_us: f64,
    pub create_mean_us: f64,
}

/// What the router pays per new identifier, without the node: a KV `get` that misses then a
/// KV `create`, one after the other, on a bucket configured like `crm_identity`, as it
/// grows to `keys` keys (mean microseconds per tenth); then the same creates with 64 in
/// flight, to show what pipelining the router's look-ups would buy.
pub async fn kv_diagnostic(client: &async_nats::Client, keys: u64) -> Result<KvDiagnostic> {
    const BUCKET: &str = "bench_identity";
    const PIPELINE: usize = 64;
    let js = jetstream::new(client.clone());
    let kv = crm_node::jetstream::ensure_kv(&js, BUCKET, 1)
        .await
        .map_err(|e| anyhow!("scratch bucket: {e}"))?;
    let value = Bytes::from_static(b"c0123456789abcdef01234567");
    let window = (keys / 10).max(1);
    let mut windows = Vec::new();
    let (mut get_us, mut create_us) = (0.0f64, 0.0f64);
    let started = Instant::now();
    for index in 0..keys {
        let key = kv_key(index);
        let before = Instant::now();
        let found = kv.get(&key).await.map_err(|e| anyhow!("kv get: {e}"))?;
        let between = Instant::now();
        if found.is_some() {
            bail!("kv key {key} exists before it was created");
        }
        kv.create(&key, value.clone())
            .await
            .map_err(|e| anyhow!("kv create: {e}"))?;
        get_us += between.duration_since(before).as_secs_f64() * 1e6;
        create_us += between.elapsed().as_secs_f64() * 1e6;
        if (index + 1) % window == 0 {
            windows.push(KvWindow {
                keys_after: index + 1,
                get_miss_mean_us: round(get_us / window as f64, 1),
                create_mean_us: round(create_us / window as f64, 1),
            });
            get_us = 0.0;
            create_us = 0.0;
        }
    }
    let sequential_seconds = started.elapsed().as_secs_f64();
    let pipelined_keys = window * 2;
    let started = Instant::now();
    let creates = futures::stream::iter(keys..keys + pipelined_keys)
        .map(|index| {
            let (kv, value) = (kv.clone(), value.clone());
            async move { kv.create(kv_key(index), value).await }
        })
        .buffer_unordered(PIPELINE)
        .collect::<Vec<_>>()
        .await;
    let pipelined_seconds = started.elapsed().as_secs_f64();
    let failed = creates.iter().filter(|r| r.is_err()).count();
    let _ = js.delete_stream(subjects::kv_stream(BUCKET)).await;
    Ok(KvDiagnostic {
        keys,
        sequential_get_then_create_per_s: round(keys as f64 / sequential_seconds.max(1e-9), 0),
        windows,
        pipelined_creates: pipelined_keys,
        pipelined_in_flight: PIPELINE,
        pipelined_creates_per_s: round(pipelined_keys as f64 / pipelined_seconds.max(1e-9), 0),
        pipelined_failures: failed,
    })
}
