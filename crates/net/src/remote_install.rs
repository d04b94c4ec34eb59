//! Putting this very cutover on an ssh remote that has none (or one of another protocol
//! version), so that an ssh endpoint needs no manual install. One ssh login runs a short
//! `sh` script that reports the remote's OS and architecture and whether the remote user's
//! cache (`${XDG_CACHE_HOME:-$HOME/.cache}/cutover/cutover-VERSION-DIGEST16`) already holds
//! this exact binary (its SHA-256 computed there with `sha256sum`, else `shasum -a 256`, else
//! `openssl dgst`). Only if it does not, and the platform matches, the same login receives
//! the binary on stdin into a fresh temporary file beside the final name, checks its SHA-256
//! there, checks that it runs (`--version`), makes it 0700 and renames it into place: a
//! file already at the final name is never written into, only replaced whole by the rename.
//! The path found or installed is remembered per ssh command and destination for the rest
//! of the process (retries and plan tasks reuse it without another login).

use crate::ssh::{keep_stderr, last_line, SshCommand};
use std::collections::HashMap;
use std::io::Read;
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// This build's version, part of the cached file's name.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How many hex digits of the SHA-256 name the cached file.
const NAME_DIGITS: usize = 16;
/// Piece of the binary written to ssh at a time (each write bounded by the patience).
const UPLOAD_CHUNK: usize = 256 << 10;
/// The first word of the script's first line (anything a login shell printed before it is
/// skipped).
const MARKER: &str = "cutover-install";

/// The script the remote runs with `sh -c SCRIPT cutover-install SHA256 NAME`. One line
/// without single quotes, so that it survives the remote login shell's quoting (tcsh too).
/// It answers `cutover-install OS MACHINE`, `path PATH`, then `have`, `need` or
/// `fail REASON`; after `need` it reads `go` and the binary from stdin and answers `done`,
/// `fail REASON` or `doesnotrun DETAIL`.
const SCRIPT: &str = concat!(
    "want=$1; name=$2; ",
    "case ${XDG_CACHE_HOME:-} in /*) c=$XDG_CACHE_HOME ;; *) c=${HOME:?}/.cache ;; esac; ",
    "d=$c/cutover; f=$d/$name; ",
    "echo \"cutover-install $(uname -s) $(uname -m)\"; ",
    "printf \"path %s\\n\" \"$f\"; ",
    "if command -v sha256sum >/dev/null 2>&1; then h=sha256sum; ",
    "elif command -v shasum >/dev/null 2>&1; then h=\"shasum -a 256\"; ",
    "elif command -v openssl >/dev/null 2>&1; then h=\"openssl dgst -sha256 -r\"; ",
    "else echo \"fail it has none of sha256sum, shasum or openssl to check the upload\"; exit 0; fi; ",
    "digest_of() { $h < \"$1\" | cut -c1-64; }; ",
    "if [ -e \"$d\" ] || [ -L \"$d\" ]; then ",
    "if [ -L \"$d\" ] || [ ! -d \"$d\" ] || [ ! -O \"$d\" ]; then ",
    "echo \"fail $d must be a directory (not a link) owned by this login\"; exit 0; fi; fi; ",
    "if [ -d \"$f\" ]; then echo \"fail $f is a directory\"; exit 0; fi; ",
    "if [ -f \"$f\" ] && [ ! -L \"$f\" ] && [ \"$(digest_of \"$f\")\" = \"$want\" ]; then ",
    "chmod 700 \"$d\" \"$f\" && echo have; exit 0; fi; ",
    "echo need; ",
    "read go || exit 0; [ \"$go\" = go ] || exit 0; ",
    "mkdir -p \"$d\" && chmod 700 \"$d\" || exit 1; ",
    "t=$(mktemp \"$d/.upload.XXXXXX\") || exit 1; ",
    "cleanup() { rm -f \"$t\"; }; trap cleanup EXIT; trap \"exit 1\" HUP INT TERM; ",
    "cat > \"$t\" || exit 1; ",
    "got=$(digest_of \"$t\"); ",
    "if [ \"$got\" != \"$want\" ]; then ",
    "echo \"fail the upload arrived with SHA-256 $got, not $want\"; exit 0; fi; ",
    "chmod 700 \"$t\" || exit 1; ",
    "if v=$(\"$t\" --version 2>&1); then :; else ",
    "echo \"doesnotrun $(printf \"%s\" \"$v\" | tail -n 1)\"; exit 0; fi; ",
    "mv -f \"$t\" \"$f\" || exit 1; ",
    "echo done"
);

