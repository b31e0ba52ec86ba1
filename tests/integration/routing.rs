//! Placement at bootstrap on more nodes than replicas, and the typed routing errors that tell a
//! client where to go.

use std::time::Duration;

use ringkv_tests::{eventually, keys_for_every_shard, metric, scrape, set_placement, TestCluster};
use ringkv_wire::{ClientRequest, Epoch, RequestError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_get_balanced_replicas_and_misrouted_requests_get_hints() -> anyhow::Result<()> {
    let tc = TestCluster::start(5, 16).await?;
    let client = tc.client().await?;
    let map = client.map();
    // 16 shards x 3 replicas over 5 nodes: 9.6 each, so 9 or 10; first replicas 3 or 4.
    for n in 1..=5u64 {
        let held = map.shards.iter().filter(|s| s.replicas.contains(&n)).count();
        assert!((9..=10).contains(&held), "node {n} holds {held} replicas");
        let first = map.shards.iter().filter(|s| s.replicas[0] == n).count();
        assert!((3..=4).contains(&first), "node {n} is first replica of {first} shards");
    }
    assert_eq!(map.placement_members, vec![1, 2, 3]);
    // No leader balancing: the leader found below must still lead when the follower names it.
    set_placement(&client, |s| s.balance = false).await?;
    // Nodes 4 and 5 are not placement members: they learned the map from one and created
    // their replicas from it, so writes reach every shard.
    let keys = keys_for_every_shard(&map, "five");
    for (_, k) in &keys {
        client.put(k, b"v").await?;
        assert_eq!(client.get(k).await?, Some(b"v".to_vec()));
    }
    let (shard, key) = keys[0].clone();
    let desc = map.shard(shard).expect("shard").clone();
    let leader = {
        let mut found = None;
        for n in &desc.replicas {
            if tc.leaders_on(&client, *n).await?.contains(&shard) {
                found = Some(*n);
            }
        }
        found.expect("shard has a leader")
    };
    let follower = *desc.replicas.iter().find(|n| **n != leader).expect("follower");
    let outsider = (1..=5u64).find(|n| !desc.replicas.contains(n)).expect("a node without this shard");
    let put = |shard, epoch| ClientRequest::Put { shard, epoch, key: key.clone(), value: b"x".to_vec(), session: None };
    let call = |node: u64, req: ClientRequest| {
        let addr = tc.client_addr(node);
        let client = &client;
        async move { client.call_node(&addr, &req, Duration::from_secs(5)).await }
    };

    match call(follower, put(shard, desc.epoch)).await? {
        Err(RequestError::NotLeader { shard: s, leader: Some(l), leader_addr: Some(a) }) => {
            assert_eq!((s, l), (shard, leader));
            assert_eq!(a, tc.client_addr(leader));
        }
        other => anyhow::bail!("follower answered {other:?}"),
    }
    match call(leader, put(shard, Epoch { conf_ver: 0, version: 0 })).await? {
        Err(RequestError::StaleEpoch { descriptor }) => assert_eq!(descriptor, desc),
        other => anyhow::bail!("stale epoch answered {other:?}"),
    }
    let wrong = keys.iter().map(|(s, _)| *s).find(|s| *s != shard).expect("another shard");
    match call(leader, put(wrong, desc.epoch)).await? {
        Err(RequestError::WrongShard { shard: s, descriptor: Some(d) }) => {
            assert_eq!(s, wrong);
            assert_eq!(d, desc, "the hint is the shard that holds the key");
        }
        other => anyhow::bail!("wrong shard answered {other:?}"),
    }
    match call(leader, put(999, desc.epoch)).await? {
        Err(RequestError::WrongShard { shard: 999, descriptor: Some(d) }) => assert_eq!(d.id, shard),
        other => anyhow::bail!("unknown shard answered {other:?}"),
    }
    match call(outsider, put(shard, desc.epoch)).await? {
        Err(RequestError::ShardNotFound { shard: s, node }) => assert_eq!((s, node), (shard, outsider)),
        other => anyhow::bail!("node without the shard answered {other:?}"),
    }
    match call(leader, ClientRequest::SetPartition { isolated_from: vec![1] }).await? {
        Ok(_) => {} // fault injection is on in tests
        Err(e) => anyhow::bail!("set partition refused: {e}"),
    }
    call(leader, ClientRequest::SetPartition { isolated_from: vec![] }).await??;
    assert_eq!(client.get(&key).await?, Some(b"v".to_vec()), "misrouted writes changed nothing");

    // Every node serves its metrics, and keeps exactly one connection per peer: every QUIC
    // connection open on its peer endpoint (a duplicate dialed from both ends, a connection
    // never closed) is one the pool uses for a distinct peer. Duplicates are closed after a
    // grace period, so this is awaited.
    for n in &tc.cluster.file.nodes {
        let text = scrape(&n.metrics_addr)?;
        for name in
            ["ringkv_client_requests_total", "ringkv_raft_leaders", "ringkv_storage_syncs_total", "ringkv_raft_applied_entries_total"]
        {
            assert!(text.contains(name), "node {} metrics lack {name}", n.id);
        }
        eventually(Duration::from_secs(15), &format!("node {} keeps one connection per peer", n.id), || async {
            let text = scrape(&n.metrics_addr)?;
            let peers = metric(&text, "ringkv_transport_peer_connections").unwrap_or(-1.0);
            let open = metric(&text, "ringkv_transport_peer_endpoint_connections").unwrap_or(-1.0);
            anyhow::ensure!((1.0..=4.0).contains(&peers) && open == peers, "{open} connections open for {peers} peers");
            Ok(())
        })
        .await?;
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_gets_a_leader_with_a_node_down_at_bootstrap_and_it_catches_up_later() -> anyhow::Result<()> {
    // Node 3 is not running when the cluster is made; `start` waits until every shard has a
    // leader, which its shards whose first replica is node 3 get only if another replica starts
    // the group.
    let mut tc = ringkv_tests::TestCluster::start_holding_back(3, 8, "", vec![3]).await?;
    let client = tc.client().await?;
    let map = client.map();
    assert!(map.shards.iter().any(|s| s.replicas.first() == Some(&3)), "node 3 leads no shard first: {:?}", map.shards);
    let keys = ringkv_tests::keys_for_every_shard(&map, "late");
    for (_, k) in &keys {
        client.put(k, b"v").await?;
    }
    tc.cluster.restart(3)?;
    for (_, k) in &keys {
        tc.wait_caught_up(&client, 3, k, b"v").await?;
    }
    tc.stop().await;
    Ok(())
}
