//! Resolving a chunk of events at once ([`IdentityDirectory::resolve_events`]), with the
//! same outcome as resolving them one by one, in a few concurrent rounds of KV round trips.
//! Its phases, in order: what the cache and the read-ahead already know ([`Learnt`]); a
//! concurrent probe (create or read) of every other key; the customer records of every
//! customer found, and of every customer their merges lead to; a plan per event, in order,
//! as if every create wins, under the identity rules (merges, `max_per_customer`,
//! `merges_max_per_day`); the planned creates and record writes, concurrently; and the
//! results, events from the first lost create on resolved again one by one. Called by the
//! router only; it never rewrites a stored identifier key.

use super::records::{day_of, CustomerRecord, CHAIN_MAX};
use super::{
    Counters, Created, DirectoryError, EventIdentities, IdentityDirectory, MayCreate, Resolution,
    CUSTOMER_ID_HEX_CHARS, KV_IN_FLIGHT_MAX,
};
use crate::subjects;
use crm_actors::identity::{Identity, IdentityKind};
use crm_actors::rules::IdentityRules;
use crm_actors::shard_message::{IdentityNote, MergeRef, NoteReason};
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

/// The customer that uncached `key` maps to if it is unmapped, when that does not depend on
/// anything else: the event whose keys are `event_keys` has no other key, so the key is
/// its new customer's primary identifier (the customer minted from it). Such a key can be
/// created straight away: a create that wins gives what a read of "absent" followed by the
/// create would, one that loses reads the stored customer. `None` when the event has other
/// keys: which customer they belong to, and whether the identity rules let this key join
/// it (`max_per_customer`), is decided by the plan, so the key is read first.
fn create_first(event_keys: &[String], key: &str) -> Option<String> {
    (event_keys.len() == 1 && event_keys[0] == key)
        .then(|| format!("c{}", &key[..CUSTOMER_ID_HEX_CHARS]))
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
    /// Customer records: of every customer found and every customer their merges lead to,
    /// and those the plan creates or changes.
    records: HashMap<String, Slot>,
    /// Keys of identifiers that had another form before (`Identity::legacy_form`): key ->
    /// the legacy form's key, looked up when the key is unknown.
    legacy: HashMap<String, String>,
    /// Keys found only under their legacy form: (kind, key, customer), created in round 4
    /// so that the current form is found directly from then on.
    aliases: Vec<(IdentityKind, String, String)>,
}

/// A customer record as the plan sees it.
#[derive(Default)]
struct Slot {
    record: CustomerRecord,
    /// The stored revision it was read at (`None`: none stored).
    revision: Option<u64>,
    /// Changed by the plan: to be written.
    dirty: bool,
}

impl Learnt {
    /// The customer `customer_id` belongs to for an event at ingest sequence `seq`: the end
    /// of its merge chain, following only the merges decided by that event or earlier ones
    /// (an event before a merge in ingest order stays with the merged customer, before its
    /// merge-out in its log: a redelivered one is recognised there by its event id).
    fn root(&self, customer_id: &str, seq: u64) -> Result<String, DirectoryError> {
        let mut at = customer_id;
        for _ in 0..CHAIN_MAX {
            let next = self.records.get(at).and_then(|slot| {
                let record = &slot.record;
                let applies = record.merge_seq.is_none_or(|merge_seq| seq >= merge_seq);
                record.merged_into.as_deref().filter(|_| applies)
            });
            match next {
                Some(next) => at = next,
                None => return Ok(at.to_string()),
            }
        }
        Err(DirectoryError::CorruptRecord {
            bucket: subjects::KV_IDENTITY,
            customer_id: customer_id.to_string(),
            problem: format!("the start of a merge chain longer than {CHAIN_MAX} (a cycle?)"),
        })
    }

    fn slot(&mut self, customer_id: &str) -> &mut Slot {
        self.records.entry(customer_id.to_string()).or_default()
    }

    fn record(&self, customer_id: &str) -> CustomerRecord {
        self.records
            .get(customer_id)
            .map(|slot| slot.record.clone())
            .unwrap_or_default()
    }
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
    /// [`resolve`](Self::resolve) for many events at once (no event ids, time 0): see
    /// [`resolve_events`](Self::resolve_events).
    pub async fn resolve_many(
        &self,
        events: &[&[Identity]],
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        self.resolve_many_guarded(events, &|| true).await
    }