/// Why this cutover could not be put on the remote.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read this cutover to install it on the remote: {0}")]
    Local(#[source] std::io::Error),
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{dest} runs {remote}, but this cutover is built for {local}: install cutover there or pass --remote-cutover PATH")]
    OtherPlatform {
        dest: String,
        remote: String,
        local: String,
    },
    #[error("{dest}: cannot install this cutover there: {reason}; install cutover there or pass --remote-cutover PATH")]
    Remote { dest: String, reason: String },
    #[error("{dest}: this cutover does not run there ({detail}), so it was not installed at {path}; install cutover there or pass --remote-cutover PATH")]
    DoesNotRun {
        dest: String,
        path: String,
        detail: String,
    },
    #[error("{dest}: no answer for {secs} s while installing this cutover there")]
    Stalled { dest: String, secs: u64 },
}

/// Where the remote's copy of this cutover is, and whether this call uploaded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Absolute path on the remote.
    pub path: String,
    /// Bytes uploaded; None when the copy was there already.
    pub uploaded: Option<u64>,
}

/// This running binary's SHA-256 (hex), computed once per process.
#[derive(Debug, Clone)]
struct ThisBinary {
    sha256: String,
}

/// The file of the running binary: `/proc/self/exe` names the very image that runs even if
/// its path was replaced since (a rebuild, an upgrade), so what is hashed is what is sent.
fn exe_path() -> std::io::Result<std::path::PathBuf> {
    let proc = std::path::Path::new("/proc/self/exe");
    if proc.exists() {
        return Ok(proc.to_path_buf());
    }
    std::env::current_exe()
}

