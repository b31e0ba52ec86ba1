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
use crate::snapshot::{SnapshotThrottle, SNAPSHOT_CHUNK_BYTES};

/// How long a snapshot transfer may take beyond the time its bytes need at the throttled rate.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Log entries get openraft's deadline, at least `append_floor`, plus the time to move their
/// bytes at this rate. openraft's own deadline for an append is 3/4 of a heartbeat interval:
/// on a busy node, a batch of large entries missed it, was sent again, missed it again, and
/// the retries became the load (multi-second tails at 16-64 KiB values). Heartbeats (appends
/// without entries) keep openraft's deadline, so leadership checks stay as quick.
pub const SLOWEST_PEER_BYTES_PER_SEC: f64 = 8.0 * 1024.0 * 1024.0;

/// The deadline of an append carrying `bytes` of entries.
pub fn append_timeout(openraft_ttl: Duration, floor: Duration, bytes: usize) -> Duration {
    openraft_ttl.max(floor) + Duration::from_secs_f64(bytes as f64 / SLOWEST_PEER_BYTES_PER_SEC)
}

pub struct NetworkFactory {
    pub me: NodeId,
    pub group: GroupId,
    pub pool: Arc<PeerPool>,
    /// Least time an append carrying entries gets (the election timeout).
    pub append_floor: Duration,
    pub throttle: Arc<SnapshotThrottle>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> GroupClient {
        GroupClient {
            me: self.me,
            group: self.group,
            target,
            addr: node.peer_addr.clone(),
            pool: self.pool.clone(),
            append_floor: self.append_floor,
            throttle: self.throttle.clone(),
        }
    }
}

pub struct GroupClient {
    me: NodeId,
    group: GroupId,
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
    append_floor: Duration,
    throttle: Arc<SnapshotThrottle>,
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
    /// Sends one RPC; `timeout` gets the payload's size once it is encoded.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: RaftRpc,
        req: &Req,
        timeout: impl FnOnce(usize) -> Duration,
    ) -> Result<Resp, CallError> {
        let payload = postcard::to_allocvec(req).map_err(|e| CallError::Network(e.to_string()))?;
        let timeout = timeout(payload.len());
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
        let (ttl, floor) = (option.soft_ttl(), self.append_floor);
        let has_entries = !rpc.entries.is_empty();
        let timeout = move |bytes| if has_entries { append_timeout(ttl, floor, bytes) } else { ttl };
        flatten(self.call(RaftRpc::AppendEntries, &rpc, timeout).await)
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::Vote, &rpc, |_| option.soft_ttl()).await)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::PreVote, &rpc, |_| option.soft_ttl()).await)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        flatten(self.call(RaftRpc::TransferLeader, &req, |_| option.soft_ttl()).await)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.send_snapshot(vote, snapshot) => r,
        }
    }
}

impl GroupClient {
    /// Sends a snapshot in chunks, within the node's transfer slots and byte rate.
    async fn send_snapshot(
        &self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let _slot = self.throttle.slot().await;
        let started = std::time::Instant::now();
        let data = snapshot.snapshot.into_inner();
        let meta = snapshot.meta;
        let id = format!("{:?}", meta.last_log_id);
        let total = data.len();
        let deadline = SNAPSHOT_TIMEOUT + self.throttle.time_for(total);
        let mut offset = 0;
        loop {
            if started.elapsed() > deadline {
                return Err(StreamingError::from(RPCError::Network(NetworkError::from_string(format!(
                    "snapshot transfer not done within {deadline:?} ({offset} of {total} bytes sent)"
                )))));
            }
            let end = (offset + SNAPSHOT_CHUNK_BYTES).min(total);
            let chunk = data.get(offset..end).unwrap_or_default();
            self.throttle.pace(chunk.len()).await;
            // `&[u8]` encodes as the `Vec<u8>` the peer decodes.
            let msg: (&VoteOf<TypeConfig>, &SnapshotMeta, &str, u64, u64, &[u8]) = (&vote, &meta, &id, offset as u64, total as u64, chunk);
            let floor = self.append_floor;
            let r = self.call(RaftRpc::SnapshotChunk, &msg, |bytes| append_timeout(floor, floor, bytes)).await;
            metrics::counter!("ringkv_raft_snapshot_sent_bytes_total").increment(chunk.len() as u64);
            match flatten::<Option<SnapshotResponse<TypeConfig>>>(r).map_err(StreamingError::from)? {
                Some(resp) => return Ok(resp),
                None if end < total => offset = end,
                None => {
                    return Err(StreamingError::from(RPCError::Network(NetworkError::from_string(
                        "the receiver wants more of a snapshot that was sent whole".to_string(),
                    ))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_get_time_for_their_size_and_never_less_than_the_floor() {
        let ttl = Duration::from_millis(187);
        let floor = Duration::from_millis(1000);
        assert_eq!(append_timeout(ttl, floor, 0), floor);
        // 4 MiB of entries (64 x 64 KiB) at 8 MiB/s: half a second more.
        assert_eq!(append_timeout(ttl, floor, 4 << 20), floor + Duration::from_millis(500));
        // openraft's deadline wins when it is the longer one.
        assert_eq!(append_timeout(Duration::from_secs(3), floor, 0), Duration::from_secs(3));
    }
}
