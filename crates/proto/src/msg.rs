//! Message types: handshake, file list, needs, signatures, data and reports.
//!
//! Paths travel as raw bytes (Unix paths need not be UTF-8) and are always relative to the
//! root of a session; the receiving side validates them before use.

use serde::{Deserialize, Serialize};

/// Bytes of a Unix path or name, relative to the session root ("" is the root itself).
pub type PathBytes = Vec<u8>;

/// A 128-bit truncated BLAKE3 hash of one block (the whole-file digest catches collisions).
pub type BlockHash = u128;

/// First frame on every connection, sent by the side that dialled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Hello {
    /// Open a new session; this connection becomes its control connection.
    New(NewSession),
    /// Add a data connection to a session opened before. `proof` is HMAC-SHA256 keyed with
    /// the session's secret over this connection's TLS exported keying material (zeros
    /// without TLS), so the secret never crosses the wire and the proof is worthless on any
    /// other connection.
    Join { session: u64, proof: [u8; 32] },
    /// One connection of a volume replication link (`cutover serve` to `cutover serve`):
    /// the dialling daemon's client certificate is its identity, which the volume's peer
    /// entry pins. Connection `index` of `count` (0 is the control connection) of link
    /// `link`, a random id the dialler chose.
    Peer(PeerHello),
}

/// See [`Hello::Peer`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerHello {
    pub version: u32,
    pub volume: String,
    pub link: u64,
    pub index: u32,
    pub count: u32,
    /// The dialler's certificate fingerprint (SHA-256), as it claims it. Believed only on
    /// the daemon's local peer socket, which an ssh relay reaches after ssh authenticated
    /// the dialler; over TLS the client certificate says who it is.
    pub sender: [u8; 32],
}

/// What the client asks for when it opens a session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewSession {
    pub version: u32,
    /// Module name on a daemon (ignored by the in-process transport).
    pub module: String,
    /// Path below the module root, as the user wrote it (trailing slash significant).
    pub path: String,
    /// The role the server plays: `Sender` for a pull, `Receiver` for a push.
    pub server_role: Role,
    pub options: SyncOptions,
    /// Proof of a module token: HMAC-SHA256 keyed with the token over this connection's TLS
    /// exported keying material, so the token never crosses the wire and the proof is
    /// worthless on any other connection.
    pub token_proof: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// The server's answer to a `Hello`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Welcome {
    Accepted { session: u64, secret: [u8; 16] },
    Refused { reason: String },
}

/// Options that both ends of a session must agree on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncOptions {
    pub delete: bool,
    pub max_delete: Option<u64>,
    pub dry_run: bool,
    pub whole_file: bool,
    pub checksum: bool,
    pub inplace: bool,
    pub fsync: bool,
    pub hard_links: bool,
    pub xattrs: bool,
    /// Set owner and group (numeric ids); on by default when the receiver runs as root.
    pub owners: bool,
    pub compress: bool,
    /// Bytes per second for everything the sending side sends (`--bwlimit`).
    pub bwlimit: Option<u64>,
    /// Include/exclude rules in order; the first that matches decides.
    pub filters: Vec<FilterRule>,
    /// rsync semantics: `SRC` (no slash) copies the directory itself, `SRC/` its contents.
    pub copy_dir_itself: bool,
    /// Only the paths of a list (`--files-from`) are walked: a listed directory with
    /// everything beneath it, and the directories on the way to a listed path (`implied` in
    /// `FileList`). `--delete` acts only beneath listed directories. In a pull the receiver
    /// streams the list to the sender (`MorePaths`, `Paths`).
    pub files_from: bool,
    /// With `files_from`: a listed path the source lacks ends the session with an error
    /// instead of being reported (`ListedProblem`) and skipped.
    pub files_from_strict: bool,
    /// The source is a volume tracked by its daemon, and the sender knows which blocks
    /// were written since this destination's last pass: a volume entry whose target
    /// exists with the same size is answered `Need::Changed` (only those blocks travel,
    /// neither side reads the rest); any other entry is decided as usual.
    pub changed_blocks: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FilterRule {
    Include(String),
    Exclude(String),
}

