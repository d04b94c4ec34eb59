//! Transmission-phase requests: decoding the 28-byte header ([`decode_header`]) and
//! checking a request against what was negotiated ([`validate`]) before it costs anything
//! (no buffer is allocated, no backend call made for a request that fails here).
//!
//! Pure functions over bytes and a [`Limits`] value, so the fuzz target and the unit tests
//! exercise exactly what the server runs.

use crate::wire::*;

/// The size of a request header on the wire.
pub const HEADER_LEN: usize = 28;

/// A request header as the client sent it, not yet checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRequest {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decode a header; the only thing that can be wrong at this level is the magic (then the
/// stream is out of step and the connection must close).
pub fn decode_header(buf: &[u8; HEADER_LEN]) -> Result<RawRequest, u32> {
    let word = |at: usize| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    let magic = u32::from_be_bytes(word(0));
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&buf[8..16]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&buf[16..24]);
    Ok(RawRequest {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        kind: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: u64::from_be_bytes(cookie),
        offset: u64::from_be_bytes(offset),
        length: u32::from_be_bytes(word(24)),
    })
}

/// Encode a header (for tests and clients; the server only decodes).
pub fn encode_header(r: &RawRequest) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// What the connection negotiated, as far as checking a request needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The export's size.
    pub size: u64,
    pub read_only: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// How many metadata contexts `NBD_OPT_SET_META_CONTEXT` selected for this export.
    pub contexts: usize,
    /// The largest READ or WRITE payload accepted.
    pub max_payload: u32,
}

/// A checked command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `df`: reply with one content chunk (NBD_CMD_FLAG_DF).
    Read {
        df: bool,
    },
    /// `length` payload bytes follow the header.
    Write {
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        fua: bool,
    },
    WriteZeroes {
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        req_one: bool,
    },
}

/// A request that passed [`validate`]: `offset + length` lies within the export and READ
/// and WRITE lengths are within the payload limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    pub command: Command,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Answer with `errno`. `discard` payload bytes follow the header (a refused WRITE of
    /// an acceptable length): read and drop them first, then go on with the next request.
    Error {
        errno: Errno,
        reason: &'static str,
        discard: u32,
    },
    /// Close the connection: the rest of the stream cannot be trusted or skipped cheaply.
    Fatal(&'static str),
}

fn err(errno: Errno, reason: &'static str) -> Rejection {
    Rejection::Error {
        errno,
        reason,
        discard: 0,
    }
}

