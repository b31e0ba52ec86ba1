//! The placement driver on a node: every node heartbeats its replicas' statistics to the
//! placement leader; on the placement leader, the executor turns the planner's operators into
//! Raft membership changes, one step per round, and records each step in the cluster map.
//!
//! A move of `shard` from `from` to `to` runs as:
//! 1. `BeginMove` is committed to the map; `to` sees it and creates an empty replica.
//! 2. The shard's leader adds `to` as a learner; Raft fills it (by snapshot if the log is purged).
//! 3. Once the learner is within [`CAUGHT_UP_SLACK`] entries of the leader, the leader replaces
//!    `from` by `to` in one joint-consensus change (the leader first hands off leadership if it
//!    is `from` itself).
//! 4. `FinishMove` is committed: the map lists `to`, the shard's `conf_ver` bumps, and `from`
//!    sees that and removes its replica (leaving a tombstone).
//!
//! Every step is idempotent and the move itself lives in the map, so a new placement leader
//! resumes where the old one stopped. A move whose shard's epoch changed, or whose Raft group
//! ended up with voters that are neither the old nor the new set, is abandoned.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_placement::planner::{self, is_down, Observed, Operator, PlannerConfig};
use ringkv_placement::PlacementCommand;
use ringkv_storage::{Command, CommandResult, PeerNode};
use ringkv_wire::*;

use crate::raft::{PeerReply, PeerRequest};

use crate::node::{Node, Replica};
use crate::peer::Lane;

/// How often a node reports to the placement leader.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A node whose heartbeats have not reached the placement leader for this long does not hand
/// out its map as current.
pub const MAP_STALE_AFTER: Duration = Duration::from_secs(10);
/// How often the placement leader runs a round of the executor.
pub const EXECUTOR_INTERVAL: Duration = Duration::from_secs(1);
/// A learner within this many entries of the leader's last index counts as caught up.
pub const CAUGHT_UP_SLACK: u64 = 16;
/// A new placement leader waits this long for every node's heartbeat before it balances
/// leaders (with half the reports it would see an imbalance that is not there).
pub const TAKEOVER_QUIET: Duration = Duration::from_secs(3);
/// After leader transfers, the next ones wait for heartbeats that show their effect.
pub const TRANSFER_SETTLE: Duration = Duration::from_secs(3);
/// Deadline of one step of a move on the shard's leader.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of a request forwarded to the placement leader.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

struct Progress {
    stage: String,
    matched: u64,
    last: u64,
    started: Instant,
    /// The shard's leader, as the last step learned it.
    leader: Option<NodeId>,
}

/// What the placement leader keeps in memory (rebuilt from heartbeats after a takeover).
#[derive(Default)]
struct LeaderState {
    since: Option<Instant>,
    heartbeats: BTreeMap<NodeId, (Instant, NodeHeartbeat)>,
    progress: BTreeMap<GroupId, Progress>,
    last_transfers: Option<Instant>,
    /// Shards whose Raft voters disagreed with the map, and when: no new move for a while.
    conflicts: BTreeMap<GroupId, Instant>,
}

/// How long no new move is planned for a shard whose voters disagreed with the map.
pub const CONFLICT_BACKOFF: Duration = Duration::from_secs(60);

pub struct Driver {
    base: Instant,
    state: Mutex<LeaderState>,
    /// The placement leader this node last reached.
    leader_hint: Mutex<Option<NodeId>>,
    /// Applied index of each local replica at the previous heartbeat.
    applied: Mutex<BTreeMap<GroupId, (Instant, u64)>>,
    /// The highest placement term any placement order came with: orders from lower terms come
    /// from a deposed leader and are refused.
    placement_term_seen: std::sync::atomic::AtomicU64,
    /// When this node's heartbeat last reached the placement leader.
    pub(crate) placement_contact: Mutex<Option<Instant>>,
    /// When this node last handed its shard leaderships away for want of placement contact.
    last_yield: Mutex<Option<Instant>>,
}

