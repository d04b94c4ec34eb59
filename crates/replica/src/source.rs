//! The primary's end of a link: take in the target's bitmap, start the volume's stream for
//! the peer, and send it over every data connection (queued operations first, then resync
//! runs read from the backing, then an online verify's ranges), while the control
//! connection brings acknowledgements and checksum mismatches back and, once every
//! out-of-sync block is durable on the target, says it is in step. With checksums, a
//! resync run goes as one BLAKE3 hash per block; the blocks the target finds different
//! are queued again as data.

use crate::link::{heard_now, recv_within, Beat, LinkError, LinkSettings, LinkView};
use crate::wire::PeerMsg;
use net::{Conn, MsgWriter, RateLimiter};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use volume::{Op, OpKind, Replication};

/// Bytes of queued writes one send takes, and the longest resync run: big enough to keep
/// a connection's window full, small enough that N connections share the work.
const CHUNK: u64 = 1 << 20;
/// One send in this many takes a resync run before queued writes (a floor of about a
/// quarter of the link for resync while both wait).
const RESYNC_FIRST_EVERY: u64 = 4;
/// How long a link whose data connection broke waits for the target's last ack.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(1);
/// A connection loaded more than the least loaded one by this leaves the work to it.
const BALANCE_SLACK: u64 = 256 << 10;
/// How often a sender with nothing to do looks again (acks free lag room for resync).
const POLL: Duration = Duration::from_millis(50);
/// Peer acknowledgements that did not change are said again this often.
const PEER_HOLDS_AGAIN: Duration = Duration::from_secs(1);
/// The resync rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// Ends the stream when the link ends, however it ends.
struct StreamGuard {
    repl: Replication,
    slot: u32,
    epoch: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.repl.stop_stream(self.slot, self.epoch);
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    ctl: Conn,
    data: Vec<Conn>,
    mut more: mpsc::Receiver<Conn>,
    repl: Replication,
    backend: Arc<dyn nbd::Backend>,
    s: &LinkSettings,
    full: bool,
    view: &LinkView,
) -> Result<(), LinkError> {
    let Conn {
        reader: mut ctl_r,
        writer: mut ctl_w,
    } = ctl;
    let blocks = repl.geometry().blocks;
    loop {
        match recv_within(&mut ctl_r, s.idle).await? {
            PeerMsg::Runs(runs) => {
                for (first, count) in runs {
                    let end = first
                        .checked_add(count)
                        .filter(|&e| e <= blocks && count > 0);
                    let Some(end) = end else {
                        return Err(LinkError::Protocol(format!(
                            "a bitmap run of {count} blocks at {first} is outside the volume's {blocks}"
                        )));
                    };
                    repl.mark(s.slot, first, end - 1)?;
                }
            }
            PeerMsg::RunsEnd => break,
            PeerMsg::Keepalive => {}
            other => {
                return Err(LinkError::Protocol(format!(
                    "{other:?} before the end of the bitmap"
                )))
            }
        }
    }
    if full {
        repl.mark_all(s.slot)?;
    }
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    // Every waiting sender looks (the least loaded takes it), and one that is not waiting
    // yet finds a permit.
    let epoch = repl.start_stream(
        s.slot,
        s.stream,
        Arc::new(move || {
            wake.notify_waiters();
            wake.notify_one();
        }),
    )?;
    let _guard = StreamGuard {
        repl: repl.clone(),
        slot: s.slot,
        epoch,
    };
    let resync_blocks = repl.status(s.slot).map_or(0, |st| st.resync_blocks);
    ctl_w
        .send_any(&PeerMsg::Start { resync_blocks }, false)
        .await?;
    tracing::info!(
        peer = %s.peer,
        "replicating as source: {resync_blocks} block(s) to resync{}",
        if full { " (full)" } else { "" }
    );

    let shared = Arc::new(Senders {
        repl: repl.clone(),
        slot: s.slot,
        epoch,
        backend: backend.clone(),
        notify: notify.clone(),
        limiter: s.max_rate.and_then(RateLimiter::new),
        applied: AtomicU64::new(0),
        loads: Mutex::new(Vec::new()),
        max_lag: s.stream.max_lag,
    });
    let mut senders = tokio::task::JoinSet::new();
    let mut readers = Vec::new();
    let spawn_sender = |senders: &mut tokio::task::JoinSet<_>, w| {
        let load = Arc::new(AtomicU64::new(0));
        shared
            .loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(load.clone());
        senders.spawn(sender(w, shared.clone(), load));
    };
    for conn in data {
        readers.push(conn.reader);
        spawn_sender(&mut senders, conn.writer);
    }

    let mut beat = Beat::new(s.idle);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut step_at: Option<u64> = None;
    let mut in_step = false;
    let mut pulled_ahead = repl.status(s.slot).map_or(0, |st| st.pulled_ahead);
    let mut rate = RateMeter::new();
    let mut heard = Instant::now();
    // Peer acknowledgements: which of this node's other peers hold which writes, as last
    // told to this one.
    let target_node = repl
        .slots()
        .into_iter()
        .find_map(|(slot, node)| (slot == s.slot).then_some(node));
    let target_node = target_node.unwrap_or(u32::MAX);
    let mut told: (Vec<(u32, u64)>, Instant) = (Vec::new(), Instant::now());
    loop {
        tokio::select! {
            Some(conn) = more.recv() => {
                // The dialler opened another data connection (the link grows).
                readers.push(conn.reader);
                spawn_sender(&mut senders, conn.writer);
                view.update(|v| v.connections += 1);
            }
            msg = recv_within(&mut ctl_r, s.idle) => match heard_now(&mut heard, msg)? {
                PeerMsg::Ack { applied, durable } => {
                    repl.acked(s.slot, epoch, applied, durable);
                    shared.applied.fetch_max(applied, Ordering::Relaxed);
                    // Senders at their share of the lag may go on.
                    notify.notify_waiters();
                    notify.notify_one();
                }
                PeerMsg::Mismatch(runs) => {
                    for (first, count) in runs {
                        let last = first.checked_add(count).filter(|_| count > 0).map(|e| e - 1);
                        let Some(last) = last.filter(|&l| l < blocks) else {
                            return Err(LinkError::Protocol(format!(
                                "a mismatch of {count} blocks at {first} is outside the volume's {blocks}"
                            )));
                        };
                        repl.resend(s.slot, epoch, first, last)?;
                    }
                }
                PeerMsg::Keepalive => {}
                other => return Err(LinkError::Protocol(format!("{other:?} from a target"))),
            },
            ended = senders.join_next() => {
                // A data connection broke. The target may still say over the control
                // connection what it made durable: take that before ending the link, so
                // a link that keeps breaking still makes progress.
                let last_word = async {
                    while let Ok(m) = recv_within(&mut ctl_r, FINAL_ACK_WAIT).await {
                        if let PeerMsg::Ack { applied, durable } = m {
                            repl.acked(s.slot, epoch, applied, durable);
                        }
                    }
                };
                let _ = tokio::time::timeout(FINAL_ACK_WAIT, last_word).await;
                return match ended {
                    Some(Ok(Err(e))) => Err(e),
                    Some(Err(e)) => Err(LinkError::Protocol(format!("a sender failed: {e}"))),
                    // A sender ends cleanly only when the stream ended (stop_stream).
                    Some(Ok(Ok(()))) | None => Err(LinkError::Closed),
                };
            }
            _ = tick.tick() => {
                // The receive above starts its timeout afresh on every turn of this loop,
                // so silence is judged here.
                if heard.elapsed() > s.idle {
                    return Err(LinkError::Idle(s.idle));
                }
                let Some(st) = repl.status(s.slot) else {
                    return Err(LinkError::Closed);
                };
                view.update(|v| v.resync_rate = rate.rate(st.resync_bytes));
                if st.pulled_ahead > pulled_ahead {
                    // Writes went to the bitmap: the peer is behind until a resync ends.
                    pulled_ahead = st.pulled_ahead;
                    ctl_w.send_any(&PeerMsg::Outdated, false).await?;
                    beat.sent();
                    in_step = false;
                    step_at = None;
                }
                if !in_step {
                    if st.resync_blocks > 0 {
                        step_at = None;
                    } else {
                        // Everything numbered so far covers every block that was out of
                        // sync: once it is durable there, the target is in step.
                        let at = *step_at.get_or_insert(st.next_seq.saturating_sub(1));
                        if st.durable >= at {
                            let current = repl.generations(s.slot).current;
                            ctl_w.send_any(&PeerMsg::InStep { seq: at, current }, false).await?;
                            beat.sent();
                            repl.in_step(s.slot)?;
                            in_step = true;
                            tracing::info!(peer = %s.peer, "peer in step (resync done)");
                        }
                    }
                }
                let holds: Vec<(u32, u64)> = repl
                    .peers_hold()
                    .into_iter()
                    .filter(|&(node, _)| node != target_node)
                    .collect();
                // Said again now and then: the target acts on it only once it is in step.
                let stale = told.1.elapsed() >= PEER_HOLDS_AGAIN;
                if !holds.is_empty() && (holds != told.0 || stale) {
                    ctl_w.send_any(&PeerMsg::PeerHolds(holds.clone()), false).await?;
                    beat.sent();
                    told = (holds, Instant::now());
                }
                if beat.due() {
                    ctl_w.send_any(&PeerMsg::Keepalive, false).await?;
                    beat.sent();
                }
            }
        }
    }
}

