//! `mark()` racing with writes: a consumer that marks, then copies the snapshot's blocks to
//! a "peer" while writers keep writing, ends with an exact copy after one last mark once
//! the writers stop. The writers make each write land between `admit` (before_write) and
//! `release` (after_write), slowly, so that marks often fall in between: a block marked in
//! one generation whose data lands after the consumer read it must show up again in the
//! next generation.

use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use volume::{CreateOptions, Meta};

const BS: u64 = 64 << 10;

#[test]
fn a_consumer_of_marks_never_misses_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.md");
    let size = 64u64 << 20;
    let blocks = (size / BS) as usize;
    // A small AL (4 of the 16 extents): writers also wait for slots and evict.
    let opts = CreateOptions {
        al_extents: 4,
        block_size: BS as u32,
        ..CreateOptions::new(size)
    };
    Meta::create_with(&path, &opts).unwrap();
    let meta = Arc::new(Meta::open(&path, size).unwrap());
    let tracker = meta.tracker();
    let source: Arc<Vec<AtomicU64>> = Arc::new((0..blocks).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");

    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (tracker, source) = (tracker.clone(), source.clone());
            thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + w);
                for _ in 0..1500 {
                    let first = rng.random_range(0..blocks as u64);
                    let n = rng.random_range(1..=3u64).min(blocks as u64 - first);
                    let (offset, length) = (first * BS + rng.random_range(0..100), n * BS - 100);
                    tracker.admit(offset, length).unwrap();
                    if rng.random_bool(0.3) {
                        thread::sleep(Duration::from_micros(rng.random_range(0..200)));
                    }
                    for b in offset / BS..=(offset + length - 1) / BS {
                        source[b as usize].fetch_add(1, Ordering::SeqCst);
                    }
                    tracker.release(offset, length);
                }
            })
        })
        .collect();

    // One pass: copy the snapshot's blocks as they are now.
    let copy = |snap: &volume::Snapshot, source: &[AtomicU64], peer: &mut [u64]| {
        for (offset, length) in snap.extents() {
            for b in offset / BS..(offset + length).div_ceil(BS) {
                peer[b as usize] = source[b as usize].load(Ordering::SeqCst);
            }
        }
    };
    let consumer = {
        let (meta, stop, source) = (meta.clone(), stop.clone(), source.clone());
        thread::spawn(move || {
            let mut peer = vec![0u64; blocks];
            let mut passes = 0;
            while !stop.load(Ordering::SeqCst) {
                copy(&meta.mark().unwrap(), &source, &mut peer);
                passes += 1;
            }
            (peer, passes)
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let (mut peer, passes) = consumer.join().unwrap();
    copy(&meta.mark().unwrap(), &source, &mut peer);
    assert!(passes > 10, "only {passes} passes overlapped the writes");
    let missed: Vec<usize> = (0..blocks)
        .filter(|&b| peer[b] != source[b].load(Ordering::SeqCst))
        .collect();
    assert!(missed.is_empty(), "blocks the marks lost: {missed:?}");
    let s = meta.status();
    assert_eq!(s.counters.writes, 4 * 1500);
    assert_eq!(s.al.pinned, 0);
    assert!(s.al.evictions > 0);
}

/// `close()` while writes of every kind are arriving: it must not wait for a write that
/// waits for it, and every write either completes or is refused.
#[test]
fn close_under_load_neither_hangs_nor_loses_a_write() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.md");
        let size = 256u64 << 20;
        let opts = CreateOptions {
            al_extents: 4,
            block_size: BS as u32,
            ..CreateOptions::new(size)
        };
        Meta::create_with(&path, &opts).unwrap();
        let meta = Meta::open(&path, size).unwrap();
        let tracker = meta.tracker();
        let stop = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (tracker, stop, admitted) = (tracker.clone(), stop.clone(), admitted.clone());
                thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(round * 10 + w);
                    while !stop.load(Ordering::SeqCst) {
                        // Wide writes (through the bitmap) and narrow ones (through the AL).
                        let (offset, length) = if rng.random_bool(0.3) {
                            (rng.random_range(0..size / 2), size / 2)
                        } else {
                            (rng.random_range(0..size - BS), BS)
                        };
                        if tracker.admit(offset, length).is_err() {
                            return;
                        }
                        admitted.lock().unwrap().push((offset, length));
                        tracker.release(offset, length);
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(20));
        let (tx, rx) = std::sync::mpsc::channel();
        let closer = thread::spawn(move || tx.send(meta.close()).unwrap());
        let closed = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("close() hung under load");
        closed.unwrap();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        closer.join().unwrap();
        drop(tracker);
        let meta = Meta::open(&path, size).unwrap();
        assert!(meta.open_report().last_shutdown_clean);
        let t = meta.tracker();
        for &(offset, length) in admitted.lock().unwrap().iter() {
            let runs = t.dirty_runs(offset, length, 2);
            assert!(
                runs.len() == 1 && runs[0].1,
                "write at {offset} lost by close"
            );
        }
    }
}
