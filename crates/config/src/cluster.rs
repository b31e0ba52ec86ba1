//! The cluster file `ringkv dev` writes (`cluster.json`): where each node of a local cluster
//! listens, where its data and the certificates are. `ringctl --cluster`, the benchmark harness
//! and the tests read it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConfigError;

use ringkv_wire::NodeId;

/// The file `ringkv dev` writes so `ringctl` and scripts can find the cluster.
pub const CLUSTER_FILE: &str = "cluster.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: NodeId,
    pub pid: Option<u32>,
    /// The peer address in the cluster map (what other nodes dial).
    pub peer_addr: String,
    /// The peer address the node listens on, when other nodes reach it through a proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
    pub client_addr: String,
    pub metrics_addr: String,
    /// The HTTP gateway (plaintext, loopback), if the node serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// The Redis-protocol gateway (plaintext, loopback), if the node serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp_addr: Option<String>,
    pub data_dir: PathBuf,
}

/// A cluster whose nodes run inside a network namespace, each on its own loopback address
/// `127.0.1.ID`, so a fault-test harness can cut links between them with firewall rules.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetnsLayout {
    /// The namespace's `ip netns` name.
    pub name: String,
    /// Node-to-node traffic goes through a proxy: a node advertises `127.0.2.ID:7100`, which
    /// the harness forwards to where it listens, `127.0.1.ID:7100`.
    pub proxied: bool,
}

impl NetnsLayout {
    pub const PEER_PORT: u16 = 7100;
    pub const CLIENT_PORT: u16 = 7200;
    pub const METRICS_PORT: u16 = 7300;
    pub const HTTP_PORT: u16 = 7400;
    pub const RESP_PORT: u16 = 7500;

    /// The address node `id` listens on.
    pub fn node_ip(id: NodeId) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(127, 0, 1, id as u8)
    }

    /// The address other nodes dial to reach node `id` when the cluster is proxied.
    pub fn proxy_ip(id: NodeId) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(127, 0, 2, id as u8)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertsEntry {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub nodes: Vec<NodeEntry>,
    pub certs: CertsEntry,
    /// Pid of the `ringkv dev` process running the cluster, which starts nodes `ringkv dev
    /// add-node` adds.
    #[serde(default)]
    pub supervisor: Option<u32>,
    /// Settings every node of the cluster gets on its first start (added nodes too).
    #[serde(default)]
    pub fault_injection: bool,
    #[serde(default)]
    pub extra_config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsLayout>,
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(_, why) => ConfigError::Parse(path.to_path_buf(), format!("not a cluster file: {why}")),
            other => other,
        })
    }

    /// Parses and checks a cluster file: node ids are unique and not 0, addresses are
    /// `host:port`.
    pub fn parse(text: &str) -> Result<ClusterFile, ConfigError> {
        let f: ClusterFile = serde_json::from_str(text).map_err(|e| ConfigError::Parse(PathBuf::from("<cluster file>"), e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for n in &f.nodes {
            if n.id == 0 || !seen.insert(n.id) {
                return Err(ConfigError::Invalid(format!("cluster file: node id {} is 0 or listed twice", n.id)));
            }
            for a in [Some(&n.peer_addr), n.peer_listen.as_ref(), Some(&n.client_addr), Some(&n.metrics_addr)].into_iter().flatten() {
                let port = a.rsplit_once(':').filter(|(host, _)| !host.is_empty()).and_then(|(_, p)| p.parse::<u16>().ok());
                if port.is_none() {
                    return Err(ConfigError::Invalid(format!("cluster file: node {}: `{a}` is not a host:port address", n.id)));
                }
            }
        }
        Ok(f)
    }
}
