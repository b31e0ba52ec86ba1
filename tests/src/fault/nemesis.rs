//! The nemesis: a seeded schedule of faults against a namespaced cluster. Each round waits a
//! quiet moment, starts one fault (sometimes two of different kinds at once), holds it, and
//! undoes it. Membership changes (a node joins, which moves replicas onto it; a leader
//! transfer) run in the same schedule, so the other faults land while they are in progress.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use ringkv_client::Client;
use ringkv_node::dev::DevCluster;
use ringkv_wire::NodeId;

use super::history::Recorder;
use super::netns::Netns;
use super::proxy::{LinkFaults, Proxy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize)]
#[clap(rename_all = "kebab-case")]
pub enum Fault {
    /// `kill -9` of a node, restarted from its data dir after a while.
    Kill,
    /// SIGSTOP of a node for longer than an election timeout, then SIGCONT.
    Pause,
    /// One node cut off from all others.
    Isolate,
    /// The nodes split in a minority and a majority.
    MajorityMinority,
    /// Some nodes cannot send to the others, which can still send to them.
    OneWay,
    /// Two halves that only a bridge node sees both of.
    Bridge,
    /// Each node sees only its neighbours on a ring (each a different majority).
    Ring,
    /// The placement group's leader cut off from all others.
    IsolatePlacementLeader,
    /// Every node-to-node packet is delayed (and so reordered).
    Delay,
    /// A share of node-to-node packets is lost.
    Loss,
    /// A new node joins; the placement driver moves replicas onto it.
    Join,
    /// A shard's leadership moves to another replica.
    TransferLeader,
    /// The test's clients cannot reach one node (nor hear from it); the nodes still talk.
    IsolateClients,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Process,
    Network,
    Membership,
    /// Between clients and nodes: combines with a node partition.
    Clients,
}

impl Fault {
    pub const ALL: [Fault; 13] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Isolate,
        Fault::MajorityMinority,
        Fault::OneWay,
        Fault::Bridge,
        Fault::Ring,
        Fault::IsolatePlacementLeader,
        Fault::Delay,
        Fault::Loss,
        Fault::Join,
        Fault::TransferLeader,
        Fault::IsolateClients,
    ];

    /// The faults of the network: partitions of every shape, delay and loss, and clients cut
    /// off from a node.
    pub fn network() -> Vec<Fault> {
        Self::ALL.into_iter().filter(|f| matches!(f.kind(), Kind::Network | Kind::Clients)).collect()
    }

    fn kind(self) -> Kind {
        match self {
            Fault::Kill | Fault::Pause => Kind::Process,
            Fault::Join | Fault::TransferLeader => Kind::Membership,
            Fault::IsolateClients => Kind::Clients,
            _ => Kind::Network,
        }
    }
}

/// How to undo a fault.
enum Undo {
    Restart(NodeId),
    Resume(NodeId),
    Heal,
    /// Ends a packet fault; it took effect only if the proxy's count of such packets grew.
    Clear {
        dropped: u64,
        delayed: u64,
    },
    ClientsBack,
    Nothing,
}

pub struct Nemesis<'a> {
    pub cluster: DevCluster,
    ns: &'a Netns,
    proxy: &'a Proxy,
    client: Arc<Client>,
    rec: Arc<Recorder>,
    rng: StdRng,
    faults: Vec<Fault>,
    /// The faults still to draw in this pass: every fault of the run comes once per pass, in a
    /// seeded order, so a short run still meets each of them.
    deck: Vec<Fault>,
    /// Nodes that may still join (the proxy covers ids up to this).
    max_node: NodeId,
    /// Faults that took effect (a kill of a running node, a leader transfer the leader
    /// accepted, a join whose node came up, packets that were really dropped or delayed).
    pub counts: BTreeMap<Fault, u64>,
    /// Faults tried that did not take effect, and why, by fault.
    pub ineffective: BTreeMap<Fault, u64>,
    /// Nodes that exited when no fault asked them to (checked every round).
    pub crashed: Vec<String>,
}

