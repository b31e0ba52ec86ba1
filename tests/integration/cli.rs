//! The `ringctl` contract that scripts rely on: exit codes and `status --output json`.

use std::path::PathBuf;
use std::process::Output;

use ringkv_tests::{ringkv_binary, TestCluster};

fn ringctl(cluster: &PathBuf, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
    let bin = ringkv_binary().with_file_name("ringctl");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--cluster").arg(cluster).args(args);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().map(|mut s| s.write_all(input)).transpose()?;
    }
    drop(child.stdin.take());
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringctl_put_get_delete_cas_and_status() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 8).await?;
    // No leader balancing: leader counts and a transfer are checked below.
    ringkv_tests::set_placement(&tc.client().await?, |s| s.balance = false).await?;
    let file = tc.path().join("cluster.json");
    let f = file.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let file = f;
        let out = ringctl(&file, &["put", "greeting", "hello"], None)?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = ringctl(&file, &["get", "greeting"], None)?;
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "hello");
        let out = ringctl(&file, &["put", "piped", "-"], Some(b"from stdin"))?;
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&ringctl(&file, &["get", "piped"], None)?.stdout).trim_end(), "from stdin");
        let out = ringctl(&file, &["get", "missing"], None)?;
        assert_eq!(out.status.code(), Some(3));
        let out = ringctl(&file, &["cas", "greeting", "bye", "--expect", "nope"], None)?;
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end(), "hello");
        let out = ringctl(&file, &["cas", "greeting", "bye", "--expect", "hello"], None)?;
        assert_eq!(out.status.code(), Some(0));
        let out = ringctl(&file, &["cas", "fresh", "one", "--expect-absent"], None)?;
        assert_eq!(out.status.code(), Some(0));
        let out = ringctl(&file, &["delete", "greeting"], None)?;
        assert!(out.status.success());
        assert_eq!(ringctl(&file, &["get", "greeting"], None)?.status.code(), Some(3));
        let out = ringctl(&file, &["cas", "x", "y"], None)?;
        assert_eq!(out.status.code(), Some(2), "cas without --expect is a usage error");

        let out = ringctl(&file, &["status", "--output", "json"], None)?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let nodes = v["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3);
        for n in nodes {
            assert_eq!(n["state"], "up");
            assert_eq!(n["replicas"], 8);
            assert!(n["client_addr"].is_string());
        }
        let leaders: u64 = nodes.iter().map(|n| n["leaders"].as_u64().unwrap_or(0)).sum();
        assert_eq!(leaders, 8);
        let shards = v["shards"].as_array().expect("shards");
        assert_eq!(shards.len(), 8);
        for s in shards {
            assert_eq!(s["replicas"].as_array().map(|r| r.len()), Some(3));
            assert!(s["leader"].is_u64());
            assert!(s["range"].as_array().map(|r| r.len()) == Some(2));
            assert!(s["epoch"]["conf_ver"].is_u64());
        }
        let out = ringctl(&file, &["status"], None)?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("REPLICAS"));
        // Nothing answers at this address: exit 6 (retrying may help), not a generic 1.
        let mut cmd = std::process::Command::new(ringkv_binary().with_file_name("ringctl"));
        let certs = file.parent().map(|d| d.join("certs")).unwrap_or_default();
        let out = cmd.args(["--endpoints", "127.0.0.1:1", "--timeout", "1s", "--certs"]).arg(&certs).args(["get", "x"]).output()?;
        assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
        let out = ringctl(&file, &["version"], None)?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("ringctl {}", env!("CARGO_PKG_VERSION")));
        // `-o` is `--output`, and so is RINGCTL_OUTPUT.
        let short: serde_json::Value = serde_json::from_slice(&ringctl(&file, &["status", "-o", "json"], None)?.stdout)?;
        assert_eq!(short["nodes"].as_array().map(|n| n.len()), Some(3));
        let mut cmd = std::process::Command::new(ringkv_binary().with_file_name("ringctl"));
        let out = cmd.env("RINGCTL_OUTPUT", "json").arg("--cluster").arg(&file).arg("status").output()?;
        assert!(serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok(), "{}", String::from_utf8_lossy(&out.stdout));
        // A reader that goes away early (`ringctl status | head -0`) ends ringctl quietly, as
        // SIGPIPE ends other tools, instead of a panic.
        let mut child = std::process::Command::new(ringkv_binary().with_file_name("ringctl"))
            .arg("--cluster")
            .arg(&file)
            .arg("status")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");

        // node list / shard list / shard show, as tables and JSON.
        let v: serde_json::Value = serde_json::from_slice(&ringctl(&file, &["node", "list", "--output", "json"], None)?.stdout)?;
        assert_eq!(v.as_array().map(|a| a.len()), Some(3));
        let v: serde_json::Value = serde_json::from_slice(&ringctl(&file, &["shard", "list", "--output", "json"], None)?.stdout)?;
        assert_eq!(v.as_array().map(|a| a.len()), Some(8));
        let out = ringctl(&file, &["shard", "show", "3", "--output", "json"], None)?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let shard: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let replicas = shard["replicas"].as_array().cloned().unwrap_or_default();
        assert_eq!(replicas.len(), 3);
        assert_eq!(replicas.iter().filter(|r| r["role"] == "leader").count(), 1, "{shard}");
        assert!(replicas.iter().all(|r| r["applied"].is_u64() && r["voters"].as_array().map(|v| v.len()) == Some(3)));
        assert!(String::from_utf8_lossy(&ringctl(&file, &["shard", "show", "3"], None)?.stdout).contains("APPLIED"));
        let out = ringctl(&file, &["shard", "show", "99"], None)?;
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no shard 99"));

        // leader transfer to a follower, seen by shard show; refused for a node without a replica.
        let leader = shard["leader"].as_u64().expect("leader");
        let follower = replicas.iter().filter_map(|r| r["node"].as_u64()).find(|n| *n != leader).expect("a follower");
        let out = ringctl(&file, &["leader", "transfer", "3", &follower.to_string()], None)?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let shard: serde_json::Value = serde_json::from_slice(&ringctl(&file, &["shard", "show", "3", "--output", "json"], None)?.stdout)?;
        assert_eq!(shard["leader"].as_u64(), Some(follower));
        let out = ringctl(&file, &["leader", "transfer", "3", "42"], None)?;
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("holds no replica of shard 3"), "{}", String::from_utf8_lossy(&out.stderr));
        let out = ringctl(&file, &["leader", "transfer", "3"], None)?;
        assert_eq!(out.status.code(), Some(2), "a missing NODE is a usage error");
        Ok(())
    })
    .await??;
    tc.stop().await;
    Ok(())
}

