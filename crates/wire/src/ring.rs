//! The ring: xxh3-64 of a key, and the 64-bit hash space cut into contiguous ranges.

/// The position of `key` on the ring.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Cuts the hash space into `shards` contiguous ranges `[start, end)` of equal width.
///
/// The last range ends at `u64::MAX`, which it includes (see [`crate::ShardDesc::contains`]).
/// `shards` must be a power of two so every range has the same width.
pub fn split_ring(shards: u64) -> Vec<(u64, u64)> {
    assert!(shards.is_power_of_two(), "shard count must be a power of two");
    let width: u128 = (1u128 << 64) / shards as u128;
    (0..shards as u128)
        .map(|i| {
            let start = (i * width) as u64;
            let end = if i + 1 == shards as u128 { u64::MAX } else { ((i + 1) * width) as u64 };
            (start, end)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_contiguous_and_cover_the_space() {
        for n in [1u64, 2, 64, 1024] {
            let r = split_ring(n);
            assert_eq!(r.len() as u64, n);
            assert_eq!(r[0].0, 0);
            assert_eq!(r.last().map(|x| x.1), Some(u64::MAX));
            for w in r.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }

    #[test]
    fn hash_is_xxh3() {
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
    }
}
