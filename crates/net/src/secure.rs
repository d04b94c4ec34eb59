//! Turning a TCP stream into a message connection, with TLS or (on loopback, when a daemon
//! allows it) without: the dialling side's `connect` and the listening side's `accept`, which
//! tells a TLS client from a plaintext one by the first byte it sends.

use crate::conn::{tune_socket, within};
use crate::tls::{export_binding, Fingerprint};
use crate::Conn;
use proto::WireCounter;
use std::sync::Arc;
use tokio::net::TcpStream;

/// First byte of every TLS record that starts a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Bytes read from the socket at once below TLS. rustls asks for 4 KiB per read; without
/// this buffer a 1 MiB frame costs some 256 `recvfrom` calls.
const READ_BUFFER: usize = 256 << 10;

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
            let buffered = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
            let tls = acceptor.accept(buffered).await?;
            let (_, session) = tls.get_ref();
            let binding = export_binding(session).map_err(std::io::Error::other)?;
            let client_cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Fingerprint::of(c));
            let (r, w) = tokio::io::split(tls);
            Ok(Accepted {
                conn: Conn::framed(r, w, wire),
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
    let buffered = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
    let name = rustls::pki_types::ServerName::try_from("cutover")
        .map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, buffered);
    let tls = within(patience, handshake, timed_out)
        .await
        .map_err(ConnectError::Tls)?;
    let binding =
        export_binding(tls.get_ref().1).map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
    let (r, w) = tokio::io::split(tls);
    Ok(Dialled {
        conn: Conn::framed(r, w, wire),
        binding: Some(binding),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}
