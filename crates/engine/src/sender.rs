//! The sending side: walk the source, stream the file list, turn the receiver's needs into
//! jobs on the shared queue, run delta descents, detect files that change while read.

use crate::changed::{ChangedBlocks, MAX_PIECE};
use crate::events::{Action, Event, Events, ItemPath, Problems, Stats, Summary};
use crate::listed::{self, PathList, RemoteList};
use crate::session::{
    close_within, forward, peer_reason, spawn_control, Session, CLOSE_AFTER_ERROR, CONTROL_CLOSED,
};
use crate::{
    EngineError, IN_FLIGHT_ENTRIES, LIST_BATCH, LIVE_RETRIES, SMALL_BATCH_BYTES, SMALL_FILE,
};
use chunk::{BlockHash, CdcParams, ChunkIndex, DeltaOp, DigestBuilder, OpCoalescer, LEAF, LEVELS};
use cofs::{Filter, LocalInfo, ScanItem, Walker};
use net::{Conn, RateLimiter};
use proto::{CopyOp, Entry, EntryKind, FileResult, Msg, Need, Signature, SmallFile, SyncOptions};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

mod data;
mod delta;
mod done;
mod list;
mod needs;
mod read;
mod walk;

use data::*;
use delta::*;
use done::*;
use read::*;
use walk::*;

pub(crate) use delta::hash_ranges;
pub(crate) use walk::ScanMsg;

pub struct Source {
    pub root: PathBuf,
    /// A directory the source must stay beneath (a daemon module): content is opened through
    /// it, never by path alone.
    pub jail: Option<PathBuf>,
    /// With `SyncOptions::files_from`: this side's list (push, local). `None` in a pull: the
    /// receiver streams its list.
    pub paths: Option<Arc<PathList>>,
    /// A tracked volume (`volume:NAME`): the source root is its backing, listed as a
    /// volume, and these are the blocks written since the destination's last pass, sent
    /// alone when the receiver answers `Need::Changed`.
    pub changed: Option<Arc<ChangedBlocks>>,
}

impl Source {
    /// A source named by the local user: no jail beyond their own rights.
    pub fn local(root: PathBuf) -> Self {
        Source {
            root,
            jail: None,
            paths: None,
            changed: None,
        }
    }
}

enum Internal {
    Changed {
        id: u64,
        reason: String,
    },
    /// The delta found the receiver's file identical (`Same` is on its way).
    Unchanged {
        id: u64,
    },
    Failed {
        id: u64,
        reason: String,
        vanished: bool,
    },
    Fatal(String),
    /// A data connection broke: the session ends, and a rerun resumes.
    Lost(String),
    /// A dry run's comparison (`Need::Compare`) is done; `error` says why it could not read.
    Compared {
        id: u64,
        same: bool,
        error: Option<String>,
    },
}

struct Ctx {
    control: mpsc::Sender<Msg>,
    jobs: async_channel::Sender<Job>,
    internal: mpsc::Sender<Internal>,
    hash_waiters: Mutex<HashMap<u64, oneshot::Sender<Vec<BlockHash>>>>,
    stats: Arc<Stats>,
}

/// A file the receiver still has to confirm.
struct Transfer {
    item: ScanItem,
    retries: u32,
    changed: Option<String>,
    failed: Option<(String, bool)>,
    /// `Need::Verify { meta }`: itemised only at completion, as a change of content or of
    /// metadata (`meta`) or not at all.
    verify: Option<bool>,
    /// The delta found nothing to send.
    unchanged: bool,
}

impl Transfer {
    fn new(item: ScanItem, retries: u32, verify: Option<bool>) -> Self {
        Transfer {
            item,
            retries,
            changed: None,
            failed: None,
            verify,
            unchanged: false,
        }
    }
}

