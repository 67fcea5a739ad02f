//! The node-local state store: sled 0.34, one tree, one atomic batch per shard commit.
//!
//! The shard engine ([`crate::engine`]) is its only writer; it calls [`Store::commit`] once
//! per applied batch and then [`Store::flush`] (sled writes are durable only after a flush).
//! Everything that must change together lives in the single tree [`TREE_NAME`] under key
//! prefixes, so one [`sled::Tree::apply_batch`] makes a commit all-or-nothing:
//!
//! | key | value |
//! | --- | --- |
//! | `c/<customer_id>` | customer state, [`crate::codec`] bytes |
//! | `d/<customer_id>` | the customer's timer entry: shard (u32 BE) + sortable due ms (8 bytes) |
//! | `m/<shard u32 BE>` | [`ShardMeta`], codec bytes |
//! | `t/<shard u32 BE>/<due ms sortable BE>/<customer_id>` | empty: the timer index |
//! | `o/<shard u32 BE>/<seq u64 BE>/<index u32 BE>` | an [`ActorEvent`] not yet published, as its public JSON (the untyped form of older builds still reads) |
//! | `x/<shard u32 BE>/<seq u64 BE>/<index u32 BE>` | a [`MergeTransfer`] not yet appended to the survivor's shard log, codec bytes |
//! | `s/<shard u32 BE>/<customer_id>` | empty: the shard's customers (written when one is created) |
//! | `v/<shard u32 BE>` | the shard's current customer-value model, codec bytes |
//!
//! "Sortable" due times flip the sign bit of the i64 so that big-endian byte order is
//! numeric order, negative times included. Which shard a customer belongs to is the caller's
//! decision; the store records the shard number it is given. Nothing here knows NATS or
//! rules; values read from disk are decoded with errors, never unwrapped.

use crate::codec::{self, CodecError};
use crate::shard_message::{ActorEvent, MergeTransfer};
use crate::state::CustomerState;
use crate::value::live::ValueModel;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Attempts (50 ms apart) to open a store whose lock a just-closed instance still holds.
const OPEN_LOCK_RETRIES: u32 = 40;

/// The one sled tree holding every key of this store.
pub const TREE_NAME: &str = "crm";

const CUSTOMER_PREFIX: &[u8] = b"c/";
const DUE_PREFIX: &[u8] = b"d/";
const META_PREFIX: &[u8] = b"m/";
const TIMER_PREFIX: &[u8] = b"t/";
const OUTBOX_PREFIX: &[u8] = b"o/";
const MEMBER_PREFIX: &[u8] = b"s/";
const VALUE_MODEL_PREFIX: &[u8] = b"v/";
const TRANSFER_PREFIX: &[u8] = b"x/";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store at {path}: {source}; check the directory exists, is writable and no other crm-node uses it")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("state store I/O failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value under {key} does not decode: {source}")]
    Codec {
        key: String,
        #[source]
        source: CodecError,
    },
    #[error("outbox event under {key} is not valid JSON: {source}")]
    OutboxJson {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("stored key or value {key} is malformed: {reason}")]
    Corrupt { key: String, reason: &'static str },
}

/// What the store keeps per shard, committed with every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Last `crm.shard.<n>` stream sequence applied (0: none).
    pub applied_seq: u64,
    /// Largest rule (event) time the shard has seen, Unix ms (0: none).
    pub clock_ms: i64,
    /// The lease epoch of the owner that committed last (kept for fencing proofs).
    pub owner_epoch: u64,
}

/// A customer's state as it goes to disk: codec bytes plus its next due time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedState {
    /// [`codec::encode`] of the [`CustomerState`].
    pub bytes: Vec<u8>,
    /// `CustomerState::next_due_ms` of that state: where it sits in the timer index.
    pub next_due_ms: Option<i64>,
}

/// One changed customer in a [`CommitBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerWrite {
    pub customer_id: String,
    pub state: EncodedState,
}

/// Where an actor event waits in the outbox until the node has published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxKey {
    pub shard: u32,
    /// The shard-log sequence of the message that caused the event.
    pub seq: u64,
    /// Position among the events of that message.
    pub index: u32,
}

impl OutboxKey {
    /// `o/<shard BE>/<seq BE>/<index BE>`.
    pub fn to_bytes(self) -> Vec<u8> {
        sequenced_key(OUTBOX_PREFIX, self.shard, self.seq, self.index)
    }

    fn from_bytes(key: &[u8]) -> Result<OutboxKey, StoreError> {
        let (shard, seq, index) =
            parse_sequenced_key(OUTBOX_PREFIX, key, "outbox key is not o/<u32>/<u64>/<u32>")?;
        Ok(OutboxKey { shard, seq, index })
    }
}

/// Where a merge transfer waits in the transfer outbox until the node has appended it to
/// the survivor's shard log (and JetStream acked it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferKey {
    pub shard: u32,
    /// The shard-log sequence of the message whose outcome carried the transfer.
    pub seq: u64,
    /// Position among the transfers of that message.
    pub index: u32,
}

impl TransferKey {
    /// `x/<shard BE>/<seq BE>/<index BE>`.
    pub fn to_bytes(self) -> Vec<u8> {
        sequenced_key(TRANSFER_PREFIX, self.shard, self.seq, self.index)
    }

    fn from_bytes(key: &[u8]) -> Result<TransferKey, StoreError> {
        let (shard, seq, index) = parse_sequenced_key(
            TRANSFER_PREFIX,
            key,
            "transfer key is not x/<u32>/<u64>/<u32>",
        )?;
        Ok(TransferKey { shard, seq, index })
    }
}

/// `<prefix><shard BE>/<seq BE>/<index BE>`: the outbox layouts, in commit order.
fn sequenced_key(prefix: &[u8], shard: u32, seq: u64, index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 4 + 1 + 8 + 1 + 4);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&shard.to_be_bytes());
    key.push(b'/');
    key.extend_from_slice(&seq.to_be_bytes());
    key.push(b'/');
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn parse_sequenced_key(
    prefix: &[u8],
    key: &[u8],
    reason: &'static str,
) -> Result<(u32, u64, u32), StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: printable(key),
        reason,
    };
    let rest = key.strip_prefix(prefix).ok_or_else(corrupt)?;
    if rest.len() != 4 + 1 + 8 + 1 + 4 || rest[4] != b'/' || rest[13] != b'/' {
        return Err(corrupt());
    }
    Ok((
        u32::from_be_bytes(array(&rest[0..4]).ok_or_else(corrupt)?),
        u64::from_be_bytes(array(&rest[5..13]).ok_or_else(corrupt)?),
        u32::from_be_bytes(array(&rest[14..18]).ok_or_else(corrupt)?),
    ))
}

