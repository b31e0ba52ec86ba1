//! Storage of a node: one RocksDB shared by every Raft group the node hosts.
//!
//! **Architecture invariant:** nothing above this crate names RocksDB; the node sees groups'
//! log stores and state machines, and a replica registry.

pub mod db;
pub mod keys;
pub mod raft_store;
pub mod types;

use std::path::PathBuf;

pub use db::Db;
pub use raft_store::{LogStore, ReplicaKind, StateMachine};
pub use types::*;

use ringkv_wire::GroupId;
use rocksdb::{IteratorMode, WriteBatch};

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
            // Two groups share the database, as on a real node: the suite runs on group 7 while
            // group 6 and 8 hold entries that must never leak into it.
            let mut other = LogStore::new(db.clone(), 6);
            let mut above = LogStore::new(db.clone(), 8);
            use openraft::storage::RaftLogStorage;
            let v = openraft::alias::VoteOf::<TypeConfig>::new(9, 9);
            other.save_vote(&v).await.map_err(se)?;
            above.save_vote(&v).await.map_err(se)?;
            Ok((dir, LogStore::new(db.clone(), 7), StateMachine::new(db, 7, ReplicaKind::Shard { start: 0, end: u64::MAX })))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
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
