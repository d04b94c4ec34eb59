//! ssh endpoints through a real sshd on a loopback port: push and pull with several
//! connections (one ssh login each), clear errors when the remote has no cutover or ssh
//! itself fails, and this cutover installed on a remote that has none.

use crate::util::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// An `-e` command that reaches `sshd` (as root@127.0.0.1) and runs the remote command with
/// this cache directory and this `PATH` (set in front of the command: the remote root's
/// shell startup files rewrite a `PATH` that ssh passes along).
fn bare_remote(sshd: &Sshd, cache: &Path, path: &str) -> String {
    let wrapper = cache.with_extension("ssh");
    write(
        &wrapper,
        format!(
            "#!/bin/sh\ndest=$1; shift\nexec {} \"$dest\" \"XDG_CACHE_HOME={}; PATH={path}; export XDG_CACHE_HOME PATH; $*\"\n",
            sshd.rsh(),
            s(cache)
        ),
    );
    chmod(&wrapper, 0o755);
    s(&wrapper).to_string()
}

const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Where this cutover is cached on the remote: `cutover-VERSION-` and the first 16 hex
/// digits of its SHA-256.
fn cached_path(cache: &Path) -> PathBuf {
    let out = std::process::Command::new("sha256sum")
        .arg(bin())
        .output()
        .expect("sha256sum");
    let hex = String::from_utf8_lossy(&out.stdout)[..16].to_string();
    cache
        .join("cutover")
        .join(format!("cutover-{}-{hex}", env!("CARGO_PKG_VERSION")))
}

fn install_lines(out: &Out) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|l| l.contains("installed this cutover"))
        .collect()
}

#[test]
fn a_remote_without_cutover_gets_this_one_installed_once_and_reuses_it() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.002"]);
    let cache = t.path().join("cache");
    let rsh = bare_remote(&sshd, &cache, SYSTEM_PATH);
    let remote = format!("127.0.0.1:{}/", s(&t.path().join("remote")));
    let push = sync_json(&["-e", &rsh, "-j", "3", &slash(&src), &remote]);
    push.ok();
    assert_same(&src, &t.path().join("remote"));
    let installed = cached_path(&cache);
    let size = std::fs::metadata(bin()).unwrap().len();
    let mb = ((size + 500_000) / 1_000_000).max(1);
    assert_eq!(
        install_lines(&push),
        [format!(
            "cutover: installed this cutover on 127.0.0.1 at {} ({mb} MB, once)",
            s(&installed)
        )],
        "{push}"
    );
    let meta = std::fs::metadata(&installed).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    assert!(
        std::fs::read(&installed).unwrap() == std::fs::read(bin()).unwrap(),
        "the installed copy differs from this binary"
    );
    let entries: Vec<_> = std::fs::read_dir(cache.join("cutover"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "temporary files left: {entries:?}");
    // One upload per session: the failed first login, the install login, then the control
    // connection and 3 data connections, all with the installed copy.
    assert_eq!(sshd.logins(), 6, "{push}");

    // The next session (a pull) finds the copy and uploads nothing.
    let pulled = t.path().join("pulled");
    let pull = sync_json(&["-e", &rsh, "-j", "2", &remote, &slash(&pulled)]);
    pull.ok();
    assert_same(&src, &pulled);
    assert!(install_lines(&pull).is_empty(), "{pull}");
    assert_eq!(
        std::fs::metadata(&installed).unwrap().ino(),
        meta.ino(),
        "the cached copy was replaced"
    );
}

