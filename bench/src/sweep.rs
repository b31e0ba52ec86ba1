//! Runs against a target, sweeps of one parameter, and the cost of idle shards.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::run::{connect_clients, execute, RunResult, RunSpec};
use crate::target::{cluster_file, node_pids, Local, LocalSpec};

/// Where a run's load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// A fresh local cluster per run, torn down afterwards.
    Local(LocalSpec),
    /// A running cluster, from its cluster file.
    Cluster(PathBuf),
    /// Agents on other hosts (`ringkv-bench agent`), each loading the cluster it was started for.
    Hosts(Vec<String>),
}

/// Runs `spec` once against `target`.
pub async fn run(target: &Target, spec: &RunSpec) -> anyhow::Result<RunResult> {
    spec.validate()?;
    match target {
        Target::Local(l) => {
            let local = Local::start(l).await?;
            let pids: Vec<u32> = node_pids(&local).into_iter().map(|(_, p)| p).collect();
            let result = run_with(&local.client_config(), spec, &pids).await;
            if let Some(kept) = local.finish(result.is_ok()).await {
                eprintln!("the run failed; the cluster's data and node logs are kept in {}", kept.display());
            }
            result
        }
        Target::Cluster(path) => run_with(&cluster_file(path)?, spec, &local_node_pids(path)).await,
        Target::Hosts(hosts) => crate::agent::run_on_hosts(hosts, spec).await,
    }
}

/// The pids a cluster file lists for nodes running on this host (a cluster started elsewhere
/// lists none, or pids that are not its nodes here: only those whose command is `ringkv` count).
fn local_node_pids(path: &std::path::Path) -> Vec<u32> {
    let Ok(file) = ringkv_node::dev::ClusterFile::load(path) else { return vec![] };
    let is_ringkv = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ringkv");
    let pids: Vec<u32> = file.nodes.iter().filter_map(|n| n.pid).collect();
    if pids.iter().all(|p| is_ringkv(*p)) {
        pids
    } else {
        vec![]
    }
}

async fn run_with(config: &ringkv_client::ClientConfig, spec: &RunSpec, node_pids: &[u32]) -> anyhow::Result<RunResult> {
    let clients = connect_clients(config, spec).await?;
    let r = execute(&clients, spec, node_pids).await;
    for c in &clients {
        c.close();
    }
    r
}

/// The parameter a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SweepParam {
    /// Shards in the cluster (a fresh local cluster per point; needs --local).
    Shards,
    /// Requests in flight in all: clients = min(N, 16), in flight per client = N / clients.
    Concurrency,
    /// Value size in bytes (the key count shrinks so preloaded data stays under 256 MiB).
    ValueSize,
}

/// Most clients a concurrency sweep opens; more concurrency is more requests in flight each.
pub const SWEEP_CLIENTS_MAX: usize = 16;
/// Preloaded bytes a value-size sweep stays under.
pub const SWEEP_PRELOAD_BYTES_MAX: u64 = 256 << 20;

