//! Crash points: a node crashes at a failpoint of its storage path (log append, before and
//! after the group fsync, before and after apply, snapshot build and install, log purge).
//! Then the whole cluster is killed and restarted; every acknowledged write must be there, and
//! the node that crashed must hold them too. Failpoints are compiled in by the `failpoints`
//! feature that this test crate turns on; a node arms them from its FAILPOINTS variable.

use std::time::{Duration, Instant};

use ringkv_tests::{check_acked, TestCluster, Writer};

const POINTS: [&str; 8] = [
    "raft::append",
    "storage::fsync::before",
    "storage::fsync::after",
    "raft::apply::before",
    "raft::apply::after",
    "snapshot::build",
    "raft::purge",
    "snapshot::install",
];

/// Writes made while the snapshot-install victim is down: about 400 per shard of 4, so every
/// shard purges past what the victim holds.
const INSTALL_WRITES: usize = 1600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_crash_at_each_storage_crash_point() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    let mut acked = Vec::new();
    for (i, point) in POINTS.iter().enumerate() {
        let victim = (i % 3) as u64 + 1;
        tc.cluster.kill(victim).await?;
        let arm = if *point == "snapshot::install" {
            // While the node is down the others write past a snapshot and purge the log it
            // would need, so it must install a snapshot when it returns. Enough for every
            // shard: openraft purges 256 entries at a time, behind the 20 kept (TEST_RAFT).
            for n in 0..INSTALL_WRITES {
                let key = format!("install{i}-{n}").into_bytes();
                client.put(&key, format!("v-{n}").as_bytes()).await?;
                acked.push(key);
            }
            format!("{point}=panic")
        } else {
            format!("{point}=3*off->panic")
        };
        tc.cluster.set_env(victim, vec![("FAILPOINTS".into(), arm)]);
        tc.cluster.restart(victim)?;
        let writer = Writer::start(tc.client().await?, &format!("crash{i}"), 20_000);
        let started = Instant::now();
        let crashed = loop {
            if let Some((_, status)) = tc.cluster.exited().into_iter().find(|(id, _)| *id == victim) {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(60) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (mut keys, _) = writer.stop().await?;
        if keys.is_empty() {
            // The crash came before any write of this round was acknowledged: a few with the
            // victim down, so the round still has writes it must catch up on.
            for n in 0..20 {
                let key = format!("crash{i}-late-{n}").into_bytes();
                client.put(&key, format!("v-{n}").as_bytes()).await?;
                keys.push(key);
            }
        }
        let round_start = acked.len() - if *point == "snapshot::install" { INSTALL_WRITES } else { 0 };
        acked.extend(keys);
        let log = std::fs::read_to_string(tc.cluster.entry(victim)?.data_dir.join("node.log"))?;
        let status = crashed.ok_or_else(|| anyhow::anyhow!("node {victim} did not reach crash point {point} within 60 s"))?;
        anyhow::ensure!(log.contains(&format!("failpoint {point} panic")), "node {victim} exited ({status}) but not at {point}");
        eprintln!("node {victim} crashed at {point} ({status}); {} writes acknowledged so far", acked.len());

        // Everything down at once, then up again without crash points.
        tc.cluster.set_env(victim, vec![]);
        for n in 1..=3 {
            tc.cluster.kill(n).await?;
        }
        for n in 1..=3 {
            tc.cluster.restart(n)?;
        }
        tc.cluster.wait_ready(Duration::from_secs(60)).await?;
        check_acked(&client, &acked).await.map_err(|e| anyhow::anyhow!("after a crash at {point}: {e}"))?;
        // The node that crashed holds every write acknowledged in this round too (the snapshot
        // it installed, the entries it re-applied), read from its own replica.
        let value = |k: &[u8]| {
            let k = String::from_utf8_lossy(k).into_owned();
            format!("v-{}", k.rsplit('-').next().unwrap_or_default()).into_bytes()
        };
        for k in &acked[round_start..] {
            tc.wait_caught_up(&client, victim, k, &value(k)).await.map_err(|e| anyhow::anyhow!("after a crash at {point}: {e}"))?;
        }
    }
    tc.stop().await;
    Ok(())
}

/// A storage error that stops one group's Raft (here at apply, from the failpoint
/// `raft::apply::error`) stops the whole node with a clear error, as a kill would. A node that
/// lived on with a dead group would still answer its peers' liveness pings, so the quiet
/// followers of a group it led would never elect. The other nodes serve every shard with every
/// acknowledged write, and the node, restarted without the fault, catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_in_one_group_stops_the_node_and_the_others_serve() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    let victim = 2;
    tc.cluster.kill(victim).await?;
    tc.cluster.set_env(victim, vec![("FAILPOINTS".into(), "raft::apply::error=return".into())]);
    tc.cluster.restart(victim)?;
    // Every node holds every shard: the victim's replicas fail at their first apply of these.
    let mut acked = Vec::new();
    let started = Instant::now();
    let status = loop {
        if let Some((_, s)) = tc.cluster.exited().into_iter().find(|(id, _)| *id == victim) {
            break s;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "node {victim} still runs 30 s after its storage failed");
        let n = acked.len();
        let key = format!("apply-error-{n}").into_bytes();
        client.put(&key, format!("v-{n}").as_bytes()).await?;
        acked.push(key);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    anyhow::ensure!(!status.success(), "node {victim} exited cleanly ({status})");
    let log = std::fs::read_to_string(tc.cluster.entry(victim)?.data_dir.join("node.log"))?;
    anyhow::ensure!(
        log.contains("Raft stopped on a storage error") && log.contains("failpoint raft::apply::error"),
        "node {victim} exited ({status}) without naming the storage error"
    );
    eprintln!("node {victim} stopped ({status}) {:?} after its restart, {} writes acknowledged", started.elapsed(), acked.len());
    for n in 0..20 {
        let key = format!("apply-error-after-{n}").into_bytes();
        client.put(&key, format!("v-{n}").as_bytes()).await?;
        acked.push(key);
    }
    check_acked(&client, &acked).await?;
    tc.cluster.set_env(victim, vec![]);
    tc.cluster.restart(victim)?;
    for k in &acked {
        let n = String::from_utf8_lossy(k).rsplit('-').next().unwrap_or_default().to_string();
        tc.wait_caught_up(&client, victim, k, format!("v-{n}").as_bytes()).await?;
    }
    tc.stop().await;
    Ok(())
}
