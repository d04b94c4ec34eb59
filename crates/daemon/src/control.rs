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
//! A changed-block pass (`cutover sync volume:NAME`, see `passes.rs`) keeps its connection
//! for the length of the pass:
//!
//! ```text
//! → {"cmd":"pass","name":"db","destination":"…"}
//! ← {"ok":true,"pass":{"mode":"changed","bitmap_bytes":N,…}}, then N bytes of bitmap
//! … the client syncs …
//! → {"cmd":"pass-done","ok":true}   ← {"ok":true}
//! ```
//!
//! A connection that closes before `pass-done` is a failed pass: its blocks are owed again.
//!
//! ```text
//! → {"cmd":"checksums","name":"db","dirty":true}            (the pieces written since the mark)
//! → {"cmd":"checksums","name":"db","ranges":[[0,1048576]]}  (these pieces)
//! ← {"ok":true,"checksums":{"pieces":[{"offset":0,"length":1048576,"hash":"…"}],"next":N}}
//! ```
//!
//! Access: the socket has mode 0600 (root bypasses that, the daemon's user owns it), and the
//! daemon also checks the peer's uid (`SO_PEERCRED`): only root and the daemon's own user
//! are answered, so a socket whose mode was loosened still serves nobody else.

use crate::passes::{self, DestinationStatus, PassMode};
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
    /// Start a changed-block pass of a volume to `destination` (`full`: compare the whole
    /// device whatever the record says). The connection stays open until `pass-done`.
    Pass {
        name: String,
        destination: String,
        #[serde(default)]
        full: bool,
    },
    /// The end of the pass this connection started, and whether it succeeded.
    PassDone { ok: bool },
    /// Make this node the volume's primary (`force`: even with inconsistent data).
    Primary {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Make this node a secondary.
    Secondary { name: String },
    /// (Re)enable the link to one peer, or all; `discard_my_data`: settle a split brain
    /// by taking the peer's data.
    Connect {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        discard_my_data: bool,
    },
    /// Stream state changes as JSON lines (`events.rs`) until the client goes away.
    Events {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Online verify against one peer, or all (this node must be their source).
    Verify {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// Stop the link to one peer, or all, until `connect`.
    Disconnect {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// BLAKE3 hashes of pieces of the volume's backing (`checksums.rs`): the pieces
    /// `ranges` names (`[offset, length]`), or with `dirty` those written since the last
    /// mark, from byte `from` on.
    Checksums {
        name: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dirty: bool,
        #[serde(default, skip_serializing_if = "is_zero")]
        from: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ranges: Vec<(u64, u64)>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<PassStart>,
    /// What a role or link change did (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<Checksums>,
}

/// The hashes a `checksums` request asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checksums {
    pub pieces: Vec<Piece>,
    /// With `dirty`: where the next request starts (None: nothing more is dirty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// One piece of a volume and the BLAKE3 hash (hex) of its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub length: u64,
    pub hash: String,
}

impl Reply {
    pub(crate) fn error(why: impl Into<String>) -> Reply {
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
    /// "primary", or "secondary" (a volume with peers whose primary is another node).
    pub role: String,
    /// This node's data: "UpToDate", or "Inconsistent" (never synced, or a resync into it
    /// has not finished).
    pub disk: String,
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
    /// Destinations of changed-block passes (kept across restarts, see `passes.rs`).
    #[serde(default)]
    pub destinations: Vec<DestinationStatus>,
    /// Replication peers.
    #[serde(default)]
    pub peers: Vec<crate::roles::PeerStatus>,
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

/// What a pass sends, as the daemon starts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassStart {
    pub name: String,
    /// "changed": only the blocks in the bitmap that follows; "full": compare everything.
    pub mode: String,
    /// Why a full pass (the first to this destination, or asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_full: Option<String>,
    pub backing: PathBuf,
    pub size: u64,
    pub block_size: u32,
    /// The generation the pass's mark began: writes from now on are in the next pass.
    pub generation: String,
    pub changed_bytes: u64,
    /// Bytes of bitmap after the reply line (block `b` is bit `b % 8` of byte `b / 8`).
    pub bitmap_bytes: u64,
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

pub(crate) fn status_of(h: &Hosted) -> Result<VolumeStatus, String> {
    let s = h.with_meta(|m| m.status())?;
    Ok(VolumeStatus {
        name: h.name.clone(),
        role: if s.primary || h.peer_slots.is_empty() {
            "primary"
        } else {
            "secondary"
        }
        .into(),
        disk: if h.peer_slots.is_empty() {
            "UpToDate"
        } else if s.inconsistent {
            "Inconsistent"
        } else if s.outdated {
            "Outdated"
        } else {
            "UpToDate"
        }
        .into(),
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
        destinations: h.passes.status(),
        peers: crate::roles::peers_of(h),
    })
}

pub(crate) fn find<'h>(hosted: &'h [Arc<Hosted>], name: &str) -> Result<&'h Arc<Hosted>, String> {
    hosted.iter().find(|h| h.name == name).ok_or_else(|| {
        let names: Vec<&str> = hosted.iter().map(|h| h.name.as_str()).collect();
        format!(
            "no volume {name:?} on this daemon (it hosts: {})",
            names.join(", ")
        )
    })
}

/// A reply that says what was done.
fn said(message: String) -> Reply {
    Reply {
        ok: true,
        message: Some(message),
        ..Reply::default()
    }
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
        Request::Pass { .. } | Request::PassDone { .. } | Request::Events { .. } => {
            Err("`pass`, `pass-done` and `events` keep their own connection".to_string())
        }
        Request::Primary { name, force } => {
            find(hosted, &name).and_then(|h| crate::roles::promote(h, force).map(said))
        }
        Request::Secondary { name } => {
            find(hosted, &name).and_then(|h| crate::roles::demote(h).map(said))
        }
        Request::Connect {
            name,
            peer,
            discard_my_data,
        } => find(hosted, &name)
            .and_then(|h| crate::roles::connect(h, peer.as_deref(), discard_my_data).map(said)),
        Request::Disconnect { name, peer } => find(hosted, &name)
            .and_then(|h| crate::roles::set_connected(h, peer.as_deref(), false).map(said)),
        Request::Verify { name, peer } => {
            find(hosted, &name).and_then(|h| crate::roles::verify(h, peer.as_deref()).map(said))
        }
        Request::Checksums {
            name,
            dirty,
            from,
            ranges,
        } => find(hosted, &name)
            .and_then(|h| crate::checksums::checksums(h, dirty, from, &ranges))
            .map(|c| Reply {
                ok: true,
                checksums: Some(c),
                ..Reply::default()
            }),
        Request::Mark { name } => find(hosted, &name).and_then(|h| {
            let snap = passes::mark(h)?;
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
            Ok(Ok(Request::Pass {
                name,
                destination,
                full,
            })) => return pass(stream, hosted, name, destination, full).await,
            Ok(Ok(Request::Events { name })) => {
                return crate::events::stream(stream, hosted, name).await
            }
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
    let _ = send_reply(&mut stream, &reply).await;
    let _ = stream.shutdown().await;
}

pub(crate) async fn send_reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    stream.write_all(&line).await
}

/// Serve one changed-block pass: mark and answer with what to send, then wait (as long as
/// the pass takes) for its outcome. A connection that ends without `pass-done` is a
/// failed pass.
async fn pass(
    mut stream: UnixStream,
    hosted: Arc<[Arc<Hosted>]>,
    name: String,
    destination: String,
    full: bool,
) {
    let h = match find(&hosted, &name) {
        Ok(h) => h.clone(),
        Err(why) => {
            let _ = send_reply(&mut stream, &Reply::error(why)).await;
            return;
        }
    };
    let started = {
        let (h, destination) = (h.clone(), destination.clone());
        tokio::task::spawn_blocking(move || {
            let geo = h.with_meta(|m| m.geometry())?;
            let mode = passes::begin(&h, &destination, full)?;
            let gen_now = h.with_meta(|m| m.status().bitmap_gen);
            Ok((mode, geo, gen_now))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the pass failed to start: {e}")))
    };
    let (mode, geo, gen_now) = match started {
        Ok(s) => s,
        Err(why) => {
            let _ = send_reply(&mut stream, &Reply::error(why)).await;
            return;
        }
    };
    let (changed_bytes, bits, why_full) = match mode {
        PassMode::Changed { bits, bytes } => (Some(bytes), bits, None),
        PassMode::Full => {
            let why = if full {
                "asked for"
            } else {
                "no confirmed earlier pass to this destination on record"
            };
            (None, Vec::new(), Some(why.to_string()))
        }
    };
    let start = PassStart {
        name: name.clone(),
        mode: if changed_bytes.is_some() {
            "changed"
        } else {
            "full"
        }
        .into(),
        why_full,
        backing: h.backing.clone(),
        size: geo.size,
        block_size: geo.block_size,
        generation: gen(gen_now.unwrap_or(0)),
        changed_bytes: changed_bytes.unwrap_or(0),
        bitmap_bytes: bits.len() as u64,
    };
    tracing::info!(
        "volume {name}: {} pass to {destination} ({} byte(s) to send)",
        start.mode,
        start.changed_bytes
    );
    let reply = Reply {
        ok: true,
        pass: Some(start),
        ..Reply::default()
    };
    let mut ok = false;
    if send_reply(&mut stream, &reply).await.is_ok() && stream.write_all(&bits).await.is_ok() {
        drop(bits);
        let mut line = String::new();
        let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST));
        if reader.read_line(&mut line).await.is_ok() {
            ok = matches!(
                serde_json::from_str(line.trim()),
                Ok(Request::PassDone { ok: true })
            );
        }
    }
    let (h2, d2) = (h.clone(), destination.clone());
    let _ = tokio::task::spawn_blocking(move || passes::end(&h2, &d2, ok)).await;
    tracing::info!(
        "volume {name}: pass to {destination} {}",
        if ok {
            "done"
        } else {
            "failed: its blocks are owed again"
        }
    );
    let _ = send_reply(
        &mut stream,
        &Reply {
            ok: true,
            ..Reply::default()
        },
    )
    .await;
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
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// Send one request to the control socket at `socket` and return the daemon's reply (its
/// `ok` may be false: the caller shows `error`). Blocking.
pub fn call(socket: &Path, req: &Request) -> Result<Reply, ControlError> {
    let (stream, sent) = send_request(socket, req)?;
    read_reply(&mut io::BufReader::new(stream), socket, sent)
}

/// Connect to the control socket and write one request line; how the write went is for
/// [`read_reply`] (a daemon that refuses the peer answers without reading).
pub(crate) fn send_request(
    socket: &Path,
    req: &Request,
) -> Result<(std::os::unix::net::UnixStream, io::Result<()>), ControlError> {
    let mut stream = connect(socket)?;
    let io_err = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    let sent = stream.write_all(&line);
    Ok((stream, sent))
}

/// A changed-block pass the daemon started (`Request::Pass`): what to send, and the open
/// connection that reports how the pass went. Dropping it without [`PassClient::finish`]
/// tells the daemon the pass failed.
pub struct PassClient {
    stream: std::os::unix::net::UnixStream,
    path: PathBuf,
    pub start: PassStart,
    /// The bitmap of a "changed" pass.
    pub bits: Option<Vec<u8>>,
}

impl PassClient {
    /// Ask the daemon at `socket` to start a pass of volume `name` to `destination`.
    /// `Ok(Err(why))`: the daemon refused (the reason is one line). Blocking.
    pub fn begin(
        socket: &Path,
        name: &str,
        destination: &str,
        full: bool,
    ) -> Result<Result<PassClient, String>, ControlError> {
        let path = socket.to_path_buf();
        let io_err = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let req = Request::Pass {
            name: name.into(),
            destination: destination.into(),
            full,
        };
        let (stream, sent) = send_request(socket, &req)?;
        let mut reader = io::BufReader::new(stream);
        let reply = read_reply(&mut reader, &path, sent)?;
        let start = match (reply.ok, reply.pass) {
            (true, Some(p)) => p,
            (false, _) => return Ok(Err(reply.error.unwrap_or_else(|| "refused".into()))),
            (true, None) => {
                return Err(ControlError::BadReply {
                    path,
                    why: "no pass in the reply".into(),
                })
            }
        };
        // The bitmap: one bit per block, so bounded by the volume's size the daemon gave.
        let blocks = start.size.div_ceil(u64::from(start.block_size.max(1)));
        if start.bitmap_bytes > 0 && start.bitmap_bytes != blocks.div_ceil(8) {
            return Err(ControlError::BadReply {
                path,
                why: format!("{} bytes of bitmap for {blocks} blocks", start.bitmap_bytes),
            });
        }
        let bits = if start.mode == "changed" {
            let mut bits = vec![0u8; start.bitmap_bytes as usize];
            io::Read::read_exact(&mut reader, &mut bits).map_err(io_err)?;
            Some(bits)
        } else {
            None
        };
        Ok(Ok(PassClient {
            stream: reader.into_inner(),
            path,
            start,
            bits,
        }))
    }

    /// Tell the daemon how the pass went and wait for it to take note.
    pub fn finish(mut self, ok: bool) -> Result<(), ControlError> {
        let path = self.path.clone();
        let io_err = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&Request::PassDone { ok })
            .map_err(|e| io_err(io::Error::other(e)))?;
        line.push(b'\n');
        let sent = self.stream.write_all(&line);
        let mut reader = io::BufReader::new(self.stream);
        read_reply(&mut reader, &path, sent).map(|_| ())
    }
}

fn connect(socket: &Path) -> Result<std::os::unix::net::UnixStream, ControlError> {
    let path = socket.to_path_buf();
    std::os::unix::net::UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(path)
        }
        io::ErrorKind::PermissionDenied => ControlError::Denied(path),
        _ => ControlError::Io { path, source: e },
    })
}

/// Read one reply line. `sent`: how writing the request went (a daemon that refuses the
/// peer answers without reading it, so its reply is read even when the write failed).
fn read_reply(
    reader: &mut impl BufRead,
    path: &Path,
    sent: io::Result<()>,
) -> Result<Reply, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reply = String::new();
    // Bounded: a status of many volumes is a few KiB each.
    let read = io::Read::take(reader, 16 << 20).read_line(&mut reply);
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
        path: path.to_path_buf(),
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
