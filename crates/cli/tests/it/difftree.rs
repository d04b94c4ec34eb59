//! Seeded generators for the differential test (`differential.rs`): trees holding every entry
//! type the engine handles (files empty to multi-MiB, sparse files, directories, relative and
//! dangling symlinks, FIFOs, hard-link groups, user.* xattrs, odd names) and edit scripts over
//! them; plus a metadata scan of a tree (inode, links, blocks, xattrs, content hash) that the
//! checks compare. Everything the generator does is logged as one line, so a failure can print
//! what happened and replay it from its seed.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Patterns the option generator may exclude; the name generator makes names that match them.
pub const EXCLUDES: [&str; 4] = ["*.log", "cache/", "/top*", "skip-me"];

const FILE_MODES: [u32; 8] = [0o644, 0o600, 0o755, 0o444, 0o4755, 0o2750, 0o000, 0o1644];
const DIR_MODES: [u32; 4] = [0o755, 0o700, 0o1777, 0o555];
/// Owners the generator hands out (the tests run as root, so rsync -a compares them).
const OWNERS: [(u32, u32); 3] = [(0, 0), (1000, 1000), (4242, 77)];
/// Oldest mtime the generator sets (2020-09-13).
const EPOCH: i64 = 1_600_000_000;

/// The generator's state: one seeded PRNG, a counter for unique names, and the log.
pub struct Gen {
    pub rng: StdRng,
    counter: u32,
    big_files: u32,
    sparse_files: u32,
    /// One line per operation, in order (tree building and edits alike).
    pub log: Vec<String>,
    /// Whether edits may put a non-directory where a directory was. Without `--delete`
    /// cutover (like rsync) refuses to remove a directory with its contents, so the harness
    /// only makes such edits when the case syncs with `--delete`.
    pub replace_dirs: bool,
}

/// What kind of entry sits at a path (from lstat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Link,
    Fifo,
    Other,
}

pub fn kind_of(p: &Path) -> Option<Kind> {
    let md = std::fs::symlink_metadata(p).ok()?;
    let ft = md.file_type();
    Some(if ft.is_symlink() {
        Kind::Link
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if md.mode() & 0o170000 == 0o010000 {
        Kind::Fifo
    } else {
        Kind::Other
    })
}

/// A path for the log: relative to the tree, bytes escaped as Rust's Debug does.
pub fn show(root: &Path, p: &Path) -> String {
    format!("{:?}", p.strip_prefix(root).unwrap_or(p).as_os_str())
}

/// Every entry below `root` (not `root`), sorted by bytes, so listings are deterministic.
pub fn entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if kind_of(&p) == Some(Kind::Dir) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    out
}

fn of_kind(root: &Path, k: Kind) -> Vec<PathBuf> {
    entries(root)
        .into_iter()
        .filter(|p| kind_of(p) == Some(k))
        .collect()
}

/// Remove whatever is at `p` (a directory with its contents).
pub fn remove(p: &Path) {
    let r = if kind_of(p) == Some(Kind::Dir) {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    r.unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
}

/// Replace the content of `p` in place (same inode, so hard links see it), writing only the
/// 4 KiB blocks that are not all zero: zero blocks stay (or become) holes.
pub fn write_sparse(p: &Path, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096)
                .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }
    f.set_len(data.len() as u64)
        .unwrap_or_else(|e| panic!("set_len {}: {e}", p.display()));
}

pub fn mtime_of(p: &Path) -> (i64, i64) {
    let md = std::fs::symlink_metadata(p).expect("lstat for mtime");
    (md.mtime(), md.mtime_nsec())
}

/// Set the mtime of `p` (not following a symlink).
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

fn mkfifo(p: &Path) {
    use rustix::fs::{FileType, Mode, CWD};
    rustix::fs::mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o644), 0)
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