#[test]
fn a_different_file_at_the_cache_path_is_never_run_nor_written_into() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("f"), "data");
    let cache = t.path().join("cache");
    let planted = cached_path(&cache);
    let marker = t.path().join("planted-ran");
    let script = format!("#!/bin/sh\ntouch {}\nexit 1\n", s(&marker));
    write(&planted, &script);
    chmod(planted.parent().unwrap(), 0o700);
    chmod(&planted, 0o700);
    // A second name for the planted file's inode: what happens to it shows whether the file
    // was written into or replaced.
    let witness = t.path().join("witness");
    std::fs::hard_link(&planted, &witness).unwrap();
    let rsh = bare_remote(&sshd, &cache, SYSTEM_PATH);
    let remote = format!("127.0.0.1:{}/", s(&t.path().join("remote")));
    let out = sync(&["-e", &rsh, "-j", "1", &slash(&src), &remote]);
    out.ok();
    assert_same(&src, &t.path().join("remote"));
    assert!(!marker.exists(), "the planted file was run\n{out}");
    assert_eq!(
        std::fs::read_to_string(&witness).unwrap(),
        script,
        "the planted file was written into"
    );
    assert_eq!(install_lines(&out).len(), 1, "{out}");
    assert!(
        std::fs::read(&planted).unwrap() == std::fs::read(bin()).unwrap(),
        "the cache path does not hold this binary"
    );
    assert_ne!(
        std::fs::metadata(&planted).unwrap().ino(),
        std::fs::metadata(&witness).unwrap().ino()
    );
}

#[test]
fn no_remote_install_keeps_the_missing_cutover_error() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("f"), "x");
    let cache = t.path().join("cache");
    let rsh = bare_remote(&sshd, &cache, SYSTEM_PATH);
    let dst = format!("127.0.0.1:{}/", s(&t.path().join("dst")));
    let out = sync(&["-e", &rsh, "--no-remote-install", &slash(&src), &dst]);
    assert_one_line_error(
        &out,
        &[
            "127.0.0.1",
            "the remote has no \"cutover\"",
            "--remote-cutover",
        ],
    );
    assert!(!cache.exists(), "something was installed");
    assert!(!t.path().join("dst").exists());
}

#[test]
fn a_remote_of_another_architecture_is_told_apart_in_one_line() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("f"), "x");
    // The remote's `uname` says it is a MIPS machine.
    let fake = t.path().join("fakebin");
    write(
        &fake.join("uname"),
        "#!/bin/sh\ncase \"$1\" in -m) echo mips64 ;; *) exec /bin/uname \"$@\" ;; esac\n",
    );
    chmod(&fake.join("uname"), 0o755);
    let cache = t.path().join("cache");
    let path = format!("{}:{SYSTEM_PATH}", s(&fake));
    let rsh = bare_remote(&sshd, &cache, &path);
    let dst = format!("127.0.0.1:{}/", s(&t.path().join("dst")));
    let out = sync(&["-e", &rsh, &slash(&src), &dst]);
    assert_one_line_error(
        &out,
        &[
            "127.0.0.1 runs Linux mips64",
            "install cutover there or pass --remote-cutover PATH",
        ],
    );
    assert!(!cached_path(&cache).exists(), "something was installed");
    assert!(!t.path().join("dst").exists());
}

#[test]
fn a_remote_cutover_of_another_protocol_version_is_bypassed_by_this_one() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    write(&src.join("f"), "data");
    // The remote's own `cutover` refuses the session as an older version would.
    let refusal = t.path().join("refusal");
    let welcome = proto::Welcome::Refused {
        reason: format!(
            "protocol version {} is not supported (this side speaks 1); use the same cutover version on both sides",
            proto::PROTOCOL_VERSION
        ),
    };
    let (mut plain, mut frame) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(&welcome, false, &mut None, &mut plain, &mut frame).unwrap();
    write(&refusal, frame);
    let old = t.path().join("oldbin");
    let ran = t.path().join("old-ran");
    write(
        &old.join("cutover"),
        format!("#!/bin/sh\ntouch {}\nexec cat {}\n", s(&ran), s(&refusal)),
    );
    chmod(&old.join("cutover"), 0o755);
    let cache = t.path().join("cache");
    let rsh = bare_remote(&sshd, &cache, &format!("{}:{SYSTEM_PATH}", s(&old)));
    let remote = t.path().join("remote");
    let out = sync(&[
        "-e",
        &rsh,
        "-j",
        "2",
        &slash(&src),
        &format!("127.0.0.1:{}/", s(&remote)),
    ]);
    out.ok();
    assert_same(&src, &remote);
    assert!(ran.exists(), "the remote's own cutover was not tried first");
    assert_eq!(install_lines(&out).len(), 1, "{out}");
    assert!(cached_path(&cache).is_file());
}
