//! The planner: a pure, deterministic function from what the placement leader knows (the map,
//! what nodes last reported, the moves already running, the time) to the next operators.
//!
//! Priorities, highest first: repair shards with a replica on a node down for longer than
//! `down_after_ms`; drain decommissioning nodes; balance replicas (every up node within ±1 of the
//! mean); balance leaders (within ±1 of the mean). Rules that hold for every plan:
//! - never two replicas of a shard on one node (counting moves in flight);
//! - at most one move per shard at a time, and a move adds before it removes (learner, caught
//!   up, promoted through joint consensus, then the old replica removed), so a shard never drops
//!   below its quorum;
//! - at most `max_moves_per_node` moves touch a node at once (as source or target);
//! - ties are broken by node id, then shard id; the same input always gives the same plan.
//!
//! **Architecture invariant:** no I/O and no clock reads here; `now_ms` is an input.

use std::collections::{BTreeMap, BTreeSet};

use ringkv_wire::{ClusterMap, GroupId, NodeId, NodeState};
use serde::{Deserialize, Serialize};

/// Tunables of the planner (run-time configurable through the placement group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// A node silent this long has its replicas repaired elsewhere.
    pub down_after_ms: u64,
    /// Moves touching one node at once.
    pub max_moves_per_node: usize,
    /// Leader transfers planned per round.
    pub max_leader_transfers: usize,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig { down_after_ms: 30_000, max_moves_per_node: 4, max_leader_transfers: 64 }
    }
}

impl PlannerConfig {
    /// The planner's view of the settings operators change at run time.
    pub fn from_settings(s: &ringkv_wire::PlacementSettings) -> Self {
        PlannerConfig { down_after_ms: s.down_after_ms, max_moves_per_node: s.max_moves_per_node as usize, ..Default::default() }
    }
}

/// The moves the map records as running.
pub fn in_flight(map: &ClusterMap) -> Vec<InFlight> {
    map.moves.iter().map(|m| InFlight { shard: m.shard, from: m.from, to: m.to }).collect()
}

/// Why a move was planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    /// The source node is down.
    Repair,
    /// The source node is being decommissioned.
    Drain,
    /// The source node holds more replicas than the mean + 1 allows (or the target fewer).
    Balance,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Repair => "repair",
            Reason::Drain => "drain",
            Reason::Balance => "balance",
        }
    }
}

/// One step the executor carries out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// Replace `from`'s replica of `shard` by a new one on `to`: add `to` as a learner, wait until
    /// it caught up, promote it and demote `from` in one joint-consensus change, remove `from`.
    MoveReplica { shard: GroupId, from: NodeId, to: NodeId, reason: Reason },
    /// Make `to` (already a voter of `shard`) its leader.
    TransferLeader { shard: GroupId, from: NodeId, to: NodeId },
}

/// A move the executor is running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub shard: GroupId,
    pub from: NodeId,
    pub to: NodeId,
}

/// What the planner knows besides the map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// When each node last heartbeated (ms, on the placement leader's clock).
    pub last_heartbeat_ms: BTreeMap<NodeId, u64>,
    /// The leader each shard last reported.
    pub leaders: BTreeMap<GroupId, NodeId>,
    /// When this placement leader took over: a node it has not heard from yet gets the grace
    /// period from then, not from the epoch of the clock.
    pub leader_since_ms: u64,
    /// Replicas `(shard, node)` their node reports it could not start: rebuilt elsewhere.
    pub quarantined: BTreeSet<(GroupId, NodeId)>,
    /// Nodes draining: they hand their leaderships away and are given none.
    #[serde(default)]
    pub draining: BTreeSet<NodeId>,
}

/// Whether node `id` counts as down at `now_ms`: marked down, or silent for `down_after_ms`.
pub fn is_down(map: &ClusterMap, obs: &Observed, cfg: &PlannerConfig, id: NodeId, now_ms: u64) -> bool {
    match map.node(id).map(|n| n.state) {
        Some(NodeState::Down) | Some(NodeState::Removed) | None => true,
        Some(NodeState::Joining) => false,
        Some(_) => match obs.last_heartbeat_ms.get(&id) {
            Some(t) => now_ms.saturating_sub(*t) >= cfg.down_after_ms,
            // Not heard from since this leader took over: the grace period runs from then.
            None => now_ms.saturating_sub(obs.leader_since_ms) >= cfg.down_after_ms,
        },
    }
}

