//! Replication peers' slots: for each peer, the blocks it may lack (the slot's bitmap,
//! persisted like slot 0's) and, while a link streams to it, the numbered stream of writes
//! it is sent.
//!
//! Per peer, in memory:
//! - `oos`: blocks out of sync that no queued or sent write will fix: resync's work;
//! - `inflight`: per block, the numbered writes not yet durable on the peer;
//! - `bits` ⊇ `oos` ∪ blocks with `inflight` writes ∪ blocks being written now: the slot's
//!   persisted bitmap. With the activity log's extents added after a crash, it marks every
//!   block the peer may lack.
//!
//! A write sets `bits` in `before_write`, as for slot 0. `after_write` (still holding the
//! write's range, see `Tracker::admit`) decides per peer: a streaming peer gets the write
//! numbered and queued, its blocks counted in `inflight`; any other gets them in `oos`. A
//! durable acknowledgement up to a number clears the blocks whose last write that was,
//! unless `oos` or a write in progress still holds them. A link that ends moves everything
//! numbered and not yet durable to `oos`.
//!
//! While a peer is attached, overlapping writes are serialised (`Tracker::admit` waits for
//! the one in progress): numbers are given before the range is released, so the order of
//! the numbers of two overlapping writes is the order in which they reached the backing,
//! and the peer, applying in number order, ends with the same bytes.
//!
//! Resync takes runs of `oos` in disk order ([`Replication::next_resync`]) and numbers
//! them in the same stream: the caller reads the range from the backing *after* it was
//! numbered, so a write numbered later is applied after it on the peer, and one numbered
//! earlier is already in the backing the caller reads.

use crate::bitmap::Bitmap;
use crate::error::Error;
use crate::meta::{Inner, Result, State};
use nbd::WriteKind;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// What a numbered operation does on the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Write these bytes.
    Data(Arc<Vec<u8>>),
    /// The range reads as zeroes.
    Zeroes,
    /// Discard the range (as the primary's backing did).
    Trim,
    /// A barrier: everything numbered before it is durable on the peer when it is
    /// acknowledged.
    Flush,
    /// Resync: the caller reads the range from the backing and sends it as data, or
    /// with `check` as one checksum per block, for the peer to compare with its own
    /// (blocks that differ come back through [`Replication::resend`]).
    Resync { check: bool },
}

/// One operation of a peer's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub kind: OpKind,
    /// Durable on the peer before it is acknowledged (NBD FUA).
    pub fua: bool,
    /// For an application write: its write id, the same in every peer's stream (the
    /// peers learn through peer acknowledgements which writes their fellows hold, see
    /// `peer_acks.rs`); 0 for other operations.
    pub wid: u64,
}

/// How a stream behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Bytes numbered and not yet applied by the peer before writers wait (or pull ahead).
    pub max_lag: u64,
    /// Protocol C: a write's reply waits for the peer (applied; durable with FUA or for a
    /// flush).
    pub sync: bool,
    /// Past `max_lag`, put writes in the bitmap for resync instead of waiting.
    pub pull_ahead: bool,
    /// Resync sends checksums first and data only for blocks that differ.
    pub csums: bool,
}

/// A peer's state, as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub slot: u32,
    pub node: u32,
    /// Blocks the peer may lack (the slot's bitmap).
    pub out_of_sync_blocks: u64,
    pub out_of_sync_bytes: u64,
    /// Of those, blocks waiting for resync (no numbered write will fix them).
    pub resync_blocks: u64,
    pub streaming: bool,
    /// Bytes numbered and not yet applied by the peer.
    pub lag_bytes: u64,
    /// How long ago the oldest operation the peer has not applied was numbered (0 when
    /// it applied everything).
    pub lag_ms: u64,
    /// Operations numbered and not yet durable on the peer.
    pub unacked: u64,
    pub next_seq: u64,
    pub applied: u64,
    pub durable: u64,
    /// Since open: bytes of application writes queued for the peer, and bytes numbered
    /// for resync.
    pub shipped_bytes: u64,
    pub resync_bytes: u64,
    /// Writes that went to the bitmap because the stream was past `max_lag`.
    pub pulled_ahead: u64,
    /// Since open: blocks a checksum comparison found different on the peer (resent).
    pub mismatched_blocks: u64,
    /// An online verify is under way: bytes of the volume numbered for comparison so far.
    pub verify_position: Option<u64>,
    /// Since open: bytes compared by online verifies.
    pub verified_bytes: u64,
}

