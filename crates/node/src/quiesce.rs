//! Idle groups go quiet: no ticks, no heartbeats, no wake-ups.
//!
//! - **Leader.** A shard leader whose group saw no proposal, read or admin step for
//!   [`QUIESCE_AFTER`], whose log is committed and applied, and whose every voter has matched
//!   its last entry (no learner, no joint membership) asks each follower to go quiet
//!   (`PeerRequest::Quiesce`). Once all agreed, and nothing happened meanwhile, it stops its
//!   ticker ([`Group::set_ticking`]): no heartbeats leave it.
//! - **Follower.** It agrees only if it follows that leader in that term with the same last log
//!   entry, applied; then it stops its ticker: no election timeout runs.
//! - **Wake.** Any activity on the leader ([`Replica::active`]) and any Raft message for the
//!   group ([`Replica::wake`]) starts the ticker again; the leader's next append or heartbeat
//!   wakes the followers. A request sent to a quiet follower does not wake it. A follower's
//!   election timer counts from its leader's last message, long ago in a quiet group, so a
//!   follower woken by a message starts no election for an election timeout: it would
//!   otherwise stand at its first tick, e.g. racing the target of a leader transfer.
//! - **Leader transfers.** openraft's leader stops proposing and heartbeating once it starts
//!   a transfer, until it is deposed, and sends the request once. While one is under way
//!   ([`Group::pending_transfer`]) the leader neither rests nor goes quiet, and the loop sends
//!   the request again every election timeout: a lost request would otherwise leave the
//!   group refusing writes with nobody to elect a new leader.
//! - **Liveness once per node pair.** A node pings the nodes that lead its quiet followers
//!   every [`CHECK_EVERY`] (any peer request counts as well). When one has been silent for the
//!   election timeout, the quiet followers of the groups it led wake, their election timers
//!   find the leader long silent, and they elect. A quiet follower whose leader's node is alive
//!   refuses a pre-vote without waking, so a restarted or partitioned peer does not wake it
//!   into an election (CockroachDB's liveness-aware pre-vote). A quiet leader refuses it as
//!   well, and wakes: its heartbeats tell the candidate who leads.
//!
//! - **Resting timers.** Under load no group is idle, yet a follower's only use of its timer
//!   (20 ticks a second) is the election timeout, and a leader's is heartbeats, which appends
//!   make unnecessary. A follower that took an append or heartbeat from its leader within
//!   [`rest_window`] stops its timer (`raft.rest_timers`); the loop starts it again once the
//!   leader has been silent that long, at least one loop period before the election timeout
//!   could expire, so a dead leader is replaced as fast as with the timer running. A leader
//!   whose followers all acknowledged an append within a heartbeat interval stops its timer
//!   too; the loop starts it again once one has not for that long, so heartbeats resume well
//!   before a follower's election timeout. Candidates and followers without a leader always
//!   tick.
//!
//! Safety does not depend on any of this: a wrong liveness verdict only causes an election, and
//! a stopped timer only delays one.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use ringkv_wire::{GroupId, NodeId, PLACEMENT_GROUP};

use crate::raft::{PeerReply, PeerRequest};

use crate::node::{Node, Replica};
use crate::peer::Lane;
use crate::raft::Group;

/// How long a leader's group must see no activity before it goes quiet.
pub const QUIESCE_AFTER: Duration = Duration::from_secs(2);
/// How often a node checks its groups and pings the leaders of its quiet followers.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a quiesce request or ping may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

const REST_NONE: u8 = 0;
const REST_FOLLOWER: u8 = 1;
const REST_LEADER: u8 = 2;

fn resting_gauge(as_what: u8) -> metrics::Gauge {
    if as_what == REST_LEADER {
        metrics::gauge!("ringkv_raft_leaders_resting")
    } else {
        metrics::gauge!("ringkv_raft_followers_resting")
    }
}

