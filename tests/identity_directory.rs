//! The identity directory against a real nats-server: one customer per person, race-free
//! across routers, merges and refusals under the identity rules, no raw identifiers in
//! NATS, a bounded cache.

use crm_actors::identity::{by_priority, Identity, IdentityKind};
use crm_actors::rules::IdentityRules;
use crm_actors::shard_message::{MergeRef, NoteReason};
use crm_node::ingest::identity_directory::records::RECORD_KEY_PREFIX;
use crm_node::ingest::identity_directory::{
    DirectoryError, EventIdentities, IdentityDirectory, Resolution, READ_AHEAD_MIN_CACHE,
};
use crm_node::jetstream::ensure_kv;
use crm_node::subjects;
use crm_testkit::NatsServer;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

const SECRET: &[u8] = b"test-cluster-secret";

async fn directory(server: &NatsServer, cache_max_entries: usize) -> IdentityDirectory {
    // Each directory has its own connection, as two routers on two nodes would.
    let client = async_nats::connect(server.url())
        .await
        .expect("the test server accepts clients");
    let js = async_nats::jetstream::new(client);
    let kv = ensure_kv(&js, subjects::KV_IDENTITY, 1).await.unwrap();
    IdentityDirectory::new(kv, SECRET, cache_max_entries)
}

fn ids(pairs: &[(IdentityKind, &str)]) -> Vec<Identity> {
    let mut identities: Vec<Identity> = pairs
        .iter()
        .map(|(kind, raw)| Identity::normalise(*kind, raw).unwrap())
        .collect();
    by_priority(&mut identities);
    identities
}

/// The identifier keys of the bucket (without the customer records).
async fn kv_keys(server: &NatsServer) -> Vec<String> {
    all_kv_keys(server)
        .await
        .into_iter()
        .filter(|key| !key.starts_with(RECORD_KEY_PREFIX))
        .collect()
}

async fn all_kv_keys(server: &NatsServer) -> Vec<String> {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value(subjects::KV_IDENTITY).await.unwrap();
    kv.keys().await.unwrap().try_collect().await.unwrap()
}

/// Checks that every resolution of a person names the same customer and reports no
/// conflict; returns each person's customer and how many resolutions minted one.
fn one_customer_per_person(
    resolved: Vec<(usize, Resolution)>,
) -> (std::collections::HashMap<usize, String>, usize) {
    let mut customer_of = std::collections::HashMap::new();
    let mut created = 0;
    for (person, resolution) in resolved {
        created += usize::from(resolution.created);
        let first = customer_of
            .entry(person)
            .or_insert(resolution.customer_id.clone());
        assert_eq!(*first, resolution.customer_id, "person {person}");
        assert!(resolution.conflicts.is_empty(), "{resolution:?}");
    }
    (customer_of, created)
}

#[tokio::test]
async fn a_new_identity_gets_one_customer_and_the_same_id_next_time() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    let email = ids(&[(IdentityKind::Email, "Ann@Example.com")]);

    let first = directory.resolve(&email).await.unwrap();
    assert!(first.created);
    assert_eq!(first.linked, vec![IdentityKind::Email]);
    assert!(first.conflicts.is_empty());
    assert!(first.customer_id.starts_with('c'));
    assert_eq!(first.customer_id.len(), 25);
    assert!(subjects::is_token(&first.customer_id));
    assert_eq!(first.customer_id, directory.customer_id_for(&email[0]));

    let second = directory.resolve(&email).await.unwrap();
    assert_eq!(second.customer_id, first.customer_id);
    assert!(!second.created);
    assert!(second.linked.is_empty());

    // A fresh directory (another node, empty cache) reads the same mapping from NATS.
    let other = self::directory(&server, 100).await;
    let same = ids(&[(IdentityKind::Email, " ann@EXAMPLE.com ")]);
    assert_eq!(
        other.lookup(&same).await.unwrap(),
        Some(first.customer_id.clone())
    );
    assert_eq!(
        other.resolve(&same).await.unwrap().customer_id,
        first.customer_id
    );
}

#[tokio::test]
async fn lookup_never_creates() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    let phone = ids(&[(IdentityKind::Phone, "+49 151 12345678")]);

    assert_eq!(directory.lookup(&phone).await.unwrap(), None);
    assert_eq!(directory.lookup(&phone).await.unwrap(), None);
    assert!(kv_keys(&server).await.is_empty());
    assert!(directory.lookup(&[]).await.is_err());
    assert!(directory.resolve(&[]).await.is_err());
}

