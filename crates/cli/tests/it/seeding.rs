//! Checksums between two real daemons: a replica seeded from a copy of the primary's
//! image made beforehand (`create-md --seeded-from`) takes only the blocks that differ,
//! and `cutover volume verify` finds blocks changed behind the secondary's back and
//! resends them; the refusals are one line each.

use crate::replication::{configure, have_qemu, node, status, volume, wait_in_step, Node, SIZE};
use crate::util::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const BLOCK: u64 = 16 << 10;

/// Change one byte in each of `blocks` of `n`'s backing, behind its daemon's back.
fn scribble(n: &Node, blocks: &[u64]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&n.image)
        .unwrap();
    for &b in blocks {
        f.write_at(&[0xee], b * BLOCK + 100).unwrap();
    }
}

/// Wait until `p`'s verify is over and everything it found is resent.
fn wait_verified(p: &Node) -> Value {
    let start = Instant::now();
    loop {
        let st = status(p);
        let peer = &st["peers"][0];
        if peer.get("verify_position").is_none()
            && peer["verified_bytes"].as_u64() >= Some(SIZE)
            && peer["out_of_sync_bytes"] == 0
            && peer["lag_bytes"] == 0
        {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "verify not done after 60 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_seeded_replica_takes_only_what_differs_and_verify_repairs_it() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let a = node(t.path(), "a");
    let b = node(t.path(), "b");
    let data: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 14) as u8)
        .collect();
    std::fs::write(&a.image, &data).unwrap();
    // The copy shipped beforehand, five blocks of it stale.
    std::fs::write(&b.image, &data).unwrap();
    scribble(&b, &[0, 1, 100, 2000, SIZE / BLOCK - 1]);

    configure(&b, "a", &a.fingerprint, "");
    let out = volume(&b, &["create-md", "db", "--seeded-from", "nobody"]);
    assert_one_line_error(&out, &["--seeded-from nobody", "no such peer", "a"]);
    volume(&b, &["create-md", "db", "--seeded-from", "a"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    configure(
        &a,
        "b",
        &b.fingerprint,
        &format!("address = \"127.0.0.1:{}\"\nconnections = 2\n", db.port),
    );
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    volume(&a, &["primary", "db", "--force"]).ok();
    let st = wait_in_step(&a, &b, "the seeded sync");
    assert_eq!(st["peers"][0]["mismatched_blocks"], 5, "{st}");
    assert!(std::fs::read(&b.image).unwrap() == data);

    // Verify runs on the primary only.
    let out = volume(&b, &["verify", "db"]);
    assert_one_line_error(
        &out,
        &["not connected with this node as its source", "target"],
    );
    // Damage behind the secondary's back: verify finds it and resends it.
    scribble(&b, &[7, 3000]);
    volume(&a, &["verify", "db"]).ok();
    let st = wait_verified(&a);
    assert_eq!(st["peers"][0]["mismatched_blocks"], 7, "{st}");
    assert!(std::fs::read(&b.image).unwrap() == data);
    drop(da);
    drop(db);
}
