//! A plan's `replica` task: a replicated volume cut over to its peer. Both daemons are
//! driven through their control sockets, on this host or through `ssh HOST cutover volume
//! request` (one JSON request on stdin, the reply on stdout).
//!
//! A presync pass connects a disconnected link, reads the link's state from the source
//! (out of sync, lag, resync rate), times the control round trips and a hash of the
//! blocks the cutover will verify, and predicts the cutover: drain + verify + demote and
//! promote. A final pass (after the plan's `pre_final` hooks stopped the application and
//! detached it) drains the link, verifies, demotes the source and promotes the
//! destination. Until the promotion succeeds, the source stays (or becomes again) primary.
//!
//! Protocol C is not switched on for the drain: with the application stopped and the
//! export detached no write is waiting for an acknowledgement, and the drain waits for
//! what protocol C would wait for per write, every block durable on the peer (a block
//! leaves the out-of-sync count only when the peer says it is durable; the peer makes
//! applied writes durable at least twice a second).

use super::*;
use daemon::control::{Checksums, Piece, Reply, Request, VolumeStatus};
use daemon::roles::PeerStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How long the drain may take before the cutover gives up (the source stays primary).
const DRAIN_LIMIT: Duration = Duration::from_secs(600);
/// How long the link may stay down during the drain before the cutover gives up.
const LINK_GRACE: Duration = Duration::from_secs(10);
/// How long a presync pass watches a resync that is still running.
const PRESYNC_WATCH: Duration = Duration::from_secs(10);
/// The verify's rate is measured on at least this much (of the blocks to verify, or else
/// of the volume from its start).
const RATE_SAMPLE: u64 = 64 << 20;

/// One daemon's control socket, here or through ssh.
enum Ctl {
    Local(PathBuf),
    Ssh { argv: Vec<String>, what: String },
}

impl Ctl {
    /// The daemon of `config` (relative to the plan) on this host, or on `ssh_host`.
    fn of(
        t: &TaskSpec,
        base: &Path,
        config: Option<&str>,
        host: Option<&str>,
    ) -> Result<Ctl, String> {
        let Some(host) = host else {
            let socket = match config {
                Some(c) => {
                    let path = base.join(c);
                    daemon::Config::load(&path)
                        .map_err(|e| e.to_string())?
                        .control_socket()
                        .ok_or_else(|| {
                            format!(
                                "{}: set state_dir (the control socket lives there)",
                                path.display()
                            )
                        })?
                }
                None => daemon::config::default_state_dir()
                    .map(|d| d.join(daemon::config::CONTROL_SOCKET))
                    .ok_or(
                        "no state directory to find the daemon in (no HOME); set volume_config",
                    )?,
            };
            return Ok(Ctl::Local(socket));
        };
        let ssh = t.ssh_command.as_deref().unwrap_or("ssh");
        let mut argv = shlex::split(ssh)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("ssh_command {ssh:?} is not a command line"))?;
        let mut remote = vec![
            t.remote_cutover.clone().unwrap_or_else(|| "cutover".into()),
            "volume".into(),
            "request".into(),
        ];
        if let Some(c) = config {
            remote.extend(["--config".into(), c.to_string()]);
        }
        let line = shlex::try_join(remote.iter().map(String::as_str))
            .map_err(|e| format!("cannot quote the remote command: {e}"))?;
        argv.extend([host.to_string(), line]);
        Ok(Ctl::Ssh {
            argv,
            what: format!("ssh {host}"),
        })
    }

    /// One request; Err is the daemon's refusal or why it could not be asked (one line).
    fn call(&self, req: &Request) -> Result<Reply, String> {
        let reply = match self {
            Ctl::Local(socket) => daemon::control::call(socket, req).map_err(|e| e.to_string())?,
            Ctl::Ssh { argv, what } => {
                let mut c = std::process::Command::new(&argv[0]);
                c.args(&argv[1..])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let mut child = c.spawn().map_err(|e| format!("{what}: {}: {e}", argv[0]))?;
                let line = serde_json::to_string(req).map_err(|e| e.to_string())? + "\n";
                if let Some(mut stdin) = child.stdin.take() {
                    use std::io::Write;
                    let _ = stdin.write_all(line.as_bytes());
                }
                let out = child
                    .wait_with_output()
                    .map_err(|e| format!("{what}: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                match serde_json::from_str::<Reply>(text.trim()) {
                    Ok(r) => r,
                    Err(_) => {
                        let err = String::from_utf8_lossy(&out.stderr);
                        return Err(format!(
                            "{what}: {}",
                            err.lines()
                                .last()
                                .unwrap_or("no reply (is cutover installed there?)")
                        ));
                    }
                }
            }
        };
        if reply.ok {
            Ok(reply)
        } else {
            Err(reply.error.unwrap_or_else(|| "the daemon refused".into()))
        }
    }

    fn status(&self, name: &str) -> Result<VolumeStatus, String> {
        let r = self.call(&Request::Status {
            name: Some(name.into()),
        })?;
        r.volumes
            .and_then(|mut v| v.pop())
            .ok_or_else(|| "the daemon's status has no volume".into())
    }

    fn checksums(&self, req: Request) -> Result<Checksums, String> {
        self.call(&req)?.checksums.ok_or_else(|| {
            "the daemon's reply has no checksums; use the same cutover version on both".into()
        })
    }

    /// The hashes of exactly the pieces `ranges` (offset, length) of volume `name`.
    fn hashes_of(&self, name: &str, ranges: Vec<(u64, u64)>) -> Result<Checksums, String> {
        self.checksums(Request::Checksums {
            name: name.to_string(),
            dirty: false,
            from: 0,
            ranges,
        })
    }
}

