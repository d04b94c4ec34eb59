//! Transmission-phase replies, encoded: simple replies (16-byte header, data after it for a
//! READ) and structured reply chunks (`OFFSET_DATA`, `OFFSET_HOLE`, `BLOCK_STATUS`,
//! `ERROR`, `NONE`).
//!
//! A [`Reply`] is everything the server sends for one request, written by the connection's
//! writer task in one go, so chunks of different requests never interleave mid-chunk. Read
//! data stays in the buffer it was read into: a piece is a header plus a span of that
//! buffer, not a copy.

use crate::export::Extent;
use crate::wire::*;
use std::ops::Range;

/// All the bytes answering one request.
#[derive(Debug, Default)]
pub struct Reply {
    /// Written in order: each header, then its span of `data` (possibly empty).
    pieces: Vec<(Vec<u8>, Range<usize>)>,
    data: Vec<u8>,
}

impl Reply {
    /// The pieces to write, in order: a header, then the data following it.
    pub fn pieces(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pieces
            .iter()
            .map(|(head, span)| (head.as_slice(), &self.data[span.clone()]))
    }

    /// Total bytes on the wire (for tests and accounting).
    pub fn wire_len(&self) -> usize {
        self.pieces.iter().map(|(h, s)| h.len() + s.len()).sum()
    }

    /// The reply as one byte vector (for tests).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        for (h, d) in self.pieces() {
            out.extend_from_slice(h);
            out.extend_from_slice(d);
        }
        out
    }
}

fn simple_header(cookie: u64, error: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&error.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h
}

/// A simple reply without data: success (`None`) or an error.
pub fn simple(cookie: u64, error: Option<Errno>) -> Reply {
    Reply {
        pieces: vec![(simple_header(cookie, error.map_or(0, |e| e as u32)), 0..0)],
        data: Vec::new(),
    }
}

/// A successful simple reply to a READ, `data` following the header.
pub fn simple_read(cookie: u64, data: Vec<u8>) -> Reply {
    let len = data.len();
    Reply {
        pieces: vec![(simple_header(cookie, 0), 0..len)],
        data,
    }
}

/// The 20-byte header of a structured chunk whose payload is `len` bytes long.
fn chunk_header(cookie: u64, flags: u16, kind: u16, len: usize, extra: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + extra);
    h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    // Payloads are bounded by the maximum payload plus a few bytes, or by MAX_EXTENTS.
    h.extend_from_slice(&(len as u32).to_be_bytes());
    h
}

/// A structured `NBD_REPLY_TYPE_NONE` chunk with the DONE flag: success, nothing more.
pub fn structured_done(cookie: u64) -> Reply {
    Reply {
        pieces: vec![(
            chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0, 0),
            0..0,
        )],
        data: Vec::new(),
    }
}

/// A structured `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag and a message for humans
/// (cut at 4096 bytes, on a character boundary).
pub fn structured_error(cookie: u64, errno: Errno, message: &str) -> Reply {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut h = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len(),
        6 + msg.len(),
    );
    h.extend_from_slice(&(errno as u32).to_be_bytes());
    h.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    h.extend_from_slice(msg);
    Reply {
        pieces: vec![(h, 0..0)],
        data: Vec::new(),
    }
}

/// An error reply in whichever form the connection uses.
pub fn error(cookie: u64, structured: bool, errno: Errno, message: &str) -> Reply {
    if structured {
        structured_error(cookie, errno, message)
    } else {
        simple(cookie, Some(errno))
    }
}

/// A structured reply to a READ of `data.len()` bytes at `offset`: `runs` (consecutive
/// lengths from `offset`, `true` for a hole) become `OFFSET_HOLE` chunks for holes and
/// `OFFSET_DATA` chunks (spans of `data`) for the rest; the last chunk carries DONE.
/// Runs should add up to `data.len()` (what goes past it is cut off); zero-length runs
/// are skipped. An empty read is answered with a lone `NONE` chunk.
pub fn structured_read(cookie: u64, offset: u64, data: Vec<u8>, runs: &[(usize, bool)]) -> Reply {
    let mut pieces = Vec::with_capacity(runs.len());
    let mut at = 0usize;
    for &(len, hole) in runs {
        let len = len.min(data.len() - at);
        if len == 0 {
            continue;
        }
        let pos = offset + at as u64;
        let h = if hole {
            let mut h = chunk_header(cookie, 0, REPLY_TYPE_OFFSET_HOLE, 12, 12);
            h.extend_from_slice(&pos.to_be_bytes());
            h.extend_from_slice(&(len as u32).to_be_bytes());
            (h, 0..0)
        } else {
            let mut h = chunk_header(cookie, 0, REPLY_TYPE_OFFSET_DATA, 8 + len, 8);
            h.extend_from_slice(&pos.to_be_bytes());
            (h, at..at + len)
        };
        pieces.push(h);
        at += len;
    }
    match pieces.last_mut() {
        Some((h, _)) => h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes()),
        None => return structured_done(cookie),
    }
    Reply { pieces, data }
}

