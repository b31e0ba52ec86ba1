//! A cluster's life on real hosts: `ringctl init` creates it from nodes started on their own,
//! `/livez` and `/readyz` tell a service manager how a node is, `ringctl health` checks the
//! whole cluster, and draining (`ringctl node drain`, SIGTERM) moves leaderships off a node
//! before it stops.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use ringkv_tests::{eventually, http_get, ringkv_binary, TestCluster, Writer};
use ringkv_wire::{ClientReply, ClientRequest, NodeId};

/// Runs ringctl with `target` (e.g. `--cluster FILE`) and `args`.
fn ringctl(target: &[&str], args: &[&str]) -> anyhow::Result<Output> {
    let bin = ringkv_binary().with_file_name("ringctl");
    Ok(std::process::Command::new(bin).args(target).args(args).output()?)
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn metrics_addr(tc: &TestCluster, id: NodeId) -> String {
    tc.cluster.entry(id).map(|e| e.metrics_addr.clone()).unwrap_or_default()
}

/// Runs ringctl off the test's runtime (it blocks until the command ends).
async fn ringctl_async(target: Vec<String>, args: &[&str]) -> anyhow::Result<Output> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let t: Vec<&str> = target.iter().map(String::as_str).collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ringctl(&t, &a)
    })
    .await?
}

