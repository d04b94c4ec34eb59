//! Volume replication between two real daemons on loopback (`[[volume.peer]]`): the
//! initial full sync of a 256 MiB volume while qemu-io writes to the primary, both backings equal
//! at the end; a secondary refusing writes through its export; protocol C keeping an
//! acknowledged FUA write on the peer when the primary is killed right after it; the
//! primary restarted after kill -9 resyncing only what its activity log and bitmap name;
//! `disconnect` / `connect`; and the refusals in one line. Its helpers (nodes, configs,
//! `pair`, `synced_pair`, `wait_in_step`) serve the other replication test modules.

use crate::util::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub(crate) const SIZE: u64 = 64 << 20;
/// The volume of the main test: the initial sync of 256 MiB while qemu-io writes.
const BIG: u64 = 256 << 20;

#[derive(Clone)]
pub(crate) struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub image: PathBuf,
    pub fingerprint: String,
}

/// A node's directory with its disk image and its daemon identity made in advance (so
/// that each config can pin the other's fingerprint).
pub(crate) fn node(root: &Path, name: &str) -> Node {
    node_of(root, name, SIZE)
}

/// [`node`] with a disk of `size` bytes.
pub(crate) fn node_of(root: &Path, name: &str, size: u64) -> Node {
    let dir = root.join(name);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let out = {
        let mut c = cutover_cmd();
        c.args(["identity", "--file", s(&state.join("identity.pem"))]);
        Running::start(c).wait()
    };
    out.ok();
    Node {
        config: dir.join("daemon.toml"),
        fingerprint: out.stdout.trim().to_string(),
        dir,
        image,
    }
}

/// Write `n`'s config: volume "db" with one peer.
pub(crate) fn configure(n: &Node, peer: &str, peer_fp: &str, peer_extra: &str) {
    std::fs::write(
        &n.config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n\
             [[volume.peer]]\nname = \"{peer}\"\nfingerprint = \"{peer_fp}\"\n{peer_extra}",
            s(&n.dir.join("state")),
            s(&n.image)
        ),
    )
    .unwrap();
}

/// Two nodes with volume "db", neither primary yet: `b` waits (its peer has no address),
/// `a` dials it at the port `route` gives for b's listen port (that port itself, or a
/// relay's in front of it), with two data connections; `extra` goes into both peer
/// tables.
pub(crate) fn pair(
    root: &Path,
    extra: &str,
    route: impl FnOnce(u16) -> u16,
) -> (Node, Daemon, Node, Daemon) {
    let a = node(root, "a");
    let b = node(root, "b");
    configure(&b, "a", &a.fingerprint, extra);
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    let port = route(db.port);
    configure(
        &a,
        "b",
        &b.fingerprint,
        &format!("address = \"127.0.0.1:{port}\"\nconnections = 2\n{extra}"),
    );
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    (a, da, b, db)
}

/// Two nodes on a synced volume: `a` primary (dials), `b` secondary (waits); `extra` goes
/// into both peer tables.
pub(crate) fn synced_pair(root: &Path, extra: &str) -> (Node, Daemon, Node, Daemon) {
    let (a, da, b, db) = pair(root, extra, |port| port);
    volume(&a, &["primary", "db", "--force"]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x11 0 4M"]);
    assert!(w.status.success(), "{w:?}");
    wait_in_step(&a, &b, "initial sync");
    (a, da, b, db)
}

/// Both backings hold the same bytes (the data, for more checks).
pub(crate) fn same_backings(a: &Node, b: &Node) -> Vec<u8> {
    let on_a = std::fs::read(&a.image).unwrap();
    assert!(
        on_a == std::fs::read(&b.image).unwrap(),
        "the backings differ"
    );
    on_a
}

pub(crate) fn volume(n: &Node, args: &[&str]) -> Out {
    let mut c = cutover_cmd();
    c.arg("volume").args(args).args(["--config", s(&n.config)]);
    Running::start(c).wait()
}

pub(crate) fn status(n: &Node) -> Value {
    let out = volume(n, &["status", "db", "--json"]);
    out.ok();
    out.json()[0]["volumes"][0].clone()
}

pub(crate) fn sock(n: &Node) -> String {
    format!(
        "nbd+unix:///db?socket={}",
        s(&n.dir.join("state").join("db.sock"))
    )
}

pub(crate) fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("qemu-io")
}

/// Wait until the primary `p` sees its peer connected, in step and drained, and the
/// secondary `q` knows it is up to date.
pub(crate) fn wait_in_step(p: &Node, q: &Node, what: &str) -> Value {
    wait_in_step_within(p, q, Duration::from_secs(60), what, String::new)
}

