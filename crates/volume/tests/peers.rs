//! Replication peers' slots through the public API on real files: attaching (a new peer
//! owes everything, a known one keeps its bitmap across a clean close and a crash), the
//! numbered stream (writes queued in order, durable acknowledgements clearing bits, a lost
//! link putting back what was not durable), resync in disk order, protocol C writers
//! waiting for the peer, and overlapping writes numbered in the order they were made.

use nbd::{WriteEvent, WriteKind, WriteObserver};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use volume::{CreateOptions, Meta, OpKind, Replication, StreamOptions};

const MIB: u64 = 1 << 20;
const BS: u64 = 16 << 10;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    size: u64,
}

fn fixture(size: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.md");
    let opts = CreateOptions {
        block_size: BS as u32,
        peer_slots: 3,
        ..CreateOptions::new(size)
    };
    Meta::create_with(&path, &opts).unwrap();
    Fixture {
        _dir: dir,
        path,
        size,
    }
}

fn data_write(t: &volume::Tracker, offset: u64, data: &[u8], fua: bool) {
    let ev = WriteEvent {
        offset,
        length: data.len() as u64,
        kind: WriteKind::Data,
        data: Some(data),
        fua,
    };
    t.before_write(&ev).unwrap();
    t.after_write(&ev, &Ok(()));
}

fn opts(sync: bool) -> StreamOptions {
    StreamOptions {
        max_lag: 64 * MIB,
        sync,
        pull_ahead: false,
        csums: false,
    }
}

fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(|| {})
}

/// Resync everything out of sync and acknowledge it: the peer is in step.
fn settle(r: &Replication, slot: u32, epoch: u64) {
    let mut last = 0;
    while let Some(op) = r.next_resync(slot, epoch, 4 * MIB) {
        assert_eq!(op.kind, OpKind::Resync { check: false });
        last = op.seq;
    }
    r.acked(slot, epoch, last, last);
    assert_eq!(r.status(slot).unwrap().out_of_sync_blocks, 0);
}

#[test]
fn a_new_peer_owes_everything_and_a_known_one_keeps_its_bitmap() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    let slots = m.attach_peers(&[7, 9]).unwrap();
    assert_eq!(slots, vec![1, 2]);
    m.set_role(true).unwrap();
    let r = m.replication();
    let st = r.status(1).unwrap();
    assert_eq!(st.out_of_sync_bytes, 8 * MIB, "{st:?}");
    let e = r.start_stream(1, opts(false), no_wake()).unwrap();
    settle(&r, 1, e);
    // A write while peer 9 has no stream: it is out of sync for 9 only once 9 settles.
    let t = m.tracker();
    data_write(&t, 3 * BS, &[1u8; 4096], false);
    let q = r.take_queued(1, e, u64::MAX).unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].offset, q[0].length), (3 * BS, 4096));
    r.stop_stream(1, e);
    assert_eq!(r.status(1).unwrap().out_of_sync_blocks, 1);
    m.close().unwrap();
    drop(t);

    // Reopened: the same slots, the same bits; too many peers for the file is refused.
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.attach_peers(&[9, 7]).unwrap(), vec![2, 1]);
    assert_eq!(m.replication().status(1).unwrap().out_of_sync_blocks, 1);
    let e = m.attach_peers(&[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("peer slots") && e.contains("create-md"), "{e}");
    // Dropping peer 9 frees its slot; a new peer then gets it, owing everything.
    assert_eq!(m.attach_peers(&[7, 11]).unwrap(), vec![1, 2]);
    let st = m.replication().status(2).unwrap();
    assert_eq!((st.node, st.out_of_sync_bytes), (11, 8 * MIB));
    m.close().unwrap();
}

