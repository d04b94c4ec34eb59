//! ssh endpoints through a real sshd on a loopback port: push and pull with several
//! connections (one ssh login each), and clear errors when the remote has no cutover or ssh
//! itself fails.

use crate::util::*;

#[test]
fn push_and_pull_over_ssh_use_one_login_per_connection() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.002"]);
    let remote = t.path().join("remote");
    let rsh = sshd.rsh();
    let ssh_args = |from: &str, to: &str| -> Out {
        sync_json(&["-e", &rsh, "--remote-cutover", bin(), "-j", "3", from, to])
    };
    let push = ssh_args(&slash(&src), &format!("root@127.0.0.1:{}/", s(&remote)));
    push.ok();
    assert_same(&src, &remote);
    assert!(
        push.stat("wire_bytes") >= push.stat("bytes_literal"),
        "{push}"
    );
    assert!(
        sshd.logins() >= 4,
        "control + 3 data connections, saw {}",
        sshd.logins()
    );

    let pulled = t.path().join("pulled");
    let pull = ssh_args(&format!("127.0.0.1:{}/", s(&remote)), &slash(&pulled));
    pull.ok();
    assert_same(&src, &pulled);
    assert!(sshd.logins() >= 8, "{}", sshd.logins());

    // Nothing changed: nothing sent.
    let again = ssh_args(&slash(&src), &format!("root@127.0.0.1:{}/", s(&remote)));
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "{again}");
}

#[test]
fn missing_remote_cutover_and_failing_ssh_are_explained() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("f"), "x");
    let dst = format!("127.0.0.1:{}/", s(&t.path().join("dst")));
    let out = sync(&[
        "-e",
        &sshd.rsh(),
        "--remote-cutover",
        "/nonexistent/cutover",
        &slash(&src),
        &dst,
    ]);
    assert_one_line_error(
        &out,
        &["127.0.0.1", "/nonexistent/cutover", "--remote-cutover"],
    );

    let closed = free_port();
    let rsh = sshd
        .rsh()
        .replace(&format!("-p {}", sshd.port), &format!("-p {closed}"));
    let out = sync(&["-e", &rsh, "--remote-cutover", bin(), &slash(&src), &dst]);
    assert_one_line_error(&out, &["ssh failed", "refused"]);
    assert!(!t.path().join("dst").exists());
}

/// ssh connections reset by the path (each after 2-6 MB): the run logs in again and resumes,
/// as it does with a daemon.
#[test]
fn reset_ssh_connections_are_reconnected_and_the_push_finishes() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("big.bin"), random_bytes(12, 24 << 20));
    let remote = t.path().join("remote");
    let relay = crate::resume::Resetter::start(t.path(), sshd.port, "4");
    let rsh = sshd
        .rsh()
        .replace(&format!("-p {}", sshd.port), &format!("-p {}", relay.port));
    let out = sync_json(&[
        "-e",
        &rsh,
        "--remote-cutover",
        bin(),
        "-j",
        "2",
        &slash(&src),
        &format!("127.0.0.1:{}/", s(&remote)),
    ]);
    out.ok();
    let (_, resets) = relay.finish();
    assert!(resets > 0, "the relay never reset a connection");
    assert!(out.stat("reconnects") >= 1, "{out}");
    assert_same(&src, &remote);
    assert!(partials_in(&remote).is_empty(), "partial file left behind");
}