fn chown(p: &Path, uid: u32, gid: u32) {
    use rustix::fs::{AtFlags, Gid, Uid, CWD};
    rustix::fs::chownat(
        CWD,
        p,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            counter: 0,
            big_files: 0,
            sparse_files: 0,
            log: Vec::new(),
            replace_dirs: true,
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())].clone())
        }
    }

    /// A new name, unique in the tree (by the counter): mostly plain, sometimes odd (space,
    /// newline, leading dash, unicode, invalid UTF-8, 200+ bytes), sometimes one an exclude
    /// pattern matches.
    fn name(&mut self, prefix: &str) -> OsString {
        self.counter += 1;
        let n = self.counter;
        let mut v: Vec<u8> = match self.rng.random_range(0..20) {
            0 => format!("{prefix}{n} with  spaces ").into(),
            1 => format!("{prefix}{n}\nnewline").into(),
            2 => format!("-{prefix}{n}").into(),
            3 => format!("{prefix}{n}-ünïcødé-日本語-🦀").into(),
            4 => {
                let mut v: Vec<u8> = format!("{prefix}{n}-").into();
                v.extend_from_slice(b"\xff\xfe-\x80latin1-\xe9");
                v
            }
            5 => {
                let mut v: Vec<u8> = format!("{prefix}{n}-").into();
                let len = self.rng.random_range(200..=255) - v.len();
                v.extend(std::iter::repeat_n(b'L', len));
                v
            }
            6 => format!("{prefix}{n}.log").into(),
            7 => format!("top{prefix}{n}").into(),
            8 => format!(".hidden-{prefix}{n}").into(),
            9 => format!("{prefix}{n} tab\tand\\backslash*?[x]").into(),
            _ => format!("{prefix}{n}").into(),
        };
        v.truncate(255);
        OsString::from_vec(v)
    }

    /// A name for a new directory: sometimes `cache` or `skip-me` (exclude bait).
    fn dir_name(&mut self, parent: &Path) -> OsString {
        let special = match self.rng.random_range(0..10) {
            0 => Some("cache"),
            1 => Some("skip-me"),
            _ => None,
        };
        match special {
            Some(s) if kind_of(&parent.join(s)).is_none() => OsString::from(s),
            _ => self.name("d"),
        }
    }

    /// A random directory of the tree (the root included), favouring shallow ones.
    fn some_dir(&mut self, root: &Path) -> PathBuf {
        let mut dirs = vec![root.to_path_buf()];
        dirs.extend(of_kind(root, Kind::Dir));
        if self.rng.random_bool(0.3) {
            root.to_path_buf()
        } else {
            self.pick(&dirs).unwrap_or_else(|| root.to_path_buf())
        }
    }

    /// A random past mtime with nanoseconds.
    fn past(&mut self) -> (i64, i64) {
        (
            EPOCH + self.rng.random_range(0..100_000_000),
            self.rng.random_range(0..1_000_000_000),
        )
    }

    /// Content for a new regular file: empty, small, up to 256 KiB, or (rarely, at most 2 per
    /// tree) 1-4 MiB.
    fn content(&mut self) -> Vec<u8> {
        let size = match self.rng.random_range(0..100) {
            0..10 => 0,
            10..65 => self.rng.random_range(1..65536),
            65..95 => self.rng.random_range(65536..262144),
            _ if self.big_files < 2 => {
                self.big_files += 1;
                self.rng.random_range(1 << 20..4 << 20)
            }
            _ => self.rng.random_range(1..4096),
        };
        let mut data = self.bytes(size);
        // Some text-like files compress and have repeated runs (delta finds matches).
        if size > 0 && self.rng.random_bool(0.2) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = b"lorem ipsum dolor sit amet\n"[i % 27];
            }
        }
        data
    }

    /// A sparse file's content: 2-24 MiB mostly holes, a few random 4-200 KiB extents.
    fn sparse_content(&mut self) -> Vec<u8> {
        let size = self.rng.random_range(2usize << 20..24 << 20);
        let mut data = vec![0u8; size];
        for _ in 0..self.rng.random_range(1..6) {
            let len = self.rng.random_range(4096..200 << 10).min(size);
            let at = self.rng.random_range(0..=size - len);
            self.rng.fill_bytes(&mut data[at..at + len]);
        }
        data
    }

    fn xattr(&mut self, p: &Path) {
        let k = format!("user.k{}", self.rng.random_range(0..4));
        let len = self.rng.random_range(0..64);
        let v = self.bytes(len);
        xattr::set(p, &k, &v).unwrap_or_else(|e| panic!("setxattr {}: {e}", p.display()));
        self.log
            .push(format!("xattr {} {k}={}B", show_any(p), v.len()));
    }

    /// Create one new entry of a random kind somewhere below `root`.
    pub fn create_one(&mut self, root: &Path) {
        let dir = self.some_dir(root);
        let roll = self.rng.random_range(0..100);
        let (what, p) = match roll {
            0..16 => {
                let p = dir.join(self.dir_name(&dir));
                if kind_of(&p).is_some() {
                    return;
                }
                std::fs::create_dir(&p).expect("mkdir");
                ("dir", p)
            }
            16..58 => {
                let p = dir.join(self.name("f"));
                let data = self.content();
                write_sparse(&p, &data);
                ("file", p)
            }
            58..63 if self.sparse_files < 2 => {
                self.sparse_files += 1;
                let p = dir.join(self.name("sparse"));
                let data = self.sparse_content();
                write_sparse(&p, &data);
                ("sparse", p)
            }
            58..76 => {
                let p = dir.join(self.name("l"));
                let target = self.link_target(root, &dir);
                std::os::unix::fs::symlink(&target, &p).expect("symlink");
                self.log
                    .push(format!("symlink {} -> {target:?}", show(root, &p)));
                return;
            }
            76..81 => {
                let p = dir.join(self.name("fifo"));
                mkfifo(&p);
                ("fifo", p)
            }
            _ => {
                let files = of_kind(root, Kind::File);
                let Some(orig) = self.pick(&files) else {
                    return;
                };
                let p = dir.join(self.name("h"));
                std::fs::hard_link(&orig, &p).expect("hard link");
                self.log.push(format!(
                    "hardlink {} = {}",
                    show(root, &p),
                    show(root, &orig)
                ));
                return;
            }
        };
        self.log.push(format!("{what} {}", show(root, &p)));
        self.decorate(root, &p);
    }

    /// Random mode, owner, xattrs and mtime for a new entry.
    fn decorate(&mut self, root: &Path, p: &Path) {
        let k = kind_of(p);
        if self.rng.random_bool(0.25) {
            let mode = if k == Some(Kind::Dir) {
                DIR_MODES[self.rng.random_range(0..DIR_MODES.len())]
            } else {
                FILE_MODES[self.rng.random_range(0..FILE_MODES.len())]
            };
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            self.log.push(format!("  chmod {mode:o} {}", show(root, p)));
        }
        if self.rng.random_bool(0.15) {
            let (u, g) = OWNERS[self.rng.random_range(0..OWNERS.len())];
            chown(p, u, g);
            self.log.push(format!("  chown {u}:{g} {}", show(root, p)));
        }
        if matches!(k, Some(Kind::File | Kind::Dir)) && self.rng.random_bool(0.2) {
            self.xattr(p);
        }
        if k != Some(Kind::Dir) {
            let (s, ns) = self.past();
            set_mtime(p, s, ns);
        }
    }

    /// A symlink target: relative to an existing entry, dangling relative, or absolute dangling.
    fn link_target(&mut self, root: &Path, dir: &Path) -> OsString {
        let all = entries(root);
        let depth = dir
            .strip_prefix(root)
            .map(|r| r.iter().count())
            .unwrap_or(0);
        match (self.rng.random_range(0..10), self.pick(&all)) {
            (0..6, Some(t)) => {
                let rel = t.strip_prefix(root).unwrap_or(&t);
                let mut v = OsString::new();
                for _ in 0..depth {
                    v.push("../");
                }
                v.push(rel.as_os_str());
                v
            }
            (6..8, _) | (0..6, None) => OsString::from(format!("nowhere/{}", self.counter)),
            _ => OsString::from("/nonexistent/absolute/target"),
        }
    }

    /// Build a tree of about `n` entries at `root` (created).
    pub fn tree(&mut self, root: &Path, n: usize) {
        std::fs::create_dir_all(root).expect("mkdir root");
        self.log.push(format!("tree of {n} entries:"));
        for _ in 0..n {
            self.create_one(root);
        }
    }
}

