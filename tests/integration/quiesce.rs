//! Idle groups go quiet, wake on traffic, and still fail over when the node of a quiet leader
//! dies or is cut off.

use std::time::{Duration, Instant};

use ringkv_client::Client;
use ringkv_tests::{eventually, keys_for_every_shard, metric, scrape, TestCluster};
use ringkv_wire::NodeId;

/// The quiet groups node `id` reports.
fn quiet_on(tc: &TestCluster, id: NodeId) -> anyhow::Result<f64> {
    Ok(metric(&scrape(&tc.cluster.entry(id)?.metrics_addr)?, "ringkv_raft_groups_quiet").unwrap_or(0.0))
}

/// Waits until every shard replica of every node in `nodes` is quiet (`shards` each: with 3
/// nodes, every node holds every shard).
async fn wait_all_quiet(tc: &TestCluster, nodes: &[NodeId], shards: u64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), "every group goes quiet", || async {
        for id in nodes {
            let q = quiet_on(tc, *id)?;
            anyhow::ensure!(q == shards as f64, "node {id}: {q} of {shards} groups quiet");
        }
        Ok(())
    })
    .await
}

/// The node leading the most shards.
async fn busiest_leader(tc: &TestCluster, client: &Client) -> anyhow::Result<(NodeId, usize)> {
    let mut best = (1, 0);
    for n in 1..=3 {
        let l = tc.leaders_on(client, n).await?.len();
        if l > best.1 {
            best = (n, l);
        }
    }
    Ok(best)
}

/// Waits (polling every 50 ms, up to 10 s) until the nodes `by` lead all `shards` shards.
async fn wait_led_by(tc: &TestCluster, client: &Client, by: &[NodeId], shards: u64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(10), "the other nodes lead every shard", || async {
        let mut leaders = Vec::new();
        for n in by {
            leaders.extend(tc.leaders_on(client, *n).await?);
        }
        leaders.sort_unstable();
        leaders.dedup();
        anyhow::ensure!(leaders.len() as u64 == shards, "{} of {shards} shards led by nodes {by:?}", leaders.len());
        Ok(())
    })
    .await
}

/// Kills (-9) the node leading the most shards and checks that the other nodes lead all
/// `shards` within the election timeout plus the liveness check (3 s with the test timers).
/// Returns the killed node.
async fn kill_busiest_leader_and_fail_over(tc: &mut TestCluster, client: &Client, shards: u64, what: &str) -> anyhow::Result<NodeId> {
    let (victim, led) = busiest_leader(tc, client).await?;
    anyhow::ensure!(led > 0, "node {victim} leads no shard");
    tc.cluster.kill(victim).await?;
    let killed_at = Instant::now();
    let others: Vec<NodeId> = (1..=3).filter(|n| *n != victim).collect();
    wait_led_by(tc, client, &others, shards).await?;
    let failover = killed_at.elapsed();
    eprintln!("all {shards} {what} shards had a new leader {failover:?} after kill -9 of node {victim} (it led {led})");
    anyhow::ensure!(failover < Duration::from_secs(3), "{what} shards took {failover:?} to elect after their leader's node died");
    Ok(victim)
}

/// Writes every key until each succeeded once; returns how long that took.
async fn write_all(client: &Client, keys: &[(u64, Vec<u8>)], value: &[u8]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for (shard, k) in keys {
        client.put(k, value).await.map_err(|e| anyhow::anyhow!("shard {shard}: {e}"))?;
    }
    Ok(started.elapsed())
}

/// Three nodes with `shards` shards, leader balancing off, every shard written once under
/// `prefix` and every group quiet: the start of the tests of quiet groups' leaders.
async fn quiet_cluster(shards: u64, prefix: &str) -> anyhow::Result<(TestCluster, Client, Vec<(u64, Vec<u8>)>)> {
    let tc = TestCluster::start(3, shards).await?;
    let client = tc.client().await?;
    ringkv_tests::set_placement(&client, |s| s.balance = false).await?;
    let keys = keys_for_every_shard(&client.map(), prefix);
    write_all(&client, &keys, b"before").await?;
    wait_all_quiet(&tc, &[1, 2, 3], shards).await?;
    Ok((tc, client, keys))
}

