//! Customer records: what the identity directory keeps per customer beside the identifier
//! keys, under `customer.<customer id>` in the same `crm_identity` bucket (JSON). A record
//! says which identifiers the customer holds (as key prefixes, per kind: what
//! `max_per_customer` counts), which merges it absorbed lately (what `merges_max_per_day`
//! counts), and, once the customer was merged into another, where it went and which event
//! caused it (`merged_into`, `merge_cause`).
//!
//! Identifier keys never change: a merge moves every identifier of the merged customer at
//! once by setting `merged_into` on that one record (compare-and-set), and a customer's
//! current owner is found by following `merged_into` to the end of the chain (its root).
//! Records only grow by union (identifiers, merges) and `merged_into` is set once, so two
//! writers that race (a router and its successor during a lease hand-over) reconcile by
//! reading the stored record, uniting it with theirs and writing again; only two different
//! `merged_into` for one customer cannot be united, and the chunk is routed again.

use super::{kv_backoff, DirectoryError, IdentityDirectory, MayCreate};
use crate::backoff::Backoff;
use crate::subjects;
use async_nats::jetstream::kv;
use crm_actors::identity::IdentityKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

/// The key prefix of customer records in the identity bucket (identifier keys are hex).
pub const RECORD_KEY_PREFIX: &str = "customer.";
/// Hex characters of an identifier key kept in a record (64 bits: collisions between one
/// customer's identifiers are out of reach).
pub const ID_PREFIX_HEX_CHARS: usize = 16;
/// Days of absorbed merges a record keeps before the latest merge's day (older ones no
/// longer count toward `merges_max_per_day` and are dropped).
pub const MERGE_DAYS_KEPT: i64 = 7;
/// Writes of one record lost to another writer in a row before giving up (the chunk is
/// routed again).
pub const RECORD_RACES_MAX: u32 = 32;
/// Longest merge chain followed (a longer one is a corrupt directory).
pub const CHAIN_MAX: usize = 64;

/// The KV key of a customer's record.
pub fn record_key(customer_id: &str) -> String {
    format!("{RECORD_KEY_PREFIX}{customer_id}")
}

/// The UTC day (days since 1970-01-01) of a Unix ms time.
pub fn day_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(86_400_000)
}

/// One customer's record (see the module notes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// Set once: the customer this one was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// The event id that caused that merge (a re-routed event writes its merge again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_cause: Option<String>,
    /// The `CRM_INGEST` sequence of that event: events before it in ingest order still
    /// belong to this customer (they are before the merge-out in its shard log), so a
    /// redelivered one is routed here again, not to the survivor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_seq: Option<u64>,
    /// Identifier kind -> the identifiers held, as key prefixes.
    #[serde(default)]
    pub ids: BTreeMap<String, BTreeSet<String>>,
    /// Customers absorbed lately (directly or by what they had absorbed) -> the UTC day of
    /// the merge.
    #[serde(default)]
    pub merges: BTreeMap<String, i64>,
}

impl CustomerRecord {
    /// Identifiers of `kind` held.
    pub fn count(&self, kind: IdentityKind) -> usize {
        self.ids.get(kind.as_str()).map_or(0, BTreeSet::len)
    }

    /// Does the record hold the identifier of this key?
    pub fn holds(&self, kind: IdentityKind, key: &str) -> bool {
        self.ids
            .get(kind.as_str())
            .is_some_and(|ids| ids.contains(id_prefix(key)))
    }

    /// Records the identifier of this key; whether it was new.
    pub fn add(&mut self, kind: IdentityKind, key: &str) -> bool {
        self.ids
            .entry(kind.as_str().to_string())
            .or_default()
            .insert(id_prefix(key).to_string())
    }

    /// Identifiers of `kind` this record and `other` hold together.
    pub fn united_count(&self, other: &CustomerRecord, kind: IdentityKind) -> usize {
        match (self.ids.get(kind.as_str()), other.ids.get(kind.as_str())) {
            (Some(a), Some(b)) => a.union(b).count(),
            (Some(a), None) => a.len(),
            (None, Some(b)) => b.len(),
            (None, None) => 0,
        }
    }

    /// Merges absorbed on `day`.
    pub fn merges_on(&self, day: i64) -> usize {
        self.merges.values().filter(|d| **d == day).count()
    }

    /// Takes in `merged` (whose id is `merged_id`), merged on `day`: its identifiers, its
    /// recent merges and itself.
    pub fn absorb(&mut self, merged_id: &str, merged: &CustomerRecord, day: i64) {
        self.unite_ids(merged);
        for (id, merged_day) in &merged.merges {
            self.merges.entry(id.clone()).or_insert(*merged_day);
        }
        self.merges.insert(merged_id.to_string(), day);
        self.prune_merges();
    }

