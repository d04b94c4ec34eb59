//! Peer acknowledgements through the public API on real files: the primary says a peer
//! holds everything up to a write id only while it owes it no resync and up to the oldest
//! write not yet durable there; a secondary marks the writes it applies for its fellow
//! peers and clears them when told, drops older marks once in step, and keeps the blocks
//! a write in progress may have changed during a resync read marked until it follows.

use nbd::{WriteEvent, WriteKind, WriteObserver};
use std::sync::Arc;
use volume::{Applied, CreateOptions, Meta, StreamOptions};

const MIB: u64 = 1 << 20;
const BS: u64 = 16 << 10;
const SIZE: u64 = 4 * MIB;

fn meta(dir: &tempfile::TempDir, peers: &[u32]) -> (Meta, Vec<u32>) {
    let path = dir.path().join("vol.md");
    let opts = CreateOptions {
        block_size: BS as u32,
        peer_slots: 3,
        ..CreateOptions::new(SIZE)
    };
    Meta::create_with(&path, &opts).unwrap();
    let m = Meta::open(&path, SIZE).unwrap();
    let slots = m.attach_peers(peers).unwrap();
    (m, slots)
}

fn write(t: &volume::Tracker, offset: u64, len: usize) {
    let data = vec![7u8; len];
    let ev = WriteEvent {
        offset,
        length: len as u64,
        kind: WriteKind::Data,
        data: Some(&data),
        fua: false,
    };
    t.before_write(&ev).unwrap();
    t.after_write(&ev, &Ok(()));
}

fn stream() -> StreamOptions {
    StreamOptions {
        max_lag: 64 * MIB,
        sync: false,
        pull_ahead: false,
        csums: false,
    }
}

/// An applied write of `length` bytes at `offset` with id `wid`.
fn op(wid: u64, offset: u64, length: u64) -> Applied {
    Applied {
        wid,
        offset,
        length,
        unknown: Vec::new(),
    }
}

fn oos(m: &Meta, slot: u32) -> u64 {
    m.replication().status(slot).unwrap().out_of_sync_blocks
}

#[test]
fn the_primary_says_a_peer_holds_writes_only_once_durable_and_without_resync_owed() {
    let dir = tempfile::tempdir().unwrap();
    let (m, slots) = meta(&dir, &[2, 3]);
    m.set_role(true).unwrap();
    let r = m.replication();
    let t = m.tracker();
    let e2 = r.start_stream(slots[0], stream(), Arc::new(|| {})).unwrap();
    // A new peer owes a full resync: nothing is said of it.
    assert_eq!(r.peers_hold(), vec![]);
    // Its resync numbered and made durable: it holds everything.
    while let Some(op) = r.next_resync(slots[0], e2, MIB) {
        r.acked(slots[0], e2, op.seq, op.seq);
    }
    assert_eq!(r.peers_hold(), vec![(2, 0)]);
    write(&t, 0, BS as usize);
    write(&t, BS, BS as usize);
    let ops = r.take_queued(slots[0], e2, u64::MAX).unwrap();
    assert_eq!(ops.iter().map(|o| o.wid).collect::<Vec<_>>(), [1, 2]);
    // Write 1 durable, write 2 not: the peer holds up to 1.
    r.acked(slots[0], e2, ops[1].seq, ops[0].seq);
    assert_eq!(r.peers_hold(), vec![(2, 1)]);
    r.acked(slots[0], e2, ops[1].seq, ops[1].seq);
    assert_eq!(r.peers_hold(), vec![(2, 2)]);
    // Blocks it lacks that no write fixes: nothing is said until they are resynced.
    r.mark(slots[0], 10, 10).unwrap();
    assert_eq!(r.peers_hold(), vec![]);
}

