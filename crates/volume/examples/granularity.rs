//! The measurement behind the default bitmap granularity: for 4, 16 and 64 KiB blocks
//! (and 256 KiB for perspective), what the bitmap costs to keep (memory, disk, the time
//! to load, persist and flush it) against what it costs to resync from it (bytes that
//! cross the link, blocks read from the backing) for a few write patterns.
//!
//! ```sh
//! cargo run --release -p volume --example granularity -- [DIR]
//! ```
//!
//! DIR (default: the temporary directory) must be on a real disk: the persistence and
//! read-latency figures are taken there, with `fdatasync` and `O_DIRECT`. The write
//! patterns themselves run through the real Tracker with the metadata on /dev/shm when
//! it exists, so that the AL's `fdatasync`s (the same for every granularity) do not
//! drown the figures. It needs about 1.2 GiB free in DIR.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use volume::{CreateOptions, Meta, EXTENT_SIZE};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const SIZES: [u64; 4] = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB];
/// The volume the patterns write to.
const VOLUME: u64 = TIB;

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= GIB => format!("{:.1} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b => format!("{:.0} KiB", b as f64 / KIB as f64),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

fn create(dir: &Path, name: &str, block: u64) -> PathBuf {
    let path = dir.join(name);
    let opts = CreateOptions {
        block_size: block as u32,
        force: true,
        ..CreateOptions::new(VOLUME)
    };
    Meta::create_with(&path, &opts).expect("create");
    path
}

/// A write pattern: (offset, length) pairs.
struct Pattern {
    name: &'static str,
    what: &'static str,
    writes: Vec<(u64, u64)>,
}

fn patterns() -> Vec<Pattern> {
    let mut rng = StdRng::seed_from_u64(7);
    let hot_base = 100 * GIB;
    let oltp = |rng: &mut StdRng, n: usize, len: u64| -> Vec<(u64, u64)> {
        (0..n)
            .map(|_| {
                let off = if rng.random_bool(0.9) {
                    hot_base + rng.random_range(0..2 * GIB / len) * len
                } else {
                    rng.random_range(0..VOLUME / len) * len
                };
                (off, len)
            })
            .collect()
    };
    vec![
        Pattern {
            name: "oltp-4k",
            what: "200k random 4 KiB writes, 90% in a 2 GiB hot set",
            writes: oltp(&mut rng, 200_000, 4 * KIB),
        },
        Pattern {
            name: "oltp-16k",
            what: "100k random 16 KiB writes (InnoDB pages), 90% in 2 GiB",
            writes: oltp(&mut rng, 100_000, 16 * KIB),
        },
        Pattern {
            name: "scatter-4k",
            what: "20k random 4 KiB writes over the whole 1 TiB",
            writes: (0..20_000)
                .map(|_| (rng.random_range(0..VOLUME / (4 * KIB)) * 4 * KIB, 4 * KIB))
                .collect(),
        },
        Pattern {
            name: "append-1m",
            what: "4 GiB of sequential 1 MiB writes (a file copy, a log)",
            writes: (0..4096).map(|i| (500 * GIB + i * MIB, MIB)).collect(),
        },
    ]
}

/// Distinct 4 KiB pieces a pattern writes: the least any granularity could resend.
fn written(p: &Pattern) -> u64 {
    let mut pieces: Vec<u64> = p
        .writes
        .iter()
        .flat_map(|&(o, l)| o / (4 * KIB)..(o + l).div_ceil(4 * KIB))
        .collect();
    pieces.sort_unstable();
    pieces.dedup();
    pieces.len() as u64 * 4 * KIB
}

/// Mean time of a random `O_DIRECT` read of `block` bytes from `file` (`None` where
/// `O_DIRECT` is not available).
fn read_latency(file: &Path, file_len: u64, block: u64, n: usize) -> Option<Duration> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(file)
        .ok()?;
    // O_DIRECT wants an aligned buffer.
    let mut raw = vec![0u8; (block + 4096) as usize];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + block as usize];
    let mut rng = StdRng::seed_from_u64(block);
    let start = Instant::now();
    for _ in 0..n {
        let at = rng.random_range(0..file_len / block) * block;
        f.read_exact_at(buf, at).ok()?;
    }
    Some(start.elapsed() / n as u32)
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&dir).expect("a directory in DIR");
    let shm = Path::new("/dev/shm");
    let fast = if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("a directory in /dev/shm")
    } else {
        tempfile::tempdir_in(dir.path()).expect("a directory")
    };
    println!(
        "persistence and reads in {}, patterns with metadata in {}",
        dir.path().display(),
        fast.path().display()
    );

    println!("\n## Keeping the bitmap (one peer slot)\n");
    println!(
        "| block | bitmap per TiB | 16 TiB volume (RAM and disk) | open 1 TiB | close 1 TiB \
         (write all + fdatasync) | flush after 20k writes in 1024 hot extents |"
    );
    println!("|---|---|---|---|---|---|");
    for &block in &SIZES {
        let per_tib = TIB / block / 8;
        let path = create(dir.path(), "persist.md", block);
        let t0 = Instant::now();
        let meta = Meta::open(&path, VOLUME).expect("open");
        let open = t0.elapsed();
        // Warm 1024 extents spread over the volume (the AL's capacity), then write into
        // them only: no AL traffic, the flush writes what the bits touched.
        let mut rng = StdRng::seed_from_u64(block);
        let extents: Vec<u64> = (0..1024)
            .map(|_| rng.random_range(0..VOLUME / EXTENT_SIZE))
            .collect();
        let t = meta.tracker();
        for &e in &extents {
            t.admit(e * EXTENT_SIZE, 4096).unwrap();
            t.release(e * EXTENT_SIZE, 4096);
        }
        meta.flush().unwrap();
        for _ in 0..20_000 {
            let e = extents[rng.random_range(0..extents.len())];
            let off = e * EXTENT_SIZE + rng.random_range(0..EXTENT_SIZE / 4096) * 4096;
            t.admit(off, 4096).unwrap();
            t.release(off, 4096);
        }
        let pages = meta.status().unpersisted_pages;
        let t0 = Instant::now();
        meta.flush().unwrap();
        let flush = t0.elapsed();
        drop(t);
        let t0 = Instant::now();
        meta.close().unwrap();
        let close = t0.elapsed();
        println!(
            "| {} | {} | {} | {} | {} | {} pages, {} |",
            human(block),
            human(per_tib),
            human(16 * per_tib),
            ms(open),
            ms(close),
            pages,
            ms(flush)
        );
    }

    // A data file for the read latencies (written, so that reads hit the disk).
    let data = dir.path().join("data.img");
    let data_len = GIB;
    {
        let f = std::fs::File::create(&data).expect("data file");
        let chunk = vec![0x5au8; MIB as usize];
        for i in 0..data_len / MIB {
            f.write_all_at(&chunk, i * MIB).expect("write data");
        }
        f.sync_all().expect("sync data");
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).ok();
    }
    println!("\n## Reading blocks back (what resync reads from the backing)\n");
    println!("| read size | random O_DIRECT read |");
    println!("|---|---|");
    let mut latency = Vec::new();
    for &size in SIZES.iter().chain(&[MIB]) {
        let l = read_latency(&data, data_len, size, 2000);
        println!(
            "| {} | {} |",
            human(size),
            l.map_or("n/a (no O_DIRECT)".into(), |d| format!(
                "{:.0} µs",
                d.as_secs_f64() * 1e6
            ))
        );
        latency.push((size, l));
    }
    let _ = std::fs::remove_file(&data);
    // A resync reads each run of dirty blocks in pieces of at most 1 MiB; a piece costs
    // what the smallest measured read at least as large cost.
    let read_time = |snap: &volume::Snapshot| -> Option<f64> {
        let mut total = 0.0;
        for (_, len) in snap.extents() {
            let mut left = len;
            while left > 0 {
                let piece = left.min(MIB);
                let (_, l) = latency.iter().find(|(size, _)| *size >= piece)?;
                total += l.as_ref()?.as_secs_f64();
                left -= piece;
            }
        }
        Some(total)
    };

    println!("\n## Resyncing from it (1 TiB volume)\n");
    println!(
        "| pattern | block | dirty | × written | tracker per write | backing reads | \
         1 Gbit/s | 100 Mbit/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in patterns() {
        let least = written(&p);
        for &block in &SIZES {
            let path = create(fast.path(), "pattern.md", block);
            let meta = Meta::open(&path, VOLUME).expect("open");
            let t = meta.tracker();
            let t0 = Instant::now();
            for &(o, l) in &p.writes {
                t.admit(o, l).unwrap();
                t.release(o, l);
            }
            let per_write = t0.elapsed() / p.writes.len() as u32;
            let snap = meta.mark().unwrap();
            let dirty = snap.bytes();
            let reads = read_time(&snap).map_or("n/a".into(), secs);
            println!(
                "| {} | {} | {} | {:.1} | {:.2} µs | {} | {} | {} |",
                p.name,
                human(block),
                human(dirty),
                dirty as f64 / least as f64,
                per_write.as_secs_f64() * 1e6,
                reads,
                secs(dirty as f64 / 125e6),
                secs(dirty as f64 / 12.5e6)
            );
            drop(t);
            meta.close().unwrap();
        }
    }
    println!();
    for p in patterns() {
        println!("- {}: {} ({} written)", p.name, p.what, human(written(&p)));
    }
}