    /// [`resolve_many`](Self::resolve_many) that asks `may_create` before every write (see
    /// [`resolve_events_guarded`](Self::resolve_events_guarded)).
    pub async fn resolve_many_guarded(
        &self,
        events: &[&[Identity]],
        may_create: MayCreate<'_>,
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        let events: Vec<EventIdentities<'_>> = events
            .iter()
            .map(|identities| EventIdentities {
                identities,
                event_id: "",
                at_ms: 0,
                ingest_seq: u64::MAX,
            })
            .collect();
        self.resolve_events_guarded(&events, may_create).await
    }

    /// The customer of each event, in order, with the same outcome as resolving them one
    /// after the other, in a few concurrent rounds of KV round trips instead of two per
    /// unknown identifier.
    ///
    /// The identifiers not in the cache are looked up concurrently, each distinct key once:
    /// the key of an event with no other identifier is created at once (it mints the
    /// customer when new); every other one is read. The records of the customers found are
    /// read (and of those their merges lead to). The events are then planned in order
    /// against what was learnt, an event seeing what the events before it create and merge:
    /// the customer is the root of the highest-priority known identifier; every other
    /// customer the event's identifiers belong to is merged into it when the identity rules
    /// allow it (the kinds' `merge`, `merges_max_per_day`, `max_per_customer` of the united
    /// identifiers), else its identifiers are noted and dropped; an unknown identifier is
    /// linked while the customer holds fewer than `max_per_customer` of its kind. The
    /// planned creates and record writes are then issued concurrently. A create that
    /// another router won with a different customer makes every event from the first one
    /// that planned it resolve again, one by one, against what is now stored. The result
    /// has one entry per input, in order; an event without identifiers gets `NoIdentity`.
    pub async fn resolve_events(
        &self,
        events: &[EventIdentities<'_>],
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        self.resolve_events_guarded(events, &|| true).await
    }

    /// [`resolve_events`](Self::resolve_events) that asks `may_create` before every key or
    /// record it writes, and fails with [`DirectoryError::Fenced`] (writing nothing more)
    /// once the answer is no. What was written stays: keys never change, records only grow,
    /// and the next router reads them.
    pub async fn resolve_events_guarded(
        &self,
        events: &[EventIdentities<'_>],
        may_create: MayCreate<'_>,
    ) -> Result<Vec<Result<Resolution, DirectoryError>>, DirectoryError> {
        let identities: Vec<&[Identity]> = events.iter().map(|e| e.identities).collect();
        let keys: Vec<Vec<String>> = identities
            .iter()
            .map(|identities| identities.iter().map(|id| self.key_of(id)).collect())
            .collect();
        // Round 1: the current value of every distinct key: the cache, the read-ahead, then
        // concurrently a create for each uncached key that mints its event's customer (see
        // `create_first`), a read for every other one.
        let mut learnt = self.learn_from_cache(&identities, &keys);
        self.learn_from_read_ahead(&keys, &mut learnt);
        self.probe_missed(&keys, &mut learnt, may_create).await?;
        // Round 2: the records of the customers found, to the ends of their merge chains.
        self.load_records(&mut learnt).await?;
        // Round 3: plan, in order, as if every create wins.
        let mut plans = plan(&self.rules, &self.counters, events, &keys, &mut learnt);
        // Round 4: the planned creates and record writes, concurrently.
        let aliases = std::mem::take(&mut learnt.aliases);
        let (outcomes, (), ()) = futures::try_join!(
            self.create_planned(&identities, &plans, may_create),
            self.write_records(&mut learnt, may_create),
            self.create_aliases(aliases, may_create),
        )?;
        self.settle(events, &mut plans, &outcomes, may_create).await
    }

    /// Round 2: the record of every customer found, and of every customer a record's
    /// `merged_into` names, until the chains end (a few rounds of concurrent reads).
    async fn load_records(&self, learnt: &mut Learnt) -> Result<(), DirectoryError> {
        let mut wanted: Vec<String> = learnt
            .known
            .values()
            .flatten()
            .filter(|id| !learnt.records.contains_key(*id))
            .cloned()
            .collect::<HashSet<String>>()
            .into_iter()
            .collect();
        for _ in 0..CHAIN_MAX {
            if wanted.is_empty() {
                return Ok(());
            }
            let found: Vec<(String, Option<(CustomerRecord, u64)>)> =
                futures::stream::iter(wanted.into_iter().map(|id| async move {
                    let record = self.record(&id).await?;
                    Ok::<_, DirectoryError>((id, record))
                }))
                .buffer_unordered(KV_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
            let mut next = HashSet::new();
            for (id, record) in found {
                let slot = match record {
                    Some((record, revision)) => Slot {
                        record,
                        revision: Some(revision),
                        dirty: false,
                    },
                    None => Slot::default(),
                };
                if let Some(into) = &slot.record.merged_into {
                    if !learnt.records.contains_key(into) {
                        next.insert(into.clone());
                    }
                }
                learnt.records.insert(id, slot);
            }
            next.retain(|id| !learnt.records.contains_key(id));
            wanted = next.into_iter().collect();
        }
        // A chain this long is a cycle: the events on it fail alone (`Learnt::root`).
        Ok(())
    }

    /// Round 4c: the current form of identifiers found only under their legacy form,
    /// mapped to the same customer (a create lost to another writer is as good).
    async fn create_aliases(
        &self,
        aliases: Vec<(IdentityKind, String, String)>,
        may_create: MayCreate<'_>,
    ) -> Result<(), DirectoryError> {
        futures::stream::iter(aliases.into_iter().map(|(kind, key, customer)| async move {
            self.create(kind, &key, &customer, may_create)
                .await
                .map(|_| ())
        }))
        .buffer_unordered(KV_IN_FLIGHT_MAX)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
    }

    /// Round 4b: every record the plan changed, concurrently; those of customers merged
    /// away last, once the others (their survivors' included) are stored: a merge that
    /// stops half-way leaves the survivor counting the merged customer's identifiers (a
    /// routing again of the event finds the merge undecided and decides it again), never a
    /// merged customer whose survivor does not count them.
    async fn write_records(
        &self,
        learnt: &mut Learnt,
        may_create: MayCreate<'_>,
    ) -> Result<(), DirectoryError> {
        let dirty: Vec<(String, CustomerRecord, Option<u64>)> = learnt
            .records
            .iter_mut()
            .filter(|(_, slot)| slot.dirty)
            .map(|(id, slot)| {
                slot.dirty = false;
                (id.clone(), slot.record.clone(), slot.revision)
            })
            .collect();
        let (merged, others): (Vec<_>, Vec<_>) = dirty
            .into_iter()
            .partition(|(_, record, _)| record.merged_into.is_some());
        for wave in [others, merged] {
            futures::stream::iter(wave.into_iter().map(|(id, record, revision)| async move {
                self.write_record(&id, record, revision, may_create).await
            }))
            .buffer_unordered(KV_IN_FLIGHT_MAX)
            .try_collect::<Vec<()>>()
            .await?;
        }
        Ok(())
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
                if let Some(legacy) = identity.legacy_form() {
                    learnt.legacy.insert(key.clone(), self.key_of(&legacy));
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
        let legacy = &learnt.legacy;
        learnt.missed.retain(|(_, key, _)| {
            let Some(hint) = answers.remove(key) else {
                return true;
            };
            // "Absent" is not the whole answer for a key with a legacy form.
            if hint.found.is_none() && legacy.contains_key(key) {
                return true;
            }
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
        let legacy = &learnt.legacy;
        let probes = std::mem::take(&mut learnt.missed)
            .into_iter()
            .map(|(kind, key, event)| {
                // A key with a legacy form is never created blind: its customer may be
                // stored under the legacy form.
                let legacy_key = legacy.get(&key).cloned();
                let value = create_first(&keys[event], &key).filter(|_| legacy_key.is_none());
                async move {
                    let mut alias = None;
                    let probe = match value {
                        Some(value) => {
                            self.create(kind, &key, &value, may_create)
                                .await
                                .map(|created| match created {
                                    Created::Won => Probe::Created,
                                    Created::Lost(stored) => Probe::Found(Some(stored)),
                                })
                        }
                        None => match self.read(kind, &key).await {
                            Ok(None) if legacy_key.is_some() => {
                                let legacy_key = legacy_key.unwrap_or_default();
                                self.read(kind, &legacy_key).await.map(|found| {
                                    alias = found.clone();
                                    Probe::Found(found)
                                })
                            }
                            read => read.map(Probe::Found),
                        },
                    };
                    match probe {
                        Ok(probe) => Ok((kind, key, probe, alias)),
                        Err(error @ DirectoryError::CorruptValue { .. }) => {
                            Ok((kind, key, Probe::Corrupt(error), None))
                        }
                        Err(error) => Err(error),
                    }
                }
            });
        let probes: Vec<(IdentityKind, String, Probe, Option<String>)> =
            futures::stream::iter(probes)
                .buffer_unordered(KV_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
        let mut cache = self.lock_cache();
        for (kind, key, probe, alias) in probes {
            if let Some(customer_id) = alias {
                learnt.aliases.push((kind, key.clone(), customer_id));
            }
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
        events: &[EventIdentities<'_>],
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
                    let primary = events[*event].identities[0].kind;
                    plan.resolution.linked.retain(|kind| *kind != primary);
                }
            }
        }
        let mut results = Vec::with_capacity(events.len());
        for (event, plan) in std::mem::take(plans).into_iter().enumerate() {
            if first_lost.is_some_and(|lost| event >= lost) {
                match self.resolve_guarded(events[event], may_create).await {
                    Err(error) if error.is_transient() => return Err(error),
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

/// Round 3: each event's resolution, in order, against what was learnt, as if every create
/// wins: an event sees the mappings and merges the events before it plan (they go into
/// `known` and the records). See [`IdentityDirectory::resolve_events`] for the rules.
fn plan(
    rules: &IdentityRules,
    counters: &Counters,
    events: &[EventIdentities<'_>],
    keys: &[Vec<String>],
    learnt: &mut Learnt,
) -> Vec<Result<Plan, DirectoryError>> {
    let mut plans = Vec::with_capacity(events.len());
    for (event, keys) in events.iter().zip(keys) {
        let identities = event.identities;
        if identities.is_empty() {
            plans.push(Err(DirectoryError::NoIdentity));
            continue;
        }
        if let Some(error) = keys.iter().find_map(|key| learnt.corrupt.get(key)) {
            plans.push(Err(error.clone()));
            continue;
        }
        plans.push(plan_event(rules, counters, event, keys, learnt));
    }
    plans
}

/// One event's plan (see [`plan`]).
fn plan_event(
    rules: &IdentityRules,
    counters: &Counters,
    event: &EventIdentities<'_>,
    keys: &[String],
    learnt: &mut Learnt,
) -> Result<Plan, DirectoryError> {
    let identities = event.identities;
    let found: Vec<Option<String>> = keys.iter().map(|k| learnt.known[k].clone()).collect();
    let mut roots: Vec<Option<String>> = Vec::with_capacity(found.len());
    for customer in &found {
        roots.push(match customer {
            Some(customer) => Some(learnt.root(customer, event.ingest_seq)?),
            None => None,
        });
    }
    let first_known = roots.iter().position(Option::is_some);
    let (winner, created) = match first_known {
        Some(index) => (roots[index].clone().unwrap_or_default(), false),
        None => (format!("c{}", &keys[0][..CUSTOMER_ID_HEX_CHARS]), true),
    };
    let mut resolution = Resolution {
        customer_id: winner.clone(),
        created,
        linked: Vec::new(),
        conflicts: Vec::new(),
        notes: Vec::new(),
        merges: Vec::new(),
        merge_outs: Vec::new(),
    };
    rewrite_recorded_merges(event, &found, &winner, learnt, &mut resolution);

    // Every other customer the event's identifiers belong to: merged, or its identifiers
    // noted and dropped.
    let day = day_of(event.at_ms);
    let mut others: Vec<String> = Vec::new();
    for root in roots.iter().flatten() {
        if *root != winner && !others.contains(root) {
            others.push(root.clone());
        }
    }
    let winner_kind = first_known.map(|index| identities[index].kind);
    for other in others {
        let held: Vec<usize> = (0..identities.len())
            .filter(|i| roots[*i].as_deref() == Some(other.as_str()))
            .collect();
        let survivor = learnt.record(&winner);
        let merged = learnt.record(&other);
        let may_merge = winner_kind.is_some_and(|kind| rules.kind(kind).merge)
            && held.iter().any(|i| rules.kind(identities[*i].kind).merge);
        let limit = rules.merges_max_per_day as usize;
        let refusal = if !may_merge {
            Some(NoteReason::MergeDisabled)
        } else if survivor.merges_on(day) + merged.merges_on(day)
            // A merge that stopped half-way counted this customer already.
            - usize::from(survivor.merges.get(&other) == Some(&day))
            >= limit
        {
            Some(NoteReason::MergesPerDay {
                limit: rules.merges_max_per_day,
            })
        } else {
            IdentityKind::ALL
                .into_iter()
                .find(|kind| {
                    survivor.united_count(&merged, *kind)
                        > rules.kind(*kind).max_per_customer as usize
                })
                .map(|kind| NoteReason::MaxPerCustomer {
                    kind,
                    limit: rules.kind(kind).max_per_customer,
                })
        };
        match refusal {
            Some(reason) => {
                counters.merges_refused.fetch_add(1, Ordering::Relaxed);
                for index in held {
                    resolution.notes.push(IdentityNote {
                        kind: identities[index].kind,
                        other_customer_id: Some(other.clone()),
                        reason,
                    });
                    resolution
                        .conflicts
                        .push((identities[index].kind, other.clone()));
                }
            }
            None => {
                counters.merges.fetch_add(1, Ordering::Relaxed);
                let survivor_slot = learnt.slot(&winner);
                survivor_slot.record.absorb(&other, &merged, day);
                survivor_slot.dirty = true;
                let merged_slot = learnt.slot(&other);
                merged_slot.record.merged_into = Some(winner.clone());
                merged_slot.record.merge_cause = Some(event.event_id.to_string());
                merged_slot.record.merge_seq = Some(event.ingest_seq);
                merged_slot.dirty = true;
                let merge = MergeRef {
                    merged_id: other.clone(),
                    survivor_id: winner.clone(),
                    cause_event_id: event.event_id.to_string(),
                    at_ms: event.at_ms,
                };
                resolution.merges.push(merge.clone());
                resolution.merge_outs.push(merge);
            }
        }
    }

    // The identifiers: known ones of the winner recorded (a record from before records
    // learns them), unknown ones linked while the customer has room for their kind.
    let mut creates = Vec::new();
    for (index, (identity, customer)) in identities.iter().zip(&found).enumerate() {
        let key = &keys[index];
        let kind = identity.kind;
        match customer {
            Some(customer) => {
                if learnt.root(customer, event.ingest_seq)? == winner {
                    let slot = learnt.slot(&winner);
                    if slot.record.add(kind, key) {
                        slot.dirty = true;
                    }
                }
            }
            None => {
                let slot = learnt.slot(&winner);
                let max = rules.kind(kind).max_per_customer as usize;
                let primary = index == 0 && created;
                if !primary && slot.record.count(kind) >= max && !slot.record.holds(kind, key) {
                    counters.identifiers_refused.fetch_add(1, Ordering::Relaxed);
                    resolution.notes.push(IdentityNote {
                        kind,
                        other_customer_id: None,
                        reason: NoteReason::MaxPerCustomer {
                            kind,
                            limit: rules.kind(kind).max_per_customer,
                        },
                    });
                    continue;
                }
                slot.record.add(kind, key);
                slot.dirty = true;
                resolution.linked.push(kind);
                learnt.known.insert(key.clone(), Some(winner.clone()));
                if !learnt.created_first.contains(key) {
                    creates.push((index, key.clone(), winner.clone()));
                }
            }
        }
    }
    Ok(Plan {
        resolution,
        creates,
    })
}

/// The merges an earlier routing of this same event recorded (a record's `merge_cause` is
/// the event's id): written again, so that a routing that stopped after writing the
/// records but before the shard logs took the merge still completes it. Applying a merge
/// twice changes nothing (the actors recognise it).
fn rewrite_recorded_merges(
    event: &EventIdentities<'_>,
    found: &[Option<String>],
    winner: &str,
    learnt: &Learnt,
    resolution: &mut Resolution,
) {
    if event.event_id.is_empty() {
        return;
    }
    for start in found.iter().flatten() {
        let mut at = start.as_str();
        for _ in 0..CHAIN_MAX {
            let Some(slot) = learnt.records.get(at) else {
                break;
            };
            let Some(next) = slot.record.merged_into.as_deref() else {
                break;
            };
            if slot.record.merge_cause.as_deref() == Some(event.event_id) {
                let merge = MergeRef {
                    merged_id: at.to_string(),
                    survivor_id: next.to_string(),
                    cause_event_id: event.event_id.to_string(),
                    at_ms: event.at_ms,
                };
                if next == winner && !resolution.merges.contains(&merge) {
                    resolution.merges.push(merge.clone());
                }
                if !resolution.merge_outs.contains(&merge) {
                    resolution.merge_outs.push(merge);
                }
            }
            at = next;
        }
    }
}
