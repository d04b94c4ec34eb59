//! An open metadata file: the [`Meta`] handle (mark, flush, status, close) and the state it
//! shares with its [`Tracker`](crate::Tracker).
//!
//! Two locks, always taken in this order:
//! - `io` is held for every write to the metadata file (AL transactions, bitmap pages,
//!   superblock), so that the order of those writes is the order of the decisions behind
//!   them: a `mark()` cannot interleave with an eviction, a flush cannot write a page
//!   cleared by a mark before the mark's superblock is durable;
//! - `state` guards the in-memory bitmap, the AL table and the counters; it is held only
//!   briefly and never across I/O, so writes to hot extents (the common case) only ever
//!   wait for it, not for the disk.
//!
//! A failed metadata write leaves the file as the last successful write made it (still a
//! consistent, recoverable state) and makes every later write fail: tracking can no longer
//! be trusted, and an untracked write is worse than a refused one.

use crate::al::ActivityLog;
use crate::bitmap::{Bitmap, Snapshot};
use crate::disk::Disk;
use crate::error::Error;
use crate::layout::{Geometry, PAGE, SUPERBLOCK_COPIES};
use crate::peer::{PeerStatus, PeerTrack, Replication};
use crate::superblock::{Superblock, HISTORY, SLOT_HISTORY};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, Error>;

/// What `open` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The last shutdown was a `close()`: the on-disk bitmap was complete and the AL was
    /// not needed.
    pub last_shutdown_clean: bool,
    /// Extents named by the AL and marked dirty (0 after a clean shutdown).
    pub recovered_extents: usize,
    /// Blocks that recovery newly marked dirty (not already set in the on-disk bitmap).
    pub recovered_blocks: u64,
    /// Valid AL transactions of the last epoch.
    pub al_transactions: usize,
    /// The superblock copy used (0 or 1).
    pub superblock_copy: usize,
    /// Why the other copy was unusable, if it was not merely older (torn or damaged).
    pub damaged_copy: Option<String>,
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Writes (WRITE, WRITE_ZEROES, TRIM) admitted by `before_write`.
    pub writes: u64,
    pub bytes_written: u64,
    /// NBD flushes seen.
    pub flushes: u64,
    /// Writes spanning too many extents for the AL, whose bits were written to the
    /// on-disk bitmap before the write instead.
    pub write_throughs: u64,
    /// Times a write waited because every AL slot had writes in flight.
    pub al_waits: u64,
    /// Bitmap pages written.
    pub bitmap_pages_written: u64,
    /// Metadata `fdatasync`s.
    pub syncs: u64,
}

/// The activity log's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlStatus {
    pub hot_extents: usize,
    pub capacity: u32,
    /// Hot extents with writes in flight.
    pub pinned: usize,
    /// Transactions written since open.
    pub transactions: u64,
    pub evictions: u64,
    pub next_seq: u64,
    pub ring: u32,
}

/// What `status()` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub path: PathBuf,
    pub volume_id: String,
    pub node_id: u32,
    pub size: u64,
    pub block_size: u32,
    /// Blocks written since the last mark (the live bitmap of slot 0).
    pub dirty_blocks: u64,
    pub dirty_bytes: u64,
    pub current_gen: u64,
    /// The generation slot 0's bitmap is relative to.
    pub bitmap_gen: u64,
    pub history: [u64; HISTORY],
    pub marks: u64,
    pub counters: Counters,
    pub al: AlStatus,
    /// Bitmap pages changed in memory and not yet written.
    pub unpersisted_pages: u64,
    /// The on-disk clean flag (false while open: set by `close()`).
    pub clean_flag: bool,
    pub last_shutdown_clean: bool,
    /// Why tracking stopped, after a failed metadata write.
    pub failed: Option<String>,
    pub closed: bool,
    /// The node's role: primary (exports read-write) or secondary.
    pub primary: bool,
    /// The data may be incomplete (a resync into it has not finished).
    pub inconsistent: bool,
    /// The data is consistent but older than the primary's (it pulled ahead).
    pub outdated: bool,
    /// Replication peers, by slot.
    pub peers: Vec<PeerStatus>,
}

/// The superblock as `io` holds it.
pub(crate) struct Io {
    pub sb: Superblock,
    pub last_persist: Instant,
}