/// How long a joining node may take to be listed as up before the join counts as not happened.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// Links cut by `a` not reaching `b` and `b` not reaching `a` for every pair across the sets.
fn cut(a: &[NodeId], b: &[NodeId], links: &mut BTreeSet<(NodeId, NodeId)>) {
    for x in a {
        for y in b {
            links.insert((*x, *y));
            links.insert((*y, *x));
        }
    }
}

/// The links a partition cuts, as `(from, to)` pairs, and a description. `nodes` is in the
/// (shuffled) order that decides the sides; `target` is the node an isolation cuts off;
/// `senders` how many nodes a one-way partition mutes.
pub fn partition(f: Fault, nodes: &[NodeId], target: NodeId, senders: usize) -> (BTreeSet<(NodeId, NodeId)>, String) {
    let mut links = BTreeSet::new();
    let what = match f {
        Fault::Isolate | Fault::IsolatePlacementLeader => {
            let rest: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != target).collect();
            cut(&[target], &rest, &mut links);
            format!("node {target}")
        }
        Fault::MajorityMinority => {
            let (minority, majority) = nodes.split_at((nodes.len() - 1) / 2);
            cut(minority, majority, &mut links);
            format!("{minority:?} | {majority:?}")
        }
        Fault::OneWay => {
            let (mute, rest) = nodes.split_at(senders.clamp(1, nodes.len() - 1));
            for m in mute {
                for r in rest {
                    links.insert((*m, *r));
                }
            }
            format!("{mute:?} cannot send to {rest:?}")
        }
        Fault::Bridge => {
            let (left, rest) = nodes.split_at((nodes.len() - 1) / 2);
            let (bridge, right) = rest.split_at(1);
            cut(left, right, &mut links);
            format!("{left:?} <-> {bridge:?} <-> {right:?}")
        }
        Fault::Ring => {
            let n = nodes.len();
            // Each node sees the fewest neighbours that make a majority with itself.
            let reach = (n / 2).div_ceil(2);
            for i in 0..n {
                for j in 0..n {
                    let d = (i + n - j) % n;
                    if d.min(n - d) > reach {
                        links.insert((nodes[i], nodes[j]));
                    }
                }
            }
            format!("ring {nodes:?}, each sees {reach} on either side")
        }
        _ => String::new(),
    };
    (links, what)
}

/// The deck of a run's first pass: every fault once, those of `first` before the others (each
/// part in a seeded order), so the faults a short run must show come while it has time for them.
/// The deck is drawn from its end.
fn first_pass(rng: &mut StdRng, faults: &[Fault], first: &[Fault]) -> Vec<Fault> {
    let mut rest: Vec<Fault> = faults.iter().copied().filter(|f| !first.contains(f)).collect();
    let mut early: Vec<Fault> = faults.iter().copied().filter(|f| first.contains(f)).collect();
    rest.shuffle(rng);
    early.shuffle(rng);
    rest.extend(early);
    rest
}

