//! Two volumes (real metadata and backing files) joined by a link over loopback TCP: the
//! initial full sync while the primary writes, the stream keeping the peer in step, a
//! broken link resyncing only what was written meanwhile, the secondary's own writes
//! refused, and a peer that sends an operation outside the volume cut off.

mod common;

use common::*;
use nbd::Backend;
use replica::LinkView;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_then_the_stream_then_a_resync_of_what_a_broken_link_missed() {
    let p = node(true, 2);
    let s = node(false, 1);
    // Written before the peer ever connected.
    for i in 0..8u64 {
        write(&p, i * 2 * MIB, &pattern(i as u8, 64 << 10)).unwrap();
    }
    // The secondary refuses writes of its own.
    let e = write(&s, 0, &[1; 4096]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");

    let (ta, tb) = link(&p, &s, 3).await;
    // Writes during the initial sync.
    for i in 0..32u64 {
        write(&p, i * 300_000, &pattern(100 + i as u8, 8192)).unwrap();
    }
    wait_in_step(&p, &s).await;
    // Streamed writes after it, then a quiet moment for acknowledgements.
    for i in 0..16u64 {
        write(&p, SIZE - (i + 1) * 65536, &pattern(200 + i as u8, 4096)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while p
        .meta
        .replication()
        .status(p.slot)
        .unwrap()
        .out_of_sync_blocks
        > 0
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(same(&p, &s), "the peer holds the same bytes");
    let sent_full = p.meta.replication().status(p.slot).unwrap().resync_bytes;
    assert!(sent_full >= SIZE, "the first sync was full: {sent_full}");

    // The link breaks; the primary goes on writing; the next link sends only that.
    ta.abort();
    tb.abort();
    let _ = ta.await;
    let _ = tb.await;
    write(&p, 5 * MIB, &pattern(7, 4096)).unwrap();
    write(&p, 9 * MIB + 4096, &pattern(8, 4096)).unwrap();
    assert!(!same(&p, &s));
    let (ta, tb) = link(&p, &s, 2).await;
    wait_in_step(&p, &s).await;
    assert!(same(&p, &s));
    let resent = p.meta.replication().status(p.slot).unwrap().resync_bytes - sent_full;
    let block = u64::from(p.meta.geometry().block_size);
    assert_eq!(resent, 2 * block, "only the two blocks written while apart");
    ta.abort();
    tb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_outside_the_volume_is_cut_off() {
    use replica::wire::{NodeState, PeerMsg, LINK_VERSION};
    let s = node(false, 1);
    let (mut fake, real) = conns(1).await;
    let repl = s.meta.replication();
    let backend = s.backend.clone() as Arc<dyn Backend>;
    let set = settings(s.slot);
    let t = tokio::spawn(async move {
        let view = LinkView::default();
        replica::run(real, repl, backend, &set, &view).await
    });
    let g = s.meta.replication().generations(s.slot);
    let me = NodeState {
        version: LINK_VERSION,
        size: SIZE,
        block_size: s.meta.geometry().block_size,
        current: g.current ^ 1,
        history: vec![0; 4],
        bitmap: 0,
        bitmap_history: vec![0; 2],
        primary: true,
        inconsistent: false,
        seeded: false,
        out_of_sync_blocks: 0,
        discard_my_data: false,
        after_split_brain: Default::default(),
    };
    let ctl = &mut fake[0];
    ctl.writer.send_any(&me, false).await.unwrap();
    let _their: NodeState = ctl.reader.recv_any().await.unwrap().unwrap();
    loop {
        match ctl.reader.recv_any::<PeerMsg>().await.unwrap().unwrap() {
            PeerMsg::RunsEnd => break,
            PeerMsg::Runs(_) => {}
            m => panic!("{m:?}"),
        }
    }
    ctl.writer
        .send_any(&PeerMsg::Start { resync_blocks: 1 }, false)
        .await
        .unwrap();
    fake[1]
        .writer
        .send_any(
            &PeerMsg::Data {
                seq: 1,
                offset: SIZE - 10,
                data: vec![0; 4096],
                fua: false,
                wid: 1,
                unknown: Vec::new(),
            },
            false,
        )
        .await
        .unwrap();
    let e = t.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("outside the volume"), "{e}");
    // Nothing was written past (or into) the backing's end.
    assert_eq!(std::fs::metadata(&s.backing).unwrap().len(), SIZE);
}
