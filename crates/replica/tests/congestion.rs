//! Protocol A under congestion with `on_congestion = "pull-ahead"`: a secondary that
//! stops applying (its disk stalls) makes the primary put writes in its bitmap instead of
//! waiting; the secondary is told it is outdated (and a promotion would then need
//! --force); once it applies again, the resync catches it up and it is up to date and
//! identical.

mod common;

use common::*;
use nbd::{Backend, FileBackend};
use replica::LinkView;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backing whose writes wait while the gate is shut (a stalled disk).
struct Gate {
    inner: Arc<FileBackend>,
    shut: AtomicBool,
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        while self.shut.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Opens the gate when the test ends, however it ends: a blocked writer would otherwise
/// keep the runtime from shutting down after a failed assertion.
struct Reopen(Arc<Gate>);

impl Drop for Reopen {
    fn drop(&mut self) {
        self.0.shut.store(false, Ordering::Release);
    }
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not after 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_ahead_outdates_a_stalled_secondary_until_the_resync_catches_up() {
    let p = node(true, 2);
    let s = node(false, 1);
    let gate = Arc::new(Gate {
        inner: s.backend.clone(),
        shut: AtomicBool::new(false),
    });
    let (cp, cs) = conns(2).await;
    let mut sp = settings(p.slot);
    sp.stream.pull_ahead = true;
    sp.stream.max_lag = 256 << 10;
    let ss = settings(s.slot);
    let (rp, bp) = (p.meta.replication(), p.backend.clone() as Arc<dyn Backend>);
    let tp = tokio::spawn(async move { replica::run(cp, rp, bp, &sp, &LinkView::default()).await });
    let (rs, bs) = (s.meta.replication(), gate.clone() as Arc<dyn Backend>);
    let ts = tokio::spawn(async move { replica::run(cs, rs, bs, &ss, &LinkView::default()).await });
    wait_in_step(&p, &s).await;

    // The secondary's disk stalls; the primary's writes do not wait for it.
    let _reopen = Reopen(gate.clone());
    gate.shut.store(true, Ordering::Release);
    let started = Instant::now();
    for i in 0..8u64 {
        write(&p, i * MIB, &pattern(i as u8, MIB as usize)).unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "pull-ahead writers waited for a stalled peer"
    );
    let st = p.meta.replication().status(p.slot).unwrap();
    assert!(st.pulled_ahead > 0, "{st:?}");
    until("the secondary told it is outdated", || {
        s.meta.replication().generations(s.slot).outdated
    })
    .await;
    assert!(s.meta.status().outdated);

    // The disk comes back: the resync catches the secondary up.
    gate.shut.store(false, Ordering::Release);
    wait_in_step(&p, &s).await;
    until("the secondary up to date again", || {
        !s.meta.replication().generations(s.slot).outdated
            && p.meta
                .replication()
                .status(p.slot)
                .unwrap()
                .out_of_sync_blocks
                == 0
    })
    .await;
    assert!(same(&p, &s));
    tp.abort();
    ts.abort();
}
