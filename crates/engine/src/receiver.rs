//! The receiving side: compare each listed entry with the destination and answer what it
//! needs, build files from data and copy frames in partial files, verify the whole-file
//! digest, set metadata, rename; then hard links, deletes and directory metadata at the end.
//!
//! Resume: a partial file left by an interrupted run is used as the positional basis of the
//! next one, so only the pieces that never arrived are sent again, and it only ever becomes
//! the target after its digest matched.

use crate::apply::{copy_range, data_bytes, is_block_device, write_frame, Unwritten};
use crate::events::{Action, Event, Events, ItemPath, Problems, Stats, Summary};
use crate::listed::{self, Feeder, PathList};
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

mod basis;
mod commit;
mod decide;
mod frames;
mod objects;

use basis::*;
use commit::*;
use decide::*;
use frames::*;
use objects::*;

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
    /// With `SyncOptions::files_from` in a pull: the list, streamed to the sender as it asks.
    pub paths: Option<Arc<PathList>>,
}

impl Destination {
    /// A destination named by the local user: no jail beyond their own rights.
    pub fn local(root: PathBuf, is_dir_hint: bool) -> Self {
        Destination {
            root,
            is_dir_hint,
            jail: None,
            devices: true,
            paths: None,
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
                        meta::kind_name(md.file_type())
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
    /// `Need::Changed`: only a tracked volume's written blocks come, into the target in
    /// place; the rest of it is not read, so there is no whole-file digest to check.
    changed: bool,
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
    let feeder = Feeder::start(dest.paths.clone(), control.tx.clone(), fatal_tx.clone());
    let ticker = tokio::spawn(report_progress(stats.clone(), control.tx.clone()));
    let readers = tokio::spawn(accept_data(data, shared.clone(), fatal_tx));

    let problems = Problems::default();
    let mut walk = WalkState::new(opts.delete, opts.files_from, filter);
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
                implied,
            } => {
                let mut marks = vec![false; entries.len()];
                if let Some(bad) = implied.iter().find(|&&i| i as usize >= entries.len()) {
                    break Err(EngineError::Protocol(format!(
                        "batch {batch}: implied entry {bad} of {}",
                        entries.len()
                    )));
                }
                for i in implied {
                    marks[i as usize] = true;
                }
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
                    let decided = walk.decide(&shared, id, entry, rescan, marks[i]);
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
            Msg::MorePaths => {
                if let Err(v) = feeder.request() {
                    break Err(EngineError::Protocol(v));
                }
            }
            Msg::ListedProblem {
                path,
                missing,
                reason,
            } => {
                if !opts.files_from || validate_rel(&path).is_err() {
                    break Err(EngineError::Protocol(format!(
                        "a --files-from problem about {:?} (no path, or no list)",
                        display(&path)
                    )));
                }
                listed::report(&*events, &problems, &mut summary, &path, missing, reason);
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
    drop(feeder);
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