/// The two daemons of a replica task and the names involved.
struct Pair {
    name: String,
    peer: String,
    src: Ctl,
    dst: Ctl,
    mode: ::plan::VerifyMode,
}

impl Pair {
    fn of(t: &TaskSpec, base: &Path, mode: ::plan::VerifyMode) -> Result<Pair, String> {
        let name = t
            .source
            .as_deref()
            .and_then(crate::volume_pass::name_of)
            .ok_or("source: expected volume:NAME")?
            .to_string();
        Ok(Pair {
            src: Ctl::of(t, base, t.volume_config.as_deref(), t.source_ssh.as_deref())
                .map_err(|e| format!("source daemon: {e}"))?,
            dst: Ctl::of(
                t,
                base,
                t.destination_config.as_deref(),
                t.destination_ssh.as_deref(),
            )
            .map_err(|e| format!("destination daemon: {e}"))?,
            peer: t.destination.clone(),
            name,
            mode,
        })
    }

    /// The source's volume and its link to the destination; the source must be primary.
    fn source(&self) -> Result<(VolumeStatus, PeerStatus), String> {
        let v = self
            .src
            .status(&self.name)
            .map_err(|e| format!("source: {e}"))?;
        if v.role != "primary" {
            return Err(format!(
                "source: volume {} is {} there, not primary (was the cutover done already?)",
                self.name, v.role
            ));
        }
        let p = v
            .peers
            .iter()
            .find(|p| p.name == self.peer)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = v.peers.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "destination: volume {} has no peer {:?} on the source (it has: {})",
                    self.name,
                    self.peer,
                    names.join(", ")
                )
            })?;
        Ok((v, p))
    }
}

