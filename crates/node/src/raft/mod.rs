//! The Raft side of a node, and the only module of ringkv-node that names openraft:
//!
//! - [`RaftConfig`]: the timers and limits every group of the node runs with.
//! - [`Group`]: one replica's Raft instance, with the operations the node needs (propose,
//!   confirm leadership for a read, membership steps, leader transfer, ticking on and off).
//! - [`GroupState`]: what a group reports at one moment (role, leader, term, log, membership,
//!   how far each follower has replicated).
//! - [`serve`]: a Raft message from a peer, decoded and handed to its group.
//! - `network`: the messages a group sends, over the node's shared peer connections.
//!
//! Replacing the Raft library means replacing this module (and the storage traits of
//! `ringkv_storage::raft_store`); nothing else in the node sees its types.

mod network;

pub use network::{append_timeout, RaftOutbox, RaftReply, SLOWEST_PEER_BYTES_PER_SEC, SNAPSHOT_TIMEOUT};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, ReadPolicy};
use ringkv_storage::{Command, CommandResult, LogStore, PeerNode, SnapshotMeta, StateMachine, TypeConfig};
use ringkv_wire::{GroupId, NodeId, RequestError, PLACEMENT_GROUP};
use serde::{Deserialize, Serialize};

use crate::config::RaftTuning;
use crate::node::Node;
use crate::peer::PeerPool;
use crate::snapshot::SnapshotThrottle;

/// A Raft message between two replicas of a group. It travels inside the peer protocol's
/// [`ringkv_wire::PeerRequest::Raft`], encoded once and inline (no payload encoded apart first).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RaftMsg {
    AppendEntries(openraft::raft::AppendEntriesRequest<TypeConfig>),
    Vote(openraft::raft::VoteRequest<TypeConfig>),
    PreVote(openraft::raft::VoteRequest<TypeConfig>),
    TransferLeader(openraft::raft::TransferLeaderRequest<TypeConfig>),
    /// One part of a streamed snapshot; the receiver installs the snapshot at the end.
    SnapshotChunk(Box<SnapshotChunk>),
}

/// One part of a snapshot transfer `id`, with the leader's vote and the snapshot's meta.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: openraft::alias::VoteOf<TypeConfig>,
    pub meta: SnapshotMeta,
    pub id: String,
    pub part: crate::snapshot::Part,
}

/// The answer to a [`RaftMsg`]: openraft's response, or why the group could not handle it.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftAnswer {
    AppendEntries(RaftReply<openraft::raft::AppendEntriesResponse<TypeConfig>>),
    /// To a vote or a pre-vote.
    Vote(RaftReply<openraft::raft::VoteResponse<TypeConfig>>),
    TransferLeader(RaftReply<openraft::raft::TransferLeaderResponse<TypeConfig>>),
    /// `None` until the last part arrived and the snapshot is installed.
    SnapshotChunk(RaftReply<Option<openraft::raft::SnapshotResponse<TypeConfig>>>),
}

/// The peer protocol as this node speaks it: the wire's messages carrying [`RaftMsg`] and
/// [`RaftAnswer`].
pub type PeerRequest = ringkv_wire::PeerRequest<RaftMsg>;
pub type PeerReply = ringkv_wire::PeerReply<RaftAnswer>;
pub type PeerResponse = ringkv_wire::PeerResponse<RaftAnswer>;

/// The Raft timers and limits every group of a node runs with.
#[derive(Clone)]
pub struct RaftConfig {
    raft: Arc<openraft::Config>,
    /// How long a commit index without entries waits for the next append ([`RaftTuning::commit_linger_ms`]).
    commit_linger: Duration,
    /// Whether messages of different groups to one peer share frames ([`RaftTuning::batch_messages`]).
    batch_messages: bool,
}

/// How long after a follower's last acknowledged append its leader skips heartbeats to it:
/// two heartbeat intervals, at most what openraft allows (heartbeat interval + this + one tick
/// of `heartbeat_interval * 13 / 64` below the election timeout).
pub fn heartbeat_suppression_ms(t: &RaftTuning) -> u64 {
    let tick = t.heartbeat_interval_ms * 13 / 64;
    let room = t.election_timeout_min_ms.saturating_sub(t.heartbeat_interval_ms + tick + 1);
    (2 * t.heartbeat_interval_ms).min(room)
}

