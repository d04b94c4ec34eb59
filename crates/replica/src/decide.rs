//! What happens when two nodes connect: DRBD's generation-id table, computed by each end
//! from its own state and the peer's, so both reach the same verdict without another
//! round trip.
//!
//! Ids (see the volume crate): `current` changes when a primary first writes without
//! the peer, the old id becoming that peer's `bitmap` id. So, with S the primary's state
//! and T the other's, in this order:
//!
//! | condition | verdict |
//! |---|---|
//! | sizes or block sizes differ | refused |
//! | neither is primary | nothing to do (connected, idle) |
//! | both are primary | refused: one must be made secondary |
//! | S is inconsistent | refused |
//! | T.current = S.current | resync the union of both bitmaps (usually empty) |
//! | S.bitmap = T.current | S wrote since they parted: resync S's bitmap (∪ T's) |
//! | T is inconsistent and its bitmap id (the source id it noted when a resync into it began) is S.current or S.bitmap | the resync goes on: S's bitmap (∪ T's) |
//! | T discards its data (`--discard-my-data`) and the two are related | resync the union: T's writes are overwritten |
//! | T is inconsistent (a resync into it broke off, or new) | full resync from S; with checksums when T was seeded |
//! | T.bitmap = S.current | T wrote, S did not: refused (make T primary, or discard T's writes) |
//! | S.bitmap = T.bitmap | both wrote since they parted: split brain; settled by the policy when it picks T, else refused |
//! | T.current is in S's history | full resync from S |
//! | T discards its data | full resync from S |
//! | otherwise | unrelated data: refused |
//!
//! A policy or `--discard-my-data` only ever gives up the secondary's writes: the
//! primary's data is in use by the application, and changing it underneath would corrupt
//! what the application holds in memory.

use crate::wire::{NodeState, SplitBrainPolicy};

/// What a resync carries, and how a split brain was settled (for the logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resync {
    /// Every block, not only both bitmaps.
    pub full: bool,
    /// Compare checksums first and send only blocks that differ (a seeded target).
    pub checksums: bool,
    /// Set when the target's own writes since the split are overwritten: why.
    pub discards: Option<String>,
}

/// The verdict, from one end's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Connected; neither side writes, nothing travels.
    Idle,
    /// This end is the source: resync its bitmap ∪ the peer's (`full`: every block).
    Source(Resync),
    /// This end is the target.
    Target(Resync),
    /// The link must not go on; the sentence says why and what to do.
    Refuse(String),
}

/// The policy both ends apply: their common one, or refusal when they differ.
fn common_policy(a: &NodeState, b: &NodeState) -> SplitBrainPolicy {
    if a.after_split_brain == b.after_split_brain {
        a.after_split_brain
    } else {
        SplitBrainPolicy::Disconnect
    }
}

