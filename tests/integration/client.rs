//! The smart client on real clusters: exactly-once compare-and-swap through leader failures,
//! route refresh after a leader transfer, batches with per-shard failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_client::{CallOptions, Client};
use ringkv_tests::{eventually, keys_for_every_shard, TestCluster};

fn shard_of(client: &Client, key: &[u8]) -> u64 {
    client.map().shard_for_hash(ringkv_wire::key_hash(key)).map(|s| s.id).expect("covered")
}

async fn leader_of(tc: &TestCluster, client: &Client, shard: u64) -> anyhow::Result<u64> {
    for n in tc.cluster.file.nodes.iter().map(|n| n.id) {
        if tc.leaders_on(client, n).await.unwrap_or_default().contains(&shard) {
            return Ok(n);
        }
    }
    anyhow::bail!("shard {shard} has no leader")
}

/// 16 tasks increment one counter with compare-and-swap while the counter shard's leader is
/// killed and restarted: the counter ends equal to the number of successful swaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_counter_is_exact_across_a_leader_kill_and_restart() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let client = Arc::new(tc.client().await?);
    let key = b"counter".to_vec();
    client.put(&key, b"0").await?;
    let swaps = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(40);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, key, swaps, errors) = (client.clone(), key.clone(), swaps.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let opts = CallOptions::timeout(Duration::from_secs(30));
            let mut mine = 0;
            while mine < 8 && Instant::now() < stop_at {
                let current = match client.get_with(&key, opts).await {
                    Ok(v) => v.unwrap_or_default(),
                    Err(e) => {
                        eprintln!("read failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let n: u64 = String::from_utf8_lossy(&current).parse().unwrap_or(0);
                match client.compare_and_swap_with(&key, Some(&current), (n + 1).to_string().as_bytes(), opts).await {
                    Ok(o) if o.swapped => {
                        swaps.fetch_add(1, Ordering::Relaxed);
                        mine += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("cas failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let shard = shard_of(&client, &key);
    let victim = leader_of(&tc, &client, shard).await?;
    tc.cluster.kill(victim).await?;
    eprintln!("killed node {victim}, leader of the counter's shard {shard}, after {} swaps", swaps.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(3)).await;
    tc.cluster.restart(victim)?;
    for t in tasks {
        t.await?;
    }
    let done = swaps.load(Ordering::Relaxed);
    let value = client.get(&key).await?.unwrap_or_default();
    let final_count: u64 = String::from_utf8_lossy(&value).parse()?;
    eprintln!("{done} successful swaps, counter {final_count}, {} failed calls", errors.load(Ordering::Relaxed));
    assert_eq!(errors.load(Ordering::Relaxed), 0, "a call failed: its outcome is unknown");
    assert_eq!(final_count, done, "nothing lost, nothing applied twice");
    assert_eq!(done, 16 * 8);
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_refresh_after_a_leader_transfer_and_stale_reads_work() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    let key = b"moving".to_vec();
    client.put(&key, b"1").await?;
    let shard = shard_of(&client, &key);
    let leader = leader_of(&tc, &client, shard).await?;
    assert_eq!(client.cached_leader(shard), Some(leader));
    let desc = client.map().shard(shard).cloned().expect("shard");
    let target = *desc.replicas.iter().find(|n| **n != leader).expect("another replica");
    client.transfer_leader(shard, target).await?;
    eventually(Duration::from_secs(15), "leadership moves", || async {
        anyhow::ensure!(tc.leaders_on(&client, target).await?.contains(&shard), "node {target} does not lead yet");
        Ok(())
    })
    .await?;
    client.put(&key, b"2").await?;
    assert_eq!(client.cached_leader(shard), Some(target), "the client followed the new leader");
    assert_eq!(client.get(&key).await?, Some(b"2".to_vec()));
    // A stale read is served by some replica's applied state: it sees the value once replicas
    // have applied it.
    eventually(Duration::from_secs(10), "stale read catches up", || async {
        let v = client.get_with(&key, CallOptions::stale()).await?;
        anyhow::ensure!(v.as_deref() == Some(&b"2"[..]), "stale read saw {v:?}");
        Ok(())
    })
    .await?;
    tc.stop().await;
    Ok(())
}

/// Batches fan out per shard; with one shard's majority down, exactly the keys of shards that
/// lost their majority fail, the rest succeed, and the call ends within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_report_failed_shards_and_finish_the_rest() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(5, 16).await?;
    let client = tc.client().await?;
    let map = client.map();
    let keys: Vec<(u64, Vec<u8>)> = keys_for_every_shard(&map, "batch");
    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|(_, k)| (k.as_slice(), k.as_slice())).collect();
    for r in client.batch_put(&pairs, CallOptions::default()).await {
        r?;
    }
    let got = client.batch_get(&keys.iter().map(|(_, k)| k.as_slice()).collect::<Vec<_>>(), CallOptions::default()).await;
    for ((_, k), v) in keys.iter().zip(got) {
        assert_eq!(v?, Some(k.clone()), "values come back in input order");
    }
    // Take down two replicas of the first shard: it, and every shard sharing both nodes, loses
    // its majority.
    let down = [map.shards[0].replicas[1], map.shards[0].replicas[2]];
    for n in down {
        tc.cluster.kill(n).await?;
    }
    let lost = |shard: u64| map.shard(shard).map(|s| s.replicas.iter().filter(|r| down.contains(r)).count() >= 2).unwrap_or(false);
    let started = Instant::now();
    let deadline = Duration::from_secs(6);
    let new_pairs: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().map(|(_, k)| (k.clone(), b"after".to_vec())).collect();
    let refs: Vec<(&[u8], &[u8])> = new_pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let results = client.batch_put(&refs, CallOptions::timeout(deadline)).await;
    assert!(started.elapsed() < deadline + Duration::from_secs(3), "batch took {:?}", started.elapsed());
    // Status tells the truth about the shards that lost their majority: no leader.
    for (shard, _) in &keys {
        if lost(*shard) {
            for n in map.shard(*shard).map(|s| s.replicas.clone()).unwrap_or_default().iter().filter(|n| !down.contains(n)) {
                assert!(!tc.leaders_on(&client, *n).await?.contains(shard), "node {n} claims to lead shard {shard} without a quorum");
            }
        }
    }
    let mut failed = 0;
    for ((shard, _), r) in keys.iter().zip(&results) {
        assert_eq!(r.is_err(), lost(*shard), "shard {shard} (lost majority: {}) got {r:?}", lost(*shard));
        failed += r.is_err() as usize;
    }
    assert!(failed >= 1 && failed < keys.len(), "{failed} of {} shards failed", keys.len());
    let got = client.batch_get(&keys.iter().map(|(_, k)| k.as_slice()).collect::<Vec<_>>(), CallOptions::timeout(deadline)).await;
    for ((shard, _), v) in keys.iter().zip(got) {
        match v {
            Ok(v) => {
                assert!(!lost(*shard));
                assert_eq!(v.as_deref(), Some(&b"after"[..]));
            }
            Err(e) => {
                assert!(lost(*shard), "shard {shard} failed: {e}");
                assert!(e.retryable());
            }
        }
    }
    tc.stop().await;
    Ok(())
}