/// What `state` guards.
pub(crate) struct State {
    pub bits: Bitmap,
    /// Replication peers' slots (`peer.rs`), in slot order.
    pub peers: Vec<PeerTrack>,
    /// Ranges of writes waiting to be admitted while peers are attached: with
    /// `inflight`, what a new write must not overlap (see `Tracker::admit`).
    pub claimed: Vec<(u64, u64)>,
    /// A peer lost its stream while this node may write: the next write makes a new
    /// current generation id first (see `peer.rs`, "Generation ids").
    pub rotate: bool,
    /// The last application write id given (see `peer_acks.rs`); counts from 0 at open.
    pub wid: u64,
    pub al: ActivityLog,
    /// Writes between `before_write` and `after_write`, by (offset, length): a `mark()`
    /// marks them dirty again in the new generation (see `mark`).
    pub inflight: HashMap<(u64, u64), u32>,
    pub closed: bool,
    pub failed: Option<String>,
    pub counters: Counters,
    /// The superblock as last written, for `status()` (which must not wait for `io`
    /// while a write holds it for an `fdatasync`, or for a free AL slot).
    pub sb: Superblock,
}

impl State {
    /// The peer in `slot`.
    pub(crate) fn peer(&self, slot: u32) -> Option<&PeerTrack> {
        self.peers.iter().find(|p| p.slot == slot)
    }

    /// The peer in `slot`, to change.
    pub(crate) fn peer_mut(&mut self, slot: u32) -> Option<&mut PeerTrack> {
        self.peers.iter_mut().find(|p| p.slot == slot)
    }
}

pub(crate) struct Inner {
    pub path: PathBuf,
    pub geo: Geometry,
    pub volume_id: [u8; 16],
    disk: Box<dyn Disk>,
    /// The file whose `flock` says the metadata is in use (released by `close`).
    lock: File,
    io: Mutex<Io>,
    state: Mutex<State>,
    /// Signalled when a write finishes (an AL slot may be free, in-flight writes drain).
    pub done: Condvar,
    /// Signalled when a peer acknowledges, or its stream ends (protocol C writers wait).
    pub acked: Condvar,
    pub report: OpenReport,
    /// Writes spanning more extents than this bypass the AL (write-through).
    pub write_through_above: u32,
}

