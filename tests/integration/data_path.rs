//! Writes land on every shard; whole-cluster restarts keep every acknowledged write.

use std::time::Duration;

use ringkv_tests::{keys_for_every_shard, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_sixty_four_shards_take_writes_on_every_shard() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 64).await?;
    let client = tc.client().await?;
    let map = client.map();
    assert_eq!(map.shards.len(), 64);
    for n in 1..=3u64 {
        let held = map.shards.iter().filter(|s| s.replicas.contains(&n)).count();
        assert_eq!(held, 64, "with 3 nodes every node holds a replica of every shard");
    }
    for s in &map.shards {
        let mut r = s.replicas.clone();
        r.sort_unstable();
        r.dedup();
        assert_eq!(r.len(), 3, "shard {} has 3 replicas on distinct nodes", s.id);
    }
    let keys = keys_for_every_shard(&map, "every");
    for (shard, k) in &keys {
        client.put(k, format!("v{shard}").as_bytes()).await?;
    }
    for (shard, k) in &keys {
        assert_eq!(client.get(k).await?, Some(format!("v{shard}").into_bytes()), "shard {shard}");
    }
    // A read right after a write finds its leader's lease fresh and an entry of its own term
    // applied: it is served without a round trip through the group's Raft task.
    let local_reads = || -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for n in 1..=3u64 {
            sum += ringkv_tests::metric(&ringkv_tests::scrape(&tc.cluster.entry(n)?.metrics_addr)?, "ringkv_raft_lease_reads_local_total")
                .unwrap_or(0.0);
        }
        Ok(sum)
    };
    let before = local_reads()?;
    for (shard, k) in &keys {
        client.put(k, b"again").await?;
        assert_eq!(client.get(k).await?, Some(b"again".to_vec()), "shard {shard}");
    }
    let local = local_reads()? - before;
    assert!(local >= 48.0, "only {local} of 64 reads right after a write were served by the local lease check");
    for (shard, k) in &keys {
        client.put(k, format!("v{shard}").as_bytes()).await?;
    }
    // Delete and compare-and-swap on every shard too.
    for (shard, k) in &keys {
        let v = format!("v{shard}");
        let swapped = client.compare_and_swap(k, Some(v.as_bytes()), b"new").await?;
        assert!(swapped.swapped);
        let refused = client.compare_and_swap(k, Some(b"old"), b"x").await?;
        assert!(!refused.swapped);
        assert_eq!(refused.current.as_deref(), Some(&b"new"[..]));
        client.delete(k).await?;
        assert_eq!(client.get(k).await?, None);
        assert!(client.compare_and_swap(k, None, b"fresh").await?.swapped);
    }
    // Writes to every shard at once: the appends of different groups bound for the same
    // follower leave together, in frames of batched Raft messages (`raft.batch_messages`), and
    // every write is applied as acknowledged.
    let batched = || -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for n in 1..=3u64 {
            let text = ringkv_tests::scrape(&tc.cluster.entry(n)?.metrics_addr)?;
            sum += ringkv_tests::metric(&text, "ringkv_raft_batched_messages_total").unwrap_or(0.0);
        }
        Ok(sum)
    };
    let before = batched()?;
    let mut round = 0;
    while batched()? == before && round < 20 {
        round += 1;
        let puts = keys.iter().map(|(shard, k)| {
            let client = &client;
            async move { client.put(k, format!("r{round}-{shard}").as_bytes()).await }
        });
        for r in futures::future::join_all(puts).await {
            r?;
        }
        for (shard, k) in &keys {
            assert_eq!(client.get(k).await?, Some(format!("r{round}-{shard}").into_bytes()), "shard {shard}, round {round}");
        }
    }
    assert!(batched()? > before, "{round} rounds of 64 concurrent writes sent no batch of Raft messages");
    // Leaders are spread: no node leads every shard, and every shard has one leader (read node
    // by node, so awaited: a leader transfer may be in flight between two reads).
    ringkv_tests::eventually(std::time::Duration::from_secs(20), "one leader per shard, spread", || async {
        let mut led = 0;
        for n in 1..=3u64 {
            let l = tc.leaders_on(&client, n).await?.len();
            anyhow::ensure!(l < 64, "node {n} leads all shards");
            led += l;
        }
        anyhow::ensure!(led == 64, "{led} leaders for 64 shards");
        Ok(())
    })
    .await?;
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 16).await?;
    let client = tc.client().await?;
    let mut written = Vec::new();
    for i in 0..300u32 {
        let k = format!("durable-{i}").into_bytes();
        client.put(&k, &i.to_be_bytes()).await?;
        written.push((k, i));
    }
    client.close();
    // A clean stop of every node, then a kill -9 of every node after a restart: both keep data.
    let unclean = tc.cluster.stop_all().await;
    anyhow::ensure!(unclean.is_empty(), "nodes did not stop cleanly: {unclean:?}");
    for id in 1..=3 {
        tc.cluster.restart(id)?;
    }
    tc.cluster.wait_ready(Duration::from_secs(60)).await?;
    let client = tc.client().await?;
    for (k, i) in &written {
        assert_eq!(client.get(k).await?, Some(i.to_be_bytes().to_vec()), "after clean restart");
    }
    for i in 300..400u32 {
        let k = format!("durable-{i}").into_bytes();
        client.put(&k, &i.to_be_bytes()).await?;
        written.push((k, i));
    }
    client.close();
    for id in 1..=3 {
        tc.cluster.kill(id).await?;
    }
    for id in 1..=3 {
        tc.cluster.restart(id)?;
    }
    tc.cluster.wait_ready(Duration::from_secs(60)).await?;
    let client = tc.client().await?;
    for (k, i) in &written {
        assert_eq!(client.get(k).await?, Some(i.to_be_bytes().to_vec()), "after kill -9 of all nodes");
    }
    tc.stop().await;
    Ok(())
}
