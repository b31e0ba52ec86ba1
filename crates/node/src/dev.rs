//! A local cluster of `ringkv node` child processes on loopback: the engine of `ringkv dev` and
//! of the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringkv_client::{CertPaths, Client, ClientConfig};
pub use ringkv_config::cluster::{CertsEntry, ClusterFile, NetnsLayout, NodeEntry, CLUSTER_FILE};
use ringkv_wire::{ClientReply, ClientRequest, NodeId, NodeInfo, NodeState};

/// A new node's addresses: free loopback ports of this host, or its own address in `netns`.
fn new_entry(id: NodeId, data_dir: PathBuf, netns: Option<&NetnsLayout>) -> anyhow::Result<NodeEntry> {
    let Some(ns) = netns else {
        return Ok(NodeEntry {
            id,
            pid: None,
            peer_addr: format!("127.0.0.1:{}", free_port()?),
            peer_listen: None,
            client_addr: format!("127.0.0.1:{}", free_port()?),
            metrics_addr: format!("127.0.0.1:{}", free_port()?),
            http_addr: Some(format!("127.0.0.1:{}", free_port()?)),
            resp_addr: Some(format!("127.0.0.1:{}", free_port()?)),
            data_dir,
        });
    };
    anyhow::ensure!((1..=250).contains(&id), "a namespaced cluster numbers its nodes 1..=250, not {id}");
    let ip = NetnsLayout::node_ip(id);
    let listen = format!("{ip}:{}", NetnsLayout::PEER_PORT);
    Ok(NodeEntry {
        id,
        pid: None,
        peer_addr: if ns.proxied { format!("{}:{}", NetnsLayout::proxy_ip(id), NetnsLayout::PEER_PORT) } else { listen.clone() },
        peer_listen: ns.proxied.then_some(listen),
        client_addr: format!("{ip}:{}", NetnsLayout::CLIENT_PORT),
        metrics_addr: format!("{ip}:{}", NetnsLayout::METRICS_PORT),
        http_addr: Some(format!("{ip}:{}", NetnsLayout::HTTP_PORT)),
        resp_addr: Some(format!("{ip}:{}", NetnsLayout::RESP_PORT)),
        data_dir,
    })
}

/// `ringkv dev add-node`: adds a node to the dev cluster that a running `ringkv dev` supervises,
/// and waits until the placement driver has it up.
pub async fn add_node_to_running(dir: &Path, timeout: Duration) -> anyhow::Result<NodeEntry> {
    let path = dir.join(CLUSTER_FILE);
    anyhow::ensure!(path.exists(), "no dev cluster in {} (start one with `ringkv dev --data-dir {}`)", dir.display(), dir.display());
    let mut file = ClusterFile::load(&path)?;
    let running = file.supervisor.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    anyhow::ensure!(
        running,
        "the dev cluster in {} is not running; start it with `ringkv dev --data-dir {}` first",
        dir.display(),
        dir.display()
    );
    let e = DevCluster::prepare_node(&mut file, dir)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&file)?)?;
    std::fs::rename(tmp, &path)?;
    wait_node_up(&file.client_config(), e.id, timeout)
        .await
        .map_err(|err| anyhow::anyhow!("{err} (its log: {})", e.data_dir.join("node.log").display()))?;
    Ok(e)
}

/// Waits until the cluster map lists node `id` as up.
pub async fn wait_node_up(config: &ClientConfig, id: NodeId, timeout: Duration) -> anyhow::Result<()> {
    let client = Client::unrouted(config.clone())?;
    let started = Instant::now();
    loop {
        let state = client.refresh_map().await.ok().and_then(|m| m.node(id).map(|n| n.state));
        if state == Some(NodeState::Up) {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < timeout, "node {id} is not up after {timeout:?} (state: {state:?})");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the dev tools (not the config crate) do with a cluster file: connect to it.
pub trait ClusterFileExt {
    fn client_certs(&self) -> CertPaths;
    fn client_config(&self) -> ClientConfig;
}

impl ClusterFileExt for ClusterFile {
    fn client_certs(&self) -> CertPaths {
        CertPaths { ca: self.certs.ca.clone(), cert: self.certs.client_cert.clone(), key: self.certs.client_key.clone() }
    }

    fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.nodes.iter().map(|n| n.client_addr.clone()).collect(), self.client_certs())
    }
}

