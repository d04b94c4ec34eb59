//! `paths_from`: the command that says what a pass of a `tree` task syncs. It runs before
//! the pass on the source side (here for a local source, through the task's `rsh` on an
//! ssh source's host) with the pass's environment (see [`crate::stamps`]) and
//! `CUTOVER_SOURCE`; its stdout, one path a line relative to the source, becomes the list
//! file the sync gets as `files_from`.
//!
//! The list is checked as it is read, so a mistake fails the pass with a line that names
//! it rather than reaching the engine: an absolute path or a `..` component is refused,
//! empty lines are skipped and a leading `./` (what `cd SRC && find .` prints) is dropped.
//! The file is replaced only by a complete list, so a failed command leaves the previous
//! pass's list to look at.

use crate::logs::TaskLog;
use crate::SourceSide;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Run `command` on `side` and write the paths it prints to `out`; returns how many.
/// `env` is the pass's environment; `dir` the plan's directory (where a local command runs).
pub async fn list(
    command: &str,
    side: &SourceSide,
    dir: &Path,
    env: &[(String, String)],
    out: &Path,
    log: &TaskLog,
) -> Result<u64, String> {
    let err = |e: std::io::Error| format!("paths_from: {}: {e}", out.display());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let list =
        cofs::safe_write::Replacement::begin(out, 0o644).map_err(|e| format!("paths_from: {e}"))?;
    let mut cmd = match side {
        SourceSide::Local(path) => {
            log.line(&format!("paths_from starts: sh -c {command:?}"));
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c")
                .arg(command)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("CUTOVER_SOURCE", path);
            c
        }
        SourceSide::Remote { argv, path } => {
            let Some((program, args)) = argv.split_first() else {
                return Err("paths_from: empty ssh command".into());
            };
            let line = remote_line(command, env, path);
            log.line(&format!("paths_from starts: {} {line}", argv.join(" ")));
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(line);
            c
        }
    };
    let mut child = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, killed with everything it started when the pass is dropped or
        // stopped (Ctrl-C), as a command task's command is.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("paths_from: cannot start it: {e}"))?;
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let _guard = crate::spool::GroupGuard(pid);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("paths_from: no pipes to the command".into());
    };
    let read_list = async {
        let r = read_into(stdout, list.file(), out).await;
        // A bad line ends the pass at once: the command (and all it started) is killed
        // rather than left to print a list nobody reads, and its stderr then ends too.
        if r.is_err() {
            crate::spool::kill_group(pid);
        }
        r
    };
    let read_errors = async {
        let mut last = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            log.line(&format!("paths_from: {l}"));
            last = l;
        }
        last
    };
    let (n, last) = tokio::join!(read_list, read_errors);
    let n = n?;
    let status = child
        .wait()
        .await
        .map_err(|e| format!("paths_from: cannot wait for it: {e}"))?;
    if !status.success() {
        let how = crate::spool::exit_reason(status);
        return Err(if last.is_empty() {
            format!("paths_from {how}")
        } else {
            format!("paths_from {how}: {last}")
        });
    }
    list.commit().map_err(|e| format!("paths_from: {e}"))?;
    log.line(&format!(
        "paths_from done: {n} path{} listed in {}",
        if n == 1 { "" } else { "s" },
        out.display()
    ));
    Ok(n)
}

/// Copy the command's output into the list, a checked path a line; returns how many.
async fn read_into(
    stdout: tokio::process::ChildStdout,
    file: &std::fs::File,
    out: &Path,
) -> Result<u64, String> {
    let err = |e: std::io::Error| format!("paths_from: {}: {e}", out.display());
    let mut r = BufReader::new(stdout);
    let mut w = std::io::BufWriter::new(file);
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await.map_err(err)? == 0 {
            break;
        }
        let Some(path) = normalise(&line)? else {
            continue;
        };
        w.write_all(path).map_err(err)?;
        w.write_all(b"\n").map_err(err)?;
        n += 1;
    }
    w.flush().map_err(err)?;
    Ok(n)
}