#[tokio::test]
async fn a_known_email_with_a_new_loyalty_card_links_the_card_to_that_customer() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    let ann = directory
        .resolve(&ids(&[(IdentityKind::Email, "ann@example.com")]))
        .await
        .unwrap();

    let both = ids(&[
        (IdentityKind::Email, "ann@example.com"),
        (IdentityKind::LoyaltyCard, "LC-1001"),
    ]);
    let resolution = directory.resolve(&both).await.unwrap();

    assert_eq!(resolution.customer_id, ann.customer_id);
    assert!(!resolution.created);
    assert_eq!(resolution.linked, vec![IdentityKind::LoyaltyCard]);
    assert!(resolution.conflicts.is_empty());
    let card = ids(&[(IdentityKind::LoyaltyCard, "LC-1001")]);
    assert_eq!(
        directory.lookup(&card).await.unwrap(),
        Some(ann.customer_id.clone())
    );
    let metrics = directory.metrics();
    assert_eq!(metrics.creates, 1);
    assert_eq!(metrics.links, 1);
}

#[tokio::test]
async fn an_event_linking_two_known_customers_merges_them_into_the_higher_priority_one() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    let by_email = directory
        .resolve(&ids(&[(IdentityKind::Email, "bob@example.com")]))
        .await
        .unwrap();
    let by_card = directory
        .resolve(&ids(&[(IdentityKind::LoyaltyCard, "LC-7")]))
        .await
        .unwrap();
    assert_ne!(by_email.customer_id, by_card.customer_id);

    let both = ids(&[
        (IdentityKind::Email, "bob@example.com"),
        (IdentityKind::LoyaltyCard, "LC-7"),
        (IdentityKind::DeviceId, "device-9"),
    ]);
    let linking = EventIdentities {
        identities: &both,
        event_id: "e-link",
        at_ms: 1_700_000_000_000,
        ingest_seq: 100,
    };
    let resolution = directory
        .resolve_events(&[linking])
        .await
        .unwrap()
        .remove(0)
        .unwrap();

    // The loyalty card has the highest priority: its customer survives.
    let merge = MergeRef {
        merged_id: by_email.customer_id.clone(),
        survivor_id: by_card.customer_id.clone(),
        cause_event_id: "e-link".to_string(),
        at_ms: 1_700_000_000_000,
    };
    assert_eq!(resolution.customer_id, by_card.customer_id);
    assert_eq!(resolution.merges, vec![merge.clone()]);
    assert_eq!(resolution.merge_outs, vec![merge.clone()]);
    assert!(resolution.conflicts.is_empty() && resolution.notes.is_empty());
    assert_eq!(resolution.linked, vec![IdentityKind::DeviceId]);
    assert_eq!(directory.metrics().merges, 1);

    // The email's key still names its first customer (keys never change); resolving it now
    // gives the survivor, also for another router that never saw the merge.
    assert_eq!(
        directory
            .lookup(&ids(&[(IdentityKind::Email, "bob@example.com")]))
            .await
            .unwrap(),
        Some(by_email.customer_id.clone())
    );
    let other_router = self::directory(&server, 100).await;
    let later = other_router
        .resolve(&ids(&[(IdentityKind::Email, "bob@example.com")]))
        .await
        .unwrap();
    assert_eq!(later.customer_id, by_card.customer_id);
    assert!(later.merges.is_empty() && later.merge_outs.is_empty());

    // An event before the merge in ingest order, redelivered, still belongs to the merged
    // customer (it is before the merge-out in that customer's log).
    let email_only = ids(&[(IdentityKind::Email, "bob@example.com")]);
    let earlier = EventIdentities {
        identities: &email_only,
        event_id: "e-before",
        at_ms: 1_600_000_000_000,
        ingest_seq: 99,
    };
    let before = other_router
        .resolve_events(&[earlier])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(before.customer_id, by_email.customer_id);

    // The same event routed again (a redelivery) writes its merge again, and nothing else.
    let again = other_router
        .resolve_events(&[linking])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(again.customer_id, by_card.customer_id);
    assert_eq!(again.merge_outs, vec![merge]);
    assert_eq!(other_router.metrics().merges, 0);
}