/// Each shard's leader, as the nodes report it.
async fn leaders_by_shard(tc: &TestCluster, client: &Client) -> anyhow::Result<std::collections::BTreeMap<u64, NodeId>> {
    let mut by_shard = std::collections::BTreeMap::new();
    for n in 1..=3 {
        by_shard.extend(tc.leaders_on(client, n).await?.into_iter().map(|s| (s, n)));
    }
    Ok(by_shard)
}

/// Idle groups stop ticking on every node (no CPU for them), a write wakes its group and is
/// served, and a kill -9 of the node leading most quiet groups hands every shard to a new
/// leader within the election timeout plus the liveness check (3 s with the test timers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_wake_on_writes_and_fail_over_when_their_leaders_node_dies() -> anyhow::Result<()> {
    let shards = 16;
    let mut tc = TestCluster::start(3, shards).await?;
    let client = tc.client().await?;
    let keys = keys_for_every_shard(&client.map(), "quiet");
    write_all(&client, &keys, b"before").await?;
    wait_all_quiet(&tc, &[1, 2, 3], shards).await?;
    // Quiet means quiet: over a second, no group wakes and no heartbeat is sent.
    let sent = |id| -> anyhow::Result<f64> {
        Ok(metric(&scrape(&tc.cluster.entry(id)?.metrics_addr)?, "ringkv_transport_sent_bytes_total").unwrap_or(0.0))
    };
    let before: Vec<f64> = (1..=3).map(sent).collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in 1..=3u64 {
        assert_eq!(quiet_on(&tc, id)?, shards as f64, "node {id} woke a group with no traffic");
        let bytes = sent(id)? - before[id as usize - 1];
        // Pings and placement heartbeats only: well under what 16 groups' heartbeats cost.
        assert!(bytes < 20_000.0, "node {id} sent {bytes} bytes in a quiet second");
    }
    // A write wakes its group and is served as usual.
    let (shard, key) = &keys[0];
    client.put(key, b"woken").await.map_err(|e| anyhow::anyhow!("shard {shard}: {e}"))?;
    assert_eq!(client.get(key).await?, Some(b"woken".to_vec()));
    wait_all_quiet(&tc, &[1, 2, 3], shards).await?;

    let victim = kill_busiest_leader_and_fail_over(&mut tc, &client, shards, "quiet").await?;
    write_all(&client, &keys, b"after").await?;
    for (_, k) in &keys {
        assert_eq!(client.get(k).await?, Some(b"after".to_vec()));
    }
    tc.cluster.restart(victim)?;
    for (_, k) in &keys {
        tc.wait_caught_up(&client, victim, k, b"after").await?;
    }
    tc.stop().await;
    Ok(())
}

/// The node of a quiet leader is cut off from the others (its process lives on): its quiet
/// followers stop hearing from it, wake, elect among themselves and serve; after the heal the
/// old leader follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_quiet_leader_is_replaced_by_its_followers() -> anyhow::Result<()> {
    let shards = 8;
    let tc = TestCluster::start(3, shards).await?;
    let client = tc.client().await?;
    let keys = keys_for_every_shard(&client.map(), "qpart");
    write_all(&client, &keys, b"before").await?;
    wait_all_quiet(&tc, &[1, 2, 3], shards).await?;
    let (victim, led) = busiest_leader(&tc, &client).await?;
    assert!(led > 0, "node {victim} leads no shard");
    tc.isolate(&client, victim).await?;
    let others: Vec<NodeId> = (1..=3).filter(|n| *n != victim).collect();
    wait_led_by(&tc, &client, &others, shards).await?;
    write_all(&client, &keys, b"during").await?;
    tc.heal(&client).await?;
    for (_, k) in &keys {
        tc.wait_caught_up(&client, victim, k, b"during").await?;
    }
    tc.stop().await;
    Ok(())
}

