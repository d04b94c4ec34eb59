//! The metadata file through the public API, on real files: create and its refusals, the
//! superblock copies (alternation, one or both damaged), reopening after a clean close and
//! after a crash (the handle dropped without `close`), the activity log's ring wrapping and
//! evictions persisting bits, wide writes going through the bitmap, `mark()` generations,
//! and the `cutover:dirty` runs.

use nbd::{MetaContext, WriteObserver};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use volume::{CreateOptions, Error, Geometry, Meta, EXTENT_SIZE};

const MIB: u64 = 1 << 20;
const BS: u64 = 64 << 10;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    size: u64,
}

fn fixture(size: u64, al_extents: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.md");
    let opts = CreateOptions {
        al_extents,
        block_size: BS as u32,
        ..CreateOptions::new(size)
    };
    Meta::create_with(&path, &opts).unwrap();
    Fixture {
        _dir: dir,
        path,
        size,
    }
}

fn geo(f: &Fixture, al_extents: u32) -> Geometry {
    Geometry::new(f.size, BS as u32, 1, al_extents).unwrap()
}

/// Whether block `block`'s bit is set in the on-disk bitmap (slot 0).
fn disk_bit(path: &Path, g: &Geometry, block: u64) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, g.bitmap_at(0) + block / 8).unwrap();
    b[0] & (1 << (block % 8)) != 0
}

fn seq_of_copy(path: &Path, copy: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, copy * 4096 + 16).unwrap();
    u64::from_le_bytes(b)
}

fn write(t: &volume::Tracker, offset: u64, length: u64) {
    t.admit(offset, length).unwrap();
    t.release(offset, length);
}

/// Dirty blocks of the live bitmap, as block numbers.
fn dirty_blocks(t: &volume::Tracker, size: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (len, dirty) in t.dirty_runs(0, size, usize::MAX) {
        if dirty {
            out.extend(pos / BS..(pos + len).div_ceil(BS));
        }
        pos += len;
    }
    out
}

#[test]
fn create_refuses_what_it_should_and_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.md");
    let info = Meta::create(&path, 100 * MIB, 64 << 10, false).unwrap();
    assert_eq!(info.size, 100 * MIB);
    assert!(info.clean);
    assert_eq!(info.volume_id.len(), 36);

    let e = Meta::create(&path, 100 * MIB, 64 << 10, false).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()) && msg.contains("--force"),
        "{msg}"
    );
    assert!(msg.contains(&info.volume_id), "{msg}");
    assert!(!msg.contains('\n'));

    let again = Meta::create(&path, 200 * MIB, 64 << 10, true).unwrap();
    assert_ne!(again.volume_id, info.volume_id);
    assert_eq!(Meta::inspect(&path).unwrap().size, 200 * MIB);

    // Some other file (a backing given by mistake): refused, and left alone.
    let other = dir.path().join("disk.img");
    std::fs::write(&other, b"precious data").unwrap();
    let e = Meta::create(&other, MIB, 4096, false).unwrap_err();
    assert!(matches!(e, Error::NotEmpty { .. }), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), b"precious data");
    let e = Meta::open(&other, MIB).unwrap_err();
    assert!(matches!(e, Error::NotMeta { .. }), "{e}");

    let e = Meta::create(&path, 100 * MIB, 3000, true).unwrap_err();
    assert!(e.to_string().contains("block size 3000"), "{e}");
    let nowhere = dir.path().join("no/such/dir/vol.md");
    let e = Meta::create(&nowhere, MIB, 4096, false).unwrap_err();
    assert!(e.to_string().starts_with(nowhere.to_str().unwrap()), "{e}");
    let e = Meta::open(dir.path().join("nope.md"), MIB).unwrap_err();
    assert!(e.to_string().contains("create-md"), "{e}");

    let e = Meta::open(&path, 100 * MIB).unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");

    // One process at a time, and --force does not pull the file from under it.
    let m = Meta::open(&path, 200 * MIB).unwrap();
    let e = Meta::open(&path, 200 * MIB).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let e = Meta::create(&path, MIB, 4096, true).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    m.close().unwrap();
    Meta::open(&path, 200 * MIB).unwrap().close().unwrap();
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 2);
}

