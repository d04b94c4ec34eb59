//! Large aligned writes that bypass the page cache (`O_DIRECT`). Copying a write into the page
//! cache costs more than the whole NBD path on some machines (V1 in BENCH.md: 83% of the
//! daemon's time in the kernel's copy), and the data is on its way to the disk anyway. A
//! write goes this way only when its offset and length are multiples of `ALIGN` and it is at
//! least `MIN_DIRECT` long; everything else, and every read, stays buffered.
//!
//! Mixing the two on one file is coherent on Linux: a direct write first writes back and
//! drops the page cache of its range. Durability is unchanged: `fdatasync` on the buffered
//! descriptor covers the inode, so FLUSH and FUA still persist direct writes (their block
//! allocations included) and flush the device's cache.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Alignment of offset, length and memory that `O_DIRECT` needs (a page covers every
/// logical block size in use).
pub(crate) const ALIGN: usize = 4096;
/// Shorter writes stay buffered: the page cache merges them cheaply.
pub(crate) const MIN_DIRECT: usize = 64 << 10;
/// The per-thread aligned copy a write goes through, piece by piece.
const BOUNCE: usize = 1 << 20;

thread_local! {
    /// Over-allocated by `ALIGN` so that an aligned `BOUNCE` bytes always fit inside.
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether `write` may take this write.
pub(crate) fn suits(buf: &[u8], offset: u64) -> bool {
    buf.len() >= MIN_DIRECT && buf.len() & (ALIGN - 1) == 0 && offset & (ALIGN as u64 - 1) == 0
}

/// A second descriptor of the same open file (through `/proc/self/fd`, so it is the very
/// inode, not whatever the path names now) with `O_DIRECT`; None where the filesystem
/// refuses it.
pub(crate) fn reopen(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// A WRITE's payload, read straight into memory aligned for `O_DIRECT` (so a direct write
/// needs no copy): `len` bytes at an `ALIGN` boundary inside a slightly larger vector.
/// Large ones come from, and go back to, a small pool: zeroing and faulting in a fresh
/// 2 MiB vector per request was a fifth of the daemon's CPU in V1 (`perf`: memset, page
/// faults, unmapping).
pub(crate) struct Payload {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

/// Payloads of at least this many bytes are pooled, their vectors sized in steps of it.
const POOLED: usize = 64 << 10;
/// The pool keeps at most this many bytes of vectors.
const POOL_BYTES: usize = 32 << 20;

/// Vectors of pooled payloads no request holds now.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    // The vectors hold nothing that matters: a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

impl Payload {
    /// `len` bytes, aligned: zeroes, or whatever an earlier payload of the same size class
    /// left (the caller fills them all before reading any).
    pub(crate) fn new(len: usize) -> Payload {
        let size = if len >= POOLED {
            len.div_ceil(POOLED) * POOLED + ALIGN
        } else {
            len + ALIGN
        };
        let reused = (len >= POOLED)
            .then(|| {
                let mut free = pool();
                let i = free.iter().position(|v| v.len() == size)?;
                Some(free.swap_remove(i))
            })
            .flatten();
        let buf = reused.unwrap_or_else(|| vec![0u8; size]);
        // Always below ALIGN for bytes; `min` keeps the slice in bounds regardless (the
        // write then takes the bounce buffer).
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Payload { buf, start, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if self.len < POOLED {
            return;
        }
        let mut free = pool();
        let held: usize = free.iter().map(Vec::len).sum();
        if held + self.buf.len() <= POOL_BYTES {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Write `buf` at `offset` through `direct`: as it is when its memory is aligned, else
/// copied piece by piece into an aligned buffer. The caller checked [`suits`].
pub(crate) fn write(direct: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    if (buf.as_ptr() as usize) & (ALIGN - 1) == 0 {
        return direct.write_all_at(buf, offset);
    }
    BOUNCE_BUF.with(|cell| {
        let mut bounce = cell.borrow_mut();
        if bounce.len() < BOUNCE + ALIGN {
            bounce.resize(BOUNCE + ALIGN, 0);
        }
        let start = bounce.as_ptr().align_offset(ALIGN);
        let aligned = bounce
            .get_mut(start..start + BOUNCE)
            .ok_or_else(|| io::Error::other("direct write: no aligned buffer"))?;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BOUNCE);
            aligned[..n].copy_from_slice(&buf[done..done + n]);
            direct.write_all_at(&aligned[..n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_aligned_writes_suit() {
        assert!(suits(&[0u8; MIN_DIRECT], 0));
        assert!(suits(&[0u8; MIN_DIRECT], 8192));
        assert!(!suits(&[0u8; MIN_DIRECT], 512));
        assert!(!suits(&[0u8; MIN_DIRECT - ALIGN], 0));
        assert!(!suits(&[0u8; MIN_DIRECT + 1], 0));
    }

    #[test]
    fn large_payloads_reuse_their_vectors_aligned_and_small_ones_do_not() {
        let (n, ptr) = {
            let mut p = Payload::new(2 << 20);
            p.as_mut_slice().fill(7);
            (p.as_slice().len(), p.as_slice().as_ptr() as usize)
        };
        assert_eq!(n, 2 << 20);
        // Another size class first: it must not take the 2 MiB vector.
        let other = Payload::new(3 << 20);
        assert_ne!(other.as_slice().as_ptr() as usize, ptr);
        let again = Payload::new((2 << 20) - ALIGN);
        assert_eq!(again.as_slice().as_ptr() as usize % ALIGN, 0);
        assert_eq!(again.as_slice().len(), (2 << 20) - ALIGN);
        // The same size class (no other test of this binary uses it): the same vector.
        assert_eq!(again.as_slice().as_ptr() as usize, ptr, "not reused");
        drop((other, again));
        let held: usize = pool().iter().map(Vec::len).sum();
        assert!(held <= POOL_BYTES);
        let small = Payload::new(4096);
        assert!(
            small.as_slice().iter().all(|&b| b == 0),
            "small payloads start zeroed"
        );
    }

    #[test]
    fn a_direct_write_of_several_pieces_reads_back_through_the_buffered_descriptor() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("image");
        file.set_len(4 << 20).expect("size");
        // A buffered write first, so the direct one must drop the cached page it overlaps.
        file.write_all_at(&[1u8; ALIGN], ALIGN as u64)
            .expect("buffered");
        let Some(direct) = reopen(&file) else {
            eprintln!("this filesystem refuses O_DIRECT; nothing to test");
            return;
        };
        let data: Vec<u8> = (0..BOUNCE + 3 * ALIGN).map(|i| (i % 251) as u8).collect();
        write(&direct, &data, 0).expect("direct write");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).expect("read back");
        assert!(back == data, "what was written directly reads back");
        // And from aligned memory, with no copy.
        let mut aligned = Payload::new(data.len());
        assert_eq!(aligned.as_slice().as_ptr() as usize % ALIGN, 0);
        aligned.as_mut_slice().iter_mut().for_each(|b| *b ^= 0x5a);
        write(&direct, aligned.as_slice(), 2 * BOUNCE as u64).expect("aligned write");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 2 * BOUNCE as u64)
            .expect("read back");
        assert!(back == aligned.as_slice(), "the aligned write reads back");
    }
}
