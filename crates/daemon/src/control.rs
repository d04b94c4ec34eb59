//! The control socket `cutover volume …` talks to (`state_dir/control.sock`), as `drbdadm`
//! talks to DRBD: one JSON request on one line, one JSON reply on one line, then the
//! connection closes.
//!
//! ```text
//! → {"cmd":"status"}                 ← {"ok":true,"volumes":[{…}]}
//! → {"cmd":"status","name":"db"}     ← {"ok":true,"volumes":[{…}]}
//! → {"cmd":"mark","name":"db"}       ← {"ok":true,"mark":{…}}
//!                                    ← {"ok":false,"error":"…"}
//! ```
//!
//! Access: the socket has mode 0600 (root bypasses that, the daemon's user owns it), and the
//! daemon also checks the peer's uid (`SO_PEERCRED`): only root and the daemon's own user
//! are answered, so a socket whose mode was loosened still serves nobody else.

use crate::volumes::Hosted;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line read: requests are a few dozen bytes.
const MAX_REQUEST: u64 = 64 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the client waits for a reply: a mark writes the superblock (one sync), a status
/// takes a lock, so this is generous.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every volume's status, or one's.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Start a new generation of a volume: its dirty bitmap starts empty.
    Mark { name: String },
}

/// The daemon's answer: `ok` with the result, or an `error` (one line).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<MarkResult>,
}

impl Reply {
    fn error(why: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(why.into()),
            ..Reply::default()
        }
    }
}

/// One volume as `cutover volume status` shows it. Generation ids are 16 hex digits
/// (JSON numbers lose precision above 2^53 in many readers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// "primary" for now: replication ("Volumes 2/3") brings "secondary".
    pub role: String,
    pub backing: PathBuf,
    pub meta: PathBuf,
    pub export: String,
    pub volume_id: String,
    pub size: u64,
    pub block_size: u32,
    /// Bytes written since the last mark (whole blocks).
    pub dirty_bytes: u64,
    pub dirty_blocks: u64,
    /// Writes (WRITE, WRITE_ZEROES, TRIM) since the daemon opened the volume.
    pub writes: u64,
    pub bytes_written: u64,
    /// NBD flushes since open.
    pub flushes: u64,
    pub current_gen: String,
    pub bitmap_gen: String,
    pub marks: u64,
    pub activity_log: ActivityLog,
    /// Bitmap pages changed in memory and not yet written (the periodic flush writes them).
    pub unpersisted_pages: u64,
    /// The on-disk clean flag: false while the daemon has the volume open.
    pub clean_flag: bool,
    /// Whether the daemon found a clean shutdown when it opened the volume.
    pub last_shutdown_clean: bool,
    /// Why tracking stopped after a failed metadata write (writes are then refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The activity log's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivityLog {
    pub hot_extents: usize,
    pub capacity: u32,
    /// Hot extents with writes in flight.
    pub pinned: usize,
    /// Transactions written since open.
    pub transactions: u64,
    pub evictions: u64,
}

/// What a mark did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkResult {
    pub name: String,
    /// The generation that ended (the bitmap's id before the mark).
    pub from_gen: String,
    /// The generation that began.
    pub to_gen: String,
    /// What was dirty in the generation that ended.
    pub dirty_bytes: u64,
    pub dirty_blocks: u64,
}

fn gen(id: u64) -> String {
    format!("{id:016x}")
}

fn status_of(h: &Hosted) -> Result<VolumeStatus, String> {
    let s = h.with_meta(|m| m.status())?;
    Ok(VolumeStatus {
        name: h.name.clone(),
        role: "primary".into(),
        backing: h.backing.clone(),
        meta: s.path,
        export: h.export.to_string(),
        volume_id: s.volume_id,
        size: s.size,
        block_size: s.block_size,
        dirty_bytes: s.dirty_bytes,
        dirty_blocks: s.dirty_blocks,
        writes: s.counters.writes,
        bytes_written: s.counters.bytes_written,
        flushes: s.counters.flushes,
        current_gen: gen(s.current_gen),
        bitmap_gen: gen(s.bitmap_gen),
        marks: s.marks,
        activity_log: ActivityLog {
            hot_extents: s.al.hot_extents,
            capacity: s.al.capacity,
            pinned: s.al.pinned,
            transactions: s.al.transactions,
            evictions: s.al.evictions,
        },
        unpersisted_pages: s.unpersisted_pages,
        clean_flag: s.clean_flag,
        last_shutdown_clean: s.last_shutdown_clean,
        failed: s.failed,
    })
}

