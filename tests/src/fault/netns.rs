//! The network namespace a fault-test cluster runs in, and the nftables rules that cut links
//! inside it. Every node listens on its own address `127.0.1.ID`, so a rule on the pair of
//! addresses drops one direction of one link. The namespace (and every process left in it) is
//! removed when the [`Netns`] is dropped; namespaces of test processes that died are swept away
//! by the next run.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use ringkv_node::dev::NetnsLayout;
use ringkv_wire::NodeId;

const PREFIX: &str = "ringkv-ft-";
static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    name: String,
    cuts: std::sync::Mutex<Cuts>,
}

/// The faults in force: node-to-node links cut (`(from, to)`), and nodes the test's clients (on
/// `127.0.0.1`) cannot reach nor hear from.
type Cuts = (BTreeSet<(NodeId, NodeId)>, BTreeSet<NodeId>);

/// The address the test's clients send from (the kernel's source for `127.0.0.0/8`).
pub const CLIENT_IP: &str = "127.0.0.1";

fn run(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills what still runs in namespace `name` and deletes it.
fn remove(name: &str) {
    if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", name]), None) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]), None);
}

/// Removes the namespaces of fault-test processes that are gone (killed before cleaning up).
fn sweep_stale() {
    let Ok(list) = run(Command::new("ip").args(["netns", "list"]), None) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(PREFIX)) {
        let pid = name[PREFIX.len()..].split('-').next().unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(name);
        }
    }
}

fn enter(name: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| anyhow::anyhow!("cannot enter network namespace {name}: {e}"))
}

impl Netns {
    /// Creates a namespace with loopback up and an empty firewall table.
    pub fn create() -> anyhow::Result<Netns> {
        sweep_stale();
        let name = format!("{PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        run(Command::new("ip").args(["netns", "add", &name]), None)
            .map_err(|e| anyhow::anyhow!("cannot create a network namespace (the fault tests need root and iproute2): {e}"))?;
        let ns = Netns { name, cuts: Default::default() };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]), None)?;
        ns.nft("add table inet ringkv\nadd chain inet ringkv links { type filter hook output priority 0; policy accept; }\n")
            .map_err(|e| anyhow::anyhow!("nftables is needed for the fault tests (apt-get install nftables): {e}"))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args(["netns", "exec", &self.name, "nft", "-f", "-"]), Some(script)).map(|_| ())
    }

    /// A runtime whose threads (and the calling thread, which runs `block_on`) live in this
    /// namespace, so every socket the test opens is inside it.
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        enter(&self.name)?;
        let name = self.name.clone();
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter(&name) {
                    // A thread outside the namespace would reach nothing: fail loudly.
                    panic!("{e}");
                }
            })
            .build()?)
    }

    /// Replaces the node-to-node cuts: packets from `a` to `b` are dropped for every `(a, b)` in
    /// `links` (client cuts stay).
    pub fn block(&self, links: &BTreeSet<(NodeId, NodeId)>) -> anyhow::Result<()> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        cuts.0 = links.clone();
        self.apply(&cuts)
    }

    /// Replaces the client cuts: the test's clients and these nodes drop each other's packets
    /// (node-to-node cuts stay).
    pub fn cut_clients(&self, nodes: &BTreeSet<NodeId>) -> anyhow::Result<()> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        cuts.1 = nodes.clone();
        self.apply(&cuts)
    }

    fn apply(&self, (links, clients): &Cuts) -> anyhow::Result<()> {
        let mut s = String::from("flush chain inet ringkv links\n");
        let mut drop = |from: String, to: String| s.push_str(&format!("add rule inet ringkv links ip saddr {from} ip daddr {to} drop\n"));
        for (a, b) in links {
            drop(NetnsLayout::node_ip(*a).to_string(), NetnsLayout::node_ip(*b).to_string());
        }
        for n in clients {
            drop(CLIENT_IP.into(), NetnsLayout::node_ip(*n).to_string());
            drop(NetnsLayout::node_ip(*n).to_string(), CLIENT_IP.into());
        }
        self.nft(&s)
    }

    /// The rules in force, as nftables prints them.
    pub fn rules(&self) -> anyhow::Result<String> {
        run(Command::new("ip").args(["netns", "exec", &self.name, "nft", "list", "chain", "inet", "ringkv", "links"]), None)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}
