//! The peer slots themselves: which peers a volume tracks (each in its own slot, with its
//! bitmap and generation ids, kept across restarts), the runs of a slot's bitmap a link
//! sends, and a resync target clearing its bitmap and setting its data's state.

use crate::bitmap::Bitmap;
use crate::error::Error;
use crate::meta::Result;
use crate::peer::{PeerTrack, Replication};

impl crate::Meta {
    /// Track exactly these peers (by node id), each in its own slot; returns their slots
    /// in the same order. A peer seen before keeps its slot, bitmap and ids. A new one
    /// gets a free slot with every block out of sync (nothing is known of what it
    /// holds: a full sync, unless its generation ids prove otherwise on connect). A slot
    /// whose peer is no longer listed is freed: its writes could no longer be tracked.
    pub fn attach_peers(&self, nodes: &[u32]) -> Result<Vec<u32>> {
        let inner = &*self.inner;
        let geo = inner.geo;
        let mut io = inner.io();
        let mut slots = Vec::with_capacity(nodes.len());
        {
            let mut st = inner.state();
            inner.usable(&st)?;
            if !st.inflight.is_empty() {
                return Err(Error::invalid(
                    &inner.path,
                    "has writes in flight; attach peers before exporting",
                ));
            }
            st.peers.retain(|p| nodes.contains(&p.node));
            for entry in io.sb.slots.iter_mut().skip(1) {
                if entry.in_use() && !nodes.contains(&entry.peer_node) {
                    *entry = crate::superblock::PeerSlot::default();
                }
            }
            for &node in nodes {
                if let Some(p) = st.peers.iter().find(|p| p.node == node) {
                    slots.push(p.slot);
                    continue;
                }
                let free = (1..geo.peer_slots).find(|&s| {
                    !io.sb.slots[s as usize].in_use() && !st.peers.iter().any(|p| p.slot == s)
                });
                let Some(slot) = free else {
                    return Err(Error::invalid(
                        &inner.path,
                        format!(
                            "has {} peer slots, too few for {} peers; re-create it with \
                             `cutover volume create-md --force` (it makes one per configured \
                             peer, plus a spare)",
                            geo.peer_slots - 1,
                            nodes.len()
                        ),
                    ));
                };
                io.sb.slots[slot as usize] = crate::superblock::PeerSlot {
                    flags: crate::superblock::SLOT_IN_USE,
                    peer_node: node,
                    bitmap_gen: 0,
                    history: [0; crate::superblock::SLOT_HISTORY],
                };
                let mut p = PeerTrack::new(slot, node, Bitmap::new(geo.blocks));
                p.mark(0, geo.blocks.saturating_sub(1));
                let pos = st.peers.partition_point(|q| q.slot < slot);
                st.peers.insert(pos, p);
                slots.push(slot);
            }
        }
        // No peer streams yet: the first write makes a new current id (see
        // `before_replicated_write`).
        inner.state().rotate = !nodes.is_empty();
        // The new slots' bits reach the disk before the superblock that says they are in
        // use, so a crash between the two never shows a slot with a clean bitmap.
        if inner.persist_changed(&io)? > 0 {
            inner.sync(&io)?;
        }
        inner.write_superblock(&mut io)?;
        Ok(slots)
    }
}

impl Replication {
    /// Runs (first block, count) of the bitmap of `slot`, from block `from`, at most
    /// `max` runs; empty at the end.
    pub fn runs(&self, slot: u32, from: u64, max: usize) -> Vec<(u64, u64)> {
        let blocks = self.inner.geo.blocks;
        let st = self.inner.state();
        let Some(p) = st.peer(slot) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < max {
            let first = p.bits.next(at, blocks, true);
            if first >= blocks {
                break;
            }
            let end = p.bits.next(first, blocks, false);
            out.push((first, end - first));
            at = end;
        }
        out
    }

    /// This node (a resync target) now holds what the peer in `slot` has: its bitmap for
    /// that peer is empty (what this node wrote was overwritten by the resync).
    pub fn clear(&self, slot: u32) -> Result<()> {
        let blocks = self.inner.geo.blocks;
        {
            let mut st = self.inner.state();
            let p = st.peer_mut(slot).ok_or_else(|| self.no_slot(slot))?;
            if p.stream.is_some() {
                return Err(Error::invalid(
                    &self.inner.path,
                    "streams to that peer; only a resync target clears its bitmap",
                ));
            }
            p.clear_marks(0, blocks.saturating_sub(1));
            p.inflight.clear();
        }
        self.inner.flush(None).map(|_| ())
    }

    /// See [`crate::Meta::set_inconsistent`].
    pub fn set_inconsistent(&self, inconsistent: bool) -> Result<()> {
        self.inner.set_inconsistent(inconsistent)
    }

    /// See [`crate::Meta::set_outdated`].
    pub fn set_outdated(&self, outdated: bool) -> Result<()> {
        self.inner.set_outdated(outdated)
    }
}
