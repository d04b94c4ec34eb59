//! TLS 1.3 record protection after rustls's handshake (RFC 8446 §5), the way kTLS offload
//! uses rustls: rustls authenticates the peer and agrees the keys, then hands over the
//! traffic secrets (`dangerous_extract_secrets`), and the records of the established
//! connection are sealed and opened here with ring's AEADs.
//!
//! Why not let rustls do it: it copies every received byte three times (our socket buffer
//! into its deframer, the decrypted record into a fresh `Vec`, that into our frame buffer)
//! and takes a lock shared by both directions; on the receiving end of a bulk copy those
//! copies cost more than the cipher. Here a record is read into one buffer, decrypted in
//! place and copied out once, and the two directions are independent halves with their own
//! keys. The bytes on the wire are ordinary TLS 1.3 records: a rustls peer reads and writes
//! them (the tests check both ways).
//!
//! What is deliberately not supported after the handshake: a peer's KeyUpdate or
//! renegotiation messages (cutover never sends them; rustls only does near the confidentiality
//! limit, below). Instead a direction refuses to seal more records than its suite's
//! confidentiality limit (2^24 records for AES-GCM, some 256 GiB on one connection); the
//! connection then fails as broken, and the run reconnects with fresh keys.

use rustls::ConnectionTrafficSecrets;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Record header: content type, legacy version (2 bytes), length (2 bytes).
const HEADER: usize = 5;
/// AEAD tag of every suite we allow.
const TAG: usize = 16;
/// Largest plaintext of one record (2^14).
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest record length a peer may announce: plaintext, content type, padding and tag may
/// not exceed 2^14 + 256 (RFC 8446 §5.2).
const MAX_PROTECTED: usize = MAX_PLAINTEXT + 256;
/// Largest record on the wire.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_PROTECTED;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
/// Handshake message type of a session ticket, which a client may ignore.
const NEW_SESSION_TICKET: u8 = 4;
/// Alert description of a clean close.
const CLOSE_NOTIFY: u8 = 0;

/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 << 10;
/// Plaintext sealed per write call: a 1 MiB data frame is one `write` of 65 records instead
/// of 65 small ones.
const SEAL_BATCH: usize = 1 << 20;

/// One direction's key, IV and record sequence number.
pub(crate) struct Keys {
    key: ring::aead::LessSafeKey,
    iv: [u8; ring::aead::NONCE_LEN],
    seq: u64,
    /// Records this key may protect (the suite's confidentiality limit).
    limit: u64,
}

