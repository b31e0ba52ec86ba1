//! `ringkv`: run a node, or a whole local cluster for development.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringkv_node::config::{NodeConfig, Overrides};
use ringkv_node::dev::{DevCluster, DevOptions};

/// jemalloc for Rust's allocations (RocksDB's C++ keeps the system allocator): with about a
/// thousand Raft groups per node it keeps 13 % less memory resident than glibc's malloc
/// (bench/RESULTS.md, "jemalloc").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "ringkv", version, about = "ringkv: a sharded, replicated key-value store")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at startup: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run one node. The first start needs id, addresses and certificates; later starts only
    /// --data-dir.
    Node(NodeArgs),
    /// Start a local cluster on loopback and keep it running until Ctrl-C.
    Dev(DevArgs),
}

#[derive(Subcommand)]
enum DevCmd {
    /// Add a node to the running dev cluster in --data-dir; returns once it is up.
    AddNode {
        #[arg(long, default_value = "./data/dev")]
        data_dir: PathBuf,
        /// Give up waiting for the node after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Args)]
struct NodeArgs {
    /// Where the node keeps its identity and data.
    #[arg(long)]
    data_dir: PathBuf,
    /// A TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<u64>,
    #[arg(long)]
    peer_addr: Option<String>,
    /// The peer address other nodes dial, if not `--peer-addr` (NAT, proxy, port mapping).
    #[arg(long)]
    advertise_peer_addr: Option<String>,
    #[arg(long)]
    client_addr: Option<String>,
    /// The client address clients and other nodes dial, if not `--client-addr` (a wildcard
    /// bind, NAT, a port mapping).
    #[arg(long)]
    advertise_client_addr: Option<String>,
    #[arg(long)]
    metrics_addr: Option<String>,
    /// The metrics address the cluster map lists, if not `--metrics-addr`.
    #[arg(long)]
    advertise_metrics_addr: Option<String>,
    /// Serve the HTTP gateway (`/v1/kv/{key}`) here; plaintext binds to loopback only unless
    /// `[gateway] tls = true`.
    #[arg(long)]
    http_addr: Option<String>,
    /// Serve the Redis-protocol gateway here (same rule as --http-addr).
    #[arg(long)]
    resp_addr: Option<String>,
    /// The cluster CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Peer addresses of placement members to learn the cluster map from.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    /// Join an existing cluster through these members' client addresses, tried in turn
    /// (comma-separated; first start only).
    #[arg(long, value_delimiter = ',')]
    join: Option<Vec<String>>,
    /// Accept fault-injection requests (tests only).
    #[arg(long)]
    fault_injection: bool,
    /// Print the resolved configuration (stored identity, then --config, then flags, then
    /// defaults) as TOML and exit without starting or writing anything.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
    #[command(subcommand)]
    cmd: Option<DevCmd>,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 64)]
    shards: u64,
    #[arg(long, default_value_t = 3)]
    replication: usize,
    #[arg(long, default_value = "./data/dev")]
    data_dir: PathBuf,
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn node(a: NodeArgs) -> anyhow::Result<()> {
    // Caught from here on: SIGTERM during the start stops the node cleanly once it is up.
    let stop = ringkv_node::stop_signals()?;
    let o = Overrides {
        id: a.id,
        peer_addr: a.peer_addr,
        advertise_peer_addr: a.advertise_peer_addr,
        client_addr: a.client_addr,
        advertise_client_addr: a.advertise_client_addr,
        metrics_addr: a.metrics_addr,
        advertise_metrics_addr: a.advertise_metrics_addr,
        http_addr: a.http_addr,
        resp_addr: a.resp_addr,
        ca: a.ca,
        cert: a.cert,
        key: a.key,
        seeds: a.seeds,
        join: a.join,
        fault_injection: a.fault_injection.then_some(true),
    };
    let cfg = NodeConfig::resolve(&a.data_dir, a.config.as_deref(), o)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    ringkv_node::run(cfg, stop).await?;
    Ok(())
}

async fn dev(a: DevArgs) -> anyhow::Result<()> {
    let stop = ringkv_node::stop_signals()?;
    if let Some(DevCmd::AddNode { data_dir, timeout }) = a.cmd {
        let e = ringkv_node::dev::add_node_to_running(&data_dir, std::time::Duration::from_secs(timeout)).await?;
        eprintln!("node {} is up: client {} metrics http://{}/metrics; rebalancing fills it", e.id, e.client_addr, e.metrics_addr);
        return Ok(());
    }
    let binary = std::env::current_exe()?;
    let fresh = !a.data_dir.join(ringkv_node::dev::CLUSTER_FILE).exists();
    eprintln!("{} a {}-node cluster in {} ...", if fresh { "starting" } else { "restarting" }, a.nodes, a.data_dir.display());
    let opts = DevOptions {
        nodes: a.nodes,
        shards: a.shards,
        replication: a.replication,
        data_dir: a.data_dir.clone(),
        binary,
        fault_injection: false,
        extra_config: None,
        netns: None,
        hold_back: vec![],
        bootstrap: true,
    };
    let mut cluster = DevCluster::start(opts).await?;
    cluster.set_supervisor(Some(std::process::id()))?;
    let file = a.data_dir.join(ringkv_node::dev::CLUSTER_FILE);
    eprintln!("cluster ready: {} nodes", cluster.file.nodes.len());
    let none = || "-".to_string();
    for n in &cluster.file.nodes {
        let pid = n.pid.map(|p| p.to_string()).unwrap_or_else(none);
        let http = n.http_addr.clone().unwrap_or_else(none);
        let resp = n.resp_addr.clone().unwrap_or_else(none);
        eprintln!("  node {}: client {} http {http} redis {resp} metrics http://{}/metrics pid {pid}", n.id, n.client_addr, n.metrics_addr);
    }
    eprintln!("try:  ringctl --cluster {} put hello world && ringctl --cluster {} get hello", file.display(), file.display());
    let app_token = a.data_dir.join(ringkv_node::dev::APP_TOKEN_FILE);
    if let Some(n) = cluster.file.nodes.first() {
        if let (Some(http), Some(resp)) = (&n.http_addr, &n.resp_addr) {
            let t = app_token.display();
            eprintln!("      curl -H \"Authorization: Bearer $(cat {t})\" http://{http}/v1/kv/hello");
            let (host, port) = resp.rsplit_once(':').unwrap_or((resp.as_str(), "6379"));
            eprintln!("      redis-cli -h {host} -p {port} -a \"$(cat {t})\" --no-auth-warning get hello");
        }
    }
    eprintln!("Ctrl-C stops the cluster; running `ringkv dev` again restarts it with its data.");
    let watch = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            for (id, status) in cluster.exited() {
                eprintln!("node {id} exited: {status}");
            }
            match cluster.adopt_new_nodes() {
                Ok(ids) => ids.iter().for_each(|id| eprintln!("node {id} added; it joins the cluster")),
                Err(e) => eprintln!("cannot start added nodes: {e:#}"),
            }
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = watch => {}
    }
    eprintln!("stopping the cluster ...");
    for (id, why) in cluster.stop_all().await {
        eprintln!("node {id} {why}");
    }
    cluster.set_supervisor(None)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // A panic anywhere (a bug, or a crash point the fault tests trigger) takes the whole node
    // down, as a crash would: a node with one dead task could go on serving half a group.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    // Crash points named in the FAILPOINTS environment variable (only with the `failpoints`
    // feature; the fault tests use it).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Node(a) => node(a).await,
            Cmd::Dev(a) => dev(a).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
