//! Length-delimited frames over any byte stream.
//!
//! A frame is `u32 little-endian length`, one flag byte (0 = postcard, 1 = zstd-compressed
//! postcard) and the payload. Frames above `MAX_FRAME` are refused before any allocation, and
//! the read buffer grows only as a frame's bytes actually arrive, so a hostile length prefix
//! alone costs at most 64 KiB; a compressed frame may not inflate beyond `MAX_FRAME` either.
//! Every byte read or written is added to a shared `WireCounter`.

use serde::{de::DeserializeOwned, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted or produced (payload plus flag byte).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest handshake frame (`Hello`, `Welcome`) accepted. A daemon decodes `Hello` before it
/// knows who is asking, and postcard values can be some 16 times larger in memory than on
/// the wire (a list of empty strings), so this bounds what an anonymous peer can make us
/// allocate: 1 MiB on the wire holds tens of thousands of filter rules.
pub const MAX_HANDSHAKE_FRAME: usize = 1 << 20;

const FLAG_PLAIN: u8 = 0;
const FLAG_ZSTD: u8 = 1;
/// Payloads smaller than this are never worth compressing.
const COMPRESS_MIN: usize = 512;
const ZSTD_LEVEL: i32 = 3;
/// The read buffer grows in steps of at least this, and never beyond twice what has arrived.
const READ_STEP: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Bytes sent and received on the wire, shared by every connection of a session.
#[derive(Debug, Default)]
pub struct WireCounter {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl WireCounter {
    pub fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    counter: Arc<WireCounter>,
    /// Largest frame this reader accepts now (`MAX_FRAME` unless lowered).
    limit: usize,
    /// How far the frame being read has come. Kept here, not in `recv`'s locals, so that
    /// a `recv` dropped at an await (a timeout, a losing `select!` branch) loses nothing.
    partial: Partial,
}

/// A frame read so far: its length prefix (`got` bytes of it), then `filled` bytes of
/// its `len` (0 until the prefix is complete).
#[derive(Default)]
struct Partial {
    prefix: [u8; 4],
    got: usize,
    len: usize,
    filled: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, counter: Arc<WireCounter>) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            counter,
            limit: MAX_FRAME,
            partial: Partial::default(),
        }
    }

    /// Accept frames of at most `limit` bytes (capped at `MAX_FRAME`) from now on, inflated
    /// size included; a handshake reads with `MAX_HANDSHAKE_FRAME`.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME);
    }

    /// Next message, or `None` at a clean end of stream between frames. Cancel-safe:
    /// dropped before it returns, it keeps what it read for the next call.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        while self.partial.got < self.partial.prefix.len() {
            let p = &mut self.partial;
            // An end of stream is clean only before the first byte of a length prefix. (A
            // reader may report the end as an `UnexpectedEof` error, as TLS does without a
            // close_notify; that is treated as an end of stream, as it always was.)
            let end = match self.inner.read(&mut p.prefix[p.got..]).await {
                Ok(0) => true,
                Ok(n) => {
                    p.got += n;
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
                Err(e) => return Err(e.into()),
            };
            if end {
                return if p.got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
        if self.partial.len == 0 {
            let len = u32::from_le_bytes(self.partial.prefix) as usize;
            if len > self.limit {
                return Err(FrameError::TooLarge(len, self.limit));
            }
            if len == 0 {
                return Err(FrameError::Malformed("empty frame".into()));
            }
            self.partial.len = len;
        }
        let len = self.partial.len;
        // Grow the buffer with the data rather than to the announced length at once, so a peer
        // that sends a large length and then stalls or hangs up holds no more than it sent.
        while self.partial.filled < len {
            let filled = self.partial.filled;
            let end = len.min(self.buf.len().max(filled.saturating_mul(2)).max(READ_STEP));
            if self.buf.len() < end {
                self.buf.resize(end, 0);
            }
            let chunk = self
                .buf
                .get_mut(filled..end)
                .ok_or_else(|| FrameError::Malformed("frame buffer out of range".into()))?;
            match self.inner.read(chunk).await {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => self.partial.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(FrameError::Truncated)
                }
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        self.partial = Partial::default();
        self.counter
            .received
            .fetch_add(4 + len as u64, Ordering::Relaxed);
        match self.buf.get(..len).and_then(<[u8]>::split_first) {
            Some((&flag, body)) => decode_within(flag, body, self.limit),
            None => Err(FrameError::Malformed("empty frame".into())),
        }
    }
}

/// Decode one frame body (flag byte already split off).
pub fn decode_payload<T: DeserializeOwned>(flag: u8, body: &[u8]) -> Result<Option<T>, FrameError> {
    decode_within(flag, body, MAX_FRAME)
}

/// Decode one frame body whose inflated size may not exceed `limit`.
fn decode_within<T: DeserializeOwned>(
    flag: u8,
    body: &[u8],
    limit: usize,
) -> Result<Option<T>, FrameError> {
    let value = match flag {
        FLAG_PLAIN => postcard::from_bytes(body),
        FLAG_ZSTD => {
            // The frame header announces the inflated size (our encoder always writes it): a
            // bomb is refused before anything is inflated, and only the announced size is
            // allocated. Without an announcement, inflating stops at the limit.
            let announced = zstd::zstd_safe::get_frame_content_size(body)
                .map_err(|_| FrameError::Malformed("zstd: bad frame header".into()))?;
            let capacity = match announced {
                Some(n) if n > limit as u64 => {
                    return Err(FrameError::TooLarge(
                        usize::try_from(n).unwrap_or(usize::MAX),
                        limit,
                    ))
                }
                Some(n) => n as usize,
                None => limit,
            };
            let plain = zstd::bulk::decompress(body, capacity)
                .map_err(|e| FrameError::Malformed(format!("zstd: {e}")))?;
            postcard::from_bytes(&plain)
        }
        other => return Err(FrameError::Malformed(format!("unknown frame flag {other}"))),
    };
    value
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

pub struct FrameWriter<W> {
    inner: W,
    plain: Vec<u8>,
    out: Vec<u8>,
    counter: Arc<WireCounter>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, counter: Arc<WireCounter>) -> Self {
        FrameWriter {
            inner,
            plain: Vec::new(),
            out: Vec::new(),
            counter,
            compressor: None,
        }
    }

    /// Send one message; with `compress`, zstd is used when it makes the frame smaller.
    pub async fn send<T: Serialize>(&mut self, msg: &T, compress: bool) -> Result<(), FrameError> {
        encode_frame(
            msg,
            compress,
            &mut self.compressor,
            &mut self.plain,
            &mut self.out,
        )?;
        self.inner.write_all(&self.out).await?;
        self.inner.flush().await?;
        self.counter
            .sent
            .fetch_add(self.out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Close the write half so the peer sees a clean end of stream.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// Serialise `msg` into a complete frame in `out` (length, flag, payload).
pub fn encode_frame<T: Serialize>(
    msg: &T,
    compress: bool,
    compressor: &mut Option<zstd::bulk::Compressor<'static>>,
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    plain.clear();
    plain.extend_from_slice(&[0u8; 5]);
    let taken = std::mem::take(plain);
    *plain = postcard::to_extend(msg, taken).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body_len = plain.len() - 5;
    if compress && body_len >= COMPRESS_MIN {
        if compressor.is_none() {
            *compressor = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        if let Some(c) = compressor.as_mut() {
            let bound = zstd::zstd_safe::compress_bound(body_len);
            out.clear();
            out.resize(5 + bound, 0);
            let n = c.compress_to_buffer(&plain[5..], &mut out[5..])?;
            // Incompressible payloads go raw: compression must save at least 1/16.
            if n + n / 16 < body_len {
                out.truncate(5 + n);
                finish_header(out, FLAG_ZSTD)?;
                return Ok(());
            }
        }
    }
    std::mem::swap(plain, out);
    finish_header(out, FLAG_PLAIN)
}

fn finish_header(out: &mut [u8], flag: u8) -> Result<(), FrameError> {
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len, MAX_FRAME));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4] = flag;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Msg, SmallFile};
    use std::time::Duration;

    async fn roundtrip(msg: &Msg, compress: bool) -> (Msg, u64) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let counter = Arc::new(WireCounter::default());
        let mut w = FrameWriter::new(a, counter.clone());
        let mut r = FrameReader::new(b, counter.clone());
        w.send(msg, compress).await.unwrap();
        let got: Msg = r.recv().await.unwrap().unwrap();
        (got, counter.sent.load(Ordering::Relaxed))
    }

    /// A `recv` given up (a timeout, a `select!` branch that lost) while a frame was half
    /// read loses nothing: the next `recv` goes on where it stopped. Without that, the bytes
    /// read so far vanish and the stream is read out of step (a "frame" length taken from
    /// the middle of a payload).
    #[tokio::test]
    async fn a_recv_cancelled_mid_frame_resumes_where_it_stopped() {
        let msg = Msg::Data {
            id: 7,
            offset: 9,
            data: (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect(),
        };
        let mut encoded = Vec::new();
        FrameWriter::new(&mut encoded, Arc::new(WireCounter::default()))
            .send(&msg, false)
            .await
            .unwrap();
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, Arc::new(WireCounter::default()));
        // Cut inside the length prefix, then twice inside the payload.
        let cuts = [2, 70_000, 200_000, encoded.len()];
        let mut from = 0;
        for (i, &to) in cuts.iter().enumerate() {
            a.write_all(&encoded[from..to]).await.unwrap();
            from = to;
            if i + 1 < cuts.len() {
                let waited = tokio::time::timeout(Duration::from_millis(20), r.recv::<Msg>()).await;
                assert!(waited.is_err(), "a partial frame gave a message");
            }
        }
        let got: Msg = r.recv().await.unwrap().unwrap();
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn compressible_frames_shrink_and_random_ones_go_raw() {
        let text = Msg::Data {
            id: 1,
            offset: 0,
            data: b"hello world ".repeat(1000),
        };
        let (got, wire) = roundtrip(&text, true).await;
        assert_eq!(got, text);
        assert!(wire < 1000, "text frame should compress, got {wire} bytes");

        let mut x = 0x1234_5678u64;
        let random: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let msg = Msg::SmallFiles {
            files: vec![SmallFile {
                id: 7,
                data: random,
                digest: [3; 32],
            }],
        };
        let (got, wire) = roundtrip(&msg, true).await;
        assert_eq!(got, msg);
        assert!(
            wire > 10_000,
            "random data must not be inflated by much: {wire}"
        );
    }

    #[tokio::test]
    async fn oversized_length_is_refused_without_allocating() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, Arc::new(WireCounter::default()));
        tokio::io::AsyncWriteExt::write_all(&mut a, &u32::MAX.to_le_bytes())
            .await
            .unwrap();
        match r.recv::<Msg>().await {
            Err(FrameError::TooLarge(n, _)) => assert_eq!(n, u32::MAX as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, Arc::new(WireCounter::default()));
        tokio::io::AsyncWriteExt::write_all(&mut a, &[9, 0, 0, 0, 0, 0xff, 0xff])
            .await
            .unwrap();
        drop(a);
        assert!(matches!(r.recv::<Msg>().await, Err(FrameError::Truncated)));

        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, Arc::new(WireCounter::default()));
        tokio::io::AsyncWriteExt::write_all(&mut a, &[3, 0, 0, 0, 0, 0xff, 0xff])
            .await
            .unwrap();
        assert!(matches!(
            r.recv::<Msg>().await,
            Err(FrameError::Malformed(_))
        ));
    }

    /// Regression: an end of stream inside the 4-byte length prefix used to read as a clean
    /// close (`Ok(None)`), hiding a peer that died mid-frame.
    #[tokio::test]
    async fn end_of_stream_inside_the_length_prefix_is_truncation() {
        for cut in 1..4 {
            let mut r = FrameReader::new(&[7u8, 0, 0, 0][..cut], Arc::new(WireCounter::default()));
            assert!(
                matches!(r.recv::<Msg>().await, Err(FrameError::Truncated)),
                "cut after {cut} prefix bytes"
            );
        }
        let mut r = FrameReader::new(&[][..], Arc::new(WireCounter::default()));
        assert!(matches!(r.recv::<Msg>().await, Ok(None)));

        // A reader that reports its end as an `UnexpectedEof` error (TLS without close_notify):
        // clean between frames, truncation inside a prefix.
        struct EofError<'a>(&'a [u8]);
        impl tokio::io::AsyncRead for EofError<'_> {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                if self.0.is_empty() {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return std::task::Poll::Ready(Err(eof));
                }
                let n = self.0.len().min(buf.remaining());
                buf.put_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                std::task::Poll::Ready(Ok(()))
            }
        }
        let mut r = FrameReader::new(EofError(&[]), Arc::new(WireCounter::default()));
        assert!(matches!(r.recv::<Msg>().await, Ok(None)));
        let mut r = FrameReader::new(EofError(&[7, 0]), Arc::new(WireCounter::default()));
        assert!(matches!(r.recv::<Msg>().await, Err(FrameError::Truncated)));
    }

    /// Regression: a length prefix just under `MAX_FRAME` used to allocate (and zero) the whole
    /// frame before a single payload byte arrived.
    #[tokio::test]
    async fn announced_length_alone_does_not_allocate_the_frame() {
        let mut stream = (MAX_FRAME as u32).to_le_bytes().to_vec();
        stream.extend_from_slice(&[0; 10]);
        let mut r = FrameReader::new(&stream[..], Arc::new(WireCounter::default()));
        assert!(matches!(r.recv::<Msg>().await, Err(FrameError::Truncated)));
        assert!(
            r.buf.capacity() <= 2 * READ_STEP,
            "buffer grew to {} bytes for 10 received",
            r.buf.capacity()
        );
        assert_eq!(r.counter.received.load(Ordering::Relaxed), 0);
    }

    /// Frames larger than the growth step, then smaller ones, through a narrow pipe.
    #[tokio::test]
    async fn frames_of_mixed_sizes_survive_the_growing_buffer() {
        let msgs: Vec<Msg> = [3 << 20, 100, READ_STEP, 200 << 10, 1]
            .into_iter()
            .enumerate()
            .map(|(i, n)| Msg::Data {
                id: i as u64,
                offset: n as u64,
                data: (0..n).map(|b| (b * 31 + i) as u8).collect(),
            })
            .collect();
        let (a, b) = tokio::io::duplex(4096);
        let counter = Arc::new(WireCounter::default());
        let mut w = FrameWriter::new(a, counter.clone());
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                w.send(m, false).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b, counter.clone());
        for m in &msgs {
            assert_eq!(&r.recv::<Msg>().await.unwrap().unwrap(), m);
        }
        assert!(r.recv::<Msg>().await.unwrap().is_none());
        writer.await.unwrap();
        assert_eq!(
            counter.received.load(Ordering::Relaxed),
            counter.sent.load(Ordering::Relaxed)
        );
    }

    /// A handshake reader refuses frames above `MAX_HANDSHAKE_FRAME`, announced or inflated.
    #[tokio::test]
    async fn handshake_limit_bounds_frames_and_inflation() {
        let counter = Arc::new(WireCounter::default());
        let big = ((MAX_HANDSHAKE_FRAME + 1) as u32).to_le_bytes();
        let mut r = FrameReader::new(&big[..], counter.clone());
        r.set_limit(MAX_HANDSHAKE_FRAME);
        assert!(matches!(
            r.recv::<Msg>().await,
            Err(FrameError::TooLarge(_, MAX_HANDSHAKE_FRAME))
        ));
        // A small compressed frame that inflates past the limit.
        let filters: Vec<crate::FilterRule> =
            vec![crate::FilterRule::Exclude(String::new()); MAX_HANDSHAKE_FRAME];
        let mut compressor = None;
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        encode_frame(&filters, true, &mut compressor, &mut plain, &mut out).unwrap();
        assert!(out.len() < 64 << 10, "compressed to {}", out.len());
        let mut r = FrameReader::new(&out[..], counter);
        r.set_limit(MAX_HANDSHAKE_FRAME);
        assert!(matches!(
            r.recv::<Vec<crate::FilterRule>>().await,
            Err(FrameError::TooLarge(..))
        ));
    }
}