    /// This record united with what another writer stored: identifiers and merges united,
    /// `merged_into` kept when only one side has it. `Err` (the stored target) when both
    /// name a different customer.
    pub fn unite(&mut self, stored: &CustomerRecord) -> Result<(), String> {
        match (&self.merged_into, &stored.merged_into) {
            (Some(ours), Some(theirs)) if ours != theirs => return Err(theirs.clone()),
            (None, Some(theirs)) => {
                self.merged_into = Some(theirs.clone());
                self.merge_cause = stored.merge_cause.clone();
                self.merge_seq = stored.merge_seq;
            }
            _ => {}
        }
        self.unite_ids(stored);
        for (id, day) in &stored.merges {
            self.merges.entry(id.clone()).or_insert(*day);
        }
        self.prune_merges();
        Ok(())
    }

    fn unite_ids(&mut self, other: &CustomerRecord) {
        for (kind, ids) in &other.ids {
            self.ids
                .entry(kind.clone())
                .or_default()
                .extend(ids.iter().cloned());
        }
    }

    fn prune_merges(&mut self) {
        if let Some(latest) = self.merges.values().max().copied() {
            self.merges
                .retain(|_, day| *day >= latest - MERGE_DAYS_KEPT);
        }
    }

    /// The record as stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| unreachable!("a record always serialises"))
    }

    /// A stored record; `None` when the bytes are not one.
    pub fn from_json(bytes: &[u8]) -> Option<CustomerRecord> {
        serde_json::from_slice(bytes).ok()
    }
}

impl IdentityDirectory {
    /// The record of `customer_id` and its revision: the cache, else the bucket (then
    /// cached). `None`: no record stored (a customer from before records, or none yet).
    pub(super) async fn record(
        &self,
        customer_id: &str,
    ) -> Result<Option<(CustomerRecord, u64)>, DirectoryError> {
        if let Some(cached) = self.lock_records().get(customer_id) {
            return Ok(Some(cached));
        }
        let found = self.read_record(customer_id).await?;
        if let Some(found) = &found {
            self.lock_records().set(customer_id, found.clone());
        }
        Ok(found)
    }

    /// Reads a record from the bucket, retrying transient failures.
    async fn read_record(
        &self,
        customer_id: &str,
    ) -> Result<Option<(CustomerRecord, u64)>, DirectoryError> {
        let key = record_key(customer_id);
        let mut backoff = kv_backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.kv.entry(key.as_str()).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    // A value that is not a record (written by hand?) is replaced by the next
                    // write; meanwhile the customer counts as holding nothing.
                    let record = CustomerRecord::from_json(&entry.value).unwrap_or_else(|| {
                        tracing::error!(
                            bucket = subjects::KV_IDENTITY,
                            %customer_id,
                            "identity directory: the customer record is not JSON of a record; it is read as empty and replaced by the next write"
                        );
                        CustomerRecord::default()
                    });
                    return Ok(Some((record, entry.revision)));
                }
                Ok(_) => return Ok(None),
                Err(error) => {
                    self.retry_or_fail(
                        attempt,
                        &mut backoff,
                        "read a record of",
                        IdentityKind::CustomerId,
                        error.to_string(),
                    )
                    .await?
                }
            }
        }
    }

    /// Stores `record`, planned over the stored revision `revision` (`None`: none stored),
    /// by compare-and-set. When another writer stored a record meanwhile, the two are
    /// united and written again ([`CustomerRecord::unite`]); a different `merged_into` is
    /// [`DirectoryError::Contended`]. `may_create` is asked before every attempt.
    pub(super) async fn write_record(
        &self,
        customer_id: &str,
        mut record: CustomerRecord,
        mut revision: Option<u64>,
        may_create: MayCreate<'_>,
    ) -> Result<(), DirectoryError> {
        let key = record_key(customer_id);
        let mut backoff = kv_backoff();
        let mut race_backoff = Backoff::new(
            std::time::Duration::from_millis(1),
            2,
            std::time::Duration::from_millis(50),
        );
        let mut attempt = 0;
        let mut lost = 0;
        loop {
            attempt += 1;
            if !may_create() {
                return Err(DirectoryError::Fenced);
            }
            let value = bytes::Bytes::from(record.to_json());
            let written = match revision {
                None => self.kv.create(&key, value).await.map_err(|error| {
                    let lost = error.kind() == kv::CreateErrorKind::AlreadyExists;
                    (lost, error.to_string())
                }),
                Some(revision) => self
                    .kv
                    .update(&key, value, revision)
                    .await
                    .map_err(|error| {
                        let lost = error.kind() == kv::UpdateErrorKind::WrongLastRevision;
                        (lost, error.to_string())
                    }),
            };
            match written {
                Ok(stored_revision) => {
                    self.counters.record_writes.fetch_add(1, Ordering::Relaxed);
                    self.lock_records()
                        .set(customer_id, (record, stored_revision));
                    return Ok(());
                }
                Err((true, detail)) => {
                    // Written meanwhile: unite with what is stored, and write again unless
                    // the stored record already holds everything.
                    self.lock_records().remove(customer_id);
                    lost += 1;
                    if lost >= RECORD_RACES_MAX {
                        return Err(DirectoryError::Unavailable {
                            bucket: subjects::KV_IDENTITY,
                            operation: "write a record of",
                            kind: IdentityKind::CustomerId,
                            attempts: attempt,
                            detail,
                        });
                    }
                    match self.read_record(customer_id).await? {
                        Some((stored, stored_revision)) => {
                            record
                                .unite(&stored)
                                .map_err(|stored| DirectoryError::Contended {
                                    bucket: subjects::KV_IDENTITY,
                                    customer_id: customer_id.to_string(),
                                    stored,
                                })?;
                            if record == stored {
                                self.lock_records()
                                    .set(customer_id, (stored, stored_revision));
                                return Ok(());
                            }
                            revision = Some(stored_revision);
                        }
                        None => revision = None,
                    }
                    tokio::time::sleep(race_backoff.next_delay()).await;
                }
                Err((false, detail)) => {
                    self.retry_or_fail(
                        attempt,
                        &mut backoff,
                        "write a record of",
                        IdentityKind::CustomerId,
                        detail,
                    )
                    .await?
                }
            }
        }
    }
}

