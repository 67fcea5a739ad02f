//! Leases in the `crm_leases` bucket: a shard's, the coordinator's and the router's.
//!
//! A lease is `{owner, epoch}` under one key; every change is a compare-and-set on the
//! key's revision, so of two nodes writing from the same revision one fails. Taking a lease
//! (free, expired, or left by this node's previous process) bumps the epoch; the owner
//! renews it every heartbeat; releasing writes an empty owner.
//!
//! Why two holders never act at once: the holder's [`Fence`] is valid until
//! `sent + lease_timeout - lease_margin`, where `sent` is when it *sent* its last successful
//! renewal; another node takes the lease only after observing the same revision unchanged
//! for `lease_timeout` (see [`super::observer`]), and it first saw that revision after it
//! was written, so after `sent`. The holder checks its fence before every batch and stops
//! once it has expired, `lease_margin` before anyone else may start.

use super::observer::{BucketView, Observed};
use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The value of a lease key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Lease {
    /// Node id of the holder; empty when released.
    pub owner: String,
    /// Bumped by every take-over; recorded with every batch the holder applies.
    pub epoch: u64,
}

impl Lease {
    /// Parses a stored lease (an unreadable one counts as free at epoch 0).
    pub fn parse(observed: &Observed) -> Lease {
        serde_json::from_slice(&observed.value).unwrap_or_default()
    }
}

/// Until when the holder of a lease may act on it; cheap to clone and check.
#[derive(Debug, Clone)]
pub struct Fence {
    until_ms: Arc<AtomicU64>,
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn since_base_ms(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_millis() as u64
}

impl Fence {
    fn until(until: Instant) -> Fence {
        Fence {
            until_ms: Arc::new(AtomicU64::new(since_base_ms(until))),
        }
    }

    /// A fence that never expires (a process that is the only node by construction, tests).
    pub fn unbounded() -> Fence {
        Fence {
            until_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Whether the holder may still act.
    pub fn valid(&self) -> bool {
        since_base_ms(Instant::now()) < self.until_ms.load(Ordering::SeqCst)
    }

    fn extend(&self, until: Instant) {
        self.until_ms
            .fetch_max(since_base_ms(until), Ordering::SeqCst);
    }

    /// Ends the holder's right to act at once.
    pub fn revoke(&self) {
        self.until_ms.store(0, Ordering::SeqCst);
    }
}

/// A lease this node holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub key: String,
    pub epoch: u64,
    /// The key's revision after this node's last write.
    pub revision: u64,
    pub fence: Fence,
}

/// What a renewal found.
#[derive(Debug)]
pub enum Renewal {
    Renewed,
    /// Another node wrote the key: the lease is gone (the fence is revoked).
    Lost,
    /// NATS did not confirm; the fence runs out unless a later renewal succeeds.
    Unconfirmed(String),
}

/// The lease protocol for one node over one bucket.
#[derive(Clone)]
pub struct Leases {
    pub kv: kv::Store,
    pub view: BucketView,
    pub node_id: String,
    pub timeout: Duration,
    pub margin: Duration,
}

impl Leases {
    /// The revision and epoch to take `key` from, when this node may take it now: absent,
    /// released, held by this node's earlier run, or unchanged for the lease timeout.
    pub fn takeable(&self, key: &str) -> Option<(u64, u64)> {
        match self.view.get(key) {
            None => Some((0, 0)),
            Some(observed) => {
                let lease = Lease::parse(&observed);
                let free = lease.owner.is_empty()
                    || lease.owner == self.node_id
                    || observed.since.elapsed() >= self.timeout;
                free.then_some((observed.revision, lease.epoch))
            }
        }
    }

    /// The current holder of `key` as observed (None: nobody).
    pub fn holder(&self, key: &str) -> Option<Lease> {
        self.view
            .get(key)
            .map(|observed| Lease::parse(&observed))
            .filter(|lease| !lease.owner.is_empty())
    }

