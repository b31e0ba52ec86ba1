//! `ringkv-bench`: see `ringkv-bench --help` and bench/README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringkv_bench::sweep::{self, SweepParam, Target};
use ringkv_bench::target::{find_ringkv, LocalSpec};
use ringkv_bench::workload::{min_key_size, KeyDist, Workload};
use ringkv_bench::{plot, RunSpec};

#[derive(Parser)]
#[command(name = "ringkv-bench", version, about = "YCSB-style benchmarks of a ringkv cluster")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run once per value of one parameter; JSON and plots of throughput and latency against it.
    Sweep(SweepArgs),
    /// CPU and memory of idle nodes as the number of shards grows (fresh local clusters).
    Idle(IdleArgs),
    /// Wait for runs from a coordinator (`ringkv-bench --hosts`) and load the given cluster.
    Agent(AgentArgs),
    /// Draw the plots of a sweep or idle JSON file.
    Plot(PlotArgs),
    /// Drive the placement planner alone over a simulated cluster: nodes joining, nodes lost.
    PlacementSim(SimArgs),
}

#[derive(Args)]
struct SimArgs {
    #[arg(long, default_value_t = 1000)]
    nodes: u64,
    #[arg(long, default_value_t = 100_000)]
    shards: u64,
    /// Nodes that join, in the first scenario.
    #[arg(long, default_value_t = 100)]
    add: u64,
    /// Nodes lost for good, in the second scenario.
    #[arg(long, default_value_t = 10)]
    lose: u64,
    /// Moves touching one node at once.
    #[arg(long, default_value_t = 4)]
    max_moves_per_node: usize,
    /// Leader transfers planned per round.
    #[arg(long, default_value_t = 64)]
    max_leader_transfers: usize,
    #[arg(long, default_value_t = 100_000)]
    rounds_max: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 500ms, 20s, 2m)"))
}

