//! A replication link over ssh (`address = "ssh://root@127.0.0.1"`) through a real sshd
//! on a loopback port: every connection of the link is one ssh login running `cutover
//! serve --peer-relay` on the peer's side, joined to the peer daemon's local socket; the
//! volume syncs and streams as over TLS. A wrong remote config is one line in `status`.

use crate::replication::{configure, have_qemu, node, qemu_io, sock, status, volume, wait_in_step};
use crate::util::*;
use std::time::{Duration, Instant};

#[test]
fn a_link_over_ssh_syncs_and_streams_one_login_per_connection() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let a = node(t.path(), "a");
    let b = node(t.path(), "b");
    configure(&b, "a", &a.fingerprint, "");
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    let via = |remote_config: &str| {
        format!(
            "address = \"ssh://root@127.0.0.1\"\nconnections = 2\nmax_connections = 2\nssh_command = \"{}\"\n\
             remote_cutover = \"{}\"\nremote_config = \"{remote_config}\"\n",
            sshd.rsh(),
            bin()
        )
    };
    // First a wrong remote config: the relay's complaint comes back in one line.
    configure(&a, "b", &b.fingerprint, &via("/nonexistent/serve.toml"));
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    let start = Instant::now();
    let why = loop {
        let st = status(&a);
        if let Some(e) = st["peers"][0]["last_error"].as_str() {
            break e.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no error: {st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        why.contains("ssh://root@127.0.0.1") && why.contains("/nonexistent/serve.toml"),
        "{why}"
    );
    drop(da);

    configure(&a, "b", &b.fingerprint, &via(s(&b.config)));
    let da = Daemon::start_with(&a.dir, &a.config);
    volume(&a, &["primary", "db", "--force"]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x3c 1M 3M", "write -z 8M 1M"]);
    assert!(w.status.success(), "{w:?}");
    let st = wait_in_step(&a, &b, "over ssh");
    assert_eq!(st["peers"][0]["connections"], 2, "{st}");
    // Streamed after the sync, too, over the same logins.
    let logins = sshd.logins();
    let w = qemu_io(&sock(&a), &["write -P 0x4d 20M 64k"]);
    assert!(w.status.success(), "{w:?}");
    wait_in_step(&a, &b, "streaming over ssh");
    assert!(std::fs::read(&a.image).unwrap() == std::fs::read(&b.image).unwrap());
    assert_eq!(sshd.logins(), logins, "the stream needed new ssh logins");
    assert!(
        logins >= 3,
        "one login per connection (control + 2 data): {logins}"
    );
    assert_eq!(status(&b)["peers"][0]["dials"], false);
    drop(da);
    drop(db);
}