impl RaftConfig {
    /// The configuration for `t`, or why Raft refuses it.
    pub fn new(t: &RaftTuning) -> Result<RaftConfig, String> {
        let cfg = openraft::Config {
            cluster_name: "ringkv".into(),
            heartbeat_interval: t.heartbeat_interval_ms,
            // Under load, appends prove what heartbeats would: a follower that acknowledged
            // one within this time gets no heartbeat (openraft's suppression; it must leave a
            // heartbeat interval and a tick before the election timeout).
            heartbeat_min_interval: Some(heartbeat_suppression_ms(t)).filter(|ms| *ms > 0),
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: t.logs_kept_after_snapshot,
            purge_batch_size: 256,
            max_payload_entries: 64,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        let commit_linger = Duration::from_millis(t.commit_linger_ms.min(t.heartbeat_interval_ms));
        let batch_messages = t.batch_messages;
        cfg.validate().map(|c| RaftConfig { raft: Arc::new(c), commit_linger, batch_messages }).map_err(|e| e.to_string())
    }

    /// How long heartbeats are suppressed after an acknowledged append (`None`: never).
    pub fn heartbeat_suppression(&self) -> Option<u64> {
        self.raft.heartbeat_min_interval
    }
}

/// Why a proposal or a leadership check failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// This replica does not lead its group; the leader it knows of.
    #[error("not the leader; the leader is {0:?}")]
    NotLeader(Option<NodeId>),
    /// The group cannot do it now (no quorum, a membership change in progress, ...).
    #[error("{0}")]
    Unavailable(String),
    /// The group's Raft stopped (shut down, or a storage error).
    #[error("stopped: {0}")]
    Stopped(String),
}

fn client_write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> GroupError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => GroupError::NotLeader(f.leader_id),
        RaftError::APIError(e) => GroupError::Unavailable(e.to_string()),
        RaftError::Fatal(e) => GroupError::Stopped(e.to_string()),
    }
}

/// One replica's Raft instance.
pub struct Group {
    raft: ringkv_storage::Raft,
    /// The group's published metrics, subscribed once: every read's lease check and every
    /// write's quorum check borrows them, and a fresh subscription per call costs atomic
    /// updates on a counter the group's Raft task shares.
    metrics: openraft::type_config::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
    /// The leader transfer this replica last started, while it may still be under way.
    transfer: std::sync::Mutex<Option<Transfer>>,
    /// How long followers refuse to vote for another leader after acknowledging this one
    /// (openraft's leader lease: the maximum election timeout).
    lease: Duration,
}

/// A leader transfer started by this replica as leader.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    to: NodeId,
    /// When the transfer request last went out.
    sent: std::time::Instant,
}

impl Group {
    /// Starts the Raft instance of this node's replica of `group` on its log and state machine.
    pub async fn start(
        me: NodeId,
        group: GroupId,
        config: &RaftConfig,
        pool: Arc<PeerPool>,
        throttle: Arc<SnapshotThrottle>,
        log: LogStore,
        sm: StateMachine,
    ) -> Result<Group, String> {
        let append_floor = Duration::from_millis(config.raft.election_timeout_min);
        let commit_linger = config.commit_linger;
        let batch = config.batch_messages;
        let cache = log.cache();
        let net = network::NetworkFactory { me, group, pool, append_floor, commit_linger, batch, throttle, cache };
        let raft = ringkv_storage::Raft::new(me, config.raft.clone(), net, log, sm).await.map_err(|e| e.to_string())?;
        let lease = Duration::from_millis(config.raft.election_timeout_max);
        let metrics = raft.metrics();
        Ok(Group { raft, metrics, transfer: std::sync::Mutex::new(None), lease })
    }

    /// What the group reports now.
    pub fn state(&self) -> GroupState {
        GroupState(self.metrics.borrow_watched().clone())
    }

    /// The group's role and leader now, without copying the rest of its state (membership and
    /// replication maps): what a loop over every replica needs for a quiet group.
    pub fn role(&self) -> GroupRole {
        let m = self.metrics.borrow_watched();
        let failure = match &m.running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        GroupRole { failure, is_leader: m.state.is_leader(), is_follower: m.state.is_follower(), leader: m.current_leader }
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.metrics.borrow_watched().current_leader
    }

