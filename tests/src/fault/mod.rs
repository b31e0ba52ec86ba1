//! Jepsen-style fault runs: a cluster of `ringkv node` processes inside a network namespace,
//! client workloads that record every operation, a seeded nemesis, and checks of the history
//! at the end. `run` is shared by the integration tests (short runs) and the `jepsen` binary
//! (long soaks by hand).

pub mod history;
pub mod nemesis;
pub mod netns;
pub mod proxy;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_client::Client;
use ringkv_node::dev::{DevCluster, DevOptions, NetnsLayout};

pub use nemesis::Fault;
use workload::{BankConfig, Ctx, RegisterConfig};

/// Node ids the proxy covers: the first nodes and those that join during the run.
const MAX_NODES: u64 = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    Register,
    Set,
    Bank,
}

#[derive(Clone, Debug)]
pub struct FaultRun {
    pub nodes: usize,
    pub shards: u64,
    /// How long the workloads and the nemesis run (the checks come after).
    pub time: Duration,
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// Faults of `faults` the first pass draws before the others: those a short run must show.
    pub first: Vec<Fault>,
    pub workloads: Vec<Workload>,
    pub register: RegisterConfig,
    pub set_workers: usize,
    pub bank: BankConfig,
    /// Deadline of one client operation.
    pub op_timeout: Duration,
    /// Where to keep the cluster and the history of a failed run (default: the temp dir).
    pub keep_dir: Option<PathBuf>,
    /// Extra environment of the first nodes (e.g. FAILPOINTS for the harness's self-check).
    pub node_env: Vec<(String, String)>,
}

impl FaultRun {
    /// A run of every workload against `faults`, sized for CI.
    pub fn short(seed: u64, time: Duration, faults: &[Fault]) -> FaultRun {
        FaultRun {
            nodes: 5,
            shards: 8,
            time,
            seed,
            faults: faults.to_vec(),
            first: Vec::new(),
            workloads: vec![Workload::Register, Workload::Set, Workload::Bank],
            register: RegisterConfig { keys: 4, workers: 8, ops_per_key: 1000 },
            set_workers: 4,
            bank: BankConfig { banks: 3, accounts: 5, balance: 20, workers: 3 },
            op_timeout: Duration::from_secs(5),
            keep_dir: None,
            node_env: Vec::new(),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// `workload` → (ok, failed, unknown).
    pub ops: BTreeMap<String, [u64; 3]>,
    /// Faults that took effect, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Faults tried that did not take effect (see the history for why).
    pub ineffective: BTreeMap<Fault, u64>,
    pub anomalies: Vec<String>,
    /// Packets the proxy forwarded, dropped and delayed.
    pub packets: [u64; 3],
    /// The history (and, after a failure, the cluster's data and logs).
    pub history: Option<PathBuf>,
    pub elapsed: Duration,
    /// Nodes that joined during the run, with the replicas they hold at the end.
    pub joined: Vec<(u64, usize)>,
}

impl Report {
    /// Why the run checked too little to count: a workload without a successful operation, or
    /// no fault that took effect when faults were asked for.
    pub fn vacuous(&self, cfg_faults: &[Fault]) -> Vec<String> {
        let mut why: Vec<String> = self.ops.iter().filter(|(_, c)| c[0] == 0).map(|(w, _)| format!("no {w} operation succeeded")).collect();
        if !cfg_faults.is_empty() && self.faults.values().sum::<u64>() == 0 {
            why.push("no fault took effect".into());
        }
        why
    }

    pub fn summary(&self) -> String {
        let ops: u64 = self.ops.values().map(|c| c.iter().sum::<u64>()).sum();
        let faults: u64 = self.faults.values().sum();
        let mut s = format!(
            "seed {}: {ops} operations {:?}, {faults} faults took effect {:?} (tried without effect: {:?}), packets forwarded/dropped/delayed {:?}, {} anomalies, {:.0?}",
            self.seed,
            self.ops,
            self.faults,
            self.ineffective,
            self.packets,
            self.anomalies.len(),
            self.elapsed
        );
        for (id, replicas) in &self.joined {
            s.push_str(&format!("\n  node {id} joined and holds {replicas} replicas"));
        }
        for a in self.anomalies.iter().take(20) {
            s.push_str(&format!("\n  anomaly: {a}"));
        }
        if let Some(h) = &self.history {
            s.push_str(&format!("\n  history: {}", h.display()));
        }
        s
    }
}

/// A seed from the environment (`RINGKV_FAULT_SEED`) or the clock.
pub fn seed_from_env() -> u64 {
    std::env::var("RINGKV_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1))
}

/// Runs `cfg` in a fresh network namespace; blocks until the checks are done.
pub fn run(cfg: FaultRun) -> anyhow::Result<Report> {
    let ns = netns::Netns::create()?;
    let started = Instant::now();
    // The runtime's threads move into the namespace: give it a thread of its own.
    let mut report = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Report> {
            let rt = ns.runtime()?;
            let r = rt.block_on(run_in(&ns, cfg));
            rt.shutdown_timeout(Duration::from_secs(10));
            r
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the fault run panicked"))?
    })?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// How long the linearizability check of one key may take before the run fails as
/// inconclusive (a non-linearizable history can make the search explode).
const CHECK_DEADLINE: Duration = Duration::from_secs(120);

async fn run_in(ns: &netns::Netns, cfg: FaultRun) -> anyhow::Result<Report> {
    // Removed only after a clean run: a failure, an error or a panic keeps it.
    let dir = tempfile::Builder::new().prefix("ringkv-fault-").tempdir()?.keep();
    let rec = Arc::new(history::Recorder::default());
    /// Writes the history if the run panics, so the kept directory has it.
    struct SaveOnPanic<'a>(&'a std::path::Path, &'a history::Recorder);
    impl Drop for SaveOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = self.1.save(&self.0.join("history.jsonl"));
                eprintln!("the fault run panicked; history and cluster kept in {}", self.0.display());
            }
        }
    }
    let _save = SaveOnPanic(&dir, &rec);
    let mut report = Report { seed: cfg.seed, ..Default::default() };
    // Whatever happens, the history is written and, on failure, kept with the cluster.
    let result = run_checked(ns, &cfg, &dir, &rec, &mut report).await;
    let history = dir.join("history.jsonl");
    rec.save(&history)?;
    if result.is_err() || !report.anomalies.is_empty() || cfg.keep_dir.is_some() {
        let kept = match &cfg.keep_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                let to = d.join(format!("seed-{}", cfg.seed));
                std::fs::rename(&dir, &to).or_else(|_| copy_dir(&dir, &to))?;
                to
            }
            None => dir.clone(),
        };
        report.history = Some(kept.join("history.jsonl"));
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match result {
        Ok(()) => Ok(report),
        Err(e) => Err(e.context(format!(
            "seed {}; history and cluster kept: {}",
            cfg.seed,
            report.history.as_ref().map(|h| h.display().to_string()).unwrap_or_default()
        ))),
    }
}

