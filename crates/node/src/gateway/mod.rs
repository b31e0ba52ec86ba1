//! The gateways: HTTP (`http`) and the Redis protocol (`resp`), for applications that cannot
//! link the Rust client.
//!
//! Both are thin adapters over [`Api`], the node's one request API for them: it authenticates
//! (a token, or a TLS client certificate of the cluster CA), checks the caller's role with the
//! same rule as the native protocol ([`ClientRequest::required_role`]), and sends the request
//! through an embedded smart client, which routes each key to its shard's leader (requests for
//! this node's own replicas are handed to the client service in-process, without QUIC), retries
//! within a deadline, and names every write with its session so a retry applies once. The
//! native protocol's checks (sizes, routing, epochs) then run where the request lands.

pub mod http;
pub mod resp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringkv_client::{CallOptions, CasOutcome, Client, ClientConfig, Error as ClientError, LocalNode};
use ringkv_transport::tls::Caller;
use ringkv_transport::Service;
use ringkv_wire::{ClientRequest, ClientResponse, KeyOp, RequestError, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::CertPathsOf;
use crate::node::{Node, NodeError};
use crate::service::ClientService;

/// How long one gateway request may take, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who sent a request, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// A token's name, or "certificate".
    pub name: String,
    /// The token's hash: checked again on each request, so a revoked token stops working on
    /// connections it opened.
    token_hash: Option<Vec<u8>>,
}

/// The node's own client service, as the embedded client's shortcut for local replicas.
struct Local {
    svc: Arc<ClientService>,
    me: u64,
}

impl LocalNode for Local {
    fn call(&self, req: ClientRequest) -> std::pin::Pin<Box<dyn std::future::Future<Output = ClientResponse> + Send>> {
        // The gateway checked the caller's role; the request runs as this node.
        self.svc.clone().call(Caller::Node(self.me), req)
    }
}

/// The request API both gateways use.
pub struct Api {
    pub node: Arc<Node>,
    client: Client,
}