impl SweepParam {
    pub fn name(self) -> &'static str {
        match self {
            SweepParam::Shards => "shards",
            SweepParam::Concurrency => "concurrency",
            SweepParam::ValueSize => "value-size",
        }
    }

    pub fn axis(self) -> &'static str {
        match self {
            SweepParam::Shards => "shards in the cluster (log scale)",
            SweepParam::Concurrency => "requests in flight (log scale)",
            SweepParam::ValueSize => "value size in bytes (log scale)",
        }
    }

    /// The spec and target of the point `value`.
    pub fn apply(self, value: u64, spec: &RunSpec, target: &Target) -> anyhow::Result<(RunSpec, Target)> {
        anyhow::ensure!(value > 0, "sweep values must be positive");
        let mut spec = spec.clone();
        let mut target = target.clone();
        match self {
            SweepParam::Shards => match &mut target {
                Target::Local(l) => l.shards = value,
                _ => anyhow::bail!("a shards sweep starts a cluster per point: it needs --local"),
            },
            SweepParam::Concurrency => {
                let clients = (value as usize).min(SWEEP_CLIENTS_MAX);
                anyhow::ensure!(value as usize % clients == 0, "concurrency {value} is not a multiple of {clients} clients");
                spec.clients = clients;
                spec.inflight = value as usize / clients;
            }
            SweepParam::ValueSize => {
                spec.value_size = value as usize;
                let fit = (SWEEP_PRELOAD_BYTES_MAX / (value + spec.key_size as u64)).max(1000);
                spec.keys = spec.keys.min(fit);
            }
        }
        Ok((spec, target))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepPoint {
    pub value: u64,
    pub result: RunResult,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepResult {
    pub param: SweepParam,
    /// What stayed fixed, for plot titles (e.g. "write, 3 nodes, fsync on").
    pub label: String,
    pub points: Vec<SweepPoint>,
}

impl SweepResult {
    pub fn table(&self) -> String {
        let mut out = format!("{:>12} {:>10} {:>9} {:>9} {:>9} {:>8}\n", self.param.name(), "ops/s", "p50", "p99", "p99.9", "errors");
        for p in &self.points {
            let r = &p.result;
            out.push_str(&format!(
                "{:>12} {:>10.0} {:>9} {:>9} {:>9} {:>8}\n",
                p.value,
                r.ops_per_sec,
                crate::run::fmt_us(r.p50_us),
                crate::run::fmt_us(r.p99_us),
                crate::run::fmt_us(r.p999_us),
                r.errors
            ));
        }
        out
    }
}

/// Runs one point per value, in order; `each` sees every finished point (to save as it goes).
pub async fn sweep(
    param: SweepParam,
    values: &[u64],
    spec: &RunSpec,
    target: &Target,
    label: String,
    mut each: impl FnMut(&SweepResult),
) -> anyhow::Result<SweepResult> {
    anyhow::ensure!(!values.is_empty(), "--values lists nothing to sweep");
    let mut out = SweepResult { param, label, points: Vec::new() };
    for &v in values {
        let (s, t) = param.apply(v, spec, target)?;
        eprintln!("{} = {v} ...", param.name());
        let r = run(&t, &s).await.map_err(|e| anyhow::anyhow!("{} = {v}: {e:#}", param.name()))?;
        eprintln!("{}", r.table());
        out.points.push(SweepPoint { value: v, result: r.summary_only() });
        each(&out);
    }
    Ok(out)
}

/// CPU and memory of idle nodes with a given number of shards.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdlePoint {
    pub shards: u64,
    /// Raft groups (replicas) each node hosts on average, the placement group included.
    pub replicas_per_node: f64,
    pub cpu_percent_mean: f64,
    pub cpu_percent_max: f64,
    pub rss_mib_mean: f64,
    pub rss_mib_max: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleResult {
    pub nodes: usize,
    pub settle_s: f64,
    pub window_s: f64,
    pub points: Vec<IdlePoint>,
}

impl IdleResult {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:>8} {:>14} {:>10} {:>10} {:>10} {:>10}\n",
            "shards", "replicas/node", "cpu% mean", "cpu% max", "MiB mean", "MiB max"
        );
        for p in &self.points {
            out.push_str(&format!(
                "{:>8} {:>14.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}\n",
                p.shards, p.replicas_per_node, p.cpu_percent_mean, p.cpu_percent_max, p.rss_mib_mean, p.rss_mib_max
            ));
        }
        out
    }
}

/// Clock ticks per second of /proc CPU times.
/// The mean and the maximum of per-node figures. The rounding of a float sum can put the mean of
/// equal figures a hair above them; a mean is never above its maximum, so it is capped there.
fn mean_and_max(v: &[f64]) -> (f64, f64) {
    let max = v.iter().copied().fold(0.0, f64::max);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean.min(max), max)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// User + system CPU ticks of a process, from /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow::anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?;
    let stime: u64 = f.get(12).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?;
    Ok(utime + stime)
}

/// CPU time (user + system) a process has used, in µs.
pub fn cpu_us(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_ticks(pid)? as f64 * 1e6 / clock_ticks())
}

/// Resident memory of a process in MiB, from /proc/PID/status.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    let kb: f64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("odd VmRSS line"))?.parse()?;
    Ok(kb / 1024.0)
}

