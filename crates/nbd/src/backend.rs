//! What an export reads from and writes to: the [`Backend`] trait, and [`FileBackend`] for
//! a regular file or a block device.
//!
//! Backend calls are blocking: the server runs them on tokio's blocking pool, several at a
//! time for one export (from one connection or many), so an implementation must be safe to
//! call concurrently and must use positional I/O (no shared file offset).

use rustix::fs::{FallocateFlags, SeekFrom};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// One run of the export as the backend stores it: `hole` runs read as zeroes without
/// being stored (sparse file holes, discarded blocks); the rest is data (or unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    pub hole: bool,
}

/// How a WRITE_ZEROES may be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Zeroing {
    /// The client allows a hole (no `NBD_CMD_FLAG_NO_HOLE`): deallocating is fine.
    pub may_trim: bool,
    /// The client set `NBD_CMD_FLAG_FAST_ZERO`: if zeroing would be no faster than writing
    /// zeroes, fail at once with [`io::ErrorKind::Unsupported`] and change nothing.
    pub fast_only: bool,
}

/// The storage behind an export. Offsets and lengths passed in are always within
/// `0..size()` (the server checks every request first), and a `read_at`/`write_at` buffer
/// is never longer than the server's maximum payload.
pub trait Backend: Send + Sync + 'static {
    /// The export's size in bytes, fixed for the backend's life.
    fn size(&self) -> u64;

    /// Fill `buf` from `offset`; a short read is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Make every write that completed before this call durable (NBD_CMD_FLUSH, and after
    /// a write with FUA).
    fn flush(&self) -> io::Result<()>;

    /// Whether a `flush` covers writes made through every connection to this backend, not
    /// only the caller's: the condition for advertising `NBD_FLAG_CAN_MULTI_CONN`. False
    /// unless the implementation knows it.
    fn flush_covers_all_connections(&self) -> bool {
        false
    }

    /// The client no longer needs this range (NBD_CMD_TRIM). Advisory: the default does
    /// nothing; an implementation may deallocate, after which the range may read as
    /// anything until written again.
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// Make the range read as zeroes (NBD_CMD_WRITE_ZEROES). The default writes zeroes in
    /// pieces of at most 1 MiB, and refuses `fast_only` requests.
    fn write_zeroes(&self, offset: u64, length: u64, how: Zeroing) -> io::Result<()> {
        if how.fast_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        write_zero_buffers(|buf, at| self.write_at(buf, at), offset, length)
    }

    /// How the range `offset..offset + length` is stored, as consecutive runs from
    /// `offset`, at most `max_runs` of them (the last may stop short of `length`; the rest
    /// then counts as data). The default reports one data run.
    fn allocation(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let _ = (offset, max_runs);
        Ok(vec![Allocation {
            length,
            hole: false,
        }])
    }
}

/// Write zeroes over `offset..offset + length` with `write`, from one buffer of at most
/// 1 MiB.
pub fn write_zero_buffers(
    write: impl Fn(&[u8], u64) -> io::Result<()>,
    offset: u64,
    length: u64,
) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeroes = vec![0u8; length.min(PIECE) as usize];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(PIECE);
        write(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// A regular file or a block device, shared by every connection to its export.
///
/// - Reads and writes are `pread`/`pwrite` on one open file description.
/// - `flush` is `fdatasync`. A FUA write is therefore a write followed by `fdatasync` of
///   the whole file: `sync_file_range` would be cheaper but is not a durability guarantee
///   (it neither writes the metadata that makes newly allocated blocks reachable nor
///   flushes the disk's volatile write cache).
/// - Because every connection writes through the same file (same page cache, same
///   inode), an `fdatasync` from one connection persists the writes that completed on all
///   of them: `flush_covers_all_connections` is true, and the server advertises
///   `NBD_FLAG_CAN_MULTI_CONN`.
/// - `trim` punches a hole (`FALLOC_FL_PUNCH_HOLE`; on a block device the kernel turns
///   that into a discard that reads back as zeroes, or refuses it, which we ignore).
/// - `write_zeroes` punches a hole when allowed, else uses `FALLOC_FL_ZERO_RANGE`, else
///   punches and re-allocates (`fallocate` mode 0) on a regular file; when none of these
///   works it writes zeroes, unless the client asked for a fast zero.
/// - `allocation` follows `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    block_device: bool,
    /// The same file opened with `O_DIRECT` for large aligned writes (`crate::direct`);
    /// None where the filesystem refuses it, or after it refused a write.
    direct: std::sync::RwLock<Option<File>>,
}

