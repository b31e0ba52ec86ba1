//! Who may do what: client roles carried in certificates, peers held to the node id their
//! certificate names, and orders only from the current placement leader.

use std::time::Duration;

use ringkv_client::{CertPaths, Client, ClientConfig, Error};
use ringkv_node::raft::{PeerReply, PeerRequest, PeerResponse, RaftMsg};
use ringkv_tests::{ringkv_binary, TestCluster};
use ringkv_wire::{ClientReply, ClientRequest, NodeHeartbeat, NodeInfo, NodeState, PlacementFence, RequestError, Role, ALPN_PEER};

/// A client of `tc` whose certificate carries `role`, and the directory `ringctl --certs` takes.
async fn client_with_role(tc: &TestCluster, role: Role) -> anyhow::Result<(Client, std::path::PathBuf)> {
    let ca_dir = &tc.cluster.file.certs.dir;
    let dir = tc.path().join(format!("certs-{role}"));
    let out = ringkv_transport::certs::issue_client(ca_dir, &dir, "client", role)?;
    std::fs::copy(&tc.cluster.file.certs.ca, dir.join("ca.pem"))?;
    let mut cfg =
        ClientConfig::new(vec![tc.client_addr(1)], CertPaths { ca: tc.cluster.file.certs.ca.clone(), cert: out.cert, key: out.key });
    cfg.timeout = Duration::from_secs(5);
    Ok((Client::connect(cfg).await?, dir))
}

