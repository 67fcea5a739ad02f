//! The identity directory: which customer an identifier (loyalty card, customer id, email,
//! phone, device id) belongs to, shared by every router of the cluster through the
//! `crm_identity` JetStream KV bucket, and the identity rules applied when an event links
//! identifiers (`max_per_customer`, `merge`, `merges_max_per_day`: `docs/rules.md`).
//!
//! Keys are `hex(HMAC-SHA256(cluster_secret, "<kind>:<normalised value>"))`, so no raw PII
//! ever appears in a NATS key, subject or log line; the value is the customer id (UTF-8).
//! Every mapping is written with KV `create` (compare-and-set, create-if-absent): the first
//! router to map an identifier wins and every other router reads its answer, so two routers
//! resolving the same new person at once end with one customer. A new customer's id is
//! minted deterministically from its primary identifier (`c` + the first 24 hex characters
//! of that identifier's key), so racing routers even mint the same id.
//!
//! An email whose key an older build made from its decomposed form
//! (`Identity::legacy_form`) is looked up under that form when its current key is unknown,
//! and the router then maps the current key to the same customer.
//!
//! An identifier key never changes once created, so the bounded in-memory cache of key ->
//! customer id can never go stale. Merging two customers does not rewrite keys: it sets
//! `merged_into` on the merged customer's record (`records.rs`, compare-and-set), which
//! moves all of its identifiers at once; the customer an identifier belongs to now is the
//! end of that chain (its root). Records change, so only the router (the one writer, by its
//! lease) caches them, and it forgets them whenever it starts routing. Called by the router
//! (resolve, may create and merge) and the query responder (lookup, never creates; it
//! answers with the identifier's first customer, whose tombstone view names the survivor).

use crate::backoff::Backoff;
use crate::subjects;
use async_nats::jetstream::kv;
use crm_actors::identity::{Identity, IdentityKind};
use crm_actors::rules::IdentityRules;
use crm_actors::shard_message::{IdentityNote, MergeRef};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub mod records;
mod resolve_many;

pub use records::CustomerRecord;

/// Hex characters of the identifier key used in a minted customer id (96 bits).
pub const CUSTOMER_ID_HEX_CHARS: usize = 24;
/// Attempts of one KV operation that fails transiently (timeouts, no responders).
pub const KV_ATTEMPTS_MAX: u32 = 5;
/// First pause between KV attempts, in milliseconds; doubles each time (with jitter).
pub const KV_RETRY_INITIAL_MS: u64 = 50;
/// Longest pause between KV attempts, in milliseconds.
pub const KV_RETRY_MAX_MS: u64 = 1_000;

/// KV requests [`IdentityDirectory::resolve_many`] keeps in flight at once.
pub const KV_IN_FLIGHT_MAX: usize = 128;
/// Most answers [`IdentityDirectory::read_ahead`] keeps for `resolve_many` (all are dropped
/// when it is full: they are hints, a missing one is read again).
pub const READ_AHEAD_MAX: usize = 65_536;
/// Smallest cache with which [`IdentityDirectory::read_ahead`] reads anything (with a small
/// cache its "absent" answers expire before they are used, see `read_ahead`).
pub const READ_AHEAD_MIN_CACHE: usize = 65_536;

/// An answer [`IdentityDirectory::read_ahead`] keeps for `resolve_many`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hint {
    /// The stored customer; `None`: absent when read.
    found: Option<String>,
    /// The cache's [`BoundedCache::generations`] when the read began.
    generations: u64,
}

impl Hint {
    /// Whether the hint may be used now that the cache has filled `generations`: a customer
    /// always; "absent" while at most one generation has filled since the read began, so
    /// that every key this directory created since is still cached (and the cache, looked
    /// at first, answers for it).
    fn usable(&self, generations: u64) -> bool {
        self.found.is_some() || generations.saturating_sub(self.generations) <= 1
    }
}