#[test]
fn superblock_copies_alternate_and_survive_damage() {
    let f = fixture(64 * MIB, 16);
    // Fresh: both copies valid, 2 the newest (in copy 0).
    assert_eq!((seq_of_copy(&f.path, 0), seq_of_copy(&f.path, 1)), (2, 1));
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!((seq_of_copy(&f.path, 0), seq_of_copy(&f.path, 1)), (2, 3));
    let t = m.tracker();
    write(&t, 0, 4096);
    m.mark().unwrap();
    assert_eq!((seq_of_copy(&f.path, 0), seq_of_copy(&f.path, 1)), (4, 3));
    write(&t, 5 * MIB, 4096);
    drop(t);
    m.close().unwrap();
    assert_eq!((seq_of_copy(&f.path, 0), seq_of_copy(&f.path, 1)), (4, 5));
    let info = Meta::inspect(&f.path).unwrap();
    assert!(info.clean);
    assert_eq!((info.seq, info.marks), (5, 1));

    // Damage the newest copy (as a torn write would): the older one is used, which says
    // the shutdown was not clean (it was written at the mark), so the AL is replayed.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap();
    file.write_all_at(&[0xee; 100], 4096 + 1000).unwrap();
    let m = Meta::open(&f.path, f.size).unwrap();
    let r = m.open_report().clone();
    assert_eq!(r.superblock_copy, 0);
    assert_eq!(r.damaged_copy.as_deref(), Some("checksum mismatch"));
    assert!(!r.last_shutdown_clean);
    let t = m.tracker();
    let dirty = dirty_blocks(&t, f.size);
    // The write after the mark, through the AL (whole extent 1), and the bitmap.
    assert!(dirty.contains(&(5 * MIB / BS)), "{dirty:?}");
    drop(t);
    // Open's write went to the damaged copy, repairing it.
    assert_eq!(seq_of_copy(&f.path, 1), 5);
    m.close().unwrap();
    assert_eq!(seq_of_copy(&f.path, 0), 6);

    // Both damaged: a clear error, naming both problems and the fix.
    file.write_all_at(&[0xee; 100], 1000).unwrap();
    file.write_all_at(&[0xee; 100], 4096 + 1000).unwrap();
    let e = Meta::open(&f.path, f.size).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("copy 0: checksum mismatch; copy 1: checksum mismatch"),
        "{msg}"
    );
    assert!(
        msg.contains("create-md --force") && !msg.contains('\n'),
        "{msg}"
    );
    assert!(Meta::inspect(&f.path).is_err());
}

#[test]
fn reopen_after_clean_close_has_nothing_extra_dirty() {
    let f = fixture(256 * MIB, 8);
    let m = Meta::open(&f.path, f.size).unwrap();
    assert!(m.open_report().last_shutdown_clean);
    let t = m.tracker();
    // 20 extents through an AL of 8: evictions on the way.
    let writes: Vec<(u64, u64)> = (0..20)
        .map(|i| (i * 12 * MIB + 7 * BS + 100, 3 * BS))
        .collect();
    for &(o, l) in &writes {
        write(&t, o, l);
    }
    let before = dirty_blocks(&t, f.size);
    assert_eq!(before.len(), 20 * 4, "each write touches 4 blocks");
    assert!(m.status().al.evictions >= 12);
    drop(t);
    m.close().unwrap();

    let m = Meta::open(&f.path, f.size).unwrap();
    let r = m.open_report();
    assert!(r.last_shutdown_clean);
    assert_eq!((r.recovered_extents, r.recovered_blocks), (0, 0));
    assert_eq!(dirty_blocks(&m.tracker(), f.size), before);
    let s = m.status();
    assert_eq!(s.dirty_bytes, 80 * BS);
    assert!(!s.clean_flag, "the clean flag is cleared while open");
}

#[test]
fn reopen_after_a_crash_marks_the_al_extents_dirty() {
    let f = fixture(256 * MIB, 8);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    write(&t, 0, 4096);
    write(&t, 9 * MIB, 2 * BS);
    // A write in flight at the crash: admitted, never released.
    t.admit(100 * MIB + 5, 10).unwrap();
    let before = dirty_blocks(&t, f.size);
    drop(t);
    drop(m); // a crash, for the metadata: nothing more is written

    let m = Meta::open(&f.path, f.size).unwrap();
    let r = m.open_report().clone();
    assert!(!r.last_shutdown_clean);
    assert_eq!(r.recovered_extents, 3);
    let t = m.tracker();
    let dirty = dirty_blocks(&t, f.size);
    for b in &before {
        assert!(
            dirty.contains(b),
            "block {b} written before the crash is clean"
        );
    }
    // Whole extents 0, 2 and 25; nothing else.
    let per = EXTENT_SIZE / BS;
    let want: Vec<u64> = [0u64, 2, 25]
        .iter()
        .flat_map(|e| e * per..(e + 1) * per)
        .collect();
    assert_eq!(dirty, want);
    assert_eq!(r.recovered_blocks, 3 * per);

    // Recovery was persisted: another crash straight away loses nothing, adds nothing.
    drop(t);
    drop(m);
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.open_report().recovered_extents, 0, "a new AL epoch");
    assert_eq!(dirty_blocks(&m.tracker(), f.size), want);
}

