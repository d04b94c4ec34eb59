//! The streaming walker: yields one `ScanItem` per object below a root, directory by directory
//! in name order, never holding more than the directory stack and the current directory.

use crate::{meta, partial, Filter, FsError, Root};
use proto::{Entry, EntryKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Facts about a scanned object that stay on the scanning side.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalInfo {
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
}

impl LocalInfo {
    pub fn of(md: &std::fs::Metadata) -> Self {
        LocalInfo {
            dev: md.dev(),
            ino: md.ino(),
            nlink: md.nlink(),
            ctime_sec: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScanItem {
    pub entry: Entry,
    pub abs: PathBuf,
    pub local: LocalInfo,
    /// The walk's root when it is a directory: content is opened beneath it.
    root: Option<Root>,
}

impl ScanItem {
    /// The object at `rel` beneath `root` (a path of a `--files-from` list), reached without
    /// following any symlink, on the way or at the end (a symlink is the link itself):
    /// `Ok(None)` when nothing is there, or a non-directory stands on the way. A symlink on
    /// the way is refused (`FsError::Unsupported`). Content is opened beneath `root`.
    pub fn beneath(root: &Root, rel: &[u8], xattrs: bool) -> Result<Option<ScanItem>, FsError> {
        use rustix::fs::OFlags;
        let fd = match root.open_no_symlinks(rel, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => fd,
            Err(FsError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let abs = crate::join(root.path(), rel);
        // fstat of the object opened above, not a second lookup of its name.
        let md = std::fs::File::from(fd)
            .metadata()
            .map_err(|e| FsError::io(&abs, e))?;
        let entry = meta::capture(rel.to_vec(), &abs, &md, xattrs)?;
        Ok(Some(ScanItem {
            entry,
            abs,
            local: LocalInfo::of(&md),
            root: Some(root.clone()),
        }))
    }

    /// The same object stated again (a rescan): new entry and local facts, same place.
    pub fn restated(&self, entry: Entry, local: LocalInfo) -> ScanItem {
        ScanItem {
            entry,
            abs: self.abs.clone(),
            local,
            root: self.root.clone(),
        }
    }

    /// Open the object to read its content, beneath the walk's root and never through a
    /// symlink: one swapped in after the scan (a daemon module a client can also write to)
    /// must not make us read and send a file from outside.
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        use rustix::fs::OFlags;
        let beneath = self.root.as_ref().and_then(|root| {
            let rel = self.abs.strip_prefix(root.path()).ok()?;
            (!rel.as_os_str().is_empty()).then_some((root, rel))
        });
        match beneath {
            Some((root, rel)) => root
                .open_beneath(
                    rel.as_os_str().as_bytes(),
                    OFlags::RDONLY | OFlags::NOFOLLOW,
                )
                .map(std::fs::File::from)
                .map_err(|e| match e {
                    FsError::Io { source, .. } => source,
                    other => {
                        std::io::Error::new(std::io::ErrorKind::PermissionDenied, other.to_string())
                    }
                }),
            // The root itself: named locally, as the user or the daemon's config gave it.
            _ => std::fs::File::open(&self.abs),
        }
    }
}

pub struct Walker {
    inner: Box<dyn Iterator<Item = walkdir::Result<walkdir::DirEntry>> + Send>,
    root: PathBuf,
    confine: Option<Root>,
    prefix: Vec<u8>,
    xattrs: bool,
}

impl Walker {
    /// Walk `root`. With `copy_dir_itself` (rsync's `SRC` without a trailing slash) every path
    /// starts with the root's own name; otherwise the root is "" and paths are its contents.
    /// A root that is a file or a block device yields exactly one entry, named after it.
    pub fn new(
        root: &Path,
        copy_dir_itself: bool,
        filter: Arc<Filter>,
        xattrs: bool,
    ) -> Result<Self, FsError> {
        let md = std::fs::metadata(root).map_err(|e| FsError::io(root, e))?;
        let name = root
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let prefix = if md.is_dir() && !copy_dir_itself {
            Vec::new()
        } else {
            name
        };
        let confine = if md.is_dir() {
            Some(Root::open(root)?)
        } else {
            None
        };
        Ok(Self::build(root, prefix, filter, xattrs, confine, true))
    }

    /// Walk the directory at `rel` beneath `root` (a directory of a `--files-from` list) and
    /// everything below it, naming every item as a walk of the whole root would (`rel/…`, the
    /// directory itself `rel`). The directory is reached without following any symlink
    /// (`Root::open_no_symlinks`), and content is opened beneath it.
    pub fn subtree(
        root: &Root,
        rel: &[u8],
        filter: Arc<Filter>,
        xattrs: bool,
    ) -> Result<Self, FsError> {
        use rustix::fs::OFlags;
        let dir =
            root.open_no_symlinks(rel, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW)?;
        let abs = crate::join(root.path(), rel);
        let confine = Root::from_fd(dir, abs.clone());
        // Not even a link swapped in for the directory since it was opened is followed.
        Ok(Self::build(
            &abs,
            rel.to_vec(),
            filter,
            xattrs,
            Some(confine),
            false,
        ))
    }

    fn build(
        root: &Path,
        prefix: Vec<u8>,
        filter: Arc<Filter>,
        xattrs: bool,
        confine: Option<Root>,
        follow_root: bool,
    ) -> Self {
        let root_buf = root.to_path_buf();
        let f_root = root_buf.clone();
        let f_prefix = prefix.clone();
        let inner = walkdir::WalkDir::new(root)
            .follow_links(false)
            .follow_root_links(follow_root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(move |d| {
                if d.depth() == 0 {
                    return true;
                }
                if partial::is_internal(d.file_name()) {
                    return false;
                }
                let rel = rel_path(&f_prefix, &f_root, d.path());
                !filter.excluded(&rel, d.file_type().is_dir())
            });
        Walker {
            inner: Box::new(inner),
            confine,
            root: root_buf,
            prefix,
            xattrs,
        }
    }
}

fn rel_path(prefix: &[u8], root: &Path, abs: &Path) -> Vec<u8> {
    let tail = abs.strip_prefix(root).unwrap_or(Path::new(""));
    let tail = tail.as_os_str().as_bytes();
    match (prefix.is_empty(), tail.is_empty()) {
        (true, _) => tail.to_vec(),
        (false, true) => prefix.to_vec(),
        (false, false) => {
            let mut v = Vec::with_capacity(prefix.len() + 1 + tail.len());
            v.extend_from_slice(prefix);
            v.push(b'/');
            v.extend_from_slice(tail);
            v
        }
    }
}

impl Iterator for Walker {
    type Item = Result<ScanItem, FsError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item()
    }
}

impl Walker {
    /// Open content beneath `jail` (a daemon module), through descriptors, rather than by the
    /// root's path: a symlink swapped into the path after the session was checked leads
    /// nowhere. A single file is opened beneath its directory.
    pub fn confined_to(mut self, jail: &Path) -> Result<Self, FsError> {
        let outside = || FsError::Unsupported {
            path: self.root.clone(),
            reason: format!("refused: not beneath {}", jail.display()),
        };
        let rel = self.root.strip_prefix(jail).map_err(|_| outside())?;
        let dir = if self.confine.is_some() {
            rel
        } else {
            rel.parent().ok_or_else(outside)?
        };
        self.confine = Some(Root::open(jail)?.beneath(dir.as_os_str().as_bytes())?);
        Ok(self)
    }

    fn next_item(&mut self) -> Option<Result<ScanItem, FsError>> {
        let d = match self.inner.next()? {
            Ok(d) => d,
            Err(e) => {
                let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                let vanished = e
                    .io_error()
                    .map(|io| io.kind() == std::io::ErrorKind::NotFound)
                    .unwrap_or(false);
                return Some(Err(if vanished {
                    FsError::Vanished { path }
                } else {
                    let msg = e.to_string();
                    FsError::io(
                        &path,
                        e.into_io_error()
                            .unwrap_or_else(|| std::io::Error::other(msg)),
                    )
                }));
            }
        };
        let abs = d.path().to_path_buf();
        // A root that is a symlink to a directory is walked through, so it is listed as the
        // directory it leads to (a daemon session rooted at a link inside its module).
        let md = match d.metadata() {
            Ok(m) if d.depth() == 0 && m.is_symlink() => std::fs::metadata(&abs)
                .ok()
                .filter(|t| t.is_dir())
                .map_or(Ok(m), Ok),
            other => other,
        };
        let md = match md {
            Ok(m) => m,
            Err(e) => {
                let vanished = e
                    .io_error()
                    .map(|io| io.kind() == std::io::ErrorKind::NotFound)
                    .unwrap_or(false);
                return Some(Err(if vanished {
                    FsError::Vanished { path: abs }
                } else {
                    let msg = e.to_string();
                    FsError::io(
                        &abs,
                        e.into_io_error()
                            .unwrap_or_else(|| std::io::Error::other(msg)),
                    )
                }));
            }
        };
        let rel = rel_path(&self.prefix, &self.root, &abs);
        let mut entry = match meta::capture(rel, &abs, &md, self.xattrs) {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        if d.depth() == 0 && md.file_type().is_block_device() {
            // A block device named as the source is a volume: its content is synchronised.
            let size = std::fs::File::open(&abs)
                .map_err(|e| FsError::io(&abs, e))
                .and_then(|f| crate::volume::size_of(&f, &abs));
            match size {
                Ok(s) => {
                    entry.kind = EntryKind::Volume;
                    entry.size = s;
                }
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(ScanItem {
            entry,
            abs,
            local: LocalInfo::of(&md),
            root: self.confine.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(root: &Path, itself: bool, filter: Filter) -> Vec<String> {
        Walker::new(root, itself, Arc::new(filter), false)
            .unwrap()
            .map(|r| String::from_utf8(r.unwrap().entry.path).unwrap())
            .collect()
    }

    #[test]
    fn walks_in_order_with_prefix_and_filters() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("src");
        std::fs::create_dir_all(r.join("b/c")).unwrap();
        std::fs::write(r.join("a.txt"), b"1").unwrap();
        std::fs::write(r.join("b/c/d.log"), b"2").unwrap();
        std::fs::write(r.join(".cutover.0011223344556677.part"), b"x").unwrap();
        std::os::unix::fs::symlink("a.txt", r.join("z")).unwrap();
        assert_eq!(
            names(&r, false, Filter::default()),
            vec!["", "a.txt", "b", "b/c", "b/c/d.log", "z"]
        );
        assert_eq!(
            names(&r, true, Filter::default()),
            vec![
                "src",
                "src/a.txt",
                "src/b",
                "src/b/c",
                "src/b/c/d.log",
                "src/z"
            ]
        );
        let f = Filter::new(&[proto::FilterRule::Exclude("*.log".into())]).unwrap();
        assert_eq!(names(&r, false, f), vec!["", "a.txt", "b", "b/c", "z"]);
        let single = names(&r.join("a.txt"), false, Filter::default());
        assert_eq!(single, vec!["a.txt"]);
    }

    #[test]
    fn a_subtree_is_named_as_in_the_whole_walk_and_beneath_never_follows_a_link() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("src");
        std::fs::create_dir_all(r.join("a/b/c")).unwrap();
        std::fs::write(r.join("a/b/c/f"), b"1").unwrap();
        std::os::unix::fs::symlink("a", r.join("lnk")).unwrap();
        let root = Root::open(&r).unwrap();
        let names: Vec<String> = Walker::subtree(&root, b"a/b", Arc::default(), false)
            .unwrap()
            .map(|i| String::from_utf8(i.unwrap().entry.path).unwrap())
            .collect();
        assert_eq!(names, vec!["a/b", "a/b/c", "a/b/c/f"]);
        let f = ScanItem::beneath(&root, b"a/b/c/f", false)
            .unwrap()
            .unwrap();
        assert_eq!(f.entry.path, b"a/b/c/f");
        let mut read = String::new();
        std::io::Read::read_to_string(&mut f.open().unwrap(), &mut read).unwrap();
        assert_eq!(read, "1");
        let link = ScanItem::beneath(&root, b"lnk", false).unwrap().unwrap();
        assert!(matches!(link.entry.kind, EntryKind::Symlink { .. }));
        assert!(ScanItem::beneath(&root, b"lnk/b", false).is_err());
        assert!(Walker::subtree(&root, b"lnk", Arc::default(), false).is_err());
        assert!(ScanItem::beneath(&root, b"a/nope", false)
            .unwrap()
            .is_none());
        assert!(ScanItem::beneath(&root, b"a/b/c/f/g", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn missing_root_names_the_path() {
        let e = Walker::new(Path::new("/nonexistent/x"), false, Arc::default(), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
    }
}