pub(crate) fn uuid(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A fresh generation id: random, never 0 ("none").
pub(crate) fn new_gen() -> u64 {
    loop {
        let g: u64 = rand::random();
        if g != 0 {
            return g;
        }
    }
}

impl Inner {
    pub(crate) fn new(
        path: PathBuf,
        disk: Box<dyn Disk>,
        lock: File,
        sb: Superblock,
        geo: Geometry,
        bits: Bitmap,
        al: ActivityLog,
    ) -> Inner {
        let write_through_above = (crate::al::UPDATES_PER_TRANSACTION as u32)
            .min(geo.al_extents / 2)
            .max(1);
        Inner {
            path,
            geo,
            volume_id: sb.volume_id,
            disk,
            lock,
            io: Mutex::new(Io {
                sb: sb.clone(),
                last_persist: Instant::now(),
            }),
            state: Mutex::new(State {
                sb,
                bits,
                peers: Vec::new(),
                claimed: Vec::new(),
                rotate: false,
                wid: 0,
                al,
                inflight: HashMap::new(),
                closed: false,
                failed: None,
                counters: Counters::default(),
            }),
            done: Condvar::new(),
            acked: Condvar::new(),
            report: OpenReport {
                last_shutdown_clean: true,
                recovered_extents: 0,
                recovered_blocks: 0,
                al_transactions: 0,
                superblock_copy: 0,
                damaged_copy: None,
            },
            write_through_above,
        }
    }

    pub fn io(&self) -> MutexGuard<'_, Io> {
        // A panic while holding `io` may have left a write half-decided: stop tracking.
        match self.io.lock() {
            Ok(g) => g,
            Err(p) => {
                self.state().failed.get_or_insert_with(|| "a panic".into());
                p.into_inner()
            }
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                g.failed.get_or_insert_with(|| "a panic".into());
                g
            }
        }
    }

    /// Wait on `done` (releasing `state`).
    pub fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        match self.done.wait(g) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether writes may be tracked.
    pub fn usable(&self, st: &State) -> Result<()> {
        if let Some(why) = &st.failed {
            return Err(Error::Failed {
                path: self.path.clone(),
                why: why.clone(),
            });
        }
        if st.closed {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Record a failed metadata write and return it as an error.
    fn fail(&self, what: &'static str, e: io::Error) -> Error {
        let err = Error::io(&self.path, what, e);
        self.state().failed.get_or_insert_with(|| err.to_string());
        tracing::error!("{err}; refusing writes to the volume from now on");
        err
    }

    fn write(&self, _io: &Io, buf: &[u8], at: u64, what: &'static str) -> Result<()> {
        self.disk.write_at(buf, at).map_err(|e| self.fail(what, e))
    }

    pub fn sync(&self, _io: &Io) -> Result<()> {
        self.disk
            .sync()
            .map_err(|e| self.fail("fdatasync of the metadata", e))?;
        self.state().counters.syncs += 1;
        Ok(())
    }

    /// Write the next superblock copy and make it durable.
    pub fn write_superblock(&self, io: &mut Io) -> Result<()> {
        io.sb.seq += 1;
        let at = SUPERBLOCK_COPIES[io.sb.copy_index()];
        let image = io.sb.encode();
        self.write(io, &image, at, "superblock write")?;
        self.sync(io)?;
        self.state().sb = io.sb.clone();
        Ok(())
    }

    /// Write an AL transaction image at its ring position (not synced).
    pub fn write_transaction(&self, io: &Io, seq: u64, image: &[u8]) -> Result<()> {
        let at = self.geo.al_offset + (seq % u64::from(self.geo.al_ring)) * PAGE;
        self.write(io, image, at, "activity log write")
    }

    fn write_page(&self, io: &Io, slot: u32, page: u64, image: &[u8]) -> Result<()> {
        self.write(
            io,
            image,
            self.geo.bitmap_at(slot) + page * PAGE,
            "bitmap write",
        )?;
        self.state().counters.bitmap_pages_written += 1;
        Ok(())
    }

    /// Write every changed bitmap page of every slot (not synced); returns how many.
    pub fn persist_changed(&self, io: &Io) -> Result<u64> {
        let mut n = 0;
        for slot in self.slots() {
            let mut from = 0;
            loop {
                // One page at a time: `state` is never held across the write.
                let next = {
                    let mut st = self.state();
                    with_slot(&mut st, slot, |b| b.take_changed_page(from)).flatten()
                };
                let Some((page, image)) = next else {
                    break;
                };
                self.write_page(io, slot, page, &image)?;
                n += 1;
                from = page + 1;
            }
        }
        Ok(n)
    }

    /// Write the pages holding blocks `first..=last` of every slot if they changed (not
    /// synced).
    pub fn persist_blocks(&self, io: &Io, first: u64, last: u64) -> Result<u64> {
        let mut n = 0;
        for slot in self.slots() {
            for page in Bitmap::page_of(first)..=Bitmap::page_of(last) {
                let image =
                    with_slot(&mut self.state(), slot, |b| b.take_page_if_changed(page)).flatten();
                if let Some(image) = image {
                    self.write_page(io, slot, page, &image)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Write every page of every slot's bitmap, changed or not (not synced).
    pub fn persist_all(&self, io: &Io) -> Result<()> {
        {
            let mut st = self.state();
            let pages = st.bits.pages();
            st.bits.mark_pages_changed(0, pages.saturating_sub(1));
            for p in &mut st.peers {
                p.bits.mark_pages_changed(0, pages.saturating_sub(1));
            }
        }
        self.persist_changed(io).map(|_| ())
    }

    /// The slots tracked: 0 (marks) and the peers'.
    fn slots(&self) -> Vec<u32> {
        let st = self.state();
        std::iter::once(0)
            .chain(st.peers.iter().map(|p| p.slot))
            .collect()
    }
}

/// Run `f` on slot `slot`'s bitmap (None when the slot is not tracked).
fn with_slot<T>(st: &mut State, slot: u32, f: impl FnOnce(&mut Bitmap) -> T) -> Option<T> {
    if slot == 0 {
        return Some(f(&mut st.bits));
    }
    st.peer_mut(slot).map(|p| f(&mut p.bits))
}

/// An open volume metadata file. Made by [`Meta::open`]; the writes it tracks come through
/// its [`Tracker`](crate::Tracker).
///
/// Dropping a `Meta` without [`Meta::close`] is, for the file, a crash: nothing more is
/// written, the next `open` reports an unclean shutdown and marks the AL's extents dirty.
/// (Trackers keep working after the handle is dropped; they share the open file.)
pub struct Meta {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("path", &self.inner.path)
            .field("geometry", &self.inner.geo)
            .finish()
    }
}

impl Meta {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// What `open` found (clean shutdown or recovery).
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.report
    }

    /// Start a new generation: return the blocks written since the previous mark (or since
    /// open of a fresh volume) and continue with a clear live bitmap.
    ///
    /// The guarantee, for a consumer that copies the snapshot's blocks after `mark()`
    /// returns: every block whose latest write could have landed on the backing after
    /// that copy read it is in the live set, so the next pass (the next `mark()`) takes it.
    /// Precisely: the swap happens under the same lock as `before_write`'s marking, so a
    /// write marked before it is in the snapshot and one marked after it in the live set;
    /// and a write marked before it but still in flight (its data may land later) is
    /// marked again in the live set. In particular every write acknowledged before `mark()`
    /// returns is in the snapshot or in the live set.
    ///
    /// On disk the new generation ids (current, slot 0's bitmap id; the old ones pushed to
    /// the histories) are durable before this returns, and before any bitmap page that
    /// the mark cleared can be written. The snapshot itself lives only in memory: after a
    /// crash the metadata says "changes since `to_gen`", so a consumer that had not
    /// finished copying the snapshot sees that its peer's generation is neither and falls
    /// back to a full copy.
    pub fn mark(&self) -> Result<Snapshot> {
        let inner = &*self.inner;
        let mut io = inner.io();
        let old = {
            let mut st = inner.state();
            inner.usable(&st)?;
            let old = st.bits.take();
            let again: Vec<(u64, u64)> = st.inflight.keys().copied().collect();
            for (offset, length) in again {
                let (first, last) = inner.geo.block_range(offset, length);
                st.bits.set_range(first, last);
            }
            old
        };
        let sb = &mut io.sb;
        let from_gen = sb.slots[0].bitmap_gen;
        let to_gen = new_gen();
        // Marks are slot 0's own generations: the volume's current id (what replication
        // peers compare on connect) does not change with them.
        let slot = &mut sb.slots[0];
        slot.history.copy_within(0..SLOT_HISTORY - 1, 1);
        slot.history[0] = slot.bitmap_gen;
        slot.bitmap_gen = to_gen;
        sb.marks += 1;
        inner.write_superblock(&mut io)?;
        Ok(Snapshot {
            bits: old,
            geo: inner.geo,
            from_gen,
            to_gen,
        })
    }

    /// The handle the replication link drives this volume's peers with.
    pub fn replication(&self) -> Replication {
        Replication {
            inner: self.inner.clone(),
        }
    }

    /// Make this node primary or secondary (persisted). The daemon checks what may be
    /// promoted; this only records it.
    pub fn set_role(&self, primary: bool) -> Result<()> {
        let mut io = self.inner.io();
        self.inner.usable(&self.inner.state())?;
        io.sb.set_flag(crate::superblock::FLAG_PRIMARY, primary);
        self.inner.write_superblock(&mut io)
    }

    /// Record whether the data may be incomplete (a resync into it is under way).
    /// Clearing it also ends "seeded": the data is the peer's now.
    pub fn set_inconsistent(&self, inconsistent: bool) -> Result<()> {
        self.inner.set_inconsistent(inconsistent)
    }

    /// Record whether the primary went ahead of this node's data (pull-ahead).
    pub fn set_outdated(&self, outdated: bool) -> Result<()> {
        self.inner.set_outdated(outdated)
    }

    /// A snapshot of this volume from [`Snapshot::to_bytes`] (a consumer's saved copy of
    /// what it still owes a peer), with the current bitmap generation as both ids; None
    /// when the bytes are not one bit per block.
    pub fn snapshot_from_bytes(&self, bytes: &[u8]) -> Option<Snapshot> {
        let geo = self.inner.geo;
        let bits = crate::bitmap::Bitmap::from_bytes(geo.blocks, bytes)?;
        let gen = self.status().bitmap_gen;
        Some(Snapshot {
            bits,
            geo,
            from_gen: gen,
            to_gen: gen,
        })
    }

    /// Persist the bitmap pages changed since they were last written (one `fdatasync`
    /// when there were any); returns how many. Never needed for crash safety (the AL
    /// covers what the on-disk bitmap lacks), it persists what a `mark()` cleared and
    /// keeps the next crash's recovery close to the truth.
    pub fn flush(&self) -> Result<u64> {
        self.inner.flush(None)
    }

    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Stop tracking: refuse new writes, wait for those in flight, write the whole bitmap,
    /// set the clean flag, and release the lock on the file. After a failed metadata write
    /// the clean flag is not set (the next open recovers from the AL) and the failure is
    /// returned.
    pub fn close(self) -> Result<()> {
        let inner = &*self.inner;
        {
            let mut st = inner.state();
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            st.al.clear_wanted();
            // Not holding `io`: a wide write in flight needs it to finish (or to learn
            // that the metadata is closed and give up).
            while !st.inflight.is_empty() {
                st = inner.wait(st);
            }
            if let Some(why) = &st.failed {
                return Err(Error::Failed {
                    path: inner.path.clone(),
                    why: why.clone(),
                });
            }
        }
        let mut io = inner.io();
        inner.persist_all(&io)?;
        inner.sync(&io)?;
        io.sb.set_clean(true);
        inner.write_superblock(&mut io)?;
        // Closing the file would release it too, but a Tracker may keep it open.
        let _ = rustix::fs::flock(&inner.lock, rustix::fs::FlockOperation::Unlock);
        Ok(())
    }
}

impl Inner {
    /// Record that the primary went ahead of this node's data (or that it caught up).
    pub(crate) fn set_outdated(&self, outdated: bool) -> Result<()> {
        let mut io = self.io();
        self.usable(&self.state())?;
        if io.sb.outdated() == outdated {
            return Ok(());
        }
        io.sb.set_flag(crate::superblock::FLAG_OUTDATED, outdated);
        self.write_superblock(&mut io)
    }

    pub(crate) fn set_inconsistent(&self, inconsistent: bool) -> Result<()> {
        let mut io = self.io();
        self.usable(&self.state())?;
        if io.sb.inconsistent() == inconsistent && (inconsistent || !io.sb.seeded()) {
            return Ok(());
        }
        io.sb
            .set_flag(crate::superblock::FLAG_INCONSISTENT, inconsistent);
        if !inconsistent {
            io.sb.set_flag(crate::superblock::FLAG_SEEDED, false);
        }
        self.write_superblock(&mut io)
    }

    /// Persist the changed bitmap pages, unless `due` is given and less than that has
    /// passed since the last time.
    pub fn flush(&self, due: Option<Duration>) -> Result<u64> {
        let mut io = self.io();
        self.usable(&self.state())?;
        if due.is_some_and(|d| io.last_persist.elapsed() < d) {
            return Ok(0);
        }
        let n = self.persist_changed(&io)?;
        if n > 0 {
            self.sync(&io)?;
        }
        io.last_persist = Instant::now();
        Ok(n)
    }

    pub fn status(&self) -> Status {
        let st = self.state();
        let sb = &st.sb;
        Status {
            path: self.path.clone(),
            volume_id: uuid(&sb.volume_id),
            node_id: sb.node_id,
            size: self.geo.size,
            block_size: self.geo.block_size,
            dirty_blocks: st.bits.count(),
            dirty_bytes: self.geo.bytes_of(st.bits.count(), st.bits.last_set()),
            current_gen: sb.current_gen,
            bitmap_gen: sb.slots[0].bitmap_gen,
            history: sb.history,
            marks: sb.marks,
            counters: st.counters,
            al: AlStatus {
                hot_extents: st.al.hot(),
                capacity: st.al.capacity(),
                pinned: st.al.pinned(),
                transactions: st.al.transactions,
                evictions: st.al.evictions,
                next_seq: st.al.next_seq,
                ring: self.geo.al_ring,
            },
            unpersisted_pages: st.bits.changed_pages(),
            clean_flag: sb.clean(),
            last_shutdown_clean: self.report.last_shutdown_clean,
            failed: st.failed.clone(),
            closed: st.closed,
            primary: sb.primary(),
            inconsistent: sb.inconsistent(),
            outdated: sb.outdated(),
            peers: st
                .peers
                .iter()
                .map(|p| crate::peer::peer_status(self, p))
                .collect(),
        }
    }
}
