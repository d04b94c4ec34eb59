//! Split brain between two real daemons: both nodes write while apart (the link
//! disconnected, the secondary promoted meanwhile); on reconnect the link is refused with
//! one line naming both sides' changes, until the operator runs `connect
//! --discard-my-data` on the node whose writes are given up, or the peers'
//! `after_split_brain = "discard-least-changes"` settles it by itself. Either way the
//! loser ends identical to the winner, its own writes gone. `cutover volume events`
//! reports the refusal and the reconnection as JSON lines.

use crate::replication::{
    have_qemu, qemu_io, same_backings, sock, status, synced_pair, volume, wait_in_step, Node,
};
use crate::util::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Both write while apart: `a` (primary) `a_writes`, `b` (promoted, then demoted again)
/// `b_writes`; then `a` connects again.
pub(crate) fn split(a: &Node, b: &Node, a_writes: &[&str], b_writes: &[&str]) {
    volume(a, &["disconnect", "db"]).ok();
    let w = qemu_io(&sock(a), a_writes);
    assert!(w.status.success(), "{w:?}");
    wait_for(b, "b sees the link down", |st| {
        st["peers"][0]["connection"] != "connected"
    });
    volume(b, &["primary", "db"]).ok();
    let w = qemu_io(&sock(b), b_writes);
    assert!(w.status.success(), "{w:?}");
    volume(b, &["secondary", "db"]).ok();
    volume(a, &["connect", "db"]).ok();
}

/// `cutover volume events db` on a node, its lines collected.
struct Events {
    child: std::process::Child,
    lines: std::thread::JoinHandle<Vec<Value>>,
}

impl Events {
    fn follow(n: &Node) -> Events {
        use std::io::BufRead;
        let mut child = cutover_cmd()
            .args(["volume", "events", "db", "--config", s(&n.config)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}")))
                .collect()
        });
        Events { child, lines }
    }

    fn stop(mut self) -> Vec<Value> {
        // Let the last look (every 200 ms) report what just happened.
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.join().unwrap()
    }
}

/// Poll `n`'s status until `ok` holds (30 s at most).
pub(crate) fn wait_for(n: &Node, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let st = status(n);
        if ok(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not after 30 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_split_brain_is_refused_until_the_secondary_discards_its_data() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (a, da, b, db) = synced_pair(t.path(), "");
    let events = Events::follow(&a);
    assert_one_line_error(&volume(&a, &["events", "nope"]), &["nope"]);
    // a writes 4 blocks (16 KiB each), b writes 2, one over a block a wrote too.
    split(
        &a,
        &b,
        &["write -P 0xaa 1M 64k"],
        &["write -P 0xbb 2M 16k", "write -P 0xbb 1M 4k"],
    );
    let st = wait_for(&a, "the split brain refused", |st| {
        st["peers"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("split brain"))
    });
    let why = st["peers"][0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("this node wrote 4 block(s)") && why.contains("peer b wrote 2 block(s)"),
        "{why}"
    );
    assert!(!why.contains('\n'), "{why}");
    assert_eq!(st["peers"][0]["connection"], "standalone", "{st}");
    // Neither side's data moved.
    let on_b = std::fs::read(&b.image).unwrap();
    assert!(on_b[2 << 20..(2 << 20) + 16384].iter().all(|&x| x == 0xbb));

    // The primary's data is in use: it cannot be the one discarded.
    let out = volume(&a, &["connect", "db", "--discard-my-data"]);
    assert_one_line_error(&out, &["primary", "secondary"]);

    // The operator gives up b's writes: b takes a's data, through a bitmap resync.
    volume(&b, &["connect", "db", "--discard-my-data"]).ok();
    assert_eq!(status(&b)["peers"][0]["discard_my_data"], true);
    volume(&a, &["connect", "db"]).ok(); // redial now, not after the backoff
    wait_in_step(&a, &b, "after --discard-my-data");
    let data = same_backings(&a, &b);
    assert!(data[2 << 20..(2 << 20) + 16384].iter().all(|&x| x == 0x11));
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xaa));
    let sb = status(&b);
    assert_eq!(sb["peers"][0].get("discard_my_data"), None, "{sb}");
    assert_eq!(sb["disk"], "UpToDate", "{sb}");

    // The stream of events saw the refusal, then the link come back.
    let lines = events.stop();
    let refused = lines.iter().position(|e| {
        e["peer"] == "b"
            && e["state"]["last_error"]
                .as_str()
                .is_some_and(|m| m.contains("split brain"))
    });
    let refused = refused.unwrap_or_else(|| panic!("no split brain event in {lines:#?}"));
    assert!(
        lines[refused..].iter().any(|e| e["peer"] == "b"
            && e["changed"]
                .as_array()
                .unwrap()
                .contains(&"connection".into())
            && e["state"]["connection"] == "connected"),
        "no reconnection after the refusal in {lines:#?}"
    );
    assert!(lines
        .iter()
        .all(|e| e["time"].is_string() && e["volume"] == "db"));

    // Replication goes on as before.
    let w = qemu_io(&sock(&a), &["write -P 0xcc 3M 16k"]);
    assert!(w.status.success(), "{w:?}");
    wait_in_step(&a, &b, "after the settlement");
    same_backings(&a, &b);
    drop(da);
    drop(db);
}

#[test]
fn discard_least_changes_settles_a_split_brain_by_itself() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (a, da, b, db) = synced_pair(t.path(), "after_split_brain = \"discard-least-changes\"\n");
    split(&a, &b, &["write -P 0xaa 1M 64k"], &["write -P 0xbb 2M 16k"]);
    wait_in_step(&a, &b, "the policy settling the split brain");
    let data = same_backings(&a, &b);
    assert!(data[2 << 20..(2 << 20) + 16384].iter().all(|&x| x == 0x11));
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xaa));
    drop(da);
    drop(db);
}
