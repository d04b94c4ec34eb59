//! Turning a TCP stream into a message connection, with TLS or (on loopback, when a daemon
//! allows it) without: the dialling side's `connect` and the listening side's `accept`, which
//! tells a TLS client from a plaintext one by the first byte it sends.
//!
//! rustls does the handshake (through tokio-rustls) and then protects every record of the
//! established connection; `tls_io` moves the bytes for each half.

use crate::conn::{tune_socket, within};
use crate::tls::{export_binding, Fingerprint};
use crate::tls_io;
use crate::Conn;
use proto::WireCounter;
use std::sync::Arc;
use tokio::net::TcpStream;

/// First byte of every TLS record that starts a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection the listening side accepted.
pub struct Accepted {
    pub conn: Conn,
    /// Keying material of the TLS connection (None for plaintext).
    pub binding: Option<[u8; 32]>,
    /// Fingerprint of the client's certificate, when it showed one.
    pub client_cert: Option<Fingerprint>,
}

/// A connection the dialling side opened.
pub struct Dialled {
    pub conn: Conn,
    pub binding: Option<[u8; 32]>,
}

/// Accept one connection: TLS when the client starts a TLS handshake and `tls` is set,
/// plaintext otherwise (the daemon refuses plaintext unless it allows it). Errors are
/// handshake failures, worth a log line and nothing more.
pub async fn accept(
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    wire: Arc<WireCounter>,
) -> std::io::Result<Accepted> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    match tls {
        Some(acceptor) if n == 1 && first[0] == TLS_HANDSHAKE_RECORD => {
            tune_socket(&stream);
            let tls = acceptor.accept(stream).await?;
            let (io, session) = tls.into_inner();
            let binding = export_binding(&session).map_err(std::io::Error::other)?;
            let client_cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Fingerprint::of(c));
            Ok(Accepted {
                conn: established(io, session.into(), wire),
                binding: Some(binding),
                client_cert,
            })
        }
        _ => Ok(Accepted {
            conn: Conn::tcp(stream, wire),
            binding: None,
            client_cert: None,
        }),
    }
}

/// Dial `addr` and, with `tls`, complete a TLS 1.3 handshake (the config's verifier does the
/// pinning). A TCP connection not made, or a handshake not done, within `patience` fails
/// as timed out (`ConnectError::Tcp` or `::Tls`), like a connection the kernel gave up on.
pub async fn connect(
    addr: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    wire: Arc<WireCounter>,
    patience: Option<std::time::Duration>,
) -> Result<Dialled, ConnectError> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let stream = within(patience, TcpStream::connect(addr), timed_out)
        .await
        .map_err(ConnectError::Tcp)?;
    let Some(config) = tls else {
        return Ok(Dialled {
            conn: Conn::tcp(stream, wire),
            binding: None,
        });
    };
    tune_socket(&stream);
    let name = rustls::pki_types::ServerName::try_from("cutover")
        .map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    let tls = within(patience, handshake, timed_out)
        .await
        .map_err(ConnectError::Tls)?;
    let (io, session) = tls.into_inner();
    let binding =
        export_binding(&session).map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
    Ok(Dialled {
        conn: established(io, session.into(), wire),
        binding: Some(binding),
    })
}

