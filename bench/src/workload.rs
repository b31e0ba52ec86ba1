//! What a benchmark does: the operation mix, how keys are chosen, and the keys and values.

use rand::Rng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

/// The operation mixes: write-only, read-only and the YCSB core workloads A, B, C and F.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 100 % writes (puts) of keys chosen from the key space.
    Write,
    /// 100 % reads (linearizable gets).
    Read,
    /// YCSB A: 50 % reads, 50 % updates.
    A,
    /// YCSB B: 95 % reads, 5 % updates.
    B,
    /// YCSB C: 100 % reads.
    C,
    /// YCSB F: 50 % reads, 50 % read-modify-writes (a get, then a compare-and-swap on what it read).
    F,
}

/// One operation as the workload issues it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Update,
    Rmw,
}

impl OpKind {
    pub const ALL: [OpKind; 3] = [OpKind::Read, OpKind::Update, OpKind::Rmw];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Rmw => "rmw",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Workload {
    /// The share of each operation, summing to 1.
    pub fn mix(self) -> &'static [(OpKind, f64)] {
        match self {
            Workload::Write => &[(OpKind::Update, 1.0)],
            Workload::Read | Workload::C => &[(OpKind::Read, 1.0)],
            Workload::A => &[(OpKind::Read, 0.5), (OpKind::Update, 0.5)],
            Workload::B => &[(OpKind::Read, 0.95), (OpKind::Update, 0.05)],
            Workload::F => &[(OpKind::Read, 0.5), (OpKind::Rmw, 0.5)],
        }
    }

    /// Picks the next operation.
    pub fn pick(self, rng: &mut impl Rng) -> OpKind {
        let mix = self.mix();
        let mut r: f64 = rng.gen();
        for (op, share) in mix {
            if r < *share {
                return *op;
            }
            r -= share;
        }
        mix[mix.len() - 1].0
    }

    /// Whether the workload reads keys, so they must exist first.
    pub fn reads(self) -> bool {
        self.mix().iter().any(|(op, _)| *op != OpKind::Update)
    }
}

/// How keys are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyDist {
    Uniform,
    /// Zipfian over key ranks, with the ranks scattered over the key space by a hash (YCSB's
    /// "scrambled zipfian"), so the hot keys land on different shards.
    Zipfian,
}

/// Draws key indexes in `0..keys`.
#[derive(Clone, Debug)]
pub struct KeyChooser {
    keys: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
}

impl KeyChooser {
    pub fn new(dist: KeyDist, keys: u64, theta: f64) -> anyhow::Result<KeyChooser> {
        anyhow::ensure!(keys > 0, "the key space is empty (--keys 0)");
        let zipf = match dist {
            KeyDist::Uniform => None,
            KeyDist::Zipfian => {
                Some(rand_distr::Zipf::new(keys, theta).map_err(|e| anyhow::anyhow!("zipfian over {keys} keys with theta {theta}: {e}"))?)
            }
        };
        Ok(KeyChooser { keys, zipf })
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            None => rng.gen_range(0..self.keys),
            Some(z) => {
                // Ranks are 1..=keys; rank 1 is the hottest.
                let rank = (z.sample(rng) as u64).clamp(1, self.keys) - 1;
                Self::scatter(rank, self.keys)
            }
        }
    }

    /// Where rank `rank` lives in the key space.
    pub fn scatter(rank: u64, keys: u64) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&rank.to_le_bytes()) % keys
    }
}

/// The key with index `i`: its decimal digits left-padded with zeros to `size` bytes.
pub fn key(i: u64, size: usize) -> Vec<u8> {
    format!("{i:0size$}").into_bytes()
}

/// The smallest key size that holds every index below `keys`.
pub fn min_key_size(keys: u64) -> usize {
    keys.saturating_sub(1).max(1).to_string().len()
}

/// Values cut from one random buffer at random offsets, so they neither repeat nor compress.
pub struct Values {
    buf: Vec<u8>,
    size: usize,
}

impl Values {
    pub fn new(size: usize, rng: &mut impl Rng) -> Values {
        let mut buf = vec![0u8; size + 4096];
        rng.fill(&mut buf[..]);
        Values { buf, size }
    }

    pub fn next(&self, rng: &mut impl Rng) -> &[u8] {
        let off = rng.gen_range(0..=self.buf.len() - self.size);
        &self.buf[off..off + self.size]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn shares(w: Workload, n: usize) -> [f64; 3] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[w.pick(&mut rng).index()] += 1;
        }
        counts.map(|c| c as f64 / n as f64)
    }

    #[test]
    fn every_workload_issues_the_mix_it_claims() {
        let n = 200_000;
        for w in [Workload::Write, Workload::Read, Workload::A, Workload::B, Workload::C, Workload::F] {
            let got = shares(w, n);
            let mut want = [0.0; 3];
            for (op, s) in w.mix() {
                want[op.index()] = *s;
            }
            for op in OpKind::ALL {
                let (g, e) = (got[op.index()], want[op.index()]);
                assert!((g - e).abs() < 0.01, "{w:?} {op:?}: {g:.4} issued, {e} claimed");
            }
            let total: f64 = w.mix().iter().map(|(_, s)| s).sum();
            assert!((total - 1.0).abs() < 1e-9, "{w:?} shares sum to {total}");
        }
        assert!(!Workload::Write.reads());
        assert!(Workload::F.reads() && Workload::A.reads() && Workload::C.reads());
    }

    #[test]
    fn uniform_keys_cover_the_space_evenly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let c = KeyChooser::new(KeyDist::Uniform, 10, 0.99).expect("chooser");
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[c.next(&mut rng) as usize] += 1;
        }
        for n in counts {
            assert!((9_000..11_000).contains(&n), "uneven uniform counts {counts:?}");
        }
    }

    #[test]
    fn zipfian_keys_are_skewed_and_the_hot_ones_scattered() {
        let keys = 10_000u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let c = KeyChooser::new(KeyDist::Zipfian, keys, 0.99).expect("chooser");
        let mut counts = vec![0u64; keys as usize];
        let draws = 200_000u64;
        for _ in 0..draws {
            let k = c.next(&mut rng);
            assert!(k < keys);
            counts[k as usize] += 1;
        }
        // The hottest key is rank 0, scattered by the hash; with theta 0.99 over 10k keys it
        // draws about 1 / H(10k, 0.99) ~ 10 % of all draws.
        let hottest = KeyChooser::scatter(0, keys) as usize;
        let share = counts[hottest] as f64 / draws as f64;
        assert!((0.07..0.14).contains(&share), "hottest key share {share}");
        let mut sorted = counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top_1pc: u64 = sorted[..100].iter().sum();
        assert!(top_1pc as f64 / draws as f64 > 0.4, "top 1% of keys got only {top_1pc} of {draws}");
        // Scattered: the ten hottest ranks are not neighbours in the key space.
        let hot: Vec<u64> = (0..10).map(|r| KeyChooser::scatter(r, keys)).collect();
        let spread = hot.iter().max().copied().unwrap_or(0) - hot.iter().min().copied().unwrap_or(0);
        assert!(spread > keys / 4, "hot keys bunched together: {hot:?}");
    }

    #[test]
    fn keys_have_the_asked_size_and_are_distinct() {
        assert_eq!(key(42, 8), b"00000042".to_vec());
        assert_eq!(min_key_size(1_000_000), 6);
        assert_eq!(min_key_size(1), 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let v = Values::new(100, &mut rng);
        assert_eq!(v.next(&mut rng).len(), 100);
        assert!(KeyChooser::new(KeyDist::Uniform, 0, 0.99).is_err());
    }
}
