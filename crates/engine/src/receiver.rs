//! The receiving side: compare each listed entry with the destination and answer what it
//! needs, build files from data and copy frames in partial files, verify the whole-file
//! digest, set metadata, rename; then hard links, deletes and directory metadata at the end.
//!
//! Resume: a partial file left by an interrupted run is used as the positional basis of the
//! next one, so only the pieces that never arrived are sent again, and it only ever becomes
//! the target after its digest matched.

use crate::apply::{copy_range, data_bytes, is_block_device, write_frame, Unwritten};
use crate::events::{Action, Event, Events, ItemPath, Problems, Stats, Summary};
use crate::sender::{display, hash_ranges};
use crate::session::{
    close_within, peer_reason, spawn_control, Session, CLOSE_AFTER_ERROR, CONTROL_CLOSED,
};
use crate::{EngineError, IN_FLIGHT_ENTRIES, SMALL_FILE};

/// Files a receiver tracks at once before it calls the sender broken: twice what an honest
/// sender ever has in flight. Bounds this side's memory for file state (~150 MiB at worst,
/// with 4 KiB paths).
const RECEIVER_FILES_LIMIT: usize = 2 * IN_FLIGHT_ENTRIES;
use chunk::{BlockHash, CdcParams, LEAF, LEVELS};
use cofs::meta::{self, ApplyOpts};
use cofs::partial::{is_internal, partial_name, temp_name};
use cofs::root::ParentCache;
use cofs::{join, validate_rel, Filter, Place, Root};
use net::Conn;
use proto::{
    CopyOp, Entry, EntryKind, FileResult, Msg, Need, ReceiverReport, Signature, SmallFile,
    SyncOptions,
};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{mpsc, Semaphore};

/// Where the received tree goes.
pub struct Destination {
    pub root: PathBuf,
    /// The user wrote a trailing slash: the destination is a directory even for a single file.
    pub is_dir_hint: bool,
    /// A directory the destination must stay beneath (a daemon module): the destination is
    /// opened and created through it, never by path alone.
    pub jail: Option<PathBuf>,
    /// The peer may create device nodes and write block devices here. A daemon allows it
    /// only for a module with `allow_devices`: a node for any device number would give the
    /// client the host's disks.
    pub devices: bool,
}

impl Destination {
    /// A destination named by the local user: no jail beyond their own rights.
    pub fn local(root: PathBuf, is_dir_hint: bool) -> Self {
        Destination {
            root,
            is_dir_hint,
            jail: None,
            devices: true,
        }
    }
}

/// The destination as the receiver resolves wire paths in it. Every object is reached
/// through a `Place` (parent directory held open beneath the root, last component never
/// followed), so no path from the peer and no symlink planted meanwhile leads outside.
struct Dest {
    root: PathBuf,
    is_dir_hint: bool,
    jail: Option<PathBuf>,
    /// Fixed by the first entry.
    layout: OnceLock<Layout>,
    /// Set when the destination cannot be written at all (another sync holds its lock, or it
    /// is not what the source needs, such as a file where a tree should go): every later
    /// entry is refused unseen and the session ends with this reason.
    halted: OnceLock<String>,
    /// Held for the session: one writer per destination.
    lock: OnceLock<cofs::DirLock>,
}

enum Layout {
    /// A tree, or a single file into an existing directory: wire paths beneath the root.
    Tree(Root),
    /// A single file whose target is the destination path itself.
    File(Place),
    /// A dry run into a destination that does not exist: nothing is there.
    Absent,
}

impl Dest {
    /// Fix the layout at the first entry; returns whether the destination directory was
    /// created just now.
    fn settle(&self, first: &Entry, dry: bool) -> Result<bool, String> {
        let open = |dir: &Path| match self.open_dir(dir, false) {
            Ok(r) => Ok(Some(r)),
            Err(_) if dry => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let mut created = false;
        let layout = if first.kind == EntryKind::Dir {
            // A directory never goes where something else stands: `sync dir/ afile` refuses
            // before writing anything, as rsync does (the root may be a symlink to a
            // directory: the user named it).
            if let Ok(md) = std::fs::symlink_metadata(&self.root) {
                if !self.root.is_dir() {
                    return Err(format!(
                        "{}: the destination is {}, and the source is a directory; name a directory or a path that does not exist yet",
                        self.root.display(),
                        meta::kind_name(&md)
                    ));
                }
            }
            // `sync src dst/` with `dst` missing: create it, as rsync does.
            if !dry && !self.root.is_dir() {
                self.open_dir(&self.root, true)
                    .map_err(|e| format!("cannot create destination directory: {e}"))?;
                created = true;
            }
            open(&self.root)?.map_or(Layout::Absent, Layout::Tree)
        } else if self.is_dir_hint || self.root.is_dir() {
            open(&self.root)?.map_or(Layout::Absent, Layout::Tree)
        } else {
            let parent = self
                .root
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = self
                .root
                .file_name()
                .ok_or_else(|| format!("{}: not a file name", self.root.display()))?;
            match open(parent)? {
                Some(r) => Layout::File(r.place(name.as_bytes()).map_err(|e| e.to_string())?),
                None => Layout::Absent,
            }
        };
        // A destination this process cannot write is one error, not one per file.
        let dir = match &layout {
            Layout::Tree(_) => Some(self.root.clone()),
            Layout::File(place) => place.shown().parent().map(Path::to_path_buf),
            Layout::Absent => None,
        };
        if let Some(dir) = dir.filter(|_| !dry) {
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            let access = rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK;
            if let Err(e) =
                rustix::fs::accessat(rustix::fs::CWD, &dir, access, rustix::fs::AtFlags::EACCESS)
            {
                return Err(format!(
                    "{}: cannot write into this directory ({}); check its permissions (or the mount) and run again",
                    dir.display(),
                    std::io::Error::from(e)
                ));
            }
        }
        // One writer per destination: a second sync would interleave with the first (and
        // each would delete what the other just wrote). A single-file destination locks its
        // directory.
        let attempt = match &layout {
            _ if dry => None,
            Layout::Tree(root) => Some(root.try_lock()),
            Layout::File(place) => Some(place.try_lock_parent()),
            Layout::Absent => None,
        };
        let _ = self.layout.set(layout);
        match attempt {
            None => Ok(created),
            Some(Ok(Some(lock))) => {
                let _ = self.lock.set(lock);
                Ok(created)
            }
            Some(Ok(None)) => {
                let why = format!(
                    "{}: {}; wait for it to finish (or stop it) and run again",
                    self.root.display(),
                    crate::BUSY_DESTINATION
                );
                Err(why)
            }
            Some(Err(e)) => Err(format!("{}: cannot lock: {e}", self.root.display())),
        }
    }

    /// Open a directory of the destination as a root, creating it when asked; beneath the
    /// jail when there is one.
    fn open_dir(&self, dir: &Path, create: bool) -> Result<Root, cofs::FsError> {
        let Some(jail) = &self.jail else {
            if create {
                std::fs::create_dir_all(dir).map_err(|e| cofs::FsError::io(dir, e))?;
            }
            return Root::open(dir);
        };
        let rel = dir
            .strip_prefix(jail)
            .map_err(|_| cofs::FsError::Unsupported {
                path: dir.to_path_buf(),
                reason: format!("refused: not beneath {}", jail.display()),
            })?;
        let rel = rel.as_os_str().as_bytes();
        let jail = Root::open(jail)?;
        if create {
            jail.create_dirs(rel)?;
        }
        jail.beneath(rel)
    }

    /// The place of a wire path.
    fn place(&self, rel: &[u8]) -> Result<Place, String> {
        self.place_cached(rel, &mut ParentCache::default())
    }

    fn place_cached(&self, rel: &[u8], cache: &mut ParentCache) -> Result<Place, String> {
        match self.layout.get() {
            Some(Layout::Tree(root)) => root.place_cached(rel, cache).map_err(|e| e.to_string()),
            Some(Layout::File(place)) => Ok(place.clone()),
            Some(Layout::Absent) | None => Err(format!(
                "{}: {}",
                self.shown(rel).display(),
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )),
        }
    }

    /// The path of a wire path as people read it (never used for access).
    fn shown(&self, rel: &[u8]) -> PathBuf {
        match self.layout.get() {
            Some(Layout::File(place)) => place.shown().to_path_buf(),
            _ => join(&self.root, rel),
        }
    }
}

/// Which file a delta is computed against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// The destination's current file.
    Target,
    /// The partial file an interrupted run left beside it.
    Partial,
}

/// A file being received. Its places are resolved again for each step rather than held, so
/// thousands of files in flight do not hold thousands of directory descriptors.
struct RFile {
    entry: Entry,
    shown: PathBuf,
    basis: Option<Basis>,
    /// Bytes go to the target itself (volumes, `--inplace`), not to a partial file beside it.
    in_place: bool,
    /// `work` was created empty by this run, so unwritten ranges already read as zeros.
    fresh: bool,
    out: Option<Arc<File>>,
    basis_file: Option<Arc<File>>,
    seen: u64,
    end: Option<(u64, u64, [u8; 32])>,
    literal: u64,
    copied: u64,
    /// Size of the basis when the file was listed: hash requests stay within it.
    basis_size: u64,
    /// Bytes the frames so far have written, zeroed or copied. An honest sender's frames
    /// cover the whole file, so a `FileEnd` claiming more is refused rather than read back
    /// (a terabyte of holes would otherwise cost a terabyte of hashing).
    covered: u64,
    /// Answered `Need::Verify { meta }`: whether the metadata differs, for the item reported
    /// when the sender finds the content the same.
    verify: Option<bool>,
}

