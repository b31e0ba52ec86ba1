//! Creating a cluster: the first placement member starts group 0 and commits the first map.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_placement::{validate_bootstrap, PlacementCommand};
use ringkv_storage::{Command, CommandResult, ReplicaKind};
use ringkv_wire::{ClientReply, ClientResponse, NodeId, NodeInfo, RequestError, PLACEMENT_GROUP};

use crate::node::Node;

/// How long bootstrap waits for the placement group to elect this node.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn bootstrap(node: &Arc<Node>, nodes: Vec<NodeInfo>, shards: u64, replication: usize) -> ClientResponse {
    validate_bootstrap(&nodes, shards, replication).map_err(|e| RequestError::Malformed(e.to_string()))?;
    let internal = |e: crate::node::NodeError| RequestError::Internal(e.to_string());
    if node.map().is_bootstrapped() || node.db.cluster_id().map_err(|e| RequestError::Internal(e.to_string()))?.is_some() {
        return Err(RequestError::NotPermitted("this node already belongs to a bootstrapped cluster".into()));
    }
    let mut ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    let members: Vec<NodeId> = ids.iter().copied().take(replication).collect();
    if members.first() != Some(&node.id()) {
        return Err(RequestError::NotPermitted(format!("send bootstrap to node {}, the first placement member", members[0])));
    }
    let addrs: Vec<(NodeId, String)> = nodes.iter().map(|n| (n.id, n.peer_addr.clone())).collect();
    let r = node.ensure_replica(PLACEMENT_GROUP, ReplicaKind::Placement).await.map_err(internal)?;
    node.initialize(&r, &members, &addrs).await.map_err(internal)?;
    let cluster_id = format!("{:032x}", rand::random::<u128>());
    let cmd = Command::Placement(PlacementCommand::Bootstrap { cluster_id, nodes, shards, replication });
    let started = Instant::now();
    loop {
        match r.active().write(cmd.clone()).await {
            Ok(data) => match data {
                CommandResult::Placement(Ok(())) => break,
                CommandResult::Placement(Err(e)) => return Err(RequestError::NotPermitted(e.to_string())),
                other => return Err(RequestError::Internal(format!("unexpected result {other:?}"))),
            },
            Err(e) if started.elapsed() < BOOTSTRAP_TIMEOUT => {
                tracing::debug!("bootstrap waits for the placement group: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(RequestError::Unavailable(format!("placement group did not accept the bootstrap: {e}"))),
        }
    }
    if let Ok(Some(map)) = r.sm.placement_map() {
        node.adopt_map(map).await.map_err(internal)?;
    }
    tracing::info!("cluster bootstrapped");
    Ok(ClientReply::Done)
}
