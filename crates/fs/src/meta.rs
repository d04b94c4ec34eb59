//! Metadata: capture an `Entry` from `lstat`, compare it with what the destination has, and
//! apply it (owner, mode, xattrs, then mtime last, since every other change bumps it).

use crate::root::Stat;
use crate::{FsError, IoContext, Place};
use proto::{Entry, EntryKind, Xattr};
use rustix::fs::{Gid, Mode, Timespec, Timestamps, Uid};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use xattr::FileExt;

/// What of the metadata the receiver sets besides mode and mtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOpts {
    pub owners: bool,
    pub xattrs: bool,
}

/// What kind of object a file type (from `lstat`) is, with its article, for messages.
pub fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "an object of unknown type"
    }
}

/// Build the wire entry for `abs` from its `lstat` metadata.
pub fn capture(rel: Vec<u8>, abs: &Path, md: &Metadata, xattrs: bool) -> Result<Entry, FsError> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
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
    read_xattrs_of(XattrsOf::Path(path)).at(path)
}

/// Where extended attributes are read or written: a path not followed (the source side), an
/// open file, or a held object's `/proc/self/fd` path, followed to exactly that object.
#[derive(Clone, Copy)]
enum XattrsOf<'a> {
    Path(&'a Path),
    File(&'a File),
    Held(&'a Path),
}

impl XattrsOf<'_> {
    fn list(self) -> std::io::Result<xattr::XAttrs> {
        match self {
            XattrsOf::Path(p) => xattr::list(p),
            XattrsOf::File(f) => f.list_xattr(),
            XattrsOf::Held(p) => xattr::list_deref(p),
        }
    }
    fn get(self, name: &OsStr) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            XattrsOf::Path(p) => xattr::get(p, name),
            XattrsOf::File(f) => f.get_xattr(name),
            XattrsOf::Held(p) => xattr::get_deref(p, name),
        }
    }
    fn set(self, name: &OsStr, value: &[u8]) -> std::io::Result<()> {
        match self {
            XattrsOf::Path(p) => xattr::set(p, name, value),
            XattrsOf::File(f) => f.set_xattr(name, value),
            XattrsOf::Held(p) => xattr::set_deref(p, name, value),
        }
    }
    fn remove(self, name: &OsStr) -> std::io::Result<()> {
        match self {
            XattrsOf::Path(p) => xattr::remove(p, name),
            XattrsOf::File(f) => f.remove_xattr(name),
            XattrsOf::Held(p) => xattr::remove_deref(p, name),
        }
    }
}

fn read_xattrs_of(of: XattrsOf<'_>) -> std::io::Result<Vec<Xattr>> {
    let mut out = Vec::new();
    let names = match of.list() {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        if let Some(value) = of.get(&name)? {
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
pub fn quick_match(md: &Stat, e: &Entry) -> bool {
    md.is_file()
        && md.size() == e.size
        && md.mtime() == e.mtime_sec
        && md.mtime_nsec() == i64::from(e.mtime_nsec)
}

/// Whether mode, owner, mtime or xattrs of the destination differ from the entry.
pub fn differs(md: &Stat, place: &Place, e: &Entry, opts: ApplyOpts) -> bool {
    let is_link = md.is_symlink();
    if !is_link && md.mode() != e.mode {
        return true;
    }
    if opts.owners && (md.uid() != e.uid || md.gid() != e.gid) {
        return true;
    }
    if md.mtime() != e.mtime_sec || md.mtime_nsec() != i64::from(e.mtime_nsec) {
        return true;
    }
    if opts.xattrs && !is_link {
        let held = place.meta_handle();
        return held
            .and_then(|h| read_xattrs_of(XattrsOf::Held(&h.proc_path())))
            .map(|x| x != e.xattrs)
            .unwrap_or(true);
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
        set_xattrs(XattrsOf::File(file), &e.xattrs).at(path)?;
    }
    rustix::fs::futimens(file, &times(e)).map_err(err)
}

/// Apply metadata to the object at `place` (directories, links, nodes, unchanged files),
/// through a descriptor of that object, so a name swapped meanwhile redirects nothing.
pub fn apply_place(place: &Place, e: &Entry, opts: ApplyOpts) -> Result<(), FsError> {
    let held = place.meta_handle().at(place.shown())?;
    let at = |r: std::io::Result<()>| r.at(place.shown());
    if opts.owners {
        at(held.chown(e.uid, e.gid))?;
    }
    if !held.is_link() {
        at(held.chmod(e.mode))?;
        if opts.xattrs {
            at(set_xattrs(XattrsOf::Held(&held.proc_path()), &e.xattrs))?;
        }
    }
    at(held.set_times(&times(e)))
}

/// Make the xattrs of an object exactly `want`.
fn set_xattrs(of: XattrsOf<'_>, want: &[Xattr]) -> std::io::Result<()> {
    let have = read_xattrs_of(of)?;
    for h in &have {
        if !want.iter().any(|w| w.name == h.name) {
            of.remove(OsStr::from_bytes(&h.name))?;
        }
    }
    for w in want {
        if !have.iter().any(|h| h == w) {
            of.set(OsStr::from_bytes(&w.name), &w.value)?;
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
        let place = crate::Root::open(dir.path()).unwrap().place(b"b").unwrap();
        let md = place.metadata().unwrap().unwrap();
        assert!(quick_match(&md, &e));
        assert!(!differs(&md, &place, &e, ApplyOpts::default()));
        assert_eq!(md.mode(), 0o640);
    }
}
