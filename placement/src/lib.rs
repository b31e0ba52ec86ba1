//! The placement driver's pure core: the cluster map's state machine and replica assignment.
//!
//! **Architecture invariant:** nothing here does I/O or reads a clock. The node runs this state
//! machine inside Raft group 0 and persists what it returns.

pub mod planner;

use ringkv_wire::{split_ring, ClusterMap, Epoch, GroupId, MoveRecord, NodeId, NodeInfo, NodeState, PlacementSettings, ShardDesc};
use serde::{Deserialize, Serialize};

/// A change to the cluster map, proposed through the placement group's Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementCommand {
    /// Creates the cluster. Applies only to an empty map; later ones are refused.
    Bootstrap {
        cluster_id: String,
        nodes: Vec<NodeInfo>,
        shards: u64,
        replication: usize,
    },
    /// Adds a node in state joining (or updates the addresses of a known one).
    RegisterNode {
        node: NodeInfo,
    },
    /// Records the incarnation of a node's data dir, reported by its heartbeat, where the map
    /// does not know it yet. Refused if it knows another one.
    ClaimIncarnation {
        node: NodeId,
        incarnation: u64,
    },
    /// A lifecycle change, by an operator or by the placement leader (up, down).
    SetNodeState {
        node: NodeId,
        state: NodeState,
        force: bool,
    },
    /// Records that `to` is to replace `from` in `shard`, which must still have `epoch`.
    BeginMove {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
        epoch: Epoch,
        reason: String,
    },
    /// The shard's Raft group now has `to` instead of `from`: the map follows (conf_ver bumps).
    FinishMove {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
    },
    /// Records that `to` is to replace `from` among the placement group's voters.
    BeginPlacementMove {
        from: NodeId,
        to: NodeId,
    },
    /// The placement group's voters now have `to` instead of `from`: the map follows.
    FinishPlacementMove {
        from: NodeId,
        to: NodeId,
    },
    /// Drops a move that cannot complete (the Raft group never switched to the new set).
    AbortMove {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
    },
    SetSettings(PlacementSettings),
    /// Adds a gateway access token (its hash). Names are unique; so are hashes.
    AddToken(ringkv_wire::TokenRecord),
    /// Forgets the token called `name`.
    RevokeToken {
        name: String,
    },
}

