//! The shard assignment (which node should own each shard) and how the coordinator plans it.
//!
//! The coordinator writes one JSON value, `crm_cluster` key `assignment`:
//! `{"version": n, "owners": ["node-1", "node-2", null, ...]}` (index = shard). Nodes act on
//! it: a node takes the shards assigned to it and hands off the ones that are not. The plan
//! ([`plan`]) is a pure function, so its balance and move limit are unit-tested.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The assignment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Assignment {
    pub version: u64,
    /// Desired owner of each shard (`None`: nobody yet).
    pub owners: Vec<Option<String>>,
}

impl Assignment {
    /// The desired owner of `shard`.
    pub fn owner(&self, shard: u32) -> Option<&str> {
        self.owners.get(shard as usize).and_then(|o| o.as_deref())
    }
}

/// The next assignment of `shards` shards.
///
/// - A shard whose owner is not eligible (dead, draining, gone) goes to the eligible node
///   with the fewest shards, at once: a dead node's shards are never held back.
/// - Then, while fewer than `max_moves` shards are moving (assigned to a node that does not
///   hold its lease yet: `settled(shard)` is false), one settled shard moves from the node
///   with the most shards to the one with the fewest, until their counts differ by at most
///   one. Ties go to the smaller node id, so every coordinator plans alike.
///
/// With no eligible node the current assignment is kept.
pub fn plan(
    current: &[Option<String>],
    shards: u32,
    eligible: &[String],
    settled: impl Fn(u32) -> bool,
    max_moves: u32,
) -> Vec<Option<String>> {
    let mut owners: Vec<Option<String>> = (0..shards as usize)
        .map(|s| current.get(s).cloned().flatten())
        .collect();
    if eligible.is_empty() {
        return owners;
    }
    let mut counts: BTreeMap<&str, usize> = eligible.iter().map(|n| (n.as_str(), 0)).collect();
    for owner in owners.iter_mut() {
        match owner.as_deref().and_then(|o| counts.get_mut(o)) {
            Some(count) => *count += 1,
            None => *owner = None,
        }
    }
    let fewest = |counts: &BTreeMap<&str, usize>| {
        counts
            .iter()
            .min_by_key(|(node, count)| (**count, **node))
            .map(|(node, _)| node.to_string())
    };
    for owner in owners.iter_mut().filter(|o| o.is_none()) {
        let node = fewest(&counts).expect("eligible is not empty");
        *counts.get_mut(node.as_str()).expect("counted") += 1;
        *owner = Some(node);
    }
    let mut moving = (0..shards)
        .filter(|&s| {
            let unchanged = current.get(s as usize).cloned().flatten() == owners[s as usize];
            unchanged && !settled(s)
        })
        .count() as u32;
    while moving < max_moves {
        let most = counts
            .iter()
            .max_by_key(|(node, count)| (**count, std::cmp::Reverse(**node)))
            .map(|(node, count)| (node.to_string(), *count));
        let least = fewest(&counts);
        let (Some((most, most_count)), Some(least)) = (most, least) else {
            break;
        };
        if most_count <= counts[least.as_str()] + 1 {
            break;
        }
        // The highest-numbered settled shard of the busiest node moves.
        let Some(shard) = (0..shards).rev().find(|&s| {
            owners[s as usize].as_deref() == Some(most.as_str())
                && current.get(s as usize).cloned().flatten().as_deref() == Some(most.as_str())
                && settled(s)
        }) else {
            break;
        };
        owners[shard as usize] = Some(least.clone());
        *counts.get_mut(most.as_str()).expect("counted") -= 1;
        *counts.get_mut(least.as_str()).expect("counted") += 1;
        moving += 1;
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn count(owners: &[Option<String>], node: &str) -> usize {
        owners.iter().filter(|o| o.as_deref() == Some(node)).count()
    }

    #[test]
    fn a_first_node_gets_every_shard_at_once() {
        let owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2);
        assert_eq!(count(&owners, "a"), 8);
    }

    #[test]
    fn a_joining_node_receives_shards_a_few_at_a_time_until_balanced() {
        let mut owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2);
        let eligible = nodes(&["a", "b"]);
        let mut rounds = 0;
        loop {
            // Every move of the previous round has completed.
            let next = plan(&owners, 8, &eligible, |_| true, 2);
            let moved = (0..8).filter(|&s| next[s] != owners[s]).count();
            assert!(moved <= 2, "at most 2 moves per round, got {moved}");
            if next == owners {
                break;
            }
            owners = next;
            rounds += 1;
        }
        assert_eq!(rounds, 2);
        assert_eq!((count(&owners, "a"), count(&owners, "b")), (4, 4));
    }

    #[test]
    fn moves_in_flight_count_against_the_limit() {
        let owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2);
        let first = plan(&owners, 8, &nodes(&["a", "b"]), |_| true, 2);
        // Nothing settled yet: no new move starts.
        let moving: Vec<u32> = (0..8u32)
            .filter(|&s| first[s as usize] != owners[s as usize])
            .collect();
        let again = plan(&first, 8, &nodes(&["a", "b"]), |s| !moving.contains(&s), 2);
        assert_eq!(again, first);
    }

    #[test]
    fn a_dead_or_draining_nodes_shards_are_spread_over_the_others_at_once() {
        let start = plan(&[], 9, &nodes(&["a", "b", "c"]), |_| true, 1);
        assert_eq!(count(&start, "a"), 3);
        // c is gone: its three shards move in one round whatever the move limit.
        let next = plan(&start, 9, &nodes(&["a", "b"]), |_| true, 1);
        assert_eq!(count(&next, "c"), 0);
        assert!(count(&next, "a") >= 4 && count(&next, "b") >= 4, "{next:?}");
        // Shards of live nodes did not move.
        for s in 0..9 {
            if start[s].as_deref() != Some("c") {
                assert_eq!(next[s], start[s]);
            }
        }
    }

    #[test]
    fn with_no_eligible_node_the_assignment_stays() {
        let start = plan(&[], 4, &nodes(&["a"]), |_| true, 1);
        assert_eq!(plan(&start, 4, &[], |_| true, 1), start);
    }
}
