//! Resolving a chunk of events at once ([`IdentityDirectory::resolve_many`]), with the same
//! outcome as resolving them one by one, in a few concurrent rounds of KV round trips. Its
//! phases, in order: what the cache and the read-ahead already know ([`Learnt`]); a
//! concurrent probe (create or read) of every other key; a plan per event, in order, as if
//! every create wins; the planned creates, concurrently; and the results, events from the
//! first lost create on resolved again one by one. Called by the router only; it never
//! rewrites a stored mapping.

use super::{
    Created, DirectoryError, IdentityDirectory, MayCreate, Resolution, CUSTOMER_ID_HEX_CHARS,
    KV_IN_FLIGHT_MAX,
};
use crm_actors::identity::{Identity, IdentityKind};
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

/// What round 1 of [`IdentityDirectory::resolve_many`] learnt about an uncached key.
enum Probe {
    /// Read (or found by a create that lost): the stored customer, if any.
    Found(Option<String>),
    /// Unmapped until this call's create mapped it (to what `create_first` said).
    Created,
    /// Its stored value is not a customer id.
    Corrupt(DirectoryError),
}

/// The customer that uncached `key` (first seen in the event whose keys are `event_keys`)
/// maps to if it is unmapped, when that does not depend on any other unknown key: the
/// event's other keys are all known (`known` holds their customer), or it has no other key
/// (the customer minted from it). Such a key can be created straight away: a create that
/// wins gives what a read of "absent" followed by the create would, one that loses reads
/// the stored customer. `None` when another key of the event is unknown too: which customer
/// the event belongs to depends on whether those keys exist, so they are read first.
fn create_first(
    event_keys: &[String],
    key: &str,
    known: &HashMap<String, Option<String>>,
) -> Option<String> {
    let mut winner = None;
    for other in event_keys.iter().filter(|other| *other != key) {
        match known.get(other) {
            Some(Some(customer_id)) => {
                winner.get_or_insert_with(|| customer_id.clone());
            }
            _ => return None,
        }
    }
    winner.or_else(|| Some(format!("c{}", &key[..CUSTOMER_ID_HEX_CHARS])))
}

/// What the rounds before the plan learnt about the keys of a chunk.
#[derive(Default)]
struct Learnt {
    /// Every distinct key's customer (`None`: unmapped, or not known yet).
    known: HashMap<String, Option<String>>,
    /// Uncached keys: (kind, key, index of the first event that has it).
    missed: Vec<(IdentityKind, String, usize)>,
    /// Keys this call created in round 1: the plan resolves their event as if they were
    /// unknown (linked, or the minted primary) but does not create them again.
    created_first: HashSet<String>,
    /// Keys whose stored value is not a customer id: their events fail alone, as with
    /// `resolve`, so the router dead-letters them instead of retrying the whole chunk.
    corrupt: HashMap<String, DirectoryError>,
}

/// One event's resolution as planned in round 2, assuming every create wins.
struct Plan {
    resolution: Resolution,
    /// Keys this event creates: (index in the event, key, value).
    creates: Vec<(usize, String, String)>,
}

/// A planned create's outcome: (event, index in the event, this create won, the key holds
/// the planned value).
type Outcome = (usize, usize, bool, bool);

impl IdentityDirectory {
    /// [`resolve`](Self::resolve) for many events at once, with the same outcome as
    /// resolving them one after the other in order, in a few concurrent rounds of KV round
    /// trips instead of two per unknown identifier.
    ///
    /// The identifiers not in the cache are looked up concurrently, each distinct key once:
    /// a key whose mapping would not depend on any other unknown key (it is its event's
    /// only unknown identifier and first appears in that event) is created at once, which
    /// costs one round trip when it is new, the usual case with a warm cache; every other
    /// one is read. The events are then resolved in order against what was learnt, an event
    /// seeing the mappings that the events before it create; those creates are then issued
    /// concurrently. A create that another router won with a different customer makes every
    /// event from the first one that planned it resolve again, one by one, against what is
    /// now stored (as [`resolve`](Self::resolve) does when it loses a race). The result has
    /// one entry per input, in order; an event without identifiers gets `NoIdentity`.
    pub async fn resolve_many(
        &self,
        events: &[&[Identity]],
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        self.resolve_many_guarded(events, &|| true).await
    }

