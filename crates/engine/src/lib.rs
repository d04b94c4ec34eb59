//! The sync engine: one sender and one receiver state machine that talk over a `Session` (a
//! control connection plus any number of data connections), whatever carries them.
//!
//! Data path: the sender walks its tree and streams `FileList` batches on the control
//! connection; the receiver answers each batch with `Needs`; files to send become jobs in one
//! queue that every data connection pulls from (small files batched into one frame, large
//! files cut into 1 MiB segments); the receiver writes them into partial files, checks the
//! whole-file digest, sets metadata and renames. Delta transfers use the receiver's
//! `Signature` (positional block hashes or FastCDC chunks).

mod events;
mod receiver;
mod sender;
mod session;

pub use events::{Action, Event, Events, NoEvents, Stats, Summary};
pub use receiver::{run_receiver, Destination};
pub use sender::{run_sender, Source};
pub use session::{Session, KEEPALIVE, MIN_IDLE_TIMEOUT};

/// Files up to this size travel whole inside `SmallFiles` frames.
pub const SMALL_FILE: u64 = 256 << 10;
/// Small files are batched until a frame holds this many bytes.
pub const SMALL_BATCH_BYTES: usize = 1 << 20;
/// Entries per `FileList` batch.
pub const LIST_BATCH: usize = 1000;
/// Entries the sender keeps in flight (listed but not yet finished): bounds memory.
pub const IN_FLIGHT_ENTRIES: usize = 16_384;
/// How often a file that changed while being read is sent again before it is reported.
pub const LIVE_RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Fs(#[from] cofs::FsError),
    #[error("connection: {0}")]
    Conn(#[from] net::ConnError),
    #[error("peer: {0}")]
    Peer(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
}
