//! The sending side: walk the source, stream the file list, turn the receiver's needs into
//! jobs on the shared queue, run delta descents, detect files that change while read.

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

/// Copy ops per `Copy` frame.
const COPY_OPS_PER_FRAME: usize = 4096;

pub struct Source {
    pub root: PathBuf,
    /// A directory the source must stay beneath (a daemon module): content is opened through
    /// it, never by path alone.
    pub jail: Option<PathBuf>,
    /// With `SyncOptions::files_from`: this side's list (push, local). `None` in a pull: the
    /// receiver streams its list.
    pub paths: Option<Arc<PathList>>,
}

impl Source {
    /// A source named by the local user: no jail beyond their own rights.
    pub fn local(root: PathBuf) -> Self {
        Source {
            root,
            jail: None,
            paths: None,
        }
    }
}

/// A job on the shared queue: whatever one data connection sends next.
enum Job {
    Small(Vec<SmallJob>),
    Segment {
        file: Arc<BigFile>,
        index: u64,
    },
    Literal {
        file: Arc<BigFile>,
        offset: u64,
        len: u64,
    },
    Copy {
        id: u64,
        ops: Vec<CopyOp>,
    },
}

struct SmallJob {
    id: u64,
    item: ScanItem,
}

/// A large file being sent in segments or literals by many connections at once.
struct BigFile {
    id: u64,
    display: String,
    file: File,
    size: u64,
    scan: (Entry, LocalInfo),
    leaves: Mutex<Vec<[u8; 32]>>,
    /// Segments not yet sent (full transfers only).
    remaining: AtomicU64,
    failed: AtomicBool,
    /// Size, mtime and ctime by `fstat` when opened (None for volumes): compared after the
    /// read to tell a consistent read from a torn one.
    opened: Option<Stamp>,
    /// A read came back short: the file shrank while it was read.
    short: AtomicBool,
}

/// (size, mtime, mtime ns, ctime, ctime ns) of an open file.
type Stamp = (u64, i64, i64, i64, i64);

fn stamp(md: &std::fs::Metadata) -> Stamp {
    (
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
    )
}

/// Why what was read of `big` is no version the file ever had, if it is not: the file
/// changed (or shrank) between its opening and now. Such a read must not replace the
/// receiver's complete previous version; a read that differs from the scan but stayed put
/// while it was read is a real version and may.
fn torn(big: &BigFile) -> Option<String> {
    if big.short.load(Ordering::Acquire) {
        return Some("shrank while it was read".into());
    }
    let opened = big.opened?;
    let now = big.file.metadata().ok().map(|m| stamp(&m))?;
    (now != opened).then(|| "changed while it was read".into())
}

