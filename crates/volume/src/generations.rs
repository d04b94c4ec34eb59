//! Generation ids and roles on the replication side: the ids a node tells a peer on
//! connect (DRBD's table, see the replica crate's `decide`), a new current id at a
//! primary's first write without a peer, "in step" when a peer holds everything, and a
//! resync target taking the source's id.

use crate::error::Error;
use crate::meta::{Inner, Result};
use crate::peer::Replication;

/// A node's generation ids and state, as it tells a peer on connect (DRBD's table, see
/// the replication crate's `decide`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    /// The volume's current id: changes when a primary first writes without a peer.
    pub current: u64,
    /// Earlier current ids, newest first.
    pub history: [u64; crate::superblock::HISTORY],
    /// The slot's bitmap id: the current id both sides shared when the slot's bitmap
    /// started collecting what the peer lacks (0 while in step).
    pub bitmap: u64,
    /// The slot's earlier bitmap ids.
    pub bitmap_history: [u64; crate::superblock::SLOT_HISTORY],
    pub primary: bool,
    pub inconsistent: bool,
    /// Inconsistent, but a copy of the peer's data made beforehand.
    pub seeded: bool,
    /// Consistent but older than the primary's (it pulled ahead).
    pub outdated: bool,
}

impl Replication {
    /// This node's ids as seen from the peer in `slot`.
    pub fn generations(&self, slot: u32) -> Generations {
        let st = self.inner.state();
        let sb = &st.sb;
        let entry = sb.slots.get(slot as usize).copied().unwrap_or_default();
        Generations {
            current: sb.current_gen,
            history: sb.history,
            bitmap: entry.bitmap_gen,
            bitmap_history: entry.history,
            primary: sb.primary(),
            inconsistent: sb.inconsistent(),
            seeded: sb.seeded(),
            outdated: sb.outdated(),
        }
    }

    /// The peer in `slot` holds everything this node wrote (its resync ended): the
    /// slot's bitmap id returns to 0, "in step", so the next loss of the peer starts a
    /// new one.
    pub fn in_step(&self, slot: u32) -> Result<()> {
        let inner = &*self.inner;
        let mut io = inner.io();
        inner.usable(&inner.state())?;
        let Some(entry) = io.sb.slots.get_mut(slot as usize) else {
            return Err(self.no_slot(slot));
        };
        if entry.bitmap_gen == 0 {
            return Ok(());
        }
        entry
            .history
            .copy_within(0..crate::superblock::SLOT_HISTORY - 1, 1);
        entry.history[0] = entry.bitmap_gen;
        entry.bitmap_gen = 0;
        inner.write_superblock(&mut io)
    }

    /// A resync into this node from a source at generation `source` begins: the data is
    /// inconsistent until it ends, and the slot's bitmap id notes `source`, so that a link
    /// that breaks off goes on with the rest instead of starting over.
    pub fn resyncing_from(&self, slot: u32, source: u64) -> Result<()> {
        let inner = &*self.inner;
        let mut io = inner.io();
        inner.usable(&inner.state())?;
        let was_inconsistent = io.sb.inconsistent();
        let Some(entry) = io.sb.slots.get_mut(slot as usize) else {
            return Err(self.no_slot(slot));
        };
        let before = (entry.bitmap_gen, was_inconsistent);
        if entry.bitmap_gen != source {
            if entry.bitmap_gen != 0 {
                entry
                    .history
                    .copy_within(0..crate::superblock::SLOT_HISTORY - 1, 1);
                entry.history[0] = entry.bitmap_gen;
            }
            entry.bitmap_gen = source;
        }
        io.sb.set_flag(crate::superblock::FLAG_INCONSISTENT, true);
        if before == (source, true) {
            return Ok(());
        }
        inner.write_superblock(&mut io)
    }

    /// This node (a resync target) now holds the source's data at generation `current`:
    /// take that id and clear the inconsistent flag.
    pub fn adopt(&self, current: u64) -> Result<()> {
        let inner = &*self.inner;
        let mut io = inner.io();
        inner.usable(&inner.state())?;
        let sb = &mut io.sb;
        if sb.current_gen != current {
            sb.history.copy_within(0..crate::superblock::HISTORY - 1, 1);
            sb.history[0] = sb.current_gen;
            sb.current_gen = current;
        }
        sb.set_flag(crate::superblock::FLAG_INCONSISTENT, false);
        sb.set_flag(crate::superblock::FLAG_SEEDED, false);
        sb.set_flag(crate::superblock::FLAG_OUTDATED, false);
        // Every slot still collecting since an older id is relative to data this node no
        // longer has: it stays marked (a superset), the ids say "since then".
        inner.write_superblock(&mut io)
    }
}

impl Inner {
    /// Before a write: a secondary with peers refuses it; a primary that lost a peer
    /// since its last write makes a new current id first, keeping the old one as that
    /// peer's bitmap id. On the peer's return, "its current is my bitmap id" then means
    /// "it lacks exactly my bitmap", and "both bitmap ids equal but the currents differ"
    /// means both sides wrote while apart (split brain).
    pub(crate) fn before_replicated_write(&self) -> Result<()> {
        {
            let st = self.state();
            if st.peers.is_empty() {
                return Ok(());
            }
            if !st.sb.primary() {
                return Err(Error::Secondary {
                    path: self.path.clone(),
                });
            }
            if !st.rotate {
                return Ok(());
            }
        }
        let mut io = self.io();
        let mut st = self.state();
        self.usable(&st)?;
        if !st.rotate {
            return Ok(());
        }
        let apart: Vec<u32> = st
            .peers
            .iter()
            .filter(|p| p.stream.is_none())
            .map(|p| p.slot)
            .collect();
        st.rotate = false;
        drop(st);
        let sb = &mut io.sb;
        let mut changed = false;
        for slot in apart {
            let entry = &mut sb.slots[slot as usize];
            if entry.bitmap_gen == 0 {
                entry.bitmap_gen = sb.current_gen;
                changed = true;
            }
        }
        if changed {
            sb.history.copy_within(0..crate::superblock::HISTORY - 1, 1);
            sb.history[0] = sb.current_gen;
            sb.current_gen = crate::meta::new_gen();
            if let Err(e) = self.write_superblock(&mut io) {
                self.state().rotate = true;
                return Err(e);
            }
        }
        Ok(())
    }
}
