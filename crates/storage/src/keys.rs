//! Key layout of the one RocksDB a node keeps for all its groups.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log` | `group ++ index` (both u64 BE) | postcard(entry) |
//! | `raft_state` | `group ++ tag` | vote, committed, last purged log id |
//! | `apply_state` | `group ++ tag` | applied log id, membership, placement map |
//! | `data` | `xxh3(key) BE ++ key` | value |
//! | `meta` | name | node-wide facts (cluster id, last known map) |
//!
//! **Architecture invariant:** column families are per role, never per group, and a shard's
//! data is one contiguous range of `data`, so a snapshot is a range scan and dropping a replica
//! is a range delete.

use ringkv_wire::GroupId;

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_APPLY_STATE: &str = "apply_state";
pub const CF_DATA: &str = "data";
pub const CF_META: &str = "meta";
pub const ALL_CFS: [&str; 5] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_APPLY_STATE, CF_DATA, CF_META];

pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The index in a `raft_log` key.
pub fn log_key_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(8..16)?.try_into().ok()?))
}

pub fn group_tag_key(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// The group of a `group ++ …` key.
pub fn key_group(key: &[u8]) -> Option<GroupId> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

pub const TAG_VOTE: u8 = 1;
pub const TAG_COMMITTED: u8 = 2;
pub const TAG_PURGED: u8 = 3;
/// Marks that a group has a replica here, with its kind; written when the replica is created.
pub const TAG_REPLICA: u8 = 4;
/// Written when a replica is removed: the shard's `conf_ver` at removal. A map no newer than
/// that never brings the replica back.
pub const TAG_TOMBSTONE: u8 = 6;

pub const TAG_APPLIED: u8 = 1;
pub const TAG_MEMBERSHIP: u8 = 2;
pub const TAG_PLACEMENT_MAP: u8 = 3;
pub const TAG_SNAPSHOT_META: u8 = 4;
/// Client sessions, under `group ++ TAG_SESSION ++ client`:
/// - `... ++ client ++ 1` (18 bytes): the client's row, [`session_row_key`]: the sequence
///   numbers whose answers are kept, with each small answer itself, and the floor below which
///   the client retries nothing any more;
/// - `... ++ client ++ seq` (25 bytes): an answer too large for the row, [`session_answer_key`];
/// - `... ++ client` (17 bytes, [`session_key`]): a row of the earlier format, which kept every
///   answer apart; read, and replaced by the client's next write.
///
/// Acknowledged answers are forgotten by point deletes of exactly the keys the row lists, never
/// by a range deletion: range tombstones in the memtable make every later read of the column
/// family re-sort them all (that cost 9x in write throughput once).
pub const TAG_SESSION: u8 = 5;
/// A snapshot install in progress: the SST files to ingest and the snapshot's meta. Present
/// only between clearing a shard's old state and recording the new applied index, so a crash
/// in between finishes the install on restart.
pub const TAG_INSTALLING: u8 = 6;

pub fn session_key(group: GroupId, client: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&group_tag_key(group, TAG_SESSION));
    k[9..17].copy_from_slice(&client.to_be_bytes());
    k
}

/// The row of `client`'s session in `group` (see [`TAG_SESSION`]).
pub fn session_row_key(group: GroupId, client: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..17].copy_from_slice(&session_key(group, client));
    k[17] = 1;
    k
}

pub fn session_answer_key(group: GroupId, client: u64, seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&session_key(group, client));
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub const META_CLUSTER_ID: &[u8] = b"cluster_id";
pub const META_MAP: &[u8] = b"map";
/// The data dir's incarnation: a random id made when the database was created.
pub const META_INCARNATION: &[u8] = b"incarnation";

/// Bytes of a `data` key's hash prefix (the data family's memtable buckets by it).
pub const DATA_PREFIX_BYTES: usize = 8;

pub fn data_key(key: &[u8]) -> Vec<u8> {
    data_key_with_hash(ringkv_wire::key_hash(key), key)
}

pub fn data_key_with_hash(hash: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&hash.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The `data` key range `[lower, upper)` of hashes `[start, end)`; `None` upper means to the end.
pub fn data_range(start: u64, end: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    let lower = start.to_be_bytes().to_vec();
    let upper = if end == u64::MAX { None } else { Some(end.to_be_bytes().to_vec()) };
    (lower, upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 9) < log_key(1, 10));
        assert_eq!(log_key_index(&log_key(3, 42)), Some(42));
        assert_eq!(key_group(&log_key(3, 42)), Some(3));
    }

    #[test]
    fn data_keys_of_a_hash_range_are_contiguous() {
        let (lo, hi) = data_range(10, 20);
        let inside = data_key_with_hash(15, b"zzz");
        let above = data_key_with_hash(20, b"");
        assert!(inside.as_slice() >= lo.as_slice());
        assert!(inside < hi.clone().unwrap_or_default());
        assert!(above >= hi.unwrap_or_default());
    }
}
