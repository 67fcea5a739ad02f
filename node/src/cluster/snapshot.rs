//! Shard snapshots in JetStream: a shard's sled keys as pieces on
//! `crm.snapshot.<n>.<id>` (stream `CRM_SNAPSHOTS`) plus a manifest in KV `crm_snapshots`
//! (key `shard-<n>`) naming the snapshot, the shard-log sequence it covers and a checksum.
//!
//! The owner writes one when it hands a shard off, and periodically (every
//! `snapshot_interval_s`, or after `snapshot_every_records` records). The pieces are all
//! acked before the manifest points at them; the previous snapshot's pieces are purged
//! after. The next owner restores the manifest's snapshot only when it covers more of the
//! log than the node's own sled copy (a node that rejoins with its sled intact replays just
//! what it missed), then replays the log from the snapshot's sequence.

use crate::fnv::Fnv1a64;
use crate::subjects;
use async_nats::jetstream::{self, kv, Context};
use crm_actors::codec;
use crm_actors::store::{ShardEntries, ShardMeta, Store};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;
use tracing::{info, warn};

/// What a snapshot manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub shard: u32,
    /// Subject token of the pieces: `crm.snapshot.<shard>.<id>`.
    pub id: String,
    /// The shard-log sequence the snapshot covers (everything up to it is applied).
    pub seq: u64,
    /// Lease epoch of the writer.
    pub epoch: u64,
    pub pieces: u32,
    pub entries: u64,
    pub bytes: u64,
    /// FNV-1a (64 bit, hex) over every piece's bytes, in order.
    pub checksum: String,
    pub node: String,
    pub at_ms: i64,
}

/// One message of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct Piece {
    shard: u32,
    index: u32,
    entries: ShardEntries,
}

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot of shard {shard}: state store: {source}")]
    Store {
        shard: u32,
        #[source]
        source: crm_actors::store::StoreError,
    },
    #[error("snapshot of shard {shard}: NATS: {detail}")]
    Nats { shard: u32, detail: String },
    #[error("snapshot {id} of shard {shard} is incomplete or damaged: {detail}; the shard's local copy is cleared, and the shard is rebuilt from its whole log when the log still starts at its first record")]
    Damaged {
        shard: u32,
        id: String,
        detail: String,
    },
}

/// Most snapshot pieces awaiting their publish acks at once.
const PIECES_IN_FLIGHT_MAX: usize = 16;
/// Longest wait for one piece while restoring.
const PIECE_WAIT: Duration = Duration::from_secs(10);

/// Writes and restores snapshots.
#[derive(Clone)]
pub struct Snapshots {
    pub jetstream: Context,
    pub kv: kv::Store,
    /// Most bytes of keys and values in one piece (below the server's max payload).
    pub piece_bytes: usize,
}

impl Snapshots {
    /// The manifest of `shard`'s last snapshot and its KV revision.
    pub async fn manifest(&self, shard: u32) -> Result<Option<(Manifest, u64)>, SnapshotError> {
        let nats = |e: kv::EntryError| SnapshotError::Nats {
            shard,
            detail: e.to_string(),
        };
        let entry = self
            .kv
            .entry(subjects::shard_key(shard))
            .await
            .map_err(nats)?;
        Ok(entry.and_then(|entry| {
            serde_json::from_slice::<Manifest>(&entry.value)
                .ok()
                .map(|manifest| (manifest, entry.revision))
        }))
    }

