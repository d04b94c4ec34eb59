//! Three nodes: a primary (A) replicating to two secondaries (B, N). Peer
//! acknowledgements let B and N know what the other holds, so that when A dies and B is
//! promoted, B resyncs to N only what N missed (and what N holds that B lacks), never the
//! whole volume, and the two end identical.

mod common;

use common::*;
use proto::WireCounter;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const A: u32 = 11;
const B: u32 = 22;
const N: u32 = 33;

struct Trio {
    a: Node,
    b: Node,
    n: Node,
    /// Slots: (A's for B, A's for N), (B's for A, B's for N), (N's for A, N's for B).
    a_slots: (u32, u32),
    b_slots: (u32, u32),
    n_slots: (u32, u32),
}

fn trio() -> Trio {
    let (a, sa) = node_of_many(true, &[B, N]);
    let (b, sb) = node_of_many(false, &[A, N]);
    let (n, sn) = node_of_many(false, &[A, B]);
    Trio {
        a,
        b,
        n,
        a_slots: (sa[0], sa[1]),
        b_slots: (sb[0], sb[1]),
        n_slots: (sn[0], sn[1]),
    }
}

fn out_of_sync(n: &Node, slot: u32) -> u64 {
    n.meta.replication().status(slot).unwrap().out_of_sync_bytes
}

/// Wait until `cond` holds (30 s at most), naming `what` when it does not.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replicates to B and N, both in step, and the secondaries learnt that the other
/// holds everything (their bitmaps for each other are empty). Returns the links' tasks.
async fn replicating(t: &Trio) -> [LinkTask; 4] {
    let (ab, ba) = link_slots(&t.a, t.a_slots.0, &t.b, t.b_slots.0, Arc::default()).await;
    let (an, na) = link_slots(&t.a, t.a_slots.1, &t.n, t.n_slots.0, Arc::default()).await;
    until("B and N in step with A", || {
        let (gb, gn) = (
            t.b.meta.replication().generations(t.b_slots.0),
            t.n.meta.replication().generations(t.n_slots.0),
        );
        out_of_sync(&t.a, t.a_slots.0) == 0
            && out_of_sync(&t.a, t.a_slots.1) == 0
            && !gb.inconsistent
            && !gn.inconsistent
    })
    .await;
    // Some writes while all three are connected, then the peer acks settle.
    for i in 0..64u64 {
        write(
            &t.a,
            (i * 37 % 256) * 64 * 1024,
            &pattern(i as u8, 64 * 1024),
        )
        .unwrap();
    }
    until("B and N know the other holds everything", || {
        out_of_sync(&t.b, t.b_slots.1) == 0 && out_of_sync(&t.n, t.n_slots.1) == 0
    })
    .await;
    assert_eq!(
        t.b.meta.replication().generations(t.b_slots.1).bitmap,
        0,
        "B's bitmap id for N is back to in step"
    );
    [ab, ba, an, na]
}

fn stop(tasks: &[&LinkTask]) {
    for t in tasks {
        t.abort();
    }
}

/// B promoted: links B (source) and N, waits for N in step and returns the bytes B sent.
async fn promote_b_and_link_n(t: &Trio) -> u64 {
    t.b.meta.set_role(true).unwrap();
    let wire = Arc::new(WireCounter::default());
    let (_bn, _nb) = link_slots(&t.b, t.b_slots.1, &t.n, t.n_slots.1, wire.clone()).await;
    until("N in step with B", || {
        let g = t.n.meta.replication().generations(t.n_slots.1);
        out_of_sync(&t.b, t.b_slots.1) == 0
            && out_of_sync(&t.n, t.n_slots.1) == 0
            && !g.inconsistent
            && g.current == t.b.meta.replication().generations(t.b_slots.1).current
    })
    .await;
    wire.sent.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_third_node_gets_only_what_it_missed() {
    let t = trio();
    let [ab, ba, an, na] = replicating(&t).await;

    // N's link breaks; A goes on writing to B alone; then A dies.
    stop(&[&an, &na]);
    let missed = 2 * MIB;
    write(&t.a, 4 * MIB, &pattern(7, missed as usize)).unwrap();
    until("B applied A's writes", || {
        t.a.meta
            .replication()
            .status(t.a_slots.0)
            .unwrap()
            .lag_bytes
            == 0
    })
    .await;
    stop(&[&ab, &ba]);
    assert!(
        out_of_sync(&t.b, t.b_slots.1) >= missed,
        "B's bitmap for N names what N missed"
    );

    // B takes over and writes more; N catches up with only what it lacks.
    let more = MIB;
    let promoted_at = Instant::now();
    let sent = {
        t.b.meta.set_role(true).unwrap();
        write(&t.b, 10 * MIB, &pattern(9, more as usize)).unwrap();
        promote_b_and_link_n(&t).await
    };
    assert!(same(&t.b, &t.n), "N equals B after the catch-up");
    let bound = (missed + more) * 12 / 10 + 256 * 1024;
    assert!(
        sent <= bound,
        "{sent} bytes sent to N for {} bytes it missed (bound {bound}, the volume is {SIZE}); {:?}",
        missed + more,
        promoted_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_third_node_holds_and_the_new_primary_lacks_are_undone() {
    let t = trio();
    let [ab, ba, an, na] = replicating(&t).await;

    // B's link breaks; A writes to N alone; then A dies. N holds writes B never got.
    stop(&[&ab, &ba]);
    write(&t.a, 6 * MIB, &pattern(3, MIB as usize)).unwrap();
    until("N applied A's writes", || {
        t.a.meta
            .replication()
            .status(t.a_slots.1)
            .unwrap()
            .lag_bytes
            == 0
    })
    .await;
    stop(&[&an, &na]);
    assert!(
        out_of_sync(&t.n, t.n_slots.1) >= MIB,
        "N's bitmap for B names what B lacks"
    );
    assert!(!same(&t.b, &t.n));

    // B is promoted all the same: N takes B's data back over those blocks.
    let sent = promote_b_and_link_n(&t).await;
    assert!(
        same(&t.b, &t.n),
        "N equals B: the blocks only N held are B's again"
    );
    assert!(sent <= 2 * MIB, "{sent} bytes sent for 1 MiB N held alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_marks_for_a_fellow_secondary_go_once_both_are_in_step() {
    let t = trio();
    let [ab, ba, _an, _na] = replicating(&t).await;

    // B's link to A breaks, and B's bitmap for N holds marks from before (as after a
    // crash of B, or from an era when B was primary).
    stop(&[&ab, &ba]);
    t.b.meta.replication().mark_all(t.b_slots.1).unwrap();
    assert_eq!(out_of_sync(&t.b, t.b_slots.1), SIZE);

    // Back in step with A, and A says N holds everything: B and N differ by nothing.
    let (_ab, _ba) = link_slots(&t.a, t.a_slots.0, &t.b, t.b_slots.0, Arc::default()).await;
    until("B's older marks for N are gone", || {
        out_of_sync(&t.b, t.b_slots.1) == 0
    })
    .await;
}
