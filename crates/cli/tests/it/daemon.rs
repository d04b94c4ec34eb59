//! Through a real daemon on loopback: push and pull of a mixed tree, --compress on text data,
//! and --bwlimit actually limiting.

use crate::util::*;
use std::time::Instant;

#[test]
fn daemon_push_and_pull_match_rsync() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.002"]);
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("mod", &module)]);

    let push = sync_json(&["-j", "3", &slash(&src), &d.url("mod/sub/")]);
    push.ok();
    assert!(push.stat("wire_bytes") > 0, "{push}");
    assert!(
        push.stat("wire_bytes") >= push.stat("bytes_literal"),
        "{push}"
    );
    assert_same(&src, &module.join("sub"));

    let pulled = t.path().join("pulled");
    let pull = sync_json(&[&d.url("mod/sub/"), &slash(&pulled)]);
    pull.ok();
    assert!(pull.stat("wire_bytes") > 0, "{pull}");
    assert_eq!(pull.stat("files_sent"), push.stat("files_sent"), "{pull}");
    assert_same(&src, &pulled);

    // Both directions are idempotent.
    let again = sync_json(&[&slash(&src), &d.url("mod/sub/")]);
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "{again}");
    let again = sync_json(&[&d.url("mod/sub/"), &slash(&pulled)]);
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "{again}");
}

#[test]
fn compress_lowers_wire_bytes_on_text() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "2", "--text"]);
    mkdata(&[
        "tree",
        s(&src.join("small")),
        "--files",
        "40",
        "--text-share",
        "1.0",
    ]);
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);

    let plain = sync_json(&[&slash(&src), &d.url("m/plain/")]);
    plain.ok();
    assert_same(&src, &module.join("plain"));
    let packed = sync_json(&["-z", &slash(&src), &d.url("m/packed/")]);
    packed.ok();
    assert_same(&src, &module.join("packed"));

    let (p, z) = (plain.stat("wire_bytes"), packed.stat("wire_bytes"));
    assert!(p >= plain.stat("bytes_literal"), "{plain}");
    // Text-like data compresses 3-4x: demand at least 2x.
    assert!(
        z * 2 < p,
        "--compress sent {z} bytes on the wire, without it {p}\n{packed}"
    );
}

#[test]
fn bwlimit_slows_a_daemon_push() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("three.bin"), random_bytes(1, 3 << 20));
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let started = Instant::now();
    sync_json(&["--bwlimit", "1M", &slash(&src), &d.url("m/")]).ok();
    let took = started.elapsed();
    assert_same(&src, &module);
    // 3 MiB at 1 MiB/s with a 1 MiB burst: at least 2 s; only a loose bound is checked.
    assert!(
        took.as_secs_f64() >= 1.5,
        "3 MiB with --bwlimit 1M took only {took:?}"
    );
}

#[test]
fn sigterm_lets_sessions_in_flight_finish_then_stops_accepting() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "12"]);
    let module = t.path().join("module");
    let mut d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "shutdown_grace_secs = 60",
        "",
    );
    let url = d.url("m/dst/");
    // ~3 s at 4 MiB/s: SIGTERM lands in the middle.
    let client = spawn_sync(&["--bwlimit", "4M", "-j", "2", &slash(&src), &url]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let mut daemon = d.terminate();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // No new sessions once draining.
    let refused = sync(&[&slash(&src), &d.url("m/other/")]);
    assert_ne!(refused.code(), 0, "{refused}");
    client.wait().ok();
    assert_same(&src, &module.join("dst"));
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exit {status:?}: {}", d.log());
    assert!(d.log().contains("waiting up to"), "{}", d.log());
}

#[test]
fn session_and_connection_limits_refuse_clearly_and_keep_the_rest_working() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "8"]);
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "max_sessions_per_client = 1\nmax_connections_per_session = 2",
        "",
    );
    // -j 4 against a limit of 2: the session runs on the 2 it was allowed.
    let mut cmd = sync_cmd(&["--bwlimit", "4M", "-j", "4", &slash(&src), &d.url("m/a/")]);
    cmd.env("CUTOVER_LOG", "net=debug");
    let slow = Running::start(cmd);
    std::thread::sleep(std::time::Duration::from_millis(700));
    let second = sync(&[&slash(&src), &d.url("m/b/")]);
    assert_one_line_error(&second, &["127.0.0.1", "max_sessions_per_client"]);
    let slow = slow.wait();
    slow.ok();
    assert!(
        slow.stderr.contains("2 of 4 data connections joined"),
        "{slow}"
    );
    assert_same(&src, &module.join("a"));
    // The slot is free again.
    sync(&[&slash(&src), &d.url("m/b/")]).ok();
    assert_same(&src, &module.join("b"));
}