/// The working state of one planning round: replica sets with the moves in flight applied, and
/// load counts kept sorted so the most and least loaded nodes are found quickly.
struct State {
    /// Shard -> voters after every in-flight move completes.
    replicas: BTreeMap<GroupId, BTreeSet<NodeId>>,
    /// Node -> shards it holds (or will hold).
    held: BTreeMap<NodeId, BTreeSet<GroupId>>,
    /// Shards with a move in flight or planned this round.
    busy: BTreeSet<GroupId>,
    /// Moves touching each node (in flight + planned).
    moving: BTreeMap<NodeId, usize>,
    /// Up nodes that may take replicas.
    targets: BTreeSet<NodeId>,
    /// (replica count, node) of the targets.
    by_load: BTreeSet<(usize, NodeId)>,
}

impl State {
    fn new(map: &ClusterMap, in_flight: &[InFlight], targets: BTreeSet<NodeId>) -> State {
        let mut replicas: BTreeMap<GroupId, BTreeSet<NodeId>> =
            map.shards.iter().map(|s| (s.id, s.replicas.iter().copied().collect())).collect();
        let mut busy = BTreeSet::new();
        let mut moving: BTreeMap<NodeId, usize> = BTreeMap::new();
        for m in in_flight {
            if let Some(r) = replicas.get_mut(&m.shard) {
                r.remove(&m.from);
                r.insert(m.to);
            }
            busy.insert(m.shard);
            *moving.entry(m.from).or_default() += 1;
            *moving.entry(m.to).or_default() += 1;
        }
        let mut held: BTreeMap<NodeId, BTreeSet<GroupId>> = map.nodes.iter().map(|n| (n.id, BTreeSet::new())).collect();
        for (shard, r) in &replicas {
            for n in r {
                held.entry(*n).or_default().insert(*shard);
            }
        }
        let by_load = targets.iter().map(|n| (held.get(n).map_or(0, |h| h.len()), *n)).collect();
        State { replicas, held, busy, moving, targets, by_load }
    }

    fn load(&self, n: NodeId) -> usize {
        self.held.get(&n).map_or(0, |h| h.len())
    }

    fn can_move(&self, n: NodeId, max: usize) -> bool {
        self.moving.get(&n).copied().unwrap_or(0) < max
    }

    fn apply(&mut self, shard: GroupId, from: NodeId, to: NodeId) {
        for (n, delta) in [(from, false), (to, true)] {
            let before = self.load(n);
            let set = self.held.entry(n).or_default();
            if delta {
                set.insert(shard);
            } else {
                set.remove(&shard);
            }
            let after = set.len();
            if self.targets.contains(&n) {
                self.by_load.remove(&(before, n));
                self.by_load.insert((after, n));
            }
            *self.moving.entry(n).or_default() += 1;
        }
        if let Some(r) = self.replicas.get_mut(&shard) {
            r.remove(&from);
            r.insert(to);
        }
        self.busy.insert(shard);
    }

    /// The most loaded target that can give a replica to the least loaded one, if they differ
    /// by 2 or more and both may move now: `(from, to)`.
    fn unbalanced_pair(&self, max: usize) -> Option<(NodeId, NodeId)> {
        let &(lo, to) = self.by_load.iter().find(|(_, id)| self.can_move(*id, max))?;
        let &(_, from) = self.by_load.iter().rev().find(|(l, id)| *l >= lo + 2 && self.can_move(*id, max))?;
        Some((from, to))
    }

    /// The least loaded target that may take a replica of `shard` now.
    fn best_target(&self, shard: GroupId, max: usize) -> Option<NodeId> {
        let r = self.replicas.get(&shard)?;
        self.by_load.iter().map(|(_, n)| *n).find(|n| !r.contains(n) && self.can_move(*n, max))
    }
}

