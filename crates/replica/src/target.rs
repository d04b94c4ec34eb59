//! The secondary's end of a link: send this node's bitmap for the source (the union of
//! both is resynced), then apply the numbered stream into the backing strictly in number
//! order (operations come over any data connection and wait in a bounded buffer for
//! their turn), flush for FUA writes and barriers and at least twice a second, and
//! acknowledge what is written and what is durable. A checksum operation compares this
//! node's blocks with the source's hashes at its place in the order; the blocks that
//! differ are reported before the operation is acknowledged. When the source says the
//! resync is done, and it is durable, this node takes the source's generation and is
//! consistent.

use crate::link::{heard_now, recv_within, Beat, LinkError, LinkSettings, LinkView};
use crate::wire::PeerMsg;
use net::{Conn, MsgReader};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use volume::Replication;

/// Runs per `Runs` message.
const RUNS_PER_MESSAGE: usize = 8192;
/// Un-flushed writes become durable once this many bytes were applied (a resync over a
/// link that keeps breaking still makes progress: blocks leave the source's bitmap only
/// when durable here).
const FLUSH_BYTES: u64 = 8 << 20;
/// Un-flushed writes become durable at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Operations applied per blocking batch at most.
const BATCH: usize = 256;
/// Largest single operation accepted (NBD's own limit is 32 MiB).
const MAX_OP: u64 = 64 << 20;

