//! Running a hook (a plan's `[[pre_final]]`, `[[post_final]]`, per-pass `pre_pass`/
//! `post_pass` and notify hooks, and the daemon's `[[volume_notify]]`): a shell command run
//! in its own process group with a timeout, output appended to a log (`hooks.log`); on
//! timeout or Ctrl-C the whole group is killed, so whatever the command started (a
//! `pg_dump`, a `sleep`) dies with it. A notify hook may be a webhook instead: its input
//! POSTed as JSON (ureq, rustls).

use crate::process::{exit_reason, kill_group, stopped};
use crate::{webhook_shown, Hook, HookRun};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-24T01:02:03.456Z`: the time of a log line
/// (hooks' and plans').
pub fn stamp(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_else(|_| ms.to_string())
}

/// Milliseconds since the epoch, for [`stamp`].
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where and how a hook runs.
#[derive(Clone, Copy)]
pub struct HookCall<'a> {
    /// `pre_final`, `pre_pass`, `on_success`…: `CUTOVER_HOOK`, and the tag of its log lines.
    pub phase: &'a str,
    /// `CUTOVER_PLAN`; empty for a hook outside a plan (the daemon's volume notify
    /// hooks), which then has no `CUTOVER_PLAN`.
    pub plan_path: &'a Path,
    /// The working directory (the plan's; the daemon's state directory).
    pub dir: &'a Path,
    /// Receives its stdout and stderr (appended).
    pub log: Option<&'a Path>,
    /// On its stdin (notify hooks: the report).
    pub input: Option<&'a [u8]>,
    /// More environment (a pass's `CUTOVER_TASK`, `CUTOVER_PASS`, stamp…).
    pub env: &'a [(String, String)],
    /// The task whose pass it runs around, for its log lines.
    pub task: Option<&'a str>,
}

/// Run `hook` as `call` says. Returns the seconds it took, or a one-line reason it failed.
pub async fn run_hook(
    hook: &Hook,
    call: &HookCall<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Result<f64, String> {
    let HookCall {
        phase,
        plan_path,
        dir,
        log,
        input,
        env,
        task,
    } = *call;
    let tag = match task {
        Some(t) => format!("{phase} {t}"),
        None => phase.to_string(),
    };
    let started = Instant::now();
    let command = match &hook.run {
        HookRun::Command(c) => c,
        HookRun::Webhook(url) => {
            let r = post_webhook(url, input.unwrap_or_default(), hook.timeout).await;
            if let Some(path) = log {
                if let Ok(mut f) = cofs::safe_write::open_append(path, 0o644) {
                    let _ = writeln!(
                        f,
                        "{} [{tag}] {}: POST {} ({} bytes): {}",
                        stamp(now_ms()),
                        hook.name,
                        webhook_shown(url),
                        input.map_or(0, |i| i.len()),
                        match &r {
                            Ok(status) => format!("answered {status}"),
                            Err(e) => e.clone(),
                        }
                    );
                }
            }
            return r.map(|_| started.elapsed().as_secs_f64());
        }
    };
    let (out, err) = match log {
        Some(path) => {
            let mut f = cofs::safe_write::open_append(path, 0o644).map_err(|e| e.to_string())?;
            let _ = writeln!(
                f,
                "{} [{tag}] {}: sh -c {:?}",
                stamp(now_ms()),
                hook.name,
                command
            );
            let e = f
                .try_clone()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            (Stdio::from(f), Stdio::from(e))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut sh = tokio::process::Command::new("sh");
    if !plan_path.as_os_str().is_empty() {
        sh.env("CUTOVER_PLAN", plan_path);
    }
    let mut child = sh
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env("CUTOVER_HOOK", phase)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out)
        .stderr(err)
        // Its own group, so a timeout or Ctrl-C can kill everything it started.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    // Feed stdin beside the wait, so a hook that never reads cannot block the runner (its
    // timeout still applies); a hook that exits without reading is not an error.
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&data).await;
        });
    }
    let kill_group = || kill_group(pid);
    let stopped = stopped(stop);
    let r = tokio::select! {
        st = child.wait() => match st {
            Ok(st) if st.success() => Ok(started.elapsed().as_secs_f64()),
            Ok(st) => Err(exit_reason(st)),
            Err(e) => Err(format!("cannot wait for it: {e}")),
        },
        _ = tokio::time::sleep(hook.timeout) => {
            kill_group();
            Err(format!(
                "timed out after {} and was killed with everything it started",
                humantime::format_duration(hook.timeout)
            ))
        }
        _ = stopped => {
            kill_group();
            Err("stopped by Ctrl-C (killed with everything it started)".into())
        }
    };
    // Whatever the outcome, the shell's children must not outlive the hook: kill the
    // group (a no-op when all exited) and reap the shell.
    kill_group();
    let _ = child.wait().await;
    r
}

/// POST `body` as JSON to `url` within `timeout` (connecting, sending and reading the answer
/// together); returns the HTTP status. Any answer outside 2xx is a failure. The URL is shown
/// in errors by scheme and host only: its path and query often hold the hook's secret.
pub async fn post_webhook(url: &str, body: &[u8], timeout: Duration) -> Result<u16, String> {
    let shown = webhook_shown(url);
    let (url, body) = (url.to_string(), body.to_vec());
    let post = tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(true)
            .build()
            .new_agent();
        agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map(|r| r.status().as_u16())
    });
    // ureq's own timeout covers the request; this one also covers a resolver that hangs.
    match tokio::time::timeout(timeout + Duration::from_secs(1), post).await {
        Ok(Ok(Ok(status))) => Ok(status),
        Ok(Ok(Err(ureq::Error::StatusCode(code)))) => {
            Err(format!("POST {shown}: answered HTTP {code}"))
        }
        Ok(Ok(Err(e))) => Err(format!("POST {shown}: {e}")),
        Ok(Err(e)) => Err(format!("POST {shown}: {e}")),
        Err(_) => Err(format!(
            "POST {shown}: no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(command: &str, timeout: Duration) -> Hook {
        Hook {
            name: "t".into(),
            run: HookRun::Command(command.into()),
            timeout,
            err_is_fatal: true,
        }
    }

    #[tokio::test]
    async fn success_failure_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (_tx, mut rx) = watch::channel(false);
        let p = Path::new("plan.toml");
        let call = HookCall {
            phase: "pre_final",
            plan_path: p,
            dir: dir.path(),
            log: Some(&log),
            input: None,
            env: &[],
            task: None,
        };
        run_hook(
            &hook("echo hello; pwd", Duration::from_secs(10)),
            &call,
            &mut rx,
        )
        .await
        .unwrap();
        let e = run_hook(&hook("exit 3", Duration::from_secs(10)), &call, &mut rx)
            .await
            .unwrap_err();
        assert_eq!(e, "exited with status 3");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello\n"), "{text}");
        assert!(
            text.contains(&format!("{}\n", dir.path().display())),
            "{text}"
        );
        let input = br#"{"ok":true}"#;
        let h = hook("cat > got", Duration::from_secs(10));
        let notify = HookCall {
            phase: "on_success",
            log: None,
            input: Some(input),
            ..call
        };
        run_hook(&h, &notify, &mut rx).await.unwrap();
        let got = std::fs::read(dir.path().join("got")).unwrap();
        assert_eq!(got, input);
    }

    #[tokio::test]
    async fn a_pass_hook_gets_its_environment_and_a_tagged_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let (_tx, mut rx) = watch::channel(false);
        let env = [("CUTOVER_TASK".to_string(), "db".to_string())];
        let call = HookCall {
            phase: "pre_pass",
            plan_path: Path::new("plan.toml"),
            dir: dir.path(),
            log: Some(&log),
            input: None,
            env: &env,
            task: Some("db"),
        };
        run_hook(
            &hook("echo $CUTOVER_HOOK $CUTOVER_TASK", Duration::from_secs(10)),
            &call,
            &mut rx,
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("[pre_pass db] t: sh -c"), "{text}");
        assert!(text.contains("\npre_pass db\n"), "{text}");
    }

    /// A listener on 127.0.0.1 that reads a request and answers `answer` (None: never).
    fn http_listener(answer: Option<&'static str>) -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                match answer {
                    Some(a) => {
                        let _ = c.write_all(a.as_bytes());
                    }
                    None => std::thread::sleep(Duration::from_secs(30)),
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn webhook_failures_are_one_line_without_the_secret_path() {
        let port = http_listener(Some(
            "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ));
        let url = format!("http://127.0.0.1:{port}/T0/secret");
        let e = post_webhook(&url, b"{}", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            format!("POST http://127.0.0.1:{port}: answered HTTP 500")
        );
        // A listener that never answers: the hook's timeout ends the wait.
        let port = http_listener(None);
        let started = Instant::now();
        let e = post_webhook(
            &format!("http://127.0.0.1:{port}/T0/secret"),
            b"{}",
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{e}");
        assert!(
            e.starts_with(&format!("POST http://127.0.0.1:{port}: ")),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let (_tx, mut rx) = watch::channel(false);
        let started = Instant::now();
        // The background sleep is a grandchild: only a group kill reaches it.
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let call = HookCall {
            phase: "pre_final",
            plan_path: Path::new("p"),
            dir: dir.path(),
            log: None,
            input: None,
            env: &[],
            task: None,
        };
        let e = run_hook(&hook(&cmd, Duration::from_millis(500)), &call, &mut rx)
            .await
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let proc = format!("/proc/{}", pid.trim());
        // Killed processes are reaped by init shortly after.
        let t = Instant::now();
        while Path::new(&proc).exists() && t.elapsed() < Duration::from_secs(5) {
            let stat = std::fs::read_to_string(format!("{proc}/stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stat = std::fs::read_to_string(format!("{proc}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "sleep survived: {stat}"
        );
    }
}