/// `<prefix><shard BE>/`: every key of one shard under an outbox prefix.
fn shard_scoped_prefix(prefix: &[u8], shard: u32) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&shard.to_be_bytes());
    key.push(b'/');
    key
}

/// Everything one applied batch of a shard changes, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct CommitBatch {
    /// Customers whose state changed; at most one write per customer.
    pub customers: Vec<CustomerWrite>,
    /// The shard's meta after the batch.
    pub meta: ShardMeta,
    /// Actor events to publish, in order.
    pub outbox: Vec<(OutboxKey, ActorEvent)>,
    /// Merge transfers to append to the survivors' shard logs, in order.
    pub transfers: Vec<(TransferKey, MergeTransfer)>,
    /// Customers created by the batch (they join the shard's member index).
    pub created: Vec<String>,
    /// The customer-value model the batch applied, if any.
    pub value_model: Option<ValueModel>,
}

/// A customer whose timer is due, as read from the timer index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    pub due_ms: i64,
    pub customer_id: String,
}

/// The sled store; cheap to clone (all clones share one database).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// Group commit across every shard of the process; see [`Store::flush`].
    flusher: Arc<Flusher>,
}

/// Serialises and coalesces flushes. sled 0.34's `flush_async` runs on sled's own small
/// thread pool, and many concurrent flushes (one per shard worker) fill it with flushers
/// that wait for I/O work queued behind them: a deadlock. One flush at a time, on tokio's
/// blocking pool, covering every commit made before it started, avoids that and lets all
/// shards share each flush.
#[derive(Default)]
struct Flusher {
    /// Commits made so far (incremented after each `apply_batch`).
    committed: AtomicU64,
    /// Every commit numbered at or below this is durable.
    durable: AtomicU64,
    /// Held while a flush runs (and while it waits for its turn); when the last flush
    /// started.
    running: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Least time between the starts of two flushes, in microseconds (see
    /// [`Store::set_flush_interval`]).
    interval_us: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in directory `path`, with a page cache of at most
    /// `cache_capacity_bytes`.
    pub fn open(path: impl AsRef<Path>, cache_capacity_bytes: u64) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // A store closed a moment ago may still be locked by sled's background flusher
        // (it lets go of the file lock when its last thread ends): wait briefly for it.
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(cache_capacity_bytes)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(error))
                    if attempts < OPEN_LOCK_RETRIES
                        && error.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(error) => return Err(open_error(error)),
            }
        };
        let tree = db.open_tree(TREE_NAME).map_err(open_error)?;
        Ok(Store {
            db,
            tree,
            flusher: Arc::default(),
        })
    }

    /// Sets the least time between the starts of two flushes (default 0: a flush starts as
    /// soon as the previous one ended). A longer interval makes each flush cover more
    /// commits, which saves the CPU of a flush per commit at the price of up to that much
    /// latency per commit.
    pub fn set_flush_interval(&self, interval: std::time::Duration) {
        self.flusher
            .interval_us
            .store(interval.as_micros() as u64, Ordering::Relaxed);
    }

    /// The stored state of `customer_id`, if any.
    pub fn load_customer(&self, customer_id: &str) -> Result<Option<CustomerState>, StoreError> {
        Ok(self
            .load_customer_encoded(customer_id)?
            .map(|(state, _)| state))
    }

    /// The stored state of `customer_id` and the exact bytes it was decoded from.
    pub fn load_customer_encoded(
        &self,
        customer_id: &str,
    ) -> Result<Option<(CustomerState, Vec<u8>)>, StoreError> {
        let key = customer_key(customer_id);
        let Some(bytes) = self.tree.get(&key)? else {
            return Ok(None);
        };
        let state = codec::decode_state(&bytes).map_err(|source| StoreError::Codec {
            key: printable(&key),
            source,
        })?;
        Ok(Some((state, bytes.to_vec())))
    }

    /// The due time under which `customer_id` sits in the timer index, if any.
    pub fn customer_due(&self, customer_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.timer_entry(customer_id)?.map(|(_, due)| due))
    }

    fn timer_entry(&self, customer_id: &str) -> Result<Option<(u32, i64)>, StoreError> {
        let key = due_key(customer_id);
        let Some(value) = self.tree.get(&key)? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt {
            key: printable(&key),
            reason: "timer entry is not <u32 shard><u64 due>",
        };
        if value.len() != 12 {
            return Err(corrupt());
        }
        let shard = u32::from_be_bytes(array(&value[0..4]).ok_or_else(corrupt)?);
        let due = due_from_sortable(array(&value[4..12]).ok_or_else(corrupt)?);
        Ok(Some((shard, due)))
    }

    /// The shard's meta; all zero for a shard never committed here.
    pub fn shard_meta(&self, shard: u32) -> Result<ShardMeta, StoreError> {
        let key = meta_key(shard);
        match self.tree.get(&key)? {
            None => Ok(ShardMeta::default()),
            Some(bytes) => codec::decode(&bytes).map_err(|source| StoreError::Codec {
                key: printable(&key),
                source,
            }),
        }
    }

    /// Writes one batch of `shard` atomically: customer states, their timer index entries
    /// (old entry removed, new one added), the shard meta, the outbox entries and the merge
    /// transfers. Not durable until [`Store::flush`].
    pub fn commit(&self, shard: u32, batch: &CommitBatch) -> Result<(), StoreError> {
        let mut writes = sled::Batch::default();
        // Timer entries as this commit leaves them, for a customer listed twice.
        let mut entries: HashMap<&str, Option<(u32, i64)>> = HashMap::new();
        for write in &batch.customers {
            let id = write.customer_id.as_str();
            let old = match entries.get(id) {
                Some(entry) => *entry,
                None => self.timer_entry(id)?,
            };
            let new = write.state.next_due_ms.map(|due| (shard, due));
            if old != new {
                if let Some((old_shard, old_due)) = old {
                    writes.remove(timer_key(old_shard, old_due, id));
                }
                match new {
                    Some((_, due)) => {
                        writes.insert(timer_key(shard, due, id), &[][..]);
                        let mut value = Vec::with_capacity(12);
                        value.extend_from_slice(&shard.to_be_bytes());
                        value.extend_from_slice(&due_sortable(due));
                        writes.insert(due_key(id), value);
                    }
                    None => writes.remove(due_key(id)),
                }
            }
            entries.insert(id, new);
            writes.insert(customer_key(id), write.state.bytes.as_slice());
        }
        let meta = codec::try_encode(&batch.meta).map_err(|source| StoreError::Codec {
            key: printable(&meta_key(shard)),
            source,
        })?;
        writes.insert(meta_key(shard), meta);
        for customer_id in &batch.created {
            writes.insert(member_key(shard, customer_id), &[][..]);
        }
        if let Some(model) = &batch.value_model {
            let key = [VALUE_MODEL_PREFIX, &shard.to_be_bytes()[..]].concat();
            let bytes = codec::try_encode(model).map_err(|source| StoreError::Codec {
                key: printable(&key),
                source,
            })?;
            writes.insert(key, bytes);
        }
        for (key, event) in &batch.outbox {
            debug_assert_eq!(key.shard, shard, "outbox key of another shard");
            let json = serde_json::to_vec(event).map_err(|source| StoreError::OutboxJson {
                key: printable(&key.to_bytes()),
                source,
            })?;
            writes.insert(key.to_bytes(), json);
        }
        for (key, transfer) in &batch.transfers {
            debug_assert_eq!(key.shard, shard, "transfer key of another shard");
            let bytes = codec::try_encode(transfer).map_err(|source| StoreError::Codec {
                key: printable(&key.to_bytes()),
                source,
            })?;
            writes.insert(key.to_bytes(), bytes);
        }
        self.tree.apply_batch(writes)?;
        self.flusher.committed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every commit made before this call durable; returns the bytes flushed (0 when
    /// a flush that started after those commits already covered them).
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let wanted = self.flusher.committed.load(Ordering::SeqCst);
        let mut last_start = self.flusher.running.lock().await;
        if self.flusher.durable.load(Ordering::SeqCst) >= wanted {
            return Ok(0);
        }
        let interval =
            std::time::Duration::from_micros(self.flusher.interval_us.load(Ordering::Relaxed));
        if let Some(started) = *last_start {
            // Commits made while this waits join this flush: fewer, larger flushes.
            tokio::time::sleep_until((started + interval).into()).await;
        }
        *last_start = Some(std::time::Instant::now());
        // Everything committed up to here is covered by the flush below.
        let covered = self.flusher.committed.load(Ordering::SeqCst);
        let db = self.db.clone();
        let flushed = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|join| {
                StoreError::Sled(sled::Error::Io(std::io::Error::other(join.to_string())))
            })??;
        self.flusher.durable.fetch_max(covered, Ordering::SeqCst);
        Ok(flushed)
    }

    /// Up to `limit` customers of `shard` whose due time is at or before `at_ms`, earliest
    /// first.
    pub fn due_customers(
        &self,
        shard: u32,
        at_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .due_timers(shard, at_ms, None, limit)?
            .into_iter()
            .map(|timer| timer.customer_id)
            .collect())
    }

    /// Up to `limit` timers of `shard` due at or before `at_ms`, in index order, starting
    /// after `after` (a timer returned by an earlier call) to page through a long list.
    pub fn due_timers(
        &self,
        shard: u32,
        at_ms: i64,
        after: Option<&DueTimer>,
        limit: usize,
    ) -> Result<Vec<DueTimer>, StoreError> {
        let shard_prefix = timer_shard_prefix(shard);
        let start = match after {
            // The smallest key greater than the cursor's key.
            Some(timer) => {
                let mut key = timer_key(shard, timer.due_ms, &timer.customer_id);
                key.push(0);
                key
            }
            None => shard_prefix.clone(),
        };
        let end = match at_ms.checked_add(1) {
            Some(next) => {
                let mut key = shard_prefix.clone();
                key.extend_from_slice(&due_sortable(next));
                key
            }
            None => {
                // Past every due time of this shard: `t/<shard>0` ('0' follows '/').
                let mut key = shard_prefix[..shard_prefix.len() - 1].to_vec();
                key.push(b'0');
                key
            }
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let mut timers = Vec::with_capacity(limit.min(1024));
        for item in self.tree.range(start..end) {
            if timers.len() >= limit {
                break;
            }
            let (key, _) = item?;
            timers.push(parse_timer_key(&key, shard_prefix.len())?);
        }
        Ok(timers)
    }

    /// Every outbox entry of `shard`, in commit order.
    pub fn outbox(&self, shard: u32) -> Result<Vec<(OutboxKey, ActorEvent)>, StoreError> {
        let mut entries = Vec::new();
        for item in self
            .tree
            .scan_prefix(shard_scoped_prefix(OUTBOX_PREFIX, shard))
        {
            let (key, value) = item?;
            let outbox_key = OutboxKey::from_bytes(&key)?;
            match ActorEvent::from_stored_json(&value) {
                Ok(event) => entries.push((outbox_key, event)),
                // One entry this build cannot read (written by another version) must not
                // hold back the shard's other events: it is kept, for a build that can.
                Err(error) => tracing::warn!(
                    shard,
                    key = %printable(&key),
                    %error,
                    "outbox entry unreadable by this version: kept, not published"
                ),
            }
        }
        Ok(entries)
    }

    /// Removes published outbox entries (atomically; unknown keys are ignored). Durable
    /// with the next flush; an entry that comes back after a crash is published again and
    /// deduplicated by its event id.
    pub fn remove_outbox(&self, keys: &[OutboxKey]) -> Result<(), StoreError> {
        self.remove_all(keys.iter().map(|key| key.to_bytes()))
    }

    /// Every merge transfer of `shard` not yet appended to its survivor's shard log, in
    /// commit order. An entry this build cannot decode (written by a later format) is kept
    /// for a build that can, and logged; it does not hide the others.
    pub fn transfers(&self, shard: u32) -> Result<Vec<(TransferKey, MergeTransfer)>, StoreError> {
        let mut entries = Vec::new();
        for item in self
            .tree
            .scan_prefix(shard_scoped_prefix(TRANSFER_PREFIX, shard))
        {
            let (key, value) = item?;
            let transfer_key = TransferKey::from_bytes(&key)?;
            match codec::decode::<MergeTransfer>(&value) {
                Ok(transfer) => entries.push((transfer_key, transfer)),
                Err(error) => tracing::warn!(
                    shard,
                    key = %printable(&key),
                    %error,
                    "merge transfer unreadable by this version: kept, not sent"
                ),
            }
        }
        Ok(entries)
    }

    /// Removes merge transfers the survivors' shard logs acked (atomically; unknown keys are
    /// ignored). Durable with the next flush; a transfer that comes back after a crash is
    /// appended again, and the survivor applies it once (`Nats-Msg-Id`, then `merged_from`).
    pub fn remove_transfers(&self, keys: &[TransferKey]) -> Result<(), StoreError> {
        self.remove_all(keys.iter().map(|key| key.to_bytes()))
    }

    /// Removes these keys in one atomic batch (nothing to do for none).
    fn remove_all<K: Into<sled::IVec>>(
        &self,
        keys: impl Iterator<Item = K>,
    ) -> Result<(), StoreError> {
        let mut writes = sled::Batch::default();
        let mut any = false;
        for key in keys {
            writes.remove(key);
            any = true;
        }
        if any {
            self.tree.apply_batch(writes)?;
        }
        Ok(())
    }

    /// Every stored customer as (customer id, codec bytes of its state), in key order.
    /// Scans every state key: for tools and tests (replay comparison), not the hot path.
    pub fn encoded_customers(
        &self,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + '_ {
        self.tree.scan_prefix(CUSTOMER_PREFIX).map(|item| {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key[CUSTOMER_PREFIX.len()..]).into_owned();
            Ok((id, value.to_vec()))
        })
    }

    /// The customer-value model `shard` applied last, if any.
    pub fn value_model(&self, shard: u32) -> Result<Option<ValueModel>, StoreError> {
        let key = [VALUE_MODEL_PREFIX, &shard.to_be_bytes()[..]].concat();
        match self.tree.get(&key)? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Codec {
                    key: printable(&key),
                    source,
                }),
        }
    }

    /// Up to `limit` customer ids of `shard`'s member index, in id order, after `after`.
    pub fn shard_customers(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = member_key(shard, "");
        let start = match after {
            Some(id) => {
                let mut key = member_key(shard, id);
                key.push(0);
                key
            }
            None => prefix.clone(),
        };
        let mut ids = Vec::with_capacity(limit.min(1024));
        for item in self.tree.range(start..) {
            if ids.len() >= limit {
                break;
            }
            let (key, _) = item?;
            let Some(id) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            ids.push(String::from_utf8_lossy(id).into_owned());
        }
        Ok(ids)
    }

    /// How many customers are stored (all shards). Scans every state key: O(customers).
    pub fn customer_count(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        for item in self.tree.scan_prefix(CUSTOMER_PREFIX).keys() {
            item?;
            count += 1;
        }
        Ok(count)
    }
}

