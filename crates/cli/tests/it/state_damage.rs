//! Damaged state between runs (issue 4, item 4): partial files (`.cutover.<hash>.part`)
//! with flipped bytes, cut short or extended with garbage, and a plan's state database
//! (SQLite, WAL) with a garbled header, a garbled page, cut short, or with garbage in the
//! write-ahead log of a runner that was killed. The next run must never trust the damaged
//! bytes: the destination ends exact (rsync `--checksum` oracle), and a damaged database is
//! refused with one line that names it and the fix, before any pass runs. State damage may
//! cost time, never data: the engine compares content whatever the store says.

use crate::util::*;
use rustix::process::Signal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Partial files.

/// How a partial file is damaged between two runs.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// 64 bytes flipped at 24 places spread over the file (written ranges and holes alike).
    Flip,
    /// Cut to a third of its length.
    Truncate,
    /// 3 MiB of random bytes appended.
    Extend,
}

fn damage_partial(p: &Path, how: Damage, seed: u64) {
    let len = std::fs::metadata(p).unwrap().len();
    match how {
        Damage::Flip => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap();
            let noise = random_bytes(seed, 24 * 8);
            for i in 0..24u64 {
                let at = (len / 24) * i + u64::from(noise[i as usize]) * 97 % (len / 24);
                let at = at.min(len.saturating_sub(64));
                let mut buf = vec![0u8; 64];
                f.read_exact_at(&mut buf, at).unwrap();
                for b in &mut buf {
                    *b ^= 0x5a;
                }
                f.write_all_at(&buf, at).unwrap();
            }
        }
        Damage::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(len / 3).unwrap();
        }
        Damage::Extend => {
            let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&random_bytes(seed, 3 * MIB)).unwrap();
        }
    }
}

/// Start a slow local sync and SIGKILL it once its partial file holds `held` bytes; returns
/// the partial left behind.
fn interrupted_sync(src: &Path, dst: &Path, held: u64) -> PathBuf {
    let mut run = spawn_sync(&["--bwlimit", "6M", "-j", "2", &slash(src), &slash(dst)]);
    let started = Instant::now();
    loop {
        let parts = partials_in(dst);
        if let Some(p) = parts.first() {
            if std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0) >= held {
                break;
            }
        }
        assert!(run.running(), "the sync ended before it was interrupted");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no partial file with {held} bytes in {} after 20 s",
            dst.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run.signal(Signal::KILL);
    let out = run.wait();
    assert!(out.status.code().is_none(), "not killed: {out}");
    let parts = partials_in(dst);
    assert_eq!(parts.len(), 1, "{parts:?}");
    parts[0].clone()
}

use std::os::unix::fs::MetadataExt;

