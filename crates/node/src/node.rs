//! A running node: its storage, its Raft groups, its endpoints, and the loop that keeps its
//! replicas in line with the cluster map.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use ringkv_storage::{register_replica, Db, LogStore, PeerNode, ReplicaKind, StateMachine};
use ringkv_wire::{ClusterMap, GroupId, NodeId, PLACEMENT_GROUP};

use crate::raft::{PeerReply, PeerRequest};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::peer::{Lane, PeerPool};
use crate::raft::{Group, RaftConfig};

/// How often the map loop looks for a newer cluster map.
pub const MAP_SYNC_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Storage(#[from] ringkv_storage::StorageError),
    #[error(transparent)]
    Tls(#[from] ringkv_transport::TlsError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{0}")]
    Raft(String),
    #[error("data dir {dir} holds data of cluster {stored}, but the cluster map says {given}; refusing to mix them")]
    ForeignDataDir { dir: String, stored: String, given: String },
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("join: {0}")]
    Join(String),
    #[error("certificate: {0}")]
    Certificate(String),
    /// The cluster knows this node id with another data dir (a wiped or replaced disk).
    #[error("{0}")]
    Amnesia(String),
    /// Something made the node stop on its own (see the message).
    #[error("stopped: {0}")]
    Fatal(String),
}

/// One replica hosted here.
pub struct Replica {
    pub group: GroupId,
    pub raft: Group,
    pub sm: StateMachine,
    /// Set once this replica is being removed: its rows are about to be deleted.
    pub retired: std::sync::atomic::AtomicBool,
    /// When this node started it.
    pub started: std::time::Instant,
    /// Whether the group is quiet (see `quiesce`).
    pub quiet: crate::quiesce::Quiet,
    /// The state machine's approximate size and when it was measured.
    size: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Replica {
    pub fn kind(&self) -> ReplicaKind {
        self.sm.kind()
    }

    /// The state machine's approximate size, measured at most once per [`SIZE_REFRESH`].
    pub fn approximate_bytes(&self) -> u64 {
        let mut s = self.size.lock().unwrap_or_else(|p| p.into_inner());
        match *s {
            Some((at, bytes)) if at.elapsed() < SIZE_REFRESH => bytes,
            _ => {
                let bytes = self.sm.approximate_bytes();
                *s = Some((std::time::Instant::now(), bytes));
                bytes
            }
        }
    }
}

/// How often a replica's size (for placement's balancing) is measured again.
pub const SIZE_REFRESH: Duration = Duration::from_secs(30);

/// State shared by every task of a node.
pub struct Node {
    pub config: NodeConfig,
    /// The incarnation of this node's data dir (see `NodeInfo::incarnation`).
    pub incarnation: u64,
    /// Why the node stopped on its own, if it did.
    fatal: std::sync::Mutex<Option<String>>,
    pub db: Arc<Db>,
    /// Looked up by every request and Raft message (a fast hasher: the keys are our own ids).
    pub replicas: DashMap<GroupId, Arc<Replica>, rustc_hash::FxBuildHasher>,
    /// Replicas that could not start, and why: never started again in this run.
    quarantined: DashMap<GroupId, String>,
    pub pool: Arc<PeerPool>,
    map: RwLock<Arc<ClusterMap>>,
    raft_config: RaftConfig,
    /// Serializes replica creation so two tasks never build the same group.
    create_lock: tokio::sync::Mutex<()>,
    /// Serializes map adoption, so a map never replaces a newer one.
    adopt_lock: tokio::sync::Mutex<()>,
    pub shutdown: watch::Sender<bool>,
    pub driver: crate::driver::Driver,
    /// Limits on sending snapshots, from the placement settings.
    pub snapshot_throttle: Arc<crate::snapshot::SnapshotThrottle>,
    /// Snapshots being received in chunks.
    pub reassembly: crate::snapshot::Reassembly,
    /// Free bytes on the data dir's filesystem at the last check (`u64::MAX` before the first).
    pub disk_free: std::sync::atomic::AtomicU64,
    /// When each peer node was last heard from.
    pub liveness: crate::quiesce::Liveness,
    /// Whether the node is draining (see `lifecycle`).
    pub draining: std::sync::atomic::AtomicBool,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn replica(&self, group: GroupId) -> Option<Arc<Replica>> {
        self.replicas.get(&group).map(|r| r.clone())
    }

