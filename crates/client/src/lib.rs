//! The ringkv client: routes every key to its shard's leader over QUIC with mutual TLS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringkv_client::Error> {
//! use ringkv_client::{CallOptions, CertPaths, Client, ClientConfig};
//! use std::time::Duration;
//!
//! let certs = CertPaths {
//!     ca: "data/dev/certs/ca.pem".into(),
//!     cert: "data/dev/certs/client.pem".into(),
//!     key: "data/dev/certs/client.key".into(),
//! };
//! // Any node's client address will do: the client fetches the ring from it.
//! let client = Client::connect(ClientConfig::new(vec!["127.0.0.1:7101".into()], certs)).await?;
//!
//! client.put(b"hello", b"world").await?;
//! assert_eq!(client.get(b"hello").await?, Some(b"world".to_vec()));
//!
//! // A compare-and-swap loop: increment a counter.
//! loop {
//!     let current = client.get(b"counter").await?;
//!     let n: u64 = current.as_deref().and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).unwrap_or(0);
//!     if client.compare_and_swap(b"counter", current.as_deref(), (n + 1).to_string().as_bytes()).await?.swapped {
//!         break;
//!     }
//! }
//! // Or atomically, in one Raft entry, applied exactly once.
//! let n = client.incr(b"counter2", 1).await?;
//!
//! // Per-call deadlines, stale reads from any replica, batches fanned out per shard.
//! let _ = client.get_with(b"hello", CallOptions { timeout: Some(Duration::from_secs(1)), stale: true }).await?;
//! let results = client.batch_put(&[(b"a", b"1"), (b"b", b"2")], CallOptions::default()).await;
//! assert!(results.iter().all(|r| r.is_ok()));
//! # Ok(()) }
//! ```
//!
//! `examples/counter.rs` runs the counter loop against a `ringkv dev` cluster.
//!
//! How it behaves:
//! - It caches the cluster map and each shard's leader. `NotLeader` moves it to the hinted
//!   leader, `StaleEpoch`/`WrongShard` refresh the map, and a node that cannot be reached is
//!   avoided by every call for a few seconds.
//! - Every call has a deadline (the client's `timeout`, or `CallOptions::timeout`). Inside it the
//!   call retries with exponential backoff and jitter; past it, it fails with `Error::Deadline`.
//! - Writes carry a session (client id and sequence number). Shards remember the answer to
//!   each, also across snapshots and restarts, so a retried write applies at most once and a
//!   retried compare-and-swap returns the answer of its first application.
//! - `Error::retryable` says whether trying again may help. Nothing a node sends makes the
//!   client panic.

pub mod report;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ringkv_transport::RpcClient;
pub use ringkv_transport::{CertPaths, RpcError};
pub use ringkv_wire::KeyOp;
use ringkv_wire::{
    key_hash, ClientReply, ClientRequest, ClientResponse, ClusterMap, Epoch, GroupId, NodeId, NodeStatus, RequestError, ALPN_CLIENT,
};
pub use ringkv_wire::{ClusterMap as Map, NodeStatus as NodeReport, Session};

/// `new`, except that a shard whose descriptor in `old` has a newer epoch keeps it, and a map
/// older than `old` is ignored: a client never goes back to an older route.
fn merge_newer(old: &ClusterMap, new: ClusterMap) -> ClusterMap {
    if new.version < old.version {
        return old.clone();
    }
    let mut m = new;
    for s in m.shards.iter_mut() {
        if let Some(o) = old.shards.iter().find(|o| o.id == s.id && o.epoch > s.epoch) {
            *s = o.clone();
        }
    }
    m
}

/// Streams per connection to a node.
pub const CLIENT_LANES: usize = 2;
/// Largest frame the client sends or accepts.
pub const CLIENT_FRAME_BYTES_MAX: usize = 8 << 20;
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long one call avoids a replica that just failed it.
const AVOID_AFTER_FAILURE: Duration = Duration::from_millis(1000);
/// How long a node that failed at the transport level is avoided by every call.
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Client addresses of any nodes; the map is fetched from the first that answers.
    pub seeds: Vec<String>,
    pub certs: CertPaths,
    /// Default deadline of a call, retries included.
    pub timeout: Duration,
    /// Longest wait for one attempt.
    pub attempt_timeout: Duration,
}

