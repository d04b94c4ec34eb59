//! Volumes: block devices and image files synchronised by fixed blocks, written in place.

use crate::FsError;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// `BLKGETSIZE64`: _IOR(0x12, 114, size_t).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of a block device (by ioctl) or of a regular file.
pub fn size_of(file: &File, path: &Path) -> Result<u64, FsError> {
    let md = file.metadata().map_err(|e| FsError::io(path, e))?;
    if !md.file_type().is_block_device() {
        return Ok(md.len());
    }
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for that.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(FsError::io(path, std::io::Error::last_os_error()));
    }
    Ok(size)
}

/// Whether `path` (following links) is a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}