#[derive(Clone, Debug)]
pub struct DevOptions {
    pub nodes: usize,
    pub shards: u64,
    pub replication: usize,
    pub data_dir: PathBuf,
    /// The `ringkv` binary to run nodes with.
    pub binary: PathBuf,
    pub fault_injection: bool,
    /// Extra TOML appended to every node's first configuration (e.g. faster Raft timers).
    pub extra_config: Option<String>,
    /// Run the nodes inside this network namespace (which must exist) instead of on this
    /// host's loopback ports.
    pub netns: Option<NetnsLayout>,
    /// Nodes of a new cluster not started at bootstrap (tests of a node that is down or slow
    /// then); `restart` starts them later.
    pub hold_back: Vec<NodeId>,
    /// Create the cluster once the nodes are up. Without it the nodes wait, each with the
    /// first `replication` nodes as seeds, for `ringctl init`.
    pub bootstrap: bool,
}

pub struct DevCluster {
    pub dir: PathBuf,
    pub file: ClusterFile,
    binary: PathBuf,
    children: BTreeMap<NodeId, tokio::process::Child>,
    /// Extra environment of a node's next starts (e.g. FAILPOINTS in the fault tests).
    env: BTreeMap<NodeId, Vec<(String, String)>>,
}

/// A loopback port free for both protocols (the QUIC endpoints use UDP, the metrics endpoint
/// TCP). The port is released before the node binds it, so it comes from below the kernel's
/// ephemeral range: the clients and connections of this and every other process draw their
/// ports from that range and cannot take it meanwhile. Successive calls (of this process, from
/// an offset of its pid) hand out different ports, so clusters started side by side do not
/// collide either.
fn free_port() -> anyhow::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_001));
    let span = high - low;
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (low + (offset + n) % span) as u16;
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {low}..{high}")
}

impl DevCluster {
    /// Starts the cluster in `opts.data_dir`: a fresh one, or the one already there.
    pub async fn start(opts: DevOptions) -> anyhow::Result<DevCluster> {
        let path = opts.data_dir.join(CLUSTER_FILE);
        if path.exists() {
            let file = ClusterFile::load(&path)?;
            let mut c = DevCluster {
                dir: opts.data_dir.clone(),
                file,
                binary: opts.binary.clone(),
                children: BTreeMap::new(),
                env: BTreeMap::new(),
            };
            let ids: Vec<NodeId> = c.file.nodes.iter().map(|n| n.id).collect();
            for id in ids {
                c.start_node(id)?;
            }
            c.write_file()?;
            c.wait_ready(Duration::from_secs(60)).await?;
            return Ok(c);
        }
        anyhow::ensure!(opts.nodes >= opts.replication, "{} nodes cannot hold {} replicas per shard", opts.nodes, opts.replication);
        std::fs::create_dir_all(&opts.data_dir)?;
        let certs_dir = opts.data_dir.join("certs");
        ringkv_transport::certs::init_ca(&certs_dir)?;
        let client = ringkv_transport::certs::issue_client(&certs_dir, &certs_dir, "client", ringkv_wire::Role::Admin)?;
        let mut nodes = Vec::new();
        for i in 1..=opts.nodes as u64 {
            nodes.push(new_entry(i, opts.data_dir.join(format!("node-{i}")), opts.netns.as_ref())?);
        }
        // The placement members' peer addresses, where a node without the map asks for it
        // (also a node first started long after the bootstrap).
        let seeds: Vec<String> = nodes.iter().take(opts.replication).map(|n| n.peer_addr.clone()).collect();
        for e in &nodes {
            std::fs::create_dir_all(&e.data_dir)?;
            let cert = ringkv_transport::certs::issue_node(&certs_dir, &certs_dir, e.id, &node_ips(e))?;
            let mut cfg =
                node_toml(e, &certs_dir.join("ca.pem"), &cert.cert, &cert.key, opts.fault_injection, opts.extra_config.as_deref());
            cfg.insert_str(0, &format!("seeds = {seeds:?}\n"));
            std::fs::write(e.data_dir.join("first-start.toml"), cfg)?;
        }
        let file = ClusterFile {
            nodes,
            certs: CertsEntry { dir: certs_dir.clone(), ca: certs_dir.join("ca.pem"), client_cert: client.cert, client_key: client.key },
            supervisor: None,
            fault_injection: opts.fault_injection,
            extra_config: opts.extra_config.clone(),
            netns: opts.netns.clone(),
        };
        let mut c =
            DevCluster { dir: opts.data_dir.clone(), file, binary: opts.binary.clone(), children: BTreeMap::new(), env: BTreeMap::new() };
        let ids: Vec<NodeId> = c.file.nodes.iter().map(|n| n.id).collect();
        for id in ids.iter().filter(|id| !opts.hold_back.contains(id)) {
            c.start_node(*id)?;
        }
        c.write_file()?;
        if opts.bootstrap {
            c.bootstrap(opts.shards, opts.replication).await?;
            c.wait_ready(Duration::from_secs(90)).await?;
            c.create_tokens().await?;
        }
        Ok(c)
    }