fn find<'h>(hosted: &'h [Arc<Hosted>], name: &str) -> Result<&'h Arc<Hosted>, String> {
    hosted.iter().find(|h| h.name == name).ok_or_else(|| {
        let names: Vec<&str> = hosted.iter().map(|h| h.name.as_str()).collect();
        format!(
            "no volume {name:?} on this daemon (it hosts: {})",
            names.join(", ")
        )
    })
}

/// Answer one request (blocking: status takes locks, mark writes the superblock).
fn answer(hosted: &[Arc<Hosted>], req: Request) -> Reply {
    let result = match req {
        Request::Status { name } => {
            let chosen: Result<Vec<&Arc<Hosted>>, String> = match &name {
                Some(n) => find(hosted, n).map(|h| vec![h]),
                None => Ok(hosted.iter().collect()),
            };
            chosen
                .and_then(|hs| hs.into_iter().map(|h| status_of(h)).collect())
                .map(|v| Reply {
                    ok: true,
                    volumes: Some(v),
                    ..Reply::default()
                })
        }
        Request::Mark { name } => find(hosted, &name).and_then(|h| {
            let snap = h
                .with_meta(|m| m.mark())?
                .map_err(|e| format!("volume {name:?}: mark failed: {e}"))?;
            tracing::info!(
                "volume {name}: marked: generation {} → {}, {} byte(s) were dirty",
                gen(snap.from_gen),
                gen(snap.to_gen),
                snap.bytes()
            );
            Ok(Reply {
                ok: true,
                mark: Some(MarkResult {
                    name: name.clone(),
                    from_gen: gen(snap.from_gen),
                    to_gen: gen(snap.to_gen),
                    dirty_bytes: snap.bytes(),
                    dirty_blocks: snap.blocks(),
                }),
                ..Reply::default()
            })
        }),
    };
    result.unwrap_or_else(Reply::error)
}

/// Serve the control socket until aborted.
pub(crate) async fn serve(listener: UnixListener, hosted: Arc<[Arc<Hosted>]>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, hosted.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, hosted: Arc<[Arc<Hosted>]>) {
    let me = rustix::process::geteuid().as_raw();
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
    let reply = if uid != 0 && uid != me {
        tracing::warn!(
            uid,
            "control socket: refused a client that is neither root nor the daemon's user"
        );
        Reply::error(format!(
            "permission denied: the control socket answers root and uid {me} only, not uid {uid}"
        ))
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
            Ok(Ok(req)) => {
                let hosted = hosted.clone();
                tokio::task::spawn_blocking(move || answer(&hosted, req))
                    .await
                    .unwrap_or_else(|e| Reply::error(format!("the request failed: {e}")))
            }
            Ok(Err(why)) => Reply::error(why),
            Err(_) => Reply::error(format!("no request within {REQUEST_TIMEOUT:?}")),
        }
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut line)
        .await
        .map_err(|e| format!("bad request: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no `cutover serve` is running with control socket {} (start the daemon with `cutover serve --config FILE`)", .0.display())]
    NotRunning(PathBuf),
    #[error("{}: permission denied; run `cutover volume` as root (or as the daemon's user)", .0.display())]
    Denied(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: the daemon's reply is not understood ({why}); use the same cutover version for both", path.display())]
    BadReply { path: PathBuf, why: String },
}

/// Send one request to the control socket at `socket` and return the daemon's reply (its
/// `ok` may be false: the caller shows `error`). Blocking.
pub fn call(socket: &Path, req: &Request) -> Result<Reply, ControlError> {
    let path = socket.to_path_buf();
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning(path.clone())
            }
            io::ErrorKind::PermissionDenied => ControlError::Denied(path.clone()),
            _ => ControlError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    // A daemon that refuses the peer answers without reading the request, and may have
    // closed before it is written: the reply is still there to read, and says why.
    let sent = stream.write_all(&line);
    let mut reply = String::new();
    // Bounded: a status of many volumes is a few KiB each.
    let read = io::BufReader::new(io::Read::take(stream, 16 << 20)).read_line(&mut reply);
    match (read, sent) {
        (Ok(n), _) if n > 0 => {}
        (_, Err(e)) | (Err(e), Ok(())) => return Err(io_err(e)),
        (Ok(_), Ok(())) => {
            return Err(io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without a reply",
            )))
        }
    }
    serde_json::from_str(reply.trim()).map_err(|e| ControlError::BadReply {
        path: path.clone(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_refused() {
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { name: None });
        let r: Request = serde_json::from_str(r#"{"cmd":"mark","name":"db"}"#).unwrap();
        assert_eq!(r, Request::Mark { name: "db".into() });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"mark"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Status { name: None }).unwrap(),
            r#"{"cmd":"status"}"#
        );
    }
}