/// Give up on a file that changed while it was read: the receiver keeps its previous
/// version (and the partial file, the basis of the next attempt); the main loop lists the
/// file again, or reports it as changed once its retries are spent.
async fn abort_changed(ctx: &Ctx, id: u64, reason: String) {
    let _ = ctx
        .internal
        .send(Internal::Changed {
            id,
            reason: reason.clone(),
        })
        .await;
    let _ = ctx.control.send(Msg::FileAbort { id, reason }).await;
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

/// What the walk hands the main loop.
pub(crate) enum ScanMsg {
    /// Entries in walk order, with the indexes of implied directories (`--files-from`).
    Batch(Vec<ScanItem>, Vec<u32>),
    Error(cofs::FsError),
    /// A listed path that was not sent (`--files-from`): missing from the source, or refused.
    Listed {
        path: Vec<u8>,
        missing: bool,
        reason: String,
    },
    /// The walk cannot go on; the session ends with this error.
    Fatal(String),
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
    let mut remote_list = None;
    if opts.files_from {
        match listed::start(&source, &opts, filter, scan_tx) {
            Ok(r) => remote_list = r,
            Err(e) => return fail(&control.tx, e).await,
        }
    } else {
        let walker = Walker::new(&source.root, opts.copy_dir_itself, filter, opts.xattrs);
        let walker = match (walker, &source.jail) {
            (Ok(w), Some(jail)) => w.confined_to(jail),
            (w, _) => w,
        };
        let walker = match walker {
            Ok(w) => w,
            Err(e) => return fail(&control.tx, e.into()).await,
        };
        std::thread::spawn(move || scan(walker, scan_tx));
    }

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

    let problems = Problems::default();
    let mut summary = Summary::default();
    let mut next_id: u64 = 0;
    let mut next_batch: u64 = 0;
    let mut in_flight: usize = 0;
    let mut scan_done = false;
    let mut end_sent = false;
    let mut batches: HashMap<u64, Vec<(u64, ScanItem)>> = HashMap::new();
    let mut awaiting_sig: HashMap<u64, Transfer> = HashMap::new();
    let mut transfers: HashMap<u64, Transfer> = HashMap::new();
    let mut small: Vec<SmallJob> = Vec::new();
    let mut small_bytes: usize = 0;
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut rescans: Vec<(ScanItem, u32)> = Vec::new();
    let mut retries_by_id: HashMap<u64, u32> = HashMap::new();
    // Dry run with --checksum: files waiting for the receiver's hashes (`Need::Compare`),
    // then being compared: (item, metadata differs).
    let mut compare_wait: HashMap<u64, (ScanItem, bool)> = HashMap::new();
    let mut comparing: HashMap<u64, (ScanItem, bool)> = HashMap::new();

    let result: Result<(), EngineError> = loop {
        // Re-list files that must be sent again, one small batch each.
        for (item, retries) in rescans.drain(..) {
            let entry = match recapture(&item) {
                Ok(e) => e,
                Err(e) => {
                    problems.changed(&*events, display(&item.entry.path), e);
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            let batch = next_batch;
            next_batch += 1;
            retries_by_id.insert(id, retries);
            let msg = Msg::FileList {
                batch,
                first_id: id,
                entries: vec![entry.entry.clone()],
                rescan: true,
                implied: Vec::new(),
            };
            batches.insert(batch, vec![(id, entry)]);
            in_flight += 1;
            if ctx.control.send(msg).await.is_err() {
                break;
            }
        }
        if scan_done
            && !end_sent
            && batches.is_empty()
            && awaiting_sig.is_empty()
            && transfers.is_empty()
            && small.is_empty()
            && compare_wait.is_empty()
            && comparing.is_empty()
        {
            end_sent = true;
            let _ = ctx
                .control
                .send(Msg::EndOfList {
                    batches: next_batch,
                    entries: next_id,
                })
                .await;
        }
        tokio::select! {
            scanned = scan_rx.recv(), if !scan_done && in_flight < IN_FLIGHT_ENTRIES => {
                match scanned {
                    None => { scan_done = true; stats.scan_done.store(true, Ordering::Relaxed); }
                    Some(ScanMsg::Error(e)) => {
                        match e {
                            cofs::FsError::Vanished { path } => problems.changed(&*events, path.display().to_string(), "vanished during the scan".into()),
                            other => problems.error(&*events, other.to_string()),
                        }
                    }
                    Some(ScanMsg::Listed { path, missing, reason }) => {
                        listed::report(&*events, &problems, &mut summary, &path, missing, reason.clone());
                        let problem = Msg::ListedProblem { path, missing, reason };
                        if ctx.control.send(problem).await.is_err() {
                            break Err(EngineError::Peer(CONTROL_CLOSED.into()));
                        }
                    }
                    Some(ScanMsg::Fatal(why)) => break Err(EngineError::Local(why)),
                    Some(ScanMsg::Batch(items, implied)) => {
                        let batch = next_batch;
                        next_batch += 1;
                        let mut entries = Vec::with_capacity(items.len());
                        let mut listed = Vec::with_capacity(items.len());
                        for mut item in items {
                            if opts.hard_links && item.entry.kind == EntryKind::File && item.local.nlink > 1 {
                                let key = (item.local.dev, item.local.ino);
                                match links.get(&key) {
                                    Some(first) => item.entry.kind = EntryKind::HardLink { first: first.clone() },
                                    None => { links.insert(key, item.entry.path.clone()); }
                                }
                            }
                            Stats::add(&stats.entries_scanned, 1);
                            entries.push(item.entry.clone());
                            listed.push((next_id, item));
                            next_id += 1;
                        }
                        in_flight += listed.len();
                        let first_id = listed.first().map(|(id, _)| *id).unwrap_or(next_id);
                        batches.insert(batch, listed);
                        if ctx.control.send(Msg::FileList { batch, first_id, entries, rescan: false, implied }).await.is_err() {
                            break Err(EngineError::Peer(CONTROL_CLOSED.into()));
                        }
                    }
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
                match msg {
                    Msg::Needs { batch, needs } => {
                        let Some(listed) = batches.remove(&batch) else {
                            break Err(EngineError::Protocol(format!("needs for unknown batch {batch}")));
                        };
                        if listed.len() != needs.len() {
                            break Err(EngineError::Protocol(format!("batch {batch}: {} needs for {} entries", needs.len(), listed.len())));
                        }
                        let mut violation = None;
                        for ((id, item), need) in listed.into_iter().zip(needs) {
                            let retries = retries_by_id.remove(&id).unwrap_or(0);
                            let path = ItemPath::new(&item.entry.path);
                            let size = item.entry.size;
                            match need {
                                Need::Skip => in_flight -= 1,
                                Need::Compare { meta } => {
                                    if !(opts.dry_run && opts.checksum) {
                                        violation = Some(format!("{path}: a comparison outside a dry run with --checksum"));
                                        break;
                                    }
                                    compare_wait.insert(id, (item, meta));
                                }
                                Need::Meta | Need::Created => {
                                    summary.files_meta_only += u64::from(need == Need::Meta);
                                    events.event(Event::Item { path, action: if need == Need::Meta { Action::Meta } else { Action::Create }, size });
                                    in_flight -= 1;
                                }
                                Need::Refused => {
                                    transfers.insert(id, Transfer::new(item, retries, None));
                                }
                                Need::Full | Need::Positional | Need::Chunks | Need::Verify { .. } => {
                                    let verify = match need { Need::Verify { meta } => Some(meta), _ => None };
                                    let action = if need == Need::Full { Action::Send } else { Action::Delta };
                                    if verify.is_none() {
                                        events.event(Event::Item { path, action, size });
                                    }
                                    Stats::add(&stats.files_to_send, 1);
                                    Stats::add(&stats.bytes_to_send, size);
                                    if opts.dry_run {
                                        in_flight -= 1;
                                        continue;
                                    }
                                    let t = Transfer::new(item, retries, verify);
                                    if need != Need::Full {
                                        awaiting_sig.insert(id, t);
                                    } else if size <= SMALL_FILE {
                                        small_bytes += size as usize;
                                        small.push(SmallJob { id, item: t.item.clone() });
                                        transfers.insert(id, t);
                                        if small_bytes >= SMALL_BATCH_BYTES {
                                            small_bytes = 0;
                                            if small_tx.send(std::mem::take(&mut small)).is_err() { break; }
                                        }
                                    } else {
                                        let item = t.item.clone();
                                        transfers.insert(id, t);
                                        spawn_full(ctx.clone(), id, item);
                                    }
                                }
                            }
                        }
                        if let Some(v) = violation {
                            break Err(EngineError::Protocol(v));
                        }
                        if !small.is_empty() {
                            small_bytes = 0;
                            if small_tx.send(std::mem::take(&mut small)).is_err() {
                                break Err(EngineError::Local("data connections are gone".into()));
                            }
                        }
                    }
                    Msg::Signature { id, signature } if compare_wait.contains_key(&id) => {
                        if let Some((item, meta)) = compare_wait.remove(&id) {
                            comparing.insert(id, (item.clone(), meta));
                            tokio::spawn(compare(ctx.clone(), id, item, signature));
                        }
                    }
                    Msg::Signature { id, signature } => {
                        let Some(t) = awaiting_sig.remove(&id) else {
                            break Err(EngineError::Protocol(format!("signature for unknown file {id}")));
                        };
                        let item = t.item.clone();
                        transfers.insert(id, t);
                        tokio::spawn(run_delta(ctx.clone(), id, item, signature));
                    }
                    Msg::Hashes { id, hashes, .. } => {
                        let waiter = ctx.hash_waiters.lock().ok().and_then(|mut w| w.remove(&id));
                        if let Some(w) = waiter { let _ = w.send(hashes); }
                    }
                    Msg::FileDone { id, result } => {
                        // Notes about this file were queued before the frames that led to this
                        // answer; `select!` may pick the answer first, so take them now.
                        let mut fatal = None;
                        while let Ok(note) = internal_rx.try_recv() {
                            match take_note(&mut transfers, note) {
                                Ok(None) => {}
                                // A comparison's answer is not about this file: back in line.
                                Ok(Some(other)) => {
                                    let tx = ctx.internal.clone();
                                    tokio::spawn(async move { let _ = tx.send(other).await; });
                                }
                                Err(e) => fatal = fatal.or(Some(e)),
                            }
                        }
                        if let Some(e) = fatal {
                            break Err(e);
                        }
                        let Some(t) = transfers.remove(&id) else {
                            break Err(EngineError::Protocol(format!("completion for unknown file {id}")));
                        };
                        in_flight -= 1;
                        let path = display(&t.item.entry.path);
                        match result {
                            FileResult::Written { .. } if t.unchanged && t.verify.is_some() => {
                                if t.verify == Some(true) {
                                    summary.files_meta_only += 1;
                                    events.event(Event::Item { path: ItemPath::new(&t.item.entry.path), action: Action::Meta, size: t.item.entry.size });
                                }
                                if let Some(reason) = t.changed {
                                    if t.retries < LIVE_RETRIES {
                                        rescans.push((t.item, t.retries + 1));
                                    } else {
                                        problems.changed(&*events, path, reason);
                                    }
                                }
                            }
                            FileResult::Written { literal, copied } => {
                                if t.verify.is_some() {
                                    events.event(Event::Item { path: ItemPath::new(&t.item.entry.path), action: Action::Delta, size: t.item.entry.size });
                                }
                                summary.files_sent += 1;
                                summary.bytes_logical += t.item.entry.size;
                                summary.bytes_literal += literal;
                                summary.bytes_copied += copied;
                                Stats::add(&stats.files_done, 1);
                                Stats::add(&stats.bytes_done, t.item.entry.size);
                                events.event(Event::FileDone { path: path.clone(), literal, copied });
                                if let Some(reason) = t.changed {
                                    if t.retries < LIVE_RETRIES {
                                        rescans.push((t.item, t.retries + 1));
                                    } else {
                                        problems.changed(&*events, path, reason);
                                    }
                                }
                            }
                            FileResult::Failed { reason, retry } => {
                                if let Some((why, vanished)) = t.failed {
                                    if vanished { problems.changed(&*events, path, why); } else { problems.error(&*events, why); }
                                } else if let Some(changed) = t.changed {
                                    // Aborted here because it changed while read (the receiver
                                    // kept its previous version), or refused for what a change
                                    // made of it: try again, then report it as changed.
                                    if t.retries < LIVE_RETRIES {
                                        rescans.push((t.item, t.retries + 1));
                                    } else {
                                        problems.changed(&*events, path, changed);
                                    }
                                } else if retry && t.retries < LIVE_RETRIES {
                                    rescans.push((t.item, t.retries + 1));
                                } else if retry && source_moved(&t.item) {
                                    problems.changed(&*events, path, format!("kept changing while it was sent ({reason})"));
                                } else {
                                    problems.error(&*events, reason);
                                }
                            }
                        }
                    }
                    Msg::Paths { paths, last } => {
                        if let Err(v) = RemoteList::deliver(&mut remote_list, paths, last) {
                            break Err(EngineError::Protocol(v));
                        }
                    }
                    Msg::Progress { received } => stats.peer_received.store(received, Ordering::Relaxed),
                    Msg::Deleted { paths } => {
                        for p in paths {
                            events.event(Event::Item { path: ItemPath::new(&p), action: Action::Delete, size: 0 });
                        }
                    }
                    Msg::Report(r) => {
                        summary.deleted = r.entries_deleted;
                        summary.delete_limit_hit = r.delete_limit_hit;
                        for e in r.errors { problems.error(&*events, e); }
                        if end_sent { break Ok(()); }
                        break Err(EngineError::Protocol("report before the end of the list".into()));
                    }
                    Msg::Fatal { message } => break Err(EngineError::Peer(message)),
                    other => break Err(EngineError::Protocol(format!("unexpected message from the receiver: {}", name(&other)))),
                }
            }
            Some(note) = internal_rx.recv() => {
                match take_note(&mut transfers, note) {
                    Ok(None) => {}
                    Ok(Some(Internal::Compared { id, same, error })) => {
                        let Some((item, meta)) = comparing.remove(&id) else { continue };
                        in_flight -= 1;
                        if let Some(e) = error { problems.error(&*events, e); }
                        let (path, size) = (ItemPath::new(&item.entry.path), item.entry.size);
                        let answer = if same { Msg::Same { id } } else { Msg::Differs { id } };
                        if ctx.control.send(answer).await.is_err() {
                            break Err(EngineError::Transport(format!("the {CONTROL_CLOSED}")));
                        }
                        if !same {
                            events.event(Event::Item { path, action: Action::Delta, size });
                            Stats::add(&stats.files_to_send, 1);
                            Stats::add(&stats.bytes_to_send, size);
                        } else if meta {
                            summary.files_meta_only += 1;
                            events.event(Event::Item { path, action: Action::Meta, size });
                        }
                    }
                    Ok(Some(_)) => {}
                    Err(e) => break Err(e),
                }
            }
        }
    };

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

/// Apply a note from this side's own tasks to the files in flight; a note that ends the session comes back as its error, and
/// one this cannot apply (a comparison's answer) comes back as it is.
fn take_note(
    transfers: &mut HashMap<u64, Transfer>,
    note: Internal,
) -> Result<Option<Internal>, EngineError> {
    match note {
        Internal::Changed { id, reason } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.changed = Some(reason);
            }
        }
        Internal::Unchanged { id } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.unchanged = true;
            }
        }
        Internal::Failed {
            id,
            reason,
            vanished,
        } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.failed = Some((reason, vanished));
            }
        }
        Internal::Fatal(message) => return Err(EngineError::Local(message)),
        Internal::Lost(message) => return Err(EngineError::Transport(message)),
        compared @ Internal::Compared { .. } => return Ok(Some(compared)),
    }
    Ok(None)
}

