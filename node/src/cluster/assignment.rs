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

/// What the coordinator knows of the shards' load.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Applied commands per second of each shard, as its owner reported it (absent:
    /// unknown, counted as 0).
    pub per_shard: BTreeMap<u32, f64>,
    /// Whether shards may move for load alone (the assignment has been stable long enough
    /// for every owner to have measured its shards).
    pub moves_allowed: bool,
}

/// Least gap between the most and the least loaded node, in commands per second, for a
/// move for load alone; also at least half the mean node load.
pub const LOAD_GAP_MIN: f64 = 10.0;

/// The next assignment of `shards` shards.
///
/// - A shard whose owner is not eligible (dead, draining, gone) goes to the eligible node
///   with the fewest shards (of those, the least loaded), at once: a dead node's shards
///   are never held back.
/// - Then, while fewer than `max_moves` shards are moving (assigned to a node that does not
///   hold its lease yet: `settled(shard)` is false), one settled shard moves from the node
///   with the most shards to the one with the fewest, until their counts differ by at most
///   one; of the busiest node's shards, the one that best evens the two nodes' loads.
/// - Then, when `load.moves_allowed`, shards move for load alone, counts still within one:
///   from the most loaded node to the least loaded one when it has more shards than that
///   one, the gap between them is over [`LOAD_GAP_MIN`] and half the mean node load, and
///   the move shrinks the gap by at least as much (so moves never go back and forth).
///
/// Ties go to the smaller node id and the higher shard, so every coordinator plans alike.
/// With no eligible node the current assignment is kept.
pub fn plan(
    current: &[Option<String>],
    shards: u32,
    eligible: &[String],
    settled: impl Fn(u32) -> bool,
    max_moves: u32,
    load: &Load,
) -> Vec<Option<String>> {
    let mut owners: Vec<Option<String>> = (0..shards as usize)
        .map(|s| current.get(s).cloned().flatten())
        .collect();
    if eligible.is_empty() {
        return owners;
    }
    let shard_load = |shard: u32| load.per_shard.get(&shard).copied().unwrap_or(0.0).max(0.0);
    // Per node: (shards, load).
    let mut nodes: BTreeMap<&str, (usize, f64)> =
        eligible.iter().map(|n| (n.as_str(), (0, 0.0))).collect();
    for (shard, owner) in owners.iter_mut().enumerate() {
        match owner.as_deref().and_then(|o| nodes.get_mut(o)) {
            Some((count, node_load)) => {
                *count += 1;
                *node_load += shard_load(shard as u32);
            }
            None => *owner = None,
        }
    }
    let fewest = |nodes: &BTreeMap<&str, (usize, f64)>| {
        nodes
            .iter()
            .min_by(|(a, (ca, la)), (b, (cb, lb))| ca.cmp(cb).then(la.total_cmp(lb)).then(a.cmp(b)))
            .map(|(node, _)| node.to_string())
            .expect("eligible is not empty")
    };
    let assign =
        |nodes: &mut BTreeMap<&str, (usize, f64)>, shard: u32, from: Option<&str>, to: &str| {
            if let Some((count, node_load)) = from.and_then(|f| nodes.get_mut(f)) {
                *count -= 1;
                *node_load -= shard_load(shard);
            }
            let (count, node_load) = nodes.get_mut(to).expect("eligible");
            *count += 1;
            *node_load += shard_load(shard);
        };
    for shard in 0..shards {
        if owners[shard as usize].is_none() {
            let node = fewest(&nodes);
            assign(&mut nodes, shard, None, &node);
            owners[shard as usize] = Some(node);
        }
    }
    let mut moving = (0..shards)
        .filter(|&s| {
            let unchanged = current.get(s as usize).cloned().flatten() == owners[s as usize];
            unchanged && !settled(s)
        })
        .count() as u32;
    // The settled shard of `from` whose move to `to` leaves their loads closest, if any
    // (ties: the higher shard).
    let best_shard =
        |owners: &[Option<String>], nodes: &BTreeMap<&str, (usize, f64)>, from: &str, to: &str| {
            let (from_load, to_load) = (nodes[from].1, nodes[to].1);
            (0..shards)
                .rev()
                .filter(|&s| {
                    owners[s as usize].as_deref() == Some(from)
                        && current.get(s as usize).cloned().flatten().as_deref() == Some(from)
                        && settled(s)
                })
                .map(|s| {
                    let l = shard_load(s);
                    (s, ((from_load - l) - (to_load + l)).abs())
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
        };
    while moving < max_moves {
        let most = nodes
            .iter()
            .max_by(|(a, (ca, la)), (b, (cb, lb))| ca.cmp(cb).then(la.total_cmp(lb)).then(b.cmp(a)))
            .map(|(node, (count, _))| (node.to_string(), *count))
            .expect("eligible is not empty");
        let least = fewest(&nodes);
        if most.1 <= nodes[least.as_str()].0 + 1 {
            break;
        }
        let Some((shard, _)) = best_shard(&owners, &nodes, &most.0, &least) else {
            break;
        };
        assign(&mut nodes, shard, Some(&most.0), &least);
        owners[shard as usize] = Some(least);
        moving += 1;
    }
    // Not in a plan that reassigned or rebalanced anything: those shards' loads are not
    // measured on their new owners yet.
    let reassigned =
        current.len() != owners.len() || owners.iter().zip(current).any(|(new, old)| new != old);
    if load.moves_allowed && !reassigned && nodes.len() > 1 {
        let mean = nodes.values().map(|(_, l)| l).sum::<f64>() / nodes.len() as f64;
        let threshold = LOAD_GAP_MIN.max(mean / 2.0);
        while moving < max_moves {
            let by_load = |a: &(&&str, &(usize, f64)), b: &(&&str, &(usize, f64))| {
                a.1 .1.total_cmp(&b.1 .1).then(b.0.cmp(a.0))
            };
            let (heavy, (heavy_count, heavy_load)) = nodes
                .iter()
                .max_by(by_load)
                .map(|(n, v)| (n.to_string(), *v))
                .expect("nodes");
            let (light, (light_count, light_load)) = nodes
                .iter()
                .min_by(by_load)
                .map(|(n, v)| (n.to_string(), *v))
                .expect("nodes");
            let gap = heavy_load - light_load;
            if heavy == light || heavy_count <= light_count || gap <= threshold {
                break;
            }
            let Some((shard, new_gap)) = best_shard(&owners, &nodes, &heavy, &light) else {
                break;
            };
            if gap - new_gap < threshold {
                break;
            }
            assign(&mut nodes, shard, Some(&heavy), &light);
            owners[shard as usize] = Some(light);
            moving += 1;
        }
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
        let owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2, &Load::default());
        assert_eq!(count(&owners, "a"), 8);
    }

    #[test]
    fn a_joining_node_receives_shards_a_few_at_a_time_until_balanced() {
        let mut owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2, &Load::default());
        let eligible = nodes(&["a", "b"]);
        let mut rounds = 0;
        loop {
            // Every move of the previous round has completed.
            let next = plan(&owners, 8, &eligible, |_| true, 2, &Load::default());
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
        let owners = plan(&[], 8, &nodes(&["a"]), |_| true, 2, &Load::default());
        let first = plan(
            &owners,
            8,
            &nodes(&["a", "b"]),
            |_| true,
            2,
            &Load::default(),
        );
        // Nothing settled yet: no new move starts.
        let moving: Vec<u32> = (0..8u32)
            .filter(|&s| first[s as usize] != owners[s as usize])
            .collect();
        let again = plan(
            &first,
            8,
            &nodes(&["a", "b"]),
            |s| !moving.contains(&s),
            2,
            &Load::default(),
        );
        assert_eq!(again, first);
    }

    #[test]
    fn a_dead_or_draining_nodes_shards_are_spread_over_the_others_at_once() {
        let start = plan(
            &[],
            9,
            &nodes(&["a", "b", "c"]),
            |_| true,
            1,
            &Load::default(),
        );
        assert_eq!(count(&start, "a"), 3);
        // c is gone: its three shards move in one round whatever the move limit.
        let next = plan(
            &start,
            9,
            &nodes(&["a", "b"]),
            |_| true,
            1,
            &Load::default(),
        );
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
        let start = plan(&[], 4, &nodes(&["a"]), |_| true, 1, &Load::default());
        assert_eq!(plan(&start, 4, &[], |_| true, 1, &Load::default()), start);
    }

    fn owned(names: &[&str]) -> Vec<Option<String>> {
        names.iter().map(|n| Some(n.to_string())).collect()
    }

    fn node_load(owners: &[Option<String>], load: &Load, node: &str) -> f64 {
        (0..owners.len() as u32)
            .filter(|&s| owners[s as usize].as_deref() == Some(node))
            .map(|s| load.per_shard.get(&s).copied().unwrap_or(0.0))
            .sum()
    }

    fn load(per_shard: &[(u32, f64)], moves_allowed: bool) -> Load {
        Load {
            per_shard: per_shard.iter().copied().collect(),
            moves_allowed,
        }
    }

    #[test]
    fn a_dead_nodes_shards_go_to_the_less_loaded_of_equally_sized_nodes() {
        // c died; a and b own two shards each, a's are busier.
        let current = owned(&["a", "a", "b", "b", "c"]);
        let busy = load(&[(0, 500.0), (1, 400.0), (2, 10.0), (3, 20.0)], false);
        let owners = plan(&current, 5, &nodes(&["a", "b"]), |_| true, 4, &busy);
        assert_eq!(owners[4].as_deref(), Some("b"));
    }

    #[test]
    fn a_count_move_takes_the_shard_that_evens_the_loads() {
        // a: 4 shards, b: 1 shard with a heavy load; one of a's moves to b.
        let current = owned(&["a", "a", "a", "a", "b"]);
        let loads = load(
            &[(0, 300.0), (1, 10.0), (2, 200.0), (3, 20.0), (4, 400.0)],
            false,
        );
        let owners = plan(&current, 5, &nodes(&["a", "b"]), |_| true, 1, &loads);
        assert_eq!(count(&owners, "a"), 3);
        // a 530, b 400: moving shard 3 (20) leaves 510 / 420, the closest of a's shards.
        assert_eq!(owners[3].as_deref(), Some("b"));
    }

    #[test]
    fn shards_move_for_load_only_when_allowed_and_never_back_and_forth() {
        // Counts 3 / 2 are balanced; a carries nearly everything.
        let current = owned(&["a", "a", "a", "b", "b"]);
        let per_shard = [(0, 900.0), (1, 100.0), (2, 50.0), (3, 5.0), (4, 5.0)];
        let unsettled = load(&per_shard, false);
        assert_eq!(
            plan(&current, 5, &nodes(&["a", "b"]), |_| true, 4, &unsettled),
            current,
            "no move for load while the assignment is fresh"
        );
        let settled = load(&per_shard, true);
        let once = plan(&current, 5, &nodes(&["a", "b"]), |_| true, 4, &settled);
        assert_eq!(count(&once, "a"), 2, "counts stay within one");
        let gap = |owners: &[Option<String>]| {
            (node_load(owners, &settled, "a") - node_load(owners, &settled, "b")).abs()
        };
        assert!(gap(&once) < gap(&current), "{once:?}");
        // Planned again with the same loads, nothing moves (no oscillation).
        let twice = plan(&once, 5, &nodes(&["a", "b"]), |_| true, 4, &settled);
        assert_eq!(twice, once);
        // Small differences never move shards.
        let quiet = load(&[(0, 12.0), (1, 10.0), (2, 8.0), (3, 15.0), (4, 5.0)], true);
        assert_eq!(
            plan(&current, 5, &nodes(&["a", "b"]), |_| true, 4, &quiet),
            current
        );
    }

    #[test]
    fn without_load_reports_plans_are_by_count_alone() {
        let current = owned(&["a", "a", "a", "a", "b"]);
        let by_count = plan(
            &current,
            5,
            &nodes(&["a", "b"]),
            |_| true,
            4,
            &Load::default(),
        );
        let with_idle_load = plan(
            &current,
            5,
            &nodes(&["a", "b"]),
            |_| true,
            4,
            &load(&[], true),
        );
        assert_eq!(by_count, with_idle_load);
        assert_eq!(count(&by_count, "a"), 3);
        assert_eq!(
            by_count[3].as_deref(),
            Some("b"),
            "the highest settled shard moves"
        );
    }

    #[test]
    fn no_load_moves_in_a_plan_that_reassigns_shards() {
        // c died: its shard goes to b; a's heavy load waits for a later plan.
        let current = owned(&["a", "a", "a", "b", "c"]);
        let loads = load(&[(0, 900.0), (1, 100.0), (2, 50.0), (3, 5.0)], true);
        let owners = plan(&current, 5, &nodes(&["a", "b"]), |_| true, 4, &loads);
        assert_eq!(owners, owned(&["a", "a", "a", "b", "b"]));
    }
}
