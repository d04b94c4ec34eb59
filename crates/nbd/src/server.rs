//! The transmission phase, and the entry points that get a connection there.
//!
//! One connection = one reader loop, many handlers, one writer task:
//! - the reader decodes and checks each request header ([`request::validate`]) before it
//!   costs anything, takes a slot (at most `Config::max_in_flight` requests per connection)
//!   and, for READ and WRITE, a share of a byte budget (`Config::max_in_flight_bytes`),
//!   reads a WRITE's payload, and hands the request to a handler on tokio's blocking pool;
//! - handlers call the backend (and the observer, and metadata contexts), build the whole
//!   [`Reply`], and send it to the writer; they finish in any order, so replies go out of
//!   order, which the protocol allows (cookies match them up);
//! - the writer writes replies one at a time, flushing when it has nothing queued, and
//!   releases each reply's slot and bytes once written: the budget bounds the memory held
//!   by payloads being read, handled, queued and written.
//!
//! A refused request is answered in order by the reader itself. On NBD_CMD_DISC (or the
//! client closing) the reader stops; the handlers in flight still complete and their
//! replies are written before the connection closes.

use crate::behind::Behind;
use crate::direct::Payload;
use crate::error::Error;
use crate::export::Export;
use crate::handshake::{negotiate, Outcome};
use crate::options::{Selected, Session};
use crate::reply::{self, Reply};
use crate::request::{self, decode_header, validate, Command, Rejection, HEADER_LEN};
use crate::wire::*;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Per-connection bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Requests being handled or waiting for their reply to be written, per connection.
    pub max_in_flight: usize,
    /// READ and WRITE payload bytes held at once per connection (read, being handled,
    /// queued or being written). Raised to `MAX_PAYLOAD` if lower, so that any single
    /// acceptable request can run.
    pub max_in_flight_bytes: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Answer a WRITE without FUA once it is recorded, before it is made (see
    /// `behind.rs`); a FLUSH still waits for it. Off: every write is answered once made.
    pub write_behind: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(60),
            write_behind: true,
        }
    }
}

/// Exports and bounds, shared by every connection it serves. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Server {
    exports: Arc<[Export]>,
    /// Each export's writes done behind their replies, shared by its connections (a
    /// FLUSH on one covers those answered on the others).
    behind: Arc<[Arc<Behind>]>,
    config: Config,
    drain: Arc<Drain>,
}

/// A graceful stop (the protocol's NBD_ESHUTDOWN): once draining, requests in flight
/// finish, new ones other than FLUSH and DISC are answered NBD_ESHUTDOWN (so the client
/// flushes and disconnects), and the owner waits for the connections to end.
#[derive(Debug, Default)]
struct Drain {
    draining: std::sync::atomic::AtomicBool,
    /// Connections being served.
    live: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts a connection as live for as long as it is held.
struct Live(Arc<Drain>);

impl Live {
    fn new(drain: &Arc<Drain>) -> Live {
        drain.live.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Live(drain.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self
            .0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl Server {
    pub fn new(exports: impl Into<Arc<[Export]>>) -> Server {
        let exports: Arc<[Export]> = exports.into();
        Server {
            behind: exports.iter().map(|_| Arc::default()).collect(),
            exports,
            config: Config::default(),
            drain: Arc::default(),
        }
    }

    /// Start a graceful stop: see [`Server::wait_idle`]. Stop accepting separately (abort
    /// the task that runs `serve_*`).
    pub fn drain(&self) {
        self.drain
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Wait until no connection is served, at most `limit`; whether that happened.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let drain = &self.drain;
        let idle = async {
            loop {
                let notified = drain.idle.notified();
                if drain.live.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.drain.live.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn with_config(mut self, config: Config) -> Server {
        self.config = config;
        self
    }

    /// Bind a Unix socket at `path` (which must not exist) and serve it forever.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        self.serve_unix_listener(UnixListener::bind(path)?).await
    }

    /// Serve connections accepted on `listener`, each in its own task, forever.
    pub async fn serve_unix_listener(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.spawn_connection(stream),
                Err(e) => accept_failed(e).await,
            }
        }
    }

    /// Serve connections accepted on `listener`, each in its own task, forever. Which
    /// addresses may connect is the caller's policy (cutover listens on loopback only).
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // The protocol asks both ends to disable Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("NBD: TCP_NODELAY for {peer}: {e}");
                    }
                    self.spawn_connection(stream)
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }

    fn spawn_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve_connection(stream).await {
                tracing::debug!("NBD connection ended: {e}");
            }
        });
    }

    /// Serve one client on `stream`: handshake, then transmission until it disconnects.
    /// Returns once every reply has been written.
    pub async fn serve_connection<S>(&self, mut stream: S) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _live = Live::new(&self.drain);
        if self.exports.is_empty() {
            return Err(Error::NoExports);
        }
        let limit = self.config.handshake_timeout;
        let outcome = tokio::time::timeout(limit, negotiate(&mut stream, &self.exports))
            .await
            .map_err(|_| Error::HandshakeTimeout(limit))??;
        let Outcome::Transmit(session) = outcome else {
            return Ok(());
        };
        let export = self.exports[session.export].clone();
        let behind = self.behind[session.export].clone();
        let (reader, writer) = tokio::io::split(stream);
        transmit(
            reader,
            writer,
            (export, behind),
            session,
            self.config,
            self.drain.clone(),
        )
        .await
    }
}

