//! The cluster-test harness: real `ringkv node` processes on 127.0.0.1, in a temporary
//! directory, with helpers to write, read, kill, restart and partition.

pub mod fault;
pub mod powerfs;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringkv_client::Client;
use ringkv_node::dev::{DevCluster, DevOptions};
use ringkv_wire::{ClientReply, ClientRequest, NodeId};

/// Raft timers for tests: quicker elections than production defaults so failover tests finish
/// fast, still far above loopback round trips.
pub const TEST_RAFT: &str =
    "[raft]\nheartbeat_interval_ms = 100\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 1000\nsnapshot_logs_since_last = 100\nlogs_kept_after_snapshot = 20";

/// The `ringkv` binary built next to this test binary or tool (same profile). Panics if it is
/// missing or older than any source it is built from: `cargo test` does not rebuild it, and a
/// test of an old binary proves nothing about the code under test.
pub fn ringkv_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/integration-<hash> or target/<profile>/jepsen -> target/<profile>/ringkv
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|d| d.join("ringkv")).collect();
    let build = "build it with `cargo build --release --workspace --bins` (the README's test command does)";
    let Some(found) = candidates.iter().find(|b| b.exists()).cloned() else {
        panic!("{} is missing: {build}", candidates[candidates.len() - 1].display())
    };
    if let Some(newer) = newer_source(&found) {
        panic!("{} is older than {}: {build}", found.display(), newer.display());
    }
    found
}

/// A source file of the workspace's crates modified after `binary` was built, if any.
fn newer_source(binary: &std::path::Path) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    let mut dirs: Vec<PathBuf> = vec![root.join("placement")];
    dirs.extend(std::fs::read_dir(root.join("crates")).ok()?.flatten().map(|e| e.path()));
    let mut files = vec![root.join("Cargo.lock")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") || p.file_name().is_some_and(|n| n == "Cargo.toml") {
                files.push(p);
            }
        }
    }
    files.into_iter().find(|f| std::fs::metadata(f).and_then(|m| m.modified()).is_ok_and(|m| m > built))
}

/// A cluster of one test. Its directory (data and node logs) is deleted only by a `stop` that
/// found every node running and saw each exit cleanly; a test that fails by any path (a panic,
/// an `Err` return, a failed start) keeps it and prints where it is.
pub struct TestCluster {
    pub cluster: DevCluster,
    /// The filesystem the cluster's directory is on, if the test made one (unmounted after
    /// the nodes are gone and before the directory is removed: fields drop in this order).
    mounted: Option<Mounted>,
    dir: Option<tempfile::TempDir>,
    stopped: bool,
}

impl TestCluster {
    pub async fn start(nodes: usize, shards: u64) -> anyhow::Result<TestCluster> {
        Self::start_with(nodes, shards, "").await
    }

    /// As [`TestCluster::start`], with `extra` TOML (whole sections) in every node's first
    /// configuration.
    pub async fn start_with(nodes: usize, shards: u64, extra: &str) -> anyhow::Result<TestCluster> {
        Self::start_holding_back(nodes, shards, extra, vec![]).await
    }

    /// As [`TestCluster::start_with`], with the nodes `hold_back` not started at bootstrap
    /// (`cluster.restart(id)` starts them).
    pub async fn start_holding_back(nodes: usize, shards: u64, extra: &str, hold_back: Vec<NodeId>) -> anyhow::Result<TestCluster> {
        let dir = tempfile::Builder::new().prefix("ringkv-test-").tempdir()?;
        Self::launch(dir, None, nodes, shards, extra, hold_back, true).await
    }

    /// `nodes` nodes started as on real hosts, the first three as each other's seeds, and no
    /// cluster yet: `ringctl init` creates it.
    pub async fn start_uninitialized(nodes: usize) -> anyhow::Result<TestCluster> {
        let dir = tempfile::Builder::new().prefix("ringkv-test-").tempdir()?;
        Self::launch(dir, None, nodes, 0, "", vec![], false).await
    }

    /// As [`TestCluster::start_with`], with the cluster's directory on a tmpfs of `bytes`
    /// (a small disk the test can fill). Needs root.
    pub async fn start_on_tmpfs(nodes: usize, shards: u64, bytes: u64, extra: &str) -> anyhow::Result<TestCluster> {
        let dir = tempfile::Builder::new().prefix("ringkv-test-").tempdir()?;
        let fs = Tmpfs::mount(&dir.path().join("cluster"), bytes)?;
        Self::launch(dir, Some(Mounted::Tmpfs(fs)), nodes, shards, extra, vec![], true).await
    }