/// Under steady writes no group goes quiet, yet followers that hear their leader and leaders
/// whose followers acknowledge appends rest (their timers stopped); a kill -9 of the node leading most shards, with writes going on,
/// still gets every shard a new leader within the election timeout plus the loop's check (3 s
/// with the test timers), and every write acknowledged before and after is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resting_replicas_of_busy_groups_still_elect_when_the_leaders_node_dies() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let shards = 16;
    let mut tc = TestCluster::start(3, shards).await?;
    let client = Arc::new(tc.client().await?);
    let keys = Arc::new(keys_for_every_shard(&client.map(), "rest"));
    write_all(&client, &keys, b"0").await?;
    // Every shard written over and over (bounded: 60 s or 100,000 writes), so none is idle.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, keys, stop, acked) = (client.clone(), keys.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) && n < 100_000 {
                for (_, k) in keys.iter() {
                    n += 1;
                    if client.put(k, n.to_string().as_bytes()).await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let resting = |id, role| -> anyhow::Result<f64> {
        Ok(metric(&scrape(&tc.cluster.entry(id)?.metrics_addr)?, &format!("ringkv_raft_{role}_resting")).unwrap_or(0.0))
    };
    // 32 follower and 16 leader replicas in all; most of them rest while their group is busy.
    eventually(Duration::from_secs(20), "the replicas of busy groups rest", || async {
        let followers: f64 = (1..=3).map(|id| resting(id, "followers")).sum::<anyhow::Result<f64>>()?;
        let leaders: f64 = (1..=3).map(|id| resting(id, "leaders")).sum::<anyhow::Result<f64>>()?;
        let quiet: f64 = (1..=3).map(|id| quiet_on(&tc, id)).sum::<anyhow::Result<f64>>()?;
        anyhow::ensure!(quiet == 0.0, "{quiet} groups quiet under writes");
        anyhow::ensure!(followers >= shards as f64, "{followers} of {} follower replicas rest", 2 * shards);
        anyhow::ensure!(leaders >= (shards / 2) as f64, "{leaders} of {shards} leaders rest");
        Ok(())
    })
    .await?;
    kill_busiest_leader_and_fail_over(&mut tc, &client, shards, "busy").await?;
    let before = acked.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "writes go on after the failover", || async {
        anyhow::ensure!(acked.load(Ordering::Relaxed) > before + 2 * shards, "no writes acknowledged since the failover");
        Ok(())
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    write_all(&client, &keys, b"last").await?;
    for (_, k) in keys.iter() {
        assert_eq!(client.get(k).await?, Some(b"last".to_vec()));
    }
    tc.stop().await;
    Ok(())
}

/// A leader transfer whose messages are lost still ends with a serving leader. openraft's
/// leader stops proposing and heartbeating once it starts a transfer, until a new leader
/// deposes it, and it sends the transfer request only once; the quiet followers of an idle
/// group start no election while the leader's node is alive. So a request lost on the way
/// (here: the leader is cut off from its followers while it sends it) would leave the shard
/// refusing every write for good, unless the leader sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_transfer_whose_request_is_lost_still_completes() -> anyhow::Result<()> {
    use ringkv_wire::{ClientReply, ClientRequest};
    let shards = 4;
    let (tc, client, keys) = quiet_cluster(shards, "qxfer").await?;
    let (leader, _) = busiest_leader(&tc, &client).await?;
    let shard = tc.leaders_on(&client, leader).await?[0];
    let key = keys.iter().find(|(s, _)| *s == shard).map(|(_, k)| k.clone()).expect("a key of every shard");
    let others: Vec<NodeId> = (1..=3).filter(|n| *n != leader).collect();
    let to = others[0];
    // Cut off for far less than the election timeout: the followers' liveness check does not
    // notice, so nothing but the transfer can move the leadership.
    tc.cut(&client, leader, &others).await?;
    let cut_at = Instant::now();
    let r = client.call_node(&tc.client_addr(leader), &ClientRequest::TransferLeader { shard, to }, Duration::from_secs(5)).await;
    // The leader sends the request on its own time: keep the cut a while longer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tc.heal(&client).await?;
    eprintln!("leader {leader} of shard {shard} was cut off for {:?} while it asked node {to} to lead", cut_at.elapsed());
    anyhow::ensure!(matches!(r, Ok(Ok(ClientReply::Done))), "transfer: {r:?}");
    // No request goes to the shard meanwhile (a write would wake a follower, which would then
    // elect): only the leader itself can finish the transfer.
    eventually(Duration::from_secs(5), "the transfer completes", || async {
        anyhow::ensure!(tc.leaders_on(&client, to).await?.contains(&shard), "node {to} does not lead shard {shard}");
        anyhow::ensure!(!tc.leaders_on(&client, leader).await?.contains(&shard), "node {leader} still leads shard {shard}");
        Ok(())
    })
    .await?;
    client.put(&key, b"after").await?;
    assert_eq!(client.get(&key).await?, Some(b"after".to_vec()));
    tc.stop().await;
    Ok(())
}