/// The part of an identifier key a record keeps.
pub fn id_prefix(key: &str) -> &str {
    &key[..ID_PREFIX_HEX_CHARS.min(key.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef0123";
    const K2: &str = "fedcba9876543210ffff";

    #[test]
    fn identifiers_are_counted_once_per_kind() {
        let mut record = CustomerRecord::default();
        assert!(record.add(IdentityKind::Email, K1));
        assert!(!record.add(IdentityKind::Email, K1));
        assert!(record.add(IdentityKind::Phone, K1));
        assert_eq!(record.count(IdentityKind::Email), 1);
        assert!(record.holds(IdentityKind::Email, K1));
        assert!(!record.holds(IdentityKind::Email, K2));
        let mut other = CustomerRecord::default();
        other.add(IdentityKind::Email, K2);
        other.add(IdentityKind::Email, K1);
        assert_eq!(record.united_count(&other, IdentityKind::Email), 2);
        assert_eq!(record.united_count(&other, IdentityKind::DeviceId), 0);
    }

    #[test]
    fn a_merge_carries_the_merged_customers_own_merges_and_old_days_are_dropped() {
        let mut survivor = CustomerRecord::default();
        survivor.merges.insert("c-old".into(), 100);
        let mut merged = CustomerRecord::default();
        merged.add(IdentityKind::LoyaltyCard, K1);
        merged.merges.insert("c-x".into(), 200);
        survivor.absorb("c-b", &merged, 200);
        assert_eq!(survivor.merges_on(200), 2);
        assert!(!survivor.merges.contains_key("c-old"), "older than 7 days");
        assert_eq!(survivor.count(IdentityKind::LoyaltyCard), 1);
    }

    #[test]
    fn racing_writers_unite_and_only_two_different_targets_conflict() {
        let mut ours = CustomerRecord::default();
        ours.add(IdentityKind::Email, K1);
        let mut stored = CustomerRecord {
            merged_into: Some("c-a".into()),
            merge_cause: Some("e-1".into()),
            ..CustomerRecord::default()
        };
        stored.add(IdentityKind::Phone, K2);
        ours.unite(&stored).unwrap();
        assert_eq!(ours.merged_into.as_deref(), Some("c-a"));
        assert_eq!(
            ours.count(IdentityKind::Email) + ours.count(IdentityKind::Phone),
            2
        );
        let mut other = CustomerRecord {
            merged_into: Some("c-z".into()),
            ..CustomerRecord::default()
        };
        assert_eq!(other.unite(&stored), Err("c-a".to_string()));
    }

    #[test]
    fn a_record_round_trips_as_json_and_junk_is_not_one() {
        let mut record = CustomerRecord {
            merged_into: Some("c-a".into()),
            merge_cause: Some("e-1".into()),
            ..CustomerRecord::default()
        };
        record.add(IdentityKind::Email, K1);
        record.merges.insert("c-b".into(), 20_000);
        assert_eq!(CustomerRecord::from_json(&record.to_json()), Some(record));
        assert_eq!(CustomerRecord::from_json(b"c0123"), None);
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(86_400_000), 1);
    }
}