impl<'a> Nemesis<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: DevCluster,
        ns: &'a Netns,
        proxy: &'a Proxy,
        client: Arc<Client>,
        rec: Arc<Recorder>,
        seed: u64,
        faults: Vec<Fault>,
        first: &[Fault],
        max_node: NodeId,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let deck = first_pass(&mut rng, &faults, first);
        Nemesis {
            cluster,
            ns,
            proxy,
            client,
            rec,
            rng,
            faults,
            deck,
            max_node,
            counts: BTreeMap::new(),
            ineffective: BTreeMap::new(),
            crashed: Vec::new(),
        }
    }

    fn nodes(&self) -> Vec<NodeId> {
        self.cluster.file.nodes.iter().map(|n| n.id).collect()
    }

    fn note(&self, phase: &str, f: Fault, detail: String) {
        eprintln!("[{:>6} ms] nemesis {phase} {f:?} {detail}", self.rec.elapsed_ms());
        self.rec.note("nemesis", 0, phase, &format!("{f:?}"), None, detail);
    }

    /// Runs rounds until `until`; every fault is undone when it returns.
    pub async fn run(&mut self, until: Instant) -> anyhow::Result<()> {
        while Instant::now() + Duration::from_secs(2) < until {
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(500..2000))).await;
            // Before any fault touches the nodes: a node that died on its own is a finding, and
            // a later kill and restart must not hide it.
            self.collect_crashes();
            let first = self.draw()?;
            let mut now = vec![first];
            if self.rng.gen_bool(0.3) {
                let others: Vec<Fault> = self.faults.iter().copied().filter(|f| f.kind() != first.kind()).collect();
                if let Some(second) = others.choose(&mut self.rng) {
                    now.push(*second);
                }
            }
            // A join goes first: the new node tries the members in turn, and a kill, pause or
            // isolation of the one it tries started before it would hold the join (and the
            // round) for a connection timeout, leaving a short run fewer rounds for its faults.
            now.sort_by_key(|f| *f != Fault::Join);
            let mut undo = Vec::new();
            for f in now {
                undo.push((f, self.start(f).await?));
            }
            let hold = Duration::from_millis(self.rng.gen_range(1500..5000));
            tokio::time::sleep(hold.min(until.saturating_duration_since(Instant::now()))).await;
            for (f, u) in undo {
                self.stop(f, u).await?;
            }
        }
        Ok(())
    }

    /// The next fault of the current pass (a new seeded pass once all came).
    fn draw(&mut self) -> anyhow::Result<Fault> {
        if self.deck.is_empty() {
            self.deck = self.faults.clone();
            self.deck.shuffle(&mut self.rng);
        }
        self.deck.pop().ok_or_else(|| anyhow::anyhow!("no faults to inject"))
    }

    /// Records a fault that was tried but did not happen.
    fn missed(&mut self, f: Fault, why: String) -> anyhow::Result<Undo> {
        self.note("missed", f, why);
        *self.ineffective.entry(f).or_default() += 1;
        Ok(Undo::Nothing)
    }

    async fn start(&mut self, f: Fault) -> anyhow::Result<Undo> {
        let mut nodes = self.nodes();
        nodes.shuffle(&mut self.rng);
        let victim = nodes[0];
        let mut links = BTreeSet::new();
        let undo = match f {
            Fault::Kill => {
                self.cluster.kill(victim).await?;
                self.note("start", f, format!("node {victim}"));
                Undo::Restart(victim)
            }
            Fault::Pause => {
                let pid = self.cluster.pid(victim).ok_or_else(|| anyhow::anyhow!("node {victim} is not running"))?;
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
                self.note("start", f, format!("node {victim}"));
                Undo::Resume(victim)
            }
            Fault::Isolate | Fault::IsolatePlacementLeader | Fault::MajorityMinority | Fault::OneWay | Fault::Bridge | Fault::Ring => {
                let target = if f == Fault::IsolatePlacementLeader {
                    match self.placement_leader().await {
                        Some(l) => l,
                        None => return self.missed(f, "no node reports leading the placement group".into()),
                    }
                } else {
                    victim
                };
                let senders = self.rng.gen_range(1..=(nodes.len() - 1) / 2);
                let (cut_links, what) = partition(f, &nodes, target, senders);
                links = cut_links;
                self.note("start", f, what);
                Undo::Heal
            }
            Fault::Delay => {
                let max = self.rng.gen_range(20..200);
                self.proxy.set(LinkFaults { delay_ms: (1, max), loss: 0.0 });
                self.note("start", f, format!("1..{max} ms per packet"));
                return Ok(self.packet_fault_started());
            }
            Fault::Loss => {
                let loss = self.rng.gen_range(0.05..0.3);
                self.proxy.set(LinkFaults { delay_ms: (0, 0), loss });
                self.note("start", f, format!("{:.0}% of packets", loss * 100.0));
                return Ok(self.packet_fault_started());
            }
            Fault::Join => {
                if self.nodes().into_iter().max().unwrap_or(0) >= self.max_node {
                    return self.missed(f, "no node id left".into());
                }
                let id = self.cluster.add_node()?;
                self.note("start", f, format!("node {id} joins"));
                // It happened once the placement driver lists the node as up.
                let started = Instant::now();
                loop {
                    let state = self.client.refresh_map().await.ok().and_then(|m| m.node(id).map(|n| n.state));
                    if state == Some(ringkv_wire::NodeState::Up) {
                        break;
                    }
                    if started.elapsed() > JOIN_WAIT {
                        return self.missed(f, format!("node {id} is not up after {JOIN_WAIT:?} (state {state:?})"));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Undo::Nothing
            }
            Fault::IsolateClients => {
                self.ns.cut_clients(&BTreeSet::from([victim]))?;
                self.note("start", f, format!("clients cannot reach node {victim}"));
                Undo::ClientsBack
            }
            Fault::TransferLeader => {
                let map = self.client.refresh_map().await.unwrap_or_else(|_| self.client.map());
                let Some(s) = map.shards.choose(&mut self.rng) else { return self.missed(f, "no shard".into()) };
                let leader = self.client.cached_leader(s.id);
                let to: Vec<NodeId> = s.replicas.iter().copied().filter(|r| Some(*r) != leader).collect();
                let Some(&to) = to.choose(&mut self.rng) else { return self.missed(f, format!("shard {} has no other replica", s.id)) };
                match tokio::time::timeout(Duration::from_secs(5), self.client.transfer_leader(s.id, to)).await {
                    Ok(Ok(())) => self.note("start", f, format!("shard {} to node {to}", s.id)),
                    other => return self.missed(f, format!("shard {} to node {to}: {other:?}", s.id)),
                }
                Undo::Nothing
            }
        };
        if !links.is_empty() {
            self.ns.block(&links)?;
        }
        *self.counts.entry(f).or_default() += 1;
        Ok(undo)
    }

    async fn stop(&mut self, f: Fault, u: Undo) -> anyhow::Result<()> {
        match u {
            Undo::Restart(id) => self.cluster.restart(id)?,
            Undo::Resume(id) => {
                if let Some(pid) = self.cluster.pid(id) {
                    // It may have died meanwhile: the next round's crash check reports that.
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                }
            }
            Undo::Heal => self.ns.block(&BTreeSet::new())?,
            Undo::Clear { dropped, delayed } => {
                self.proxy.set(LinkFaults::default());
                let st = &self.proxy.stats;
                let hit = st.dropped.load(Ordering::Relaxed) - dropped + st.delayed.load(Ordering::Relaxed) - delayed;
                if hit == 0 {
                    return self.missed(f, "no packet was dropped or delayed".into()).map(|_| ());
                }
                *self.counts.entry(f).or_default() += 1;
                self.note("stop", f, format!("{hit} packets hit"));
                return Ok(());
            }
            Undo::ClientsBack => self.ns.cut_clients(&BTreeSet::new())?,
            Undo::Nothing => return Ok(()),
        }
        self.note("stop", f, String::new());
        Ok(())
    }

    /// A delay or loss has begun; it is counted when it ends, if packets were hit.
    fn packet_fault_started(&self) -> Undo {
        let st = &self.proxy.stats;
        Undo::Clear { dropped: st.dropped.load(Ordering::Relaxed), delayed: st.delayed.load(Ordering::Relaxed) }
    }

    fn collect_crashes(&mut self) {
        for (id, st) in self.cluster.exited() {
            let what = format!("node {id} exited on its own ({st}) at {} ms", self.rec.elapsed_ms());
            eprintln!("ANOMALY: {what}");
            self.crashed.push(what);
        }
    }

    /// Undoes everything: resumes paused nodes, restarts stopped ones (after recording those
    /// that exited on their own), heals the network.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.ns.block(&BTreeSet::new())?;
        self.ns.cut_clients(&BTreeSet::new())?;
        self.proxy.set(LinkFaults::default());
        self.collect_crashes();
        for id in self.nodes() {
            match self.cluster.pid(id) {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                }
                None => self.cluster.restart(id)?,
            }
        }
        Ok(())
    }

    async fn placement_leader(&self) -> Option<NodeId> {
        let reports: Vec<_> = self.client.node_reports().await.into_iter().flatten().collect();
        ringkv_client::leaders_of(&reports).get(&ringkv_wire::PLACEMENT_GROUP).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who `n` can send to under `links`.
    fn reach(nodes: &[NodeId], links: &BTreeSet<(NodeId, NodeId)>, n: NodeId) -> BTreeSet<NodeId> {
        nodes.iter().copied().filter(|m| *m != n && !links.contains(&(n, *m))).collect()
    }

    const FIVE: [NodeId; 5] = [3, 1, 5, 2, 4];

    /// Regression: the ring once let every node of five see every other, so it cut nothing.
    #[test]
    fn ring_partition_leaves_each_node_a_different_bare_majority() {
        let (links, _) = partition(Fault::Ring, &FIVE, 0, 1);
        let mut seen = BTreeSet::new();
        for n in FIVE {
            let r = reach(&FIVE, &links, n);
            assert_eq!(r.len(), 2, "node {n} reaches {r:?}: with itself a bare majority of 5");
            assert!(seen.insert(r), "two nodes share a majority");
        }
    }

    #[test]
    fn majority_minority_and_bridge_cut_the_right_links() {
        let (links, _) = partition(Fault::MajorityMinority, &FIVE, 0, 1);
        assert_eq!(reach(&FIVE, &links, 3), BTreeSet::from([1]), "the minority is the first two");
        assert_eq!(reach(&FIVE, &links, 5), BTreeSet::from([2, 4]));
        let (links, _) = partition(Fault::Bridge, &FIVE, 0, 1);
        assert_eq!(reach(&FIVE, &links, 5), BTreeSet::from([3, 1, 2, 4]), "the bridge sees everyone");
        assert_eq!(reach(&FIVE, &links, 3), BTreeSet::from([1, 5]));
    }

    #[test]
    fn the_first_pass_draws_the_named_faults_first_then_every_other_once() {
        let faults = [Fault::Join, Fault::TransferLeader, Fault::Kill, Fault::Pause, Fault::Isolate, Fault::Delay];
        let first = [Fault::TransferLeader, Fault::Join];
        let mut orders = BTreeSet::new();
        for seed in 0..64 {
            let mut deck = first_pass(&mut StdRng::seed_from_u64(seed), &faults, &first);
            let drawn: Vec<Fault> = std::iter::from_fn(|| deck.pop()).collect();
            assert!(drawn[..2].iter().all(|f| first.contains(f)), "seed {seed}: {drawn:?}");
            let mut sorted = drawn.clone();
            sorted.sort();
            let mut all = faults.to_vec();
            all.sort();
            assert_eq!(sorted, all, "seed {seed}: every fault once");
            orders.insert(drawn);
        }
        assert!(orders.len() > 8, "the order is seeded, not fixed: {} orders", orders.len());
    }

    #[test]
    fn one_way_and_isolation() {
        let (links, _) = partition(Fault::OneWay, &FIVE, 0, 2);
        assert!(reach(&FIVE, &links, 3).len() == 1 && reach(&FIVE, &links, 2).len() == 4, "muted nodes only reach each other");
        let (links, _) = partition(Fault::Isolate, &FIVE, 5, 1);
        assert!(reach(&FIVE, &links, 5).is_empty());
        assert_eq!(reach(&FIVE, &links, 1), BTreeSet::from([3, 2, 4]));
    }
}
