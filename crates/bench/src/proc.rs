//! Child processes: timed runs (wall clock, exit status, peak RSS from `wait4`), sampled peak
//! RSS of every descendant, timeouts, and background services (serve, wanem) stopped by pid.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Peak resident set of one process, as last seen in `/proc/PID/status` (`VmHWM`).
#[derive(Debug, Clone, Serialize)]
pub struct ProcPeak {
    pub pid: i32,
    pub name: String,
    pub vm_hwm_kb: u64,
}

/// What a timed run produced.
#[derive(Debug, Clone)]
pub struct Timed {
    pub seconds: f64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// `ru_maxrss` from `wait4`: the child's own peak, or a waited-for descendant's if larger.
    pub max_rss_kb: u64,
    /// Sampled peaks of the child and each of its descendants (only when asked for).
    pub peaks: Vec<ProcPeak>,
    pub timed_out: bool,
}

impl Timed {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// A one-line account of a failure, for error messages.
    pub fn failure(&self) -> String {
        if self.timed_out {
            format!("timed out after {:.0} s", self.seconds)
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            format!("exit {}", self.exit_code.unwrap_or(-1))
        }
    }
}

/// The command line of `cmd`, shell-quoted, for logs and reports.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![quote(&cmd.get_program().to_string_lossy())];
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// Quote one word for a POSIX shell, only when it needs it.
pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=,@%+-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Run `cmd` to completion: its stdout, or an error naming it, with its stderr.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `cmd` to completion with stdout and stderr sent to files, timing it by wall clock from
/// just before spawn to just after `wait4` returns, after a `sync(2)` that is not timed. After `timeout` the child and all its
/// descendants get SIGTERM, and SIGKILL 10 s later.
pub fn run_timed(
    cmd: &mut Command,
    stdout: &Path,
    stderr: &Path,
    timeout: Duration,
    sample_rss: bool,
) -> Result<Timed> {
    let out = fs::File::create(stdout).with_context(|| format!("create {}", stdout.display()))?;
    let err = fs::File::create(stderr).with_context(|| format!("create {}", stderr.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // Write back what earlier steps left dirty, so no run pays for another's writes.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    let pid = child.id() as libc::pid_t;

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let timed_out = timed_out.clone();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                timed_out.store(true, Ordering::SeqCst);
                signal_tree(pid, libc::SIGTERM);
                if let Err(mpsc::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(Duration::from_secs(10))
                {
                    signal_tree(pid, libc::SIGKILL);
                }
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(BTreeMap::<i32, ProcPeak>::new()));
    let sampler = sample_rss.then(|| {
        let stop = stop.clone();
        let peaks = peaks.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for p in descendants(pid) {
                    if let Some((name, hwm)) = read_hwm(p) {
                        if let Ok(mut map) = peaks.lock() {
                            let e = map.entry(p).or_insert(ProcPeak {
                                pid: p,
                                name: name.clone(),
                                vm_hwm_kb: 0,
                            });
                            e.name = name;
                            e.vm_hwm_kb = e.vm_hwm_kb.max(hwm);
                        }
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    });

    let waited = wait4(pid);
    let seconds = start.elapsed().as_secs_f64();
    drop(done_tx);
    stop.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    if let Some(s) = sampler {
        let _ = s.join();
    }
    // The child was reaped by wait4; dropping the handle neither waits nor kills.
    drop(child);
    let (status, rusage) = waited?;

    let (exit_code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    let peaks = peaks
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    Ok(Timed {
        seconds,
        exit_code,
        signal,
        max_rss_kb: u64::try_from(rusage.ru_maxrss).unwrap_or(0),
        peaks,
        timed_out: timed_out.load(Ordering::SeqCst),
    })
}

fn wait4(pid: libc::pid_t) -> Result<(i32, libc::rusage)> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain old data; zeroed is a valid value for it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes only into the two out-pointers we pass, both valid.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            bail!("wait4({pid}): {e}");
        }
    }
}

/// `root` and every process descending from it, found by walking `/proc/*/stat` parents.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: HashMap<i32, i32> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&(_, &pp)| pp == p)
                .map(|(&c, _)| c),
        );
        i += 1;
    }
    out
}

/// Send `sig` to `root` and all its descendants.
pub fn signal_tree(root: i32, sig: i32) {
    for p in descendants(root) {
        // SAFETY: kill has no memory effects; these are processes this program started.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// Name and `VmHWM` (KiB) of a live process.
pub fn read_hwm(pid: i32) -> Option<(String, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut name = String::new();
    let mut hwm = None;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Name:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("VmHWM:") {
            hwm = v.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    Some((name, hwm?))
}

/// The last `max` bytes of a file, for error messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// A long-running helper (cutover serve, wanem) that is stopped with SIGTERM by its pid,
/// and killed if it will not stop; dropping it stops it too.
pub struct Background {
    name: String,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Background {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let f = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let f2 = f.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {}", describe(cmd)))?;
        Ok(Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Peak RSS so far, while it runs.
    pub fn vm_hwm_kb(&self) -> Option<u64> {
        self.pid().and_then(read_hwm).map(|(_, h)| h)
    }

    /// Wait until the process writes a port number into `file`.
    pub fn wait_port_file(&mut self, file: &Path, timeout: Duration) -> Result<u16> {
        let start = Instant::now();
        loop {
            if let Ok(s) = fs::read_to_string(file) {
                if let Ok(port) = s.trim().parse::<u16>() {
                    return Ok(port);
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "{} exited ({st}) before writing its port to {}: {}",
                        self.name,
                        file.display(),
                        tail(&self.log, 1500)
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} wrote no port to {} within {:?}: {}",
                    self.name,
                    file.display(),
                    timeout,
                    tail(&self.log, 1500)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status and whether it
    /// had to be killed.
    pub fn stop(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        let Some(mut c) = self.child.take() else {
            bail!("{} was already stopped", self.name);
        };
        if let Some(st) = c.try_wait()? {
            return Ok((st, false));
        }
        // SAFETY: kill has no memory effects; the pid is our own unreaped child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Some(st) = c.try_wait()? {
                return Ok((st, false));
            }
            thread::sleep(Duration::from_millis(20));
        }
        c.kill()?;
        Ok((c.wait()?, true))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(5));
        }
    }
}