/// The outcome of [`IdentityDirectory::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The customer the event belongs to.
    pub customer_id: String,
    /// True when this call minted the customer (its primary identifier was unknown and this
    /// call's `create` won). Among racing routers at most one sees `true`.
    pub created: bool,
    /// Identifiers that were unknown when looked up and now map to `customer_id`, in input
    /// order (includes the primary identifier when `created`).
    pub linked: Vec<IdentityKind>,
    /// Identifiers of the event that belong to another customer that was not merged:
    /// (kind, that customer's id). They are left as they are, and dropped from the event.
    pub conflicts: Vec<(IdentityKind, String)>,
    /// Identifiers not linked as sent, with the reason (the conflicts above, and unknown
    /// identifiers one too many for the customer): drop them from the event.
    pub notes: Vec<IdentityNote>,
    /// Customers this event merges into `customer_id` (the survivor waits for their states).
    pub merges: Vec<MergeRef>,
    /// Merge-outs to write, each into the shard log of its `merged_id`: this event's merges,
    /// and those an earlier routing of the same event recorded (written again: idempotent).
    pub merge_outs: Vec<MergeRef>,
}

impl Resolution {
    /// The kinds of the event's identifiers that must be dropped from it.
    pub fn dropped(&self) -> impl Iterator<Item = IdentityKind> + '_ {
        self.notes.iter().map(|note| note.kind)
    }
}

/// What the directory needs of one event: its identifiers (normalised, highest priority
/// first), its id (the cause a merge records) and its time (the day merges are counted on).
#[derive(Debug, Clone, Copy)]
pub struct EventIdentities<'a> {
    pub identities: &'a [Identity],
    pub event_id: &'a str,
    pub at_ms: i64,
    /// Its `CRM_INGEST` sequence: a merge decided by a later event does not apply to it
    /// (`u64::MAX`: after every merge).
    pub ingest_seq: u64,
}

/// Counters of a directory, read with [`IdentityDirectory::metrics`].
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct DirectoryMetrics {
    /// Identifier look-ups answered from the cache.
    pub cache_hits: u64,
    /// Identifier look-ups the cache could not answer.
    pub cache_misses: u64,
    /// Customers minted by this directory.
    pub creates: u64,
    /// Identifiers this directory mapped to an existing or new customer.
    pub links: u64,
    /// Identifiers found to belong to another customer than the event's.
    pub conflicts: u64,
    /// KV operations retried after a transient failure.
    pub kv_retries: u64,
    /// Uncached identifiers read from the KV bucket.
    pub kv_reads: u64,
    /// Uncached identifiers mapped with a create and no read before it (their mapping did
    /// not depend on any other unknown identifier, see `resolve_many`).
    pub created_first: u64,
    /// Answers read ahead of their chunk and kept ([`IdentityDirectory::read_ahead`]).
    pub read_ahead: u64,
    /// Uncached identifiers `resolve_many` took from the answers read ahead.
    pub read_ahead_used: u64,
    /// Customers merged into another by this directory.
    pub merges: u64,
    /// Merges refused by the identity rules (`merge = false`, `max_per_customer`,
    /// `merges_max_per_day`).
    pub merges_refused: u64,
    /// Unknown identifiers not linked because the customer holds `max_per_customer` of
    /// their kind.
    pub identifiers_refused: u64,
    /// Customer records written (compare-and-set).
    pub record_writes: u64,
}