    pub fn new(config: NodeConfig, db: Arc<Db>, pool: Arc<PeerPool>) -> Result<Arc<Node>, NodeError> {
        let raft_config = RaftConfig::new(&config.raft).map_err(NodeError::Raft)?;
        let map = match db.get_meta(ringkv_storage::keys::META_MAP)? {
            // Never a silent empty map: the node would act as if it belonged to no cluster.
            Some(b) => postcard::from_bytes(&b).map_err(|e| {
                NodeError::Fatal(format!(
                    "the cluster map stored in {} cannot be read ({e}); the data dir was written by an incompatible version of ringkv",
                    config.data_dir.display()
                ))
            })?,
            None => ClusterMap::default(),
        };
        let (shutdown, _) = watch::channel(false);
        let snapshots_in = db.snapshot_dir("in");
        let incarnation = db.incarnation(rand::random)?;
        Ok(Arc::new(Node {
            config,
            incarnation,
            fatal: std::sync::Mutex::new(None),
            db,
            replicas: DashMap::default(),
            quarantined: DashMap::new(),
            pool,
            map: RwLock::new(Arc::new(map)),
            raft_config,
            create_lock: tokio::sync::Mutex::new(()),
            adopt_lock: tokio::sync::Mutex::new(()),
            shutdown,
            driver: Default::default(),
            snapshot_throttle: Default::default(),
            reassembly: crate::snapshot::Reassembly::new(snapshots_in),
            disk_free: std::sync::atomic::AtomicU64::new(u64::MAX),
            liveness: Default::default(),
            draining: Default::default(),
        }))
    }

