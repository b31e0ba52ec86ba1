//! The workloads of a fault run:
//! - `register`: reads, writes and compare-and-swaps of small numbers on a few keys from many
//!   clients, checked for linearizability per key afterwards;
//! - `set`: unique adds over many keys (so every shard); at the end every acknowledged add is
//!   present, nothing that failed or was never added is, and values are never mixed up;
//! - `bank`: accounts in one value per bank, moved between by compare-and-swap; every read
//!   must show the bank's total, and at the end each bank has applied every acknowledged
//!   transfer, and no more than those plus the ones of unknown outcome.
//!
//! A write that times out or loses its connection is recorded as unknown, never as failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv_client::{CallOptions, Client, Error};

use super::history::{Outcome, Recorder, RegisterOp};

/// What every workload task shares.
pub struct Ctx {
    pub client: Arc<Client>,
    pub rec: Arc<Recorder>,
    /// No operation starts after this.
    pub until: Instant,
    /// Deadline of one operation, retries included.
    pub op_timeout: Duration,
    pub seed: u64,
    /// Each client process gets a fresh id after an operation with an unknown outcome, as the
    /// checker requires (a process has one operation at a time).
    next_process: AtomicUsize,
    pub anomalies: Mutex<Vec<String>>,
}

impl Ctx {
    pub fn new(client: Arc<Client>, rec: Arc<Recorder>, until: Instant, op_timeout: Duration, seed: u64) -> Ctx {
        Ctx { client, rec, until, op_timeout, seed, next_process: AtomicUsize::new(1), anomalies: Mutex::new(Vec::new()) }
    }