/// The placement commands: confirmation, clear refusals, settings, `node add` of a node started
/// without `--join`, and `rebalance --watch` until balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringctl_placement_commands_confirm_refuse_clearly_and_add_a_node() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 8).await?;
    let dir = tc.path();
    let file = dir.join("cluster.json");
    // A node started on its own (no --join), to be added by `ringctl node add`.
    let entry = ringkv_node::dev::DevCluster::prepare_node(&mut tc.cluster.file, &dir)?;
    let first = entry.data_dir.join("first-start.toml");
    let cfg = std::fs::read_to_string(&first)?;
    std::fs::write(&first, cfg.lines().filter(|l| !l.starts_with("join")).collect::<Vec<_>>().join("\n"))?;
    tc.cluster.restart(entry.id)?;
    let (f, d, addr) = (file.clone(), dir.clone(), entry.client_addr.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let text = |o: &Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        let add = std::process::Command::new(ringkv_binary()).args(["dev", "add-node", "--data-dir"]).arg(&d).output()?;
        assert!(!add.status.success() && text(&add).contains("not running"), "{}", text(&add));
        let out = ringctl(&f, &["node", "remove", "3"], None)?;
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out).contains("--yes"), "asks for confirmation: {}", text(&out));
        let out = ringctl(&f, &["node", "decommission", "1", "--yes"], None)?;
        assert!(!out.status.success() && text(&out).contains("placement group"), "{}", text(&out));
        let out = ringctl(&f, &["settings", "set", "--down-after-ms", "5"], None)?;
        assert!(!out.status.success() && text(&out).contains("below 1000"), "{}", text(&out));
        let out = ringctl(&f, &["settings", "set", "--balance", "false", "--output", "json"], None)?;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["balance"], false);
        // As a table: one setting per line, not Rust's debug output.
        let out = ringctl(&f, &["settings", "show"], None)?;
        let shown = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(shown.lines().any(|l| l.split_whitespace().eq(["balance", "off"])), "{shown}");
        assert!(!shown.contains('{') && !shown.contains("PlacementSettings"), "{shown}");

        let out = ringctl(&f, &["node", "add", &addr, "--output", "json"], None)?;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["node"], 4);
        // Balancing is off: the new node gets nothing until `rebalance` turns it on. Once it
        // is up, the plan moves replicas to it.
        let started = std::time::Instant::now();
        let plan = loop {
            let out = ringctl(&f, &["rebalance", "--dry-run", "--output", "json"], None)?;
            let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if plan["plan"].as_array().is_some_and(|p| p.iter().any(|op| op["to"] == 4)) {
                break plan;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "node 4 is not in the plan after 30 s: {plan}");
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        assert_eq!(plan["balanced"], false, "{plan}");
        let out = ringctl(&f, &["--timeout", "30", "rebalance", "--watch", "--max-wait", "150", "--output", "json"], None)?;
        assert!(out.status.success(), "{}", text(&out));
        let done: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(done["balanced"], true, "{done}");
        assert_eq!(done["settings"]["balance"], true);
        let node4 = done["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == 4).cloned()).expect("node 4 listed");
        assert_eq!(node4["replicas"], 6, "24 replicas over 4 nodes: {node4}");
        Ok(())
    })
    .await??;
    tc.stop().await;
    Ok(())
}
