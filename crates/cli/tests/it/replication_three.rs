//! Three daemons, GitLab's move: two nodes of the old data center (a, b) mirror each
//! other in protocol C, and the new node (n) receives the same volume in protocol A
//! through `wanem.py`. The primary is killed with writes on their way; b is promoted,
//! writes go on, and n keeps receiving from b with only what it missed resynced (the
//! bytes on b's link to n are counted by wanem), no full resync; a comes back and
//! rejoins as b's secondary.

use crate::replication::{have_qemu, node, qemu_io, sock, status, volume, Node, SIZE};
use crate::replication_grow::Wanem;
use crate::util::*;
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

#[test]
fn the_partner_takes_over_and_the_new_node_gets_only_what_it_missed() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (a, b, n) = (
        node(t.path(), "a"),
        node(t.path(), "b"),
        node(t.path(), "n"),
    );
    let c = "protocol = \"C\"\nconnections = 2\n".to_string();
    let async_link = "protocol = \"A\"\nconnections = 2\n".to_string();

    // n waits for both; b waits for a and dials n; a dials both. The links to n go
    // through wanem (b's with its bytes counted).
    configure_peers(
        &n,
        &[
            ("a", &a.fingerprint, async_link.clone()),
            ("b", &b.fingerprint, async_link.clone()),
        ],
    );
    volume(&n, &["create-md", "db"]).ok();
    let _dn = Daemon::start_with(&n.dir, &n.config);
    let wan = ["--rtt-ms", "10", "--flow-mbps", "0", "--total-mbps", "0"];
    let wan_a = Wanem::start(&a.dir, _dn.port, &wan);
    let stats = b.dir.join("wan.json");
    let wan_b = Wanem::start(
        &b.dir,
        _dn.port,
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
    let mut da = Daemon::start_with(&a.dir, &a.config);

    // a primary; both secondaries take the initial sync; then b and n learn from a's
    // peer acknowledgements that the other holds everything.
    volume(&a, &["primary", "db", "--force"]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x11 0 4M"]);
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

    // Writes, and the primary killed right after them.
    let before_kill = 8 * MIB;
    let w = qemu_io(&sock(&a), &["write -P 0x22 16M 8M"]);
    assert!(w.status.success(), "{w:?}");
    da.kill9();

    // b is promoted and written to; n goes on receiving, from b.
    volume(&b, &["primary", "db"]).ok();
    let after = 16 * MIB;
    let w = qemu_io(&sock(&b), &["write -P 0x33 32M 16M"]);
    assert!(w.status.success(), "{w:?}");
    until(
        "n in step with b",
        || in_step(&b, "n") && status(&n)["disk"] == "UpToDate",
        || format!("{}\n{}", status(&b), status(&n)),
    );
    // Drained: nothing sent and not applied.
    until(
        "b's stream to n drained",
        || peer(&b, "n")["lag_bytes"] == 0,
        || status(&b).to_string(),
    );
    let on_b = std::fs::read(&b.image).unwrap();
    assert!(on_b == std::fs::read(&n.image).unwrap(), "n differs from b");
    assert!(on_b[(32 * MIB) as usize..(48 * MIB) as usize]
        .iter()
        .all(|&x| x == 0x33));
    let sent = wan_b.stats(&stats)["bytes_up"].as_u64().unwrap();
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
