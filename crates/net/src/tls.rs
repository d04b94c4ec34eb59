//! TLS 1.3 for daemon connections (rustls, `ring` provider): the self-signed identity a daemon
//! (or a client) makes on first use, pinning of the peer's certificate by SHA-256 fingerprint
//! instead of a CA, the ALPN a client must offer, and the exported keying material that binds
//! a token proof or a join proof to one connection.
//!
//! Trust is by fingerprint, like ssh host keys: the verifiers below accept exactly the pinned
//! certificate (or, for trust on first use, record whichever one the peer shows), and always
//! check the handshake signature, so only the holder of the pinned key can complete it.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// ALPN protocol id: a TLS peer that is not cutover fails the handshake instead of
/// misreading frames.
pub const ALPN: &[u8] = b"cutover/2";
/// Label of the keying material a token proof is computed over (RFC 5705 / RFC 8446 §7.5).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-cutover-token-proof";
/// Prefix of the message a join proof signs: a join proof is never a valid token proof (nor
/// the other way round), whatever the keys.
const JOIN_PROOF_CONTEXT: &[u8] = b"cutover join proof\0";
/// File name of an identity (certificate and private key, PEM) in its directory.
pub const IDENTITY_FILE: &str = "identity.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A FIFO, device, directory or (to make one) a symlink where the identity file is.
    #[error(transparent)]
    File(#[from] cofs::safe_write::SafeWriteError),
    #[error("{path}: not a cutover identity ({why}); move it away to make a new one")]
    BadIdentity { path: PathBuf, why: String },
    #[error("cannot make a key pair: {0}")]
    KeyGen(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Read an identity file: a regular file (or a symlink to one) of at most 1 MiB.
fn read_identity(path: &Path) -> Result<Vec<u8>, TlsError> {
    use cofs::safe_write::SafeWriteError;
    cofs::safe_write::read_regular(path, 1 << 20).map_err(|e| match e {
        SafeWriteError::Io { path, source } => TlsError::Io { path, source },
        other => TlsError::File(other),
    })
}

/// SHA-256 of a certificate's DER bytes, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Accepts `sha256:HEX`, bare `HEX`, and hex with `:` separators (as openssl prints).
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let t = s.trim();
        let hex = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
        if digits.len() != 64 {
            return Err(format!(
                "{s:?} is not a fingerprint: expected sha256: and 64 hex digits"
            ));
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| format!("{s:?}: not hex"))?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| format!("{s:?}: not hex"))?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A certificate and its private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    pub fingerprint: Fingerprint,
}