/// A successful reply to a BLOCK_STATUS: one `BLOCK_STATUS` chunk per context (its id and
/// its extents, each list non-empty), the last with DONE.
pub fn block_status(cookie: u64, contexts: &[(u32, Vec<Extent>)]) -> Reply {
    let mut pieces = Vec::with_capacity(contexts.len());
    for (i, (id, extents)) in contexts.iter().enumerate() {
        let flags = if i + 1 == contexts.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let len = 4 + 8 * extents.len();
        let mut h = chunk_header(cookie, flags, REPLY_TYPE_BLOCK_STATUS, len, len);
        h.extend_from_slice(&id.to_be_bytes());
        for e in extents {
            h.extend_from_slice(&e.length.to_be_bytes());
            h.extend_from_slice(&e.flags.to_be_bytes());
        }
        pieces.push((h, 0..0));
    }
    if pieces.is_empty() {
        return structured_done(cookie);
    }
    Reply {
        pieces,
        data: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn simple_replies() {
        let r = simple(7, Some(Errno::Inval)).to_bytes();
        assert_eq!(r.len(), 16);
        assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&r[4..]), 22);
        assert_eq!(&r[8..16], &7u64.to_be_bytes());
        let r = simple_read(9, vec![1, 2, 3]).to_bytes();
        assert_eq!(r.len(), 19);
        assert_eq!(be32(&r[4..]), 0);
        assert_eq!(&r[16..], &[1, 2, 3]);
    }

    #[test]
    fn read_chunks_cover_the_range_and_end_with_done() {
        let data = vec![0xaa; 12];
        let r = structured_read(
            5,
            1000,
            data,
            &[(4, false), (0, true), (4, true), (4, false)],
        );
        let b = r.to_bytes();
        // data chunk: 20 + 8 + 4, hole chunk: 20 + 12, data chunk: 20 + 8 + 4
        assert_eq!(b.len(), 32 + 32 + 32);
        let flags = |at: usize| u16::from_be_bytes([b[at + 4], b[at + 5]]);
        let kind = |at: usize| u16::from_be_bytes([b[at + 6], b[at + 7]]);
        assert_eq!((kind(0), flags(0)), (REPLY_TYPE_OFFSET_DATA, 0));
        assert_eq!(be32(&b[16..]), 12);
        assert_eq!(&b[20..28], &1000u64.to_be_bytes());
        assert_eq!((kind(32), flags(32)), (REPLY_TYPE_OFFSET_HOLE, 0));
        assert_eq!(&b[52..60], &1004u64.to_be_bytes());
        assert_eq!(be32(&b[60..]), 4);
        assert_eq!(
            (kind(64), flags(64)),
            (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
        );
        assert_eq!(&b[84..92], &1008u64.to_be_bytes());
        assert_eq!(&b[92..], &[0xaa; 4]);
        // Nothing to say: one NONE chunk.
        let b = structured_read(5, 0, Vec::new(), &[]).to_bytes();
        assert_eq!(b.len(), 20);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_TYPE_NONE);
    }

    #[test]
    fn errors_and_block_status() {
        let b = structured_error(3, Errno::NotSup, "nope").to_bytes();
        assert_eq!(be32(&b[16..]), 10);
        assert_eq!(be32(&b[20..]), 95);
        assert_eq!(&b[24..26], &4u16.to_be_bytes());
        assert_eq!(&b[26..], b"nope");
        let long = "é".repeat(3000);
        let b = structured_error(3, Errno::Io, &long).to_bytes();
        let n = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(n <= MAX_STRING && std::str::from_utf8(&b[26..26 + n]).is_ok());

        let e = |length, flags| Extent { length, flags };
        let b =
            block_status(1, &[(1, vec![e(512, 3)]), (2, vec![e(4096, 0), e(512, 1)])]).to_bytes();
        assert_eq!(b.len(), (20 + 4 + 8) + (20 + 4 + 16));
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 0);
        assert_eq!(be32(&b[20..]), 1);
        assert_eq!(u16::from_be_bytes([b[36], b[37]]), REPLY_FLAG_DONE);
        assert_eq!(be32(&b[48..]), 20);
        assert_eq!(be32(&b[52..]), 2);
        assert_eq!(be32(&b[64..]), 512);
        assert_eq!(be32(&b[68..]), 1);
    }
}
