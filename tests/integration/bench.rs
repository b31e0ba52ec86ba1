//! The benchmark harness end to end: the JSON contract of a `--local` run, an open loop that
//! keeps its schedule, load from two agents merged into one result, and plots from a sweep.

use std::process::Output;

use ringkv_bench::run::RunResult;
use ringkv_bench::sweep::{SweepParam, Target};
use ringkv_bench::workload::{KeyDist, Workload};
use ringkv_bench::RunSpec;
use ringkv_tests::{ringkv_binary, TestCluster};

fn bench(args: &[&str]) -> anyhow::Result<Output> {
    let bin = ringkv_binary().with_file_name("ringkv-bench");
    Ok(std::process::Command::new(bin).args(args).stdin(std::process::Stdio::null()).output()?)
}

fn spec(workload: Workload, duration_ms: u64) -> RunSpec {
    RunSpec {
        workload,
        distribution: KeyDist::Uniform,
        zipf_theta: 0.99,
        keys: 500,
        key_size: 8,
        value_size: 64,
        clients: 2,
        inflight: 2,
        warmup_ms: 500,
        duration_ms,
        rate: None,
        preload: workload.reads(),
        timeout_ms: 5000,
        seed: 3,
    }
}

/// The command scripts rely on writes at least these fields, and tears its cluster down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_local_run_writes_the_contract_fields() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out_json = dir.path().join("out.json");
    let data = dir.path().join("data");
    let (j, d) = (out_json.display().to_string(), data.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        bench(&[
            "--local",
            "--nodes",
            "3",
            "--shards",
            "4",
            "--workload",
            "write",
            "--clients",
            "4",
            "--value-size",
            "256",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--data-dir",
            &d,
            "--json",
            &j,
        ])
    })
    .await??;
    assert!(out.status.success(), "ringkv-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_json)?)?;
    for field in ["ops_per_sec", "p50_us", "p99_us", "p999_us", "errors"] {
        assert!(v.get(field).map(|f| f.is_number()).unwrap_or(false), "{field} missing or not a number in {v}");
    }
    let ops = v["ops"].as_u64().unwrap_or(0);
    assert!(ops > 0, "no operations completed: {v}");
    assert!(v["ops_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(v["p50_us"].as_u64() <= v["p99_us"].as_u64() && v["p99_us"].as_u64() <= v["p999_us"].as_u64());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("total") && stdout.contains("p99.9"), "no table on stdout: {stdout}");
    // The cluster is gone: its directory was removed after the successful run.
    let left: Vec<_> = std::fs::read_dir(&data)?.collect();
    assert!(left.is_empty(), "local cluster data left behind: {left:?}");

    // The idle cost of shards: CPU and memory of every node of a fresh cluster.
    let idle_json = dir.path().join("idle.json");
    let (j, d) = (idle_json.display().to_string(), data.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        bench(&["idle", "--shards", "1,4", "--nodes", "3", "--settle", "500ms", "--window", "1s", "--data-dir", &d, "--json", &j])
    })
    .await??;
    assert!(out.status.success(), "idle failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&idle_json)?)?;
    let points = v["points"].as_array().cloned().unwrap_or_default();
    assert_eq!(points.iter().map(|p| p["shards"].as_u64()).collect::<Vec<_>>(), vec![Some(1), Some(4)]);
    for p in &points {
        assert!(p["rss_mib_mean"].as_f64().unwrap_or(0.0) > 1.0, "no memory measured: {p}");
        // CPU per node: a busiest node at least as busy as the mean, within what the cores allow
        // (an idle node may be near 0: idle groups are meant to be quiet).
        let (mean, max) = (p["cpu_percent_mean"].as_f64().unwrap_or(-1.0), p["cpu_percent_max"].as_f64().unwrap_or(-1.0));
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        assert!(0.0 <= mean && mean <= max && max <= 100.0 * cores, "cpu mean {mean}, max {max}: {p}");
    }

    // Bad arguments get a clear error and a failing exit code.
    let out = tokio::task::spawn_blocking(|| bench(&["--workload", "write"])).await??;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("choose one target"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::spawn_blocking(|| bench(&["--local", "--keys", "100000", "--key-size", "3"])).await??;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key-size"));
    Ok(())
}

/// Two agents loading one cluster: the coordinator's result is exactly their sum. Then the
/// open loop: at a rate the cluster easily keeps, the run completes about rate x duration ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_from_two_agents_merges_and_the_open_loop_keeps_its_rate() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let config = tc.cluster.client_config();
    let mut hosts = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        hosts.push(listener.local_addr()?.to_string());
        agents.push(tokio::spawn(ringkv_bench::agent::serve(listener, config.clone())));
    }
    let s = spec(Workload::A, 1500);
    let merged = ringkv_bench::sweep::run(&Target::Hosts(hosts.clone()), &s).await?;
    assert_eq!(merged.hosts, 2);
    assert!(merged.ops > 0);
    assert_eq!(merged.errors, 0, "{:?}", merged.errors_by_kind);
    // Every key was preloaded (by the first agent), so no read missed.
    assert_eq!(merged.read_misses, 0);
    let hist_total: u64 = merged.histogram.0.iter().map(|(_, n)| n).sum();
    assert_eq!(hist_total, merged.ops);
    let per_op: u64 = merged.per_op.values().map(|m| m.count).sum();
    assert_eq!(per_op, merged.ops);
    let series: u64 = merged.series.iter().map(|x| x.ops).sum();
    assert_eq!(series, merged.ops);
    assert!(merged.per_op.contains_key("read") && merged.per_op.contains_key("update"));

    // `--rate` is the total over all agents, not per agent.
    // Enough workers that each has 300 ms per operation: the schedule holds on a busy CI host.
    let mut paced = spec(Workload::Write, 2000);
    paced.rate = Some(100.0);
    paced.inflight = 16;
    let r = ringkv_bench::sweep::run(&Target::Hosts(hosts.clone()), &paced).await?;
    assert!((150..=230).contains(&r.ops), "2 agents at 100 ops/s in all for 2 s completed {} ops", r.ops);

    // A bad agent address fails the run with the address in the error.
    let err = ringkv_bench::sweep::run(&Target::Hosts(vec!["127.0.0.1:1".into()]), &s).await.expect_err("no agent there");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    for a in agents {
        a.abort();
    }

    let mut open = spec(Workload::Write, 2000);
    open.rate = Some(100.0);
    open.inflight = 16;
    let r: RunResult = ringkv_bench::sweep::run(&Target::Cluster(tc.path().join("cluster.json")), &open).await?;
    assert_eq!(r.errors, 0, "{:?}", r.errors_by_kind);
    assert!((150..=230).contains(&r.ops), "open loop at 100 ops/s for 2 s completed {} ops", r.ops);
    // At most the last operation of each worker may still be due when the run ends.
    assert!(r.not_issued <= open.concurrency() as u64, "{} never sent at a rate the cluster keeps", r.not_issued);

    // An open loop the generator cannot keep up with reports what it never sent, and its
    // throughput is what completed, not the rate asked for.
    let mut flood = spec(Workload::Write, 1500);
    flood.clients = 1;
    flood.inflight = 1;
    flood.rate = Some(100_000.0);
    let r = ringkv_bench::sweep::run(&Target::Cluster(tc.path().join("cluster.json")), &flood).await?;
    assert!(r.not_issued > 0, "{r:?}");
    let completed_rate = r.ops as f64 / r.elapsed_s;
    assert!(
        (r.ops_per_sec - completed_rate).abs() <= completed_rate * 0.05 && r.ops_per_sec < 100_000.0 / 4.0,
        "throughput {} ops/s is not what completed ({} ops in {} s)",
        r.ops_per_sec,
        r.ops,
        r.elapsed_s
    );
    assert!(r.table().contains("warning"));
    tc.stop().await;
    Ok(())
}

/// A sweep's JSON draws into the two SVG plots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_draws_its_plots() -> anyhow::Result<()> {
    let tc = TestCluster::start(3, 4).await?;
    let target = Target::Cluster(tc.path().join("cluster.json"));
    let s = spec(Workload::Write, 1000);
    let result = ringkv_bench::sweep::sweep(SweepParam::Concurrency, &[1, 4], &s, &target, "test".into(), |_| {}).await?;
    assert_eq!(result.points.len(), 2);
    assert_eq!(result.points[1].result.spec.concurrency(), 4);
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("sweep.json");
    std::fs::write(&json, serde_json::to_vec(&result)?)?;
    let (j, o) = (json.display().to_string(), dir.path().join("plots").display().to_string());
    let out = tokio::task::spawn_blocking(move || bench(&["plot", &j, "--out", &o])).await??;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["concurrency-throughput.svg", "concurrency-latency.svg"] {
        let svg = std::fs::read_to_string(dir.path().join("plots").join(name))?;
        assert!(svg.starts_with("<svg"), "{name} is not an SVG");
        assert!(svg.contains("<polyline") || svg.contains("<path"), "{name} has no line");
        assert!(svg.contains("p99") || svg.contains("ops/s"), "{name} has no legend");
    }
    // A file that is no result is refused.
    let (j, o) = (dir.path().join("plots").join("concurrency-latency.svg").display().to_string(), dir.path().display().to_string());
    let out = tokio::task::spawn_blocking(move || bench(&["plot", &j, "--out", &o])).await??;
    assert!(!out.status.success());
    tc.stop().await;
    Ok(())
}
