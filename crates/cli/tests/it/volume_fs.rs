//! A real filesystem on a volume's export: `cutover serve` exports a 64 MiB volume over NBD,
//! qemu-storage-daemon's FUSE export presents that export as a regular file (the job nbdfuse
//! does; nbdfuse is not packaged in Debian 12), losetup makes the file a block device, and
//! mkfs.ext4, mount, a copied tree, sync and umount go through the whole stack. Then, with
//! every client and the daemon stopped cleanly, `e2fsck -fn` on the backing file must find
//! nothing to fix, the backing file mounted read-only must hold the tree exactly (kind, mode,
//! size, mtime, content, link target), and the volume must have recorded dirty bytes.
//! Skipped with a note where the machine cannot do it: not root, no /dev/fuse, no
//! qemu-storage-daemon or its FUSE export refused, no loop devices, mount refused. The
//! machinery (`Stack`, `missing`, `skip`) serves `replication_fs` too.

use crate::util::*;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The volume's size (a sparse backing file).
const SIZE: u64 = 64 << 20;

pub(crate) fn skip(why: &str) {
    eprintln!("note: filesystem test skipped: {why}");
}

/// Why this machine cannot run the filesystem tests, if it cannot.
pub(crate) fn missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (losetup and mount need it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    ["losetup", "mount", "umount", "mkfs.ext4", "e2fsck"]
        .into_iter()
        .find(|tool| Command::new(tool).arg("-V").output().is_err())
        .map(|tool| format!("{tool} is not installed"))
}

/// Run `cmd` to the end (killed after the suite's timeout).
fn run(cmd: Command) -> Out {
    Running::start(cmd).wait()
}

/// Run `cmd` and assert it succeeded, with its output in the message.
fn must(cmd: Command) -> Out {
    let out = run(cmd);
    out.ok();
    out
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Whether `path` is a mount point now (per /proc/self/mountinfo; test paths need no
/// unescaping).
fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(s(path)))
}

/// Wait for `child` to exit, up to `limit`.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `Stack::ext4_with_tree` made.
pub(crate) struct Mounted {
    /// The export as a regular file (qemu-storage-daemon's FUSE export).
    pub fuse_file: PathBuf,
    /// The loop device on it.
    pub dev: String,
    /// Where the filesystem is mounted.
    pub mnt: PathBuf,
    /// The tree copied in (as `mnt/tree`).
    pub src: PathBuf,
}

/// What the test sets up outside its temporary directory. Drop undoes whatever is still
/// there, in reverse order (mounts, loop devices, then qemu-storage-daemon and its FUSE
/// mount), so a failed assertion leaves no mount or loop device behind. Declared after the
/// daemon, so it drops first.
#[derive(Default)]
pub(crate) struct Stack {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    qsd: Option<Child>,
    qsd_log: PathBuf,
    fuse_file: Option<PathBuf>,
}

impl Stack {
    /// `losetup --find --show [--read-only] FILE`: the device, or losetup's output when it
    /// refused (the caller decides whether that skips the test or fails it).
    fn attach(&mut self, file: &Path, read_only: bool) -> Result<String, Out> {
        let mut c = cmd("losetup", &["--find", "--show"]);
        if read_only {
            c.arg("--read-only");
        }
        c.arg(file);
        let out = run(c);
        if out.code() != 0 {
            return Err(out);
        }
        let dev = out.stdout.trim().to_string();
        assert!(
            dev.starts_with("/dev/loop"),
            "losetup printed {dev:?}\n{out}"
        );
        self.loops.push(dev.clone());
        Ok(dev)
    }

    fn detach(&mut self, dev: &str) {
        must(cmd("losetup", &["-d", dev]));
        self.loops.retain(|d| d != dev);
    }