/// Most tokens a cluster keeps (every node holds them all, in the map).
pub const TOKENS_MAX: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PlacementError {
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

/// Why a node id is refused to a data dir that is not the one the cluster knows for it.
pub fn amnesia(id: NodeId) -> String {
    format!(
        "node id {id} is already in the cluster with another data dir; a wiped or replaced data dir cannot take its place \
         (it would vote with an empty log). Remove the old node (`ringctl node remove {id} --force`, its replicas are rebuilt \
         from the others) and start this one with a new --id"
    )
}

fn refuse<T>(why: String) -> Result<T, PlacementError> {
    Err(PlacementError::Refused(why))
}

/// Checks run-time settings: values that would stall or flood the cluster are refused.
pub fn validate_settings(s: &PlacementSettings) -> Result<(), PlacementError> {
    if s.down_after_ms < 1000 {
        return Err(PlacementError::Invalid(format!("down_after_ms {} is below 1000", s.down_after_ms)));
    }
    if s.max_moves_per_node == 0 || s.snapshot_concurrency == 0 {
        return Err(PlacementError::Invalid("max_moves_per_node and snapshot_concurrency must be at least 1".into()));
    }
    if s.snapshot_bytes_per_sec < 64 * 1024 {
        return Err(PlacementError::Invalid(format!("snapshot_bytes_per_sec {} is below 64 KiB/s", s.snapshot_bytes_per_sec)));
    }
    Ok(())
}

/// The replication factor of the cluster: the size of its largest replica set.
pub fn replication(map: &ClusterMap) -> usize {
    map.shards.iter().map(|s| s.replicas.len()).max().unwrap_or(0)
}

fn set_node_state(map: &mut ClusterMap, id: NodeId, state: NodeState, force: bool) -> Result<bool, PlacementError> {
    let Some(current) = map.node(id).map(|n| n.state) else {
        return refuse(format!("no node {id} in the cluster"));
    };
    use NodeState::*;
    if current == state {
        return Ok(false);
    }
    let member = map.placement_members.contains(&id);
    match (current, state) {
        (Removed, _) => return refuse(format!("node {id} was removed; a node coming back needs a new id and an empty data dir")),
        (Joining | Down | Decommissioning, Up) | (Up | Joining, Down) => {}
        (Up | Down | Joining, Decommissioning) => {
            if member && !map.nodes.iter().any(|n| n.state == Up && !map.placement_members.contains(&n.id)) {
                return refuse(format!(
                    "node {id} holds a placement replica and no up node outside the placement group can take it; add a node first"
                ));
            }
            let up_after = map.nodes.iter().filter(|n| n.id != id && n.state == Up).count();
            if up_after < replication(map) {
                return refuse(format!(
                    "only {up_after} nodes would stay up, fewer than the {} replicas a shard needs; add a node first",
                    replication(map)
                ));
            }
        }
        (_, Removed) => {
            if member && !force {
                return refuse(format!(
                    "node {id} holds a placement replica; decommission it (its placement replica moves first), or use --force if its host is lost (the placement group then replaces it)"
                ));
            }
            if member && !map.nodes.iter().any(|n| n.state == Up && !map.placement_members.contains(&n.id)) {
                return refuse(format!(
                    "node {id} holds a placement replica and no up node outside the placement group can take it; add a node first"
                ));
            }
            let held = map.replicas_on(id);
            let moving = map.moves.iter().filter(|m| m.to == id || m.from == id).count();
            if (held > 0 || moving > 0) && !force {
                return refuse(format!(
                    "node {id} still holds {held} replicas ({moving} moving); decommission it and wait until it is empty, or use --force (its replicas are then rebuilt from the others)"
                ));
            }
        }
        (from, to) => return refuse(format!("node {id} cannot go from {} to {}", from.as_str(), to.as_str())),
    }
    if let Some(n) = map.nodes.iter_mut().find(|n| n.id == id) {
        n.state = state;
    }
    Ok(true)
}

/// Applies every command except bootstrap; `Ok(false)` when the map did not change.
fn apply_change(map: &mut ClusterMap, cmd: &PlacementCommand) -> Result<bool, PlacementError> {
    if !map.is_bootstrapped() {
        return refuse("the cluster is not bootstrapped".into());
    }
    match cmd {
        PlacementCommand::Bootstrap { .. } => Err(PlacementError::AlreadyBootstrapped),
        PlacementCommand::AddToken(t) => {
            if !ringkv_wire::auth::valid_token_name(&t.name) || t.hash.len() != 32 {
                return Err(PlacementError::Invalid(format!(
                    "token `{}`: a name of 1-64 letters, digits, - _ . and a 32-byte hash",
                    t.name
                )));
            }
            if map.tokens.iter().any(|o| o.name == t.name) {
                return refuse(format!("a token called `{}` exists; revoke it first or choose another name", t.name));
            }
            if map.tokens.iter().any(|o| o.hash == t.hash) {
                return refuse("that token is already registered".into());
            }
            if map.tokens.len() >= TOKENS_MAX {
                return refuse(format!("the cluster keeps at most {TOKENS_MAX} tokens; revoke some first"));
            }
            map.tokens.push(t.clone());
            Ok(true)
        }
        PlacementCommand::RevokeToken { name } => {
            let before = map.tokens.len();
            map.tokens.retain(|t| &t.name != name);
            if map.tokens.len() == before {
                return refuse(format!("no token called `{name}`"));
            }
            Ok(true)
        }
        PlacementCommand::RegisterNode { node } => {
            if node.id == 0 {
                return Err(PlacementError::Invalid("node id 0 is reserved".into()));
            }
            match map.nodes.iter_mut().find(|n| n.id == node.id) {
                Some(n) if n.state == NodeState::Removed => {
                    refuse(format!("node id {} was removed; a node coming back needs a new id and an empty data dir", node.id))
                }
                Some(n) if n.incarnation != 0 && n.incarnation != node.incarnation => refuse(amnesia(node.id)),
                Some(n) if n.incarnation == 0 && node.incarnation != 0 && n.state != NodeState::Joining => refuse(amnesia(node.id)),
                Some(n) if n.peer_addr == node.peer_addr && n.client_addr == node.client_addr && n.metrics_addr == node.metrics_addr => {
                    Ok(false)
                }
                Some(n) => {
                    n.incarnation = node.incarnation;
                    n.peer_addr = node.peer_addr.clone();
                    n.client_addr = node.client_addr.clone();
                    n.metrics_addr = node.metrics_addr.clone();
                    Ok(true)
                }
                None => {
                    let mut n = node.clone();
                    n.state = NodeState::Joining;
                    map.nodes.push(n);
                    map.nodes.sort_by_key(|n| n.id);
                    Ok(true)
                }
            }
        }
        PlacementCommand::SetNodeState { node, state, force } => set_node_state(map, *node, *state, *force),
        PlacementCommand::ClaimIncarnation { node, incarnation } => {
            let Some(n) = map.nodes.iter_mut().find(|n| n.id == *node) else { return refuse(format!("no node {node} in the cluster")) };
            match n.incarnation {
                0 if *incarnation != 0 => {
                    n.incarnation = *incarnation;
                    Ok(true)
                }
                i if i == *incarnation => Ok(false),
                _ => refuse(amnesia(*node)),
            }
        }
        PlacementCommand::BeginMove { shard, from, to, epoch, reason } => {
            let Some(s) = map.shard(*shard) else { return refuse(format!("no shard {shard}")) };
            if s.epoch != *epoch {
                return refuse(format!("shard {shard} changed (epoch {:?}, move planned at {:?})", s.epoch, epoch));
            }
            if let Some(m) = map.move_of(*shard) {
                return refuse(format!("shard {shard} is already moving from {} to {}", m.from, m.to));
            }
            if !s.replicas.contains(from) || s.replicas.contains(to) {
                return refuse(format!("shard {shard} has replicas {:?}: cannot move {from} to {to}", s.replicas));
            }
            if map.node(*to).map(|n| n.state) != Some(NodeState::Up) {
                return refuse(format!("node {to} is not up"));
            }
            map.moves.push(MoveRecord { shard: *shard, from: *from, to: *to, epoch: *epoch, reason: reason.clone() });
            Ok(true)
        }
        PlacementCommand::FinishMove { shard, from, to } => {
            let Some(i) = map.moves.iter().position(|m| m.shard == *shard && m.from == *from && m.to == *to) else {
                return refuse(format!("no move of shard {shard} from {from} to {to}"));
            };
            map.moves.remove(i);
            let Some(s) = map.shards.iter_mut().find(|s| s.id == *shard) else { return refuse(format!("no shard {shard}")) };
            for r in s.replicas.iter_mut().filter(|r| **r == *from) {
                *r = *to;
            }
            s.epoch.conf_ver += 1;
            Ok(true)
        }
        PlacementCommand::BeginPlacementMove { from, to } => {
            if let Some(m) = &map.placement_move {
                return refuse(format!("the placement group is already moving from {} to {}", m.from, m.to));
            }
            if !map.placement_members.contains(from) || map.placement_members.contains(to) {
                return refuse(format!("placement members are {:?}: cannot move {from} to {to}", map.placement_members));
            }
            if map.node(*to).map(|n| n.state) != Some(NodeState::Up) {
                return refuse(format!("node {to} is not up"));
            }
            map.placement_move =
                Some(MoveRecord { shard: 0, from: *from, to: *to, epoch: Epoch::default(), reason: "replace placement member".into() });
            Ok(true)
        }
        PlacementCommand::FinishPlacementMove { from, to } => {
            if !map.placement_move.as_ref().is_some_and(|m| m.from == *from && m.to == *to) {
                return refuse(format!("no move of the placement group from {from} to {to}"));
            }
            map.placement_move = None;
            for m in map.placement_members.iter_mut().filter(|m| **m == *from) {
                *m = *to;
            }
            Ok(true)
        }
        PlacementCommand::AbortMove { shard, from, to } => {
            let before = map.moves.len();
            map.moves.retain(|m| !(m.shard == *shard && m.from == *from && m.to == *to));
            Ok(map.moves.len() != before)
        }
        PlacementCommand::SetSettings(s) => {
            validate_settings(s)?;
            let changed = map.settings != *s;
            map.settings = s.clone();
            Ok(changed)
        }
    }
}

/// The most shards a cluster may start with: every shard is a Raft group on three nodes.
pub const BOOTSTRAP_SHARDS_MAX: u64 = 1 << 16;

/// Checks a bootstrap request before anything is proposed (and again when it is applied).
pub fn validate_bootstrap(nodes: &[NodeInfo], shards: u64, replication: usize) -> Result<(), PlacementError> {
    if shards == 0 || !shards.is_power_of_two() {
        return Err(PlacementError::Invalid(format!("shard count {shards} is not a power of two")));
    }
    if shards > BOOTSTRAP_SHARDS_MAX {
        return Err(PlacementError::Invalid(format!("shard count {shards} is over the limit of {BOOTSTRAP_SHARDS_MAX}")));
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
        other => {
            if apply_change(map, other)? {
                map.version += 1;
            }
            Ok(())
        }
    }
}

/// The next replacement of a placement member, if one is due: a member that was removed or is
/// decommissioning gives its place to the up non-member with the fewest replicas (ties by id).
/// One at a time; none while one is in flight.
pub fn placement_replacement(map: &ClusterMap) -> Option<(NodeId, NodeId)> {
    if map.placement_move.is_some() {
        return None;
    }
    let leaving = map
        .placement_members
        .iter()
        .copied()
        .find(|m| map.node(*m).is_some_and(|n| matches!(n.state, NodeState::Removed | NodeState::Decommissioning)))?;
    let to = map
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up && !map.placement_members.contains(&n.id))
        .min_by_key(|n| (map.replicas_on(n.id), n.id))?;
    Some((leaving, to.id))
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
                incarnation: 0,
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
    fn tokens_are_added_once_by_name_and_hash_and_revoked_by_name() {
        let mut map = ClusterMap::default();
        let tok = |name: &str, b: u8| {
            PlacementCommand::AddToken(ringkv_wire::TokenRecord { name: name.into(), role: ringkv_wire::Role::Read, hash: vec![b; 32] })
        };
        assert!(apply(&mut map, &tok("a", 1)).is_err(), "no tokens before bootstrap");
        apply(&mut map, &PlacementCommand::Bootstrap { cluster_id: "c".into(), nodes: nodes(3), shards: 1, replication: 3 }).expect("boot");
        let v = map.version;
        apply(&mut map, &tok("a", 1)).expect("add");
        assert_eq!((map.tokens.len(), map.version), (1, v + 1));
        assert!(apply(&mut map, &tok("a", 2)).is_err(), "same name");
        assert!(apply(&mut map, &tok("b", 1)).is_err(), "same hash");
        assert!(matches!(apply(&mut map, &tok("bad name", 3)), Err(PlacementError::Invalid(_))));
        let short =
            PlacementCommand::AddToken(ringkv_wire::TokenRecord { name: "s".into(), role: ringkv_wire::Role::Read, hash: vec![1; 5] });
        assert!(matches!(apply(&mut map, &short), Err(PlacementError::Invalid(_))));
        assert!(apply(&mut map, &PlacementCommand::RevokeToken { name: "zz".into() }).is_err());
        apply(&mut map, &PlacementCommand::RevokeToken { name: "a".into() }).expect("revoke");
        assert!(map.tokens.is_empty());
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
        assert!(validate_bootstrap(&nodes(3), BOOTSTRAP_SHARDS_MAX, 3).is_ok());
        // Applying a huge bootstrap must be refused, not attempted (it would abort every
        // placement member on every restart).
        for shards in [BOOTSTRAP_SHARDS_MAX * 2, 1 << 40, 1 << 62, 1 << 63] {
            let mut map = ClusterMap::default();
            let cmd = PlacementCommand::Bootstrap { cluster_id: "c".into(), nodes: nodes(3), shards, replication: 3 };
            assert!(matches!(apply(&mut map, &cmd), Err(PlacementError::Invalid(_))), "{shards} shards");
            assert!(!map.is_bootstrapped());
        }
    }

    #[test]
    fn a_known_node_id_is_refused_to_another_data_dir() {
        let mut map = cluster(3);
        // Incarnations are claimed once: the first heartbeat of each node.
        for id in 1..=3 {
            apply(&mut map, &PlacementCommand::ClaimIncarnation { node: id, incarnation: 100 + id }).expect("claim");
        }
        let v = map.version;
        apply(&mut map, &PlacementCommand::ClaimIncarnation { node: 2, incarnation: 102 }).expect("same claim again");
        assert_eq!(map.version, v, "a repeated claim changed nothing");
        // A wiped data dir of node 2 (another incarnation) can neither claim nor join as node 2.
        let e = apply(&mut map, &PlacementCommand::ClaimIncarnation { node: 2, incarnation: 999 }).expect_err("amnesia claimed");
        assert!(e.to_string().contains("node remove 2"), "{e}");
        let wiped = NodeInfo { incarnation: 999, ..node(2) };
        let e = apply(&mut map, &PlacementCommand::RegisterNode { node: wiped }).expect_err("amnesia joined");
        assert!(e.to_string().contains("another data dir"), "{e}");
        assert_eq!(map.node(2).map(|n| n.incarnation), Some(102));
        // The node itself (same incarnation) may update its addresses.
        let moved = NodeInfo { incarnation: 102, client_addr: "127.0.0.1:9999".into(), ..node(2) };
        apply(&mut map, &PlacementCommand::RegisterNode { node: moved }).expect("own re-register");
        assert_eq!(map.node(2).map(|n| n.client_addr.clone()), Some("127.0.0.1:9999".into()));
        // An up node whose incarnation is not known yet cannot be taken over by a join either.
        let mut map = cluster(3);
        let e = apply(&mut map, &PlacementCommand::RegisterNode { node: NodeInfo { incarnation: 5, ..node(3) } });
        assert!(e.is_err(), "a join took over an up node");
    }

    fn cluster(n: u64) -> ClusterMap {
        let mut map = ClusterMap::default();
        let cmd = PlacementCommand::Bootstrap { cluster_id: "c".into(), nodes: nodes(n), shards: 8, replication: 3 };
        apply(&mut map, &cmd).expect("bootstrap");
        map
    }

    fn node(id: u64) -> NodeInfo {
        nodes(id).pop().expect("node")
    }

    /// Settings at their bounds pass, one step past is refused.
    #[test]
    fn settings_are_checked_at_their_bounds() {
        let ok = PlacementSettings { down_after_ms: 1000, snapshot_bytes_per_sec: 64 * 1024, ..Default::default() };
        assert!(validate_settings(&ok).is_ok());
        assert!(validate_settings(&PlacementSettings { down_after_ms: 999, ..ok.clone() }).is_err());
        assert!(validate_settings(&PlacementSettings { snapshot_bytes_per_sec: 64 * 1024 - 1, ..ok.clone() }).is_err());
        assert!(validate_settings(&PlacementSettings { snapshot_bytes_per_sec: 1024, ..ok.clone() }).is_err());
        assert!(validate_settings(&PlacementSettings { max_moves_per_node: 0, ..ok.clone() }).is_err());
        assert!(validate_settings(&PlacementSettings { snapshot_concurrency: 0, ..ok }).is_err());
    }

    /// Decommissioning is refused while nothing could take over: a placement member's replica
    /// with no up node outside the placement group, or fewer up nodes left than a shard has
    /// replicas. Once a node can take over, it is allowed.
    #[test]
    fn decommission_is_refused_until_something_can_take_over() {
        let mut map = cluster(3);
        let set = |map: &mut ClusterMap, node, state| apply(map, &PlacementCommand::SetNodeState { node, state, force: false });
        for id in 1..=3 {
            set(&mut map, id, NodeState::Up).expect("up");
        }
        assert_eq!(replication(&map), 3);
        let e = set(&mut map, 1, NodeState::Decommissioning).expect_err("no node can take node 1's placement replica");
        assert!(e.to_string().contains("placement replica"), "{e}");
        apply(&mut map, &PlacementCommand::RegisterNode { node: node(4) }).expect("register");
        // Node 4 joined but is not up yet: still nothing can take over.
        set(&mut map, 1, NodeState::Decommissioning).expect_err("a joining node cannot take over");
        set(&mut map, 4, NodeState::Up).expect("up");
        set(&mut map, 1, NodeState::Decommissioning).expect("node 4 can take over");
        // Nodes 2, 3 and 4 stay up: taking node 4 away too would leave 2 for 3 replicas.
        let e = set(&mut map, 4, NodeState::Decommissioning).expect_err("too few up nodes");
        assert!(e.to_string().contains("only 2 nodes would stay up"), "{e}");
        assert_eq!(map.node(4).map(|n| n.state), Some(NodeState::Up));
    }

    #[test]
    fn nodes_register_once_and_removed_ids_stay_retired() {
        let mut map = cluster(3);
        let v = map.version;
        apply(&mut map, &PlacementCommand::RegisterNode { node: node(4) }).expect("register");
        assert_eq!(map.node(4).map(|n| n.state), Some(NodeState::Joining));
        assert_eq!(map.version, v + 1);
        apply(&mut map, &PlacementCommand::RegisterNode { node: node(4) }).expect("again");
        assert_eq!(map.version, v + 1, "registering the same node twice changes nothing");
        let mut moved = node(4);
        moved.peer_addr = "127.0.0.1:9999".into();
        apply(&mut map, &PlacementCommand::RegisterNode { node: moved }).expect("new address");
        assert_eq!(map.node(4).map(|n| n.peer_addr.as_str()), Some("127.0.0.1:9999"));
        apply(&mut map, &PlacementCommand::SetNodeState { node: 4, state: NodeState::Removed, force: false }).expect("remove empty node");
        let again = apply(&mut map, &PlacementCommand::RegisterNode { node: node(4) });
        assert!(matches!(again, Err(PlacementError::Refused(_))), "{again:?}");
        let zero = NodeInfo { id: 0, ..node(5) };
        assert!(matches!(apply(&mut map, &PlacementCommand::RegisterNode { node: zero }), Err(PlacementError::Invalid(_))));
    }

    #[test]
    fn a_removed_placement_member_is_replaced_by_an_up_node() {
        let mut map = cluster(5);
        assert_eq!(placement_replacement(&map), None, "nothing to replace");
        let set = |map: &mut ClusterMap, node, state, force| apply(map, &PlacementCommand::SetNodeState { node, state, force });
        set(&mut map, 2, NodeState::Removed, true).expect("forced removal of a lost member");
        let (from, to) = placement_replacement(&map).expect("a replacement");
        assert_eq!(from, 2);
        assert!(to == 4 || to == 5, "an up non-member: {to}");
        // Only to an up non-member, one at a time, finished only as begun.
        assert!(apply(&mut map, &PlacementCommand::BeginPlacementMove { from: 2, to: 3 }).is_err(), "to a member");
        apply(&mut map, &PlacementCommand::BeginPlacementMove { from, to }).expect("begin");
        assert_eq!(placement_replacement(&map), None, "one at a time");
        assert!(apply(&mut map, &PlacementCommand::BeginPlacementMove { from: 1, to: 9 }).is_err(), "a second move");
        assert!(apply(&mut map, &PlacementCommand::FinishPlacementMove { from, to: 1 }).is_err(), "another move's finish");
        apply(&mut map, &PlacementCommand::FinishPlacementMove { from, to }).expect("finish");
        assert_eq!(map.placement_members, vec![1, to, 3]);
        assert_eq!(map.placement_move, None);
        assert_eq!(placement_replacement(&map), None, "done");
        // A decommissioning member is replaced the same way.
        set(&mut map, 3, NodeState::Decommissioning, false).expect("decommission a member");
        assert_eq!(placement_replacement(&map).map(|(f, _)| f), Some(3));
    }

    #[test]
    fn lifecycle_changes_that_would_lose_data_or_the_placement_group_are_refused() {
        let mut map = cluster(4);
        let set = |map: &mut ClusterMap, node, state, force| apply(map, &PlacementCommand::SetNodeState { node, state, force });
        let mut three = cluster(3);
        assert!(set(&mut three, 1, NodeState::Decommissioning, false).is_err(), "no node could take its placement replica");
        assert!(set(&mut three, 1, NodeState::Removed, true).is_err(), "no node could take its placement replica, even forced");
        let e = set(&mut map, 1, NodeState::Removed, false).expect_err("a placement member, not forced");
        assert!(e.to_string().contains("--force"), "{e}");
        let held = map.replicas_on(4);
        assert!(held > 0);
        let e = set(&mut map, 4, NodeState::Removed, false).expect_err("holds replicas");
        assert!(e.to_string().contains("--force"), "{e}");
        set(&mut map, 4, NodeState::Decommissioning, false).expect("drain");
        set(&mut map, 4, NodeState::Up, false).expect("recommission");
        // With node 4 down, draining node 3 would leave two up nodes for three replicas.
        set(&mut map, 4, NodeState::Down, false).expect("down");
        assert!(set(&mut map, 3, NodeState::Decommissioning, false).is_err());
        set(&mut map, 4, NodeState::Removed, true).expect("forced removal");
        assert!(set(&mut map, 4, NodeState::Up, false).is_err(), "removed is final");
        assert!(set(&mut map, 9, NodeState::Up, false).is_err(), "unknown node");
    }

    #[test]
    fn a_move_begins_on_the_epoch_it_was_planned_for_and_finishing_bumps_conf_ver() {
        let mut map = cluster(3);
        apply(&mut map, &PlacementCommand::RegisterNode { node: node(4) }).expect("register");
        let s = map.shards[0].clone();
        let from = s.replicas[0];
        let begin = |epoch| PlacementCommand::BeginMove { shard: s.id, from, to: 4, epoch, reason: "balance".into() };
        assert!(apply(&mut map, &begin(s.epoch)).is_err(), "node 4 is joining, not up");
        apply(&mut map, &PlacementCommand::SetNodeState { node: 4, state: NodeState::Up, force: false }).expect("up");
        let stale = Epoch { conf_ver: s.epoch.conf_ver + 1, ..s.epoch };
        assert!(apply(&mut map, &begin(stale)).is_err(), "the shard changed since the plan");
        apply(&mut map, &begin(s.epoch)).expect("begin");
        assert!(apply(&mut map, &begin(s.epoch)).is_err(), "one move per shard");
        assert!(apply(&mut map, &PlacementCommand::SetNodeState { node: 4, state: NodeState::Removed, force: false }).is_err());
        // Forcing it keeps the move: the executor finishes or cancels it from what Raft says.
        let mut forced = map.clone();
        apply(&mut forced, &PlacementCommand::SetNodeState { node: 4, state: NodeState::Removed, force: true }).expect("forced");
        assert_eq!(forced.moves.len(), 1, "the move survives a forced removal");
        apply(&mut map, &PlacementCommand::FinishMove { shard: s.id, from, to: 4 }).expect("finish");
        let after = map.shard(s.id).expect("shard");
        assert!(after.replicas.contains(&4) && !after.replicas.contains(&from));
        assert_eq!(after.epoch.conf_ver, s.epoch.conf_ver + 1);
        assert!(map.moves.is_empty());
        assert!(apply(&mut map, &PlacementCommand::FinishMove { shard: s.id, from, to: 4 }).is_err(), "finished once");
        let s2 = map.shards[1].clone();
        let from2 = s2.replicas.iter().copied().find(|r| *r != 4).expect("replica");
        if !s2.replicas.contains(&4) {
            apply(&mut map, &PlacementCommand::BeginMove { shard: s2.id, from: from2, to: 4, epoch: s2.epoch, reason: "balance".into() })
                .expect("begin");
            apply(&mut map, &PlacementCommand::AbortMove { shard: s2.id, from: from2, to: 4 }).expect("abort");
            assert_eq!(map.shard(s2.id).map(|s| s.replicas.clone()), Some(s2.replicas), "an abandoned move changes no replicas");
        }
    }

    #[test]
    fn settings_that_would_stall_the_cluster_are_refused() {
        let mut map = cluster(3);
        let ok = PlacementSettings { down_after_ms: 5000, ..Default::default() };
        apply(&mut map, &PlacementCommand::SetSettings(ok.clone())).expect("valid");
        assert_eq!(map.settings, ok);
        for bad in [
            PlacementSettings { down_after_ms: 10, ..Default::default() },
            PlacementSettings { max_moves_per_node: 0, ..Default::default() },
            PlacementSettings { snapshot_bytes_per_sec: 1, ..Default::default() },
        ] {
            assert!(matches!(apply(&mut map, &PlacementCommand::SetSettings(bad)), Err(PlacementError::Invalid(_))));
        }
        assert_eq!(map.settings, ok);
    }
}
