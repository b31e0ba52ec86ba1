//! QUIC transport shared by the node and the client: mutual TLS from a cluster CA, and a
//! multiplexed request/response layer of length-prefixed postcard frames on long-lived streams.

pub mod certs;
pub mod rpc;
pub mod tls;

pub use rpc::{serve_connection, RpcClient, RpcError, Service};
pub use tls::{CertPaths, TlsError};

/// The TLS server name every node certificate carries, so certificates do not depend on
/// addresses.
pub const NODE_SERVER_NAME: &str = "ringkv-node";
/// The name in every client certificate.
pub const CLIENT_NAME: &str = "ringkv-client";