impl Identity {
    /// Load the identity file at `path`, or make a new self-signed identity there. Returns
    /// whether it was made now. Safe against a second process doing the same at the same
    /// moment: the file appears complete or not at all, and the loser of the race loads the
    /// winner's.
    pub fn load_or_create(path: &Path) -> Result<(Identity, bool), TlsError> {
        let path = path.to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match read_identity(&path) {
            Ok(pem) => return Ok((Identity::from_pem(&pem, &path)?, false)),
            Err(TlsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Nothing is there: refuse a dangling symlink before making the directory.
        cofs::safe_write::check_replaceable(&path)?;
        std::fs::create_dir_all(&dir).map_err(|source| TlsError::Io {
            path: dir.clone(),
            source,
        })?;
        let made = rcgen::generate_simple_self_signed(vec!["cutover".to_string()])
            .map_err(|e| TlsError::KeyGen(e.to_string()))?;
        let pem = format!("{}{}", made.cert.pem(), made.signing_key.serialize_pem());
        let new = cofs::safe_write::Replacement::begin(&path, 0o600)?;
        new.file()
            .write_all(pem.as_bytes())
            .map_err(|source| TlsError::Io {
                path: new.temp_path().to_path_buf(),
                source,
            })?;
        // A hard link never replaces an existing file: the first process to get here wins,
        // and the loser loads the winner's.
        if new.commit_new()? {
            Ok((Identity::from_pem(pem.as_bytes(), &path)?, true))
        } else {
            let pem = read_identity(&path)?;
            Ok((Identity::from_pem(&pem, &path)?, false))
        }
    }

    /// Load an existing identity file.
    pub fn load(path: &Path) -> Result<Identity, TlsError> {
        let pem = read_identity(path)?;
        Identity::from_pem(&pem, path)
    }

    fn from_pem(pem: &[u8], path: &Path) -> Result<Identity, TlsError> {
        let bad = |why: String| TlsError::BadIdentity {
            path: path.to_path_buf(),
            why,
        };
        let cert = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| bad("no CERTIFICATE block".into()))?
            .map_err(|e| bad(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| bad(e.to_string()))?;
        let fingerprint = Fingerprint::of(&cert);
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }
}

/// ring, TLS 1.3 suites only, AES-128-GCM first: on CPUs with AES instructions it is the
/// cheapest of the three, and 128-bit keys are ample for data in transit.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn check_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Both configs allow TLS 1.3 only, so a TLS 1.2 signature never needs checking.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

/// Server side: TLS 1.3 only, the daemon's identity (shown only to clients that offer
/// `ALPN`), and an optional client certificate whose fingerprint the daemon later matches
/// against its grants.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let key = rustls::sign::CertifiedKey::from_der(
        vec![identity.cert.clone()],
        identity.key.clone_key(),
        &provider,
    )?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientCert { provider }))
        .with_cert_resolver(Arc::new(AlpnRequired(Arc::new(key))));
    // `AlpnRequired` refuses a client that does not offer this at the handshake, before any
    // frame is read.
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Our order (`provider`: AES-128-GCM first), not the client's: a client that lists
    // ChaCha20 first would otherwise cost both ends more on CPUs with AES instructions.
    config.ignore_client_order = true;
    // No session tickets: cutover does not resume sessions, every connection does a full
    // handshake, so tickets would only be bytes on the wire.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The daemon's metrics listener over HTTPS (`metrics_tls`): the same identity and TLS 1.3
/// suites as [`server_config`], but for HTTP/1.1 clients (curl, Prometheus), which offer no
/// cutover ALPN and show no client certificate.
pub fn https_server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The daemon's one certificate, for clients that offer ALPN at all. rustls itself accepts a
/// client that offers no ALPN; refusing to pick a certificate makes it fail such a handshake
/// with an access_denied alert. A client that offers only other protocols gets rustls's own
/// no_application_protocol alert (RFC 7301), after the certificate is picked.
#[derive(Debug)]
struct AlpnRequired(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for AlpnRequired {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // A client that offers other protocols only is refused by rustls itself, with the
        // standard no_application_protocol alert; one that offers none is refused here.
        let _offered = client_hello.alpn()?;
        Some(self.0.clone())
    }
}

/// What the daemon logs for a failed TLS handshake: a client without cutover's ALPN is named as
/// such, rather than by rustls's wording for how it refused it.
pub fn describe_handshake_failure(e: &std::io::Error) -> String {
    let no_alpn = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoApplicationProtocol) => true,
        // `AlpnRequired` is the only resolver, and it picks no certificate only for a client
        // without our ALPN.
        Some(rustls::Error::General(m)) => m == NO_CERTIFICATE_RESOLVED,
        _ => false,
    };
    if no_alpn {
        format!(
            "the client did not offer ALPN {} (not a cutover client, or one too old)",
            String::from_utf8_lossy(ALPN)
        )
    } else {
        e.to_string()
    }
}

/// rustls's error when the resolver picks no certificate (checked by a test: a new rustls
/// may word it differently).
const NO_CERTIFICATE_RESOLVED: &str = "no server certificate chain resolved";