/// How often the quiesce loop runs for an election timeout of `election_min`: at most every
/// [`CHECK_EVERY`], and at least five times per election timeout.
pub fn check_every(election_min: Duration) -> Duration {
    CHECK_EVERY.min(election_min / 5)
}

/// How recently a follower must have heard its leader to rest: the loop then starts its timer
/// again at least one loop period before the election timeout could expire.
pub fn rest_window(election_min: Duration) -> Duration {
    election_min.saturating_sub(2 * check_every(election_min))
}

/// Milliseconds on a clock of this process (never 0).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A replica's quiescence state.
#[derive(Debug)]
pub struct Quiet {
    quiet: AtomicBool,
    /// Counts activity, so a leader goes quiet only if none came while it asked its followers.
    activity: AtomicU64,
    last_active_ms: AtomicU64,
    woke_ms: AtomicU64,
    /// A leader whose followers refused (or did not answer) waits until then to ask again.
    next_try_ms: AtomicU64,
    /// Whether the replica rests (its timer stopped while its group is busy), and as what.
    resting: AtomicU8,
    /// When this replica last took an append or heartbeat from its leader.
    leader_heard_ms: AtomicU64,
    /// Whether this follower may not start an election yet: it woke for some other reason than
    /// its leader's silence less than an election timeout ago ([`Replica::wake`]). A lock, not
    /// an atomic: the flag and openraft's switch change together, or a release racing a hold
    /// could leave elections off with no hold recorded to release.
    elect_held: std::sync::Mutex<bool>,
}

impl Default for Quiet {
    fn default() -> Self {
        let now = now_ms();
        Quiet {
            quiet: AtomicBool::new(false),
            activity: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(now),
            woke_ms: AtomicU64::new(now),
            next_try_ms: AtomicU64::new(0),
            resting: AtomicU8::new(REST_NONE),
            leader_heard_ms: AtomicU64::new(0),
            elect_held: std::sync::Mutex::new(false),
        }
    }
}

impl Replica {
    /// The group's Raft, for a proposal, read or admin step: counts as activity and wakes the
    /// group if it was quiet and this replica leads it. A quiet follower stays quiet: it
    /// refuses the request (it is no leader) without a timer, and awake it would stand for
    /// election (see [`Replica::wake`]).
    pub fn active(&self) -> &Group {
        self.quiet.activity.fetch_add(1, Ordering::SeqCst);
        self.quiet.last_active_ms.store(now_ms(), Ordering::Relaxed);
        // The quiet flag first: on the hot path of every request, most groups are awake.
        if self.is_quiet() && self.raft.is_leader() {
            self.wake();
        }
        &self.raft
    }

    /// Starts the group's ticker if it was quiet; returns whether it was.
    ///
    /// A follower woken by a message acts as if it had just heard its leader: it starts no
    /// election for an election timeout. Its election timer counts from its leader's last
    /// message, long ago in a quiet group, so it would otherwise stand at its first tick: when
    /// woken by a leader transfer to another replica, it would race the target. The quiesce
    /// loop lets it elect again ([`Replica::release_elections`]), and at once if its
    /// leader's node went silent.
    pub fn wake(&self) -> bool {
        if !self.quiet.quiet.swap(false, Ordering::SeqCst) {
            return false;
        }
        self.quiet.woke_ms.store(now_ms(), Ordering::Release);
        self.stop_resting(false);
        if !self.raft.is_leader() {
            let mut held = self.elect_held();
            if !*held {
                *held = true;
                self.raft.set_electing(false);
            }
        }
        self.raft.set_ticking(true);
        metrics::counter!("ringkv_raft_group_wakes_total").increment(1);
        metrics::gauge!("ringkv_raft_groups_quiet").decrement(1.0);
        true
    }

    /// Lets a follower held by [`Replica::wake`] start elections again.
    fn release_elections(&self) {
        let mut held = self.elect_held();
        if *held {
            *held = false;
            self.raft.set_electing(true);
        }
    }