/// Raw sled entries (key, value) of one shard, as a snapshot carries them.
pub type ShardEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// One exported entry, or why it could not be read.
type EntryResult = Result<(Vec<u8>, Vec<u8>), StoreError>;

impl Store {
    /// Every key of `shard`, in pieces of about `piece_bytes` (keys plus values; a piece
    /// holds at least one entry): the member index with each member's state and timer
    /// entry, the timer index, the outbox, the merge transfers not yet appended to their
    /// survivors' logs (so the next owner sends them), the value model, and the shard meta
    /// last (so an import that stops half-way leaves no meta and is started over). The
    /// shard must not be written meanwhile (its worker is stopped or between batches).
    pub fn export_shard(
        &self,
        shard: u32,
        piece_bytes: usize,
    ) -> impl Iterator<Item = Result<ShardEntries, StoreError>> + Send + '_ {
        let tree = self.tree.clone();
        let members = self
            .tree
            .scan_prefix(member_key(shard, ""))
            .flat_map(move |item| {
                let mut out: Vec<EntryResult> = Vec::with_capacity(3);
                match item {
                    Err(error) => out.push(Err(error.into())),
                    Ok((key, value)) => {
                        let prefix_len = member_key(shard, "").len();
                        let id = key[prefix_len..].to_vec();
                        out.push(Ok((key.to_vec(), value.to_vec())));
                        for owned in [
                            [CUSTOMER_PREFIX, &id[..]].concat(),
                            [DUE_PREFIX, &id[..]].concat(),
                        ] {
                            match tree.get(&owned) {
                                Ok(Some(value)) => out.push(Ok((owned, value.to_vec()))),
                                Ok(None) => {}
                                Err(error) => out.push(Err(error.into())),
                            }
                        }
                    }
                }
                out
            });
        let raw = |item: sled::Result<(sled::IVec, sled::IVec)>| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(StoreError::from)
        };
        let singles = [
            [VALUE_MODEL_PREFIX, &shard.to_be_bytes()[..]].concat(),
            meta_key(shard),
        ];
        let tree = self.tree.clone();
        let singles = singles
            .into_iter()
            .filter_map(move |key| match tree.get(&key) {
                Ok(Some(value)) => Some(Ok((key, value.to_vec()))),
                Ok(None) => None,
                Err(error) => Some(Err(error.into())),
            });
        let entries = members
            .chain(self.tree.scan_prefix(timer_shard_prefix(shard)).map(raw))
            .chain(
                self.tree
                    .scan_prefix(shard_scoped_prefix(OUTBOX_PREFIX, shard))
                    .map(raw),
            )
            .chain(
                self.tree
                    .scan_prefix(shard_scoped_prefix(TRANSFER_PREFIX, shard))
                    .map(raw),
            )
            .chain(singles);
        Pieces {
            entries: Box::new(entries),
            piece_bytes: piece_bytes.max(1),
            done: false,
        }
    }

    /// Removes every key of `shard` (the meta first, so a removal that stops half-way
    /// leaves a shard that reads as never applied).
    pub fn clear_shard(&self, shard: u32) -> Result<(), StoreError> {
        self.tree.remove(meta_key(shard))?;
        let mut writes = sled::Batch::default();
        let member_prefix = member_key(shard, "");
        for item in self.tree.scan_prefix(&member_prefix) {
            let (key, _) = item?;
            let id = &key[member_prefix.len()..];
            writes.remove([CUSTOMER_PREFIX, id].concat());
            writes.remove([DUE_PREFIX, id].concat());
            writes.remove(key);
        }
        for prefix in [
            timer_shard_prefix(shard),
            shard_scoped_prefix(OUTBOX_PREFIX, shard),
            shard_scoped_prefix(TRANSFER_PREFIX, shard),
        ] {
            for key in self.tree.scan_prefix(prefix).keys() {
                writes.remove(key?);
            }
        }
        writes.remove([VALUE_MODEL_PREFIX, &shard.to_be_bytes()[..]].concat());
        self.tree.apply_batch(writes)?;
        // A write like any other: the next flush makes it durable.
        self.flusher.committed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Writes one piece of [`Store::export_shard`] of `shard` (after [`Store::clear_shard`]).
    /// Refuses a piece holding a key of another shard or of no known kind. Not durable until
    /// [`Store::flush`].
    pub fn import_piece(&self, shard: u32, entries: &ShardEntries) -> Result<(), StoreError> {
        let shard_be = shard.to_be_bytes();
        let scoped = |prefix: &[u8], key: &[u8]| {
            key.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(&shard_be))
        };
        let mut writes = sled::Batch::default();
        for (key, value) in entries {
            let known = key.starts_with(CUSTOMER_PREFIX)
                || key.starts_with(DUE_PREFIX)
                || scoped(MEMBER_PREFIX, key)
                || scoped(TIMER_PREFIX, key)
                || scoped(OUTBOX_PREFIX, key)
                || scoped(TRANSFER_PREFIX, key)
                || scoped(VALUE_MODEL_PREFIX, key)
                || scoped(META_PREFIX, key);
            if !known {
                return Err(StoreError::Corrupt {
                    key: printable(key),
                    reason: "a snapshot key of another shard or of no known kind",
                });
            }
            writes.insert(key.as_slice(), value.as_slice());
        }
        self.tree.apply_batch(writes)?;
        self.flusher.committed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Cuts a stream of entries into pieces of about `piece_bytes`.
struct Pieces<'a> {
    entries: Box<dyn Iterator<Item = EntryResult> + Send + 'a>,
    piece_bytes: usize,
    done: bool,
}

