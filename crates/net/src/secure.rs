//! Turning a TCP stream into a message connection, with TLS or (on loopback, when a daemon
//! allows it) without: the dialling side's `connect` and the listening side's `accept`, which
//! tells a TLS client from a plaintext one by the first byte it sends.
//!
//! rustls does the handshake (through tokio-rustls); the established connection's records
//! are then protected by `record` with the keys rustls hands over, see there for why.

use crate::conn::{tune_socket, within};
use crate::record::{
    read_into, record_header, record_size, Keys, RecordReader, RecordWriter, MAX_RECORD,
};
use crate::tls::{export_binding, Fingerprint};
use crate::Conn;
use proto::WireCounter;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
            let tls = acceptor.accept(HandshakeIo::new(stream)).await?;
            let (io, session) = tls.into_inner();
            let binding = export_binding(&session).map_err(std::io::Error::other)?;
            let client_cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Fingerprint::of(c));
            Ok(Accepted {
                conn: established(io, session.into(), wire)?,
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
    let handshake =
        tokio_rustls::TlsConnector::from(config).connect(name, HandshakeIo::new(stream));
    let tls = within(patience, handshake, timed_out)
        .await
        .map_err(ConnectError::Tls)?;
    let (io, session) = tls.into_inner();
    let binding =
        export_binding(&session).map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
    Ok(Dialled {
        conn: established(io, session.into(), wire).map_err(ConnectError::Tls)?,
        binding: Some(binding),
    })
}

/// The message connection of a finished handshake: rustls hands over the traffic keys and
/// whatever it already decrypted, the handshake socket what it received past the last
/// handshake record, and from there `record` protects each direction on its own.
fn established(
    io: HandshakeIo,
    mut session: rustls::Connection,
    wire: Arc<WireCounter>,
) -> io::Result<Conn> {
    if io.give != 0 {
        return Err(io::Error::other("TLS: the handshake ended inside a record"));
    }
    // Data the peer sent right behind its last handshake message may already be decrypted.
    let mut plaintext = Vec::new();
    match io::Read::read_to_end(&mut session.reader(), &mut plaintext) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let limit = match session.negotiated_cipher_suite() {
        Some(rustls::SupportedCipherSuite::Tls13(suite)) => suite.common.confidentiality_limit,
        _ => {
            return Err(io::Error::other(
                "TLS: no TLS 1.3 cipher suite was negotiated",
            ))
        }
    };
    let secrets = session
        .dangerous_extract_secrets()
        .map_err(io::Error::other)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let (r, w) = io.stream.into_split();
    // The limit binds the sender, who picks the nonces; a receiver opens what it gets.
    let reader = RecordReader::new(
        r,
        Keys::new(rx_seq, rx, u64::MAX)?,
        &plaintext,
        &io.buf[io.start..io.end],
    );
    let writer = RecordWriter::new(w, Keys::new(tx_seq, tx, limit)?);
    Ok(Conn::framed(reader, writer, wire))
}

/// The socket during the handshake. Reads hand rustls whole records only, never a part of
/// one: when the handshake ends, rustls then holds no half-read record, and everything past
/// the last record it took is still here for `RecordReader`.
struct HandshakeIo {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Received bytes not yet handed to rustls.
    start: usize,
    end: usize,
    /// Bytes of the current whole record still to hand out.
    give: usize,
}

impl HandshakeIo {
    fn new(stream: TcpStream) -> Self {
        HandshakeIo {
            stream,
            buf: vec![0u8; 2 * MAX_RECORD],
            start: 0,
            end: 0,
            give: 0,
        }
    }
}

impl AsyncRead for HandshakeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.give > 0 {
                let n = this.give.min(dst.remaining());
                dst.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                this.give -= n;
                return Poll::Ready(Ok(()));
            }
            let held = this.end - this.start;
            if let Some(header) = record_header(&this.buf[this.start..this.end]) {
                let len = record_size(&header);
                if held >= len {
                    this.give = len;
                    continue;
                }
                if len > MAX_RECORD {
                    // Not a record rustls will take: let it see the bytes and say so.
                    this.give = held;
                    continue;
                }
            }
            this.buf.copy_within(this.start..this.end, 0);
            this.start = 0;
            this.end = held;
            let got = ready!(read_into(&mut this.stream, cx, &mut this.buf[this.end..]))?;
            if got == 0 {
                // The end of the stream: hand over a partial record for rustls to report.
                if held == 0 {
                    return Poll::Ready(Ok(()));
                }
                this.give = held;
                continue;
            }
            this.end += got;
        }
    }
}

impl AsyncWrite for HandshakeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
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
    //! Our record layer against rustls's own: each side of a real loopback connection is
    //! once ours and once plain tokio-rustls, so any difference in the bytes on the wire
    //! (nonces, headers, content types, close_notify) fails here.

    use super::*;
    use crate::tls::{client_config, server_config, Identity};
    use proto::{FrameReader, FrameWriter, Msg};
    use std::sync::Mutex;
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
}