/// The next operators. Moves come first by priority; leader transfers only once no replica
/// move is needed (a transfer toward a replica about to move would be wasted).
pub fn plan(map: &ClusterMap, obs: &Observed, in_flight: &[InFlight], cfg: &PlannerConfig, now_ms: u64) -> Vec<Operator> {
    let down: BTreeSet<NodeId> = map.nodes.iter().map(|n| n.id).filter(|id| is_down(map, obs, cfg, *id, now_ms)).collect();
    let draining: BTreeSet<NodeId> =
        map.nodes.iter().filter(|n| n.state == NodeState::Decommissioning && !down.contains(&n.id)).map(|n| n.id).collect();
    let targets: BTreeSet<NodeId> = map.nodes.iter().filter(|n| n.state == NodeState::Up && !down.contains(&n.id)).map(|n| n.id).collect();
    let mut st = State::new(map, in_flight, targets);
    let max = cfg.max_moves_per_node.max(1);
    let mut ops = Vec::new();

    // 1. Repair, then 2. drain: every replica on such a node moves to the least loaded target.
    // A source that is down is not asked to do anything, so it does not count against the limit.
    for (sources, reason) in [(&down, Reason::Repair), (&draining, Reason::Drain)] {
        for &src in sources.iter() {
            let shards: Vec<GroupId> = st.held.get(&src).map(|h| h.iter().copied().collect()).unwrap_or_default();
            for shard in shards {
                if st.busy.contains(&shard) || (reason == Reason::Drain && !st.can_move(src, max)) {
                    continue;
                }
                if let Some(to) = st.best_target(shard, max) {
                    st.apply(shard, src, to);
                    ops.push(Operator::MoveReplica { shard, from: src, to, reason });
                }
            }
        }
    }

    // A replica its node could not start is repaired like one on a down node; its node is up
    // but not asked to do anything for it.
    for &(shard, src) in &obs.quarantined {
        let held = st.replicas.get(&shard).is_some_and(|r| r.contains(&src));
        if !held || st.busy.contains(&shard) || down.contains(&src) {
            continue;
        }
        if let Some(to) = st.best_target(shard, max) {
            st.apply(shard, src, to);
            ops.push(Operator::MoveReplica { shard, from: src, to, reason: Reason::Repair });
        }
    }

    // 3. Balance replicas across up nodes: from the most loaded to the least loaded, until no
    // two nodes differ by more than one (then every node is within ±1 of the mean).
    if !repair_or_drain_pending(&down, &draining, &st) {
        while let Some((from, to)) = st.unbalanced_pair(max) {
            let shard = st
                .held
                .get(&from)
                .and_then(|h| h.iter().copied().find(|s| !st.busy.contains(s) && st.replicas.get(s).is_some_and(|r| !r.contains(&to))));
            // None: everything `from` holds is busy or already on `to`; nothing more this round.
            let Some(shard) = shard else { break };
            st.apply(shard, from, to);
            ops.push(Operator::MoveReplica { shard, from, to, reason: Reason::Balance });
        }
    }
    if !ops.is_empty() || !in_flight.is_empty() {
        return ops;
    }

    // 4. Balance leaders among up nodes, by transfers to another voter of the shard.
    // A draining node gives its leaderships away itself and takes none.
    let mut leaders: BTreeMap<NodeId, BTreeSet<GroupId>> =
        st.targets.iter().filter(|n| !obs.draining.contains(n)).map(|n| (*n, BTreeSet::new())).collect();
    for (shard, leader) in &obs.leaders {
        if let Some(set) = leaders.get_mut(leader) {
            set.insert(*shard);
        }
    }
    let mut transfers = 0;
    let mut transferred = BTreeSet::new();
    while transfers < cfg.max_leader_transfers {
        let lo = leaders.values().map(BTreeSet::len).min().unwrap_or(0);
        // Every node with at least 2 more leaders than the least loaded one is a source: the
        // busiest first. From each, the nearest node with at least 2 fewer leaders than it,
        // reached by a chain of transfers (each from a leader to a voter of the same shard); the
        // chain leaves the middle unchanged. The shortest chain that fits this round's budget
        // wins: the busiest node's own way down may be longer than any round allows.
        // A shard changes leader at most once per round: the executor runs transfers in any order.
        let mut sources: Vec<(usize, NodeId)> = leaders.iter().map(|(n, s)| (s.len(), *n)).filter(|(c, _)| *c >= lo + 2).collect();
        sources.sort_unstable_by(|a, b| b.cmp(a));
        let budget = cfg.max_leader_transfers - transfers;
        let chain = sources
            .iter()
            .filter_map(|&(count, from)| leader_chain(&leaders, &st.replicas, &transferred, from, count))
            .filter(|chain| chain.len() <= budget)
            .min_by_key(Vec::len);
        let Some(chain) = chain else { break };
        for (shard, a, b) in chain {
            transferred.insert(shard);
            if let Some(set) = leaders.get_mut(&a) {
                set.remove(&shard);
            }
            if let Some(set) = leaders.get_mut(&b) {
                set.insert(shard);
            }
            ops.push(Operator::TransferLeader { shard, from: a, to: b });
            transfers += 1;
        }
    }
    ops
}