impl Default for Driver {
    fn default() -> Self {
        Driver {
            base: Instant::now(),
            state: Mutex::new(LeaderState::default()),
            leader_hint: Mutex::new(None),
            applied: Mutex::new(BTreeMap::new()),
            placement_term_seen: std::sync::atomic::AtomicU64::new(0),
            placement_contact: Mutex::new(None),
            last_yield: Mutex::new(None),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Driver {
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis() as u64
    }

    /// What the planner needs besides the map, from the heartbeats received since takeover.
    fn observed(&self, st: &LeaderState) -> Observed {
        let mut leaders: BTreeMap<GroupId, (u64, NodeId)> = BTreeMap::new();
        for (node, (_, hb)) in &st.heartbeats {
            for g in hb.groups.iter().filter(|g| g.is_leader && g.group != PLACEMENT_GROUP) {
                // Of two replicas claiming to lead, the one with the higher term does.
                if leaders.get(&g.group).is_none_or(|(term, _)| g.term > *term) {
                    leaders.insert(g.group, (g.term, *node));
                }
            }
        }
        Observed {
            last_heartbeat_ms: st.heartbeats.iter().map(|(n, (t, _))| (*n, self.ms(*t))).collect(),
            leaders: leaders.into_iter().map(|(g, (_, n))| (g, n)).collect(),
            leader_since_ms: st.since.map(|t| self.ms(t)).unwrap_or(0),
            quarantined: st.heartbeats.iter().flat_map(|(n, (_, hb))| hb.quarantined.iter().map(move |g| (*g, *n))).collect(),
            draining: st.heartbeats.iter().filter(|(_, (_, hb))| hb.draining).map(|(n, _)| *n).collect(),
        }
    }

    fn shard_bytes(st: &LeaderState) -> BTreeMap<GroupId, u64> {
        let mut out: BTreeMap<GroupId, u64> = BTreeMap::new();
        for (_, hb) in st.heartbeats.values() {
            for g in &hb.groups {
                let b = out.entry(g.group).or_default();
                *b = (*b).max(g.bytes);
            }
        }
        out
    }
}

impl Node {
    /// This node's placement replica, if it leads the placement group (and is not cut off).
    pub fn placement_leader(&self) -> Option<Arc<Replica>> {
        let r = self.replica(PLACEMENT_GROUP)?;
        let m = r.raft.state();
        (m.is_leader() && m.cut_off_from_quorum(self.quorum_silence_limit()).is_none()).then_some(r)
    }

    pub(crate) fn placement_not_leader(&self) -> RequestError {
        let leader = self.replica(PLACEMENT_GROUP).and_then(|r| r.raft.leader());
        self.not_leader(PLACEMENT_GROUP, leader)
    }

    /// Sends `req` (a heartbeat or an admin request) to the placement leader, or handles it here
    /// if this node is the leader.
    pub async fn placement_call(self: &Arc<Self>, req: PeerRequest) -> Result<PeerReply, RequestError> {
        if let Some(r) = self.placement_leader() {
            return handle(self, &r, req).await;
        }
        let map = self.map();
        let mut queue: VecDeque<NodeId> = VecDeque::new();
        if let Some(h) = *lock(&self.driver.leader_hint) {
            queue.push_back(h);
        }
        if let Some(l) = self.replica(PLACEMENT_GROUP).and_then(|r| r.raft.leader()) {
            queue.push_back(l);
        }
        queue.extend(map.placement_members.iter().copied());
        let mut tried = BTreeSet::new();
        let mut last = format!("no placement member known (map version {})", map.version);
        while let Some(id) = queue.pop_front() {
            if id == self.id() || !tried.insert(id) || tried.len() > 8 {
                continue;
            }
            let Some(addr) = map.node(id).map(|n| n.peer_addr.clone()) else { continue };
            match self.pool.call(id, &addr, &req, FORWARD_TIMEOUT, Lane::Control).await {
                Ok(Ok(reply)) => {
                    *lock(&self.driver.leader_hint) = Some(id);
                    return Ok(reply);
                }
                Ok(Err(RequestError::NotLeader { leader, .. })) => {
                    if let Some(l) = leader {
                        queue.push_front(l);
                    }
                    last = format!("node {id} does not lead the placement group");
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => last = format!("node {id}: {e}"),
            }
        }
        Err(RequestError::Unavailable(format!("no placement leader reachable: {last}")))
    }

    /// This node's heartbeat: every replica's role, applied index, size and apply rate.
    pub fn heartbeat(&self) -> NodeHeartbeat {
        let limit = self.quorum_silence_limit();
        let now = Instant::now();
        let mut prev = lock(&self.driver.applied);
        let mut groups: Vec<GroupStat> = self
            .replicas
            .iter()
            .map(|r| {
                let m = r.raft.state();
                let applied = m.applied().unwrap_or(0);
                let rate = match prev.insert(r.group, (now, applied)) {
                    Some((t, a)) if now > t => (applied.saturating_sub(a) as f64 / (now - t).as_secs_f64()) as u64,
                    _ => 0,
                };
                GroupStat {
                    group: r.group,
                    is_leader: m.is_leader() && r.cut_off(limit).is_none(),
                    term: m.term(),
                    applied,
                    bytes: r.approximate_bytes(),
                    applied_per_sec: rate,
                }
            })
            .collect();
        prev.retain(|g, _| self.replicas.contains_key(g));
        groups.sort_by_key(|g| g.group);
        let quarantined = self.quarantined().into_iter().map(|(g, _)| g).collect();
        NodeHeartbeat {
            node: self.id(),
            incarnation: self.incarnation,
            map_version: self.map().version,
            groups,
            quarantined,
            draining: self.is_draining(),
        }
    }

    /// One step of a move, run on the shard's leader. See the module documentation.
    pub async fn move_step(
        &self,
        shard: GroupId,
        from: NodeId,
        to: NodeId,
        to_addr: String,
        cancel: bool,
    ) -> Result<MoveStage, RequestError> {
        let r = self.replica(shard).ok_or(RequestError::ShardNotFound { shard, node: self.id() })?;
        let m = r.raft.state();
        if !m.is_leader() {
            return Err(self.not_leader(shard, m.leader()));
        }
        let last = m.last_log_index().unwrap_or(0);
        // How far the leader has replicated to `n` (0: not yet known).
        let progress = |n: NodeId| m.replicated_to(n);
        let matched = progress(to);
        // Decide only on a committed membership: an appended but uncommitted change may still
        // be lost with this leader, and a move recorded as finished on it could leave the shard
        // below quorum. Until it commits there is nothing to do but wait.
        if !m.membership_committed() {
            return Ok(MoveStage::Learner { matched, last });
        }
        let configs = m.voter_sets();
        let old: BTreeSet<NodeId> = configs.first().cloned().unwrap_or_default();
        let mut target = old.clone();
        target.remove(&from);
        target.insert(to);
        let voters = m.voters();
        let is_learner = m.is_learner(to);
        let raft_err = |e: String| RequestError::Unavailable(format!("shard {shard}: {e}"));

        if configs.len() == 1 && old.contains(&to) && !old.contains(&from) {
            return Ok(MoveStage::Done { voters });
        }
        if configs.len() > 1 {
            // A leader change interrupted the joint phase: finish it if it is ours.
            if configs.last() == Some(&target) || (configs.last().is_some_and(|c| c.contains(&to) && !c.contains(&from))) {
                let last = configs.last().cloned().unwrap_or_default();
                membership_step(shard, r.active().replace_voters(last.clone())).await?;
                return Ok(MoveStage::Done { voters: last.into_iter().collect() });
            }
            return Ok(MoveStage::Conflict { voters });
        }
        if !old.contains(&from) || old.contains(&to) {
            return Ok(MoveStage::Conflict { voters });
        }
        if cancel {
            if is_learner {
                membership_step(shard, r.active().remove_nodes(BTreeSet::from([to]))).await?;
            }
            return Ok(MoveStage::Cancelled);
        }
        if !is_learner {
            tokio::time::timeout(STEP_TIMEOUT, r.active().add_learner(to, PeerNode { peer_addr: to_addr }))
                .await
                .map_err(|_| raft_err("adding the learner timed out".into()))?
                .map_err(raft_err)?;
            return Ok(MoveStage::Learner { matched: 0, last });
        }
        if matched + CAUGHT_UP_SLACK < last {
            return Ok(MoveStage::Learner { matched, last });
        }
        if from == self.id() {
            // The leader is the replica leaving: hand off first, so the change runs on a leader
            // that stays.
            // To the voter furthest along, so the shard is not left waiting for a laggard.
            if let Some(next) = old.iter().copied().filter(|n| *n != from).max_by_key(|n| (progress(*n), std::cmp::Reverse(*n))) {
                r.active().transfer_leader(next).await.map_err(raft_err)?;
            }
            return Ok(MoveStage::Learner { matched, last });
        }
        membership_step(shard, r.active().replace_voters(target.clone())).await?;
        Ok(MoveStage::Done { voters: target.into_iter().collect() })
    }

    /// Refuses to hand out this node's map as current when its heartbeats have not reached the
    /// placement leader for [`MAP_STALE_AFTER`]: it may be cut off from the placement quorum and
    /// its map old. (A node that has not reached it yet since it started still answers.)
    pub fn check_map_current(&self) -> Result<(), RequestError> {
        match *lock(&self.driver.placement_contact) {
            Some(t) if t.elapsed() > MAP_STALE_AFTER => Err(RequestError::Unavailable(format!(
                "node {} has not reached the placement leader for {:?}; its map may be stale, ask another node",
                self.id(),
                t.elapsed()
            ))),
            _ => Ok(()),
        }
    }

    /// Hands every shard leadership held here to the most caught-up other voter when this node
    /// has been cut off from the placement quorum for [`MAP_STALE_AFTER`] (at most once per that
    /// time): the placement driver cannot reach a leader here, so it could not move the shard
    /// (repair this node away, balance) while the leader kept its followers. A replica that still
    /// reaches placement takes over; if none does, leadership moves at most once per period.
    pub async fn yield_leaderships_when_cut_off(&self) {
        let cut_off = lock(&self.driver.placement_contact).is_some_and(|t| t.elapsed() > MAP_STALE_AFTER);
        if !cut_off {
            return;
        }
        {
            let mut last = lock(&self.driver.last_yield);
            if last.is_some_and(|t| t.elapsed() < MAP_STALE_AFTER) {
                return;
            }
            *last = Some(Instant::now());
        }
        let led: Vec<Arc<Replica>> = self.replicas.iter().filter(|r| *r.key() != 0 && r.raft.is_leader()).map(|r| r.clone()).collect();
        for r in led {
            let m = r.raft.state();
            let progress = |n: NodeId| m.replicated_to(n);
            let voters = m.voters().into_iter().filter(|n| *n != self.id());
            if let Some(to) = voters.max_by_key(|n| (progress(*n), std::cmp::Reverse(*n))) {
                tracing::warn!("shard {}: no placement contact for over {MAP_STALE_AFTER:?}, handing leadership to node {to}", r.group);
                metrics::counter!("ringkv_leaderships_yielded_total").increment(1);
                if let Err(e) = r.active().transfer_leader(to).await {
                    tracing::warn!("shard {}: leader transfer to node {to} failed: {e}", r.group);
                }
            }
        }
    }

    /// Checks an order (a move step, a leader transfer) from node `sender`: it must be a
    /// placement member, its placement term must not be older than one already seen, and a move
    /// must be one the map records. A node whose map is older than the order's answers
    /// `Unavailable`, and the leader retries once the map reached it.
    pub fn check_placement_order(
        &self,
        sender: NodeId,
        fence: PlacementFence,
        move_of: Option<(GroupId, NodeId, NodeId)>,
    ) -> Result<(), RequestError> {
        let map = self.map();
        let joining = map.placement_move.as_ref().is_some_and(|m| m.to == sender);
        if !map.placement_members.contains(&sender) && !joining {
            return Err(RequestError::NotPermitted(format!("node {sender} is not a placement member and cannot order moves")));
        }
        let seen = self.driver.placement_term_seen.load(std::sync::atomic::Ordering::Acquire);
        if fence.term < seen {
            return Err(RequestError::NotPermitted(format!(
                "an order of placement term {} after term {seen} began: it comes from a deposed placement leader",
                fence.term
            )));
        }
        if map.version < fence.map_version {
            return Err(RequestError::Unavailable(format!(
                "node {} has map version {}, older than the order's {}; retry once it caught up",
                self.id(),
                map.version,
                fence.map_version
            )));
        }
        if let Some((shard, from, to)) = move_of {
            if !map.move_of(shard).is_some_and(|m| m.from == from && m.to == to) {
                return Err(RequestError::NotPermitted(format!(
                    "map version {} records no move of shard {shard} from {from} to {to}",
                    map.version
                )));
            }
        }
        // Only an order that passed every check moves the fence.
        self.driver.placement_term_seen.fetch_max(fence.term, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Hands leadership of `shard` (led here) to `to`, a voter.
    pub async fn transfer_leader(&self, shard: GroupId, to: NodeId) -> Result<(), RequestError> {
        let r = self.replica(shard).ok_or(RequestError::ShardNotFound { shard, node: self.id() })?;
        let voters = r.raft.voters();
        if !voters.contains(&to) {
            return Err(RequestError::Malformed(format!("node {to} is not a voter of shard {shard} (voters: {voters:?})")));
        }
        if !r.raft.is_leader() {
            return Err(self.not_leader(shard, r.raft.leader()));
        }
        r.active().transfer_leader(to).await.map_err(RequestError::Unavailable)
    }
}

/// Waits up to [`STEP_TIMEOUT`] for a membership change of `shard` to commit.
async fn membership_step(shard: GroupId, change: impl std::future::Future<Output = Result<(), String>>) -> Result<(), RequestError> {
    match tokio::time::timeout(STEP_TIMEOUT, change).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RequestError::Unavailable(format!("shard {shard}: {e}"))),
        Err(_) => Err(RequestError::Unavailable(format!("shard {shard}: membership change not committed within {STEP_TIMEOUT:?}"))),
    }
}

/// Handles a heartbeat or an admin request on the placement leader.
pub async fn handle(node: &Arc<Node>, r: &Replica, req: PeerRequest) -> Result<PeerReply, RequestError> {
    match req {
        PeerRequest::Heartbeat(hb) => {
            // A heartbeat from a wiped or replaced data dir under a known id is refused (and
            // not counted: the old node stays down until an operator removes it).
            if let Ok(Some(map)) = r.sm.placement_map() {
                if map.node(hb.node).is_some_and(|n| n.incarnation != 0 && n.incarnation != hb.incarnation) {
                    return Err(RequestError::NotPermitted(ringkv_placement::amnesia(hb.node)));
                }
            }
            let mut st = lock(&node.driver.state);
            st.since.get_or_insert_with(Instant::now);
            st.heartbeats.insert(hb.node, (Instant::now(), hb));
            Ok(PeerReply::Done)
        }
        PeerRequest::Admin(req) => Ok(PeerReply::Admin(admin(node, r, *req).await)),
        other => Err(RequestError::Malformed(format!("not a placement request: {other:?}"))),
    }
}

/// Commits a placement command through the placement group; answers the map after it.
pub async fn propose(r: &Replica, cmd: PlacementCommand) -> Result<ClusterMap, RequestError> {
    let res = tokio::time::timeout(FORWARD_TIMEOUT, r.active().write(Command::Placement(cmd)))
        .await
        .map_err(|_| RequestError::Unavailable(format!("the placement group did not commit within {FORWARD_TIMEOUT:?}")))?;
    match res {
        Ok(CommandResult::Placement(Ok(()))) => {
            r.sm.placement_map().map_err(|e| RequestError::Internal(e.to_string()))?.ok_or(RequestError::NotBootstrapped)
        }
        Ok(CommandResult::Placement(Err(ringkv_placement::PlacementError::Invalid(m)))) => Err(RequestError::Malformed(m)),
        Ok(CommandResult::Placement(Err(e))) => Err(RequestError::NotPermitted(e.to_string())),
        Ok(other) => Err(RequestError::Internal(format!("unexpected result {other:?}"))),
        Err(e) => Err(RequestError::Unavailable(format!("placement group: {e}"))),
    }
}

async fn admin(node: &Arc<Node>, r: &Replica, req: ClientRequest) -> ClientResponse {
    match req {
        ClientRequest::Join { node: info } => {
            for (what, addr) in [("peer", &info.peer_addr), ("client", &info.client_addr), ("metrics", &info.metrics_addr)] {
                if let Err(e) = ringkv_wire::check_addr(addr, true) {
                    return Err(RequestError::Malformed(format!("node {}: {what} address: {e}", info.id)));
                }
            }
            let map = propose(r, PlacementCommand::RegisterNode { node: info.clone() }).await?;
            tracing::info!(node = info.id, peer = %info.peer_addr, "node registered");
            Ok(ClientReply::Map(map))
        }
        ClientRequest::SetNodeState { node: id, state, force } => {
            if !matches!(state, NodeState::Up | NodeState::Decommissioning | NodeState::Removed) {
                return Err(RequestError::Malformed(format!("an operator sets up, decommissioning or removed, not {}", state.as_str())));
            }
            propose(r, PlacementCommand::SetNodeState { node: id, state, force }).await?;
            tracing::info!(node = id, state = state.as_str(), force, "node state set");
            Ok(ClientReply::Done)
        }
        ClientRequest::SetPlacementSettings { settings } => {
            propose(r, PlacementCommand::SetSettings(settings)).await?;
            Ok(ClientReply::Done)
        }
        ClientRequest::PlacementStatus => {
            let map = r.sm.placement_map().map_err(|e| RequestError::Internal(e.to_string()))?.ok_or(RequestError::NotBootstrapped)?;
            Ok(ClientReply::Placement(Box::new(report(node, &map))))
        }
        ClientRequest::CreateToken { name, role, hash } => {
            propose(r, PlacementCommand::AddToken(ringkv_wire::TokenRecord { name: name.clone(), role, hash })).await?;
            tracing::info!(name, role = role.as_str(), "token created");
            Ok(ClientReply::Done)
        }
        ClientRequest::RevokeToken { name } => {
            propose(r, PlacementCommand::RevokeToken { name: name.clone() }).await?;
            tracing::info!(name, "token revoked");
            Ok(ClientReply::Done)
        }
        ClientRequest::ListTokens => {
            let map = r.sm.placement_map().map_err(|e| RequestError::Internal(e.to_string()))?.ok_or(RequestError::NotBootstrapped)?;
            let tokens = map.tokens.into_iter().map(|t| ringkv_wire::TokenRecord { hash: vec![], ..t }).collect();
            Ok(ClientReply::Tokens(tokens))
        }
        other => Err(RequestError::Malformed(format!("{} is not a placement request", other.kind()))),
    }
}

/// The plan for `map` as the executor would make it now, before the balance setting filters it.
fn plan_now(node: &Node, map: &ClusterMap) -> (Vec<Operator>, Observed, u64) {
    let st = lock(&node.driver.state);
    let obs = node.driver.observed(&st);
    let now = node.driver.ms(Instant::now());
    let cfg = PlannerConfig::from_settings(&map.settings);
    (planner::plan(map, &obs, &planner::in_flight(map), &cfg, now), obs, now)
}

fn report(node: &Node, map: &ClusterMap) -> PlacementReport {
    let (ops, obs, now) = plan_now(node, map);
    let cfg = PlannerConfig::from_settings(&map.settings);
    let st = lock(&node.driver.state);
    let bytes = Driver::shard_bytes(&st);
    let nodes = map
        .nodes
        .iter()
        .map(|n| NodeReport {
            id: n.id,
            state: n.state,
            client_addr: n.client_addr.clone(),
            replicas: map.replicas_on(n.id),
            leaders: obs.leaders.values().filter(|l| **l == n.id).count(),
            heartbeat_age_ms: obs.last_heartbeat_ms.get(&n.id).map(|t| now.saturating_sub(*t)),
            bytes: st.heartbeats.get(&n.id).map(|(_, hb)| hb.groups.iter().map(|g| g.bytes).sum()).unwrap_or(0),
        })
        .collect();
    let moves = map
        .moves
        .iter()
        .map(|m| {
            let p = st.progress.get(&m.shard);
            MoveProgress {
                record: m.clone(),
                stage: p.map(|p| p.stage.clone()).unwrap_or_else(|| "starting".into()),
                matched: p.map(|p| p.matched).unwrap_or(0),
                last: p.map(|p| p.last).unwrap_or(0),
                bytes: bytes.get(&m.shard).copied().unwrap_or(0),
                elapsed_ms: p.map(|p| p.started.elapsed().as_millis() as u64).unwrap_or(0),
            }
        })
        .collect();
    let plan: Vec<PlannedOp> = ops
        .iter()
        .map(|op| match op {
            Operator::MoveReplica { shard, from, to, reason } => PlannedOp {
                kind: "move".into(),
                shard: *shard,
                from: *from,
                to: *to,
                reason: reason.as_str().into(),
                bytes: bytes.get(shard).copied().unwrap_or(0),
            },
            Operator::TransferLeader { shard, from, to } => {
                PlannedOp { kind: "transfer_leader".into(), shard: *shard, from: *from, to: *to, reason: "leaders".into(), bytes: 0 }
            }
        })
        .collect();
    // Shards that need a move and got none: why.
    let quorum = |n: usize| n / 2 + 1;
    let mut stuck = Vec::new();
    for s in &map.shards {
        let down: Vec<NodeId> = s.replicas.iter().copied().filter(|r| is_down(map, &obs, &cfg, *r, now)).collect();
        let draining = s.replicas.iter().any(|r| map.node(*r).is_some_and(|n| n.state == NodeState::Decommissioning));
        if down.is_empty() && !draining {
            continue;
        }
        if s.replicas.len() - down.len() < quorum(s.replicas.len()) {
            stuck.push((s.id, format!("lost its quorum: replicas on down nodes {down:?}; it cannot change membership until they return")));
            continue;
        }
        let planned = plan.iter().any(|p| p.shard == s.id) || map.move_of(s.id).is_some();
        if !planned {
            let free =
                map.nodes.iter().any(|n| n.state == NodeState::Up && !is_down(map, &obs, &cfg, n.id, now) && !s.replicas.contains(&n.id));
            let why =
                if free { "waiting for the per-node move limit" } else { "no up node without a replica of it can take one: add a node" };
            stuck.push((s.id, why.to_string()));
        }
    }
    for m in &map.moves {
        if let Some(p) = st.progress.get(&m.shard).filter(|p| p.stage.starts_with("waiting")) {
            stuck.push((m.shard, p.stage.clone()));
        }
    }
    PlacementReport {
        leader: node.id(),
        map_version: map.version,
        settings: map.settings.clone(),
        nodes,
        moves,
        balanced: map.moves.is_empty() && ops.is_empty() && stuck.is_empty(),
        plan,
        stuck,
    }
}

/// Every node: report to the placement leader once per [`HEARTBEAT_INTERVAL`].
pub async fn heartbeat_loop(node: Arc<Node>) {
    let mut shutdown = node.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        if !node.map().is_bootstrapped() {
            continue;
        }
        let hb = node.heartbeat();
        let sent = node.placement_call(PeerRequest::Heartbeat(hb)).await;
        if sent.is_ok() {
            *lock(&node.driver.placement_contact) = Some(Instant::now());
        } else {
            node.yield_leaderships_when_cut_off().await;
        }
        if let Err(e) = sent {
            if let RequestError::NotPermitted(why) = &e {
                return node.fail(format!("the placement leader refused this node: {why}"));
            }
            metrics::counter!("ringkv_placement_heartbeat_failures_total").increment(1);
            tracing::debug!("heartbeat not delivered: {e}");
        }
    }
}

/// Every node: for each shard it leads, proposes forgetting the sessions of clients silent for
/// longer than `raft.session_expiry_secs`. Time is mapped to log indexes by sampling each led
/// group's last log index; the cut goes through the log (`ExpireSessions`), so every replica
/// forgets the same sessions. Idle groups are left alone: their log time does not move.
pub async fn session_expiry_loop(node: Arc<Node>) {
    let ttl = Duration::from_secs(node.config.raft.session_expiry_secs);
    let every = (ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(300));
    let mut samples: BTreeMap<GroupId, VecDeque<(Instant, u64)>> = BTreeMap::new();
    let mut proposed: BTreeMap<GroupId, u64> = BTreeMap::new();
    let mut shutdown = node.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let led: Vec<Arc<Replica>> =
            node.replicas.iter().filter(|r| r.group != PLACEMENT_GROUP && r.raft.is_leader()).map(|r| r.clone()).collect();
        samples.retain(|g, _| led.iter().any(|r| r.group == *g));
        for r in led {
            let last = r.raft.state().last_log_index().unwrap_or(0);
            let q = samples.entry(r.group).or_default();
            if q.back().is_none_or(|(_, i)| *i != last) {
                q.push_back((now, last));
            }
            // Keep the newest sample at least `ttl` old, and every newer one.
            while q.len() >= 2 && q.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= ttl) {
                q.pop_front();
            }
            let Some(&(t, index)) = q.front() else { continue };
            let below_index = index + 1;
            if now.duration_since(t) < ttl || proposed.get(&r.group).is_some_and(|p| *p >= below_index) {
                continue;
            }
            let cmd = Command::ExpireSessions { below_index };
            match tokio::time::timeout(Duration::from_secs(5), r.active().write(cmd)).await {
                Ok(Ok(_)) => {
                    proposed.insert(r.group, below_index);
                }
                other => tracing::debug!(group = r.group, "session expiry not committed: {other:?}"),
            }
        }
    }
}