fn denied(r: Result<ClientReply, Error>, needed: Role) {
    match r {
        Err(Error::Request(RequestError::PermissionDenied { needed: n, .. })) if n == needed => {}
        other => panic!("expected PermissionDenied (needs {needed}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_roles_limit_what_a_certificate_may_do() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(3, 4).await?;
    let admin = tc.client().await?;
    let (writer, writer_certs) = client_with_role(&tc, Role::Write).await?;
    let (reader, _) = client_with_role(&tc, Role::Read).await?;

    writer.put(b"k", b"v").await?;
    assert_eq!(reader.get(b"k").await?, Some(b"v".to_vec()));
    let r = reader.put(b"k", b"w").await;
    assert!(matches!(r, Err(Error::Request(RequestError::PermissionDenied { needed: Role::Write, .. }))), "{r:?}");
    assert_eq!(admin.get(b"k").await?, Some(b"v".to_vec()), "a refused write changed the value");

    // Everything that changes the cluster needs admin: a write client is refused each of them.
    let settings = ringkv_tests::placement_report(&admin).await?.settings;
    let me = NodeInfo {
        id: 2,
        peer_addr: "127.0.0.1:9".into(),
        client_addr: "127.0.0.1:9".into(),
        metrics_addr: "127.0.0.1:9".into(),
        state: NodeState::Joining,
        incarnation: 1,
    };
    let admin_only = [
        ClientRequest::SetNodeState { node: 3, state: NodeState::Removed, force: true },
        ClientRequest::SetPlacementSettings { settings: ringkv_wire::PlacementSettings { down_after_ms: 1000, ..settings.clone() } },
        ClientRequest::Join { node: me },
    ];
    for req in admin_only {
        denied(writer.placement(&req).await, Role::Admin);
    }
    for req in [
        ClientRequest::TransferLeader { shard: 0, to: 2 },
        ClientRequest::SetPartition { isolated_from: vec![2, 3] },
        ClientRequest::Bootstrap { nodes: vec![], shards: 4, replication: 3 },
        ClientRequest::JoinCluster { through: vec![tc.client_addr(2)] },
    ] {
        let r = writer.call_node(&tc.client_addr(1), &req, Duration::from_secs(5)).await?;
        denied(r.map_err(Error::Request), Role::Admin);
    }
    // Nothing changed: node 3 is up, the settings are the same, node 2's addresses are intact.
    let map = admin.refresh_map().await?;
    assert_eq!(map.node(3).map(|n| n.state), Some(NodeState::Up));
    assert_eq!(map.node(2).map(|n| n.client_addr.clone()), Some(tc.client_addr(2)));
    assert_eq!(ringkv_tests::placement_report(&admin).await?.settings, settings);
    // The admin certificate `ringkv dev` issued may.
    ringkv_tests::set_placement(&admin, |s| s.down_after_ms = settings.down_after_ms + 1000).await?;

    // ringctl exits with its own code for a refusal.
    let bin = ringkv_binary().with_file_name("ringctl");
    let out = tokio::process::Command::new(bin)
        .args(["--endpoints", &tc.client_addr(1), "--certs"])
        .arg(&writer_certs)
        .args(["node", "remove", "3", "--force", "--yes"])
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin"), "{}", String::from_utf8_lossy(&out.stderr));

    // What an admin may send is still refused where the cluster's state forbids it: a second
    // bootstrap (on the first placement member or any other), a join with an address no peer
    // can reach.
    let nodes = admin.refresh_map().await?.nodes.clone();
    for n in [1, 2] {
        let req = ClientRequest::Bootstrap { nodes: nodes.clone(), shards: 4, replication: 3 };
        match admin.call_node(&tc.client_addr(n), &req, Duration::from_secs(5)).await? {
            Err(RequestError::NotPermitted(m)) => assert!(m.contains("already belongs to a bootstrapped cluster"), "{m}"),
            other => anyhow::bail!("a second bootstrap on node {n} answered {other:?}"),
        }
    }
    let mut unreachable = nodes[0].clone();
    unreachable.id = 9;
    unreachable.peer_addr = "0.0.0.0:7000".into();
    match admin.placement(&ClientRequest::Join { node: unreachable }).await {
        Err(Error::Request(RequestError::Malformed(m))) => {
            assert!(m.contains("peer address") && m.contains("0.0.0.0:7000") && m.contains("unspecified"), "{m}")
        }
        other => anyhow::bail!("a join with an unspecified address answered {other:?}"),
    }
    assert!(admin.refresh_map().await?.node(9).is_none(), "the refused join registered node 9");

    // Fault injection is a property of a run, not of a node: restarted without
    // `--fault-injection`, node 3 refuses `SetPartition` even from an admin.
    tc.cluster.file.fault_injection = false;
    tc.cluster.kill(3).await?;
    tc.cluster.restart(3)?;
    let partition = ClientRequest::SetPartition { isolated_from: vec![1] };
    ringkv_tests::eventually(Duration::from_secs(30), "node 3 refuses fault injection", || async {
        match admin.call_node(&tc.client_addr(3), &partition, Duration::from_secs(5)).await? {
            Err(RequestError::NotPermitted(m)) if m.contains("fault injection is off") => Ok(()),
            other => anyhow::bail!("node 3 answered {other:?}"),
        }
    })
    .await?;
    let r = admin.call_node(&tc.client_addr(1), &ClientRequest::SetPartition { isolated_from: vec![] }, Duration::from_secs(5)).await?;
    assert!(matches!(r, Ok(ClientReply::Done)), "node 1, started with fault injection, refused: {r:?}");
    tc.cluster.wait_ready(Duration::from_secs(60)).await?;
    tc.stop().await;
    Ok(())
}

type PeerRpc = ringkv_transport::RpcClient<PeerRequest, PeerResponse>;

/// A peer connection to node `to` of `tc` with the certificate of node `as_node`.
async fn peer_as(tc: &TestCluster, to: u64, as_node: u64) -> anyhow::Result<PeerRpc> {
    let dir = tc.path().join(format!("impostor-{as_node}"));
    let ca_dir = &tc.cluster.file.certs.dir;
    let cert = if ca_dir.join(format!("node-{as_node}.pem")).exists() {
        ringkv_transport::certs::CertPathsOut {
            cert: ca_dir.join(format!("node-{as_node}.pem")),
            key: ca_dir.join(format!("node-{as_node}.key")),
        }
    } else {
        ringkv_transport::certs::issue_node(ca_dir, &dir, as_node, &[])?
    };
    let paths = CertPaths { ca: tc.cluster.file.certs.ca.clone(), cert: cert.cert, key: cert.key };
    let quic = ringkv_transport::tls::client_config(&paths, ALPN_PEER)?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let addr = tc.cluster.entry(to)?.peer_addr.parse()?;
    Ok(PeerRpc::connect(&ep, quic, addr, ringkv_transport::NODE_SERVER_NAME, 1, 1 << 20).await?)
}

fn not_permitted(r: PeerResponse, what: &str) {
    assert!(matches!(r, Err(RequestError::NotPermitted(_))), "{what}: expected NotPermitted, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_speak_only_for_themselves_and_orders_come_only_from_the_placement_leader() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    client.put(b"k", b"v").await?;
    let t = Duration::from_secs(5);
    // Node 9 holds a certificate from the cluster CA but is no member.
    let impostor = peer_as(&tc, 1, 9).await?;
    let ballot = openraft::raft::VoteRequest::new(ringkv_storage::Vote::new(1_000, 2), None);
    let vote = PeerRequest::Raft { from: 2, group: 1, msg: RaftMsg::Vote(ballot) };
    not_permitted(impostor.call(&vote, t).await?, "a Raft message claiming another node");
    let ballot = openraft::raft::VoteRequest::new(ringkv_storage::Vote::new(1_000, 2), None);
    let batch = PeerRequest::RaftBatch { from: 2, msgs: vec![(1, RaftMsg::Vote(ballot))] };
    not_permitted(impostor.call(&batch, t).await?, "a batch of Raft messages claiming another node");
    let hb = PeerRequest::Heartbeat(NodeHeartbeat {
        node: 2,
        incarnation: 0,
        map_version: 1,
        groups: vec![],
        quarantined: vec![],
        draining: false,
    });
    not_permitted(impostor.call(&hb, t).await?, "a heartbeat claiming another node");
    let map = client.refresh_map().await?;
    let shard = &map.shards[0];
    let fence = PlacementFence { term: u64::MAX / 2, map_version: map.version };
    let step =
        PeerRequest::MoveStep { shard: shard.id, from: shard.replicas[0], to: 9, to_peer_addr: "127.0.0.1:9".into(), cancel: false, fence };
    not_permitted(impostor.call(&step, t).await?, "a move step from a non-member");
    not_permitted(impostor.call(&PeerRequest::TransferLeader { shard: shard.id, to: 2, fence }, t).await?, "a transfer from a non-member");

    // A placement member may order only moves the map records, and never from an older term
    // than one already seen.
    let member = peer_as(&tc, 1, 2).await?;
    let on_1: Vec<u64> = map.shards.iter().filter(|s| s.replicas.contains(&1)).map(|s| s.id).collect();
    let s = map.shard(on_1[0]).expect("shard on node 1").clone();
    let bogus = PeerRequest::MoveStep { shard: s.id, from: 1, to: 3, to_peer_addr: String::new(), cancel: false, fence };
    not_permitted(member.call(&bogus, t).await?, "a move the map does not record");
    let newer = PlacementFence { term: 1_000_000, map_version: 0 };
    let r = member.call(&PeerRequest::TransferLeader { shard: s.id, to: 1, fence: newer }, t).await?;
    assert!(!matches!(r, Err(RequestError::NotPermitted(_))), "an order from a new term was refused: {r:?}");
    let older = PlacementFence { term: 999_999, map_version: 0 };
    not_permitted(member.call(&PeerRequest::TransferLeader { shard: s.id, to: 1, fence: older }, t).await?, "an order from a deposed term");
    // A batch of Raft messages is answered message by message, in order; one over the
    // limit is refused whole.
    let ballot = || RaftMsg::Vote(openraft::raft::VoteRequest::new(ringkv_storage::Vote::new(1, 2), None));
    let unknown = [1_000_001u64, 1_000_002, 1_000_003];
    let batch = PeerRequest::RaftBatch { from: 2, msgs: unknown.iter().map(|g| (*g, ballot())).collect() };
    match member.call(&batch, t).await? {
        Ok(PeerReply::RaftBatch(answers)) => {
            let refused: Vec<_> = answers
                .iter()
                .map(|a| match a {
                    Err(RequestError::ShardNotFound { shard, .. }) => Some(*shard),
                    _ => None,
                })
                .collect();
            assert_eq!(refused, unknown.map(Some), "answers {answers:?}");
        }
        other => panic!("a batch for unknown groups: {other:?}"),
    }
    let over = ringkv_wire::RAFT_BATCH_MESSAGES_MAX + 1;
    let batch = PeerRequest::RaftBatch { from: 2, msgs: (0..over).map(|i| (1_000_000 + i as u64, ballot())).collect() };
    let r = member.call(&batch, t).await?;
    assert!(matches!(r, Err(RequestError::Malformed(_))), "a batch of {over} messages: {r:?}");
    // A node's own Raft traffic under its own name still flows.
    assert!(matches!(member.call(&PeerRequest::GetMap, t).await?, Ok(PeerReply::Map(_))));
    assert_eq!(client.get(b"k").await?, Some(b"v".to_vec()));
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_with_another_nodes_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    ringkv_transport::certs::init_ca(&certs)?;
    let one = ringkv_transport::certs::issue_node(&certs, &certs, 1, &[])?;
    let client = ringkv_transport::certs::issue_client(&certs, &certs, "app", Role::Admin)?;
    for (cert, key, expect) in [(&one.cert, &one.key, "node 1's certificate"), (&client.cert, &client.key, "client certificate")] {
        let out = std::process::Command::new(ringkv_binary())
            .args(["node", "--data-dir"])
            .arg(dir.path().join(format!("node-2-{expect}")))
            .args(["--id", "2", "--peer-addr", "127.0.0.1:0", "--client-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .env("RUST_LOG", "error")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "node 2 started with {expect}");
        assert!(err.contains(expect), "{err}");
    }
    Ok(())
}

/// The issue's reproduction: node 3 lags, node 2 is wiped and restarted from a copy of its
/// identity, node 1 dies. Without incarnations, nodes 2 (empty) and 3 elected a leader and lost
/// acknowledged writes; now node 2 is refused and the shard waits for node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_is_refused_and_no_acknowledged_write_is_lost() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let mut tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    tc.signal(3, Signal::SIGSTOP)?;
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("amnesia-{i}").into_bytes()).collect();
    for k in &keys {
        client.put(k, k).await?;
    }
    // Node 2 loses its disk, node 1 dies, node 2 comes back with the same identity and node 3
    // (which missed the writes) resumes: no quorum holds the writes, so reads may fail, but none
    // may answer "not found".
    tc.cluster.kill(2).await?;
    let dir = tc.cluster.entry(2)?.data_dir.clone();
    let identity = std::fs::read(dir.join("node.toml"))?;
    std::fs::remove_dir_all(&dir)?;
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("node.toml"), identity)?;
    tc.cluster.kill(1).await?;
    tc.cluster.restart(2)?;
    tc.signal(3, Signal::SIGCONT)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reads = keys.iter().map(|k| client.get_with(k, ringkv_client::CallOptions::timeout(Duration::from_secs(3))));
    for (k, r) in keys.iter().zip(futures::future::join_all(reads).await) {
        if let Ok(v) = r {
            assert_eq!(v.as_deref(), Some(k.as_slice()), "acknowledged write {} lost", String::from_utf8_lossy(k));
        }
    }
    // Node 2 was refused and said how to bring the host back.
    let exited = ringkv_tests::eventually(Duration::from_secs(30), "the wiped node 2 stops", || {
        let gone = tc.cluster.exited();
        async move {
            anyhow::ensure!(gone.iter().any(|(id, s)| *id == 2 && !s.success()), "still running");
            Ok(())
        }
    })
    .await;
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    exited.map_err(|e| anyhow::anyhow!("{e:#}; its log:\n{log}"))?;
    assert!(log.contains("another data dir") && log.contains("node remove 2"), "no clear refusal in node 2's log:\n{log}");

    // With node 1 back every write is there.
    tc.cluster.restart(1)?;
    for k in &keys {
        let v = client.get_with(k, ringkv_client::CallOptions::timeout(Duration::from_secs(30))).await?;
        assert_eq!(v.as_deref(), Some(k.as_slice()), "acknowledged write {} lost", String::from_utf8_lossy(k));
    }
    tc.stop().await;
    Ok(())
}
