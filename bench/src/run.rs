//! One benchmark run against a cluster: preload, warm-up, then the measured phase, in a closed
//! loop (each worker issues its next operation when the last one returns) or an open loop (each
//! worker issues operations on a fixed schedule, and latency counts from the scheduled time, so a
//! stalled server shows up as latency instead of hiding in fewer requests: coordinated omission
//! corrected).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use ringkv_client::{CallOptions, Client, ClientConfig};
use serde::{Deserialize, Serialize};

use crate::hist::{new_hist, record, HistData, Summary};
use crate::workload::{key, min_key_size, KeyChooser, KeyDist, OpKind, Values, Workload};

/// Everything that decides what a run does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub workload: Workload,
    pub distribution: KeyDist,
    pub zipf_theta: f64,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    /// Client instances (each with its own connections)...
    pub clients: usize,
    /// ... times requests in flight per client: the concurrency.
    pub inflight: usize,
    pub warmup_ms: u64,
    pub duration_ms: u64,
    /// Open loop at this many operations per second in all; `None`: closed loop.
    pub rate: Option<f64>,
    /// Write every key before the run.
    pub preload: bool,
    /// Deadline of one operation, retries included.
    pub timeout_ms: u64,
    pub seed: u64,
}

impl RunSpec {
    pub fn concurrency(&self) -> usize {
        self.clients * self.inflight
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.keys > 0, "--keys must be at least 1");
        anyhow::ensure!(self.clients > 0 && self.inflight > 0, "--clients and --inflight must be at least 1");
        anyhow::ensure!(self.duration_ms > 0, "--duration must be positive");
        anyhow::ensure!(self.value_size > 0, "--value-size must be at least 1 byte");
        let need = min_key_size(self.keys);
        anyhow::ensure!(self.key_size >= need, "--key-size {} cannot hold {} distinct keys (needs {need} bytes)", self.key_size, self.keys);
        if let Some(r) = self.rate {
            anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be a positive number of operations per second");
        }
        if self.distribution == KeyDist::Zipfian {
            anyhow::ensure!(self.zipf_theta > 0.0, "--zipf-theta must be positive");
        }
        Ok(())
    }
}

/// One second of the measured phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the measured phase began (the second that ended at `t`).
    pub t: u64,
    pub ops: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// The second's histogram, kept while results still have to be merged across hosts.
    #[serde(default, skip_serializing_if = "HistData::is_empty")]
    pub hist: HistData,
}

/// What a run measured. The first five fields are the contract scripts rely on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Operations that failed (deadline passed, unavailable, ...), not counted in `ops`.
    pub errors: u64,
    pub ops: u64,
    pub p90_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Length of the measured phase.
    pub elapsed_s: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Read-modify-writes whose compare-and-swap lost to a concurrent write (they still count
    /// as completed operations, as in YCSB).
    pub cas_conflicts: u64,
    /// Reads that found no value.
    pub read_misses: u64,
    /// Open loop: operations the schedule called for in the measured phase that were never
    /// sent, because the workers were still behind when it ended.
    #[serde(default)]
    pub not_issued: u64,
    pub per_op: BTreeMap<String, Summary>,
    pub series: Vec<Second>,
    /// Load generators whose results were merged into this one.
    pub hosts: usize,
    pub spec: RunSpec,
    /// Every operation's latency, for merging and re-plotting (empty in sweep results).
    #[serde(default, skip_serializing_if = "HistData::is_empty")]
    pub histogram: HistData,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_op_hist: BTreeMap<String, HistData>,
    /// CPU time (user + system) of the node processes over the measured phase, per completed
    /// operation; absent when the nodes are not processes of this host.
    #[serde(default)]
    pub cpu_us_per_op_nodes: Option<f64>,
    /// CPU time of the load generator over the measured phase, per completed operation.
    #[serde(default)]
    pub cpu_us_per_op_bench: Option<f64>,
}

