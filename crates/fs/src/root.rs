//! Confinement: every operation on a path that came from the wire happens beneath one
//! directory, the `Root`, and never follows a symlink out of it.
//!
//! A wire path's parent directory is opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` relative to the root's descriptor (kernels without `openat2` walk it
//! one component at a time with `O_NOFOLLOW`, refusing every symlink). The last component is
//! then handled only with `*at` calls on that descriptor that do not follow it, so a symlink
//! planted anywhere in the destination, even between two of our operations, can redirect
//! nothing outside the root. Metadata of an object is set through an `O_PATH` descriptor of
//! that very object (via `/proc/self/fd`), never by re-resolving its name.

use crate::FsError;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether `openat2` is missing (kernels before 5.6, some seccomp profiles); found out once.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory that wire paths are resolved beneath.
#[derive(Debug, Clone)]
pub struct Root {
    dir: Arc<OwnedFd>,
    path: PathBuf,
}

/// The exclusive advisory lock of a directory, held until dropped. Kernel-held (`flock`),
/// so a killed holder releases it, and nothing is left in the directory.
pub struct DirLock {
    _fd: OwnedFd,
}

/// Take the lock of a directory without waiting; `None` when another holds it. The held
/// descriptors are `O_PATH`, which cannot be locked, so the directory is opened again.
fn try_lock_dir(dir: &OwnedFd) -> std::io::Result<Option<DirLock>> {
    let fd = rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(DirLock { _fd: fd })),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// One named object beneath a root: its parent directory, held open, and its name. The
/// object itself may not exist yet.
#[derive(Debug, Clone)]
pub struct Place {
    dir: Arc<OwnedFd>,
    name: CString,
    shown: PathBuf,
}

/// The parent directory resolved last by [`Root::place_cached`]. Forget it whenever a
/// directory may have been created, removed or replaced.
#[derive(Default)]
pub struct ParentCache {
    last: Option<(Vec<u8>, Arc<OwnedFd>)>,
}

impl ParentCache {
    pub fn forget(&mut self) {
        self.last = None;
    }
}

/// What `lstat` says of an object beneath a root (one `statat`, no descriptor opened).
#[derive(Clone, Copy)]
pub struct Stat(rustix::fs::Stat);

impl Stat {
    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.0.st_mode)
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }
    pub fn is_file(&self) -> bool {
        self.file_type() == FileType::RegularFile
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == FileType::Symlink
    }
    pub fn is_block_device(&self) -> bool {
        self.file_type() == FileType::BlockDevice
    }
    pub fn size(&self) -> u64 {
        self.0.st_size as u64
    }
    /// Names of this object (hard links).
    #[allow(clippy::unnecessary_cast)]
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink as u64
    }
    /// Device number of a device node.
    #[allow(clippy::unnecessary_cast)]
    pub fn rdev(&self) -> u64 {
        self.0.st_rdev as u64
    }
    /// Device and inode: two names with the same identity are hard links of one object.
    #[allow(clippy::unnecessary_cast)]
    pub fn identity(&self) -> (u64, u64) {
        (self.0.st_dev as u64, self.0.st_ino as u64)
    }
    /// Permission bits (with setuid, setgid, sticky).
    pub fn mode(&self) -> u32 {
        self.0.st_mode & 0o7777
    }
    pub fn uid(&self) -> u32 {
        self.0.st_uid
    }
    pub fn gid(&self) -> u32 {
        self.0.st_gid
    }
    // The stat fields are C longs: 64 bits here, narrower on other targets.
    #[allow(clippy::unnecessary_cast)]
    pub fn mtime(&self) -> i64 {
        self.0.st_mtime as i64
    }
    #[allow(clippy::unnecessary_cast)]
    pub fn mtime_nsec(&self) -> i64 {
        self.0.st_mtime_nsec as i64
    }
}

/// The kind of an entry found by [`Place::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: OsString,
    pub is_dir: bool,
}

fn io(e: Errno) -> std::io::Error {
    e.into()
}

impl Root {
    /// Lock this directory against other writers; `None` when another holds the lock.
    pub fn try_lock(&self) -> std::io::Result<Option<DirLock>> {
        try_lock_dir(&self.dir)
    }