#[tokio::test]
async fn a_kind_that_may_not_merge_is_reported_as_a_conflict_and_dropped() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    let by_email = directory
        .resolve(&ids(&[(IdentityKind::Email, "ann@example.com")]))
        .await
        .unwrap();
    let by_device = directory
        .resolve(&ids(&[(IdentityKind::DeviceId, "shared-tablet")]))
        .await
        .unwrap();
    let resolution = directory
        .resolve(&ids(&[
            (IdentityKind::Email, "ann@example.com"),
            (IdentityKind::DeviceId, "shared-tablet"),
        ]))
        .await
        .unwrap();
    assert_eq!(resolution.customer_id, by_email.customer_id);
    assert!(resolution.merges.is_empty());
    assert_eq!(
        resolution.conflicts,
        vec![(IdentityKind::DeviceId, by_device.customer_id.clone())]
    );
    assert_eq!(resolution.notes.len(), 1);
    assert_eq!(resolution.notes[0].reason, NoteReason::MergeDisabled);
    assert_eq!(
        resolution.dropped().collect::<Vec<_>>(),
        vec![IdentityKind::DeviceId]
    );
    assert_eq!(directory.metrics().merges_refused, 1);
}

#[tokio::test]
async fn merges_and_links_beyond_the_identity_limits_are_refused() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = ensure_kv(&js, subjects::KV_IDENTITY, 1).await.unwrap();
    let rules = IdentityRules {
        merges_max_per_day: 2,
        ..IdentityRules::default()
    };
    let directory = IdentityDirectory::new(kv, SECRET, 100).with_rules(rules);
    let day = 1_700_000_000_000;
    let resolve = |pairs: Vec<(IdentityKind, String)>, at_ms: i64, id: String| {
        let directory = &directory;
        async move {
            let pairs: Vec<(IdentityKind, &str)> =
                pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let identities = ids(&pairs);
            let event = EventIdentities {
                identities: &identities,
                event_id: &id,
                at_ms,
                ingest_seq: u64::MAX,
            };
            directory
                .resolve_events(&[event])
                .await
                .unwrap()
                .remove(0)
                .unwrap()
        }
    };
    // Two customers with a loyalty card each: one card per customer, so no merge.
    let a = resolve(
        vec![
            (IdentityKind::LoyaltyCard, "LC-A".into()),
            (IdentityKind::Email, "a@x.co".into()),
        ],
        day,
        "e1".into(),
    )
    .await;
    let b = resolve(
        vec![(IdentityKind::LoyaltyCard, "LC-B".into())],
        day,
        "e2".into(),
    )
    .await;
    let both = resolve(
        vec![
            (IdentityKind::LoyaltyCard, "LC-B".into()),
            (IdentityKind::Email, "a@x.co".into()),
        ],
        day,
        "e3".into(),
    )
    .await;
    assert_eq!(both.customer_id, b.customer_id);
    assert!(both.merges.is_empty());
    assert_eq!(
        both.notes[0].reason,
        NoteReason::MaxPerCustomer {
            kind: IdentityKind::LoyaltyCard,
            limit: 1
        }
    );
    assert_eq!(
        both.conflicts,
        vec![(IdentityKind::Email, a.customer_id.clone())]
    );

    // Five emails per customer: a sixth new email is not linked.
    for n in 2..=5 {
        let linked = resolve(
            vec![
                (IdentityKind::LoyaltyCard, "LC-A".into()),
                (IdentityKind::Email, format!("a{n}@x.co")),
            ],
            day,
            format!("e-mail-{n}"),
        )
        .await;
        assert_eq!(linked.linked, vec![IdentityKind::Email], "email {n}");
    }
    let sixth = resolve(
        vec![
            (IdentityKind::LoyaltyCard, "LC-A".into()),
            (IdentityKind::Email, "a6@x.co".into()),
        ],
        day,
        "e-mail-6".into(),
    )
    .await;
    assert!(sixth.linked.is_empty());
    assert_eq!(sixth.notes[0].other_customer_id, None);
    assert_eq!(
        sixth.notes[0].reason,
        NoteReason::MaxPerCustomer {
            kind: IdentityKind::Email,
            limit: 5
        }
    );
    assert_eq!(directory.metrics().identifiers_refused, 1);

    // Two merges a day into one customer, then refused; the next day they go on.
    let survivor = resolve(
        vec![(IdentityKind::CustomerId, "S-1".into())],
        day,
        "s".into(),
    )
    .await;
    let mut merged = 0;
    for n in 0..3 {
        let other = resolve(
            vec![(IdentityKind::Phone, format!("+4915100000{n}"))],
            day,
            format!("p{n}"),
        )
        .await;
        let link = resolve(
            vec![
                (IdentityKind::CustomerId, "S-1".into()),
                (IdentityKind::Phone, format!("+4915100000{n}")),
            ],
            day,
            format!("l{n}"),
        )
        .await;
        assert_eq!(link.customer_id, survivor.customer_id);
        if link.merges.is_empty() {
            assert_eq!(link.notes[0].reason, NoteReason::MergesPerDay { limit: 2 });
            assert_eq!(
                link.notes[0].other_customer_id.as_deref(),
                Some(other.customer_id.as_str())
            );
        } else {
            merged += 1;
        }
    }
    assert_eq!(merged, 2);
    let next_day = resolve(
        vec![
            (IdentityKind::CustomerId, "S-1".into()),
            (IdentityKind::Phone, "+49151000002".into()),
        ],
        day + 86_400_000,
        "l-next".into(),
    )
    .await;
    assert_eq!(next_day.merges.len(), 1, "{next_day:?}");
}