/// Breadth-first from `from` over "leads a shard that has a voter on": the shortest chain of
/// transfers `(shard, from, to)` to a node with at most `hi - 2` leaders.
fn leader_chain(
    leaders: &BTreeMap<NodeId, BTreeSet<GroupId>>,
    replicas: &BTreeMap<GroupId, BTreeSet<NodeId>>,
    transferred: &BTreeSet<GroupId>,
    from: NodeId,
    hi: usize,
) -> Option<Vec<(GroupId, NodeId, NodeId)>> {
    let mut parent: BTreeMap<NodeId, (GroupId, NodeId)> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    while let Some(a) = queue.pop_front() {
        for shard in leaders.get(&a).into_iter().flatten().filter(|s| !transferred.contains(s)) {
            for &b in replicas.get(shard).into_iter().flatten() {
                if b == from || parent.contains_key(&b) || !leaders.contains_key(&b) {
                    continue;
                }
                parent.insert(b, (*shard, a));
                if leaders[&b].len() + 2 <= hi {
                    let mut chain = Vec::new();
                    let mut at = b;
                    while let Some(&(shard, prev)) = parent.get(&at) {
                        chain.push((shard, prev, at));
                        if prev == from {
                            break;
                        }
                        at = prev;
                    }
                    chain.reverse();
                    return Some(chain);
                }
                queue.push_back(b);
            }
        }
    }
    None
}

/// Whether replicas on down or draining nodes still wait for a move (then balancing waits too:
/// repair and drain take the targets first).
fn repair_or_drain_pending(down: &BTreeSet<NodeId>, draining: &BTreeSet<NodeId>, st: &State) -> bool {
    down.iter().chain(draining.iter()).any(|n| st.held.get(n).is_some_and(|h| h.iter().any(|s| !st.busy.contains(s))))
}

