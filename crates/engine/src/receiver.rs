//! The receiving side: compare each listed entry with the destination and answer what it
//! needs, build files from data and copy frames in partial files, verify the whole-file
//! digest, set metadata, rename; then hard links, deletes and directory metadata at the end.
//!
//! Resume: a partial file left by an interrupted run is used as the positional basis of the
//! next one, so only the pieces that never arrived are sent again, and it only ever becomes
//! the target after its digest matched.

use crate::events::{Action, Event, Events, Problems, Stats, Summary};
use crate::sender::{blocks_of, display, hash_ranges};
use crate::session::{spawn_control, Session};
use crate::{EngineError, SMALL_FILE};
use chunk::{BlockHash, CdcParams, LEAF};
use cofs::meta::{self, ApplyOpts};
use cofs::partial::{is_internal, partial_path, temp_path};
use cofs::{join, validate_rel, Filter};
use net::Conn;
use proto::{
    CopyOp, Entry, EntryKind, FileResult, Msg, Need, ReceiverReport, Signature, SmallFile,
    SyncOptions,
};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Semaphore};

/// Where the received tree goes.
pub struct Destination {
    pub root: PathBuf,
    /// The user wrote a trailing slash: the destination is a directory even for a single file.
    pub is_dir_hint: bool,
}

/// A file being received.
struct RFile {
    entry: Entry,
    target: PathBuf,
    /// Where bytes are written: the partial file, or the target itself when in place.
    work: PathBuf,
    basis: Option<PathBuf>,
    in_place: bool,
    /// `work` was created empty by this run, so unwritten ranges already read as zeros.
    fresh: bool,
    out: Option<Arc<File>>,
    basis_file: Option<Arc<File>>,
    seen: u64,
    end: Option<(u64, u64, [u8; 32])>,
    literal: u64,
    copied: u64,
}

struct Shared {
    opts: SyncOptions,
    apply: ApplyOpts,
    files: Mutex<HashMap<u64, RFile>>,
    control: mpsc::Sender<Msg>,
    hashing: Semaphore,
    report: Mutex<ReceiverReport>,
    stats: Arc<Stats>,
}

