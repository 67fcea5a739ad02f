//! The lease protocol (`crm_node::cluster::lease`) against a real nats-server: a lease is
//! taken once, renewed by its holder, lost when another node writes it, and a renewal that
//! NATS applied without confirming it (its reply lost in a leader election) does not cost
//! the holder its lease.

use crm_node::cluster::lease::{Lease, Leases, Renewal};
use crm_node::cluster::observer::BucketView;
use crm_node::jetstream::ensure_kv;
use crm_node::shutdown;
use crm_testkit::NatsServer;
use std::time::Duration;

const KEY: &str = "shard-0";

async fn leases(server: &NatsServer, node_id: &str) -> (Leases, shutdown::ShutdownTrigger) {
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let kv = ensure_kv(&js, "test_leases", 1).await.expect("bucket");
    let (stop, stopped) = shutdown::channel();
    let view = BucketView::start(kv.clone(), stopped);
    assert!(view.wait_ready(Duration::from_secs(5)).await);
    let leases = Leases {
        kv,
        view,
        node_id: node_id.to_string(),
        timeout: Duration::from_secs(5),
        margin: Duration::from_millis(1500),
    };
    (leases, stop)
}

fn value(owner: &str, epoch: u64) -> bytes::Bytes {
    serde_json::to_vec(&Lease {
        owner: owner.to_string(),
        epoch,
    })
    .expect("JSON")
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_landed_unconfirmed_keeps_the_lease_and_another_writer_takes_it() {
    let server = NatsServer::start();
    let (mine, _stop_mine) = leases(&server, "node-1").await;
    let (theirs, _stop_theirs) = leases(&server, "node-2").await;

    let mut held = mine.acquire(KEY).await.expect("a free lease is taken");
    assert_eq!(held.epoch, 1);
    assert!(held.fence.valid());
    assert!(matches!(mine.renew(&mut held).await, Renewal::Renewed));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        theirs.acquire(KEY).await.is_none(),
        "held and fresh: not takeable"
    );

    // A renewal NATS stored but whose reply never came: the key moved on with this
    // node's own value. The next renewal finds its revision stale, sees its own lease
    // there and renews from it.
    let landed = mine
        .kv
        .update(KEY, value("node-1", 1), held.revision)
        .await
        .expect("direct write");
    assert!(matches!(mine.renew(&mut held).await, Renewal::Renewed));
    assert!(held.revision > landed, "renewed after the landed write");
    assert!(held.fence.valid());

    // Another node's write (here: a take-over at the next epoch) ends it.
    mine.kv
        .update(KEY, value("node-2", 2), held.revision)
        .await
        .expect("take-over");
    assert!(matches!(mine.renew(&mut held).await, Renewal::Lost));
    assert!(
        !held.fence.valid(),
        "a lost lease's fence is revoked at once"
    );

    // So does a write of this node's name at another epoch (its own earlier run's lease).
    let mut again = {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let current = mine.kv.entry(KEY).await.expect("read").expect("present");
        mine.kv
            .update(KEY, value("", 2), current.revision)
            .await
            .expect("release");
        tokio::time::sleep(Duration::from_millis(200)).await;
        mine.acquire(KEY).await.expect("a released lease is taken")
    };
    assert_eq!(again.epoch, 3);
    mine.kv
        .update(KEY, value("node-1", 7), again.revision)
        .await
        .expect("odd write");
    assert!(matches!(mine.renew(&mut again).await, Renewal::Lost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_a_landed_renewal_still_frees_the_lease() {
    let server = NatsServer::start();
    let (mine, _stop) = leases(&server, "node-1").await;
    let held = mine.acquire(KEY).await.expect("a free lease is taken");
    mine.kv
        .update(KEY, value("node-1", held.epoch), held.revision)
        .await
        .expect("a renewal that landed unconfirmed");
    mine.release(&held).await.expect("released");
    assert!(!held.fence.valid());
    let entry = mine.kv.entry(KEY).await.expect("read").expect("present");
    let stored: Lease = serde_json::from_slice(&entry.value).expect("lease JSON");
    assert_eq!(
        stored,
        Lease {
            owner: String::new(),
            epoch: held.epoch
        }
    );
}
