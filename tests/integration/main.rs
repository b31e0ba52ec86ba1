//! The integration tests: one binary, real `ringkv node` processes, real QUIC on 127.0.0.1.
//! Each test prints where its cluster lives if it fails; rerun one with
//! `cargo test --release -p ringkv-tests --test integration NAME -- --nocapture`.

mod bad_input;
mod bench;
mod cli;
mod client;
mod crash_points;
mod data_path;
mod faults;
mod jepsen;
mod placement;
mod routing;
mod security;
