//! Latency histograms (HDR, microseconds) and their portable form, so histograms recorded on
//! several hosts merge exactly as if one host had recorded every value.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks: one minute. Slower operations are clamped to it.
pub const HIGHEST_US: u64 = 60_000_000;

/// An empty latency histogram (1 µs .. 60 s, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds")
}

/// Records one latency in microseconds, clamped into the tracked range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, HIGHEST_US));
}

/// A histogram as (value, count) pairs of its recorded buckets: what travels in JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    pub fn of(h: &Histogram<u64>) -> HistData {
        HistData(h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_hist(&self) -> anyhow::Result<Histogram<u64>> {
        let mut h = new_hist();
        self.add_to(&mut h)?;
        Ok(h)
    }

    pub fn add_to(&self, h: &mut Histogram<u64>) -> anyhow::Result<()> {
        for (v, n) in &self.0 {
            h.record_n(*v, *n).map_err(|e| anyhow::anyhow!("histogram value {v}: {e}"))?;
        }
        Ok(())
    }
}

/// Latency figures of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn histograms_merged_from_parts_equal_one_that_saw_everything() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut all = new_hist();
        let mut parts = vec![new_hist(), new_hist(), new_hist()];
        for i in 0..50_000 {
            // A long-tailed mix: mostly ~1 ms, some ~100 ms, a few beyond the range.
            let us = match i % 100 {
                0 => rng.gen_range(50_000..200_000),
                1 => HIGHEST_US + 5,
                _ => rng.gen_range(200..3_000),
            };
            record(&mut all, us);
            record(&mut parts[i % 3], us);
        }
        // Merge through the JSON form, as the coordinator merges hosts' results.
        let mut merged = new_hist();
        for p in &parts {
            let text = serde_json::to_string(&HistData::of(p)).expect("json");
            let back: HistData = serde_json::from_str(&text).expect("parse");
            back.add_to(&mut merged).expect("merge");
        }
        assert_eq!(merged.len(), 50_000);
        assert_eq!(HistData::of(&merged), HistData::of(&all));
        assert_eq!(Summary::of(&merged), Summary::of(&all));
        let s = Summary::of(&merged);
        assert!(s.p50_us >= 200 && s.p50_us <= 3_000, "{s:?}");
        assert!(s.p99_us >= 3_000, "p99 should reach the slow tail: {s:?}");
        assert_eq!(s.max_us, merged.highest_equivalent(HIGHEST_US));
    }

    #[test]
    fn quantiles_are_accurate_to_three_digits() {
        let mut h = new_hist();
        for us in 1..=100_000u64 {
            record(&mut h, us);
        }
        let s = Summary::of(&h);
        for (got, want) in [(s.p50_us, 50_000u64), (s.p90_us, 90_000), (s.p99_us, 99_000), (s.p999_us, 99_900)] {
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err < 0.001, "quantile {got} vs {want}");
        }
        assert_eq!(Summary::of(&new_hist()).count, 0);
    }
}