#[test]
fn evictions_persist_bits_before_the_extent_leaves_the_al() {
    let f = fixture(64 * MIB, 2);
    let g = geo(&f, 2);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    let a = 3 * BS; // extent 0
    write(&t, a, 100);
    assert!(!disk_bit(&f.path, &g, 3), "hot: only the AL knows");
    write(&t, EXTENT_SIZE, 100); // extent 1
    assert_eq!(m.status().al.evictions, 0);
    write(&t, 2 * EXTENT_SIZE, 100); // extent 2 evicts extent 0 (least recently used)
    assert_eq!(m.status().al.evictions, 1);
    assert!(disk_bit(&f.path, &g, 3), "evicted without its bit on disk");
    assert!(!disk_bit(&f.path, &g, 2));

    // With the whole AL lost, the evicted extent's write is still known.
    drop(t);
    drop(m);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap();
    file.write_all_at(&vec![0u8; (g.al_ring as usize) * 4096], g.al_offset)
        .unwrap();
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.open_report().recovered_extents, 0);
    // (Block 64, extent 1's, shares the bitmap page the eviction wrote: also on disk.)
    assert_eq!(dirty_blocks(&m.tracker(), f.size), vec![3, 64]);
}

#[test]
fn the_ring_wraps_and_recovery_still_finds_every_hot_extent() {
    let f = fixture(1 << 40, 4);
    let m = Meta::open(&f.path, f.size).unwrap();
    let g = m.geometry();
    let t = m.tracker();
    // 100 cold extents through 4 slots: 100 transactions around a ring of 16.
    for i in 0..100u64 {
        write(&t, i * 1000 * EXTENT_SIZE % f.size + i * BS, 4096);
    }
    let s = m.status();
    assert_eq!(s.al.transactions, 100);
    assert_eq!(s.al.ring, g.al_ring);
    assert!(s.al.transactions > 6 * u64::from(g.al_ring));
    let before = dirty_blocks(&t, f.size);
    assert_eq!(before.len(), 100);
    drop(t);
    drop(m);
    let m = Meta::open(&f.path, f.size).unwrap();
    let r = m.open_report();
    assert_eq!(r.al_transactions, g.al_ring as usize);
    // The 4 hot extents, plus a few evicted ones older transactions still name.
    assert!(
        (4..=4 + g.al_ring as usize).contains(&r.recovered_extents),
        "{r:?}"
    );
    let dirty = dirty_blocks(&m.tracker(), f.size);
    for b in &before {
        assert!(dirty.contains(b), "block {b} lost after the ring wrapped");
    }
}

#[test]
fn writes_wider_than_the_al_go_through_the_bitmap() {
    let f = fixture(1 << 30, 16);
    let g = geo(&f, 16);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    // A 512 MiB TRIM: 128 extents, more than half the AL.
    t.admit(256 * MIB, 512 * MIB).unwrap();
    assert_eq!(m.status().counters.write_throughs, 1);
    assert_eq!(m.status().al.hot_extents, 0);
    for b in [256 * MIB / BS, 500 * MIB / BS, 768 * MIB / BS - 1] {
        assert!(
            disk_bit(&f.path, &g, b),
            "block {b} not on disk before the write"
        );
    }
    assert!(!disk_bit(&f.path, &g, 768 * MIB / BS));
    t.release(256 * MIB, 512 * MIB);
    // An 8-extent write stays in the AL.
    write(&t, 0, 8 * EXTENT_SIZE);
    assert_eq!(m.status().al.hot_extents, 8);
    assert!(!disk_bit(&f.path, &g, 0));
}

#[test]
fn mark_starts_a_generation() {
    let f = fixture(64 * MIB, 16);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    let g0 = m.status();
    write(&t, 0, BS + 1);
    write(&t, 10 * MIB, 4096);
    let snap = m.mark().unwrap();
    assert_eq!(snap.blocks(), 3);
    assert_eq!(snap.bytes(), 3 * BS);
    assert_eq!(
        snap.extents().collect::<Vec<_>>(),
        vec![(0, 2 * BS), (10 * MIB, BS)]
    );
    assert_eq!(snap.from_gen, g0.bitmap_gen);
    let s = m.status();
    assert_eq!(snap.to_gen, s.bitmap_gen);
    // Marks are slot 0's generations; the volume's current id is replication's.
    assert_eq!((s.current_gen, s.history), (g0.current_gen, g0.history));
    assert_eq!((s.dirty_blocks, s.marks), (0, 1));

    write(&t, 10 * MIB, 4096);
    let snap2 = m.mark().unwrap();
    assert_eq!(snap2.extents().collect::<Vec<_>>(), vec![(10 * MIB, BS)]);
    assert_eq!(snap2.from_gen, snap.to_gen);

    // The generation is on disk at once: a crash now reopens with the new ids.
    let s = m.status();
    drop(t);
    drop(m);
    let info = Meta::inspect(&f.path).unwrap();
    assert_eq!(
        (info.current_gen, info.bitmap_gen),
        (s.current_gen, s.bitmap_gen)
    );
    assert_eq!(info.marks, 2);
    let m = Meta::open(&f.path, f.size).unwrap();
    // Extent 2 (8-12 MiB) is named by the AL, and so is the first generation's extent 0
    // (a superset is fine); nothing outside them.
    let dirty = dirty_blocks(&m.tracker(), f.size);
    assert!(dirty.contains(&(10 * MIB / BS)));
    let per = EXTENT_SIZE / BS;
    assert!(
        dirty
            .iter()
            .all(|b| *b < per || (2 * per..3 * per).contains(b)),
        "{dirty:?}"
    );
}

