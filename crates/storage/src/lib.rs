//! Storage of a node: one RocksDB shared by every Raft group the node hosts.
//!
//! **Architecture invariant:** nothing above this crate names RocksDB; the node sees groups'
//! log stores and state machines, and a replica registry.

pub mod db;
pub mod keys;
pub mod log_cache;
pub mod raft_store;
pub mod types;

use std::path::PathBuf;

pub use db::{Db, Durability, MemoryUsage};
pub use raft_store::{LogStore, ReplicaKind, StateMachine};
/// The batch type `Db::write` and `Db::write_sync` take.
pub use rocksdb::WriteBatch;
pub use types::*;

use ringkv_wire::GroupId;
use rocksdb::IteratorMode;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open the database at {0}: {1}")]
    Open(PathBuf, String),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Records that this node hosts a replica of `group`, so a restart brings it back.
pub fn register_replica(db: &Db, group: GroupId, kind: ReplicaKind) -> Result<(), std::io::Error> {
    let mut b = WriteBatch::default();
    let v = postcard::to_allocvec(&kind).map_err(db::io_err)?;
    b.put_cf(db.cf(keys::CF_RAFT_STATE), keys::group_tag_key(group, keys::TAG_REPLICA), v);
    db.write_sync(b)
}

/// Forgets this node's replica of `group`: its registration, log, Raft state, applied state,
/// sessions and (for a shard) its data, and leaves a tombstone with `conf_ver`, all in one
/// synced batch, so a crash never leaves half a replica behind. The replica's Raft instance must
/// be shut down first.
pub fn remove_replica(db: &Db, group: GroupId, kind: ReplicaKind, conf_ver: u64) -> Result<(), std::io::Error> {
    let state = db.cf(keys::CF_RAFT_STATE);
    let mut b = WriteBatch::default();
    b.put_cf(state, keys::group_tag_key(group, keys::TAG_TOMBSTONE), conf_ver.to_be_bytes());
    b.delete_range_cf(state, keys::group_tag_key(group, 0), keys::group_tag_key(group, keys::TAG_TOMBSTONE));
    b.delete_range_cf(state, keys::group_tag_key(group, keys::TAG_TOMBSTONE + 1), keys::group_tag_key(group + 1, 0));
    b.delete_range_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(group, 0), keys::log_key(group + 1, 0));
    b.delete_range_cf(db.cf(keys::CF_APPLY_STATE), keys::group_tag_key(group, 0), keys::group_tag_key(group + 1, 0));
    if let ReplicaKind::Shard { start, end } = kind {
        raft_store::delete_data_range(db, &mut b, start, end)?;
    }
    db.write_sync(b)
}

/// The `conf_ver` at which this node's replica of `group` was removed, if it was.
pub fn tombstone(db: &Db, group: GroupId) -> Result<Option<u64>, std::io::Error> {
    Ok(db
        .get_cf(keys::CF_RAFT_STATE, &keys::group_tag_key(group, keys::TAG_TOMBSTONE))?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes))
}