/// Whether a file's metadata moved since it was listed (for a retry that failed for good:
/// a source that keeps changing is reported as changed, not as an error).
fn source_moved(item: &ScanItem) -> bool {
    match std::fs::symlink_metadata(&item.abs) {
        Ok(md) => moved(&(item.entry.clone(), item.local), &md).is_some(),
        Err(_) => true,
    }
}

async fn fail(control: &mpsc::Sender<Msg>, e: EngineError) -> Result<Summary, EngineError> {
    let _ = control
        .send(Msg::Fatal {
            message: e.for_peer(),
        })
        .await;
    Err(e)
}

fn scan(walker: Walker, tx: mpsc::Sender<ScanMsg>) {
    let mut batch = Vec::with_capacity(LIST_BATCH);
    for item in walker {
        match item {
            Ok(i) => batch.push(i),
            Err(e) => {
                if tx.blocking_send(ScanMsg::Error(e)).is_err() {
                    return;
                }
            }
        }
        if batch.len() >= LIST_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(LIST_BATCH));
            if tx.blocking_send(ScanMsg::Batch(full, Vec::new())).is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(ScanMsg::Batch(batch, Vec::new()));
    }
}

/// Stat a listed file again for a rescan.
fn recapture(item: &ScanItem) -> Result<ScanItem, String> {
    let md = std::fs::symlink_metadata(&item.abs).map_err(|e| format!("{e}"))?;
    let mut entry = cofs::meta::capture(
        item.entry.path.clone(),
        &item.abs,
        &md,
        !item.entry.xattrs.is_empty(),
    )
    .map_err(|e| e.to_string())?;
    if item.entry.kind == EntryKind::Volume {
        entry.kind = EntryKind::Volume;
        entry.size = item.entry.size;
    }
    Ok(item.restated(entry, LocalInfo::of(&md)))
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

/// Why a file no longer looks as it did when scanned, if it moved.
fn moved(scan: &(Entry, LocalInfo), now: &std::fs::Metadata) -> Option<String> {
    let (e, l) = scan;
    if e.kind == EntryKind::Volume {
        return None;
    }
    if now.size() != e.size {
        return Some(format!(
            "size changed from {} to {} while it was read",
            e.size,
            now.size()
        ));
    }
    if now.mtime() != e.mtime_sec || now.mtime_nsec() != i64::from(e.mtime_nsec) {
        return Some("modified while it was read".into());
    }
    if now.ctime() != l.ctime_sec || now.ctime_nsec() != l.ctime_nsec {
        return Some("changed (ctime) while it was read".into());
    }
    None
}

fn open_source(item: &ScanItem) -> Result<File, (String, bool)> {
    item.open().map_err(|e| {
        let vanished = e.kind() == std::io::ErrorKind::NotFound;
        let why = if vanished {
            format!("{}: vanished before it could be read", item.abs.display())
        } else {
            format!("{}: cannot read: {e}", item.abs.display())
        };
        (why, vanished)
    })
}

/// Read up to `len` bytes at `offset`; short only at end of file. Reads into uninitialised
/// capacity: zero-filling every 1 MiB segment first cost a memset plus the kernel clearing
/// fresh pages, ~12% of the sending side's CPU in a loopback profile.
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if buf.len() < len / 2 {
        // Do not carry a mostly empty allocation through the queues.
        buf.shrink_to_fit();
    }
    Ok(buf)
}

