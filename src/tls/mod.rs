//! The transport: TLS 1.3 with client certificates (rustls), the identity of
//! each connection's peer, and the plaintext escape hatch for loopback.
//!
//! custos accepts connections itself rather than through tonic's TLS
//! support, for one reason: a client whose certificate is expired or from
//! an unknown CA must receive a gRPC `UNAUTHENTICATED` that names the
//! problem, not a TLS alert that surfaces as an opaque transport error. So
//! the handshake proves only that the peer holds the key of the certificate
//! it presents (`DeferredClientVerifier`); the chain is then verified
//! against the client CA, once per connection, and the outcome is recorded
//! as the connection's [`Peer`]. The guard (`guard.rs`, which depends on this module) refuses
//! every request from a peer that is not a configured client, except health
//! checks.
//!
//! [`dev_pki`] creates the CA and certificates of `custosd --dev`.

pub mod dev_pki;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::access::{ClientEntry, ClientIdentity, ClientRegistry};

/// mTLS material, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert_file: PathBuf,
    /// The server's private key (PKCS#8 PEM).
    pub key_file: PathBuf,
    /// The CA (or CAs) client certificates must chain to.
    pub client_ca_file: PathBuf,
}

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait to be accepted.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Why the TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("tls.{field} {path}: {reason}")]
    Pem {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(String),
}

/// Who is at the other end of a connection, decided once after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A plaintext connection (`--insecure-plaintext`).
    Plaintext,
    /// TLS without a client certificate.
    Anonymous,
    /// A certificate that does not chain to the client CA, is expired or not
    /// yet valid, or is not for client authentication. The reason is logged,
    /// not sent.
    Untrusted,
    /// A trusted certificate whose SANs name no configured client.
    Unregistered {
        /// The certificate's URI and DNS SANs.
        sans: Vec<ClientIdentity>,
    },
    /// A configured client.
    Client {
        /// Its configuration entry.
        entry: ClientEntry,
        /// The certificate's notAfter: requests on a connection that outlives
        /// its certificate are refused.
        not_after: SystemTime,
    },
}

/// Per-connection information tonic places in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Who the peer is.
    pub peer: Arc<Peer>,
}

/// An accepted connection: plaintext, or TLS with its peer identified.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>, Arc<Peer>),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(tcp) => ConnInfo {
                remote: tcp.peer_addr().ok(),
                peer: Arc::new(Peer::Plaintext),
            },
            Conn::Tls(tls, peer) => ConnInfo {
                remote: tls.get_ref().0.peer_addr().ok(),
                peer: Arc::clone(peer),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The server side of mTLS: the rustls configuration, the client CA
/// verifier, and the registry that maps certificates to clients.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    chain_verifier: Arc<dyn ClientCertVerifier>,
    clients: ClientRegistry,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the server certificate, key and client CA named in `config`.
    pub fn load(config: &TlsConfig, clients: ClientRegistry) -> Result<Self, TlsError> {
        let certs = read_certs("cert_file", &config.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsError::Pem {
            field: "key_file",
            path: config.key_file.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs("client_ca_file", &config.client_ca_file)? {
            roots.add(ca).map_err(|e| TlsError::Pem {
                field: "client_ca_file",
                path: config.client_ca_file.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        Self::new(certs, key, roots, clients)
    }

    /// Builds the configuration from parsed material.
    pub fn new(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_roots: rustls::RootCertStore,
        clients: ClientRegistry,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let deferred = Arc::new(DeferredClientVerifier {
            inner: Arc::clone(&chain_verifier),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(deferred)
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            chain_verifier,
            clients,
        })
    }

    /// Decides who presented `chain` (leaf first) at time `now`.
    pub fn identify(&self, chain: Option<&[CertificateDer<'_>]>, now: SystemTime) -> Peer {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Peer::Anonymous;
        };
        let unix_now =
            UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        if let Err(e) = self
            .chain_verifier
            .verify_client_cert(leaf, intermediates, unix_now)
        {
            tracing::info!(reason = %e, "client certificate refused");
            return Peer::Untrusted;
        }
        let Some((sans, not_after)) = certificate_identities(leaf) else {
            tracing::info!("client certificate refused: its SAN extension does not parse");
            return Peer::Untrusted;
        };
        match self.clients.lookup(&sans) {
            Some(entry) => Peer::Client {
                entry: entry.clone(),
                not_after,
            },
            None => Peer::Unregistered { sans },
        }
    }

    async fn handshake(&self, tcp: TcpStream) -> io::Result<Conn> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = self.identify(tls.get_ref().1.peer_certificates(), SystemTime::now());
        Ok(Conn::Tls(Box::new(tls), Arc::new(peer)))
    }
}

/// Accepts connections on `listener`: TLS handshakes run concurrently (a
/// slow client cannot hold up others), plaintext only when `tls` is `None`.
/// Nagle's algorithm is off on every connection: a small reply must not wait
/// for the client's delayed ACK (40 ms on Linux), which would dwarf the HSM's
/// own signing time. Failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let tcp = match accepted.and_then(|(tcp, _)| tcp.set_nodelay(true).map(|()| tcp)) {
                Ok(tcp) => tcp,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(tls) = tls.clone() else {
                if sender.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let remote = tcp.peer_addr().ok();
                match tls.handshake(tcp).await {
                    Ok(conn) => {
                        let _ = sender.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::info!(?remote, error = %e, "TLS handshake failed"),
                }
                drop(permit);
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// A client certificate verifier that requires proof of possession of the
/// certificate's key during the handshake but defers the chain check to
/// [`ServerTls::identify`], so that an untrusted certificate gets a gRPC
/// status rather than a TLS alert. Accepting the handshake grants nothing:
/// such a peer is [`Peer::Untrusted`] and only health checks answer it.
#[derive(Debug)]
struct DeferredClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The URI and DNS SANs of a certificate and its notAfter; `None` if the
/// certificate or its SAN extension does not parse.
pub fn certificate_identities(der: &[u8]) -> Option<(Vec<ClientIdentity>, SystemTime)> {
    use x509_cert::der::Decode as _;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;

    let certificate = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = certificate.tbs_certificate();
    let not_after = tbs.validity().not_after.to_system_time();
    let mut sans = Vec::new();
    if let Some((_, SubjectAltName(names))) = tbs.get_extension::<SubjectAltName>().ok()? {
        for name in names {
            let identity = match name {
                GeneralName::UniformResourceIdentifier(uri) => {
                    ClientIdentity::parse(&format!("uri:{}", uri.as_str()))
                }
                GeneralName::DnsName(dns) => ClientIdentity::parse(&format!("dns:{}", dns.as_str())),
                _ => None,
            };
            sans.extend(identity);
        }
    }
    Some((sans, not_after))
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        field,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Client-side TLS for the `custos` CLI and tests: trust `ca_pem`, present
/// `cert_pem` with `key_pem`.
pub fn client_tls(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
}
