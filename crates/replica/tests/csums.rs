//! Checksums on the link: a seeded secondary (a copy of the primary's data made
//! beforehand, a tenth of it stale) becomes consistent with only the stale blocks sent as
//! data; a bitmap resync with `csums` sends only the blocks whose bytes really changed;
//! an online verify finds blocks changed behind the secondary's back and repairs them.

mod common;

use common::*;
use proto::WireCounter;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wait until the primary's peer holds everything: nothing out of sync or in flight,
/// no verify under way.
async fn wait_drained(p: &Node) -> volume::PeerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = p.meta.replication().status(p.slot).unwrap();
        if st.out_of_sync_blocks == 0 && st.lag_bytes == 0 && st.verify_position.is_none() {
            return st;
        }
        assert!(Instant::now() < deadline, "not drained: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sent(w: &WireCounter) -> u64 {
    w.sent.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_copy_gets_only_its_stale_blocks_and_verify_repairs_rot() {
    let content: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i as u8) ^ ((i >> 13) as u8))
        .collect();
    let p = node_with(true, 2, Some(&content));
    let block = u64::from(p.meta.geometry().block_size);
    let blocks = SIZE / block;
    // The copy: every tenth block stale.
    let mut copy = content.clone();
    let stale: Vec<u64> = (0..blocks).step_by(10).collect();
    for &b in &stale {
        copy[(b * block) as usize] ^= 0xff;
    }
    let s = node_with(false, 1, Some(&copy));
    assert!(s.meta.replication().generations(s.slot).seeded);

    // No csums configured: a seeded target gets checksums anyway.
    let wire = Arc::new(WireCounter::default());
    let (ta, tb) = link_with(&p, &s, 3, false, wire.clone()).await;
    wait_in_step(&p, &s).await;
    let st = wait_drained(&p).await;
    assert!(same(&p, &s), "the seeded copy equals the primary");
    assert_eq!(st.mismatched_blocks, stale.len() as u64, "{st:?}");
    let stale_bytes = stale.len() as u64 * block;
    // Data for the stale blocks, 32 bytes per block of hashes, and the link's chatter.
    let bound = stale_bytes + blocks * 32 + 256 * 1024;
    assert!(
        sent(&wire) <= bound,
        "{} bytes on the wire for {stale_bytes} stale bytes (bound {bound})",
        sent(&wire)
    );
    assert!(!s.meta.replication().generations(s.slot).seeded);

    // Bit rot on the secondary, behind its back: an online verify finds and repairs it.
    let rotted = [3u64, 4, blocks - 1];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.backing)
            .unwrap();
        for &b in &rotted {
            f.write_at(&[0x55; 100], b * block + 17).unwrap();
        }
    }
    assert!(!same(&p, &s));
    p.meta.replication().start_verify(p.slot).unwrap();
    let st = wait_drained(&p).await;
    assert!(same(&p, &s), "verify repaired the secondary");
    assert_eq!(
        st.mismatched_blocks,
        (stale.len() + rotted.len()) as u64,
        "{st:?}"
    );
    assert_eq!(st.verified_bytes, SIZE, "{st:?}");
    ta.abort();
    tb.abort();
    let _ = ta.await;
    let _ = tb.await;

    // A bitmap resync with csums: of two blocks written while apart, one with the bytes
    // it already held, only the other travels as data.
    let before = p.meta.replication().status(p.slot).unwrap();
    let at = 7 * block;
    let same_bytes = content[at as usize..(at + block) as usize].to_vec();
    write(&p, at, &same_bytes).unwrap();
    write(&p, 9 * block, &pattern(9, block as usize)).unwrap();
    let wire = Arc::new(WireCounter::default());
    let (ta, tb) = link_with(&p, &s, 2, true, wire.clone()).await;
    wait_in_step(&p, &s).await;
    let st = wait_drained(&p).await;
    assert!(same(&p, &s));
    assert_eq!(st.mismatched_blocks - before.mismatched_blocks, 1, "{st:?}");
    assert!(sent(&wire) < 2 * block, "{} bytes sent", sent(&wire));
    ta.abort();
    tb.abort();
}
