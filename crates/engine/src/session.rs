//! A session as the engine sees it: one control connection (ordered: file list, needs,
//! signatures, completions) and a stream of data connections that may grow while it runs.

use net::{Conn, ConnError, MsgReader, MsgWriter, RateLimiter};
use proto::{FileResult, Msg};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A quiet control connection carries a `KeepAlive` this often, so any idle timeout of a
/// few seconds or more tells a slow peer (hashing a large basis, scanning a huge tree) from a
/// dead one. It costs a few bytes a second.
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// The shortest idle timeout that keepalives make safe.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Session {
    pub control: Conn,
    /// Data connections: those opened at the start and any that join later.
    pub data: mpsc::Receiver<Conn>,
    /// Shared by every data connection (`--bwlimit`).
    pub limiter: Option<Arc<RateLimiter>>,
    /// End the session when the control connection brings nothing, not even a keepalive, for
    /// this long.
    pub idle_timeout: Option<Duration>,
    /// How the peer names this side's root, when its real path is not the peer's business
    /// (a daemon's module directory): every message to the peer says `shown` instead.
    pub public_name: Option<PublicName>,
}

/// A directory's real path and the name the peer knows it by.
#[derive(Debug, Clone)]
pub struct PublicName {
    pub real: PathBuf,
    pub shown: String,
}

impl PublicName {
    /// `text` with every mention of the real path said as the public name.
    pub fn scrub(&self, text: &str) -> String {
        let real = self.real.to_string_lossy();
        let real = real.trim_end_matches('/');
        if real.is_empty() {
            return text.to_string();
        }
        text.replace(&format!("{real}/"), &format!("{}/", self.shown))
            .replace(real, &self.shown)
    }

    /// A message to the peer, with every reason and error said in public names.
    fn scrub_msg(&self, msg: Msg) -> Msg {
        match msg {
            Msg::Fatal { message } => Msg::Fatal {
                message: self.scrub(&message),
            },
            Msg::FileDone {
                id,
                result: FileResult::Failed { reason, retry },
            } => Msg::FileDone {
                id,
                result: FileResult::Failed {
                    reason: self.scrub(&reason),
                    retry,
                },
            },
            Msg::FileAbort { id, reason } => Msg::FileAbort {
                id,
                reason: self.scrub(&reason),
            },
            Msg::ListedProblem {
                path,
                missing,
                reason,
            } => Msg::ListedProblem {
                path,
                missing,
                reason: self.scrub(&reason),
            },
            Msg::Report(mut report) => {
                for e in &mut report.errors {
                    *e = self.scrub(e);
                }
                Msg::Report(report)
            }
            other => other,
        }
    }
}

/// The control connection, driven by two tasks so that any task may send on it.
/// Keepalives are sent and swallowed here; the engine never sees them.
pub(crate) struct Control {
    pub tx: mpsc::Sender<Msg>,
    pub rx: mpsc::Receiver<Result<Msg, ConnError>>,
    pub writer: tokio::task::JoinHandle<MsgWriter>,
}

/// After an error, how long the control writer gets to deliver the `Fatal` and close.
pub(crate) const CLOSE_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Let the control writer finish (every sender must be gone), but give up after `limit`: a
/// stalled peer may never take the last bytes.
pub(crate) async fn close_within(mut writer: tokio::task::JoinHandle<MsgWriter>, limit: Duration) {
    if tokio::time::timeout(limit, &mut writer).await.is_err() {
        writer.abort();
    }
}

pub(crate) fn spawn_control(
    conn: Conn,
    idle_timeout: Option<Duration>,
    public_name: Option<PublicName>,
) -> Control {
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(256);
    // Few inbound messages wait: each may be a frame of up to 16 MiB from a peer that is not
    // to be trusted with our memory, and a handful keep the pipeline full.
    let (in_tx, in_rx) = mpsc::channel(8);
    let Conn { reader, mut writer } = conn;
    let writer_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether anything but a keepalive went out since the last tick.
        let mut sent = false;
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m {
                    Some(m) => {
                        sent = true;
                        m
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if std::mem::take(&mut sent) {
                        continue;
                    }
                    Msg::KeepAlive
                }
            };
            let msg = match &public_name {
                Some(p) => p.scrub_msg(msg),
                None => msg,
            };
            // Control traffic is metadata (lists, hashes): it always compresses well.
            if writer.send(msg, true).await.is_err() {
                break;
            }
        }
        writer.close().await;
        writer
    });
    tokio::spawn(forward(reader, in_tx, idle_timeout));
    Control {
        tx: out_tx,
        rx: in_rx,
        writer: writer_task,
    }
}

/// After this side's session failed on its own connection (a send refused, the control
/// connection gone), the peer may have said why just before: a `Fatal` already received is
/// the real reason ("the destination's file system is full", not "connection closed").
pub(crate) async fn peer_reason(
    rx: &mut mpsc::Receiver<Result<Msg, ConnError>>,
    error: crate::EngineError,
) -> crate::EngineError {
    use crate::EngineError;
    let closed = match &error {
        EngineError::Peer(m) | EngineError::Local(m) => m.contains(CONTROL_CLOSED),
        e => e.is_transport(),
    };
    if !closed {
        return error;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(Msg::Fatal { message }))) => return EngineError::Peer(message),
            Ok(Some(Ok(_))) => continue,
            _ => return error,
        }
    }
}

/// What a side says when its control connection closed under it.
pub(crate) const CONTROL_CLOSED: &str = "control connection closed";

/// Pass every message of `reader` to `to` (keepalives excepted); an error, or nothing at all
/// for `idle_timeout`, ends the stream with that error.
pub(crate) async fn forward(
    mut reader: MsgReader,
    to: mpsc::Sender<Result<Msg, ConnError>>,
    idle_timeout: Option<Duration>,
) {
    loop {
        let idle = || ConnError::Idle {
            secs: idle_timeout.map_or(0, |t| t.as_secs()),
        };
        let next = net::conn::within(idle_timeout, reader.recv(), idle).await;
        match next {
            Ok(Some(Msg::KeepAlive)) => {}
            Ok(Some(m)) => {
                if to.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = to.send(Err(e)).await;
                return;
            }
        }
    }
}
