//! Request and response messages of the client and peer protocols.

use serde::{Deserialize, Serialize};

use crate::{ClusterMap, Epoch, GroupId, MoveRecord, NodeId, NodeInfo, NodeState, PlacementSettings, RequestError};

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
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
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
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expect: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
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
    /// Who this node is (its id and addresses).
    Identify,
    /// Asks a node that belongs to no cluster yet to join one through any of these members'
    /// client addresses (`ringctl node add`); answered once it is registered.
    JoinCluster {
        through: Vec<String>,
    },
    /// Registers a new node (state joining); the placement leader fills it by rebalancing.
    /// Answered with the map that lists it. Any node forwards this to the placement leader.
    Join {
        node: NodeInfo,
    },
    /// Operator lifecycle changes: `Decommissioning` drains a node, `Up` cancels that,
    /// `Removed` forgets a node (refused while it holds replicas, unless `force`).
    SetNodeState {
        node: NodeId,
        state: NodeState,
        force: bool,
    },
    /// The placement leader's view: nodes, moves in flight, the plan and what is stuck.
    PlacementStatus,
    SetPlacementSettings {
        settings: PlacementSettings,
    },
    /// To the node to drain: `on` hands every leadership it holds to other voters and keeps new
    /// ones away (until `on: false` or its next start); answered at once, progress shows in
    /// `NodeStatus`.
    Drain {
        on: bool,
    },
    /// Creates the cluster from the nodes in the receiving node's `seeds` (sent to any of
    /// them). On a cluster already created with this shape it answers `Initialized` with
    /// `already: true`; on another shape it refuses.
    Init {
        shards: u64,
        replication: usize,
    },
    /// A read-modify-write of one key (increment, append, counted delete), applied by the
    /// shard's state machine as one Raft entry: atomic, and exactly once with a session.
    /// Answered with `Int`.
    Apply {
        shard: GroupId,
        epoch: Epoch,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        op: KeyOp,
        session: Option<Session>,
    },
    /// Adds an access token for the HTTP and Redis gateways: only its SHA-256 `hash` is sent
    /// and stored (placement admin; names are unique).
    CreateToken {
        name: String,
        role: crate::Role,
        #[serde(with = "serde_bytes")]
        hash: Vec<u8>,
    },
    /// Revokes the token called `name` (placement admin).
    RevokeToken {
        name: String,
    },
    /// The tokens' names and roles (never their hashes).
    ListTokens,
}

/// What an `Apply` request does to its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOp {
    /// Adds to the key's value, read as a decimal i64 (absent: 0); answers the new value.
    /// Refused (`Invalid`) if the value is not such a number or the sum overflows.
    Incr(i64),
    /// Appends bytes to the value (absent: empty); answers the new length. Refused if the
    /// result would be over the node's value size limit.
    Append(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Deletes the key; answers 1 if it existed, else 0.
    DeleteCount,
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
            ClientRequest::Identify => "identify",
            ClientRequest::JoinCluster { .. } => "join_cluster",
            ClientRequest::Join { .. } => "join",
            ClientRequest::SetNodeState { .. } => "set_node_state",
            ClientRequest::PlacementStatus => "placement_status",
            ClientRequest::SetPlacementSettings { .. } => "set_placement_settings",
            ClientRequest::Drain { .. } => "drain",
            ClientRequest::Init { .. } => "init",
            ClientRequest::Apply { op: KeyOp::Incr(_), .. } => "incr",
            ClientRequest::Apply { op: KeyOp::Append(_), .. } => "append",
            ClientRequest::Apply { op: KeyOp::DeleteCount, .. } => "delete_count",
            ClientRequest::CreateToken { .. } => "create_token",
            ClientRequest::RevokeToken { .. } => "revoke_token",
            ClientRequest::ListTokens => "list_tokens",
        }
    }

    /// Requests only the placement leader answers; other nodes forward them to it.
    pub fn is_placement_admin(&self) -> bool {
        matches!(
            self,
            ClientRequest::Join { .. }
                | ClientRequest::SetNodeState { .. }
                | ClientRequest::PlacementStatus
                | ClientRequest::SetPlacementSettings { .. }
                | ClientRequest::CreateToken { .. }
                | ClientRequest::RevokeToken { .. }
                | ClientRequest::ListTokens
        )
    }
}

/// A successful reply of the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Map(ClusterMap),
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// One value per requested key, in request order.
    Values(Vec<Option<Vec<u8>>>),
    Done,
    Cas {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    NodeStatus(NodeStatus),
    Identity(NodeInfo),
    Placement(Box<PlacementReport>),
    /// The answer to `Init`: the cluster's id, and whether it existed before this request.
    Initialized {
        cluster_id: String,
        already: bool,
    },
    /// The answer to `Apply`.
    Int(i64),
    /// The answer to `ListTokens` (hashes left empty).
    Tokens(Vec<crate::TokenRecord>),
}