/// A numbered operation not yet durable on the peer.
pub(crate) struct Numbered {
    pub seq: u64,
    pub bytes: u64,
    pub blocks: Option<(u64, u64)>,
    /// When it was numbered (for the lag in seconds).
    pub at: Instant,
    /// An application write's id.
    pub wid: Option<u64>,
    /// A resync run (data or checksums): while one is not durable, the peer may lack
    /// blocks of writes older than any still in the stream.
    pub resync: bool,
}

pub(crate) struct Stream {
    pub epoch: u64,
    pub opts: StreamOptions,
    pub next_seq: u64,
    /// Numbered and not yet taken by the link.
    pub outbox: VecDeque<Op>,
    /// Numbered and not yet durable, in number order (a superset of the outbox).
    pub numbered: VecDeque<Numbered>,
    applied: u64,
    durable: u64,
    /// Bytes of `numbered` entries past `applied`.
    pub lag_bytes: u64,
    /// Resync runs numbered and not yet durable.
    pub resyncs: u64,
    pub wake: Arc<dyn Fn() + Send + Sync>,
}

pub(crate) struct PeerTrack {
    pub slot: u32,
    pub node: u32,
    pub bits: Bitmap,
    oos: Bitmap,
    pub inflight: HashMap<u64, u32>,
    pub stream: Option<Stream>,
    epochs: u64,
    /// Where resync looks next (a block number).
    cursor: u64,
    /// The next block an online verify compares (None: no verify under way).
    pub verify: Option<u64>,
    pub status: PeerStatus,
    /// On a secondary: the writes the primary sent that this peer may not hold yet
    /// (see `peer_acks.rs`).
    pub pending: Option<crate::peer_acks::Pending>,
}

impl PeerTrack {
    /// A slot's tracking from its persisted bitmap: every set bit is out of sync.
    pub fn new(slot: u32, node: u32, bits: Bitmap) -> PeerTrack {
        let oos = bits.clone();
        PeerTrack {
            slot,
            node,
            bits,
            oos,
            inflight: HashMap::new(),
            stream: None,
            epochs: 0,
            cursor: 0,
            verify: None,
            pending: None,
            status: PeerStatus {
                slot,
                node,
                ..PeerStatus::default()
            },
        }
    }

    /// Blocks `first..=last` are out of sync (after a crash, or a full sync).
    pub fn mark(&mut self, first: u64, last: u64) -> u64 {
        self.oos.set_range(first, last);
        self.bits.set_range(first, last)
    }

    /// Blocks waiting for resync.
    pub(crate) fn oos_count(&self) -> u64 {
        self.oos.count()
    }

    /// Blocks `first..=last` are in sync (on a slot that does not stream: nothing is
    /// numbered for it).
    pub(crate) fn clear_marks(&mut self, first: u64, last: u64) {
        self.oos.clear_range(first, last);
        self.bits.clear_range(first, last);
    }
}

/// A write about to be released, as the peers see it.
pub(crate) struct Shipped<'a> {
    pub offset: u64,
    pub length: u64,
    pub blocks: (u64, u64),
    pub kind: WriteKind,
    /// The data's pieces ([`data_pieces`]), for a data write.
    pub data: Option<&'a [Arc<Vec<u8>>]>,
    pub fua: bool,
    pub block_size: u64,
}

/// A data write longer than this goes to the peer in pieces of this size, numbered one
/// after another: different connections carry them at once, so one large write does not
/// wait for a single capped flow (1 MiB at 2 MB/s is half a second).
const PIECE: u64 = 256 << 10;

