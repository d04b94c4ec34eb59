//! End to end, with real processes: the `serve_volume` example serves a backing file over
//! NBD with the Tracker as observer and `cutover:dirty` as a context; qemu-io writes to it
//! (plain, FUA, and flushes), nbdinfo reads the dirty map, and the example is killed with
//! SIGKILL in the middle of two concurrent write streams. Reopening the metadata must then
//! succeed and show dirty every block written since the mark (per the clients' logs, and
//! every block whose content changed since the mark), and every acknowledged write must
//! read back from the backing.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volume::{CreateOptions, Meta};

const SIZE: u64 = 256 << 20;
const BS: u64 = 64 << 10;

/// The example binary, built if needed (`cargo test --test crash` alone does not build
/// examples), next to this test's own profile directory.
fn serve_volume() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-q", "-p", "volume", "--example", "serve_volume"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo build of the example");
    assert!(status.success(), "building the serve_volume example failed");
    profile_dir.join("examples").join("serve_volume")
}

/// The example, running.
struct Server {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    uri: String,
}

impl Server {
    fn start(dir: &Path, backing: &Path, meta: &Path) -> Server {
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(serve_volume())
            .arg(backing)
            .arg(meta)
            .arg(&socket)
            .arg("vol")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start serve_volume");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        Server {
            child,
            stdin,
            lines,
            uri: format!("nbd+unix:///vol?socket={}", socket.display()),
        }
    }

    /// Send a command, return its one-line answer.
    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.lines.next().unwrap().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(uri: &str, commands: &[String]) -> Command {
    // Line-buffered, so that acknowledgements can be counted as they come.
    let mut c = Command::new("stdbuf");
    c.args(["-oL", "qemu-io", "-f", "raw"]);
    for cmd in commands {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    c
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/test installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --map=cutover:dirty` as (offset, length, flags) rows.
fn dirty_map(uri: &str) -> Vec<(u64, u64, u32)> {
    run(Command::new("nbdinfo").arg("--map=cutover:dirty").arg(uri))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The map nbdinfo should print when exactly `blocks` are dirty.
fn expected_map(blocks: &[u64]) -> Vec<(u64, u64, u32)> {
    let mut rows: Vec<(u64, u64, u32)> = Vec::new();
    for b in 0..SIZE / BS {
        let flag = u32::from(blocks.contains(&b));
        match rows.last_mut() {
            Some(r) if r.2 == flag => r.1 += BS,
            _ => rows.push((b * BS, BS, flag)),
        }
    }
    rows
}

fn read(path: &Path, offset: u64, length: u64) -> Vec<u8> {
    let mut buf = vec![0u8; length as usize];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(path).unwrap(),
        &mut buf,
        offset,
    )
    .unwrap();
    buf
}

fn read_block(path: &Path, block: u64) -> Vec<u8> {
    read(path, block * BS, BS)
}

fn blocks_of(offset: u64, length: u64) -> impl Iterator<Item = u64> {
    offset / BS..=(offset + length - 1) / BS
}

fn make_volume(dir: &Path) -> (PathBuf, PathBuf) {
    let backing = dir.join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let meta = dir.join("disk.md");
    // 4 hot extents of the volume's 64: the streams below keep evicting.
    let opts = CreateOptions {
        al_extents: 4,
        block_size: BS as u32,
        ..CreateOptions::new(SIZE)
    };
    Meta::create_with(&meta, &opts).unwrap();
    (backing, meta)
}

/// Write before the mark, check the map, mark, check it is clear.
fn before_the_mark(server: &mut Server) -> Vec<u64> {
    let writes = [(0u64, 4096u64), (3 * BS + 5, 70_000), (40 << 20, BS)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x11 {o} {l}"))
        .collect();
    run(&mut qemu_io(&server.uri, &cmds));
    let mut blocks: Vec<u64> = writes.iter().flat_map(|&(o, l)| blocks_of(o, l)).collect();
    blocks.sort();
    blocks.dedup();
    assert_eq!(dirty_map(&server.uri), expected_map(&blocks));
    let marked = server.command("mark");
    assert!(
        marked.starts_with(&format!("marked {} ", blocks.len())),
        "{marked}"
    );
    assert_eq!(dirty_map(&server.uri), vec![(0, SIZE, 0)]);
    blocks
}

#[test]
fn clean_close_over_nbd_keeps_exactly_the_blocks_written_since_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, meta) = make_volume(dir.path());
    let mut server = Server::start(dir.path(), &backing, &meta);
    before_the_mark(&mut server);
    let writes = [
        (5 << 20, 1000u64),
        (9 << 20, 3 * BS),
        ((255 << 20) + 7, 100),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(i, (o, l))| format!("write {} -P 0x22 {o} {l}", if i == 1 { "-f" } else { "" }))
        .chain(["flush".to_string()])
        .collect();
    run(&mut qemu_io(&server.uri, &cmds));
    let mut blocks: Vec<u64> = writes.iter().flat_map(|&(o, l)| blocks_of(o, l)).collect();
    blocks.sort();
    assert_eq!(dirty_map(&server.uri), expected_map(&blocks));
    assert_eq!(server.command("close"), "closed");
    assert!(server.child.wait().unwrap().success());

    let m = Meta::open(&meta, SIZE).unwrap();
    assert!(m.open_report().last_shutdown_clean);
    let s = m.status();
    assert_eq!(s.dirty_blocks, blocks.len() as u64);
    let t = m.tracker();
    for &b in &blocks {
        assert!(t.dirty_runs(b * BS, BS, 1)[0].1, "block {b}");
    }
}

/// One write of a stream.
#[derive(Clone, Copy, Debug)]
struct W {
    offset: u64,
    length: u64,
    pattern: u8,
    fua: bool,
}

/// What a stream's output says: the writes acknowledged, and how many of them came before
/// the last completed flush.
fn acknowledged(output: &[String], by_offset: &HashMap<u64, W>, marker: u64) -> (Vec<W>, usize) {
    let mut acked = Vec::new();
    let mut flushed = 0;
    for line in output {
        let Some(at) = line.split(" at offset ").nth(1) else {
            continue;
        };
        let offset: u64 = at.trim().parse().unwrap();
        if line.starts_with("wrote ") {
            acked.push(by_offset[&offset]);
        } else if line.starts_with("read ") && offset == marker {
            flushed = acked.len();
        }
    }
    (acked, flushed)
}

#[test]
fn kill_9_mid_stream_loses_no_write_since_the_mark() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (backing, meta) = make_volume(dir.path());
    let mut server = Server::start(dir.path(), &backing, &meta);
    // The backing at the mark: zeroes but for these blocks.
    let base: HashMap<u64, Vec<u8>> = before_the_mark(&mut server)
        .into_iter()
        .map(|b| (b, read_block(&backing, b)))
        .collect();

    // Two streams of writes in disjoint 64 KiB slots (one write per slot, so that each
    // acknowledged write can be read back), a quarter with FUA, a flush every ten writes
    // followed by a marker read (qemu-io prints nothing for a flush).
    let mut slots: Vec<u64> = (0..SIZE / BS - 1).collect();
    slots.shuffle(&mut rng);
    let per_stream = 300;
    let mut streams: Vec<(Vec<String>, HashMap<u64, W>, u64)> = Vec::new();
    for s in 0..2u64 {
        let marker = SIZE - 512 * (s + 1);
        let mut cmds = Vec::new();
        let mut by_offset = HashMap::new();
        for i in 0..per_stream {
            let slot = slots[(2 * i + s as usize) % slots.len()];
            let length = rng.random_range(1..=40_000u64);
            let w = W {
                offset: slot * BS + rng.random_range(0..BS - length),
                length,
                pattern: rng.random_range(0x20..=0xff),
                fua: rng.random_bool(0.25),
            };
            cmds.push(format!(
                "write {} -P {:#x} {} {}",
                if w.fua { "-f" } else { "" },
                w.pattern,
                w.offset,
                w.length
            ));
            by_offset.insert(w.offset, w);
            if i % 10 == 9 {
                cmds.push("flush".into());
                cmds.push(format!("read {marker} 512"));
            }
        }
        streams.push((cmds, by_offset, marker));
    }
    let acks = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for (cmds, _, _) in &streams {
        let mut child = qemu_io(&server.uri, cmds)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (acks, keep) = (acks.clone(), lines.clone());
        let reader = std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if line.starts_with("wrote ") {
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                keep.lock().unwrap().push(line);
            }
        });
        clients.push((child, reader, lines));
    }
    let kill_at = rng.random_range(100..250);
    let start = Instant::now();
    while acks.load(Ordering::SeqCst) < kill_at {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "writes too slow"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let mut outputs = Vec::new();
    for (mut child, reader, lines) in clients {
        child.wait().unwrap();
        reader.join().unwrap();
        outputs.push(lines.lock().unwrap().clone());
    }

    let m = Meta::open(&meta, SIZE).expect("the metadata opens after SIGKILL");
    let report = m.open_report().clone();
    assert!(!report.last_shutdown_clean);
    assert!(report.recovered_extents > 0);
    let t = m.tracker();
    let dirty = |b: u64| t.dirty_runs(b * BS, BS, 1)[0].1;

    let mut acked_total = 0;
    let mut durable = 0;
    for ((_, by_offset, marker), output) in streams.iter().zip(&outputs) {
        let (acked, flushed) = acknowledged(output, by_offset, *marker);
        acked_total += acked.len();
        for (i, w) in acked.iter().enumerate() {
            // Acknowledged with FUA or before a completed flush: durable, and it reads
            // back. (After SIGKILL the page cache survives, so the others read back too.)
            if w.fua || i < flushed {
                durable += 1;
            }
            assert!(
                read(&backing, w.offset, w.length)
                    .iter()
                    .all(|&b| b == w.pattern),
                "acknowledged write {w:?} does not read back (seed {seed})"
            );
            for b in blocks_of(w.offset, w.length) {
                assert!(
                    dirty(b),
                    "acknowledged write {w:?}: block {b} clean (seed {seed})"
                );
            }
        }
        // A write issued but not acknowledged may have landed: then it must be dirty too.
        for w in by_offset.values() {
            if read(&backing, w.offset, 1)[0] == w.pattern {
                for b in blocks_of(w.offset, w.length) {
                    assert!(
                        dirty(b),
                        "landed write {w:?}: block {b} clean (seed {seed})"
                    );
                }
            }
        }
    }
    assert!(
        acked_total >= kill_at && acked_total < 2 * per_stream,
        "not mid-stream"
    );
    assert!(durable > 0);
    // Whatever changed since the mark is dirty.
    let zero = vec![0u8; BS as usize];
    for b in 0..SIZE / BS {
        if read_block(&backing, b) != *base.get(&b).unwrap_or(&zero) {
            assert!(
                dirty(b),
                "block {b} changed since the mark but is clean (seed {seed})"
            );
        }
    }
    let s = m.status();
    assert!(s.dirty_bytes < SIZE, "everything dirty proves nothing");
    eprintln!(
        "{acked_total} writes acknowledged ({durable} durable) before SIGKILL; {} extents \
         recovered from the AL; {} of {} blocks dirty",
        report.recovered_extents,
        s.dirty_blocks,
        SIZE / BS
    );
}