    /// Whether this replica is its group's leader (it may not know yet that it was deposed).
    pub fn is_leader(&self) -> bool {
        self.metrics.borrow_watched().state.is_leader()
    }

    /// The group's voters.
    pub fn voters(&self) -> Vec<NodeId> {
        self.raft.voter_ids().collect()
    }

    /// Whether `id` is a voter of the group's effective membership.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.metrics.borrow_watched().membership_config.membership().voter_ids().any(|v| v == id)
    }

    /// See [`GroupState::cut_off_from_quorum`] (without copying the whole state).
    pub fn cut_off_from_quorum(&self, limit: Duration) -> Option<Duration> {
        cut_off_from_quorum(&self.metrics.borrow_watched(), limit)
    }

    /// Makes the group's first membership, unless it has one. Idempotent: replicas that
    /// initialize with the same members agree.
    pub async fn initialize(&self, members: BTreeMap<NodeId, PeerNode>) -> Result<(), String> {
        if self.raft.is_initialized().await.map_err(|e| e.to_string())? {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Proposes `cmd` and waits until it is committed and applied here: its result.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, GroupError> {
        self.raft.client_write(cmd).await.map(|r| r.data).map_err(client_write_error)
    }

    /// Confirms this replica still leads its group, so a read of its state machine is
    /// linearizable: by the leader lease when `lease` and the lease holds, by a heartbeat round
    /// (ReadIndex) otherwise. Returns once the state machine has applied what the group had
    /// committed.
    pub async fn confirm_leadership(&self, lease: bool) -> Result<(), GroupError> {
        if lease {
            match self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
                // A stale lease (e.g. a group that just woke) falls back to a heartbeat round.
                Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => {
                    metrics::counter!("ringkv_raft_lease_read_fallbacks_total").increment(1);
                }
                done => return done.map(|_| ()).map_err(read_error),
            }
        }
        self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map(|_| ()).map_err(read_error)
    }

    /// Whether a linearizable read may be served from this replica's state machine now,
    /// without a round trip through the group's Raft task (TiKV's local reader). It must:
    ///
    /// - lead, with a quorum's acknowledgement sent within the lease: until the lease ends,
    ///   those followers refuse to vote for anyone but a transfer target, so no other leader
    ///   can exist (assuming clocks that run at nearly the same rate);
    /// - have no leader transfer under way (the target elects at once; the record is made
    ///   before openraft hears of the transfer and kept until this replica no longer leads);
    /// - have applied an entry of its own leadership (its first, the no-op; a term can have
    ///   had an earlier leader, as openraft orders votes by term and node): every write
    ///   acknowledged before now, by it (which answers only once it has applied) or by an
    ///   earlier leader (whose entries precede that no-op), is then in its state machine.
    ///
    /// The conditions of openraft's `LeaseRead`, read from the metrics its Raft task publishes.
    /// Those can lag, which only makes the check stricter: an older acknowledgement or applied
    /// entry fails sooner, and a stepped-down leader still shown as leader could only have
    /// been replaced once the lease ran out, or by a transfer it started.
    pub fn lease_read_ready(&self) -> bool {
        use openraft::Instant;
        {
            let m = self.metrics.borrow_watched();
            let ready = m.state.is_leader()
                && m.last_applied.as_ref().is_some_and(|a| a.leader_id.term == m.current_term && a.leader_id.node_id == m.id)
                && m.last_quorum_acked.as_ref().is_some_and(|t| t.elapsed() < self.lease);
            if !ready {
                return false;
            }
        }
        self.transfer.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Replaces the voters with `voters` (through a joint membership), waiting for the commit.
    pub async fn replace_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), String> {
        self.change(ChangeMembers::ReplaceAllVoters(voters)).await
    }

    /// Removes `nodes` (learners) from the membership, waiting for the commit.
    pub async fn remove_nodes(&self, nodes: BTreeSet<NodeId>) -> Result<(), String> {
        self.change(ChangeMembers::RemoveNodes(nodes)).await
    }

    async fn change(&self, members: ChangeMembers<NodeId, PeerNode>) -> Result<(), String> {
        self.raft.change_membership(members, false).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Adds `id` as a learner (it starts receiving the log), without waiting for it to catch up.
    pub async fn add_learner(&self, id: NodeId, node: PeerNode) -> Result<(), String> {
        self.raft.add_learner(id, node, false).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Asks the group (led here) to hand leadership to voter `to`.
    ///
    /// From then on openraft's leader proposes nothing and sends no heartbeats until a new
    /// leader deposes it, and it sends the transfer request once: if that request is lost,
    /// only an election ends the transfer, and the quiet followers of an idle group start none.
    /// So the caller of [`Group::pending_transfer`] sends it again until the transfer is over.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), String> {
        *self.transfer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Transfer { to, sent: std::time::Instant::now() });
        self.raft.trigger().transfer_leader(to).await.map_err(|e| e.to_string())
    }

    /// The target of the transfer this replica started, and how long ago its request went
    /// out, while it still leads (openraft's leader leaves transfer mode only by being
    /// deposed). The record ends only once the published state, read after it was made, shows
    /// this replica no longer leading: the term published when the transfer started can lag
    /// the one the leader was in, so terms are not compared.
    pub fn pending_transfer(&self) -> Option<(NodeId, Duration)> {
        let mut t = self.transfer.lock().unwrap_or_else(|p| p.into_inner());
        let x = (*t)?;
        if self.metrics.borrow_watched().state.is_leader() {
            return Some((x.to, x.sent.elapsed()));
        }
        *t = None;
        None
    }

    /// Starts or stops the group's timers (election timeout, heartbeats): a quiet group stops
    /// them.
    pub fn set_ticking(&self, on: bool) {
        self.raft.runtime_config().tick(on);
    }

    /// Lets the group's election timer start elections (on), or not (off: it still votes, and
    /// a leader transfer to it still makes it stand).
    pub fn set_electing(&self, on: bool) {
        self.raft.runtime_config().elect(on);
    }

    /// Stops the group's Raft: its tasks end, and it writes no more state.
    pub async fn shutdown(&self) -> Result<(), String> {
        self.raft.shutdown().await.map_err(|e| e.to_string())
    }
}