/// `p` shown without a root (for helpers that do not know it).
fn show_any(p: &Path) -> String {
    let name = p.file_name().unwrap_or(OsStr::new(""));
    format!("…/{:?}", name)
}

/// One edit of a source tree; `Gen::edit` picks one at random.
impl Gen {
    /// Apply one random edit below `root` and log it. `deletes` favours removals and renames
    /// (the edits that strand partial files after a killed run).
    pub fn edit(&mut self, root: &Path, deletes: bool) {
        let roll = if deletes {
            *[9u32, 9, 5, 5, 7, 1]
                .get(self.rng.random_range(0..6))
                .unwrap_or(&9)
        } else {
            self.rng.random_range(0..19)
        };
        match roll {
            0 => self.edit_in_place(root),
            1 => self.resize(root, false),
            2 => self.resize(root, true),
            3 => self.insert(root),
            4 => self.rewrite(root),
            5 => self.rename(root),
            6 => self.replace_with_dir(root),
            7 => self.dir_to_other(root),
            8 => self.replace_with_symlink(root),
            9 => self.delete(root),
            10 => self.chmod(root),
            11 => self.touch(root),
            12 => self.sparse_edit(root),
            13 | 14 => self.create_one(root),
            15 => self.xattr_edit(root),
            16 => self.link_edit(root),
            17 => self.chown_edit(root),
            _ => self.swap(root),
        }
    }