#[test]
fn a_secondary_marks_applied_writes_for_its_fellows_until_told_they_hold_them() {
    let dir = tempfile::tempdir().unwrap();
    // Node 1 is the primary (slot of `from`), node 3 the fellow secondary.
    let (m, slots) = meta(&dir, &[1, 3]);
    let (from, fellow) = (slots[0], slots[1]);
    let r = m.replication();
    // A new slot: all marked, and kept while this node is not in step with the primary.
    let all = SIZE / BS;
    assert_eq!(oos(&m, fellow), all);
    r.peer_holds(from, 3, 0, false).unwrap();
    assert_eq!(oos(&m, fellow), all);
    // In step, and the fellow holds everything: the older marks go.
    r.peer_holds(from, 3, 0, true).unwrap();
    assert_eq!(oos(&m, fellow), 0);
    assert_eq!(r.generations(fellow).bitmap, 0);
    assert!(r.applying(from, &[op(5, 0, BS), op(6, 4 * BS, 2 * BS)]));
    assert!(
        !r.applying(from, &[op(7, 0, BS)]),
        "block 0 was marked already"
    );
    assert_eq!(oos(&m, fellow), 3);
    // Told the fellow holds up to 5: block 0 stays (written again by 7).
    r.peer_holds(from, 3, 5, true).unwrap();
    assert_eq!(oos(&m, fellow), 3);
    r.peer_holds(from, 3, 6, true).unwrap();
    assert_eq!(r.runs(fellow, 0, 8), vec![(0, 1)]);
    r.peer_holds(from, 3, 7, true).unwrap();
    assert_eq!(oos(&m, fellow), 0);
    // The primary's own slot is never marked by what it sends.
    r.applying(from, &[op(8, 8 * BS, BS)]);
    assert_eq!(oos(&m, fellow), 1);
    // The link ends: pending writes stay marked, and a new link's ids do not clear them.
    r.end_peer_acks();
    r.peer_holds(from, 3, 100, false).unwrap();
    assert_eq!(oos(&m, fellow), 1);
}

#[test]
fn blocks_a_write_in_progress_may_have_changed_stay_marked_until_it_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (m, slots) = meta(&dir, &[1, 3]);
    let (from, fellow) = (slots[0], slots[1]);
    let r = m.replication();
    // A run of blocks 0..=3 read while block 3 was being written.
    let run = Applied {
        unknown: vec![(3, 3)],
        ..op(4, 0, 4 * BS)
    };
    r.applying(from, &[run, op(5, 5 * BS, BS)]);
    r.peer_holds(from, 3, 1000, true).unwrap();
    assert_eq!(
        r.runs(fellow, 0, 8),
        vec![(3, 1)],
        "the block being written stays marked"
    );
    // The write that was in progress arrives: its id bounds that block.
    r.applying(from, &[op(1001, 3 * BS + 512, 512)]);
    r.peer_holds(from, 3, 1000, true).unwrap();
    assert_eq!(r.runs(fellow, 0, 8), vec![(3, 1)]);
    r.peer_holds(from, 3, 1001, true).unwrap();
    assert_eq!(r.runs(fellow, 0, 8), vec![]);
}

#[test]
fn a_resync_run_read_while_its_blocks_are_written_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = meta(&dir, &[2]);
    m.set_role(true).unwrap();
    let r = m.replication();
    let t = m.tracker();
    write(&t, 0, BS as usize);
    assert_eq!(r.resync_wid(0, MIB), (0, vec![]), "no stream: no id given");
    let ev = WriteEvent {
        offset: BS + 100,
        length: BS,
        kind: WriteKind::Zeroes,
        data: None,
        fua: false,
    };
    t.before_write(&ev).unwrap();
    assert_eq!(r.resync_wid(0, MIB), (0, vec![(1, 2)]));
    assert_eq!(
        r.resync_wid(2 * BS, MIB),
        (0, vec![(2, 2)]),
        "clipped to the run"
    );
    assert_eq!(r.resync_wid(4 * BS, BS), (0, vec![]), "another range");
    t.after_write(&ev, &Ok(()));
    assert_eq!(r.resync_wid(0, MIB), (0, vec![]));
}