#[test]
fn flush_persists_what_a_mark_cleared() {
    let f = fixture(64 * MIB, 16);
    let g = geo(&f, 16);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    write(&t, 0, 4096);
    assert_eq!(m.flush().unwrap(), 1);
    assert!(disk_bit(&f.path, &g, 0));
    assert_eq!(m.flush().unwrap(), 0, "nothing changed since");
    m.mark().unwrap();
    assert!(
        disk_bit(&f.path, &g, 0),
        "cleared on disk only by the next flush"
    );
    assert_eq!(m.flush().unwrap(), 1);
    assert!(!disk_bit(&f.path, &g, 0));

    // NBD FLUSH: at most once per interval.
    let t0 = m.tracker_with(std::time::Duration::ZERO);
    write(&t, 4 * BS, 1);
    t0.flushed().unwrap();
    assert!(disk_bit(&f.path, &g, 4));
    write(&t, 5 * BS, 1);
    t.flushed().unwrap();
    assert!(!disk_bit(&f.path, &g, 5), "within the default interval");
    assert_eq!(m.status().counters.flushes, 2);
}

#[test]
fn the_dirty_context_reports_runs() {
    let f = fixture(10 * MIB + 100, 16);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    assert_eq!(t.name(), "cutover:dirty");
    write(&t, BS, 1);
    write(&t, 10 * MIB + 50, 10);
    let e = t.extents(0, u32::MAX, 100).unwrap();
    let v: Vec<(u32, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
    assert_eq!(
        v,
        vec![
            (BS as u32, 0),
            (BS as u32, 1),
            ((10 * MIB - 2 * BS) as u32, 0),
            (100, 1)
        ]
    );
    // From the middle of a block, limited in count.
    let e = t.extents(BS + 10, 1000, 1).unwrap();
    assert_eq!((e.len(), e[0].length, e[0].flags), (1, 1000, 1));
    let e = t.extents(BS + 10, 2 * BS as u32, 10).unwrap();
    assert_eq!(
        (e[0].length, e[1].length),
        ((BS - 10) as u32, (BS + 10) as u32)
    );
    // After close the map still reads, writes are refused.
    let status = m.status();
    m.close().unwrap();
    assert_eq!(t.extents(0, 100, 10).unwrap()[0].flags, 0);
    assert!(t.admit(0, 1).is_err());
    assert_eq!(status.dirty_bytes, BS + 100);
}

#[test]
fn a_sequential_writer_syncs_the_log_once_per_eight_extents() {
    let f = fixture(256 * MIB, 1024);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    // 2 MiB writes in order over 64 extents, as `qemu-img convert` does.
    for i in 0..128 {
        write(&t, i * 2 * MIB, 2 * MIB);
    }
    let al = m.status().al;
    // Extent 0 alone, then 8 at a time (the one written and 7 ahead): 1 + 63 / 8 ⌈⌉ = 9.
    assert!(al.transactions <= 10, "{al:?}");
    assert_eq!(al.evictions, 0, "{al:?}");
    // A crash now marks at most the read-ahead beyond what was written: nothing here, the
    // writer reached the end.
    drop(t);
    drop(m);
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.open_report().recovered_extents, 64);

    // Scattered writes get no read-ahead: one transaction each, nothing extra after a crash.
    let f = fixture(256 * MIB, 1024);
    let m = Meta::open(&f.path, f.size).unwrap();
    let t = m.tracker();
    for e in [3u64, 17, 40, 9] {
        write(&t, e * EXTENT_SIZE, 4096);
    }
    assert_eq!(m.status().al.transactions, 4);
    drop(t);
    drop(m);
    let m = Meta::open(&f.path, f.size).unwrap();
    assert_eq!(m.open_report().recovered_extents, 4);
}
