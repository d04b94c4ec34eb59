//! Reading the source: opening a listed file beneath its root, reads at an offset, whole
//! small files, and telling a read that stayed put from one a writer crossed (the scan's
//! metadata and `fstat` before and after).

use super::*;

/// A large file being sent in segments or literals by many connections at once.
pub(super) struct BigFile {
    pub(super) id: u64,
    pub(super) display: String,
    pub(super) file: File,
    pub(super) size: u64,
    pub(super) scan: (Entry, LocalInfo),
    pub(super) leaves: Mutex<Vec<[u8; 32]>>,
    /// Segments not yet sent (full transfers only).
    pub(super) remaining: AtomicU64,
    pub(super) failed: AtomicBool,
    /// Size, mtime and ctime by `fstat` when opened (None for volumes): compared after the
    /// read to tell a consistent read from a torn one.
    pub(super) opened: Option<Stamp>,
    /// A read came back short: the file shrank while it was read.
    pub(super) short: AtomicBool,
}

/// (size, mtime, mtime ns, ctime, ctime ns) of an open file.
pub(super) type Stamp = (u64, i64, i64, i64, i64);

pub(super) fn stamp(md: &std::fs::Metadata) -> Stamp {
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
pub(super) fn torn(big: &BigFile) -> Option<String> {
    if big.short.load(Ordering::Acquire) {
        return Some("shrank while it was read".into());
    }
    let opened = big.opened?;
    let now = big.file.metadata().ok().map(|m| stamp(&m))?;
    (now != opened).then(|| "changed while it was read".into())
}

/// Why a file no longer looks as it did when scanned, if it moved.
pub(super) fn moved(scan: &(Entry, LocalInfo), now: &std::fs::Metadata) -> Option<String> {
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

pub(super) fn open_source(item: &ScanItem) -> Result<File, (String, bool)> {
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
pub(super) fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
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

pub(super) fn open_big(id: u64, item: &ScanItem) -> Result<BigFile, (String, bool)> {
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

pub(super) enum SmallNote {
    Changed(u64, String),
    /// Torn on every attempt: nothing of it is sent.
    Torn(u64, String),
    Failed(u64, String, bool),
}

/// Read a batch of small files whole, checking each stayed put while it was read.
pub(super) fn read_small(list: Vec<SmallJob>) -> (Vec<SmallFile>, Vec<SmallNote>) {
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