#[tokio::test]
async fn two_routers_racing_on_the_same_new_identities_end_with_one_customer() {
    let server = NatsServer::start();
    let routers = [
        Arc::new(directory(&server, 1000).await),
        Arc::new(directory(&server, 1000).await),
    ];
    // 20 new people, each resolved 50 times across both routers at once, with the
    // identifiers in varying combinations.
    let mut tasks = Vec::new();
    for person in 0..20 {
        for attempt in 0..50 {
            let router = routers[attempt % 2].clone();
            let identities = match attempt % 3 {
                0 => ids(&[(IdentityKind::Email, &format!("p{person}@example.com"))]),
                1 => ids(&[
                    (IdentityKind::Email, &format!("p{person}@example.com")),
                    (IdentityKind::DeviceId, &format!("dev-{person}")),
                ]),
                _ => ids(&[
                    (IdentityKind::DeviceId, &format!("dev-{person}")),
                    (IdentityKind::Email, &format!("p{person}@example.com")),
                ]),
            };
            tasks.push(tokio::spawn(async move {
                (person, router.resolve(&identities).await.unwrap())
            }));
        }
    }
    let mut resolved = Vec::new();
    for task in tasks {
        resolved.push(task.await.unwrap());
    }
    let (customer_of, created) = one_customer_per_person(resolved);
    assert_eq!(created, 20, "exactly one resolve minted each customer");
    let distinct: std::collections::HashSet<_> = customer_of.values().collect();
    assert_eq!(distinct.len(), 20);
    assert_eq!(kv_keys(&server).await.len(), 40);
}

