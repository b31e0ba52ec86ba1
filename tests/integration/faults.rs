//! Node failures: kill -9 of one node, restart and catch-up; a partitioned node cannot commit.

use std::time::{Duration, Instant};

use ringkv_client::Error;
use ringkv_tests::{keys_for_every_shard, metric, scrape, TestCluster};
use ringkv_wire::{ClientRequest, RequestError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_one_node_keeps_every_shard_serving_and_it_catches_up() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 16).await?;
    let client = tc.client().await?;
    let map = client.map();
    let keys = keys_for_every_shard(&map, "kill");
    for (_, k) in &keys {
        client.put(k, b"before").await?;
    }
    // Kill the node that leads the most shards, so failover is exercised.
    let mut victim = 1;
    let mut most = 0;
    for n in 1..=3 {
        let l = tc.leaders_on(&client, n).await?.len();
        if l > most {
            most = l;
            victim = n;
        }
    }
    tc.cluster.kill(victim).await?;
    let killed_at = Instant::now();
    for (shard, k) in &keys {
        client.put(k, b"during").await.map_err(|e| anyhow::anyhow!("shard {shard} write after kill: {e}"))?;
        assert_eq!(client.get(k).await?, Some(b"during".to_vec()));
    }
    let failover = killed_at.elapsed();
    assert!(failover < Duration::from_secs(30), "every shard served again within {failover:?}");
    eprintln!("all {} shards served again {failover:?} after kill -9 of node {victim} (it led {most})", keys.len());
    // Enough writes to one shard that its leader snapshots and purges the log the victim still
    // needs: the restarted node must catch up by installing a snapshot.
    let (_, hot_key) = keys[0].clone();
    for i in 0..300u32 {
        client.put(&hot_key, &i.to_be_bytes()).await?;
    }
    tc.cluster.restart(victim)?;
    tc.wait_caught_up(&client, victim, &hot_key, &299u32.to_be_bytes()).await?;
    let text = scrape(&tc.cluster.entry(victim)?.metrics_addr)?;
    let installed = metric(&text, "ringkv_raft_snapshots_installed_total").unwrap_or(0.0);
    assert!(installed >= 1.0, "node {victim} caught up without installing a snapshot");
    for (_, k) in keys.iter().skip(1) {
        tc.wait_caught_up(&client, victim, k, b"during").await?;
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_cannot_commit_while_the_majority_serves() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 8).await?;
    let client = tc.client().await?;
    let map = client.map();
    let keys = keys_for_every_shard(&map, "part");
    // The minority's own keys, which the majority never writes: a minority write applied
    // later would show here (a key the majority overwrote would hide it).
    let minority_keys = keys_for_every_shard(&map, "minority");
    let isolated = 1;
    tc.isolate(&client, isolated).await?;
    // Writes sent straight to the isolated node never succeed, whichever role it had.
    for (shard, k) in &minority_keys {
        let desc = map.shard(*shard).expect("shard").clone();
        let req = ClientRequest::Put { shard: *shard, epoch: desc.epoch, key: k.clone(), value: b"minority".to_vec(), session: None };
        let r = client.call_node(&tc.client_addr(isolated), &req, Duration::from_secs(8)).await;
        match r {
            Ok(Ok(reply)) => anyhow::bail!("isolated node committed a write to shard {shard}: {reply:?}"),
            Ok(Err(RequestError::NotLeader { .. } | RequestError::Unavailable(_))) | Err(_) => {}
            Ok(Err(other)) => anyhow::bail!("unexpected refusal {other}"),
        }
    }
    // The majority side serves every shard.
    for (_, k) in &keys {
        client.put(k, b"majority").await?;
        assert_eq!(client.get(k).await?, Some(b"majority".to_vec()));
    }
    tc.heal(&client).await?;
    for (_, k) in &keys {
        assert_eq!(client.get(k).await?, Some(b"majority".to_vec()));
        tc.wait_caught_up(&client, isolated, k, b"majority").await?;
    }
    // The isolated node has caught up past the heal: none of its refused writes applied.
    for (shard, k) in &minority_keys {
        assert_eq!(client.get(k).await?, None, "a write the isolated node refused applied to shard {shard}");
        assert_eq!(tc.stale_get(&client, isolated, k).await?, None, "the isolated node kept its refused write to shard {shard}");
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_with_a_deadline_when_the_majority_is_down() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    client.put(b"k", b"v").await?;
    tc.cluster.kill(2).await?;
    tc.cluster.kill(3).await?;
    let started = Instant::now();
    let mut cfg = tc.cluster.client_config();
    cfg.timeout = Duration::from_secs(3);
    cfg.attempt_timeout = Duration::from_secs(1);
    let short = ringkv_client::Client::connect(cfg).await?;
    let r = short.put(b"k", b"w").await;
    assert!(matches!(r, Err(Error::Deadline { .. })), "expected a deadline error, got {r:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "returned after {:?}", started.elapsed());
    tc.stop().await;
    Ok(())
}
