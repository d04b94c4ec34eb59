//! The crate's error type. Every message is one line that names the metadata file and,
//! where there is one, the fix: these reach an operator through `cutover volume …`.

use std::io;
use std::path::PathBuf;

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "{}: already holds the metadata of volume {volume}; pass --force to replace it \
         (its dirty bitmap is lost, so peers need a full resync)",
        path.display()
    )]
    Exists { path: PathBuf, volume: String },
    #[error(
        "{}: exists and is not volume metadata; refusing to overwrite it (check the path, \
         or pass --force to replace the file)",
        path.display()
    )]
    NotEmpty { path: PathBuf },
    #[error(
        "{}: no such metadata file; create it with `cutover volume create-md`",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error(
        "{}: not cutover volume metadata (no superblock magic); check the path, or create \
         it with `cutover volume create-md`",
        path.display()
    )]
    NotMeta { path: PathBuf },
    #[error(
        "{}: both superblock copies are damaged ({a}; {b}); restore the file from a backup \
         or re-create it with `cutover volume create-md --force` (peers then need a full \
         resync)",
        path.display()
    )]
    Corrupt { path: PathBuf, a: String, b: String },
    #[error(
        "{}: metadata format version {found} is newer than this cutover understands \
         ({supported}); upgrade cutover",
        path.display()
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{}: the metadata describes {meta} bytes but the backing holds {backing}; \
         point it at the right backing, or re-create the metadata with \
         `cutover volume create-md --force` after resizing",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        meta: u64,
        backing: u64,
    },
    #[error(
        "{}: in use by another process (it holds the lock); stop that `cutover serve` first",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{}: the metadata is closed; open it again to track writes",
        path.display()
    )]
    Closed { path: PathBuf },
    #[error(
        "{}: an earlier metadata write failed ({why}); writes are refused until the volume \
         is reopened (the file is left as the last successful write made it)",
        path.display()
    )]
    Failed { path: PathBuf, why: String },
    #[error(
        "{}: this node is secondary: its peers' primary writes the volume; promote it with \
         `cutover volume primary`",
        path.display()
    )]
    Secondary { path: PathBuf },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, what: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    pub(crate) fn invalid(path: &std::path::Path, why: impl Into<String>) -> Error {
        Error::Invalid {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }
}

impl From<Error> for io::Error {
    /// For the NBD server: a failed `before_write` fails the request with `NBD_EIO`
    /// (or the value the underlying I/O error maps to).
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Secondary { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    }
}
