//! `--files-from`: only the paths of a list are walked and compared.
//!
//! The side that has the list (the user's) reads it once into a [`PathList`], sorted into
//! walk order without duplicates (`list.rs`). The sender walks it (`walk.rs`): its own list in
//! a push or local run, and in a pull the receiver's, streamed on the control connection one
//! chunk per request (`MorePaths` → `Paths`): the sender asks only when its walk has room for
//! a chunk, so neither side holds more than a few chunks and the sender's main loop never
//! waits on the walk. Paths the sender could not send travel back as `ListedProblem`, so the
//! pulling side reports them too.

mod list;
mod walk;

pub use list::{is_within, parse_record, walk_order, ListError, PathCursor, PathList, SORT_BUDGET};
pub(crate) use walk::scan;

use crate::events::{Event, Events, Problems, Summary};
use crate::sender::ScanMsg;
use crate::{EngineError, Source};
use cofs::{Filter, FsError, Root};
use proto::{Msg, SyncOptions};
use serde_bytes::ByteBuf;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Why a listed path was skipped when the source lacks it (the event's reason, and what the
/// report counts as `files_from_missing`).
pub const LISTED_MISSING: &str = "listed in --files-from but not in the source";

/// Paths in one `Paths` chunk at most.
pub const LIST_CHUNK_PATHS: usize = 1000;
/// Bytes of paths in one `Paths` chunk, about (a chunk ends after the path that passes it).
pub const LIST_CHUNK_BYTES: usize = 256 << 10;
/// The longest path (`cofs::validate_rel`).
const MAX_PATH: usize = 4096;

/// Where the sender's walk takes its paths from.
pub(crate) enum Feed {
    /// This side's own list (push, local).
    Local(PathCursor),
    /// Chunks from the receiver (pull), handed over by the main loop; closed at the end.
    Remote {
        chunks: mpsc::Receiver<Vec<Vec<u8>>>,
        current: std::vec::IntoIter<Vec<u8>>,
    },
}

impl Feed {
    pub(crate) fn remote(chunks: mpsc::Receiver<Vec<Vec<u8>>>) -> Feed {
        Feed::Remote {
            chunks,
            current: Vec::new().into_iter(),
        }
    }

    /// The next path; blocks while a chunk is on its way.
    pub(crate) fn next(&mut self) -> Option<Result<Vec<u8>, walk::Stop>> {
        match self {
            Feed::Local(cursor) => cursor.next().map(|r| {
                r.map_err(|e| {
                    walk::Stop::Fatal(format!("--files-from: reading the sorted list: {e}"))
                })
            }),
            Feed::Remote { chunks, current } => loop {
                if let Some(p) = current.next() {
                    return Some(Ok(p));
                }
                *current = chunks.blocking_recv()?.into_iter();
            },
        }
    }
}

/// The sender's end of a list streamed from the receiver (pull).
pub(crate) struct RemoteList {
    /// To the walk; `None` once the last chunk came.
    walk: Option<mpsc::Sender<Vec<Vec<u8>>>>,
    /// Room for the chunk asked for, reserved before asking.
    asked: Option<mpsc::OwnedPermit<Vec<Vec<u8>>>>,
}

/// Chunks the walk holds besides the one it walks: one to walk next, one on its way.
const CHUNKS_AHEAD: usize = 2;

impl RemoteList {
    /// The list's two ends: this one for the main loop, the feed for the walk.
    pub(crate) fn new() -> (RemoteList, Feed) {
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let list = RemoteList {
            walk: Some(tx),
            asked: None,
        };
        (list, Feed::remote(rx))
    }

    /// Whether to ask for a chunk once the walk has room: the list goes on and no chunk is
    /// on its way.
    pub(crate) fn wants(list: &Option<RemoteList>) -> bool {
        list.as_ref()
            .is_some_and(|l| l.asked.is_none() && l.walk.as_ref().is_some_and(|w| !w.is_closed()))
    }

    /// Room in the walk for one more chunk (waits until there is).
    pub(crate) async fn room(list: &Option<RemoteList>) -> Option<mpsc::OwnedPermit<Vec<Vec<u8>>>> {
        let walk = list.as_ref()?.walk.clone()?;
        walk.reserve_owned().await.ok()
    }

    /// A chunk was asked for, with room kept for it.
    pub(crate) fn asked(&mut self, room: mpsc::OwnedPermit<Vec<Vec<u8>>>) {
        self.asked = Some(room);
    }

    /// Hand a chunk from the receiver to the walk; an error is a protocol violation.
    pub(crate) fn deliver(
        list: &mut Option<RemoteList>,
        paths: Vec<ByteBuf>,
        last: bool,
    ) -> Result<(), String> {
        let Some(this) = list.as_mut() else {
            return Err("a --files-from list in a session without one".into());
        };
        let Some(room) = this.asked.take() else {
            return Err("a chunk of the --files-from list that was not asked for".into());
        };
        // What an honest receiver sends at most (a chunk ends after the path that passes its
        // byte count), so that the chunks the walk holds stay within a few MiB.
        let bytes: usize = paths.iter().map(|p| p.len()).sum();
        if paths.len() > LIST_CHUNK_PATHS || bytes > LIST_CHUNK_BYTES + MAX_PATH {
            return Err(format!(
                "a chunk of the --files-from list with {} paths, {bytes} bytes (at most {LIST_CHUNK_PATHS}, {})",
                paths.len(),
                LIST_CHUNK_BYTES + MAX_PATH
            ));
        }
        room.send(paths.into_iter().map(ByteBuf::into_vec).collect());
        if last {
            // The walk ends after the chunks it has.
            this.walk = None;
        }
        Ok(())
    }
}

/// The receiver's end of a list it streams to the sender (pull): answers each `MorePaths`
/// with the next chunk, read off the runtime.
pub(crate) struct Feeder {
    requests: Option<mpsc::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Feeder {
    /// Serve `list` (if this side has one) on `control`; a failure to read it ends the
    /// session through `fatal`.
    pub(crate) fn start(
        list: Option<Arc<PathList>>,
        control: mpsc::Sender<Msg>,
        fatal: mpsc::Sender<EngineError>,
    ) -> Feeder {
        let Some(list) = list else {
            return Feeder {
                requests: None,
                task: None,
            };
        };
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            let mut cursor = Some(list.cursor());
            while rx.recv().await.is_some() {
                let Some(mut c) = cursor.take() else { return };
                let read = tokio::task::spawn_blocking(move || {
                    let chunk = c.chunk(LIST_CHUNK_PATHS, LIST_CHUNK_BYTES);
                    (c, chunk)
                })
                .await;
                let (paths, last) = match read {
                    Ok((c, Ok((paths, last)))) => {
                        if !last {
                            cursor = Some(c);
                        }
                        (paths, last)
                    }
                    Ok((_, Err(e))) => {
                        let why = format!("--files-from: reading the sorted list: {e}");
                        let _ = fatal.send(EngineError::Local(why)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = fatal.send(EngineError::Local(e.to_string())).await;
                        return;
                    }
                };
                let paths = paths.into_iter().map(ByteBuf::from).collect();
                if control.send(Msg::Paths { paths, last }).await.is_err() {
                    return;
                }
            }
        });
        Feeder {
            requests: Some(tx),
            task: Some(task),
        }
    }

    /// The sender asks for the next chunk; an error is a protocol violation.
    pub(crate) fn request(&self) -> Result<(), String> {
        let Some(requests) = &self.requests else {
            return Err("the sender asked for a --files-from list, and this side has none".into());
        };
        requests.try_send(()).map_err(|_| {
            "the sender asked for more of the --files-from list before its last chunk came, or after the list ended".into()
        })
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        // The task holds a sender of the control connection, which closes with the last.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Start the walk of a list on its own thread, beneath the source (which must be a
/// directory): of this side's own list, or of the receiver's (`source.paths` is `None`),
/// streamed; then this returns the main loop's end of the stream.
pub(crate) fn start(
    source: &Source,
    opts: &SyncOptions,
    filter: Arc<Filter>,
    tx: mpsc::Sender<ScanMsg>,
) -> Result<Option<RemoteList>, EngineError> {
    let not_dir = |e: FsError| {
        match e {
        FsError::Io { source: io, .. } if io.kind() == std::io::ErrorKind::NotADirectory => {
            EngineError::Local(format!(
                "{}: --files-from needs a directory as the source (the list's paths are relative to it)",
                source.root.display()
            ))
        }
        other => other.into(),
    }
    };
    let root = match &source.jail {
        None => Root::open(&source.root).map_err(not_dir)?,
        Some(jail) => {
            let rel = source.root.strip_prefix(jail).map_err(|_| {
                EngineError::Local(format!(
                    "{}: refused: not beneath {}",
                    source.root.display(),
                    jail.display()
                ))
            })?;
            Root::open(jail)?
                .beneath(rel.as_os_str().as_bytes())
                .map_err(not_dir)?
        }
    };
    let (remote, feed) = match source.paths.clone() {
        Some(list) => (None, Feed::Local(list.cursor())),
        None => {
            let (remote, feed) = RemoteList::new();
            (Some(remote), feed)
        }
    };
    let (xattrs, strict) = (opts.xattrs, opts.files_from_strict);
    std::thread::spawn(move || scan(root, filter, xattrs, strict, feed, tx));
    Ok(remote)
}

/// Report a listed path that was not sent, on whichever side reports the pass: a missing one
/// as an event and in `files_from_missing` (not an error: the others were copied, deletes
/// still happen), any other as an error of the pass.
pub(crate) fn report(
    events: &dyn Events,
    problems: &Problems,
    summary: &mut Summary,
    path: &[u8],
    missing: bool,
    reason: String,
) {
    if missing {
        summary.files_from_missing += 1;
        events.event(Event::Changed {
            path: crate::sender::display(path),
            reason,
        });
    } else {
        problems.error(events, reason);
    }
}
