//! JetStream set-up against a real nats-server: streams, KV buckets, the recorded shard
//! count and the durable consumers are created once and left alone by every later run.

use crm_node::jetstream::{
    ensure_identity_fingerprint, ensure_kv, ensure_shard_count, ensure_streams, ingest_consumer,
    IngestConsumerSettings, SetupError,
};
use crm_node::shard::log_reader::ShardLogReader;
use crm_node::subjects;
use crm_testkit::NatsServer;
use std::time::Duration;

async fn connect(server: &NatsServer) -> async_nats::jetstream::Context {
    let client = async_nats::connect(server.url())
        .await
        .expect("the test server accepts clients");
    async_nats::jetstream::new(client)
}

/// A connection to `server` whose streams (small caps) and cluster bucket are set up, as
/// a node sets them up before its router starts.
async fn set_up(server: &NatsServer) -> async_nats::jetstream::Context {
    let js = connect(server).await;
    ensure_streams(&js, &crm_testkit::cluster_env::test_stream_settings())
        .await
        .unwrap();
    ensure_kv(&js, subjects::KV_CLUSTER, 1).await.unwrap();
    js
}

#[tokio::test]
async fn streams_are_created_with_the_configured_limits_and_setup_is_idempotent() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    let settings = crm_testkit::cluster_env::test_stream_settings();

    ensure_streams(&js, &settings).await.unwrap();
    ensure_streams(&js, &settings).await.unwrap();

    for (name, subject) in [
        (subjects::INGEST_STREAM, subjects::INGEST_ALL),
        (subjects::SHARDS_STREAM, subjects::SHARDS_ALL),
        (subjects::EVENTS_STREAM, subjects::EVENTS_ALL),
        (subjects::DLQ_STREAM, subjects::DLQ_ALL),
    ] {
        let stream = js.get_stream(name).await.unwrap();
        let config = &stream.cached_info().config;
        assert_eq!(config.subjects, vec![subject.to_string()], "{name}");
        assert_eq!(
            config.storage,
            async_nats::jetstream::stream::StorageType::File
        );
        assert_eq!(config.num_replicas, 1);
    }
    let ingest = js.get_stream(subjects::INGEST_STREAM).await.unwrap();
    assert_eq!(
        ingest.cached_info().config.duplicate_window,
        Duration::from_secs(settings.duplicate_window_s)
    );
    let events = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    assert_eq!(
        events.cached_info().config.max_age,
        Duration::from_secs(3600)
    );
    assert_eq!(
        events.cached_info().config.max_bytes,
        settings.events.max_bytes as i64
    );
}

#[tokio::test]
async fn a_stream_cap_the_server_cannot_reserve_is_named_with_the_fix() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    let mut settings = crm_testkit::cluster_env::test_stream_settings();
    settings.shards.max_bytes = 1 << 50; // 1 PiB: more than any test machine's disk
    let error = ensure_streams(&js, &settings).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(subjects::SHARDS_STREAM) && message.contains("max_bytes"),
        "{message}"
    );
}

