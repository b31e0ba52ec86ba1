//! `ringctl`: the operator's and developer's command line for a ringkv cluster.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringkv_client::report::{status, NodeRow, ShardDetail, ShardRow, Status};
use ringkv_client::{CertPaths, Client, ClientConfig};
use ringkv_wire::{ClientReply, ClientRequest, NodeState, PlacementReport};
use serde::Serialize;

/// Exit code of `get` for a key that does not exist.
const EXIT_NOT_FOUND: u8 = 3;
/// Exit code of `cas` when the current value did not match.
const EXIT_CAS_MISMATCH: u8 = 4;
/// Exit code when the cluster refused the command for the certificate's role.
const EXIT_PERMISSION_DENIED: u8 = 5;
/// Exit code when the cluster could not be reached or did not answer in time: retrying may help.
const EXIT_UNREACHABLE: u8 = 6;
/// Exit code when the cluster refused the command: retrying as it is will not help.
const EXIT_REFUSED: u8 = 7;
/// Exit code of `health` when the cluster is not healthy, and of `node drain` when leaderships
/// remain after `--max-wait`.
const EXIT_UNHEALTHY: u8 = 8;
const EXIT_CODES_HELP: &str = "Exit codes: 0 done; 1 error before anything reached the cluster (arguments of a command, \
configuration, certificate files); 2 usage; 3 `get` of a missing key; 4 `cas` whose expected value did not match; 5 the \
certificate's role may not do this; 6 the cluster could not be reached or did not answer in time (retrying may help); 7 \
the cluster refused the command; 8 `health` found a problem, or `node drain` ran out of time; 141 stdout was closed by its reader.";
/// Exit code when stdout was closed early (`ringctl status | head`): as a tool killed by SIGPIPE.
const EXIT_CLOSED_PIPE: i32 = 141;

/// `println!` that ends the program quietly when stdout has been closed by the reader (Rust's
/// `println!` panics there).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

/// A positive duration: `10s`, `5m`, `250ms`, `1h30m` (humantime), or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err("must be a positive duration".into()),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{e} (say e.g. 10s, 5m, 250ms)"))?,
    };
    if d.is_zero() {
        return Err("must be a positive duration".into());
    }
    Ok(d)
}

/// Ends the program after a failed write to stdout: quietly if the reader went away.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_CLOSED_PIPE);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