/// The KV key of `identity` under the secret `hmac` was made from: hex HMAC-SHA256 of
/// `"<kind>:<normalised value>"`. Stored mappings are found by this key, so its derivation
/// (and the normalisation before it) must never change for an identifier already stored.
fn key_with(hmac: &Hmac<Sha256>, identity: &Identity) -> String {
    let mut mac = hmac.clone();
    mac.update(identity.kind.as_str().as_bytes());
    mac.update(b":");
    mac.update(identity.value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Why the directory could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DirectoryError {
    #[error("no identifier given; an event or query needs at least one of loyalty_card, customer_id, email, phone, device_id")]
    NoIdentity,
    #[error("identity directory (KV bucket {bucket}) could not {operation} the {kind} key after {attempts} attempts: {detail}; check that NATS is reachable and JetStream is enabled")]
    Unavailable {
        bucket: &'static str,
        operation: &'static str,
        kind: IdentityKind,
        attempts: u32,
        detail: String,
    },
    #[error("identity directory (KV bucket {bucket}) key {key} for a {kind} holds '{value}', not a customer id; fix or delete that key (`nats kv del {bucket} {key}`)")]
    CorruptValue {
        bucket: &'static str,
        kind: IdentityKind,
        key: String,
        value: String,
    },
    #[error("identity keys are no longer created here: the router lease ran out, and another router may be mapping these identifiers; the next holder of the lease routes the chunk again")]
    Fenced,
    #[error("identity directory (KV bucket {bucket}) record of customer {customer_id} was written meanwhile by another router with another merge (into {stored}); the chunk is routed again against what is stored")]
    Contended {
        bucket: &'static str,
        customer_id: String,
        stored: String,
    },
    #[error("identity directory (KV bucket {bucket}) record of customer {customer_id} is {problem}; fix or delete that key (`nats kv del {bucket} customer.{customer_id}`)")]
    CorruptRecord {
        bucket: &'static str,
        customer_id: String,
        problem: String,
    },
}

impl DirectoryError {
    /// Whether routing the chunk again later can succeed (the directory was unreachable,
    /// contended or fenced), as opposed to an input the directory cannot answer for.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DirectoryError::Unavailable { .. }
                | DirectoryError::Fenced
                | DirectoryError::Contended { .. }
        )
    }
}

/// Asked just before each identity key is created: may this caller still write? (The
/// router answers with its lease fence.)
pub type MayCreate<'a> = &'a (dyn Fn() -> bool + Sync);

/// The identity directory over one KV bucket. Cheap to share behind an `Arc`.
pub struct IdentityDirectory {
    kv: kv::Store,
    /// HMAC key state with the cluster secret already absorbed; cloned per identifier.
    hmac: Hmac<Sha256>,
    cache: Mutex<BoundedCache<String>>,
    /// Customer records with their KV revision (the router's own, see the module notes).
    records: Mutex<BoundedCache<(CustomerRecord, u64)>>,
    rules: IdentityRules,
    /// What [`read_ahead`](Self::read_ahead) learnt of uncached keys. At most
    /// [`READ_AHEAD_MAX`] entries.
    read_ahead: Mutex<HashMap<String, Hint>>,
    /// Bumped by [`clear_read_ahead`](Self::clear_read_ahead): a read-ahead that began
    /// before it keeps nothing.
    read_ahead_epoch: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    creates: AtomicU64,
    links: AtomicU64,
    conflicts: AtomicU64,
    kv_retries: AtomicU64,
    kv_reads: AtomicU64,
    created_first: AtomicU64,
    read_ahead: AtomicU64,
    read_ahead_used: AtomicU64,
    merges: AtomicU64,
    merges_refused: AtomicU64,
    identifiers_refused: AtomicU64,
    record_writes: AtomicU64,
}