/// For each shard count: starts a local cluster, lets it settle, then measures CPU over
/// `window` and resident memory of every node, with no load.
pub async fn idle(
    local: &LocalSpec,
    shards: &[u64],
    settle: Duration,
    window: Duration,
    mut each: impl FnMut(&IdleResult),
) -> anyhow::Result<IdleResult> {
    anyhow::ensure!(!shards.is_empty(), "--shards lists nothing to measure");
    let ticks = clock_ticks();
    let mut out = IdleResult { nodes: local.nodes, settle_s: settle.as_secs_f64(), window_s: window.as_secs_f64(), points: Vec::new() };
    for &n in shards {
        eprintln!("idle cluster with {n} shards ...");
        let mut l = local.clone();
        l.shards = n;
        let cluster = Local::start(&l).await?;
        let measured = async {
            tokio::time::sleep(settle).await;
            let pids = node_pids(&cluster);
            anyhow::ensure!(!pids.is_empty(), "no node processes");
            let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect::<anyhow::Result<_>>()?;
            let started = Instant::now();
            tokio::time::sleep(window).await;
            let secs = started.elapsed().as_secs_f64();
            let after: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect::<anyhow::Result<_>>()?;
            let cpu: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / ticks / secs * 100.0).collect();
            let rss: Vec<f64> = pids.iter().map(|(_, p)| rss_mib(*p)).collect::<anyhow::Result<_>>()?;
            let (cpu_percent_mean, cpu_percent_max) = mean_and_max(&cpu);
            let (rss_mib_mean, rss_mib_max) = mean_and_max(&rss);
            Ok(IdlePoint {
                shards: n,
                replicas_per_node: ((n * l.replication as u64) as f64 + l.replication.min(l.nodes) as f64) / l.nodes as f64,
                cpu_percent_mean,
                cpu_percent_max,
                rss_mib_mean,
                rss_mib_max,
            })
        }
        .await;
        let ok = measured.is_ok();
        if let Some(kept) = cluster.finish(ok).await {
            eprintln!("kept the cluster's data and logs in {}", kept.display());
        }
        out.points.push(measured?);
        eprint!("{}", out.table());
        each(&out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let before = cpu_ticks(pid).expect("ticks");
        // Spin until the kernel has charged this process at least 5 ticks (50 ms at 100 Hz):
        // the count must grow with the CPU spent, and a reader that returned a constant fails.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_ticks(pid).expect("ticks") < before + 5 {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "20 s of spinning charged no CPU ticks");
        }
        assert!(x != 1);
        assert!(rss_mib(pid).expect("rss") > 1.0);
        assert!(cpu_ticks(u32::MAX).is_err());
    }

    #[test]
    fn a_mean_is_never_above_its_maximum() {
        // A CI run's idle check failed on a mean of 0.9990742987168554 % against a maximum of
        // 0.9990742987168552 %: nodes at nearly the same CPU, and the float sum rounded up. Three
        // equal figures whose sum divided by 3 rounds above them:
        let x = 0.42383716386351644;
        assert!([x, x, x].iter().sum::<f64>() / 3.0 > x, "the rounding this guards against");
        assert_eq!(mean_and_max(&[x, x, x]), (x, x));
        assert_eq!(mean_and_max(&[1.0, 2.0, 6.0]), (3.0, 6.0));
        assert_eq!(mean_and_max(&[]), (0.0, 0.0));
    }

    #[test]
    fn sweep_points_change_only_their_parameter() {
        let spec = RunSpec {
            workload: crate::workload::Workload::Write,
            distribution: crate::workload::KeyDist::Uniform,
            zipf_theta: 0.99,
            keys: 100_000,
            key_size: 16,
            value_size: 256,
            clients: 4,
            inflight: 1,
            warmup_ms: 0,
            duration_ms: 1000,
            rate: None,
            preload: false,
            timeout_ms: 1000,
            seed: 1,
        };
        let local = Target::Local(LocalSpec {
            nodes: 3,
            shards: 8,
            replication: 3,
            fsync: true,
            dir: None,
            binary: "ringkv".into(),
            node_config: None,
        });
        let (s, t) = SweepParam::Concurrency.apply(512, &spec, &local).expect("apply");
        assert_eq!((s.clients, s.inflight, s.concurrency()), (16, 32, 512));
        assert!(matches!(t, Target::Local(ref l) if l.shards == 8));
        let (s, _) = SweepParam::Concurrency.apply(2, &spec, &local).expect("apply");
        assert_eq!((s.clients, s.inflight), (2, 1));
        assert!(SweepParam::Concurrency.apply(24, &spec, &local).is_err());
        let (s, t) = SweepParam::Shards.apply(1024, &spec, &local).expect("apply");
        assert_eq!(s, spec);
        assert!(matches!(t, Target::Local(ref l) if l.shards == 1024));
        assert!(SweepParam::Shards.apply(8, &spec, &Target::Cluster("c.json".into())).is_err());
        let (s, _) = SweepParam::ValueSize.apply(65536, &spec, &local).expect("apply");
        assert_eq!(s.value_size, 65536);
        assert!(s.keys * 65536 <= SWEEP_PRELOAD_BYTES_MAX);
        assert_eq!(s.workload, spec.workload);
    }
}
