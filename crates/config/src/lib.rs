//! The node's configuration: a TOML file, flags over it, and the identity kept in the data dir.
//!
//! The first start takes the node id, addresses and certificate paths from flags (or `--config`)
//! and writes them to `DATA_DIR/node.toml`; a restart needs only `--data-dir`. Flags given on a
//! restart override the stored values, except the node id, which a data dir keeps for life.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod cluster;

/// Name of the identity file inside the data dir.
pub const IDENTITY_FILE: &str = "node.toml";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    /// Address of the node-to-node QUIC endpoint (Raft traffic).
    pub peer_addr: String,
    /// The peer address other nodes dial, when it differs from `peer_addr` (behind NAT, a proxy
    /// or a port mapping). Defaults to `peer_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_peer_addr: Option<String>,
    /// Address of the client QUIC endpoint.
    pub client_addr: String,
    /// The client address clients and other nodes dial, when it differs from `client_addr`
    /// (a wildcard bind, NAT, a port mapping). Defaults to `client_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_client_addr: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_addr: String,
    /// The metrics address the map lists, when it differs from `metrics_addr`. Defaults to
    /// `metrics_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_metrics_addr: Option<String>,
    /// Address of the HTTP gateway (`/v1/kv/{key}`; also `/livez`, `/readyz`, `/metrics`).
    /// None: no HTTP gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Address of the Redis-protocol gateway. None: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp_addr: Option<String>,
    #[serde(default)]
    pub gateway: GatewayConfig,
    pub tls: TlsConfig,
    /// Peer addresses to ask for the cluster map until this node has one of its own.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Members' client addresses to join an existing cluster through, tried in turn, on the
    /// first start (ignored once the node has the cluster map). TOML takes one address or a
    /// list.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "one_or_many")]
    pub join: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Lets `SetPartition` requests (from an admin) cut this node off from chosen peers. Tests
    /// only. Never written to the identity file: it holds for the run that asked for it.
    #[serde(default, skip_serializing)]
    pub fault_injection: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// Client connections a node serves at once; past it a new connection is answered `Busy`.
    pub client_connections_max: usize,
    /// Client requests a node works on at once; past it a request is answered `Busy`.
    pub client_requests_in_flight_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: ringkv_wire::KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: ringkv_wire::VALUE_BYTES_MAX_DEFAULT,
            client_connections_max: 4096,
            client_requests_in_flight_max: 16384,
        }
    }
}

/// The HTTP and Redis gateways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Serve both gateways over TLS with the node's certificate (clients trust the cluster
    /// CA; a client certificate of the CA is taken as the role it names, else a token is asked).
    pub tls: bool,
    /// Let a gateway without TLS bind to an address other than loopback (tokens then cross the
    /// network in the clear).
    pub plaintext_off_loopback: bool,
    /// Gateway connections a node serves at once (both gateways together); past it new ones
    /// are closed at once.
    pub connections_max: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig { tls: false, plaintext_off_loopback: false, connections_max: 10_000 }
    }
}

/// Whether `addr` (`host:port`) names a loopback address.
pub fn is_loopback_addr(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Fsync the write-ahead log before acknowledging a write. Turning it off trades the
    /// durability of acknowledged writes across power loss (not process crashes) for speed.
    pub fsync: bool,
    /// Free bytes the node keeps on its data dir's filesystem: below this, it refuses client
    /// writes (`DiskFull`) and serves reads, so replication, snapshots and compactions still
    /// have room and nothing acknowledged is at risk. Writes are taken again once space is freed.
    pub reserve_bytes: u64,
    /// While Raft appends arrive concurrently, a WAL sync waits up to this long (µs) after the
    /// first append of a round for more to share it: fewer syncs (CPU) for a little latency
    /// under load. One write at a time never waits. 0: sync at once.
    pub group_commit_wait_us: u64,
}