    /// [`resolve_many`](Self::resolve_many) that asks `may_create` before every key it
    /// creates, and fails with [`DirectoryError::Fenced`] (creating nothing more) once the
    /// answer is no. Keys already created stay: mappings never change, and the next router
    /// reads them.
    pub async fn resolve_many_guarded(
        &self,
        events: &[&[Identity]],
        may_create: MayCreate<'_>,
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        let keys: Vec<Vec<String>> = events
            .iter()
            .map(|identities| identities.iter().map(|id| self.key_of(id)).collect())
            .collect();
        // Round 1: the current value of every distinct key: the cache, the read-ahead, then
        // concurrently a create for each uncached key whose value does not depend on any
        // other uncached key (see `create_first`), a read for every other one.
        let mut learnt = self.learn_from_cache(events, &keys);
        self.learn_from_read_ahead(&keys, &mut learnt);
        self.probe_missed(&keys, &mut learnt, may_create).await?;
        // Round 2: plan, in order, as if every create wins.
        let mut plans = plan(events, &keys, &mut learnt);
        // Round 3: the planned creates, concurrently.
        let outcomes = self.create_planned(events, &plans, may_create).await?;
        self.settle(events, &mut plans, &outcomes, may_create).await
    }

    /// Round 1a: the cached customer of every distinct key; the others are `missed`.
    fn learn_from_cache(&self, events: &[&[Identity]], keys: &[Vec<String>]) -> Learnt {
        let mut learnt = Learnt::default();
        let mut cache = self.lock_cache();
        for (event, (identities, keys)) in events.iter().zip(keys).enumerate() {
            for (identity, key) in identities.iter().zip(keys) {
                if learnt.known.contains_key(key) {
                    continue;
                }
                match cache.get(key) {
                    Some(customer_id) => {
                        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                        learnt.known.insert(key.clone(), Some(customer_id));
                    }
                    None => {
                        self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                        learnt.known.insert(key.clone(), None);
                        learnt.missed.push((identity.kind, key.clone(), event));
                    }
                }
            }
        }
        learnt
    }

    /// Round 1b: keys read ahead need no round trip now, when their answer is still true
    /// (see `read_ahead`). Every hint for a key of this chunk goes: it is used or outdated.
    fn learn_from_read_ahead(&self, keys: &[Vec<String>], learnt: &mut Learnt) {
        let mut answers = self.lock_read_ahead();
        let mut cache = self.lock_cache();
        for key in keys.iter().flatten() {
            if learnt.known.get(key).is_some_and(Option::is_some) {
                answers.remove(key);
            }
        }
        let known = &mut learnt.known;
        learnt.missed.retain(|(_, key, _)| {
            let Some(hint) = answers.remove(key) else {
                return true;
            };
            if !hint.usable(cache.generations) {
                return true;
            }
            self.counters
                .read_ahead_used
                .fetch_add(1, Ordering::Relaxed);
            if let Some(customer_id) = &hint.found {
                cache.insert(key, customer_id);
            }
            known.insert(key.clone(), hint.found);
            false
        });
    }

    /// Round 1c: every key still missed, concurrently: created at once when its value does
    /// not depend on another unknown key, else read. What was found goes to the cache.
    async fn probe_missed(
        &self,
        keys: &[Vec<String>],
        learnt: &mut Learnt,
        may_create: MayCreate<'_>,
    ) -> Result<(), DirectoryError> {
        let known = &learnt.known;
        let probes = std::mem::take(&mut learnt.missed)
            .into_iter()
            .map(|(kind, key, event)| {
                let value = create_first(&keys[event], &key, known);
                async move {
                    let probe = match value {
                        Some(value) => {
                            self.create(kind, &key, &value, may_create)
                                .await
                                .map(|created| match created {
                                    Created::Won => Probe::Created,
                                    Created::Lost(stored) => Probe::Found(Some(stored)),
                                })
                        }
                        None => self.read(kind, &key).await.map(Probe::Found),
                    };
                    match probe {
                        Ok(probe) => Ok((key, probe)),
                        Err(error @ DirectoryError::CorruptValue { .. }) => {
                            Ok((key, Probe::Corrupt(error)))
                        }
                        Err(error) => Err(error),
                    }
                }
            });
        let probes: Vec<(String, Probe)> = futures::stream::iter(probes)
            .buffer_unordered(KV_IN_FLIGHT_MAX)
            .try_collect()
            .await?;
        let mut cache = self.lock_cache();
        for (key, probe) in probes {
            match probe {
                Probe::Found(found) => {
                    self.counters.kv_reads.fetch_add(1, Ordering::Relaxed);
                    if let Some(customer_id) = &found {
                        cache.insert(&key, customer_id);
                    }
                    learnt.known.insert(key, found);
                }
                Probe::Created => {
                    self.counters.created_first.fetch_add(1, Ordering::Relaxed);
                    learnt.created_first.insert(key);
                }
                // The key stays unknown; only the events that hold it fail (in the plan).
                Probe::Corrupt(error) => {
                    learnt.corrupt.insert(key, error);
                }
            }
        }
        Ok(())
    }