#[derive(Parser)]
#[command(name = "ringctl", version, about = "Administer and use a ringkv cluster", after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true, env = "RINGCTL_OUTPUT")]
    output: Output,
    /// Deadline for each command: `10s`, `5m`, `250ms`, or a number of seconds.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true, env = "RINGCTL_TIMEOUT")]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Target {
    /// The cluster.json written by `ringkv dev`.
    #[arg(long, global = true, conflicts_with = "endpoints", env = "RINGCTL_CLUSTER")]
    cluster: Option<PathBuf>,
    /// Client addresses of any nodes, comma separated.
    #[arg(long, global = true, value_delimiter = ',', env = "RINGCTL_ENDPOINTS")]
    endpoints: Option<Vec<String>>,
    /// Directory with ca.pem, client.pem and client.key.
    #[arg(long, global = true, env = "RINGCTL_CERTS")]
    certs: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store VALUE under KEY (VALUE `-` reads it from stdin).
    Put { key: String, value: String },
    /// Print the value of KEY (exit 3 if it does not exist).
    Get { key: String },
    /// Delete KEY.
    Delete { key: String },
    /// Add BY (default 1) to the integer under KEY (absent: 0) atomically; print the new value.
    Incr {
        key: String,
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Access tokens of the HTTP and Redis gateways.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Set KEY to NEW only if it currently holds OLD (or is absent); exit 4 if not.
    Cas {
        key: String,
        new: String,
        #[arg(long, conflicts_with = "expect_absent", required_unless_present = "expect_absent")]
        expect: Option<String>,
        #[arg(long)]
        expect_absent: bool,
    },
    /// Create the cluster from nodes started with `ringkv node --seeds` (send it to any of
    /// them; a cluster already created with this shape is left as it is).
    Init {
        #[arg(long)]
        shards: u64,
        #[arg(long, default_value_t = 3)]
        replication: usize,
    },
    /// Nodes, shards, leaders and replicas per node.
    Status,
    /// Every node reachable, ready and on the newest map, every shard led: exit 0 only then.
    Health,
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Shards of the cluster.
    #[command(subcommand)]
    Shard(ShardCmd),
    /// Shard leaders.
    #[command(subcommand)]
    Leader(LeaderCmd),
    /// Balance replicas and leaders: show the plan, start it, watch it.
    Rebalance(RebalanceArgs),
    /// The version of ringctl (also `--version`); needs no cluster.
    Version,
    /// Print a shell completion script: `ringctl completion bash > /etc/bash_completion.d/ringctl`.
    Completion { shell: clap_complete::Shell },
    /// Placement settings (balance, down time, move and snapshot limits).
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Certificates for a cluster.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it once (only its hash is stored: it cannot be shown again).
    Create {
        /// A unique name: 1-64 letters, digits, `-`, `_`, `.`.
        #[arg(long)]
        name: String,
        /// read (reads, status), write (and data writes) or admin.
        #[arg(long)]
        role: ringkv_wire::Role,
    },
    /// The tokens' names and roles.
    List,
    /// Revoke the token called NAME: it stops working on every node within a second or two,
    /// also on connections already open.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Every node with its state, replicas and leaders.
    List,
    /// Add the running node whose client address is ADDR (started without --join) to the
    /// cluster; rebalancing then fills it.
    Add { addr: String },
    /// Drain node ID: its replicas move to other nodes; `node remove` once it holds none.
    Decommission {
        id: u64,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Move every leadership off node ID (before restarting it) and keep new ones away until
    /// `node undrain ID` or its restart; waits until it leads nothing.
    Drain {
        id: u64,
        /// Give up waiting after this long (exit 8 if it still leads some groups).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        max_wait: Duration,
        /// Return once the node is draining, without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// End a drain: node ID takes leaderships again.
    Undrain { id: u64 },
    /// Forget node ID. Refused while it holds replicas, unless --force (its replicas are then
    /// rebuilt from the other replicas of each shard).
    Remove {
        id: u64,
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct RebalanceArgs {
    /// Show the plan (moves, bytes, stuck shards) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Show progress until the cluster is balanced.
    #[arg(long)]
    watch: bool,
    /// Give up watching after this long: `30m`, `90s`, or a number of seconds.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    max_wait: Duration,
}

#[derive(Subcommand)]
enum SettingsCmd {
    /// The placement settings in force.
    Show,
    /// Change placement settings at run time (only the ones given).
    Set {
        /// Balance replicas and leaders automatically (repair and drain always run).
        #[arg(long)]
        balance: Option<bool>,
        /// A node silent this long (ms) is down and its replicas are rebuilt elsewhere.
        #[arg(long)]
        down_after_ms: Option<u64>,
        /// Moves touching one node at once.
        #[arg(long)]
        max_moves_per_node: Option<u32>,
        /// Snapshot bytes per second one node sends.
        #[arg(long)]
        snapshot_bytes_per_sec: Option<u64>,
        /// Snapshot transfers one node sends at once.
        #[arg(long)]
        snapshot_concurrency: Option<u32>,
    },
}

#[derive(Subcommand)]
enum ShardCmd {
    /// Every shard with its range, replicas, leader and epoch.
    List,
    /// One shard: its replicas as each reports itself (role, term, applied index).
    Show { id: u64 },
}

#[derive(Subcommand)]
enum LeaderCmd {
    /// Make NODE (a replica of SHARD) the shard's leader, and wait until it is.
    Transfer { shard: u64, node: u64 },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a cluster CA in DIR (ca.pem, ca.key).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (`node-ID`) or a client certificate (`NAME`) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Issue a node certificate for this node id.
        #[arg(long, conflicts_with_all = ["client", "role"])]
        node: Option<u64>,
        /// Issue a client certificate with this name.
        #[arg(long)]
        client: Option<String>,
        /// The client's role: read (reads, status), write (and data writes) or admin (and
        /// placement, settings, leader transfer, bootstrap, join).
        #[arg(long, requires = "client")]
        role: Option<ringkv_wire::Role>,
        /// Extra DNS names or IP addresses of a node certificate (repeatable).
        #[arg(long = "san", requires = "node")]
        sans: Vec<ringkv_transport::certs::ExtraName>,
    },
}

fn client_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let mut cfg = if let Some(path) = &cli.target.cluster {
        let file = ringkv_config::cluster::ClusterFile::load(path)?;
        let c = &file.certs;
        ClientConfig::new(
            file.nodes.iter().map(|n| n.client_addr.clone()).collect(),
            CertPaths { ca: c.ca.clone(), cert: c.client_cert.clone(), key: c.client_key.clone() },
        )
    } else if let (Some(eps), Some(dir)) = (&cli.target.endpoints, &cli.target.certs) {
        ClientConfig::new(eps.clone(), CertPaths { ca: dir.join("ca.pem"), cert: dir.join("client.pem"), key: dir.join("client.key") })
    } else {
        anyhow::bail!("say which cluster: --cluster DIR/cluster.json, or --endpoints A,B --certs DIR");
    };
    cfg.timeout = cli.timeout;
    cfg.attempt_timeout = cfg.timeout.min(cfg.attempt_timeout);
    Ok(cfg)
}

/// `ringctl init`: to the first endpoint that answers.
async fn init(cfg: ClientConfig, shards: u64, replication: usize, timeout: Duration, json: bool) -> anyhow::Result<u8> {
    let endpoints = cfg.seeds.clone();
    let client = Client::unrouted(cfg)?;
    // Creating the cluster waits for the placement group's election.
    let wait = timeout.max(Duration::from_secs(40));
    let mut last = None;
    for addr in &endpoints {
        match client.call_node(addr, &ClientRequest::Init { shards, replication }, wait).await {
            Ok(Ok(ClientReply::Initialized { cluster_id, already })) => {
                if json {
                    out!(
                        "{}",
                        serde_json::json!({"cluster_id": cluster_id, "created": !already, "shards": shards, "replication": replication})
                    );
                } else if already {
                    out!("cluster {cluster_id} already exists with {shards} shards and replication {replication}; nothing to do");
                } else {
                    out!("cluster {cluster_id} created: {shards} shards, replication {replication}");
                }
                return Ok(0);
            }
            Ok(Ok(other)) => anyhow::bail!("{addr}: unexpected reply {other:?}"),
            Ok(Err(e)) => return Err(anyhow::Error::new(e).context(format!("init through {addr}"))),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("init through {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoints given")))
}

/// The client address of node `id`, from the map.
async fn node_addr(client: &Client, id: u64) -> anyhow::Result<String> {
    let map = client.refresh_map().await?;
    match map.node(id) {
        Some(n) if n.state != NodeState::Removed => Ok(n.client_addr.clone()),
        _ => Err(anyhow::Error::new(ringkv_wire::RequestError::NotPermitted(format!("node {id} is not in the cluster")))),
    }
}

/// Sends `req` to node `id` at `addr`, which answers `Done`.
async fn node_done(client: &Client, addr: &str, id: u64, req: ClientRequest, timeout: Duration) -> anyhow::Result<()> {
    match client.call_node(addr, &req, timeout).await.map_err(|e| anyhow::Error::new(e).context(format!("node {id} at {addr}")))? {
        Ok(ClientReply::Done) => Ok(()),
        Ok(other) => anyhow::bail!("node {id}: unexpected reply {other:?}"),
        Err(e) => Err(anyhow::Error::new(e).context(format!("node {id}"))),
    }
}

/// Waits until node `id` leads no group, showing how many it still leads; returns that count.
async fn wait_drained(client: &Client, addr: &str, id: u64, max_wait: Duration, json: bool) -> anyhow::Result<usize> {
    let started = std::time::Instant::now();
    let pb = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    let mut left = usize::MAX;
    loop {
        match client.call_node(addr, &ClientRequest::NodeStatus, Duration::from_secs(2)).await {
            Ok(Ok(ClientReply::NodeStatus(s))) => {
                left = s.groups.iter().filter(|g| g.is_leader).count();
                pb.set_message(format!("node {id}: {left} leaderships left"));
            }
            Ok(Ok(other)) => anyhow::bail!("node {id}: unexpected reply {other:?}"),
            Ok(Err(e)) => pb.set_message(format!("node {id}: {e}")),
            Err(e) => pb.set_message(format!("node {id} does not answer: {e}")),
        }
        pb.tick();
        if left == 0 || started.elapsed() >= max_wait {
            pb.finish_and_clear();
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Serialize)]
struct HealthRow {
    id: u64,
    state: String,
    reachable: bool,
    map_version: Option<u64>,
    leaders: usize,
    /// Replicas over the readiness lag behind their group's commit.
    replicas_behind: usize,
    draining: bool,
    ready: bool,
}

#[derive(Serialize)]
struct Health {
    healthy: bool,
    map_version: u64,
    nodes: Vec<HealthRow>,
    shards_without_leader: Vec<u64>,
    problems: Vec<String>,
}

async fn health(client: &Client) -> anyhow::Result<Health> {
    let map = client.refresh_map().await?;
    let listed: Vec<&ringkv_wire::NodeInfo> = map.nodes.iter().filter(|n| n.state != NodeState::Removed).collect();
    // node_reports asks the same nodes in the same order.
    let reports = client.node_reports().await;
    let newest = reports.iter().flatten().map(|r| r.map_version).chain([map.version]).max().unwrap_or(0);
    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    for (n, r) in listed.iter().zip(&reports) {
        let row = match r {
            Ok(s) => {
                if s.map_version < newest {
                    problems.push(format!("node {}: map version {}, the newest is {newest}", n.id, s.map_version));
                }
                problems.extend(s.not_ready.iter().map(|w| format!("node {}: not ready: {w}", n.id)));
                HealthRow {
                    id: n.id,
                    state: n.state.as_str().into(),
                    reachable: true,
                    map_version: Some(s.map_version),
                    leaders: s.groups.iter().filter(|g| g.is_leader && g.group != ringkv_wire::PLACEMENT_GROUP).count(),
                    replicas_behind: s.groups.iter().filter(|g| g.behind > 64).count(),
                    draining: s.draining,
                    ready: s.not_ready.is_empty(),
                }
            }
            Err(e) => {
                problems.push(format!("node {} unreachable: {e}", n.id));
                HealthRow {
                    id: n.id,
                    state: n.state.as_str().into(),
                    reachable: false,
                    map_version: None,
                    leaders: 0,
                    replicas_behind: 0,
                    draining: false,
                    ready: false,
                }
            }
        };
        nodes.push(row);
    }
    let ok: Vec<_> = reports.into_iter().flatten().collect();
    let led = ringkv_client::leaders_of(&ok);
    let shards_without_leader: Vec<u64> = map.shards.iter().map(|s| s.id).filter(|id| !led.contains_key(id)).collect();
    if !shards_without_leader.is_empty() {
        problems.push(format!("{} shards without a leader", shards_without_leader.len()));
    }
    if !ok.iter().any(|r| r.groups.iter().any(|g| g.group == ringkv_wire::PLACEMENT_GROUP && g.is_leader)) {
        problems.push("the placement group has no leader".into());
    }
    Ok(Health { healthy: problems.is_empty(), map_version: newest, nodes, shards_without_leader, problems })
}

/// Prints a table: a header line and one line per row, columns aligned (those in `right` to the
/// right), no borders.
fn print_table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    out!("{}", t.trim_fmt());
}

fn print_health(h: &Health) {
    let rows = h
        .nodes
        .iter()
        .map(|n| {
            let ready = if n.draining {
                "draining"
            } else if n.ready {
                "yes"
            } else {
                "no"
            };
            vec![
                n.id.to_string(),
                n.state.clone(),
                if n.reachable { "yes" } else { "no" }.into(),
                n.map_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                n.leaders.to_string(),
                n.replicas_behind.to_string(),
                ready.into(),
            ]
        })
        .collect();
    print_table(&["NODE", "STATE", "REACHABLE", "MAP", "LEADERS", "BEHIND", "READY"], &[3, 4, 5], rows);
    if h.healthy {
        out!("healthy: every node reachable and ready on map version {}, every shard led", h.map_version);
    } else {
        for p in &h.problems {
            out!("PROBLEM: {p}");
        }
    }
}

fn print_status(s: &Status) {
    print_nodes(&s.nodes);
    out!();
    print_shards(&s.shards);
    for (node, shard, why) in &s.quarantined {
        out!("QUARANTINED: node {node}'s replica of shard {shard} cannot start: {why}");
    }
}

fn print_nodes(nodes: &[NodeRow]) {
    let rows = nodes
        .iter()
        .map(|n| vec![n.id.to_string(), n.state.clone(), n.client_addr.clone(), n.replicas.to_string(), n.leaders.to_string()])
        .collect();
    print_table(&["NODE", "STATE", "CLIENT ADDR", "REPLICAS", "LEADERS"], &[3, 4], rows);
}

fn print_shards(shards: &[ShardRow]) {
    let leaderless = shards.iter().filter(|x| x.leader.is_none()).count();
    out!("{} shards, {} without a leader", shards.len(), leaderless);
    let rows = shards
        .iter()
        .map(|x| {
            vec![
                x.id.to_string(),
                format!("{:016x}", x.range[0]),
                format!("{:016x}", x.range[1]),
                x.replicas.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
                x.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                format!("{}.{}", x.epoch.conf_ver, x.epoch.version),
            ]
        })
        .collect();
    print_table(&["SHARD", "START", "END", "REPLICAS", "LEADER", "EPOCH"], &[], rows);
}

async fn shard_detail(client: &Client, id: u64) -> anyhow::Result<ShardDetail> {
    let map = client.refresh_map().await?;
    find_shard(&map, id)?;
    ringkv_client::report::shard_detail(client, id).await?.ok_or_else(|| anyhow::anyhow!("no shard {id}"))
}

fn find_shard(map: &ringkv_wire::ClusterMap, id: u64) -> anyhow::Result<&ringkv_wire::ShardDesc> {
    map.shard(id)
        .ok_or_else(|| anyhow::anyhow!("no shard {id} among the cluster's {} shards (`ringctl shard list` shows them)", map.shards.len()))
}

fn print_shard(s: &ShardDetail) {
    out!("shard {}  range {:016x}..{:016x}  epoch {}.{}", s.id, s.range[0], s.range[1], s.epoch.conf_ver, s.epoch.version);
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let rows = s
        .replicas
        .iter()
        .map(|r| {
            let voters = r.voters.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
            vec![r.node.to_string(), r.role.clone(), opt(r.term), opt(r.applied), voters]
        })
        .collect();
    print_table(&["NODE", "ROLE", "TERM", "APPLIED", "VOTERS"], &[2, 3], rows);
}

/// Asks the shard's leader to hand over to `node`, then waits until `node` reports itself leader.
async fn leader_transfer(client: &Client, shard: u64, node: u64) -> anyhow::Result<()> {
    let map = client.refresh_map().await?;
    let desc = find_shard(&map, shard)?;
    anyhow::ensure!(
        desc.replicas.contains(&node),
        "node {node} holds no replica of shard {shard} (its replicas are on nodes {:?}); only a replica can lead",
        desc.replicas
    );
    client.transfer_leader(shard, node).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let d = shard_detail(client, shard).await?;
        if d.leader == Some(node) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "shard {shard}: node {node} did not become leader within 10 s (leader now: {:?})",
            d.leader
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Prints `v` as pretty JSON or, for people, with `table`.
fn emit<T: Serialize>(json: bool, v: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(v)?);
    } else {
        table(v);
    }
    Ok(())
}

/// Asks before a destructive command, unless `--yes`; refuses when nobody can answer.
fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    anyhow::ensure!(std::io::IsTerminal::is_terminal(&std::io::stdin()), "{question} Refusing without a terminal to ask on; pass --yes");
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    anyhow::ensure!(matches!(line.trim(), "y" | "Y" | "yes"), "cancelled");
    Ok(())
}