/// A write's data as the peers are sent it: one copy, cut into pieces of at most
/// [`PIECE`] bytes that every streaming peer shares.
pub(crate) fn data_pieces(data: &[u8]) -> Vec<Arc<Vec<u8>>> {
    data.chunks(PIECE as usize)
        .map(|c| Arc::new(c.to_vec()))
        .collect()
}

/// `w`'s operations: its data pieces, or the whole range for zeroes and trims; None when
/// no copy of the data was made (the stream started meanwhile: resync sends it).
fn operations(w: &Shipped<'_>) -> Option<Vec<(u64, u64, OpKind)>> {
    match (w.kind, w.data) {
        (WriteKind::Data, Some(pieces)) => {
            let mut at = w.offset;
            let ops = pieces
                .iter()
                .map(|d| {
                    let op = (at, d.len() as u64, OpKind::Data(d.clone()));
                    at += d.len() as u64;
                    op
                })
                .collect();
            Some(ops)
        }
        (WriteKind::Data, None) => None,
        (WriteKind::Zeroes, _) => Some(vec![(w.offset, w.length, OpKind::Zeroes)]),
        (WriteKind::Trim, _) => Some(vec![(w.offset, w.length, OpKind::Trim)]),
    }
}

impl Stream {
    /// Give the next number to an operation of `bytes` (what the peer must take in)
    /// touching `blocks` (None: nothing to clear when it is durable).
    pub(crate) fn number(&mut self, bytes: u64, blocks: Option<(u64, u64)>) -> u64 {
        self.number_op(bytes, blocks, None, false)
    }

    /// [`Stream::number`] for an application write with id `wid`, or a resync run.
    pub(crate) fn number_op(
        &mut self,
        bytes: u64,
        blocks: Option<(u64, u64)>,
        wid: Option<u64>,
        resync: bool,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.numbered.push_back(Numbered {
            at: Instant::now(),
            seq,
            bytes,
            blocks,
            wid,
            resync,
        });
        self.lag_bytes += bytes;
        self.resyncs += u64::from(resync);
        seq
    }
}

/// Number `w` for every streaming peer or put it in their `oos`. Returns the (slot, epoch,
/// seq) a protocol C writer waits for. Called under `state`, before the write's range is
/// released.
pub(crate) fn ship_locked(st: &mut State, w: &Shipped<'_>) -> Vec<(u32, u64, u64)> {
    let mut waits = Vec::new();
    st.wid += 1;
    let wid = st.wid;
    for p in &mut st.peers {
        let (first, last) = w.blocks;
        let Some(s) = p.stream.as_mut() else {
            p.mark(first, last);
            continue;
        };
        let Some(ops) = operations(w) else {
            p.mark(first, last);
            continue;
        };
        if s.opts.pull_ahead && s.lag_bytes > s.opts.max_lag {
            p.status.pulled_ahead += 1;
            p.mark(first, last);
            continue;
        }
        let mut seq = 0;
        for (offset, length, kind) in ops {
            let bytes = if matches!(kind, OpKind::Data(_)) {
                length
            } else {
                0
            };
            let blocks = (offset / w.block_size, (offset + length - 1) / w.block_size);
            seq = s.number_op(bytes, Some(blocks), Some(wid), false);
            s.outbox.push_back(Op {
                seq,
                offset,
                length,
                kind,
                // The last piece's flush covers the earlier ones (applied in order).
                fua: w.fua && offset + length == w.offset + w.length,
                wid,
            });
            for b in blocks.0..=blocks.1 {
                *p.inflight.entry(b).or_insert(0) += 1;
            }
        }
        p.bits.set_range(first, last);
        p.status.shipped_bytes += w.length;
        (s.wake)();
        if s.opts.sync {
            waits.push((p.slot, s.epoch, seq));
        }
    }
    waits
}

/// Whether some write is between `before_write` and its release on blocks `first..=last`.
fn being_written(st: &State, block_size: u64, first: u64, last: u64) -> bool {
    let (lo, hi) = (first * block_size, (last + 1) * block_size);
    st.inflight
        .keys()
        .chain(st.claimed.iter())
        .any(|&(o, l)| o < hi && o + l > lo)
}

