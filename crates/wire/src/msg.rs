//! Request and response messages of the client and peer protocols.

use serde::{Deserialize, Serialize};

use crate::{ClusterMap, Epoch, GroupId, NodeId, RequestError};

/// One message on a multiplexed stream: the id pairs a response with its request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

/// Identifies one write of one client, so a retried write applies at most once.
///
/// `seq` is unique per client; `acked_below` is the lowest `seq` the client may still retry, so
/// the shard can forget the answers to older ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub client: u64,
    pub seq: u64,
    pub acked_below: u64,
}

/// A request of the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// The cluster map as this node knows it.
    GetMap,
    /// Reads a key. Linearizable unless `stale`, which reads this replica's applied state.
    Get {
        shard: GroupId,
        epoch: Epoch,
        key: Vec<u8>,
        stale: bool,
    },
    Put {
        shard: GroupId,
        epoch: Epoch,
        key: Vec<u8>,
        value: Vec<u8>,
        session: Option<Session>,
    },
    Delete {
        shard: GroupId,
        epoch: Epoch,
        key: Vec<u8>,
        session: Option<Session>,
    },
    /// Sets `key` to `new` only if its current value is `expect` (`None`: absent).
    Cas {
        shard: GroupId,
        epoch: Epoch,
        key: Vec<u8>,
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
        session: Option<Session>,
    },
    /// Reads several keys of one shard (one read barrier for all).
    BatchGet {
        shard: GroupId,
        epoch: Epoch,
        keys: Vec<Vec<u8>>,
        stale: bool,
    },
    /// Writes several keys of one shard in one Raft entry.
    BatchPut {
        shard: GroupId,
        epoch: Epoch,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        session: Option<Session>,
    },
    /// Asks the shard's leader (the node receiving this) to hand leadership to `to`.
    TransferLeader {
        shard: GroupId,
        to: NodeId,
    },
    /// Roles, leaders and applied indexes of this node's replicas.
    NodeStatus,
    /// Creates the cluster: only accepted by a fresh node that is to be a placement member.
    Bootstrap {
        nodes: Vec<crate::NodeInfo>,
        shards: u64,
        replication: usize,
    },
    /// Test hook (only when the node runs with fault injection enabled): drop all traffic to
    /// and from these peers.
    SetPartition {
        isolated_from: Vec<NodeId>,
    },
}

impl ClientRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            ClientRequest::GetMap => "get_map",
            ClientRequest::Get { .. } => "get",
            ClientRequest::Put { .. } => "put",
            ClientRequest::Delete { .. } => "delete",
            ClientRequest::Cas { .. } => "cas",
            ClientRequest::BatchGet { .. } => "batch_get",
            ClientRequest::BatchPut { .. } => "batch_put",
            ClientRequest::TransferLeader { .. } => "transfer_leader",
            ClientRequest::NodeStatus => "node_status",
            ClientRequest::Bootstrap { .. } => "bootstrap",
            ClientRequest::SetPartition { .. } => "set_partition",
        }
    }
}

/// A successful reply of the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Map(ClusterMap),
    Value(Option<Vec<u8>>),
    /// One value per requested key, in request order.
    Values(Vec<Option<Vec<u8>>>),
    Done,
    Cas {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    NodeStatus(NodeStatus),
}

pub type ClientResponse = Result<ClientReply, RequestError>;

/// What one node says about its replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub map_version: u64,
    pub groups: Vec<GroupStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
}

/// Which openraft RPC a peer frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
    /// A whole snapshot: `{vote, meta, data}`.
    Snapshot,
}

/// A request of the peer protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// An openraft message for `group`, postcard-encoded by the node; the wire does not know
    /// openraft's types so that an openraft upgrade touches only the node.
    Raft { from: NodeId, group: GroupId, rpc: RaftRpc, payload: Vec<u8> },
    /// The cluster map as the placement member that answers knows it.
    GetMap,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerReply {
    Raft(Vec<u8>),
    Map(ClusterMap),
}

pub type PeerResponse = Result<PeerReply, RequestError>;
