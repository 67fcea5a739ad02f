//! Shard snapshots (`crm_node::cluster::snapshot`) against a real nats-server: a snapshot
//! restores a shard exactly over an older local copy, and a damaged one (its pieces gone)
//! leaves no half-imported copy behind.

use crm_actors::codec;
use crm_actors::state::CustomerState;
use crm_actors::store::{CommitBatch, CustomerWrite, EncodedState, ShardMeta, Store};
use crm_node::cluster::snapshot::{SnapshotError, Snapshots};
use crm_node::subjects;
use crm_testkit::cluster_env::test_snapshots;
use crm_testkit::NatsServer;

const SHARD: u32 = 3;

/// Commits `customers` to `SHARD` of `store` as applied up to `applied_seq`.
fn commit(store: &Store, applied_seq: u64, customers: &[&str]) {
    let writes = customers
        .iter()
        .map(|id| CustomerWrite {
            customer_id: id.to_string(),
            state: EncodedState {
                bytes: codec::encode(&CustomerState::new(id)),
                next_due_ms: Some(1_000 + applied_seq as i64),
            },
        })
        .collect();
    let batch = CommitBatch {
        customers: writes,
        meta: ShardMeta {
            applied_seq,
            clock_ms: 1_000,
            owner_epoch: 1,
        },
        created: customers.iter().map(|id| id.to_string()).collect(),
        ..CommitBatch::default()
    };
    store.commit(SHARD, &batch).expect("commit");
}

fn entries(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .export_shard(SHARD, 1 << 20)
        .flat_map(|piece| piece.expect("readable"))
        .collect()
}

/// Restores into `taker`, expects the snapshot refused as damaged with nothing of the shard
/// left behind; returns why it was refused.
async fn refused_as_damaged(snapshots: &Snapshots, taker: &Store) -> String {
    let damaged = snapshots.restore_if_newer(taker, SHARD).await;
    let Err(SnapshotError::Damaged { detail, .. }) = damaged else {
        panic!("{damaged:?}");
    };
    assert!(entries(taker).is_empty(), "{:?}", entries(taker).len());
    detail
}

#[tokio::test]
async fn a_damaged_snapshot_leaves_no_half_imported_copy_and_a_good_one_restores_exactly() {
    let server = NatsServer::start();
    let (snapshots, js) = test_snapshots(&server).await;
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = Store::open(owner_dir.path(), 8 << 20).expect("store");
    let customers: Vec<String> = (0..20).map(|i| format!("customer-{i:02}")).collect();
    let names: Vec<&str> = customers.iter().map(String::as_str).collect();
    commit(&owner, 40, &names);

    // Another node's older copy of the shard.
    let taker_dir = tempfile::tempdir().expect("tempdir");
    let taker = Store::open(taker_dir.path(), 8 << 20).expect("store");
    commit(&taker, 7, &["old-customer"]);

    let manifest = snapshots
        .write(&owner, SHARD, 2, "node-a")
        .await
        .expect("snapshot written");
    assert!(manifest.pieces > 2, "{manifest:?}");

    // The pieces vanish (purged, or lost with the stream): the restore fails and leaves
    // nothing of the shard, neither the old copy nor part of the snapshot.
    let mut stream = js
        .get_stream(subjects::SNAPSHOTS_STREAM)
        .await
        .expect("stream");
    stream
        .purge()
        .filter(subjects::snapshot(SHARD, &manifest.id))
        .await
        .expect("purged");
    refused_as_damaged(&snapshots, &taker).await;
    assert_eq!(taker.shard_meta(SHARD).expect("meta").applied_seq, 0);

    // Pieces that stop half-way: the same.
    let cut = snapshots
        .write(&owner, SHARD, 3, "node-a")
        .await
        .expect("snapshot written");
    assert!(cut.pieces > 2, "{cut:?}");
    let last = stream.info().await.expect("info").state.last_sequence;
    stream
        .delete_message(last)
        .await
        .expect("last piece deleted");
    commit(&taker, 7, &["old-customer"]);
    refused_as_damaged(&snapshots, &taker).await;

    // Whole pieces under a manifest whose checksum does not match: refused before the
    // last piece (the one with the shard meta) is imported.
    let whole = snapshots
        .write(&owner, SHARD, 4, "node-a")
        .await
        .expect("snapshot written");
    let (_, revision) = snapshots
        .manifest(SHARD)
        .await
        .expect("manifest read")
        .expect("manifest");
    let wrong = crm_node::cluster::snapshot::Manifest {
        checksum: "0123456789abcdef".to_string(),
        ..whole
    };
    snapshots
        .kv
        .update(
            subjects::shard_key(SHARD),
            serde_json::to_vec(&wrong).expect("JSON").into(),
            revision,
        )
        .await
        .expect("manifest replaced");
    commit(&taker, 7, &["old-customer"]);
    let detail = refused_as_damaged(&snapshots, &taker).await;
    assert!(detail.contains("checksum"), "{detail}");

    // A whole snapshot restores the owner's shard exactly.
    let manifest = snapshots
        .write(&owner, SHARD, 5, "node-a")
        .await
        .expect("snapshot written");
    let restored = snapshots
        .restore_if_newer(&taker, SHARD)
        .await
        .expect("restored");
    assert_eq!(restored.map(|m| m.id), Some(manifest.id.clone()));
    assert_eq!(entries(&taker), entries(&owner));
    assert_eq!(taker.shard_meta(SHARD).expect("meta").applied_seq, 40);
    // Not again: the local copy now covers the snapshot.
    let again = snapshots.restore_if_newer(&taker, SHARD).await;
    assert!(matches!(again, Ok(None)), "{again:?}");
}

#[tokio::test]
async fn snapshots_written_at_once_leave_only_the_pieces_their_manifest_names() {
    let server = NatsServer::start();
    let (snapshots, js) = test_snapshots(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8 << 20).expect("store");
    let customers: Vec<String> = (0..20).map(|i| format!("customer-{i:02}")).collect();
    let names: Vec<&str> = customers.iter().map(String::as_str).collect();
    commit(&store, 40, &names);

    // Two writers race for the manifest (an owner's periodic snapshot and its hand-off,
    // or a stale owner): the loser's compare-and-set fails, and its pieces must go.
    for round in 0..4u64 {
        let (a, b) = tokio::join!(
            snapshots.write(&store, SHARD, 10 + 2 * round, "node-a"),
            snapshots.write(&store, SHARD, 11 + 2 * round, "node-b"),
        );
        assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    }
    let (manifest, _) = snapshots
        .manifest(SHARD)
        .await
        .expect("manifest read")
        .expect("manifest");
    let mut stream = js
        .get_stream(subjects::SNAPSHOTS_STREAM)
        .await
        .expect("stream");
    let stored = stream.info().await.expect("info").state.messages;
    assert_eq!(
        stored,
        u64::from(manifest.pieces),
        "pieces of snapshots no manifest names were left behind"
    );
}
