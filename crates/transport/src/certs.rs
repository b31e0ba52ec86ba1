//! Certificate authority and certificates for a cluster, made with rcgen.
//!
//! `ca.pem`/`ca.key` sign every node and client certificate; a peer without one is refused.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use ringkv_wire::Role;

use crate::TlsError;

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

/// Writes a private key readable by its owner only (mode 0600 from the start, not after).
fn write_key(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| TlsError::Io(path.to_path_buf(), e);
    // A key file left by an earlier issue may have a wider mode: replace it, do not reuse it.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Checks a client certificate's name: it becomes a file name next to the CA, so it may not
/// name the CA or a node certificate, nor leave the directory.
pub fn validate_client_name(name: &str) -> Result<(), TlsError> {
    let bad = |why: &str| Err(TlsError::Invalid(format!("client name `{name}` {why}")));
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') || name.starts_with('.') {
        return bad("may hold only letters, digits, `-`, `_` and `.` (no path separators, not starting with `.`)");
    }
    if name == "ca" {
        return bad("would overwrite the cluster CA");
    }
    if name.strip_prefix("node-").is_some_and(|rest| rest.parse::<u64>().is_ok()) {
        return bad("would overwrite a node certificate");
    }
    Ok(())
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
    write_key(&dir.join("ca.key"), &key.serialize_pem())?;
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
pub fn issue(
    ca_dir: &Path,
    dir: &Path,
    name: &str,
    dns_names: &[&str],
    ips: &[std::net::IpAddr],
    uris: &[String],
) -> Result<CertPathsOut, TlsError> {
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    // Fail early with a clear message if the CA certificate is missing.
    read(&ca_dir.join("ca.pem"))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    for uri in uris {
        params.subject_alt_names.push(SanType::URI(uri.as_str().try_into()?));
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
    write_key(&out.key, &key.serialize_pem())?;
    write(&out.cert, &cert.pem())?;
    Ok(out)
}

/// Where [`issue`] wrote a certificate and its key.
#[derive(Clone, Debug)]
pub struct CertPathsOut {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An extra name a node certificate may carry (`--san`): a DNS name or an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraName {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl std::str::FromStr for ExtraName {
    type Err = String;
    fn from_str(s: &str) -> Result<ExtraName, String> {
        if let Ok(ip) = s.parse() {
            return Ok(ExtraName::Ip(ip));
        }
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !ok {
            return Err(format!("`{s}` is neither an IP address nor a DNS name"));
        }
        // Names under `.ringkv` say who a certificate belongs to; only `issue_node` sets them.
        if s == "ringkv" || s.ends_with(".ringkv") || s == crate::NODE_SERVER_NAME || s == crate::CLIENT_NAME {
            return Err(format!("`{s}` is reserved for ringkv's own names"));
        }
        Ok(ExtraName::Dns(s.to_ascii_lowercase()))
    }
}

/// Issues a node certificate (server name [`crate::NODE_SERVER_NAME`], loopback names too, and
/// any `extra` DNS names and addresses the node is reached by).
pub fn issue_node(ca_dir: &Path, dir: &Path, node: u64, extra: &[ExtraName]) -> Result<CertPathsOut, TlsError> {
    let own = format!("node-{node}.ringkv");
    let mut dns: Vec<&str> = vec![crate::NODE_SERVER_NAME, &own, "localhost"];
    let mut ips = vec![std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];
    for e in extra {
        match e {
            ExtraName::Dns(d) => dns.push(d),
            ExtraName::Ip(ip) => ips.push(*ip),
        }
    }
    issue(ca_dir, dir, &format!("node-{node}"), &dns, &ips, &[])
}

/// Issues a client certificate (for applications and `ringctl`) with `role`.
pub fn issue_client(ca_dir: &Path, dir: &Path, name: &str, role: Role) -> Result<CertPathsOut, TlsError> {
    validate_client_name(name)?;
    issue(ca_dir, dir, name, &[crate::CLIENT_NAME], &[], &[role.uri()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{caller_of_pem_file, Caller};

    #[test]
    fn client_certificates_carry_their_role_and_node_certificates_their_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        for role in [Role::Read, Role::Write, Role::Admin] {
            let c = issue_client(dir.path(), dir.path(), &format!("app-{role}"), role).expect("issue");
            assert_eq!(caller_of_pem_file(&c.cert).expect("parse"), Caller::Client(role));
        }
        let n = issue_node(dir.path(), dir.path(), 7, &["db7.example.com".parse().expect("dns")]).expect("node");
        assert_eq!(caller_of_pem_file(&n.cert).expect("parse"), Caller::Node(7));
        // A certificate that names no role (issued before roles) gets the default.
        let old = issue(dir.path(), dir.path(), "old", &[crate::CLIENT_NAME], &[], &[]).expect("old");
        assert_eq!(caller_of_pem_file(&old.cert).expect("parse"), Caller::Client(ringkv_wire::ROLE_DEFAULT));
    }

    #[test]
    fn names_that_would_overwrite_or_escape_are_refused_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path()).expect("ca");
        let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
        for bad in ["ca", "node-3", "../x", "a/b", "", ".hidden"] {
            assert!(issue_client(dir.path(), dir.path(), bad, Role::Write).is_err(), "`{bad}` accepted");
        }
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca.pem"), ca_before, "CA changed");
        assert!(!dir.path().join("node-3.pem").exists() && !dir.path().parent().expect("parent").join("x.pem").exists());
        let c = issue_client(dir.path(), dir.path(), "node-x", Role::Read).expect("a name that is not a node id");
        for key in [dir.path().join("ca.key"), c.key] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
        }
        for bad in ["node-2.ringkv", "ringkv-node", "a b", "x/y"] {
            assert!(bad.parse::<ExtraName>().is_err(), "`{bad}` accepted as an extra name");
        }
    }
}