/// A cheap handle on a volume's peers for the replication link (`Meta::replication`).
#[derive(Clone)]
pub struct Replication {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Replication {
    pub(crate) fn no_slot(&self, slot: u32) -> Error {
        Error::invalid(&self.inner.path, format!("has no peer in slot {slot}"))
    }

    /// Start streaming to the peer in `slot`: writes are numbered for it from now on
    /// (starting at 1) and resync begins with its out-of-sync blocks. `wake` is called
    /// (under a lock: keep it short) when an operation is queued or the stream ends.
    /// Returns the stream's epoch, which every later call names.
    pub fn start_stream(
        &self,
        slot: u32,
        opts: StreamOptions,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<u64> {
        let mut st = self.inner.state();
        self.inner.usable(&st)?;
        let p = st.peer_mut(slot).ok_or_else(|| self.no_slot(slot))?;
        if let Some(old) = p.stream.take() {
            end_stream(p, old);
        }
        p.epochs += 1;
        p.cursor = 0;
        p.stream = Some(Stream {
            epoch: p.epochs,
            opts,
            next_seq: 1,
            outbox: VecDeque::new(),
            numbered: VecDeque::new(),
            applied: 0,
            durable: 0,
            lag_bytes: 0,
            resyncs: 0,
            wake,
        });
        Ok(p.epochs)
    }

    /// The link ended: everything numbered and not durable is out of sync again.
    pub fn stop_stream(&self, slot: u32, epoch: u64) {
        let mut st = self.inner.state();
        if let Some(p) = st.peer_mut(slot) {
            if p.stream.as_ref().is_some_and(|s| s.epoch == epoch) {
                if let Some(s) = p.stream.take() {
                    end_stream(p, s);
                }
                st.rotate = true;
            }
        }
        drop(st);
        self.inner.acked.notify_all();
    }

    /// Up to `max_bytes` of queued operations (at least one when any is queued), or None
    /// when the stream `epoch` is over.
    pub fn take_queued(&self, slot: u32, epoch: u64, max_bytes: u64) -> Option<Vec<Op>> {
        let mut st = self.inner.state();
        let s = stream_mut(&mut st, slot, epoch)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(op) = s.outbox.front() {
            let n = match op.kind {
                OpKind::Data(_) | OpKind::Resync { .. } => op.length,
                _ => 0,
            };
            if !out.is_empty() && bytes + n > max_bytes {
                break;
            }
            bytes += n;
            out.extend(s.outbox.pop_front());
        }
        Some(out)
    }

    /// Number a flush barrier (after a local NBD FLUSH); returns what a protocol C
    /// writer waits for.
    pub(crate) fn flush_locked(st: &mut State) -> Vec<(u32, u64, u64)> {
        let mut waits = Vec::new();
        for p in &mut st.peers {
            let Some(s) = p.stream.as_mut() else {
                continue;
            };
            let seq = s.number(0, None);
            s.outbox.push_back(Op {
                seq,
                offset: 0,
                length: 0,
                kind: OpKind::Flush,
                fua: true,
                wid: 0,
            });
            (s.wake)();
            if s.opts.sync {
                waits.push((p.slot, s.epoch, seq));
            }
        }
        waits
    }

    /// The next run of out-of-sync blocks (at most `max_len` bytes), numbered in the
    /// stream, or None when there is none (or the stream is over, or its lag is at
    /// `max_lag`). The caller reads the range from the backing now and sends it.
    pub fn next_resync(&self, slot: u32, epoch: u64, max_len: u64) -> Option<Op> {
        let geo = self.inner.geo;
        let bs = u64::from(geo.block_size);
        let mut st = self.inner.state();
        let st = &mut *st;
        let p = st.peer_mut(slot)?;
        let s = p.stream.as_ref().filter(|s| s.epoch == epoch)?;
        if s.lag_bytes >= s.opts.max_lag || p.oos.count() == 0 {
            return None;
        }
        let mut first = p.oos.next(p.cursor, geo.blocks, true);
        if first >= geo.blocks {
            first = p.oos.next(0, geo.blocks, true);
        }
        if first >= geo.blocks {
            return None;
        }
        let most = (max_len / bs).max(1);
        let end = p.oos.next(first, (first + most).min(geo.blocks), false);
        let last = end - 1;
        p.oos.clear_range(first, last);
        p.cursor = end;
        let check = s.opts.csums;
        Some(number_resync(p, &geo, first, last, check))
    }

    /// The peer applied every operation up to `applied` and made every one up to
    /// `durable` durable (cumulative numbers). Blocks whose last numbered write is durable
    /// and which nothing else holds leave the bitmap.
    pub fn acked(&self, slot: u32, epoch: u64, applied: u64, durable: u64) {
        let bs = u64::from(self.inner.geo.block_size);
        let mut guard = self.inner.state();
        let st = &mut *guard;
        let Some(i) = st.peers.iter().position(|p| p.slot == slot) else {
            return;
        };
        let mut done = Vec::new();
        {
            let p = &mut st.peers[i];
            let Some(s) = p.stream.as_mut().filter(|s| s.epoch == epoch) else {
                return;
            };
            let applied = applied.min(s.next_seq - 1);
            let durable = durable.min(applied);
            if applied > s.applied {
                // Entries up to the old `applied` were counted off already; everything
                // past it is still in `numbered` (durable never passes applied).
                for n in s.numbered.iter() {
                    if n.seq > applied {
                        break;
                    }
                    if n.seq > s.applied {
                        s.lag_bytes -= n.bytes;
                    }
                }
                s.applied = applied;
            }
            if durable > s.durable {
                s.durable = durable;
                while s.numbered.front().is_some_and(|n| n.seq <= durable) {
                    let Some(n) = s.numbered.pop_front() else {
                        break;
                    };
                    s.resyncs -= u64::from(n.resync);
                    if let Some(b) = n.blocks {
                        done.push(b);
                    }
                }
            }
        }
        for (first, last) in done {
            for b in first..=last {
                let p = &mut st.peers[i];
                let left = match p.inflight.get_mut(&b) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        true
                    }
                    Some(_) => {
                        p.inflight.remove(&b);
                        false
                    }
                    None => false,
                };
                if left || p.oos.get(b) || being_written(st, bs, b, b) {
                    continue;
                }
                st.peers[i].bits.clear_range(b, b);
            }
        }
        drop(guard);
        self.inner.acked.notify_all();
    }