#[tokio::test]
async fn no_raw_identifier_appears_in_the_kv_keys_or_values() {
    let server = NatsServer::start();
    let directory = directory(&server, 100).await;
    directory
        .resolve(&ids(&[
            (IdentityKind::Email, "carol.secret@example.com"),
            (IdentityKind::Phone, "+4915112345678"),
            (IdentityKind::LoyaltyCard, "LC-SECRET-42"),
        ]))
        .await
        .unwrap();

    let keys = kv_keys(&server).await;
    assert_eq!(keys.len(), 3);
    let client = async_nats::connect(server.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(subjects::KV_IDENTITY)
        .await
        .unwrap();
    for key in &keys {
        assert_eq!(key.len(), 64, "{key}");
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        let value = kv.get(key).await.unwrap().unwrap();
        let value = String::from_utf8(value.to_vec()).unwrap();
        for raw in ["carol", "secret", "example", "4915112345678", "LC-", "@"] {
            assert!(!key.to_lowercase().contains(&raw.to_lowercase()), "{key}");
            assert!(!value.contains(raw), "{value}");
        }
    }
    // The same value under two kinds hashes to two keys.
    let as_card = Identity::normalise(IdentityKind::LoyaltyCard, "x1").unwrap();
    let as_device = Identity::normalise(IdentityKind::DeviceId, "x1").unwrap();
    assert_ne!(directory.key_of(&as_card), directory.key_of(&as_device));
}

#[tokio::test]
async fn the_cache_stays_within_its_bound_and_answers_repeat_lookups() {
    let server = NatsServer::start();
    let directory = directory(&server, 8).await;
    let people: Vec<Vec<Identity>> = (0..40)
        .map(|i| ids(&[(IdentityKind::DeviceId, &format!("d{i}"))]))
        .collect();
    futures::stream::iter(&people)
        .for_each_concurrent(8, |identities| {
            let directory = &directory;
            async move {
                directory.resolve(identities).await.unwrap();
            }
        })
        .await;
    assert!(directory.cache_len() <= 8, "{}", directory.cache_len());

    let before = directory.metrics();
    let last = &people[39];
    let expected = directory.customer_id_for(&last[0]);
    assert_eq!(directory.lookup(last).await.unwrap(), Some(expected));
    let after = directory.metrics();
    assert_eq!(after.cache_hits, before.cache_hits + 1);
    assert_eq!(after.cache_misses, before.cache_misses);

    // Evicted entries are read back from NATS, correctly.
    let first = &people[0];
    assert_eq!(
        directory.lookup(first).await.unwrap(),
        Some(directory.customer_id_for(&first[0]))
    );
    assert!(directory.cache_len() <= 8);
}

/// A deterministic mix of events: new people, people seen before, new identifiers arriving
/// with known ones, identifiers of two people in one event, repeated identifiers.
fn mixed_events() -> Vec<Vec<Identity>> {
    let mut events = Vec::new();
    for i in 0..120usize {
        let person = i % 30;
        let mut pairs: Vec<(IdentityKind, String)> = Vec::new();
        match i % 5 {
            0 => pairs.push((IdentityKind::Email, format!("p{person}@example.com"))),
            1 => {
                pairs.push((IdentityKind::Email, format!("p{person}@example.com")));
                pairs.push((IdentityKind::DeviceId, format!("dev-{person}")));
            }
            2 => pairs.push((IdentityKind::DeviceId, format!("dev-{person}"))),
            3 => {
                pairs.push((IdentityKind::LoyaltyCard, format!("LC-{person}")));
                pairs.push((IdentityKind::Phone, format!("+49151000{person:04}")));
            }
            _ => {
                // Person - 1's card (from the events `i % 5 == 3`) and person - 3's email
                // (from `i % 5 == 1`): two customers once both are known.
                pairs.push((
                    IdentityKind::LoyaltyCard,
                    format!("LC-{}", (person + 29) % 30),
                ));
                pairs.push((
                    IdentityKind::Email,
                    format!("p{}@example.com", (person + 27) % 30),
                ));
            }
        }
        let pairs: Vec<(IdentityKind, &str)> = pairs
            .iter()
            .map(|(kind, value)| (*kind, value.as_str()))
            .collect();
        events.push(ids(&pairs));
    }
    events
}

#[tokio::test]
async fn resolving_many_events_at_once_equals_resolving_them_one_by_one() {
    let events = mixed_events();

    let one_by_one_server = NatsServer::start();
    let one_by_one = directory(&one_by_one_server, 1000).await;
    let mut expected = Vec::new();
    for identities in &events {
        expected.push(one_by_one.resolve(identities).await.unwrap());
    }
    let mut many_full_cache = None;

    // The same events in chunks of varying size (a chunk sees what earlier chunks created),
    // on a fresh server each, with no cache (every identifier is looked up or created
    // straight away, and creates lose to what earlier chunks stored), a cache too small to
    // hold everything, and one that holds everything; and as the router does it, each chunk
    // read ahead before the one before it is resolved (so what a chunk creates was read
    // ahead as absent for the next one).
    let mut keys_a = kv_keys(&one_by_one_server).await;
    keys_a.sort();
    let sizes = [1usize, 7, 40, 2, 70];
    let mut chunks: Vec<&[Vec<Identity>]> = Vec::new();
    let mut rest: &[Vec<Identity>] = &events;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    let slices = |chunk: &[Vec<Identity>]| -> Vec<Vec<Identity>> { chunk.to_vec() };
    for (cache_max_entries, read_ahead) in [
        (0, false),
        (16, false),
        (1000, false),
        (0, true),
        (16, true),
        (READ_AHEAD_MIN_CACHE, true),
    ] {
        let server = NatsServer::start();
        let many = directory(&server, cache_max_entries).await;
        let mut got = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            if read_ahead {
                if index == 0 {
                    let first = slices(chunk);
                    let first: Vec<&[Identity]> = first.iter().map(Vec::as_slice).collect();
                    many.read_ahead(&first).await;
                }
                if let Some(next) = chunks.get(index + 1) {
                    let next = slices(next);
                    let next: Vec<&[Identity]> = next.iter().map(Vec::as_slice).collect();
                    many.read_ahead(&next).await;
                }
            }
            let chunk: Vec<&[Identity]> = chunk.iter().map(Vec::as_slice).collect();
            for result in many.resolve_many(&chunk).await.unwrap() {
                got.push(result.unwrap());
            }
        }
        assert_eq!(got, expected, "cache of {cache_max_entries}");
        let (a, b) = (one_by_one.metrics(), many.metrics());
        assert_eq!(
            (a.creates, a.links, a.conflicts),
            (b.creates, b.links, b.conflicts),
            "cache of {cache_max_entries}"
        );
        // Both ways of learning an uncached identifier were taken, and the answers read
        // ahead were used when the cache is big enough to make them safe.
        assert!(b.created_first > 0, "{b:?}");
        if read_ahead && cache_max_entries >= READ_AHEAD_MIN_CACHE {
            assert!(b.read_ahead_used > 0, "{b:?}");
        } else {
            assert!(b.kv_reads > 0 && b.read_ahead == 0, "{b:?}");
        }
        let mut keys_b = kv_keys(&server).await;
        keys_b.sort();
        assert_eq!(keys_a, keys_b, "cache of {cache_max_entries}");
        if cache_max_entries == 1000 {
            many_full_cache = Some((server, many));
        }
    }
    assert!(
        expected.iter().any(|r| !r.merges.is_empty()),
        "the mix has merges"
    );
    assert!(
        expected.iter().any(|r| r.created),
        "the mix creates customers"
    );
    let (_server, many) = many_full_cache.expect("the last run kept its directory");

    // An event without identifiers fails alone.
    let results = many
        .resolve_many(&[events[0].as_slice(), &[], events[1].as_slice()])
        .await
        .unwrap();
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(matches!(
        results[1],
        Err(crm_node::ingest::identity_directory::DirectoryError::NoIdentity)
    ));
}

