//! Writing files the user named (or files in a directory the user named) without destroying
//! what stands there: replace only a regular file or nothing (through a temporary file beside
//! it and `rename`), append or lock only a regular file, and never follow a symlink in the
//! last component, never block on a FIFO, never write into a device.
//!
//! Every cutover file that is not a destination file (port files, plan logs and reports,
//! known-hosts, identities, spool files, lock files) is written through here; destination
//! files go through [`crate::Root`].

use rustix::fs::{Mode, OFlags};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a file was wanted for: the fix an error suggests depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Replace,
    Append,
    Lock,
    Write,
    Read,
}

impl Purpose {
    fn verb(self) -> &'static str {
        match self {
            Purpose::Replace => "replace",
            Purpose::Append => "append to",
            Purpose::Lock => "lock",
            Purpose::Write => "write to",
            Purpose::Read => "read",
        }
    }
}

/// Why a file was not written. Its message is one line naming the path.
#[derive(Debug, thiserror::Error)]
pub enum SafeWriteError {
    #[error("{}: {}", path.display(), reason(what, *purpose))]
    NotRegular {
        path: PathBuf,
        /// "a symlink", "a directory", "a FIFO", "a socket", "a character device", ...
        what: &'static str,
        purpose: Purpose,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn reason(what: &str, purpose: Purpose) -> String {
    if purpose == Purpose::Read {
        return format!("is {what}, not a regular file; name a regular file");
    }
    format!(
        "is {what}, not a regular file; name a new file or a regular file to {}",
        purpose.verb()
    )
}

impl SafeWriteError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SafeWriteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            SafeWriteError::NotRegular { path, .. } | SafeWriteError::Io { path, .. } => path,
        }
    }

    /// The message without the path (for callers that name the file themselves).
    pub fn reason(&self) -> String {
        match self {
            SafeWriteError::NotRegular { what, purpose, .. } => reason(what, *purpose),
            SafeWriteError::Io { source, .. } => source.to_string(),
        }
    }

    /// As an `io::Error` whose message is the whole line (kind kept for I/O errors).
    pub fn into_io(self) -> std::io::Error {
        let kind = match &self {
            SafeWriteError::Io { source, .. } => source.kind(),
            SafeWriteError::NotRegular { .. } => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

/// Ok when nothing stands at `path` or a regular file does (never following a symlink);
/// otherwise the error that says what stands there. Checks only: changes nothing.
pub fn check_replaceable(path: &Path) -> Result<(), SafeWriteError> {
    check(path, Purpose::Replace)
}

/// [`check_replaceable`] for a file something else will open and write (a database).
pub fn check(path: &Path, purpose: Purpose) -> Result<(), SafeWriteError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(SafeWriteError::NotRegular {
            path: path.to_path_buf(),
            what: crate::meta::kind_name(m.file_type()),
            purpose,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SafeWriteError::io(path, e)),
    }
}

/// A complete new version of a file, written into a temporary file beside it and put in
/// place by [`Replacement::commit`]. Dropped uncommitted, the temporary file is removed and
/// the target is untouched.
#[derive(Debug)]
pub struct Replacement {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    done: bool,
}

impl Replacement {
    /// Check that `target` is a regular file or absent, and create the temporary file (mode
    /// `mode` before the umask) in its directory with `O_CREAT|O_EXCL|O_NOFOLLOW`.
    pub fn begin(target: &Path, mode: u32) -> Result<Replacement, SafeWriteError> {
        check(target, Purpose::Replace)?;
        let (file, temp) = create_temp_beside(target, mode)?;
        Ok(Replacement {
            target: target.to_path_buf(),
            temp,
            file,
            done: false,
        })
    }

    /// The temporary file, to write (or to hand to a child process as its output).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the temporary file is.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// fsync the data, check the target again, rename over it, fsync the directory.
    pub fn commit(mut self) -> Result<(), SafeWriteError> {
        self.file
            .sync_all()
            .map_err(|e| SafeWriteError::io(&self.temp, e))?;
        check(&self.target, Purpose::Replace)?;
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| SafeWriteError::io(&self.target, e))?;
        self.done = true;
        sync_parent(&self.target);
        Ok(())
    }

    /// Put the file in place only if nothing stands at the target (a hard link, which never
    /// replaces). Returns false, leaving the target alone, when something does.
    pub fn commit_new(self) -> Result<bool, SafeWriteError> {
        self.file
            .sync_all()
            .map_err(|e| SafeWriteError::io(&self.temp, e))?;
        match std::fs::hard_link(&self.temp, &self.target) {
            Ok(()) => {
                sync_parent(&self.target);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(SafeWriteError::io(&self.target, e)),
        }
        // Drop removes the temporary name either way.
    }
}

impl Drop for Replacement {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Replace (or create) `path` with `data`, mode `mode` for a new file; see [`Replacement`].
pub fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), SafeWriteError> {
    let r = Replacement::begin(path, mode)?;
    (&r.file)
        .write_all(data)
        .map_err(|e| SafeWriteError::io(&r.temp, e))?;
    r.commit()
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Create `.<name>.<unique>.tmp` in `target`'s directory, exclusively and without following.
fn create_temp_beside(target: &Path, mode: u32) -> Result<(File, PathBuf), SafeWriteError> {
    let name = target
        .file_name()
        .ok_or_else(|| SafeWriteError::NotRegular {
            path: target.to_path_buf(),
            what: "a directory",
            purpose: Purpose::Replace,
        })?
        .to_string_lossy();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for _ in 0..16 {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{:x}.{nanos:x}.{seq}", std::process::id());
        let temp = target.with_file_name(format!(".{name}.{unique}.tmp"));
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        match rustix::fs::open(&temp, flags | OFlags::CLOEXEC, Mode::from_raw_mode(mode)) {
            Ok(fd) => return Ok((File::from(fd), temp)),
            Err(rustix::io::Errno::EXIST) => last = Some(temp),
            Err(e) => return Err(SafeWriteError::io(&temp, e.into())),
        }
    }
    let temp = last.unwrap_or_else(|| target.to_path_buf());
    Err(SafeWriteError::io(
        &temp,
        std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    ))
}

fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Open `path` to append to (created with `mode` if absent): never through a symlink, never
/// blocking on a FIFO, and only if it is a regular file.
pub fn open_append(path: &Path, mode: u32) -> Result<File, SafeWriteError> {
    open_regular(path, OFlags::WRONLY | OFlags::APPEND, mode, Purpose::Append)
}

/// Open (creating with `mode` if absent, never truncating) `path` read-write to hold a lock
/// on it, under the same rules as [`open_append`].
pub fn open_lock(path: &Path, mode: u32) -> Result<File, SafeWriteError> {
    open_regular(path, OFlags::RDWR, mode, Purpose::Lock)
}

fn open_regular(
    path: &Path,
    access: OFlags,
    mode: u32,
    purpose: Purpose,
) -> Result<File, SafeWriteError> {
    // Look before opening: opening some devices (a tape) does something by itself.
    check(path, purpose)?;
    let flags = access | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::from_raw_mode(mode)) {
        Ok(fd) => fd,
        // ELOOP: a symlink; EISDIR: a directory; ENXIO: a socket (or a FIFO without a
        // reader, opened for writing). Say what stands there.
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::ISDIR | rustix::io::Errno::NXIO) => {
            check(path, purpose)?;
            return Err(SafeWriteError::io(
                path,
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        Err(e) => return Err(SafeWriteError::io(path, e.into())),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| SafeWriteError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(SafeWriteError::NotRegular {
            path: path.to_path_buf(),
            what: crate::meta::kind_name(meta.file_type()),
            purpose,
        });
    }
    let fl = rustix::fs::fcntl_getfl(&file).map_err(|e| SafeWriteError::io(path, e.into()))?;
    rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK)
        .map_err(|e| SafeWriteError::io(path, e.into()))?;
    Ok(file)
}

/// Read a regular file of at most `limit` bytes (a symlink to one is fine: reading changes
/// nothing), without blocking on a FIFO or reading a device.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, SafeWriteError> {
    use std::io::Read;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::empty())
        .map_err(|e| SafeWriteError::io(path, e.into()))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| SafeWriteError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(SafeWriteError::NotRegular {
            path: path.to_path_buf(),
            what: crate::meta::kind_name(meta.file_type()),
            purpose: Purpose::Read,
        });
    }
    if meta.len() > limit {
        return Err(SafeWriteError::io(
            path,
            std::io::Error::other(format!("larger than {limit} bytes")),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(limit)
        .read_to_end(&mut out)
        .map_err(|e| SafeWriteError::io(path, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};

    fn mkfifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn replaces_a_regular_file_or_nothing() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("port");
        replace(&p, b"1\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"1\n");
        replace(&p, b"22\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"22\n");
        assert!(leftovers(t.path()).is_empty());
    }

    #[test]
    fn refuses_to_replace_a_symlink_fifo_or_directory() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let dangling = t.path().join("dangling");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &dangling).unwrap();
        let fifo = t.path().join("fifo");
        mkfifo(&fifo);
        let dir = t.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        for (p, what) in [
            (&link, "a symlink"),
            (&dangling, "a symlink"),
            (&fifo, "a FIFO"),
            (&dir, "a directory"),
        ] {
            let e = replace(p, b"x", 0o644).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{}: is {what}", p.display())),
                "{msg}"
            );
            assert!(msg.contains("name a new file or a regular file"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
        assert!(!t.path().join("nowhere").exists());
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(leftovers(t.path()).is_empty());
    }

    #[test]
    fn refuses_to_replace_a_device_when_root_can_make_one() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let null = t.path().join("null");
        let dev = rustix::fs::makedev(1, 3);
        let (file_type, mode) = (
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
        );
        rustix::fs::mknodat(rustix::fs::CWD, &null, file_type, mode, dev).unwrap();
        let msg = replace(&null, b"x", 0o644).unwrap_err().to_string();
        assert!(
            msg.contains("is a character device, not a regular file"),
            "{msg}"
        );
        let msg = open_append(&null, 0o644).unwrap_err().to_string();
        assert!(
            msg.contains("is a character device, not a regular file"),
            "{msg}"
        );
        let m = std::fs::symlink_metadata(&null).unwrap();
        assert!(m.file_type().is_char_device());
        assert!(leftovers(t.path()).is_empty());
    }

    #[test]
    fn replacement_dropped_uncommitted_leaves_no_trace() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("out");
        std::fs::write(&p, b"old").unwrap();
        let r = Replacement::begin(&p, 0o600).unwrap();
        r.file().write_all(b"new").unwrap();
        assert!(r.temp_path().exists());
        drop(r);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(leftovers(t.path()).is_empty());
    }

    #[test]
    fn temp_file_is_made_with_the_mode_asked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("secret");
        replace(&p, b"k", 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn commit_new_never_replaces() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("id");
        let r = Replacement::begin(&p, 0o600).unwrap();
        r.file().write_all(b"first").unwrap();
        assert!(r.commit_new().unwrap());
        let r = Replacement::begin(&p, 0o600).unwrap();
        r.file().write_all(b"second").unwrap();
        assert!(!r.commit_new().unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert!(leftovers(t.path()).is_empty());
    }

    #[test]
    fn appends_only_to_regular_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("t.log");
        open_append(&p, 0o644).unwrap().write_all(b"a\n").unwrap();
        open_append(&p, 0o644).unwrap().write_all(b"b\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"a\nb\n");

        let outside = t.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let link = t.path().join("link.log");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let fifo = t.path().join("fifo.log");
        mkfifo(&fifo);
        // A FIFO with a reader would be opened without O_NONBLOCK's ENXIO: keep one open.
        let fifo_reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let unread = t.path().join("unread.log");
        mkfifo(&unread);
        let dir = t.path().join("dir.log");
        std::fs::create_dir(&dir).unwrap();
        for (p, what) in [
            (&link, "a symlink"),
            (&fifo, "a FIFO"),
            (&unread, "a FIFO"),
            (&dir, "a directory"),
        ] {
            let msg = open_append(p, 0o644).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("{}: is {what}", p.display())),
                "{msg}"
            );
            assert!(msg.contains("to append to"), "{msg}");
            let msg = open_lock(p, 0o644).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("{}: is {what}", p.display())),
                "{msg}"
            );
        }
        drop(fifo_reader);
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    }

    #[test]
    fn appended_file_blocks_normally() {
        let t = tempfile::tempdir().unwrap();
        let f = open_append(&t.path().join("x"), 0o644).unwrap();
        let fl = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!fl.contains(OFlags::NONBLOCK));
        assert!(fl.contains(OFlags::APPEND));
    }

    #[test]
    fn reads_only_regular_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("id.pem");
        std::fs::write(&p, b"pem").unwrap();
        let link = t.path().join("link.pem");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_regular(&link, 10).unwrap(), b"pem");
        assert!(read_regular(&p, 2).is_err());
        let fifo = t.path().join("fifo");
        mkfifo(&fifo);
        let msg = read_regular(&fifo, 10).unwrap_err().to_string();
        assert!(msg.contains("is a FIFO"), "{msg}");
        let msg = read_regular(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is a character device"), "{msg}");
    }
}
