//! Three daemons, GitLab's move: two nodes of the old data center (a, b) mirror each
//! other in protocol C, and the new node (n) receives the same volume in protocol A
//! through `wanem.py`. The primary is killed with writes on their way; b is promoted,
//! writes go on, and n keeps receiving from b with only what it missed resynced (the
//! bytes on b's link to n are counted by wanem), no full resync; a comes back and
//! rejoins as b's secondary. Then the whole move: ext4 made and filled on b after the
//! failover, and a plan's `replica` task cutting over from b to n, whose backing alone
//! must pass `e2fsck -fn` and hold the tree.

use crate::plan::plan;
use crate::replication::{have_qemu, node, qemu_io, sock, status, volume, Node, SIZE};
use crate::replication_grow::Wanem;
use crate::util::*;
use crate::volume_fs::{missing, skip, Stack};
use serde_json::Value;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// `n`'s config: volume "db" with `peers` (name, fingerprint, extra lines).
fn configure_peers(n: &Node, peers: &[(&str, &str, String)]) {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n",
        s(&n.dir.join("state")),
        s(&n.image)
    );
    for (name, fp, extra) in peers {
        text.push_str(&format!(
            "[[volume.peer]]\nname = \"{name}\"\nfingerprint = \"{fp}\"\n{extra}"
        ));
    }
    std::fs::write(&n.config, text).unwrap();
}

/// `node`'s peer `name` in its status.
fn peer(node: &Node, name: &str) -> Value {
    let st = status(node);
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no peer {name} in {st}"))
}

/// Wait until `what` holds of `node`'s status (60 s at most).
fn until(what: &str, mut cond: impl FnMut() -> bool, show: impl Fn() -> String) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: not after 60 s: {}",
            show()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `p` sends to its peer `name`, which holds everything and is up to date.
fn in_step(p: &Node, name: &str) -> bool {
    let q = peer(p, name);
    q["replication"] == "source" && q["out_of_sync_bytes"] == 0 && q["peer_disk"] == "UpToDate"
}

/// The three nodes, their daemons, and the relays in front of n (b's counts its bytes in
/// `stats`).
struct Trio {
    a: Node,
    b: Node,
    n: Node,
    da: Daemon,
    _db: Daemon,
    _dn: Daemon,
    _wan_a: Wanem,
    wan_b: Wanem,
    stats: std::path::PathBuf,
}

/// n waits for both; b waits for a and dials n; a dials both. The links to n go through
/// wanem (b's with its bytes counted). a is primary, both secondaries took the initial
/// sync of what a held and of `first` (qemu-io commands on a's export), and b and n know
/// from a's peer acknowledgements that the other holds everything.
fn trio(root: &std::path::Path, first: &[&str]) -> Trio {
    let (a, b, n) = (node(root, "a"), node(root, "b"), node(root, "n"));
    let c = "protocol = \"C\"\nconnections = 2\n".to_string();
    let async_link = "protocol = \"A\"\nconnections = 2\n".to_string();
    configure_peers(
        &n,
        &[
            ("a", &a.fingerprint, async_link.clone()),
            ("b", &b.fingerprint, async_link.clone()),
        ],
    );
    volume(&n, &["create-md", "db"]).ok();
    let dn = Daemon::start_with(&n.dir, &n.config);
    let wan = ["--rtt-ms", "10", "--flow-mbps", "0", "--total-mbps", "0"];
    let wan_a = Wanem::start(&a.dir, dn.port, &wan);
    let stats = b.dir.join("wan.json");
    let wan_b = Wanem::start(
        &b.dir,
        dn.port,
        &[&wan[..], &["--stats", s(&stats)]].concat(),
    );
    configure_peers(
        &b,
        &[
            ("a", &a.fingerprint, c.clone()),
            (
                "n",
                &n.fingerprint,
                format!("address = \"127.0.0.1:{}\"\n{async_link}", wan_b.1),
            ),
        ],
    );
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    configure_peers(
        &a,
        &[
            (
                "b",
                &b.fingerprint,
                format!("address = \"127.0.0.1:{}\"\n{c}", db.port),
            ),
            (
                "n",
                &n.fingerprint,
                format!("address = \"127.0.0.1:{}\"\n{async_link}", wan_a.1),
            ),
        ],
    );
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    volume(&a, &["primary", "db", "--force"]).ok();
    let w = qemu_io(&sock(&a), first);
    assert!(w.status.success(), "{w:?}");
    until(
        "initial syncs",
        || in_step(&a, "b") && in_step(&a, "n"),
        || status(&a).to_string(),
    );
    until(
        "b knows n holds everything",
        || peer(&b, "n")["out_of_sync_bytes"] == 0 && peer(&n, "b")["out_of_sync_bytes"] == 0,
        || format!("{}\n{}", status(&b), status(&n)),
    );
    Trio {
        a,
        b,
        n,
        da,
        _db: db,
        _dn: dn,
        _wan_a: wan_a,
        wan_b,
        stats,
    }
}

