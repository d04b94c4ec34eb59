//! Making, opening and inspecting a metadata file.
//!
//! `create` builds the whole file under a temporary name beside the target and renames it
//! into place, so a crash during creation leaves either nothing or a complete file, and
//! `--force` replaces an old file atomically. `open` takes an exclusive `flock` (one
//! process tracks a volume), picks the superblock copy, loads the bitmap and, after an
//! unclean shutdown, marks every extent the activity log names dirty and persists that
//! before anything else happens; then it clears the clean flag on disk, so that a crash
//! from then on is seen as one.

use crate::al::{self, ActivityLog};
use crate::bitmap::Bitmap;
use crate::disk::Disk;
use crate::error::Error;
use crate::layout::{Geometry, DEFAULT_AL_EXTENTS, DEFAULT_BLOCK_SIZE, PAGE, SUPERBLOCK_COPIES};
use crate::meta::{new_gen, uuid, Inner, Meta, OpenReport, Result};
use crate::peer::PeerTrack;
use crate::superblock::{self, CopyError, Superblock};
use rustix::fs::{FallocateFlags, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The shape of a new metadata file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// The backing's size in bytes.
    pub size: u64,
    /// Bitmap granularity (default 64 KiB).
    pub block_size: u32,
    /// Replace an existing file (its bitmap is lost).
    pub force: bool,
    /// This node's id, recorded for the peers (default 0).
    pub node_id: u32,
    /// Peer slots with a bitmap region (default 1; v1 tracks slot 0 only).
    pub peer_slots: u32,
    /// Hot extents of 4 MiB (default 1024 = 4 GiB).
    pub al_extents: u32,
    /// Start with the inconsistent flag (a replica that holds nothing known yet).
    pub inconsistent: bool,
    /// With `inconsistent`: the backing holds a copy of a peer's data made beforehand,
    /// so the first resync compares checksums and sends only blocks that differ.
    pub seeded: bool,
}

impl CreateOptions {
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            force: false,
            node_id: 0,
            peer_slots: 1,
            al_extents: DEFAULT_AL_EXTENTS,
            inconsistent: false,
            seeded: false,
        }
    }
}

/// A metadata file's superblock, summarised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub volume_id: String,
    pub node_id: u32,
    pub size: u64,
    pub block_size: u32,
    pub peer_slots: u32,
    pub al_extents: u32,
    pub al_ring: u32,
    pub file_len: u64,
    pub current_gen: u64,
    /// Slot 0's bitmap generation.
    pub bitmap_gen: u64,
    pub marks: u64,
    /// Set by a clean close; clear while open and after a crash.
    pub clean: bool,
    /// The superblock's sequence number.
    pub seq: u64,
}

impl Info {
    fn of(sb: &Superblock, geo: &Geometry) -> Info {
        Info {
            volume_id: uuid(&sb.volume_id),
            node_id: sb.node_id,
            size: sb.size,
            block_size: sb.block_size,
            peer_slots: sb.peer_slots,
            al_extents: sb.al_extents,
            al_ring: sb.al_ring,
            file_len: geo.file_len,
            current_gen: sb.current_gen,
            bitmap_gen: sb.slots[0].bitmap_gen,
            marks: sb.marks,
            clean: sb.clean(),
            seq: sb.seq,
        }
    }
}

/// The error for two unusable superblock copies.
fn copies_error(path: &Path, e: [CopyError; 2]) -> Error {
    let path = path.to_path_buf();
    match e {
        [CopyError::Magic, CopyError::Magic] => Error::NotMeta { path },
        [CopyError::Version(found), CopyError::Magic | CopyError::Version(_)]
        | [CopyError::Magic, CopyError::Version(found)] => Error::Version {
            path,
            found,
            supported: superblock::VERSION,
        },
        [a, b] => Error::Corrupt {
            path,
            a: format!("copy 0: {a}"),
            b: format!("copy 1: {b}"),
        },
    }
}

/// Read both superblock copies (a short file reads as zeroes past its end).
fn read_copies(path: &Path, disk: &dyn Disk, len: u64) -> Result<[Vec<u8>; 2]> {
    let mut copies = [vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]];
    for (i, c) in copies.iter_mut().enumerate() {
        let at = SUPERBLOCK_COPIES[i];
        let n = len.saturating_sub(at).min(PAGE) as usize;
        disk.read_at(&mut c[..n], at)
            .map_err(|e| Error::io(path, "superblock read", e))?;
    }
    Ok(copies)
}

fn try_lock(path: &Path, file: &File) -> Result<()> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(Error::io(path, "lock", e.into())),
    }
}

impl Meta {
    /// Make a metadata file for a backing of `size` bytes with `block_size` bitmap
    /// granularity and the other defaults. Refuses an existing non-empty file unless
    /// `force` (and a file another process has open, even then).
    pub fn create(path: impl AsRef<Path>, size: u64, block_size: u32, force: bool) -> Result<Info> {
        Meta::create_with(
            path,
            &CreateOptions {
                block_size,
                force,
                ..CreateOptions::new(size)
            },
        )
    }