/// For each kind of damage, with and without an old target beside the partial: interrupt a
/// copy, damage its partial file, run again. The rerun uses the partial only as a basis it
/// hashes, so the result is exact and no partial is left.
#[test]
fn a_damaged_partial_file_is_never_trusted() {
    let t = tmp();
    let src = t.path().join("src");
    let new = random_bytes(1, 12 * MIB);
    write(&src.join("big.bin"), &new);
    write(&src.join("small.txt"), b"beside it\n");
    for (i, how) in [Damage::Flip, Damage::Truncate, Damage::Extend]
        .into_iter()
        .enumerate()
    {
        for with_target in [false, true] {
            let dst = t.path().join(format!("dst-{how:?}-{with_target}"));
            // An older version shares its first 4 MiB with the new one: the rerun copies
            // those from the target (fast) and sends the rest (slow, so it can be killed).
            let held = if with_target {
                let mut old = new[..4 * MIB].to_vec();
                old.extend(random_bytes(99, 8 * MIB));
                write(&dst.join("big.bin"), &old);
                6 * MIB as u64
            } else {
                3 * MIB as u64
            };
            let partial = interrupted_sync(&src, &dst, held);
            damage_partial(&partial, how, 10 + i as u64);
            let out = sync_json(&["-j", "2", &slash(&src), &slash(&dst)]);
            out.ok();
            assert_same(&src, &dst);
            assert!(
                partials_in(&dst).is_empty(),
                "{how:?} (target: {with_target}): partial left: {:?}",
                partials_in(&dst)
            );
            eprintln!(
                "{how:?} (target: {with_target}): the rerun sent {} literal bytes",
                out.stat("bytes_literal")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The plan's state database.

fn plan(args: &[&str]) -> Out {
    let mut c = cutover_cmd();
    c.arg("plan").args(args);
    Running::start(c).wait()
}

/// How the state database is damaged between runs.
#[derive(Debug, Clone, Copy)]
enum DbDamage {
    /// The 100-byte SQLite header overwritten.
    Header,
    /// The second page (a table's root) overwritten with random bytes.
    Page,
    /// Cut to half its length.
    Truncate,
    /// The root page of the `errors` table overwritten: a page neither `status` nor a
    /// successful pass reads, so only an integrity check at open finds it (without one, the
    /// first error a run tried to record would fail in the middle of that run).
    ErrorsTable,
}

/// The page number of a table's root (1-based), read with python's sqlite3 module.
fn root_page(db: &Path, table: &str) -> u64 {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute(\"select rootpage from sqlite_master where name='{table}'\").fetchone()[0])"
        ))
        .arg(db)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn damage_db(db: &Path, how: DbDamage) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    let len = f.metadata().unwrap().len();
    match how {
        DbDamage::Header => f.write_all_at(&[0xaa; 100], 0).unwrap(),
        DbDamage::Page => {
            assert!(len >= 8192, "state.db is only {len} bytes");
            f.write_all_at(&random_bytes(7, 4096), 4096).unwrap();
        }
        DbDamage::Truncate => f.set_len(len / 2).unwrap(),
        DbDamage::ErrorsTable => {
            let page = root_page(db, "errors");
            assert!(page * 4096 <= len, "page {page} beyond {len} bytes");
            f.write_all_at(&random_bytes(8, 4096), (page - 1) * 4096)
                .unwrap();
        }
    }
}

/// Move the database (and its -wal/-shm files) aside, as the error message says.
fn set_aside(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            std::fs::rename(&p, format!("{}.damaged", p.display())).unwrap();
        }
    }
}

/// `dir/src` (an mkdata tree of `files` files), an empty `dir/dst`, and `dir/move.toml`: one
/// tree task `t` from `src/` into `dst/t/`, with `extra` task keys.
fn one_tree_task(
    dir: &std::path::Path,
    files: &str,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join("src");
    mkdata(&["tree", s(&src), "--files", files]);
    let dst = dir.join("dst");
    std::fs::create_dir(&dst).unwrap();
    let p = dir.join("move.toml");
    write(
        &p,
        format!(
            "[[task]]\nname = \"t\"\nkind = \"tree\"\nsource = \"src/\"\ndestination = \"{}\"\n{extra}",
            slash(&dst.join("t"))
        ),
    );
    (src, dst, p)
}

/// A plan with one tree task; presync; then for each kind of damage: change the source,
/// damage `state.db`, and check that `status` and `presync` refuse with one line naming the
/// file and the fix, without touching the destination; set it aside as told, presync again,
/// and the destination is exact.
#[test]
fn a_damaged_state_database_is_refused_clearly_and_costs_no_data() {
    let dir = tmp();
    let (src, dst, p) = one_tree_task(dir.path(), "40", "");
    let db = dir.path().join("move.state/state.db");
    plan(&["presync", s(&p)]).ok();
    assert_same(&src, &dst.join("t"));
    for (i, how) in [
        DbDamage::Header,
        DbDamage::Page,
        DbDamage::Truncate,
        DbDamage::ErrorsTable,
    ]
    .into_iter()
    .enumerate()
    {
        // What the next pass must carry over, whatever the store says.
        write(
            &src.join(format!("new-{i}.bin")),
            random_bytes(i as u64, 70_000),
        );
        damage_db(&db, how);
        let before = snapshot(&dst);
        for args in [vec!["status", s(&p)], vec!["presync", s(&p)]] {
            let out = plan(&args);
            assert_one_line_error(&out, &[s(&db), "damaged", "move it aside", "presync"]);
            eprintln!("{how:?}: {}", out.err_lines()[0]);
        }
        assert!(
            snapshot(&dst) == before,
            "{how:?}: a run with a damaged store changed the destination"
        );
        set_aside(&db);
        plan(&["presync", s(&p)]).ok();
        assert_same(&src, &dst.join("t"));
        plan(&["status", s(&p)]).ok();
    }
}

/// A runner SIGKILLed mid-pass leaves its write-ahead log; garbage written into that log
/// must not make the next runs lose data. SQLite drops the frames from the first one whose
/// checksum fails, so the store reads as it was earlier (here: after the first, complete
/// presync) or is refused as damaged; the next presync compares content, so the destination
/// ends exact either way.
#[test]
fn garbage_in_the_write_ahead_log_of_a_killed_runner_costs_no_data() {
    let dir = tmp();
    let (src, dst, p) = one_tree_task(dir.path(), "20", "bwlimit = \"1M\"\n");
    let db = dir.path().join("move.state/state.db");
    let wal = dir.path().join("move.state/state.db-wal");
    plan(&["presync", s(&p)]).ok();
    write(&src.join("slow.bin"), random_bytes(5, 4 * MIB));
    let mut c = cutover_cmd();
    c.arg("plan").args(["presync", s(&p)]);
    let mut runner = Running::start(c);
    let started = Instant::now();
    // Progress rows land in the log while the pass runs.
    while !(wal.exists() && std::fs::metadata(&wal).unwrap().len() > 16 << 10) {
        assert!(runner.running(), "the runner ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(20), "no WAL grew");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    runner.signal(Signal::KILL);
    runner.wait();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&random_bytes(9, 8192), len / 2).unwrap();
    }
    let status = plan(&["status", s(&p)]);
    eprintln!(
        "status after WAL damage: exit {}\n{}",
        status.code(),
        status
    );
    if status.code() != 0 {
        assert_one_line_error(&status, &[s(&db), "damaged"]);
    }
    let out = plan(&["presync", s(&p)]);
    if out.code() != 0 {
        assert_one_line_error(&out, &[s(&db), "damaged", "move it aside"]);
        set_aside(&db);
        plan(&["presync", s(&p)]).ok();
    }
    assert_same(&src, &dst.join("t"));
    assert!(partials_in(&dst.join("t")).is_empty());
}