    /// As [`TestCluster::start_with`], with the cluster's directory on a [`powerfs::PowerFs`]
    /// (the synced state lands in the test directory's `backing`): [`TestCluster::power`] cuts
    /// the power. Needs root.
    pub async fn start_on_power_fs(nodes: usize, shards: u64, extra: &str) -> anyhow::Result<TestCluster> {
        let dir = tempfile::Builder::new().prefix("ringkv-test-").tempdir()?;
        let (backing, mount) = (dir.path().join("backing"), dir.path().join("cluster"));
        std::fs::create_dir_all(&backing)?;
        std::fs::create_dir_all(&mount)?;
        let fs = powerfs::PowerFs::mount(&backing, &mount).map_err(|e| anyhow::anyhow!("cannot mount the power-loss filesystem: {e}"))?;
        Self::launch(dir, Some(Mounted::Power(fs)), nodes, shards, extra, vec![], true).await
    }

    /// Starts the nodes in `dir`; with `bootstrap`, creates the cluster and waits until it is ready.
    async fn launch(
        dir: tempfile::TempDir,
        mounted: Option<Mounted>,
        nodes: usize,
        shards: u64,
        extra: &str,
        hold_back: Vec<NodeId>,
        bootstrap: bool,
    ) -> anyhow::Result<TestCluster> {
        let opts = DevOptions {
            nodes,
            shards,
            replication: 3,
            data_dir: dir.path().join("cluster"),
            binary: ringkv_binary(),
            fault_injection: true,
            extra_config: Some(format!("{TEST_RAFT}\n{extra}")),
            netns: None,
            hold_back,
            bootstrap,
        };
        match DevCluster::start(opts).await {
            Ok(cluster) => Ok(TestCluster { cluster, mounted, dir: Some(dir), stopped: false }),
            Err(e) => {
                // The cluster's processes are gone with it (killed on drop); its logs stay.
                if let Some(m) = mounted {
                    m.keep_logs(&dir.path().join("cluster"));
                }
                let kept = dir.keep();
                anyhow::bail!("{e:#} (cluster data and node logs kept in {})", kept.display())
            }
        }
    }

