//! File-system side of cutover: the streaming walker, include/exclude filters, metadata
//! capture and apply, partial-file naming, volume (block device) sizing, and writing the
//! files cutover keeps for itself (`safe_write`) without replacing what is not a regular file.
//!
//! Knows nothing about the network; the engine drives it.

pub mod filter;
pub mod meta;
pub mod partial;
pub mod root;
pub mod safe_write;
pub mod volume;
pub mod walk;

pub use filter::Filter;
pub use root::{DirLock, Place, Root};
pub use walk::{LocalInfo, ScanItem, Walker};

use std::path::{Path, PathBuf};

/// A file-system error, always naming the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: vanished while being scanned", path.display())]
    Vanished { path: PathBuf },
    #[error("bad filter pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
}

impl FsError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        FsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Attach a path to an `io::Result`.
pub trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, FsError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T, FsError> {
        self.map_err(|e| FsError::io(path, e))
    }
}

/// Join a wire path (relative, '/'-separated bytes) onto a root; "" is the root itself.
pub fn join(root: &Path, rel: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    }
}

/// Check that a wire path is relative, normalised and free of `..`, NUL and empty components.
/// This is the lexical half of confinement; `Root` adds symlink-safe resolution.
pub fn validate_rel(rel: &[u8]) -> Result<(), String> {
    if rel.is_empty() {
        return Ok(());
    }
    if rel[0] == b'/' {
        return Err("absolute path".into());
    }
    if rel.contains(&0) {
        return Err("NUL byte in path".into());
    }
    if rel.len() > 4096 {
        return Err("path longer than 4096 bytes".into());
    }
    for comp in rel.split(|&b| b == b'/') {
        match comp {
            b"" => return Err("empty path component".into()),
            b"." | b".." => return Err("'.' or '..' component".into()),
            c if c.len() > 255 => return Err("name longer than 255 bytes".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_paths_are_validated() {
        assert!(validate_rel(b"").is_ok());
        assert!(validate_rel(b"a/b/c.txt").is_ok());
        assert!(validate_rel(b"/etc/passwd").is_err());
        assert!(validate_rel(b"a/../../x").is_err());
        assert!(validate_rel(b"a//b").is_err());
        assert!(validate_rel(b"a/\0b").is_err());
        assert!(validate_rel(&[b'x'; 256]).is_err());
    }
}
