//! What the embedding code hands the server: an [`Export`] (a named backend, its metadata
//! contexts and an optional write observer), and the two small traits through which it
//! takes part in serving: [`MetaContext`] (extra `NBD_CMD_BLOCK_STATUS` contexts such as
//! `cutover:dirty`) and [`WriteObserver`] (told of every write before and after it).
//!
//! Like [`Backend`], both traits are called from tokio's blocking pool and may block.

use crate::backend::Backend;
use crate::latency::LatencyHistogram;
use std::fmt;
use std::io;
use std::sync::Arc;

/// One export: what `NBD_OPT_LIST` lists and `NBD_OPT_GO` selects by `name`.
#[derive(Clone)]
pub struct Export {
    /// The name clients give (`nbd+unix:///NAME?socket=…`). The empty name selects the
    /// first export of the list (the protocol's "default export").
    pub name: String,
    /// Shown by `nbdinfo` and in `NBD_OPT_LIST`; empty for none.
    pub description: String,
    pub backend: Arc<dyn Backend>,
    /// Extra metadata contexts besides `base:allocation`, which is always offered.
    pub meta: Vec<Arc<dyn MetaContext>>,
    /// Told of every WRITE, WRITE_ZEROES and TRIM, and of every FLUSH.
    pub observer: Option<Arc<dyn WriteObserver>>,
    /// Refuse writes (`NBD_EPERM`) and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// How long its WRITE, WRITE_ZEROES and TRIM requests took (shared by the clones).
    pub write_latency: Arc<LatencyHistogram>,
}

impl Export {
    /// A writable export with no description, no extra contexts and no observer.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            backend,
            meta: Vec::new(),
            observer: None,
            read_only: false,
            write_latency: Arc::default(),
        }
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .field(
                "meta",
                &self.meta.iter().map(|m| m.name()).collect::<Vec<_>>(),
            )
            .field("observer", &self.observer.is_some())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// One run of a metadata context's answer: `length` bytes (nonzero) with `flags`, whose
/// meaning the context defines (for `cutover:dirty`: bit 0 = out of sync with a peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// A metadata context the embedding code supplies (cutover's dirty bitmap as
/// `cutover:dirty`). Clients select it by name with `NBD_OPT_SET_META_CONTEXT` and query it
/// with `NBD_CMD_BLOCK_STATUS`.
pub trait MetaContext: Send + Sync + 'static {
    /// Its full name, `namespace:leaf` (e.g. `cutover:dirty`); must not start with `base:`.
    fn name(&self) -> &str;

    /// The status of `offset..offset + length` (within the export) as consecutive extents
    /// from `offset`, at most `max` of them. Fewer is fine, so long as there is at least
    /// one: the client asks again from where the answer stopped. The server drops what
    /// goes past the requested range or the export's end, and answers `NBD_EIO` to an
    /// empty list or an error.
    fn extents(&self, offset: u64, length: u32, max: usize) -> io::Result<Vec<Extent>>;
}

/// What a write does to the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// NBD_CMD_WRITE: `data` holds the bytes.
    Data,
    /// NBD_CMD_WRITE_ZEROES: the range will read as zeroes.
    Zeroes,
    /// NBD_CMD_TRIM: the range may read as anything until written again.
    Trim,
}

/// One write, as a [`WriteObserver`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct WriteEvent<'a> {
    pub offset: u64,
    pub length: u64,
    pub kind: WriteKind,
    /// The bytes of a `Data` write (for replication); `None` for the other kinds.
    pub data: Option<&'a [u8]>,
    /// The client asked for the write to be durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// Told of every change to an export, in the order the server makes them for one request:
/// `before_write`, the backend's write (plus its flush for FUA), `after_write`, then the
/// reply (for a write done behind its reply, the reply comes right after `before_write`:
/// see [`WriteObserver::may_answer_early`]). Writes of different requests run concurrently; the observer gets no ordering
/// between them beyond what the client waited for.
pub trait WriteObserver: Send + Sync + 'static {
    /// Called before the range is touched; cutover records a cold extent in its activity
    /// log here. An error fails the request (`NBD_EIO` unless it maps to another value)
    /// and the write is not made.
    fn before_write(&self, write: &WriteEvent<'_>) -> io::Result<()>;

    /// Called after the backend's write finished (with its outcome) and, unless the write
    /// was answered early, before the reply is sent: blocking here holds the reply back
    /// (replication protocol C).
    fn after_write(&self, write: &WriteEvent<'_>, outcome: &io::Result<()>);

    /// Whether a WRITE without FUA may be answered once `before_write` recorded it, before
    /// it is made (the server's write-behind, see [`crate::Config::write_behind`]); its
    /// `after_write` still follows the write. False while the embedder must hold replies
    /// until `after_write` (replication protocol C). The default: true.
    fn may_answer_early(&self) -> bool {
        true
    }

    /// Called after a successful NBD_CMD_FLUSH made the backend durable, before the reply;
    /// an error fails the flush. The default does nothing.
    fn flushed(&self) -> io::Result<()> {
        Ok(())
    }
}