/// Check `raw` against what was negotiated. The order matters for WRITE: its payload is
/// skipped on any error only once its length is known to be acceptable.
pub fn validate(raw: &RawRequest, l: &Limits) -> Result<Request, Rejection> {
    let fua = raw.flags & CMD_FLAG_FUA != 0;
    let allowed = |extra: u16| -> Result<(), Rejection> {
        if raw.flags & !(CMD_FLAG_FUA | extra) != 0 {
            Err(err(Errno::Inval, "command flag not valid for this command"))
        } else {
            Ok(())
        }
    };
    let in_range = |errno: Errno| -> Result<(), Rejection> {
        match raw.offset.checked_add(u64::from(raw.length)) {
            Some(end) if end <= l.size => Ok(()),
            _ => Err(err(errno, "request goes past the end of the export")),
        }
    };
    let writable = || -> Result<(), Rejection> {
        if l.read_only {
            Err(err(Errno::Perm, "the export is read-only"))
        } else {
            Ok(())
        }
    };
    let command = match raw.kind {
        CMD_READ => {
            if raw.length > l.max_payload {
                return Err(err(Errno::Inval, "read longer than the maximum payload"));
            }
            allowed(if l.structured { CMD_FLAG_DF } else { 0 })?;
            in_range(Errno::Inval)?;
            Command::Read {
                df: raw.flags & CMD_FLAG_DF != 0,
            }
        }
        CMD_WRITE => {
            if raw.length > l.max_payload {
                return Err(Rejection::Fatal("write longer than the maximum payload"));
            }
            let skip = |r: Rejection| match r {
                Rejection::Error { errno, reason, .. } => Rejection::Error {
                    errno,
                    reason,
                    discard: raw.length,
                },
                fatal => fatal,
            };
            allowed(0).map_err(skip)?;
            writable().map_err(skip)?;
            in_range(Errno::NoSpc).map_err(skip)?;
            Command::Write { fua }
        }
        CMD_DISC => Command::Disc,
        CMD_FLUSH => {
            allowed(0)?;
            if raw.offset != 0 || raw.length != 0 {
                return Err(err(Errno::Inval, "flush with nonzero offset or length"));
            }
            Command::Flush
        }
        CMD_TRIM => {
            allowed(0)?;
            writable()?;
            in_range(Errno::Inval)?;
            Command::Trim { fua }
        }
        CMD_WRITE_ZEROES => {
            allowed(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
            writable()?;
            in_range(Errno::NoSpc)?;
            Command::WriteZeroes {
                fua,
                no_hole: raw.flags & CMD_FLAG_NO_HOLE != 0,
                fast: raw.flags & CMD_FLAG_FAST_ZERO != 0,
            }
        }
        CMD_BLOCK_STATUS => {
            if !l.structured {
                return Err(err(Errno::Inval, "block status needs structured replies"));
            }
            if l.contexts == 0 {
                return Err(err(Errno::Inval, "no metadata context was selected"));
            }
            allowed(CMD_FLAG_REQ_ONE)?;
            if raw.length == 0 {
                return Err(err(Errno::Inval, "block status of zero bytes"));
            }
            in_range(Errno::Inval)?;
            Command::BlockStatus {
                req_one: raw.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        // NBD_CMD_CACHE is not advertised; unknown commands carry no payload we know of.
        _ => return Err(err(Errno::Inval, "unknown command")),
    };
    Ok(Request {
        cookie: raw.cookie,
        offset: raw.offset,
        length: raw.length,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            structured: true,
            contexts: 1,
            max_payload: MAX_PAYLOAD,
        }
    }

    fn raw(kind: u16, flags: u16, offset: u64, length: u32) -> RawRequest {
        RawRequest {
            flags,
            kind,
            cookie: 0xfeed,
            offset,
            length,
        }
    }

    fn errno(r: Result<Request, Rejection>) -> Errno {
        match r {
            Err(Rejection::Error { errno, .. }) => errno,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn header_round_trips_and_bad_magic_is_refused() {
        let r = raw(CMD_WRITE, CMD_FLAG_FUA, 0x0102_0304_0506_0708, 0x0a0b_0c0d);
        let bytes = encode_header(&r);
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(decode_header(&bytes), Ok(r));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(decode_header(&bad), Err(REQUEST_MAGIC ^ (1 << 24)));
    }

    #[test]
    fn range_checks_do_not_overflow() {
        let l = limits();
        assert!(validate(&raw(CMD_READ, 0, 0, 4096), &l).is_ok());
        assert!(validate(&raw(CMD_READ, 0, (1 << 20) - 1, 1), &l).is_ok());
        assert_eq!(
            errno(validate(&raw(CMD_READ, 0, 1 << 20, 1), &l)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_READ, 0, u64::MAX, 2), &l)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_TRIM, 0, u64::MAX - 1, 10), &l)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &l)),
            Errno::NoSpc
        );
        // A read of zero bytes at the very end is within range.
        assert!(validate(&raw(CMD_READ, 0, 1 << 20, 0), &l).is_ok());
    }

    #[test]
    fn oversize_payloads() {
        let l = limits();
        let big = MAX_PAYLOAD + 1;
        assert_eq!(errno(validate(&raw(CMD_READ, 0, 0, big), &l)), Errno::Inval);
        assert!(matches!(
            validate(&raw(CMD_WRITE, 0, 0, big), &l),
            Err(Rejection::Fatal(_))
        ));
        // Commands without payload may be longer than the payload limit (within range).
        let l = Limits {
            size: u64::MAX,
            ..limits()
        };
        assert!(validate(&raw(CMD_TRIM, 0, 0, u32::MAX), &l).is_ok());
        assert!(validate(&raw(CMD_WRITE_ZEROES, 0, 0, u32::MAX), &l).is_ok());
    }

    #[test]
    fn refused_writes_skip_their_payload() {
        let l = limits();
        let r = validate(&raw(CMD_WRITE, 0, (1 << 20) - 10, 100), &l);
        assert_eq!(
            r,
            Err(Rejection::Error {
                errno: Errno::NoSpc,
                reason: "request goes past the end of the export",
                discard: 100,
            })
        );
        let ro = Limits {
            read_only: true,
            ..l
        };
        match validate(&raw(CMD_WRITE, 0, 0, 512), &ro) {
            Err(Rejection::Error {
                errno: Errno::Perm,
                discard: 512,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        match validate(&raw(CMD_WRITE, CMD_FLAG_DF, 0, 512), &l) {
            Err(Rejection::Error {
                errno: Errno::Inval,
                discard: 512,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // Other refused commands have nothing to skip.
        match validate(&raw(CMD_TRIM, 0, 0, 512), &ro) {
            Err(Rejection::Error {
                errno: Errno::Perm,
                discard: 0,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_are_checked_per_command() {
        let l = limits();
        assert_eq!(
            validate(&raw(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &l).map(|r| r.command),
            Ok(Command::Write { fua: true })
        );
        assert_eq!(
            validate(
                &raw(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    1
                ),
                &l
            )
            .map(|r| r.command),
            Ok(Command::WriteZeroes {
                fua: false,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(
            errno(validate(&raw(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &l)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_TRIM, CMD_FLAG_REQ_ONE, 0, 1), &l)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_READ, 1 << 15, 0, 1), &l)),
            Errno::Inval
        );
        // DF only with structured replies.
        assert!(validate(&raw(CMD_READ, CMD_FLAG_DF, 0, 1), &l).is_ok());
        let simple = Limits {
            structured: false,
            ..l
        };
        assert_eq!(
            errno(validate(&raw(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
            Errno::Inval
        );
        // FUA is accepted on every command.
        assert!(validate(&raw(CMD_READ, CMD_FLAG_FUA, 0, 1), &l).is_ok());
    }

    #[test]
    fn block_status_needs_structured_replies_and_a_context() {
        let l = limits();
        assert_eq!(
            validate(&raw(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &l).map(|r| r.command),
            Ok(Command::BlockStatus { req_one: true })
        );
        let none = Limits { contexts: 0, ..l };
        assert_eq!(
            errno(validate(&raw(CMD_BLOCK_STATUS, 0, 0, 512), &none)),
            Errno::Inval
        );
        let simple = Limits {
            structured: false,
            ..l
        };
        assert_eq!(
            errno(validate(&raw(CMD_BLOCK_STATUS, 0, 0, 512), &simple)),
            Errno::Inval
        );
        assert_eq!(
            errno(validate(&raw(CMD_BLOCK_STATUS, 0, 0, 0), &l)),
            Errno::Inval
        );
    }

    #[test]
    fn flush_disc_and_unknown_commands() {
        let l = limits();
        assert_eq!(
            validate(&raw(CMD_FLUSH, 0, 0, 0), &l).map(|r| r.command),
            Ok(Command::Flush)
        );
        assert_eq!(errno(validate(&raw(CMD_FLUSH, 0, 1, 0), &l)), Errno::Inval);
        assert_eq!(
            validate(&raw(CMD_DISC, 0, 0, 0), &l).map(|r| r.command),
            Ok(Command::Disc)
        );
        assert_eq!(errno(validate(&raw(CMD_CACHE, 0, 0, 1), &l)), Errno::Inval);
        assert_eq!(errno(validate(&raw(99, 0, 0, 1), &l)), Errno::Inval);
    }
}