fn hash_this_binary() -> std::io::Result<ThisBinary> {
    let mut file = std::fs::File::open(exe_path()?)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ThisBinary {
        sha256: hex(ctx.finish().as_ref()),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn this_binary() -> Result<ThisBinary, InstallError> {
    static HASHED: OnceLock<ThisBinary> = OnceLock::new();
    if let Some(b) = HASHED.get() {
        return Ok(b.clone());
    }
    let hashed = tokio::task::spawn_blocking(hash_this_binary)
        .await
        .map_err(|e| InstallError::Local(std::io::Error::other(e.to_string())))?
        .map_err(InstallError::Local)?;
    Ok(HASHED.get_or_init(|| hashed).clone())
}

/// What the remote login shell runs: the script in single quotes (it has none itself), its
/// arguments plain (hex digits, a version, dashes).
fn remote_command(sha256: &str) -> String {
    format!("sh -c '{SCRIPT}' {MARKER} {sha256} {}", cache_name(sha256))
}

/// This binary in pieces, read on a blocking thread.
fn read_this_binary() -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut file = match exe_path().and_then(std::fs::File::open) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut piece = vec![0u8; UPLOAD_CHUNK];
            match file.read(&mut piece) {
                Ok(0) => return,
                Ok(n) => {
                    piece.truncate(n);
                    if tx.blocking_send(Ok(piece)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// The cached file's name for a binary of this digest.
fn cache_name(sha256: &str) -> String {
    format!(
        "cutover-{VERSION}-{}",
        sha256.get(..NAME_DIGITS).unwrap_or(sha256)
    )
}

type Key = (Vec<String>, String);

fn remembered_paths() -> &'static Mutex<HashMap<Key, String>> {
    static PATHS: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    PATHS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key(cmd: &SshCommand, dest: &str) -> Key {
    (cmd.program.clone(), dest.to_string())
}

/// The remote copy found or installed earlier in this process for this ssh command and
/// destination.
pub fn remembered(cmd: &SshCommand, dest: &str) -> Option<String> {
    let paths = remembered_paths().lock().unwrap_or_else(|p| p.into_inner());
    paths.get(&key(cmd, dest)).cloned()
}

fn remember(cmd: &SshCommand, dest: &str, path: Option<&str>) {
    let mut paths = remembered_paths().lock().unwrap_or_else(|p| p.into_inner());
    match path {
        Some(p) => paths.insert(key(cmd, dest), p.to_string()),
        None => paths.remove(&key(cmd, dest)),
    };
}

/// Whether `uname -s` and `uname -m` describe the platform this binary was built for.
fn same_platform(system: &str, machine: &str) -> bool {
    let os = match system {
        "Linux" => "linux",
        "Darwin" => "macos",
        "FreeBSD" => "freebsd",
        "NetBSD" => "netbsd",
        "OpenBSD" => "openbsd",
        "DragonFly" => "dragonfly",
        _ => return false,
    };
    let arch = match machine {
        "x86_64" | "amd64" => "x86_64",
        "aarch64" | "arm64" => "aarch64",
        "i386" | "i486" | "i586" | "i686" => "x86",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "ppc64le" => "powerpc64",
        m if m.starts_with("armv") => "arm",
        _ => return false,
    };
    // ppc64 (big-endian) and ppc64le share Rust's arch name; only the little-endian one is known here.
    let endian_ok = machine != "ppc64le" || cfg!(target_endian = "little");
    os == std::env::consts::OS && arch == std::env::consts::ARCH && endian_ok
}

/// The script's answers up to its verdict.
#[derive(Debug, PartialEq, Eq)]
struct Probe {
    system: String,
    machine: String,
    path: String,
    verdict: Verdict,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Have,
    Need,
    Fail(String),
}

/// Read the script's first answers; None if its output ended before the verdict.
async fn read_probe(lines: &mut Lines<BufReader<ChildStdout>>) -> std::io::Result<Option<Probe>> {
    let mut platform = None;
    let mut path = None;
    while let Some(line) = lines.next_line().await? {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix(MARKER) {
            let mut words = rest.split_whitespace();
            platform = Some((
                words.next().unwrap_or("").to_string(),
                words.next().unwrap_or("").to_string(),
            ));
            continue;
        }
        let Some((system, machine)) = platform.clone() else {
            // What a login shell printed before the script: not ours.
            continue;
        };
        if let Some(p) = line.strip_prefix("path ") {
            path = Some(p.to_string());
            continue;
        }
        let verdict = match line {
            "have" => Verdict::Have,
            "need" => Verdict::Need,
            l => match l.strip_prefix("fail ") {
                Some(reason) => Verdict::Fail(reason.to_string()),
                None => continue,
            },
        };
        return Ok(Some(Probe {
            system,
            machine,
            path: path.unwrap_or_default(),
            verdict,
        }));
    }
    Ok(None)
}

/// One ssh process running the script.
struct Script {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: std::sync::Arc<Mutex<String>>,
    /// The local ssh program, for messages.
    ssh: String,
    dest: String,
    patience: Option<Duration>,
}

impl Script {
    fn start(
        cmd: &SshCommand,
        dest: &str,
        sha256: &str,
        patience: Option<Duration>,
    ) -> Result<Script, InstallError> {
        let remote = remote_command(sha256);
        let mut child = tokio::process::Command::new(&cmd.program[0])
            .args(&cmd.program[1..])
            .arg(dest)
            .arg(remote)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| InstallError::Spawn {
                program: cmd.program[0].clone(),
                source,
            })?;
        let (Some(stdout), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(InstallError::Local(std::io::Error::other(
                "ssh pipes missing",
            )));
        };
        Ok(Script {
            child,
            lines: BufReader::new(stdout).lines(),
            stderr: keep_stderr(err),
            ssh: cmd.program[0].clone(),
            dest: dest.to_string(),
            patience,
        })
    }

    fn stalled(&self) -> InstallError {
        InstallError::Stalled {
            dest: self.dest.clone(),
            secs: self.patience.map_or(0, |p| p.as_secs()),
        }
    }

    /// The script ended without a verdict: its exit code and stderr say why.
    async fn failure(&mut self) -> InstallError {
        let status = bounded(self.patience, self.child.wait()).await;
        let last = last_line(&self.stderr);
        let reason = match status.and_then(|s| s.ok()).and_then(|s| s.code()) {
            Some(255) => format!("{} failed: {last}", self.ssh),
            _ if last.is_empty() => "the install script ended early".to_string(),
            _ => last,
        };
        InstallError::Remote {
            dest: self.dest.clone(),
            reason,
        }
    }

    /// Say `go`, send the binary and close stdin; returns the bytes sent.
    async fn upload(&mut self) -> Result<u64, InstallError> {
        let Some(mut stdin) = self.child.stdin.take() else {
            return Err(InstallError::Local(std::io::Error::other(
                "ssh pipes missing",
            )));
        };
        let mut pieces = read_this_binary();
        let patience = self.patience;
        let mut sent = 0u64;
        let mut wrote = bounded(patience, stdin.write_all(b"go\n"))
            .await
            .ok_or_else(|| self.stalled())?;
        while wrote.is_ok() {
            let Some(piece) = pieces.recv().await else {
                break;
            };
            let piece = piece.map_err(InstallError::Local)?;
            wrote = bounded(patience, stdin.write_all(&piece))
                .await
                .ok_or_else(|| self.stalled())?;
            sent += piece.len() as u64;
        }
        if wrote.is_ok() {
            wrote = bounded(patience, stdin.shutdown())
                .await
                .ok_or_else(|| self.stalled())?;
        }
        drop(stdin);
        match wrote {
            Ok(()) => Ok(sent),
            // The remote side went away mid-upload: its exit code and stderr say why.
            Err(_) => Err(self.failure().await),
        }
    }

    /// The script's last answer after an upload.
    async fn outcome(&mut self, path: &str) -> Result<(), InstallError> {
        loop {
            let line = bounded(self.patience, self.lines.next_line())
                .await
                .ok_or_else(|| self.stalled())?;
            let Ok(Some(line)) = line else {
                return Err(self.failure().await);
            };
            let line = line.trim_end();
            if line == "done" {
                let _ = bounded(self.patience, self.child.wait()).await;
                return Ok(());
            }
            if let Some(reason) = line.strip_prefix("fail ") {
                return Err(InstallError::Remote {
                    dest: self.dest.clone(),
                    reason: reason.to_string(),
                });
            }
            if let Some(detail) = line.strip_prefix("doesnotrun ") {
                return Err(InstallError::DoesNotRun {
                    dest: self.dest.clone(),
                    path: path.to_string(),
                    detail: detail.to_string(),
                });
            }
        }
    }
}

/// `step`, or None once `limit` passed.
async fn bounded<T>(
    limit: Option<Duration>,
    step: impl std::future::Future<Output = T>,
) -> Option<T> {
    match limit {
        Some(l) => tokio::time::timeout(l, step).await.ok(),
        None => Some(step.await),
    }
}

/// Make sure the remote user's cache holds this binary (uploading it if not), and return
/// its path. One ssh login; `patience` bounds each step (the probe, every piece written,
/// the final answer).
pub async fn ensure(
    cmd: &SshCommand,
    dest: &str,
    patience: Option<Duration>,
) -> Result<Installed, InstallError> {
    remember(cmd, dest, None);
    let this = this_binary().await?;
    let mut script = Script::start(cmd, dest, &this.sha256, patience)?;
    let probe = bounded(patience, read_probe(&mut script.lines))
        .await
        .ok_or_else(|| script.stalled())?;
    let Ok(Some(probe)) = probe else {
        return Err(script.failure().await);
    };
    if !same_platform(&probe.system, &probe.machine) {
        return Err(InstallError::OtherPlatform {
            dest: dest.to_string(),
            remote: format!("{} {}", probe.system, probe.machine),
            local: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        });
    }
    let fail = |reason: String| InstallError::Remote {
        dest: dest.to_string(),
        reason,
    };
    if !probe.path.starts_with('/') || probe.path.chars().any(char::is_control) {
        return Err(fail(format!(
            "its cache path {:?} is not an absolute path",
            probe.path
        )));
    }
    let uploaded = match probe.verdict {
        Verdict::Fail(reason) => return Err(fail(reason)),
        Verdict::Have => None,
        Verdict::Need => {
            let sent = script.upload().await?;
            // The script compared the SHA-256 of what arrived with this binary's.
            script.outcome(&probe.path).await?;
            Some(sent)
        }
    };
    remember(cmd, dest, Some(&probe.path));
    Ok(Installed {
        path: probe.path,
        uploaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_survives_any_login_shell_quoting() {
        assert!(!SCRIPT.contains('\''), "single quote in the script");
        assert!(!SCRIPT.contains('\n'), "newline in the script");
        assert!(SCRIPT.is_ascii());
    }

    #[test]
    fn the_script_runs_in_sh_and_reports_a_missing_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg(MARKER)
            .arg("00".repeat(32))
            .arg("cutover-test")
            .env("XDG_CACHE_HOME", dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout);
        let expected_path = format!("path {}/cutover/cutover-test", dir.path().display());
        assert!(text.starts_with(MARKER), "{text}");
        assert!(text.contains(&expected_path), "{text}");
        assert!(text.trim_end().ends_with("need"), "{text}");
        // No `go` on stdin: nothing was created.
        assert!(!dir.path().join("cutover").exists());
    }

    #[test]
    fn platforms_are_compared_with_this_build() {
        assert!(!same_platform("Plan9", "x86_64"));
        assert!(!same_platform("Linux", "vax"));
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert!(same_platform("Linux", "x86_64"));
            assert!(!same_platform("Linux", "aarch64"));
            assert!(!same_platform("Darwin", "x86_64"));
        }
    }

    #[test]
    fn the_cache_name_carries_version_and_digest_prefix() {
        let name = cache_name(&"ab".repeat(32));
        assert_eq!(name, format!("cutover-{VERSION}-abababababababab"));
    }

    #[test]
    fn this_binary_hashes_like_sha256sum() {
        let me = hash_this_binary().expect("hash");
        assert_eq!(me.sha256.len(), 64);
        let out = std::process::Command::new("sha256sum")
            // Not /proc/self/exe: in sha256sum that is sha256sum.
            .arg(std::env::current_exe().expect("exe"))
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.starts_with(&me.sha256), "{text} vs {}", me.sha256);
        }
    }
}
