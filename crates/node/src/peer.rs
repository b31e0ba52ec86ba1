//! Peer connections: exactly one QUIC connection per pair of nodes, used in both directions and
//! shared by every group, with a fault-injection filter that tests switch on.
//!
//! Either node may dial. Both ends open their request lanes on the connection and serve the
//! lanes the other end opens. If both dial at once, both keep the connection dialed by the lower
//! node id and retire the other after a grace period, so they agree without a handshake.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use ringkv_transport::rpc::RpcError;
use ringkv_transport::RpcClient;
use ringkv_wire::NodeId;

use crate::raft::{PeerRequest, PeerResponse};

/// Streams each end opens per peer connection, one per [`Lane`]: 0 snapshots, 1 control
/// messages, 2 and 3 everything else.
pub const PEER_LANES: usize = 4;
/// The QUIC send priority of each lane, at both ends: control messages (small, and few) first;
/// snapshots and data share what is left round-robin (quinn's priorities are strict, so a
/// lower priority for snapshots would starve them under sustained writes).
pub const PEER_LANE_PRIORITIES: [i32; PEER_LANES] = [0, 1, 0, 0];

/// Which of a peer connection's lanes a request takes. Each lane has its own queue and writer
/// at both ends and its own QUIC stream, so a message on one never waits in another lane's
/// queue: a heartbeat or vote does not queue behind other groups' appends of large entries (up
/// to `APPEND_BYTES_MAX` each), nor an append behind a snapshot's chunks. On the connection the
/// control lane's bytes go first, but all lanes share its congestion and flow-control windows
/// (64 MiB in flight), so a saturated connection still delays them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Snapshot transfers.
    Bulk,
    /// Small messages whose delay costs liveness: votes, heartbeats and commit-only appends,
    /// leader transfers, pings, quiescence, node heartbeats and the admin requests forwarded
    /// to the placement leader.
    Control,
    /// Everything else: appends carrying entries, maps, placement orders.
    Data,
}

impl Lane {
    /// The lane's index on the connection; data spreads over the data lanes.
    pub fn index(self) -> usize {
        match self {
            Lane::Bulk => 0,
            Lane::Control => 1,
            Lane::Data => 2 + rand::random::<usize>() % (PEER_LANES - 2),
        }
    }
}
/// Largest peer frame: a batch of appended entries or a whole snapshot.
pub const PEER_FRAME_BYTES_MAX: usize = 256 << 20;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a duplicate connection lingers so requests already on it finish.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(10);

type Conn = RpcClient<PeerRequest, PeerResponse>;
type Server = Box<dyn Fn(quinn::Connection) + Send + Sync>;

struct Entry {
    conn: Arc<Conn>,
    dialer: NodeId,
}

pub struct PeerPool {
    me: NodeId,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    conns: DashMap<NodeId, Entry, rustc_hash::FxBuildHasher>,
    dialing: DashMap<NodeId, Arc<tokio::sync::Mutex<()>>>,
    /// Node ids learned for addresses dialed without knowing who is there (seeds).
    addr_ids: DashMap<String, NodeId>,
    /// Serves the lanes a peer opens on a connection (set once the node exists).
    server: OnceLock<Server>,
    /// Peers this node must not talk to (fault injection).
    isolated_from: RwLock<HashSet<NodeId>>,
    /// The Raft messages of every group, batched per peer.
    pub raft_outbox: crate::raft::RaftOutbox,
}

impl PeerPool {
    pub fn new(me: NodeId, endpoint: quinn::Endpoint, config: quinn::ClientConfig) -> Self {
        PeerPool {
            me,
            endpoint,
            config,
            conns: DashMap::default(),
            dialing: DashMap::new(),
            addr_ids: DashMap::new(),
            server: OnceLock::new(),
            isolated_from: RwLock::new(HashSet::new()),
            raft_outbox: Default::default(),
        }
    }

    pub fn set_server(&self, server: Server) {
        let _ = self.server.set(server);
    }

    pub fn set_isolated_from(&self, peers: Vec<NodeId>) {
        if let Ok(mut s) = self.isolated_from.write() {
            *s = peers.into_iter().collect();
        }
    }

    pub fn is_isolated_from(&self, peer: NodeId) -> bool {
        self.isolated_from.read().map(|s| s.contains(&peer)).unwrap_or(false)
    }

    /// The number of live peer connections (one per peer).
    pub fn connections(&self) -> usize {
        self.conns.iter().filter(|e| !e.conn.is_closed()).count()
    }

