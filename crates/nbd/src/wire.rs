//! The numbers of the NBD protocol (magics, option and reply types, flags, error values),
//! named as in the protocol document (`doc/proto.md` of the NetworkBlockDevice project) less
//! their `NBD_` prefix, and the limits this server applies to what a client may send.
//!
//! Public so that tests and the fuzz target can speak the protocol with the same names.

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes the server sends, and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The name of the one metadata context the protocol defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values of replies (a subset of errno values, fixed by the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// The protocol's name for it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "NBD_EPERM",
            Errno::Io => "NBD_EIO",
            Errno::NoMem => "NBD_ENOMEM",
            Errno::Inval => "NBD_EINVAL",
            Errno::NoSpc => "NBD_ENOSPC",
            Errno::Overflow => "NBD_EOVERFLOW",
            Errno::NotSup => "NBD_ENOTSUP",
            Errno::Shutdown => "NBD_ESHUTDOWN",
        }
    }

    /// The reply value for an I/O error of the backend. `Unsupported` maps to `NBD_EIO`
    /// here: only a fast-zero request may answer `NBD_ENOTSUP`, and it does so explicitly.
    pub fn from_io(e: &std::io::Error) -> Errno {
        use std::io::ErrorKind as K;
        match e.raw_os_error() {
            Some(libc_errno::EPERM) | Some(libc_errno::EACCES) | Some(libc_errno::EROFS) => {
                return Errno::Perm
            }
            Some(libc_errno::ENOSPC) | Some(libc_errno::EDQUOT) | Some(libc_errno::EFBIG) => {
                return Errno::NoSpc
            }
            Some(libc_errno::ENOMEM) => return Errno::NoMem,
            Some(libc_errno::EINVAL) => return Errno::Inval,
            _ => {}
        }
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => Errno::Perm,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Errno::NoSpc,
            K::OutOfMemory => Errno::NoMem,
            K::InvalidInput => Errno::Inval,
            _ => Errno::Io,
        }
    }
}

/// The errno values `Errno::from_io` looks at (Linux numbering, which the protocol's
/// values were taken from), spelled here to keep libc out of the dependencies.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EDQUOT: i32 = 122;
}

/// The most payload a READ or WRITE may carry (the protocol's recommended floor for a
/// server's maximum, 32 MiB). A larger READ is refused with `NBD_EINVAL`; a larger WRITE
/// closes the connection, since skipping its payload would mean reading it all.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The longest string (export name, description, context name) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The longest option payload read into memory. Longer options are read and dropped in
/// pieces and refused with `REP_ERR_TOO_BIG`, up to `MAX_OPTION_DISCARD`.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longer options than this close the connection (a client that sends one is not an NBD
/// client, or is attacking us).
pub const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// The preferred block size advertised in `INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// The most extents one block status chunk carries (the protocol says it SHOULD NOT send
/// more than 2^20; fewer keeps one reply under 64 KiB).
pub const MAX_EXTENTS: usize = 8192;