    fn process(&self) -> usize {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn opts(&self) -> CallOptions {
        CallOptions::timeout(self.op_timeout)
    }

    pub fn anomaly(&self, what: String) {
        eprintln!("ANOMALY: {what}");
        self.anomalies.lock().unwrap_or_else(|p| p.into_inner()).push(what);
    }

    /// Waits for workload tasks; one that panicked fails the run (it stopped checking).
    async fn join(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        for t in tasks {
            if let Err(e) = t.await {
                self.anomaly(format!("a workload task failed: {e}"));
            }
        }
    }

    fn rng(&self, stream: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// A write's outcome from the client's error: unknown, whatever the error. A refusal may follow
/// an earlier attempt of the same call that timed out after it was applied, and a refused
/// compare-and-swap must mean "the expected value did not match" to the checker, not "some
/// error". Only a compare-and-swap answered with `swapped: false` is a failure.
fn write_outcome(_e: &Error) -> Outcome {
    Outcome::Unknown
}

fn parse_u32(v: &[u8]) -> Option<u32> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[derive(Clone, Copy, Debug)]
pub struct RegisterConfig {
    pub keys: u32,
    pub workers: usize,
    /// Operations per key at most (keeps each key's history checkable).
    pub ops_per_key: usize,
}

pub fn register_key(k: u32) -> Vec<u8> {
    format!("register-{k}").into_bytes()
}

/// Worker `w` uses `clients[w]` (or the shared client if there are fewer).
pub async fn register(ctx: Arc<Ctx>, cfg: RegisterConfig, clients: Vec<Arc<Client>>) {
    let issued: Arc<Vec<AtomicUsize>> = Arc::new((0..cfg.keys).map(|_| AtomicUsize::new(0)).collect());
    // Spread each key's operations over the whole run, so they meet every fault.
    let per_worker = (cfg.keys as usize * cfg.ops_per_key).div_ceil(cfg.workers.max(1)).max(1) as u32;
    let pace = ctx.until.saturating_duration_since(Instant::now()) / per_worker;
    let mut tasks = Vec::new();
    for w in 0..cfg.workers {
        let (ctx, issued) = (ctx.clone(), issued.clone());
        let client = clients.get(w).cloned().unwrap_or_else(|| ctx.client.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = ctx.rng(1000 + w as u64);
            let mut process = ctx.process();
            let started = Instant::now();
            for i in 0u32.. {
                tokio::time::sleep_until((started + pace * i).into()).await;
                if Instant::now() >= ctx.until {
                    break;
                }
                let open: Vec<u32> = (0..cfg.keys).filter(|k| issued[*k as usize].load(Ordering::Relaxed) < cfg.ops_per_key).collect();
                let Some(&k) = open.get(rng.gen_range(0..open.len().max(1))) else { break };
                // Claim one of the key's operations; another worker may have taken the last.
                let claim = |n: usize| (n < cfg.ops_per_key).then_some(n + 1);
                if issued[k as usize].fetch_update(Ordering::Relaxed, Ordering::Relaxed, claim).is_err() {
                    continue;
                }
                let key = register_key(k);
                let op = match rng.gen_range(0..10) {
                    0..=4 => RegisterOp::Read(None),
                    5..=7 => RegisterOp::Write(rng.gen_range(0..5)),
                    _ => RegisterOp::Cas(rng.gen_range(0..5), rng.gen_range(0..5)),
                };
                let p = ctx.rec.register_invoke(process, k, op);
                let (outcome, read) = match op {
                    RegisterOp::Read(_) => match client.get_with(&key, ctx.opts()).await {
                        // A value that is not a number makes the check fail, as it should.
                        Ok(v) => (Outcome::Ok, v.map(|v| parse_u32(&v).unwrap_or(u32::MAX))),
                        Err(_) => (Outcome::Fail, None),
                    },
                    RegisterOp::Write(v) => match client.put_with(&key, v.to_string().as_bytes(), ctx.opts()).await {
                        Ok(()) => (Outcome::Ok, None),
                        Err(e) => (write_outcome(&e), None),
                    },
                    RegisterOp::Cas(c, s) => {
                        let expect = c.to_string();
                        match client.compare_and_swap_with(&key, Some(expect.as_bytes()), s.to_string().as_bytes(), ctx.opts()).await {
                            Ok(o) if o.swapped => (Outcome::Ok, None),
                            Ok(_) => (Outcome::Fail, None),
                            Err(e) => (write_outcome(&e), None),
                        }
                    }
                };
                ctx.rec.register_done(p, outcome, read);
                if outcome == Outcome::Unknown {
                    process = ctx.process();
                }
            }
        }));
    }
    ctx.join(tasks).await;
}

/// What the set workload attempted, by element.
#[derive(Default)]
pub struct SetState {
    pub outcomes: Mutex<BTreeMap<u64, Outcome>>,
    next: AtomicU64,
}

pub fn set_key(n: u64) -> Vec<u8> {
    format!("set-{n}").into_bytes()
}

pub async fn set(ctx: Arc<Ctx>, workers: usize) -> Arc<SetState> {
    let state = Arc::new(SetState::default());
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (ctx, state) = (ctx.clone(), state.clone());
        tasks.push(tokio::spawn(async move {
            let process = ctx.process();
            while Instant::now() < ctx.until {
                let n = state.next.fetch_add(1, Ordering::Relaxed);
                ctx.rec.note("set", process, "invoke", "add", None, n.to_string());
                let outcome = match ctx.client.put_with(&set_key(n), n.to_string().as_bytes(), ctx.opts()).await {
                    Ok(()) => Outcome::Ok,
                    Err(e) => write_outcome(&e),
                };
                ctx.rec.note("set", process, &format!("{outcome:?}").to_lowercase(), "add", None, n.to_string());
                if let Ok(mut o) = state.outcomes.lock() {
                    o.insert(n, outcome);
                }
            }
        }));
    }
    ctx.join(tasks).await;
    state
}

/// Reads `keys` linearizably, retrying each until it answers or `timeout` passes.
async fn read_all(client: &Client, keys: &[Vec<u8>], timeout: Duration) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    let started = Instant::now();
    let mut out = vec![None; keys.len()];
    let mut todo: Vec<usize> = (0..keys.len()).collect();
    while !todo.is_empty() {
        anyhow::ensure!(started.elapsed() < timeout, "{} final reads did not answer within {timeout:?}", todo.len());
        let mut failed = Vec::new();
        for chunk in todo.chunks(256) {
            let ks: Vec<&[u8]> = chunk.iter().map(|i| keys[*i].as_slice()).collect();
            for (i, r) in chunk.iter().zip(client.batch_get(&ks, CallOptions::timeout(Duration::from_secs(10))).await) {
                match r {
                    Ok(v) => out[*i] = v,
                    Err(_) => failed.push(*i),
                }
            }
        }
        if !failed.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        todo = failed;
    }
    Ok(out)
}

/// Extra elements past the last one attempted that are read too: none may exist.
const NEVER_ADDED: u64 = 100;

/// What the set's final reads show.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetVerdict {
    /// Acknowledged adds, all present.
    pub acked: usize,
    /// Adds of unknown outcome seen present and absent.
    pub present: usize,
    pub absent: usize,
    pub anomalies: Vec<String>,
}

