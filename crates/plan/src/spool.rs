//! The processes of `command` tasks: the source command whose stdout is spooled to a file
//! (replaced only by a complete output, so a failed dump never clobbers the last good one),
//! and the destination command fed the transferred file. Each runs in its own process group,
//! killed with everything it started when its pass is dropped (Ctrl-C) or ends.

// Process groups are killed, and failures told, as hooks' are.
pub(crate) use ::hooks::{exit_reason, kill_group};

use crate::logs::TaskLog;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Kills a process group when dropped.
pub(crate) struct GroupGuard(pub(crate) Option<rustix::process::Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// Run `command` with `sh -c` in `dir`, stdin and stdout as given, stderr line by line into
/// the task's log; returns the last stderr line with the failure.
async fn run(
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    stdin: Stdio,
    stdout: Stdio,
    what: &str,
    log: &TaskLog,
) -> Result<(), String> {
    let mut sh = tokio::process::Command::new("sh");
    sh.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)));
    run_command(sh, dir, stdin, stdout, what, log).await
}

/// Run `cmd` in `dir` in its own process group, stderr line by line into the log.
async fn run_command(
    mut cmd: tokio::process::Command,
    dir: &Path,
    stdin: Stdio,
    stdout: Stdio,
    what: &str,
    log: &TaskLog,
) -> Result<(), String> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .current_dir(dir)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what}: cannot start {program}: {e}"))?;
    let _guard = GroupGuard(
        child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32)),
    );
    let mut last = String::new();
    if let Some(err) = child.stderr.take() {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.line(&format!("{what}: {line}"));
            last = line;
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("{what}: cannot wait for it: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let how = exit_reason(status);
    Err(if last.is_empty() {
        format!("{what} {how}")
    } else {
        format!("{what} {how}: {last}")
    })
}

/// Run `command` with `env` (the pass's `CUTOVER_TASK`, `CUTOVER_PASS` and stamp) and spool
/// its stdout to `out` (via a temporary file beside it, renamed once the command succeeded
/// and the data is on disk). Returns the output's size.
pub async fn spool(
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    out: &Path,
    log: &TaskLog,
) -> Result<u64, String> {
    spool_as("command", command, dir, env, out, log).await
}

/// Run a verify command into `out` and return the BLAKE3 hash of its output and its size.
pub async fn fingerprint_output(
    what: &str,
    command: &str,
    dir: &Path,
    out: &Path,
    log: &TaskLog,
) -> Result<(blake3::Hash, u64), String> {
    let size = spool_as(what, command, dir, &[], out, log).await?;
    let file = std::fs::File::open(out).map_err(|e| format!("{what}: {}: {e}", out.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(file)
        .map_err(|e| format!("{what}: {}: {e}", out.display()))?;
    Ok((h.finalize(), size))
}

async fn spool_as(
    what: &str,
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    out: &Path,
    log: &TaskLog,
) -> Result<u64, String> {
    let err = |e: std::io::Error| format!("spool {}: {e}", out.display());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    // Only a regular file (or nothing) at `out` is replaced; the temporary file beside it
    // is removed if the command fails or the pass is dropped.
    let spooled =
        cofs::safe_write::Replacement::begin(out, 0o644).map_err(|e| format!("spool {e}"))?;
    let file = spooled.file().try_clone().map_err(err)?;
    log.line(&format!(
        "{what} starts: sh -c {command:?} > {}",
        out.display()
    ));
    run(
        command,
        dir,
        env,
        Stdio::null(),
        Stdio::from(file),
        what,
        log,
    )
    .await?;
    let size = spooled.file().metadata().map_err(err)?.len();
    spooled.commit().map_err(|e| format!("spool {e}"))?;
    log.line(&format!("{what} done: {size} bytes spooled"));
    Ok(size)
}

/// Run `command` with `input` on its stdin (the destination side of a command task).
pub async fn feed(command: &str, dir: &Path, input: &Path, log: &TaskLog) -> Result<(), String> {
    let file = std::fs::File::open(input)
        .map_err(|e| format!("destination_command: {}: {e}", input.display()))?;
    log.line(&format!(
        "destination_command starts: sh -c {command:?} < {}",
        input.display()
    ));
    run(
        command,
        dir,
        &[],
        Stdio::from(file),
        Stdio::null(),
        "destination_command",
        log,
    )
    .await?;
    log.line("destination_command done");
    Ok(())
}

/// Run the destination command on an ssh destination's host: `argv` is the ssh command,
/// the host and the remote command line, which reads the transferred file there (nothing
/// crosses the network again). ssh runs in its own process group, as local commands do, so
/// Ctrl-C kills it; without a terminal, sshd does not signal the remote command, which
/// runs on until it next reads or writes the closed session.
pub async fn feed_remote(argv: &[String], dir: &Path, log: &TaskLog) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("destination_command: empty ssh command".into());
    };
    log.line(&format!("destination_command starts: {}", argv.join(" ")));
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    run_command(
        cmd,
        dir,
        Stdio::null(),
        Stdio::null(),
        "destination_command",
        log,
    )
    .await?;
    log.line("destination_command done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spools_whole_outputs_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/out");
        let log = TaskLog::discard();
        assert_eq!(
            spool("printf abc", dir.path(), &[], &out, &log)
                .await
                .unwrap(),
            3
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"abc");
        // A failing command leaves the last good output, and says why it failed.
        let e = spool(
            "printf partial; echo no such table >&2; exit 2",
            dir.path(),
            &[],
            &out,
            &log,
        )
        .await
        .unwrap_err();
        assert_eq!(e, "command exited with status 2: no such table");
        assert_eq!(std::fs::read(&out).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"], "only the spooled output is left");
        feed("cat > copy", dir.path(), &out, &log).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), b"abc");
    }

    #[tokio::test]
    async fn spooling_never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let log = TaskLog::discard();
        // The output itself a symlink: refused, the link and its target kept.
        let out = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        let e = spool("printf dump", dir.path(), &[], &out, &log)
            .await
            .unwrap_err();
        assert!(e.contains("out: is a symlink, not a regular file"), "{e}");
        assert!(std::fs::symlink_metadata(&out).unwrap().is_symlink());
        // A symlink planted where the old fixed temporary name was is not followed.
        let out = dir.path().join("db.dump");
        std::os::unix::fs::symlink(&victim, dir.path().join("db.dump.spooling")).unwrap();
        spool("printf dump", dir.path(), &[], &out, &log)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"dump");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn a_dropped_spool_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let log = TaskLog::discard();
        let out = dir.path().join("out");
        let fut = spool(&cmd, dir.path(), &[], &out, &log);
        // Drop the pass mid-way, as an aborted task does.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), fut).await;
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let t = std::time::Instant::now();
        loop {
            match std::fs::read_to_string(&stat) {
                Err(_) => break,
                Ok(s) if s.contains(") Z ") => break,
                Ok(s) => {
                    assert!(t.elapsed().as_secs() < 5, "sleep survived: {s}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
}
