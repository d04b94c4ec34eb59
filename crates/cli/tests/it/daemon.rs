//! Through a real daemon on loopback: push and pull of a mixed tree, --compress on text data,
//! --bwlimit actually limiting, SIGTERM drain, session limits, and idle timeouts on both
//! sides (a frozen client, a frozen daemon).

use crate::util::*;
use std::time::{Duration, Instant};

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
    std::thread::sleep(Duration::from_millis(1200));
    let mut daemon = d.terminate();
    std::thread::sleep(Duration::from_millis(300));
    // No new sessions once draining.
    let refused = sync(&["--retry-for", "0", &slash(&src), &d.url("m/other/")]);
    assert_ne!(refused.code(), 0, "{refused}");
    client.wait().ok();
    assert_same(&src, &module.join("dst"));
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exit {status:?}: {}", d.log());
    assert!(d.log().contains("waiting up to"), "{}", d.log());
    let stopped = "stopped on SIGTERM: 1 session(s) drained, 0 cut off";
    assert!(d.log().contains(stopped), "{}", d.log());
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

/// 8 MiB at 1 MiB/s: a push that is still running when a side is frozen.
fn slow_push(t: &std::path::Path, d: &Daemon, extra: &[&str]) -> (std::path::PathBuf, Running) {
    let src = t.join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "8"]);
    let mut args = vec!["--bwlimit", "1M", "-j", "2"];
    args.extend_from_slice(extra);
    let src_arg = slash(&src);
    let url = d.url("m/dst/");
    args.extend([src_arg.as_str(), url.as_str()]);
    let client = spawn_sync(&args);
    if !d.log_shows("session opened", Duration::from_secs(30)) {
        panic!(
            "no session opened; client: {}\ndaemon: {}",
            client.wait(),
            d.log()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    (src, client)
}

#[test]
fn a_stalled_client_is_dropped_after_the_idle_timeout_and_resumes_later() {
    use rustix::process::Signal;
    let t = tmp();
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "idle_timeout_secs = 3",
        "",
    );
    let (src, client) = slow_push(t.path(), &d, &["--json"]);
    // Frozen, the client neither sends nor closes: only the idle timeout can end its session.
    client.signal(Signal::STOP);
    let frozen = Instant::now();
    assert!(
        d.log_shows("idle timeout", Duration::from_secs(15)),
        "no idle timeout in the daemon's log: {}",
        d.log()
    );
    // Counted from the last frame, which came up to one keepalive period before the freeze.
    let after = frozen.elapsed();
    assert!(after >= Duration::from_secs(2), "dropped after {after:?}");
    client.signal(Signal::CONT);
    // Thawed, the client finds its session gone, opens a new one and resumes: the daemon
    // kept serving.
    let out = client.wait();
    out.ok();
    assert!(out.stat("reconnects") >= 1, "{out}");
    assert_same(&src, &module.join("dst"));
}

#[test]
fn a_stalled_daemon_ends_the_client_with_a_clear_error_within_its_timeout() {
    use rustix::process::Signal;
    let t = tmp();
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let (_src, client) = slow_push(t.path(), &d, &["--timeout", "3", "--retry-for", "5"]);
    d.signal(Signal::STOP);
    let frozen = Instant::now();
    let out = client.wait();
    let took = frozen.elapsed();
    d.signal(Signal::CONT);
    assert_ne!(out.code(), 0, "{out}");
    // It noticed the silence, tried again (a frozen daemon's kernel still accepts TCP, so
    // each try waits out the connect patience), and gave up naming both limits.
    assert!(
        out.stderr.contains("idle timeout") && out.stderr.contains("resuming in"),
        "the first break should name the idle timeout: {out}"
    );
    let last = out
        .err_lines()
        .last()
        .copied()
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("gave up after") && last.contains("--retry-for 5"),
        "{out}"
    );
    // The documented bound: --timeout, then --retry-for, then one last try's --timeout.
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(3 + 5 + 3 + 4),
        "ended {took:?} after the daemon froze"
    );
}

/// A daemon frozen before the first handshake completes: TCP is accepted (by the kernel),
/// then nothing. The run must not hang and must not give up as if the address were wrong:
/// the peer was reached, so it retries until the daemon thaws.
#[test]
fn a_daemon_that_stalls_in_the_first_handshake_is_retried_until_it_answers() {
    use rustix::process::Signal;
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.001"]);
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    d.signal(Signal::STOP);
    let client = spawn_sync(&[
        "--json",
        "--timeout",
        "3",
        "--retry-for",
        "30",
        &slash(&src),
        &d.url("m/dst/"),
    ]);
    std::thread::sleep(Duration::from_secs(5));
    d.signal(Signal::CONT);
    let out = client.wait();
    out.ok();
    let retries = out.events("retry");
    assert!(
        retries.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("no answer for 3 s"))),
        "{out}"
    );
    assert_same(&src, &module.join("dst"));
}

/// A push whose destination's parent is missing fails on the daemon before any data
/// connection joins; the client must print the daemon's reason, not "unknown session" (what
/// its late joins were told).
#[test]
fn push_of_a_file_into_a_missing_directory_says_why() {
    let t = tmp();
    let file = t.path().join("f");
    write(&file, b"hello");
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    for j in ["1", "8"] {
        let out = sync(&["-j", j, s(&file), &d.url("m/no/such/dir/f")]);
        assert_one_line_error(&out, &["no/such/dir"]);
        assert!(!out.stderr.contains("unknown session"), "{out}");
    }
    assert!(!module.join("no").exists());
}
