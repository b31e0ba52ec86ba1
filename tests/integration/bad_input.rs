//! Bad input gets a clear error and breaks nothing: oversize keys and values, malformed frames,
//! clients without a certificate from the cluster CA, corrupt data dirs.

use std::sync::Arc;
use std::time::Duration;

use ringkv_client::{CertPaths, Client, ClientConfig, Error};
use ringkv_tests::{eventually, metric, ringkv_binary, scrape, TestCluster};
use ringkv_wire::{ClientResponse, Envelope, RequestError, ALPN_CLIENT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_keys_values_and_malformed_frames_get_clear_errors() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    client.put(b"keep", b"me").await?;
    let r = client.put(&vec![b'k'; 4097], b"v").await;
    assert!(matches!(r, Err(Error::Request(RequestError::KeyTooLarge { len: 4097, max: 4096 }))), "{r:?}");
    let r = client.put(b"k", &vec![0u8; (1 << 20) + 1]).await;
    assert!(matches!(r, Err(Error::Request(RequestError::ValueTooLarge { .. }))), "{r:?}");
    client.put(&vec![b'k'; 4096], &vec![7u8; 1 << 20]).await?;
    assert_eq!(client.get(&vec![b'k'; 4096]).await?.map(|v| v.len()), Some(1 << 20));

    // Raw frames on a real client connection.
    let certs = ringkv_node::dev::ClusterFileExt::client_certs(&tc.cluster.file);
    let quic = ringkv_transport::tls::client_config(&certs, ALPN_CLIENT)?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let addr = tc.client_addr(1).parse()?;
    let conn = ep.connect_with(quic, addr, ringkv_transport::NODE_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    // A well-framed body that is not a request: id 5, then garbage.
    send.write_all(&[0, 0, 0, 4, 5, 0xff, 0xff, 0xff]).await?;
    let reply = read_reply(&mut recv).await?;
    assert_eq!(reply.id, 5);
    assert!(matches!(reply.body, Err(RequestError::Malformed(_))), "{reply:?}");
    // A length prefix far past the limit: an error frame, then the stream is closed.
    send.write_all(&[0xff, 0xff, 0xff, 0xff]).await?;
    let reply = read_reply(&mut recv).await?;
    assert_eq!(reply.id, ringkv_transport::rpc::BROKEN_STREAM_ID);
    assert!(matches!(reply.body, Err(RequestError::Malformed(ref m)) if m.contains("larger than the limit")), "{reply:?}");
    conn.close(0u32.into(), b"done");

    // Nothing stored was lost and the node still serves.
    assert_eq!(client.get(b"keep").await?, Some(b"me".to_vec()));
    client.put(b"after", b"ok").await?;
    tc.stop().await;
    Ok(())
}

async fn read_reply(recv: &mut quinn::RecvStream) -> anyhow::Result<Envelope<ClientResponse>> {
    let mut h = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut h)).await??;
    let mut body = vec![0u8; u32::from_be_bytes(h) as usize];
    recv.read_exact(&mut body).await?;
    postcard_decode(&body)
}

fn postcard_decode(b: &[u8]) -> anyhow::Result<Envelope<ClientResponse>> {
    match ringkv_wire::decode_frame::<Envelope<ClientResponse>>(&[&(b.len() as u32).to_be_bytes()[..], b].concat(), usize::MAX)? {
        ringkv_wire::Decoded::Frame(f, _) => Ok(f),
        ringkv_wire::Decoded::Incomplete(_) => anyhow::bail!("incomplete"),
    }
}

/// How a node answered a QUIC connection made with `quic` to `addr`: the reason it closed the
/// connection within a few seconds, or `None` if it kept it open (it was accepted).
async fn refusal(addr: &str, quic: quinn::ClientConfig) -> anyhow::Result<Option<String>> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = match ep.connect_with(quic, addr.parse()?, ringkv_transport::NODE_SERVER_NAME)?.await {
        Ok(c) => c,
        Err(e) => return Ok(Some(e.to_string())),
    };
    // The server checks the client's certificate after the client has finished its side of
    // the handshake, so a refusal arrives as the connection's close.
    let closed = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
    ep.close(0u32.into(), b"");
    Ok(closed.ok().map(|e| e.to_string()))
}

