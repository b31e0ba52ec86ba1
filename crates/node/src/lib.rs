//! The ringkv node: hosts shard replicas and (on the first nodes) the placement group, serves
//! the client and peer protocols, and exposes Prometheus metrics.

pub mod bootstrap;
pub mod config;
pub mod dev;
pub mod driver;
pub mod gateway;
pub mod lifecycle;
pub mod metrics_catalog;
pub mod node;
pub mod peer;
pub mod quiesce;
pub mod raft;
pub mod service;
pub mod snapshot;
pub mod status_http;

use std::sync::Arc;

use ringkv_storage::Db;
use ringkv_transport::rpc::{serve, serve_connection};
use ringkv_wire::{ClientRequest, ClientResponse, ALPN_CLIENT, ALPN_PEER};

use crate::raft::{PeerRequest, PeerResponse};

use config::CertPathsOf;
pub use config::NodeConfig;
pub use node::{Node, NodeError};

/// Slack above the largest key plus value for the rest of a client frame.
pub const CLIENT_FRAME_SLACK_BYTES: usize = 64 * 1024;

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
    config.persist()?;
    let durability = ringkv_storage::Durability {
        fsync: config.storage.fsync,
        group_commit_wait: std::time::Duration::from_micros(config.storage.group_commit_wait_us),
    };
    let db = Db::open_with(&config.data_dir.join("db"), durability)?;
    let certs = config.cert_paths();
    check_own_certificate(&config)?;
    let peer_server = ringkv_transport::tls::server_config(&certs, ALPN_PEER)?;
    let peer_client = ringkv_transport::tls::client_config(&certs, ALPN_PEER)?;
    let client_server = ringkv_transport::tls::server_config(&certs, ALPN_CLIENT)?;
    let peer_ep = node::bind(&config.peer_addr, peer_server)?;
    let client_ep = node::bind(&config.client_addr, client_server)?;
    let recorder = status_http::install_recorder().map_err(|e| NodeError::Bind(config.metrics_addr.clone(), std::io::Error::other(e)))?;
    let ops_node = Arc::new(std::sync::OnceLock::new());
    let ops = status_http::router(recorder, ops_node.clone());
    status_http::serve(&config.metrics_addr, ops.clone()).await?;
    let pool = Arc::new(peer::PeerPool::new(config.id, peer_ep.clone(), peer_client));
    let node = Node::new(config.clone(), db.clone(), pool.clone())?;
    let _ = ops_node.set(node.clone());
    let peer_svc = Arc::new(service::PeerService { node: node.clone() });
    pool.set_server(Box::new(move |conn| {
        tokio::spawn(serve_connection::<PeerRequest, PeerResponse, _>(
            conn,
            peer_svc.clone(),
            peer::PEER_FRAME_BYTES_MAX,
            &peer::PEER_LANE_PRIORITIES,
        ));
    }));
    node.start_registered().await?;
    // Accept peers before adopting the map, so groups can talk as soon as they exist.
    let peer_task = tokio::spawn(accept_peers(peer_ep.clone(), pool.clone(), node.shutdown.subscribe()));
    let client_frame = config.limits.key_bytes_max * 2 + config.limits.value_bytes_max * 2 + CLIENT_FRAME_SLACK_BYTES;
    let mut stop = node.shutdown.subscribe();
    let client_svc = Arc::new(service::ClientService::new(node.clone()));
    gateway::start(gateway::Api::new(node.clone(), client_svc.clone())?, ops).await?;
    let client_task = tokio::spawn(serve::<ClientRequest, ClientResponse, _>(
        client_ep.clone(),
        client_svc,
        client_frame,
        config.limits.client_connections_max,
        async move {
            let _ = stop.changed().await;
        },
    ));
    let map_task = tokio::spawn(node.clone().map_loop());
    let heartbeat_task = tokio::spawn(driver::heartbeat_loop(node.clone()));
    let executor_task = tokio::spawn(driver::executor_loop(node.clone()));
    let sessions_task = tokio::spawn(driver::session_expiry_loop(node.clone()));
    tokio::spawn(node.clone().disk_space_loop());
    tokio::spawn(node.clone().quiesce_loop());
    tokio::spawn(node.clone().drain_loop());
    tokio::spawn(node.clone().notify_service_manager());

    tracing::info!(id = config.id, peer = %config.peer_addr, client = %config.client_addr, "node up");
    tokio::pin!(shutdown);
    // The node may also stop on its own (`Node::fail`, e.g. a wiped data dir the cluster
    // refuses).
    let mut stopped = node.shutdown.subscribe();
    let stopped_on_its_own = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped_on_its_own);
    let mut failure = None;
    // Whether the node was asked to stop (rather than stopping on its own or failing to join).
    let mut asked = false;
    match Some(config.join.clone()).filter(|j| !j.is_empty() && !node.map().is_bootstrapped()) {
        Some(through) => tokio::select! {
            _ = &mut shutdown => asked = true,
            _ = &mut stopped_on_its_own => {}
            r = join(node.clone(), through) => match r {
                Ok(()) => tokio::select! {
                    _ = &mut shutdown => asked = true,
                    _ = &mut stopped_on_its_own => {}
                },
                Err(e) => failure = Some(e),
            },
        },
        None => tokio::select! {
            _ = &mut shutdown => asked = true,
            _ = &mut stopped_on_its_own => {}
        },
    }
    if asked {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        // Leaderships go to other replicas first, so a rolling restart fails no request. A
        // second SIGTERM or Ctrl-C cuts the drain short (as when a whole cluster stops).
        let drain = node.drain_before_stop(std::time::Duration::from_millis(config.lifecycle.drain_timeout_ms));
        let again = async {
            match stop_signals() {
                Ok(signal) => signal.await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = drain => {}
            _ = again => tracing::warn!("asked again to stop: not waiting for the drain"),
        }
    }
    tracing::info!("node stopping");
    node.stop().await;
    client_ep.close(0u32.into(), b"shutdown");
    peer_ep.close(0u32.into(), b"shutdown");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client_ep.wait_idle()).await;
    let _ = tokio::join!(peer_task, client_task, map_task, heartbeat_task, executor_task, sessions_task);
    db.shutdown();
    if let Some(why) = node.fatal() {
        return Err(NodeError::Fatal(why));
    }
    match failure {
        Some(e) => Err(NodeError::Join(e)),
        None => Ok(()),
    }
}

