//! What happens when two nodes connect: DRBD's generation-id table, computed by each end
//! from its own state and the peer's, so both reach the same verdict without another
//! round trip.
//!
//! Ids (see the volume crate): `current` changes when a primary first writes without
//! the peer, the old id becoming that peer's `bitmap` id. So, with S the primary's state
//! and T the other's:
//!
//! | condition | verdict |
//! |---|---|
//! | neither is primary | nothing to do (connected, idle) |
//! | both are primary | refused: one must be made secondary |
//! | sizes or block sizes differ | refused |
//! | T.current = S.current | resync the union of both bitmaps (usually empty) |
//! | S.bitmap = T.current | S wrote since they parted: resync S's bitmap (∪ T's) |
//! | T.bitmap = S.current | T wrote, the primary did not: refused (make T primary, or discard T's writes) |
//! | S.bitmap = T.bitmap ≠ 0 | both wrote since they parted: split brain, refused |
//! | T is inconsistent, or T.current is in S's history | full resync from S |
//! | otherwise | unrelated data: refused |

use crate::wire::NodeState;

/// The verdict, from one end's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Connected; neither side writes, nothing travels.
    Idle,
    /// This end is the source: resync its bitmap ∪ the peer's (`full`: every block).
    Source { full: bool },
    /// This end is the target.
    Target { full: bool },
    /// The link must not go on; the sentence says why and what to do.
    Refuse(String),
}

/// The verdict for `me` meeting `peer` (`peer_name` for the messages).
pub fn decide(me: &NodeState, peer: &NodeState, peer_name: &str) -> Verdict {
    if me.size != peer.size || me.block_size != peer.block_size {
        return Verdict::Refuse(format!(
            "peer {peer_name} has a volume of {} bytes in {} byte blocks, this node {} in {}; \
             both must be the same size (re-create the metadata with the same block size)",
            peer.size, peer.block_size, me.size, me.block_size
        ));
    }
    let (source, target, i_am_source) = match (me.primary, peer.primary) {
        (false, false) => return Verdict::Idle,
        (true, true) => {
            return Verdict::Refuse(format!(
                "this node and peer {peer_name} are both primary; make one secondary \
                 (`cutover volume secondary NAME` on it)"
            ))
        }
        (true, false) => (me, peer, true),
        (false, true) => (peer, me, false),
    };
    let (source_name, target_name) = if i_am_source {
        ("this node", format!("peer {peer_name}"))
    } else {
        ("the primary", "this node".to_string())
    };
    let resync = |full| {
        if i_am_source {
            Verdict::Source { full }
        } else {
            Verdict::Target { full }
        }
    };
    if source.inconsistent {
        return Verdict::Refuse(format!(
            "{source_name} is primary but its data is inconsistent (a resync into it did not \
             finish); finish it first, or promote with --force to take its data as it is"
        ));
    }
    if target.current == source.current {
        return resync(false);
    }
    if source.bitmap != 0 && source.bitmap == target.current {
        return resync(false);
    }
    if target.bitmap != 0 && target.bitmap == source.current {
        return Verdict::Refuse(format!(
            "{target_name} wrote {} block(s) while apart and {source_name} (primary) has \
             nothing newer; make {target_name} primary to keep them, or run `cutover volume \
             connect NAME --discard-my-data` on it to take {source_name}'s data",
            target.out_of_sync_blocks
        ));
    }
    if source.bitmap != 0 && source.bitmap == target.bitmap {
        return Verdict::Refuse(format!(
            "split brain: {source_name} wrote {} block(s) and {target_name} wrote {} block(s) \
             since they parted; run `cutover volume connect NAME --discard-my-data` on the \
             node whose writes are to be discarded",
            source.out_of_sync_blocks, target.out_of_sync_blocks
        ));
    }
    if target.inconsistent
        || source.history.contains(&target.current)
        || source.bitmap_history.contains(&target.current)
    {
        return resync(true);
    }
    Verdict::Refuse(format!(
        "{target_name} and {source_name} hold unrelated data (no generation in common); \
         re-create the secondary's metadata (`cutover volume create-md --force`) to take a \
         full sync"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(current: u64, bitmap: u64, primary: bool) -> NodeState {
        NodeState {
            version: crate::wire::LINK_VERSION,
            size: 1 << 30,
            block_size: 16384,
            current,
            history: vec![0; 4],
            bitmap,
            bitmap_history: vec![0; 2],
            primary,
            inconsistent: false,
            out_of_sync_blocks: 3,
        }
    }

    /// Both ends' verdicts.
    fn both(a: &NodeState, b: &NodeState) -> (Verdict, Verdict) {
        (decide(a, b, "b"), decide(b, a, "a"))
    }

    fn refused(v: &Verdict, words: &[&str]) {
        let Verdict::Refuse(why) = v else {
            panic!("{v:?}")
        };
        for w in words {
            assert!(why.contains(w), "{why:?} lacks {w:?}");
        }
    }

    #[test]
    fn every_row_of_the_table() {
        // Neither primary: idle.
        assert_eq!(
            both(&node(1, 0, false), &node(2, 0, false)).0,
            Verdict::Idle
        );
        // Both primary.
        let (a, b) = both(&node(1, 0, true), &node(1, 0, true));
        refused(&a, &["both primary", "secondary"]);
        refused(&b, &["both primary"]);
        // Same current: bitmap (union).
        assert_eq!(
            both(&node(5, 0, true), &node(5, 0, false)),
            (
                Verdict::Source { full: false },
                Verdict::Target { full: false }
            )
        );
        // The primary wrote since parting.
        assert_eq!(
            both(&node(6, 5, true), &node(5, 0, false)).1,
            Verdict::Target { full: false }
        );
        // The secondary wrote, the primary did not.
        let (a, _) = both(&node(5, 0, true), &node(7, 5, false));
        refused(&a, &["wrote 3 block(s)", "--discard-my-data"]);
        // Both wrote: split brain.
        let (a, b) = both(&node(6, 5, true), &node(7, 5, false));
        refused(&a, &["split brain"]);
        refused(&b, &["split brain"]);
        // A fresh (inconsistent) secondary: full.
        let mut fresh = node(99, 0, false);
        fresh.inconsistent = true;
        assert_eq!(
            both(&node(6, 5, true), &fresh),
            (
                Verdict::Source { full: true },
                Verdict::Target { full: true }
            )
        );
        // The secondary's current is in the primary's history: full.
        let mut p = node(8, 0, true);
        p.history[2] = 4;
        assert_eq!(
            both(&p, &node(4, 0, false)).0,
            Verdict::Source { full: true }
        );
        // Unrelated.
        let (a, _) = both(&node(8, 0, true), &node(4, 0, false));
        refused(&a, &["unrelated", "create-md --force"]);
        // Sizes differ.
        let mut small = node(8, 0, false);
        small.size = 1 << 20;
        refused(&both(&node(8, 0, true), &small).0, &["same size"]);
        // An inconsistent primary.
        let mut bad = node(8, 0, true);
        bad.inconsistent = true;
        refused(
            &both(&bad, &node(8, 0, false)).1,
            &["inconsistent", "--force"],
        );
    }
}