/// Largest `storage.group_commit_wait_us` accepted.
pub const GROUP_COMMIT_WAIT_US_MAX: u64 = 10_000;

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { fsync: true, reserve_bytes: 512 << 20, group_commit_wait_us: 1000 }
    }
}

/// Starting and stopping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lifecycle {
    /// On SIGTERM the node hands its leaderships to other replicas before it stops, for at most
    /// this long (a service manager's stop timeout must be longer).
    pub drain_timeout_ms: u64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { drain_timeout_ms: 10_000 }
    }
}

/// Raft timers. Many groups share a node, so they are slower than a single-group default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot (and allow purging the log) after this many applied entries.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot, so a briefly lagging follower catches up from the log.
    pub logs_kept_after_snapshot: u64,
    /// A client that wrote nothing to a shard for this long (as its leader measures, cut in
    /// the log) has its session there forgotten: a retry of its writes from before then is no
    /// longer recognized.
    pub session_expiry_secs: u64,
    /// How a leader confirms it still leads before a linearizable read.
    pub read_policy: ReadPolicy,
    /// A busy group's replicas stop their timers (about 20 ticks a second each): a follower
    /// while it hears its leader, a leader while its followers acknowledge its appends. One
    /// node-wide loop starts a timer again once that stops, before an election timeout could
    /// expire (failover takes as long as with the timers running).
    pub rest_timers: bool,
    /// A commit index with no new entries to ride along waits up to this long for the group's
    /// next append and goes with it, instead of in an append of its own (0: sent at once).
    /// Followers learn of commits (and apply) up to this much later, so stale reads served by
    /// followers may lag that much more; leaders, their clients and leases do not wait for it.
    /// Capped at `heartbeat_interval_ms`.
    pub commit_linger_ms: u64,
    /// Raft messages of different groups bound for the same node at the same moment leave in
    /// one peer frame and come back in one answer, instead of a frame and an answer each.
    pub batch_messages: bool,
}

/// How a leader confirms it still leads before a linearizable read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPolicy {
    /// Serve at once while the leader's lease holds (a quorum acknowledged it within the lease,
    /// which followers honour by refusing votes), else fall back to `read_index`. Assumes the
    /// nodes' clocks run at nearly the same rate: a clock that runs fast on a follower by more
    /// than the lease margin could let it elect while the old leader still serves.
    #[default]
    Lease,
    /// Confirm leadership with a heartbeat round to a quorum before every read.
    ReadIndex,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 1000,
            session_expiry_secs: 3600,
            read_policy: ReadPolicy::Lease,
            rest_timers: true,
            commit_linger_ms: 50,
            batch_messages: true,
        }
    }
}

/// Values from flags; `None` leaves the file's (or stored) value alone.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub id: Option<u64>,
    pub peer_addr: Option<String>,
    pub advertise_peer_addr: Option<String>,
    pub client_addr: Option<String>,
    pub advertise_client_addr: Option<String>,
    pub metrics_addr: Option<String>,
    pub advertise_metrics_addr: Option<String>,
    pub http_addr: Option<String>,
    pub resp_addr: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub seeds: Option<Vec<String>>,
    pub join: Option<Vec<String>>,
    pub fault_injection: Option<bool>,
}

/// A setting that takes one address or a list of them (`join = "a:1"`, `join = ["a:1", "b:1"]`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "an address (HOST:PORT) or a list of addresses")]
enum Addrs {
    One(String),
    Many(Vec<String>),
}