/// Every node: while this node leads the placement group, run the executor.
pub async fn executor_loop(node: Arc<Node>) {
    let mut shutdown = node.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXECUTOR_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        match node.placement_leader() {
            Some(r) => {
                lock(&node.driver.state).since.get_or_insert_with(Instant::now);
                round(&node, &r).await;
            }
            None => {
                // Whatever was observed as leader is stale by the time leadership comes back.
                *lock(&node.driver.state) = LeaderState::default();
                metrics::gauge!("ringkv_placement_is_leader").set(0.0);
            }
        }
    }
}

/// One round: lifecycle, then the moves in flight, then new operators.
async fn round(node: &Arc<Node>, r: &Replica) {
    let Ok(Some(map)) = r.sm.placement_map() else { return };
    if !map.is_bootstrapped() {
        return;
    }
    let cfg = PlannerConfig::from_settings(&map.settings);
    let (obs, now, since) = {
        let st = lock(&node.driver.state);
        (node.driver.observed(&st), node.driver.ms(Instant::now()), st.since.unwrap_or_else(Instant::now))
    };
    // The cluster-wide view, exported by the placement leader only (alerts join on is_leader).
    metrics::gauge!("ringkv_placement_is_leader").set(1.0);
    let leaderless = map.shards.iter().filter(|s| !obs.leaders.contains_key(&s.id)).count();
    metrics::gauge!("ringkv_placement_shards").set(map.shards.len() as f64);
    metrics::gauge!("ringkv_placement_shards_without_leader").set(leaderless as f64);
    metrics::gauge!("ringkv_placement_moves_running").set(map.moves.len() as f64);

    // 0. Incarnations the map does not know yet (nodes bootstrapped without one) are taken from
    // the first heartbeat.
    let claims: Vec<(NodeId, u64)> = {
        let st = lock(&node.driver.state);
        map.nodes
            .iter()
            .filter(|n| n.incarnation == 0)
            .filter_map(|n| st.heartbeats.get(&n.id).map(|(_, hb)| (n.id, hb.incarnation)).filter(|(_, i)| *i != 0))
            .collect()
    };
    for (id, incarnation) in claims {
        if let Err(e) = propose(r, PlacementCommand::ClaimIncarnation { node: id, incarnation }).await {
            tracing::warn!(node = id, "cannot record the node's incarnation: {e}");
        }
    }

    // 1. Lifecycle: joining and returning nodes come up once they heartbeat; silent ones go down.
    let mut changed = false;
    for n in &map.nodes {
        let fresh = obs.last_heartbeat_ms.get(&n.id).is_some_and(|t| now.saturating_sub(*t) < cfg.down_after_ms);
        let state = match n.state {
            NodeState::Joining | NodeState::Down if fresh => NodeState::Up,
            NodeState::Up if is_down(&map, &obs, &cfg, n.id, now) => NodeState::Down,
            _ => continue,
        };
        match propose(r, PlacementCommand::SetNodeState { node: n.id, state, force: false }).await {
            Ok(_) => {
                tracing::info!(node = n.id, state = state.as_str(), "node state changed");
                changed = true;
            }
            Err(e) => tracing::warn!(node = n.id, "cannot mark node {}: {e}", state.as_str()),
        }
    }
    if changed {
        return;
    }

    // 2. The placement group's own replicas first: a removed or decommissioning member is
    // replaced (learner, caught up, joint consensus, as a shard move; this leader is the
    // group's leader, so it takes the steps itself).
    if let Some(m) = map.placement_move.clone() {
        placement_step(node, r, &map, m).await;
    } else if let Some((from, to)) = ringkv_placement::placement_replacement(&map) {
        match propose(r, PlacementCommand::BeginPlacementMove { from, to }).await {
            Ok(_) => tracing::info!(from, to, "placement member replacement started"),
            Err(e) => tracing::warn!(from, to, "cannot start replacing placement member {from}: {e}"),
        }
    }

    // 3. Moves in flight, all at once.
    let steps = map.moves.iter().map(|m| step(node, r, &map, &cfg, &obs, now, m.clone()));
    futures::future::join_all(steps).await;
    {
        let mut st = lock(&node.driver.state);
        st.progress.retain(|shard, _| map.move_of(*shard).is_some());
    }

    // 4. New operators.
    let ops = planner::plan(&map, &obs, &planner::in_flight(&map), &cfg, now);
    let (settle, backoff) = {
        let mut st = lock(&node.driver.state);
        st.conflicts.retain(|_, t| t.elapsed() < CONFLICT_BACKOFF);
        (st.last_transfers.is_some_and(|t| t.elapsed() < TRANSFER_SETTLE), st.conflicts.keys().copied().collect::<BTreeSet<GroupId>>())
    };
    let mut transfers = Vec::new();
    // A decommissioning placement member gives up its placement replica before its shards.
    let placement_leaving: Option<NodeId> =
        map.placement_move.as_ref().map(|m| m.from).or_else(|| ringkv_placement::placement_replacement(&map).map(|(from, _)| from));
    for op in ops {
        match op {
            Operator::MoveReplica { reason: planner::Reason::Balance, .. } if !map.settings.balance => {}
            Operator::MoveReplica { reason: planner::Reason::Drain, from, .. } if Some(from) == placement_leaving => {}
            Operator::MoveReplica { shard, .. } if backoff.contains(&shard) => {}
            Operator::MoveReplica { shard, from, to, reason } => {
                let Some(epoch) = map.shard(shard).map(|s| s.epoch) else { continue };
                let cmd = PlacementCommand::BeginMove { shard, from, to, epoch, reason: reason.as_str().into() };
                match propose(r, cmd).await {
                    Ok(_) => {
                        metrics::counter!("ringkv_placement_moves_started_total", "reason" => reason.as_str()).increment(1);
                        tracing::info!(shard, from, to, reason = reason.as_str(), "move started");
                        lock(&node.driver.state).progress.insert(
                            shard,
                            Progress {
                                stage: "starting".into(),
                                matched: 0,
                                last: 0,
                                started: Instant::now(),
                                leader: obs.leaders.get(&shard).copied(),
                            },
                        );
                    }
                    Err(e) => tracing::warn!(shard, from, to, "cannot start move: {e}"),
                }
            }
            Operator::TransferLeader { shard, from, to } => {
                if map.settings.balance && !settle && since.elapsed() >= TAKEOVER_QUIET {
                    transfers.push((shard, from, to));
                }
            }
        }
    }
    if !transfers.is_empty() {
        lock(&node.driver.state).last_transfers = Some(Instant::now());
        let fence = fence_of(r, &map);
        let sends = transfers.into_iter().map(|(shard, from, to)| async move {
            let req = PeerRequest::TransferLeader { shard, to, fence };
            match send(node, from, &req).await {
                Ok(_) => metrics::counter!("ringkv_placement_leader_transfers_total").increment(1),
                Err(e) => tracing::debug!(shard, from, to, "leader transfer not made: {e}"),
            }
        });
        futures::future::join_all(sends).await;
    }
}

