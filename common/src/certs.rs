//! A small certificate authority for a Baton deployment (`baton certs`): a CA, and
//! certificates it signs for controllers (server), agents and clients (client).
//!
//! The role travels in the certificate as a URI subject alternative name,
//! `spiffe://baton/ROLE/NAME` (the SPIFFE ID format), which the controller reads from
//! a client certificate to know who calls: `agent`, `reader`, `submitter`, `operator`,
//! `admin`; `controller` certificates identify servers only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::auth::Role;

/// The URI SAN that names a role and a name.
pub fn identity_uri(role: &str, name: &str) -> String {
    format!("spiffe://baton/{role}/{name}")
}

/// The (role, name) a URI SAN names, when it is one of Baton's.
pub fn parse_identity_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("spiffe://baton/")?;
    let (role, name) = rest.split_once('/')?;
    (!role.is_empty() && !name.is_empty() && !name.contains('/')).then_some((role, name))
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A controller's server certificate.
    Controller,
    Agent,
    /// A user (the `baton` command, a script) with a role.
    Client(Role),
}

impl Kind {
    fn role(self) -> &'static str {
        match self {
            Kind::Controller => "controller",
            Kind::Agent => Role::Agent.as_str(),
            Kind::Client(r) => r.as_str(),
        }
    }
}

/// How long certificates are valid.
pub const CA_DAYS: i64 = 3650;
pub const CERT_DAYS: i64 = 825;

fn err(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Writes `contents` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, contents: &str, secret: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!("{} exists; remove it first to make a new one", path.display())
            } else {
                format!("cannot write {}: {e}", path.display())
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates `DIR/ca.pem` and `DIR/ca-key.pem` (0600); refuses to overwrite them.
pub fn create_ca(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(format!("{} exists; remove it first to make a new CA", p.display()));
        }
    }
    let key = KeyPair::generate().map_err(err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Baton CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key).map_err(err("signing the CA"))?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// Issues `DIR/NAME.pem` and `DIR/NAME-key.pem` (0600), signed by `DIR/ca.pem` and
/// `DIR/ca-key.pem`, for `hosts` (DNS names or IP addresses; default: the name).
pub fn issue(dir: &Path, kind: Kind, name: &str, hosts: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let ok_name = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if !ok_name {
        return Err(format!("name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or '@'"));
    }
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let ca_cert = read(dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(dir.join("ca-key.pem"))?).map_err(err("the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(err("the CA certificate"))?;
    let hosts: Vec<String> = if hosts.is_empty() { vec![name.to_string()] } else { hosts.to_vec() };
    let mut params = CertificateParams::new(hosts).map_err(err("host names"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    let uri = identity_uri(kind.role(), name);
    params.subject_alt_names.push(SanType::URI(uri.try_into().map_err(err("the identity URI"))?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = match kind {
        Kind::Controller => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, CERT_DAYS);
    let key = KeyPair::generate().map_err(err("generating the key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(err("signing the certificate"))?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    write(&key_path, &key.serialize_pem(), true)?;
    if let Err(e) = write(&cert_path, &cert.pem(), false) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip_and_odd_ones_are_not_identities() {
        assert_eq!(parse_identity_uri(&identity_uri("agent", "w1")), Some(("agent", "w1")));
        for bad in
            ["spiffe://other/agent/w1", "spiffe://baton/agent", "spiffe://baton//w1", "spiffe://baton/a/b/c"]
        {
            assert_eq!(parse_identity_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_ca_issues_certificates_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = create_ca(dir.path()).unwrap();
        assert!(std::fs::read_to_string(&ca).unwrap().contains("BEGIN CERTIFICATE"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(create_ca(dir.path()).unwrap_err().contains("exists"));
        let hosts = vec!["ctl.internal".to_string(), "10.0.0.5".to_string()];
        let (cert, key) = issue(dir.path(), Kind::Controller, "ctl-1", &hosts).unwrap();
        assert!(cert.ends_with("ctl-1.pem") && key.ends_with("ctl-1-key.pem"));
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(issue(dir.path(), Kind::Controller, "ctl-1", &hosts).unwrap_err().contains("exists"));
        issue(dir.path(), Kind::Client(Role::Operator), "alice", &[]).unwrap();
        assert!(issue(dir.path(), Kind::Agent, "bad name", &[]).unwrap_err().contains("name \"bad name\""));
        let empty = tempfile::tempdir().unwrap();
        assert!(issue(empty.path(), Kind::Agent, "w1", &[]).unwrap_err().contains("ca.pem"));
    }
}