    /// Starts every replica registered in the data dir.
    /// A replica that cannot start (e.g. an interrupted install whose files are gone) is
    /// quarantined: reported in status and metrics and left on disk, while the node serves the
    /// rest. The placement group's replica is not: without it the node is no placement member.
    pub async fn start_registered(self: &Arc<Self>) -> Result<(), NodeError> {
        for (group, kind) in ringkv_storage::list_replicas(&self.db)? {
            match self.ensure_replica(group, kind).await {
                Ok(_) => {}
                Err(e) if group != PLACEMENT_GROUP => {
                    tracing::error!(group, "replica quarantined: it cannot start: {e}");
                    self.quarantined.insert(group, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        metrics::gauge!("ringkv_replicas_quarantined").set(self.quarantined.len() as f64);
        Ok(())
    }

    /// Replicas that could not start, with the reason.
    pub fn quarantined(&self) -> Vec<(GroupId, String)> {
        let mut q: Vec<(GroupId, String)> = self.quarantined.iter().map(|e| (*e.key(), e.value().clone())).collect();
        q.sort();
        q
    }

    /// Returns the replica of `group`, creating (and registering) it if this node has none.
    pub async fn ensure_replica(self: &Arc<Self>, group: GroupId, kind: ReplicaKind) -> Result<Arc<Replica>, NodeError> {
        if let Some(r) = self.replica(group) {
            return Ok(r);
        }
        let _g = self.create_lock.lock().await;
        if let Some(r) = self.replica(group) {
            return Ok(r);
        }
        register_replica(&self.db, group, kind)?;
        let log = LogStore::new(self.db.clone(), group);
        let sm = StateMachine::new(self.db.clone(), group, kind).with_log_cache(log.cache());
        let raft = Group::start(self.id(), group, &self.raft_config, self.pool.clone(), self.snapshot_throttle.clone(), log, sm.clone())
            .await
            .map_err(|e| NodeError::Raft(format!("group {group}: {e}")))?;
        let r = Arc::new(Replica {
            group,
            raft,
            sm,
            retired: Default::default(),
            started: std::time::Instant::now(),
            quiet: Default::default(),
            size: Default::default(),
        });
        self.replicas.insert(group, r.clone());
        tracing::info!(group, ?kind, "replica started");
        Ok(r)
    }

    /// Initializes a group's membership if it has never been initialized.
    pub async fn initialize(&self, r: &Replica, members: &[NodeId], map_nodes: &[(NodeId, String)]) -> Result<(), NodeError> {
        let mut m = BTreeMap::new();
        for id in members {
            let addr = map_nodes.iter().find(|(n, _)| n == id).map(|(_, a)| a.clone()).unwrap_or_default();
            m.insert(*id, PeerNode { peer_addr: addr });
        }
        r.raft.initialize(m).await.map_err(|e| NodeError::Raft(format!("initialize group {}: {e}", r.group)))
    }

    /// Stops the node for good: `why` is what `run` returns.
    pub fn fail(&self, why: String) {
        tracing::error!("{why}");
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(why);
        }
        let _ = self.shutdown.send(true);
    }

    /// Why the node stopped on its own, if it did.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// Refuses a map that knows this node id with another data dir: this data dir was wiped or
    /// replaced, and taking the old node's place would vote with an empty log. Stops the node.
    pub fn check_incarnation(&self, map: &ClusterMap) -> Result<(), NodeError> {
        match map.node(self.id()) {
            Some(me) if me.incarnation != 0 && me.incarnation != self.incarnation => {
                let why = format!(
                    "{} (this data dir, {}, is incarnation {:x}; the cluster knows node {} as incarnation {:x})",
                    ringkv_placement::amnesia(self.id()),
                    self.config.data_dir.display(),
                    self.incarnation,
                    self.id(),
                    me.incarnation
                );
                self.fail(why.clone());
                Err(NodeError::Amnesia(why))
            }
            _ => Ok(()),
        }
    }

    /// Whether a placement-group message from node `from` may create this node's (missing)
    /// placement replica. Only a fresh node at bootstrap may: `from`'s map is not bootstrapped
    /// yet, or lists this node with this data dir's incarnation.
    pub async fn may_create_placement_replica(&self, from: NodeId) -> Result<(), ringkv_wire::RequestError> {
        use ringkv_wire::RequestError;
        let local = self.map();
        if local.placement_move.as_ref().is_some_and(|m| m.to == self.id()) {
            return Ok(());
        }
        if local.is_bootstrapped() {
            return Err(RequestError::NotPermitted(format!(
                "node {} has the cluster map but no placement replica; it is not a placement member",
                self.id()
            )));
        }
        match self.pool.call(from, "", &PeerRequest::GetMap, Duration::from_secs(2), Lane::Data).await {
            Ok(Ok(PeerReply::Map(m))) if !m.is_bootstrapped() => Ok(()),
            Ok(Ok(PeerReply::Map(m))) => match m.node(self.id()) {
                // 0: a member the bootstrap could not ask (down then); its first heartbeat claims it.
                Some(me) if me.incarnation == self.incarnation || me.incarnation == 0 => Ok(()),
                _ => {
                    self.check_incarnation(&m).map_err(|e| RequestError::NotPermitted(e.to_string()))?;
                    Err(RequestError::NotPermitted(format!("node {}'s map does not list node {} with this data dir", from, self.id())))
                }
            },
            other => Err(RequestError::Unavailable(format!("cannot check with node {from} that this node may join group 0: {other:?}"))),
        }
    }

    /// Adopts `map` if it is newer than ours: checks the cluster id, persists it, and creates
    /// the replicas it gives this node.
    pub async fn adopt_map(self: &Arc<Self>, map: ClusterMap) -> Result<(), NodeError> {
        let _g = self.adopt_lock.lock().await;
        if !map.is_bootstrapped() || map.version <= self.map().version {
            return Ok(());
        }
        self.check_incarnation(&map)?;
        match self.db.cluster_id()? {
            Some(stored) if stored != map.cluster_id => {
                return Err(NodeError::ForeignDataDir {
                    dir: self.config.data_dir.display().to_string(),
                    stored,
                    given: map.cluster_id.clone(),
                })
            }
            Some(_) => {}
            None => self.db.set_cluster_id(&map.cluster_id)?,
        }
        let bytes = postcard::to_allocvec(&map).map_err(|e| NodeError::Raft(e.to_string()))?;
        self.db.put_meta(ringkv_storage::keys::META_MAP, &bytes)?;
        let map = Arc::new(map);
        if let Ok(mut m) = self.map.write() {
            *m = map.clone();
        }
        self.reconcile(&map).await
    }

    /// Brings this node's shard replicas in line with `map`: creates the replicas it lists here
    /// (and the targets of moves to here), removes those it no longer lists.
    pub async fn reconcile(self: &Arc<Self>, map: &ClusterMap) -> Result<(), NodeError> {
        if !map.is_bootstrapped() {
            return Ok(());
        }
        self.snapshot_throttle.set(&map.settings);
        let me = self.id();
        let nodes: Vec<(NodeId, String)> = map.nodes.iter().map(|n| (n.id, n.peer_addr.clone())).collect();
        // The placement group's replica: created here when this node is to replace a member
        // (the leader then adds it as a learner), removed once this node is no member.
        let placement_target = map.placement_move.as_ref().is_some_and(|m| m.to == me);
        match self.replica(PLACEMENT_GROUP) {
            None if placement_target => {
                if let Err(e) = self.ensure_replica(PLACEMENT_GROUP, ReplicaKind::Placement).await {
                    tracing::error!("cannot start this node's placement replica: {e}");
                }
            }
            Some(_) if !placement_target && !map.placement_members.contains(&me) => {
                if let Err(e) = self.remove_replica(PLACEMENT_GROUP, map.version).await {
                    tracing::error!("cannot remove this node's placement replica yet: {e}");
                }
            }
            _ => {}
        }
        for s in &map.shards {
            let incoming = map.move_of(s.id).is_some_and(|m| m.to == me);
            if !s.replicas.contains(&me) && !incoming {
                continue;
            }
            if self.replica(s.id).is_none() && !incoming {
                if let Some(gone) = ringkv_storage::tombstone(&self.db, s.id)?.filter(|c| *c >= s.epoch.conf_ver) {
                    tracing::warn!(
                        shard = s.id,
                        "the map (conf_ver {}) lists a replica removed here at conf_ver {gone}; not recreating it",
                        s.epoch.conf_ver
                    );
                    continue;
                }
            }
            if self.quarantined.contains_key(&s.id) {
                continue;
            }
            // One replica that cannot start must not hold up the others.
            let created = async {
                let r = self.ensure_replica(s.id, ReplicaKind::Shard { start: s.start, end: s.end }).await?;
                // Only a shard's first membership is made here; later ones come through Raft.
                // The first replica makes it at once (so the initial leaders are the balanced
                // ones the map chose). If its node is down, slow or could not bind, any other
                // replica makes it after a while, with the same members at the same log id:
                // initializing is idempotent and never yields two different first memberships.
                if s.epoch.conf_ver == 1 {
                    let first = s.replicas.first() == Some(&me);
                    let leaderless = r.raft.leader().is_none();
                    if first || (leaderless && r.started.elapsed() > self.initialize_takeover_after()) {
                        self.initialize(&r, &s.replicas, &nodes).await?;
                    }
                }
                Ok::<(), NodeError>(())
            };
            if let Err(e) = created.await {
                tracing::error!(shard = s.id, "cannot start this node's replica: {e}");
            }
        }
        let stale: Vec<GroupId> = self
            .replicas
            .iter()
            .map(|r| r.group)
            .filter(|g| *g != PLACEMENT_GROUP)
            .filter(|g| match map.shard(*g) {
                Some(s) => !s.replicas.contains(&me) && map.move_of(*g).is_none_or(|m| m.to != me),
                None => false,
            })
            .collect();
        // A quarantined replica the map no longer lists here (it was rebuilt elsewhere): its
        // state goes, as a removed replica's does.
        let gone: Vec<GroupId> = self
            .quarantined
            .iter()
            .map(|e| *e.key())
            .filter(|g| map.shard(*g).is_some_and(|s| !s.replicas.contains(&me) && map.move_of(*g).is_none_or(|m| m.to != me)))
            .collect();
        for g in gone {
            let Some(s) = map.shard(g) else { continue };
            let kind = ReplicaKind::Shard { start: s.start, end: s.end };
            match ringkv_storage::remove_replica(&self.db, g, kind, s.epoch.conf_ver) {
                Ok(()) => {
                    self.quarantined.remove(&g);
                    metrics::gauge!("ringkv_replicas_quarantined").set(self.quarantined.len() as f64);
                    tracing::info!(shard = g, "quarantined replica removed: the shard was rebuilt elsewhere");
                }
                Err(e) => tracing::error!(shard = g, "cannot remove the quarantined replica: {e}"),
            }
        }
        for g in stale {
            let conf_ver = map.shard(g).map(|s| s.epoch.conf_ver).unwrap_or(0);
            if let Err(e) = self.remove_replica(g, conf_ver).await {
                tracing::error!(shard = g, "cannot remove this node's replica yet: {e}");
            }
        }
        Ok(())
    }

    /// Stops this node's replica of `group` and deletes its state, leaving a tombstone.
    async fn remove_replica(&self, group: GroupId, conf_ver: u64) -> Result<(), NodeError> {
        let _g = self.create_lock.lock().await;
        let Some((_, r)) = self.replicas.remove(&group) else { return Ok(()) };
        r.retired.store(true, std::sync::atomic::Ordering::Release);
        // Its state is deleted only once the group has stopped writing it.
        match tokio::time::timeout(Duration::from_secs(5), {
            r.before_stop();
            r.raft.shutdown()
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(group, "replica stopped with an error: {e}"),
            Err(_) => {
                r.retired.store(false, std::sync::atomic::Ordering::Release);
                self.replicas.insert(group, r);
                return Err(NodeError::Raft(format!("group {group} did not stop within 5 s; its removal is retried")));
            }
        }
        ringkv_storage::remove_replica(&self.db, group, r.kind(), conf_ver)?;
        metrics::counter!("ringkv_replicas_removed_total").increment(1);
        tracing::info!(group, conf_ver, "replica removed");
        Ok(())
    }

    /// The newest map we can see: our placement replica's, or a placement member's.
    async fn fetch_map(self: &Arc<Self>) -> Option<ClusterMap> {
        if let Some(r) = self.replica(PLACEMENT_GROUP) {
            if let Ok(Some(m)) = r.sm.placement_map() {
                return Some(m);
            }
        }
        let current = self.map();
        let mut targets: Vec<(NodeId, String)> = current
            .placement_members
            .iter()
            .filter(|id| **id != self.id())
            .filter_map(|id| current.node(*id).map(|n| (*id, n.peer_addr.clone())))
            .collect();
        if !current.is_bootstrapped() {
            for s in self.config.seeds.iter().filter(|s| s.as_str() != self.config.advertised_peer_addr()) {
                targets.push((0, s.clone()));
            }
        }
        let mut best: Option<ClusterMap> = None;
        for (id, addr) in targets {
            if let Ok(Ok(PeerReply::Map(m))) = self.pool.call(id, &addr, &PeerRequest::GetMap, Duration::from_secs(1), Lane::Data).await {
                if best.as_ref().is_none_or(|b| m.version > b.version) {
                    best = Some(m);
                }
            }
        }
        best
    }

    /// Keeps replicas in line with the newest map, and gauges in line with the replicas.
    pub async fn map_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if let Some(m) = self.fetch_map().await {
                if let Err(e) = self.adopt_map(m).await {
                    tracing::error!("cannot adopt the cluster map: {e}");
                }
            }
            // Again on the current map: a replica whose creation or removal failed is retried.
            if let Err(e) = self.reconcile(&self.map()).await {
                tracing::error!("cannot follow the cluster map: {e}");
            }
            let leaders = self.replicas.iter().filter(|r| r.raft.is_leader()).count();
            metrics::gauge!("ringkv_raft_leaders").set(leaders as f64);
            metrics::gauge!("ringkv_raft_replicas").set(self.replicas.len() as f64);
            metrics::gauge!("ringkv_transport_peer_connections").set(self.pool.connections() as f64);
            metrics::gauge!("ringkv_transport_peer_endpoint_connections").set(self.pool.endpoint_connections() as f64);
            tokio::select! {
                _ = tokio::time::sleep(MAP_SYNC_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Stops every group and syncs storage.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let replicas: Vec<Arc<Replica>> = self.replicas.iter().map(|r| r.clone()).collect();
        for r in replicas {
            let _ = tokio::time::timeout(Duration::from_secs(5), {
                r.before_stop();
                r.raft.shutdown()
            })
            .await;
        }
        let _ = self.db.raw().flush_wal(true);
    }

    /// Refuses a client write while the data disk's free space is below the reserve.
    pub fn check_disk_space(&self) -> Result<(), ringkv_wire::RequestError> {
        let free = self.disk_free.load(std::sync::atomic::Ordering::Relaxed);
        let reserve = self.config.storage.reserve_bytes;
        if free < reserve {
            return Err(ringkv_wire::RequestError::DiskFull { node: self.id(), free_bytes: free, reserve_bytes: reserve });
        }
        Ok(())
    }

    /// Every node: measures the data dir's free space each second (`ringkv_storage_free_bytes`,
    /// `ringkv_storage_disk_full`), so writes stop before the disk is full and resume once it
    /// is not; and the memory RocksDB holds (`ringkv_rocksdb_*_bytes`).
    pub async fn disk_space_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut was_full = false;
        loop {
            let mem = self.db.memory_usage();
            metrics::gauge!("ringkv_rocksdb_memtable_bytes").set(mem.memtables as f64);
            metrics::gauge!("ringkv_rocksdb_table_readers_bytes").set(mem.table_readers as f64);
            metrics::gauge!("ringkv_rocksdb_block_cache_bytes").set(mem.block_cache as f64);
            match nix::sys::statvfs::statvfs(&self.config.data_dir) {
                Ok(s) => {
                    let free = crate::snapshot::free_bytes(&s);
                    self.disk_free.store(free, std::sync::atomic::Ordering::Relaxed);
                    let full = free < self.config.storage.reserve_bytes;
                    metrics::gauge!("ringkv_storage_free_bytes").set(free as f64);
                    metrics::gauge!("ringkv_storage_disk_full").set(if full { 1.0 } else { 0.0 });
                    if full != was_full {
                        if full {
                            tracing::error!(
                                free,
                                reserve = self.config.storage.reserve_bytes,
                                "data disk below its reserve: refusing writes"
                            );
                        } else {
                            tracing::warn!(free, "data disk above its reserve again: taking writes");
                        }
                        was_full = full;
                    }
                }
                Err(e) => tracing::warn!("cannot read the data disk's free space: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// How long a shard's other replicas wait for its first replica to start the group.
    pub fn initialize_takeover_after(&self) -> Duration {
        Duration::from_millis(self.config.raft.election_timeout_max_ms * 2)
    }

    /// How long a leader may go without hearing from a quorum before it is treated as cut off.
    pub fn quorum_silence_limit(&self) -> Duration {
        Duration::from_millis(self.config.raft.election_timeout_max_ms)
    }

    pub fn peer_addr_of(&self, id: NodeId) -> Option<String> {
        self.map().node(id).map(|n| n.peer_addr.clone())
    }

    pub fn client_addr_of(&self, id: NodeId) -> Option<String> {
        self.map().node(id).map(|n| n.client_addr.clone())
    }

    /// "Not the leader of `group`; try `leader`", with the leader's client address if known.
    pub fn not_leader(&self, group: GroupId, leader: Option<NodeId>) -> ringkv_wire::RequestError {
        ringkv_wire::RequestError::NotLeader { shard: group, leader, leader_addr: leader.and_then(|l| self.client_addr_of(l)) }
    }
}

/// Binds a QUIC endpoint that serves `server` on `addr` (and may dial out).
pub fn bind(addr: &str, server: quinn::ServerConfig) -> Result<quinn::Endpoint, NodeError> {
    // A DNS name binds the first address it resolves to.
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| NodeError::Bind(addr.into(), e))?
        .next()
        .ok_or_else(|| NodeError::Bind(addr.into(), std::io::Error::other("the name resolves to no address")))?;
    quinn::Endpoint::server(server, sock).map_err(|e| NodeError::Bind(addr.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CertPathsOf, Limits, RaftTuning, TlsConfig};

    fn config(dir: &std::path::Path) -> NodeConfig {
        let certs = dir.join("certs");
        ringkv_transport::certs::init_ca(&certs).expect("ca");
        let c = ringkv_transport::certs::issue_node(&certs, &certs, 1, &[]).expect("cert");
        NodeConfig {
            id: 1,
            data_dir: dir.join("node"),
            peer_addr: "127.0.0.1:0".into(),
            advertise_peer_addr: None,
            client_addr: "127.0.0.1:0".into(),
            advertise_client_addr: None,
            metrics_addr: "127.0.0.1:0".into(),
            advertise_metrics_addr: None,
            http_addr: None,
            resp_addr: None,
            gateway: Default::default(),
            tls: TlsConfig { ca: certs.join("ca.pem"), cert: c.cert, key: c.key },
            seeds: vec![],
            join: vec![],
            limits: Limits::default(),
            raft: RaftTuning::default(),
            storage: Default::default(),
            lifecycle: Default::default(),
            fault_injection: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_map_from_another_cluster_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let db = Db::open(&cfg.data_dir.join("db")).expect("db");
        db.set_cluster_id("cluster-a").expect("cluster id");
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let client = ringkv_transport::tls::client_config(&cfg.cert_paths(), ringkv_wire::ALPN_PEER).expect("tls");
        let node = Node::new(cfg, db.clone(), Arc::new(PeerPool::new(1, ep, client))).expect("node");
        let map = ClusterMap {
            cluster_id: "cluster-b".into(),
            version: 3,
            shards: ringkv_placement::bootstrap_shards(&[1, 2, 3], 4, 3),
            placement_members: vec![1, 2, 3],
            ..Default::default()
        };
        let err = node.adopt_map(map).await.expect_err("foreign map adopted");
        assert!(matches!(err, NodeError::ForeignDataDir { .. }), "{err}");
        assert!(err.to_string().contains("cluster-a"), "{err}");
        assert!(!node.map().is_bootstrapped());
        assert!(node.replicas.is_empty(), "no replica created from a foreign map");
        assert_eq!(db.cluster_id().expect("read"), Some("cluster-a".into()));
    }
}
