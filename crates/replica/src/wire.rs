//! What the two ends of a replication link say to each other. Every value travels as one
//! frame (postcard, `net::Conn`'s framing) over TLS. Connection 0 of a link is its control
//! connection (states, bitmaps, acknowledgements, keepalives); the others carry the
//! numbered stream from the primary, in any order: the receiving side applies by number.

use serde::{Deserialize, Serialize};

/// Bumped when a message changes meaning; both ends must agree.
pub const LINK_VERSION: u32 = 4;

/// One node's view, sent first by each end on the control connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub version: u32,
    pub size: u64,
    pub block_size: u32,
    pub current: u64,
    pub history: Vec<u64>,
    /// This node's bitmap id for the peer it talks to (0: in step).
    pub bitmap: u64,
    pub bitmap_history: Vec<u64>,
    pub primary: bool,
    pub inconsistent: bool,
    /// Inconsistent, but holding a copy of the peer's data made beforehand
    /// (`create-md --seeded-from`): its full resync compares checksums.
    pub seeded: bool,
    /// Blocks this node's bitmap for the peer holds (what it wrote that the peer may
    /// lack, or marked after a crash).
    pub out_of_sync_blocks: u64,
    /// The operator ran `connect --discard-my-data` here: this node takes the peer's data
    /// over whatever it wrote while apart.
    pub discard_my_data: bool,
    /// How this node settles a split brain by itself (both ends must agree).
    pub after_split_brain: SplitBrainPolicy,
}

/// `after_split_brain`: which side of a split brain, if any, gives up its writes without
/// an operator. Only ever the secondary: the primary's data is in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Refuse; an operator decides.
    #[default]
    Disconnect,
    /// The secondary takes the primary's data if it wrote nothing itself since the split.
    DiscardZeroChanges,
    /// The secondary takes the primary's data if it changed no more blocks than the
    /// primary did since the split.
    DiscardLeastChanges,
}

impl SplitBrainPolicy {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            SplitBrainPolicy::Disconnect => "disconnect",
            SplitBrainPolicy::DiscardZeroChanges => "discard-zero-changes",
            SplitBrainPolicy::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

/// Everything after the states.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Target to source: runs of blocks (first, count) the target's bitmap for the source
    /// holds; the source resyncs them too (the union of both sides' bitmaps).
    Runs(Vec<(u64, u64)>),
    RunsEnd,
    /// Source to target: the stream starts; `resync_blocks` are to be resynced (the
    /// target is inconsistent until `InStep`).
    Start {
        resync_blocks: u64,
    },
    /// Numbered stream operations (data connections). `wid`: the source's id of the
    /// write (for a resync run, of the last write it had when it read the run), which
    /// `PeerHolds` refers to; `unknown`: of a resync run, blocks (first, last) a write in
    /// progress may have changed while it was read.
    Data {
        seq: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        fua: bool,
        wid: u64,
        unknown: Vec<(u64, u64)>,
    },
    Zeroes {
        seq: u64,
        offset: u64,
        length: u64,
        fua: bool,
        wid: u64,
    },
    Trim {
        seq: u64,
        offset: u64,
        length: u64,
        wid: u64,
    },
    Flush {
        seq: u64,
    },
    /// Source to target: one BLAKE3 hash (32 bytes) per block of the range, in order; the
    /// target compares its own blocks and answers with `Mismatch` for those that differ,
    /// before it acknowledges `seq`.
    Check {
        seq: u64,
        offset: u64,
        length: u64,
        #[serde(with = "serde_bytes")]
        hashes: Vec<u8>,
    },
    /// Target to source: blocks (first, count) whose hashes differed; the source sends
    /// them as data.
    Mismatch(Vec<(u64, u64)>),
    /// Target to source: every operation up to `applied` is written, up to `durable`
    /// flushed (cumulative).
    Ack {
        applied: u64,
        durable: u64,
    },
    /// Source to target: once everything up to `seq` is durable, the target holds the
    /// source's data at generation `current`.
    InStep {
        seq: u64,
        current: u64,
    },
    /// Source to target: the source pulled ahead (writes went to its bitmap instead of
    /// the stream): the target's data is older than the source's until the next `InStep`.
    Outdated,
    /// Source to target: (node id, write id): that fellow peer of the source holds every
    /// write up to the id (and every block as of it); the target stops marking them for
    /// it (peer acknowledgements, see the volume crate's `peer_acks`).
    PeerHolds(Vec<(u32, u64)>),
    /// Either way, when nothing else was sent for a while.
    Keepalive,
    /// Either way: why this end will not go on (the other logs it).
    Refuse {
        reason: String,
    },
}

impl PeerMsg {
    /// The stream number of an operation.
    pub fn seq(&self) -> Option<u64> {
        match self {
            PeerMsg::Data { seq, .. }
            | PeerMsg::Zeroes { seq, .. }
            | PeerMsg::Trim { seq, .. }
            | PeerMsg::Flush { seq }
            | PeerMsg::Check { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