pub async fn run_receiver(
    session: Session,
    dest: Destination,
    opts: SyncOptions,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<Summary, EngineError> {
    let Session { control, data, .. } = session;
    let mut control = spawn_control(control);
    let owners = opts.owners;
    let shared = Arc::new(Shared {
        apply: ApplyOpts {
            owners,
            xattrs: opts.xattrs,
        },
        opts: opts.clone(),
        files: Mutex::new(HashMap::new()),
        control: control.tx.clone(),
        hashing: Semaphore::new(2),
        report: Mutex::new(ReceiverReport::default()),
        stats: stats.clone(),
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
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(4);
    let ticker = tokio::spawn(report_progress(stats.clone(), control.tx.clone()));
    let readers = tokio::spawn(accept_data(data, shared.clone(), fatal_tx));

    let problems = Problems::default();
    let mut walk = WalkState::new(dest, opts.delete, filter);
    let mut summary = Summary::default();

    let result: Result<(), EngineError> = loop {
        let msg = tokio::select! {
            m = control.rx.recv() => m,
            Some(f) = fatal_rx.recv() => break Err(EngineError::Local(f)),
        };
        let msg = match msg {
            None => break Err(EngineError::Peer("the sender closed the connection".into())),
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
                summary.entries_scanned += if rescan { 0 } else { entries.len() as u64 };
                Stats::add(&stats.entries_scanned, entries.len() as u64);
                let mut needs = Vec::with_capacity(entries.len());
                let mut sig_jobs = Vec::new();
                let mut refused = Vec::new();
                for (i, entry) in entries.into_iter().enumerate() {
                    let id = first_id + i as u64;
                    let decided = walk.decide(&shared, id, entry, rescan);
                    match decided {
                        Ok((need, sig, item)) => {
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
                            problems.error(&*events, message.clone());
                            needs.push(need);
                            if need == Need::Refused {
                                refused.push((id, message));
                            }
                        }
                    }
                }
                if shared
                    .control
                    .send(Msg::Needs { batch, needs })
                    .await
                    .is_err()
                {
                    break Err(EngineError::Peer("control connection closed".into()));
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
                tokio::spawn(answer_hashes(shared.clone(), id, block, ranges));
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
                    finish_file(shared.clone(), id).await;
                }
            }
            Msg::Same { id } => {
                let f = lock(&shared.files).remove(&id);
                if let Some(f) = f {
                    let s = shared.clone();
                    let r = tokio::task::spawn_blocking(move || commit_same(&s, f)).await;
                    let result = match r {
                        Ok(Ok(())) => FileResult::Written {
                            literal: 0,
                            copied: 0,
                        },
                        Ok(Err(e)) => FileResult::Failed {
                            reason: e,
                            retry: false,
                        },
                        Err(e) => FileResult::Failed {
                            reason: e.to_string(),
                            retry: false,
                        },
                    };
                    let _ = shared.control.send(Msg::FileDone { id, result }).await;
                }
            }
            Msg::FileAbort { id, reason } => {
                let f = lock(&shared.files).remove(&id);
                if let Some(f) = f {
                    // Keep a partial file: it is a fine basis for the next run.
                    if f.fresh && f.out.is_none() {
                        let _ = std::fs::remove_file(&f.work);
                    }
                }
                let _ = fail_file(&shared, id, reason).await;
            }
            Msg::EndOfList { .. } => {
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
    if let Err(e) = &result {
        let _ = shared
            .control
            .send(Msg::Fatal {
                message: e.to_string(),
            })
            .await;
    }
    drop(control.tx);
    readers.abort();
    ticker.abort();
    // Dropping the last sender closes the control writer.
    drop(shared);
    let _ = control.writer.await;
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

/// Accept data connections and apply every frame that arrives on them.
async fn accept_data(
    mut data: mpsc::Receiver<Conn>,
    shared: Arc<Shared>,
    fatal: mpsc::Sender<String>,
) {
    let mut tasks = Vec::new();
    while let Some(conn) = data.recv().await {
        let s = shared.clone();
        let f = fatal.clone();
        tasks.push(tokio::spawn(async move {
            let Conn { mut reader, writer } = conn;
            let _keep_open = writer;
            loop {
                match reader.recv().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = apply_data(&s, msg).await {
                            let _ = f.send(e.to_string()).await;
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = f.send(format!("data connection failed: {e}")).await;
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
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
                        let result = match write_small(&s, rf, f) {
                            Ok(n) => FileResult::Written {
                                literal: n,
                                copied: 0,
                            },
                            Err((reason, retry)) => FileResult::Failed { reason, retry },
                        };
                        (id, result)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| EngineError::Local(e.to_string()))?;
            for (id, result) in done {
                let _ = shared.control.send(Msg::FileDone { id, result }).await;
            }
            Ok(())
        }
        Msg::Data { .. } | Msg::Zero { .. } | Msg::Copy { .. } => {
            let Some(id) = msg.counted_file() else {
                return Ok(());
            };
            let opened = {
                let mut files = lock(&shared.files);
                match files.get_mut(&id) {
                    None => return Ok(()), // aborted or failed already
                    Some(f) => match open_work(f) {
                        Ok(()) => Ok((f.out.clone(), f.basis_file.clone(), f.fresh, f.in_place)),
                        Err(reason) => {
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
                        f.literal += lit;
                        f.copied += cop;
                        Stats::add(&shared.stats.literal_bytes, lit);
                        Stats::add(&shared.stats.copied_bytes, cop);
                        Ok(matches!(f.end, Some((frames, _, _)) if frames == f.seen))
                    }
                    (Some(f), Err(e)) => {
                        let reason = format!("{}: {e}", f.target.display());
                        files.remove(&id);
                        Err(reason)
                    }
                }
            };
            let ready = match ready {
                Ok(r) => r,
                Err(reason) => return fail_file(shared, id, reason).await,
            };
            if ready {
                finish_file(shared.clone(), id).await;
            }
            Ok(())
        }
        other => Err(EngineError::Protocol(format!(
            "unexpected message on a data connection: {:?}",
            std::mem::discriminant(&other)
        ))),
    }
}

async fn fail_file(shared: &Shared, id: u64, reason: String) -> Result<(), EngineError> {
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

/// Open the file that receives writes (and the basis), once.
fn open_work(f: &mut RFile) -> Result<(), String> {
    if f.out.is_some() {
        return Ok(());
    }
    let mut oo = OpenOptions::new();
    oo.write(true).read(true);
    oo.create(true).mode(0o600);
    if f.fresh && !f.in_place {
        oo.truncate(true);
    }
    let out = oo
        .open(&f.work)
        .map_err(|e| format!("{}: cannot open for writing: {e}", f.work.display()))?;
    if !f.in_place || !is_block_device(&out) {
        out.set_len(f.entry.size).map_err(|e| {
            format!(
                "{}: cannot size to {} bytes: {e}",
                f.work.display(),
                f.entry.size
            )
        })?;
    }
    let out = Arc::new(out);
    if let Some(b) = &f.basis {
        if *b == f.work {
            f.basis_file = Some(out.clone());
        } else {
            let bf =
                File::open(b).map_err(|e| format!("{}: cannot read basis: {e}", b.display()))?;
            f.basis_file = Some(Arc::new(bf));
        }
    }
    f.out = Some(out);
    Ok(())
}

fn is_block_device(f: &File) -> bool {
    f.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Write one frame; returns (literal bytes, bytes copied from the basis).
fn write_frame(
    out: &File,
    basis: Option<&File>,
    fresh: bool,
    in_place: bool,
    msg: Msg,
) -> std::io::Result<(u64, u64)> {
    match msg {
        Msg::Data { offset, data, .. } => {
            if fresh {
                write_sparse(out, &data, offset)?;
            } else {
                out.write_all_at(&data, offset)?;
            }
            Ok((data.len() as u64, 0))
        }
        Msg::Zero { offset, len, .. } => {
            if !fresh {
                write_zeros(out, offset, len, in_place)?;
            }
            Ok((0, 0))
        }
        Msg::Copy { ops, .. } => {
            let mut copied = 0;
            let Some(basis) = basis else {
                return Err(std::io::Error::other("copy frame but no basis file"));
            };
            let same_file = same_inode(out, basis);
            for op in ops {
                if same_file && op.src == op.dst {
                    continue;
                }
                copy_range(basis, out, op)?;
                copied += op.len;
            }
            Ok((0, copied))
        }
        _ => Ok((0, 0)),
    }
}

/// Granularity at which runs of zeros stay holes in a new file.
const HOLE_BLOCK: usize = 4096;

/// Write `data` at `offset` into a file that was created empty (all holes), skipping 4 KiB
/// blocks of zeros so that they stay holes.
fn write_sparse(out: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < data.len() {
        let end = (at + HOLE_BLOCK).min(data.len());
        let zero = chunk::is_zero(&data[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                out.write_all_at(&data[s..at], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(s) = run_start {
        out.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

fn same_inode(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Punch a hole (or write zeros where holes cannot be punched, as on block devices).
fn write_zeros(out: &File, offset: u64, len: u64, in_place: bool) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    if !in_place || !is_block_device(out) {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(out, flags, offset, len).is_ok() {
            return Ok(());
        }
    }
    let zeros = vec![0u8; len.min(LEAF as u64) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Copy a range of the basis into the work file, in the kernel where it can.
fn copy_range(basis: &File, out: &File, op: CopyOp) -> std::io::Result<()> {
    let mut src = op.src;
    let mut dst = op.dst;
    let mut left = op.len as usize;
    while left > 0 {
        let mut s = src;
        let mut d = dst;
        match rustix::fs::copy_file_range(basis, Some(&mut s), out, Some(&mut d), left) {
            Ok(0) => break,
            Ok(n) => {
                src += n as u64;
                dst += n as u64;
                left -= n;
            }
            Err(_) => {
                // Different file systems, or no kernel support: copy through memory.
                let mut buf = vec![0u8; left.min(LEAF)];
                while left > 0 {
                    let n = left.min(buf.len());
                    basis.read_exact_at(&mut buf[..n], src)?;
                    out.write_all_at(&buf[..n], dst)?;
                    src += n as u64;
                    dst += n as u64;
                    left -= n;
                }
            }
        }
    }
    if left > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "basis shorter than expected",
        ));
    }
    Ok(())
}

/// All frames of a file arrived: verify, set metadata, rename, report.
async fn finish_file(shared: Arc<Shared>, id: u64) {
    let f = lock(&shared.files).remove(&id);
    let Some(f) = f else { return };
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
    let _ = shared.control.send(Msg::FileDone { id, result }).await;
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

fn commit(shared: &Shared, mut f: RFile) -> Result<(u64, u64), (String, bool)> {
    let (_, size, digest) = f
        .end
        .ok_or(("file ended without FileEnd".to_string(), true))?;
    if f.out.is_none() {
        open_work(&mut f).map_err(|e| (e, false))?;
    }
    let Some(out) = f.out.clone() else {
        return Err(("no output file".into(), false));
    };
    let where_ = f.work.display().to_string();
    let io = |e: std::io::Error| (format!("{where_}: {e}"), false);
    let block_dev = is_block_device(&out);
    if !block_dev {
        out.set_len(size).map_err(io)?;
    }
    let got = digest_of(&out, size).map_err(io)?;
    if got != digest {
        if !f.in_place {
            let _ = std::fs::remove_file(&f.work);
        }
        return Err((
            format!(
                "{}: content digest mismatch after transfer; will resend",
                f.target.display()
            ),
            true,
        ));
    }
    install(shared, &out, &f, size, !block_dev, !f.in_place)?;
    Ok((f.literal, f.copied))
}

/// The last steps for a verified work file: optional fsync, metadata, rename over the target.
fn install(
    shared: &Shared,
    out: &File,
    f: &RFile,
    size: u64,
    set_meta: bool,
    rename: bool,
) -> Result<(), (String, bool)> {
    let io = |e: std::io::Error| (format!("{}: {e}", f.work.display()), false);
    if shared.opts.fsync {
        out.sync_all().map_err(io)?;
    }
    if set_meta {
        let mut e = f.entry.clone();
        e.size = size;
        meta::apply_file(out, &f.work, &e, shared.apply).map_err(|e| (e.to_string(), false))?;
    }
    if rename {
        std::fs::rename(&f.work, &f.target).map_err(|e| {
            (
                format!("{}: cannot rename into place: {e}", f.target.display()),
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
    let path = f.basis.clone().unwrap_or_else(|| f.target.clone());
    let file = OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !is_block_device(&file) {
        meta::apply_file(&file, &path, &f.entry, shared.apply).map_err(|e| e.to_string())?;
    }
    if path != f.target {
        std::fs::rename(&path, &f.target)
            .map_err(|e| format!("{}: cannot rename into place: {e}", f.target.display()))?;
    }
    Stats::add(&shared.stats.files_done, 1);
    Stats::add(&shared.stats.bytes_done, f.entry.size);
    Ok(())
}

/// Write a small file whole: partial, digest check, metadata, rename.
fn write_small(shared: &Shared, f: RFile, data: SmallFile) -> Result<u64, (String, bool)> {
    let leaves: Vec<[u8; 32]> = data.data.chunks(LEAF).map(chunk::leaf_hash).collect();
    if chunk::file_digest(data.data.len() as u64, &leaves) != data.digest {
        return Err((
            format!(
                "{}: content digest mismatch; will resend",
                f.target.display()
            ),
            true,
        ));
    }
    let io = |e: std::io::Error| (format!("{}: {e}", f.work.display()), false);
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&f.work)
        .map_err(io)?;
    out.write_all_at(&data.data, 0).map_err(io)?;
    let size = data.data.len() as u64;
    install(shared, &out, &f, size, true, true)?;
    Stats::add(&shared.stats.literal_bytes, size);
    Ok(size)
}

struct SigJob {
    id: u64,
    basis: PathBuf,
    positional: bool,
    source_size: u64,
}

async fn send_signature(shared: Arc<Shared>, job: SigJob) {
    let permit = shared.hashing.acquire().await;
    let id = job.id;
    let sig = tokio::task::spawn_blocking(move || signature(&job)).await;
    drop(permit);
    let signature = match sig {
        Ok(Ok(s)) => s,
        _ => Signature::Unavailable,
    };
    let _ = shared.control.send(Msg::Signature { id, signature }).await;
}

fn signature(job: &SigJob) -> std::io::Result<Signature> {
    let file = File::open(&job.basis)?;
    let basis_size = cofs::volume::size_of(&file, &job.basis).map_err(std::io::Error::other)?;
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

async fn answer_hashes(shared: Arc<Shared>, id: u64, block: u32, ranges: Vec<(u64, u64)>) {
    let basis = lock(&shared.files).get(&id).and_then(|f| f.basis.clone());
    let expected = blocks_of(&ranges, u64::from(block.max(1))).len();
    let hashes: Vec<BlockHash> = match basis {
        None => vec![0; expected],
        Some(path) => {
            let permit = shared.hashing.acquire().await;
            let r = tokio::task::spawn_blocking(move || {
                let file = File::open(&path).map_err(|e| e.to_string())?;
                hash_ranges(&file, &ranges, (block as usize).max(1))
            })
            .await;
            drop(permit);
            match r {
                Ok(Ok(h)) => h,
                // Unreadable now: answer with hashes that match nothing, so all is sent.
                _ => vec![0; expected],
            }
        }
    };
    let _ = shared.control.send(Msg::Hashes { id, block, hashes }).await;
}

/// Directory bookkeeping of a pass: the stack of open directories (for deletes), the
/// directories whose metadata is set at the end, and deferred hard links.
struct WalkState {
    dest: Destination,
    delete: bool,
    filter: Filter,
    single_file: Option<bool>,
    open_dirs: Vec<(Vec<u8>, HashSet<Vec<u8>>)>,
    dirs: Vec<(PathBuf, Entry)>,
    hard_links: Vec<(PathBuf, PathBuf)>,
    doomed: Vec<PathBuf>,
}

type Decided = (Need, Option<SigJob>, Option<(String, Action, u64)>);

impl WalkState {
    fn new(dest: Destination, delete: bool, filter: Filter) -> Self {
        WalkState {
            dest,
            delete,
            filter,
            single_file: None,
            open_dirs: Vec::new(),
            dirs: Vec::new(),
            hard_links: Vec::new(),
            doomed: Vec::new(),
        }
    }

    fn empty() -> Self {
        WalkState::new(
            Destination {
                root: PathBuf::new(),
                is_dir_hint: false,
            },
            false,
            Filter::default(),
        )
    }

    fn target(&self, rel: &[u8]) -> PathBuf {
        if self.single_file == Some(true) {
            let dir_like = self.dest.is_dir_hint || self.dest.root.is_dir();
            if dir_like {
                return join(&self.dest.root, rel);
            }
            return self.dest.root.clone();
        }
        join(&self.dest.root, rel)
    }

    /// Track the directory walk for deletes: close directories the walk has left.
    fn track(&mut self, rel: &[u8], is_dir: bool) {
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
                self.close_dir(&dir, &seen);
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
    fn close_dir(&mut self, dir: &[u8], seen: &HashSet<Vec<u8>>) {
        let abs = join(&self.dest.root, dir);
        let Ok(rd) = std::fs::read_dir(&abs) else {
            return;
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name();
            if is_internal(&name) || seen.contains(name.as_bytes()) {
                continue;
            }
            let mut rel = dir.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            // Excluded files are protected from deletion, as in rsync.
            if self.filter.excluded(&rel, is_dir) {
                continue;
            }
            self.doomed.push(e.path());
        }
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
        if self.single_file.is_none() {
            self.single_file = Some(!matches!(entry.kind, EntryKind::Dir));
            // `sync src dst/` with `dst` missing: create it, as rsync does.
            if entry.kind == EntryKind::Dir && !entry.path.is_empty() && !dry {
                std::fs::create_dir_all(&self.dest.root).map_err(|e| {
                    (
                        Need::Refused,
                        format!(
                            "{}: cannot create destination directory: {e}",
                            self.dest.root.display()
                        ),
                    )
                })?;
            }
        }
        if !rescan {
            self.track(&entry.path, entry.kind == EntryKind::Dir);
        }
        let target = self.target(&entry.path);
        let path = display(&entry.path);
        let size = entry.size;
        let item = |a: Action| Some((path.clone(), a, size));
        let err = |e: std::io::Error, what: &str| {
            (Need::Refused, format!("{}: {what}: {e}", target.display()))
        };
        let existing = std::fs::symlink_metadata(&target).ok();
        let apply = shared.apply;
        match &entry.kind {
            EntryKind::Dir => {
                let fresh = match &existing {
                    Some(md) if md.is_dir() => false,
                    Some(_) => {
                        if !dry {
                            std::fs::remove_file(&target)
                                .map_err(|e| err(e, "cannot replace with a directory"))?;
                        }
                        true
                    }
                    None => true,
                };
                if fresh && !dry {
                    std::fs::create_dir(&target).map_err(|e| err(e, "cannot create directory"))?;
                }
                self.dirs.push((target.clone(), entry));
                if fresh {
                    return Ok((Need::Created, None, item(Action::Create)));
                }
                return Ok((Need::Skip, None, None));
            }
            EntryKind::Symlink { target: link } => {
                if let Some(md) = &existing {
                    if md.file_type().is_symlink() {
                        let same = std::fs::read_link(&target)
                            .map(|t| t.as_os_str().as_bytes() == link.as_slice())
                            .unwrap_or(false);
                        if same {
                            let need = meta_only(md, &target, &entry, apply, dry)?;
                            return Ok((
                                need,
                                None,
                                (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                            ));
                        }
                    } else if md.is_dir() {
                        replace_dir(&target, "a symlink", shared.opts.delete, dry)?;
                    }
                }
                if !dry {
                    let tmp = temp_path(&target);
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(link), &tmp)
                        .map_err(|e| err(e, "cannot create symlink"))?;
                    meta::apply_path(&tmp, &entry, apply)
                        .map_err(|e| (Need::Refused, e.to_string()))?;
                    std::fs::rename(&tmp, &target)
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
                self.hard_links.push((self.target(first), target));
                return Ok((Need::Created, None, item(Action::Create)));
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                if existing.is_some() {
                    return Ok((Need::Skip, None, None));
                }
                if !dry {
                    make_node(&target, &entry)
                        .map_err(|e| (Need::Refused, format!("{}: {e}", target.display())))?;
                    meta::apply_path(&target, &entry, apply)
                        .map_err(|e| (Need::Refused, e.to_string()))?;
                }
                return Ok((Need::Created, None, item(Action::Create)));
            }
            EntryKind::File | EntryKind::Volume => {}
        }
        let volume = entry.kind == EntryKind::Volume
            || existing
                .as_ref()
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false);
        let in_place = volume || shared.opts.inplace;
        if let Some(md) = &existing {
            if md.is_dir() {
                replace_dir(&target, "a file", shared.opts.delete, dry)?;
            }
            if !volume && md.is_file() && !shared.opts.checksum && meta::quick_match(md, &entry) {
                let need = meta_only(md, &target, &entry, apply, dry)?;
                return Ok((
                    need,
                    None,
                    (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                ));
            }
        }
        let partial = partial_path(&target);
        let has_partial = !in_place
            && std::fs::symlink_metadata(&partial)
                .map(|m| m.is_file())
                .unwrap_or(false);
        let target_usable = existing
            .as_ref()
            .map(|m| m.is_file() || m.file_type().is_block_device())
            .unwrap_or(false);
        // `fresh`: the work file starts empty in this run, so unwritten ranges read as zeros.
        let (basis, fresh) = if in_place {
            (
                if target_usable {
                    Some(target.clone())
                } else {
                    None
                },
                !target_usable,
            )
        } else if has_partial {
            (Some(partial.clone()), false)
        } else {
            (
                if target_usable {
                    Some(target.clone())
                } else {
                    None
                },
                true,
            )
        };
        let basis_size = basis
            .as_ref()
            .and_then(|b| std::fs::metadata(b).ok())
            .map(|m| m.len())
            .unwrap_or(0);
        let need = match &basis {
            _ if shared.opts.whole_file && !has_partial && !in_place => Need::Full,
            None => Need::Full,
            Some(_) if entry.size <= SMALL_FILE && !in_place && !has_partial => Need::Full,
            Some(_) if in_place || has_partial || volume || basis_size == entry.size => {
                Need::Positional
            }
            Some(_) if basis_size == 0 && !volume => Need::Full,
            Some(_) => Need::Chunks,
        };
        if dry {
            let action = if need == Need::Full {
                Action::Send
            } else {
                Action::Delta
            };
            return Ok((need, None, item(action)));
        }
        let work = if in_place { target.clone() } else { partial };
        let rf = RFile {
            entry,
            target,
            work,
            basis: if need == Need::Full && !in_place {
                None
            } else {
                basis.clone()
            },
            in_place,
            fresh,
            out: None,
            basis_file: None,
            seen: 0,
            end: None,
            literal: 0,
            copied: 0,
        };
        lock(&shared.files).insert(id, rf);
        let sig = match (need, basis) {
            (Need::Positional | Need::Chunks, Some(b)) => Some(SigJob {
                id,
                basis: b,
                positional: need == Need::Positional,
                source_size: size,
            }),
            _ => None,
        };
        Ok((need, sig, None))
    }

    /// End of the pass: hard links, deletions (guarded), directory metadata, file-system sync.
    fn finish(
        mut self,
        shared: &Shared,
        events: &dyn Events,
        had_errors: bool,
    ) -> Result<(), String> {
        let dry = shared.opts.dry_run;
        while let Some((dir, seen)) = self.open_dirs.pop() {
            self.close_dir(&dir, &seen);
        }
        let mut report = lock(&shared.report);
        if !dry {
            for (first, link) in &self.hard_links {
                let tmp = temp_path(link);
                let _ = std::fs::remove_file(&tmp);
                let r = std::fs::hard_link(first, &tmp).and_then(|_| std::fs::rename(&tmp, link));
                if let Err(e) = r {
                    report.errors.push(format!(
                        "{}: cannot hard-link to {}: {e}",
                        link.display(),
                        first.display()
                    ));
                }
            }
        }
        if !self.doomed.is_empty() {
            let count: u64 = self.doomed.iter().map(|p| count_entries(p)).sum();
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
                for p in &self.doomed {
                    let n = count_entries(p);
                    let rel = p
                        .strip_prefix(&self.dest.root)
                        .unwrap_or(p)
                        .as_os_str()
                        .as_bytes()
                        .to_vec();
                    if !dry {
                        let md = std::fs::symlink_metadata(p);
                        let r = match md {
                            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
                            Ok(_) => std::fs::remove_file(p),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            report
                                .errors
                                .push(format!("{}: cannot delete: {e}", p.display()));
                            continue;
                        }
                    }
                    report.entries_deleted += n;
                    events.event(Event::Item {
                        path: display(&rel),
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
            for (path, entry) in self.dirs.iter().rev() {
                if let Err(e) = meta::apply_path(path, entry, shared.apply) {
                    report.errors.push(e.to_string());
                }
            }
            if !shared.opts.fsync {
                if let Ok(d) = File::open(&self.dest.root)
                    .or_else(|_| File::open(self.dest.root.parent().unwrap_or(Path::new("."))))
                {
                    let started = std::time::Instant::now();
                    if let Err(e) = rustix::fs::syncfs(&d) {
                        report
                            .errors
                            .push(format!("{}: syncfs failed: {e}", self.dest.root.display()));
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

/// The content is already there: set metadata where it differs (`Meta`), else `Skip`.
fn meta_only(
    md: &std::fs::Metadata,
    target: &Path,
    entry: &Entry,
    apply: ApplyOpts,
    dry: bool,
) -> Result<Need, (Need, String)> {
    if !meta::differs(md, target, entry, apply) {
        return Ok(Need::Skip);
    }
    if !dry {
        meta::apply_path(target, entry, apply).map_err(|e| (Need::Refused, e.to_string()))?;
    }
    Ok(Need::Meta)
}

/// A directory stands where the source has a non-directory: with `--delete` it goes (the
/// source no longer has anything below it), otherwise the entry is refused.
fn replace_dir(target: &Path, what: &str, delete: bool, dry: bool) -> Result<(), (Need, String)> {
    if !delete {
        return Err((
            Need::Refused,
            format!(
                "{}: is a directory, the source has {what} here (use --delete to replace it)",
                target.display()
            ),
        ));
    }
    if !dry {
        std::fs::remove_dir_all(target).map_err(|e| {
            (
                Need::Refused,
                format!(
                    "{}: cannot remove directory to replace it: {e}",
                    target.display()
                ),
            )
        })?;
    }
    Ok(())
}

fn count_entries(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            1 + std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| count_entries(&e.path()))
                        .sum()
                })
                .unwrap_or(0)
        }
        Ok(_) => 1,
        Err(_) => 0,
    }
}

fn make_node(path: &Path, e: &Entry) -> std::io::Result<()> {
    use rustix::fs::{FileType, Mode};
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
    rustix::fs::mknodat(rustix::fs::CWD, path, ft, Mode::from_raw_mode(e.mode), rdev)
        .map_err(Into::into)
}