    /// The power-loss filesystem of a cluster started with [`TestCluster::start_on_power_fs`].
    pub fn power(&self) -> anyhow::Result<&powerfs::PowerFs> {
        match &self.mounted {
            Some(Mounted::Power(p)) => Ok(p),
            _ => anyhow::bail!("this cluster is not on a power-loss filesystem"),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.cluster.dir.clone()
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        self.cluster.client().await
    }

    pub fn client_addr(&self, id: NodeId) -> String {
        self.cluster.entry(id).map(|e| e.client_addr.clone()).unwrap_or_default()
    }

    /// Sends `sig` to node `id`'s process (SIGSTOP and SIGCONT pause and resume it).
    pub fn signal(&self, id: NodeId, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.cluster.pid(id).ok_or_else(|| anyhow::anyhow!("node {id} is not running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// Cuts `node` off from every other node, in both directions.
    pub async fn isolate(&self, client: &Client, node: NodeId) -> anyhow::Result<()> {
        let others: Vec<NodeId> = self.cluster.file.nodes.iter().map(|n| n.id).filter(|id| *id != node).collect();
        self.cut(client, node, &others).await
    }

    /// Cuts `node` off from the nodes `from`, in both directions; it still reaches the rest.
    pub async fn cut(&self, client: &Client, node: NodeId, from: &[NodeId]) -> anyhow::Result<()> {
        self.set_partition(client, node, from.to_vec()).await?;
        for o in from {
            self.set_partition(client, *o, vec![node]).await?;
        }
        Ok(())
    }

    pub async fn heal(&self, client: &Client) -> anyhow::Result<()> {
        for n in &self.cluster.file.nodes {
            self.set_partition(client, n.id, vec![]).await?;
        }
        Ok(())
    }

    async fn set_partition(&self, client: &Client, node: NodeId, isolated_from: Vec<NodeId>) -> anyhow::Result<()> {
        let r = client.call_node(&self.client_addr(node), &ClientRequest::SetPartition { isolated_from }, Duration::from_secs(5)).await?;
        anyhow::ensure!(matches!(r, Ok(ClientReply::Done)), "set partition on node {node}: {r:?}");
        Ok(())
    }

    /// Shard ids led by `node`, as it reports them.
    pub async fn leaders_on(&self, client: &Client, node: NodeId) -> anyhow::Result<Vec<u64>> {
        match client.call_node(&self.client_addr(node), &ClientRequest::NodeStatus, Duration::from_secs(5)).await? {
            Ok(ClientReply::NodeStatus(s)) => Ok(s.groups.iter().filter(|g| g.is_leader && g.group != 0).map(|g| g.group).collect()),
            other => anyhow::bail!("node status: {other:?}"),
        }
    }

    /// Reads `key` from `node`'s own replica without going through the leader.
    pub async fn stale_get(&self, client: &Client, node: NodeId, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        let map = client.map();
        let desc = map.shard_for_hash(ringkv_wire::key_hash(key)).ok_or_else(|| anyhow::anyhow!("no shard"))?;
        let req = ClientRequest::Get { shard: desc.id, epoch: desc.epoch, key: key.to_vec(), stale: true };
        match client.call_node(&self.client_addr(node), &req, Duration::from_secs(5)).await? {
            Ok(ClientReply::Value(v)) => Ok(v),
            other => anyhow::bail!("stale get on node {node}: {other:?}"),
        }
    }

    /// Waits until `node`'s own replica holds `expected` under `key` (it has caught up).
    pub async fn wait_caught_up(&self, client: &Client, node: NodeId, key: &[u8], expected: &[u8]) -> anyhow::Result<()> {
        eventually(Duration::from_secs(30), &format!("node {node} catches up"), || async {
            let v = self.stale_get(client, node, key).await?;
            anyhow::ensure!(v.as_deref() == Some(expected), "node {node} has {v:?}");
            Ok(())
        })
        .await
    }

    /// Ends a test whose nodes were expected to break (a self-test of a check): kills what
    /// is left and removes the directory without the checks of [`TestCluster::stop`].
    pub async fn discard(mut self) {
        let _ = self.cluster.stop_all().await;
        self.stopped = true;
    }

    /// Stops the cluster at the end of a test. Panics (keeping the directory) if a node
    /// process exited on its own during the test or did not stop cleanly: a crash must not go
    /// unnoticed because the other nodes kept serving.
    pub async fn stop(mut self) {
        let exited = self.cluster.exited();
        let unclean = self.cluster.stop_all().await;
        if exited.is_empty() && unclean.is_empty() {
            self.stopped = true;
            return;
        }
        let mut what: Vec<String> = exited.iter().map(|(id, st)| format!("node {id} exited on its own ({st})")).collect();
        what.extend(unclean.iter().map(|(id, why)| format!("node {id} {why}")));
        panic!("{} (see the nodes' node.log)", what.join("; "));
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let (Some(m), Some(d)) = (&self.mounted, &self.dir) {
            m.keep_logs(&d.path().join("cluster"));
        }
        if let Some(d) = self.dir.take() {
            let kept = d.keep();
            eprintln!("test failed; cluster data and node logs kept in {}", kept.display());
        }
    }
}

/// A filesystem a test mounted for its cluster.
enum Mounted {
    Power(powerfs::PowerFs),
    /// Held for its drop, which unmounts it.
    Tmpfs(#[allow(dead_code)] Tmpfs),
}

impl Mounted {
    /// Before a failed test's filesystem goes away with it: a tmpfs keeps nothing, so its node
    /// logs are copied next to it. (The power-loss filesystem's backing dir keeps them.)
    fn keep_logs(&self, cluster: &std::path::Path) {
        if let Mounted::Tmpfs(_) = self {
            let kept = cluster.with_file_name("cluster-logs");
            for e in std::fs::read_dir(cluster).into_iter().flatten().flatten() {
                let log = e.path().join("node.log");
                if log.exists() {
                    let to = kept.join(e.file_name());
                    let _ = std::fs::create_dir_all(&to).and_then(|()| std::fs::copy(&log, to.join("node.log")));
                }
            }
        }
    }
}

/// A tmpfs of a given size mounted by the test (root only); unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &std::path::Path, bytes: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "ringkv-test"])
            .arg(path)
            .status()
            .map_err(|e| anyhow::anyhow!("cannot run mount: {e}"))?;
        anyhow::ensure!(st.success(), "mount -t tmpfs on {} failed ({st}); this test needs root", path.display());
        Ok(Tmpfs { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("--lazy").arg(&self.path).status();
    }
}

/// One key per shard of `map`: keys `prefix-N` until every shard has one.
pub fn keys_for_every_shard(map: &ringkv_wire::ClusterMap, prefix: &str) -> Vec<(u64, Vec<u8>)> {
    let mut out: std::collections::BTreeMap<u64, Vec<u8>> = std::collections::BTreeMap::new();
    let mut i = 0u64;
    while out.len() < map.shards.len() {
        let k = format!("{prefix}-{i}").into_bytes();
        if let Some(s) = map.shard_for_hash(ringkv_wire::key_hash(&k)) {
            out.entry(s.id).or_insert(k);
        }
        i += 1;
    }
    out.into_iter().collect()
}

/// Retries `f` until it succeeds or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < timeout => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("{what}: not within {timeout:?}: {e:#}"),
        }
    }
}

/// The Prometheus text a node serves at `addr`.
pub fn scrape(addr: &str) -> anyhow::Result<String> {
    Ok(http_get(addr, "/metrics")?.1)
}

/// `GET path` from the HTTP endpoint at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// The value of an unlabelled metric in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A background writer of unique keys; it remembers every write the cluster acknowledged.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<Vec<u8>>, u64)>,
}

impl Writer {
    /// Writes `prefix-N` = `v-N` one after another (at most `max` writes) until stopped.
    pub fn start(client: Client, prefix: &str, max: u64) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, prefix) = (stop.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0u64);
            for i in 0..max {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("{prefix}-{i}").into_bytes();
                match client.put(&key, format!("v-{i}").as_bytes()).await {
                    Ok(()) => acked.push(key),
                    // Outcome unknown: neither counted as written nor as lost.
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        });
        Writer { stop, task }
    }

    /// Stops the writer; returns the acknowledged keys and the count of failed writes.
    pub async fn stop(self) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Checks that every acknowledged key reads back its value (`prefix-N` = `v-N`).