/// Judges the set from the outcome of every add and the final read of elements `0..values.len()`
/// (which reaches past the last add): every acknowledged add is present, nothing failed or never
/// added is, and each element holds its own number.
pub fn judge_set(outcomes: &BTreeMap<u64, Outcome>, values: &[Option<Vec<u8>>]) -> SetVerdict {
    let mut v = SetVerdict::default();
    for (n, read) in values.iter().enumerate() {
        let n = n as u64;
        if let Some(r) = read {
            if *r != n.to_string().into_bytes() {
                v.anomalies.push(format!("set: element {n} reads {:?}", String::from_utf8_lossy(r)));
                continue;
            }
        }
        match (outcomes.get(&n), read.is_some()) {
            (Some(Outcome::Ok), true) => v.acked += 1,
            (Some(Outcome::Ok), false) => v.anomalies.push(format!("set: acknowledged add of {n} is lost")),
            (Some(Outcome::Unknown), true) => v.present += 1,
            (Some(Outcome::Unknown), false) => v.absent += 1,
            (Some(Outcome::Fail), true) => v.anomalies.push(format!("set: add of {n} failed, yet it is present")),
            (None, true) => v.anomalies.push(format!("set: element {n} was never added, yet it is present")),
            (Some(Outcome::Fail) | None, false) => {}
        }
    }
    if v.acked == 0 {
        v.anomalies.push("set: no add was acknowledged, nothing was checked".into());
    }
    v
}

/// The set's final check: reads every element attempted and [`NEVER_ADDED`] more.
pub async fn check_set(ctx: &Ctx, state: &SetState) -> anyhow::Result<SetVerdict> {
    let outcomes = state.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    let end = outcomes.keys().next_back().map(|n| n + 1).unwrap_or(0) + NEVER_ADDED;
    let keys: Vec<Vec<u8>> = (0..end).map(set_key).collect();
    let values = read_all(&ctx.client, &keys, Duration::from_secs(120)).await?;
    let verdict = judge_set(&outcomes, &values);
    for a in &verdict.anomalies {
        ctx.anomaly(a.clone());
    }
    Ok(verdict)
}

#[derive(Clone, Copy, Debug)]
pub struct BankConfig {
    pub banks: u32,
    pub accounts: usize,
    pub balance: i64,
    pub workers: usize,
}

pub fn bank_key(b: u32) -> Vec<u8> {
    format!("bank-{b}").into_bytes()
}

/// A bank's value: how many transfers it has applied, and the balances.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bank {
    transfers: u64,
    accounts: Vec<i64>,
}

impl Bank {
    fn encode(&self) -> Vec<u8> {
        let a: Vec<String> = self.accounts.iter().map(|a| a.to_string()).collect();
        format!("{};{}", self.transfers, a.join(",")).into_bytes()
    }

    fn decode(v: &[u8]) -> Option<Bank> {
        let (n, a) = std::str::from_utf8(v).ok()?.split_once(';')?;
        Some(Bank { transfers: n.parse().ok()?, accounts: a.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()? })
    }
}

/// Per bank: transfers acknowledged, refused, and of unknown outcome; and reads.
#[derive(Default)]
pub struct BankCounts {
    pub ok: Vec<AtomicU64>,
    pub refused: Vec<AtomicU64>,
    pub unknown: Vec<AtomicU64>,
    pub reads: AtomicU64,
}