async fn abort(ctx: &Ctx, id: u64, reason: String, vanished: bool) {
    let _ = ctx
        .internal
        .send(Internal::Failed {
            id,
            reason: reason.clone(),
            vanished,
        })
        .await;
    let _ = ctx.control.send(Msg::FileAbort { id, reason }).await;
}

fn open_big(id: u64, item: &ScanItem) -> Result<BigFile, (String, bool)> {
    let file = open_source(item)?;
    let volume = item.entry.kind == EntryKind::Volume;
    let opened = if volume {
        None
    } else {
        let md = file
            .metadata()
            .map_err(|e| (format!("{}: {e}", item.abs.display()), false))?;
        Some(stamp(&md))
    };
    let size = match opened {
        Some((size, ..)) => size,
        None => item.entry.size,
    };
    Ok(BigFile {
        id,
        display: display(&item.entry.path),
        file,
        size,
        scan: (item.entry.clone(), item.local),
        leaves: Mutex::new(Vec::new()),
        remaining: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        opened,
        short: AtomicBool::new(false),
    })
}

/// Queue every segment of a file the receiver does not have at all.
fn spawn_full(ctx: Arc<Ctx>, id: u64, item: ScanItem) {
    tokio::spawn(async move {
        let opened = tokio::task::spawn_blocking(move || open_big(id, &item)).await;
        let big = match opened {
            Ok(Ok(b)) => Arc::new(b),
            Ok(Err((why, vanished))) => return abort(&ctx, id, why, vanished).await,
            Err(e) => return abort(&ctx, id, e.to_string(), false).await,
        };
        let segments = big.size.div_ceil(LEAF as u64);
        if let Ok(mut l) = big.leaves.lock() {
            *l = vec![[0u8; 32]; segments as usize];
        }
        if segments == 0 {
            let _ = finish_full(&ctx, &big).await;
            return;
        }
        big.remaining.store(segments, Ordering::Release);
        for index in 0..segments {
            let job = Job::Segment {
                file: big.clone(),
                index,
            };
            if ctx.jobs.send(job).await.is_err() {
                return;
            }
        }
    });
}