    /// Takes `key` if [`Leases::takeable`]; `None` when it is not (or another node won).
    pub async fn acquire(&self, key: &str) -> Option<Held> {
        let (revision, epoch) = self.takeable(key)?;
        let lease = Lease {
            owner: self.node_id.clone(),
            epoch: epoch + 1,
        };
        let sent = Instant::now();
        let revision = self.write(key, &lease, revision).await.ok()?;
        Some(Held {
            key: key.to_string(),
            epoch: lease.epoch,
            revision,
            fence: Fence::until(sent + self.valid_for()),
        })
    }

    /// Renews a held lease.
    pub async fn renew(&self, held: &mut Held) -> Renewal {
        let lease = Lease {
            owner: self.node_id.clone(),
            epoch: held.epoch,
        };
        let mut adopted = false;
        loop {
            let sent = Instant::now();
            match self.write(&held.key, &lease, held.revision).await {
                Ok(revision) => {
                    held.revision = revision;
                    held.fence.extend(sent + self.valid_for());
                    return Renewal::Renewed;
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // An earlier renewal that NATS did not confirm may have landed after
                    // all: the key then holds this very lease (only this node writes its
                    // name with this epoch). Renew from that revision, once; the fence
                    // still runs from the last confirmed renewal.
                    if !adopted {
                        match self.own_revision(&held.key, &lease).await {
                            Ok(Some(revision)) => {
                                held.revision = revision;
                                adopted = true;
                                continue;
                            }
                            Ok(None) => {}
                            // Unknown yet: the fence runs out unless a later renewal works.
                            Err(error) => return Renewal::Unconfirmed(error),
                        }
                    }
                    held.fence.revoke();
                    return Renewal::Lost;
                }
                Err(error) => return Renewal::Unconfirmed(error.to_string()),
            }
        }
    }

    /// The key's current revision when its value is `lease` (this node's own write);
    /// `None` when it holds something else; an error when it cannot be read.
    async fn own_revision(&self, key: &str, lease: &Lease) -> Result<Option<u64>, String> {
        let Some(entry) = self.kv.entry(key).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let stored: Option<Lease> = serde_json::from_slice(&entry.value).ok();
        Ok(
            (entry.operation == kv::Operation::Put && stored.as_ref() == Some(lease))
                .then_some(entry.revision),
        )
    }

    /// Gives a held lease up (owner emptied, epoch kept). The fence is revoked first.
    /// A renewal that landed unconfirmed is recognised as in [`Leases::renew`].
    pub async fn release(&self, held: &Held) -> Result<(), String> {
        held.fence.revoke();
        let lease = Lease {
            owner: String::new(),
            epoch: held.epoch,
        };
        match self.write(&held.key, &lease, held.revision).await {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let mine = Lease {
                    owner: self.node_id.clone(),
                    epoch: held.epoch,
                };
                match self.own_revision(&held.key, &mine).await? {
                    Some(revision) => self
                        .write(&held.key, &lease, revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => Err(format!("{}: no longer this node's lease", held.key)),
                }
            }
            Err(error) => Err(error.to_string()),
        }
    }

    fn valid_for(&self) -> Duration {
        self.timeout.saturating_sub(self.margin)
    }

    async fn write(&self, key: &str, lease: &Lease, revision: u64) -> Result<u64, kv::UpdateError> {
        let value: bytes::Bytes = serde_json::to_vec(lease).unwrap_or_default().into();
        let revision = self.kv.update(key, value.clone(), revision).await?;
        self.view.note_write(key, value, revision);
        Ok(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_valid_until_its_deadline_and_revoke_ends_it() {
        let fence = Fence::until(Instant::now() + Duration::from_secs(60));
        assert!(fence.valid());
        let clone = fence.clone();
        clone.revoke();
        assert!(!fence.valid(), "clones share the deadline");
        let past = Fence::until(Instant::now());
        assert!(!past.valid());
        past.extend(Instant::now() + Duration::from_secs(60));
        assert!(past.valid());
        assert!(Fence::unbounded().valid());
    }
}