impl IdentityDirectory {
    /// A directory over `kv` (the [`subjects::KV_IDENTITY`] bucket), hashing identifiers with
    /// `cluster_secret` (the same on every node of a cluster; changing it orphans every
    /// mapping) and caching at most `cache_max_entries` mappings (0: no cache).
    pub fn new(
        kv: kv::Store,
        cluster_secret: &[u8],
        cache_max_entries: usize,
    ) -> IdentityDirectory {
        // HMAC accepts keys of any length (longer ones are hashed), so this cannot fail.
        let hmac = <Hmac<Sha256> as Mac>::new_from_slice(cluster_secret)
            .unwrap_or_else(|_| unreachable!("HMAC-SHA256 takes keys of any length"));
        IdentityDirectory {
            kv,
            hmac,
            cache: Mutex::new(BoundedCache::new(cache_max_entries)),
            records: Mutex::new(BoundedCache::new(cache_max_entries)),
            rules: IdentityRules::default(),
            read_ahead: Mutex::new(HashMap::new()),
            read_ahead_epoch: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The directory applying these identity rules (the default rules otherwise).
    pub fn with_rules(mut self, rules: IdentityRules) -> IdentityDirectory {
        self.rules = rules;
        self
    }

    /// The identity rules applied.
    pub fn rules(&self) -> &IdentityRules {
        &self.rules
    }

    /// A fingerprint of the secret (16 hex characters of the HMAC of a fixed text): equal on
    /// two nodes exactly when they hash identifiers alike; it reveals nothing of the secret.
    pub fn secret_fingerprint(&self) -> String {
        let mut mac = self.hmac.clone();
        mac.update(b"crm identity secret fingerprint");
        hex::encode(mac.finalize().into_bytes())[..16].to_string()
    }

    /// The KV key of an identifier: hex HMAC-SHA256 of `"<kind>:<value>"` (64 characters).
    pub fn key_of(&self, identity: &Identity) -> String {
        key_with(&self.hmac, identity)
    }

    /// The id a new customer whose primary identifier is `identity` gets: `c` + 24 hex.
    pub fn customer_id_for(&self, identity: &Identity) -> String {
        let key = self.key_of(identity);
        format!("c{}", &key[..CUSTOMER_ID_HEX_CHARS])
    }

    /// The customer of these identifiers, creating it and linking unknown identifiers to it,
    /// and merging the customers they belong to when the identity rules allow it (see
    /// [`resolve_events`](Self::resolve_events), of which this is the one-event case with no
    /// event id and time 0).
    ///
    /// `identities` are normalised and highest priority first (as `ChannelEvent::identities`
    /// are). The customer is the owner now (the root) of the highest-priority identifier
    /// already known; when none is known, a customer is minted from the first identifier.
    pub async fn resolve(&self, identities: &[Identity]) -> Result<Resolution, DirectoryError> {
        let event = EventIdentities {
            identities,
            event_id: "",
            at_ms: 0,
            ingest_seq: u64::MAX,
        };
        let mut results = self.resolve_events_guarded(&[event], &|| true).await?;
        results.pop().unwrap_or(Err(DirectoryError::NoIdentity))
    }

    /// [`resolve`](Self::resolve) for one event, asking `may_create` before every write.
    async fn resolve_guarded(
        &self,
        event: EventIdentities<'_>,
        may_create: MayCreate<'_>,
    ) -> Result<Resolution, DirectoryError> {
        let mut results = Box::pin(self.resolve_events_guarded(&[event], may_create)).await?;
        results.pop().unwrap_or(Err(DirectoryError::NoIdentity))
    }

    /// Reads, ahead of [`resolve_many`](Self::resolve_many), the uncached identifiers it
    /// would read for these events (those of events with two or more uncached identifiers;
    /// a lone unknown identifier is created without a read), and keeps the answers for it.
    /// The router calls it on the chunk after the one it is resolving, so those reads (the
    /// slow KV operation: a read of an absent key) overlap the resolution in hand. A read
    /// that fails is left to `resolve_many` (one attempt, no retry).
    ///
    /// A customer read ahead stays true (mappings never change). "Absent" goes stale when
    /// the key is mapped after the read: by this directory (the chunk in hand creates what
    /// the next one reads ahead) or by another router. Every create of this directory
    /// caches its key, and `resolve_many` looks at the cache first, so a stale "absent"
    /// would be used only once the cache has dropped the key: the cache drops an entry only
    /// after two generations (see [`BoundedCache`]) have filled since it was inserted, so an
    /// "absent" is used only while at most one generation has filled since its read began
    /// (and not at all with a cache under [`READ_AHEAD_MIN_CACHE`]). Another router maps
    /// keys only while this node does not route: [`clear_read_ahead`](Self::clear_read_ahead)
    /// when routing starts.
    pub async fn read_ahead(&self, events: &[&[Identity]]) {
        let epoch = self.read_ahead_epoch.load(Ordering::SeqCst);
        let generations = {
            let cache = self.lock_cache();
            if cache.capacity < READ_AHEAD_MIN_CACHE {
                return;
            }
            cache.generations
        };
        // Keys first (HMAC), then the cache, then the answers kept: one lock at a time.
        let keyed: Vec<Vec<(IdentityKind, String)>> = events
            .iter()
            .map(|identities| {
                identities
                    .iter()
                    .map(|identity| (identity.kind, self.key_of(identity)))
                    .collect()
            })
            .collect();
        let uncached: Vec<(IdentityKind, String)> = {
            let cache = self.lock_cache();
            keyed
                .into_iter()
                .map(|keys| {
                    keys.into_iter()
                        .filter(|(_, key)| !cache.contains(key))
                        .collect::<Vec<_>>()
                })
                .filter(|keys| keys.len() >= 2)
                .flatten()
                .collect()
        };
        let wanted: Vec<(IdentityKind, String)> = {
            let answers = self.lock_read_ahead();
            let mut seen: HashSet<String> = HashSet::new();
            uncached
                .into_iter()
                .filter(|(_, key)| {
                    !answers
                        .get(key)
                        .is_some_and(|hint| hint.usable(generations))
                        && seen.insert(key.clone())
                })
                .collect()
        };
        let answers: Vec<(String, Option<String>)> =
            futures::stream::iter(wanted.into_iter().map(|(kind, key)| async move {
                // A value that is not a customer id is left for resolve_many to report.
                let found = match self.kv.get(&key).await {
                    Ok(None) => Some(None),
                    Ok(Some(value)) => self.customer_id_from(kind, &key, &value).ok().map(Some),
                    Err(_) => None,
                };
                found.map(|found| (key, found))
            }))
            .buffer_unordered(KV_IN_FLIGHT_MAX)
            .filter_map(|answer| async move { answer })
            .collect()
            .await;
        let mut kept = self.lock_read_ahead();
        if self.read_ahead_epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        for (key, found) in answers {
            if kept.len() >= READ_AHEAD_MAX {
                kept.clear();
            }
            // A customer found stays true; a newer read replaces an older "absent".
            if kept.get(&key).is_none_or(|hint| hint.found.is_none()) {
                self.counters.read_ahead.fetch_add(1, Ordering::Relaxed);
                kept.insert(key, Hint { found, generations });
            }
        }
    }

    /// Drops every answer read ahead: the router calls it when it starts routing, since
    /// another node's router may have mapped keys meanwhile (see `read_ahead`).
    pub fn clear_read_ahead(&self) {
        let mut kept = self.lock_read_ahead();
        kept.clear();
        // Under the lock: a read-ahead still running keeps nothing it read before.
        self.read_ahead_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The customer of the highest-priority known identifier, or `None`; never creates.
    pub async fn lookup(&self, identities: &[Identity]) -> Result<Option<String>, DirectoryError> {
        if identities.is_empty() {
            return Err(DirectoryError::NoIdentity);
        }
        let keys: Vec<String> = identities.iter().map(|id| self.key_of(id)).collect();
        let known = self.lookup_keys(identities, &keys).await?;
        Ok(known.into_iter().flatten().next())
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> DirectoryMetrics {
        let c = &self.counters;
        DirectoryMetrics {
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            creates: c.creates.load(Ordering::Relaxed),
            links: c.links.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            kv_retries: c.kv_retries.load(Ordering::Relaxed),
            kv_reads: c.kv_reads.load(Ordering::Relaxed),
            created_first: c.created_first.load(Ordering::Relaxed),
            read_ahead: c.read_ahead.load(Ordering::Relaxed),
            read_ahead_used: c.read_ahead_used.load(Ordering::Relaxed),
            merges: c.merges.load(Ordering::Relaxed),
            merges_refused: c.merges_refused.load(Ordering::Relaxed),
            identifiers_refused: c.identifiers_refused.load(Ordering::Relaxed),
            record_writes: c.record_writes.load(Ordering::Relaxed),
        }
    }

    /// Mappings held in the cache now (never above `cache_max_entries`).
    pub fn cache_len(&self) -> usize {
        self.lock_cache().len()
    }

    fn lock_read_ahead(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hint>> {
        // Hints only: whatever a panicking holder left is still a valid hint.
        self.read_ahead
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, BoundedCache<(CustomerRecord, u64)>> {
        // A record is replaced whole: a panicking holder leaves the old one or the new one.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets the customer records cached: the router calls it when it starts routing,
    /// since another node's router may have written records meanwhile.
    pub fn forget_records(&self) {
        self.lock_records().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, BoundedCache<String>> {
        // The cache holds no invariant a panicking holder could break half-way.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The customer of each key (cache first, then the KV bucket, concurrently).
    async fn lookup_keys(
        &self,
        identities: &[Identity],
        keys: &[String],
    ) -> Result<Vec<Option<String>>, DirectoryError> {
        let lookups = identities
            .iter()
            .zip(keys)
            .map(|(identity, key)| async move {
                match self.lookup_key(identity.kind, key).await? {
                    None => match identity.legacy_form() {
                        // Stored before emails were NFC-normalised: found under that form.
                        Some(legacy) => self.lookup_key(identity.kind, &self.key_of(&legacy)).await,
                        None => Ok(None),
                    },
                    found => Ok(found),
                }
            });
        futures::future::try_join_all(lookups).await
    }

    async fn lookup_key(
        &self,
        kind: IdentityKind,
        key: &str,
    ) -> Result<Option<String>, DirectoryError> {
        if let Some(customer_id) = self.lock_cache().get(key) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(customer_id));
        }
        self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        let found = self.read(kind, key).await?;
        if let Some(customer_id) = &found {
            self.lock_cache().insert(key, customer_id);
        }
        Ok(found)
    }

    /// Reads one key from the bucket, retrying transient failures.
    async fn read(&self, kind: IdentityKind, key: &str) -> Result<Option<String>, DirectoryError> {
        let mut backoff = kv_backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.kv.get(key).await {
                Ok(None) => return Ok(None),
                Ok(Some(value)) => return self.customer_id_from(kind, key, &value).map(Some),
                Err(error) => {
                    self.retry_or_fail(attempt, &mut backoff, "read", kind, error.to_string())
                        .await?
                }
            }
        }
    }

    /// Maps `key` to `customer_id` if it is unmapped (KV create). `Lost` carries the value
    /// some other writer stored first. Retries transient failures; a write that succeeded but
    /// whose ack was lost shows up as `Lost(customer_id)`. `may_create` is asked before
    /// every attempt: [`DirectoryError::Fenced`] once it says no.
    async fn create(
        &self,
        kind: IdentityKind,
        key: &str,
        customer_id: &str,
        may_create: MayCreate<'_>,
    ) -> Result<Created, DirectoryError> {
        debug_assert!(subjects::is_token(customer_id));
        let mut backoff = kv_backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !may_create() {
                return Err(DirectoryError::Fenced);
            }
            match self
                .kv
                .create(key, bytes::Bytes::copy_from_slice(customer_id.as_bytes()))
                .await
            {
                Ok(_) => {
                    self.lock_cache().insert(key, customer_id);
                    return Ok(Created::Won);
                }
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Mappings never change: whatever is stored now is the answer.
                    return match self.read(kind, key).await? {
                        Some(stored) => {
                            self.lock_cache().insert(key, &stored);
                            Ok(Created::Lost(stored))
                        }
                        // Only a deleted key reads as absent; create it again.
                        None => {
                            self.retry_or_fail(
                                attempt,
                                &mut backoff,
                                "create",
                                kind,
                                "key deleted".into(),
                            )
                            .await?;
                            continue;
                        }
                    };
                }
                Err(error) => {
                    self.retry_or_fail(attempt, &mut backoff, "create", kind, error.to_string())
                        .await?
                }
            }
        }
    }

    /// Sleeps before attempt `attempt + 1`, or fails when the attempts are used up.
    async fn retry_or_fail(
        &self,
        attempt: u32,
        backoff: &mut Backoff,
        operation: &'static str,
        kind: IdentityKind,
        detail: String,
    ) -> Result<(), DirectoryError> {
        if attempt >= KV_ATTEMPTS_MAX {
            return Err(DirectoryError::Unavailable {
                bucket: subjects::KV_IDENTITY,
                operation,
                kind,
                attempts: attempt,
                detail,
            });
        }
        self.counters.kv_retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%kind, operation, attempt, error = %detail, "identity directory: retrying");
        tokio::time::sleep(backoff.next_delay()).await;
        Ok(())
    }

    fn customer_id_from(
        &self,
        kind: IdentityKind,
        key: &str,
        value: &[u8],
    ) -> Result<String, DirectoryError> {
        match std::str::from_utf8(value) {
            Ok(text) if subjects::is_token(text) => Ok(text.to_string()),
            _ => Err(DirectoryError::CorruptValue {
                bucket: subjects::KV_IDENTITY,
                kind,
                key: key.to_string(),
                value: String::from_utf8_lossy(value).chars().take(64).collect(),
            }),
        }
    }
}

/// The pauses between the attempts of one KV operation.
fn kv_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(KV_RETRY_INITIAL_MS),
        2,
        Duration::from_millis(KV_RETRY_MAX_MS),
    )
}

enum Created {
    Won,
    Lost(String),
}

/// A bounded key -> customer id map with approximate-LRU eviction in two generations: hits
/// and inserts go to `recent`; when `recent` holds half the capacity it becomes `older`
/// (dropping the previous `older`), and a hit in `older` moves the entry back to `recent`.
/// At most `capacity` entries, O(1) per operation, no per-entry bookkeeping.
struct BoundedCache<V> {
    capacity: usize,
    recent: HashMap<String, V>,
    older: HashMap<String, V>,
    /// Generations filled so far: each time `recent` became `older` (or, with a capacity
    /// of 1, was emptied). With a capacity of 2 or more, an entry inserted stays cached
    /// until two more have filled (with 1, until the next; with 0 nothing is cached).
    generations: u64,
}

impl<V: Clone> BoundedCache<V> {
    fn new(capacity: usize) -> BoundedCache<V> {
        BoundedCache {
            capacity,
            recent: HashMap::new(),
            older: HashMap::new(),
            generations: 0,
        }
    }

