//! The placement driver's pure core: the cluster map's state machine and replica assignment.
//!
//! **Architecture invariant:** nothing here does I/O or reads a clock. The node runs this state
//! machine inside Raft group 0 and persists what it returns.

pub mod planner;

use ringkv_wire::{split_ring, ClusterMap, Epoch, NodeId, NodeInfo, NodeState, ShardDesc};
use serde::{Deserialize, Serialize};

/// A change to the cluster map, proposed through the placement group's Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementCommand {
    /// Creates the cluster. Applies only to an empty map; later ones are refused.
    Bootstrap { cluster_id: String, nodes: Vec<NodeInfo>, shards: u64, replication: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PlacementError {
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Checks a bootstrap request before anything is proposed.
pub fn validate_bootstrap(nodes: &[NodeInfo], shards: u64, replication: usize) -> Result<(), PlacementError> {
    if shards == 0 || !shards.is_power_of_two() {
        return Err(PlacementError::Invalid(format!("shard count {shards} is not a power of two")));
    }
    if replication == 0 || replication % 2 == 0 {
        return Err(PlacementError::Invalid(format!("replication factor {replication} must be odd")));
    }
    if nodes.len() < replication {
        return Err(PlacementError::Invalid(format!(
            "{} nodes cannot hold {replication} replicas of a shard on distinct nodes",
            nodes.len()
        )));
    }
    let mut ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != nodes.len() {
        return Err(PlacementError::Invalid("duplicate node ids".into()));
    }
    Ok(())
}

/// Applies one command to the map. Deterministic: every placement replica computes the same map.
pub fn apply(map: &mut ClusterMap, cmd: &PlacementCommand) -> Result<(), PlacementError> {
    match cmd {
        PlacementCommand::Bootstrap { cluster_id, nodes, shards, replication } => {
            if map.is_bootstrapped() {
                return Err(PlacementError::AlreadyBootstrapped);
            }
            validate_bootstrap(nodes, *shards, *replication)?;
            let mut nodes = nodes.clone();
            nodes.sort_by_key(|n| n.id);
            for n in &mut nodes {
                n.state = NodeState::Up;
            }
            let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
            map.cluster_id = cluster_id.clone();
            map.placement_members = ids.iter().copied().take(*replication).collect();
            map.shards = bootstrap_shards(&ids, *shards, *replication);
            map.nodes = nodes;
            map.version += 1;
            Ok(())
        }
    }
}

/// Assigns `shards` shards with `replication` replicas each over `nodes` so every node holds the
/// mean ±1 replicas and is the first replica (the initial leader) of about the mean number of
/// shards. Greedy: each shard takes the least loaded nodes, ties broken by node id.
pub fn bootstrap_shards(nodes: &[NodeId], shards: u64, replication: usize) -> Vec<ShardDesc> {
    debug_assert!(nodes.len() >= replication);
    let mut replicas = vec![0usize; nodes.len()];
    let mut leaders = vec![0usize; nodes.len()];
    split_ring(shards)
        .into_iter()
        .enumerate()
        .map(|(i, (start, end))| {
            let mut order: Vec<usize> = (0..nodes.len()).collect();
            order.sort_by_key(|&n| (replicas[n], leaders[n], nodes[n]));
            let mut chosen: Vec<usize> = order[..replication].to_vec();
            chosen.sort_by_key(|&n| (leaders[n], nodes[n]));
            leaders[chosen[0]] += 1;
            for &n in &chosen {
                replicas[n] += 1;
            }
            ShardDesc {
                id: i as u64 + 1,
                start,
                end,
                replicas: chosen.into_iter().map(|n| nodes[n]).collect(),
                epoch: Epoch { conf_ver: 1, version: 1 },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u64) -> Vec<NodeInfo> {
        (1..=n)
            .map(|id| NodeInfo {
                id,
                peer_addr: format!("127.0.0.1:{}", 7000 + id),
                client_addr: format!("127.0.0.1:{}", 8000 + id),
                metrics_addr: String::new(),
                state: NodeState::Joining,
            })
            .collect()
    }

    #[test]
    fn bootstrap_balances_replicas_and_first_replicas() {
        for n in 3..=7u64 {
            for shards in [1u64, 8, 64, 256] {
                let ids: Vec<u64> = (1..=n).collect();
                let s = bootstrap_shards(&ids, shards, 3);
                let mean = (shards * 3) as f64 / n as f64;
                for id in &ids {
                    let count = s.iter().filter(|d| d.replicas.contains(id)).count() as f64;
                    assert!((count - mean).abs() <= 1.0, "n={n} shards={shards} node {id}: {count} vs {mean}");
                    let firsts = s.iter().filter(|d| d.replicas[0] == *id).count() as f64;
                    assert!((firsts - shards as f64 / n as f64).abs() <= 1.0);
                }
                for d in &s {
                    let mut r = d.replicas.clone();
                    r.sort_unstable();
                    r.dedup();
                    assert_eq!(r.len(), 3, "replicas of a shard on distinct nodes");
                }
            }
        }
    }

    #[test]
    fn bootstrap_applies_once() {
        let mut map = ClusterMap::default();
        let cmd = PlacementCommand::Bootstrap { cluster_id: "c".into(), nodes: nodes(3), shards: 8, replication: 3 };
        apply(&mut map, &cmd).expect("first bootstrap");
        assert_eq!(map.shards.len(), 8);
        assert_eq!(map.placement_members, vec![1, 2, 3]);
        assert_eq!(apply(&mut map, &cmd), Err(PlacementError::AlreadyBootstrapped));
    }

    #[test]
    fn bad_bootstrap_is_refused() {
        assert!(validate_bootstrap(&nodes(2), 8, 3).is_err());
        assert!(validate_bootstrap(&nodes(3), 6, 3).is_err());
        assert!(validate_bootstrap(&nodes(3), 8, 2).is_err());
    }
}