    /// Every QUIC connection open on the peer endpoint, duplicates and handshakes included:
    /// with one connection per peer it equals [`PeerPool::connections`].
    pub fn endpoint_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    fn live(&self, peer: NodeId) -> Option<Arc<Conn>> {
        self.conns.get(&peer).filter(|e| !e.conn.is_closed()).map(|e| e.conn.clone())
    }

    /// Takes a connection with `peer` (dialed by `dialer`) into service and returns the one
    /// both ends use.
    pub async fn adopt(&self, peer: NodeId, conn: quinn::Connection, dialer: NodeId) -> Result<Arc<Conn>, RpcError> {
        if peer == self.me {
            conn.close(4u32.into(), b"a node does not talk to itself");
            return Err(RpcError::Connect { addr: conn.remote_address().to_string(), msg: "that address is this node".into() });
        }
        if let Some(serve) = self.server.get() {
            serve(conn.clone());
        }
        let rpc = Arc::new(Conn::over_prioritized(conn, PEER_LANES, PEER_FRAME_BYTES_MAX, &PEER_LANE_PRIORITIES).await?);
        let preferred = self.me.min(peer);
        let mut kept = rpc.clone();
        let mut retired = None;
        match self.conns.get_mut(&peer) {
            Some(mut e) if !e.conn.is_closed() => {
                if dialer == preferred && e.dialer != preferred {
                    retired = Some(std::mem::replace(&mut e.conn, rpc.clone()));
                    e.dialer = dialer;
                } else {
                    kept = e.conn.clone();
                    retired = Some(rpc);
                }
            }
            Some(mut e) => {
                e.conn = rpc.clone();
                e.dialer = dialer;
            }
            None => {
                self.conns.insert(peer, Entry { conn: rpc.clone(), dialer });
            }
        }
        if let Some(old) = retired {
            tokio::spawn(async move {
                tokio::time::sleep(DUPLICATE_GRACE).await;
                old.close();
            });
        }
        Ok(kept)
    }

    async fn conn(&self, to: NodeId, addr: &str) -> Result<Arc<Conn>, RpcError> {
        let to = if to == 0 { self.addr_ids.get(addr).map(|i| *i).unwrap_or(0) } else { to };
        if let Some(c) = self.live(to) {
            return Ok(c);
        }
        let lock = self.dialing.entry(to).or_default().clone();
        let _g = lock.lock().await;
        if let Some(c) = self.live(to) {
            return Ok(c);
        }
        let sock = ringkv_transport::rpc::resolve(addr).await?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, async {
            self.endpoint
                .connect_with(self.config.clone(), sock, ringkv_transport::NODE_SERVER_NAME)
                .map_err(|e| RpcError::Connect { addr: addr.into(), msg: e.to_string() })?
                .await
                .map_err(|e| RpcError::Connect { addr: addr.into(), msg: e.to_string() })
        })
        .await
        .map_err(|_| RpcError::Connect { addr: addr.into(), msg: "timed out".into() })??;
        if ringkv_transport::tls::peer_node_id(&conn) != Some(to) && to != 0 {
            conn.close(2u32.into(), b"unexpected node");
            return Err(RpcError::Connect { addr: addr.into(), msg: format!("the node at {addr} is not node {to}") });
        }
        metrics::counter!("ringkv_transport_connects_total").increment(1);
        let peer = ringkv_transport::tls::peer_node_id(&conn).unwrap_or(to);
        self.addr_ids.insert(addr.to_string(), peer);
        self.adopt(peer, conn, self.me).await
    }

    /// Sends `req` to node `to` at `addr` (`to` 0: whichever node is there, e.g. a seed) on
    /// the given lane of the connection.
    pub async fn call(&self, to: NodeId, addr: &str, req: &PeerRequest, timeout: Duration, lane: Lane) -> Result<PeerResponse, RpcError> {
        self.call_sized(to, addr, req, |_| timeout, lane).await
    }

    /// As [`PeerPool::call`], with the deadline chosen from the size of the encoded request.
    pub async fn call_sized(
        &self,
        to: NodeId,
        addr: &str,
        req: &PeerRequest,
        timeout: impl FnOnce(usize) -> Duration,
        lane: Lane,
    ) -> Result<PeerResponse, RpcError> {
        if to != 0 && self.is_isolated_from(to) {
            return Err(RpcError::Unreachable(format!("node {to} is cut off by the fault filter")));
        }
        let c = self.conn(to, addr).await?;
        c.call_on_lane_sized(lane.index(), req, timeout).await
    }
}
