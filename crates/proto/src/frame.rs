//! Length-delimited frames over any byte stream.
//!
//! A frame is `u32 little-endian length`, one flag byte (0 = postcard, 1 = zstd-compressed
//! postcard) and the payload. Frames above `MAX_FRAME` are refused before any allocation, so a
//! hostile peer cannot make us allocate more than that; a compressed frame may not inflate
//! beyond it either. Every byte read or written is added to a shared `WireCounter`.

use serde::{de::DeserializeOwned, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted or produced (payload plus flag byte).
pub const MAX_FRAME: usize = 16 << 20;

const FLAG_PLAIN: u8 = 0;
const FLAG_ZSTD: u8 = 1;
/// Payloads smaller than this are never worth compressing.
const COMPRESS_MIN: usize = 512;
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
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
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, counter: Arc<WireCounter>) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            counter,
        }
    }

    /// Next message, or `None` at a clean end of stream between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut len_bytes = [0u8; 4];
        match self.inner.read_exact(&mut len_bytes).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame".into()));
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                FrameError::Io(e)
            }
        })?;
        self.counter
            .received
            .fetch_add(4 + len as u64, Ordering::Relaxed);
        decode_payload(self.buf[0], &self.buf[1..])
    }
}

/// Decode one frame body (flag byte already split off).
pub fn decode_payload<T: DeserializeOwned>(flag: u8, body: &[u8]) -> Result<Option<T>, FrameError> {
    let value = match flag {
        FLAG_PLAIN => postcard::from_bytes(body),
        FLAG_ZSTD => {
            let plain = zstd::bulk::decompress(body, MAX_FRAME)
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
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4] = flag;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Msg, SmallFile};

    async fn roundtrip(msg: &Msg, compress: bool) -> (Msg, u64) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let counter = Arc::new(WireCounter::default());
        let mut w = FrameWriter::new(a, counter.clone());
        let mut r = FrameReader::new(b, counter.clone());
        w.send(msg, compress).await.unwrap();
        let got: Msg = r.recv().await.unwrap().unwrap();
        (got, counter.sent.load(Ordering::Relaxed))
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
            Err(FrameError::TooLarge(n)) => assert_eq!(n, u32::MAX as usize),
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
}
