//! `jepsen`: a fault run of any length by hand (the CI runs are short ones of the same code).
//!
//!     cargo build --release --workspace --bins
//!     $CARGO_TARGET_DIR/release/jepsen --time 600 --seed 42
//!
//! Needs root (network namespaces) and nftables. Prints the seed; a failed run keeps its
//! history and cluster and prints the command that reruns the same schedule.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ringkv_tests::fault::{self, Fault, FaultRun, Workload};

#[derive(Parser, Debug)]
#[command(about = "Jepsen-style fault runs against a local ringkv cluster in a network namespace")]
struct Args {
    /// How long the workloads and faults run, e.g. `90s`, `10m`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    time: Duration,
    /// Seed of the fault schedule and the workloads' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to draw from (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Workloads to run together (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Nodes at the start (3 to 7; joins add more, up to 7).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(3..=7))]
    nodes: u64,
    #[arg(long, default_value_t = 8)]
    shards: u64,
    /// Register keys (each key's history is checked on its own, about 1,000 operations each;
    /// default: one per 10 s of run time, at least 4).
    #[arg(long)]
    keys: Option<u32>,
    /// Where to keep the history and cluster of a run (always kept when it fails).
    #[arg(long)]
    keep: Option<PathBuf>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(fault::seed_from_env);
    let faults = if a.faults.is_empty() { Fault::ALL.to_vec() } else { a.faults.clone() };
    let mut cfg = FaultRun::short(seed, a.time, &faults);
    cfg.nodes = a.nodes as usize;
    cfg.shards = a.shards;
    cfg.register.keys = a.keys.unwrap_or((a.time.as_secs() / 10).max(4) as u32);
    if !a.workloads.is_empty() {
        cfg.workloads = a.workloads.clone();
    }
    cfg.keep_dir = a.keep.clone();
    let names = |v: &[Fault]| {
        v.iter()
            .map(|f| clap::ValueEnum::to_possible_value(f).map(|p| p.get_name().to_string()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(",")
    };
    let workloads: Vec<String> = cfg.workloads.iter().map(|w| format!("{w:?}").to_lowercase()).collect();
    let rerun = format!(
        "jepsen --time {} --seed {seed} --faults {} --workloads {} --nodes {} --shards {} --keys {}",
        humantime::format_duration(a.time),
        names(&faults),
        workloads.join(","),
        a.nodes,
        a.shards,
        cfg.register.keys
    );
    eprintln!("seed {seed}; rerun with: {rerun}");
    let asked = cfg.faults.clone();
    match fault::run(cfg) {
        Ok(r) if r.anomalies.is_empty() && r.vacuous(&asked).is_empty() => {
            println!("{}", r.summary());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!("{}", r.summary());
            for why in r.vacuous(&asked) {
                eprintln!("vacuous run: {why}");
            }
            eprintln!("FAILED; rerun with: {rerun}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}\nrerun with: {rerun}");
            ExitCode::FAILURE
        }
    }
}
