//! Positional writes into a work file (a partial file, or the target itself in place) that
//! keep holes holes: data frames skip or punch their zero blocks, zero frames punch, and
//! ranges copied from the basis copy only the basis's data extents. A thin-provisioned image
//! stays thin on every path: first copy, delta, resume, `--inplace`. Block devices are the
//! exception: they have no holes, so zeros are written there.

use chunk::LEAF;
use proto::{CopyOp, Msg};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};

/// Granularity at which runs of zeros become (or stay) holes.
const HOLE_BLOCK: usize = 4096;

/// How a work file's ranges that a frame leaves as zeros must be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unwritten {
    /// The range was never written (a file created empty): it already reads as zeros.
    Hole,
    /// The range may hold old bytes (a reused partial, a target written in place): zeros
    /// must be punched (or written, on a block device).
    MayHoldData,
}

pub(crate) fn is_block_device(f: &File) -> bool {
    f.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Write one frame; returns (literal bytes, bytes copied from the basis).
pub(crate) fn write_frame(
    out: &File,
    basis: Option<&File>,
    fresh: bool,
    in_place: bool,
    msg: Msg,
) -> std::io::Result<(u64, u64)> {
    let unwritten = if fresh {
        Unwritten::Hole
    } else {
        Unwritten::MayHoldData
    };
    // Only a target written in place can be a block device; asked once per frame, not per block.
    let device = !fresh && in_place && is_block_device(out);
    match msg {
        Msg::Data { offset, data, .. } => {
            if device {
                out.write_all_at(&data, offset)?;
            } else {
                write_sparse(out, &data, offset, unwritten)?;
            }
            Ok((data.len() as u64, 0))
        }
        Msg::Zero { offset, len, .. } => {
            if !fresh {
                write_zeros(out, offset, len, device)?;
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
                if same_file || device {
                    // Punching the target's own range could destroy basis bytes that a later
                    // op reads; a device has no holes.
                    copy_dense(basis, out, op)?;
                } else {
                    copy_range(basis, out, op, unwritten)?;
                }
                copied += op.len;
            }
            Ok((0, copied))
        }
        _ => Ok((0, 0)),
    }
}

/// Write `data` at `offset` block by block: runs of 4 KiB zero blocks are skipped where the
/// file was never written, punched where it may hold old bytes; the rest is written.
fn write_sparse(out: &File, data: &[u8], offset: u64, unwritten: Unwritten) -> std::io::Result<()> {
    // (start, is zero) of the run being gathered.
    let mut run: Option<(usize, bool)> = None;
    let mut at = 0;
    let flush = |start: usize, end: usize, zero: bool| -> std::io::Result<()> {
        let off = offset + start as u64;
        match (zero, unwritten) {
            (false, _) => out.write_all_at(&data[start..end], off),
            (true, Unwritten::Hole) => Ok(()),
            (true, Unwritten::MayHoldData) => write_zeros(out, off, (end - start) as u64, false),
        }
    };
    while at < data.len() {
        let end = (at + HOLE_BLOCK).min(data.len());
        let zero = chunk::is_zero(&data[at..end]);
        match run {
            Some((_, z)) if z == zero => {}
            Some((start, z)) => {
                flush(start, at, z)?;
                run = Some((at, zero));
            }
            None => run = Some((at, zero)),
        }
        at = end;
    }
    if let Some((start, z)) = run {
        flush(start, data.len(), z)?;
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

/// Make a range read as zeros: punch a hole, or write zeros where holes cannot be punched
/// (block devices, file systems without hole punching).
pub(crate) fn write_zeros(out: &File, offset: u64, len: u64, device: bool) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    if !device {
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

/// Copy a range of the basis into the work file, extent by extent: the basis's data extents
/// are copied (in the kernel where it can), its holes are left unwritten or punched. Without
/// this, `copy_file_range` on a file system that cannot share extents reads a hole as zeros
/// and writes them out: a 64 MiB image holding 1 MiB of data became 64 MiB after a delta.
pub(crate) fn copy_range(
    basis: &File,
    out: &File,
    op: CopyOp,
    unwritten: Unwritten,
) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let end = op.src.saturating_add(op.len);
    let mut at = op.src;
    while at < end {
        // The next data at or after `at`; ENXIO: only a hole is left. A file system that
        // does not report holes answers `at` itself (all data).
        let data = match rustix::fs::seek(basis, SeekFrom::Data(at)) {
            Ok(d) => d.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => at,
        };
        if data > at {
            if unwritten == Unwritten::MayHoldData {
                write_zeros(out, op.dst + (at - op.src), data - at, false)?;
            }
            at = data;
            continue;
        }
        let hole = rustix::fs::seek(basis, SeekFrom::Hole(at)).map_or(end, |h| h.min(end));
        // A hole at `at` itself means the file changed meanwhile: copy the rest densely.
        let stop = if hole > at { hole } else { end };
        copy_dense(
            basis,
            out,
            CopyOp {
                src: at,
                len: stop - at,
                dst: op.dst + (at - op.src),
            },
        )?;
        at = stop;
    }
    Ok(())
}

/// Copy a range byte for byte, in the kernel where it can.
fn copy_dense(basis: &File, out: &File, op: CopyOp) -> std::io::Result<()> {
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

/// Bytes of a file that hold data (not holes): what an interrupted run wrote into a partial
/// file created empty. A file system that reports no holes counts as all data.
pub(crate) fn data_bytes(file: &File) -> std::io::Result<u64> {
    use rustix::fs::SeekFrom;
    let size = file.metadata()?.len();
    let mut held = 0;
    let mut at = 0;
    while at < size {
        let Ok(data) = rustix::fs::seek(file, SeekFrom::Data(at)) else {
            break; // ENXIO: only a hole is left
        };
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data)).unwrap_or(size);
        if hole <= at {
            break; // the file changed under us: count no further
        }
        held += hole.min(size) - data.min(size);
        at = hole;
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn allocated(f: &File) -> u64 {
        f.metadata().unwrap().blocks() * 512
    }

    /// A 16 MiB basis holding 64 KiB of data in two places.
    fn sparse_basis(dir: &std::path::Path) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("basis"))
            .unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[7u8; 32 << 10], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 32 << 10], 9 << 20).unwrap();
        f
    }

    fn new_file(dir: &std::path::Path, name: &str, len: u64) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn copying_from_a_sparse_basis_keeps_its_holes() {
        let t = tempfile::tempdir().unwrap();
        let basis = sparse_basis(t.path());
        let out = new_file(t.path(), "out", 16 << 20);
        let op = CopyOp {
            src: 0,
            len: 16 << 20,
            dst: 0,
        };
        copy_range(&basis, &out, op, Unwritten::Hole).unwrap();
        let mut a = vec![0u8; 16 << 20];
        let mut b = vec![0u8; 16 << 20];
        basis.read_exact_at(&mut a, 0).unwrap();
        out.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "content differs");
        assert!(
            allocated(&out) <= 256 << 10,
            "{} allocated",
            allocated(&out)
        );
    }

    #[test]
    fn copying_a_hole_over_old_data_punches_it() {
        let t = tempfile::tempdir().unwrap();
        let basis = sparse_basis(t.path());
        let out = new_file(t.path(), "out", 16 << 20);
        out.write_all_at(&vec![1u8; 16 << 20], 0).unwrap();
        let op = CopyOp {
            src: 0,
            len: 16 << 20,
            dst: 0,
        };
        copy_range(&basis, &out, op, Unwritten::MayHoldData).unwrap();
        let mut b = vec![0u8; 16 << 20];
        out.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..1 << 20].iter().all(|&x| x == 0));
        assert!(b[(1 << 20)..(1 << 20) + (32 << 10)].iter().all(|&x| x == 7));
        assert!(
            allocated(&out) <= 256 << 10,
            "{} allocated",
            allocated(&out)
        );
    }

    #[test]
    fn zero_blocks_of_data_frames_are_skipped_or_punched() {
        let t = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[4096..8192].fill(3);
        for unwritten in [Unwritten::Hole, Unwritten::MayHoldData] {
            let out = new_file(t.path(), "out", 4 << 20);
            if unwritten == Unwritten::MayHoldData {
                out.write_all_at(&vec![1u8; 4 << 20], 0).unwrap();
            }
            write_sparse(&out, &data, 1 << 20, unwritten).unwrap();
            let mut b = vec![0u8; 1 << 20];
            out.read_exact_at(&mut b, 1 << 20).unwrap();
            assert!(b == data, "{unwritten:?}: content differs");
            let limit = if unwritten == Unwritten::Hole {
                64 << 10
            } else {
                (3 << 20) + (64 << 10)
            };
            assert!(
                allocated(&out) <= limit,
                "{unwritten:?}: {} allocated",
                allocated(&out)
            );
        }
    }
}
