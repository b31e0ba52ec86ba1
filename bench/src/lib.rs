//! The benchmark harness (`ringkv-bench`): YCSB-style workloads over the client crate, HDR
//! latency histograms, sweeps and plots, against a local cluster it starts itself, a running
//! cluster, or from several load hosts at once.
//!
//! Speed figures come from here, never from timed tests; `bench/RESULTS.md` has today's.

pub mod agent;
pub mod hist;
pub mod placement_sim;
pub mod plot;
pub mod run;
pub mod sweep;
pub mod target;
pub mod workload;

pub use run::{RunResult, RunSpec};
pub use sweep::Target;