/// The placement leader's report, for `ringctl node list` and `ringctl rebalance`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementReport {
    /// The placement leader that made this report.
    pub leader: NodeId,
    pub map_version: u64,
    pub settings: PlacementSettings,
    pub nodes: Vec<NodeReport>,
    pub moves: Vec<MoveProgress>,
    /// What the planner would start next (moves beyond the per-node limits wait).
    pub plan: Vec<PlannedOp>,
    /// Shards that need a move the planner cannot make, with the reason.
    pub stuck: Vec<(GroupId, String)>,
    /// Replicas and leaders of every up node are within ±1 of the mean and nothing is moving.
    pub balanced: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub id: NodeId,
    pub state: NodeState,
    pub client_addr: String,
    pub replicas: usize,
    pub leaders: usize,
    /// Milliseconds since its last heartbeat reached this placement leader (`None`: not yet).
    pub heartbeat_age_ms: Option<u64>,
    /// Approximate bytes of the shard data it holds in SST files (data still in the memtable is
    /// not counted).
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProgress {
    pub record: MoveRecord,
    /// "starting", "learner", "promoting" or "finishing".
    pub stage: String,
    /// Log index the new replica has matched, and the leader's last index.
    pub matched: u64,
    pub last: u64,
    /// Approximate bytes of the shard.
    pub bytes: u64,
    pub elapsed_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedOp {
    /// "move" or "transfer_leader".
    pub kind: String,
    pub shard: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    pub reason: String,
    pub bytes: u64,
}

/// What a node tells the placement leader every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    pub node: NodeId,
    /// The incarnation of the node's data dir (see [`NodeInfo::incarnation`]).
    pub incarnation: u64,
    pub map_version: u64,
    pub groups: Vec<GroupStat>,
    /// Replicas this node could not start (quarantined): the placement leader rebuilds them
    /// elsewhere.
    pub quarantined: Vec<GroupId>,
    /// Draining: the placement leader moves no leadership to it.
    pub draining: bool,
}

/// One replica's statistics in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStat {
    pub group: GroupId,
    pub is_leader: bool,
    pub term: u64,
    pub applied: u64,
    /// Approximate bytes of the shard's data on this node.
    pub bytes: u64,
    /// Entries applied per second since the previous heartbeat.
    pub applied_per_sec: u64,
}

/// Where a replica move stands, as the shard's leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveStage {
    /// The new replica is a learner that has matched `matched` of the leader's `last`.
    Learner { matched: u64, last: u64 },
    /// The voters are the new set: the move is complete in Raft.
    Done { voters: Vec<NodeId> },
    /// The voters are neither the old nor the new set: someone else changed them.
    Conflict { voters: Vec<NodeId> },
    /// The move was cancelled before `to` became a voter; the voters are unchanged.
    Cancelled,
}

pub type ClientResponse = Result<ClientReply, RequestError>;

/// What one node says about its replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub map_version: u64,
    pub groups: Vec<GroupStatus>,
    /// Replicas this node could not start (state it cannot recover), with the reason. They are
    /// left alone on disk; the other replicas of those shards serve.
    pub quarantined: Vec<(GroupId, String)>,
    /// Whether the node is draining (handing its leaderships away, taking none).
    pub draining: bool,
    /// Why the node is not ready to serve (its `/readyz`); empty when it is.
    pub not_ready: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    /// Entries the group committed (as this replica last heard) that its log does not hold yet.
    pub behind: u64,
}

