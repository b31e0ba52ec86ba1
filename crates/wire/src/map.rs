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
    /// A random id of the node's data dir, made when it was created. A node whose data dir was
    /// wiped or replaced comes back with another one, and is refused instead of voting with an
    /// empty log. 0: not known yet (claimed by the node's first heartbeat).
    pub incarnation: u64,
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
    /// Replica moves the placement leader is running (at most one per shard). A move's target
    /// node creates its (empty) replica when it sees the move here.
    pub moves: Vec<MoveRecord>,
    /// The placement group's own move in flight (shard 0): `to` replaces `from`, a member that
    /// was removed or is decommissioning. `to` creates its replica when it sees this.
    pub placement_move: Option<MoveRecord>,
    /// Placement settings, changed at run time through the placement group.
    pub settings: PlacementSettings,
    /// Access tokens of the HTTP and Redis gateways (hashes only). Last, and read leniently: a
    /// map stored before tokens existed decodes with none (see [`trailing_or_default`]). Never
    /// sent to clients (`GetMap` answers without it).
    #[serde(deserialize_with = "trailing_or_default")]
    pub tokens: Vec<crate::TokenRecord>,
}

/// Reads a trailing field that an older encoding (postcard, which is not self-describing) did
/// not have: the data ends where it would start, and the field takes its default.
fn trailing_or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(T::deserialize(d).unwrap_or_default())
}

/// A replica move in flight: `to` replaces `from` in `shard`, which had `epoch` when it began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub shard: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    pub epoch: Epoch,
    /// Why it was planned: "repair", "drain" or "balance".
    pub reason: String,
}

/// What operators tune at run time (`ringctl settings`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSettings {
    /// Whether the placement leader balances replicas and leaders on its own. Repair and drain
    /// run regardless.
    pub balance: bool,
    /// A node silent this long is marked down and its replicas are repaired elsewhere.
    pub down_after_ms: u64,
    /// Moves touching one node (as source or target) at once.
    pub max_moves_per_node: u32,
    /// Snapshot bytes per second one node sends, over all its transfers.
    pub snapshot_bytes_per_sec: u64,
    /// Snapshot transfers one node sends at once.
    pub snapshot_concurrency: u32,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        PlacementSettings {
            balance: true,
            down_after_ms: 30_000,
            max_moves_per_node: 4,
            snapshot_bytes_per_sec: 64 * 1024 * 1024,
            snapshot_concurrency: 2,
        }
    }
}