/// The next SIGTERM or SIGINT (Ctrl-C), caught from the moment this is called: a signal that
/// arrives while the node is still starting stops it once started, instead of killing it.
pub fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Refuses to start with a certificate that is not this node's: peers would take this node
/// for the one the certificate names.
pub fn check_own_certificate(config: &NodeConfig) -> Result<(), NodeError> {
    use ringkv_transport::tls::{caller_of_pem_file, Caller};
    let path = &config.tls.cert;
    match caller_of_pem_file(path)? {
        Caller::Node(id) if id == config.id => Ok(()),
        Caller::Node(id) => Err(NodeError::Certificate(format!(
            "{} is node {id}'s certificate, but this is node {}; issue one with `ringctl cert issue --node {}`",
            path.display(),
            config.id,
            config.id
        ))),
        Caller::Client(_) => Err(NodeError::Certificate(format!(
            "{} is a client certificate; a node needs its own (`ringctl cert issue --node {}`)",
            path.display(),
            config.id
        ))),
    }
}

/// How long a joining node keeps trying to reach the node it joins through.
pub const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Registers this (new) node with the cluster through any of `through` (members' client
/// addresses) and adopts the map that lists it. Retries until the cluster answers or
/// [`JOIN_TIMEOUT`] passes; a refusal is final.
pub(crate) async fn join(node: Arc<Node>, through: Vec<String>) -> Result<(), String> {
    use std::time::{Duration, Instant};
    let c = &node.config;
    let info = ringkv_wire::NodeInfo { state: ringkv_wire::NodeState::Joining, ..node.info() };
    let certs = c.cert_paths();
    let client = ringkv_client::Client::unrouted(ringkv_client::ClientConfig::new(through.clone(), certs))
        .map_err(|e| format!("cannot join through {through:?}: {e}"))?;
    let started = Instant::now();
    let req = ClientRequest::Join { node: info };
    for attempt in 0usize.. {
        let Some(addr) = through.get(attempt % through.len().max(1)) else { return Err("no address to join through".into()) };
        let why = match client.call_node(addr, &req, Duration::from_secs(15)).await {
            Ok(Ok(ringkv_wire::ClientReply::Map(map))) => {
                node.adopt_map(map).await.map_err(|e| format!("cannot join: {e}"))?;
                tracing::info!(through = %addr, "joined the cluster");
                return Ok(());
            }
            Ok(Err(e)) if !e.retryable() => return Err(format!("the cluster refused node {}: {e}", node.id())),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(other)) => format!("unexpected reply {other:?}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > JOIN_TIMEOUT {
            return Err(format!("cannot join through {addr} after {JOIN_TIMEOUT:?}: {why}"));
        }
        tracing::info!("waiting to join through {addr}: {why}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err("no address to join through".into())
}

/// Accepts peer connections; only certificates of nodes (`CN=node-ID`) are served here.
async fn accept_peers(ep: quinn::Endpoint, pool: Arc<peer::PeerPool>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                let pool = pool.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => match ringkv_transport::tls::peer_node_id(&conn) {
                            Some(id) => {
                                if let Err(e) = pool.adopt(id, conn, id).await {
                                    tracing::debug!("peer connection from node {id} failed: {e}");
                                }
                            }
                            None => {
                                metrics::counter!("ringkv_transport_handshake_failures_total").increment(1);
                                conn.close(3u32.into(), b"peer port needs a node certificate");
                            }
                        },
                        Err(e) => {
                            metrics::counter!("ringkv_transport_handshake_failures_total").increment(1);
                            tracing::debug!("incoming peer connection refused: {e}");
                        }
                    }
                });
            }
        }
    }
}