#[tokio::test]
async fn two_routers_resolving_chunks_of_the_same_new_people_end_with_one_customer_each() {
    let server = NatsServer::start();
    let routers = [
        Arc::new(directory(&server, 1000).await),
        Arc::new(directory(&server, 1000).await),
    ];
    // 30 new people; each router resolves every person's events in chunks, at the same time,
    // with the identifiers in a different order of arrival.
    let mut tasks = Vec::new();
    for (index, router) in routers.iter().enumerate() {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            let mut events: Vec<(usize, Vec<Identity>)> = Vec::new();
            for person in 0..30usize {
                let email = format!("p{person}@example.com");
                let device = format!("dev-{person}");
                let first = ids(&[(IdentityKind::Email, email.as_str())]);
                let second = ids(&[
                    (IdentityKind::Email, email.as_str()),
                    (IdentityKind::DeviceId, device.as_str()),
                ]);
                if index == 0 {
                    events.push((person, first));
                    events.push((person, second));
                } else {
                    events.push((person, second));
                    events.push((person, first));
                }
            }
            let mut resolved = Vec::new();
            for chunk in events.chunks(13) {
                let slices: Vec<&[Identity]> =
                    chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
                let results = router.resolve_many(&slices).await.unwrap();
                for ((person, _), result) in chunk.iter().zip(results) {
                    resolved.push((*person, result.unwrap()));
                }
            }
            resolved
        }));
    }
    let mut resolved = Vec::new();
    for task in tasks {
        resolved.extend(task.await.unwrap());
    }
    let (_, created) = one_customer_per_person(resolved);
    assert_eq!(created, 30, "exactly one resolve minted each customer");
    assert_eq!(kv_keys(&server).await.len(), 60);
}

#[tokio::test]
async fn answers_read_ahead_before_another_router_mapped_the_keys_are_dropped_when_routing_starts()
{
    // Router A reads a chunk ahead, then loses the router role; router B resolves that
    // chunk (mapping its new identifiers); A routes again: what A read ahead ("absent") is
    // no longer true. A starts routing with `clear_read_ahead`, so it resolves the next
    // events exactly as one by one would.
    let server = NatsServer::start();
    let a = directory(&server, READ_AHEAD_MIN_CACHE).await;
    let b = directory(&server, READ_AHEAD_MIN_CACHE).await;
    let first = ids(&[
        (IdentityKind::LoyaltyCard, "LC-77"),
        (IdentityKind::Email, "ann@example.com"),
    ]);
    a.read_ahead(&[first.as_slice()]).await;
    assert_eq!(a.metrics().read_ahead, 2, "both keys read ahead as absent");
    let minted = b.resolve_many(&[first.as_slice()]).await.unwrap();
    let owner = minted[0].as_ref().unwrap().customer_id.clone();

    a.clear_read_ahead();
    let second = ids(&[
        (IdentityKind::Email, "ann@example.com"),
        (IdentityKind::Phone, "+49 151 0000 7777"),
    ]);
    let resolved = a.resolve_many(&[second.as_slice()]).await.unwrap();
    let resolution = resolved[0].as_ref().unwrap();
    assert_eq!(resolution.customer_id, owner);
    assert!(resolution.conflicts.is_empty(), "{resolution:?}");
    assert_eq!(resolution.linked, vec![IdentityKind::Phone]);
    assert_eq!(a.metrics().read_ahead_used, 0);
    // The phone now leads to the same customer.
    let phone = ids(&[(IdentityKind::Phone, "+49 151 0000 7777")]);
    assert_eq!(b.lookup(&phone).await.unwrap(), Some(owner));
}

