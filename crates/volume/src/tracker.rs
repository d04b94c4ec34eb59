//! The write path: [`Tracker`] is the NBD export's [`WriteObserver`] (every write is
//! recorded before it touches the backing) and its `cutover:dirty` [`MetaContext`].
//!
//! `before_write` for a write to extents that are all hot takes one mutex, pins the
//! extents (so they cannot be evicted while the write is in flight) and sets the bits:
//! no I/O. For a cold extent it becomes the writer of the next AL transaction (or waits
//! for the one being written, which takes in every extent other writes are waiting for:
//! one `fdatasync` for a burst of cold writes), evicting the least recently used
//! unpinned extents, whose bits are persisted first. The bits are set before
//! `before_write` returns, so before the data can land.
//!
//! A write spanning more extents than one transaction can bring in (or than half the AL,
//! so that it can never starve for slots) skips the AL: its bits are written to the
//! on-disk bitmap and synced before the write proceeds (large TRIMs and WRITE_ZEROES).
//!
//! `after_write` unpins. `flushed` (after an NBD FLUSH) persists changed bitmap pages at
//! most once per `flush_interval`: crash safety never depends on it (the AL covers what
//! the on-disk bitmap lacks), so a guest that flushes after every write does not pay a
//! second `fdatasync` each time.

use crate::error::Error;
use crate::meta::{Inner, Meta, Result, State, Status};
use crate::peer::Shipped;
use nbd::{Extent, MetaContext, WriteEvent, WriteKind, WriteObserver};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// The metadata context's name.
pub const DIRTY_CONTEXT: &str = "cutover:dirty";
/// Its flag: the block was written since the last mark.
pub const FLAG_DIRTY: u32 = 1;
/// Default for [`Meta::tracker_with`]'s flush interval.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Extents taken into the activity log ahead of a sequential writer (see `admit`): 7 more
/// make one log sync per 32 MiB written in order, and cost a crash's resync at most 28 MiB
/// per writer.
const READ_AHEAD: u64 = 7;

/// Tracks the writes of one volume; hand it to an [`nbd::Export`] as its observer and as a
/// metadata context.
pub struct Tracker {
    inner: Arc<Inner>,
    flush_interval: Duration,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Meta {
    /// The tracker for this volume's export.
    pub fn tracker(&self) -> Arc<Tracker> {
        self.tracker_with(DEFAULT_FLUSH_INTERVAL)
    }

    /// The tracker, persisting the bitmap on NBD FLUSH at most once per `flush_interval`
    /// (zero: on every flush that follows a change).
    pub fn tracker_with(&self, flush_interval: Duration) -> Arc<Tracker> {
        Arc::new(Tracker {
            inner: self.inner.clone(),
            flush_interval,
        })
    }
}

/// A claimed range (see `Tracker::claim`), given back when dropped.
struct Claim<'a> {
    inner: &'a Inner,
    range: (u64, u64),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(i) = st.claimed.iter().position(|r| *r == self.range) {
            st.claimed.swap_remove(i);
        }
        drop(st);
        self.inner.done.notify_all();
    }
}

/// What one write spans.
struct Span {
    offset: u64,
    length: u64,
    blocks: (u64, u64),
    extents: (u32, u32),
    /// Bits go straight to the on-disk bitmap instead of through the AL.
    write_through: bool,
}

impl Tracker {
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    fn span(&self, offset: u64, length: u64) -> Result<Option<Span>> {
        if length == 0 {
            return Ok(None);
        }
        let geo = &self.inner.geo;
        if offset.checked_add(length).is_none_or(|end| end > geo.size) {
            return Err(Error::invalid(
                &self.inner.path,
                format!(
                    "a write of {length} bytes at {offset} goes past the volume's {} bytes",
                    geo.size
                ),
            ));
        }
        let extents = geo.extent_range(offset, length);
        Ok(Some(Span {
            offset,
            length,
            blocks: geo.block_range(offset, length),
            extents,
            write_through: extents.1 - extents.0 >= self.inner.write_through_above,
        }))
    }

    /// Mark the write's blocks and count it in flight (its extents hot, if through the AL).
    fn admit_locked(st: &mut State, s: &Span) {
        if !s.write_through {
            st.al.pin(s.extents.0, s.extents.1);
        }
        st.bits.set_range(s.blocks.0, s.blocks.1);
        for p in &mut st.peers {
            p.bits.set_range(s.blocks.0, s.blocks.1);
        }
        *st.inflight.entry((s.offset, s.length)).or_insert(0) += 1;
        st.counters.writes += 1;
        st.counters.bytes_written += s.length;
    }

