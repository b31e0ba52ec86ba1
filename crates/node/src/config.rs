//! The node's configuration lives in `ringkv-config` (parsing and validation, fuzzed on its
//! own); this adds what needs the transport crate.

pub use ringkv_config::*;

/// The TLS files of a node's configuration, as the transport takes them.
pub trait CertPathsOf {
    fn cert_paths(&self) -> ringkv_transport::CertPaths;
}

impl CertPathsOf for NodeConfig {
    fn cert_paths(&self) -> ringkv_transport::CertPaths {
        ringkv_transport::CertPaths { ca: self.tls.ca.clone(), cert: self.tls.cert.clone(), key: self.tls.key.clone() }
    }
}
