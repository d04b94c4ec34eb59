//! The harness of the link tests: two volumes (real metadata and backing files) on
//! loopback TCP, writes made as the NBD server makes them, and waiting for "in step".
#![allow(dead_code)] // each test file uses its part

use nbd::{Backend, FileBackend, WriteEvent, WriteKind, WriteObserver};
use net::Conn;
use proto::WireCounter;
use replica::{LinkSettings, LinkView};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume::{CreateOptions, Meta, StreamOptions};

pub const MIB: u64 = 1 << 20;
pub const SIZE: u64 = 16 * MIB;

pub struct Node {
    pub _dir: tempfile::TempDir,
    pub backing: std::path::PathBuf,
    pub meta: Meta,
    pub backend: Arc<FileBackend>,
    pub tracker: Arc<volume::Tracker>,
    pub slot: u32,
}

pub fn node(primary: bool, peer: u32) -> Node {
    node_with(primary, peer, None)
}

/// A node with several peers (by node id); `slot` is the first one's. Returns the slots
/// in the order of `peers`.
pub fn node_of_many(primary: bool, peers: &[u32]) -> (Node, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let md = dir.path().join("disk.md");
    let opts = CreateOptions {
        peer_slots: peers.len() as u32 + 1,
        inconsistent: !primary,
        ..CreateOptions::new(SIZE)
    };
    Meta::create_with(&md, &opts).unwrap();
    let meta = Meta::open(&md, SIZE).unwrap();
    let slots = meta.attach_peers(peers).unwrap();
    if primary {
        meta.set_role(true).unwrap();
    }
    let backend = Arc::new(FileBackend::open(&backing, false).unwrap());
    let tracker = meta.tracker();
    let node = Node {
        _dir: dir,
        backing,
        meta,
        backend,
        tracker,
        slot: slots[0],
    };
    (node, slots)
}

/// A node whose backing starts as `content` (else zeroes); a secondary with content is
/// "seeded" (a copy made beforehand).
pub fn node_with(primary: bool, peer: u32, content: Option<&[u8]>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(SIZE).unwrap();
    if let Some(c) = content {
        std::fs::write(&backing, c).unwrap();
    }
    let md = dir.path().join("disk.md");
    let opts = CreateOptions {
        peer_slots: 2,
        inconsistent: !primary,
        seeded: !primary && content.is_some(),
        ..CreateOptions::new(SIZE)
    };
    Meta::create_with(&md, &opts).unwrap();
    let meta = Meta::open(&md, SIZE).unwrap();
    let slot = meta.attach_peers(&[peer]).unwrap()[0];
    if primary {
        meta.set_role(true).unwrap();
    }
    let backend = Arc::new(FileBackend::open(&backing, false).unwrap());
    let tracker = meta.tracker();
    Node {
        _dir: dir,
        backing,
        meta,
        backend,
        tracker,
        slot,
    }
}

/// A write as the NBD server makes it: observer, backend, observer.
pub fn write(n: &Node, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let ev = WriteEvent {
        offset,
        length: data.len() as u64,
        kind: WriteKind::Data,
        data: Some(data),
        fua: false,
    };
    n.tracker.before_write(&ev)?;
    let r = n.backend.write_at(data, offset);
    n.tracker.after_write(&ev, &r);
    r
}

/// `n + 1` connected pairs of framed loopback connections.
pub async fn conns(n: usize) -> (Vec<Conn>, Vec<Conn>) {
    conns_counted(n, Arc::new(WireCounter::default())).await
}

/// As [`conns`], every connection counting its bytes in `wire`.
pub async fn conns_counted(n: usize, wire: Arc<WireCounter>) -> (Vec<Conn>, Vec<Conn>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..=n {
        let dial = tokio::net::TcpStream::connect(addr);
        let (d, acc) = tokio::join!(dial, l.accept());
        a.push(Conn::tcp(d.unwrap(), wire.clone()));
        b.push(Conn::tcp(acc.unwrap().0, wire.clone()));
    }
    (a, b)
}

pub fn settings(slot: u32) -> LinkSettings {
    settings_with(slot, false)
}

pub fn settings_with(slot: u32, csums: bool) -> LinkSettings {
    LinkSettings {
        volume: "db".into(),
        peer: "other".into(),
        slot,
        stream: StreamOptions {
            max_lag: 8 * MIB,
            sync: false,
            pull_ahead: false,
            csums,
        },
        max_rate: None,
        idle: Duration::from_secs(5),
        after_split_brain: Default::default(),
    }
}

/// Start both ends; returns their tasks.
pub type LinkTask = tokio::task::JoinHandle<Result<(), replica::LinkError>>;

pub async fn link(a: &Node, b: &Node, data_conns: usize) -> (LinkTask, LinkTask) {
    link_with(a, b, data_conns, false, Arc::new(WireCounter::default())).await
}

/// Start both ends (`csums` on both), counting the link's bytes in `wire`.
pub async fn link_with(
    a: &Node,
    b: &Node,
    data_conns: usize,
    csums: bool,
    wire: Arc<WireCounter>,
) -> (LinkTask, LinkTask) {
    let (ca, cb) = conns_counted(data_conns, wire).await;
    let start = |conns, n: &Node| {
        let (repl, backend, s) = (
            n.meta.replication(),
            n.backend.clone() as Arc<dyn Backend>,
            settings_with(n.slot, csums),
        );
        tokio::spawn(async move {
            let view = LinkView::default();
            replica::run(conns, repl, backend, &s, &view).await
        })
    };
    (start(ca, a), start(cb, b))
}

/// Start a link between `a` (its peer in `a_slot`) and `b` (in `b_slot`), counting its
/// bytes in `wire`.
pub async fn link_slots(
    a: &Node,
    a_slot: u32,
    b: &Node,
    b_slot: u32,
    wire: Arc<WireCounter>,
) -> (LinkTask, LinkTask) {
    let (ca, cb) = conns_counted(2, wire).await;
    let start = |conns, n: &Node, slot| {
        let (repl, backend, s) = (
            n.meta.replication(),
            n.backend.clone() as Arc<dyn Backend>,
            settings(slot),
        );
        tokio::spawn(async move {
            let view = LinkView::default();
            replica::run(conns, repl, backend, &s, &view).await
        })
    };
    (start(ca, a, a_slot), start(cb, b, b_slot))
}

pub async fn wait_in_step(p: &Node, s: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = p.meta.replication().status(p.slot).unwrap();
        let g = s.meta.replication().generations(s.slot);
        if st.out_of_sync_blocks == 0
            && !g.inconsistent
            && g.current == p.meta.replication().generations(p.slot).current
        {
            return;
        }
        assert!(Instant::now() < deadline, "not in step: {st:?} {g:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn same(a: &Node, b: &Node) -> bool {
    std::fs::read(&a.backing).unwrap() == std::fs::read(&b.backing).unwrap()
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