impl Iterator for Pieces<'_> {
    type Item = Result<ShardEntries, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut piece = Vec::new();
        let mut bytes = 0;
        while bytes < self.piece_bytes {
            match self.entries.next() {
                Some(Ok((key, value))) => {
                    bytes += key.len() + value.len();
                    piece.push((key, value));
                }
                Some(Err(error)) => {
                    self.done = true;
                    return Some(Err(error));
                }
                None => {
                    self.done = true;
                    break;
                }
            }
        }
        (!piece.is_empty()).then_some(Ok(piece))
    }
}

fn customer_key(customer_id: &str) -> Vec<u8> {
    [CUSTOMER_PREFIX, customer_id.as_bytes()].concat()
}

fn member_key(shard: u32, customer_id: &str) -> Vec<u8> {
    [
        MEMBER_PREFIX,
        &shard.to_be_bytes()[..],
        b"/",
        customer_id.as_bytes(),
    ]
    .concat()
}

fn due_key(customer_id: &str) -> Vec<u8> {
    [DUE_PREFIX, customer_id.as_bytes()].concat()
}

fn meta_key(shard: u32) -> Vec<u8> {
    [META_PREFIX, &shard.to_be_bytes()[..]].concat()
}

/// `t/<shard BE>/`.
fn timer_shard_prefix(shard: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(TIMER_PREFIX.len() + 5);
    key.extend_from_slice(TIMER_PREFIX);
    key.extend_from_slice(&shard.to_be_bytes());
    key.push(b'/');
    key
}

