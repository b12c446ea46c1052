//! Transport security and connection admission for the client and peer ports.
//!
//! - TLS is rustls (ring). `https://` listen URLs serve TLS with `--cert-file` /
//!   `--key-file` (or `--peer-…`), or with a self-signed certificate generated into
//!   `<data-dir>/fixtures/{client,peer}` for `--auto-tls` / `--peer-auto-tls`, as
//!   etcd does. Certificate files are re-read when they change (checked at most
//!   every [`CERT_RELOAD_CHECK`]), so a renewed certificate needs no restart.
//! - `--client-cert-auth` requires a client certificate signed by
//!   `--trusted-ca-file`; with only a CA given, a certificate is optional and, when
//!   present, its Common Name is the caller's user name for auth (etcd's rule).
//! - Peers present their peer certificate as a client certificate and verify each
//!   other against `--peer-trusted-ca-file`; with `--peer-auto-tls`, as in etcd,
//!   peers encrypt but do not verify.
//! - Every accepted connection holds one of `--max-client-connections` slots until
//!   it closes, and must complete its TLS handshake (or, without TLS, send its first
//!   byte) within [`FIRST_BYTES_TIMEOUT`]; a slow-loris connection is dropped
//!   instead of holding a slot forever.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::h2_authority::AuthorityFix;

/// How often a served certificate's files are checked for changes.
pub const CERT_RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Time a new connection has to finish its TLS handshake or send its first byte.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections waiting to be picked up by the server.
const ACCEPTED_QUEUE: usize = 128;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// etcd's TLS flags for one side (client or peer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    pub auto_tls: bool,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid value {v:?} for --{key}: expected true or false")),
    }
}

impl TlsSettings {
    /// Reads `<prefix>cert-file`, … through `get` (flags or config file).
    pub fn from_raw<'a>(get: impl Fn(&str) -> Option<&'a str>, prefix: &str) -> Result<TlsSettings, String> {
        let path = |k: &str| get(&format!("{prefix}{k}")).filter(|v| !v.is_empty()).map(PathBuf::from);
        let flag = |k: &str| -> Result<bool, String> {
            let key = format!("{prefix}{k}");
            get(&key).map(|v| parse_bool(&key, v)).transpose().map(|b| b.unwrap_or(false))
        };
        let s = TlsSettings {
            cert_file: path("cert-file"),
            key_file: path("key-file"),
            trusted_ca_file: path("trusted-ca-file"),
            client_cert_auth: flag("client-cert-auth")?,
            auto_tls: flag("auto-tls")?,
        };
        if s.cert_file.is_some() != s.key_file.is_some() {
            return Err(format!("--{prefix}cert-file and --{prefix}key-file must be given together"));
        }
        if s.client_cert_auth && s.trusted_ca_file.is_none() {
            return Err(format!("--{prefix}client-cert-auth needs --{prefix}trusted-ca-file"));
        }
        Ok(s)
    }

    /// Whether there is a certificate to serve TLS with.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.auto_tls
    }

    /// The certificate and key files to serve: the configured ones, or a
    /// self-signed pair kept in `fixtures_dir` (generated on first use).
    fn key_pair_files(&self, fixtures_dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), BoxError> {
        if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
            return Ok((c.clone(), k.clone()));
        }
        let (cert, key) = (fixtures_dir.join("cert.pem"), fixtures_dir.join("key.pem"));
        if !cert.exists() || !key.exists() {
            std::fs::create_dir_all(fixtures_dir)?;
            let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
            names.extend(hosts.iter().cloned());
            names.sort();
            names.dedup();
            let generated = rcgen::generate_simple_self_signed(names)?;
            std::fs::write(&key, generated.signing_key.serialize_pem())?;
            std::fs::write(&cert, generated.cert.pem())?;
            tracing::info!(dir = %fixtures_dir.display(), "generated a self-signed certificate (auto TLS)");
        }
        Ok((cert, key))
    }

    /// The rustls server configuration for a listener of this side.
    /// `fixtures_dir` holds auto-TLS certificates; `alpn` lists the protocols.
    pub fn server_config(
        &self,
        fixtures_dir: &Path,
        hosts: &[String],
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, BoxError> {
        let provider = provider();
        let (cert, key) = self.key_pair_files(fixtures_dir, hosts)?;
        let resolver = Arc::new(ReloadingCert::load(cert, key)?);
        let verifier = match &self.trusted_ca_file {
            None => rustls::server::WebPkiClientVerifier::no_client_auth(),
            Some(ca) => {
                let builder =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone());
                if self.client_cert_auth {
                    builder.build()?
                } else {
                    builder.allow_unauthenticated().build()?
                }
            }
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The rustls client configuration a member dials its peers with: it presents
    /// its own certificate and verifies theirs against the trusted CA (with
    /// `--peer-auto-tls`, it does not verify, as etcd).
    pub fn peer_client_config(&self, fixtures_dir: &Path, hosts: &[String]) -> Result<rustls::ClientConfig, BoxError> {
        let provider = provider();
        let (cert, key) = self.key_pair_files(fixtures_dir, hosts)?;
        let builder =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match (&self.trusted_ca_file, self.auto_tls) {
            (Some(ca), _) => builder.with_root_certificates(roots(ca)?),
            (None, true) => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
            (None, false) => {
                return Err("peer TLS with --peer-cert-file needs --peer-trusted-ca-file to verify other members".into())
            }
        };
        let mut config = builder.with_client_auth_cert(read_certs(&cert)?, read_key(&key)?)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BoxError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("read certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()).into());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, BoxError> {
    Ok(PrivateKeyDer::from_pem_file(path).map_err(|e| format!("read key {}: {e}", path.display()))?)
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, BoxError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        store.add(cert).map_err(|e| format!("trusted CA {}: {e}", ca.display()))?;
    }
    Ok(store)
}

/// Modification times of a certificate file and its key file.
type FileStamp = (SystemTime, SystemTime);

fn mtimes(cert: &Path, key: &Path) -> Option<FileStamp> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

/// Serves a certificate from files, re-reading them when they change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    /// The files' modification times when loaded, and what they held.
    current: RwLock<(Option<FileStamp>, Arc<rustls::sign::CertifiedKey>)>,
    last_check: Mutex<Instant>,
}

impl ReloadingCert {
    fn load(cert: PathBuf, key: PathBuf) -> Result<Self, BoxError> {
        let stamp = mtimes(&cert, &key);
        let loaded = Self::read(&cert, &key)?;
        Ok(ReloadingCert { cert, key, current: RwLock::new((stamp, loaded)), last_check: Mutex::new(Instant::now()) })
    }

    fn read(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, BoxError> {
        let signing = provider().key_provider.load_private_key(read_key(key)?)?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(read_certs(cert)?, signing)))
    }

    fn maybe_reload(&self) {
        {
            let mut last = self.last_check.lock().expect("cert check poisoned");
            if last.elapsed() < CERT_RELOAD_CHECK {
                return;
            }
            *last = Instant::now();
        }
        let stamp = mtimes(&self.cert, &self.key);
        if stamp == self.current.read().expect("cert poisoned").0 {
            return;
        }
        match Self::read(&self.cert, &self.key) {
            Ok(k) => {
                *self.current.write().expect("cert poisoned") = (stamp, k);
                tracing::info!(cert = %self.cert.display(), "reloaded TLS certificate");
            }
            Err(e) => tracing::warn!(cert = %self.cert.display(), "keeping the old TLS certificate: {e}"),
        }
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.read().expect("cert poisoned").1.clone())
    }
}