    pub fn entry(&self, id: NodeId) -> anyhow::Result<&NodeEntry> {
        self.file.nodes.iter().find(|n| n.id == id).ok_or_else(|| anyhow::anyhow!("no node {id} in the cluster"))
    }

    /// Starts node `id`: from its data dir, or from its first-start configuration if it never
    /// ran (a node added while the cluster was stopping).
    fn start_node(&mut self, id: NodeId) -> anyhow::Result<()> {
        let e = self.entry(id)?.clone();
        if e.data_dir.join(crate::config::IDENTITY_FILE).exists() {
            self.spawn(id, &[])
        } else {
            self.spawn(id, &["--config".into(), e.data_dir.join("first-start.toml").display().to_string()])
        }
    }

    /// Adds a node to the running cluster: a certificate, a data dir and a first-start
    /// configuration that joins through the members' client addresses (any of them that
    /// answers: one down or paused does not hold the join). Returns its entry;
    /// the caller starts it (`adopt_new_nodes` in the supervisor, or the tests).
    pub fn prepare_node(file: &mut ClusterFile, dir: &Path) -> anyhow::Result<NodeEntry> {
        let id = file.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let through: Vec<String> = file.nodes.iter().map(|n| n.client_addr.clone()).collect();
        anyhow::ensure!(!through.is_empty(), "the cluster has no node");
        let node_dir = dir.join(format!("node-{id}"));
        anyhow::ensure!(!node_dir.exists(), "{} already exists", node_dir.display());
        std::fs::create_dir_all(&node_dir)?;
        let certs_dir = &file.certs.dir;
        let e = new_entry(id, node_dir.clone(), file.netns.as_ref())?;
        let cert = ringkv_transport::certs::issue_node(certs_dir, certs_dir, id, &node_ips(&e))?;
        let mut cfg = node_toml(&e, &file.certs.ca, &cert.cert, &cert.key, file.fault_injection, file.extra_config.as_deref());
        cfg.insert_str(0, &format!("join = {through:?}\n"));
        std::fs::write(node_dir.join("first-start.toml"), cfg)?;
        file.nodes.push(e.clone());
        Ok(e)
    }

    /// Adds a node and starts it (it joins the cluster on its own). Returns its id.
    pub fn add_node(&mut self) -> anyhow::Result<NodeId> {
        let e = Self::prepare_node(&mut self.file, &self.dir)?;
        self.start_node(e.id)?;
        self.write_file()?;
        Ok(e.id)
    }

