//! The end of a file on the receiving side: verify the digest, set metadata, rename over
//! the target (or settle a file the sender found the same), report the outcome; and a
//! destination that cannot go on (full, read-only) halts the session with one reason.

use super::*;

/// A file is complete here: `commit` it (verify, set metadata, rename; or, for a file the
/// sender found the same, settle the existing copy), then record and report the outcome.
/// `commit` answers the bytes written and copied, or why not and whether a retry may help.
pub(super) async fn finish_file(
    shared: Arc<Shared>,
    id: u64,
    commit: fn(&Shared, RFile) -> Committed,
) {
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
pub(super) fn pending_bytes(files: &HashMap<u64, RFile>) -> u64 {
    files.values().map(|f| f.entry.size).sum()
}

/// The session's end when the destination has halted (see `Dest::halted`).
pub(super) fn halted(shared: &Shared) -> Result<(), EngineError> {
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
pub(super) fn halt_if_full(
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
pub(super) fn note_outcome(shared: &Shared, path: Vec<u8>, result: &FileResult) {
    match result {
        FileResult::Written { .. } => {
            lock(&shared.failed).remove(&path);
        }
        FileResult::Failed { reason, .. } => note_failure(shared, &path, reason),
    }
}

pub(super) fn note_failure(shared: &Shared, path: &[u8], reason: &str) {
    lock(&shared.failed).insert(path.to_vec(), reason.to_string());
}

pub(super) fn digest_of(file: &File, size: u64) -> std::io::Result<[u8; 32]> {
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
pub(super) type Committed = Result<(u64, u64), (String, bool)>;

pub(super) fn commit(shared: &Shared, mut f: RFile) -> Committed {
    let (_, size, digest) = f
        .end
        .ok_or(("file ended without FileEnd".to_string(), true))?;
    if f.changed {
        return commit_changed(shared, f, size);
    }
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

/// The end of a tracked volume's changed blocks (`Need::Changed`): they were written in
/// place as they came; the target keeps its size, and its metadata is applied as for any
/// volume. Nothing is read back: the rest of the target was not touched.
fn commit_changed(shared: &Shared, mut f: RFile, size: u64) -> Committed {
    if size != f.entry.size {
        return Err((
            format!(
                "{}: refused: the sender ended a volume of {} bytes at {size}",
                f.shown.display(),
                f.entry.size
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
    let block_dev = is_block_device(&out);
    install(shared, &out, &f, size, !block_dev, None)?;
    Ok((f.literal, f.copied))
}

/// The last steps for a verified work file: optional fsync, metadata, rename over the target.
pub(super) fn install(
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
pub(super) fn commit_same(shared: &Shared, f: RFile) -> Result<(), String> {
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
pub(super) fn write_small(
    shared: &Shared,
    f: RFile,
    data: SmallFile,
) -> Result<u64, (String, bool)> {
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
