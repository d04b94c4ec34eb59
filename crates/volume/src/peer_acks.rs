//! Peer acknowledgements: what a secondary knows its fellow secondaries hold, so that
//! after a failover the new primary resyncs to the others only what they missed.
//!
//! The primary gives every application write an id (`wid`, counted from its open), the
//! same in every peer's stream. It tells each secondary, on their link, for each of its
//! other peers that is wholly in step, an id up to which that peer holds every write and
//! every block ([`Replication::peers_hold`]). A secondary (B) marks each write it applies
//! in its bitmap for every other peer (N), and remembers it as pending; once the primary
//! says N holds it, the mark goes. So B's bitmap for N names what B may hold that N lacks;
//! N's bitmap for B names the reverse; when B and N connect, the union is resynced.
//!
//! Write ids mean something on one link only: when B's link to the primary ends, its
//! pending writes stay marked until a resync with N (DRBD's peer-acks do the same).
//!
//! Older marks: B's bitmap for N also holds marks from before (a new slot is all marked).
//! Once B is in step with the primary (no resync owed to it) and the primary says N holds
//! everything up to id C, B and N differ only by writes in flight: B's pending writes past
//! C, and writes N applied that B has not yet (N keeps those pending for B). B then drops
//! every other mark for N, once per link, and its bitmap id for N returns to "in step".
//!
//! A resync run a secondary applies carries the id of the last write the primary had given
//! when it finished reading the run, and the blocks a write still in progress then may have
//! changed (its bytes may be in the run, its id is not given yet). The secondary keeps
//! those blocks marked until the next operation on them, which is that write (overlapping
//! writes are serialised and numbered in order), whose id then bounds them.

use crate::meta::Result;
use crate::peer::Replication;
use std::collections::{HashMap, HashSet, VecDeque};

/// An operation a secondary applies, as peer acknowledgements see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The primary's write id (for a resync run: the last one given when it was read).
    pub wid: u64,
    pub offset: u64,
    pub length: u64,
    /// Of a resync run: blocks (first, last) a write in progress may have changed while
    /// it was read.
    pub unknown: Vec<(u64, u64)>,
}

/// Blocks a secondary keeps pending per peer at most; past it, the pending writes stay
/// marked until the primary says the peer holds every one of them.
const MAX_PENDING_BLOCKS: usize = 1 << 20;

/// On a secondary, per other peer: the writes applied from the primary that the peer may
/// not hold yet.
#[derive(Default)]
pub(crate) struct Pending {
    /// (write id, first block, last block), in the order applied.
    entries: VecDeque<(u64, u64, u64)>,
    /// Per block, the largest write id of a pending entry naming it.
    latest: HashMap<u64, u64>,
    /// Entries given up to bound memory had ids up to this: their blocks stay marked
    /// until the peer is said to hold this id.
    dropped_upto: u64,
    /// Blocks of a resync run that a write in progress may have changed, which no later
    /// operation touched yet: marked until one does.
    sticky: HashSet<u64>,
    /// The older marks were dropped on this link.
    baseline_done: bool,
}

impl Replication {
    /// On a primary: for each streaming peer that holds every block as of some write id,
    /// (its node id, that id). A peer with a resync owed (blocks in its bitmap that no
    /// queued write fixes, or resync runs not yet durable) is left out.
    pub fn peers_hold(&self) -> Vec<(u32, u64)> {
        let st = self.inner.state();
        st.peers
            .iter()
            .filter_map(|p| {
                let s = p.stream.as_ref()?;
                if s.resyncs > 0 || p.oos_count() > 0 {
                    return None;
                }
                // Every write numbered before the oldest write not yet durable is durable
                // (numbers are cumulative, write ids rise with them).
                let upto = s
                    .numbered
                    .iter()
                    .find_map(|n| n.wid)
                    .map_or(st.wid, |w| w - 1);
                Some((p.node, upto))
            })
            .collect()
    }

    /// For a resync run of `offset..offset + length` just read from the backing: the last
    /// write id given, and the blocks (first, last) of writes in progress on the range
    /// (their bytes may be in the run before they have an id).
    pub fn resync_wid(&self, offset: u64, length: u64) -> (u64, Vec<(u64, u64)>) {
        let bs = u64::from(self.inner.geo.block_size);
        let st = self.inner.state();
        if length == 0 {
            return (st.wid, Vec::new());
        }
        let (first, last) = (offset / bs, (offset + length - 1) / bs);
        let (lo, hi) = (first * bs, (last + 1) * bs);
        let unknown = st
            .inflight
            .keys()
            .chain(st.claimed.iter())
            .filter(|&&(o, l)| l > 0 && o < hi && o + l > lo)
            .map(|&(o, l)| ((o / bs).max(first), ((o + l - 1) / bs).min(last)))
            .collect();
        (st.wid, unknown)
    }