    /// Snapshots `shard` as `store` holds it now (its worker must not apply meanwhile).
    pub async fn write(
        &self,
        store: &Store,
        shard: u32,
        epoch: u64,
        node_id: &str,
    ) -> Result<Manifest, SnapshotError> {
        let started = std::time::Instant::now();
        let nats = |detail: String| SnapshotError::Nats { shard, detail };
        let meta = store
            .shard_meta(shard)
            .map_err(|source| SnapshotError::Store { shard, source })?;
        let id = format!("{epoch}-{}-{}", meta.applied_seq, super::wall_ms());
        let manifest = match self
            .write_pieces(store, shard, epoch, node_id, meta, &id)
            .await
        {
            Ok(manifest) => manifest,
            Err(error) => {
                // Pieces that no manifest names only take space, and a full CRM_SNAPSHOTS
                // refuses the next snapshot.
                self.purge(shard, &id).await;
                return Err(error);
            }
        };
        let (entries, bytes) = (manifest.entries, manifest.bytes);
        let previous = match self.manifest(shard).await {
            Ok(previous) => previous,
            Err(error) => {
                self.purge(shard, &manifest.id).await;
                return Err(error);
            }
        };
        if let Some((newer, _)) = previous.as_ref().filter(|(p, _)| p.seq > manifest.seq) {
            // Only a stale owner could be behind the stored snapshot: keep the newer one.
            warn!(
                shard,
                ours = manifest.seq,
                stored = newer.seq,
                "a newer snapshot exists; ours is dropped"
            );
            self.purge(shard, &manifest.id).await;
            return Ok(newer.clone());
        }
        let value = serde_json::to_vec(&manifest).unwrap_or_default();
        let revision = previous.as_ref().map(|(_, r)| *r).unwrap_or(0);
        if let Err(error) = self
            .kv
            .update(subjects::shard_key(shard), value.into(), revision)
            .await
        {
            self.purge(shard, &manifest.id).await;
            return Err(nats(format!("manifest not written: {error}")));
        }
        if let Some((old, _)) = previous {
            if old.id != manifest.id {
                self.purge(shard, &old.id).await;
            }
        }
        info!(
            shard,
            seq = manifest.seq,
            entries,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(manifest)
    }

    /// Publishes the pieces of snapshot `id` of `shard` (as of `meta`) and returns the
    /// manifest that would name them (not recorded yet).
    async fn write_pieces(
        &self,
        store: &Store,
        shard: u32,
        epoch: u64,
        node_id: &str,
        meta: ShardMeta,
        id: &str,
    ) -> Result<Manifest, SnapshotError> {
        let subject = subjects::snapshot(shard, id);
        let nats = |detail: String| SnapshotError::Nats { shard, detail };
        let store_error = |source| SnapshotError::Store { shard, source };
        let mut checksum = Fnv1a64::new();
        let (mut pieces, mut entries, mut bytes) = (0u32, 0u64, 0u64);
        let mut acks = VecDeque::new();
        for piece in store.export_shard(shard, self.piece_bytes) {
            let piece = piece.map_err(store_error)?;
            entries += piece.len() as u64;
            let encoded = codec::encode(&Piece {
                shard,
                index: pieces,
                entries: piece,
            });
            checksum.write(&encoded);
            bytes += encoded.len() as u64;
            pieces += 1;
            let ack = self
                .jetstream
                .publish(subject.clone(), encoded.into())
                .await
                .map_err(|e| nats(e.to_string()))?;
            acks.push_back(ack);
            if acks.len() >= PIECES_IN_FLIGHT_MAX {
                let ack = acks.pop_front().expect("not empty");
                ack.await.map_err(|e| nats(e.to_string()))?;
            }
        }
        for ack in acks {
            ack.await.map_err(|e| nats(e.to_string()))?;
        }
        Ok(Manifest {
            shard,
            id: id.to_string(),
            seq: meta.applied_seq,
            epoch,
            pieces,
            entries,
            bytes,
            checksum: format!("{:016x}", checksum.finish()),
            node: node_id.to_string(),
            at_ms: super::wall_ms(),
        })
    }

    async fn purge(&self, shard: u32, id: &str) {
        let purged = async {
            let stream = self
                .jetstream
                .get_stream(subjects::SNAPSHOTS_STREAM)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .purge()
                .filter(subjects::snapshot(shard, id))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(error) = purged {
            warn!(shard, id, %error, "superseded snapshot not purged (it only takes space)");
        }
    }

    /// Restores `shard`'s last snapshot into `store` when it covers more of the log than
    /// the store's copy; returns the manifest restored (None: nothing to do).
    pub async fn restore_if_newer(
        &self,
        store: &Store,
        shard: u32,
    ) -> Result<Option<Manifest>, SnapshotError> {
        let store_error = |source| SnapshotError::Store { shard, source };
        let Some((manifest, _)) = self.manifest(shard).await? else {
            return Ok(None);
        };
        let local = store.shard_meta(shard).map_err(store_error)?.applied_seq;
        if manifest.seq <= local {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let stream = self
            .jetstream
            .get_stream(subjects::SNAPSHOTS_STREAM)
            .await
            .map_err(|e| SnapshotError::Nats {
                shard,
                detail: e.to_string(),
            })?;
        let consumer = crate::jetstream::create_with_retries(3, || {
            stream.create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subjects::snapshot(shard, &manifest.id),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
        })
        .await
        .map_err(|detail| SnapshotError::Nats { shard, detail })?;
        let mut messages = consumer.messages().await.map_err(|e| SnapshotError::Nats {
            shard,
            detail: e.to_string(),
        })?;
        store.clear_shard(shard).map_err(store_error)?;
        match self
            .import_pieces(store, shard, &manifest, &mut messages)
            .await
        {
            Ok(()) => {}
            Err(error @ SnapshotError::Damaged { .. }) => {
                // No half-imported copy is left behind, not even after a crash: its
                // customers would take the replayed records for repeats.
                store.clear_shard(shard).map_err(store_error)?;
                store.flush().await.map_err(store_error)?;
                return Err(error);
            }
            Err(error) => return Err(error),
        }
        store.flush().await.map_err(store_error)?;
        info!(
            shard,
            seq = manifest.seq,
            entries = manifest.entries,
            ms = started.elapsed().as_millis() as u64,
            "snapshot restored"
        );
        Ok(Some(manifest))
    }

    /// Imports every piece of `manifest` from `messages` into `store` and checks them
    /// (order, shard, checksum, restored sequence).
    async fn import_pieces(
        &self,
        store: &Store,
        shard: u32,
        manifest: &Manifest,
        messages: &mut jetstream::consumer::pull::Ordered,
    ) -> Result<(), SnapshotError> {
        let store_error = |source| SnapshotError::Store { shard, source };
        let damaged = |detail: String| SnapshotError::Damaged {
            shard,
            id: manifest.id.clone(),
            detail,
        };
        let mut checksum = Fnv1a64::new();
        for index in 0..manifest.pieces {
            let message = match tokio::time::timeout(PIECE_WAIT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(damaged(format!("piece {index}: {error}"))),
                Ok(None) | Err(_) => {
                    return Err(damaged(format!(
                        "piece {index} of {} missing",
                        manifest.pieces
                    )))
                }
            };
            checksum.write(&message.payload);
            // Checked before the last piece, which holds the shard meta, is imported: a
            // crash can then never leave the meta over pieces that failed the check.
            if index + 1 == manifest.pieces
                && format!("{:016x}", checksum.finish()) != manifest.checksum
            {
                return Err(damaged("checksum mismatch".to_string()));
            }
            let piece: Piece = codec::decode(&message.payload)
                .map_err(|e| damaged(format!("piece {index}: {e}")))?;
            if piece.shard != shard || piece.index != index {
                return Err(damaged(format!(
                    "piece {index} is piece {} of shard {}",
                    piece.index, piece.shard
                )));
            }
            store
                .import_piece(shard, &piece.entries)
                .map_err(store_error)?;
        }
        // Checked in the loop for every snapshot with pieces; here for one without.
        if format!("{:016x}", checksum.finish()) != manifest.checksum {
            return Err(damaged("checksum mismatch".to_string()));
        }
        let restored = store.shard_meta(shard).map_err(store_error)?.applied_seq;
        if restored != manifest.seq {
            return Err(damaged(format!(
                "it restores sequence {restored}, its manifest says {}",
                manifest.seq
            )));
        }
        Ok(())
    }
}