/// Accept errors (out of file descriptors, a connection reset before accept) must not end
/// the server: wait a little and go on.
async fn accept_failed(e: io::Error) {
    tracing::warn!("NBD: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// [`Server::serve_unix`] with the default bounds.
pub async fn serve_unix(
    path: impl AsRef<Path>,
    exports: impl Into<Arc<[Export]>>,
) -> io::Result<()> {
    Server::new(exports).serve_unix(path).await
}

/// [`Server::serve_tcp`] with the default bounds.
pub async fn serve_tcp(listener: TcpListener, exports: impl Into<Arc<[Export]>>) -> io::Result<()> {
    Server::new(exports).serve_tcp(listener).await
}

/// [`Server::serve_connection`] with the default bounds.
pub async fn serve_connection<S>(stream: S, exports: impl Into<Arc<[Export]>>) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Server::new(exports).serve_connection(stream).await
}

/// What a connection in transmission knows.
pub(crate) struct Conn {
    pub(crate) export: Export,
    pub(crate) behind: Arc<Behind>,
    pub(crate) structured: bool,
    pub(crate) contexts: Vec<Selected>,
    limits: request::Limits,
    drain: Arc<Drain>,
    write_behind: bool,
}

/// A reply on its way to the writer, with the slot and bytes it holds until written (none
/// when answered early: the write done behind it holds them until made).
struct Outgoing {
    reply: Reply,
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

async fn transmit<R, W>(
    reader: R,
    writer: W,
    (export, behind): (Export, Arc<Behind>),
    session: Session,
    config: Config,
    drain: Arc<Drain>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = request::Limits {
        size: export.backend.size(),
        read_only: export.read_only,
        structured: session.structured,
        contexts: session.contexts.len(),
        max_payload: MAX_PAYLOAD,
    };
    let conn = Arc::new(Conn {
        export,
        behind,
        structured: session.structured,
        contexts: session.contexts,
        limits,
        drain,
        write_behind: config.write_behind,
    });
    let max_in_flight = config.max_in_flight.max(1);
    let budget = config.max_in_flight_bytes.max(MAX_PAYLOAD as usize);
    let (tx, rx) = mpsc::channel(max_in_flight);
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let gates = Gates {
        slots: Arc::new(Semaphore::new(max_in_flight)),
        bytes: Arc::new(Semaphore::new(budget)),
    };
    let mut reader = BufReader::with_capacity(128 << 10, reader);
    let read = read_requests(&mut reader, &conn, &gates, &tx).await;
    // Handlers hold senders of their own: the writer ends after the last reply.
    drop(tx);
    let written = writer_task
        .await
        .map_err(|_| Error::Protocol("reply writer task failed"))?;
    // Writes done behind their replies hold their slots until made: the connection is
    // over when they are (even when the client stopped reading replies).
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    drop(gates.slots.acquire_many(all).await);
    read?;
    written.map_err(Error::from)
}

struct Gates {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// The reader loop: returns at NBD_CMD_DISC, at the end of the stream, when the writer is
/// gone, or with the error that ends the connection.
async fn read_requests<R>(
    reader: &mut R,
    conn: &Arc<Conn>,
    gates: &Gates,
    tx: &mpsc::Sender<Outgoing>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    let closed = |_| Error::Protocol("semaphore closed");
    loop {
        let mut header = [0u8; HEADER_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            // A client that closes without NBD_CMD_DISC: nothing more to do.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let raw = decode_header(&header)
            .map_err(|m| Error::BadMagic(u64::from(m), "NBD_REQUEST_MAGIC"))?;
        if tx.is_closed() {
            // The writer failed (the client stopped reading); its error is reported.
            return Ok(());
        }
        let slot = gates.slots.clone().acquire_owned().await.map_err(closed)?;
        let refusal = match validate(&raw, &conn.limits) {
            Err(Rejection::Fatal(why)) => return Err(Error::Protocol(why)),
            Err(Rejection::Error {
                errno,
                reason,
                discard,
            }) => Err((errno, reason, discard)),
            // Stopping: what is in flight finishes; a flush still runs (so the client can
            // make its writes durable), anything else is turned away until it disconnects.
            Ok(req)
                if conn
                    .drain
                    .draining
                    .load(std::sync::atomic::Ordering::Acquire)
                    && !matches!(req.command, Command::Disc | Command::Flush) =>
            {
                let discard = match req.command {
                    Command::Write { .. } => req.length,
                    _ => 0,
                };
                Err((
                    Errno::Shutdown,
                    "the server is shutting down: flush and disconnect",
                    discard,
                ))
            }
            Ok(req) => Ok(req),
        };
        let req = match refusal {
            Ok(req) => req,
            Err((errno, reason, discard)) => {
                if discard > 0 {
                    let mut payload = (&mut *reader).take(u64::from(discard));
                    let n = tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
                    if n < u64::from(discard) {
                        return Err(Error::Closed("in the middle of a write payload"));
                    }
                }
                let reply = reply::error(raw.cookie, conn.structured, errno, reason);
                let out = Outgoing {
                    reply,
                    _slot: Some(slot),
                    _bytes: None,
                };
                if tx.send(out).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let bytes = match req.command {
            Command::Disc => return Ok(()),
            Command::Read { .. } | Command::Write { .. } => Some(
                gates
                    .bytes
                    .clone()
                    .acquire_many_owned(req.length)
                    .await
                    .map_err(closed)?,
            ),
            _ => None,
        };
        let payload = match req.command {
            Command::Write { .. } => {
                // Bounded by MAX_PAYLOAD in validate, and paid for from the budget above;
                // aligned, so that a large write reaches the disk without another copy.
                let mut buf = Payload::new(req.length as usize);
                match reader.read_exact(buf.as_mut_slice()).await {
                    Ok(_) => Some(buf),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(Error::Closed("in the middle of a write payload"))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => None,
        };
        let behind_range = match req.command {
            Command::Write { fua: false } if conn.write_behind => {
                Some((req.offset, u64::from(req.length)))
            }
            _ => None,
        };
        // In arrival order: what this request must wait for, and its own number.
        let ticket = conn.behind.arrive(behind_range);
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let answered = std::cell::Cell::new(false);
            let early = |reply| {
                answered.set(true);
                // Fails only when the writer is gone; the reply has nowhere to go then.
                let _ = tx.blocking_send(Outgoing {
                    reply,
                    _slot: None,
                    _bytes: None,
                });
            };
            let served = catch_unwind(AssertUnwindSafe(|| {
                crate::handle::serve(&conn, &req, payload, ticket, &early)
            }));
            let reply = match served {
                Ok(Some(reply)) => reply,
                // Answered early: the permits go now, with the write made (a panic
                // then is reported by the next FLUSH).
                Ok(None) => return,
                Err(_) if answered.get() => return,
                Err(_) => reply::error(
                    req.cookie,
                    conn.structured,
                    Errno::Io,
                    "internal error while serving the request",
                ),
            };
            let out = Outgoing {
                reply,
                _slot: Some(slot),
                _bytes: bytes,
            };
            let _ = tx.blocking_send(out);
        });
    }
}

/// The writer task: replies in the order handlers finish, flushed whenever the queue is
/// empty, then the write side shut down.
async fn write_replies<W>(writer: W, mut rx: mpsc::Receiver<Outgoing>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(128 << 10, writer);
    while let Some(out) = rx.recv().await {
        for (head, data) in out.reply.pieces() {
            w.write_all(head).await?;
            w.write_all(data).await?;
        }
        drop(out);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}
