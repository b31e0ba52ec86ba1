//! The two protocols a node serves: peer (Raft traffic, map queries) and client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_storage::{Command, CommandResult};
use ringkv_transport::rpc::BoxFuture;
use ringkv_transport::tls::Caller;
use ringkv_transport::Service;
use ringkv_wire::*;

use crate::raft::{PeerReply, PeerRequest, PeerResponse};

use crate::node::{Node, Replica};
use crate::raft::GroupError;

/// How long a write or linearizable read may wait for its group before the node gives up.
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PeerService {
    pub node: Arc<Node>,
}

impl PeerService {
    /// Handles a peer request that is not a Raft message, sent by this node itself.
    pub async fn local(node: &Arc<Node>, req: PeerRequest) -> PeerResponse {
        Self::from_peer(node, node.id(), req).await
    }

    /// Handles a peer request that is not a Raft message from node `sender` (as its certificate
    /// says).
    pub async fn from_peer(node: &Arc<Node>, sender: NodeId, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::GetMap => Ok(PeerReply::Map((*node.map()).clone())),
            PeerRequest::Heartbeat(_) | PeerRequest::Admin(_) => match node.placement_leader() {
                Some(r) => crate::driver::handle(node, &r, req).await,
                None => Err(node.placement_not_leader()),
            },
            PeerRequest::MoveStep { shard, from, to, to_peer_addr, cancel, fence } => {
                node.check_placement_order(sender, fence, Some((shard, from, to)))?;
                node.move_step(shard, from, to, to_peer_addr, cancel).await.map(PeerReply::MoveStep)
            }
            PeerRequest::Ping => Ok(PeerReply::Done),
            PeerRequest::Identify => Ok(PeerReply::Identity(node.info())),
            req @ PeerRequest::Bootstrap { .. } => crate::lifecycle::bootstrap_here(node, req).await,
            PeerRequest::Quiesce { group, term, last_log_index } => {
                node.quiesce_follower(sender, group, term, last_log_index).map(|()| PeerReply::Done).map_err(RequestError::Unavailable)
            }
            PeerRequest::TransferLeader { shard, to, fence } => {
                node.check_placement_order(sender, fence, None)?;
                node.transfer_leader(shard, to).await.map(|()| PeerReply::Done)
            }
            PeerRequest::Raft { group, .. } => {
                Err(RequestError::Malformed(format!("a Raft message for group {group} needs a peer connection")))
            }
            PeerRequest::RaftBatch { .. } => Err(RequestError::Malformed("Raft messages need a peer connection".into())),
        }
    }
}

/// Checks that a peer message claims to come from the node its connection's certificate names:
/// a node may speak only for itself.
pub fn check_peer_claim(caller: Caller, req: &PeerRequest) -> Result<NodeId, RequestError> {
    let Caller::Node(cert_id) = caller else {
        return Err(RequestError::PermissionDenied { request: "a peer request".into(), needed: Role::Admin, has: caller.describe() });
    };
    let claimed = match req {
        PeerRequest::Raft { from, .. } | PeerRequest::RaftBatch { from, .. } => Some(*from),
        PeerRequest::Heartbeat(hb) => Some(hb.node),
        _ => None,
    };
    match claimed {
        Some(id) if id != cert_id => {
            metrics::counter!("ringkv_peer_identity_mismatches_total").increment(1);
            Err(RequestError::NotPermitted(format!("a message claiming to be from node {id} came over node {cert_id}'s connection")))
        }
        _ => Ok(cert_id),
    }
}

impl Service<PeerRequest, PeerResponse> for PeerService {
    fn call(self: Arc<Self>, caller: Caller, req: PeerRequest) -> BoxFuture<PeerResponse> {
        Box::pin(async move {
            let sender = check_peer_claim(caller, &req)?;
            if !self.node.pool.is_isolated_from(sender) {
                self.node.liveness.heard(sender);
            }
            match req {
                PeerRequest::Raft { from, group, msg } => crate::raft::serve(&self.node, from, group, msg).await,
                PeerRequest::RaftBatch { from, msgs } => crate::raft::serve_batch(&self.node, from, msgs).await,
                other => Self::from_peer(&self.node, sender, other).await,
            }
        })
    }

    fn error(&self, why: String) -> PeerResponse {
        Err(RequestError::Malformed(why))
    }
}