fn read_error(e: RaftError<TypeConfig, LinearizableReadError<TypeConfig>>) -> GroupError {
    match e {
        RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => GroupError::NotLeader(f.leader_id),
        RaftError::APIError(e) => GroupError::Unavailable(e.to_string()),
        RaftError::Fatal(e) => GroupError::Stopped(e.to_string()),
    }
}

/// A group's role at one moment ([`Group::role`]).
pub struct GroupRole {
    /// Why the group's Raft stopped on its own (a storage error), if it did; `None` while it
    /// runs and after a shutdown asked for.
    pub failure: Option<String>,
    pub is_leader: bool,
    pub is_follower: bool,
    pub leader: Option<NodeId>,
}

/// What a group reported at one moment.
#[derive(Clone)]
pub struct GroupState(openraft::RaftMetrics<TypeConfig>);

impl GroupState {
    pub fn is_leader(&self) -> bool {
        self.0.state.is_leader()
    }

    pub fn is_follower(&self) -> bool {
        self.0.state.is_follower()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.0.current_leader
    }

    pub fn term(&self) -> u64 {
        self.0.current_term
    }

    /// The index of the last entry in this replica's log.
    pub fn last_log_index(&self) -> Option<u64> {
        self.0.last_log_index
    }

    /// The index of the last entry this replica applied.
    pub fn applied(&self) -> Option<u64> {
        self.0.last_applied.as_ref().map(|l| l.index)
    }

    /// The voters of the effective membership (both halves of a joint one).
    pub fn voters(&self) -> Vec<NodeId> {
        self.0.membership_config.membership().voter_ids().collect()
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.0.membership_config.membership().voter_ids().any(|v| v == id)
    }

    pub fn is_learner(&self, id: NodeId) -> bool {
        self.0.membership_config.membership().learner_ids().any(|l| l == id)
    }

    /// Whether the effective membership is committed (no change in flight).
    pub fn membership_committed(&self) -> bool {
        self.0.membership_config.log_id() == self.0.committed_membership_config.log_id()
    }