fn timer_key(shard: u32, due_ms: i64, customer_id: &str) -> Vec<u8> {
    let mut key = timer_shard_prefix(shard);
    key.extend_from_slice(&due_sortable(due_ms));
    key.push(b'/');
    key.extend_from_slice(customer_id.as_bytes());
    key
}

fn parse_timer_key(key: &[u8], shard_prefix_len: usize) -> Result<DueTimer, StoreError> {
    let corrupt = |reason| StoreError::Corrupt {
        key: printable(key),
        reason,
    };
    let rest = key
        .get(shard_prefix_len..)
        .ok_or_else(|| corrupt("timer key too short"))?;
    if rest.len() < 9 || rest[8] != b'/' {
        return Err(corrupt("timer key is not t/<shard>/<due>/<customer_id>"));
    }
    let due = array(&rest[0..8]).ok_or_else(|| corrupt("timer key due time"))?;
    let customer_id = std::str::from_utf8(&rest[9..])
        .map_err(|_| corrupt("timer key customer id is not UTF-8"))?;
    Ok(DueTimer {
        due_ms: due_from_sortable(due),
        customer_id: customer_id.to_string(),
    })
}

/// Big-endian bytes whose order is the numeric order of `ms` (sign bit flipped).
fn due_sortable(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn due_from_sortable(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

fn array<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    bytes.try_into().ok()
}

/// A key for error messages: text where it is text, `\xNN` elsewhere.
fn printable(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE_BYTES: u64 = 8 * 1024 * 1024;

    fn state_write(customer_id: &str, due: Option<i64>) -> CustomerWrite {
        CustomerWrite {
            customer_id: customer_id.to_string(),
            state: EncodedState {
                bytes: codec::encode(&CustomerState::new(customer_id)),
                next_due_ms: due,
            },
        }
    }

    fn event(customer_id: &str, n: u32) -> ActorEvent {
        ActorEvent {
            customer_id: customer_id.to_string(),
            at_ms: 1_000,
            id: format!("e{n}:points.expired:0"),
            data: crate::actor_event::PointsExpired {
                points: i64::from(n),
                lots: 1,
                sources: vec![format!("o{n}")],
                points_balance: 0,
            }
            .into(),
        }
    }

    #[test]
    fn sortable_due_times_order_like_numbers() {
        let times = [i64::MIN, -1_000, -1, 0, 1, 1_000, i64::MAX];
        for pair in times.windows(2) {
            assert!(due_sortable(pair[0]) < due_sortable(pair[1]));
        }
        for t in times {
            assert_eq!(due_from_sortable(due_sortable(t)), t);
        }
    }

    fn shard_batch(shard: u32, seq: u64, ids: &[&str], due: Option<i64>) -> CommitBatch {
        CommitBatch {
            customers: ids.iter().map(|id| state_write(id, due)).collect(),
            meta: ShardMeta {
                applied_seq: seq,
                clock_ms: 7_000,
                owner_epoch: 3,
            },
            outbox: vec![(
                OutboxKey {
                    shard,
                    seq,
                    index: 0,
                },
                event(ids[0], 1),
            )],
            created: ids.iter().map(|id| id.to_string()).collect(),
            value_model: None,
            transfers: Vec::new(),
        }
    }

    fn all_pieces(store: &Store, shard: u32, piece_bytes: usize) -> Vec<ShardEntries> {
        store
            .export_shard(shard, piece_bytes)
            .collect::<Result<Vec<_>, _>>()
            .expect("export")
    }

    #[test]
    fn an_exported_shard_imports_over_a_stale_copy_exactly_and_alone() {
        let source_dir = tempfile::tempdir().expect("tempdir");
        let source = Store::open(source_dir.path(), CACHE_BYTES).expect("open");
        let ids: Vec<String> = (0..50).map(|i| format!("c{i:03}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        source
            .commit(9, &shard_batch(9, 40, &ids, Some(9_000)))
            .expect("commit");
        source
            .commit(2, &shard_batch(2, 5, &["other"], None))
            .expect("commit");

        let pieces = all_pieces(&source, 9, 300);
        assert!(pieces.len() > 5, "small pieces: {}", pieces.len());
        let last = pieces.last().and_then(|p| p.last()).expect("an entry");
        assert_eq!(last.0, meta_key(9), "the meta travels last");
        let entries: usize = pieces.iter().map(Vec::len).sum();
        // Per customer: member, state, due entry, timer; plus the outbox and the meta.
        assert_eq!(entries, 50 * 4 + 2);

        let target_dir = tempfile::tempdir().expect("tempdir");
        let target = Store::open(target_dir.path(), CACHE_BYTES).expect("open");
        // A stale copy of shard 9 (a customer the snapshot does not have) and shard 2.
        target
            .commit(9, &shard_batch(9, 3, &["stale", "c001"], Some(1)))
            .expect("commit");
        target
            .commit(2, &shard_batch(2, 8, &["kept"], None))
            .expect("commit");
        target.clear_shard(9).expect("clear");
        assert_eq!(target.shard_meta(9).expect("meta"), ShardMeta::default());
        for piece in &pieces {
            target.import_piece(9, piece).expect("import");
        }
        assert_eq!(
            all_pieces(&target, 9, usize::MAX),
            all_pieces(&source, 9, usize::MAX)
        );
        assert!(target.load_customer("stale").expect("load").is_none());
        assert_eq!(
            target.due_customers(9, 1_000, 10).expect("due"),
            Vec::<String>::new()
        );
        assert_eq!(target.due_customers(9, 9_000, 100).expect("due").len(), 50);
        assert_eq!(target.shard_meta(9).expect("meta").applied_seq, 40);
        assert_eq!(target.shard_meta(2).expect("meta").applied_seq, 8);
        assert!(target.load_customer("kept").expect("load").is_some());

        // A piece of another shard is refused.
        let error = target.import_piece(4, &pieces[0]).unwrap_err();
        assert!(error.to_string().contains("another shard"), "{error}");
    }

    #[tokio::test]
    async fn flushes_are_spaced_by_the_interval_and_cover_every_commit_before_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let interval = std::time::Duration::from_millis(40);
        {
            let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
            store.set_flush_interval(interval);
            let commit = |seq: u64, id: &str| {
                let batch = CommitBatch {
                    customers: vec![state_write(id, None)],
                    meta: ShardMeta {
                        applied_seq: seq,
                        clock_ms: 0,
                        owner_epoch: 0,
                    },
                    ..CommitBatch::default()
                };
                store.commit(1, &batch).expect("commit");
            };
            commit(1, "ann");
            let first = std::time::Instant::now();
            store.flush().await.expect("flush");
            commit(2, "bob");
            // Two flushes asked for at once after one commit: the first waits for the
            // interval and flushes, the second finds the commit already durable.
            let (a, b) = tokio::join!(store.flush(), store.flush());
            a.expect("flush");
            b.expect("flush");
            assert!(first.elapsed() >= interval, "{:?}", first.elapsed());
            // Nothing committed since: nothing to flush.
            assert_eq!(store.flush().await.expect("flush"), 0);
        }
        let store = Store::open(dir.path(), CACHE_BYTES).expect("reopen");
        assert_eq!(store.customer_count().expect("count"), 2);
        assert_eq!(store.shard_meta(1).expect("meta").applied_seq, 2);
    }

    #[tokio::test]
    async fn a_flushed_commit_survives_reopen_with_all_its_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox_key = OutboxKey {
            shard: 3,
            seq: 42,
            index: 0,
        };
        {
            let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
            let batch = CommitBatch {
                customers: vec![state_write("ann", Some(5_000)), state_write("bob", None)],
                meta: ShardMeta {
                    applied_seq: 42,
                    clock_ms: 4_000,
                    owner_epoch: 7,
                },
                outbox: vec![(outbox_key, event("ann", 1))],
                created: vec!["bob".to_string(), "ann".to_string()],
                value_model: None,
                transfers: Vec::new(),
            };
            store.commit(3, &batch).expect("commit");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path(), CACHE_BYTES).expect("reopen");
        assert!(store.load_customer("ann").expect("load").is_some());
        assert!(store.load_customer("bob").expect("load").is_some());
        assert!(store.load_customer("carl").expect("load").is_none());
        assert_eq!(store.customer_count().expect("count"), 2);
        assert_eq!(
            store.shard_meta(3).expect("meta"),
            ShardMeta {
                applied_seq: 42,
                clock_ms: 4_000,
                owner_epoch: 7
            }
        );
        assert_eq!(store.shard_meta(4).expect("meta"), ShardMeta::default());
        assert_eq!(store.due_customers(3, 5_000, 10).expect("due"), vec!["ann"]);
        assert!(store.due_customers(3, 4_999, 10).expect("due").is_empty());
        assert!(store.due_customers(2, 5_000, 10).expect("due").is_empty());
        assert_eq!(
            store.outbox(3).expect("outbox"),
            vec![(outbox_key, event("ann", 1))]
        );
        // An entry this version cannot read is kept and does not hide the others.
        let foreign = OutboxKey {
            shard: 3,
            seq: 43,
            index: 0,
        };
        store
            .tree
            .insert(
                foreign.to_bytes(),
                &br#"{"v": 9, "type": "points.invented"}"#[..],
            )
            .expect("insert");
        assert_eq!(
            store.outbox(3).expect("outbox"),
            vec![(outbox_key, event("ann", 1))]
        );
        store.remove_outbox(&[outbox_key, foreign]).expect("remove");
        assert!(store.outbox(3).expect("outbox").is_empty());
        // The member index lists the shard's customers in id order, paged.
        assert_eq!(
            store.shard_customers(3, None, 10).expect("members"),
            vec!["ann", "bob"]
        );
        assert_eq!(
            store.shard_customers(3, Some("ann"), 10).expect("members"),
            vec!["bob"]
        );
        assert_eq!(
            store.shard_customers(3, None, 1).expect("members"),
            vec!["ann"]
        );
        assert!(store
            .shard_customers(2, None, 10)
            .expect("members")
            .is_empty());
        assert!(store.value_model(3).expect("model").is_none());
    }

    #[test]
    fn a_changed_due_time_moves_the_timer_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let commit = |customers| {
            store
                .commit(
                    0,
                    &CommitBatch {
                        customers,
                        ..CommitBatch::default()
                    },
                )
                .expect("commit")
        };
        commit(vec![
            state_write("ann", Some(100)),
            state_write("bob", Some(-50)),
        ]);
        assert_eq!(
            store.due_customers(0, 100, 10).expect("due"),
            vec!["bob", "ann"]
        );
        commit(vec![state_write("ann", Some(300))]);
        assert_eq!(store.due_customers(0, 299, 10).expect("due"), vec!["bob"]);
        assert_eq!(store.customer_due("ann").expect("due"), Some(300));
        commit(vec![state_write("bob", None)]);
        assert_eq!(
            store.due_customers(0, i64::MAX, 10).expect("due"),
            vec!["ann"]
        );
        assert_eq!(store.customer_due("bob").expect("due"), None);
    }

    #[test]
    fn due_timers_page_through_with_a_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let customers = (0..7)
            .map(|i| state_write(&format!("c{i}"), Some(10 * i64::from(i))))
            .collect();
        store
            .commit(
                1,
                &CommitBatch {
                    customers,
                    ..CommitBatch::default()
                },
            )
            .expect("commit");
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.due_timers(1, 45, cursor.as_ref(), 2).expect("page");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            cursor = page.last().cloned();
            seen.extend(page.into_iter().map(|t| t.customer_id));
        }
        assert_eq!(seen, vec!["c0", "c1", "c2", "c3", "c4"]);
    }

    #[test]
    fn an_undecodable_state_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        store
            .tree
            .insert(customer_key("ann"), &[9u8, 1, 2][..])
            .expect("insert");
        let error = store.load_customer("ann").expect_err("bad bytes");
        assert!(error.to_string().contains("c/ann"), "{error}");
    }

    fn transfer(merged: &str, survivor: &str) -> MergeTransfer {
        let mut state = CustomerState::new(merged);
        state.created_at_ms = Some(1_000);
        state.clock_ms = 2_000;
        MergeTransfer {
            merge: crate::shard_message::MergeRef {
                merged_id: merged.to_string(),
                survivor_id: survivor.to_string(),
                cause_event_id: format!("link-{merged}"),
                at_ms: 2_000,
            },
            to_customer_id: survivor.to_string(),
            state,
        }
    }

    fn transfer_key(shard: u32, seq: u64, index: u32) -> TransferKey {
        TransferKey { shard, seq, index }
    }

    #[tokio::test]
    async fn a_transfer_commits_with_its_batch_survives_reopen_and_leaves_once_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, second) = (transfer_key(5, 11, 0), transfer_key(5, 11, 1));
        {
            let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
            let batch = CommitBatch {
                customers: vec![state_write("bob", None)],
                meta: ShardMeta {
                    applied_seq: 11,
                    clock_ms: 2_000,
                    owner_epoch: 1,
                },
                transfers: vec![
                    (second, transfer("carl", "ann")),
                    (first, transfer("bob", "ann")),
                ],
                ..CommitBatch::default()
            };
            store.commit(5, &batch).expect("commit");
            // Readable at once, in key (commit) order, and only under its own shard.
            assert_eq!(
                store.transfers(5).expect("transfers"),
                vec![
                    (first, transfer("bob", "ann")),
                    (second, transfer("carl", "ann"))
                ]
            );
            assert!(store.transfers(4).expect("transfers").is_empty());
            assert!(store.transfers(6).expect("transfers").is_empty());
            store.flush().await.expect("flush");
        }
        // What a crash after the flush leaves: the batch's state, meta and transfers.
        let store = Store::open(dir.path(), CACHE_BYTES).expect("reopen");
        assert!(store.load_customer("bob").expect("load").is_some());
        assert_eq!(store.shard_meta(5).expect("meta").applied_seq, 11);
        assert_eq!(store.transfers(5).expect("transfers").len(), 2);
        store.remove_transfers(&[first]).expect("remove");
        assert_eq!(
            store.transfers(5).expect("transfers"),
            vec![(second, transfer("carl", "ann"))]
        );
        // Unknown keys are ignored; the actor-event outbox is another key space.
        store
            .remove_transfers(&[first, transfer_key(5, 99, 0)])
            .expect("remove again");
        store
            .remove_outbox(&[OutboxKey {
                shard: 5,
                seq: 11,
                index: 1,
            }])
            .expect("remove outbox");
        assert_eq!(store.transfers(5).expect("transfers").len(), 1);
        store.remove_transfers(&[second]).expect("remove");
        store.flush().await.expect("flush");
        drop(store);
        let store = Store::open(dir.path(), CACHE_BYTES).expect("reopen");
        assert!(store.transfers(5).expect("transfers").is_empty());
        assert!(store.load_customer("bob").expect("load").is_some());
    }

    #[test]
    fn a_transfer_is_written_by_the_same_atomic_batch_as_the_states() {
        // A reader polls the three parts of a commit while it is made, in the order
        // transfer, state, meta. Reads are not one snapshot, so the commit may land between
        // two of them; but as the commit is one atomic batch, once a read sees its part every
        // later read must see its part too. A transfer seen before its tombstone or meta (or
        // a tombstone before its meta) is a commit seen in part.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        store
            .commit(1, &shard_batch(1, 1, &["ann"], None))
            .expect("commit");
        let mut tombstone = CustomerState::new("bob");
        tombstone.created_at_ms = Some(1_000);
        tombstone.merge.merged_into = Some("ann".to_string());
        let batch = CommitBatch {
            customers: vec![CustomerWrite {
                customer_id: "bob".to_string(),
                state: EncodedState {
                    bytes: codec::encode(&tombstone),
                    next_due_ms: None,
                },
            }],
            meta: ShardMeta {
                applied_seq: 2,
                clock_ms: 2_000,
                owner_epoch: 3,
            },
            transfers: vec![(transfer_key(1, 2, 0), transfer("bob", "ann"))],
            ..CommitBatch::default()
        };
        let reader = store.clone();
        let started = std::sync::Arc::new(std::sync::Barrier::new(2));
        let reader_started = started.clone();
        let watcher = std::thread::spawn(move || {
            reader_started.wait();
            loop {
                let transfer = !reader.transfers(1).expect("transfers").is_empty();
                let state = reader.load_customer("bob").expect("load").is_some();
                let meta = reader.shard_meta(1).expect("meta").applied_seq == 2;
                let seen = (transfer, state, meta);
                assert!(
                    (!transfer || state) && (!state || meta),
                    "a commit seen in part (transfer, state, meta): {seen:?}"
                );
                if seen == (true, true, true) {
                    return;
                }
            }
        });
        started.wait();
        store.commit(1, &batch).expect("commit");
        watcher.join().expect("the reader saw the commit whole");
    }

    #[test]
    fn transfers_travel_with_an_exported_shard_and_are_cleared_with_it() {
        let source_dir = tempfile::tempdir().expect("tempdir");
        let source = Store::open(source_dir.path(), CACHE_BYTES).expect("open");
        let mut batch = shard_batch(7, 30, &["bob"], None);
        batch.transfers = vec![(transfer_key(7, 30, 0), transfer("bob", "ann"))];
        source.commit(7, &batch).expect("commit");
        let mut other = shard_batch(8, 4, &["dan"], None);
        other.transfers = vec![(transfer_key(8, 4, 0), transfer("dan", "eve"))];
        source.commit(8, &other).expect("commit");

        let pieces = all_pieces(&source, 7, 64);
        let entries: usize = pieces.iter().map(Vec::len).sum();
        // Member, state, outbox entry, transfer, meta: shard 8's transfer stays home.
        assert_eq!(entries, 5);
        let last = pieces.last().and_then(|p| p.last()).expect("an entry");
        assert_eq!(last.0, meta_key(7), "the meta still travels last");

        let target_dir = tempfile::tempdir().expect("tempdir");
        let target = Store::open(target_dir.path(), CACHE_BYTES).expect("open");
        // A stale copy with a transfer the snapshot no longer has (it was sent since).
        let mut stale = shard_batch(7, 10, &["old"], None);
        stale.transfers = vec![(transfer_key(7, 10, 0), transfer("old", "ann"))];
        target.commit(7, &stale).expect("commit");
        target.clear_shard(7).expect("clear");
        assert!(target.transfers(7).expect("transfers").is_empty());
        for piece in &pieces {
            target.import_piece(7, piece).expect("import");
        }
        assert_eq!(
            target.transfers(7).expect("transfers"),
            vec![(transfer_key(7, 30, 0), transfer("bob", "ann"))]
        );
        assert!(target.transfers(8).expect("transfers").is_empty());
        // A transfer key of another shard is refused by the import.
        let foreign = vec![(transfer_key(8, 4, 0).to_bytes(), vec![1u8])];
        let error = target.import_piece(7, &foreign).unwrap_err();
        assert!(error.to_string().contains("another shard"), "{error}");
        // The source's other shard is untouched by an export.
        assert_eq!(source.transfers(8).expect("transfers").len(), 1);
    }

    #[test]
    fn an_unreadable_transfer_is_kept_and_hides_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), CACHE_BYTES).expect("open");
        let batch = CommitBatch {
            transfers: vec![(transfer_key(2, 6, 0), transfer("bob", "ann"))],
            ..CommitBatch::default()
        };
        store.commit(2, &batch).expect("commit");
        let foreign = transfer_key(2, 5, 0);
        store
            .tree
            .insert(foreign.to_bytes(), &[99u8, 1, 2][..])
            .expect("insert");
        assert_eq!(
            store.transfers(2).expect("transfers"),
            vec![(transfer_key(2, 6, 0), transfer("bob", "ann"))]
        );
        assert!(store.tree.get(foreign.to_bytes()).expect("get").is_some());
        // A malformed key is an error that names it, not a panic.
        store
            .tree
            .insert(
                [TRANSFER_PREFIX, &2u32.to_be_bytes()[..], b"/x"].concat(),
                &[][..],
            )
            .expect("insert");
        let error = store.transfers(2).unwrap_err();
        assert!(error.to_string().contains("transfer key"), "{error}");
    }
}
