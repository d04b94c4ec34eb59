//! Power cuts, simulated: the metadata file is opened on a disk that records every write
//! and every `fdatasync`, a random workload runs (writes through the AL with evictions,
//! wide writes, writes left in flight, marks, flushes, a clean close), and then, for every
//! `fdatasync` in the log, the file is rebuilt as a power cut just before it completed
//! could leave it: everything synced before, plus any subset of the writes issued since
//! (the disk may have made some, in any order), one of them possibly torn in half. Each
//! image must open, and every block whose write was admitted before that point (in the
//! generation the image's superblock claims) must be dirty.
//!
//! A `kill -9` test cannot show this: the page cache survives the process. Here nothing
//! unsynced is assumed to survive.

use crate::disk::Disk;
use crate::layout::EXTENT_SIZE;
use crate::{CreateOptions, Meta};
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
enum Op {
    Write { at: u64, data: Vec<u8> },
    Sync,
}

struct Recording {
    file: File,
    log: Arc<Mutex<Vec<Op>>>,
}

impl Disk for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::Write {
            at: offset,
            data: buf.to_vec(),
        });
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::Sync);
        Ok(())
    }
}

const BS: u64 = 64 << 10;
const SIZE: u64 = 96 << 20;

/// One admitted write: its blocks, the generation it was marked in, where in the log its
/// `admit` returned, and where its release happened (if it did).
struct Admitted {
    blocks: (u64, u64),
    gen: u64,
    returned_at: usize,
    released_at: Option<usize>,
}

/// A mark: where its swap happened (before its superblock write) and the generation it
/// started.
struct Marked {
    at: usize,
    gen: u64,
}

struct Workload<'a> {
    rng: &'a mut rand::rngs::StdRng,
    log: Arc<Mutex<Vec<Op>>>,
    admitted: Vec<Admitted>,
    marks: Vec<Marked>,
}

impl Workload<'_> {
    fn pos(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn open(&self, path: &std::path::Path) -> Meta {
        let log = self.log.clone();
        Meta::open_on(path, SIZE, move |file| {
            Ok(Box::new(Recording { file, log }))
        })
        .unwrap()
    }

    /// `ops` operations; writes left in flight are released at the end unless a crash
    /// follows.
    fn run(&mut self, meta: &Meta, ops: usize, crash: bool) {
        let t = meta.tracker_with(std::time::Duration::ZERO);
        let mut inflight: Vec<(usize, u64, u64)> = Vec::new();
        for op in 0..ops {
            // Every other stretch of 60 operations only writes, with many cold extents:
            // long enough for an evicted extent to leave the AL ring (16 transactions)
            // without a flush or a wide write persisting its bits by chance.
            let writes_only = (op / 60) % 2 == 1;
            let pick = if writes_only {
                self.rng.random_range(0..70)
            } else {
                self.rng.random_range(0..100)
            };
            match pick {
                0..=69 => {
                    // Within a few extents (hot), or anywhere (cold, evicting).
                    let hot = self.rng.random_bool(if writes_only { 0.3 } else { 0.7 });
                    let span = if hot { 4 * EXTENT_SIZE } else { SIZE };
                    let offset = self.rng.random_range(0..span - 1);
                    let length = self.rng.random_range(1..=(3 * BS).min(SIZE - offset));
                    t.admit(offset, length).unwrap();
                    let i = self.admitted.len();
                    self.admitted.push(Admitted {
                        blocks: (offset / BS, (offset + length - 1) / BS),
                        gen: self.marks.last().unwrap().gen,
                        returned_at: self.pos(),
                        released_at: None,
                    });
                    if self.rng.random_bool(0.1) && inflight.len() < 2 {
                        inflight.push((i, offset, length));
                    } else {
                        t.release(offset, length);
                        self.admitted[i].released_at = Some(self.pos());
                    }
                }
                70..=74 => {
                    // A wide write (TRIM): through the bitmap.
                    let offset = self.rng.random_range(0..SIZE / 2);
                    let length = SIZE / 2;
                    t.admit(offset, length).unwrap();
                    self.admitted.push(Admitted {
                        blocks: (offset / BS, (offset + length - 1) / BS),
                        gen: self.marks.last().unwrap().gen,
                        returned_at: self.pos(),
                        released_at: Some(self.pos()),
                    });
                    t.release(offset, length);
                }
                75..=84 => {
                    let at = self.pos();
                    let snap = meta.mark().unwrap();
                    self.marks.push(Marked {
                        at,
                        gen: snap.to_gen,
                    });
                }
                85..=94 => {
                    meta.flush().unwrap();
                }
                _ => {
                    if let Some((i, offset, length)) = inflight.pop() {
                        t.release(offset, length);
                        self.admitted[i].released_at = Some(self.pos());
                    }
                }
            }
        }
        if !crash {
            for (i, offset, length) in inflight.drain(..) {
                t.release(offset, length);
                self.admitted[i].released_at = Some(self.pos());
            }
        }
    }
}