    /// The voter sets of the effective membership: one, or two during a joint change.
    pub fn voter_sets(&self) -> Vec<BTreeSet<NodeId>> {
        self.0.membership_config.membership().get_joint_config().clone()
    }

    /// The last index the leader knows `n` to hold (`None`: not known, or not the leader).
    pub fn matched(&self, n: NodeId) -> Option<u64> {
        self.0.replication.as_ref()?.get(&n).cloned().flatten().map(|l| l.index)
    }

    /// Whether this replica leads and every other member acknowledged an append or heartbeat
    /// within `d`.
    pub fn followers_acked_within(&self, me: NodeId, d: Duration) -> bool {
        use openraft::Instant;
        let Some(acked) = self.0.heartbeat.as_ref().filter(|_| self.is_leader()) else { return false };
        self.0
            .membership_config
            .membership()
            .nodes()
            .all(|(n, _)| *n == me || acked.get(n).cloned().flatten().is_some_and(|t| t.elapsed() < d))
    }

    /// How far the leader has replicated to `n` (0: not yet known).
    pub fn replicated_to(&self, n: NodeId) -> u64 {
        self.matched(n).unwrap_or(0)
    }

    /// Entries committed in the group that this replica's log does not hold yet.
    pub fn entries_behind(&self) -> u64 {
        let committed = self.0.cluster_committed.map(|l| l.index).unwrap_or(0);
        committed.saturating_sub(self.0.last_log_index.unwrap_or(0))
    }

    /// For a leader that has heard from no quorum for longer than `limit`, how long it has
    /// been. Such a leader keeps its Raft role until a newer leader reaches it, but cannot
    /// commit or confirm a read, and a newer leader may already exist.
    pub fn cut_off_from_quorum(&self, limit: Duration) -> Option<Duration> {
        cut_off_from_quorum(&self.0, limit)
    }

