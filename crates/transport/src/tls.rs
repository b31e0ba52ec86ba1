//! rustls configurations for mutual TLS: both sides present a certificate signed by the cluster
//! CA, and a connection without one is refused during the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: not a PEM file with a certificate or key: {1}")]
    Pem(PathBuf, String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The three files a node or client needs: the cluster CA, its own certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct Loaded {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(paths: &CertPaths) -> Result<Loaded, TlsError> {
    let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let v = CertificateDer::pem_file_iter(p)
            .map_err(|e| TlsError::Pem(p.to_path_buf(), e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(p.to_path_buf(), e.to_string()))?;
        if v.is_empty() {
            return Err(TlsError::Pem(p.to_path_buf(), "no certificate".into()));
        }
        Ok(v)
    };
    let mut roots = RootCertStore::empty();
    for c in certs(&paths.ca)? {
        roots.add(c)?;
    }
    let chain = certs(&paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| TlsError::Pem(paths.key.clone(), e.to_string()))?;
    Ok(Loaded { roots: Arc::new(roots), chain, key })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by both ends: long-lived connections, quick detection of a
/// dead peer, enough concurrent streams for the multiplexed lanes plus snapshots.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(256u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.keep_alive_interval(Some(Duration::from_millis(1000)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(5)) {
        t.max_idle_timeout(Some(idle));
    }
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t
}

/// A QUIC server configuration that demands a client certificate signed by the cluster CA.
pub fn server_config(paths: &CertPaths, alpn: &[u8]) -> Result<quinn::ServerConfig, TlsError> {
    let l = load(paths)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(l.roots.clone(), provider()).build().map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config()));
    Ok(server)
}

/// A QUIC client configuration that trusts only the cluster CA and presents our certificate.
pub fn client_config(paths: &CertPaths, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let l = load(paths)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport_config()));
    Ok(client)
}

/// The node id in the certificate the peer presented (DNS name `node-ID.ringkv`), if it is a
/// node certificate. The certificate was already verified against the cluster CA.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<u64> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let id = cert.valid_dns_names().find_map(|n| n.strip_prefix("node-")?.strip_suffix(".ringkv")?.parse().ok());
    id
}
