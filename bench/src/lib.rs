//! The benchmark harness (`ringkv-bench`): YCSB-style workloads over the client crate.
//!
//! Not written yet: the benchmark issue fills this crate. Until then there are no published
//! numbers, and the README's status section says so.