fn in_step(p: &PeerStatus) -> bool {
    p.connection == "connected"
        && p.replication == "source"
        && p.peer_disk == "UpToDate"
        && p.eta_secs.is_none()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Time `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// A presync pass (blocking): see the module's documentation. `mark`: the first pass of
/// this presync marks the source, so the cutover's verify covers what is written from now.
fn presync(pair: &Pair, mark: bool, log: &TaskLog) -> Result<PassStats, String> {
    let mut t_mark = Duration::ZERO;
    if mark && pair.mode == ::plan::VerifyMode::Blocks {
        let (r, d) = timed(|| {
            pair.src.call(&Request::Mark {
                name: pair.name.clone(),
            })
        });
        r.map_err(|e| format!("source: mark: {e}"))?;
        t_mark = d;
        log.line(&format!(
            "marked volume {} on the source: the cutover verifies the blocks written from now on",
            pair.name
        ));
    }
    let (r, rtt_src) = timed(|| pair.source());
    let (_, mut peer) = r?;
    if peer.connection == "disconnected" {
        pair.src
            .call(&Request::Connect {
                name: pair.name.clone(),
                peer: Some(pair.peer.clone()),
                discard_my_data: false,
            })
            .map_err(|e| format!("source: connect: {e}"))?;
        log.line(&format!(
            "the link to {} was disconnected: connected it",
            pair.peer
        ));
    }
    let started = Instant::now();
    let v = loop {
        let (v, p) = pair.source()?;
        peer = p;
        if in_step(&peer) || started.elapsed() >= PRESYNC_WATCH {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let (r, rtt_dst) = timed(|| pair.dst.status(&pair.name));
    let d = r.map_err(|e| format!("destination: {e}"))?;
    if d.role == "primary" {
        return Err(format!(
            "destination: volume {} is primary there already",
            pair.name
        ));
    }
    let verify_rate = verify_rate(pair, &v)?;
    let (verify_bytes, verify_by) = to_verify(pair.mode, &v);
    let link = link_of(&peer);
    let m = ::plan::replica::ReplicaMeasure::predict(
        &link,
        verify_bytes,
        verify_by,
        verify_rate,
        ms(t_mark.max(rtt_src) + rtt_src + rtt_dst),
    );
    let resyncing = m.resyncing;
    log.line(&format!(
        "link to {}: {}, {}; {}",
        pair.peer,
        peer.connection,
        if resyncing {
            "not in step yet"
        } else {
            "in step"
        },
        m.explain()
    ));
    Ok(PassStats {
        bytes_changed: peer.out_of_sync_bytes + peer.lag_bytes,
        replica: Some(Box::new(m)),
        ..PassStats::default()
    })
}

/// The source's link to the destination, as a prediction needs it.
fn link_of(p: &PeerStatus) -> ::plan::replica::Link {
    ::plan::replica::Link {
        connection: p.connection.clone(),
        in_step: in_step(p),
        out_of_sync_bytes: p.out_of_sync_bytes,
        lag_bytes: p.lag_bytes,
        lag_ms: (p.lag_secs * 1000.0) as u64,
        resync_rate: p.resync_rate,
    }
}

/// The bytes the cutover's verify compares on each side if it started now (from the
/// source's status), and which ones, for people.
fn to_verify(mode: ::plan::VerifyMode, v: &VolumeStatus) -> (u64, &'static str) {
    match mode {
        ::plan::VerifyMode::Blocks => (v.dirty_bytes, "written since the presync mark"),
        ::plan::VerifyMode::Full => (v.size, "the whole volume"),
        _ => (0, "verify_mode = \"none\""),
    }
}

/// Bytes a verify compares a second, timed as the cutover's does it: the source hashes
/// pieces, then the destination the same ones (at most [`RATE_SAMPLE`] of them); the two
/// times a byte add up. Timed on the blocks to verify (their first window) when there are
/// at least [`RATE_SAMPLE`] of them, else on the volume's first [`RATE_SAMPLE`] (right
/// after the mark there is next to nothing to time, and the cutover verifies what the
/// application writes until it is stopped). 0 without a verify.
fn verify_rate(pair: &Pair, v: &VolumeStatus) -> Result<u64, String> {
    use ::plan::VerifyMode;
    let (src, took_src) = match pair.mode {
        VerifyMode::Blocks if v.dirty_bytes >= RATE_SAMPLE => timed(|| {
            pair.src.checksums(Request::Checksums {
                name: pair.name.clone(),
                dirty: true,
                from: 0,
                ranges: Vec::new(),
            })
        }),
        VerifyMode::Blocks | VerifyMode::Full => timed(|| {
            pair.src
                .hashes_of(&pair.name, pieces(0, v.size.min(RATE_SAMPLE)))
        }),
        _ => return Ok(0),
    };
    let src = src.map_err(|e| format!("source: checksums: {e}"))?;
    let src_bytes: u64 = src.pieces.iter().map(|p| p.length).sum();
    if src_bytes == 0 {
        return Ok(0);
    }
    // The destination hashes the first RATE_SAMPLE of them (a dirty window reaches 1 GiB).
    let (mut dst_ranges, mut dst_bytes) = (Vec::new(), 0);
    for p in &src.pieces {
        if dst_bytes >= RATE_SAMPLE {
            break;
        }
        dst_bytes += p.length;
        dst_ranges.push((p.offset, p.length));
    }
    let per_byte = |took: Duration, bytes: u64| took.as_secs_f64() / bytes as f64;
    let (dst, took_dst) = timed(|| pair.dst.hashes_of(&pair.name, dst_ranges));
    dst.map_err(|e| format!("destination: checksums: {e}"))?;
    let secs = per_byte(took_src, src_bytes) + per_byte(took_dst, dst_bytes);
    Ok((1.0 / secs.max(1e-12)) as u64)
}

/// `[offset, length]` pieces of at most `daemon::checksums::PIECE` covering `from..from+len`.
fn pieces(from: u64, len: u64) -> Vec<(u64, u64)> {
    let piece = daemon::checksums::PIECE;
    (0..len.div_ceil(piece))
        .map(|i| (from + i * piece, piece.min(len - i * piece)))
        .collect()
}

/// Wait until the link is drained: connected with the source sending, nothing out of sync
/// (every block durable on the peer), no lag, the peer up to date.
fn drain(pair: &Pair, cancel: &AtomicBool) -> Result<PeerStatus, String> {
    let started = Instant::now();
    let mut down_since: Option<Instant> = None;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err("interrupted during the drain".into());
        }
        let (_, p) = pair.source()?;
        if in_step(&p) && p.out_of_sync_bytes == 0 && p.lag_bytes == 0 {
            return Ok(p);
        }
        if p.connection != "connected" {
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= LINK_GRACE {
                return Err(format!(
                    "drain: the link to {} is {} ({}); {} out of sync",
                    pair.peer,
                    p.connection,
                    p.last_error.as_deref().unwrap_or("no error reported"),
                    human_bytes(p.out_of_sync_bytes)
                ));
            }
        } else {
            down_since = None;
        }
        if started.elapsed() >= DRAIN_LIMIT {
            return Err(format!(
                "drain: not done after {DRAIN_LIMIT:?}: {} out of sync, lag {}",
                human_bytes(p.out_of_sync_bytes),
                human_bytes(p.lag_bytes)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Compare the source's and the destination's hashes of the pieces the verify mode names
/// (window by window); Ok with the bytes compared, Err naming the pieces that differ.
fn verify(pair: &Pair, size: u64, cancel: &AtomicBool) -> Result<u64, String> {
    use ::plan::VerifyMode;
    let mut compared = 0u64;
    let mut differ: Vec<Piece> = Vec::new();
    let mut from = 0u64;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err("interrupted during the verify".into());
        }
        let (src, next) = match pair.mode {
            VerifyMode::Blocks => {
                let c = pair
                    .src
                    .checksums(Request::Checksums {
                        name: pair.name.clone(),
                        dirty: true,
                        from,
                        ranges: Vec::new(),
                    })
                    .map_err(|e| format!("verify: source: {e}"))?;
                (c.pieces, c.next)
            }
            VerifyMode::Full => {
                let window = (daemon::checksums::PIECE * daemon::checksums::MAX_PIECES as u64)
                    .min(size - from);
                let ranges = pieces(from, window);
                let c = pair
                    .src
                    .hashes_of(&pair.name, ranges)
                    .map_err(|e| format!("verify: source: {e}"))?;
                let next = (from + window < size).then_some(from + window);
                (c.pieces, next)
            }
            _ => return Ok(0),
        };
        if !src.is_empty() {
            let ranges = src.iter().map(|p| (p.offset, p.length)).collect();
            let dst = pair
                .dst
                .hashes_of(&pair.name, ranges)
                .map_err(|e| format!("verify: destination: {e}"))?;
            if dst.pieces.len() != src.len() {
                return Err("verify: the destination answered for other pieces; use the same cutover version on both".into());
            }
            for (a, b) in src.iter().zip(&dst.pieces) {
                compared += a.length;
                if a != b {
                    differ.push(a.clone());
                }
            }
        }
        match next {
            Some(n) if n > from => from = n,
            _ => break,
        }
    }
    if let Some(first) = differ.first() {
        let bytes: u64 = differ.iter().map(|p| p.length).sum();
        return Err(format!(
            "verify: {} piece(s), {}, differ between source and destination (first at byte {}, {} long); `cutover volume verify {} {}` on the source resends them",
            differ.len(),
            human_bytes(bytes),
            first.offset,
            human_bytes(first.length),
            pair.name,
            pair.peer
        ));
    }
    Ok(compared)
}

/// Promote the destination; while it still sees the old primary as primary (the links
/// restart after the demotion), try again for a few seconds.
fn promote_destination(pair: &Pair) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match pair.dst.call(&Request::Primary {
            name: pair.name.clone(),
            force: false,
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.contains("make it secondary first") && started.elapsed() < LINK_GRACE => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    }
}

/// The final pass (blocking): drain, verify, demote the source, promote the destination.
/// Until the promotion succeeded the source stays primary (a failed promotion promotes it
/// back). `cancel` stops it before the demotion, never between demotion and promotion.
fn cutover(pair: &Pair, cancel: &AtomicBool, log: &TaskLog) -> Result<PassStats, String> {
    let started = Instant::now();
    let (v, _) = pair.source()?;
    let d = pair
        .dst
        .status(&pair.name)
        .map_err(|e| format!("destination: {e}"))?;
    if d.role == "primary" {
        return Err(format!(
            "destination: volume {} is primary there already",
            pair.name
        ));
    }
    let p = drain(pair, cancel)?;
    let drained = started.elapsed();
    log.line(&format!(
        "drained in {}: nothing out of sync, no lag, {} up to date",
        human_duration(drained.as_secs_f64()),
        pair.peer
    ));
    let compared = verify(pair, v.size, cancel)?;
    let verified = started.elapsed() - drained;
    if pair.mode != ::plan::VerifyMode::None {
        log.line(&format!(
            "verify {}: {} compared, the same on both sides, in {}",
            pair.mode.as_str(),
            human_bytes(compared),
            human_duration(verified.as_secs_f64())
        ));
    }
    if cancel.load(Ordering::SeqCst) {
        return Err("interrupted before the demotion".into());
    }
    let switch = Instant::now();
    pair.src
        .call(&Request::Secondary {
            name: pair.name.clone(),
        })
        .map_err(|e| format!("demote: {e}"))?;
    if let Err(e) = promote_destination(pair) {
        let back = pair.src.call(&Request::Primary {
            name: pair.name.clone(),
            force: false,
        });
        return Err(match back {
            Ok(_) => format!("promote: {e}; the source was made primary again"),
            Err(b) => format!("promote: {e}; and the source could not be made primary again: {b}: run `cutover volume primary {}` there", pair.name),
        });
    }
    let switched = switch.elapsed();
    log.line(&format!(
        "{} is primary, the source secondary: drain {}, verify {}, demote + promote {}; {} from the start of the final pass",
        pair.peer,
        human_duration(drained.as_secs_f64()),
        human_duration(verified.as_secs_f64()),
        human_duration(switched.as_secs_f64()),
        human_duration(started.elapsed().as_secs_f64())
    ));
    Ok(PassStats {
        bytes_changed: p.out_of_sync_bytes + p.lag_bytes,
        replica: Some(Box::new(::plan::replica::ReplicaMeasure {
            drain_ms: Some(ms(drained)),
            drain_by: "measured at the cutover".into(),
            verify_bytes: compared,
            verify_ms: ms(verified),
            verify_rate: (compared as f64 / verified.as_secs_f64().max(1e-6)) as u64,
            fixed_ms: ms(switched),
            switch_ms: Some(ms(switched)),
            made: ::plan::replica::Made::Cutover,
            ..Default::default()
        })),
        ..PassStats::default()
    })
}

/// At a cutover's start ([`TaskRunner::refresh_replica`]): `kept` made again from one
/// status request to the source daemon, the link and the bytes to verify as they are now.
pub(super) fn refresh(
    t: TaskSpec,
    base_dir: PathBuf,
    mode: ::plan::VerifyMode,
    kept: ::plan::replica::ReplicaMeasure,
) -> BoxFuture<Result<Option<::plan::replica::ReplicaMeasure>, String>> {
    Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let pair = Pair::of(&t, &base_dir, mode)?;
            let (v, p) = pair.source()?;
            let (bytes, _) = to_verify(mode, &v);
            Ok(Some(kept.at_cutover_start(&link_of(&p), bytes)))
        })
        .await
        .map_err(|e| format!("internal error: {e}"))?
    })
}

/// Sets the flag when dropped: the pass was stopped (Ctrl-C), or ended.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One pass of a replica task, as [`TaskRunner::run_pass`] runs it. The blocking work runs
/// on its own thread; a stopped pass tells it so, and it stops before any demotion (once
/// demoted, it promotes one side or the other before it ends: the runtime waits for it).
pub(super) fn run_pass(
    t: TaskSpec,
    ctx: PassContext,
    mode: ::plan::VerifyMode,
    mark: bool,
) -> BoxFuture<Result<PassStats, String>> {
    Box::pin(async move {
        let pair = Pair::of(&t, &ctx.base_dir, mode)?;
        let cancel = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(cancel.clone());
        let log = ctx.log.clone();
        let r = tokio::task::spawn_blocking(move || match ctx.kind.as_str() {
            _ if ctx.dry_run => {
                let (_, p) = pair.source()?;
                log.line(&format!(
                    "would cut volume {} over to {} (link {}, {} out of sync, lag {})",
                    pair.name,
                    pair.peer,
                    p.connection,
                    human_bytes(p.out_of_sync_bytes),
                    human_bytes(p.lag_bytes)
                ));
                Ok(PassStats::default())
            }
            "final" => cutover(&pair, &cancel, &log).map_err(|e| {
                let kept = if e.starts_with("promote:") {
                    ""
                } else {
                    "; the source is still primary"
                };
                format!(
                    "cutover of volume {} to {} stopped before the promotion: {e}{kept}",
                    pair.name, pair.peer
                )
            }),
            _ => presync(&pair, mark, &log),
        })
        .await
        .map_err(|e| format!("internal error: {e}"))?;
        drop(guard);
        r
    })
}