/// The verdict for `me` meeting `peer` on `volume` (names for the messages).
pub fn decide(me: &NodeState, peer: &NodeState, peer_name: &str, volume: &str) -> Verdict {
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
                 (`cutover volume secondary {volume}` on it)"
            ))
        }
        (true, false) => (me, peer, true),
        (false, true) => (peer, me, false),
    };
    let (source_name, target_name) = if i_am_source {
        ("this node".to_string(), format!("peer {peer_name}"))
    } else {
        (
            format!("the primary ({peer_name})"),
            "this node".to_string(),
        )
    };
    let resync = |full: bool, discards: Option<String>| {
        let r = Resync {
            full,
            checksums: (full || target.inconsistent) && target.seeded,
            discards,
        };
        if i_am_source {
            Verdict::Source(r)
        } else {
            Verdict::Target(r)
        }
    };
    let changes = |n: &NodeState| {
        format!(
            "{} block(s) ({} bytes)",
            n.out_of_sync_blocks,
            n.out_of_sync_blocks.saturating_mul(u64::from(n.block_size))
        )
    };
    if source.inconsistent {
        return Verdict::Refuse(format!(
            "{source_name} is primary but its data is inconsistent (a resync into it did not \
             finish); finish it first, or promote with --force to take its data as it is"
        ));
    }
    if target.current == source.current {
        return resync(false, None);
    }
    if source.bitmap != 0 && source.bitmap == target.current {
        return resync(false, None);
    }
    // A resync into T from S's line broke off (T noted S's id when it began): S's bitmap
    // still names every block T has not made durable since, so it goes on from there.
    if target.inconsistent
        && target.bitmap != 0
        && (target.bitmap == source.current || target.bitmap == source.bitmap)
    {
        return resync(false, None);
    }
    let t_wrote_alone = target.bitmap != 0 && target.bitmap == source.current;
    let split_brain = source.bitmap != 0 && source.bitmap == target.bitmap;
    if target.discard_my_data && (t_wrote_alone || split_brain) {
        return resync(
            false,
            Some(format!(
                "{target_name} discards the {} it wrote since the split (--discard-my-data)",
                changes(target)
            )),
        );
    }
    if target.inconsistent {
        return resync(true, None);
    }
    let discard_hint = format!(
        "run `cutover volume connect {volume} --discard-my-data` on {target_name} to take \
         {source_name}'s data"
    );
    if t_wrote_alone {
        return Verdict::Refuse(format!(
            "{target_name} wrote {} while apart and {source_name} has nothing newer; make \
             {target_name} primary to keep them, or {discard_hint}",
            changes(target)
        ));
    }
    if split_brain {
        let policy = common_policy(source, target);
        let settles = match policy {
            SplitBrainPolicy::Disconnect => false,
            SplitBrainPolicy::DiscardZeroChanges => target.out_of_sync_blocks == 0,
            SplitBrainPolicy::DiscardLeastChanges => {
                target.out_of_sync_blocks <= source.out_of_sync_blocks
            }
        };
        if settles {
            return resync(
                false,
                Some(format!(
                    "split brain settled by after_split_brain = \"{}\": {target_name} \
                     discards the {} it wrote; {source_name} wrote {}",
                    policy.name(),
                    changes(target),
                    changes(source)
                )),
            );
        }
        let why_not = if source.after_split_brain != target.after_split_brain {
            format!(
                " (after_split_brain differs: \"{}\" on the primary, \"{}\" on the \
                 secondary; it applies only when both agree)",
                source.after_split_brain.name(),
                target.after_split_brain.name()
            )
        } else if policy != SplitBrainPolicy::Disconnect {
            format!(
                " (after_split_brain = \"{}\" would discard the primary's writes, which it \
                 never does)",
                policy.name()
            )
        } else {
            String::new()
        };
        return Verdict::Refuse(format!(
            "split brain: {source_name} wrote {} and {target_name} wrote {} since they \
             parted{why_not}; to keep the primary's, {discard_hint}; to keep the \
             secondary's, make it primary and discard on the other",
            changes(source),
            changes(target)
        ));
    }
    if source.history.contains(&target.current) || source.bitmap_history.contains(&target.current) {
        return resync(true, None);
    }
    if target.discard_my_data {
        return resync(
            true,
            Some(format!(
                "{target_name} holds data unrelated to {source_name}'s and discards it \
                 (--discard-my-data): full sync"
            )),
        );
    }
    Verdict::Refuse(format!(
        "{target_name} and {source_name} hold unrelated data (no generation in common); \
         run `cutover volume connect {volume} --discard-my-data` on {target_name} (or \
         re-create its metadata) to take a full sync"
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
            seeded: false,
            out_of_sync_blocks: 3,
            discard_my_data: false,
            after_split_brain: SplitBrainPolicy::Disconnect,
        }
    }

    fn with(mut n: NodeState, f: impl FnOnce(&mut NodeState)) -> NodeState {
        f(&mut n);
        n
    }

    /// Both ends' verdicts.
    fn both(a: &NodeState, b: &NodeState) -> (Verdict, Verdict) {
        (decide(a, b, "b", "db"), decide(b, a, "a", "db"))
    }

    fn plain(full: bool) -> (Verdict, Verdict) {
        let r = Resync {
            full,
            checksums: false,
            discards: None,
        };
        (Verdict::Source(r.clone()), Verdict::Target(r))
    }

    /// Both ends agree on a resync of the secondary's writes away, and say why.
    fn settled(v: (Verdict, Verdict), full: bool, words: &[&str]) {
        let (Verdict::Source(s), Verdict::Target(t)) = &v else {
            panic!("{v:?}")
        };
        assert_eq!((s.full, t.full), (full, full), "{v:?}");
        let why = t.discards.as_deref().expect("a reason");
        assert!(s.discards.is_some(), "{v:?}");
        for w in words {
            assert!(why.contains(w), "{why:?} lacks {w:?}");
        }
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
        assert_eq!(both(&node(5, 0, true), &node(5, 0, false)), plain(false));
        // The primary wrote since parting.
        assert_eq!(both(&node(6, 5, true), &node(5, 0, false)), plain(false));
        // The secondary wrote, the primary did not.
        let (a, b) = both(&node(5, 0, true), &node(7, 5, false));
        refused(&a, &["wrote 3 block(s) (49152 bytes)", "--discard-my-data"]);
        refused(
            &b,
            &["this node wrote 3 block(s)", "make this node primary"],
        );
        // Both wrote: split brain, naming both sides' changes.
        let primary = with(node(6, 5, true), |n| n.out_of_sync_blocks = 10);
        let (a, b) = both(&primary, &node(7, 5, false));
        refused(
            &a,
            &[
                "split brain",
                "this node wrote 10 block(s)",
                "peer b wrote 3 block(s)",
            ],
        );
        refused(&b, &["split brain", "--discard-my-data` on this node"]);
        // A fresh (inconsistent) secondary: full.
        let fresh = with(node(99, 0, false), |n| n.inconsistent = true);
        assert_eq!(both(&node(6, 5, true), &fresh), plain(true));
        // A resync into it that broke off goes on from the primary's bitmap, whether the
        // primary wrote since (its bitmap id is the one noted) or not.
        let resuming = with(fresh.clone(), |n| n.bitmap = 6);
        assert_eq!(both(&node(6, 0, true), &resuming), plain(false));
        let resuming = with(fresh.clone(), |n| n.bitmap = 5);
        assert_eq!(both(&node(6, 5, true), &resuming), plain(false));
        // ... but not from another line.
        let other = with(fresh.clone(), |n| n.bitmap = 4);
        assert_eq!(both(&node(6, 5, true), &other), plain(true));
        // A seeded secondary (inconsistent, a copy made beforehand): full, by checksums.
        let seeded = with(fresh, |n| n.seeded = true);
        let (Verdict::Source(a), Verdict::Target(b)) = both(&node(6, 5, true), &seeded) else {
            panic!("a seeded secondary takes a resync")
        };
        assert!(
            a.full && a.checksums && b.full && b.checksums,
            "{a:?} {b:?}"
        );
        // The secondary's current is in the primary's history: full.
        let p = with(node(8, 0, true), |n| n.history[2] = 4);
        assert_eq!(both(&p, &node(4, 0, false)), plain(true));
        // Unrelated.
        let (a, _) = both(&node(8, 0, true), &node(4, 0, false));
        refused(&a, &["unrelated", "--discard-my-data"]);
        // Sizes differ.
        let small = with(node(8, 0, false), |n| n.size = 1 << 20);
        refused(&both(&node(8, 0, true), &small).0, &["same size"]);
        // An inconsistent primary.
        let bad = with(node(8, 0, true), |n| n.inconsistent = true);
        refused(
            &both(&bad, &node(8, 0, false)).1,
            &["inconsistent", "--force"],
        );
    }

    #[test]
    fn discard_my_data_gives_up_only_the_secondarys_writes() {
        let victim = |n: NodeState| with(n, |n| n.discard_my_data = true);
        // Split brain: the secondary's writes are overwritten by a bitmap resync.
        settled(
            both(&node(6, 5, true), &victim(node(7, 5, false))),
            false,
            &["this node discards", "--discard-my-data"],
        );
        // The secondary wrote alone.
        settled(
            both(&node(5, 0, true), &victim(node(7, 5, false))),
            false,
            &["discards the 3 block(s)"],
        );
        // Unrelated data: a full sync.
        settled(
            both(&node(8, 0, true), &victim(node(4, 0, false))),
            true,
            &["unrelated"],
        );
        // On the primary it settles nothing.
        let (a, _) = both(&victim(node(6, 5, true)), &node(7, 5, false));
        refused(&a, &["split brain"]);
        // Nothing to settle: a plain resync, the flag unused.
        assert_eq!(
            both(&node(6, 5, true), &victim(node(5, 0, false))),
            plain(false)
        );
        // A broken-off resync into a victim (which noted the primary's id) goes on as a
        // plain bitmap resync: its writes are being overwritten already.
        let resuming = victim(with(node(7, 6, false), |n| n.inconsistent = true));
        assert_eq!(both(&node(6, 5, true), &resuming), plain(false));
    }

    #[test]
    fn split_brain_policies_settle_only_when_both_agree_and_the_secondary_loses() {
        let p = |policy, oos| {
            with(node(6, 5, true), |n| {
                n.after_split_brain = policy;
                n.out_of_sync_blocks = oos
            })
        };
        let s = |policy, oos| {
            with(node(7, 5, false), |n| {
                n.after_split_brain = policy;
                n.out_of_sync_blocks = oos
            })
        };
        use SplitBrainPolicy::*;
        // discard-zero-changes: the secondary wrote nothing.
        settled(
            both(&p(DiscardZeroChanges, 4), &s(DiscardZeroChanges, 0)),
            false,
            &["discard-zero-changes", "discards the 0 block(s)"],
        );
        // ... it wrote something: refused.
        refused(
            &both(&p(DiscardZeroChanges, 4), &s(DiscardZeroChanges, 1)).0,
            &["split brain", "would discard the primary's writes"],
        );
        // discard-least-changes: the secondary changed fewer (or as many) blocks.
        settled(
            both(&p(DiscardLeastChanges, 4), &s(DiscardLeastChanges, 2)),
            false,
            &["discard-least-changes", "discards the 2 block(s)"],
        );
        settled(
            both(&p(DiscardLeastChanges, 4), &s(DiscardLeastChanges, 4)),
            false,
            &["discards the 4 block(s)"],
        );
        // ... the primary changed fewer: never discard the primary's.
        refused(
            &both(&p(DiscardLeastChanges, 1), &s(DiscardLeastChanges, 2)).1,
            &["split brain", "would discard the primary's writes"],
        );
        // The two ends disagree: refused, saying so.
        refused(
            &both(&p(DiscardLeastChanges, 4), &s(Disconnect, 1)).0,
            &["after_split_brain differs"],
        );
        // A policy does not settle "the secondary wrote alone" (the primary would lose).
        refused(
            &both(&p(DiscardLeastChanges, 0), &{
                let mut t = s(DiscardLeastChanges, 9);
                t.bitmap = 6;
                t
            })
            .0,
            &["has nothing newer"],
        );
    }
}