fn cluster_target(dir: &Path) -> Vec<String> {
    vec!["--cluster".into(), dir.join("cluster.json").display().to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_creates_the_cluster_once_from_seed_nodes_and_readiness_follows() -> anyhow::Result<()> {
    let mut tc = TestCluster::start_uninitialized(3).await?;
    // Live at once, not ready: no cluster yet.
    eventually(Duration::from_secs(20), "node 2 serves /livez", || async {
        let (code, body) = http_get(&metrics_addr(&tc, 2), "/livez")?;
        anyhow::ensure!(code == 200, "{code} {body}");
        Ok(())
    })
    .await?;
    // Not ready, first while the node is still starting (its listener is up before the node
    // exists), then because there is no cluster.
    eventually(Duration::from_secs(10), "node 2 is not ready: no cluster", || async {
        let (code, body) = http_get(&metrics_addr(&tc, 2), "/readyz")?;
        assert_eq!(code, 503, "ready without a cluster: {body}");
        anyhow::ensure!(body.contains("not initialized"), "{body}");
        Ok(())
    })
    .await?;
    let target = cluster_target(&tc.path());
    let health = ringctl_async(target.clone(), &["health"]).await?;
    assert_ne!(health.status.code(), Some(0), "health of a cluster that does not exist: {}", text(&health));

    // Sent to node 3, which is not the first placement member: it gathers the seeds and has
    // node 1 create the cluster.
    let certs = tc.path().join("certs");
    let via_3 = vec!["--endpoints".to_string(), tc.client_addr(3), "--certs".into(), certs.display().to_string()];
    let out = ringctl_async(via_3.clone(), &["init", "--shards", "8"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"), "{}", text(&out));
    // Again: nothing to do, and it says so.
    let again = ringctl_async(target.clone(), &["init", "--shards", "8", "-o", "json"]).await?;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let v: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(v["created"], false, "{v}");
    // Another shape is refused (exit 7), and the cluster keeps its own.
    let other = ringctl_async(via_3, &["init", "--shards", "16"]).await?;
    assert_eq!(other.status.code(), Some(7), "{}", text(&other));
    assert!(String::from_utf8_lossy(&other.stderr).contains("already exists with 8 shards"), "{}", text(&other));

    // Every node becomes ready, and health says the whole cluster is.
    for id in 1..=3 {
        eventually(Duration::from_secs(60), &format!("node {id} is ready"), || async {
            let (code, body) = http_get(&metrics_addr(&tc, id), "/readyz")?;
            anyhow::ensure!(code == 200, "{code} {body}");
            Ok(())
        })
        .await?;
    }
    let h = eventually(Duration::from_secs(30), "health passes", || async {
        let out = ringctl_async(target.clone(), &["health", "-o", "json"]).await?;
        anyhow::ensure!(out.status.code() == Some(0), "{}", text(&out));
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
    })
    .await?;
    assert_eq!(h["healthy"], true);
    assert_eq!(h["nodes"].as_array().map(|n| n.len()), Some(3), "{h}");
    let client = tc.client().await?;
    assert_eq!(client.refresh_map().await?.shards.len(), 8);
    client.put(b"born", b"by init").await?;
    assert_eq!(client.get(b"born").await?.as_deref(), Some(&b"by init"[..]));

    // Under systemd (`Type=notify`) a restarted node says READY=1 only once it is ready.
    let sock_path = tc.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    tc.cluster.stop_node(3, Duration::from_secs(20)).await?;
    tc.cluster.set_env(3, vec![("NOTIFY_SOCKET".into(), sock_path.display().to_string())]);
    tc.cluster.restart(3)?;
    let msg = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf)?;
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("READY=1") {
                return Ok(m);
            }
        }
    })
    .await??;
    let (code, body) = http_get(&metrics_addr(&tc, 3), "/readyz")?;
    assert_eq!(code, 200, "READY=1 ({msg}) came before the node was ready: {body}");
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_leads_nothing_until_undrained_and_sigterm_drains_before_exit() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 8).await?;
    let client = tc.client().await?;
    let target = cluster_target(&tc.path());
    let addrs: Vec<String> = (0..=3).map(|id| tc.client_addr(id)).collect();
    ringkv_tests::wait_balanced(&client, Duration::from_secs(60)).await?;
    let led = |s: &ringkv_wire::NodeStatus| s.groups.iter().filter(|g| g.is_leader).count();
    let status = |id: NodeId| {
        let (client, addr) = (&client, addrs[id as usize].clone());
        async move {
            match client.call_node(&addr, &ClientRequest::NodeStatus, Duration::from_secs(5)).await? {
                Ok(ClientReply::NodeStatus(s)) => Ok(s),
                other => anyhow::bail!("node {id} status: {other:?}"),
            }
        }
    };
    anyhow::ensure!(led(&status(1).await?) > 0, "balanced, node 1 leads some groups");

    let out = ringctl_async(target.clone(), &["node", "drain", "1", "--max-wait", "30s"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let s = status(1).await?;
    assert_eq!(led(&s), 0, "{s:?}");
    assert!(s.draining);
    let (code, body) = http_get(&metrics_addr(&tc, 1), "/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    let h = ringctl_async(target.clone(), &["health"]).await?;
    assert_eq!(h.status.code(), Some(8), "a draining node is not healthy: {}", text(&h));
    // Leader balancing runs (the others lead 4 each, node 1 none) and gives it nothing.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let s = status(1).await?;
        anyhow::ensure!(led(&s) == 0, "a draining node was given leaderships: {s:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = ringctl_async(target.clone(), &["node", "undrain", "1"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    eventually(Duration::from_secs(60), "node 1 leads again", || async {
        let s = status(1).await?;
        anyhow::ensure!(!s.draining && led(&s) > 0, "{s:?}");
        Ok(())
    })
    .await?;

    // SIGTERM: the node hands its leaderships away before it exits, while writes go on.
    let busy = eventually(Duration::from_secs(60), "a node leads shards", || async {
        for id in 1..=3 {
            if led(&status(id).await?) > 0 {
                return Ok(id);
            }
        }
        anyhow::bail!("no node leads")
    })
    .await?;
    let writer = Writer::start(tc.client().await?, "rolling", 100_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tc.cluster.stop_node(busy, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, failed) = writer.stop().await?;
    assert_eq!(failed, 0, "writes failed while node {busy} stopped");
    let log = std::fs::read_to_string(tc.cluster.entry(busy)?.data_dir.join("node.log"))?;
    assert!(
        log.contains("drained in"),
        "node {busy} stopped without draining:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    ringkv_tests::check_acked(&client, &acked).await?;
    tc.stop().await;
    Ok(())
}

/// `ringkv node --print-config` shows the resolved configuration (a partial `--config` section
/// changes only its keys), starts nothing and writes nothing.
#[test]
fn print_config_shows_the_resolved_configuration_and_writes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("ringkv.toml");
    std::fs::write(&conf, "[raft]\nheartbeat_interval_ms = 150\n\n[lifecycle]\ndrain_timeout_ms = 25000\n")?;
    let data = dir.path().join("data");
    let out = std::process::Command::new(ringkv_binary())
        .args(["node", "--print-config", "--id", "7", "--peer-addr", "127.0.0.1:7001", "--client-addr", "127.0.0.1:7002"])
        .args(["--metrics-addr", "127.0.0.1:7003", "--ca", "ca.pem", "--cert", "n.pem", "--key", "n.key"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&conf)
        .output()?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let printed: toml::Table = String::from_utf8(out.stdout.clone())?.parse()?;
    assert_eq!(printed["id"].as_integer(), Some(7));
    assert_eq!(printed["raft"]["heartbeat_interval_ms"].as_integer(), Some(150));
    assert_eq!(printed["raft"]["election_timeout_min_ms"].as_integer(), Some(1000), "a key the file does not name keeps its default");
    assert_eq!(printed["lifecycle"]["drain_timeout_ms"].as_integer(), Some(25000));
    assert!(!data.exists(), "--print-config wrote the data dir");
    // An unknown key is an error that names it.
    std::fs::write(&conf, "[raft]\nheartbeat_ms = 150\n")?;
    let bad = std::process::Command::new(ringkv_binary())
        .args(["node", "--print-config", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&conf)
        .output()?;
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("heartbeat_ms"), "{}", text(&bad));
    Ok(())
}

/// Addresses may be DNS names: a node binds what `localhost:PORT` resolves to and serves there;
/// a name that is neither an IP address nor a DNS name is refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_binds_and_serves_on_dns_names() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let ctl = ringkv_binary().with_file_name("ringctl");
    for args in [vec!["cert", "init", "--dir"], vec!["cert", "issue", "--node", "9", "--dir"]] {
        let out = std::process::Command::new(&ctl).args(&args).arg(&certs).output()?;
        assert!(out.status.success(), "{}", text(&out));
    }
    let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let metrics = format!("localhost:{}", free()?);
    let node = |peer: &str| {
        let mut c = std::process::Command::new(ringkv_binary());
        c.args(["node", "--id", "9", "--peer-addr", peer, "--client-addr", "localhost:0", "--metrics-addr", &metrics])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("node-9.pem"))
            .arg("--key")
            .arg(certs.join("node-9.key"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let bad = node("local_host:7001").output()?;
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither an IP address nor a DNS name"), "{}", text(&bad));
    let mut child = node(&format!("localhost:{}", free()?)).spawn()?;
    let served = eventually(Duration::from_secs(20), "the node serves /livez on localhost", || async {
        let (code, body) = http_get(&metrics, "/livez")?;
        anyhow::ensure!(code == 200, "{code} {body}");
        Ok(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    served
}

/// The repository's root (the tests run from `tests/`).
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `scripts/dist.sh` builds binaries fit to ship: at most 40 MB each, runnable, and linked to
/// their debug information, which it keeps apart.
#[test]
fn dist_binaries_are_small_and_keep_their_debug_information_apart() -> anyhow::Result<()> {
    let _fresh = ringkv_binary();
    let out_dir = tempfile::tempdir()?;
    let out = std::process::Command::new("bash").arg(repo_root().join("scripts/dist.sh")).arg(out_dir.path()).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for bin in ["ringkv", "ringctl", "ringkv-bench"] {
        let path = out_dir.path().join(bin);
        let size = std::fs::metadata(&path)?.len();
        assert!(size <= 40_000_000, "{bin} is {size} bytes");
        let debug = std::fs::metadata(out_dir.path().join("debug").join(format!("{bin}.debug")))?.len();
        assert!(debug > size, "{bin}'s debug file is {debug} bytes: the debug information is not in it");
        let v = std::process::Command::new(&path).arg("--version").output()?;
        assert!(v.status.success(), "{bin} --version: {}", text(&v));
        let link = std::process::Command::new("objcopy")
            .arg("--dump-section")
            .arg(".gnu_debuglink=/dev/stdout")
            .arg(&path)
            .arg("/dev/null")
            .output()?;
        assert!(String::from_utf8_lossy(&link.stdout).contains(&format!("{bin}.debug")), "{bin} names no debug file: {}", text(&link));
    }
    Ok(())
}

/// The systemd unit the Ansible role installs is hardened: `systemd-analyze security` rates its
/// exposure at most 2.5.
#[test]
fn the_systemd_unit_exposes_little() -> anyhow::Result<()> {
    let template = std::fs::read_to_string(repo_root().join("deploy/ansible/roles/ringkv/templates/ringkv.service.j2"))?;
    let rendered = template
        .replace("{{ ansible_managed | default('Managed by Ansible') }}", "rendered by the test")
        .replace("{{ ringkv_user }}", "ringkv")
        .replace("{{ ringkv_data_dir }}", "/var/lib/ringkv");
    assert!(!rendered.contains("{{"), "a variable the test does not render: {rendered}");
    let dir = tempfile::tempdir()?;
    let unit = dir.path().join("ringkv.service");
    std::fs::write(&unit, rendered)?;
    let out = std::process::Command::new("systemd-analyze").args(["security", "--offline=yes", "--threshold=25"]).arg(&unit).output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ringkv.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no exposure level in: {}", text(&out)))?;
    assert!(level <= 2.5, "exposure {level}:\n{report}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    Ok(())
}

/// The Ansible playbooks on four namespace hosts over ssh (`deploy/test/run.sh`): site, site
/// again with no change, a rolling restart under load without a failed write, scale out, scale in.
#[test]
fn ansible_playbooks_deploy_restart_and_resize_a_cluster_on_namespace_hosts() -> anyhow::Result<()> {
    let _fresh = ringkv_binary();
    let out = std::process::Command::new("bash").arg(repo_root().join("deploy/test/run.sh")).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deploy test passed"), "{}", text(&out));
    Ok(())
}

/// What monitoring sees: every metric a node exports has HELP text and passes `promtool check
/// metrics`; the group-commit histogram counts writes in count buckets; process metrics and
/// `ringkv_build_info` are there; every metric the Grafana dashboard queries exists in a live
/// scrape; the alert rules pass `promtool check rules` and their unit tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_dashboard_and_alerts_fit_a_live_scrape() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    for i in 0..50 {
        client.put(format!("m-{i}").as_bytes(), b"v").await?;
        client.get(format!("m-{i}").as_bytes()).await?;
    }
    // The placement leader's gauges are set by its next round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut exported = std::collections::BTreeSet::new();
    for id in 1..=3 {
        let scraped = ringkv_tests::scrape(&metrics_addr(&tc, id))?;
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut check.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?, scraped.as_bytes())?;
        let out = check.wait_with_output()?;
        assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "node {id}: {}", text(&out));
        for line in scraped.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split_whitespace().next().unwrap_or_default().to_string();
                assert!(scraped.contains(&format!("# HELP {name} ")), "node {id}: {name} has no HELP text");
                exported.insert(name);
            }
        }
        assert!(scraped.contains("ringkv_storage_group_commit_writes_bucket{le=\"1\"}"), "group commit sizes in count buckets");
        assert!(!scraped.contains("ringkv_storage_group_commit_writes_bucket{le=\"0.0005\"}"), "group commit sizes in second buckets");
    }
    for name in ["ringkv_build_info", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(exported.contains(name), "{name} is not exported");
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("deploy/grafana/ringkv-dashboard.json"))?)?;
    let mut queried = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let mut rest = expr;
            while let Some(i) = rest.find("ringkv_").or_else(|| rest.find("process_")) {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name).to_string();
                queried.insert(base);
            }
        }
    }
    assert!(queried.len() > 20, "the dashboard queries only {queried:?}");
    let missing: Vec<_> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics no node exports: {missing:?}");
    let rules = repo_root().join("deploy/prometheus");
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]] {
        let out = std::process::Command::new("promtool").args(args).current_dir(&rules).output()?;
        assert!(out.status.success(), "promtool {args:?}: {}", text(&out));
    }
    tc.stop().await;
    Ok(())
}