impl BankCounts {
    fn sum(v: &[AtomicU64]) -> u64 {
        v.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// (acknowledged, refused, unknown, reads) over all banks.
    pub fn totals(&self) -> [u64; 4] {
        [Self::sum(&self.ok), Self::sum(&self.refused), Self::sum(&self.unknown), self.reads.load(Ordering::Relaxed)]
    }
}

/// Opens every bank (before any fault).
pub async fn bank_setup(ctx: &Ctx, cfg: BankConfig) -> anyhow::Result<()> {
    for b in 0..cfg.banks {
        let v = Bank { transfers: 0, accounts: vec![cfg.balance; cfg.accounts] };
        ctx.client.put_with(&bank_key(b), &v.encode(), CallOptions::timeout(Duration::from_secs(30))).await?;
    }
    Ok(())
}

/// Checks one read of bank `b`: the total is conserved and no account is negative (a read that
/// sees half a transfer breaks the total).
fn judge_bank_read(cfg: BankConfig, b: u32, v: Option<&[u8]>, when: &str) -> Result<Bank, String> {
    let total = cfg.balance * cfg.accounts as i64;
    match v.and_then(Bank::decode) {
        Some(bank)
            if bank.accounts.len() == cfg.accounts
                && bank.accounts.iter().sum::<i64>() == total
                && bank.accounts.iter().all(|x| *x >= 0) =>
        {
            Ok(bank)
        }
        other => Err(format!("bank {b} ({when}): read {other:?}, total must be {total}")),
    }
}

fn check_bank(ctx: &Ctx, cfg: BankConfig, b: u32, v: Option<&[u8]>, when: &str) -> Option<Bank> {
    judge_bank_read(cfg, b, v, when).map_err(|a| ctx.anomaly(a)).ok()
}

/// Moves money between accounts with compare-and-swap, each transfer counted in the value.
pub async fn bank(ctx: Arc<Ctx>, cfg: BankConfig) -> Arc<BankCounts> {
    let per_bank = || (0..cfg.banks).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let counts = Arc::new(BankCounts { ok: per_bank(), refused: per_bank(), unknown: per_bank(), reads: AtomicU64::new(0) });
    let mut tasks = Vec::new();
    for w in 0..cfg.workers {
        let (ctx, counts) = (ctx.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = ctx.rng(2000 + w as u64);
            let process = ctx.process();
            while Instant::now() < ctx.until {
                let b = rng.gen_range(0..cfg.banks);
                let key = bank_key(b);
                let Ok(v) = ctx.client.get_with(&key, ctx.opts()).await else { continue };
                counts.reads.fetch_add(1, Ordering::Relaxed);
                let Some(old) = check_bank(&ctx, cfg, b, v.as_deref(), "read") else { continue };
                let (from, to) = (rng.gen_range(0..cfg.accounts), rng.gen_range(0..cfg.accounts));
                if !rng.gen_bool(0.7) || from == to || old.accounts[from] == 0 {
                    continue;
                }
                let amount = rng.gen_range(1..=old.accounts[from].min(5));
                let mut new = old.clone();
                new.transfers += 1;
                new.accounts[from] -= amount;
                new.accounts[to] += amount;
                let detail = format!("bank {b}: transfer {}: {amount} from {from} to {to}", new.transfers);
                ctx.rec.note("bank", process, "invoke", "transfer", Some(b), detail.clone());
                let outcome = match ctx.client.compare_and_swap_with(&key, v.as_deref(), &new.encode(), ctx.opts()).await {
                    Ok(o) if o.swapped => Outcome::Ok,
                    Ok(_) => Outcome::Fail,
                    Err(e) => write_outcome(&e),
                };
                let c = match outcome {
                    Outcome::Ok => &counts.ok,
                    Outcome::Fail => &counts.refused,
                    Outcome::Unknown => &counts.unknown,
                };
                c[b as usize].fetch_add(1, Ordering::Relaxed);
                ctx.rec.note("bank", process, &format!("{outcome:?}").to_lowercase(), "transfer", Some(b), detail);
            }
        }));
    }
    ctx.join(tasks).await;
    counts
}

/// Judges the banks' final reads (`finals[b]`) against the transfers acknowledged (`ok[b]`) and
/// of unknown outcome (`unknown[b]`): totals kept, and each bank applied every acknowledged
/// transfer and at most those plus the unknown ones (a lost or doubled transfer, or a swap that
/// ignored its expected value, breaks this). A run in which no transfer was acknowledged checked
/// nothing and fails too.
pub fn judge_banks(cfg: BankConfig, finals: &[Option<Vec<u8>>], ok: &[u64], unknown: &[u64]) -> Vec<String> {
    let mut anomalies = Vec::new();
    for (b, v) in finals.iter().enumerate() {
        let bank = match judge_bank_read(cfg, b as u32, v.as_deref(), "final read") {
            Ok(bank) => bank,
            Err(a) => {
                anomalies.push(a);
                continue;
            }
        };
        let (ok, unknown) = (ok.get(b).copied().unwrap_or(0), unknown.get(b).copied().unwrap_or(0));
        if bank.transfers < ok || bank.transfers > ok + unknown {
            anomalies.push(format!("bank {b}: {} transfers applied, but {ok} were acknowledged and {unknown} unknown", bank.transfers));
        }
    }
    if ok.iter().sum::<u64>() == 0 {
        anomalies.push("bank: no transfer was acknowledged, nothing was checked".into());
    }
    anomalies
}