/// One line of the command's output as the list holds it: None for an empty line, the
/// path without a leading `./`, or why it cannot be in a list of paths relative to the
/// source.
fn normalise(line: &[u8]) -> Result<Option<&[u8]>, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.is_empty() {
        return Ok(None);
    }
    let shown = || String::from_utf8_lossy(line).into_owned();
    if line.contains(&0) {
        return Err(format!(
            "paths_from printed a line with a NUL byte ({:?}): print one path a line",
            shown()
        ));
    }
    if line.starts_with(b"/") {
        return Err(format!(
            "paths_from printed the absolute path {:?}: print paths relative to the source, e.g. cd \"$CUTOVER_SOURCE\" && find . …",
            shown()
        ));
    }
    if line.split(|&b| b == b'/').any(|c| c == b"..") {
        return Err(format!(
            "paths_from printed {:?}, which leaves the source (..): print paths beneath it",
            shown()
        ));
    }
    let mut path = line;
    while let Some(rest) = path.strip_prefix(b"./") {
        // `.//a` too: the slashes after the `.` go with it.
        path = &rest[rest.iter().take_while(|&&b| b == b'/').count()..];
    }
    Ok(Some(if path.is_empty() { b"." } else { path }))
}

/// The command line an ssh source's host runs: `env K=V … CUTOVER_SOURCE=PATH sh -c CMD`,
/// every word quoted for a POSIX shell (the remote login shell reads it, as it reads a
/// `destination_command`).
fn remote_line(command: &str, env: &[(String, String)], source: &str) -> String {
    let mut words = vec!["env".to_string()];
    for (k, v) in env {
        words.push(quote(&format!("{k}={v}")));
    }
    words.push(quote(&format!("CUTOVER_SOURCE={source}")));
    words.extend(["sh".into(), "-c".into(), quote(command)]);
    words.join(" ")
}

/// `'…'` with every `'` written as `'\''`: one word for any POSIX shell, whatever it holds.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_and_tidied() {
        let ok = |l: &str| normalise(l.as_bytes()).unwrap().map(|p| p.to_vec());
        assert_eq!(ok("a/b\n"), Some(b"a/b".to_vec()));
        assert_eq!(ok("./a\n"), Some(b"a".to_vec()));
        assert_eq!(ok(".//./a"), Some(b"a".to_vec()));
        assert_eq!(ok("./"), Some(b".".to_vec()));
        assert_eq!(ok("a b/..c"), Some(b"a b/..c".to_vec()));
        assert_eq!(ok("\n"), None);
        let bad = |l: &str| normalise(l.as_bytes()).unwrap_err();
        assert!(bad("/srv/a\n").contains("absolute path \"/srv/a\""));
        assert!(bad("a/../../etc").contains("leaves the source"));
        assert!(bad("a\0b").contains("NUL"));
    }

    #[test]
    fn the_remote_line_quotes_every_word() {
        let env = [("CUTOVER_LAST_SUCCESS".to_string(), String::new())];
        assert_eq!(
            remote_line("find . -newer 'x'", &env, "/srv/it's"),
            "env 'CUTOVER_LAST_SUCCESS=' 'CUTOVER_SOURCE=/srv/it'\\''s' sh -c 'find . -newer '\\''x'\\'''"
        );
    }

    #[tokio::test]
    async fn a_local_command_lists_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("paths/t");
        let log = TaskLog::discard();
        let side = SourceSide::Local(dir.path().join("src"));
        let env = [("CUTOVER_PASS".to_string(), "presync".to_string())];
        let cmd = "echo ./$CUTOVER_PASS; echo; echo \"${CUTOVER_SOURCE##*/}/x\"";
        let n = list(cmd, &side, dir.path(), &env, &out, &log)
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(std::fs::read(&out).unwrap(), b"presync\nsrc/x\n");
        // A failure keeps the last list and says why.
        let e = list(
            "echo y; echo no >&2; exit 4",
            &side,
            dir.path(),
            &env,
            &out,
            &log,
        )
        .await
        .unwrap_err();
        assert_eq!(e, "paths_from exited with status 4: no");
        assert_eq!(std::fs::read(&out).unwrap(), b"presync\nsrc/x\n");
        let e = list("echo /etc; sleep 60", &side, dir.path(), &env, &out, &log)
            .await
            .unwrap_err();
        assert!(e.contains("absolute path"), "{e}");
        // An empty list is a list.
        assert_eq!(
            list("true", &side, dir.path(), &env, &out, &log)
                .await
                .unwrap(),
            0
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"");
    }
}
