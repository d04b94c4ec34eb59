//! Fixtures shared by the integration tests: running the real `cutover` binary (with a
//! timeout), a real daemon on a loopback port, mkdata data sets, the rsync oracle, tmpfs
//! mounts, and snapshots of trees for "nothing changed" checks.

use serde_json::Value;
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// No single command of the suite may take longer than this.
pub const TIMEOUT: Duration = Duration::from_secs(90);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cutover")
}

/// A fresh temporary directory (removed on drop).
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cutover-it-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// `path` as &str (all test paths are ASCII).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `path` with a trailing slash, as rsync users write a directory's contents.
pub fn slash(path: &Path) -> String {
    format!("{}/", s(path).trim_end_matches('/'))
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub what: String,
}

impl Out {
    /// The exit code; panics when the process was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!(
                "{} was killed by a signal: {:?}\n{self}",
                self.what, self.status
            )
        })
    }

    /// Every JSON object printed on stdout (`--json`), in order.
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// JSON events of one kind (`"event": kind`).
    pub fn events(&self, kind: &str) -> Vec<Value> {
        self.json()
            .into_iter()
            .filter(|v| v["event"] == kind)
            .collect()
    }

    /// The `{"event":"summary",...}` line; panics if there is not exactly one.
    pub fn summary(&self) -> Value {
        let mut all = self.events("summary");
        assert_eq!(all.len(), 1, "expected one summary line\n{self}");
        all.remove(0)
    }

    /// A numeric field of the summary.
    pub fn stat(&self, key: &str) -> u64 {
        self.summary()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("summary has no numeric {key:?}\n{self}"))
    }

    /// Assert exit code 0.
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code(), 0, "{} failed\n{self}", self.what);
        self
    }

    /// Assert the given exit code.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "{}: unexpected exit code\n{self}",
            self.what
        );
        self
    }

    /// Non-empty lines of stderr, without the informational trust-on-first-use notice.
    pub fn err_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("(first use; recorded in"))
            .collect()
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |t: &str| -> String {
            if t.len() > 6000 {
                format!("{}\n[... {} more bytes]", &t[..6000], t.len() - 6000)
            } else {
                t.to_string()
            }
        };
        write!(
            f,
            "--- {} ({:?}, {:.2} s)\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            self.status,
            self.elapsed.as_secs_f64(),
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// A process started in the background whose output is collected.
pub struct Running {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    started: Instant,
    what: String,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Running {
    pub fn start(mut cmd: Command) -> Running {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = child.stdout.take().map(collect);
        let err = child.stderr.take().map(collect);
        Running {
            child,
            out,
            err,
            started: Instant::now(),
            what,
        }
    }

    /// Send a signal to the process.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid > 0");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for the end (killing it after `TIMEOUT`) and return its output. Every run of the
    /// binary is checked for panics here.
    pub fn wait(mut self) -> Out {
        let status = loop {
            match self.child.try_wait().expect("try_wait") {
                Some(st) => break st,
                None if self.started.elapsed() > TIMEOUT => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let stderr = self.err.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "{} did not finish within {TIMEOUT:?}; stderr:\n{}",
                        self.what,
                        stderr.unwrap_or_default()
                    );
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let out = Out {
            status,
            stdout: self
                .out
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
            stderr: self
                .err
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
            elapsed: self.started.elapsed(),
            what: self.what.clone(),
        };
        assert!(
            !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
            "cutover panicked\n{out}"
        );
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The token every test daemon grants read-write access with, and every test client proves.
pub const TOKEN: &str = "cutover-integration-test-token-0123456789";

/// State shared by the whole suite: the test daemons' key and the clients' known-hosts file
/// live side by side, so they are always deleted together and a reused port never looks like
/// a replaced key.
pub fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("suite")
}

/// The client configuration directory of the suite (XDG_CONFIG_HOME).
pub fn client_config_home() -> PathBuf {
    suite_dir().join("client")
}

/// `cutover ARGS...` with the suite's client configuration and token.
pub fn cutover_cmd() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("CUTOVER_LOG")
        .env("XDG_CONFIG_HOME", client_config_home())
        .env("CUTOVER_TOKEN", TOKEN);
    c
}

/// `cutover sync ARGS...` as a command.
pub fn sync_cmd(args: &[&str]) -> Command {
    let mut c = cutover_cmd();
    c.arg("sync").args(args);
    c
}

/// Run `cutover sync ARGS...` to the end.
pub fn sync(args: &[&str]) -> Out {
    Running::start(sync_cmd(args)).wait()
}

/// Run `cutover sync --json ARGS...` to the end.
pub fn sync_json(args: &[&str]) -> Out {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    sync(&all)
}

/// Start `cutover sync ARGS...` in the background.
pub fn spawn_sync(args: &[&str]) -> Running {
    Running::start(sync_cmd(args))
}

/// Where mkdata lives: `shared/` beside the checkout.
pub fn mkdata_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/mkdata.py");
    assert!(
        p.is_file(),
        "mkdata.py not found at {}: the shared/ directory must sit beside the checkout",
        p.display()
    );
    p
}

/// Run `python3 mkdata.py ARGS...`; panics with its stderr if it fails.
pub fn mkdata(args: &[&str]) {
    let out = Command::new("python3")
        .arg(mkdata_path())
        .args(args)
        .output()
        .expect("cannot run python3 (needed for mkdata.py)");
    assert!(
        out.status.success(),
        "mkdata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The oracle's itemised differences between `src/` and `dst/` (empty = the same), with
/// extra rsync arguments such as filters.
pub fn rsync_diff_with(src: &Path, dst: &Path, extra: &[&str]) -> String {
    let out = Command::new("rsync")
        .args(["-anHAX", "--checksum", "--itemize-changes"])
        .args(extra)
        .arg(slash(src))
        .arg(slash(dst))
        .output()
        .expect("cannot run rsync (the oracle); install it");
    assert!(
        out.status.success(),
        "rsync oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The oracle: `rsync -anHAX --checksum --itemize-changes SRC/ DST/` prints nothing.
pub fn assert_same(src: &Path, dst: &Path) {
    assert_same_with(src, dst, &[]);
}

/// The oracle with extra rsync arguments (filters, --delete).
pub fn assert_same_with(src: &Path, dst: &Path, extra: &[&str]) {
    let diff = rsync_diff_with(src, dst, extra);
    assert!(
        diff.trim().is_empty(),
        "destination differs from source (rsync -anHAX --checksum -i {} {}/ {}/):\n{diff}",
        extra.join(" "),
        src.display(),
        dst.display()
    );
}

/// One object of a tree as `snapshot` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snap {
    File {
        mode: u32,
        len: u64,
        mtime_ns: i128,
        hash: u64,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: PathBuf,
    },
    Other,
}

/// Kind, mode and content of everything below `root` (paths relative to it), for comparing
/// a tree before and after an operation that must not change it.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Snap>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.expect("read_dir entry");
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let md = std::fs::symlink_metadata(&p).expect("lstat");
        let mode = md.mode() & 0o7777;
        let snap = if md.file_type().is_symlink() {
            Snap::Link {
                target: std::fs::read_link(&p).unwrap(),
            }
        } else if md.is_dir() {
            walk(root, &p, out);
            Snap::Dir { mode }
        } else if md.is_file() {
            Snap::File {
                mode,
                len: md.len(),
                mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                hash: hash_file(&p),
            }
        } else {
            Snap::Other
        };
        out.insert(rel, snap);
    }
}

/// A (non-cryptographic) hash of a file's content.
pub fn hash_file(p: &Path) -> u64 {
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// Write `data` to `path`, creating parent directories.
pub fn write(path: &Path, data: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `n` pseudo-random bytes from `seed` (incompressible).
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// chmod.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The names of cutover's partial files (`.cutover.*.part`) directly in `dir`.
pub fn partials_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with(".cutover.") && n.ends_with(".part")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A running `cutover serve` on 127.0.0.1 (port 0), killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    stderr_path: PathBuf,
}

/// A module of a test daemon.
pub struct Module<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub read_only: bool,
}

impl<'a> Module<'a> {
    pub fn rw(name: &'a str, path: &'a Path) -> Self {
        Module {
            name,
            path,
            read_only: false,
        }
    }
}

impl Daemon {
    /// Start a daemon serving `modules` to the suite's token; its config, token file, port
    /// file and log go in `dir`.
    pub fn start(dir: &Path, modules: &[Module]) -> Daemon {
        Daemon::start_with_extra(dir, modules, "", "")
    }

    /// Like `start`, with extra top-level TOML (`top`) and extra lines for every module
    /// (`per_module`, e.g. more `[[module.allow]]` entries).
    pub fn start_with_extra(dir: &Path, modules: &[Module], top: &str, per_module: &str) -> Daemon {
        let config = Daemon::write_config(dir, modules, top, per_module);
        Daemon::start_with(dir, &config)
    }

    /// Write a daemon config (and its token file) into `dir`; returns the config's path.
    pub fn write_config(dir: &Path, modules: &[Module], top: &str, per_module: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut toml = String::new();
        if !top.contains("listen") {
            toml.push_str("listen = \"127.0.0.1:0\"\n");
        }
        if !top.contains("state_dir") {
            toml.push_str(&format!(
                "state_dir = \"{}\"\n",
                s(&suite_dir().join("daemon"))
            ));
        }
        toml.push_str(top);
        toml.push('\n');
        for m in modules {
            std::fs::create_dir_all(m.path).unwrap();
            toml.push_str(&format!(
                "[[module]]\nname = \"{}\"\npath = \"{}\"\nread_only = {}\n[[module.allow]]\ntoken_file = \"{}\"\naccess = \"read-write\"\n{per_module}",
                m.name,
                s(m.path),
                m.read_only,
                s(&token_file),
            ));
        }
        let config = dir.join("daemon.toml");
        std::fs::write(&config, toml).unwrap();
        config
    }

    /// Start a daemon from an existing config (a restart after a crash).
    pub fn start_with(dir: &Path, config: &Path) -> Daemon {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let port_file = dir.join(format!("port-{n}"));
        let stderr_path = dir.join(format!("daemon-{n}.log"));
        let log = std::fs::File::create(&stderr_path).unwrap();
        let child = cutover_cmd()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--port-file")
            .arg(&port_file)
            .env_remove("CUTOVER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start cutover serve");
        let mut d = Daemon {
            child: Some(child),
            port: 0,
            config: config.to_path_buf(),
            stderr_path,
        };
        let started = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = t.trim().parse::<u16>() {
                    d.port = p;
                    // Another test's daemon, with another key, may have had this port before
                    // (the suite's known-hosts file outlives runs): forget it, as
                    // `ssh-keygen -R` would.
                    net::known_hosts::KnownHosts::new(
                        client_config_home().join("cutover/known_hosts"),
                    )
                    .forget(&format!("127.0.0.1:{p}"))
                    .expect("known_hosts");
                    return d;
                }
            }
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("cutover serve exited with {st:?}: {}", d.log());
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "cutover serve wrote no port file within 20 s: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send a signal to the daemon (SIGSTOP makes it a peer that stalls without closing).
    pub fn signal(&self, sig: rustix::process::Signal) {
        let id = self.child.as_ref().expect("daemon running").id();
        let pid = rustix::process::Pid::from_raw(id as i32).expect("pid > 0");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Wait until the daemon's log contains `needle`; false if it did not within `limit`.
    pub fn log_shows(&self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `cutover://127.0.0.1:PORT/<module_path>`.
    pub fn url(&self, module_path: &str) -> String {
        format!("cutover://127.0.0.1:{}/{module_path}", self.port)
    }

    /// The daemon's process id, for /proc checks.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already stopped").id()
    }

    /// Whether the daemon process is still running (it has not exited or died of a signal).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Send SIGTERM and return a handle that waits for the exit.
    pub fn terminate(&mut self) -> Child {
        let c = self.child.take().expect("daemon already stopped");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&c),
            rustix::process::Signal::TERM,
        )
        .expect("cannot signal the daemon");
        c
    }

    /// SIGKILL the daemon and drop its log, so `Drop` does not report again a panic that a
    /// test has already reported (a fuzzer replacing a daemon that failed a case).
    pub fn discard(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(
            !self.log().contains("panicked"),
            "daemon panicked: {}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            assert!(
                !self.log().contains("panicked"),
                "daemon panicked: {}",
                self.log()
            );
        }
    }
}

/// A small tmpfs mounted for one test, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Grow (or shrink) it in place, contents kept: space freed for the next run.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "remount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A loopback port that nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Assert a clean failure: non-zero exit, no panic, and a single stderr line that contains
/// every one of `needles`.
pub fn assert_one_line_error(out: &Out, needles: &[&str]) {
    assert_ne!(out.code(), 0, "expected a failure\n{out}");
    let lines = out.err_lines();
    assert_eq!(lines.len(), 1, "expected a one-line error message\n{out}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error message does not mention {n:?}\n{out}"
        );
    }
}

/// A private sshd on a loopback port (own host and client keys, root login by key only),
/// stopped on drop. For ssh endpoints: pass `rsh()` as `-e`.
pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        chmod(dir, 0o700);
        for key in ["host_key", "client_key"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .expect("cannot run ssh-keygen (install openssh-client)");
            assert!(st.success());
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = free_port();
        let config = dir.join("sshd_config");
        write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nMaxStartups 100\nPidFile {}\n",
                s(&dir.join("host_key")),
                s(&dir.join("authorized_keys")),
                s(&dir.join("sshd.pid")),
            ),
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start /usr/sbin/sshd (install openssh-server)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sshd did not listen: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// The `-e` command that reaches this sshd as root with the test key.
    pub fn rsh(&self) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes",
            self.port,
            s(&self.dir.join("client_key"))
        )
    }

    /// Logins sshd accepted so far.
    pub fn logins(&self) -> usize {
        std::fs::read_to_string(self.dir.join("sshd.log"))
            .unwrap_or_default()
            .matches("Accepted publickey")
            .count()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