/// The main loop's books: what was listed and is still in flight, what the receiver owes an
/// answer for, and what must be listed again.
struct LoopState {
    ctx: Arc<Ctx>,
    opts: SyncOptions,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
    /// The hand-off of small-file batches to the job queue (see `run_sender`).
    small_tx: mpsc::UnboundedSender<Vec<SmallJob>>,
    problems: Problems,
    summary: Summary,
    next_id: u64,
    next_batch: u64,
    in_flight: usize,
    scan_done: bool,
    end_sent: bool,
    batches: HashMap<u64, Vec<(u64, ScanItem)>>,
    awaiting_sig: HashMap<u64, Transfer>,
    transfers: HashMap<u64, Transfer>,
    small: Vec<SmallJob>,
    small_bytes: usize,
    links: HashMap<(u64, u64), Vec<u8>>,
    rescans: Vec<(ScanItem, u32)>,
    retries_by_id: HashMap<u64, u32>,
    // Dry run with --checksum: files waiting for the receiver's hashes (`Need::Compare`),
    // then being compared: (item, metadata differs).
    compare_wait: HashMap<u64, (ScanItem, bool)>,
    comparing: HashMap<u64, (ScanItem, bool)>,
    /// From `Source::changed`: what a `Need::Changed` sends.
    changed: Option<Arc<ChangedBlocks>>,
}

impl LoopState {
    fn new(
        ctx: Arc<Ctx>,
        opts: SyncOptions,
        events: Arc<dyn Events>,
        stats: Arc<Stats>,
        small_tx: mpsc::UnboundedSender<Vec<SmallJob>>,
    ) -> Self {
        LoopState {
            ctx,
            opts,
            events,
            stats,
            small_tx,
            problems: Problems::default(),
            summary: Summary::default(),
            next_id: 0,
            next_batch: 0,
            in_flight: 0,
            scan_done: false,
            end_sent: false,
            batches: HashMap::new(),
            awaiting_sig: HashMap::new(),
            transfers: HashMap::new(),
            small: Vec::new(),
            small_bytes: 0,
            links: HashMap::new(),
            rescans: Vec::new(),
            retries_by_id: HashMap::new(),
            compare_wait: HashMap::new(),
            comparing: HashMap::new(),
            changed: None,
        }
    }

    /// The problems and the summary, once the loop is over; the rest (with its hold on the
    /// context, and so on the control connection) is dropped.
    fn finish(self) -> (Problems, Summary) {
        (self.problems, self.summary)
    }
}