/// The message connection of a finished handshake. Whatever rustls already read past the
/// handshake stays in it and comes out first.
fn established(stream: TcpStream, session: rustls::Connection, wire: Arc<WireCounter>) -> Conn {
    let (reader, writer) = tls_io::split(stream, session);
    Conn::framed(reader, writer, wire)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

#[cfg(test)]
mod tests {
    //! Our halves (`tls_io`) against plain tokio-rustls: each side of a real loopback
    //! connection is once ours and once tokio-rustls's, so a record lost, reordered or sent
    //! out of turn (a KeyUpdate answer, close_notify) fails here. Also: keys refreshed before
    //! the cipher's limit, and a peer's KeyUpdate followed and answered.

    use super::*;
    use crate::tls::{client_config, server_config, Identity};
    use proto::{FrameReader, FrameWriter, Msg};
    use std::sync::Mutex;
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Frames of many sizes: tiny, one record, across records, a whole 1 MiB data frame.
    fn frames() -> Vec<Msg> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        [0usize, 1, 100, 16_383, 16_384, 16_385, 70_000, 1 << 20, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let data = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                Msg::Data {
                    id: i as u64,
                    offset: len as u64,
                    data,
                }
            })
            .collect()
    }

    fn configs() -> (tokio_rustls::TlsAcceptor, Arc<rustls::ClientConfig>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (identity, _) = Identity::load_or_create(&dir.path().join("id.pem")).expect("id");
        let server = server_config(&identity).expect("server config");
        let client = client_config(None, None, Arc::new(Mutex::new(None))).expect("client config");
        (tokio_rustls::TlsAcceptor::from(server), client)
    }

    /// A plain tokio-rustls client connection to `addr`.
    async fn rustls_dial(
        addr: std::net::SocketAddr,
        client: Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let stream = TcpStream::connect(addr).await.expect("dial");
        let name = rustls::pki_types::ServerName::try_from("cutover").expect("name");
        tokio_rustls::TlsConnector::from(client)
            .connect(name, stream)
            .await
            .expect("rustls handshake")
    }

    /// The rustls side: echo every frame back, then close when the peer does.
    async fn rustls_echo<S>(stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let wire = Arc::new(WireCounter::default());
        let (r, w) = tokio::io::split(stream);
        let mut reader = FrameReader::new(r, wire.clone());
        let mut writer = FrameWriter::new(w, wire);
        while let Some(msg) = reader
            .recv::<Msg>()
            .await
            .expect("rustls side reads our records")
        {
            writer.send(&msg, false).await.expect("rustls side writes");
        }
        writer.shutdown().await.expect("rustls side closes");
    }

    /// Our side: send every frame at once, read the echoes, close, and see a clean end.
    async fn exchange(mut conn: Conn) {
        let sent = frames();
        let crate::MsgWriter::Framed(mut writer) = conn.writer else {
            panic!("framed")
        };
        let expected = sent.clone();
        let sending = tokio::spawn(async move {
            for msg in sent {
                writer.send(&msg, false).await.expect("our side writes");
            }
            writer.shutdown().await.expect("our side closes");
        });
        for want in expected {
            let got = conn
                .reader
                .recv()
                .await
                .expect("our side reads rustls records");
            assert_eq!(got.as_ref(), Some(&want));
        }
        assert!(
            conn.reader.recv().await.expect("a clean end").is_none(),
            "close_notify ends the stream"
        );
        sending.await.expect("sender");
    }

    #[tokio::test]
    async fn our_client_records_interoperate_with_a_rustls_server() {
        let (acceptor, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            rustls_echo(acceptor.accept(stream).await.expect("rustls handshake")).await;
        });
        let wire = Arc::new(WireCounter::default());
        let dialled = connect(&addr, Some(client), wire, None)
            .await
            .expect("connect");
        exchange(dialled.conn).await;
        server.await.expect("server");
    }

    #[tokio::test]
    async fn our_server_records_interoperate_with_a_rustls_client() {
        let (acceptor, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client =
            tokio::spawn(async move { rustls_echo(rustls_dial(addr, client).await).await });
        let (stream, _) = listener.accept().await.expect("accept");
        let wire = Arc::new(WireCounter::default());
        let accepted = accept(stream, Some(&acceptor), wire)
            .await
            .expect("our handshake");
        assert!(accepted.binding.is_some());
        exchange(accepted.conn).await;
        client.await.expect("client");
    }

    #[tokio::test]
    async fn data_sent_right_behind_the_handshake_is_not_lost() {
        // The rustls client writes a frame the moment its handshake ends, so our server's
        // handshake often reads (and rustls decrypts) that frame's records along with the
        // client's Finished: however the bytes fall, it must come out first and intact.
        let (acceptor, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        for round in 0..20 {
            let first = frames().swap_remove(round % 9);
            let sent = first.clone();
            let client = client.clone();
            let dialling = tokio::spawn(async move {
                let tls = rustls_dial(addr, client).await;
                let mut w = FrameWriter::new(tls, Arc::new(WireCounter::default()));
                w.send(&sent, false).await.expect("send");
                w.shutdown().await.expect("close");
            });
            let (stream, _) = listener.accept().await.expect("accept");
            let wire = Arc::new(WireCounter::default());
            let mut accepted = accept(stream, Some(&acceptor), wire)
                .await
                .expect("handshake");
            let got = accepted.conn.reader.recv().await.expect("frame");
            assert_eq!(got, Some(first), "round {round}");
            assert!(accepted.conn.reader.recv().await.expect("end").is_none());
            dialling.await.expect("client");
        }
    }

    /// Our side of a connection that echoes every message until the peer closes.
    async fn our_echo(mut conn: Conn) {
        while let Some(msg) = conn.reader.recv().await.expect("our side reads") {
            conn.writer.send(msg, false).await.expect("our side writes");
        }
        conn.writer.close().await;
    }

    /// A server of ours on loopback that accepts one connection and echoes it.
    async fn our_echo_server(
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let wire = Arc::new(WireCounter::default());
            let accepted = accept(stream, Some(&acceptor), wire)
                .await
                .expect("our handshake");
            our_echo(accepted.conn).await;
        });
        (addr, server)
    }

    /// A provider whose only suite, AES-128-GCM, may protect `limit` records per key.
    fn low_limit_provider(limit: u64) -> Arc<rustls::crypto::CryptoProvider> {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let suite = TLS13_AES_128_GCM_SHA256
            .tls13()
            .expect("AES-128-GCM is a TLS 1.3 suite");
        let low: &'static rustls::Tls13CipherSuite =
            Box::leak(Box::new(rustls::Tls13CipherSuite {
                common: rustls::crypto::CipherSuiteCommon {
                    confidentiality_limit: limit,
                    ..suite.common
                },
                ..*suite
            }));
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![rustls::SupportedCipherSuite::Tls13(low)];
        Arc::new(p)
    }

    /// Accepts whatever certificate the server shows (the test is about records).
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Server and client configs whose keys may each protect only `limit` records.
    fn low_limit_configs(limit: u64) -> (tokio_rustls::TlsAcceptor, Arc<rustls::ClientConfig>) {
        let provider = low_limit_provider(limit);
        let made = rcgen::generate_simple_self_signed(vec!["cutover".to_string()]).expect("cert");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key.into())
            .expect("server config");
        server.alpn_protocols = vec![crate::tls::ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        client.alpn_protocols = vec![crate::tls::ALPN.to_vec()];
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            Arc::new(client),
        )
    }

    #[tokio::test]
    async fn keys_are_refreshed_before_their_limit_instead_of_breaking_the_connection() {
        // 8 records per key; the frames below are some 80 records each way, so each side
        // must send about ten KeyUpdates and follow the other's. Without them rustls would
        // refuse to seal the ninth record and the exchange would fail.
        let (acceptor, client) = low_limit_configs(8);
        let (addr, server) = our_echo_server(acceptor).await;
        let addr = addr.to_string();
        let wire = Arc::new(WireCounter::default());
        let dialled = connect(&addr, Some(client), wire, None)
            .await
            .expect("connect");
        exchange(dialled.conn).await;
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_peer_key_update_is_followed_and_answered_before_our_next_record() {
        // The rustls client asks for a key update (update_requested) before each frame: our
        // side must read the frame under the client's new key, and seal its echo under a new
        // key of its own announced first, or the client cannot open the echo.
        let (acceptor, client) = configs();
        let (addr, server) = our_echo_server(acceptor).await;
        let mut tls = rustls_dial(addr, client).await;
        let wire = Arc::new(WireCounter::default());
        for want in frames() {
            tls.get_mut().1.refresh_traffic_keys().expect("key update");
            FrameWriter::new(&mut tls, wire.clone())
                .send(&want, false)
                .await
                .expect("send");
            let mut reader = FrameReader::new(&mut tls, wire.clone());
            let got: Option<Msg> = reader.recv().await.expect("echo opens under the new key");
            assert_eq!(got.as_ref(), Some(&want));
        }
        tls.shutdown().await.expect("close");
        server.await.expect("server");
    }
}
