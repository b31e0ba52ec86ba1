//! A node's life on a real host: `ringctl init` creating the cluster from the seed nodes,
//! readiness (`/readyz`), and draining (handing every leadership away before a restart).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_wire::{ClientReply, ClientResponse, NodeId, NodeInfo, NodeState, RequestError};

use crate::raft::{PeerReply, PeerRequest};

use crate::driver::lock;
use crate::node::{Node, Replica};
use crate::peer::Lane;

/// A replica whose log is this many entries short of what its group committed is behind: the
/// node is not ready (a rolling restart must not take the next node down yet).
pub const READY_LAG_ENTRIES: u64 = 64;
/// A node whose heartbeat has not reached the placement leader for this long is not ready.
pub const READY_PLACEMENT_SILENCE: Duration = Duration::from_secs(5);
/// How often a draining node hands away the leaderships it still holds (or won meanwhile).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(500);
/// A drain before stopping gives up when the number of leaderships held has not fallen for
/// this long (every other voter is gone or draining too, as when a whole cluster stops).
pub const DRAIN_STALL: Duration = Duration::from_secs(3);
/// How often a starting node under systemd checks whether it is ready yet.
pub const NOTIFY_INTERVAL: Duration = Duration::from_millis(500);
/// How long `init` waits for each seed node to say who it is.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(5);