pub struct ClientService {
    pub node: Arc<Node>,
    /// Requests being worked on, node-wide (`limits.client_requests_in_flight_max`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl ClientService {
    pub fn new(node: Arc<Node>) -> ClientService {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(node.config.limits.client_requests_in_flight_max));
        ClientService { node, in_flight }
    }
}

/// Refuses a request the caller's role does not allow.
pub fn authorize(caller: Caller, req: &ClientRequest) -> Result<(), RequestError> {
    ringkv_wire::auth::authorize(caller.role(), req.required_role(), req.kind(), || caller.describe())
}

/// Counts a client request by kind and result, and records how long it took.
fn record_request(kind: &'static str, started: Instant, r: &ClientResponse) {
    let result = match r {
        Ok(_) => "ok",
        Err(RequestError::NotLeader { .. }) => "not_leader",
        Err(RequestError::StaleEpoch { .. } | RequestError::WrongShard { .. } | RequestError::ShardNotFound { .. }) => "misrouted",
        Err(
            RequestError::KeyTooLarge { .. } | RequestError::ValueTooLarge { .. } | RequestError::Malformed(_) | RequestError::Invalid(_),
        ) => "bad_request",
        Err(RequestError::Unavailable(_)) => "unavailable",
        Err(RequestError::PermissionDenied { .. }) => "denied",
        Err(RequestError::TooLarge(_)) => "too_large",
        Err(RequestError::Busy(_)) => "busy",
        Err(_) => "error",
    };
    metrics::counter!("ringkv_client_requests_total", "kind" => kind, "result" => result).increment(1);
    metrics::histogram!("ringkv_client_request_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
}

impl Service<ClientRequest, ClientResponse> for ClientService {
    fn call(self: Arc<Self>, caller: Caller, req: ClientRequest) -> BoxFuture<ClientResponse> {
        Box::pin(async move {
            let kind = req.kind();
            let started = Instant::now();
            let r = match (authorize(caller, &req), self.in_flight.clone().try_acquire_owned()) {
                (Err(e), _) => Err(e),
                (Ok(()), Err(_)) => Err(RequestError::Busy(format!(
                    "node {} is working on {} requests, its limit; try again later",
                    self.node.id(),
                    self.node.config.limits.client_requests_in_flight_max
                ))),
                (Ok(()), Ok(_permit)) => self.handle(req).await,
            };
            record_request(kind, started, &r);
            r
        })
    }

    /// Reads that need no waiting: stale reads, and linearizable ones the leader's lease
    /// covers. (They hold no in-flight permit: they are done before the next request is read.)
    fn call_now(&self, caller: Caller, req: ClientRequest) -> Result<ClientResponse, ClientRequest> {
        let ClientRequest::Get { shard, epoch, key, stale } = &req else { return Err(req) };
        let started = Instant::now();
        let r = match authorize(caller, &req) {
            Err(e) => Err(e),
            Ok(()) => match self.read_now(*shard, *epoch, key, *stale) {
                Some(r) => r,
                None => return Err(req),
            },
        };
        record_request(req.kind(), started, &r);
        Ok(r)
    }

    fn error(&self, why: String) -> ClientResponse {
        metrics::counter!("ringkv_client_requests_total", "kind" => "malformed", "result" => "bad_request").increment(1);
        Err(RequestError::Malformed(why))
    }

    fn busy(&self, why: String) -> ClientResponse {
        metrics::counter!("ringkv_client_requests_total", "kind" => "connection", "result" => "busy").increment(1);
        Err(RequestError::Busy(why))
    }

    fn too_large(&self, why: String) -> ClientResponse {
        metrics::counter!("ringkv_client_requests_total", "kind" => "oversize", "result" => "too_large").increment(1);
        Err(RequestError::TooLarge(why))
    }
}

/// Refuses a key or value over the node's limits (every protocol checks with this).
pub fn check_sizes(l: &ringkv_config::Limits, key: &[u8], value: Option<&[u8]>) -> Result<(), RequestError> {
    if key.len() > l.key_bytes_max {
        return Err(RequestError::KeyTooLarge { len: key.len(), max: l.key_bytes_max });
    }
    if let Some(v) = value {
        if v.len() > l.value_bytes_max {
            return Err(RequestError::ValueTooLarge { len: v.len(), max: l.value_bytes_max });
        }
    }
    Ok(())
}

impl ClientService {
    fn check_sizes(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), RequestError> {
        check_sizes(&self.node.config.limits, key, value)
    }

    /// Finds the replica for a keyed request and checks that the request routed correctly.
    fn route(&self, shard: GroupId, epoch: Epoch, key: &[u8]) -> Result<Arc<Replica>, RequestError> {
        let node = &self.node;
        let map = node.map();
        if !map.is_bootstrapped() {
            return Err(RequestError::NotBootstrapped);
        }
        let Some(desc) = map.shard(shard) else {
            return Err(RequestError::WrongShard { shard, descriptor: map.shard_for_hash(key_hash(key)).cloned() });
        };
        if epoch < desc.epoch {
            return Err(RequestError::StaleEpoch { descriptor: desc.clone() });
        }
        if !desc.contains(key_hash(key)) {
            return Err(RequestError::WrongShard { shard, descriptor: map.shard_for_hash(key_hash(key)).cloned() });
        }
        node.replica(shard).ok_or(RequestError::ShardNotFound { shard, node: node.id() })
    }

    /// Routes a request for several keys: all must belong to `shard`.
    fn route_all<'a>(
        &self,
        shard: GroupId,
        epoch: Epoch,
        items: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<Arc<Replica>, RequestError> {
        let mut replica = None;
        for (key, value) in items {
            self.check_sizes(key, value)?;
            replica = Some(self.route(shard, epoch, key)?);
        }
        replica.ok_or_else(|| RequestError::Malformed("a batch needs at least one key".into()))
    }

    /// Answers at once from a leader cut off from its quorum, instead of letting the request
    /// wait for a commit that cannot come.
    fn check_quorum_contact(&self, r: &Replica) -> Result<(), RequestError> {
        let cut_off = r.cut_off(self.node.quorum_silence_limit());
        match cut_off {
            Some(since) => Err(RequestError::Unavailable(format!("leader of shard {} has not heard from a quorum for {since:?}", r.group))),
            None => Ok(()),
        }
    }

    async fn write(&self, r: &Replica, cmd: Command) -> Result<CommandResult, RequestError> {
        self.node.check_disk_space()?;
        self.check_quorum_contact(r)?;
        metrics::counter!("ringkv_raft_proposals_total").increment(1);
        let res = tokio::time::timeout(PROPOSAL_TIMEOUT, r.active().write(cmd)).await.map_err(|_| {
            RequestError::Unavailable(format!(
                "shard {} did not commit within {PROPOSAL_TIMEOUT:?}; the write may or may not apply",
                r.group
            ))
        })?;
        match res {
            Ok(data) => {
                metrics::counter!("ringkv_raft_commits_total").increment(1);
                match data {
                    CommandResult::Expired { client, seq, floor } => Err(RequestError::NotPermitted(format!(
                        "write {seq} of client {client:x} arrived after its session moved past it (to {floor}): not applied now, and \
                         its answer is no longer kept, so an earlier attempt of it may or may not have applied"
                    ))),
                    data => Ok(data),
                }
            }
            Err(e) => Err(self.group_error(r, e)),
        }
    }

    fn group_error(&self, r: &Replica, e: GroupError) -> RequestError {
        match e {
            GroupError::NotLeader(leader) => self.node.not_leader(r.group, leader),
            GroupError::Unavailable(why) => RequestError::Unavailable(why),
            GroupError::Stopped(why) => RequestError::Unavailable(format!("shard {} stopped: {why}", r.group)),
        }
    }

    /// A stale read may lag, but never goes back: it is refused (the client tries another
    /// replica) on a replica installing a snapshot, being removed, or that is no voter (a
    /// learner still being filled).
    fn check_stale_read(&self, r: &Replica) -> Result<(), RequestError> {
        let why = if r.sm.is_installing() {
            "is installing a snapshot"
        } else if r.retired.load(std::sync::atomic::Ordering::Acquire) {
            "is being removed"
        } else if !r.raft.is_voter(self.node.id()) {
            "is not a voter (a learner being filled)"
        } else {
            return Ok(());
        };
        Err(RequestError::Unavailable(format!("the replica of shard {} on node {} {why}; read elsewhere", r.group, self.node.id())))
    }

    /// Whether this replica may serve a linearizable read now, without asking its group's Raft
    /// task: it leads by a valid lease (checked from the metrics that task publishes).
    fn lease_covers(&self, r: &Replica) -> bool {
        // The fault tests' self-check: skip the barrier, so a deposed leader answers reads from
        // its own state and the linearizability checker must object.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("read::skip_barrier", |_| true);
        let covered = self.node.config.raft.read_policy == ringkv_config::ReadPolicy::Lease && r.active().lease_read_ready();
        if covered {
            metrics::counter!("ringkv_raft_lease_reads_local_total").increment(1);
        }
        covered
    }

    /// A read answered without waiting: a stale one, or a linearizable one the lease covers.
    /// `None`: it has to wait for the group ([`ClientService::handle`]).
    fn read_now(&self, shard: GroupId, epoch: Epoch, key: &[u8], stale: bool) -> Option<ClientResponse> {
        let r = match self.check_sizes(key, None).and_then(|()| self.route(shard, epoch, key)) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if stale {
            if let Err(e) = self.check_stale_read(&r) {
                return Some(Err(e));
            }
        } else if !self.lease_covers(&r) {
            return None;
        }
        Some(r.sm.get(key).map(ClientReply::Value).map_err(|e| RequestError::Internal(e.to_string())))
    }

    async fn read_barrier(&self, r: &Replica) -> Result<(), RequestError> {
        // Served at once while the lease holds; else by the group's Raft task (which may know
        // a newer acknowledgement), and if the lease is stale (e.g. a group that just woke) by a
        // heartbeat round.
        if self.lease_covers(r) {
            return Ok(());
        }
        let lease = self.node.config.raft.read_policy == ringkv_config::ReadPolicy::Lease;
        self.check_quorum_contact(r)?;
        let res = tokio::time::timeout(PROPOSAL_TIMEOUT, r.active().confirm_leadership(lease))
            .await
            .map_err(|_| RequestError::Unavailable(format!("shard {} could not confirm leadership in time", r.group)))?;
        res.map_err(|e| self.group_error(r, e))
    }

    async fn handle(&self, req: ClientRequest) -> ClientResponse {
        match req {
            ClientRequest::GetMap => {
                self.node.check_map_current()?;
                let mut map = (*self.node.map()).clone();
                // Token hashes stay inside the cluster.
                map.tokens.clear();
                Ok(ClientReply::Map(map))
            }
            ClientRequest::Get { shard, epoch, key, stale } => {
                self.check_sizes(&key, None)?;
                let r = self.route(shard, epoch, &key)?;
                if stale {
                    self.check_stale_read(&r)?;
                } else {
                    self.read_barrier(&r).await?;
                }
                let v = r.sm.get(&key).map_err(|e| RequestError::Internal(e.to_string()))?;
                Ok(ClientReply::Value(v))
            }
            ClientRequest::Put { shard, epoch, key, value, session } => {
                self.check_sizes(&key, Some(&value))?;
                let r = self.route(shard, epoch, &key)?;
                expect_done(self.write(&r, with_session(session, Command::Put { key, value })).await?)
            }
            ClientRequest::Delete { shard, epoch, key, session } => {
                self.check_sizes(&key, None)?;
                let r = self.route(shard, epoch, &key)?;
                expect_done(self.write(&r, with_session(session, Command::Delete { key })).await?)
            }
            ClientRequest::Cas { shard, epoch, key, expect, new, session } => {
                self.check_sizes(&key, Some(&new))?;
                if let Some(e) = &expect {
                    self.check_sizes(&key, Some(e))?;
                }
                let r = self.route(shard, epoch, &key)?;
                match self.write(&r, with_session(session, Command::Cas { key, expect, new })).await? {
                    CommandResult::Cas { swapped, current } => Ok(ClientReply::Cas { swapped, current }),
                    other => Err(RequestError::Internal(format!("unexpected result {other:?}"))),
                }
            }
            ClientRequest::Apply { shard, epoch, key, op, session } => {
                let grows = match &op {
                    KeyOp::Append(v) => Some(v.as_slice()),
                    _ => None,
                };
                self.check_sizes(&key, grows)?;
                let r = self.route(shard, epoch, &key)?;
                let cmd = Command::Apply { key, op, value_bytes_max: self.node.config.limits.value_bytes_max as u64 };
                match self.write(&r, with_session(session, cmd)).await? {
                    CommandResult::Int(n) => Ok(ClientReply::Int(n)),
                    CommandResult::Invalid(why) => Err(RequestError::Invalid(why)),
                    other => Err(RequestError::Internal(format!("unexpected result {other:?}"))),
                }
            }
            ClientRequest::BatchGet { shard, epoch, keys, stale } => {
                let r = self.route_all(shard, epoch, keys.iter().map(|k| (k.as_slice(), None)))?;
                if stale {
                    self.check_stale_read(&r)?;
                } else {
                    self.read_barrier(&r).await?;
                }
                // One snapshot for the whole answer, bounded in bytes: past the budget the answer is
                // a prefix of the keys and the client asks again for the rest.
                // The budget plus the one key that crosses it fits the reply frame (twice the
                // largest key and value, plus slack).
                let l = &self.node.config.limits;
                let values =
                    r.sm.get_many(&keys, l.key_bytes_max + l.value_bytes_max).map_err(|e| RequestError::Internal(e.to_string()))?;
                Ok(ClientReply::Values(values))
            }
            ClientRequest::BatchPut { shard, epoch, pairs, session } => {
                let r = self.route_all(shard, epoch, pairs.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))))?;
                expect_done(self.write(&r, with_session(session, Command::PutMany { pairs })).await?)
            }
            ClientRequest::TransferLeader { shard, to } => {
                self.node.transfer_leader(shard, to).await?;
                Ok(ClientReply::Done)
            }
            ClientRequest::NodeStatus => Ok(ClientReply::NodeStatus(self.status())),
            ClientRequest::Bootstrap { nodes, shards, replication } => {
                crate::bootstrap::bootstrap(&self.node, nodes, shards, replication).await
            }
            ClientRequest::SetPartition { isolated_from } => {
                if !self.node.config.fault_injection {
                    return Err(RequestError::NotPermitted(
                        "fault injection is off on this node (it is on only for a run started with --fault-injection)".into(),
                    ));
                }
                tracing::warn!(?isolated_from, "fault filter set");
                self.node.pool.set_isolated_from(isolated_from);
                Ok(ClientReply::Done)
            }
            ClientRequest::Identify => Ok(ClientReply::Identity(self.node.info())),
            ClientRequest::Drain { on } => {
                if !self.node.map().is_bootstrapped() {
                    return Err(RequestError::NotPermitted(format!("node {} belongs to no cluster yet", self.node.id())));
                }
                self.node.set_draining(on).await;
                Ok(ClientReply::Done)
            }
            ClientRequest::Init { shards, replication } => self.node.init(shards, replication).await,
            ClientRequest::JoinCluster { through } => {
                let map = self.node.map();
                if map.is_bootstrapped() {
                    return Err(RequestError::NotPermitted(format!(
                        "node {} already belongs to cluster {}",
                        self.node.id(),
                        map.cluster_id
                    )));
                }
                crate::join(self.node.clone(), through).await.map_err(RequestError::NotPermitted)?;
                Ok(ClientReply::Done)
            }
            req @ (ClientRequest::Join { .. }
            | ClientRequest::SetNodeState { .. }
            | ClientRequest::PlacementStatus
            | ClientRequest::SetPlacementSettings { .. }
            | ClientRequest::CreateToken { .. }
            | ClientRequest::RevokeToken { .. }
            | ClientRequest::ListTokens) => match self.node.placement_call(PeerRequest::Admin(Box::new(req))).await? {
                PeerReply::Admin(r) => r,
                other => Err(RequestError::Internal(format!("unexpected reply {other:?}"))),
            },
        }
    }

    /// Every replica's role. A leader cut off from its quorum is not reported as leader.
    fn status(&self) -> NodeStatus {
        let limit = self.node.quorum_silence_limit();
        let mut groups: Vec<GroupStatus> = self
            .node
            .replicas
            .iter()
            .map(|r| {
                let m = r.raft.state();
                let cut_off = r.cut_off(limit).is_some();
                GroupStatus {
                    group: r.group,
                    leader: if cut_off { None } else { m.leader() },
                    is_leader: m.is_leader() && !cut_off,
                    term: m.term(),
                    applied: m.applied().unwrap_or(0),
                    voters: m.voters(),
                    behind: m.entries_behind(),
                }
            })
            .collect();
        groups.sort_by_key(|g| g.group);
        NodeStatus {
            node: self.node.id(),
            map_version: self.node.map().version,
            groups,
            quarantined: self.node.quarantined(),
            draining: self.node.is_draining(),
            not_ready: self.node.not_ready(),
        }
    }
}

fn with_session(session: Option<Session>, cmd: Command) -> Command {
    match session {
        Some(session) => Command::Session { session, cmd: Box::new(cmd) },
        None => cmd,
    }
}

fn expect_done(r: CommandResult) -> ClientResponse {
    match r {
        CommandResult::Done => Ok(ClientReply::Done),
        other => Err(RequestError::Internal(format!("unexpected result {other:?}"))),
    }
}