#[test]
fn durable_acks_clear_bits_and_a_lost_link_puts_back_what_was_not_durable() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    m.set_role(true).unwrap();
    let r = m.replication();
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    let e = r
        .start_stream(
            1,
            opts(false),
            Arc::new(move || {
                w.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
    settle(&r, 1, e);
    let t = m.tracker();
    let before = woken.load(Ordering::Relaxed);
    data_write(&t, 0, &[1u8; 8192], false);
    data_write(&t, 5 * BS, &[2u8; 4096], true);
    t.flushed().unwrap();
    assert!(woken.load(Ordering::Relaxed) >= before + 3);
    let q = r.take_queued(1, e, u64::MAX).unwrap();
    let kinds: Vec<_> = q.iter().map(|o| (o.seq, o.offset, o.fua)).collect();
    let first = q[0].seq;
    assert_eq!(
        kinds,
        vec![
            (first, 0, false),
            (first + 1, 5 * BS, true),
            (first + 2, 0, true)
        ]
    );
    assert!(matches!(&q[0].kind, OpKind::Data(d) if d.as_slice() == [1u8; 8192]));
    assert_eq!(q[2].kind, OpKind::Flush);
    let st = r.status(1).unwrap();
    assert_eq!((st.out_of_sync_blocks, st.lag_bytes), (2, 8192 + 4096));

    // Applied but not durable: lag gone, bits stay. Durable up to the first: one bit.
    r.acked(1, e, first + 2, first - 1);
    let st = r.status(1).unwrap();
    assert_eq!((st.out_of_sync_blocks, st.lag_bytes), (2, 0));
    r.acked(1, e, first + 2, first);
    assert_eq!(r.status(1).unwrap().out_of_sync_blocks, 1);

    // The link goes: the undurable write is out of sync again, and resync takes it.
    r.stop_stream(1, e);
    assert!(
        r.take_queued(1, e, u64::MAX).is_none(),
        "an old epoch is over"
    );
    let st = r.status(1).unwrap();
    assert_eq!((st.out_of_sync_blocks, st.resync_blocks), (1, 1));
    let e2 = r.start_stream(1, opts(false), no_wake()).unwrap();
    let op = r.next_resync(1, e2, 4 * MIB).unwrap();
    assert_eq!((op.offset, op.length, op.seq), (5 * BS, BS, 1));
    assert!(r.next_resync(1, e2, 4 * MIB).is_none());
    r.acked(1, e2, 1, 1);
    assert_eq!(r.status(1).unwrap().out_of_sync_blocks, 0);
    m.close().unwrap();
}

#[test]
fn a_crash_marks_the_activity_logs_extents_for_every_peer() {
    let f = fixture(64 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    m.set_role(true).unwrap();
    let r = m.replication();
    let e = r.start_stream(1, opts(false), no_wake()).unwrap();
    settle(&r, 1, e);
    m.flush().unwrap();
    let t = m.tracker();
    // Applied and durable on the peer: its bit is cleared. The extent stays hot.
    data_write(&t, 20 * MIB, &[3u8; 4096], false);
    let q = r.take_queued(1, e, u64::MAX).unwrap();
    r.acked(1, e, q[0].seq, q[0].seq);
    assert_eq!(r.status(1).unwrap().out_of_sync_blocks, 0);
    drop(t);
    drop(r);
    drop(m); // kill -9
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.attach_peers(&[5]).unwrap(), vec![1]);
    let st = m.replication().status(1).unwrap();
    // Extent 5 (20-24 MiB) is named by the AL: marked, whatever the peer acknowledged.
    assert_eq!(st.out_of_sync_bytes, 4 * MIB, "{st:?}");
    m.close().unwrap();
}

#[test]
fn protocol_c_waits_for_the_peer_and_a_lost_link_releases_the_writer() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    m.set_role(true).unwrap();
    let r = m.replication();
    let e = r.start_stream(1, opts(true), no_wake()).unwrap();
    settle(&r, 1, e);
    let t = m.tracker();
    let t2 = t.clone();
    let writer = std::thread::spawn(move || data_write(&t2, 0, &[9u8; 4096], true));
    let op = loop {
        if let Some(op) = r.take_queued(1, e, u64::MAX).unwrap().pop() {
            break op;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "a FUA write waits for the peer");
    r.acked(1, e, op.seq, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !writer.is_finished(),
        "applied is not enough for FUA: durable"
    );
    r.acked(1, e, op.seq, op.seq);
    writer.join().unwrap();

    let t2 = t.clone();
    let writer = std::thread::spawn(move || data_write(&t2, BS, &[9u8; 4096], false));
    while r.status(1).unwrap().lag_bytes == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    r.stop_stream(1, e);
    writer.join().unwrap();
    assert_eq!(r.status(1).unwrap().out_of_sync_blocks, 1);
    m.close().unwrap();
}

#[test]
fn overlapping_writes_are_numbered_in_the_order_they_were_made() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    m.set_role(true).unwrap();
    let r = m.replication();
    let e = r.start_stream(1, opts(false), no_wake()).unwrap();
    settle(&r, 1, e);
    let t = m.tracker();
    let ev = |b: &'static [u8]| WriteEvent {
        offset: 0,
        length: 4096,
        kind: WriteKind::Data,
        data: Some(b),
        fua: false,
    };
    static A: [u8; 4096] = [b'a'; 4096];
    static B: [u8; 4096] = [b'b'; 4096];
    // A is admitted; B (same range) must wait until A is numbered and released.
    t.before_write(&ev(&A)).unwrap();
    let t2 = t.clone();
    let b = std::thread::spawn(move || {
        t2.before_write(&ev(&B)).unwrap();
        t2.after_write(&ev(&B), &Ok(()));
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!b.is_finished(), "an overlapping write waits");
    t.after_write(&ev(&A), &Ok(()));
    b.join().unwrap();
    let q = r.take_queued(1, e, u64::MAX).unwrap();
    let order: Vec<u8> = q
        .iter()
        .map(|o| match &o.kind {
            OpKind::Data(d) => d[0],
            k => panic!("{k:?}"),
        })
        .collect();
    assert_eq!(order, b"ab");
    m.close().unwrap();
}

#[test]
fn a_secondary_refuses_writes_and_a_primary_apart_from_its_peer_makes_a_new_generation() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    let t = m.tracker();
    let e = t.admit(0, 4096).unwrap_err();
    assert!(matches!(e, volume::Error::Secondary { .. }), "{e}");
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::PermissionDenied
    );
    m.set_role(true).unwrap();
    let r = m.replication();
    let g0 = r.generations(1);
    assert_eq!(g0.bitmap, 0);
    // The first write without the peer: the old current becomes the slot's bitmap id.
    data_write(&t, 0, &[1u8; 4096], false);
    let g1 = r.generations(1);
    assert_eq!((g1.bitmap, g1.history[0]), (g0.current, g0.current));
    assert_ne!(g1.current, g0.current);
    data_write(&t, BS, &[1u8; 4096], false);
    assert_eq!(r.generations(1), g1, "only the first write after the loss");
    // In step again: the bitmap id returns to 0; the next loss makes another generation.
    let e = r.start_stream(1, opts(false), no_wake()).unwrap();
    settle(&r, 1, e);
    r.in_step(1).unwrap();
    assert_eq!(r.generations(1).bitmap, 0);
    r.stop_stream(1, e);
    data_write(&t, 0, &[1u8; 4096], false);
    let g2 = r.generations(1);
    assert_eq!(g2.bitmap, g1.current);
    // Ids survive a reopen; a target adopting a source's id is consistent.
    drop(t);
    m.set_inconsistent(true).unwrap();
    m.close().unwrap();
    let m = Meta::open(&f.path, f.size).unwrap();
    m.attach_peers(&[5]).unwrap();
    let r = m.replication();
    assert_eq!(r.generations(1).current, g2.current);
    assert!(r.generations(1).inconsistent);
    r.adopt(42).unwrap();
    let g = r.generations(1);
    assert_eq!(
        (g.current, g.history[0], g.inconsistent),
        (42, g2.current, false)
    );
    m.close().unwrap();
}