/// After the last segment of a full transfer: check for live changes, send `FileEnd`.
async fn finish_full(ctx: &Ctx, big: &BigFile) -> Result<(), EngineError> {
    if let Some(reason) = torn(big) {
        abort_changed(ctx, big.id, reason).await;
        return Ok(());
    }
    let leaves = big.leaves.lock().map(|l| l.clone()).unwrap_or_default();
    let digest = chunk::file_digest(big.size, &leaves);
    if let Ok(md) = big.file.metadata() {
        if let Some(reason) = moved(&big.scan, &md) {
            let _ = ctx
                .internal
                .send(Internal::Changed { id: big.id, reason })
                .await;
        }
    }
    let frames = leaves.len() as u64;
    ctx.control
        .send(Msg::FileEnd {
            id: big.id,
            size: big.size,
            frames,
            digest,
        })
        .await
        .map_err(|_| EngineError::Local(CONTROL_CLOSED.into()))
}

/// Accept data connections as they come and run a writer on each.
async fn accept_data(
    mut data: mpsc::Receiver<Conn>,
    jobs: async_channel::Receiver<Job>,
    ctx: Arc<Ctx>,
    limiter: Option<Arc<RateLimiter>>,
    compress: bool,
) {
    // Aborting this task aborts the writers with it.
    let mut writers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            conn = data.recv() => match conn {
                Some(c) => { writers.spawn(data_writer(c, jobs.clone(), ctx.clone(), limiter.clone(), compress)); }
                None => break,
            },
            _ = wait_closed(&jobs) => break,
        }
    }
    drop(ctx);
    while writers.join_next().await.is_some() {}
}

