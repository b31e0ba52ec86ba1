//! The ringkv client: routes every key to its shard's leader over QUIC with mutual TLS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringkv_client::Error> {
//! use ringkv_client::{Client, ClientConfig};
//! let certs = ringkv_client::CertPaths {
//!     ca: "data/dev/certs/ca.pem".into(),
//!     cert: "data/dev/certs/client.pem".into(),
//!     key: "data/dev/certs/client.key".into(),
//! };
//! let client = Client::connect(ClientConfig::new(vec!["127.0.0.1:7101".into()], certs)).await?;
//! client.put(b"hello", b"world").await?;
//! assert_eq!(client.get(b"hello").await?, Some(b"world".to_vec()));
//! # Ok(()) }
//! ```
//!
//! The client caches the cluster map and each shard's leader; a `NotLeader` answer moves it to
//! the hinted leader, `StaleEpoch`/`WrongShard` refresh the map, and every call retries with
//! exponential backoff and jitter until its deadline.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ringkv_transport::RpcClient;
pub use ringkv_transport::{CertPaths, RpcError};
use ringkv_wire::{
    key_hash, ClientReply, ClientRequest, ClientResponse, ClusterMap, Epoch, GroupId, NodeId, NodeStatus, RequestError, ALPN_CLIENT,
};
pub use ringkv_wire::{ClusterMap as Map, NodeStatus as NodeReport};

/// Streams per connection to a node.
pub const CLIENT_LANES: usize = 2;
/// Largest frame the client sends or accepts.
pub const CLIENT_FRAME_BYTES_MAX: usize = 8 << 20;
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node refused the request for a reason retrying will not fix.
    #[error(transparent)]
    Request(RequestError),
    /// The deadline passed; `last` is the last failure seen.
    #[error("deadline of {deadline:?} exceeded; last error: {last}")]
    Deadline { deadline: Duration, last: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] ringkv_transport::TlsError),
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