#[derive(Args, Clone)]
struct LocalArgs {
    /// Nodes of a --local cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Replicas per shard of a --local cluster.
    #[arg(long, default_value_t = 3)]
    replication: usize,
    /// Whether --local nodes fsync their write-ahead log before acknowledging a write.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    fsync: OnOff,
    /// Where a --local cluster keeps its data (a fresh subdirectory; default: the temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The `ringkv` binary for --local (default: beside this one, then PATH).
    #[arg(long)]
    ringkv_bin: Option<PathBuf>,
    /// A TOML file appended to every --local node's configuration (e.g. other Raft timers), to
    /// compare settings on one binary.
    #[arg(long)]
    node_config: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Start a fresh local cluster, run against it, and tear it down (its logs are kept if the
    /// run fails).
    #[arg(long)]
    local: bool,
    /// Run against the running cluster of this cluster file (as `ringkv dev` writes).
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Drive the load from these agents at once (`ringkv-bench agent` on each) and merge.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    hosts: Option<Vec<String>>,
    #[command(flatten)]
    local_args: LocalArgs,
    /// Shards of a --local cluster.
    #[arg(long, default_value_t = 64)]
    shards: u64,
    #[arg(long, value_enum, default_value_t = Workload::A)]
    workload: Workload,
    #[arg(long, value_enum, default_value_t = KeyDist::Uniform)]
    distribution: KeyDist,
    /// Skew of the zipfian distribution.
    #[arg(long, default_value_t = 0.99)]
    zipf_theta: f64,
    /// Size of the key space.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key size in bytes (default: the fewest digits that number every key).
    #[arg(long)]
    key_size: Option<usize>,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Client instances, each with its own connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    #[arg(long, value_parser = duration, default_value = "5s")]
    warmup: Duration,
    #[arg(long, value_parser = duration, default_value = "20s")]
    duration: Duration,
    /// Open loop at this many operations per second in all (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Skip writing every key before the run (by default reading workloads preload).
    #[arg(long)]
    no_preload: bool,
    /// Deadline of one operation, retries included.
    #[arg(long, value_parser = duration, default_value = "10s")]
    timeout: Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the result as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct SweepArgs {
    #[arg(long, value_enum)]
    param: SweepParam,
    /// The values, e.g. 1,8,64,256,1024.
    #[arg(long, value_delimiter = ',', required = true)]
    values: Vec<u64>,
    /// Also draw the plots into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct IdleArgs {
    /// Shard counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256,1024")]
    shards: Vec<u64>,
    /// Time the cluster gets to elect leaders and settle before measuring.
    #[arg(long, value_parser = duration, default_value = "10s")]
    settle: Duration,
    /// How long CPU is measured.
    #[arg(long, value_parser = duration, default_value = "15s")]
    window: Duration,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    plots: Option<PathBuf>,
    #[command(flatten)]
    local: LocalArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// Address to wait for the coordinator on.
    #[arg(long, default_value = "0.0.0.0:7900")]
    listen: String,
    /// The cluster to load.
    #[arg(long, value_name = "FILE")]
    cluster: PathBuf,
}

#[derive(Args)]
struct PlotArgs {
    /// A sweep or idle JSON file.
    json: PathBuf,
    /// Directory for the SVG files.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn local_spec(a: &LocalArgs, shards: u64) -> anyhow::Result<LocalSpec> {
    Ok(LocalSpec {
        nodes: a.nodes,
        shards,
        replication: a.replication,
        fsync: a.fsync == OnOff::On,
        dir: a.data_dir.clone(),
        binary: find_ringkv(a.ringkv_bin.as_deref())?,
        node_config: match &a.node_config {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--node-config {}: {e}", p.display()))?),
            None => None,
        },
    })
}

impl RunArgs {
    fn target(&self) -> anyhow::Result<Target> {
        let chosen = [self.local, self.cluster.is_some(), self.hosts.is_some()].iter().filter(|b| **b).count();
        anyhow::ensure!(chosen == 1, "choose one target: --local, --cluster FILE or --hosts HOST:PORT,...");
        Ok(if self.local {
            Target::Local(local_spec(&self.local_args, self.shards)?)
        } else if let Some(c) = &self.cluster {
            Target::Cluster(c.clone())
        } else {
            Target::Hosts(self.hosts.clone().unwrap_or_default())
        })
    }

    fn spec(&self) -> anyhow::Result<RunSpec> {
        let spec = RunSpec {
            workload: self.workload,
            distribution: self.distribution,
            zipf_theta: self.zipf_theta,
            keys: self.keys,
            key_size: self.key_size.unwrap_or_else(|| min_key_size(self.keys)),
            value_size: self.value_size,
            clients: self.clients,
            inflight: self.inflight,
            warmup_ms: self.warmup.as_millis() as u64,
            duration_ms: self.duration.as_millis() as u64,
            rate: self.rate,
            preload: self.workload.reads() && !self.no_preload,
            timeout_ms: self.timeout.as_millis() as u64,
            seed: self.seed,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn label(&self) -> String {
        let mut s = format!("workload {:?}, {:?}", self.workload, self.distribution).to_lowercase();
        if self.local {
            let l = &self.local_args;
            s.push_str(&format!(", {} nodes, fsync {}", l.nodes, if l.fsync == OnOff::On { "on" } else { "off" }));
        }
        s
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        None => {
            let (target, spec) = (cli.run.target()?, cli.run.spec()?);
            let result = sweep::run(&target, &spec).await?.compact();
            print!("{}", result.table());
            if let Some(p) = &cli.run.json {
                write_json(p, &result)?;
            }
        }
        Some(Cmd::Sweep(a)) => {
            let (target, spec) = (a.run.target()?, a.run.spec()?);
            let save = |r: &sweep::SweepResult| {
                if let Some(p) = &a.run.json {
                    if let Err(e) = write_json(p, r) {
                        eprintln!("cannot save {}: {e}", p.display());
                    }
                }
            };
            let result = sweep::sweep(a.param, &a.values, &spec, &target, a.run.label(), save).await?;
            print!("{}", result.table());
            if let Some(dir) = &a.plots {
                for p in plot::sweep(&result, dir)? {
                    eprintln!("wrote {}", p.display());
                }
            }
        }
        Some(Cmd::Idle(a)) => {
            let local = local_spec(&a.local, 1)?;
            let save = |r: &sweep::IdleResult| {
                if let Some(p) = &a.json {
                    if let Err(e) = write_json(p, r) {
                        eprintln!("cannot save {}: {e}", p.display());
                    }
                }
            };
            let result = sweep::idle(&local, &a.shards, a.settle, a.window, save).await?;
            print!("{}", result.table());
            if let Some(dir) = &a.plots {
                for p in plot::idle(&result, dir)? {
                    eprintln!("wrote {}", p.display());
                }
            }
        }
        Some(Cmd::Agent(a)) => {
            let config = ringkv_bench::target::cluster_file(&a.cluster)?;
            let listener = tokio::net::TcpListener::bind(&a.listen).await.map_err(|e| anyhow::anyhow!("--listen {}: {e}", a.listen))?;
            eprintln!("agent waiting for runs on {}", listener.local_addr()?);
            ringkv_bench::agent::serve(listener, config).await?;
        }
        Some(Cmd::PlacementSim(a)) => {
            anyhow::ensure!(a.nodes >= 3 && a.shards >= 1, "a simulation needs at least 3 nodes and 1 shard");
            anyhow::ensure!(a.lose + 3 <= a.nodes, "--lose {} leaves fewer than 3 of {} nodes", a.lose, a.nodes);
            let spec = ringkv_bench::placement_sim::SimSpec {
                nodes: a.nodes,
                shards: a.shards,
                add: a.add,
                lose: a.lose,
                config: ringkv_placement::planner::PlannerConfig {
                    max_moves_per_node: a.max_moves_per_node,
                    max_leader_transfers: a.max_leader_transfers,
                    ..Default::default()
                },
                rounds_max: a.rounds_max,
            };
            let results = ringkv_bench::placement_sim::run(&spec);
            print!("{}", ringkv_bench::placement_sim::table(&results));
            if let Some(p) = &a.json {
                write_json(p, &serde_json::json!({ "spec": spec, "results": results }))?;
            }
        }
        Some(Cmd::Plot(a)) => {
            let text = std::fs::read_to_string(&a.json).map_err(|e| anyhow::anyhow!("{}: {e}", a.json.display()))?;
            let written = match (serde_json::from_str::<sweep::SweepResult>(&text), serde_json::from_str::<sweep::IdleResult>(&text)) {
                (Ok(s), _) => plot::sweep(&s, &a.out)?,
                (_, Ok(i)) => plot::idle(&i, &a.out)?,
                (Err(s), Err(i)) => {
                    anyhow::bail!("{}: neither a sweep result ({s}) nor an idle result ({i})", a.json.display())
                }
            };
            for p in written {
                eprintln!("wrote {}", p.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