struct Shared {
    dest: Dest,
    opts: SyncOptions,
    apply: ApplyOpts,
    files: Mutex<HashMap<u64, RFile>>,
    control: mpsc::Sender<Msg>,
    /// Bounds the hashing running at once and, through the control loop that waits for it,
    /// the hash requests a peer can have queued.
    hashing: Arc<Semaphore>,
    /// From `Destination::devices`.
    devices: bool,
    report: Mutex<ReceiverReport>,
    stats: Arc<Stats>,
    /// A dry run with `checksum`: files the sender is comparing (`Need::Compare`), with
    /// what to report when its answer comes: (path, size, metadata differs).
    compares: Mutex<HashMap<u64, (ItemPath, u64, bool)>>,
    /// Files whose last attempt in this pass failed here, by wire path, with the reason. In
    /// a pull this side reports the pass, and only it knows what it refused (a digest that
    /// did not match, a write that failed); a sender's retry that succeeds clears the entry.
    failed: Mutex<HashMap<Vec<u8>, String>>,
    /// Where this side reports (in a pull, the user's terminal).
    events: Arc<dyn Events>,
}

pub async fn run_receiver(
    session: Session,
    dest: Destination,
    opts: SyncOptions,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<Summary, EngineError> {
    let Session {
        control,
        data,
        idle_timeout,
        public_name,
        ..
    } = session;
    let mut control = spawn_control(control, idle_timeout, public_name);
    let owners = opts.owners;
    let shared = Arc::new(Shared {
        dest: Dest {
            root: dest.root.clone(),
            is_dir_hint: dest.is_dir_hint,
            jail: dest.jail.clone(),
            layout: OnceLock::new(),
            halted: OnceLock::new(),
            lock: OnceLock::new(),
        },
        apply: ApplyOpts {
            owners,
            xattrs: opts.xattrs,
        },
        opts: opts.clone(),
        files: Mutex::new(HashMap::new()),
        control: control.tx.clone(),
        hashing: Arc::new(Semaphore::new(2)),
        devices: dest.devices,
        report: Mutex::new(ReceiverReport::default()),
        stats: stats.clone(),
        compares: Mutex::new(HashMap::new()),
        failed: Mutex::new(HashMap::new()),
        events: events.clone(),
    });
    let filter = Filter::new(&opts.filters)?;
    if !opts.dry_run {
        if let Err(e) = prepare_root(&dest) {
            let _ = control
                .tx
                .send(Msg::Fatal {
                    message: e.to_string(),
                })
                .await;
            drop(control.tx);
            // `shared` holds a sender of the control writer too; the writer ends with the last.
            drop(shared);
            let _ = control.writer.await;
            return Err(e);
        }
    }
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<EngineError>(4);
    let ticker = tokio::spawn(report_progress(stats.clone(), control.tx.clone()));
    let readers = tokio::spawn(accept_data(data, shared.clone(), fatal_tx));

    let problems = Problems::default();
    let mut walk = WalkState::new(opts.delete, filter);
    let mut summary = Summary::default();

    let result: Result<(), EngineError> = loop {
        // A destination that cannot go on (its file system is full) ends the session at once,
        // with that one reason, instead of failing every file still on its way.
        if let Some(why) = shared.dest.halted.get() {
            break Err(EngineError::Local(why.clone()));
        }
        let msg = tokio::select! {
            m = control.rx.recv() => m,
            Some(f) = fatal_rx.recv() => break Err(f),
        };
        let msg = match msg {
            None => {
                break Err(EngineError::Transport(
                    "the sender closed the control connection".into(),
                ))
            }
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(m)) => m,
        };
        match msg {
            Msg::FileList {
                batch,
                first_id,
                entries,
                rescan,
            } => {
                // An honest sender keeps at most IN_FLIGHT_ENTRIES unfinished; a peer that
                // lists without ever sending would otherwise grow this side's memory at will.
                let in_flight =
                    lock(&shared.files).len() + lock(&shared.compares).len() + entries.len();
                if in_flight > RECEIVER_FILES_LIMIT {
                    break Err(EngineError::Protocol(format!(
                        "the sender has {in_flight} files in flight, more than the {RECEIVER_FILES_LIMIT} a receiver holds"
                    )));
                }
                summary.entries_scanned += if rescan { 0 } else { entries.len() as u64 };
                Stats::add(&stats.entries_scanned, entries.len() as u64);
                let mut needs = Vec::with_capacity(entries.len());
                let mut sig_jobs = Vec::new();
                let mut refused = Vec::new();
                if first_id.checked_add(entries.len() as u64).is_none() {
                    break Err(EngineError::Protocol(format!(
                        "file ids {first_id} + {} overflow",
                        entries.len()
                    )));
                }
                for (i, entry) in entries.into_iter().enumerate() {
                    let id = first_id + i as u64;
                    // A file listed again after it failed here may need nothing now.
                    let again = rescan.then(|| entry.path.clone());
                    let decided = walk.decide(&shared, id, entry, rescan);
                    match decided {
                        Ok((need, sig, item)) => {
                            if let (Some(path), Need::Skip | Need::Meta) = (&again, need) {
                                lock(&shared.failed).remove(path);
                            }
                            if let Some((path, action, size)) = item {
                                events.event(Event::Item { path, action, size });
                            }
                            if need == Need::Meta {
                                summary.files_meta_only += 1;
                            }
                            if let Some(s) = sig {
                                sig_jobs.push(s);
                            }
                            needs.push(need);
                        }
                        Err((need, message)) => {
                            // A halted destination is one error, the session's, not one per entry.
                            if shared.dest.halted.get().is_none() {
                                problems.error(&*events, message.clone());
                            }
                            needs.push(need);
                            if need == Need::Refused {
                                refused.push((id, message));
                            }
                        }
                    }
                }
                if let Some(why) = shared.dest.halted.get() {
                    break Err(EngineError::Local(why.clone()));
                }
                if shared
                    .control
                    .send(Msg::Needs { batch, needs })
                    .await
                    .is_err()
                {
                    break Err(EngineError::Peer(CONTROL_CLOSED.into()));
                }
                // Completions of refused entries only after the needs that list them.
                for (id, reason) in refused {
                    let _ = fail_file(&shared, id, reason).await;
                }
                for job in sig_jobs {
                    tokio::spawn(send_signature(shared.clone(), job));
                }
            }
            Msg::HashRequest { id, block, ranges } => {
                let basis_size = lock(&shared.files).get(&id).map(|f| f.basis_size);
                let expected = match hash_request_blocks(block, &ranges, basis_size) {
                    Ok(n) => n,
                    Err(why) => break Err(EngineError::Protocol(why)),
                };
                // Waiting here, not in the task, keeps at most two requests in memory.
                let Ok(permit) = shared.hashing.clone().acquire_owned().await else {
                    break Err(EngineError::Local("hashing stopped".into()));
                };
                tokio::spawn(answer_hashes(
                    shared.clone(),
                    permit,
                    (id, block, ranges),
                    expected,
                ));
            }
            Msg::FileEnd {
                id,
                size,
                frames,
                digest,
            } => {
                let ready = {
                    let mut files = lock(&shared.files);
                    match files.get_mut(&id) {
                        Some(f) => {
                            f.end = Some((frames, size, digest));
                            f.seen == frames
                        }
                        None => false,
                    }
                };
                if ready {
                    finish_file(shared.clone(), id, commit).await;
                }
            }
            Msg::Same { id } | Msg::Differs { id } if opts.dry_run => {
                // The sender's answer to a `Need::Compare`: only now is it known whether
                // the entry would change.
                let Some((path, size, meta)) = lock(&shared.compares).remove(&id) else {
                    break Err(EngineError::Protocol(format!(
                        "an answer for file {id}, which is not being compared"
                    )));
                };
                if matches!(msg, Msg::Differs { .. }) {
                    events.event(Event::Item {
                        path,
                        action: Action::Delta,
                        size,
                    });
                } else if meta {
                    summary.files_meta_only += 1;
                    events.event(Event::Item {
                        path,
                        action: Action::Meta,
                        size,
                    });
                }
            }
            Msg::Differs { id } => {
                break Err(EngineError::Protocol(format!(
                    "`Differs` for file {id} outside a dry run"
                )));
            }
            Msg::Same { id } => {
                // A verified file whose content is the same changed at most its metadata.
                let verified = lock(&shared.files)
                    .get(&id)
                    .and_then(|f| Some((f.verify?, ItemPath::new(&f.entry.path), f.entry.size)));
                if let Some((true, path, size)) = verified {
                    summary.files_meta_only += 1;
                    events.event(Event::Item {
                        path,
                        action: Action::Meta,
                        size,
                    });
                }
                finish_file(shared.clone(), id, |s, f| {
                    commit_same(s, f)
                        .map(|()| (0, 0))
                        .map_err(|reason| (reason, false))
                })
                .await;
            }
            Msg::FileAbort { id, reason } => {
                // A partial file, if any was written, stays: it is the next run's basis.
                lock(&shared.files).remove(&id);
                let _ = fail_file(&shared, id, reason).await;
            }
            Msg::EndOfList { .. } => {
                let open = lock(&shared.compares).len();
                if open > 0 {
                    break Err(EngineError::Protocol(format!(
                        "the list ended with {open} comparisons unanswered"
                    )));
                }
                // Every file has its completion by now (the sender waits for them all).
                let failed = std::mem::take(&mut *lock(&shared.failed));
                let mut failed: Vec<(Vec<u8>, String)> = failed.into_iter().collect();
                failed.sort();
                for (_, reason) in failed {
                    problems.error(&*events, reason);
                }
                let errors = !problems.errors.lock().map(|e| e.is_empty()).unwrap_or(true);
                let s = shared.clone();
                let ev = events.clone();
                let w = std::mem::replace(&mut walk, WalkState::empty());
                let finished =
                    tokio::task::spawn_blocking(move || w.finish(&s, &*ev, errors)).await;
                let report = {
                    let mut r = lock(&shared.report);
                    match finished {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => r.errors.push(e),
                        Err(e) => r.errors.push(e.to_string()),
                    }
                    r.clone()
                };
                summary.deleted = report.entries_deleted;
                summary.delete_limit_hit = report.delete_limit_hit;
                for e in &report.errors {
                    problems.error(&*events, e.clone());
                }
                let _ = shared.control.send(Msg::Report(report)).await;
                break Ok(());
            }
            Msg::Fatal { message } => break Err(EngineError::Peer(message)),
            other => {
                // Data frames may come on the control connection too (one-connection sessions).
                if let Err(e) = apply_data(&shared, other).await {
                    break Err(e);
                }
            }
        }
    };
    let result = match result {
        Err(e) => Err(peer_reason(&mut control.rx, e).await),
        ok => ok,
    };
    if let Err(e) = &result {
        let _ = shared
            .control
            .send(Msg::Fatal {
                message: e.for_peer(),
            })
            .await;
    }
    drop(control.tx);
    readers.abort();
    ticker.abort();
    // Dropping the last sender closes the control writer.
    drop(shared);
    if result.is_err() {
        close_within(control.writer, CLOSE_AFTER_ERROR).await;
    } else {
        let _ = control.writer.await;
    }
    result?;
    let (errors, changed) = problems.take();
    summary.errors = errors;
    summary.changed = changed;
    summary.files_sent = Stats::get(&stats.files_done);
    summary.bytes_logical = Stats::get(&stats.bytes_done);
    summary.bytes_literal = Stats::get(&stats.literal_bytes);
    summary.bytes_copied = Stats::get(&stats.copied_bytes);
    Ok(summary)
}