    /// [`Meta::create`] with every option.
    pub fn create_with(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Info> {
        let path = path.as_ref();
        let geo = Geometry::new(opts.size, opts.block_size, opts.peer_slots, opts.al_extents)
            .map_err(|why| Error::invalid(path, why))?;
        check_target(path, opts.force)?;

        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(path, "names no file"))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut sb = Superblock::new(&geo, opts.node_id, rand::random(), new_gen());
        sb.set_flag(superblock::FLAG_INCONSISTENT, opts.inconsistent);
        sb.set_flag(superblock::FLAG_SEEDED, opts.inconsistent && opts.seeded);
        let made = write_new(&tmp, path, &geo, sb.clone());
        let made = made.and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename into place", e))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // The rename is durable once the directory is.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, "fsync of the directory", e))?;
        let mut info = Info::of(&sb, &geo);
        // `write_new` wrote sequences 1 and 2.
        info.seq = 2;
        Ok(info)
    }

    /// Open a metadata file for a backing of `expected_size` bytes, recovering from an
    /// unclean shutdown if needed (see [`Meta::open_report`]).
    pub fn open(path: impl AsRef<Path>, expected_size: u64) -> Result<Meta> {
        Meta::open_on(path.as_ref(), expected_size, |f| Ok(Box::new(f)))
    }

    /// The superblock of a metadata file, read without opening it for tracking (no lock,
    /// no recovery, nothing written).
    pub fn inspect(path: impl AsRef<Path>) -> Result<Info> {
        let path = path.as_ref();
        let file = open_file(path, false)?;
        let len = file_len(path, &file)?;
        let copies = read_copies(path, &file, len)?;
        let pick = superblock::pick([&copies[0], &copies[1]]).map_err(|e| copies_error(path, e))?;
        let geo = pick
            .sb
            .geometry()
            .map_err(|why| Error::invalid(path, why))?;
        Ok(Info::of(&pick.sb, &geo))
    }

    /// `open` on a [`Disk`] made from the opened file (the power-cut tests record it).
    pub(crate) fn open_on(
        path: &Path,
        expected_size: u64,
        wrap: impl FnOnce(File) -> io::Result<Box<dyn Disk>>,
    ) -> Result<Meta> {
        let file = open_file(path, true)?;
        let len = file_len(path, &file)?;
        try_lock(path, &file)?;
        let lock = file
            .try_clone()
            .map_err(|e| Error::io(path, "dup of the file", e))?;
        let disk = wrap(file).map_err(|e| Error::io(path, "open", e))?;

        let copies = read_copies(path, &*disk, len)?;
        let pick = superblock::pick([&copies[0], &copies[1]]).map_err(|e| copies_error(path, e))?;
        let mut sb = pick.sb;
        if let Some(why) = &pick.other {
            tracing::warn!(
                "{}: superblock copy {} is unusable ({why}); using copy {}",
                path.display(),
                1 - pick.copy,
                pick.copy
            );
        }
        let geo = sb.geometry().map_err(|why| Error::invalid(path, why))?;
        if len < geo.file_len {
            return Err(Error::invalid(
                path,
                format!(
                    "is {len} bytes but its layout needs {}: truncated; restore it or re-create \
                     it with `cutover volume create-md --force`",
                    geo.file_len
                ),
            ));
        }
        if sb.size != expected_size {
            return Err(Error::SizeMismatch {
                path: path.to_path_buf(),
                meta: sb.size,
                backing: expected_size,
            });
        }
        if !sb.slots[0].in_use() {
            return Err(Error::invalid(
                path,
                "has no slot 0 (marks); re-create it with `cutover volume create-md --force`",
            ));
        }

        let bits = load_bitmap(path, &*disk, &geo, 0)?;
        let mut peers = Vec::new();
        for slot in 1..geo.peer_slots {
            let entry = sb.slots[slot as usize];
            if entry.in_use() {
                let b = load_bitmap(path, &*disk, &geo, slot)?;
                peers.push(PeerTrack::new(slot, entry.peer_node, b));
            }
        }
        let mut bits = bits;

        let mut ring = vec![0u8; geo.al_ring as usize * PAGE as usize];
        disk.read_at(&mut ring, geo.al_offset)
            .map_err(|e| Error::io(path, "activity log read", e))?;
        let scan = al::scan(&ring, geo.al_ring, sb.al_floor, geo.extents, &sb.volume_id);
        if scan.out_of_range > 0 {
            tracing::warn!(
                "{}: the activity log names {} extents past the volume's end (ignored)",
                path.display(),
                scan.out_of_range
            );
        }
        let next_seq = scan.max_seq.map_or(sb.al_floor, |m| m + 1).max(sb.al_floor);

        let clean = sb.clean();
        let mut report = OpenReport {
            last_shutdown_clean: clean,
            recovered_extents: 0,
            recovered_blocks: 0,
            al_transactions: scan.transactions,
            superblock_copy: pick.copy,
            damaged_copy: pick.other.map(|e| e.to_string()),
        };
        if !clean {
            for &e in &scan.extents {
                let (first, last) = geo.extent_blocks(e);
                report.recovered_blocks += bits.set_range(first, last);
                for p in &mut peers {
                    p.mark(first, last);
                }
            }
            report.recovered_extents = scan.extents.len();
        }
        // Nothing is hot any more: the next epoch of the ring starts at `next_seq`.
        let al = ActivityLog::new(geo.al_extents, next_seq);
        sb.al_floor = next_seq;
        sb.set_clean(false);
        let mut inner = Inner::new(path.to_path_buf(), disk, lock, sb, geo, bits, al);
        inner.state().peers = peers;
        {
            let mut io = inner.io();
            // The recovered bits must be durable before the floor that forgets the AL.
            if inner.persist_changed(&io)? > 0 {
                inner.sync(&io)?;
            }
            inner.write_superblock(&mut io)?;
        }
        if !clean {
            tracing::warn!(
                "{}: unclean shutdown; {} extents of the activity log marked dirty",
                path.display(),
                report.recovered_extents
            );
        }
        inner.report = report;
        Ok(Meta {
            inner: Arc::new(inner),
        })
    }
}

