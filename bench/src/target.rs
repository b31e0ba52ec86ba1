//! Where the load goes: a fresh local cluster the harness starts and tears down itself, or a
//! running cluster described by a cluster file.

use std::path::{Path, PathBuf};

use ringkv_client::ClientConfig;
use ringkv_node::dev::{ClusterFile, DevCluster, DevOptions};

/// A local cluster for one run.
#[derive(Clone, Debug)]
pub struct LocalSpec {
    pub nodes: usize,
    pub shards: u64,
    pub replication: usize,
    /// Fsync the WAL before acknowledging writes (the nodes' `storage.fsync`).
    pub fsync: bool,
    /// Parent directory of the cluster's data (default: the system temp dir).
    pub dir: Option<PathBuf>,
    pub binary: PathBuf,
    /// TOML appended to every node's configuration.
    pub node_config: Option<String>,
}

/// A running local cluster; `finish` stops it and removes its data, or keeps it for a look
/// when the run failed.
pub struct Local {
    pub cluster: DevCluster,
    dir: Option<tempfile::TempDir>,
}

/// The `ringkv` binary: `explicit`, else the one beside this executable, else `ringkv` on PATH.
pub fn find_ringkv(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--ringkv-bin {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(dir) = std::env::current_exe()?.parent() {
        // Beside us (target/release), or one up when running as a test (target/release/deps).
        for d in [dir, dir.parent().unwrap_or(dir)] {
            let p = d.join("ringkv");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = d.join("ringkv");
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("cannot find the `ringkv` binary: build it (`cargo build --release --bins`) or pass --ringkv-bin")
}

/// The nodes' extra configuration: `--node-config`'s text with `storage.fsync` set from
/// `--fsync` (in the file's own `[storage]` table if it has one).
fn node_config(spec: &LocalSpec) -> anyhow::Result<String> {
    let text = spec.node_config.as_deref().unwrap_or_default();
    let mut table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("--node-config: {e}"))?;
    let storage = table.entry("storage").or_insert_with(|| toml::Value::Table(Default::default()));
    let Some(storage) = storage.as_table_mut() else { anyhow::bail!("--node-config: storage is not a table") };
    storage.insert("fsync".into(), toml::Value::Boolean(spec.fsync));
    Ok(toml::to_string(&table)?)
}

impl Local {
    pub async fn start(spec: &LocalSpec) -> anyhow::Result<Local> {
        anyhow::ensure!(spec.nodes >= spec.replication, "--nodes {} cannot hold {} replicas per shard", spec.nodes, spec.replication);
        anyhow::ensure!(spec.shards >= 1, "--shards must be at least 1");
        let parent = match &spec.dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir(),
        };
        std::fs::create_dir_all(&parent).map_err(|e| anyhow::anyhow!("{}: {e}", parent.display()))?;
        let dir = tempfile::Builder::new().prefix("ringkv-bench-").tempdir_in(&parent)?;
        let opts = DevOptions {
            nodes: spec.nodes,
            shards: spec.shards,
            replication: spec.replication,
            data_dir: dir.path().to_path_buf(),
            binary: spec.binary.clone(),
            fault_injection: false,
            extra_config: Some(node_config(spec)?),
            netns: None,
            hold_back: vec![],
            bootstrap: true,
        };
        tracing::info!(nodes = spec.nodes, shards = spec.shards, fsync = spec.fsync, dir = %dir.path().display(), "starting a local cluster");
        match DevCluster::start(opts).await {
            Ok(cluster) => Ok(Local { cluster, dir: Some(dir) }),
            Err(e) => {
                let kept = dir.keep();
                anyhow::bail!("local cluster did not start: {e}; its data and node logs are kept in {}", kept.display())
            }
        }
    }

    pub fn client_config(&self) -> ClientConfig {
        self.cluster.client_config()
    }

    pub fn path(&self) -> &Path {
        &self.cluster.dir
    }

    /// Stops the cluster. On success its data is removed; on failure it is kept and its path
    /// returned, so the node logs (`node-N/node.log`) can be read.
    pub async fn finish(mut self, ok: bool) -> Option<PathBuf> {
        for (id, why) in self.cluster.stop_all().await {
            eprintln!("node {id} {why}");
        }
        let dir = self.dir.take()?;
        if ok {
            drop(dir);
            None
        } else {
            Some(dir.keep())
        }
    }
}

/// The client configuration of a running cluster from its cluster file (`ringkv dev` writes
/// one; see deploy/ for other clusters).
pub fn cluster_file(path: &Path) -> anyhow::Result<ClientConfig> {
    Ok(ringkv_node::dev::ClusterFileExt::client_config(&ClusterFile::load(path)?))
}

/// Process ids of a local cluster's nodes.
pub fn node_pids(local: &Local) -> Vec<(u64, u32)> {
    local.cluster.file.nodes.iter().filter_map(|n| n.pid.map(|p| (n.id, p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--fsync` goes into the node configuration's own `[storage]` table, or a new one; the
    /// rest of `--node-config` is kept.
    #[test]
    fn fsync_joins_the_node_configs_storage_table() {
        let spec = |text: Option<&str>, fsync| LocalSpec {
            nodes: 3,
            shards: 1,
            replication: 3,
            fsync,
            dir: None,
            binary: "ringkv".into(),
            node_config: text.map(String::from),
        };
        let merged: toml::Table = node_config(&spec(Some("[storage]\ngroup_commit_wait_us = 0\n[raft]\ncommit_linger_ms = 0\n"), false))
            .expect("merge")
            .parse()
            .expect("toml");
        assert_eq!(merged["storage"]["fsync"].as_bool(), Some(false));
        assert_eq!(merged["storage"]["group_commit_wait_us"].as_integer(), Some(0));
        assert_eq!(merged["raft"]["commit_linger_ms"].as_integer(), Some(0));
        let alone: toml::Table = node_config(&spec(None, true)).expect("merge").parse().expect("toml");
        assert_eq!(alone["storage"]["fsync"].as_bool(), Some(true));
        assert!(node_config(&spec(Some("storage = 3\n"), true)).is_err());
        assert!(node_config(&spec(Some("[storage\n"), true)).is_err());
    }
}