/// Applies finished operators to a map and the observed leaders, as the executor's steps would:
/// for simulations and tests.
pub fn complete(map: &mut ClusterMap, obs: &mut Observed, ops: &[Operator]) {
    for op in ops {
        match op {
            Operator::MoveReplica { shard, from, to, .. } => {
                // Shards are kept in id order.
                let at = map.shards.binary_search_by_key(shard, |s| s.id).ok();
                if let Some(s) = at.and_then(|i| map.shards.get_mut(i)) {
                    if let Some(slot) = s.replicas.iter_mut().find(|r| **r == *from) {
                        *slot = *to;
                    }
                    s.epoch.conf_ver += 1;
                    if obs.leaders.get(shard) == Some(from) {
                        // The old leader handed over before leaving: to the first other voter.
                        if let Some(next) = s.replicas.iter().copied().find(|r| r != from) {
                            obs.leaders.insert(*shard, next);
                        }
                    }
                }
            }
            Operator::TransferLeader { shard, to, .. } => {
                obs.leaders.insert(*shard, *to);
            }
        }
    }
    map.version += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings operators change reach the planner.
    #[test]
    fn the_planner_follows_the_settings() {
        let s = ringkv_wire::PlacementSettings { down_after_ms: 1234, max_moves_per_node: 7, ..Default::default() };
        let c = PlannerConfig::from_settings(&s);
        assert_eq!((c.down_after_ms, c.max_moves_per_node), (1234, 7));
    }

    /// Leader balance through a node at its limit: node 1 leads too many, its shards' other
    /// voters are on node 2, which leads as many; node 2's shard reaches node 3, which leads
    /// none. The chain is both hops, from node 1 to node 3, in order.
    #[test]
    fn a_leader_chain_goes_through_a_busy_node_to_an_idle_one() {
        let leaders: BTreeMap<NodeId, BTreeSet<GroupId>> =
            BTreeMap::from([(1, BTreeSet::from([10, 11, 12])), (2, BTreeSet::from([20, 21, 22])), (3, BTreeSet::new())]);
        let mut replicas: BTreeMap<GroupId, BTreeSet<NodeId>> = BTreeMap::new();
        for s in [10, 11, 12, 21, 22] {
            replicas.insert(s, BTreeSet::from([1, 2]));
        }
        replicas.insert(20, BTreeSet::from([2, 3]));
        let chain = leader_chain(&leaders, &replicas, &BTreeSet::new(), 1, 3);
        assert_eq!(chain, Some(vec![(10, 1, 2), (20, 2, 3)]));
        // With shard 20 already moved this round, there is no way through.
        assert_eq!(leader_chain(&leaders, &replicas, &BTreeSet::from([20]), 1, 3), None);
    }
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use ringkv_wire::{Epoch, NodeInfo, ShardDesc};

    fn node(id: NodeId, state: NodeState) -> NodeInfo {
        NodeInfo { id, peer_addr: String::new(), client_addr: String::new(), metrics_addr: String::new(), state, incarnation: 0 }
    }

    /// A cluster of `nodes` up nodes with `shards` shards placed at random (3 distinct replicas
    /// each), leaders at random among the replicas, every node heard from at `now`.
    fn random_cluster(rng: &mut StdRng, nodes: u64, shards: u64, now: u64) -> (ClusterMap, Observed) {
        let ids: Vec<NodeId> = (1..=nodes).collect();
        let mut map = ClusterMap { cluster_id: "c".into(), version: 1, ..Default::default() };
        map.nodes = ids.iter().map(|id| node(*id, NodeState::Up)).collect();
        let mut obs = Observed::default();
        for id in 1..=shards {
            let replicas: Vec<NodeId> = ids.choose_multiple(rng, 3).copied().collect();
            obs.leaders.insert(id, replicas[rng.gen_range(0..3)]);
            map.shards.push(ShardDesc { id, start: 0, end: 0, replicas, epoch: Epoch { conf_ver: 1, version: 1 } });
        }
        for id in &ids {
            obs.last_heartbeat_ms.insert(*id, now);
        }
        (map, obs)
    }

    /// Checks one plan against the rules every plan must keep.
    fn check_plan(map: &ClusterMap, obs: &Observed, cfg: &PlannerConfig, now: u64, ops: &[Operator]) -> Result<(), String> {
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut shards_moved = BTreeSet::new();
        for op in ops {
            match op {
                Operator::MoveReplica { shard, from, to, .. } => {
                    let s = map.shard(*shard).ok_or("move of an unknown shard")?;
                    if !s.replicas.contains(from) {
                        return Err(format!("shard {shard}: moves a replica from {from}, which holds none"));
                    }
                    if s.replicas.contains(to) {
                        return Err(format!("shard {shard}: would put two replicas on node {to}"));
                    }
                    if !shards_moved.insert(*shard) {
                        return Err(format!("shard {shard}: two moves at once"));
                    }
                    let target = map.node(*to).ok_or("unknown target")?;
                    if target.state != NodeState::Up || is_down(map, obs, cfg, *to, now) {
                        return Err(format!("shard {shard}: target {to} is not an up node"));
                    }
                    *per_node.entry(*to).or_default() += 1;
                    if !is_down(map, obs, cfg, *from, now) {
                        *per_node.entry(*from).or_default() += 1;
                    }
                }
                Operator::TransferLeader { shard, from, to } => {
                    let s = map.shard(*shard).ok_or("transfer of an unknown shard")?;
                    if !s.replicas.contains(to) || obs.leaders.get(shard) != Some(from) {
                        return Err(format!("shard {shard}: transfer {from} -> {to} is not between its leader and a voter"));
                    }
                }
            }
        }
        if let Some((n, c)) = per_node.iter().find(|(_, c)| **c > cfg.max_moves_per_node) {
            return Err(format!("{c} moves touch node {n} at once (max {})", cfg.max_moves_per_node));
        }
        let transfers = ops.iter().filter(|o| matches!(o, Operator::TransferLeader { .. })).count();
        if transfers > cfg.max_leader_transfers {
            return Err(format!("{transfers} leader transfers in one round (max {})", cfg.max_leader_transfers));
        }
        Ok(())
    }

    /// Plans and completes rounds until nothing is left to do; returns the rounds and moves.
    fn converge(map: &mut ClusterMap, obs: &mut Observed, cfg: &PlannerConfig, now: u64) -> Result<(usize, usize), String> {
        let mut moves = 0;
        for round in 0..10_000 {
            let ops = plan(map, obs, &[], cfg, now);
            check_plan(map, obs, cfg, now, &ops)?;
            if ops != plan(map, obs, &[], cfg, now) {
                return Err("the same input gave two plans".into());
            }
            if ops.is_empty() {
                return Ok((round, moves));
            }
            moves += ops.iter().filter(|o| matches!(o, Operator::MoveReplica { .. })).count();
            complete(map, obs, &ops);
        }
        Err("no convergence in 10,000 rounds".into())
    }

    fn spread(counts: &[usize]) -> usize {
        counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
    }

    /// Balanced: no replica on a down or draining node, every shard on 3 distinct nodes, and
    /// replicas and leaders per up node within ±1 of the mean.
    fn check_balanced(map: &ClusterMap, obs: &Observed, cfg: &PlannerConfig, now: u64) -> Result<(), String> {
        let up: Vec<NodeId> =
            map.nodes.iter().filter(|n| n.state == NodeState::Up && !is_down(map, obs, cfg, n.id, now)).map(|n| n.id).collect();
        for s in &map.shards {
            let distinct: BTreeSet<_> = s.replicas.iter().collect();
            if distinct.len() != 3 {
                return Err(format!("shard {} has replicas {:?}", s.id, s.replicas));
            }
            if let Some(r) = s.replicas.iter().find(|r| !up.contains(r)) {
                return Err(format!("shard {} still has a replica on node {r}, which is not up", s.id));
            }
        }
        let replicas: Vec<usize> = up.iter().map(|n| map.shards.iter().filter(|s| s.replicas.contains(n)).count()).collect();
        if spread(&replicas) > 1 {
            return Err(format!("replicas per up node {replicas:?} differ by more than 1"));
        }
        let leaders: Vec<usize> = up.iter().map(|n| obs.leaders.values().filter(|l| *l == n).count()).collect();
        if spread(&leaders) > 1 {
            return Err(format!("leaders per up node {leaders:?} differ by more than 1"));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// From any placement, after nodes join, die and are decommissioned, the planner only
        /// plans moves that keep the rules, and converges to a balanced cluster.
        #[test]
        fn plans_keep_the_rules_and_converge(
            seed: u64,
            nodes in 3u64..10,
            shards in 1u64..120,
            joined in 0u64..4,
            lost in 0u64..3,
            drained in 0u64..2,
            max_moves in 1usize..5,
            max_transfers in 2usize..8,
        ) {
            let s = Scenario { seed, nodes, shards, joined, lost, drained, max_moves, max_transfers };
            s.run().map_err(TestCaseError::fail)?;
        }
    }

    /// One cluster history for the planner: `nodes` up nodes holding `shards` shards at random;
    /// then `joined` nodes join, `lost` die and `drained` are decommissioned.
    #[derive(Clone, Copy, Debug)]
    struct Scenario {
        seed: u64,
        nodes: u64,
        shards: u64,
        joined: u64,
        lost: u64,
        drained: u64,
        max_moves: usize,
        max_transfers: usize,
    }

    impl Scenario {
        /// Plans to convergence, checking every plan keeps the rules and the end is balanced.
        fn run(&self) -> Result<(), String> {
            let Scenario { seed, nodes, shards, joined, lost, drained, max_moves, max_transfers } = *self;
            let now = 1_000_000;
            let cfg = PlannerConfig { max_moves_per_node: max_moves, max_leader_transfers: max_transfers, ..PlannerConfig::default() };
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut map, mut obs) = random_cluster(&mut rng, nodes, shards, now);
            for id in nodes + 1..=nodes + joined {
                map.nodes.push(node(id, NodeState::Up));
                obs.last_heartbeat_ms.insert(id, now);
            }
            // Lose and drain nodes while keeping at least 3 up nodes to hold the replicas.
            let total = nodes + joined;
            let lost = lost.min(total.saturating_sub(3));
            let drained = drained.min(total - lost - 3);
            let mut ids: Vec<NodeId> = (1..=total).collect();
            ids.shuffle(&mut rng);
            for id in &ids[..lost as usize] {
                obs.last_heartbeat_ms.insert(*id, now - cfg.down_after_ms);
            }
            for id in &ids[lost as usize..(lost + drained) as usize] {
                if let Some(n) = map.nodes.iter_mut().find(|n| n.id == *id) {
                    n.state = NodeState::Decommissioning;
                }
            }
            converge(&mut map, &mut obs, &cfg, now)?;
            check_balanced(&map, &obs, &cfg, now)
        }
    }

    /// Found by the property above (CI, session 14): leaders [16, 18, 18, 18, 17, 17] were left
    /// unbalanced when the only way down from the busiest node was longer than one round's budget.
    #[test]
    fn leaders_balance_when_the_only_chain_is_longer_than_a_round_allows() {
        let s =
            Scenario { seed: 6517731860275348601, nodes: 3, shards: 104, joined: 3, lost: 0, drained: 0, max_moves: 1, max_transfers: 2 };
        s.run().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }

    #[test]
    fn a_node_is_repaired_only_after_the_down_time() {
        let mut rng = StdRng::seed_from_u64(5);
        let cfg = PlannerConfig::default();
        let (map, mut obs) = random_cluster(&mut rng, 5, 20, 100_000);
        obs.last_heartbeat_ms.insert(3, 100_000 - cfg.down_after_ms + 1);
        assert!(plan(&map, &obs, &[], &cfg, 100_000).iter().all(|o| !matches!(o, Operator::MoveReplica { from: 3, .. })));
        let later = 100_001;
        let ops = plan(&map, &obs, &[], &cfg, later);
        let held = map.shards.iter().filter(|s| s.replicas.contains(&3)).count();
        let repairs = ops.iter().filter(|o| matches!(o, Operator::MoveReplica { from: 3, reason: Reason::Repair, .. })).count();
        assert_eq!(repairs, held, "every replica of the silent node is repaired at once: {ops:?}");
    }

    #[test]
    fn a_quarantined_replica_is_repaired_on_another_node() {
        let mut rng = StdRng::seed_from_u64(11);
        let cfg = PlannerConfig::default();
        let (map, mut obs) = random_cluster(&mut rng, 5, 20, 100_000);
        let shard = map.shards.iter().find(|s| s.replicas.contains(&2)).expect("a shard on node 2");
        obs.quarantined.insert((shard.id, 2));
        let ops = plan(&map, &obs, &[], &cfg, 100_000);
        let repair = ops.iter().find_map(|o| match o {
            Operator::MoveReplica { shard: s, from: 2, to, reason: Reason::Repair } if *s == shard.id => Some(*to),
            _ => None,
        });
        let to = repair.unwrap_or_else(|| panic!("no repair of the quarantined replica: {ops:?}"));
        assert!(!shard.replicas.contains(&to), "to a node without a replica of the shard");
        // Node 2 is up: its other replicas are not repaired away (balance may still move some).
        let others = |o: &Operator| matches!(o, Operator::MoveReplica { from: 2, shard: s, reason: Reason::Repair, .. } if *s != shard.id);
        assert!(!ops.iter().any(others), "{ops:?}");
    }

    /// Leader balance leaves a draining node out: no transfer goes to it, even when it leads
    /// nothing and the others lead many; without the drain it would be given leaderships.
    #[test]
    fn a_draining_node_is_given_no_leaderships() {
        // Three nodes, every shard on all three (replicas balanced); nodes 1 and 2 lead all.
        let mut map = ClusterMap { cluster_id: "c".into(), version: 1, ..Default::default() };
        map.nodes = (1..=3).map(|id| node(id, NodeState::Up)).collect();
        let mut obs = Observed::default();
        for id in 1..=24 {
            map.shards.push(ShardDesc { id, start: 0, end: 0, replicas: vec![1, 2, 3], epoch: Epoch { conf_ver: 1, version: 1 } });
            obs.leaders.insert(id, 1 + id % 2);
        }
        for id in 1..=3 {
            obs.last_heartbeat_ms.insert(id, 1_000);
        }
        let cfg = PlannerConfig::default();
        let to_3 = |ops: &[Operator]| ops.iter().filter(|op| matches!(op, Operator::TransferLeader { to: 3, .. })).count();
        assert!(to_3(&plan(&map, &obs, &[], &cfg, 1_000)) > 0, "not draining, node 3 is given leaderships");
        obs.draining.insert(3);
        let ops = plan(&map, &obs, &[], &cfg, 1_000);
        assert_eq!(to_3(&ops), 0, "{ops:?}");
    }

    #[test]
    fn a_new_placement_leader_gives_silent_nodes_the_grace_period_from_its_takeover() {
        let mut rng = StdRng::seed_from_u64(7);
        let cfg = PlannerConfig::default();
        let (map, mut obs) = random_cluster(&mut rng, 4, 8, 0);
        obs.last_heartbeat_ms.clear();
        obs.leader_since_ms = 5_000_000;
        let now = obs.leader_since_ms + cfg.down_after_ms - 1;
        assert!(!is_down(&map, &obs, &cfg, 1, now));
        assert!(plan(&map, &obs, &[], &cfg, now).iter().all(|o| !matches!(o, Operator::MoveReplica { reason: Reason::Repair, .. })));
        assert!(is_down(&map, &obs, &cfg, 1, now + 1));
    }

    #[test]
    fn moves_in_flight_count_against_the_limits_and_block_their_shard() {
        let mut rng = StdRng::seed_from_u64(6);
        let (mut map, obs) = random_cluster(&mut rng, 3, 30, 0);
        map.nodes.push(node(4, NodeState::Up));
        let mut obs = obs;
        obs.last_heartbeat_ms.insert(4, 0);
        let cfg = PlannerConfig { max_moves_per_node: 2, ..PlannerConfig::default() };
        let first = plan(&map, &obs, &[], &cfg, 0);
        assert_eq!(first.len(), 2, "node 4 takes 2 moves at once: {first:?}");
        let in_flight: Vec<InFlight> = first
            .iter()
            .filter_map(|o| match o {
                Operator::MoveReplica { shard, from, to, .. } => Some(InFlight { shard: *shard, from: *from, to: *to }),
                _ => None,
            })
            .collect();
        assert!(plan(&map, &obs, &in_flight, &cfg, 0).is_empty(), "node 4 is at its limit while both run");
        let one = &in_flight[..1];
        let next = plan(&map, &obs, one, &cfg, 0);
        assert_eq!(next.len(), 1);
        assert!(matches!(next[0], Operator::MoveReplica { shard, to: 4, .. } if shard != one[0].shard));
    }
}
