//! Increments a counter with a compare-and-swap loop.
//!
//! Start a local cluster (`scripts/dev.sh`), then:
//! `cargo run --release -p ringkv-client --example counter -- data/dev/cluster.json 10`

use ringkv_client::{CertPaths, Client, ClientConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "data/dev/cluster.json".into());
    let times: u32 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(10);
    let cluster: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let seeds = cluster["nodes"].as_array().into_iter().flatten().filter_map(|n| n["client_addr"].as_str().map(String::from)).collect();
    let cert = |k: &str| cluster["certs"][k].as_str().map(Into::into).ok_or_else(|| anyhow::anyhow!("{path}: no certs.{k}"));
    let certs = CertPaths { ca: cert("ca")?, cert: cert("client_cert")?, key: cert("client_key")? };
    let client = Client::connect(ClientConfig::new(seeds, certs)).await?;

    for _ in 0..times {
        loop {
            let current = client.get(b"example-counter").await?;
            let n: u64 = current.as_deref().map(|v| String::from_utf8_lossy(v).parse()).transpose()?.unwrap_or(0);
            let next = (n + 1).to_string();
            // Retries inside the call are exactly-once: a swap that was applied before a
            // timeout is reported as applied, never applied twice.
            if client.compare_and_swap(b"example-counter", current.as_deref(), next.as_bytes()).await?.swapped {
                println!("counter = {next}");
                break;
            }
        }
    }
    Ok(())
}