    /// Bump the mtime of `p` by 1 s to 11 days, so a same-size edit is always seen.
    fn bump(&mut self, p: &Path) {
        let (s, ns) = mtime_of(p);
        let d = self.rng.random_range(1..1_000_000);
        set_mtime(p, s + d, ns);
    }

    fn pick_file(&mut self, root: &Path, nonempty: bool) -> Option<(PathBuf, Vec<u8>)> {
        let files: Vec<PathBuf> = of_kind(root, Kind::File)
            .into_iter()
            .filter(|p| !nonempty || std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
            .collect();
        let p = self.pick(&files)?;
        let data = read(&p);
        Some((p, data))
    }

    fn edit_in_place(&mut self, root: &Path) {
        let Some((p, mut data)) = self.pick_file(root, true) else {
            return;
        };
        let mut what = Vec::new();
        for _ in 0..self.rng.random_range(1..4) {
            let len = self.rng.random_range(1..=data.len().min(20000));
            let at = self.rng.random_range(0..=data.len() - len);
            self.rng.fill_bytes(&mut data[at..at + len]);
            what.push(format!("{at}+{len}"));
        }
        write_sparse(&p, &data);
        self.bump(&p);
        self.log.push(format!(
            "overwrite {} at {}",
            show(root, &p),
            what.join(",")
        ));
    }

    fn resize(&mut self, root: &Path, grow: bool) {
        let Some((p, mut data)) = self.pick_file(root, !grow) else {
            return;
        };
        let old = data.len();
        if grow {
            let more = self.rng.random_range(1..300_000);
            data.extend(self.bytes(more));
        } else {
            data.truncate(self.rng.random_range(0..old));
        }
        write_sparse(&p, &data);
        self.bump(&p);
        self.log.push(format!(
            "{} {} {old} -> {}",
            if grow { "grow" } else { "truncate" },
            show(root, &p),
            data.len()
        ));
    }

    fn insert(&mut self, root: &Path) {
        let Some((p, mut data)) = self.pick_file(root, false) else {
            return;
        };
        let at = self.rng.random_range(0..=data.len());
        let len = self.rng.random_range(1..50_000);
        let ins = self.bytes(len);
        data.splice(at..at, ins);
        write_sparse(&p, &data);
        self.bump(&p);
        self.log
            .push(format!("insert {} at {at} +{len} bytes", show(root, &p)));
    }

    /// New content of the same size (every byte may differ), mtime bumped.
    fn rewrite(&mut self, root: &Path) {
        let Some((p, data)) = self.pick_file(root, true) else {
            return;
        };
        let fresh = self.bytes(data.len());
        write_sparse(&p, &fresh);
        self.bump(&p);
        self.log
            .push(format!("rewrite same size {}", show(root, &p)));
    }

    fn rename(&mut self, root: &Path) {
        let Some(from) = self.pick(&entries(root)) else {
            return;
        };
        let dir = self.some_dir(root);
        if dir.starts_with(&from) {
            return;
        }
        let to = dir.join(self.name("r"));
        std::fs::rename(&from, &to).expect("rename");
        self.log.push(format!(
            "rename {} -> {}",
            show(root, &from),
            show(root, &to)
        ));
    }

    /// A file, symlink or FIFO becomes a directory (with a file in it) of the same name.
    fn replace_with_dir(&mut self, root: &Path) {
        let cands: Vec<PathBuf> = entries(root)
            .into_iter()
            .filter(|p| kind_of(p) != Some(Kind::Dir))
            .collect();
        let Some(p) = self.pick(&cands) else {
            return;
        };
        remove(&p);
        std::fs::create_dir(&p).expect("mkdir");
        let inner = p.join(self.name("was"));
        let data = self.content();
        write_sparse(&inner, &data);
        self.log.push(format!("now a dir: {}", show(root, &p)));
    }

    /// A directory (with its contents) becomes a file or a symlink of the same name.
    fn dir_to_other(&mut self, root: &Path) {
        if !self.replace_dirs {
            return self.create_one(root);
        }
        let Some(p) = self.pick(&of_kind(root, Kind::Dir)) else {
            return;
        };
        remove(&p);
        if self.rng.random_bool(0.5) {
            let data = self.content();
            write_sparse(&p, &data);
            self.log.push(format!("dir now a file: {}", show(root, &p)));
        } else {
            std::os::unix::fs::symlink("nowhere/was-a-dir", &p).expect("symlink");
            self.log
                .push(format!("dir now a symlink: {}", show(root, &p)));
        }
    }

    fn replace_with_symlink(&mut self, root: &Path) {
        let cands: Vec<PathBuf> = entries(root)
            .into_iter()
            .filter(|p| kind_of(p) != Some(Kind::Dir))
            .collect();
        let Some(p) = self.pick(&cands) else {
            return;
        };
        let was = kind_of(&p);
        remove(&p);
        if was == Some(Kind::Link) {
            let data = self.content();
            write_sparse(&p, &data);
            self.log
                .push(format!("symlink now a file: {}", show(root, &p)));
        } else {
            let dir = p.parent().unwrap_or(root).to_path_buf();
            let target = self.link_target(root, &dir);
            std::os::unix::fs::symlink(&target, &p).expect("symlink");
            self.log
                .push(format!("now a symlink: {} -> {target:?}", show(root, &p)));
        }
    }

    fn delete(&mut self, root: &Path) {
        // Favour files (the big ones are the ones a kill leaves partial).
        let all = entries(root);
        let files: Vec<PathBuf> = all
            .iter()
            .filter(|p| kind_of(p) == Some(Kind::File))
            .cloned()
            .collect();
        let pool = if self.rng.random_bool(0.7) && !files.is_empty() {
            files
        } else {
            all
        };
        let Some(p) = self.pick(&pool) else {
            return;
        };
        remove(&p);
        self.log.push(format!("delete {}", show(root, &p)));
    }

    fn chmod(&mut self, root: &Path) {
        let cands: Vec<PathBuf> = entries(root)
            .into_iter()
            .filter(|p| kind_of(p) != Some(Kind::Link))
            .collect();
        let Some(p) = self.pick(&cands) else {
            return;
        };
        let mode = if kind_of(&p) == Some(Kind::Dir) {
            DIR_MODES[self.rng.random_range(0..DIR_MODES.len())]
        } else {
            FILE_MODES[self.rng.random_range(0..FILE_MODES.len())]
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        self.log.push(format!("chmod {mode:o} {}", show(root, &p)));
    }

    fn touch(&mut self, root: &Path) {
        let Some(p) = self.pick(&entries(root)) else {
            return;
        };
        let (s, ns) = self.past();
        set_mtime(&p, s, ns);
        self.log
            .push(format!("mtime {s}.{ns:09} {}", show(root, &p)));
    }

    /// Data written into a hole of a sparse file (same size, positional delta), or the file
    /// grown or shrunk by some MiB of hole.
    fn sparse_edit(&mut self, root: &Path) {
        let sparse: Vec<PathBuf> = of_kind(root, Kind::File)
            .into_iter()
            .filter(|p| {
                std::fs::metadata(p)
                    .map(|m| m.len() > 1 << 20 && m.blocks() * 512 < m.len() / 2)
                    .unwrap_or(false)
            })
            .collect();
        let Some(p) = self.pick(&sparse) else {
            return self.create_one(root);
        };
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open sparse");
        match self.rng.random_range(0..3) {
            0 => {
                let n = self.rng.random_range(1..64 << 10);
                let at = self
                    .rng
                    .random_range(0..len.saturating_sub(n as u64).max(1));
                let data = self.bytes(n);
                f.write_all_at(&data, at).expect("write sparse");
                self.log
                    .push(format!("sparse write {} at {at} +{n}", show(root, &p)));
            }
            1 => {
                let to = len + self.rng.random_range(1u64..8 << 20);
                f.set_len(to).expect("grow sparse");
                self.log
                    .push(format!("sparse grow {} {len} -> {to}", show(root, &p)));
            }
            _ => {
                let to = self.rng.random_range(len / 2..len);
                f.set_len(to).expect("shrink sparse");
                self.log
                    .push(format!("sparse shrink {} {len} -> {to}", show(root, &p)));
            }
        }
        drop(f);
        self.bump(&p);
    }

    fn xattr_edit(&mut self, root: &Path) {
        let cands: Vec<PathBuf> = entries(root)
            .into_iter()
            .filter(|p| matches!(kind_of(p), Some(Kind::File | Kind::Dir)))
            .collect();
        let Some(p) = self.pick(&cands) else {
            return;
        };
        let names: Vec<OsString> = xattr::list(&p)
            .map(|l| l.filter(|n| n.as_bytes().starts_with(b"user.")).collect())
            .unwrap_or_default();
        if self.rng.random_bool(0.3) {
            if let Some(n) = self.pick(&names) {
                xattr::remove(&p, &n).expect("removexattr");
                self.log
                    .push(format!("xattr remove {n:?} {}", show(root, &p)));
                return;
            }
        }
        self.xattr(&p);
        self.log.push(format!("  (on {})", show(root, &p)));
    }

    /// Add a hard link to an existing file, or break one (copy to a new inode at that name).
    fn link_edit(&mut self, root: &Path) {
        let files = of_kind(root, Kind::File);
        let linked: Vec<PathBuf> = files
            .iter()
            .filter(|p| std::fs::metadata(p).map(|m| m.nlink() > 1).unwrap_or(false))
            .cloned()
            .collect();
        if !linked.is_empty() && self.rng.random_bool(0.4) {
            let Some(p) = self.pick(&linked) else {
                return;
            };
            let data = read(&p);
            let md = std::fs::metadata(&p).expect("stat");
            std::fs::remove_file(&p).expect("unlink");
            write_sparse(&p, &data);
            std::fs::set_permissions(&p, md.permissions()).expect("chmod");
            set_mtime(&p, md.mtime(), md.mtime_nsec());
            self.log
                .push(format!("break hard link: {} (copied)", show(root, &p)));
        } else if let Some(orig) = self.pick(&files) {
            let dir = self.some_dir(root);
            let p = dir.join(self.name("h"));
            std::fs::hard_link(&orig, &p).expect("hard link");
            self.log.push(format!(
                "hardlink {} = {}",
                show(root, &p),
                show(root, &orig)
            ));
        }
    }

    fn chown_edit(&mut self, root: &Path) {
        let Some(p) = self.pick(&entries(root)) else {
            return;
        };
        let (u, g) = OWNERS[self.rng.random_range(0..OWNERS.len())];
        chown(&p, u, g);
        self.log.push(format!("chown {u}:{g} {}", show(root, &p)));
    }

    /// A file and a directory trade places: the file's name becomes a directory and the
    /// directory's name a file.
    fn swap(&mut self, root: &Path) {
        if !self.replace_dirs {
            return self.create_one(root);
        }
        let files = of_kind(root, Kind::File);
        let dirs = of_kind(root, Kind::Dir);
        let (Some(f), Some(d)) = (self.pick(&files), self.pick(&dirs)) else {
            return;
        };
        if f.starts_with(&d) {
            return;
        }
        let tmp = root.join(self.name("swap"));
        std::fs::rename(&f, &tmp).expect("rename");
        std::fs::rename(&d, &f).expect("rename");
        std::fs::rename(&tmp, &d).expect("rename");
        self.log.push(format!(
            "swap file {} <-> dir {}",
            show(root, &f),
            show(root, &d)
        ));
    }
}

/// One entry as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub owner: (u32, u32),
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub ino: u64,
    pub nlink: u64,
    pub blocks: u64,
    pub hash: u64,
    pub link: Option<OsString>,
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

fn hash_content(p: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    let Ok(mut f) = std::fs::File::open(p) else {
        return 0;
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf[..n].hash(&mut h),
        }
    }
    h.finish()
}

/// Every entry below `root` except the subtree `skip` (if any), keyed by relative path bytes.
pub fn scan(root: &Path, skip: Option<&Path>) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    for p in entries(root) {
        if skip.is_some_and(|s| p.starts_with(s)) {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let kind = match kind_of(&p) {
            Some(Kind::File) => 'f',
            Some(Kind::Dir) => 'd',
            Some(Kind::Link) => 'l',
            Some(Kind::Fifo) => 'p',
            _ => '?',
        };
        let mut xattrs: Vec<(OsString, Vec<u8>)> = xattr::list(&p)
            .map(|l| {
                l.map(|n| {
                    let v = xattr::get(&p, &n).ok().flatten().unwrap_or_default();
                    (n, v)
                })
                .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let node = Node {
            kind,
            mode: md.mode() & 0o7777,
            owner: (md.uid(), md.gid()),
            size: if kind == 'd' { 0 } else { md.len() },
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
            nlink: if kind == 'd' { 0 } else { md.nlink() },
            blocks: md.blocks(),
            hash: if kind == 'f' { hash_content(&p) } else { 0 },
            link: std::fs::read_link(&p).ok().map(PathBuf::into_os_string),
            xattrs,
        };
        let rel = p.strip_prefix(root).unwrap_or(&p).as_os_str().as_bytes();
        out.insert(rel.to_vec(), node);
    }
    out
}

/// The differences between two scans: (path, one line saying what changed).
pub fn scan_diff_keyed(
    before: &BTreeMap<Vec<u8>, Node>,
    after: &BTreeMap<Vec<u8>, Node>,
) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let name = |k: &[u8]| format!("{:?}", OsStr::from_bytes(k));
    for (k, b) in before {
        match after.get(k) {
            None => out.push((k.clone(), format!("{} vanished", name(k)))),
            Some(a) if a != b => {
                out.push((
                    k.clone(),
                    format!("{} changed: {}", name(k), node_diff(b, a)),
                ));
            }
            Some(_) => {}
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            out.push((k.clone(), format!("{} appeared", name(k))));
        }
    }
    out
}

/// The differences between two scans, one line each (at most `max`).
pub fn scan_diff(
    before: &BTreeMap<Vec<u8>, Node>,
    after: &BTreeMap<Vec<u8>, Node>,
    max: usize,
) -> Vec<String> {
    let mut out: Vec<String> = scan_diff_keyed(before, after)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let n = out.len();
    out.truncate(max);
    if n > max {
        out.push(format!("... and {} more", n - max));
    }
    out
}

fn node_diff(b: &Node, a: &Node) -> String {
    let mut d = Vec::new();
    macro_rules! f {
        ($field:ident) => {
            if a.$field != b.$field {
                d.push(format!(
                    "{} {:?} -> {:?}",
                    stringify!($field),
                    b.$field,
                    a.$field
                ));
            }
        };
    }
    f!(kind);
    f!(mode);
    f!(owner);
    f!(size);
    f!(mtime);
    f!(ctime);
    f!(ino);
    f!(nlink);
    f!(blocks);
    f!(hash);
    f!(link);
    if a.xattrs != b.xattrs {
        d.push("xattrs".into());
    }
    d.join("; ")
}