impl FileBackend {
    /// Open `path` (read-write unless `read_only`).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<FileBackend> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking, so that a FIFO where the backing should be is refused below instead
        // of waiting forever for its other end; a file or device then goes back to blocking.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        let backend = FileBackend::from_file(file)?;
        let flags = rustix::fs::fcntl_getfl(&backend.file)?;
        rustix::fs::fcntl_setfl(&backend.file, flags - rustix::fs::OFlags::NONBLOCK)?;
        if !read_only {
            *backend.direct.write().unwrap_or_else(|p| p.into_inner()) =
                crate::direct::reopen(&backend.file);
        }
        Ok(backend)
    }

    /// Use an open file; its size now is the export's size.
    pub fn from_file(file: File) -> io::Result<FileBackend> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            // A block device's metadata says 0; its end says its size.
            rustix::fs::seek(&file, SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an NBD export must be a regular file or a block device",
            ));
        };
        Ok(FileBackend {
            file,
            size,
            block_device,
            direct: std::sync::RwLock::new(None),
        })
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, length: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(&self.file, flags, offset, length)?)
    }

    /// Where the next data at or after `pos` starts, or `None` when only a hole follows.
    fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
            Ok(at) => Ok(Some(at)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Where the hole at or after `pos` starts (the end of the file at the latest).
    fn next_hole(&self, pos: u64) -> io::Result<u64> {
        match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
            Ok(at) => Ok(at),
            Err(rustix::io::Errno::NXIO) => Ok(self.size),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether an `fallocate` error means "this mode is not available here" (rather than a
/// failure of the storage).
fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::NOSYS.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if crate::direct::suits(buf, offset) {
            let direct = self.direct.read().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = direct.as_ref() {
                match crate::direct::write(d, buf, offset) {
                    Ok(()) => return Ok(()),
                    // A filesystem that took the open but not the write: buffered from now.
                    Err(e) if e.raw_os_error() == Some(libc_einval()) => {
                        drop(direct);
                        *self.direct.write().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn flush_covers_all_connections(&self) -> bool {
        // One file description shared by all connections: see the type's documentation.
        true
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        match self.fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, how: Zeroing) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if how.may_trim {
            match self.fallocate(punch, offset, length) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        if self.block_device && how.fast_only {
            // On a block device ZERO_RANGE may fall back to writing zeroes in the kernel:
            // not fast. (A punch above uses the device's zeroing without that fallback.)
            return Err(io::ErrorKind::Unsupported.into());
        }
        let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        match self.fallocate(zero_range, offset, length) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        if !self.block_device {
            // Punch, then allocate again: zeroes and no hole, where ZERO_RANGE is missing
            // (tmpfs, for one).
            match self.fallocate(punch, offset, length) {
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
                Ok(()) => match self.fallocate(FallocateFlags::empty(), offset, length) {
                    // The range is zero already; a hole left in it is what we could not
                    // avoid, and a fast request cannot be refused any more.
                    Err(e) if unsupported(&e) => {
                        return write_zero_buffers(|b, at| self.write_at(b, at), offset, length)
                    }
                    other => return other,
                },
            }
        }
        if how.fast_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        write_zero_buffers(|b, at| self.write_at(b, at), offset, length)
    }

    fn allocation(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max_runs {
            let data = match self.next_data(pos) {
                Ok(d) => d,
                // No SEEK_DATA here (some file systems, old kernels): all data.
                Err(e) if unsupported(&e) => {
                    runs.push(Allocation {
                        length: end - pos,
                        hole: false,
                    });
                    break;
                }
                Err(e) => return Err(e),
            };
            let (stop, hole) = match data {
                None => (end, true),
                Some(d) if d > pos => (d.min(end), true),
                Some(_) => (self.next_hole(pos)?.clamp(pos + 1, end), false),
            };
            runs.push(Allocation {
                length: stop - pos,
                hole,
            });
            pos = stop;
        }
        Ok(runs)
    }
}

/// EINVAL, what `O_DIRECT` answers where the filesystem cannot do it.
fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A FIFO where the backing should be is refused at once: opening it must not wait for
    /// a writer (or a reader) that never comes.
    #[test]
    fn a_fifo_as_backing_is_refused_without_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, mode, 0)
            .expect("mkfifo");
        for read_only in [true, false] {
            let path = fifo.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(FileBackend::open(&path, read_only).map(|_| ()));
            });
            let got = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("opening a FIFO as backing hung");
            let err = got.expect_err("a FIFO is no backing");
            assert!(
                err.to_string().contains("regular file or a block device"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_regular_file_stays_blocking_after_the_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        File::create(&path)
            .and_then(|f| f.set_len(8192))
            .expect("image");
        let b = FileBackend::open(&path, false).expect("open");
        let flags = rustix::fs::fcntl_getfl(&b.file).expect("getfl");
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
        assert_eq!(b.size, 8192);
    }
}