/// Tell the sender how much has arrived, so it can judge whether more connections help.
async fn report_progress(stats: Arc<Stats>, control: mpsc::Sender<Msg>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let received = Stats::get(&stats.literal_bytes);
        if received != last {
            last = received;
            if control.send(Msg::Progress { received }).await.is_err() {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn prepare_root(dest: &Destination) -> Result<(), EngineError> {
    // The destination's parent must exist (a typo should not create a tree elsewhere);
    // the destination itself is created when the source is a directory.
    let parent = dest
        .root
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(EngineError::Local(format!(
            "{}: {} is not a directory",
            dest.root.display(),
            parent.display()
        ))),
        Err(e) => Err(EngineError::Local(format!(
            "{}: destination's parent directory {}: {e}",
            dest.root.display(),
            parent.display()
        ))),
    }
}

/// Accept data connections and apply every frame that arrives on them. Aborting this task
/// aborts the readers too (they hold the control writer open through `Shared`), so a session
/// that ends in an error does not wait for a stalled peer to close its data connections.
async fn accept_data(
    mut data: mpsc::Receiver<Conn>,
    shared: Arc<Shared>,
    fatal: mpsc::Sender<EngineError>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(conn) = data.recv().await {
        let s = shared.clone();
        let f = fatal.clone();
        tasks.spawn(async move {
            let Conn { mut reader, writer } = conn;
            let _keep_open = writer;
            loop {
                match reader.recv().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = apply_data(&s, msg).await {
                            let _ = f.send(e).await;
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let why = format!("data connection failed: {e}");
                        let err = if e.is_transport() {
                            EngineError::Transport(why)
                        } else {
                            EngineError::Protocol(why)
                        };
                        let _ = f.send(err).await;
                        return;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Apply one data-plane frame.
async fn apply_data(shared: &Arc<Shared>, msg: Msg) -> Result<(), EngineError> {
    match msg {
        Msg::SmallFiles { files } => {
            // One blocking call for the whole frame: a thread hand-off per small file cost
            // more than writing it.
            let work: Vec<(RFile, SmallFile)> = {
                let mut map = lock(&shared.files);
                files
                    .into_iter()
                    .filter_map(|f| map.remove(&f.id).map(|rf| (rf, f)))
                    .collect()
            };
            let s = shared.clone();
            let done = tokio::task::spawn_blocking(move || {
                work.into_iter()
                    .map(|(rf, f)| {
                        let id = f.id;
                        let path = rf.entry.path.clone();
                        let result = match write_small(&s, rf, f) {
                            Ok(n) => FileResult::Written {
                                literal: n,
                                copied: 0,
                            },
                            Err((reason, retry)) => FileResult::Failed { reason, retry },
                        };
                        note_outcome(&s, path, &result);
                        (id, result)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| EngineError::Local(e.to_string()))?;
            for (id, result) in done {
                if shared.dest.halted.get().is_none() {
                    let _ = shared.control.send(Msg::FileDone { id, result }).await;
                }
            }
            halted(shared)
        }
        Msg::Data { .. } | Msg::Zero { .. } | Msg::Copy { .. } => {
            let Some(id) = msg.counted_file() else {
                return Ok(());
            };
            let covers = match &msg {
                Msg::Data { data, .. } => data.len() as u64,
                // A sender zeroes at most a leaf per frame; more would let one frame cost
                // the receiver a terabyte of writes into a device.
                Msg::Zero { len, .. } if *len > LEAF as u64 => {
                    return Err(EngineError::Protocol(format!(
                        "a zero frame of {len} bytes (at most {LEAF})"
                    )))
                }
                Msg::Zero { len, .. } => *len,
                Msg::Copy { ops, .. } => ops.iter().fold(0u64, |n, op| n.saturating_add(op.len)),
                _ => 0,
            };
            let opened = {
                let mut files = lock(&shared.files);
                match files.get_mut(&id) {
                    None => return Ok(()), // aborted or failed already
                    Some(f) => match open_work(&shared.dest, f) {
                        Ok(()) => Ok((f.out.clone(), f.basis_file.clone(), f.fresh, f.in_place)),
                        Err(reason) => {
                            note_failure(shared, &f.entry.path, &reason);
                            files.remove(&id);
                            Err(reason)
                        }
                    },
                }
            };
            let (out, basis, fresh, in_place) = match opened {
                Ok((Some(out), basis, fresh, in_place)) => (out, basis, fresh, in_place),
                Ok((None, ..)) => return Ok(()),
                Err(reason) => return fail_file(shared, id, reason).await,
            };
            let written = tokio::task::spawn_blocking(move || {
                write_frame(&out, basis.as_deref(), fresh, in_place, msg)
            })
            .await
            .map_err(|e| EngineError::Local(e.to_string()))?;
            let ready = {
                let mut files = lock(&shared.files);
                match (files.get_mut(&id), written) {
                    (None, _) => Ok(false),
                    (Some(f), Ok((lit, cop))) => {
                        f.seen += 1;
                        f.covered = f.covered.saturating_add(covers);
                        f.literal += lit;
                        f.copied += cop;
                        Stats::add(&shared.stats.literal_bytes, lit);
                        Stats::add(&shared.stats.copied_bytes, cop);
                        Ok(matches!(f.end, Some((frames, _, _)) if frames == f.seen))
                    }
                    (Some(_), Err(e)) => {
                        let pending = pending_bytes(&files);
                        let f = files.remove(&id);
                        let (shown, path) = f.map(|f| (f.shown, f.entry.path)).unwrap_or_default();
                        let reason = halt_if_full(shared, &e, || pending)
                            .unwrap_or_else(|| format!("{}: {e}", shown.display()));
                        note_failure(shared, &path, &reason);
                        Err(reason)
                    }
                }
            };
            let ready = match ready {
                Ok(r) => r,
                Err(reason) => return fail_file(shared, id, reason).await,
            };
            if ready {
                finish_file(shared.clone(), id, commit).await;
            }
            halted(shared)
        }
        other => Err(EngineError::Protocol(format!(
            "unexpected message on a data connection: {:?}",
            std::mem::discriminant(&other)
        ))),
    }
}

async fn fail_file(shared: &Shared, id: u64, reason: String) -> Result<(), EngineError> {
    halted(shared)?;
    let _ = shared
        .control
        .send(Msg::FileDone {
            id,
            result: FileResult::Failed {
                reason,
                retry: false,
            },
        })
        .await;
    Ok(())
}

/// The target of a file and the file its bytes go to (the partial file, or the target itself).
fn places(dest: &Dest, f: &RFile) -> Result<(Place, Place), String> {
    let target = dest.place(&f.entry.path)?;
    let work = if f.in_place {
        target.clone()
    } else {
        target.sibling(&partial_name(target.name()))
    };
    Ok((target, work))
}

/// Open the file that receives writes (and the basis), once.
fn open_work(dest: &Dest, f: &mut RFile) -> Result<(), String> {
    if f.out.is_some() {
        return Ok(());
    }
    let (target, work) = places(dest, f)?;
    let out = work
        .open_write(f.fresh && !f.in_place)
        .map_err(|e| format!("{}: cannot open for writing: {e}", f.shown.display()))?;
    if !f.in_place || !is_block_device(&out) {
        out.set_len(f.entry.size).map_err(|e| {
            format!(
                "{}: cannot size to {} bytes: {e}",
                f.shown.display(),
                f.entry.size
            )
        })?;
    }
    let out = Arc::new(out);
    // The basis is the work file itself, except for a delta against the target into a
    // partial file.
    f.basis_file = match f.basis {
        None => None,
        Some(Basis::Target) if !f.in_place => {
            let bf = target
                .open_read()
                .map_err(|e| format!("{}: cannot read basis: {e}", target.shown().display()))?;
            Some(Arc::new(bf))
        }
        Some(_) => Some(out.clone()),
    };
    f.out = Some(out);
    Ok(())
}

/// A file is complete here: `commit` it (verify, set metadata, rename; or, for a file the
/// sender found the same, settle the existing copy), then record and report the outcome.
/// `commit` answers the bytes written and copied, or why not and whether a retry may help.
async fn finish_file(shared: Arc<Shared>, id: u64, commit: fn(&Shared, RFile) -> Committed) {
    let f = lock(&shared.files).remove(&id);
    let Some(f) = f else { return };
    let path = f.entry.path.clone();
    // A verified file that got data (not `Same`) changed: only now is it itemised.
    let verified_change = (f.verify.is_some() && f.end.is_some())
        .then(|| (ItemPath::new(&f.entry.path), f.entry.size));
    let s = shared.clone();
    let r = tokio::task::spawn_blocking(move || commit(&s, f)).await;
    let result = match r {
        Ok(Ok((literal, copied))) => FileResult::Written { literal, copied },
        Ok(Err((reason, retry))) => FileResult::Failed { reason, retry },
        Err(e) => FileResult::Failed {
            reason: e.to_string(),
            retry: false,
        },
    };
    if let (Some((path, size)), FileResult::Written { .. }) = (verified_change, &result) {
        shared.events.event(Event::Item {
            path,
            action: Action::Delta,
            size,
        });
    }
    note_outcome(&shared, path, &result);
    if shared.dest.halted.get().is_none() {
        let _ = shared.control.send(Msg::FileDone { id, result }).await;
    }
}

/// Bytes of the files still being received.
fn pending_bytes(files: &HashMap<u64, RFile>) -> u64 {
    files.values().map(|f| f.entry.size).sum()
}

/// The session's end when the destination has halted (see `Dest::halted`).
fn halted(shared: &Shared) -> Result<(), EngineError> {
    match shared.dest.halted.get() {
        Some(why) => Err(EngineError::Local(why.clone())),
        None => Ok(()),
    }
}

/// When `e` says the destination's file system (or the user's quota) is full: halt the
/// destination with one reason that names it, the space free and the space this pass still
/// needs, and return that reason. Every file after this one would fail the same way.
/// `pending`: the sizes of the files still being received (see `pending_bytes`), from the
/// caller, which may hold the lock of `Shared::files`.
fn halt_if_full(
    shared: &Shared,
    e: &std::io::Error,
    pending: impl FnOnce() -> u64,
) -> Option<String> {
    let quota = match e.raw_os_error() {
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() => false,
        Some(code) if code == rustix::io::Errno::DQUOT.raw_os_error() => true,
        Some(code) if code == rustix::io::Errno::ROFS.raw_os_error() => {
            let why = format!(
                "{}: the destination's file system is read-only; remount it read-write and run again",
                shared.dest.root.display()
            );
            let _ = shared.dest.halted.set(why);
            return shared.dest.halted.get().cloned();
        }
        _ => return None,
    };
    let dest = &shared.dest;
    let free = rustix::fs::statvfs(&dest.root)
        .or_else(|_| rustix::fs::statvfs(dest.root.parent().unwrap_or(Path::new("."))))
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .ok();
    let pending = pending();
    let mib = |n: u64| format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64);
    let what = if quota {
        "your disk quota on the destination is used up"
    } else {
        "the destination's file system is full"
    };
    let free = free.map_or(String::new(), |f| format!(" ({} free)", mib(f)));
    let why = format!(
        "{}: {what}{free}; this pass needs at least {} more: free some space (or pick another destination) and run again to resume",
        dest.root.display(),
        mib(pending)
    );
    let _ = dest.halted.set(why);
    dest.halted.get().cloned()
}

/// Record how a file ended here (see `Shared::failed`).
fn note_outcome(shared: &Shared, path: Vec<u8>, result: &FileResult) {
    match result {
        FileResult::Written { .. } => {
            lock(&shared.failed).remove(&path);
        }
        FileResult::Failed { reason, .. } => note_failure(shared, &path, reason),
    }
}

fn note_failure(shared: &Shared, path: &[u8], reason: &str) {
    lock(&shared.failed).insert(path.to_vec(), reason.to_string());
}

fn digest_of(file: &File, size: u64) -> std::io::Result<[u8; 32]> {
    let mut leaves = Vec::with_capacity(size.div_ceil(LEAF as u64) as usize);
    let mut buf = vec![0u8; LEAF];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(LEAF as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        leaves.push(chunk::leaf_hash(&buf[..n]));
        off += n as u64;
    }
    Ok(chunk::file_digest(size, &leaves))
}

/// How committing a file went: bytes written and copied, or why not and whether a retry may
/// help.
type Committed = Result<(u64, u64), (String, bool)>;

fn commit(shared: &Shared, mut f: RFile) -> Committed {
    let (_, size, digest) = f
        .end
        .ok_or(("file ended without FileEnd".to_string(), true))?;
    if size > f.covered {
        return Err((
            format!(
                "{}: refused: the sender declared {size} bytes but sent frames for only {}",
                f.shown.display(),
                f.covered
            ),
            false,
        ));
    }
    if f.out.is_none() {
        open_work(&shared.dest, &mut f).map_err(|e| (e, false))?;
    }
    let Some(out) = f.out.clone() else {
        return Err(("no output file".into(), false));
    };
    let (target, work) = places(&shared.dest, &f).map_err(|e| (e, false))?;
    // Errors name the user's file, never the partial file beside it.
    let io = |e: std::io::Error| {
        let why = halt_if_full(shared, &e, || pending_bytes(&lock(&shared.files)));
        (
            why.unwrap_or_else(|| format!("{}: {e}", f.shown.display())),
            false,
        )
    };
    let block_dev = is_block_device(&out);
    if !block_dev {
        out.set_len(size).map_err(io)?;
    }
    let got = digest_of(&out, size).map_err(io)?;
    if got != digest {
        if !f.in_place {
            let _ = work.remove_file();
        }
        return Err((
            format!(
                "{}: content digest mismatch after transfer; will resend",
                f.shown.display()
            ),
            true,
        ));
    }
    let rename = (!f.in_place).then_some((&work, &target));
    install(shared, &out, &f, size, !block_dev, rename)?;
    Ok((f.literal, f.copied))
}

/// The last steps for a verified work file: optional fsync, metadata, rename over the target.
fn install(
    shared: &Shared,
    out: &File,
    f: &RFile,
    size: u64,
    set_meta: bool,
    rename: Option<(&Place, &Place)>,
) -> Result<(), (String, bool)> {
    let io = |e: std::io::Error| {
        let why = halt_if_full(shared, &e, || pending_bytes(&lock(&shared.files)));
        (
            why.unwrap_or_else(|| format!("{}: {e}", f.shown.display())),
            false,
        )
    };
    if shared.opts.fsync {
        out.sync_all().map_err(io)?;
    }
    if set_meta {
        let mut e = f.entry.clone();
        e.size = size;
        meta::apply_file(out, &f.shown, &e, shared.apply).map_err(|e| (e.to_string(), false))?;
    }
    if let Some((work, target)) = rename {
        work.rename_to(target).map_err(|e| {
            (
                format!("{}: cannot rename into place: {e}", f.shown.display()),
                false,
            )
        })?;
    }
    Stats::add(&shared.stats.files_done, 1);
    Stats::add(&shared.stats.bytes_done, size);
    Ok(())
}

/// The sender found the basis identical: only metadata (and a partial's rename) is left.
fn commit_same(shared: &Shared, f: RFile) -> Result<(), String> {
    let (target, partial) = places(&shared.dest, &f)?;
    let from = if f.basis == Some(Basis::Partial) {
        &partial
    } else {
        &target
    };
    let file = from
        .open_read()
        .map_err(|e| format!("{}: {e}", f.shown.display()))?;
    let shared_inode = {
        use std::os::unix::fs::MetadataExt;
        file.metadata().is_ok_and(|m| m.nlink() > 1)
    };
    // A verified file whose metadata matches is left alone (its ctime too).
    if f.verify != Some(false) && !is_block_device(&file) {
        if shared_inode && f.basis != Some(Basis::Partial) {
            detach(&target, &f.entry, shared.apply)?;
        } else {
            meta::apply_file(&file, &f.shown, &f.entry, shared.apply).map_err(|e| e.to_string())?;
        }
    }
    if f.basis == Some(Basis::Partial) {
        partial
            .rename_to(&target)
            .map_err(|e| format!("{}: cannot rename into place: {e}", f.shown.display()))?;
        // A partial became the file: it was sent (by an earlier run).
        Stats::add(&shared.stats.files_done, 1);
        Stats::add(&shared.stats.bytes_done, f.entry.size);
    }
    Ok(())
}

/// Write a small file whole: partial, digest check, metadata, rename.
fn write_small(shared: &Shared, f: RFile, data: SmallFile) -> Result<u64, (String, bool)> {
    let leaves: Vec<[u8; 32]> = data.data.chunks(LEAF).map(chunk::leaf_hash).collect();
    if chunk::file_digest(data.data.len() as u64, &leaves) != data.digest {
        return Err((
            format!(
                "{}: content digest mismatch; will resend",
                f.shown.display()
            ),
            true,
        ));
    }
    let (target, work) = places(&shared.dest, &f).map_err(|e| (e, false))?;
    // Errors name the user's file, never the partial file beside it.
    let io = |e: std::io::Error| {
        let why = halt_if_full(shared, &e, || pending_bytes(&lock(&shared.files)));
        (
            why.unwrap_or_else(|| format!("{}: {e}", f.shown.display())),
            false,
        )
    };
    let out = work.open_write(true).map_err(io)?;
    out.write_all_at(&data.data, 0).map_err(io)?;
    let size = data.data.len() as u64;
    let rename = (!f.in_place).then_some((&work, &target));
    install(shared, &out, &f, size, true, rename)?;
    Stats::add(&shared.stats.literal_bytes, size);
    Ok(size)
}

struct SigJob {
    id: u64,
    rel: Vec<u8>,
    basis: Basis,
    positional: bool,
    source_size: u64,
}

async fn send_signature(shared: Arc<Shared>, job: SigJob) {
    let permit = shared.hashing.acquire().await;
    let id = job.id;
    let s = shared.clone();
    let sig = tokio::task::spawn_blocking(move || signature(&s.dest, &job)).await;
    drop(permit);
    let signature = match sig {
        Ok(Ok(s)) => s,
        _ => Signature::Unavailable,
    };
    // The size a device reports only through its ioctl, or a basis that changed since it
    // was listed: hash requests are checked against what the signature describes.
    if let Signature::Positional { basis_size, .. } | Signature::Chunks { basis_size, .. } =
        &signature
    {
        if let Some(f) = lock(&shared.files).get_mut(&id) {
            f.basis_size = *basis_size;
        }
    }
    let _ = shared.control.send(Msg::Signature { id, signature }).await;
}

/// Open the basis of a file to read: its target, or the partial file beside it.
fn open_basis(dest: &Dest, rel: &[u8], basis: Basis) -> std::io::Result<(File, PathBuf)> {
    let target = dest.place(rel).map_err(std::io::Error::other)?;
    let place = match basis {
        Basis::Target => target,
        Basis::Partial => target.sibling(&partial_name(target.name())),
    };
    Ok((place.open_read()?, place.shown().to_path_buf()))
}

/// Before a partial file becomes the basis of a resumed transfer, copy the target's bytes
/// into the ranges the interrupted run never wrote (the partial's holes), up to the new
/// size. A positional delta against the partial then sends only what really differs from
/// the target, instead of everything the interruption left unwritten (measured with
/// `cutover-faults`: a kill during the delta of an 8 MiB file cost up to 8 MB more before).
/// Bytes wrongly filled (a literal run of zeros kept as a hole) only fail their block's
/// hash and are sent; the whole-file digest guards the result either way.
fn fill_partial_from_target(dest: &Dest, rel: &[u8], upto: u64) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let target = dest.place(rel).map_err(std::io::Error::other)?;
    let Ok(from) = target.open_read() else {
        return Ok(()); // no target (or not a regular file): nothing to fill with
    };
    let md = from.metadata()?;
    if !md.is_file() {
        return Ok(());
    }
    let partial = target
        .sibling(&partial_name(target.name()))
        .open_write(false)?;
    let end = md.len().min(upto);
    if partial.metadata()?.len() < end {
        partial.set_len(end)?;
    }
    let mut at = 0u64;
    while at < end {
        let hole = match rustix::fs::seek(&partial, SeekFrom::Hole(at)) {
            Ok(h) => h,
            Err(_) => return Ok(()), // no hole reporting here: resume as before
        };
        if hole >= end {
            break;
        }
        let data = match rustix::fs::seek(&partial, SeekFrom::Data(hole)) {
            Ok(d) => d.min(end),
            Err(_) => end, // ENXIO: a hole up to the end
        };
        copy_range(
            &from,
            &partial,
            CopyOp {
                src: hole,
                len: data - hole,
                dst: hole,
            },
            Unwritten::Hole,
        )?;
        at = data;
    }
    Ok(())
}

fn signature(dest: &Dest, job: &SigJob) -> std::io::Result<Signature> {
    if job.basis == Basis::Partial {
        fill_partial_from_target(dest, &job.rel, job.source_size)?;
    }
    let (file, shown) = open_basis(dest, &job.rel, job.basis)?;
    let basis_size = cofs::volume::size_of(&file, &shown).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; LEAF];
    let mut off = 0u64;
    if job.positional {
        let mut hashes = Vec::with_capacity(basis_size.div_ceil(LEAF as u64) as usize);
        while off < basis_size {
            let n = (basis_size - off).min(LEAF as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            hashes.push(chunk::block_hash(&buf[..n]));
            off += n as u64;
        }
        return Ok(Signature::Positional {
            basis_size,
            block: LEAF as u32,
            hashes,
        });
    }
    let params = CdcParams::for_size(basis_size.max(job.source_size));
    let mut chunker = chunk::StreamChunker::new(params);
    let mut found = Vec::new();
    let mut chunks = Vec::new();
    while off < basis_size {
        let n = (basis_size - off).min(LEAF as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        chunker.push(&buf[..n], &mut found);
        chunks.extend(found.drain(..).map(|c| (c.len, c.hash)));
        off += n as u64;
    }
    chunker.finish(&mut found);
    chunks.extend(found.drain(..).map(|c| (c.len, c.hash)));
    Ok(Signature::Chunks {
        basis_size,
        avg: params.avg,
        chunks,
    })
}

/// The most block hashes one answer may hold: what fits in a frame.
const MAX_HASHES_PER_ANSWER: usize = proto::MAX_FRAME / 16;

/// How many block hashes a `HashRequest` asks for, if it is one an honest sender could make:
/// a level below the leaf, ranges of at most a leaf each, in order, not overlapping, and
/// within the basis (when the file is still in flight). Anything else ends the session
/// before it costs memory: `(0, u64::MAX)` alone would list 2^52 blocks.
fn hash_request_blocks(
    block: u32,
    ranges: &[(u64, u64)],
    basis_size: Option<u64>,
) -> Result<usize, String> {
    if !LEVELS[1..].contains(&block) {
        return Err(format!(
            "hash request for {block}-byte blocks (levels are {:?})",
            &LEVELS[1..]
        ));
    }
    let mut at = 0u64;
    let mut blocks = 0usize;
    for &(off, len) in ranges {
        let end = off
            .checked_add(len)
            .filter(|_| len > 0 && len <= LEAF as u64);
        let Some(end) = end.filter(|_| off >= at) else {
            return Err(format!(
                "hash request range ({off}, {len}) is empty, longer than a leaf, overlapping or out of order"
            ));
        };
        if let Some(limit) = basis_size.filter(|&b| end > b) {
            return Err(format!(
                "hash request range ({off}, {len}) ends past the {limit}-byte basis"
            ));
        }
        blocks += len.div_ceil(u64::from(block)) as usize;
        if blocks > MAX_HASHES_PER_ANSWER {
            return Err(format!(
                "hash request for more than {MAX_HASHES_PER_ANSWER} blocks"
            ));
        }
        at = end;
    }
    Ok(blocks)
}

async fn answer_hashes(
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
    (id, block, ranges): (u64, u32, Vec<(u64, u64)>),
    expected: usize,
) {
    let basis = lock(&shared.files)
        .get(&id)
        .and_then(|f| Some((f.entry.path.clone(), f.basis?)));
    let hashes: Vec<BlockHash> = match basis {
        // The file failed or ended meanwhile: hashes that match nothing.
        None => vec![0; expected],
        Some((rel, basis)) => {
            let s = shared.clone();
            let r = tokio::task::spawn_blocking(move || {
                let (file, _) = open_basis(&s.dest, &rel, basis).map_err(|e| e.to_string())?;
                hash_ranges(&file, &ranges, (block as usize).max(1))
            })
            .await;
            match r {
                Ok(Ok(h)) => h,
                // Unreadable now: answer with hashes that match nothing, so all is sent.
                _ => vec![0; expected],
            }
        }
    };
    // Held until the answer is queued: a peer that reads no answers stalls its own session.
    let _ = shared.control.send(Msg::Hashes { id, block, hashes }).await;
    drop(permit);
}

/// Directory bookkeeping of a pass: the stack of open directories (for deletes), the
/// directories whose metadata is set at the end, and deferred hard links. All by wire path,
/// resolved when used.
struct WalkState {
    delete: bool,
    filter: Filter,
    /// The first entry created the destination directory (so the root entry is new).
    created_root: bool,
    /// For the entries of one directory, listed together.
    parents: ParentCache,
    open_dirs: Vec<(Vec<u8>, HashSet<Vec<u8>>)>,
    dirs: Vec<Entry>,
    /// (first, link): wire paths of a hard link's first name and of the link.
    hard_links: Vec<(Vec<u8>, Vec<u8>)>,
    doomed: Vec<Vec<u8>>,
    /// With `delete`: cutover's own partial and temporary files that no listed name claims
    /// (their source is gone), removed at the end with the doomed entries.
    litter: Vec<Vec<u8>>,
}

type Decided = (Need, Option<SigJob>, Option<(ItemPath, Action, u64)>);

impl WalkState {
    fn new(delete: bool, filter: Filter) -> Self {
        WalkState {
            delete,
            filter,
            created_root: false,
            parents: ParentCache::default(),
            open_dirs: Vec::new(),
            dirs: Vec::new(),
            hard_links: Vec::new(),
            doomed: Vec::new(),
            litter: Vec::new(),
        }
    }

    fn empty() -> Self {
        WalkState::new(false, Filter::default())
    }

    /// Track the directory walk for deletes: close directories the walk has left.
    fn track(&mut self, dest: &Dest, rel: &[u8], is_dir: bool) {
        if !self.delete {
            return;
        }
        let parent = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => &rel[..i],
            None if rel.is_empty() => {
                self.open_dirs.push((Vec::new(), HashSet::new()));
                return;
            }
            None => &rel[..0],
        };
        while let Some((top, _)) = self.open_dirs.last() {
            if top.as_slice() == parent {
                break;
            }
            let closed = self.open_dirs.pop();
            if let Some((dir, seen)) = closed {
                self.close_dir(dest, &dir, &seen);
            }
        }
        let name = rel[parent.len()..]
            .strip_prefix(b"/")
            .unwrap_or(&rel[parent.len()..]);
        if let Some((_, seen)) = self.open_dirs.last_mut() {
            seen.insert(name.to_vec());
        }
        if is_dir {
            self.open_dirs.push((rel.to_vec(), HashSet::new()));
        }
    }

    /// Everything in `dir` on the destination that the source did not list is doomed.
    fn close_dir(&mut self, dest: &Dest, dir: &[u8], seen: &HashSet<Vec<u8>>) {
        let Ok(listed) = dest
            .place(dir)
            .and_then(|p| p.list().map_err(|e| e.to_string()))
        else {
            return;
        };
        let in_dir = |name: &[u8]| {
            let mut rel = dir.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
            rel
        };
        // Our own files beside a name the source lists, or beside a protected (excluded)
        // name, may still serve (a resume, a transfer in flight); any other is litter that
        // no later run will claim.
        let mut claimed: HashSet<OsString> = seen
            .iter()
            .flat_map(|n| own_names(OsStr::from_bytes(n)))
            .collect();
        let mut ours = Vec::new();
        for e in listed {
            if is_internal(&e.name) {
                if !e.is_dir {
                    ours.push(e.name);
                }
                continue;
            }
            if seen.contains(e.name.as_bytes()) {
                continue;
            }
            let rel = in_dir(e.name.as_bytes());
            // Excluded files are protected from deletion, as in rsync.
            if self.filter.excluded(&rel, e.is_dir) {
                claimed.extend(own_names(&e.name));
                continue;
            }
            self.doomed.push(rel);
        }
        self.litter.extend(
            ours.into_iter()
                .filter(|n| !claimed.contains(n))
                .map(|n| in_dir(n.as_bytes())),
        );
    }

    fn decide(
        &mut self,
        shared: &Shared,
        id: u64,
        entry: Entry,
        rescan: bool,
    ) -> Result<Decided, (Need, String)> {
        let dry = shared.opts.dry_run;
        if let Err(why) = validate_rel(&entry.path) {
            return Err((
                Need::Refused,
                format!("{:?}: refused: {why}", display(&entry.path)),
            ));
        }
        let dest = &shared.dest;
        // Another sync holds the destination: touch nothing (the session ends after this
        // batch), not even the directories and links that deciding would create.
        if let Some(why) = dest.halted.get() {
            return Err((Need::Refused, why.clone()));
        }
        if dest.layout.get().is_none() {
            // A destination that cannot take this source takes nothing: a later entry must
            // never settle it differently (a file of the tree written over a file named as
            // the destination of a directory).
            self.created_root = dest.settle(&entry, dry).map_err(|e| {
                let _ = dest.halted.set(e.clone());
                (Need::Refused, e)
            })?;
        }
        if !rescan {
            self.track(dest, &entry.path, entry.kind == EntryKind::Dir);
        }
        let shown = dest.shown(&entry.path);
        let path = ItemPath::new(&entry.path);
        let size = entry.size;
        let item = |a: Action| Some((path.clone(), a, size));
        let err = |e: std::io::Error, what: &str| {
            (Need::Refused, format!("{}: {what}: {e}", shown.display()))
        };
        // Directories are made, removed and replaced below: never reuse a parent across one.
        if matches!(entry.kind, EntryKind::Dir) {
            self.parents.forget();
        }
        // In a dry run a missing parent only means nothing is there yet.
        let place = match dest.place_cached(&entry.path, &mut self.parents) {
            Ok(p) => Ok(p),
            Err(e) if !dry => return Err((Need::Refused, e)),
            Err(e) => Err(e),
        };
        let here = || place.as_ref().map_err(|e| (Need::Refused, e.clone()));
        let existing = match &place {
            Ok(_) if entry.path.is_empty() && self.created_root => None,
            Ok(p) => p.metadata().map_err(|e| err(e, "cannot inspect"))?,
            Err(_) => None,
        };
        let apply = shared.apply;
        match &entry.kind {
            EntryKind::Dir => {
                let fresh = match &existing {
                    Some(md) if md.is_dir() => false,
                    Some(_) => {
                        if !dry {
                            here()?
                                .remove_file()
                                .map_err(|e| err(e, "cannot replace with a directory"))?;
                        }
                        true
                    }
                    None => true,
                };
                // The root itself was made by `settle`.
                if fresh && !dry && !entry.path.is_empty() {
                    here()?
                        .create_dir()
                        .map_err(|e| err(e, "cannot create directory"))?;
                }
                self.dirs.push(entry);
                if fresh {
                    return Ok((Need::Created, None, item(Action::Create)));
                }
                return Ok((Need::Skip, None, None));
            }
            EntryKind::Symlink { target: link } => {
                if let Some(md) = &existing {
                    if md.is_symlink() {
                        let same = here()?.read_link().is_ok_and(|t| t == *link);
                        if same {
                            let need = meta_only(md, here()?, &entry, apply, dry)?;
                            return Ok((
                                need,
                                None,
                                (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                            ));
                        }
                    } else if md.is_dir() {
                        replace_dir(here()?, "a symlink", shared.opts.delete, dry)?;
                    }
                }
                if !dry {
                    let target = here()?;
                    let tmp = target.sibling(&temp_name(target.name()));
                    let _ = tmp.remove_file();
                    tmp.symlink(link)
                        .map_err(|e| err(e, "cannot create symlink"))?;
                    meta::apply_place(&tmp, &entry, apply)
                        .map_err(|e| (Need::Refused, e.to_string()))?;
                    tmp.rename_to(target)
                        .map_err(|e| err(e, "cannot rename symlink into place"))?;
                }
                return Ok((Need::Created, None, item(Action::Create)));
            }
            EntryKind::HardLink { first } => {
                if validate_rel(first).is_err() {
                    return Err((
                        Need::Refused,
                        format!("{path}: refused: bad hard link target"),
                    ));
                }
                if existing.as_ref().is_some_and(|md| md.is_dir()) {
                    replace_dir(here()?, "a hard link", shared.opts.delete, dry)?;
                }
                self.hard_links.push((first.clone(), entry.path.clone()));
                // Already a link of the first name's object: nothing to do, unless the first
                // name is replaced by a new file later in this pass (then `finish` links again).
                let linked = existing.as_ref().is_some_and(|md| {
                    dest.place(first)
                        .ok()
                        .and_then(|f| f.metadata().ok().flatten())
                        .is_some_and(|f| f.identity() == md.identity())
                });
                if linked {
                    return Ok((Need::Skip, None, None));
                }
                return Ok((Need::Created, None, item(Action::Create)));
            }
            EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } if !shared.devices => {
                return Err((Need::Refused, devices_refused(path)));
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                if let Some(md) = &existing {
                    if same_node(md, &entry.kind) {
                        let need = meta_only(md, here()?, &entry, apply, dry)?;
                        let item = (need == Need::Meta).then(|| item(Action::Meta)).flatten();
                        return Ok((need, None, item));
                    }
                    if md.is_dir() {
                        replace_dir(here()?, "a special file", shared.opts.delete, dry)?;
                    }
                }
                if !dry {
                    // Made under a temporary name and renamed over whatever stands there.
                    let target = here()?;
                    let tmp = target.sibling(&temp_name(target.name()));
                    let _ = tmp.remove_file();
                    make_node(&tmp, &entry)
                        .map_err(|e| (Need::Refused, format!("{}: {e}", shown.display())))?;
                    meta::apply_place(&tmp, &entry, apply)
                        .map_err(|e| (Need::Refused, e.to_string()))?;
                    tmp.rename_to(target)
                        .map_err(|e| err(e, "cannot rename into place"))?;
                }
                return Ok((Need::Created, None, item(Action::Create)));
            }
            EntryKind::File | EntryKind::Volume => {}
        }
        let volume = entry.kind == EntryKind::Volume
            || existing
                .as_ref()
                .map(|m| m.is_block_device())
                .unwrap_or(false);
        let device = existing.as_ref().is_some_and(|m| m.is_block_device());
        if device && !shared.devices {
            return Err((Need::Refused, devices_refused(path)));
        }
        // In place only into a regular file: a symlink, FIFO or other node where the source
        // now has a file is replaced through a partial file and a rename.
        let in_place = volume
            || (shared.opts.inplace && existing.as_ref().is_none_or(|m| m.is_file() || m.is_dir()));
        if let Some(md) = &existing {
            if md.is_dir() {
                replace_dir(here()?, "a file", shared.opts.delete, dry)?;
            }
            if !volume && md.is_file() && !shared.opts.checksum && meta::quick_match(md, &entry) {
                let need = meta_only(md, here()?, &entry, apply, dry)?;
                return Ok((
                    need,
                    None,
                    (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                ));
            }
        }
        let partial = match &place {
            Ok(p) if !in_place => p
                .sibling(&partial_name(p.name()))
                .metadata()
                .ok()
                .flatten()
                .filter(|m| m.is_file()),
            _ => None,
        };
        // A partial left by a content-defined delta (the target's size differs from the new
        // one, so content may have shifted) can resume worse than the target it was rebuilt
        // from: its unwritten ranges cannot be filled from the target at the same offsets,
        // so a positional delta against it resends them all. When it holds less data than
        // the target, the file starts over from the target (only the literals the
        // interrupted run sent are lost); otherwise (most of it was new) from the partial.
        let shifted = existing
            .as_ref()
            .filter(|m| m.is_file() && m.size() > 0 && m.size() != entry.size)
            .map(|m| m.size());
        let rebuild_from_target = match (shifted, &place) {
            (Some(target_size), Ok(p)) if partial.is_some() && !shared.opts.whole_file => {
                let work = p.sibling(&partial_name(p.name()));
                work.open_read()
                    .and_then(|f| data_bytes(&f))
                    .is_ok_and(|held| held < target_size)
            }
            _ => false,
        };
        let has_partial = partial.is_some() && !rebuild_from_target;
        let target_usable = existing
            .as_ref()
            .map(|m| m.is_file() || m.is_block_device())
            .unwrap_or(false);
        // `fresh`: the work file starts empty in this run, so unwritten ranges read as zeros.
        let (basis, fresh) = if in_place {
            (target_usable.then_some(Basis::Target), !target_usable)
        } else if has_partial {
            (Some(Basis::Partial), false)
        } else {
            (target_usable.then_some(Basis::Target), true)
        };
        let basis_size = match basis {
            Some(Basis::Partial) => partial.as_ref().map(|m| m.size()),
            Some(Basis::Target) => existing.as_ref().map(|m| m.size()),
            None => None,
        }
        .unwrap_or(0);
        let need = match &basis {
            None => Need::Full,
            // --checksum: a same-size file is compared by its hashes (the sender answers
            // `Same` when they match) rather than sent again, however small; with -W too,
            // since the comparison is what -c asks for (a file that differs then travels as
            // a positional delta).
            Some(_) if shared.opts.checksum && basis_size == entry.size && !has_partial => {
                Need::Verify { meta: false }
            }
            _ if shared.opts.whole_file && !has_partial && !in_place => Need::Full,
            Some(_) if entry.size <= SMALL_FILE && !in_place && !has_partial => Need::Full,
            // The target has the new size: compare before anything is said to change.
            Some(Basis::Target) if basis_size == entry.size => Need::Verify { meta: false },
            Some(_) if in_place || has_partial || volume || basis_size == entry.size => {
                Need::Positional
            }
            Some(_) if basis_size == 0 && !volume => Need::Full,
            Some(_) => Need::Chunks,
        };
        if dry {
            // With --checksum a dry run is exact: a file of the same size is compared by its
            // hashes (the sender reads its copy and answers `Same` or `Differs`), so only
            // files whose content differs are listed. Other cases need no hashes to know.
            if shared.opts.checksum {
                let comparable = existing
                    .as_ref()
                    .filter(|m| (m.is_file() && m.size() == entry.size) || (device && volume));
                if let Some(md) = comparable {
                    let meta = meta_only(md, here()?, &entry, apply, true)? == Need::Meta;
                    lock(&shared.compares).insert(id, (path.clone(), size, meta));
                    let sig = SigJob {
                        id,
                        rel: entry.path.clone(),
                        basis: Basis::Target,
                        positional: true,
                        source_size: size,
                    };
                    return Ok((Need::Compare { meta }, Some(sig), None));
                }
            }
            let (need, action) = match need {
                Need::Full => (Need::Full, Action::Send),
                Need::Verify { .. } => (Need::Positional, Action::Delta),
                // Positional means "a signature follows" in a dry run with --checksum.
                _ if shared.opts.checksum => (Need::Chunks, Action::Delta),
                other => (other, Action::Delta),
            };
            return Ok((need, None, item(action)));
        }
        // Whether a file of the same content would still change (its metadata).
        let need = match (need, &existing) {
            (Need::Verify { .. }, Some(md)) if md.is_file() => Need::Verify {
                meta: meta_only(md, here()?, &entry, apply, true)? == Need::Meta,
            },
            (other, _) => other,
        };
        let sig = match (need, basis) {
            (Need::Positional | Need::Chunks | Need::Verify { .. }, Some(b)) => Some(SigJob {
                id,
                rel: entry.path.clone(),
                basis: b,
                positional: need != Need::Chunks,
                source_size: size,
            }),
            _ => None,
        };
        let verify = match need {
            Need::Verify { meta } => Some(meta),
            _ => None,
        };
        // What the sender will send, itemised here too: in a pull this side reports.
        let action = match need {
            Need::Full => Some(Action::Send),
            Need::Positional | Need::Chunks => Some(Action::Delta),
            _ => None,
        };
        let rf = RFile {
            entry,
            shown,
            basis: if need == Need::Full && !in_place {
                None
            } else {
                basis
            },
            in_place,
            fresh,
            out: None,
            basis_file: None,
            seen: 0,
            end: None,
            literal: 0,
            copied: 0,
            basis_size,
            covered: 0,
            verify,
        };
        lock(&shared.files).insert(id, rf);
        Ok((need, sig, action.and_then(item)))
    }

    /// End of the pass: hard links, deletions (guarded), directory metadata, file-system sync.
    fn finish(
        mut self,
        shared: &Shared,
        events: &dyn Events,
        had_errors: bool,
    ) -> Result<(), String> {
        let dry = shared.opts.dry_run;
        let dest = &shared.dest;
        while let Some((dir, seen)) = self.open_dirs.pop() {
            self.close_dir(dest, &dir, &seen);
        }
        let mut report = lock(&shared.report);
        if !dry {
            for (first, link) in &self.hard_links {
                let r = dest.place(first).and_then(|first| {
                    link_as(&first, &dest.place(link)?).map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    report.errors.push(format!(
                        "{}: cannot hard-link to {}: {e}",
                        dest.shown(link).display(),
                        dest.shown(first).display()
                    ));
                }
            }
        }
        if !dry && !had_errors {
            for rel in std::mem::take(&mut self.litter) {
                let r = dest
                    .place(&rel)
                    .and_then(|p| p.remove_file().map_err(|e| e.to_string()));
                if let Err(e) = r {
                    tracing::debug!(path = %dest.shown(&rel).display(), "stale partial stays: {e}");
                }
            }
        }
        if !self.doomed.is_empty() {
            // Each doomed tree is counted once; places are resolved again to delete rather
            // than held, so thousands of doomed entries do not hold thousands of descriptors.
            let mut parents = ParentCache::default();
            let doomed: Vec<(Vec<u8>, u64)> = std::mem::take(&mut self.doomed)
                .into_iter()
                .map(|rel| {
                    let place = dest.place_cached(&rel, &mut parents);
                    let n = place.map_or(0, |p| p.count_tree());
                    (rel, n)
                })
                .collect();
            let count: u64 = doomed.iter().map(|(_, n)| n).sum();
            if had_errors && !dry {
                report.errors.push(format!(
                    "{count} deletions skipped because of errors in this pass"
                ));
            } else if shared.opts.max_delete.is_some_and(|max| count > max) {
                report.delete_limit_hit = Some(count);
                report.errors.push(format!(
                    "--max-delete {} exceeded: {count} entries would be deleted; nothing was deleted",
                    shared.opts.max_delete.unwrap_or(0)
                ));
            } else {
                let mut notices = Vec::new();
                for (rel, n) in doomed {
                    if !dry {
                        let r = dest
                            .place_cached(&rel, &mut parents)
                            .and_then(|p| p.remove_tree().map_err(|e| e.to_string()));
                        if let Err(e) = r {
                            report.errors.push(format!(
                                "{}: cannot delete: {e}",
                                dest.shown(&rel).display()
                            ));
                            continue;
                        }
                    }
                    report.entries_deleted += n;
                    events.event(Event::Item {
                        path: ItemPath::new(&rel),
                        action: Action::Delete,
                        size: 0,
                    });
                    notices.push(serde_bytes::ByteBuf::from(rel));
                }
                if !notices.is_empty() {
                    let _ = shared
                        .control
                        .blocking_send(Msg::Deleted { paths: notices });
                }
            }
        }
        if !dry {
            // Children first, so a parent's mtime is set after everything inside it changed.
            for entry in self.dirs.iter().rev() {
                // Only where it differs: a no-change pass leaves every directory (and its
                // ctime) alone.
                let r = dest.place(&entry.path).and_then(|p| {
                    match p.metadata().map_err(|e| e.to_string())? {
                        Some(md) if !meta::differs(&md, &p, entry, shared.apply) => Ok(()),
                        _ => meta::apply_place(&p, entry, shared.apply).map_err(|e| e.to_string()),
                    }
                });
                if let Err(e) = r {
                    report.errors.push(e);
                }
            }
            if !shared.opts.fsync {
                if let Ok(d) = File::open(&dest.root)
                    .or_else(|_| File::open(dest.root.parent().unwrap_or(Path::new("."))))
                {
                    let started = std::time::Instant::now();
                    if let Err(e) = rustix::fs::syncfs(&d) {
                        report
                            .errors
                            .push(format!("{}: syncfs failed: {e}", dest.root.display()));
                    }
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "end-of-pass syncfs"
                    );
                }
            }
        }
        Ok(())
    }
}

/// The names of cutover's own files that may stand beside `name`.
fn own_names(name: &OsStr) -> [OsString; 2] {
    [partial_name(name), temp_name(name)]
}

/// Make `link` a hard link of `first`'s object, atomically replacing whatever stands there,
/// unless it already is one. The check matters beyond saving work: `rename` of two names of
/// one object does nothing and succeeds, which would leave the temporary name behind.
fn link_as(first: &Place, link: &Place) -> std::io::Result<()> {
    let target = first
        .metadata()?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
    if link
        .metadata()?
        .is_some_and(|md| md.identity() == target.identity())
    {
        return Ok(());
    }
    let tmp = link.sibling(&temp_name(link.name()));
    let _ = tmp.remove_file();
    first.hard_link_as(&tmp)?;
    tmp.rename_to(link).inspect_err(|_| {
        let _ = tmp.remove_file();
    })
}

/// The content is already there: set metadata where it differs (`Meta`), else `Skip`.
fn meta_only(
    md: &cofs::root::Stat,
    target: &Place,
    entry: &Entry,
    apply: ApplyOpts,
    dry: bool,
) -> Result<Need, (Need, String)> {
    if !meta::differs(md, target, entry, apply) {
        return Ok(Need::Skip);
    }
    if !dry {
        let applied = if md.is_file() && md.nlink() > 1 {
            detach(target, entry, apply)
        } else {
            meta::apply_place(target, entry, apply).map_err(|e| e.to_string())
        };
        applied.map_err(|e| (Need::Refused, e))?;
    }
    Ok(Need::Meta)
}

/// Give `target`, a file with other names (hard links), the entry's metadata on a copy of its
/// own, renamed over it: changing the shared object would change every other name too, which
/// the source did not ask for (a link it broke). Where the source keeps the group, the pass
/// links the other names to this copy at its end.
fn detach(target: &Place, entry: &Entry, apply: ApplyOpts) -> Result<(), String> {
    let shown = target.shown().display().to_string();
    let io = |e: std::io::Error| format!("{shown}: {e}");
    let from = target.open_read().map_err(io)?;
    let size = from.metadata().map_err(io)?.len();
    let work = target.sibling(&partial_name(target.name()));
    let out = work.open_write(true).map_err(io)?;
    out.set_len(size).map_err(io)?;
    let whole = CopyOp {
        src: 0,
        len: size,
        dst: 0,
    };
    copy_range(&from, &out, whole, Unwritten::Hole).map_err(io)?;
    meta::apply_file(&out, target.shown(), entry, apply).map_err(|e| e.to_string())?;
    work.rename_to(target).map_err(io)
}

/// Whether an existing object is the special file an entry describes (kind and device).
fn same_node(md: &cofs::root::Stat, kind: &EntryKind) -> bool {
    use rustix::fs::FileType;
    match kind {
        EntryKind::Fifo => md.file_type() == FileType::Fifo,
        EntryKind::CharDevice { rdev } => {
            md.file_type() == FileType::CharacterDevice && md.rdev() == *rdev
        }
        EntryKind::BlockDevice { rdev } => {
            md.file_type() == FileType::BlockDevice && md.rdev() == *rdev
        }
        _ => false,
    }
}

/// A directory stands where the source has a non-directory: with `--delete` it goes (the
/// source no longer has anything below it), otherwise the entry is refused.
fn replace_dir(target: &Place, what: &str, delete: bool, dry: bool) -> Result<(), (Need, String)> {
    let shown = target.shown().display();
    if !delete {
        return Err((
            Need::Refused,
            format!(
                "{shown}: is a directory, the source has {what} here (use --delete to replace it)"
            ),
        ));
    }
    if !dry {
        target.remove_tree().map_err(|e| {
            (
                Need::Refused,
                format!("{shown}: cannot remove directory to replace it: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Make a fifo or, as root, a device node. A device node from a peer when not root is
/// refused: only root could make one, and it would be a hole in the destination's permissions.
fn devices_refused(path: impl std::fmt::Display) -> String {
    format!("{path}: refused: this destination does not accept device nodes or writes to block devices (a daemon module needs allow_devices = true)")
}

fn make_node(place: &Place, e: &Entry) -> std::io::Result<()> {
    use rustix::fs::FileType;
    let (ft, rdev) = match e.kind {
        EntryKind::Fifo => (FileType::Fifo, 0),
        EntryKind::CharDevice { rdev } => (FileType::CharacterDevice, rdev),
        EntryKind::BlockDevice { rdev } => (FileType::BlockDevice, rdev),
        _ => return Err(std::io::Error::other("not a special file")),
    };
    if ft != FileType::Fifo && !rustix::process::geteuid().is_root() {
        return Err(std::io::Error::other(
            "device nodes can only be created as root; skipped",
        ));
    }
    place.make_node(ft, e.mode & 0o7777, rdev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_requests_an_honest_sender_makes_are_accepted() {
        let leaf = LEAF as u64;
        let ranges = [(0, leaf), (3 * leaf, 100)];
        assert_eq!(
            hash_request_blocks(LEVELS[1], &ranges, Some(4 * leaf)),
            Ok(16 + 1)
        );
        // A file no longer in flight has no basis to bound it; the frame cap still does.
        assert_eq!(hash_request_blocks(LEVELS[2], &ranges, None), Ok(256 + 1));
        assert_eq!(hash_request_blocks(LEVELS[2], &[], Some(0)), Ok(0));
    }

    #[test]
    fn hash_requests_no_honest_sender_makes_are_refused_before_allocating() {
        let leaf = LEAF as u64;
        for (block, ranges, basis) in [
            (LEVELS[1], vec![(0, u64::MAX)], None),
            (LEVELS[1], vec![(u64::MAX, 1)], None),
            (LEVELS[1], vec![(0, 0)], None),
            (LEVELS[1], vec![(0, leaf + 1)], None),
            (LEVELS[1], vec![(leaf, 10), (0, 10)], None),
            (LEVELS[1], vec![(0, 10), (5, 10)], None),
            (LEVELS[1], vec![(0, 10)], Some(5)),
            (0, vec![(0, 10)], None),
            (1, vec![(0, 10)], None),
            (LEVELS[0], vec![(0, 10)], None),
        ] {
            assert!(
                hash_request_blocks(block, &ranges, basis).is_err(),
                "{block} {ranges:?} {basis:?}"
            );
        }
        // Many leaf-long ranges: refused once the answer would not fit in a frame.
        let many: Vec<(u64, u64)> = (0..200_000).map(|i| (i * leaf, leaf)).collect();
        assert!(hash_request_blocks(LEVELS[2], &many, None).is_err());
    }
}
