//! Metadata: capture an `Entry` from `lstat`, compare it with what the destination has, and
//! apply it (owner, mode, xattrs, then mtime last, since every other change bumps it).

use crate::{FsError, IoContext};
use proto::{Entry, EntryKind, Xattr};
use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid, CWD};
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What of the metadata the receiver sets besides mode and mtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOpts {
    pub owners: bool,
    pub xattrs: bool,
}

/// Build the wire entry for `abs` from its `lstat` metadata.
pub fn capture(rel: Vec<u8>, abs: &Path, md: &Metadata, xattrs: bool) -> Result<Entry, FsError> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        use std::os::unix::ffi::OsStrExt;
        let target = std::fs::read_link(abs).at(abs)?;
        EntryKind::Symlink {
            target: target.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_char_device() {
        EntryKind::CharDevice { rdev: md.rdev() }
    } else if ft.is_block_device() {
        EntryKind::BlockDevice { rdev: md.rdev() }
    } else {
        return Err(FsError::Unsupported {
            path: abs.to_path_buf(),
            reason: "sockets are not copied".into(),
        });
    };
    let size = if matches!(kind, EntryKind::File) {
        md.size()
    } else {
        0
    };
    let xattrs = if xattrs && !ft.is_symlink() {
        read_xattrs(abs)?
    } else {
        Vec::new()
    };
    Ok(Entry {
        path: rel,
        kind,
        size,
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        xattrs,
    })
}

/// Extended attributes of `path` (not following a symlink), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<Xattr>, FsError> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(FsError::io(path, e)),
    };
    for name in names {
        if let Some(value) = xattr::get(path, &name).at(path)? {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Size and mtime (to the nanosecond) say the content is unchanged, as rsync's quick check.
pub fn quick_match(md: &Metadata, e: &Entry) -> bool {
    md.is_file()
        && md.size() == e.size
        && md.mtime() == e.mtime_sec
        && md.mtime_nsec() == i64::from(e.mtime_nsec)
}

/// Whether mode, owner, mtime or xattrs of the destination differ from the entry.
pub fn differs(md: &Metadata, path: &Path, e: &Entry, opts: ApplyOpts) -> bool {
    let is_link = md.file_type().is_symlink();
    if !is_link && md.mode() & 0o7777 != e.mode {
        return true;
    }
    if opts.owners && (md.uid() != e.uid || md.gid() != e.gid) {
        return true;
    }
    if md.mtime() != e.mtime_sec || md.mtime_nsec() != i64::from(e.mtime_nsec) {
        return true;
    }
    if opts.xattrs && !is_link {
        return read_xattrs(path).map(|x| x != e.xattrs).unwrap_or(true);
    }
    false
}

fn times(e: &Entry) -> Timestamps {
    let mtime = Timespec {
        tv_sec: e.mtime_sec,
        tv_nsec: i64::from(e.mtime_nsec) as _,
    };
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn owner(e: &Entry) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid)))
}

/// Apply metadata to an open regular file (the temp file, before its rename).
pub fn apply_file(file: &File, path: &Path, e: &Entry, opts: ApplyOpts) -> Result<(), FsError> {
    let err = |x: rustix::io::Errno| FsError::io(path, x.into());
    if opts.owners {
        let (u, g) = owner(e);
        rustix::fs::fchown(file, u, g).map_err(err)?;
    }
    rustix::fs::fchmod(file, Mode::from_raw_mode(e.mode)).map_err(err)?;
    if opts.xattrs {
        set_xattrs(path, &e.xattrs)?;
    }
    rustix::fs::futimens(file, &times(e)).map_err(err)
}

/// Apply metadata by path without following a final symlink (directories, links, nodes).
pub fn apply_path(path: &Path, e: &Entry, opts: ApplyOpts) -> Result<(), FsError> {
    let err = |x: rustix::io::Errno| FsError::io(path, x.into());
    let is_link = matches!(e.kind, EntryKind::Symlink { .. });
    if opts.owners {
        let (u, g) = owner(e);
        rustix::fs::chownat(CWD, path, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
    }
    if !is_link {
        rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(e.mode), AtFlags::empty())
            .map_err(err)?;
        if opts.xattrs {
            set_xattrs(path, &e.xattrs)?;
        }
    }
    rustix::fs::utimensat(CWD, path, &times(e), AtFlags::SYMLINK_NOFOLLOW).map_err(err)
}

/// Make the xattrs of `path` exactly `want`.
fn set_xattrs(path: &Path, want: &[Xattr]) -> Result<(), FsError> {
    use std::os::unix::ffi::OsStrExt;
    let have = read_xattrs(path)?;
    for h in &have {
        if !want.iter().any(|w| w.name == h.name) {
            xattr::remove(path, std::ffi::OsStr::from_bytes(&h.name)).at(path)?;
        }
    }
    for w in want {
        if !have.iter().any(|h| h == w) {
            xattr::set(path, std::ffi::OsStr::from_bytes(&w.name), &w.value).at(path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_then_apply_round_trips_mode_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"hello").unwrap();
        let md = std::fs::symlink_metadata(&a).unwrap();
        let mut e = capture(b"a".to_vec(), &a, &md, false).unwrap();
        e.mode = 0o640;
        e.mtime_sec = 1_000_000_000;
        e.mtime_nsec = 123_456_789;
        let b = dir.path().join("b");
        std::fs::write(&b, b"hello").unwrap();
        let f = File::open(&b).unwrap();
        apply_file(&f, &b, &e, ApplyOpts::default()).unwrap();
        let md = std::fs::symlink_metadata(&b).unwrap();
        assert!(quick_match(&md, &e));
        assert!(!differs(&md, &b, &e, ApplyOpts::default()));
        assert_eq!(md.mode() & 0o7777, 0o640);
    }
}
