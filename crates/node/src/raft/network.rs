//! openraft's network for one group, over the node's shared peer connections.
//!
//! **API boundary:** openraft's RPC types travel as [`RaftMsg`] and [`RaftAnswer`], encoded
//! once, inline in the peer frame; `raft::serve` hands them to the group.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::oneshot;

use futures::{Stream, StreamExt};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use ringkv_storage::log_cache::{FollowerHold, LogCache};
use ringkv_storage::raft_store::SnapshotData;
use ringkv_storage::{PeerNode, SnapshotMeta, TypeConfig};
use ringkv_wire::{GroupId, NodeId};

use crate::peer::{Lane, PeerPool};
use crate::raft::{PeerReply, PeerRequest, RaftAnswer, RaftMsg, SnapshotChunk};
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
    /// How long an append carrying only a commit index waits for the next append to ride in.
    pub commit_linger: Duration,
    /// Whether messages share frames with other groups' messages to the same peer ([`RaftOutbox`]).
    pub batch: bool,
    pub throttle: Arc<SnapshotThrottle>,
    /// The group's log tail: each follower's replication client keeps it from dropping what
    /// that follower has not acknowledged.
    pub cache: LogCache,
}

impl NetworkFactory {
    /// A client to `target`; `hold` for the replication client only. openraft also keeps a
    /// heartbeat client per follower for the whole term, whose appends carry no entries and
    /// stop while the group's timers rest: holding for it would pin applied entries under load.
    fn client(&self, target: NodeId, node: &PeerNode, hold: bool) -> GroupClient {
        GroupClient {
            me: self.me,
            group: self.group,
            target,
            addr: node.peer_addr.clone(),
            pool: self.pool.clone(),
            append_floor: self.append_floor,
            commit_linger: self.commit_linger,
            batch: self.batch,
            throttle: self.throttle.clone(),
            hold: hold.then(|| Arc::new(self.cache.hold_for_follower())),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupClient;

    /// The replication stream's client (also a vote's or a leader transfer's, which live for
    /// one call).
    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> GroupClient {
        self.client(target, node, true)
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &PeerNode) -> GroupClient {
        self.client(target, node, false)
    }

    async fn new_snapshot_client(&mut self, target: NodeId, node: &PeerNode) -> GroupClient {
        self.client(target, node, false)
    }
}

#[derive(Clone)]
pub struct GroupClient {
    me: NodeId,
    group: GroupId,
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
    append_floor: Duration,
    commit_linger: Duration,
    batch: bool,
    throttle: Arc<SnapshotThrottle>,
    /// Keeps the log tail for the follower (the replication client only).
    hold: Option<Arc<FollowerHold>>,
}

/// Why a peer call failed, before it is mapped to the error type openraft wants.
#[derive(Clone)]
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
    /// Sends one message; `timeout` gets the frame's size once it is encoded. With batching
    /// on, a message to a peer that other messages on the same lane are still waiting for may
    /// leave in one frame with the messages of other groups queued at the same moment
    /// ([`RaftOutbox`]).
    async fn call(
        &self,
        msg: RaftMsg,
        lane: Lane,
        timeout: impl FnOnce(usize) -> Duration + Send + 'static,
    ) -> Result<RaftAnswer, CallError> {
        if !self.batch || lane == Lane::Bulk {
            return self.call_alone(msg, lane, timeout).await;
        }
        let queue = self.pool.raft_outbox.queue(self.target, lane);
        let busy = queue.in_flight.fetch_add(1, Ordering::Relaxed) > 0;
        let _in_flight = InFlight(&queue);
        if !busy {
            return self.call_alone(msg, lane, timeout).await;
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiting = queue.lock();
            waiting.push(Queued { group: self.group, msg, timeout: Box::new(timeout), answer: tx });
            waiting.len() == 1
        };
        if first {
            // Let the tasks woken with this one queue their messages first. If this call is
            // dropped meanwhile, the guard sends what is queued.
            let mut flush = Flush { client: self.clone(), queue: queue.clone(), lane, armed: true };
            tokio::task::yield_now().await;
            flush.armed = false;
            let mut batch = std::mem::take(&mut *queue.lock());
            if batch.len() == 1 {
                let mine = batch.pop().expect("one queued message");
                return self.call_alone(mine.msg, lane, mine.timeout).await;
            }
            tokio::spawn(self.clone().send_batch(lane, batch));
        }
        rx.await.unwrap_or_else(|_| Err(CallError::Network("the batch carrying this message was dropped".into())))
    }

    /// Sends one message in a frame of its own.
    async fn call_alone(&self, msg: RaftMsg, lane: Lane, timeout: impl FnOnce(usize) -> Duration) -> Result<RaftAnswer, CallError> {
        let req = PeerRequest::Raft { from: self.me, group: self.group, msg };
        match self.pool.call_sized(self.target, &self.addr, &req, timeout, lane).await {
            Ok(Ok(PeerReply::Raft(answer))) => Ok(answer),
            Ok(Ok(other)) => Err(CallError::Network(format!("unexpected reply {other:?}"))),
            // The peer is up but cannot serve this group yet (no replica, shutting down): back off.
            Ok(Err(e)) => Err(CallError::Unreachable(e.to_string())),
            Err(e) => Err(CallError::from_rpc(e)),
        }
    }

    /// Sends queued messages of several groups to this client's peer, in frames of at most
    /// [`RAFT_BATCH_BYTES_MAX`] (or one larger message) and [`RAFT_BATCH_SEND_MAX`] messages,
    /// and hands each its answer.
    async fn send_batch(self, lane: Lane, batch: Vec<Queued>) {
        let mut batch: Vec<Queued> = batch.into_iter().filter(|q| !q.answer.is_closed()).collect();
        let sizes: Vec<usize> = batch.iter().map(|q| postcard::experimental::serialized_size(&q.msg).unwrap_or(0)).collect();
        let mut sizes = sizes.as_slice();
        while !batch.is_empty() {
            let n = frame_len(sizes);
            sizes = &sizes[n..];
            let rest = batch.split_off(n);
            let part = std::mem::replace(&mut batch, rest);
            if part.len() == 1 {
                let q = part.into_iter().next().expect("one message");
                let client = self.clone();
                tokio::spawn(async move {
                    let _ = q.answer.send(client.call_alone(q.msg, lane, q.timeout).await);
                });
                continue;
            }
            metrics::counter!("ringkv_raft_batches_sent_total").increment(1);
            metrics::counter!("ringkv_raft_batched_messages_total").increment(part.len() as u64);
            let (mut msgs, mut answers, mut timeouts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
            for q in part {
                msgs.push((q.group, q.msg));
                answers.push(q.answer);
                timeouts.push(q.timeout);
            }
            // The batch gets the longest deadline any of its messages would get for its size.
            let timeout = move |bytes| timeouts.into_iter().map(|t| t(bytes)).max().unwrap_or_default();
            let req = PeerRequest::RaftBatch { from: self.me, msgs };
            let client = self.clone();
            tokio::spawn(async move {
                let got = client.pool.call_sized(client.target, &client.addr, &req, timeout, lane).await;
                let fail = |e: CallError, answers: Vec<oneshot::Sender<_>>| {
                    for a in answers {
                        let _ = a.send(Err(e.clone()));
                    }
                };
                match got {
                    Ok(Ok(PeerReply::RaftBatch(each))) if each.len() == answers.len() => {
                        for (a, r) in answers.into_iter().zip(each) {
                            let _ = a.send(r.map_err(|e| CallError::Unreachable(e.to_string())));
                        }
                    }
                    Ok(Ok(other)) => fail(CallError::Network(format!("unexpected reply to a batch {other:?}")), answers),
                    Ok(Err(e)) => fail(CallError::Unreachable(e.to_string()), answers),
                    Err(e) => fail(CallError::from_rpc(e), answers),
                }
            });
        }
    }
}

impl CallError {
    fn from_rpc(e: ringkv_transport::RpcError) -> CallError {
        match e {
            ringkv_transport::RpcError::Timeout(d) => CallError::Network(format!("timed out after {d:?}")),
            e => CallError::Unreachable(e.to_string()),
        }
    }
}

/// How many of the queued messages, of these encoded sizes in order, the next batch takes: at
/// most [`RAFT_BATCH_SEND_MAX`], and at most [`RAFT_BATCH_BYTES_MAX`] in all unless the first
/// alone is larger (then it goes alone). At least one while any is queued.
fn frame_len(sizes: &[usize]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for &size in sizes.iter().take(RAFT_BATCH_SEND_MAX) {
        if n > 0 && bytes + size > RAFT_BATCH_BYTES_MAX {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

/// Largest frame of batched messages, unless one message alone is larger.
pub const RAFT_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most messages one batch carries.
pub const RAFT_BATCH_SEND_MAX: usize = 256;
const _: () = assert!(RAFT_BATCH_SEND_MAX <= ringkv_wire::RAFT_BATCH_MESSAGES_MAX);

/// A Raft message waiting for the next batch to its peer.
struct Queued {
    group: GroupId,
    msg: RaftMsg,
    timeout: Box<dyn FnOnce(usize) -> Duration + Send>,
    answer: oneshot::Sender<Result<RaftAnswer, CallError>>,
}

/// The Raft messages of every group of this node bound for one peer on one lane: how many are
/// on their way, and those waiting to leave together.
#[derive(Default)]
pub struct PeerQueue {
    in_flight: AtomicUsize,
    waiting: Mutex<Vec<Queued>>,
}

impl PeerQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One batched stream of Raft messages per peer (and lane), shared by every group of the node.
/// A message to a peer with no other message on its way on that lane leaves at once, alone.
/// Otherwise it joins the peer's queue; the message that found the queue empty yields once to
/// the scheduler (so that tasks woken together, as by one group-commit sync, queue theirs) and
/// then sends everything queued in one `PeerRequest::RaftBatch`, which the peer serves in one
/// task and answers in one frame.
#[derive(Default)]
pub struct RaftOutbox {
    queues: DashMap<(NodeId, bool), Arc<PeerQueue>, rustc_hash::FxBuildHasher>,
}

impl RaftOutbox {
    fn queue(&self, peer: NodeId, lane: Lane) -> Arc<PeerQueue> {
        let key = (peer, lane == Lane::Control);
        if let Some(q) = self.queues.get(&key) {
            return q.clone();
        }
        self.queues.entry(key).or_default().clone()
    }
}

/// Counts a message on its way until it is answered or dropped.
struct InFlight<'a>(&'a PeerQueue);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends what is queued if the call that was to send it is dropped first.
struct Flush {
    client: GroupClient,
    queue: Arc<PeerQueue>,
    lane: Lane,
    armed: bool,
}

impl Drop for Flush {
    fn drop(&mut self) {
        if self.armed {
            let batch = std::mem::take(&mut *self.queue.lock());
            // No runtime: it is shutting down, and the queued calls' answers go with it.
            if let (false, Ok(rt)) = (batch.is_empty(), tokio::runtime::Handle::try_current()) {
                rt.spawn(self.client.clone().send_batch(self.lane, batch));
            }
        }
    }
}

/// The lane of an append: one carrying entries is data; one without (a heartbeat, or only a
/// commit index) is control, so it never waits behind other groups' appends of large entries
/// and a follower hears its leader in time to not start an election.
pub fn append_lane(has_entries: bool) -> Lane {
    if has_entries {
        Lane::Data
    } else {
        Lane::Control
    }
}

type AppendRequest = AppendEntriesRequest<TypeConfig>;
type AppendResponse = AppendEntriesResponse<TypeConfig>;
type AppendResult = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;
/// One append on its way to the follower and back.
type Sending = BoxFuture<'static, Result<AppendResponse, RPCError<TypeConfig>>>;

/// The appends of one group to one follower, in order and one in flight at a time (as
/// openraft's sequential default), with one change: an append without entries, which only
/// tells the follower a new commit index, waits up to `linger` for the group's next append and,
/// if one with the same previous log id and vote comes, is not sent at all. The follower
/// learns the commit from the later append, whose answer also answers the held one: both ask
/// whether the follower's log matches at the same log id under the same vote. Under load that
/// removes an RPC per follower from about every other Raft round; the leader, its clients and
/// its lease never wait for it (a lease counts from when a request was built, so a held
/// request only shortens it).
struct Appends<S, F> {
    input: S,
    send: F,
    linger: Duration,
    /// A request taken from `input` while waiting, to be sent next.
    next: Option<AppendRequest>,
    /// Results to yield before sending anything more.
    ready: std::collections::VecDeque<AppendResult>,
    input_done: bool,
    /// A result ended the stream (an error, a conflict, a partial success).
    stopped: bool,
}

impl<S, F> Appends<S, F>
where
    S: Stream<Item = AppendRequest> + Send + Unpin + 'static,
    F: FnMut(AppendRequest) -> Sending + Send + 'static,
{
    fn new(input: S, send: F, linger: Duration) -> Self {
        Appends { input, send, linger, next: None, ready: Default::default(), input_done: false, stopped: false }
    }

    fn into_stream<'s>(self) -> BoxStream<'s, AppendResult> {
        Box::pin(futures::stream::unfold(self, |mut s| async move { s.step().await.map(|r| (r, s)) }))
    }

    async fn step(&mut self) -> Option<AppendResult> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            if self.stopped {
                return None;
            }
            let held = match self.next.take() {
                Some(r) => r,
                None if self.input_done => return None,
                None => match self.input.next().await {
                    Some(r) => r,
                    None => return None,
                },
            };
            let mut carried = None;
            let mut req = held;
            if req.entries.is_empty() && !self.linger.is_zero() && !self.input_done {
                match tokio::time::timeout(self.linger, self.input.next()).await {
                    Ok(Some(next)) if next.prev_log_id == req.prev_log_id && next.vote == req.vote => {
                        metrics::counter!("ringkv_raft_commits_carried_total").increment(1);
                        carried = Some(std::mem::replace(&mut req, next));
                    }
                    Ok(Some(next)) => self.next = Some(next),
                    Ok(None) => self.input_done = true,
                    // The unfinished `next()` stays inside `input` and goes on at the next poll.
                    Err(_) => {}
                }
            }
            let prev = req.prev_log_id;
            let last = req.entries.last().map(|e| e.log_id).or(prev);
            let resp = match (self.send)(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    self.ready.push_back(Err(e));
                    self.stopped = true;
                    continue;
                }
            };
            // As openraft's sequential stream: go on after a full success only.
            let go_on = match &resp {
                AppendEntriesResponse::Success => true,
                AppendEntriesResponse::PartialSuccess(m) => *m == last,
                _ => false,
            };
            let result = resp.into_stream_result(prev, last);
            if let Some(held) = carried {
                // Matching at or past `prev` is matching at the held request's own (equal) log id.
                let held_result = match &result {
                    Ok(m) => Ok(if *m < held.prev_log_id { *m } else { held.prev_log_id }),
                    Err(e) => Err(e.clone()),
                };
                let failed = held_result.is_err();
                self.ready.push_back(Ok(held_result));
                if failed {
                    self.stopped = true;
                    continue;
                }
            }
            self.stopped = !go_on;
            self.ready.push_back(Ok(result));
        }
    }
}

/// What a peer answers to a Raft RPC: openraft's response, or why the group could not handle it.
pub type RaftReply<T> = Result<T, String>;

/// openraft's response out of the answer `pick` expects (`Err(answer)` for any other).
fn flatten<T>(
    r: Result<RaftAnswer, CallError>,
    pick: fn(RaftAnswer) -> Result<RaftReply<T>, RaftAnswer>,
) -> Result<T, RPCError<TypeConfig>> {
    match r.map(pick) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(remote))) => Err(RPCError::Unreachable(Unreachable::from_string(remote))),
        Ok(Err(other)) => Err(RPCError::Network(NetworkError::from_string(format!("unexpected answer {other:?}")))),
        Err(e) => Err(e.rpc()),
    }
}