pub async fn run_sender(
    session: Session,
    source: Source,
    opts: SyncOptions,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<Summary, EngineError> {
    let Session {
        control,
        data,
        limiter,
        idle_timeout,
        public_name,
    } = session;
    let mut control = spawn_control(control, idle_timeout, public_name);
    let filter = match Filter::new(&opts.filters) {
        Ok(f) => Arc::new(f),
        Err(e) => return fail(&control.tx, e.into()).await,
    };
    let (scan_tx, mut scan_rx) = mpsc::channel::<ScanMsg>(4);
    // With --files-from in a pull, the receiver's list, asked for chunk by chunk.
    let mut remote_list = match start_walk(&source, &opts, filter, scan_tx) {
        Ok(r) => r,
        Err(e) => return fail(&control.tx, e).await,
    };

    let (jobs_tx, jobs_rx) = async_channel::bounded::<Job>(64);
    let (internal_tx, mut internal_rx) = mpsc::channel(256);
    let ctx = Arc::new(Ctx {
        control: control.tx.clone(),
        jobs: jobs_tx,
        internal: internal_tx,
        hash_waiters: Mutex::new(HashMap::new()),
        stats: stats.clone(),
    });
    // The main loop must never wait on the job queue: it is the only reader of the control
    // connection, and a receiver blocked on sending completions stops draining data too.
    // Small-file batches go through an unbounded hand-off, bounded in practice by
    // IN_FLIGHT_ENTRIES (every job is an entry in flight).
    let (small_tx, mut small_rx) = mpsc::unbounded_channel::<Vec<SmallJob>>();
    let feeder_jobs = ctx.jobs.clone();
    tokio::spawn(async move {
        while let Some(list) = small_rx.recv().await {
            if feeder_jobs.send(Job::Small(list)).await.is_err() {
                return;
            }
        }
    });
    let writers = tokio::spawn(accept_data(
        data,
        jobs_rx,
        ctx.clone(),
        limiter,
        opts.compress,
    ));

    let mut st = LoopState::new(ctx.clone(), opts, events, stats.clone(), small_tx);
    st.changed = source.changed.clone();

    let result: Result<(), EngineError> = loop {
        st.relist().await;
        st.end_if_done().await;
        tokio::select! {
            scanned = scan_rx.recv(), if !st.scan_done && st.in_flight < IN_FLIGHT_ENTRIES => {
                if let Err(e) = st.on_scanned(scanned).await {
                    break Err(e);
                }
            }
            Some(room) = RemoteList::room(&remote_list), if RemoteList::wants(&remote_list) => {
                if ctx.control.send(Msg::MorePaths).await.is_err() {
                    break Err(EngineError::Peer(CONTROL_CLOSED.into()));
                }
                if let Some(r) = remote_list.as_mut() { r.asked(room); }
            }
            inbound = control.rx.recv() => {
                let msg = match inbound {
                    None => break Err(EngineError::Transport("the receiver closed the control connection".into())),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(m)) => m,
                };
                let handled = match msg {
                    Msg::Needs { batch, needs } => st.on_needs(batch, needs).await,
                    Msg::Signature { id, signature } => st.on_signature(id, signature),
                    Msg::Hashes { id, hashes, .. } => {
                        let waiter = ctx.hash_waiters.lock().ok().and_then(|mut w| w.remove(&id));
                        if let Some(w) = waiter { let _ = w.send(hashes); }
                        Ok(())
                    }
                    Msg::FileDone { id, result } => st.on_done(&mut internal_rx, id, result),
                    Msg::Paths { paths, last } => {
                        RemoteList::deliver(&mut remote_list, paths, last).map_err(EngineError::Protocol)
                    }
                    Msg::Progress { received } => {
                        stats.peer_received.store(received, Ordering::Relaxed);
                        Ok(())
                    }
                    Msg::Deleted { paths } => {
                        for p in paths {
                            st.events.event(Event::Item { path: ItemPath::new(&p), action: Action::Delete, size: 0 });
                        }
                        Ok(())
                    }
                    Msg::Report(r) => {
                        st.summary.deleted = r.entries_deleted;
                        st.summary.delete_limit_hit = r.delete_limit_hit;
                        for e in r.errors { st.problems.error(&*st.events, e); }
                        if st.end_sent { break Ok(()); }
                        break Err(EngineError::Protocol("report before the end of the list".into()));
                    }
                    Msg::Fatal { message } => break Err(EngineError::Peer(message)),
                    other => break Err(EngineError::Protocol(format!("unexpected message from the receiver: {}", name(&other)))),
                };
                if let Err(e) = handled {
                    break Err(e);
                }
            }
            Some(note) = internal_rx.recv() => {
                if let Err(e) = st.on_note(note).await {
                    break Err(e);
                }
            }
        }
    };

    let (problems, mut summary) = st.finish();
    ctx.jobs.close();
    let result = match result {
        Err(e) => Err(peer_reason(&mut control.rx, e).await),
        ok => ok,
    };
    if let Err(e) = &result {
        let _ = ctx
            .control
            .send(Msg::Fatal {
                message: e.for_peer(),
            })
            .await;
    }
    drop(ctx);
    drop(control.tx);
    if result.is_err() {
        // A stalled peer may never drain what the data writers are sending; they hold the
        // control writer open too. Stop them rather than wait.
        writers.abort();
        close_within(control.writer, CLOSE_AFTER_ERROR).await;
    } else {
        let _ = control.writer.await;
    }
    let _ = writers.await;
    result?;
    let (errors, changed) = problems.take();
    summary.entries_scanned = Stats::get(&stats.entries_scanned);
    summary.errors = errors;
    summary.changed = changed;
    Ok(summary)
}

async fn fail(control: &mpsc::Sender<Msg>, e: EngineError) -> Result<Summary, EngineError> {
    let _ = control
        .send(Msg::Fatal {
            message: e.for_peer(),
        })
        .await;
    Err(e)
}

pub(crate) fn display(path: &[u8]) -> String {
    if path.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

fn name(m: &Msg) -> &'static str {
    match m {
        Msg::FileList { .. } => "FileList",
        Msg::EndOfList { .. } => "EndOfList",
        Msg::Data { .. } => "Data",
        Msg::Copy { .. } => "Copy",
        Msg::Zero { .. } => "Zero",
        Msg::SmallFiles { .. } => "SmallFiles",
        Msg::FileEnd { .. } => "FileEnd",
        _ => "other",
    }
}