/// The resync is durable: this node holds the source's data at generation `current`.
fn in_step(
    repl: &Replication,
    s: &LinkSettings,
    view: &LinkView,
    current: u64,
) -> Result<(), LinkError> {
    repl.adopt(current)?;
    repl.clear(s.slot)?;
    repl.in_step(s.slot)?;
    view.update(|v| v.discard_my_data = false);
    tracing::info!(peer = %s.peer, "in step with the source (resync done)");
    Ok(())
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
    source_current: u64,
) -> Result<(), LinkError> {
    let Conn {
        reader: mut ctl_r,
        writer: mut ctl_w,
    } = ctl;
    let mut from = 0;
    loop {
        let runs = repl.runs(s.slot, from, RUNS_PER_MESSAGE);
        let Some(&(first, count)) = runs.last() else {
            break;
        };
        from = first + count;
        ctl_w.send_any(&PeerMsg::Runs(runs), false).await?;
    }
    ctl_w.send_any(&PeerMsg::RunsEnd, false).await?;
    let resync_blocks = loop {
        match recv_within(&mut ctl_r, s.idle).await? {
            PeerMsg::Start { resync_blocks } => break resync_blocks,
            PeerMsg::Keepalive => {}
            other => return Err(LinkError::Protocol(format!("{other:?} before the start"))),
        }
    };
    if resync_blocks > 0 || full {
        repl.resyncing_from(s.slot, source_current)?;
    }
    // This node holds the source's data but for what the stream brings (for peer acks).
    let mut holds_source = resync_blocks == 0 && !full;
    let _pending = PendingGuard(repl.clone());
    repl.end_peer_acks();
    tracing::info!(
        peer = %s.peer,
        "replicating as target: {resync_blocks} block(s) to resync (source at generation {source_current:016x})"
    );

    // Enough for the source's lag bound and a margin: more is a peer that lies.
    let limit = s.stream.max_lag.saturating_mul(2).saturating_add(MAX_OP);
    let (tx, rx) = mpsc::channel::<PeerMsg>(64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut writers = Vec::new();
    let geo = repl.geometry();
    for conn in data {
        writers.push(conn.writer);
        tasks.spawn(receive(conn.reader, tx.clone(), geo));
    }
    let (progress_tx, mut progress) = watch::channel(Progress::default());
    // Mismatches go out before the progress that acknowledges their comparison.
    let (mismatch_tx, mut mismatches) = mpsc::unbounded_channel();
    let backend_for_last_word = backend.clone();
    let applier = Applier {
        repl: repl.clone(),
        slot: s.slot,
        backend,
        progress: progress_tx,
        mismatches: mismatch_tx,
        limit,
        block_size: u64::from(geo.block_size),
    };
    tasks.spawn(applier.run(rx));

    let mut beat = Beat::new(s.idle);
    let mut tick = tokio::time::interval(s.idle / 4);
    let mut step: Option<(u64, u64)> = None;
    let mut sent = (0, 0);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            Some(conn) = more.recv() => {
                // The dialler opened another data connection (the link grows).
                writers.push(conn.writer);
                tasks.spawn(receive(conn.reader, tx.clone(), geo));
                view.update(|v| v.connections += 1);
            }
            changed = progress.changed() => {
                if changed.is_err() {
                    continue;
                }
                let p = *progress.borrow_and_update();
                view.update(|v| v.applied_bytes = p.bytes);
                while let Ok(runs) = mismatches.try_recv() {
                    ctl_w.send_any(&PeerMsg::Mismatch(runs), false).await?;
                }
                if (p.applied, p.durable) != sent {
                    ctl_w.send_any(&PeerMsg::Ack { applied: p.applied, durable: p.durable }, false).await?;
                    sent = (p.applied, p.durable);
                    beat.sent();
                }
                if let Some((seq, current)) = step {
                    if p.durable >= seq {
                        in_step(&repl, s, view, current)?;
                        holds_source = true;
                        step = None;
                    }
                }
            }
            msg = recv_within(&mut ctl_r, s.idle) => match heard_now(&mut heard, msg)? {
                PeerMsg::InStep { seq, current } => {
                    step = Some((seq, current));
                    // Already durable? The next progress report (or this check) adopts it.
                    let p = *progress.borrow();
                    if p.durable >= seq {
                        in_step(&repl, s, view, current)?;
                        holds_source = true;
                        step = None;
                    }
                }
                PeerMsg::PeerHolds(holds) => {
                    for (node, wid) in holds {
                        repl.peer_holds(s.slot, node, wid, holds_source)?;
                    }
                }
                PeerMsg::Outdated => {
                    holds_source = false;
                    repl.set_outdated(true)?;
                    tracing::warn!(peer = %s.peer, "outdated: the primary pulled ahead; in step again after its resync");
                }
                PeerMsg::Keepalive => {}
                other => return Err(LinkError::Protocol(format!("{other:?} on the control connection of a target"))),
            },
            ended = tasks.join_next() => {
                // A connection broke: what is applied is made durable and said so on the
                // control connection (if it still works) before the link ends, so a link
                // that keeps breaking still makes progress.
                let p = *progress.borrow();
                if p.applied > sent.1 {
                    let b = backend_for_last_word.clone();
                    if blocking(move || b.flush()).await.is_ok() {
                        let ack = PeerMsg::Ack { applied: p.applied, durable: p.applied };
                        let _ = ctl_w.send_any(&ack, false).await;
                    }
                }
                return match ended {
                    Some(Ok(Err(e))) => Err(e),
                    Some(Err(e)) => Err(LinkError::Protocol(format!("a receiver failed: {e}"))),
                    Some(Ok(Ok(()))) | None => Err(LinkError::Closed),
                };
            }
            _ = tick.tick() => {
                // The receive above starts its timeout afresh on every turn of this loop,
                // so silence is judged here.
                if heard.elapsed() > s.idle {
                    return Err(LinkError::Idle(s.idle));
                }
                if beat.due() {
                    ctl_w.send_any(&PeerMsg::Keepalive, false).await?;
                    beat.sent();
                }
            }
        }
    }
}

/// Read one data connection's operations, check them, and pass them to the applier.
async fn receive(
    mut r: MsgReader,
    tx: mpsc::Sender<PeerMsg>,
    geo: volume::Geometry,
) -> Result<(), LinkError> {
    let (size, bs) = (geo.size, u64::from(geo.block_size));
    loop {
        // No timeout: data connections may be quiet for long, and the control
        // connection's keepalives say whether the link lives.
        let msg = match r.recv_any::<PeerMsg>().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(LinkError::Closed),
            Err(e) => return Err(e.into()),
        };
        let (offset, length) = match &msg {
            PeerMsg::Data { offset, data, .. } => (*offset, data.len() as u64),
            PeerMsg::Zeroes { offset, length, .. } | PeerMsg::Trim { offset, length, .. } => {
                (*offset, *length)
            }
            PeerMsg::Flush { .. } => (0, 0),
            PeerMsg::Check {
                offset,
                length,
                hashes,
                ..
            } => {
                if offset % bs != 0
                    || *length > MAX_OP
                    || hashes.len() as u64 != length.div_ceil(bs) * 32
                {
                    return Err(LinkError::Protocol(format!(
                        "a checksum operation of {length} bytes at {offset} with {} hash bytes \
                         does not fit {bs} byte blocks",
                        hashes.len()
                    )));
                }
                (*offset, *length)
            }
            PeerMsg::Keepalive => continue,
            other => {
                return Err(LinkError::Protocol(format!(
                    "{other:?} on a data connection"
                )))
            }
        };
        if offset.checked_add(length).is_none_or(|end| end > size)
            || (matches!(msg, PeerMsg::Data { .. }) && length > MAX_OP)
        {
            return Err(LinkError::Protocol(format!(
                "an operation of {length} bytes at {offset} is outside the volume's {size} bytes"
            )));
        }
        if tx.send(msg).await.is_err() {
            return Ok(());
        }
    }
}

