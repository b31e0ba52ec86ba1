//! The placement driver on live clusters: nodes join, drain, die and are replaced, and the
//! placement leader dies mid-rebalance, all under write load with no acknowledged write lost.

use std::time::Duration;

use ringkv_client::CallOptions;
use ringkv_node::dev::{wait_node_up, ClusterFileExt};
use ringkv_tests::{
    check_acked, eventually, keys_for_every_shard, metric, placement_report, scrape, set_placement, wait_balanced, TestCluster, Writer,
};
use ringkv_wire::{ClientReply, ClientRequest, NodeState, RequestError};

const BALANCE_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_and_fifth_node_join_under_load_and_the_cluster_balances() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 16).await?;
    let client = tc.client().await?;
    // Enough entries per shard that the log is purged behind a snapshot (TEST_RAFT: snapshot
    // every 100, keep 20; openraft purges 256 entries at a time): new replicas must be filled
    // by snapshot transfers, not from the log.
    let map = client.map();
    for i in 0..320 {
        let keys = keys_for_every_shard(&map, &format!("fill{i}"));
        let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|(_, k)| (k.as_slice(), b"fill".as_slice())).collect();
        for r in client.batch_put(&pairs, CallOptions::default()).await {
            r?;
        }
    }
    let writer = Writer::start(tc.client().await?, "join", 20_000);
    // Stale reads on the new nodes while they are filled: they may be refused, never answer
    // "absent" for a key written before (a learner, a half-installed snapshot).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stale_reads = {
        let (stop, reader) = (stop.clone(), tc.client().await?);
        let addrs: Vec<String> = vec![];
        let cluster_file = tc.path().join("cluster.json");
        let keys = keys_for_every_shard(&map, "fill0");
        tokio::spawn(async move {
            let (mut served, mut absent) = (0u64, Vec::new());
            let mut addrs = addrs;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(f) = ringkv_config::cluster::ClusterFile::load(&cluster_file) {
                    addrs = f.nodes.iter().filter(|n| n.id > 3).map(|n| n.client_addr.clone()).collect();
                }
                let Ok(map) = reader.refresh_map().await else { continue };
                for (_, key) in &keys {
                    let Some(d) = map.shard_for_hash(ringkv_wire::key_hash(key)) else { continue };
                    let req = ClientRequest::Get { shard: d.id, epoch: d.epoch, key: key.clone(), stale: true };
                    for a in &addrs {
                        match reader.call_node(a, &req, Duration::from_secs(2)).await {
                            Ok(Ok(ClientReply::Value(Some(_)))) => served += 1,
                            Ok(Ok(ClientReply::Value(None))) => absent.push((a.clone(), String::from_utf8_lossy(key).into_owned())),
                            _ => {}
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (served, absent)
        })
    };
    for _ in 0..2 {
        let id = tc.cluster.add_node()?;
        wait_node_up(&tc.cluster.client_config(), id, Duration::from_secs(60)).await?;
    }
    let load = wait_balanced(&client, BALANCE_TIMEOUT).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, absent) = stale_reads.await?;
    assert!(absent.is_empty(), "stale reads on new replicas answered absent for written keys: {absent:?}");
    assert!(served > 0, "no stale read was served by the new nodes");
    let (acked, failed) = writer.stop().await?;
    eprintln!("balanced: {load:?}; {} writes acknowledged, {failed} failed", acked.len());
    assert_eq!(load.len(), 5, "five up nodes: {load:?}");
    assert!(load.get(&5).is_some_and(|(r, _)| *r >= 9), "the fifth node was filled: {load:?}");
    assert!(acked.len() > 50, "the writer made progress during the moves: {}", acked.len());
    check_acked(&client, &acked).await?;
    for id in [4, 5] {
        let text = scrape(&tc.cluster.entry(id)?.metrics_addr)?;
        let installed = metric(&text, "ringkv_raft_snapshots_installed_total").unwrap_or(0.0);
        assert!(installed >= 1.0, "node {id} was filled by snapshots: {installed} installed");
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_node_drains_to_zero_and_can_be_removed() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(4, 16).await?;
    let client = tc.client().await?;
    let writer = Writer::start(tc.client().await?, "drain", 20_000);
    let remove = ClientRequest::SetNodeState { node: 4, state: NodeState::Removed, force: false };
    match client.placement(&remove).await {
        Err(ringkv_client::Error::Request(RequestError::NotPermitted(why))) => assert!(why.contains("still holds"), "{why}"),
        other => panic!("removing a node that holds replicas must be refused, got {other:?}"),
    }
    let drain = ClientRequest::SetNodeState { node: 4, state: NodeState::Decommissioning, force: false };
    assert!(matches!(client.placement(&drain).await?, ClientReply::Done));
    eventually(BALANCE_TIMEOUT, "node 4 drains", || async {
        let map = client.refresh_map().await?;
        anyhow::ensure!(map.replicas_on(4) == 0 && map.moves.is_empty(), "node 4 holds {} replicas", map.replicas_on(4));
        Ok(())
    })
    .await?;
    assert!(matches!(client.placement(&remove).await?, ClientReply::Done));
    // Nodes pick up the new map within a map-sync interval.
    let map = eventually(Duration::from_secs(10), "the map says node 4 is removed", || async {
        let map = client.refresh_map().await?;
        anyhow::ensure!(map.node(4).map(|n| n.state) == Some(NodeState::Removed), "node 4: {:?}", map.node(4));
        Ok(map)
    })
    .await?;
    assert!(map.shards.iter().all(|s| s.replicas.len() == 3 && !s.replicas.contains(&4)));
    // With no node outside the placement group left, a member cannot be decommissioned.
    let member = ClientRequest::SetNodeState { node: 1, state: NodeState::Decommissioning, force: false };
    assert!(client.placement(&member).await.is_err(), "a placement member with no node to take its place");
    // The drained node dropped its replicas' data (tombstoned), and the cluster serves without it.
    eventually(Duration::from_secs(30), "node 4 drops its replicas", || async {
        match client.call_node(&tc.client_addr(4), &ClientRequest::NodeStatus, Duration::from_secs(5)).await? {
            Ok(ClientReply::NodeStatus(s)) => anyhow::ensure!(s.groups.is_empty(), "node 4 still hosts {:?}", s.groups),
            other => anyhow::bail!("node status: {other:?}"),
        }
        Ok(())
    })
    .await?;
    tc.cluster.kill(4).await?;
    let (acked, failed) = writer.stop().await?;
    eprintln!("{} writes acknowledged during the drain, {failed} failed", acked.len());
    check_acked(&client, &acked).await?;
    wait_balanced(&client, BALANCE_TIMEOUT).await?;
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_for_good_is_replaced_after_the_down_time() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(4, 16).await?;
    let client = tc.client().await?;
    set_placement(&client, |s| s.down_after_ms = 4000).await?;
    let writer = Writer::start(tc.client().await?, "repair", 20_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = client.refresh_map().await?.replicas_on(4);
    assert!(held >= 11, "node 4 holds its share before the kill: {held}");
    tc.cluster.kill(4).await?;
    let killed = std::time::Instant::now();
    // Within the down time nothing moves: a restart would be cheaper than a rebuild. Watched
    // over most of the window (node 4's last heartbeat may be up to a second before the kill).
    let mut looks = 0;
    while killed.elapsed() < Duration::from_millis(2500) {
        let map = client.refresh_map().await?;
        assert_eq!(map.replicas_on(4), held, "replicas left node 4 {:?} after the kill, before its down time", killed.elapsed());
        assert!(map.moves.iter().all(|m| m.from != 4), "repair began {:?} after the kill: {:?}", killed.elapsed(), map.moves);
        looks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(looks >= 5, "the map was read only {looks} times in the down time");
    eventually(BALANCE_TIMEOUT, "every shard is back to 3 replicas", || async {
        let map = client.refresh_map().await?;
        anyhow::ensure!(map.node(4).map(|n| n.state) == Some(NodeState::Down), "node 4 is not marked down");
        let short = map.shards.iter().filter(|s| s.replicas.contains(&4) || s.replicas.len() != 3).count();
        anyhow::ensure!(short == 0 && map.moves.is_empty(), "{short} shards not repaired yet");
        Ok(())
    })
    .await?;
    let (acked, failed) = writer.stop().await?;
    eprintln!("{} writes acknowledged across the repair, {failed} failed", acked.len());
    check_acked(&client, &acked).await?;
    wait_balanced(&client, BALANCE_TIMEOUT).await?;
    tc.stop().await;
    Ok(())
}

/// A node cut off from the placement quorum (but not from the other nodes) is repaired away
/// like a dead one; while its shards move, their reads and writes keep succeeding within the
/// client's deadline, for a client that knew the old map and for a new one that asks the cut-off
/// node first, and the cut-off node stops offering its old map as current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_moves_while_a_node_is_cut_off_from_the_placement_quorum() -> anyhow::Result<()> {
    let tc = TestCluster::start(5, 8).await?;
    let client = tc.client().await?;
    set_placement(&client, |s| {
        s.down_after_ms = 3000;
        s.balance = false;
    })
    .await?;
    let map = client.refresh_map().await?;
    let members = map.placement_members.clone();
    // The hard case: a shard led on the cut-off node that still reaches a majority of its
    // group through a node outside the placement group, so no election takes the lead away.
    let outside: Vec<u64> = map.nodes.iter().map(|n| n.id).filter(|id| !members.contains(id)).collect();
    let (cut_off, other, led) = map
        .shards
        .iter()
        .find_map(|s| {
            let both: Vec<u64> = s.replicas.iter().copied().filter(|r| outside.contains(r)).collect();
            (both.len() >= 2).then(|| (both[0], both[1], s.id))
        })
        .ok_or_else(|| anyhow::anyhow!("no shard has two replicas outside the placement group {members:?}"))?;
    eventually(Duration::from_secs(30), "the shard is led on the node to cut off", || async {
        client.transfer_leader(led, cut_off).await?;
        anyhow::ensure!(tc.leaders_on(&client, cut_off).await?.contains(&led), "shard {led} not led on node {cut_off}");
        Ok(())
    })
    .await?;
    let keys: Vec<(u64, Vec<u8>)> = keys_for_every_shard(&map, "cut")
        .into_iter()
        .filter(|(s, _)| map.shard(*s).is_some_and(|d| d.replicas.contains(&cut_off)))
        .collect();
    for (_, k) in &keys {
        client.put(k, b"before").await?;
    }
    tc.cut(&client, cut_off, &members).await?;
    let cut_at = std::time::Instant::now();
    let mut round = 0u32;
    eventually(BALANCE_TIMEOUT, &format!("the shards of node {cut_off} move away"), || {
        round += 1;
        let (client, keys) = (&client, &keys);
        let value = round.to_be_bytes();
        async move {
            for (shard, k) in keys {
                // Not retried by `eventually`: a failure here fails the test.
                let r = async {
                    client.put(k, &value).await?;
                    anyhow::ensure!(client.get(k).await? == Some(value.to_vec()), "read back");
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    return Ok(Err(anyhow::anyhow!("shard {shard} in round {round}: {e:#}")));
                }
            }
            let map = client.refresh_map().await?;
            let left = keys.iter().filter(|(s, _)| map.shard(*s).is_some_and(|d| d.replicas.contains(&cut_off))).count();
            anyhow::ensure!(left == 0 && map.moves.is_empty(), "{left} shards still on node {cut_off}");
            Ok(Ok(()))
        }
    })
    .await??;
    eprintln!("{} shards moved off node {cut_off} in {:?} ({round} rounds of writes)", keys.len(), cut_at.elapsed());
    // The cut-off node no longer offers its map as current once it has lost placement contact
    // for long; a new client asking it first still finds the moved shards.
    eventually(Duration::from_secs(30), "the cut-off node refuses to serve its old map", || async {
        let r = client.call_node(&tc.client_addr(cut_off), &ClientRequest::GetMap, Duration::from_secs(5)).await?;
        anyhow::ensure!(matches!(r, Err(RequestError::Unavailable(_))), "node {cut_off} answered {r:?}");
        Ok(())
    })
    .await?;
    let mut cfg = tc.cluster.client_config();
    cfg.seeds = vec![tc.client_addr(cut_off), tc.client_addr(other)];
    let fresh = ringkv_client::Client::connect(cfg).await?;
    for (shard, k) in &keys {
        fresh.put(k, b"after").await.map_err(|e| anyhow::anyhow!("shard {shard}: {e}"))?;
        anyhow::ensure!(fresh.get(k).await? == Some(b"after".to_vec()), "shard {shard} read back");
    }
    tc.heal(&client).await?;
    tc.stop().await;
    Ok(())
}

/// A new node is given every member to join through: the first one being dead does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_the_next_member_when_the_first_is_dead() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let first = tc.cluster.file.nodes[0].id;
    tc.cluster.kill(first).await?;
    let id = tc.cluster.add_node()?;
    wait_node_up(&tc.cluster.client_config(), id, Duration::from_secs(60)).await?;
    let log = std::fs::read_to_string(tc.cluster.entry(id)?.data_dir.join("node.log"))?;
    let dead = &tc.cluster.entry(first)?.client_addr;
    let joined = log.lines().find(|l| l.contains("joined the cluster")).unwrap_or_default();
    assert!(!joined.is_empty() && !joined.contains(dead.as_str()), "node {id} did not join through a live member: {joined:?}");
    let client = tc.client().await?;
    client.put(b"after-join", b"v").await?;
    assert_eq!(client.get(b"after-join").await?, Some(b"v".to_vec()));
    tc.stop().await;
    Ok(())
}

/// A node that advertises other addresses than it binds (here a DNS name for the bound IP) is
/// listed in the map by those, and is reached there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_listed_and_reached_by_its_advertised_addresses() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let dir = tc.path();
    let e = ringkv_node::dev::DevCluster::prepare_node(&mut tc.cluster.file, &dir)?;
    let port = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
    let (client_addr, metrics_addr) = (format!("localhost:{}", port(&e.client_addr)), format!("localhost:{}", port(&e.metrics_addr)));
    let first = e.data_dir.join("first-start.toml");
    let cfg = std::fs::read_to_string(&first)?;
    std::fs::write(&first, format!("advertise_client_addr = {client_addr:?}\nadvertise_metrics_addr = {metrics_addr:?}\n{cfg}"))?;
    tc.cluster.restart(e.id)?;
    wait_node_up(&tc.cluster.client_config(), e.id, Duration::from_secs(60)).await?;
    let client = tc.client().await?;
    let map = client.refresh_map().await?;
    let listed = map.node(e.id).ok_or_else(|| anyhow::anyhow!("node {} is not in the map", e.id))?;
    assert_eq!((listed.client_addr.as_str(), listed.metrics_addr.as_str()), (client_addr.as_str(), metrics_addr.as_str()));
    // Reached by the advertised name alone.
    let only = ringkv_client::ClientConfig::new(vec![client_addr.clone()], tc.cluster.file.client_certs());
    let direct = ringkv_client::Client::unrouted(only)?;
    match direct.call_node(&client_addr, &ClientRequest::GetMap, Duration::from_secs(5)).await {
        Ok(Ok(ClientReply::Map(m))) => assert!(m.node(e.id).is_some()),
        other => panic!("node {} at {client_addr}: {other:?}", e.id),
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebalance_completes_when_the_placement_leader_is_killed_midway() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 32).await?;
    let client = tc.client().await?;
    // One move per node at a time, so the rebalance is still running when the leader dies.
    set_placement(&client, |s| s.max_moves_per_node = 1).await?;
    let writer = Writer::start(tc.client().await?, "takeover", 20_000);
    for _ in 0..2 {
        let id = tc.cluster.add_node()?;
        wait_node_up(&tc.cluster.client_config(), id, Duration::from_secs(60)).await?;
    }
    let leader = eventually(Duration::from_secs(60), "a move is running", || async {
        let r = placement_report(&client).await?;
        anyhow::ensure!(!r.moves.is_empty(), "no move running yet");
        Ok(r.leader)
    })
    .await?;
    tc.cluster.kill(leader).await?;
    let successor = eventually(Duration::from_secs(30), "a new placement leader", || async {
        let r = placement_report(&client).await?;
        anyhow::ensure!(r.leader != leader, "node {leader} still reported as placement leader");
        Ok(r.leader)
    })
    .await?;
    eprintln!("placement leader {leader} killed mid-rebalance; node {successor} took over");
    tc.cluster.restart(leader)?;
    let load = wait_balanced(&client, BALANCE_TIMEOUT).await?;
    let (acked, failed) = writer.stop().await?;
    eprintln!("balanced: {load:?}; {} writes acknowledged, {failed} failed", acked.len());
    assert_eq!(load.len(), 5);
    check_acked(&client, &acked).await?;
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_placement_member_is_replaced_and_the_placement_group_survives_another_loss() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(4, 4).await?;
    let client = tc.client().await?;
    assert_eq!(client.map().placement_members, vec![1, 2, 3]);
    client.put(b"k", b"v").await?;
    // Node 3's host is lost for good; the operator removes it.
    tc.cluster.kill(3).await?;
    match client.placement(&ClientRequest::SetNodeState { node: 3, state: NodeState::Removed, force: true }).await? {
        ClientReply::Done => {}
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
    eventually(Duration::from_secs(90), "node 4 replaces node 3 in the placement group", || async {
        let map = client.refresh_map().await?;
        anyhow::ensure!(map.placement_members == vec![1, 2, 4], "members {:?}, moving {:?}", map.placement_members, map.placement_move);
        Ok(())
    })
    .await?;
    let status = match client.call_node(&tc.client_addr(4), &ClientRequest::NodeStatus, Duration::from_secs(5)).await? {
        Ok(ClientReply::NodeStatus(s)) => s,
        other => anyhow::bail!("node status: {other:?}"),
    };
    let g0 = status.groups.iter().find(|g| g.group == 0).ok_or_else(|| anyhow::anyhow!("node 4 has no placement replica"))?;
    let mut voters = g0.voters.clone();
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 4], "the placement group's voters");
    // Another member dies: nodes 1 and 4 are still a placement quorum.
    tc.cluster.kill(2).await?;
    eventually(Duration::from_secs(60), "placement commands are served without nodes 2 and 3", || async {
        set_placement(&client, |s| s.snapshot_concurrency = 3).await?;
        anyhow::ensure!(placement_report(&client).await?.settings.snapshot_concurrency == 3);
        Ok(())
    })
    .await?;
    tc.stop().await;
    Ok(())
}
