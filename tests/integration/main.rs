//! The integration tests: one binary, real `ringkv node` processes, real QUIC on 127.0.0.1.
//! A failing test keeps its cluster's directory (data and node logs) and prints where it is;
//! rerun one with `cargo build --release --workspace --bins && cargo test --release -p
//! ringkv-tests --test integration NAME -- --nocapture` (a test refuses to run a `ringkv`
//! binary older than the sources).

mod bad_input;
mod bench;
mod cli;
mod client;
mod crash_points;
mod data_path;
mod faults;
mod gateway;
mod jepsen;
mod lifecycle;
mod placement;
mod power_loss;
mod quiesce;
mod routing;
mod security;