/// One step of replacing placement member `m.from` by `m.to`, taken by the placement leader on
/// group 0 itself.
async fn placement_step(node: &Arc<Node>, r: &Replica, map: &ClusterMap, m: MoveRecord) {
    let to_addr = map.node(m.to).map(|n| n.peer_addr.clone()).unwrap_or_default();
    match node.move_step(PLACEMENT_GROUP, m.from, m.to, to_addr, false).await {
        Ok(MoveStage::Done { voters }) => match propose(r, PlacementCommand::FinishPlacementMove { from: m.from, to: m.to }).await {
            Ok(_) => {
                metrics::counter!("ringkv_placement_member_replacements_total").increment(1);
                tracing::info!(from = m.from, to = m.to, ?voters, "placement member replaced");
            }
            Err(e) => tracing::warn!("cannot record the placement member replacement: {e}"),
        },
        Ok(MoveStage::Learner { matched, last }) => tracing::debug!(to = m.to, matched, last, "placement replica catching up"),
        Ok(other) => tracing::warn!(from = m.from, to = m.to, "placement member replacement: {other:?}"),
        Err(e) => tracing::debug!(from = m.from, to = m.to, "placement member replacement waits: {e}"),
    }
}

/// The placement leader's term and the map it acts on, for the orders it sends.
fn fence_of(r: &Replica, map: &ClusterMap) -> PlacementFence {
    PlacementFence { term: r.raft.state().term(), map_version: map.version }
}