impl Keys {
    /// Keys from rustls's extracted secrets, starting at sequence number `seq`.
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets, limit: u64) -> io::Result<Keys> {
        use ring::aead::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(io::Error::other("TLS: negotiated an unsupported cipher")),
        };
        let unbound = ring::aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("TLS: traffic key of the wrong length"))?;
        let iv: [u8; ring::aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS: traffic IV of the wrong length"))?;
        Ok(Keys {
            key: ring::aead::LessSafeKey::new(unbound),
            iv,
            seq,
            limit,
        })
    }

    /// The next record's nonce: the IV XOR the 64-bit sequence number (RFC 8446 §5.3). A key
    /// that reached its limit refuses, since reusing or over-using it would weaken it.
    fn next_nonce(&mut self) -> io::Result<ring::aead::Nonce> {
        if self.seq >= self.limit {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS: this connection's key protected as many records as it safely can",
            ));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(ring::aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// The sending half: every write is sealed into records and written to `io`.
pub struct RecordWriter<W> {
    io: W,
    keys: Keys,
    /// Sealed records not yet written; `out[sent..]` is what is left.
    out: Vec<u8>,
    sent: usize,
    closing: bool,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub(crate) fn new(io: W, keys: Keys) -> Self {
        RecordWriter {
            io,
            keys,
            out: Vec::new(),
            sent: 0,
            closing: false,
        }
    }

    /// Append one record carrying `content` of inner type `kind`.
    fn seal(&mut self, kind: u8, content: &[u8]) -> io::Result<()> {
        let protected = content.len() + 1 + TAG;
        let header = [
            CONTENT_APPLICATION_DATA,
            3,
            3,
            (protected >> 8) as u8,
            protected as u8,
        ];
        let nonce = self.keys.next_nonce()?;
        let start = self.out.len();
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(content);
        self.out.push(kind);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(
                nonce,
                ring::aead::Aad::from(header),
                &mut self.out[start + HEADER..],
            )
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Write out every sealed record.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RecordWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Records sealed earlier go first; only then is more accepted, so at most one batch
        // waits here.
        ready!(this.poll_drain(cx))?;
        let take = buf.len().min(SEAL_BATCH);
        for content in buf[..take].chunks(MAX_PLAINTEXT) {
            this.seal(CONTENT_APPLICATION_DATA, content)?;
        }
        // Start sending at once; what the socket does not take now goes at the next write
        // or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Send a close_notify alert, then end the stream, so the peer can tell a clean end
    /// from a cut connection.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            ready!(this.poll_drain(cx))?;
            this.closing = true;
            // Warning level (1), close_notify.
            this.seal(CONTENT_ALERT, &[1, CLOSE_NOTIFY])?;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The receiving half: records are read into one buffer, decrypted in place, and their
/// plaintext handed out.
pub struct RecordReader<R> {
    io: R,
    keys: Keys,
    buf: Vec<u8>,
    /// Decrypted bytes not yet handed out.
    plain: std::ops::Range<usize>,
    /// Received bytes not yet decrypted.
    start: usize,
    end: usize,
    /// The peer sent close_notify: nothing more will come.
    closed: bool,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// `plaintext`: bytes rustls already decrypted during the handshake; `ciphertext`: bytes
    /// received after the handshake's last record and not yet decrypted.
    pub(crate) fn new(io: R, keys: Keys, plaintext: &[u8], ciphertext: &[u8]) -> Self {
        let held = plaintext.len() + ciphertext.len();
        let mut buf = vec![0u8; READ_BUFFER.max(held + MAX_RECORD)];
        buf[..plaintext.len()].copy_from_slice(plaintext);
        buf[plaintext.len()..held].copy_from_slice(ciphertext);
        RecordReader {
            io,
            keys,
            buf,
            plain: 0..plaintext.len(),
            start: plaintext.len(),
            end: held,
            closed: false,
        }
    }

    /// Decrypt the record at `start` if it has fully arrived. `Ok(false)`: more bytes are
    /// needed. Application data lands in `plain`; a close_notify sets `closed`.
    fn open_next(&mut self) -> io::Result<bool> {
        let held = &self.buf[self.start..self.end];
        let Some(header) = record_header(held) else {
            return Ok(false);
        };
        let protected = record_size(&header) - HEADER;
        if header[0] != CONTENT_APPLICATION_DATA || !(TAG + 1..=MAX_PROTECTED).contains(&protected)
        {
            return Err(invalid(format!(
                "TLS: malformed record (type {}, length {protected})",
                header[0]
            )));
        }
        if held.len() < HEADER + protected {
            return Ok(false);
        }
        let body = self.start + HEADER;
        self.start = body + protected;
        let nonce = self.keys.next_nonce()?;
        let opened = self
            .keys
            .key
            .open_in_place(
                nonce,
                ring::aead::Aad::from(header),
                &mut self.buf[body..body + protected],
            )
            .map_err(|_| invalid("TLS: a record failed authentication (corrupted or forged)"))?;
        // The inner content type is the last non-zero byte; zeros after it are padding.
        let Some(kind_at) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS: a record with no content type"));
        };
        let kind = opened[kind_at];
        match kind {
            CONTENT_APPLICATION_DATA => self.plain = body..body + kind_at,
            CONTENT_ALERT if opened.get(1) == Some(&CLOSE_NOTIFY) && kind_at == 2 => {
                self.closed = true
            }
            CONTENT_ALERT => {
                return Err(invalid(format!(
                    "TLS: the peer sent alert {}",
                    opened.get(1).copied().unwrap_or(0)
                )))
            }
            CONTENT_HANDSHAKE if opened.first() == Some(&NEW_SESSION_TICKET) => {}
            CONTENT_HANDSHAKE => {
                return Err(invalid(format!(
                    "TLS: the peer sent handshake message {} after the handshake, which \
                     cutover does not take (key updates included)",
                    opened.first().copied().unwrap_or(0)
                )))
            }
            other => {
                return Err(invalid(format!(
                    "TLS: a record of unknown content type {other}"
                )))
            }
        }
        Ok(true)
    }

    /// Make room for at least one whole record after `end`.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MAX_RECORD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RecordReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(dst.remaining());
                dst.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // Any plaintext handed out is gone, so its space can be reused.
            this.plain = 0..0;
            this.make_room();
            let got = ready!(read_into(&mut this.io, cx, &mut this.buf[this.end..]))?;
            if got == 0 {
                // As rustls reports it: an end without close_notify may be a truncation.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: the peer closed the connection without a close_notify",
                )));
            }
            this.end += got;
        }
    }
}

/// The header at the start of `held`, once all of it has arrived.
pub(crate) fn record_header(held: &[u8]) -> Option<[u8; HEADER]> {
    held.get(..HEADER)?.try_into().ok()
}

/// Bytes on the wire of the record with this header, header included.
pub(crate) fn record_size(header: &[u8; HEADER]) -> usize {
    HEADER + u16::from_be_bytes([header[3], header[4]]) as usize
}

/// One read from `io` into `space`; how many bytes came (0: the end of the stream).
pub(crate) fn read_into<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    space: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut space = ReadBuf::new(space);
    ready!(Pin::new(io).poll_read(cx, &mut space))?;
    Poll::Ready(Ok(space.filled().len()))
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn keys(limit: u64) -> Keys {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([9u8; 12]),
        };
        Keys::new(0, secrets, limit).expect("test keys")
    }

    #[tokio::test]
    async fn a_flipped_bit_anywhere_fails_authentication_instead_of_yielding_data() {
        let mut sealed = Vec::new();
        {
            let mut w = RecordWriter::new(&mut sealed, keys(u64::MAX));
            w.write_all(&[42u8; 40_000]).await.expect("seal");
            w.flush().await.expect("flush");
        }
        for at in [0, 3, 5, 100, 16_400, sealed.len() - 1] {
            let mut damaged = sealed.clone();
            damaged[at] ^= 0x10;
            let mut r = RecordReader::new(&damaged[..], keys(u64::MAX), &[], &[]);
            let mut got = Vec::new();
            let err = r
                .read_to_end(&mut got)
                .await
                .expect_err("damaged record must fail");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "byte {at}: {err}");
            // Records before the damaged one may be delivered; nothing after it.
            assert!(got.len() <= (at / MAX_RECORD) * MAX_PLAINTEXT, "byte {at}");
        }
    }

    #[tokio::test]
    async fn a_key_refuses_to_seal_past_its_limit_and_a_cut_stream_is_not_a_clean_end() {
        let mut sealed = Vec::new();
        {
            let mut w = RecordWriter::new(&mut sealed, keys(3));
            w.write_all(&[1u8; 3 * MAX_PLAINTEXT])
                .await
                .expect("three records fit");
            let err = w.write_all(&[1u8]).await.expect_err("a fourth must not");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        }

        let mut r = RecordReader::new(&sealed[..sealed.len() - 1], keys(u64::MAX), &[], &[]);
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got.len(), 2 * MAX_PLAINTEXT);
    }
}
