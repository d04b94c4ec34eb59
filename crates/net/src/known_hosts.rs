//! The client's known-hosts file: which certificate fingerprint each daemon address showed the
//! first time (trust on first use, like ssh's `known_hosts`).
//!
//! One line per daemon: `HOST:PORT sha256:HEX`; blank lines and `#` comments are kept. The
//! file is rewritten whole (temp file, fsync, rename) under a lock, so concurrent clients never
//! lose each other's lines and a crash never leaves half a file.

use crate::tls::Fingerprint;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something other than a regular file stands where the file (or its lock) would be.
    #[error(transparent)]
    File(#[from] cofs::safe_write::SafeWriteError),
    #[error("{path}:{line}: {why}; fix or delete that line")]
    Malformed {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

/// What the file says about one daemon address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Pinned {
        line: usize,
        fingerprint: Fingerprint,
    },
    Unknown,
}

/// A known-hosts file larger than this is not one.
const MAX_SIZE: u64 = 64 << 20;

pub struct KnownHosts {
    path: PathBuf,
}

impl KnownHosts {
    pub fn new(path: impl Into<PathBuf>) -> KnownHosts {
        KnownHosts { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> KnownHostsError {
        KnownHostsError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read(&self) -> Result<String, KnownHostsError> {
        use cofs::safe_write::{read_regular, SafeWriteError};
        match read_regular(&self.path, MAX_SIZE) {
            Ok(t) => String::from_utf8(t)
                .map_err(|e| self.io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(SafeWriteError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(String::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The fingerprint pinned for `host` (as `HOST:PORT`).
    pub fn lookup(&self, host: &str) -> Result<Lookup, KnownHostsError> {
        self.find(&self.read()?, host)
    }

    /// What `text` (this file's contents) pins for `host`.
    fn find(&self, text: &str, host: &str) -> Result<Lookup, KnownHostsError> {
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut words = l.split_whitespace();
            let (Some(name), Some(fp), None) = (words.next(), words.next(), words.next()) else {
                return Err(KnownHostsError::Malformed {
                    path: self.path.clone(),
                    line: i + 1,
                    why: "expected HOST:PORT sha256:FINGERPRINT".into(),
                });
            };
            if name != host {
                continue;
            }
            let fingerprint = Fingerprint::parse(fp).map_err(|why| KnownHostsError::Malformed {
                path: self.path.clone(),
                line: i + 1,
                why,
            })?;
            return Ok(Lookup::Pinned {
                line: i + 1,
                fingerprint,
            });
        }
        Ok(Lookup::Unknown)
    }

    /// Whether a pin could be recorded: the file is a regular file or absent (never a
    /// symlink, FIFO or device, which [`record`](Self::record) refuses to replace). Lets a
    /// client refuse before it connects.
    pub fn check_writable(&self) -> Result<(), KnownHostsError> {
        Ok(cofs::safe_write::check_replaceable(&self.path)?)
    }

    /// Pin `fingerprint` for `host` unless the file already names the host.
    pub fn record(&self, host: &str, fingerprint: Fingerprint) -> Result<(), KnownHostsError> {
        self.rewrite(|this, text| {
            if this.find(text, host)? != Lookup::Unknown {
                return Ok(false);
            }
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("{host} {fingerprint}\n"));
            Ok(true)
        })
    }

    /// Drop the pin of `host`, as `ssh-keygen -R` does (a daemon whose key was replaced on
    /// purpose, or a test port reused by another daemon).
    pub fn forget(&self, host: &str) -> Result<(), KnownHostsError> {
        self.rewrite(|_, text| {
            let kept: String = text
                .lines()
                .filter(|l| l.split_whitespace().next() != Some(host))
                .map(|l| format!("{l}\n"))
                .collect();
            let changed = kept.len() != text.len();
            *text = kept;
            Ok(changed)
        })
    }

    /// Change the file under its lock; `change` says whether there is anything to write.
    fn rewrite(
        &self,
        change: impl FnOnce(&Self, &mut String) -> Result<bool, KnownHostsError>,
    ) -> Result<(), KnownHostsError> {
        // Refuse a symlink, FIFO or device before making the directory or the lock file.
        self.check_writable()?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| self.io(e))?;
        let lock_path = self.path.with_extension("lock");
        let lock = cofs::safe_write::open_lock(&lock_path, 0o644)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            KnownHostsError::Io {
                path: lock_path.clone(),
                source: e.into(),
            }
        })?;
        let mut text = self.read()?;
        if !change(self, &mut text)? {
            return Ok(());
        }
        cofs::safe_write::replace(&self.path, text.as_bytes(), 0o644)?;
        Ok(())
        // The lock is released when `lock` is dropped.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_looks_up_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let kh = KnownHosts::new(dir.path().join("sub/known_hosts"));
        assert_eq!(kh.lookup("h:1").unwrap(), Lookup::Unknown);
        let a = Fingerprint::of(b"a");
        let b = Fingerprint::of(b"b");
        kh.record("h:1", a).unwrap();
        kh.record("h:2", b).unwrap();
        kh.record("h:1", b).unwrap(); // already pinned: unchanged
        assert_eq!(
            kh.lookup("h:1").unwrap(),
            Lookup::Pinned {
                line: 1,
                fingerprint: a
            }
        );
        assert_eq!(
            kh.lookup("h:2").unwrap(),
            Lookup::Pinned {
                line: 2,
                fingerprint: b
            }
        );
        kh.forget("h:1").unwrap();
        assert_eq!(kh.lookup("h:1").unwrap(), Lookup::Unknown);
        assert_eq!(
            kh.lookup("h:2").unwrap(),
            Lookup::Pinned {
                line: 1,
                fingerprint: b
            }
        );
        std::fs::write(kh.path(), "# comment\nh:3 sha256:zz\n").unwrap();
        let e = kh.lookup("h:3").unwrap_err().to_string();
        assert!(e.contains("known_hosts:2"), "{e}");
    }
}