/// `wait_in_step` within `limit`; a failure's message ends with what `more` says.
pub(crate) fn wait_in_step_within(
    p: &Node,
    q: &Node,
    limit: Duration,
    what: &str,
    more: impl Fn() -> String,
) -> Value {
    let start = Instant::now();
    loop {
        let st = status(p);
        let peer = &st["peers"][0];
        if peer["connection"] == "connected"
            && peer["replication"] == "source"
            && peer["out_of_sync_bytes"] == 0
            && peer["peer_disk"] == "UpToDate"
            && status(q)["disk"] == "UpToDate"
        {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not in step after {limit:?}: {st}{}",
            more()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn have_qemu() -> bool {
    let ok = Command::new("qemu-io").arg("--version").output().is_ok();
    if !ok {
        eprintln!("note: qemu-io is not installed; replication test skipped");
    }
    ok
}

#[test]
fn two_daemons_replicate_a_volume_and_a_killed_primary_loses_nothing_acknowledged() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let a = node_of(t.path(), "a", BIG);
    let b = node_of(t.path(), "b", BIG);
    // Data the primary already holds: the initial sync must carry it.
    let seed: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(7))
        .collect();
    std::fs::write(&a.image, &seed).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a.image)
        .unwrap()
        .set_len(BIG)
        .unwrap();

    // b waits for a (no address); a dials b.
    configure(&b, "a", &a.fingerprint, "protocol = \"C\"\n");
    volume(&b, &["create-md", "db"]).ok();
    let mut db = Daemon::start_with(&b.dir, &b.config);
    configure(
        &a,
        "b",
        &b.fingerprint,
        &format!(
            "address = \"127.0.0.1:{}\"\nprotocol = \"C\"\nconnections = 3\nmax_connections = 3\n",
            db.port
        ),
    );
    volume(&a, &["create-md", "db"]).ok();
    let mut da = Daemon::start_with(&a.dir, &a.config);

    // A new volume: neither is primary, and promoting inconsistent data needs --force.
    let st = status(&a);
    assert_eq!(
        (&st["role"], &st["disk"]),
        (&"secondary".into(), &"Inconsistent".into())
    );
    let refused = volume(&a, &["primary", "db"]);
    assert_one_line_error(&refused, &["inconsistent", "--force"]);
    volume(&a, &["primary", "db", "--force"]).ok();

    // Writes while the initial sync runs.
    let w = qemu_io(
        &sock(&a),
        &[
            "write -P 0x5a 1M 2M",
            "aio_write -P 0x6b 40M 64k",
            "aio_write -P 0x6c 200M 1M",
            "aio_flush",
            "write -z 50M 1M",
        ],
    );
    assert!(w.status.success(), "{w:?}");
    let st = wait_in_step(&a, &b, "initial sync");
    assert_eq!(st["peers"][0]["connections"], 3, "{st}");
    let sb = status(&b);
    assert_eq!(
        (&sb["role"], &sb["disk"]),
        (&"secondary".into(), &"UpToDate".into()),
        "{sb}"
    );
    assert_eq!(sb["peers"][0]["replication"], "target", "{sb}");
    assert!(
        std::fs::read(&a.image).unwrap() == std::fs::read(&b.image).unwrap(),
        "the backings differ after the initial sync"
    );

    // The secondary's export refuses writes.
    let w = qemu_io(&sock(&b), &["write -P 1 0 4k"]);
    assert!(!w.status.success(), "a secondary took a write: {w:?}");

    // Protocol C: a write without FUA is acknowledged only once the peer has it (the
    // export answers no write before it is made while a peer streams in C).
    // (nbdsh, not qemu-io, which flushes before it exits; the marker shows the reply.)
    let answered = a.dir.join("answered");
    db.signal(rustix::process::Signal::STOP);
    let mut writer = Command::new("nbdsh")
        .env(
            "PATH",
            format!(
                "/usr/bin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .arg("-c")
        .arg(format!(
            "h.connect_uri({:?})\nh.pwrite(b'\\xc4' * 65536, 31 << 20)\nopen({:?}, 'w').close()",
            sock(&a),
            s(&answered)
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let early = answered.exists();
    db.signal(rustix::process::Signal::CONT);
    assert!(
        !early,
        "protocol C acknowledged a write without FUA the stopped peer did not have"
    );
    assert!(writer.wait().unwrap().success());
    assert!(answered.exists(), "the write was never answered");

    // And a FUA write only once it is durable on the peer (a stopped peer holds it back),
    // and is there even if the primary dies the next instant.
    db.signal(rustix::process::Signal::STOP);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &sock(&a), "-c", "write -f -P 0xc3 30M 64k"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let early = writer.try_wait().unwrap();
    db.signal(rustix::process::Signal::CONT);
    assert!(
        early.is_none(),
        "protocol C acknowledged a write the stopped peer did not have"
    );
    assert!(writer.wait().unwrap().success());
    da.kill9();
    let on_b = std::fs::read(&b.image).unwrap();
    let at = 30 << 20;
    assert!(
        on_b[at..at + (64 << 10)].iter().all(|&x| x == 0xc3),
        "the acknowledged FUA write is not on the peer"
    );

    // The primary comes back (still primary): the link resyncs what its activity log
    // names, and both end equal.
    let da = Daemon::start_with(&a.dir, &a.config);
    let w = qemu_io(&sock(&a), &["write -P 0x77 60M 128k"]);
    assert!(w.status.success(), "{w:?}");
    wait_in_step(&a, &b, "after kill -9 of the primary");
    assert!(
        std::fs::read(&a.image).unwrap() == std::fs::read(&b.image).unwrap(),
        "the backings differ after the restart"
    );

    // disconnect: writes go to the bitmap; connect: they travel.
    let out = volume(&a, &["disconnect", "db", "b"]);
    out.ok();
    assert_eq!(status(&a)["peers"][0]["connection"], "disconnected");
    let w = qemu_io(&sock(&a), &["write -P 0x11 10M 4k"]);
    assert!(w.status.success(), "{w:?}");
    let st = status(&a);
    assert!(
        st["peers"][0]["out_of_sync_bytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    volume(&a, &["connect", "db"]).ok();
    wait_in_step(&a, &b, "after connect");
    assert!(std::fs::read(&a.image).unwrap() == std::fs::read(&b.image).unwrap());

    // Refusals: an unknown peer, a volume without peers, demoting with a client attached.
    let out = volume(&a, &["connect", "db", "nobody"]);
    assert_one_line_error(&out, &["nobody", "b"]);
    drop(da);
    db.terminate().wait().unwrap();
}