#[tokio::test]
async fn an_identifier_whose_stored_value_is_not_a_customer_id_fails_only_its_event() {
    // Someone wrote garbage under an identifier's key. The events that carry it fail with
    // `CorruptValue` (the router dead-letters them, naming the key to fix); the others of
    // the chunk resolve as usual, whether the bad key is the event's only unknown one
    // (created first, the create loses, the read finds garbage) or one of two (read).
    let server = NatsServer::start();
    let many = directory(&server, 1000).await;
    let bad = ids(&[(IdentityKind::Email, "broken@example.com")]);
    let client = async_nats::connect(server.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(subjects::KV_IDENTITY)
        .await
        .unwrap();
    kv.put(many.key_of(&bad[0]), "not a customer id".into())
        .await
        .unwrap();
    let good = ids(&[(IdentityKind::Email, "fine@example.com")]);
    let bad_and_new = ids(&[
        (IdentityKind::Email, "broken@example.com"),
        (IdentityKind::DeviceId, "dev-new"),
    ]);
    let after = ids(&[(IdentityKind::DeviceId, "dev-new")]);
    let results = many
        .resolve_many(&[&good, &bad, &bad_and_new, &after])
        .await
        .expect("a corrupt key does not fail the chunk");
    assert!(results[0].as_ref().is_ok_and(|r| r.created));
    for failed in [&results[1], &results[2]] {
        match failed {
            Err(DirectoryError::CorruptValue { key, value, .. }) => {
                assert_eq!(*key, many.key_of(&bad[0]));
                assert_eq!(value, "not a customer id");
            }
            other => panic!("expected CorruptValue, got {other:?}"),
        }
    }
    // The failed event created nothing: its device id is new to the next event.
    assert!(results[3].as_ref().is_ok_and(|r| r.created));
    // One by one gives the same.
    assert!(matches!(
        many.resolve(&bad).await,
        Err(DirectoryError::CorruptValue { .. })
    ));
    // First seen with another unknown identifier, the bad key is read, not created.
    let fresh = directory(&server, 1000).await;
    let bad_first = ids(&[
        (IdentityKind::Email, "broken@example.com"),
        (IdentityKind::DeviceId, "dev-other"),
    ]);
    let results = fresh
        .resolve_many(&[&bad_first, &good])
        .await
        .expect("a corrupt key does not fail the chunk");
    assert!(matches!(
        results[0],
        Err(DirectoryError::CorruptValue { .. })
    ));
    assert!(results[1].is_ok());
}

#[tokio::test]
async fn a_read_ahead_begun_before_routing_restarted_keeps_nothing() {
    let server = NatsServer::start();
    let a = directory(&server, READ_AHEAD_MIN_CACHE).await;
    let event = ids(&[
        (IdentityKind::LoyaltyCard, "LC-88"),
        (IdentityKind::Email, "bea@example.com"),
    ]);
    let events = [event.as_slice()];
    // The clear lands while the read-ahead's reads are in flight.
    let ((), ()) = tokio::join!(a.read_ahead(&events), async {
        tokio::task::yield_now().await;
        a.clear_read_ahead();
    });
    assert_eq!(a.metrics().read_ahead, 0);
    // Begun after the clear, it keeps its answers.
    a.read_ahead(&events).await;
    assert_eq!(a.metrics().read_ahead, 2);
}

#[tokio::test]
async fn a_router_whose_lease_ran_out_creates_no_more_identity_keys() {
    let server = NatsServer::start();
    let router = directory(&server, 100).await;
    let known = ids(&[(IdentityKind::Email, "known@example.com")]);
    let known_customer = router.resolve(&known).await.unwrap().customer_id;
    assert_eq!(kv_keys(&server).await.len(), 1);
    let new_people: Vec<Vec<Identity>> = (0..6)
        .map(|i| ids(&[(IdentityKind::Email, &format!("new-{i}@example.com"))]))
        .collect();
    // Each a new person's only identifier, and a new card beside the known (cached) email:
    // every one its event's only unknown identifier, created in round 1 without a read.
    let linking = ids(&[
        (IdentityKind::Email, "known@example.com"),
        (IdentityKind::LoyaltyCard, "LC-NEW"),
    ]);
    let mut chunk: Vec<&[Identity]> = new_people.iter().map(Vec::as_slice).collect();
    chunk.push(&linking);

    // The fence has run out: nothing is created, the whole chunk fails.
    let refused = router.resolve_many_guarded(&chunk, &|| false).await;
    assert!(
        matches!(refused, Err(DirectoryError::Fenced)),
        "{refused:?}"
    );
    assert_eq!(kv_keys(&server).await.len(), 1, "no key was created");

    // Two new identifiers in one event are read first and created in the last round: the
    // fence is asked there too.
    let pair = ids(&[
        (IdentityKind::Email, "pair@example.com"),
        (IdentityKind::Phone, "+4915112345678"),
    ]);
    let refused = router.resolve_many_guarded(&[&pair], &|| false).await;
    assert!(
        matches!(refused, Err(DirectoryError::Fenced)),
        "{refused:?}"
    );
    assert_eq!(kv_keys(&server).await.len(), 1, "no key was created");

    // It runs out after the first create: at most that one key exists.
    let allowed = std::sync::atomic::AtomicUsize::new(1);
    let may_create = || {
        allowed
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |left| left.checked_sub(1),
            )
            .is_ok()
    };
    let cut = router.resolve_many_guarded(&chunk, &may_create).await;
    assert!(matches!(cut, Err(DirectoryError::Fenced)), "{cut:?}");
    // The call ends at the first refusal; the allowed create may or may not have landed.
    let after_cut = kv_keys(&server).await.len();
    assert!(
        after_cut <= 2,
        "{after_cut} keys: more than the one allowed create"
    );

    // A chunk of known identifiers needs no create: it resolves with the fence gone.
    let again: Vec<&[Identity]> = vec![&known, &known];
    let resolved = router
        .resolve_many_guarded(&again, &|| false)
        .await
        .expect("cached identifiers resolve without writes");
    assert!(resolved.iter().all(Result::is_ok), "{resolved:?}");

    // The next router (lease valid) maps everyone, the key already made included.
    let next = directory(&server, 100).await;
    let results = next
        .resolve_many(&chunk)
        .await
        .expect("the next router resolves the chunk");
    for (person, result) in new_people.iter().zip(&results) {
        let resolution = result.as_ref().expect("resolved");
        assert_eq!(resolution.customer_id, next.customer_id_for(&person[0]));
    }
    let card = results
        .last()
        .expect("seven results")
        .as_ref()
        .expect("resolved");
    assert_eq!(
        card.customer_id, known_customer,
        "the card joins the known customer"
    );
    assert_eq!(kv_keys(&server).await.len(), 1 + 6 + 1);
}