impl From<Addrs> for Vec<String> {
    fn from(a: Addrs) -> Vec<String> {
        match a {
            Addrs::One(a) => vec![a],
            Addrs::Many(v) => v,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Addrs::deserialize(d).map(Vec::from)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("missing setting `{0}` (first start of a node needs it as a flag or in --config)")]
    Missing(&'static str),
    #[error("data dir {dir} belongs to node {stored}, not node {given}")]
    IdMismatch { dir: PathBuf, stored: u64, given: u64 },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// A partial configuration as read from a TOML file (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialConfig {
    id: Option<u64>,
    /// Written to the identity file for operators to read; the `--data-dir` flag decides.
    #[allow(dead_code)]
    data_dir: Option<PathBuf>,
    peer_addr: Option<String>,
    advertise_peer_addr: Option<String>,
    client_addr: Option<String>,
    advertise_client_addr: Option<String>,
    metrics_addr: Option<String>,
    advertise_metrics_addr: Option<String>,
    http_addr: Option<String>,
    resp_addr: Option<String>,
    gateway: Option<GatewayConfig>,
    tls: Option<TlsConfig>,
    seeds: Option<Vec<String>>,
    join: Option<Addrs>,
    limits: Option<Limits>,
    raft: Option<RaftTuning>,
    storage: Option<StorageConfig>,
    lifecycle: Option<Lifecycle>,
    fault_injection: Option<bool>,
}

/// A configuration file as a TOML table, checked on its own (so an unknown key or a bad value is
/// reported with the file that holds it).
fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
    parse_partial(&text, path)?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
}

/// Lays `over` onto `base` key by key, into sections too: a file that sets only
/// `[raft] heartbeat_interval_ms` changes that key and keeps every other one.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn parse_partial(text: &str, path: &Path) -> Result<PartialConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
}