#[test]
fn a_large_write_goes_to_the_peer_in_numbered_pieces_with_fua_on_the_last() {
    let f = fixture(8 * MIB);
    let m = Meta::open(&f.path, f.size).unwrap();
    let slot = m.attach_peers(&[7]).unwrap()[0];
    m.set_role(true).unwrap();
    let r = m.replication();
    let e = r.start_stream(slot, opts(false), no_wake()).unwrap();
    settle(&r, slot, e);
    let t = m.tracker();
    let data: Vec<u8> = (0..MIB as usize + 4096).map(|i| (i % 253) as u8).collect();
    data_write(&t, 2 * MIB + 512, &data, true);
    let q = r.take_queued(slot, e, u64::MAX).unwrap();
    assert_eq!(
        q.len(),
        5,
        "{:?}",
        q.iter().map(|o| o.length).collect::<Vec<_>>()
    );
    let mut joined = Vec::new();
    for (i, op) in q.iter().enumerate() {
        assert_eq!(op.seq, q[0].seq + i as u64, "consecutive numbers");
        assert_eq!(op.offset, 2 * MIB + 512 + joined.len() as u64);
        assert_eq!(op.fua, i == q.len() - 1, "FUA on the last piece only");
        let OpKind::Data(d) = &op.kind else {
            panic!("{op:?}")
        };
        joined.extend_from_slice(d);
    }
    assert_eq!(joined, data);
    // Durable up to the last piece: nothing is out of sync.
    let last = q.last().unwrap().seq;
    r.acked(slot, e, last - 1, last - 1);
    assert!(r.status(slot).unwrap().out_of_sync_blocks > 0);
    r.acked(slot, e, last, last);
    assert_eq!(r.status(slot).unwrap().out_of_sync_blocks, 0);
    drop(t);
    m.close().unwrap();
}