async fn placement_report(client: &Client) -> anyhow::Result<PlacementReport> {
    match client.placement(&ClientRequest::PlacementStatus).await? {
        ClientReply::Placement(r) => Ok(*r),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn placement_done(client: &Client, req: ClientRequest) -> anyhow::Result<()> {
    match client.placement(&req).await? {
        ClientReply::Done => Ok(()),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_plan(r: &PlacementReport) {
    let moves: Vec<_> = r.plan.iter().filter(|p| p.kind == "move").collect();
    let transfers = r.plan.len() - moves.len();
    let bytes: u64 = moves.iter().map(|p| p.bytes).sum::<u64>() + r.moves.iter().map(|m| m.bytes).sum::<u64>();
    out!(
        "placement leader: node {}   balance: {}   {} moves running, {} planned, {} leader transfers planned, ~{} to copy",
        r.leader,
        if r.settings.balance { "on" } else { "off" },
        r.moves.len(),
        moves.len(),
        transfers,
        human_bytes(bytes)
    );
    let mut rows: Vec<Vec<String>> = r
        .moves
        .iter()
        .map(|m| {
            let stage = if m.last > 0 { format!("{} ({}/{})", m.stage, m.matched, m.last) } else { m.stage.clone() };
            let rec = &m.record;
            let ids = [rec.shard, rec.from, rec.to].map(|v| v.to_string());
            vec!["move (running)".into(), ids[0].clone(), ids[1].clone(), ids[2].clone(), rec.reason.clone(), human_bytes(m.bytes), stage]
        })
        .collect();
    for p in &r.plan {
        rows.push(vec![
            p.kind.clone(),
            p.shard.to_string(),
            p.from.to_string(),
            p.to.to_string(),
            p.reason.clone(),
            human_bytes(p.bytes),
            "planned".into(),
        ]);
    }
    if !rows.is_empty() {
        print_table(&["OPERATION", "SHARD", "FROM", "TO", "REASON", "BYTES", "STAGE"], &[5], rows);
    }
    for (shard, why) in &r.stuck {
        out!("stuck: shard {shard}: {why}");
    }
    if r.balanced {
        out!("balanced: every up node is within ±1 of the mean in replicas and leaders");
    }
}

fn remaining(r: &PlacementReport) -> u64 {
    (r.moves.len() + r.plan.len()) as u64
}

/// Shows progress until the placement leader reports the cluster balanced.
async fn watch(client: &Client, max_wait: Duration, json: bool) -> anyhow::Result<PlacementReport> {
    let started = std::time::Instant::now();
    let mut total = 0u64;
    let mut shown: Vec<String> = Vec::new();
    let pb = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} operations, ETA {eta}  {msg}")
    {
        pb.set_style(style);
    }
    loop {
        let r = match placement_report(client).await {
            Ok(r) => r,
            // The placement leader may be changing: keep watching.
            Err(e) => {
                pb.set_message(format!("waiting for the placement leader: {e}"));
                anyhow::ensure!(started.elapsed() < max_wait, "not balanced after {max_wait:?}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let left = remaining(&r);
        total = total.max(pb.position() + left);
        pb.set_length(total);
        pb.set_position(total - left);
        let stuck = r.stuck.iter().map(|(s, why)| format!("shard {s}: {why}")).collect::<Vec<_>>();
        // Every stuck shard with its reason, each time the set changes.
        if stuck != shown {
            for line in stuck.iter().filter(|l| !shown.contains(l)) {
                pb.println(format!("stuck: {line}"));
            }
            shown = stuck.clone();
        }
        pb.set_message(match stuck.first() {
            Some(first) => format!("{} stuck; {first}", stuck.len()),
            None => format!("{} running", r.moves.len()),
        });
        if r.balanced {
            pb.finish_with_message("balanced");
            return Ok(r);
        }
        if started.elapsed() >= max_wait {
            pb.abandon();
            anyhow::bail!("not balanced after {max_wait:?}; stuck: {}", if stuck.is_empty() { "nothing".into() } else { stuck.join("; ") });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Cmd::Completion { shell } = &cli.cmd {
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "ringctl", &mut script);
        if let Err(e) = std::io::stdout().write_all(&script) {
            stdout_failed(e);
        }
        return Ok(0);
    }
    if let Cmd::Version = &cli.cmd {
        let v = env!("CARGO_PKG_VERSION");
        emit(cli.output == Output::Json, &serde_json::json!({ "ringctl": v }), |_| out!("ringctl {v}"))?;
        return Ok(0);
    }
    if let Cmd::Cert(c) = &cli.cmd {
        match c {
            CertCmd::Init { dir } => {
                ringkv_transport::certs::init_ca(dir)?;
                out!("created {}", dir.join("ca.pem").display());
            }
            CertCmd::Issue { dir, node, client, role, sans } => {
                let out = match (node, client) {
                    (Some(id), None) => ringkv_transport::certs::issue_node(dir, dir, *id, sans)?,
                    (None, Some(name)) => ringkv_transport::certs::issue_client(dir, dir, name, role.unwrap_or(ringkv_wire::ROLE_DEFAULT))?,
                    _ => anyhow::bail!("say --node ID or --client NAME"),
                };
                out!("created {} and {}", out.cert.display(), out.key.display());
            }
        }
        return Ok(0);
    }
    let cfg = client_config(&cli)?;
    let json = cli.output == Output::Json;
    if let Cmd::Init { shards, replication } = &cli.cmd {
        return init(cfg, *shards, *replication, cli.timeout, json).await;
    }
    let client = Client::connect(cfg).await?;
    let code = match &cli.cmd {
        Cmd::Put { key, value } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf)?;
                buf
            } else {
                value.clone().into_bytes()
            };
            client.put(key.as_bytes(), &value).await?;
            if json {
                out!("{}", serde_json::json!({"ok": true}));
            }
            0
        }
        Cmd::Get { key } => match client.get(key.as_bytes()).await? {
            Some(v) => {
                if json {
                    out!("{}", serde_json::json!({"key": key, "value": String::from_utf8_lossy(&v)}));
                } else {
                    if let Err(e) = std::io::stdout().write_all(&v) {
                        stdout_failed(e);
                    }
                    out!();
                }
                0
            }
            None => {
                if json {
                    out!("{}", serde_json::json!({"key": key, "value": null}));
                }
                eprintln!("key not found");
                EXIT_NOT_FOUND
            }
        },
        Cmd::Delete { key } => {
            client.delete(key.as_bytes()).await?;
            if json {
                out!("{}", serde_json::json!({"ok": true}));
            }
            0
        }
        Cmd::Incr { key, by } => {
            let n = client.incr(key.as_bytes(), *by).await?;
            if json {
                out!("{}", serde_json::json!({"key": key, "value": n}));
            } else {
                out!("{n}");
            }
            0
        }
        Cmd::Token(TokenCmd::Create { name, role }) => {
            let token = client.create_token(name, *role).await?;
            if json {
                out!("{}", serde_json::json!({"name": name, "role": role.as_str(), "token": token}));
            } else {
                out!("{token}");
                eprintln!("token `{name}` ({role}) created; it is shown only now");
            }
            0
        }
        Cmd::Token(TokenCmd::List) => {
            let tokens = match client.placement(&ClientRequest::ListTokens).await? {
                ClientReply::Tokens(t) => t,
                other => anyhow::bail!("unexpected reply {other:?}"),
            };
            let rows: Vec<serde_json::Value> =
                tokens.iter().map(|t| serde_json::json!({"name": t.name, "role": t.role.as_str()})).collect();
            emit(json, &rows, |_| {
                print_table(&["NAME", "ROLE"], &[], tokens.iter().map(|t| vec![t.name.clone(), t.role.to_string()]).collect())
            })?;
            0
        }
        Cmd::Token(TokenCmd::Revoke { name }) => {
            placement_done(&client, ClientRequest::RevokeToken { name: name.clone() }).await?;
            if json {
                out!("{}", serde_json::json!({"name": name, "revoked": true}));
            } else {
                out!("token `{name}` revoked");
            }
            0
        }
        Cmd::Cas { key, new, expect, expect_absent: _ } => {
            let out = client.compare_and_swap(key.as_bytes(), expect.as_deref().map(str::as_bytes), new.as_bytes()).await?;
            let current = out.current.as_ref().map(|c| String::from_utf8_lossy(c).into_owned());
            if json {
                out!("{}", serde_json::json!({"swapped": out.swapped, "current": current}));
            }
            if out.swapped {
                0
            } else {
                eprintln!("{}", current.unwrap_or_else(|| "(absent)".into()));
                EXIT_CAS_MISMATCH
            }
        }
        Cmd::Status => {
            emit(json, &status(&client).await?, print_status)?;
            0
        }
        Cmd::Health => {
            let h = health(&client).await?;
            emit(json, &h, print_health)?;
            if h.healthy {
                0
            } else {
                EXIT_UNHEALTHY
            }
        }
        Cmd::Node(NodeCmd::Drain { id, max_wait, no_wait }) => {
            let addr = node_addr(&client, *id).await?;
            node_done(&client, &addr, *id, ClientRequest::Drain { on: true }, cli.timeout).await?;
            let left = if *no_wait { None } else { Some(wait_drained(&client, &addr, *id, *max_wait, json).await?) };
            if json {
                out!("{}", serde_json::json!({"node": id, "draining": true, "leaders": left}));
            }
            match left {
                Some(0) => {
                    if !json {
                        out!("node {id} is drained: it leads nothing and takes no leadership until `ringctl node undrain {id}` or its restart");
                    }
                    0
                }
                Some(n) => {
                    eprintln!("node {id} still leads {n} groups after {max_wait:?}; it stays draining");
                    EXIT_UNHEALTHY
                }
                None => {
                    if !json {
                        out!("node {id} is draining");
                    }
                    0
                }
            }
        }
        Cmd::Node(NodeCmd::Undrain { id }) => {
            let addr = node_addr(&client, *id).await?;
            node_done(&client, &addr, *id, ClientRequest::Drain { on: false }, cli.timeout).await?;
            if json {
                out!("{}", serde_json::json!({"node": id, "draining": false}));
            } else {
                out!("node {id} takes leaderships again");
            }
            0
        }
        Cmd::Node(NodeCmd::List) => {
            emit(json, &status(&client).await?.nodes, |n| print_nodes(n))?;
            0
        }
        Cmd::Shard(ShardCmd::List) => {
            emit(json, &status(&client).await?.shards, |s| print_shards(s))?;
            0
        }
        Cmd::Shard(ShardCmd::Show { id }) => {
            emit(json, &shard_detail(&client, *id).await?, print_shard)?;
            0
        }
        Cmd::Leader(LeaderCmd::Transfer { shard, node }) => {
            leader_transfer(&client, *shard, *node).await?;
            if json {
                out!("{}", serde_json::json!({"shard": shard, "leader": node}));
            } else {
                out!("shard {shard}: node {node} is the leader");
            }
            0
        }
        Cmd::Node(NodeCmd::Add { addr }) => {
            let map = client.refresh_map().await?;
            let through: Vec<String> = map.nodes.iter().filter(|n| n.state == NodeState::Up).map(|n| n.client_addr.clone()).collect();
            let wait = cli.timeout.max(Duration::from_secs(30));
            let id = match client.call_node(addr, &ClientRequest::Identify, wait).await? {
                Ok(ClientReply::Identity(n)) => n.id,
                Ok(other) => anyhow::bail!("{addr}: unexpected reply {other:?}"),
                Err(e) => return Err(anyhow::Error::new(e).context(addr.clone())),
            };
            match client.call_node(addr, &ClientRequest::JoinCluster { through }, wait).await? {
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("node {id} at {addr} did not join"))),
            }
            if json {
                out!("{}", serde_json::json!({"node": id, "state": "joining"}));
            } else {
                out!("node {id} joined; it comes up with its first heartbeat and rebalancing fills it (`ringctl rebalance --watch`)");
            }
            0
        }
        Cmd::Node(NodeCmd::Decommission { id, yes }) => {
            let map = client.refresh_map().await?;
            let held = map.replicas_on(*id);
            confirm(&format!("Decommission node {id}? Its {held} replicas move to other nodes."), *yes)?;
            placement_done(&client, ClientRequest::SetNodeState { node: *id, state: NodeState::Decommissioning, force: false }).await?;
            if json {
                out!("{}", serde_json::json!({"node": id, "state": "decommissioning", "replicas": held}));
            } else {
                out!(
                    "node {id} is decommissioning: {held} replicas to move (`ringctl rebalance --watch`; then `ringctl node remove {id}`)"
                );
            }
            0
        }
        Cmd::Node(NodeCmd::Remove { id, force, yes }) => {
            let map = client.refresh_map().await?;
            let held = map.replicas_on(*id);
            let what = if held > 0 && *force {
                format!(" It still holds {held} replicas, which will be rebuilt from the others.")
            } else {
                String::new()
            };
            confirm(&format!("Remove node {id} from the cluster for good?{what}"), *yes)?;
            placement_done(&client, ClientRequest::SetNodeState { node: *id, state: NodeState::Removed, force: *force }).await?;
            if json {
                out!("{}", serde_json::json!({"node": id, "state": "removed"}));
            } else {
                out!("node {id} removed; stop its process and keep its id retired");
            }
            0
        }
        Cmd::Rebalance(a) => {
            let mut r = placement_report(&client).await?;
            if !a.dry_run && !r.settings.balance {
                let settings = ringkv_wire::PlacementSettings { balance: true, ..r.settings.clone() };
                placement_done(&client, ClientRequest::SetPlacementSettings { settings }).await?;
                r = placement_report(&client).await?;
            }
            if a.watch && !a.dry_run {
                if !json {
                    print_plan(&r);
                }
                r = watch(&client, a.max_wait, json).await?;
                if !json {
                    out!("balanced: every up node is within ±1 of the mean in replicas and leaders");
                }
            }
            if json {
                out!("{}", serde_json::to_string_pretty(&r)?);
            } else if !a.watch || a.dry_run {
                print_plan(&r);
            }
            0
        }
        Cmd::Settings(SettingsCmd::Show) => {
            emit(json, &placement_report(&client).await?.settings, |s| {
                out!("balance                 {}", if s.balance { "on" } else { "off" });
                out!("down_after_ms           {}", s.down_after_ms);
                out!("max_moves_per_node      {}", s.max_moves_per_node);
                out!("snapshot_bytes_per_sec  {}", s.snapshot_bytes_per_sec);
                out!("snapshot_concurrency    {}", s.snapshot_concurrency);
            })?;
            0
        }
        Cmd::Settings(SettingsCmd::Set { balance, down_after_ms, max_moves_per_node, snapshot_bytes_per_sec, snapshot_concurrency }) => {
            let mut s = placement_report(&client).await?.settings;
            s.balance = balance.unwrap_or(s.balance);
            s.down_after_ms = down_after_ms.unwrap_or(s.down_after_ms);
            s.max_moves_per_node = max_moves_per_node.unwrap_or(s.max_moves_per_node);
            s.snapshot_bytes_per_sec = snapshot_bytes_per_sec.unwrap_or(s.snapshot_bytes_per_sec);
            s.snapshot_concurrency = snapshot_concurrency.unwrap_or(s.snapshot_concurrency);
            placement_done(&client, ClientRequest::SetPlacementSettings { settings: s.clone() }).await?;
            emit(json, &s, |s| out!("{s:#?}"))?;
            0
        }
        Cmd::Cert(_) | Cmd::Version | Cmd::Completion { .. } | Cmd::Init { .. } => 0,
    };
    client.close();
    Ok(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// The exit code of a failed command (see `EXIT_CODES_HELP`).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    use ringkv_wire::RequestError;
    let of_request = |r: &RequestError| match r {
        RequestError::PermissionDenied { .. } => EXIT_PERMISSION_DENIED,
        r if r.retryable() => EXIT_UNREACHABLE,
        _ => EXIT_REFUSED,
    };
    for c in e.chain() {
        match c.downcast_ref::<ringkv_client::Error>() {
            Some(ringkv_client::Error::Request(r)) => return of_request(r),
            Some(ringkv_client::Error::Tls(_) | ringkv_client::Error::Config(_)) => return 1,
            Some(_) => return EXIT_UNREACHABLE,
            None => {}
        }
        if let Some(r) = c.downcast_ref::<RequestError>() {
            return of_request(r);
        }
        if c.downcast_ref::<ringkv_transport::rpc::RpcError>().is_some() {
            return EXIT_UNREACHABLE;
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_their_exit_codes() {
        use ringkv_wire::RequestError;
        let client = |e: ringkv_client::Error| exit_code_of(&anyhow::Error::new(e).context("while doing it"));
        assert_eq!(client(ringkv_client::Error::Deadline { deadline: Duration::from_secs(1), last: "x".into() }), EXIT_UNREACHABLE);
        assert_eq!(client(ringkv_client::Error::Request(RequestError::Unavailable("x".into()))), EXIT_UNREACHABLE);
        assert_eq!(client(ringkv_client::Error::Request(RequestError::NotPermitted("x".into()))), EXIT_REFUSED);
        assert_eq!(client(ringkv_client::Error::Config("x".into())), 1);
        let denied = RequestError::PermissionDenied { request: "x".into(), needed: ringkv_wire::Role::Admin, has: "y".into() };
        assert_eq!(exit_code_of(&anyhow::Error::new(denied)), EXIT_PERMISSION_DENIED);
        assert_eq!(exit_code_of(&anyhow::anyhow!("no shard 99")), 1);
    }

    #[test]
    fn durations_take_units_or_plain_seconds_and_must_be_positive() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "0s", "-1", "NaN", "inf", "ten", "10 parsecs", ""] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn completion_scripts_name_the_commands() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "ringctl", &mut script);
            let text = String::from_utf8_lossy(&script);
            assert!(text.contains("rebalance") && text.contains("decommission"), "{shell}: {text}");
        }
    }
}