    /// Every block is out of sync for the peer in `slot` (a full sync).
    pub fn mark_all(&self, slot: u32) -> Result<()> {
        let blocks = self.inner.geo.blocks;
        self.mark(slot, 0, blocks.saturating_sub(1))
    }

    /// Blocks `first..=last` are out of sync for the peer in `slot` (what the peer says
    /// it lacks, or differences an online verify found).
    pub fn mark(&self, slot: u32, first: u64, last: u64) -> Result<()> {
        let mut st = self.inner.state();
        let p = st.peer_mut(slot).ok_or_else(|| self.no_slot(slot))?;
        if first < self.inner.geo.blocks {
            p.mark(first, last);
        }
        Ok(())
    }

    /// The peer in `slot`'s state.
    pub fn status(&self, slot: u32) -> Option<PeerStatus> {
        let st = self.inner.state();
        let p = st.peer(slot)?;
        Some(peer_status(&self.inner, p))
    }

    /// Every peer slot in use: (slot, node).
    pub fn slots(&self) -> Vec<(u32, u32)> {
        let st = self.inner.state();
        st.peers.iter().map(|p| (p.slot, p.node)).collect()
    }

    /// The volume's geometry (size, block size).
    pub fn geometry(&self) -> crate::Geometry {
        self.inner.geo
    }

    /// Wait until the stream `epoch` of `slot` acknowledged `seq` (applied; durable when
    /// `durable`), or ended. Returns whether it was acknowledged.
    pub fn wait_acked(&self, slot: u32, epoch: u64, seq: u64, durable: bool) -> bool {
        self.inner.wait_acked(slot, epoch, seq, durable)
    }
}