/// What the applier has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    applied: u64,
    durable: u64,
    bytes: u64,
}

/// Ends this link's peer acknowledgements however the link ends: what was pending for
/// the other peers stays marked.
struct PendingGuard(Replication);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.end_peer_acks();
    }
}

/// Where the applier writes and whom it tells.
struct Applier {
    /// The volume, and the source's slot: writes applied are marked for the other peers.
    repl: Replication,
    slot: u32,
    backend: Arc<dyn nbd::Backend>,
    progress: watch::Sender<Progress>,
    mismatches: mpsc::UnboundedSender<Vec<(u64, u64)>>,
    limit: u64,
    block_size: u64,
}

impl Applier {
    /// Apply operations in number order; flush for FUA and barriers, and every
    /// [`FLUSH_EVERY`] while something is not durable.
    async fn run(self, mut rx: mpsc::Receiver<PeerMsg>) -> Result<(), LinkError> {
        let mut waiting: BTreeMap<u64, PeerMsg> = BTreeMap::new();
        let mut waiting_bytes = 0u64;
        let mut p = Progress::default();
        let mut flush_due: Option<tokio::time::Instant> = None;
        // Data bytes applied since the last flush.
        let mut unflushed = 0u64;
        // Marks for the other peers set since they were last persisted.
        let mut marked = false;
        loop {
            let msg = match flush_due {
                Some(at) => tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(at) => {
                        self.persist_marks(&mut marked).await?;
                        let b = self.backend.clone();
                        blocking(move || b.flush()).await?;
                        p.durable = p.applied;
                        flush_due = None;
                        unflushed = 0;
                        let _ = self.progress.send(p);
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(msg) = msg else {
                return Ok(());
            };
            let Some(seq) = msg.seq() else { continue };
            if seq <= p.applied || waiting.contains_key(&seq) {
                return Err(LinkError::Protocol(format!(
                    "operation {seq} sent twice (applied up to {})",
                    p.applied
                )));
            }
            waiting_bytes += op_bytes(&msg);
            waiting.insert(seq, msg);
            if waiting_bytes > self.limit {
                return Err(LinkError::Protocol(format!(
                    "{waiting_bytes} bytes sent ahead of operation {} (more than the lag bound allows)",
                    p.applied + 1
                )));
            }
            let mut batch = Vec::new();
            while batch.len() < BATCH {
                match waiting.remove(&(p.applied + 1 + batch.len() as u64)) {
                    Some(m) => {
                        waiting_bytes -= op_bytes(&m);
                        batch.push(m);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            // Marked before the data lands: the other peers' bitmaps never miss a block
            // this node holds.
            marked |= self.repl.applying(self.slot, &write_ids(&batch));
            let (b, bs) = (self.backend.clone(), self.block_size);
            let done = blocking(move || apply_batch(&*b, batch, bs)).await?;
            if !done.mismatched.is_empty() {
                let _ = self.mismatches.send(done.mismatched);
            }
            p.applied += done.ops;
            p.bytes += done.bytes;
            unflushed += done.bytes;
            if !done.synced && unflushed >= FLUSH_BYTES {
                let b = self.backend.clone();
                blocking(move || b.flush()).await?;
            }
            if done.synced || unflushed >= FLUSH_BYTES {
                // What is said durable has its marks for the other peers on disk too.
                self.persist_marks(&mut marked).await?;
                p.durable = p.applied;
                flush_due = None;
                unflushed = 0;
            } else if p.durable < p.applied && flush_due.is_none() {
                flush_due = Some(tokio::time::Instant::now() + FLUSH_EVERY);
            }
            let _ = self.progress.send(p);
        }
    }
}

impl Applier {
    /// Persist the marks set for the other peers, if any were.
    async fn persist_marks(&self, marked: &mut bool) -> Result<(), LinkError> {
        if std::mem::take(marked) {
            let repl = self.repl.clone();
            tokio::task::spawn_blocking(move || repl.persist())
                .await
                .map_err(|e| LinkError::Io(std::io::Error::other(e)))??;
        }
        Ok(())
    }
}

/// The operations of `batch` that change data, for peer acknowledgements.
fn write_ids(batch: &[PeerMsg]) -> Vec<volume::Applied> {
    batch
        .iter()
        .filter_map(|m| match m {
            PeerMsg::Data {
                wid,
                offset,
                data,
                unknown,
                ..
            } => Some(volume::Applied {
                wid: *wid,
                offset: *offset,
                length: data.len() as u64,
                unknown: unknown.clone(),
            }),
            PeerMsg::Zeroes {
                wid,
                offset,
                length,
                ..
            }
            | PeerMsg::Trim {
                wid,
                offset,
                length,
                ..
            } => Some(volume::Applied {
                wid: *wid,
                offset: *offset,
                length: *length,
                unknown: Vec::new(),
            }),
            _ => None,
        })
        .collect()
}

fn op_bytes(m: &PeerMsg) -> u64 {
    match m {
        PeerMsg::Data { data, .. } => data.len() as u64,
        _ => 64,
    }
}

/// What a batch did.
struct Applied {
    ops: u64,
    /// Data bytes written.
    bytes: u64,
    /// The batch ended with a flush that covers all of it.
    synced: bool,
    /// Blocks (first, count) whose checksums differed.
    mismatched: Vec<(u64, u64)>,
}

/// Apply `batch` (consecutive numbers) in order.
fn apply_batch(
    b: &dyn nbd::Backend,
    batch: Vec<PeerMsg>,
    block_size: u64,
) -> std::io::Result<Applied> {
    let mut done = Applied {
        ops: batch.len() as u64,
        bytes: 0,
        synced: false,
        mismatched: Vec::new(),
    };
    let mut need_flush = false;
    for m in batch {
        match m {
            PeerMsg::Data {
                offset, data, fua, ..
            } => {
                b.write_at(&data, offset)?;
                done.bytes += data.len() as u64;
                need_flush |= fua;
            }
            PeerMsg::Zeroes {
                offset,
                length,
                fua,
                ..
            } => {
                let how = nbd::Zeroing {
                    may_trim: true,
                    fast_only: false,
                };
                b.write_zeroes(offset, length, how)?;
                need_flush |= fua;
            }
            PeerMsg::Trim { offset, length, .. } => b.trim(offset, length)?,
            PeerMsg::Flush { .. } => need_flush = true,
            PeerMsg::Check {
                offset,
                length,
                hashes,
                ..
            } => compare(b, offset, length, &hashes, block_size, &mut done.mismatched)?,
            _ => {}
        }
    }
    // One flush at the end covers every FUA write and barrier of the batch: nothing of
    // it is acknowledged as durable before.
    if need_flush {
        b.flush()?;
    }
    done.synced = need_flush;
    Ok(done)
}

/// Compare this node's blocks of a range with the source's `hashes`; add the blocks that
/// differ to `out` as runs (first, count), merged with the previous run when adjacent.
fn compare(
    b: &dyn nbd::Backend,
    offset: u64,
    length: u64,
    hashes: &[u8],
    block_size: u64,
    out: &mut Vec<(u64, u64)>,
) -> std::io::Result<()> {
    let mut data = vec![0u8; length as usize];
    b.read_at(&mut data, offset)?;
    let ours = crate::source::block_hashes(&data, block_size);
    let first = offset / block_size;
    for (i, (a, b)) in ours.chunks(32).zip(hashes.chunks(32)).enumerate() {
        if a == b {
            continue;
        }
        let block = first + i as u64;
        match out.last_mut() {
            Some((f, n)) if *f + *n == block => *n += 1,
            _ => out.push((block, 1)),
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, LinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LinkError::Io(std::io::Error::other(e)))?
        .map_err(LinkError::Io)
}
