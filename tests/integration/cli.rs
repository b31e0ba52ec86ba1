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