impl ClientConfig {
    pub fn new(seeds: Vec<String>, certs: CertPaths) -> Self {
        ClientConfig { seeds, certs, timeout: Duration::from_secs(10), attempt_timeout: Duration::from_secs(3) }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The node refused the request for a reason retrying will not fix.
    #[error(transparent)]
    Request(RequestError),
    /// The deadline passed; `last` is the last failure seen.
    #[error("deadline of {deadline:?} exceeded; last error: {last}")]
    Deadline { deadline: Duration, last: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("transport: {0}")]
    Transport(#[from] RpcError),
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// Whether retrying the call may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Request(e) => e.retryable(),
            Error::Deadline { .. } | Error::Transport(_) => true,
            Error::Tls(_) | Error::Config(_) => false,
        }
    }
}

/// The answer to a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    pub swapped: bool,
    /// The value before the swap (or the value that prevented it).
    pub current: Option<Vec<u8>>,
}

type Conn = RpcClient<ClientRequest, ClientResponse>;

/// The connection to one node, and when dialing it last failed.
#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    failed_at: Option<Instant>,
}

/// After a failed dial, calls to that node fail at once for this long instead of queueing up
/// to dial it again.
const REDIAL_AFTER: Duration = Duration::from_millis(500);

/// The client's caches, looked up on every call and keyed by the cluster's own ids and
/// addresses: a fast hasher, not a keyed one.
type FastMap<K, V> = DashMap<K, V, rustc_hash::FxBuildHasher>;

pub struct Client {
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    config: ClientConfig,
    conns: FastMap<String, Arc<tokio::sync::Mutex<Slot>>>,
    /// The open connections by address: a call finds its connection here without a lock to
    /// wait for or an allocation; `conns` is only for dialing.
    live: FastMap<String, Arc<Conn>>,
    map: RwLock<Arc<ClusterMap>>,
    leaders: FastMap<GroupId, NodeId>,
    /// Nodes that recently failed at the transport level, and when.
    suspects: FastMap<NodeId, Instant>,
    /// This client's session id: with `next_seq` it names every write, so a retry is recognized.
    client_id: u64,
    next_seq: AtomicU64,
    /// Sequence numbers of writes still in progress; the lowest bounds what shards must remember.
    in_flight: Mutex<BTreeSet<u64>>,
    /// A node in this process and its client address: calls to it skip QUIC.
    local: Option<(String, Arc<dyn LocalNode>)>,
}

/// A node in the same process as the client (a node's gateways route through an embedded
/// client): requests for its client address are handed to it directly, without QUIC or TLS.
pub trait LocalNode: Send + Sync + 'static {
    fn call(&self, req: ClientRequest) -> std::pin::Pin<Box<dyn std::future::Future<Output = ClientResponse> + Send>>;
}

/// Options of one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    /// Deadline of the call, retries included (default: the client's `timeout`).
    pub timeout: Option<Duration>,
    /// Reads: serve from any replica's applied state, which may lag the leader.
    pub stale: bool,
}

impl CallOptions {
    pub fn timeout(d: Duration) -> Self {
        CallOptions { timeout: Some(d), ..Default::default() }
    }

    pub fn stale() -> Self {
        CallOptions { stale: true, ..Default::default() }
    }
}

/// A write's session while it may still be retried; ends when dropped.
struct SessionGuard<'a> {
    client: &'a Client,
    session: Session,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut f) = self.client.in_flight.lock() {
            f.remove(&self.session.seq);
        }
    }
}