#[tokio::test]
async fn an_email_stored_decomposed_before_nfc_keeps_resolving_to_its_customer() {
    let server = NatsServer::start();
    let router = directory(&server, 100).await;
    // As a build before NFC normalisation stored it: the key of the decomposed text.
    let legacy = Identity {
        kind: IdentityKind::Email,
        value: "rene\u{301}@example.com".to_string(),
    };
    let client = async_nats::connect(server.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(subjects::KV_IDENTITY)
        .await
        .unwrap();
    kv.create(router.key_of(&legacy), "cstoredbefore01".into())
        .await
        .unwrap();
    // Typed decomposed or composed, it normalises to the composed (NFC) form now.
    let current = ids(&[(IdentityKind::Email, "Rene\u{301}@Example.com")]);
    assert_ne!(current[0].value, legacy.value);
    let fresh = directory(&server, 100).await;
    assert_eq!(
        fresh.lookup(&current).await.unwrap().as_deref(),
        Some("cstoredbefore01"),
        "a query finds the customer under the legacy form"
    );
    // An event alone with it (which would otherwise mint a customer at once) goes to the
    // stored customer, and the current form is mapped to it.
    let resolution = router.resolve(&current).await.unwrap();
    assert_eq!(resolution.customer_id, "cstoredbefore01");
    assert!(!resolution.created);
    assert!(kv_keys(&server).await.contains(&router.key_of(&current[0])));
    let later = directory(&server, 0).await;
    assert_eq!(
        later.lookup(&current).await.unwrap().as_deref(),
        Some("cstoredbefore01")
    );
}
