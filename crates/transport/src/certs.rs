//! Certificate authority and certificates for a cluster, made with rcgen.
//!
//! `ca.pem`/`ca.key` sign every node and client certificate; a peer without one is refused.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::TlsError;

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

/// Creates `dir/ca.pem` and `dir/ca.key`. Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io(dir.to_path_buf(), e))?;
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() {
        return Err(TlsError::Invalid(format!("{} already exists", cert_path.display())));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write(&dir.join("ca.key"), &key.serialize_pem())?;
    write(&cert_path, &cert.pem())
}

/// The CA's parameters. Signing needs only its name and key, so reloading the CA rebuilds these
/// rather than parsing `ca.pem`.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

const CA_NAME: &str = "ringkv cluster CA";

/// Issues `dir/NAME.pem` and `dir/NAME.key`, signed by the CA in `ca_dir`. The certificate is
/// good for both ends of a mutual TLS connection and names `dns_names` and `ips`.
pub fn issue(ca_dir: &Path, dir: &Path, name: &str, dns_names: &[&str], ips: &[std::net::IpAddr]) -> Result<CertPathsOut, TlsError> {
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    // Fail early with a clear message if the CA certificate is missing.
    read(&ca_dir.join("ca.pem"))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io(dir.to_path_buf(), e))?;
    let out = CertPathsOut { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
    write(&out.cert, &cert.pem())?;
    write(&out.key, &key.serialize_pem())?;
    Ok(out)
}

/// Where [`issue`] wrote a certificate and its key.
#[derive(Clone, Debug)]
pub struct CertPathsOut {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Issues a node certificate (server name [`crate::NODE_SERVER_NAME`], loopback names too).
pub fn issue_node(ca_dir: &Path, dir: &Path, node: u64) -> Result<CertPathsOut, TlsError> {
    issue(
        ca_dir,
        dir,
        &format!("node-{node}"),
        &[crate::NODE_SERVER_NAME, &format!("node-{node}.ringkv"), "localhost"],
        &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
    )
}

/// Issues a client certificate (for applications and `ringctl`).
pub fn issue_client(ca_dir: &Path, dir: &Path, name: &str) -> Result<CertPathsOut, TlsError> {
    issue(ca_dir, dir, name, &[crate::CLIENT_NAME], &[])
}
