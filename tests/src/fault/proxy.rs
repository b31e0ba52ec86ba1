//! A userspace UDP proxy between the nodes of a namespaced cluster, for the faults the kernel's
//! `tc` cannot add here: delay (which also reorders) and loss.
//!
//! Node B advertises `127.0.2.B:7100` and listens on `127.0.1.B:7100`. The proxy listens on the
//! advertised address and forwards what node A sends there from a socket bound to A's own
//! address, so the firewall rules between `127.0.1.A` and `127.0.1.B` still cut the link;
//! B's answers come back the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;
use ringkv_node::dev::NetnsLayout;
use ringkv_wire::NodeId;
use tokio::net::UdpSocket;

/// What the proxy does to every packet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFaults {
    /// Each packet waits a uniform random time in this range (milliseconds).
    pub delay_ms: (u64, u64),
    /// Probability of dropping a packet.
    pub loss: f64,
}

#[derive(Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub delayed: AtomicU64,
}

pub struct Proxy {
    faults: Arc<RwLock<LinkFaults>>,
    pub stats: Arc<ProxyStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn peer(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, NetnsLayout::PEER_PORT))
}

/// Sends `buf` to `to` through `sock`, after the configured delay, unless it is lost.
fn forward(sock: &Arc<UdpSocket>, buf: &[u8], to: SocketAddr, faults: &RwLock<LinkFaults>, stats: &Arc<ProxyStats>) {
    let f = faults.read().map(|f| *f).unwrap_or_default();
    let mut rng = rand::thread_rng();
    if f.loss > 0.0 && rng.gen_bool(f.loss.min(1.0)) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if f.delay_ms.1 == 0 {
        // A full socket buffer drops the packet, as a busy link would; it is counted as lost.
        let counter = if sock.try_send_to(buf, to).is_ok() { &stats.forwarded } else { &stats.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    stats.delayed.fetch_add(1, Ordering::Relaxed);
    let wait = Duration::from_millis(rng.gen_range(f.delay_ms.0..=f.delay_ms.1.max(f.delay_ms.0)));
    let (sock, buf) = (sock.clone(), buf.to_vec());
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let _ = sock.send_to(&buf, to).await;
    });
}

impl Proxy {
    /// Proxies every pair of nodes with ids in `1..=max_node` (nodes that join later included).
    /// Must run inside the cluster's namespace.
    pub async fn start(max_node: NodeId) -> anyhow::Result<Proxy> {
        let faults = Arc::new(RwLock::new(LinkFaults::default()));
        let stats = Arc::new(ProxyStats::default());
        let mut tasks = Vec::new();
        for b in 1..=max_node {
            let listener = Arc::new(UdpSocket::bind(peer(NetnsLayout::proxy_ip(b))).await?);
            // One upstream socket per sender, bound to the sender's own address.
            let mut upstream: BTreeMap<std::net::IpAddr, Arc<UdpSocket>> = BTreeMap::new();
            for a in (1..=max_node).filter(|a| *a != b) {
                let sock = Arc::new(UdpSocket::bind(SocketAddr::from((NetnsLayout::node_ip(a), 0))).await?);
                upstream.insert(NetnsLayout::node_ip(a).into(), sock.clone());
                // B's packets to A come back through the listener, from B's advertised address.
                let (l, f, s, to_a) = (listener.clone(), faults.clone(), stats.clone(), peer(NetnsLayout::node_ip(a)));
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        // Errors (an ICMP answer from a stopped node) are not fatal.
                        if let Ok((n, _)) = sock.recv_from(&mut buf).await {
                            forward(&l, &buf[..n], to_a, &f, &s);
                        }
                    }
                }));
            }
            let (f, s, to_b) = (faults.clone(), stats.clone(), peer(NetnsLayout::node_ip(b)));
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((n, from)) = listener.recv_from(&mut buf).await else { continue };
                    if let Some(up) = upstream.get(&from.ip()) {
                        forward(up, &buf[..n], to_b, &f, &s);
                    }
                }
            }));
        }
        Ok(Proxy { faults, stats, tasks })
    }

    pub fn set(&self, f: LinkFaults) {
        if let Ok(mut g) = self.faults.write() {
            *g = f;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
