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
    // Without retries, so that the daemon stays down and the next run must resume.
    let client = spawn_sync(&[
        "--bwlimit",
        "8M",
        "-j",
        "2",
        "--retry-for",
        "0",
        &slash(&src),
        &url,
    ]);
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

/// A daemon restarted (as a service manager would) while a push runs: the client reconnects
/// with backoff and resumes from the partial file in the same run.
#[test]
fn daemon_restarted_mid_push_is_reconnected_to_and_the_push_finishes() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "32"]);
    let module = t.path().join("module");
    let dst = module.join("dst");
    let ddir = t.path().join("d");
    // On a fixed port, so that the restarted daemon is where the client dials again.
    let listen = format!("listen = \"127.0.0.1:{}\"", free_port());
    let mut d = Daemon::start_with_extra(&ddir, &[Module::rw("m", &module)], &listen, "");
    let url = d.url("m/dst/");
    let client = spawn_sync(&["--json", "--bwlimit", "8M", "-j", "2", &slash(&src), &url]);
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    // Down for a while: the first tries are refused.
    std::thread::sleep(Duration::from_millis(1500));
    let _d2 = Daemon::start_with(&ddir, &d.config);
    let out = client.wait();
    out.ok();
    let retries = out.events("retry");
    assert!(!retries.is_empty(), "no retry event\n{out}");
    assert!(out.stat("reconnects") >= 1, "{out}");
    // Resumed, not restarted: 32 MiB at 8 MiB/s, ~1.5 s of it written before the kill.
    let literal = out.stat("bytes_literal");
    assert!(
        literal < 32 * MIB - 4 * MIB,
        "the reconnected session resent {literal} bytes\n{out}"
    );
    assert_same(&src, &dst);
    assert!(partials_in(&dst).is_empty(), "partial file left behind");
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

/// `../shared/wanem.py` relaying to `target_port`, resetting every connection after about
/// `reset_mb` MB (uniformly 0.5x to 1.5x); stopped (and its byte counts written) on drop.
pub(crate) struct Resetter {
    child: std::process::Child,
    pub(crate) port: u16,
    stats: std::path::PathBuf,
}

impl Drop for Resetter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Resetter {
    // The child lives in the returned value and is reaped by `finish` or `Drop`.
    #[allow(clippy::zombie_processes)]
    pub(crate) fn start(dir: &std::path::Path, target_port: u16, reset_mb: &str) -> Resetter {
        let wanem = mkdata_path().with_file_name("wanem.py");
        let port_file = dir.join("wanem-port");
        let stats = dir.join("wanem-stats.json");
        let child = std::process::Command::new("python3")
            .arg(&wanem)
            .args(["--listen", "127.0.0.1:0", "--target"])
            .arg(format!("127.0.0.1:{target_port}"))
            .args([
                "--rtt-ms",
                "2",
                "--flow-mbps",
                "0",
                "--total-mbps",
                "0",
                "--reset-mb",
                reset_mb,
            ])
            .arg("--port-file")
            .arg(&port_file)
            .arg("--stats")
            .arg(&stats)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start wanem.py");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return Resetter {
                    child,
                    port: p,
                    stats,
                };
            }
            if std::time::Instant::now() >= deadline {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                panic!("wanem.py wrote no port file");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stop it and return (bytes client to daemon, connections reset).
    pub(crate) fn finish(mut self) -> (u64, u64) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.stats).expect("wanem stats");
        let v: serde_json::Value = serde_json::from_str(&text).expect("wanem stats JSON");
        (
            v["bytes_up"].as_u64().unwrap_or(0),
            v["resets"].as_u64().unwrap_or(0),
        )
    }
}

#[test]
fn dropped_connections_are_reconnected_and_resumed_without_resending_everything() {
    let t = tmp();
    let src = t.path().join("src");
    let size = 32usize << 20;
    write(&src.join("big.bin"), random_bytes(11, size));
    let dst = t.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let daemon = Daemon::start(t.path(), &[Module::rw("m", &dst)]);
    // Each connection is reset after 2-6 MB, so no single session can carry 32 MiB on 2
    // connections: only reconnecting and resuming from the partial file gets the copy done,
    // within the one run.
    let relay = Resetter::start(t.path(), daemon.port, "4");
    let url = format!("cutover://127.0.0.1:{}/m/", relay.port);
    let out = sync_json(&["-j", "2", &slash(&src), &url]);
    out.ok();
    let reconnects = out.stat("reconnects");
    let (sent, resets) = relay.finish();
    assert!(resets > 0, "the relay never reset a connection");
    assert!(
        reconnects >= 1,
        "a single session finished despite the resets\n{out}"
    );
    assert_eq!(out.events("retry").len() as u64, reconnects, "{out}");
    assert_same(&src, &dst);
    // Without resume every session would start over; with it the bytes sent stay near the
    // file size: what was in flight when a connection died is lost (measured: ~0.8 MB per
    // reset; bound: 2 MiB).
    let bound = size as u64 + resets * (2 << 20);
    eprintln!("dropped connections: {reconnects} reconnects, {resets} resets, {sent} bytes sent for {size}");
    assert!(
        sent <= bound,
        "sent {sent} bytes for a {size}-byte file over {reconnects} reconnects and {resets} resets"
    );
}

/// Wait until a partial file shows up in `dir` (the first sync is writing).
fn await_partial(dir: &Path, first: &mut Running) {
    for _ in 0..600 {
        if !partials_in(dir).is_empty() {
            return;
        }
        assert!(first.running(), "the first sync ended before writing");
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the first sync wrote no partial file in 6 s");
}

/// Two syncs into one destination at once: the second fails at once with a message that
/// says why, and the first finishes exact. Locally and through a daemon.
#[test]
fn a_second_sync_into_a_busy_destination_fails_clearly_and_the_first_completes() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "4"]);
    let other = t.path().join("other");
    write(&other.join("x"), b"not the first source");
    write(&other.join("sub/y"), b"in a directory");
    std::os::unix::fs::symlink("x", other.join("link")).unwrap();
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let local = t.path().join("local");
    for (dst, dir) in [
        (slash(&local), local.clone()),
        (d.url("m/dst/"), module.join("dst")),
    ] {
        let mut first = spawn_sync(&["--bwlimit", "1M", "-j", "2", &slash(&src), &dst]);
        await_partial(&dir, &mut first);
        let second = sync(&["--delete", &slash(&other), &dst]);
        assert_one_line_error(
            &second,
            &["another cutover sync is writing into this destination"],
        );
        assert!(
            !dir.join("sub").exists(),
            "the second sync made a directory"
        );
        assert!(
            std::fs::symlink_metadata(dir.join("link")).is_err(),
            "the second sync made a link"
        );
        first.wait().ok();
        assert_same(&src, &dir);
        // Once the first is done the destination is free again.
        sync(&[&slash(&src), &dst]).ok();
    }
}
