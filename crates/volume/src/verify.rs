//! Checksummed resync and online verify, on a peer's stream. Both send the peer one
//! checksum per block instead of the data (`OpKind::Resync { check: true }`), numbered in
//! the stream like any write, so the peer compares at the right point of the write order.
//! The peer answers with the blocks that differ before it acknowledges the comparison;
//! [`Replication::resend`] numbers those again as data, so they stay in the bitmap until
//! the data is durable there. An online verify walks the whole volume this way, in disk
//! order, after resync and queued writes; the blocks it compares are not out of sync (a
//! verify that breaks off leaves the bitmap as it was).

use crate::meta::Result;
use crate::peer::{number_resync, Op, OpKind, Replication};

impl Replication {
    /// The peer in `slot` found blocks `first..=last` different from what a checksum of
    /// this node's said: send them as data (numbered now, at the head of the queue).
    /// Returns the blocks resent; 0 when the stream `epoch` is over.
    pub fn resend(&self, slot: u32, epoch: u64, first: u64, last: u64) -> Result<u64> {
        let geo = self.geometry();
        if first > last || last >= geo.blocks {
            return Err(crate::Error::invalid(
                &self.inner.path,
                format!(
                    "blocks {first}..={last} to resend are outside the volume's {}",
                    geo.blocks
                ),
            ));
        }
        let per_op = ((1 << 20) / u64::from(geo.block_size)).max(1);
        let mut st = self.inner.state();
        let Some(p) = st.peer_mut(slot) else {
            return Err(self.no_slot(slot));
        };
        if p.stream.as_ref().is_none_or(|s| s.epoch != epoch) {
            return Ok(0);
        }
        p.bits.set_range(first, last);
        let mut at = first;
        while at <= last {
            let end = (at + per_op - 1).min(last);
            let op = number_resync(p, &geo, at, end, false);
            if let Some(s) = p.stream.as_mut() {
                s.outbox.push_back(op);
            }
            at = end + 1;
        }
        let n = last - first + 1;
        p.status.mismatched_blocks += n;
        if let Some(s) = p.stream.as_ref() {
            (s.wake)();
        }
        Ok(n)
    }

    /// Start an online verify of the whole volume against the peer in `slot` (which must
    /// be streaming from this node); one already under way starts over.
    pub fn start_verify(&self, slot: u32) -> Result<()> {
        let mut st = self.inner.state();
        let Some(p) = st.peer_mut(slot) else {
            return Err(self.no_slot(slot));
        };
        let Some(s) = p.stream.as_ref() else {
            return Err(crate::Error::invalid(
                &self.inner.path,
                "does not stream to that peer now: a verify runs on a connected link from the primary",
            ));
        };
        p.verify = Some(0);
        p.status.verify_position = Some(0);
        (s.wake)();
        Ok(())
    }

    /// The next range of an online verify (up to `max_len` bytes) as a checksum
    /// operation, or None when no verify is under way or the stream is at its lag bound.
    pub fn next_verify(&self, slot: u32, epoch: u64, max_len: u64) -> Option<Op> {
        let geo = self.geometry();
        let bs = u64::from(geo.block_size);
        let mut st = self.inner.state();
        let p = st.peer_mut(slot)?;
        let first = p.verify?;
        let s = p.stream.as_mut().filter(|s| s.epoch == epoch)?;
        if s.lag_bytes >= s.opts.max_lag {
            return None;
        }
        let last = (first + (max_len / bs).max(1) - 1).min(geo.blocks - 1);
        let offset = first * bs;
        let length = ((last + 1) * bs).min(geo.size) - offset;
        // Not out of sync: nothing to clear when it is durable.
        let seq = s.number(length, None);
        p.status.verified_bytes += length;
        if last + 1 >= geo.blocks {
            p.verify = None;
            p.status.verify_position = None;
        } else {
            p.verify = Some(last + 1);
            p.status.verify_position = Some((last + 1) * bs);
        }
        Some(Op {
            seq,
            offset,
            length,
            kind: OpKind::Resync { check: true },
            fua: false,
            wid: 0,
        })
    }
}