    /// Open `path` (trusted: given locally or by the daemon's config) as a root.
    pub fn open(path: &Path) -> Result<Root, FsError> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::io(path, io(e)))?;
        Ok(Root {
            dir: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A directory beneath this root as a root of its own (a daemon session's path inside
    /// its module). A symlink on the way is followed only while it stays beneath.
    pub fn beneath(&self, rel: &[u8]) -> Result<Root, FsError> {
        if rel.is_empty() {
            return Ok(self.clone());
        }
        let fd = self.open_beneath(rel, OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(Root {
            dir: Arc::new(fd),
            path: crate::join(&self.path, rel),
        })
    }

    /// Create the directories of `rel` beneath this root that are missing, like
    /// `create_dir_all`.
    pub fn create_dirs(&self, rel: &[u8]) -> Result<(), FsError> {
        let mut end = 0;
        while end < rel.len() {
            end = rel[end + 1..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(rel.len(), |i| end + 1 + i);
            let place = self.place(&rel[..end])?;
            match place.create_dir() {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(FsError::io(place.shown(), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The place named by a validated wire path ("" is the root itself).
    pub fn place(&self, rel: &[u8]) -> Result<Place, FsError> {
        self.place_cached(rel, &mut ParentCache::default())
    }

    /// The same, reusing the parent directory resolved last when it is the same one: a walk
    /// lists a directory's entries together, and resolving the parent again for each cost
    /// a no-change pass over many small files about a third more time.
    pub fn place_cached(&self, rel: &[u8], cache: &mut ParentCache) -> Result<Place, FsError> {
        let shown = crate::join(&self.path, rel);
        if let Err(why) = crate::validate_rel(rel) {
            return Err(FsError::Unsupported {
                path: shown,
                reason: format!("refused: {why}"),
            });
        }
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None if rel.is_empty() => (rel, &b"."[..]),
            None => (&rel[..0], rel),
        };
        let dir = match &cache.last {
            _ if parent.is_empty() => self.dir.clone(),
            Some((p, fd)) if p.as_slice() == parent => fd.clone(),
            _ => {
                let fd = Arc::new(self.open_beneath(parent, OFlags::PATH | OFlags::DIRECTORY)?);
                cache.last = Some((parent.to_vec(), fd.clone()));
                fd
            }
        };
        let name = CString::new(name).map_err(|_| FsError::Unsupported {
            path: shown.clone(),
            reason: "refused: NUL byte in path".into(),
        })?;
        Ok(Place { dir, name, shown })
    }

    /// Open a wire path beneath the root; `flags` should include `O_NOFOLLOW` unless a final
    /// symlink that stays beneath the root may be followed.
    pub fn open_beneath(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, FsError> {
        let shown = || crate::join(&self.path, rel);
        let flags = flags | OFlags::CLOEXEC;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        while !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(&*self.dir, rel, flags, Mode::empty(), how) {
                Ok(fd) => return Ok(fd),
                // EAGAIN: a concurrent rename somewhere made the kernel ask for a retry.
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(Errno::XDEV) => return Err(escapes(shown())),
                Err(e) => return Err(FsError::io(&shown(), io(e))),
            }
        }
        self.walk_beneath(rel, flags).map_err(|e| match e {
            Errno::LOOP => escapes(shown()),
            e => FsError::io(&shown(), io(e)),
        })
    }

    /// Open a wire path beneath the root following no symlink at all, on the way or at the
    /// end: a symlink on the way is refused (`Unsupported`), one as the last component is
    /// opened itself with `O_PATH | O_NOFOLLOW` (other flags refuse it). "" is the root. For
    /// paths a user listed (`--files-from`), where following a link that stays inside would
    /// still copy one object under two names, and one leading outside must never be read.
    pub fn open_no_symlinks(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, FsError> {
        let shown = || crate::join(&self.path, rel);
        let rel = if rel.is_empty() { &b"."[..] } else { rel };
        let flags = flags | OFlags::CLOEXEC;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        let refused = |path| FsError::Unsupported {
            path,
            reason: "refused: a symlink on the way (links are copied as links, never followed); \
                     name the path it leads to instead"
                .into(),
        };
        while !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(&*self.dir, rel, flags, Mode::empty(), how) {
                Ok(fd) => return Ok(fd),
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(Errno::LOOP | Errno::XDEV) => return Err(refused(shown())),
                Err(e) => return Err(FsError::io(&shown(), io(e))),
            }
        }
        self.walk_beneath(rel, flags).map_err(|e| match e {
            Errno::LOOP => refused(shown()),
            e => FsError::io(&shown(), io(e)),
        })
    }

    /// A directory opened as `dir` (beneath this root, by the caller) as a root of its own.
    pub(crate) fn from_fd(dir: OwnedFd, path: PathBuf) -> Root {
        Root {
            dir: Arc::new(dir),
            path,
        }
    }

    /// The same without `openat2`: one component at a time, no symlink followed at all.
    fn walk_beneath(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
        let mut parts = rel.split(|&b| b == b'/').peekable();
        let mut cur: Option<OwnedFd> = None;
        while let Some(part) = parts.next() {
            let at: BorrowedFd<'_> = match &cur {
                Some(fd) => fd.as_fd(),
                None => self.dir.as_fd(),
            };
            let last = parts.peek().is_none();
            let f = if last {
                flags | OFlags::NOFOLLOW
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let next = match rustix::fs::openat(at, part, f, Mode::empty()) {
                // O_DIRECTORY|O_NOFOLLOW on a symlink: say it is a link, not "not a directory".
                Err(Errno::NOTDIR) if is_symlink_at(at, part) => return Err(Errno::LOOP),
                r => r?,
            };
            if !last {
                // O_PATH|O_NOFOLLOW on a symlink opens the link itself; refuse it.
                let st = rustix::fs::fstat(&next)?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                    return Err(Errno::LOOP);
                }
            }
            cur = Some(next);
        }
        cur.map_or_else(|| rustix::io::dup(&*self.dir), Ok)
    }
}

fn is_symlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

fn escapes(path: PathBuf) -> FsError {
    FsError::Unsupported {
        path,
        reason: "refused: resolves outside the destination through a symlink".into(),
    }
}

impl Place {
    /// Lock the parent directory against other writers; `None` when another holds it.
    pub fn try_lock_parent(&self) -> std::io::Result<Option<DirLock>> {
        try_lock_dir(&self.dir)
    }

    /// The path shown to people (root joined with the wire path); never used for access.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    pub fn name(&self) -> &OsStr {
        OsStr::from_bytes(self.name.as_bytes())
    }

    /// Another name in the same directory (a partial or temporary file).
    pub fn sibling(&self, name: &OsStr) -> Place {
        let shown = self.shown.with_file_name(name);
        Place {
            dir: self.dir.clone(),
            // Sibling names are ours (see `partial`) and hold no NUL.
            name: CString::new(name.as_bytes()).unwrap_or_default(),
            shown,
        }
    }

    /// `lstat`: the object's own metadata, a symlink not followed; `None` when absent.
    pub fn metadata(&self) -> std::io::Result<Option<Stat>> {
        match rustix::fs::statat(&*self.dir, self.name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat(st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// An `O_PATH` descriptor of the object itself (a symlink is not followed).
    fn handle(&self) -> Result<OwnedFd, Errno> {
        rustix::fs::openat(
            &*self.dir,
            self.name.as_c_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// Open an existing regular file (or block device) to read, not following a symlink.
    pub fn open_read(&self) -> std::io::Result<File> {
        self.open(OFlags::RDONLY, Mode::empty())
    }

    /// Open for reading and writing, creating it (mode 0600) when missing; `truncate` empties it.
    pub fn open_write(&self, truncate: bool) -> std::io::Result<File> {
        let mut f = OFlags::RDWR | OFlags::CREATE;
        if truncate {
            f |= OFlags::TRUNC;
        }
        self.open(f, Mode::from_raw_mode(0o600))
    }

    /// Opens only regular files and block devices. `O_NONBLOCK` keeps a FIFO (which a peer
    /// may have made at this name) from blocking the open until a writer comes; the type is
    /// checked on the descriptor itself, so nothing can be swapped in between.
    fn open(&self, flags: OFlags, mode: Mode) -> std::io::Result<File> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(&*self.dir, self.name.as_c_str(), flags, mode).map_err(io)?;
        match FileType::from_raw_mode(rustix::fs::fstat(&fd).map_err(io)?.st_mode) {
            FileType::RegularFile => {}
            // Reads and writes of a block device honour O_NONBLOCK in some drivers.
            FileType::BlockDevice => {
                rustix::fs::fcntl_setfl(&fd, flags & !OFlags::NONBLOCK).map_err(io)?
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("not a regular file or block device ({other:?})"),
                ))
            }
        }
        Ok(File::from(fd))
    }

    pub fn create_dir(&self) -> std::io::Result<()> {
        rustix::fs::mkdirat(&*self.dir, self.name.as_c_str(), Mode::from_raw_mode(0o777))
            .map_err(io)
    }

    /// Remove a non-directory (a symlink itself, never what it points to).
    pub fn remove_file(&self) -> std::io::Result<()> {
        rustix::fs::unlinkat(&*self.dir, self.name.as_c_str(), AtFlags::empty()).map_err(io)
    }

    pub fn symlink(&self, target: &[u8]) -> std::io::Result<()> {
        rustix::fs::symlinkat(target, &*self.dir, self.name.as_c_str()).map_err(io)
    }

    pub fn read_link(&self) -> std::io::Result<Vec<u8>> {
        rustix::fs::readlinkat(&*self.dir, self.name.as_c_str(), Vec::new())
            .map(CString::into_bytes)
            .map_err(io)
    }

    /// Rename over `to` (both beneath the same root).
    pub fn rename_to(&self, to: &Place) -> std::io::Result<()> {
        rustix::fs::renameat(
            &*self.dir,
            self.name.as_c_str(),
            &*to.dir,
            to.name.as_c_str(),
        )
        .map_err(io)
    }

    /// Make `link` a new hard link to this object (a symlink is linked, not followed).
    pub fn hard_link_as(&self, link: &Place) -> std::io::Result<()> {
        rustix::fs::linkat(
            &*self.dir,
            self.name.as_c_str(),
            &*link.dir,
            link.name.as_c_str(),
            AtFlags::empty(),
        )
        .map_err(io)
    }

    pub fn make_node(&self, kind: FileType, mode: u32, rdev: u64) -> std::io::Result<()> {
        rustix::fs::mknodat(
            &*self.dir,
            self.name.as_c_str(),
            kind,
            Mode::from_raw_mode(mode),
            rdev,
        )
        .map_err(io)
    }

    /// Open this directory for listing, not following a symlink.
    fn open_dir(&self) -> Result<OwnedFd, Errno> {
        rustix::fs::openat(
            &*self.dir,
            self.name.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// The names in this directory (without `.` and `..`), sorted.
    pub fn list(&self) -> std::io::Result<Vec<Listed>> {
        let fd = self.open_dir().map_err(io)?;
        list_fd(fd).map_err(io)
    }

    /// The number of entries this object stands for: 1, or 1 plus everything below a directory.
    pub fn count_tree(&self) -> u64 {
        match self.metadata() {
            Ok(Some(md)) if md.is_dir() => {
                1 + self
                    .list()
                    .and_then(|l| {
                        l.iter()
                            .map(|e| self.child(&e.name).map(|c| c.count_tree()))
                            .sum()
                    })
                    .unwrap_or(0)
            }
            Ok(Some(_)) => 1,
            _ => 0,
        }
    }

    /// Remove this object, and everything below it when it is a directory, without ever
    /// following a symlink.
    pub fn remove_tree(&self) -> std::io::Result<()> {
        match self.metadata()? {
            None => Ok(()),
            Some(md) if md.is_dir() => {
                for e in self.list()? {
                    self.child(&e.name)?.remove_tree()?;
                }
                rustix::fs::unlinkat(&*self.dir, self.name.as_c_str(), AtFlags::REMOVEDIR)
                    .map_err(io)
            }
            Some(_) => self.remove_file(),
        }
    }

    /// An entry of this directory, with the directory opened beneath its own parent.
    fn child(&self, name: &OsStr) -> std::io::Result<Place> {
        let dir = self.open_dir().map_err(io)?;
        Ok(Place {
            dir: Arc::new(dir),
            name: CString::new(name.as_bytes()).map_err(std::io::Error::other)?,
            shown: self.shown.join(name),
        })
    }

    /// A handle to set metadata on the object itself: `None` for a symlink, which has no mode
    /// or extended attributes of its own on Linux.
    pub fn meta_handle(&self) -> std::io::Result<MetaHandle> {
        let fd = self.handle().map_err(io)?;
        let st = rustix::fs::fstat(&fd).map_err(io)?;
        let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        Ok(MetaHandle {
            fd,
            is_link,
            place: self.clone(),
        })
    }
}

/// The object of a `Place`, held open: metadata is set on exactly this inode.
pub struct MetaHandle {
    fd: OwnedFd,
    is_link: bool,
    place: Place,
}

impl MetaHandle {
    pub fn is_link(&self) -> bool {
        self.is_link
    }

    /// The `/proc/self/fd` path of the held object: calls that follow it reach this very inode.
    /// Only for a non-symlink, where following is what we want.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    pub fn shown(&self) -> &Path {
        self.place.shown()
    }

    pub fn chown(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        let (u, g) = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        // AT_EMPTY_PATH works on an O_PATH descriptor, symlink or not.
        rustix::fs::chownat(&self.fd, c"", u, g, AtFlags::EMPTY_PATH).map_err(io)
    }

    pub fn chmod(&self, mode: u32) -> std::io::Result<()> {
        if self.is_link {
            return Ok(());
        }
        rustix::fs::chmod(self.proc_path(), Mode::from_raw_mode(mode)).map_err(io)
    }

    pub fn set_times(&self, times: &rustix::fs::Timestamps) -> std::io::Result<()> {
        if self.is_link {
            let p = &self.place;
            return rustix::fs::utimensat(
                &*p.dir,
                p.name.as_c_str(),
                times,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io);
        }
        rustix::fs::utimensat(rustix::fs::CWD, self.proc_path(), times, AtFlags::empty())
            .map_err(io)
    }
}

/// Read a directory descriptor's names, sorted, with whether each is a directory.
fn list_fd(fd: OwnedFd) -> Result<Vec<Listed>, Errno> {
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Unknown => rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                .unwrap_or(false),
            t => t == FileType::Directory,
        };
        out.push(Listed {
            name: OsString::from_vec(name.to_bytes().to_vec()),
            is_dir,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Root) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("root/sub")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../outside", t.path().join("root/escape")).unwrap();
        std::os::unix::fs::symlink("sub", t.path().join("root/inside")).unwrap();
        let root = Root::open(&t.path().join("root")).unwrap();
        (t, root)
    }

    fn refused(r: Result<Place, FsError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(p) => panic!("{} was not refused", p.shown().display()),
        }
    }

    #[test]
    fn a_symlink_out_of_the_root_is_never_followed() {
        let (t, root) = tree();
        assert!(refused(root.place(b"escape/x")).contains("outside the destination"));
        assert!(refused(root.place(b"escape/secret")).contains("outside the destination"));
        // The final component is the link itself: writing there replaces the link.
        let p = root.place(b"escape").unwrap();
        let md = p.metadata().unwrap().unwrap();
        assert!(md.is_symlink());
        assert!(p.open_write(true).is_err(), "O_NOFOLLOW must refuse");
        let tmp = p.sibling(OsStr::new("t"));
        std::fs::write(t.path().join("root/t"), b"new").unwrap();
        tmp.rename_to(&p).unwrap();
        assert_eq!(
            std::fs::read(t.path().join("outside/secret")).unwrap(),
            b"s"
        );
        assert_eq!(std::fs::read(t.path().join("root/escape")).unwrap(), b"new");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking_for_reading_or_writing() {
        let (t, root) = tree();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("root/p"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let p = root.place(b"p").unwrap();
        // Without O_NONBLOCK the read-only open would wait for a writer forever.
        for e in [p.open_read().unwrap_err(), p.open_write(false).unwrap_err()] {
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        std::fs::write(t.path().join("root/f"), b"x").unwrap();
        let mut read = String::new();
        let mut f = root.place(b"f").unwrap().open_read().unwrap();
        std::io::Read::read_to_string(&mut f, &mut read).unwrap();
        assert_eq!(read, "x");
    }

    #[test]
    fn a_symlink_that_stays_inside_is_followed_for_parents() {
        let (t, root) = tree();
        let p = root.place(b"inside/f").unwrap();
        std::io::Write::write_all(&mut p.open_write(true).unwrap(), b"x").unwrap();
        assert_eq!(std::fs::read(t.path().join("root/sub/f")).unwrap(), b"x");
    }

    #[test]
    fn the_fallback_walk_refuses_every_symlink() {
        let (t, root) = tree();
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        assert_eq!(
            root.walk_beneath(b"escape", flags).unwrap_err(),
            Errno::LOOP
        );
        assert_eq!(
            root.walk_beneath(b"inside", flags).unwrap_err(),
            Errno::LOOP
        );
        assert!(root.walk_beneath(b"sub", flags).is_ok());
        drop(t);
    }

    #[test]
    fn session_roots_are_made_and_opened_beneath() {
        let (t, root) = tree();
        root.create_dirs(b"new/deeper/still").unwrap();
        assert!(t.path().join("root/new/deeper/still").is_dir());
        let inner = root.beneath(b"new/deeper").unwrap();
        inner.place(b"still").unwrap().metadata().unwrap().unwrap();
        assert!(root.beneath(b"escape").is_err());
        assert!(root.create_dirs(b"escape/made").is_err());
        assert!(!t.path().join("outside/made").exists());
        assert!(root.beneath(b"inside").is_ok());
    }

    #[test]
    fn open_no_symlinks_refuses_every_link_on_the_way_and_opens_a_last_one_itself() {
        let (t, root) = tree();
        std::fs::write(t.path().join("root/sub/f"), b"x").unwrap();
        let path = OFlags::PATH | OFlags::NOFOLLOW;
        for on_the_way in [&b"inside/f"[..], b"escape/secret"] {
            let e = root.open_no_symlinks(on_the_way, path).unwrap_err();
            assert!(e.to_string().contains("a symlink on the way"), "{e}");
        }
        let link = root.open_no_symlinks(b"escape", path).unwrap();
        let st = rustix::fs::fstat(&link).unwrap();
        assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Symlink);
        assert!(root.open_no_symlinks(b"sub/f", path).is_ok());
        assert!(root.open_no_symlinks(b"", path | OFlags::DIRECTORY).is_ok());
        let e = root.open_no_symlinks(b"sub/missing", path).unwrap_err();
        assert!(
            matches!(e, FsError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
    }

    #[test]
    fn lexically_bad_paths_are_refused() {
        let (_t, root) = tree();
        for bad in [&b"../x"[..], b"/etc/passwd", b"a/../b", b"a\0b"] {
            assert!(refused(root.place(bad)).contains("refused"));
        }
    }

    #[test]
    fn remove_tree_stays_beneath_and_does_not_follow_links() {
        let (t, root) = tree();
        std::fs::create_dir_all(t.path().join("root/d/e")).unwrap();
        std::fs::write(t.path().join("root/d/e/f"), b"1").unwrap();
        std::os::unix::fs::symlink("../../outside", t.path().join("root/d/out")).unwrap();
        let d = root.place(b"d").unwrap();
        assert_eq!(d.count_tree(), 4);
        d.remove_tree().unwrap();
        assert!(!t.path().join("root/d").exists());
        assert!(t.path().join("outside/secret").exists());
    }

    #[test]
    fn metadata_is_set_on_the_object_not_a_swapped_link() {
        let (t, root) = tree();
        std::fs::write(t.path().join("root/f"), b"1").unwrap();
        let h = root.place(b"f").unwrap().meta_handle().unwrap();
        // Swap the name for a link out of the root after the handle was taken.
        std::fs::rename(t.path().join("root/f"), t.path().join("root/g")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", t.path().join("root/f")).unwrap();
        h.chmod(0o600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(t.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("root/g"), 0o600);
        assert_ne!(mode("outside/secret"), 0o600);
    }
}