/// Client side: accept the server whose certificate has fingerprint `expected`, or (None,
/// trust on first use) any server, recording what it showed in `seen`.
pub fn client_config(
    expected: Option<Fingerprint>,
    identity: Option<&Identity>,
    seen: Arc<Mutex<Option<Fingerprint>>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            expected,
            seen,
            provider,
        }));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    // The verifier ignores names; do not announce one.
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// Keying material exported from an established connection (client or server side): 32
/// bytes that both ends of this one TLS connection, and nobody else, can compute.
pub fn export_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], rustls::Error> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
}

/// HMAC-SHA256 keyed with `token` over the connection's binding.
pub fn token_proof(token: &[u8], binding: &[u8; 32]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token);
    let tag = ring::hmac::sign(&key, binding);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Constant-time check of a token proof.
pub fn verify_token_proof(token: &[u8], binding: &[u8; 32], proof: &[u8; 32]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token);
    ring::hmac::verify(&key, binding, proof).is_ok()
}

/// Proof that a joining data connection knows its session's secret: HMAC-SHA256 keyed with the
/// secret over `JOIN_PROOF_CONTEXT` and the joining connection's binding. The secret never
/// crosses the wire, and a proof seen on one connection is worthless on any other.
pub fn join_proof(secret: &[u8; 16], binding: &[u8; 32]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(JOIN_PROOF_CONTEXT);
    ctx.update(binding);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Constant-time check of a join proof.
pub fn verify_join_proof(secret: &[u8; 16], binding: &[u8; 32], proof: &[u8; 32]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut message = Vec::with_capacity(JOIN_PROOF_CONTEXT.len() + binding.len());
    message.extend_from_slice(JOIN_PROOF_CONTEXT);
    message.extend_from_slice(binding);
    ring::hmac::verify(&key, &message, proof).is_ok()
}

#[derive(Debug)]
struct PinnedServer {
    expected: Option<Fingerprint>,
    seen: Arc<Mutex<Option<Fingerprint>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        match self.expected {
            Some(want) if want != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Accepts any client certificate whose holder proves its key; the daemon decides what the
/// certificate's fingerprint may do.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse() {
        let fp = Fingerprint::of(b"certificate");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(Fingerprint::parse(&s).unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), fp);
        assert!(Fingerprint::parse("sha256:abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn identity_is_made_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new").join(IDENTITY_FILE);
        let (a, made) = Identity::load_or_create(&file).unwrap();
        assert!(made);
        let (b, made) = Identity::load_or_create(&file).unwrap();
        assert!(!made);
        assert_eq!(a.fingerprint, b.fingerprint);
        let mode = std::fs::metadata(&file).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::write(&file, "junk").unwrap();
        let e = Identity::load_or_create(&file).err().unwrap().to_string();
        assert!(
            e.contains("identity.pem") && e.contains("move it away"),
            "{e}"
        );
    }

    #[test]
    fn identity_is_not_made_through_a_symlink_nor_read_from_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(IDENTITY_FILE);
        let elsewhere = dir.path().join("elsewhere.pem");
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        let e = Identity::load_or_create(&file).err().unwrap().to_string();
        assert!(e.contains("identity.pem: is a symlink"), "{e}");
        assert!(!elsewhere.exists());
        std::fs::remove_file(&file).unwrap();
        let fifo = rustix::fs::FileType::Fifo;
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(rustix::fs::CWD, &file, fifo, mode, 0).unwrap();
        let e = Identity::load(&file).err().unwrap().to_string();
        assert!(e.contains("identity.pem: is a FIFO"), "{e}");
    }

    #[test]
    fn join_proofs_bind_to_the_connection_and_are_not_token_proofs() {
        let (b1, b2) = ([1u8; 32], [2u8; 32]);
        let secret = [9u8; 16];
        let p = join_proof(&secret, &b1);
        assert!(verify_join_proof(&secret, &b1, &p));
        assert!(!verify_join_proof(&secret, &b2, &p));
        assert!(!verify_join_proof(&[8u8; 16], &b1, &p));
        // Same key, same binding: still no token proof, and the other way round.
        assert!(!verify_token_proof(&secret, &b1, &p));
        assert!(!verify_join_proof(&secret, &b1, &token_proof(&secret, &b1)));
    }

    /// The daemon's server config, with a fresh identity.
    fn daemon_config() -> Arc<rustls::ServerConfig> {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(&dir.path().join(IDENTITY_FILE)).unwrap();
        server_config(&id).unwrap()
    }

    /// A client config like `client_config`'s, with the given suites in that order and the
    /// given ALPN offer.
    fn client_offering(
        suites: Vec<rustls::SupportedCipherSuite>,
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = suites;
        let provider = Arc::new(p);
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer {
                expected: None,
                seen: Arc::new(Mutex::new(None)),
                provider,
            }))
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        Arc::new(config)
    }

    /// Why an in-memory handshake failed: the server's error, and the client's if it had one
    /// (the alert it received).
    #[derive(Debug)]
    struct Failed {
        server: rustls::Error,
        client: Option<rustls::Error>,
    }

    /// Run a handshake in memory. Returns the client's connection.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<rustls::ClientConnection, Box<Failed>> {
        let name = ServerName::try_from("cutover").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            let served = s.process_new_packets();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            let answered = c.process_new_packets();
            if let Err(server) = served {
                let client = answered.err();
                return Err(Box::new(Failed { server, client }));
            }
            answered.unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c);
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
        use rustls::crypto::ring::cipher_suite::*;
        let client = client_offering(
            vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256],
            vec![ALPN.to_vec()],
        );
        let c = handshake(client, daemon_config()).unwrap();
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // A client without AES-128 still gets one it offers.
        let client = client_offering(vec![TLS13_CHACHA20_POLY1305_SHA256], vec![ALPN.to_vec()]);
        let c = handshake(client, daemon_config()).unwrap();
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }

    #[test]
    fn a_client_without_cutovers_alpn_fails_the_handshake_with_an_alert() {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let offer = |alpn: Vec<Vec<u8>>| {
            handshake(
                client_offering(vec![TLS13_AES_128_GCM_SHA256], alpn),
                daemon_config(),
            )
        };
        for alpn in [
            vec![],
            vec![b"h2".to_vec()],
            vec![b"h2".to_vec(), b"cutover/1".to_vec()],
        ] {
            let Err(failed) = offer(alpn.clone()) else {
                panic!("a client offering {alpn:?} completed the handshake");
            };
            let Failed { server, client } = *failed;
            // No offer: our resolver denies; another protocol: rustls's RFC 7301 alert.
            let alert = match alpn.is_empty() {
                true => rustls::AlertDescription::AccessDenied,
                false => rustls::AlertDescription::NoApplicationProtocol,
            };
            assert_eq!(
                client,
                Some(rustls::Error::AlertReceived(alert)),
                "{alpn:?}"
            );
            let logged = describe_handshake_failure(&std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                server,
            ));
            assert!(
                logged.contains("did not offer ALPN cutover/2"),
                "{alpn:?}: {logged}"
            );
        }
        // Ours among others is fine.
        let c = offer(vec![b"h2".to_vec(), ALPN.to_vec()]).unwrap();
        assert_eq!(c.alpn_protocol(), Some(ALPN));
        // Other failures keep rustls's words.
        let other =
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(!describe_handshake_failure(&other).contains("ALPN"));
    }

    #[test]
    fn token_proofs_bind_to_the_connection() {
        let b1 = [1u8; 32];
        let b2 = [2u8; 32];
        let p = token_proof(b"secret-token", &b1);
        assert!(verify_token_proof(b"secret-token", &b1, &p));
        assert!(!verify_token_proof(b"secret-token", &b2, &p));
        assert!(!verify_token_proof(b"other-token!", &b1, &p));
    }
}
