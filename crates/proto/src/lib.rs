//! Wire protocol of cutover: the messages two peers exchange, the versioned handshake, and
//! the length-delimited framing (with per-frame zstd and a hard size limit).
//!
//! Nothing here touches files or decides what to transfer; it only says what can be said.

pub mod frame;
pub mod msg;
mod packed;

pub use frame::{
    FrameError, FrameReader, FrameWriter, WireCounter, MAX_FRAME, MAX_HANDSHAKE_FRAME,
};
pub use msg::*;

/// Bumped on every incompatible change of `msg`; checked in the handshake.
/// 3: `Need::Compare` and `Msg::Differs` (an exact dry run with `checksum`).
/// 4: `Need::Verify` (a same-size file is itemised only once it is known to differ).
/// 5: `Hello::Join` carries a proof bound to the joining connection instead of the secret.
/// 6: `--files-from`: `SyncOptions::files_from{,_strict}`, `FileList::implied`, `MorePaths`,
///    `Paths`, `ListedProblem`.
/// 7: changed-block passes of a tracked volume: `SyncOptions::changed_blocks`, `Need::Changed`.
pub const PROTOCOL_VERSION: u32 = 7;

/// How a refusal for another protocol version begins, so that a client can tell it from
/// other refusals (an ssh client then installs its own binary on the remote).
pub const VERSION_REFUSAL: &str = "protocol version ";