/// The transport's own client configuration (trusting the cluster CA) with `cert` and `key`.
fn quic_with(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let paths = CertPaths { ca: ca.to_path_buf(), cert: cert.to_path_buf(), key: key.to_path_buf() };
    Ok(ringkv_transport::tls::client_config(&paths, alpn)?)
}

/// A client configuration trusting the cluster CA that offers no certificate at all (the
/// transport always sends one, so this one is built by hand).
fn quic_without_cert(ca: &std::path::Path, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

fn handshake_failures(tc: &TestCluster, id: u64) -> anyhow::Result<f64> {
    Ok(metric(&scrape(&tc.cluster.entry(id)?.metrics_addr)?, "ringkv_transport_handshake_failures_total").unwrap_or(0.0))
}

/// Each port refuses what it must, during the handshake and with the specific reason (not just
/// some error): the client port a certificate of another CA (TLS alert 48, unknown CA) and no
/// certificate (alert 116, certificate required); the peer port a client certificate of the
/// cluster's own CA (it needs a node certificate) and a node certificate of another CA. Every
/// refusal is counted; proper clients and peers are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_from_the_cluster_ca_are_refused() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let seeds = vec![tc.client_addr(1)];
    let peer_port = tc.cluster.entry(1)?.peer_addr.clone();
    let ca = tc.cluster.file.certs.ca.clone();
    let other = tempfile::tempdir()?;
    ringkv_transport::certs::init_ca(other.path())?;
    let foreign = ringkv_transport::certs::issue_client(other.path(), other.path(), "client", ringkv_wire::Role::Admin)?;
    let foreign_node = ringkv_transport::certs::issue_node(other.path(), other.path(), 2, &[])?;
    let own = &tc.cluster.file.certs;
    let before = handshake_failures(&tc, 1)?;

    // The smart client with a foreign certificate fails to connect at all.
    let certs = CertPaths { ca: ca.clone(), cert: foreign.cert.clone(), key: foreign.key.clone() };
    let mut cfg = ClientConfig::new(seeds.clone(), certs);
    cfg.timeout = Duration::from_secs(3);
    let r = Client::connect(cfg).await;
    assert!(r.is_err(), "a client with a foreign certificate connected");

    // rustls refuses a certificate of another CA whose name matches the cluster CA's as a bad
    // signature (decrypt_error, alert 51), one of a differently named CA as unknown (48).
    let cases: [(&str, &str, quinn::ClientConfig, &str); 4] = [
        ("client port, foreign CA", &seeds[0], quic_with(&ca, &foreign.cert, &foreign.key, ALPN_CLIENT)?, "invalid peer certificate"),
        ("client port, no certificate", &seeds[0], quic_without_cert(&ca, ALPN_CLIENT)?, "handshake failed: error 116"),
        (
            "peer port, client certificate",
            &peer_port,
            quic_with(&ca, &own.client_cert, &own.client_key, ringkv_wire::ALPN_PEER)?,
            "peer port needs a node certificate",
        ),
        (
            "peer port, foreign node",
            &peer_port,
            quic_with(&ca, &foreign_node.cert, &foreign_node.key, ringkv_wire::ALPN_PEER)?,
            "invalid peer certificate",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, addr, quic, expect) in cases {
        let r = refusal(addr, quic).await?;
        eprintln!("{what}: {r:?}");
        if !r.as_deref().is_some_and(|r| r.contains(expect)) {
            wrong.push(format!("{what}: expected a refusal with {expect:?}, got {r:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The control: the same dial with the cluster's own client certificate is kept open.
    let r = refusal(&seeds[0], quic_with(&ca, &own.client_cert, &own.client_key, ALPN_CLIENT)?).await?;
    assert!(r.is_none(), "a proper client was refused: {r:?}");
    let after = handshake_failures(&tc, 1)?;
    assert!(after >= before + 4.0, "refusals not counted: {before} -> {after} handshake failures");

    // The cluster still serves a proper client.
    let client = tc.client().await?;
    client.put(b"still", b"fine").await?;
    tc.stop().await;
    Ok(())
}

use rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_mismatched_data_dirs_are_refused_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    ringkv_transport::certs::init_ca(&certs)?;
    let node = ringkv_transport::certs::issue_node(&certs, &certs, 1, &[])?;
    let data = dir.path().join("node");
    let run = |args: &[&str]| {
        std::process::Command::new(ringkv_binary()).arg("node").arg("--data-dir").arg(&data).args(args).env("RUST_LOG", "error").output()
    };
    // Missing identity on a first start.
    let out = run(&[])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing setting `id`"), "{}", String::from_utf8_lossy(&out.stderr));
    // A data dir that belongs to another node id.
    std::fs::create_dir_all(&data)?;
    let identity = format!(
        "id = 7\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:1\"\nclient_addr = \"127.0.0.1:2\"\nmetrics_addr = \"127.0.0.1:3\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        data.display().to_string(),
        certs.join("ca.pem").display().to_string(),
        node.cert.display().to_string(),
        node.key.display().to_string()
    );
    std::fs::write(data.join("node.toml"), identity)?;
    let out = run(&["--id", "8"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to node 7"), "{}", String::from_utf8_lossy(&out.stderr));
    // A corrupt database.
    std::fs::create_dir_all(data.join("db"))?;
    std::fs::write(data.join("db/CURRENT"), b"garbage\n")?;
    std::fs::write(data.join("db/IDENTITY"), b"x")?;
    let out = run(&[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_frame_limit_gets_a_prompt_typed_error_and_the_connection_stays() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let client = tc.client().await?;
    client.put(b"before", b"1").await?;
    // Three values of 1 MiB in one shard's batch: over the node's frame limit (about 2 MiB).
    let map = client.map();
    let shard = map.shard_for_hash(ringkv_wire::key_hash(b"before")).map(|s| s.id).expect("shard");
    let keys: Vec<Vec<u8>> = (0u64..)
        .map(|i| format!("big-{i}").into_bytes())
        .filter(|k| map.shard_for_hash(ringkv_wire::key_hash(k)).map(|s| s.id) == Some(shard))
        .take(3)
        .collect();
    let value = vec![1u8; 1 << 20];
    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), value.as_slice())).collect();
    let started = std::time::Instant::now();
    let r = client.batch_put(&pairs, ringkv_client::CallOptions::timeout(Duration::from_secs(20))).await;
    let took = started.elapsed();
    assert!(r.iter().all(|r| matches!(r, Err(Error::Request(RequestError::TooLarge(_))))), "{:?}", r.first());
    assert!(took < Duration::from_secs(5), "the refusal took {took:?}");
    // Over the client's own limit (8 MiB): refused before sending, also typed.
    let huge = vec![2u8; 9 << 20];
    let r = client.batch_put(&[(b"h1", huge.as_slice())], ringkv_client::CallOptions::default()).await;
    assert!(matches!(r[0], Err(Error::Request(RequestError::ValueTooLarge { .. }) | Error::Request(RequestError::TooLarge(_)))), "{r:?}");
    // The same client and connection go on serving at once.
    let started = std::time::Instant::now();
    assert_eq!(client.get(b"before").await?, Some(b"1".to_vec()));
    client.put(b"after", b"2").await?;
    assert!(started.elapsed() < Duration::from_secs(2), "the node was avoided after the refusal");
    for k in &keys {
        assert_eq!(client.get(k).await?, None, "part of a refused batch was written");
    }
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_limits_a_node_answers_busy_and_serves_again_after() -> anyhow::Result<()> {
    let tc = TestCluster::start_with(3, 4, "[limits]\nclient_connections_max = 3\nclient_requests_in_flight_max = 2").await?;
    let client = tc.client().await?;
    client.put(b"k", b"v").await?;
    let map = client.map();
    let desc = map.shard_for_hash(ringkv_wire::key_hash(b"k")).expect("shard").clone();
    let leader = tc.leaders_on(&client, 1).await?;
    let addr = if leader.contains(&desc.id) { tc.client_addr(1) } else { tc.client_addr(desc.replicas[0]) };

    // Requests in flight: many writes at once on raw calls (no retries). Each waits for its
    // Raft round (a linearizable read under the lease is answered without waiting at all).
    let req =
        ringkv_wire::ClientRequest::Put { shard: desc.id, epoch: desc.epoch, key: b"k".to_vec(), value: b"v".to_vec(), session: None };
    let mut busy = 0;
    for _ in 0..10 {
        let calls = (0..64).map(|_| client.call_node(&addr, &req, Duration::from_secs(5)));
        for r in futures::future::join_all(calls).await {
            match r? {
                Err(RequestError::Busy(_)) => busy += 1,
                Ok(_) | Err(RequestError::NotLeader { .. }) => {}
                Err(e) => panic!("unexpected answer {e}"),
            }
        }
        if busy > 0 {
            break;
        }
    }
    assert!(busy > 0, "64 concurrent writes never met the limit of 2 in flight");

    // Connections: open raw connections until one is answered busy.
    let certs = ringkv_node::dev::ClusterFileExt::client_certs(&tc.cluster.file);
    let quic = ringkv_transport::tls::client_config(&certs, ALPN_CLIENT)?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut open = Vec::new();
    let mut refused = false;
    for _ in 0..6 {
        let conn = ep.connect_with(quic.clone(), tc.client_addr(1).parse()?, ringkv_transport::NODE_SERVER_NAME)?.await?;
        let rpc = ringkv_transport::RpcClient::<ringkv_wire::ClientRequest, ClientResponse>::over(conn, 1, 1 << 20).await?;
        match rpc.call(&ringkv_wire::ClientRequest::GetMap, Duration::from_secs(3)).await {
            Ok(Err(RequestError::Busy(_))) => {
                refused = true;
                break;
            }
            Ok(Ok(_)) => open.push(rpc),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(refused, "6 connections on top of the test's own were all served with a limit of 3");
    for c in &open {
        c.close();
    }
    drop(open);
    // Once connections closed the node serves again, and the cluster never stopped.
    ringkv_tests::eventually(Duration::from_secs(10), "node 1 serves a new connection", || async {
        let c = Client::connect(ClientConfig::new(vec![tc.client_addr(1)], certs.clone())).await?;
        anyhow::ensure!(c.get(b"k").await? == Some(b"v".to_vec()));
        Ok(())
    })
    .await?;
    tc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_recover_is_quarantined_and_the_node_serves_the_rest() -> anyhow::Result<()> {
    let mut tc = TestCluster::start(4, 4).await?;
    let client = tc.client().await?;
    let map = client.map();
    let keys = ringkv_tests::keys_for_every_shard(&map, "q");
    for (_, k) in &keys {
        client.put(k, b"v").await?;
    }
    let broken = map.shards.iter().find(|s| s.replicas.contains(&2)).map(|s| s.id).expect("a shard on node 2");
    // Node 2 stops; its replica of `broken` is left in the middle of an install whose files
    // are gone (as a lost disk sector or an operator's `rm` would leave it).
    tc.cluster.stop_node(2, Duration::from_secs(10)).await?;
    {
        let db = ringkv_storage::Db::open(&tc.cluster.entry(2)?.data_dir.join("db"))?;
        let marker = ringkv_storage::raft_store::InstallMarker::new(
            db.snapshot_root(),
            vec![db.snapshot_dir("in").join("gone").join("00000.sst")],
            Default::default(),
        );
        db.write_sync(marker_batch(&db, broken, &postcard::to_allocvec(&marker)?))?;
        db.shutdown();
    }
    tc.cluster.restart(2)?;
    let status = ringkv_tests::eventually(Duration::from_secs(30), "node 2 is up and reports the quarantine", || async {
        match client.call_node(&tc.client_addr(2), &ringkv_wire::ClientRequest::NodeStatus, Duration::from_secs(2)).await? {
            Ok(ringkv_wire::ClientReply::NodeStatus(s)) if !s.quarantined.is_empty() => Ok(s),
            other => anyhow::bail!("{other:?}"),
        }
    })
    .await?;
    assert_eq!(status.quarantined.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![broken]);
    assert!(status.quarantined[0].1.contains("gone"), "{:?}", status.quarantined);
    let held = map.shards.iter().filter(|s| s.replicas.contains(&2)).count();
    assert_eq!(status.groups.iter().filter(|g| g.group != 0).count(), held - 1, "node 2 runs its other replicas");
    let text = ringkv_tests::scrape(&tc.cluster.entry(2)?.metrics_addr)?;
    assert_eq!(ringkv_tests::metric(&text, "ringkv_replicas_quarantined"), Some(1.0));
    // Every shard, the broken one included, still serves from its other replicas.
    for (_, k) in &keys {
        assert_eq!(client.get(k).await?, Some(b"v".to_vec()));
    }
    // The placement driver rebuilds the broken replica on another node, and node 2 drops the
    // quarantined state once the map no longer lists it there.
    eventually(Duration::from_secs(90), "the quarantined replica is rebuilt elsewhere", || async {
        let map = client.refresh_map().await?;
        let s = map.shard(broken).ok_or_else(|| anyhow::anyhow!("no shard {broken}"))?;
        anyhow::ensure!(s.replicas.len() == 3 && !s.replicas.contains(&2) && map.moves.is_empty(), "replicas {:?}", s.replicas);
        match client.call_node(&tc.client_addr(2), &ringkv_wire::ClientRequest::NodeStatus, Duration::from_secs(2)).await? {
            Ok(ringkv_wire::ClientReply::NodeStatus(st)) => anyhow::ensure!(st.quarantined.is_empty(), "{:?}", st.quarantined),
            other => anyhow::bail!("{other:?}"),
        }
        Ok(())
    })
    .await?;
    for (_, k) in &keys {
        assert_eq!(client.get(k).await?, Some(b"v".to_vec()));
    }
    tc.stop().await;
    Ok(())
}

/// A write batch that records an install marker for `group`.
fn marker_batch(db: &ringkv_storage::Db, group: u64, marker: &[u8]) -> ringkv_storage::WriteBatch {
    let mut b = ringkv_storage::WriteBatch::default();
    b.put_cf(
        db.cf(ringkv_storage::keys::CF_APPLY_STATE),
        ringkv_storage::keys::group_tag_key(group, ringkv_storage::keys::TAG_INSTALLING),
        marker,
    );
    b
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// A full disk: the cluster's data is on a small tmpfs that the test fills with a ballast file
/// until less than the nodes' reserve is free. Writes are then refused with a typed, clear
/// `DiskFull` (not a timeout, not a crash), reads are served, every acknowledged write is
/// there and every node stays up; once the ballast is gone, writes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_keeps_every_write_and_recovers() -> anyhow::Result<()> {
    const RESERVE: u64 = 64 << 20;
    let tc = TestCluster::start_on_tmpfs(3, 4, 512 << 20, &format!("[storage]\nreserve_bytes = {RESERVE}")).await?;
    let client = tc.client().await?;
    let value = vec![7u8; 16 << 10];
    let mut acked = Vec::new();
    for i in 0..50 {
        let k = format!("before-full-{i}").into_bytes();
        client.put(&k, &value).await?;
        acked.push(k);
    }
    // The ballast leaves a little less than the reserve free.
    let disk = tc.path();
    let ballast = disk.join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast)?;
        let chunk = vec![0u8; 1 << 20];
        while free_bytes(&disk)? > RESERVE - (4 << 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let refusal = eventually(Duration::from_secs(15), "writes are refused on a full disk", || async {
        match client.put(b"on-a-full-disk", &value).await {
            Err(Error::Request(e @ RequestError::DiskFull { .. })) => Ok(e),
            Ok(()) => anyhow::bail!("a write was taken below the reserve"),
            Err(e) => Err(anyhow::anyhow!("refused with {e} instead of DiskFull")),
        }
    })
    .await?;
    let text = refusal.to_string();
    assert!(text.contains("disk full") && text.contains("reserve"), "{text}");
    // Each node measures its disk once a second, so the node that refused may have seen the
    // ballast before the others: every node reports its disk full within a few of those checks.
    for n in 1..=3 {
        let addr = tc.cluster.entry(n)?.metrics_addr.clone();
        eventually(Duration::from_secs(5), &format!("node {n} reports its disk full"), || {
            let addr = addr.clone();
            async move {
                match metric(&scrape(&addr)?, "ringkv_storage_disk_full") {
                    Some(1.0) => Ok(()),
                    other => anyhow::bail!("ringkv_storage_disk_full is {other:?}"),
                }
            }
        })
        .await?;
    }
    // Reads are served, nothing acknowledged is missing, and every node is up.
    for k in &acked {
        assert_eq!(client.get(k).await?, Some(value.clone()), "{}", String::from_utf8_lossy(k));
    }
    for n in 1..=3 {
        let r = client.call_node(&tc.client_addr(n), &ringkv_wire::ClientRequest::NodeStatus, Duration::from_secs(5)).await?;
        assert!(r.is_ok(), "node {n} on a full disk: {r:?}");
    }
    // Space is freed: writes are taken again.
    std::fs::remove_file(&ballast)?;
    eventually(Duration::from_secs(15), "writes are taken again", || async {
        client.put(b"after-full", &value).await?;
        Ok(())
    })
    .await?;
    assert_eq!(client.get(b"after-full").await?, Some(value.clone()));
    tc.stop().await;
    Ok(())
}
