//! Jepsen-style fault runs in CI: all three workloads (register, set, bank) together against a
//! five-node cluster in a network namespace, under each family of faults for a short while.
//! The seed is printed; rerun one with
//! `RINGKV_FAULT_SEED=N cargo test --release --workspace -- --exact jepsen::NAME --nocapture`
//! (and `RINGKV_FAULT_TIME=SECS` for longer), or use the `jepsen` binary for soaks.

use std::time::Duration;

use ringkv_tests::fault::{self, Fault, FaultRun};

/// `faults` are injected; `required` must each take effect at least once, and `min_total`
/// faults in all (counted only when they took effect).
fn short_run(name: &str, faults: &[Fault], required: &[Fault], min_total: u64) {
    let seed = fault::seed_from_env();
    let secs = std::env::var("RINGKV_FAULT_TIME").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let rerun = format!("RINGKV_FAULT_SEED={seed} cargo test --release --workspace -- --exact jepsen::{name} --nocapture");
    eprintln!("{name}: seed {seed}; rerun with: {rerun}");
    let mut cfg = FaultRun::short(seed, Duration::from_secs(secs), faults);
    // The required faults come first, so a slow round early cannot leave one of them undrawn.
    cfg.first = required.to_vec();
    let report = fault::run(cfg).unwrap_or_else(|e| panic!("{name} (seed {seed}): {e:#}\nrerun with: {rerun}"));
    eprintln!("{name}: {}", report.summary());
    assert!(report.anomalies.is_empty(), "{name}: anomalies found: {}\nrerun with: {rerun}", report.summary());
    // The run did something worth checking: operations completed, and faults were injected.
    for w in ["register", "set", "bank"] {
        assert!(report.ops.contains_key(w), "{name}: the {w} workload did not report: {}", report.summary());
    }
    let vacuous = report.vacuous(faults);
    assert!(vacuous.is_empty(), "{name}: {vacuous:?}: {}", report.summary());
    for f in required {
        assert!(report.faults.get(f).copied().unwrap_or(0) >= 1, "{name}: no {f:?} took effect: {}", report.summary());
    }
    // Each pass draws every fault once, so the first rounds bring different kinds.
    let kinds = report.faults.values().filter(|c| **c > 0).count();
    assert!(kinds >= faults.len().min(3), "{name}: only {kinds} kinds of fault took effect: {}", report.summary());
    let total = report.faults.values().sum::<u64>();
    assert!(total >= min_total, "{name}: {total} faults took effect, fewer than {min_total}: {}", report.summary());
}

#[test]
fn partitions_delay_and_loss_keep_histories_linearizable() {
    // A 40 s run has 5 to 9 rounds, of a pass through the 9 network faults.
    short_run("partitions_delay_and_loss_keep_histories_linearizable", &Fault::network(), &[], 4);
}

#[test]
fn kills_and_pauses_keep_histories_linearizable() {
    short_run("kills_and_pauses_keep_histories_linearizable", &[Fault::Kill, Fault::Pause], &[Fault::Kill, Fault::Pause], 4);
}

#[test]
fn membership_changes_under_faults_keep_histories_linearizable() {
    short_run(
        "membership_changes_under_faults_keep_histories_linearizable",
        &[Fault::Join, Fault::TransferLeader, Fault::Kill, Fault::Pause, Fault::Isolate, Fault::Delay],
        &[Fault::Join, Fault::TransferLeader],
        4,
    );
}

/// The harness checks itself: every node skips its read barrier (a crash point), so a leader cut
/// off from the others keeps answering reads from its own, stale state to clients that still
/// believe it leads. The register check must reject such a history; if it passed, the fault
/// tests could not see stale reads.
#[test]
fn the_checker_rejects_stale_reads_from_a_deposed_leader() {
    let seed = fault::seed_from_env();
    let mut cfg = FaultRun::short(seed, Duration::from_secs(40), &[Fault::Isolate]);
    cfg.workloads = vec![fault::Workload::Register];
    // Keys on many shards, so most isolations cut off the leader of some of them.
    cfg.register.keys = 24;
    cfg.register.ops_per_key = 200;
    cfg.node_env = vec![("FAILPOINTS".into(), "read::skip_barrier=return".into())];
    let report = fault::run(cfg).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    eprintln!("{}", report.summary());
    assert!(
        report.anomalies.iter().any(|a| a.contains("not linearizable")),
        "reads that skip the leadership check went unnoticed: {}",
        report.summary()
    );
    // The run failed as it had to: its kept history is not needed.
    if let Some(dir) = report.history.as_ref().and_then(|h| h.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
