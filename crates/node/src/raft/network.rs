//! openraft's network for one group, over the node's shared peer connections.
//!
//! **API boundary:** openraft's RPC types are postcard-encoded here and decoded in `raft::serve`;
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
use crate::snapshot::{Part, SnapshotThrottle, SNAPSHOT_CHUNK_BYTES};

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
        let bulk = rpc == RaftRpc::SnapshotChunk;
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
    /// Sends a snapshot: a header, every file in chunks, then the end; within the node's
    /// transfer slots and byte rate. Only one chunk is in memory at a time.
    async fn send_snapshot(
        &self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let _slot = self.throttle.slot().await;
        let started = std::time::Instant::now();
        let meta = snapshot.meta;
        let data = snapshot.snapshot;
        let id = format!("{:016x}", rand::random::<u64>());
        let total = data.len() as usize;
        let deadline = SNAPSHOT_TIMEOUT + self.throttle.time_for(total);
        let failed = |m: String| StreamingError::from(RPCError::<TypeConfig>::Network(NetworkError::from_string(m)));
        let header: crate::snapshot::SendPart<'_> = match &data {
            SnapshotData::Memory(b) => Part::Header { memory: Some(b.as_slice()), sizes: vec![] },
            SnapshotData::Files(f) => Part::Header { memory: None, sizes: f.files.iter().map(|(_, n)| *n).collect() },
        };
        let floor = self.append_floor;
        self.send_part(&vote, &meta, &id, &header, floor).await?;
        if let SnapshotData::Files(f) = &data {
            for rows in crate::snapshot::session_chunks(&f.sessions) {
                self.throttle.pace(rows.iter().map(|(k, v)| k.len() + v.len()).sum()).await;
                self.send_part(&vote, &meta, &id, &Part::Sessions { rows }, floor).await?;
            }
            let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            for (i, (path, size)) in f.files.iter().enumerate() {
                use std::io::Read;
                let mut file = std::fs::File::open(path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
                let mut offset = 0u64;
                while offset < *size {
                    if started.elapsed() > deadline {
                        return Err(failed(format!("snapshot transfer not done within {deadline:?}")));
                    }
                    let n = file.read(&mut buf).map_err(|e| failed(format!("{}: {e}", path.display())))?;
                    if n == 0 {
                        return Err(failed(format!("{} ended at {offset} of {size} bytes", path.display())));
                    }
                    let chunk = buf.get(..n).unwrap_or_default();
                    self.throttle.pace(n).await;
                    self.send_part(&vote, &meta, &id, &Part::Bytes { file: i as u32, offset, data: chunk }, floor).await?;
                    metrics::counter!("ringkv_raft_snapshot_sent_bytes_total").increment(n as u64);
                    offset += n as u64;
                }
            }
        }
        // The answer to the end comes after the install: syncing and ingesting every file.
        let install = SNAPSHOT_TIMEOUT + Duration::from_secs_f64(total as f64 / SLOWEST_PEER_BYTES_PER_SEC);
        match self.send_part(&vote, &meta, &id, &Part::End, install).await? {
            Some(resp) => Ok(resp),
            None => Err(failed("the receiver did not install the snapshot".into())),
        }
    }

    /// Sends one part; it gets `floor` plus the time for its bytes.
    async fn send_part(
        &self,
        vote: &VoteOf<TypeConfig>,
        meta: &SnapshotMeta,
        id: &str,
        part: &crate::snapshot::SendPart<'_>,
        floor: Duration,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, StreamingError<TypeConfig>> {
        let msg = (vote, meta, id, part);
        let r = self.call(RaftRpc::SnapshotChunk, &msg, |bytes| append_timeout(floor, floor, bytes)).await;
        flatten::<Option<SnapshotResponse<TypeConfig>>>(r).map_err(StreamingError::from)
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
