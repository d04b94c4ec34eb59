//! `cutover volume status --watch`: the status again and again, as `watch(1)` shows a
//! command. On a terminal the screen is cleared and redrawn every interval under a header
//! (interval, time). Into a pipe or file, only a state that differs from the last one
//! printed is printed, as a block after a blank line (`--json`: one document per line), so
//! that a log of it holds changes rather than the same block every second.
//!
//! Ctrl-C ends it with status 0, as does a reader that went away (a closed pipe, noticed
//! without waiting for the next write); a daemon that goes away is one line on stderr and
//! status 1.

use crate::exit;
use crate::print::{errln, out_text, outln, stdout_gone};
use daemon::control::{self, Request, VolumeStatus};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Between looks unless `--interval` says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Faster than this would only load the daemon (a status takes its volumes' locks).
const MIN_INTERVAL: f64 = 0.1;

/// `--interval SECS`: seconds, fractions allowed, from 0.1 to a day.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: give seconds, e.g. 1 or 0.5"))?;
    if !secs.is_finite() || !(MIN_INTERVAL..=86_400.0).contains(&secs) {
        return Err(format!(
            "{text:?}: give from {MIN_INTERVAL} to 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Look at the status of `name` (every volume when None) through the control socket `sock`
/// every `every` until Ctrl-C, a closed stdout or a daemon gone. Returns the exit status.
pub async fn watch(sock: PathBuf, name: Option<String>, json: bool, every: Duration) -> u8 {
    // Taken before the first look: a Ctrl-C at any moment ends the watch cleanly.
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            errln!("cutover volume status: cannot catch Ctrl-C: {e}");
            return exit::FATAL;
        }
    };
    let tty = std::io::stdout().is_terminal();
    let title = format!(
        "Every {:.1}s: cutover volume status{}",
        every.as_secs_f64(),
        name.as_deref().map(|n| format!(" {n}")).unwrap_or_default()
    );
    let gone = reader_gone(tty);
    tokio::pin!(gone);
    // What was printed last (without its time), when not on a terminal.
    let mut last: Option<String> = None;
    loop {
        let (s, req) = (sock.clone(), Request::Status { name: name.clone() });
        let look = tokio::task::spawn_blocking(move || control::call(&s, &req));
        let reply = tokio::select! {
            r = look => r,
            _ = sigint.recv() => return exit::OK,
        };
        let volumes = match reply {
            Ok(Ok(r)) if r.ok => r.volumes.unwrap_or_default(),
            Ok(Ok(r)) => {
                errln!(
                    "cutover volume status: {}",
                    r.error.as_deref().unwrap_or("the daemon refused")
                );
                return exit::FATAL;
            }
            Ok(Err(e)) => {
                // The first look fails as plain `status` does; a later one means the
                // daemon went away under the watch.
                let gone = if last.is_some() || tty {
                    "the daemon went away: "
                } else {
                    ""
                };
                errln!("cutover volume status: {gone}{e}");
                return exit::FATAL;
            }
            Err(e) => {
                errln!("cutover volume status: {e}");
                return exit::FATAL;
            }
        };
        let time = plan::logs::stamp(state::now_ms());
        if tty {
            let body = if json {
                serde_json::to_string_pretty(&serde_json::json!({ "volumes": volumes }))
                    .unwrap_or_default()
                    + "\n"
            } else {
                crate::volume::render(&volumes)
            };
            // Home, clear, then the whole screen in one write: no flicker line by line.
            out_text(&format!("\x1b[H\x1b[2J{title}    {time}\n\n{body}"));
            last = Some(String::new());
        } else {
            print_if_new(&volumes, json, &title, &time, &mut last);
        }
        if stdout_gone() {
            return exit::OK;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sigint.recv() => return exit::OK,
            _ = &mut gone => return exit::OK,
        }
    }
}

/// Resolves when stdout is a pipe whose reader went away (epoll reports an error on the
/// write end): printing only changes, the watch may not write for a long time, and would
/// only then find that `… | grep -m1 disconnected` is over. Never resolves on a terminal or
/// a file (which epoll does not watch).
async fn reader_gone(tty: bool) {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    use tokio::net::unix::pipe;
    // A copy of the descriptor, only watched (the writes go through stdout as ever, and
    // its blocking mode is left alone).
    let watched = (!tty)
        .then(|| std::io::stdout().as_fd().try_clone_to_owned().ok())
        .flatten()
        .and_then(|fd| pipe::Sender::from_owned_fd_unchecked(fd).ok());
    let Some(out) = watched else {
        return std::future::pending().await;
    };
    loop {
        match out.ready(Interest::ERROR).await {
            Ok(r) if r.is_error() => return,
            // A wakeup without the error (tokio allows for them): look again shortly.
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return std::future::pending().await,
        }
    }
}

/// Not on a terminal: print `volumes` if they differ from what `last` holds.
fn print_if_new(
    volumes: &[VolumeStatus],
    json: bool,
    title: &str,
    time: &str,
    last: &mut Option<String>,
) {
    let body = if json {
        serde_json::to_string(volumes).unwrap_or_default()
    } else {
        crate::volume::render(volumes)
    };
    if last.as_deref() == Some(body.as_str()) {
        return;
    }
    if json {
        outln!(
            "{}",
            serde_json::json!({ "time": time, "volumes": volumes })
        );
    } else {
        let gap = if last.is_some() { "\n" } else { "" };
        out_text(&format!("{gap}{title}    {time}\n{body}"));
    }
    *last = Some(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_seconds_within_bounds() {
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval(" 0.5 ").unwrap(), Duration::from_millis(500));
        for bad in ["0", "0.01", "-1", "nan", "inf", "1s", "", "100000"] {
            let e = parse_interval(bad).unwrap_err();
            assert!(e.contains("seconds"), "{bad}: {e}");
        }
    }
}
