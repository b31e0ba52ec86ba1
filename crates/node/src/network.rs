//! openraft's network for one group, over the node's shared peer connections.
//!
//! **API boundary:** openraft's RPC types are postcard-encoded here and decoded in `service`;
//! the wire protocol carries them as opaque bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::alias::{SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use ringkv_storage::raft_store::SnapshotData;
use ringkv_storage::{PeerNode, SnapshotMeta, TypeConfig};
use ringkv_wire::{GroupId, NodeId, PeerReply, PeerRequest, RaftRpc};
use serde::{de::DeserializeOwned, Serialize};

use crate::peer::PeerPool;

/// How long a snapshot transfer may take.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NetworkFactory {
    pub me: NodeId,
    pub group: GroupId,
    pub pool: Arc<PeerPool>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> GroupClient {
        GroupClient { me: self.me, group: self.group, target, addr: node.peer_addr.clone(), pool: self.pool.clone() }
    }
}

pub struct GroupClient {
    me: NodeId,
    group: GroupId,
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
}

/// Why a peer call failed, before it is mapped to the error type openraft wants.
enum CallError {
    Unreachable(String),
    Network(String),
}

impl CallError {
    fn rpc(self) -> RPCError<TypeConfig> {
        match self {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
        }
    }
}

impl GroupClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, rpc: RaftRpc, req: &Req, timeout: Duration) -> Result<Resp, CallError> {
        let payload = postcard::to_allocvec(req).map_err(|e| CallError::Network(e.to_string()))?;
        let req = PeerRequest::Raft { from: self.me, group: self.group, rpc, payload };
        let bulk = rpc == RaftRpc::Snapshot;
        match self.pool.call(self.target, &self.addr, &req, timeout, bulk).await {
            Ok(Ok(PeerReply::Raft(bytes))) => postcard::from_bytes(&bytes).map_err(|e| CallError::Network(format!("bad reply: {e}"))),
            Ok(Ok(other)) => Err(CallError::Network(format!("unexpected reply {other:?}"))),
            // The peer is up but cannot serve this group yet (no replica, shutting down): back off.
            Ok(Err(e)) => Err(CallError::Unreachable(e.to_string())),
            Err(ringkv_transport::RpcError::Timeout(d)) => Err(CallError::Network(format!("timed out after {d:?}"))),
            Err(e) => Err(CallError::Unreachable(e.to_string())),
        }
    }
}

/// What a peer answers to a Raft RPC: openraft's response, or why the group could not handle it.
pub type RaftReply<T> = Result<T, String>;

fn flatten<T>(r: Result<RaftReply<T>, CallError>) -> Result<T, RPCError<TypeConfig>> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(remote)) => Err(RPCError::Unreachable(Unreachable::from_string(remote))),
        Err(e) => Err(e.rpc()),
    }
}

impl RaftNetworkV2<TypeConfig> for GroupClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::AppendEntries, &rpc, option.soft_ttl()).await)
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::Vote, &rpc, option.soft_ttl()).await)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::PreVote, &rpc, option.soft_ttl()).await)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::TransferLeader, &req, option.soft_ttl()).await)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Borrows the shared snapshot buffer; `&[u8]` encodes as the `Vec<u8>` the peer decodes.
        let data = snapshot.snapshot.into_inner();
        let msg: (VoteOf<TypeConfig>, SnapshotMeta, &[u8]) = (vote, snapshot.meta, data.as_slice());
        let bytes = data.len();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.call(RaftRpc::Snapshot, &msg, SNAPSHOT_TIMEOUT) => {
                metrics::counter!("ringkv_raft_snapshot_sent_bytes_total").increment(bytes as u64);
                flatten(r).map_err(StreamingError::from)
            }
        }
    }
}
