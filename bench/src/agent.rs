//! Load from several hosts at once: `ringkv-bench agent` runs on each load host and waits for
//! jobs; the coordinator (`ringkv-bench --hosts A,B,...`) sends every agent the same run, starts
//! them together, and merges their histograms into one result.
//!
//! The protocol is one JSON line each way per TCP connection. Agents trust whoever connects:
//! run them on the benchmark network only.

use std::sync::Arc;
use std::time::Duration;

use ringkv_client::{Client, ClientConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::run::{connect_clients, execute, preload, RunResult, RunSpec};

/// Largest job or reply line accepted.
const LINE_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum Job {
    /// Write every key once (sent to one agent before the run).
    Preload(RunSpec),
    /// Run the warm-up and measured phases.
    Run(RunSpec),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Preloaded,
    Result(Box<RunResult>),
    Failed(String),
}

async fn read_line<T: for<'de> Deserialize<'de>>(stream: &mut BufReader<TcpStream>) -> anyhow::Result<T> {
    let mut line = Vec::new();
    let n = (&mut *stream).take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut line).await?;
    anyhow::ensure!(n > 0, "connection closed before a message");
    anyhow::ensure!(line.ends_with(b"\n"), "message longer than {LINE_BYTES_MAX} bytes or cut short");
    serde_json::from_slice(&line).map_err(|e| anyhow::anyhow!("malformed message: {e}"))
}

async fn write_line<T: Serialize>(stream: &mut BufReader<TcpStream>, msg: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec(msg)?;
    bytes.push(b'\n');
    stream.get_mut().write_all(&bytes).await?;
    Ok(())
}

async fn handle(config: &ClientConfig, job: Job) -> anyhow::Result<Reply> {
    match job {
        Job::Preload(spec) => {
            spec.validate()?;
            let clients = connect_clients(config, &spec).await?;
            preload(&clients, &spec).await?;
            close(&clients);
            Ok(Reply::Preloaded)
        }
        Job::Run(mut spec) => {
            spec.preload = false;
            let clients = connect_clients(config, &spec).await?;
            let r = execute(&clients, &spec, &[]).await;
            close(&clients);
            Ok(Reply::Result(Box::new(r?)))
        }
    }
}

fn close(clients: &[Arc<Client>]) {
    for c in clients {
        c.close();
    }
}

/// Serves jobs, one at a time, until the task is dropped.
pub async fn serve(listener: TcpListener, config: ClientConfig) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let mut stream = BufReader::new(stream);
        let reply = match read_line::<Job>(&mut stream).await {
            Ok(job) => {
                tracing::info!(%peer, ?job, "job");
                handle(&config, job).await.unwrap_or_else(|e| Reply::Failed(format!("{e:#}")))
            }
            Err(e) => Reply::Failed(format!("bad job from {peer}: {e:#}")),
        };
        if let Err(e) = write_line(&mut stream, &reply).await {
            tracing::warn!(%peer, "cannot answer: {e}");
        }
    }
}

async fn call(host: &str, job: &Job, timeout: Duration) -> anyhow::Result<Reply> {
    let fut = async {
        let stream = TcpStream::connect(host).await.map_err(|e| anyhow::anyhow!("agent {host}: {e}"))?;
        let mut stream = BufReader::new(stream);
        write_line(&mut stream, job).await?;
        read_line::<Reply>(&mut stream).await.map_err(|e| anyhow::anyhow!("agent {host}: {e}"))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| anyhow::anyhow!("agent {host}: no answer within {timeout:?}"))?
}

/// Runs `spec` on every agent at once (preloading through the first) and merges the results.
pub async fn run_on_hosts(hosts: &[String], spec: &RunSpec) -> anyhow::Result<RunResult> {
    anyhow::ensure!(!hosts.is_empty(), "--hosts lists no agents");
    spec.validate()?;
    if spec.preload {
        match call(&hosts[0], &Job::Preload(spec.clone()), Duration::from_secs(3600)).await? {
            Reply::Preloaded => {}
            Reply::Failed(e) => anyhow::bail!("agent {}: preload failed: {e}", hosts[0]),
            Reply::Result(_) => anyhow::bail!("agent {}: answered a preload with a result", hosts[0]),
        }
    }
    let limit = Duration::from_millis(spec.warmup_ms + spec.duration_ms + spec.timeout_ms) + Duration::from_secs(120);
    let calls = hosts.iter().enumerate().map(|(i, h)| {
        let mut s = spec.clone();
        s.preload = false;
        // `--rate` is the rate of all hosts together.
        s.rate = spec.rate.map(|r| r / hosts.len() as f64);
        // Different hosts draw different keys.
        s.seed = spec.seed.wrapping_add(i as u64 * 1_000_003);
        async move { (h.clone(), call(h, &Job::Run(s), limit).await) }
    });
    let mut parts = Vec::new();
    for (host, r) in futures::future::join_all(calls).await {
        match r? {
            Reply::Result(mut r) => {
                // Report the coordinator's spec (not the per-host seed).
                r.spec = spec.clone();
                parts.push(*r)
            }
            Reply::Failed(e) => anyhow::bail!("agent {host}: {e}"),
            Reply::Preloaded => anyhow::bail!("agent {host}: answered a run with a preload"),
        }
    }
    RunResult::merge(parts)
}