/// One scanned file-system object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub path: PathBytes,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Permission bits (including setuid/setgid/sticky), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: Vec<Xattr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A further name of a file listed earlier in this session (`-H`).
    HardLink {
        #[serde(with = "serde_bytes")]
        first: PathBytes,
    },
    Fifo,
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
    /// A block device or image synchronised as a volume: written in place, never renamed.
    Volume,
}

/// The receiver's decision for one entry of a `FileList`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Need {
    /// Identical already (or filtered out on the receiver).
    Skip,
    /// Content identical, metadata applied by the receiver itself; nothing to send.
    Meta,
    /// Created by the receiver from the entry alone (directory, symlink, hard link, node).
    Created,
    /// Send all bytes.
    Full,
    /// A `Signature` of kind positional follows; send what differs by position.
    Positional,
    /// A `Signature` of kind chunks follows; send chunks the receiver lacks.
    Chunks,
    /// The receiver cannot take this entry; the reason comes in a `FileDone`.
    Refused,
    /// Only in a dry run with `checksum`: the receiver has a file of the same size; a
    /// positional `Signature` of it follows, the sender compares it with its own content and
    /// answers `Same` or `Differs`. `meta`: the metadata differs (so equal content still
    /// means a metadata change).
    Compare { meta: bool },
    /// The receiver's file has the new size: a positional `Signature` of it follows, and the
    /// sender sends what differs, or `Same` when nothing does. Only then is it known whether
    /// the file changes, so neither side itemises or counts it before. `meta`: the metadata
    /// differs (an unchanged content is then a metadata change).
    Verify { meta: bool },
    /// Only with `SyncOptions::changed_blocks`, for a volume whose target has the
    /// volume's size: the sender sends the blocks written since the destination's last
    /// pass (data frames at their offsets, written in place) and a `FileEnd` with an
    /// all-zero digest; no signature, no whole-file digest, nothing else is read.
    Changed,
}

/// Hashes the receiver has of its basis file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Signature {
    /// Hashes of consecutive `block`-sized pieces of the basis, from offset 0.
    Positional {
        basis_size: u64,
        block: u32,
        #[serde(with = "crate::packed::block_hashes")]
        hashes: Vec<BlockHash>,
    },
    /// FastCDC chunks of the basis in order: (length, hash).
    Chunks {
        basis_size: u64,
        avg: u32,
        #[serde(with = "crate::packed::chunk_list")]
        chunks: Vec<(u32, u64)>,
    },
    /// The basis could not be read; the sender sends everything.
    Unavailable,
}

/// A range of the basis file copied to the new file by the receiver.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyOp {
    pub src: u64,
    pub len: u64,
    pub dst: u64,
}

/// A small file sent whole within one frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SmallFile {
    pub id: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub digest: [u8; 32],
}

/// Outcome of one file on the receiver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FileResult {
    Written {
        literal: u64,
        copied: u64,
    },
    /// The receiver failed; `retry` says the sender may send it again in full.
    Failed {
        reason: String,
        retry: bool,
    },
}

/// Counts the receiver reports at the end of a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReceiverReport {
    pub entries_deleted: u64,
    pub errors: Vec<String>,
    /// `--max-delete` was exceeded: nothing was deleted.
    pub delete_limit_hit: Option<u64>,
}