pub struct Client {
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    config: ClientConfig,
    conns: DashMap<String, Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>>,
    map: RwLock<Arc<ClusterMap>>,
    leaders: DashMap<GroupId, NodeId>,
    /// Nodes that recently failed at the transport level, and when.
    suspects: DashMap<NodeId, Instant>,
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
        let quic = ringkv_transport::tls::client_config(&config.certs, ALPN_CLIENT)?;
        let bind: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Config(format!("cannot open a UDP socket: {e}")))?;
        Ok(Client {
            endpoint,
            quic,
            config,
            conns: DashMap::new(),
            map: RwLock::new(Arc::default()),
            leaders: DashMap::new(),
            suspects: DashMap::new(),
        })
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, RpcError> {
        let slot = self.conns.entry(addr.to_string()).or_default().clone();
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
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
        .map_err(|_| RpcError::Connect { addr: addr.into(), msg: "timed out".into() })??;
        let c = Arc::new(c);
        *g = Some(c.clone());
        Ok(c)
    }

    /// Sends one request to the node at `addr`, without routing or retries.
    pub async fn call_node(&self, addr: &str, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, RpcError> {
        let c = self.conn(addr).await?;
        let r = c.call(req, timeout).await;
        if matches!(r, Err(RpcError::ConnectionLost(_))) {
            self.conns.remove(addr);
        }
        r
    }

    /// Fetches the newest map any known node has.
    pub async fn refresh_map(&self) -> Result<Arc<ClusterMap>, Error> {
        let current = self.map();
        let mut addrs: Vec<String> = current.nodes.iter().map(|n| n.client_addr.clone()).collect();
        addrs.extend(self.config.seeds.iter().cloned());
        addrs.dedup();
        let mut last = String::from("no node answered");
        let mut best: Option<ClusterMap> = None;
        for a in addrs {
            match self.call_node(&a, &ClientRequest::GetMap, Duration::from_secs(2)).await {
                Ok(Ok(ClientReply::Map(m))) if m.is_bootstrapped() => {
                    if best.as_ref().is_none_or(|b| m.version > b.version) {
                        best = Some(m);
                    }
                    // Any bootstrapped map will do to route; stale entries are corrected by
                    // the nodes' StaleEpoch answers.
                    break;
                }
                Ok(Ok(_)) => last = format!("{a}: cluster not bootstrapped"),
                Ok(Err(e)) => last = format!("{a}: {e}"),
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        match best {
            Some(m) => {
                let m = Arc::new(m);
                if m.version >= current.version {
                    if let Ok(mut w) = self.map.write() {
                        *w = m.clone();
                    }
                }
                Ok(self.map())
            }
            None => Err(Error::Request(RequestError::Unavailable(last))),
        }
    }

    /// Routes a keyed request to its shard's leader, retrying until `deadline`.
    async fn keyed(&self, key: &[u8], make: impl Fn(GroupId, Epoch) -> ClientRequest, timeout: Duration) -> Result<ClientReply, Error> {
        let started = Instant::now();
        let hash = key_hash(key);
        let mut backoff = BACKOFF_START;
        let mut attempt = 0usize;
        let mut last = String::new();
        let mut failed: Vec<NodeId> = Vec::new();
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(Error::Deadline { deadline: timeout, last });
            }
            let mut map = self.map();
            if !map.is_bootstrapped() {
                match self.refresh_map().await {
                    Ok(m) => map = m,
                    Err(e) => {
                        last = e.to_string();
                        continue_after_pause(&mut backoff, timeout, started).await;
                        continue;
                    }
                }
            }
            let mut pause = true;
            if let Some(desc) = map.shard_for_hash(hash).cloned() {
                // The cached leader if any; otherwise the replicas in turn, skipping the one that
                // failed last (a deposed leader cut off from its quorum keeps claiming to lead).
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
                        healthy.get(attempt % healthy.len().max(1)).copied().unwrap_or(desc.replicas[0])
                    }
                };
                match map.node(target).map(|n| n.client_addr.clone()) {
                    None => {
                        self.leaders.remove(&desc.id);
                        last = format!("node {target} is not in the map");
                    }
                    Some(addr) => {
                        let t = remaining.min(self.config.attempt_timeout);
                        match self.call_node(&addr, &make(desc.id, desc.epoch), t).await {
                            Ok(Ok(reply)) => {
                                self.suspects.remove(&target);
                                self.leaders.insert(desc.id, target);
                                return Ok(reply);
                            }
                            Ok(Err(RequestError::NotLeader { leader, .. })) => {
                                last = format!("node {target} is not the leader of shard {}", desc.id);
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
                            Ok(Err(
                                e @ (RequestError::StaleEpoch { .. } | RequestError::WrongShard { .. } | RequestError::NotBootstrapped),
                            )) => {
                                last = e.to_string();
                                let _ = self.refresh_map().await;
                            }
                            Ok(Err(e)) if e.retryable() => {
                                self.leaders.remove(&desc.id);
                                failed.push(target);
                                last = e.to_string();
                            }
                            Ok(Err(e)) => return Err(Error::Request(e)),
                            Err(e) => {
                                self.leaders.remove(&desc.id);
                                self.suspects.insert(target, Instant::now());
                                failed.push(target);
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

    /// Reads `key` linearizably.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let key = key.to_vec();
        match self
            .keyed(&key, |shard, epoch| ClientRequest::Get { shard, epoch, key: key.clone(), stale: false }, self.config.timeout)
            .await?
        {
            ClientReply::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let (key, value) = (key.to_vec(), value.to_vec());
        match self
            .keyed(&key, |shard, epoch| ClientRequest::Put { shard, epoch, key: key.clone(), value: value.clone() }, self.config.timeout)
            .await?
        {
            ClientReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete(&self, key: &[u8]) -> Result<(), Error> {
        let key = key.to_vec();
        match self.keyed(&key, |shard, epoch| ClientRequest::Delete { shard, epoch, key: key.clone() }, self.config.timeout).await? {
            ClientReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `new` if its value is `expect` (`None`: the key is absent).
    pub async fn compare_and_swap(&self, key: &[u8], expect: Option<&[u8]>, new: &[u8]) -> Result<CasOutcome, Error> {
        let (key, expect, new) = (key.to_vec(), expect.map(|e| e.to_vec()), new.to_vec());
        let make = |shard, epoch| ClientRequest::Cas { shard, epoch, key: key.clone(), expect: expect.clone(), new: new.clone() };
        match self.keyed(&key, make, self.config.timeout).await? {
            ClientReply::Cas { swapped, current } => Ok(CasOutcome { swapped, current }),
            other => Err(unexpected(other)),
        }
    }

    /// Every node's report of its replicas; nodes that do not answer are left out.
    pub async fn node_reports(&self) -> Vec<Result<NodeStatus, String>> {
        let map = self.map();
        let mut out = Vec::new();
        for n in &map.nodes {
            out.push(match self.call_node(&n.client_addr, &ClientRequest::NodeStatus, Duration::from_secs(2)).await {
                Ok(Ok(ClientReply::NodeStatus(s))) => Ok(s),
                Ok(Ok(other)) => Err(format!("node {}: unexpected reply {other:?}", n.id)),
                Ok(Err(e)) => Err(format!("node {}: {e}", n.id)),
                Err(e) => Err(format!("node {}: {e}", n.id)),
            });
        }
        out
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

async fn continue_after_pause(backoff: &mut Duration, timeout: Duration, started: Instant) {
    let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
    tokio::time::sleep((*backoff / 2 + jitter).min(timeout.saturating_sub(started.elapsed()))).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

fn unexpected(r: ClientReply) -> Error {
    Error::Request(RequestError::Internal(format!("unexpected reply {r:?}")))
}
