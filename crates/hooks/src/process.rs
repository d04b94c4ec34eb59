//! The processes hooks (and a plan's command tasks) start: their process group killed
//! whole, how one that failed ended, and the stop request (Ctrl-C) that cuts them short.

use tokio::sync::watch;

/// SIGKILL the process group led by `pid`, if there is one.
pub fn kill_group(pid: Option<rustix::process::Pid>) {
    if let Some(pid) = pid {
        // Already gone is fine: the group is empty once every member exited.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// How a process that did not succeed ended, for a one-line error.
pub fn exit_reason(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("was killed ({status})"),
    }
}

/// Resolves when `stop` becomes true (never, if its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
