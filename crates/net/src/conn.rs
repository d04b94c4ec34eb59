//! One bidirectional message connection, split into independently owned halves.

use proto::{FrameError, FrameReader, FrameWriter, Msg, WireCounter};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Messages in flight per direction on an in-memory connection (back-pressure).
const MEMORY_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Frame(FrameError),
    #[error("peer closed the connection")]
    Closed,
    #[error("the peer sent nothing for {secs} s (idle timeout): it stalled, or the network dropped the connection")]
    Idle { secs: u64 },
    #[error("handshake values need a serialising transport")]
    NotFramed,
}

impl ConnError {
    /// Whether the connection broke (reset, closed, cut mid-frame, silent past the idle
    /// timeout) rather than carried something wrong: a new connection may well work.
    pub fn is_transport(&self) -> bool {
        match self {
            ConnError::Closed | ConnError::Idle { .. } => true,
            ConnError::Frame(FrameError::Truncated) => true,
            ConnError::Frame(FrameError::Io(e)) => io_is_transport(e),
            ConnError::Frame(_) | ConnError::NotFramed => false,
        }
    }
}

/// `step` within `limit` (None: no limit); one that takes longer fails with `timed_out()`.
/// Opening a connection is bounded step by step with this, since a stalled peer's kernel
/// still accepts TCP and then nothing comes.
pub async fn within<T, E>(
    limit: Option<std::time::Duration>,
    step: impl std::future::Future<Output = Result<T, E>>,
    timed_out: impl FnOnce() -> E,
) -> Result<T, E> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, step)
            .await
            .unwrap_or_else(|_| Err(timed_out())),
        None => step.await,
    }
}

/// I/O errors of a socket that a broken or vanished path causes (as opposed to a TLS alert
/// or a certificate the peer rejected, which a retry would only repeat).
pub fn io_is_transport(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset
            | ConnectionAborted
            | ConnectionRefused
            | BrokenPipe
            | UnexpectedEof
            | TimedOut
            | NotConnected
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
    )
}

impl From<FrameError> for ConnError {
    /// TLS reports a peer that vanished without a close_notify as an unexpected EOF with a
    /// long explanation; to the user it is simply a closed connection.
    fn from(e: FrameError) -> ConnError {
        match e {
            FrameError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                ConnError::Closed
            }
            other => ConnError::Frame(other),
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

pub enum MsgReader {
    Framed(FrameReader<BoxRead>),
    Memory(mpsc::Receiver<Msg>),
}

pub enum MsgWriter {
    Framed(FrameWriter<BoxWrite>),
    Memory(mpsc::Sender<Msg>),
}

pub struct Conn {
    pub reader: MsgReader,
    pub writer: MsgWriter,
}

impl Conn {
    /// Wrap a byte stream's halves; every byte is counted in `wire`.
    pub fn framed<R, W>(read: R, write: W, wire: Arc<WireCounter>) -> Conn
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Conn {
            reader: MsgReader::Framed(FrameReader::new(Box::new(read), wire.clone())),
            writer: MsgWriter::Framed(FrameWriter::new(Box::new(write), wire)),
        }
    }

    pub fn tcp(stream: tokio::net::TcpStream, wire: Arc<WireCounter>) -> Conn {
        tune_socket(&stream);
        let (r, w) = stream.into_split();
        Conn::framed(tokio::io::BufReader::with_capacity(64 << 10, r), w, wire)
    }
}

/// Socket options of every data-carrying TCP connection: no Nagle delay, little unsent data.
pub(crate) fn tune_socket(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    limit_unsent(stream);
}

/// Unsent bytes a socket may hold before it stops taking more.
const NOTSENT_LOWAT: libc::c_int = 128 << 10;

/// Keep the kernel from queueing megabytes of unsent data per connection. Without this a
/// writer hands a whole frame to a socket whose buffer autotuned to several MiB and takes the
/// next job at once, so a few connections hoard seconds of queued work while others run dry;
/// with it a connection takes its next job only when it can nearly send it. Data in flight
/// (sent, not yet acknowledged) is not limited, so a long fat flow still fills its window.
fn limit_unsent(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = NOTSENT_LOWAT;
    // SAFETY: a valid socket fd and a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "TCP_NOTSENT_LOWAT not set: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Two connected ends of an in-process connection.
pub fn memory_pair() -> (Conn, Conn) {
    let (a_tx, a_rx) = mpsc::channel(MEMORY_DEPTH);
    let (b_tx, b_rx) = mpsc::channel(MEMORY_DEPTH);
    (
        Conn {
            reader: MsgReader::Memory(b_rx),
            writer: MsgWriter::Memory(a_tx),
        },
        Conn {
            reader: MsgReader::Memory(a_rx),
            writer: MsgWriter::Memory(b_tx),
        },
    )
}

impl MsgReader {
    /// Receive a handshake value (`Hello`, `Welcome`) before messages start.
    pub async fn recv_value<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, ConnError> {
        match self {
            MsgReader::Framed(r) => {
                r.set_limit(proto::MAX_HANDSHAKE_FRAME);
                let value = r.recv().await;
                r.set_limit(proto::MAX_FRAME);
                Ok(value?)
            }
            MsgReader::Memory(_) => Err(ConnError::NotFramed),
        }
    }

    /// Receive a value of another protocol carried in frames (replication links), up to
    /// `MAX_FRAME`; `None` when the peer closed cleanly.
    pub async fn recv_any<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, ConnError> {
        match self {
            MsgReader::Framed(r) => Ok(r.recv().await?),
            MsgReader::Memory(_) => Err(ConnError::NotFramed),
        }
    }

    /// Next message, or `None` when the peer closed cleanly.
    pub async fn recv(&mut self) -> Result<Option<Msg>, ConnError> {
        match self {
            MsgReader::Framed(r) => Ok(r.recv().await?),
            MsgReader::Memory(rx) => Ok(rx.recv().await),
        }
    }
}

impl MsgWriter {
    /// Send a handshake value (`Hello`, `Welcome`) before messages start.
    pub async fn send_value<T: serde::Serialize>(&mut self, value: &T) -> Result<(), ConnError> {
        match self {
            MsgWriter::Framed(w) => Ok(w.send(value, false).await?),
            MsgWriter::Memory(_) => Err(ConnError::NotFramed),
        }
    }

    /// Send a value of another protocol carried in frames (replication links).
    pub async fn send_any<T: serde::Serialize>(
        &mut self,
        value: &T,
        compress: bool,
    ) -> Result<(), ConnError> {
        match self {
            MsgWriter::Framed(w) => Ok(w.send(value, compress).await?),
            MsgWriter::Memory(_) => Err(ConnError::NotFramed),
        }
    }

    /// Send one message; `compress` asks for zstd where the transport serialises.
    pub async fn send(&mut self, msg: Msg, compress: bool) -> Result<(), ConnError> {
        match self {
            MsgWriter::Framed(w) => Ok(w.send(&msg, compress).await?),
            MsgWriter::Memory(tx) => tx.send(msg).await.map_err(|_| ConnError::Closed),
        }
    }

    /// Signal the end of this direction.
    pub async fn close(&mut self) {
        if let MsgWriter::Framed(w) = self {
            let _ = w.shutdown().await;
        }
    }

    /// Whether this writer serialises (and so compression can help).
    pub fn is_framed(&self) -> bool {
        matches!(self, MsgWriter::Framed(_))
    }
}