    fn elect_held(&self) -> std::sync::MutexGuard<'_, bool> {
        self.quiet.elect_held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn go_quiet(&self) {
        self.stop_resting(false);
        if !self.quiet.quiet.swap(true, Ordering::SeqCst) {
            self.raft.set_ticking(false);
            metrics::counter!("ringkv_raft_group_quiesces_total").increment(1);
            metrics::gauge!("ringkv_raft_groups_quiet").increment(1.0);
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.quiet.load(Ordering::SeqCst)
    }

    /// Ends quiet and rest before the group stops (its gauges count it no longer).
    pub fn before_stop(&self) {
        self.wake();
        self.stop_resting(true);
    }

    /// Notes an append or heartbeat taken from the group's leader.
    pub fn heard_leader(&self) {
        self.quiet.leader_heard_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Stops the timer of a busy group's replica: a follower whose leader is heard, or a leader
    /// whose followers all acknowledged an append lately (`as_what`: [`REST_FOLLOWER`] or
    /// [`REST_LEADER`]).
    fn rest(&self, as_what: u8) {
        let was = self.quiet.resting.swap(as_what, Ordering::SeqCst);
        if was == as_what {
            return;
        }
        if was == REST_NONE {
            self.raft.set_ticking(false);
        } else {
            resting_gauge(was).decrement(1.0);
        }
        resting_gauge(as_what).increment(1.0);
    }

    /// Ends resting; starts the timer again when `tick` (a quiet group keeps it off).
    fn stop_resting(&self, tick: bool) {
        let was = self.quiet.resting.swap(REST_NONE, Ordering::SeqCst);
        if was != REST_NONE {
            if tick && !self.is_quiet() {
                self.raft.set_ticking(true);
            }
            resting_gauge(was).decrement(1.0);
        }
    }

    pub fn is_resting(&self) -> bool {
        self.quiet.resting.load(Ordering::SeqCst) != REST_NONE
    }

    /// How long this replica, as leader, has not heard from a quorum, if longer than `limit`.
    /// A quiet group, or one that just woke, has not by design: that is not being cut off.
    pub fn cut_off(&self, limit: Duration) -> Option<Duration> {
        if self.is_quiet() || self.woke_within(limit) {
            return None;
        }
        self.raft.cut_off_from_quorum(limit)
    }

    /// Whether the group woke from quiet within `d` (a leader that just woke has not heard its
    /// quorum for a while, and that is no reason to refuse a write).
    pub fn woke_within(&self, d: Duration) -> bool {
        now_ms().saturating_sub(self.quiet.woke_ms.load(Ordering::Relaxed)) < d.as_millis() as u64
    }
}

/// When each peer node was last heard from (any peer request, or an answered ping).
#[derive(Default)]
pub struct Liveness {
    heard_ms: dashmap::DashMap<NodeId, AtomicU64, rustc_hash::FxBuildHasher>,
}

impl Liveness {
    pub fn heard(&self, peer: NodeId) {
        let now = now_ms();
        match self.heard_ms.get(&peer) {
            Some(t) => t.store(now, Ordering::Relaxed),
            None => {
                self.heard_ms.insert(peer, AtomicU64::new(now));
            }
        }
    }

    pub fn heard_within(&self, peer: NodeId, d: Duration) -> bool {
        self.heard_ms.get(&peer).is_some_and(|t| now_ms().saturating_sub(t.load(Ordering::Relaxed)) < d.as_millis() as u64)
    }
}

impl Node {
    /// A follower's answer to its leader's `Quiesce`: goes quiet if it follows `leader` in
    /// `term` with the same last entry, applied.
    pub fn quiesce_follower(&self, leader: NodeId, group: GroupId, term: u64, last_log_index: u64) -> Result<(), String> {
        let r = self.replica(group).ok_or_else(|| format!("no replica of group {group} here"))?;
        let m = r.raft.state();
        let agrees = m.is_follower()
            && m.leader() == Some(leader)
            && m.term() == term
            && m.last_log_index() == Some(last_log_index)
            && m.applied() == Some(last_log_index);
        if !agrees || group == PLACEMENT_GROUP {
            return Err(format!("group {group} here is not caught up with leader {leader} at {term}/{last_log_index}"));
        }
        self.liveness.heard(leader);
        r.go_quiet();
        Ok(())
    }

    /// Whether a pre-vote from `from` should be refused because `r`'s group is quiet (or just
    /// woke) and its leader is alive: `r` leads it (its lease ran out while quiet and is not
    /// renewed until a heartbeat round comes back, so openraft would grant the pre-vote and
    /// then the vote, to a restarted peer that merely has not heard from it; the caller wakes
    /// it instead, and its heartbeats reach that peer), or `r` is a quiet follower of a leader
    /// whose node was heard lately (refused without waking).
    pub fn refuse_pre_vote(&self, r: &Replica, from: NodeId) -> bool {
        if r.raft.is_leader() {
            return r.is_quiet() || r.woke_within(self.election_timeout_min());
        }
        if !r.is_quiet() {
            return false;
        }
        let leader = r.raft.leader();
        leader.is_some_and(|l| l != from && l != self.id() && self.liveness.heard_within(l, self.election_timeout_min()))
    }

    fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(self.config.raft.election_timeout_min_ms)
    }

    /// Every node: quiets idle groups it leads, pings the nodes leading its quiet followers,
    /// and wakes the quiet followers whose leader's node went silent.
    pub async fn quiesce_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let silence = self.election_timeout_min();
        let every = check_every(silence);
        let rest = self.config.raft.rest_timers;
        let window = rest_window(silence).as_millis() as u64;
        let leader_window = Duration::from_millis(self.config.raft.heartbeat_interval_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            let now = now_ms();
            let mut leaders_of_quiet = BTreeSet::new();
            let mut ask: Vec<(Arc<Replica>, u64, u64, Vec<NodeId>)> = Vec::new();
            let replicas: Vec<Arc<Replica>> = self.replicas.iter().map(|r| r.clone()).collect();
            for r in replicas {
                if r.retired.load(Ordering::Relaxed) {
                    continue;
                }
                // Most replicas of a large idle node are quiet, and for those the role is all
                // this loop reads: the full state (with its membership and replication maps) is
                // copied only for the others.
                let role = r.raft.role();
                if let Some(why) = role.failure {
                    // The node lives on, so its peers still hear it and the quiet followers of
                    // a group it led would never elect: a node that cannot run one of its
                    // groups stops (as TiKV's does), and its groups elect elsewhere.
                    metrics::counter!("ringkv_raft_group_failures_total").increment(1);
                    self.fail(format!("group {}: Raft stopped on a storage error: {why}; stopping the node", r.group));
                    return;
                }
                if r.group == PLACEMENT_GROUP {
                    continue;
                }
                let held = *r.elect_held();
                if held && now.saturating_sub(r.quiet.woke_ms.load(Ordering::Acquire)) >= silence.as_millis() as u64 {
                    r.release_elections();
                }
                if let Some((to, since)) = r.raft.pending_transfer() {
                    // A leader handing over proposes nothing and sends no heartbeats until it
                    // is deposed, and openraft sends its request once: it must neither rest
                    // nor go quiet, and its request goes out again (waking the followers, which
                    // elect if the target cannot) until the transfer is over.
                    r.wake();
                    r.stop_resting(true);
                    if since >= silence {
                        tracing::info!(group = r.group, to, "leader transfer not done yet: sending its request again");
                        metrics::counter!("ringkv_raft_leader_transfer_resends_total").increment(1);
                        let r = r.clone();
                        tokio::spawn(async move { r.raft.transfer_leader(to).await });
                    }
                    continue;
                }
                if r.is_quiet() {
                    if role.is_leader {
                        continue;
                    }
                    match role.leader.filter(|_| role.is_follower) {
                        Some(l) if self.liveness.heard_within(l, silence) => {
                            leaders_of_quiet.insert(l);
                        }
                        _ => {
                            tracing::info!(group = r.group, leader = ?role.leader, "waking a quiet follower: its leader's node went silent");
                            metrics::counter!("ringkv_raft_group_liveness_wakes_total").increment(1);
                            r.wake();
                            r.release_elections();
                        }
                    }
                    continue;
                }
                let m = r.raft.state();
                let q = &r.quiet;
                let leader_heard = now.saturating_sub(q.leader_heard_ms.load(Ordering::Relaxed)) < window;
                if rest && m.is_follower() && m.leader().is_some_and(|l| l != self.id()) && leader_heard {
                    r.rest(REST_FOLLOWER);
                } else if rest && m.is_leader() && m.followers_acked_within(self.id(), leader_window) {
                    r.rest(REST_LEADER);
                } else {
                    r.stop_resting(true);
                }
                if now.saturating_sub(q.last_active_ms.load(Ordering::Relaxed)) < QUIESCE_AFTER.as_millis() as u64
                    || q.next_try_ms.load(Ordering::Relaxed) > now
                {
                    continue;
                }
                if let (Some(followers), Some(last)) = (m.ready_to_quiesce(self.id()), m.last_log_index()) {
                    // Not asked again while this ask is out.
                    q.next_try_ms.store(now + 2 * ASK_TIMEOUT.as_millis() as u64, Ordering::Relaxed);
                    ask.push((r.clone(), m.term(), last, followers));
                }
            }
            for l in leaders_of_quiet.into_iter().filter(|l| *l != self.id()) {
                let node = self.clone();
                tokio::spawn(async move { node.ping(l).await });
            }
            // Asked on the side: a follower that does not answer must not hold up this loop,
            // which restarts the election timers of resting followers in time.
            if !ask.is_empty() {
                let node = self.clone();
                tokio::spawn(async move { node.ask_to_quiesce(ask).await });
            }
        }
    }

