//! An established TLS connection as two independent halves over one TCP socket: rustls
//! seals and opens every record (KeyUpdate, alerts, close_notify and the key refresh before a
//! cipher's confidentiality limit included); this module only moves bytes between rustls and
//! the socket.
//!
//! Why not `tokio::io::split` over tokio-rustls: its halves share one lock for whole polls,
//! and it reads the socket in small steps. Here each half owns its side of the socket, the
//! reader pulls up to `READ_BUFFER` bytes per system call and hands rustls a whole batch,
//! rustls's sealed records go out with vectored writes, and the lock around the rustls
//! connection is held only while rustls works, never across a wait on the socket.
//!
//! Either half may have records to send: the reader's, when a peer's KeyUpdate asks for ours
//! or rustls answers bad input with an alert. Both push rustls's queue out in order under the
//! lock. The reader never waits for the socket to take them: what it cannot write at once goes
//! before the writer's next record, which is what RFC 8446 §4.6.3 asks (a KeyUpdate before
//! any further application data).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 << 10;
/// Plaintext handed to rustls per write call: a 1 MiB data frame is sealed at once and leaves
/// in a few vectored writes instead of 65 small ones.
const SEAL_BATCH: usize = 1 << 20;

type Shared = Arc<Mutex<rustls::Connection>>;

/// Split an established connection (`session` finished its handshake on `stream`) into a
/// reading and a writing half.
pub(crate) fn split(stream: TcpStream, mut session: rustls::Connection) -> (TlsReader, TlsWriter) {
    // The writer bounds what waits in rustls itself (it drains before sealing more), so a
    // whole batch may be sealed in one call.
    session.set_buffer_limit(None);
    let shared: Shared = Arc::new(Mutex::new(session));
    let (r, w) = stream.into_split();
    (
        TlsReader {
            tls: shared.clone(),
            sock: r,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            eof_told: false,
        },
        TlsWriter {
            tls: shared,
            sock: w,
            closing: false,
        },
    )
}

fn lock(tls: &Shared) -> MutexGuard<'_, rustls::Connection> {
    // rustls keeps its state consistent between calls; a panic elsewhere does not spoil it.
    tls.lock().unwrap_or_else(|p| p.into_inner())
}

/// A non-blocking `io::Write` over the shared socket, for rustls's `write_tls`.
struct SocketWrite<'a>(&'a TcpStream);

impl io::Write for SocketWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write records rustls has sealed until it has none left (`Ok(true)`) or the socket takes no
/// more for now (`Ok(false)`).
fn push_out(tls: &mut rustls::Connection, sock: &TcpStream) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut SocketWrite(sock)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The sending half.
pub struct TlsWriter {
    tls: Shared,
    sock: OwnedWriteHalf,
    closing: bool,
}

impl TlsWriter {
    /// Wait until every record sealed so far (by either half) is in the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if push_out(&mut lock(&self.tls), self.sock.as_ref())? {
                return Poll::Ready(Ok(()));
            }
            // The failed write cleared the socket's readiness: this registers for the next.
            ready!(self.sock.as_ref().poll_write_ready(cx))?;
        }
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Only when earlier records are out is more taken, so at most one batch waits here.
        ready!(this.poll_drain(cx))?;
        let mut tls = lock(&this.tls);
        let take = buf.len().min(SEAL_BATCH);
        let taken = io::Write::write(&mut tls.writer(), &buf[..take])?;
        if taken == 0 && take > 0 {
            return Poll::Ready(Err(io::Error::other("TLS: rustls took no plaintext")));
        }
        // Start sending at once; what the socket does not take now goes first next time.
        push_out(&mut tls, this.sock.as_ref())?;
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.sock).poll_flush(cx)
    }

    /// Send a close_notify alert, then end the stream, so the peer can tell a clean end from a
    /// cut connection.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            ready!(this.poll_drain(cx))?;
            lock(&this.tls).send_close_notify();
            this.closing = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.sock).poll_shutdown(cx)
    }
}

/// The receiving half.
pub struct TlsReader {
    tls: Shared,
    sock: OwnedReadHalf,
    buf: Box<[u8]>,
    /// Received bytes not yet given to rustls.
    start: usize,
    end: usize,
    /// The socket reached its end.
    eof: bool,
    /// rustls was told of the end.
    eof_told: bool,
}

/// What one look at rustls gave the reader.
enum Step {
    /// Plaintext was copied out (or the stream ended): return.
    Done,
    /// rustls took more input: look again.
    Again,
    /// rustls needs more bytes from the socket.
    Starved,
}

impl TlsReader {
    /// Copy out what rustls has decrypted and, while `dst` has room, give rustls the bytes
    /// held here. `got` says whether this poll already copied something out.
    fn step(&mut self, dst: &mut ReadBuf<'_>, got: bool) -> io::Result<Step> {
        let mut tls = lock(&self.tls);
        match io::Read::read(&mut tls.reader(), dst.initialize_unfilled()) {
            // A close_notify: the clean end of the stream.
            Ok(0) => return Ok(Step::Done),
            Ok(n) => {
                dst.advance(n);
                if dst.remaining() == 0 {
                    return Ok(Step::Done);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // rustls's "peer closed connection without sending TLS close_notify"; what was
            // copied out before it goes first.
            Err(_) if got => return Ok(Step::Done),
            Err(e) => return Err(e),
        }
        let mut fed = false;
        while self.start < self.end {
            match tls.read_tls(&mut &self.buf[self.start..self.end]) {
                Ok(n) if n > 0 => {
                    self.start += n;
                    fed = true;
                }
                // rustls's buffer is full until it processes what it holds.
                _ => break,
            }
        }
        if self.start == self.end && self.eof && !self.eof_told {
            // An empty read is how rustls learns of the end of the stream.
            let _ = tls.read_tls(&mut &[][..]);
            self.eof_told = true;
            fed = true;
        }
        if !fed {
            if self.start < self.end {
                // Every feed is processed at once, so rustls always has room for a record.
                return Err(io::Error::other("TLS: rustls took no more input"));
            }
            return Ok(Step::Starved);
        }
        if let Err(e) = tls.process_new_packets() {
            // rustls queued an alert describing the error: a last try to deliver it.
            let _ = push_out(&mut tls, self.sock.as_ref());
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // A KeyUpdate answer or an alert, sent without waiting (see the module doc).
        let _ = push_out(&mut tls, self.sock.as_ref());
        Ok(Step::Again)
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let initial = dst.filled().len();
        loop {
            match this.step(dst, dst.filled().len() > initial)? {
                Step::Done => return Poll::Ready(Ok(())),
                Step::Again => continue,
                Step::Starved => {}
            }
            // Hand out what this poll decrypted rather than wait for more.
            if dst.filled().len() > initial {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Told and processed; rustls's reader reports the end on the next look.
                continue;
            }
            if this.start == this.end {
                this.start = 0;
                this.end = 0;
            } else if this.end == this.buf.len() {
                this.buf.copy_within(this.start..this.end, 0);
                this.end -= this.start;
                this.start = 0;
            }
            let mut space = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.sock).poll_read(cx, &mut space))?;
            let got = space.filled().len();
            if got == 0 {
                this.eof = true;
            }
            this.end += got;
        }
    }
}