    /// Round 3: the planned creates of every planned event, concurrently.
    async fn create_planned(
        &self,
        events: &[&[Identity]],
        plans: &[Result<Plan, DirectoryError>],
        may_create: MayCreate<'_>,
    ) -> Result<Vec<Outcome>, DirectoryError> {
        let planned: Vec<(usize, usize, IdentityKind, String, String)> = plans
            .iter()
            .enumerate()
            .filter_map(|(event, plan)| plan.as_ref().ok().map(|plan| (event, plan)))
            .flat_map(|(event, plan)| {
                plan.creates.iter().map(move |(index, key, value)| {
                    let kind = events[event][*index].kind;
                    (event, *index, kind, key.clone(), value.clone())
                })
            })
            .collect();
        futures::stream::iter(planned.into_iter().map(
            |(event, index, kind, key, value)| async move {
                Ok::<_, DirectoryError>(match self.create(kind, &key, &value, may_create).await {
                    Ok(Created::Won) => (event, index, true, true),
                    Ok(Created::Lost(stored)) => (event, index, false, stored == value),
                    // Written meanwhile, with a value that is not a customer id: the event
                    // is resolved again alone (in `settle`), and fails there.
                    Err(DirectoryError::CorruptValue { .. }) => (event, index, false, false),
                    Err(error) => return Err(error),
                })
            },
        ))
        .buffer_unordered(KV_IN_FLIGHT_MAX)
        .try_collect()
        .await
    }

    /// The results, one per event in order: the plan where every create went as planned;
    /// from the first event with a create that did not, each event resolved again alone.
    async fn settle(
        &self,
        events: &[&[Identity]],
        plans: &mut Vec<Result<Plan, DirectoryError>>,
        outcomes: &[Outcome],
        may_create: MayCreate<'_>,
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        let first_lost = outcomes
            .iter()
            .filter(|(_, _, _, as_planned)| !as_planned)
            .map(|(event, ..)| *event)
            .min();
        // A customer minted first by another router (with the same deterministic id) was not
        // created by this call, as with `resolve`.
        for (event, index, won, as_planned) in outcomes {
            if *index == 0 && !*won && *as_planned {
                if let Some(Ok(plan)) = plans.get_mut(*event) {
                    plan.resolution.created = false;
                    let primary = events[*event][0].kind;
                    plan.resolution.linked.retain(|kind| *kind != primary);
                }
            }
        }
        let mut results = Vec::with_capacity(events.len());
        for (event, plan) in std::mem::take(plans).into_iter().enumerate() {
            if first_lost.is_some_and(|lost| event >= lost) {
                match self.resolve_guarded(events[event], may_create).await {
                    Err(DirectoryError::Fenced) => return Err(DirectoryError::Fenced),
                    result => results.push(result),
                }
                continue;
            }
            results.push(plan.map(|plan| self.count(plan.resolution)));
        }
        Ok(results)
    }

    /// Counts a planned resolution's creates, links and conflicts, and returns it.
    fn count(&self, resolution: Resolution) -> Resolution {
        if resolution.created {
            self.counters.creates.fetch_add(1, Ordering::Relaxed);
        }
        let links = resolution.linked.len() - usize::from(resolution.created);
        self.counters
            .links
            .fetch_add(links as u64, Ordering::Relaxed);
        if !resolution.conflicts.is_empty() {
            self.counters
                .conflicts
                .fetch_add(resolution.conflicts.len() as u64, Ordering::Relaxed);
        }
        resolution
    }
}

/// Round 2: each event's resolution, in order, against what was learnt, as if every create
/// wins: an event sees the mappings the events before it plan (they go into `known`).
fn plan(
    events: &[&[Identity]],
    keys: &[Vec<String>],
    learnt: &mut Learnt,
) -> Vec<Result<Plan, DirectoryError>> {
    let mut plans = Vec::with_capacity(events.len());
    for (identities, keys) in events.iter().zip(keys) {
        if identities.is_empty() {
            plans.push(Err(DirectoryError::NoIdentity));
            continue;
        }
        if let Some(error) = keys.iter().find_map(|key| learnt.corrupt.get(key)) {
            plans.push(Err(error.clone()));
            continue;
        }
        let known = &mut learnt.known;
        let found: Vec<Option<String>> = keys.iter().map(|k| known[k].clone()).collect();
        let (winner, created) = match found.iter().flatten().next() {
            Some(customer_id) => (customer_id.clone(), false),
            None => (format!("c{}", &keys[0][..CUSTOMER_ID_HEX_CHARS]), true),
        };
        let mut resolution = Resolution {
            customer_id: winner.clone(),
            created,
            linked: Vec::new(),
            conflicts: Vec::new(),
        };
        let mut creates = Vec::new();
        for (index, (identity, found)) in identities.iter().zip(found).enumerate() {
            match found {
                Some(customer_id) if customer_id == winner => {}
                Some(other) => resolution.conflicts.push((identity.kind, other)),
                None => {
                    resolution.linked.push(identity.kind);
                    known.insert(keys[index].clone(), Some(winner.clone()));
                    if !learnt.created_first.contains(&keys[index]) {
                        creates.push((index, keys[index].clone(), winner.clone()));
                    }
                }
            }
        }
        plans.push(Ok(Plan {
            resolution,
            creates,
        }));
    }
    plans
}