/// n in step with b, and b's stream to n drained.
fn n_in_step_with_b(t: &Trio) {
    until(
        "n in step with b",
        || in_step(&t.b, "n") && status(&t.n)["disk"] == "UpToDate",
        || format!("{}\n{}", status(&t.b), status(&t.n)),
    );
    until(
        "b's stream to n drained",
        || peer(&t.b, "n")["lag_bytes"] == 0,
        || status(&t.b).to_string(),
    );
}

#[test]
fn the_partner_takes_over_and_the_new_node_gets_only_what_it_missed() {
    if !have_qemu() {
        return;
    }
    let root = tmp();
    let mut t = trio(root.path(), &["write -P 0x11 0 4M"]);
    let (a, b, n) = (t.a.clone(), t.b.clone(), t.n.clone());

    // Writes, and the primary killed right after them.
    let before_kill = 8 * MIB;
    let w = qemu_io(&sock(&a), &["write -P 0x22 16M 8M"]);
    assert!(w.status.success(), "{w:?}");
    t.da.kill9();

    // b is promoted and written to; n goes on receiving, from b.
    volume(&b, &["primary", "db"]).ok();
    let after = 16 * MIB;
    let w = qemu_io(&sock(&b), &["write -P 0x33 32M 16M"]);
    assert!(w.status.success(), "{w:?}");
    n_in_step_with_b(&t);
    let on_b = std::fs::read(&b.image).unwrap();
    assert!(on_b == std::fs::read(&n.image).unwrap(), "n differs from b");
    assert!(on_b[(32 * MIB) as usize..(48 * MIB) as usize]
        .iter()
        .all(|&x| x == 0x33));
    let sent = t.wan_b.stats(&t.stats)["bytes_up"].as_u64().unwrap();
    // What b wrote, and at most the writes before the kill (n may have had them all):
    // never the whole volume.
    let bound = (after + before_kill) * 12 / 10 + 2 * MIB;
    assert!(
        sent <= bound,
        "{sent} bytes sent to n after the failover (bound {bound}, the volume is {SIZE})"
    );

    // a comes back: primary on its disk, refused by b (also primary); made secondary, it
    // takes b's data.
    let _da = Daemon::start_with(&a.dir, &a.config);
    volume(&a, &["secondary", "db"]).ok();
    until(
        "a in step with b",
        || in_step(&b, "a") && status(&a)["disk"] == "UpToDate",
        || format!("{}\n{}", status(&b), status(&a)),
    );
    until(
        "b's stream to a drained",
        || peer(&b, "a")["lag_bytes"] == 0,
        || status(&b).to_string(),
    );
    assert!(on_b == std::fs::read(&a.image).unwrap(), "a differs from b");
}

#[test]
fn gitlabs_move_partner_failover_then_a_plan_cuts_over_to_the_new_node() {
    if let Some(why) = missing() {
        return skip(&why);
    }
    if !have_qemu() {
        return;
    }
    let root = tmp();
    let dir = root.path();
    let mut t = trio(dir, &["write -P 0x11 0 4M", "write -P 0x12 20M 4M"]);
    let (b, n) = (t.b.clone(), t.n.clone());

    // The old primary dies; its partner takes over and the application goes on there:
    // a filesystem made and filled through b's export, while n receives.
    t.da.kill9();
    volume(&b, &["primary", "db"]).ok();
    let mut stack = Stack::default();
    let fs = match stack.ext4_with_tree(dir, &b.dir.join("state").join("db.sock")) {
        Ok(fs) => fs,
        Err(why) => return skip(&why),
    };
    let written = status(&b)["bytes_written"].as_u64().unwrap();
    assert!(written > 0);
    // The application stops (its filesystem unmounted) before the plan's cutover.
    stack.unmount(&fs);
    n_in_step_with_b(&t);

    // The plan moves the volume to the new node.
    let p = dir.join("move.toml");
    std::fs::write(
        &p,
        format!(
            "[[task]]\nname = \"gitlab-disk\"\nkind = \"replica\"\nsource = \"volume:db\"\n\
             volume_config = \"{}\"\ndestination = \"n\"\ndestination_config = \"{}\"\n",
            s(&b.config),
            s(&n.config)
        ),
    )
    .unwrap();
    plan(&["presync", s(&p)]).ok();
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("downtime "), "{out}");
    assert_eq!(status(&n)["role"], "primary");
    assert_eq!(status(&b)["role"], "secondary");
    // n kept receiving after the failover: what b wrote, no full resync (b's link to n
    // carried nothing else but the cutover's drain).
    let sent = t.wan_b.stats(&t.stats)["bytes_up"].as_u64().unwrap();
    let bound = written * 12 / 10 + 2 * MIB;
    assert!(
        sent <= bound,
        "{sent} bytes sent to n for {written} written on b (bound {bound}, the volume is {SIZE})"
    );
    // The new node's backing alone holds the filesystem, clean, with the tree.
    stack.assert_holds_tree(&n.image, &fs.src, &dir.join("on-n"));
}