    /// Record a write before it happens; returns once it is safe to make.
    pub fn admit(&self, offset: u64, length: u64) -> Result<()> {
        let Some(s) = self.span(offset, length)? else {
            return Ok(());
        };
        // Held until the write is in `inflight` (or refused).
        let _claim = self.claim(&s)?;
        self.inner.before_replicated_write()?;
        if s.write_through {
            return self.admit_through(&s);
        }
        let inner = &*self.inner;
        let (e0, e1) = s.extents;
        {
            let mut st = inner.state();
            inner.usable(&st)?;
            if st.al.all_hot(e0, e1) {
                Self::admit_locked(&mut st, &s);
                return Ok(());
            }
            // Whoever writes the next transaction takes these in too.
            st.al.want(e0, e1);
            // A writer moving forward (the extent before is hot) gets the next extents in
            // the same transaction: a sequential copy then syncs the log once per
            // READ_AHEAD + 1 extents, not once per 4 MiB. An extent brought in early is
            // only marked dirty after a crash, never missed.
            if e0 > 0 && st.al.is_hot(e0 - 1) {
                let end = inner.geo.extents.saturating_sub(1);
                let last = end.min(u64::from(e1) + READ_AHEAD) as u32;
                if last > e1 {
                    st.al.want_ahead(e1 + 1, last);
                }
            }
        }
        let io = inner.io();
        let mut waited = false;
        loop {
            let mut st = inner.state();
            inner.usable(&st)?;
            if st.al.all_hot(e0, e1) {
                Self::admit_locked(&mut st, &s);
                return Ok(());
            }
            let Some(plan) = st.al.plan(e0, e1) else {
                // Every slot has writes in flight: wait for one to finish.
                if !waited {
                    st.counters.al_waits += 1;
                    waited = true;
                }
                drop(inner.wait(st));
                continue;
            };
            drop(st);
            // An evicted extent's bits must be on disk before the transaction that no
            // longer names it: after that, only the bitmap remembers its writes.
            let mut pages = 0;
            for &victim in &plan.evicted {
                let (first, last) = inner.geo.extent_blocks(victim);
                pages += inner.persist_blocks(&io, first, last)?;
            }
            if pages > 0 {
                inner.sync(&io)?;
            }
            if let Some(t) = &plan.transaction {
                inner.write_transaction(&io, t.seq, &t.encode(&inner.volume_id))?;
                inner.sync(&io)?;
            }
            inner.state().al.commit(&plan);
        }
    }