    /// On a secondary, before applying `ops` (write id, offset, length) from the primary
    /// in slot `from`: mark them for every other peer until the primary says that peer
    /// holds them, and take the whole blocks they cover out of this node's bitmap for
    /// the primary. Returns whether a bit was newly set (persist before saying durable:
    /// after a crash of this node the marks must still be there).
    pub fn applying(&self, from: u32, ops: &[Applied]) -> bool {
        let geo = self.inner.geo;
        let bs = u64::from(geo.block_size);
        let mut st = self.inner.state();
        let mut newly = false;
        for p in st.peers.iter_mut() {
            if p.slot == from && p.stream.is_none() {
                // Blocks this node now holds as the primary has them are no longer ones
                // it wrote apart from it (whole blocks only): a resync that keeps
                // breaking off does not get them back from this node's bitmap each time.
                for op in ops {
                    let first = op.offset.div_ceil(bs);
                    let end = op.offset.saturating_add(op.length);
                    let last = if end >= geo.size {
                        geo.blocks
                    } else {
                        end / bs
                    };
                    if last > first {
                        p.clear_marks(first, last - 1);
                    }
                }
                continue;
            }
            if p.slot == from || p.stream.is_some() {
                continue;
            }
            for op in ops {
                if op.length == 0 {
                    continue;
                }
                let (first, last) = (op.offset / bs, (op.offset + op.length - 1) / bs);
                newly |= p.mark(first, last) > 0;
                let pending = p.pending.get_or_insert_with(Pending::default);
                pending.entries.push_back((op.wid, first, last));
                for b in first..=last {
                    // The write in progress when a run was read is the next operation on
                    // its blocks: from here on, this id bounds them.
                    pending.sticky.remove(&b);
                    let w = pending.latest.entry(b).or_insert(op.wid);
                    *w = (*w).max(op.wid);
                }
                for &(f, l) in &op.unknown {
                    pending.sticky.extend(f.max(first)..=l.min(last));
                }
            }
            if let Some(pending) = p.pending.as_mut() {
                if pending.latest.len() > MAX_PENDING_BLOCKS {
                    let most = pending.latest.values().copied().max().unwrap_or(0);
                    pending.dropped_upto = pending.dropped_upto.max(most);
                    pending.entries.clear();
                    pending.latest.clear();
                }
            }
        }
        newly
    }

    /// On a secondary: the primary in slot `from` says `node` holds every write up to
    /// `wid`. Its pending writes up to that leave the bitmap; with `in_step` (this node
    /// holds the primary's data, no resync owed to it), so do the older marks, once per
    /// link.
    pub fn peer_holds(&self, from: u32, node: u32, wid: u64, in_step: bool) -> Result<()> {
        let blocks = self.inner.geo.blocks;
        let baseline_slot = {
            let mut st = self.inner.state();
            let Some(p) = st
                .peers
                .iter_mut()
                .find(|p| p.node == node && p.slot != from && p.stream.is_none())
            else {
                return Ok(());
            };
            let pending = p.pending.get_or_insert_with(Pending::default);
            if wid < pending.dropped_upto {
                return Ok(());
            }
            let mut clear = Vec::new();
            while let Some(&(w, first, last)) = pending.entries.front() {
                if w > wid {
                    break;
                }
                pending.entries.pop_front();
                for b in first..=last {
                    if pending.latest.get(&b).is_some_and(|&l| l <= wid) {
                        pending.latest.remove(&b);
                        if !pending.sticky.contains(&b) {
                            clear.push(b);
                        }
                    }
                }
            }
            let baseline = in_step && !pending.baseline_done;
            if baseline {
                pending.baseline_done = true;
                pending.latest.retain(|_, l| *l > wid);
                let keep: Vec<u64> = pending
                    .latest
                    .keys()
                    .chain(pending.sticky.iter())
                    .copied()
                    .collect();
                p.clear_marks(0, blocks.saturating_sub(1));
                for b in keep {
                    p.mark(b, b);
                }
            } else {
                for b in clear {
                    p.clear_marks(b, b);
                }
            }
            baseline.then_some(p.slot)
        };
        if let Some(slot) = baseline_slot {
            // This node and the peer hold the same data but for writes in flight: its
            // bitmap id for the peer returns to "in step" (a later failover then resyncs
            // exactly the bitmap).
            self.in_step(slot)?;
        }
        Ok(())
    }

    /// On a secondary: the link to the primary ended. Its pending writes stay marked
    /// (the write ids of the next primary are another count).
    pub fn end_peer_acks(&self) {
        let mut st = self.inner.state();
        for p in st.peers.iter_mut() {
            p.pending = None;
        }
    }

    /// Write the bitmap pages changed since the last time, and sync them.
    pub fn persist(&self) -> Result<()> {
        self.inner.flush(None).map(|_| ())
    }
}
