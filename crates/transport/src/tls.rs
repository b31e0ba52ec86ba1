//! rustls configurations for mutual TLS: both sides present a certificate signed by the cluster
//! CA, and a connection without one is refused during the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringkv_wire::{Role, ROLE_DEFAULT};
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

/// A TLS server configuration for TCP (the HTTP and Redis gateways): the node's certificate,
/// and a client certificate signed by the cluster CA is verified if one is offered, but not
/// required (such clients authenticate with a token instead).
pub fn tcp_server_config(paths: &CertPaths, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let l = load(paths)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(l.roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
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

/// Who is at the other end of a connection, as its certificate (already verified against the
/// cluster CA) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node certificate (DNS name `node-ID.ringkv`).
    Node(u64),
    /// A client certificate with its role (a certificate naming no role has [`ROLE_DEFAULT`]).
    Client(Role),
}

impl Caller {
    /// What this caller may do on the client port: nodes send joins and forwards, so they act
    /// as admin there.
    pub fn role(&self) -> Role {
        match self {
            Caller::Node(_) => Role::Admin,
            Caller::Client(r) => *r,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Caller::Node(id) => format!("node {id}"),
            Caller::Client(r) => format!("a {r} client"),
        }
    }
}

/// The identity a DER certificate carries: a node id from a DNS name `node-ID.ringkv`, else a
/// client role from a SAN URI `urn:ringkv:role:ROLE`. `None` if it cannot be parsed.
pub fn caller_of_cert(der: &[u8]) -> Option<Caller> {
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    if let Some(id) = cert.valid_dns_names().find_map(node_id_of_dns_name) {
        return Some(Caller::Node(id));
    }
    let role = cert.valid_uri_names().filter_map(Role::from_uri).max();
    Some(Caller::Client(role.unwrap_or(ROLE_DEFAULT)))
}

/// The node id a DNS name `node-ID.ringkv` names.
pub fn node_id_of_dns_name(name: &str) -> Option<u64> {
    name.strip_prefix("node-")?.strip_suffix(".ringkv")?.parse().ok()
}

/// Who the peer of `conn` is, from the certificate it presented.
pub fn caller(conn: &quinn::Connection) -> Option<Caller> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    caller_of_cert(certs.first()?)
}

/// The node id in the certificate the peer presented, if it is a node certificate.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<u64> {
    match caller(conn)? {
        Caller::Node(id) => Some(id),
        Caller::Client(_) => None,
    }
}

/// The identity of the first certificate in a PEM file (a node checks its own at start).
pub fn caller_of_pem_file(path: &Path) -> Result<Caller, TlsError> {
    let leaf = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem(path.to_path_buf(), e.to_string()))?
        .next()
        .ok_or_else(|| TlsError::Pem(path.to_path_buf(), "no certificate".into()))?
        .map_err(|e| TlsError::Pem(path.to_path_buf(), e.to_string()))?;
    caller_of_cert(&leaf).ok_or_else(|| TlsError::Pem(path.to_path_buf(), "not an X.509 certificate".into()))
}