impl Client {
    /// Connects to the cluster through `config.seeds` and fetches the map.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let client = Self::unrouted(config)?;
        client.refresh_map().await?;
        Ok(client)
    }

    /// A client that has not fetched the map (for talking to single nodes, e.g. to bootstrap).
    pub fn unrouted(config: ClientConfig) -> Result<Client, Error> {
        if config.seeds.is_empty() {
            return Err(Error::Config("no seed endpoints given".into()));
        }
        let quic = ringkv_transport::tls::client_config(&config.certs, ALPN_CLIENT).map_err(|e| Error::Tls(e.to_string()))?;
        let bind: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Config(format!("cannot open a UDP socket: {e}")))?;
        Ok(Client {
            endpoint,
            quic,
            config,
            conns: FastMap::default(),
            live: FastMap::default(),
            map: RwLock::new(Arc::default()),
            leaders: FastMap::default(),
            suspects: FastMap::default(),
            client_id: rand::random(),
            next_seq: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeSet::new()),
            local: None,
        })
    }

    /// Hands requests for `addr` (the client address of a node in this process) to `node`.
    pub fn with_local(mut self, addr: String, node: Arc<dyn LocalNode>) -> Self {
        self.local = Some((addr, node));
        self
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, RpcError> {
        let slot = self.conns.entry(addr.to_string()).or_default().clone();
        let mut g = slot.lock().await;
        if let Some(c) = g.conn.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        if g.failed_at.is_some_and(|t| t.elapsed() < REDIAL_AFTER) {
            return Err(RpcError::Connect { addr: addr.into(), msg: "failed moments ago".into() });
        }
        let sock = ringkv_transport::rpc::resolve(addr).await?;
        let c = tokio::time::timeout(
            Duration::from_secs(3),
            Conn::connect(
                &self.endpoint,
                self.quic.clone(),
                sock,
                ringkv_transport::NODE_SERVER_NAME,
                CLIENT_LANES,
                CLIENT_FRAME_BYTES_MAX,
            ),
        )
        .await
        .map_err(|_| RpcError::Connect { addr: addr.into(), msg: "timed out".into() })
        .and_then(|r| r);
        match c {
            Ok(c) => {
                let c = Arc::new(c);
                *g = Slot { conn: Some(c.clone()), failed_at: None };
                self.live.insert(addr.to_string(), c.clone());
                Ok(c)
            }
            Err(e) => {
                *g = Slot { conn: None, failed_at: Some(Instant::now()) };
                Err(e)
            }
        }
    }

    /// Sends one request to the node at `addr`, without routing or retries. `timeout` bounds
    /// everything, connecting included.
    pub async fn call_node(&self, addr: &str, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, RpcError> {
        if let Some((local, node)) = &self.local {
            if local == addr {
                return tokio::time::timeout(timeout, node.call(req.clone())).await.map_err(|_| RpcError::Timeout(timeout));
            }
        }
        let open = self.live.get(addr).map(|c| c.clone()).filter(|c| !c.is_closed());
        let r = match open {
            // The call's own deadline is the only timer.
            Some(c) => c.call(req, timeout).await,
            None => tokio::time::timeout(timeout, async {
                let c = self.conn(addr).await?;
                c.call(req, timeout).await
            })
            .await
            .unwrap_or(Err(RpcError::Timeout(timeout))),
        };
        if matches!(r, Err(RpcError::ConnectionLost(_))) {
            self.live.remove(addr);
            self.conns.remove(addr);
        }
        r
    }

    /// Fetches the map from every known node at once and takes the first good answer (a dead
    /// node costs nothing). Shard descriptors never go back: where the cached map holds a newer
    /// epoch for a shard (learned from a `StaleEpoch` answer), it is kept.
    pub async fn refresh_map(&self) -> Result<Arc<ClusterMap>, Error> {
        use futures::stream::StreamExt;
        let current = self.map();
        let mut addrs: Vec<String> = current.nodes.iter().map(|n| n.client_addr.clone()).collect();
        addrs.extend(self.config.seeds.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        let mut asks: futures::stream::FuturesUnordered<_> = addrs
            .iter()
            .map(|a| async move { (a.clone(), self.call_node(a, &ClientRequest::GetMap, Duration::from_secs(2)).await) })
            .collect();
        let mut last = String::from("no node answered");
        let mut best: Option<ClusterMap> = None;
        while let Some((a, r)) = asks.next().await {
            match r {
                // Any bootstrapped map will do to route; stale entries are corrected by the
                // nodes' StaleEpoch answers.
                Ok(Ok(ClientReply::Map(m))) if m.is_bootstrapped() => {
                    best = Some(m);
                    break;
                }
                Ok(Ok(_)) => last = format!("{a}: cluster not bootstrapped"),
                Ok(Err(e)) => last = format!("{a}: {e}"),
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        match best {
            Some(m) => {
                if let Ok(mut w) = self.map.write() {
                    let merged = merge_newer(&w, m);
                    *w = Arc::new(merged);
                }
                Ok(self.map())
            }
            None => Err(Error::Request(RequestError::Unavailable(last))),
        }
    }

    /// Takes a fresh shard descriptor (from a `StaleEpoch` answer) into the cached map.
    /// Whether the map changed.
    fn learn_descriptor(&self, d: &ringkv_wire::ShardDesc) -> bool {
        let Ok(mut w) = self.map.write() else { return false };
        if !w.shards.iter().any(|s| s.id == d.id && s.epoch < d.epoch) {
            return false;
        }
        let mut m = (**w).clone();
        if let Some(s) = m.shards.iter_mut().find(|s| s.id == d.id) {
            *s = d.clone();
        }
        self.leaders.remove(&d.id);
        *w = Arc::new(m);
        true
    }

    /// Routes a keyed request to its shard's leader, retrying until `timeout` passes.
    async fn keyed(&self, key: &[u8], make: impl Fn(GroupId, Epoch) -> ClientRequest, timeout: Duration) -> Result<ClientReply, Error> {
        self.keyed_hash(key_hash(key), make, timeout).await
    }

    async fn keyed_hash(&self, hash: u64, make: impl Fn(GroupId, Epoch) -> ClientRequest, timeout: Duration) -> Result<ClientReply, Error> {
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        let mut attempt = 0usize;
        let mut last = String::new();
        // Replicas that just failed this call (unavailable, unreachable), and when.
        let mut failures: Vec<(NodeId, Instant)> = Vec::new();
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(Error::Deadline { deadline: timeout, last });
            }
            let mut map = self.map();
            if !map.is_bootstrapped() {
                match tokio::time::timeout(remaining, self.refresh_map())
                    .await
                    .unwrap_or_else(|_| Err(Error::Deadline { deadline: timeout, last: "refreshing the map".into() }))
                {
                    Ok(m) => map = m,
                    Err(e) => {
                        last = e.to_string();
                        continue_after_pause(&mut backoff, timeout, started).await;
                        continue;
                    }
                }
            }
            let mut pause = true;
            if let Some(desc) = map.shard_for_hash(hash) {
                // The cached leader if any; otherwise the replicas in turn, avoiding for a moment
                // those that just failed (a deposed leader cut off from its quorum keeps claiming
                // to lead) and those any call found unreachable.
                failures.retain(|(_, t)| t.elapsed() < AVOID_AFTER_FAILURE);
                let mut failed: Vec<NodeId> = failures.iter().map(|(n, _)| *n).collect();
                for r in &desc.replicas {
                    if self.suspects.get(r).is_some_and(|t| t.elapsed() < SUSPECT_FOR) && !failed.contains(r) {
                        failed.push(*r);
                    }
                }
                if desc.replicas.iter().all(|r| failed.contains(r)) {
                    failed.clear();
                }
                let cached = self.leaders.get(&desc.id).map(|l| *l).filter(|l| !failed.contains(l));
                let target = match cached {
                    Some(l) => l,
                    None => {
                        let healthy: Vec<NodeId> = desc.replicas.iter().copied().filter(|r| !failed.contains(r)).collect();
                        // A descriptor with no replicas (sent by a broken node) names node 0, which
                        // no map holds: the call then refreshes its route instead of panicking.
                        healthy.get(attempt % healthy.len().max(1)).or(desc.replicas.first()).copied().unwrap_or(0)
                    }
                };
                match map.node(target).map(|n| n.client_addr.as_str()) {
                    None => {
                        self.leaders.remove(&desc.id);
                        last = format!("node {target} is not in the map");
                    }
                    Some(addr) => {
                        let t = remaining.min(self.config.attempt_timeout);
                        match self.call_node(addr, &make(desc.id, desc.epoch), t).await {
                            Ok(Ok(reply)) => {
                                // Written only on a change: these maps are read by every call.
                                if self.suspects.contains_key(&target) {
                                    self.suspects.remove(&target);
                                }
                                if cached != Some(target) {
                                    self.leaders.insert(desc.id, target);
                                }
                                return Ok(reply);
                            }
                            Ok(Err(RequestError::NotLeader { leader, .. })) => {
                                last = format!("node {target} is not the leader of shard {} (it names {leader:?})", desc.id);
                                match leader.filter(|l| *l != target && !failed.contains(l)) {
                                    Some(l) => {
                                        self.leaders.insert(desc.id, l);
                                        pause = false;
                                    }
                                    None => {
                                        self.leaders.remove(&desc.id);
                                    }
                                }
                            }
                            Ok(Err(RequestError::StaleEpoch { descriptor })) => {
                                // The answer carries the fresh descriptor: route with it at once.
                                last = format!("shard {} moved on to epoch {:?}", descriptor.id, descriptor.epoch);
                                if self.learn_descriptor(&descriptor) {
                                    pause = false;
                                } else {
                                    let _ = tokio::time::timeout(timeout.saturating_sub(started.elapsed()), self.refresh_map()).await;
                                }
                            }
                            Ok(Err(e @ (RequestError::WrongShard { .. } | RequestError::NotBootstrapped))) => {
                                last = e.to_string();
                                let _ = tokio::time::timeout(timeout.saturating_sub(started.elapsed()), self.refresh_map()).await;
                            }
                            Ok(Err(e)) if e.retryable() => {
                                self.leaders.remove(&desc.id);
                                failures.push((target, Instant::now()));
                                last = e.to_string();
                            }
                            Ok(Err(e)) => return Err(Error::Request(e)),
                            // Over the client's own frame limit: nothing was sent, and no node
                            // is to blame.
                            Err(RpcError::Encode(why)) => return Err(Error::Request(RequestError::TooLarge(why))),
                            Err(e) => {
                                self.leaders.remove(&desc.id);
                                // A node that cannot be reached is avoided by every call; one that
                                // was reached but did not answer in time (a shard without quorum
                                // there) only by this call.
                                if !matches!(e, RpcError::Timeout(_)) {
                                    self.suspects.insert(target, Instant::now());
                                }
                                failures.push((target, Instant::now()));
                                last = format!("{addr}: {e}");
                            }
                        }
                    }
                }
            } else {
                last = "no shard covers the key in the map".into();
            }
            attempt += 1;
            if pause {
                continue_after_pause(&mut backoff, timeout, started).await;
            }
        }
    }

    /// Starts a write session: a sequence number this client never uses again.
    fn session(&self) -> SessionGuard<'_> {
        // The number is taken under the same lock that computes `acked_below`: otherwise a later
        // write could report the floor past an earlier one not yet inserted, and the shard would
        // refuse that earlier write as expired.
        let (seq, acked_below) = match self.in_flight.lock() {
            Ok(mut f) => {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                f.insert(seq);
                (seq, f.first().copied().unwrap_or(seq))
            }
            Err(_) => (self.next_seq.fetch_add(1, Ordering::Relaxed), 0),
        };
        SessionGuard { client: self, session: Session { client: self.client_id, seq, acked_below } }
    }

    fn deadline(&self, o: &CallOptions) -> Duration {
        o.timeout.unwrap_or(self.config.timeout)
    }

    /// Reads `key` linearizably.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.get_with(key, CallOptions::default()).await
    }

    /// Reads `key`; with `stale`, from any replica's applied state.
    pub async fn get_with(&self, key: &[u8], o: CallOptions) -> Result<Option<Vec<u8>>, Error> {
        let key = key.to_vec();
        let make = |shard, epoch| ClientRequest::Get { shard, epoch, key: key.clone(), stale: o.stale };
        match self.keyed(&key, make, self.deadline(&o)).await? {
            ClientReply::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.put_with(key, value, CallOptions::default()).await
    }

    /// Writes `value` under `key`. Retried until the deadline, applied at most once.
    pub async fn put_with(&self, key: &[u8], value: &[u8], o: CallOptions) -> Result<(), Error> {
        let (key, value) = (key.to_vec(), value.to_vec());
        let s = self.session();
        let make = |shard, epoch| ClientRequest::Put { shard, epoch, key: key.clone(), value: value.clone(), session: Some(s.session) };
        match self.keyed(&key, make, self.deadline(&o)).await? {
            ClientReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete(&self, key: &[u8]) -> Result<(), Error> {
        self.delete_with(key, CallOptions::default()).await
    }

    pub async fn delete_with(&self, key: &[u8], o: CallOptions) -> Result<(), Error> {
        let key = key.to_vec();
        let s = self.session();
        let make = |shard, epoch| ClientRequest::Delete { shard, epoch, key: key.clone(), session: Some(s.session) };
        match self.keyed(&key, make, self.deadline(&o)).await? {
            ClientReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `new` if its value is `expect` (`None`: the key is absent). A retry after
    /// a timeout or a leader change returns the answer of the first application.
    pub async fn compare_and_swap(&self, key: &[u8], expect: Option<&[u8]>, new: &[u8]) -> Result<CasOutcome, Error> {
        self.compare_and_swap_with(key, expect, new, CallOptions::default()).await
    }

    pub async fn compare_and_swap_with(&self, key: &[u8], expect: Option<&[u8]>, new: &[u8], o: CallOptions) -> Result<CasOutcome, Error> {
        let (key, expect, new) = (key.to_vec(), expect.map(|e| e.to_vec()), new.to_vec());
        let s = self.session();
        let make = |shard, epoch| ClientRequest::Cas {
            shard,
            epoch,
            key: key.clone(),
            expect: expect.clone(),
            new: new.clone(),
            session: Some(s.session),
        };
        match self.keyed(&key, make, self.deadline(&o)).await? {
            ClientReply::Cas { swapped, current } => Ok(CasOutcome { swapped, current }),
            other => Err(unexpected(other)),
        }
    }

    /// Adds `delta` to the integer stored under `key` (absent: 0) in one atomic step, applied
    /// exactly once however often it is retried; returns the new value. A value that is not a
    /// decimal i64, or a sum that would overflow, is refused (`RequestError::Invalid`).
    pub async fn incr(&self, key: &[u8], delta: i64) -> Result<i64, Error> {
        self.key_op(key, KeyOp::Incr(delta), CallOptions::default()).await
    }

    /// Appends `suffix` to the value under `key` (absent: empty); returns the new length.
    pub async fn append(&self, key: &[u8], suffix: &[u8]) -> Result<i64, Error> {
        self.key_op(key, KeyOp::Append(suffix.to_vec()), CallOptions::default()).await
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete_existing(&self, key: &[u8]) -> Result<bool, Error> {
        self.key_op(key, KeyOp::DeleteCount, CallOptions::default()).await.map(|n| n > 0)
    }

    /// Runs a read-modify-write of one key on its shard's state machine (atomic, and exactly
    /// once under this client's session).
    pub async fn key_op(&self, key: &[u8], op: KeyOp, o: CallOptions) -> Result<i64, Error> {
        let key = key.to_vec();
        let s = self.session();
        let make = |shard, epoch| ClientRequest::Apply { shard, epoch, key: key.clone(), op: op.clone(), session: Some(s.session) };
        match self.keyed(&key, make, self.deadline(&o)).await? {
            ClientReply::Int(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a gateway access token called `name` with `role` and returns it. The token is
    /// made here and only its SHA-256 is sent and stored: it cannot be shown again.
    pub async fn create_token(&self, name: &str, role: ringkv_wire::Role) -> Result<String, Error> {
        let token = ringkv_wire::auth::token_from_bytes(&rand::random());
        let req = ClientRequest::CreateToken { name: name.into(), role, hash: ringkv_wire::auth::token_hash(&token) };
        match self.placement(&req).await? {
            ClientReply::Done => Ok(token),
            other => Err(unexpected(other)),
        }
    }

    /// Groups input positions by the shard their key hashes to.
    fn by_shard<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) -> Result<Vec<Vec<usize>>, Error> {
        let map = self.map();
        let mut groups: std::collections::BTreeMap<GroupId, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, k) in keys.enumerate() {
            let shard = map.shard_for_hash(key_hash(k)).ok_or_else(|| Error::Config("the cluster map does not cover the key".into()))?.id;
            groups.entry(shard).or_default().push(i);
        }
        Ok(groups.into_values().collect())
    }

    /// Reads many keys: one request per shard, all shards in parallel. Results are in input
    /// order; a shard that cannot answer fails only its own keys.
    pub async fn batch_get(&self, keys: &[&[u8]], o: CallOptions) -> Vec<Result<Option<Vec<u8>>, Error>> {
        let groups = match self.by_shard(keys.iter().copied()) {
            Ok(g) => g,
            Err(e) => return keys.iter().map(|_| Err(e.clone())).collect(),
        };
        let deadline = self.deadline(&o);
        let calls = groups.into_iter().map(|idx| async move {
            let ks: Vec<Vec<u8>> = idx.iter().map(|i| keys[*i].to_vec()).collect();
            // A node answers at most about one frame of values: a prefix of the keys asked, each
            // part read from one snapshot. Ask again for the rest until every key is answered.
            let started = Instant::now();
            let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(ks.len());
            let r = loop {
                if values.len() == ks.len() {
                    break Ok(values);
                }
                let rest = &ks[values.len()..];
                let make = |shard, epoch| ClientRequest::BatchGet { shard, epoch, keys: rest.to_vec(), stale: o.stale };
                match self.keyed(&rest[0], make, deadline.saturating_sub(started.elapsed())).await {
                    Ok(ClientReply::Values(v)) if !v.is_empty() && v.len() <= rest.len() => values.extend(v),
                    Ok(other) => break Err(unexpected(other)),
                    Err(e) => break Err(e),
                }
            };
            (idx, r)
        });
        let mut out: Vec<Result<Option<Vec<u8>>, Error>> = keys.iter().map(|_| Ok(None)).collect();
        for (idx, r) in futures::future::join_all(calls).await {
            match r {
                Ok(values) => idx.into_iter().zip(values).for_each(|(i, v)| out[i] = Ok(v)),
                Err(e) => idx.into_iter().for_each(|i| out[i] = Err(e.clone())),
            }
        }
        out
    }

    /// Writes many pairs: one request (and one Raft entry) per shard, all shards in parallel.
    /// Results are in input order; a shard that cannot commit fails only its own pairs.
    pub async fn batch_put(&self, pairs: &[(&[u8], &[u8])], o: CallOptions) -> Vec<Result<(), Error>> {
        let groups = match self.by_shard(pairs.iter().map(|(k, _)| *k)) {
            Ok(g) => g,
            Err(e) => return pairs.iter().map(|_| Err(e.clone())).collect(),
        };
        let deadline = self.deadline(&o);
        let calls = groups.into_iter().map(|idx| async move {
            let ps: Vec<(Vec<u8>, Vec<u8>)> = idx.iter().map(|i| (pairs[*i].0.to_vec(), pairs[*i].1.to_vec())).collect();
            let s = self.session();
            let make = |shard, epoch| ClientRequest::BatchPut { shard, epoch, pairs: ps.clone(), session: Some(s.session) };
            let r = match self.keyed(&ps[0].0, make, deadline).await {
                Ok(ClientReply::Done) => Ok(()),
                Ok(other) => Err(unexpected(other)),
                Err(e) => Err(e),
            };
            (idx, r)
        });
        let mut out: Vec<Result<(), Error>> = pairs.iter().map(|_| Ok(())).collect();
        for (idx, r) in futures::future::join_all(calls).await {
            if let Err(e) = r {
                idx.into_iter().for_each(|i| out[i] = Err(e.clone()));
            }
        }
        out
    }

    /// The node this client believes leads `shard`, if it has learned one.
    pub fn cached_leader(&self, shard: GroupId) -> Option<NodeId> {
        self.leaders.get(&shard).map(|l| *l)
    }

    /// Asks the leader of `shard` to hand leadership to node `to`.
    pub async fn transfer_leader(&self, shard: GroupId, to: NodeId) -> Result<(), Error> {
        let map = self.map();
        let start = map.shard(shard).ok_or_else(|| Error::Config(format!("no shard {shard}")))?.start;
        let make = |_, _| ClientRequest::TransferLeader { shard, to };
        match self.keyed_hash(start, make, self.config.timeout).await? {
            ClientReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Every node's report of its replicas (asked in parallel), in map order.
    pub async fn node_reports(&self) -> Vec<Result<NodeStatus, String>> {
        let map = self.map();
        let calls = map.nodes.iter().filter(|n| n.state != ringkv_wire::NodeState::Removed).map(|n| async move {
            match self.call_node(&n.client_addr, &ClientRequest::NodeStatus, Duration::from_secs(2)).await {
                Ok(Ok(ClientReply::NodeStatus(s))) => Ok(s),
                Ok(Ok(other)) => Err(format!("node {}: unexpected reply {other:?}", n.id)),
                Ok(Err(e)) => Err(format!("node {}: {e}", n.id)),
                Err(e) => Err(format!("node {}: {e}", n.id)),
            }
        });
        futures::future::join_all(calls).await
    }

    /// Sends a placement request (join, node state, placement status, settings). Any node
    /// forwards it to the placement leader; retryable failures are retried on the next node
    /// within the call's deadline.
    pub async fn placement(&self, req: &ClientRequest) -> Result<ClientReply, Error> {
        let (started, timeout) = (Instant::now(), self.config.timeout);
        let mut backoff = BACKOFF_START;
        let mut attempt = 0usize;
        loop {
            let map = self.map();
            let mut addrs: Vec<String> = map
                .nodes
                .iter()
                .filter(|n| matches!(n.state, ringkv_wire::NodeState::Up | ringkv_wire::NodeState::Decommissioning))
                .map(|n| n.client_addr.clone())
                .collect();
            addrs.extend(self.config.seeds.iter().cloned());
            let Some(addr) = addrs.get(attempt % addrs.len().max(1)) else {
                return Err(Error::Config("no node address to send the request to".into()));
            };
            attempt += 1;
            let left = timeout.saturating_sub(started.elapsed());
            let last = match self.call_node(addr, req, left.min(self.config.attempt_timeout.max(Duration::from_secs(5)))).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if !e.retryable() => return Err(Error::Request(e)),
                Ok(Err(e)) => format!("{addr}: {e}"),
                Err(e) => format!("{addr}: {e}"),
            };
            if started.elapsed() >= timeout {
                return Err(Error::Deadline { deadline: timeout, last });
            }
            continue_after_pause(&mut backoff, timeout, started).await;
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// The leader of each group according to nodes' reports: of two replicas claiming to lead
/// (during an election), the one with the higher term.
pub fn leaders_of(reports: &[NodeStatus]) -> std::collections::BTreeMap<GroupId, NodeId> {
    let mut claims: std::collections::BTreeMap<GroupId, (u64, NodeId)> = std::collections::BTreeMap::new();
    for r in reports {
        for g in r.groups.iter().filter(|g| g.is_leader) {
            if claims.get(&g.group).is_none_or(|(term, _)| g.term > *term) {
                claims.insert(g.group, (g.term, r.node));
            }
        }
    }
    claims.into_iter().map(|(g, (_, n))| (g, n)).collect()
}

async fn continue_after_pause(backoff: &mut Duration, timeout: Duration, started: Instant) {
    let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
    tokio::time::sleep((*backoff / 2 + jitter).min(timeout.saturating_sub(started.elapsed()))).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

fn unexpected(r: ClientReply) -> Error {
    Error::Request(RequestError::Internal(format!("unexpected reply {r:?}")))
}