/// What the senders of one link share.
struct Senders {
    repl: Replication,
    slot: u32,
    epoch: u64,
    backend: Arc<dyn nbd::Backend>,
    notify: Arc<Notify>,
    limiter: Option<RateLimiter>,
    /// The target applied every operation up to this (its last ack).
    applied: AtomicU64,
    /// Per data connection: bytes it sent that the target has not applied.
    loads: Mutex<Vec<Arc<AtomicU64>>>,
    max_lag: u64,
}

impl Senders {
    /// (the smallest load of any connection, the number of connections)
    fn least_load(&self) -> (u64, usize) {
        let loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let least = loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        (least, loads.len())
    }
}

/// Send the stream on one data connection until it ends. Operations are applied in number
/// order, so bytes piled up behind one slow flow hold every other connection's back: a
/// connection takes work only while it is among the least loaded (bytes sent and not
/// yet applied), and never past its share of `max_lag`.
async fn sender(mut w: MsgWriter, sh: Arc<Senders>, load: Arc<AtomicU64>) -> Result<(), LinkError> {
    let (repl, slot, epoch) = (&sh.repl, sh.slot, sh.epoch);
    let block_size = u64::from(repl.geometry().block_size);
    let mut round = 0u64;
    // (number, bytes) of what this connection sent and the target has not applied.
    let mut unapplied: VecDeque<(u64, u64)> = VecDeque::new();
    let mut unapplied_bytes = 0u64;
    loop {
        let notified = sh.notify.notified();
        let applied = sh.applied.load(Ordering::Relaxed);
        while unapplied.front().is_some_and(|&(seq, _)| seq <= applied) {
            if let Some((_, n)) = unapplied.pop_front() {
                unapplied_bytes -= n;
            }
        }
        load.store(unapplied_bytes, Ordering::Relaxed);
        let (least, count) = sh.least_load();
        let share = (sh.max_lag / count.max(1) as u64).max(CHUNK);
        if unapplied_bytes >= share || unapplied_bytes > least + BALANCE_SLACK {
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            continue;
        }
        round += 1;
        // The resync's floor: every few rounds it goes first, so that application writes
        // filling the link cannot hold it back for ever.
        let mut ops: Vec<Op> = if round.is_multiple_of(RESYNC_FIRST_EVERY) {
            repl.next_resync(slot, epoch, CHUNK).into_iter().collect()
        } else {
            Vec::new()
        };
        if ops.is_empty() {
            let Some(queued) = repl.take_queued(slot, epoch, BALANCE_SLACK) else {
                return Ok(());
            };
            ops = queued;
        }
        if ops.is_empty() {
            ops.extend(
                repl.next_resync(slot, epoch, CHUNK)
                    .or_else(|| repl.next_verify(slot, epoch, CHUNK)),
            );
        }
        if ops.is_empty() {
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            continue;
        }
        // More may be waiting: let another connection take it meanwhile.
        sh.notify.notify_one();
        for op in ops {
            let seq = op.seq;
            let msg = match op.kind {
                OpKind::Resync { check } => {
                    read_resync(repl, &sh.backend, &op, check.then_some(block_size)).await?
                }
                _ => stream_msg(op)?,
            };
            let bytes = match &msg {
                PeerMsg::Data { data, .. } => data.len() as u64,
                PeerMsg::Check { hashes, .. } => hashes.len() as u64,
                _ => 64,
            };
            if let (Some(l), PeerMsg::Data { .. }) = (&sh.limiter, &msg) {
                l.take(bytes).await;
            }
            unapplied.push_back((seq, bytes));
            unapplied_bytes += bytes;
            load.store(unapplied_bytes, Ordering::Relaxed);
            w.send_any(&msg, false).await?;
        }
    }
}

