//! Reports on the cluster built from the map and every node's status: the JSON of `ringctl -o
//! json` and of the HTTP gateway's `/v1/status`, `/v1/nodes` and `/v1/shards/{id}`.

use serde::Serialize;

use crate::{leaders_of, Client, Error};
use ringkv_wire::NodeState;

#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    pub id: u64,
    pub state: String,
    pub client_addr: String,
    pub replicas: usize,
    pub leaders: usize,
    pub reachable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardRow {
    pub id: u64,
    pub range: [u64; 2],
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
    pub epoch: ringkv_wire::Epoch,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub nodes: Vec<NodeRow>,
    pub shards: Vec<ShardRow>,
    /// Replicas a node could not start: `(node, shard, reason)`.
    pub quarantined: Vec<(u64, u64, String)>,
}

/// Every node and shard as the map and the nodes' own reports say (`ringctl status`, `GET /v1/status`).
pub async fn status(client: &Client) -> Result<Status, Error> {
    let map = client.refresh_map().await?;
    let reports: Vec<_> = client.node_reports().await.into_iter().flatten().collect();
    let reachable: std::collections::BTreeSet<u64> = reports.iter().map(|r| r.node).collect();
    let leader_of = leaders_of(&reports);
    let shards: Vec<ShardRow> = map
        .shards
        .iter()
        .map(|s| ShardRow {
            id: s.id,
            range: [s.start, s.end],
            replicas: s.replicas.clone(),
            leader: leader_of.get(&s.id).copied(),
            epoch: s.epoch,
        })
        .collect();
    let nodes = map
        .nodes
        .iter()
        .map(|n| NodeRow {
            id: n.id,
            state: match n.state {
                NodeState::Up | NodeState::Joining | NodeState::Decommissioning if !reachable.contains(&n.id) => "unreachable".into(),
                s => s.as_str().to_string(),
            },
            client_addr: n.client_addr.clone(),
            replicas: shards.iter().filter(|s| s.replicas.contains(&n.id)).count(),
            leaders: shards.iter().filter(|s| s.leader == Some(n.id)).count(),
            reachable: reachable.contains(&n.id),
        })
        .collect();
    let quarantined = reports.iter().flat_map(|r| r.quarantined.iter().map(|(g, why)| (r.node, *g, why.clone()))).collect();
    Ok(Status { nodes, shards, quarantined })
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaRow {
    pub node: u64,
    /// "leader", "follower", or "unreachable" when the node did not answer.
    pub role: String,
    pub term: Option<u64>,
    pub applied: Option<u64>,
    /// The voters as this replica knows them.
    pub voters: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardDetail {
    pub id: u64,
    pub range: [u64; 2],
    pub epoch: ringkv_wire::Epoch,
    pub leader: Option<u64>,
    pub replicas: Vec<ReplicaRow>,
}

/// One shard and each replica's view of it (`ringctl shard show`, `GET /v1/shards/{id}`); `None`
/// if the map has no such shard.
pub async fn shard_detail(client: &Client, id: u64) -> Result<Option<ShardDetail>, Error> {
    let map = client.refresh_map().await?;
    let Some(desc) = map.shard(id) else { return Ok(None) };
    let reports = client.node_reports().await;
    let mut replicas = Vec::new();
    for node in &desc.replicas {
        let group = reports.iter().flatten().find(|r| r.node == *node).and_then(|r| r.groups.iter().find(|g| g.group == id));
        replicas.push(match group {
            Some(g) => ReplicaRow {
                node: *node,
                role: if g.is_leader { "leader" } else { "follower" }.into(),
                term: Some(g.term),
                applied: Some(g.applied),
                voters: g.voters.clone(),
            },
            None => ReplicaRow { node: *node, role: "unreachable".into(), term: None, applied: None, voters: vec![] },
        });
    }
    let leader = replicas.iter().filter(|r| r.role == "leader").max_by_key(|r| r.term).map(|r| r.node);
    Ok(Some(ShardDetail { id, range: [desc.start, desc.end], epoch: desc.epoch, leader, replicas }))
}