/// `what` for up to 8 shards, then how many more.
fn some_shards(shards: &[u64]) -> String {
    let shown: Vec<String> = shards.iter().take(8).map(|s| s.to_string()).collect();
    let more = if shards.len() > 8 { format!(" and {} more", shards.len() - 8) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

impl Node {
    /// Who this node is, as the map lists it.
    pub fn info(&self) -> NodeInfo {
        let c = &self.config;
        NodeInfo {
            incarnation: self.incarnation,
            id: c.id,
            peer_addr: c.advertised_peer_addr().to_string(),
            client_addr: c.advertised_client_addr().to_string(),
            metrics_addr: c.advertised_metrics_addr().to_string(),
            state: self.map().node(c.id).map(|n| n.state).unwrap_or(NodeState::Joining),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts or ends draining. Starting hands leaderships away at once and then every
    /// [`DRAIN_INTERVAL`] (see [`Node::drain_loop`]).
    pub async fn set_draining(&self, on: bool) {
        let was = self.draining.swap(on, Ordering::AcqRel);
        if on != was {
            tracing::info!(on, "drain");
        }
        if on {
            self.hand_off_leaderships().await;
        }
    }

    /// Why this node is not ready to serve; empty when it is: it has the map, its heartbeats
    /// reach the placement leader, it is not draining, and every replica here knows its leader
    /// and holds what its group committed (within [`READY_LAG_ENTRIES`]).
    pub fn not_ready(&self) -> Vec<String> {
        let map = self.map();
        if !map.is_bootstrapped() {
            return vec!["no cluster map yet: the cluster is not initialized (`ringctl init`) or this node has not joined".into()];
        }
        let mut why = Vec::new();
        match map.node(self.id()) {
            None => why.push("not in the cluster map yet (joining)".into()),
            Some(n) if n.state == NodeState::Removed => why.push("removed from the cluster".into()),
            Some(_) => {}
        }
        if self.is_draining() {
            why.push("draining (`ringctl node undrain` or a restart ends it)".into());
        }
        match *lock(&self.driver.placement_contact) {
            None => why.push("has not reached the placement leader yet".into()),
            Some(t) if t.elapsed() > READY_PLACEMENT_SILENCE => {
                why.push(format!("has not reached the placement leader for {:.1} s", t.elapsed().as_secs_f64()))
            }
            Some(_) => {}
        }
        let (mut leaderless, mut behind) = (Vec::new(), Vec::new());
        for r in self.replicas.iter().filter(|r| !r.retired.load(Ordering::Acquire)) {
            let m = r.raft.state();
            if m.leader().is_none() {
                leaderless.push(r.group);
            } else if m.entries_behind() > READY_LAG_ENTRIES {
                behind.push(r.group);
            }
        }
        leaderless.sort_unstable();
        behind.sort_unstable();
        if !leaderless.is_empty() {
            why.push(format!("{} replicas know no leader (shards {})", leaderless.len(), some_shards(&leaderless)));
        }
        if !behind.is_empty() {
            why.push(format!(
                "{} replicas are over {READY_LAG_ENTRIES} entries behind their group (shards {})",
                behind.len(),
                some_shards(&behind)
            ));
        }
        why
    }

    /// Replicas this node leads (the placement group's too).
    fn led(&self) -> Vec<Arc<Replica>> {
        self.replicas.iter().filter(|r| r.raft.is_leader()).map(|r| r.clone()).collect()
    }

    /// Asks each group led here to hand leadership to its other voter with the most log (an
    /// up node first). Returns how many groups this node led when it asked.
    pub async fn hand_off_leaderships(&self) -> usize {
        let led = self.led();
        let map = self.map();
        for r in &led {
            let m = r.raft.state();
            let up = |n: NodeId| map.node(n).is_some_and(|i| i.state == NodeState::Up);
            let others = m.voters().into_iter().filter(|n| *n != self.id());
            let Some(to) = others.max_by_key(|n| (up(*n), m.replicated_to(*n), std::cmp::Reverse(*n))) else { continue };
            if let Err(e) = r.active().transfer_leader(to).await {
                tracing::debug!("drain: shard {} to node {to}: {e}", r.group);
            }
        }
        led.len()
    }

    /// While draining, hands away every leadership this node still holds or wins meanwhile.
    pub async fn drain_loop(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(DRAIN_INTERVAL) => {}
            }
            if self.is_draining() {
                self.hand_off_leaderships().await;
            }
        }
    }

    /// Drains before stopping: until this node leads nothing, for at most `timeout`, and not
    /// past [`DRAIN_STALL`] without progress. Returns how many leaderships it still holds.
    pub async fn drain_before_stop(&self, timeout: Duration) -> usize {
        if !self.map().is_bootstrapped() || timeout.is_zero() {
            return 0;
        }
        self.draining.store(true, Ordering::Release);
        let started = Instant::now();
        let (mut fewest, mut since) = (usize::MAX, Instant::now());
        loop {
            let held = self.hand_off_leaderships().await;
            if held == 0 {
                tracing::info!("drained in {:?}", started.elapsed());
                return 0;
            }
            if held < fewest {
                (fewest, since) = (held, Instant::now());
            }
            if started.elapsed() >= timeout || since.elapsed() >= DRAIN_STALL {
                tracing::warn!("stopping with {held} leaderships still held after draining for {:?}", started.elapsed());
                return held;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Tells systemd (`Type=notify`, `NOTIFY_SOCKET`) the node is started: once it is ready,
    /// or at once when it has no cluster yet (it waits for `ringctl init` or a join then). Until
    /// then the unit's status line says why it is not ready. Does nothing without systemd.
    pub async fn notify_service_manager(self: Arc<Self>) {
        use sd_notify::NotifyState;
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let mut stop = self.shutdown.subscribe();
        loop {
            let why = self.not_ready();
            let fresh = !self.map().is_bootstrapped();
            if why.is_empty() || fresh {
                let status = if fresh { "serving; no cluster yet: waiting for `ringctl init` or a join" } else { "ready" };
                if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
                    tracing::warn!("cannot tell systemd the node is ready: {e}");
                }
                return;
            }
            let _ = sd_notify::notify(false, &[NotifyState::Status(&format!("not ready: {}", why.join("; ")))]);
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(NOTIFY_INTERVAL) => {}
            }
        }
    }

    /// `ringctl init`: creates the cluster from this node and its seeds (all must answer), or
    /// answers that a cluster of this shape already exists.
    pub async fn init(self: &Arc<Self>, shards: u64, replication: usize) -> ClientResponse {
        if let Some(r) = self.existing_cluster(shards, replication) {
            return r;
        }
        let mut nodes = vec![self.info()];
        for seed in self.config.seeds.iter().filter(|s| s.as_str() != self.config.advertised_peer_addr()) {
            match self.pool.call(0, seed, &PeerRequest::Identify, SEED_TIMEOUT, Lane::Data).await {
                Ok(Ok(PeerReply::Identity(info))) => {
                    if !nodes.iter().any(|n| n.id == info.id) {
                        nodes.push(info);
                    }
                }
                Ok(Ok(other)) => return Err(RequestError::Internal(format!("seed {seed} answered {other:?}"))),
                Ok(Err(e)) => return Err(RequestError::Unavailable(format!("seed {seed}: {e}"))),
                Err(e) => return Err(RequestError::Unavailable(format!("seed {seed} did not answer: {e}"))),
            }
        }
        if nodes.len() < replication {
            return Err(RequestError::NotPermitted(format!(
                "{} node(s) known ({}), too few for {replication} replicas: start every initial node with \
                 --seeds listing the initial nodes' peer addresses",
                nodes.len(),
                nodes.iter().map(|n| n.id.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        nodes.sort_by_key(|n| n.id);
        let first = nodes[0].clone();
        let req = PeerRequest::Bootstrap { nodes, shards, replication };
        let answer = if first.id == self.id() {
            bootstrap_here(self, req).await
        } else {
            match self.pool.call(first.id, &first.peer_addr, &req, crate::bootstrap::BOOTSTRAP_TIMEOUT, Lane::Data).await {
                Ok(r) => r,
                Err(e) => {
                    return Err(RequestError::Unavailable(format!("node {} (the first placement member) did not answer: {e}", first.id)))
                }
            }
        };
        match answer? {
            PeerReply::Admin(r) => r,
            other => Err(RequestError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The answer to `init` on a node that already has a cluster: done if its shape is the one
    /// asked for, refused otherwise. `None` on a node that has none.
    fn existing_cluster(&self, shards: u64, replication: usize) -> Option<ClientResponse> {
        let map = self.map();
        if !map.is_bootstrapped() {
            return None;
        }
        let have = (map.shards.len() as u64, ringkv_placement::replication(&map));
        Some(if have == (shards, replication) {
            Ok(ClientReply::Initialized { cluster_id: map.cluster_id.clone(), already: true })
        } else {
            Err(RequestError::NotPermitted(format!(
                "cluster {} already exists with {} shards and replication {}, not {shards} and {replication}",
                map.cluster_id, have.0, have.1
            )))
        })
    }
}

/// Serializes `init`s arriving at once at the first placement member.
static INIT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Handles `PeerRequest::Bootstrap` (from `init` on any seed node) on the first placement
/// member; answers `PeerReply::Admin` with the `init` answer.
pub async fn bootstrap_here(node: &Arc<Node>, req: PeerRequest) -> Result<PeerReply, RequestError> {
    let PeerRequest::Bootstrap { nodes, shards, replication } = req else {
        return Err(RequestError::Malformed("not a bootstrap request".into()));
    };
    let _one_at_a_time = INIT_LOCK.lock().await;
    if let Some(r) = node.existing_cluster(shards, replication) {
        return Ok(PeerReply::Admin(r));
    }
    crate::bootstrap::bootstrap(node, nodes, shards, replication).await?;
    let cluster_id = node.map().cluster_id.clone();
    Ok(PeerReply::Admin(Ok(ClientReply::Initialized { cluster_id, already: false })))
}