/// A resync operation's message: the range read from the backing now (it was numbered
/// before, so every earlier write is in it), as data or, with `check` (the block size),
/// as one hash per block.
async fn read_resync(
    repl: &Replication,
    backend: &Arc<dyn nbd::Backend>,
    op: &Op,
    check: Option<u64>,
) -> Result<PeerMsg, LinkError> {
    let (seq, offset, length) = (op.seq, op.offset, op.length);
    let (b, repl) = (backend.clone(), repl.clone());
    tokio::task::spawn_blocking(move || {
        let mut data = vec![0u8; length as usize];
        b.read_at(&mut data, offset)?;
        // Which writes the data holds, for peer acknowledgements.
        let (wid, unknown) = repl.resync_wid(offset, length);
        Ok(match check {
            Some(bs) => PeerMsg::Check {
                seq,
                offset,
                length,
                hashes: block_hashes(&data, bs),
            },
            None => PeerMsg::Data {
                seq,
                offset,
                data,
                fua: false,
                wid,
                unknown,
            },
        })
    })
    .await
    .map_err(|e| LinkError::Io(std::io::Error::other(e)))?
}

/// One BLAKE3 hash per `block_size` bytes of `data` (the last block may be short).
pub(crate) fn block_hashes(data: &[u8], block_size: u64) -> Vec<u8> {
    data.chunks(block_size.max(1) as usize)
        .flat_map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

/// A queued operation's message.
fn stream_msg(op: Op) -> Result<PeerMsg, LinkError> {
    Ok(match op.kind {
        OpKind::Data(d) => PeerMsg::Data {
            seq: op.seq,
            offset: op.offset,
            data: Arc::try_unwrap(d).unwrap_or_else(|shared| shared.as_ref().clone()),
            fua: op.fua,
            wid: op.wid,
            unknown: Vec::new(),
        },
        OpKind::Zeroes => PeerMsg::Zeroes {
            seq: op.seq,
            offset: op.offset,
            length: op.length,
            fua: op.fua,
            wid: op.wid,
        },
        OpKind::Trim => PeerMsg::Trim {
            seq: op.seq,
            offset: op.offset,
            length: op.length,
            wid: op.wid,
        },
        OpKind::Flush => PeerMsg::Flush { seq: op.seq },
        OpKind::Resync { .. } => {
            return Err(LinkError::Protocol(
                "a resync operation taken as a queued write (a bug)".into(),
            ))
        }
    })
}

/// Bytes per second of a growing counter over the last [`RATE_WINDOW`].
struct RateMeter {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn new() -> RateMeter {
        RateMeter {
            samples: std::collections::VecDeque::new(),
        }
    }

    fn rate(&mut self, total: u64) -> u64 {
        let now = Instant::now();
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        match self.samples.front() {
            Some(&(t, first)) if now > t => {
                let secs = now.duration_since(t).as_secs_f64();
                ((total - first) as f64 / secs) as u64
            }
            _ => 0,
        }
    }
}