    async fn ping(&self, peer: NodeId) {
        let Some(addr) = self.peer_addr_of(peer) else { return };
        if let Ok(Ok(PeerReply::Done)) = self.pool.call(peer, &addr, &PeerRequest::Ping, ASK_TIMEOUT, Lane::Control).await {
            self.liveness.heard(peer);
        }
    }

    /// Asks the followers of each group to go quiet, all groups at once; a group goes quiet
    /// when all its followers agreed and it saw no activity meanwhile.
    async fn ask_to_quiesce(&self, groups: Vec<(Arc<Replica>, u64, u64, Vec<NodeId>)>) {
        let addrs: HashMap<NodeId, String> = self.map().nodes.iter().map(|n| (n.id, n.peer_addr.clone())).collect();
        let asks = groups.into_iter().map(|(r, term, last, followers)| {
            let addrs = &addrs;
            async move {
                let activity = r.quiet.activity.load(Ordering::SeqCst);
                let req = PeerRequest::Quiesce { group: r.group, term, last_log_index: last };
                let answers = join_all(followers.iter().map(|f| {
                    let req = &req;
                    async move {
                        let Some(addr) = addrs.get(f) else { return false };
                        matches!(self.pool.call(*f, addr, req, ASK_TIMEOUT, Lane::Control).await, Ok(Ok(PeerReply::Done)))
                    }
                }))
                .await;
                if answers.iter().all(|ok| *ok) && r.quiet.activity.load(Ordering::SeqCst) == activity {
                    r.go_quiet();
                    // Activity that raced with going quiet wakes the group again.
                    if r.quiet.activity.load(Ordering::SeqCst) != activity {
                        r.wake();
                    }
                } else {
                    r.quiet.next_try_ms.store(now_ms() + QUIESCE_AFTER.as_millis() as u64, Ordering::Relaxed);
                }
            }
        });
        join_all(asks).await;
    }
}
