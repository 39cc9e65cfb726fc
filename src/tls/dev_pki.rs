//! The certificates of `custosd --dev`: a dev CA, a server certificate for
//! loopback, and one client certificate per dev identity (the backend, the
//! admin, the auditor, and each dev approver), all under `<data-dir>/tls/`.
//!
//! The CA's private key stays in the data directory so that tests can issue
//! further certificates (expired ones, say) with [`DevCa::issue_client`].
//! That is acceptable only because dev mode is for a laptop: a production
//! client CA lives with the exchange's PKI, never next to custosd.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde::Serialize;
use time::OffsetDateTime;

use crate::access::{ClientEntry, ClientIdentity, Role, Roles};

/// The URI prefix of dev client identities: `spiffe://custos.dev/<name>`.
pub const DEV_IDENTITY_PREFIX: &str = "spiffe://custos.dev/";

/// The dev clients: name, roles, and the approver id an approver signs as.
pub const DEV_CLIENTS: [(&str, Role, bool); 6] = [
    ("backend", Role::Backend, false),
    ("admin", Role::Admin, false),
    ("auditor", Role::Auditor, false),
    ("alice", Role::Approver, true),
    ("bob", Role::Approver, true),
    ("carol", Role::Approver, true),
];

/// How long dev certificates are valid.
const DEV_VALIDITY_DAYS: i64 = 365;

/// Why the dev PKI could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    /// Generating a key or certificate failed.
    #[error("generating dev certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// Where the dev TLS files are.
#[derive(Debug, Clone, Serialize)]
pub struct DevTlsPaths {
    /// The dev CA certificate: clients trust it for the server, and the
    /// server trusts it for clients.
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// Client certificate and key files, by dev client name.
    pub clients: std::collections::BTreeMap<String, DevClientFiles>,
}

/// One dev client's certificate and key.
#[derive(Debug, Clone, Serialize)]
pub struct DevClientFiles {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

impl DevTlsPaths {
    /// The paths under `tls_dir`.
    pub fn new(tls_dir: &Path) -> Self {
        Self {
            ca_cert: tls_dir.join("ca.pem"),
            server_cert: tls_dir.join("server.pem"),
            server_key: tls_dir.join("server.key"),
            clients: DEV_CLIENTS
                .iter()
                .map(|(name, _, _)| {
                    let files = DevClientFiles {
                        cert: tls_dir.join("clients").join(format!("{name}.pem")),
                        key: tls_dir.join("clients").join(format!("{name}.key")),
                    };
                    ((*name).to_owned(), files)
                })
                .collect(),
        }
    }
}

/// The dev client identity for `name`.
pub fn dev_identity(name: &str) -> ClientIdentity {
    ClientIdentity::Uri(format!("{DEV_IDENTITY_PREFIX}{name}"))
}

/// The client registry entries of the dev clients.
pub fn dev_client_entries() -> Vec<ClientEntry> {
    DEV_CLIENTS
        .iter()
        .map(|(name, role, approver)| ClientEntry {
            identity: dev_identity(name),
            roles: Roles::of(&[*role]),
            approver_id: approver.then(|| (*name).to_owned()),
        })
        .collect()
}

/// The dev CA: its parameters are fixed, so the stored key alone recreates
/// the issuer.
pub struct DevCa {
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa(<key redacted>)")
    }
}

impl DevCa {
    /// Loads the CA key from `tls_dir`.
    pub fn load(tls_dir: &Path) -> Result<Self, DevPkiError> {
        let path = tls_dir.join("ca.key");
        let pem = std::fs::read_to_string(&path).map_err(|source| DevPkiError::Io { path, source })?;
        Ok(Self {
            key: KeyPair::from_pem(&pem)?,
        })
    }

    fn params() -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "custos dev CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// Issues a client certificate with the URI SAN `identity`, valid from
    /// `not_before` to `not_after`; returns the certificate and key as PEM.
    pub fn issue_client(
        &self,
        identity: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, zeroize::Zeroizing<String>), DevPkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity);
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let issuer = Issuer::new(Self::params(), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), zeroize::Zeroizing::new(key.serialize_pem())))
    }
}

/// Creates the dev CA, server and client certificates under `tls_dir` if
/// they are missing, and returns their paths. Existing files are reused.
pub fn ensure(tls_dir: &Path) -> Result<DevTlsPaths, DevPkiError> {
    let paths = DevTlsPaths::new(tls_dir);
    if paths.ca_cert.exists() {
        return Ok(paths);
    }
    create_dir(&tls_dir.join("clients"))?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(DEV_VALIDITY_DAYS);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = DevCa::params();
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&tls_dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), 0o600)?;
    let ca = DevCa { key: ca_key };

    let mut server = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "custosd dev");
    server.distinguished_name = name;
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.not_before = not_before;
    server.not_after = not_after;
    server.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &Issuer::new(DevCa::params(), &ca.key))?;
    write(&paths.server_key, server_key.serialize_pem().as_bytes(), 0o600)?;
    write(&paths.server_cert, server_cert.pem().as_bytes(), 0o644)?;

    for (name, _, _) in DEV_CLIENTS {
        let (cert, key) = ca.issue_client(&format!("{DEV_IDENTITY_PREFIX}{name}"), not_before, not_after)?;
        let files = &paths.clients[name];
        write(&files.key, key.as_bytes(), 0o600)?;
        write(&files.cert, cert.as_bytes(), 0o644)?;
    }
    // Last: its presence marks the set complete.
    write(&paths.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    Ok(paths)
}

fn create_dir(path: &Path) -> Result<(), DevPkiError> {
    std::fs::create_dir_all(path).map_err(|source| DevPkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), DevPkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevPkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)
}
