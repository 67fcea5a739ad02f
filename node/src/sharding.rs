//! Which shard a customer lives in: a stable hash of the customer id modulo the shard count.
//!
//! The hash (FNV-1a, 64 bit) must never change: every stored shard log and sled store is laid
//! out by it. The shard count is fixed per cluster and recorded in the cluster metadata.

use crate::fnv::fnv1a64;

/// Shard of `customer_id` among `shards` shards.
pub fn shard_of(customer_id: &str, shards: u32) -> u32 {
    debug_assert!(shards > 0);
    (fnv1a64(customer_id.as_bytes()) % u64::from(shards.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_of_a_customer_never_changes() {
        // Pinned values: changing the hash would scatter every stored customer.
        assert_eq!(
            shard_of("c0123456789abcdef01234567", 64),
            shard_of("c0123456789abcdef01234567", 64)
        );
        assert_eq!(shard_of("", 64), (0xcbf2_9ce4_8422_2325u64 % 64) as u32);
        assert_eq!(shard_of("a", 1), 0);
    }

    #[test]
    fn pinned_shards_of_known_ids() {
        // FNV-1a 64 of the id, modulo the shard count (computed independently):
        // "" 0xcbf29ce484222325, "a" 0xaf63dc4c8601ec8c, "foobar" 0x85944171f73967e8,
        // "c0123456789abcdef01234567" 0xb48b4b782753cbba.
        let pinned = [
            ("", [37, 5, 2]),
            ("a", [12, 12, 5]),
            ("foobar", [40, 8, 6]),
            ("c0123456789abcdef01234567", [58, 10, 4]),
        ];
        for (id, [of_64, of_16, of_7]) in pinned {
            assert_eq!(shard_of(id, 64), of_64, "{id:?} of 64");
            assert_eq!(shard_of(id, 16), of_16, "{id:?} of 16");
            assert_eq!(shard_of(id, 7), of_7, "{id:?} of 7");
        }
    }

    #[test]
    fn customers_spread_over_all_shards() {
        let mut seen = [0u32; 16];
        for i in 0..16_000 {
            seen[shard_of(&format!("c{i:024x}"), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700 && n < 1300), "{seen:?}");
    }
}
