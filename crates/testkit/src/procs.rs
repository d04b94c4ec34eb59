//! The real processes a fault run drives: a `cutover serve` on a fixed loopback port that
//! can be SIGKILLed and started again, `wanem.py` as a relay that only counts bytes, and
//! `cutover sync` runs with their JSON summaries.

use crate::FaultError;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The daemon notices a client behind a stalled path after this long (its default is
/// minutes): until then that session's destination lock stands.
const DAEMON_IDLE: &str = "idle_timeout_secs = 5\n";

/// Token of the daemons this kit starts.
pub const TOKEN: &str = "cutover-testkit-token-0123456789abcdef";

/// A free loopback port (bound and released, so the daemon can take it and take it again).
pub fn free_port() -> Result<u16, FaultError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(FaultError::io("bind"))?;
    Ok(l.local_addr().map_err(FaultError::io("bind"))?.port())
}

fn wait_port(port: u16, child: &mut Child, what: &str) -> Result<(), FaultError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(FaultError::Setup(format!(
                "{what} exited at start: {status}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(FaultError::Setup(format!(
        "{what} did not listen on {port}"
    )))
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `cutover serve` with one read-write module `m`, TLS on, always on the same port.
pub struct Daemon {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(bin: &Path, dir: &Path, module: &Path) -> Result<Daemon, FaultError> {
        fs::create_dir_all(dir).map_err(FaultError::io(dir.display().to_string()))?;
        let token = dir.join("token");
        fs::write(&token, TOKEN).map_err(FaultError::io("write token"))?;
        fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(FaultError::io("chmod token"))?;
        let port = free_port()?;
        let config = dir.join("serve.toml");
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n{DAEMON_IDLE}\n[[module]]\nname = \"m\"\npath = {:?}\n[[module.allow]]\ntoken_file = {:?}\naccess = \"read-write\"\n",
            dir.join("state"),
            module,
            token
        );
        fs::write(&config, text).map_err(FaultError::io("write serve.toml"))?;
        Daemon::with_config(bin, dir, &config, port)
    }

    /// `cutover serve --config CONFIG`, whose config listens on `127.0.0.1:port`; its log
    /// is `dir/serve.log` (appended to across restarts).
    pub fn with_config(
        bin: &Path,
        dir: &Path,
        config: &Path,
        port: u16,
    ) -> Result<Daemon, FaultError> {
        let mut d = Daemon {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            log: dir.join("serve.log"),
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        d.restart()?;
        Ok(d)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Start it (again) on its port.
    pub fn restart(&mut self) -> Result<(), FaultError> {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(FaultError::io("daemon log"))?;
        // The port of a daemon killed just now can take a moment to be free again.
        let mut tries = 0;
        loop {
            let mut child = Command::new(&self.bin)
                .arg("serve")
                .arg("--config")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().map_err(FaultError::io("daemon log"))?)
                .spawn()
                .map_err(FaultError::io(format!("start {}", self.bin.display())))?;
            match wait_port(self.port, &mut child, "cutover serve") {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) if tries == 5 => {
                    sigkill(&mut child);
                    return Err(FaultError::Setup(format!("{e}: {}", self.log_tail())));
                }
                Err(_) => {
                    sigkill(&mut child);
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// The daemon exited on its own (a crash).
    pub fn crashed(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 2000)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` bytes of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&text[text.len().saturating_sub(n)..]).into_owned()
}

/// `wanem.py` in front of a port (by default with no delay and no caps): it counts the bytes
/// each way, and can reset connections or stall them all.
pub struct Relay {
    child: Child,
    stats: PathBuf,
    pub port: u16,
}

/// How a [`Relay`] behaves (wanem's options).
#[derive(Clone, Debug, Default)]
pub struct RelayOptions {
    /// Round-trip time added, in milliseconds.
    pub rtt_ms: f64,
    /// Each connection's rate cap, MB/s (0: none).
    pub flow_mbps: f64,
    /// Reset every connection with a TCP RST after a random 0.5-1.5 × this many MB.
    pub reset_mb: Option<f64>,
    /// wanem's `--seed` (where its resets fall).
    pub seed: u64,
    /// The port to listen on (0: any free one): a relay started again where the last one
    /// was.
    pub listen_port: u16,
}

/// What a relay counted over its life (wanem's `--stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// Connections it accepted.
    pub connections: u64,
    /// Connections it reset.
    pub resets: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Relay {
    pub fn start(wanem: &Path, dir: &Path, target: u16) -> Result<Relay, FaultError> {
        Relay::start_with(wanem, dir, target, None)
    }

    /// A relay that resets every connection with a TCP RST after a random 0.5-1.5 ×
    /// `reset_mb` MB (wanem's `--reset-mb`).
    pub fn start_with(
        wanem: &Path,
        dir: &Path,
        target: u16,
        reset_mb: Option<f64>,
    ) -> Result<Relay, FaultError> {
        let opts = RelayOptions {
            reset_mb,
            seed: 1,
            ..RelayOptions::default()
        };
        Relay::spawn(wanem, dir, target, &opts)
    }

    /// A relay to `127.0.0.1:target` with `opts`; its stats and port files go in `dir`.
    pub fn spawn(
        wanem: &Path,
        dir: &Path,
        target: u16,
        opts: &RelayOptions,
    ) -> Result<Relay, FaultError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stats = dir.join(format!("relay-{}-{n}.json", std::process::id()));
        let port_file = stats.with_extension("port");
        let mut child = Command::new("python3")
            .arg(wanem)
            .arg(format!("--listen=127.0.0.1:{}", opts.listen_port))
            .arg(format!("--target=127.0.0.1:{target}"))
            .arg(format!("--rtt-ms={}", opts.rtt_ms))
            .arg(format!("--flow-mbps={}", opts.flow_mbps))
            .arg("--total-mbps=0")
            .args(opts.reset_mb.map(|mb| format!("--reset-mb={mb}")))
            .arg(format!("--seed={}", opts.seed))
            .arg("--stats")
            .arg(&stats)
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(FaultError::io(format!("start {}", wanem.display())))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Some(p) = fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break p;
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                sigkill(&mut child);
                return Err(FaultError::Setup("wanem.py wrote no port file".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = fs::remove_file(&port_file);
        Ok(Relay { child, stats, port })
    }

    /// The relay's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freeze every connection: no data, no FIN, no RST (SIGSTOP); new connections queue in
    /// the kernel unanswered, as behind a dead route.
    pub fn stall(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// Let it carry data again.
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig);
    }

    /// Stop it; the bytes it carried both ways.
    pub fn finish(self) -> Result<u64, FaultError> {
        let s = self.finish_stats()?;
        Ok(s.bytes_up + s.bytes_down)
    }

    /// Stop it (SIGCONT, then SIGTERM, so that it writes its counts); what it counted.
    pub fn finish_stats(mut self) -> Result<RelayStats, FaultError> {
        self.resume();
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        let text = fs::read_to_string(&self.stats).map_err(FaultError::io("wanem stats"))?;
        let _ = fs::remove_file(&self.stats);
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| FaultError::Setup(format!("wanem stats: {e}")))?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(RelayStats {
            connections: n("connections"),
            resets: n("resets"),
            bytes_up: n("bytes_up"),
            bytes_down: n("bytes_down"),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Stopped and reaped by `finish`; here only when a run gave up on it.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.resume();
            sigkill(&mut self.child);
        }
    }
}

/// How a sync run ended.
pub struct Finished {
    pub status: ExitStatus,
    pub seconds: f64,
    pub stderr: String,
    /// Sessions the run opened again after one broke (its JSON summary's `reconnects`).
    pub reconnects: u64,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// `reconnects` of the last summary event in a `--json` output (0 when there is none).
fn reconnects_in(json_lines: &str) -> u64 {
    json_lines
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .and_then(|v| v["reconnects"].as_u64())
        .unwrap_or(0)
}

/// A `cutover sync` in the background; stderr to a file, its JSON events beside it.
pub struct SyncRun {
    child: Child,
    started: Instant,
    stderr: PathBuf,
}

impl SyncRun {
    pub fn spawn(mut cmd: Command, stderr: &Path) -> Result<SyncRun, FaultError> {
        let err = fs::File::create(stderr).map_err(FaultError::io("sync stderr"))?;
        let out = fs::File::create(stderr.with_extension("json"))
            .map_err(FaultError::io("sync stdout"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(FaultError::io("start cutover sync"))?;
        Ok(SyncRun {
            child,
            started: Instant::now(),
            stderr: stderr.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running after `at` from its start? (Waits until then.)
    pub fn running_at(&mut self, at: Duration) -> bool {
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            let elapsed = self.started.elapsed();
            if elapsed >= at {
                return true;
            }
            std::thread::sleep((at - elapsed).min(Duration::from_millis(5)));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
    }

    /// Wait for the end, killing it after `limit` (a hang is a finding, not a wait).
    pub fn wait(mut self, limit: Duration) -> Result<Finished, FaultError> {
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(FaultError::io("wait"))? {
                break s;
            }
            if self.started.elapsed() > limit {
                sigkill(&mut self.child);
                return Err(FaultError::Setup(format!(
                    "cutover sync hung for {} s: {}",
                    limit.as_secs(),
                    tail(&self.stderr, 1000)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let json = fs::read_to_string(self.stderr.with_extension("json")).unwrap_or_default();
        Ok(Finished {
            status,
            seconds: self.started.elapsed().as_secs_f64(),
            stderr: tail(&self.stderr, 2000),
            reconnects: reconnects_in(&json),
        })
    }
}