/// Latencies and errors of the workers sharing one client.
struct Stats {
    per_op: [Histogram<u64>; 3],
    interval: Histogram<u64>,
    interval_errors: u64,
    errors: BTreeMap<String, u64>,
    cas_conflicts: u64,
    read_misses: u64,
    not_issued: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            per_op: [new_hist(), new_hist(), new_hist()],
            interval: new_hist(),
            interval_errors: 0,
            errors: BTreeMap::new(),
            cas_conflicts: 0,
            read_misses: 0,
            not_issued: 0,
        }
    }
}

fn lock(s: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A short, stable name for an error, for `errors_by_kind`.
pub fn error_kind(e: &ringkv_client::Error) -> String {
    use ringkv_client::Error;
    match e {
        Error::Request(r) => {
            let dbg = format!("{r:?}");
            let name: String = dbg.chars().take_while(|c| c.is_alphanumeric()).collect();
            format!("request:{name}")
        }
        Error::Deadline { .. } => "deadline".into(),
        Error::Tls(_) => "tls".into(),
        Error::Transport(_) => "transport".into(),
        Error::Config(_) => "config".into(),
    }
}

/// Connects `n` independent clients.
pub async fn connect_clients(config: &ClientConfig, spec: &RunSpec) -> anyhow::Result<Vec<Arc<Client>>> {
    let mut config = config.clone();
    config.timeout = Duration::from_millis(spec.timeout_ms.max(1));
    let mut out = Vec::with_capacity(spec.clients);
    for _ in 0..spec.clients {
        out.push(Arc::new(Client::connect(config.clone()).await.map_err(|e| anyhow::anyhow!("cannot reach the cluster: {e}"))?));
    }
    Ok(out)
}

/// How a run reports progress on the terminal (hidden when stderr is not one).
pub fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Writes every key once, in batches, so reads find values.
pub async fn preload(clients: &[Arc<Client>], spec: &RunSpec) -> anyhow::Result<()> {
    let per_batch = ((4usize << 20) / (spec.value_size + spec.key_size)).clamp(1, 512) as u64;
    let batches = spec.keys.div_ceil(per_batch);
    let pb = bar(spec.keys, "preload  [{bar:40}] {pos}/{len} keys  {per_sec}  eta {eta}");
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks = spec.concurrency().clamp(1, 32);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let client = clients[t % clients.len()].clone();
        let next = next.clone();
        let spec = spec.clone();
        let pb = pb.clone();
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5eed ^ t as u64);
            let values = Values::new(spec.value_size, &mut rng);
            let opts = CallOptions::timeout(Duration::from_millis(spec.timeout_ms.max(1)));
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return Ok::<(), anyhow::Error>(());
                }
                let range = b * per_batch..((b + 1) * per_batch).min(spec.keys);
                let keys: Vec<Vec<u8>> = range.map(|i| key(i, spec.key_size)).collect();
                let vals: Vec<&[u8]> = keys.iter().map(|_| values.next(&mut rng)).collect();
                let mut attempt = 0;
                loop {
                    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| k.as_slice()).zip(vals.iter().copied()).collect();
                    let results = client.batch_put(&pairs, opts).await;
                    match results.into_iter().find_map(|r| r.err()) {
                        None => break,
                        Some(e) if attempt < 5 && e.retryable() => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        }
                        Some(e) => anyhow::bail!("preload failed: {e}"),
                    }
                }
                pb.inc(keys.len() as u64);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    pb.finish_and_clear();
    Ok(())
}

struct Plan {
    spec: RunSpec,
    chooser: KeyChooser,
    measure_start: Instant,
    end: Instant,
    workers: usize,
}

enum Outcome {
    Done,
    Miss,
    Conflict,
}