/// Read slot `slot`'s bitmap region.
fn load_bitmap(path: &Path, disk: &dyn Disk, geo: &Geometry, slot: u32) -> Result<Bitmap> {
    let mut bits = Bitmap::new(geo.blocks);
    let chunk_pages = 256u64;
    let mut page = 0;
    while page < geo.bitmap_pages() {
        let n = chunk_pages.min(geo.bitmap_pages() - page);
        let mut buf = vec![0u8; (n * PAGE) as usize];
        disk.read_at(&mut buf, geo.bitmap_at(slot) + page * PAGE)
            .map_err(|e| Error::io(path, "bitmap read", e))?;
        for (i, image) in buf.chunks(PAGE as usize).enumerate() {
            bits.load_page(page + i as u64, image);
        }
        page += n;
    }
    Ok(bits)
}

fn open_file(path: &Path, write: bool) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::Missing {
                path: path.to_path_buf(),
            },
            _ => Error::io(path, "open", e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !meta.is_file() {
        return Err(Error::invalid(
            path,
            "is not a regular file; volume metadata lives in a regular file",
        ));
    }
    Ok(file)
}

fn file_len(path: &Path, file: &File) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(path, "stat", e))
}

/// Refuse to replace what should not be replaced.
fn check_target(path: &Path, force: bool) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, "stat", e)),
    };
    if meta.file_type().is_symlink() {
        return Err(Error::invalid(
            path,
            "is a symbolic link; give the path of the file itself",
        ));
    }
    if !meta.is_file() {
        return Err(Error::invalid(
            path,
            "is not a regular file; volume metadata lives in a regular file",
        ));
    }
    let file = open_file(path, false)?;
    // Even --force must not pull the file from under a running `cutover serve`.
    try_lock(path, &file)?;
    if force || meta.len() == 0 {
        return Ok(());
    }
    let copies = read_copies(path, &file, meta.len())?;
    match superblock::pick([&copies[0], &copies[1]]) {
        Ok(p) => Err(Error::Exists {
            path: path.to_path_buf(),
            volume: uuid(&p.sb.volume_id),
        }),
        Err([CopyError::Magic, CopyError::Magic]) => Err(Error::NotEmpty {
            path: path.to_path_buf(),
        }),
        Err(_) => Err(Error::Exists {
            path: path.to_path_buf(),
            volume: "(damaged superblock)".into(),
        }),
    }
}

/// Write a complete new file at `tmp`: zeroed bitmap regions and AL (no valid
/// transaction), both superblock copies, all durable. Errors name `path`, the file the
/// operator asked for (the temporary name means nothing to them).
fn write_new(tmp: &Path, path: &Path, geo: &Geometry, mut sb: Superblock) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| Error::io(path, "create (as a temporary file beside it)", e))?;
    file.set_len(geo.file_len)
        .map_err(|e| Error::io(path, "set length", e))?;
    // Allocate now, so the first AL transaction or bitmap page never waits for the file
    // system to find blocks (or fails for want of space). Some file systems cannot.
    match rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, geo.file_len) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOSPC) => {
            return Err(Error::io(path, "allocate", rustix::io::Errno::NOSPC.into()))
        }
        Err(e) => tracing::debug!("{}: fallocate: {e} (left sparse)", tmp.display()),
    }
    // Sequence 1 goes to copy 1, sequence 2 to copy 0: both valid from the start.
    for seq in [1, 2] {
        sb.seq = seq;
        file.write_all_at(&sb.encode(), SUPERBLOCK_COPIES[sb.copy_index()])
            .map_err(|e| Error::io(path, "superblock write", e))?;
    }
    file.sync_all().map_err(|e| Error::io(path, "fsync", e))
}