/// Reads back every acknowledged write of a [`Writer`]. No acknowledged write at all fails too:
/// a cluster unavailable for the whole run must not pass a durability check by having nothing
/// to check.
pub async fn check_acked(client: &Client, acked: &[Vec<u8>]) -> anyhow::Result<()> {
    anyhow::ensure!(!acked.is_empty(), "no write was acknowledged: nothing to check");
    for key in acked {
        let k = String::from_utf8_lossy(key).into_owned();
        let n = k.rsplit('-').next().unwrap_or_default();
        let got = client.get(key).await?;
        anyhow::ensure!(got.as_deref() == Some(format!("v-{n}").as_bytes()), "acknowledged write {k} lost: read {got:?}");
    }
    Ok(())
}

/// The placement leader's report.
pub async fn placement_report(client: &Client) -> anyhow::Result<ringkv_wire::PlacementReport> {
    match client.placement(&ClientRequest::PlacementStatus).await? {
        ClientReply::Placement(r) => Ok(*r),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// Replicas and leaders per up node, from the map and the nodes' own reports (not from the
/// placement leader's report, so the two check each other).
pub async fn load_per_node(client: &Client) -> anyhow::Result<std::collections::BTreeMap<NodeId, (usize, usize)>> {
    let map = client.refresh_map().await?;
    let reports: Vec<_> = client.node_reports().await.into_iter().flatten().collect();
    let mut leader_of = ringkv_client::leaders_of(&reports);
    leader_of.remove(&ringkv_wire::PLACEMENT_GROUP);
    let mut out = std::collections::BTreeMap::new();
    for n in map.nodes.iter().filter(|n| n.state == ringkv_wire::NodeState::Up) {
        let leaders = leader_of.values().filter(|l| **l == n.id).count();
        out.insert(n.id, (map.replicas_on(n.id), leaders));
    }
    Ok(out)
}

/// Waits until the placement leader reports the cluster balanced and, independently, every up
/// node holds the mean ±1 replicas and leads the mean ±1 shards.
pub async fn wait_balanced(client: &Client, timeout: Duration) -> anyhow::Result<std::collections::BTreeMap<NodeId, (usize, usize)>> {
    eventually(timeout, "the cluster balances", || async {
        let r = placement_report(client).await?;
        anyhow::ensure!(r.balanced, "not balanced: {} moves running, {} planned, stuck {:?}", r.moves.len(), r.plan.len(), r.stuck);
        let load = load_per_node(client).await?;
        let map = client.map();
        let nodes = load.len() as f64;
        let replica_mean = map.shards.iter().map(|s| s.replicas.len()).sum::<usize>() as f64 / nodes;
        let leader_mean = map.shards.len() as f64 / nodes;
        for (id, (replicas, leaders)) in &load {
            anyhow::ensure!(
                (*replicas as f64 - replica_mean).abs() <= 1.0,
                "node {id}: {replicas} replicas, mean {replica_mean}: {load:?}"
            );
            anyhow::ensure!((*leaders as f64 - leader_mean).abs() <= 1.0, "node {id}: leads {leaders}, mean {leader_mean}: {load:?}");
        }
        Ok(load)
    })
    .await
}

/// Changes placement settings at run time.
pub async fn set_placement(client: &Client, f: impl FnOnce(&mut ringkv_wire::PlacementSettings)) -> anyhow::Result<()> {
    let mut settings = placement_report(client).await?.settings;
    f(&mut settings);
    match client.placement(&ClientRequest::SetPlacementSettings { settings }).await? {
        ClientReply::Done => Ok(()),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}