fn apply(image: &mut [u8], at: u64, data: &[u8]) {
    image[at as usize..at as usize + data.len()].copy_from_slice(data);
}

#[test]
fn every_power_cut_leaves_a_file_that_opens_with_every_admitted_write_dirty() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.md");
    let opts = CreateOptions {
        al_extents: 3,
        block_size: BS as u32,
        ..CreateOptions::new(SIZE)
    };
    let info = Meta::create_with(&path, &opts).unwrap();
    let base = std::fs::read(&path).unwrap();

    let log = Arc::new(Mutex::new(Vec::new()));
    let mut w = Workload {
        rng: &mut rng,
        log: log.clone(),
        admitted: Vec::new(),
        marks: vec![Marked {
            at: 0,
            gen: info.bitmap_gen,
        }],
    };
    // Session 1 ends in a crash (writes left in flight), session 2 recovers (that open is
    // recorded too) and closes cleanly.
    let meta = w.open(&path);
    w.run(&meta, 240, true);
    drop(meta);
    // The process died; the kernel writes what it had in time: all of it is on disk.
    log.lock().unwrap().push(Op::Sync);
    let crashed_at = log.lock().unwrap().len();
    for a in &mut w.admitted {
        a.released_at.get_or_insert(crashed_at);
    }
    let meta = w.open(&path);
    assert!(!meta.open_report().last_shutdown_clean);
    w.run(&meta, 240, false);
    meta.close().unwrap();
    let Workload {
        admitted, marks, ..
    } = w;

    let log = log.lock().unwrap().clone();
    let syncs: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Sync))
        .map(|(i, _)| i)
        .collect();
    assert!(syncs.len() > 40, "only {} syncs", syncs.len());
    let mut durable = base.clone();
    let mut from = 0;
    let mut images = 0;
    let img_path = dir.path().join("image.md");
    // Crash points: before each sync completes, and after the last one.
    for cut in syncs.iter().copied().chain([log.len()]) {
        let pending: Vec<(u64, &[u8])> = log[from..cut]
            .iter()
            .filter_map(|op| match op {
                Op::Write { at, data } => Some((*at, data.as_slice())),
                Op::Sync => None,
            })
            .collect();
        let mut variants: Vec<Vec<u8>> = Vec::new();
        let n = pending.len().min(4);
        for subset in 0..1u32 << n {
            let mut img = durable.clone();
            for (j, (at, data)) in pending.iter().enumerate().take(n) {
                if subset & (1 << j) != 0 {
                    apply(&mut img, *at, data);
                }
            }
            variants.push(img);
        }
        for (at, data) in &pending {
            let mut img = durable.clone();
            apply(&mut img, *at, &data[..data.len() / 2]);
            variants.push(img);
        }
        for img in variants {
            images += 1;
            std::fs::write(&img_path, &img).unwrap();
            let m = Meta::open(&img_path, SIZE)
                .unwrap_or_else(|e| panic!("cut at log {cut} (seed {seed}): {e}"));
            let gen = m.status().bitmap_gen;
            let Some(mi) = marks.iter().position(|mk| mk.gen == gen) else {
                panic!("cut at log {cut}: unknown generation {gen:#x} (seed {seed})");
            };
            let mark_at = marks[mi].at;
            let t = m.tracker();
            for (k, a) in admitted.iter().enumerate() {
                if a.returned_at > cut {
                    continue;
                }
                // Marked in this generation, or still in flight when its mark swapped.
                let in_gen = a.gen == gen
                    || (mi > 0
                        && a.returned_at <= mark_at
                        && a.released_at.is_none_or(|r| r > mark_at));
                if !in_gen {
                    continue;
                }
                let len = (a.blocks.1 - a.blocks.0 + 1) * BS;
                let runs = t.dirty_runs(a.blocks.0 * BS, len.min(SIZE - a.blocks.0 * BS), 1);
                assert!(
                    runs.len() == 1 && runs[0].1 && runs[0].0 == len.min(SIZE - a.blocks.0 * BS),
                    "cut at log {cut} (seed {seed}): write {k} (blocks {:?}) not dirty",
                    a.blocks
                );
            }
            drop(t);
            drop(m);
        }
        // The sync completes.
        for (at, data) in &pending {
            apply(&mut durable, *at, data);
        }
        from = cut;
    }
    eprintln!("{} syncs, {images} images checked", syncs.len());
}
