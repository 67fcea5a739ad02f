//! A live view of one KV bucket: every key's value, revision, and when (on this node's
//! monotonic clock) that revision was first seen.
//!
//! Liveness and lease expiry are judged from "unchanged for long enough *as observed
//! here*", never by comparing clocks of different machines: a heartbeat or lease seen with
//! the same revision for longer than the timeout has not been renewed. Keys already present
//! when the watch starts count as changed at that moment, so a node that just started
//! waits a full timeout before it calls anything dead.

use crate::backoff::Backoff;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::warn;

/// One key as observed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub value: Bytes,
    pub revision: u64,
    /// When this revision was first seen here.
    pub since: Instant,
}

/// The observed keys of a bucket, shared by the watching task and its readers.
#[derive(Clone)]
pub struct BucketView {
    keys: Arc<Mutex<HashMap<String, Observed>>>,
    /// Whether the watch has delivered the bucket's current state at least once.
    ready: watch::Receiver<bool>,
    /// Bumped on every change seen (or written by this node).
    changes: Arc<watch::Sender<u64>>,
}

impl BucketView {
    /// Starts watching `store` (every key, with its last value first) until `stop` fires.
    pub fn start(store: kv::Store, mut stop: crate::shutdown::Shutdown) -> BucketView {
        let keys: Arc<Mutex<HashMap<String, Observed>>> = Arc::default();
        let (ready_tx, ready) = watch::channel(false);
        let changes = Arc::new(watch::channel(0u64).0);
        let changed = changes.clone();
        let shared = keys.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), 2, Duration::from_secs(2));
            while !stop.is_triggered() {
                let watch =
                    crate::jetstream::create_with_retries(2, || store.watch_with_history(">"));
                let mut entries = match watch.await {
                    Ok(entries) => {
                        // A watch that ends is started again soon; only failed starts wait
                        // longer each time.
                        backoff.reset();
                        entries
                    }
                    Err(error) => {
                        warn!(%error, bucket = %store.name, "cannot watch the bucket; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            _ = stop.wait() => return,
                        }
                        continue;
                    }
                };
                // An empty bucket delivers nothing: it is current at once.
                if store
                    .status()
                    .await
                    .map(|status| status.values() == 0)
                    .unwrap_or(false)
                {
                    let _ = ready_tx.send(true);
                }
                loop {
                    let entry = tokio::select! {
                        entry = entries.next() => entry,
                        _ = stop.wait() => return,
                    };
                    match entry {
                        Some(Ok(entry)) => {
                            let mut keys = shared.lock().unwrap_or_else(|e| e.into_inner());
                            match entry.operation {
                                kv::Operation::Put => {
                                    let unchanged = keys
                                        .get(&entry.key)
                                        .is_some_and(|seen| seen.revision == entry.revision);
                                    if !unchanged {
                                        keys.insert(
                                            entry.key.clone(),
                                            Observed {
                                                value: entry.value.clone(),
                                                revision: entry.revision,
                                                since: Instant::now(),
                                            },
                                        );
                                    }
                                }
                                kv::Operation::Delete | kv::Operation::Purge => {
                                    keys.remove(&entry.key);
                                }
                            }
                            drop(keys);
                            changed.send_modify(|n| *n += 1);
                            if entry.delta == 0 {
                                let _ = ready_tx.send(true);
                            }
                        }
                        Some(Err(error)) => {
                            warn!(%error, bucket = %store.name, "bucket watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = stop.wait() => return,
                }
            }
        });
        BucketView {
            keys,
            ready,
            changes,
        }
    }

    /// A receiver that wakes up when any key changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits (at most `timeout`) until the bucket's current state has been seen once.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        let waited = tokio::time::timeout(timeout, ready.wait_for(|ready| *ready)).await;
        waited.is_ok()
    }

    /// The observed entry of `key`.
    pub fn get(&self, key: &str) -> Option<Observed> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(key).cloned()
    }

    /// Every observed entry.
    pub fn all(&self) -> HashMap<String, Observed> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records what this node itself just wrote (so its own view does not lag its writes).
    pub fn note_write(&self, key: &str, value: Bytes, revision: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let newer = keys.get(key).is_none_or(|seen| seen.revision < revision);
        if newer {
            keys.insert(
                key.to_string(),
                Observed {
                    value,
                    revision,
                    since: Instant::now(),
                },
            );
            drop(keys);
            self.changes.send_modify(|n| *n += 1);
        }
    }
}