/// A Raft message as length-prefixed bytes the wire does not interpret: the default payload of
/// [`PeerRequest::Raft`] and [`PeerReply::Raft`], for code that does not know the node's Raft
/// types. It is not the node's encoding: the node sends and reads its own message type in its
/// place, inline in the frame with no length before it, so `PeerRequest<Opaque>` decodes every
/// peer message but a Raft one as the node does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opaque(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// A request of the peer protocol. `M` is the node's Raft message type: the wire does not know
/// openraft's types, so that an openraft upgrade touches only the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest<M = Opaque> {
    /// A Raft message for `group`.
    Raft { from: NodeId, group: GroupId, msg: M },
    /// The cluster map as the placement member that answers knows it.
    GetMap,
    /// A node's periodic report to the placement leader.
    Heartbeat(NodeHeartbeat),
    /// A placement admin request forwarded to the placement leader.
    Admin(Box<ClientRequest>),
    /// From the placement leader to a shard's leader: take the next step of moving `shard`'s
    /// replica from `from` to `to` (add `to` as a learner; once it caught up, replace `from`
    /// by `to` through joint consensus). Idempotent; answers where the move stands. With
    /// `cancel`, drops the learner instead (a move already complete in Raft stays complete).
    MoveStep { shard: GroupId, from: NodeId, to: NodeId, to_peer_addr: String, cancel: bool, fence: PlacementFence },
    /// From the placement leader to a shard's leader: hand leadership to `to`.
    TransferLeader { shard: GroupId, to: NodeId, fence: PlacementFence },
    /// Node liveness, once per pair of nodes for all their groups: a node that stops answering
    /// these wakes the quiet groups it led.
    Ping,
    /// From the leader of an idle `group` (term `term`, log at `last_log_index`, every follower
    /// caught up): stop ticking until the next message of the group. Refused by a follower that
    /// sees another leader or log.
    Quiesce { group: GroupId, term: u64, last_log_index: u64 },
    /// Who the receiving node is (`ringctl init` asks each seed).
    Identify,
    /// From the node `ringctl init` reached, to the first placement member: create the
    /// cluster of `nodes`. Answered with `Admin` holding the answer to `init`.
    Bootstrap { nodes: Vec<NodeInfo>, shards: u64, replication: usize },
    /// Raft messages of many groups, all from node `from`, sent together: answered by one
    /// [`PeerReply::RaftBatch`] holding an answer for each, in order.
    RaftBatch { from: NodeId, msgs: Vec<(GroupId, M)> },
}

/// Most messages one [`PeerRequest::RaftBatch`] may carry; a receiver refuses a larger batch.
pub const RAFT_BATCH_MESSAGES_MAX: usize = 1024;

/// What an order of the placement leader carries so a node can refuse one from a deposed leader:
/// the leader's term in the placement group and the map version it acted on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementFence {
    pub term: u64,
    pub map_version: u64,
}

/// An answer of the peer protocol; `A` is the node's type of Raft answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerReply<A = Opaque> {
    Raft(A),
    Map(ClusterMap),
    Done,
    Admin(ClientResponse),
    MoveStep(MoveStage),
    Identity(NodeInfo),
    /// The answers to a [`PeerRequest::RaftBatch`], one per message and in its order: what
    /// the group answered, or why it could not take the message.
    RaftBatch(Vec<Result<A, RequestError>>),
}

pub type PeerResponse<A = Opaque> = Result<PeerReply<A>, RequestError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields marked `serde_bytes` (copied whole instead of byte by byte) encode exactly as
    /// plain vectors do, so logs, sessions and peers from before read the same.
    #[test]
    fn byte_fields_keep_the_encoding_of_plain_vectors() {
        #[derive(Serialize)]
        enum PlainRequest {
            Raft { from: NodeId, group: GroupId, payload: Vec<u8> },
        }
        #[derive(Serialize)]
        enum PlainClient {
            _GetMap,
            _Get,
            Put { shard: GroupId, epoch: Epoch, key: Vec<u8>, value: Vec<u8>, session: Option<Session> },
        }
        #[derive(Serialize)]
        enum PlainReply {
            _Map,
            Value(Option<Vec<u8>>),
        }
        let payload: Vec<u8> = (0..=255).collect();
        let ours: PeerRequest = PeerRequest::Raft { from: 3, group: 9, msg: Opaque(payload.clone()) };
        let plain = PlainRequest::Raft { from: 3, group: 9, payload: payload.clone() };
        assert_eq!(postcard::to_allocvec(&ours).expect("enc"), postcard::to_allocvec(&plain).expect("enc"));
        let session = Some(Session { client: 1, seq: 2, acked_below: 1 });
        let ours =
            ClientRequest::Put { shard: 1, epoch: Epoch { conf_ver: 2, version: 3 }, key: b"k".to_vec(), value: payload.clone(), session };
        let plain =
            PlainClient::Put { shard: 1, epoch: Epoch { conf_ver: 2, version: 3 }, key: b"k".to_vec(), value: payload.clone(), session };
        let bytes = postcard::to_allocvec(&ours).expect("enc");
        assert_eq!(bytes, postcard::to_allocvec(&plain).expect("enc"));
        assert_eq!(postcard::from_bytes::<ClientRequest>(&bytes).expect("dec"), ours);
        for v in [None, Some(vec![]), Some(payload)] {
            let ours = postcard::to_allocvec(&ClientReply::Value(v.clone())).expect("enc");
            assert_eq!(ours, postcard::to_allocvec(&PlainReply::Value(v.clone())).expect("enc"));
            assert_eq!(postcard::from_bytes::<ClientReply>(&ours).expect("dec"), ClientReply::Value(v));
        }
    }
}
