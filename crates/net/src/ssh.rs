//! ssh endpoints: every connection of a session is one `ssh HOST cutover serve --stdio`
//! process whose stdin and stdout carry the frames, so `-j 8` is eight TCP flows (one ssh
//! connection is one window-limited flow). The user's ssh config, agent, ProxyJump and keys
//! apply because we run their `ssh` (or the `-e/--rsh` command). ssh encrypts and
//! authenticates; no TLS runs inside it.

use crate::Conn;
use proto::WireCounter;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// How much of a child's stderr is kept for error messages.
const STDERR_KEEP: usize = 4096;

/// How to start the remote end.
#[derive(Debug, Clone)]
pub struct SshCommand {
    /// The local command and its arguments (`ssh` by default, or `-e/--rsh`).
    pub program: Vec<String>,
    /// The remote `cutover` (`--remote-cutover`), run through the remote shell.
    pub remote_cutover: String,
    /// When the remote has no usable `remote_cutover` (missing, or another protocol
    /// version), copy this binary into the remote user's cache and run that instead
    /// (`crate::remote_install`). Off unless the caller turns it on.
    pub install: bool,
}

impl SshCommand {
    /// `rsh` is split like a shell would (`ssh -p 2222 -i "my key"`).
    pub fn new(rsh: &str, remote_cutover: &str) -> Result<SshCommand, String> {
        let program = shlex::split(rsh)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("--rsh {rsh:?}: not a command line (unbalanced quotes?)"))?;
        if remote_cutover.trim().is_empty() {
            return Err("--remote-cutover: empty".into());
        }
        Ok(SshCommand {
            program,
            remote_cutover: remote_cutover.to_string(),
            install: false,
        })
    }

    /// The command line the remote shell runs.
    fn remote_command(&self) -> String {
        let program = shlex::try_quote(&self.remote_cutover)
            .map(|q| q.into_owned())
            .unwrap_or_else(|_| self.remote_cutover.clone());
        format!("{program} serve --stdio")
    }
}

/// What became of one ssh process, for error messages.
#[derive(Clone)]
pub struct SshChild {
    status: watch::Receiver<Option<ExitStatus>>,
    stderr: Arc<Mutex<String>>,
}

impl SshChild {
    /// The last line the process wrote to stderr so far (ssh's or the remote's error).
    pub fn stderr_line(&self) -> String {
        last_line(&self.stderr)
    }

    /// Wait up to `limit` for the process to end, then say what went wrong in one line.
    pub async fn diagnose(&self, dest: &str, cmd: &SshCommand, limit: Duration) -> SshFailure {
        let mut status = self.status.clone();
        let _ = tokio::time::timeout(limit, status.wait_for(|s| s.is_some())).await;
        let code = status.borrow().and_then(|s| s.code());
        let last = last_line(&self.stderr);
        let ssh = &cmd.program[0];
        let message = match code {
            Some(127) => format!(
                "{dest}: the remote has no {:?} ({last}); install cutover there or pass --remote-cutover PATH",
                cmd.remote_cutover
            ),
            Some(126) => format!(
                "{dest}: the remote cannot run {:?} ({last}); check its permissions or pass --remote-cutover PATH",
                cmd.remote_cutover
            ),
            Some(255) => format!("{dest}: {ssh} failed: {last}"),
            Some(c) if !last.is_empty() => format!("{dest}: the remote cutover exited with {c}: {last}"),
            Some(c) => format!("{dest}: {ssh} exited with {c} before the handshake finished"),
            None if !last.is_empty() => format!("{dest}: {last}"),
            None => format!("{dest}: the remote end closed the connection during the handshake"),
        };
        SshFailure {
            message,
            // The shell's codes for a command it could not find (127) or not execute (126).
            no_remote_cutover: matches!(code, Some(126 | 127)),
        }
    }
}

/// Why an ssh connection failed before the handshake finished.
#[derive(Debug, Clone)]
pub struct SshFailure {
    /// One line for the user.
    pub message: String,
    /// The remote shell could not find or not run the remote cutover.
    pub no_remote_cutover: bool,
}

/// Start `ssh DEST cutover serve --stdio` and wrap its pipes as a connection.
pub fn spawn(
    cmd: &SshCommand,
    dest: &str,
    wire: Arc<WireCounter>,
) -> std::io::Result<(Conn, SshChild)> {
    spawn_remote(&cmd.program, dest, &cmd.remote_command(), wire)
}

/// Start `PROGRAM… DEST REMOTE_COMMAND` (an ssh command line, the remote shell running
/// `remote_command`) and wrap its pipes as a connection.
pub fn spawn_remote(
    program: &[String],
    dest: &str,
    remote_command: &str,
    wire: Arc<WireCounter>,
) -> std::io::Result<(Conn, SshChild)> {
    let Some((first, rest)) = program.split_first() else {
        return Err(std::io::Error::other("an empty ssh command"));
    };
    let mut child = tokio::process::Command::new(first)
        .args(rest)
        .arg(dest)
        .arg(remote_command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The session ends by closing stdin; an abandoned ssh must not outlive us.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {first:?}: {e}")))?;
    let (Some(stdin), Some(stdout), Some(err)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(std::io::Error::other("ssh pipes missing"));
    };
    let stderr = keep_stderr(err);
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        let _ = tx.send(status);
    });
    let conn = Conn::framed(
        tokio::io::BufReader::with_capacity(64 << 10, stdout),
        stdin,
        wire,
    );
    Ok((conn, SshChild { status: rx, stderr }))
}

/// Collect the last few KiB of a child's stderr, for error messages (visible as they come
/// with `CUTOVER_LOG=ssh=debug`).
pub(crate) fn keep_stderr(mut err: tokio::process::ChildStderr) -> Arc<Mutex<String>> {
    let stderr = Arc::new(Mutex::new(String::new()));
    let kept = stderr.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = err.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            tracing::debug!(target: "ssh", "{}", text.trim_end());
            let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
            k.push_str(&text);
            if k.len() > STDERR_KEEP {
                let cut = k.len() - STDERR_KEEP;
                let cut = (cut..k.len()).find(|i| k.is_char_boundary(*i)).unwrap_or(0);
                k.drain(..cut);
            }
        }
    });
    stderr
}

/// The last non-blank line of what [`keep_stderr`] kept.
pub(crate) fn last_line(kept: &Mutex<String>) -> String {
    let text = kept.lock().unwrap_or_else(|p| p.into_inner());
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rsh_and_quotes_the_remote_program() {
        let c = SshCommand::new("ssh -p 2222 -i 'my key'", "/opt/cut over/cutover").unwrap();
        assert_eq!(c.program, ["ssh", "-p", "2222", "-i", "my key"]);
        assert_eq!(c.remote_command(), "'/opt/cut over/cutover' serve --stdio");
        assert!(SshCommand::new("ssh 'unbalanced", "cutover").is_err());
        assert!(SshCommand::new("", "cutover").is_err());
    }
}
