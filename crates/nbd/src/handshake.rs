//! The handshake phase on the wire: the fixed newstyle greeting (`NBDMAGIC`, `IHAVEOPT`,
//! `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`), the client's flags, then options read
//! one at a time (length bounded before anything is allocated) and handed to
//! [`options::handle_option`](crate::options::handle_option), until the client enters
//! transmission or leaves.

use crate::error::Error;
use crate::export::Export;
use crate::options::{handle_option, put_reply, Next, OptState, Session};
use crate::wire::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How the handshake ended without error.
#[derive(Debug)]
pub enum Outcome {
    /// Enter transmission.
    Transmit(Session),
    /// The client aborted, or closed the connection between options.
    Ended,
}

/// Run the handshake on `stream`. Reads exactly what the client sent for each option (no
/// read-ahead), so the stream can be split for transmission afterwards without losing
/// bytes.
pub async fn negotiate<S>(stream: &mut S, exports: &[Export]) -> Result<Outcome, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_PASSWD.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = match stream.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Ended),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::ClientFlags(client_flags));
    }
    // A client without FLAG_C_FIXED_NEWSTYLE is served as a fixed one (the protocol lets
    // the server choose); it will only ever send NBD_OPT_EXPORT_NAME anyway.
    let mut state = OptState {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..OptState::default()
    };

    let mut out = Vec::new();
    loop {
        let mut header = [0u8; 16];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Ended),
            Err(e) => return Err(e.into()),
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[..8]);
        let magic = u64::from_be_bytes(magic);
        if magic != IHAVEOPT {
            return Err(Error::BadMagic(magic, "IHAVEOPT"));
        }
        let option = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let length = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);

        out.clear();
        if length > MAX_OPTION_LEN {
            // EXPORT_NAME cannot be answered with an error: the protocol says close.
            if length > MAX_OPTION_DISCARD || option == OPT_EXPORT_NAME {
                return Err(Error::OptionTooLong { option, length });
            }
            let skipped = tokio::io::copy(
                &mut (&mut *stream).take(length.into()),
                &mut tokio::io::sink(),
            )
            .await?;
            if skipped < u64::from(length) {
                return Ok(Outcome::Ended);
            }
            put_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too long");
            stream.write_all(&out).await?;
            stream.flush().await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        let next = handle_option(&mut state, exports, option, &data, &mut out);
        stream.write_all(&out).await?;
        stream.flush().await?;
        match next {
            Next::Continue => {}
            Next::Abort => return Ok(Outcome::Ended),
            Next::Go(session) => return Ok(Outcome::Transmit(session)),
            Next::Close(why) => return Err(Error::Protocol(why)),
        }
    }
}