    /// The supervisor's side of `ringkv dev add-node`: starts the nodes the cluster file lists
    /// that this process does not know yet. Returns their ids.
    pub fn adopt_new_nodes(&mut self) -> anyhow::Result<Vec<NodeId>> {
        let on_disk = ClusterFile::load(&self.dir.join(CLUSTER_FILE))?;
        let new: Vec<NodeEntry> = on_disk.nodes.into_iter().filter(|n| self.entry(n.id).is_err()).collect();
        let ids: Vec<NodeId> = new.iter().map(|n| n.id).collect();
        for e in new {
            self.file.nodes.push(e.clone());
            self.start_node(e.id)?;
        }
        if !ids.is_empty() {
            self.write_file()?;
        }
        Ok(ids)
    }

    /// Records this process as the one running the cluster.
    pub fn set_supervisor(&mut self, pid: Option<u32>) -> anyhow::Result<()> {
        self.file.supervisor = pid;
        self.write_file()
    }

    /// Starts node `id` from its data dir (plus `args` on its first start).
    pub fn spawn(&mut self, id: NodeId, args: &[String]) -> anyhow::Result<()> {
        let e = self.entry(id)?.clone();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(e.data_dir.join("node.log"))?;
        let mut cmd = match &self.file.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(&self.binary);
                c
            }
            None => tokio::process::Command::new(&self.binary),
        };
        if let Some(vars) = self.env.get(&id) {
            cmd.envs(vars.iter().cloned());
        }
        // Fault injection is never remembered by a node: ask for it on every start.
        let fault = self.file.fault_injection.then_some("--fault-injection");
        let child = cmd
            .arg("node")
            .arg("--data-dir")
            .arg(&e.data_dir)
            .args(args)
            .args(fault)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| anyhow::anyhow!("cannot start {}: {err}", self.binary.display()))?;
        let pid = child.id();
        self.children.insert(id, child);
        if let Some(n) = self.file.nodes.iter_mut().find(|n| n.id == id) {
            n.pid = pid;
        }
        Ok(())
    }

    pub fn write_file(&self) -> anyhow::Result<()> {
        let path = self.dir.join(CLUSTER_FILE);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&self.file)?)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    pub fn client_config(&self) -> ClientConfig {
        self.file.client_config()
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.client_config()).await?)
    }

    async fn bootstrap(&self, shards: u64, replication: usize) -> anyhow::Result<()> {
        let client = Client::unrouted(self.client_config())?;
        let asks = self.file.nodes.iter().map(|n| incarnation_of(&client, &n.client_addr));
        let incarnations = futures::future::join_all(asks).await;
        let nodes: Vec<NodeInfo> = self
            .file
            .nodes
            .iter()
            .zip(incarnations)
            .map(|(n, incarnation)| NodeInfo {
                id: n.id,
                peer_addr: n.peer_addr.clone(),
                client_addr: n.client_addr.clone(),
                metrics_addr: n.metrics_addr.clone(),
                state: NodeState::Joining,
                incarnation,
            })
            .collect();
        let first = &self.file.nodes[0].client_addr;
        let req = ClientRequest::Bootstrap { nodes, shards, replication };
        let started = Instant::now();
        loop {
            match client.call_node(first, &req, Duration::from_secs(40)).await {
                Ok(Ok(ClientReply::Done)) => return Ok(()),
                Ok(Err(e)) => anyhow::bail!("bootstrap refused: {e}"),
                Ok(Ok(other)) => anyhow::bail!("unexpected bootstrap reply {other:?}"),
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!("waiting for node 1: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => anyhow::bail!("node 1 did not answer: {e}"),
            }
        }
    }

    /// Waits until every shard and the placement group have a leader. Fails at once if a node
    /// process exits meanwhile, and on timeout names the shards without a leader and the nodes
    /// that did not answer.
    /// Creates the gateway tokens of a new cluster (`app.token`: write, `admin.token`: admin)
    /// and writes each to its file (mode 0600) in the data dir.
    pub async fn create_tokens(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        for (file, name, role) in
            [(APP_TOKEN_FILE, "dev-app", ringkv_wire::Role::Write), (ADMIN_TOKEN_FILE, "dev-admin", ringkv_wire::Role::Admin)]
        {
            let token = client.create_token(name, role).await.map_err(|e| anyhow::anyhow!("cannot create token `{name}`: {e}"))?;
            write_secret(&self.dir.join(file), &token)?;
        }
        self.wait_maps_current(Duration::from_secs(30)).await
    }

    /// Waits until every running node has the placement leader's current map (e.g. with a
    /// token just created: a node knows it once its map does, within a second or two).
    pub async fn wait_maps_current(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = self.client().await?;
        let version = match client.placement(&ClientRequest::PlacementStatus).await? {
            ClientReply::Placement(r) => r.map_version,
            other => anyhow::bail!("unexpected reply {other:?}"),
        };
        let started = Instant::now();
        for n in self.file.nodes.iter().filter(|n| self.children.contains_key(&n.id)) {
            loop {
                match client.call_node(&n.client_addr, &ClientRequest::GetMap, Duration::from_secs(2)).await {
                    Ok(Ok(ClientReply::Map(m))) if m.version >= version => break,
                    other if started.elapsed() > timeout => anyhow::bail!("node {} has no map of version {version} yet: {other:?}", n.id),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let client = Client::unrouted(self.client_config())?;
        let mut last = String::new();
        while started.elapsed() < timeout {
            let exited = self.exited();
            if !exited.is_empty() {
                let what: Vec<String> = exited
                    .iter()
                    .map(|(id, st)| {
                        format!(
                            "node {id} exited ({st}), see {}",
                            self.entry(*id).map(|e| e.data_dir.join("node.log").display().to_string()).unwrap_or_default()
                        )
                    })
                    .collect();
                anyhow::bail!("cluster not ready: {}", what.join("; "));
            }
            match client.refresh_map().await {
                Ok(map) => {
                    let reports = client.node_reports().await;
                    let mut led = std::collections::HashSet::new();
                    let mut silent = Vec::new();
                    for r in &reports {
                        match r {
                            Ok(r) => led.extend(r.groups.iter().filter(|g| g.is_leader).map(|g| g.group)),
                            Err(e) => silent.push(e.clone()),
                        }
                    }
                    let mut missing: Vec<u64> = map.shards.iter().map(|s| s.id).filter(|id| !led.contains(id)).collect();
                    if !led.contains(&ringkv_wire::PLACEMENT_GROUP) {
                        missing.insert(0, ringkv_wire::PLACEMENT_GROUP);
                    }
                    if missing.is_empty() {
                        return Ok(());
                    }
                    let shown: Vec<String> = missing.iter().take(16).map(|g| g.to_string()).collect();
                    last = format!(
                        "{} groups without a leader ({}{}); nodes not answering: {}",
                        missing.len(),
                        shown.join(", "),
                        if missing.len() > 16 { ", ..." } else { "" },
                        if silent.is_empty() { "none".to_string() } else { silent.join(", ") }
                    );
                }
                Err(e) => last = format!("no map: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("cluster not ready after {timeout:?}: {last}")
    }

    /// Sets the extra environment node `id` gets from its next start on (empty: none).
    pub fn set_env(&mut self, id: NodeId, vars: Vec<(String, String)>) {
        self.env.insert(id, vars);
    }

    /// The process id of node `id`, while this cluster runs it.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.children.get(&id).and_then(|c| c.id())
    }

    /// `kill -9` of one node.
    pub async fn kill(&mut self, id: NodeId) -> anyhow::Result<()> {
        if let Some(mut c) = self.children.remove(&id) {
            c.start_kill()?;
            let _ = c.wait().await;
        }
        Ok(())
    }

    /// Sends SIGTERM to one node and waits for it to exit (SIGKILL after `grace`).
    pub async fn stop_node(&mut self, id: NodeId, grace: Duration) -> anyhow::Result<()> {
        if let Some(mut c) = self.children.remove(&id) {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
            if tokio::time::timeout(grace, c.wait()).await.is_err() {
                c.start_kill()?;
                let _ = c.wait().await;
            }
        }
        Ok(())
    }

    /// Restarts a stopped node from its data dir.
    pub fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.start_node(id)?;
        self.write_file()
    }

    /// Stops every node (SIGTERM, and again after a moment: no node waits to hand its
    /// leaderships to the others, which are stopping too; SIGKILL after 10 s). Returns the nodes
    /// that did not exit cleanly: with an error status, or only after SIGKILL.
    pub async fn stop_all(&mut self) -> Vec<(NodeId, String)> {
        let mut unclean = Vec::new();
        let ids: Vec<NodeId> = self.children.keys().copied().collect();
        for round in 0..2 {
            if round == 1 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            for id in &ids {
                if let Some(pid) = self.children.get(id).and_then(|c| c.id()) {
                    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
                }
            }
        }
        for id in ids {
            if let Some(mut c) = self.children.remove(&id) {
                match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
                    Ok(Ok(st)) if st.success() => {}
                    Ok(Ok(st)) => unclean.push((id, format!("exited with {st} on SIGTERM"))),
                    Ok(Err(e)) => unclean.push((id, format!("cannot wait for it: {e}"))),
                    Err(_) => {
                        let _ = c.start_kill();
                        let _ = c.wait().await;
                        unclean.push((id, "did not exit within 10 s of SIGTERM".into()));
                    }
                }
            }
        }
        unclean
    }

    /// Checks whether a node's process has exited on its own.
    pub fn exited(&mut self) -> Vec<(NodeId, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (id, c) in self.children.iter_mut() {
            if let Ok(Some(s)) = c.try_wait() {
                out.push((*id, s));
            }
        }
        for (id, _) in &out {
            self.children.remove(id);
        }
        out
    }
}

/// Writes a secret readable by its owner only.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    Ok(())
}

/// The incarnation of the node at `addr`, so the first map names every data dir it was made
/// with; 0 (claimed by the node's first heartbeat) if the node does not answer in time.
async fn incarnation_of(client: &Client, addr: &str) -> u64 {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        match client.call_node(addr, &ClientRequest::Identify, Duration::from_secs(2)).await {
            Ok(Ok(ClientReply::Identity(info))) => return info.incarnation,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    0
}

/// The IP addresses a dev node's certificate names, so HTTPS and TLS clients can check it by
/// the address they dial.
fn node_ips(e: &NodeEntry) -> Vec<ringkv_transport::certs::ExtraName> {
    let mut ips: Vec<std::net::IpAddr> = vec![std::net::Ipv4Addr::LOCALHOST.into()];
    for a in [&e.client_addr, &e.peer_addr] {
        if let Some(ip) = a.rsplit_once(':').and_then(|(h, _)| h.parse().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips.into_iter().map(ringkv_transport::certs::ExtraName::Ip).collect()
}

/// Files in a dev cluster's data dir holding gateway tokens: a write-role one for applications
/// and an admin one.
pub const APP_TOKEN_FILE: &str = "app.token";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

fn node_toml(e: &NodeEntry, ca: &Path, cert: &Path, key: &Path, fault_injection: bool, extra: Option<&str>) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut s = match &e.peer_listen {
        Some(listen) => format!("id = {}\npeer_addr = \"{listen}\"\nadvertise_peer_addr = \"{}\"\n", e.id, e.peer_addr),
        None => format!("id = {}\npeer_addr = \"{}\"\n", e.id, e.peer_addr),
    };
    s.push_str(&format!(
        "client_addr = \"{}\"\nmetrics_addr = \"{}\"\nfault_injection = {}\n",
        e.client_addr, e.metrics_addr, fault_injection
    ));
    for (name, a) in [("http_addr", &e.http_addr), ("resp_addr", &e.resp_addr)] {
        if let Some(a) = a {
            s.push_str(&format!("{name} = \"{a}\"\n"));
        }
    }
    if let Some(x) = extra {
        s.push_str(x);
        s.push('\n');
    }
    s.push_str(&format!("\n[tls]\nca = {}\ncert = {}\nkey = {}\n", q(ca), q(cert), q(key)));
    s
}