/// The router consumer is rewound to its ack floor by deleting and recreating it; the floor
/// is recorded first, so a consumer lost in between (a crash, a failed create) does not
/// send the next router back to the stream's first message.
#[tokio::test]
async fn a_lost_router_consumer_restarts_at_the_recorded_ack_floor_not_at_the_start() {
    use futures::StreamExt;
    let server = NatsServer::start();
    let js = set_up(&server).await;
    for n in 1..=10u32 {
        js.publish(subjects::ingest("web"), n.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let first_delivered = |consumer: async_nats::jetstream::consumer::PullConsumer| async move {
        let mut messages = consumer.fetch().max_messages(1).messages().await.unwrap();
        let message = messages.next().await.expect("a message").unwrap();
        message.info().unwrap().stream_sequence
    };
    let consumer = ingest_consumer(&js, &IngestConsumerSettings::default())
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(6).messages().await.unwrap();
    while let Some(message) = messages.next().await {
        message.unwrap().double_ack().await.unwrap();
    }
    // The rewind records the floor (7) before it recreates the consumer there.
    let rewound = ingest_consumer(&js, &IngestConsumerSettings::default())
        .await
        .unwrap();
    assert_eq!(first_delivered(rewound).await, 7);
    // The consumer is lost between a rewind's delete and its create.
    js.get_stream(subjects::INGEST_STREAM)
        .await
        .unwrap()
        .delete_consumer(subjects::INGEST_DURABLE)
        .await
        .unwrap();
    let recreated = ingest_consumer(&js, &IngestConsumerSettings::default())
        .await
        .unwrap();
    assert_eq!(first_delivered(recreated).await, 7, "not back to message 1");
}

#[tokio::test]
async fn a_changed_limit_is_applied_to_the_existing_stream() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    let mut settings = crm_testkit::cluster_env::test_stream_settings();
    ensure_streams(&js, &settings).await.unwrap();

    settings.events.max_age_s = 600;
    settings.dlq.max_bytes = 0;
    ensure_streams(&js, &settings).await.unwrap();

    let events = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    assert_eq!(
        events.cached_info().config.max_age,
        Duration::from_secs(600)
    );
    let dlq = js.get_stream(subjects::DLQ_STREAM).await.unwrap();
    assert_eq!(dlq.cached_info().config.max_bytes, -1);
}

#[tokio::test]
async fn ingest_deduplicates_a_repeated_message_id() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    ensure_streams(&js, &crm_testkit::cluster_env::test_stream_settings())
        .await
        .unwrap();

    for _ in 0..3 {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload("{}".into())
            .message_id("event-1");
        js.send_publish(subjects::ingest("web"), publish)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut stream = js.get_stream(subjects::INGEST_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn kv_buckets_are_created_on_this_server_and_reopened_unchanged() {
    let server = NatsServer::start();
    let js = connect(&server).await;

    let kv = ensure_kv(&js, subjects::KV_IDENTITY, 1).await.unwrap();
    kv.create("k1", "c1".into()).await.unwrap();
    let again = ensure_kv(&js, subjects::KV_IDENTITY, 1).await.unwrap();
    assert_eq!(again.get("k1").await.unwrap().as_deref(), Some(&b"c1"[..]));
    // create is compare-and-set: a second create of the same key fails.
    let error = again.create("k1", "c2".into()).await.unwrap_err();
    assert_eq!(
        error.kind(),
        async_nats::jetstream::kv::CreateErrorKind::AlreadyExists
    );

    let stream = js
        .get_stream(subjects::kv_stream(subjects::KV_IDENTITY))
        .await
        .unwrap();
    let config = &stream.cached_info().config;
    assert!(config.allow_rollup && config.deny_delete && config.allow_direct);
    assert_eq!(config.max_messages_per_subject, 1);
    assert_eq!(
        config.subjects,
        vec![subjects::kv_subjects(subjects::KV_IDENTITY)]
    );
}

#[tokio::test]
async fn a_stream_that_is_not_a_kv_bucket_is_refused_by_name() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_impostor".to_string(),
        subjects: vec!["impostor.>".to_string()],
        ..Default::default()
    })
    .await
    .unwrap();

    let error = ensure_kv(&js, "impostor", 1).await.unwrap_err();
    assert!(matches!(error, SetupError::NotKv { .. }), "{error}");
    assert!(error.to_string().contains("KV_impostor"), "{error}");
}

