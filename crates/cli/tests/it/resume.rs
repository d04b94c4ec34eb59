//! Interruptions: a client or daemon killed with SIGKILL mid-transfer leaves a partial file
//! that the next run resumes from; a source that keeps changing is reported (exit 4) and a
//! quiet re-run fixes it; Ctrl-C exits 130 and a re-run completes.

use crate::util::*;
use rustix::process::Signal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const BIG: u64 = 64 * MIB;
/// How often the live-source test appends. (Every 100 ms is not enough: a retry pass that
/// reads the whole file between two appends makes a consistent copy, and rightly exits 0.)
const APPEND_EVERY_MS: u64 = 10;

/// How many 1 MiB blocks of `p` hold anything but zeros (written by the interrupted run).
fn written_blocks(p: &Path) -> u64 {
    let data = std::fs::read(p).unwrap();
    data.chunks(MIB as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

/// Wait until the partial files of `dir` stop growing (the daemon finished what it had).
fn settled_partial(dir: &Path) -> std::path::PathBuf {
    let mut last = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let parts = partials_in(dir);
        assert!(
            parts.len() <= 1,
            "more than one partial file in {}: {parts:?}",
            dir.display()
        );
        if let Some(p) = parts.first() {
            let n = written_blocks(p);
            if last == Some(n) {
                return p.clone();
            }
            last = Some(n);
        }
    }
    panic!(
        "no settled partial file (.cutover.*.part) in {}: {:?}",
        dir.display(),
        std::fs::read_dir(dir).map(|r| r
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect::<Vec<_>>())
    );
}

/// Re-run after an interruption and check the resume only sent what was missing.
fn resume_and_check(src: &Path, dst: &Path, url: &str, written: u64) {
    let out = sync_json(&["-j", "2", &slash(src), url]);
    out.ok();
    let literal = out.stat("bytes_literal");
    println!(
        "resume: {written} MiB were written before the interruption; the re-run sent {literal} literal bytes"
    );
    let bound = BIG - written * MIB + 2 * MIB;
    assert!(
        literal <= bound,
        "resume sent {literal} literal bytes, but {written} MiB had been written already (bound {bound})\n{out}"
    );
    assert_same(src, dst);
    assert!(partials_in(dst).is_empty(), "partial file left behind");
}

#[test]
fn client_killed_mid_push_resumes_from_partial_file() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "64"]);
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let url = d.url("m/dst/");
    let mut client = spawn_sync(&["--bwlimit", "8M", "-j", "2", &slash(&src), &url]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(client.running(), "the limited push finished too early");
    client.signal(Signal::KILL);
    let out = client.wait();
    assert!(out.status.code().is_none(), "{out}");

    let dst = module.join("dst");
    let partial = settled_partial(&dst);
    assert!(
        !dst.join("big00.bin").exists(),
        "the target appeared although the transfer was killed"
    );
    let written = written_blocks(&partial);
    assert!(
        (4..64).contains(&written),
        "{written} MiB written in 2.5 s at 8 MiB/s?"
    );
    resume_and_check(&src, &dst, &url, written);
}

#[test]
fn daemon_killed_mid_push_keeps_old_version_and_resumes() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "64"]);
    let module = t.path().join("module");
    let dst = module.join("dst");
    let old = random_bytes(77, MIB as usize);
    write(&dst.join("big00.bin"), &old);
    let ddir = t.path().join("d");
    let mut d = Daemon::start(&ddir, &[Module::rw("m", &module)]);
    let url = d.url("m/dst/");
    let client = spawn_sync(&["--bwlimit", "8M", "-j", "2", &slash(&src), &url]);
    std::thread::sleep(Duration::from_millis(2500));
    d.kill9();
    let out = client.wait();
    assert_ne!(out.code(), 0, "the push survived its daemon\n{out}");
    assert_eq!(out.err_lines().len(), 1, "{out}");

    let partial = settled_partial(&dst);
    assert_eq!(
        std::fs::read(dst.join("big00.bin")).unwrap(),
        old,
        "the old version was damaged"
    );
    let written = written_blocks(&partial);
    assert!(
        (4..64).contains(&written),
        "{written} MiB written in 2.5 s at 8 MiB/s?"
    );

    let d2 = Daemon::start_with(&ddir, &d.config);
    resume_and_check(&src, &dst, &d2.url("m/dst/"), written);
}

#[test]
fn file_changing_during_copy_exits_4_then_quiet_rerun_is_exact() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "32"]);
    write(&src.join("quiet.txt"), "quiet\n");
    let live = src.join("big00.bin");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let live = live.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&live)
                    .unwrap();
                f.write_all(&random_bytes(n, 4096)).unwrap();
                drop(f);
                n += 1;
                std::thread::sleep(Duration::from_millis(APPEND_EVERY_MS));
            }
            n
        })
    };
    let dst = t.path().join("dst");
    let out = sync_json(&["--bwlimit", "4M", &slash(&src), &slash(&dst)]);
    stop.store(true, Ordering::Relaxed);
    let appended = writer.join().unwrap();
    assert!(appended > 5, "the writer barely ran");
    out.expect_code(4);
    let changed = out.events("changed");
    assert!(
        changed.iter().any(|e| e["path"] == "big00.bin"),
        "no changed event for big00.bin\n{out}"
    );
    assert!(changed.iter().all(|e| e["path"] != "quiet.txt"), "{out}");
    assert_eq!(
        out.summary()["changed_during_copy"][0],
        "big00.bin",
        "{out}"
    );

    let again = sync_json(&[&slash(&src), &slash(&dst)]);
    again.ok();
    assert!(again.events("changed").is_empty(), "{again}");
    assert_same(&src, &dst);
}

#[test]
fn ctrl_c_exits_130_and_a_rerun_completes() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "9"]);
    mkdata(&["tree", s(&src.join("small")), "--files", "30"]);
    let dst = t.path().join("dst");
    let client = spawn_sync(&["--bwlimit", "2M", &slash(&src), &slash(&dst)]);
    std::thread::sleep(Duration::from_millis(1500));
    client.signal(Signal::INT);
    let out = client.wait();
    out.expect_code(130);
    let lines = out.err_lines();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("again") && lines[0].contains("resume"),
        "the message should say to run again to resume\n{out}"
    );
    assert!(
        !partials_in(&dst).is_empty(),
        "no partial file kept in {}",
        dst.display()
    );
    assert_ne!(
        rsync_diff_with(&src, &dst, &[]),
        "",
        "interrupted run copied everything?"
    );

    let again = sync_json(&[&slash(&src), &slash(&dst)]);
    again.ok();
    assert_same(&src, &dst);
    assert!(partials_in(&dst).is_empty());
}
