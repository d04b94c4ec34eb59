//! The sync engine: one sender and one receiver state machine that talk over a `Session` (a
//! control connection plus any number of data connections), whatever carries them.
//!
//! Data path: the sender walks its tree and streams `FileList` batches on the control
//! connection; the receiver answers each batch with `Needs`; files to send become jobs in one
//! queue that every data connection pulls from (small files batched into one frame, large
//! files cut into 1 MiB segments); the receiver writes them into partial files, checks the
//! whole-file digest, sets metadata and renames. Delta transfers use the receiver's
//! `Signature` (positional block hashes or FastCDC chunks).

mod apply;
pub mod changed;
mod events;
pub mod listed;
mod receiver;
mod sender;
mod session;

pub use changed::ChangedBlocks;
pub use events::{Action, Event, Events, ItemPath, NoEvents, Stats, Summary};
pub use listed::{PathList, LISTED_MISSING};
pub use receiver::{run_receiver, Destination};
pub use sender::{run_sender, Source};
pub use session::{PublicName, Session, KEEPALIVE, MIN_IDLE_TIMEOUT};

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
    /// A connection broke, or went silent past the idle timeout, in the middle of the
    /// session: nothing is wrong with the data, and the same sync run again resumes.
    #[error("{TRANSPORT_PREFIX}{0}")]
    Transport(String),
}

/// What an entry refused by the destination lock says: another sync holds it. After a
/// connection broke, that other sync may be this one's own previous session, which the
/// peer has not noticed is gone yet.
pub const BUSY_DESTINATION: &str = "another cutover sync is writing into this destination";

/// How a `Transport` error starts, also in the `Fatal` a peer sends: the side that did not
/// see the break itself still learns that the session is worth resuming.
pub const TRANSPORT_PREFIX: &str = "connection lost: ";

impl EngineError {
    /// Whether running the same sync again may succeed where this session failed: a
    /// connection reset, closed or stalled, here or as the peer reports it. Disk, protocol
    /// and permission errors are not: retrying them would only repeat them.
    pub fn is_transport(&self) -> bool {
        match self {
            EngineError::Transport(_) => true,
            EngineError::Conn(e) => e.is_transport(),
            EngineError::Peer(m) => m.starts_with(TRANSPORT_PREFIX),
            _ => false,
        }
    }

    /// The text of the `Fatal` this side sends when the session ends with this error:
    /// a transport error says so with [`TRANSPORT_PREFIX`], whatever this side called it.
    pub fn for_peer(&self) -> String {
        match self {
            EngineError::Conn(e) if e.is_transport() => format!("{TRANSPORT_PREFIX}{e}"),
            other => other.to_string(),
        }
    }
}