#[tokio::test]
async fn the_first_node_records_the_shard_count_and_a_different_count_is_refused() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    let kv = ensure_kv(&js, subjects::KV_CLUSTER, 1).await.unwrap();

    ensure_shard_count(&kv, 16).await.unwrap();
    ensure_shard_count(&kv, 16).await.unwrap();
    let error = ensure_shard_count(&kv, 32).await.unwrap_err();

    assert!(
        matches!(
            error,
            SetupError::ShardCountMismatch {
                configured: 32,
                recorded: 16,
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("32") && message.contains("16"),
        "{message}"
    );
    assert!(message.contains("cluster.shards = 16"), "{message}");
    let zero = ensure_shard_count(&kv, 0).await.unwrap_err();
    assert!(
        matches!(zero, SetupError::InvalidShardCount { .. }),
        "{zero}"
    );
}

/// A node with another identity secret would hash every identifier to a new key and its
/// router would create a second customer for every known person: it is refused at start.
#[tokio::test]
async fn a_node_with_another_identity_secret_is_refused() {
    let server = NatsServer::start();
    let js = connect(&server).await;
    let cluster = ensure_kv(&js, subjects::KV_CLUSTER, 1).await.unwrap();
    let identities = ensure_kv(&js, subjects::KV_IDENTITY, 1).await.unwrap();
    let fingerprint = |secret: &[u8]| {
        crm_node::ingest::identity_directory::IdentityDirectory::new(identities.clone(), secret, 0)
            .secret_fingerprint()
    };
    let first = fingerprint(b"the-cluster-secret-0123456789");
    assert_eq!(first, fingerprint(b"the-cluster-secret-0123456789"));
    ensure_identity_fingerprint(&cluster, &first).await.unwrap();
    ensure_identity_fingerprint(&cluster, &first).await.unwrap();
    let other = fingerprint(b"the-cluster-secret-0123456789\n");
    let error = ensure_identity_fingerprint(&cluster, &other)
        .await
        .unwrap_err();
    assert!(
        matches!(error, SetupError::IdentitySecretMismatch { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("identity_secret"), "{message}");
    assert!(
        !message.contains("the-cluster-secret"),
        "the secret leaks: {message}"
    );
}

#[tokio::test]
async fn shard_log_readers_and_the_ingest_consumer_deliver_only_their_subjects() {
    let server = NatsServer::start();
    let js = set_up(&server).await;
    let ingest = ingest_consumer(&js, &IngestConsumerSettings::default())
        .await
        .unwrap();
    ingest_consumer(&js, &IngestConsumerSettings::default())
        .await
        .unwrap();

    for shard in 0..4u32 {
        js.publish(subjects::shard(shard), shard.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(subjects::ingest("web"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // A second record on shard 2, so a reader started after the first sees only the second.
    js.publish(subjects::shard(2), "2b".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut reader = ShardLogReader::new(js.clone(), 2, 1, 10);
    let records = reader.next_batch(Duration::from_secs(2)).await;
    let payloads: Vec<&[u8]> = records.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(
        payloads,
        vec![&b"2"[..], &b"2b"[..]],
        "only shard 2's records, in order"
    );
    assert!(records.iter().all(|m| m.subject.as_str() == "crm.shard.2"));
    let after_first = records[0].info().unwrap().stream_sequence + 1;
    let mut later = ShardLogReader::new(js.clone(), 2, after_first, 10);
    let records = later.next_batch(Duration::from_secs(2)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(&records[0].payload[..], b"2b");
    // Nothing more: the call returns empty after its wait instead of hanging.
    assert!(later
        .next_batch(Duration::from_millis(200))
        .await
        .is_empty());

    let mut ingest = ingest;
    let info = ingest.info().await.unwrap();
    assert_eq!(info.name, subjects::INGEST_DURABLE);
    assert_eq!(info.num_pending, 1);
}

#[tokio::test]
async fn the_test_server_restarts_on_its_port_with_its_streams_and_leaves_no_process() {
    let mut server = NatsServer::start();
    let port = server.port();
    {
        let js = connect(&server).await;
        ensure_streams(&js, &crm_testkit::cluster_env::test_stream_settings())
            .await
            .unwrap();
        js.publish(subjects::shard(1), "kept".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    server.restart();
    assert_eq!(server.port(), port);
    let js = connect(&server).await;
    let mut stream = js.get_stream(subjects::SHARDS_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    server.kill();
    assert!(!server.is_running());
    server.restart();
    let pid = server.pid().expect("restarted");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