async fn wait_closed(jobs: &async_channel::Receiver<Job>) {
    while !jobs.is_closed() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn data_writer(
    conn: Conn,
    jobs: async_channel::Receiver<Job>,
    ctx: Arc<Ctx>,
    limiter: Option<Arc<RateLimiter>>,
    compress: bool,
) {
    let Conn { reader, mut writer } = conn;
    // Nothing is expected back on a data connection; reading notices when it goes away.
    let (drain_tx, _drain_rx) = mpsc::channel(1);
    tokio::spawn(forward(reader, drain_tx, None));
    let compress = compress && writer.is_framed();
    while let Ok(job) = jobs.recv().await {
        let (msgs, done) = materialize(job, &ctx).await;
        for msg in msgs {
            if let Some(l) = &limiter {
                l.take(wire_size(&msg)).await;
            }
            if let Err(e) = writer.send(msg, compress).await {
                let _ = ctx
                    .internal
                    .send(Internal::Lost(format!("data connection failed: {e}")))
                    .await;
                return;
            }
        }
        if let Some(big) = done {
            if big.remaining.fetch_sub(1, Ordering::AcqRel) == 1
                && !big.failed.load(Ordering::Acquire)
            {
                if let Err(e) = finish_full(&ctx, &big).await {
                    let _ = ctx.internal.send(Internal::Fatal(e.to_string())).await;
                }
            }
        }
    }
    writer.close().await;
}

fn wire_size(msg: &Msg) -> u64 {
    match msg {
        Msg::Data { data, .. } => data.len() as u64 + 32,
        Msg::SmallFiles { files } => files.iter().map(|f| f.data.len() as u64 + 48).sum(),
        Msg::Copy { ops, .. } => ops.len() as u64 * 24,
        _ => 32,
    }
}

/// Turn a job into the frames to send; `Some(file)` when a full-transfer segment was sent.
async fn materialize(job: Job, ctx: &Arc<Ctx>) -> (Vec<Msg>, Option<Arc<BigFile>>) {
    match job {
        Job::Copy { id, ops } => (vec![Msg::Copy { id, ops }], None),
        Job::Small(list) => {
            let out = tokio::task::spawn_blocking(move || read_small(list)).await;
            let Ok((files, notes)) = out else {
                return (Vec::new(), None);
            };
            for n in notes {
                match n {
                    SmallNote::Changed(id, reason) => {
                        let _ = ctx.internal.send(Internal::Changed { id, reason }).await;
                    }
                    SmallNote::Torn(id, reason) => abort_changed(ctx, id, reason).await,
                    SmallNote::Failed(id, reason, vanished) => {
                        abort(ctx, id, reason, vanished).await
                    }
                }
            }
            let sent: u64 = files.iter().map(|f| f.data.len() as u64).sum();
            Stats::add(&ctx.stats.literal_bytes, sent);
            if files.is_empty() {
                (Vec::new(), None)
            } else {
                (vec![Msg::SmallFiles { files }], None)
            }
        }
        Job::Segment { file, index } => {
            let big = file.clone();
            let offset = index * LEAF as u64;
            let len = (big.size - offset).min(LEAF as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let data = read_at(&big.file, offset, len)?;
                let hash = chunk::leaf_hash(&data);
                if let Ok(mut l) = big.leaves.lock() {
                    if let Some(slot) = l.get_mut(index as usize) {
                        *slot = hash;
                    }
                }
                Ok::<_, std::io::Error>(data)
            })
            .await;
            match read {
                Ok(Ok(data)) => {
                    if data.len() < len {
                        // The file shrank under us: `finish_full` gives it up instead of ending
                        // it (the receiver keeps its previous version), and it is listed again.
                        note_shrank(ctx, &file).await;
                    }
                    Stats::add(&ctx.stats.literal_bytes, data.len() as u64);
                    (vec![data_or_zero(file.id, offset, data)], Some(file))
                }
                Ok(Err(e)) => {
                    if !file.failed.swap(true, Ordering::AcqRel) {
                        abort(
                            ctx,
                            file.id,
                            format!("{}: read failed: {e}", file.display),
                            false,
                        )
                        .await;
                    }
                    (Vec::new(), Some(file))
                }
                Err(_) => (Vec::new(), Some(file)),
            }
        }
        Job::Literal { file, offset, len } => {
            let big = file.clone();
            let read =
                tokio::task::spawn_blocking(move || read_at(&big.file, offset, len as usize)).await;
            match read {
                Ok(Ok(data)) => {
                    if data.len() < len as usize {
                        // The file shrank after its delta was planned (and `FileEnd` sent):
                        // the receiver refuses the short file, and this note makes that a
                        // change to retry, not an error.
                        note_shrank(ctx, &file).await;
                    }
                    Stats::add(&ctx.stats.literal_bytes, data.len() as u64);
                    (vec![data_or_zero(file.id, offset, data)], None)
                }
                _ => {
                    if !file.failed.swap(true, Ordering::AcqRel) {
                        abort(
                            ctx,
                            file.id,
                            format!("{}: read failed", file.display),
                            false,
                        )
                        .await;
                    }
                    (Vec::new(), None)
                }
            }
        }
    }
}

/// `file` gave fewer bytes than its size promised: mark it short (so it is given up, not
/// ended) and report it as changed, to be listed again.
async fn note_shrank(ctx: &Ctx, file: &BigFile) {
    file.short.store(true, Ordering::Release);
    let _ = ctx
        .internal
        .send(Internal::Changed {
            id: file.id,
            reason: "shrank while it was read".into(),
        })
        .await;
}

fn data_or_zero(id: u64, offset: u64, data: Vec<u8>) -> Msg {
    if chunk::is_zero(&data) {
        Msg::Zero {
            id,
            offset,
            len: data.len() as u64,
        }
    } else {
        Msg::Data { id, offset, data }
    }
}

enum SmallNote {
    Changed(u64, String),
    /// Torn on every attempt: nothing of it is sent.
    Torn(u64, String),
    Failed(u64, String, bool),
}

/// Read a batch of small files whole, checking each stayed put while it was read.
fn read_small(list: Vec<SmallJob>) -> (Vec<SmallFile>, Vec<SmallNote>) {
    let mut files = Vec::with_capacity(list.len());
    let mut notes = Vec::new();
    for job in list {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let file = match open_source(&job.item) {
                Ok(f) => f,
                Err((why, vanished)) => {
                    notes.push(SmallNote::Failed(job.id, why, vanished));
                    break;
                }
            };
            let before = file.metadata();
            // Read one byte more than fstat says, to notice a file that grew meanwhile.
            let want = before
                .as_ref()
                .map(|m| m.size().min(SMALL_FILE * 4) as usize + 1)
                .unwrap_or(0);
            let data = read_at(&file, 0, want);
            let after = file.metadata();
            let (data, before, after) = match (data, before, after) {
                (Ok(d), Ok(b), Ok(a)) => (d, b, a),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    notes.push(SmallNote::Failed(
                        job.id,
                        format!("{}: {e}", job.item.abs.display()),
                        false,
                    ));
                    break;
                }
            };
            let scan = (job.item.entry.clone(), job.item.local);
            // Unstable: the file moved while it was read, so the bytes are no version of it.
            let unstable = before.mtime_nsec() != after.mtime_nsec()
                || before.mtime() != after.mtime()
                || before.size() != after.size()
                || data.len() as u64 != after.size();
            let torn = moved(&scan, &before).is_some() || unstable;
            if torn && attempt <= LIVE_RETRIES as usize {
                continue;
            }
            if unstable {
                // What was read never existed as such: the receiver keeps what it has.
                notes.push(SmallNote::Torn(
                    job.id,
                    "kept changing while it was read".into(),
                ));
                break;
            }
            if let Some(reason) = moved(&scan, &after) {
                notes.push(SmallNote::Changed(job.id, reason));
            }
            let leaves: Vec<[u8; 32]> = data.chunks(LEAF).map(chunk::leaf_hash).collect();
            let digest = chunk::file_digest(data.len() as u64, &leaves);
            files.push(SmallFile {
                id: job.id,
                data,
                digest,
            });
            break;
        }
    }
    (files, notes)
}