pub(crate) fn peer_status(inner: &Inner, p: &PeerTrack) -> PeerStatus {
    let mut s = p.status.clone();
    s.out_of_sync_blocks = p.bits.count();
    s.out_of_sync_bytes = inner.geo.bytes_of(p.bits.count(), p.bits.last_set());
    s.resync_blocks = p.oos.count();
    s.streaming = p.stream.is_some();
    if let Some(st) = &p.stream {
        s.lag_bytes = st.lag_bytes;
        s.lag_ms = st
            .numbered
            .iter()
            .find(|n| n.seq > st.applied)
            .map_or(0, |n| n.at.elapsed().as_millis() as u64);
        s.unacked = st.numbered.len() as u64;
        s.next_seq = st.next_seq;
        s.applied = st.applied;
        s.durable = st.durable;
    }
    s
}

fn stream_mut(st: &mut State, slot: u32, epoch: u64) -> Option<&mut Stream> {
    st.peer_mut(slot)?
        .stream
        .as_mut()
        .filter(|s| s.epoch == epoch)
}

/// Number blocks `first..=last` for resync in `p`'s stream (which must be running): the
/// peer is sent them (as data, or checksums when `check`), and they stay in the bitmap
/// until that is durable there.
pub(crate) fn number_resync(
    p: &mut PeerTrack,
    geo: &crate::Geometry,
    first: u64,
    last: u64,
    check: bool,
) -> Op {
    let bs = u64::from(geo.block_size);
    let offset = first * bs;
    let length = ((last + 1) * bs).min(geo.size) - offset;
    let s = p.stream.as_mut().expect("number_resync on a stream");
    let seq = s.number_op(length, Some((first, last)), None, true);
    for b in first..=last {
        *p.inflight.entry(b).or_insert(0) += 1;
    }
    p.status.resync_bytes += length;
    Op {
        seq,
        offset,
        length,
        kind: OpKind::Resync { check },
        fua: false,
        wid: 0,
    }
}

/// Everything `s` numbered and the peer did not make durable is out of sync again.
fn end_stream(p: &mut PeerTrack, s: Stream) {
    for n in &s.numbered {
        if let Some((first, last)) = n.blocks {
            p.oos.set_range(first, last);
            p.bits.set_range(first, last);
        }
    }
    p.inflight.clear();
    p.verify = None;
    (s.wake)();
}

impl Inner {
    /// See [`Replication::wait_acked`].
    pub(crate) fn wait_acked(&self, slot: u32, epoch: u64, seq: u64, durable: bool) -> bool {
        let mut st = self.state();
        loop {
            let Some(s) = st
                .peer(slot)
                .and_then(|p| p.stream.as_ref())
                .filter(|s| s.epoch == epoch)
            else {
                return false;
            };
            let got = if durable { s.durable } else { s.applied };
            if got >= seq {
                return true;
            }
            st = match self.acked.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Wait while a streaming peer without pull-ahead is past its `max_lag` (protocol A's
    /// bound on what a crash of this node can lose from the peer's view).
    pub(crate) fn wait_for_room(&self) {
        let mut st = self.state();
        loop {
            let full = st.peers.iter().any(|p| {
                p.stream
                    .as_ref()
                    .is_some_and(|s| !s.opts.pull_ahead && s.lag_bytes > s.opts.max_lag)
            });
            if !full || st.closed {
                return;
            }
            st = match self.acked.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Whether any peer slot is tracked (overlapping writes are then serialised).
    pub(crate) fn has_peers(st: &State) -> bool {
        !st.peers.is_empty()
    }

    /// Whether any peer streams (a write's data is then copied for it).
    pub(crate) fn any_streaming(&self) -> bool {
        self.state().peers.iter().any(|p| p.stream.is_some())
    }

    /// Whether a peer streams in protocol C (a write completes once that peer has it).
    pub(crate) fn any_sync_stream(&self) -> bool {
        self.state()
            .peers
            .iter()
            .any(|p| p.stream.as_ref().is_some_and(|s| s.opts.sync))
    }
}
