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

use crate::backend::Zeroing;
use crate::direct::Payload;
use crate::error::Error;
use crate::export::{Export, Extent, WriteEvent, WriteKind};
use crate::handshake::{negotiate, Outcome};
use crate::options::{ContextKind, Selected, Session};
use crate::reply::{self, Reply};
use crate::request::{self, decode_header, validate, Command, Rejection, Request, HEADER_LEN};
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
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

/// Exports and bounds, shared by every connection it serves. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Server {
    exports: Arc<[Export]>,
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
        Server {
            exports: exports.into(),
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
        let (reader, writer) = tokio::io::split(stream);
        transmit(
            reader,
            writer,
            export,
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
struct Conn {
    export: Export,
    structured: bool,
    contexts: Vec<Selected>,
    limits: request::Limits,
    drain: Arc<Drain>,
}

/// A reply on its way to the writer, with the slot and bytes it holds until written.
struct Outgoing {
    reply: Reply,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

async fn transmit<R, W>(
    reader: R,
    writer: W,
    export: Export,
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
        structured: session.structured,
        contexts: session.contexts,
        limits,
        drain,
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
                    _slot: slot,
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
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let reply = catch_unwind(AssertUnwindSafe(|| handle(&conn, &req, payload)))
                .unwrap_or_else(|_| {
                    reply::error(
                        req.cookie,
                        conn.structured,
                        Errno::Io,
                        "internal error while serving the request",
                    )
                });
            let out = Outgoing {
                reply,
                _slot: slot,
                _bytes: bytes,
            };
            // Fails only when the writer is gone; the reply has nowhere to go then.
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

/// The error message and value for a failed backend or observer call.
fn failure(what: &str, e: &io::Error) -> (Errno, String) {
    (Errno::from_io(e), format!("{what}: {e}"))
}

/// Serve one checked request (on the blocking pool).
fn handle(conn: &Conn, req: &Request, payload: Option<Payload>) -> Reply {
    let (c, s) = (req.cookie, conn.structured);
    let backend = &*conn.export.backend;
    let (offset, length) = (req.offset, u64::from(req.length));
    let done = |r: Result<(), (Errno, String)>| match r {
        Ok(()) => reply::simple(c, None),
        Err((errno, msg)) => reply::error(c, s, errno, &msg),
    };
    let event = |kind, data, fua| WriteEvent {
        offset,
        length,
        kind,
        data,
        fua,
    };
    let fua_flush = |fua: bool| if fua { backend.flush() } else { Ok(()) };
    match req.command {
        Command::Read { df } => read(conn, req, df),
        Command::Write { fua } => {
            let data = payload.unwrap_or_else(|| Payload::new(0));
            let ev = event(WriteKind::Data, Some(data.as_slice()), fua);
            done(
                observed(conn, &ev, || {
                    backend.write_at(data.as_slice(), offset)?;
                    fua_flush(fua)
                })
                .map_err(|e| failure("write", &e)),
            )
        }
        Command::Trim { fua } => done(
            observed(conn, &event(WriteKind::Trim, None, fua), || {
                backend.trim(offset, length)?;
                fua_flush(fua)
            })
            .map_err(|e| failure("trim", &e)),
        ),
        Command::WriteZeroes { fua, no_hole, fast } => {
            let how = Zeroing {
                may_trim: !no_hole,
                fast_only: fast,
            };
            let r = observed(conn, &event(WriteKind::Zeroes, None, fua), || {
                backend.write_zeroes(offset, length, how)?;
                fua_flush(fua)
            });
            done(r.map_err(|e| {
                if fast && e.kind() == io::ErrorKind::Unsupported {
                    (
                        Errno::NotSup,
                        "zeroing would not be faster than writing".into(),
                    )
                } else {
                    failure("write zeroes", &e)
                }
            }))
        }
        Command::Flush => {
            let mut r = backend.flush().map_err(|e| failure("flush", &e));
            if let (Ok(()), Some(o)) = (&r, &conn.export.observer) {
                r = o.flushed().map_err(|e| failure("flush (observer)", &e));
            }
            done(r)
        }
        Command::BlockStatus { req_one } => block_status(conn, req, req_one),
        // Never handed to a handler; answering it would be harmless.
        Command::Disc => reply::simple(c, None),
    }
}

/// Run a change of the export between the observer's two calls, timed into the export's
/// write latency histogram (a refused write too: the client waited for its answer).
fn observed(
    conn: &Conn,
    ev: &WriteEvent<'_>,
    op: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let started = std::time::Instant::now();
    let r = match &conn.export.observer {
        None => op(),
        Some(o) => o.before_write(ev).and_then(|()| {
            let r = op();
            o.after_write(ev, &r);
            r
        }),
    };
    conn.export.write_latency.record(started.elapsed());
    r
}

/// A READ: simple reply with the data, or structured chunks with holes as `OFFSET_HOLE`.
fn read(conn: &Conn, req: &Request, df: bool) -> Reply {
    let backend = &*conn.export.backend;
    let (c, offset, len) = (req.cookie, req.offset, req.length as usize);
    let mut buf = vec![0u8; len];
    if !conn.structured {
        return match backend.read_at(&mut buf, offset) {
            Ok(()) => reply::simple_read(c, buf),
            Err(e) => reply::simple(c, Some(Errno::from_io(&e))),
        };
    }
    if len == 0 {
        return reply::structured_done(c);
    }
    let runs = if df {
        // One content chunk: holes are sent as the zeroes they read as.
        vec![(len, false)]
    } else {
        match backend.allocation(offset, len as u64, MAX_EXTENTS) {
            Ok(runs) => read_runs(runs.iter().map(|r| (r.length, r.hole)), len),
            Err(e) => {
                tracing::debug!("NBD: allocation map failed, reading all: {e}");
                vec![(len, false)]
            }
        }
    };
    let mut at = 0usize;
    for &(n, hole) in &runs {
        if !hole {
            if let Err(e) = backend.read_at(&mut buf[at..at + n], offset + at as u64) {
                let (errno, msg) = failure("read", &e);
                return reply::structured_error(c, errno, &msg);
            }
        }
        at += n;
    }
    reply::structured_read(c, offset, buf, &runs)
}

/// Turn a backend's runs into runs that cover exactly `len` bytes: cut what goes past,
/// count what is missing as data, drop empty runs and merge neighbours of a kind.
pub(crate) fn read_runs(runs: impl Iterator<Item = (u64, bool)>, len: usize) -> Vec<(usize, bool)> {
    let mut out: Vec<(usize, bool)> = Vec::new();
    let mut covered = 0usize;
    let push = |n: usize, hole: bool, out: &mut Vec<(usize, bool)>| match out.last_mut() {
        Some(last) if last.1 == hole => last.0 += n,
        _ => out.push((n, hole)),
    };
    for (n, hole) in runs {
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(len - covered);
        if n > 0 {
            push(n, hole, &mut out);
            covered += n;
        }
        if covered == len {
            break;
        }
    }
    if covered < len {
        push(len - covered, false, &mut out);
    }
    out
}

/// A BLOCK_STATUS: one chunk per selected context.
fn block_status(conn: &Conn, req: &Request, req_one: bool) -> Reply {
    let (c, offset, len) = (req.cookie, req.offset, req.length);
    let mut chunks = Vec::with_capacity(conn.contexts.len());
    for sel in &conn.contexts {
        let extents = match sel.kind {
            ContextKind::Allocation => conn
                .export
                .backend
                .allocation(offset, u64::from(len), MAX_EXTENTS)
                .map(|runs| {
                    runs.iter()
                        .map(|r| Extent {
                            length: u32::try_from(r.length).unwrap_or(u32::MAX),
                            flags: if r.hole { STATE_HOLE | STATE_ZERO } else { 0 },
                        })
                        .collect()
                }),
            ContextKind::Custom(i) => match conn.export.meta.get(i) {
                Some(m) => m.extents(offset, len, MAX_EXTENTS),
                None => Err(io::Error::other("metadata context vanished")),
            },
        };
        match extents {
            Ok(e) => match fit_extents(e, len, req_one) {
                Some(e) => chunks.push((sel.id, e)),
                None => {
                    return reply::structured_error(
                        c,
                        Errno::Io,
                        "metadata context gave no extents",
                    )
                }
            },
            Err(e) => {
                let (errno, msg) = failure("block status", &e);
                return reply::structured_error(c, errno, &msg);
            }
        }
    }
    reply::block_status(c, &chunks)
}

/// Make a context's answer valid for a request of `len` bytes: no zero-length extents,
/// nothing past the request (hence nothing past the export), neighbours with the same
/// flags merged, at most `MAX_EXTENTS` (one with REQ_ONE). `None` if nothing is left.
pub(crate) fn fit_extents(extents: Vec<Extent>, len: u32, req_one: bool) -> Option<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u32;
    for e in extents {
        if covered == len {
            break;
        }
        let n = e.length.min(len - covered);
        if n == 0 {
            continue;
        }
        covered += n;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += n,
            _ => out.push(Extent {
                length: n,
                flags: e.flags,
            }),
        }
    }
    out.truncate(if req_one { 1 } else { MAX_EXTENTS });
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_runs_cover_exactly() {
        assert_eq!(read_runs([].into_iter(), 10), vec![(10, false)]);
        assert_eq!(
            read_runs(
                [(4, true), (0, false), (2, true), (100, false)].into_iter(),
                10
            ),
            vec![(6, true), (4, false)]
        );
        assert_eq!(
            read_runs([(3, false), (3, false)].into_iter(), 10),
            vec![(10, false)]
        );
        assert_eq!(
            read_runs([(u64::MAX, true)].into_iter(), 10),
            vec![(10, true)]
        );
    }

    #[test]
    fn extents_are_cut_merged_and_limited() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(fit_extents(vec![], 10, false), None);
        assert_eq!(fit_extents(vec![e(0, 1)], 10, false), None);
        assert_eq!(
            fit_extents(
                vec![e(4, 1), e(0, 0), e(4, 1), e(u32::MAX, 0), e(5, 1)],
                10,
                false
            ),
            Some(vec![e(8, 1), e(2, 0)])
        );
        assert_eq!(
            fit_extents(vec![e(4, 1), e(4, 0)], 10, true),
            Some(vec![e(4, 1)])
        );
        assert_eq!(fit_extents(vec![e(40, 1)], 10, true), Some(vec![e(10, 1)]));
        let many: Vec<_> = (0..MAX_EXTENTS as u32 + 10).map(|i| e(1, i % 2)).collect();
        assert_eq!(
            fit_extents(many, u32::MAX, false).map(|v| v.len()),
            Some(MAX_EXTENTS)
        );
    }
}