/// The banks' final check (see [`judge_banks`]).
pub async fn check_banks(ctx: &Ctx, cfg: BankConfig, counts: &BankCounts) -> anyhow::Result<()> {
    let keys: Vec<Vec<u8>> = (0..cfg.banks).map(bank_key).collect();
    let finals = read_all(&ctx.client, &keys, Duration::from_secs(60)).await?;
    let load = |v: &[AtomicU64]| v.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>();
    for a in judge_banks(cfg, &finals, &load(&counts.ok), &load(&counts.unknown)) {
        ctx.anomaly(a);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(outcomes: &[(u64, Outcome)]) -> BTreeMap<u64, Outcome> {
        outcomes.iter().copied().collect()
    }

    fn present(n: u64) -> Option<Vec<u8>> {
        Some(n.to_string().into_bytes())
    }

    #[test]
    fn the_set_check_passes_a_good_history_and_rejects_each_bad_one() {
        let outcomes = set_of(&[(0, Outcome::Ok), (1, Outcome::Unknown), (2, Outcome::Fail), (3, Outcome::Unknown)]);
        let good = vec![present(0), present(1), None, None, None];
        assert_eq!(judge_set(&outcomes, &good), SetVerdict { acked: 1, present: 1, absent: 1, anomalies: vec![] });

        let bad = |values: Vec<Option<Vec<u8>>>, what: &str| {
            let v = judge_set(&outcomes, &values);
            assert!(v.anomalies.iter().any(|a| a.contains(what)), "{what}: {:?}", v.anomalies);
        };
        bad(vec![None, present(1), None, None, None], "acknowledged add of 0 is lost");
        bad(vec![present(0), None, present(2), None, None], "add of 2 failed, yet it is present");
        bad(vec![present(0), None, None, None, present(4)], "element 4 was never added");
        bad(vec![present(0), Some(b"3".to_vec()), None, None, None], "element 1 reads");
        // Nothing acknowledged: the run checked nothing.
        let v = judge_set(&set_of(&[(0, Outcome::Unknown)]), &[present(0), None]);
        assert!(v.anomalies.iter().any(|a| a.contains("no add was acknowledged")), "{:?}", v.anomalies);
    }

    const CFG: BankConfig = BankConfig { banks: 2, accounts: 3, balance: 10, workers: 1 };

    fn bank(transfers: u64, accounts: [i64; 3]) -> Option<Vec<u8>> {
        Some(Bank { transfers, accounts: accounts.to_vec() }.encode())
    }

    #[test]
    fn the_bank_check_passes_a_good_history_and_rejects_each_bad_one() {
        // Bank 0: 2 acknowledged and 1 unknown transfer, 3 applied; bank 1: 1 acknowledged.
        let good = vec![bank(3, [5, 12, 13]), bank(1, [10, 9, 11])];
        assert_eq!(judge_banks(CFG, &good, &[2, 1], &[1, 0]), Vec::<String>::new());

        let bad = |finals: Vec<Option<Vec<u8>>>, ok: [u64; 2], unknown: [u64; 2], what: &str| {
            let a = judge_banks(CFG, &finals, &ok, &unknown);
            assert!(a.iter().any(|a| a.contains(what)), "{what}: {a:?}");
        };
        // A lost acknowledged transfer: fewer applied than acknowledged.
        bad(vec![bank(1, [5, 12, 13]), bank(1, [10, 9, 11])], [2, 1], [1, 0], "1 transfers applied, but 2 were acknowledged");
        // A doubled transfer: more applied than acknowledged plus unknown.
        bad(vec![bank(4, [5, 12, 13]), bank(1, [10, 9, 11])], [2, 1], [1, 0], "4 transfers applied");
        // Half a transfer: debited but not credited, the total is broken.
        bad(vec![bank(3, [5, 12, 13]), bank(1, [10, 9, 10])], [2, 1], [1, 0], "total must be 30");
        // A negative account, a bank missing, an undecodable value.
        bad(vec![bank(3, [-1, 16, 15]), bank(1, [10, 9, 11])], [2, 1], [1, 0], "bank 0 (final read)");
        bad(vec![bank(3, [5, 12, 13]), None], [2, 1], [1, 0], "bank 1 (final read): read None");
        bad(vec![Some(b"garbage".to_vec()), bank(1, [10, 9, 11])], [2, 1], [1, 0], "bank 0 (final read)");
        // No transfer succeeded: nothing was checked, and that fails too.
        bad(vec![bank(0, [10, 10, 10]), bank(0, [10, 10, 10])], [0, 0], [0, 0], "no transfer was acknowledged");
        // Reads of a bank in flight are judged the same way.
        assert!(judge_bank_read(CFG, 0, bank(1, [10, 10, 11]).as_deref(), "read").is_err());
        assert!(judge_bank_read(CFG, 0, bank(1, [9, 10, 11]).as_deref(), "read").is_ok());
    }
}