/// Checks a node address: `IP:port`, `[IPv6]:port` or `dns-name:port`. With `dialable` (an
/// address other nodes dial), port 0 and an unspecified IP (`0.0.0.0`, `::`) are refused too; an
/// address to bind may use them.
pub fn check_addr(addr: &str, dialable: bool) -> Result<(), String> {
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        if dialable && sock.port() == 0 {
            return Err(format!("`{addr}` has port 0"));
        }
        if dialable && sock.ip().is_unspecified() {
            return Err(format!("`{addr}` is the unspecified address, which no other node can dial"));
        }
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("`{addr}` is not HOST:PORT"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 || !dialable => {}
        _ => return Err(format!("`{addr}`: `{port}` is not a port (1-65535)")),
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) || name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("`{addr}`: `{host}` is neither an IP address nor a DNS name"));
    }
    Ok(())
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

    /// The move in flight of `shard`, if any.
    pub fn move_of(&self, shard: GroupId) -> Option<&MoveRecord> {
        self.moves.iter().find(|m| m.shard == shard)
    }

    /// Shards with a replica (or an incoming move) on `node`.
    pub fn replicas_on(&self, node: NodeId) -> usize {
        self.shards.iter().filter(|s| s.replicas.contains(&node)).count()
    }

    pub fn is_bootstrapped(&self) -> bool {
        !self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map stored before tokens existed (the same fields, without the last) still decodes.
    #[test]
    fn a_map_stored_before_tokens_decodes_with_none() {
        #[derive(Serialize)]
        struct Before<'a> {
            cluster_id: &'a str,
            version: u64,
            nodes: Vec<NodeInfo>,
            shards: Vec<ShardDesc>,
            placement_members: Vec<NodeId>,
            moves: Vec<MoveRecord>,
            placement_move: Option<MoveRecord>,
            settings: PlacementSettings,
        }
        let old = Before {
            cluster_id: "c1",
            version: 7,
            nodes: vec![],
            shards: vec![ShardDesc { id: 1, start: 0, end: u64::MAX, replicas: vec![1, 2, 3], epoch: Epoch::default() }],
            placement_members: vec![1, 2, 3],
            moves: vec![],
            placement_move: None,
            settings: PlacementSettings::default(),
        };
        let bytes = postcard::to_allocvec(&old).expect("encode");
        let m: ClusterMap = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!((m.cluster_id.as_str(), m.version, m.placement_members.len(), m.tokens.len()), ("c1", 7, 3, 0));
        // And a map with tokens keeps them.
        let mut with = m.clone();
        with.tokens.push(crate::TokenRecord { name: "app".into(), role: crate::Role::Write, hash: vec![9; 32] });
        let back: ClusterMap = postcard::from_bytes(&postcard::to_allocvec(&with).expect("encode")).expect("decode");
        assert_eq!(back, with);
    }

    #[test]
    fn addresses_are_ip_or_dns_names_with_a_port() {
        for ok in ["10.0.0.1:7001", "[::1]:7001", "db1:7001", "db-1.example.com:7001", "localhost:9101", "node.internal.:7001"] {
            assert_eq!(check_addr(ok, true), Ok(()), "{ok}");
        }
        for bad in ["10.0.0.1", "db1", "db1:70000", ":7001", "-db:7001", "db_1:7001", "a..b:7001", "1.2.3:7001", "db1:http"] {
            assert!(check_addr(bad, false).is_err(), "{bad} passed");
        }
        for port_0 in ["db1:0", "10.0.0.1:0"] {
            assert!(check_addr(port_0, false).is_ok(), "binding port 0 takes a free port");
            assert!(check_addr(port_0, true).is_err(), "no node can dial port 0");
        }
        assert!(check_addr("0.0.0.0:7001", false).is_ok(), "a node may bind every address");
        assert!(check_addr("0.0.0.0:7001", true).is_err(), "but no other node can dial it");
    }
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

    /// A shard owns exactly `[start, end)`, the last one also `u64::MAX`: a key on a boundary
    /// belongs to exactly one shard.
    #[test]
    fn a_shard_owns_its_range_and_nothing_past_its_bounds() {
        let mid = ShardDesc { id: 2, start: 100, end: 200, replicas: vec![], epoch: Epoch::default() };
        assert!(mid.contains(100) && mid.contains(199));
        assert!(!mid.contains(99) && !mid.contains(200) && !mid.contains(u64::MAX) && !mid.contains(0));
        let last = ShardDesc { id: 3, start: 200, end: u64::MAX, replicas: vec![], epoch: Epoch::default() };
        assert!(last.contains(200) && last.contains(u64::MAX - 1) && last.contains(u64::MAX));
        assert!(!last.contains(199));
        let first = ShardDesc { id: 1, start: 0, end: 100, replicas: vec![], epoch: Epoch::default() };
        assert!(first.contains(0) && !first.contains(100) && !first.contains(u64::MAX));
    }

    #[test]
    fn lookups_find_exactly_what_was_asked() {
        let shard = |id, replicas: Vec<NodeId>| ShardDesc { id, start: 0, end: 0, replicas, epoch: Epoch::default() };
        let node = |id| NodeInfo {
            id,
            peer_addr: String::new(),
            client_addr: String::new(),
            metrics_addr: String::new(),
            state: NodeState::Up,
            incarnation: 0,
        };
        let mut map = ClusterMap::default();
        assert!(!map.is_bootstrapped());
        map.shards = vec![shard(1, vec![1, 2, 3]), shard(2, vec![2, 3, 4]), shard(3, vec![3, 4, 5])];
        map.nodes = vec![node(1), node(2), node(3)];
        map.moves = vec![MoveRecord { shard: 2, from: 4, to: 1, epoch: Epoch::default(), reason: "repair".into() }];
        assert!(map.is_bootstrapped());
        assert_eq!(map.shard(2).map(|s| s.id), Some(2));
        assert!(map.shard(9).is_none());
        assert_eq!(map.node(3).map(|n| n.id), Some(3));
        assert!(map.node(9).is_none());
        assert_eq!(map.move_of(2).map(|m| (m.from, m.to)), Some((4, 1)));
        assert!(map.move_of(1).is_none());
        assert_eq!((map.replicas_on(1), map.replicas_on(3), map.replicas_on(4), map.replicas_on(9)), (1, 3, 2, 0));
    }

    #[test]
    fn node_states_have_distinct_names() {
        let all = [NodeState::Joining, NodeState::Up, NodeState::Down, NodeState::Decommissioning, NodeState::Removed];
        let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["joining", "up", "down", "decommissioning", "removed"]);
    }
}