async fn one_op(
    client: &Client,
    op: OpKind,
    k: &[u8],
    values: &Values,
    rng: &mut StdRng,
    o: CallOptions,
) -> Result<Outcome, ringkv_client::Error> {
    match op {
        OpKind::Read => Ok(match client.get_with(k, o).await? {
            Some(_) => Outcome::Done,
            None => Outcome::Miss,
        }),
        OpKind::Update => client.put_with(k, values.next(rng), o).await.map(|_| Outcome::Done),
        OpKind::Rmw => {
            let old = client.get_with(k, o).await?;
            let cas = client.compare_and_swap_with(k, old.as_deref(), values.next(rng), o).await?;
            Ok(if cas.swapped { Outcome::Done } else { Outcome::Conflict })
        }
    }
}

async fn worker(plan: Arc<Plan>, client: Arc<Client>, stats: Arc<Mutex<Stats>>, idx: usize, start: Instant) {
    let spec = &plan.spec;
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_add((idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let values = Values::new(spec.value_size, &mut rng);
    let opts = CallOptions::timeout(Duration::from_millis(spec.timeout_ms.max(1)));
    // Open loop: this worker's share of the rate, its schedule staggered against the others'.
    let interval = spec.rate.map(|r| Duration::from_secs_f64(plan.workers as f64 / r));
    let mut next = match interval {
        Some(iv) => start + iv.mul_f64(idx as f64 / plan.workers as f64),
        None => start,
    };
    loop {
        let intended = match interval {
            Some(iv) => {
                let t = next;
                next += iv;
                let now = Instant::now();
                if t >= plan.end || now >= plan.end {
                    // Behind schedule at the end: the operations still due were never sent.
                    if t < plan.end {
                        let from = t.max(plan.measure_start);
                        let due = (plan.end - from).as_secs_f64() / iv.as_secs_f64();
                        lock(&stats).not_issued += due.ceil() as u64;
                    }
                    break;
                }
                tokio::time::sleep_until(t.into()).await;
                t
            }
            None => {
                let t = Instant::now();
                if t >= plan.end {
                    break;
                }
                t
            }
        };
        let op = spec.workload.pick(&mut rng);
        let k = key(plan.chooser.next(&mut rng), spec.key_size);
        let outcome = one_op(&client, op, &k, &values, &mut rng, opts).await;
        if intended < plan.measure_start {
            continue;
        }
        let us = intended.elapsed().as_micros() as u64;
        let mut s = lock(&stats);
        match outcome {
            Ok(o) => {
                record(&mut s.per_op[op.index()], us);
                record(&mut s.interval, us);
                match o {
                    Outcome::Done => {}
                    Outcome::Miss => s.read_misses += 1,
                    Outcome::Conflict => s.cas_conflicts += 1,
                }
            }
            Err(e) => {
                *s.errors.entry(error_kind(&e)).or_default() += 1;
                s.interval_errors += 1;
            }
        }
    }
}

fn take_second(stats: &[Arc<Mutex<Stats>>], t: u64) -> Second {
    let mut h = new_hist();
    let mut errors = 0;
    for s in stats {
        let mut s = lock(s);
        let _ = h.add(&s.interval);
        s.interval.reset();
        errors += std::mem::take(&mut s.interval_errors);
    }
    Second::of(t, &h, errors)
}

impl Second {
    /// The second `t` from its histogram and error count.
    pub fn of(t: u64, h: &Histogram<u64>, errors: u64) -> Second {
        Second { t, ops: h.len(), errors, p50_us: h.value_at_quantile(0.5), p99_us: h.value_at_quantile(0.99), hist: HistData::of(h) }
    }
}

/// Runs the warm-up and measured phases with `clients` (preloading first if the spec asks).
/// `node_pids` are the cluster's node processes on this host, whose CPU time the result
/// reports per operation (empty: not reported).
pub async fn execute(clients: &[Arc<Client>], spec: &RunSpec, node_pids: &[u32]) -> anyhow::Result<RunResult> {
    spec.validate()?;
    anyhow::ensure!(!clients.is_empty(), "no clients");
    if spec.preload {
        preload(clients, spec).await?;
    }
    let start = Instant::now();
    let measure_start = start + Duration::from_millis(spec.warmup_ms);
    let end = measure_start + Duration::from_millis(spec.duration_ms);
    let plan = Arc::new(Plan {
        spec: spec.clone(),
        chooser: KeyChooser::new(spec.distribution, spec.keys, spec.zipf_theta)?,
        measure_start,
        end,
        workers: spec.concurrency(),
    });
    let stats: Vec<Arc<Mutex<Stats>>> = clients.iter().map(|_| Arc::new(Mutex::new(Stats::new()))).collect();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..plan.workers {
        let c = w % clients.len();
        set.spawn(worker(plan.clone(), clients[c].clone(), stats[c].clone(), w, start));
    }
    let total_s = (spec.warmup_ms + spec.duration_ms).div_ceil(1000);
    let pb = bar(total_s, "{prefix:8} [{bar:40}] {pos}/{len}s  {msg}");
    pb.set_prefix("warm-up");
    let mut series = Vec::new();
    let mut tick = tokio::time::interval_at(measure_start.into(), Duration::from_secs(1));
    tick.tick().await;
    let cpu_start = CpuSample::take(node_pids);
    pb.set_position(spec.warmup_ms / 1000);
    pb.set_prefix("measure");
    loop {
        tick.tick().await;
        let s = take_second(&stats, series.len() as u64 + 1);
        pb.set_message(format!("{} ops/s  p50 {}  p99 {}  errors {}", s.ops, fmt_us(s.p50_us), fmt_us(s.p99_us), s.errors));
        pb.inc(1);
        series.push(s);
        if Instant::now() >= end {
            break;
        }
    }
    let cpu_end = CpuSample::take(node_pids);
    while let Some(r) = set.join_next().await {
        r?;
    }
    // Operations that finished after the last tick.
    let tail = take_second(&stats, series.len() as u64 + 1);
    if tail.ops + tail.errors > 0 {
        match series.last_mut() {
            Some(last) => {
                let mut h = last.hist.to_hist()?;
                tail.hist.add_to(&mut h)?;
                *last = Second::of(last.t, &h, last.errors + tail.errors);
            }
            None => series.push(tail),
        }
    }
    pb.finish_and_clear();
    let mut per_op = [new_hist(), new_hist(), new_hist()];
    let mut errors_by_kind = BTreeMap::new();
    let (mut cas_conflicts, mut read_misses, mut not_issued) = (0, 0, 0);
    for s in &stats {
        let s = lock(s);
        for (i, h) in s.per_op.iter().enumerate() {
            let _ = per_op[i].add(h);
        }
        for (k, n) in &s.errors {
            *errors_by_kind.entry(k.clone()).or_default() += n;
        }
        cas_conflicts += s.cas_conflicts;
        read_misses += s.read_misses;
        not_issued += s.not_issued;
    }
    let per_op_hist: BTreeMap<String, HistData> = OpKind::ALL
        .iter()
        .filter(|op| !per_op[op.index()].is_empty())
        .map(|op| (op.name().to_string(), HistData::of(&per_op[op.index()])))
        .collect();
    let mut r =
        assemble(spec.clone(), 1, spec.duration_ms as f64 / 1000.0, None, per_op_hist, errors_by_kind, cas_conflicts, read_misses, series)?;
    r.not_issued = not_issued;
    if r.ops > 0 {
        let per_op = |us: Option<f64>| us.map(|us| us / r.ops as f64);
        r.cpu_us_per_op_nodes = per_op(cpu_end.nodes_us.zip(cpu_start.nodes_us).map(|(e, s)| e - s));
        r.cpu_us_per_op_bench = per_op(cpu_end.bench_us.zip(cpu_start.bench_us).map(|(e, s)| e - s));
    }
    Ok(r)
}

/// CPU time used so far by the node processes (summed) and by this process, in µs; `None`
/// where /proc cannot tell (no pids, a node gone, not Linux).
struct CpuSample {
    nodes_us: Option<f64>,
    bench_us: Option<f64>,
}

impl CpuSample {
    fn take(node_pids: &[u32]) -> CpuSample {
        let us = |pid: u32| crate::sweep::cpu_us(pid).ok();
        let nodes_us = if node_pids.is_empty() { None } else { node_pids.iter().map(|p| us(*p)).sum::<Option<f64>>() };
        CpuSample { nodes_us, bench_us: us(std::process::id()) }
    }
}

/// Builds a result from its histograms and counters; `rate` overrides ops/elapsed (merging).
#[allow(clippy::too_many_arguments)]
fn assemble(
    spec: RunSpec,
    hosts: usize,
    elapsed_s: f64,
    rate: Option<f64>,
    per_op_hist: BTreeMap<String, HistData>,
    errors_by_kind: BTreeMap<String, u64>,
    cas_conflicts: u64,
    read_misses: u64,
    series: Vec<Second>,
) -> anyhow::Result<RunResult> {
    let mut all = new_hist();
    let mut per_op = BTreeMap::new();
    for (name, d) in &per_op_hist {
        let h = d.to_hist()?;
        let _ = all.add(&h);
        per_op.insert(name.clone(), Summary::of(&h));
    }
    let s = Summary::of(&all);
    Ok(RunResult {
        ops_per_sec: rate.unwrap_or(if elapsed_s > 0.0 { s.count as f64 / elapsed_s } else { 0.0 }),
        p50_us: s.p50_us,
        p99_us: s.p99_us,
        p999_us: s.p999_us,
        errors: errors_by_kind.values().sum(),
        ops: s.count,
        p90_us: s.p90_us,
        max_us: s.max_us,
        mean_us: s.mean_us,
        elapsed_s,
        errors_by_kind,
        cas_conflicts,
        read_misses,
        not_issued: 0,
        per_op,
        series,
        hosts,
        spec,
        histogram: HistData::of(&all),
        per_op_hist,
        cpu_us_per_op_nodes: None,
        cpu_us_per_op_bench: None,
    })
}

impl RunResult {
    /// Merges results of load generators that ran the same spec at the same time: histograms
    /// add up exactly, throughputs add up, the series add second by second.
    pub fn merge(parts: Vec<RunResult>) -> anyhow::Result<RunResult> {
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("no results to merge"))?;
        let spec = first.spec.clone();
        let mut per_op: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
        let mut errors_by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut seconds: BTreeMap<u64, (Histogram<u64>, u64)> = BTreeMap::new();
        let (mut cas, mut misses, mut rate, mut elapsed, mut hosts, mut not_issued) = (0, 0, 0.0, 0.0f64, 0, 0);
        for p in &parts {
            for (name, d) in &p.per_op_hist {
                d.add_to(per_op.entry(name.clone()).or_insert_with(new_hist))?;
            }
            for (k, n) in &p.errors_by_kind {
                *errors_by_kind.entry(k.clone()).or_default() += n;
            }
            for s in &p.series {
                let e = seconds.entry(s.t).or_insert_with(|| (new_hist(), 0));
                s.hist.add_to(&mut e.0)?;
                e.1 += s.errors;
            }
            cas += p.cas_conflicts;
            misses += p.read_misses;
            not_issued += p.not_issued;
            rate += p.ops_per_sec;
            elapsed = elapsed.max(p.elapsed_s);
            hosts += p.hosts;
        }
        let series = seconds.into_iter().map(|(t, (h, errors))| Second::of(t, &h, errors)).collect();
        let per_op_hist = per_op.iter().map(|(k, h)| (k.clone(), HistData::of(h))).collect();
        let mut merged = assemble(spec, hosts, elapsed, Some(rate), per_op_hist, errors_by_kind, cas, misses, series)?;
        merged.not_issued = not_issued;
        Ok(merged)
    }

    /// Drops the per-second histograms (kept only for merging) before the result is written.
    pub fn compact(mut self) -> RunResult {
        for s in &mut self.series {
            s.hist = HistData::default();
        }
        self
    }

    /// Keeps the figures and drops the histograms, for results stored many to a file (sweeps).
    pub fn summary_only(mut self) -> RunResult {
        self.histogram = HistData::default();
        self.per_op_hist.clear();
        self.compact()
    }

    /// The result as a table for the terminal.
    pub fn table(&self) -> String {
        let s = &self.spec;
        let mut out = format!(
            "workload {:?}  {:?} keys {}  key {} B  value {} B  concurrency {}x{}  {}  {}s measured  {} host(s)\n",
            s.workload,
            s.distribution,
            s.keys,
            s.key_size,
            s.value_size,
            s.clients,
            s.inflight,
            match s.rate {
                Some(r) => format!("open loop at {r:.0} ops/s"),
                None => "closed loop".into(),
            },
            self.elapsed_s,
            self.hosts,
        );
        out.push_str(&format!(
            "{:<8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "op", "count", "ops/s", "p50", "p90", "p99", "p99.9", "max"
        ));
        let row = |name: &str, m: &Summary, rate: f64| {
            format!(
                "{:<8} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                name,
                m.count,
                rate,
                fmt_us(m.p50_us),
                fmt_us(m.p90_us),
                fmt_us(m.p99_us),
                fmt_us(m.p999_us),
                fmt_us(m.max_us)
            )
        };
        for (name, m) in &self.per_op {
            let share = if self.ops > 0 { m.count as f64 / self.ops as f64 } else { 0.0 };
            out.push_str(&row(name, m, self.ops_per_sec * share));
        }
        let total = Summary {
            count: self.ops,
            mean_us: self.mean_us,
            p50_us: self.p50_us,
            p90_us: self.p90_us,
            p99_us: self.p99_us,
            p999_us: self.p999_us,
            max_us: self.max_us,
        };
        out.push_str(&row("total", &total, self.ops_per_sec));
        if self.errors_by_kind.is_empty() {
            out.push_str("errors: none");
        } else {
            let kinds: Vec<String> = self.errors_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!("errors: {} ({})", self.errors, kinds.join(", ")));
        }
        if self.cas_conflicts > 0 {
            out.push_str(&format!("; cas conflicts {}", self.cas_conflicts));
        }
        if self.read_misses > 0 {
            out.push_str(&format!("; reads of missing keys {}", self.read_misses));
        }
        out.push('\n');
        if let Some(nodes) = self.cpu_us_per_op_nodes {
            let bench = self.cpu_us_per_op_bench.map(|b| format!(", load generator {b:.0} µs")).unwrap_or_default();
            out.push_str(&format!("cpu per op: nodes {nodes:.0} µs{bench}\n"));
        }
        if let Some(rate) = s.rate {
            let done = self.ops_per_sec + self.errors as f64 / self.elapsed_s.max(1e-9);
            if done < rate * 0.95 || self.not_issued > 0 {
                out.push_str(&format!(
                    "warning: {done:.0} of the {rate:.0} ops/s asked for completed ({} never sent); the latencies include the \
                     backlog (the cluster is saturated, or more --clients/--inflight are needed)\n",
                    self.not_issued
                ));
            }
        }
        out
    }
}