impl NodeConfig {
    /// Resolves the configuration: the stored identity, then `--config`, then flags.
    pub fn resolve(data_dir: &Path, file: Option<&Path>, o: Overrides) -> Result<NodeConfig, ConfigError> {
        let identity = data_dir.join(IDENTITY_FILE);
        let mut table = if identity.exists() { read_table(&identity)? } else { toml::Table::new() };
        // Fault injection holds only for a run whose flags or --config ask for it (an identity
        // file written by an older version may still name it).
        table.remove("fault_injection");
        let stored_id = table.get("id").and_then(|v| v.as_integer()).map(|i| i as u64);
        if let Some(f) = file {
            merge(&mut table, read_table(f)?);
        }
        let mut p: PartialConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(file.map(Path::to_path_buf).unwrap_or(identity.clone()), e.to_string()))?;
        macro_rules! flag { ($($k:ident),*) => { $( if o.$k.is_some() { p.$k = o.$k; } )* } }
        flag!(
            id,
            peer_addr,
            advertise_peer_addr,
            client_addr,
            advertise_client_addr,
            metrics_addr,
            advertise_metrics_addr,
            http_addr,
            resp_addr,
            seeds,
            fault_injection
        );
        if let Some(j) = o.join {
            p.join = Some(Addrs::Many(j));
        }
        if o.ca.is_some() || o.cert.is_some() || o.key.is_some() {
            let t = p.tls.take();
            let pick = |flag: Option<PathBuf>, old: Option<PathBuf>, name| flag.or(old).ok_or(ConfigError::Missing(name));
            p.tls = Some(TlsConfig {
                ca: pick(o.ca, t.as_ref().map(|t| t.ca.clone()), "ca")?,
                cert: pick(o.cert, t.as_ref().map(|t| t.cert.clone()), "cert")?,
                key: pick(o.key, t.as_ref().map(|t| t.key.clone()), "key")?,
            });
        }
        Self::finish(data_dir, p, stored_id)
    }

    /// A whole configuration from TOML text alone, as a first start with `--config` and no
    /// flags would read it (also what the config fuzz target feeds).
    pub fn from_toml(data_dir: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        Self::finish(data_dir, parse_partial(text, Path::new("<config>"))?, None)
    }

    fn finish(data_dir: &Path, p: PartialConfig, stored_id: Option<u64>) -> Result<NodeConfig, ConfigError> {
        let id = p.id.ok_or(ConfigError::Missing("id"))?;
        if let Some(stored) = stored_id {
            if stored != id {
                return Err(ConfigError::IdMismatch { dir: data_dir.to_path_buf(), stored, given: id });
            }
        }
        if id == 0 {
            return Err(ConfigError::Invalid("node id 0 is reserved".into()));
        }
        let cfg = NodeConfig {
            id,
            data_dir: data_dir.to_path_buf(),
            peer_addr: p.peer_addr.ok_or(ConfigError::Missing("peer-addr"))?,
            advertise_peer_addr: p.advertise_peer_addr,
            advertise_client_addr: p.advertise_client_addr,
            advertise_metrics_addr: p.advertise_metrics_addr,
            client_addr: p.client_addr.ok_or(ConfigError::Missing("client-addr"))?,
            metrics_addr: p.metrics_addr.ok_or(ConfigError::Missing("metrics-addr"))?,
            http_addr: p.http_addr,
            resp_addr: p.resp_addr,
            gateway: p.gateway.unwrap_or_default(),
            tls: p.tls.ok_or(ConfigError::Missing("ca/cert/key"))?,
            seeds: p.seeds.unwrap_or_default(),
            join: p.join.map(Vec::from).unwrap_or_default(),
            limits: p.limits.unwrap_or_default(),
            raft: p.raft.unwrap_or_default(),
            storage: p.storage.unwrap_or_default(),
            lifecycle: p.lifecycle.unwrap_or_default(),
            fault_injection: p.fault_injection.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The client address the map lists: `advertise_client_addr`, else `client_addr`.
    pub fn advertised_client_addr(&self) -> &str {
        self.advertise_client_addr.as_deref().unwrap_or(&self.client_addr)
    }

    /// The metrics address the map lists: `advertise_metrics_addr`, else `metrics_addr`.
    pub fn advertised_metrics_addr(&self) -> &str {
        self.advertise_metrics_addr.as_deref().unwrap_or(&self.metrics_addr)
    }

    /// The peer address other nodes dial: `advertise_peer_addr`, else `peer_addr`.
    pub fn advertised_peer_addr(&self) -> &str {
        self.advertise_peer_addr.as_deref().unwrap_or(&self.peer_addr)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, a) in [("peer_addr", &self.peer_addr), ("client_addr", &self.client_addr), ("metrics_addr", &self.metrics_addr)] {
            ringkv_wire::check_addr(a, false).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
        }
        for (name, a) in [("http_addr", &self.http_addr), ("resp_addr", &self.resp_addr)] {
            let Some(a) = a else { continue };
            ringkv_wire::check_addr(a, false).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            if !self.gateway.tls && !self.gateway.plaintext_off_loopback && !is_loopback_addr(a) {
                return Err(ConfigError::Invalid(format!(
                    "{name} {a}: a gateway without TLS binds to loopback only; set [gateway] tls = true (or plaintext_off_loopback = true)"
                )));
            }
        }
        if self.gateway.connections_max == 0 {
            return Err(ConfigError::Invalid("gateway.connections_max must be at least 1".into()));
        }
        for (what, bound, advertised) in [
            ("peer", &self.peer_addr, &self.advertise_peer_addr),
            ("client", &self.client_addr, &self.advertise_client_addr),
            ("metrics", &self.metrics_addr, &self.advertise_metrics_addr),
        ] {
            match advertised {
                Some(a) => ringkv_wire::check_addr(a, true).map_err(|e| ConfigError::Invalid(format!("advertise_{what}_addr: {e}")))?,
                // A wildcard bind would put an address nobody can dial into the map.
                None if bound.parse::<std::net::SocketAddr>().is_ok_and(|s| s.ip().is_unspecified()) => {
                    return Err(ConfigError::Invalid(format!(
                        "{what}_addr {bound} binds every interface, which other nodes cannot dial; set advertise_{what}_addr to the address they should use"
                    )))
                }
                None => {}
            }
        }
        for j in &self.join {
            ringkv_wire::check_addr(j, true).map_err(|e| ConfigError::Invalid(format!("join: {e}")))?;
        }
        for s in &self.seeds {
            ringkv_wire::check_addr(s, true).map_err(|e| ConfigError::Invalid(format!("seeds: {e}")))?;
        }
        let l = &self.limits;
        if l.key_bytes_max == 0 || l.value_bytes_max == 0 || l.client_connections_max == 0 || l.client_requests_in_flight_max == 0 {
            return Err(ConfigError::Invalid("limits must be positive".into()));
        }
        if self.storage.group_commit_wait_us > GROUP_COMMIT_WAIT_US_MAX {
            return Err(ConfigError::Invalid(format!(
                "storage.group_commit_wait_us is {}; at most {GROUP_COMMIT_WAIT_US_MAX} (every write under load waits up to it)",
                self.storage.group_commit_wait_us
            )));
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0
            || r.election_timeout_min_ms <= r.heartbeat_interval_ms
            || r.election_timeout_max_ms <= r.election_timeout_min_ms
        {
            return Err(ConfigError::Invalid("raft timers need 0 < heartbeat < election min < election max".into()));
        }
        if r.session_expiry_secs == 0 {
            return Err(ConfigError::Invalid("raft.session_expiry_secs must be at least 1".into()));
        }
        Ok(())
    }

    /// Writes the identity file so a restart needs only `--data-dir`.
    pub fn persist(&self) -> Result<(), ConfigError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|e| ConfigError::Io(self.data_dir.clone(), e))?;
        let path = self.data_dir.join(IDENTITY_FILE);
        let tmp = path.with_extension("toml.tmp");
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Synced before and after the rename: a power loss leaves the old file or the new one,
        // never an empty one.
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|e| ConfigError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ConfigError::Io(path.clone(), e))?;
        std::fs::File::open(&self.data_dir).and_then(|d| d.sync_all()).map_err(|e| ConfigError::Io(self.data_dir.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_start(dir: &Path) -> Overrides {
        Overrides {
            id: Some(4),
            peer_addr: Some("127.0.0.1:7004".into()),
            client_addr: Some("127.0.0.1:7104".into()),
            metrics_addr: Some("127.0.0.1:9104".into()),
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join("n.pem")),
            key: Some(dir.join("n.key")),
            ..Default::default()
        }
    }

    #[test]
    fn identity_persists_and_flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let cfg = NodeConfig::resolve(&data, None, first_start(dir.path())).expect("first start");
        cfg.persist().expect("persist");
        let again = NodeConfig::resolve(&data, None, Overrides::default()).expect("restart with --data-dir alone");
        assert_eq!(again, cfg);
        let file = dir.path().join("ringkv.toml");
        std::fs::write(&file, "client_addr = \"127.0.0.1:8000\"\n[limits]\nkey_bytes_max = 100\nvalue_bytes_max = 1000\n").expect("write");
        let o = Overrides { client_addr: Some("127.0.0.1:8001".into()), ..Default::default() };
        let c = NodeConfig::resolve(&data, Some(&file), o).expect("file and flag");
        assert_eq!(c.client_addr, "127.0.0.1:8001", "flag beats file");
        assert_eq!(c.limits.key_bytes_max, 100, "file beats stored identity");
        let o = Overrides { id: Some(5), ..Default::default() };
        assert!(matches!(NodeConfig::resolve(&data, None, o), Err(ConfigError::IdMismatch { stored: 4, given: 5, .. })));
    }

    /// `join` takes one address (as files of earlier versions and hand-written configs say) or
    /// a list; the flag takes a comma-separated list (clap splits it); all survive a restart.
    #[test]
    fn join_takes_one_address_or_a_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, (text, want)) in [
            ("join = \"10.0.0.1:7101\"\n", vec!["10.0.0.1:7101"]),
            ("join = [\"10.0.0.1:7101\", \"10.0.0.2:7101\"]\n", vec!["10.0.0.1:7101", "10.0.0.2:7101"]),
            ("", vec![]),
        ]
        .into_iter()
        .enumerate()
        {
            let data = dir.path().join(format!("d{i}"));
            let file = dir.path().join(format!("j{i}.toml"));
            std::fs::write(&file, text).expect("write");
            let cfg = NodeConfig::resolve(&data, Some(&file), first_start(dir.path())).expect("first start");
            assert_eq!(cfg.join, want, "{text}");
            cfg.persist().expect("persist");
            let again = NodeConfig::resolve(&data, None, Overrides::default()).expect("restart");
            assert_eq!(again.join, want, "after a restart: {text}");
        }
        let o = Overrides { join: Some(vec!["10.0.0.3:7101".into(), "10.0.0.4:7101".into()]), ..first_start(dir.path()) };
        let file = dir.path().join("j0.toml");
        let cfg = NodeConfig::resolve(&dir.path().join("flag"), Some(&file), o).expect("flag");
        assert_eq!(cfg.join, ["10.0.0.3:7101", "10.0.0.4:7101"], "the flag beats the file");
    }

    /// A wildcard bind needs an advertised address: the map must list one other nodes can dial.
    #[test]
    fn a_wildcard_bind_needs_an_advertised_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let wild = |o: Overrides| NodeConfig::resolve(&data, None, o).map_err(|e| e.to_string());
        let o = Overrides { client_addr: Some("0.0.0.0:7104".into()), ..first_start(dir.path()) };
        let e = wild(o.clone()).expect_err("wildcard client bind without an advertised address");
        assert!(e.contains("client_addr 0.0.0.0:7104 binds every interface") && e.contains("advertise_client_addr"), "{e}");
        let e = wild(Overrides { peer_addr: Some("[::]:7004".into()), ..first_start(dir.path()) }).expect_err("wildcard peer bind");
        assert!(e.contains("advertise_peer_addr"), "{e}");
        let c = wild(Overrides { advertise_client_addr: Some("db4.example:7104".into()), ..o }).expect("advertised");
        assert_eq!((c.client_addr.as_str(), c.advertised_client_addr()), ("0.0.0.0:7104", "db4.example:7104"));
        assert_eq!(c.advertised_metrics_addr(), c.metrics_addr, "no advertised metrics address: the bound one");
    }

    #[test]
    fn fault_injection_holds_only_for_the_run_that_asks_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let o = Overrides { fault_injection: Some(true), ..first_start(dir.path()) };
        let cfg = NodeConfig::resolve(&data, None, o).expect("first start");
        assert!(cfg.fault_injection);
        cfg.persist().expect("persist");
        let text = std::fs::read_to_string(data.join(IDENTITY_FILE)).expect("identity");
        assert!(!text.contains("fault_injection"), "persisted: {text}");
        // Even an identity file that names it (written by an older version) does not turn it on.
        std::fs::write(data.join(IDENTITY_FILE), format!("fault_injection = true\n{text}")).expect("write");
        let again = NodeConfig::resolve(&data, None, Overrides::default()).expect("restart");
        assert!(!again.fault_injection, "fault injection survived a restart without the flag");
        let flagged = NodeConfig::resolve(&data, None, Overrides { fault_injection: Some(true), ..Default::default() }).expect("flag");
        assert!(flagged.fault_injection);
    }

    /// A `--config` with part of a section changes only the keys it names; the stored
    /// identity keeps the rest (not the defaults).
    #[test]
    fn a_partial_section_changes_only_its_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = dir.path().join("first.toml");
        std::fs::write(&first, "[raft]\nheartbeat_interval_ms = 100\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 1000\n")
            .expect("write");
        let cfg = NodeConfig::resolve(&data, Some(&first), first_start(dir.path())).expect("first start");
        cfg.persist().expect("persist");
        let file = dir.path().join("partial.toml");
        std::fs::write(&file, "[raft]\nheartbeat_interval_ms = 50\n").expect("write");
        let c = NodeConfig::resolve(&data, Some(&file), Overrides::default()).expect("partial section");
        assert_eq!(c.raft.heartbeat_interval_ms, 50);
        assert_eq!((c.raft.election_timeout_min_ms, c.raft.election_timeout_max_ms), (500, 1000), "the rest of [raft] kept");
        assert_eq!(c.client_addr, cfg.client_addr);
        assert_eq!(c.limits, cfg.limits);
    }

    /// Each kind of bad setting is refused before the node starts, naming what is wrong.
    #[test]
    fn bad_settings_in_sections_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            ("[raft]\nheartbeat = 5\n", "heartbeat"),
            ("[limits]\nkey_bytes_max = 0\n", "limits must be positive"),
            ("[raft]\nheartbeat_interval_ms = 500\nelection_timeout_min_ms = 400\n", "raft"),
            ("join = \"nowhere\"\n", "join: `nowhere` is not HOST:PORT"),
            ("join = [\"10.0.0.1:7101\", \"nowhere\"]\n", "join: `nowhere` is not HOST:PORT"),
            ("join = 7101\n", "an address (HOST:PORT) or a list of addresses"),
            ("seeds = [\"db_1:7001\"]\n", "seeds: `db_1:7001`"),
            ("advertise_peer_addr = \"10.0.0.1\"\n", "advertise_peer_addr"),
            ("advertise_metrics_addr = \"0.0.0.0:9100\"\n", "advertise_metrics_addr: `0.0.0.0:9100` is the unspecified address"),
            ("[raft]\nheartbeat_interval_ms = \"fast\"\n", "heartbeat_interval_ms"),
            ("client_addr = [1, 2]\n", "client_addr"),
            ("http_addr = \"10.0.0.5:8080\"\n", "http_addr 10.0.0.5:8080: a gateway without TLS binds to loopback only"),
            ("resp_addr = \"0.0.0.0:6379\"\n", "resp_addr 0.0.0.0:6379"),
            ("[gateway]\nconnections_max = 0\n", "gateway.connections_max"),
            ("[storage]\ngroup_commit_wait_us = 20000\n", "storage.group_commit_wait_us is 20000; at most 10000"),
        ];
        for (i, (text, expect)) in cases.iter().enumerate() {
            let file = dir.path().join(format!("bad{i}.toml"));
            std::fs::write(&file, text).expect("write");
            let e = NodeConfig::resolve(&dir.path().join(format!("d{i}")), Some(&file), first_start(dir.path()))
                .expect_err(&format!("{text:?} is refused"));
            assert!(e.to_string().contains(expect), "{text:?}: {e}");
        }
    }

    #[test]
    fn gateways_bind_off_loopback_only_with_tls_or_when_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, text) in [
            "http_addr = \"10.0.0.5:8080\"\n[gateway]\ntls = true\n",
            "resp_addr = \"0.0.0.0:6379\"\n[gateway]\nplaintext_off_loopback = true\n",
            "http_addr = \"127.0.0.1:8080\"\nresp_addr = \"[::1]:6379\"\n",
        ]
        .iter()
        .enumerate()
        {
            let file = dir.path().join(format!("ok{i}.toml"));
            std::fs::write(&file, text).expect("write");
            NodeConfig::resolve(&dir.path().join(format!("d{i}")), Some(&file), first_start(dir.path())).expect(text);
        }
        assert!(is_loopback_addr("localhost:1") && is_loopback_addr("127.0.0.9:1") && !is_loopback_addr("db1:1"));
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = first_start(dir.path());
        o.peer_addr = Some("not-an-address".into());
        let e = NodeConfig::resolve(&dir.path().join("d"), None, o).expect_err("bad address");
        assert!(e.to_string().contains("peer_addr"), "{e}");
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "idd = 3\n").expect("write");
        let e = NodeConfig::resolve(&dir.path().join("d"), Some(&file), first_start(dir.path())).expect_err("unknown key");
        assert!(e.to_string().contains("idd"), "{e}");
        let e = NodeConfig::resolve(&dir.path().join("d2"), None, Overrides::default()).expect_err("nothing given");
        assert!(matches!(e, ConfigError::Missing("id")));
    }
}