/// A request sent to a quiet follower (from a client with an old map) does not make it depose
/// its healthy leader: awake, its election timer (counting from its leader's last message, long
/// ago) would stand at its first tick, and its leader's lease ran out while the group was
/// quiet, so it would win. Such a request does not wake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_quiet_follower_does_not_depose_its_leader() -> anyhow::Result<()> {
    use ringkv_wire::ClientRequest;
    let shards = 4;
    let (tc, client, keys) = quiet_cluster(shards, "qmis").await?;
    let before = leaders_by_shard(&tc, &client).await?;
    assert_eq!(before.len() as u64, shards, "{before:?}");
    // Every follower of every shard gets a write and a read it must refuse.
    let map = client.map();
    for (shard, key) in &keys {
        let epoch = map.shard(*shard).expect("shard in the map").epoch;
        for f in (1..=3).filter(|n| before.get(shard) != Some(n)) {
            let put = ClientRequest::Put { shard: *shard, epoch, key: key.clone(), value: b"misrouted".to_vec(), session: None };
            let get = ClientRequest::Get { shard: *shard, epoch, key: key.clone(), stale: false };
            for req in [put, get] {
                let r = client.call_node(&tc.client_addr(f), &req, Duration::from_secs(5)).await?;
                assert!(r.is_err(), "node {f}, a follower of shard {shard}, served {req:?}: {r:?}");
            }
        }
    }
    // Four election timeouts and more: long enough for any woken follower to have stood.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaders_by_shard(&tc, &client).await?, before, "a request to a follower changed a shard's leader");
    for (_, k) in &keys {
        assert_eq!(client.get(k).await?, Some(b"before".to_vec()));
    }
    tc.stop().await;
    Ok(())
}

/// A follower's node restarts while its groups are quiet. Its replicas have heard from no
/// leader yet, so they stand for election at once; the quiet leaders' leases ran out long ago,
/// so openraft alone would grant them the pre-vote and the vote. A quiet leader refuses and
/// wakes instead, and its heartbeats tell the restarted replica who leads: no healthy leader
/// is deposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_does_not_depose_quiet_leaders() -> anyhow::Result<()> {
    let shards = 8;
    let (mut tc, client, keys) = quiet_cluster(shards, "qrestart").await?;
    let before = leaders_by_shard(&tc, &client).await?;
    // The node leading the fewest shards restarts; the shards it led may elect anew.
    let victim = (1..=3).min_by_key(|n| before.values().filter(|l| *l == n).count()).expect("three nodes");
    let kept: Vec<u64> = before.iter().filter(|(_, l)| **l != victim).map(|(s, _)| *s).collect();
    anyhow::ensure!(!kept.is_empty(), "node {victim} leads every shard: {before:?}");
    tc.cluster.kill(victim).await?;
    tc.cluster.restart(victim)?;
    for (_, k) in &keys {
        tc.wait_caught_up(&client, victim, k, b"before").await?;
    }
    // Several election timeouts after the restarted replicas could first stand.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for s in &kept {
        let l = before[s];
        assert!(tc.leaders_on(&client, l).await?.contains(s), "shard {s}: node {l} was deposed after node {victim} restarted");
    }
    write_all(&client, &keys, b"after").await?;
    tc.stop().await;
    Ok(())
}