    /// Whether a leader's group is idle and fully replicated, so it may ask its followers to
    /// go quiet: its last entry committed and applied, every voter matched at it, no learners,
    /// no joint membership. Returns the followers.
    pub fn ready_to_quiesce(&self, me: NodeId) -> Option<Vec<NodeId>> {
        if !self.is_leader() {
            return None;
        }
        let last = self.last_log_index()?;
        if self.applied() != Some(last) {
            return None;
        }
        let membership = self.0.membership_config.membership();
        if membership.get_joint_config().len() != 1 {
            return None;
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if membership.nodes().count() != voters.len() {
            return None;
        }
        self.0.replication.as_ref()?;
        let followers: Vec<NodeId> = voters.into_iter().filter(|n| *n != me).collect();
        followers.iter().all(|n| self.matched(*n) == Some(last)).then_some(followers)
    }
}

fn cut_off_from_quorum(m: &openraft::RaftMetrics<TypeConfig>, limit: Duration) -> Option<Duration> {
    use openraft::Instant;
    if !m.state.is_leader() {
        return None;
    }
    let since = m.last_quorum_acked.as_ref()?.elapsed();
    (since > limit).then_some(since)
}

/// Hands a Raft message from node `from` to this node's replica of `group`, and answers.
pub async fn serve(node: &Arc<Node>, from: NodeId, group: GroupId, msg: RaftMsg) -> PeerResponse {
    serve_one(node, from, group, msg).await.map(ringkv_wire::PeerReply::Raft)
}

/// Hands each Raft message of a batch from node `from` to its group, all at once, and answers
/// them together in their order once every group answered. The batch takes one task on this
/// node, not one per message.
pub async fn serve_batch(node: &Arc<Node>, from: NodeId, msgs: Vec<(GroupId, RaftMsg)>) -> PeerResponse {
    if msgs.len() > ringkv_wire::RAFT_BATCH_MESSAGES_MAX {
        return Err(RequestError::Malformed(format!(
            "a batch of {} Raft messages is over the limit of {}",
            msgs.len(),
            ringkv_wire::RAFT_BATCH_MESSAGES_MAX
        )));
    }
    metrics::counter!("ringkv_raft_batches_received_total").increment(1);
    let answers = futures::future::join_all(msgs.into_iter().map(|(group, msg)| serve_one(node, from, group, msg))).await;
    Ok(ringkv_wire::PeerReply::RaftBatch(answers))
}

async fn serve_one(node: &Arc<Node>, from: NodeId, group: GroupId, msg: RaftMsg) -> Result<RaftAnswer, RequestError> {
    if node.pool.is_isolated_from(from) {
        return Err(RequestError::Unavailable(format!("node {} is cut off from node {from}", node.id())));
    }
    let replica = match node.replica(group) {
        Some(r) => r,
        // The placement group's replicas come into being with the first message of its
        // leader: that is how the placement members other than the bootstrapping one join.
        None if group == PLACEMENT_GROUP => {
            node.may_create_placement_replica(from).await?;
            node.ensure_replica(PLACEMENT_GROUP, ringkv_storage::ReplicaKind::Placement)
                .await
                .map_err(|e| RequestError::Internal(e.to_string()))?
        }
        None => return Err(RequestError::ShardNotFound { shard: group, node: node.id() }),
    };
    // Refused before it wakes a follower: awake, a follower of a quiet group (whose timer
    // counts from its leader's last message, long ago) would stand for election itself. A
    // quiet leader wakes: its heartbeats tell the candidate who leads.
    if matches!(msg, RaftMsg::PreVote(_)) && node.refuse_pre_vote(&replica, from) {
        if replica.raft.is_leader() {
            replica.wake();
        }
        metrics::counter!("ringkv_raft_pre_votes_refused_total").increment(1);
        return Err(RequestError::Unavailable(format!("group {group} is quiet and its leader's node is alive")));
    }
    replica.wake();
    let raft = &replica.raft.raft;
    let answer = match msg {
        RaftMsg::AppendEntries(req) => {
            if req.entries.is_empty() {
                metrics::counter!("ringkv_raft_empty_appends_received_total").increment(1);
            } else {
                metrics::counter!("ringkv_raft_appends_received_total").increment(1);
            }
            let r = raft.append_entries(req).await.map_err(|e| e.to_string());
            if r.is_ok() && replica.raft.leader() == Some(from) {
                replica.heard_leader();
            }
            RaftAnswer::AppendEntries(r)
        }
        RaftMsg::Vote(req) => RaftAnswer::Vote(raft.vote(req).await.map_err(|e| e.to_string())),
        RaftMsg::PreVote(req) => RaftAnswer::Vote(raft.pre_vote(req).await.map_err(|e| e.to_string())),
        // A draining node takes no leadership handed to it.
        RaftMsg::TransferLeader(_) if node.is_draining() => {
            return Err(RequestError::Unavailable(format!("node {} is draining and takes no leadership", node.id())));
        }
        RaftMsg::TransferLeader(req) => RaftAnswer::TransferLeader(raft.handle_transfer_leader(req).await.map_err(|e| e.to_string())),
        RaftMsg::SnapshotChunk(chunk) => {
            let SnapshotChunk { vote, meta, id, part } = *chunk;
            if let crate::snapshot::Part::Bytes { data, .. } = &part {
                metrics::counter!("ringkv_raft_snapshot_received_bytes_total").increment(data.len() as u64);
            }
            RaftAnswer::SnapshotChunk(match node.reassembly.add(group, from, &id, part) {
                Ok(None) => Ok(None),
                Ok(Some(data)) => {
                    let snap = openraft::Snapshot { meta, snapshot: data };
                    raft.install_full_snapshot(vote, snap).await.map(Some).map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            })
        }
    };
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heartbeats are suppressed as long as openraft allows with the default and the test
    /// timers, and the resulting configuration validates; timers too tight for it get none.
    #[test]
    fn heartbeat_suppression_fits_the_election_timeout() {
        let tuning = |hb, min, max| RaftTuning {
            heartbeat_interval_ms: hb,
            election_timeout_min_ms: min,
            election_timeout_max_ms: max,
            ..Default::default()
        };
        for (t, want) in
            [(RaftTuning::default(), 500), (tuning(100, 500, 1000), 200), (tuning(250, 600, 1200), 299), (tuning(100, 120, 240), 0)]
        {
            assert_eq!(heartbeat_suppression_ms(&t), want);
            let cfg = RaftConfig::new(&t).expect("valid");
            assert_eq!(cfg.heartbeat_suppression(), Some(want).filter(|w| *w > 0));
        }
    }
}
