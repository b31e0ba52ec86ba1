//! The cluster map held by the placement group: nodes, shards, replicas and epochs.

use serde::{Deserialize, Serialize};

use crate::{GroupId, NodeId};

/// A shard's version. `conf_ver` bumps on every membership change, `version` on every split or
/// merge. Requests carry the epoch they routed with; a replica refuses a stale one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Epoch {
    pub conf_ver: u64,
    pub version: u64,
}

/// One shard: a contiguous hash range `[start, end)` served by one Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDesc {
    pub id: GroupId,
    pub start: u64,
    /// Exclusive, except that a shard ending at `u64::MAX` also holds that hash.
    pub end: u64,
    pub replicas: Vec<NodeId>,
    pub epoch: Epoch,
}

impl ShardDesc {
    pub fn contains(&self, hash: u64) -> bool {
        hash >= self.start && (hash < self.end || (self.end == u64::MAX && hash == u64::MAX))
    }
}

/// Where a node is in its life. Only `Up` nodes are given replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Joining,
    Up,
    Down,
    Decommissioning,
    Removed,
}

impl NodeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::Decommissioning => "decommissioning",
            NodeState::Removed => "removed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Address of the node-to-node QUIC endpoint.
    pub peer_addr: String,
    /// Address of the client QUIC endpoint.
    pub client_addr: String,
    /// Address of the Prometheus endpoint.
    pub metrics_addr: String,
    pub state: NodeState,
}

/// The whole cluster as the placement group last committed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Random id chosen at bootstrap; a data dir from another cluster carries another one.
    pub cluster_id: String,
    /// Bumps on every change to the map.
    pub version: u64,
    pub nodes: Vec<NodeInfo>,
    /// Sorted by `start`; together they cover the whole hash space.
    pub shards: Vec<ShardDesc>,
    /// Voters of the placement group.
    pub placement_members: Vec<NodeId>,
}

impl ClusterMap {
    /// The shard whose range holds `hash`.
    pub fn shard_for_hash(&self, hash: u64) -> Option<&ShardDesc> {
        let i = self.shards.partition_point(|s| s.start <= hash);
        let s = self.shards.get(i.checked_sub(1)?)?;
        s.contains(hash).then_some(s)
    }

    pub fn shard(&self, id: GroupId) -> Option<&ShardDesc> {
        self.shards.iter().find(|s| s.id == id)
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn is_bootstrapped(&self) -> bool {
        !self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{key_hash, split_ring};

    #[test]
    fn every_hash_finds_its_shard() {
        let shards = split_ring(8)
            .into_iter()
            .enumerate()
            .map(|(i, (start, end))| ShardDesc { id: i as u64 + 1, start, end, replicas: vec![], epoch: Epoch::default() })
            .collect();
        let map = ClusterMap { shards, ..Default::default() };
        for h in [0u64, 1, u64::MAX / 8, u64::MAX / 8 + 1, u64::MAX - 1, u64::MAX, key_hash(b"k")] {
            let s = map.shard_for_hash(h).expect("covered");
            assert!(s.contains(h));
        }
        assert_eq!(map.shard_for_hash(0).map(|s| s.id), Some(1));
        assert_eq!(map.shard_for_hash(u64::MAX).map(|s| s.id), Some(8));
    }
}