/// A failed request as a gateway reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// A stable machine-readable code (`not_found`, `unauthorized`, `too_large`, ...).
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), retryable: false }
    }

    /// The HTTP status that fits the code.
    pub fn status(&self) -> u16 {
        match self.code {
            "bad_request" | "invalid" => 400,
            "unauthorized" => 401,
            "forbidden" => 403,
            "not_found" => 404,
            "precondition_failed" => 412,
            "too_large" => 413,
            "busy" => 429,
            "timeout" => 504,
            "internal" => 500,
            _ => 503,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new("unauthorized", "authentication required: a bearer token or a client certificate of the cluster CA")
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        let retryable = e.retryable();
        let code = match &e {
            RequestError::KeyTooLarge { .. } | RequestError::ValueTooLarge { .. } | RequestError::TooLarge(_) => "too_large",
            RequestError::Malformed(_) => "bad_request",
            RequestError::Invalid(_) => "invalid",
            RequestError::PermissionDenied { .. } => "forbidden",
            RequestError::NotPermitted(_) => "not_permitted",
            RequestError::Busy(_) => "busy",
            RequestError::Internal(_) => "internal",
            RequestError::DiskFull { .. } => "disk_full",
            _ => "unavailable",
        };
        ApiError { code, message: e.to_string(), retryable }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        match e {
            ClientError::Request(r) => r.into(),
            ClientError::Deadline { .. } => ApiError { code: "timeout", message: e.to_string(), retryable: true },
            other => ApiError { code: "unavailable", message: other.to_string(), retryable: other.retryable() },
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl Api {
    /// The API of `node`, whose client service handles requests for its own replicas.
    pub fn new(node: Arc<Node>, svc: Arc<ClientService>) -> Result<Arc<Api>, NodeError> {
        let c = &node.config;
        // The map lists this node by its advertised address: calls to it stay in the process.
        let own = c.advertised_client_addr().to_string();
        let mut cfg = ClientConfig::new(vec![own.clone()], c.cert_paths());
        cfg.timeout = REQUEST_TIMEOUT;
        let client = Client::unrouted(cfg).map_err(|e| NodeError::Certificate(e.to_string()))?;
        let me = node.id();
        let client = client.with_local(own, Arc::new(Local { svc, me }));
        Ok(Arc::new(Api { node, client }))
    }

    /// The principal a token names, if the cluster knows it.
    pub fn authenticate_token(&self, token: &str) -> Option<Principal> {
        let hash = ringkv_wire::auth::token_hash(token);
        let map = self.node.map();
        let t = map.tokens.iter().find(|t| t.hash == hash)?;
        Some(Principal { role: t.role, name: t.name.clone(), token_hash: Some(hash) })
    }

    /// The principal of a verified TLS client certificate.
    pub fn from_certificate(caller: Caller) -> Principal {
        Principal { role: caller.role(), name: caller.describe(), token_hash: None }
    }

    /// Whether `who` may still act: a token must not have been revoked since.
    pub fn still_valid(&self, who: &Principal) -> bool {
        match &who.token_hash {
            Some(h) => self.node.map().tokens.iter().any(|t| &t.hash == h),
            None => true,
        }
    }

    /// Refuses `who` a request that needs `needed` (the same rule as the native protocol).
    pub fn check(&self, who: &Principal, needed: Role, what: &str) -> ApiResult<()> {
        if !self.still_valid(who) {
            return Err(ApiError::new("unauthorized", format!("token `{}` was revoked", who.name)));
        }
        ringkv_wire::auth::authorize(who.role, needed, what, || format!("{} ({})", who.role, who.name)).map_err(ApiError::from)
    }

    fn limits(&self) -> &ringkv_config::Limits {
        &self.node.config.limits
    }

    /// Refuses an oversize key or value before it is sent anywhere (the node checks again).
    pub fn check_sizes(&self, key: &[u8], value: Option<&[u8]>) -> ApiResult<()> {
        crate::service::check_sizes(self.limits(), key, value).map_err(ApiError::from)
    }

    pub async fn get(&self, who: &Principal, key: &[u8], stale: bool) -> ApiResult<Option<Vec<u8>>> {
        self.check(who, Role::Read, "get")?;
        self.check_sizes(key, None)?;
        let o = CallOptions { stale, ..Default::default() };
        Ok(self.client.get_with(key, o).await?)
    }

    pub async fn put(&self, who: &Principal, key: &[u8], value: &[u8]) -> ApiResult<()> {
        self.check(who, Role::Write, "put")?;
        self.check_sizes(key, Some(value))?;
        Ok(self.client.put(key, value).await?)
    }

    pub async fn cas(&self, who: &Principal, key: &[u8], expect: Option<&[u8]>, new: &[u8]) -> ApiResult<CasOutcome> {
        self.check(who, Role::Write, "cas")?;
        self.check_sizes(key, Some(new))?;
        Ok(self.client.compare_and_swap(key, expect, new).await?)
    }

    /// A read-modify-write on the shard's state machine: increment, append, counted delete.
    pub async fn key_op(&self, who: &Principal, key: &[u8], op: KeyOp) -> ApiResult<i64> {
        self.check(who, Role::Write, "apply")?;
        self.check_sizes(key, if let KeyOp::Append(v) = &op { Some(v.as_slice()) } else { None })?;
        Ok(self.client.key_op(key, op, CallOptions::default()).await?)
    }

    pub async fn batch_get(&self, who: &Principal, keys: &[Vec<u8>], stale: bool) -> ApiResult<Vec<Option<Vec<u8>>>> {
        self.check(who, Role::Read, "batch_get")?;
        for k in keys {
            self.check_sizes(k, None)?;
        }
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let o = CallOptions { stale, ..Default::default() };
        self.client.batch_get(&refs, o).await.into_iter().map(|r| r.map_err(ApiError::from)).collect()
    }

    /// Writes every pair; one write per shard, so a failure may leave other shards' pairs
    /// written (each pair's own write is atomic).
    pub async fn batch_put(&self, who: &Principal, pairs: &[(Vec<u8>, Vec<u8>)]) -> ApiResult<()> {
        self.check(who, Role::Write, "batch_put")?;
        for (k, v) in pairs {
            self.check_sizes(k, Some(v))?;
        }
        let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        for r in self.client.batch_put(&refs, CallOptions::default()).await {
            r?;
        }
        Ok(())
    }

    pub async fn status(&self, who: &Principal) -> ApiResult<ringkv_client::report::Status> {
        self.check(who, Role::Read, "status")?;
        Ok(ringkv_client::report::status(&self.client).await?)
    }

    pub async fn shard(&self, who: &Principal, id: u64) -> ApiResult<ringkv_client::report::ShardDetail> {
        self.check(who, Role::Read, "status")?;
        ringkv_client::report::shard_detail(&self.client, id).await?.ok_or_else(|| ApiError::new("not_found", format!("no shard {id}")))
    }
}

/// A byte stream a gateway serves: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// One accepted gateway connection: its stream (which holds the connection's slot), where it
/// comes from, and the principal of its TLS client certificate if it presented one.
pub struct Accepted {
    pub stream: Slotted,
    pub peer: SocketAddr,
    pub certificate: Option<Principal>,
}

/// A stream holding one of the gateways' connection slots until it is dropped.
pub struct Slotted {
    io: Box<dyn Stream>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Binds `addr` and hands over every connection accepted there (after its TLS handshake, done
/// concurrently, when `tls` is set), within the shared connection `slots`: past them a new
/// connection is closed at once.
pub async fn listen(
    addr: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    slots: Arc<Semaphore>,
    what: &'static str,
) -> Result<(mpsc::Receiver<Accepted>, SocketAddr), NodeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| NodeError::Bind(addr.into(), e))?;
    let local = listener.local_addr().map_err(|e| NodeError::Bind(addr.into(), e))?;
    let (tx, rx) = mpsc::channel(1024);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("{what} gateway: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::counter!("ringkv_gateway_connections_refused_total", "gateway" => what).increment(1);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let accepted = match acceptor {
                    None => Accepted { stream: Slotted { io: Box::new(tcp), _slot: slot }, peer, certificate: None },
                    Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let certificate = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| ringkv_transport::tls::caller_of_cert(c))
                                .map(Api::from_certificate);
                            Accepted { stream: Slotted { io: Box::new(s), _slot: slot }, peer, certificate }
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("ringkv_gateway_handshake_failures_total", "gateway" => what).increment(1);
                            tracing::debug!("{what} gateway: TLS handshake with {peer} failed: {e}");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!("ringkv_gateway_handshake_failures_total", "gateway" => what).increment(1);
                            return;
                        }
                    },
                };
                let _ = tx.send(accepted).await;
            });
        }
    });
    Ok((rx, local))
}

/// Starts the gateways the configuration names.
pub async fn start(api: Arc<Api>, ops: axum::Router) -> Result<(), NodeError> {
    let c = &api.node.config;
    let slots = Arc::new(Semaphore::new(c.gateway.connections_max));
    let certs = c.cert_paths();
    if let Some(addr) = c.http_addr.clone() {
        let tls = if c.gateway.tls { Some(ringkv_transport::tls::tcp_server_config(&certs, &[b"http/1.1"])?) } else { None };
        let (rx, local) = listen(&addr, tls, slots.clone(), "http").await?;
        tokio::spawn(http::serve(api.clone(), rx, local, ops));
        tracing::info!(%addr, tls = c.gateway.tls, "HTTP gateway up");
    }
    if let Some(addr) = c.resp_addr.clone() {
        let tls = if c.gateway.tls { Some(ringkv_transport::tls::tcp_server_config(&certs, &[])?) } else { None };
        let (rx, _) = listen(&addr, tls, slots, "resp").await?;
        tokio::spawn(resp::serve(api.clone(), rx));
        tracing::info!(%addr, tls = c.gateway.tls, "Redis gateway up");
    }
    Ok(())
}