/// Latency for people: µs below a millisecond, ms with two decimals above.
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 10_000_000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            workload: Workload::A,
            distribution: KeyDist::Uniform,
            zipf_theta: 0.99,
            keys: 1000,
            key_size: 16,
            value_size: 100,
            clients: 2,
            inflight: 2,
            warmup_ms: 0,
            duration_ms: 2000,
            rate: None,
            preload: false,
            timeout_ms: 1000,
            seed: 1,
        }
    }

    fn part(values: &[u64], errors: u64, secs: u64) -> RunResult {
        let mut h = new_hist();
        for v in values {
            record(&mut h, *v);
        }
        let series = (1..=secs)
            .map(|t| {
                let mut sh = new_hist();
                for v in values.iter().skip((t - 1) as usize).step_by(secs as usize) {
                    record(&mut sh, *v);
                }
                Second { t, ops: sh.len(), errors: 0, p50_us: 0, p99_us: 0, hist: HistData::of(&sh) }
            })
            .collect();
        let errs = if errors > 0 { BTreeMap::from([("deadline".to_string(), errors)]) } else { BTreeMap::new() };
        let per_op = BTreeMap::from([("read".to_string(), HistData::of(&h))]);
        assemble(spec(), 1, secs as f64, None, per_op, errs, 0, 0, series).expect("assemble")
    }

    #[test]
    fn merged_results_add_up_as_one_load_generator_would() {
        let a: Vec<u64> = (1..=3000).map(|i| 100 + i % 900).collect();
        let b: Vec<u64> = (1..=1000).map(|i| 5_000 + i * 10).collect();
        let m = RunResult::merge(vec![part(&a, 2, 2), part(&b, 3, 2)]).expect("merge");
        let both: Vec<u64> = a.iter().chain(b.iter()).copied().collect();
        let one = part(&both, 5, 2);
        assert_eq!(m.ops, 4000);
        assert_eq!(m.hosts, 2);
        assert_eq!(m.errors, 5);
        assert_eq!((m.p50_us, m.p99_us, m.p999_us, m.max_us), (one.p50_us, one.p99_us, one.p999_us, one.max_us));
        assert_eq!(m.histogram, one.histogram);
        // Throughputs add: 1500 + 500 ops/s.
        assert!((m.ops_per_sec - 2000.0).abs() < 1e-6, "{}", m.ops_per_sec);
        assert_eq!(m.series.len(), 2);
        assert_eq!(m.series.iter().map(|s| s.ops).sum::<u64>(), 4000);
        let text = serde_json::to_string(&m.clone().compact()).expect("json");
        for field in ["\"ops_per_sec\"", "\"p50_us\"", "\"p99_us\"", "\"p999_us\"", "\"errors\""] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert!(m.table().contains("total"));
        // Sweep results keep only the figures, and read back.
        let slim = m.clone().summary_only();
        let text = serde_json::to_string(&slim).expect("json");
        assert!(!text.contains("\"histogram\""));
        let back: RunResult = serde_json::from_str(&text).expect("slim result reads back");
        assert_eq!((back.ops, back.p99_us), (m.ops, m.p99_us));
    }

    #[test]
    fn an_open_loop_that_fell_behind_says_so() {
        let values: Vec<u64> = (1..=2000).collect();
        let mut r = part(&values, 0, 2);
        assert!(!r.table().contains("warning"), "closed loop: nothing to warn about");
        r.spec.rate = Some(1000.0);
        assert!(!r.table().contains("warning"), "1000 ops/s asked, 1000 done");
        r.spec.rate = Some(5000.0);
        assert!(r.table().contains("warning: 1000 of the 5000 ops/s asked for completed"), "{}", r.table());
    }

    #[test]
    fn bad_specs_are_refused_with_the_flag_to_fix() {
        let mut s = spec();
        s.keys = 1_000_000;
        s.key_size = 4;
        assert!(s.validate().expect_err("key size").to_string().contains("--key-size"));
        let mut s = spec();
        s.rate = Some(0.0);
        assert!(s.validate().expect_err("rate").to_string().contains("--rate"));
        let mut s = spec();
        s.clients = 0;
        assert!(s.validate().is_err());
        assert!(spec().validate().is_ok());
    }

    #[test]
    fn latencies_read_well() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(1250), "1.25ms");
        assert_eq!(fmt_us(12_000_000), "12.0s");
    }
}