/// Accepts any server certificate: only for `--peer-auto-tls`, whose
/// self-signed certificates nobody can verify (etcd does the same).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The Common Name of a DER certificate's subject (etcd's identity for
/// certificate-authenticated clients).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// A served connection and the admission slot it holds until it closes.
pub struct Admitted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
    /// On client connections: accepts the URL-form `:authority` of etcd's clients.
    fix: Option<Box<AuthorityFix>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match &mut this.fix {
            Some(fix) => fix.poll_read(&mut this.inner, cx, buf),
            None => Pin::new(&mut this.inner).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepted connections of one listener, plain or TLS.
pub type Incoming<S> = tokio_stream::wrappers::ReceiverStream<std::io::Result<Admitted<S>>>;

/// Accepts plain TCP connections: each must send a first byte in time.
/// `fix_authority`: filter the connection through [`AuthorityFix`].
pub fn accept_plain(listener: TcpListener, slots: Arc<Semaphore>, fix_authority: bool) -> Incoming<TcpStream> {
    accept(listener, slots, fix_authority, |tcp| async move {
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTES_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => Some(tcp),
            _ => None,
        }
    })
}

/// Accepts TLS connections: each must finish its handshake in time.
pub fn accept_tls(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    config: Arc<rustls::ServerConfig>,
    fix_authority: bool,
) -> Incoming<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    accept(listener, slots, fix_authority, move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(FIRST_BYTES_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    None
                }
                Err(_) => None,
            }
        }
    })
}

fn accept<S, F, Fut>(listener: TcpListener, slots: Arc<Semaphore>, fix_authority: bool, admit: F) -> Incoming<S>
where
    S: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<S>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            // Wait for a free slot before accepting: excess connections queue in
            // the kernel's backlog instead of in this process.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let fut = admit(tcp);
            tokio::spawn(async move {
                if let Some(stream) = fut.await {
                    let fix = fix_authority.then(Box::default);
                    let _ = tx.send(Ok(Admitted { inner: stream, _slot: slot, fix })).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