impl GroupClient {
    async fn append(&self, rpc: AppendRequest, option: RPCOption) -> Result<AppendResponse, RPCError<TypeConfig>> {
        let (ttl, floor) = (option.soft_ttl(), self.append_floor);
        let has_entries = !rpc.entries.is_empty();
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let timeout = move |bytes| if has_entries { append_timeout(ttl, floor, bytes) } else { ttl };
        let r = self.call(RaftMsg::AppendEntries(rpc), append_lane(has_entries), timeout).await;
        let r = flatten(r, |a| match a {
            RaftAnswer::AppendEntries(r) => Ok(r),
            other => Err(other),
        });
        if let Some(hold) = &self.hold {
            let matched = match &r {
                Ok(AppendEntriesResponse::Success) => last,
                Ok(AppendEntriesResponse::PartialSuccess(m)) => *m,
                _ => None,
            };
            if let Some(m) = matched {
                hold.acknowledged(m.index);
            }
        }
        r
    }
}

impl RaftNetworkV2<TypeConfig> for GroupClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(&mut self, rpc: AppendRequest, option: RPCOption) -> Result<AppendResponse, RPCError<TypeConfig>> {
        self.append(rpc, option).await
    }

    /// openraft's sequential stream (one append in flight per group and follower), except that
    /// an append carrying only a commit index rides in the next append ([`Appends`]).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, AppendResult>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendRequest> + OptionalSend + Unpin + 'static,
    {
        let client = self.clone();
        let linger = self.commit_linger;
        let send = move |req: AppendRequest| -> Sending {
            let (client, option) = (client.clone(), option.clone());
            Box::pin(async move { client.append(req, option).await })
        };
        Box::pin(async move { Ok(Appends::new(input, send, linger).into_stream()) })
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        flatten(self.call(RaftMsg::Vote(rpc), Lane::Control, move |_| ttl).await, |a| match a {
            RaftAnswer::Vote(r) => Ok(r),
            other => Err(other),
        })
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        flatten(self.call(RaftMsg::PreVote(rpc), Lane::Control, move |_| ttl).await, |a| match a {
            RaftAnswer::Vote(r) => Ok(r),
            other => Err(other),
        })
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        flatten(self.call(RaftMsg::TransferLeader(req), Lane::Control, move |_| ttl).await, |a| match a {
            RaftAnswer::TransferLeader(r) => Ok(r),
            other => Err(other),
        })
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
        let header = match &data {
            SnapshotData::Memory(b) => Part::Header { memory: Some(b.to_vec()), sizes: vec![] },
            SnapshotData::Files(f) => Part::Header { memory: None, sizes: f.files.iter().map(|(_, n)| *n).collect() },
        };
        let floor = self.append_floor;
        self.send_part(&vote, &meta, &id, header, floor).await?;
        if let SnapshotData::Files(f) = &data {
            for rows in crate::snapshot::session_chunks(&f.sessions) {
                self.throttle.pace(rows.iter().map(|(k, v)| k.len() + v.len()).sum()).await;
                self.send_part(&vote, &meta, &id, Part::Sessions { rows: rows.to_vec() }, floor).await?;
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
                    self.send_part(&vote, &meta, &id, Part::Bytes { file: i as u32, offset, data: chunk.to_vec() }, floor).await?;
                    metrics::counter!("ringkv_raft_snapshot_sent_bytes_total").increment(n as u64);
                    offset += n as u64;
                }
            }
        }
        // The answer to the end comes after the install: syncing and ingesting every file.
        let install = SNAPSHOT_TIMEOUT + Duration::from_secs_f64(total as f64 / SLOWEST_PEER_BYTES_PER_SEC);
        match self.send_part(&vote, &meta, &id, Part::End, install).await? {
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
        part: Part,
        floor: Duration,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, StreamingError<TypeConfig>> {
        let chunk = SnapshotChunk { vote: *vote, meta: meta.clone(), id: id.to_string(), part };
        let r = self.call(RaftMsg::SnapshotChunk(Box::new(chunk)), Lane::Bulk, move |bytes| append_timeout(floor, floor, bytes)).await;
        flatten(r, |a| match a {
            RaftAnswer::SnapshotChunk(r) => Ok(r),
            other => Err(other),
        })
        .map_err(StreamingError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::raft::StreamAppendError;
    use ringkv_storage::{Entry, LogId, Vote};
    use std::sync::Mutex;

    /// Heartbeats and commit-only appends take the control lane, appends with entries a data
    /// lane, snapshots the bulk lane: three different streams of the peer connection.
    #[test]
    fn heartbeats_and_appends_of_entries_take_different_lanes() {
        assert_eq!(append_lane(false), Lane::Control);
        assert_eq!(append_lane(true), Lane::Data);
        let control = Lane::Control.index();
        for _ in 0..32 {
            let data = Lane::Data.index();
            assert!(data < crate::peer::PEER_LANES);
            assert_ne!(data, control);
            assert_ne!(data, Lane::Bulk.index());
        }
        assert_ne!(control, Lane::Bulk.index());
        assert!(crate::peer::PEER_LANE_PRIORITIES[control] > crate::peer::PEER_LANE_PRIORITIES[Lane::Data.index()]);
    }

    fn log_id(index: u64) -> LogId {
        openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, index)
    }

    /// An append after `prev` with entries `prev + 1 ..= last` (none if `last == prev`).
    fn append(prev: u64, last: u64, commit: u64, term: u64) -> AppendRequest {
        use openraft::entry::RaftEntry;
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: Some(log_id(prev)),
            entries: (prev + 1..=last).map(|i| Entry::new(log_id(i), openraft::EntryPayload::Blank)).collect(),
            leader_commit: Some(log_id(commit)),
        }
    }

    /// What reached the follower: (prev index, entries, commit index) per append.
    type Seen = Arc<Mutex<Vec<(u64, usize, u64)>>>;

    /// A follower that records what reaches it (prev, entries, commit) and answers with `answer`.
    fn follower(answer: fn(&AppendRequest) -> AppendResponse) -> (Seen, impl FnMut(AppendRequest) -> Sending) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let send = move |req: AppendRequest| -> Sending {
            let index = |l: &Option<LogId>| l.map(|l| l.index).unwrap_or(0);
            log.lock().expect("lock").push((index(&req.prev_log_id), req.entries.len(), index(&req.leader_commit)));
            let resp = answer(&req);
            Box::pin(async move { Ok(resp) })
        };
        (seen, send)
    }

    #[tokio::test]
    async fn a_commit_without_entries_rides_in_the_next_append_and_both_are_answered_in_order() {
        let (seen, send) = follower(|_| AppendEntriesResponse::Success);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Appends::new(rx, send, Duration::from_secs(30)).into_stream();
        // The commit of index 5, then (while it waits) entries 6 and 7 with the same prev log id.
        tx.unbounded_send(append(5, 5, 5, 1)).expect("send");
        let next = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            next.unbounded_send(append(5, 7, 5, 1)).expect("send");
        });
        assert_eq!(out.next().await.expect("first").expect("ok"), Ok(Some(log_id(5))));
        assert_eq!(out.next().await.expect("second").expect("ok"), Ok(Some(log_id(7))));
        assert_eq!(*seen.lock().expect("lock"), vec![(5, 2, 5)], "only the append with entries went out");

        // A different prev log id or vote cannot answer for the held append: both go, in order.
        tx.unbounded_send(append(7, 7, 7, 1)).expect("send");
        tx.unbounded_send(append(7, 8, 7, 2)).expect("send");
        assert_eq!(out.next().await.expect("third").expect("ok"), Ok(Some(log_id(7))));
        assert_eq!(out.next().await.expect("fourth").expect("ok"), Ok(Some(log_id(8))));
        assert_eq!(seen.lock().expect("lock")[1..], [(7, 0, 7), (7, 1, 7)]);

        // The input ends while a commit waits: it goes at once, not after the linger.
        tx.unbounded_send(append(8, 8, 8, 2)).expect("send");
        drop(tx);
        let started = std::time::Instant::now();
        assert_eq!(out.next().await.expect("fifth").expect("ok"), Ok(Some(log_id(8))));
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?} for an input that ended", started.elapsed());
        assert!(out.next().await.is_none());
        assert_eq!(seen.lock().expect("lock").len(), 4);
    }

    #[tokio::test]
    async fn a_held_commit_gets_the_refusal_of_the_append_that_carried_it_and_the_stream_ends() {
        let (seen, send) = follower(|_| AppendEntriesResponse::Conflict);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Appends::new(rx, send, Duration::from_secs(30)).into_stream();
        tx.unbounded_send(append(5, 5, 5, 1)).expect("send");
        tx.unbounded_send(append(5, 6, 5, 1)).expect("send");
        tx.unbounded_send(append(6, 7, 5, 1)).expect("send");
        assert_eq!(out.next().await.expect("first").expect("rpc ok"), Err(StreamAppendError::Conflict(log_id(5))));
        assert!(out.next().await.is_none(), "nothing after a conflict");
        assert_eq!(seen.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn with_no_linger_every_append_goes_out_as_built() {
        let (seen, send) = follower(|_| AppendEntriesResponse::Success);
        let input = futures::stream::iter(vec![append(5, 5, 5, 1), append(5, 6, 5, 1)]);
        let results: Vec<_> = Appends::new(input, send, Duration::ZERO).into_stream().collect().await;
        assert_eq!(results.len(), 2);
        assert_eq!(*seen.lock().expect("lock"), vec![(5, 0, 5), (5, 1, 5)]);
    }

    /// A batch is bounded in messages and bytes; a message larger than the byte bound goes
    /// alone, and every queued message goes in some batch.
    #[test]
    fn batches_are_bounded_in_messages_and_bytes() {
        assert_eq!(frame_len(&[]), 0);
        assert_eq!(frame_len(&[100; 1000]), RAFT_BATCH_SEND_MAX);
        let big = RAFT_BATCH_BYTES_MAX / 3;
        assert_eq!(frame_len(&[big, big, big, big]), 3);
        assert_eq!(frame_len(&[big, big, big + 2, 10]), 2);
        assert_eq!(frame_len(&[RAFT_BATCH_BYTES_MAX * 4, 10, 10]), 1, "an oversize message goes alone");
        assert_eq!(frame_len(&[10, RAFT_BATCH_BYTES_MAX * 4]), 1, "and does not join a batch");
        let sizes = [big, 10, RAFT_BATCH_BYTES_MAX * 2, big, big, big, big, 5];
        let (mut rest, mut parts) = (&sizes[..], vec![]);
        while !rest.is_empty() {
            let n = frame_len(rest);
            assert!(n >= 1);
            parts.push(n);
            rest = &rest[n..];
        }
        assert_eq!(parts, vec![2, 1, 3, 2]);
    }

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