    fn generation_max(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    fn get(&mut self, key: &str) -> Option<V> {
        if let Some(value) = self.recent.get(key) {
            return Some(value.clone());
        }
        let (key, value) = self.older.remove_entry(key)?;
        self.put(key, value.clone());
        Some(value)
    }

    /// Whether `key` is cached (without refreshing it).
    fn contains(&self, key: &str) -> bool {
        self.recent.contains_key(key) || self.older.contains_key(key)
    }

    fn insert(&mut self, key: &str, value: &str)
    where
        V: for<'a> From<&'a str>,
    {
        if self.capacity == 0 || self.recent.contains_key(key) {
            return;
        }
        self.older.remove(key);
        self.put(key.to_string(), V::from(value));
    }

    /// Sets `key` to `value` (replacing what was cached).
    fn set(&mut self, key: &str, value: V) {
        if self.capacity == 0 {
            return;
        }
        self.older.remove(key);
        if let Some(slot) = self.recent.get_mut(key) {
            *slot = value;
            return;
        }
        self.put(key.to_string(), value);
    }

    /// Forgets `key`.
    fn remove(&mut self, key: &str) {
        self.recent.remove(key);
        self.older.remove(key);
    }

    /// Forgets everything.
    fn clear(&mut self) {
        self.recent.clear();
        self.older.clear();
    }

    fn put(&mut self, key: String, value: V) {
        if self.capacity == 1 {
            self.recent.clear();
            self.older.clear();
            self.generations += 1;
        } else if self.recent.len() >= self.generation_max() {
            self.older = std::mem::take(&mut self.recent);
            self.generations += 1;
        }
        self.recent.insert(key, value);
        debug_assert!(self.len() <= self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Existing customers are found by these keys: a change to the normalisation or to the
    /// key derivation that moves any of them orphans every stored mapping.
    #[test]
    fn the_key_of_a_stored_identifier_never_changes() {
        let hmac = <Hmac<Sha256> as Mac>::new_from_slice(b"test-cluster-secret").unwrap();
        let pinned = [
            (
                IdentityKind::Email,
                " Ann.Lee@Example.COM ",
                "2359566e89120eb419f75f7cf2b39d533c31613d869b7130b9ddf0bd0e81303e",
            ),
            (
                IdentityKind::Phone,
                "0049 (0)151 1234-5678",
                "6cd80a1bf434d4dfae133766d9fa11829ce078759df1d7ed191eee704aa58738",
            ),
            (
                IdentityKind::LoyaltyCard,
                "LC-42",
                "ac204fbeecb855c93db64c5a3cb9c1b811eea641e66e3f993cb282e1e3607cf9",
            ),
        ];
        for (kind, raw, key) in pinned {
            let identity = Identity::normalise(kind, raw).unwrap();
            assert_eq!(key_with(&hmac, &identity), key, "{kind} {raw:?}");
        }
    }

    #[test]
    fn an_entry_stays_cached_while_at_most_one_generation_fills_after_it() {
        let mut cache = BoundedCache::<String>::new(8);
        cache.insert("k", "c1");
        let inserted = cache.generations;
        let mut n = 0;
        while cache.generations - inserted <= 1 {
            assert!(cache.contains("k"), "after {n} more inserts");
            cache.insert(&format!("other-{n}"), "c2");
            n += 1;
        }
        assert!(!cache.contains("k"), "two generations later it is gone");
    }

    #[test]
    fn a_hint_of_absence_expires_after_one_generation_and_a_customer_never() {
        let absent = Hint {
            found: None,
            generations: 5,
        };
        assert!(absent.usable(5) && absent.usable(6));
        assert!(!absent.usable(7));
        let found = Hint {
            found: Some("c1".into()),
            generations: 5,
        };
        assert!(found.usable(100));
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        for capacity in [1, 2, 3, 10, 101] {
            let mut cache = BoundedCache::<String>::new(capacity);
            for i in 0..1_000 {
                cache.insert(&format!("k{i}"), "c1");
                let _ = cache.get(&format!("k{}", i / 2));
                assert!(
                    cache.len() <= capacity,
                    "capacity {capacity}: {}",
                    cache.len()
                );
            }
        }
        let mut none = BoundedCache::<String>::new(0);
        none.insert("k", "c");
        assert_eq!(none.get("k"), None);
    }

    #[test]
    fn a_recently_used_entry_survives_eviction() {
        let mut cache = BoundedCache::<String>::new(10);
        cache.insert("hot", "c1");
        for i in 0..100 {
            cache.insert(&format!("k{i}"), "c2");
            assert_eq!(cache.get("hot").as_deref(), Some("c1"), "after {i}");
        }
        assert_eq!(cache.get("k0"), None);
    }
}