/// Sends a request to node `to` (or runs it here).
async fn send(node: &Arc<Node>, to: NodeId, req: &PeerRequest) -> Result<PeerReply, RequestError> {
    if to == node.id() {
        return crate::service::PeerService::local(node, req.clone()).await;
    }
    let addr = node.map().node(to).map(|n| n.peer_addr.clone()).ok_or(RequestError::Malformed(format!("no node {to}")))?;
    match node.pool.call(to, &addr, req, STEP_TIMEOUT + Duration::from_secs(2), Lane::Data).await {
        Ok(r) => r,
        Err(e) => Err(RequestError::Unavailable(format!("node {to}: {e}"))),
    }
}

/// Drives one move a step further, and records what happened.
async fn step(node: &Arc<Node>, r: &Replica, map: &ClusterMap, cfg: &PlannerConfig, obs: &Observed, now: u64, m: MoveRecord) {
    let set = |stage: String, matched: u64, last: u64, leader: Option<NodeId>| {
        let mut st = lock(&node.driver.state);
        let p = st.progress.entry(m.shard).or_insert_with(|| Progress {
            stage: String::new(),
            matched: 0,
            last: 0,
            started: Instant::now(),
            leader: None,
        });
        p.stage = stage;
        p.matched = matched.max(p.matched);
        p.last = last.max(p.last);
        if leader.is_some() {
            p.leader = leader;
        }
    };
    let abort = |why: String| async move {
        tracing::warn!(shard = m.shard, from = m.from, to = m.to, "move abandoned: {why}");
        metrics::counter!("ringkv_placement_moves_abandoned_total").increment(1);
        if let Err(e) = propose(r, PlacementCommand::AbortMove { shard: m.shard, from: m.from, to: m.to }).await {
            tracing::warn!(shard = m.shard, "cannot abandon the move: {e}");
        }
    };
    let Some(shard) = map.shard(m.shard) else { return abort("the shard is gone".into()).await };
    if shard.epoch != m.epoch {
        return abort(format!("the shard's epoch changed from {:?} to {:?}", m.epoch, shard.epoch)).await;
    }
    let cancel = is_down(map, obs, cfg, m.to, now) || map.node(m.to).is_none_or(|n| n.state != NodeState::Up);
    let to_addr = map.node(m.to).map(|n| n.peer_addr.clone()).unwrap_or_default();
    let req = PeerRequest::MoveStep { shard: m.shard, from: m.from, to: m.to, to_peer_addr: to_addr, cancel, fence: fence_of(r, map) };
    // Ask the leader we know of, then whoever it points to.
    let hint = lock(&node.driver.state).progress.get(&m.shard).and_then(|p| p.leader);
    let mut leader = hint.or_else(|| obs.leaders.get(&m.shard).copied()).or_else(|| shard.replicas.first().copied());
    let mut reply = Err(RequestError::Unavailable("no leader known".into()));
    for _ in 0..3 {
        let Some(l) = leader else { break };
        reply = send(node, l, &req).await;
        match &reply {
            Err(RequestError::NotLeader { leader: next, .. }) => leader = *next,
            _ => break,
        }
    }
    match reply {
        Ok(PeerReply::MoveStep(MoveStage::Learner { matched, last })) => set("learner".into(), matched, last, leader),
        Ok(PeerReply::MoveStep(MoveStage::Done { voters })) => {
            set("finishing".into(), 0, 0, leader);
            match propose(r, PlacementCommand::FinishMove { shard: m.shard, from: m.from, to: m.to }).await {
                Ok(_) => {
                    metrics::counter!("ringkv_placement_moves_finished_total").increment(1);
                    tracing::info!(shard = m.shard, from = m.from, to = m.to, ?voters, "move finished");
                }
                Err(e) => tracing::warn!(shard = m.shard, "cannot record the finished move: {e}"),
            }
        }
        Ok(PeerReply::MoveStep(MoveStage::Conflict { voters })) => {
            tracing::error!(shard = m.shard, ?voters, replicas = ?shard.replicas, "the shard's Raft voters disagree with the map");
            lock(&node.driver.state).conflicts.insert(m.shard, Instant::now());
            abort(format!("the group's voters are {voters:?}")).await
        }
        Ok(PeerReply::MoveStep(MoveStage::Cancelled)) => abort(format!("node {} is no longer up", m.to)).await,
        Ok(other) => set(format!("waiting: unexpected reply {other:?}"), 0, 0, None),
        Err(e) => {
            // Rotate to another replica next time if the leader we tried is gone.
            let next = shard.replicas.iter().copied().find(|n| Some(*n) != leader && !is_down(map, obs, cfg, *n, now));
            set(format!("waiting: {e}"), 0, 0, next);
        }
    }
}