    /// With peers attached, wait until no write in progress overlaps this one, and claim
    /// its range meanwhile: the numbers the peers' stream gives overlapping writes must
    /// follow the order in which they reach the backing (see `peer.rs`).
    fn claim(&self, s: &Span) -> Result<Option<Claim<'_>>> {
        let inner = &*self.inner;
        let mut st = inner.state();
        if !Inner::has_peers(&st) {
            return Ok(None);
        }
        let end = s.offset + s.length;
        loop {
            inner.usable(&st)?;
            let overlaps = st
                .inflight
                .keys()
                .chain(st.claimed.iter())
                .any(|&(o, l)| o < end && o + l > s.offset);
            if !overlaps {
                break;
            }
            st = inner.wait(st);
        }
        st.claimed.push((s.offset, s.length));
        Ok(Some(Claim {
            inner,
            range: (s.offset, s.length),
        }))
    }

    /// A write too wide for the AL: its bits reach the on-disk bitmap before it proceeds.
    fn admit_through(&self, s: &Span) -> Result<()> {
        let inner = &*self.inner;
        {
            let mut st = inner.state();
            inner.usable(&st)?;
            Self::admit_locked(&mut st, s);
            st.counters.write_throughs += 1;
        }
        let persisted = (|| {
            let io = inner.io();
            inner.usable(&inner.state())?;
            // A page no longer marked changed was written and synced (under `io`) since
            // the bits were set: nothing left to wait for.
            if inner.persist_blocks(&io, s.blocks.0, s.blocks.1)? > 0 {
                inner.sync(&io)?;
            }
            Ok(())
        })();
        if persisted.is_err() {
            // The write will not be made (and `after_write` will not come).
            self.release(s.offset, s.length);
        }
        persisted
    }

    /// The write is over (made or failed): unpin its extents.
    pub fn release(&self, offset: u64, length: u64) {
        self.release_shipping(offset, length, None);
    }

    /// Release the write, first numbering it for the streaming peers (`ship`: it was
    /// made) or marking it out of sync for every peer (None). Returns what a protocol C
    /// writer waits for.
    fn release_shipping(
        &self,
        offset: u64,
        length: u64,
        ship: Option<&Shipped<'_>>,
    ) -> Vec<(u32, u64, u64)> {
        let Ok(Some(s)) = self.span(offset, length) else {
            return Vec::new();
        };
        let inner = &*self.inner;
        let mut st = inner.state();
        match st.inflight.get_mut(&(offset, length)) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                st.inflight.remove(&(offset, length));
            }
            // Never admitted.
            None => return Vec::new(),
        }
        let waits = match ship {
            Some(w) => crate::peer::ship_locked(&mut st, w),
            None => {
                for p in &mut st.peers {
                    p.mark(s.blocks.0, s.blocks.1);
                }
                Vec::new()
            }
        };
        if !s.write_through {
            st.al.unpin(s.extents.0, s.extents.1);
        }
        drop(st);
        inner.done.notify_all();
        waits
    }

    /// Dirty/clean runs of `offset..offset + length` (within the volume), at most `max`.
    pub fn dirty_runs(&self, offset: u64, length: u64, max: usize) -> Vec<(u64, bool)> {
        let geo = &self.inner.geo;
        let bs = u64::from(geo.block_size);
        let end = offset.saturating_add(length).min(geo.size);
        let limit = end.div_ceil(bs);
        let st = self.inner.state();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let bit = pos / bs;
            let dirty = st.bits.get(bit);
            let stop = (st.bits.next(bit, limit, !dirty) * bs).min(end);
            out.push((stop - pos, dirty));
            pos = stop;
        }
        out
    }
}

impl WriteObserver for Tracker {
    fn before_write(&self, write: &WriteEvent<'_>) -> io::Result<()> {
        Ok(self.admit(write.offset, write.length)?)
    }

    fn after_write(&self, write: &WriteEvent<'_>, outcome: &io::Result<()>) {
        let inner = &*self.inner;
        if outcome.is_err() || !inner.any_streaming() {
            // A failed write may still have changed some of the range: its bits stay set
            // (and every peer gets them to resync).
            self.release_shipping(write.offset, write.length, None);
            return;
        }
        // Protocol A's bound: at `max_lag`, the writer waits (still holding its range).
        inner.wait_for_room();
        let data = match (write.kind, write.data) {
            (WriteKind::Data, Some(d)) => Some(crate::peer::data_pieces(d)),
            _ => None,
        };
        let Ok(Some(span)) = self.span(write.offset, write.length) else {
            return;
        };
        let ship = Shipped {
            offset: write.offset,
            length: write.length,
            blocks: span.blocks,
            kind: write.kind,
            data: data.as_deref(),
            fua: write.fua,
            block_size: u64::from(inner.geo.block_size),
        };
        let waits = self.release_shipping(write.offset, write.length, Some(&ship));
        for (slot, epoch, seq) in waits {
            inner.wait_acked(slot, epoch, seq, write.fua);
        }
    }

    fn may_answer_early(&self) -> bool {
        // Protocol C: the reply waits for the peer (in `after_write`).
        !self.inner.any_sync_stream()
    }

    fn flushed(&self) -> io::Result<()> {
        let inner = &*self.inner;
        let waits = {
            let mut st = inner.state();
            st.counters.flushes += 1;
            crate::peer::Replication::flush_locked(&mut st)
        };
        inner.flush(Some(self.flush_interval))?;
        // Protocol C: the flush is complete when everything before it is durable on the
        // peers too.
        for (slot, epoch, seq) in waits {
            inner.wait_acked(slot, epoch, seq, true);
        }
        Ok(())
    }
}

impl MetaContext for Tracker {
    fn name(&self) -> &str {
        DIRTY_CONTEXT
    }

    fn extents(&self, offset: u64, length: u32, max: usize) -> io::Result<Vec<Extent>> {
        Ok(self
            .dirty_runs(offset, u64::from(length), max)
            .into_iter()
            .map(|(n, dirty)| Extent {
                // At most `length`, a u32.
                length: n as u32,
                flags: if dirty { FLAG_DIRTY } else { 0 },
            })
            .collect())
    }
}