/// Messages after the handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    // ---- sender to receiver
    /// Entries with consecutive ids starting at `first_id`, in scan order.
    FileList {
        batch: u64,
        first_id: u64,
        entries: Vec<Entry>,
        /// Entries listed again (changed while read, failed): not part of the directory walk.
        rescan: bool,
        /// With `files_from`: indexes (into `entries`) of directories listed only because a
        /// listed path lies beneath them. They are created and given their metadata (the
        /// root's is left alone), but they are no scope of `--delete`: what else the
        /// destination has in them stays.
        implied: Vec<u32>,
    },
    /// No more `FileList` batches, and every file has been answered with a `FileDone`: the
    /// receiver creates hard links, deletes, sets directory metadata and sends its `Report`.
    EndOfList {
        batches: u64,
        entries: u64,
    },
    /// Ask for positional hashes of `block`-sized pieces covering `ranges` (offset, length).
    HashRequest {
        id: u64,
        block: u32,
        ranges: Vec<(u64, u64)>,
    },
    /// Counted towards `FileEnd::frames`.
    Copy {
        id: u64,
        ops: Vec<CopyOp>,
    },
    /// Counted towards `FileEnd::frames`.
    Data {
        id: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A run of zero bytes; the receiver leaves a hole. Counted towards `FileEnd::frames`.
    Zero {
        id: u64,
        offset: u64,
        len: u64,
    },
    SmallFiles {
        files: Vec<SmallFile>,
    },
    /// Everything for file `id` has been sent in `frames` counted frames.
    FileEnd {
        id: u64,
        size: u64,
        frames: u64,
        digest: [u8; 32],
    },
    /// The receiver's basis already holds exactly this content: apply metadata only.
    Same {
        id: u64,
    },
    /// Answer to `Need::Compare` (dry run with `checksum`): the content of file `id` differs
    /// from the receiver's. (`Same` is the answer when it does not.)
    Differs {
        id: u64,
    },
    /// The sender gave up on file `id` (vanished, unreadable); discard its partial state.
    FileAbort {
        id: u64,
        reason: String,
    },
    /// With `files_from`: the receiver streams the list, the sender asks for each chunk. At
    /// most one request is unanswered, so neither side ever holds more than a few chunks.
    MorePaths,
    /// A path of the `--files-from` list that was not sent: not in the source (`missing`), or
    /// refused (it leads through a symlink). The receiver reports it (in a pull, the sender
    /// is the remote side, whose reports nobody reads).
    ListedProblem {
        #[serde(with = "serde_bytes")]
        path: PathBytes,
        missing: bool,
        reason: String,
    },

    // ---- receiver to sender
    Needs {
        batch: u64,
        needs: Vec<Need>,
    },
    Signature {
        id: u64,
        signature: Signature,
    },
    Hashes {
        id: u64,
        block: u32,
        #[serde(with = "crate::packed::block_hashes")]
        hashes: Vec<BlockHash>,
    },
    FileDone {
        id: u64,
        result: FileResult,
    },
    /// The next chunk of the `--files-from` list, the answer to one `MorePaths`: paths
    /// relative to the session root, normalised (no `.`, `..` or empty components; "" is the
    /// root itself), in walk order (component by component, byte-wise) and without
    /// duplicates. `last`: the list ends with this chunk.
    Paths {
        paths: Vec<serde_bytes::ByteBuf>,
        last: bool,
    },
    /// Entries deleted (or, with `--dry-run`, that would be).
    Deleted {
        paths: Vec<serde_bytes::ByteBuf>,
    },
    Report(ReceiverReport),
    /// Payload bytes the receiver has taken in so far (the sender's signal for auto connections).
    Progress {
        received: u64,
    },

    // ---- either way
    /// Fatal error; the peer stops the session.
    Fatal {
        message: String,
    },
    /// Sent on an otherwise quiet control connection, so that the peer's idle timeout (and
    /// any NAT or firewall on the way) tells a slow peer from a dead one.
    KeepAlive,
}

impl Msg {
    /// Messages that count towards a file's `FileEnd::frames`.
    pub fn counted_file(&self) -> Option<u64> {
        match self {
            Msg::Copy { id, .. } | Msg::Data { id, .. } | Msg::Zero { id, .. } => Some(*id),
            _ => None,
        }
    }
}