    /// `mount -t ext4 -o OPTS DEV DIR`, or mount's output when it failed.
    fn mount(&mut self, dev: &str, dir: &Path, opts: &str) -> Result<(), Out> {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let mut c = cmd("mount", &["-t", "ext4", "-o", opts, dev]);
        c.arg(dir);
        let out = run(c);
        if out.code() != 0 {
            return Err(out);
        }
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    fn umount(&mut self, dir: &Path) {
        must(cmd("umount", &[s(dir)]));
        self.mounts.retain(|m| m != dir);
    }

    /// The NBD export at unix socket `sock` (export "db") as the regular file
    /// `dir/export.raw`: qemu-storage-daemon's FUSE export of an NBD blockdev (the mount
    /// point must be an existing regular file). `Err` says why the machine cannot (skip).
    fn fuse_export(&mut self, dir: &Path, sock: &Path) -> Result<PathBuf, String> {
        let fuse_file = dir.join("export.raw");
        File::create(&fuse_file).expect("create the FUSE mount point");
        self.qsd_log = dir.join("qsd.log");
        let log_file = File::create(&self.qsd_log).expect("create qsd.log");
        let log_err = log_file.try_clone().expect("clone qsd.log");
        let spawned = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=n,server.type=unix,server.path={},export=db",
                s(sock)
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=n,mountpoint={},writable=on",
                s(&fuse_file)
            ))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn();
        match spawned {
            Ok(child) => self.qsd = Some(child),
            Err(e) => return Err(format!("cannot run qemu-storage-daemon ({e})")),
        }
        self.fuse_file = Some(fuse_file.clone());
        let started = Instant::now();
        while !mounted(&fuse_file) {
            let qsd = self.qsd.as_mut().expect("qemu-storage-daemon started");
            if let Ok(Some(st)) = qsd.try_wait() {
                self.qsd = None;
                let log = std::fs::read_to_string(&self.qsd_log).unwrap_or_default();
                // Its errors name the option that failed: the NBD blockdev is ours to serve,
                // the FUSE export is the machine's to allow.
                assert!(
                    log.contains("--export"),
                    "qemu-storage-daemon could not use the export ({st:?}): {log}"
                );
                return Err(format!("FUSE export refused ({})", log.trim()));
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "qemu-storage-daemon mounted nothing within 20 s: {}",
                std::fs::read_to_string(&self.qsd_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(fuse_file)
    }

    /// A loop device on `file`, ext4 on it (256-byte inodes: nanosecond mtimes to
    /// compare), mounted read-write on `mnt`; the device. The first loop device and the
    /// first mount are where a machine without loop devices or without the right to mount
    /// says so: `Err` says why (skip). Once they worked, every later failure is the test's.
    fn format_and_mount(&mut self, file: &Path, mnt: &Path) -> Result<String, String> {
        let dev = self
            .attach(file, false)
            .map_err(|out| format!("losetup refused ({})", out.stderr.trim()))?;
        must(cmd("mkfs.ext4", &["-q", "-I", "256", &dev]));
        if let Err(out) = self.mount(&dev, mnt, "rw") {
            let err = out.stderr.to_lowercase();
            // Not a refusal but a failure: mkfs wrote something mount cannot read.
            assert!(
                err.contains("permission denied") || err.contains("not permitted"),
                "mount {dev} failed\n{out}"
            );
            return Err(format!("mount refused ({})", out.stderr.trim()));
        }
        Ok(dev)
    }

    /// The export at `sock` as a file (`fuse_export`), ext4 on it mounted on `dir/mnt`
    /// (`format_and_mount`), `make_tree(dir/src)` copied in as `tree` with `cp -a`, and
    /// `sync`. `Err` says why the machine cannot (skip).
    pub(crate) fn ext4_with_tree(&mut self, dir: &Path, sock: &Path) -> Result<Mounted, String> {
        let fuse_file = self.fuse_export(dir, sock)?;
        let mnt = dir.join("mnt");
        let dev = self.format_and_mount(&fuse_file, &mnt)?;
        let src = dir.join("src");
        make_tree(&src);
        must(cmd("cp", &["-a", s(&src), s(&mnt.join("tree"))]));
        must(cmd("sync", &[]));
        Ok(Mounted {
            fuse_file,
            dev,
            mnt,
            src,
        })
    }

    /// Undo `ext4_with_tree`: unmount, detach the loop device, stop the FUSE export.
    pub(crate) fn unmount(&mut self, m: &Mounted) {
        self.umount(&m.mnt);
        self.detach(&m.dev);
        self.stop_qsd();
    }

    /// The backing file alone is a clean filesystem (`e2fsck -fn`) whose `tree`, mounted
    /// read-only on `mnt`, is `src` exactly (kind, mode, size, mtime, content, link target).
    pub(crate) fn assert_holds_tree(&mut self, backing: &Path, src: &Path, mnt: &Path) {
        must(cmd("e2fsck", &["-fn", s(backing)]));
        let ro = self
            .attach(backing, true)
            .unwrap_or_else(|out| panic!("losetup of the backing file failed\n{out}"));
        if let Err(out) = self.mount(&ro, mnt, "ro") {
            panic!("mounting the backing file failed\n{out}");
        }
        let want = snapshot(src);
        assert_eq!(want.len(), 9, "the tree as made: {want:#?}");
        let got = snapshot(&mnt.join("tree"));
        let differ: BTreeSet<_> = want
            .keys()
            .chain(got.keys())
            .filter(|p| want.get(*p) != got.get(*p))
            .collect();
        assert!(
            differ.is_empty(),
            "the tree read back from {} differs from the one copied in at {differ:?}\n\
             copied in: {want:#?}\nread back: {got:#?}",
            backing.display()
        );
        self.umount(mnt);
        self.detach(&ro);
    }

    /// Stop qemu-storage-daemon with SIGTERM and wait for it: it must exit 0 and take its
    /// FUSE mount away.
    fn stop_qsd(&mut self) {
        let log = &self.qsd_log;
        let mut child = self.qsd.take().expect("qemu-storage-daemon running");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .expect("cannot signal qemu-storage-daemon");
        let status = wait_for(&mut child, Duration::from_secs(30));
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        let Some(status) = status else {
            self.qsd = Some(child);
            panic!("qemu-storage-daemon did not stop within 30 s of SIGTERM: {log_text}");
        };
        assert!(
            status.success(),
            "qemu-storage-daemon exited with {status:?} on SIGTERM: {log_text}"
        );
        if let Some(file) = self.fuse_file.take() {
            assert!(
                !mounted(&file),
                "qemu-storage-daemon left its FUSE mount on {}",
                file.display()
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for dir in self.mounts.iter().rev() {
            let clean = Command::new("umount").arg(dir).status();
            if !clean.is_ok_and(|st| st.success()) {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
        for dev in self.loops.iter().rev() {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        if let Some(mut child) = self.qsd.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            if wait_for(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A killed qemu-storage-daemon leaves a dead FUSE mount ("transport endpoint is not
        // connected") behind.
        if let Some(file) = self.fuse_file.take() {
            if mounted(&file) {
                let _ = Command::new("umount").arg("-l").arg(&file).status();
            }
        }
    }
}

/// A few MiB of random content in a few files, a subdirectory two deep, an empty file, a
/// file whose size is no multiple of any block size, and a symlink.
fn make_tree(root: &Path) {
    write(&root.join("a.bin"), random_bytes(1, 1 << 20));
    write(&root.join("b.bin"), random_bytes(2, 700_001));
    write(&root.join("empty"), b"");
    write(&root.join("sub/c.bin"), random_bytes(3, 2 << 20));
    write(&root.join("sub/deeper/d.txt"), b"the last file\n");
    write(&root.join("sub/deeper/e.bin"), random_bytes(4, 123_457));
    std::os::unix::fs::symlink("../a.bin", root.join("sub/link")).expect("symlink");
    chmod(&root.join("b.bin"), 0o600);
    chmod(&root.join("sub/deeper"), 0o750);
}

#[test]
fn ext4_on_the_export_through_fuse_and_loop_survives_and_checks_clean() {
    if let Some(why) = missing() {
        return skip(&why);
    }

    let t = tmp();
    let dir = t.path();
    let backing = dir.join("disk.img");
    File::create(&backing)
        .expect("create the backing file")
        .set_len(SIZE)
        .expect("size the backing file");
    let config = dir.join("daemon.toml");
    let state = dir.join("state");
    write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n",
            s(&state),
            s(&backing)
        ),
    );
    let mut c = cutover_cmd();
    c.args(["volume", "create-md", "db", "--config", s(&config)]);
    must(c);
    let mut daemon = Daemon::start_with(dir, &config);

    // The export as a file, a block device on it, ext4 on that, the tree copied in.
    let mut stack = Stack::default();
    let fs = match stack.ext4_with_tree(dir, &state.join("db.sock")) {
        Ok(fs) => fs,
        Err(why) => return skip(&why),
    };
    let len = std::fs::metadata(&fs.fuse_file)
        .expect("stat the FUSE file")
        .len();
    assert_eq!(len, SIZE, "the FUSE file has the volume's size");
    stack.unmount(&fs);

    // Every write went through the export, so the volume recorded them.
    let mut c = cutover_cmd();
    c.args(["volume", "status", "db", "--json", "--config", s(&config)]);
    let out = must(c);
    let st = out
        .json()
        .first()
        .map(|all| all["volumes"][0].clone())
        .unwrap_or_else(|| panic!("no JSON status\n{out}"));
    let dirty = st["dirty_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dirty_bytes in the status\n{out}"));
    assert!(dirty > 0 && dirty <= SIZE, "dirty bytes {dirty}\n{out}");
    assert!(st["writes"].as_u64().is_some_and(|w| w > 0), "{out}");

    let status = daemon
        .terminate()
        .wait()
        .expect("wait for the cutover daemon");
    assert!(status.success(), "{status:?}: {}", daemon.log());
    assert!(
        daemon.log().contains("volume db: closed cleanly"),
        "{}",
        daemon.log()
    );

    // The backing file alone: a clean filesystem holding the tree exactly.
    stack.assert_holds_tree(&backing, &fs.src, &dir.join("back"));
}