/// Compute and send a delta for one file against the receiver's signature.
async fn run_delta(ctx: Arc<Ctx>, id: u64, item: ScanItem, signature: Signature) {
    let opened = tokio::task::spawn_blocking(move || open_big(id, &item)).await;
    let big = match opened {
        Ok(Ok(b)) => Arc::new(b),
        Ok(Err((why, vanished))) => return abort(&ctx, id, why, vanished).await,
        Err(e) => return abort(&ctx, id, e.to_string(), false).await,
    };
    let planned = match signature {
        Signature::Positional {
            basis_size, hashes, ..
        } => positional(&ctx, &big, basis_size, hashes).await,
        Signature::Chunks { avg, chunks, .. } => {
            let b = big.clone();
            tokio::task::spawn_blocking(move || plan_cdc(&b, avg, &chunks))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
        Signature::Unavailable => {
            let b = big.clone();
            tokio::task::spawn_blocking(move || plan_cdc(&b, 1 << 20, &[]))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    let plan = match planned {
        Ok(p) => p,
        Err(why) => return abort(&ctx, id, format!("{}: {why}", big.display), false).await,
    };
    // The plan's digest and hashes come from a read that a writer crossed: not a version.
    if let Some(reason) = torn(&big) {
        return abort_changed(&ctx, id, reason).await;
    }
    if let Some(reason) = plan.moved {
        let _ = ctx.internal.send(Internal::Changed { id, reason }).await;
    }
    if plan.same {
        // Noted before the answer, so the completion finds it (see the `FileDone` arm).
        let _ = ctx.internal.send(Internal::Unchanged { id }).await;
        let _ = ctx.control.send(Msg::Same { id }).await;
        return;
    }
    let mut frames = 0u64;
    let mut copies = Vec::new();
    for op in plan.ops {
        match op {
            DeltaOp::Copy { src, len, dst } => {
                copies.push(CopyOp { src, len, dst });
                if copies.len() == COPY_OPS_PER_FRAME {
                    frames += 1;
                    let ops = std::mem::take(&mut copies);
                    if ctx.jobs.send(Job::Copy { id, ops }).await.is_err() {
                        return;
                    }
                }
            }
            DeltaOp::Literal { dst, len } => {
                frames += 1;
                let job = Job::Literal {
                    file: big.clone(),
                    offset: dst,
                    len,
                };
                if ctx.jobs.send(job).await.is_err() {
                    return;
                }
            }
        }
    }
    if !copies.is_empty() {
        frames += 1;
        if ctx.jobs.send(Job::Copy { id, ops: copies }).await.is_err() {
            return;
        }
    }
    let _ = ctx
        .control
        .send(Msg::FileEnd {
            id,
            size: big.size,
            frames,
            digest: plan.digest,
        })
        .await;
}

/// A dry run with --checksum: compare the source's content with the receiver's hashes of
/// its file (`Need::Compare`) and tell the main loop whether they are the same. A file that
/// cannot be read counts as differing (and is reported).
async fn compare(ctx: Arc<Ctx>, id: u64, item: ScanItem, signature: Signature) {
    let r = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let Signature::Positional {
            basis_size,
            block,
            hashes,
        } = signature
        else {
            return Ok(false); // the receiver could not read its file
        };
        let big = open_big(id, &item).map_err(|(why, _)| why)?;
        if basis_size != big.size || block as usize != LEAF {
            return Ok(false);
        }
        let (leaves, _) = read_leaves(&big).map_err(|e| format!("{}: {e}", big.display))?;
        Ok(leaves.len() == hashes.len()
            && leaves
                .iter()
                .map(chunk::truncate)
                .eq(hashes.iter().copied()))
    })
    .await;
    let (same, error) = match r {
        Ok(Ok(same)) => (same, None),
        Ok(Err(e)) => (false, Some(e)),
        Err(e) => (false, Some(e.to_string())),
    };
    let _ = ctx
        .internal
        .send(Internal::Compared { id, same, error })
        .await;
}

struct Plan {
    ops: Vec<DeltaOp>,
    digest: [u8; 32],
    same: bool,
    moved: Option<String>,
}

/// Read the whole source once: digest leaves (which are also the coarsest positional hashes).
fn read_leaves(big: &BigFile) -> Result<(Vec<[u8; 32]>, Option<String>), String> {
    let mut leaves = Vec::with_capacity(big.size.div_ceil(LEAF as u64) as usize);
    let mut off = 0u64;
    while off < big.size {
        let len = (big.size - off).min(LEAF as u64) as usize;
        let data = read_at(&big.file, off, len).map_err(|e| e.to_string())?;
        leaves.push(chunk::leaf_hash(&data));
        if data.len() < len {
            big.short.store(true, Ordering::Release);
            break;
        }
        off += len as u64;
    }
    let moved = big
        .file
        .metadata()
        .ok()
        .and_then(|md| moved(&big.scan, &md));
    Ok((leaves, moved))
}

/// Positional delta: compare 1 MiB hashes, then descend into the pieces that differ.
async fn positional(
    ctx: &Arc<Ctx>,
    big: &Arc<BigFile>,
    basis_size: u64,
    theirs: Vec<BlockHash>,
) -> Result<Plan, String> {
    let b = big.clone();
    let (leaves, moved) = tokio::task::spawn_blocking(move || read_leaves(&b))
        .await
        .map_err(|e| e.to_string())??;
    let digest = chunk::file_digest(big.size, &leaves);
    let ours: Vec<BlockHash> = leaves.iter().map(chunk::truncate).collect();
    let common = big.size.min(basis_size);
    let same = big.size == basis_size && ours == theirs;
    if same {
        return Ok(Plan {
            ops: Vec::new(),
            digest,
            same,
            moved,
        });
    }
    // Ranges (offset, len) still differing at the current level, within the common length.
    let mut diff: Vec<(u64, u64)> = chunk::differing_blocks(&ours, &theirs)
        .into_iter()
        .map(|i| i as u64 * LEAF as u64)
        .filter(|&o| o < common)
        .map(|o| (o, (common - o).min(LEAF as u64)))
        .collect();
    for &level in &LEVELS[1..] {
        if diff.is_empty() {
            break;
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = ctx.hash_waiters.lock() {
            w.insert(big.id, tx);
        }
        ctx.control
            .send(Msg::HashRequest {
                id: big.id,
                block: level,
                ranges: diff.clone(),
            })
            .await
            .map_err(|_| CONTROL_CLOSED.to_string())?;
        let b = big.clone();
        let ranges = diff.clone();
        let ours =
            tokio::task::spawn_blocking(move || hash_ranges(&b.file, &ranges, level as usize))
                .await
                .map_err(|e| e.to_string())??;
        let theirs = rx
            .await
            .map_err(|_| "the receiver did not answer a hash request".to_string())?;
        let blocks = blocks_of(&diff, level as u64);
        if theirs.len() != blocks.len() || ours.len() != blocks.len() {
            return Err(format!("hash count mismatch at {level}-byte level"));
        }
        diff = blocks
            .into_iter()
            .zip(ours.iter().zip(theirs.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(r, _)| r)
            .collect();
    }
    // Everything in the common part outside `diff` is copied; `diff` and the tail are literal.
    let mut ops = Vec::new();
    let mut co = OpCoalescer::new(LEAF as u64);
    let mut at = 0u64;
    for &(off, len) in &diff {
        if off > at {
            co.push(
                DeltaOp::Copy {
                    src: at,
                    len: off - at,
                    dst: at,
                },
                &mut ops,
            );
        }
        co.push(DeltaOp::Literal { dst: off, len }, &mut ops);
        at = off + len;
    }
    if common > at {
        co.push(
            DeltaOp::Copy {
                src: at,
                len: common - at,
                dst: at,
            },
            &mut ops,
        );
    }
    if big.size > common {
        co.push(
            DeltaOp::Literal {
                dst: common,
                len: big.size - common,
            },
            &mut ops,
        );
    }
    co.finish(&mut ops);
    Ok(Plan {
        ops,
        digest,
        same: false,
        moved,
    })
}

/// Split ranges into `block`-sized pieces (the last piece of a range may be short).
pub(crate) fn blocks_of(ranges: &[(u64, u64)], block: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let mut o = off;
        while o < off + len {
            let l = (off + len - o).min(block);
            out.push((o, l));
            o += l;
        }
    }
    out
}

/// Hashes of `block`-sized pieces of the given ranges of `file`, in order.
pub(crate) fn hash_ranges(
    file: &File,
    ranges: &[(u64, u64)],
    block: usize,
) -> Result<Vec<BlockHash>, String> {
    let block = block.max(1);
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let data = read_at(file, off, len as usize).map_err(|e| e.to_string())?;
        let mut hashes = chunk::block_hashes(&data, block);
        // A short read (the file shrank) still yields one hash per expected piece; zero
        // matches nothing real, so those pieces are sent.
        hashes.resize((len as usize).div_ceil(block), 0);
        out.extend(hashes);
    }
    Ok(out)
}

/// Content-defined delta: chunk the source, copy chunks the basis has, send the rest.
fn plan_cdc(big: &BigFile, avg: u32, basis: &[(u32, u64)]) -> Result<Plan, String> {
    let params = CdcParams::from_avg(avg);
    let index = ChunkIndex::new(basis);
    let mut chunker = chunk::StreamChunker::new(params);
    let mut digest = DigestBuilder::new();
    let mut chunks = Vec::new();
    let mut ops = Vec::new();
    let mut co = OpCoalescer::new(LEAF as u64);
    let mut off = 0u64;
    let emit = |chunks: &mut Vec<chunk::ChunkRef>, ops: &mut Vec<DeltaOp>, co: &mut OpCoalescer| {
        for c in chunks.drain(..) {
            let op = match index.lookup(c.len, c.hash) {
                Some(src) => DeltaOp::Copy {
                    src,
                    len: u64::from(c.len),
                    dst: c.offset,
                },
                None => DeltaOp::Literal {
                    dst: c.offset,
                    len: u64::from(c.len),
                },
            };
            co.push(op, ops);
        }
    };
    while off < big.size {
        let len = (big.size - off).min(LEAF as u64) as usize;
        let data = read_at(&big.file, off, len).map_err(|e| e.to_string())?;
        digest.update(&data);
        chunker.push(&data, &mut chunks);
        emit(&mut chunks, &mut ops, &mut co);
        if data.len() < len {
            big.short.store(true, Ordering::Release);
            break;
        }
        off += len as u64;
    }
    chunker.finish(&mut chunks);
    emit(&mut chunks, &mut ops, &mut co);
    co.finish(&mut ops);
    let moved = big
        .file
        .metadata()
        .ok()
        .and_then(|md| moved(&big.scan, &md));
    Ok(Plan {
        ops,
        digest: digest.finish(),
        same: false,
        moved,
    })
}