/// Every replica this node hosts, as registered.
pub fn list_replicas(db: &Db) -> Result<Vec<(GroupId, ReplicaKind)>, std::io::Error> {
    let mut out = Vec::new();
    for kv in db.raw().iterator_cf(db.cf(keys::CF_RAFT_STATE), IteratorMode::Start) {
        let (k, v) = kv.map_err(db::io_err)?;
        if k.len() == 9 && k[8] == keys::TAG_REPLICA {
            let group = keys::key_group(&k).unwrap_or_default();
            let kind = postcard::from_bytes(&v)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("replica record of group {group}: {e}")))?;
            out.push((group, kind));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;

    struct Builder;

    fn se(e: impl ToString) -> openraft::StorageError<TypeConfig> {
        use openraft::type_config::TypeConfigExt;
        openraft::StorageError::read(TypeConfig::err_from_error(&std::io::Error::other(e.to_string())))
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), openraft::StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().map_err(se)?;
            let db = Db::open(dir.path()).map_err(se)?;
            // Three groups share the database, as on a real node: the suite runs on group 7
            // while groups 6 and 8 hold a vote and log entries (at indexes the suite uses too)
            // that must never leak into it: a read, a truncation or a purge that crossed a
            // group's bounds would show up in the suite's expectations.
            let mut other = LogStore::new(db.clone(), 6);
            let mut above = LogStore::new(db.clone(), 8);
            use openraft::storage::RaftLogStorage;
            let v = openraft::alias::VoteOf::<TypeConfig>::new(9, 9);
            other.save_vote(&v).await.map_err(se)?;
            above.save_vote(&v).await.map_err(se)?;
            let leader = openraft::impls::leader_id_adv::LeaderId { term: 9, node_id: 9 };
            for group in [6, 8] {
                for index in 0..=20 {
                    let e = <Entry as openraft::entry::RaftEntry>::new(openraft::LogId::new(leader, index), openraft::EntryPayload::Blank);
                    let bytes = postcard::to_allocvec(&e).map_err(se)?;
                    db.raw().put_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(group, index), bytes).map_err(se)?;
                }
            }
            Ok((dir, LogStore::new(db.clone(), 7), StateMachine::new(db, 7, ReplicaKind::Shard { start: 0, end: u64::MAX })))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }

    /// Removing a replica deletes its log, state and data and nothing of its neighbours, and
    /// leaves a tombstone; registering it again (a later move back) works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_replica_deletes_exactly_its_state() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        let half = u64::MAX / 2;
        let (a, b) = (ReplicaKind::Shard { start: 0, end: half }, ReplicaKind::Shard { start: half, end: u64::MAX });
        register_replica(&db, 1, a).expect("reg");
        register_replica(&db, 2, b).expect("reg");
        let v = openraft::alias::VoteOf::<TypeConfig>::new(3, 1);
        LogStore::new(db.clone(), 1).save_vote(&v).await.expect("vote");
        LogStore::new(db.clone(), 2).save_vote(&v).await.expect("vote");
        let mut w = WriteBatch::default();
        let mut keys_of = |kind: ReplicaKind| -> Vec<u8> {
            let k = (0u32..).map(|i| format!("k{i}").into_bytes()).find(|k| kind.contains(ringkv_wire::key_hash(k))).expect("key");
            w.put_cf(db.cf(keys::CF_DATA), keys::data_key(&k), b"v");
            k
        };
        let (ka, kb) = (keys_of(a), keys_of(b));
        db.write_sync(w).expect("write");
        assert_eq!(tombstone(&db, 2).expect("read"), None);
        remove_replica(&db, 2, b, 7).expect("remove");
        assert_eq!(list_replicas(&db).expect("list"), vec![(1, a)]);
        assert_eq!(tombstone(&db, 2).expect("read"), Some(7));
        let sm = |g, k| StateMachine::new(db.clone(), g, k);
        assert_eq!(sm(2, b).get(&kb).expect("get"), None, "the removed shard's data is gone");
        assert_eq!(sm(1, a).get(&ka).expect("get"), Some(b"v".to_vec()), "the neighbour's data stays");
        use openraft::storage::RaftLogReader;
        assert!(LogStore::new(db.clone(), 2).read_vote().await.expect("vote").is_none());
        assert_eq!(LogStore::new(db.clone(), 1).read_vote().await.expect("vote"), Some(v));
        register_replica(&db, 2, b).expect("again");
        assert_eq!(list_replicas(&db).expect("list").len(), 2);
    }

    #[test]
    fn replicas_are_registered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        register_replica(&db, 0, ReplicaKind::Placement).expect("reg");
        register_replica(&db, 5, ReplicaKind::Shard { start: 1, end: 2 }).expect("reg");
        let got = list_replicas(&db).expect("list");
        assert_eq!(got, vec![(0, ReplicaKind::Placement), (5, ReplicaKind::Shard { start: 1, end: 2 })]);
    }
}