async fn run_checked(
    ns: &netns::Netns,
    cfg: &FaultRun,
    dir: &std::path::Path,
    rec: &Arc<history::Recorder>,
    report: &mut Report,
) -> anyhow::Result<()> {
    anyhow::ensure!((3..=MAX_NODES as usize).contains(&cfg.nodes), "a fault run needs 3 to {MAX_NODES} nodes, not {}", cfg.nodes);
    let proxy = proxy::Proxy::start(MAX_NODES).await?;
    let opts = DevOptions {
        nodes: cfg.nodes,
        shards: cfg.shards,
        replication: 3,
        data_dir: dir.join("cluster"),
        binary: crate::ringkv_binary(),
        fault_injection: false,
        extra_config: Some(crate::TEST_RAFT.into()),
        netns: Some(NetnsLayout { name: ns.name().into(), proxied: true }),
        hold_back: vec![],
        bootstrap: true,
    };
    let mut cluster = DevCluster::start(opts).await?;
    if !cfg.node_env.is_empty() {
        for id in 1..=cfg.nodes as u64 {
            cluster.set_env(id, cfg.node_env.clone());
            cluster.kill(id).await?;
            cluster.restart(id)?;
        }
        cluster.wait_ready(Duration::from_secs(60)).await?;
    }
    let client = connect(&cluster, cfg).await?;
    let mut nemesis =
        nemesis::Nemesis::new(cluster, ns, &proxy, client.clone(), rec.clone(), cfg.seed, cfg.faults.clone(), &cfg.first, MAX_NODES);
    let outcome = workloads_under_faults(cfg, &client, rec, &mut nemesis).await;
    // Undo every fault, whatever happened; then stop the cluster.
    let healed = nemesis.heal_all().await;
    report.faults = nemesis.counts.clone();
    report.ineffective = nemesis.ineffective.clone();
    report.anomalies.append(&mut nemesis.crashed);
    report.packets = [&proxy.stats.forwarded, &proxy.stats.dropped, &proxy.stats.delayed].map(|c| c.load(Ordering::Relaxed));
    let mut cluster = nemesis.cluster;
    let checked = match (outcome, healed) {
        (Ok(ctx), Ok(())) => final_checks(cfg, &client, rec, &mut cluster, &ctx, report).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    for (id, why) in cluster.stop_all().await {
        report.anomalies.push(format!("node {id} {why}"));
    }
    client.close();
    checked
}

/// A client of the run's cluster with the run's operation deadline.
async fn connect(cluster: &DevCluster, cfg: &FaultRun) -> anyhow::Result<Arc<Client>> {
    let mut cc = cluster.client_config();
    cc.timeout = cfg.op_timeout;
    cc.attempt_timeout = Duration::from_secs(2);
    Ok(Arc::new(Client::connect(cc).await?))
}

/// What the workloads leave for the final checks.
struct Ran {
    ctx: Arc<Ctx>,
    set: Option<Arc<workload::SetState>>,
    bank: Option<Arc<workload::BankCounts>>,
}

async fn workloads_under_faults(
    cfg: &FaultRun,
    client: &Arc<Client>,
    rec: &Arc<history::Recorder>,
    nemesis: &mut nemesis::Nemesis<'_>,
) -> anyhow::Result<Ran> {
    if cfg.workloads.contains(&Workload::Bank) {
        let setup = Ctx::new(client.clone(), rec.clone(), Instant::now(), cfg.op_timeout, cfg.seed);
        workload::bank_setup(&setup, cfg.bank).await?;
    }
    let until = Instant::now() + cfg.time;
    let ctx = Arc::new(Ctx::new(client.clone(), rec.clone(), until, cfg.op_timeout, cfg.seed));
    // Each register worker is a client of its own, with its own view of who leads what.
    let mut clients = Vec::new();
    if cfg.workloads.contains(&Workload::Register) {
        for _ in 0..cfg.register.workers {
            clients.push(connect(&nemesis.cluster, cfg).await?);
        }
    }
    let register =
        cfg.workloads.contains(&Workload::Register).then(|| tokio::spawn(workload::register(ctx.clone(), cfg.register, clients)));
    let set = cfg.workloads.contains(&Workload::Set).then(|| tokio::spawn(workload::set(ctx.clone(), cfg.set_workers)));
    let bank = cfg.workloads.contains(&Workload::Bank).then(|| tokio::spawn(workload::bank(ctx.clone(), cfg.bank)));
    let schedule = nemesis.run(until).await;
    // The workloads stop by `until` (plus one operation's deadline) whatever the nemesis did.
    if let Some(t) = register {
        t.await?;
    }
    let set = match set {
        Some(t) => Some(t.await?),
        None => None,
    };
    let bank = match bank {
        Some(t) => Some(t.await?),
        None => None,
    };
    schedule?;
    Ok(Ran { ctx, set, bank })
}

async fn final_checks(
    cfg: &FaultRun,
    client: &Arc<Client>,
    rec: &Arc<history::Recorder>,
    cluster: &mut DevCluster,
    ran: &Ran,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ctx = &ran.ctx;
    // Every fault is undone: the cluster must serve again before the final reads.
    cluster.wait_ready(Duration::from_secs(120)).await?;
    if let Ok(map) = client.refresh_map().await {
        for n in map.nodes.iter().filter(|n| n.id > cfg.nodes as u64) {
            report.joined.push((n.id, map.replicas_on(n.id)));
        }
    }
    if cfg.workloads.contains(&Workload::Register) {
        let counts = rec.register_counts();
        report
            .ops
            .insert("register".into(), counts.values().fold([0; 3], |a, c| [a[0] + c.0 as u64, a[1] + c.1 as u64, a[2] + c.2 as u64]));
        for (key, actions) in rec.register_histories() {
            let n = actions.len() / 2;
            let started = Instant::now();
            // Bounded, so a search that explodes ends the run instead of hanging it.
            let check = tokio::task::spawn_blocking(move || history::linearizable(actions));
            let verdict = tokio::time::timeout(CHECK_DEADLINE, check).await;
            eprintln!("register {key}: {n} operations checked in {:.1?}: {verdict:?}", started.elapsed());
            match verdict {
                Ok(Ok(true)) => {}
                Ok(Err(e)) => ctx.anomaly(format!("register {key}: the linearizability check failed: {e}")),
                Ok(Ok(false)) => ctx.anomaly(format!("register {key}: the history of its {n} operations is not linearizable")),
                Err(_) => ctx.anomaly(format!(
                    "register {key}: the linearizability check of {n} operations did not finish within {CHECK_DEADLINE:?}"
                )),
            }
        }
    }
    if let Some(state) = &ran.set {
        let workload::SetVerdict { acked, present, absent, .. } = workload::check_set(ctx, state).await?;
        let outcomes = state.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
        let fails = outcomes.values().filter(|o| **o == history::Outcome::Fail).count() as u64;
        report.ops.insert("set".into(), [acked as u64, fails, (present + absent) as u64]);
        eprintln!("set: {acked} acknowledged adds all present; of unknown adds {present} present, {absent} absent");
    }
    if let Some(counts) = &ran.bank {
        workload::check_banks(ctx, cfg.bank, counts).await?;
        let [ok, refused, unknown, reads] = counts.totals();
        // Transfers only: a run whose transfers all failed must not look busy by its reads.
        report.ops.insert("bank".into(), [ok, refused, unknown]);
        eprintln!("bank: {ok} transfers acknowledged, {refused} refused, {unknown} unknown; {reads} reads");
    }
    report.anomalies.extend(ctx.anomalies.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("cp -a {} {} failed", from.display(), to.display())))
    }
}
